"""Evaluation: the sliding-window plan scores every target once, and the batched evaluation equals a slow
window-at-a-time reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import cpu_runtime, tiny_model


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
