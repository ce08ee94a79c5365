"""The unigram baselines use the same byte accounting as the scored evaluation."""

from __future__ import annotations

import numpy as np
import sentencepiece as spm
import torch

import train_gpt as tg
from data.token_stats import build_byte_tables, unigram_baselines


def test_unigram_baselines(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    val = tg.load_validation_tokens(str(tiny_data["output_dir"]))
    stats = unigram_baselines(tiny_data["train_files"], val, sp.vocab_size(), build_byte_tables(sp, sp.vocab_size()))
    # Bytes: exactly the UTF-8 length of the decoded validation documents.
    assert stats["val_bytes"] == sum(len(sp.decode(sp.encode(t)).encode()) for t in tiny_data["val_texts"])
    assert stats["train_tokens"] == tiny_data["train_tokens"] and stats["val_targets"] == len(val) - 1
    assert stats["byte_source"] == "tokenizer"
    # A distribution fit elsewhere cannot beat the data's own entropy (Gibbs' inequality).
    assert 0 < stats["unigram_entropy_bpb"] < stats["unigram_cross_bpb"]
    # The empirical entropy by a direct count.
    _, counts = np.unique(val[1:], return_counts=True)
    f = counts / counts.sum()
    assert abs(stats["unigram_entropy_bpb"] - (-(f * np.log2(f)).sum() * (len(val) - 1) / stats["val_bytes"])) < 1e-9


def test_byte_tables_are_train_gpts(tiny_data):
    """data/ keeps its own copy of the byte rule (it never imports train_gpt.py): token by token, the same
    bytes as train_gpt.py's, on every (previous, target) pair of the validation stream and on pairs that
    start at a boundary."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    vocab = sp.vocab_size() + 3  # ids past the tokenizer are boundaries in both
    ours, theirs = build_byte_tables(sp, vocab), tg.build_byte_luts(sp, vocab)
    np.testing.assert_array_equal(ours.base_bytes, theirs.base_bytes.numpy())
    np.testing.assert_array_equal(ours.has_leading_space, theirs.has_leading_space.numpy())
    np.testing.assert_array_equal(ours.is_boundary, theirs.is_boundary.numpy())
    val = tg.load_validation_tokens(str(tiny_data["output_dir"])).astype(np.int64)
    every = np.arange(vocab)
    prev = np.concatenate([val[:-1], np.full(vocab, sp.bos_id()), np.roll(every, 1)])
    target = np.concatenate([val[1:], every, every])
    np.testing.assert_array_equal(ours.token_bytes(prev, target),
                                  theirs.token_bytes(torch.from_numpy(prev), torch.from_numpy(target)).numpy())
