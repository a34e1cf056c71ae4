"""Layers and the model trunk, each checked against a formula written out independently here."""

import math

import pytest
import torch

from variants import compiled
import llama31
from variants import matvec
from conftest import random_model
from llama31 import (Llama, ModelArgs, RMSNorm, apply_rope, document_mask, precompute_rope, rope_pairs,
                     scale_rope_freqs)
from variants.matvec import Linear, onednn_enabled


def llama31_scaled_freq(freq, factor=8.0, low=1.0, high=4.0, old_len=8192):
    """The Llama 3.1 rule for one frequency, in plain Python floats."""
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
        return freq
    if wavelen > old_len / low:
        return freq / factor
    smooth = (old_len / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_rope_scaling_matches_the_published_rule(factor):
    head_dim, theta = 128, 500000.0
    freqs = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    got = scale_rope_freqs(torch.tensor(freqs, dtype=torch.float64), factor, 1.0, 4.0, 8192)
    want = [llama31_scaled_freq(f, factor) for f in freqs]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # the rule leaves high frequencies alone and divides the lowest by the factor
    assert got[0].item() == freqs[0] and got[-1].item() == pytest.approx(freqs[-1] / factor)


def test_rope_tables_hold_the_scaled_angle_at_each_position():
    args = ModelArgs(dim=512, n_heads=4, use_scaled_rope=True)  # head_dim 128, as in Llama 3.1
    cos, sin = precompute_rope(args, 20_000)
    i, pos = 30, 19_999  # a frequency in the smoothed band (wavelength 2048..8192), a position past 8192
    f0 = 1.0 / 500000.0 ** (2 * i / 128)
    assert 2048 < 2 * math.pi / f0 < 8192
    f = llama31_scaled_freq(f0)
    assert cos[pos, i].item() == pytest.approx(math.cos(pos * f), abs=2e-3)
    assert sin[pos, i].item() == pytest.approx(math.sin(pos * f), abs=2e-3)


def test_apply_rope_is_complex_multiplication_of_adjacent_pairs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(5, 4)
    got = apply_rope(x, *rope_pairs(angles.cos(), angles.sin()))
    xc = torch.view_as_complex(x.reshape(2, 5, 3, 4, 2))
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]).flatten(3)
    assert torch.allclose(got, want, atol=1e-6)


def test_rmsnorm_matches_hand_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-5)
    norm.weight.data = torch.arange(1.0, 7.0)
    x = torch.randn(3, 6)
    rms = [math.sqrt(sum(v * v for v in row) / 6 + 1e-5) for row in x.tolist()]
    want = torch.tensor([[v / r * w for v, w in zip(row, range(1, 7))] for row, r in zip(x.tolist(), rms)])
    assert torch.allclose(norm(x), want, atol=1e-6)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dim, mult, multiple_of, want", [
    (4096, 1.3, 1024, 14336),    # Llama 3.1 8B
    (8192, 1.3, 4096, 28672),    # 70B
    (16384, 1.2, 4096, 53248),   # 405B
    (2048, 1.5, 256, 8192),      # Llama 3.2 1B
])
def test_ffn_hidden_size_follows_metas_rule_for_published_models(dim, mult, multiple_of, want):
    args = ModelArgs(dim=dim, n_heads=32, ffn_dim_multiplier=mult, multiple_of=multiple_of)
    assert args.ffn_hidden_dim == want


@pytest.mark.parametrize("rows, pieces", [
    (2, [(0, 7)] + [(p, p + 1) for p in range(7, 24)]),  # a prefill, then one token at a time
    (1, [(0, 5), (5, 13), (13, 20)]),  # a prefill in chunks, each after a cached prefix
], ids=["decode", "chunks"])
def test_kv_cache_pieces_equal_full_forward(rows, pieces):
    model = random_model(max_seq_len=64)
    tokens = torch.randint(0, 128256, (rows, pieces[-1][1]))
    full = model.forward_inference(tokens)
    model.setup_caches(rows, 64)
    try:
        steps = [model.forward_inference(tokens[:, a:b], a) for a, b in pieces]
    finally:
        model.clear_caches()
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = random_model(max_seq_len=64).train()
    tokens = torch.randint(0, 128256, (2, 17))

    runs = []  # the first block's attention starts twice a step when its insides are recomputed
    model.layers[0].attention.register_forward_pre_hook(lambda *_: runs.append(1))

    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        model.checkpoint_activations = checkpointing
        runs.clear()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert len(runs) == (2 if checkpointing else 1)
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    (plain_loss, plain), (ckpt_loss, ckpt) = grads(False), grads(True)
    assert torch.equal(plain_loss, ckpt_loss)
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)


def test_forward_loss_equals_cross_entropy_of_inference_logits():
    model = random_model(max_seq_len=64)
    tokens = torch.randint(0, 128256, (2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :3] = -100  # ignored positions
    logits = model.forward_inference(inputs)
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(16) if targets[b, t] != -100]
    want = torch.stack(picked).mean()
    got = model.forward_loss(inputs, targets)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_positions_past_max_seq_len_are_an_error():
    model = random_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model.forward_inference(torch.zeros(1, 17, dtype=torch.long))


def test_configure_optimizers_decays_matrices_only():
    model = random_model(max_seq_len=16)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # the gains of both norms per layer plus the final norm are the only undecayed tensors
    assert len(no_decay["params"]) == 2 * model.args.n_layers + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_linear_matches_the_matrix_product(dtype):
    # one row takes PyTorch's own matrix-vector kernel (oneDNN off); several rows take the usual one
    torch.manual_seed(0)
    layer = Linear(256, 1000, bias=False).to(dtype)
    x = torch.randn(3, 1, 256).to(dtype)
    want = (x.double() @ layer.weight.double().T).to(dtype)
    with onednn_enabled(True):
        rows = layer(x)
    one = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    assert one.dtype == rows.dtype == dtype and one.shape == rows.shape == (3, 1, 1000)
    assert torch.allclose(one.double(), want.double(), **tol)
    assert torch.allclose(rows.double(), want.double(), **tol)
    assert torch.backends.mkldnn.enabled  # switched back on


def test_one_row_linear_from_many_threads_leaves_onednn_as_it_was():
    # the switch is process-wide: interleaved switch/restore pairs must not leave it off
    user_setting = True
    import threading

    layer = Linear(512, 4096, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 1, 512).to(torch.bfloat16)
    want = layer(x)

    def work(out):
        out.append(all(torch.equal(layer(x), want) for _ in range(100)))

    before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, user_setting
    try:
        results = []
        threads = [threading.Thread(target=work, args=(results,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.backends.mkldnn.enabled == user_setting
    finally:
        torch.backends.mkldnn.enabled = before
    assert results == [True] * 6


@pytest.mark.slow
def test_compiled_inference_matches_eager():
    model = random_model(max_seq_len=64)
    tokens = torch.randint(0, 128256, (2, 16))

    def decode(rows):
        model.setup_caches(rows, 64)
        try:
            steps = [model.forward_inference(tokens[:rows, :4], 0),  # prefill, every position
                     model.forward_inference(tokens[:rows, 4:6], 4, last=1)]  # a chunk after a prefix
            steps += [model.forward_inference(tokens[:rows, p:p + 1], p) for p in range(6, 16)]
        finally:
            model.clear_caches()
        return torch.cat(steps, dim=1)

    class Ids:  # what generate needs of a tokenizer: no stop tokens, so every row runs to the end
        pad_id, stop_tokens = 0, []

    matvec.OneRow().loaded(model)  # a CPU model's one-row products, as a load gives them
    llama = Llama(model, Ids())
    prompts = [tokens[0, :5].tolist(), tokens[1, :9].tolist()]
    eager = [llama.generate([p], 6, temperature=0) for p in prompts] + [decode(1), decode(2)]
    torch._dynamo.reset()  # count graphs from nothing
    compiled.compile_inference(llama, prefill=True)  # as on CUDA; a CPU's default compiles decoding alone
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:  # past the recompile limit torch would quietly run eager; here that is an error
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            results = [llama.generate([prompts[0]], 6, temperature=0)]
            graphs = counters["stats"]["unique_graphs"]  # prefill and decode_step
            results.append(llama.generate([prompts[1]], 6, temperature=0))  # another length: no new graph
            assert counters["stats"]["unique_graphs"] == graphs == 2
            results += [decode(1), decode(2)]  # one row (multiply-and-sum matmuls), then a batch
            seeded = [llama.generate([prompts[0]], 6, temperature=0.1, top_p=0.9,
                                     generator=torch.Generator().manual_seed(3))]
    finally:
        compiled.eager(llama)
    assert seeded == [llama.generate([prompts[0]], 6, temperature=0.1, top_p=0.9,
                                     generator=torch.Generator().manual_seed(3))]
    assert not counters["graph_break"], dict(counters["graph_break"])  # whole graphs, no eager pieces
    assert eager[:2] == results[:2]
    for e, c in zip(eager[2:], results[2:]):
        assert torch.allclose(e, c, atol=1e-4), (e - c).abs().max()


def test_mps_before_torch_2_7_repeats_kv_heads_and_gets_the_same_logits(monkeypatch):
    # SDPA's enable_gqa aborts on MPS in torch 2.5 and 2.6: there the KV heads are repeated instead
    monkeypatch.setattr(llama31, "MPS_SDPA_GQA", False)
    assert not llama31.sdpa_takes_gqa(torch.device("mps")) and llama31.sdpa_takes_gqa(torch.device("cpu"))
    model = random_model(max_seq_len=64)
    assert model.args.n_kv_heads < model.args.n_heads
    tokens = torch.randint(0, 128256, (2, 12))
    native = model.forward_inference(tokens)
    monkeypatch.setattr(llama31, "sdpa_takes_gqa", lambda device: False)  # the MPS path, on this CPU
    assert torch.allclose(model.forward_inference(tokens), native, atol=1e-5)


# -----------------------------------------------------------------------------
# document masking: in a packed sequence a document attends only to itself

BOS = 128000


def test_document_mask_is_causal_within_documents_only():
    tokens = torch.tensor([[BOS, 5, 6, BOS, 7, 8, 9]])
    got = document_mask(tokens, BOS)[0, 0].int().tolist()
    want = [[1 if j <= i and (i < 3) == (j < 3) else 0 for j in range(7)] for i in range(7)]
    assert got == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_document_mask_is_kept_once_for_backward_not_once_per_layer(dtype):
    # SDPA turns a boolean mask into an additive one itself, a new tensor in every layer, each kept
    # for the backward pass: (T, T) per row per layer. trunk makes it once, in autocast's dtype.
    model = random_model(max_seq_len=64)
    assert len(model.layers) > 1
    x = torch.randint(0, 1000, (2, 33))
    x[:, 0] = x[:, 10] = BOS
    inputs, targets = x[:, :-1], x[:, 1:]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model.forward_loss(inputs, targets, mask=document_mask(inputs, BOS))
    masks = {t.untyped_storage().data_ptr() for t in saved if t.shape == (2, 1, 32, 32)}
    assert len(masks) == 1
    (mask,) = [t for t in saved if t.shape == (2, 1, 32, 32)][:1]
    assert mask.dtype == dtype  # what attention computes in, so no layer casts its own copy


def test_packed_document_scores_as_it_would_alone():
    model = random_model(max_seq_len=64)
    torch.manual_seed(1)
    doc_a = [BOS] + torch.randint(0, 128000, (9,)).tolist()
    doc_b = [BOS] + torch.randint(0, 128000, (12,)).tolist()
    packed = torch.tensor([doc_a + doc_b])
    inputs, targets = packed[:, :-1], packed[:, 1:]
    alone = model.forward_inference(torch.tensor([doc_b]))[0]
    with torch.no_grad():
        h = model.trunk(packed, 0, document_mask(packed, BOS))
        masked = model.output(h).float()[0, len(doc_a):]
        unmasked = model.output(model.trunk(packed)).float()[0, len(doc_a):]
    assert torch.allclose(masked, alone, atol=1e-4)
    assert not torch.allclose(unmasked, alone, atol=1e-2)  # without the mask doc B sees doc A
    # and the loss path takes the same mask
    loss_masked = model.forward_loss(inputs, targets, mask=document_mask(inputs, BOS))
    loss_plain = model.forward_loss(inputs, targets)
    assert loss_masked.item() != loss_plain.item()
