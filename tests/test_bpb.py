"""The bpb denominator: our per-token byte counts against the UTF-8 length of the decoded text."""

from __future__ import annotations

import numpy as np
import sentencepiece as spm
import torch

import train_gpt as tg


def _stream_bytes(sp, luts, docs):
    """Bytes our tables give for every token of a shard-format stream (BOS before each document)."""
    stream = []
    for doc in docs:
        stream += [sp.bos_id()] + sp.encode(doc)
    ids = torch.tensor(stream)
    return int(luts.token_bytes(ids[:-1], ids[1:]).sum()), stream


def test_byte_count_matches_decoded_text(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    docs = tiny_data["val_texts"] + [
        "Price: 1234.56 € — naïve café, 東京 🙂", "  leading spaces and   runs of spaces  ",
        "tab\tseparated\nnew line", "x"]
    ours, stream = _stream_bytes(sp, luts, docs)
    # The normalizer (nmt_nfkc) rewrites some text, so the reference is the decoded text itself.
    expected = sum(len(sp.decode(sp.encode(doc)).encode("utf-8")) for doc in docs)
    assert ours == expected
    # The cases the rule has to get right all occur in this stream.
    kinds = {"byte": any(sp.is_byte(t) for t in stream),
             "space": any(sp.id_to_piece(t).startswith(tg.SPACE_MARK) for t in stream),
             "digit": any(sp.id_to_piece(t).isdigit() for t in stream),
             "bos": stream.count(sp.bos_id()) == len(docs)}
    assert all(kinds.values()), kinds


def test_each_document_is_counted_on_its_own(tiny_data):
    # The leading-space byte of a document's first piece must not be counted after BOS.
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    for doc in tiny_data["val_texts"][:10]:
        ours, _ = _stream_bytes(sp, luts, [doc])
        assert ours == len(sp.decode(sp.encode(doc)).encode("utf-8"))


def test_special_ids_and_padding_are_boundaries(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    luts = tg.build_byte_luts(sp, sp.vocab_size() + 8)  # a model vocab larger than the tokenizer's
    for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id(), sp.vocab_size() + 3):
        assert luts.is_boundary[i] and luts.base_bytes[i] == 0
    assert luts.base_bytes[4 + 0xE2] == 1 and not luts.is_boundary[4 + 0xE2]  # byte fallback <0xE2>


def test_vocab_smaller_than_tokenizer_is_an_error(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    try:
        tg.build_byte_luts(sp, 100)
    except ValueError as e:
        assert "VOCAB_SIZE=100" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_bpb_formula_on_a_stream(tiny_data):
    # bpb = (sum of nats / ln 2) / (sum of bytes): with a uniform model every token costs ln V nats.
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    vocab = sp.vocab_size()
    luts = tg.build_byte_luts(sp, vocab)
    nbytes, stream = _stream_bytes(sp, luts, tiny_data["val_texts"][:5])

    class Uniform(torch.nn.Module):
        def forward(self, x, y):
            return torch.full(y.shape, float(np.log(vocab)))

    tokens = torch.tensor(stream, dtype=torch.int32)
    loss, bpb = tg.evaluate(Uniform(), tokens, luts, tg.EvalSpec("sliding", 32, 8, 4), tg.Runtime.single())
    nats = float(np.float32(np.log(vocab)))  # the model's float32 constant, summed in float64
    assert abs(loss - nats) < 1e-12
    assert abs(bpb - (len(stream) - 1) * nats / np.log(2) / nbytes) < 1e-12
