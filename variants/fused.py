"""
Fewer, larger products for decoding: after a model is loaded for inference, each block's wq, wk, wv
become one matrix (wqkv) and its w1, w3 another (w13), output rows stacked, so a block does four
products a token instead of seven (gpt-fast's layout). Stacking rows keeps every format exact:
dense weights, int8 rows with their scales, int4 groups with their scales and zeros (quantize.py's
modules join and cut themselves: joined(), rows()). llama31.py's layers take the joined product
when it is there (Attention.wqkv, FeedForward.w13; split along the last dimension).

Nothing saved ever holds the joined matrices: a fused block's state_dict() gives Meta's wq wk wv,
w1 w3 again (cut back out of the joined ones), so exports and checkpoints are as before. Fusing is
for models that only decode: Llama.build does it (unfuse undoes it); finetuning, LoRA adapters
(wrapped products are left as they are), tensor parallel and CUDA's int4 tiles (not cut here) keep
the separate products.
Imports nothing from llama31.py.
"""

import torch
import torch.nn as nn

import formats
from errors import ConfigError
from variants import Variant

PARTS = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}  # the joined name and its parts, in row order


def joinable(parts) -> bool:
    """The same kind of product, holding its matrix and nothing else (no bias, no adapters: a
    LoRA-wrapped product stays as it is), all dense (nn.Linear or a subclass) or all of a class
    that joins itself (quantize.py's), on one device."""
    kind = type(parts[0])
    if any(type(p) is not kind or p._modules or {n for n, _ in p.named_parameters()} - {"weight"} for p in parts):
        return False
    if isinstance(parts[0], nn.Linear):
        w = parts[0].weight
        return all((p.in_features, p.weight.dtype, p.weight.device) == (w.shape[1], w.dtype, w.device) for p in parts)
    return hasattr(kind, "joined") and kind.joined(parts, check=True)


def join(parts) -> nn.Module:
    """One product whose output rows are those of parts, in order."""
    if not isinstance(parts[0], nn.Linear):
        return type(parts[0]).joined(parts)
    first = parts[0]
    joined = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=False, device="meta")
    joined.__class__ = type(first)  # matvec.Linear stays matvec.Linear
    joined.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=first.weight.requires_grad)
    for p in parts:  # a memory-mapped checkpoint's pages, now copied, leave this process's memory
        if formats.file_backed(p.weight):
            formats.release_view(p.weight)
    return joined


def cut(joined: nn.Module, sizes) -> list:
    """joined's rows as one product per size (the parts join() was given)."""
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    if not isinstance(joined, nn.Linear):
        return [joined.rows(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = nn.Linear(joined.in_features, hi - lo, bias=False, device="meta")
        part.__class__ = type(joined)
        part.weight = nn.Parameter(joined.weight[lo:hi], requires_grad=joined.weight.requires_grad)
        parts.append(part)
    return parts


def fuse(model: nn.Module) -> int:
    """Join the parts of every module of model that has a place for the joined product (an
    attribute wqkv or w13 holding None) and parts that can be joined; returns how many."""
    n = 0
    for module in list(model.modules()):
        for name, names in PARTS.items():
            parts = [getattr(module, p, None) for p in names]
            if getattr(module, name, False) is not None or None in parts or not joinable(parts):
                continue
            if not hasattr(module, "fused_sizes"):
                module.fused_sizes, module.meta_order = {}, list(module._modules)
                module.fused_hooks = [module.register_state_dict_post_hook(meta_names),
                                      module.register_load_state_dict_pre_hook(joined_names)]
            with torch.no_grad():
                setattr(module, name, join(parts))
            module.fused_sizes[name] = [p.out_features for p in parts]
            for p in names:
                delattr(module, p)  # the parts' memory goes; state_dict cuts them back out
            n += 1
    return n


def unfuse(model: nn.Module) -> int:
    """Undo fuse: every joined product cut back into its parts (views of its rows; quantized ones
    packed again), under Meta's names in Meta's order; returns how many. Before anything that
    adapts products by name (lora.add_adapters refuses a fused model)."""
    n = 0
    for module in [m for m in model.modules() if hasattr(m, "fused_sizes")]:
        for name, sizes in module.fused_sizes.items():
            for part_name, part in zip(PARTS[name], cut(getattr(module, name), sizes)):
                setattr(module, part_name, part)
            setattr(module, name, None)
            n += 1
        order = module.meta_order
        children = sorted(module._modules.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        module._modules.clear()
        module._modules.update(children)  # Meta's order again
        for hook in module.fused_hooks:
            hook.remove()
        del module.fused_sizes, module.meta_order, module.fused_hooks
    return n


def meta_names(module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post hook of a fused module: the joined entries replaced by their parts', in
    the order the module had them."""
    mine = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    for name, sizes in module.fused_sizes.items():
        for key in [k for k in mine if k.startswith(f"{prefix}{name}.")]:
            del mine[key]
        for part_name, part in zip(PARTS[name], cut(getattr(module, name), sizes)):
            mine.update({f"{prefix}{part_name}.{k}": v for k, v in part.state_dict().items()})
    order = module.meta_order

    def rank(key):  # the module's own tensors first, as torch puts them, then its children's in order
        child, _, leaf = key[len(prefix):].partition(".")
        return -1 if not leaf else order.index(child) if child in order else len(order)
    state.update(sorted(mine.items(), key=lambda kv: rank(kv[0])))


def joined_names(module, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre hook of a fused module: Meta's parts' entries joined into the fused
    product's, where stacking rows is all it takes (dense, int8); int4's packing is not, so there
    it asks for unfuse."""
    for name in module.fused_sizes:
        parts = [f"{prefix}{p}." for p in PARTS[name]]
        keys = [k for k in state if k.startswith(parts[0])]
        if not keys:
            continue
        if "scales_and_zeros" in dict(getattr(module, name).named_buffers()):
            raise ConfigError(f"{prefix}{name} is fused int4 (fused.py), whose packing a state dict's rows cannot "
                              f"join; call fused.unfuse(model) before load_state_dict")
        for key in keys:
            leaf = key[len(parts[0]):]
            state[f"{prefix}{name}.{leaf}"] = torch.cat([state.pop(f"{part}{leaf}") for part in parts])


class Fused(Variant):
    """The sampling variant (llama31.Llama.build): a model loaded to sample does its products fused."""

    def sampling(self, llama):
        fuse(llama.model)
