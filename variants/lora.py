"""
LoRA (Hu et al., 2021): a frozen matrix W and a trainable low-rank update beside it,

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T,   A (rank, in), B (out, rank)

A starts random and B at zero, so a fresh adapter changes nothing. The base may be a dense
Linear or quantize.py's Int8Linear / Int4Linear (QLoRA); the adapters stay fp32 whatever the base
and are cast to the activations' dtype.

A targeted module keeps its class's forward and its tensors' names (layers.0.attention.wq.weight
still loads from a base checkpoint): its class becomes a subclass that adds the update, and it
gains lora_a and lora_b. merge folds them back into plain weights (W + (alpha/rank) B A).
Like quantize.py, this file imports nothing from llama31.py.
"""

import hashlib
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import formats
from errors import ConfigError
from variants import Variant

# the short names users type, and the module names they stand for
TARGETS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
           "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3", "output": "output"}
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_config(rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS) -> LoRAConfig:
    """A LoRAConfig from what the user typed (targets: "wq,wk" or a list), each value checked."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ConfigError(f"lora_targets {','.join(bad) or '(none)'!s}: not a Linear of the model; use some of "
                          f"{','.join(TARGETS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora_rank {rank!r} must be a whole number of at least 1 (8 is usual)")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"lora_alpha {alpha!r} must be a positive number (usually twice lora_rank)")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout {dropout!r} must be in [0, 1)")
    return LoRAConfig(rank, float(alpha), float(dropout), tuple(dict.fromkeys(targets)))


# -----------------------------------------------------------------------------
# the module: the base's own forward, plus the update


class Frozen(nn.Module):
    """Mixed in before a Linear-like class: a quantized base passes gradients back to its input
    (QuantizedProduct), which the int kernels alone cannot. base_class: the class mixed into."""

    def forward(self, x):
        if not self.weight.is_floating_point() and torch.is_grad_enabled():
            return QuantizedProduct.apply(x, self)
        return super().forward(x)

    def dense_weight(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Rows lo..hi of the base matrix in fp32 (all by default). CUDA's int4 tiles have no
        dequantizer, so that layout is read back whole through its kernel (x = I gives W^T)."""
        if self.weight.is_floating_point():
            return self.weight[lo:hi].float()
        if getattr(self, "layout", None) != "cuda":
            return self.dequantize(lo, hi)
        dtype = next(t for t in self.buffers() if t.is_floating_point()).dtype
        eye = torch.eye(self.in_features, dtype=dtype, device=self.weight.device)
        return self.base_class.forward(self, eye).T.float()[lo:hi]


class LoRA(Frozen):
    """The adapter, mixed in the same way; holds lora_a, lora_b, lora_dropout and lora_scale."""

    def forward(self, x):
        return super().forward(x) + self.lora_update(x)

    def lora_update(self, x):
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return F.linear(F.linear(self.lora_dropout(x), a), b) * self.lora_scale

    def merged_weight(self) -> torch.Tensor:
        return self.dense_weight() + self.lora_scale * (self.lora_b.float() @ self.lora_a.float())


class QuantizedProduct(torch.autograd.Function):
    """A quantized base's product, whose kernels have no backward: the gradient to x goes through
    the matrix dequantized for the moment, ROWS rows at a time (an 8B model's int8 output layer
    would be 2 GB in fp32 at once); the base is frozen, so it gets none."""

    ROWS = 4096  # a multiple of the CPU int4 layouts' blocks (16-64 rows), so none is unpacked twice

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module.base_class.forward(module, x)

    @staticmethod
    def backward(ctx, grad):
        m, rows = ctx.module, QuantizedProduct.ROWS
        if getattr(m, "layout", None) == "cuda":  # read back whole through the kernel
            return grad @ m.dense_weight().to(grad.dtype), None
        dx = 0  # summed in fp32: a bf16 gradient would round at every block
        for lo in range(0, m.out_features, rows):
            dx = dx + (grad[..., lo:lo + rows] @ m.dense_weight(lo, lo + rows).to(grad.dtype)).float()
        return dx.to(grad.dtype), None


_CLASSES: Dict[tuple, type] = {}


def mixed(mixin: type, base: type) -> type:
    """LoRA<Base> or Frozen<Base>: the base class's forward wrapped (one class per pair)."""
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"base_class": base})
    return _CLASSES[mixin, base]


def target_names(model: nn.Module, targets) -> list:
    """The module names in model that the short target names stand for."""
    suffixes = tuple(TARGETS[t] for t in targets)
    return [name for name, _ in model.named_modules() if name == "output" and "output" in targets
            or name.startswith("layers.") and name.endswith(suffixes)]


def add_adapters(model: nn.Module, config: LoRAConfig, generator=None) -> list:
    """Freeze the model and give each target an adapter: A as nn.Linear initialises its weight
    (Kaiming-uniform, what PEFT uses too), B zero. The model keeps the config (model.lora_config).
    Returns the adapted module names."""
    fused = [name for name, m in model.named_modules() if getattr(m, "fused_sizes", None)]
    if fused:  # before anything changes
        raise ConfigError(f"{fused[0]} does its products fused (fused.py), so they have no adapter of their own; "
                          f"build the model with fuse=False, or call fused.unfuse(model) first")
    for p in model.parameters():
        p.requires_grad_(False)
    tok = getattr(model, "tok_embeddings", None)
    if "output" in config.targets and tok is not None and model.output.weight is tok.weight:
        raise ConfigError("lora_targets output: this model ties output to tok_embeddings, which an adapter "
                          "would untie; drop output from lora_targets")
    names = target_names(model, config.targets)
    if adapted(model):
        raise ConfigError(f"{adapted(model)[0][0]} has an adapter already; add adapters to a model once")
    for name in names:
        module = model.get_submodule(name)
        device = module.weight.device
        module.__class__ = mixed(LoRA, type(module))
        # drawn on the CPU, so a seed gives the same A on every device
        bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear's
        a = torch.empty(config.rank, module.in_features).uniform_(-bound, bound, generator=generator)
        module.lora_a = nn.Parameter(a.to(device))
        module.lora_b = nn.Parameter(torch.zeros(module.out_features, config.rank, device=device))
        module.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        module.lora_scale = config.scale
    model.lora_config = config
    for module in model.modules():  # QLoRA: the other quantized matrices pass gradients back too
        if hasattr(module, "in_features") and not module.weight.is_floating_point() and not isinstance(module, Frozen):
            module.__class__ = mixed(Frozen, type(module))
    return names


def adapted(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRA)]


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters alone, by name (layers.0.attention.wq.lora_a, ...): what a checkpoint holds."""
    return {f"{name}.{k}": getattr(m, k) for name, m in adapted(model) for k in ("lora_a", "lora_b")}


def load_adapters(model: nn.Module, state: Dict[str, torch.Tensor], where):
    """Copy saved adapters into a model given the same adapters (add_adapters with their config)."""
    mine = adapter_state(model)
    if mine.keys() != state.keys():
        odd = sorted(mine.keys() ^ state.keys())
        raise ConfigError(f"adapters in {where} do not match lora_targets ({odd[0]} and {len(odd) - 1} more "
                          f"differ); load them with the settings they were trained with")
    for k, p in mine.items():
        if p.shape != state[k].shape:
            raise ConfigError(f"adapter {k} in {where} is {tuple(state[k].shape)}, expected {tuple(p.shape)}; "
                              f"check lora_rank")
        with torch.no_grad():
            p.copy_(state[k])


def merge(model: nn.Module):
    """Fold every adapter into its base: a dense base keeps its class and dtype, a quantized one
    becomes a dense nn.Linear (bias-free, so the weight's name is the same) in its scales' dtype."""
    for name, m in adapted(model):
        with torch.no_grad():
            w = m.merged_weight()
        del m.lora_a, m.lora_b, m.lora_dropout, m.lora_scale
        if m.weight.is_floating_point():
            m.__class__ = m.base_class
            m.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
            continue
        dense = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        dtype = next(t for t in m.buffers() if t.is_floating_point()).dtype
        dense.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)


# -----------------------------------------------------------------------------
# a checkpoint of adapters: adapters.pt beside train_state.pt, naming the base it needs

FILE = "adapters.pt"


def adapter_dir(path) -> Optional[Path]:
    """The LoRA checkpoint a --ckpt_dir names (a step directory, or finetune's `latest` pointer to
    one), else None."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = formats.follow_latest(path)
    return path if (path / FILE).is_file() else None


def save_adapters(out_dir: Path, state: Dict[str, torch.Tensor], config: LoRAConfig, base, base_fingerprint: str,
                  quantize: str = "none"):
    """The adapters in fp32, their settings, and the base's path and fingerprint: megabytes.
    quantize: how the base was loaded for training (none: dense; int8, int4: QLoRA's)."""
    saved = {"adapters": {k: v.detach().float().cpu() for k, v in state.items()}, "config": asdict(config),
             "base": str(Path(base).resolve()), "fingerprint": base_fingerprint, "quantize": quantize}
    formats.atomic_write(Path(out_dir) / FILE, lambda tmp: torch.save(saved, tmp))


def read_adapters(ckpt_dir) -> dict:
    """adapters.pt, checked: its config as a LoRAConfig, every adapter a finite tensor."""
    path = Path(ckpt_dir) / FILE

    def fits(saved):
        saved["config"] = check_config(**saved["config"])
        return isinstance(saved["base"], str) and isinstance(saved["fingerprint"], str) and \
            saved.get("quantize", "none") in ("none", "int8", "int4") and \
            all(isinstance(v, torch.Tensor) for v in saved["adapters"].values())
    saved = formats.load_saved(path, "adapters, config, base, fingerprint", fits,
                               "point --ckpt_dir at another step_NNNNNN directory")
    formats.check_finite(saved["adapters"], path)
    return saved


# -----------------------------------------------------------------------------
# the base's fingerprint: adapters only make sense on the weights they were trained on


def fingerprint(state: Dict[str, torch.Tensor]) -> str:
    """A hash of the names, shapes and first row of every tensor in bf16: cheap to take (one row
    each, from a memory-mapped or lazy file too), the same whatever dtype the base was loaded in."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        row = value.read_rows(0, 1) if hasattr(value, "read_rows") else \
            (value.read() if hasattr(value, "read") else value)
        row = row[0] if row.dim() > 1 else row
        h.update(f"{name}{tuple(value.shape)}".encode())
        h.update(row.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_of(ckpt) -> str:
    """fingerprint of a formats.Checkpoint's weights (of its first file, if model-parallel)."""
    state = ckpt.read_state()
    return fingerprint(state[0] if isinstance(state, list) else state)


# -----------------------------------------------------------------------------
# the variants: llama31.load_checkpoint's and finetune's hooks


def checkpoint(path) -> Optional["Adapters"]:
    """The LoRA run's step a --ckpt_dir names (a step directory or its `latest` pointer), as the
    load variant that adds its adapters to its base; None for any other checkpoint."""
    found = adapter_dir(path) if path is not None else None
    return Adapters(found, read_adapters(found)) if found else None


class Adapters(Variant):
    """A LoRA checkpoint: its base (base, loaded as it was trained: quantize), checked against the
    fingerprint the adapters were trained on, the adapters added once it has loaded, and the run's
    own tokenizer.model (tokenizer)."""

    def __init__(self, path: Path, saved: dict):
        self.path, self.saved, self.base, self.quantize = path, saved, saved["base"], saved.get("quantize")
        self.tokenizer = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None

    def build(self, model: nn.Module, ckpt, device, dtype):
        if getattr(model, "tensor_parallel", None):
            raise ConfigError(f"{self.path} is a LoRA checkpoint, which samples in one process; merge it first "
                              f"(python export.py --format meta) to run it tensor parallel")
        now = fingerprint_of(ckpt)
        if now != self.saved["fingerprint"]:
            raise ConfigError(f"{self.path}: its adapters were trained on other weights than {self.base} holds now "
                              f"(fingerprint {self.saved['fingerprint']} vs {now}); restore that base")

    def loaded(self, model: nn.Module):
        add_adapters(model, self.saved["config"])
        load_adapters(model, self.saved["adapters"], self.path / FILE)
        model.lora_base = (self.base, self.saved["fingerprint"])

    def settings(self, given: dict) -> dict:
        """The finetune settings of these adapters, which a run from them trains on (its base frozen,
        as saved); a given setting that contradicts them is refused rather than ignored."""
        c = self.saved["config"]
        mine = {"finetune_type": "lora", "lora_rank": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
                "lora_targets": ",".join(c.targets)}
        if given.get("lora_targets") is not None:
            given = {**given, "lora_targets": ",".join(check_config(targets=given["lora_targets"]).targets)}
        clash = [k for k, v in mine.items() if given.get(k) is not None and given[k] != v]
        if clash:
            raise ConfigError(f"{self.path} holds LoRA adapters ({', '.join(f'{k} {mine[k]}' for k in mine)}), which "
                              f"a run from it trains on as they are; drop --{' --'.join(clash)}, or start from its "
                              f"base {self.base}")
        return mine


class Train(Variant):
    """finetune --finetune_type lora: adapters on the loaded base (unless a resumed run's came with
    it), a checkpoint of the adapters alone, and the adapters of gathered FSDP weights."""

    def __init__(self, config: LoRAConfig, source, seed: int):
        self.config, self.source, self.seed, self.fingerprint = config, source, seed, None

    @classmethod
    def of(cls, cfg: dict, source) -> Optional["Train"]:
        """The variant a run's settings ask for (None: not a LoRA run), its settings checked."""
        if cfg["finetune_type"] != "lora":
            if cfg["quantize"] != "none":
                raise ConfigError(f"--quantize {cfg['quantize']} freezes the base, so only adapters can train; add "
                                  f"--finetune_type lora, or drop --quantize")
            return None
        config = check_config(cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
        return cls(config, source, cfg["seed"])

    def build(self, model: nn.Module, ckpt, device, dtype):
        if adapter_dir(self.source) is None:  # a base that gains adapters: fingerprinted before it is read
            self.fingerprint = fingerprint_of(ckpt)

    def prepare(self, model: nn.Module):
        if not adapted(model):  # a LoRA checkpoint's (a resumed run's) came with it
            add_adapters(model, self.config, torch.Generator().manual_seed(self.seed))
            model.lora_base = (str(self.source), self.fingerprint)

    def save(self, out_dir: Path, model: nn.Module, state: dict, config: dict, tokenizer) -> bool:
        """The adapters and a reference to the base, not the base; the run's tokenizer beside them
        (a GGUF base has its own)."""
        save_adapters(out_dir, {k: v for k, v in state.items() if ".lora_" in k}, self.config, *model.lora_base,
                      quantize=config["quantize"])
        if tokenizer.path is not None:
            shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
        return True

    def take_adapters(self, weights: dict) -> "Gathered":
        return Gathered(self.config, {k: weights.pop(k) for k in list(weights) if ".lora_" in k})


class Gathered(Variant):
    """Adapters gathered apart from their model, added back once it has loaded."""

    def __init__(self, config: LoRAConfig, adapters: Dict[str, torch.Tensor]):
        self.config, self.adapters = config, adapters

    def loaded(self, model: nn.Module):
        add_adapters(model, self.config)
        load_adapters(model, self.adapters, "the gathered shards")
