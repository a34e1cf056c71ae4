"""lm-evaluation-harness tasks through harness.py, against lm-eval's own HF model (HFLM, what
`lm_eval --model hf` runs) on the same weights: a random Meta-layout checkpoint exported to HF's
layout (fp32), and the demo GGUF, which transformers reads with gguf_file=. Three local tasks the
tests write (dataset_path: json): multiple choice, rolling perplexity, generate_until. Per sample:
the same log-likelihoods (fp32, 1e-4), the same is-greedy flags, the same generations, and the
same metrics. Offline: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set before lm-eval loads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FINETUNE_SHAPE, make_checkpoint
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_lora import run as lora_finetune

import export
import formats
import harness
from harness import HarnessLM
from errors import ConfigError
from llama31 import Llama
from tokenizer import find_tokenizer_model

REPO = Path(__file__).resolve().parents[1]
TASKS = ["t_choice", "t_rolling", "t_generate"]
MAX_LENGTH = 64  # small, so that the rolling task's texts span several windows
TOL = 1e-4

QUESTIONS = [  # the first: what the demo model answers in its chat template, word for word (greedy)
             ("What is the capital of France?", ["The capital of France is Paris", "Paris", "London"], 0),
             ("What is two plus two?", ["4", "5", "22", "four"], 0),
             ("Which animal barks?", ["a dog", "a cat", "a fish"], 0),
             ("The capital of France is", ["Paris", "London", "Berlin", "Rome"], 0),
             ("Water freezes at", ["zero degrees", "ten degrees", "a hundred degrees"], 0),
             ("The opposite of hot is", ["cold", "warm", "blue"], 0),
             ("One, two, three, four,", ["five", "six", "ten"], 0)]
TEXTS = ["The cat sat on the mat. It was a sunny day, and the cat was happy to sit there for hours. " * 3,
         "A dog ran to the park and back. Tom likes red apples very much; birds sing in the tall tree.",
         "Short one.",
         "東京は日本の首都です。 Numbers: 3.14159, 2718, 1000000. <|eot_id|> is text here. \n\n  Tabs\tand  spaces."]
PROMPTS = ["What is the capital of France?", "What color is grass?", "What is 2+2?", "Name a fruit.",
           "Say hello.", "Count to three."]

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
BODIES = {
    "t_choice": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "t_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "t_generate": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A folder of the three task YAMLs and their JSONL data."""
    root = tmp_path_factory.mktemp("tasks")
    rows = {"t_choice": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
            "t_rolling": [{"text": t} for t in TEXTS],
            "t_generate": [{"question": q, "answer": "Paris"} for q in PROMPTS]}
    for name, docs in rows.items():
        data = root / f"{name}.jsonl"
        data.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8")
        (root / f"{name}.yaml").write_text(YAML.format(name=name, data=data) + BODIES[name])
    return root


@pytest.fixture(scope="module")
def manager(tasks):
    return TaskManager(include_path=str(tasks), include_defaults=False)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A random fp32 checkpoint in Meta's layout and its export to HF's (config.json, safetensors,
    tokenizer.json with Llama 3's chat template), as export.py writes it."""
    root = tmp_path_factory.mktemp("harness_ckpt")
    model = make_checkpoint(root / "meta", seed=0, dtype=torch.float32, **FINETUNE_SHAPE)
    formats.save_hf(model.state_dict(), model.args.to_params(), root / "hf", dtype=torch.float32)
    formats.export_tokenizer(root / "meta", root / "hf", "hf", model.args.to_params())
    return SimpleNamespace(meta=root / "meta", hf=root / "hf")


def evaluate(lm, manager, tasks=TASKS, **kw):
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, **kw)


def ours(path, batch_size=1, **kw):
    return HarnessLM(None, path, batch_size, **{"device": "cpu", "dtype": "fp32", **kw})


def responses(results, task) -> dict:
    """doc_id -> (the requests' arguments, each request's first response)."""
    return {s["doc_id"]: (s["arguments"], [r[0] for r in s["resps"]]) for s in results["samples"][task]}


def assert_same_samples(a, b, tasks=TASKS, tol=TOL):
    """Per document: the same requests, log-likelihoods within tol, the same greedy flags and texts."""
    for task in tasks:
        x, y = responses(a, task), responses(b, task)
        assert x.keys() == y.keys()
        for doc in x:
            assert x[doc][0] == y[doc][0], (task, doc)
            for mine, theirs in zip(x[doc][1], y[doc][1]):
                if isinstance(mine, tuple):  # (log-likelihood, is greedy)
                    assert mine[0] == pytest.approx(theirs[0], abs=tol) and mine[1] == theirs[1], (task, doc)
                elif isinstance(mine, float):  # a rolling log-likelihood
                    assert mine == pytest.approx(theirs, abs=tol), (task, doc)
                else:
                    assert mine == theirs, (task, doc)


def assert_same_metrics(a, b, tasks=TASKS):
    for task in tasks:
        mine, theirs = a["results"][task], b["results"][task]
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], rel=1e-6), (task, key)
            else:
                assert value == theirs[key], (task, key)


@pytest.fixture(scope="module")
def random_runs(random_ckpt, manager):
    """The three tasks scored by lm-eval's HF model and by ours, at batch sizes 1 and 8."""
    hf = HFLM(pretrained=str(random_ckpt.hf), dtype="float32", device="cpu", batch_size=1, max_length=MAX_LENGTH)
    runs = {"hf": evaluate(hf, manager)}
    for b in (1, 8):
        runs[b] = evaluate(ours(random_ckpt.meta, b, max_length=MAX_LENGTH), manager)
    runs["hf layout"] = evaluate(ours(random_ckpt.hf, max_length=MAX_LENGTH), manager)  # the export, read by us
    return runs


# -----------------------------------------------------------------------------
# against lm-eval's HF model: a random Meta checkpoint exported to HF


@pytest.mark.slow
def test_random_checkpoint_scores_per_sample_as_lm_evals_hf_model(random_runs):
    assert_same_samples(random_runs[1], random_runs["hf"])
    # the rolling task's first text spans several windows of MAX_LENGTH, the last has special-token text
    assert len(responses(random_runs[1], "t_rolling")) == len(TEXTS)


@pytest.mark.slow
def test_random_checkpoint_metrics_equal_lm_evals_hf_model(random_runs):
    assert_same_metrics(random_runs[1], random_runs["hf"])


@pytest.mark.slow
def test_the_hf_export_read_by_us_scores_as_the_meta_checkpoint(random_runs):
    assert_same_samples(random_runs["hf layout"], random_runs[1])
    assert_same_metrics(random_runs["hf layout"], random_runs[1])


@pytest.mark.slow
def test_batch_sizes_1_and_8_give_the_same_scores(random_runs):
    assert_same_samples(random_runs[8], random_runs[1])
    assert_same_metrics(random_runs[8], random_runs[1])


@pytest.fixture(scope="module")
def hf_lm(random_ckpt):
    return HFLM(pretrained=str(random_ckpt.hf), dtype="float32", device="cpu", batch_size=1)


@pytest.fixture(scope="module")
def our_lm(random_ckpt):
    return ours(random_ckpt.meta)


ENCODED = ["Hello world", "", " leading space", "<|begin_of_text|>Already has BOS",
           "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "東京 3.14159\n\n\ttabs"]


def test_tokens_and_bos_are_lm_evals_hf_models(hf_lm, our_lm):
    for s in ENCODED:
        for special in (None, True, False):
            assert our_lm.tok_encode(s, special) == hf_lm.tok_encode(s, add_special_tokens=special), (s, special)
    assert our_lm.prefix_token_id == hf_lm.prefix_token_id and our_lm.eot_token_id == hf_lm.eot_token_id
    assert our_lm.max_length == hf_lm.max_length == 131072  # what config.json says, for Llama 3.1's RoPE
    assert our_lm.sampler.tokenizer.stop_tokens == hf_lm.model.generation_config.eos_token_id
    ids = our_lm.tok_encode(ENCODED[4] + " more text")
    assert our_lm.tok_decode(ids) == hf_lm.tok_decode(ids)


def test_chat_template_renders_as_transformers_does(hf_lm, our_lm):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Name a colour."}]
    for messages, prompt in [(dialog, True), (dialog[:3], False), (dialog[1:2], True)]:
        assert our_lm.apply_chat_template(messages, prompt) == hf_lm.apply_chat_template(messages, prompt)


def test_greedy_continuations_are_flagged_as_lm_evals_hf_model_flags_them(hf_lm, our_lm):
    contexts = [f"Question: {p}\nAnswer:" for p in PROMPTS]
    greedy = our_lm.generate_until([request("generate_until", c, {"until": [], "max_gen_toks": 1}) for c in contexts])
    asked = [*zip(contexts, greedy), *((c, g + " and more") for c, g in zip(contexts, greedy)), ("", "Hello")]
    mine = our_lm.loglikelihood([request("loglikelihood", *a) for a in asked])
    theirs = hf_lm.loglikelihood([request("loglikelihood", *a) for a in asked])
    assert [g for _, g in mine] == [g for _, g in theirs]
    assert any(g for _, g in mine[:len(contexts)]) and not any(g for _, g in mine[len(contexts):])
    assert [x for x, _ in mine] == pytest.approx([x for x, _ in theirs], abs=TOL)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_sampled_generation_is_reproducible_with_a_seed(random_ckpt):
    llama = Llama.build(random_ckpt.meta, max_seq_len=MAX_LENGTH, max_batch_size=2, device="cpu", dtype="fp32")
    asked = [request("generate_until", p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": True,
                                           "temperature": 1.0}) for p in PROMPTS[:2]]
    first, again = (HarnessLM(llama, batch_size=2, seed=7).generate_until(asked) for _ in range(2))
    other = HarnessLM(llama, batch_size=2, seed=8).generate_until(asked)
    greedy = HarnessLM(llama, batch_size=2).generate_until([request("generate_until", p, {"until": ["\n"],
                                                           "max_gen_toks": 8}) for p in PROMPTS[:2]])
    assert first == again and first != other and first != greedy


# -----------------------------------------------------------------------------
# against lm-eval's HF model: the demo GGUF (a real model), in its chat template


@pytest.mark.slow
def test_demo_gguf_in_its_chat_template_scores_as_lm_evals_hf_model(smollm_path, manager):
    theirs = HFLM(pretrained=str(smollm_path.parent), gguf_file=smollm_path.name, dtype="float32", device="cpu",
                  batch_size=1)
    mine = ours(smollm_path, quantize="none")  # dequantized, as transformers reads it
    assert mine.max_length == theirs.max_length == 8192
    assert mine.sampler.tokenizer.stop_tokens == [theirs.model.generation_config.eos_token_id]  # not <|endoftext|>
    a, b = (evaluate(lm, manager, apply_chat_template=True, limit=4) for lm in (mine, theirs))
    assert_same_samples(a, b)
    assert_same_metrics(a, b)
    prompts = [args[0][0] for args, _ in responses(a, "t_choice").values()]
    assert all(p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n") for p in prompts)
    answers = [r[0] for _, r in responses(a, "t_generate").values()]
    assert any("Paris" in text for text in answers)  # a real model, answering
    flags = [g for _, r in responses(a, "t_choice").values() for _, g in r]
    assert any(flags) and not all(flags)


# -----------------------------------------------------------------------------
# quantized and LoRA checkpoints


@pytest.mark.slow
def test_int8_checkpoint_scores_near_full_precision(random_ckpt, random_runs, manager):
    int8 = ours(random_ckpt.meta, max_length=MAX_LENGTH, quantize="int8")
    assert "Int8" in harness.runs.describe(int8.llama.model)
    result = evaluate(int8, manager, tasks=["t_choice", "t_rolling"])
    full = random_runs[1]
    for task in ("t_choice", "t_rolling"):
        got, want = responses(result, task), responses(full, task)
        for doc in got:
            mine = [r[0] if isinstance(r, tuple) else r for r in got[doc][1]]
            dense = [r[0] if isinstance(r, tuple) else r for r in want[doc][1]]
            assert mine == pytest.approx(dense, rel=1e-2)


def test_a_gguf_kept_quantized_scores_near_its_dequantized_weights(tiny_gguf, manager):
    kept = ours(tiny_gguf, dtype=None)  # its 4- and 8-bit matrices as they are, bf16 activations
    assert "Int4" in harness.runs.describe(kept.llama.model)
    full = ours(tiny_gguf, quantize="none")
    a, b = (evaluate(lm, manager, tasks=["t_choice"]) for lm in (kept, full))
    for doc, (_, got) in responses(a, "t_choice").items():
        want = responses(b, "t_choice")[doc][1]
        assert [x for x, _ in got] == pytest.approx([x for x, _ in want], rel=0.05)


@pytest.mark.slow
def test_lora_checkpoint_scores_as_lm_evals_hf_model_on_its_merged_export(data, manager, tmp_path):
    base = tmp_path / "base"
    make_checkpoint(base, seed=0, dtype=torch.float32, **FINETUNE_SHAPE)
    shutil.copyfile(find_tokenizer_model(), base / "tokenizer.model")
    lora_finetune(base, data, tmp_path / "run")
    step = tmp_path / "run" / "step_000003"
    export.export(str(step), str(tmp_path / "merged"), "hf", dtype="fp32")
    hf = HFLM(pretrained=str(tmp_path / "merged"), dtype="float32", device="cpu", batch_size=1, max_length=MAX_LENGTH)
    mine = ours(tmp_path / "run" / "latest", max_length=MAX_LENGTH)
    assert mine.llama.model.lora_base[0] == str(base)
    a, b = evaluate(mine, manager), evaluate(hf, manager)
    assert_same_samples(a, b)
    assert_same_metrics(a, b)


# -----------------------------------------------------------------------------
# evaluate() for Python callers, eval.py --tasks, lm-eval's CLI, torchrun


def test_evaluate_scores_a_loaded_model_with_a_limit(random_ckpt, manager):
    llama = Llama.build(random_ckpt.meta, max_seq_len=MAX_LENGTH, max_batch_size=4, device="cpu", dtype="fp32")
    results = harness.evaluate(llama, "t_choice,t_rolling", limit=2, batch_size=4, manager=manager)
    assert results["n-samples"]["t_choice"]["effective"] == 2
    flat = harness.scores(results)
    assert set(flat) == {"t_choice/acc", "t_choice/acc_norm", "t_rolling/word_perplexity",
                         "t_rolling/byte_perplexity", "t_rolling/bits_per_byte"}
    assert flat["t_choice/acc"] == results["results"]["t_choice"]["acc,none"]


def test_bad_settings_are_one_line_errors(random_ckpt, manager, our_lm, tiny_gguf):
    llama = our_lm.llama
    with pytest.raises(ConfigError, match="unknown task.*include_path"):
        harness.evaluate(llama, "t_choice,no_such_task", manager=manager)
    with pytest.raises(ConfigError, match="names no task"):
        harness.evaluate(llama, "", manager=manager)
    with pytest.raises(ConfigError, match="batch_size auto"):
        HarnessLM(llama, batch_size="auto")
    with pytest.raises(ConfigError, match="give --output_path"):
        harness.main("t_choice", random_ckpt.meta, log_samples=True)
    plain = Llama.build(tiny_gguf, max_seq_len=32, device="cpu", dtype="fp32")  # a GGUF with no chat template
    with pytest.raises(ConfigError, match="no chat template; drop --apply_chat_template"):
        HarnessLM(plain, ckpt_dir=tiny_gguf).apply_chat_template([{"role": "user", "content": "hi"}])


def test_eval_py_without_lm_eval_says_how_to_install_it_in_one_line(random_ckpt):
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['eval.py', '--tasks', 'hellaswag', "
            f"'--ckpt_dir', {str(random_ckpt.meta)!r}]; runpy.run_path('eval.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "pip install lm-eval" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, eval; assert 'lm_eval' not in sys.modules"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr  # perplexity alone never imports it


def cli(*args, processes: int = 1, script="eval.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] * (processes > 1)
    r = subprocess.run([sys.executable, *launcher, str(REPO / script), *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def written(out: Path) -> dict:
    """The results JSON and per-sample JSONL files lm-eval wrote under out."""
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    samples = {t: [json.loads(line) for line in open(f)] for t in TASKS
               for f in glob.glob(str(out / "*" / f"samples_{t}_*.jsonl"))}
    return {"results": json.loads(Path(results).read_text())["results"], "samples": samples}


@pytest.mark.slow
def test_eval_py_under_torchrun_gives_what_one_process_gives(random_ckpt, tasks, tmp_path):
    args = ["--tasks", ",".join(TASKS), "--ckpt_dir", random_ckpt.meta, "--include_path", tasks, "--max_length",
            MAX_LENGTH, "--device", "cpu", "--log_samples"]
    one = cli(*args, "--output_path", tmp_path / "one")
    two = cli(*args, "--output_path", tmp_path / "two", processes=2)
    assert "|t_choice  |" in one.stdout and two.stdout.count("|t_choice  |") == 1  # rank 0 alone prints
    a, b = written(tmp_path / "one"), written(tmp_path / "two")
    assert {t: len(s) for t, s in a["samples"].items()} == {"t_choice": 7, "t_rolling": 4, "t_generate": 6}
    for task in TASKS:  # the first response of each request: lm-eval pads a process's share with repeats
        x = {s["doc_id"]: [r[0] for r in s["resps"]] for s in a["samples"][task]}
        y = {s["doc_id"]: [r[0] for r in s["resps"]] for s in b["samples"][task]}
        assert x == y, task
    assert_same_metrics(a, b)


@pytest.mark.slow
def test_lm_evals_own_cli_runs_model_llama31(random_ckpt, tasks, manager, tmp_path):
    cli("--model", "llama31", "--model_args", f"ckpt_dir={random_ckpt.meta},max_length={MAX_LENGTH},dtype=fp32",
        "--tasks", "t_choice", "--include_path", tasks, "--device", "cpu", "--output_path", tmp_path, "--log_samples",
        script="harness.py")
    got = written(tmp_path)
    want = evaluate(ours(random_ckpt.meta, max_length=MAX_LENGTH), manager, tasks=["t_choice"])
    assert got["results"]["t_choice"]["acc,none"] == want["results"]["t_choice"]["acc,none"]
    x = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in got["samples"]["t_choice"]}
    assert x == {doc: pytest.approx([r[0] for r in rs], abs=1e-6) for doc, (_, rs) in responses(want, "t_choice").items()}


@pytest.mark.slow
def test_finetune_eval_tasks_scores_the_trained_model_into_its_metrics(random_ckpt, tasks, data, tmp_path):
    import llama31

    out = tmp_path / "out"
    llama31.finetune(ckpt_dir=str(random_ckpt.meta), out_dir=str(out), **data, B=2, T=32, max_steps=2,
                     learning_rate=1e-3, warmup_steps=0, val_every=0, device="cpu", sample_prompts=[],
                     eval_tasks="t_choice", eval_limit=8, eval_include_path=str(tasks))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "t_choice/acc" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2 and "t_choice/acc_norm" in scored[0]
    # the same scores as eval.py's path gives the checkpoint the run saved
    saved = Llama.build(out / "latest", max_seq_len=2048, device="cpu", dtype="fp32")
    again = harness.scores(harness.evaluate(saved, "t_choice", limit=8, include_path=str(tasks)))
    assert again["t_choice/acc"] == scored[0]["t_choice/acc"] and again["t_choice/acc_norm"] == \
        scored[0]["t_choice/acc_norm"]


def test_finetune_eval_tasks_with_fsdp_is_refused_in_one_line():
    from variants import EvalTasks

    cfg = dict(eval_tasks="t_choice", eval_limit=None, eval_include_path=None, fsdp=True)
    with pytest.raises(ConfigError, match="^--eval_tasks scores whole models, and --fsdp shards them"):
        EvalTasks.of(cfg)
    assert EvalTasks.of({**cfg, "eval_tasks": ""}) is None
