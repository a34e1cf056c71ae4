"""
FSDP for finetune --fsdp (PyTorch's fully_shard): each process keeps 1/N of every block's weights,
gradients and optimizer state, and of the rest (embeddings, final norm, output); a block's full
weights are gathered just before it runs and dropped after.

The model is sharded on the meta device, before its weights load, and each process reads only its
rows of every weight (from one memory-mapped file, or HF's; Meta's model-parallel files are merged
first), straight onto its device. A LoRA run's base loads whole on the CPU instead, gains its
adapters (which must be in a block before it is sharded), then is sharded. Checkpoints gather the
whole weights and optimizer state onto rank 0's CPU; sampling after training, a whole copy.

A variant as the others are (llama31.load_checkpoint's and finetune's hooks): Sharded. Imports
nothing from llama31.py. FSDP's modules are imported where they are used: importing them costs
every start about a second, and most runs never shard.
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

import formats
from errors import ConfigError
from variants import Variant


class Sharded(Variant):
    """finetune --fsdp. select(model, finetune_type) marks what trains; FSDP wants it settled
    before a module is sharded."""

    def __init__(self, device: torch.device, at_load: bool, select: Callable, finetune_type: str):
        self.device, self.at_load, self.select, self.finetune_type = device, at_load, select, finetune_type
        self.sharded, self.mapped = False, False

    @classmethod
    def of(cls, cfg: dict, world_size: int, device, select: Callable) -> Optional["Sharded"]:
        """The variant a run's settings ask for (None: no --fsdp), checked against the others."""
        if not cfg["fsdp"]:
            return None
        if world_size == 1:
            raise ConfigError("--fsdp shards the model across processes; launch with torchrun --nproc_per_node N "
                              "(N > 1), or drop --fsdp")
        if cfg["compile"]:
            raise ConfigError("--fsdp with --compile is not supported here; drop one of them")
        # FSDP shards parameters; int weights are buffers
        if cfg["finetune_type"] == "lora" and cfg["quantize"] != "none":
            raise ConfigError(f"--fsdp with --quantize {cfg['quantize']}: the quantized base would not be sharded, "
                              f"only the adapters; drop --fsdp (DDP replicates the small adapters cheaply)")
        return cls(torch.device(device), cfg["finetune_type"] != "lora", select, cfg["finetune_type"])

    # loading: sharded on the meta device, each process reading its rows (a LoRA run: after its adapters)

    def load_device(self, device):
        return device if self.at_load else torch.device("cpu")

    def swap(self, model: nn.Module, ckpt, device, dtype):
        if self.at_load:
            self.mapped = isinstance(ckpt, formats.Checkpoint) and ckpt.source == "params.json"
            self.prepare(model)

    def load(self, model: nn.Module, state: dict, device, dtype) -> bool:
        if self.at_load:
            load_shards(model, state, device, dtype, self.mapped)
        return self.at_load

    def prepare(self, model: nn.Module):
        if not self.sharded:
            self.select(model, self.finetune_type)
            shard_model(model, self.device)
            self.sharded = True

    # training: no DDP wrapper, whole states gathered for checkpoints and sampling

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def state_dicts(self, model: nn.Module, optimizer):
        """Weights and optimizer state (None: weights only) whole, gathered onto rank 0's CPU (every
        rank must call this; the others get empty dicts); the optimizer state keyed by parameter
        name, the form load_optimizer takes back."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=options),
                optimizer and get_optimizer_state_dict(model, optimizer, options=options))

    def load_optimizer(self, model: nn.Module, optimizer, state: dict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return True

    def whole_weights(self, model: nn.Module, optimizer) -> dict:
        """The weights whole on rank 0, for sampling after training, once the gradients, the
        optimizer's state and the allocator's cache are let go (every rank must call this)."""
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.state_dicts(model, None)[0]


def shard_model(model: nn.Module, dev: torch.device):
    """fully_shard each block, then the whole model (the rest: embeddings, final norm, output)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


ROWS_AT_ONCE = 1024


def load_shards(model: nn.Module, state: dict, device, dtype, mapped: bool):
    """A model built on the meta device and sharded with fully_shard gets its weights: each process
    reads only its rows of every tensor (FSDP's dim-0 chunk) from `state`, memory-mapped tensors
    (mapped: torch.load's, whose pages are then dropped) or formats.Lazy ones, on device in dtype,
    and assigns them as its shards. Tied parameters stay one."""
    from torch.distributed.tensor import DTensor

    made = {}
    shards = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in made:
            value, rows = state[key], p.shape[0]
            mesh = p.device_mesh
            size = -(-rows // mesh.size())
            lo = min(mesh.get_local_rank() * size, rows)
            hi = min(lo + size, rows)
            if mapped and not isinstance(value, formats.Lazy):  # copied a few rows at a time, each's pages then dropped
                local = torch.empty((hi - lo, *p.shape[1:]), device=device, dtype=dtype)
                for a in range(lo, hi, ROWS_AT_ONCE):
                    rows = value[a:min(a + ROWS_AT_ONCE, hi)]
                    local[a - lo:a - lo + len(rows)].copy_(rows)
                    formats.release_view(rows)
            else:
                local = value.read_rows(lo, hi) if hasattr(value, "read_rows") else formats.materialize(value)[lo:hi]
                local = local.to(device=device, dtype=dtype, copy=True)
            formats.check_finite([local], f"{key} (rows {lo}..{hi})")
            made[id(p)] = nn.Parameter(DTensor.from_local(local, mesh, p.placements, shape=p.shape, stride=p.stride()),
                                       requires_grad=p.requires_grad)
        shards[key] = made[id(p)]
    model.load_state_dict(shards, strict=True, assign=True)
