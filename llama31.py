"""
Llama 3.1 in one file of PyTorch: the model, loading Meta's checkpoints, sampling, and
finetuning in one process or many (torchrun, DDP).

    python llama31.py                               # the demo model (SmolLM2 GGUF), no weights
    python llama31.py --ckpt_dir Meta-Llama-3.1-8B  # sample from an official checkpoint
    python llama31.py --ckpt_dir model.gguf --chat  # a llama.cpp/ollama GGUF file, as a chat
    torchrun --nproc_per_node 2 llama31.py finetune # finetune (the demo, without --ckpt_dir)

Sections, top to bottom: config, layers, model (one trunk for inference and training), checkpoint
I/O, generation, data, training, CLI. Parameter names are Meta's (tok_embeddings,
layers.N.attention.wq, ...), so an official consolidated.00.pth loads with no renaming. Beneath
this file: tokenizer.py (the tokenizer and chat formats), formats.py (every other layout read into
Meta's form), runs.py (devices, processes, a run's bookkeeping, the demo), and the variants
package (quantization, LoRA, tensor parallel, FSDP, compiled and fused sampling), which joins at
the moments that variants.Variant's methods name.
"""

import contextlib
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP

import formats
import runs
import variants
from errors import ConfigError
from formats import DistributedShardedDataLoader
from runs import (DEFAULT_PROMPTS, DistInfo, all_reduce_mean, check_device, check_number,
                  check_sampling_args, default_device, next_batch, resolve_dtype, setup_distributed,
                  training_autocast)
from tokenizer import ChatFormat, Tokenizer


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
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                              f"{self.n_kv_heads}")
        if self.max_seq_len < 1 or self.max_batch_size < 1:
            raise ConfigError(f"max_seq_len ({self.max_seq_len}) and max_batch_size "
                              f"({self.max_batch_size}) must be at least 1")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Build from a params.json dict; keys we don't model (vision, quantization, ...) are
        ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_params(self) -> dict:
        """The params.json of this model: Meta's keys, read by Meta's code as by from_params."""
        keys = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope"]
        if self.use_scaled_rope:  # Meta's files leave these implicit; ours state them
            keys += ["rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_original_max_len"]
        params = {k: getattr(self, k) for k in keys}
        if self.ffn_dim is not None:
            params["ffn_dim"] = self.ffn_dim
            if int(8 * self.dim / 3) <= self.ffn_dim:  # Meta's rule gives ffn_dim exactly so
                params["multiple_of"] = self.ffn_dim
                params["ffn_dim_multiplier"] = None
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
    exponents = torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd
    freqs = 1.0 / (args.rope_theta ** exponents)
    if args.use_scaled_rope:
        freqs = scale_rope_freqs(freqs, args.rope_scale_factor, args.rope_low_freq_factor,
                                 args.rope_high_freq_factor, args.rope_original_max_len)
    return freqs


def precompute_rope(args: ModelArgs, end: int, device=None):
    """cos and sin tables, (end, head_dim // 2), fp32. Always fp32: bf16 angles lose positions."""
    positions = torch.arange(end, device=device, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(args, device))
    return torch.cos(angles), torch.sin(angles)


def rope_pairs(cos, sin):
    """(..., head_dim // 2) tables -> (..., head_dim): cos repeated for both members of a pair,
    sin signed (-sin, +sin), the form apply_rope takes. Done once per forward, not per layer."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by their angle, Meta's layout (HF's
    differs): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in fp32.
    x: (B, T, H, head_dim); cos, sin: (T, head_dim) or, a position per row, (B, T, head_dim)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return torch.addcmul(xf * cos.unsqueeze(-2), swapped, sin.unsqueeze(-2)).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer, (batch, KV heads,
    max_seq_len, head_dim). Installed by Transformer.setup_caches for generation only; training
    never has one."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k
        self.v = v

    def update(self, start_pos, k, v, keys: int):
        """Write k, v (B, H, T, hd) at start_pos in place; return the first `keys` positions.
        start_pos: an int (every row), or a tensor (B,) of each row's first position ((1,): all
        rows at one), the rows then at different positions (a server's batch)."""
        bsz, seqlen = k.shape[0], k.shape[2]
        if isinstance(start_pos, torch.Tensor):
            rows = torch.arange(bsz, device=k.device)[:, None]
            at = start_pos[:, None] + torch.arange(seqlen, device=k.device)  # (B, T)
            self.k[rows, :, at] = k.transpose(1, 2)
            self.v[rows, :, at] = v.transpose(1, 2)
        else:
            self.k[:bsz, :, start_pos:start_pos + seqlen] = k
            self.v[:bsz, :, start_pos:start_pos + seqlen] = v
        return self.k[:bsz, :, :keys], self.v[:bsz, :, :keys]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Rows lo..hi as a cache of their own: views, the same memory."""
        return KVCache(self.k[lo:hi], self.v[lo:hi])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None
        self.wqkv: Optional[nn.Module] = None  # wq, wk, wv as one product (fused.py, to decode)

    def forward(self, x, cos, sin, mask, start_pos):
        bsz, seqlen, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
            q, k, v = self.wqkv(x).split(sizes, -1)
        q, k, v = (t.view(bsz, seqlen, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.cache is not None:  # per-row positions come with the mask of the keys to read
            keys = mask.shape[-1] if isinstance(start_pos, torch.Tensor) else start_pos + seqlen
            k, v = self.cache.update(start_pos, k, v, keys)
        y = attend(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v, each KV head serving n_heads / n_kv_heads query heads;
    mask None: causal from position 0, else an additive bias. One new position on CPU, or with a
    bias, is written out as Meta writes it (one_query_attention); the rest is PyTorch's SDPA."""
    gqa = k.shape[1] != q.shape[1]
    if q.shape[2] == 1 and (mask is not None or q.device.type == "cpu"):
        return one_query_attention(q, k, v, mask)
    # With a mask, repeat the KV heads: CUDA's memory-efficient kernel takes masks but not GQA,
    # and the fallback (math) would store every (T, T) attention matrix.
    repeat = gqa and (mask is not None or not sdpa_takes_gqa(q.device))
    if repeat:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    causal = False
    if mask is None and q.shape[2] > 1:  # an `if`: compiled, the length is symbolic
        causal = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=gqa and not repeat)


# SDPA's enable_gqa aborts on MPS before torch 2.7; there the KV heads are repeated instead
MPS_SDPA_GQA = torch.__version__ >= "2.7"


def sdpa_takes_gqa(device: torch.device) -> bool:
    return device.type != "mps" or MPS_SDPA_GQA


def one_query_attention(q, k, v, bias=None):
    """One new position (q: B, H, 1, hd) over all of k, v (B, KV, S, hd), softmax in fp32; bias:
    additive, (B, 1, 1, S). On CPU SDPA costs more than this for one query (bench.py decode);
    with a bias (a fixed-shape decode step) it also spares repeating KV heads."""
    bsz, n_heads, _, head_dim = q.shape
    q = q.view(bsz, k.shape[1], -1, head_dim)  # (B, KV, H / KV, hd): query heads by KV head
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias
    y = scores.float().softmax(dim=-1).type_as(q) @ v
    return y.view(bsz, n_heads, 1, head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: Optional[nn.Module] = None  # w1 and w3 as one product (fused.py)

    def forward(self, x):
        a, b = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return self.w2(F.silu(a) * b)
        # inference in place: no (T, hidden) temporary, whose fresh pages cost more than silu
        return self.w2(F.silu(a, inplace=True).mul_(b))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask, start_pos):
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
    """A boolean mask (True: may attend) as SDPA's additive bias, made once per forward (made in
    each layer, each layer's backward would keep a copy: 2*B*T*T bytes in bf16), rows padded to
    8 as CUDA's memory-efficient kernel would otherwise pad a copy, in every layer."""
    keys = mask.shape[-1]
    padded = -(-keys // 8) * 8
    bias = torch.zeros(*mask.shape[:-1], padded, dtype=dtype, device=mask.device)[..., :keys]
    return bias.masked_fill_(~mask, float("-inf"))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size < 1:
            raise ConfigError(f"vocab_size is {args.vocab_size}; set it to the tokenizer's size "
                              f"(n_words)")
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
        self.checkpoint_activations = False  # training: keep each block's input, recompute the rest

    def rope_tables(self, device):
        """The cos and sin tables, moved to device the first time it is asked for."""
        if self.rope_cos.device != device:
            # outside inference mode even when generation moves them, or training could not use them
            with torch.inference_mode(False):
                self.rope_cos = self.rope_cos.to(device)
                self.rope_sin = self.rope_sin.to(device)
        return self.rope_cos, self.rope_sin

    def trunk(self, tokens, start_pos=0, mask=None):
        """Embeddings -> blocks -> final norm. start_pos: where tokens (B, T) start, an int, or a
        tensor (B,) of each row's first position ((1,): every row's) with the mask of the cache
        positions each may read. mask: None (causal from position 0) or boolean (T, S) or
        (B, 1, T, S), True where attending is allowed."""
        seqlen = tokens.shape[1]
        per_row = isinstance(start_pos, torch.Tensor)
        if not per_row and start_pos + seqlen > self.args.max_seq_len:
            raise ConfigError(f"positions {start_pos}..{start_pos + seqlen - 1} run past "
                              f"max_seq_len {self.args.max_seq_len}; build the model with a larger "
                              f"max_seq_len")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_tables(h.device)
        if per_row:
            at = start_pos[:, None] + torch.arange(seqlen, device=h.device)
        else:
            at = slice(start_pos, start_pos + seqlen)
        cos, sin = rope_pairs(cos[at], sin[at])
        if mask is not None:
            autocast = torch.is_autocast_enabled(h.device.type)
            dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
            mask = attention_bias(mask, dtype)
        for layer in self.layers:
            if self.checkpoint_activations and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, start_pos,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, start_pos)
        return self.norm(h)

    @torch.inference_mode()
    def forward_inference(self, tokens, start_pos=0, last: int = 0):
        """Logits (B, T, vocab) in fp32 for tokens (B, T) at positions start_pos.. : an int, or a
        list of each row's first position (rows at different positions); last: of the last
        `last` positions only (0: all). With caches installed (setup_caches) earlier positions
        come from the cache; without, start_pos must be 0."""
        seqlen = tokens.shape[1]
        if isinstance(start_pos, (list, tuple)):
            return self.logits(tokens, *self.row_positions(start_pos, seqlen), last)
        if start_pos and self.layers[0].attention.cache is None:
            raise ConfigError("start_pos > 0 needs the KV cache: call setup_caches() first")
        mask = None
        if start_pos and seqlen > 1:  # a chunk after a cached prefix: causal, offset by start_pos
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
            mask = mask.tril(start_pos)
        return self.logits(tokens, start_pos, mask, last)

    def row_positions(self, starts: List[int], seqlen: int) -> tuple:
        """(start_pos, mask) of rows that start at their own positions: each query reads the
        cache up to its own position, of the first max(starts) + seqlen."""
        keys = max(starts) + seqlen
        if keys > self.args.max_seq_len or self.layers[0].attention.cache is None:
            raise ConfigError(f"positions up to {keys - 1} need a KV cache of max_seq_len "
                              f"{self.args.max_seq_len} or more: call setup_caches() first")
        device = self.norm.weight.device
        start_pos = torch.tensor(starts, device=device)
        last = start_pos[:, None] + torch.arange(seqlen, device=device)  # each query's position
        mask = torch.arange(keys, device=device) <= last[:, :, None]  # (B, T, keys)
        return start_pos, mask[:, None]

    def logits(self, tokens, start_pos=0, mask=None, last: int = 0):
        h = self.trunk(tokens, start_pos, mask)
        return self.output(h[:, -last:] if last else h).float()

    def forward_loss(self, inputs, targets, ignore_index: int = -100, mask=None):
        """Mean cross-entropy of predicting targets (B, T) from inputs (B, T); the training path.
        mask: None for plain causal attention, or document_mask(inputs, bos_id) for packed data."""
        logits = self.output(self.trunk(inputs, 0, mask)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=ignore_index)

    def forward(self, inputs, targets, ignore_index: int = -100, mask=None):
        # nn.Module's entry point, which DDP, FSDP and torch.compile wrap, is the training loss
        return self.forward_loss(inputs, targets, ignore_index, mask)

    def setup_caches(self, batch_size: int, max_seq_len: int):
        p = self.norm.weight  # the activations' dtype and device (output.weight may be quantized)
        for layer in self.layers:
            shape = (batch_size, layer.attention.n_kv_heads, max_seq_len, self.args.head_dim)
            layer.attention.cache = KVCache(torch.zeros(shape, dtype=p.dtype, device=p.device),
                                            torch.zeros(shape, dtype=p.dtype, device=p.device))

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None

    @contextmanager
    def cache_rows(self, lo: int, hi: int):
        """Run on rows lo..hi of the installed caches alone (one request of a batch)."""
        whole = [layer.attention.cache for layer in self.layers]
        for layer, cache in zip(self.layers, whole):
            layer.attention.cache = cache.rows(lo, hi)
        try:
            yield
        finally:
            for layer, cache in zip(self.layers, whole):
                layer.attention.cache = cache

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str = "cpu"):
        """AdamW; matrices (embeddings, linears) decay, gains don't. The fused kernel (CUDA and
        CPU) updates each tensor in one pass; the default makes full-size temporaries."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


# -----------------------------------------------------------------------------
# checkpoint I/O: load_checkpoint, the one way a model is loaded from any layout (formats.py
# reads Meta's, HF's and GGUF files into Meta's form), and writing Meta's layout


def read_checkpoint(path, rope_scale_factor=None, tokenizer_path=None, tokenizer: bool = False,
                    vocab_size=None, **overrides):
    """(ModelArgs, formats.Checkpoint) of any layout (formats.read), weights unread. overrides:
    ModelArgs fields no file holds; rope_scale_factor: for checkpoints that don't state theirs."""
    ckpt = formats.read(path, tokenizer_path, tokenizer, vocab_size)
    args = ModelArgs.from_params(ckpt.params, **overrides)
    factor = formats.resolve_rope_factor(ckpt.params.get("rope_scale_factor"), rope_scale_factor,
                                         args.dim, args.n_layers, ckpt.params_path,
                                         args.use_scaled_rope, ckpt.source)
    args.rope_scale_factor = factor or args.rope_scale_factor
    if ckpt.rope_freqs is not None:  # GGUF: the divisors llama.cpp applies must be our rule's
        if not torch.allclose(rope_divisors(args), ckpt.rope_freqs.float(), rtol=1e-3):
            raise ConfigError(f"{ckpt.params_path}: its rope_freqs do not follow Llama 3.1's RoPE "
                              f"scaling rule")
    return args, ckpt


def rope_divisors(args: ModelArgs) -> torch.Tensor:
    """What Llama 3.1's RoPE scaling divides each frequency by: GGUF files store it."""
    return rope_frequencies(replace(args, use_scaled_rope=False)) / rope_frequencies(args)


def load_checkpoint(path, tokenizer_path=None, device=None, dtype=None,
                    quantize: Optional[str] = None, group_size: int = 32, extra=(),
                    tokenizer: bool = True, **overrides) -> "Llama":
    """A checkpoint in any layout (formats.read: a Meta or HF directory, a .gguf file) as a Llama:
    the model on device in dtype, its tokenizer (tokenizer=False: none) and chat format.
    quantize: int8/int4 as the weights load, None/keep a GGUF's own 4- and 8-bit tensors, none
    full precision. extra: the caller's own variants (variants.Variant), whose hooks run with
    those this load chooses (variants.for_loading). overrides: rope_scale_factor, and ModelArgs
    fields no file holds (max_seq_len, max_batch_size; vocab_size, checked)."""
    adapters = variants.adapters_of(path)  # a LoRA run's step: its base, as trained, and adapters
    if adapters:
        path = adapters.base
        tokenizer_path = tokenizer_path or adapters.tokenizer
        quantize = quantize or adapters.quantize
    device = check_device(device or default_device())
    variants.check_quantize(quantize, group_size)
    if dtype is not None:
        resolve_dtype(dtype, device)  # a bad --dtype is said before the slow part
    args, ckpt = read_checkpoint(path, tokenizer_path=tokenizer_path, tokenizer=tokenizer,
                                 **overrides)
    chosen = variants.for_loading(device, quantize, group_size, ckpt, adapters, extra)
    wanted = [d for d in (v.plan(args, ckpt, device) for v in chosen) if d]
    dtype = resolve_dtype(dtype or (wanted[0] if wanted else None), device)
    load = partial(assemble, args, ckpt, ckpt.where, ckpt.source, device, dtype, chosen)
    for v in chosen:
        load = partial(v.around, load)
    return Llama(load(), ckpt.tokenizer, ckpt.chat_format)


def load_model(ckpt_dir, max_seq_len: int = 2048, max_batch_size: int = 4, device=None, dtype=None,
               vocab_size: Optional[int] = None,
               rope_scale_factor: Optional[float] = None) -> Transformer:
    """load_checkpoint's model alone, full precision, no tokenizer (vocab_size: its size)."""
    return load_checkpoint(ckpt_dir, None, device, dtype, "none", tokenizer=False,
                           max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                           vocab_size=vocab_size, rope_scale_factor=rope_scale_factor).model


def assemble(args: ModelArgs, ckpt, where, source: str, device, dtype, chosen=()) -> Transformer:
    """A model built on the meta device given the tensors of ckpt (a formats.Checkpoint or a state
    dict) one at a time: peak memory stays near one copy of the weights, and a memory-mapped file
    in dtype is used as it is. where and source name the weights and their shapes' origin in
    messages. chosen: the variants, whose hooks run at each step (variants.Variant)."""
    with torch.device("meta"):
        model = Transformer(args)
    state = None
    for v in chosen:
        state = v.build(model, ckpt, device, dtype) or state
    if state is None:
        state = ckpt.read_state() if isinstance(ckpt, formats.Checkpoint) else ckpt
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if isinstance(state, list):  # Meta's model-parallel files
        state = formats.merge_shards(state, shapes, args.head_dim, where)
    if args.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    formats.check_state_dict(shapes, state, where, source)
    for v in chosen:
        v.swap(model, ckpt, device, dtype)
    if not any(v.load(model, state, device, dtype) for v in chosen):
        load_state(model, state, where, chosen, device, dtype)
    if args.tie_embeddings and model.output.weight.is_floating_point():  # assign=True untied them
        model.output.weight = model.tok_embeddings.weight
    for v in chosen:
        v.loaded(model)
    return model.eval()


def load_state(model: Transformer, state: dict, where, chosen, device, dtype):
    """Each tensor read, converted (by a variant, else to device and dtype), checked, and let go
    before the next is read."""
    where = Path(where)
    files = [*where.glob("*.pth"), *where.glob("*.safetensors")] if where.is_dir() else []
    label = files[0] if len(files) == 1 else where
    loaded = {}
    for k in list(state):
        value = state.pop(k)
        converted = (v.convert(model, k, value, device, dtype) for v in chosen)
        new = next((n for n in converted if n is not None), None)
        new = new or {k: formats.materialize(value).to(device=device, dtype=dtype)}
        formats.check_finite(new, f"{k} in {label}")
        loaded.update(new)
    model.load_state_dict(loaded, strict=True, assign=True)


def save_meta(model: Transformer, ckpt_dir, dtype=torch.bfloat16, state: Optional[dict] = None):
    """params.json + consolidated.00.pth as Meta ships them (bf16 by default; state: the weights,
    if not the model's), each file written whole or not at all (formats.save_meta)."""
    state = model.state_dict() if state is None else state
    formats.save_meta(state, model.args.to_params(), ckpt_dir, dtype)


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


def next_tokens(logits, temperature: float, top_p: float, generator=None):
    """One token per row of logits (B, vocab): the most likely at temperature 0, else top-p."""
    if temperature > 0:
        return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
    return torch.argmax(logits, dim=-1)


class Decoder:
    """How generate_stream runs the model: caches() for a generation, logits() of a chunk's last
    position (a variant may bring a decoder of its own)."""

    def __init__(self, model: Transformer):
        self.model = model

    @contextmanager
    def caches(self, batch_size: int, total_len: int):
        self.model.setup_caches(batch_size, total_len)
        try:
            yield
        finally:
            self.model.clear_caches()

    def logits(self, tokens, start_pos: int):
        return self.model.forward_inference(tokens, start_pos, last=1)[:, -1]


class Llama:
    """A loaded model with its tokenizer (and its chat format, if known): what sampling needs."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer,
                 chat_format: Optional[ChatFormat] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.decoder = Decoder(model)
        self.speculator = None  # generations of one prompt, when a draft proposes (Draft)

    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None, rope_scale_factor: Optional[float] = None,
              compile: bool = False, quantize: Optional[str] = None, group_size: int = 32,
              parallel: bool = False, fuse: bool = True, draft=None) -> "Llama":
        """Load tokenizer and weights (load_checkpoint) of a Meta or HF directory or a .gguf file
        on device (default: the best there is) in dtype (default bf16 on CUDA, else fp32), to
        sample (variants.for_sampling): parallel, under torchrun, tensor parallel; else fuse,
        wq wk wv and w1 w3 as one product each; compile, through torch.compile; draft: a draft
        model proposes tokens (speculative decoding), loaded first, its vocabulary checked."""
        drafter = None if draft is None else variants.load_draft(
            draft, Llama.build, ckpt_dir, tokenizer_path, max_seq_len, device, dtype,
            rope_scale_factor, compile, parallel)
        chosen = variants.for_sampling(parallel, fuse, compile, drafter, draft and draft.k)
        llama = load_checkpoint(ckpt_dir, tokenizer_path, device, dtype, quantize, group_size,
                                chosen, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                                rope_scale_factor=rope_scale_factor)
        for v in chosen:
            v.sampling(llama)
        return llama

    def check_sampling(self, prompt_tokens, temperature, top_p, max_gen_len):
        """One-line errors for prompts and sampling settings generate would refuse."""
        args = self.model.args
        if not prompt_tokens:
            raise ConfigError("no prompts given; pass at least one")
        if len(prompt_tokens) > args.max_batch_size:
            raise ConfigError(f"{len(prompt_tokens)} prompts but max_batch_size is "
                              f"{args.max_batch_size}; raise max_batch_size")
        check_sampling_args(temperature, top_p, max_gen_len)
        for i, t in enumerate(prompt_tokens):
            if not t:
                raise ConfigError(f"prompt {i} is empty; give it at least one token")
            if len(t) >= args.max_seq_len:
                raise ConfigError(f"prompt {i} has {len(t)} tokens but max_seq_len is "
                                  f"{args.max_seq_len}, leaving no room to generate; raise "
                                  f"max_seq_len or shorten the prompt")

    @torch.inference_mode()
    def generate_stream(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9, generator=None,
                        cache_from: Optional[int] = None,
                        stops: bool = False) -> Iterator[List[Optional[int]]]:
        """Yield, at every step, one new token per row (None: still in its prompt, or stopped;
        stops: the stop token too). Decoding starts at the shortest prompt's end; a longer row
        keeps its own prompt tokens, as in Meta's generate; each row stops after max_gen_len.
        cache_from: the installed cache holds the first cache_from tokens of the one prompt
        already, and stays installed (after k steps: the prompt and the first k - 1 tokens)."""
        self.check_sampling(prompt_tokens, temperature, top_p, max_gen_len)
        longer = len(prompt_tokens) == 1 and 0 <= (cache_from or 0) < len(prompt_tokens[0])
        if cache_from is not None and not longer:
            raise ConfigError(f"cache_from {cache_from} needs one prompt longer than it")
        args = self.model.args
        max_gen_len = max_gen_len or args.max_seq_len - 1
        bsz = len(prompt_tokens)
        lens = [len(t) for t in prompt_tokens]
        total_len = min(args.max_seq_len, max_gen_len + max(lens))
        device = self.model.norm.weight.device
        if generator is not None and generator.device.type != device.type:
            raise ConfigError(f"the generator is on {generator.device.type}, the model on "
                              f"{device.type}; make it there: torch.Generator({device.type!r})")
        if self.speculator is not None and bsz == 1:
            yield from self.speculator.stream(self, prompt_tokens[0], max_gen_len, total_len,
                                              temperature, top_p, generator, cache_from, stops)
            return
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long,
                            device=device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        lengths = torch.tensor(lens, device=device)
        in_prompt = torch.arange(total_len, device=device) < lengths[:, None]
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        n_new = torch.zeros(bsz, dtype=torch.long, device=device)
        if cache_from is None:
            caches = self.decoder.caches(bsz, total_len)
        else:  # a cache installed by the caller stays as it is
            caches = contextlib.nullcontext()
        with caches:
            prev_pos = cache_from or 0
            for cur_pos in range(min(lens), total_len):
                logits = self.decoder.logits(tokens[:, prev_pos:cur_pos], prev_pos)
                next_token = next_tokens(logits, temperature, top_p, generator)
                next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                fresh = ~in_prompt[:, cur_pos] & ~done  # rows that made a token they still want
                stopped = fresh & torch.isin(next_token, stop_tokens)
                emit = fresh if stops else fresh & ~stopped
                n_new += emit
                done |= stopped | (n_new >= max_gen_len)  # at most max_gen_len new tokens a row
                # the step's one wait for the device
                step, emitted, finished = torch.stack((next_token, emit.long(),
                                                       done.long())).tolist()
                yield [t if e else None for t, e in zip(step, emitted)]
                prev_pos = cur_pos
                if all(finished):
                    break

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                 temperature: float = 0.6, top_p: float = 0.9, echo: bool = False,
                 generator=None, stops: bool = False) -> List[List[int]]:
        """New tokens for each prompt (prompt included if echo), up to a stop token (included if
        stops). temperature 0 is greedy; pass a seeded torch.Generator for reproducible sampling."""
        out = [list(t) if echo else [] for t in prompt_tokens]
        steps = self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, generator,
                                     stops=stops)
        for step in steps:
            for row, t in zip(out, step):
                if t is not None:
                    row.append(t)
        return out

    def text_completion(self, prompts: List[str], max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9, echo: bool = False,
                        generator=None) -> List[str]:
        """Complete each prompt as a base model would: BOS (if the tokenizer wants one) + prompt,
        text used exactly as given."""
        bos = self.tokenizer.add_bos
        prompt_tokens = [self.tokenizer.encode(p, bos=bos, eos=False) for p in prompts]
        outs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, echo, generator)
        return [self.tokenizer.decode(t[int(bos):] if echo else t) for t in outs]

    def stream(self, prompt_tokens: List[int], max_gen_len: Optional[int] = None,
               temperature: float = 0.6, top_p: float = 0.9, generator=None) -> Iterator[tuple]:
        """Generate for one prompt, yielding (token, text) as each token arrives
        (Tokenizer.pieces): the texts join to exactly what generate's tokens decode to."""
        steps = self.generate_stream([prompt_tokens], max_gen_len, temperature, top_p, generator)
        return self.tokenizer.pieces(token for (token,) in steps)

    def chat_completion(self, dialogs: List[List[dict]], max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9,
                        generator=None) -> List[dict]:
        """The assistant's next message for each dialog (message dicts: tokenizer.ChatFormat),
        read back as {"role", "content", "tool_calls", "stop_reason"} (<|eom_id|>: it waits for
        a tool's answer)."""
        if self.chat_format is None:
            raise ConfigError("this model has no known chat format; use text_completion")
        prompt_tokens = [self.chat_format.encode_dialog(self.tokenizer, d) for d in dialogs]
        outs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, generator=generator,
                             stops=True)
        return [self.chat_format.decode_assistant(self.tokenizer, t) for t in outs]


# -----------------------------------------------------------------------------
# data: what finetune reads, token shards (.bin, llm.c's layout; formats.py's
# DistributedShardedDataLoader hands each DDP rank its batches) or a variant's own (conversations)


def training_data(run: runs.Run, tokenizer: Tokenizer, chat_format, vocab_size: int):
    """The train and validation loaders (None: no validation): a variant's own (conversations),
    else token shards, or the demo's data/sample.txt, every token checked against the vocabulary
    first."""
    for v in run.variants:
        loaders = v.training_data(run, tokenizer, chat_format)
        if loaders is not None:
            return loaders
    cfg = run.cfg
    world = run.info.world_size
    train_data = cfg.train_data
    val_data = cfg.val_data
    if train_data is None:  # the demo's own data
        demo = runs.demo_data(runs.DEMO_TEXT, tokenizer, run.out / "demo_data", cfg.B, cfg.T, world,
                              run.log)
        train_data, demo_val, cfg.T = demo
        val_data = demo_val if val_data is None else val_data
    elif val_data is None:
        val_data = ""  # the demo on your data validates only on a --val_data you name
    train_loader = DistributedShardedDataLoader(train_data, cfg.B, cfg.T, run.info.rank, world)
    val_loader = None
    if val_data:
        val_loader = DistributedShardedDataLoader(val_data, cfg.B, cfg.T, run.info.rank, world)
    for loader in [loader for loader in (train_loader, val_loader) if loader is not None]:
        loader.check_vocab(vocab_size)
    return train_loader, val_loader


# -----------------------------------------------------------------------------
# training: finetune in one process or under torchrun (DDP); checkpoints that resume exactly


@dataclass
class TrainConfig:
    """finetune's settings, a real run's defaults (runs.DEMO_SETTINGS for the demo). A resumed run
    takes the SAVED ones and must not contradict them, but for max_steps; the others may change."""
    train_data: Optional[str] = "tinystories/TinyStories_train_*.bin"  # token shards, a glob
    val_data: Optional[str] = "tinystories/TinyStories_val.bin"  # "": no validation
    finetune_type: str = "all"  # all, rmsnorm, no_embeddings (all but the vocab matrices), lora
    B: int = 4  # rows of a micro-batch
    T: int = 256  # tokens of a row
    total_batch_size: Optional[int] = None  # tokens a step; None: B * T * processes
    max_steps: int = 100
    learning_rate: float = 1e-5
    min_lr_ratio: float = 0.1  # where the cosine ends, as a fraction of learning_rate
    warmup_steps: Optional[int] = None  # None: a tenth of max_steps, at most 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    doc_mask: bool = True  # a packed row's documents attend only to themselves
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes
    lora_rank: int = 8  # lora: adapters on a frozen base (variants/lora.py)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(variants.lora.DEFAULT_TARGETS)
    quantize: str = "none"  # int8 or int4 with lora: QLoRA's frozen quantized base
    train_on_input: bool = False  # dialogs: every token a target, not the assistant's alone
    stop_after: Optional[int] = None  # stop early, at this step; the schedule ends at max_steps
    val_every: int = 50
    val_steps: int = 10
    save_every: int = 0  # 0: at the end only
    log_every: int = 1
    compile: bool = False  # torch.compile the training step
    checkpoint_activations: bool = False  # recompute each block in the backward pass
    device: Optional[str] = None
    dtype: Optional[str] = None  # bf16: autocast over fp32 weights
    seed: int = 1337
    tokenizer_path: Optional[str] = None
    sample_prompts: object = None  # greedy samples after training ([]: none)
    sample_len: int = 32
    eval_tasks: object = ""  # lm-eval tasks scored after training, into metrics.jsonl ("a,b")
    eval_limit: Optional[int] = None  # of each task's documents (None: all)
    eval_include_path: Optional[str] = None  # a folder of your own task YAMLs


# what a checkpoint keeps of its run's settings, and a resumed run goes on with
SAVED = ("train_data", "val_data", "finetune_type", "B", "T", "total_batch_size", "max_steps",
         "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "doc_mask",
         "fsdp", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quantize",
         "train_on_input")
MINIMUM = dict(B=1, T=1, total_batch_size=1, max_steps=1, learning_rate=0, min_lr_ratio=0,
               warmup_steps=0, weight_decay=0, grad_clip=0, lora_rank=1, lora_alpha=0,
               lora_dropout=0, stop_after=1, val_every=0, val_steps=1, save_every=0, log_every=1,
               eval_limit=1)
FINETUNE_TYPES = ("all", "rmsnorm", "no_embeddings", "lora")


def select_trainable(model: Transformer, finetune_type: str):
    """all: every parameter; rmsnorm: the norm gains; no_embeddings: all but the two vocab-sized
    matrices (most of a small model's memory); lora: the adapters (lora.py froze the rest)."""
    trains = {"rmsnorm": lambda name: name.endswith("norm.weight"),
              "lora": lambda name: ".lora_" in name,
              "no_embeddings": lambda name: not name.startswith(("tok_embeddings.", "output."))}
    for name, p in model.named_parameters():
        p.requires_grad_(trains[finetune_type](name) if finetune_type in trains else True)


def lr_at(step: int, max_steps: int, max_lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warmup, then cosine decay from max_lr to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def plan_run(given: dict, ckpt_dir, out_dir, resume, info: DistInfo, dev) -> runs.Run:
    """The run (runs.plan: settings, out dir, resume point) and its variants
    (variants.for_finetune), each checked (a one-line error) before the slow part starts."""
    adapters = variants.adapters_of(ckpt_dir) if ckpt_dir is not None and not resume else None
    if adapters:  # a fresh run from a LoRA checkpoint trains its adapters on
        given = {**given, **adapters.settings(given)}
    run = runs.plan(TrainConfig, runs.DEMO_SETTINGS, SAVED, given, ckpt_dir, out_dir, resume, info,
                    dev)
    cfg = run.cfg
    if cfg.finetune_type not in FINETUNE_TYPES:
        raise ConfigError(f"unknown finetune_type {cfg.finetune_type!r}; use one of "
                          f"{', '.join(FINETUNE_TYPES)}")
    variants.check_quantize(cfg.quantize, 32)
    if cfg.total_batch_size and cfg.total_batch_size % (cfg.B * cfg.T * info.world_size):
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of "
                          f"B*T*processes = {cfg.B}*{cfg.T}*{info.world_size}; change one of them")
    run.variants = variants.for_finetune(asdict(cfg), run.source, info.world_size, dev,
                                         select_trainable)
    if run.note:
        run.log(run.note)
    return run


def setup_training(run: runs.Run):
    """(Llama of the bare model, the model to call, optimizer, train loader, validation loader or
    None), restored to a resumed checkpoint's state."""
    cfg = run.cfg
    device = run.dev
    for v in run.variants:
        device = v.load_device(device)
    llama = load_checkpoint(run.source, cfg.tokenizer_path, device, torch.float32, cfg.quantize,
                            extra=run.variants, max_seq_len=max(cfg.T, 2048), max_batch_size=4)
    model = llama.model.train()
    model.checkpoint_activations = cfg.checkpoint_activations
    for v in run.variants:  # LoRA adds its adapters, FSDP shards what it has not
        v.prepare(model)
    select_trainable(model, cfg.finetune_type)
    train_loader, val_loader = training_data(run, llama.tokenizer, llama.chat_format,
                                             model.args.vocab_size)
    # after the data: the demo's T may be smaller now (a given total batch stays a multiple)
    step_tokens = cfg.B * cfg.T * run.info.world_size
    cfg.total_batch_size = cfg.total_batch_size or step_tokens
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           device_type=run.dev.type)
    if run.state is not None:
        runs.restore(run, model, optimizer, train_loader)
    else:
        torch.manual_seed(cfg.seed)
    wrapped = wrap_for_training(model, run.info, run.dev, run.variants, cfg.compile)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extras = ", FSDP" * cfg.fsdp + ", activation checkpointing" * cfg.checkpoint_activations
    run.log(f"finetune ({cfg.finetune_type}): {n_trainable / 1e6:.1f}M trainable parameters, "
            f"{run.info.world_size} process(es), grad_accum {cfg.total_batch_size // step_tokens}, "
            f"{cfg.total_batch_size} tokens/step, {train_loader.ntok_total} train tokens, "
            f"document masking {'on' if cfg.doc_mask else 'off'}{extras}")
    return llama, wrapped, optimizer, train_loader, val_loader


def wrap_for_training(model: Transformer, info: DistInfo, dev, chosen=(),
                      compile: bool = False) -> nn.Module:
    """A variant's own wrap (FSDP shards in place), else DDP for replicas; then torch.compile,
    PyTorch's order: around a compiled model DDP could not all-reduce before the whole backward."""
    wrapped = next((w for w in (v.wrap(model) for v in chosen) if w is not None), None)
    if wrapped is None and info.world_size > 1:
        wrapped = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    wrapped = model if wrapped is None else wrapped
    return torch.compile(wrapped) if compile else wrapped


def sample_after_training(run: runs.Run, llama: "Llama", optimizer, dtype):
    """Rank 0's greedy completions of --sample_prompts by the trained model; sharded, by a whole
    copy in the training dtype, gathered by every rank (whole_weights), given the variants'
    adapters (take_adapters)."""
    default = ["Once upon a time, a little dog"] if run.demo else DEFAULT_PROMPTS[:2]
    prompts = run.cfg.sample_prompts
    prompts = [prompts] if isinstance(prompts, str) else (prompts or default)
    model = llama.model
    for v in run.variants:
        weights = v.whole_weights(model, optimizer)
        if weights is None:
            continue
        if run.info.master:
            extra = [a for a in (w.take_adapters(weights) for w in run.variants) if a is not None]
            model = assemble(model.args, weights, run.out, "the gathered shards", run.dev, dtype,
                             extra)
        del weights
    if run.info.master:
        model.eval()  # dropout (LoRA's) off, as in any sampling
        trained = Llama(model, llama.tokenizer, llama.chat_format)
        completions = trained.text_completion(prompts, run.cfg.sample_len, temperature=0)
        for p, c in zip(prompts, completions):
            run.log(p + c + "\n" + "-" * 80)


def finetune(ckpt_dir: Optional[str] = None, resume=None, out_dir: Optional[str] = None,
             **settings):
    """Finetune a Meta or HF directory or a .gguf file on .bin token shards or dialogs (.jsonl),
    in one process or many (torchrun: DDP, or --fsdp); checkpoints in out_dir/step_NNNNNN,
    --resume latest goes on exactly, out_dir/metrics.jsonl and loss.png record it. Without
    --ckpt_dir or --resume, the demo (SmolLM2). The settings are TrainConfig's (--help lists
    them); --finetune_type lora trains adapters (--quantize int8|int4: QLoRA). Returns the
    losses, step and model."""
    given = {k: v for k, v in settings.items() if v is not None}
    runs.check_settings(TrainConfig, MINIMUM, given)
    info, dev = setup_distributed(given.get("device"))
    run = plan_run(given, ckpt_dir, out_dir, resume, info, dev)
    cfg = run.cfg
    dtype = resolve_dtype(cfg.dtype, dev)
    autocast = training_autocast(dtype, dev)
    llama, model, optimizer, train_loader, val_loader = setup_training(run)
    raw_model = llama.model
    mask_of = partial(document_mask, bos_id=llama.tokenizer.bos_id) if cfg.doc_mask else None
    grad_accum = cfg.total_batch_size // (cfg.B * cfg.T * info.world_size)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    peak = runs.peak_flops(dev, dtype)
    flops = runs.flops_per_token(raw_model, cfg.T)
    rope_freqs = rope_divisors(raw_model.args) if raw_model.args.use_scaled_rope else None
    stats = {"train_loss": None, "val_loss": None}
    step = run.step

    def validate():  # the bare model called (not forward_loss): a sharded one gathers in its hooks
        raw_model.eval()
        stats["val_loss"] = runs.mean_loss(raw_model, val_loader, cfg.val_steps, dev, autocast,
                                           mask_of, info)
        raw_model.train()
        runs.log_step(run, step, val_loss=stats["val_loss"])

    while step < run.last_stop:
        if val_loader is not None and cfg.val_every and step % cfg.val_every == 0:
            validate()
        t0 = time.time()
        lr = lr_at(step, cfg.max_steps, cfg.learning_rate, cfg.warmup_steps,
                   cfg.learning_rate * cfg.min_lr_ratio)
        loss, norm = train_step(model, optimizer, train_loader, grad_accum, lr, trainable,
                                cfg.grad_clip, mask_of, autocast, dev)
        stats["train_loss"] = all_reduce_mean(loss, info).item()  # .item() also waits for the GPU
        dt = time.time() - t0
        step += 1
        if step % cfg.log_every == 0 or step == run.last_stop:
            tps = cfg.total_batch_size / dt
            mfu = 100 * tps * flops / (peak * info.world_size) if peak else None
            runs.log_step(run, step, loss=stats["train_loss"], lr=lr, norm=norm.item(),
                          ms=dt * 1000, tokens_per_s=tps, mfu=mfu)
        if step == run.last_stop or (cfg.save_every and step % cfg.save_every == 0):
            runs.save_checkpoint(run, step, raw_model, optimizer, train_loader, llama.tokenizer,
                                 rope_freqs)
    if val_loader is not None and step == cfg.max_steps:
        validate()
    for v in run.variants:
        v.trained(run, llama, step)
    runs.plot_losses(run)
    if cfg.sample_prompts != []:
        sample_after_training(run, llama, optimizer, dtype)
    return {**stats, "step": step, "model": raw_model}


def train_step(model: nn.Module, optimizer, loader, grad_accum: int, lr: float, trainable,
               grad_clip: float, mask_of, autocast, dev):
    """One optimizer step over grad_accum micro-batches; returns (the summed loss, the gradient
    norm)."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=dev)
    ddp = isinstance(getattr(model, "_orig_mod", model), DDP)
    for micro in range(grad_accum):
        x, y, mask = next_batch(loader, dev, mask_of)
        # DDP all-reduces gradients only on the last micro-step (a compiled DDP model included); a
        # sharding wrap reduces on every one, or each process would hold a whole gradient meanwhile
        with model.no_sync() if ddp and micro < grad_accum - 1 else contextlib.nullcontext():
            with autocast:
                loss = model(x, y, mask=mask) / grad_accum
            loss.backward()
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if hasattr(norm, "full_tensor"):  # sharded: a distributed tensor
        norm = norm.full_tensor()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_sum, norm


# -----------------------------------------------------------------------------
# CLI: python llama31.py [--ckpt_dir DIR_OR_GGUF] [--chat] [--prompts '["..."]'] | finetune ...

def sample(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, prompts=None,
           temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int = 64,
           max_seq_len: int = 512,
           max_batch_size: Optional[int] = None, device: Optional[str] = None,
           dtype: Optional[str] = None, seed: int = 1, chat: Optional[bool] = None,
           stream: bool = True, rope_scale_factor: Optional[float] = None, compile: bool = False,
           quantize: Optional[str] = None, group_size: int = 32,
           draft_ckpt_dir: Optional[str] = None, draft_quantize: Optional[str] = None,
           speculate_k: int = 4):
    """Sample from a Meta or HF directory or a .gguf file: each prompt as its tokens arrive, or all
    as one batch (--nostream). Without --ckpt_dir, the demo model (SmolLM2-135M-Instruct) answers
    as a chat. --chat: prompts as user messages. --compile: slow first prompt, faster after.
    --quantize int8|int4|keep|none (--group_size for int4; a GGUF stays quantized but for none,
    the demo only with keep). --draft_ckpt_dir D and/or --draft_quantize Q: speculative
    decoding, D (default: the model's own weights) loaded as Q (default keep) proposing
    --speculate_k tokens at once (0: no draft; the demo drafts with its own 4-bit matrices
    unless told). Under torchrun, tensor parallel. Also: python llama31.py finetune, and the scripts
    chat.py, eval.py, export.py, shards.py, serve.py (each with --help)."""
    device, parallel = runs.start(device)  # first: under torchrun only rank 0 prints
    device = check_device(device or default_device())
    demo = ckpt_dir is None
    draft = variants.draft_of(draft_ckpt_dir, draft_quantize, speculate_k,
                              demo and quantize is None)
    if demo:
        ckpt_dir, quantize = runs.demo_checkpoint(quantize, drafted=draft is not None)
    chat = demo if chat is None else chat
    prompts = runs.check_prompts(prompts, chat)
    check_sampling_args(temperature, top_p, max_gen_len)  # before the (slow) load, not after
    check_number("max_seq_len", max_seq_len, int, 0)
    check_number("seed", seed, int, 0)
    check_number("max_batch_size", max_batch_size or 0, int, 0)
    t0 = time.time()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size or len(prompts),
                        device, dtype, rope_scale_factor, compile, quantize, group_size, parallel,
                        draft=draft)
    print(f"loaded {ckpt_dir} on {device} ({runs.describe(llama.model)}) in "
          f"{time.time() - t0:.1f}s", file=sys.stderr)
    if chat and llama.chat_format is None:
        raise ConfigError(f"{ckpt_dir} has no chat template in a format we know (Llama 3 headers "
                          f"or ChatML); drop --chat to complete text")
    generator = torch.Generator(device=device).manual_seed(seed)
    runs.print_samples(llama, prompts, chat, stream, max_gen_len, temperature, top_p, generator,
                       compile)


def main(argv=None):
    """python llama31.py [--ckpt_dir ...] samples; python llama31.py finetune [...] finetunes."""
    argv = sys.argv[1:] if argv is None else argv
    command, name = sample, "llama31.py"
    if argv[:1] == ["finetune"]:
        command, name, argv = finetune, "llama31.py finetune", argv[1:]
        if "--help" in argv or "-h" in argv:
            print(finetune.__doc__ + "\n\nsettings (TrainConfig):\n" +
                  "\n".join(f"  --{f.name} (default {f.default!r})" for f in fields(TrainConfig)))
            return
    elif argv[:1] and not argv[0].startswith("-") and not Path(argv[0]).exists():
        print(f"error: unknown command {argv[0]!r}; python llama31.py samples (--help), python "
              f"llama31.py finetune finetunes, and chat.py, eval.py, export.py, shards.py are "
              f"scripts of their own", file=sys.stderr)
        sys.exit(2)
    runs.cli(command, argv, name)


if __name__ == "__main__":
    main()
