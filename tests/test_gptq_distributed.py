"""GPTQ inside its reserve: same-shape matrices share one batched column loop, chunks of them spread over
the ranks give the same artifact bytes as one process, the reserve can be measured in the warm-up (and grows
with GPTQ_CALIB_SEQS), calibration past the reserve is reported on a `legality` line, and no Hessian is
collected after the training cap.

Run:
    python3 -m pytest -q tests/test_gptq_distributed.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import cpu_runtime, gptq_one, run_context, tiny_env


def layer_hessian(cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) / cols ** 0.5
    return x.T @ x / len(x)


def state_and_hessians() -> tuple[dict, dict, dict]:
    """A small state dict: 5 matrices of one shape (a chunk of GPTQ_BATCH=3 and one of 2), 2 of another,
    a round-to-nearest table and small passthrough tensors."""
    gen = torch.Generator().manual_seed(0)
    state, hessians = {}, {}
    for i in range(5):
        state[f"a{i}.weight"] = torch.randn(24, 32, generator=gen) * 0.05
        hessians[f"a{i}.weight"] = layer_hessian(32, i)
    for i in range(2):
        state[f"b{i}.weight"] = torch.randn(48, 16, generator=gen) * 0.05
        hessians[f"b{i}.weight"] = layer_hessian(16, 10 + i)
    state["table.weight"] = torch.randn(40, 16, generator=gen)
    state["gain"] = torch.ones(16)
    state["steps"] = torch.arange(3)
    plan = tg.build_quant_plan(state, min_numel=256)
    return state, hessians, plan


def test_batched_gptq_equals_one_matrix_at_a_time():
    state, hessians, plan = state_and_hessians()
    names = [f"a{i}.weight" for i in range(5)]
    batched = tg.quantize_gptq_batch([state[n] for n in names], [hessians[n] for n in names], 6, names,
                                     tg.QuantSettings(gptq_block=8), print)
    for name, (q, scale) in zip(names, batched):
        q1, scale1 = gptq_one(state[name], hessians[name], block=8, name=name)
        assert torch.equal(q, q1) and torch.equal(scale, scale1), name


def test_chunks_have_a_fixed_size_and_spread_over_the_ranks(monkeypatch):
    monkeypatch.setattr(tg, "GPTQ_BATCH", 3)
    state, hessians, plan = state_and_hessians()
    chunks = tg.quant_chunks(state, plan, hessians)
    assert chunks == [["table.weight"], ["a0.weight", "a1.weight", "a2.weight"], ["a3.weight", "a4.weight"],
                      ["b0.weight", "b1.weight"]]
    owners = tg.assign_chunks(chunks, state, 2)
    # Largest first, each to the less loaded rank (rows x cols^2 per matrix): a0-a2 (73,728) to rank 0,
    # a3-a4 (49,152) and b0-b1 (24,576) to rank 1, then the table to rank 0 (a tie goes to the lower rank).
    assert owners == [0, 0, 1, 1]
    assert tg.assign_chunks(chunks, state, 1) == [0] * 4


def artifact(packed: dict) -> bytes:
    return tg.serialize_artifact(packed, compressor="zstd")


def _worker(rank: int, world_size: int, init_file: str, out: str, batch: int) -> None:
    torch.set_num_threads(1)
    tg.GPTQ_BATCH = batch
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        state, hessians, plan = state_and_hessians()
        rt = cpu_runtime(rank, world_size)
        packed, seconds = tg.quantize_distributed(state, plan, hessians, tg.Hyperparameters(gptq_block=8), rt, print)
        if rank == 0:
            assert len(seconds) == world_size
            with open(out, "wb") as f:
                f.write(artifact(packed))
        else:
            assert packed is None
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_write_the_bytes_of_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "GPTQ_BATCH", 3)
    state, hessians, plan = state_and_hessians()
    one = artifact(tg.quantize_state_dict(state, plan=plan, hessians=hessians, q=tg.QuantSettings(gptq_block=8)))
    packed, _ = tg.quantize_distributed(state, plan, hessians, tg.Hyperparameters(gptq_block=8), cpu_runtime(), print)
    assert artifact(packed) == one
    out = tmp_path / "two.ptz"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), 3), nprocs=2, join=True)
    assert out.read_bytes() == one


def test_calibration_past_its_reserve_is_a_legality_line():
    lines = []
    ctx = run_context(tg.Hyperparameters(max_wallclock_seconds=600, gptq_reserve_seconds=10), lines.append)
    tg.log_calibration_legality(9000, 590_000, ctx)
    tg.log_calibration_legality(12_000, 590_000, ctx)
    tg.log_calibration_legality(8000, 595_000, ctx)
    assert lines == [
        "legality gptq_calibration verdict:within calibration_time:9000ms reserve:10000ms reserve_kept:yes "
        "train_plus_calibration:599000ms cap:600000ms",
        "legality gptq_calibration verdict:over calibration_time:12000ms reserve:10000ms reserve_kept:no "
        "train_plus_calibration:602000ms cap:600000ms",
        "legality gptq_calibration verdict:over calibration_time:8000ms reserve:10000ms reserve_kept:yes "
        "train_plus_calibration:603000ms cap:600000ms"]


def test_the_reserve_is_measured_in_the_warm_up(monkeypatch):
    calls = []

    def work(base_model, plan, h, rt, log):
        calls.append(h)
        return None, {"w": torch.eye(2)}, dict(total=2000.0)

    monkeypatch.setattr(tg, "gptq_work", work)
    h = tg.Hyperparameters(max_wallclock_seconds=600)
    lines = []
    ctx = run_context(h, lines.append)
    tg.measure_gptq_reserve(None, {}, ctx)
    assert (ctx.state.gptq_reserve_seconds, ctx.state.reserve_from) == (1.5 * 2 + 1, "measured")
    assert ctx.h is h  # the settings stay as they were read: the measurement is run state
    assert lines[0].startswith("gptq_reserve measured:2000ms reserve:4000ms")
    for unmeasured in (dataclasses.replace(h, gptq_reserve_measure=False), dataclasses.replace(h, gptq=False),
                       dataclasses.replace(h, max_wallclock_seconds=0)):
        ctx = run_context(unmeasured, lines.append)
        tg.measure_gptq_reserve(None, {}, ctx)
        assert (ctx.state.gptq_reserve_seconds, ctx.state.reserve_from) == (unmeasured.gptq_reserve_seconds, "setting")
    assert len(calls) == 1
    with pytest.raises(tg.SettingError, match="MAX_WALLCLOCK_SECONDS=4"):
        tg.measure_gptq_reserve(None, {}, run_context(dataclasses.replace(h, max_wallclock_seconds=4), lines.append))


class ForwardTime:
    """An injected clock in which only the model's forwards take time: one second each (a calibration batch)."""

    def __init__(self, model: torch.nn.Module):
        self.now, self.forwards = 0.0, 0
        model.register_forward_pre_hook(self.tick)

    def tick(self, module, args) -> None:
        self.now += 1.0
        self.forwards += 1

    def __call__(self) -> float:
        return self.now


def calibrating_run(tiny_data, tmp_path, **env):
    """A tiny model with a 600 s cap, its plan, and a context whose clock counts its forwards (16 sequences of
    64 tokens each: GPTQ_CALIB_SEQS=64 is 4 batches)."""
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, tmp_path, MAX_WALLCLOCK_SECONDS="600", COMPRESSOR="zstd",
                                             **env))
    base = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    clock = ForwardTime(base)
    lines = []
    ctx = run_context(h, lines.append, dataclasses.replace(cpu_runtime(), clock=clock))
    return base, tg.plan_from_hparams(base.state_dict(), h, base.fp16_param_names()), ctx, clock, lines


@pytest.mark.parametrize("seqs, batches", [(64, 4), (128, 8)])
def test_the_measured_reserve_covers_the_calibration_it_will_run(tiny_data, tmp_path, seqs, batches):
    """The warm-up runs calibration with GPTQ_CALIB_SEQS itself: twice the sequences, twice the time reserved."""
    base, plan, ctx, clock, _ = calibrating_run(tiny_data, tmp_path, GPTQ_CALIB_SEQS=str(seqs))
    tg.measure_gptq_reserve(base, plan, ctx)
    assert clock.forwards == batches
    assert (ctx.state.gptq_reserve_seconds, ctx.state.reserve_from) == (1.5 * batches + 1, "measured")
    assert ctx.state.calib_batch_seconds == 1.0 and ctx.state.gptq_quantize_seconds == 0.0


@pytest.mark.parametrize("train_left_s, taken", [(3.7, 3), (0.4, 0), (100.0, 4)])
def test_no_hessian_is_collected_after_the_training_cap(tiny_data, tmp_path, train_left_s, taken):
    """Training ended train_left_s before the cap; the warm-up measured 1 s per batch and 0.5 s of quantization
    after them: calibration takes only the batches that end by the cap less that, and says so."""
    base, plan, ctx, clock, lines = calibrating_run(tiny_data, tmp_path, GPTQ_CALIB_SEQS="64")
    ctx.state.calib_batch_seconds, ctx.state.gptq_quantize_seconds = 1.0, 0.5
    blob = tg.export_model(base, plan, 600_000 - 1000 * train_left_s, None, ctx)
    assert clock.forwards == taken and (taken == 0 or clock.now <= train_left_s - 0.5)
    cut = [x for x in lines if x.startswith("gptq_calibration_cut")]
    assert cut == ([] if taken == 4 else [f"gptq_calibration_cut batches:{taken}/4 reason:training_cap "
                                          f"hessians:{15 if taken else 0} (GPTQ_CALIB_SEQS=64 did not fit the time "
                                          f"left: GPTQ_RESERVE_MEASURE=1 or a larger GPTQ_RESERVE_SECONDS keeps them all)"])
    legality = [x for x in lines if x.startswith("legality gptq_calibration")]
    assert legality == ([f"legality gptq_calibration verdict:within calibration_time:{1000 * taken}ms "
                         f"reserve:10000ms reserve_kept:yes train_plus_calibration:{600_000 - 1000 * train_left_s + 1000 * taken:.0f}ms "
                         f"cap:600000ms"])
    assert any(x.startswith(f"quantize gptq:1 hessians:{15 if taken else 0} ") for x in lines)
    tg.dequantize_state_dict(tg.deserialize_artifact(blob)[1])  # a whole artifact either way (round-to-nearest: 0)
