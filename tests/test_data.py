"""The Data section: the shard reader (round trip, corrupt shards and missing datasets named), the token
stream across shards, and the distributed loader's split of one global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import train_gpt as tg
from data.shards import write_shard


# ---- shards -------------------------------------------------------------------------------------


def test_shard_roundtrip(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    write_shard(tmp_path / "s.bin", tokens)
    assert np.array_equal(tg.load_data_shard(tmp_path / "s.bin"), tokens)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:500], "shorter than"),
    (lambda b: b[:-2], "header says 100 tokens"),
    (lambda b: (123).to_bytes(4, "little") + b[4:], "bad magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
])
def test_corrupt_shard_names_the_file(tmp_path, damage, message):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        tg.load_data_shard(path)
    assert str(path) in str(err.value)


def test_missing_dataset_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="cached_challenge_fineweb.py"):
        tg.find_shards(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "nope.model"))


def _positional_shards(tmp_path, sizes):
    """Shards whose token values are their global positions, so a batch shows where it came from."""
    files, offset = [], 0
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(files[-1], np.arange(offset, offset + n))
        offset += n
    return files


def test_stream_crosses_shards_and_wraps(tmp_path):
    stream = tg.TokenStream(_positional_shards(tmp_path, [10, 5]))
    assert stream.take(12).tolist() == list(range(12))
    assert stream.take(6).tolist() == [12, 13, 14, 0, 1, 2]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_split_the_same_global_batch(tmp_path, world_size):
    files = _positional_shards(tmp_path, [3000, 2000])
    seq_len, global_tokens = 16, 16 * 16
    single = tg.DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    ranks = [tg.DistributedTokenLoader(files, r, world_size, torch.device("cpu")) for r in range(world_size)]
    for _ in range(3):
        x1, y1 = single.next_batch(global_tokens, seq_len)
        parts = [loader.next_batch(global_tokens, seq_len) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
        # Disjoint: no input position is read by two ranks.
        seen = torch.cat([p[0].flatten() for p in parts])
        assert len(torch.unique(seen)) == len(seen)


def test_coprime_loader_cuts_each_block_into_rows_of_the_steps_length(tmp_path):
    files = _positional_shards(tmp_path, [1000, 1601, 300])
    cpu = torch.device("cpu")
    full, cut = (tg.CoprimeLoader(files, 0, 1, cpu, 32, seed=5) for _ in range(2))
    for _ in range(3):
        x32, y32 = full.next_batch(32 * 16, 32)
        x16, y16 = cut.next_batch(32 * 16, 16)
        assert x16.shape == (32, 16)
        # The same blocks in the same order, each cut into two consecutive rows: the tokens of the step, and
        # every input's target, do not depend on the length.
        assert torch.equal(x16.reshape(16, 32), x32) and torch.equal(y16.reshape(16, 32), y32)
    ranks = [tg.CoprimeLoader(files, r, 2, cpu, 32, seed=5) for r in range(2)]
    single = tg.CoprimeLoader(files, 0, 1, cpu, 32, seed=5)
    x, _ = single.next_batch(32 * 16, 8)
    assert torch.equal(torch.cat([loader.next_batch(32 * 16, 8)[0] for loader in ranks]), x)
    with pytest.raises(ValueError, match="rows of 24"):
        single.next_batch(32 * 16, 24)


def test_coprime_order_visits_every_block_once_per_pass():
    counts = [7, 12, 1, 30, 9]
    order = tg.CoprimeBlockOrder(counts, seed=3)
    for _ in range(2):
        shards, blocks = order.take(sum(counts))
        for j, n in enumerate(counts):
            mine = blocks[shards == j]
            assert sorted(mine.tolist()) == list(range(n))
        assert not all((np.diff(blocks[shards == 3]) == 1))  # scrambled, not sequential


def test_coprime_order_draws_shards_in_proportion_to_remaining_blocks():
    order = tg.CoprimeBlockOrder([3000, 1000], seed=0)
    shards, _ = order.take(4000)
    first = shards[:800]
    assert abs((first == 0).mean() - 0.75) < 0.06
    # Proportional to what is left, not to the shard sizes: both shards run out near the end together.
    for j in (0, 1):
        assert np.flatnonzero(shards == j).max() > 0.98 * 4000


def test_coprime_order_is_a_function_of_the_seed():
    a, b, c = (tg.CoprimeBlockOrder([50, 70], seed=s).take(120) for s in (1, 1, 2))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_coprime_loader_ranks_slice_the_same_global_batch(tmp_path, world_size):
    sizes = [1000, 1601, 300]
    files = _positional_shards(tmp_path, sizes)
    starts = np.cumsum([0] + sizes[:-1])
    seq_len, global_tokens = 16, 16 * 16
    cpu = torch.device("cpu")
    single = tg.CoprimeLoader(files, 0, 1, cpu, seq_len, seed=5)
    ranks = [tg.CoprimeLoader(files, r, world_size, cpu, seq_len, seed=5) for r in range(world_size)]
    seen = []
    for _ in range(6):
        x1, y1 = single.next_batch(global_tokens, seq_len)
        parts = [loader.next_batch(global_tokens, seq_len) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal(y1[:, -1], x1[:, -1] + 1)
        assert torch.equal(x1, x1[:, :1] + torch.arange(seq_len))  # one contiguous block of one shard
        shard = np.searchsorted(starts, x1[:, 0].numpy(), side="right") - 1
        assert ((x1[:, 0].numpy() - starts[shard]) % seq_len == 0).all()  # at a block boundary
        seen += x1[:, 0].tolist()
    assert len(set(seen)) == len(seen)  # 96 of the 180 blocks: no block twice within the pass


def test_coprime_loader_skips_short_shards_and_fails_when_all_are(tmp_path):
    files = _positional_shards(tmp_path, [16, 500])  # 16 tokens cannot hold a 16-token input + target
    loader = tg.CoprimeLoader(files, 0, 1, torch.device("cpu"), 16, seed=0)
    assert loader.order.counts.tolist() == [(500 - 1) // 16]
    with pytest.raises(ValueError, match="TRAIN_SEQ_LEN"):
        tg.CoprimeLoader(files[:1], 0, 1, torch.device("cpu"), 16, seed=0)
