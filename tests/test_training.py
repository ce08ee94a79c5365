"""The Training section. Step speed without changing the math: the compiled training graph is whole (no
graph break, one recompile when QAT switches on, none back), every graph state is primed before the clock,
a training step and an evaluation ask the host for nothing (no .item(), no data-dependent shapes), and the
stop vote is read one step late. The schedule (docs/recipe.md): LR and warmdown with the GPTQ reserve, the
progressive training context, EMA / SWA, QAT (also under torch.compile), and the recipe in a run.
(Muon's stacks against the one-matrix reference: test_optimizer.py; interrupts and resume: test_resume.py.)

Run:
    python3 -m pytest -q tests/test_training.py
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re

import pytest
import torch
import torch._dynamo.testing
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg
from conftest import assert_env_error, cpu_runtime, env_settings, run_context, run_in_process, tiny_env, tiny_model
from test_main import april_tiny_env


# ---- graphs ---------------------------------------------------------------------------------------


class RandomLoader:
    def __init__(self, vocab: int, seqs: int, seq_len: int):
        self.gen = torch.Generator().manual_seed(0)
        self.shape, self.vocab = (seqs, seq_len), vocab

    def next_batch(self, global_tokens, seq_len):
        x = torch.randint(0, self.vocab, self.shape, generator=self.gen)
        return x, torch.roll(x, -1, dims=1)


def runtime(grad_accum: int = 2) -> tg.Runtime:
    return tg.Runtime(0, 1, torch.device("cpu"), grad_accum, contextlib.nullcontext, torch.float32)


def test_training_step_compiles_whole_and_recompiles_once_for_qat():
    """fullgraph=True, as build_model compiles on CUDA: a graph break would raise. The model compiles
    once per QAT state, Newton-Schulz once per stack shape, and neither again."""
    torch._dynamo.reset()
    h = tg.Hyperparameters(qat="hard", train_seq_len=16, train_batch_tokens=16 * 8)
    model = tiny_model().train()
    tg.configure_qat(model, h.qat)
    model_graphs = torch._dynamo.testing.CompileCounter()
    ns_graphs = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=model_graphs, dynamic=False, fullgraph=True)
    orthogonalize = torch.compile(tg.newton_schulz5, backend=ns_graphs, dynamic=False, fullgraph=True)
    optimizers = tg.build_optimizers(model, h, cpu_runtime(), orthogonalize)
    loader, rt = RandomLoader(64, 4, 16), runtime()
    layers = [m for m in model.modules() if isinstance(m, tg.CastedLinear)]
    for qat_on in (False, False, True, True, False, True):
        tg.set_qat(layers, qat_on)
        loss = tg.train_step(compiled, optimizers, loader, h, rt)
        assert torch.isfinite(loss)
    assert model_graphs.frame_count == 2
    assert ns_graphs.frame_count == len(optimizers[1].stacks)


def test_every_graph_state_is_primed_before_the_timed_run():
    states = tg.graph_states
    assert states(tg.Hyperparameters(qat="off")) == [(False, True)]
    assert states(tg.Hyperparameters(qat="hard")) == [(False, True), (True, True)]
    mini = tg.Hyperparameters(qat="soft", mini_recur_repeats=1, mini_recur_start_frac=0.3)
    assert states(mini) == [(False, False), (False, True), (True, False), (True, True)]


# ---- host syncs -----------------------------------------------------------------------------------

# Ops whose result the host must read (an .item(), a bool(), a data-dependent output size): each one
# is a device sync on CUDA.
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_training_step_never_reads_the_device():
    h = tg.Hyperparameters(qat="hard", train_seq_len=16, train_batch_tokens=16 * 8)
    model = tiny_model().train()
    tg.configure_qat(model, h.qat)
    optimizers = tg.build_optimizers(model, h, cpu_runtime())
    loader, rt = RandomLoader(64, 4, 16), runtime()
    tg.set_step_hparams(optimizers, 0.5, 0.95)
    tg.train_step(model, optimizers, loader, h, rt)  # the first step creates the optimizer state
    with HostReads() as reads:
        tg.train_step(model, optimizers, loader, h, rt)
        tg.set_qat([m for m in model.modules() if isinstance(m, tg.CastedLinear)], True)
        tg.train_step(model, optimizers, loader, h, rt)
    assert reads.ops == []


def test_an_evaluation_reads_the_device_once_at_the_end():
    model = tiny_model()
    val = torch.randint(0, 64, (200,), dtype=torch.int32)
    ones = torch.ones(64, dtype=torch.int32)
    luts = tg.ByteLUTs(ones, ones == 0, ones == 0)
    spec = tg.EvalSpec("sliding", 32, 8, 3)
    with HostReads() as reads:
        sums = tg.score_windows(model, tg.bpb_sums(luts), val, spec, runtime())
    assert reads.ops == [] and sums.shape == (3,)
    with HostReads() as reads:
        tg.evaluate(model, val, luts, spec, runtime())
    assert reads.ops == [], reads.ops  # .tolist() of the sums: one copy, no per-element reads
    sidecar = tg.SidecarBytes(torch.randint(0, 5, (200,), dtype=torch.int32), 1)  # the bytes of a CaseOps dataset
    with HostReads() as reads:
        tg.evaluate(model, val, sidecar, spec, runtime())
    assert reads.ops == [], reads.ops


def test_the_stop_vote_is_read_one_step_late_and_agreed():
    vote = tg.StopVote(runtime())
    votes = [(False, False), (True, False), (False, True), (False, False), (False, False)]
    assert [vote(*v) for v in votes] == [(False, False), (False, False), (True, False), (False, True), (False, False)]
    schedule = tg.Schedule(tg.Hyperparameters(max_wallclock_seconds=1.5, gptq_reserve_seconds=0.5))
    assert schedule.budget_ms == 1000.0
    assert schedule.next_step_overruns(801.0, 8, lookahead=2)  # two more steps would end past 1000
    assert not schedule.next_step_overruns(799.0, 8, lookahead=2)


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


# ---- schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frac, floor", [(0.5, 0.0), (0.3, 0.1)])
def test_lr_multiplier_at_its_boundaries(frac, floor):
    knee = 1.0 - frac
    assert tg.lr_multiplier(0.0, frac, floor) == 1.0
    assert tg.lr_multiplier(knee, frac, floor) == 1.0
    assert tg.lr_multiplier(knee + 1e-6, frac, floor) < 1.0
    assert tg.lr_multiplier(knee + frac / 2, frac, floor) == pytest.approx((1.0 + floor) / 2)
    assert tg.lr_multiplier(1.0, frac, floor) == pytest.approx(floor)
    assert tg.lr_multiplier(1.5, frac, floor) == pytest.approx(floor)  # past the budget: stays at the floor
    assert tg.lr_multiplier(0.99, 0.0, floor) == 1.0  # no warmdown


def test_budget_excludes_the_gptq_reserve():
    schedule = tg.Schedule(env_settings(max_wallclock_seconds=600, gptq_reserve_seconds=10, warmdown_frac=0.5))
    assert schedule.budget_ms == 590_000
    assert schedule.progress(0, 295_000) == pytest.approx(0.5)
    assert schedule.at(0, 295_000).lr_mult == 1.0 and schedule.at(0, 590_000).lr_mult == 0.0
    uncapped = tg.Schedule(env_settings(max_wallclock_seconds=0, iterations=200))
    assert uncapped.budget_ms == 0 and uncapped.progress(50, 1e9) == 0.25


@pytest.mark.parametrize("wallclock", [0, 3600])
def test_a_step_limited_run_warms_down_whatever_the_cap(wallclock):
    # ITERATIONS ends this run long before the cap would: the warmdown must follow the steps, not the
    # clock (under the cap alone, the last step would still run at LR multiplier 1.0).
    schedule = tg.Schedule(env_settings(iterations=100, max_wallclock_seconds=wallclock, warmdown_frac=0.5))
    assert schedule.at(50, 1_000).lr_mult == 1.0
    assert schedule.at(75, 2_000).lr_mult == pytest.approx(0.5)
    assert schedule.at(99, 3_000).lr_mult == pytest.approx(0.02)
    # And the clock when it ends the run first: 2 s of a 4 s budget after only 10 of 1000 steps.
    timed = tg.Schedule(env_settings(iterations=1000, max_wallclock_seconds=5, gptq_reserve_seconds=1, warmdown_frac=0.5))
    assert timed.at(10, 3_000).lr_mult == pytest.approx(0.5)


def test_the_schedule_is_logged_whole():
    line = tg.Schedule(env_settings()).describe()
    for key in ("train_budget:590000ms", "iterations:20000", "warmdown_frac:0.5", "momentum_warmup_steps:1500",
                "qat:hard", "ema_decay:0.997", "swa_every:50", "mini_recur_start_frac:0.0"):
        assert key in line


@pytest.mark.parametrize("env, words", [
    ({"MAX_WALLCLOCK_SECONDS": "10"}, ["GPTQ_RESERVE_SECONDS", "MAX_WALLCLOCK_SECONDS"]),
    ({"WARMDOWN_FLOOR": "0.2"}, ["QAT=hard", "WARMDOWN_FLOOR", "QAT_LR_THRESHOLD"]),
    ({"WARMDOWN_FRAC": "0", "QAT": "soft"}, ["QAT=soft", "WARMDOWN_FRAC"]),
    ({"FINAL_WEIGHTS": "best"}, ["FINAL_WEIGHTS", "ema, swa, raw"]),
])
def test_contradictory_recipe_settings_are_errors(env, words):
    assert_env_error(env, words)


# ---- progressive training context (TRAIN_SEQ_SCHEDULE) ------------------------------------------

PUBLIC_SEQ = dict(train_seq_schedule="1024@0.1,2048@0.7,3072@1.0", train_seq_len=3072)


def test_the_sequence_length_follows_the_progress_and_the_lr_re_ramps_after_each_switch():
    h = env_settings(**PUBLIC_SEQ, seq_change_warmup_steps=4, iterations=100, max_wallclock_seconds=0, warmdown_frac=0.2,
                qat="hard", qat_lr_threshold=0.3)
    schedule = tg.Schedule(h)
    steps = [schedule.at(step, 0.0) for step in range(100)]
    lengths = [s.seq_len for s in steps]
    # The first stage whose end is at or past the progress: step 10 is progress 0.1 exactly, still 1024.
    assert lengths[:11] == [1024] * 11 and lengths[11:71] == [2048] * 60 and lengths[71:] == [3072] * 29
    assert [i for i, s in enumerate(steps) if s.seq_start] == [0, 11, 71]
    base = [tg.lr_multiplier(s.progress, 0.2) for s in steps]
    ramp = {11: 0.25, 12: 0.5, 13: 0.75, 71: 0.25, 72: 0.5, 73: 0.75}  # (k + 1) / 4, never at step 0
    for i, s in enumerate(steps):
        assert s.lr_mult == pytest.approx(base[i] * ramp.get(i, 1.0)), i
    # The re-ramp takes the LR under QAT_LR_THRESHOLD at step 11, but QAT follows the warmdown alone.
    assert not steps[11].qat_on and schedule.qat_start == next(i for i, b in enumerate(base) if b < 0.3)


def test_a_resumed_schedule_continues_the_re_ramp():
    h = env_settings(**PUBLIC_SEQ, seq_change_warmup_steps=8, iterations=100, max_wallclock_seconds=0)
    whole, first = tg.Schedule(h), tg.Schedule(h)
    expected = [whole.at(step, 0.0) for step in range(100)]
    for step in range(13):  # stopped 2 steps into the ramp that starts at step 11
        first.at(step, 0.0)
    resumed = tg.Schedule(h)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert [resumed.at(step, 0.0) for step in range(13, 100)] == expected[13:]


def test_a_wallclock_run_switches_by_its_training_time():
    schedule = tg.Schedule(env_settings(**PUBLIC_SEQ, iterations=10**6, max_wallclock_seconds=110,
                                   gptq_reserve_seconds=10))
    assert [schedule.at(step, ms).seq_len for step, ms in enumerate([0, 10_000, 10_001, 70_000, 70_001])] == [
        1024, 1024, 2048, 2048, 3072]


def test_the_schedule_is_logged_with_the_rest():
    assert "train_seq:2048@1 seq_change_warmup_steps:0" in tg.Schedule(env_settings()).describe()
    line = tg.Schedule(env_settings(**PUBLIC_SEQ, seq_change_warmup_steps=32)).describe()
    assert line.endswith(" train_seq:1024@0.1,2048@0.7,3072@1 seq_change_warmup_steps:32")


@pytest.mark.parametrize("env, words", [
    ({"TRAIN_SEQ_SCHEDULE": "4096@0.5,2048@1.0"}, ["TRAIN_SEQ_LEN=2048", "TRAIN_SEQ_SCHEDULE", "(4096)"]),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,3072@1.0"}, ["TRAIN_SEQ_LEN=2048", "longest", "(3072)"]),
    ({"TRAIN_SEQ_SCHEDULE": "1000@0.5,2048@1.0"}, ["TRAIN_BATCH_TOKENS=786432", "TRAIN_SEQ_SCHEDULE", "256000"]),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.7,2048@0.5"}, ["TRAIN_SEQ_SCHEDULE", "rise"]),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048@0.9"}, ["TRAIN_SEQ_SCHEDULE", "last must be 1.0"]),
    ({"TRAIN_SEQ_SCHEDULE": "1024:0.5,2048@1"}, ["TRAIN_SEQ_SCHEDULE", "'1024:0.5'", "length@end"]),
    ({"SEQ_CHANGE_WARMUP_STEPS": "32"}, ["SEQ_CHANGE_WARMUP_STEPS=32", "TRAIN_SEQ_SCHEDULE"]),
])
def test_bad_sequence_schedules_name_the_variables(env, words):
    assert_env_error(env, words)


def test_public_schedule_is_valid_at_the_public_batch():
    h = env_settings(**PUBLIC_SEQ, seq_change_warmup_steps=32)  # 786,432 / 8 = 98,304 = 16 x 6144
    assert h.seq_stages() == ((1024, 0.1), (2048, 0.7), (3072, 1.0)) and h.train_block_len() == 6144
    assert env_settings().train_block_len() == 2048 and env_settings().seq_stages() == ((2048, 1.0),)


def test_the_warm_up_covers_each_length_with_the_loop_states_it_meets():
    h = env_settings(**PUBLIC_SEQ, mini_recur_repeats=2, mini_recur_start_frac=0.35, qat="off")
    assert tg.train_shapes(h) == [(1024, False), (2048, False), (2048, True), (3072, True)]
    assert [tg.graph_name(h, g) for g in tg.warmup_graphs(h)] == [
        "seq1024_qat0_repeats0", "seq2048_qat0_repeats0", "seq2048_qat0_repeats1", "seq3072_qat0_repeats1"]
    assert len(tg.warmup_graphs(dataclasses.replace(h, qat="hard"))) == 8  # QAT with every shape
    assert tg.train_shapes(dataclasses.replace(h, mini_recur_repeats=0)) == [(1024, True), (2048, True), (3072, True)]
    plain = env_settings(qat="hard")  # no schedule: the graphs (and their names) of before
    assert [tg.graph_name(plain, g) for g in tg.warmup_graphs(plain)] == ["qat0_repeats1", "qat1_repeats1"]


def test_a_scheduled_run_logs_each_switch_and_trains_on_each_length(tiny_data, tmp_path, one_thread):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="seq", TRAIN_SEQ_SCHEDULE="16@0.25,32@0.5,64@1.0",
                   SEQ_CHANGE_WARMUP_STEPS="2", VAL_LOSS_EVERY="0", EVAL_STRIDE="64")
    seen = []
    real = tg.CoprimeLoader.next_batch

    def watched(self, global_tokens, seq_len):
        x, y = real(self, global_tokens, seq_len)
        seen.append(tuple(x.shape))
        return x, y
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg.CoprimeLoader, "next_batch", watched)
        log = run_in_process(env)
    assert seen == [(64, 16)] * 4 + [(32, 32)] * 3 + [(16, 64)] * 5  # 1,024 tokens each step
    assert re.findall(r"^train_seq_len:(\d+) step:(\d+) progress:\S+ lr_ramp_steps:(\d+)$", log, re.M) == [
        ("16", "0", "0"), ("32", "4", "2"), ("64", "7", "2")]
    lr = {int(s): float(m) for s, m in re.findall(r"^step:(\d+)/12 train_loss:\S+ lr_mult:(\S+)", log, re.M)}
    assert lr[5] == pytest.approx(0.5) and lr[6] == pytest.approx(1.0) and lr[8] == pytest.approx(0.5 * 5 / 6, abs=1e-4)
    assert "train_seq:16@0.25,32@0.5,64@1 seq_change_warmup_steps:2" in log
    assert re.search(r"^final_roundtrip_exact val_loss:\d", log, re.M)


# ---- EMA and SWA --------------------------------------------------------------------------------


def averaged_after(kind: str, weights: list[float], lr_mults: list[float], **env):
    """A 1-weight model that takes the given weights after steps 0, 1, ..., each at the given LR multiplier
    (the Schedule's other settings as it decides them)."""
    model = nn.Linear(1, 1, bias=False)
    h = env_settings(final_weights=kind, **env)
    schedule, average = tg.Schedule(h), tg.WeightAverage(model, h)
    for step, (w, m) in enumerate(zip(weights, lr_mults)):
        model.weight.data.fill_(w)
        settings = dataclasses.replace(schedule.at(step, 0.0), lr_mult=m)
        settings = dataclasses.replace(settings, swa_take=kind == "swa" and m < 1 and (step + 1) % h.swa_every == 0)
        average.update(settings)
    return model, average


def test_ema_is_the_bias_corrected_exponential_average_of_the_decays_used():
    weights = [3.0, -1.0, 2.0, 5.0, 4.0, 1.0, 0.0, 2.5, 7.0, 3.0, 2.0, 6.0]
    model, average = averaged_after("ema", weights, [1.0] * len(weights), ema_decay=0.6)
    assert average.load_into_model()
    ema, zero = 0.0, 1.0
    for t, w in enumerate(weights):
        d = min(0.6, (1 + t) / (tg.EMA_WARMUP_STEPS + t))  # 0.1, 0.18, ... then 0.6 from t = 14 on
        ema, zero = d * ema + (1 - d) * w, zero * d
    assert model.weight.item() == pytest.approx(ema / (1 - zero), rel=1e-6)


def test_a_short_run_average_follows_the_late_weights():
    # 40 steps moving the weight from 0 to 1 at the record's decay: a fixed 0.997 EMA would be about the
    # plain mean of all 40 (0.5), far from the trained weights; the warm-up ramp keeps it near the end.
    weights = [t / 39 for t in range(40)]
    model, average = averaged_after("ema", weights, [1.0] * 40, ema_decay=0.997)
    average.load_into_model()
    assert model.weight.item() > 0.85


def test_swa_averages_the_checkpoints_of_the_warmdown():
    weights = [float(i) for i in range(1, 11)]
    mults = [1.0] * 4 + [0.8, 0.6, 0.5, 0.4, 0.2, 0.1]  # warmdown from the 5th step on
    model, average = averaged_after("swa", weights, mults, swa_every=3)
    assert average.count == 2 and average.load_into_model()
    assert model.weight.item() == pytest.approx((6.0 + 9.0) / 2)  # steps 6 and 9; step 3 was before it


def test_the_schedule_takes_swa_checkpoints_in_the_warmdown_only():
    schedule = tg.Schedule(env_settings(final_weights="swa", swa_every=3, iterations=12, max_wallclock_seconds=0,
                                   warmdown_frac=0.5))
    takes = [t + 1 for t in range(12) if schedule.at(t, 0.0).swa_take]
    assert takes == [9, 12]  # multiples of 3 once the multiplier is under 1 (from step 7 of 12)


def test_nothing_collected_falls_back_to_raw_and_says_so():
    model, average = averaged_after("swa", [1.0, 2.0], [1.0, 1.0], swa_every=1)
    logged = []
    assert tg.select_final_weights(average, env_settings(final_weights="swa"), logged.append) == "raw"
    assert model.weight.item() == 2.0 and any("final_weights fallback:raw" in m for m in logged)
    _, raw = averaged_after("raw", [1.0, 2.0], [0.5, 0.5])
    assert raw.count == 0 and raw.sums == []  # raw collects nothing


# ---- QAT ----------------------------------------------------------------------------------------


def test_fake_quant_int6_lands_on_the_row_grid_with_a_straight_through_gradient():
    torch.manual_seed(0)
    w = (torch.randn(8, 40) * torch.linspace(0.01, 2, 8)[:, None]).requires_grad_()
    q = tg.fake_quant(w, 31)
    scale = w.detach().abs().amax(dim=1, keepdim=True) / 31
    steps = q.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 31 + 1e-4
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()
    assert (steps.round().abs() == 31).any(dim=1).all()  # each row's largest weight is on the end point
    upstream = torch.randn_like(w)
    (q * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_soft_round_approaches_hard_rounding_as_alpha_grows():
    torch.manual_seed(0)
    w = torch.randn(4, 256)
    hard = tg.fake_quant(w, 31)
    scale = w.abs().amax(dim=1, keepdim=True) / 31
    # Mean distance to hard rounding, in grid steps: about 2 ln 2 / alpha for evenly spread weights.
    gaps = [((tg.fake_quant(w, 31, torch.tensor(a)) - hard).abs() / scale).mean().item()
            for a in (1.0, 16.0, 200.0)]
    assert gaps[0] > 0.3 and gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.02
    w.requires_grad_()
    tg.fake_quant(w, 31, torch.tensor(16.0)).sum().backward()
    assert w.grad.std() > 0  # a real, non-constant gradient, unlike the straight-through one


def qat_on(model: nn.Module, mode: str, plan: dict | None = None) -> tg.QATSwitch:
    tg.configure_qat(model, mode, plan)
    return tg.QATSwitch(model, lambda msg: None)


def switched_on(step: int = 0) -> tg.StepSettings:
    return tg.StepSettings(progress=0.9, lr_mult=0.1, momentum=0.99, qat_on=True, qat_alpha=1.0, repeats_on=True,
                           ema_decay=0.997, swa_take=False)


def test_qat_runs_every_quantized_matrix_through_the_grid():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 12))
    qat = qat_on(model, "hard")
    qat.apply(0, switched_on())
    with torch.no_grad():
        out = model.logits(x)
        snapped = copy.deepcopy(model)
        tg.configure_qat(snapped, "off")
        for m in snapped.modules():
            if isinstance(m, tg.CastedLinear):
                m.weight.copy_(tg.fake_quant(m.weight, 31))
        assert len(qat.layers) >= 6 * len(model.blocks)
        assert torch.allclose(out, snapped.logits(x), atol=1e-5)
        qat.switch_off()
        assert (model.logits(x) - out).abs().max() > 1e-4  # 10x the tolerance above: the grid mattered


def test_eager_forward_skips_the_fake_quantization_while_qat_is_off(monkeypatch):
    calls = []
    real = tg.fake_quant
    monkeypatch.setattr(tg, "fake_quant", lambda *a: calls.append(1) or real(*a))
    model = tiny_model()
    qat = qat_on(model, "hard")
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        model(x, y)
        assert not calls  # off: not even computed
        qat.apply(5, switched_on())
        model(x, y)
        assert len(calls) == len(qat.layers)
        with qat.paused():
            model(x, y)
        assert len(calls) == len(qat.layers)


def test_qat_switches_on_inside_a_compiled_model_with_one_recompile_and_costs_nothing_while_off(one_thread):
    # A backend that keeps dynamo's graphs and runs them eagerly: dynamo's capture and guards, where a
    # Python flag is frozen or guarded, without inductor's C++ code generation.
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fake_quant_ops(gm) -> int:
        return sum(node.target in ("round", "amax") for node in gm.graph.nodes)

    model = tiny_model()
    qat = qat_on(model, "hard")
    counter = torch._dynamo.testing.CompileCounterWithBackend(keep)
    compiled = torch.compile(model, backend=counter, dynamic=False, fullgraph=True)
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = compiled(x, y)
        qat.apply(5, switched_on())
        after = compiled(x, y)
        eager = model(x, y)
        with qat.paused():
            paused = compiled(x, y)
        again = compiled(x, y)
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, eager, atol=1e-5) and torch.allclose(paused, before, atol=1e-6)
    assert torch.equal(again, after)
    assert counter.frame_count == 2  # one recompile at the switch; switching back reuses the first graph
    assert fake_quant_ops(graphs[0]) == 0  # QAT off: no fake-quant work in the graph
    assert fake_quant_ops(graphs[1]) >= 2 * len(qat.layers)  # on: every matrix's row max and rounding


def test_qat_schedule_switches_once_under_the_threshold_and_ramps_alpha():
    # Step-limited: 200 steps, warmdown over the last half: the multiplier is 0.15 at step 185, 0.14 at 186.
    h = env_settings(qat="soft", qat_lr_threshold=0.145, qat_soft_ramp_steps=100, iterations=200, max_wallclock_seconds=0)
    model = tiny_model(layers=1)
    logged = []
    tg.configure_qat(model, "soft")
    schedule, qat = tg.Schedule(h), tg.QATSwitch(model, logged.append)
    for step in range(186):
        qat.apply(step, schedule.at(step, 0.0))
    assert qat.state == (False, 1.0) and not logged
    qat.apply(186, schedule.at(186, 0.0))
    assert logged == [f"qat_on step:186 lr_mult:0.1400 mode:soft matrices:{len(qat.layers)}"]
    for step, alpha in ((186, 1.0), (236, 8.5), (286, 16.0), (400, 16.0)):
        s = schedule.at(step, 0.0)
        assert s.qat_on and s.qat_alpha == pytest.approx(alpha)  # on for good, whatever the multiplier does
    qat.apply(236, schedule.at(236, 0.0))
    assert all(m.qat_active and m.qat_alpha.item() == pytest.approx(8.5) for m in qat.layers)


def test_qat_trains_each_weight_on_the_grid_of_its_planned_bits():
    # QUANT_BITS=5 (or a QUANT_PLAN rule) must move QAT to the int5 grid, and a weight the plan keeps in
    # fp16 gets no fake quantization at all.
    model = tiny_model(layers=1)
    plan = {name: 5 for name in model.state_dict()}
    plan["blocks.0.mlp.fc.weight"] = tg.FP16_BITS
    qat = qat_on(model, "hard", plan)
    qat.apply(0, switched_on())
    fc, c_q = model.blocks[0].mlp.fc, model.blocks[0].attn.c_q
    assert fc not in qat.layers and fc.qat_mode == "off" and c_q.qat_qmax == tg.qmax(5) == 15
    torch.manual_seed(0)
    x = torch.randn(3, c_q.in_features)
    with torch.no_grad():
        c_q.weight.normal_()
        assert torch.allclose(c_q(x), x @ tg.fake_quant(c_q.weight, 15).T, atol=1e-5)
        assert not torch.allclose(c_q(x), x @ tg.fake_quant(c_q.weight, 31).T, atol=1e-3)


# ---- the recipe in a run ------------------------------------------------------------------------


def test_run_switches_qat_on_and_reports_raw_and_swa_weights(tiny_data, tmp_path, one_thread):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="recipe", FINAL_WEIGHTS="swa", SWA_EVERY="2",
                   QAT_LR_THRESHOLD="0.5", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="0", EVAL_STRIDE="64")
    log = run_in_process(env)
    # 12 steps, warmdown over the last half: the multiplier is (12 - s) / 6 before step s + 1.
    assert re.search(r"^qat_on step:10 lr_mult:0\.3333 mode:hard matrices:\d+$", log, re.M)
    assert "final_weights source:swa collected:3\n" in log  # after steps 8, 10 and 12
    raw = re.search(r"^raw_float_exact val_loss:(\S+) val_bpb:(\d+\.\d{8}) steps:12 ", log, re.M)
    final = re.search(r"^final_float_exact val_loss:(\S+) val_bpb:(\d+\.\d{8}) weights:swa$", log, re.M)
    assert raw and final and raw[2] != final[2]
    for group in ("adamw group:tied_embed", "muon group:layer0", "muon group:layer1"):
        assert f"optimizer {group} " in log
    assert math.isfinite(float(final[2]))


def test_april_loop_graphs_are_both_compiled_in_warm_up(tiny_data, tmp_path):
    """The loop switches on at 35% of training: warm-up traces the model with and without the repeats
    (torch.compile keeps one graph per plan), so the switch in the timed run compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env(april_tiny_env(tiny_data, tmp_path, WARMUP_STEPS="2"))
    base = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    counter = CompileCounter()  # traces with dynamo, runs eagerly: checks the guards, not codegen
    compiled = torch.compile(base, backend=counter, dynamic=False, fullgraph=True)
    rt = cpu_runtime()
    optimizers = tg.build_optimizers(base, h, rt)
    logs = []
    tg.prime_kernels(tg.Trainee(compiled, base, optimizers), run_context(h, logs.append, rt))
    assert counter.frame_count == 2 and "graphs:qat0_repeats0,qat0_repeats1 " in logs[0]
    schedule, loader = tg.Schedule(h, h.gptq_reserve_seconds), tg.make_train_loader(h, rt)
    states = []
    for step in range(h.iterations):
        states.append(schedule.at(step, 0.0).repeats_on)
        base.set_mini_recurrence(states[-1])
        assert torch.isfinite(tg.train_step(compiled, optimizers, loader, h, rt))
    assert states[0] is False and states[-1] is True  # the run crossed the switch
    assert counter.frame_count == 2  # and compiled nothing more


def test_every_sequence_length_is_compiled_in_warm_up(tiny_data, tmp_path):
    """TRAIN_SEQ_SCHEDULE with the loop: the warm-up traces each (length, loop) pair the run meets (dynamic=False:
    one graph per shape), so neither a length switch nor the loop switch compiles in the timed run."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env(april_tiny_env(tiny_data, tmp_path, WARMUP_STEPS="4",
                                                   TRAIN_SEQ_SCHEDULE="16@0.2,32@0.5,64@1.0", SEQ_CHANGE_WARMUP_STEPS="2"))
    base = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    counter = CompileCounter()
    compiled = torch.compile(base, backend=counter, dynamic=False, fullgraph=True)
    rt = cpu_runtime()
    optimizers = tg.build_optimizers(base, h, rt)
    logs = []
    tg.prime_kernels(tg.Trainee(compiled, base, optimizers), run_context(h, logs.append, rt))
    assert counter.frame_count == 4
    assert torch._dynamo.config.recompile_limit >= 8 + 2  # room for the two graphs the schedule adds
    assert logs[-1].startswith("warmup steps:4 graphs:seq16_qat0_repeats0,seq32_qat0_repeats0,"
                               "seq32_qat0_repeats1,seq64_qat0_repeats1 ")
    schedule, loader = tg.Schedule(h, h.gptq_reserve_seconds), tg.make_train_loader(h, rt)
    met = []
    for step in range(h.iterations):
        s = schedule.at(step, 0.0)
        base.set_mini_recurrence(s.repeats_on)
        met.append((s.seq_len, s.repeats_on))
        assert torch.isfinite(tg.train_step(compiled, optimizers, loader, h, rt, s.seq_len))
    assert list(dict.fromkeys(met)) == tg.train_shapes(h)  # the run met every primed pair
    assert counter.frame_count == 4  # and compiled nothing more
