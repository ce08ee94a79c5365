"""Fit lab/predict.py's constants on the public runs and print, for each run, the prediction of its
configuration beside what its logs say (the table of docs/plan.md).

    python3 lab/calibrate_plan.py            # the table (markdown) and the fitted constants, ~1 min

Each public run is expressed with our settings (PUBLIC_AS_OURS: the environment a run of train_gpt.py would
need to match it as closely as it can, and what it cannot express). Its predictions use its own class of code
(predict.TRAIN_MFU) and its logged facts where ours would differ (its val_tokens, its shipped code bytes, its
fixed GPTQ reserve). Which constant is fitted on which run is FITS; every other number is held out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from lab import predict as pr  # noqa: E402

BATCH_SEQS = 786_432 // 2048  # a public calibration batch: TRAIN_BATCH_TOKENS of TRAIN_SEQ_LEN sequences

PUBLIC_AS_OURS = {
    "2026-03-29": dict(
        code_class="compiled",
        env=dict(PRESET="seed", BIGRAM_BUCKETS="2816", BIGRAM_DIM="112", TTT="0", COMPRESSOR="lzma", LQER_TOP="0",
                 GPTQ_CALIB_SEQS=str(64 * BATCH_SEQS), GPTQ_RESERVE_MEASURE="0", GPTQ_RESERVE_SECONDS="14"),
        missing=["parameter banking and its parallel Muon (speed only)", "SWA collected beside the EMA"]),
    "2026-04-09": dict(
        code_class="compiled",
        env=dict(PRESET="april", DOC_MASKED_ATTENTION="0", PARALLEL_START_LAYER="7", QK_GAIN_INIT="5.25",
                 ATTN_OUT_GATE="0", SMEAR_GATE="0",
                 SMEAR_GATE_FORM="channel", MATRIX_LR="0.022", MATRIX_LR_LATE="0.022", MUON_MOMENTUM="0.99",
                 MUON_NS_COEFFS="quintic", WARMDOWN_FRAC="0.72", MIN_LR="0", QUANT_EMBED_BITS="8",
                 SDCLIP_K_EMBED="20", SDCLIP_K_MLP="12.85", SDCLIP_K_ATTN="12.85", LQER_TOP="0", COMPRESSOR="brotli",
                 GPTQ_CALIB_SEQS=str(64 * BATCH_SEQS), GPTQ_RESERVE_MEASURE="0", GPTQ_RESERVE_SECONDS="12", TTT="0"),
        missing=["its TTT: score-first SGD on the whole model, 3 epochs per 32K-token chunk (ours: per-document "
                 "LoRA + phased global SGD); predicted here by the formula of public_sgd_ttt_seconds"]),
    "2026-04-27": dict(
        code_class="fused",
        env=dict(PRESET="april", DOC_MASKED_ATTENTION="1", MLP_PROJ_INIT="zero", COMPRESSOR="pergroup",
                 GPTQ_CALIB_SEQS=str(16 * BATCH_SEQS), GPTQ_RESERVE_MEASURE="0", GPTQ_RESERVE_SECONDS="0.5"),
        missing=["CaseOps data (its val_tokens used here)", "fused Triton kernels (its own speed class)",
                 "lrzip per-group compression (ours: brotli per group)", "no sliding pass in its evaluation"]),
    "pr2135": dict(
        code_class="fused",
        env=dict(PRESET="april", DOC_MASKED_ATTENTION="1", MLP_PROJ_INIT="zero", COMPRESSOR="pergroup",
                 MATRIX_LR="0.028", MATRIX_LR_LATE="0.028", EVAL_SEQ_LEN="2560", TTT_EVAL_SEQ_LEN="2560",
                 PHASED_TTT_NUM_PHASES="1", LQER_GROUP="32", TTT_LORA_LR="8e-5", TTT_WEIGHT_DECAY="2.0",
                 GPTQ_CALIB_SEQS=str(32 * BATCH_SEQS), GPTQ_RESERVE_MEASURE="0", GPTQ_RESERVE_SECONDS="0.5"),
        missing=["CaseOps data (its val_tokens used here)", "AsymLogit (8 bytes)", "no LoRA on K in TTT",
                 "the n-gram tilt's hint precompute inside the evaluation timer (its logged 197-201 s are taken out "
                 "of its TTT time, not predicted)", "fused Triton kernels (its own speed class)",
                 "lrzip per-group compression"]),
    "pr2014": dict(
        code_class="fused",
        seq_schedule="1024@0.1,2048@0.7,3072@1.0",
        env=dict(PRESET="april", DOC_MASKED_ATTENTION="1", MLP_PROJ_INIT="zero", COMPRESSOR="pergroup",
                 TRAIN_SEQ_LEN="3072", EVAL_SEQ_LEN="3072", EVAL_STRIDE="1536", TTT_EVAL_SEQ_LEN="3072",
                 TTT_BATCH_SIZE="24", PHASED_TTT_NUM_PHASES="1", GPTQ_CALIB_SEQS=str(16 * 786_432 // 3072),
                 GPTQ_RESERVE_MEASURE="0", GPTQ_RESERVE_SECONDS="4"),
        missing=["TRAIN_SEQ_SCHEDULE (planned by scripts/plan.py, not in train_gpt.py yet) and its LR re-warm-up "
                 "after each switch", "TTT chunks of 24 for documents under 2000 tokens, no LoRA on Q and V, "
                 "LoRA LR x 0.75", "AWQ-lite (int8 groups inside GPTQ)", "CaseOps data (its val_tokens used here)",
                 "AsymLogit", "fused Triton kernels (its own speed class)", "lrzip per-group compression"]),
}
# Which logged facts each constant is fitted on (run, fact); every other comparison in the table is held out.
FITS = {
    "TRAIN_MFU[compiled]": [("2026-03-29", "segment 0")],
    "TRAIN_MFU[fused]": [("2026-04-27", "segment 0")],
    "WINDOW_TFLOPS": [("2026-03-29", "sliding_eval_s")],
    "PLAIN_TFLOPS": [("2026-03-29", "roundtrip_eval_s")],
    "SGD_STEP_S": [("2026-04-27", "global_sgd_s")],
    "CALIB_FIXED_S, CALIB_TFLOPS": [("2026-04-27", "hessian_s"), ("pr2135", "hessian_s")],
    "ARTIFACT_RATIO[percentile]": [("2026-03-29", "bytes_model")],
    "ARTIFACT_RATIO[sdclip]": [("2026-04-27", "bytes_model")],
    "TTT_COMPILE_S": [("2026-04-27", "ttt_compile_s"), ("pr2135", "ttt_compile_s")],
}


def fitted_on(run_id: str, fact: str) -> bool:
    return any((run_id, fact) in facts for facts in FITS.values())


def load_public() -> dict:
    return json.loads(pr.PUBLIC_DATA.read_text(encoding="utf-8"))


def mean_fact(run: dict, name: str) -> float | None:
    values = [s["facts"][name] for s in run["seeds"].values() if name in s["facts"]]
    return float(np.mean(values)) if values else None


def fact_range(run: dict, name: str) -> tuple[float, float] | None:
    values = [s["facts"][name] for s in run["seeds"].values() if name in s["facts"]]
    return (min(values), max(values)) if values else None


def hparams(run_id: str) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env(PUBLIC_AS_OURS[run_id]["env"])


def seq_schedule(run_id: str) -> str:
    return PUBLIC_AS_OURS[run_id].get("seq_schedule", "")


def logged_segments(run: dict) -> dict[tuple[float, float], list[float]]:
    """(start share, end share) -> each seed's ms per step in that share of the budget."""
    out = {}
    for s in run["seeds"].values():
        for a, b, ms in s["facts"]["segments"]:
            out.setdefault((round(a, 3), round(b, 3)), []).append(ms)
    return out


def public_ttt_lora_seconds(cfg: tg.ModelConfig, s: tg.TTTSettings, spans: np.ndarray) -> float:
    """The LoRA part of the public records' phased TTT on 8 x H100: their loop (every row to the end, the head on
    every column: train_gpt.ttt_batch_flops(public_loop=True)) over batches of TTT_BATCH_SIZE documents of
    similar length, claimed by the ranks from one queue (so the work divides evenly), at TTT_H100_TFLOPS. Their
    global SGD learns from documents picked by their queue's order (not the stream's), so its steps are taken
    from their logs rather than predicted."""
    targets = np.sort(spans[:, 1] - spans[:, 0])
    lora = sum(tg.ttt_batch_flops(cfg, s, targets[i:i + s.ttt_batch_size], public_loop=True)
               for i in range(0, len(targets), s.ttt_batch_size))
    return lora / pr.WORLD / (tg.TTT_H100_TFLOPS * 1e12)


def public_sgd_ttt_seconds(h: tg.Hyperparameters, val_tokens: int, epochs: int, chunk_tokens: int) -> float:
    """The 2026-04-09 record's TTT: each chunk of chunk_tokens scored by sliding windows, then `epochs` SGD steps on
    the whole model over it (but the last chunk): a sliding pass plus (chunks - 1) x epochs steps at SGD_STEP_S
    (each step learns from chunk_tokens / 8 tokens per GPU: latency, as in the phased TTT's SGD)."""
    score = pr.window_seconds(tg.ModelConfig.from_hparams(h), val_tokens, tg.EvalSpec.sliding(h))
    return score + (-(-val_tokens // chunk_tokens) - 1) * epochs * pr.SGD_STEP_S


@dataclasses.dataclass
class Row:
    run: str
    quantity: str
    predicted: float
    logged: tuple[float, float] | None  # (min, max) over the seeds
    fitted: bool = False
    note: str = ""

    def error(self) -> float | None:
        if self.logged is None:
            return None
        mid = (self.logged[0] + self.logged[1]) / 2
        return (self.predicted - mid) / mid


def run_rows(run_id: str, data: dict) -> tuple[list[Row], dict]:
    """Predicted against logged for one public run; also the raw numbers the fits need."""
    run = data["runs"][run_id]
    spec = PUBLIC_AS_OURS[run_id]
    h = hparams(run_id)
    torch.manual_seed(h.seed)
    model = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    mfu = pr.TRAIN_MFU[spec["code_class"]]
    budget = mean_fact(run, "train_time_ms") / 1000
    rows, raw = [], {"model": model, "h": h}
    fit = functools.partial(fitted_on, run_id)
    # Training: step time per segment, steps in the logged training time.
    val_tokens = int(mean_fact(run, "val_tokens"))
    spans = pr.synthetic_spans(val_tokens)
    train = pr.train_plan(model, dataclasses.replace(h, max_wallclock_seconds=budget), 0.0, mfu, seq_schedule(run_id),
                          spans)
    raw["flops_tokens"] = [(s.flops_per_token * pr.tokens_per_gpu(h), s.repeats_on) for s in train.segments]
    logged = logged_segments(run)
    for i, s in enumerate(train.segments):
        ms = logged[(round(s.start, 3), round(s.end, 3))]
        rows.append(Row(run_id, f"ms/step {s.start:.2f}-{s.end:.2f}", s.ms_per_step, (min(ms), max(ms)),
                        fit(f"segment {i}"), note=f"loop {'on' if s.repeats_on else 'off'}, seq {s.seq_len}, "
                                                  f"attention T {s.attention_context:.0f}"))
    rows.append(Row(run_id, "steps", train.steps, fact_range(run, "steps"), note=f"in {budget:.1f} s"))
    # Artifact: the trained-model bytes from the estimate at init, plus the run's own code bytes.
    code = int(mean_fact(run, "bytes_code"))
    art = pr.artifact_plan(model, h, code)
    raw["estimate_init"], raw["lqer"] = art.estimate_init, art.lqer_bytes
    rows.append(Row(run_id, "bytes_model", art.bytes_model, fact_range(run, "bytes_model"), fit("bytes_model"),
                    note=f"init estimate {art.estimate_init:,} x {art.ratio:.4f} + LQER {art.lqer_bytes:,}"))
    # Memory: ours (materialized fp32 logits) against the logged peak.
    mem = pr.memory_plan(model, h, train.segments)
    peak = fact_range(run, "peak_alloc_mib")
    rows.append(Row(run_id, "peak GiB", mem.peak_gib, peak and (peak[0] / 1024, peak[1] / 1024),
                    note="our code's activations" + ("; its fused CE keeps no fp32 logits"
                                                      if spec["code_class"] == "fused" else "")))
    # Calibration: Hessians over its batches.
    cal = pr.calibration_plan(model, h)
    tokens = h.gptq_calib_seqs * h.train_seq_len / pr.WORLD
    raw["calib_flops"] = tokens * (pr.forward_flops_per_token(model.cfg, h.train_seq_len)
                                   + pr.hessian_flops_per_token(model))
    rows.append(Row(run_id, "hessian s", cal.hessian_s, fact_range(run, "hessian_s"), fit("hessian_s"),
                    note=f"{h.gptq_calib_seqs * h.train_seq_len // 786_432} batches"))
    # Evaluation, phase by phase, on its own validation tokens and synthetic documents.
    cfg = model.cfg
    raw["sliding_at_1tf"] = tg.predict_window_eval_seconds(cfg, val_tokens, tg.EvalSpec.sliding(h), pr.WORLD, 1.0)
    raw["plain_at_1tf"] = tg.predict_window_eval_seconds(cfg, val_tokens, tg.EvalSpec.plain(h), pr.WORLD, 1.0)
    roundtrip = pr.window_seconds(cfg, val_tokens, tg.EvalSpec.plain(h))
    rows.append(Row(run_id, "roundtrip s", roundtrip, fact_range(run, "roundtrip_eval_s"), fit("roundtrip_eval_s"),
                    note="" if run_id == "2026-03-29" else "its graph compiled here, not in training: + compile"))
    if "sliding_eval_s" in run["seeds"][next(iter(run["seeds"]))]["facts"]:
        rows.append(Row(run_id, "sliding s", pr.window_seconds(cfg, val_tokens, tg.EvalSpec.sliding(h)),
                        fact_range(run, "sliding_eval_s"), fit("sliding_eval_s")))
    if run_id == "2026-04-09":
        c = run["config"]
        rows.append(Row(run_id, "ttt s", public_sgd_ttt_seconds(h, val_tokens, int(c["ttt_epochs"]), int(c["ttt_chunk_tokens"])),
                        fact_range(run, "ttt_eval_s"), note="its chunked SGD TTT (not ours): sliding + steps x SGD_STEP_S"))
    elif h.ttt:
        precompute = fact_range(run, "ngram_precompute_s")  # ran first, inside the same timer
        note = "their loop"
        seeds = run["seeds"].values()
        lora_only = [s["facts"]["ttt_eval_s"] - s["facts"].get("global_sgd_s", 0.0)
                     - s["facts"].get("ngram_precompute_s", 0.0) for s in seeds]
        note += "; logged: its TTT time less its global SGD's" + (" and n-gram precompute's" if precompute else "")
        rows.append(Row(run_id, "ttt LoRA s", public_ttt_lora_seconds(cfg, h, spans),
                        (min(lora_only), max(lora_only)), note=note))
        per_step = [s["facts"]["global_sgd_s"] / s["facts"]["global_sgd_steps"] for s in seeds]
        rows.append(Row(run_id, "global SGD s/step", pr.SGD_STEP_S, (min(per_step), max(per_step)),
                        fit("global_sgd_s"), note=f"{int(mean_fact(run, 'global_sgd_steps'))} steps logged"))
        rows.append(Row(run_id, "ttt compile s", pr.TTT_COMPILE_S, fact_range(run, "ttt_compile_s"),
                        fit("ttt_compile_s")))
    return rows, raw


def fit_constants(data: dict, raws: dict[str, dict]) -> dict[str, float]:
    """The constants of lab/predict.py, refitted (FITS says on what)."""
    runs = data["runs"]
    out = {}
    for name, run_id in (("compiled", "2026-03-29"), ("fused", "2026-04-27")):
        f, _ = raws[run_id]["flops_tokens"][0]  # the first segment (before any loop; the documents' attention)
        out[f"TRAIN_MFU[{name}]"] = float(np.mean([f / (s["facts"]["segments"][0][2] / 1000) / pr.PEAK_FLOPS
                                                   for s in runs[run_id]["seeds"].values()]))
    out["WINDOW_TFLOPS"] = raws["2026-03-29"]["sliding_at_1tf"] / mean_fact(runs["2026-03-29"], "sliding_eval_s")
    out["PLAIN_TFLOPS"] = raws["2026-03-29"]["plain_at_1tf"] / mean_fact(runs["2026-03-29"], "roundtrip_eval_s")
    out["SGD_STEP_S"] = mean_fact(runs["2026-04-27"], "global_sgd_s") / mean_fact(runs["2026-04-27"], "global_sgd_steps")
    f16, f32 = raws["2026-04-27"]["calib_flops"], raws["pr2135"]["calib_flops"]
    t16, t32 = mean_fact(runs["2026-04-27"], "hessian_s"), mean_fact(runs["pr2135"], "hessian_s")
    rate = (f32 - f16) / (t32 - t16)
    out["CALIB_TFLOPS"] = rate / 1e12
    out["CALIB_FIXED_S"] = t16 - f16 / rate
    for run_id, name in (("2026-03-29", "percentile"), ("2026-04-27", "sdclip")):
        raw = raws[run_id]
        out[f"ARTIFACT_RATIO[{name}]"] = (mean_fact(runs[run_id], "bytes_model") - raw["lqer"]) / raw["estimate_init"]
    compiles = [s["facts"]["ttt_compile_s"] for r in ("2026-04-27", "pr2135") for s in runs[r]["seeds"].values()]
    out["TTT_COMPILE_S"] = float(np.mean(compiles))
    return out


def stored_constants() -> dict[str, float]:
    return {"TRAIN_MFU[compiled]": pr.TRAIN_MFU["compiled"], "TRAIN_MFU[fused]": pr.TRAIN_MFU["fused"],
            "WINDOW_TFLOPS": pr.WINDOW_TFLOPS, "PLAIN_TFLOPS": pr.PLAIN_TFLOPS, "SGD_STEP_S": pr.SGD_STEP_S, "CALIB_TFLOPS": pr.CALIB_TFLOPS, "CALIB_FIXED_S": pr.CALIB_FIXED_S,
            "ARTIFACT_RATIO[percentile]": pr.ARTIFACT_RATIO["percentile"],
            "ARTIFACT_RATIO[sdclip]": pr.ARTIFACT_RATIO["sdclip"], "TTT_COMPILE_S": pr.TTT_COMPILE_S}


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def markdown(rows: list[Row]) -> str:
    out = ["| run | quantity | predicted | logged (seeds) | error | fitted? | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        logged = "-" if r.logged is None else fmt(r.logged[0]) if r.logged[0] == r.logged[1] else \
            f"{fmt(r.logged[0])} - {fmt(r.logged[1])}"
        err = r.error()
        out.append(f"| {r.run} | {r.quantity} | {fmt(r.predicted)} | {logged} | "
                   f"{'-' if err is None else f'{100 * err:+.1f}%'} | {'fitted' if r.fitted else 'held out'} | {r.note} |")
    return "\n".join(out)


def main() -> None:
    torch.set_num_threads(1)
    data = load_public()
    rows, raws = [], {}
    for run_id in PUBLIC_AS_OURS:
        r, raws[run_id] = run_rows(run_id, data)
        rows += r
    print(markdown(rows))
    print()
    fitted, stored = fit_constants(data, raws), stored_constants()
    for name, value in fitted.items():
        print(f"{name}: fitted {value:.4g} stored {stored[name]:.4g}")
    for run_id, spec in PUBLIC_AS_OURS.items():
        print(f"{run_id}: missing: {'; '.join(spec['missing'])}")


if __name__ == "__main__":
    main()
