"""Meta's model-parallel checkpoints (several consolidated.NN.pth) load as the single-file one."""

import json
import shutil

import pytest
import torch

from conftest import make_checkpoint
from llama31 import load_model

# fairscale's layers as Meta's model uses them: ColumnParallelLinear splits the weight's rows,
# RowParallelLinear its columns, VocabParallelEmbedding the vocabulary; RMSNorm gains are copied.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


def split_like_meta(src, dst, n, n_kv_heads, head_dim):
    """Write src's single checkpoint as n model-parallel files into dst."""
    dst.mkdir()
    shutil.copy(src / "params.json", dst / "params.json")
    full = torch.load(src / "consolidated.00.pth")
    shards = [{} for _ in range(n)]
    for key, w in full.items():
        kind = key.split(".")[-2]
        if kind not in SPLIT_DIM:
            for s in shards:
                s[key] = w.clone()
            continue
        if kind in ("wk", "wv") and n > n_kv_heads:  # each file needs whole heads: repeat them
            w = w.view(n_kv_heads, 1, head_dim, -1).expand(-1, n // n_kv_heads, -1, -1).reshape(-1, w.shape[1])
        for s, piece in zip(shards, w.chunk(n, dim=SPLIT_DIM[kind])):
            s[key] = piece.clone()
    for i, s in enumerate(shards):
        torch.save(s, dst / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_checkpoint_gives_the_single_file_logits(tmp_path, n):
    make_checkpoint(tmp_path / "one", seed=5, dtype=torch.float32)
    split_like_meta(tmp_path / "one", tmp_path / "many", n, n_kv_heads=2, head_dim=32)
    assert len(list((tmp_path / "many").glob("*.pth"))) == n
    one = load_model(tmp_path / "one", 64, device="cpu")
    many = load_model(tmp_path / "many", 64, device="cpu")
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    assert torch.equal(one.forward_inference(tokens), many.forward_inference(tokens))


def test_shards_from_different_checkpoints_are_a_clear_error(tmp_path):
    make_checkpoint(tmp_path / "one", seed=5)
    split_like_meta(tmp_path / "one", tmp_path / "many", 2, n_kv_heads=2, head_dim=32)
    s = torch.load(tmp_path / "many" / "consolidated.01.pth")
    del s["layers.1.ffn_norm.weight"]
    torch.save(s, tmp_path / "many" / "consolidated.01.pth")
    with pytest.raises(ValueError, match="layers.1.ffn_norm.weight is in .*00.pth but not in .*01.pth"):
        load_model(tmp_path / "many", 64, device="cpu")


def test_params_with_wrong_kv_heads_for_shards_is_a_clear_error(tmp_path):
    make_checkpoint(tmp_path / "one", seed=5)
    split_like_meta(tmp_path / "one", tmp_path / "many", 4, n_kv_heads=2, head_dim=32)
    params = json.loads((tmp_path / "many" / "params.json").read_text())
    (tmp_path / "many" / "params.json").write_text(json.dumps({**params, "n_kv_heads": 1}))
    with pytest.raises(ValueError, match="copies differ; check n_kv_heads"):
        load_model(tmp_path / "many", 64, device="cpu")
