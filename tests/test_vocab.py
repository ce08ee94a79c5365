"""Larger vocabularies: the byte tables count every piece type right, whatever the tokenizer's settings."""

from __future__ import annotations

import sentencepiece as spm
import torch

import train_gpt as tg
from data.synthetic_text import generate_documents

USER_SYMBOLS = ["<sep>", "\u2581caf\u00e9\u2581au\u2581lait", "\U0001F642"]


def stream_bytes(sp, luts, docs) -> tuple[int, list[int]]:
    stream = []
    for doc in docs:
        stream += [sp.bos_id()] + sp.encode(doc)
    ids = torch.tensor(stream)
    return int(luts.token_bytes(ids[:-1], ids[1:]).sum()), stream


def test_byte_tables_count_every_piece_type(tmp_path):
    # Pieces that span spaces (no split at whitespace), user-defined symbols with and without space marks,
    # byte fallback, controls: each document's bytes are the UTF-8 length of the text it decodes to.
    docs = generate_documents(200, seed=3)
    prefix = tmp_path / "wide"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3, split_by_whitespace=False,
        user_defined_symbols=USER_SYMBOLS, minloglevel=1)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    extra = ["a <sep> b", "un caf\u00e9 au lait, merci \U0001F642", "  spaces   inside  ", "\u6771\u4eac \u00e9t\u00e9"]
    checked = docs[:30] + extra
    ours, stream = stream_bytes(sp, luts, checked)
    assert ours == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in checked)
    for doc in extra:  # each on its own: a document's first space after BOS is not counted
        assert stream_bytes(sp, luts, [doc])[0] == len(sp.decode(sp.encode(doc)).encode("utf-8"))
    inner = [t for t in stream if tg.SPACE_MARK in sp.id_to_piece(t)[1:]]
    user = [t for t in stream if sp.id_to_piece(t) in USER_SYMBOLS]
    assert inner and user and any(sp.is_byte(t) for t in stream)  # the cases occurred
