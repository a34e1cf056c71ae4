"""bench.py runs end to end and prints every row of its table (a smoke test: tiny shape, one
repeat; timings are not checked)."""

import pytest

import bench


@pytest.mark.slow
def test_bench_prints_every_row(capsys):
    sections = [s for s in bench.SECTIONS if s != "lora"]  # test_bench_lora_rows: its own processes
    rows = bench.main(shape="tiny", dtypes="fp32", prompt_len=8, new_tokens=3, prefill_len=8, T=8,
                      repeats=1, train_repeats=1, compile=False, sections=sections)
    out = capsys.readouterr().out
    metrics = [r[0] for r in rows]
    for name in ("GEMV roof", "decode tok/s (HF generate)", "decode tok/s (HF forward loop)", "prefill tok/s",
                 "finetune tok/s", "load peak RSS / checkpoint", "chat 1st-token time, turn 10 / turn 1",
                 "decode tok/s int8 (vs dense)", "decode tok/s int4 (vs dense)", "demo GGUF decode tok/s",
                 "demo GGUF load peak RSS / weights",
                 "demo decode tok/s, dequantized fp32 (the default) (vs llama.cpp)",
                 "demo decode tok/s, int4 bf16 (--quantize keep) (vs llama.cpp)",
                 "demo decode tok/s, dequantized fp32 + its own int4 draft, k=4 (vs no draft)",
                 "tiny verify 5 tokens / one decode step", "serve decode tok/s, 16 streams (vs 1)",
                 "serve decode tok/s, 1 stream drafted by its own int4 (vs plain)"):
        assert any(m.startswith(name) for m in metrics), name
        assert name in out
    for metric, dtype, ours, hf, ratio, _ in rows:
        assert (dtype == "fp32" or metric.startswith("demo decode tok/s, int4 bf16")) and ours  # llamacpp: its own
        if hf:  # a row that compares llama31 with HF has a ratio
            assert float(ratio.split("x")[0]) > 0
    load = next(r for r in rows if r[0].startswith("load"))
    assert float(load[2].rstrip("x")) >= 0  # a tiny checkpoint barely moves the RSS


@pytest.mark.slow
def test_bench_lora_rows_compare_lora_and_qlora_with_full_finetuning():
    # four fresh processes (full, LoRA, QLoRA int8 and int4) of one step each on the tiny shape
    rows = bench.main(shape="tiny", dtypes="fp32", T=8, train_repeats=1, sections="lora", layers=1)
    metrics = [r[0] for r in rows]
    assert metrics[0] == "finetune tok/s full (B=1 T=8)" and "tiny width, 1 of its 2 layers" in rows[0][5]
    for label in ("LoRA", "QLoRA int8", "QLoRA int4"):
        speed, memory = (next(r for r in rows if r[0] == f"finetune {m} {label} (vs full)")
                         for m in ("tok/s", "peak RSS"))
        assert speed[3] == rows[0][2] and float(speed[4].rstrip("x")) > 0
        assert float(memory[4].rstrip("x")) > 0 and memory[2].endswith("B")
    trained = [float(r[5].split("M trained")[0].split()[-1]) for r in rows if "tok/s" in r[0]]
    assert trained[1] == trained[2] == trained[3] < trained[0]  # the same adapters, fewer than the whole


def test_bench_rejects_unknown_shape_and_section(capsys):
    import pytest

    with pytest.raises(SystemExit, match="unknown shape"):
        bench.main(shape="70b")
    with pytest.raises(SystemExit, match="unknown section or dtype"):
        bench.main(shape="tiny", sections="decode,speed")


def test_bench_rejects_bad_numbers_and_devices_in_one_line():
    import pytest

    with pytest.raises(SystemExit, match="^error: --repeats must be an integer >= 1, got 0$"):
        bench.main(shape="tiny", repeats=0)
    with pytest.raises(SystemExit, match="^error: unknown device 'tpu'"):
        bench.main(shape="tiny", device="tpu")


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_report(tmp_path):
    # scripts/gpu_check.sh's own steps on the CPU: the CUDA tests (each skipped, with its reason, on
    # a machine without one) and bench.py's GPU sections on a tiny shape, into one markdown report
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=repo,
                       env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check, 20")
    if not torch.cuda.is_available():
        assert "SKIPPED [1] tests/test_cuda.py" in report and "needs a CUDA GPU" in report
    tables = [line for line in report.splitlines() if line.startswith("| ")]
    for name in ("GEMV roof", "decode tok/s (HF generate)", "prefill tok/s", "finetune tok/s"):
        assert any(line.startswith(f"| {name}") for line in tables), name


@pytest.mark.slow
def test_bench_tp_rows_time_one_and_n_processes():
    rows = bench.main(shape="tiny", dtypes="fp32", prompt_len=8, new_tokens=3, repeats=1, tp=2)
    metrics = [r[0] for r in rows]
    assert metrics == ["decode tok/s, 1 process", "peak RSS growth per process, 1 process",
                       "decode tok/s, 2 processes (tensor parallel)", "peak RSS growth per process, 2 processes "
                       "(tensor parallel)"]  # --tp alone: no other section
    one, two = rows[1], rows[3]
    assert len(two[2].split(" / ")) == 2  # one figure per process
    halved = float(two[5].split("its weights ")[1].split(" B")[0].replace(",", ""))
    whole = float(one[5].split("its weights ")[1].split(" B")[0].replace(",", ""))
    assert abs(halved - whole / 2) < 0.01 * whole
