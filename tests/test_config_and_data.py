"""Hyperparameters from the environment, the shard reader and the distributed loader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import assert_env_error, bare_env, ROOT
from data.shards import write_shard


def test_import_has_no_side_effects(tmp_path):
    # A bare folder with only the script: importing must create no files and start nothing.
    (tmp_path / "train_gpt.py").write_bytes((ROOT / "train_gpt.py").read_bytes())
    code = ("import train_gpt, torch.distributed as d, sys; "
            "sys.exit(1 if d.is_initialized() else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["train_gpt.py"]


def test_defaults_are_the_record_configuration():
    h = tg.Hyperparameters.from_env({})
    assert (h.vocab_size, h.train_seq_len, h.train_batch_tokens) == (1024, 2048, 786_432)
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (11, 512, 8, 4, 3)
    assert (h.max_wallclock_seconds, h.seed, h.eval_seq_len, h.eval_stride) == (600.0, 1337, 2048, 64)
    assert h.data_path == "./data/datasets/fineweb10B_sp1024"
    assert h.tokenizer_path == "./data/tokenizers/fineweb_1024_bpe.model"


def test_env_values_are_parsed():
    h = tg.Hyperparameters.from_env({"NUM_LAYERS": "3", "MATRIX_LR": "0.5", "COMPILE": "0", "RUN_ID": "x"})
    assert (h.num_layers, h.matrix_lr, h.compile, h.run_id) == (3, 0.5, False, "x")


@pytest.mark.parametrize("env, words", [
    ({"NUM_LAYERS": "0"}, ["NUM_LAYERS", "[1, 64]"]),
    ({"NUM_LAYERS": "two"}, ["NUM_LAYERS", "int"]),
    ({"MATRIX_LR": "nan"}, ["MATRIX_LR"]),
    ({"COMPILE": "maybe"}, ["COMPILE", "true or false"]),
    ({"NUM_HEADS": "3"}, ["MODEL_DIM", "NUM_HEADS"]),
    ({"NUM_KV_HEADS": "3"}, ["NUM_HEADS", "NUM_KV_HEADS"]),
    ({"TRAIN_BATCH_TOKENS": "4096"}, ["TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN"]),
    ({"EVAL_STRIDE": "4096"}, ["EVAL_STRIDE", "EVAL_SEQ_LEN"]),
])
def test_bad_env_values_name_the_variable(env, words):
    assert_env_error(env, words)


def test_world_size_must_divide_the_micro_batches():
    assert [tg.grad_accum_steps(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        tg.grad_accum_steps(3)


# ---- shards -------------------------------------------------------------------------------------


def test_shard_roundtrip(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    write_shard(tmp_path / "s.bin", tokens)
    assert np.array_equal(tg.load_data_shard(tmp_path / "s.bin"), tokens)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:500], "shorter than"),
    (lambda b: b[:-2], "header says 100 tokens"),
    (lambda b: (123).to_bytes(4, "little") + b[4:], "bad magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
])
def test_corrupt_shard_names_the_file(tmp_path, damage, message):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        tg.load_data_shard(path)
    assert str(path) in str(err.value)


def test_missing_dataset_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="cached_challenge_fineweb.py"):
        tg.find_shards(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "nope.model"))


def _positional_shards(tmp_path, sizes):
    """Shards whose token values are their global positions, so a batch shows where it came from."""
    files, offset = [], 0
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(files[-1], np.arange(offset, offset + n))
        offset += n
    return files


def test_stream_crosses_shards_and_wraps(tmp_path):
    stream = tg.TokenStream(_positional_shards(tmp_path, [10, 5]))
    assert stream.take(12).tolist() == list(range(12))
    assert stream.take(6).tolist() == [12, 13, 14, 0, 1, 2]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_split_the_same_global_batch(tmp_path, world_size):
    files = _positional_shards(tmp_path, [3000, 2000])
    seq_len, global_tokens = 16, 16 * 16
    single = tg.DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    ranks = [tg.DistributedTokenLoader(files, r, world_size, torch.device("cpu")) for r in range(world_size)]
    for _ in range(3):
        x1, y1 = single.next_batch(global_tokens, seq_len)
        parts = [loader.next_batch(global_tokens, seq_len) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
        # Disjoint: no input position is read by two ranks.
        seen = torch.cat([p[0].flatten() for p in parts])
        assert len(torch.unique(seen)) == len(seen)


def test_bos_id_must_be_the_tokenizers(tiny_data):
    sp = tg.load_tokenizer(str(tiny_data["tokenizer_model"]))
    tg.check_tokenizer(sp, tg.ModelConfig(bos_id=sp.bos_id()), "tok.model")
    with pytest.raises(ValueError, match=f"BOS_ID=2 does not match the tokenizer tok.model, which has BOS id "
                                         f"{sp.bos_id()}: set BOS_ID={sp.bos_id()}"):
        tg.check_tokenizer(sp, tg.ModelConfig(bos_id=2), "tok.model")


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "0"}, "error: NUM_LAYERS='0' is out of range: accepted values are integers in [1, 64]"),
    ({"QAT": "always"}, "error: QAT='always' is invalid: accepted values are off, hard, soft"),
    ({"NUM_LAYER": "2"}, "error: NUM_LAYER is not a setting: did you mean NUM_LAYERS?"),
    ({"TOKENIZER_PATH": "missing.model"}, "error: tokenizer missing.model not found (TOKENIZER_PATH): fetch"),
])
def test_a_bad_setting_or_missing_data_is_one_line_without_a_traceback(tmp_path, env, message):
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, capture_output=True,
                          env={**bare_env(), **env, "OUT_DIR": str(tmp_path)}, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_near_miss_of_a_setting_is_refused_and_other_variables_are_not():
    assert_env_error({"NUM_LAYER": "3"}, ["NUM_LAYER", "NUM_LAYERS"])
    assert_env_error({"MATRX_LR": "0.1"}, ["MATRX_LR", "MATRIX_LR"])
    tg.Hyperparameters.from_env({"PATH": "/bin", "HOME": "/root", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0",
                                 "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "NGRAM_CACHE": "1"})
