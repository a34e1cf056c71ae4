"""Shared fixtures: the real Llama 3 tokenizer and small random-weight checkpoints in Meta's layout."""

import pytest
import torch

from llama31 import ModelArgs, Transformer, save_meta
from tokenizer import Tokenizer, find_tokenizer_model

# Small but complete: GQA 4:1, the real 128256 vocab, Llama 3.1 RoPE scaling, an FFN multiplier.
SMALL = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=64,
             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


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
