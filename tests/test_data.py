"""Token shards on disk and DistributedShardedDataLoader.

Test shards hold distinct tokens (shard k holds k*10000 + 0, 1, 2, ...), so every token names its
own shard and position, and a batch can be checked against the file without the loader's help."""

import numpy as np
import pytest
import torch

from formats import write_datafile
from llama31 import DistributedShardedDataLoader
from tokenizer import ConfigError

MAGIC, VERSION = 20240801, 7


def shard_tokens(k: int, n: int) -> np.ndarray:
    return k * 10000 + np.arange(n, dtype=np.uint32)


def write_shards(tmp_path, sizes, prefix="shard"):
    """Shards tmp_path/prefix_000.bin, ... with the given token counts; returns the glob pattern."""
    for k, n in enumerate(sizes):
        write_datafile(tmp_path / f"{prefix}_{k:03d}.bin", shard_tokens(k, n))
    return str(tmp_path / f"{prefix}_*.bin")


def raw_shard(path, header_ints, tokens):
    """Write a shard by hand, header and all, to make broken ones."""
    header = np.zeros(256, dtype="<i4")
    header[:len(header_ints)] = header_ints
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u4").tobytes())
    return path


def batches(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


# -----------------------------------------------------------------------------
# write_datafile


def test_write_datafile_writes_header_then_uint32_tokens(tmp_path):
    path = tmp_path / "a.bin"
    write_datafile(path, [5, 0, 128255, 2**32 - 1])
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, VERSION, 4] and not header[3:].any()
    assert np.fromfile(path, dtype="<u4", offset=1024).tolist() == [5, 0, 128255, 2**32 - 1]


def test_write_datafile_leaves_only_the_finished_file(tmp_path):
    write_datafile(tmp_path / "a.bin", np.arange(10))
    write_datafile(tmp_path / "a.bin", np.arange(3))  # replaces, never appends
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert np.fromfile(tmp_path / "a.bin", dtype="<u4", offset=1024).tolist() == [0, 1, 2]


@pytest.mark.parametrize("tokens", [[1, -1], [2**32], [0.5]])
def test_write_datafile_rejects_tokens_that_are_not_uint32(tmp_path, tokens):
    with pytest.raises(ConfigError, match="a.bin"):
        write_datafile(tmp_path / "a.bin", tokens)
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# reading batches


def test_loader_reports_total_tokens_of_all_shards(tmp_path):
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [100, 57, 80]), B=2, T=4)
    assert loader.ntok_total == 237


def test_batches_are_int64_and_y_is_x_shifted_by_one(tmp_path):
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [100]), B=2, T=4)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
    assert x.flatten().tolist() == list(range(8))
    assert torch.equal(y, x + 1)  # each target is the token that follows its input in the file


def test_two_ranks_cover_the_tokens_of_one_rank_without_overlap(tmp_path):
    B, T = 2, 4
    pattern = write_shards(tmp_path, [4 * B * T + 1, 4 * B * T + 1])
    one = [x for x, _ in batches(DistributedShardedDataLoader(pattern, B, T, 0, 1), 8)]
    ranks = [[x for x, _ in batches(DistributedShardedDataLoader(pattern, B, T, r, 2), 4)] for r in (0, 1)]
    seen = [set(torch.cat(xs).flatten().tolist()) for xs in ranks]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(torch.cat(one).flatten().tolist())
    # step s of rank r is step 2s + r of a single rank
    for s in range(4):
        for r in (0, 1):
            assert torch.equal(ranks[r][s], one[2 * s + r])


def test_a_step_that_would_run_past_a_shard_moves_to_the_next_shard(tmp_path):
    B, T = 1, 4
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [2 * B * T + 3, 20]), B, T)
    xs = [x.flatten().tolist() for x, _ in batches(loader, 3)]
    assert xs[0] == [0, 1, 2, 3] and xs[1] == [4, 5, 6, 7]
    assert xs[2] == [10000, 10001, 10002, 10003]  # shard 0's last 3 tokens are skipped


def test_no_window_spans_two_shards(tmp_path):
    B, T = 2, 3
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [15, 22, 13]), B, T, 1, 2)
    for x, y in batches(loader, 20):
        shards = set((torch.cat([x, y[:, -1:]], 1) // 10000).flatten().tolist())
        assert len(shards) == 1


def test_after_the_last_shard_the_loader_wraps_to_the_first(tmp_path):
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [9, 9]), B=1, T=8)
    firsts = [x[0, 0].item() for x, _ in batches(loader, 3)]
    assert firsts == [0, 10000, 0]


def test_reset_starts_again_from_the_first_batch(tmp_path):
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [30, 30]), B=1, T=4)
    first = loader.next_batch()
    batches(loader, 9)
    loader.reset()
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), first))


def test_state_dict_resumes_the_same_batches_on_every_rank(tmp_path):
    pattern = write_shards(tmp_path, [50, 50])
    rank0 = DistributedShardedDataLoader(pattern, 1, 4, 0, 2)
    batches(rank0, 7)  # into the second shard
    state = rank0.state_dict()
    expected0 = batches(rank0, 5)
    fresh0, fresh1 = (DistributedShardedDataLoader(pattern, 1, 4, r, 2) for r in (0, 1))
    fresh0.load_state_dict(state)
    fresh1.load_state_dict(state)  # rank 0's state is every rank's state
    for (x, y), (x0, y0), (x1, _) in zip(expected0, batches(fresh0, 5), batches(fresh1, 5)):
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert torch.equal(x1, x0 + 4)  # rank 1 reads the window after rank 0's


def test_load_state_dict_rejects_a_state_from_other_data(tmp_path):
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [50, 50]), 1, 4)
    with pytest.raises(ConfigError, match="shard 5"):
        loader.load_state_dict({"shard": 5, "position": 0})
    with pytest.raises(ConfigError, match="other.bin"):
        loader.load_state_dict({"shard": 1, "position": 0, "shard_file": "other.bin"})
    with pytest.raises(ConfigError, match="position 51"):
        loader.load_state_dict({"shard": 1, "position": 51})


def test_shards_are_memory_mapped_not_read_whole(tmp_path):
    loader = DistributedShardedDataLoader(write_shards(tmp_path, [100]), B=2, T=4)
    assert isinstance(loader.tokens, np.memmap)


# -----------------------------------------------------------------------------
# clear errors


def test_a_pattern_matching_no_files_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no token shards match .*nothing_\\*.bin"):
        DistributedShardedDataLoader(str(tmp_path / "nothing_*.bin"), 1, 4)


@pytest.mark.parametrize("header, tokens, problem", [
    ([12345, VERSION, 20], range(20), "magic 12345"),
    ([MAGIC, 1, 20], range(20), "version 1"),
    ([MAGIC, VERSION, 20], range(19), "truncated"),
    ([MAGIC, VERSION, 20], range(21), "truncated or corrupt"),
    ([MAGIC, VERSION, -3], [], "truncated or corrupt"),
], ids=["corrupt-magic", "wrong-version", "truncated", "trailing-bytes", "negative-count"])
def test_a_bad_header_names_the_file(tmp_path, header, tokens, problem):
    write_shards(tmp_path, [40])
    bad = raw_shard(tmp_path / "shard_001.bin", header, tokens)
    with pytest.raises(ConfigError, match=problem) as e:
        DistributedShardedDataLoader(str(tmp_path / "shard_*.bin"), 1, 4)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_a_file_shorter_than_the_header_names_the_file(tmp_path):
    (tmp_path / "shard_000.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match="shard_000.bin is 100 bytes, too short"):
        DistributedShardedDataLoader(str(tmp_path / "shard_*.bin"), 1, 4)


def test_a_shard_smaller_than_one_step_is_a_clear_error(tmp_path):
    B, T, ranks = 2, 4, 2
    write_shards(tmp_path, [100, B * T * ranks])  # one token short of B*T*ranks + 1
    with pytest.raises(ConfigError, match="shard_001.bin holds 16 tokens, fewer than the 17"):
        DistributedShardedDataLoader(str(tmp_path / "shard_*.bin"), B, T, 0, ranks)
    DistributedShardedDataLoader(str(tmp_path / "shard_*.bin"), B, T, 0, 1)  # one rank needs 9


@pytest.mark.parametrize("B, T, rank, ranks, problem", [
    (0, 4, 0, 1, "B"), (1, 0, 0, 1, "T"), (1, 4, 2, 2, "process_rank 2"), (1, 4, -1, 2, "process_rank -1"),
])
def test_bad_batch_shape_or_rank_is_a_clear_error(tmp_path, B, T, rank, ranks, problem):
    pattern = write_shards(tmp_path, [100])
    with pytest.raises(ConfigError, match=problem):
        DistributedShardedDataLoader(pattern, B, T, rank, ranks)
