"""Calibrate train_gpt.py's TTT time prediction on a public record's measured TTT pass, then predict ours.

    python3 lab/ttt_calibrate.py LOG [LOG ...]

LOG: train logs of a public record with per-document LoRA TTT on 8 x H100 (for example the three logs of
records/track_10min_16mb/2026-04-10_VarLenAttn/logs/ in the challenge repository). Each log prints its
settings (`  key: value`), a `ttt_progress: batch N/M ... doc_len:A-B` line for the batches its rank 0
scored (batch N of M holds 64 documents, in order of length) and the pass's `eval_time`. From the batches
the logs show, the script rebuilds the length of every validation document (the batches no log shows are
interpolated from their neighbours), counts the pass's FLOPs with train_gpt.py's counter on that record's
architecture and schedule, and divides by the measured time: the effective TFLOP/s per GPU that
train_gpt.TTT_H100_TFLOPS holds. With it, it predicts the TTT pass of train_gpt.py's defaults on the
FineWeb validation split at sp1024 (the same documents, their lengths scaled to --tokens in all).
See docs/ttt.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

FINEWEB_VAL_TOKENS_SP1024 = 62_000_000  # the challenge's validation split at sp1024 (docs/challenge.md)
PROGRESS = re.compile(r"^ttt_progress: batch (\d+)/(\d+) .*doc_len:(\d+)-(\d+)", re.M)
SETTING = re.compile(r"^  (\w+): (.*)$", re.M)
EVAL_TIME = re.compile(r"^quantized_ttt_\w+ val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms", re.M)
DOCS = re.compile(r"ttt_\w+:\s?(?:total_)?docs:(\d+)")


@dataclasses.dataclass
class PublicRun:
    settings: dict[str, str]
    batches: dict[int, tuple[int, int]]  # batch number (1 = shortest documents) -> (min, max) document length
    num_batches: int
    num_docs: int
    seconds: list[float]


def read_logs(paths: list[Path]) -> PublicRun:
    settings, batches, seconds, num_batches, num_docs = {}, {}, [], 0, 0
    for path in paths:
        text = path.read_text(errors="replace")
        settings.update({k: v.strip() for k, v in SETTING.findall(text)})
        for n, total, lo, hi in PROGRESS.findall(text):
            batches[int(n)] = (int(lo), int(hi))
            num_batches = int(total)
        seconds += [int(ms) / 1000 for ms in EVAL_TIME.findall(text)]
        num_docs = max([num_docs] + [int(d) for d in DOCS.findall(text)])
    if not batches or not seconds:
        raise SystemExit(f"no ttt_progress or eval_time lines in {', '.join(map(str, paths))}")
    return PublicRun(settings, batches, num_batches, num_docs, seconds)


def document_lengths(run: PublicRun, batch_docs: int) -> list[np.ndarray]:
    """Each batch's document lengths (tokens, both BOS included), in queue order of length: the logged
    batches' ranges, linear in between; the unlogged batches' ranges interpolated over the batch number."""
    known = np.array(sorted(run.batches))
    lows = np.interp(np.arange(1, run.num_batches + 1), known, [run.batches[k][0] for k in known])
    highs = np.interp(np.arange(1, run.num_batches + 1), known, [run.batches[k][1] for k in known])
    sizes = [batch_docs] * run.num_batches
    sizes[-1] = run.num_docs - batch_docs * (run.num_batches - 1)  # the longest documents' batch is the short one
    return [np.rint(np.linspace(lo, hi, size)).astype(np.int64) for lo, hi, size in zip(lows, highs, sizes)]


def public_config(s: dict[str, str]) -> tuple[tg.ModelConfig, tg.Hyperparameters]:
    """The record's architecture as far as FLOPs go (its loop of layers LOOP_START..LOOP_END, NUM_LOOPS extra
    times, is our mini recurrence), and its TTT settings."""
    loops = int(s.get("num_loops", 0))
    cfg = tg.ModelConfig(vocab_size=int(s["vocab_size"]), num_layers=int(s["num_layers"]), model_dim=int(s["model_dim"]),
                         num_heads=int(s["num_heads"]), num_kv_heads=int(s["num_kv_heads"]),
                         mlp_mult=int(float(s["mlp_mult"])), bigram_buckets=0, mini_recur_repeats=loops,
                         mini_recur_first=int(s.get("loop_start", 0)), mini_recur_last=int(s.get("loop_end", 0)))
    ttt = tg.Hyperparameters(ttt_lora_rank=int(s["ttt_lora_rank"]), ttt_chunk_size=int(s["ttt_chunk_size"]),
                             ttt_eval_seq_len=int(s["ttt_eval_seq_len"]), ttt_batch_size=int(s["ttt_batch_size"]),
                             phased_ttt_prefix_docs=0)
    return cfg, ttt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=FINEWEB_VAL_TOKENS_SP1024,
                        help="validation tokens of the prediction (default: FineWeb val at sp1024)")
    args = parser.parse_args()
    run = read_logs(args.logs)
    cfg, spec = public_config(run.settings)
    world = int(run.settings.get("world_size", tg.PREDICTION_WORLD_SIZE))
    lengths = document_lengths(run, spec.ttt_batch_size)
    flops = sum(tg.ttt_batch_flops(cfg, spec, docs - 1, public_loop=True) for docs in lengths)  # targets: length - 1
    seconds = float(np.mean(run.seconds))
    tflops = flops / world / seconds / 1e12
    all_lengths = np.concatenate(lengths)
    print(f"public run: {len(args.logs)} logs, {len(run.batches)}/{run.num_batches} batches seen, "
          f"{len(all_lengths)} documents, {int((all_lengths - 1).sum())} targets (rebuilt)")
    print(f"public TTT pass: {flops:.4g} FLOPs in {seconds:.1f} s (mean of {', '.join(f'{t:.1f}' for t in run.seconds)}) "
          f"on {world} GPUs: {tflops:.1f} effective TFLOP/s per GPU (train_gpt.TTT_H100_TFLOPS = {tg.TTT_H100_TFLOPS:g})")

    # Ours: the same documents, in stream order unknown (their order does not change the FLOPs much: the
    # schedule sorts each phase by length), lengths scaled to the sp1024 token count.
    targets = all_lengths - 1
    targets = np.maximum(1, np.rint(targets * args.tokens / targets.sum())).astype(np.int64)
    rng = np.random.default_rng(0)
    targets = targets[rng.permutation(len(targets))]  # stream order: lengths do not follow the queue
    ends = np.cumsum(targets)
    spans = np.stack((ends - targets, ends), axis=1)
    ours = tg.Hyperparameters()
    our_cfg, our_spec = tg.ModelConfig.from_hparams(ours), ours
    for label, value in (("calibrated", tflops), ("in train_gpt.py", tg.TTT_H100_TFLOPS)):
        secs, total = tg.predict_ttt_seconds(our_cfg, spans, our_spec, tflops=value)
        lora, sgd = tg.ttt_flops(our_cfg, spans, our_spec, tg.PREDICTION_WORLD_SIZE)
        phases = " ".join(f"{max(r):.3g}/{min(r):.3g}" for r in lora)
        print(f"train_gpt.py defaults, {args.tokens} tokens, 8 x H100 at {value:.1f} TFLOP/s ({label}): {secs:.1f} s "
              f"({total:.4g} FLOPs; per phase busiest/least busy rank {phases}; global SGD {sum(sgd):.4g})")
    # The whole evaluation as the `legality ttt_eval` line predicts it (train_gpt.predict_eval_seconds), for the
    # defaults and for each May evaluation part on top of them (docs/may.md).
    windows = sum(tg.predict_window_eval_seconds(our_cfg, int(spans[-1, 1]) + 1, s)
                  for s in (tg.EvalSpec.plain(ours), tg.EvalSpec.sliding(ours)))
    variants = {"defaults": {}, "1 global phase": dict(phased_ttt_num_phases=1),
                "no_qv targets": dict(ttt_lora_targets="k,o,mlp,head"),
                "short chunks": dict(ttt_short_chunks="256:8,2000:24"), "token tilt": dict(ngram_tilt="token"),
                "context 2560": dict(ttt_eval_seq_len=2560, eval_seq_len=2560)}
    variants["all of them"] = {k: v for d in variants.values() for k, v in d.items()}
    for label, overrides in variants.items():
        h = dataclasses.replace(ours, **overrides)
        b = tg.predict_eval_seconds(our_cfg, spans, h)
        win = windows if "eval_seq_len" not in overrides else sum(
            tg.predict_window_eval_seconds(our_cfg, int(spans[-1, 1]) + 1, s)
            for s in (tg.EvalSpec.plain(h), tg.EvalSpec.sliding(h)))
        total = b.ttt + win + b.ngram + b.compile
        print(f"budget {label}: ttt {b.ttt:.1f} s (global SGD {b.sgd:.1f} s, {b.sgd_steps} steps), windows {win:.1f} s, "
              f"n-gram {b.ngram:.1f} s, compile {b.compile:.1f} s: total {total:.1f} s, margin "
              f"{tg.EVAL_CAP_SECONDS - total:.1f} s")


if __name__ == "__main__":
    main()
