"""Predict a whole 8 x H100 run from its settings, on a CPU: step time and the steps that fit, peak memory per
GPU, artifact bytes of the trained model, the GPTQ calibration reserve, and the evaluation's time. The model
behind scripts/plan.py (docs/plan.md), fitted to the public runs (lab/public_runs.json; lab/calibrate_plan.py
refits every constant below and prints the table of docs/plan.md).

What it reuses rather than restates: train_gpt.py's settings, model builder, byte estimate
(estimate_model_bytes), code size (code_form), TTT and window-evaluation FLOP counts and time predictions
(predict_ttt_seconds, predict_window_eval_seconds, ttt_step_flops), and lab/benchmark.py's training FLOPs
per token, optimizer state per GPU and GPTQ column count.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from lab import benchmark as bm  # noqa: E402

WORLD = tg.PREDICTION_WORLD_SIZE  # 8 x H100
PEAK_FLOPS = bm.H100_BF16_FLOPS  # dense bf16 per GPU
H100_MEMORY_GIB = 79.6  # an H100 80GB HBM3 as nvidia-smi reports it (81,559 MiB)
GIB = 2**30

# ---- Fitted on the public runs (docs/plan.md, "Fitted, held out, assumed"); lab/calibrate_plan.py refits them ----
# Achieved share of the bf16 peak in training (step time = training FLOPs of the step / (share x peak)), per
# class of code: "compiled" is plain PyTorch under torch.compile with FlashAttention 3 (the 2026-03-29 record,
# fitted on its mean step; the 2026-04-09 record is the held-out check) and the class train_gpt.py belongs to;
# "fused" adds the April records' Triton kernels (fused softcapped cross-entropy, varlen attention, whose FLOPs
# attention_context counts per document), fitted on the 2026-04-27 record's steps before its loop starts (its
# later steps, PR #2135 and PR #2014 are held out).
TRAIN_MFU = {"compiled": 0.3386, "fused": 0.3005}
OUR_CODE_CLASS = "compiled"
# Forward-only window passes (train_gpt.ttt_step_flops' count, the head on every column): effective TFLOP/s per
# GPU of the sliding window (overlapping windows) and of the plain pass (the round trip's), both fitted on the
# 2026-03-29 record (its plain pass ran with its graph compiled during training, as ours does).
WINDOW_TFLOPS, PLAIN_TFLOPS = 241.0, 91.9
# One step of the TTT's global SGD: a few sequences per GPU, so latency (an all-reduce per parameter, the
# optimizer) rather than FLOPs sets its time: seconds per step, fitted on the 2026-04-27 record's `tttg` lines.
SGD_STEP_S = 0.113
# GPTQ calibration (Hessians of every quantized weight over GPTQ_CALIB_SEQS training sequences): seconds =
# fixed + (forward + X^T X FLOPs per GPU) / rate, fitted on the 2026-04-27 record (16 batches) and PR #2135
# (32 batches of the same code).
CALIB_FIXED_S, CALIB_TFLOPS = 2.57, 239.4
# Compressed model bytes of the trained model / estimate_model_bytes of the initial weights, per clip rule:
# "percentile" fitted on the 2026-03-29 record, "sdclip" on the 2026-04-27 record (04-09 and #2135 held out).
ARTIFACT_RATIO = {"percentile": 0.8628, "sdclip": 0.9896, "sdclip_hessian": 0.9896}
ARTIFACT_ERROR = 0.019  # the largest held-out error of the bytes in docs/plan.md's table (2026-04-09: -1.9%)
# The TTT step's compile warm-up: the public phased-TTT runs' `ttt_lora:compile warmup done` (2026-04-27 and
# PR #2135, six seeds; 83.7-137.6 s), their mean. train_gpt.py counts its own in the evaluation time.
TTT_COMPILE_S = 98.0
# ---- Assumed, not fitted: nothing public measures them alone (docs/plan.md says how to measure them) -------
# A new shape of the compiled evaluation model costs a recompile inside the evaluation time: the public
# round-trip passes of one code and one amount of work took 8.7-25.5 s (2026-04-09) and 10.6-50.0 s (04-27).
EVAL_COMPILE_S = 15.0
GPTQ_COLUMN_STEP_S = 50e-6  # one step of a batched GPTQ column loop (a handful of small kernels)
# Saved activations per token (bytes), from lab/benchmark.py's traced joint graph (min-cut partition, as
# torch.compile saves) on the configurations of lab/fit_memory.py (7 features, 7 distinct shallow models), by
# least squares; held out, the full seed and April models' traces: 25.06 GiB (formula 25.06) and 47.15 GiB
# (46.99) at 48 x 2048 tokens. "vocab" is mostly the fp32 logits of the loss (8 bytes a logit).
ACTIVATION_BYTES = {"pass_d": 28.664, "pass_kv": -0.874, "pass_mlp": 4.045, "lanes_d": 3.374, "xsa_kv": 11.744,
                    "vocab": 7.973, "embed_d": 10.088}

# Validation tokens where the data is not on this machine (the public logs' val_tokens): the challenge's split
# tokenized at sp1024 (2026-03-29) and sp8192 (2026-04-09). 50,000 documents at any vocabulary.
VAL_TOKENS = {1024: 62_021_632, 8192: 40_540_160}
VAL_DOCUMENTS = 50_000
PUBLIC_DATA = ROOT / "lab" / "public_runs.json"


class PlanError(ValueError):
    """A setting the plan cannot predict (the message says which and what to give instead)."""


# ---- training: segments of the run, step time, steps ------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A share of the training budget with one step shape: the mini recurrence on or off, one sequence length."""
    start: float  # share of the budget where it starts
    end: float
    repeats_on: bool
    seq_len: int
    attention_context: float = 0.0  # the T of the attention FLOPs (attention_context)
    flops_per_token: float = 0.0
    ms_per_step: float = 0.0

    @property
    def share(self) -> float:
        return self.end - self.start


def parse_seq_schedule(text: str, seq_len: int) -> list[tuple[float, int]]:
    """TRAIN_SEQ_SCHEDULE, in the form PR #2014 introduced (not a train_gpt.py setting yet: planned here first):
    "LEN@UNTIL,LEN@UNTIL,...", each sequence length until that share of the training budget, e.g.
    "1024@0.1,2048@0.7,3072@1.0" (the shares rising, the last 1.0; the batch in tokens unchanged). Returns
    [(share where each length starts, length)]; empty text: TRAIN_SEQ_LEN throughout."""
    if not text.strip():
        return [(0.0, seq_len)]
    try:
        stages = [(int(n), float(f)) for n, f in (part.split("@") for part in text.split(","))]
    except ValueError:
        raise PlanError(f"TRAIN_SEQ_SCHEDULE={text!r} is invalid: expected LEN@UNTIL,LEN@UNTIL,... "
                        f"(e.g. 1024@0.1,2048@0.7,3072@1.0)") from None
    ends = [f for _, f in stages]
    if any(not 0 < f <= 1 for f in ends) or any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != 1.0:
        raise PlanError(f"TRAIN_SEQ_SCHEDULE={text!r}: the shares must rise in (0, 1] and the last be 1.0")
    if any(n < 2 for n, _ in stages):
        raise PlanError(f"TRAIN_SEQ_SCHEDULE={text!r}: every length must be at least 2")
    return [(start, n) for start, (n, _) in zip([0.0, *ends[:-1]], stages)]


def segments(h: tg.Hyperparameters, seq_schedule: str = "") -> list[Segment]:
    """The run cut where its step shape changes: the mini recurrence's start (MINI_RECUR_START_FRAC, as
    tg.Schedule switches it) and each sequence length's start."""
    cuts = {0.0, 1.0}
    loop_start = h.mini_recur_start_frac if h.mini_recur_repeats else None
    if loop_start:
        cuts.add(loop_start)
    schedule = parse_seq_schedule(seq_schedule, h.train_seq_len)
    cuts |= {f for f, _ in schedule}
    edges = sorted(cuts)
    out = []
    for a, b in zip(edges, edges[1:]):
        length = [n for f, n in schedule if f <= a][-1]
        on = bool(h.mini_recur_repeats) and (loop_start is None or a >= loop_start)
        out.append(Segment(a, b, on, length))
    return out


def attention_context(seq_len: int, spans: np.ndarray | None, sample_tokens: int = 4_000_000) -> float:
    """The T of the FLOP count's attention term (12 x passes x T x width per token, the causal half not taken
    off). Without document masking every query attends to its whole window: T = seq_len. With it (FlashAttention
    varlen: DOC_MASKED_ATTENTION=1), a query attends only to its document's earlier tokens in its row, so
    T = twice the mean keys per token over rows of seq_len cut from the stream of these documents (the first
    sample_tokens of it), which equals seq_len for documents longer than every row."""
    if spans is None:
        return float(seq_len)
    lengths = spans[:, 1] - spans[:, 0]
    n = int(np.searchsorted(np.cumsum(lengths), sample_tokens)) + 1
    lengths = lengths[:n]
    pos = np.arange(int(lengths.sum()))
    in_doc = pos - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keys = np.minimum(in_doc, pos % seq_len) + 1
    return float(2 * keys.mean())


def flops_per_token(model: tg.GPT, repeats_on: bool, seq_len: float) -> float:
    """Training FLOPs per token (lab/benchmark.py's formula) of the model's plan in that state; seq_len is the
    attention term's T (attention_context)."""
    saved = model.plan
    model.set_mini_recurrence(repeats_on)
    try:
        return bm.flops_per_token(model, seq_len)
    finally:
        model.plan = saved


def tokens_per_gpu(h: tg.Hyperparameters) -> int:
    return h.train_batch_tokens // WORLD


@dataclass(frozen=True)
class TrainPlan:
    segments: list[Segment]
    budget_s: float  # MAX_WALLCLOCK_SECONDS minus the GPTQ reserve (0: no cap)
    steps: int
    train_s: float
    limited_by: str  # "wallclock" or "iterations"


def train_plan(model: tg.GPT, h: tg.Hyperparameters, reserve_s: float, mfu: float, seq_schedule: str = "",
               spans: np.ndarray | None = None) -> TrainPlan:
    """Step time of each segment (its FLOPs at `mfu` of the peak) and the steps that fit the budget. spans: the
    documents' lengths (the validation split's stand in for the training data's) where attention is masked to
    the document (DOC_MASKED_ATTENTION=1); ignored otherwise."""
    segs = []
    for s in segments(h, seq_schedule):
        t = attention_context(s.seq_len, spans if h.doc_masked_attention else None)
        f = flops_per_token(model, s.repeats_on, t)
        segs.append(dataclasses.replace(s, attention_context=t, flops_per_token=f,
                                        ms_per_step=1000 * f * tokens_per_gpu(h) / (mfu * PEAK_FLOPS)))
    budget = h.max_wallclock_seconds - reserve_s if h.max_wallclock_seconds > 0 else 0.0
    if budget > 0:
        steps = sum(s.share * budget * 1000 / s.ms_per_step for s in segs)
        if steps <= h.iterations:
            return TrainPlan(segs, budget, int(steps), budget, "wallclock")
    # Step-limited: progress is the share of ITERATIONS, so each segment holds its share of the steps.
    steps = h.iterations
    seconds = sum(s.share * steps * s.ms_per_step / 1000 for s in segs)
    return TrainPlan(segs, budget, steps, seconds, "iterations")


# ---- memory per GPU ----------------------------------------------------------------------------------------


def activation_features(model: tg.GPT, repeats_on: bool) -> dict[str, float]:
    """Per-token features of the activations a training step saves for its backward (see ACTIVATION_BYTES)."""
    cfg = model.cfg
    saved = model.plan
    model.set_mini_recurrence(repeats_on)
    plan = model.plan
    model.plan = saved
    d = cfg.model_dim
    kv = cfg.num_kv_heads * (d // cfg.num_heads)
    return {"pass_d": len(plan) * d, "pass_kv": len(plan) * kv, "pass_mlp": len(plan) * cfg.mlp_mult * d,
            "lanes_d": sum(p.lanes >= 0 for p in plan) * d, "xsa_kv": sum(p.xsa for p in plan) * kv,
            "vocab": cfg.vocab_size, "embed_d": d}


def activation_bytes(model: tg.GPT, repeats_on: bool, tokens: int) -> float:
    feats = activation_features(model, repeats_on)
    return tokens * sum(ACTIVATION_BYTES[k] * v for k, v in feats.items())


@dataclass(frozen=True)
class MemoryPlan:
    state_gib: float  # weights, gradients, optimizer state, Muon buffers, EMA (lab/benchmark.py)
    activation_gib: float  # the largest segment's saved activations
    peak_gib: float


def memory_plan(model: tg.GPT, h: tg.Hyperparameters, segs: list[Segment]) -> MemoryPlan:
    state = bm.state_bytes(model, h, WORLD)
    act = max(activation_bytes(model, s.repeats_on, tokens_per_gpu(h)) for s in segs)
    return MemoryPlan(state / GIB, act / GIB, (state + act) / GIB)


# ---- artifact ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactPlan:
    estimate_init: int  # estimate_model_bytes of the initial weights (the run's start-up `artifact_estimate`)
    ratio: float  # trained / initial, for this clip rule
    lqer_bytes: int
    bytes_model: int  # predicted for the trained model
    bytes_code: int
    bytes_total: int


def lqer_bytes(model: tg.GPT, plan: dict[str, int], h: tg.Hyperparameters) -> int:
    """LQER's factors, as add_lqer counts them (order-0 entropy at full use of the levels + fp16 scales), on the
    LQER_TOP largest quantized tensors (which ones it corrects depends on the trained errors; the largest
    is the likely choice and the count differs little between them)."""
    if h.lqer_top == 0:
        return 0
    state = model.state_dict()
    names = sorted((n for n, b in plan.items() if b != tg.FP16_BITS and state[n].dim() == 2),
                   key=lambda n: state[n].numel(), reverse=True)[:h.lqer_top]
    total = 0.0
    for n in names:
        rows, cols = state[n].shape
        r = min(h.lqer_rank, rows, cols)
        b_values = r * cols
        total += rows * r * h.lqer_a_bits / 8 + 2 + b_values * h.lqer_b_bits / 8 + 2 * math.ceil(b_values / h.lqer_group)
    return int(total)


def artifact_plan(model: tg.GPT, h: tg.Hyperparameters, bytes_code: int, ratio: float | None = None) -> ArtifactPlan:
    state = model.state_dict()
    plan = tg.plan_from_hparams(state, h, model.fp16_param_names())
    estimate = tg.estimate_model_bytes(state, plan, h)
    ratio = ARTIFACT_RATIO[h.clip_method] if ratio is None else ratio
    extra = lqer_bytes(model, plan, h)
    predicted = int(ratio * estimate) + extra
    return ArtifactPlan(estimate, ratio, extra, predicted, bytes_code, predicted + bytes_code)


def shipped_code_bytes() -> int:
    """The compact wrapper's size of this train_gpt.py: what a record ships and the cap counts."""
    return tg.code_form((ROOT / "train_gpt.py").read_text(encoding="utf-8")).bytes_code


# ---- GPTQ calibration reserve --------------------------------------------------------------------------------


def forward_flops_per_token(cfg: tg.ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a full window (train_gpt.ttt_step_flops' count, the head on every column)."""
    return sum(tg.ttt_step_flops(cfg, 0, 1, seq_len, seq_len, "none")) / seq_len


def hessian_flops_per_token(model: tg.GPT) -> float:
    """X^T X per token, every pass: 2 x cols^2 per Hessian site a pass runs (a repeated block's sites fire per
    pass; the tied head's once)."""
    per_block = {}
    for i, block in enumerate(model.blocks):
        per_block[i] = sum(2 * m.weight.size(1) ** 2 for m in block.modules() if isinstance(m, torch.nn.Linear))
    extra = sum(2 * m.weight.size(1) ** 2 for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and not name.startswith("blocks."))
    return sum(per_block[p.block] for p in model.plan) + extra + 2 * model.cfg.model_dim ** 2


@dataclass(frozen=True)
class CalibrationPlan:
    hessian_s: float
    quantize_s: float
    measured_s: float  # what the warm-up would measure: calibration + GPTQ
    reserve_s: float  # what the run reserves: 1.5 x measured + 1 s (GPTQ_RESERVE_MEASURE=1) or the fixed value
    measured_reserve: bool


def calibration_plan(model: tg.GPT, h: tg.Hyperparameters) -> CalibrationPlan:
    if not tg.calibrates(h):
        return CalibrationPlan(0.0, 0.0, 0.0, h.gptq_reserve_seconds, False)
    tokens = h.gptq_calib_seqs * h.train_seq_len / WORLD
    flops = tokens * (forward_flops_per_token(model.cfg, h.train_seq_len) + hessian_flops_per_token(model))
    hessian = CALIB_FIXED_S + flops / (CALIB_TFLOPS * 1e12)
    quantize = bm.gptq_column_steps(model, h, WORLD) * GPTQ_COLUMN_STEP_S if h.gptq else 0.0
    measured = hessian + quantize
    if h.gptq_reserve_measure and h.max_wallclock_seconds > 0:
        reserve = tg.GPTQ_RESERVE_MARGIN * measured + tg.GPTQ_RESERVE_SLACK_SECONDS
        return CalibrationPlan(hessian, quantize, measured, reserve, True)
    return CalibrationPlan(hessian, quantize, measured, h.gptq_reserve_seconds, False)


# ---- evaluation ------------------------------------------------------------------------------------------------


def synthetic_spans(num_tokens: int, documents: int = VAL_DOCUMENTS, seed: int = 0) -> np.ndarray:
    """Document spans like the validation split's, without its data: the public rebuilt lengths (stored points,
    lab/public_runs.json) scaled to num_tokens, in a seeded stream order."""
    import json
    points = json.loads(PUBLIC_DATA.read_text())["val_documents"]
    ranks = np.asarray(points["ranks"]) * (documents - 1) / (points["documents"] - 1)
    lengths = np.interp(np.arange(documents), ranks, np.asarray(points["lengths"], dtype=float))
    lengths = np.maximum(2, np.rint(lengths * num_tokens / lengths.sum())).astype(np.int64)
    lengths = lengths[np.random.default_rng(seed).permutation(documents)]
    ends = np.cumsum(lengths)
    return np.stack((ends - lengths, ends), axis=1)


def validation(h: tg.Hyperparameters, val_tokens: int | None = None) -> tuple[int, np.ndarray, str]:
    """(tokens, document spans, where they come from): DATA_PATH's validation shards when present (exact),
    else VAL_TOKENS for the vocabulary (or val_tokens) with synthetic_spans."""
    if val_tokens is None:
        with contextlib.suppress(FileNotFoundError, tg.DataError, OSError):
            tokens = tg.load_validation_tokens(h.data_path)
            return len(tokens), tg.document_spans(tokens, h.bos_id), f"data:{h.data_path}"
        if h.vocab_size not in VAL_TOKENS:
            raise PlanError(f"no validation data at DATA_PATH={h.data_path} and no known token count for "
                            f"VOCAB_SIZE={h.vocab_size}: give --val-tokens")
        val_tokens = VAL_TOKENS[h.vocab_size]
        where = f"public_count_sp{h.vocab_size}"
    else:
        where = "given"
    return val_tokens, synthetic_spans(val_tokens), where + "+synthetic_documents"


def window_seconds(cfg: tg.ModelConfig, num_tokens: int, spec: tg.EvalSpec) -> float:
    """A window pass: the sliding window's at WINDOW_TFLOPS, a plain (non-overlapping) one's at PLAIN_TFLOPS."""
    rate = PLAIN_TFLOPS if spec.stride == spec.seq_len else WINDOW_TFLOPS
    return tg.predict_window_eval_seconds(cfg, num_tokens, spec, WORLD, rate)


def sgd_steps(prefix_tokens: int, s: tg.TTTSettings) -> int:
    """Steps of one global SGD phase of train_gpt.global_sgd over the scored prefix."""
    seqs = prefix_tokens // s.ttt_eval_seq_len
    return s.global_ttt_epochs * -(-seqs // max(1, s.global_ttt_chunk_tokens // s.ttt_eval_seq_len))


def ttt_seconds(cfg: tg.ModelConfig, spans: np.ndarray, s: tg.TTTSettings) -> tuple[float, float, int]:
    """(seconds, FLOPs, global SGD steps) of train_gpt.py's TTT pass on 8 x H100: train_gpt.predict_ttt_seconds'
    count (each phase as long as its busiest rank, at TTT_H100_TFLOPS), except that a global SGD phase takes at
    least SGD_STEP_S a step."""
    lora, sgd = tg.ttt_flops(cfg, spans, s, WORLD)
    rate = tg.TTT_H100_TFLOPS * 1e12
    seconds, steps = sum(max(ranks) for ranks in lora) / rate, 0
    for (lo, hi, after), flops in zip(tg.ttt_phases(len(spans), s), sgd):
        if after:
            n = sgd_steps(int(spans[hi - 1, 1]), s)
            seconds += max(flops / WORLD / rate, n * SGD_STEP_S)
            steps += n
    return seconds, sum(map(sum, lora)) + sum(sgd), steps


@dataclass(frozen=True)
class EvalPlan:
    roundtrip_s: float
    sliding_s: float
    ttt_s: float
    ttt_flops: float
    sgd_steps: int
    compile_s: float  # the evaluation graphs' recompiles and the TTT step's warm-up
    ngram_s: float  # n-gram hint precompute and tilt: not part of train_gpt.py's evaluation yet
    total_s: float
    val_tokens: int
    documents: int
    source: str


def eval_graphs(h: tg.Hyperparameters, num_tokens: int) -> int:
    """Shapes the compiled evaluation model meets after training (each one compiles; dynamic=False): the plain
    pass's full and last batches are known from the evaluation during training (VAL_LOSS_EVERY; the final
    float evaluation at least), the sliding pass's are new unless its windows and batch are the plain pass's."""
    plain, sliding = tg.EvalSpec.plain(h), tg.EvalSpec.sliding(h)
    if (sliding.seq_len, sliding.batch_windows) == (plain.seq_len, plain.batch_windows):
        return 0
    windows = 1 + max(0, -(-(num_tokens - 1 - sliding.seq_len) // sliding.stride))
    per_rank = -(-windows // WORLD)
    return 1 + (per_rank % sliding.batch_windows != 0)


def eval_plan(h: tg.Hyperparameters, tokens: int, spans: np.ndarray, source: str) -> EvalPlan:
    """The evaluation after training, on `tokens` validation tokens in documents `spans` (validation())."""
    cfg = tg.ModelConfig.from_hparams(h)
    roundtrip = window_seconds(cfg, tokens, tg.EvalSpec.plain(h))
    sliding = window_seconds(cfg, tokens, tg.EvalSpec.sliding(h))
    ttt = flops = 0.0
    steps = 0
    compile_s = EVAL_COMPILE_S * eval_graphs(h, tokens)
    if h.ttt:
        ttt, flops, steps = ttt_seconds(cfg, spans, h)
        compile_s += TTT_COMPILE_S
    total = roundtrip + sliding + ttt + compile_s
    return EvalPlan(roundtrip, sliding, float(ttt), float(flops), steps, compile_s, 0.0, float(total), tokens,
                    len(spans), source)


# ---- the whole plan and its verdicts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    limit: str
    fits: bool
    text: str


@dataclass(frozen=True)
class Plan:
    h: tg.Hyperparameters
    params: int
    passes: tuple[int, int]  # layer passes with the mini recurrence off / on
    mfu: float
    code_class: str
    seq_schedule: str
    train: TrainPlan
    memory: MemoryPlan
    artifact: ArtifactPlan
    calibration: CalibrationPlan
    evaluation: EvalPlan

    def verdicts(self) -> list[Verdict]:
        h, a, m, c, e = self.h, self.artifact, self.memory, self.calibration, self.evaluation
        target = h.quant_target_bytes or tg.ARTIFACT_CAP_BYTES - 1
        over_cap = a.bytes_total - (tg.ARTIFACT_CAP_BYTES - 1)
        band = int(ARTIFACT_ERROR * a.bytes_model)
        close = f"; the margin is within the prediction's error (about {band:,} bytes)" if abs(over_cap) < band else ""
        art = (f"fits: {-over_cap:,} bytes under the cap{close}" if over_cap <= 0 else
               f"over: {over_cap:,} bytes over the cap" + (
                   f" (QUANT_TARGET_BYTES={target} would demote tensors after training, at a bpb cost)"
                   if h.quant_target_bytes else " (QUANT_TARGET_BYTES=0: the run fails at export)") + close)
        mem = (f"{'fits' if m.peak_gib <= H100_MEMORY_GIB else 'over'}: {m.peak_gib:.1f} of {H100_MEMORY_GIB:g} GiB "
               f"({H100_MEMORY_GIB - m.peak_gib:+.1f} GiB)")
        if c.measured_reserve or c.measured_s == 0:
            cal_fits = True
            cal = f"fits: the run measures its reserve at warm-up ({c.reserve_s:.1f} s of the budget)"
        else:
            cal_fits = c.measured_s <= c.reserve_s
            cal = (f"{'fits' if cal_fits else 'over'}: {c.measured_s:.1f} s against GPTQ_RESERVE_SECONDS="
                   f"{c.reserve_s:g} ({c.reserve_s - c.measured_s:+.1f} s; past it, training data is read after "
                   f"the 600 s)")
        ev_fits = e.total_s <= tg.EVAL_CAP_SECONDS
        ev = (f"{'fits' if ev_fits else 'over'}: {e.total_s:.0f} of {tg.EVAL_CAP_SECONDS:.0f} s "
              f"({tg.EVAL_CAP_SECONDS - e.total_s:+.0f} s)")
        return [Verdict("artifact", over_cap <= 0, art), Verdict("memory", m.peak_gib <= H100_MEMORY_GIB, mem),
                Verdict("calibration", cal_fits, cal), Verdict("evaluation", ev_fits, ev)]


def make_plan(h: tg.Hyperparameters, seq_schedule: str = "", val_tokens: int | None = None,
              code_class: str = OUR_CODE_CLASS, bytes_code: int | None = None) -> Plan:
    """The plan of a run with these settings: the model built exactly as the run builds it (on the CPU)."""
    def documents_and_evaluation() -> tuple[np.ndarray, EvalPlan]:
        tokens, spans, source = validation(h, val_tokens)
        return spans, eval_plan(h, tokens, spans, source)

    # The evaluation (numpy and Python loops) in a thread, while this one builds the model and estimates its bytes
    # (torch kernels, which leave the interpreter free).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        evaluated = pool.submit(documents_and_evaluation)
        torch.manual_seed(h.seed)  # the run's initial weights (train_gpt.seed_everything), for the byte estimate
        model = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
        calibration = calibration_plan(model, h)
        artifact = artifact_plan(model, h, shipped_code_bytes() if bytes_code is None else bytes_code)
        spans, evaluation = evaluated.result()
    mfu = TRAIN_MFU[code_class]
    train = train_plan(model, h, calibration.reserve_s if h.max_wallclock_seconds > 0 else 0.0, mfu, seq_schedule,
                       spans)
    memory = memory_plan(model, h, train.segments)
    params = sum(p.numel() for p in model.parameters())
    passes = (len(model.plans[False]), len(model.plans[True]))
    return Plan(h, params, passes, mfu, code_class, seq_schedule, train, memory, artifact, calibration, evaluation)
