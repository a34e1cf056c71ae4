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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import anyio
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

import llama31
import runs
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
    generated: int = 0  # the engine's state from here on
    position: int = 0  # how many positions the job's cache row holds
    last: int = 0  # the token to feed next
    generator: Optional[torch.Generator] = None
    text: Optional["TextStream"] = None


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
            text, self.held = self.held[:min(found)], ""
            return text, True
        keep = max((k for s in self.stop for k in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:k])), default=0)
        text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return text, False

    def rest(self) -> str:
        text, self.held = self.held + self.utf8.decode(b"", final=True), ""
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
        self.served = 0
        self.cancelled = 0
        self.model.setup_caches(max_batch_size, self.max_seq_len)
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
        return {"slots": len(self.slots), "busy": sum(job is not None for job in self.slots),
                "waiting": len(self.waiting), "served": self.served, "cancelled": self.cancelled}

    def close(self):
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join()
        self.model.clear_caches()

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
            prompt = torch.tensor([job.prompt], device=self.model.norm.weight.device)
            with self.model.cache_rows(slot, slot + 1):
                last = 0 if job.prompt_logprobs else 1  # every position's logits, or the last's
                logits = self.model.forward_inference(prompt, 0, last=last)
            if job.prompt_logprobs:
                self.send(job, Prompt(job.index, prompt_logprobs(logits[0], job.prompt,
                                                                 job.logprobs or 0)))
            job.position = len(job.prompt)
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
        rows = self.slots[:busy[-1] + 1]
        tokens = [[job.last if job else self.tokenizer.pad_id] for job in rows]
        starts = [job.position if job else 0 for job in rows]
        tokens = torch.tensor(tokens, device=self.model.norm.weight.device)
        logits = self.model.forward_inference(tokens, starts)[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        for slot in busy:
            job = self.slots[slot]
            job.position += 1
            self.take(slot, job, logits[slot], greedy[slot])

    def take(self, slot: int, job: Job, logits, greedy: Optional[int] = None):
        """Sample the job's next token from its logits (vocab,), send it, finish if it ends."""
        if job.temperature > 0:
            token = llama31.next_tokens(logits[None], job.temperature, job.top_p,
                                        job.generator).item()
        else:
            token = int(logits.argmax()) if greedy is None else greedy
        logprob = None
        if job.logprobs is not None:
            logprob = token_logprobs(logits.log_softmax(dim=-1), token, job.logprobs)
        if token in job.stop_tokens:
            return self.finish(slot, job, "stop", stop_token=token)
        job.generated += 1
        job.last = token
        text, stopped = job.text.add(token)
        self.send(job, Step(job.index, token, text, logprob))
        if stopped:
            self.finish(slot, job, "stop")
        elif job.generated >= job.max_tokens or job.position >= self.max_seq_len:
            self.finish(slot, job, "length")

    def finish(self, slot: int, job: Job, reason: str, stop_token=None, error=None):
        self.slots[slot] = None
        self.served += reason != "cancelled"
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
        for i in range(hi - lo):
            out.append(token_logprobs(logprobs[i], prompt[lo + i + 1], k))
    return out


# -----------------------------------------------------------------------------
# requests: OpenAI's shapes, each field checked with an error that says what to fix


class ApiError(Exception):
    """Answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def response(self, headers=None) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def number(body: dict, name: str, default, lo, hi, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
            not math.isfinite(value):
        raise ApiError(f"{name} must be {kind} from {lo} to {hi}, got {json.dumps(value)[:60]}",
                       name)
    if not lo <= value <= hi:
        raise ApiError(f"{name} is {value}; it must be from {lo} to {hi}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {json.dumps(value)[:60]}", name)
    return value


def a_string(value, name: str) -> str:
    if not isinstance(value, str):
        raise ApiError(f"{name} must be a string, got {json.dumps(value)[:60]}", name)
    return value


def stop_strings(body: dict) -> List[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or \
            not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a string or a list of at most 4 non-empty strings", "stop")
    return stop


def unknown_fields(body: dict, known: set):
    for name in body:
        if name not in known:
            raise ApiError(f"unknown field {name!r}; this server takes {', '.join(sorted(known))}",
                           name, code="unknown_field")


def unsupported(body: dict):
    """Fields OpenAI has that this server takes only at their defaults."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
            raise ApiError(f"{name} is not supported; leave it out or 0", name)
    if body.get("logit_bias") not in (None, {}):
        raise ApiError("logit_bias is not supported; leave it out", "logit_bias")
    if body.get("best_of") not in (None, 1) or isinstance(body.get("best_of"), bool):
        raise ApiError("best_of is not supported; leave it out or 1", "best_of")
    if body.get("suffix") not in (None, ""):
        raise ApiError("suffix (insertion) is not supported; leave it out", "suffix")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError('response_format: only {"type": "text"} is supported', "response_format")


SAMPLING = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
            "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
            "user", "ignore_eos"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "parallel_tool_calls", "response_format", "metadata",
                          "store", "service_tier"}
COMPLETION_FIELDS = SAMPLING | {"prompt", "echo", "best_of", "suffix"}


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


def sampling(body: dict, server: "Server", max_tokens_default: Optional[int],
             least_tokens: int) -> Sampling:
    model = body.get("model")
    if model is not None and model != server.name:
        raise ApiError(f"the model {model!r} does not exist; this server serves {server.name!r}",
                       "model", 404, "model_not_found")
    unsupported(body)
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or
                                set(options) - {"include_usage"}):
        raise ApiError('stream_options is {"include_usage": bool}, with stream: true',
                       "stream_options")
    n = number(body, "n", 1, 1, len(server.engine.slots), integer=True)
    return Sampling(n, number(body, "max_tokens", max_tokens_default, least_tokens, 2**31,
                                           integer=True),
                    number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1),
                    number(body, "seed", None, -2**63, 2**64 - 1, integer=True),
                    stop_strings(body), boolean(body, "ignore_eos"), stream,
                    boolean(options or {}, "include_usage"))


def fit(prompt: List[int], max_tokens: Optional[int], max_seq_len: int, param: str) -> int:
    """max_tokens, checked against the context (None: all the room left)."""
    if not prompt:
        raise ApiError("the prompt is empty; give it at least one token", param)
    if len(prompt) > max_seq_len or len(prompt) == max_seq_len and max_tokens != 0:
        raise ApiError(f"the prompt has {len(prompt)} tokens and the context is {max_seq_len} "
                       f"(--max_seq_len), leaving no room for a reply; shorten it",
                       param, code="context_length_exceeded")
    room = max_seq_len - len(prompt)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(f"max_tokens is {max_tokens}, but the prompt's {len(prompt)} tokens leave "
                       f"{room} of the context's {max_seq_len}; ask for at most {room}",
                       "max_tokens", code="context_length_exceeded")
    return room if max_tokens is None else max_tokens


# -----------------------------------------------------------------------------
# chat: messages into the model's chat format; tools as Llama 3.1's template writes custom tools

# Meta's and HF's Llama 3.1 template, custom tools in the first user message
TOOLS_INTRO = ("Given the following functions, please respond with a JSON for a function call with "
               "its proper arguments that best answers the given prompt.\n\nRespond in the format "
               '{"name": function name, "parameters": dictionary of argument name and its value}.'
               "Do not use variables.\n\n")


def content_text(content, where: str, allow_none: bool = False) -> Optional[str]:
    """A message's content: a string, or text parts joined."""
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ApiError(f"{where}: this model reads text only; give each part as "
                       '{"type": "text", "text": "..."}', where)
    raise ApiError(f"{where} must be a string or a list of text parts", where)


def tool_calls_in(message: dict, where: str) -> List[dict]:
    """An assistant message's OpenAI tool_calls as ChatFormat's {tool_name, arguments, call_id}."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ApiError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(f'{at} must be {{"id", "type": "function", "function": {{"name", '
                           f'"arguments"}}}}', at)
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(f"{at}.function.arguments must be a JSON object as a string", at)
        out.append({"tool_name": fn["name"], "arguments": arguments,
                    "call_id": str(call.get("id", ""))})
    return out


def dialog_of(messages) -> List[dict]:
    """OpenAI's messages as ChatFormat's message dicts."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {\"role\", \"content\"}", "messages")
    dialog = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(f"{where}.role must be system, developer, user, assistant or tool",
                           f"{where}.role")
        unknown = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
        if unknown:
            raise ApiError(f"{where} has unknown field {sorted(unknown)[0]!r}", where)
        if role == "assistant":
            dialog.append({"role": "assistant", "tool_calls": tool_calls_in(m, where),
                           "content": content_text(m.get("content"), f"{where}.content", True)})
        elif role == "tool":
            a_string(m.get("tool_call_id"), f"{where}.tool_call_id")
            dialog.append({"role": "tool", "content": content_text(m.get("content"),
                                                                   f"{where}.content")})
        else:
            dialog.append({"role": "system" if role == "developer" else role,
                           "content": content_text(m.get("content"), f"{where}.content")})
    return dialog


def tools_of(body: dict) -> tuple:
    """(the tools' function definitions, what tool_choice forces: None (no tools), "" (may call),
    or the start of a call the reply must begin with)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError("tool_choice needs tools", "tool_choice")
        return [], None
    if not isinstance(tools, list) or not tools:
        raise ApiError('tools must be a non-empty list of {"type": "function", "function": '
                       '{"name", "description", "parameters"}}', "tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] or \
                not isinstance(fn.get("parameters", {}), dict):
            raise ApiError(f'tools[{i}] must be {{"type": "function", "function": {{"name", '
                           f'"description", "parameters": a JSON schema}}}}', f"tools[{i}]")
        names.append(fn["name"])
    if choice in (None, "auto"):
        return tools, ""
    if choice == "none":
        return tools, None
    if choice == "required":
        return tools, '{"name": "'
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or fn.get("name") not in names:
        raise ApiError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                       '"function": {"name": one of the tools}}', "tool_choice")
    return tools, f'{{"name": "{fn["name"]}", "parameters": '


def with_tools(dialog: List[dict], tools: list) -> List[dict]:
    """The dialog with custom tools as Llama 3.1's template writes them (HF's default): the system
    message with "Environment: ipython", the definitions at the start of the first user message."""
    system = [m for m in dialog[:1] if m["role"] == "system"]
    rest = dialog[len(system):]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        raise ApiError("tools are written into the first user message; the messages have none",
                       "messages")
    names = [t["function"]["name"] for t in tools]
    prompt = llama3_system_prompt(system[0]["content"] if system else None, names)
    definitions = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    user = dict(rest[first], content=TOOLS_INTRO + definitions + rest[first]["content"].strip())
    return [{"role": "system", "content": prompt}] + rest[:first] + [user] + rest[first + 1:]


def openai_tool_calls(calls: List[dict]) -> List[dict]:
    return [{"id": c["call_id"], "type": "function",
             "function": {"name": c["tool_name"],
                          "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


# -----------------------------------------------------------------------------
# replies: what the engine sends for each choice, gathered; OpenAI's response shapes


class Choice:
    """One choice's reply as the engine's events arrive."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.tokens: List[int] = []
        self.logprobs: List[tuple] = []  # (token, logprob, top) per token
        self.prompt_logprobs: Optional[list] = None
        self.done: Optional[Done] = None

    def add(self, event) -> str:
        """Take an event; return the text it adds."""
        if isinstance(event, Prompt):
            self.prompt_logprobs = event.logprobs
            return ""
        if isinstance(event, Step):
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, *event.logprob))
            self.text += event.text
            return event.text
        self.done = event
        self.text += event.text
        return event.text


async def events(queue: asyncio.Queue, n: int):
    """The engine's events for a request's n choices, until each is Done; ApiError on an error."""
    left = n
    while left:
        event = await queue.get()
        if isinstance(event, Done):
            left -= 1
            if event.reason == "error":
                raise ApiError(f"the engine failed: {event.error}", status=500, kind="server_error")
        yield event


class Server:
    """What the routes share: the engine, the tokenizer and chat format, the served name."""

    def __init__(self, llama, engine: Engine, name: str, api_key: Optional[str] = None,
                 max_body: int = 8 << 20):
        self.llama = llama
        self.engine = engine
        self.tokenizer = llama.tokenizer
        self.name = name
        self.api_key = api_key
        self.max_body = max_body
        self.created = int(time.time())

    def jobs(self, prompt: List[int], s: Sampling, max_tokens: int, logprobs=None,
             prompt_logprobs: bool = False, first_index: int = 0) -> List[Job]:
        seed = secrets.randbits(63) if s.seed is None else s.seed
        stop_tokens = frozenset() if s.ignore_eos else frozenset(self.tokenizer.stop_tokens)
        return [Job(prompt, max_tokens, s.temperature, s.top_p, (seed + i) % 2**64, s.stop,
                    stop_tokens, logprobs, prompt_logprobs, first_index + i) for i in range(s.n)]

    def start(self, jobs: List[Job]) -> asyncio.Queue:
        """Hand jobs to the engine; their events arrive on the returned queue."""
        queue: asyncio.Queue = asyncio.Queue()
        put = partial(asyncio.get_running_loop().call_soon_threadsafe, queue.put_nowait)
        for job in jobs:
            job.emit = put
        most = len(self.engine.slots) + self.engine.max_queue
        if len(jobs) > most:
            raise ApiError(f"this request asks for {len(jobs)} completions (prompts x n); the server "
                           f"holds at most {most} at once", "n")
        try:
            self.engine.submit(jobs)
        except QueueFull:
            raise ApiError(f"all {len(self.engine.slots)} slots are busy and "
                           f"{self.engine.max_queue} requests wait already; retry shortly",
                           status=429, code="queue_full", kind="rate_limit_error") from None
        return queue

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def top_list(self, top) -> List[dict]:
        return [{"token": self.token_text(t), "logprob": lp,
                 "bytes": list(self.engine.token_bytes(t))} for t, lp in top]

    def chat_logprobs(self, entries) -> dict:
        return {"content": [{"token": self.token_text(t), "logprob": lp,
                             "bytes": list(self.engine.token_bytes(t)),
                             "top_logprobs": self.top_list(top)} for t, lp, top in entries]}

    def completion_logprobs(self, prompt: List[int], choice: Choice, echo: bool,
                            offset: int = 0) -> dict:
        """The legacy shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
        entries = [(t, *lp) if lp else (t, None, None)
                   for t, lp in zip(prompt, choice.prompt_logprobs or [])] if echo else []
        entries += choice.logprobs
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            text = self.token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else
                                       {self.token_text(t): v for t, v in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def finish_reason(done: Done) -> str:
    return {"stop": "stop", "length": "length"}.get(done.reason, done.reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that also listen for the client going away (as starlette does for ASGI
    before 2.4): on_close runs when the stream ends, however it ends, so a slot is freed at once."""

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
    """Await work, or cancel it when the client disconnects first (a non-streamed reply)."""
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


# -----------------------------------------------------------------------------
# the routes


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past limit bytes, 400 with the parser's words otherwise."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(f"the body is over {limit >> 20} MB", status=413, code="body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError("the body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(f"the body is not valid JSON: {e.msg} at line {e.lineno} column "
                       f"{e.colno}") from None
    except RecursionError:
        raise ApiError("the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError("the body has a lone surrogate escape (\\ud800-\\udfff) in a string, "
                       "which is no text") from None
    return data


async def chat_completions(server: Server, request: Request):
    body = await read_json(request, server.max_body)
    unknown_fields(body, CHAT_FIELDS)
    llama = server.llama
    if llama.chat_format is None:
        raise ApiError(f"{server.name} has no chat format (Llama 3 headers or ChatML); use "
                       f"/v1/completions", code="no_chat_format")
    if "max_completion_tokens" in body:
        body = dict(body, max_tokens=body.get("max_completion_tokens"))
    s = sampling(body, server, None, 1)
    want_logprobs = boolean(body, "logprobs")
    top = number(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not want_logprobs:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    dialog = dialog_of(body.get("messages"))
    tools, forced = tools_of(body)
    if forced is not None and llama.chat_format.style != "llama3":
        raise ApiError(f"{server.name} chats in the {llama.chat_format.style} format, which has no "
                       f"tool calls; leave tools out (or tool_choice: none)", "tools",
                       code="no_tool_calls")
    if forced is not None:
        dialog = with_tools(dialog, tools)
    try:
        prompt = llama.chat_format.encode_dialog(server.tokenizer, dialog)
    except ConfigError as e:
        raise ApiError(str(e), "messages") from None
    head = server.tokenizer.encode(forced or "", bos=False, eos=False)
    max_tokens = fit(prompt + head, s.max_tokens, server.engine.max_seq_len, "messages")
    jobs = server.jobs(prompt + head, s, max_tokens, top if want_logprobs else None)
    reply = Reply(server, s, forced, len(prompt), len(head))
    queue = server.start(jobs)
    if s.stream:
        return EventStream(reply.chunks(events(queue, s.n)), reply.cancel(jobs))
    try:
        choices = await unless_gone(request, reply.gather(events(queue, s.n)))
    finally:
        reply.cancel(jobs)()
    return JSONResponse(reply.response(choices))


class Reply:
    """A chat completion's reply in OpenAI's shapes, whole or as chunks. With tools on, a reply that
    begins like a call ({, [ or <|python_tag|>) is held back and read at its end with ChatFormat;
    its calls become tool_calls, finish_reason "tool_calls"."""

    def __init__(self, server: Server, s: Sampling, forced: Optional[str], prompt_tokens: int,
                 head_tokens: int):
        self.server, self.s, self.forced = server, s, forced
        self.prompt_tokens, self.head_tokens = prompt_tokens, head_tokens
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())

    @staticmethod
    def cancel(jobs: List[Job]) -> Callable:
        def cancel():
            for job in jobs:
                job.cancelled = True
        return cancel

    async def gather(self, stream) -> List[Choice]:
        choices = [Choice(i) for i in range(self.s.n)]
        async for event in stream:
            choices[event.index].add(event)
        return choices

    def message(self, choice: Choice) -> tuple:
        """(message, finish_reason) of a finished choice."""
        text = (self.forced or "") + choice.text
        calls = self.tool_calls(text, choice.done) if self.forced is not None else []
        if calls:
            return {"role": "assistant", "content": None,
                    "tool_calls": openai_tool_calls(calls)}, "tool_calls"
        return {"role": "assistant", "content": text}, finish_reason(choice.done)

    def tool_calls(self, text: str, done: Done) -> List[dict]:
        llama = self.server.llama
        ids = llama.tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
        ids += [done.stop_token] if done.stop_token is not None else []
        return llama.chat_format.decode_assistant(llama.tokenizer, ids)["tool_calls"]

    def usage(self, choices: List[Choice]) -> dict:
        made = sum(len(c.tokens) + self.head_tokens for c in choices)
        return usage(self.prompt_tokens, made)

    def response(self, choices: List[Choice]) -> dict:
        out = []
        for c in choices:
            message, reason = self.message(c)
            logprobs = self.server.chat_logprobs(c.logprobs) if c.logprobs else None
            out.append({"index": c.index, "message": message, "logprobs": logprobs,
                        "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.server.name, "system_fingerprint": FINGERPRINT, "choices": out,
                "usage": self.usage(choices)}

    def chunk(self, index: int, delta: dict, reason=None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.server.name, "system_fingerprint": FINGERPRINT,
                    "choices": [choice]})

    async def chunks(self, stream):
        """The role first, content as it comes (a possible call held back), the finish reason last
        with no content; usage if asked; [DONE]."""
        choices = [Choice(i) for i in range(self.s.n)]
        held = [self.forced is not None for _ in choices]  # None: streaming content
        sent = [0] * self.s.n
        for c in choices:
            yield self.chunk(c.index, {"role": "assistant"})
        try:
            async for event in stream:
                c = choices[event.index]
                c.add(event)
                logprobs = None
                if isinstance(event, Step) and event.logprob is not None:
                    logprobs = self.server.chat_logprobs(c.logprobs[-1:])
                if held[c.index] and not isinstance(event, Done):
                    text = ((self.forced or "") + c.text).lstrip()
                    if not text:
                        continue
                    if self.forced or text[0] in "{[" or text.startswith("<|python_tag|>"):
                        continue  # a call, perhaps: read at the end
                    held[c.index] = False
                if not held[c.index] and (len(c.text) > sent[c.index] or logprobs):
                    yield self.chunk(c.index, {"content": c.text[sent[c.index]:]},
                                     logprobs=logprobs)
                    sent[c.index] = len(c.text)
                if isinstance(event, Done):
                    for chunk in self.last_chunks(c, held[c.index], sent[c.index]):
                        yield chunk
        except ApiError as e:
            yield sse(error_body(e))
            yield "data: [DONE]\n\n"
            return
        if self.s.usage_chunk:
            yield sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.server.name, "system_fingerprint": FINGERPRINT,
                       "choices": [], "usage": self.usage(choices)})
        yield "data: [DONE]\n\n"

    def last_chunks(self, c: Choice, held: bool, sent: int):
        """A held reply (its calls as delta.tool_calls fragments, or its text), then the finish."""
        message, reason = self.message(c)
        if held and message.get("tool_calls"):
            for i, call in enumerate(message["tool_calls"]):
                fn = call["function"]
                yield self.chunk(c.index, {"tool_calls": [
                    {"index": i, "id": call["id"], "type": "function",
                     "function": {"name": fn["name"], "arguments": ""}}]})
                for at in range(0, len(fn["arguments"]), 16):
                    yield self.chunk(c.index, {"tool_calls": [
                        {"index": i, "function": {"arguments": fn["arguments"][at:at + 16]}}]})
        elif held and message["content"]:
            yield self.chunk(c.index, {"content": message["content"]})
        yield self.chunk(c.index, {}, reason)


FINGERPRINT = "fp_llama31"


def completion_prompts(prompt, tokenizer, vocab_size: int) -> List[tuple]:
    """(text, token ids) of each prompt: a string, token ids, or a list of either. Text is
    tokenized as HF's tokenizers do by default: BOS if the model wants one, special-token text
    read as the special token."""
    many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    items = prompt if many else [prompt]
    out = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            ids = tokenizer.encode(p, bos=tokenizer.add_bos, eos=False, allowed_special="all")
            out.append((p, ids))
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab_size
                                               for t in p):
            out.append((tokenizer.decode(p), p))
        else:
            raise ApiError(f"prompt{f'[{i}]' if many else ''} must be a non-empty string or a "
                           f"list of token ids from 0 to {vocab_size - 1}", "prompt")
    return out


async def completions(server: Server, request: Request):
    body = await read_json(request, server.max_body)
    unknown_fields(body, COMPLETION_FIELDS)
    s = sampling(body, server, 16, 0)
    logprobs = number(body, "logprobs", None, 0, 20, integer=True)
    echo = boolean(body, "echo")
    prompts = completion_prompts(body.get("prompt"), server.tokenizer,
                                 server.llama.model.args.vocab_size)
    jobs = []
    for i, (_, ids) in enumerate(prompts):
        max_tokens = fit(ids, s.max_tokens, server.engine.max_seq_len, "prompt")
        jobs += server.jobs(ids, s, max_tokens, logprobs, echo and logprobs is not None, i * s.n)
    queue = server.start(jobs)
    reply = Completion(server, s, prompts, echo, logprobs is not None)
    stream = events(queue, len(jobs))
    cancel = Reply.cancel(jobs)
    if s.stream:
        return EventStream(reply.chunks(stream), cancel)
    try:
        choices = await unless_gone(request, reply.gather(stream, len(jobs)))
    finally:
        cancel()
    return JSONResponse(reply.response(choices))


class Completion:
    """A text completion's reply, whole or as chunks; with echo, the prompt's text first (and with
    logprobs, its tokens' log-probs, the first null)."""

    def __init__(self, server: Server, s: Sampling, prompts: List[tuple], echo: bool,
                 logprobs: bool):
        self.server, self.s, self.prompts, self.echo, self.logprobs = server, s, prompts, echo, logprobs
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())

    async def gather(self, stream, count: int) -> List[Choice]:
        choices = [Choice(i) for i in range(count)]
        async for event in stream:
            choices[event.index].add(event)
        return choices

    def prompt_of(self, c: Choice) -> tuple:
        return self.prompts[c.index // self.s.n]

    def usage(self, choices: List[Choice]) -> dict:
        return usage(sum(len(ids) for _, ids in self.prompts), sum(len(c.tokens) for c in choices))

    def response(self, choices: List[Choice]) -> dict:
        out = []
        for c in choices:
            text, ids = self.prompt_of(c)
            logprobs = None
            if self.logprobs:
                logprobs = self.server.completion_logprobs(ids, c, self.echo)
            out.append({"index": c.index, "text": (text if self.echo else "") + c.text,
                        "logprobs": logprobs, "finish_reason": finish_reason(c.done)})
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.server.name, "system_fingerprint": FINGERPRINT, "choices": out,
                "usage": self.usage(choices)}

    def chunk(self, index: int, text: str, reason=None, logprobs=None, **extra) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return sse({"id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.server.name, "system_fingerprint": FINGERPRINT,
                    "choices": [choice], **extra})

    async def chunks(self, stream):
        choices = [Choice(i) for i in range(len(self.prompts) * self.s.n)]
        if self.echo and not self.logprobs:  # with logprobs, the prompt comes with its own
            for c in choices:
                yield self.chunk(c.index, self.prompt_of(c)[0])
        try:
            async for event in stream:
                c = choices[event.index]
                text = c.add(event)
                if isinstance(event, Prompt):
                    logprobs = self.server.completion_logprobs(self.prompt_of(c)[1], c, True)
                    yield self.chunk(c.index, self.prompt_of(c)[0], logprobs=logprobs)
                    continue
                logprobs = None
                if isinstance(event, Step) and self.logprobs:
                    logprobs = self.server.completion_logprobs([], c, False)
                    logprobs = {k: v[-1:] for k, v in logprobs.items()}
                if text or logprobs:
                    yield self.chunk(c.index, text, logprobs=logprobs)
                if isinstance(event, Done):
                    yield self.chunk(c.index, "", finish_reason(event))
        except ApiError as e:
            yield sse(error_body(e))
            yield "data: [DONE]\n\n"
            return
        if self.s.usage_chunk:
            yield sse({"id": self.id, "object": "text_completion", "created": self.created,
                       "model": self.server.name, "choices": [], "usage": self.usage(choices)})
        yield "data: [DONE]\n\n"


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def make_app(server: Server) -> FastAPI:
    """The HTTP routes over a Server. Every error is OpenAI's error object: 4xx for the client's
    faults (which the openai client does not retry, 429 aside), 500 with no traceback for ours."""
    async def authorized(request: Request):
        if server.api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            raise ApiError("a missing or wrong API key: send Authorization: Bearer KEY (the "
                           "server's --api_key)", status=401, code="invalid_api_key")

    app = FastAPI(title="llama31", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorized)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response({"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        what = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        return ApiError(what, status=e.status_code, code="not_found").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # uvicorn logs the traceback
        return ApiError(f"internal error ({type(e).__name__}); the server's log has the details",
                        status=500, kind="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model",
                                            "created": server.created, "owned_by": "llama31",
                                            "max_model_len": server.engine.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        return await chat_completions(server, request)

    @app.post("/v1/completions")
    async def completions_route(request: Request):
        return await completions(server, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = server.tokenizer
        names = {i: name for name, i in tok.special_tokens.items()}
        name = lambda i: names.get(i, tok.decode([i]))  # noqa: E731
        return {"eos_token": name(tok.eos_id), "bos_token": name(tok.bos_id),
                "pad_token": name(tok.pad_id), "add_bos_token": tok.add_bos,
                "model_max_length": server.engine.max_seq_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request, server.max_body)
        unknown_fields(body, {"model", "prompt", "add_special_tokens"})
        text = a_string(body.get("prompt"), "prompt")
        bos = boolean(body, "add_special_tokens", True) and server.tokenizer.add_bos
        ids = server.tokenizer.encode(text, bos=bos, eos=False, allowed_special="all")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request, server.max_body)
        unknown_fields(body, {"model", "tokens"})
        (_, ids), = completion_prompts([body.get("tokens")], server.tokenizer,
                                       server.llama.model.args.vocab_size)
        return {"prompt": server.tokenizer.decode(ids)}

    return app


# -----------------------------------------------------------------------------
# CLI


def serve(ckpt_dir: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 8, max_queue: int = 64, max_seq_len: int = 2048,
          api_key: Optional[str] = None, model_name: Optional[str] = None,
          tokenizer_path: Optional[str] = None, quantize: Optional[str] = None,
          group_size: int = 32, device: Optional[str] = None, dtype: Optional[str] = None,
          rope_scale_factor: Optional[float] = None, max_body_mb: int = 8):
    """Serve a model with OpenAI's API (chat and text completions, streamed or not, tool calls for
    Llama 3 models) at http://HOST:PORT/v1, max_batch_size requests decoded together and up to
    max_queue more waiting (past that: 429). Binds 127.0.0.1 unless --host says otherwise;
    --api_key (or LLAMA31_API_KEY) makes every route but /health want `Authorization: Bearer KEY`.
    --model_name: the id clients send (default: the checkpoint's name). --port 0 takes a free
    port. Without --ckpt_dir, the demo model. One process: tensor parallel serving is not done."""
    if runs.launched():
        raise ConfigError("serve.py runs in one process; tensor parallel serving under torchrun "
                          "is not implemented: run python serve.py")
    device = llama31.check_device(device or llama31.default_device())
    for name, value, low in [("port", port, 0), ("max_batch_size", max_batch_size, 1),
                             ("max_queue", max_queue, 0), ("max_seq_len", max_seq_len, 2),
                             ("max_body_mb", max_body_mb, 1)]:
        llama31.check_number(name, value, int, low)
    api_key = api_key or os.environ.get("LLAMA31_API_KEY")
    if api_key is not None and not isinstance(api_key, str):
        raise ConfigError(f"--api_key must be a string, got {api_key!r}")
    listen = bind(host, port)
    if ckpt_dir is None:
        ckpt_dir, quantize = runs.demo_checkpoint(quantize)
    t0 = time.time()
    llama = llama31.Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device,
                                dtype, rope_scale_factor, quantize=quantize,
                                group_size=group_size)
    name = model_name or Path(str(ckpt_dir).rstrip("/")).stem
    engine = Engine(llama, max_batch_size, max_queue)
    server = Server(llama, engine, name, api_key, max_body_mb << 20)
    where = f"http://{host}:{listen.getsockname()[1]}/v1"
    print(f"serving {name} ({runs.describe(llama.model)}, loaded in {time.time() - t0:.1f}s) at "
          f"{where}: {max_batch_size} slots of {max_seq_len} positions, {max_queue} may wait",
          file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"note: --host {host} lets other machines in, and no --api_key is set",
              file=sys.stderr)
    try:
        config = uvicorn.Config(make_app(server), log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[listen])
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then raises it again
        print("stopped", file=sys.stderr)
    finally:
        engine.close()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
