"""The bpb denominator: our per-token byte counts against the UTF-8 length of the decoded text; the byte sidecar
of a CaseOps dataset (read, checked, and what every score divides by, end to end)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import TINY_VOCAB, stable_docs, tiny_env


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


# ---- the byte sidecar (CaseOps datasets): every score divides by the original text's bytes ----------------


def _write_split(path, tokens: list[list[int]], sidecar: list[list[int]] | None):
    """Validation shards (and their byte sidecars) in the challenge format, one file per list."""
    from data.shards import shard_filename, write_shard
    path.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tokens):
        write_shard(path / shard_filename("val", i), np.array(t))
    for i, v in enumerate(sidecar or []):
        write_shard(path / shard_filename("val_bytes", i), np.array(v))
    return path


def test_a_sidecar_counter_counts_the_sidecar_at_each_target(tmp_path):
    """bpb divides by the sidecar's values of the scored targets, whatever the tokens: with a uniform model
    every target costs ln V, so bpb = (N - 1) ln V / ln 2 / sum(sidecar[1:]), plain and sliding alike."""
    tokens = [[1, 5, 6, 7, 1, 8, 9] * 7, [9, 1, 5, 5, 6] * 5]
    values = [[0, 3, 0, 2, 0, 1, 4] * 7, [2, 0, 1, 1, 7] * 5]
    data = _write_split(tmp_path / "ds", tokens, values)
    stream, files = tg.load_byte_sidecar(str(data), bos_id=1)
    np.testing.assert_array_equal(stream, np.concatenate(values))
    assert [os.path.basename(f) for f in files] == ["fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
    counter = tg.SidecarBytes(torch.from_numpy(stream.astype(np.int32)), len(files))
    val = torch.from_numpy(tg.load_validation_tokens(str(data)).astype(np.int32))
    total = int(stream[1:].sum())
    assert tg.describe_byte_counter(counter, val) == f"val_bytes source:sidecar files:2 total:{total} targets:{len(val) - 1}"

    class Uniform(torch.nn.Module):
        def forward(self, x, y):
            return torch.full(y.shape, float(np.log(16)))

    nats = float(np.float32(np.log(16)))
    for spec in (tg.EvalSpec("plain", 16, 16, 2), tg.EvalSpec("sliding", 16, 4, 3)):
        loss, bpb = tg.evaluate(Uniform(), val, counter, spec, tg.Runtime.single())
        assert bpb == pytest.approx((len(val) - 1) * nats / np.log(2) / total, rel=1e-12)
    # The tokenizer's rule on the same stream would divide by other bytes: this test tells them apart.
    ones = torch.ones(16, dtype=torch.int32)
    luts = tg.ByteLUTs(ones, ones == 0, ones == 0)
    assert tg.describe_byte_counter(luts, val) == f"val_bytes source:tokenizer total:{len(val) - 1} targets:{len(val) - 1}"
    assert total != len(val) - 1


SIDECAR_DAMAGE = {  # what is wrong -> (the sidecar files written, the DataError's words)
    "short": ([[0, 3, 2], [0, 1]], r"fineweb_val_bytes_000001\.bin: 2 byte counts for the 3 tokens of "
                                   r"fineweb_val_000001\.bin: the sidecar does not belong"),
    "long": ([[0, 3, 2], [0, 1, 1, 1]], r"fineweb_val_bytes_000001\.bin: 4 byte counts for the 3 tokens"),
    "missing": ([[0, 3, 2]], r"fineweb_val_bytes_000001\.bin: missing: the byte sidecar of fineweb_val_000001\.bin"),
    "orphan": ([[0, 3, 2], [0, 1, 1], [5]], r"fineweb_val_bytes_000002\.bin: a byte sidecar without its validation "
                                            r"shard fineweb_val_000002\.bin"),
    "bos": ([[0, 3, 2], [4, 1, 1]], r"fineweb_val_bytes_000001\.bin: BOS at position 0 counts 4 bytes, expected 0"),
}


@pytest.mark.parametrize("damage", list(SIDECAR_DAMAGE))
def test_a_sidecar_that_does_not_fit_the_shards_is_refused_by_name(tmp_path, damage):
    values, message = SIDECAR_DAMAGE[damage]
    data = _write_split(tmp_path / "ds", [[1, 7, 8], [1, 9, 9]], values)
    with pytest.raises(tg.DataError, match=message):
        tg.load_byte_sidecar(str(data), bos_id=1)


def test_a_sidecar_with_a_bad_header_is_refused_by_name(tmp_path):
    data = _write_split(tmp_path / "ds", [[1, 7, 8]], [[0, 3, 2]])
    side = data / "fineweb_val_bytes_000000.bin"
    raw = bytearray(side.read_bytes())
    raw[0] ^= 1
    side.write_bytes(bytes(raw))
    with pytest.raises(tg.DataError, match=r"fineweb_val_bytes_000000\.bin: bad magic"):
        tg.load_byte_sidecar(str(data), bos_id=1)


def test_a_transformed_dataset_without_its_sidecar_is_refused(tmp_path, tiny_data):
    """Without a sidecar, a dataset whose manifest names a text transform (or a sidecar), or a tokenizer with
    the CaseOps operators as pieces, would be scored on the transformed text's bytes: refused."""
    from data.caseops import OPERATORS
    assert tg.CASEOPS_OPERATORS == "".join(OPERATORS)
    data = _write_split(tmp_path / "ds", [[1, 7, 8]], None)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"]))
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    assert tg.validation_byte_counter(luts, sp, str(data), 1) is luts  # plain data, plain tokenizer: the tables
    (data / tg.DATASET_MANIFEST).write_text('{"text_transform": "lossless_caps_caseops_v1"}')
    with pytest.raises(tg.DataError, match="text_transform:lossless_caps_caseops_v1, but no fineweb_val_bytes"):
        tg.validation_byte_counter(luts, sp, str(data), 1)
    (data / tg.DATASET_MANIFEST).write_text('{"text_transform": "identity"}')
    tg.validation_byte_counter(luts, sp, str(data), 1)

    class CaseOpsPieces:  # a tokenizer that reserves two of the operators
        def piece_to_id(self, piece):
            return {"\ue001": 4, "\ue003": 6}.get(piece, 0)

        def unk_id(self):
            return 0

    with pytest.raises(tg.DataError, match=r"CaseOps operator pieces U\+E001, U\+E003 but .* has no byte sidecar"):
        tg.validation_byte_counter(luts, CaseOpsPieces(), str(data), 1)


# ---- end to end: CaseOps data built here and as downloaded, trained and scored ---------------------------

N_VAL_DOCS, N_TRAIN_DOCS = 30, 300
FINAL = re.compile(r"^(final_\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)
VAL_BYTES = re.compile(r"^val_bytes source:(\w+)(?: files:(\d+))? total:(\d+) targets:(\d+)$", re.M)
TTT_ON = dict(TTT="1", TTT_EVAL_SEQ_LEN="64", TTT_CHUNK_SIZE="16", TTT_LORA_RANK="4", TTT_BATCH_SIZE="8",
              PHASED_TTT_PREFIX_DOCS="12", PHASED_TTT_NUM_PHASES="2", GLOBAL_TTT_CHUNK_TOKENS="512")


@pytest.fixture(scope="module")
def known_text(tmp_path_factory):
    """The same documents (web-like case, bytes the tokenizer's normalization keeps) built plain and with
    CaseOps (data/build_dataset.py), several validation shards each."""
    from data.build_dataset import build_dataset
    root = tmp_path_factory.mktemp("known_text")
    docs = stable_docs(N_VAL_DOCS + N_TRAIN_DOCS, seed=23)
    out = {"val": docs[:N_VAL_DOCS], "root": root}
    for kind, caseops in (("plain", False), ("caseops", True)):
        out[kind] = build_dataset(docs[N_VAL_DOCS:], docs[:N_VAL_DOCS], root / f"ds_{kind}", root / "tok" / kind,
                                  vocab_size=TINY_VOCAB, shard_tokens=2_000, use_caseops=caseops)
    out["original_bytes"] = sum(len(d.encode("utf-8")) for d in out["val"])
    return out


def counter_of(built: dict) -> tuple[tg.ByteCounter, torch.Tensor]:
    """The byte counter and validation tokens a run of train_gpt.py builds from this dataset."""
    sp = spm.SentencePieceProcessor(model_file=str(built["tokenizer_model"]))
    luts = tg.build_byte_luts(sp, TINY_VOCAB)
    val = torch.from_numpy(tg.load_validation_tokens(str(built["output_dir"])).astype(np.int32))
    return tg.validation_byte_counter(luts, sp, str(built["output_dir"]), sp.bos_id()), val


def test_same_text_same_byte_total_with_and_without_caseops(known_text):
    """What train_gpt.py divides by: on the CaseOps dataset the sidecar, whose total over the validation
    targets is the UTF-8 length of the original documents; on the plain one the tokenizer's tables, with the
    same total. The CaseOps tokenizer's own tables would count 3 bytes per operator: a different number."""
    case, case_val = counter_of(known_text["caseops"])
    plain, plain_val = counter_of(known_text["plain"])
    assert (case.source, plain.source) == ("sidecar", "tokenizer") and case.files > 1
    total = known_text["original_bytes"]
    for counter, val in ((case, case_val), (plain, plain_val)):
        assert VAL_BYTES.fullmatch(tg.describe_byte_counter(counter, val))[3] == str(total)
    sp = spm.SentencePieceProcessor(model_file=str(known_text["caseops"]["tokenizer_model"]))
    tables = tg.describe_byte_counter(tg.build_byte_luts(sp, TINY_VOCAB), case_val)
    assert int(VAL_BYTES.fullmatch(tables)[3]) > total


def check_finals_divide_by(log: str, total: int, names: list[str]) -> None:
    """Each final line's val_bpb is its nats (val_loss x every target) / ln 2 / `total` bytes."""
    source, files, logged, targets = VAL_BYTES.search(log).groups()
    assert int(logged) == total
    finals = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall(log)}
    assert list(finals) == names
    for name, (loss, bpb) in finals.items():
        assert bpb * math.log(2) * total == pytest.approx(loss * int(targets), rel=2e-8), name


def test_a_caseops_run_divides_every_score_by_the_original_bytes(known_text, tmp_path_factory):
    """Plain, sliding-window and TTT lines of a run on the CaseOps dataset built here; then the n-gram
    evaluation of its artifact, whose plain score is the sliding window's."""
    import eval_ngram_on_checkpoint as ev
    built, out = known_text["caseops"], tmp_path_factory.mktemp("caseops_run")
    env = tiny_env(built, out, RUN_ID="case", ITERATIONS="6", VAL_LOSS_EVERY="0", **TTT_ON)
    tg.main(env)
    log = (out / "case.txt").read_text()
    files = len(built["val_bytes_files"])
    assert f"val_bytes source:sidecar files:{files} total:{known_text['original_bytes']} " in log
    assert re.search(r"^dataset .* source:custom .*val_bytes_sha256:[0-9a-f]{64}", log, re.M)
    check_finals_divide_by(log, known_text["original_bytes"], ["final_float_exact", "final_roundtrip_exact",
                                                               "final_sliding_window_exact", "final_ttt_exact"])

    sums = ev.main({**env, "TTT": "0", "ARTIFACT_PATH": str(out / "case.ptz")})
    assert sums["bytes"] == known_text["original_bytes"]
    ngram = (out / "case_ngram.txt").read_text()
    assert f"val_bytes source:sidecar files:{files} total:{known_text['original_bytes']} " in ngram
    plain = re.search(r"^ngram_eval_plain val_loss:(\S+) val_bpb:(\S+) ", ngram, re.M).groups()
    assert plain == re.search(r"^final_sliding_window_exact val_loss:(\S+) val_bpb:(\S+) ", log, re.M).groups()


def test_the_downloaded_caseops_variant_trains_and_scores_where_the_preset_looks(known_text, tmp_path, monkeypatch):
    """The public CaseOps variant as data/cached_challenge_fineweb.py fetches it (a fake hub in its layout serving
    the dataset built here): DATA_VARIANT (what PRESET=april sets) finds it, the dataset line says
    source:challenge, and the scores divide by the sidecar."""
    import data.cached_challenge_fineweb as dl
    built, variant = known_text["caseops"], dl.CASEOPS_VARIANT
    remote = f"datasets/datasets/fineweb10B_{variant}"
    tokenizer = f"tokenizers/fineweb_8192_bpe_{variant.removeprefix('sp8192_')}.model"
    files = {f"{remote}/{p.name}": p for p in [*built["val_files"], *built["val_bytes_files"], *built["train_files"]]}
    files[f"datasets/{tokenizer}"] = built["tokenizer_model"]
    manifest = {"datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "caseops", "val_bytes_glob": "x",
                              "stats": {"files_train": len(built["train_files"]), "files_val": len(built["val_files"])}}],
                "tokenizers": [{"name": "caseops", "text_transform": "lossless_caps_caseops_v1", "model_path": tokenizer}]}

    def download(path: str, destination: Path) -> None:
        destination.write_bytes(json.dumps(manifest).encode() if path == "datasets/manifest.json"
                                else files[path].read_bytes())

    dl.download_variant(variant, len(built["train_files"]), tmp_path / "data", download=download, log=lambda _: None,
                        remote_hashes=lambda paths: {}, repo_id=dl.VARIANT_REPOS[variant])
    monkeypatch.chdir(tmp_path)  # where ./data/... of DATA_VARIANT is
    env = {k: v for k, v in tiny_env(built, tmp_path / "out", RUN_ID="dl", ITERATIONS="4", VAL_LOSS_EVERY="0").items()
           if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    tg.main({**env, "DATA_VARIANT": variant})
    log = (tmp_path / "out" / "dl.txt").read_text()
    assert f"hparam data_path:./data/datasets/fineweb10B_{variant}\n" in log
    assert re.search(rf"^dataset name:fineweb10B_{variant} source:challenge .*repo:romeerp/parameter-golf-caseops-v1",
                     log, re.M)
    check_finals_divide_by(log, known_text["original_bytes"], ["final_float_exact", "final_roundtrip_exact",
                                                               "final_sliding_window_exact"])
