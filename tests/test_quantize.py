"""quantize.py: every kernel path equals dequantize-then-matmul; llama.cpp's 4-bit blocks read as int4
equal gguf's own dequantizer; quantized models load tensor by tensor, equal their dequantized weights
and stay near full precision; perplexity (eval) equals HF transformers' on the same weights."""

import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from gguf import GGMLQuantizationType as Q

from variants import compiled
from variants import quantize
from conftest import make_checkpoint, random_kquant_blocks, write_gguf
from formats import gguf_int4, save_hf
from eval import perplexity
from llama31 import Llama, load_checkpoint, load_model
from variants.quantize import Int4Linear, Int8Embedding, Int8Linear, int4_groups, int8_rows

REPO = Path(__file__).resolve().parents[1]
# fp32 activations: the kernels agree with a dense product to rounding; bf16: to bf16's 8 bits
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def close(a, b, dtype):
    """Relative to the output's scale, as a product of K terms rounds."""
    return (a.float() - b.float()).abs().max().item() <= TOL[dtype] * b.float().abs().max().item()


# -----------------------------------------------------------------------------
# the formats, by hand


def test_int8_rows_are_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.1, 3, 64)[:, None]
    v = int8_rows(w)
    assert v.q.dtype == torch.int8 and v.scales.shape == (64,)
    assert ((v.dequantize() - w).abs() <= v.scales[:, None] / 2 + 1e-6).all()
    assert torch.allclose(v.q.abs().amax(1).float(), torch.full((64,), 127.0))  # the largest |w| maps to 127


def test_int4_groups_are_within_half_a_step_and_exact_on_their_own_grid():
    w = torch.randn(32, 128)
    v = int4_groups(w, 32)
    assert v.q.max() <= 15 and v.scales.shape == (32, 4)
    step = v.scales.repeat_interleave(32, dim=1)
    assert ((v.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    again = int4_groups(v.dequantize(), 32)  # values already on a 16-level grid come back the same
    assert torch.equal(again.q, v.q) and torch.allclose(again.dequantize(), v.dequantize(), atol=1e-6)


def test_a_group_size_that_does_not_divide_the_inputs_is_a_clear_error():
    with pytest.raises(ValueError, match="group size 128 does not divide a layer's 96 inputs; .*32"):
        int4_groups(torch.randn(16, 96), 128)
    with pytest.raises(ValueError, match="unknown quantize 'int3'"):
        quantize.check_mode("int3", 32)
    with pytest.raises(ValueError, match="group size 48 is not one of 32, 64, 128"):
        quantize.check_mode("int4", 48)


def test_quantizing_a_few_rows_at_a_time_equals_quantizing_the_whole(monkeypatch):
    monkeypatch.setattr(quantize, "ROWS_AT_ONCE", 7)
    w = torch.randn(30, 64)
    for whole, parts in [(int8_rows(w), quantize.by_rows(w, int8_rows)),
                         (int4_groups(w, 32), quantize.by_rows(w, lambda r: int4_groups(r, 32)))]:
        assert all(torch.equal(a, b) for a, b in zip(vars(whole).values(), vars(parts).values()))

    class Rows:  # a lazy tensor that can read rows alone, as formats.Lazy does for GGUF and HF files
        shape, asked = w.shape, []

        def read_rows(self, lo, hi):
            self.asked.append((lo, hi))
            return w[lo:hi]

    lazy = Rows()
    assert torch.equal(quantize.by_rows(lazy, int8_rows).q, int8_rows(w).q)
    assert lazy.asked == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)]


# -----------------------------------------------------------------------------
# the modules: each kernel path against dequantize-then-matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [True, False], ids=["aten-cpu", "cast-and-scale"])
def test_int8_linear_equals_dequantize_then_matmul(dtype, kernel):
    torch.manual_seed(0)
    w, x = torch.randn(48, 80), torch.randn(2, 5, 80, dtype=dtype)
    v = int8_rows(w)
    want = x.float() @ v.dequantize().T
    assert close(quantize.int8_matmul(x, v.q, v.scales.to(dtype), kernel), want, dtype)
    module = Int8Linear(80, 48, dtype)
    module.load_state_dict(Int8Linear.buffers_for(w, "cpu", dtype), assign=True)
    assert module(x).shape == (2, 5, 48) and close(module(x), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, layout", [(48, "cpu"), (48, "plain"), (40, "plain")])
def test_int4_linear_equals_dequantize_then_matmul(dtype, out_features, layout):
    torch.manual_seed(0)
    w, x = torch.randn(out_features, 128), torch.randn(3, 128, dtype=dtype)
    v = int4_groups(w, 32)
    module = Int4Linear(128, out_features, 32, dtype, layout=layout)
    module.load_state_dict(Int4Linear.buffers_for(v, 32, layout, "cpu", dtype), assign=True)
    want = x.float() @ Int4_values_in(dtype, v).T
    assert close(module(x), want, dtype)
    if layout == "plain":
        assert torch.allclose(module.dequantize(), Int4_values_in(dtype, v))
    assert Int4Linear.layout_for("cpu", 128, out_features) == ("cpu" if out_features % 16 == 0 else "plain")


# aten packs CPU int4 differently on each CPU capability; fixtures from an AVX-512 machine (torch
# 2.13.0, natively and under ATEN_CPU_CAPABILITY=avx2 / default) hold known values and their packing
FIXTURES = Path(__file__).parent / "fixtures"
CAPABILITIES = ["AVX512", "AVX2", "DEFAULT"]


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_capabilitys_int4_packing_unpacks_to_its_values_whole_and_by_blocks(capability):
    saved = torch.load(FIXTURES / f"int4pack_cpu_{capability.lower()}.pt")
    assert saved["capability"] == capability and len(saved["cases"]) == 10
    layout = quantize.CPU_INT4_LAYOUTS[capability]
    for shape, case in saved["cases"].items():
        q, packed, in_features = case["q"], case["packed"], int(shape.split("x")[1])
        assert torch.equal(quantize.unpack_int4_cpu(packed, in_features, layout), q), shape
        for lo, hi in [(0, 16), (16, 48), (40, 64), (64, q.shape[0])]:  # any rows: their blocks, cut
            if hi <= q.shape[0]:
                assert torch.equal(quantize.cpu_int4_values(packed, in_features, 32, lo, hi, layout), q[lo:hi])


def test_no_capabilitys_int4_layout_reads_another_capabilitys_packing():
    # the fixtures tell the layouts apart: a wrong guess cannot pass the probe by chance
    for capability in CAPABILITIES:
        case = torch.load(FIXTURES / f"int4pack_cpu_{capability.lower()}.pt")["cases"]["144x128"]
        for other in set(CAPABILITIES) - {capability}:
            layout = quantize.CPU_INT4_LAYOUTS[other]
            assert not torch.equal(quantize.unpack_int4_cpu(case["packed"], 128, layout), case["q"])


def test_this_machines_int4_layout_is_its_capabilitys():
    capability = torch.backends.cpu.get_cpu_capability()
    layout = quantize.cpu_int4_layout(capability)
    assert layout == quantize.CPU_INT4_LAYOUTS.get(capability, quantize.CPU_INT4_LAYOUTS["DEFAULT"]), capability


@pytest.mark.parametrize("out_features", [16, 48, 64, 80, 112, 176])
def test_the_cpu_int4_layout_dequantizes_to_its_values_whole_and_by_rows(out_features):
    torch.manual_seed(0)
    v = int4_groups(torch.randn(out_features, 96), 32)
    module = Int4Linear(96, out_features, 32, torch.float32, layout="cpu")
    module.load_state_dict(Int4Linear.buffers_for(v, 32, "cpu", "cpu", torch.float32), assign=True)
    assert torch.equal(module.dequantize(), Int4_values_in(torch.float32, v))
    for step in (16, 32, 48, 64):
        rows = torch.cat([module.dequantize(lo, lo + step) for lo in range(0, out_features, step)])
        assert torch.equal(rows, module.dequantize())
    # the kernel on an identity matrix (the layout-free route) reads the same matrix
    through_kernel = module(torch.eye(96)).T
    assert (through_kernel - module.dequantize()).abs().max() <= 1e-6 * module.dequantize().abs().max()


def test_an_unknown_int4_layout_is_read_back_through_the_kernel_with_one_note(monkeypatch, capsys):
    # as if this torch packed in none of the known layouts: never a wrong number, one note
    wrong = quantize.CpuInt4Layout(8, True)
    monkeypatch.setattr(quantize, "CPU_INT4_LAYOUTS", {k: wrong for k in quantize.CPU_INT4_LAYOUTS})
    monkeypatch.setattr(quantize, "CPU_INT4_GUESSES", ())
    quantize.cpu_int4_layout.cache_clear()
    try:
        torch.manual_seed(0)
        v = int4_groups(torch.randn(112, 128), 32)
        modules = []
        for _ in range(2):
            module = Int4Linear(128, 112, 32, torch.float32, layout="cpu")
            module.load_state_dict(Int4Linear.buffers_for(v, 32, "cpu", "cpu", torch.float32), assign=True)
            modules.append(module)
        assert modules[0].cpu_layout is None
        assert torch.equal(modules[0].dequantize(), Int4_values_in(torch.float32, v))
        assert torch.equal(modules[1].dequantize(40, 100), Int4_values_in(torch.float32, v)[40:100])
        x = torch.randn(2, quantize.FEW_ROWS, 128)  # fp32, many rows: by blocks
        assert close(modules[0](x), x @ Int4_values_in(torch.float32, v).T, torch.float32)
        notes = capsys.readouterr().err.splitlines()
        assert len(notes) == 1 and notes[0].startswith("note: this torch")
        assert "read back through aten's own" in notes[0]
    finally:
        quantize.cpu_int4_layout.cache_clear()


def test_int8_rows_dequantize_by_range():
    module = Int8Linear(64, 48, torch.float32)
    module.load_state_dict(Int8Linear.buffers_for(torch.randn(48, 64), "cpu", torch.float32), assign=True)
    assert torch.equal(torch.cat([module.dequantize(0, 20), module.dequantize(20, 48)]), module.dequantize())


@pytest.mark.parametrize("mode", ["int8", "int4-cpu", "int4-plain"])
def test_fp32_products_of_many_rows_dequantize_by_blocks_and_equal_the_dense_product(mode, monkeypatch):
    # aten's CPU kernels are slow for many fp32 rows; blocks of 32 rows of W here (4096 in use)
    monkeypatch.setattr(quantize, "ROWS_AT_ONCE", 32)
    calls = []
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: calls.append(a))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a))
    torch.manual_seed(0)
    w, x = torch.randn(80, 128), torch.randn(2, quantize.FEW_ROWS, 128)
    if mode == "int8":
        module = Int8Linear(128, 80, torch.float32)
        module.load_state_dict(Int8Linear.buffers_for(w, "cpu", torch.float32), assign=True)
    else:
        layout = mode.split("-")[1]
        module = Int4Linear(128, 80, 32, torch.float32, layout=layout)
        module.load_state_dict(Int4Linear.buffers_for(w, 32, layout, "cpu", torch.float32), assign=True)
    out = module(x)
    assert not calls and out.shape == (2, quantize.FEW_ROWS, 80)
    assert close(out, x @ module.dequantize().T, torch.float32)


def Int4_values_in(dtype, v):
    """The matrix as the kernels see it: scales and zeros rounded to the activations' dtype."""
    return quantize.Int4Values(v.q, v.scales.to(dtype), v.zeros.to(dtype)).dequantize()


def test_int8_embedding_gathers_the_dequantized_rows():
    w = torch.randn(100, 24)
    emb = Int8Embedding(100, 24, torch.float32)
    emb.load_state_dict(Int8Embedding.buffers_for(w, "cpu", torch.float32), assign=True)
    tokens = torch.tensor([[3, 99, 3, 0]])
    assert torch.allclose(emb(tokens), int8_rows(w).dequantize()[tokens])


# -----------------------------------------------------------------------------
# llama.cpp's 4-bit blocks, read as int4 without going through full precision


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_gguf_4bit_blocks_are_int4_values_equal_to_ggufs_dequantizer(kind, tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = 16, 512
    if kind == Q.Q4_K:
        data = random_kquant_blocks(rng, rows, cols, kind)
    else:
        data = gguf.quants.quantize(rng.normal(0, 1, (rows, cols)).astype(np.float32), kind)
    write_gguf(tmp_path / "t.gguf", tensors=[("blk.0.attn_q.weight", data, kind)])
    (tensor,) = gguf.GGUFReader(tmp_path / "t.gguf").tensors
    want = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols))
    values = gguf_int4(tensor)
    assert values.group_size == 32 and values.q.max() <= 15
    assert torch.allclose(values.dequantize(), want, rtol=0, atol=1e-6 * want.abs().max().item())


# -----------------------------------------------------------------------------
# whole models


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("q")
    make_checkpoint(path, seed=3, dtype=torch.float32, dim=128, n_layers=2, n_heads=4, n_kv_heads=2)
    return path


TOKENS = torch.tensor([[128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 1404]])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_equals_a_dense_model_of_its_dequantized_weights(tiny_ckpt, mode):
    q = load_checkpoint(tiny_ckpt, max_seq_len=64, device="cpu", dtype="fp32", quantize=mode).model
    dense = load_model(tiny_ckpt, 64, device="cpu", dtype="fp32")
    full = dense.forward_inference(TOKENS)
    for name, module in dense.named_modules():  # the same weights, dequantized by hand
        if isinstance(module, torch.nn.Linear) and name != "output":
            v = int8_rows(module.weight) if mode == "int8" else int4_groups(module.weight, 32)
            module.weight.data = v.dequantize()
    dense.output.weight.data = int8_rows(dense.output.weight).dequantize()
    dense.tok_embeddings.weight.data = int8_rows(dense.tok_embeddings.weight).dequantize()
    ours, want = q.forward_inference(TOKENS), dense.forward_inference(TOKENS)
    assert (ours - want).abs().max().item() < 1e-4
    assert 0 < (ours - full).abs().max().item() < {"int8": 0.05, "int4": 0.5}[mode] * full.abs().max().item()
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"Int8Linear", "Int8Embedding"} <= kinds and ("Int4Linear" in kinds) == (mode == "int4")
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())


def test_int_products_in_an_fp32_model_on_cpu_say_their_decoding_rows_are_bf16(tiny_ckpt, capsys):
    for mode in ("int4", "int8"):
        load_checkpoint(tiny_ckpt, max_seq_len=64, device="cpu", dtype="fp32", quantize=mode)
        assert "products take their decoding rows in bf16" in capsys.readouterr().err
    load_checkpoint(tiny_ckpt, max_seq_len=64, device="cpu", quantize="int4")  # bf16 throughout: no note
    assert "bf16" not in capsys.readouterr().err


def test_an_fp32_models_decoding_rows_go_through_the_kernels_in_bf16(tiny_ckpt):
    # a few rows without a gradient: rounded to bf16 for aten's kernel, the product back in fp32,
    # equal to the dense product of the rounded rows; with a gradient (training) or many rows
    # (a prompt) the rows stay fp32
    v = quantize.Int4Values(torch.randint(0, 16, (64, 96), dtype=torch.uint8), torch.rand(64, 3) + 0.5,
                            torch.randn(64, 3))
    int4 = Int4Linear(96, 64, 32, torch.float32, layout="cpu")
    int4.load_state_dict(Int4Linear.buffers_for(v, 32, "cpu", "cpu", torch.float32), assign=True)
    int8 = Int8Linear(96, 64, torch.float32)
    int8.load_state_dict(Int8Linear.buffers_for(torch.randn(64, 96), "cpu", torch.float32), assign=True)
    for module in (int4, int8):
        w = module.dequantize()
        x = torch.randn(2, 96)
        with torch.no_grad():
            out = module(x)
        rounded = x.bfloat16().float() @ w.T  # bf16 rows, scales and product: within bf16's 8 bits
        assert out.dtype == torch.float32 and not torch.equal(out, x @ w.T)
        assert (out - rounded).abs().max() <= 1e-2 * rounded.abs().max()
        assert close(module(x), x @ w.T, torch.float32)  # grad enabled: fp32 rows
        many = torch.randn(quantize.FEW_ROWS, 96)
        with torch.no_grad():
            assert close(module(many), many @ w.T, torch.float32)


def test_a_quantized_model_defaults_to_bf16_activations_on_cpu(tiny_ckpt):
    q = Llama.build(tiny_ckpt, max_seq_len=64, device="cpu", quantize="int8")
    assert q.model.norm.weight.dtype == torch.bfloat16
    assert q.text_completion(["Hello"], max_gen_len=4, temperature=0)  # generation runs


@pytest.mark.slow
def test_a_compiled_int4_linear_equals_eager_and_the_values_with_few_and_many_rows():
    torch.manual_seed(0)
    v = int4_groups(torch.randn(512, 256), 32)
    module = Int4Linear(256, 512, 32, torch.float32, layout="cpu")
    module.load_state_dict(Int4Linear.buffers_for(v, 32, "cpu", "cpu", torch.float32), assign=True)
    compiled_module = torch.compile(module)
    for rows in (4, 12):  # 4: aten's kernel; 12 fp32 rows: W dequantized by blocks
        x = torch.randn(rows, 256)
        want = x @ Int4_values_in(torch.float32, v).T
        assert close(module(x), want, torch.float32) and close(compiled_module(x), want, torch.float32), rows


@pytest.mark.slow
def test_compiled_quantized_model_equals_eager(tiny_ckpt):
    q = load_checkpoint(tiny_ckpt, max_seq_len=64, device="cpu", dtype="fp32", quantize="int4")
    eager = q.model.forward_inference(TOKENS)
    compiled.compile_inference(q)
    assert close(q.model.forward_inference(TOKENS), eager, torch.float32)


@pytest.fixture(scope="module")
def demo(smollm_path):
    kept = Llama.build(smollm_path, max_seq_len=256, max_batch_size=1, device="cpu")  # bf16, the default
    full = Llama.build(smollm_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32", quantize="none")
    return kept, full


@pytest.mark.slow
def test_the_demo_gguf_stays_quantized_on_its_own_grid(demo):
    kept, full = demo
    layers = [m for m in kept.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 120 and all(m.layout == "cpu" for m in layers)  # 4 products a block (fused.py)
    saved = [k for k in kept.model.state_dict() if k.endswith(".scales_and_zeros")]
    assert len(saved) == 210  # every Q4_1 matrix, as int4, under Meta's 7 names a block
    assert isinstance(kept.model.output, Int8Linear)  # Q8_0, tied: the embedding shares its int8 matrix
    assert kept.model.tok_embeddings.weight is kept.model.output.weight
    x = torch.tensor([kept.tokenizer.encode("The capital of France is Paris, and of Italy", bos=False, eos=False)])
    a, b = kept.model.forward_inference(x), full.model.forward_inference(x)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()


@pytest.mark.slow
def test_the_kept_gguf_in_fp32_gives_the_dequantized_models_greedy_tokens(demo, smollm_path):
    # fp32 prefill dequantizes the int4 matrices by blocks (the CPU layout read back), decode runs
    # aten's kernel; on a prompt where the kept file in bf16 agrees with full precision, both agree
    kept_bf16, full = demo
    kept_fp32 = Llama.build(smollm_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32")
    assert {type(m).__name__ for m in kept_fp32.model.modules()} >= {"Int4Linear", "Int8Linear"}
    dialog = [{"role": "user", "content": "What is the capital of Germany?"}]
    prompt = full.chat_format.encode_dialog(full.tokenizer, dialog)
    greedy = [llama.generate([prompt], 16, temperature=0)[0] for llama in (kept_bf16, kept_fp32, full)]
    assert greedy[0] == greedy[2] and "Berlin" in full.tokenizer.decode(greedy[2])
    assert greedy[1] == greedy[2]


@pytest.mark.slow
def test_perplexity_of_the_kept_gguf_is_within_one_percent_of_dequantized(demo):
    kept, full = demo
    text = (REPO / "data" / "sample.txt").read_text().split("\n\n")[:4]
    tokens = torch.tensor([t for d in text for t in kept.tokenizer.encode(d, bos=False, eos=False)])
    (p_kept, n), (p_full, _) = perplexity(kept.model, tokens, 128), perplexity(full.model, tokens, 128)
    assert n == len(tokens) - math.ceil(len(tokens) / 128) and abs(p_kept / p_full - 1) < 0.01


def test_a_tiny_gguf_keeps_each_type_in_its_nearest_format(tiny_gguf):
    # Q4_0/Q4_1/Q4_K -> int4 (exact), Q8_0/Q5_0/Q5_1/Q6_K -> int8, F16/BF16 -> dense
    kept = load_checkpoint(tiny_gguf, max_seq_len=64, device="cpu", dtype="fp32").model
    full = load_checkpoint(tiny_gguf, max_seq_len=64, device="cpu", dtype="fp32", quantize="none").model
    attn, ffn = kept.layers[0].attention, kept.layers[0].feed_forward
    assert [type(m).__name__ for m in (attn.wq, attn.wk, attn.wv, attn.wo)] == \
        ["Linear", "Int8Linear", "Int4Linear", "Int4Linear"]
    assert [type(m).__name__ for m in (ffn.w1, ffn.w2, ffn.w3)] == ["Int8Linear", "Int4Linear", "Int8Linear"]
    assert isinstance(kept.tok_embeddings, torch.nn.Embedding)  # F16: dense
    x = torch.tensor([[5, 200, 17, 99, 3, 250, 42]])
    a, b = kept.forward_inference(x), full.forward_inference(x)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()


# -----------------------------------------------------------------------------
# eval: perplexity, against HF transformers on the same weights


@pytest.mark.slow
def test_eval_cli_perplexity_equals_hf_transformers(tmp_path):
    model = make_checkpoint(tmp_path / "meta", seed=4, dtype=torch.float32, dim=128, n_layers=2, n_heads=4,
                            n_kv_heads=2)
    save_hf(model.state_dict(), model.args.to_params(), tmp_path / "hf", dtype=torch.float32)
    (tmp_path / "t.txt").write_text("The cat sat on the mat.\n\nA second story, with more words in it, "
                                    "about a dog and a ball.\n\nThird: the end.\n")
    r = subprocess.run([sys.executable, "eval.py", "--ckpt_dir", str(tmp_path / "meta"), "--data",
                        str(tmp_path / "t.txt"), "--T", "16", "--device", "cpu", "--dtype", "fp32"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1].split()
    assert last[0] == "perplexity" and last[2:4] == ["over", last[3]] and last[4] == "tokens"
    ours, n = float(last[1]), int(last[3])
    # HF's loss over the same windows: BOS + document, documents one after another, windows of 16
    from tokenizer import Tokenizer, find_tokenizer_model
    tok = Tokenizer(find_tokenizer_model())
    docs = (tmp_path / "t.txt").read_text().split("\n\n")
    ids = torch.tensor([t for d in docs if d.strip() for t in tok.encode(d.strip(), bos=True, eos=False)])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            w = ids[start:start + 16][None]
            if w.shape[1] < 2:
                break
            logits = hf(w[:, :-1]).logits[0]
            total += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    assert n == count and abs(ours / math.exp(total / count) - 1) < 1e-4


@pytest.mark.slow
def test_eval_cli_bad_group_size_is_one_line():
    r = subprocess.run([sys.executable, "eval.py", "--quantize", "int4", "--group_size", "128"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: int4 group size 128 does not divide a layer's 576")
