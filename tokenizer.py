"""
The Llama 3 tokenizer: tiktoken BPE over Meta's tokenizer.model, plus 256 special tokens.

tokenizer.model is a text file of "base64(token bytes) rank" lines. Official checkpoint
directories ship it; Meta's `llama-models` package on PyPI carries the same file, which
find_tokenizer_model() uses when no path is given.

The same class also serves the byte-level BPE vocabularies that GGUF files carry (Llama 3.x GGUFs
from llama.cpp/ollama, SmolLM2): Tokenizer.from_gguf builds it from the file's metadata.

ChatFormat, at the end, writes a dialog as prompt tokens (Llama 3's headers or ChatML) and reads a
generated reply back into content and tool calls, as Meta keeps chat_format.py beside its tokenizer.
"""

import ast
import base64
import datetime
import importlib.util
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import tiktoken

from errors import ConfigError

# Llama 3's pre-tokenizer split: contractions, letter runs, 1-3 digit groups, punctuation, whitespace
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# GPT-2's split: case-sensitive contractions, a space glued to the next word, number or symbol run
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# SmolLM2 (llama.cpp's "smollm", as StarCoder): first cut every digit out on its own, then split
# each remaining piece with GPT-2's pattern. In one regex: a digit is a piece by itself, and
# whitespace before a digit ends a piece the way the end of the text does, hence (?![^\s\p{N}]).
SMOLLM_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

# tokenizer.ggml.pre -> split pattern, for the pre-tokenizers this project has checked
GGUF_PRE_TOKENIZERS = {
    "llama-bpe": PAT_STR, "llama3": PAT_STR, "llama-v3": PAT_STR,
    "smollm": SMOLLM_PAT_STR,
    "gpt2": GPT2_PAT_STR,
}

# Names that end a turn (or a document) in the vocabularies we load; sampling stops at them.
END_OF_TURN_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|im_end|>"]
END_OF_TEXT_TOKENS = ["<|end_of_text|>", "<|endoftext|>"]

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


def find_tokenizer_model(tokenizer_path=None, ckpt_dir=None) -> Path:
    """An explicit path wins; then ckpt_dir/tokenizer.model; then the copy in llama-models
    (located without importing the package, whose imports pull in much more)."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if not path.exists():
            raise ConfigError(f"tokenizer file {path} does not exist")
        return path
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer.model").exists():  # if damaged, said when read
        return Path(ckpt_dir) / "tokenizer.model"
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    raise ConfigError("no tokenizer.model found: pass --tokenizer_path, put tokenizer.model in the "
                      "checkpoint directory, or `pip install --no-deps llama-models==0.3.0`")


def load_bpe_ranks(path: Path) -> dict:
    """tokenizer.model's ranks, checked as tiktoken needs them (it panics otherwise): every token
    once, the ranks 0..n-1, and every single byte a token."""
    redo = "re-download it, or pass the tokenizer.model that came with the checkpoint"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"could not read {path} as a Llama 3 tokenizer.model ({e}); {redo}") from None
    ranks, lines = {}, 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
            lines += 1
        except ValueError:
            raise ConfigError(f"{path}:{lineno} is not a 'base64 rank' line; is this a Llama 3 "
                              f"tokenizer.model? {redo}") from None
    if len(ranks) != lines or sorted(ranks.values()) != list(range(lines)) or \
            not all(bytes([b]) in ranks for b in range(256)):
        raise ConfigError(f"{path} does not give each of its {lines} tokens one of the ranks 0..{lines - 1}, "
                          f"every byte among them; it is damaged: {redo}")
    return ranks


@dataclass
class Vocab:
    """Everything a Tokenizer is built from, whichever file it came from."""
    name: str
    mergeable_ranks: Dict[bytes, int]  # token bytes -> id; BPE merges the lowest-ranked pair first
    pat_str: str  # the pre-tokenizer: BPE runs within each match of this regex
    special_tokens: Dict[str, int]
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool = True  # whether plain text gets BOS in front (Llama 3 yes, SmolLM2 no)
    # Tokens matched whole in any text, like llama.cpp's user-defined tokens (not special)
    always_split: frozenset = field(default_factory=frozenset)


def meta_vocab(model_path) -> Vocab:
    """Meta's tokenizer.model: the BPE ranks, then 256 special tokens in Meta's order."""
    model_path = Path(model_path)
    mergeable_ranks = load_bpe_ranks(model_path)
    num_base_tokens = len(mergeable_ranks)
    names = NAMED_SPECIAL_TOKENS + [
        f"<|reserved_special_token_{i}|>"
        for i in range(2, 2 + NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
    ]
    special = {name: num_base_tokens + i for i, name in enumerate(names)}
    return Vocab(model_path.name, mergeable_ranks, PAT_STR, special, bos_id=special["<|begin_of_text|>"],
                 eos_id=special["<|end_of_text|>"], pad_id=special["<|finetune_right_pad_id|>"])


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level vocabularies spell every token with
    these 256 characters (printable Latin-1 bytes stand for themselves, the rest map to 256+)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4
GGUF_TOKEN_TYPES = range(7)  # undefined, normal, unknown, control, user-defined, unused, byte


GGUF_REDO = "the file is damaged: re-download or re-export it"


def gguf_vocab(meta: dict, name: str = "gguf") -> Vocab:
    """A byte-level BPE vocabulary from GGUF metadata (the tokenizer.ggml.* keys, as plain values).
    Normal tokens become tiktoken ranks (rank = token id); every other token (control, user-defined,
    unused) is special, spelled as its text."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"{name}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2', as in "
                          f"Llama 3 and SmolLM2) is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
        raise ConfigError(f"{name}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; "
                          f"supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConfigError(f"{name}: tokenizer.ggml.tokens is not a list of strings; {GGUF_REDO}")
    types = meta.get("tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(types, list) or len(types) != len(tokens) or not all(t in GGUF_TOKEN_TYPES for t in types) or \
            not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise ConfigError(f"{name}: tokenizer.ggml.token_type or merges do not fit its {len(tokens)} tokens; "
                          f"{GGUF_REDO}")
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks, special, user_defined = {}, {}, set()
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == GGUF_TOKEN_NORMAL:
            try:
                ranks[bytes(byte_of[ch] for ch in tok)] = i
            except KeyError:
                raise ConfigError(f"{name}: token {i} {tok!r} is not spelled in the byte-level alphabet") from None
        else:
            special[tok] = i
            if kind == GGUF_TOKEN_USER_DEFINED:
                user_defined.add(tok)
    if len(ranks) + len(special) != len(tokens):
        raise ConfigError(f"{name}: the vocabulary spells some tokens twice; {GGUF_REDO}")

    def merged_rank(merge):  # None: not two tokens of this vocabulary
        joined = merge.replace(" ", "", 1)
        return ranks.get(bytes(byte_of[ch] for ch in joined)) if all(ch in byte_of for ch in joined) else None

    # tiktoken merges the pair whose result has the lowest id; that is the file's merge order only
    # if merge results never go down in id, as in vocabularies trained by BPE (and Llama 3's).
    merged = [merged_rank(m) for m in merges]
    if any(r is None for r in merged) or any(a > b for a, b in zip(merged, merged[1:])):
        raise ConfigError(f"{name}: the merges are not in token-id order, which this tiktoken-based "
                          f"tokenizer needs")
    bos_id = meta.get("tokenizer.ggml.bos_token_id", special.get("<|begin_of_text|>"))
    eos_id = meta.get("tokenizer.ggml.eos_token_id", special.get("<|end_of_text|>"))
    if bos_id is None or eos_id is None:
        raise ConfigError(f"{name}: no tokenizer.ggml.bos_token_id / eos_token_id")
    pad_id = meta.get("tokenizer.ggml.padding_token_id", special.get("<|finetune_right_pad_id|>", eos_id))
    if not all(isinstance(i, int) and 0 <= i < len(tokens) for i in (bos_id, eos_id, pad_id)):
        raise ConfigError(f"{name}: its BOS, EOS or padding token id ({bos_id}, {eos_id}, {pad_id}) is not one of "
                          f"its {len(tokens)} tokens; {GGUF_REDO}")
    # llama.cpp adds BOS for Llama 3 vocabularies unless the file says otherwise
    add_bos = meta.get("tokenizer.ggml.add_bos_token", GGUF_PRE_TOKENIZERS[pre] == PAT_STR)
    return Vocab(name, ranks, GGUF_PRE_TOKENIZERS[pre], special, bos_id=bos_id, eos_id=eos_id,
                 pad_id=pad_id, add_bos=bool(add_bos), always_split=frozenset(user_defined))


def gguf_vocab_fields(vocab: Vocab) -> dict:
    """The tokenizer.ggml.* metadata of a vocabulary, as llama.cpp's converter writes a byte-level
    BPE one: tokens spelled in GPT-2's byte alphabet (specials as their text), and as merges every
    split of a token into two tokens, in the order of the merged token's rank (so that merging the
    earliest-listed pair first is tiktoken's lowest-rank-first, as gguf_vocab requires)."""
    pre = next((name for name, pat in GGUF_PRE_TOKENIZERS.items() if pat == vocab.pat_str), None)
    if pre is None:
        raise ConfigError(f"{vocab.name}: its pre-tokenizer has no llama.cpp name, so it cannot be written to GGUF")
    spelling = bytes_to_unicode()
    n = len(vocab.mergeable_ranks) + len(vocab.special_tokens)
    tokens, types = [""] * n, [GGUF_TOKEN_NORMAL] * n
    spelled = {}
    for token, rank in vocab.mergeable_ranks.items():
        spelled[token] = tokens[rank] = "".join(spelling[b] for b in token)
    for name, i in vocab.special_tokens.items():
        tokens[i] = name
        types[i] = GGUF_TOKEN_USER_DEFINED if name in vocab.always_split else GGUF_TOKEN_CONTROL
    ranks = vocab.mergeable_ranks
    merges = [f"{spelled[t[:i]]} {spelled[t[i:]]}" for t in sorted(ranks, key=ranks.get) for i in range(1, len(t))
              if t[:i] in ranks and t[i:] in ranks]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
            "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "padding_token_id": vocab.pad_id,
            "add_bos_token": vocab.add_bos}


class Tokenizer:
    """tiktoken BPE with special tokens. Tokenizer(path) reads Meta's tokenizer.model;
    Tokenizer.from_gguf(metadata) reads a GGUF file's vocabulary; Tokenizer(vocab) takes a Vocab."""

    def __init__(self, model_path):
        vocab = model_path if isinstance(model_path, Vocab) else meta_vocab(model_path)
        self.path = None if isinstance(model_path, Vocab) else Path(model_path)  # the tokenizer.model read
        self.special_tokens = dict(vocab.special_tokens)
        self.model = tiktoken.Encoding(name=vocab.name, pat_str=vocab.pat_str,
                                       mergeable_ranks=vocab.mergeable_ranks, special_tokens=self.special_tokens)
        self.n_words = len(vocab.mergeable_ranks) + len(self.special_tokens)
        self.bos_id, self.eos_id, self.pad_id = vocab.bos_id, vocab.eos_id, vocab.pad_id
        self.add_bos = vocab.add_bos
        self.always_split = vocab.always_split
        self.vocab = vocab  # what it was built from (formats.save_gguf writes it back)
        self.eot_id = self.special_tokens.get("<|eot_id|>")
        self.eom_id = self.special_tokens.get("<|eom_id|>")
        # A base model ends a document with <|end_of_text|>; an instruct model ends its turn with
        # <|eot_id|> (<|im_end|> in ChatML), or <|eom_id|> when it waits for a tool. Sampling stops
        # at any of them.
        self.base_stop_tokens = _unique([self.eos_id] + self._ids(END_OF_TEXT_TOKENS))
        self.instruct_stop_tokens = self._ids(END_OF_TURN_TOKENS)
        self.stop_tokens = _unique([self.eos_id] + self._ids(["<|eom_id|>", "<|eot_id|>", "<|im_end|>"])
                                   + self._ids(END_OF_TEXT_TOKENS))

    @classmethod
    def from_gguf(cls, metadata: dict, name: str = "gguf") -> "Tokenizer":
        return cls(gguf_vocab(metadata, name))

    def _ids(self, names: List[str]) -> List[int]:
        return [self.special_tokens[n] for n in names if n in self.special_tokens]

    def encode(self, s: str, *, bos: bool, eos: bool,
               allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
               disallowed_special: Union[Literal["all"], Collection[str]] = ()) -> List[int]:
        """Token ids of s. By default text that looks like a special token is encoded as plain
        text; allowed_special="all" (or a set of names) turns it into the special token."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}")
        ids = [self.bos_id] if bos else []
        if self.always_split and allowed_special != "all":
            allowed_special = frozenset(allowed_special) | self.always_split
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed_special,
                                             disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def pieces(self, tokens: Iterable[Optional[int]]) -> Iterator[Tuple[Optional[int], str]]:
        """(token, text) for each token as it arrives (None entries skipped): text is what the token
        adds to the decoded whole, "" while a character is split across tokens, whose bytes then
        come with the token that completes it; a last (None, text) flushes any rest. The texts
        join to exactly what the tokens decode to."""
        ids, shown = [], ""
        for token in tokens:
            if token is None:
                continue
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):  # wait for the character's other bytes
                yield token, ""
                continue
            yield token, text[len(shown):]
            shown = text
        text = self.decode(ids)
        if text != shown:
            yield None, text[len(shown):]


def _unique(ids: List[int]) -> List[int]:
    return list(dict.fromkeys(ids))


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


# -----------------------------------------------------------------------------
# chat: a dialog as prompt tokens, in Llama 3's header format or ChatML (SmolLM2), and a generated
# assistant message back into content and tool calls

# The role a header names, by the role a message dict gives; a tool's answer is "ipython" in Llama 3
LLAMA3_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}
# Tools the Llama 3.1 models were trained to call by name; the others are custom functions
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
# How a custom function call is written: {"type": "function", "name": ..., "parameters": ...} (3.1's
# default), <function=name>{...}</function>, or [name(key=value, ...)] (3.2's 1B/3B)
TOOL_FORMATS = ("json", "function_tag", "python_list")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
KNOWLEDGE_CUTOFF = "December 2023"

# What decode_assistant reads as a call: a built-in's `name.call(query="...")`, a function tag
BUILTIN_CALL = re.compile(r'\b(\w+)\.call\(query="([^"]*)"\)')
FUNCTION_TAG = re.compile(r"<function=([^}]+)>(\{.*?\})")


def llama3_system_prompt(instruction: Optional[str] = None, tools: Sequence[str] = (),
                         date: Union[None, str, datetime.date] = None) -> str:
    """A system message's content as Meta's Llama 3.1 templates write it: "Environment: ipython" when
    any tool is on, a "Tools:" line naming the built-in tools other than code_interpreter (which the
    environment line alone turns on), the knowledge cutoff and today's date (date, default today),
    then the instruction. tools are names; a custom function's name only turns the environment on,
    its description is the caller's to write (in the system or a user message)."""
    lines = []
    if tools:
        named = [t for t in tools if t in BUILTIN_TOOLS and t != "code_interpreter"]
        lines += ["Environment: ipython", "Tools: " + ", ".join(named) if named else ""]
    day = date if isinstance(date, str) else (date or datetime.date.today()).strftime("%d %B %Y")
    text = "\n".join(lines + [f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}", f"Today Date: {day}"])
    return text + (f"\n\n{instruction}" if instruction else "") + "\n"


def _python_value(v) -> str:
    """v as a Python literal, for the python_list format."""
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if v is None or isinstance(v, (bool, int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_python_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_python_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"tool call argument {v!r} is a {type(v).__name__}; use str, number, bool, None, list or dict")


def _tool_call(call, where: str):
    """(name, arguments) of a tool call dict, checked."""
    if not isinstance(call, dict) or not call.get("tool_name"):
        raise ConfigError(f"{where} has no tool_name; write it as "
                          '{"tool_name": "...", "arguments": {...}}')
    name, args = call["tool_name"], call.get("arguments", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: arguments of {name!r} is a {type(args).__name__}; give a dict")
    need = "code" if name == "code_interpreter" else "query" if name in BUILTIN_TOOLS else None
    if need and not isinstance(args.get(need), str):
        raise ConfigError(f"{where}: built-in tool {name!r} takes one string argument, {need!r}; "
                          f'give "arguments": {{"{need}": "..."}}')
    return name, args


def _tool_call_texts(calls, tool_format: str, where: str) -> List[str]:
    """Each call as the model writes it. Several custom calls in the python_list format make one list,
    as the 3.2 models write them (Meta's encoder writes one list per call)."""
    calls = [_tool_call(c, f"{where}, tool call {i + 1}") for i, c in enumerate(calls)]
    texts = []
    for name, args in calls:
        if name == "code_interpreter":
            texts.append(args["code"])
        elif name in BUILTIN_TOOLS:
            texts.append(f'{name}.call(query="{args["query"]}")')
        elif tool_format == "json":
            texts.append(json.dumps({"type": "function", "name": name, "parameters": args}))
        elif tool_format == "function_tag":
            texts.append(f"<function={name}>{json.dumps(args)}</function>")
        else:
            texts.append(f"[{name}(" + ", ".join(f"{k}={_python_value(v)}" for k, v in args.items()) + ")]")
    if tool_format == "python_list" and len(calls) > 1 and not any(n in BUILTIN_TOOLS for n, _ in calls):
        return ["[" + ", ".join(t[1:-1] for t in texts) + "]"]
    return texts


def _python_list_calls(text: str):
    """[(name, arguments)] of a Python list of keyword-argument calls with literal values, else None."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return None
    calls = []
    for e in tree.body[0].value.elts:
        if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and not e.args):
            return None
        try:
            calls.append((e.func.id, {k.arg: ast.literal_eval(k.value) for k in e.keywords}))
        except ValueError:  # a value that is not a literal (a name, an expression)
            return None
    return calls or None


def _custom_calls(text: str):
    """[(name, arguments)] of the custom function calls in a reply, else None: a function tag anywhere,
    else the whole reply a JSON object naming a function, else the whole reply a Python list of calls."""
    m = FUNCTION_TAG.search(text)
    if m:
        try:
            return [(m.group(1), json.loads(m.group(2).replace("'", '"')))]
        except ValueError:
            return None
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if "name" in obj:  # {"type": "function", "name": ..., "parameters": {...}}
            return [(obj["name"], obj.get("parameters", {}))]
        return None
    return _python_list_calls(text)


def _parse_tool_calls(text: str, after_python_tag: bool) -> List[dict]:
    """The tool calls in a reply, read the way llama-models reads them: custom calls first, then a
    built-in `name.call(query="...")`, then, after <|python_tag|>, the whole reply as code_interpreter's code."""
    calls = _custom_calls(text)
    if calls is not None:
        for i, (name, args) in enumerate(calls):
            if name in BUILTIN_TOOLS and isinstance(args, dict) and args:  # a built-in written as a custom call
                calls[i] = (name, {"code" if name == "code_interpreter" else "query": next(iter(args.values()))})
    else:
        m = BUILTIN_CALL.search(text)
        if m:
            calls = [(m.group(1), {"query": m.group(2)})]
        elif after_python_tag:
            calls = [("code_interpreter", {"code": text})]
        else:
            calls = []
    return [{"call_id": str(uuid.uuid4()), "tool_name": n, "arguments": a} for n, a in calls]


@dataclass
class ChatFormat:
    """How an instruct model wants a dialog. style "llama3" is Meta's format as llama-models 0.3.0's
    ChatFormat writes and reads it; "chatml" is <|im_start|>role\\ncontent<|im_end|>\\n (no tool calls).
    default_system is the system message a template puts first when the dialog has none (SmolLM2's
    does). tool_format is how a custom function call is written into a prompt (TOOL_FORMATS).

    A dialog is a list of message dicts, in the shape decode_assistant returns (a reply goes back as is):
      {"role": "system", "content": str}                 llama3_system_prompt() writes the tools/date lines
      {"role": "user", "content": str, "context": str}   context optional (RAG): after a blank line
      {"role": "assistant", "content": str,              content may be absent when it only calls tools
       "tool_calls": [{"tool_name": str, "arguments": dict, "call_id": str}],          optional
       "stop_reason": "end_of_turn" | "end_of_message" | "out_of_tokens"}             optional
      {"role": "ipython" or "tool", "content": str}      a tool's answer; other keys (call_id) are ignored
    content may also be a list of str or {"type": "text", "text": str} items, each encoded on its own.
    Arguments: a built-in tool's {"query": str}, code_interpreter's {"code": str}, a custom function's
    a JSON-like dict. An assistant message's tool calls follow its content: the code after
    <|python_tag|>, `brave_search.call(query="...")`, a custom call in tool_format; it ends with
    <|eom_id|> when stop_reason is "end_of_message" (it stopped for a tool's answer), else <|eot_id|>.
    As in llama-models 0.3.0, only code_interpreter's call gets <|python_tag|>; the model writes one
    before every built-in call, and so do Meta's 3.1 prompt-format page and HF's template."""
    style: str = "llama3"
    default_system: Optional[str] = None
    tool_format: str = "json"

    @classmethod
    def from_template(cls, template: Optional[str]) -> Optional["ChatFormat"]:
        """Recognise a GGUF's (Jinja) chat template by the tokens it writes; None if neither."""
        if not template:
            return None
        if "<|start_header_id|>" in template:
            return cls("llama3")
        if "<|im_start|>" in template:
            m = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", template, flags=re.S)
            return cls("chatml", m.group(1) if m else None)
        return None

    def encode_dialog(self, tokenizer: Tokenizer, dialog: List[dict],
                      add_generation_prompt: bool = True) -> List[int]:
        """Token ids of a dialog (the message dicts above), ending with the assistant's header so the
        model writes the next turn. Special tokens come from ids, never from message text, so a
        message cannot inject one."""
        if self.default_system and (not dialog or dialog[0]["role"] != "system"):
            dialog = [{"role": "system", "content": self.default_system}] + list(dialog)
        sp = tokenizer.special_tokens

        def text(s: str) -> List[int]:
            return tokenizer.encode(s, bos=False, eos=False)

        if self.style == "chatml":
            ids = []
            for i, m in enumerate(dialog):
                if m.get("tool_calls"):
                    raise ConfigError(f"message {i + 1} has tool_calls, which the chatml format does not write; "
                                      "use a llama3 model for tool calls")
                ids += [sp["<|im_start|>"]] + text(f"{m['role']}\n{m['content']}") + [sp["<|im_end|>"]]
                ids += text("\n")
            if add_generation_prompt:
                ids += [sp["<|im_start|>"]] + text("assistant\n")
            return ids
        if self.style == "llama3":
            if self.tool_format not in TOOL_FORMATS:
                raise ConfigError(f"unknown tool_format {self.tool_format!r}; use one of {', '.join(TOOL_FORMATS)}")
            ids = [tokenizer.bos_id]
            for i, m in enumerate(dialog):
                ids += self._llama3_message(tokenizer, m, f"message {i + 1}")
            if add_generation_prompt:
                ids += self._header(tokenizer, "assistant")
            return ids
        raise ConfigError(f"unknown chat style {self.style!r}; use 'llama3' or 'chatml'")

    @staticmethod
    def _header(tokenizer: Tokenizer, role: str) -> List[int]:
        sp = tokenizer.special_tokens
        return ([sp["<|start_header_id|>"]] + tokenizer.encode(role, bos=False, eos=False)
                + [sp["<|end_header_id|>"]] + tokenizer.encode("\n\n", bos=False, eos=False))

    def _llama3_message(self, tokenizer: Tokenizer, m: dict, where: str) -> List[int]:
        sp = tokenizer.special_tokens
        if not isinstance(m, dict) or m.get("role") not in LLAMA3_ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise ConfigError(f"{where} has role {got!r}; use one of system, user, assistant, ipython (or tool)")
        role = LLAMA3_ROLES[m["role"]]
        where = f"{where} ({m['role']})"
        calls = m.get("tool_calls") or []
        if calls and role != "assistant":
            raise ConfigError(f"{where} has tool_calls; only an assistant message makes tool calls")
        stop = m.get("stop_reason")
        if stop is not None and stop not in STOP_REASONS:
            raise ConfigError(f"{where} has stop_reason {stop!r}; use one of {', '.join(STOP_REASONS)}")
        content = m.get("content")
        if content is None and role != "assistant":
            raise ConfigError(f'{where} has no content; give it "content": "..."')
        texts = self._content_texts(content or "", where)
        if role == "user" and m.get("context") is not None:  # as Meta's RawMessage.context
            texts += ["\n\n"] + self._content_texts(m["context"], where)
        texts += _tool_call_texts(calls, self.tool_format, where)
        ids = self._header(tokenizer, role)
        if calls and calls[0]["tool_name"] == "code_interpreter":
            ids.append(sp["<|python_tag|>"])
        for t in texts:  # each piece on its own, as Meta's encoder does (token boundaries between them)
            ids += tokenizer.encode(t, bos=False, eos=False)
        return ids + [sp["<|eom_id|>" if role == "assistant" and stop == "end_of_message" else "<|eot_id|>"]]

    @staticmethod
    def _content_texts(content, where: str) -> List[str]:
        if isinstance(content, str):
            return [content]
        items = content if isinstance(content, list) else [content]
        texts = []
        for item in items:
            if isinstance(item, dict) and item.get("type", "text") == "text" and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise ConfigError(f"{where}: content item {item!r:.60} is not text; this model reads "
                                  'text only: give a str or {"type": "text", "text": "..."}')
            texts.append(item)
        return texts

    def decode_assistant(self, tokenizer: Tokenizer, ids: Sequence[int]) -> dict:
        """A generated assistant message (its ids, the stop token included when it stopped on one) as
        {"role": "assistant", "content": str, "tool_calls": [{"call_id", "tool_name", "arguments"}],
         "stop_reason": str}, read as llama-models' decode_assistant_message reads it. stop_reason is
        "end_of_message" after <|eom_id|>, "end_of_turn" after another stop token, else "out_of_tokens".
        A reply that is a tool call has content "". Every call of a Python list is returned (Meta's
        keeps the first); call_id is a fresh uuid4."""
        ids = list(ids)
        stop_reason = "out_of_tokens"
        if ids and ids[-1] == tokenizer.eom_id:
            ids, stop_reason = ids[:-1], "end_of_message"
        elif ids and ids[-1] in tokenizer.stop_tokens + tokenizer.instruct_stop_tokens:
            ids, stop_reason = ids[:-1], "end_of_turn"
        if self.style != "llama3":
            return {"role": "assistant", "content": tokenizer.decode(ids), "tool_calls": [], "stop_reason": stop_reason}
        header = self._header(tokenizer, "assistant")
        if ids[:len(header)] == header:
            ids = ids[len(header):]
        tag = tokenizer.special_tokens["<|python_tag|>"]
        after_tag = tag in ids and not tokenizer.decode(ids[:ids.index(tag)]).strip(" ")
        content = tokenizer.decode(ids[ids.index(tag) + 1:] if after_tag else ids)
        # Meta strips spaces around the decoded text, stop token and <|python_tag|> included
        content = content if after_tag else content.lstrip(" ")
        content = content if stop_reason != "out_of_tokens" else content.rstrip(" ")
        calls = _parse_tool_calls(content, after_tag)
        return {"role": "assistant", "content": "" if calls else content, "tool_calls": calls,
                "stop_reason": stop_reason}
