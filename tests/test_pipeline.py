"""The whole pipeline on CPU: train, quantize, compress, reload, sliding-window eval; same seed same
run; one process and two gloo processes give the same losses for the same global batch."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, cpu_runtime, run_context, tiny_env

FINAL = re.compile(r"^(final_\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)
TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:(\d+\.\d+)", re.M)
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:(\d+\.\d+) val_bpb:(\d+\.\d+)", re.M)


def run_in_process(env: dict) -> str:
    tg.main(env)
    return open(os.path.join(env["OUT_DIR"], f"{env['RUN_ID']}.txt"), encoding="utf-8").read()


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
    env = tiny_env(tiny_data, tmp_path, RUN_ID="ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "ddp.txt").read_text()
    assert "runtime world_size:2 grad_accum_steps:4" in log
    one, two = TRAIN.findall(tiny_run[1]), TRAIN.findall(log)
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert abs(float(a) - float(b)) <= 2e-4  # printed with 4 decimals
    for (name, la, ba), (_, lb, bb) in zip(FINAL.findall(tiny_run[1]), FINAL.findall(log)):
        assert abs(float(la) - float(lb)) < 1e-4 and abs(float(ba) - float(bb)) < 1e-4, name
