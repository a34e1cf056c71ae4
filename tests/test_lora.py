"""lora.py: a fresh adapter changes nothing; merged equals unmerged; our adapters equal HF PEFT's
LoRA on the HF conversion of the same weights (logits, loss, one AdamW step); finetune --finetune_type
lora trains and saves only adapters, resumes exactly, loads and exports merged; bad settings are
one-line errors."""

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from variants import lora
from variants import quantize
from conftest import FINETUNE_SHAPE, STORIES, llama_cpp_greedy, make_checkpoint, needs_llama_cpp, random_model
from formats import permute_qk, save_hf
from export import export
from formats import load_tokenizer, write_datafile
from llama31 import Llama, finetune, load_checkpoint, load_model
from tokenizer import ConfigError, find_tokenizer_model

REPO = Path(__file__).resolve().parents[1]

TINY = dict(vocab_size=512, n_layers=2)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def tokens(n_rows=2, seqlen=24, vocab=512, seed=0):
    return torch.randint(0, vocab, (n_rows, seqlen), generator=torch.Generator().manual_seed(seed))


def with_adapters(model, targets=ALL, rank=4, alpha=8.0, seed=0, random_b=True):
    """model with adapters; B random too (B = 0 would make every test below trivially pass)."""
    cfg = lora.check_config(rank, alpha, 0.0, targets)
    g = torch.Generator().manual_seed(seed)
    lora.add_adapters(model, cfg, generator=g)
    if random_b:
        for _, m in lora.adapted(model):
            with torch.no_grad():
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
    return model


# -----------------------------------------------------------------------------
# our own adapters


def test_fresh_adapters_leave_the_logits_identical():
    model = random_model(tie_embeddings=False, **TINY).eval()
    x = tokens()
    before = model.forward_inference(x)
    with_adapters(model, random_b=False)
    assert torch.equal(model.forward_inference(x), before)


def test_adapters_keep_the_base_names_and_freeze_the_base():
    model = with_adapters(random_model(tie_embeddings=False, **TINY))
    names = set(model.state_dict())
    assert "layers.0.attention.wq.weight" in names and "layers.1.feed_forward.w2.weight" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_state(model))
    assert len(trainable) == 2 * (7 * 2 + 1)


def test_merged_equals_unmerged():
    model = with_adapters(random_model(tie_embeddings=False, **TINY)).eval()
    x = tokens()
    unmerged = model.forward_inference(x)
    lora.merge(model)
    assert not lora.adapted(model) and not any("lora" in k for k in model.state_dict())
    assert (model.forward_inference(x) - unmerged).abs().max().item() <= 1e-5


def test_quantized_base_takes_adapters_and_merges_to_dense():
    model = random_model(tie_embeddings=False, **TINY).eval()
    plan = {f"layers.{i}.attention.{w}": ("int8",) for i in range(2) for w in ("wq", "wv")}
    plan["layers.0.attention.wk"] = ("int4", 32)
    state = model.state_dict()
    quantize.swap_modules(model, plan, "cpu", torch.float32)
    loaded = {}
    for k, v in state.items():
        loaded.update(quantize.quantized_state(model, plan, k, v, "cpu", torch.float32))
    model.load_state_dict(loaded, assign=True)
    x = tokens()
    base = model.forward_inference(x)
    with_adapters(model, targets=("wq", "wk", "wv"), random_b=False)
    assert torch.equal(model.forward_inference(x), base)
    for _, m in lora.adapted(model):
        with torch.no_grad():
            m.lora_b.normal_(0, 0.02)
    unmerged = model.forward_inference(x)
    lora.merge(model)
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
    assert (model.forward_inference(x) - unmerged).abs().max().item() <= 1e-4 * unmerged.abs().max().item()


@pytest.mark.parametrize("kind", ["int8", "int4-cpu", "int4-plain"])
def test_gradient_through_a_quantized_base_equals_the_dequantized_matrix_s(kind, monkeypatch):
    # the backward dequantizes the frozen base 48 rows at a time here (4096 in real runs): blocks
    # that start inside the CPU int4 layout's blocks of 64 rows (AVX-512) and end at a 16-row tail
    monkeypatch.setattr(lora.QuantizedProduct, "ROWS", 48)
    torch.manual_seed(0)
    w = torch.randn(80, 64)
    if kind == "int8":
        module = quantize.Int8Linear(64, 80, torch.float32)
        module.load_state_dict(quantize.Int8Linear.buffers_for(w, "cpu", torch.float32), assign=True)
    else:
        layout = kind.split("-")[1]
        module = quantize.Int4Linear(64, 80, 32, torch.float32, layout=layout)
        module.load_state_dict(quantize.Int4Linear.buffers_for(w, 32, layout, "cpu", torch.float32), assign=True)
    dense = module.dequantize()
    module.__class__ = lora.mixed(lora.Frozen, type(module))
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 80)
    module(x).backward(g)
    torch.nn.functional.linear(x_ref, dense).backward(g)
    assert (x.grad - x_ref.grad).abs().max() <= 1e-5 * x_ref.grad.abs().max()


def test_adapter_state_round_trips():
    a = with_adapters(random_model(tie_embeddings=False, **TINY), seed=1)
    b = with_adapters(random_model(tie_embeddings=False, **TINY), seed=2)
    lora.load_adapters(b, {k: v.detach().clone() for k, v in lora.adapter_state(a).items()}, "test")
    x = tokens()
    assert torch.equal(a.eval().forward_inference(x), b.eval().forward_inference(x))


def test_fingerprint_names_the_base_weights_not_their_dtype():
    model = random_model(**TINY)
    state = model.state_dict()
    assert lora.fingerprint(state) == lora.fingerprint({k: v.bfloat16() for k, v in state.items()})
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"] + 1
    assert lora.fingerprint(state) != lora.fingerprint(model.state_dict())


# -----------------------------------------------------------------------------
# against HF PEFT on the HF conversion


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model with adapters on every Linear but output, and transformers + PEFT's LoRA on the
    HF conversion of the same base, given the same A and B (q/k's B rows in HF's RoPE order)."""
    import peft  # the independent reference (requirements-dev.txt); not needed to run LoRA
    targets = ALL[:-1]
    ours = random_model(seed=3, tie_embeddings=False, **TINY)
    hf_dir = tmp_path_factory.mktemp("hf")
    save_hf(ours.state_dict(), ours.args.to_params(), hf_dir, dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[HF_NAMES[t].split(".")[1]
                                                                              for t in targets])
    hf = peft.get_peft_model(hf, cfg)
    with_adapters(ours, targets)
    copy_adapters_to_hf(ours, hf)
    return ours, hf


def hf_module(hf, i, short):
    return hf.base_model.model.model.layers[i].get_submodule(HF_NAMES[short])


def copy_adapters_to_hf(ours, hf):
    args = ours.args
    for i, layer in enumerate(ours.layers):
        for short in HF_NAMES:
            m = layer.get_submodule(lora.TARGETS[short])
            heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(short)
            b = permute_qk(m.lora_b.detach(), heads) if heads else m.lora_b.detach()
            theirs = hf_module(hf, i, short)
            with torch.no_grad():
                theirs.lora_A["default"].weight.copy_(m.lora_a)
                theirs.lora_B["default"].weight.copy_(b)


def test_logits_and_loss_match_peft(pair):
    ours, hf = pair
    x = tokens(seqlen=33)
    with torch.no_grad():
        mine = ours.eval().forward_inference(x[:, :-1])
        out = hf.eval()(input_ids=x, labels=x)
        loss = ours.forward_loss(x[:, :-1], x[:, 1:])
    assert (mine - out.logits[:, :-1]).abs().max().item() <= 1e-5
    assert abs(loss.item() - out.loss.item()) <= 1e-5


def test_one_adamw_step_matches_peft(pair):
    ours, hf = copy.deepcopy(pair[0]).train(), copy.deepcopy(pair[1]).train()
    x = tokens(seqlen=33, seed=1)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3, eps=1e-6)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3, eps=1e-6)
    assert len(opt_ours.param_groups[0]["params"]) == len(opt_hf.param_groups[0]["params"])
    ours.forward_loss(x[:, :-1], x[:, 1:]).backward()
    hf(input_ids=x, labels=x).loss.backward()
    opt_ours.step()
    opt_hf.step()
    args = ours.args
    for i, layer in enumerate(ours.layers):
        for short in HF_NAMES:
            m, theirs = layer.get_submodule(lora.TARGETS[short]), hf_module(hf, i, short)
            heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(short)
            b = theirs.lora_B["default"].weight.detach()
            b = permute_qk(b, heads, to_hf=False) if heads else b
            assert (m.lora_a - theirs.lora_A["default"].weight).abs().max().item() <= 1e-5, (i, short)
            assert (m.lora_b - b).abs().max().item() <= 1e-5, (i, short)


# -----------------------------------------------------------------------------
# bad settings: one line each


@pytest.mark.parametrize("kwargs, words", [
    (dict(targets="wq,attention"), "lora_targets attention: not a Linear of the model"),
    (dict(targets="tok_embeddings"), "lora_targets tok_embeddings"),
    (dict(targets=""), "lora_targets (none)"),
    (dict(rank=0), "lora_rank 0 must be"),
    (dict(rank=2.5), "lora_rank 2.5 must be"),
    (dict(alpha=-1), "lora_alpha -1 must be"),
    (dict(dropout=1.0), "lora_dropout 1.0 must be"),
])
def test_bad_settings_are_one_line(kwargs, words):
    with pytest.raises(ConfigError) as e:
        lora.check_config(**kwargs)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_output_of_a_tied_model_is_refused():
    model = random_model(tie_embeddings=True, **TINY)
    with pytest.raises(ConfigError, match="ties output to tok_embeddings"):
        lora.add_adapters(model, lora.check_config(targets="wq,output"))


def test_adapters_of_another_rank_are_refused():
    a = with_adapters(random_model(tie_embeddings=False, **TINY), rank=4)
    b = with_adapters(random_model(tie_embeddings=False, **TINY), rank=8)
    with pytest.raises(ConfigError, match="check lora_rank"):
        lora.load_adapters(b, lora.adapter_state(a), "a.pt")


# -----------------------------------------------------------------------------
# finetune --finetune_type lora: adapters only, in checkpoints of megabytes, resumed exactly


def run(ckpt, data, out, **kw):
    args = dict(ckpt_dir=str(ckpt), out_dir=str(out), B=2, T=32, max_steps=3, learning_rate=1e-2, warmup_steps=1,
                val_every=0, device="cpu", sample_prompts=[], finetune_type="lora", lora_rank=4,
                lora_targets="wq,wk,wv,wo,w2", **data)
    args.update(kw)
    return finetune(**args)


X = torch.tensor([[128000, 791, 8415, 3290]])


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    """A 3-step LoRA run on a base with its own tokenizer.model: (run directory, base, trained model)."""
    base = tmp_path_factory.mktemp("base")
    make_checkpoint(base, seed=0, dtype=torch.float32, **FINETUNE_SHAPE)
    shutil.copyfile(find_tokenizer_model(), base / "tokenizer.model")
    out = tmp_path_factory.mktemp("run")
    return out, base, run(base, data, out / "run")["model"].eval()


def test_lora_finetune_changes_only_the_adapters_and_saves_only_them(lora_run):
    out, base, model = lora_run
    before = load_model(base, device="cpu", dtype="fp32").state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert all(p.abs().max() > 0 for k, p in lora.adapter_state(model).items() if k.endswith("lora_b"))
    step = out / "run" / "step_000003"
    assert sorted(p.name for p in step.iterdir()) == ["adapters.pt", "tokenizer.model", "train_state.pt"]
    assert (step / "adapters.pt").stat().st_size < 2e6


def test_lora_checkpoint_loads_as_base_plus_adapters_with_the_runs_tokenizer(lora_run):
    out, base, model = lora_run
    step = out / "run" / "step_000003"
    for path in (step, out / "run" / "latest"):
        llama = Llama.build(path, max_seq_len=64, device="cpu", dtype="fp32")
        assert torch.equal(llama.model.forward_inference(X), model.forward_inference(X))
        assert llama.tokenizer.path == step / "tokenizer.model"
    assert (step / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()


def test_a_lora_checkpoint_with_dropout_samples_without_it(lora_run, tmp_path):
    # the same adapters saved with dropout 0.5: loaded to sample, dropout is off (the model in eval
    # mode, adapters included), so the logits are the same every call and the trained model's
    out, _, model = lora_run
    saved = lora.read_adapters(out / "run" / "step_000003")
    c = saved["config"]
    lora.save_adapters(tmp_path, saved["adapters"], lora.check_config(c.rank, c.alpha, 0.5, c.targets),
                       saved["base"], saved["fingerprint"])
    llama = Llama.build(tmp_path, max_seq_len=64, device="cpu", dtype="fp32")
    first, again = llama.model.forward_inference(X), llama.model.forward_inference(X)
    assert torch.equal(first, again) and torch.equal(first, model.forward_inference(X))


def test_lora_checkpoint_exports_merged(lora_run, tmp_path):
    out, _, model = lora_run
    export(str(out / "run" / "step_000003"), str(tmp_path / "merged"), format="meta", dtype="fp32")
    merged = load_model(tmp_path / "merged", device="cpu", dtype="fp32")
    assert (merged.forward_inference(X) - model.forward_inference(X)).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def lora_gguf(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_gguf")
    export(str(lora_run[0] / "run" / "step_000003"), str(out), format="gguf", gguf_type="f32")
    return out / "model.gguf"


@pytest.mark.slow
def test_gguf_export_of_a_lora_checkpoint_holds_w_plus_scaled_ba(lora_run, lora_gguf):
    _, base, model = lora_run
    back = load_checkpoint(lora_gguf, max_seq_len=64, device="cpu", dtype="fp32")
    assert (back.model.forward_inference(X) - model.forward_inference(X)).abs().max().item() <= 1e-5
    w = load_model(base, device="cpu", dtype="fp32").state_dict()["layers.1.attention.wk.weight"]
    m = model.layers[1].attention.wk
    by_hand = w + (16.0 / 4) * m.lora_b.detach() @ m.lora_a.detach()  # alpha 16, rank 4
    assert torch.allclose(back.model.state_dict()["layers.1.attention.wk.weight"], by_hand, atol=1e-6)
    assert back.tokenizer.n_words == 128256


@needs_llama_cpp
def test_llama_cpp_greedy_on_an_exported_lora_gguf_equals_ours(lora_run, lora_gguf):
    ours = Llama.build(lora_run[0] / "run" / "step_000003", max_seq_len=64, device="cpu", dtype="fp32")
    prompt = ours.tokenizer.encode("The cat sat", bos=True, eos=False)
    want = ours.generate([prompt], max_gen_len=6, temperature=0)[0]
    assert llama_cpp_greedy(lora_gguf, prompt, len(want)) == want


def test_a_run_from_a_lora_checkpoint_trains_its_adapters_on(lora_run, data, tmp_path):
    out, base, model = lora_run
    step = out / "run" / "step_000003"
    # no finetune_type or lora flags: the saved adapters' settings (rank 4 here, not the default 8)
    on = finetune(ckpt_dir=str(step), out_dir=str(tmp_path / "on"), B=2, T=32, max_steps=1, learning_rate=1e-2,
                  val_every=0, device="cpu", sample_prompts=[], **data)["model"]
    assert {p.shape[0] for k, p in lora.adapter_state(on).items() if k.endswith("lora_a")} == {4}
    saved = lora.read_adapters(tmp_path / "on" / "step_000001")
    assert saved["base"] == str(base.resolve()) and saved["config"] == lora.read_adapters(step)["config"]
    a, b = lora.adapter_state(on), lora.adapter_state(model)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained on from the saved adapters


@pytest.mark.parametrize("kw, flags", [(dict(lora_rank=16), "--lora_rank"), (dict(finetune_type="all"), "--finetune_type"),
                                       (dict(lora_targets="wq,wk", lora_alpha=8.0), "--lora_alpha --lora_targets")])
def test_flags_that_contradict_a_lora_checkpoint_are_one_line_errors(lora_run, data, tmp_path, kw, flags):
    step = lora_run[0] / "run" / "step_000003"
    with pytest.raises(ConfigError) as e:
        finetune(ckpt_dir=str(step), out_dir=str(tmp_path), max_steps=1, device="cpu", **data, **kw)
    assert str(e.value).startswith(f"{step} holds LoRA adapters (finetune_type lora, lora_rank 4, lora_alpha 16.0, "
                                   f"lora_dropout 0.0, lora_targets wq,wk,wv,wo,w2)")
    assert f"drop {flags}, or start from its base" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="was saved with different settings .* lora_rank 4 vs 16"):
        finetune(resume=str(step), out_dir=str(tmp_path), max_steps=5, lora_rank=16, device="cpu")


def test_flops_per_token_count_the_adapters_as_what_trains():
    model = random_model(tie_embeddings=False, **TINY)
    args, T = model.args, 32
    d, kv, ffn = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    base = 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d) + 512 * d + d  # blocks, output, final norm
    with_adapters(model, targets=("wq", "wv"), rank=4)
    lora.adapted(model)  # the adapters below: A (4, in) and B (out, 4) on wq (d -> d) and wv (d -> kv)
    adapters = 2 * (4 * (d + d) + 4 * (d + kv))
    want = 4 * (base + adapters) + 2 * adapters + 12 * 2 * d * T
    from llama31 import select_trainable
    from runs import flops_per_token
    select_trainable(model, "lora")
    assert flops_per_token(model, T) == want
    # QLoRA: the quantized matrices (buffers, not parameters) multiply as much
    quantize.swap_modules(model, {f"layers.{i}.feed_forward.w2": ("int8",) for i in range(2)}, "cpu", torch.float32)
    assert flops_per_token(model, T) == want


def test_lora_on_an_hf_layout_base_trains_and_loads_back(data, tmp_path):
    model = random_model(seed=5, **FINETUNE_SHAPE)
    save_hf(model.state_dict(), model.args.to_params(), tmp_path / "hf", dtype=torch.float32)
    trained = run(tmp_path / "hf", data, tmp_path / "run", max_steps=2)["model"].eval()
    step = tmp_path / "run" / "step_000002"
    assert lora.read_adapters(step)["base"] == str((tmp_path / "hf").resolve())
    back = Llama.build(step, max_seq_len=64, device="cpu", dtype="fp32")
    assert torch.equal(back.model.forward_inference(X), trained.forward_inference(X))
    assert any(p.abs().max() > 0 for k, p in lora.adapter_state(back.model).items() if k.endswith("lora_b"))


def test_lora_on_a_gguf_base_trains_and_loads_back_with_the_files_tokenizer(tiny_gguf, tmp_path):
    # conftest's tiny GGUF (a byte-level vocabulary of its own, 4- to 8-bit tensor types), trained
    # dequantized as finetune loads a GGUF; the demo SmolLM2 file works the same, but parsing its
    # 49k-token vocabulary takes seconds per open
    tok = load_tokenizer(tiny_gguf)
    docs = [tok.encode(s, bos=True, eos=True) for s in STORIES]
    write_datafile(tmp_path / "train.bin", [t for i in range(20) for t in docs[i % len(docs)]])
    trained = run(tiny_gguf, {"train_data": str(tmp_path / "train.bin"), "val_data": ""}, tmp_path / "run",
                  B=1, T=16, max_steps=2)["model"].eval()
    step = tmp_path / "run" / "step_000002"
    assert sorted(p.name for p in step.iterdir()) == ["adapters.pt", "train_state.pt"]  # no tokenizer.model
    back = Llama.build(step, max_seq_len=64, device="cpu", dtype="fp32")  # as trained: dense, not kept quantized
    assert isinstance(back.model.layers[0].attention.wv, torch.nn.Linear)
    x = torch.tensor([docs[0]])
    assert torch.equal(back.model.forward_inference(x), trained.forward_inference(x))
    assert back.tokenizer.n_words == tok.n_words == 258
    assert back.tokenizer.encode("The cat", bos=False, eos=False) == list(b"The cat")


def test_lora_resume_continues_exactly(tiny_ckpt, data, tmp_path):
    straight = run(tiny_ckpt, data, tmp_path / "a", max_steps=6, lora_dropout=0.1)
    run(tiny_ckpt, data, tmp_path / "b", max_steps=6, stop_after=3, lora_dropout=0.1)
    resumed = finetune(out_dir=str(tmp_path / "b"), resume="latest", device="cpu", sample_prompts=[], val_every=0)
    assert resumed["step"] == 6 and resumed["train_loss"] == straight["train_loss"]
    a, b = lora.adapter_state(straight["model"]), lora.adapter_state(resumed["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_with_activation_checkpointing_and_compile_equals_eager(tiny_ckpt, data, tmp_path):
    """Recomputing blocks in the backward and torch.compile change how, not what: the same adapters."""
    eager = run(tiny_ckpt, data, tmp_path / "eager", max_steps=2)
    other = run(tiny_ckpt, data, tmp_path / "other", max_steps=2, checkpoint_activations=True, compile=True)
    assert abs(other["train_loss"] - eager["train_loss"]) <= 1e-5
    a, b = lora.adapter_state(eager["model"]), lora.adapter_state(other["model"])
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_qlora_trains_adapters_on_an_int8_base_and_loads_back_on_it(tiny_ckpt, data, tmp_path):
    model = run(tiny_ckpt, data, tmp_path, quantize="int8")["model"].eval()
    assert isinstance(model.layers[0].attention.wq, quantize.Int8Linear)
    assert all(p.abs().max() > 0 for k, p in lora.adapter_state(model).items() if k.endswith("lora_b"))
    back = Llama.build(tmp_path / "step_000003", max_seq_len=64, device="cpu", dtype="fp32")  # int8, as trained
    assert isinstance(back.model.layers[0].attention.wq, quantize.Int8Linear)
    assert torch.equal(back.model.forward_inference(X), model.forward_inference(X))
    dense = Llama.build(tmp_path / "step_000003", max_seq_len=64, device="cpu", dtype="fp32", quantize="none")
    assert isinstance(dense.model.layers[0].attention.wq, torch.nn.Linear)  # unless asked otherwise


def test_adapters_on_a_changed_base_are_refused(data, tmp_path):
    make_checkpoint(tmp_path / "base", seed=0, dtype=torch.float32, **FINETUNE_SHAPE)
    run(tmp_path / "base", data, tmp_path / "run", max_steps=1)
    make_checkpoint(tmp_path / "base", seed=1, dtype=torch.float32, **FINETUNE_SHAPE)
    with pytest.raises(ConfigError, match="adapters were trained on other weights than") as e:
        Llama.build(tmp_path / "run" / "step_000001", device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, words", [
    (dict(finetune_type="all", quantize="int8"), "--quantize int8 freezes the base"),
    (dict(lora_targets="wq,norm"), "lora_targets norm: not a Linear"),
    (dict(lora_rank=0), "--lora_rank must be an integer >= 1"),
])
def test_bad_lora_finetune_input_is_one_line(tiny_ckpt, data, tmp_path, kw, words):
    with pytest.raises(ConfigError) as e:
        run(tiny_ckpt, data, tmp_path, **kw)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_fsdp_over_a_quantized_base_is_refused_in_one_line():
    from dataclasses import asdict

    from variants import fsdp
    from llama31 import TrainConfig, select_trainable
    cfg = asdict(TrainConfig(finetune_type="lora", quantize="int4", fsdp=True))
    with pytest.raises(ConfigError, match=r"^--fsdp with --quantize int4: the quantized base would not be sharded") as e:
        fsdp.Sharded.of(cfg, 2, "cpu", select_trainable)
    assert "\n" not in str(e.value)
    assert fsdp.Sharded.of(cfg | dict(quantize="none"), 2, "cpu", select_trainable)  # a dense base shards


@pytest.mark.slow
def test_cli_lora_finetune_samples_and_exports(tiny_ckpt, data, tmp_path):
    def cli(*args, script="llama31.py"):
        r = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    cli("finetune", "--ckpt_dir", str(tiny_ckpt), "--train_data", data["train_data"], "--val_data", "",
        "--out_dir", str(tmp_path / "run"), "--B", "2", "--T", "32", "--max_steps", "2", "--device", "cpu",
        "--finetune_type", "lora", "--lora_targets", "wq,wv,w1", "--lora_rank", "2", "--sample_prompts", "[]")
    saved = lora.read_adapters(tmp_path / "run" / "step_000002")
    assert saved["config"].targets == ("wq", "wv", "w1") and saved["config"].rank == 2
    r = cli("--ckpt_dir", str(tmp_path / "run" / "latest"), "--prompts", '["The cat"]', "--max_gen_len", "4",
            "--device", "cpu", "--nostream")
    assert "The cat" in r.stdout
    cli("--ckpt_dir", str(tmp_path / "run" / "step_000002"), "--out_dir", str(tmp_path / "hf"),
        "--format", "hf", script="export.py")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, data, tmp_path_factory):
    """The adapters of one process with 4 micro-steps of accumulation: what 2 processes of 2 give."""
    return finetune(ckpt_dir=str(tiny_ckpt), out_dir=str(tmp_path_factory.mktemp("single")), B=2, T=32, max_steps=3,
                    total_batch_size=4 * 2 * 32, learning_rate=1e-3, warmup_steps=2, val_every=0, device="cpu",
                    sample_prompts=[], finetune_type="lora", **data)["model"]


@pytest.mark.slow
def test_lora_under_ddp_on_two_processes_equals_one_process_with_accumulation(tiny_ckpt, data, tmp_path,
                                                                                 one_process):
    from test_finetune import torchrun
    torchrun(tiny_ckpt, data, tmp_path / "ddp", "ddp", "-", "lora")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    mine = lora.adapter_state(one_process)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert max((rank0[k] - v).abs().max().item() for k, v in mine.items()) < 1e-5
    assert all(rank0[k].abs().max() > 0 for k in mine if k.endswith("lora_b"))


@pytest.mark.slow
def test_lora_under_fsdp_on_two_processes_equals_one_process(tiny_ckpt, data, tmp_path, one_process):
    # frozen base and trainable adapters sharded in the same units; with activation checkpointing,
    # validation, and rank 0 sampling from the gathered base plus adapters
    from test_finetune import torchrun
    log = torchrun(tiny_ckpt, data, tmp_path / "fsdp", "fsdp", "-", "lora")
    assert "FSDP" in log and "val loss" in log and "The cat" in log
    sharded = lora.read_adapters(tmp_path / "fsdp" / "step_000003")["adapters"]
    mine = lora.adapter_state(one_process)
    assert sharded.keys() == mine.keys()
    assert max((sharded[k] - v).abs().max().item() for k, v in mine.items()) < 1e-5
    assert all(sharded[k].abs().max() > 0 for k in mine if k.endswith("lora_b"))
