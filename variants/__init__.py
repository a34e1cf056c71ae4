"""
Variants of the core: each file of this package changes how a model loads, samples or trains, and
joins llama31.py at a few named moments, the methods of Variant below. The core calls every
variant's method at each moment, in the order of its list; a method a variant does not define does
nothing. The functions at the end choose the variants of a load, a sampling run and a finetune
run from their settings, so llama31.py imports this package and none of its files.

    quantize.py   int8 / int4 weights on PyTorch's int kernels, swapped in as a model loads
    lora.py       LoRA adapters beside the linears (QLoRA on a quantized base); a LoRA checkpoint
    tp.py         tensor-parallel sampling under torchrun, each process reading only its slices
    fsdp.py       finetune --fsdp: weights, gradients and optimizer state sharded over the processes
    fused.py      wq wk wv and w1 w3 as one product each, for a model that only samples
    compiled.py   --compile: a fixed-shape decode step (and off a CPU the prefill) via torch.compile
    speculative.py  a draft model proposes tokens, the model keeps those it agrees with
    matvec.py     the CPU's one-row products (batch-1 decoding) on the faster kernel

A variant file imports neither llama31.py nor another variant: it takes modules by Meta's names
and configurations by duck typing (args.n_heads, model.layers, ...).
"""

import importlib.util
from typing import Callable, Optional

import torch

import dialogs
import runs
from errors import ConfigError


class Variant:
    """The hooks, in the order the core calls them. Outside them a variant may change only these,
    each listed with the variant that does it, so that llama31.py can be read without opening one:

    - module classes: a dense nn.Linear becomes matvec.Linear (its one-row products); a LoRA
      target becomes a LoRA or Frozen subclass of its class, gaining lora_a, lora_b (lora.py)
    - modules replaced by name: Int8Linear, Int4Linear, Int8Embedding (quantize.py's swap)
    - Attention.wqkv and FeedForward.w13, set to the joined products, their parts removed, and
      state-dict hooks that give Meta's names back (fused.py)
    - a tensor-parallel model's sizes (its attention's n_heads and n_kv_heads, its matrices cut
      to this process's slices), forward hooks on each block's attention and feed-forward, the
      embedding's and the output's forward, and model.tensor_parallel (tp.py)
    - FSDP's sharding of the blocks and the model: their classes, DTensor parameters (fsdp.py)
    - a Llama's decoder and, off a CPU, its model's logits (compiled.py); its speculator, which
      runs its one-prompt generations (speculative.py)
    - attributes a variant reads back: model.lora_config, model.lora_base (lora.py)
    """

    # -- loading: llama31.load_checkpoint and assemble --------------------------------------

    def plan(self, args, ckpt, device) -> Optional[str]:
        """Before any weight is read, on every process: decide and check (a ConfigError stops the
        load). args: the ModelArgs; ckpt: the formats.Checkpoint. May return the activations'
        dtype it wants ("bf16") when the caller asked for none."""
        return None

    def around(self, load: Callable):
        """Run the whole load, load(), its way and return the model (tp: on every process, each
        failure raised on all of them)."""
        return load()

    def build(self, model, ckpt, device, dtype) -> Optional[dict]:
        """The whole model built on the meta device, before its weights are read: cut or check
        it. Returns the state dict to load instead of the checkpoint's (tp: this process's
        slices), or None."""
        return None

    def swap(self, model, ckpt, device, dtype):
        """Once the state's names and shapes are checked against the model: replace modules
        (quantize) or shard them (fsdp), still on the meta device."""

    def convert(self, model, key: str, value, device, dtype) -> Optional[dict]:
        """One tensor of the state as it loads: {name: tensor} the way this variant holds it
        (quantized buffers), or None if it is not this variant's."""
        return None

    def load(self, model, state: dict, device, dtype) -> bool:
        """Load every tensor its own way (fsdp: each process its rows); True if it did."""
        return False

    def loaded(self, model):
        """After the weights: tie, connect processes, add adapters, swap a forward."""

    # -- sampling: llama31.Llama.build ------------------------------------------------------

    def sampling(self, llama):
        """A Llama loaded to sample, before its first prompt: fuse its products, compile it."""

    # -- finetuning: llama31.finetune -------------------------------------------------------

    def training_data(self, run, tokenizer, chat_format) -> Optional[tuple]:
        """The (train, validation) loaders, if this variant brings its own data (conversations);
        None: token shards, or the demo's text."""
        return None

    def load_device(self, device):
        """Where the weights load (fsdp under LoRA: the CPU, sharded after the adapters)."""
        return device

    def prepare(self, model):
        """After loading, before what trains is chosen: add adapters, shard."""

    def wrap(self, model):
        """The model to train, wrapped this variant's way; None: DDP's wrapper (or none, in one
        process)."""
        return None

    def load_optimizer(self, model, optimizer, state: dict) -> bool:
        """Put a resumed run's optimizer state back its own way; True if it did."""
        return False

    def state_dicts(self, model, optimizer) -> Optional[tuple]:
        """(weights, optimizer state) whole, to save (every process calls it; fsdp gathers them
        on rank 0), or None: the model's and optimizer's own state_dict()."""
        return None

    def save(self, out_dir, model, state: dict, config: dict, tokenizer) -> bool:
        """Write the model of a checkpoint its own way (lora: the adapters alone); True if it did."""
        return False

    def whole_weights(self, model, optimizer) -> Optional[dict]:
        """The trained weights whole on rank 0, to sample from after training (every process calls
        it), or None if the model is whole already."""
        return None

    def take_adapters(self, weights: dict) -> Optional["Variant"]:
        """Take what is not the base model's out of gathered weights, as a variant whose loaded()
        puts it back (lora's adapters), or None."""
        return None

    def trained(self, run, llama, step: int):
        """After the last step, on every process: score the trained model (finetune --eval_tasks)."""


# the variants themselves: each subclasses Variant, so they are imported once it is defined
from variants import compiled, fsdp, fused, lora, matvec, quantize, speculative, tp  # noqa: E402

check_quantize = quantize.check_mode  # --quantize and --group_size, said before anything loads
adapters_of = lora.checkpoint  # the LoRA step directory a --ckpt_dir names, as a variant; else None
Draft = speculative.Draft  # Llama.build's draft
check_draft = speculative.check_draft  # a draft's vocabulary against the model's, before weights


class Conversations(Variant):
    """finetune on dialogs (dialogs.py): a .jsonl file or a folder of them as --train_data, written
    in the model's chat format and packed, instead of token shards."""

    def training_data(self, run, tokenizer, chat_format) -> tuple:
        cfg, info = run.cfg, run.info
        return dialogs.loaders(cfg.train_data, cfg.val_data, cfg.B, cfg.T, info.rank, info.world_size, tokenizer,
                               chat_format, cfg.train_on_input, run.log)


class EvalTasks(Variant):
    """finetune --eval_tasks: lm-evaluation-harness's tasks scored on the trained model (harness.py,
    as eval.py --tasks does), the scores a line of metrics.jsonl."""

    def __init__(self, tasks: str, limit: Optional[int], include_path: Optional[str]):
        self.tasks = tasks
        self.limit = limit
        self.include_path = include_path

    @classmethod
    def of(cls, cfg: dict) -> Optional["EvalTasks"]:
        if not cfg["eval_tasks"]:
            return None
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--eval_tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
                              "pip install lm-eval==0.4.13")
        if cfg["fsdp"]:
            raise ConfigError("--eval_tasks scores whole models, and --fsdp shards them; drop one, and run "
                              "python eval.py --tasks on the saved checkpoint")
        tasks = cfg["eval_tasks"]
        return cls(",".join(tasks) if isinstance(tasks, (list, tuple)) else str(tasks), cfg["eval_limit"],
                   cfg["eval_include_path"])

    def trained(self, run, llama, step: int):
        import harness  # lm-eval is imported only when asked for

        llama.model.eval()  # dropout (LoRA's) off
        results = harness.evaluate(llama, self.tasks, limit=self.limit, include_path=self.include_path,
                                   batch_size=run.cfg.B)
        llama.model.train()
        if results is not None:  # rank 0
            runs.log_step(run, step, **harness.scores(results))


def for_loading(device, mode: Optional[str], group_size: int, ckpt, adapters=None, extra=()) -> list:
    """A load's variants: the CPU's one-row products, the caller's own (extra), quantization in
    `mode` (int8, int4; None and "keep": a GGUF's own 4- and 8-bit tensors, where ckpt, the
    formats.Checkpoint, has some), a LoRA checkpoint's adapters (adapters_of)."""
    chosen = [matvec.OneRow()] if device.type == "cpu" else []
    chosen += list(extra)
    kept = any(t in quantize.GGUF_KEEP for t in (getattr(ckpt, "tensor_types", None) or {}).values())
    if mode in quantize.MODES or (mode != "none" and kept):
        chosen.append(quantize.Quantize(mode, group_size))
    return chosen + ([adapters] if adapters else [])


def for_sampling(parallel: bool, fuse: bool, compile: bool, draft=None, k: int = 0) -> list:
    """A sampling run's variants: tensor parallel under torchrun; else wq wk wv and w1 w3 fused;
    torch.compile on top of either; a draft Llama proposing k tokens at once (speculative)."""
    chosen = [tp.TensorParallel()] if parallel else [fused.Fused()] if fuse else []
    chosen += [compiled.Compiled()] if compile else []
    return chosen + ([speculative.Speculative(draft, k)] if draft is not None else [])


def draft_of(ckpt_dir: Optional[str], quantize: Optional[str], k: int, demo: bool = False):
    """--draft_ckpt_dir, --draft_quantize and --speculate_k as a Draft; None when neither is
    given, or k is 0. The demo, dequantized, is drafted by its own 4-bit matrices unless told."""
    runs.check_number("speculate_k", k, int, 0)
    check_quantize(quantize, 32)
    if k == 0 or (ckpt_dir is None and quantize is None and not demo):
        return None
    return Draft(None if ckpt_dir is None else str(ckpt_dir), quantize or "keep", k)


def load_draft(draft, build: Callable, ckpt_dir, tokenizer_path, max_seq_len: int, device, dtype,
               rope_scale_factor, compile: bool, parallel: bool):
    """The draft as a Llama (build: Llama.build) for one stream, its vocabulary checked first: in
    the model's activations' dtype (fp32 on a CPU: its int products take bf16 rows), compiled
    with it (then bf16 on a CPU: Inductor's int kernels take bf16 rows only)."""
    if parallel:
        raise ConfigError("speculative decoding runs in one process; drop --draft_ckpt_dir and "
                          "--draft_quantize under torchrun")
    own = draft.ckpt_dir is None
    draft_dir = ckpt_dir if own else draft.ckpt_dir
    check_draft(ckpt_dir, draft_dir, tokenizer_path)
    dev = runs.check_device(device or runs.default_device())
    drafted = torch.bfloat16 if compile and dev.type == "cpu" else runs.resolve_dtype(dtype, dev)
    return build(draft_dir, tokenizer_path if own else None, max_seq_len, 1, dev, drafted,
                 rope_scale_factor, compile, draft.quantize)


def for_finetune(cfg: dict, source, world_size: int, device, select: Callable) -> list:
    """A finetune run's variants from its settings (TrainConfig's, as a dict), each checked (a
    ConfigError): conversations as data, LoRA adapters, FSDP, lm-eval's tasks after training.
    select(model, finetune_type) marks what trains (FSDP wants it settled before it shards)."""
    talk = cfg["train_data"] is not None and dialogs.is_dialogs(cfg["train_data"])
    chosen = [Conversations() if talk else None, lora.Train.of(cfg, source),
              fsdp.Sharded.of(cfg, world_size, device, select), EvalTasks.of(cfg)]
    return [v for v in chosen if v is not None]
