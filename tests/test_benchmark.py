"""lab/benchmark.py on CPU: a tiny config, a few steps, one JSON line with every key and sane numbers.

No timing thresholds: speed is what the benchmark reports, not what a test asserts.

Run:
    python3 -m pytest -q tests/test_benchmark.py
"""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import tiny_env
from lab import benchmark

KEYS = {"device", "torch", "config", "ms_per_step", "tokens_per_s", "mfu", "peak_mem_gib", "optimizer_share",
        "compile_s", "graphs", "eval_tokens_per_s", "date", "flops_per_token", "predicted", "attention"}
PREDICTED = {"flops_per_token", "flops_per_token_counted", "activation_gib_compiled", "activation_gib_eager",
             "state_gib", "memory_gib", "comm_payload_mib", "comm_bus_mib_per_gpu", "graphs", "graph_states",
             "gptq_column_steps_per_rank", "roofline_ms", "record_mfu", "assumptions"}
POSITIVE = ("ms_per_step", "tokens_per_s", "peak_mem_gib", "optimizer_share", "eval_tokens_per_s",
            "flops_per_token")


@pytest.fixture
def tiny_benchmark_env(tmp_path, monkeypatch):
    """The tests' tiny model config; the data paths point nowhere, since the benchmark reads no files."""
    env = tiny_env({"output_dir": tmp_path / "no_data", "tokenizer_model": tmp_path / "no.model"}, tmp_path)
    for key in list(os.environ):
        if key not in env:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_benchmark_appends_one_complete_line_per_run(tiny_benchmark_env):
    out = tiny_benchmark_env / "results.jsonl"
    for predict in (["--no-predict"], []):
        benchmark.main(["--steps", "2", "--warmup", "1", "--eval-tokens", "300", "--out", str(out), *predict])
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["predicted"] is None
    row = json.loads(lines[-1])
    assert KEYS <= row.keys()
    for key in POSITIVE:
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["optimizer_share"] < 1
    assert row["config"]["num_layers"] == 2 and row["config"]["model_dim"] == 32
    assert row["tokens_per_step"] == 64 * 16 // 8  # one GPU's micro-batch of the 8-GPU step
    assert row["mfu"] is None and row["compile_s"] is None and "cpu" in row["mfu_reason"]
    predicted = row["predicted"]
    assert PREDICTED <= predicted.keys() and predicted["tokens_per_gpu"] == 64 * 16 // 8
    assert predicted["graphs"] == predicted["graph_states"] == 2  # QAT off and on, no graph break
    assert 0 < predicted["activation_gib_compiled"] < predicted["memory_gib"] and predicted["activation_gib_eager"] > 0
    assert predicted["roofline_ms"] >= predicted["roofline_compute_ms"] > 0
    payload = predicted["comm_payload_mib"]
    assert payload["muon_reduce_scatter"] == 2 * payload["muon_all_gather"]  # fp32 gradients, bf16 updates


def test_predictions_alone_need_no_timing(tiny_benchmark_env, monkeypatch):
    monkeypatch.setattr(benchmark, "predict", lambda h: {"roofline_ms": 1.0})
    row = benchmark.main(["--predict-only", "--out", str(tiny_benchmark_env / "results.jsonl")])
    assert "ms_per_step" not in row and row["predicted"] == {"roofline_ms": 1.0}


def test_counted_flops_are_the_formula_plus_flash_attentions_recompute():
    """FlopCounterMode on a forward and backward: the matmuls are exactly 6 N per token, attention's
    forward 4 T d per pass, and its backward counts one more product (the score recompute) than the
    formula's 8 T d: counted = formula + 2 T d per pass."""
    import train_gpt as tg
    cfg = tg.ModelConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                         rope_dims=4, bigram_buckets=16, bigram_dim=8, mini_recur_repeats=1, mini_recur_first=1,
                         mini_recur_last=1)
    model = tg.GPT(cfg)
    T = 24
    formula = benchmark.flops_per_token(model, T)
    assert benchmark.counted_flops_per_token(model, T) == formula + 2 * len(model.plan) * T * cfg.model_dim


def test_flops_per_token_counts_each_pass_and_the_tied_head_once():
    import dataclasses

    import train_gpt as tg
    cfg = tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2,
                         rope_dims=4, bigram_buckets=0, ve_layers="none")
    model = tg.GPT(cfg)
    block = sum(m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, tg.CastedLinear))
    # per block: q 16x16, k and v 8x16 each (one kv head of 8 dims), out 16x16, mlp 32x16 and 16x32
    assert block == 256 + 128 + 128 + 256 + 512 + 512
    assert benchmark.flops_per_token(model, seq_len=10) == 6 * (2 * block + 64 * 16) + 12 * 2 * 10 * 16
    repeated = tg.GPT(dataclasses.replace(cfg, mini_recur_repeats=1, mini_recur_first=0, mini_recur_last=0))
    assert benchmark.flops_per_token(repeated, 10) == 6 * (3 * block + 64 * 16) + 12 * 3 * 10 * 16
    # value embeddings on two layers: one 4 -> 8 (kv width) projection per token, shared by both layers
    with_ve = tg.GPT(dataclasses.replace(cfg, ve_layers="-2,-1", ve_dim=4))
    assert benchmark.flops_per_token(with_ve, 10) == benchmark.flops_per_token(model, 10) + 6 * 4 * 8
