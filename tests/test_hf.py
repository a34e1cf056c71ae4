"""HF transformers' layout: save_hf for transformers, HF-made checkpoints into llama31, round trips."""

import json

import pytest
import torch
import transformers

from conftest import make_checkpoint, random_model
from llama31 import load_model, read_meta, save_hf, save_meta

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
    save_hf(model, tmp_path, dtype=torch.float32)
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
    save_hf(model, tmp_path, dtype=torch.float32, max_shard_bytes=40 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (load_model(tmp_path, 64, device="cpu").forward_inference(TOKENS)
            - model.forward_inference(TOKENS)).abs().max().item() == 0.0


def test_meta_to_hf_to_meta_is_bit_exact(tmp_path):
    make_checkpoint(tmp_path / "meta", seed=2)  # bf16, as Meta ships
    save_hf(load_model(tmp_path / "meta", 64, device="cpu", dtype="bf16"), tmp_path / "hf", dtype=torch.bfloat16)
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
    args, _ = read_meta(tmp_path)
    assert args.rope_scale_factor == factor
    args, _ = read_meta(tmp_path, rope_scale_factor=16.0)  # the user's word wins where the file is silent
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


def test_cli_export_writes_an_hf_checkpoint_transformers_reads(tmp_path, ckpt_dir):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "llama31.py", "export", "--ckpt_dir", str(ckpt_dir),
                        "--out_dir", str(tmp_path / "hf"), "--dtype", "fp32"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = load_model(ckpt_dir, 64, device="cpu").forward_inference(TOKENS)
    assert (ours - hf_logits(tmp_path / "hf")).abs().max().item() <= 1e-4


# the text side of an export: what AutoTokenizer makes of the files export writes, against our own
# tiktoken tokenizer (itself checked against Meta's in test_tokenizer / test_parity)
EXPORT_TEXTS = ["The capital of France is", "  leading spaces,\ttabs\n\nand newlines\r\n",
                "numbers 1234567 and 3.14159; code: def f(x): return x**2",
                "Ünïcödé: naïve café, 東京, Привет, مرحبا, 🙂🚀", "'s 're 've don't I'M", ""]


def test_export_hf_writes_a_tokenizer_transformers_loads(tmp_path, ckpt_dir, tokenizer):
    import subprocess
    import sys
    from pathlib import Path

    from llama31 import ChatFormat
    from tokenizer import find_tokenizer_model

    repo, out = Path(__file__).resolve().parents[1], tmp_path / "hf"
    r = subprocess.run([sys.executable, "llama31.py", "export", "--ckpt_dir", str(ckpt_dir),
                        "--out_dir", str(out), "--dtype", "fp32"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
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


def test_export_meta_copies_tokenizer_model_and_hf_copies_the_sources_files(tmp_path, ckpt_dir):
    from llama31 import export
    from tokenizer import find_tokenizer_model

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
    import sys

    from llama31 import save_hf_tokenizer
    from tokenizer import find_tokenizer_model

    monkeypatch.setitem(sys.modules, "transformers.convert_slow_tokenizer", None)  # import fails
    written = save_hf_tokenizer(find_tokenizer_model(), tmp_path)
    assert written == ["generation_config.json"] and not (tmp_path / "tokenizer.json").exists()
    assert "pip install transformers" in capsys.readouterr().err
