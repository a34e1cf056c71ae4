"""The Llama 3 tokenizer: known ids, round trips, special tokens, very long inputs."""

import hashlib

import pytest

from tokenizer import MAX_NO_WHITESPACES_CHARS, find_tokenizer_model, split_long_runs

OFFICIAL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def test_default_tokenizer_is_the_official_file_from_llama_models():
    path = find_tokenizer_model()
    assert path.parts[-3:] == ("llama_models", "llama3", "tokenizer.model")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == OFFICIAL_SHA256


def test_hello_world_has_the_published_ids(tokenizer):
    assert tokenizer.encode("Hello world", bos=True, eos=False) == [128000, 9906, 1917]
    assert tokenizer.encode("Hello world", bos=False, eos=True) == [9906, 1917, 128001]


def test_vocab_is_128000_bpe_plus_256_special(tokenizer):
    assert tokenizer.n_words == 128256
    assert len(tokenizer.special_tokens) == 256
    # llama-models 0.3.0 names 128011 <|image|>, so the reserved names end at 245 (HF's say 247)
    assert tokenizer.special_tokens["<|image|>"] == 128011
    assert tokenizer.special_tokens["<|reserved_special_token_245|>"] == 128255


def test_special_token_ids_follow_metas_order(tokenizer):
    # ids as documented in Meta's Llama 3.1 model card / prompt format page
    assert (tokenizer.bos_id, tokenizer.eos_id) == (128000, 128001)
    assert tokenizer.pad_id == 128004
    assert tokenizer.special_tokens["<|start_header_id|>"] == 128006
    assert tokenizer.special_tokens["<|end_header_id|>"] == 128007
    assert (tokenizer.eom_id, tokenizer.eot_id) == (128008, 128009)
    assert tokenizer.special_tokens["<|python_tag|>"] == 128010
    assert set(tokenizer.stop_tokens) == {128001, 128008, 128009}


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # square\n",
    "日本語のテキストと中文混合, 한국어도.",
    "Emoji 🦙🔥 and accents: naïve café, Ελληνικά, русский, עברית, العربية",
    "   leading and trailing   \n\n\n",
    "",
])
def test_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


def test_special_token_text_is_plain_text_unless_allowed(tokenizer):
    s = "<|eot_id|>"
    plain = tokenizer.encode(s, bos=False, eos=False)
    assert 128009 not in plain and len(plain) > 1
    assert tokenizer.decode(plain) == s
    assert tokenizer.encode(s, bos=False, eos=False, allowed_special="all") == [128009]


def test_split_long_runs_caps_every_run_and_loses_nothing():
    s = "a" * 60_000 + " " * 30_000 + "b c" + "\n" * 26_000
    pieces = list(split_long_runs(s, 25_000))
    assert "".join(pieces) == s
    for piece in pieces:
        run, longest, prev = 0, 0, None
        for ch in piece:
            run = run + 1 if prev is not None and ch.isspace() == prev.isspace() else 1
            longest, prev = max(longest, run), ch
        assert longest <= 25_000


def test_million_character_input_encodes_and_round_trips(tokenizer):
    # one unbroken 600k run (past tiktoken's limits) plus ordinary text with a huge space run
    text = "x" * 600_000 + " " + "hello world " * 35_000 + " " * (MAX_NO_WHITESPACES_CHARS + 5) + "end"
    assert len(text) > 1_000_000
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001
    assert tokenizer.decode(ids[1:-1]) == text
