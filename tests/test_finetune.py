"""Finetuning: loss goes down, DDP equals gradient accumulation, resume is exact, saves survive kills."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from variants import fsdp
import llama31
import runs
from conftest import FINETUNE_SHAPE, MISSING_DEVICE, make_checkpoint, random_model
from formats import read_datafile_header, write_datafile
from llama31 import ConfigError, Llama, finetune

REPO = Path(__file__).resolve().parents[1]
def run(tiny_ckpt, data, out, **kw):
    args = dict(ckpt_dir=str(tiny_ckpt), out_dir=str(out), B=2, T=32, max_steps=4, learning_rate=1e-3,
                warmup_steps=2, val_every=0, val_steps=2, device="cpu", sample_prompts=[], **data)
    args.update(kw)
    return finetune(**args)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_difference(state: dict, model) -> float:
    """Largest |difference| between a state dict and a model's weights, which must have the same names."""
    want = weights(model)
    assert state.keys() == want.keys()
    return max((state[k] - want[k]).abs().max().item() for k in want)


@pytest.mark.slow
def test_loss_goes_down_on_repetitive_data_and_val_loss_is_reported(tiny_ckpt, data, tmp_path, capsys):
    result = run(tiny_ckpt, data, tmp_path, max_steps=25, val_every=5, log_every=5, learning_rate=3e-3)
    log = capsys.readouterr().out
    val_losses = [float(line.split("val loss")[1]) for line in log.splitlines() if "val loss" in line]
    assert len(val_losses) == 6  # steps 0, 5, 10, 15, 20 and the end
    assert val_losses[-1] < 0.5 * val_losses[0]
    assert result["val_loss"] == pytest.approx(val_losses[-1], abs=1e-4)


def test_saved_checkpoint_loads_with_build_and_gives_the_trained_logits(tiny_ckpt, data, tmp_path):
    result = run(tiny_ckpt, data, tmp_path, max_steps=2)
    saved = tmp_path / (tmp_path / "latest").read_text().strip()
    assert saved.name == "step_000002"
    llama = Llama.build(saved, max_seq_len=64, device="cpu")
    tokens = torch.tensor([[128000, 791, 8415]])
    assert torch.equal(llama.model.forward_inference(tokens), result["model"].forward_inference(tokens))
    # the `latest` pointer is followed to the step it names; another file is a clear error
    latest = Llama.build(tmp_path / "latest", max_seq_len=64, device="cpu")
    assert torch.equal(latest.model.forward_inference(tokens), result["model"].forward_inference(tokens))
    (tmp_path / "notes.txt").write_text("step_000002\n")
    with pytest.raises(ValueError, match="notes.txt is a file but neither a GGUF file nor a finetune's `latest`"):
        Llama.build(tmp_path / "notes.txt", device="cpu")


@pytest.mark.slow
def test_a_short_run_reaches_its_learning_rate(tiny_ckpt, data, tmp_path, capsys):
    run(tiny_ckpt, data, tmp_path / "a", max_steps=4, warmup_steps=None, learning_rate=1e-3)
    lrs = [line.split("| lr ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines() if "| lr " in line]
    assert lrs[0] == "1.00e-03"  # no warmup in 4 steps: a tenth of max_steps, rounded down
    run(tiny_ckpt, data, tmp_path / "b", max_steps=40, warmup_steps=None, stop_after=1, learning_rate=1e-3)
    assert "| lr 2.50e-04 |" in capsys.readouterr().out  # 4 warmup steps
    run(tiny_ckpt, data, tmp_path / "c", max_steps=2, warmup_steps=5)
    assert "--warmup_steps 5 is more than --max_steps 2" in capsys.readouterr().err


@pytest.mark.parametrize("finetune_type, frozen", [
    ("rmsnorm", lambda k: not k.endswith("norm.weight")),
    ("no_embeddings", lambda k: k.startswith(("tok_embeddings", "output"))),
])
def test_finetune_types_leave_frozen_weights_untouched(tiny_ckpt, data, tmp_path, finetune_type, frozen):
    before = weights(Llama.build(tiny_ckpt, device="cpu").model)
    after = weights(run(tiny_ckpt, data, tmp_path, max_steps=2, finetune_type=finetune_type)["model"])
    for k in before:
        assert torch.equal(before[k], after[k]) == frozen(k), k


@pytest.mark.slow
def test_resume_continues_exactly(tiny_ckpt, data, tmp_path):
    straight = run(tiny_ckpt, data, tmp_path / "a", max_steps=6)
    run(tiny_ckpt, data, tmp_path / "b", max_steps=6, stop_after=3)
    # only --resume: data, batch and schedule all come from the checkpoint
    resumed = finetune(out_dir=str(tmp_path / "b"), resume="latest", device="cpu", sample_prompts=[], val_every=0)
    assert resumed["step"] == 6
    assert resumed["train_loss"] == straight["train_loss"]
    a, b = weights(straight["model"]), weights(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def torchrun(tiny_ckpt, data, out, *args, processes=2, device="cpu"):
    """tests/ddp_worker.py on 2 gloo processes (or as asked); its stdout."""
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "DDP_DEVICE": device}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(REPO / "tests" / "ddp_worker.py"), str(tiny_ckpt), data["train_data"], data["val_data"],
           str(out), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_with_accumulation(tiny_ckpt, data, tmp_path):
    # 2 processes x 2 micro-steps (no_sync on the first) vs 1 process x 4 micro-steps
    single = run(tiny_ckpt, data, tmp_path / "single", max_steps=3, total_batch_size=4 * 2 * 32)
    torchrun(tiny_ckpt, data, tmp_path / "ddp", "ddp")
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (worst := max_difference(rank0, single["model"])) < 1e-5, worst


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process_and_resumes(tiny_ckpt, data, tmp_path):
    # sharded weights, gradients and AdamW state; the gathered checkpoint is what is compared
    single = run(tiny_ckpt, data, tmp_path / "single", max_steps=3, total_batch_size=4 * 2 * 32)
    log = torchrun(tiny_ckpt, data, tmp_path / "a", "fsdp")
    assert "FSDP" in log and "val loss" in log and "The cat" in log  # rank 0 sampled from the gathered copy
    straight = torch.load(tmp_path / "a" / "step_000003" / "consolidated.00.pth")
    assert len(torch.load(tmp_path / "a" / "step_000003" / "train_state.pt")["rng"]) == 2  # each rank's own
    assert (worst := max_difference(straight, single["model"])) < 1e-5, worst
    torchrun(tiny_ckpt, data, tmp_path / "b", "fsdp", "2")
    assert (tmp_path / "b" / "latest").read_text().strip() == "step_000002"
    torchrun(tiny_ckpt, data, tmp_path / "b", "fsdp-resume")
    resumed = torch.load(tmp_path / "b" / "step_000003" / "consolidated.00.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.slow
@pytest.mark.parametrize("tied, finetune_type", [(True, "all"), (False, "rmsnorm")], ids=["tied", "frozen"])
def test_fsdp_with_tied_embeddings_or_frozen_weights_equals_one_process(tmp_path, data, tied, finetune_type):
    # tied: one Parameter under two names, sharded once; frozen: parameters with no gradient
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, seed=0, dtype=torch.float32, tie_embeddings=tied, **FINETUNE_SHAPE)
    single = run(ckpt, data, tmp_path / "single", max_steps=3, total_batch_size=4 * 2 * 32,
                 finetune_type=finetune_type)
    torchrun(ckpt, data, tmp_path / "fsdp", "fsdp", "-", finetune_type)
    sharded = torch.load(tmp_path / "fsdp" / "step_000003" / "consolidated.00.pth")
    assert (worst := max_difference(sharded, single["model"])) < 1e-5, worst
    before = torch.load(ckpt / "consolidated.00.pth")
    changed = {k for k in sharded if not torch.equal(sharded[k], before[k])}
    trained = {k for k in sharded if k.endswith("norm.weight")} if finetune_type == "rmsnorm" else set(sharded)
    assert changed == trained


KILL_ON_SECOND_SAVE = """
import os, signal, sys, torch
import llama31
real_save, calls = torch.save, []
def save(obj, f, *a, **k):
    if "consolidated.00.pth.tmp" in str(f):  # the weights' temporary name
        calls.append(f)
        if len(calls) == 2:  # half-write the second checkpoint's weights, then die
            open(f, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = save
llama31.finetune(ckpt_dir=sys.argv[1], train_data=sys.argv[2], val_data="", out_dir=sys.argv[3], B=2, T=32,
                 max_steps=4, save_every=1, device="cpu", sample_prompts=[])
"""


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tiny_ckpt, data, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SAVE, str(tiny_ckpt), data["train_data"], str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "latest").read_text().strip() == "step_000001"
    Llama.build(out / "step_000001", device="cpu")  # loads cleanly
    resumed = finetune(out_dir=str(out), resume="latest", device="cpu", sample_prompts=[], val_every=0)
    assert resumed["step"] == 4


@pytest.fixture(scope="module")
def saved_run(tiny_ckpt, data, tmp_path_factory):
    """A run saved at step 1 of 1, to resume."""
    out = tmp_path_factory.mktemp("saved")
    run(tiny_ckpt, data, out, max_steps=1)
    return out


@pytest.mark.parametrize("case, message", [
    ("no shards", "no token shards match .*nothing_"),
    ("total batch", "total_batch_size 100 is not a multiple"),
    ("resume nothing", "no checkpoint in"),
    ("resume a non-run", "no train_state.pt"),
    ("resume with other B", "different settings .*B 2 vs 4"),
    ("resume past the end", "at step 1 already, and this run would stop at step 1"),
    ("fp16", "fp16 training needs loss scaling"),
    ("finetune type", "unknown finetune_type"),
])
def test_bad_finetune_input_is_a_clear_error(tiny_ckpt, data, saved_run, tmp_path, case, message):
    args = {
        "no shards": (tiny_ckpt, {**data, "train_data": str(tmp_path / "nothing_*.bin")}, tmp_path, {}),
        "total batch": (tiny_ckpt, data, tmp_path, {"total_batch_size": 100}),
        "resume nothing": (None, data, tmp_path / "empty", {"resume": "latest"}),
        "resume a non-run": (None, data, tmp_path, {"resume": str(tiny_ckpt)}),
        "resume with other B": (None, data, saved_run, {"resume": "latest", "B": 4}),
        "resume past the end": (None, data, saved_run, {"resume": "latest", "max_steps": 1}),
        "fp16": (tiny_ckpt, data, tmp_path, {"dtype": "fp16"}),
        "finetune type": (tiny_ckpt, data, tmp_path, {"finetune_type": "qlora"}),
    }[case]
    with pytest.raises(ValueError, match=message):
        run(*args[:3], **args[3])


def test_batch_larger_than_a_shard_is_a_clear_error(tiny_ckpt, data, tmp_path):
    with pytest.raises(ValueError, match="train_000.bin holds 576 tokens, fewer than the 32769 one step needs"):
        run(tiny_ckpt, data, tmp_path, B=64, T=512)


@pytest.mark.slow
def test_cli_finetune_runs_and_samples(tiny_ckpt, data, tmp_path):
    r = subprocess.run([sys.executable, "llama31.py", "finetune", "--ckpt_dir", str(tiny_ckpt),
                        "--train_data", data["train_data"], "--val_data", data["val_data"],
                        "--out_dir", str(tmp_path), "--B", "2", "--T", "32", "--max_steps", "2",
                        "--val_every", "1", "--val_steps", "1", "--device", "cpu",
                        "--sample_prompts", '["The cat"]', "--sample_len", "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val loss" in r.stdout and "step     2/2" in r.stdout and "The cat" in r.stdout
    assert (tmp_path / "step_000002" / "consolidated.00.pth").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2, 4])
def test_finetune_without_arguments_trains_the_demo_model_on_the_sample_text(tmp_path, processes):
    # the demo's own B, T and data at 1, 2 and 4 processes (fewer steps, to keep the suite short):
    # the validation split is cut from data/sample.txt to hold one step of every process
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if processes > 1 else None
    r = subprocess.run([*launch, "llama31.py", "finetune", "--out_dir", str(tmp_path), "--max_steps", "2",
                        "--val_steps", "1", "--sample_len", "8", "--device", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "SmolLM2-135M-Instruct on sample.txt" in r.stdout
    assert f"{processes} process(es)" in r.stdout and "too short" not in r.stdout  # T stays 64
    val = [float(line.split("val loss")[1]) for line in r.stdout.splitlines() if "val loss" in line]
    assert len(val) == 2 and all(0 < v < 10 for v in val)  # a real model: far below ln(49152) = 10.8
    assert "Once upon a time, a little dog" in r.stdout
    assert read_datafile_header(tmp_path / "demo_data" / "sample_val.bin") >= 2 * 64 * processes + 1
    assert (tmp_path / "demo_data" / "sample_train.bin").is_file()
    # saved as a GGUF file with the demo's tokenizer, which loads again
    assert (tmp_path / "latest").read_text().strip() == "step_000002"
    assert (tmp_path / "step_000002" / "model.gguf").is_file() and not (tmp_path / "step_000002" / "params.json").exists()


def test_tokens_outside_the_vocabulary_are_a_clear_error(tiny_ckpt, data, tmp_path):
    # the bad id sits far into the second shard: found before the first step, not when reached
    write_datafile(tmp_path / "big_000.bin", [128000, 5, 6] * 100)
    write_datafile(tmp_path / "big_001.bin", [128000, 5, 6] * 100 + [200000])
    bad = "big_001.bin holds token id 200000, outside this model's vocabulary of 128256"
    with pytest.raises(ValueError, match=bad):
        run(tiny_ckpt, {**data, "train_data": str(tmp_path / "big_*.bin")}, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("step_*"))


def test_cli_unknown_command_lists_the_commands():
    r = subprocess.run([sys.executable, "llama31.py", "expor"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == ("error: unknown command 'expor'; python llama31.py samples "
                                                      "(--help), python llama31.py finetune finetunes, and chat.py, "
                                                      "eval.py, export.py, shards.py are scripts of their own")


@pytest.mark.parametrize("command", ["chat", "eval", "export", "shards"])
def test_a_script_asked_for_as_a_command_is_named_in_one_line(command):
    r = subprocess.run([sys.executable, "llama31.py", command, "--ckpt_dir", "x"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: unknown command {command!r}") and f"{command}.py" in r.stderr


@pytest.mark.parametrize("script", [["llama31.py", "--nochat"], ["chat.py"], ["eval.py"], ["export.py"],
                                    ["shards.py"], ["reference.py"], ["reference.py", "compare"]])
def test_a_misspelt_flag_is_refused_before_anything_loads(script):
    # fire alone would sample (or chat, ...) with the default first, and only then say "Could not consume arg"
    r = subprocess.run([sys.executable, *script, "--temprature", "0"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    takes = script in (["llama31.py", "--nochat"], ["chat.py"], ["reference.py"])  # a --temperature to suggest
    assert r.stderr.startswith("error: unknown flag --temprature" + (" (did you mean --temperature?)" if takes else ""))


@pytest.mark.parametrize("args, message", [
    (["--B", "0"], "error: --B must be an integer >= 1, got 0"),
    (["--learning_rate", "abc"], "error: --learning_rate must be a number >= 0, got 'abc'"),
    MISSING_DEVICE,
    (["--fsdp"], "error: --fsdp shards the model across processes; launch with torchrun"),
    (["--out_dir", "README.md"], "error: --out_dir README.md is a file; give a directory"),
])
def test_cli_finetune_rejects_bad_arguments_in_one_line(tiny_ckpt, data, tmp_path, args, message):
    r = subprocess.run([sys.executable, "llama31.py", "finetune", "--ckpt_dir", str(tiny_ckpt), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(message)


def test_shards_command_splits_documents_and_uses_the_checkpoints_tokenizer(tiny_ckpt, tokenizer, tmp_path):
    import numpy as np

    from formats import HEADER_INTS

    docs = [f"Story {i}: the fox ran {i} times around the old oak." for i in range(5)]
    (tmp_path / "my.txt").write_text("\n\n".join(docs) + "\n")
    r = subprocess.run([sys.executable, "shards.py", "--text", str(tmp_path / "my.txt"),
                        "--out_dir", str(tmp_path / "s"), "--ckpt_dir", str(tiny_ckpt)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"--train_data {tmp_path / 's' / 'my_train.bin'}" in r.stderr

    def ids(part):  # BOS text EOS per document, from the tokenizer directly
        return [t for d in part for t in tokenizer.encode(d, bos=True, eos=True)]
    for name, part in [("my_train.bin", docs[:3]), ("my_val.bin", docs[3:])]:  # 2 val documents
        got = np.fromfile(tmp_path / "s" / name, dtype="<u4")[HEADER_INTS:]
        assert got.tolist() == ids(part), name


@pytest.mark.slow
def test_fresh_run_refuses_an_out_dir_holding_a_run_and_resume_by_path_stays_in_its_dir(tiny_ckpt, data, tmp_path):
    from llama31 import ConfigError

    run(tiny_ckpt, data, tmp_path / "r", max_steps=2, stop_after=1)
    before = (tmp_path / "r" / "step_000001" / "consolidated.00.pth").read_bytes()
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run .*--resume latest"):
        run(tiny_ckpt, data, tmp_path / "r", max_steps=2)
    # the demo saves too, so it is refused there as well; it may replace an earlier demo's checkpoints
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run"):
        finetune(out_dir=str(tmp_path / "r"), max_steps=1, device="cpu", sample_prompts=[], val_every=0)
    assert (tmp_path / "r" / "step_000001" / "consolidated.00.pth").read_bytes() == before
    (tmp_path / "d" / "step_000001").mkdir(parents=True)  # what an earlier demo run leaves
    torch.save({"config": {"demo": True}}, tmp_path / "d" / "step_000001" / "train_state.pt")
    (tmp_path / "d" / "latest").write_text("step_000001\n")
    finetune(out_dir=str(tmp_path / "d"), max_steps=1, device="cpu", sample_prompts=[], val_every=0)
    assert (tmp_path / "d" / "step_000001" / "model.gguf").is_file()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # so a default "out" would land here, where the test can see it
    try:
        finetune(resume=str(tmp_path / "r" / "step_000001"), device="cpu", sample_prompts=[], val_every=0)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "r" / "latest").read_text().strip() == "step_000002" and not (tmp_path / "out").exists()


def test_a_gguf_model_is_saved_as_gguf_and_resumes_exactly(tiny_gguf, tmp_path):
    rng = torch.Generator().manual_seed(0)
    for name in ("g_train_000.bin", "g_val.bin"):
        write_datafile(tmp_path / name, torch.randint(0, 256, (3000,), generator=rng).tolist())
    data = {"train_data": str(tmp_path / "g_train_*.bin"), "val_data": str(tmp_path / "g_val.bin")}
    straight = run(tiny_gguf, data, tmp_path / "a", max_steps=4)
    run(tiny_gguf, data, tmp_path / "b", max_steps=4, stop_after=2)
    resumed = finetune(out_dir=str(tmp_path / "b"), resume="latest", device="cpu", sample_prompts=[], val_every=0)
    saved = tmp_path / "b" / "step_000004" / "model.gguf"
    assert saved.is_file() and resumed["step"] == 4
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint samples again, with the source file's tokenizer (through the `latest` pointer)
    llama = Llama.build(tmp_path / "b" / "latest", max_seq_len=64, device="cpu", dtype="fp32")
    assert llama.tokenizer.n_words == 258 and all(torch.equal(a[k], llama.model.state_dict()[k]) for k in a)


# -----------------------------------------------------------------------------
# the CUDA and torchrun paths' logic, checked here without a GPU (the GPU lane runs them for real)


def fake_torchrun(monkeypatch, rank, local_rank, world, gpus):
    """torchrun's environment on a machine with `gpus` GPUs; init_process_group records its call."""
    for k, v in {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    calls = []
    monkeypatch.setattr(runs.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    return calls


def test_under_torchrun_each_process_takes_its_local_gpu(monkeypatch):
    calls = fake_torchrun(monkeypatch, rank=5, local_rank=1, world=8, gpus=4)
    info, dev = llama31.setup_distributed("cuda")
    assert (info.rank, info.world_size, dev) == (5, 8, torch.device("cuda", 1))
    assert calls[0][0] == "nccl" and calls[0][1]["device_id"] == torch.device("cuda", 1)


def test_a_launcher_showing_each_task_one_gpu_gets_index_0(monkeypatch):
    # e.g. SLURM with one CUDA_VISIBLE_DEVICES per task: LOCAL_RANK 3, one GPU visible
    fake_torchrun(monkeypatch, rank=3, local_rank=3, world=4, gpus=1)
    assert llama31.setup_distributed("cuda")[1] == torch.device("cuda", 0)


def test_an_explicit_gpu_index_under_torchrun_is_a_clear_error(monkeypatch):
    fake_torchrun(monkeypatch, rank=0, local_rank=0, world=2, gpus=2)
    with pytest.raises(ConfigError, match="--device cuda:0 would put all 2 processes on one GPU; use --device cuda"):
        llama31.setup_distributed("cuda:0")


def test_ddp_wraps_the_model_before_it_is_compiled(monkeypatch):
    class FakeDDP(torch.nn.Module):  # DDP itself needs a process group
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module = module

    monkeypatch.setattr(llama31, "DDP", FakeDDP)
    model = random_model(max_seq_len=32)
    wrapped = llama31.wrap_for_training(model, llama31.DistInfo(0, 0, 2), torch.device("cpu"), [], True)
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(wrapped._orig_mod, FakeDDP) and wrapped._orig_mod.module is model
    fsdp_run = [fsdp.Sharded(torch.device("cpu"), True, llama31.select_trainable, "all")]
    sharded = llama31.wrap_for_training(model, llama31.DistInfo(0, 0, 2), torch.device("cpu"), fsdp_run, False)
    assert sharded is model  # FSDP shards in place; no DDP


def matmul_weights(a) -> int:
    """Weights that multiply, from the shapes Meta's model has (untied: the embedding only gathers)."""
    hd, hidden = a.dim // a.n_heads, a.ffn_hidden_dim
    attention = 2 * a.dim * a.dim + 2 * a.dim * a.n_kv_heads * hd
    return a.n_layers * (attention + 3 * a.dim * hidden + 2 * a.dim) + a.dim + a.vocab_size * a.dim


def test_flops_per_token_counts_frozen_weights_without_their_gradient():
    model = random_model(max_seq_len=64)
    a, T = model.args, 64
    n, attention = matmul_weights(a), 12 * a.n_layers * a.dim * T
    assert runs.flops_per_token(model, T) == 6 * n + attention
    llama31.select_trainable(model, "rmsnorm")
    norms = (2 * a.n_layers + 1) * a.dim
    assert runs.flops_per_token(model, T) == 4 * n + 2 * norms + attention


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12), ("NVIDIA H100 NVL", torch.bfloat16, 835e12),
    ("NVIDIA H200 NVL", torch.bfloat16, 835e12), ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12), ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, None), ("Some Future GPU", torch.bfloat16, None)])
def test_mfu_peak_by_gpu_name_and_none_for_fp32(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: name)
    assert runs.peak_flops(torch.device("cuda", 0), dtype) == peak
    assert runs.peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_each_rank_restores_its_own_random_state():
    torch.manual_seed(1)
    first = torch.get_rng_state()
    torch.manual_seed(2)
    second = torch.get_rng_state()
    runs.restore_rng([{"cpu": first, "cuda": None}, {"cpu": second, "cuda": None}],
                        llama31.DistInfo(1, 1, 2), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), second)
    # the format before per-rank states: rank 0's CPU state and a list of its GPUs' states
    runs.restore_rng({"cpu": first, "cuda": []}, llama31.DistInfo(1, 1, 2), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), first)


def test_sharded_sampling_lets_go_of_gradients_and_optimizer_state_first(monkeypatch, tiny_ckpt, capsys):
    llama = Llama.build(tiny_ckpt, max_seq_len=64, device="cpu", dtype="fp32")
    model = llama.model.train()
    optimizer = model.configure_optimizers(0.0, 1e-3)
    x = torch.randint(0, 1000, (1, 8))
    model.forward_loss(x, x).backward()
    optimizer.step()
    seen = {}

    def gather(model, optimizer_):  # what FSDP's gather would give, and what was held then
        seen.update(state=len(optimizer.state), grads=sum(p.grad is not None for p in model.parameters()))
        return model.state_dict(), None

    assemble = llama31.assemble
    sharded = fsdp.Sharded(torch.device("cpu"), True, llama31.select_trainable, "all")
    monkeypatch.setattr(sharded, "state_dicts", gather)
    monkeypatch.setattr(llama31, "assemble", lambda *a, **k: seen.update(dtype=a[5]) or assemble(*a, **k))
    run = runs.Run(llama31.TrainConfig(sample_len=2, sample_prompts=["Hi"]), Path("out"), tiny_ckpt, False, None,
                   None, 0, 1, llama31.DistInfo(), torch.device("cpu"), [sharded])
    llama31.sample_after_training(run, llama, optimizer, torch.bfloat16)
    assert seen == {"state": 0, "grads": 0, "dtype": torch.bfloat16}  # sampled in the training dtype
    assert capsys.readouterr().out.startswith("Hi")
