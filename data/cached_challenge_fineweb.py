"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from Hugging Face.

Fetches, from the dataset repo willdepueoai/parameter-golf (files under "datasets/"):
datasets/manifest.json first, then for the chosen variant the whole validation split, the first N
training shards and the tokenizer files. They land in the layout train_gpt.py defaults to:

    data/manifest.json
    data/datasets/fineweb10B_<variant>/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    data/tokenizers/fineweb_1024_bpe.model, fineweb_1024_bpe.vocab   (for sp1024)

Every shard's size is checked against the one the manifest implies (its token counts and shard
size); a present file of the right size is skipped (and logged), one of another size is fetched again.
The sha256 of each downloaded file, and of the validation shards and tokenizer already present, is
checked against the hub's own (its LFS hash) when the hub gives one. Downloads land under a temporary
name and are renamed when complete, so an interrupted run never leaves a partial file.

Then dataset_manifest.json is written beside the shards (source "challenge", the repo, what was
checked, the sha256 of the validation shards and of the tokenizer): train_gpt.py logs it with the
hashes it recomputes, and scripts/make_record.py accepts only runs on such data as records.

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

CaseOps (data/caseops.py): --variant sp8192_lossless_caps_caseops_v1_reserved fetches the public CaseOps
export from romeerp/parameter-golf-caseops-v1 (the default --repo-id for that variant), same layout and
checks. Its dataset entry names "val_bytes_glob", so the validation byte sidecar
fineweb_val_bytes_NNNNNN.bin comes with each validation shard (the same size: one uint16 per token), is
checked against the shards, and dataset_manifest.json records it ("val_bytes") and the tokenizer's
"text_transform". A variant whose tokenizer names a text transform but that has no sidecar is refused.

Run:
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    python3 data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 80
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

if __package__ in (None, ""):
    # Run as a script (python data/cached_challenge_fineweb.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.progress import Progress  # noqa: E402
from data.shards import (BYTE_SIDECAR_SPLIT, DATASET_MANIFEST, HEADER_BYTES, TOKEN_DTYPE, ShardError,  # noqa: E402
                         load_byte_sidecar, sha256_files)

REPO_ID = "willdepueoai/parameter-golf"
# Variants published outside the challenge's repo, in its layout: the default --repo-id for them.
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
VARIANT_REPOS = {CASEOPS_VARIANT: "romeerp/parameter-golf-caseops-v1"}
IDENTITY_TRANSFORM = "identity"
BOS_ID = 1  # every published tokenizer's BOS (the public CaseOps manifest also states it per dataset)
REPO_TYPE = "dataset"
REMOTE_ROOT = "datasets"
MANIFEST_NAME = "manifest.json"
DATASET_PREFIX = "fineweb10B_"
DATA_DIR = Path(__file__).resolve().parent
DEFAULT_VARIANT = "sp1024"
# 80 shards of 100 M tokens = 8 B training tokens, the usual choice for a record run.
DEFAULT_TRAIN_SHARDS = 80
TOKENIZER_PATH_KEYS = ("model_path", "vocab_path", "path")
# The challenge's exporter writes shards of this many tokens (its manifest's "shard_size").
DEFAULT_SHARD_TOKENS = 100_000_000
SHA256_RE = re.compile(r"[0-9a-f]{64}")

# download(remote_path, destination) -> the hub's sha256 of the file, or None when it gives none: fetch
# one repo file (path relative to the repo root) to destination. Tests pass a fake; the real one is
# HubDownloader below.
Downloader = Callable[[str, Path], "str | None"]
# remote_hashes(remote_paths) -> {remote_path: sha256} for the files the hub knows an LFS hash of.
RemoteHashes = Callable[[list[str]], dict[str, str]]


class DownloadError(RuntimeError):
    """A file could not be fetched from the Hugging Face repo."""


@dataclass(frozen=True)
class FileToFetch:
    remote: str  # path inside the Hugging Face repo
    local: Path
    expected_bytes: int | None = None  # what the manifest implies, when it says enough
    role: str = "train"  # "val", "train" or "tokenizer"


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


def expected_shard_bytes(manifest: dict, dataset: dict, split: str, index: int) -> int | None:
    """The size shard `index` of `split` must have: the exporter fills shards of shard_size tokens
    and starts a new one at the split, so all but the last of a split are full. None when the
    manifest does not give the split's token count."""
    stats = dataset.get("stats") or {}
    tokens, files = stats.get(f"tokens_{split}"), stats.get(f"files_{split}")
    if tokens is None or not files:
        return None
    shard = int(manifest.get("shard_size") or DEFAULT_SHARD_TOKENS)
    count = shard if index < int(files) - 1 else int(tokens) - shard * (int(files) - 1)
    return HEADER_BYTES + TOKEN_DTYPE.itemsize * count


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


def text_transform(manifest: dict, variant: str) -> str:
    """The transform the variant's text went through before its tokenizer ("identity" for the challenge's
    own variants, "lossless_caps_caseops_v1" for CaseOps), as the manifest's tokenizer entry names it."""
    dataset = find_dataset(manifest, variant)
    return str(find_tokenizer(manifest, dataset, variant).get("text_transform") or IDENTITY_TRANSFORM)


def has_byte_sidecar(manifest: dict, variant: str) -> bool:
    """Whether the variant publishes a validation byte sidecar (its dataset entry names val_bytes_glob, as
    the public CaseOps export does). A variant whose text was transformed must have one: its tokens' own
    bytes are not the original text's, so a score without it would divide by the wrong bytes."""
    dataset = find_dataset(manifest, variant)
    if dataset.get("val_bytes_glob"):
        return True
    transform = text_transform(manifest, variant)
    if transform != IDENTITY_TRANSFORM:
        raise ValueError(f"variant {variant!r} was tokenized after the text transform {transform!r} but the "
                         f"manifest lists no validation byte sidecar (val_bytes_glob): its bits per byte could "
                         f"not count the original text's bytes")
    return False


def plan_downloads(manifest: dict, variant: str, train_shards: int, data_dir: Path) -> list[FileToFetch]:
    """Every file to fetch for variant: all val shards (and their byte sidecars, for a variant that has
    them), the first train_shards, the tokenizer."""
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
    shards = [("val", i) for i in range(n_val)]
    if has_byte_sidecar(manifest, variant):
        # One count per validation token: the same size as validation shard i.
        shards += [(BYTE_SIDECAR_SPLIT, i) for i in range(n_val)]
    shards += [("train", i) for i in range(train_shards)]
    plan = [FileToFetch(f"{remote_dir}/fineweb_{split}_{i:06d}.bin", local_dir / f"fineweb_{split}_{i:06d}.bin",
                        expected_shard_bytes(manifest, dataset, split.removesuffix("_bytes"), i), split)
            for split, i in shards]
    for path in tokenizer_files(find_tokenizer(manifest, dataset, variant)):
        relative = PurePosixPath(path.lstrip("/"))
        plan.append(FileToFetch(f"{REMOTE_ROOT}/{relative}", data_dir / "tokenizers" / relative.name,
                                role="tokenizer"))
    return plan


def fetch(item: FileToFetch, download: Downloader, log: Callable[[str], None],
          repo_id: str = REPO_ID) -> tuple[bool, str | None]:
    """Fetch one file unless a copy of the right size is present: (downloaded, the hub's sha256 of it
    or None). A present file of another size than the manifest implies is fetched again; a downloaded
    one of a wrong size or hash fails."""
    if item.local.exists():
        size = item.local.stat().st_size
        if item.expected_bytes is None or size == item.expected_bytes:
            log(f"skip {item.local} (already present, {size} bytes"
                f"{', as the manifest implies' if item.expected_bytes else ''})")
            return False, None
        log(f"refetch {item.local}: {size} bytes but the manifest implies {item.expected_bytes}")
        item.local.unlink()
    log(f"fetch {item.remote} -> {item.local}")
    item.local.parent.mkdir(parents=True, exist_ok=True)
    try:
        hub_sha256 = download(item.remote, item.local)
    except Exception as e:  # network, auth, missing file: all reported the same way
        raise DownloadError(f"could not fetch {item.remote} from {repo_id}: {type(e).__name__}: {e}") from e
    if not item.local.exists():
        raise DownloadError(f"could not fetch {item.remote} from {repo_id}: downloader wrote no file")
    size = item.local.stat().st_size
    if item.expected_bytes is not None and size != item.expected_bytes:
        item.local.unlink()
        raise DownloadError(f"{item.remote} from {repo_id}: {size} bytes but the manifest implies "
                            f"{item.expected_bytes}: not kept")
    if hub_sha256 and SHA256_RE.fullmatch(hub_sha256) and sha256_files([item.local]) != hub_sha256:
        item.local.unlink()
        raise DownloadError(f"{item.remote} from {repo_id}: its sha256 differs from the hub's: not kept")
    return True, hub_sha256 if hub_sha256 and SHA256_RE.fullmatch(hub_sha256) else None


def load_manifest(data_dir: Path, download: Downloader, log: Callable[[str], None]) -> dict:
    item = manifest_file(data_dir)
    fetch(item, download, log)  # a present manifest is kept: delete it to fetch a newer one
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
    remote_hashes: RemoteHashes | None = None,
    repo_id: str = REPO_ID,
) -> dict:
    """Fetch manifest, shards and tokenizer for variant, check them, write dataset_manifest.json;
    returns lists of downloaded/skipped paths and the dataset manifest."""
    hub = HubDownloader(repo_id) if download is None or remote_hashes is None else None
    download, remote_hashes = download or hub.download, remote_hashes or hub.remote_hashes
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir, download, log)
    plan = plan_downloads(manifest, variant, train_shards, data_dir)
    downloaded, skipped, hub_sha256 = [], [], {}
    for item in Progress("download", len(plan), unit="file").wrap(plan):
        fetched, sha = fetch(item, download, log, repo_id)
        (downloaded if fetched else skipped).append(item.local)
        if sha:
            hub_sha256[item.remote] = sha
    check_present_hashes([i for i in plan if i.local in skipped and i.role != "train"], hub_sha256,
                         remote_hashes, log)
    if any(i.role == BYTE_SIDECAR_SPLIT for i in plan):
        check_byte_sidecar(plan[0].local.parent, int(find_dataset(manifest, variant).get("bos_id", BOS_ID)))
    record = dataset_record(manifest, variant, plan, hub_sha256, repo_id)
    path = plan[0].local.parent / DATASET_MANIFEST
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {path}: source challenge, val sha256 {record['val']['sha256'][:16]}..., "
        f"tokenizer sha256 {record['tokenizer']['sha256'][:16]}...")
    return {"downloaded": downloaded, "skipped": skipped, "files": [item.local for item in plan], "record": record}


def check_present_hashes(items: list[FileToFetch], hub_sha256: dict[str, str], remote_hashes: RemoteHashes,
                         log: Callable[[str], None]) -> None:
    """The validation shards and tokenizer that were already present must hash as the hub's copies do
    (when the hub can say: offline, only their sizes were checked). Fills hub_sha256."""
    if not items:
        return
    try:
        known = remote_hashes([i.remote for i in items])
    except Exception as e:  # offline, or the hub refused: say so, the sizes were checked
        log(f"note: could not ask the hub for sha256 ({type(e).__name__}: {e}): present files checked by size only")
        return
    for item in items:
        sha = known.get(item.remote)
        if not sha:
            continue
        if sha256_files([item.local]) != sha:
            raise DownloadError(f"{item.local} differs from {item.remote} on the hub (sha256): delete it and "
                                f"run again")
        hub_sha256[item.remote] = sha


def _file_entry(item: FileToFetch, hub_sha256: dict[str, str], with_hash: bool) -> dict:
    entry = {"name": item.local.name, "bytes": item.local.stat().st_size,
             "size_checked": item.expected_bytes is not None, "hub_sha256_checked": item.remote in hub_sha256}
    if with_hash:
        entry["sha256"] = hub_sha256.get(item.remote) or sha256_files([item.local])
    return entry


def check_byte_sidecar(data_dir: Path, bos_id: int) -> None:
    """The sidecar must fit the validation shards file by file and count 0 at every BOS (a DownloadError
    otherwise, naming the file)."""
    try:
        load_byte_sidecar(data_dir, bos_id)
    except ShardError as e:
        raise DownloadError(str(e)) from None


def dataset_record(manifest: dict, variant: str, plan: list[FileToFetch], hub_sha256: dict[str, str],
                   repo_id: str) -> dict:
    """dataset_manifest.json for downloaded challenge data (see train_gpt.dataset_provenance)."""
    stats = find_dataset(manifest, variant).get("stats") or {}
    val = [i for i in plan if i.role == "val"]
    val_bytes = [i for i in plan if i.role == BYTE_SIDECAR_SPLIT]
    train = [i for i in plan if i.role == "train"]
    model = next((i for i in plan if i.role == "tokenizer" and i.local.suffix == ".model"),
                 next(i for i in plan if i.role == "tokenizer"))
    record = {
        "source": "challenge", "repo_id": repo_id, "variant": variant, "dataset": val[0].local.parent.name,
        "text_transform": text_transform(manifest, variant),
        "written_by": "data/cached_challenge_fineweb.py",
        "written_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "checked": "each shard's size against the manifest's token counts; sha256 against the hub's where it has one",
        "tokenizer": {"file": model.local.name, "sha256": sha256_files([model.local]),
                      "hub_sha256_checked": model.remote in hub_sha256},
        "val": {"sha256": sha256_files([i.local for i in val]), "docs": stats.get("docs_val"),
                "tokens": stats.get("tokens_val"), "files": [_file_entry(i, hub_sha256, True) for i in val]},
        "train": {"docs_in_full_export": stats.get("docs_train"), "files_in_full_export": stats.get("files_train"),
                  "files": [_file_entry(i, hub_sha256, False) for i in train]},
    }
    if val_bytes:
        record["val_bytes"] = {"sha256": sha256_files([i.local for i in val_bytes]),
                               "files": [_file_entry(i, hub_sha256, True) for i in val_bytes]}
    return record


class HubDownloader:
    """The real downloader: hf_hub_download into the HF cache, then link or copy into place. The cache
    names an LFS file's blob by its sha256, which download() returns."""

    def __init__(self, repo_id: str = REPO_ID):
        self.repo_id = repo_id

    def download(self, remote_path: str, destination: Path) -> str | None:
        from huggingface_hub import hf_hub_download

        cached = Path(hf_hub_download(repo_id=self.repo_id, filename=remote_path, repo_type=REPO_TYPE)).resolve()
        tmp = destination.with_name(f"{destination.name}.{os.getpid()}.tmp")
        try:
            try:
                os.link(cached, tmp)  # a hard link avoids a second copy of multi-GB shards
            except OSError:
                shutil.copyfile(cached, tmp)
            os.replace(tmp, destination)
        finally:
            tmp.unlink(missing_ok=True)
        return cached.name if SHA256_RE.fullmatch(cached.name) else None

    def remote_hashes(self, remote_paths: list[str]) -> dict[str, str]:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(self.repo_id, remote_paths, repo_type=REPO_TYPE)
        return {i.path: i.lfs.sha256 for i in infos if getattr(i, "lfs", None) is not None}


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
    parser.add_argument("--repo-id", default=None,
                        help=f"Hugging Face dataset repo with the challenge's layout (default {REPO_ID}, or "
                             f"{VARIANT_REPOS[CASEOPS_VARIANT]} for --variant {CASEOPS_VARIANT}; "
                             f"kevclark/parameter-golf for sp4096 and sp8192)")
    args = parser.parse_args(argv)
    args.repo_id = args.repo_id or VARIANT_REPOS.get(args.variant, REPO_ID)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = download_variant(args.variant, args.train_shards, args.data_dir, repo_id=args.repo_id)
    except (DownloadError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"done: {len(result['downloaded'])} downloaded, {len(result['skipped'])} already present")


if __name__ == "__main__":
    main()
