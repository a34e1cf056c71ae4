"""The model on every device this machine has (CPU always; CUDA and MPS when present), each against
an independent result on the same device: HF transformers' logits, the whole-sequence forward, each
prompt alone, each document alone, dequantize-then-matmul. Bounds per device and dtype below."""

import pytest
import torch

import bench
from variants import compiled
from variants import quantize
from conftest import random_model
from llama31 import Llama, document_mask

VOCAB, BOS = 1024, 1000  # a small vocabulary keeps every device's run short
DTYPES = [torch.float32, torch.bfloat16]


def tolerance(device: torch.device, dtype: torch.dtype, scale: float) -> float:
    """fp32: kernels differ in summation order only (CPU and CUDA; CUDA's TF32 is off for matmuls by
    torch's default); MPS's fp32 kernels are looser. bf16: every activation is rounded to 8 bits of
    mantissa: 3% of the largest logit (measured on CPU against HF: 0.5%)."""
    if dtype == torch.bfloat16:
        return 0.03 * scale
    return 1e-3 if device.type == "mps" else 1e-4


def model_on(device, dtype):
    return random_model(max_seq_len=64, vocab_size=VOCAB).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_logits_match_hf_on_the_device(device, dtype):
    model = model_on(device, dtype)
    hf = bench.build_hf(model).eval()  # its own copy of the weights, converted as save_hf converts them
    x = torch.randint(0, VOCAB, (2, 24), device=device)
    ours = model.forward_inference(x)
    with torch.no_grad():
        theirs = hf(x).logits.float()
    assert (ours - theirs).abs().max().item() <= tolerance(device, dtype, theirs.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_cached_decoding_matches_the_whole_sequence_forward(device, dtype):
    model = model_on(device, dtype)
    x = torch.randint(0, VOCAB, (2, 16), device=device)
    whole = model.forward_inference(x)
    model.setup_caches(2, 64)
    try:
        steps = [model.forward_inference(x[:, :6], 0)]
        steps += [model.forward_inference(x[:, p:p + 1], p) for p in range(6, 16)]
        fixed = [compiled.decode_step(model, x[:, p:p + 1], torch.tensor([p], device=device)) for p in range(6, 16)]
    finally:
        model.clear_caches()
    scale = whole.abs().max().item()
    assert (torch.cat(steps, 1) - whole).abs().max().item() <= tolerance(device, dtype, scale)
    assert (torch.stack(fixed, 1) - whole[:, 6:]).abs().max().item() <= tolerance(device, dtype, scale)


class Ids:  # what generation needs of a tokenizer: no stop tokens, so every row runs to the end
    pad_id, stop_tokens = 0, []


def test_a_ragged_batch_decodes_as_each_prompt_alone_and_top_p_is_seeded(device):
    llama = Llama(model_on(device, torch.float32), Ids())
    prompts = [[BOS, 5, 6, 7, 8], [BOS, 9], [BOS, 10, 11]]
    assert llama.generate(prompts, 8, temperature=0) == [llama.generate([p], 8, temperature=0)[0] for p in prompts]

    def sample(seed):
        g = torch.Generator(device).manual_seed(seed)  # on the model's device, as generation requires
        return llama.generate(prompts, 8, temperature=1.0, top_p=0.9, generator=g)

    assert sample(1) == sample(1) and sample(1) != sample(2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_packed_document_scores_as_it_would_alone(device, dtype):
    model = random_model(max_seq_len=64, vocab_size=VOCAB).to(device).eval()  # fp32 weights, bf16 autocast
    doc_a, doc_b = [BOS] + list(range(100, 109)), [BOS] + list(range(200, 212))
    packed = torch.tensor([doc_a + doc_b], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        masked = model.output(model.trunk(packed, 0, document_mask(packed, BOS))).float()[0, len(doc_a):]
        alone = model.output(model.trunk(packed[:, len(doc_a):])).float()[0]
    assert (masked - alone).abs().max().item() <= tolerance(device, dtype, alone.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_quantized_linears_equal_dequantize_then_matmul(device, dtype):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(3, 128, dtype=dtype, device=device)
    int8 = quantize.Int8Linear(128, 64, dtype)
    int8.load_state_dict(quantize.Int8Linear.buffers_for(w, device, dtype), assign=True)
    want8 = x.float() @ quantize.int8_rows(w).dequantize().to(device).T
    v = quantize.int4_groups(w, 32)
    layout = quantize.Int4Linear.layout_for(device.type, 128, 64, dtype)  # CUDA's tinygemm layout in bf16
    int4 = quantize.Int4Linear(128, 64, 32, dtype, layout=layout)
    int4.load_state_dict(quantize.Int4Linear.buffers_for(v, 32, layout, device, dtype), assign=True)
    dequantized = quantize.Int4Values(v.q, v.scales.to(dtype), v.zeros.to(dtype)).dequantize()
    want4 = x.float() @ dequantized.to(device).float().T
    bound = 1e-4 if dtype == torch.float32 else 0.03
    for got, want in [(int8(x), want8), (int4(x), want4)]:
        assert (got.float() - want).abs().max().item() <= bound * max(1.0, want.abs().max().item())
