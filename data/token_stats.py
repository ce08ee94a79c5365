"""Token statistics of a challenge-format dataset and the unigram baselines in bits per byte.

A model must beat these to have learned anything beyond token frequencies:
- unigram_cross_bpb: validation scored by the training split's unigram distribution (add-one
  smoothed): what a context-free model learned from the training data achieves;
- unigram_entropy_bpb: the validation split's own empirical unigram entropy, the floor of any
  context-free model, even one that peeked at the validation counts.
Both use train_gpt.py's byte accounting, so they compare directly with its val_bpb.

Run:
    python data/token_stats.py --data-path data/datasets/fineweb10B_sp1024 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402  (the byte accounting and shard reader of the scored run)


def unigram_baselines(train_files: list[str], val_tokens: np.ndarray, vocab_size: int,
                      luts: train_gpt.ByteLUTs) -> dict:
    """Counts over every train shard; the scored targets are val_tokens[1:] as in train_gpt.evaluate."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    train_tokens = 0
    for path in train_files:
        tokens = train_gpt.load_data_shard(path)
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
        train_tokens += len(tokens)
    prev, targets = torch.from_numpy(val_tokens[:-1].astype(np.int64)), torch.from_numpy(val_tokens[1:].astype(np.int64))
    val_bytes = int(luts.token_bytes(prev, targets).sum())
    p_train = (counts + 1) / (counts.sum() + vocab_size)
    cross_bits = -np.log2(p_train[val_tokens[1:]]).sum()
    val_counts = np.bincount(val_tokens[1:], minlength=vocab_size)
    f = val_counts[val_counts > 0] / len(targets)
    entropy_bits = -(f * np.log2(f)).sum() * len(targets)
    return {
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
    sp = train_gpt.load_tokenizer(args.tokenizer)
    vocab = args.vocab_size or sp.vocab_size()
    stats = unigram_baselines(train_gpt.find_shards(args.data_path, "train"),
                              train_gpt.load_validation_tokens(args.data_path), vocab,
                              train_gpt.build_byte_luts(sp, vocab))
    print(" ".join(f"{k}:{v:.8f}" if isinstance(v, float) else f"{k}:{v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
