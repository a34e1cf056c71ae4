"""
Generation through torch.compile (--compile): Inductor fuses the norms, RoPE and SwiGLU, and Python
runs once per call instead of once per op.

- Prefill: the model's logits() compiled with dynamic=True: for one row, one graph serves every
  prompt length; a batch of rows and a chunk after a cached prefix get their own.
- Decoding: one token per row at a position held in a tensor, attending over the whole
  fixed-length KV cache with the positions after it masked (decode_step), so that the shapes
  never change from one step to the next: one graph, which CUDA graphs replay on CUDA
  (mode="reduce-overhead"; gpt-fast's layout). Its caches, (max_batch_size, max_seq_len), are made
  once and kept between generations, at fixed addresses.

Each compiles on first use (a minute or more on a CPU; seconds once Inductor's on-disk cache holds
it). On a CPU only decoding is compiled (compile_inference). Training stays eager. compile_inference
plugs this into a llama31.Llama: its model's logits() becomes the compiled prefill and its decoder
a StaticDecoder (generate_stream's decoder: caches(), logits()). Imports nothing from llama31.py.
"""

import os
import sys
import tempfile
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch

from variants import Variant


def inductor_options() -> dict:
    options = {}
    if hasattr(torch._inductor.config, "realize_cpu_opcount_threshold"):
        # store each normed activation before a matmul reads it; by default Inductor may
        # recompute it inside the multiply-and-sum loop, once per weight row (bf16: ~12%)
        options["realize_cpu_opcount_threshold"] = 8
    return options


def compile_inference(llama, prefill: Optional[bool] = None):
    """Compile a loaded Llama's decoding and, unless on a CPU (prefill None) or prefill=False, its
    prefill (above); returns it. On a CPU a prefill is bound by its products, so compiling it
    gains nothing and doubles the wait for the first token (docs/benchmarks.md). Says on stderr
    why the first prompt waits, and where the wait is kept."""
    model = llama.model
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "torchinductor_<user>")
    print(f"note: --compile: decoding compiles on first use, a minute or more on a CPU the first time; Inductor's "
          f"cache ({cache}) keeps it, so the next run of this model and shapes waits seconds", file=sys.stderr)
    llama.decoder = StaticDecoder(model, eager=llama.decoder)
    if prefill is False or (prefill is None and model.norm.weight.device.type == "cpu"):
        return llama
    prefill = torch.compile(model.logits, dynamic=True, options=inductor_options())

    def logits(tokens, start_pos=0, mask=None, last=0):
        # eagerly, what would make a compiled call compile again: the tables' first move, and a
        # view into generate's (batch, prompt + new tokens) buffer, whose stride the graph checks
        model.rope_tables(tokens.device)
        return prefill(tokens.clone(memory_format=torch.contiguous_format), start_pos, mask, last)

    model.logits = logits
    return llama


def eager(llama):
    """Undo compile_inference: eager prefill and decoding again (the kept caches let go)."""
    llama.model.__dict__.pop("logits", None)
    llama.decoder = getattr(llama.decoder, "eager", llama.decoder)
    return llama


def decode_step(model, tokens, pos):
    """Logits (B, vocab), fp32, of one token per row (tokens: B, 1) at position pos, a one-element
    tensor on the model's device, attending over the whole installed cache with the positions
    after pos masked."""
    cache = model.layers[0].attention.cache
    mask = (torch.arange(cache.k.shape[2], device=tokens.device) <= pos).view(1, 1, 1, -1)  # (B, H, T, S)
    return type(model).logits(model, tokens, pos, mask)[:, -1]


class StaticDecoder:
    """generate_stream's decoder for a compiled model: one-token steps through the compiled
    decode_step over caches kept between calls; longer chunks (a prompt) through the compiled
    prefill."""

    def __init__(self, model, compile: bool = True, eager=None):
        self.model, self.kept, self.inputs, self.eager = model, None, None, eager  # eager: the decoder it replaced
        self.step = partial(decode_step, model)  # compile=False: eager, the same steps (tests)
        if compile:  # Inductor takes a mode or options, not both
            cuda = model.norm.weight.device.type == "cuda"
            self.step = torch.compile(self.step, dynamic=False,
                                      **({"mode": "reduce-overhead"} if cuda else {"options": inductor_options()}))

    @contextmanager
    def caches(self, batch_size: int, total_len: int):
        """Install the kept caches, (max_batch_size, max_seq_len), made on first use, so that CUDA
        graphs replay on the same addresses (a smaller batch uses the first rows); put back after
        whatever caches were installed before."""
        model = self.model
        before = [layer.attention.cache for layer in model.layers]
        if self.kept is None or self.kept[0].k.dtype != model.norm.weight.dtype:
            model.setup_caches(model.args.max_batch_size, model.args.max_seq_len)
            self.kept = [layer.attention.cache for layer in model.layers]
            for cache in self.kept:
                for t in (cache.k, cache.v):
                    # read and written where it is, not copied in (transformers' StaticCache does this)
                    torch._dynamo.mark_static_address(t)
        for layer, cache in zip(model.layers, self.kept):
            layer.attention.cache = cache
        model.rope_tables(model.norm.weight.device)  # moved here, eagerly, not inside the compiled step
        try:
            yield
        finally:
            for layer, cache in zip(model.layers, before):
                layer.attention.cache = cache

    def logits(self, tokens, start_pos: int):
        """(B, vocab) logits of the last of tokens (B, T) at positions start_pos.. ."""
        if tokens.shape[1] > 1:
            return self.model.forward_inference(tokens, start_pos, last=1)[:, -1]
        if self.inputs is None or self.inputs[0].shape[0] != tokens.shape[0]:
            self.inputs = tokens.new_empty(tokens.shape[0], 1), tokens.new_empty(1)
        step_in, step_pos = self.inputs  # copied: a view's strides vary with the generation's length
        return self.step(step_in.copy_(tokens), step_pos.fill_(start_pos))


class Compiled(Variant):
    """The sampling variant (llama31.Llama.build --compile): compile_inference on a loaded Llama."""

    def sampling(self, llama):
        compile_inference(llama)
