"""The Settings section: Hyperparameters from the environment (defaults, parsing, errors that name the
variable, near misses), and a bad setting or missing data ends the command-line run with one line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import assert_env_error, bare_env, ROOT


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


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_say_done_total_and_time_left():
    clock, out = Clock(), io.StringIO()
    progress = tg.Progress("sliding_eval", 4, sink=tg.ProgressSink(30, False, out, clock))
    clock.now += 10
    progress.update()  # 10 s since the start: no line yet
    clock.now += 20
    progress.update()  # 30 s: a line, 2 of 4 done in 30 s, 30 s left
    clock.now += 5
    progress.update()  # 5 s after the last line: none
    clock.now += 40
    progress.update()  # done: the phase's own log line says so, no progress line
    assert out.getvalue().splitlines() == [
        "progress phase:sliding_eval done:2/4 unit:batch percent:50.0 elapsed:30s eta:30s"]


def test_progress_is_silent_when_disabled_and_counts_wrapped_items():
    out = io.StringIO()
    items = list(tg.Progress("x", 3, enabled=False, sink=tg.ProgressSink(0, False, out)).wrap(range(3)))
    assert items == [0, 1, 2] and out.getvalue() == ""
    out = io.StringIO()
    assert list(tg.Progress("x", 3, sink=tg.ProgressSink(0, False, out)).wrap("abc")) == ["a", "b", "c"]
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["done:1/3", "done:2/3"]
