"""Run by test_tp under torchrun: argv ckpt out [quantize | fsdp]. Each rank loads its
slices tensor parallel (fp32, CPU) and saves to out/rank{N}.pt: its RSS before loading and at its
peak after loading and reading every weight once, the bytes of its weights, the logits of a fixed
batch, greedy and seeded top-p tokens; with a quantize mode, the logits of that model too. fsdp:
finetune --fsdp's load instead, and its memory."""

import os
import sys

import torch

import formats
import llama31
import runs
from variants import fsdp as fsdp_variant
from variants import tp
from bench import baseline_rss_kb, rss_kb

# BOS "The capital of France is", BOS "def f(x):"
PROMPTS = [[128000, 791, 6864, 315, 9822, 374], [128000, 755, 282, 2120, 997]]


def outputs(llama):
    model = llama.model
    logits = model.forward_inference(torch.tensor([PROMPTS[0][:5], PROMPTS[1]]))
    greedy = llama.generate(PROMPTS, max_gen_len=12, temperature=0)
    sampled = llama.generate(PROMPTS, max_gen_len=12, temperature=1.0, top_p=0.9,
                             generator=torch.Generator().manual_seed(7))
    return {"logits": logits, "greedy": greedy, "top_p": sampled}


def fsdp(ckpt, out):
    """finetune --fsdp's load: this rank's rows of every weight, as FSDP shards; its memory."""
    info, device = llama31.setup_distributed("cpu")
    runs.agree(None)  # gloo's first collective, before the baseline
    before = baseline_rss_kb()
    sharded = fsdp_variant.Sharded(device, True, llama31.select_trainable, "all")
    model = llama31.load_checkpoint(ckpt, None, device, torch.float32, "none", extra=[sharded], tokenizer=False,
                                    max_seq_len=64, max_batch_size=4).model
    shards = [p.to_local() for p in model.parameters()]
    with torch.no_grad():
        sum(float(t.sum()) for t in shards)
    torch.save({"before_kb": before, "peak_kb": rss_kb("VmHWM"), "weight_bytes": sum(t.nbytes for t in shards),
                "largest_bytes": max(t.nbytes for t in shards)}, os.path.join(out, f"rank{info.rank}.pt"))
    runs.finish()


def main(ckpt, out, quantize=None):
    if quantize == "fsdp":
        return fsdp(ckpt, out)
    device, parallel = runs.start("cpu")
    if parallel:  # gloo's first collective, before the baseline
        runs.agree(None)
    before = baseline_rss_kb()
    variants = [tp.TensorParallel()] if parallel else []
    llama = llama31.load_checkpoint(ckpt, max_seq_len=64, max_batch_size=4, device=device, dtype="fp32",
                                    tokenizer=False, extra=variants)
    weights = {id(t): t for t in list(llama.model.parameters()) + list(llama.model.buffers())}
    with torch.no_grad():  # every byte of this rank's weights read once (memory-mapped pages count from here)
        sum(float(t.float().sum()) for t in weights.values())
    result = {"before_kb": before, "peak_kb": rss_kb("VmHWM"), "weight_bytes": sum(t.nbytes for t in weights.values()),
              "largest_bytes": max(t.nbytes for t in weights.values()),
              "local_kv_heads": llama.model.layers[0].attention.n_kv_heads}
    llama.tokenizer = formats.load_tokenizer(ckpt)  # after the measurement: tiktoken's tables are ~100 MB
    result.update(outputs(llama))
    if quantize:
        del llama, weights
        llama = llama31.load_checkpoint(ckpt, max_seq_len=64, device=device, quantize=quantize, tokenizer=False,
                                        extra=[tp.TensorParallel()] if parallel else [])
        result["quantized_logits"] = llama.model.forward_inference(torch.tensor([PROMPTS[1]]))
    torch.save(result, os.path.join(out, f"rank{os.environ.get('RANK', 0)}.pt"))
    runs.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
