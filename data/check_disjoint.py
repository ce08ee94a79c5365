"""Check that no validation document reaches the training data: the challenge forbids training on it, and
data preparation is where it usually leaks in (a document in both splits, a validation file mixed into
the training input).

A document is the tokens from one BOS to the next (shards hold BOS + tokens per document, and a document
may run on into the next shard). Every validation document is hashed (BLAKE2b, 128 bits, of its token
ids); every training document is hashed and looked up. Identical token sequences are found whatever
their text looked like before normalization; near-duplicates (one word changed) are not.

    python3 data/check_disjoint.py data/datasets/fineweb10B_sp1024       # exit status 1 on any overlap

A CaseOps dataset (data/caseops.py) is checked the same way: both splits are in one tokenizer's ids. Its
validation byte sidecar is checked too (one count per validation token, file by file, 0 at every BOS):
a sidecar that does not fit the validation shards fails, naming the file.

data/build_dataset.py runs the same check on what it wrote, after leaving out every training document
whose tokens equal a validation document's.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shards import find_byte_sidecars, find_shards, load_byte_sidecar, read_shard  # noqa: E402

BOS_ID = 1  # the challenge tokenizer's BOS: every document starts with it
DIGEST_BYTES = 16


def document_key(tokens: np.ndarray) -> bytes:
    """The hash a document is known by: of its token ids (without the BOS), as little-endian uint16."""
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<u2").tobytes(), digest_size=DIGEST_BYTES).digest()


def documents(files: Iterable[str | Path], bos_id: int = BOS_ID) -> Iterator[np.ndarray]:
    """The documents of a split's shards in order, as token arrays without their BOS; a document that runs
    on into the next shard comes whole. Tokens before the first BOS (none in a well-formed split) form a
    document of their own."""
    carry = np.zeros(0, dtype=np.uint16)
    for f in files:
        tokens = np.concatenate([carry, read_shard(f)])
        starts = np.flatnonzero(tokens == bos_id)
        if len(starts) == 0:
            carry = tokens
            continue
        if starts[0] > 0:
            yield tokens[:starts[0]]
        for a, b in zip(starts[:-1], starts[1:]):
            yield tokens[a + 1:b]
        carry = tokens[starts[-1]:]
    if len(carry):
        yield carry[1:] if carry[0] == bos_id else carry


def document_keys(files: Iterable[str | Path], bos_id: int = BOS_ID) -> set[bytes]:
    return {document_key(doc) for doc in documents(files, bos_id) if len(doc)}


def find_overlap(val_files: list, train_files: list, bos_id: int = BOS_ID) -> dict:
    """Validation documents (non-empty) found in the training shards: counts and the training documents'
    indices (in order of the training stream)."""
    val = document_keys(val_files, bos_id)
    train_docs, found, seen = 0, [], set()
    for i, doc in enumerate(documents(train_files, bos_id)):
        train_docs += 1
        if len(doc):
            key = document_key(doc)
            if key in val:
                found.append(i)
                seen.add(key)
    return {"val_docs": len(val), "train_docs": train_docs, "train_docs_in_val": found,
            "val_docs_in_train": len(seen)}


def check_dataset(data_path: str | Path, bos_id: int = BOS_ID) -> dict:
    return find_overlap(find_shards(data_path, "val"), find_shards(data_path, "train"), bos_id)


def check_sidecar(data_path: str | Path, bos_id: int = BOS_ID) -> str | None:
    """A line describing the validation byte sidecar after checking it, or None when there is none."""
    sidecar = load_byte_sidecar(data_path, bos_id)
    if sidecar is None:
        return None
    return (f"byte_sidecar files:{len(find_byte_sidecars(data_path))} tokens:{len(sidecar)} "
            f"original_bytes:{int(sidecar.sum(dtype=np.int64))}")


def describe(result: dict) -> str:
    found = result["train_docs_in_val"]
    head = (f"disjoint val_docs:{result['val_docs']} train_docs:{result['train_docs']} "
            f"train_docs_in_val:{len(found)} val_docs_in_train:{result['val_docs_in_train']}")
    if found:
        shown = ",".join(map(str, found[:10])) + (",..." if len(found) > 10 else "")
        head += f" first_train_docs:{shown}"
    return head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", type=Path, help="folder of fineweb_val_*.bin and fineweb_train_*.bin")
    parser.add_argument("--bos-id", type=int, default=BOS_ID)
    args = parser.parse_args(argv)
    try:
        result = check_dataset(args.data_path, args.bos_id)
        sidecar = check_sidecar(args.data_path, args.bos_id)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(describe(result))
    if sidecar:
        print(sidecar)
    if result["train_docs_in_val"]:
        raise SystemExit(f"error: {len(result['train_docs_in_val'])} training documents are validation "
                         f"documents: the validation split leaks into training")


if __name__ == "__main__":
    main()
