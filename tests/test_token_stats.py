"""The unigram baselines use the same byte accounting as the scored evaluation."""

from __future__ import annotations

import numpy as np
import sentencepiece as spm

import train_gpt as tg
from data.token_stats import unigram_baselines


def test_unigram_baselines(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    val = tg.load_validation_tokens(str(tiny_data["output_dir"]))
    stats = unigram_baselines(tiny_data["train_files"], val, sp.vocab_size(), tg.build_byte_luts(sp, sp.vocab_size()))
    # Bytes: exactly the UTF-8 length of the decoded validation documents.
    assert stats["val_bytes"] == sum(len(sp.decode(sp.encode(t)).encode()) for t in tiny_data["val_texts"])
    assert stats["train_tokens"] == tiny_data["train_tokens"] and stats["val_targets"] == len(val) - 1
    # A distribution fit elsewhere cannot beat the data's own entropy (Gibbs' inequality).
    assert 0 < stats["unigram_entropy_bpb"] < stats["unigram_cross_bpb"]
    # The empirical entropy by a direct count.
    _, counts = np.unique(val[1:], return_counts=True)
    f = counts / counts.sum()
    assert abs(stats["unigram_entropy_bpb"] - (-(f * np.log2(f)).sum() * (len(val) - 1) / stats["val_bytes"])) < 1e-9
