"""Token statistics of a challenge-format dataset and the unigram baselines in bits per byte.

A model must beat these to have learned anything beyond token frequencies:
- unigram_cross_bpb: validation scored by the training split's unigram distribution (add-one
  smoothed): what a context-free model learned from the training data achieves;
- unigram_entropy_bpb: the validation split's own empirical unigram entropy, the floor of any
  context-free model, even one that peeked at the validation counts.

Bytes: a dataset with a validation byte sidecar (CaseOps, data/caseops.py) counts the sidecar, the
original text's bytes; any other counts each token's bytes from its piece exactly as train_gpt.py's
build_byte_luts does (tests/test_data_tools.py checks the two agree on a tokenizer it builds). The
output's byte_source says which.

Run:
    python3 data/token_stats.py --data-path data/datasets/fineweb10B_sp1024 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shards import ShardError, find_shards, load_byte_sidecar, load_split, read_shard  # noqa: E402

SPACE_MARK = "\u2581"  # sentencepiece's visible space


@dataclass
class ByteTables:
    """Per-token-id tables of the bpb denominator, the same rule as train_gpt.py's ByteLUTs."""
    base_bytes: np.ndarray  # int32 [V]: UTF-8 bytes of the piece without its leading space mark
    has_leading_space: np.ndarray  # bool [V]
    is_boundary: np.ndarray  # bool [V]: control/unknown/unused ids: 0 bytes, and no space after them

    def token_bytes(self, prev_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
        space = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids] + space.astype(np.int32)


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteTables:
    """Control, unknown and unused ids (and ids past the tokenizer) are boundaries; a byte-fallback piece is
    1 byte; any other piece is the UTF-8 length of the text it decodes to: a leading space mark counts
    only after a non-boundary, any other space mark is one space."""
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {sp.vocab_size()} pieces but the vocabulary size is {vocab_size}")
    base = np.zeros(vocab_size, dtype=np.int32)
    space = np.zeros(vocab_size, dtype=np.bool_)
    boundary = np.ones(vocab_size, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            space[i] = True
            piece = piece[len(SPACE_MARK):]
        base[i] = len(piece.replace(SPACE_MARK, " ").encode("utf-8"))
    return ByteTables(base, space, boundary)


def target_bytes(val_tokens: np.ndarray, tables: ByteTables | None, sidecar: np.ndarray | None) -> np.ndarray:
    """Bytes of every scored target val_tokens[1:]: from the sidecar when there is one, else the tables."""
    if sidecar is not None:
        if len(sidecar) != len(val_tokens):
            raise ShardError(f"the byte sidecar holds {len(sidecar)} counts for {len(val_tokens)} validation tokens")
        return sidecar[1:].astype(np.int64)
    tokens = val_tokens.astype(np.int64)
    return tables.token_bytes(tokens[:-1], tokens[1:]).astype(np.int64)


def unigram_baselines(train_files: list, val_tokens: np.ndarray, vocab_size: int,
                      tables: ByteTables | None, sidecar: np.ndarray | None = None) -> dict:
    """Counts over every train shard; the scored targets are val_tokens[1:] as in train_gpt.py's evaluation."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    train_tokens = 0
    for path in train_files:
        tokens = read_shard(path)
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
        train_tokens += len(tokens)
    targets = val_tokens[1:].astype(np.int64)
    val_bytes = int(target_bytes(val_tokens, tables, sidecar).sum())
    p_train = (counts + 1) / (counts.sum() + vocab_size)
    cross_bits = -np.log2(p_train[targets]).sum()
    val_counts = np.bincount(targets, minlength=vocab_size)
    f = val_counts[val_counts > 0] / len(targets)
    entropy_bits = -(f * np.log2(f)).sum() * len(targets)
    return {
        "byte_source": "sidecar" if sidecar is not None else "tokenizer",
        "train_tokens": train_tokens, "val_targets": len(targets), "val_bytes": val_bytes,
        "bytes_per_token": val_bytes / len(targets),
        "unigram_cross_bpb": cross_bits / val_bytes, "unigram_entropy_bpb": entropy_bits / val_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="folder with fineweb_{train,val}_*.bin")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's")
    args = parser.parse_args(argv)
    try:
        sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
        vocab = args.vocab_size or sp.vocab_size()
        sidecar = load_byte_sidecar(args.data_path, bos_id=sp.bos_id())
        stats = unigram_baselines(find_shards(args.data_path, "train"), load_split(args.data_path, "val"), vocab,
                                  build_byte_tables(sp, vocab), sidecar)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(" ".join(f"{k}:{v:.8f}" if isinstance(v, float) else f"{k}:{v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
