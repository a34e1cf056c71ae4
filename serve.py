"""
An OpenAI-compatible server with continuous batching: python serve.py [--ckpt_dir X] [--port 8000]
[--max_batch_size 8] [--max_queue 64] [--max_seq_len 2048] [--api_key K] (no --ckpt_dir: the demo).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[...])

GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions in OpenAI's shapes
(stream: true as server-sent events), and vLLM's /tokenize, /detokenize and /tokenizer_info, which
lm-eval's local-completions model uses. One Engine thread owns the model: its KV cache has
max_batch_size rows (slots); each step prefills waiting requests into free slots, one at a time,
then decodes one token for every busy slot together, each row at its own position
(Transformer.forward_inference with a list of starts). The HTTP side (FastAPI + uvicorn) checks
each request, hands it to the engine as Jobs, and sends back what the engine reports.
"""

import asyncio
import codecs
import hmac
import itertools
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import anyio
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

import llama31
import runs
import variants
from errors import ConfigError
from tokenizer import llama3_system_prompt

# -----------------------------------------------------------------------------
# the engine: continuous batching over the KV cache's rows, in one thread


@dataclass(eq=False)
class Job:
    """One completion for the engine: a prompt and how to sample after it. emit(event) is called
    from the engine's thread with a Prompt (if prompt_logprobs), a Step per token, then a Done."""
    prompt: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()  # stop strings: the text ends before the first
    stop_tokens: frozenset = frozenset()  # the tokens that end it (empty: ignore_eos)
    logprobs: Optional[int] = None  # None: none; k: each token's and the top k
    prompt_logprobs: bool = False  # also the prompt's own tokens' (echo)
    index: int = 0  # which choice of its request
    emit: Callable = print
    cancelled: bool = False  # set by the HTTP side when the client is gone
    tokens: List[int] = ()  # the engine's state from here on: the prompt and the tokens taken
    generator: Optional[torch.Generator] = None
    text: Optional["TextStream"] = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def position(self) -> int:
        """How many positions the job's cache row holds: all its tokens but the last taken."""
        return len(self.tokens) - 1

    @property
    def last(self) -> int:
        """The token to feed next."""
        return self.tokens[-1]


@dataclass
class Prompt:
    index: int
    logprobs: list  # (logprob, top) per prompt token; None for the first


@dataclass
class Step:
    index: int
    token: int
    text: str  # what the token adds to the reply's text ("" while held back)
    logprob: Optional[tuple] = None  # (logprob, [(token, logprob), ...]: the top k)


@dataclass
class Done:
    index: int
    reason: str  # stop, length, cancelled, error
    text: str = ""  # the rest of the text, held back until now
    stop_token: Optional[int] = None  # the token that ended it, if one did
    error: Optional[str] = None


class TextStream:
    """A reply's text as its tokens come. A character split across tokens waits for the token that
    completes it (an incremental UTF-8 decoder: the pieces join to what Tokenizer.decode gives the
    whole); text that may still grow into a stop string is held back; the text ends before the
    first stop string."""

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str]):
        self.token_bytes = token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = list(stop)
        self.held = ""

    def add(self, token: int) -> tuple:
        """(text to send now, whether a stop string ended the reply)."""
        self.held += self.utf8.decode(self.token_bytes(token))
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            text = self.held[:min(found)]
            self.held = ""
            return text, True
        keep = max((k for s in self.stop for k in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:k])), default=0)
        cut = len(self.held) - keep
        text = self.held[:cut]
        self.held = self.held[cut:]
        return text, False

    def rest(self) -> str:
        text = self.held + self.utf8.decode(b"", final=True)
        self.held = ""
        return text


class QueueFull(Exception):
    pass


class Engine:
    """Owns the model in one thread. Jobs wait in a queue of at most max_queue; each step, waiting
    jobs are prefilled into free cache rows (slots), each alone, and sample their first token; then
    one decode step runs every busy slot together, each at its own position. A finished or
    cancelled job frees its slot at once."""

    def __init__(self, llama, max_batch_size: int, max_queue: int):
        self.model = llama.model
        self.tokenizer = llama.tokenizer
        self.max_seq_len = self.model.args.max_seq_len
        self.slots: List[Optional[Job]] = [None] * max_batch_size
        self.max_queue = max_queue
        self.waiting: deque = deque()
        self.wake = threading.Condition()
        self.closing = False
        self.finished = 0
        self.cancelled = 0
        self.model.setup_caches(max_batch_size, self.max_seq_len)
        self.speculator = llama.speculator  # a draft (--draft_*): a job decoding alone uses it
        if self.speculator is not None:
            self.speculator.draft.model.setup_caches(1, self.max_seq_len)
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()

    def submit(self, jobs: List[Job]):
        """Queue a request's jobs (its n choices) together, or raise QueueFull."""
        with self.wake:
            busy = sum(job is not None for job in self.slots)
            if busy + len(self.waiting) + len(jobs) > len(self.slots) + self.max_queue:
                raise QueueFull()
            self.waiting.extend(jobs)
            self.wake.notify()

    def status(self) -> dict:
        speculative = {} if self.speculator is None else {"speculative": dict(self.speculator.stats)}
        return {"slots": len(self.slots), "busy": sum(job is not None for job in self.slots),
                "waiting": len(self.waiting), "finished": self.finished,
                "cancelled": self.cancelled, **speculative}

    def close(self):
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join()
        self.model.clear_caches()
        if self.speculator is not None:
            self.speculator.draft.model.clear_caches()

    def run(self):
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.closing or self.waiting or any(self.slots))
                if self.closing:
                    break
            try:
                self.admit()
                if any(self.slots):
                    self.decode()
            except Exception as e:  # the engine goes on: the jobs of this step end with an error
                traceback.print_exc()
                for slot, job in enumerate(self.slots):
                    if job is not None:
                        self.finish(slot, job, "error", error=f"{type(e).__name__}: {e}")
        for slot, job in enumerate(self.slots):
            if job is not None:
                self.finish(slot, job, "error", error="the server is shutting down")
        while self.waiting:
            job = self.waiting.popleft()
            self.send(job, Done(job.index, "error", error="the server is shutting down"))

    def admit(self):
        """Prefill waiting jobs into free slots, each alone, and sample its first token."""
        while None in self.slots:
            with self.wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                self.cancelled += 1
                self.send(job, Done(job.index, "cancelled"))
                continue
            slot = self.slots.index(None)
            self.slots[slot] = job
            job.generator = torch.Generator(self.model.norm.weight.device).manual_seed(job.seed)
            job.text = TextStream(self.token_bytes, job.stop)
            job.tokens = list(job.prompt)
            prompt = torch.tensor([job.prompt], device=self.model.norm.weight.device)
            with self.model.cache_rows(slot, slot + 1):
                last = 0 if job.prompt_logprobs else 1  # every position's logits, or the last's
                logits = self.model.forward_inference(prompt, 0, last=last)
            if job.prompt_logprobs:
                self.send(job, Prompt(job.index, prompt_logprobs(logits[0], job.prompt,
                                                                 job.logprobs or 0)))
            if job.max_tokens == 0:
                self.finish(slot, job, "length")
            else:
                self.take(slot, job, logits[0, -1])

    def decode(self):
        """One step of every busy slot: rows 0..n-1 with n the highest busy slot + 1 (a free row
        in between computes a pad token at position 0, harmless: its slot is prefilled from 0)."""
        for slot, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                self.cancelled += 1
                self.finish(slot, job, "cancelled")
        busy = [slot for slot, job in enumerate(self.slots) if job is not None]
        if not busy:
            return
        if self.speculator is not None and len(busy) == 1 and not self.waiting:
            return self.speculate(busy[0])
        rows = self.slots[:busy[-1] + 1]
        tokens = [[job.last if job else self.tokenizer.pad_id] for job in rows]
        starts = [job.position if job else 0 for job in rows]
        tokens = torch.tensor(tokens, device=self.model.norm.weight.device)
        logits = self.model.forward_inference(tokens, starts)[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        for slot in busy:
            job = self.slots[slot]
            self.take(slot, job, logits[slot], greedy[slot] if job.temperature == 0 else None)

    def speculate(self, slot: int):
        """A decode step for a job alone in the engine, proposed by the draft: up to k tokens
        drafted, scored in one pass of the job's cache row, the kept ones (the accepted and one
        of the model's: variants/speculative.py's rule) taken as one decode step each takes its
        token. The draft's cache catches up on what it has not seen (other jobs ran meanwhile)."""
        job = self.slots[slot]
        spec = self.speculator
        k = max(0, min(spec.k, job.max_tokens - job.generated - 1,
                       self.max_seq_len - job.position - 1))
        with self.model.cache_rows(slot, slot + 1):
            kept, logits = spec.round(self.model, job.tokens, job.position, k, job.temperature,
                                      job.top_p, job.generator)
        for i, token in enumerate(kept):
            self.take(slot, job, logits[i], token)
            if self.slots[slot] is not job:  # it ended (a stop, its length)
                break

    def take(self, slot: int, job: Job, logits, token: Optional[int] = None):
        """The job's next token (token, or else one sampled from its logits (vocab,)): send it,
        finish if it ends. logits: the model's after the job's tokens so far (logprobs)."""
        if token is None:
            token = llama31.next_tokens(logits[None], job.temperature, job.top_p,
                                        job.generator).item()
        logprob = None
        if job.logprobs is not None:
            logprob = token_logprobs(logits.log_softmax(dim=-1), token, job.logprobs)
        if token in job.stop_tokens:
            return self.finish(slot, job, "stop", stop_token=token)
        job.tokens.append(token)
        text, stopped = job.text.add(token)
        self.send(job, Step(job.index, token, text, logprob))
        if stopped:
            self.finish(slot, job, "stop")
        elif job.generated >= job.max_tokens or job.position >= self.max_seq_len:
            self.finish(slot, job, "length")

    def finish(self, slot: int, job: Job, reason: str, stop_token=None, error=None):
        self.slots[slot] = None
        self.finished += reason != "cancelled"
        rest = job.text.rest() if job.text is not None and reason in ("stop", "length") else ""
        self.send(job, Done(job.index, reason, rest, stop_token, error))

    def token_bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.model.decode_single_token_bytes(token)
        except KeyError:  # an id past the tokenizer's (a padded vocabulary)
            return b""

    @staticmethod
    def send(job: Job, event):
        try:
            job.emit(event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


def token_logprobs(logprobs, token: int, k: int) -> tuple:
    """(token's log-prob, the top k as [(token, log-prob)]) of one position's log-probs."""
    top = logprobs.topk(k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
    return logprobs[token].item(), pairs


def prompt_logprobs(logits, prompt: List[int], k: int) -> list:
    """Each prompt token's log-prob given the tokens before it (None for the first), in chunks of
    positions so a long prompt never holds all its log-softmaxes at once."""
    out = [None]
    for lo in range(0, len(prompt) - 1, 256):
        hi = min(lo + 256, len(prompt) - 1)
        logprobs = logits[lo:hi].log_softmax(dim=-1)
        targets = torch.tensor(prompt[lo + 1:hi + 1], device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
        top = [[]] * (hi - lo)
        if k:  # one topk and one copy to Python a chunk, not a position
            best = logprobs.topk(k)
            top = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
        out += list(zip(chosen, top))
    return out


# -----------------------------------------------------------------------------
# requests: OpenAI's shapes, each field checked with an error that says what to fix


class ApiError(Exception):
    """Answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.status = status

    def response(self) -> JSONResponse:
        retry = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body, status_code=self.status, headers=retry)


def number(body: dict, name: str, default, lo, hi, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
            not math.isfinite(value):
        raise ApiError(f"{name} must be {'an integer' if integer else 'a number'} from {lo} to "
                       f"{hi}, got {json.dumps(value)[:60]}", name)
    if not lo <= value <= hi:
        raise ApiError(f"{name} is {value}; it must be from {lo} to {hi}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(f"{name} must be true or false, got {json.dumps(value)[:60]}", name)
    return default if value is None else value


def check_fields(body: dict, known: set):
    """Unknown fields, and OpenAI's fields this server takes only at their defaults, refused."""
    for name in body:
        if name not in known:
            raise ApiError(f"unknown field {name!r}; this server takes {', '.join(sorted(known))}",
                           name, code="unknown_field")
    for name, default in [("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", {}),
                          ("best_of", 1), ("suffix", ""), ("response_format", {"type": "text"})]:
        value = body.get(name)
        if value is not None and (value != default or isinstance(value, bool)):
            raise ApiError(f"{name} is not supported; leave it out (or {json.dumps(default)})",
                           name)


SAMPLING = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
            "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
            "user", "ignore_eos"}  # ignore_eos: vLLM's and llama.cpp's, for benchmarks
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "parallel_tool_calls", "response_format", "metadata",
                          "store", "service_tier"}
COMPLETION_FIELDS = SAMPLING | {"prompt", "echo", "best_of", "suffix"}


# what a request leaves out samples as Llama.generate does by default (Meta's defaults), not at
# OpenAI's temperature 1, at which small models ramble
TEMPERATURE = 0.6
TOP_P = 0.9


@dataclass
class Sampling:
    """What a request asks of each of its choices."""
    n: int
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    ignore_eos: bool
    stream: bool
    usage_chunk: bool  # stream_options.include_usage


def sampling(body: dict, server: "Server", max_tokens: Optional[int], least: int) -> Sampling:
    model = body.get("model")
    if model is not None and model != server.name:
        raise ApiError(f"the model {model!r} does not exist; this server serves {server.name!r}",
                       "model", 404, "model_not_found")
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or
                                set(options) - {"include_usage"}):
        raise ApiError('stream_options is {"include_usage": bool}, with stream: true',
                       "stream_options")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or \
            not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a string or a list of at most 4 non-empty strings", "stop")
    return Sampling(number(body, "n", 1, 1, len(server.engine.slots), integer=True),
                    number(body, "max_tokens", max_tokens, least, 2**31, integer=True),
                    number(body, "temperature", TEMPERATURE, 0, 2),
                    number(body, "top_p", TOP_P, 0, 1),
                    number(body, "seed", None, -2**63, 2**64 - 1, integer=True), stop,
                    boolean(body, "ignore_eos"), stream, boolean(options or {}, "include_usage"))


def fit(prompt: List[int], max_tokens: Optional[int], max_seq_len: int, param: str) -> int:
    """max_tokens, checked against the context (None: all the room left)."""
    if not prompt:
        raise ApiError("the prompt is empty; give it at least one token", param)
    room = max_seq_len - len(prompt)
    if room < 0 or room == 0 and max_tokens != 0:
        raise ApiError(f"the prompt has {len(prompt)} tokens and the context is {max_seq_len} "
                       f"(--max_seq_len), leaving no room for a reply; shorten it", param,
                       code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(f"max_tokens is {max_tokens}, but the prompt's {len(prompt)} tokens leave "
                       f"{room} of the context's {max_seq_len}; ask for at most {room}",
                       "max_tokens", code="context_length_exceeded")
    return room if max_tokens is None else max_tokens


# -----------------------------------------------------------------------------
# chat: OpenAI's messages as ChatFormat's; tools as Llama 3.1's template writes custom tools

# Meta's and HF's Llama 3.1 template: custom tools go at the start of the first user message
TOOLS_INTRO = ("Given the following functions, please respond with a JSON for a function call with "
               "its proper arguments that best answers the given prompt.\n\nRespond in the format "
               '{"name": function name, "parameters": dictionary of argument name and its value}.'
               "Do not use variables.\n\n")


def text_of(content, where: str, none: bool = False) -> Optional[str]:
    """A message's content: a string, or text parts joined."""
    if isinstance(content, str) or content is None and none:
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(f'{where} must be a string or a list of {{"type": "text", "text": "..."}} '
                   f"parts (this model reads text only)", where)


def calls_of(message: dict, where: str) -> List[dict]:
    """An assistant message's OpenAI tool_calls as ChatFormat's {tool_name, arguments, call_id}."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ApiError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        arguments = None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            try:
                arguments = json.loads(fn.get("arguments") or "{}")
            except (TypeError, ValueError):
                pass
        if not isinstance(arguments, dict):
            raise ApiError(f'{where}.tool_calls[{i}] must be {{"id", "type": "function", '
                           f'"function": {{"name", "arguments": a JSON object as a string}}}}',
                           f"{where}.tool_calls[{i}]")
        out.append({"tool_name": fn["name"], "arguments": arguments,
                    "call_id": str(call.get("id", ""))})
    return out


MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}


def dialog_of(messages) -> List[dict]:
    """OpenAI's messages (a tool's answer: role "tool" with tool_call_id) as ChatFormat's."""
    if not isinstance(messages, list) or not messages:
        raise ApiError('messages must be a non-empty list of {"role", "content"}', "messages")
    dialog = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(f"{where}.role must be system, developer, user, assistant or tool",
                           f"{where}.role")
        if set(m) - MESSAGE_FIELDS:
            raise ApiError(f"{where} has unknown field {sorted(set(m) - MESSAGE_FIELDS)[0]!r}",
                           where)
        content = text_of(m.get("content"), f"{where}.content", none=role == "assistant")
        if role == "assistant":
            dialog.append({"role": role, "content": content, "tool_calls": calls_of(m, where)})
        elif role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise ApiError(f"{where}.tool_call_id must be the id of the call it answers",
                           f"{where}.tool_call_id")
        else:
            dialog.append({"role": "system" if role == "developer" else role, "content": content})
    return dialog


def tools_of(body: dict) -> tuple:
    """(the tools, what tool_choice makes of them: None, no tools in the prompt; "", the model may
    call; else the start of a call that the reply is made to begin with)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError("tool_choice needs tools", "tool_choice")
        return [], None
    names = [function_name(t) for t in tools] if isinstance(tools, list) else []
    if not names or not all(names):
        raise ApiError('tools must be a non-empty list of {"type": "function", "function": '
                       '{"name", "description", "parameters": a JSON schema}}', "tools")
    if choice in (None, "auto", "none", "required"):
        return tools, {"none": None, "required": '{"name": "'}.get(choice, "")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        isinstance(choice.get("function"), dict) else None
    if name not in names:
        raise ApiError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                       '"function": {"name": one of the tools}}', "tool_choice")
    return tools, f'{{"name": "{name}", "parameters": '


def function_name(tool) -> Optional[str]:
    """The name of an OpenAI tool, if it is one: {"type": "function", "function": {...}}."""
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str) and \
            isinstance(fn.get("parameters", {}), dict):
        return fn["name"]
    return None


def with_tools(dialog: List[dict], tools: list) -> List[dict]:
    """The dialog with custom tools as Llama 3.1's template writes them (HF's default): a system
    message with "Environment: ipython", the definitions at the start of the first user message."""
    system = [m for m in dialog[:1] if m["role"] == "system"]
    rest = dialog[len(system):]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        raise ApiError("tools go into the first user message, and there is none", "messages")
    names = [t["function"]["name"] for t in tools]
    prompt = llama3_system_prompt(system[0]["content"] if system else None, names)
    definitions = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    user = dict(rest[first], content=TOOLS_INTRO + definitions + rest[first]["content"].strip())
    return [{"role": "system", "content": prompt}] + rest[:first] + [user] + rest[first + 1:]


def completion_prompts(prompt, tokenizer, vocab_size: int) -> List[tuple]:
    """(text, token ids) of each prompt: a string, token ids, or a list of either. Text is
    tokenized as HF's tokenizers do by default: BOS if the model wants one, special-token text
    read as the special token."""
    many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    out = []
    for i, p in enumerate(prompt if many else [prompt]):
        if isinstance(p, str):
            out.append((p, tokenizer.encode(p, bos=tokenizer.add_bos, eos=False,
                                            allowed_special="all")))
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab_size for t in p):
            out.append((tokenizer.decode(p), p))
        else:
            raise ApiError(f"prompt{f'[{i}]' if many else ''} must be a non-empty string or a "
                           f"list of token ids from 0 to {vocab_size - 1}", "prompt")
    return out


# -----------------------------------------------------------------------------
# replies: the engine's events gathered per choice, in OpenAI's shapes, whole or streamed


class Choice:
    """One choice's reply as the engine's events arrive."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.tokens: List[int] = []
        self.logprobs: List[tuple] = []  # (token, logprob, top) of each token
        self.prompt_logprobs: Optional[list] = None
        self.done: Optional[Done] = None

    def add(self, event) -> str:
        """Take an event; return the text it adds."""
        if isinstance(event, Prompt):
            self.prompt_logprobs = event.logprobs
        elif isinstance(event, Step):
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, *event.logprob))
        else:
            self.done = event
        text = getattr(event, "text", "")
        self.text += text
        return text

    @property
    def reason(self) -> str:
        return self.done.reason


async def events(queue: asyncio.Queue, n: int):
    """The engine's events for n jobs, until each is Done; an ApiError if one failed."""
    while n:
        event = await queue.get()
        if isinstance(event, Done):
            n -= 1
            if event.reason == "error":
                raise ApiError(f"the engine failed: {event.error}", status=500, kind="server_error")
        yield event


class Reply:
    """A request's reply in OpenAI's shapes: gathered whole (response), or as server-sent events
    (stream: the subclass's chunks, the usage if asked, [DONE])."""
    kind = ""  # the object's name
    prefix = ""  # the id's start

    def __init__(self, server: "Server", s: Sampling, count: int, prompt_tokens: int):
        self.server = server
        self.s = s
        self.choices = [Choice(i) for i in range(count)]
        self.prompt_tokens = prompt_tokens
        self.id = f"{self.prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def frame(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.server.name, "system_fingerprint": FINGERPRINT, "choices": choices,
                **extra}

    def usage(self) -> dict:
        made = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": made,
                "total_tokens": self.prompt_tokens + made}

    async def gather(self, events):
        async for event in events:
            self.choices[event.index].add(event)

    def response(self) -> dict:
        return self.frame([self.whole(c) for c in self.choices], usage=self.usage())

    async def stream(self, events):
        try:
            async for chunk in self.chunks(events):
                yield sse(self.frame([chunk]))
        except ApiError as e:
            yield sse(e.body)
        else:
            if self.s.usage_chunk:
                yield sse(self.frame([], usage=self.usage()))
        yield "data: [DONE]\n\n"


FINGERPRINT = "fp_llama31"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ChatReply(Reply):
    """A chat completion. With tools on, a reply that begins like a call ({, [ or <|python_tag|>,
    or forced by tool_choice) is held back and read at its end as ChatFormat reads replies: its
    calls become tool_calls, finish_reason "tool_calls" (streamed: delta.tool_calls fragments)."""
    kind = "chat.completion"
    prefix = "chatcmpl"

    def __init__(self, server, s, prompt_tokens: int, forced: Optional[str], forced_tokens: int):
        super().__init__(server, s, s.n, prompt_tokens)
        self.forced = forced
        self.forced_tokens = forced_tokens

    def usage(self) -> dict:  # the forced start counts as the reply's
        out = super().usage()
        out["completion_tokens"] += self.forced_tokens * self.s.n
        out["total_tokens"] += self.forced_tokens * self.s.n
        return out

    def message(self, c: Choice) -> tuple:
        """(message, finish_reason) of a finished choice."""
        text = (self.forced or "") + c.text
        if self.forced is not None:
            tok = self.server.tokenizer
            chat_format = self.server.llama.chat_format
            ids = tok.encode(text, bos=False, eos=False, allowed_special="all")
            ids += [c.done.stop_token] if c.done.stop_token is not None else []
            calls = chat_format.decode_assistant(tok, ids)["tool_calls"]
            if calls:
                return {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call["call_id"], "type": "function", "function": {
                        "name": call["tool_name"],
                        "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                    for call in calls]}, "tool_calls"
        return {"role": "assistant", "content": text}, c.reason

    def whole(self, c: Choice) -> dict:
        message, reason = self.message(c)
        logprobs = self.server.chat_logprobs(c.logprobs) if c.logprobs else None
        return {"index": c.index, "message": message, "logprobs": logprobs,
                "finish_reason": reason}

    @staticmethod
    def delta(c: Choice, delta: dict, reason=None, logprobs=None) -> dict:
        return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    async def chunks(self, events):
        """The role first, the content as it comes (or held back: a call, perhaps), the finish
        reason last with no content."""
        held = [self.forced is not None] * self.s.n  # False once the reply is plain text
        sent = [0] * self.s.n
        for c in self.choices:
            yield self.delta(c, {"role": "assistant"})
        async for event in events:
            c = self.choices[event.index]
            c.add(event)
            if held[c.index] and not isinstance(event, Done):
                if self.forced:
                    continue  # a call, forced: read at the end
                text = c.text.lstrip()  # forced is "" here: the model may call
                if not text or text[0] in "{[" or text.startswith("<|python_tag|>"):
                    continue  # a call, perhaps: read at the end
                held[c.index] = False
            logprobs = None
            if isinstance(event, Step) and event.logprob is not None:
                logprobs = self.server.chat_logprobs(c.logprobs[-1:])
            if not held[c.index] and (len(c.text) > sent[c.index] or logprobs):
                yield self.delta(c, {"content": c.text[sent[c.index]:]}, logprobs=logprobs)
                sent[c.index] = len(c.text)
            if isinstance(event, Done):
                message, reason = self.message(c)
                if held[c.index] and message["content"] is None:
                    for chunk in self.call_chunks(c, message["tool_calls"]):
                        yield chunk
                elif held[c.index] and message["content"]:
                    yield self.delta(c, {"content": message["content"]})
                yield self.delta(c, {}, reason)

    def call_chunks(self, c: Choice, calls: List[dict]):
        """Each call as OpenAI streams one: its id, type and name, then its arguments in pieces."""
        for i, call in enumerate(calls):
            fn = call["function"]
            yield self.delta(c, {"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                 "function": {"name": fn["name"],
                                                              "arguments": ""}}]})
            for at in range(0, len(fn["arguments"]), 16):
                piece = fn["arguments"][at:at + 16]
                yield self.delta(c, {"tool_calls": [{"index": i,
                                                     "function": {"arguments": piece}}]})


class TextReply(Reply):
    """A text completion: choice i * n + j is prompt i's j-th. With echo, the prompt's text first
    (with logprobs: its tokens' log-probs, the first null), as lm-eval's local-completions reads."""
    kind = "text_completion"
    prefix = "cmpl"

    def __init__(self, server, s, prompts: List[tuple], echo: bool, logprobs: bool):
        super().__init__(server, s, len(prompts) * s.n, sum(len(ids) for _, ids in prompts))
        self.prompts = prompts
        self.echo = echo
        self.logprobs = logprobs

    def whole(self, c: Choice) -> dict:
        text, ids = self.prompts[c.index // self.s.n]
        logprobs = None
        if self.logprobs:
            entries = self.prompt_entries(c, ids) if self.echo else []
            logprobs = self.server.text_logprobs(entries + c.logprobs)
        return {"index": c.index, "text": (text if self.echo else "") + c.text,
                "logprobs": logprobs, "finish_reason": c.reason}

    @staticmethod
    def prompt_entries(c: Choice, ids: List[int]) -> list:
        return [(t, *lp) if lp else (t, None, None) for t, lp in zip(ids, c.prompt_logprobs)]

    @staticmethod
    def piece(c: Choice, text: str, reason=None, logprobs=None) -> dict:
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    async def chunks(self, events):
        if self.echo and not self.logprobs:  # with logprobs, the prompt comes with its own
            for c in self.choices:
                yield self.piece(c, self.prompts[c.index // self.s.n][0])
        async for event in events:
            c = self.choices[event.index]
            text = c.add(event)
            if isinstance(event, Prompt):
                prompt, ids = self.prompts[c.index // self.s.n]
                logprobs = self.server.text_logprobs(self.prompt_entries(c, ids))
                yield self.piece(c, prompt, logprobs=logprobs)
                continue
            logprobs = None
            if isinstance(event, Step) and self.logprobs:
                logprobs = self.server.text_logprobs(c.logprobs[-1:])
            if text or logprobs:
                yield self.piece(c, text, logprobs=logprobs)
            if isinstance(event, Done):
                yield self.piece(c, "", c.reason)


# -----------------------------------------------------------------------------
# the server: the routes over an engine


class Server:
    """What the routes share: the model (llama31.Llama), its engine, the name it is served as."""

    def __init__(self, llama, engine: Engine, name: str, api_key: Optional[str] = None,
                 max_body: int = 8 << 20):
        self.llama = llama
        self.engine = engine
        self.tokenizer = llama.tokenizer
        self.name = name
        self.api_key = api_key
        self.max_body = max_body
        self.created = int(time.time())

    def jobs(self, prompt: List[int], s: Sampling, max_tokens: int, logprobs: Optional[int],
             prompt_logprobs: bool = False, first: int = 0) -> List[Job]:
        """A prompt's n jobs (choices first..first + n - 1); choice i samples with seed + i."""
        seed = secrets.randbits(63) if s.seed is None else s.seed
        stop_tokens = frozenset() if s.ignore_eos else frozenset(self.tokenizer.stop_tokens)
        return [Job(prompt, max_tokens, s.temperature, s.top_p, (seed + i) % 2**64, s.stop,
                    stop_tokens, logprobs, prompt_logprobs, first + i) for i in range(s.n)]

    async def answer(self, request: Request, reply: Reply, jobs: List[Job]):
        """Run the jobs; the reply whole, or streamed. A client gone cancels them (their slots are
        freed at the engine's next step)."""
        most = len(self.engine.slots) + self.engine.max_queue
        if len(jobs) > most:
            raise ApiError(f"this request asks for {len(jobs)} completions (prompts x n); the "
                           f"server holds at most {most} at once", "n")
        queue: asyncio.Queue = asyncio.Queue()
        put = partial(asyncio.get_running_loop().call_soon_threadsafe, queue.put_nowait)
        for job in jobs:
            job.emit = put
        try:
            self.engine.submit(jobs)
        except QueueFull:
            raise ApiError(f"all {len(self.engine.slots)} slots are busy and "
                           f"{self.engine.max_queue} requests wait already; retry shortly",
                           status=429, code="queue_full", kind="rate_limit_error") from None

        def cancel():
            for job in jobs:
                job.cancelled = True
        if reply.s.stream:
            return EventStream(reply.stream(events(queue, len(jobs))), cancel)
        try:
            await unless_gone(request, reply.gather(events(queue, len(jobs))))
        finally:
            cancel()
        return JSONResponse(reply.response())

    def token_text(self, token: int) -> str:
        # as Tokenizer.decode([token]) reads it; "" for an id past the tokenizer's (token_bytes)
        return self.engine.token_bytes(token).decode("utf-8", errors="replace")

    def chat_logprobs(self, entries) -> dict:
        def one(token, logprob):
            return {"token": self.token_text(token), "logprob": logprob,
                    "bytes": list(self.engine.token_bytes(token))}
        return {"content": [dict(one(t, lp), top_logprobs=[one(*p) for p in top])
                            for t, lp, top in entries]}

    def text_logprobs(self, entries) -> dict:
        """The completions API's shape: tokens, token_logprobs, top_logprobs, text_offset."""
        texts = [self.token_text(t) for t, _, _ in entries]
        offsets = list(itertools.accumulate(map(len, texts), initial=0))[:len(texts)]
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {self.token_text(t): v for t, v in top}
                                 for _, _, top in entries], "text_offset": offsets}


class EventStream(StreamingResponse):
    """Server-sent events that also listen for the client going away (as starlette does for ASGI
    before 2.4): on_close runs when the stream ends, however it ends."""

    def __init__(self, content, on_close: Callable):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as group:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


async def unless_gone(request: Request, work):
    """Await work, unless the client disconnects first (a reply not streamed)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ApiError("the client closed the request", status=499, code="client_closed")
    return task.result()


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past limit bytes, 400 with the parser's words otherwise."""
    too_big = ApiError(f"the body is over {limit >> 20} MB", status=413, code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
        json.dumps(data, ensure_ascii=False).encode()  # a lone surrogate (\ud800) is no text
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise ApiError("the body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(f"the body is not valid JSON: {e.msg} at line {e.lineno} column "
                       f"{e.colno}") from None
    except RecursionError:
        raise ApiError("the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(f"the body must be a JSON object, got {type(data).__name__}")
    return data


async def chat_completions(server: Server, request: Request):
    body = await read_json(request, server.max_body)
    check_fields(body, CHAT_FIELDS)
    chat_format = server.llama.chat_format
    if chat_format is None:
        raise ApiError(f"{server.name} has no chat format (Llama 3 headers or ChatML); use "
                       f"/v1/completions", code="no_chat_format")
    if "max_completion_tokens" in body:
        body = dict(body, max_tokens=body["max_completion_tokens"])
    s = sampling(body, server, None, 1)
    logprobs = boolean(body, "logprobs")
    top = number(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not logprobs:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    dialog = dialog_of(body.get("messages"))
    tools, forced = tools_of(body)
    if forced is not None and chat_format.style != "llama3":
        raise ApiError(f"{server.name} chats in the {chat_format.style} format, which has no "
                       f"tool calls; leave tools out (or tool_choice: none)", "tools",
                       code="no_tool_calls")
    try:
        prompt = chat_format.encode_dialog(server.tokenizer, with_tools(dialog, tools)
                                           if forced is not None else dialog)
    except ConfigError as e:
        raise ApiError(str(e), "messages") from None
    start = server.tokenizer.encode(forced or "", bos=False, eos=False)  # counted as the reply's
    max_tokens = fit(prompt + start, s.max_tokens, server.engine.max_seq_len, "messages")
    jobs = server.jobs(prompt + start, s, max_tokens, top if logprobs else None)
    return await server.answer(request, ChatReply(server, s, len(prompt), forced, len(start)),
                               jobs)


async def completions(server: Server, request: Request):
    body = await read_json(request, server.max_body)
    check_fields(body, COMPLETION_FIELDS)
    s = sampling(body, server, 16, 0)
    logprobs = number(body, "logprobs", None, 0, 20, integer=True)
    echo = boolean(body, "echo")
    prompts = completion_prompts(body.get("prompt"), server.tokenizer,
                                 server.llama.model.args.vocab_size)
    jobs = []
    for i, (_, ids) in enumerate(prompts):
        max_tokens = fit(ids, s.max_tokens, server.engine.max_seq_len, "prompt")
        jobs += server.jobs(ids, s, max_tokens, logprobs, echo and logprobs is not None, i * s.n)
    reply = TextReply(server, s, prompts, echo, logprobs is not None)
    return await server.answer(request, reply, jobs)


async def tokenize(server: Server, request: Request):
    """vLLM's /tokenize (lm-eval's remote tokenizer): text as /v1/completions tokenizes it."""
    body = await read_json(request, server.max_body)
    check_fields(body, {"model", "prompt", "add_special_tokens"})
    if not isinstance(body.get("prompt"), str):
        raise ApiError("prompt must be a string", "prompt")
    bos = boolean(body, "add_special_tokens", True) and server.tokenizer.add_bos
    ids = server.tokenizer.encode(body["prompt"], bos=bos, eos=False, allowed_special="all")
    return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_seq_len}


async def detokenize(server: Server, request: Request):
    body = await read_json(request, server.max_body)
    check_fields(body, {"model", "tokens"})
    (_, ids), = completion_prompts([body.get("tokens")], server.tokenizer,
                                   server.llama.model.args.vocab_size)
    return {"prompt": server.tokenizer.decode(ids)}


def tokenizer_info(server: Server) -> dict:
    tok = server.tokenizer
    names = {i: name for name, i in tok.special_tokens.items()}
    return {"eos_token": names.get(tok.eos_id), "bos_token": names.get(tok.bos_id),
            "pad_token": names.get(tok.pad_id), "add_bos_token": tok.add_bos,
            "model_max_length": server.engine.max_seq_len}


def make_app(server: Server) -> FastAPI:
    """The routes. Every error is OpenAI's error object: a 4xx for the client's faults (which the
    openai client does not retry, 429 aside), a 500 with no traceback for the server's."""
    async def authorized(request: Request):
        if server.api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {server.api_key}".encode()):
            raise ApiError("a missing or wrong API key: send Authorization: Bearer KEY (the "
                           "server's --api_key)", status=401, code="invalid_api_key")

    app = FastAPI(title="llama31", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorized)])
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    app.add_exception_handler(HTTPException, lambda request, e: ApiError(
        f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else
        str(e.detail), status=e.status_code, code="not_found").response())
    app.add_exception_handler(Exception, lambda request, e: ApiError(  # uvicorn logs it
        f"internal error ({type(e).__name__}); the server's log has the details", status=500,
        kind="server_error").response())
    app.get("/health")(lambda: {"status": "ok", **server.engine.status()})
    app.get("/v1/models")(lambda: {"object": "list", "data": [
        {"id": server.name, "object": "model", "created": server.created, "owned_by": "llama31",
         "max_model_len": server.engine.max_seq_len}]})
    app.get("/tokenizer_info")(lambda: tokenizer_info(server))
    for path, route in [("/v1/chat/completions", chat_completions),
                        ("/v1/completions", completions), ("/tokenize", tokenize),
                        ("/detokenize", detokenize)]:
        app.post(path)(partial(route, server))
    return app


# -----------------------------------------------------------------------------
# CLI


def serve(ckpt_dir: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 8, max_queue: int = 64, max_seq_len: int = 2048,
          api_key: Optional[str] = None, model_name: Optional[str] = None,
          tokenizer_path: Optional[str] = None, quantize: Optional[str] = None,
          group_size: int = 32, device: Optional[str] = None, dtype: Optional[str] = None,
          rope_scale_factor: Optional[float] = None, max_body_mb: int = 8,
          draft_ckpt_dir: Optional[str] = None, draft_quantize: Optional[str] = None,
          speculate_k: int = 4):
    """Serve a model with OpenAI's API at http://HOST:PORT/v1 (chat and text completions, streamed
    or not; tool calls with Llama 3 models): max_batch_size requests decode together, max_queue
    more wait (past that: 429). Binds 127.0.0.1 unless --host says otherwise. --api_key (or
    LLAMA31_API_KEY) makes every route but /health want `Authorization: Bearer KEY`. --model_name:
    the id clients send (default: the checkpoint's name). --port 0: any free port. Without
    --ckpt_dir, the demo model. --draft_ckpt_dir D and/or --draft_quantize Q (as llama31.py's):
    a request decoding alone is drafted, --speculate_k tokens at a time (speculative decoding);
    with others, it decodes in their batch. One process: not under torchrun (no tensor parallel
    serving)."""
    if runs.launched():
        raise ConfigError("serve.py runs in one process; serving tensor parallel under torchrun "
                          "is not implemented: run python serve.py")
    device = llama31.check_device(device or llama31.default_device())
    for name, value, low in [("port", port, 0), ("max_batch_size", max_batch_size, 1),
                             ("max_queue", max_queue, 0), ("max_seq_len", max_seq_len, 2),
                             ("max_body_mb", max_body_mb, 1)]:
        llama31.check_number(name, value, int, low)
    api_key = api_key or os.environ.get("LLAMA31_API_KEY")
    if api_key is not None and not isinstance(api_key, str):  # fire reads 1234 as a number
        raise ConfigError(f"--api_key {api_key!r} was read as a number, not text; quote it "
                          f"(--api_key '\"{api_key}\"') or set LLAMA31_API_KEY")
    draft = variants.draft_of(draft_ckpt_dir, draft_quantize, speculate_k)
    listen = bind(host, port)
    if ckpt_dir is None:
        ckpt_dir, quantize = runs.demo_checkpoint(quantize, drafted=draft is not None)
    t0 = time.time()
    llama = llama31.Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device,
                                dtype, rope_scale_factor, quantize=quantize,
                                group_size=group_size, draft=draft)
    name = model_name or Path(str(ckpt_dir).rstrip("/")).stem
    engine = Engine(llama, max_batch_size, max_queue)
    where = f"http://{host}:{listen.getsockname()[1]}/v1"
    print(f"serving {name} ({runs.describe(llama.model)}, loaded in {time.time() - t0:.1f}s) at "
          f"{where}: {max_batch_size} slots of {max_seq_len} positions, {max_queue} may wait",
          file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"note: --host {host} lets other machines in, and no --api_key is set",
              file=sys.stderr)
    app = make_app(Server(llama, engine, name, api_key, max_body_mb << 20))
    try:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[listen])
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then raises it again
        print("stopped", file=sys.stderr)
    finally:
        engine.close()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, or asyncio leaves Nagle on for its connections: an event stream's small
    # writes then wait for delayed ACKs, 40 ms each
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                          f"(0: any free one) or --host") from None
    sock.listen(128)
    return sock


if __name__ == "__main__":
    runs.cli(serve, sys.argv[1:], "serve.py")
