"""Conversation and `python chat.py`: each turn answers as chat_completion does on the whole
dialog from scratch, while the KV cache kept between turns means a turn prefills only its new tokens."""

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import chat
from variants import compiled
from chat import Conversation
from llama31 import Llama
from test_chat_format import meta_ids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(ckpt_dir):
    """The random-weight checkpoint (Llama 3's chat format)."""
    return Llama.build(ckpt_dir, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def smollm(smollm_path):
    """The demo model (ChatML), whose answers are real text."""
    return Llama.build(smollm_path, max_seq_len=512, max_batch_size=1, device="cpu", dtype="fp32", quantize="none")


def fresh_answer(llama, dialog, max_gen_len):
    """What a prefill of the whole dialog from scratch answers (greedy), as the conversation streams it."""
    prompt = llama.chat_format.encode_dialog(llama.tokenizer, dialog)
    return llama.tokenizer.decode(llama.generate([prompt], max_gen_len, temperature=0)[0])


def kept(llama, dialog, max_gen_len):
    """The answer as a dialog keeps it: chat_completion's message (read back as Meta's code reads it)."""
    return llama.chat_completion([dialog], max_gen_len, temperature=0)[0]


@pytest.mark.slow
def test_piped_chat_cli_answers_each_turn_as_chat_completion_of_the_whole_dialog(ckpt_dir, tiny):
    r = subprocess.run([sys.executable, "chat.py", "--ckpt_dir", str(ckpt_dir), "--temperature", "0",
                        "--max_gen_len", "6", "--max_seq_len", "256", "--device", "cpu"],
                       input="Hello there!\n\nAnd what else?\n", cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr  # end of input leaves cleanly
    hello = [{"role": "user", "content": "Hello there!"}]
    first = fresh_answer(tiny, hello, 6)
    second = fresh_answer(tiny, hello + [kept(tiny, hello, 6), {"role": "user", "content": "And what else?"}], 6)
    assert r.stdout == f"{first}\n{second}\n"  # the empty line is no message


@pytest.mark.slow
def test_a_turn_prefills_only_the_tokens_the_cache_does_not_hold(smollm):
    conv = Conversation(smollm, max_gen_len=24, temperature=0)
    try:
        answer1 = "".join(conv.ask("What is the capital of France?"))
        prompt1 = smollm.chat_format.encode_dialog(smollm.tokenizer, conv.messages[:1])
        assert conv.prefilled == len(prompt1)  # the first turn prefills everything
        held = list(conv.cached)
        answer2 = "".join(conv.ask("And of Italy?"))
        dialog = [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": answer1}, {"role": "user", "content": "And of Italy?"}]
        want = smollm.chat_format.encode_dialog(smollm.tokenizer, dialog)
        assert conv.cached[:len(want)] == want  # turn 2's prompt: the whole dialog, first answer included
        # the cache held the first prompt and the first answer; only the rest was computed
        assert held[:len(prompt1)] == prompt1 and len(held) > len(prompt1) and want[:len(held)] == held
        assert conv.prefilled == len(want) - len(held)
        assert answer2 == fresh_answer(smollm, dialog, 24)
        assert "Paris" in answer1 and "Rome" in answer2
    finally:
        conv.close()


def test_reset_forgets_the_dialog(tiny):
    conv = Conversation(tiny, max_gen_len=5, temperature=0)
    try:
        "".join(conv.ask("One"))
        conv.reset()
        again = "".join(conv.ask("Two"))
        assert conv.messages[0] == {"role": "user", "content": "Two"}
        assert again == fresh_answer(tiny, [{"role": "user", "content": "Two"}], 5)
    finally:
        conv.close()


@pytest.mark.parametrize("fixed", [False, True], ids=["sliced-cache", "decode_step"])
def test_another_generation_between_turns_leaves_the_dialog_right(tiny, fixed):
    # a compiled model decodes with decode_step over caches of its own; the conversation's cache
    # must come back as it was (eagerly, a generation takes the cache and the next turn refills it)
    model = tiny.model
    conv = Conversation(tiny, max_gen_len=5, temperature=0)
    if fixed:
        tiny.decoder = compiled.StaticDecoder(model, compile=False, eager=tiny.decoder)
    try:
        first = "".join(conv.ask("One"))
        tiny.text_completion(["Something else entirely"], 6, temperature=0)
        one = [{"role": "user", "content": "One"}]
        assert first == fresh_answer(tiny, one, 5)
        dialog = one + [kept(tiny, one, 5), {"role": "user", "content": "Two"}]
        assert "".join(conv.ask("Two")) == fresh_answer(tiny, dialog, 5)
    finally:
        conv.close()
        compiled.eager(tiny)


def test_an_answer_stopped_early_stays_in_the_dialog_and_the_next_turn_is_right(tiny):
    conv = Conversation(tiny, max_gen_len=8, temperature=0)
    try:
        pieces = conv.ask("Tell me a long story.")
        next(pieces), next(pieces)
        pieces.close()  # what Ctrl-C does in the CLI
        partial = conv.messages[-1]
        assert partial["role"] == "assistant" and partial["content"]
        dialog = conv.messages + [{"role": "user", "content": "Go on."}]
        assert "".join(conv.ask("Go on.")) == fresh_answer(tiny, dialog, 8)
    finally:
        conv.close()


@pytest.mark.slow
def test_a_dialog_past_max_seq_len_drops_its_oldest_turns_and_still_answers(smollm_path, capsys):
    llama = Llama.build(smollm_path, max_seq_len=96, max_batch_size=1, device="cpu", dtype="fp32", quantize="none")
    conv = Conversation(llama, system="Answer in one short sentence.", max_gen_len=16, temperature=0)
    try:
        questions = ["What is the capital of France?", "And of Spain?", "And of Italy?", "And of Japan?"]
        for q in questions:
            "".join(conv.ask(q))
        err = capsys.readouterr().err
        assert "dropped its oldest" in err
        kept = [m["content"] for m in conv.messages if m["role"] == "user"]
        assert kept == questions[len(questions) - len(kept):] and len(kept) < len(questions)
        assert conv.cached[:8] == llama.chat_format.encode_dialog(
            llama.tokenizer, [{"role": "system", "content": "Answer in one short sentence."}])[:8]
        # the answer after the drop is the one a fresh prefill of the shortened dialog gives
        system = [{"role": "system", "content": "Answer in one short sentence."}]
        assert conv.messages[-1]["content"] == fresh_answer(llama, system + conv.messages[:-1], 16)
    finally:
        conv.close()


def test_chat_on_a_model_without_a_chat_format_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="no known chat format"):
        Conversation(Llama(tiny.model, tiny.tokenizer, None))


# -----------------------------------------------------------------------------
# tool calls: what the model writes is read back as Meta's code reads it, and the tool's answer
# goes back in as an ipython message


class Scripted:
    """A decoder (Llama.decoder) that makes the model write the given tokens, one a step."""

    def __init__(self, tokens, vocab_size: int):
        self.tokens, self.vocab_size, self.at = list(tokens), vocab_size, 0

    @contextmanager
    def caches(self, batch_size, total_len):
        yield

    def logits(self, tokens, start_pos):
        out = torch.full((tokens.shape[0], self.vocab_size), -1e9)
        out[:, self.tokens[min(self.at, len(self.tokens) - 1)]] = 0
        self.at += 1
        return out


CALL = '<|python_tag|>brave_search.call(query="weather in Menlo Park")'


def scripted(llama, text):
    ids = llama.tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    return Llama(llama.model, llama.tokenizer, llama.chat_format), ids


def test_chat_completion_returns_the_tool_call_meta_reads_and_its_stop_reason(tiny):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    llama, ids = scripted(tiny, CALL + "<|eom_id|>")
    llama.decoder = Scripted(ids, tiny.model.args.vocab_size)
    reply = llama.chat_completion([[{"role": "user", "content": "Weather?"}]], 32, temperature=0)[0]
    meta = MetaChatFormat(MetaTokenizer.get_instance()).decode_assistant_message(ids, StopReason.out_of_tokens)
    assert reply["stop_reason"] == meta.stop_reason.value == "end_of_message"
    assert [(c["tool_name"], c["arguments"]) for c in reply["tool_calls"]] == \
        [(meta.tool_calls[0].tool_name.value, meta.tool_calls[0].arguments)] == \
        [("brave_search", {"query": "weather in Menlo Park"})]
    assert reply["content"] == meta.content == ""


def test_a_tool_call_shows_as_one_json_line_and_slash_tool_answers_it_as_meta_encodes_it(tiny, capsys):
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    llama, ids = scripted(tiny, CALL + "<|eom_id|>")
    answer = llama.tokenizer.encode("It is sunny.<|eot_id|>", bos=False, eos=False, allowed_special="all")
    llama.decoder = Scripted(ids + answer, tiny.model.args.vocab_size)
    conv = Conversation(llama, max_gen_len=32, temperature=0)
    try:
        chat.show(conv, "Weather in Menlo Park?", "user")
        out = capsys.readouterr().out.splitlines()
        assert out[-1].startswith("tool call: ") and json.loads(out[-1][len("tool call: "):])["tool_name"] == \
            "brave_search"
        assert conv.last["stop_reason"] == "end_of_message"
        llama.decoder.at = len(ids)  # the script goes on with the answer after the tool's
        chat.show(conv, '{"temperature": "20 C", "sky": "clear"}', "ipython")
        assert capsys.readouterr().out == "It is sunny.\n"
        assert [m["role"] for m in conv.messages] == ["user", "assistant", "ipython", "assistant"]
        # the call (<|python_tag|> ... <|eom_id|>) and the tool's answer, as Meta writes them
        want = meta_ids(MetaChatFormat(MetaTokenizer.get_instance()), conv.messages[:3])
        assert conv.cached[:len(want)] == want
    finally:
        conv.close()


@pytest.mark.slow
def test_tools_on_a_model_without_llama3s_format_is_a_one_line_error():
    r = subprocess.run([sys.executable, "chat.py", "--tools", "brave_search", "--device", "cpu"], input="Hi\n",
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --tools writes Llama 3's tool prompt, and ") and "Traceback" not in r.stderr
