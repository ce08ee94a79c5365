"""Model causality, Muon, the sliding-window plan and evaluation against a simple reference,
quantization and the artifact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train_gpt as tg


def tiny_model(seed=0, vocab=64, layers=3) -> tg.GPT:
    torch.manual_seed(seed)
    cfg = tg.ModelConfig(vocab_size=vocab, num_layers=layers, model_dim=32, num_heads=4, num_kv_heads=2,
                         mlp_mult=2, rope_dims=4)
    model = tg.GPT(cfg)
    with torch.no_grad():  # zero-initialized projections would make every block a no-op
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=0.05)
    return model.eval()


# ---- model --------------------------------------------------------------------------------------


def test_changing_token_t_changes_no_earlier_prediction():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 24))
    base = model.logits(x)
    for t in (0, 7, 23):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 64
        out = model.logits(x2)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])  # the token itself is seen from position t on


def test_logits_are_soft_capped_and_distributions_normalized():
    model = tiny_model()
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e4)  # drive raw logits far beyond the cap
    logits = model.logits(torch.randint(0, 64, (1, 16)))
    assert logits.abs().max() <= model.cfg.logit_softcap
    probs = torch.softmax(logits.double(), dim=-1).sum(-1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-9)


def test_forward_is_per_token_cross_entropy():
    model = tiny_model()
    x, y = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10))
    logp = torch.log_softmax(model.logits(x), -1)
    expected = -logp.gather(-1, y[..., None])[..., 0]
    assert torch.allclose(model(x, y), expected, atol=1e-5)


def test_gqa_matches_repeated_kv_heads():
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    ref = tg._sdpa(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    assert torch.allclose(tg._sdpa(q, k, v), ref, atol=1e-6)


def test_cpu_attention_backend_is_sdpa():
    name, _, why = tg.select_attention(torch.device("cpu"))
    assert name == "sdpa" and why


# ---- optimizer ----------------------------------------------------------------------------------


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


# ---- evaluation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, seq_len, stride", [
    (1000, 64, 16), (1000, 64, 64), (1003, 64, 16), (64, 64, 8), (30, 64, 16), (65, 64, 16), (500, 32, 7),
])
def test_sliding_plan_scores_every_target_once(n, seq_len, stride):
    starts, offsets = tg.sliding_window_plan(n, seq_len, stride)
    counts = np.zeros(n + 1, dtype=int)
    for i, (s, o) in enumerate(zip(starts, offsets)):
        targets = np.arange(s + 1 + o, min(s + seq_len, n) + 1)
        counts[targets] += 1
        assert s >= 0
        if i > 0:
            assert s + seq_len <= n and o >= seq_len - stride  # full window, long context
    assert counts[0] == 0 and (counts[1:] == 1).all()


def reference_eval(model, tokens, seq_len, stride, luts):
    """One window at a time, straight from the plan: the slow, obvious version."""
    starts, offsets = tg.sliding_window_plan(len(tokens) - 1, seq_len, stride)
    nats, nbytes, count = 0.0, 0, 0
    for s, o in zip(starts.tolist(), offsets.tolist()):
        window = tokens[s:s + seq_len + 1].long()[None]
        x, y = window[:, :-1], window[:, 1:]
        nll = model(x, y)[0, o:]
        nats += nll.double().sum().item()
        nbytes += int(luts.token_bytes(x[0, o:], y[0, o:]).sum())
        count += len(nll)
    return nats / count, nats / math.log(2) / nbytes, count


def _luts(vocab):
    rng = np.random.default_rng(0)
    return tg.ByteLUTs(torch.from_numpy(rng.integers(0, 4, vocab).astype(np.int32)),
                       torch.from_numpy(rng.random(vocab) < 0.5), torch.from_numpy(rng.random(vocab) < 0.1))


@pytest.mark.parametrize("n, seq_len, stride, batch", [(300, 32, 8, 5), (300, 32, 32, 3), (20, 32, 8, 2)])
def test_batched_eval_matches_the_reference(n, seq_len, stride, batch):
    model = tiny_model()
    tokens = torch.randint(0, 64, (n + 1,), dtype=torch.int32)
    luts = _luts(64)
    with torch.no_grad():
        ref_loss, ref_bpb, count = reference_eval(model, tokens, seq_len, stride, luts)
    assert count == n
    loss, bpb = tg.evaluate(model, tokens, luts, tg.EvalSpec("sliding", seq_len, stride, batch), tg.Runtime.single())
    assert abs(loss - ref_loss) < 1e-5 and abs(bpb - ref_bpb) < 1e-5


def test_sliding_window_sees_more_context_than_chunks():
    # A model that only knows "the next token repeats the one 20 back" gains from context: the
    # sliding evaluation, with >= seq_len - stride context everywhere, must beat plain chunks.
    class CopyBack(torch.nn.Module):
        def forward(self, x, y):
            lag = 20
            hit = torch.zeros_like(y, dtype=torch.bool)
            hit[:, lag - 1:] = y[:, lag - 1:] == x[:, :x.size(1) - lag + 1]
            return torch.where(hit, torch.tensor(0.01), torch.tensor(5.0))
    pattern = torch.randint(0, 64, (20,))
    tokens = pattern.repeat(40).to(torch.int32)
    luts = _luts(64)
    plain, _ = tg.evaluate(CopyBack(), tokens, luts, tg.EvalSpec("plain", 32, 32, 4), tg.Runtime.single())
    sliding, _ = tg.evaluate(CopyBack(), tokens, luts, tg.EvalSpec("sliding", 32, 4, 4), tg.Runtime.single())
    assert sliding < plain / 5


# ---- quantization and artifact ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_rows_roundtrip_within_half_a_step_inside_the_clip(bits):
    w = torch.randn(64, 300) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = tg.quantize_rows_rtn(w, bits)
    s = scale.float()[:, None]
    err = (tg.dequantize_state_dict({"w": {"kind": "int", "q": q, "scale": scale, "shape": [64, 300],
                                           "dtype": "float32"}})["w"] - w).abs()
    assert q.dtype == torch.int8 and q.abs().max() <= tg.qmax(bits)
    inside = w.abs() <= tg.qmax(bits) * s
    assert (err[inside] <= (s * 0.5 + 1e-6).expand_as(w)[inside]).all()


def test_artifact_roundtrip_restores_the_model(tmp_path):
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2)
    model = tg.GPT(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.normal_(std=0.5)
    packed = tg.quantize_state_dict(model.state_dict())
    kinds = {name: (entry["kind"], entry.get("bits")) for name, entry in packed.items()}
    assert kinds["tok_emb.weight"] == ("int", 8)  # 1024 x 64 elements: quantized, the embedding at int8
    assert kinds["blocks.0.attn.q_gain"] == kinds["blocks.0.attn.c_q.weight"] == ("fp16", None)  # small
    path = tmp_path / "m.ptz"
    tg.write_atomic(path, tg.serialize_artifact(packed, config=cfg))
    loaded_cfg, state = tg.load_artifact(path)
    assert loaded_cfg == cfg  # the artifact alone rebuilds the model
    restored = tg.GPT(loaded_cfg).eval()
    restored.load_state_dict(state)
    assert all(p.dtype == torch.float32 for p in restored.parameters())
    x = torch.randint(0, 1024, (2, 16))
    ref, out = model.logits(x), restored.logits(x)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()  # int8 rows: well under 1% per weight
    assert not torch.equal(restored.tok_emb.weight, model.tok_emb.weight)  # really went through int8


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:4], "too short"),
    (lambda b: b"XXXXX" + b[5:], "not a train_gpt.py artifact"),
    (lambda b: b[:len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:7] + bytes(len(b) - 7), "corrupt or truncated"),
])
def test_corrupt_artifact_names_the_file(tmp_path, damage, message):
    path = tmp_path / "bad.ptz"
    path.write_bytes(damage(tg.serialize_artifact(tg.quantize_state_dict(tiny_model().state_dict()))))
    with pytest.raises(ValueError, match=message) as err:
        tg.load_artifact(path)
    assert str(path) in str(err.value)


def test_cap_failure_gives_both_byte_counts():
    tg.check_artifact_cap(1000, 15_998_999)
    with pytest.raises(RuntimeError) as err:
        tg.check_artifact_cap(1000, 15_999_000)
    assert "bytes_code:1000" in str(err.value) and "bytes_model:15999000" in str(err.value)


def test_over_cap_run_keeps_the_artifact_and_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "ARTIFACT_CAP_BYTES", 5000)
    logged = []
    ctx = tg.RunContext(tg.Hyperparameters(), tg.Runtime.single(), tg.RunState("big", 0.0), logged.append,
                        tg.CodeForm("", "readable", 4000))
    path = tmp_path / "big.ptz"
    blob = tg.serialize_artifact(tg.quantize_state_dict(tiny_model().state_dict()), compressor="zstd")
    with pytest.raises(RuntimeError, match="over the cap"):
        tg.save_artifact(blob, path, ctx)
    assert path.exists() and any("bytes_total" in line for line in logged)
