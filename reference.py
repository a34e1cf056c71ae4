"""
Meta's own Llama 3 code (the `llama-models==0.3.0` package) on a checkpoint directory, to check
llama31.py against it.

    python reference.py --ckpt_dir DIR            # print completions exactly as `python llama31.py` does
    python reference.py compare --ckpt_dir DIR    # run both greedily, report the first divergence
    python reference.py compare --ckpt_dir DIR --dialogs dialogs.json   # chats, tool calls included
    torchrun --nproc_per_node 8 reference.py --ckpt_dir Meta-Llama-3.1-70B   # its 8 files, one a process

The model (`llama_models.llama3.model.Transformer`), its tokenizer and its sampling loop
(`Llama3.generate`) are Meta's. Loading alone is done here instead of by `Llama3.build`: build
needs torchrun's environment variables, leaves torch's global defaults changed, and loads every
model in bf16 even on CPU (its shard loader sets the default tensor type to bf16), which would
make fp32 cross-checks impossible. Loading here uses the same dtype rule as llama31.py
(bf16 on CUDA, fp32 elsewhere) and puts torch's defaults back afterwards.
"""

import contextlib
import json
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

import formats
import runs
from formats import read_params, resolve_rope_factor
from llama31 import Llama, check_device, check_sampling_args, default_device, resolve_dtype
from runs import DEFAULT_PROMPTS
from errors import ConfigError
from tokenizer import find_tokenizer_model


# -----------------------------------------------------------------------------
# Meta's code: importing it, its model-parallel group, torch's global defaults


def meta_generation():
    """Import llama_models.llama3.generation. It imports the image model, which imports
    torchvision at module level; text checkpoints never build that model, so where torchvision is
    missing (it has no CPU wheel on some platforms) only that one module is replaced by a stub."""
    try:
        from llama_models.llama3 import generation
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "torchvision":
            raise
        stub = types.ModuleType("llama_models.llama3.multimodal.model")

        class CrossAttentionTransformer:  # Llama3.generate uses it only in an isinstance check
            def __init__(self, *args, **kwargs):
                raise ConfigError("this is a vision checkpoint; Meta's image model needs torchvision")

        stub.CrossAttentionTransformer = CrossAttentionTransformer
        sys.modules[stub.__name__] = stub
        from llama_models.llama3 import generation
    return generation


def init_model_parallel(device=None) -> bool:
    """Meta's layers are fairscale's model-parallel ones: they need a process group and a
    model-parallel group even in one process. Make both unless they exist: under torchrun, the
    launch's group (gloo on CPU, NCCL on CUDA) with one model-parallel slice a process, as Meta's
    Llama3.build does; else world size 1 (gloo, an in-memory store: no ports, no files). True if
    this call made them."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    made = not dist.is_initialized()
    if made and runs.launched():
        runs.start(device)  # only rank 0 prints from here on
    elif made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with contextlib.redirect_stdout(sys.stderr):  # fairscale prints; keep stdout for completions
        if not fs_init.model_parallel_is_initialized():
            fs_init.initialize_model_parallel(dist.get_world_size())
            made = True
    return made


def destroy_model_parallel(ok: bool = True):
    """Undo init_model_parallel (ok: the run went well, so every process waits for the others)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if runs.launched():
        runs.finish(ok)
    elif dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def torch_defaults(dtype: Optional[torch.dtype] = None, device=None):
    """Meta's code allocates with torch's default dtype and device; set them for it, then put
    back what was there so nothing leaks into the caller (or the next test)."""
    old_dtype, old_device = torch.get_default_dtype(), torch.get_default_device()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        if device is not None:
            torch.set_default_device(device)
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        # None, not "cpu": an explicit default device costs a Python hook on every tensor factory
        torch.set_default_device(None if old_device.type == "cpu" else old_device)


# -----------------------------------------------------------------------------
# loading a checkpoint into Meta's model, and generating with Meta's loop


def load_reference(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
                   device=None, dtype=None):
    """Meta's Transformer and Tokenizer on a Meta-layout checkpoint, wrapped in Meta's Llama3
    (which holds the sampling loop). The tokenizer file is found as llama31.py finds it."""
    generation = meta_generation()
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        raise ConfigError(f"{ckpt_dir} is a file; Meta's code reads only Meta's layout (params.json + "
                          f"consolidated.00.pth), not GGUF")
    if not ckpt_dir.is_dir():
        raise ConfigError(f"checkpoint directory {ckpt_dir} does not exist")
    if (ckpt_dir / "config.json").is_file() and not (ckpt_dir / "params.json").is_file():
        raise ConfigError(f"{ckpt_dir} is in HF's layout; Meta's code reads only Meta's: convert it with "
                          f"python export.py --ckpt_dir {ckpt_dir} --out_dir DIR --format meta")
    params = read_params(ckpt_dir)
    shards = sorted(ckpt_dir.glob("*.pth"))
    world = int(os.environ.get("WORLD_SIZE", "1")) if runs.launched() else 1
    if len(shards) != world:
        raise ConfigError(f"{ckpt_dir} holds {len(shards)} *.pth files, and Meta's code reads one a process: run "
                          + (f"torchrun --nproc_per_node {len(shards)} reference.py" if len(shards) > 1 else
                             "reference.py in one process"))
    args = MetaArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
    if args.use_scaled_rope:
        # what llama31 would use (stated, or known for Llama 3.2 1B/3B) against Meta's hard-coded rule
        ours = (resolve_rope_factor(params.get("rope_scale_factor"), None, args.dim, args.n_layers,
                                    ckpt_dir / "params.json"),
                params.get("rope_low_freq_factor", 1.0), params.get("rope_high_freq_factor", 4.0),
                params.get("rope_original_max_len", 8192))
        if ours != (8.0, 1.0, 4.0, 8192):
            raise ConfigError(f"{ckpt_dir / 'params.json'}: this model's RoPE scaling (factor, low, high, original "
                              f"length = {ours}) is not Llama 3.1's (8, 1, 4, 8192), which llama-models 0.3.0 "
                              f"always uses; it cannot check this model")
    device = check_device(device or default_device())
    dtype = resolve_dtype(dtype, device)
    tokenizer = MetaTokenizer(find_tokenizer_model(tokenizer_path, ckpt_dir))
    if args.vocab_size == -1:  # Meta's default, meaning "the tokenizer's" (as llama31 and Llama 2's build read it)
        args.vocab_size = tokenizer.n_words
    if args.vocab_size != tokenizer.n_words:
        raise ConfigError(f"{ckpt_dir / 'params.json'} says vocab_size {args.vocab_size} but the tokenizer "
                          f"has {tokenizer.n_words} tokens; use the tokenizer.model that came with it")
    init_model_parallel(device)
    state = formats.torch_load(shards[int(os.environ.get("RANK", "0")) if world > 1 else 0])
    # fairscale allocates its weights with torch.Tensor(...), i.e. in the default dtype, on CPU
    with torch_defaults(dtype=dtype):
        model = MetaTransformer(args)
    model.load_state_dict(state, strict=True)
    del state
    model.to(device)  # its KV caches and RoPE table follow the activations on first use
    return generation.Llama3(model, tokenizer, args)


def model_device(ref) -> torch.device:
    return next(ref.model.parameters()).device


def reference_generate(ref, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                       temperature: float = 0.6, top_p: float = 0.9) -> List[List[int]]:
    """New tokens per prompt from Meta's Llama3.generate, up to and excluding a stop token and at
    most max_gen_len of them (what llama31's Llama.generate returns; Meta's loop lets a short
    prompt run on until the longest has max_gen_len). Sampling draws from torch's global RNG."""
    from llama_models.llama3.chat_format import LLMInput

    limit = max_gen_len or ref.args.max_seq_len - 1
    out = [[] for _ in prompt_tokens]
    # Meta's loop allocates its token buffer on the default device, as Llama3.build had left it
    with torch_defaults(device=model_device(ref)):
        inputs = [LLMInput(tokens=list(t)) for t in prompt_tokens]
        for step in ref.generate(inputs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len):
            for r in step:
                # a row is finished from its stop token on
                if not r.ignore_token and not r.finished and len(out[r.batch_idx]) < limit:
                    out[r.batch_idx].append(r.token)
    return out


def encode_prompts(ref, prompts: List[str]) -> List[List[int]]:
    """BOS + text, through Meta's formatter, as Llama3.completion encodes a plain-text prompt."""
    return [ref.formatter.encode_content(p).tokens for p in prompts]


def reference_text_completion(ref, prompts: List[str], max_gen_len: Optional[int] = None,
                              temperature: float = 0.6, top_p: float = 0.9) -> List[str]:
    outs = reference_generate(ref, encode_prompts(ref, prompts), max_gen_len, temperature, top_p)
    return [ref.tokenizer.decode(t) for t in outs]


def meta_messages(dialog: List[dict]):
    """A dialog of message dicts (tokenizer.ChatFormat's shape) as llama-models' RawMessages (a tool's
    answer has role "tool" there)."""
    from llama_models.datatypes import RawMessage, RawTextItem, StopReason, ToolCall

    out = []
    for m in dialog:
        m = dict(m, role="tool" if m["role"] == "ipython" else m["role"])
        if isinstance(m.get("content"), list):
            m["content"] = [RawTextItem(text=x) if isinstance(x, str) else RawTextItem(**x) for x in m["content"]]
        if m.get("stop_reason"):
            m["stop_reason"] = StopReason(m["stop_reason"])
        m["tool_calls"] = [ToolCall(call_id=c.get("call_id", "id"), tool_name=c["tool_name"], arguments=c["arguments"])
                           for c in m.get("tool_calls", [])]
        out.append(RawMessage(**m))
    return out


def read_dialogs(dialogs) -> List[List[dict]]:
    """--dialogs: a JSON file of a list of dialogs (lists of message dicts), or that list itself."""
    if isinstance(dialogs, str) and Path(dialogs).is_file():
        try:
            dialogs = json.loads(Path(dialogs).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--dialogs {dialogs} is not a JSON file ({e}); give a JSON list of dialogs") from None
    if not isinstance(dialogs, list) or not dialogs or not all(isinstance(d, list) and d for d in dialogs):
        raise ConfigError(f"--dialogs must be a JSON file (or list) of dialogs, each a list of messages, got "
                          f"{str(dialogs)[:60]!r}")
    return dialogs


def check_prompts(prompt_tokens, max_seq_len: int, max_batch_size: int):
    """Meta's loop silently yields nothing for a prompt that is too long; say what to do instead."""
    if len(prompt_tokens) > max_batch_size:
        raise ConfigError(f"{len(prompt_tokens)} prompts but max_batch_size is {max_batch_size}; "
                          f"raise max_batch_size")
    for i, t in enumerate(prompt_tokens):
        if len(t) >= max_seq_len:
            raise ConfigError(f"prompt {i} has {len(t)} tokens but max_seq_len is {max_seq_len}, leaving "
                              f"no room to generate; raise max_seq_len or shorten the prompt")


# -----------------------------------------------------------------------------
# comparing llama31 with the reference: greedy tokens, then teacher-forced logits


@dataclass
class PromptReport:
    prompt: int  # index into the prompt list
    n_prompt: int  # prompt length in tokens, BOS included
    ours: List[int]  # llama31's greedy tokens
    theirs: List[int]  # the reference's greedy tokens
    max_abs_diff: float  # max |logit difference| over the positions both read (teacher-forced)
    diverge_at: Optional[int] = None  # index into the completion of the first differing token
    our_token: Optional[int] = None
    their_token: Optional[int] = None
    our_gap: float = 0.0  # our logit of our token minus our logit of theirs
    their_gap: float = 0.0  # and the same for the reference


@torch.inference_mode()
def teacher_forced_logits(llama: Llama, ref, tokens: List[int]):
    """Both models' fp32 logits (T, vocab) for one sequence read in a single pass from position 0."""
    x = torch.tensor([tokens], dtype=torch.long)
    ours = llama.model.forward_inference(x.to(llama.model.output.weight.device))[0]
    theirs = ref.model.forward(x.to(model_device(ref)), 0)[0]
    return ours.float().cpu(), theirs.float().cpu()


def compare_models(llama: Llama, ref, prompt_tokens: List[List[int]], max_gen_len: int) -> List[PromptReport]:
    """Greedy-decode every prompt with both models, then re-read prompt + the shared greedy prefix
    (and the next token) with both to measure how far apart their logits are."""
    ours = llama.generate(prompt_tokens, max_gen_len, temperature=0.0)
    theirs = reference_generate(ref, prompt_tokens, max_gen_len, temperature=0.0)
    reports = []
    for i, (prompt, a, b) in enumerate(zip(prompt_tokens, ours, theirs)):
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        diverged = a != b
        # read prompt + common prefix: the logits at its last position chose the differing tokens
        lo, lt = teacher_forced_logits(llama, ref, list(prompt) + a[:same])
        n = len(prompt) - 1  # the logits at position n predict the first completion token
        rep = PromptReport(i, len(prompt), a, b, (lo[n:] - lt[n:]).abs().max().item())
        if diverged:
            p = len(prompt) + same - 1  # the position whose logits chose the differing tokens
            # a row that stopped early emitted a stop token there, which generate does not return
            rep.our_token = a[same] if same < len(a) else int(lo[p].argmax())
            rep.their_token = b[same] if same < len(b) else int(lt[p].argmax())
            rep.diverge_at = same
            rep.our_gap = (lo[p, rep.our_token] - lo[p, rep.their_token]).item()
            rep.their_gap = (lt[p, rep.their_token] - lt[p, rep.our_token]).item()
        reports.append(rep)
    return reports


def format_report(reports: List[PromptReport], decode) -> str:
    lines = []
    for r in reports:
        if r.diverge_at is None:
            lines.append(f"prompt {r.prompt}: identical, {len(r.ours)} tokens; "
                         f"teacher-forced max |dlogit| {r.max_abs_diff:.3g}")
        else:
            lines.append(f"prompt {r.prompt}: diverges at completion token {r.diverge_at} (position "
                         f"{r.n_prompt + r.diverge_at}): llama31 {r.our_token} {decode([r.our_token])!r} vs "
                         f"reference {r.their_token} {decode([r.their_token])!r}; logit gap llama31 "
                         f"{r.our_gap:+.4g}, reference {r.their_gap:+.4g}; max |dlogit| up to there "
                         f"{r.max_abs_diff:.3g}")
    first = next((r for r in reports if r.diverge_at is not None), None)
    if first is None:
        lines.append(f"identical: all {len(reports)} prompts give the same greedy tokens")
    else:
        lines.append(f"first divergence: prompt {first.prompt}, position {first.n_prompt + first.diverge_at}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI: python reference.py [compare] --ckpt_dir DIR ...


def _prompt_list(prompts) -> List[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ConfigError("no prompts given; pass at least one with --prompts")
    return prompts


def sample(ckpt_dir: str, tokenizer_path: Optional[str] = None, prompts=None, temperature: float = 0.6,
           top_p: float = 0.9, max_gen_len: int = 64, max_seq_len: int = 512, max_batch_size: Optional[int] = None,
           device: Optional[str] = None, dtype: Optional[str] = None, seed: int = 1):
    """Sample completions with Meta's code and print them as `python llama31.py` does.
    At temperature 0 the output should equal llama31.py's byte for byte."""
    prompts = _prompt_list(prompts)
    check_sampling_args(temperature, top_p, max_gen_len)
    device = check_device(device or default_device())
    t0 = time.time()
    ref = load_reference(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size or len(prompts), device, dtype)
    print(f"loaded {ckpt_dir} into Meta's reference on {device} ({next(ref.model.parameters()).dtype}) "
          f"in {time.time() - t0:.1f}s", file=sys.stderr)
    check_prompts(encode_prompts(ref, prompts), max_seq_len, ref.args.max_batch_size)
    torch.manual_seed(seed)  # Meta's sampler draws from the global generator
    completions = reference_text_completion(ref, prompts, max_gen_len, temperature, top_p)
    for prompt, completion in zip(prompts, completions):
        print(prompt + completion)
        print("-" * 80)


def compare(ckpt_dir: str, tokenizer_path: Optional[str] = None, prompts=None, max_gen_len: int = 64,
            max_seq_len: int = 512, device: Optional[str] = None, dtype: str = "fp32", dialogs=None):
    """Load the checkpoint into both llama31 and Meta's reference (two copies of the weights),
    decode every prompt greedily with both, and report the first divergence. Exits with status 1
    if there is one (or if the tokenizers disagree), so scripts can use it as a check. fp32 on
    every device unless --dtype says otherwise: in bf16 the two differ by rounding alone (SDPA
    against Meta's matmul and softmax, a batch against one row), which greedy decoding amplifies.
    --dialogs (a JSON file of dialogs, tool calls and tool answers included): the prompts are those
    dialogs in Llama 3's chat format, written by both, and each greedy reply is read back by both
    (content, tool calls, stop reason)."""
    dialogs = read_dialogs(dialogs) if dialogs is not None else None
    prompts = _prompt_list(prompts) if dialogs is None else [str(d[-1].get("content", "")) for d in dialogs]
    check_sampling_args(0.0, 1.0, max_gen_len)
    device = check_device(device or default_device())
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, len(prompts), device, dtype)
    ref = load_reference(ckpt_dir, tokenizer_path, max_seq_len, len(prompts), device, dtype)
    dtype = llama.model.norm.weight.dtype
    note = "" if dtype == torch.float32 else "; not fp32, so rounding alone can make them diverge"
    print(f"comparing llama31 and Meta's reference on {device} ({dtype}{note}), "
          f"{len(prompts)} prompts x {max_gen_len} greedy tokens", file=sys.stderr)
    if dialogs is None:
        ours, theirs = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts], encode_prompts(ref, prompts)
    else:
        ours = [llama.chat_format.encode_dialog(llama.tokenizer, d) for d in dialogs]
        theirs = [ref.formatter.encode_dialog_prompt(meta_messages(d)).tokens for d in dialogs]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"tokenizers differ on prompt {i} at token {k}: llama31 {a[k:k + 4]} vs reference {b[k:k + 4]}")
            sys.exit(1)
    check_prompts(ours, max_seq_len, len(prompts))
    reports = compare_models(llama, ref, ours, max_gen_len)
    print(format_report(reports, llama.tokenizer.decode))
    misread = [i for i, r in enumerate(reports) if dialogs is not None and not same_reading(llama, ref, r.ours)]
    if misread:
        print(f"the replies to dialogs {misread} are read back differently (content, tool calls or stop reason)")
    if misread or any(r.diverge_at is not None for r in reports):
        sys.exit(1)  # not a return value: fire would print it


def same_reading(llama: Llama, ref, tokens: List[int]) -> bool:
    """Whether our ChatFormat.decode_assistant and Meta's decode_assistant_message read a reply alike."""
    from llama_models.datatypes import StopReason

    ours = llama.chat_format.decode_assistant(llama.tokenizer, tokens)
    theirs = ref.formatter.decode_assistant_message(tokens, StopReason.out_of_tokens)
    calls = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in theirs.tool_calls]
    return (ours["content"], ours["stop_reason"], [(c["tool_name"], c["arguments"]) for c in ours["tool_calls"]]) \
        == (theirs.content, theirs.stop_reason.value, calls)


def main(argv=None):
    import fire

    argv = sys.argv[1:] if argv is None else list(argv)
    command, name = (compare, "compare") if argv[:1] == ["compare"] else (sample, "reference.py")
    if command is compare:
        argv = argv[1:]
    made, ok = False, False
    try:
        runs.check_flags(command, argv, "reference.py" + (" compare" if command is compare else ""))
        if command is compare and runs.launched():
            raise ConfigError("reference.py compare runs in one process; under torchrun, run reference.py and "
                              "llama31.py each and compare what they print")
        if runs.launched():  # load_reference makes the group, on its device's backend
            runs.quiet_unless_master(int(os.environ.get("RANK", "0")))
        else:
            made = init_model_parallel()
        fire.Fire(command, command=argv, name=name)
        ok = True
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        runs.let_rank_0_speak()
        sys.exit(2)
    finally:
        if made or runs.launched():
            destroy_model_parallel(ok)


if __name__ == "__main__":
    main()
