"""
Conversations as finetuning data: finetune --train_data dialogs.jsonl (or a folder of .jsonl files),
one dialog a line, {"messages": [{"role": "system" | "user" | "assistant" | "ipython" | "tool",
"content": ...}, ...]} (the shape HF datasets, OpenAI and torchtune use).

- Each dialog is written in the checkpoint's chat format by the encoder that sampling uses
  (tokenizer.ChatFormat: Llama 3's headers, tool calls included, or a GGUF's ChatML); the loss counts
  the assistant turns' tokens and the token that ends each (<|eot_id|> / <|eom_id|>, <|im_end|>), or
  every token with train_on_input.
- Dialogs are packed whole into rows of T tokens, the rest of a row padding, each row with its own
  attention mask: a dialog never attends to another. One longer than T is cut after the last
  assistant turn that fits, or skipped when none does; the run says how many.
- The tokenized dialogs are cached next to the data (NAME.jsonl.STYLE.tokens.pt) and made again when
  the data, the tokenizer or the chat format changes.

DialogLoader hands each process its rows, as llama31's token-shard loader hands its windows, with
the same state_dict for --resume; a batch is (x, y, mask), y -100 where the loss does not count.
Imports nothing from llama31.py.
"""

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import List, Optional, Tuple

import torch

import formats
from errors import ConfigError
from tokenizer import ChatFormat, Tokenizer

ROLES = ("system", "user", "assistant", "ipython", "tool")
FORMAT = "one dialog a line, {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]}"


def is_dialogs(path) -> bool:
    """A .jsonl file, or a folder holding some: conversations rather than token shards."""
    path = Path(str(path))
    return path.suffix == ".jsonl" or (path.is_dir() and any(path.glob("*.jsonl")))


def files_of(path) -> List[Path]:
    path = Path(str(path))
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not all(f.is_file() for f in files):
        raise ConfigError(f"no dialogs at {path}: give a .jsonl file ({FORMAT}) or a folder of them")
    return files


def read_dialogs(path) -> List[Tuple[str, List[dict]]]:
    """(where, messages) of every dialog, each line checked before any is used: a malformed one is
    a ConfigError naming its file and line and what is wrong."""
    dialogs = []
    for f in files_of(path):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{f}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{where}: not JSON ({e}); {FORMAT}") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ConfigError(f"{where}: no \"messages\" list; {FORMAT}")
            for i, m in enumerate(messages, 1):
                role = m.get("role") if isinstance(m, dict) else None
                if role not in ROLES:
                    raise ConfigError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
                if m.get("content") is None and not m.get("tool_calls"):
                    raise ConfigError(f"{where}: message {i} ({role}) has no content")
            if not any(m["role"] == "assistant" for m in messages):
                raise ConfigError(f"{where}: no assistant message, so nothing to learn from it; drop the line")
            dialogs.append((where, messages))
    if not dialogs:
        raise ConfigError(f"{path} holds no dialogs; {FORMAT}")
    return dialogs


def encode(tokenizer: Tokenizer, chat: ChatFormat, messages: List[dict], train_on_input: bool = False):
    """(tokens, counted, cuts): the dialog in its chat format, whether each token is a target of the
    loss (an assistant turn's tokens and the token that ends it, or every token), and the lengths
    after each assistant turn (where a long dialog may be cut)."""
    tokens = chat.encode_dialog(tokenizer, messages, add_generation_prompt=False)
    counted, cuts, ends = [train_on_input] * len(tokens), [], set(tokenizer.instruct_stop_tokens)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(chat.encode_dialog(tokenizer, messages[:i], add_generation_prompt=True))
        upto = chat.encode_dialog(tokenizer, messages[:i + 1], add_generation_prompt=False)
        end = next((j + 1 for j in range(start, len(upto)) if upto[j] in ends), None)
        if tokens[:len(upto)] != upto or end is None:  # the format writes a dialog as its messages in turn
            raise ConfigError(f"the {chat.style} format does not write message {i + 1} as a turn of its own")
        counted[start:end] = [True] * (end - start)
        cuts.append(end)
    return tokens, counted, cuts


def cache_key(files: List[Path], tokenizer: Tokenizer, chat: ChatFormat, train_on_input: bool) -> str:
    """What the tokenized dialogs depend on: the data's bytes, the tokenizer, the chat format."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    h.update(repr((tokenizer.n_words, sorted(tokenizer.special_tokens.items()), chat, train_on_input)).encode())
    if tokenizer.path is not None:
        h.update(Path(tokenizer.path).read_bytes())
    else:  # a GGUF's vocabulary
        h.update(json.dumps(sorted((k.hex(), v) for k, v in tokenizer.vocab.mergeable_ranks.items())).encode())
    return h.hexdigest()


def tokenized(path, tokenizer: Tokenizer, chat: ChatFormat, train_on_input: bool, log=print) -> list:
    """encode() of every dialog, from the cache beside the data when it was made from the same data,
    tokenizer and chat format, else made now and cached."""
    files = files_of(path)
    key = cache_key(files, tokenizer, chat, train_on_input)
    base = Path(str(path))
    cache = base / f"dialogs.{chat.style}.tokens.pt" if base.is_dir() else base.with_name(
        f"{base.name}.{chat.style}.tokens.pt")
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                return saved["dialogs"]
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError):
            pass  # a damaged cache is made again
    encoded = []
    for where, messages in read_dialogs(path):
        try:
            encoded.append(encode(tokenizer, chat, messages, train_on_input))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    formats.atomic_write(cache, lambda tmp: torch.save({"key": key, "dialogs": encoded}, tmp), f".tmp{os.getpid()}")
    log(f"tokenized {len(encoded)} dialogs of {path} into {cache}")
    return encoded


def pack(encoded: list, T: int, pad_id: int):
    """Rows of T tokens, each holding whole dialogs and padding: (tokens, labels, segments) as
    (N, T) tensors, labels -100 where the loss does not count, segments the dialog each position
    belongs to (-1: padding); and (cut, skipped): dialogs cut to fit T, and left out."""
    rows, row, cut, skipped = [], [], 0, 0
    for seg, (tokens, counted, cuts) in enumerate(encoded):
        if len(tokens) > T:
            fit = [c for c in cuts if c <= T]
            if not fit:
                skipped += 1
                continue
            tokens, counted, cut = tokens[:fit[-1]], counted[:fit[-1]], cut + 1
        if len(row) + len(tokens) > T:
            rows.append(row)
            row = []
        row += [(t, c, seg) for t, c in zip(tokens, counted)]
    rows += [row] if row else []
    rows = [r + [(pad_id, False, -1)] * (T - len(r)) for r in rows]
    tokens = torch.tensor([[t for t, _, _ in r] for r in rows], dtype=torch.long).view(-1, T)
    counted = torch.tensor([[c for _, c, _ in r] for r in rows], dtype=torch.bool).view(-1, T)
    segments = torch.tensor([[s for _, _, s in r] for r in rows], dtype=torch.long).view(-1, T)
    labels = torch.full_like(tokens, -100)
    same = segments[:, 1:] == segments[:, :-1]  # a target is the next token of the same dialog
    labels[:, :-1] = torch.where(counted[:, 1:] & same, tokens[:, 1:], -100)
    return tokens, labels, segments, cut, skipped


def row_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask: causal, within each dialog of a row."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class DialogLoader:
    """Batches (x, y, mask) of B packed rows for rank process_rank of num_processes: each step the
    ranks take B * num_processes rows in turn, rank r the r-th B of them; after the last whole step,
    the first rows again. state_dict / load_state_dict: where the next step starts (--resume)."""

    def __init__(self, path, tokens, labels, segments, B: int, process_rank: int = 0, num_processes: int = 1):
        self.path, self.tokens, self.labels, self.segments = path, tokens, labels, segments
        self.B, self.process_rank, self.step_rows = B, process_rank, B * num_processes
        if len(tokens) < self.step_rows:
            raise ConfigError(f"{path} packs into {len(tokens)} rows of T={tokens.shape[1]} tokens, fewer than the "
                              f"{self.step_rows} one step needs (B * processes); lower B or add dialogs")
        self.ntok_total = int((segments >= 0).sum())
        self.row = 0

    def reset(self):
        self.row = 0

    def largest_token(self):
        return int(self.tokens.max()), self.path

    def next_batch(self):
        if self.row + self.step_rows > len(self.tokens):
            self.row = 0
        lo = self.row + self.process_rank * self.B
        self.row += self.step_rows
        rows = slice(lo, lo + self.B)
        return self.tokens[rows], self.labels[rows], row_mask(self.segments[rows])

    def state_dict(self) -> dict:
        return {"shard": 0, "position": self.row, "shard_file": Path(str(self.path)).name}

    def load_state_dict(self, state: dict):
        if not 0 <= int(state["position"]) <= len(self.tokens) or state.get("shard_file") != Path(str(self.path)).name:
            raise ConfigError(f"the saved data position ({state.get('shard_file')}, row {state['position']}) is "
                              f"not in {self.path}; resume with the same data")
        self.row = int(state["position"])


def loaders(train_data, val_data, B: int, T: int, rank: int, world: int, tokenizer: Tokenizer,
            chat: Optional[ChatFormat], train_on_input: bool, log=print):
    """The train and validation (None without val_data) DialogLoaders of a run, said in one line:
    dialogs, rows, the share of tokens that are targets, what was cut or skipped."""
    if chat is None:
        raise ConfigError(f"{train_data} holds dialogs, and this model has no chat format (Llama 3 headers or "
                          f"ChatML) to write them in; finetune it on token shards")
    out = []
    for path in [p for p in (train_data, val_data) if p]:
        tokens, labels, segments, cut, skipped = pack(tokenized(path, tokenizer, chat, train_on_input, log), T,
                                                      tokenizer.pad_id)
        targets = int((labels != -100).sum())
        log(f"{path}: {int(segments.max()) + 1 if len(segments) else 0} dialogs in {len(tokens)} rows of {T} "
            f"tokens, {targets} targets ({100 * targets / max(1, int((segments >= 0).sum())):.0f}% of the tokens)"
            + (f"; {cut} cut at an assistant turn, {skipped} skipped (longer than T={T})" if cut or skipped else ""))
        if len(tokens):
            out.append(DialogLoader(path, tokens, labels, segments, B, rank, world))
        else:
            raise ConfigError(f"every dialog of {path} is longer than T={T} before its first answer ends; raise T")
    return out[0], (out[1] if len(out) > 1 else None)
