"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from Hugging Face.

Fetches, from the dataset repo willdepueoai/parameter-golf (files under "datasets/"):
datasets/manifest.json first, then for the chosen variant the whole validation split, the first N
training shards and the tokenizer files. They land in the layout train_gpt.py defaults to:

    data/manifest.json
    data/datasets/fineweb10B_<variant>/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    data/tokenizers/fineweb_1024_bpe.model, fineweb_1024_bpe.vocab   (for sp1024)

Files already present locally are skipped (and logged); downloads land under a temporary name and
are renamed when complete, so an interrupted run never leaves a partial file that would be skipped.

Manifest layout (as read by the challenge's own data/cached_challenge_fineweb.py):

    {
      "datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
         "stats": {"files_train": 195, "files_val": 1, ...}, ...},
        ...
      ],
      "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab", ...},
        ...
      ]
    }

Shards are at datasets/datasets/<name>/fineweb_{val,train}_NNNNNN.bin and tokenizer paths are
relative to the datasets/ root. The parser is lenient: "datasets"/"tokenizers" may also be objects
keyed by name, shard counts may sit directly on the dataset entry, a tokenizer entry may give a
single "path", and a dataset without a tokenizer_name gets the tokenizer whose name or files
mention its vocabulary (fineweb_1024_bpe for sp1024).

Run:
    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

REPO_ID = "willdepueoai/parameter-golf"
REPO_TYPE = "dataset"
REMOTE_ROOT = "datasets"
MANIFEST_NAME = "manifest.json"
DATASET_PREFIX = "fineweb10B_"
DATA_DIR = Path(__file__).resolve().parent
DEFAULT_VARIANT = "sp1024"
# 80 shards of 100 M tokens = 8 B training tokens, the usual choice for a record run.
DEFAULT_TRAIN_SHARDS = 80
TOKENIZER_PATH_KEYS = ("model_path", "vocab_path", "path")

# download(remote_path, destination): fetch one repo file (path relative to the repo root) to
# destination. Tests pass a fake; the real one is hf_download below.
Downloader = Callable[[str, Path], None]


class DownloadError(RuntimeError):
    """A file could not be fetched from the Hugging Face repo."""


@dataclass(frozen=True)
class FileToFetch:
    remote: str  # path inside the Hugging Face repo
    local: Path


# ----------------------------------------------------------------------------------------------
# Manifest parsing


def _entries(manifest: dict, key: str) -> list[dict]:
    value = manifest.get(key) or []
    if isinstance(value, dict):
        return [{"name": name, **entry} for name, entry in value.items()]
    return [entry for entry in value if isinstance(entry, dict)]


def available_variants(manifest: dict) -> list[str]:
    names = [str(entry.get("name", "")) for entry in _entries(manifest, "datasets")]
    return sorted(name.removeprefix(DATASET_PREFIX) for name in names if name)


def find_dataset(manifest: dict, variant: str) -> dict:
    wanted = {variant, DATASET_PREFIX + variant}
    for entry in _entries(manifest, "datasets"):
        if entry.get("name") in wanted:
            return entry
    offered = ", ".join(available_variants(manifest)) or "none"
    raise ValueError(f"unknown variant {variant!r}; the manifest offers: {offered}")


def shard_counts(dataset: dict) -> tuple[int, int]:
    """(train, val) shard counts of a dataset entry."""
    stats = dataset.get("stats") or {}
    counts = []
    for split in ("train", "val"):
        value = stats.get(f"files_{split}", dataset.get(f"files_{split}", dataset.get(f"{split}_shards")))
        if value is None:
            raise ValueError(f"manifest entry {dataset.get('name')!r} gives no files_{split} count")
        counts.append(int(value))
    return counts[0], counts[1]


def _vocab_tag(variant: str) -> str:
    return variant.removeprefix("sp")


def find_tokenizer(manifest: dict, dataset: dict, variant: str) -> dict:
    tokenizers = _entries(manifest, "tokenizers")
    name = dataset.get("tokenizer_name")
    if name is not None:
        for entry in tokenizers:
            if entry.get("name") == name:
                return entry
        raise ValueError(f"manifest names tokenizer {name!r} for {dataset.get('name')!r} but does not list it")
    tag = f"_{_vocab_tag(variant)}"
    for entry in tokenizers:
        mentions = [str(entry.get("name", ""))] + [str(entry.get(k, "")) for k in TOKENIZER_PATH_KEYS]
        if any(tag in m for m in mentions):
            return entry
    raise ValueError(f"manifest lists no tokenizer for variant {variant!r}")


def tokenizer_files(tokenizer: dict) -> list[str]:
    """Tokenizer artifact paths, relative to the remote root (e.g. tokenizers/x.model)."""
    paths = [str(tokenizer[k]) for k in TOKENIZER_PATH_KEYS if tokenizer.get(k)]
    if not paths:
        raise ValueError(f"tokenizer entry {tokenizer.get('name')!r} lists no files")
    return paths


# ----------------------------------------------------------------------------------------------
# Planning and fetching


def manifest_file(data_dir: Path) -> FileToFetch:
    return FileToFetch(f"{REMOTE_ROOT}/{MANIFEST_NAME}", data_dir / MANIFEST_NAME)


def plan_downloads(manifest: dict, variant: str, train_shards: int, data_dir: Path) -> list[FileToFetch]:
    """Every file to fetch for variant: all val shards, the first train_shards, the tokenizer."""
    if train_shards < 0:
        raise ValueError(f"--train-shards must be non-negative, got {train_shards}")
    dataset = find_dataset(manifest, variant)
    n_train, n_val = shard_counts(dataset)
    if train_shards > n_train:
        raise ValueError(
            f"variant {variant!r} has only {n_train} training shards; the maximum for --train-shards is {n_train}"
        )
    name = dataset["name"] if str(dataset["name"]).startswith(DATASET_PREFIX) else DATASET_PREFIX + variant
    remote_dir = f"{REMOTE_ROOT}/datasets/{name}"
    local_dir = data_dir / "datasets" / name
    shards = [f"fineweb_val_{i:06d}.bin" for i in range(n_val)]
    shards += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    plan = [FileToFetch(f"{remote_dir}/{shard}", local_dir / shard) for shard in shards]
    for path in tokenizer_files(find_tokenizer(manifest, dataset, variant)):
        relative = PurePosixPath(path.lstrip("/"))
        plan.append(FileToFetch(f"{REMOTE_ROOT}/{relative}", data_dir / "tokenizers" / relative.name))
    return plan


def fetch(item: FileToFetch, download: Downloader, log: Callable[[str], None]) -> bool:
    """Fetch one file unless it already exists; returns True if it was downloaded."""
    if item.local.exists():
        log(f"skip {item.local} (already present)")
        return False
    log(f"fetch {item.remote} -> {item.local}")
    item.local.parent.mkdir(parents=True, exist_ok=True)
    try:
        download(item.remote, item.local)
    except Exception as e:  # network, auth, missing file: all reported the same way
        raise DownloadError(f"could not fetch {item.remote} from {REPO_ID}: {type(e).__name__}: {e}") from e
    if not item.local.exists():
        raise DownloadError(f"could not fetch {item.remote} from {REPO_ID}: downloader wrote no file")
    return True


def load_manifest(data_dir: Path, download: Downloader, log: Callable[[str], None]) -> dict:
    item = manifest_file(data_dir)
    fetch(item, download, log)
    try:
        return json.loads(item.local.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{item.local} is not valid JSON ({e}); delete it and run again") from None


def download_variant(
    variant: str,
    train_shards: int,
    data_dir: Path = DATA_DIR,
    download: Downloader | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fetch manifest, shards and tokenizer for variant; returns lists of downloaded/skipped paths."""
    download = download or hf_download
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir, download, log)
    plan = plan_downloads(manifest, variant, train_shards, data_dir)
    downloaded, skipped = [], []
    for item in plan:
        (downloaded if fetch(item, download, log) else skipped).append(item.local)
    return {"downloaded": downloaded, "skipped": skipped, "files": [item.local for item in plan]}


def hf_download(remote_path: str, destination: Path) -> None:
    """The real downloader: hf_hub_download into the HF cache, then link or copy into place."""
    from huggingface_hub import hf_hub_download

    cached = Path(hf_hub_download(repo_id=REPO_ID, filename=remote_path, repo_type=REPO_TYPE)).resolve()
    tmp = destination.with_name(f"{destination.name}.{os.getpid()}.tmp")
    try:
        try:
            os.link(cached, tmp)  # a hard link avoids a second copy of multi-GB shards
        except OSError:
            shutil.copyfile(cached, tmp)
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download challenge FineWeb shards and tokenizer from Hugging Face.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variant", default=DEFAULT_VARIANT, help="tokenizer variant, e.g. sp1024")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help="number of training shards (100 M tokens each) to fetch")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help="local root holding datasets/ and tokenizers/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = download_variant(args.variant, args.train_shards, args.data_dir)
    except (DownloadError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"done: {len(result['downloaded'])} downloaded, {len(result['skipped'])} already present")


if __name__ == "__main__":
    main()
