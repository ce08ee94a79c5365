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
