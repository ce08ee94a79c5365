"""A newcomer's first hour: CPU threads chosen and logged, no warm-up where nothing compiles, progress
for long phases, the start-up estimate of the artifact and the fitter that keeps every run under the
cap by default."""

from __future__ import annotations

import io
import re

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, cpu_runtime, run_context, tiny_env


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


@pytest.mark.parametrize("tokens, seq_len, stride, batch, world", [
    (1000, 64, 16, 4, 1), (1000, 64, 16, 4, 3), (65, 64, 16, 2, 2), (30, 64, 16, 3, 1), (1000, 64, 64, 5, 2),
    (4097, 128, 32, 7, 8)])
def test_eval_batch_count_matches_the_batches(tokens, seq_len, stride, batch, world):
    val = torch.arange(tokens) % 50
    for rank in range(world):
        spec = tg.EvalSpec("sliding", seq_len, stride, batch)
        expected = len(list(tg.eval_batches(val, spec, rank, world)))
        assert tg.num_eval_batches(tokens, spec, rank, world) == expected


class Uniform(torch.nn.Module):
    def forward(self, x, y):
        return torch.full(y.shape, 3.0)


def luts_for(vocab: int) -> tg.ByteLUTs:
    return tg.ByteLUTs(torch.ones(vocab, dtype=torch.int32), torch.zeros(vocab, dtype=torch.bool),
                       torch.zeros(vocab, dtype=torch.bool))


def test_evaluation_reports_progress_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.setattr(tg, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(tg.sys.stderr, "isatty", lambda: False)
    val = torch.arange(600) % 50
    spec = tg.EvalSpec("sliding", 32, 8, 4)
    tg.evaluate(Uniform(), val, luts_for(50), spec, cpu_runtime(), phase="sliding_eval")
    lines = capsys.readouterr().out.splitlines()
    total = tg.num_eval_batches(600, spec)
    assert lines[0].startswith(f"progress phase:sliding_eval done:1/{total} unit:batch")
    assert len(lines) == total - 1
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t: None)  # rank 1's share, without a process group
    tg.evaluate(Uniform(), val, luts_for(50), spec, cpu_runtime(1, 2))
    assert capsys.readouterr().out == ""


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


def test_priming_restores_the_initial_state_when_it_runs(tiny_data, monkeypatch):
    env = tiny_env(tiny_data, tiny_data["output_dir"].parent / "unused", WARMUP_STEPS="2")
    h = tg.Hyperparameters.from_env(env)
    rt = tg.setup_runtime(h, env)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    optimizers = tg.build_optimizers(model, h, rt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    trainee, ctx = tg.Trainee(model, model, optimizers), run_context(h, logged.append, rt)
    tg.prime_kernels(trainee, ctx)
    assert logged == ["warmup steps:0 skipped:WARMUP_STEPS=2 reason:nothing compiles (cpu run)"]
    monkeypatch.setattr(tg, "is_compiled", lambda m: True)  # as if compiled: the steps run, then are undone
    tg.prime_kernels(trainee, ctx)
    assert re.fullmatch(r"warmup steps:2 graphs:\S+ time:\d+ms \(weights reset\)", logged[-1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not opt.state for opt in optimizers)


def test_default_run_fits_under_the_cap():
    assert tg.Hyperparameters().quant_target_bytes == tg.ARTIFACT_CAP_BYTES - 1  # the fitter is on by default


def test_the_fitter_brings_a_run_under_its_target_and_logs_the_cost(tiny_data, tmp_path):
    # The tiny model weighs about 220 kB, 171 kB with every tensor at int5: a model budget of 185 kB past the
    # code (which grows as train_gpt.py does) forces demotions that can succeed. Sized without value
    # embeddings and with random bigram rows: a zero table (the default) would still be nearly empty after
    # 3 steps, so the artifact would weigh much less than the start-up estimate, which counts it as trained.
    code = tg.code_form((ROOT / "train_gpt.py").read_text(encoding="utf-8")).bytes_code
    target = code + 185_000
    env = tiny_env(tiny_data, tmp_path, ITERATIONS="3", VAL_LOSS_EVERY="0", QUANT_TARGET_BYTES=str(target),
                   BIGRAM_INIT="zero_proj", VE_LAYERS="none")
    tg.main(env)
    log = (tmp_path / "tiny.txt").read_text()
    estimate = int(re.search(rf"^artifact_estimate bytes_total:(\d+) .*target:{target} basis:initial_weights$", log,
                             re.M)[1])
    assert estimate > target and f"warning: the artifact is likely over QUANT_TARGET_BYTES={target}" in log
    assert re.search(rf"^quant_fit bytes_total:\d+ target:{target} fit_needed:1$", log, re.M)
    assert re.search(r"^quant_fit demote:\S+ bits:\d->\d est_saved_bytes:\d+$", log, re.M)
    cost = re.search(r"^quant_fit cost_est_bpb:([+-]\d+\.\d+) probe_bpb_unfitted:(\d+\.\d+) "
                     r"probe_bpb_fitted:(\d+\.\d+) probe:32_training_seqs probe_bytes:tokenizer$", log, re.M)
    assert cost and float(cost[1]) == pytest.approx(float(cost[3]) - float(cost[2]), abs=2e-6)
    total = int(re.search(r"^artifact .*bytes_total:(\d+)", log, re.M)[1])
    assert total <= target
    # The start-up estimate comes within 10% of what the unfitted artifact weighed.
    unfitted = int(re.search(r"^quant_fit bytes_total:(\d+)", log, re.M)[1])
    assert abs(estimate - unfitted) < 0.1 * unfitted


def test_estimate_counts_levels_scales_and_fp16():
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 128), "g": torch.randn(64), "n": torch.tensor([3], dtype=torch.int64)}
    plan = {"w": 6, "g": tg.FP16_BITS}
    q, _ = tg.quantize_rows_rtn(state["w"], 6)
    expected = tg.entropy_bytes(q) + 2 * 64 + 2 * 64 + 8
    assert tg.estimate_model_bytes(state, plan) == int(expected)
    assert tg.estimate_model_bytes(state, {"w": 8, "g": 16}) > tg.estimate_model_bytes(state, plan)
    # A tensor that starts at zero (the bigram table) is counted as trained values, not as nothing,
    # without drawing from the run's random stream.
    rng = torch.get_rng_state()
    zero = tg.estimate_model_bytes({**state, "w": torch.zeros(64, 128)}, plan)
    assert torch.equal(torch.get_rng_state(), rng)
    assert abs(zero - tg.estimate_model_bytes(state, plan)) < 0.02 * zero
