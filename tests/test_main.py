"""The Main section: the whole pipeline on CPU (train, quantize, compress, reload, sliding-window eval); same
seed same run; one process and two gloo processes give the same losses for the same global batch; the CPU
threads a run chooses and logs; PRESET=april end to end on 1 and 2 processes, PRESET=may end to end with TTT."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, cpu_runtime, run_context, run_in_process, tiny_env

FINAL = re.compile(r"^(final_\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)
TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:(\d+\.\d+)", re.M)
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:(\d+\.\d+) val_bpb:(\d+\.\d+)", re.M)


def torchrun_two(env: dict, cwd) -> str:
    """train_gpt.py under torchrun with 2 gloo processes: the log of the run env names."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py")]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (cwd / f"{env['RUN_ID']}.txt").read_text()


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    env = tiny_env(tiny_data, out)
    return env, run_in_process(env)


def test_pipeline_runs_end_to_end(tiny_run):
    env, log = tiny_run
    finals = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall(log)}
    assert set(finals) == {"final_float_exact", "final_roundtrip_exact", "final_sliding_window_exact"}
    artifact = os.path.join(env["OUT_DIR"], "tiny.ptz")
    assert os.path.getsize(artifact) > 0
    sizes = dict(re.findall(r"(bytes_\w+):(\d+)", log))
    assert int(sizes["bytes_model"]) == os.path.getsize(artifact)
    # bytes_code counts the code as a record folder ships it: the compact wrapper of this source.
    assert int(sizes["bytes_code"]) == len(tg.compact_code((ROOT / "train_gpt.py").read_bytes()))
    assert int(sizes["bytes_source"]) == len((ROOT / "train_gpt.py").read_bytes())
    assert int(sizes["bytes_total"]) == int(sizes["bytes_code"]) + int(sizes["bytes_model"])
    # The run learned something, and int8 costs little.
    vals = VAL.findall(log)
    assert float(vals[-1][2]) < float(vals[0][2]) - 0.5
    assert abs(finals["final_roundtrip_exact"][1] - finals["final_float_exact"][1]) < 0.05


def test_log_is_a_contract(tiny_run):
    env, log = tiny_run
    assert log.startswith("=" * 40 + " source: train_gpt.py")
    assert (ROOT / "train_gpt.py").read_text() in log
    for f in ("num_layers:2", "model_dim:32", "seed:1337", "run_id:tiny", "eval_stride:16"):
        assert f"hparam {f}\n" in log
    assert "attention_backend:sdpa" in log and "compile:off reason:cpu run" in log
    assert re.search(r"^versions python:\S+ torch:\S+", log, re.M)
    assert re.search(r"^step:12/12 train_loss:\S+ lr_mult:\S+ train_time:\d+ms step_avg:\S+ms$", log, re.M)


def test_same_seed_same_run(tiny_data, tmp_path, tiny_run):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="again")
    log = run_in_process(env)
    assert TRAIN.findall(log) == TRAIN.findall(tiny_run[1])
    assert FINAL.findall(log) == FINAL.findall(tiny_run[1])


def test_other_seed_other_run(tiny_data, tmp_path, tiny_run):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="other", SEED="7", ITERATIONS="3", VAL_LOSS_EVERY="0")
    log = run_in_process(env)
    assert TRAIN.findall(log)[:3] != TRAIN.findall(tiny_run[1])[:3]


class DeviceTime:
    """An injected clock in which only training steps take time: STEP_S each, whatever the machine does."""
    STEP_S = 1 / 64  # 15.625 ms: exact in binary, so the budget arithmetic is exact too

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_wallclock_cap_stops_the_run(tiny_data, monkeypatch):
    """MAX_WALLCLOCK_SECONDS=1.5 with a 1 s GPTQ reserve: 500 ms of training. The loop stops at the last
    step that ends inside the budget, timed by its runtime's clock (here an injected one)."""
    env = tiny_env(tiny_data, tiny_data["output_dir"], ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="1.5",
                   GPTQ_RESERVE_SECONDS="1", GPTQ_RESERVE_MEASURE="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="0")
    h = tg.Hyperparameters.from_env(env)
    clock = DeviceTime()
    real_step = tg.train_step

    def timed_step(*args):
        loss = real_step(*args)
        clock.now += DeviceTime.STEP_S
        return loss

    monkeypatch.setattr(tg, "train_step", timed_step)
    rt = dataclasses.replace(cpu_runtime(), clock=clock)
    lines = []
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    trainee = tg.Trainee(model, model, tg.build_optimizers(model, h, rt))
    result = tg.train(trainee, lambda: (0.0, 0.0), run_context(h, lines.append, rt))
    assert "schedule train_budget:500ms gptq_reserve:1000ms" in lines[0]  # the reserve is not training time
    # The vote after step 31 (484.4 ms) sees that two more steps would end past 500 ms; it is read one step
    # late, after step 32, which ends exactly at the budget: the run stops there.
    assert "stopping_early: wallclock_cap train_time:500ms step:32/100000" in lines
    assert result.steps == 32 and result.train_ms == 500.0


def test_the_run_stops_before_a_step_would_cross_the_budget():
    schedule = tg.Schedule(tg.Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": "11", "GPTQ_RESERVE_SECONDS": "10"}))
    assert schedule.budget_ms == 1000.0
    assert not schedule.next_step_overruns(900.0, 9)  # next step ends at 1000: within the budget
    assert schedule.next_step_overruns(901.0, 9)
    assert schedule.next_step_overruns(950.0, 1)  # a first step of 950 ms: a second would not fit
    assert not tg.Schedule(tg.Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": "0"})).next_step_overruns(1e9, 1)


def test_two_gloo_processes_match_one(tiny_data, tmp_path, tiny_run):
    log = torchrun_two(tiny_env(tiny_data, tmp_path, RUN_ID="ddp"), tmp_path)
    assert "runtime world_size:2 grad_accum_steps:4" in log
    one, two = TRAIN.findall(tiny_run[1]), TRAIN.findall(log)
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert abs(float(a) - float(b)) <= 2e-4  # printed with 4 decimals
    for (name, la, ba), (_, lb, bb) in zip(FINAL.findall(tiny_run[1]), FINAL.findall(log)):
        assert abs(float(la) - float(lb)) < 1e-4 and abs(float(ba) - float(bb)) < 1e-4, name


@pytest.mark.parametrize("env, cores, load, procs, expected", [
    ({"CPU_THREADS": "3"}, 2, 5.0, 1, (3, "CPU_THREADS")),
    ({"OMP_NUM_THREADS": "2"}, 2, 5.0, 1, (2, "OMP_NUM_THREADS")),
    ({}, 2, 0.2, 1, (2, "auto(cores=2,load_1min=0.20,processes=1)")),
    ({}, 2, 1.4, 1, (1, "auto(cores=2,load_1min=1.40,processes=1)")),  # one core busy: one thread
    ({}, 2, 7.0, 1, (1, "auto(cores=2,load_1min=7.00,processes=1)")),
    ({}, 8, 0.0, 2, (4, "auto(cores=8,load_1min=0.00,processes=2)")),  # shared among this machine's ranks
    ({"OMP_NUM_THREADS": ""}, 4, 1.0, 1, (3, "auto(cores=4,load_1min=1.00,processes=1)")),
])
def test_cpu_threads_follow_the_setting_or_the_idle_cores(monkeypatch, env, cores, load, procs, expected):
    monkeypatch.setattr(tg.os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    monkeypatch.setattr(tg.os, "getloadavg", lambda: (load, load, load))
    h = tg.Hyperparameters.from_env(env)
    assert tg.choose_cpu_threads(h, env, procs) == expected


def test_setup_runtime_sets_the_threads_it_logs():
    before = torch.get_num_threads()
    try:
        rt = tg.setup_runtime(tg.Hyperparameters(cpu_threads=1), {"CPU_THREADS": "1"})
        assert torch.get_num_threads() == 1 and rt.threads_from == "CPU_THREADS"
    finally:
        torch.set_num_threads(before)


def april_tiny_env(data, out, **overrides):
    """PRESET=april (or another preset on top of it) at the tiny test size: the sizes and data come from
    tiny_env (explicit, so they win), the layer ids of the parts shrink with the depth."""
    overrides.setdefault("PRESET", "april")
    return tiny_env(data, out, NUM_LAYERS="4", PARALLEL_START_LAYER="3", MINI_RECUR_FIRST="1",
                    MINI_RECUR_LAST="2", GATE_WINDOW="8", VAL_LOSS_EVERY="0", EVAL_STRIDE="32", **overrides)


@pytest.fixture(scope="module")
def april_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("april")
    env = april_tiny_env(tiny_data, out, RUN_ID="april")
    tg.main(env)
    return env, (out / "april.txt").read_text()


def test_april_preset_runs_end_to_end_and_logs_every_value(april_run):
    env, log = april_run
    assert {m[0] for m in FINAL.findall(log)} == {"final_float_exact", "final_roundtrip_exact",
                                                  "final_sliding_window_exact"}
    assert "hparam preset:april\n" in log and "hparam mlp_activation:leaky_relu2\n" in log
    assert "hparam mlp_mult:2\n" in log and "hparam num_layers:4\n" in log  # set explicitly: they win
    assert "hparam parallel_start_layer:3\n" in log and "hparam smear_gate_form:input\n" in log
    preset = re.search(r"^preset name:april set:(\S+) overridden:(\S+)$", log, re.M)
    assert "MLP_ACTIVATION=leaky_relu2" in preset[1] and "MLP_MULT" not in preset[1]
    assert {"VOCAB_SIZE", "MLP_MULT", "PARALLEL_START_LAYER", "DATA_PATH"} <= set(preset[2].split(","))
    assert re.findall(r"^mini_recurrence:(\w+) step:(\d+)", log, re.M) == [("off", "0"), ("on", "5")]  # 0.35 x 12
    assert re.search(r"^model params:\d+ unique_blocks:4 passes:8 plan:0,1,2,1,2,1,2,3 .* parallel_passes:7 "
                     r"doc_masked_attention:\w+$",
                     log, re.M)


def test_april_preset_on_two_gloo_processes_matches_one(tiny_data, tmp_path, april_run):
    log = torchrun_two(april_tiny_env(tiny_data, tmp_path, RUN_ID="april_ddp"), tmp_path)
    assert "runtime world_size:2" in log and "preset name:april" in log
    one, two = TRAIN.findall(april_run[1]), TRAIN.findall(log)
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert abs(float(a) - float(b)) <= 2e-4
    for (name, la, ba), (_, lb, bb) in zip(FINAL.findall(april_run[1]), FINAL.findall(log)):
        assert abs(float(la) - float(lb)) < 1e-4 and abs(float(ba) - float(bb)) < 1e-4, name


def test_may_preset_runs_end_to_end_with_one_global_ttt_phase(tiny_data, tmp_path):
    env = april_tiny_env(tiny_data, tmp_path, PRESET="may", RUN_ID="may", ITERATIONS="6", TTT="1",
                         TTT_EVAL_SEQ_LEN="64", TTT_CHUNK_SIZE="16", TTT_LORA_RANK="4", TTT_BATCH_SIZE="8",
                         PHASED_TTT_PREFIX_DOCS="12", GLOBAL_TTT_CHUNK_TOKENS="512")  # TTT at 2,560: minutes here
    tg.main(env)
    log = (tmp_path / "may.txt").read_text()
    assert [m[0] for m in FINAL.findall(log)] == ["final_float_exact", "final_roundtrip_exact",
                                                  "final_sliding_window_exact", "final_ttt_exact",
                                                  "final_ttt_ngram_exact"]
    for line in ("hparam preset:may", "hparam phased_ttt_num_phases:1", "hparam asym_logit:True",
                 "hparam ttt_lora_targets:q,v,o,mlp,head", "hparam ngram_tilt:token", "hparam ttt_weight_decay:2.0",
                 "hparam matrix_lr:0.028", "hparam lqer_group:32", "hparam gptq_calib_seqs:64"):
        assert line + "\n" in log
    preset = re.search(r"^preset name:may set:(\S+) overridden:(\S+)$", log, re.M)
    assert "PHASED_TTT_NUM_PHASES=1" in preset[1] and {"GPTQ_CALIB_SEQS", "TTT_EVAL_SEQ_LEN"} <= set(preset[2].split(","))
    assert len(re.findall(r"^ttt_phase .* global_sgd_tokens:", log, re.M)) == 1  # one global phase
    assert re.search(r"^lqer tensors:\d+ rank:4 a_bits:2 b_bits:4 group:32 ", log, re.M)
