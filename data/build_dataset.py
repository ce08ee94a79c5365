"""Build a challenge-format dataset (sentencepiece BPE tokenizer + token shards) from raw text.

Input is JSON lines (plain .jsonl, or xz-compressed .jsonl.xz) with each document's text under
"text". The output matches what the challenge publishes and what train_gpt.py reads:

* a sentencepiece BPE tokenizer with the challenge's settings (byte fallback, split digits, nmt_nfkc,
  no dummy prefix, ids pad 0 / bos 1 / eos 2 / unk 3, so byte b is id 4 + b), written as
  <tokenizer-prefix>.model and <tokenizer-prefix>.vocab;
* shards fineweb_val_000000.bin, ... and fineweb_train_000000.bin, ... (see data/shards.py), where
  every document is BOS followed by its tokens, with no EOS;
* dataset_manifest.json beside the shards: source "custom", the input files (sizes, sha256), the
  tokenizer (sha256, settings, its training sample), document and token counts, and the sha256 of
  every shard. train_gpt.py logs it, and scripts/make_record.py writes runs on it as non-record folders.

With --caseops the text goes through the CaseOps transform first (data/caseops.py: capitalization as
four operator characters), the tokenizer reserves the operators as user-defined pieces (ids 4..7, so byte b
is id 8 + b, as in the public CaseOps tokenizer), and beside each validation shard a byte sidecar
fineweb_val_bytes_NNNNNN.bin (same header, one uint16 per validation token: the original text's UTF-8
bytes that token stands for, 0 for BOS and operators) carries the bytes bits per byte must divide by.

The dataset is named after its first input (--name overrides): data/datasets/<name>_sp<V>/ and
data/tokenizers/<name>_<V>_bpe.model (both + "_caseops" with --caseops). The challenge's own names
(fineweb10B_*, fineweb_<V>_bpe*) are refused: they belong to the published data
(data/cached_challenge_fineweb.py). Nor does the builder overwrite what it did not write: a folder with
shards or a manifest from anything else, or a tokenizer that its own manifest there does not name.

Validation is either the first --val-docs documents of --input, or the whole of --val-input.
The tokenizer is trained on a bounded, seeded sample of the training documents only: the
challenge forbids any use of validation data for training, and the tokenizer is part of the model.

No validation document reaches the training data, whatever the arguments: an input that declares its
first documents validation documents (the challenge's docs_selected.jsonl: 50,000, or what its
docs_selected.source_manifest.json says) never gives them to training (challenge issue #2127); a training
document whose text equals a validation document's is left out before the tokenizer sees it, one whose
tokens equal a validation document's is left out of the shards, and data/check_disjoint.py's check then
runs on the shards written (the build fails on any overlap). The manifest and the summary give the counts.

The whole input is held in memory; use --max-train-docs to cap very large inputs.

Run:
    python3 data/synthetic_text.py --docs 3000 --seed 0 --out syn.jsonl
    python3 data/build_dataset.py --input syn.jsonl --val-docs 300 --vocab-size 1024 \\
        --output-dir syn_ds --tokenizer-prefix syn_tok/test_1024_bpe
    python3 data/build_dataset.py --input syn.jsonl --val-docs 300 --vocab-size 1024 --caseops
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import lzma
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

if __package__ in (None, ""):
    # Run as a script (python data/build_dataset.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import caseops  # noqa: E402
from data.check_disjoint import check_dataset, describe, document_key  # noqa: E402
from data.progress import Progress  # noqa: E402
from data.shards import (BYTE_SIDECAR_SPLIT, DATASET_MANIFEST, MAX_TOKEN_ID, find_byte_sidecars,  # noqa: E402
                         load_byte_sidecar, sha256_files, shard_filename, write_shard)

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_SHARD_TOKENS = 100_000_000
# Enough text for a good 1024..8192-piece BPE while keeping the trainer's memory and time modest.
DEFAULT_TOKENIZER_TRAIN_CHARS = 50_000_000
DEFAULT_SEED = 1337
# The trainer silently drops sentences longer than max_sentence_length bytes, so documents are cut
# to this many characters and the limit is set to their worst-case UTF-8 size.
TRAINER_MAX_DOC_CHARS = 16_384
UTF8_MAX_BYTES_PER_CHAR = 4
ENCODE_BATCH_DOCS = 1024

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Byte b is token id BYTE_FALLBACK_OFFSET + b; sentencepiece puts user-defined pieces (the CaseOps operators,
# ids 4..7 as in the public CaseOps tokenizer) before the byte pieces, which then start at 8.
BYTE_FALLBACK_OFFSET = 4
WRITTEN_BY = "data/build_dataset.py"
# The challenge's document stream (docs_selected.jsonl, beside it docs_selected.source_manifest.json with
# "docs_val"): its first 50,000 documents are the validation split. A copy of it without its source
# manifest is taken to say the same (challenge issue #2127: a preparation script that took 10,000 put the
# other 40,000 into training).
CHALLENGE_DOCS_STEM = "docs_selected"
CHALLENGE_VAL_DOCS = 50_000
SOURCE_MANIFEST_SUFFIX = ".source_manifest.json"
TOKENIZER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    character_coverage=0.999,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
)
SP_LOG_WARNINGS_ONLY = 1

VOCAB_TOO_HIGH_RE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
VOCAB_TOO_SMALL_RE = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


# The published data's names: a dataset built here must never look like it.
CHALLENGE_DATASET_RE = re.compile(r"fineweb10B_.*")
CHALLENGE_TOKENIZER_RE = re.compile(r"fineweb_\d+_bpe.*")
CASEOPS_SUFFIX = "_caseops"


def input_stem(input_path: Path) -> str:
    return re.sub(r"(\.jsonl)?(\.xz)?$", "", input_path.name)


def default_name(input_path: Path) -> str:
    """The first input's file name without .jsonl / .xz, as a safe directory name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", input_stem(input_path)).strip("_") or "custom"


def default_output_dir(name: str, vocab_size: int, caseops: bool = False) -> Path:
    return DATA_DIR / "datasets" / f"{name}_sp{vocab_size}{CASEOPS_SUFFIX if caseops else ''}"


def default_tokenizer_prefix(name: str, vocab_size: int, caseops: bool = False) -> Path:
    return DATA_DIR / "tokenizers" / f"{name}_{vocab_size}_bpe{CASEOPS_SUFFIX if caseops else ''}"


def check_not_challenge_names(output_dir: Path, tokenizer_prefix: Path) -> None:
    if CHALLENGE_DATASET_RE.fullmatch(output_dir.name) or CHALLENGE_TOKENIZER_RE.fullmatch(tokenizer_prefix.name):
        raise ValueError(f"{output_dir.name} / {tokenizer_prefix.name} are the names of the challenge's published "
                         f"data (data/cached_challenge_fineweb.py fetches it): give a built dataset its own "
                         f"--name, --output-dir or --tokenizer-prefix")


def _read_manifest(output_dir: Path) -> dict | None:
    path = output_dir / DATASET_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def check_may_write(output_dir: Path, tokenizer_prefix: Path) -> None:
    """Refuse to overwrite what this builder did not write: a folder with shards or a manifest that is not
    ours (downloaded data, another tool's export, any folder given by mistake), or a tokenizer that our
    manifest in output_dir does not name with its hash (a downloaded tokenizer, another dataset's)."""
    manifest = _read_manifest(output_dir)
    shards = sorted(output_dir.glob("fineweb_*.bin")) if output_dir.is_dir() else []
    if manifest is None and shards:
        raise ValueError(f"{output_dir} holds shards ({shards[0].name}, ...) but no {DATASET_MANIFEST}: this "
                         f"builder did not write them and will not overwrite them; choose another --output-dir")
    if manifest is not None and manifest.get("written_by") != WRITTEN_BY:
        writer = manifest.get("written_by") or f"something else (source {manifest.get('source')!r})"
        raise ValueError(f"{output_dir} holds a dataset written by {writer}, not by this builder: it will not "
                         f"overwrite it; choose another --output-dir")
    model = tokenizer_prefix.with_name(tokenizer_prefix.name + ".model")
    if model.exists():
        ours = (manifest or {}).get("tokenizer") or {}
        if ours.get("file") != model.name or ours.get("sha256") != sha256_files([model]):
            raise ValueError(f"{model} exists and is not the tokenizer of the dataset this builder wrote in "
                             f"{output_dir}: it will not overwrite it; choose another --tokenizer-prefix")


def _write_manifest(output_dir: Path, manifest: dict) -> Path:
    path = output_dir / DATASET_MANIFEST
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Reading documents


def _open_text(path: Path):
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _parse_line(path: Path, lineno: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise ValueError(f'{path}:{lineno}: JSON object has no "text" field')
    if not isinstance(record["text"], str):
        raise ValueError(f'{path}:{lineno}: "text" is not a string')
    return record["text"]


def read_documents(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Texts of a .jsonl or .jsonl.xz file, in order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    texts: list[str] = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and len(texts) >= limit:
                    break
                if line.strip():
                    texts.append(_parse_line(path, lineno, line))
    except lzma.LZMAError as e:
        raise ValueError(f"{path}: not a valid xz file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return texts


def source_manifest_path(path: Path) -> Path:
    return path.with_name(input_stem(path) + SOURCE_MANIFEST_SUFFIX)


def declared_val_docs(path: Path) -> tuple[int, str] | None:
    """(n, why) when the input declares that its first n documents are validation documents: its source
    manifest (<stem>.source_manifest.json beside it, as the challenge publishes docs_selected.jsonl) gives
    "docs_val", or it is the challenge's docs_selected.jsonl (50,000). None for any other input."""
    side = source_manifest_path(path)
    if side.is_file():
        try:
            docs_val = json.loads(side.read_text(encoding="utf-8")).get("docs_val")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{side}: unreadable source manifest ({e}): it may say which documents are "
                             f"validation documents, so the build stops") from None
        if docs_val is not None:
            return int(docs_val), f"{side.name} gives docs_val {int(docs_val)}"
    if input_stem(path) == CHALLENGE_DOCS_STEM:
        return CHALLENGE_VAL_DOCS, (f"{path.name} is the challenge's document stream, whose first "
                                    f"{CHALLENGE_VAL_DOCS:,} documents are its validation split")
    return None


# ----------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_training_sample(train_texts: Sequence[str], max_chars: int, seed: int) -> list[str]:
    """A seeded random sample of training documents holding at most max_chars characters."""
    order = list(range(len(train_texts)))
    random.Random(seed).shuffle(order)
    sample, n_chars = [], 0
    for i in order:
        text = train_texts[i].replace("\x00", " ").strip()[:TRAINER_MAX_DOC_CHARS]
        if not text:
            continue
        if n_chars + len(text) > max_chars:
            text = text[: max_chars - n_chars]
        if text:
            sample.append(text)
            n_chars += len(text)
        if n_chars >= max_chars:
            break
    return sample


def _explain_trainer_error(err: RuntimeError, vocab_size: int) -> ValueError:
    message = str(err)
    too_high = VOCAB_TOO_HIGH_RE.search(message)
    if too_high:
        return ValueError(
            f"vocab_size {vocab_size} is too large for the tokenizer training text: sentencepiece "
            f"can build at most {too_high.group(2)} pieces from it. Use a smaller --vocab-size, or "
            f"give the trainer more text (more documents, a larger --tokenizer-train-chars)."
        )
    too_small = VOCAB_TOO_SMALL_RE.search(message)
    if too_small:
        return ValueError(
            f"vocab_size {vocab_size} is too small: the training text needs {too_small.group(2)} "
            f"pieces just for special tokens, byte fallback and its characters. Use a larger --vocab-size."
        )
    return ValueError(f"sentencepiece failed to train a vocab_size={vocab_size} tokenizer: {message}")


def tokenizer_settings(use_caseops: bool) -> dict:
    """The challenge's settings; with CaseOps, the four operators as user-defined pieces (ids 4..7)."""
    return TOKENIZER_SETTINGS | ({"user_defined_symbols": list(caseops.OPERATORS)} if use_caseops else {})


def train_tokenizer(texts: Sequence[str], prefix: str | os.PathLike, vocab_size: int,
                    use_caseops: bool = False) -> Path:
    """Train the challenge-style BPE tokenizer on texts (CaseOps text with use_caseops); returns the .model
    path."""
    if not texts:
        raise ValueError("no training text for the tokenizer (all training documents are empty)")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            max_sentence_length=TRAINER_MAX_DOC_CHARS * UTF8_MAX_BYTES_PER_CHAR,
            num_threads=os.cpu_count() or 1,
            minloglevel=SP_LOG_WARNINGS_ONLY,
            **tokenizer_settings(use_caseops),
        )
    except RuntimeError as e:
        raise _explain_trainer_error(e, vocab_size) from None
    return prefix.with_name(prefix.name + ".model")


def check_tokenizer_layout(sp: spm.SentencePieceProcessor, vocab_size: int, use_caseops: bool = False) -> None:
    """Fail loudly if the trained model does not have the id layout train_gpt.py relies on (and, with
    CaseOps, the public CaseOps tokenizer's: operators at 4..7, byte 0 at 8)."""
    operators = caseops.OPERATORS if use_caseops else ()
    layout = (sp.vocab_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.piece_to_id("<0x00>"),
              [sp.piece_to_id(op) for op in operators])
    expected = (vocab_size, PAD_ID, BOS_ID, EOS_ID, UNK_ID, BYTE_FALLBACK_OFFSET + len(operators),
                list(range(BYTE_FALLBACK_OFFSET, BYTE_FALLBACK_OFFSET + len(operators))))
    if layout != expected:
        raise RuntimeError(f"tokenizer layout (vocab, pad, bos, eos, unk, byte 0, operators) is {layout}, "
                           f"expected {expected}")


# ----------------------------------------------------------------------------------------------
# Encoding and sharding


class ShardWriter:
    """Accumulates token arrays and writes them as fixed-size shards of one split.

    Documents may straddle shard boundaries, as in the challenge's own export: the trainer reads
    the shards as one continuous stream.
    """

    def __init__(self, output_dir: Path, split: str, shard_tokens: int):
        self.output_dir, self.split, self.shard_tokens = output_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.files: list[Path] = []
        self.n_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.n_pending += tokens.size
        self.n_tokens += tokens.size
        while self.n_pending >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> list[Path]:
        if self.n_pending:
            self._write(self.n_pending)
        return self.files

    def _write(self, n: int) -> None:
        data = np.concatenate(self.pending)
        path = self.output_dir / shard_filename(self.split, len(self.files))
        write_shard(path, data[:n])
        self.files.append(path)
        rest = data[n:]
        self.pending = [rest] if rest.size else []
        self.n_pending = rest.size


def _docs_to_tokens(encoded: list[list[int]]) -> np.ndarray:
    total = sum(len(ids) + 1 for ids in encoded)
    flat = itertools.chain.from_iterable(itertools.chain((BOS_ID,), ids) for ids in encoded)
    return np.fromiter(flat, dtype=np.int64, count=total)


def _key(ids: list[int]) -> bytes:
    return document_key(np.asarray(ids, dtype=np.uint16))


def _encode_with_bytes(sp: spm.SentencePieceProcessor, texts: list[str], first_doc: int) -> tuple[list, list]:
    """Token ids and each token's original bytes (data/caseops.py) of a batch of documents."""
    protos = sp.encode(texts, out_type="proto", num_threads=os.cpu_count() or 1)
    encoded, counts = [], []
    for i, (text, proto) in enumerate(zip(texts, protos)):
        ids, n = caseops.encoding_original_bytes(text, proto)
        if n and max(n) > MAX_TOKEN_ID:
            raise ValueError(f"validation document {first_doc + i}: one token stands for {max(n)} bytes of text, "
                             f"more than a uint16 byte sidecar holds")
        encoded.append(ids)
        counts.append(n)
    return encoded, counts


def encode_split(
    sp: spm.SentencePieceProcessor,
    texts: Sequence[str],
    writer: ShardWriter,
    token_counts: np.ndarray,
    progress: bool,
    val_keys: set[bytes],
    bytes_writer: ShardWriter | None = None,
) -> tuple[list[Path], int]:
    """Encode texts (BOS + tokens per document) into writer's shards; updates token_counts. The validation
    split adds each document's key (check_disjoint.document_key) to val_keys; the training split leaves
    out every document whose key is there. With bytes_writer (the validation split of a CaseOps dataset),
    each token's original bytes go to it, 0 for each BOS, cut into files where the tokens are. Returns the
    shards and how many documents were left out."""
    dropped = 0
    with Progress(f"encode_{writer.split}", len(texts), enabled=progress, unit="doc") as bar:
        for start in range(0, len(texts), ENCODE_BATCH_DOCS):
            batch = list(texts[start : start + ENCODE_BATCH_DOCS])
            if bytes_writer is not None:
                encoded, counts = _encode_with_bytes(sp, batch, start)
                bytes_writer.add(_docs_to_counts(counts))
            else:
                encoded = sp.encode(batch, out_type=int, num_threads=os.cpu_count() or 1)
            if writer.split == "val":
                val_keys.update(_key(ids) for ids in encoded if ids)
            else:
                kept = [ids for ids in encoded if not ids or _key(ids) not in val_keys]
                dropped, encoded = dropped + len(encoded) - len(kept), kept
            tokens = _docs_to_tokens(encoded)
            token_counts += np.bincount(tokens, minlength=token_counts.size)
            writer.add(tokens.astype(np.uint16))
            bar.update(len(batch))
    if bytes_writer is not None:
        bytes_writer.close()
    return writer.close(), dropped


def _docs_to_counts(counts: list[list[int]]) -> np.ndarray:
    """The byte counts of a batch laid out as its tokens are: 0 for each document's BOS, then its tokens'."""
    total = sum(len(n) + 1 for n in counts)
    flat = itertools.chain.from_iterable(itertools.chain((0,), n) for n in counts)
    return np.fromiter(flat, dtype=np.uint16, count=total)


def _remove_stale_shards(output_dir: Path) -> list[Path]:
    # Leftover shards from an earlier, larger build would silently join this one's stream.
    stale = sorted(output_dir.glob("fineweb_train_*.bin")) + sorted(output_dir.glob("fineweb_val_*.bin"))
    for path in stale:
        path.unlink()
    return stale


# ----------------------------------------------------------------------------------------------
# Entry points


def build_dataset(
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    output_dir: str | os.PathLike,
    tokenizer_prefix: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
    inputs: dict | None = None,
    use_caseops: bool = False,
) -> dict:
    """Train the tokenizer on a sample of train_texts, shard both splits, write dataset_manifest.json
    (with `inputs`, a description of where the texts came from, when given). With use_caseops, the texts
    are turned into CaseOps text (data/caseops.py) first, the tokenizer reserves the operators, and the
    validation byte sidecar (fineweb_val_bytes_*.bin) is written beside the validation shards.

    Returns a dict with the tokenizer paths, the shard paths per split, document and token counts
    per split, how many distinct token ids the shards use, and the manifest's path.
    """
    if not 0 < vocab_size <= MAX_TOKEN_ID + 1:
        raise ValueError(f"vocab_size must be in [1, {MAX_TOKEN_ID + 1}] to fit uint16 shards, got {vocab_size}")
    if shard_tokens <= 0 or tokenizer_train_chars <= 0:
        raise ValueError("shard_tokens and tokenizer_train_chars must be positive")
    if not train_texts:
        raise ValueError("no training documents")
    if not val_texts:
        raise ValueError("no validation documents")
    output_dir, tokenizer_prefix = Path(output_dir), Path(tokenizer_prefix)
    check_not_challenge_names(output_dir, tokenizer_prefix)
    check_may_write(output_dir, tokenizer_prefix)
    val_set = set(val_texts)
    kept = [t for t in train_texts if t not in val_set]
    same_text, train_texts = len(train_texts) - len(kept), kept
    if not train_texts:
        raise ValueError("no training documents that are not also validation documents")
    # Ours from here on, even if the build stops half way: a rerun may overwrite it.
    output_dir.mkdir(parents=True, exist_ok=True)
    provisional = {"source": "custom", "written_by": WRITTEN_BY, "complete": False}
    _write_manifest(output_dir, provisional)
    transform = caseops.encode if use_caseops else (lambda text: text)
    train_in, val_in = [transform(t) for t in train_texts], [transform(t) for t in val_texts]

    sample = tokenizer_training_sample(train_in, tokenizer_train_chars, seed)
    if progress:  # one call, no progress to report: say what is happening
        print(f"training the tokenizer on {len(sample):,} documents ({sum(map(len, sample)):,} chars)", flush=True)
    model_path = train_tokenizer(sample, tokenizer_prefix, vocab_size, use_caseops)
    _write_manifest(output_dir, provisional | {"tokenizer": {"file": model_path.name,
                                                              "sha256": sha256_files([model_path])}})
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    check_tokenizer_layout(sp, vocab_size, use_caseops)

    removed = _remove_stale_shards(output_dir)
    token_counts = np.zeros(vocab_size, dtype=np.int64)
    files, val_keys, dropped = {}, set(), {}
    for split, texts in (("val", val_in), ("train", train_in)):
        writer = ShardWriter(output_dir, split, shard_tokens)
        bytes_writer = ShardWriter(output_dir, BYTE_SIDECAR_SPLIT, shard_tokens) if use_caseops and split == "val" else None
        files[split], dropped[split] = encode_split(sp, texts, writer, token_counts, progress, val_keys, bytes_writer)
        files[f"{split}_tokens"] = writer.n_tokens
    train_docs = len(train_texts) - dropped["train"]
    disjoint = check_dataset(output_dir, BOS_ID)
    if disjoint["train_docs_in_val"]:  # the shards are not what was encoded: never ship them
        raise ValueError(f"{output_dir}: {describe(disjoint)}: validation documents in the training shards")
    disjoint.update(train_docs_dropped_same_text=same_text, train_docs_dropped_same_tokens=dropped["train"])

    manifest = dataset_manifest(output_dir, model_path, files, train_docs, len(val_texts), sample,
                                vocab_size, seed, inputs, use_caseops)
    manifest["disjoint"] = {k: v for k, v in disjoint.items() if k != "train_docs_in_val"}
    if use_caseops:
        manifest["val_bytes"] = sidecar_entry(output_dir, val_texts)
    _write_manifest(output_dir, manifest)
    return {
        "manifest": output_dir / DATASET_MANIFEST,
        "tokenizer_model": model_path,
        "tokenizer_vocab": model_path.with_suffix(".vocab"),
        "output_dir": output_dir,
        "vocab_size": vocab_size,
        "text_transform": manifest["text_transform"],
        "train_files": files["train"],
        "val_files": files["val"],
        "val_bytes_files": find_byte_sidecars(output_dir),
        "val_bytes": manifest.get("val_bytes"),
        "train_docs": train_docs,
        "val_docs": len(val_texts),
        "disjoint": disjoint,
        "train_tokens": files["train_tokens"],
        "val_tokens": files["val_tokens"],
        "tokenizer_train_docs": len(sample),
        "tokenizer_train_chars": sum(len(t) for t in sample),
        "distinct_tokens": int(np.count_nonzero(token_counts)),
        "stale_files_removed": removed,
    }


def sidecar_entry(output_dir: Path, val_texts: Sequence[str]) -> dict:
    """The sidecar written, checked against the validation shards, for the manifest: its files, hash and
    byte total beside the validation documents' UTF-8 length (they differ only by documents that the
    tokenizer's normalization leaves empty: no token, nothing to score)."""
    sidecar = load_byte_sidecar(output_dir, BOS_ID)
    total = int(sidecar.sum(dtype=np.int64))
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in val_texts)
    if total > text_bytes:
        raise RuntimeError(f"the byte sidecar counts {total} bytes for {text_bytes} bytes of validation text")
    paths = find_byte_sidecars(output_dir)
    return {"sha256": sha256_files(paths), "files": _shard_entries(paths), "original_bytes": total,
            "val_text_bytes": text_bytes, "bytes_of_docs_without_tokens": text_bytes - total}


def _shard_entries(paths: list[Path]) -> list[dict]:
    return [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_files([p])} for p in paths]


def dataset_manifest(output_dir: Path, model_path: Path, files: dict, train_docs: int, val_docs: int,
                     sample: list[str], vocab_size: int, seed: int, inputs: dict | None,
                     use_caseops: bool = False) -> dict:
    """dataset_manifest.json of a built dataset (see train_gpt.dataset_provenance)."""
    return {
        "source": "custom", "dataset": output_dir.name, "written_by": WRITTEN_BY, "complete": True,
        "written_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "inputs": inputs,
        "text_transform": caseops.TRANSFORM_NAME if use_caseops else "identity",
        "tokenizer": {"file": model_path.name, "sha256": sha256_files([model_path]), "vocab_size": vocab_size,
                      "settings": tokenizer_settings(use_caseops), "trained_on_docs": len(sample),
                      "trained_on_chars": sum(map(len, sample)), "sample_seed": seed},
        "val": {"sha256": sha256_files(files["val"]), "docs": val_docs, "tokens": files["val_tokens"],
                "files": _shard_entries(files["val"])},
        "train": {"docs": train_docs, "tokens": files["train_tokens"], "files": _shard_entries(files["train"])},
    }


def describe_inputs(input_paths: Sequence[Path], val_docs: int | None, val_input: Path | None,
                    max_train_docs: int | None) -> dict:
    """Where the documents came from, for the manifest: each file's name, size and sha256, and the split."""
    def entry(path: Path) -> dict:
        declared = declared_val_docs(path)
        return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_files([path]),
                **({"declared_val_docs": declared[0], "declared_by": declared[1]} if declared else {})}
    return {"files": [entry(p) for p in input_paths], "val_input": entry(val_input) if val_input else None,
            "val_docs_from_input": val_docs, "max_train_docs": max_train_docs}


def split_documents(
    input_paths: Sequence[Path], val_docs: int | None, val_input: Path | None, max_train_docs: int | None
) -> tuple[list[str], list[str]]:
    """(train, val) texts: the inputs are read in order as one document list; val is its first
    val_docs documents, or all of val_input.

    An input that declares its first n documents validation documents (declared_val_docs: the challenge's
    docs_selected.jsonl and its source manifest) never gives them to training, whatever the arguments: as
    the first input with --val-docs, K must be at least n (K < n is how challenge issue #2127's script put
    40,000 validation documents into training); anywhere else they are left out of both splits."""
    docs: list[str] = []
    for i, path in enumerate(input_paths):
        texts = read_documents(path)
        declared = declared_val_docs(path)
        if declared is None:
            docs += texts
            continue
        n, why = declared
        if i == 0 and val_input is None:
            if val_docs < n:
                raise ValueError(f"{path}: {why}; --val-docs {val_docs} would put the other {n - val_docs:,} "
                                 f"into training (challenge issue #2127): use --val-docs {n}")
            docs += texts
        else:
            docs += texts[n:]
    if val_input is not None:
        val, train = read_documents(val_input), docs
    else:
        if len(docs) <= val_docs:
            names = ", ".join(map(str, input_paths))
            raise ValueError(f"{names} has {len(docs)} documents; --val-docs {val_docs} leaves none for training")
        val, train = docs[:val_docs], docs[val_docs:]
    return (train if max_train_docs is None else train[:max_train_docs]), val


def format_summary(result: dict, seconds: float) -> str:
    lines = [
        f"tokenizer: {result['tokenizer_model']} (+ .vocab), vocab {result['vocab_size']}, trained on "
        f"{result['tokenizer_train_docs']:,} train docs / {result['tokenizer_train_chars']:,} chars",
        f"val:   {result['val_docs']:,} docs, {result['val_tokens']:,} tokens, {len(result['val_files'])} file(s)",
        f"train: {result['train_docs']:,} docs, {result['train_tokens']:,} tokens, {len(result['train_files'])} file(s)",
        f"distinct token ids used: {result['distinct_tokens']} of {result['vocab_size']}",
        f"{describe(result['disjoint'])}: left out of training "
        f"{result['disjoint']['train_docs_dropped_same_text']} documents with a validation document's text, "
        f"{result['disjoint']['train_docs_dropped_same_tokens']} with its tokens",
        f"text transform: {result['text_transform']}",
    ]
    if result["val_bytes"]:
        vb = result["val_bytes"]
        lines.append(f"validation byte sidecar: {len(result['val_bytes_files'])} file(s), {vb['original_bytes']:,} "
                     f"original bytes of {vb['val_text_bytes']:,} in the validation documents "
                     f"({vb['bytes_of_docs_without_tokens']:,} in documents without a token)")
    if result["stale_files_removed"]:
        lines.append(f"removed {len(result['stale_files_removed'])} stale shard(s) from an earlier build")
    lines.append("files written:")
    for path in [result["tokenizer_model"], result["tokenizer_vocab"], *result["val_files"], *result["val_bytes_files"],
                 *result["train_files"], result["manifest"]]:
        lines.append(f"  {path}")
    lines.append(f"done in {seconds:.1f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a challenge-style sentencepiece BPE tokenizer and write challenge-format shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help="documents, .jsonl or .jsonl.xz, text under \"text\"; several files are read in order")
    val = parser.add_mutually_exclusive_group(required=True)
    val.add_argument("--val-docs", type=int, help="use the first K documents of --input as validation")
    val.add_argument("--val-input", type=Path, help="use this whole file as validation (all of --input is train)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--name", default=None,
                        help="the dataset's name (default: the first input's file name without .jsonl/.xz)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="shard directory (default data/datasets/<name>_sp<V>, + _caseops with --caseops)")
    parser.add_argument("--tokenizer-prefix", type=Path, default=None,
                        help="tokenizer path without extension (default data/tokenizers/<name>_<V>_bpe, + _caseops "
                             "with --caseops)")
    parser.add_argument("--caseops", action="store_true",
                        help="CaseOps (data/caseops.py): capitalization as operator pieces, and the validation byte "
                             "sidecar fineweb_val_bytes_*.bin that bits per byte must divide by")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--max-train-docs", type=int, default=None,
                        help="use at most this many training documents (for shards and the tokenizer)")
    parser.add_argument("--tokenizer-train-chars", type=int, default=DEFAULT_TOKENIZER_TRAIN_CHARS,
                        help="cap on characters of training documents fed to the tokenizer trainer")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the tokenizer's document sample")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.val_docs is not None and args.val_docs <= 0:
        parser.error("--val-docs must be positive")
    if args.max_train_docs is not None and args.max_train_docs <= 0:
        parser.error("--max-train-docs must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    name = args.name or default_name(args.input[0])
    try:
        output_dir = args.output_dir or default_output_dir(name, args.vocab_size, args.caseops)
        tokenizer_prefix = args.tokenizer_prefix or default_tokenizer_prefix(name, args.vocab_size, args.caseops)
        # Before reading gigabytes of input.
        check_not_challenge_names(output_dir, tokenizer_prefix)
        check_may_write(output_dir, tokenizer_prefix)
        train, val = split_documents(args.input, args.val_docs, args.val_input, args.max_train_docs)
        result = build_dataset(
            train,
            val,
            output_dir=output_dir,
            tokenizer_prefix=tokenizer_prefix,
            vocab_size=args.vocab_size,
            shard_tokens=args.shard_tokens,
            tokenizer_train_chars=args.tokenizer_train_chars,
            seed=args.seed,
            progress=not args.no_progress,
            inputs=describe_inputs(args.input, args.val_docs, args.val_input, args.max_train_docs),
            use_caseops=args.caseops,
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_summary(result, time.time() - started))


if __name__ == "__main__":
    main()
