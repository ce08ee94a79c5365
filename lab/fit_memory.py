"""Fit lab/predict.py's ACTIVATION_BYTES: the bytes a training step saves for its backward, per token, as a
linear function of the model's shape, from lab/benchmark.py's traced joint graph (fake CUDA tensors,
bf16 autocast, torch.compile's min-cut partition). The trace takes 10-60 s a model: too slow for a plan,
exact enough to fit a formula that takes none.

    OMP_NUM_THREADS=1 python3 lab/fit_memory.py          # ~10 min on one core: the fit and its residuals
    python3 lab/fit_memory.py --refit                     # the fit again from the kept traces (seconds)

Per-token bytes = (saved bytes at 2 sequences - at 1 sequence) / TRAIN_SEQ_LEN: the weights' bf16 copies the
graph also saves cancel. The configurations are shallow (the trace's cost grows with the passes, the bytes
per pass do not) and vary each feature; the full seed and April models are the held-out check.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from lab import predict as pr  # noqa: E402
from lab import benchmark as bm  # noqa: E402

SMALL_APRIL = dict(PRESET="april", NUM_LAYERS="6", MINI_RECUR_FIRST="2", MINI_RECUR_LAST="3", PARALLEL_START_LAYER="4")
FIT = {
    "seed_2L": dict(NUM_LAYERS="2"),
    "seed_4L": dict(NUM_LAYERS="4"),
    "seed_3L_d256_mlp4": dict(NUM_LAYERS="3", MODEL_DIM="256", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="4"),
    "seed_2L_v8192_noxsa": dict(NUM_LAYERS="2", VOCAB_SIZE="8192", XSA_LAYERS="none"),
    "seed_3L_kv8_mlp2_plain": dict(NUM_LAYERS="3", NUM_KV_HEADS="8", MLP_MULT="2", BIGRAM_BUCKETS="0",
                                   VE_LAYERS="none"),
    "april_6L_v8192": dict(SMALL_APRIL, VOCAB_SIZE="8192"),
    "april_4L_d384_lanes": dict(PRESET="april", NUM_LAYERS="4", PARALLEL_START_LAYER="1", MINI_RECUR_REPEATS="0",
                                MINI_RECUR_UNET="0", MODEL_DIM="384", NUM_HEADS="6", NUM_KV_HEADS="2", VOCAB_SIZE="1024"),
    "seed_2L_seq1024": dict(NUM_LAYERS="2", TRAIN_SEQ_LEN="1024"),
}
HELD_OUT = {"seed": dict(PRESET="seed"), "april": dict(PRESET="april")}
TRACES = ROOT / "lab" / "fit_memory_traces.json"  # the traced bytes per token of each FIT configuration, kept


def per_token_bytes(env: dict) -> float:
    h = tg.Hyperparameters.from_env(env)
    one, two = (bm.saved_activation_bytes(h, seqs)["compiled"] for seqs in (1, 2))
    return (two - one) / h.train_seq_len


def features(env: dict) -> dict[str, float]:
    h = tg.Hyperparameters.from_env(env)
    return pr.activation_features(tg.GPT(tg.ModelConfig.from_hparams(h)), True)


def main() -> None:
    refit = "--refit" in sys.argv[1:]
    torch.set_num_threads(1)
    names = list(pr.ACTIVATION_BYTES)
    rows, targets = [], []
    traces = json.loads(TRACES.read_text()) if TRACES.exists() else {}
    for label, env in FIT.items():
        t0 = time.perf_counter()
        if label not in traces or traces[label]["env"] != env:
            traces[label] = {"env": env, "bytes_per_token": per_token_bytes(env)}
            TRACES.write_text(json.dumps(traces, indent=1) + "\n")
        y = traces[label]["bytes_per_token"]
        f = features(env)
        rows.append([f[n] for n in names])
        targets.append(y)
        print(f"{label}: {y:,.0f} bytes/token ({time.perf_counter() - t0:.0f} s) {json.dumps(f)}", flush=True)
    coef, *_ = np.linalg.lstsq(np.asarray(rows, float), np.asarray(targets), rcond=None)
    fitted = dict(zip(names, (round(float(c), 3) for c in coef)))
    print("ACTIVATION_BYTES =", fitted)
    for (label, _), row, y in zip(FIT.items(), rows, targets):
        pred = float(np.dot(coef, row))
        print(f"  fit {label}: traced {y:,.0f} formula {pred:,.0f} ({100 * (pred - y) / y:+.1f}%)")
    if refit:
        return
    for label, env in HELD_OUT.items():
        h = tg.Hyperparameters.from_env(env)
        seqs = h.train_batch_tokens // pr.WORLD // h.train_seq_len
        t0 = time.perf_counter()
        traced = bm.saved_activation_bytes(h, seqs)["compiled"]
        f = features(env)
        pred = float(np.dot(coef, [f[n] for n in names])) * seqs * h.train_seq_len
        print(f"  held out {label} ({seqs} x {h.train_seq_len}): traced {traced / pr.GIB:.2f} GiB formula "
              f"{pred / pr.GIB:.2f} GiB ({100 * (pred - traced) / traced:+.1f}%) ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
