"""CaseOps (data/caseops.py) and its data: the transform is exactly invertible, the validation byte sidecar
counts the original text's bytes, and no validation document reaches training.

Everything runs on CPU, offline, in a few seconds, on data the tests make themselves.

Run:
    python3 -m pytest -q tests/test_caseops.py
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import data.build_dataset as bd  # noqa: E402
import data.cached_challenge_fineweb as dl  # noqa: E402
from data import caseops, check_disjoint  # noqa: E402
from data.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE, CaseOpsError, decode, encode  # noqa: E402
from data.shards import (ShardError, find_shards, load_byte_sidecar, read_shard, shard_filename,  # noqa: E402
                         write_shard)
from data.synthetic_text import generate_documents  # noqa: E402
from data.token_stats import build_byte_tables, unigram_baselines  # noqa: E402
from conftest import stable_docs  # noqa: E402

BOS = 1
PROPERTY = settings(max_examples=400, derandomize=True, database=None, deadline=None)


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------
# The transform

# Each with its CaseOps form: the rules of the public lossless_caps_caseops_v1, which produced the same
# strings here (and on 4,100 corpus documents and 200,000 random strings; see docs/data.md).
EXAMPLES = {
    "": "",
    "the cat": "the cat",
    "The Cat": f"{TITLE}the {TITLE}cat",
    "NASA": f"{ALLCAPS}nasa",
    "A": f"{TITLE}a",
    "I am": f"{TITLE}i am",
    "iPhone": f"i{CAPNEXT}phone",
    "McDonald": f"{TITLE}mc{CAPNEXT}donald",
    "ABc": f"{TITLE}a{CAPNEXT}bc",
    "aBC": f"a{CAPNEXT}b{CAPNEXT}c",
    "HTTP2Go": f"{ALLCAPS}http2{TITLE}go",  # a digit ends an ASCII word
    "x\ue001y": f"x{ESC}\ue001y",  # operators already in the text are escaped
    ESC + ESC: ESC * 4,
    "STRAẞE": f"{ALLCAPS}straẞ{TITLE}e",  # non-ASCII letters are left alone and end the ASCII word
    "İstanbul ıI": f"İstanbul ı{TITLE}i",
    "ǅemal Ǆ": "ǅemal Ǆ",
    "A\u0301": f"{TITLE}a\u0301",  # a combining mark is a character like any other
    "\ue000\ue005": "\ue000\ue005",  # private-use neighbours are not operators
}

# Strings where Unicode case mapping is odd: changes length, has no inverse, depends on language, or
# is undefined (lone surrogates).
ODDITIES = [
    "ß ẞ SS ss straße STRASSE", "İi Iı ǰ J̌", "ǅ ǈ ǋ ǲ Ǆ ǆ", "ŉ ʼN", "ﬀ ﬁ ﬃ FFI", "ΣΑΣ σας ς", "Ꭰ ꭰ",
    "e\u0301 É é \u0345 ΐ", "\u1e9e\u00df\u0130\u0131", "Ⅻ ⅻ Ⓐ ⓐ 𝐀 Ａ ａ", "\ud800 \udfff x\ud83dY",
    "\x00\x01\x7f\u200b\ufeff", "  \n\n\tLeading  And  TRAILING  ", ESC + "A" + TITLE + "b" + CAPNEXT + ALLCAPS,
    "".join(OPERATORS) * 3 + "XyZ",
]


@pytest.mark.parametrize("text", list(EXAMPLES))
def test_examples(text):
    assert encode(text) == EXAMPLES[text]
    assert decode(EXAMPLES[text]) == text


@pytest.mark.parametrize("text", ODDITIES)
def test_unicode_oddities_round_trip_byte_for_byte(text):
    t = encode(text)
    assert utf8(decode(t)) == utf8(text)
    assert encode(decode(t)) == t
    assert not any("A" <= ch <= "Z" for ch in t)


@PROPERTY
@given(st.text(st.characters(codec=None)))
def test_any_text_round_trips(text):
    t = encode(text)
    assert utf8(decode(t)) == utf8(text)
    assert not any("A" <= ch <= "Z" for ch in t)


CASE_ALPHABET = list("aAbBqQzZ") + list(OPERATORS) + list(" 1'-ßẞİıǅ\u0301éÉ\ue000\n")


@PROPERTY
@given(st.text(st.sampled_from(CASE_ALPHABET), max_size=30))
def test_case_heavy_text_round_trips(text):
    t = encode(text)
    assert decode(t) == text


def test_seeded_random_text_round_trips():
    rng = random.Random(2127)
    pool = CASE_ALPHABET + [chr(c) for c in (0x1C4, 0x1C5, 0x1E9E, 0x130, 0x131, 0x149, 0xFB01, 0x3A3, 0xD800)]
    for _ in range(5_000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 24)))
        assert utf8(decode(encode(text))) == utf8(text)


@PROPERTY
@given(st.text(st.sampled_from(list("abz") + list(OPERATORS) + list("A ")), max_size=12))
def test_decode_accepts_exactly_what_encode_writes(t):
    """decode() either refuses a string or returns the one text whose CaseOps form it is."""
    try:
        text = decode(t)
    except CaseOpsError:
        return
    assert encode(text) == t


@pytest.mark.parametrize("t", [
    "Abc",  # an uppercase ASCII letter
    TITLE, f"{TITLE} x", f"{ALLCAPS}a", f"{ALLCAPS}{TITLE}ab", f"a{CAPNEXT}", f"{CAPNEXT}{CAPNEXT}a",
    f"{TITLE}a{CAPNEXT}b",  # "AB" letter by letter: ALLCAPS is its only form
    f"ab{TITLE}c",  # a word operator inside a word
    f"{ESC}a", ESC,  # an escape must be followed by an operator
])
def test_decode_refuses_what_encode_never_writes(t):
    with pytest.raises(CaseOpsError, match="position"):
        decode(t)


@PROPERTY
@given(st.text(st.characters(codec=None) | st.sampled_from(CASE_ALPHABET)), st.lists(st.integers(0, 400)))
def test_original_bytes_of_any_cut_of_the_text_add_up(text, cuts):
    """However the CaseOps text is cut into fragments (between an escape and its operator too), the
    fragments' original bytes add up to the original text's UTF-8 length."""
    t = encode(text)
    points = sorted({0, len(t), *[c % (len(t) + 1) for c in cuts]})
    fragments = [t[a:b] for a, b in zip(points[:-1], points[1:])]
    assert sum(caseops.original_bytes(fragments)) == len(utf8(text))


def test_original_bytes_counts_operators_zero_and_escaped_operators_three():
    assert caseops.original_bytes([TITLE, "the", " ", ALLCAPS, "nasa"]) == [0, 3, 1, 0, 4]
    assert caseops.original_bytes([ESC, TITLE, ESC + ESC, "x"]) == [0, 3, 3, 1]
    with pytest.raises(CaseOpsError):
        caseops.original_bytes(["x", ESC])


# ---------------------------------------------------------------------------------------------
# Datasets: one plain and one CaseOps, from the same documents

VOCAB, SHARD_TOKENS = 512, 3_000
N_VAL, N_TRAIN = 30, 300


# The normalization changes these (whitespace runs, leading whitespace, a ligature, a control character),
# and they hold the operators and case oddities themselves; each still has tokens.
ADVERSARIAL_VAL = [
    "  Leading spaces and\n\nTWO  runs of   SPACES  ",
    "The \ufb01rst ligature and a control\x01 character, ½ too.",
    f"Literal operators: {TITLE}{ALLCAPS}{CAPNEXT}{ESC} in the TEXT, and \ue000.",
    "STRAẞE İstanbul ǅemal ŉ Σας iPhone McDonald HTTP2Go.",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops_pair")
    docs = stable_docs(N_VAL + N_TRAIN, seed=11)
    val, train = docs[:N_VAL] + ADVERSARIAL_VAL, docs[N_VAL:]
    out = {"val": val, "train": train, "root": root}
    for kind, flag in (("plain", False), ("caseops", True)):
        result = bd.build_dataset(train, val, root / f"ds_{kind}", root / "tok" / f"{kind}_bpe", vocab_size=VOCAB,
                                  shard_tokens=SHARD_TOKENS, use_caseops=flag)
        out[kind] = result
        out[f"sp_{kind}"] = spm.SentencePieceProcessor(model_file=str(result["tokenizer_model"]))
    return out


def val_documents(data_path: Path) -> list[np.ndarray]:
    return list(check_disjoint.documents(find_shards(data_path, "val")))


def per_document(values: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    """values (aligned with tokens) cut at each BOS, without the BOS."""
    starts = list(np.flatnonzero(tokens == BOS)) + [len(tokens)]
    return [values[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


def test_caseops_tokenizer_has_the_public_layout(pair):
    sp = pair["sp_caseops"]
    assert [sp.piece_to_id(op) for op in OPERATORS] == [4, 5, 6, 7]
    assert sp.piece_to_id("<0x00>") == 8 and (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (1, 0, 2, 3)
    manifest = json.loads(pair["caseops"]["manifest"].read_text())
    assert manifest["text_transform"] == "lossless_caps_caseops_v1"
    assert manifest["tokenizer"]["settings"]["user_defined_symbols"] == list(OPERATORS)
    assert json.loads(pair["plain"]["manifest"].read_text())["text_transform"] == "identity"
    assert pair["plain"]["val_bytes_files"] == [] and pair["plain"]["val_bytes"] is None


def test_the_sidecar_adds_up_to_the_original_documents_utf8_length(pair):
    """Document by document: the sidecar's counts between two BOS are the document's UTF-8 length, also
    for documents whose leading whitespace or control characters the tokenizer drops."""
    ds = pair["caseops"]["output_dir"]
    tokens = np.concatenate([read_shard(f) for f in find_shards(ds, "val")])
    sidecar = load_byte_sidecar(ds, BOS)
    assert len(pair["caseops"]["val_bytes_files"]) == len(pair["caseops"]["val_files"]) > 1
    counts = per_document(sidecar.astype(np.int64), tokens)
    assert [int(c.sum()) for c in counts] == [len(utf8(d)) for d in pair["val"]]
    entry = pair["caseops"]["val_bytes"]
    assert entry["original_bytes"] == entry["val_text_bytes"] == sum(len(utf8(d)) for d in pair["val"])
    assert entry["bytes_of_docs_without_tokens"] == 0
    # BOS and operators count 0; an escaped operator (ESC then the operator's id) counts its 3 bytes.
    ops = np.isin(tokens, [4, 5, 6, 7])
    after_esc = np.concatenate([[False], tokens[:-1] == 7])
    assert (sidecar[tokens == BOS] == 0).all()
    assert (sidecar[ops & ~after_esc] == 0).all() and (sidecar[ops & after_esc] == 3).all()
    assert all((tokens == i).any() for i in (4, 5, 6, 7)) and after_esc.any()


def test_same_text_same_bytes_with_and_without_caseops(pair):
    """What each dataset's scoring divides by (token_stats: the plain tokenizer's byte tables, as
    train_gpt.py counts; the CaseOps sidecar) is the same total on the same text. The plain count is of
    the normalized text: it differs exactly where the normalization changes the text, which the CaseOps
    sidecar does not follow (it counts the original), on the adversarial documents only."""
    plain_ds, case_ds = pair["plain"]["output_dir"], pair["caseops"]["output_dir"]
    sp_plain, sp_case = pair["sp_plain"], pair["sp_caseops"]
    tables = build_byte_tables(sp_plain, VOCAB)
    plain_stats = unigram_baselines([], np.concatenate([read_shard(f) for f in find_shards(plain_ds, "val")]), VOCAB,
                                    tables)
    case_val = np.concatenate([read_shard(f) for f in find_shards(case_ds, "val")])
    case_stats = unigram_baselines([], case_val, VOCAB, None, load_byte_sidecar(case_ds, BOS))
    assert (plain_stats["byte_source"], case_stats["byte_source"]) == ("tokenizer", "sidecar")
    original = sum(len(utf8(d)) for d in pair["val"])
    normalized = sum(len(utf8(sp_plain.decode(sp_plain.encode(d)))) for d in pair["val"])
    assert case_stats["val_bytes"] == original and plain_stats["val_bytes"] == normalized != original
    # Document by document on the documents the normalization leaves alone: equal.
    plain_docs = val_documents(plain_ds)
    sidecar_docs = per_document(load_byte_sidecar(case_ds, BOS).astype(np.int64), case_val)
    for i, doc in enumerate(pair["val"][:N_VAL]):
        ids = np.concatenate([[BOS], plain_docs[i]]).astype(np.int64)
        assert int(tables.token_bytes(ids[:-1], ids[1:]).sum()) == int(sidecar_docs[i].sum()) == len(utf8(doc))
    # The plain tokenizer's own original-byte count (data/caseops.token_original_bytes) agrees with both.
    assert sum(sum(caseops.token_original_bytes(sp_plain, d, is_caseops=False)[1]) for d in pair["val"]) == original
    assert sum(sum(caseops.token_original_bytes(sp_case, encode(d))[1]) for d in pair["val"]) == original


def test_caseops_tokens_decode_to_the_original_text(pair):
    sp = pair["sp_caseops"]
    docs = val_documents(pair["caseops"]["output_dir"])
    assert len(docs) == len(pair["val"])
    sp_plain = pair["sp_plain"]
    for ids, text in zip(docs[:N_VAL + 3], pair["val"]):  # the text as the tokenizer normalizes it, case and all
        assert decode(sp.decode(ids.tolist())) == sp_plain.decode(sp_plain.encode(text))
    # The normalization runs after CaseOps (as in the public pipeline): "ǅ" becomes "Dž", an ASCII
    # capital no operator marks, so that document's tokens do not decode as CaseOps text. Its bytes are
    # still counted right (test_the_sidecar_adds_up_to_the_original_documents_utf8_length).
    assert "ǅ" in pair["val"][N_VAL + 3] and "Dž" in sp.decode(docs[N_VAL + 3].tolist())
    with pytest.raises(CaseOpsError, match="uppercase ASCII"):
        decode(sp.decode(docs[N_VAL + 3].tolist()))
    # Case variants share pieces: no piece of the CaseOps tokenizer holds an uppercase ASCII letter.
    assert not any(any("A" <= ch <= "Z" for ch in sp.id_to_piece(i)) for i in range(sp.vocab_size())
                   if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)))


def test_caseops_byte_tables_are_train_gpts(pair):
    """The operators are user-defined pieces: data/token_stats.py's tables agree with train_gpt.py's on
    them as on every other piece (the sidecar, not these tables, is what a CaseOps score divides by)."""
    import train_gpt as tg
    sp = pair["sp_caseops"]
    ours, theirs = build_byte_tables(sp, VOCAB), tg.build_byte_luts(sp, VOCAB)
    np.testing.assert_array_equal(ours.base_bytes, theirs.base_bytes.numpy())
    np.testing.assert_array_equal(ours.is_boundary, theirs.is_boundary.numpy())
    np.testing.assert_array_equal(ours.has_leading_space, theirs.has_leading_space.numpy())


# ---- a sidecar that does not fit is refused, by name ----------------------------------------------


@pytest.fixture
def copy_of_caseops(pair, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(pair["caseops"]["output_dir"], ds)
    return ds


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "data" / tool), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_a_sidecar_of_the_wrong_length_is_refused_by_name(copy_of_caseops, pair):
    ds = copy_of_caseops
    victim = ds / shard_filename("val_bytes", 1)
    write_shard(victim, read_shard(victim)[:-1])
    with pytest.raises(ShardError, match=r"fineweb_val_bytes_000001\.bin: \d+ byte counts for the \d+ tokens of "
                                         r"fineweb_val_000001\.bin"):
        load_byte_sidecar(ds)
    for proc in (run_tool("check_disjoint.py", ds),
                 run_tool("token_stats.py", "--data-path", ds, "--tokenizer", pair["caseops"]["tokenizer_model"])):
        assert proc.returncode != 0 and "fineweb_val_bytes_000001.bin" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage, message", [
    ("missing", r"fineweb_val_bytes_000000\.bin: missing"),
    ("orphan", r"fineweb_val_bytes_000099\.bin: a byte sidecar without its validation shard"),
    ("bos", r"fineweb_val_bytes_000000\.bin: BOS at position 0 counts 5 bytes"),
    ("header", r"fineweb_val_bytes_000000\.bin: bad magic"),
])
def test_a_sidecar_that_does_not_belong_is_refused_by_name(copy_of_caseops, damage, message):
    ds = copy_of_caseops
    first = ds / shard_filename("val_bytes", 0)
    if damage == "missing":
        first.unlink()
    elif damage == "orphan":
        write_shard(ds / shard_filename("val_bytes", 99), np.zeros(3, dtype=np.int64))
    elif damage == "bos":
        values = read_shard(first).copy()
        values[0] = 5
        write_shard(first, values)
    else:
        data = bytearray(first.read_bytes())
        data[0] ^= 1
        first.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=message):
        load_byte_sidecar(ds, BOS)


def test_token_stats_and_check_disjoint_report_the_sidecar(pair):
    ds = pair["caseops"]["output_dir"]
    stats = run_tool("token_stats.py", "--data-path", ds, "--tokenizer", pair["caseops"]["tokenizer_model"])
    original = sum(len(utf8(d)) for d in pair["val"])
    assert stats.returncode == 0, stats.stderr
    assert "byte_source:sidecar" in stats.stdout and f"val_bytes:{original} " in stats.stdout
    check = run_tool("check_disjoint.py", ds)
    assert check.returncode == 0, check.stderr
    assert f"byte_sidecar files:{len(pair['caseops']['val_bytes_files'])}" in check.stdout
    assert f"original_bytes:{original}" in check.stdout


# ---------------------------------------------------------------------------------------------
# No leak


def test_check_disjoint_finds_a_caseops_leak_like_issue_2127(pair, tmp_path):
    """The public preparation script took --val-docs 10,000 where the validation split holds 50,000: the
    other 40,000 were encoded into training. Here, at small scale: a CaseOps dataset whose training shards
    also hold validation documents 10..29, encoded as that script did (BOS + ids per document)."""
    ds = tmp_path / "leaky"
    shutil.copytree(pair["caseops"]["output_dir"], ds)
    sp = pair["sp_caseops"]
    leaked = [[BOS] + sp.encode(encode(d)) for d in pair["val"][10:N_VAL]]
    train = np.concatenate([read_shard(f) for f in find_shards(ds, "train")])
    for f in find_shards(ds, "train"):
        f.unlink()
    stream = np.concatenate([np.array(sum(leaked, []), dtype=np.int64), train])
    for i in range(0, len(stream), SHARD_TOKENS):
        write_shard(ds / shard_filename("train", i // SHARD_TOKENS), stream[i:i + SHARD_TOKENS])
    result = check_disjoint.check_dataset(ds)
    assert result["train_docs_in_val"] == list(range(20)) and result["val_docs_in_train"] == 20
    proc = run_tool("check_disjoint.py", ds)
    assert proc.returncode == 1 and "20 training documents are validation documents" in proc.stderr


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_the_builder_never_trains_on_declared_validation_documents(tmp_path):
    """The challenge's docs_selected.jsonl declares its first documents validation documents (its source
    manifest's docs_val): fewer than that with --val-docs is refused (issue #2127), and with --val-input
    or as a later input they are left out of training."""
    docs = generate_documents(60, seed=4)
    stream = write_jsonl(tmp_path / "docs_selected.jsonl", docs)
    (tmp_path / "docs_selected.source_manifest.json").write_text(json.dumps({"docs_val": 20, "num_docs": 60}))
    args = ["--input", stream, "--vocab-size", "400", "--no-progress", "--caseops",
            "--output-dir", tmp_path / "ds", "--tokenizer-prefix", tmp_path / "tok" / "t"]
    with pytest.raises(SystemExit, match=r"docs_val 20; --val-docs 10 would put the other 10 into training "
                                         r"\(challenge issue #2127\): use --val-docs 20"):
        bd.main([str(a) for a in args + ["--val-docs", "10"]])
    assert not (tmp_path / "ds").exists()
    train, val = bd.split_documents([stream], 20, None, None)
    assert val == docs[:20] and train == docs[20:]
    other = write_jsonl(tmp_path / "other.jsonl", generate_documents(5, seed=5))
    train, val = bd.split_documents([stream], None, other, None)
    assert train == docs[20:]
    train, val = bd.split_documents([other, stream], 2, None, None)
    assert train == generate_documents(5, seed=5)[2:] + docs[20:]
    # Without its source manifest, the challenge's stream is still known: 50,000 validation documents.
    (tmp_path / "docs_selected.source_manifest.json").unlink()
    packed = tmp_path / "docs_selected.jsonl.xz"
    import lzma
    packed.write_bytes(lzma.compress(stream.read_bytes()))
    with pytest.raises(ValueError, match="first 50,000 documents are its validation split"):
        bd.split_documents([packed], 10_000, None, None)
    assert bd.describe_inputs([packed], 50_000, None, None)["files"][0]["declared_val_docs"] == 50_000


def test_the_builder_refuses_to_overwrite_what_it_did_not_write(tmp_path, pair, monkeypatch):
    docs = generate_documents(80, seed=6)
    train, val = docs[10:], docs[:10]

    def build(out: Path, prefix: Path) -> dict:
        return bd.build_dataset(train, val, out, prefix, vocab_size=400, use_caseops=True)

    # A folder of shards without our manifest (downloaded data under another name, say).
    foreign = tmp_path / "foreign"
    write_shard(foreign / "fineweb_val_000000.bin", np.arange(5))
    with pytest.raises(ValueError, match=r"foreign holds shards \(fineweb_val_000000.bin, ...\) but no "
                                         r"dataset_manifest.json"):
        build(foreign, tmp_path / "tok" / "a")
    assert read_shard(foreign / "fineweb_val_000000.bin").tolist() == [0, 1, 2, 3, 4]
    # The downloader's dataset.
    downloaded = tmp_path / "downloaded"
    shutil.copytree(pair["caseops"]["output_dir"], downloaded)
    record = json.loads((downloaded / "dataset_manifest.json").read_text())
    record["written_by"], record["source"] = "data/cached_challenge_fineweb.py", "challenge"
    (downloaded / "dataset_manifest.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="written by data/cached_challenge_fineweb.py, not by this builder"):
        build(downloaded, tmp_path / "tok" / "b")
    # A tokenizer that is not the one our manifest there names.
    theirs = tmp_path / "tok" / "theirs.model"
    theirs.parent.mkdir()
    shutil.copy(pair["caseops"]["tokenizer_model"], theirs)
    with pytest.raises(ValueError, match="theirs.model exists and is not the tokenizer of the dataset"):
        build(tmp_path / "fresh", tmp_path / "tok" / "theirs")
    assert theirs.read_bytes() == Path(pair["caseops"]["tokenizer_model"]).read_bytes()
    # Its own dataset it rebuilds, also after a build that stopped half way.
    ours = tmp_path / "ours"
    build(ours, tmp_path / "tok" / "ours")
    build(ours, tmp_path / "tok" / "ours")
    real_check = bd.check_dataset

    def leaky(*a, **k):
        return real_check(*a, **k) | {"train_docs_in_val": [0]}

    with monkeypatch.context() as patch:
        patch.setattr(bd, "check_dataset", leaky)
        with pytest.raises(ValueError, match="validation documents in the training shards"):
            build(tmp_path / "stopped", tmp_path / "tok" / "stopped")
    result = build(tmp_path / "stopped", tmp_path / "tok" / "stopped")
    assert json.loads(result["manifest"].read_text())["complete"] is True


# ---------------------------------------------------------------------------------------------
# Downloading the public CaseOps variant (no network: a fake repo in the public export's layout)

VARIANT = dl.CASEOPS_VARIANT
REMOTE_DIR = f"datasets/datasets/fineweb10B_{VARIANT}"


class FakeCaseOpsRepo:
    """The public CaseOps export's manifest layout (its dataset entry names val_bytes_glob; its tokenizer
    entry the text transform), serving real shards with LFS hashes."""

    def __init__(self, tmp_path: Path, bodies_override: dict | None = None, sidecar: bool = True):
        import hashlib
        self.sha = lambda b: hashlib.sha256(b).hexdigest()
        entry = {"name": f"fineweb10B_{VARIANT}", "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
                 "stats": {"files_train": 2, "files_val": 2, "tokens_train": 90, "tokens_val": 70, "docs_val": 4}}
        if sidecar:
            entry["val_bytes_glob"] = f"datasets/fineweb10B_{VARIANT}/fineweb_val_bytes_*.bin"
        self.manifest = {"shard_size": 50, "datasets": [entry], "tokenizers": [{
            "name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved", "text_transform": "lossless_caps_caseops_v1",
            "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"}]}
        tokens = {"val_000000": [BOS, 4, 9, 9] * 12 + [BOS, 9], "val_000001": [9] * 20,
                  "train_000000": [BOS, 9] * 25, "train_000001": [BOS, 9] * 20}
        values = {"val_bytes_000000": [0, 0, 4, 2] * 12 + [0, 3], "val_bytes_000001": [1] * 20}
        self.bodies = {f"{REMOTE_DIR}/fineweb_{k}.bin": self.shard(tmp_path, v) for k, v in {**tokens, **values}.items()}
        self.bodies["datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"] = b"model"
        self.bodies.update(bodies_override or {})
        self.requests = []

    @staticmethod
    def shard(tmp_path: Path, values: list[int]) -> bytes:
        path = tmp_path / "one.bin"
        write_shard(path, np.array(values))
        return path.read_bytes()

    def body(self, remote: str) -> bytes:
        return json.dumps(self.manifest).encode() if remote == "datasets/manifest.json" else self.bodies[remote]

    def __call__(self, remote: str, destination: Path) -> str | None:
        self.requests.append(remote)
        destination.write_bytes(self.body(remote))
        return self.sha(self.body(remote)) if remote.endswith((".bin", ".model")) else None

    def hashes(self, remotes: list[str]) -> dict[str, str]:
        return {r: self.sha(self.body(r)) for r in remotes}


def fetch_caseops(tmp_path: Path, repo: FakeCaseOpsRepo) -> dict:
    return dl.download_variant(VARIANT, 1, data_dir=tmp_path / "data", download=repo, log=lambda _: None,
                               remote_hashes=repo.hashes, repo_id=dl.VARIANT_REPOS[VARIANT])


def test_download_the_public_caseops_variant_with_its_sidecar(tmp_path):
    repo = FakeCaseOpsRepo(tmp_path)
    result = fetch_caseops(tmp_path, repo)
    assert repo.requests == ["datasets/manifest.json", f"{REMOTE_DIR}/fineweb_val_000000.bin",
                             f"{REMOTE_DIR}/fineweb_val_000001.bin", f"{REMOTE_DIR}/fineweb_val_bytes_000000.bin",
                             f"{REMOTE_DIR}/fineweb_val_bytes_000001.bin", f"{REMOTE_DIR}/fineweb_train_000000.bin",
                             "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"]
    local = tmp_path / "data" / "datasets" / f"fineweb10B_{VARIANT}"
    record = result["record"]
    assert (record["repo_id"], record["text_transform"]) == ("romeerp/parameter-golf-caseops-v1",
                                                              "lossless_caps_caseops_v1")
    assert record["val_bytes"]["sha256"] == repo.sha(repo.bodies[f"{REMOTE_DIR}/fineweb_val_bytes_000000.bin"]
                                                     + repo.bodies[f"{REMOTE_DIR}/fineweb_val_bytes_000001.bin"])
    assert all(f["size_checked"] and f["hub_sha256_checked"] for f in record["val_bytes"]["files"])
    # The validation split's hash is of the token shards only, never of the sidecar beside them.
    assert record["val"]["sha256"] == repo.sha(repo.bodies[f"{REMOTE_DIR}/fineweb_val_000000.bin"]
                                               + repo.bodies[f"{REMOTE_DIR}/fineweb_val_000001.bin"])
    assert int(load_byte_sidecar(local, BOS).sum()) == 12 * 6 + 3 + 20
    assert json.loads((local / "dataset_manifest.json").read_text()) == record
    # train_gpt.py's `dataset` line agrees: the sidecar is neither hashed as validation tokens (which made
    # the download look `modified`) nor read as them.
    import train_gpt as tg
    tokenizer = tmp_path / "data" / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    info = tg.dataset_provenance(str(local), str(tokenizer))
    assert (info["source"], info["val_sha256"]) == ("challenge", record["val"]["sha256"]), info
    assert len(tg.load_validation_tokens(str(local))) == 70
    # The variant's own repo is the default.
    assert dl.parse_args(["--variant", VARIANT]).repo_id == "romeerp/parameter-golf-caseops-v1"
    assert dl.parse_args(["--variant", "sp1024"]).repo_id == dl.REPO_ID


def test_download_refuses_a_caseops_variant_without_a_fitting_sidecar(tmp_path):
    short = FakeCaseOpsRepo.shard(tmp_path, [1] * 19)
    with pytest.raises(dl.DownloadError, match=r"fineweb_val_bytes_000001\.bin .*1062 bytes but the manifest "
                                               r"implies 1064"):
        fetch_caseops(tmp_path / "a", FakeCaseOpsRepo(tmp_path, {f"{REMOTE_DIR}/fineweb_val_bytes_000001.bin": short}))
    # The right size, but BOS counted: the sidecar is not these shards'.
    wrong = FakeCaseOpsRepo.shard(tmp_path, [5] * 50)
    with pytest.raises(dl.DownloadError, match=r"fineweb_val_bytes_000000\.bin: BOS at position 0"):
        fetch_caseops(tmp_path / "b", FakeCaseOpsRepo(tmp_path, {f"{REMOTE_DIR}/fineweb_val_bytes_000000.bin": wrong}))
    with pytest.raises(ValueError, match="text transform 'lossless_caps_caseops_v1' but the manifest lists no "
                                         "validation byte sidecar"):
        fetch_caseops(tmp_path / "c", FakeCaseOpsRepo(tmp_path, sidecar=False))
