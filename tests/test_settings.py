"""The Settings section: Hyperparameters from the environment (defaults, parsing, errors that name the
variable, near misses), and a bad setting or missing data ends the command-line run with one line. The
presets: PRESET=seed is the defaults, PRESET=april the record's values under the explicit ones (on the CaseOps
variant), PRESET=may April plus the May leaderboard's best run."""

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


@pytest.mark.parametrize("env, words", [
    ({"PARALLEL_START_LAYER": "11"}, ["PARALLEL_START_LAYER=11", "NUM_LAYERS=11"]),
    ({"PARALLEL_START_LAYER": "5", "MINI_RECUR_REPEATS": "1", "MINI_RECUR_FIRST": "4", "MINI_RECUR_LAST": "5"},
     ["MINI_RECUR_FIRST=4", "PARALLEL_START_LAYER=5"]),
    ({"SMEAR_GATE": "0", "SMEAR_GATE_FORM": "input"}, ["SMEAR_GATE_FORM=input", "SMEAR_GATE=1"]),
    ({"PRESET": "april", "SMEAR_GATE": "0"}, ["SMEAR_GATE_FORM=input", "SMEAR_GATE=1"]),
    ({"ATTN_OUT_GATE": "1", "GATE_WINDOW": "600"}, ["GATE_WINDOW=600", "MODEL_DIM=512"]),
    ({"PRESET": "june"}, ["PRESET", "seed, april, may"]),
    ({"PRESET": "april", "NUM_LAYERS": "6"}, ["PARALLEL_START_LAYER=8", "NUM_LAYERS=6"]),
])
def test_bad_settings_name_the_variables(env, words):
    assert_env_error(env, words)


def test_seed_preset_is_the_defaults():
    assert tg.Hyperparameters.from_env({}) == tg.Hyperparameters.from_env({"PRESET": "seed"})
    assert tg.PRESETS["seed"] == {}


def test_april_preset_sets_its_values_and_explicit_settings_win():
    h = tg.Hyperparameters.from_env({"PRESET": "april", "MATRIX_LR": "0.03", "SEED": "7"})
    assert (h.vocab_size, h.mlp_mult, h.parallel_start_layer, h.mini_recur_start_frac) == (8192, 4, 8, 0.35)
    assert (h.muon_momentum, h.muon_weight_decay, h.beta2, h.ema_decay, h.min_lr, h.warmdown_floor) == (
        0.97, 0.095, 0.99, 0.9965, 0.1, 0.0)
    assert (h.muon_ns_coeffs, h.muon_row_normalize) == ("polar_express", True)
    assert (h.matrix_lr, h.matrix_lr_late, h.seed) == (0.03, 0.026, 7)
    # Every variable of the preset is a setting, parses and lands in the config.
    fields = {f.name.upper(): f for f in tg.dataclasses.fields(tg.Hyperparameters)}
    april = tg.Hyperparameters.from_env({"PRESET": "april"})
    for key, raw in tg.PRESETS["april"].items():
        f = fields[key]
        assert getattr(april, f.name) == tg._parse_env_value(key, raw, f.default, f.metadata), key


def test_april_trains_on_the_caseops_variant_and_the_plain_sp8192_is_one_variable_away(tmp_path):
    """PRESET=april's data is where `data/cached_challenge_fineweb.py --variant <v>` puts variant v (its own plan
    of the files, on a manifest of the public layout); DATA_VARIANT=sp8192 is the plain sp8192; an explicit
    DATA_PATH or TOKENIZER_PATH wins over either."""
    from pathlib import Path

    import data.cached_challenge_fineweb as dl
    for env, variant in (({"PRESET": "april"}, dl.CASEOPS_VARIANT), ({"PRESET": "april", "DATA_VARIANT": "sp8192"},
                                                                     "sp8192"), ({"DATA_VARIANT": "sp1024"}, "sp1024")):
        manifest = {"datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "tok", "val_bytes_glob": "x",
                                  "stats": {"files_train": 1, "files_val": 1}}],
                    "tokenizers": [{"name": "tok", "model_path": f"tokenizers/fineweb_{variant[2:6]}_bpe"
                                    f"{variant[6:]}.model"}]}
        if variant == dl.CASEOPS_VARIANT:  # the public manifest's own names (tests/test_caseops.py's fake hub)
            assert manifest["tokenizers"][0]["model_path"] == \
                "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
        plan = dl.plan_downloads(manifest, variant, 1, Path("data"))
        h = tg.Hyperparameters.from_env(env)
        assert (h.data_variant, Path(h.data_path), Path(h.tokenizer_path)) == (
            variant, plan[0].local.parent, next(i.local for i in plan if i.role == "tokenizer"))
    assert tg.Hyperparameters.from_env({"DATA_VARIANT": "sp1024"}).data_path == tg.Hyperparameters().data_path
    h = tg.Hyperparameters.from_env({"PRESET": "april", "DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"})
    assert (h.data_path, h.tokenizer_path) == ("/d", "/t.model")
    assert_env_error({"DATA_VARIANT": "fineweb"}, ["DATA_VARIANT='fineweb'", "sp<vocab>"])


def test_describe_preset_names_what_it_set_and_what_was_overridden():
    line = tg.describe_preset("april", {"MATRIX_LR": "0.03"})
    assert line.startswith("preset name:april set:VOCAB_SIZE=8192,")
    assert "MATRIX_LR=" not in line.split(" overridden:")[0] and line.endswith(" overridden:MATRIX_LR")
    assert tg.describe_preset("seed", {}) == "preset name:seed set:none overridden:none"


MAY_OVER_APRIL = {"EVAL_SEQ_LEN": "2560", "TTT_EVAL_SEQ_LEN": "2560", "PHASED_TTT_NUM_PHASES": "1",
                  "TTT_LORA_LR": "8e-5", "TTT_WEIGHT_DECAY": "2.0", "MATRIX_LR": "0.028", "MATRIX_LR_LATE": "0.028",
                  "LQER_GROUP": "32", "GPTQ_CALIB_SEQS": "1536", "ASYM_LOGIT": "1", "TTT_LORA_TARGETS": "q,v,o,mlp,head",
                  "TTT_LORA_ALPHA": "144", "NGRAM_TILT": "token"}


def test_may_preset_is_april_plus_the_best_may_run_and_explicit_settings_win():
    assert tg.PRESETS["may"] == {**tg.PRESETS["april"], **MAY_OVER_APRIL}
    h = tg.Hyperparameters.from_env({"PRESET": "may", "LQER_GROUP": "64"})
    assert (h.eval_seq_len, h.ttt_eval_seq_len, h.phased_ttt_num_phases, h.phased_ttt_prefix_docs) == (2560, 2560, 1, 2500)
    assert (h.ttt_lora_lr, h.ttt_weight_decay, h.matrix_lr, h.matrix_lr_late, h.gptq_calib_seqs) == (
        8e-5, 2.0, 0.028, 0.028, 1536)
    assert h.lqer_group == 64 and h.vocab_size == 8192 and h.parallel_start_layer == 8  # explicit wins; April under it
    # The parts each public May run added beside #2135 stay off (the CPU ablation decides): docs/may.md.
    assert (h.awq_groups, h.train_seq_schedule) == (0, "")
    fields = {f.name.upper(): f for f in tg.dataclasses.fields(tg.Hyperparameters)}
    may = tg.Hyperparameters.from_env({"PRESET": "may"})
    for key, raw in tg.PRESETS["may"].items():
        f = fields[key]
        assert getattr(may, f.name) == tg._parse_env_value(key, raw, f.default, f.metadata), key
