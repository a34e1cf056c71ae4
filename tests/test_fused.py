"""fused.py: a model built to decode does wq wk wv and w1 w3 as one product each, in every format
(dense, int8, int4), and gives what the separate products give, eager and compiled; what it saves
holds Meta's names and tensors, which HF transformers reads back to the same logits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from variants import compiled
import formats
from variants import fused
from variants import lora
from variants import quantize
from conftest import make_checkpoint
from llama31 import Llama, save_meta

REPO = Path(__file__).resolve().parents[1]
MODES = ["none", "int8", "int4"]
# random ids from the 128256-token vocabulary, a prompt of 11
TOKENS = torch.tensor([[128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 1404, 1054]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Row counts that are not whole 64-row blocks: wq 96 + wk 32 + wv 32, w1 + w3 2 x 256."""
    path = tmp_path_factory.mktemp("fused")
    make_checkpoint(path, seed=5, dtype=torch.float32, dim=96, n_layers=2, n_heads=3, n_kv_heads=1, multiple_of=32)
    return path


def build(ckpt, mode, fuse, dtype="fp32", compile=False):
    return Llama.build(ckpt, max_seq_len=64, max_batch_size=1, device="cpu", dtype=dtype, quantize=mode,
                       fuse=fuse, compile=compile)


def products(block) -> list:
    return sorted(name for name, m in block.named_modules() if hasattr(m, "in_features"))


def near(a, b, tol=1e-5) -> bool:
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def steps(llama, n_prompt: int = 6):
    """Logits of a prefill of the first n_prompt tokens, then of each next token one at a time."""
    out = []
    with torch.inference_mode(), llama.decoder.caches(1, 64):  # as generate_stream runs them
        out.append(llama.decoder.logits(TOKENS[:, :n_prompt], 0))
        for pos in range(n_prompt, TOKENS.shape[1]):
            out.append(llama.decoder.logits(TOKENS[:, pos:pos + 1], pos))
    return torch.stack(out)


@pytest.mark.parametrize("mode", MODES)
def test_a_fused_model_gives_the_separate_products_logits_and_tokens(ckpt, mode):
    apart, joined = build(ckpt, mode, fuse=False), build(ckpt, mode, fuse=True)
    block = joined.model.layers[0]
    assert products(apart.model.layers[0]) == ["attention.wk", "attention.wo", "attention.wq", "attention.wv",
                                               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert products(block) == ["attention.wo", "attention.wqkv", "feed_forward.w13", "feed_forward.w2"]
    assert type(block.attention.wqkv) is type(apart.model.layers[0].attention.wq)  # the same format
    assert near(joined.model.forward_inference(TOKENS), apart.model.forward_inference(TOKENS))
    assert near(steps(joined), steps(apart))
    prompt = TOKENS[0].tolist()
    assert joined.generate([prompt], 12, temperature=0) == apart.generate([prompt], 12, temperature=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_compiled_fused_model_gives_the_separate_products_logits(ckpt, mode, monkeypatch):
    apart, joined = build(ckpt, mode, fuse=False), build(ckpt, mode, fuse=True, compile=True)
    # compiled, an fp32 model hands the int kernels its rows in fp32 (quantize.kernel_rows; eager
    # decoding casts them to bf16): the eager reference here keeps them fp32 as well
    monkeypatch.setattr(quantize, "kernel_rows", lambda x: x.contiguous())
    assert isinstance(joined.decoder, compiled.StaticDecoder) and joined.model.layers[0].feed_forward.w13 is not None
    assert near(steps(joined), steps(apart))
    prompt = TOKENS[0].tolist()
    assert joined.generate([prompt], 8, temperature=0) == apart.generate([prompt], 8, temperature=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_fused_model_state_dict_is_the_separate_one(ckpt, mode):
    apart, joined = build(ckpt, mode, fuse=False).model.state_dict(), build(ckpt, mode, fuse=True).model.state_dict()
    assert list(joined) == list(apart)  # Meta's names, in Meta's order
    assert all(torch.equal(joined[k], apart[k]) for k in apart)
    if mode == "none":
        meta = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
        assert all(torch.equal(joined[k], meta[k]) for k in meta)


def test_a_saved_fused_model_is_meta_checkpoint_and_hf_reads_it(ckpt, tmp_path):
    llama = build(ckpt, "none", fuse=True)
    save_meta(llama.model, tmp_path / "meta", dtype=torch.float32)
    meta = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    saved = torch.load(tmp_path / "meta" / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert list(saved) == list(meta) and all(torch.equal(saved[k], meta[k]) for k in meta)
    formats.save_hf(llama.model.state_dict(), llama.model.args.to_params(), tmp_path / "hf", dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(TOKENS).logits
    assert near(llama.model.forward_inference(TOKENS), want, 1e-4)


def test_fusing_leaves_lora_wrapped_and_mixed_products_apart(ckpt):
    llama = build(ckpt, "none", fuse=False)
    lora.add_adapters(llama.model, lora.LoRAConfig(rank=2, targets=("wq", "wk", "wv")))
    assert fused.fuse(llama.model) == 2  # each block's w1 w3; the adapted wq wk wv stay apart
    for block in llama.model.layers:
        assert block.attention.wqkv is None and hasattr(block.attention, "wq") and block.feed_forward.w13 is not None
    assert not fused.joinable([torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=True)])
    assert not fused.joinable([torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(16, 4, bias=False)])



@pytest.mark.parametrize("mode", MODES)
def test_unfuse_gives_back_the_separate_products(ckpt, mode):
    apart, llama = build(ckpt, mode, fuse=False), build(ckpt, mode, fuse=True)
    assert fused.unfuse(llama.model) == 4 and fused.unfuse(llama.model) == 0  # 2 blocks x (wqkv, w13); once
    assert products(llama.model.layers[0]) == products(apart.model.layers[0])
    for a, b in zip(llama.model.layers[0].modules(), apart.model.layers[0].modules()):
        assert type(a) is type(b)  # matvec.Linear, Int8Linear, Int4Linear as loaded
    want, got = apart.model.state_dict(), llama.model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert near(steps(llama), steps(apart))


def test_lora_refuses_a_fused_model_and_adapts_it_once_unfused(ckpt):
    llama = build(ckpt, "none", fuse=True)
    config = lora.LoRAConfig(rank=2, targets=("wq", "w1"))
    with pytest.raises(lora.ConfigError, match=r"layers\.0\.attention does its products fused .*fused\.unfuse"):
        lora.add_adapters(llama.model, config)
    fused.unfuse(llama.model)
    assert len(lora.add_adapters(llama.model, config)) == 4  # wq and w1 of 2 blocks


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_fused_model_loads_meta_state_dicts(ckpt, mode):
    """load_state_dict joins Meta's parts' rows into the fused products (another model's weights here)."""
    llama, other = build(ckpt, mode, fuse=True), build(ckpt, mode, fuse=False)
    other.model.load_state_dict(llama.model.state_dict())  # a round trip, then other weights in
    with torch.no_grad():  # every tensor changed: int8's rows are buffers, not parameters
        for t in other.model.state_dict().values():
            t.copy_(t * 0.5 if t.is_floating_point() else t.roll(1, dims=0))
    llama.model.load_state_dict(other.model.state_dict())
    assert near(steps(llama), steps(other))


def test_a_fused_int4_model_asks_for_unfuse_before_load_state_dict(ckpt):
    llama = build(ckpt, "int4", fuse=True)
    with pytest.raises(lora.ConfigError, match=r"layers\.0\.attention\.wqkv is fused int4 .*fused\.unfuse"):
        llama.model.load_state_dict(llama.model.state_dict())


def test_fusing_a_memory_mapped_checkpoint_keeps_its_memory(tmp_path):
    """A bf16 Meta file loaded in bf16 on a CPU is used in place (memory-mapped); the fused copies'
    parts are dropped from memory, so the process grows as much as without fusing."""
    model = make_checkpoint(tmp_path, seed=1, dtype=torch.bfloat16, dim=512, n_layers=8, n_heads=8, n_kv_heads=2)
    parts = tuple(f"{p}.weight" for p in ("wq", "wk", "wv", "w1", "w3"))
    joined = sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith(parts))
    code = ("import sys; from llama31 import Llama\n"
            "def rss(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
            "before = rss(); llama = Llama.build(sys.argv[1], max_seq_len=64, device='cpu', dtype='bf16', "
            "fuse=sys.argv[2] == '1'); print(rss() - before)")
    grown = [int(subprocess.run([sys.executable, "-c", code, str(tmp_path), f], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.split()[-1]) for f in "01"]  # KiB
    assert grown[1] < grown[0] + joined / 1024 / 4, (grown, joined)  # kept both: + all of joined
