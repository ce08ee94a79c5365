"""The April optimizer parts inside the stacked Muon, each checked against a one-matrix-at-a-time
reference (tests/test_step_speed.py's, with the part added the simple way): MuonEq-R (MUON_ROW_NORMALIZE=1,
each row of the parameter's update at unit norm before Newton-Schulz) and the Polar Express coefficients
(MUON_NS_COEFFS=polar_express, one triple per iteration), on one process and on two gloo processes; and the
MIN_LR floor of the LR schedule against the public run's formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp
import torch.distributed as dist

import train_gpt as tg
from conftest import cpu_runtime
from test_model_eval import tiny_model
from test_step_speed import STEPS, reference_step, run_steps

VARIANTS = {"row_normalize": dict(muon_row_normalize=True),
            "polar_express": dict(muon_ns_coeffs="polar_express"),
            "both": dict(muon_row_normalize=True, muon_ns_coeffs="polar_express")}
H = dict(grad_clip_norm=0.3, matrix_lr_split_layer=1, muon_weight_decay=0.04, embed_weight_decay=0.01)


def reference_orthogonalize(g: torch.Tensor, steps: int, coeffs) -> torch.Tensor:
    """Newton-Schulz on one matrix, iteration i with the i-th triple (the last one repeated)."""
    x = g / (g.norm() + tg.NS_EPS)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class ReferenceMuon(torch.optim.Optimizer):
    """Muon one matrix at a time: Nesterov momentum, the rows of the update (as the parameter lies) at unit
    norm when asked, Newton-Schulz with the given coefficients, sqrt(rows / cols) for tall matrices."""

    def __init__(self, params, lr, momentum, backend_steps, weight_decay, coeffs, row_normalize):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay))
        self.coeffs, self.row_normalize = coeffs, row_normalize

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                if self.row_normalize:
                    g = g / g.norm(dim=1, keepdim=True).clamp_min(tg.ROW_NORM_EPS)
                g = reference_orthogonalize(g, group["backend_steps"], self.coeffs)
                g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(g, alpha=-group["lr"])


def hparams(variant: str) -> tg.Hyperparameters:
    return tg.Hyperparameters(**H, **VARIANTS[variant])


def reference_optimizers(model, h):
    adam = tg.build_optimizers(model, h, cpu_runtime())[0]
    muon = ReferenceMuon(tg.muon_groups(model, h), lr=h.matrix_lr, momentum=h.muon_momentum,
                         backend_steps=h.muon_backend_steps, weight_decay=h.muon_weight_decay,
                         coeffs=tg.NS_COEFF_SETS[h.muon_ns_coeffs], row_normalize=h.muon_row_normalize)
    for group in muon.param_groups:
        group["base_lr"] = group["lr"]
    return [adam, muon]


def reference_weights(h) -> dict[str, torch.Tensor]:
    ref = tiny_model()
    run_steps(ref, reference_optimizers(ref, h), lambda opts: reference_step(ref, opts, h))
    return {n: p.detach() for n, p in ref.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_muon_variant_matches_the_reference(variant):
    h = hparams(variant)
    model = tiny_model()
    optimizers = tg.build_optimizers(model, h, cpu_runtime())
    run_steps(model, optimizers, lambda opts: tg.optimizer_step(opts, h, cpu_runtime()))
    muon = optimizers[1]
    assert any(any(st.transposed) for st in muon.stacks)  # a wide matrix's rows are its stack's columns
    expected = reference_weights(h)
    for name, p in model.named_parameters():
        assert torch.allclose(p, expected[name], atol=2e-6, rtol=1e-5), name
    plain = reference_weights(tg.Hyperparameters(**H))  # the part is not a no-op
    assert not all(torch.allclose(p, plain[n], atol=1e-4) for n, p in model.named_parameters())


def _worker(rank: int, world_size: int, init_file: str, out: str, variant: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        h = hparams(variant)
        model = tiny_model()
        optimizers = tg.build_optimizers(model, h, cpu_runtime(rank, world_size))
        run_steps(model, optimizers, lambda opts: tg.optimizer_step(opts, h, cpu_runtime(rank, world_size)), rank, world_size)
        torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_with_both_parts_step_like_the_reference(tmp_path):
    """Each rank row-normalizes and orthogonalizes only its slice of the stacks: the gathered result is the
    reference's."""
    expected = reference_weights(hparams("both"))
    out = str(tmp_path / "weights")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out, "both"), nprocs=2, join=True)
    for rank in range(2):
        weights = torch.load(f"{out}.{rank}")
        for name, p in expected.items():
            assert torch.allclose(weights[name], p, atol=2e-6, rtol=1e-5), (rank, name)


def test_polar_express_orthogonalizes_closer_than_the_fixed_triple():
    """What the coefficients are for: after 5 iterations the singular values of a matrix with condition
    number 100 are nearer 1 (measured: all within 0.14 of it; the fixed triple's within 0.32)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -2, 32, dtype=torch.float64)
    g = u[:, :32] @ torch.diag(s) @ v.T
    error = {}
    for name, coeffs in tg.NS_COEFF_SETS.items():
        sv = torch.linalg.svdvals(tg.newton_schulz5(g, 5, torch.float64, coeffs))
        error[name] = (sv - 1).abs().max().item()
    assert error["polar_express"] < error["quintic"] / 2, error


def test_row_normalize_makes_each_parameter_row_unit_norm():
    tall, wide = torch.randn(6, 3) * 5, torch.randn(3, 6) * 5
    tall[2] = 0  # a zero row stays zero
    a, b = tg.normalize_rows([tall, wide.mT], [False, True])  # wide is held transposed, as in its stack
    assert torch.allclose(a.norm(dim=1)[[0, 1, 3, 4, 5]], torch.ones(5)) and torch.equal(a[2], torch.zeros(3))
    assert torch.allclose(b.mT.norm(dim=1), torch.ones(3))


def public_min_lr(progress: float, warmdown_frac: float, min_lr: float) -> float:
    """The public 2026-04-27 run's schedule: 1, then max((1 - p) / f, MIN_LR) in the last fraction f."""
    return max((1.0 - progress) / warmdown_frac, min_lr) if progress >= 1.0 - warmdown_frac else 1.0


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.15, 0.3, 0.6, 0.9, 0.915, 0.95, 1.0, 1.2])
def test_min_lr_is_the_public_floor(progress):
    assert tg.lr_multiplier(progress, 0.85, 0.0, 0.1) == pytest.approx(public_min_lr(min(progress, 1.0), 0.85, 0.1))
    # With both floors, the lowest of the two never binds below the other.
    assert tg.lr_multiplier(progress, 0.85, 0.2, 0.1) == pytest.approx(max(0.1, tg.lr_multiplier(progress, 0.85, 0.2)))


def test_schedule_uses_min_lr_and_qat_refuses_a_floor_above_its_threshold():
    h = tg.Hyperparameters(warmdown_frac=0.5, min_lr=0.25, qat="off", iterations=100, max_wallclock_seconds=0)
    lrs = [tg.Schedule(h).at(step, 0.0).lr_mult for step in range(100)]
    assert min(lrs) == pytest.approx(0.25) and lrs[80] == pytest.approx(0.4)
    with pytest.raises(tg.SettingError, match="MIN_LR=0.2"):
        tg.Hyperparameters.from_env({"MIN_LR": "0.2", "QAT": "hard"})
    assert dataclasses.replace(h, min_lr=0.0) != h
