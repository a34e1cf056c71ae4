"""
The Llama 3 tokenizer: tiktoken BPE over Meta's tokenizer.model, plus 256 special tokens.

tokenizer.model is a text file of "base64(token bytes) rank" lines. Official checkpoint
directories ship it; Meta's `llama-models` package on PyPI carries the same file, which
find_tokenizer_model() uses when no path is given.
"""

import base64
import importlib.util
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, List, Literal, Optional, Sequence, Union

import tiktoken

# Llama 3's pre-tokenizer split: contractions, letter runs, 1-3 digit groups, punctuation, whitespace
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

NUM_RESERVED_SPECIAL_TOKENS = 256
# The named special tokens, in Meta's order; reserved_special_token_2.. fill the rest of the 256.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model wants a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]

# tiktoken panics on inputs longer than about 400k characters, and gets quadratically slow on
# very long runs of only whitespace or only non-whitespace; encode() cuts input below both.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000



class ConfigError(ValueError):
    """Bad input from the user: a missing file, a mismatched checkpoint, an out-of-range knob.
    The CLIs print its message as one line instead of a traceback. It lives here, in the module
    everything imports, so that there is exactly one class of it."""




def find_tokenizer_model(tokenizer_path=None, ckpt_dir=None) -> Path:
    """An explicit path wins; then ckpt_dir/tokenizer.model; then the copy in llama-models
    (located without importing the package, whose imports pull in much more)."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} does not exist")
        return path
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer.model").is_file():
        return Path(ckpt_dir) / "tokenizer.model"
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    raise ConfigError("no tokenizer.model found: pass --tokenizer_path, put tokenizer.model in the "
                      "checkpoint directory, or `pip install --no-deps llama-models==0.3.0`")


def load_bpe_ranks(path: Path) -> dict:
    ranks = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ConfigError(f"{path}:{lineno} is not a 'base64 rank' line; is this a Llama 3 "
                              f"tokenizer.model?") from None
    return ranks


class Tokenizer:
    def __init__(self, model_path):
        model_path = Path(model_path)
        mergeable_ranks = load_bpe_ranks(model_path)
        num_base_tokens = len(mergeable_ranks)
        names = NAMED_SPECIAL_TOKENS + [
            f"<|reserved_special_token_{i}|>"
            for i in range(2, 2 + NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
        ]
        self.special_tokens = {name: num_base_tokens + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=model_path.name, pat_str=PAT_STR,
                                       mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        self.n_words = num_base_tokens + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        # A base model ends a document with <|end_of_text|>; an instruct model ends its turn with
        # <|eot_id|>, or <|eom_id|> when it waits for a tool. Sampling stops at any of them.
        self.base_stop_tokens = [self.eos_id]
        self.instruct_stop_tokens = [self.eot_id, self.eom_id]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s: str, *, bos: bool, eos: bool,
               allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
               disallowed_special: Union[Literal["all"], Collection[str]] = ()) -> List[int]:
        """Token ids of s. By default text that looks like a special token is encoded as plain
        text; allowed_special="all" (or a set of names) turns it into the special token."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}")
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed_special,
                                             disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut s so that no piece holds more than max_run consecutive whitespace, or consecutive
    non-whitespace, characters. Cuts fall only inside such over-long runs."""
    start, run, run_is_space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]
