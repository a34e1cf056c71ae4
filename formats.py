"""
Every file the project reads or writes, in the form Meta's download has: a params.json-shaped dict
and a state dict under Meta's names (tok_embeddings, layers.N.attention.wq, ...), with the tokenizer
and chat format. llama31.py's load_checkpoint turns what read() returns into a model
(ModelArgs.from_params is the one place a configuration becomes one); nothing here imports
llama31.py.

    Meta      params.json + consolidated.NN.pth: read_meta, save_meta, save_trained; read() for any
              layout (locate); RoPE scale factors (resolve_rope_factor); the model-parallel files
              merged (merge_shards) and every name and shape checked (check_state_dict)
    files     atomic_write, write_json: a reader (or a crash) sees the old file or the new one
    reading   read_json, torch_load, check_params, check_finite, follow_latest: a damaged file is
              one ConfigError line naming it (tests/test_fuzz.py feeds every reader damaged files)
    HF        config.json + model*.safetensors (LlamaForCausalLM): read_hf, save_hf, the q/k row
              permutation, the tokenizer files that transformers reads (save_hf_tokenizer)
    GGUF      one .gguf file (llama.cpp, ollama): read_gguf, its tensor types, its tokenizer;
              release_pages / release_view drop a memory-mapped file's pages once copied
    export    the tokenizer that goes along with converted weights (export_tokenizer)
    shards    .bin token shards (llm.c's layout): write_datafile, read_datafile_header, text_to_shards
"""

import ctypes
import glob
import importlib.metadata
import importlib.util
import json
import math
import mmap
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import gguf  # llama.cpp's own reader
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from errors import ConfigError
from tokenizer import PAT_STR, ChatFormat, Tokenizer, find_tokenizer_model


@dataclass
class Checkpoint:
    """What every reader returns: Meta's download, whatever the file was. The weights are read
    only when asked for, so a configuration error comes before any of them is."""
    params: dict  # params.json's keys; ffn_dim, tie_embeddings and rope_* where the format states them
    # () -> the state dict under Meta's names, its values memory-mapped tensors or Lazy ones (read
    # one at a time by the loader); a list of state dicts for Meta's model-parallel files
    read_state: Callable[[], Union[dict, List[dict]]]
    where: Path  # the directory or file read
    source: str  # what in it holds the params: "params.json", "config.json" or "metadata"
    tokenizer: Optional[Tokenizer] = None  # when the file carries one (GGUF)
    chat_format: Optional[ChatFormat] = None
    rope_freqs: Optional[torch.Tensor] = None  # GGUF's RoPE divisors, for the loader to check
    tensor_types: Optional[dict] = None  # GGUF: our name -> its tensor type ("Q4_1", "F32", ...)

    @property
    def params_path(self) -> Path:
        return self.where / self.source if self.where.is_dir() else self.where


class Lazy:
    """A tensor not read yet: its shape now, its values from read() (fp32 or the file's dtype)
    or, for a GGUF tensor on the int4 grid, from read_int4() without going through full precision."""

    def __init__(self, shape, read: Callable[[], torch.Tensor], read_int4: Optional[Callable] = None,
                 read_rows: Optional[Callable[[int, int], torch.Tensor]] = None):
        self.shape, self.read, self.read_int4 = torch.Size(shape), read, read_int4
        if read_rows is not None:  # rows lo..hi alone
            self.read_rows = read_rows


def materialize(value) -> torch.Tensor:
    return value.read() if isinstance(value, Lazy) else value


def locate(path) -> Tuple[Path, str]:
    """The checkpoint a --ckpt_dir path names, and which reader it needs: 'meta' or 'hf' (a
    directory) or 'gguf' (a file). The `latest` pointer a finetune writes is followed to the
    checkpoint it names; any other file that is not GGUF is a one-line error saying what it is."""
    path = Path(path)
    if path.is_dir():  # exists(), not is_file(): a damaged layout is then named by its reader
        if (path / "model.gguf").exists() and not (path / "params.json").exists():
            return path / "model.gguf", "gguf"  # a finetune's checkpoint of a model that came from GGUF
        return path, "hf" if (path / "config.json").exists() and not (path / "params.json").exists() else "meta"
    if path.suffix == ".gguf":
        return path, "gguf"
    if not path.is_file():
        raise ConfigError(f"checkpoint directory {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"GGUF":
        return path, "gguf"
    if path.name == "latest":
        return locate(follow_latest(path))
    raise ConfigError(f"{path} is a file but neither a GGUF file nor a finetune's `latest` pointer; --ckpt_dir takes "
                      f"a checkpoint directory (Meta's or HF's layout), a .gguf file or out/latest")


# -----------------------------------------------------------------------------
# Meta's layout (params.json + consolidated.NN.pth), and reading any layout


def read_params(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "params.json"
    if not path.exists():
        raise ConfigError(f"{path} not found; a Meta checkpoint directory holds params.json "
                          f"next to consolidated.00.pth")
    params = read_json(path)
    check_params(params, path)
    return params


def read_meta(ckpt_dir: Path) -> Checkpoint:
    """params.json, and the state dict(s) of a Meta-layout checkpoint memory-mapped when asked for
    (a list of them for model-parallel files); assemble converts the tensors one at a time."""
    params = read_params(ckpt_dir)
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise ConfigError(f"no *.pth file in {ckpt_dir}; expected Meta's consolidated.00.pth")

    def read_state():
        states = [torch_load(shard) for shard in shards]
        for shard, state in zip(shards, states):  # a state dict of float tensors, not some other file
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.is_floating_point()
                                                      for v in state.values()):
                raise ConfigError(f"{shard} is not a state dict of float tensors; re-download or re-export it")
        return states[0] if len(states) == 1 else states

    return Checkpoint(params, read_state, ckpt_dir, "params.json")


def load_tokenizer(path, tokenizer_path=None) -> Tokenizer:
    """A checkpoint's tokenizer: a GGUF file's own vocabulary; else tokenizer_path, else the
    directory's tokenizer.model, else the official one from llama-models."""
    path, kind = locate(path)
    if kind == "gguf":
        if tokenizer_path is not None:
            raise ConfigError("a GGUF file carries its own tokenizer; drop --tokenizer_path")
        return Tokenizer.from_gguf(open_gguf(path)[1], path.name)
    return Tokenizer(find_tokenizer_model(tokenizer_path, path))


# RoPE scaling factors of published models whose Meta params.json doesn't say: Llama 3.2 1B and
# 3B were trained with 32 (Meta's llama-models reference hard-codes Llama 3.1's 8 for them).
KNOWN_ROPE_FACTORS = {(2048, 16): 32.0, (3072, 28): 32.0}


def resolve_rope_factor(declared: Optional[float], override: Optional[float], dim: int, n_layers: int,
                        where, scaled: bool = True, source: str = "params.json") -> Optional[float]:
    """The RoPE scale factor of a model: the one its file declares, else a user's override, else
    a published model's (KNOWN_ROPE_FACTORS), else Llama 3.1's 8; None for a model not scaled."""
    if not scaled and override is not None:
        how = "does not use scaled RoPE (use_scaled_rope false)" if source == "params.json" else "uses no RoPE scaling"
        raise ConfigError(f"rope_scale_factor={override} given, but {where} {how}; drop the override")
    if not scaled:
        return None
    if override is not None and declared is not None and float(override) != float(declared):
        raise ConfigError(f"{where} sets RoPE scale factor {declared} but rope_scale_factor={override} was "
                          f"asked for; drop the override or fix {Path(where).name}")
    if override is not None:
        return float(override)
    if declared is not None:
        return float(declared)
    return KNOWN_ROPE_FACTORS.get((dim, n_layers), 8.0)


def save_meta(state: dict, params: dict, ckpt_dir, dtype=torch.bfloat16):
    """params.json + consolidated.00.pth as Meta ships them, each written whole or not at all."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype) for k, v in state.items()}
    atomic_write(ckpt_dir / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
    write_json(ckpt_dir / "params.json", params)


def save_trained(state: dict, params: dict, out_dir: Path, tokenizer_path: Optional[Path], source: Path,
                 rope_divisors=None):
    """A finetuned model's weights in fp32 where a resumed run reads them: Meta's layout with the
    run's tokenizer.model beside it (reference.py loads it too), or, for a model that came from a
    GGUF file (no tokenizer.model), one GGUF file with that file's tokenizer and chat template."""
    if tokenizer_path is not None:
        save_meta(state, params, out_dir, torch.float32)
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    else:
        save_gguf({k: v.detach().float().cpu() for k, v in state.items()}, params, out_dir / "model.gguf",
                  gguf_fields(locate(source)[0]), "f32", rope_divisors)


def read(path, tokenizer_path=None, tokenizer: bool = True, vocab_size: Optional[int] = None) -> Checkpoint:
    """The checkpoint a --ckpt_dir names (locate), read by its layout's reader into Meta's form, its
    weights not read yet, with its tokenizer (a GGUF file's own; else tokenizer_path, the
    directory's tokenizer.model, or Llama 3's from llama-models; tokenizer=False: none) and chat
    format (a GGUF's template, else Llama 3's). The tokenizer's size (or vocab_size, without one)
    must be the model's: a params.json of -1 takes it."""
    path, kind = locate(path)
    if kind == "gguf" and tokenizer_path is not None:
        raise ConfigError("a GGUF file carries its own tokenizer; drop --tokenizer_path")
    tok = load_tokenizer(path, tokenizer_path) if tokenizer and kind != "gguf" else None
    ckpt = {"meta": read_meta, "hf": read_hf, "gguf": read_gguf}[kind](path)
    if kind == "gguf":  # a GGUF's embeddings may outnumber its tokens (read_gguf checks)
        return ckpt
    vocab_size = tok.n_words if tok is not None else vocab_size
    if vocab_size is not None and ckpt.params.get("vocab_size", -1) <= 0:  # old params.json files say -1
        ckpt.params["vocab_size"] = vocab_size
    if vocab_size is not None and ckpt.params["vocab_size"] != vocab_size:
        raise ConfigError(f"{ckpt.params_path} says vocab_size {ckpt.params['vocab_size']} but the tokenizer has "
                          f"{vocab_size} tokens{f' ({tok.path})' if tok is not None else ''}; use the "
                          f"tokenizer that came with the checkpoint")
    ckpt.tokenizer, ckpt.chat_format = tok, ChatFormat("llama3")
    return ckpt



# -----------------------------------------------------------------------------
# files: written whole or not at all


def atomic_write(path: Path, write, tmp_suffix: str = ".tmp"):
    """write(tmp) to a temporary name next to path, flush it to disk, then rename it over path:
    a reader (or a crash) sees the old file or the new one, never half of one. A failed write
    leaves nothing behind. Processes that may write one file at once each need their own
    tmp_suffix."""
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, content):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))


# -----------------------------------------------------------------------------
# reading: a damaged file is one ConfigError line that names it and says what to do, never a
# traceback; counts, sizes, kinds and float values are checked where that is cheap

DAMAGED = "it is damaged (truncated or overwritten)"


def reason(e: BaseException) -> str:
    """The first line of an exception's message, for a one-line error."""
    lines = str(e).strip().splitlines()
    return printable(lines[0], 200) if lines else type(e).__name__


def printable(text: str, most: int = 60) -> str:
    """Text from a damaged file, fit for a one-line message."""
    return "".join(c if c.isprintable() else "?" for c in text[:most]) + ("..." if len(text) > most else "")


def check_key_names(keys, known, where):
    """A key one or two characters away from a key this reader reads is that key damaged (a
    flipped byte), not another program's: left unread, it would silently leave a default."""
    for key in keys:
        near = [k for k in known if key not in known and isinstance(key, str) and len(key) == len(k) >= 6
                and sum(a != b for a, b in zip(key, k)) <= 2]
        if near:
            raise ConfigError(f"{where}: key {printable(key)!r} looks like {near[0]!r} damaged; re-download or "
                              f"re-export it")


def read_json(path: Path, what: str = "; re-download or re-export it") -> dict:
    """A JSON object from a file; not a file, not UTF-8, not JSON or not an object is an error."""
    try:
        content = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
        raise ConfigError(f"{path} is not valid JSON ({reason(e)}){what}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path} holds a JSON {type(content).__name__}, not an object{what}")
    return content


def torch_load(path: Path, what: str = "re-download or re-export it"):
    """torch.load as every reader here does it: weights only (a pickle that would run code is
    refused), memory-mapped, and the pickle's CRC checked first, so that damage to the structure
    (not to raw tensor bytes, which would take a read of the whole file) is an error."""
    try:
        with zipfile.ZipFile(path) as z:  # reading a member checks its CRC-32
            z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated, overwritten, not a zip, not torch's, code in the pickle
        raise ConfigError(f"could not read {path} as a torch checkpoint ({reason(e)}); {DAMAGED} or not "
                          f"one: {what}") from None


def load_saved(path: Path, holds: str, fits, what: str) -> dict:
    """A file finetune wrote (train_state.pt, adapters.pt): torch_load, then fits(saved) (which
    may raise on a missing or odd field) says whether it holds the fields `holds` names."""
    saved = torch_load(path, what)
    try:
        ok = fits(saved)
    except (KeyError, TypeError, AttributeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{path} does not hold what finetune saves ({holds}); {what}")
    return saved


def check_finite(tensors, where):
    """Every float tensor in a (nested) dict or list holds finite values: a sum is one cheap pass,
    and NaN or infinity anywhere makes it non-finite."""
    if isinstance(tensors, dict):
        tensors = tensors.values()
    for t in tensors:
        if isinstance(t, (dict, list, tuple)):
            check_finite(t, where)
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and not finite_sum(t):
            raise ConfigError(f"{where} holds NaN or infinite values; {DAMAGED}: re-download or re-create it")


def finite_sum(t: torch.Tensor) -> bool:
    """Whether the sum of t is finite. bf16 and fp32 tensors are summed in their own dtype (fp32's
    range, accumulated in fp32): sum(dtype=float32) of a bf16 tensor first makes an fp32 copy of it,
    a transient of twice its size on top of the weights. fp16's range is too narrow for a sum, so
    an fp16 tensor is summed in fp32."""
    return bool((t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()).isfinite())


def follow_latest(pointer: Path) -> Path:
    """The step_NNNNNN directory beside it that a finetune's `latest` pointer names."""
    try:
        step = pointer.read_bytes()[:64].decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        step = None
    if step and re.fullmatch(r"step_\d+", step) and (pointer.parent / step).is_dir():
        return pointer.parent / step
    raise ConfigError(f"{pointer} does not name a step_NNNNNN directory beside it; {DAMAGED}: write the newest "
                      f"complete step's name into it (echo step_NNNNNN > {pointer}) or use that directory's path")


# params.json's keys: kind, and the most any Llama-shaped model could have (a bound on what a
# damaged file can make the loader allocate); n_kv_heads, ffn_dim and ffn_dim_multiplier may be null
PARAM_BOUNDS = {"dim": (int, 2**17), "n_layers": (int, 2**12), "n_heads": (int, 2**12), "n_kv_heads": (int, 2**12),
                "vocab_size": (int, 2**24), "multiple_of": (int, 2**20), "ffn_dim": (int, 2**20),
                "ffn_dim_multiplier": (float, 64), "norm_eps": (float, 1), "rope_theta": (float, 1e12),
                "rope_scale_factor": (float, 2**10), "rope_low_freq_factor": (float, 2**10),
                "rope_high_freq_factor": (float, 2**10), "rope_original_max_len": (int, 2**24)}
MAX_HEAD_DIM = 2**10


def check_params(params: dict, where, names: Optional[dict] = None):
    """Every hyper-parameter of its kind and in range, and dim / n_heads / n_kv_heads dividing, so
    that a damaged file is named here rather than failing somewhere in the model. names: the
    file's own name for each key, for the message."""
    def bad(key, value, why):
        raise ConfigError(f"{where}: {(names or {}).get(key, key)} is {value!r}, {why}; {DAMAGED} or not a "
                          f"Llama model's: re-download or re-export it")

    for key, (kind, most) in PARAM_BOUNDS.items():
        value = params.get(key)
        if key not in params or (value is None and key in ("n_kv_heads", "ffn_dim", "ffn_dim_multiplier")):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            bad(key, value, f"not {'a number' if kind is float else 'an integer'}")
        if not (0 < value <= most or (key == "vocab_size" and value == -1)):  # old params.json: -1
            bad(key, value, f"outside (0, {most}]")
    check_key_names(params, [*PARAM_BOUNDS, "use_scaled_rope", "tie_embeddings"], where)
    for key in ("use_scaled_rope", "tie_embeddings"):
        if key in params and not isinstance(params[key], bool):
            bad(key, params[key], "not true or false")
    dim, heads = params.get("dim", 4096), params.get("n_heads", 32)
    kv = params.get("n_kv_heads") or heads
    if dim % heads or heads % kv or dim // heads > MAX_HEAD_DIM:
        bad("dim", dim, f"not n_heads {heads} heads of at most {MAX_HEAD_DIM} (n_heads a multiple of n_kv_heads {kv})")


# -----------------------------------------------------------------------------
# HF transformers' layout: config.json + model.safetensors (LlamaForCausalLM)

# our name -> HF's; per-layer names are relative to layers.N. / model.layers.N.
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_MAX_POSITION_EMBEDDINGS = 131072  # what Meta's HF configs declare for the 128k-context models


def hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, n, rest = name.split(".", 2)  # layers.N.rest
    return f"model.layers.{n}.{HF_LAYER_NAMES[rest]}"


def hf_names(n_layers: int) -> dict:
    """HF name -> our name, for every tensor of a model with n_layers blocks."""
    ours = {f"layers.{i}.{k}" for i in range(n_layers) for k in HF_LAYER_NAMES} | HF_NAMES.keys()
    return {hf_name(k): k for k in ours}


def permute_qk(w, n_heads: int, to_hf: bool = True):
    """Reorder the output rows of wq or wk between Meta's RoPE layout and HF's. Meta rotates
    consecutive pairs (2i, 2i+1) of each head; HF rotates (i, i + head_dim/2). Moving row 2i+s to
    s*head_dim/2 + i gives HF's rotation the same pairs, so q.k, and everything after it, is
    unchanged; to_hf=False is the inverse."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    shape = (n_heads, half, 2, in_dim) if to_hf else (n_heads, 2, half, in_dim)
    return w.reshape(shape).transpose(1, 2).reshape(out_dim, in_dim)


def hf_tensor(name: str, w, params: dict, to_hf: bool):
    """One tensor (our name) into HF's row order or back: wq and wk permuted, the rest as they are."""
    if name.endswith("attention.wq.weight"):
        return permute_qk(w, params["n_heads"], to_hf)
    if name.endswith("attention.wk.weight"):
        return permute_qk(w, params.get("n_kv_heads") or params["n_heads"], to_hf)
    return w


def check_hf_names(keys, params: dict, where) -> dict:
    """HF name -> ours for a model of this shape; every name it does not have, in one message.
    Old checkpoints carry the RoPE table (rotary_emb.inv_freq); it is recomputed, not loaded."""
    names = hf_names(params["n_layers"])
    unknown = sorted(k for k in keys if k not in names and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ConfigError(f"{where} holds {len(unknown)} tensor(s) a LlamaForCausalLM with {params['n_layers']} "
                          f"layers does not have, e.g. {', '.join(unknown[:3])}")
    return names


def to_hf_state_dict(state: dict, params: dict) -> dict:
    """Our state dict (Meta's names) -> LlamaForCausalLM's names, q/k rows permuted."""
    return {hf_name(k): hf_tensor(k, v, params, to_hf=True) for k, v in state.items()}


def from_hf_state_dict(state: dict, params: dict) -> dict:
    """LlamaForCausalLM's state dict -> ours."""
    names = check_hf_names(state, params, "the HF state dict")
    return {names[k]: hf_tensor(names[k], v, params, to_hf=False) for k, v in state.items() if k in names}


# params.json's keys -> config.json's, for messages
HF_PARAM_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "ffn_dim": "intermediate_size",
                  "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}
HF_OTHER_KEYS = ("rope_scaling", "rope_parameters", "tie_word_embeddings", "head_dim", "architectures", "model_type")
HF_ROPE_KEYS = ("rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings", "rope_theta")


def params_from_hf_config(config: dict, where) -> dict:
    """params.json's keys from a LlamaForCausalLM config.json (transformers 4.x `rope_scaling` +
    `rope_theta`, or 5.x `rope_parameters`)."""
    check_key_names(config, [*HF_PARAM_NAMES.values(), *HF_OTHER_KEYS], where)
    arch = config.get("architectures") or [config.get("model_type")]
    if config.get("model_type") != "llama" or not isinstance(arch, list) or arch[0] != "LlamaForCausalLM":
        raise ConfigError(f"{where} describes a {arch[0] if isinstance(arch, list) else arch} "
                          f"({config.get('model_type')}) model; this loader reads Llama-architecture checkpoints "
                          f"(LlamaForCausalLM)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_scaling is {rope!r}, not an object; re-download or re-export it")
    check_key_names(rope, HF_ROPE_KEYS, where)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{where} uses RoPE scaling {rope_type!r}; only Llama 3's ('llama3') is supported")
    missing = [theirs for ours, theirs in HF_PARAM_NAMES.items() if ours in ("dim", "n_layers", "n_heads",
                                                                              "vocab_size", "ffn_dim")
               and theirs not in config]
    if missing:
        raise ConfigError(f"{where} has no {', '.join(missing)}; re-download or re-export it")
    params = {ours: config[theirs] for ours, theirs in HF_PARAM_NAMES.items() if theirs in config}
    params = dict(params, n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                  norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", rope.get("rope_theta",
                                                                                                     10000.0)),
                  use_scaled_rope=rope_type == "llama3", tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    for ours, theirs in [("rope_scale_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                         ("rope_high_freq_factor", "high_freq_factor"),
                         ("rope_original_max_len", "original_max_position_embeddings")]:
        if rope_type == "llama3" and theirs in rope:
            params[ours] = rope[theirs]
    check_params(params, where, HF_PARAM_NAMES)
    dim, n_heads = params["dim"], params["n_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ConfigError(f"{where} has head_dim {config['head_dim']}, not hidden_size / num_attention_heads "
                          f"= {dim // n_heads}; such models are not supported")
    return params


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors checks its header: offsets, sizes, shapes against the file
        raise ConfigError(f"could not read {path} as safetensors ({reason(e)}); {DAMAGED} or not one: "
                          f"re-download or re-export it") from None


def hf_shard_files(ckpt_dir: Path) -> List[str]:
    """The safetensors files of an HF checkpoint, from its index if it has one."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        names = list(weight_map.values()) if isinstance(weight_map, dict) else None
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise ConfigError(f"{index} has no weight_map of tensor -> file name; re-download or re-export it")
        files = sorted(set(names))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise ConfigError(f"{index.name} names {', '.join(missing)}, missing from {ckpt_dir}; "
                              f"download every shard")
        return files
    if (ckpt_dir / "model.safetensors").exists():
        return ["model.safetensors"]
    raise ConfigError(f"{ckpt_dir} has config.json but no model.safetensors(.index.json); "
                      f"save the model with safetensors (HF's default)")


def read_hf(ckpt_dir: Path) -> Checkpoint:
    """An HF-layout checkpoint, its tensors read lazily with safetensors: one file open at a time,
    each tensor converted to our layout, device and dtype as it is read."""
    where = ckpt_dir / "config.json"
    params = params_from_hf_config(read_json(where), where)
    state = {}
    for file in hf_shard_files(ckpt_dir):  # the headers only: every name and shape known before any tensor is read
        with open_safetensors(ckpt_dir / file) as f:
            names = check_hf_names(f.keys(), params, ckpt_dir / file)
            for key in f.keys():
                if key in names:
                    if f.get_slice(key).get_dtype() not in ("F32", "F16", "BF16"):
                        raise ConfigError(f"{ckpt_dir / file}: {key} is {f.get_slice(key).get_dtype()}, not a float "
                                          f"type; {DAMAGED} or not a model's weights: re-download or re-export it")
                    qk = names[key].endswith(("attention.wq.weight", "attention.wk.weight"))  # rows permuted per head
                    state[names[key]] = Lazy(f.get_slice(key).get_shape(), hf_reader(ckpt_dir / file, key,
                                                                                       names[key], params),
                                             read_rows=None if qk else hf_rows(ckpt_dir / file, key))
    return Checkpoint(params, lambda: state, ckpt_dir, "config.json")


def hf_reader(path: Path, key: str, name: str, params: dict):
    def read():
        with open_safetensors(path) as f:
            return hf_tensor(name, f.get_tensor(key), params, to_hf=False)
    return read


def hf_rows(path: Path, key: str):
    def read_rows(lo: int, hi: int):
        with open_safetensors(path) as f:
            return f.get_slice(key)[lo:hi]
    return read_rows


def hf_max_positions(params: dict) -> int:
    return HF_MAX_POSITION_EMBEDDINGS if params.get("use_scaled_rope") else params.get("rope_original_max_len", 8192)


def hf_config(params: dict, intermediate_size: int, dtype=torch.bfloat16, bos_token_id: int = 128000,
              eos_token_id=128001) -> dict:
    """config.json for LlamaForCausalLM, in the form Meta's Llama 3.1 repos on the HF Hub use
    (rope_theta and rope_scaling at the top level, which transformers 4.x and 5.x both read).
    An instruct model ends its turns with <|eot_id|>, so pass eos_token_id=[128001, 128008,
    128009] for those."""
    rope_scaling = None
    if params.get("use_scaled_rope"):
        rope_scaling = {"rope_type": "llama3", "factor": params.get("rope_scale_factor", 8.0),
                        "low_freq_factor": params.get("rope_low_freq_factor", 1.0),
                        "high_freq_factor": params.get("rope_high_freq_factor", 4.0),
                        "original_max_position_embeddings": params.get("rope_original_max_len", 8192)}
    n_heads = params["n_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": params["vocab_size"],
        "hidden_size": params["dim"],
        "intermediate_size": intermediate_size,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": params["dim"] // n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": hf_max_positions(params),
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 500000.0),
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(params.get("tie_embeddings", False)),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def save_hf(state: dict, params: dict, out_dir, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 2**30,
            **config_overrides):
    """Write config.json + safetensors that transformers' LlamaForCausalLM.from_pretrained (and
    vLLM) read, from a state dict under Meta's names and its params: model.safetensors, or
    model-0000i-of-0000n.safetensors + an index past max_shard_bytes. config_overrides go into
    config.json (e.g. eos_token_id for an instruct model). Tied embeddings are written once, as
    HF expects."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    intermediate_size = state["layers.0.feed_forward.w1.weight"].shape[0]
    state = {k: v.detach().to("cpu", dtype) for k, v in state.items()
             if not (k == "output.weight" and params.get("tie_embeddings"))}
    # safetensors writes only contiguous tensors
    state = {k: v.contiguous() for k, v in to_hf_state_dict(state, params).items()}
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):  # transformers wants metadata format "pt"
        atomic_write(out_dir / name, lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
    write_json(out_dir / "config.json", {**hf_config(params, intermediate_size, dtype), **config_overrides})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})


# Llama 3's dialog format as a Jinja chat template: the tokens ChatFormat("llama3") writes, except
# that HF tokenizes header and content as one text (content starting with a newline can merge with
# the header's "\n\n") and turns special-token text inside content into special tokens
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>"
    "{{ 'ipython' if m['role'] == 'tool' else m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                      "chat_template.jinja", "chat_template.json")


def save_hf_tokenizer(tokenizer_path: Path, out_dir, max_seq_len: int = HF_MAX_POSITION_EMBEDDINGS) -> List[str]:
    """Beside an HF checkpoint: generation_config.json (stop at every Llama 3 stop token, as
    Llama.generate does) and, when transformers is installed, tokenizer.json + tokenizer_config.json
    converted from Meta's tokenizer.model by transformers' own tiktoken converter, so AutoTokenizer
    loads it (BOS added, Llama 3's chat template). Returns the names of the files written."""
    out_dir, tok = Path(out_dir), Tokenizer(tokenizer_path)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_tokens, "do_sample": True,
                  "temperature": 0.6, "top_p": 0.9}
    files = {"generation_config.json": generation}
    try:  # transformers is optional and slow to import: only here, where it converts the tokenizer
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        print("note: transformers is not installed, so no tokenizer.json was written; "
              "pip install transformers, or use the tokenizer.model beside the weights", file=sys.stderr)
    else:
        names = sorted(tok.special_tokens, key=tok.special_tokens.get)
        hf_tok = TikTokenConverter(vocab_file=str(tokenizer_path), pattern=PAT_STR,
                                   extra_special_tokens=names).converted()
        hf_tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
        atomic_write(out_dir / "tokenizer.json", lambda tmp: hf_tok.save(str(tmp)))
        files["tokenizer_config.json"] = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "model_max_length": max_seq_len, "chat_template": LLAMA3_CHAT_TEMPLATE,
            # keep decode exact: no space clean-up, which tiktoken does not do
            "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}
    for name, content in files.items():
        write_json(out_dir / name, content)
    return list(files) + ["tokenizer.json"] * ("tokenizer_config.json" in files)


# -----------------------------------------------------------------------------
# GGUF files (llama.cpp, ollama): hyper-parameters and tokenizer from metadata, tensors dequantized

# llama.cpp tensor names -> ours. llama.cpp's converter stores q/k rows in Meta's interleaved RoPE
# order (it undoes HF's permutation), so no tensor needs reordering here.
GGUF_TENSOR_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}


def gguf_tensor_name(name: str) -> str:
    """Our parameter name for a llama.cpp tensor name; unknown names come back unchanged."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", name)
    if m is None or m.group(2) not in GGUF_TENSOR_NAMES:
        return name
    ours = GGUF_TENSOR_NAMES[m.group(2)] + ".weight"
    return f"layers.{m.group(1)}.{ours}" if m.group(1) is not None else ours


def open_gguf(path):
    """The gguf package's reader (tensors stay memory-mapped) and the metadata as plain values."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"GGUF file {path} does not exist")
    check_gguf_layout(path)
    try:
        reader = gguf.GGUFReader(path)
        return reader, {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # a name or string that is not UTF-8, a bad type, tensor data past the end
        raise ConfigError(f"could not read {path} as GGUF ({reason(e)}); {DAMAGED} or newer than gguf "
                          f"{importlib.metadata.version('gguf')} reads: re-download or re-export it") from None


# GGUF metadata value types (gguf.GGUFValueType) -> bytes, for the fixed-size ones; then strings and arrays
GGUF_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
GGML_MAX_DIMS = 4
# gguf's reader makes a few numpy arrays per array item, so an item costs it ~1 us and ~300 bytes;
# vocabularies and merge lists run to a few hundred thousand
GGUF_MAX_ITEMS = 2**22


def check_gguf_layout(path: Path):
    """Walk a GGUF file's header as gguf.GGUFReader will, every count and length checked against
    the bytes left and every tensor's data against the end of the file: a damaged or hostile
    header (an array of 2**60 items, a string or a tensor longer than the file) is an error here,
    before the reader loops over it or maps it."""
    def fail(why):
        return ConfigError(f"could not read {path} as GGUF ({why}); {DAMAGED} or not GGUF: re-download or "
                           f"re-export it")

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24 or f.read(4) != b"GGUF":
                raise fail("no GGUF magic and header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                walk_gguf_header(data, fail)
    except OSError as e:  # a directory, unreadable
        raise fail(reason(e)) from None


def walk_gguf_header(data, fail):
    byteorder = "little" if int.from_bytes(data[4:8], "little") & 0xFFFF else "big"  # big-endian files exist
    pos = 4

    def room(count, size, what):  # count items of at least size bytes must fit in what is left
        if count > (len(data) - pos) // size:
            raise fail(f"{what} at byte {pos}: {count} of them, more than the rest of the file holds")

    def skip(size, count=1, what="a value"):
        nonlocal pos
        room(count, size, what)
        pos += size * count

    def take(size, count=1, what="a value"):
        skip(size, count, what)
        return data[pos - size * count:pos]

    def uint(size):
        return int.from_bytes(take(size), byteorder)

    def string():
        return bytes(take(1, uint(8), "a string's bytes"))

    def value(kind, key):
        if kind in GGUF_VALUE_BYTES:
            return uint(GGUF_VALUE_BYTES[kind])
        if kind == GGUF_STRING:
            return string()
        item, n = (uint(4), uint(8)) if kind == GGUF_ARRAY else (None, 0)
        if n > GGUF_MAX_ITEMS:
            raise fail(f"{key} declares {n} items, more than any model's metadata ({GGUF_MAX_ITEMS})")
        if item in GGUF_VALUE_BYTES:
            return skip(GGUF_VALUE_BYTES[item], n, f"{key} items")
        if item == GGUF_STRING:
            room(n, 8, f"{key} strings")  # a length each, at least
            for _ in range(n):
                string()
            return None
        raise fail(f"{key} has value type {kind}{'' if item is None else f' of {item}'}, which this reader does "
                   f"not read")

    version = uint(4)
    if version not in (2, 3):
        raise fail(f"format version {version}; this reader reads 2 and 3")
    n_tensors, n_kv = uint(8), uint(8)
    room(n_kv, 12, "metadata keys")  # a key length and a type each, at least
    alignment = 32
    for _ in range(n_kv):
        key = printable(string().decode(errors="replace"))
        kind = uint(4)
        got = value(kind, key)
        if key == "general.alignment" and kind == GGUF_UINT32 and got and not got & (got - 1):
            alignment = got
    room(n_tensors, 24, "tensors")  # a name length, a dimension count, a type and an offset each, at least
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = printable(string().decode(errors="replace")), uint(4)
        if n_dims > GGML_MAX_DIMS:
            raise fail(f"tensor {name} has {n_dims} dimensions")
        dims = [uint(8) for _ in range(n_dims)]
        tensors.append((name, dims, uint(4), uint(8)))
    start = -(-pos // alignment) * alignment
    types = {t.value: t for t in gguf.GGMLQuantizationType}
    for name, dims, kind, offset in tensors:
        if kind not in types or types[kind] not in gguf.GGML_QUANT_SIZES:
            raise fail(f"tensor {name} has type {kind}, unknown to gguf {importlib.metadata.version('gguf')}")
        block, size = gguf.GGML_QUANT_SIZES[types[kind]]
        if start + offset + math.prod(dims) // block * size > len(data):
            raise fail(f"tensor {name} {dims} runs past the end of the file")


def gguf_dequantize(tensor, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
    """One tensor (or its rows lo..hi) as fp32, shaped as torch expects (GGUF lists dimensions
    innermost first; a matrix's data holds one row of blocks per output row)."""
    shape = tuple(reversed(tensor.shape.tolist()))
    data = tensor.data if hi is None else tensor.data[lo:hi]
    arr = gguf.quants.dequantize(data, tensor.tensor_type)
    if not arr.flags.writeable:  # F32 comes back as a view of the read-only memory map
        arr = arr.copy()
    return torch.from_numpy(arr.reshape(shape if hi is None else (-1, *shape[1:])))


def check_gguf_tensor_types(reader, path):
    """Name every tensor type the installed gguf package cannot dequantize, before loading any."""
    bad = []
    for qtype in sorted({t.tensor_type for t in reader.tensors}):
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # probe with one zero block: the package says NotImplementedError for unknown types
            gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
        except NotImplementedError:
            bad.append(qtype.name)
    if bad:
        names = sorted(t.name for t in reader.tensors if t.tensor_type.name in bad)
        raise ConfigError(f"{path}: tensor type {', '.join(bad)} (in {names[0]}"
                          f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}) cannot be dequantized "
                          f"by gguf {importlib.metadata.version('gguf')}; use a file quantized as F32, F16, BF16, "
                          f"Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant")


# params.json's keys -> the GGUF metadata's, for messages
GGUF_PARAM_NAMES = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
                    "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
                    "vocab_size": "llama.vocab_size", "ffn_dim": "llama.feed_forward_length",
                    "norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base"}


# every metadata key read here, or written by llama.cpp's converter beside them
GGUF_KEYS_READ = [*GGUF_PARAM_NAMES.values(), "llama.rope.dimension_count", "llama.attention.key_length",
                  "llama.attention.value_length", "llama.expert_count", "llama.rope.scaling.type",
                  "llama.context_length",
                  "general.architecture", "general.alignment", "tokenizer.chat_template",
                  *(f"tokenizer.ggml.{k}" for k in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id",
                                                    "eos_token_id", "padding_token_id", "unknown_token_id",
                                                    "eot_token_id", "eom_token_id", "add_bos_token", "add_eos_token",
                                                    "add_space_prefix", "scores"))]


def params_from_gguf(meta: dict, path, tie_embeddings: bool, rope_freqs=None) -> dict:
    """params.json's keys from the llama.* metadata. rope_freqs is the file's rope_freqs tensor,
    which llama.cpp writes for Llama 3.1/3.2's RoPE scaling (per-frequency divisors: the largest is
    the scale factor); the loader checks the rest against its rule."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path} is a {arch!r} model; only the 'llama' architecture (Llama 3.x, "
                          f"SmolLM2, ...) is supported")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ConfigError(f"{path} has no llama.{key} in its metadata")
        return value

    if get("expert_count", 0):
        raise ConfigError(f"{path} is a mixture-of-experts model ({get('expert_count')} experts); "
                          f"only dense Llama models are supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "llama3"):
        raise ConfigError(f"{path} uses RoPE scaling {scaling!r}; only Llama 3.1's rule is supported")
    params = dict(dim=get("embedding_length"), n_layers=get("block_count"), n_heads=get("attention.head_count"),
                  vocab_size=get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None),
                  ffn_dim=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon"),
                  rope_theta=get("rope.freq_base", 10000.0), use_scaled_rope=rope_freqs is not None,
                  tie_embeddings=tie_embeddings)
    params["n_kv_heads"] = get("attention.head_count_kv", params["n_heads"])
    check_params(params, path, GGUF_PARAM_NAMES)
    head_dim = params["dim"] // params["n_heads"]
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", head_dim) != head_dim:
            raise ConfigError(f"{path}: llama.{key} is {meta[f'llama.{key}']}, but this model needs "
                              f"dim / n_heads = {head_dim}")
    if rope_freqs is not None:
        if rope_freqs.shape != (head_dim // 2,) or not (rope_freqs >= 1).all():  # NaN fails too
            raise ConfigError(f"{path}: rope_freqs is not {head_dim // 2} divisors of at least 1; {DAMAGED}: "
                              f"re-download or re-export it")
        params["rope_scale_factor"] = round(float(rope_freqs.max()))
    return params


def read_gguf(path) -> Checkpoint:
    """A llama-architecture GGUF file with its tokenizer and chat format. Tensors are dequantized
    and converted one at a time, so memory holds the model plus one fp32 tensor."""
    path = Path(path)
    reader, meta = open_gguf(path)
    check_key_names(meta, GGUF_KEYS_READ, path)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = gguf_dequantize(tensors.pop("rope_freqs.weight")) if "rope_freqs.weight" in tensors else None
    # as in llama.cpp, a file without an output tensor uses the token embeddings for it
    params = params_from_gguf(meta, path, "output.weight" not in tensors, rope_freqs)
    tokenizer = Tokenizer.from_gguf(meta, path.name)
    if tokenizer.n_words > params["vocab_size"]:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.n_words} tokens but the model only "
                          f"{params['vocab_size']} embeddings")
    check_gguf_tensor_types(reader, path)

    def released(read, t):  # once a tensor's bytes are read, its pages of the file leave the RSS
        def read_and_release(*args):
            out = read(t, *args)
            release_pages(reader, t)
            return out
        return read_and_release

    state = {gguf_tensor_name(name): Lazy(t.shape.tolist()[::-1], released(gguf_dequantize, t),
                                          released(gguf_int4, t) if t.tensor_type.name in GGUF_INT4 else None,
                                          released(gguf_dequantize, t) if len(t.shape) == 2 else None)
             for name, t in tensors.items()}
    types = {gguf_tensor_name(name): t.tensor_type.name for name, t in tensors.items()}
    return Checkpoint(params, lambda: state, path, "metadata", tokenizer,
                      ChatFormat.from_template(meta.get("tokenizer.chat_template")), rope_freqs, types)


LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def release_view(view: torch.Tensor):
    """Drop the pages under a view of a memory-mapped file (torch.load's mmap, private and never
    written) from this process: read once and copied, they would count in its RSS until the file
    is closed; dropped, they would be read from the file again if ever touched."""
    if LIBC is None or view.device.type != "cpu":
        return
    start = view.data_ptr()
    end = start + (sum((n - 1) * s for n, s in zip(view.shape, view.stride())) + 1) * view.element_size()
    lo, hi = start // mmap.PAGESIZE * mmap.PAGESIZE, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE
    LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def file_backed(t: torch.Tensor) -> bool:
    """Whether t's memory is a mapping of a file (a memory-mapped checkpoint's tensor, used as it
    is), by /proc/self/maps (Linux; elsewhere False): its pages can be dropped and read again."""
    if LIBC is None or t.device.type != "cpu" or not t.numel():
        return False
    at = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:  # "lo-hi perms offset dev inode path"
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= at < hi:
                return len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    return False


def release_pages(reader, tensor):
    """Drop a tensor's pages of the memory-mapped file: clean pages the kernel may drop anyway, but
    until it does they count in the process's RSS (the whole file, by the end of a load)."""
    mapping = getattr(reader.data, "_mmap", None)  # numpy keeps the mmap object there
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


# llama.cpp's 4-bit blocks of 32 are on the int4 grid: w = (q - 8) * scale + zero with q in 0..15
GGUF_INT4 = ("Q4_0", "Q4_1", "Q4_K")


@dataclass
class Int4Values:
    """An int4 matrix before packing, what a GGUF file's 4-bit blocks become (variants/quantize.py
    packs it): q (out, in) uint8 in 0..15, scales and zeros (out, in / group)."""
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        w = (self.q.float().unflatten(1, (-1, g)) - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.flatten(1)


def gguf_int4(tensor) -> Int4Values:
    """A Q4_0, Q4_1 or Q4_K tensor as int4 values in groups of 32, read from its blocks (never in
    full precision): Q4_0 is (q - 8) * d; Q4_1 is q * d + m; Q4_K is q * d * sc - dmin * m, with
    6-bit sc and m per 32 values under a super-block of 256."""
    kind = tensor.tensor_type.name
    out_features = int(tensor.shape[1])
    blocks = torch.from_numpy(np.array(tensor.data)).reshape(out_features, -1,
                                                                          {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}[kind])

    def f16(b):  # little-endian fp16 at the start of b's last axis
        return b[..., :2].contiguous().view(torch.float16).squeeze(-1).float()

    def nibbles(qs):  # 16 bytes -> 32 values: the low nibbles first, then the high ones
        return torch.cat([qs & 15, qs >> 4], dim=-1)

    if kind in ("Q4_0", "Q4_1"):
        d = f16(blocks)
        q = nibbles(blocks[..., -16:])
        zero = torch.zeros_like(d) if kind == "Q4_0" else f16(blocks[..., 2:4]) + 8 * d
        return Int4Values(q.flatten(1), d, zero)
    d, dmin, sc, qs = f16(blocks), f16(blocks[..., 2:4]), blocks[..., 4:16].int(), blocks[..., 16:]
    low, mid, high = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]  # the 12-byte packing of 8 scales and 8 mins
    scales = torch.cat([low & 63, (high & 15) | ((low >> 6) << 4)], dim=-1).float()
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1).float()
    q = torch.stack([qs.unflatten(-1, (4, 32)) & 15, qs.unflatten(-1, (4, 32)) >> 4], dim=-2).flatten(-3)
    scale = (d[..., None] * scales).flatten(1)
    return Int4Values(q.flatten(1), scale, 8 * scale - (dmin[..., None] * mins).flatten(1))


GGUF_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
OURS_TO_GGUF = {ours: theirs for theirs, ours in GGUF_TENSOR_NAMES.items()}


def gguf_fields(path) -> dict:
    """A GGUF file's tokenizer.ggml.* metadata (and chat template), to write into another."""
    meta = open_gguf(path)[1]
    return {k.removeprefix("tokenizer.ggml."): v for k, v in meta.items() if k.startswith("tokenizer.ggml.")} | \
        ({"chat_template": meta["tokenizer.chat_template"]} if "tokenizer.chat_template" in meta else {})


# tokenizer.ggml.* keys -> the GGUFWriter method that writes each
GGUF_TOKENIZER_WRITERS = {"model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
                          "token_type": "add_token_types", "merges": "add_token_merges",
                          "bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id",
                          "padding_token_id": "add_pad_token_id", "unknown_token_id": "add_unk_token_id",
                          "eot_token_id": "add_eot_token_id", "eom_token_id": "add_eom_token_id",
                          "add_bos_token": "add_add_bos_token", "add_eos_token": "add_add_eos_token",
                          "add_space_prefix": "add_add_space_prefix"}


def save_gguf(state: dict, params: dict, path: Path, tokenizer_fields: dict, gguf_type: str = "f16",
              rope_freqs: Optional[torch.Tensor] = None, name: str = "llama31"):
    """model.gguf as llama.cpp's converter writes a Llama: llama.* hyper-parameters, Llama 3.1's
    RoPE scaling as the rope_freqs tensor of per-frequency divisors (given: the loader computes
    them), the tokenizer (tokenizer_fields: tokenizer.ggml.* keys without the prefix, plus
    chat_template), and tensors under llama.cpp's names (q/k rows in Meta's order, which is
    llama.cpp's). Matrices are stored in gguf_type (gguf's own quantizers; a matrix whose width is
    not a multiple of 32 stays F16), norms in F32."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown gguf_type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type]]
    n_heads = params["n_heads"]

    def write(tmp):
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_context_length(hf_max_positions(params))
        w.add_embedding_length(params["dim"])
        w.add_block_count(params["n_layers"])
        w.add_feed_forward_length(state["layers.0.feed_forward.w1.weight"].shape[0])
        w.add_head_count(n_heads)
        w.add_head_count_kv(params.get("n_kv_heads") or n_heads)
        w.add_rope_freq_base(params.get("rope_theta", 500000.0))
        w.add_layer_norm_rms_eps(params.get("norm_eps", 1e-5))
        w.add_rope_dimension_count(params["dim"] // n_heads)
        w.add_vocab_size(params["vocab_size"])
        for key, value in tokenizer_fields.items():
            if key == "chat_template":
                w.add_chat_template(value)
            elif key in GGUF_TOKENIZER_WRITERS:
                getattr(w, GGUF_TOKENIZER_WRITERS[key])(value)
            else:  # a key this writer does not know: said, not silently dropped
                print(f"note: tokenizer.ggml.{key} is not written to {path.name}", file=sys.stderr)
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
        for key, t in state.items():
            if key == "output.weight" and params.get("tie_embeddings"):
                continue  # llama.cpp reads token_embd for a missing output
            m = re.fullmatch(r"(?:layers\.(\d+)\.)?(.+)\.weight", key)
            gname = (f"blk.{m.group(1)}." if m.group(1) is not None else "") + OURS_TO_GGUF[m.group(2)] + ".weight"
            a = t.detach().float().cpu().numpy()
            kind = qtype if a.ndim == 2 and (qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                                             or a.shape[1] % 32 == 0) else None
            if a.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
                w.add_tensor(gname, a)
            elif kind is None or kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, a.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


# -----------------------------------------------------------------------------
# export: the tokenizer goes along with converted weights


def check_export_tokenizer(src: Path):
    """What export_tokenizer will copy or read, read first, so that a damaged file stops the export
    before anything is written: the HF tokenizer files (JSON, the template text) and tokenizer.model."""
    if not src.is_dir():
        return
    redo = "; re-download it, or delete it to export without it"
    for name in HF_TOKENIZER_FILES:
        if (src / name).exists() and name.endswith(".json"):
            read_json(src / name, redo)
        elif (src / name).exists():
            try:
                (src / name).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"could not read {src / name} as text ({reason(e)}){redo}") from None
    if (src / "tokenizer.model").exists():
        Tokenizer(src / "tokenizer.model")


def export_tokenizer(src: Path, out: Path, format: str, params: dict):
    """tokenizer.model for our loader and Meta's code; for HF, the source's HF tokenizer files as
    they are, else ones made from tokenizer.model."""
    written = []
    hf_files = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()]
    if format == "hf" and "tokenizer.json" in hf_files:
        for name in hf_files:
            shutil.copyfile(src / name, out / name)
        written += hf_files
    path, why = None, f"{src} has no tokenizer.model"
    # llama-models' copy stands in only for a Meta-layout source, as it does when sampling
    if (src / "tokenizer.model").is_file() or (src / "params.json").is_file():
        try:
            path = find_tokenizer_model(None, src)
        except ConfigError as e:
            why = str(e)
    if path is not None and (n_words := Tokenizer(path).n_words) != params["vocab_size"]:
        path, why = None, f"{path} has {n_words} tokens, the model {params['vocab_size']}"
    if path is not None:
        shutil.copyfile(path, out / "tokenizer.model")
        written.append("tokenizer.model")
        if format == "hf" and "tokenizer.json" not in hf_files:
            written += save_hf_tokenizer(path, out, hf_max_positions(params))
    elif not written:
        print(f"note: no tokenizer written ({why}); put the model's tokenizer beside the weights", file=sys.stderr)
    if written:
        print(f"tokenizer: {', '.join(written)}", file=sys.stderr)


# -----------------------------------------------------------------------------
# data: token shards on disk (.bin) written and checked here; llama31's loader reads them
#
# A shard is a header of 256 little-endian int32 (magic 20240801, version 7, token count, then
# zeros) followed by the tokens as little-endian uint32, the layout llm.c uses for Llama 3.

DATA_MAGIC = 20240801
DATA_VERSION = 7
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_datafile(path, tokens) -> int:
    """Write tokens (any 1-D sequence of ints in [0, 2**32)) as a shard; return the count.
    The bytes go to a temporary name that is renamed when complete, so a crash never leaves a
    half-written shard under the real name."""
    toks = np.asarray(tokens)
    if toks.size == 0:
        toks = toks.astype(np.uint32)
    if toks.ndim != 1 or not np.issubdtype(toks.dtype, np.integer):
        raise ConfigError(f"tokens for {path} must be a 1-D sequence of ints, got {toks.dtype} "
                          f"with shape {toks.shape}")
    if toks.dtype != np.uint32 and toks.size and (toks.min() < 0 or toks.max() >= 2**32):
        raise ConfigError(f"tokens for {path} must lie in [0, 2**32) to be stored as uint32, "
                          f"got values from {toks.min()} to {toks.max()}")
    if len(toks) >= 2**31:  # the header keeps the count as an int32
        raise ConfigError(f"{len(toks)} tokens are too many for one shard ({path}); split them "
                          f"into shards of fewer than 2**31 tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = DATA_MAGIC, DATA_VERSION, len(toks)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            toks.astype("<u4", copy=False).tofile(f)

    atomic_write(Path(path), write, f".tmp{os.getpid()}")  # the demo's ranks write the same shards at once
    return len(toks)


def read_datafile_header(path) -> int:
    """Check a shard's header (magic, version, token count against the file size); return the
    token count. Every problem is a ConfigError that names the file."""
    path = Path(path)
    redo = "re-create it with tiny_stories.py (or write_datafile)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ConfigError(f"could not read {path} as a token shard ({e}); {redo}") from None
    if len(raw) < HEADER_BYTES:
        raise ConfigError(f"{path} is {size} bytes, too short for the {HEADER_BYTES}-byte header of a "
                          f"token shard; {redo}")
    magic, version, ntok = (int(v) for v in np.frombuffer(raw, dtype="<i4")[:3])
    if magic != DATA_MAGIC:
        raise ConfigError(f"{path} has magic {magic}, not {DATA_MAGIC}, so it is not a token shard; {redo}")
    if version != DATA_VERSION:
        raise ConfigError(f"{path} is shard format version {version}, but this loader reads version "
                          f"{DATA_VERSION} (uint32 tokens); {redo}")
    expected = HEADER_BYTES + 4 * ntok
    if ntok < 0 or size != expected:
        raise ConfigError(f"{path} header says {ntok} tokens ({expected} bytes) but the file is {size} "
                          f"bytes, so it is truncated or corrupt; {redo}")
    return ntok


class DistributedShardedDataLoader:
    """Batches (x, y), int64 (B, T), y = x shifted by one token, from the shards matching a glob
    (in sorted order), for rank process_rank of num_processes. Each step the ranks consume
    B*T*num_processes tokens: rank r reads B*T + 1 from position + r*B*T, so N ranks for one step
    see what one rank sees in N steps. A step that would run past its shard's end moves every rank
    to the next shard (after the last, the first): no window spans two shards. Memory-mapped."""

    def __init__(self, filename_pattern, B: int, T: int, process_rank: int = 0,
                 num_processes: int = 1):
        if B < 1 or T < 1:
            raise ConfigError(f"batch size B ({B}) and sequence length T ({T}) must be at least 1")
        if not 0 <= process_rank < num_processes:
            raise ConfigError(f"process_rank {process_rank} is not in 0..{num_processes - 1} "
                              f"(num_processes {num_processes})")
        self.B = B
        self.T = T
        self.process_rank = process_rank
        self.num_processes = num_processes
        self.step_tokens = B * T * num_processes
        self.files = sorted(glob.glob(str(filename_pattern)))
        if not self.files:
            raise ConfigError(f"no token shards match {filename_pattern}; create them with "
                              f"tiny_stories.py or fix the pattern")
        self.shard_ntoks = [read_datafile_header(f) for f in self.files]
        need = self.step_tokens + 1
        for f, n in zip(self.files, self.shard_ntoks):
            if n < need:
                raise ConfigError(f"{f} holds {n} tokens, fewer than the {need} one step needs "
                                  f"(B*T*num_processes + 1 = {B}*{T}*{num_processes} + 1); lower B "
                                  f"or T, or write bigger shards")
        self.ntok_total = sum(self.shard_ntoks)
        self.current_shard: Optional[int] = None
        self.tokens: Optional[np.memmap] = None
        self.reset()

    def _seek(self, shard: int, position: int):
        if shard != self.current_shard:
            self.tokens = np.memmap(self.files[shard], dtype="<u4", mode="r", offset=HEADER_BYTES,
                                    shape=(self.shard_ntoks[shard],))
        self.current_shard = shard
        self.current_position = position

    def reset(self):
        """Back to the first token of the first shard."""
        self._seek(0, 0)

    def largest_token(self):
        """(largest token id, the shard holding it) over every token: one read of all the data,
        to check it against a vocabulary before training rather than when a bad batch comes up."""
        tops = [(int(np.memmap(f, dtype="<u4", mode="r", offset=HEADER_BYTES, shape=(n,)).max()),
                 f) for f, n in zip(self.files, self.shard_ntoks)]
        return max(tops, key=lambda t: t[0])

    def check_vocab(self, vocab_size: int):
        top, shard = self.largest_token()
        if top >= vocab_size:
            raise ConfigError(f"{shard} holds token id {top}, outside this model's vocabulary of "
                              f"{vocab_size}; tokenize the data with the model's tokenizer")

    def next_batch(self):
        if self.current_position + self.step_tokens + 1 > len(self.tokens):
            self._seek((self.current_shard + 1) % len(self.files), 0)
        B, T = self.B, self.T
        start = self.current_position + self.process_rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        self.current_position += self.step_tokens
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self) -> dict:
        """Where the next step starts: the same on every rank, so rank 0's copy resumes them all."""
        return {"shard": self.current_shard, "position": self.current_position,
                "shard_file": Path(self.files[self.current_shard]).name}

    def load_state_dict(self, state: dict):
        shard = int(state["shard"])
        position = int(state["position"])
        if not 0 <= shard < len(self.files):
            raise ConfigError(f"loader state points at shard {shard}, but only {len(self.files)} "
                              f"shards match now; resume with the same data")
        name = Path(self.files[shard]).name
        if state.get("shard_file", name) != name:
            raise ConfigError(f"loader state was saved at shard {state['shard_file']}, but shard "
                              f"{shard} is now {self.files[shard]}; resume with the same data")
        if not 0 <= position <= self.shard_ntoks[shard]:
            raise ConfigError(f"loader state position {position} lies outside {self.files[shard]} "
                              f"({self.shard_ntoks[shard]} tokens); resume with the same data")
        self._seek(shard, position)


def text_to_shards(text_path: Path, tokenizer: Tokenizer, out_dir: Path, n_val: Optional[int] = None,
                   min_val_tokens: int = 0):
    """Blank-line-separated documents of a text file as BOS ... EOS token shards: the last n_val
    documents (default: 1%, at least 2, and as many as make min_val_tokens) become NAME_val.bin,
    the rest NAME_train.bin, NAME being the text file's. Returns the two paths."""
    if not text_path.is_file():
        raise ConfigError(f"text file {text_path} does not exist")
    docs = [d.strip() for d in text_path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids = [[tokenizer.bos_id, *tokenizer.encode(d, bos=False, eos=False), tokenizer.eos_id] for d in docs]
    if n_val is None:
        n_val = max(2, len(docs) // 100)
        while n_val < len(docs) and sum(map(len, ids[len(docs) - n_val:])) < min_val_tokens:
            n_val += 1
    if len(docs) <= n_val:
        raise ConfigError(f"{text_path} has {len(docs)} documents (blank-line separated); need more than {n_val}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{text_path.stem}_train.bin", out_dir / f"{text_path.stem}_val.bin"
    for path, part in zip(paths, (ids[:-n_val], ids[-n_val:])):
        write_datafile(path, [t for doc in part for t in doc])
    return paths


# -----------------------------------------------------------------------------
# Meta's model-parallel checkpoints (70B: 8 files, 405B: 16), merged into one state dict: each file
# holds a cut of every weight, column-parallel layers by output rows, row-parallel layers by input
# columns; norms are copied whole to every file.

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def merge_shards(states: List[dict], expected: dict, head_dim: int, ckpt_dir) -> dict:
    """One state dict from model-parallel shards, key by key. The shards are memory-mapped, so
    only the pieces of the tensor being merged are read at any moment. expected: the model's
    shapes by name."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    merged = {}
    for key in states[0]:
        missing = [str(p) for p, s in zip(paths, states) if key not in s]
        if missing:
            raise ConfigError(f"{key} is in {paths[0]} but not in {', '.join(missing)}; the shards "
                              f"are not from one checkpoint")
        pieces = [s[key] for s in states]
        name = key.removesuffix(".weight")
        if name.endswith(ROW_PARALLEL):
            dim = 1
        elif name.endswith(COLUMN_PARALLEL) or name == "output":
            dim = 0
        elif name == "tok_embeddings" and key in expected:
            # Llama 3 splits the vocabulary (rows); Llama 2 split the features (columns)
            dim = 0 if pieces[0].shape[0] != expected[key][0] else 1
        else:  # replicated
            merged[key] = pieces[0]
            continue
        merged[key] = torch.cat(pieces, dim=dim)
        if name.endswith(("attention.wk", "attention.wv")) and key in expected:
            merged[key] = dedupe_kv_heads(merged[key], expected[key][0] // head_dim, head_dim, key)
    return merged


def dedupe_kv_heads(w, n_kv_heads: int, head_dim: int, key: str):
    """With more shards than KV heads (405B: 16 files, 8 KV heads) each file holds a copy of the
    head it shares with its neighbours; keep one copy of each, checking the copies agree."""
    repeats = w.shape[0] // (n_kv_heads * head_dim)
    if repeats <= 1 or w.shape[0] != repeats * n_kv_heads * head_dim:
        return w
    heads = w.view(n_kv_heads, repeats, head_dim, w.shape[1])
    if not all(torch.equal(heads[:, 0], heads[:, r]) for r in range(1, repeats)):
        raise ConfigError(f"{key}: the shards hold {repeats}x the KV heads params.json declares, and the "
                          f"copies differ; check n_kv_heads in params.json")
    return heads[:, 0].reshape(n_kv_heads * head_dim, w.shape[1])


def check_state_dict(expected: dict, state: dict, where, source: str = "params.json"):
    """Name every missing, unexpected or wrongly shaped tensor in one message; expected: the
    model's shapes by name."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if k in state and state[k].shape != s]

    def head(names):
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {head(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {head(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch (checkpoint vs {source}) {len(wrong)}: {head(wrong)}")
    if problems:
        raise ConfigError(f"weights in {where} do not match its {source}: " + "; ".join(problems))
