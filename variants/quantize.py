"""
Weight-only quantization: the model's matrices kept in 8 or 4 bits, activations in the model's dtype.

    int8   one scale per output row, symmetric:  w = q * scale,                 q in -128..127
    int4   a scale and an offset per group of `group_size` inputs (32, 64 or 128):
                                                 w = (q - 8) * scale + zero,    q in 0..15
           (the grid of llama.cpp's Q4_0, Q4_1 and Q4_K, whose blocks are 32 wide: those GGUF
           tensors become int4 exactly, by re-expressing their block scales and minimums)

Each format runs on the fastest kernel PyTorch has for the device: on CPU aten's
_weight_int8pack_mm and _weight_int4pack_mm_for_cpu (they want bf16 activations: with fp32 ones
they run ~10x slower, so a quantized model defaults to bf16 on CPU, and fp32 products of 8 rows or
more dequantize the matrix 4096 rows at a time instead); on CUDA
_weight_int4pack_mm, and for int8 a product with the int8 matrix whose rows are scaled after
(what torch.compile fuses); elsewhere (MPS) the weights are dequantized for each product. Every
path is tested equal to dequantize-then-matmul.

The token embedding becomes an int8 table whose lookup dequantizes only the rows it gathers (4-bit
rows would need the CPU kernel's tile layout undone), and --quantize int4 keeps the output layer in
int8 too; a model with tied embeddings then keeps one int8 matrix for both. Modules are swapped in
by name (swap_modules) through llama31.load_checkpoint's hooks (Quantize, below), so this file
imports nothing from llama31.py.
"""

import functools
import sys
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ConfigError
from variants import Variant
from formats import Int4Values

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# the matrices a block multiplies by, and the output layer: what quantization replaces
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")


@dataclass
class Int8Values:
    """An int8 matrix: q (out, in) int8, scales (out,)."""
    q: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]


def int8_rows(w: torch.Tensor) -> Int8Values:
    """Symmetric int8 with one scale per row (the largest |w| maps to 127)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return Int8Values(torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8), scales)


def int4_groups(w: torch.Tensor, group_size: int) -> Int4Values:
    """Asymmetric int4 per group of inputs: each group's range split in 15 steps."""
    out_features, in_features = w.shape
    if in_features % group_size:
        fits = [str(g) for g in GROUP_SIZES if in_features % g == 0]
        raise ConfigError(f"int4 group size {group_size} does not divide a layer's {in_features} inputs; use "
                          + (f"a group size that does ({', '.join(fits)})" if fits else "--quantize int8"))
    groups = w.float().unflatten(1, (-1, group_size))
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-12) / 15
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
    return Int4Values(q, scales, lo + 8 * scales)


def check_mode(mode: Optional[str], group_size: int) -> Optional[str]:
    """"none" means no quantization (a GGUF file dequantizes to --dtype); None and "keep" keep a
    GGUF file's quantized tensors in their nearest format here (GGUF_KEEP) and quantize nothing else."""
    if mode in (None, "none", "keep"):
        return mode
    if mode not in MODES:
        raise ConfigError(f"unknown quantize {mode!r}; use int8, int4, keep or none")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size {group_size!r} is not one of {', '.join(map(str, GROUP_SIZES))}")
    return mode


# -----------------------------------------------------------------------------
# the modules: Linear's `weight` name kept, with its scales beside it


def int8_matmul(x, q, scales, kernel: bool):
    """x @ (q * scales[:, None]).T: aten's CPU kernel, or the int8 matrix cast to x's dtype with the
    rows scaled after (the form torch.compile fuses into one pass on CUDA)."""
    if kernel:
        rows = kernel_rows(x.reshape(-1, x.shape[-1]))
        out = torch.ops.aten._weight_int8pack_mm(rows, q, cast(scales, rows.dtype))
        return out.reshape(*x.shape[:-1], q.shape[0]).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * cast(scales, x.dtype)


def kernel_rows(x):
    """x's rows as aten's CPU int kernels take them. Made for bf16 (fp32 ones run ~10x slower), so
    an fp32 model's few rows of a decode step go in bf16 and their product comes back in fp32: its
    norms, attention and residual stream stay fp32. Only where no gradient flows (inference): a
    training step, or QLoRA's, keeps its rows as they are."""
    rows = x.contiguous()  # the kernels want rows in a row (a fused w13's half is not)
    if rows.dtype == torch.bfloat16 or torch.is_grad_enabled():
        return rows
    return rows.to(torch.bfloat16)


def cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """t in dtype; a parameter's copy kept on the tensor (redone when t changes), since a decode
    step would otherwise convert every matrix's scales on every product."""
    if t.dtype == dtype or torch.compiler.is_compiling():
        return t.to(dtype)
    kept = getattr(t, "_cast", None)
    if kept is None or kept[0] != (dtype, t._version):
        kept = ((dtype, t._version), t.to(dtype))
        t._cast = kept
    return kept[1]


# aten's CPU int kernels are made for a few rows of bf16 activations: with fp32 ones their time
# grows with the rows as if unvectorized (128 rows through the 1B shape's int8 output matrix: 49 s,
# against 2.3 s dense). From FEW_ROWS rows on, a product in another dtype than bf16 dequantizes
# W ROWS_AT_ONCE rows at a time instead (a prefill, a training step)
FEW_ROWS = 8


def by_blocks(x, module):
    """x @ W.T with W dequantized ROWS_AT_ONCE rows at a time, never whole in x's dtype."""
    return torch.cat([F.linear(x, module.dequantize(lo, lo + ROWS_AT_ONCE).to(x.dtype))
                      for lo in range(0, module.out_features, ROWS_AT_ONCE)], dim=-1)


def kernel_fits(x) -> bool:
    return x.dtype == torch.bfloat16 or x.numel() < FEW_ROWS * x.shape[-1]


class Int8Linear(nn.Module):
    """y = x @ (q * scales[:, None]).T, q int8 (out, in)."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @staticmethod
    def buffers_for(values: Union[torch.Tensor, Int8Values], device, dtype) -> Dict[str, torch.Tensor]:
        values = values if isinstance(values, Int8Values) else int8_rows(values)
        return {"weight": values.q.to(device), "scales": values.scales.to(device, dtype)}

    def forward(self, x):
        if x.device.type == "cpu" and not kernel_fits(x):
            return by_blocks(x, self)
        return int8_matmul(x, self.weight, self.scales, kernel=x.device.type == "cpu")

    def dequantize(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Rows lo..hi of the matrix in fp32 (all of it by default)."""
        return Int8Values(self.weight[lo:hi], self.scales[lo:hi]).dequantize()

    @classmethod
    def joined(cls, parts: List["Int8Linear"], check: bool = False):
        """One module holding the rows of parts, in order (fused.py); check: whether they can be."""
        first = parts[0]
        if check:
            return all((p.in_features, p.scales.dtype, p.weight.device) ==
                       (first.in_features, first.scales.dtype, first.weight.device) for p in parts)
        new = cls(first.in_features, sum(p.out_features for p in parts), first.scales.dtype, "meta")
        new.weight, new.scales = torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts])
        return new

    def rows(self, lo: int, hi: int) -> "Int8Linear":
        """Rows lo..hi as a module of their own (views)."""
        new = Int8Linear(self.in_features, hi - lo, self.scales.dtype, "meta")
        new.weight, new.scales = self.weight[lo:hi], self.scales[lo:hi]
        return new


class Int4Linear(nn.Module):
    """y = x @ W.T, W = (q - 8) * scale + zero per group of group_size inputs. weight holds q two
    per byte in the layout of the device's kernel (CPU: aten's tiles, which need out % 16 == 0;
    CUDA: aten's int32 tiles; other devices and shapes: plain, low nibble first);
    scales_and_zeros is (in / group_size, out, 2), as the kernels take it."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.bfloat16, device=None,
                 layout: str = "plain"):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = layout
        shape = (out_features, in_features // 2)
        if layout == "cuda":  # the kernel's int32 tiles: their shape, from its meta function
            shape = torch.ops.aten._convert_weight_to_int4pack(torch.empty(shape, dtype=torch.uint8, device="meta"),
                                                               cuda_k_tiles(in_features)).shape
        self.register_buffer("weight", torch.empty(shape, dtype=torch.uint8 if layout != "cuda" else torch.int32,
                                                   device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype,
                                                             device=device))
        # how this machine's aten packs (None: unknown, read back through its kernel), found once
        self.cpu_layout = cpu_int4_layout(torch.backends.cpu.get_cpu_capability()) if layout == "cpu" else None

    @staticmethod
    def layout_for(device, in_features: int, out_features: int, dtype=torch.bfloat16) -> str:
        device = torch.device(device)
        if device.type == "cpu" and out_features % 16 == 0:
            return "cpu"
        # CUDA's kernel takes and gives bf16 only
        if device.type == "cuda" and dtype == torch.bfloat16 and out_features % 8 == 0 and in_features % 32 == 0:
            return "cuda"
        return "plain"

    @staticmethod
    def buffers_for(values: Union[torch.Tensor, Int4Values], group_size: int, layout: str, device,
                    dtype) -> Dict[str, torch.Tensor]:
        values = values if isinstance(values, Int4Values) else int4_groups(values, group_size)
        if values.group_size != group_size:
            raise ConfigError(f"int4 values in groups of {values.group_size}, but the layer wants {group_size}")
        q = values.q
        if layout == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        elif layout == "cuda":  # this kernel wants the even column in the high nibble
            packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(device),
                                                                cuda_k_tiles(q.shape[1]))
        else:
            packed = (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        sz = torch.stack([values.scales, values.zeros], dim=-1).transpose(0, 1).contiguous()
        return {"weight": packed.to(device), "scales_and_zeros": sz.to(device, dtype)}

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.layout == "cpu" and kernel_fits(x2):
            rows = kernel_rows(x2)
            sz = cast(self.scales_and_zeros, rows.dtype)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, sz)
        elif self.layout == "cuda":
            sz = cast(self.scales_and_zeros, x.dtype)
            out = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.weight, self.group_size, sz)
        else:
            out = by_blocks(x2, self)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Rows lo..hi of the matrix in fp32 (all of it by default). CUDA's tiles are not undone
        here: run the kernel on an identity matrix instead (x = I gives W^T)."""
        return self.values(lo, hi).dequantize()

    def values(self, lo: int = 0, hi: Optional[int] = None) -> Int4Values:
        """Rows lo..hi unpacked: their 4-bit values, scales and zeros."""
        hi = self.out_features if hi is None else hi
        if self.layout == "cpu":
            q = cpu_int4_values(self.weight, self.in_features, self.group_size, lo, hi, self.cpu_layout)
        elif self.layout == "plain":
            q = torch.stack([self.weight[lo:hi] & 15, self.weight[lo:hi] >> 4], dim=-1).flatten(1)
        else:
            raise ConfigError(f"dequantize reads the plain and CPU int4 layouts, not {self.layout}'s")
        sz = self.scales_and_zeros[:, lo:hi].transpose(0, 1)
        return Int4Values(q, sz[..., 0], sz[..., 1])

    @classmethod
    def joined(cls, parts: List["Int4Linear"], check: bool = False):
        """One module holding the rows of parts, in order, packed again (fused.py); check: whether
        they can be (CUDA's tiles are not unpacked here)."""
        first = parts[0]
        key = (first.in_features, first.group_size, first.layout, first.scales_and_zeros.dtype, first.weight.device)
        if check:
            return first.layout != "cuda" and all((p.in_features, p.group_size, p.layout, p.scales_and_zeros.dtype,
                                                   p.weight.device) == key for p in parts)
        values = [p.values() for p in parts]
        q, scales, zeros = (torch.cat([getattr(v, f) for v in values]) for f in ("q", "scales", "zeros"))
        return first.holding(Int4Values(q, scales, zeros))

    def rows(self, lo: int, hi: int) -> "Int4Linear":
        """Rows lo..hi as a module of their own, packed again."""
        return self.holding(self.values(lo, hi))

    def holding(self, values: Int4Values) -> "Int4Linear":
        """A module like this one (group, layout, dtype, device) holding values."""
        dtype, device = self.scales_and_zeros.dtype, self.weight.device
        new = Int4Linear(self.in_features, values.q.shape[0], self.group_size, dtype, "meta", self.layout)
        for name, buffer in self.buffers_for(values, self.group_size, self.layout, device, dtype).items():
            setattr(new, name, buffer)
        return new


# -----------------------------------------------------------------------------
# reading aten's CPU int4 packing back: its layout depends on the machine


class CpuInt4Layout(NamedTuple):
    """How _convert_weight_to_int4pack_for_cpu packs a (out, in) matrix of 4-bit values: blocks of
    `block` rows, each block stored input column by input column (block / 2 bytes a column). In a
    whole block of a `split` layout byte j holds row j (low nibble) and row j + block / 2 (high);
    otherwise, and in a last block of fewer rows, byte j holds rows 2j (low) and 2j + 1 (high)."""
    block: int
    split: bool


# aten's weight_to_int4pack_kernel (int4mm_kernel.cpp, torch 2.6-2.13) packs blocks of 4 float
# vectors: AVX-512 64 rows split, AVX2 32 rows split, every other build (DEFAULT, ARM, POWER, s390x)
# 32 rows in pairs. The capability's own layout is tried first; the others follow in case a torch
# packs differently, and the probe (cpu_int4_layout) decides.
CPU_INT4_LAYOUTS = {"AVX512": CpuInt4Layout(64, True), "AVX2": CpuInt4Layout(32, True),
                    "DEFAULT": CpuInt4Layout(32, False)}
CPU_INT4_GUESSES = (CpuInt4Layout(64, False), CpuInt4Layout(16, False), CpuInt4Layout(16, True))


def unpack_int4_cpu(packed: torch.Tensor, in_features: int, layout: CpuInt4Layout) -> torch.Tensor:
    """q (rows, in) uint8 from rows of aten's CPU packing in `layout`, starting at a block (the
    rows given end at a block's end or at the matrix's last row)."""
    rows, block = packed.shape[0], layout.block
    full = rows // block * block
    cols = packed.reshape(-1)[:full * in_features // 2].reshape(-1, in_features, block // 2)  # block, column, byte
    low, high = cols & 15, cols >> 4
    if layout.split:
        q = torch.cat([low, high], dim=-1)  # rows j and j + block / 2
    else:
        q = torch.stack([low, high], dim=-1).flatten(2)  # rows 2j and 2j + 1
    q = q.transpose(1, 2).reshape(full, in_features)
    if full < rows:
        tail = packed.reshape(-1)[full * in_features // 2:].reshape(in_features, -1)
        q = torch.cat([q, torch.stack([tail & 15, tail >> 4], dim=-1).flatten(1).T])
    return q


@functools.lru_cache(maxsize=None)
def cpu_int4_layout(capability: str) -> Optional[CpuInt4Layout]:
    """The layout this process's aten packs in, found the first time one is read back: known values
    packed by aten and unpacked in each candidate layout (the capability's first) until one gives
    them back. None, with a note on stderr, when none does (read_back_through_kernel then)."""
    probe = torch.randint(0, 16, (176, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    shapes = [(176, 64), (160, 96), (144, 32), (48, 64), (16, 64)]  # whole blocks and every tail of 64 rows
    packed = [(probe[:o, :i], torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe[:o, :i].contiguous(), 2))
              for o, i in shapes]
    first = CPU_INT4_LAYOUTS.get(capability, CPU_INT4_LAYOUTS["DEFAULT"])
    for layout in dict.fromkeys((first, *CPU_INT4_LAYOUTS.values(), *CPU_INT4_GUESSES)):
        if all(torch.equal(unpack_int4_cpu(p, q.shape[1], layout), q.to(torch.uint8)) for q, p in packed):
            return layout
    print(f"note: this torch ({torch.__version__}, CPU capability {capability}) packs int4 in a layout "
          "quantize.py does not know; its matrices are read back through aten's own kernel (slower)",
          file=sys.stderr)
    return None


def read_back_through_kernel(packed: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """q (out, in) of a CPU-packed matrix in any layout, through aten's own kernel: rows of the
    identity times the matrix with every scale 1 and zero 8 are q's columns, exactly (0..15 in bf16)."""
    ones_eights = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(in_features // group_size, packed.shape[0], 2)
    ones_eights = ones_eights.contiguous()
    cols = [torch.ops.aten._weight_int4pack_mm_for_cpu(F.one_hot(torch.arange(lo, min(lo + 256, in_features)),
                                                                 in_features).to(torch.bfloat16),
                                                       packed, group_size, ones_eights)
            for lo in range(0, in_features, 256)]
    return torch.cat(cols).T.to(torch.uint8)


def cpu_int4_values(packed: torch.Tensor, in_features: int, group_size: int, lo: int, hi: int,
                    layout: Optional[CpuInt4Layout]) -> torch.Tensor:
    """q of rows lo..hi of a CPU-packed matrix in `layout` (None: read back through the kernel):
    the blocks that hold them are unpacked, and the rows cut from those."""
    if layout is None:
        return read_back_through_kernel(packed, in_features, group_size)[lo:hi]
    first = lo // layout.block * layout.block
    last = min(-(-hi // layout.block) * layout.block, packed.shape[0])
    return unpack_int4_cpu(packed[first:last], in_features, layout)[lo - first:hi - first]


def cuda_k_tiles(in_features: int) -> int:
    return 8 if in_features % 128 == 0 else 4 if in_features % 64 == 0 else 2


class Int8Embedding(nn.Module):
    """The token table in int8 with one scale per token; a lookup dequantizes the rows it gathers."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    buffers_for = Int8Linear.buffers_for

    def forward(self, tokens):
        return self.weight[tokens].to(self.dtype) * self.scales[tokens, None].to(self.dtype)


# -----------------------------------------------------------------------------
# swapping them into a model (built on the meta device, before its weights are loaded)

Plan = Dict[str, Tuple]  # module name -> ("int8",) | ("int4", group_size) | ("int8-embedding",)


def linear_names(n_layers: int):
    return [f"layers.{i}.{name}" for i in range(n_layers) for name in LINEARS] + ["output"]


def plan_for(n_layers: int, mode: str, group_size: int = 32) -> Plan:
    """Every Linear of the blocks in `mode`; the output layer and the token embedding in int8 (the
    output matrix is where 4 bits cost most: llama.cpp's Q4_K_M keeps it at 6)."""
    plan = {name: (mode, group_size) if mode == "int4" else ("int8",) for name in linear_names(n_layers)}
    plan["output"] = ("int8",)
    plan["tok_embeddings"] = ("int8-embedding",)
    return plan


# What a GGUF file's tensor types are kept as when no --quantize is given: the nearest format a
# kernel here runs. The 4-bit block types become int4 (Q4_0, Q4_1, Q4_K exactly: the same grid;
# Q2_K and Q3_K re-quantized from their values); 5-, 6- and 8-bit ones int8 with one scale per row
# (re-scaled from their blocks); F32, F16 and BF16 stay dense in the model's dtype.
GGUF_KEEP = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q2_K": "int4", "Q3_K": "int4", "Q5_0": "int8",
             "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "Q8_0": "int8"}
EXACT = ("Q4_0", "Q4_1", "Q4_K")


def plan_for_gguf(n_layers: int, types: Dict[str, str]) -> Tuple[Plan, str]:
    """The plan that keeps a GGUF file's quantized tensors quantized, and a line saying how."""
    plan, kept = {}, {}
    for name in linear_names(n_layers):
        kind = types.get(f"{name}.weight") or types.get("tok_embeddings.weight")  # no output: tied
        if kind in GGUF_KEEP:
            plan[name] = ("int4", 32) if GGUF_KEEP[kind] == "int4" else ("int8",)
            kept[kind] = kept.get(kind, 0) + 1
    if types.get("tok_embeddings.weight") in GGUF_KEEP:
        plan["tok_embeddings"] = ("int8-embedding",)
    how = [f"{n} {kind} as {GGUF_KEEP[kind]}" + (" (the same grid)" if kind in EXACT else
                                                   " (one scale per row)" if GGUF_KEEP[kind] == "int8" else
                                                   " (re-quantized)") for kind, n in sorted(kept.items())]
    return plan, "matrices kept quantized: " + ", ".join(how) if how else ""


def swap_modules(model: nn.Module, plan: Plan, device, dtype):
    """Replace the modules the plan names with quantized ones (empty; load_state_dict fills them)."""
    for name, spec in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if spec[0] == "int8-embedding":
            new = Int8Embedding(old.num_embeddings, old.embedding_dim, dtype, "meta")
        elif spec[0] == "int8":
            new = Int8Linear(old.in_features, old.out_features, dtype, "meta")
        else:
            new = Int4Linear(old.in_features, old.out_features, spec[1], dtype, "meta",
                             Int4Linear.layout_for(device, old.in_features, old.out_features, dtype))
        setattr(parent, child, new)


ROWS_AT_ONCE = 4096  # rows quantized together: the most of a matrix ever held in full precision


def by_rows(value, quantize_rows):
    """quantize_rows applied to ROWS_AT_ONCE rows at a time (the formats are per row, so this is
    exact), reading only those rows of a memory-mapped tensor or of a lazy one that can."""
    n = value.shape[0]
    read = value.read_rows if hasattr(value, "read_rows") else None
    if read is None and hasattr(value, "read"):
        value = value.read()
    parts = [quantize_rows(read(lo, min(lo + ROWS_AT_ONCE, n)) if read else value[lo:lo + ROWS_AT_ONCE])
             for lo in range(0, n, ROWS_AT_ONCE)]
    return type(parts[0])(*(torch.cat(fields) for fields in zip(*(vars(p).values() for p in parts))))


def quantized_state(model: nn.Module, plan: Plan, key: str, value, device, dtype) -> Dict[str, torch.Tensor]:
    """One entry of a state dict as the buffers of the module that holds it, converted on its own,
    so that at most ROWS_AT_ONCE rows of one matrix exist in full precision at once. value: a
    tensor, or a lazy one from formats.py (read() gives its values, read_rows() some rows; for
    GGUF's 4-bit blocks read_int4() gives int4 values)."""
    name, _, leaf = key.rpartition(".")
    module = model.get_submodule(name) if name in plan and leaf == "weight" else None
    if module is None:
        return {key: (value.read() if hasattr(value, "read") else value).to(device=device, dtype=dtype)}
    if isinstance(module, Int4Linear):
        if getattr(value, "read_int4", None) and module.group_size == 32:
            value = value.read_int4()
        else:
            value = by_rows(value, lambda w: int4_groups(w, module.group_size))
        buffers = Int4Linear.buffers_for(value, module.group_size, module.layout, device, dtype)
    else:
        buffers = Int8Linear.buffers_for(by_rows(value, int8_rows), device, dtype)
    return {f"{name}.{k}": v for k, v in buffers.items()}


def tie(model: nn.Module):
    """A model with tied embeddings whose output and embedding are both int8: one matrix for both."""
    if isinstance(model.output, Int8Linear) and isinstance(model.tok_embeddings, Int8Embedding):
        model.tok_embeddings.weight, model.tok_embeddings.scales = model.output.weight, model.output.scales


# -----------------------------------------------------------------------------
# the load variant: llama31.load_checkpoint's hooks


class Quantize(Variant):
    """mode int8 or int4 (groups of group_size): every block's matrix quantized as it loads, the
    output layer and the token table in int8 (plan_for); None or "keep": a GGUF file's quantized
    tensors kept in their nearest format here (plan_for_gguf), said in one line on stderr."""

    def __init__(self, mode: Optional[str], group_size: int = 32):
        self.mode, self.group_size, self.table = check_mode(mode, group_size), group_size, None

    def planned(self, n_layers: int, ckpt) -> Plan:
        if self.table is None and self.mode in MODES:
            self.table = plan_for(n_layers, self.mode, self.group_size)
        elif self.table is None:
            self.table, how = plan_for_gguf(n_layers, getattr(ckpt, "tensor_types", None) or {})
            if how:
                print(f"note: {ckpt.where.name}: {how}; --quantize none dequantizes them to --dtype", file=sys.stderr)
        return self.table

    def plan(self, args, ckpt, device) -> Optional[str]:
        # the int kernels run ~10x slower with fp32 activations on CPU than with bf16 ones
        planned = self.planned(args.n_layers, ckpt)
        return "bf16" if planned and torch.device(device).type == "cpu" else None

    def swap(self, model: nn.Module, ckpt, device, dtype):
        plan = self.planned(len(model.layers), ckpt)
        if dtype == torch.float32 and torch.device(device).type == "cpu" and plan:
            # aten's CPU int kernels are ~10-30x slower on fp32 rows than on bf16 ones (kernel_rows)
            print("note: in an fp32 model on a CPU the int8/int4 products take their decoding rows in bf16 "
                  "(the kernels' fast path; a prompt's many rows stay fp32); --quantize none is exact fp32",
                  file=sys.stderr)
        swap_modules(model, plan, device, dtype)

    def convert(self, model: nn.Module, key: str, value, device, dtype) -> Optional[Dict[str, torch.Tensor]]:
        name, _, leaf = key.rpartition(".")
        if name in self.table and leaf == "weight":
            return quantized_state(model, self.table, key, value, device, dtype)
        return None

    def loaded(self, model: nn.Module):
        if model.args.tie_embeddings:
            tie(model)
