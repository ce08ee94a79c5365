"""Tests for the data/ tools: shard format, dataset builder, downloader, synthetic text.

Everything runs on CPU, offline, in a few seconds, and writes only under pytest's tmp_path.

Run:
    python3 -m pytest -q tests/test_data_tools.py
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import data.build_dataset as bd  # noqa: E402
import data.cached_challenge_fineweb as dl  # noqa: E402
from data.shards import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, write_shard  # noqa: E402
from train_gpt import load_data_shard as read_shard  # noqa: E402  (the reader the runs use)
from data.synthetic_text import generate_documents  # noqa: E402

BOS, EOS = 1, 2
N_TRAIN_DOCS, N_VAL_DOCS = 300, 30
SMALL_VOCAB = 512
SMALL_SHARD_TOKENS = 20_000
# Appears only in validation documents; a tokenizer trained on them would learn pieces for it.
VAL_MARKER = "qjxzvk"
VAL_ONLY_CHAR = "ж"


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def read_split(files: list[Path]) -> np.ndarray:
    return np.concatenate([read_shard(f) for f in files]).astype(np.int64)


def expected_stream(sp: spm.SentencePieceProcessor, texts: list[str]) -> np.ndarray:
    return np.array([tok for ids in sp.encode(texts) for tok in [BOS, *ids]], dtype=np.int64)


def marked(texts: list[str]) -> list[str]:
    return [t + f" {VAL_MARKER} {VAL_ONLY_CHAR * 3}." * 20 for t in texts]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small dataset shared by several tests (building it takes well under a second)."""
    root = tmp_path_factory.mktemp("built")
    docs = generate_documents(N_TRAIN_DOCS + N_VAL_DOCS, seed=5)
    val, train = marked(docs[:N_VAL_DOCS]), docs[N_VAL_DOCS:]
    result = bd.build_dataset(
        train, val, root / "ds", root / "tok" / "small_bpe",
        vocab_size=SMALL_VOCAB, shard_tokens=SMALL_SHARD_TOKENS,
    )
    sp = spm.SentencePieceProcessor(model_file=str(result["tokenizer_model"]))
    return {"result": result, "sp": sp, "train": train, "val": val}


# ---------------------------------------------------------------------------------------------
# Shard format


def test_shard_roundtrip_matches_challenge_format(tmp_path):
    tokens = np.array([0, 1, 2, 300, 1023, 65535, 7], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    assert write_shard(path, tokens) == tokens.size

    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert (header[0], header[1], header[2]) == (20240520, 1, tokens.size)
    assert (SHARD_MAGIC, SHARD_VERSION, HEADER_INTS) == (20240520, 1, 256)
    assert not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 2 * tokens.size
    body = np.fromfile(path, dtype="<u2", offset=256 * 4)
    np.testing.assert_array_equal(body, tokens)
    np.testing.assert_array_equal(read_shard(path), tokens)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("bad", [np.array([-1]), np.array([65536]), np.array([0.5]), np.zeros((2, 2), int)])
def test_write_shard_rejects_tokens_that_do_not_fit(tmp_path, bad):
    path = tmp_path / "x.bin"
    write_shard(path, np.array([5, 6]))
    with pytest.raises(ValueError):
        write_shard(path, bad)
    np.testing.assert_array_equal(read_shard(path), [5, 6])  # the old file is untouched


def test_data_shard_reader_and_constants_are_train_gpts(tmp_path):
    """data/ and train_gpt.py keep their own copies of the shard format and the manifest's name (neither
    imports the other): they must agree."""
    import train_gpt as tg
    from data import shards
    assert (shards.SHARD_MAGIC, shards.SHARD_VERSION, shards.HEADER_INTS, shards.HEADER_BYTES) == (
        tg.SHARD_MAGIC, tg.SHARD_VERSION, tg.SHARD_HEADER_INTS, tg.SHARD_HEADER_BYTES)
    assert shards.DATASET_MANIFEST == tg.DATASET_MANIFEST
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(1000) * 61 % 65536)
    np.testing.assert_array_equal(shards.read_shard(path), tg.load_data_shard(path))
    assert shards.sha256_files([path, path]) == tg.sha256_files([path, path])
    assert shards.find_shards(tmp_path, "val") == [path]
    path.write_bytes(path.read_bytes()[:-2])  # both refuse a shard whose size does not match its header
    with pytest.raises(ValueError, match="header says 1000 tokens"):
        shards.read_shard(path)
    with pytest.raises(ValueError, match="header says 1000 tokens"):
        tg.load_data_shard(path)


def test_find_shards_never_takes_a_byte_sidecar_for_tokens(tmp_path):
    """data/'s find_shards and train_gpt.py's pick the same files: a byte sidecar (fineweb_val_bytes_*.bin,
    which the glob fineweb_val_*.bin also matches) is neither read as tokens nor hashed as validation data."""
    import train_gpt as tg
    from data.shards import find_byte_sidecars, find_shards
    for name in ("fineweb_val_000001.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin",
                 "fineweb_train_000000.bin", "fineweb_val_000000.bin.tmp", "fineweb_val_x.bin"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [Path(p).name for p in tg.find_shards(str(tmp_path), "val")] == ["fineweb_val_000000.bin",
                                                                            "fineweb_val_000001.bin"]
    assert [p.name for p in find_byte_sidecars(tmp_path)] == ["fineweb_val_bytes_000000.bin"]
    with pytest.raises(FileNotFoundError, match="no test shards"):
        find_shards(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="no test shards"):
        tg.find_shards(str(tmp_path), "test")


DATA_TOOLS = ["build_dataset", "cached_challenge_fineweb", "caseops", "check_disjoint", "progress", "shards",
              "synthetic_text", "token_stats"]


def test_data_tools_import_neither_torch_nor_train_gpt():
    """Downloading or building data needs numpy, sentencepiece, tqdm and huggingface_hub, not torch (issue
    22): every data/ module, imported one after the other, leaves both out of sys.modules."""
    assert sorted(p.stem for p in (REPO_ROOT / "data").glob("*.py") if p.stem != "__init__") == DATA_TOOLS
    check = "; ".join(f"import data.{m}; assert not {{'torch', 'train_gpt'}} & set(sys.modules), {m!r}"
                      for m in DATA_TOOLS)
    proc = subprocess.run([sys.executable, "-c", f"import sys; {check}"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("tool", ["build_dataset", "cached_challenge_fineweb", "check_disjoint", "token_stats",
                                  "synthetic_text"])
def test_data_tools_run_where_torch_cannot_be_imported(tool, tmp_path):
    """As a script, from another directory, with a torch that fails to import."""
    blocker = tmp_path / "blocked" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "data" / f"{tool}.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------
# Dataset builder


def test_every_document_is_bos_then_its_tokens(built):
    sp, result = built["sp"], built["result"]
    for split in ("train", "val"):
        stream = read_split(result[f"{split}_files"])
        np.testing.assert_array_equal(stream, expected_stream(sp, built[split]))
        assert np.count_nonzero(stream == BOS) == len(built[split])
        assert not np.any(stream == EOS)
        assert result[f"{split}_tokens"] == stream.size


def test_train_shards_have_the_requested_size_and_names(built):
    result = built["result"]
    files = result["train_files"]
    assert len(files) > 1
    assert [f.name for f in files] == [f"fineweb_train_{i:06d}.bin" for i in range(len(files))]
    assert [f.name for f in result["val_files"]] == [f"fineweb_val_{i:06d}.bin" for i in range(len(result["val_files"]))]
    sizes = [read_shard(f).size for f in files]
    assert all(s == SMALL_SHARD_TOKENS for s in sizes[:-1]) and 0 < sizes[-1] <= SMALL_SHARD_TOKENS


def test_tokenizer_has_challenge_settings(built):
    sp = built["sp"]
    assert sp.vocab_size() == SMALL_VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    for b in range(256):
        assert sp.id_to_piece(4 + b) == f"<0x{b:02X}>" and sp.is_byte(4 + b)
    assert sp.encode("東") == [4 + b for b in "東".encode("utf-8")]  # byte fallback, not <unk>
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert not sp.encode("the cat", out_type=str)[0].startswith("▁")  # add_dummy_prefix=False
    assert sp.decode(sp.encode("ﬁne")) == "fine"  # NFKC normalisation


def test_tokenizer_never_trained_on_validation_docs(built):
    sp = built["sp"]
    assert all(sp.is_byte(i) for i in sp.encode(VAL_ONLY_CHAR))
    marker_pieces = sp.encode(" " + VAL_MARKER, out_type=str)
    assert len(marker_pieces) >= 4, marker_pieces  # 600 occurrences would have been merged


def test_tokenizer_trainer_is_handed_train_text_only(tmp_path, monkeypatch):
    docs = generate_documents(120, seed=9)
    val, train = marked(docs[:20]), docs[20:]
    seen = []
    real_train = bd.train_tokenizer

    def spy(texts, prefix, vocab_size, *rest):
        seen.extend(texts)
        return real_train(texts, prefix, vocab_size, *rest)

    monkeypatch.setattr(bd, "train_tokenizer", spy)
    bd.build_dataset(train, val, tmp_path / "ds", tmp_path / "tok", vocab_size=400, tokenizer_train_chars=30_000)
    assert seen and sum(map(len, seen)) <= 30_000
    assert not any(VAL_MARKER in t or VAL_ONLY_CHAR in t for t in seen)
    assert all(any(t in doc for doc in train) for t in seen)


def test_cli_val_docs_takes_the_first_k_documents(tmp_path):
    docs = generate_documents(200, seed=3)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, prefix = tmp_path / "ds", tmp_path / "tok" / "t_bpe"
    bd.main(["--input", str(src), "--val-docs", "25", "--vocab-size", "400",
             "--output-dir", str(out), "--tokenizer-prefix", str(prefix), "--no-progress"])
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    assert Path(str(prefix) + ".vocab").is_file()
    np.testing.assert_array_equal(read_split([out / "fineweb_val_000000.bin"]), expected_stream(sp, docs[:25]))
    np.testing.assert_array_equal(read_split([out / "fineweb_train_000000.bin"]), expected_stream(sp, docs[25:]))


def test_cli_val_input_is_a_separate_whole_file(tmp_path):
    train_docs, val_docs = generate_documents(150, seed=1), generate_documents(15, seed=2)
    src = write_jsonl(tmp_path / "train.jsonl", train_docs)
    val_src = write_jsonl(tmp_path / "val.jsonl", val_docs)
    train, val = bd.split_documents([src], None, val_src, None)
    assert (train, val) == (train_docs, val_docs)
    train, _ = bd.split_documents([src], None, val_src, max_train_docs=10)
    assert train == train_docs[:10]


def test_several_inputs_are_read_in_order(tmp_path):
    first, second = generate_documents(30, seed=1), generate_documents(20, seed=2)
    paths = [write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)]
    train, val = bd.split_documents(paths, 10, None, None)
    assert val == first[:10] and train == first[10:] + second
    train, _ = bd.split_documents(paths, 10, None, max_train_docs=25)
    assert train == (first[10:] + second)[:25]


def test_xz_input_is_read_like_plain_jsonl(tmp_path):
    docs = generate_documents(20, seed=4) + ["", "naïve café — “quoted” 🙂"]
    plain = write_jsonl(tmp_path / "docs.jsonl", docs)
    packed = tmp_path / "docs.jsonl.xz"
    packed.write_bytes(lzma.compress(plain.read_bytes()))
    assert bd.read_documents(packed) == bd.read_documents(plain) == docs


def test_script_runs_from_the_command_line(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", generate_documents(120, seed=6))
    cmd = [sys.executable, str(REPO_ROOT / "data" / "build_dataset.py"), "--input", str(src),
           "--val-docs", "20", "--vocab-size", "400", "--output-dir", str(tmp_path / "ds"),
           "--tokenizer-prefix", str(tmp_path / "tok" / "t"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train: 100 docs" in proc.stdout and "val:   20 docs" in proc.stdout
    missing = subprocess.run(cmd[:2] + ["--input", str(tmp_path / "nope.jsonl"), "--val-docs", "1"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode != 0 and "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_built_dataset_has_its_own_name_and_a_manifest(tmp_path, monkeypatch):
    import train_gpt as tg

    docs = generate_documents(120, seed=6)
    src = write_jsonl(tmp_path / "my_docs.jsonl", docs)
    monkeypatch.setattr(bd, "DATA_DIR", tmp_path / "data")
    bd.main(["--input", str(src), "--val-docs", "20", "--vocab-size", "400", "--no-progress"])
    out = tmp_path / "data" / "datasets" / "my_docs_sp400"
    tokenizer = tmp_path / "data" / "tokenizers" / "my_docs_400_bpe.model"
    assert tokenizer.is_file() and (out / "fineweb_val_000000.bin").is_file()
    manifest = json.loads((out / tg.DATASET_MANIFEST).read_text())
    assert (manifest["source"], manifest["dataset"]) == ("custom", "my_docs_sp400")
    assert manifest["inputs"]["files"] == [{"name": "my_docs.jsonl", "bytes": src.stat().st_size,
                                            "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}]
    assert (manifest["val"]["docs"], manifest["train"]["docs"]) == (20, 100)
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    val = out / "fineweb_val_000000.bin"
    assert manifest["val"]["files"] == [{"name": val.name, "bytes": val.stat().st_size,
                                         "sha256": hashlib.sha256(val.read_bytes()).hexdigest()}]
    assert manifest["val"]["tokens"] == read_shard(val).size
    info = tg.dataset_provenance(str(out), str(tokenizer))
    assert (info["source"], info["name"], info["val_sha256"]) == ("custom", "my_docs_sp400", manifest["val"]["sha256"])
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    assert tg.dataset_provenance(str(out), str(other))["reason"] == "differs_from_manifest:tokenizer"


@pytest.mark.parametrize("args", [["--name", "fineweb10B"], ["--output-dir", "x/fineweb10B_sp1024"],
                                  ["--tokenizer-prefix", "x/fineweb_1024_bpe"]])
def test_builder_refuses_the_challenges_names(tmp_path, args, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", generate_documents(30, seed=6))
    monkeypatch.setattr(bd, "DATA_DIR", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="names of the challenge's published data"):
        bd.main(["--input", str(src), "--val-docs", "5", *args, "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # refused before writing anything


def test_error_for_missing_input_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        bd.read_documents(tmp_path / "missing.jsonl")


def test_error_for_a_line_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: line is not valid JSON"):
        bd.read_documents(path)


def test_error_for_a_line_without_text(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r'notext\.jsonl:2: .*"text"'):
        bd.read_documents(path)


def test_error_when_vocab_is_too_large_for_the_text(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size 4096 is too large .*at most \d+"):
        bd.build_dataset(generate_documents(5, seed=0), ["val"], tmp_path / "ds", tmp_path / "t", vocab_size=4096)


def test_error_when_val_docs_leave_no_training_docs(tmp_path):
    src = write_jsonl(tmp_path / "few.jsonl", ["a", "b"])
    with pytest.raises(ValueError, match="leaves none for training"):
        bd.split_documents([src], 2, None, None)


def test_synthetic_text_is_learnable_beyond_unigram(built):
    """A bigram model must beat a unigram model by a wide margin on held-out synthetic text."""
    files = built["result"]["train_files"]
    # The validation docs carry the marker, so hold out the last train shard instead.
    train, val = read_split(files[:-1]), read_split(files[-1:])
    smoothing = 0.1
    unigram = np.bincount(train, minlength=SMALL_VOCAB) + smoothing
    unigram_bits = -np.log2(unigram[val] / unigram.sum()).mean()
    bigram = np.full((SMALL_VOCAB, SMALL_VOCAB), smoothing)
    np.add.at(bigram, (train[:-1], train[1:]), 1)
    bigram /= bigram.sum(axis=1, keepdims=True)
    bigram_bits = -np.log2(bigram[val[:-1], val[1:]]).mean()
    assert bigram_bits < unigram_bits - 2.0, (unigram_bits, bigram_bits)


# ---------------------------------------------------------------------------------------------
# Downloader (no network: a fake downloader serves a fake repo)

FAKE_MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 2}},
        {"name": "fineweb10B_sp4096", "tokenizer_name": "sp_bpe_4096", "stats": {"files_train": 5, "files_val": 1}},
    ],
    "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        {"name": "sp_bpe_4096", "model_path": "tokenizers/fineweb_4096_bpe.model",
         "vocab_path": "tokenizers/fineweb_4096_bpe.vocab"},
    ],
}


class FakeRepo:
    """Serves files by remote path and records every request, like hf_hub_download would see. With
    lfs=True it also returns each file's sha256, as the hub's cache names an LFS blob; `bodies`
    overrides what a path serves; `hashes` answers remote_hashes like the hub's API."""

    def __init__(self, manifest: dict = FAKE_MANIFEST, fail_on: str | None = None, lfs: bool = False,
                 bodies: dict | None = None):
        self.manifest, self.fail_on, self.lfs, self.bodies, self.requests = manifest, fail_on, lfs, bodies or {}, []

    def body(self, remote: str) -> bytes:
        if remote == "datasets/manifest.json":
            return json.dumps(self.manifest).encode()
        return self.bodies.get(remote, f"content of {remote}".encode())

    def __call__(self, remote: str, destination: Path) -> str | None:
        self.requests.append(remote)
        if self.fail_on and self.fail_on in remote:
            raise OSError("Connection refused")
        destination.write_bytes(self.body(remote))
        lfs = self.lfs and remote.endswith((".bin", ".model"))
        return hashlib.sha256(self.body(remote)).hexdigest() if lfs else None

    def hashes(self, remotes: list[str]) -> dict[str, str]:
        return {r: hashlib.sha256(self.body(r)).hexdigest() for r in remotes} if self.lfs else {}


def fetch_variant(tmp_path, repo: FakeRepo, train_shards: int, logs=None, variant="sp1024") -> dict:
    return dl.download_variant(variant, train_shards, data_dir=tmp_path, download=repo,
                               log=(logs.append if logs is not None else lambda _: None), remote_hashes=repo.hashes)


def test_download_fetches_manifest_val_train_prefix_and_tokenizer(tmp_path):
    repo, logs = FakeRepo(), []
    result = fetch_variant(tmp_path, repo, 2, logs)
    shard_dir = "datasets/datasets/fineweb10B_sp1024"
    assert repo.requests == [
        "datasets/manifest.json",
        f"{shard_dir}/fineweb_val_000000.bin",
        f"{shard_dir}/fineweb_val_000001.bin",
        f"{shard_dir}/fineweb_train_000000.bin",
        f"{shard_dir}/fineweb_train_000001.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
    ]
    local = tmp_path / "datasets" / "fineweb10B_sp1024"
    assert (local / "fineweb_train_000001.bin").read_text() == f"content of {shard_dir}/fineweb_train_000001.bin"
    assert not (local / "fineweb_train_000002.bin").exists()
    assert (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert (tmp_path / "manifest.json").is_file()
    assert len(result["downloaded"]) == 6 and result["skipped"] == []


def test_download_skips_files_already_present(tmp_path):
    existing = tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    existing.parent.mkdir(parents=True)
    existing.write_text("already here")
    repo, logs = FakeRepo(), []
    result = fetch_variant(tmp_path, repo, 1, logs)
    assert not any(r.endswith("fineweb_val_000000.bin") for r in repo.requests)
    assert existing.read_text() == "already here"
    assert existing in result["skipped"]
    assert any("skip" in line and "fineweb_val_000000.bin" in line for line in logs)

    again = FakeRepo()
    result = fetch_variant(tmp_path, again, 1, logs)
    assert again.requests == [] and result["downloaded"] == []


def test_download_unknown_variant_names_the_offered_variants(tmp_path):
    with pytest.raises(ValueError, match=r"unknown variant 'sp9999'.*sp1024, sp4096"):
        fetch_variant(tmp_path, FakeRepo(), 1, variant="sp9999")


def test_download_too_many_train_shards_says_the_maximum(tmp_path):
    with pytest.raises(ValueError, match=r"only 3 training shards.*maximum for --train-shards is 3"):
        fetch_variant(tmp_path, FakeRepo(), 4)


def test_download_network_failure_names_the_file(tmp_path):
    repo = FakeRepo(fail_on="fineweb_train_000001.bin")
    with pytest.raises(dl.DownloadError, match=r"could not fetch .*fineweb_train_000001\.bin.*Connection refused"):
        fetch_variant(tmp_path, repo, 3)
    assert not (tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()


def test_download_cli_reports_errors_without_traceback(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(FAKE_MANIFEST))
    with pytest.raises(SystemExit, match="maximum for --train-shards is 3"):
        dl.main(["--variant", "sp1024", "--train-shards", "99", "--data-dir", str(tmp_path)])


def test_download_tolerates_a_manifest_keyed_by_name(tmp_path):
    manifest = {
        "datasets": {"fineweb10B_sp1024": {"files_train": 2, "files_val": 1}},
        "tokenizers": {"fineweb_1024_bpe": {"path": "tokenizers/fineweb_1024_bpe.model"}},
    }
    plan = dl.plan_downloads(manifest, "sp1024", 2, tmp_path)
    assert [p.local.name for p in plan] == [
        "fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_1024_bpe.model",
    ]


def shard_bytes(tokens: np.ndarray, tmp_path: Path) -> bytes:
    path = tmp_path / "one_shard.bin"
    write_shard(path, tokens)
    return path.read_bytes()


SIZED_DIR = "datasets/datasets/fineweb10B_sp1024"


def sized_export(tmp_path) -> FakeRepo:
    """A fake export whose manifest gives token counts (shards of 50 tokens: val 50 + 20, train 50 + 50
    + 20), serving real shards of those sizes with LFS hashes."""
    manifest = {"shard_size": 50, "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {
        "files_train": 3, "files_val": 2, "tokens_train": 120, "tokens_val": 70, "docs_val": 7, "docs_train": 9}}],
        "tokenizers": FAKE_MANIFEST["tokenizers"][:1]}
    d = SIZED_DIR
    sizes = {"val_000000": 50, "val_000001": 20, "train_000000": 50, "train_000001": 50, "train_000002": 20}
    bodies = {f"{d}/fineweb_{k}.bin": shard_bytes(np.arange(n) % 7, tmp_path) for k, n in sizes.items()}
    bodies["datasets/tokenizers/fineweb_1024_bpe.model"] = b"a tokenizer model"
    return FakeRepo(manifest, lfs=True, bodies=bodies)


def test_download_checks_sizes_against_the_manifest_and_writes_the_dataset_manifest(tmp_path):
    import train_gpt as tg

    repo, logs = sized_export(tmp_path / "src"), []
    local = tmp_path / "datasets" / "fineweb10B_sp1024"
    local.mkdir(parents=True)
    (local / "fineweb_val_000001.bin").write_bytes(b"x" * 100)  # a leftover of another size: fetched again
    (local / "fineweb_train_000000.bin").write_bytes(repo.body(f"{SIZED_DIR}/fineweb_train_000000.bin"))
    result = fetch_variant(tmp_path, repo, 2, logs)
    assert [p.name for p in result["skipped"]] == ["fineweb_train_000000.bin"]
    assert any(line.startswith("refetch") and "fineweb_val_000001.bin: 100 bytes but the manifest implies 1064" in line
               for line in logs)
    assert (local / "fineweb_val_000001.bin").stat().st_size == 1024 + 2 * 20
    record = json.loads((local / tg.DATASET_MANIFEST).read_text())
    assert (record["source"], record["repo_id"], record["variant"]) == ("challenge", dl.REPO_ID, "sp1024")
    assert record["val"]["sha256"] == hashlib.sha256(
        (local / "fineweb_val_000000.bin").read_bytes() + (local / "fineweb_val_000001.bin").read_bytes()).hexdigest()
    assert all(f["hub_sha256_checked"] and f["size_checked"] for f in record["val"]["files"])
    assert record["tokenizer"] == {"file": "fineweb_1024_bpe.model", "hub_sha256_checked": True,
                                   "sha256": hashlib.sha256(b"a tokenizer model").hexdigest()}
    assert (record["val"]["tokens"], record["val"]["docs"], len(record["train"]["files"])) == (70, 7, 2)
    # What a run then logs: the challenge's data, with the hashes it recomputes...
    tokenizer = tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    info = tg.dataset_provenance(str(local), str(tokenizer))
    assert (info["source"], info["repo"], info["val_sha256"]) == ("challenge", dl.REPO_ID, record["val"]["sha256"])
    # ...and once a file changed, not any more.
    write_shard(local / "fineweb_val_000001.bin", np.arange(20) % 5)
    info = tg.dataset_provenance(str(local), str(tokenizer))
    assert (info["source"], info["reason"]) == ("modified", "differs_from_manifest:val")


def test_download_refuses_a_file_of_the_wrong_size_or_hash(tmp_path):
    repo = sized_export(tmp_path / "src")
    bad = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    repo.bodies[bad] = repo.bodies[bad][:-2]
    with pytest.raises(dl.DownloadError, match=r"fineweb_train_000001.bin .*1122 bytes but the manifest implies 1124"):
        fetch_variant(tmp_path, repo, 2)
    assert not (tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()

    class Corrupting(FakeRepo):  # the bytes arrive damaged: the hub's hash says so
        def __call__(self, remote, destination):
            sha = super().__call__(remote, destination)
            if remote.endswith("val_000000.bin"):
                data = bytearray(destination.read_bytes())
                data[-1] ^= 1
                destination.write_bytes(bytes(data))
            return sha

    good = sized_export(tmp_path / "src")
    repo = Corrupting(good.manifest, lfs=True, bodies=good.bodies)
    with pytest.raises(dl.DownloadError, match=r"fineweb_val_000000.bin .*sha256 differs from the hub's"):
        fetch_variant(tmp_path / "other", repo, 1)


def test_download_checks_present_validation_files_against_the_hub(tmp_path):
    repo = sized_export(tmp_path / "src")
    local = tmp_path / "datasets" / "fineweb10B_sp1024"
    local.mkdir(parents=True)
    # The right size, other tokens: a locally built stand-in for the challenge's validation shard.
    write_shard(local / "fineweb_val_000000.bin", np.arange(50) % 3)
    with pytest.raises(dl.DownloadError, match=r"fineweb_val_000000.bin differs from .* on the hub \(sha256\)"):
        fetch_variant(tmp_path, repo, 1)


def test_downloaded_data_from_the_cli_path_names_its_repo(tmp_path):
    repo = sized_export(tmp_path / "src")
    result = dl.download_variant("sp1024", 1, data_dir=tmp_path, download=repo, log=lambda _: None,
                                 remote_hashes=repo.hashes, repo_id="kevclark/parameter-golf")
    assert result["record"]["repo_id"] == "kevclark/parameter-golf"


# ---------------------------------------------------------------------------------------------
# Synthetic text


def test_synthetic_documents_are_deterministic_per_seed():
    first = generate_documents(12, seed=7)
    assert first == generate_documents(12, seed=7)
    assert first[:5] == generate_documents(5, seed=7)
    other = generate_documents(12, seed=8)
    assert all(a != b for a, b in zip(first, other))


def test_synthetic_documents_look_like_text():
    docs = generate_documents(200, seed=0, min_words=30, max_words=60)
    joined = "\n".join(docs)
    assert all(30 <= len(d.split()) for d in docs)
    assert any(ch.isdigit() for ch in joined) and "." in joined and "," in joined
    assert any(ord(ch) > 127 for ch in joined)
    assert len(set(joined.lower().split())) > 300


def test_synthetic_cli_writes_json_lines(tmp_path):
    out = tmp_path / "syn.jsonl"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "data" / "synthetic_text.py"), "--docs", "7",
                           "--seed", "3", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert bd.read_documents(out) == generate_documents(7, seed=3)
