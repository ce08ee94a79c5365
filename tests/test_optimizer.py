"""The Optimizer section. Newton-Schulz approaches the polar factor and the Muon update has its expected
scale; the April optimizer parts inside the stacked Muon, each checked against a one-matrix-at-a-time
reference (the Muon before the stacks, with the part added the simple way): MuonEq-R (MUON_ROW_NORMALIZE=1,
each row of the parameter's update at unit norm before Newton-Schulz) and the Polar Express coefficients
(MUON_NS_COEFFS=polar_express, one triple per iteration), on one process and on two gloo processes; and the
MIN_LR floor of the LR schedule against the public run's formula."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import train_gpt as tg
from conftest import cpu_runtime, env_settings, tiny_model

VARIANTS = {"plain": {}, "row_normalize": dict(muon_row_normalize=True),
            "polar_express": dict(muon_ns_coeffs="polar_express"),
            "both": dict(muon_row_normalize=True, muon_ns_coeffs="polar_express")}
H = dict(grad_clip_norm=0.3, matrix_lr_split_layer=1, muon_weight_decay=0.04, embed_weight_decay=0.01)
STEPS = 3
GRID = 256  # gradients are multiples of 1/GRID


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


def hparams(variant: str = "plain") -> tg.Hyperparameters:
    return tg.Hyperparameters(**H, **VARIANTS[variant])


def reference_optimizers(model, h):
    adam = tg.build_optimizers(model, h, cpu_runtime())[0]
    muon = ReferenceMuon(tg.muon_groups(model, h), lr=h.matrix_lr, momentum=h.muon_momentum,
                         backend_steps=h.muon_backend_steps, weight_decay=h.muon_weight_decay,
                         coeffs=tg.NS_COEFF_SETS[h.muon_ns_coeffs], row_normalize=h.muon_row_normalize)
    for group in muon.param_groups:
        group["base_lr"] = group["lr"]
    return [adam, muon]


def reference_step(model, optimizers, h) -> None:
    """The step before this work: clip every gradient together, Adam, then the reference Muon."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


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
    assert len(muon.stacks) < len(model.matrix_params())  # matrices really were batched
    assert any(any(st.transposed) for st in muon.stacks)  # a wide matrix's rows are its stack's columns
    expected = reference_weights(h)
    for name, p in model.named_parameters():
        assert torch.allclose(p, expected[name], atol=2e-6, rtol=1e-5), name
    if variant != "plain":  # the part is not a no-op
        plain = reference_weights(tg.Hyperparameters(**H))
        assert not all(torch.allclose(p, plain[n], atol=1e-4) for n, p in model.named_parameters())


def test_batched_newton_schulz_is_each_matrix_on_its_own():
    g = torch.randn(5, 24, 40)
    stacked = tg.newton_schulz5(g, 5, torch.float32)
    for i in range(5):
        assert torch.allclose(stacked[i], reference_orthogonalize(g[i], 5, (tg.NS_COEFFS,)), atol=1e-6)


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


@pytest.mark.parametrize("variant", ["plain", "both"])
def test_two_gloo_processes_step_like_the_reference(tmp_path, variant):
    """Reduce-scatter, per-rank slices (each rank row-normalizes and orthogonalizes only its own), all-gather
    and the global-norm clip: the same weights as the reference Muon stepping the mean gradient in one
    process."""
    expected = reference_weights(hparams(variant))
    out = str(tmp_path / "weights")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out, variant), nprocs=2, join=True)
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


# ---- Newton-Schulz and the Muon update ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_newton_schulz_approximates_the_polar_factor(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    x = tg.newton_schulz5(g, 5, torch.float32)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vt
    cosine = (x * polar).sum() / (x.norm() * polar.norm())
    assert cosine > 0.95
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic trades exactness for speed: s in ~[0.7, 1.2]


def test_muon_update_has_the_expected_scale():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(48, 16))
    opt = tg.Muon([p], tg.Hyperparameters(matrix_lr=0.1, muon_momentum=0.0), tg.Runtime.single())
    p.grad = torch.randn(48, 16)
    opt.step()
    # Orthogonal update of a 48x16 matrix scaled by sqrt(48/16): Frobenius norm ~ lr*sqrt(16*3).
    assert abs(p.detach().norm().item() / (0.1 * math.sqrt(16 * 3)) - 1) < 0.25


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
    h = env_settings()
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
    muon = tg.build_optimizers(model, env_settings(), cpu_runtime())[1]
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
    h = env_settings()
    assert [tg.muon_momentum_at(s, h) for s in (0, 750, 1500, 6000)] == pytest.approx([0.92, 0.955, 0.99, 0.99])
    assert tg.muon_momentum_at(0, env_settings(muon_momentum_warmup_steps=0)) == 0.99
    adam, muon = tg.build_optimizers(tiny_model(), h, cpu_runtime())
    tg.set_step_hparams([adam, muon], 0.5, 0.95)
    assert all(g["momentum"] == 0.95 and g["lr"] == g["base_lr"] * 0.5 for g in muon.param_groups)
    assert all("momentum" not in g and g["lr"] == g["base_lr"] * 0.5 for g in adam.param_groups)


def test_adam_groups_follow_parameter_roles():
    model = tiny_model()  # the record model: a bigram table with projection and scale, and gates
    h = env_settings(embed_lr=0.02, gate_lr=0.01, embed_weight_decay=0.01)  # scalars: the default decay, 0.04
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
    h = env_settings(embed_proj_optimizer="adam", scalar_weight_decay=0.02)
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
