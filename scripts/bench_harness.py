"""
harness.py's adapter against lm-eval's own HF model (HFLM, what `lm_eval --model hf` runs) on the
same weights and the same local tasks, on CPU: each task's wall time (lm-eval's simple_evaluate,
the models loaded before), then loglikelihood requests per second at batch 1 and batch 8.

    python scripts/bench_harness.py [--ckpt_dir X | --shape 90m] [--repeats 1] [--threads 0]

--ckpt_dir: a .gguf file (transformers dequantizes it; ours loads it dequantized too) or an HF
directory; default the demo GGUF. --shape: random weights of that shape instead (bench.py's,
the real 128256-token vocabulary), exported to HF's layout. Both run fp32. The tasks, written to
a temporary folder: 30 four-choice questions, the 9 paragraphs of data/sample.txt scored as
rolling perplexity, 10 short generations (greedy, up to 32 tokens, until a newline). The
throughput: the first 15 questions' 60 (context, choice) requests.
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import bench  # noqa: E402
import formats  # noqa: E402
import runs  # noqa: E402
from harness import HarnessLM  # noqa: E402
from llama31 import ModelArgs, Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YAML = "task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
BODIES = {
    "b_choice": 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
                'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n",
    "b_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                 "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, "
                 "higher_is_better: false}\n",
    "b_generate": 'output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
                  'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 32\n'
                  "  do_sample: false\nmetric_list:\n  - {metric: exact_match, aggregation: mean, "
                  "higher_is_better: true}\n",
}


def random_checkpoint(shape: str, root: Path) -> Path:
    """Random weights of a shape, in Meta's layout and exported to HF's (with the tokenizer)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**bench.SHAPES[shape], "vocab_size": 128256}))
    params = model.args.to_params()
    formats.save_meta(model.state_dict(), params, root / "meta", torch.float32)
    formats.save_hf(model.state_dict(), params, root / "hf", torch.float32)
    formats.export_tokenizer(root / "meta", root / "hf", "hf", params)
    return root / "hf"


def write_tasks(root: Path):
    """The three tasks' data and YAMLs in root."""
    pairs = [(a, b) for a in range(2, 12) for b in (3, 5, 7)]
    choice = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b), str(a - b)],
               "answer": 0} for a, b in pairs]
    paragraphs = [p.strip() for p in (REPO / "data" / "sample.txt").read_text().split("\n\n") if p.strip()][:9]
    questions = ["What is the capital of France?", "What color is grass?", "What is 2+2?", "Name a fruit.",
                 "Who wrote Hamlet?", "What do bees make?", "How many legs does a spider have?",
                 "What is the largest planet?", "What language is spoken in Spain?", "What is ice made of?"]
    rows = {"b_choice": choice, "b_rolling": [{"text": p} for p in paragraphs],
            "b_generate": [{"question": q, "answer": ""} for q in questions]}
    for name, docs in rows.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
        (root / f"{name}.yaml").write_text(YAML.format(name=name, data=root / f"{name}.jsonl") + BODIES[name])
    return choice


def timed(fn):
    """(wall seconds, CPU seconds of this process, fn()): on a shared machine the CPU time is the
    steadier figure (with --threads 1 it is the work done)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def interleaved(cases: dict, repeats: int) -> dict:
    """name -> (median wall, median CPU) seconds of each case, run in turn, so that a drift in the
    machine's speed hits every case."""
    runs = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            runs[name].append(timed(fn)[:2])
    return {name: tuple(statistics.median(r[i] for r in rs) for i in (0, 1)) for name, rs in runs.items()}


def main(ckpt_dir=None, shape=None, repeats: int = 1, threads: int = 0):
    if threads:
        torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="bench_harness_"))
    path = Path(ckpt_dir) if ckpt_dir else random_checkpoint(shape, root) if shape else runs.find_demo_gguf()
    gguf = path.suffix == ".gguf"
    choice = write_tasks(root)
    manager = TaskManager(include_path=str(root), include_defaults=False)
    hf_args = dict(pretrained=str(path.parent if gguf else path), dtype="float32", device="cpu", batch_size=1,
                   **({"gguf_file": path.name} if gguf else {}))
    load_hf, _, hf = timed(lambda: HFLM(**hf_args))
    load_ours, _, ours = timed(lambda: HarnessLM(None, path, 1, device="cpu", dtype="fp32", quantize="none"))
    print(f"{shape or path.name}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"load: hf {load_hf:.1f}s, ours {load_ours:.1f}s")
    for lm in (hf, ours):  # warm-up: one document of each task
        simple_evaluate(model=lm, tasks=list(BODIES), task_manager=manager, limit=1)
    print(f"{'task':12} {'hf s':>7} {'ours s':>7} {'ratio':>6}   {'hf cpu':>7} {'ours cpu':>8} {'ratio':>6}")
    totals = [0.0, 0.0, 0.0, 0.0]
    for task in BODIES:
        t = interleaved({name: (lambda lm=lm: simple_evaluate(model=lm, tasks=[task], task_manager=manager))
                         for name, lm in (("hf", hf), ("ours", ours))}, repeats)
        row = [t["hf"][0], t["ours"][0], t["hf"][1], t["ours"][1]]
        totals = [a + b for a, b in zip(totals, row)]
        print(f"{task:12} {row[0]:7.2f} {row[1]:7.2f} {row[0] / row[1]:5.2f}x   {row[2]:7.2f} {row[3]:8.2f} "
              f"{row[2] / row[3]:5.2f}x")
    print(f"{'all three':12} {totals[0]:7.2f} {totals[1]:7.2f} {totals[0] / totals[1]:5.2f}x   {totals[2]:7.2f} "
          f"{totals[3]:8.2f} {totals[2] / totals[3]:5.2f}x")
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(f"Question: {d['question']}\nAnswer:",
                                                                         f" {c}"), idx=0)
                for d in choice[:15] for c in d["choices"]]

    def at(lm, b):
        setattr(lm, "batch_size_per_gpu" if lm is hf else "batch_size", b)
        return lm.loglikelihood(requests, disable_tqdm=True)

    t = interleaved({(name, b): (lambda lm=lm, b=b: at(lm, b)) for name, lm in (("hf", hf), ("ours", ours))
                     for b in (1, 8)}, repeats)
    print(f"loglikelihood requests/s, wall (CPU), {len(requests)} requests of 15 questions:")
    for name in ("hf", "ours"):
        (w1, c1), (w8, c8) = t[name, 1], t[name, 8]
        n = len(requests)
        print(f"  {name:5} batch 1 {n / w1:7.1f} ({n / c1:7.1f})  batch 8 {n / w8:7.1f} ({n / c8:7.1f})  "
              f"{w1 / w8:.2f}x ({c1 / c8:.2f}x)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
