"""Token shard files in the Parameter Golf challenge format.

A shard is a header of HEADER_INTS little-endian int32 values (SHARD_MAGIC, SHARD_VERSION, the
token count, then zeros) followed by the tokens as little-endian uint16. train_gpt.py has its own
reader; the files written here are byte-for-byte what it (and the challenge's published shards)
expect.

This module is a library; it has no command line. Check a shard from a shell with:
    python -c "import train_gpt; print(train_gpt.load_data_shard('data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin')[:20])"
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_DTYPE = np.dtype("<i4")
TOKEN_DTYPE = np.dtype("<u2")
HEADER_BYTES = HEADER_INTS * HEADER_DTYPE.itemsize
MAX_TOKEN_ID = np.iinfo(TOKEN_DTYPE).max
# The token count is stored in one int32 header slot.
MAX_SHARD_TOKENS = np.iinfo(HEADER_DTYPE).max


def shard_filename(split: str, index: int) -> str:
    """Challenge file name, e.g. shard_filename("train", 3) == "fineweb_train_000003.bin"."""
    return f"fineweb_{split}_{index:06d}.bin"


def make_header(n_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = n_tokens
    return header


def _as_uint16_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{tokens.size} tokens do not fit one shard (max {MAX_SHARD_TOKENS})")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > MAX_TOKEN_ID):
        raise ValueError(
            f"token ids must lie in [0, {MAX_TOKEN_ID}] to be stored as uint16, "
            f"got min {int(tokens.min())} max {int(tokens.max())}"
        )
    return tokens.astype(TOKEN_DTYPE, copy=False)


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> int:
    """Write tokens as one shard and return the token count.

    The file is written to a temporary name in the same directory and then renamed, so an
    interrupted build never leaves a truncated shard that a later run would mistake for a good one.
    """
    path = Path(path)
    data = _as_uint16_tokens(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, and shards should get the usual umask mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(make_header(data.size).tobytes())
            f.write(data.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return int(data.size)
