"""Tensor-parallel sampling (tp.py) under torchrun on CPU (gloo): Meta's model-parallel files cut
as fairscale's layers hold them, read by 2 or 4 processes, against one process on the merged
checkpoint and against Meta's reference code. fp32, random weights, the real 128256-token vocabulary."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import formats
import llama31
import reference
from variants import tp
from conftest import make_checkpoint
from llama31 import ConfigError, Llama, Transformer, read_checkpoint
from test_shards import split_like_meta
from tp_worker import PROMPTS, outputs

REPO = Path(__file__).resolve().parents[1]
# 4 heads, 2 KV heads, FFN width 224: 4 processes replicate each KV head on 2 of them
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One random model as one file, and cut into 2 and 4 model-parallel files."""
    root = tmp_path_factory.mktemp("tp")
    make_checkpoint(root / "1", seed=3, dtype=torch.float32, **SHAPE)
    for n in (2, 4):
        split_like_meta(root / "1", root / str(n), n, n_kv_heads=2, head_dim=16)
    return root


@pytest.fixture(scope="module")
def single(ckpts):
    """One process on the merged checkpoint: the result every process count must give."""
    llama = Llama.build(ckpts / "1", max_seq_len=64, max_batch_size=4, device="cpu", dtype="fp32")
    int8 = llama31.load_checkpoint(ckpts / "1", max_seq_len=64, device="cpu", quantize="int8", tokenizer=False)
    return {**outputs(llama), "quantized_logits": int8.model.forward_inference(torch.tensor([PROMPTS[1]]))}


def torchrun(*args, processes: int, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(script or REPO / "tests" / "tp_worker.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


RUNS = {}


def run(ckpts, files: int, processes: int, tmp_path_factory):
    """tp_worker on `processes` ranks over the `files`-file checkpoint (once per module): each rank's results."""
    if (files, processes) not in RUNS:
        out = tmp_path_factory.mktemp(f"f{files}n{processes}")
        r = torchrun(ckpts / str(files), out, *(["int8"] if (files, processes) == (4, 2) else []), processes=processes)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        RUNS[files, processes] = [torch.load(out / f"rank{i}.pt") for i in range(processes)]
    return RUNS[files, processes]


# files, processes: more processes than files (4 processes, 2 KV heads: each replicated on 2), fewer
# (405B's 16 files on 8 GPUs); as many (70B on 8 GPUs) is the CLI's test below
LAYOUTS = [(2, 4), (4, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("files, processes", LAYOUTS)
def test_every_process_count_gives_one_process_greedy_tokens_and_logits(ckpts, single, files, processes,
                                                                        tmp_path_factory):
    ranks = run(ckpts, files, processes, tmp_path_factory)
    for r in ranks:
        assert r["greedy"] == single["greedy"]
        assert (r["logits"] - single["logits"]).abs().max().item() <= 1e-5
        assert torch.equal(r["logits"], ranks[0]["logits"])  # gathered: the same on every rank, bit for bit
    assert all(len(t) == 12 for t in single["greedy"])


def test_kv_heads_are_replicated_when_processes_outnumber_them(ckpts, tmp_path_factory):
    assert [r["local_kv_heads"] for r in run(ckpts, 2, 4, tmp_path_factory)] == [1, 1, 1, 1]
    assert [r["local_kv_heads"] for r in run(ckpts, 4, 2, tmp_path_factory)] == [1, 1]


def test_top_p_with_a_seed_gives_the_same_text_on_every_process_count(ckpts, single, tmp_path_factory):
    for files, processes in LAYOUTS:
        assert all(r["top_p"] == single["top_p"] for r in run(ckpts, files, processes, tmp_path_factory))
    assert single["top_p"] != single["greedy"]  # sampled, not greedy


def test_greedy_tokens_match_metas_reference(ckpts, tmp_path_factory):
    made = reference.init_model_parallel()
    try:
        ref = reference.load_reference(ckpts / "1", max_seq_len=64, device="cpu", dtype="fp32")
        theirs = reference.reference_generate(ref, PROMPTS, max_gen_len=12, temperature=0.0)
    finally:
        if made:
            reference.destroy_model_parallel()
    assert run(ckpts, 2, 4, tmp_path_factory)[0]["greedy"] == theirs


def test_int8_on_each_process_is_as_close_to_full_precision_as_in_one_process(ckpts, single, tmp_path_factory):
    # wo's and w2's int8 scales are per row of each process's columns, so not one process's exactly
    ranks = run(ckpts, 4, 2, tmp_path_factory)
    full = single["logits"][1]  # the same prompt, fp32, one process
    ours, one = (ranks[0]["quantized_logits"][0] - full).abs(), (single["quantized_logits"][0] - full).abs()
    assert ours.mean() < 1.1 * one.mean() and ours.max() < 1.5 * one.max(), (ours, one)
    assert torch.equal(ranks[0]["quantized_logits"], ranks[1]["quantized_logits"])


def test_each_process_holds_its_share_of_the_weights(ckpts, tmp_path_factory):
    # peak RSS growth over the RSS before loading, after every weight was read once (memory-mapped
    # pages included): this process's weights, 1/N of them, and while a slice is copied from two
    # files (4 files on 2 processes) its pages of the files too, until they are dropped
    total = run(ckpts, 4, 2, tmp_path_factory)[0]["weight_bytes"] * 2
    for files, processes in LAYOUTS:
        for r in run(ckpts, files, processes, tmp_path_factory):
            assert abs(r["weight_bytes"] - total / processes) < 0.01 * total
            growth = (r["peak_kb"] - r["before_kb"]) * 1024
            copying = r["largest_bytes"] if files > processes else 0
            assert growth < r["weight_bytes"] + copying + 8e6, (files, processes, growth / 1e6, total / 1e6)


@pytest.mark.slow
def test_each_fsdp_process_reads_only_its_rows(ckpts, tmp_path):
    # finetune --fsdp's load from one file: FSDP's shards made on the meta device, each process's rows
    # copied from the memory-mapped file a few at a time (their pages then dropped), never the whole model
    r = torchrun(ckpts / "1", tmp_path, "fsdp", processes=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    total = sum(r["weight_bytes"] for r in ranks)
    for r in ranks:
        assert abs(r["weight_bytes"] - total / 2) < 0.01 * total
        growth = (r["peak_kb"] - r["before_kb"]) * 1024
        assert growth < r["weight_bytes"] + 12e6, (growth / 1e6, total / 1e6)


@pytest.mark.slow
def test_cli_under_torchrun_prints_once_what_one_process_prints(ckpts, capsys):
    # 2 files on 2 processes (70B's 8 on 8), against one process on the merged file; only rank 0 prints
    args = ["--prompts", '["The capital of France is", "def f(x):"]', "--temperature", "0", "--max_gen_len", "6",
            "--device", "cpu"]
    llama31.main(["--ckpt_dir", str(ckpts / "1"), *args])
    ours = capsys.readouterr().out
    r = torchrun("--ckpt_dir", ckpts / "2", *args, processes=2, script=REPO / "llama31.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == ours and ours.count("-" * 80) == 2
    assert r.stderr.count("loaded ") == 1


@pytest.mark.slow
def test_processes_that_cannot_split_the_heads_are_a_one_line_error(tmp_path):
    # params.json alone: the layout is refused before any file of weights is looked for
    (tmp_path / "params.json").write_text(json.dumps({**SHAPE, "dim": 96, "n_heads": 3, "n_kv_heads": 3}))
    (tmp_path / "consolidated.00.pth").write_bytes(b"")  # never opened
    r = torchrun("--ckpt_dir", tmp_path, "--device", "cpu", processes=2, script=REPO / "llama31.py")
    assert r.returncode != 0 and r.stderr.count("exitcode  : 2 ") >= 1  # torchrun's report of our exit status
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: 2 processes cannot split the model of {tmp_path / 'params.json'} (3 heads, 3 KV heads, "
                    f"FFN width 256, vocabulary 128256); run --nproc_per_node 1"]
    assert "Traceback (most recent call last):\n  File \"" + str(REPO / "llama31.py") not in r.stderr


# -----------------------------------------------------------------------------
# bad files: found in one process, from the files' headers, before any weight is read


def local_state(path, rank=0, world=2):
    args, ckpt = read_checkpoint(path, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(args)
    return tp.local_state(ckpt, model, tp.Layout.of(args, rank, world, ckpt.params_path), "cpu", torch.float32)


def test_a_process_opens_only_the_files_holding_its_slices(ckpts, monkeypatch):
    opened = []
    load = tp.formats.torch_load
    monkeypatch.setattr(tp.formats, "torch_load", lambda p, *a: opened.append(p.name) or load(p, *a))
    local_state(ckpts / "4", rank=1, world=4)
    local_state(ckpts / "4", rank=1, world=2)
    assert opened == ["consolidated.01.pth", "consolidated.02.pth", "consolidated.03.pth"]


def test_a_missing_file_is_a_clear_error(ckpts, tmp_path):
    d = shutil.copytree(ckpts / "4", tmp_path / "d")
    (d / "consolidated.02.pth").unlink()
    with pytest.raises(ConfigError, match=r"has no consolidated.02.pth of its 4 model-parallel files; download"):
        local_state(d)
    (d / "consolidated.03.pth").unlink()  # the last one gone: the cut of the others says so
    with pytest.raises(ConfigError, match=r"holds 2 consolidated.NN.pth files, but consolidated.00.pth is cut for 4 "
                                          r"\(layers.0.attention.wq.weight has 16 of 64 rows\); download every file"):
        local_state(d)


def test_files_that_disagree_are_a_clear_error(ckpts, tmp_path):
    d = shutil.copytree(ckpts / "2", tmp_path / "d")
    other = make_checkpoint(tmp_path / "other", seed=3, dtype=torch.float32, **{**SHAPE, "multiple_of": 128})
    split_like_meta(tmp_path / "other", tmp_path / "other2", 2, n_kv_heads=2, head_dim=16)
    (d / "consolidated.01.pth").write_bytes((tmp_path / "other2" / "consolidated.01.pth").read_bytes())
    assert other.args.ffn_hidden_dim != 224
    with pytest.raises(ConfigError, match=r"consolidated.01.pth: layers.0.feed_forward.w1.weight is \(128, 64\), "
                                          r"but params.json's model cut into 2 files would hold \(112, 64\)"):
        local_state(d, rank=1)
    local_state(d, rank=0)  # rank 0 reads file 00 alone; under torchrun it learns of rank 1's error (runs.agree)


def test_a_layout_that_does_not_divide_is_refused(ckpts):
    args, ckpt = read_checkpoint(ckpts / "1")
    with pytest.raises(ConfigError, match="8 processes cannot split .* run --nproc_per_node 1 or 2 or 4$"):
        tp.Layout.of(args, 0, 8, ckpt.params_path)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_each_process_slices_put_together_are_the_whole_model(ckpts, tmp_path, layout):
    # every rank's slices against the one-process model's weights: rows (wq wk wv w1 w3, the vocabulary)
    # and columns (wo w2) of its heads, hidden units and vocabulary; KV heads replicated past 2 ranks
    whole = llama31.load_model(ckpts / "1", 64, device="cpu", dtype="fp32").state_dict()
    path = ckpts / "4"
    if layout == "hf":
        formats.save_hf(whole, llama31.read_checkpoint(ckpts / "1")[0].to_params(), tmp_path, dtype=torch.float32)
        path = tmp_path
    for world in (2, 4):
        ranks = [{k: formats.materialize(v) for k, v in local_state(path, rank, world).items()}
                 for rank in range(world)]
        for key, w in whole.items():
            kind = key.split(".")[-2]
            if kind in ("wk", "wv") and world == 4:  # 2 KV heads: ranks 0, 1 read head 0, ranks 2, 3 head 1
                assert all(torch.equal(r[key], w.chunk(2)[i // 2]) for i, r in enumerate(ranks))
            elif kind in ("wo", "w2"):
                assert torch.equal(torch.cat([r[key] for r in ranks], dim=1), w)
            elif kind in ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings"):
                assert torch.equal(torch.cat([r[key] for r in ranks]), w)
            else:
                assert all(torch.equal(r[key], w) for r in ranks)
