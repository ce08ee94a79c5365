"""The Training section's step speed without changing the math: the compiled training graph is whole (no
graph break, one recompile when QAT switches on, none back), every graph state is primed before the clock,
a training step and an evaluation ask the host for nothing (no .item(), no data-dependent shapes), and the
stop vote is read one step late. (Muon's stacks against the one-matrix reference: test_optimizer.py.)

Run:
    python3 -m pytest -q tests/test_training.py
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch._dynamo.testing
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg
from conftest import cpu_runtime, run_context, tiny_env, tiny_model


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
