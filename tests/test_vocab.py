"""Data for larger vocabularies: the byte tables count every piece type right, whatever the tokenizer's
settings; no validation document reaches the training shards (data/check_disjoint.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import ROOT
from data import check_disjoint
from data.shards import shard_filename, write_shard
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


# ---- no validation document in the training data ------------------------------------------------


def write_split(folder, split, docs, shard_tokens):
    """docs (token lists) as BOS + tokens each, cut into shards of shard_tokens: documents straddle shards."""
    stream = np.concatenate([np.array([1] + list(d), dtype=np.uint16) for d in docs])
    for i in range(0, len(stream), shard_tokens):
        write_shard(folder / shard_filename(split, i // shard_tokens), stream[i:i + shard_tokens])


def random_docs(n, seed, vocab=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, rng.integers(5, 60)).tolist() for _ in range(n)]


def test_documents_are_read_whole_across_shards(tmp_path):
    docs = random_docs(40, 0)
    write_split(tmp_path, "train", docs, shard_tokens=97)
    read = list(check_disjoint.documents(sorted(tmp_path.glob("fineweb_train_*.bin"))))
    assert len(sorted(tmp_path.glob("*.bin"))) > 5 and [d.tolist() for d in read] == docs


def test_a_validation_document_in_the_training_shards_is_found(tmp_path):
    val, train = random_docs(20, 1), random_docs(60, 2)
    leaked = train[:17] + [val[4]] + train[17:40] + [val[11], val[4]] + train[40:]
    write_split(tmp_path, "val", val, shard_tokens=10_000)
    write_split(tmp_path, "train", leaked, shard_tokens=113)  # the leaked documents straddle shards too
    result = check_disjoint.check_dataset(tmp_path)
    assert result["train_docs_in_val"] == [17, 41, 42] and result["val_docs_in_train"] == 2
    assert (result["val_docs"], result["train_docs"]) == (20, 63)
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "check_disjoint.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "train_docs_in_val:3 val_docs_in_train:2 first_train_docs:17,41,42" in proc.stdout
    assert "3 training documents are validation documents" in proc.stderr


def test_disjoint_splits_pass(tmp_path, tiny_data):
    write_split(tmp_path, "val", random_docs(20, 1), shard_tokens=10_000)
    write_split(tmp_path, "train", random_docs(60, 2), shard_tokens=113)
    assert check_disjoint.check_dataset(tmp_path)["train_docs_in_val"] == []
    result = check_disjoint.check_dataset(tiny_data["output_dir"])
    assert result["train_docs_in_val"] == [] and result["val_docs"] == 40


def test_the_builder_leaves_validation_documents_out_of_training(tmp_path):
    """A training document with a validation document's text, and one that only the tokenizer's
    normalization makes equal (NFKC: the ligature U+FB01 is "fi"), never reach the training shards; the
    builder's own check of the written shards agrees, and the manifest says what was left out."""
    import json

    from data.build_dataset import build_dataset
    docs = generate_documents(120, seed=3)
    val, train = docs[:20], docs[20:]
    target = next(d for d in val if "fi" in d)
    ligature = target.replace("fi", "\ufb01")
    train = train[:30] + [val[5], ligature] + train[30:] + [val[5]]
    result = build_dataset(train, val, tmp_path / "ds", tmp_path / "tok" / "t_bpe", vocab_size=384,
                           shard_tokens=2_000)
    disjoint = result["disjoint"]
    assert disjoint["train_docs_dropped_same_text"] == 2 and disjoint["train_docs_dropped_same_tokens"] == 1
    assert disjoint["train_docs_in_val"] == [] and result["train_docs"] == len(train) - 3
    assert check_disjoint.check_dataset(tmp_path / "ds")["train_docs"] == result["train_docs"]
    manifest = json.loads(result["manifest"].read_text())
    assert manifest["disjoint"]["train_docs_dropped_same_tokens"] == 1 and manifest["train"]["docs"] == len(train) - 3
