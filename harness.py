"""
EleutherAI's lm-evaluation-harness (lm-eval 0.4.x) on any checkpoint this project loads:

    python eval.py --tasks hellaswag,arc_easy [--ckpt_dir X] [--num_fewshot N] [--limit N] [--batch_size B]
    python harness.py --model llama31 --model_args ckpt_dir=X --tasks hellaswag    # lm-eval's own CLI
    harness.evaluate(llama, ["hellaswag"], limit=100)                              # from Python

HarnessLM is lm-eval's own model interface (TemplateLM) over a loaded llama31.Llama. It scores as
lm-eval's HF model (`--model hf`) does for the same tokenizer: the same BOS rule, special-token
text read as special tokens, the same rolling windows, left truncation and stop strings; only the
positions of a continuation go through the output layer. lm-eval 0.4.13 finds a model outside its
own package only once the module defining it is imported, so `lm_eval --model llama31` needs this
file run as the CLI (the second line above). Under torchrun each process holds the whole model,
lm-eval gives each its share of the documents and gathers the scores on rank 0.
"""

import copy
import json
import sys
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

import jinja2
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.loggers import EvaluationTracker
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from tqdm import tqdm

import formats
import runs
from errors import ConfigError

# lm-eval's own defaults: HFLM's max_gen_toks, simple_evaluate's torch seed
MAX_GEN_TOKS = 256
SEED = 1234


class HarnessLM(TemplateLM):
    """lm-eval's model interface over a llama31.Llama (or, for lm-eval's CLI, the checkpoint
    ckpt_dir names, loaded as eval.py loads it). max_length: the context lm-eval scores in (rolling
    windows, left truncation); by default what HF reads for the same weights (export.py's
    max_position_embeddings: 131072 for Llama 3.1 and 3.2, 8192 otherwise), at most the model's
    max_seq_len. add_bos_token: None as the tokenizer does, like HFLM's. seed: sampled generation."""

    def __init__(self, llama=None, ckpt_dir=None, batch_size=1, max_length: Optional[int] = None,
                 device=None, dtype=None, quantize: Optional[str] = None, group_size: int = 32,
                 tokenizer_path=None, add_bos_token: Optional[bool] = None, seed: int = SEED,
                 max_batch_size=None, chat_template: Optional[str] = None):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size auto is not supported here; give a number, e.g. --batch_size 8")
        self.batch_size = int(batch_size)
        runs.check_number("batch_size", self.batch_size, int, 1)
        if max_length is not None:
            runs.check_number("max_length", max_length, int, 2)
        if llama is None:
            if ckpt_dir is None:
                raise ConfigError("no model: pass --model_args ckpt_dir=DIR (a Meta or HF directory or a .gguf file)")
            # imported here, not at the top: finetune --eval_tasks imports this module from
            # llama31.py's own run (as __main__), and a second llama31 module would load
            from llama31 import Llama

            device = runs.start(device)[0]  # under torchrun: a whole model a process, rank 0 prints
            llama = Llama.build(ckpt_dir, tokenizer_path, max_length or formats.HF_MAX_POSITION_EMBEDDINGS,
                                self.batch_size, device, dtype, quantize=quantize, group_size=group_size)
        args = llama.model.args
        self.llama, self.tok, self.ckpt_dir = llama, llama.tokenizer, ckpt_dir
        self.max_length = min(max_length or formats.hf_max_positions(args.to_params()), args.max_seq_len)
        self.add_bos = llama.tokenizer.add_bos if add_bos_token is None else bool(add_bos_token)
        self.special = frozenset(self.tok.special_tokens.values())
        self.bos_text = self.tok.decode([self.tok.bos_id])
        where, kind = located(ckpt_dir)
        self.template = chat_template or checkpoint_template(where, kind) or format_template(llama.chat_format)
        # generation ends where HF's would for these files: a copy of llama whose tokenizer stops there
        self.sampler = copy.copy(llama)
        self.sampler.tokenizer = copy.copy(llama.tokenizer)
        self.sampler.tokenizer.stop_tokens = checkpoint_stops(where, kind, llama.tokenizer)
        self.seed = seed
        self._device = llama.model.norm.weight.device
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # -- tokens, as HFLM has them for the same tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context is, and what rolling windows start from
        return self.tok.bos_id

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return str(self.ckpt_dir or "llama31").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None, **kwargs):
        """HF's tokenizer(string): BOS as the tokenizer adds it unless told, or the text begins with
        BOS's own text; text that spells a special token is that token."""
        bos = self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos
        if add_special_tokens is None and string.startswith(self.bos_text):
            bos = False
        ids = self.tok.encode(string, bos=bos, eos=False, allowed_special="all")
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids) -> str:
        """HF's decode(ids, skip_special_tokens=True)."""
        return self.tok.decode([i for i in ids if i not in self.special])

    # -- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """(log p(continuation | context), whether greedy decoding gives it) for each request
        ((strings), context ids, continuation ids), as HFLM computes them: longest first, inputs cut
        to the last max_length tokens, right-padded batches, one forward each; requests with the
        same input (one-token answers to one question) share a row."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood requests")
        for chunk in collator.get_batched(n=override_bs or self.batch_size):
            for _, _, cont in chunk:
                if not 0 < len(cont) <= self.max_length:
                    raise ConfigError(f"a continuation of {len(cont)} tokens; it must have 1 to max_length "
                                      f"({self.max_length}); raise max_length")
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            scored = self.continuation_logprobs(inputs, [len(cont) for _, _, cont in chunk])
            for (strings, ctx, cont), logprobs in zip(chunk, scored):
                greedy = logprobs.argmax(dim=-1)
                for strings, cont, logprobs in collator.get_cache(req_str=strings, cxt_toks=ctx, cont_toks=cont,
                                                                  logits=logprobs[None]):
                    want = torch.tensor(cont, device=logprobs.device)
                    answer = (float(logprobs[0, -len(cont):].gather(-1, want[:, None]).sum()),
                              bool((greedy[-len(cont):] == want).all()))
                    results.append(answer)
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                    bar.update(1)
        bar.close()
        return collator.get_original(results)

    @torch.inference_mode()
    def continuation_logprobs(self, inputs: List[List[int]], lengths: List[int]) -> List[torch.Tensor]:
        """Log-probabilities (n, vocab) in fp32 at the last n positions of each input (n from
        lengths): the rows right-padded into one batch, causal attention keeping padding out."""
        model = self.llama.model
        tokens = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
        for row, ids in zip(tokens, inputs):
            row[:len(ids)] = torch.tensor(ids)
        hidden = model.trunk(tokens.to(self.device))
        picked = torch.cat([h[len(ids) - n:len(ids)] for h, ids, n in zip(hidden, inputs, lengths)])
        return F.log_softmax(model.output(picked).float(), dim=-1).split(lengths)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each text's whole log-likelihood, in HFLM's windows of max_length tokens: the first
        after the prefix token, each later one with as much of the text before it as fits."""
        windows, counts = [], []
        for (text,) in [r.args for r in requests]:
            pairs = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            own = [(None, *make_disjoint_window(p)) for p in pairs]
            windows += own
            counts.append(len(own))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm or self.rank != 0))
        totals = [sum(next(scores)[0] for _ in range(n)) for n in counts]
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # -- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Each context continued up to max_gen_toks tokens, a stop token or the first stop string
        (cut off, as HFLM does), in batches of like settings, longest first; greedy unless the task
        asks to sample (temperature, top_p)."""
        collator = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        results, unused = [], set()
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until requests")
        generator = torch.Generator(self.device).manual_seed(self.seed)
        batch = min(self.batch_size, self.llama.model.args.max_batch_size)
        for chunk in collator.get_batched(n=batch):
            contexts, settings = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(settings[0], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.decode([self.eot_token_id]))
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_gen} leaves no room in max_length {self.max_length} for the "
                                  f"context; raise max_length")
            # HFLM encodes a batch as one: BOS (as the tokenizer adds it) for all or none, as the first
            # context decides
            bos = not contexts[0].startswith(self.bos_text)
            prompts = [self.tok_encode(c, bos, left_truncate_len=self.max_length - max_gen) for c in contexts]
            ignored = set(kwargs) - {"do_sample", "temperature", "top_p"} - unused
            if ignored:
                print(f"note: generation settings {', '.join(sorted(ignored))} are not used here", file=sys.stderr)
                unused |= ignored
            sample = kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0
            texts = self.generate(prompts, max_gen, until, kwargs.get("temperature", 0.0) if sample else 0.0,
                                  kwargs.get("top_p", 1.0) if sample else 1.0, generator)
            for context, setting, text in zip(contexts, settings, texts):
                text = postprocess_generated_text(text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, setting), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def generate(self, prompts, max_gen: int, until, temperature: float, top_p: float, generator) -> List[str]:
        """The texts Llama.generate_stream writes for prompts, special tokens left out, ended early
        once every row has stopped or holds a stop string."""
        outs, stopped = [[] for _ in prompts], [False] * len(prompts)
        steps = self.sampler.generate_stream(prompts, max_gen, temperature, top_p, generator, stops=True)
        for step in steps:
            for i, t in enumerate(step):
                if t is not None:
                    outs[i].append(t)
                    if not stopped[i]:
                        text = self.tok_decode(outs[i])
                        ended = t in self.sampler.tokenizer.stop_tokens or len(outs[i]) == max_gen
                        stopped[i] = ended or any(s and s in text for s in until)
            if all(stopped):
                steps.close()
                break
        return [self.tok_decode(out) for out in outs]

    # -- chat templates, as HF renders them

    def chat_template(self, chat_template=False) -> Optional[str]:
        return self.template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The dialog as text in the model's chat template (rendered as transformers renders it);
        as HFLM does, without its system messages when the template refuses them."""
        if self.template is None:
            raise ConfigError(f"{self.ckpt_dir or 'this model'} has no chat template; drop --apply_chat_template")
        special = {"bos_token": self.bos_text, "eos_token": self.tok.decode([self.tok.eos_id])}
        try:
            return render_chat(self.template, chat_history, add_generation_prompt, **special)
        except jinja2.exceptions.TemplateError:
            rest = [m for m in chat_history if m["role"] != "system"]
            return render_chat(self.template, rest, add_generation_prompt, **special)

    # -- processes: lm-eval splits the documents and gathers the scores through these

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.llama.model.parameters()),
                "model_dtype": runs.describe(self.llama.model), "ckpt_dir": str(self.ckpt_dir)}


# the name `lm_eval --model llama31` looks up, once this module is imported
model_registry.register("llama31", target="harness:HarnessLM")


# -----------------------------------------------------------------------------
# what HF's path reads from a checkpoint's files: its chat template and the tokens generation stops at


def located(path):
    """(file or directory, 'meta' | 'hf' | 'gguf') of a checkpoint path; (None, None) if none."""
    try:
        return formats.locate(path) if path is not None else (None, None)
    except ConfigError:
        return None, None


def checkpoint_template(where, kind) -> Optional[str]:
    """The Jinja chat template a checkpoint (located) carries: a GGUF's tokenizer.chat_template, an
    HF directory's chat_template.jinja or tokenizer_config.json's; None for others."""
    if kind == "gguf":
        return formats.gguf_fields(where).get("chat_template")
    if kind == "hf" and (where / "chat_template.jinja").is_file():
        return (where / "chat_template.jinja").read_text(encoding="utf-8")
    if kind == "hf" and (where / "tokenizer_config.json").is_file():
        template = formats.read_json(where / "tokenizer_config.json").get("chat_template")
        return template if isinstance(template, str) else None
    return None


def checkpoint_stops(where, kind, tokenizer) -> List[int]:
    """The tokens HF's generate stops at for a checkpoint (located): a GGUF's EOS, an HF
    directory's generation_config.json eos_token_id (else config.json's); for others every stop
    token of the tokenizer, as the generation_config.json export.py writes."""
    if kind == "gguf":
        return [tokenizer.eos_id]
    for name in ("generation_config.json", "config.json") if kind == "hf" else ():
        eos = formats.read_json(where / name).get("eos_token_id") if (where / name).is_file() else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return tokenizer.stop_tokens


def format_template(chat_format) -> Optional[str]:
    """A Jinja template writing what tokenizer.ChatFormat writes: Llama 3's headers (export.py's
    template), or ChatML with its default system message."""
    if chat_format is None:
        return None
    if chat_format.style == "llama3":
        return formats.LLAMA3_CHAT_TEMPLATE
    system = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + chat_format.default_system +
              "<|im_end|>\n{% endif %}") if chat_format.default_system else ""
    return (system + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for the message left open


def render_chat(template: str, messages: List[dict], add_generation_prompt: bool, **special) -> str:
    """transformers' apply_chat_template(tokenize=False, continue_final_message=not
    add_generation_prompt): its Jinja settings and helpers; without a generation prompt the last
    message is left open, cut where its text ends."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_template_error, strftime_now=lambda f: datetime.now().strftime(f))
    messages = copy.deepcopy(messages)
    if not add_generation_prompt:
        messages[-1]["content"] += CONTINUE_TAG
    text = env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)
    if not add_generation_prompt:
        at = text.rindex(CONTINUE_TAG.strip())
        text = text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()
    return text


def raise_template_error(message):
    raise jinja2.exceptions.TemplateError(message)


# -----------------------------------------------------------------------------
# running tasks: from Python (evaluate) and from eval.py (main)


def evaluate(llama, tasks, limit=None, num_fewshot: Optional[int] = None, batch_size: int = 1,
             include_path=None, apply_chat_template=False, log_samples: bool = False, ckpt_dir=None,
             manager: Optional[TaskManager] = None, **model_args) -> Optional[dict]:
    """lm-eval's simple_evaluate of a loaded model on tasks (a list, or names joined by commas):
    its results dict ("results" per task and metric, "samples" with log_samples; scores() flattens
    it); None on the processes other than rank 0 under torchrun. include_path: a folder of task
    YAMLs of your own; manager: a TaskManager of your own instead (include_defaults=False skips
    indexing lm-eval's own tasks). ckpt_dir: where llama came from (its chat template, the name
    of the results). model_args: HarnessLM's (max_length, add_bos_token, seed, chat_template)."""
    lm = HarnessLM(llama, ckpt_dir, batch_size, **model_args)
    return run(lm, tasks, limit, num_fewshot, include_path, apply_chat_template, log_samples, manager=manager)


def run(lm: HarnessLM, tasks, limit=None, num_fewshot=None, include_path=None, apply_chat_template=False,
        log_samples: bool = False, tracker: Optional[EvaluationTracker] = None,
        manager: Optional[TaskManager] = None) -> Optional[dict]:
    """simple_evaluate(lm, tasks) with lm-eval's task index (and include_path's tasks) or manager's."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
    if not names or not all(names):
        raise ConfigError(f"--tasks {tasks!r} names no task; give names joined by commas, e.g. hellaswag,arc_easy")
    manager = manager or task_manager(str(include_path) if include_path else None)
    unknown = [n for n in names if not (manager.match_tasks([n]) or Path(n).is_file())]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists them, and --include_path "
                          f"adds a folder of your own task YAMLs")
    return simple_evaluate(model=lm, model_args={"path": str(lm.ckpt_dir or "llama31")}, tasks=names,
                           num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=log_samples,
                           apply_chat_template=apply_chat_template, evaluation_tracker=tracker,
                           batch_size=lm.batch_size)


@lru_cache(maxsize=4)
def task_manager(include_path: Optional[str]) -> TaskManager:
    """lm-eval's index of its tasks (and include_path's), kept for the next call: it reads every
    task YAML lm-eval has, thousands of them."""
    return TaskManager(include_path=include_path)


def scores(results: dict) -> dict:
    """The numbers of a results dict as {"task/metric": value} ("arc_easy/acc_norm"), for a log
    line: filters other than lm-eval's default ("none") keep their name, standard errors go."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and kind:
                flat[f"{task}/{metric}" + ("" if kind == "none" else f",{kind}")] = value
    return flat


def main(tasks, ckpt_dir=None, num_fewshot: Optional[int] = None, limit: Optional[float] = None,
         batch_size: int = 1, include_path=None, output_path=None, log_samples: bool = False,
         apply_chat_template: bool = False, quantize: Optional[str] = None, group_size: int = 32,
         tokenizer_path=None, device=None, dtype=None, max_length: Optional[int] = None, seed: int = SEED):
    """lm-eval tasks on a checkpoint (eval.py --tasks): lm-eval's results table on stdout and, with
    --output_path, its results JSON (and per-sample JSONL with --log_samples) under
    output_path/<checkpoint name>/. Tasks download their data the first time; --include_path adds a
    folder of task YAMLs (e.g. a local JSON dataset, offline). --ckpt_dir and --quantize as for
    sampling; without --ckpt_dir, the demo model. --apply_chat_template writes each prompt in the
    model's chat template. Under torchrun, the documents are shared out and scored on rank 0."""
    if log_samples and not output_path:
        raise ConfigError("--log_samples writes files under --output_path; give --output_path DIR")
    if ckpt_dir is None:
        ckpt_dir, quantize = runs.demo_checkpoint(quantize)
    lm = HarnessLM(None, ckpt_dir, batch_size, max_length, device, dtype, quantize, group_size, tokenizer_path,
                   seed=seed)
    print(f"loaded {ckpt_dir} ({runs.describe(lm.llama.model)}), max_length {lm.max_length}", file=sys.stderr)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    results = run(lm, tasks, limit, num_fewshot, include_path, apply_chat_template, log_samples, tracker)
    if results is None:  # not rank 0
        return None
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if log_samples else []:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    print(f"{ckpt_dir}: limit {limit}, num_fewshot {num_fewshot}, batch_size {batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return results


if __name__ == "__main__":  # lm-eval's own CLI, with --model llama31 known
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    finally:
        runs.finish()
