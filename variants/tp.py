"""
Tensor parallelism for sampling under torchrun: each process holds a slice of every layer, read
straight from Meta's model-parallel files (or an HF checkpoint) memory-mapped, and the processes
combine their results as Meta's fairscale layers do.

    torchrun --nproc_per_node 8 llama31.py --ckpt_dir Meta-Llama-3.1-70B --temperature 0

How a model is cut over N processes (Megatron's split, the one Meta's files are already in):

    column-parallel  wq wk wv w1 w3   a process's own heads / hidden units: rows of the weight
    row-parallel     wo w2            the matching columns; their outputs summed (one all-reduce
                                      per attention and one per feed-forward)
    vocab-parallel   tok_embeddings   rows of the vocabulary: each token's row is looked up by the
                                      process holding it, the others add zeros (one all-reduce)
                     output           rows of the vocabulary: each process's logits gathered
    replicated       the norms; a KV head, on every process whose query heads read it, when there
                     are more processes than KV heads

The model is built full-size on the meta device, then cut here (shard_modules): attention's
n_heads and n_kv_heads become the local counts, so the forward pass, the KV cache and the
quantized modules are the model's own, only smaller. connect then adds the collectives: forward
hooks on each block's attention and feed_forward, and the embedding's and output's forward.

Collectives are PyTorch's functional ones (torch.distributed._functional_collectives, as
gpt-fast's tp.py uses them), on NCCL with CUDA and gloo on CPU, held by the group's name (a model
never keeps a process group alive). DTensor (torch.distributed.tensor.parallel) runs on gloo too,
but its dispatch on every op costs several times a one-row step's collective
(docs/tensor-parallel.md has the figures), and it shards Parameters, not the int8/int4 buffers
quantize.py swaps in. Cutting the modules ourselves keeps quantization, the KV cache and
torch.compile the model's own.

fsdp.py reads the same way for finetune --fsdp (load_shards): there FSDP shards every weight by rows,
and each process reads only its rows, from the memory-mapped file, onto its device.

This file imports nothing from llama31.py: it takes modules by Meta's names and args by duck
typing (n_heads, n_kv_heads, head_dim, ffn_hidden_dim, vocab_size, dim).
"""

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

import formats
import runs
from errors import ConfigError
from variants import Variant

# Meta's names for how each weight is cut, and along which dimension (0: rows, 1: columns)
COLUMN, ROW = formats.COLUMN_PARALLEL, formats.ROW_PARALLEL
VOCAB = ("tok_embeddings", "output")


# -----------------------------------------------------------------------------
# the layout: which heads, hidden units and vocabulary rows each process holds


@dataclass(frozen=True)
class Layout:
    rank: int
    world: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, args, rank: int, world: int, where) -> "Layout":
        """This process's share of a model; a ConfigError, before any weight is read, if `world`
        processes cannot split it."""
        layout = cls(rank, world, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_hidden_dim, args.vocab_size)
        if not layout.splits(world):
            fits = [n for n in range(1, 2 * args.n_heads + 1) if layout.splits(n)]
            raise ConfigError(f"{world} processes cannot split the model of {where} ({args.n_heads} heads, "
                              f"{args.n_kv_heads} KV heads, FFN width {args.ffn_hidden_dim}, vocabulary "
                              f"{args.vocab_size}); run --nproc_per_node {' or '.join(map(str, fits))}")
        return layout

    def splits(self, n: int) -> bool:
        kv_ok = self.n_kv_heads % n == 0 or n % self.n_kv_heads == 0
        return self.n_heads % n == 0 and kv_ok and self.hidden % n == 0 and self.vocab % n == 0

    def share(self, total: int) -> Tuple[int, int]:
        """This process's even share lo..hi of `total`."""
        return self.rank * total // self.world, (self.rank + 1) * total // self.world

    @property
    def kv_heads(self) -> Tuple[int, int]:
        """The KV heads this process's query heads read: its share, or the one it shares with
        world / n_kv_heads processes when there are fewer KV heads than processes."""
        if self.world <= self.n_kv_heads:
            return self.share(self.n_kv_heads)
        head = self.rank * self.n_kv_heads // self.world
        return head, head + 1

    def local_shape(self, key: str, full: torch.Size) -> torch.Size:
        dim, (lo, hi) = self.ranges(key)
        if dim is None:
            return full
        shape = list(full)
        shape[dim] = hi - lo
        return torch.Size(shape)

    def ranges(self, key: str) -> Tuple[Optional[int], Tuple[int, int]]:
        """(dimension cut, (lo, hi) along it) of a weight, in the full model's rows or columns."""
        name = key.removesuffix(".weight")
        hd = self.head_dim
        if name.endswith(("attention.wq", "attention.wo")):
            lo, hi = self.share(self.n_heads)
            return (0 if name.endswith("wq") else 1), (lo * hd, hi * hd)
        if name.endswith(("attention.wk", "attention.wv")):
            lo, hi = self.kv_heads
            return 0, (lo * hd, hi * hd)
        if name.endswith(("feed_forward.w1", "feed_forward.w3", "feed_forward.w2")):
            return (1 if name.endswith("w2") else 0), self.share(self.hidden)
        if name in VOCAB:
            return 0, self.share(self.vocab)
        return None, (0, 0)


# -----------------------------------------------------------------------------
# cutting a model built on the meta device, and connecting the pieces


def resize(module: nn.Module, rows: Optional[int] = None, cols: Optional[int] = None):
    """A Linear's or Embedding's weight made (rows, cols) on the meta device, sizes updated."""
    w = module.weight
    shape = (rows or w.shape[0], cols or w.shape[1])
    module.weight = nn.Parameter(torch.empty(shape, dtype=w.dtype, device="meta"), requires_grad=w.requires_grad)
    if isinstance(module, nn.Embedding):
        module.num_embeddings = shape[0]
    else:
        module.out_features, module.in_features = shape


def shard_modules(model: nn.Module, layout: Layout):
    """Cut a model built full-size on the meta device to this process's slices (before quantized
    modules are swapped in and the weights are loaded)."""
    tied = model.output.weight is model.tok_embeddings.weight
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        for module, key in [(att.wq, "attention.wq"), (att.wk, "attention.wk"), (att.wv, "attention.wv"),
                            (att.wo, "attention.wo"), (ffn.w1, "feed_forward.w1"), (ffn.w2, "feed_forward.w2"),
                            (ffn.w3, "feed_forward.w3")]:
            dim, (lo, hi) = layout.ranges(key)
            resize(module, rows=hi - lo) if dim == 0 else resize(module, cols=hi - lo)
        att.n_heads = att.wq.out_features // layout.head_dim
        att.n_kv_heads = att.wk.out_features // layout.head_dim
    lo, hi = layout.share(layout.vocab)
    resize(model.tok_embeddings, rows=hi - lo)
    resize(model.output, rows=hi - lo)
    if tied:
        model.output.weight = model.tok_embeddings.weight


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = funcol.all_reduce(x, "sum", group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    out = funcol.all_gather_single(x, x.dim() - 1, group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def connect(model: nn.Module, layout: Layout, group=None):
    """The collectives, on the loaded (and maybe quantized) modules: the sum of each attention's
    and feed-forward's partial outputs, the vocab-parallel embedding, the gathered logits."""
    group = (group or dist.group.WORLD).group_name  # by name: a model never keeps the group alive

    def summed(module, inputs, output):
        return all_reduce(output, group)

    for block in model.layers:
        block.attention.register_forward_hook(summed)
        block.feed_forward.register_forward_hook(summed)
    lo, hi = layout.share(layout.vocab)
    lookup, project = model.tok_embeddings.forward, model.output.forward

    def embed(tokens):
        mine = (tokens >= lo) & (tokens < hi)
        h = lookup(torch.where(mine, tokens - lo, 0))
        return all_reduce(h.masked_fill(~mine.unsqueeze(-1), 0), group)

    model.tok_embeddings.forward = embed
    model.output.forward = lambda x: all_gather_last(project(x), group)


class TensorParallel(Variant):
    """The load variant (llama31.load_checkpoint's hooks): under torchrun, each process builds the
    model cut to its slices, reads only those, and connects the pieces; a failure on any process
    stops every one (together)."""

    def plan(self, args, ckpt, device):
        """This process's share, refused on every process alike before any collective starts."""
        if not isinstance(ckpt, formats.Checkpoint):
            raise ConfigError("tensor-parallel sampling reads a checkpoint's files, not a state dict in memory")
        self.layout = Layout.of(args, dist.get_rank(), dist.get_world_size(), ckpt.params_path)

    def build(self, model: nn.Module, ckpt, device, dtype) -> dict:
        if not hasattr(self, "layout"):  # assemble called without load_checkpoint's plan
            self.plan(model.args, ckpt, device)
        state = local_state(ckpt, model, self.layout, device, dtype)
        shard_modules(model, self.layout)
        model.tensor_parallel = self.layout
        return state

    def loaded(self, model: nn.Module):
        connect(model, self.layout)

    def around(self, load):
        return runs.together(load)


# -----------------------------------------------------------------------------
# reading this process's slices: from Meta's files (only those holding them), or an HF checkpoint


def parts(piece: Callable[[int], torch.Tensor], size: int, dim: int, lo: int, hi: int) -> List[torch.Tensor]:
    """The views that make lo..hi along dim of the tensor that equal pieces of `size` make,
    concatenated along dim; piece(i) the i-th (only those the range overlaps are asked for)."""
    return [piece(i).narrow(dim, max(lo - i * size, 0), min(hi - i * size, size) - max(lo - i * size, 0))
            for i in range(lo // size, (hi - 1) // size + 1)]


def joined(views: List[torch.Tensor], dim: int, device, dtype) -> torch.Tensor:
    """Views of memory-mapped files concatenated along dim, on device in dtype: the one view itself
    when nothing needs to change (the file's pages, read when used); else a copy, each view's pages
    dropped from this process (release) as soon as it is copied."""
    if len(views) == 1:
        out = views[0].to(device=device, dtype=dtype).contiguous()  # to() keeps a same-dtype view as it is
        if out.untyped_storage().data_ptr() != views[0].untyped_storage().data_ptr():
            formats.release_view(views[0])
        return out
    shape = list(views[0].shape)
    shape[dim] = sum(v.shape[dim] for v in views)
    out, at = torch.empty(shape, device=device, dtype=dtype), 0
    for v in views:
        out.narrow(dim, at, v.shape[dim]).copy_(v)
        at += v.shape[dim]
        formats.release_view(v)
    return out


def meta_files(ckpt_dir: Path) -> List[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, every number there."""
    paths = sorted(ckpt_dir.glob("*.pth"))
    if not paths:
        raise ConfigError(f"no *.pth file in {ckpt_dir}; expected Meta's consolidated.00.pth")
    numbers = {}
    for p in paths:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if not m:
            raise ConfigError(f"{p} is not named consolidated.NN.pth, as Meta's files are; tensor-parallel "
                              f"loading reads file NN for the NN-th slice, so rename or remove it")
        numbers[int(m.group(1))] = p
    missing = [n for n in range(max(numbers) + 1) if n not in numbers]
    if missing:
        raise ConfigError(f"{ckpt_dir} has no consolidated.{missing[0]:02d}.pth of its {max(numbers) + 1} "
                          f"model-parallel files; download every file")
    return [numbers[n] for n in range(len(numbers))]


def file_shapes(full: Dict[str, torch.Size], n_files: int, n_kv_heads: int, head_dim: int) -> Dict[str, tuple]:
    """The shape of each tensor in one of n_files model-parallel files (fairscale's cut; a file
    holds one copy of its KV head when there are more files than KV heads)."""
    shapes = {}
    for key, shape in full.items():
        name, shape = key.removesuffix(".weight"), list(shape)
        dim = 0 if name.endswith(COLUMN) or name in VOCAB else 1 if name.endswith(ROW) else None
        if dim is not None:
            if name.endswith(("attention.wk", "attention.wv")) and n_files > n_kv_heads:
                shape[0] = head_dim * n_files
            shape[dim] = shape[dim] / n_files
        shapes[key] = tuple(int(s) if s == int(s) else s for s in shape)
    return shapes


def read_meta_slices(ckpt_dir: Path, full: Dict[str, torch.Size], layout: Layout, device, dtype) -> dict:
    """This process's slices of a Meta checkpoint as formats.Lazy tensors on device in dtype; only
    the files holding them are opened (one when the processes are as many as the files),
    memory-mapped, and their keys and shapes checked against params.json first."""
    paths = meta_files(ckpt_dir)
    n = len(paths)
    expected = file_shapes(full, n, layout.n_kv_heads, layout.head_dim)
    mine = range(layout.rank * n // layout.world, -(-(layout.rank + 1) * n // layout.world))
    # KV heads: in a file's order, a file's heads are a run of the stored ones; with more files
    # than KV heads each is stored in n / n_kv_heads files, and the copy in one of ours is taken
    per_file = max(layout.n_kv_heads // n, 1)
    copies = max(n // layout.n_kv_heads, 1)
    stored = []
    for h in range(*layout.kv_heads):
        choices = [h * copies + c for c in range(copies)]
        stored.append(next((s for s in choices if s // per_file in mine), choices[0]))
    files = sorted(set(mine) | {s // per_file for s in stored})
    runs = []  # the stored heads as runs of consecutive ones, each read as one cut
    for s in stored:
        if runs and runs[-1][1] == s:
            runs[-1][1] = s + 1
        else:
            runs.append([s, s + 1])
    hd = layout.head_dim
    states = {}
    for i in files:
        state = formats.torch_load(paths[i])
        if not isinstance(state, dict):
            raise ConfigError(f"{paths[i]} is not a state dict; re-download it")
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or extra:
            which = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
            raise ConfigError(f"{paths[i]} does not hold this model's weights ({which}); the files are not from one "
                              f"checkpoint, or params.json is not theirs")
        odd = next((k for k in expected
                    if not (isinstance(state[k], torch.Tensor) and state[k].is_floating_point())), None)
        if odd:
            raise ConfigError(f"{paths[i]}: {odd} is not a float tensor; re-download the file")
        rows, wq = state["layers.0.attention.wq.weight"].shape[0], layout.n_heads * layout.head_dim
        if rows * n != wq and wq % rows == 0:
            raise ConfigError(f"{ckpt_dir} holds {n} consolidated.NN.pth files, but {paths[i].name} is cut for "
                              f"{wq // rows} (layers.0.attention.wq.weight has {rows} of {wq} rows); download "
                              f"every file")
        wrong = next((k for k in expected if tuple(state[k].shape) != expected[k]), None)
        if wrong:
            raise ConfigError(f"{paths[i]}: {wrong} is {tuple(state[wrong].shape)}, but params.json's model cut into "
                              f"{n} files would hold {expected[wrong]}; the files are not from one checkpoint, or "
                              f"params.json is not theirs")
        states[i] = state

    def piece(key):
        return lambda i: states[i][key]

    def read(key):
        dim, (lo, hi) = layout.ranges(key)
        if dim is None:  # copied whole into every file: the first one's
            views = [states[files[0]][key]]
        elif key.endswith(("attention.wk.weight", "attention.wv.weight")):
            views = [v for a, b in runs for v in parts(piece(key), expected[key][0], 0, a * hd, b * hd)]
        else:
            views = parts(piece(key), expected[key][dim], dim, lo, hi)
        return joined(views, dim or 0, device, dtype)

    return {key: formats.Lazy(layout.local_shape(key, shape), partial(read, key)) for key, shape in full.items()}


def read_hf_slices(state: dict, full: Dict[str, torch.Size], layout: Layout) -> dict:
    """This process's slices of an HF checkpoint's lazy tensors: rows read alone where safetensors
    can (the vocabulary, wv, w1, w3); wq and wk (whose rows HF permutes) and the column-cut wo and
    w2 read whole, one at a time, then cut."""
    def read(value, dim, lo, hi):
        if dim == 0 and hasattr(value, "read_rows"):
            return value.read_rows(lo, hi)
        return formats.materialize(value).narrow(dim, lo, hi - lo).contiguous()

    slices = {}
    for key, value in state.items():
        dim, (lo, hi) = layout.ranges(key)
        slices[key] = value if dim is None else \
            formats.Lazy(layout.local_shape(key, full.get(key, value.shape)), partial(read, value, dim, lo, hi))
    return slices


def local_state(ckpt, model: nn.Module, layout: Layout, device, dtype) -> dict:
    """This process's slices of a checkpoint (a formats.Checkpoint), read when the loader asks for
    them; model: the whole model, built on the meta device, whose names and shapes they have."""
    full = {k: v.shape for k, v in model.state_dict().items()}
    if ckpt.source == "params.json":
        return read_meta_slices(Path(ckpt.where), full, layout, device, dtype)
    if ckpt.source == "config.json":
        return read_hf_slices(ckpt.read_state(), full, layout)
    raise ConfigError(f"{ckpt.where}: tensor-parallel sampling reads Meta's and HF's layouts, not GGUF files; run a "
                      f"GGUF model in one process (python llama31.py --ckpt_dir ...)")
