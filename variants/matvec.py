"""
The CPU's one-row products: a faster path for y = x @ W.T when x is a single row (batch-1 decoding,
and the last position's logits after a prefill), where the product is matrix-vector.

- Eager, in bf16/fp16: oneDNN is turned off for the product. oneDNN's matrix-vector kernel reads
  the weights slower than PyTorch's own (fp32 goes to MKL either way).
- Compiled: written as multiply-and-sum, which Inductor makes one vectorized pass over the
  weights, several times faster than MKL's fp32 kernel.

bench.py's roof row measures all three. A variant as the others are: OneRow.loaded gives every
dense nn.Linear of a loaded CPU model this forward (its class becomes Linear; weights and
names stay), so llama31.py's layers stay plain nn.Linear. Imports nothing from llama31.py.
"""

import threading
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from variants import Variant


class Linear(nn.Linear):
    """nn.Linear (no bias) whose one-row CPU products take the faster path above."""

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


class OneRow(Variant):
    """The load variant (see llama31.load_checkpoint): after loading, every dense Linear of the
    model (quantized ones are left as they are) products its one-row inputs as above."""

    def loaded(self, model: nn.Module):
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = Linear
