"""Parity: llama31 against Meta's reference code (llama-models 0.3.0, via reference.py) and HF
transformers' LlamaForCausalLM. One random model per shape is written in Meta's layout and in HF's,
and each implementation reads its own copy, so all three run exactly the same weights (fp32, CPU)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import transformers  # a test requirement: a missing one should fail, not skip, the parity suite
from conftest import random_model

import llama31
import reference
from formats import from_hf_state_dict, permute_qk, save_hf, to_hf_state_dict
from llama31 import ConfigError, Llama, precompute_rope, save_meta

# Every attention layout Llama uses, each with the real 128256-token vocabulary and norms at 1
SHAPES = {
    "gqa_4to1": dict(dim=256, n_heads=8, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=64),
    "one_kv_head": dict(dim=128, n_heads=4, n_kv_heads=1, ffn_dim_multiplier=None, multiple_of=256),
    "mha_ffn_1_3": dict(dim=192, n_heads=6, n_kv_heads=6, ffn_dim_multiplier=1.3, multiple_of=64),
}
LONG_START = 9000  # past the 8192 positions of Llama 3's original context, where RoPE scaling acts
MAX_SEQ_LEN = 9216
PROMPTS = [
    "Clearly, the meaning of life is",
    "def fibonacci(n):\n    if n < 2:",
    "東京は日本の首都で、",
    "The",
]
META_TOL, HF_TOL = 1e-5, 1e-4


@pytest.fixture(scope="session")
def model_parallel():
    """Meta's fairscale layers need a (single-process) model-parallel group; one for the session."""
    made = reference.init_model_parallel()
    yield
    if made:
        reference.destroy_model_parallel()


@pytest.fixture(scope="module", params=list(SHAPES))
def trio(request, model_parallel, tmp_path_factory):
    """The same random weights loaded by llama31, Meta's reference and HF, all fp32 on CPU."""
    model = random_model(seed=1, max_seq_len=MAX_SEQ_LEN, **SHAPES[request.param])
    meta_dir, hf_dir = tmp_path_factory.mktemp("meta"), tmp_path_factory.mktemp("hf")
    save_meta(model, meta_dir, dtype=torch.float32)
    save_hf(model.state_dict(), model.args.to_params(), hf_dir, dtype=torch.float32)
    del model
    ours = Llama.build(meta_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu", dtype="fp32")
    ref = reference.load_reference(meta_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu", dtype="fp32")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    assert next(hf.parameters()).dtype == torch.float32
    return SimpleNamespace(ours=ours, ref=ref, hf=hf, hf_dir=hf_dir, args=ours.model.args)


def text_batch(tokenizer, n_rows=2, seqlen=40):
    """(n_rows, seqlen) ids: real text in the first row, seeded random ids in the others."""
    ids = tokenizer.encode(" ".join(PROMPTS) * 4, bos=True, eos=False)[:seqlen]
    g = torch.Generator().manual_seed(0)
    rest = torch.randint(0, 128000, (n_rows - 1, seqlen), generator=g)
    return torch.cat([torch.tensor([ids]), rest])


# -----------------------------------------------------------------------------
# logits and greedy tokens


@pytest.mark.slow
def test_logits_match_meta_transformer(trio):
    x = text_batch(trio.ours.tokenizer)
    ours = trio.ours.model.forward_inference(x)
    theirs = trio.ref.model.forward(x, 0)
    assert ours.shape == theirs.shape == (2, 40, 128256)
    assert (ours - theirs).abs().max().item() <= META_TOL


def test_logits_match_hf_llama_with_llama3_rope_scaling(trio):
    x = text_batch(trio.ours.tokenizer)
    ours = trio.ours.model.forward_inference(x)
    with torch.no_grad():
        theirs = trio.hf(x).logits
    assert (ours - theirs).abs().max().item() <= HF_TOL


def test_greedy_completions_match_reference_generate(trio):
    # each side tokenizes with its own tokenizer; prompts of different lengths share one batch
    ours = trio.ours.generate([trio.ours.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS],
                              max_gen_len=32, temperature=0.0)
    theirs = reference.reference_generate(trio.ref, reference.encode_prompts(trio.ref, PROMPTS),
                                          max_gen_len=32, temperature=0.0)
    assert all(len(t) >= 32 for t in theirs)
    assert ours == theirs


# -----------------------------------------------------------------------------
# positions past 8192: every model gets the same cached keys and values for positions 0..8999
# (random, already rotated), then reads new tokens at 9000.. through its KV cache. Attention
# scores against those keys depend on each query's absolute rotation, so any difference in the
# scaled RoPE angles (or in which position a token lands at) shows in the logits.


def random_prefix(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, args.n_kv_heads, LONG_START, args.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(args.n_layers)]


def hf_rope_layout(k):
    """Cached keys are rotated already: move head_dim from our interleaved pairs to HF's halves."""
    return k.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def long_position_logits(trio, against: str):
    """Our logits and the other model's for a prompt at LONG_START then 3 greedy decode steps."""
    ours_model, prefix = trio.ours.model, random_prefix(trio.args)
    ours_model.setup_caches(1, MAX_SEQ_LEN)
    hf_cache = transformers.DynamicCache(config=trio.hf.config)
    for i, (k, v) in enumerate(prefix):
        ours_model.layers[i].attention.cache.k[:, :, :LONG_START] = k
        ours_model.layers[i].attention.cache.v[:, :, :LONG_START] = v
        meta_attn = trio.ref.model.layers[i].attention
        meta_attn.cache_k[:1, :LONG_START] = k.transpose(1, 2)
        meta_attn.cache_v[:1, :LONG_START] = v.transpose(1, 2)
        hf_cache.update(hf_rope_layout(k), v, i)
    x = torch.tensor([trio.ours.tokenizer.encode(PROMPTS[0], bos=False, eos=False)])
    pos, ours, theirs = LONG_START, [], []
    try:
        for _ in range(4):
            ours.append(ours_model.forward_inference(x, pos))
            if against == "meta":
                theirs.append(trio.ref.model.forward(x, pos))
            else:
                with torch.no_grad():
                    theirs.append(trio.hf(x, past_key_values=hf_cache, use_cache=True).logits)
            pos, x = pos + x.shape[1], ours[-1][:, -1:].argmax(-1)
    finally:
        ours_model.clear_caches()
        for layer in trio.ref.model.layers:  # leave Meta's caches as a fresh model has them
            layer.attention.cache_k.zero_()
            layer.attention.cache_v.zero_()
    assert pos > 8192
    return torch.cat(ours, 1), torch.cat(theirs, 1)


def test_positions_past_8192_match_meta(trio):
    ours, theirs = long_position_logits(trio, "meta")
    assert (ours - theirs).abs().max().item() <= META_TOL


def test_positions_past_8192_match_hf(trio):
    ours, theirs = long_position_logits(trio, "hf")
    assert (ours - theirs).abs().max().item() <= HF_TOL


def test_long_position_check_catches_unscaled_rope(trio):
    # the check above has teeth: plain Llama 3 RoPE (no 3.1 scaling) is far outside tolerance
    model, args = trio.ours.model, trio.args
    model.rope_cos, model.rope_sin = precompute_rope(dataclasses.replace(args, use_scaled_rope=False), MAX_SEQ_LEN)
    try:
        ours, theirs = long_position_logits(trio, "meta")
    finally:
        model.rope_cos, model.rope_sin = precompute_rope(args, MAX_SEQ_LEN)
    assert (ours - theirs).abs().max().item() > 1e-3


# -----------------------------------------------------------------------------
# HF conversion


def test_hf_state_dict_has_llama_for_causal_lm_names_and_round_trips(trio):
    ours = trio.ours.model.state_dict()
    hf = to_hf_state_dict(ours, trio.args.to_params())
    assert hf.keys() == trio.hf.state_dict().keys()
    back = from_hf_state_dict(hf, trio.args.to_params())
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_permute_from_hf_inverts_permute_for_hf():
    w = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)  # 8 heads of 16
    assert torch.equal(permute_qk(permute_qk(w, 8), 8, to_hf=False), w)
    # head 0's pair (rows 0, 1) becomes HF's (row 0, row 8): i and i + head_dim/2
    assert permute_qk(w, 8)[[0, 8], 0].tolist() == w[[0, 1], 0].tolist()


def test_hf_config_declares_llama3_rope_scaling_and_shapes(trio):
    config = transformers.AutoConfig.from_pretrained(trio.hf_dir)
    a = trio.args
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling  # transformers 5 / 4
    assert rope["rope_type"] == "llama3"
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 8192)
    assert (rope.get("rope_theta") or config.rope_theta) == a.rope_theta
    assert (config.num_key_value_heads, config.intermediate_size, config.rms_norm_eps) == \
        (a.n_kv_heads, a.ffn_hidden_dim, a.norm_eps)
    assert config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id) == (128000, 128001)


def test_from_hf_state_dict_names_tensors_it_does_not_know():
    args = llama31.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, multiple_of=16)
    with pytest.raises(ConfigError, match="model.layers.1.mlp.up_proj.weight"):
        from_hf_state_dict({"model.layers.1.mlp.up_proj.weight": torch.zeros(1)}, args.to_params())


# -----------------------------------------------------------------------------
# params.json: a key left out means what it means to Meta's code

# Every key of Meta's ModelArgs that a params.json states, each set away from Meta's default, so
# that leaving any one out changes the model
FULL_PARAMS = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=64,
                   ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=10000.0, use_scaled_rope=True)


@pytest.mark.parametrize("left_out", list(FULL_PARAMS))
def test_a_key_left_out_of_params_json_means_metas_default(left_out, model_parallel, tmp_path):
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer

    params = {k: v for k, v in FULL_PARAMS.items() if k != left_out}
    theirs = MetaArgs(**params, max_seq_len=64, max_batch_size=1)
    ours = llama31.ModelArgs.from_params(params, max_seq_len=64)
    assert all(getattr(ours, k) == getattr(theirs, k) for k in FULL_PARAMS), left_out
    # the same tensors: Meta's model built from its args (Meta's default dim is 8B's 4096: one
    # layer and a small vocabulary then, to keep memory small)
    small = dict(vocab_size=256, n_layers=1) if left_out == "dim" else {}
    small["vocab_size"] = small.get("vocab_size", 128256)  # both loaders take -1 from the tokenizer
    for k, v in small.items():
        setattr(theirs, k, v)
    torch.manual_seed(0)
    with reference.torch_defaults(dtype=torch.float32):
        meta_model = MetaTransformer(theirs)
    for p in meta_model.parameters():  # Meta's layers leave their weights uninitialised
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    with torch.device("meta"):
        our_model = llama31.Transformer(dataclasses.replace(ours, **small))
    assert {k: v.shape for k, v in our_model.state_dict().items()} == \
        {k: v.shape for k, v in meta_model.state_dict().items()}
    if left_out == "dim":
        return
    # a random checkpoint of Meta's shapes under the short params.json: the same logits
    torch.save(meta_model.state_dict(), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    llama = Llama.build(tmp_path, max_seq_len=64, device="cpu", dtype="fp32")
    ref = reference.load_reference(tmp_path, max_seq_len=64, device="cpu", dtype="fp32")
    x = text_batch(llama.tokenizer, seqlen=24)
    ours_logits, theirs_logits = llama.model.forward_inference(x), ref.model.forward(x, 0)
    assert (ours_logits - theirs_logits).abs().max().item() <= META_TOL


# -----------------------------------------------------------------------------
# reference.py itself: its CLI, compare mode, and what it leaves behind

CLI_ARGS = ["--prompts", '["The capital of France is", "def f(x):"]', "--temperature", "0",
            "--max_gen_len", "8", "--device", "cpu"]


def test_reference_cli_prints_what_llama31_cli_prints(ckpt_dir, model_parallel, capsys):
    llama31.main(["--ckpt_dir", str(ckpt_dir), *CLI_ARGS])
    ours = capsys.readouterr().out
    reference.main(["--ckpt_dir", str(ckpt_dir), *CLI_ARGS])
    theirs = capsys.readouterr().out
    assert ours.startswith("The capital of France is") and ours.endswith("-" * 80 + "\n")
    assert ours == theirs


def test_compare_reports_identical_outputs(ckpt_dir, model_parallel, capsys):
    reference.main(["compare", "--ckpt_dir", str(ckpt_dir), *CLI_ARGS[:2], "--max_gen_len", "6",
                    "--device", "cpu"])
    captured = capsys.readouterr()
    out = captured.out
    assert "prompt 0: identical" in out and "prompt 1: identical" in out
    assert out.rstrip().endswith("identical: all 2 prompts give the same greedy tokens")
    assert "(torch.float32)" in captured.err  # fp32 unless asked: on CUDA too, where models default to bf16


def test_compare_on_a_tool_dialog_writes_and_reads_it_as_metas_code_does(ckpt_dir, model_parallel, capsys, tmp_path):
    from tokenizer import llama3_system_prompt

    weather = [{"role": "system", "content": llama3_system_prompt("Be brief.", ["brave_search"], "21 September 2024")},
               {"role": "user", "content": "Weather in Menlo Park?"},
               {"role": "assistant", "content": "", "stop_reason": "end_of_message",
                "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "Menlo Park weather"}}]},
               {"role": "ipython", "content": '{"temperature": "20 C"}'}]
    (tmp_path / "dialogs.json").write_text(json.dumps([weather, [{"role": "user", "content": "Hi"}]]))
    reference.main(["compare", "--ckpt_dir", str(ckpt_dir), "--dialogs", str(tmp_path / "dialogs.json"),
                    "--max_gen_len", "6", "--device", "cpu"])
    out = capsys.readouterr().out  # exit status 1 (SystemExit) on a divergence or a different reading
    assert out.rstrip().endswith("identical: all 2 prompts give the same greedy tokens")


def test_compare_in_bf16_says_rounding_can_diverge(ckpt_dir, model_parallel, capsys):
    try:
        reference.main(["compare", "--ckpt_dir", str(ckpt_dir), *CLI_ARGS[:2], "--max_gen_len", "2",
                        "--device", "cpu", "--dtype", "bf16"])
    except SystemExit:
        pass  # a divergence in bf16 is allowed; the note is what this checks
    assert "(torch.bfloat16; not fp32, so rounding alone can make them diverge)" in capsys.readouterr().err


def test_compare_reports_first_divergence(ckpt_dir, model_parallel):
    ours = Llama.build(ckpt_dir, max_seq_len=64, device="cpu", dtype="fp32")
    ref = reference.load_reference(ckpt_dir, max_seq_len=64, device="cpu", dtype="fp32")
    prompts = [ours.tokenizer.encode(p, bos=True, eos=False) for p in ["Hello", "The capital of France is"]]
    # give our output layer a bias that makes one token win everywhere
    forced, args = 1234, ours.model.args
    head = torch.nn.Linear(args.dim, args.vocab_size, bias=True, device="meta")
    head.weight = ours.model.output.weight
    head.bias = torch.nn.Parameter(torch.zeros(args.vocab_size))
    head.bias.data[forced] = 100.0
    ours.model.output = head
    reports = reference.compare_models(ours, ref, prompts, max_gen_len=4)
    first = reports[0]
    assert (first.diverge_at, first.our_token) == (0, forced)
    assert first.their_token == first.theirs[0] != forced
    assert first.our_gap > 0 and first.their_gap > 0
    text = reference.format_report(reports, ours.tokenizer.decode)
    assert text.endswith(f"first divergence: prompt 0, position {len(prompts[0])}")


def test_reference_restores_torch_defaults(ckpt_dir, model_parallel):
    ref = reference.load_reference(ckpt_dir, max_seq_len=64, device="cpu", dtype="bf16")
    reference.reference_generate(ref, [[128000, 791]], max_gen_len=2, temperature=0.0)
    assert next(ref.model.parameters()).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    assert torch.get_default_device() == torch.device("cpu")


def test_reference_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, model_parallel, capsys):
    with pytest.raises(SystemExit) as e:
        reference.main(["--ckpt_dir", str(tmp_path / "nope"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err[-1].startswith("error: checkpoint directory") and "does not exist" in err[-1]
