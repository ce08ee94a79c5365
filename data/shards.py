"""Token shard files in the Parameter Golf challenge format.

A shard is a header of HEADER_INTS little-endian int32 values (SHARD_MAGIC, SHARD_VERSION, the
token count, then zeros) followed by the tokens as little-endian uint16. train_gpt.py has its own
reader (it never imports data/, and data/ never imports it: tests/test_data_tools.py checks that the
two agree); the files written here are byte-for-byte what it (and the challenge's published shards)
expect.

A CaseOps dataset (data/caseops.py) adds a validation byte sidecar: fineweb_val_bytes_NNNNNN.bin beside
each fineweb_val_NNNNNN.bin, in the same format (the public CaseOps export writes the same header), one
uint16 per validation token: the UTF-8 bytes of the original text that token accounts for (0 for BOS and
the case operators). Its glob overlaps the validation shards' (fineweb_val_*.bin), so find_shards leaves
sidecars out and find_byte_sidecars finds them.

Also here: the name of the manifest every dataset folder carries and the hash it records.

This module is a library; it has no command line. Check a shard from a shell with:
    python3 -c "from data.shards import read_shard; print(read_shard('data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin')[:20])"
"""

from __future__ import annotations

import hashlib
import os
import re
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
BYTE_SIDECAR_SPLIT = "val_bytes"  # fineweb_val_bytes_NNNNNN.bin
# Beside the shards, written by data/cached_challenge_fineweb.py (source "challenge") or
# data/build_dataset.py (source "custom"); train_gpt.py keeps the same name (tested).
DATASET_MANIFEST = "dataset_manifest.json"
HASH_CHUNK_BYTES = 1 << 20


class ShardError(ValueError):
    """A file that is not a well-formed shard, or a split whose files do not fit together."""


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


def shard_token_count(path: str | os.PathLike) -> int:
    """The token count of a shard after checking its header and its size against each other."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype=HEADER_DTYPE, count=HEADER_INTS)
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {magic}, expected {SHARD_MAGIC}: not a challenge shard")
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * count
    if count < 0 or size != expected:
        raise ShardError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The values of one checked shard (tokens, or a sidecar's byte counts) as uint16."""
    return np.fromfile(path, dtype=TOKEN_DTYPE, count=shard_token_count(path), offset=HEADER_BYTES)


def _split_files(data_path: str | os.PathLike, split: str) -> list[Path]:
    pattern = re.compile(rf"fineweb_{re.escape(split)}_\d+\.bin")
    return sorted(p for p in Path(data_path).glob(f"fineweb_{split}_*.bin") if pattern.fullmatch(p.name))


def find_shards(data_path: str | os.PathLike, split: str) -> list[Path]:
    """The shards of a split in order: fineweb_<split>_<digits>.bin only, so a byte sidecar
    (fineweb_val_bytes_*.bin, which the glob fineweb_val_*.bin also matches) is never read as tokens."""
    files = _split_files(data_path, split)
    if not files:
        raise FileNotFoundError(f"no {split} shards fineweb_{split}_NNNNNN.bin in {data_path}")
    return files


def find_byte_sidecars(data_path: str | os.PathLike) -> list[Path]:
    """The validation byte sidecar files in order; empty for a dataset without one (not CaseOps)."""
    return _split_files(data_path, BYTE_SIDECAR_SPLIT)


def load_split(data_path: str | os.PathLike, split: str) -> np.ndarray:
    return np.concatenate([read_shard(f) for f in find_shards(data_path, split)])


def load_byte_sidecar(data_path: str | os.PathLike, bos_id: int | None = None) -> np.ndarray | None:
    """The validation byte sidecar, checked against the validation shards, or None when the dataset has
    none. Sidecar file i must exist for validation shard i and hold exactly as many values (the public
    export and ours cut both at the same places); with bos_id, every BOS must count 0 bytes. A mismatch
    raises ShardError naming the file."""
    sidecars = find_byte_sidecars(data_path)
    if not sidecars:
        return None
    shards = find_shards(data_path, "val")
    names = {p.name.replace(f"_{BYTE_SIDECAR_SPLIT}_", "_val_"): p for p in sidecars}
    orphans = sorted(set(names) - {p.name for p in shards})
    if orphans:
        raise ShardError(f"{names[orphans[0]]}: a byte sidecar without its validation shard {orphans[0]}")
    parts = []
    for shard in shards:
        sidecar = shard.with_name(shard.name.replace("_val_", f"_{BYTE_SIDECAR_SPLIT}_"))
        if not sidecar.is_file():
            raise ShardError(f"{sidecar}: missing: the byte sidecar of {shard.name} (the other validation shards have one)")
        n_tokens, n_bytes = shard_token_count(shard), shard_token_count(sidecar)
        if n_tokens != n_bytes:
            raise ShardError(f"{sidecar}: {n_bytes} byte counts for the {n_tokens} tokens of {shard.name}: "
                             f"the sidecar does not belong to these shards")
        values = read_shard(sidecar)
        if bos_id is not None:
            bad = np.flatnonzero((read_shard(shard) == bos_id) & (values != 0))
            if len(bad):
                raise ShardError(f"{sidecar}: BOS at position {int(bad[0])} counts {int(values[bad[0]])} bytes, "
                                 f"expected 0: the sidecar does not belong to these shards")
        parts.append(values)
    return np.concatenate(parts)


def sha256_files(paths) -> str:
    """sha256 of the files' bytes, concatenated in the order given (as train_gpt.py computes it)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()
