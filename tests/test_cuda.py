"""What only a CUDA GPU can show: bf16 autocast training, NCCL under torchrun, the memory-efficient
attention kernel with document masks, CUDA graphs, pinned copies, CUDA random states, Meta's code
on the GPU. Each test skips without a GPU, saying so; `bash scripts/gpu_check.sh` runs them on one
(with tests/test_devices.py's CUDA cases and bench.py's GPU rows)."""

import re

import pytest
import torch

from variants import compiled
import llama31
import reference
import runs
from conftest import random_model
from llama31 import DistInfo, Llama, document_mask
from test_finetune import max_difference, run, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; bash scripts/gpu_check.sh runs these on one")
CUDA = torch.device("cuda")


def losses(log: str):
    return [float(x) for x in re.findall(r"\| loss ([0-9.]+)", log)]


def test_bf16_autocast_finetune_learns_and_tracks_fp32(tiny_ckpt, data, tmp_path, capsys):
    # fp32 master weights either way; bf16 rounds the forward's activations, so the losses part a little
    run(tiny_ckpt, data, tmp_path / "fp32", device="cuda", dtype="fp32", max_steps=12, log_every=1,
        learning_rate=3e-3)
    fp32_log = capsys.readouterr().out
    run(tiny_ckpt, data, tmp_path / "bf16", device="cuda", dtype="bf16", max_steps=12, log_every=1,
        learning_rate=3e-3)
    bf16_log = capsys.readouterr().out
    fp32, bf16 = losses(fp32_log), losses(bf16_log)
    assert len(fp32) == len(bf16) == 12
    assert bf16[-1] < 0.7 * bf16[0]
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.1  # stated bound: 10% at any step
    known = runs.peak_flops(CUDA, torch.bfloat16) is not None
    assert ("mfu" in bf16_log) == known and "mfu" not in fp32_log  # no MFU against a bf16 peak for fp32


def test_ddp_under_torchrun_on_the_gpus_there_are(tiny_ckpt, data, tmp_path):
    # NCCL with two GPUs; one GPU runs the same command as world size 1 (torchrun's environment, no group)
    processes = min(2, torch.cuda.device_count())
    log = torchrun(tiny_ckpt, data, tmp_path, "ddp", processes=processes, device="cuda")
    assert f"{processes} process(es)" in log
    rank0 = torch.load(tmp_path / "rank0.pt")
    if processes == 2:
        rank1 = torch.load(tmp_path / "rank1.pt")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = run(tiny_ckpt, data, tmp_path / "single", device="cuda", dtype="fp32", max_steps=3,
                 total_batch_size=4 * 2 * 32)
    # the worker trains in the default dtype (bf16 autocast on CUDA); one process here in fp32
    assert max_difference(rank0, single["model"]) < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs two GPUs (NCCL takes one process per GPU)")
def test_fsdp_on_two_gpus_resumes_exactly(tiny_ckpt, data, tmp_path):
    log = torchrun(tiny_ckpt, data, tmp_path / "a", "fsdp", device="cuda")
    assert "FSDP" in log and "The cat" in log
    straight = torch.load(tmp_path / "a" / "step_000003" / "consolidated.00.pth")
    torchrun(tiny_ckpt, data, tmp_path / "b", "fsdp", "2", device="cuda")
    torchrun(tiny_ckpt, data, tmp_path / "b", "fsdp-resume", device="cuda")
    resumed = torch.load(tmp_path / "b" / "step_000003" / "consolidated.00.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_document_masked_attention_keeps_no_per_head_score_matrices():
    # The memory-efficient kernel takes the additive mask and stores no (T, T) matrix per head; the
    # math fallback would keep n_heads of them in fp32 for every layer. Measured against the same
    # step with plain causal attention (no mask), which the flash kernel runs.
    model = random_model(max_seq_len=2048, vocab_size=1024, n_layers=4).to(CUDA).train()
    T, H = 2048, model.args.n_heads
    x = torch.randint(0, 1000, (1, T + 1), device=CUDA)
    x[0, ::300] = 1000  # documents of 300 tokens

    def peak_growth(mask):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.forward_loss(x[:, :-1], x[:, 1:], mask=mask)
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    causal = peak_growth(None)
    masked = peak_growth(document_mask(x[:, :-1], 1000))
    bias = T * T * 2  # the one bf16 mask the backward keeps
    assert masked - causal < bias + 24 * 2**20, f"{(masked - causal) / 2**20:.0f} MiB more than causal"
    assert masked - causal < H * T * T * 4  # far below one layer's fp32 scores, per head


def test_compiled_decoding_replays_cuda_graphs_and_equals_eager():
    class Ids:
        pad_id, stop_tokens = 0, []

    llama = Llama(random_model(max_seq_len=128, vocab_size=1024).to(CUDA).eval(), Ids())
    prompts = [[1000, 5, 6, 7], [1000, 8]]
    eager = [llama.generate(prompts, 16, temperature=0), llama.generate(prompts[:1], 16, temperature=0)]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled.compile_inference(llama)
    try:
        compiled_runs = [llama.generate(prompts, 16, temperature=0), llama.generate(prompts[:1], 16, temperature=0)]
    finally:
        compiled.eager(llama)
    assert compiled_runs == eager
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_batches_reach_the_gpu_from_pinned_memory(data):
    loader = llama31.DistributedShardedDataLoader(data["train_data"], 2, 32)
    want = loader.next_batch()
    loader.reset()
    x, y, mask = runs.next_batch(loader, CUDA)
    assert mask is None  # token shards: causal unless a mask_of is given
    assert x.device.type == "cuda" and torch.equal(x.cpu(), want[0]) and torch.equal(y.cpu(), want[1])


def test_a_checkpoint_holds_and_restores_this_gpus_random_state():
    torch.cuda.manual_seed(7)
    saved = runs.rng_states(DistInfo(), CUDA)
    want = torch.rand(4, device=CUDA)
    torch.cuda.manual_seed(8)
    runs.restore_rng(saved, DistInfo(), CUDA)
    assert torch.equal(torch.rand(4, device=CUDA), want)


def test_reference_compare_on_the_gpu_finds_the_two_identical(ckpt_dir, capsys):
    pytest.importorskip("fairscale", reason="Meta's reference needs fairscale (carried as a wheel)")
    made = reference.init_model_parallel()
    try:
        reference.main(["compare", "--ckpt_dir", str(ckpt_dir), "--prompts", '["The capital of France is", "Hi"]',
                        "--max_gen_len", "8", "--device", "cuda"])  # fp32 unless asked
    finally:
        if made:
            reference.destroy_model_parallel()
    out = capsys.readouterr()
    assert "(torch.float32)" in out.err and "identical: all 2 prompts" in out.out
