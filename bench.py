"""
Speed and memory of llama31 measured side by side with HF transformers' LlamaForCausalLM: the same
random weights, the same dtype, one process, runs interleaved so both see the same machine.

    python bench.py                                           # CPU: 90M shape, fp32 and bf16
    python bench.py --device cuda --shape 8b --dtypes bf16    # GPU: decode of the 8B shape
    python bench.py --device cuda --shape 1b --dtypes bf16    # GPU: finetune MFU of the 1B shape

Rows (median over --repeats runs after a warm-up; ratio = llama31 / HF, the median of the
per-round ratios with their range in brackets):
  roof      the decode roofline: weight bytes/s of y = x @ W.T for the output layer's (vocab, dim)
            matrix by the fastest kernel PyTorch has for it (aten's; on CPU in bf16 with oneDNN
            on and off; Inductor's multiply-and-sum), and the plain read bandwidth of W
  decode    batch-1 greedy tokens/s after the first token: llama31's generate_stream against HF's
            generate(do_sample=False, min_new_tokens=max_new_tokens), and against a bare loop of
            HF forward calls; "% of roof" is (weights but the embedding + KV cache read per
            token) x tokens/s over the roof kernel's bytes/s, timed in the same rounds (median of
            the per-round ratios)
  prefill   prompt tokens/s of one forward that fills the KV cache and returns the last logits
  finetune  tokens/s of forward + backward + AdamW step (fused AdamW on both sides, HF Trainer's
            default; bf16: autocast over fp32 weights, as llama31.py finetune does; MFU on known
            GPUs)
  compiled  the same for llama31 under torch.compile (compiled.compile_inference for decode
            and prefill, torch.compile(model) as finetune --compile); --nocompile drops these rows.
            Compiled decoding is decode_step over the whole fixed-length cache (CUDA graphs on
            CUDA); its "% of roof" counts only the cache up to the current position
  lora      finetune (forward + backward + AdamW) of the whole model, of LoRA adapters (finetune's
            defaults: rank 8 on wq,wk,wv,wo) on the fp32 base, and of the same adapters on an int8
            and an int4 base (QLoRA), each in a fresh process on the same random weights, loaded
            the way finetune loads them: tokens/s and peak memory (CPU: the process's peak RSS;
            CUDA: peak allocated), over full finetuning's
  GPU       roof and read timings by CUDA events over at least 50 ms each
  load      peak RSS growth of load_model + touching every weight, in a fresh process, over the
            checkpoint's file size (the checkpoint is saved in the row's dtype, loaded in it)
  chat      time to the first token of turn 10 over turn 1 of a scripted greedy chat with the demo
            model (its own shape, not --shape), KV cache kept between turns (chat.Conversation);
            the notes give the same ratio for a fresh prefill of the whole dialog each turn
  quant     decode tokens/s of the shape's weights in int8 and int4 (quantize.py) against the same
            weights dense, in the row's dtype; and the demo GGUF kept quantized against llama.cpp
            (llama-cpp-python, when installed) on the same file and thread count
  llamacpp  CPU decode tokens/s against llama.cpp (llama-cpp-python, when installed) on the same
            GGUF file and threads: the demo as run by default (fp32), kept int4 (bf16) and compiled;
            a random Q4_0 file of the shape (Llama 3 vocabulary); products a token and the roof
  serve     serve.py (a process of its own, the demo GGUF as it serves it by default: fp32, 16
            slots, the same threads): aggregate decode tokens/s of 1, 4 and 16 concurrent streamed
            completions of 2 x new_tokens tokens each, the streams' decode tokens (after
            each one's first) over the time from the first first token to the last token; against
            one stream; time to the first token p50/p99 at each; in-process generate_stream for
            reference (llama.cpp's server with parallel slots is not run here)
  speculative  CPU: the demo's decode tokens/s as `python llama31.py` runs it (fp32, its 4-bit
            matrices dequantized) against its 4-bit matrices kept (fp32 with bf16 rows; bf16) and
            against speculative decoding with its own 4-bit matrices as the draft (k = 2..6), on
            the demo's chat questions, greedy: acceptance, tokens a verification, and whether each
            answer is the default's text. Any device: the shape's cost of verifying k + 1 tokens in
            one pass against one plain decode step (random weights: no acceptance to measure)
  --tp N    decode tokens/s of the shape sampled tensor parallel (tp.py) by N processes under
            torchrun against one, and each process's peak RSS growth over its RSS before loading
            (memory-mapped pages of the file included), from one Meta-layout file of the weights
"""

import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

import chat
import formats
import llama31
import runs
from llama31 import Llama, ModelArgs, Transformer
from variants import Draft
from variants import compiled, lora, matvec, quantize
from variants import tp as tensor_parallel
from tokenizer import Tokenizer, find_tokenizer_model, gguf_vocab_fields

# Llama 3.1 shapes; 90m keeps the real vocabulary, so its output layer is the largest matrix
SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32,
                 ffn_dim_multiplier=1.3),  # tests
    "90m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=1024,
                ffn_dim_multiplier=1.3),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, rope_scale_factor=32.0),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3),
}
for _shape in SHAPES.values():
    _shape.update(use_scaled_rope=True, rope_theta=500000.0)  # Llama 3.1's RoPE
SECTIONS = ("roof", "decode", "prefill", "finetune", "lora", "load", "chat", "quant", "llamacpp",
            "speculative", "serve")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def interleaved(cases: dict, repeats: int, warmup: int = 1) -> dict:
    """Run every case `warmup` times, then `repeats` rounds of one run each, alternating, so slow
    spells of a shared machine hit all cases alike. Each case returns a number; lists come back."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    results = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            results[name].append(fn())
    return results


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ratio(r: dict, a: str, b: str) -> str:
    """Median of the per-round ratios a/b (each round ran both back to back), and their range."""
    rs = sorted(x / y for x, y in zip(r[a], r[b]))
    return f"{median(rs):.2f}x" + (f" ({rs[0]:.2f}-{rs[-1]:.2f})" if len(rs) > 1 else "")


# -----------------------------------------------------------------------------
# the two models on the same weights


def build_ours(args: ModelArgs, dtype, device, seed: int) -> Transformer:
    """Random weights, with the one-row products a load gives a CPU model (matvec.py)."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = Transformer(args).eval()
    if torch.device(device).type == "cpu":
        matvec.OneRow().loaded(model)
    return model


def build_hf(ours: Transformer):
    """LlamaForCausalLM with SDPA attention holding a copy of ours' weights (converted the way
    save_hf converts them)."""
    import transformers

    p = ours.output.weight
    ids = {} if ours.args.vocab_size > 128001 else {"bos_token_id": None, "eos_token_id": None}  # tiny vocab
    cfg = transformers.LlamaConfig(**formats.hf_config(ours.args.to_params(), ours.args.ffn_hidden_dim, p.dtype, **ids))
    with torch.device(p.device):
        hf = transformers.LlamaForCausalLM._from_config(cfg, dtype=p.dtype, attn_implementation="sdpa")
    hf.load_state_dict(formats.to_hf_state_dict(ours.state_dict(), ours.args.to_params()))
    return hf.eval()


# -----------------------------------------------------------------------------
# measurements


def gemv_roof(args: ModelArgs, dtype, device, repeats: int, compile: bool = True):
    """The machine's decode roofline: weight bytes/s of y = x @ W.T for the (vocab, dim) output
    matrix, the largest one a decode step reads, by the fastest kernel PyTorch has for it: the
    aten matmul (on CPU in bf16 with oneDNN on and off), and Inductor's multiply-and-sum (what
    llama31's compiled decode step uses). Also the plain read bandwidth of W, for reference."""
    torch.manual_seed(0)
    w = torch.randn(args.vocab_size, args.dim, device=device).to(dtype)
    x = torch.randn(1, args.dim, device=device).to(dtype)
    n = max(2, min(200, int(1e9 // w.nbytes)))  # ~1 GB per timing on a CPU (tiny shapes: 200 calls)

    def timer(fn, onednn=True):
        def run():
            with matvec.onednn_enabled(onednn):
                if device.type == "cuda":
                    return w.nbytes / gpu_seconds(fn)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                return w.nbytes * n / (time.perf_counter() - t0)
        return run

    cases = {"x @ W.T": timer(lambda: x @ w.T), "read": timer(lambda: w.sum())}
    if compile:
        multiply_sum = torch.compile(lambda x, w: (x.float().unsqueeze(-2) * w.float()).sum(-1).type_as(x))
        cases["compiled multiply-sum"] = timer(lambda: multiply_sum(x, w))
    if device.type == "cpu" and dtype != torch.float32:
        cases["x @ W.T, oneDNN off"] = timer(lambda: x @ w.T, onednn=False)
    res = {k: median(v) for k, v in interleaved(cases, repeats).items()}
    read = res.pop("read")
    best = max(res, key=res.get)
    notes = [best] + [f"{k} {fmt(v, 'B/s')}" for k, v in res.items() if k != best]
    return res[best], "; ".join(notes + [f"plain read {fmt(read, 'B/s')}"]), cases[best]


def gpu_seconds(fn, at_least: float = 0.05) -> float:
    """Seconds per call of fn on the GPU, by CUDA events over enough calls to take at_least
    seconds: one read of a 1 GB matrix takes about 0.2 ms on an H200, shorter than the launch and
    synchronisation noise of a host clock."""
    def timed(calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls

    once = timed(3)
    return timed(max(3, math.ceil(at_least / once)))


def decode_bytes_per_token(model: Transformer, context: float) -> float:
    """Bytes one decode step must read: every weight but the embedding table (one row of it is
    gathered), plus the KV cache up to the current position."""
    a = model.args
    weights = sum(p.nbytes for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))
    if model.output.weight is model.tok_embeddings.weight:  # tied: the output reads the table
        weights += model.output.weight.nbytes
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * context * model.output.weight.element_size()
    return weights + kv


class _Ids:
    """What Llama.generate_stream needs of a tokenizer: no stop tokens, so every run makes exactly
    new_tokens tokens (HF's side gets min_new_tokens for the same)."""
    pad_id = 0
    stop_tokens = []


class _Clock:
    """An HF streamer that only notes when each put() arrives (put 0 is the prompt)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_rate(times) -> float:
    """Tokens/s between the first new token and the last."""
    return (len(times) - 1) / (times[-1] - times[0])


def with_compiled(ours: Transformer, fn):
    """fn(llama) run with ours' inference compiled (compiled.compile_inference), eager outside it."""
    if getattr(ours, "_bench_compiled", None) is None:
        llama = compiled.compile_inference(Llama(ours, _Ids()))
        ours._bench_compiled = llama, ours.__dict__.pop("logits")

    def run():
        llama, ours.logits = ours._bench_compiled
        try:
            return fn(llama)
        finally:
            ours.__dict__.pop("logits")
    return run


def bench_decode(ours, hf, prompt_len: int, new_tokens: int, repeats: int, seed: int, compile: bool,
                 roof=None):
    """Decode tokens/s of each case, round by round; roof: a bytes/s timer run in the same rounds."""
    device = ours.output.weight.device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, ours.args.vocab_size, (1, prompt_len), generator=g)
    eager = Llama(ours, _Ids())

    def run_ours(llama=eager):
        times = []
        for _ in llama.generate_stream([prompt[0].tolist()], new_tokens, temperature=0):
            times.append(time.perf_counter())  # each step ends in .tolist(), so the device is done
        assert len(times) == new_tokens
        return decode_rate(times)

    ids = prompt.to(device)

    @torch.inference_mode()
    def run_hf():
        clock = _Clock(device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, streamer=clock, pad_token_id=0)
        assert out.shape[1] == prompt_len + new_tokens and len(clock.times) == new_tokens + 1
        return decode_rate(clock.times[1:])

    @torch.inference_mode()
    def run_hf_loop():
        # the least HF needs for greedy decoding: model calls on its cache and an argmax
        from transformers import DynamicCache
        cache, times, nxt = DynamicCache(config=hf.config), [], ids
        for _ in range(new_tokens):
            logits = hf(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            nxt.item()  # what a caller does with each token; also waits for the device
            times.append(time.perf_counter())
        return decode_rate(times)

    cases = {"ours": run_ours, "hf": run_hf, "hf_loop": run_hf_loop}
    if roof:
        cases["roof"] = roof
    if compile:
        cases["compiled"] = with_compiled(ours, run_ours)  # its warm-up run compiles
    return interleaved(cases, repeats)


def bench_prefill(ours, hf, prompt_len: int, repeats: int, seed: int, compile: bool):
    device = ours.output.weight.device
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, ours.args.vocab_size, (1, prompt_len), generator=g).to(device)

    def timed(fn):
        def run():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            return prompt_len / (time.perf_counter() - t0)
        return run

    def ours_prefill():
        ours.setup_caches(1, prompt_len)
        try:
            ours.forward_inference(ids, 0, last=1)
        finally:
            ours.clear_caches()

    @torch.inference_mode()
    def hf_prefill():
        hf(ids, use_cache=True, logits_to_keep=1)

    cases = {"ours": timed(ours_prefill), "hf": timed(hf_prefill)}
    if compile:
        cases["compiled"] = with_compiled(ours, lambda _: timed(ours_prefill)())  # its warm-up run compiles
    return interleaved(cases, repeats)


def bench_finetune(args: ModelArgs, dtype, device, B: int, T: int, repeats: int, seed: int, compile: bool):
    """Training step tokens/s. Weights fp32 (the optimizer's master copy); bf16/fp16 run the
    forward under autocast, as llama31.py finetune does. compile: also torch.compile(model), as
    finetune --compile does (same weights, its own optimizer; its warm-up step compiles)."""
    ours = build_ours(args, torch.float32, device, seed).train()
    hf = build_hf(ours).train()
    # fused AdamW on both sides: llama31's configure_optimizers and HF Trainer's default
    # (adamw_torch_fused) both use it on CUDA and CPU
    fused = device.type in ("cuda", "cpu")
    opt_ours = ours.configure_optimizers(0.0, 1e-5, device_type=device.type)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    g = torch.Generator().manual_seed(seed + 2)
    data = torch.randint(0, args.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def step(fn, opt):
        def run():
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = fn()
            loss.backward()
            opt.step()
            sync(device)
            return B * T / (time.perf_counter() - t0)
        return run

    # HF shifts labels itself: labels=x predicts x[1:] from x[:-1], the same work as ours on (x, y)
    cases = {"ours": step(lambda: ours(x, y), opt_ours), "hf": step(lambda: hf(input_ids=x, labels=x).loss, opt_hf)}
    if compile:
        compiled = torch.compile(ours)
        cases["compiled"] = step(lambda: compiled(x, y), ours.configure_optimizers(0.0, 1e-5, device_type=device.type))
    res = interleaved(cases, repeats)
    peak = runs.peak_flops(device, dtype)
    if peak:
        fpt = runs.flops_per_token(ours, T)
        res["mfu"] = {k: median(v) * fpt / peak for k, v in res.items()}
    return res


FINETUNE_MODES = ("full", "lora", "qlora-int8", "qlora-int4")


def random_state(args: ModelArgs, seed: int) -> dict:
    """Random weights under Meta's names as formats.Lazy tensors (matrices N(0, 0.02), gains 1),
    made 4096 rows at a time as they are read, so a quantized load never holds a whole matrix in
    fp32 (the 1B shape's embedding is 1 GB of it)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    rows = quantize.ROWS_AT_ONCE

    def lazy(name, shape):
        def read_rows(lo, hi):  # filled in place, block by block: no second copy of a matrix
            out = torch.empty(hi - lo, shape[1])
            for i in range(lo // rows, (hi - 1) // rows + 1):
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}/{i}".encode()))
                block = torch.empty(min(rows, shape[0] - i * rows), shape[1]).normal_(0, 0.02, generator=g)
                a, b = max(lo, i * rows), min(hi, i * rows + block.shape[0])
                out[a - lo:b - lo] = block[a - i * rows:b - i * rows]
            return out
        if len(shape) == 1:
            return formats.Lazy(shape, lambda: torch.ones(shape))
        return formats.Lazy(shape, lambda: read_rows(0, shape[0]), read_rows=read_rows)
    return {k: lazy(k, shape) for k, shape in shapes.items()}


def finetune_worker(shape: dict, mode: str, dtype_name: str, device: str, B: int, T: int, steps: int, seed: int):
    """Child process: one finetune setup of `mode` (FINETUNE_MODES) built as setup_training builds
    it (fp32 weights, or an int8/int4 base, from load_checkpoint's assemble; adapters; AdamW on
    what trains), then steps + 1 steps (the first a warm-up). Prints JSON: tokens/s of each timed
    step, peak memory (CPU: VmHWM; CUDA: peak allocated) and RSS before the model existed."""
    dev = torch.device(device)
    before = baseline_rss_kb()
    args = ModelArgs(**shape)
    variants = [quantize.Quantize(mode.split("-")[1])] if mode.startswith("qlora") else []
    model = llama31.assemble(args, random_state(args, seed), "bench", "random weights", dev, torch.float32,
                             variants).train()
    if mode != "full":
        lora.add_adapters(model, lora.LoRAConfig(), torch.Generator().manual_seed(seed))
    llama31.select_trainable(model, "all" if mode == "full" else "lora")
    opt = model.configure_optimizers(0.0, 1e-5, device_type=dev.type)
    autocast = runs.training_autocast(runs.DTYPES[dtype_name], dev)
    data = torch.randint(0, args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(seed + 2)).to(dev)
    x, y = data[:, :-1], data[:, 1:]
    rates = []
    for _ in range(steps + 1):
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(x, y)
        loss.backward()
        opt.step()
        sync(dev)
        rates.append(B * T / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss_kb("VmHWM") * 1024
    print(json.dumps({"rates": rates[1:], "peak_bytes": peak, "before_bytes": before * 1024, "loss": loss.item(),
                      "trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


def bench_lora(shape: dict, dtype_name: str, dev, P) -> dict:
    """finetune_worker of each mode, one fresh process after another."""
    results = {}
    for mode in FINETUNE_MODES:
        code = (f"import bench, torch; torch.set_num_threads({torch.get_num_threads()}); "
                f"bench.finetune_worker({shape!r}, {mode!r}, {dtype_name!r}, {str(dev)!r}, {P.B}, {P.T}, "
                f"{P.train_repeats}, {P.seed})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode:
            raise RuntimeError(f"finetune worker ({mode}) failed:\n{out.stderr}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def baseline_rss_kb() -> int:
    """A worker's RSS before its model, in KiB, after the one-time import of torch's meta-device
    machinery (which would otherwise count as the model's)."""
    with torch.device("meta"):
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=8))
    return rss_kb("VmRSS")


def rss_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc on Linux. Not ru_maxrss
    there: Linux carries it across fork + exec, so a child of a big parent reports the parent's
    size. Elsewhere ru_maxrss (bytes on macOS) is the best there is."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def load_worker(ckpt_dir: str, dtype: str, quantize_mode=None):
    """Child process: RSS before and peak after loading and touching every weight, as JSON (with
    quantize_mode: load_checkpoint's, and the bytes of the weights it made)."""
    before = baseline_rss_kb()
    if quantize_mode is None:
        model = llama31.load_model(ckpt_dir, max_seq_len=256, max_batch_size=1, device="cpu", dtype=dtype)
    else:
        model = llama31.load_checkpoint(ckpt_dir, None, "cpu", dtype, quantize_mode, tokenizer=False,
                                        max_seq_len=256, max_batch_size=1).model
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    with torch.no_grad():  # reads every byte of every weight
        total = sum(float(t.float().sum()) for t in tensors.values())
    print(json.dumps({"before_kb": before, "peak_kb": rss_kb("VmHWM"), "checksum": total,
                      "weight_bytes": sum(t.nbytes for t in tensors.values())}))


def quantized_load(path: str, mode: str) -> dict:
    """load_worker in a fresh process, loading path quantized (mode: keep, int8 or int4)."""
    code = f"import bench; bench.load_worker({path!r}, 'bf16', {mode!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    if out.returncode:
        raise RuntimeError(f"load worker failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {**r, "grown": (r["peak_kb"] - r["before_kb"]) * 1024, "file": Path(path).stat().st_size}


def bench_load(args: ModelArgs, dtype_name: str, seed: int):
    """Save a checkpoint in dtype, load it in dtype in a fresh process; RSS growth / file bytes."""
    dtype = runs.DTYPES[dtype_name]
    model = build_ours(args, dtype, torch.device("cpu"), seed)
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as d:
        llama31.save_meta(model, d, dtype=dtype)
        del model
        gc.collect()
        size = sum(f.stat().st_size for f in Path(d).glob("*.pth"))
        code = f"import bench; bench.load_worker({d!r}, {dtype_name!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode:
            raise RuntimeError(f"load worker failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = (r["peak_kb"] - r["before_kb"]) * 1024  # ru_maxrss is in KiB on Linux
    return {"file_bytes": size, "rss_bytes": grown, "ratio": grown / size, "base_bytes": r["before_kb"] * 1024}


# -----------------------------------------------------------------------------
# the rows of each section, for one dtype (P: main's settings)


def roof_rows(args, name, dev, sections, P):
    roof, note, P.roof[name] = gemv_roof(args, runs.DTYPES[name], dev, P.repeats, P.compile)
    return [(f"GEMV roof {args.vocab_size}x{args.dim}", name, fmt(roof, "B/s"), "", "", note)]


def decode_rows(args, name, dev, sections, P):
    """Decode and prefill (both or either) on one pair of models."""
    ours = build_ours(args, runs.DTYPES[name], dev, P.seed)
    hf = build_hf(ours)
    rows = []
    if "decode" in sections:
        roof = P.roof.get(name)  # the roof kernel, timed in each decode round: a shared machine's
        # speed drifts between sections, and decode over a roof timed minutes apart can pass 100%
        r = bench_decode(ours, hf, P.prompt_len, P.new_tokens, P.repeats, P.seed, P.compile, roof)
        bpt = decode_bytes_per_token(ours, P.prompt_len + P.new_tokens / 2)

        def of_roof(who, rate):
            if not roof:
                return ""
            return f"{who}{100 * median([x * bpt / y for x, y in zip(rate, r['roof'])]):.0f}% of roof"
        notes = [of_roof("", r["ours"]), of_roof("HF ", r["hf"]), f"{fmt(bpt, 'B')} read/token"]
        rows.append(("decode tok/s (HF generate)", name, fmt(median(r["ours"])), fmt(median(r["hf"])),
                     ratio(r, "ours", "hf"), "; ".join(n for n in notes if n)))
        rows.append(("decode tok/s (HF forward loop)", name, fmt(median(r["ours"])), fmt(median(r["hf_loop"])),
                     ratio(r, "ours", "hf_loop"), of_roof("HF ", r["hf_loop"])))
        if P.compile:
            rows.append(("decode tok/s, compiled (HF generate)", name, fmt(median(r["compiled"])),
                         fmt(median(r["hf"])), ratio(r, "compiled", "hf"), of_roof("", r["compiled"])))
    if "prefill" in sections:
        r = bench_prefill(ours, hf, P.prefill_len, P.repeats, P.seed, P.compile)
        rows.append((f"prefill tok/s ({P.prefill_len})", name, fmt(median(r["ours"])), fmt(median(r["hf"])),
                     ratio(r, "ours", "hf"), ""))
        if P.compile:
            rows.append(("prefill tok/s, compiled", name, fmt(median(r["compiled"])), fmt(median(r["hf"])),
                         ratio(r, "compiled", "hf"), ""))
    return rows


def finetune_rows(args, name, dev, sections, P):
    dtype = runs.DTYPES[name]
    r = bench_finetune(args, dtype, dev, P.B, P.T, P.train_repeats, P.seed, P.compile)
    note = "autocast over fp32 weights" if dtype != torch.float32 else ""

    def mfu(k):
        return f"MFU {100 * r['mfu'][k]:.1f}% (HF {100 * r['mfu']['hf']:.1f}%)" if "mfu" in r else ""
    rows = [(f"finetune tok/s (B={P.B} T={P.T})", name, fmt(median(r["ours"])), fmt(median(r["hf"])),
             ratio(r, "ours", "hf"), "; ".join(n for n in (note, mfu("ours")) if n))]
    if P.compile:
        rows.append(("finetune tok/s, compiled", name, fmt(median(r["compiled"])), fmt(median(r["hf"])),
                     ratio(r, "compiled", "hf"), mfu("compiled")))
    return rows


def lora_rows(args, name, dev, sections, P):
    r = bench_lora(P.shape_kwargs, name, dev, P)
    full = r["full"]
    what = "peak allocated" if dev.type == "cuda" else "peak RSS"
    rows = [(f"finetune tok/s full (B={P.B} T={P.T})", name, fmt(median(full["rates"])), "", "",
             f"{P.shape_note}{full['trained'] / 1e6:,.1f}M trained; {what} {fmt(full['peak_bytes'], 'B')} "
             f"(process had {fmt(full['before_bytes'], 'B')} before the model)")]
    goals = {"lora": (1.0, 0.45), "qlora-int8": (None, None), "qlora-int4": (None, 0.3)}
    for mode in FINETUNE_MODES[1:]:
        label = "LoRA" if mode == "lora" else f"QLoRA {mode.split('-')[1]}"
        speed_goal, memory_goal = goals[mode]
        tps = median(r[mode]["rates"]) / median(full["rates"])
        rows.append((f"finetune tok/s {label} (vs full)", name, fmt(median(r[mode]["rates"])),
                     fmt(median(full["rates"])), f"{tps:.2f}x",
                     f"{r[mode]['trained'] / 1e6:.1f}M trained" + (f"; goal >= {speed_goal}x" if speed_goal else "")))
        mem = r[mode]["peak_bytes"] / full["peak_bytes"]
        rows.append((f"finetune {what} {label} (vs full)", name, fmt(r[mode]["peak_bytes"], "B"),
                     fmt(full["peak_bytes"], "B"), f"{mem:.2f}x",
                     f"goal <= {memory_goal}x" if memory_goal else ""))
    return rows


def load_rows(args, name, dev, sections, P):
    r = bench_load(args, name, P.seed)
    return [("load peak RSS / checkpoint", name, f"{r['ratio']:.2f}x", "", "",
             f"+{fmt(r['rss_bytes'], 'B')} for a {fmt(r['file_bytes'], 'B')} file "
             f"(process had {fmt(r['base_bytes'], 'B')} before)")]


def model_bytes(model: Transformer) -> int:
    """Bytes of every weight a decode step reads: all but the embedding table (a tied one is read
    as the output matrix), quantized or not."""
    tensors = {id(t): t for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if not name.startswith("tok_embeddings.") or model.args.tie_embeddings}
    return sum(t.nbytes for t in tensors.values())


def decode_rate_of(llama: Llama, prompt: list, new_tokens: int) -> float:
    times = [time.perf_counter() for _ in llama.generate_stream([prompt], new_tokens, temperature=0)]
    return decode_rate(times)


def bench_quant(args: ModelArgs, dtype_name: str, dev, P):
    """Decode tokens/s of the same random weights dense, int8 and int4 (group 32), quantized as
    load_checkpoint does, round by round."""
    dtype = runs.DTYPES[dtype_name]
    dense = build_ours(args, dtype, dev, P.seed)
    models = {"dense": dense}
    for mode in quantize.MODES:
        models[mode] = llama31.assemble(args, dict(dense.state_dict()), "bench", "weights", dev, dtype,
                                        [quantize.Quantize(mode), matvec.OneRow()])
    g = torch.Generator().manual_seed(P.seed)
    prompt = torch.randint(0, args.vocab_size, (P.prompt_len,), generator=g).tolist()
    cases = {k: (lambda m=m: decode_rate_of(Llama(m, _Ids()), prompt, P.new_tokens)) for k, m in models.items()}
    return interleaved(cases, P.repeats), {k: model_bytes(m) for k, m in models.items()}


def cpp_decoder(path, prompt: list, n: int):
    """A function timing n greedy tokens of llama.cpp (llama-cpp-python) on the GGUF file at path,
    with torch's thread count; None when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp
    cpp = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def run():
        cpp.reset()
        times = []
        for _ in cpp.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return decode_rate(times)
    return run


CPP_MISSING = "llama-cpp-python not installed (pip install llama-cpp-python builds llama.cpp, ~4 min)"


def bench_demo(dtype_name: str, dev, P):
    """Decode tokens/s of the demo GGUF kept quantized, against llama.cpp (llama-cpp-python) on the
    same file and thread count when it is installed; the dense paths for reference."""
    path = runs.find_demo_gguf()
    ours = Llama.build(path, max_seq_len=512, max_batch_size=1, device=dev, dtype=dtype_name)
    dense = Llama.build(path, max_seq_len=512, max_batch_size=1, device=dev, dtype=dtype_name, quantize="none")
    prompt = ours.tokenizer.encode(DEMO_PROMPT, bos=False, eos=False)
    n = max(P.new_tokens, 16)
    ours, dense = Llama(ours.model, _Ids()), Llama(dense.model, _Ids())  # no stop token: n tokens each run
    cases = {"kept": lambda: decode_rate_of(ours, prompt, n), "dense": lambda: decode_rate_of(dense, prompt, n)}
    cpp = cpp_decoder(path, prompt, n) if dev.type == "cpu" else None
    if cpp:
        cases["llama.cpp"] = cpp
    r = interleaved(cases, P.repeats)
    return r, ("llama-cpp-python " + importlib.metadata.version("llama-cpp-python")) if cpp else None


def quant_rows(args, name, dev, sections, P):
    rows = []
    r, nbytes = bench_quant(args, name, dev, P)
    for mode in quantize.MODES:
        gbs = median(r[mode]) * nbytes[mode] / 1e9
        rows.append((f"decode tok/s {mode} (vs dense)", name, fmt(median(r[mode])), fmt(median(r["dense"])),
                     ratio(r, mode, "dense"), f"{fmt(nbytes[mode], 'B')} of weights ({fmt(nbytes['dense'], 'B')} "
                     f"dense), {gbs:.1f} GB/s of them; goal vs bf16: int8 1.6x, int4 2.5x"))
    if dev.type == "cpu":
        r = quantized_load(str(runs.find_demo_gguf()), "keep")
        rows.append(("demo GGUF load peak RSS / weights", name, f"{r['grown'] / r['weight_bytes']:.2f}x", "", "",
                     f"+{fmt(r['grown'], 'B')} for {fmt(r['weight_bytes'], 'B')} of weights kept quantized, from a "
                     f"{fmt(r['file'], 'B')} file (its pages, memory-mapped, count in RSS); goal 1.3x"))
    r, cpp = bench_demo(name, dev, P)
    peer = "llama.cpp" if cpp else "dense"
    rows.append((f"demo GGUF decode tok/s (vs {'llama.cpp' if cpp else 'dense'})", name, fmt(median(r["kept"])),
                 fmt(median(r[peer])), ratio(r, "kept", peer),
                 f"kept quantized; dense {fmt(median(r['dense']))} tok/s; " +
                 (f"{cpp}, same threads; goal 1.0x" if cpp else
                  CPP_MISSING)))
    return rows


DEMO_PROMPT = "Once upon a time, in a small village by the sea,"


def products_per_token(model: Transformer) -> int:
    """Matrix products one decode step runs: a block's (4 fused, fused.py; 7 apart) and the output."""
    return sum(hasattr(m, "in_features") for name, m in model.named_modules() if not name.startswith("tok_emb"))


def read_bandwidth(dev, repeats: int) -> float:
    """Bytes/s of the best of repeats plain reads (a sum) of 256 MB: what a decode step's weights
    can at most stream at."""
    x = torch.ones(64 * 2**20, device=dev)

    def once():
        t0 = time.perf_counter()
        x.sum().item()
        return x.nbytes / (time.perf_counter() - t0)
    return max(once() for _ in range(repeats + 1))


def random_gguf(args: ModelArgs, seed: int, out: Path, gguf_type: str = "q4_0") -> Path:
    """The shape's random weights as one GGUF file in gguf_type (as export.py writes one), with Llama
    3's tokenizer: a file llama.cpp and llama31 both read."""
    path = out / f"random-{gguf_type}.gguf"
    model = build_ours(args, torch.float32, "cpu", seed)
    vocab = Tokenizer(find_tokenizer_model()).vocab
    fields = {**gguf_vocab_fields(vocab), "chat_template": formats.LLAMA3_CHAT_TEMPLATE}
    formats.save_gguf(model.state_dict(), args.to_params(), path, fields, gguf_type,
                      rope_freqs=llama31.rope_divisors(args) if args.use_scaled_rope else None)
    return path


def bench_gguf(path, configs: dict, dev, P):
    """Decode tok/s of one GGUF file built each way of configs (Llama.build's keywords), and of
    llama.cpp on it (when installed), round by round; with each model's products a token and
    weight bytes."""
    n = max(P.new_tokens, 16)
    models = {k: Llama.build(path, max_seq_len=512, max_batch_size=1, device=dev, **kw) for k, kw in configs.items()}
    prompt = next(iter(models.values())).tokenizer.encode(DEMO_PROMPT, bos=False, eos=False)
    for m in models.values():
        m.tokenizer = _Ids()  # no stop token: n tokens each run (a compiled model keeps its decoder)
    cases = {k: (lambda m=m: decode_rate_of(m, prompt, n)) for k, m in models.items()}
    cpp = cpp_decoder(path, prompt, n)
    if cpp:
        cases["llama.cpp"] = cpp
    about = {k: (products_per_token(m.model), model_bytes(m.model),
                 next(k for k, v in runs.DTYPES.items() if v == m.model.norm.weight.dtype))
             for k, m in models.items()}
    return interleaved(cases, P.repeats), about


def llamacpp_rows(args, name, dev, sections, P):
    """Decode tok/s against llama.cpp on the same GGUF file and thread count: the demo as `python
    llama31.py` runs it (dequantized to fp32), kept in 4 bits with bf16 activations (--quantize
    keep --dtype bf16), and that compiled; a random file of the shape in Q4_0 (shapes with Llama
    3's vocabulary) as a GGUF loads by default (int4, bf16), and compiled. Each row names its own
    dtype: the section runs once, with the first of --dtypes."""
    if name != P.dtypes[0]:
        return []
    if dev.type != "cpu":
        return [("llama.cpp decode", name, "CPU only", "", "", "")]
    kept = dict(quantize="keep", dtype="bf16")
    files = [("demo", runs.find_demo_gguf(), {"dequantized fp32 (the default)": dict(quantize="none", dtype="fp32"),
                                                 "int4 bf16 (--quantize keep)": kept,
                                                 "int4 bf16, --compile": dict(**kept, compile=True)})]
    rows, bandwidth = [], read_bandwidth(dev, P.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        if args.vocab_size == 128256:
            files.append((f"{P.shape_name} Q4_0", random_gguf(args, P.seed, Path(tmp)),
                          {"int4 bf16 (its default)": {}, "int4 bf16, --compile": dict(compile=True)}))
        for label, path, configs in files:
            configs = {k: v for k, v in configs.items() if P.compile or not v.get("compile")}
            r, about = bench_gguf(path, configs, dev, P)
            cpp = "llama.cpp" in r
            for config, (products, nbytes, dtype) in about.items():
                rows.append((f"{label} decode tok/s, {config} (vs llama.cpp)", dtype, fmt(median(r[config])),
                             fmt(median(r["llama.cpp"])) if cpp else "", ratio(r, config, "llama.cpp") if cpp else "",
                             f"{products} products/token, {fmt(nbytes, 'B')} of weights: roof "
                             f"{bandwidth / nbytes:.0f} tok/s at {fmt(bandwidth, 'B/s')} (a plain read)" +
                             ("" if cpp else f"; {CPP_MISSING}")))
    return rows


CHAT_QUESTIONS = ["What is the capital of France?", "And of Spain?", "Name a big river there.", "How long is it?",
                  "What is a famous dish?", "Name a painter.", "Name a city by the sea.", "What is the weather like?",
                  "Name a mountain.", "Thank you! One last fact?"]


def bench_chat(dtype_name: str, dev, repeats: int, new_tokens: int):
    """Time to the first token of each turn of a 10-turn greedy chat with the demo model: kept KV
    cache (chat.Conversation) against a fresh prefill of the whole dialog each turn (what a
    chat that keeps no cache does). Median per turn over the repeats."""
    llama = Llama.build(runs.find_demo_gguf(), max_seq_len=2048, max_batch_size=1, device=dev, dtype=dtype_name,
                        quantize="none")  # dense: the row is about the cache, and fp32 int kernels are slow
    kept, fresh = [[] for _ in CHAT_QUESTIONS], [[] for _ in CHAT_QUESTIONS]
    for _ in range(repeats + 1):  # the first pass warms up
        conv = chat.Conversation(llama, max_gen_len=new_tokens, temperature=0)
        for i, q in enumerate(CHAT_QUESTIONS):
            t0 = time.perf_counter()
            answer = conv.ask(q)
            next(answer)
            sync(dev)
            kept[i].append(time.perf_counter() - t0)
            "".join(answer)
        conv.close()
        for i in range(len(CHAT_QUESTIONS)):
            prompt = llama.chat_format.encode_dialog(llama.tokenizer, conv.messages[:2 * i + 1])
            t0 = time.perf_counter()
            next(llama.stream(prompt, 1, temperature=0))
            sync(dev)
            fresh[i].append(time.perf_counter() - t0)
    kept, fresh = [median(t[1:]) for t in kept], [median(t[1:]) for t in fresh]
    return kept, fresh, len(prompt)


def chat_rows(args, name, dev, sections, P):
    kept, fresh, tokens = bench_chat(name, dev, P.repeats, max(2, P.new_tokens // 2))
    return [(f"chat 1st-token time, turn {len(kept)} / turn 1", name, f"{kept[-1] / kept[0]:.2f}x", "", "",
             f"fresh prefill each turn: {fresh[-1] / fresh[0]:.2f}x; turn 1 {kept[0] * 1000:.0f} ms, turn "
             f"{len(kept)} {kept[-1] * 1000:.0f} ms (fresh {fresh[-1] * 1000:.0f} ms, {tokens}-token dialog); "
             f"demo model, goal <= 1.5x")]


SERVE_STREAMS = (1, 4, 16)


@contextmanager
def serving(path, slots: int, max_seq_len: int, *flags: str):
    """python serve.py on a free port of 127.0.0.1 with this process's thread count (and flags);
    its URL."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt_dir", str(path), "--port", "0",
                             "--max_batch_size", str(slots), "--max_seq_len", str(max_seq_len),
                             "--device", "cpu", "--dtype", "fp32", "--quantize", "none", *flags],
                            cwd=Path(__file__).resolve().parent, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if " at http://" in line:
                break
        else:
            raise RuntimeError("serve.py did not start")
        yield line.split(" at ")[1].split("/v1")[0]
    finally:
        proc.terminate()
        proc.wait()


def serve_round(url: str, streams: int, prompt: str, n: int, ttft: list) -> float:
    """streams streamed completions of n tokens each sent at once; the aggregate decode tok/s (each
    stream's n - 1 tokens after its first, from the first first token to the last token); each
    one's time to its first token appended to ttft."""
    import httpx

    go = threading.Barrier(streams)
    times = [None] * streams
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}

    def one(i):
        with httpx.Client(timeout=600) as http:
            go.wait()
            sent = time.perf_counter()
            first = None
            with http.stream("POST", url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter()  # no echo: the first token's chunk
            times[i] = (sent, first, time.perf_counter())  # the finish chunk comes with the last
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft.extend(first - sent for sent, first, _ in times)
    return streams * (n - 1) / (max(t[2] for t in times) - min(t[1] for t in times))


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def serve_rows(args, name, dev, sections, P):
    """serve.py's continuous batching on the demo GGUF: aggregate decode tok/s at 1, 4 and 16
    concurrent streams, rounds interleaved; time to first token p50/p99 at each; one stream
    alone drafted by the demo's own 4-bit matrices (--draft_quantize keep)."""
    if name != P.dtypes[0]:
        return []
    if dev.type != "cpu":
        return [("serve", name, "CPU only", "", "", "")]
    path = runs.find_demo_gguf()
    n = 2 * P.new_tokens  # 64 by default
    llama = Llama.build(path, max_seq_len=512, max_batch_size=1, device=dev, dtype="fp32",
                        quantize="none")
    ids = llama.tokenizer.encode(DEMO_PROMPT, bos=False, eos=False)
    ttft = {k: [] for k in SERVE_STREAMS}
    drafted_ttft = []
    # each server idles while the other (or the in-process model) runs
    with serving(path, max(SERVE_STREAMS), 512) as url, \
            serving(path, max(SERVE_STREAMS), 512, "--draft_quantize", "keep") as drafted:
        cases = {"in-process": lambda: decode_rate_of(Llama(llama.model, _Ids()), ids, n),
                 "drafted": lambda: serve_round(drafted, 1, DEMO_PROMPT, n, drafted_ttft)}
        cases.update({k: (lambda k=k: serve_round(url, k, DEMO_PROMPT, n, ttft[k]))
                      for k in SERVE_STREAMS})
        r = interleaved(cases, P.repeats)
    alone = median(r["in-process"])
    rows = []
    for k in SERVE_STREAMS:
        timed = ttft[k][k:]  # the warm-up round's left out
        first = (f"first token p50 {percentile(timed, 0.5) * 1000:.0f} ms, "
                 f"p99 {percentile(timed, 0.99) * 1000:.0f} ms")
        if k == 1:
            rows.append(("serve decode tok/s, 1 stream (vs in-process)", "fp32", fmt(median(r[1])),
                         fmt(alone), ratio(r, 1, "in-process"),
                         f"{first}; in-process: generate_stream; demo GGUF, {n} tokens"))
            rows.append(("serve decode tok/s, 1 stream drafted by its own int4 (vs plain)", "fp32",
                         fmt(median(r["drafted"])), fmt(median(r[1])), ratio(r, "drafted", 1),
                         "speculative decoding, k=4, greedy"))
        else:
            rows.append((f"serve decode tok/s, {k} streams (vs 1)", "fp32", fmt(median(r[k])), fmt(median(r[1])),
                         ratio(r, k, 1), first + ("; goal >= 6x; llama.cpp's server with 16 slots not "
                                                  "measured (not installed)" if k == 16 else "")))
    return rows


def prefill_rows(args, name, dev, sections, P):
    return [] if "decode" in sections else decode_rows(args, name, dev, sections, P)  # done with decode


def tp_worker(ckpt_dir: str, dtype: str, device: str, prompt_len: int, new_tokens: int, repeats: int, seed: int):
    """Under torchrun (or alone): load ckpt_dir tensor parallel, read every weight once, time greedy
    decoding; rank 0 prints, as JSON, every process's RSS before loading and peak after, and the rates."""
    dev, parallel = runs.start(device)
    if parallel:
        runs.agree(None)
    before = baseline_rss_kb()
    llama = llama31.load_checkpoint(ckpt_dir, None, dev, dtype, extra=[tensor_parallel.TensorParallel()] if parallel
                                    else [], tokenizer=False, max_seq_len=prompt_len + new_tokens, max_batch_size=1)
    tensors = {id(t): t for t in list(llama.model.parameters()) + list(llama.model.buffers())}
    with torch.no_grad():  # every page read, in pieces: t.float() would add an fp32 copy to the peak
        sum(float(c.sum()) for t in tensors.values() for c in t.reshape(-1).split(1 << 20))
    mine = {"before_kb": before, "peak_kb": rss_kb("VmHWM"), "weight_bytes": sum(t.nbytes for t in tensors.values())}
    llama.tokenizer = _Ids()
    prompt = torch.randint(0, llama.model.args.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    rates = [decode_rate_of(llama, prompt, new_tokens) for _ in range(repeats + 1)][1:]  # the first warms up
    ranks = [mine]
    if parallel:
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, mine)
    print(json.dumps({"ranks": ranks, "rates": rates}))
    runs.finish()


def bench_tp(args: ModelArgs, dtype_name: str, dev, processes: int, P) -> dict:
    """tp_worker on 1 and on `processes` processes (torchrun) over one Meta-layout file of the
    shape's random weights (8B's one file read by 2 processes is this case)."""
    model = build_ours(args, runs.DTYPES[dtype_name], torch.device("cpu"), P.seed)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_tp_") as d:
        llama31.save_meta(model, d, dtype=runs.DTYPES[dtype_name])
        del model
        gc.collect()
        for n in sorted({1, processes}):
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(n)]
            cmd = [*launch, str(Path(__file__).resolve()), "tp-worker", d, dtype_name, dev.type, str(P.prompt_len),
                   str(P.new_tokens), str(P.repeats), str(P.seed)]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n))}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent)
            if r.returncode:
                raise RuntimeError(f"tensor-parallel worker failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
            out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def tp_rows(args, name, dev, processes, P):
    runs = bench_tp(args, name, dev, processes, P)
    rows = []
    for n, r in runs.items():
        rate = median(r["rates"])
        grown = [(x["peak_kb"] - x["before_kb"]) * 1024 for x in r["ranks"]]
        ratio = f"{rate / median(runs[1]['rates']):.2f}x" if n > 1 else ""
        who = f"{n} processes (tensor parallel)" if n > 1 else "1 process"
        rows.append((f"decode tok/s, {who}", name, fmt(rate), "", ratio,
                     f"threads per process {max(1, torch.get_num_threads() // n)}"))
        rows.append((f"peak RSS growth per process, {who}", name,
                     " / ".join(fmt(g, "B") for g in grown), "", "",
                     f"its weights {fmt(r['ranks'][0]['weight_bytes'], 'B')}; RSS before loading "
                     f"{fmt(r['ranks'][0]['before_kb'] * 1024, 'B')}"))
    return rows


def demo_answers(llama: Llama, prompts: list, n: int):
    """(decode tok/s over every prompt's answer together, the answers' token ids), greedy."""
    tokens, seconds, answers = 0, 0.0, []
    for prompt in prompts:
        times, out = [], []
        for (t,) in llama.generate_stream([prompt], n, temperature=0):
            times.append(time.perf_counter())
            out.append(t)
        tokens += len(times) - 1
        seconds += times[-1] - times[0]
        answers.append(out)
    return tokens / seconds, answers


def bench_speculative_demo(dev, P):
    """The demo's chat questions answered greedily by each way of running it, round by round."""
    path = runs.find_demo_gguf()
    default = "dequantized fp32, no draft (--speculate_k 0)"
    configs = {default: dict(quantize="none", dtype="fp32"),
               "int4 fp32 with bf16 rows (--quantize keep --dtype fp32)": dict(quantize="keep", dtype="fp32"),
               "int4 bf16 (--quantize keep)": dict(quantize="keep", dtype="bf16")}
    for k in (2, 3, 4, 6):
        configs[f"dequantized fp32 + its own int4 draft, k={k}"] = dict(quantize="none", dtype="fp32",
                                                                         draft=Draft(None, "keep", k))
    if P.compile:  # the draft's decode step compiled (--compile): its first run waits for it
        for k in (3, 4, 6):
            configs[f"dequantized fp32 + its own int4 draft compiled, k={k}"] = dict(
                quantize="none", dtype="fp32", draft=Draft(None, "keep", k), compile=True)
    models = {k: Llama.build(path, max_seq_len=512, max_batch_size=1, device=dev, **kw) for k, kw in configs.items()}
    first = models[default]
    prompts = [first.chat_format.encode_dialog(first.tokenizer, [{"role": "user", "content": q}])
               for q in runs.DEMO_PROMPTS]
    answers = {}

    def case(name):
        def run():
            rate, answers[name] = demo_answers(models[name], prompts, P.new_tokens)
            return rate
        return run

    r = interleaved({k: case(k) for k in models}, P.repeats)
    return r, default, {k: (answers[k] == answers[default], models[k].speculator) for k in models}


def verify_cost(args: ModelArgs, dtype, dev, P, k: int = 4):
    """Seconds of one decode step and of verifying k + 1 tokens in one pass, at the prompt's end."""
    args = dataclasses.replace(args, max_seq_len=max(args.max_seq_len, P.prompt_len + k + 1))
    model = build_ours(args, dtype, dev, P.seed)
    model.setup_caches(1, args.max_seq_len)
    g = torch.Generator().manual_seed(P.seed)
    prompt = torch.randint(0, args.vocab_size, (1, P.prompt_len), generator=g).to(dev)
    model.forward_inference(prompt, 0, last=1)
    one, many = prompt[:, :1], prompt[:, :k + 1]

    def timed(tokens):
        def run():
            sync(dev)
            t0 = time.perf_counter()
            model.forward_inference(tokens, P.prompt_len, last=tokens.shape[1])
            sync(dev)
            return time.perf_counter() - t0
        return run
    return interleaved({"step": timed(one), "verify": timed(many)}, P.repeats)


def speculative_rows(args, name, dev, sections, P):
    """Speculative decoding against plain decoding (the section runs once, with the first of
    --dtypes for the shape's row)."""
    if name != P.dtypes[0]:
        return []
    rows = []
    if dev.type == "cpu":
        r, default, about = bench_speculative_demo(dev, P)
        for config, (same, speculator) in about.items():
            note = "same greedy answers as with no draft" if same else "other greedy answers than with no draft"
            if speculator is not None:
                note += speculator.summary().replace("; speculative", ";")
            if config != default:
                note += "; goal for the demo's own draft: 2x"
            dtype = "bf16" if config.startswith("int4 bf16") else "fp32"
            rows.append((f"demo decode tok/s, {config} (vs no draft)", dtype,
                         fmt(median(r[config])), fmt(median(r[default])), ratio(r, config, default), note))
    k = 4
    r = verify_cost(args, runs.DTYPES[name], dev, P, k)
    step, verify = median(r["step"]), median(r["verify"])
    rows.append((f"{P.shape_name} verify {k + 1} tokens / one decode step", name, f"{verify * 1e3:.1f} ms",
                 f"{step * 1e3:.1f} ms", f"{verify / step:.2f}x",
                 f"random weights; a draft accepted at rate a keeps (1 - a^{k + 1}) / (1 - a) tokens a verification"))
    if P.shape_name == "8b":  # Llama 3.2 1B's shape drafts for 3.1 8B (the same vocabulary)
        small = ModelArgs(**{**SHAPES["1b"], "max_seq_len": args.max_seq_len, "max_batch_size": 1})
        draft = median(verify_cost(small, runs.DTYPES[name], dev, P, k)["step"])
        a = 0.7
        kept = (1 - a ** (k + 1)) / (1 - a)
        rows.append(("1b-shape draft step / 8b decode step", name, f"{draft * 1e3:.1f} ms", f"{step * 1e3:.1f} ms",
                     f"{draft / step:.2f}x", f"at acceptance {a:.0%}, k={k}: {kept:.2f} tokens in "
                     f"{(verify + k * draft) * 1e3:.1f} ms = {kept / (verify + k * draft) / (1 / step):.2f}x plain "
                     f"decoding (a projection from these timings)"))
    return rows


SECTION_ROWS = {"roof": roof_rows, "decode": decode_rows, "prefill": prefill_rows, "finetune": finetune_rows,
                "lora": lora_rows, "load": load_rows, "chat": chat_rows, "quant": quant_rows,
                "llamacpp": llamacpp_rows, "speculative": speculative_rows, "serve": serve_rows}


# -----------------------------------------------------------------------------
# the table


def fmt(x, unit=""):
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if x >= 1e9:
        return f"{x / 1e9:.1f} G{unit}"
    if x >= 1e6:
        return f"{x / 1e6:.1f} M{unit}"
    if x >= 100:
        return f"{x:,.0f}{unit and ' ' + unit}"
    return f"{x:.1f}{unit and ' ' + unit}"


def print_table(rows):
    head = ("metric", "dtype", "llama31", "HF", "ratio", "notes")
    table = [head] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head) - 1)]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 5)


def markdown_table(rows, about) -> str:
    head = ("metric", "dtype", "llama31", "HF", "ratio", "notes")
    lines = ["", "; ".join(about), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(shape: str = "90m", dtypes="fp32,bf16", device: str = "cpu", prompt_len: int = 128,
         new_tokens: int = 32, prefill_len: int = 256, B: int = 1, T: int = 128, repeats: int = 5,
         train_repeats: int = 5, sections=None, compile: bool = True, threads: int = 0,
         seed: int = 0, markdown: str = "", layers: int = 0, tp: int = 0):
    """Print the benchmark table. dtypes and sections are comma-separated lists (sections: roof,
    decode, prefill, finetune, lora, load, chat, quant, llamacpp, speculative, serve; default
    all, none with --tp). layers: keep only the shape's first N blocks (0: all), for a width whose
    whole depth does not fit the machine. tp N: decode tok/s and each process's peak RSS of the
    shape sampled tensor parallel on N processes (torchrun) against one. compile: also time
    llama31 under torch.compile (decode step, finetune step); --nocompile skips those rows and
    their compile time.
    threads sets torch's CPU threads (0: torch's default). markdown: also append the table, in
    Markdown under a line naming the shape and machine, to this file (scripts/gpu_check.sh)."""
    import transformers

    def as_list(v):
        return [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if s.strip()]

    if sections is None:
        sections = "" if tp else ",".join(SECTIONS)
    dtypes, sections = as_list(dtypes), as_list(sections)
    if shape not in SHAPES:
        raise SystemExit(f"error: unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    unknown = [s for s in sections if s not in SECTIONS] + [d for d in dtypes if d not in runs.DTYPES]
    if unknown:
        raise SystemExit(f"error: unknown section or dtype {', '.join(unknown)}; sections: "
                         f"{', '.join(SECTIONS)}; dtypes: {', '.join(runs.DTYPES)}")
    try:
        dev = llama31.check_device(device)
        for name, value, low in [("repeats", repeats, 1), ("train_repeats", train_repeats, 1), ("threads", threads, 0),
                                 ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2),
                                 ("prefill_len", prefill_len, 1), ("B", B, 1), ("T", T, 1), ("layers", layers, 0),
                                 ("tp", tp, 0)]:
            llama31.check_number(name, value, int, low)
    except llama31.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if threads:
        torch.set_num_threads(threads)
    P = SimpleNamespace(shape_name=shape, dtypes=dtypes, prompt_len=prompt_len, new_tokens=new_tokens,
                        prefill_len=prefill_len, B=B, T=T, repeats=repeats, train_repeats=train_repeats,
                        compile=compile, seed=seed, roof={})
    transformers.logging.set_verbosity_error()
    kwargs = {**SHAPES[shape], "max_seq_len": max(prompt_len + new_tokens, prefill_len, T), "max_batch_size": 1}
    full_depth = kwargs["n_layers"]
    kwargs["n_layers"] = layers or full_depth
    P.shape_kwargs, P.shape_note = kwargs, (f"{shape} width, {layers} of its {full_depth} layers; " if layers else "")
    args = ModelArgs(**kwargs)
    n_params = sum(p.numel() for p in build_ours(args, torch.float32, "meta", seed).parameters())
    about = [f"shape {shape}: {args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads, "
             f"ffn {args.ffn_hidden_dim}, vocab {args.vocab_size}, {n_params / 1e6:.1f}M params",
             f"{machine(dev)}; torch {torch.__version__}, transformers {transformers.__version__}"]
    print("\n".join(about))
    if dev.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 1:
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before starting; other "
              f"processes compete for the cores and timings will be noisy (--threads 1 suffers least)")
    print(f"decode: prompt {prompt_len} + {new_tokens} new tokens; prefill {prefill_len} tokens; "
          f"finetune B={B} T={T}; median of {repeats} ({train_repeats} for finetune)", flush=True)

    rows = []
    for name in dtypes:
        t0 = time.time()
        for section in [s for s in SECTIONS if s in sections]:
            try:
                rows += SECTION_ROWS[section](args, name, dev, sections, P)
            except torch.OutOfMemoryError:  # e.g. finetuning the 8B shape on one GPU
                rows.append((section, name, "out of memory", "", "", ""))
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if tp:
            rows += tp_rows(args, name, dev, tp, P)
        print(f"[{name} done in {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    if markdown:
        with open(markdown, "a") as f:
            f.write(markdown_table(rows, about))
    return rows


if __name__ == "__main__":
    import fire

    if sys.argv[1:2] == ["tp-worker"]:  # one process of bench_tp's
        tp_worker(*sys.argv[2:4], sys.argv[4], *map(int, sys.argv[5:]))
    else:
        fire.Fire(main, serialize=lambda _: None)
