"""tokenizer.py: the Llama 3 tokenizer (known ids, round trips, special tokens, very long inputs, the
same ids as Meta's Tokenizer), GGUF vocabularies (against HF's tokenizers), and chat formats
(against llama-models' ChatFormat and the GGUF's own Jinja template)."""

import hashlib

import pytest
from gguf import TokenType

from conftest import write_gguf
from formats import open_gguf
from tokenizer import (MAX_NO_WHITESPACES_CHARS, ChatFormat, Tokenizer, bytes_to_unicode, find_tokenizer_model,
                       load_bpe_ranks, split_long_runs)

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


# -----------------------------------------------------------------------------
# tokenizer: ours against Meta's Tokenizer class on the same tokenizer.model

META_CORPUS = [
    "Hello, world! It's a test; we'll see what's what.",
    "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A(B):\n    pass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 1234567; }\r\n",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 🙂👍🏽👨‍👩‍👧‍👦🇫🇷 and ❤️‍🔥, mixed with Ελληνικά, русский, עברית, العربية, हिन्दी.",
    " " * 50 + "x" + "\t" * 20 + "\n" * 30 + "  \n \n\t \r\n y",
    " " * 30_000 + "z",  # longer than the 25k-character runs both tokenizers cut
    "a" * 30_000 + " b",
    "<|begin_of_text|>text<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eom_id|>",
    "<|reserved_special_token_250|> <|python_tag|><|image|> <|not_a_token|> < |eot_id| > <|eot_id",
    "1234567890 3.14159 1e-5 0x1F ١٢٣ 一二三",
    "",
]


@pytest.fixture(scope="module")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(find_tokenizer_model())


@pytest.mark.parametrize("allowed_special", [None, "all"])
def test_tokenizer_ids_match_meta_on_mixed_script_corpus(tokenizer, meta_tokenizer, allowed_special):
    kw = {} if allowed_special is None else {"allowed_special": allowed_special}
    for text in META_CORPUS:
        assert tokenizer.encode(text, bos=True, eos=True, **kw) == \
            meta_tokenizer.encode(text, bos=True, eos=True, **kw), text[:40]


def test_special_token_look_alikes_are_text_unless_allowed(tokenizer):
    # guards the corpus above: both modes really differ on it
    text = META_CORPUS[8]
    assert tokenizer.eot_id not in tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.eot_id in tokenizer.encode(text, bos=False, eos=False, allowed_special="all")


# -----------------------------------------------------------------------------
# GGUF vocabularies: SmolLM2's against HF's reading of the same file; Llama 3's against tokenizer.model

# Mixed scripts, digits after runs of whitespace, contractions, code, emoji, special-token text
CORPUS = [
    "The capital of France is Paris.",
    "  1234 apples,   56 pears\n\n\t  7. Total: $1,290.55 (2024-11-23T04:08Z)",
    "Ceci n'est pas une pipe — c'est ça! Übermäßig große Straße.",
    "Привет, мир! Как дела? Ελληνικά κείμενα.",
    "日本語のテキストと中文混合。한국어 문장도 있어요.",
    "emoji 🙂🚀👩‍👩‍👧 and symbols ∑∞≠ ← →",
    "def f(x):\n    return x**2  # square   \n\n\nclass A:\n\tpass\r\n",
    "I'm you're he'll she'd THEY'RE we've",
    "١٢٣ ٤٥ arabic-indic digits, and ½ ² Ⅻ",
    "   leading and trailing   ",
    "x=1e-10; y=0x1F; z = [1,2,3]",
]
# Text that spells special tokens: plain text by default, the special tokens when allowed
SPECIAL_TEXT = "<|im_start|>user\nHello<|im_end|>\n<|begin_of_text|><|eot_id|><|endoftext|>"


@pytest.fixture(scope="session")
def smollm_chat_format(smollm_path):
    return ChatFormat.from_template(open_gguf(smollm_path)[1]["tokenizer.chat_template"])


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def smollm_reference_pretokenizer(hf_tokenizer):
    """transformers does not know llama.cpp's "smollm" pre-tokenizer and falls back to GPT-2's split.
    SmolLM2's own tokenizer.json (and llama.cpp) first isolate every digit; give HF that."""
    from tokenizers import pre_tokenizers

    hf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return hf_tokenizer


@pytest.mark.slow
def test_smollm_tokenizer_matches_hf_on_mixed_scripts(smollm_tokenizer, hf_smollm_tokenizer):
    hf = smollm_reference_pretokenizer(hf_smollm_tokenizer)
    for text in CORPUS:
        ids = smollm_tokenizer.encode(text, bos=False, eos=False)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert smollm_tokenizer.decode(ids) == text


def test_smollm_special_tokens_match_hf_when_allowed(smollm_tokenizer, hf_smollm_tokenizer):
    hf = smollm_reference_pretokenizer(hf_smollm_tokenizer)
    ids = smollm_tokenizer.encode(SPECIAL_TEXT, bos=False, eos=False, allowed_special="all")
    assert ids == hf.encode(SPECIAL_TEXT)
    assert smollm_tokenizer.bos_id == hf.bos_token_id and smollm_tokenizer.eos_id == hf.eos_token_id
    assert not smollm_tokenizer.add_bos  # SmolLM2 adds no BOS to plain text


@pytest.fixture(scope="session")
def llama3_gguf_tokenizer(tokenizer, tmp_path_factory):
    """Meta's tokenizer.model written as llama.cpp writes a Llama 3 vocabulary: tokens spelled in
    GPT-2's byte alphabet, the 256 specials as control tokens, and the merges that HF's converter
    derives (every split of a token into two tokens, in the order of the merged token's rank)."""
    ranks = load_bpe_ranks(find_tokenizer_model())
    spelling = bytes_to_unicode()
    by_rank = sorted(ranks, key=ranks.get)
    spell = {b: "".join(spelling[x] for x in b) for b in by_rank}
    merges = [f"{spell[b[:i]]} {spell[b[i:]]}" for b in by_rank for i in range(1, len(b))
              if b[:i] in ranks and b[i:] in ranks]
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    tokens = [spell[b] for b in by_rank] + specials
    types = [TokenType.NORMAL] * len(by_rank) + [TokenType.CONTROL] * len(specials)
    path = tmp_path_factory.mktemp("llama3") / "llama3-vocab.gguf"
    vocab = (tokens, types, merges, {"pre": "llama-bpe", "bos": tokenizer.bos_id, "eos": tokenizer.eos_id})
    write_gguf(path, vocab=vocab)
    _, meta = open_gguf(path)
    return Tokenizer.from_gguf(meta, path.name)


@pytest.mark.slow
def test_llama3_gguf_tokenizer_matches_tokenizer_model(llama3_gguf_tokenizer, tokenizer):
    for text in CORPUS + [SPECIAL_TEXT]:
        for allowed in (frozenset(), "all"):
            a = llama3_gguf_tokenizer.encode(text, bos=True, eos=True, allowed_special=allowed)
            assert a == tokenizer.encode(text, bos=True, eos=True, allowed_special=allowed), text
    assert llama3_gguf_tokenizer.special_tokens == tokenizer.special_tokens
    assert llama3_gguf_tokenizer.stop_tokens == tokenizer.stop_tokens
    assert llama3_gguf_tokenizer.add_bos


# -----------------------------------------------------------------------------
# chat formats


@pytest.mark.slow
def test_chatml_dialog_matches_hf_chat_template(smollm_tokenizer, smollm_chat_format, hf_smollm_tokenizer):
    # transformers renders the GGUF's own Jinja template, default system message included
    dialog = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And 3+3?"}]
    ours = smollm_chat_format.encode_dialog(smollm_tokenizer, dialog)
    ref = hf_smollm_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ours == list(ref)
    assert smollm_chat_format.style == "chatml"


def test_llama3_dialog_matches_llama_models_chat_format(tokenizer):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    dialog = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another? <|eot_id|>"}]
    ref = MetaChatFormat(MetaTokenizer.get_instance()).encode_dialog_prompt([RawMessage(**m) for m in dialog])
    assert ChatFormat("llama3").encode_dialog(tokenizer, dialog) == ref.tokens


def test_chat_template_detection():
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    assert ChatFormat.from_template(llama3) == ChatFormat("llama3")
    assert ChatFormat.from_template("{{ '<|im_start|>' + message['role'] }}") == ChatFormat("chatml")
    assert ChatFormat.from_template("[INST] {{ message }} [/INST]") is None
