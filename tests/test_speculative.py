"""Speculative decoding (variants/speculative.py): greedy tokens exactly plain decoding's, sampled
tokens distributed exactly as the model's (a statistical test), caches rolled back to what plain
decoding leaves, a draft with another vocabulary refused before any weight loads. fp32, CPU."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import variants
from conftest import make_checkpoint
from errors import ConfigError
from llama31 import Llama, ModelArgs, Transformer
from variants import Draft
from variants import speculative

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
PROMPTS = [[128000, 791, 6864, 315, 9822, 374], [128000, 755, 282, 2120, 997]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A model, and a smaller, different one as its draft (the real vocabulary both)."""
    root = tmp_path_factory.mktemp("speculative")
    make_checkpoint(root / "model", seed=3, dtype=torch.float32, **SHAPE)
    make_checkpoint(root / "draft", seed=4, dtype=torch.float32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    multiple_of=32)
    return root


def build(path, draft=None, k=4):
    return Llama.build(path, max_seq_len=96, device="cpu", dtype="fp32",
                       draft=None if draft is None else Draft(str(draft), None, k))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_greedy_tokens_are_plain_decodings_with_a_good_draft_and_a_useless_one(ckpts, k):
    plain = build(ckpts / "model")
    for draft in ("model", "draft"):  # itself: every proposal kept; another model: nearly none
        spec = build(ckpts / "model", ckpts / draft, k)
        for prompt in PROMPTS:
            assert spec.generate([prompt], max_gen_len=24, temperature=0) == \
                plain.generate([prompt], max_gen_len=24, temperature=0)
        stats = spec.speculator.stats
        assert stats["verifications"] > 0
        if draft == "model":
            assert stats["accepted"] == stats["proposed"]  # its own greedy tokens, every one
            assert stats["verifications"] <= 2 * math.ceil(24 / (k + 1))


def test_a_batch_of_prompts_decodes_as_without_a_draft(ckpts):
    # one stream is speculative; a batch of rows of different lengths goes the plain way
    spec, plain = build(ckpts / "model", ckpts / "model"), build(ckpts / "model")
    assert spec.generate(PROMPTS, max_gen_len=12, temperature=0) == plain.generate(PROMPTS, max_gen_len=12,
                                                                                     temperature=0)
    assert spec.speculator.stats["verifications"] == 0


def test_stop_tokens_max_gen_len_and_the_context_end_stop_it_as_plain_decoding(ckpts):
    plain, spec = build(ckpts / "model"), build(ckpts / "model", ckpts / "model", 5)
    first = plain.generate([PROMPTS[0]], max_gen_len=8, temperature=0)[0]
    plain.tokenizer.stop_tokens = spec.tokenizer.stop_tokens = [first[3]]  # a stop token at the 4th
    for stops in (False, True):
        assert spec.generate([PROMPTS[0]], max_gen_len=8, temperature=0, stops=stops) == \
            plain.generate([PROMPTS[0]], max_gen_len=8, temperature=0, stops=stops)
    plain.tokenizer.stop_tokens = spec.tokenizer.stop_tokens = []
    long = [PROMPTS[0] * 15][0][:90]  # 6 positions left of max_seq_len 96
    assert spec.generate([long], temperature=0) == plain.generate([long], temperature=0)
    assert len(plain.generate([long], temperature=0)[0]) == 6


def test_a_full_rejection_leaves_the_cache_as_plain_decoding_does(ckpts):
    # the other model as the draft, forced to propose one token the model never picks: every
    # round keeps the model's own token alone; the keys and values it keeps are plain decoding's
    plain, spec = build(ckpts / "model"), build(ckpts / "model", ckpts / "draft", 4)
    draft = spec.speculator.draft.model
    with torch.no_grad():
        draft.output.weight.zero_()
        draft.output.weight[0, 0] = 1e4  # token 0 ("!") always, far ahead
    caches = {}
    for name, llama in (("plain", plain), ("spec", spec)):
        llama.model.setup_caches(1, 96)  # installed by the caller (cache_from): kept after it
        out = [[t for (t,) in llama.generate_stream([PROMPTS[1]], 16, temperature=0, cache_from=0)]]
        steps = len(PROMPTS[1]) + len(out[0]) - 1  # the last token is not in the cache yet
        caches[name] = [(a.cache.k[:, :, :steps].clone(), a.cache.v[:, :, :steps].clone())
                        for a in (layer.attention for layer in llama.model.layers)], out
        llama.model.clear_caches()
    assert 0 not in caches["plain"][1][0] and caches["spec"][1] == caches["plain"][1]
    assert spec.speculator.stats["accepted"] == 0 and spec.speculator.stats["proposed"] > 0
    for (k1, v1), (k2, v2) in zip(caches["spec"][0], caches["plain"][0]):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)


def test_cache_from_as_a_chat_keeps_it(ckpts):
    # chat.Conversation's use: a cache installed by the caller, its first tokens already there
    plain, spec = build(ckpts / "model"), build(ckpts / "model", ckpts / "model", 3)
    outs = []
    for llama in (plain, spec):
        llama.model.setup_caches(1, 96)
        first = [t for (t,) in llama.generate_stream([PROMPTS[0]], 6, temperature=0, cache_from=0)]
        dialog = PROMPTS[0] + first + [128000, 791]
        steps = list(llama.generate_stream([dialog], 6, temperature=0, cache_from=len(PROMPTS[0]) + 5))
        outs.append((first, [t for (t,) in steps]))
        llama.model.clear_caches()
    assert outs[0] == outs[1]


# -----------------------------------------------------------------------------
# sampling: exactly the model's distribution


def tiny_llama(seed: int, vocab: int = 4) -> Llama:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=vocab, multiple_of=16,
                                  max_seq_len=16, max_batch_size=1)).eval()
    with torch.no_grad():
        model.output.weight.mul_(6.0)  # peaked enough that top-p cuts some tokens
    return Llama(model, SimpleNamespace(stop_tokens=[], pad_id=0))


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value a df-degree statistic exceeds with probability ~1e-3 (z of 1e-3),
    by Wilson and Hilferty's cube-root normal approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_sampled_tokens_follow_the_models_own_distribution(temperature, top_p):
    # 3 tokens after a prompt, k = 2: acceptance and rejection at the first two positions, the
    # bonus or the model's own token at the third; 3000 seeded runs against the exact joint
    # distribution of the 3 tokens (4^3 cells, those expected below 5 pooled). A correct sampler
    # fails this one time in a thousand (the chi-square test at 1e-3).
    target, draft = tiny_llama(1), tiny_llama(2)
    speculative.Speculative(draft, 2).sampling(target)
    prompt = [1, 2]

    def dist(seq):
        logits = target.model.forward_inference(torch.tensor([seq]))[0, -1]
        return speculative.top_p_probs(logits, temperature, top_p)

    exact = {}
    for a, pa in enumerate(dist(prompt).tolist()):
        for b, pb in enumerate(dist(prompt + [a]).tolist()):
            for c, pc in enumerate(dist(prompt + [a, b]).tolist()):
                exact[a, b, c] = pa * pb * pc
    n = 3000
    counts = dict.fromkeys(exact, 0)
    for seed in range(n):
        out = target.generate([prompt], max_gen_len=3, temperature=temperature, top_p=top_p,
                              generator=torch.Generator().manual_seed(seed))[0]
        counts[tuple(out)] += 1
    assert target.speculator.stats["accepted"] < target.speculator.stats["proposed"]  # rejections happened
    assert all(counts[c] == 0 for c, p in exact.items() if p == 0)  # nothing top-p cuts
    cells, pooled = [], [0.0, 0]
    for c, p in exact.items():
        if p * n >= 5:
            cells.append((p * n, counts[c]))
        elif p > 0:
            pooled[0] += p * n
            pooled[1] += counts[c]
    cells.append(tuple(pooled))
    stat = sum((o - e) ** 2 / e for e, o in cells if e > 0)
    assert stat < chi_square_critical(len(cells) - 1), (stat, len(cells))


def test_verify_keeps_the_agreed_prefix_and_one_token_of_the_models():
    target = torch.full((4, 10), -5.0)
    for i, best in enumerate([3, 7, 1, 9]):
        target[i, best] = 5.0
    assert speculative.verify([3, 7, 2], [], target, 0.0, 1.0, None) == [3, 7, 1]  # rejected at the third
    assert speculative.verify([3, 7, 1], [], target, 0.0, 1.0, None) == [3, 7, 1, 9]  # all kept, and a bonus
    assert speculative.verify([], [], target[:1], 0.0, 1.0, None) == [3]
    # sampled, with the draft's distribution the model's own: every proposal is kept
    p = [speculative.top_p_probs(t, 1.0, 1.0) for t in target]
    g = torch.Generator().manual_seed(0)
    assert speculative.verify([3, 7, 1], p[:3], target, 1.0, 1.0, g)[:3] == [3, 7, 1]


# -----------------------------------------------------------------------------
# the draft checked; the CLI


def test_a_draft_with_another_vocabulary_is_refused_before_any_weight_loads(ckpts, smollm_path, tmp_path):
    with pytest.raises(ConfigError, match=r"^the draft .* has another vocabulary than .* \(49152 tokens against "
                                          r"128256, or other ids\); use a draft with the model's tokenizer"):
        build(ckpts / "model", smollm_path)
    # the vocabulary is read from the files' headers alone: a draft's weights that cannot be read
    # are not read (its params.json and tokenizer are the model's, so it passes the check)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "params.json").write_text((ckpts / "draft" / "params.json").read_text())
    (broken / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    variants.check_draft(ckpts / "model", broken)


def test_the_draft_settings_and_the_demos_own_draft():
    with pytest.raises(ConfigError, match="--speculate_k must be an integer >= 0, got -1"):
        variants.draft_of("d", None, -1)
    assert variants.draft_of(None, None, 4) is None and variants.draft_of("d", "int8", 0) is None  # k 0: none
    assert variants.draft_of(None, "int4", 2) == Draft(None, "int4", 2)  # the model's own weights in int4
    assert variants.draft_of("d", None, 3) == Draft("d", "keep", 3)
    assert variants.draft_of(None, None, 4, demo=True) == Draft(None, "keep", 4)  # the demo's default


@pytest.mark.slow
def test_cli_with_a_draft_prints_what_plain_sampling_prints_and_the_acceptance(ckpts):
    args = [sys.executable, "llama31.py", "--ckpt_dir", str(ckpts / "model"), "--prompts",
            '["The capital of France is", "def f(x):"]', "--temperature", "0", "--max_gen_len", "12", "--device",
            "cpu", "--nochat"]
    plain = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(args + ["--draft_ckpt_dir", str(ckpts / "draft"), "--speculate_k", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert plain.returncode == spec.returncode == 0, spec.stderr[-2000:]
    assert spec.stdout == plain.stdout and spec.stdout.count("-" * 80) == 2
    assert "speculative (k=3): " in spec.stderr and "% of proposals accepted, " in spec.stderr


@pytest.mark.slow
def test_the_demo_drafted_by_its_own_4_bit_matrices_keeps_its_fp32_greedy_answers(smollm_path):
    plain = Llama.build(smollm_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32", quantize="none")
    spec = Llama.build(smollm_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32", quantize="none",
                       draft=Draft(None, "keep", 4))
    tok, fmt = plain.tokenizer, plain.chat_format
    for question in ["What is the capital of France?", "Write one sentence about a cat."]:
        prompt = fmt.encode_dialog(tok, [{"role": "user", "content": question}])
        assert spec.generate([prompt], max_gen_len=32, temperature=0) == \
            plain.generate([prompt], max_gen_len=32, temperature=0)
    stats = spec.speculator.stats
    assert stats["accepted"] / stats["proposed"] > 0.5  # the same weights in 4 bits agree mostly
