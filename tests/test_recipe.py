"""The optimization recipe (docs/recipe.md): split LR after orthogonalization, Muon weight decay and
momentum warmup, Adam groups by role, the wallclock warmdown with the GPTQ reserve, EMA / SWA, QAT
(also under torch.compile) and the coprime-stride loader."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from torch import nn

import train_gpt as tg
from conftest import cpu_runtime, assert_env_error, tiny_env
from test_config_and_data import _positional_shards
from test_model_eval import tiny_model
from test_pipeline import run_in_process


def hparams(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({k.upper(): str(v) for k, v in env.items()})


@pytest.fixture
def one_thread():
    """What OMP_NUM_THREADS=1 in tiny_env does for a subprocess: on a loaded machine two threads
    fighting for cores make a tiny in-process run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    schedule = tg.Schedule(hparams(max_wallclock_seconds=600, gptq_reserve_seconds=10, warmdown_frac=0.5))
    assert schedule.budget_ms == 590_000
    assert schedule.progress(0, 295_000) == pytest.approx(0.5)
    assert schedule.at(0, 295_000).lr_mult == 1.0 and schedule.at(0, 590_000).lr_mult == 0.0
    uncapped = tg.Schedule(hparams(max_wallclock_seconds=0, iterations=200))
    assert uncapped.budget_ms == 0 and uncapped.progress(50, 1e9) == 0.25


@pytest.mark.parametrize("wallclock", [0, 3600])
def test_a_step_limited_run_warms_down_whatever_the_cap(wallclock):
    # ITERATIONS ends this run long before the cap would: the warmdown must follow the steps, not the
    # clock (under the cap alone, the last step would still run at LR multiplier 1.0).
    schedule = tg.Schedule(hparams(iterations=100, max_wallclock_seconds=wallclock, warmdown_frac=0.5))
    assert schedule.at(50, 1_000).lr_mult == 1.0
    assert schedule.at(75, 2_000).lr_mult == pytest.approx(0.5)
    assert schedule.at(99, 3_000).lr_mult == pytest.approx(0.02)
    # And the clock when it ends the run first: 2 s of a 4 s budget after only 10 of 1000 steps.
    timed = tg.Schedule(hparams(iterations=1000, max_wallclock_seconds=5, gptq_reserve_seconds=1, warmdown_frac=0.5))
    assert timed.at(10, 3_000).lr_mult == pytest.approx(0.5)


def test_the_schedule_is_logged_whole():
    line = tg.Schedule(hparams()).describe()
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
    h = hparams(**PUBLIC_SEQ, seq_change_warmup_steps=4, iterations=100, max_wallclock_seconds=0, warmdown_frac=0.2,
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
    h = hparams(**PUBLIC_SEQ, seq_change_warmup_steps=8, iterations=100, max_wallclock_seconds=0)
    whole, first = tg.Schedule(h), tg.Schedule(h)
    expected = [whole.at(step, 0.0) for step in range(100)]
    for step in range(13):  # stopped 2 steps into the ramp that starts at step 11
        first.at(step, 0.0)
    resumed = tg.Schedule(h)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert [resumed.at(step, 0.0) for step in range(13, 100)] == expected[13:]


def test_a_wallclock_run_switches_by_its_training_time():
    schedule = tg.Schedule(hparams(**PUBLIC_SEQ, iterations=10**6, max_wallclock_seconds=110,
                                   gptq_reserve_seconds=10))
    assert [schedule.at(step, ms).seq_len for step, ms in enumerate([0, 10_000, 10_001, 70_000, 70_001])] == [
        1024, 1024, 2048, 2048, 3072]


def test_the_schedule_is_logged_with_the_rest():
    assert "train_seq:2048@1 seq_change_warmup_steps:0" in tg.Schedule(hparams()).describe()
    line = tg.Schedule(hparams(**PUBLIC_SEQ, seq_change_warmup_steps=32)).describe()
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
    h = hparams(**PUBLIC_SEQ, seq_change_warmup_steps=32)  # 786,432 / 8 = 98,304 = 16 x 6144
    assert h.seq_stages() == ((1024, 0.1), (2048, 0.7), (3072, 1.0)) and h.train_block_len() == 6144
    assert hparams().train_block_len() == 2048 and hparams().seq_stages() == ((2048, 1.0),)


def test_the_warm_up_covers_each_length_with_the_loop_states_it_meets():
    h = hparams(**PUBLIC_SEQ, mini_recur_repeats=2, mini_recur_start_frac=0.35, qat="off")
    assert tg.train_shapes(h) == [(1024, False), (2048, False), (2048, True), (3072, True)]
    assert [tg.graph_name(h, g) for g in tg.warmup_graphs(h)] == [
        "seq1024_qat0_repeats0", "seq2048_qat0_repeats0", "seq2048_qat0_repeats1", "seq3072_qat0_repeats1"]
    assert len(tg.warmup_graphs(dataclasses.replace(h, qat="hard"))) == 8  # QAT with every shape
    assert tg.train_shapes(dataclasses.replace(h, mini_recur_repeats=0)) == [(1024, True), (2048, True), (3072, True)]
    plain = hparams(qat="hard")  # no schedule: the graphs (and their names) of before
    assert [tg.graph_name(plain, g) for g in tg.warmup_graphs(plain)] == ["qat0_repeats1", "qat1_repeats1"]


def test_coprime_loader_cuts_each_block_into_rows_of_the_steps_length(tmp_path):
    files = _positional_shards(tmp_path, [1000, 1601, 300])
    cpu = torch.device("cpu")
    full, cut = (tg.CoprimeLoader(files, 0, 1, cpu, 32, seed=5) for _ in range(2))
    for _ in range(3):
        x32, y32 = full.next_batch(32 * 16, 32)
        x16, y16 = cut.next_batch(32 * 16, 16)
        assert x16.shape == (32, 16)
        # The same blocks in the same order, each cut into two consecutive rows: the tokens of the step, and
        # every input's target, do not depend on the length.
        assert torch.equal(x16.reshape(16, 32), x32) and torch.equal(y16.reshape(16, 32), y32)
    ranks = [tg.CoprimeLoader(files, r, 2, cpu, 32, seed=5) for r in range(2)]
    single = tg.CoprimeLoader(files, 0, 1, cpu, 32, seed=5)
    x, _ = single.next_batch(32 * 16, 8)
    assert torch.equal(torch.cat([loader.next_batch(32 * 16, 8)[0] for loader in ranks]), x)
    with pytest.raises(ValueError, match="rows of 24"):
        single.next_batch(32 * 16, 24)


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


# ---- Muon ---------------------------------------------------------------------------------------


def muon_step(model: tg.GPT, grads: dict, h: tg.Hyperparameters, lr_scale: dict | None = None) -> dict:
    """Weight change of every Muon matrix after one step with the given grads (layer -> LR factor)."""
    muon = tg.build_optimizers(model, h, cpu_runtime())[1]
    for group in muon.param_groups:
        group["base_lr"] *= (lr_scale or {}).get(group["name"], 1.0)
    tg.set_step_hparams([muon], 1.0, tg.muon_momentum_at(0, h))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
    muon.step()
    matrices = {id(p) for p in model.matrix_params()}
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if id(p) in matrices}


def test_halving_a_layers_lr_halves_its_update_but_scaling_its_gradient_does_not():
    h = hparams()
    model = tiny_model(layers=2)
    torch.manual_seed(1)
    matrices = {id(p) for p in model.matrix_params()}  # block matrices and any outside (bigram projection)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters() if id(p) in matrices}
    ref = muon_step(copy.deepcopy(model), grads, h)
    halved = muon_step(copy.deepcopy(model), grads, h, {"layer1": 0.5})
    layer1_scaled = {n: g * (0.1 if n.startswith("blocks.1.") else 1) for n, g in grads.items()}
    scaled = muon_step(copy.deepcopy(model), layer1_scaled, h)
    for name, delta in ref.items():
        assert delta.abs().max() > 0
        factor = 0.5 if name.startswith("blocks.1.") else 1.0
        assert torch.allclose(halved[name], factor * delta, rtol=1e-4, atol=1e-7), name
        # Orthogonalization ate the scale; atol is float32 rounding of weight - weight (ulp(0.5) = 6e-8).
        assert torch.allclose(scaled[name], delta, rtol=1e-4, atol=1e-7), name


def test_default_split_lr_is_per_layer():
    model = tiny_model(layers=7)
    muon = tg.build_optimizers(model, hparams(), cpu_runtime())[1]
    lrs = {g["name"]: g["lr"] for g in muon.param_groups}
    # The bigram projection is the one Muon matrix outside the blocks: group "other" at MATRIX_LR.
    assert lrs == {**{f"layer{i}": 0.025 if i < 5 else 0.030 for i in range(7)}, "other": 0.025}
    grouped = [p for g in muon.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(model.matrix_params())
    for i, block in enumerate(model.blocks):
        group = next(g for g in muon.param_groups if g["name"] == f"layer{i}")
        linears = {id(m.weight) for m in block.modules() if isinstance(m, tg.CastedLinear)}
        assert {id(p) for p in group["params"]} == linears


def test_muon_weight_decay_is_decoupled():
    torch.manual_seed(0)
    w0, grad = torch.randn(16, 24), torch.randn(16, 24)
    out = []
    for wd in (0.0, 0.5):
        p = nn.Parameter(w0.clone())
        p.grad = grad.clone()
        tg.Muon([p], tg.Hyperparameters(matrix_lr=0.1, muon_momentum=0.9, muon_weight_decay=wd), cpu_runtime()).step()
        out.append(p.detach())
    # W <- W (1 - lr wd) - lr U: the decay is the only difference, and it does not go through Newton-Schulz.
    assert torch.allclose(out[1], out[0] - 0.1 * 0.5 * w0, atol=1e-6)


def test_momentum_warms_up_then_holds():
    h = hparams()
    assert [tg.muon_momentum_at(s, h) for s in (0, 750, 1500, 6000)] == pytest.approx([0.92, 0.955, 0.99, 0.99])
    assert tg.muon_momentum_at(0, hparams(muon_momentum_warmup_steps=0)) == 0.99
    adam, muon = tg.build_optimizers(tiny_model(), h, cpu_runtime())
    tg.set_step_hparams([adam, muon], 0.5, 0.95)
    assert all(g["momentum"] == 0.95 and g["lr"] == g["base_lr"] * 0.5 for g in muon.param_groups)
    assert all("momentum" not in g and g["lr"] == g["base_lr"] * 0.5 for g in adam.param_groups)


# ---- Adam groups --------------------------------------------------------------------------------


def test_adam_groups_follow_parameter_roles():
    model = tiny_model()  # the record model: a bigram table with projection and scale, and gates
    h = hparams(embed_lr=0.02, gate_lr=0.01, embed_weight_decay=0.01)  # scalars: the default decay, 0.04
    adam, muon = tg.build_optimizers(model, h, cpu_runtime())
    groups = {g["name"]: g for g in adam.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert members["tied_embed"] == ["tok_emb.weight"]
    assert members["embed"] == ["bigram.table.weight", "value_embed.table.weight"]
    assert members["gate"] == ["skip_gates", "smear.gate"]
    for name in ("bigram.scale", "blocks.0.attn.q_gain", "value_embed.scale", "ve_layer_scales"):
        assert name in members["scalar"]
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "tied_embed": (0.035, 0.01), "embed": (0.02, 0.01), "gate": (0.01, 0.04), "scalar": (0.025, 0.04)}
    every = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    tables = model.bigram.table.weight.numel() + model.value_embed.table.weight.numel()
    assert any(line.startswith(f"optimizer adamw group:embed tensors:2 params:{tables} lr:0.02 weight_decay:0.01")
               for line in tg.describe_optimizers([adam, muon]))


def test_embedding_projections_move_to_adam_with_the_scalar_decay():
    model = tiny_model()
    h = hparams(embed_proj_optimizer="adam", scalar_weight_decay=0.02)
    adam, muon = tg.build_optimizers(model, h, cpu_runtime())
    groups = {g["name"]: g for g in adam.param_groups}
    projections = {id(model.bigram.proj.weight), id(model.value_embed.proj.weight)}
    assert {id(p) for p in groups["embed_proj"]["params"]} == projections
    assert not projections & {id(p) for g in muon.param_groups for p in g["params"]}
    assert "other" not in {g["name"] for g in muon.param_groups}  # no Muon matrix is left outside the blocks
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "tied_embed": (0.035, 0.04), "embed": (0.035, 0.04), "embed_proj": (0.025, 0.02), "gate": (0.025, 0.02),
        "scalar": (0.025, 0.02)}
    every = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())


# ---- EMA and SWA --------------------------------------------------------------------------------


def averaged_after(kind: str, weights: list[float], lr_mults: list[float], **env):
    """A 1-weight model that takes the given weights after steps 0, 1, ..., each at the given LR multiplier
    (the Schedule's other settings as it decides them)."""
    model = nn.Linear(1, 1, bias=False)
    h = hparams(final_weights=kind, **env)
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
    schedule = tg.Schedule(hparams(final_weights="swa", swa_every=3, iterations=12, max_wallclock_seconds=0,
                                   warmdown_frac=0.5))
    takes = [t + 1 for t in range(12) if schedule.at(t, 0.0).swa_take]
    assert takes == [9, 12]  # multiples of 3 once the multiplier is under 1 (from step 7 of 12)


def test_nothing_collected_falls_back_to_raw_and_says_so():
    model, average = averaged_after("swa", [1.0, 2.0], [1.0, 1.0], swa_every=1)
    logged = []
    assert tg.select_final_weights(average, hparams(final_weights="swa"), logged.append) == "raw"
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
    h = hparams(qat="soft", qat_lr_threshold=0.145, qat_soft_ramp_steps=100, iterations=200, max_wallclock_seconds=0)
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


# ---- coprime-stride loader ----------------------------------------------------------------------


def test_coprime_order_visits_every_block_once_per_pass():
    counts = [7, 12, 1, 30, 9]
    order = tg.CoprimeBlockOrder(counts, seed=3)
    for _ in range(2):
        shards, blocks = order.take(sum(counts))
        for j, n in enumerate(counts):
            mine = blocks[shards == j]
            assert sorted(mine.tolist()) == list(range(n))
        assert not all((np.diff(blocks[shards == 3]) == 1))  # scrambled, not sequential


def test_coprime_order_draws_shards_in_proportion_to_remaining_blocks():
    order = tg.CoprimeBlockOrder([3000, 1000], seed=0)
    shards, _ = order.take(4000)
    first = shards[:800]
    assert abs((first == 0).mean() - 0.75) < 0.06
    # Proportional to what is left, not to the shard sizes: both shards run out near the end together.
    for j in (0, 1):
        assert np.flatnonzero(shards == j).max() > 0.98 * 4000


def test_coprime_order_is_a_function_of_the_seed():
    a, b, c = (tg.CoprimeBlockOrder([50, 70], seed=s).take(120) for s in (1, 1, 2))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_coprime_loader_ranks_slice_the_same_global_batch(tmp_path, world_size):
    sizes = [1000, 1601, 300]
    files = _positional_shards(tmp_path, sizes)
    starts = np.cumsum([0] + sizes[:-1])
    seq_len, global_tokens = 16, 16 * 16
    cpu = torch.device("cpu")
    single = tg.CoprimeLoader(files, 0, 1, cpu, seq_len, seed=5)
    ranks = [tg.CoprimeLoader(files, r, world_size, cpu, seq_len, seed=5) for r in range(world_size)]
    seen = []
    for _ in range(6):
        x1, y1 = single.next_batch(global_tokens, seq_len)
        parts = [loader.next_batch(global_tokens, seq_len) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal(y1[:, -1], x1[:, -1] + 1)
        assert torch.equal(x1, x1[:, :1] + torch.arange(seq_len))  # one contiguous block of one shard
        shard = np.searchsorted(starts, x1[:, 0].numpy(), side="right") - 1
        assert ((x1[:, 0].numpy() - starts[shard]) % seq_len == 0).all()  # at a block boundary
        seen += x1[:, 0].tolist()
    assert len(set(seen)) == len(seen)  # 96 of the 180 blocks: no block twice within the pass


def test_coprime_loader_skips_short_shards_and_fails_when_all_are(tmp_path):
    files = _positional_shards(tmp_path, [16, 500])  # 16 tokens cannot hold a 16-token input + target
    loader = tg.CoprimeLoader(files, 0, 1, torch.device("cpu"), 16, seed=0)
    assert loader.order.counts.tolist() == [(500 - 1) // 16]
    with pytest.raises(ValueError, match="TRAIN_SEQ_LEN"):
        tg.CoprimeLoader(files[:1], 0, 1, torch.device("cpu"), 16, seed=0)


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
