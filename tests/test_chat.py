"""Conversation and `python chat.py`: each turn answers as chat_completion does on the whole
dialog from scratch, while the KV cache kept between turns means a turn prefills only its new tokens."""

import subprocess
import sys
from pathlib import Path

import pytest

import compiled
from chat import Conversation
from llama31 import Llama

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
    """What a prefill of the whole dialog from scratch answers (greedy)."""
    return llama.chat_completion([dialog], max_gen_len, temperature=0)[0]["content"]


@pytest.mark.slow
def test_piped_chat_cli_answers_each_turn_as_chat_completion_of_the_whole_dialog(ckpt_dir, tiny):
    r = subprocess.run([sys.executable, "chat.py", "--ckpt_dir", str(ckpt_dir), "--temperature", "0",
                        "--max_gen_len", "6", "--max_seq_len", "256", "--device", "cpu"],
                       input="Hello there!\n\nAnd what else?\n", cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr  # end of input leaves cleanly
    first = fresh_answer(tiny, [{"role": "user", "content": "Hello there!"}], 6)
    second = fresh_answer(tiny, [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": "And what else?"}], 6)
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
        dialog = [{"role": "user", "content": "One"}, {"role": "assistant", "content": first},
                  {"role": "user", "content": "Two"}]
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
