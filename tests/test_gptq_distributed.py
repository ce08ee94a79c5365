"""GPTQ inside its reserve: same-shape matrices share one batched column loop, chunks of them spread over
the ranks give the same artifact bytes as one process, the reserve can be measured in the warm-up, and
calibration past the reserve is reported on a `legality` line.

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
from conftest import cpu_runtime, gptq_one, run_context


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
