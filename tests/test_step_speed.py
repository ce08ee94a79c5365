"""Step speed without changing the math: Muon on stacked same-shape matrices equals the one-matrix-at-a-
time Muon it replaced (one process and two gloo processes, with gradient clipping and Adam); the
compiled training graph is whole (no graph break, one recompile when QAT switches on, none back);
a training step and an evaluation ask the host for nothing (no .item(), no data-dependent shapes).

Run:
    python3 -m pytest -q tests/test_step_speed.py
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo.testing
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg
from conftest import cpu_runtime
from test_model_eval import tiny_model


# ---- the reference: Muon as it was before the stacks (one matrix at a time, one all-reduce) ----------


def reference_newton_schulz5(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    a, b, c = tg.NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + tg.NS_EPS)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class ReferenceMuon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum, backend_steps, weight_decay=0.0, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                g = reference_newton_schulz5(g, group["backend_steps"], self.ns_dtype)
                g = (g * max(1.0, g.size(0) / g.size(1)) ** 0.5).to(self.ns_dtype)
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(g.to(p.dtype), alpha=-group["lr"])


H = dict(grad_clip_norm=0.3, matrix_lr_split_layer=1, muon_weight_decay=0.04, embed_weight_decay=0.01)
STEPS = 3
GRID = 256  # gradients are multiples of 1/GRID


def hparams() -> tg.Hyperparameters:
    return tg.Hyperparameters(**H)


def reference_step(model, optimizers, h) -> None:
    """The step before this work: clip every gradient together, Adam, then the reference Muon."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def reference_optimizers(model, h):
    adam = tg.build_optimizers(model, h, cpu_runtime())[0]
    muon = ReferenceMuon(tg.muon_groups(model, h), lr=h.matrix_lr, momentum=h.muon_momentum,
                         backend_steps=h.muon_backend_steps, weight_decay=h.muon_weight_decay)
    for group in muon.param_groups:
        group["base_lr"] = group["lr"]
    return [adam, muon]


def gradient(p: torch.Tensor, step: int, index: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """A deterministic gradient whose mean over the ranks is the one-process gradient, exactly: on a
    1/256 grid every rank's value and their mean are exact in fp32. (Rounded means would differ in the
    last bit, which Adam turns into a visible difference wherever a gradient is near zero: its step is
    g / |g|, about LR in size, whatever g's size; a table that starts at zero has no large weights to
    hide that in the relative tolerance.)"""
    gen = torch.Generator().manual_seed(1000 * step + index)
    full = torch.round(torch.randn(p.shape, generator=gen) * GRID) / GRID
    spread = torch.round(torch.randn(p.shape, generator=gen) * GRID) / GRID
    return full + (rank - (world_size - 1) / 2) * spread


def run_steps(model, optimizers, step_fn, rank=0, world_size=1) -> None:
    for step in range(STEPS):
        momentum = 0.9 + 0.02 * step
        tg.set_step_hparams(optimizers, 1.0 - 0.2 * step, momentum)
        for group in optimizers[1].param_groups:  # set_step_hparams knows only train_gpt's Muon
            group["momentum"] = momentum
        for i, p in enumerate(model.parameters()):
            p.grad = gradient(p, step, i, rank, world_size)
        step_fn(optimizers)


def test_stacked_muon_matches_the_reference_in_one_process():
    h = hparams()
    ref, new = tiny_model(), tiny_model()
    run_steps(ref, reference_optimizers(ref, h), lambda opts: reference_step(ref, opts, h))
    optimizers = tg.build_optimizers(new, h, cpu_runtime())
    run_steps(new, optimizers, lambda opts: tg.optimizer_step(opts, h, cpu_runtime()))
    muon = optimizers[1]
    assert len(muon.stacks) < len(new.matrix_params())  # matrices really were batched
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-5), name


def test_batched_newton_schulz_is_each_matrix_on_its_own():
    g = torch.randn(5, 24, 40)
    stacked = tg.newton_schulz5(g, 5, torch.float32)
    for i in range(5):
        assert torch.allclose(stacked[i], reference_newton_schulz5(g[i], 5, torch.float32), atol=1e-6)


def _distributed_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        h = hparams()
        model = tiny_model()
        optimizers = tg.build_optimizers(model, h, cpu_runtime(rank, world_size))
        run_steps(model, optimizers, lambda opts: tg.optimizer_step(opts, h, cpu_runtime(rank, world_size)), rank, world_size)
        torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_step_like_the_reference(tmp_path):
    """Reduce-scatter, per-rank slices, all-gather and the global-norm clip: the same weights as the
    reference Muon stepping the mean gradient in one process."""
    h = hparams()
    ref = tiny_model()
    run_steps(ref, reference_optimizers(ref, h), lambda opts: reference_step(ref, opts, h))
    out = str(tmp_path / "weights")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in range(2):
        weights = torch.load(f"{out}.{rank}")
        for name, p in ref.named_parameters():
            assert torch.allclose(weights[name], p, atol=2e-6, rtol=1e-5), (rank, name)


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
