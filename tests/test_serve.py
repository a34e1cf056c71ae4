"""serve.py with the real `openai` client (and raw HTTP for bodies it would not send): each answer
against the in-process model, the engine's batching against each request alone, tool calls read
as ChatFormat reads them, every bad request an OpenAI error object, and lm-eval's
local-completions scoring as the model does in-process."""

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import serve
from errors import ConfigError
from llama31 import Llama
from tokenizer import ChatFormat, llama3_system_prompt
from variants import Draft

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def running(llama, max_batch_size: int = 8, max_queue: int = 64, **server_args):
    """serve.py's app on a free port of 127.0.0.1, in a thread; stopped however the test ends."""
    engine = serve.Engine(llama, max_batch_size, max_queue)
    server = serve.Server(llama, engine, "tiny", **server_args)
    sock = serve.bind("127.0.0.1", 0)
    http = uvicorn.Server(uvicorn.Config(serve.make_app(server), log_level="warning"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not http.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield server
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()
        assert not thread.is_alive() and not engine.thread.is_alive()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def build(ckpt_dir, max_seq_len=256):
    return Llama.build(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=8, device="cpu",
                       dtype="fp32")


@pytest.fixture(scope="module")
def tiny(ckpt_dir):
    """The random-weight checkpoint (Llama 3's tokenizer and chat format), served."""
    with running(build(ckpt_dir), max_body=1 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def reference(ckpt_dir):
    """The same weights in-process, without the server's caches."""
    return build(ckpt_dir)


def hi(text="Say something.", **kw):
    return dict(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def wait_until(condition, seconds=30.0):
    end = time.time() + seconds
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.02)


# -----------------------------------------------------------------------------
# chat and completions


def test_models_and_health(tiny):
    models = client(tiny).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(tiny.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 8


def test_a_kept_alive_connection_is_not_held_up_by_delayed_acks(tiny):
    # Nagle's algorithm on the server's sockets holds each second write for the client's delayed
    # ACK, 40 ms: every request, and every chunk of a stream
    with httpx.Client(base_url=tiny.url) as http:
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            http.get("/health")
            times.append(time.perf_counter() - t0)
    assert sorted(times)[10] < 0.025


def test_streamed_chat_joins_to_the_non_streamed_reply(tiny):
    c = client(tiny)
    whole = c.chat.completions.create(**hi(max_tokens=12, temperature=0))
    chunks = list(c.chat.completions.create(**hi(max_tokens=12, temperature=0), stream=True,
                                            stream_options={"include_usage": True}))
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    first, finish, last = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content is None
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.content is None
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and text


def test_chat_reply_is_the_in_process_greedy_reply(tiny, reference):
    got = client(tiny).chat.completions.create(**hi("Hello there", max_tokens=10, temperature=0))
    prompt = reference.chat_format.encode_dialog(reference.tokenizer,
                                                 [{"role": "user", "content": "Hello there"}])
    want = reference.generate([prompt], 10, temperature=0)[0]
    assert got.choices[0].message.content == reference.tokenizer.decode(want)
    assert got.usage.prompt_tokens == len(prompt)


def test_a_seed_makes_sampling_repeat_and_n_gives_choices(tiny):
    c = client(tiny)
    ask = hi(max_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    one = c.chat.completions.create(**ask).choices[0].message.content
    two = c.chat.completions.create(**ask, n=2).choices
    assert [ch.index for ch in two] == [0, 1] and two[0].message.content == one
    assert two[1].message.content != one  # choice i samples with seed + i


def test_stop_string_ends_the_text_before_it(tiny):
    c = client(tiny)
    full = c.chat.completions.create(**hi(max_tokens=16, temperature=0)).choices[0].message.content
    stop = full[5:8]
    cut = full[:full.index(stop)]
    whole = c.chat.completions.create(**hi(max_tokens=16, temperature=0, stop=[stop, "\x00zz"]))
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    chunks = c.chat.completions.create(**hi(max_tokens=16, temperature=0, stop=stop), stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut


def test_chat_logprobs_are_the_models_log_softmax(tiny, reference):
    got = client(tiny).chat.completions.create(**hi(max_tokens=4, temperature=0, logprobs=True,
                                                    top_logprobs=3))
    entries = got.choices[0].logprobs.content
    prompt = reference.chat_format.encode_dialog(reference.tokenizer,
                                                 [{"role": "user", "content": "Say something."}])
    ids = reference.generate([prompt], 4, temperature=0)[0]
    logits = reference.model.forward_inference(torch.tensor([prompt + ids[:-1]]))[0]
    want = logits[len(prompt) - 1:].log_softmax(-1)
    for entry, token, row in zip(entries, ids, want):
        assert bytes(entry.bytes) == reference.tokenizer.model.decode_single_token_bytes(token)
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            row.topk(3).values.tolist(), abs=1e-4)


def test_completion_echo_logprobs_equal_the_models_log_softmax(tiny, reference):
    ids = torch.randint(0, 128000, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference.model.forward_inference(torch.tensor([ids]))[0].log_softmax(-1)
    want = want[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    for max_tokens in (0, 1):  # lm-eval sends 1 (and drops the last), or 0
        got = client(tiny).completions.create(model="tiny", prompt=ids, echo=True, logprobs=1,
                                              max_tokens=max_tokens, temperature=0)
        lp = got.choices[0].logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert len(lp.tokens) == len(ids) + max_tokens
        assert got.choices[0].text.startswith(reference.tokenizer.decode(ids))
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == max_tokens


def test_completion_prompts_as_text_ids_and_lists(tiny, reference):
    c = client(tiny)
    tok = reference.tokenizer
    text = "The capital of France is"
    ids = tok.encode(text, bos=True, eos=False)
    want = tok.decode(reference.generate([ids], 5, temperature=0)[0])
    assert c.completions.create(model="tiny", prompt=text, max_tokens=5,
                                temperature=0).choices[0].text == want
    many = c.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=5, temperature=0,
                                n=2)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == want
    streamed = c.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0,
                                    stream=True, echo=True)
    assert "".join(ch.choices[0].text for ch in streamed) == text + want


# -----------------------------------------------------------------------------
# batching: every request gets what it gets alone


async def stream_chat(c: openai.AsyncOpenAI, ask: dict) -> tuple:
    """(text, [(token bytes, logprob, top-2 log-probs)], finish reason) of a streamed reply."""
    text = ""
    tokens = []
    reason = None
    async for ch in await c.chat.completions.create(**ask, stream=True, logprobs=True,
                                                    top_logprobs=2):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            reason = ch.choices[0].finish_reason or reason
            for e in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else None) or []:
                tokens.append((bytes(e.bytes), e.logprob, [t.logprob for t in e.top_logprobs]))
    return text, tokens, reason


def same_or_a_tie(alone, together):
    """Batched rows differ from a row alone in the last bits (fp32): the replies must be the same,
    unless their first different token follows a near-tie of the top two (the rest may differ)."""
    for a, b in zip(alone[1], together[1]):
        if a[0] != b[0]:
            assert abs(a[2][0] - a[2][1]) < 1e-3, (a, b)
            return
    assert alone[0] == together[0] and len(alone[1]) == len(together[1])


def test_16_concurrent_streams_each_get_what_they_get_alone(tiny):
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    asks = [hi(" ".join(words[:1 + i % 12]) + "?", max_tokens=4 + 3 * (i % 7), temperature=0,
               **({"stop": "e"} if i % 5 == 0 else {})) for i in range(16)]
    sampled = [hi("Pick a word.", max_tokens=6, temperature=0.8, top_p=0.9, seed=i)
               for i in range(4)]

    async def run(asks):
        async with openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key="none",
                                      max_retries=0) as c:
            return await asyncio.gather(*(stream_chat(c, a) for a in asks))

    alone = [asyncio.run(run([a]))[0] for a in asks]
    together = asyncio.run(run(asks + sampled))  # 20 on 8 slots: 12 wait their turn
    for ask, a, t in zip(asks, alone, together):
        assert t[2] in ("stop", "length") and len(t[1]) <= ask["max_tokens"]
        same_or_a_tie(a, t)
    assert all(t[2] == "length" and len(t[1]) == 6 for t in together[16:])
    assert httpx.get(tiny.url + "/health").json()["busy"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tiny):
    before = httpx.get(tiny.url + "/health").json()["cancelled"]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", tiny.url + "/v1/chat/completions",
                         json=hi(max_tokens=230, temperature=0, stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            wait_until(lambda: httpx.get(tiny.url + "/health").json()["busy"] == 1)
        # closed after a few tokens of 230
    wait_until(lambda: httpx.get(tiny.url + "/health").json()["busy"] == 0, 10)
    assert httpx.get(tiny.url + "/health").json()["cancelled"] == before + 1
    reply = client(tiny).chat.completions.create(**hi(max_tokens=3))
    assert reply.choices[0].finish_reason == "length"


def test_a_client_that_gives_up_on_a_non_streamed_reply_frees_its_slot(tiny):
    before = httpx.get(tiny.url + "/health").json()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny.url + "/v1/chat/completions", json=hi(max_tokens=240), timeout=0.3)
    wait_until(lambda: httpx.get(tiny.url + "/health").json()["busy"] == 0, 10)
    assert httpx.get(tiny.url + "/health").json()["cancelled"] == before + 1


def test_past_the_queue_a_request_gets_429_with_retry_after(ckpt_dir):
    with running(build(ckpt_dir, max_seq_len=1024), max_batch_size=1, max_queue=1) as server:
        url = server.url + "/v1/chat/completions"
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", url, json=hi(max_tokens=1000, stream=True)) as first:
                lines = first.iter_lines()  # kept: a generator let go closes the connection
                next(lines)  # it holds the one slot
                with b.stream("POST", url, json=hi(max_tokens=5, stream=True)):
                    wait_until(lambda: httpx.get(server.url + "/health").json()["waiting"] == 1)
                    r = httpx.post(url, json=hi(max_tokens=5))
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert r.json()["error"]["code"] == "queue_full"
                    assert httpx.get(server.url + "/health").json()["cancelled"] == 0


# -----------------------------------------------------------------------------
# speculative decoding: a request decoding alone is drafted


@pytest.fixture(scope="module")
def drafted(ckpt_dir):
    """The random checkpoint drafted by its own int4 matrices (--draft_quantize int4), served."""
    llama = Llama.build(ckpt_dir, max_seq_len=256, max_batch_size=8, device="cpu", dtype="fp32",
                        draft=Draft(None, "int4", 4))
    with running(llama) as server:
        yield server


def test_a_drafted_request_gets_the_models_greedy_reply_and_logprobs(drafted, reference):
    c = client(drafted)
    made = 0
    for text, n in [("Hello there", 10), ("Say something.", 17), ("Count to three.", 1)]:
        got = c.chat.completions.create(**hi(text, max_tokens=n, temperature=0, logprobs=True,
                                             top_logprobs=2))
        prompt = reference.chat_format.encode_dialog(reference.tokenizer,
                                                     [{"role": "user", "content": text}])
        want = reference.generate([prompt], n, temperature=0)[0]
        assert got.choices[0].message.content == reference.tokenizer.decode(want)
        assert got.usage.completion_tokens == len(want) == n
        logits = reference.model.forward_inference(torch.tensor([prompt + want[:-1]]))[0]
        rows = logits[len(prompt) - 1:].log_softmax(-1)
        for entry, token, row in zip(got.choices[0].logprobs.content, want, rows):
            assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
                row.topk(2).values.tolist(), abs=1e-4)
        made += n
    stats = httpx.get(drafted.url + "/health").json()["speculative"]
    # every token but each reply's first (the prefill's) came from a verifying pass, several a pass
    assert stats["verifications"] < made - 3 and stats["accepted"] > 0


def test_drafted_replies_stop_at_a_stop_string_and_sampling_repeats_with_a_seed(drafted):
    c = client(drafted)
    full = c.chat.completions.create(**hi(max_tokens=16, temperature=0)).choices[0].message.content
    stop = full[5:8]
    cut = c.chat.completions.create(**hi(max_tokens=16, temperature=0, stop=stop))
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    ask = hi(max_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    first = c.chat.completions.create(**ask).choices[0]
    again = c.chat.completions.create(**ask).choices[0]
    assert first.message.content == again.message.content and first.finish_reason == "length"


def test_drafted_and_batched_requests_together_each_get_what_they_get_alone(drafted):
    asks = [hi(f"Tell me about {w}.", max_tokens=6 + 5 * i, temperature=0)
            for i, w in enumerate(["cats", "the sea", "numbers"])]

    async def run(asks):
        async with openai.AsyncOpenAI(base_url=drafted.url + "/v1", api_key="none",
                                      max_retries=0) as c:
            return await asyncio.gather(*(stream_chat(c, a) for a in asks))

    alone = [asyncio.run(run([a]))[0] for a in asks]  # drafted, each alone
    together = asyncio.run(run(asks))  # batched while others run, drafted once alone
    for ask, a, t in zip(asks, alone, together):
        assert t[2] == "length" and len(t[1]) == ask["max_tokens"]
        same_or_a_tie(a, t)
    assert httpx.get(drafted.url + "/health").json()["busy"] == 0


def test_serve_py_refuses_bad_draft_settings_before_loading():
    with pytest.raises(ConfigError, match="unknown quantize 'int9'"):
        serve.serve(draft_quantize="int9")
    with pytest.raises(ConfigError, match="--speculate_k must be an integer >= 0"):
        serve.serve(draft_quantize="int8", speculate_k=-2)


# -----------------------------------------------------------------------------
# tool calls


class Scripted:
    """The model with its logits replaced: each request's reply is the script's tokens, one a step
    (prefilled requests start the script over). Records every prompt it prefills."""

    def __init__(self, model):
        self.model = model
        self.args = model.args  # what the engine reads of a model
        self.norm = model.norm
        self.script = [0]  # token ids
        self.prompts = []
        self.at = {}  # how far each cache row is into the script
        self.slot = None  # the row being prefilled
        self.fail = False  # the next call raises

    def setup_caches(self, *a):
        self.model.setup_caches(*a)

    def clear_caches(self):
        self.model.clear_caches()

    @contextmanager
    def cache_rows(self, lo, hi):
        self.slot = lo
        with self.model.cache_rows(lo, hi):
            yield
        self.slot = None

    def forward_inference(self, tokens, start_pos=0, last=0):
        if self.fail:
            self.fail = False
            raise RuntimeError("the model failed (scripted)")
        logits = self.model.forward_inference(tokens, start_pos, last)
        forced = torch.full_like(logits, -1e9)
        if self.slot is not None:
            self.prompts.append(tokens[0].tolist())
            self.at[self.slot] = 0
        for i, row in enumerate([self.slot] if self.slot is not None else range(len(tokens))):
            k = self.at.get(row, 0)
            self.at[row] = k + 1
            forced[i, -1, self.script[min(k, len(self.script) - 1)]] = 0
        return forced


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def scripted(ckpt_dir):
    llama = build(ckpt_dir)
    model = Scripted(llama.model)
    with running(Llama(model, llama.tokenizer, llama.chat_format)) as server:
        server.scripted = model

        def script(text):
            model.script = llama.tokenizer.encode(text, bos=False, eos=False,
                                                  allowed_special="all")
        server.script = script
        yield server


def tools_prompt(tokenizer, messages):
    """The prompt Llama 3.1's template makes of QUESTION with WEATHER (HF's default: the tools in
    the first user message), then the messages, through ChatFormat."""
    user = ("Given the following functions, please respond with a JSON for a function call with "
            "its proper arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}.'
            "Do not use variables.\n\n" + json.dumps(WEATHER, indent=4) + "\n\n" + QUESTION)
    dialog = [{"role": "system", "content": llama3_system_prompt(None, ["get_weather"])},
              {"role": "user", "content": user}] + messages
    return ChatFormat("llama3").encode_dialog(tokenizer, dialog)


def test_a_tool_call_round_trip(scripted, tokenizer):
    c = client(scripted)
    scripted.script('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>')
    ask = [{"role": "user", "content": QUESTION}]
    reply = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert scripted.scripted.prompts[-1] == tools_prompt(tokenizer, [])
    # the call and the tool's answer go back as ChatFormat writes them
    scripted.script("It is sunny, 21 C.<|eot_id|>")
    ask += [choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "c": 21}'}]
    reply = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is sunny, 21 C."
    assert reply.choices[0].finish_reason == "stop"
    assert scripted.scripted.prompts[-1] == tools_prompt(tokenizer, [
        {"role": "assistant", "content": None, "tool_calls": [
            {"tool_name": "get_weather", "arguments": {"city": "Paris"}, "call_id": call.id}]},
        {"role": "tool", "content": '{"sky": "sunny", "c": 21}'}])


def test_a_streamed_tool_call_comes_as_tool_call_fragments(scripted):
    scripted.script('{"name": "get_weather", "parameters": {"city": "Paris, France"}}<|eot_id|>')
    chunks = list(client(scripted).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER],
        stream=True))
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris, France"}
    assert not any(ch.choices[0].delta.content for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_forces_the_start_of_the_call(scripted, tokenizer):
    c = client(scripted)
    ask = dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER])
    scripted.script('{"city": "Lyon"}}<|eot_id|>')
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = c.chat.completions.create(**ask, tool_choice=named)
    forced = '{"name": "get_weather", "parameters": '
    assert scripted.scripted.prompts[-1] == tools_prompt(tokenizer, []) + tokenizer.encode(
        forced, bos=False, eos=False)
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Lyon"}
    scripted.script('get_weather", "parameters": {"city": "Nice"}}<|eot_id|>')
    reply = c.chat.completions.create(**ask, tool_choice="required")
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    scripted.script("No tools today.<|eot_id|>")
    reply = c.chat.completions.create(**ask, tool_choice="none")
    assert reply.choices[0].message.content == "No tools today."
    assert scripted.scripted.prompts[-1] == ChatFormat("llama3").encode_dialog(
        tokenizer, [{"role": "user", "content": QUESTION}])  # no tools in the prompt


def test_a_plain_answer_with_tools_on_streams_as_content(scripted):
    scripted.script("Sunny, I think.<|eot_id|>")
    chunks = list(client(scripted).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER],
        stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Sunny, I think."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_failure_in_the_model_is_a_500_and_the_engine_goes_on(scripted, capsys):
    scripted.script("Fine.<|eot_id|>")
    scripted.scripted.fail = True
    r = httpx.post(scripted.url + "/v1/chat/completions", json=hi())
    assert r.status_code == 500 and "the model failed (scripted)" in r.json()["error"]["message"]
    assert "Traceback" not in r.text and "Traceback" in capsys.readouterr().err  # in the log
    assert client(scripted).chat.completions.create(**hi()).choices[0].message.content == "Fine."
    assert httpx.get(scripted.url + "/health").json()["busy"] == 0


# -----------------------------------------------------------------------------
# bad requests: an OpenAI error object each, a 4xx, and the server goes on


GOOD_CHAT = hi(max_tokens=2)
BAD_CHAT = {
    "messages": [None, [], "hi", [1], [{"role": "robot", "content": "x"}], [{"role": "user"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [{"x": 1}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 [{"role": "tool", "content": "x"}], [{"role": "user", "content": "x", "y": 1}],
                 [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                     "arguments": "{oops"}}]}],
                 [{"role": "assistant", "tool_calls": "f"}], [{"role": "user", "content": None}],
                 [{"role": "user", "content": "word " * 400}]],
    "max_tokens": [-1, 0, 1.5, "3", True, 10**6, [], 2**40],
    "max_completion_tokens": [0, "x", 10**6],
    "temperature": [-1, 3, "hot", True, float("inf"), {}],
    "top_p": [1.5, -0.1, "x", False],
    "n": [0, 100, 1.0, "2"],
    "stop": [5, ["a"] * 5, [""], [1], {"a": 1}],
    "seed": ["x", 1.5, 2**70, -2**70],
    "stream": ["yes", 1, []],
    "stream_options": [{"include_usage": True}, "a", {"x": 1}],
    "logprobs": ["yes", 1],
    "top_logprobs": [21, -1, 3, "1"],
    "tools": ["x", [], [{"type": "function"}], [{"type": "function", "function": {"name": 5}}],
              [{"type": "code", "function": {"name": "f"}}]],
    "tool_choice": ["sometimes", {"type": "function", "function": {"name": "nope"}}, "required",
                    5],
    "presence_penalty": [0.5, "x"], "frequency_penalty": [1], "logit_bias": [{"1": 5}],
    "response_format": [{"type": "json_object"}], "model": ["nope", 5],
    "functions": [[]], "foo": [1], "ignore_eos": ["no"],
}
BAD_COMPLETION = {
    "prompt": [None, [], [-1], [10**9], [1.5], {"a": 1}, [[]], [[1], "a", 3], [True],
               [[1] * 300]],
    "echo": ["x", 1], "logprobs": [21, True, -1], "max_tokens": [-1, "x", 10**6],
    "suffix": ["x"], "best_of": [2], "messages": [[]], "top_logprobs": [1],
}
RAW_BODIES = [b"", b"{", b"null", b"[]", b"1", b'"s"', b"{]", b"\xff\xfe", b"[" * 100000,
              b'{"messages": NaN}', b'{"max_tokens": 1e999}', b"{'single': 'quotes'}",
              b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}']


def bad_requests():
    """(path, body bytes) of a few hundred requests, each wrong in one way."""
    rng = random.Random(0)
    out = []
    for good, bad, path in [(GOOD_CHAT, BAD_CHAT, "/v1/chat/completions"),
                            ({"model": "tiny", "prompt": "x", "max_tokens": 2}, BAD_COMPLETION,
                             "/v1/completions")]:
        for name, values in bad.items():
            for value in values:
                for stream in (False, True):
                    body = dict(good, **{name: value})
                    if stream and name not in ("stream", "stream_options"):
                        body["stream"] = True
                    out.append((path, json.dumps(body).encode()))
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        out += [(path, raw) for raw in RAW_BODIES]
    junk = [None, -1, 1e308, "", "x" * 5000, [None], {"": {}}, [[[]]], True]
    for _ in range(100):  # random fields of both endpoints set to random junk
        good = rng.choice([GOOD_CHAT, {"model": "tiny", "prompt": "x"}])
        name = rng.choice(sorted(set(BAD_CHAT) | set(BAD_COMPLETION) - {"max_tokens"}))
        path = "/v1/chat/completions" if "messages" in good else "/v1/completions"
        body = dict(good, **{name: rng.choice(junk)})
        out.append((path, json.dumps(body).encode()))
    return out


def test_hundreds_of_bad_requests_each_get_an_error_object_and_the_server_goes_on(tiny):
    answered = 0
    with httpx.Client(base_url=tiny.url, timeout=60) as http:
        for path, body in bad_requests():
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            if r.status_code == 200:  # junk that happens to be valid (a null field is allowed)
                answered += 1
                continue
            assert 400 <= r.status_code < 500, (path, body[:200], r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, r.text
            assert error["message"] and "Traceback" not in r.text
        assert http.post("/v1/chat/completions", content=b"x" * (2 << 20)).status_code == 413
        assert http.get("/v1/nothing").json()["error"]["message"] == "no route GET /v1/nothing"
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get("/health").json()["busy"] == 0
    assert answered < 40
    assert client(tiny).chat.completions.create(**hi(max_tokens=2)).choices[0].message.content


def test_context_errors_say_what_to_shorten(tiny):
    c = client(tiny)
    with pytest.raises(openai.BadRequestError, match="leaving no room for a reply"):
        c.chat.completions.create(**hi("word " * 400))
    with pytest.raises(openai.BadRequestError, match="ask for at most"):
        c.chat.completions.create(**hi(max_tokens=250))
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(**dict(hi(), model="gpt-4o"))


# -----------------------------------------------------------------------------
# python serve.py, and lm-eval


@pytest.mark.slow
def test_serve_py_runs_the_demo_on_127_0_0_1_with_a_key_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0", "--max_seq_len", "256",
                             "--max_batch_size", "2", "--api_key", "sesame", "--device", "cpu"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            m = re.search(r"at (http://[\d.:]+)/v1", line)
            if m:
                break
        assert m and m.group(1).startswith("http://127.0.0.1:"), line
        url = m.group(1)
        assert httpx.get(url + "/health").status_code == 200  # no key needed
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        c = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        name = c.models.list().data[0].id
        answer = c.chat.completions.create(model=name, temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in answer.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="no tool calls"):  # ChatML
            c.chat.completions.create(model=name, tools=[WEATHER], messages=[
                {"role": "user", "content": QUESTION}])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_py_refuses_a_port_in_use_in_one_line(tiny):
    port = tiny.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "serve.py", "--port", port, "--device", "cpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot listen on 127.0.0.1:{port}")


MC = [("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
      ("How many legs does a cat have?", ["two", "three", "four", "six"], 2),
      ("What is the opposite of hot?", ["warm", "cold", "wet", "big"], 1),
      ("Which animal says moo?", ["dog", "cat", "duck", "cow"], 3),
      ("What do bees make?", ["honey", "milk", "bread", "wool"], 0),
      ("What is 2 plus 2?", ["three", "four", "five", "six"], 1)]


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_the_in_process_model(tiny, reference, tmp_path,
                                                                  monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in MC))
    (tmp_path / "mc.yaml").write_text(f"""task: serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")

    class InProcess(TemplateLM):
        """The reference: the model's log-softmax, tokenized as the server's /tokenize does."""
        tok = reference.tokenizer
        eot_token_id = tok.eos_id
        prefix_token_id = tok.bos_id

        def tok_encode(self, string, **kwargs):
            return self.tok.encode(string, bos=False, eos=False, allowed_special="all")

        def _loglikelihood_tokens(self, requests, **kwargs):
            out = []
            for _, context, continuation in requests:
                ids = torch.tensor([context + continuation])
                logprobs = reference.model.forward_inference(ids[:, :-1])[0].log_softmax(-1)
                logprobs = logprobs[-len(continuation):]
                want = torch.tensor(continuation)
                out.append((logprobs.gather(1, want[:, None]).sum().item(),
                            bool((logprobs.argmax(-1) == want).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(model, model_args=None):
        r = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["serve_mc"],
                                    task_manager=tasks, log_samples=True)
        return r["results"]["serve_mc"]["acc,none"], [s["resps"] for s in
                                                      r["samples"]["serve_mc"]]

    served = evaluate("local-completions", f"base_url={tiny.url}/v1/completions,model=tiny,"
                                           f"max_retries=1")
    local = evaluate(InProcess())
    assert served[0] == local[0]
    got = [lp for sample in served[1] for (lp, _), in sample]
    want = [lp for sample in local[1] for (lp, _), in sample]
    assert len(got) == len(MC) * 4 and got == pytest.approx(want, abs=1e-4)
