"""Plan a run before paying for it: what train_gpt.py with these settings should do on 8 x H100, and whether it
fits the challenge's limits, predicted on this machine without a GPU and without training.

    python3 scripts/plan.py                       # the defaults (PRESET=seed)
    PRESET=april python3 scripts/plan.py          # any preset, any setting: the same variables as a run
    NUM_LAYERS=12 python3 scripts/plan.py --json runs/my_idea/plan.json

It parses the environment with train_gpt.py's own settings parser, builds the model exactly as the run would
(train_gpt.build_model, on the CPU), and prints one `plan` block: parameters; the step time on 8 x H100 (each
share of the budget with its own step shape: the mini recurrence's start, TRAIN_SEQ_SCHEDULE) and the steps
that fit; peak memory per GPU; the artifact bytes predicted for the TRAINED weights; the GPTQ calibration
reserve; the whole evaluation (round trip, sliding window, TTT, compile warm-ups) against its 600 s. Then one
`verdict` line per limit and a last line; the exit status is 1 when a limit is over (the line names it), 2 on
a bad setting. The model of each number, what it was fitted on and its error on the public runs:
docs/plan.md (lab/predict.py, lab/calibrate_plan.py).

TRAIN_SEQ_SCHEDULE ("LEN@UNTIL,...", PR #2014's form, e.g. 1024@0.1,2048@0.7,3072@1.0) is planned as one segment per
length, read by train_gpt.py's own parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from lab import predict as pr  # noqa: E402

def gib(x: float) -> str:
    return f"{x:.1f}GiB"


def block(plan: pr.Plan, seconds: float) -> list[str]:
    h, t, m, a, c, e = plan.h, plan.train, plan.memory, plan.artifact, plan.calibration, plan.evaluation
    lines = [f"plan config preset:{h.preset} params:{plan.params:,} passes:{plan.passes[0]}"
             + (f"->{plan.passes[1]}" if plan.passes[1] != plan.passes[0] else "")
             + f" vocab:{h.vocab_size} model_dim:{h.model_dim} seq_len:{h.train_seq_len} "
               f"batch_tokens:{h.train_batch_tokens:,} on:{pr.WORLD}xH100 code_class:{plan.code_class} "
               f"mfu:{plan.mfu:.3f}"]
    for s in t.segments:
        lines.append(f"plan train_segment share:{s.start:.2f}-{s.end:.2f} loop:{'on' if s.repeats_on else 'off'} "
                     f"seq_len:{s.seq_len} flops_per_token:{s.flops_per_token / 1e6:.1f}M ms_per_step:{s.ms_per_step:.1f}")
    budget = (f"budget:{t.budget_s:.1f}s (MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} - reserve "
              f"{c.reserve_s:.1f}s)" if t.budget_s else "budget:none (MAX_WALLCLOCK_SECONDS=0)")
    lines.append(f"plan train steps:{t.steps:,} train_time:{t.train_s:.1f}s {budget} limited_by:{t.limited_by}")
    lines.append(f"plan memory per_gpu state:{gib(m.state_gib)} activations:{gib(m.activation_gib)} "
                 f"peak:{gib(m.peak_gib)} of:{pr.H100_MEMORY_GIB:g}GiB (fp32 logits and other transients beyond "
                 f"the saved activations not counted)")
    lines.append(f"plan artifact estimate_init:{a.estimate_init:,} x trained_ratio:{a.ratio:.4f} ({h.clip_method}) "
                 f"+ lqer:{a.lqer_bytes:,} = bytes_model:{a.bytes_model:,} + bytes_code:{a.bytes_code:,} = "
                 f"bytes_total:{a.bytes_total:,} cap:{tg.ARTIFACT_CAP_BYTES:,}")
    how = ("GPTQ_RESERVE_MEASURE=1: 1.5 x measured + 1 s" if c.measured_reserve else
           "fixed GPTQ_RESERVE_SECONDS" if c.measured_s else "no calibration")
    lines.append(f"plan calibration hessians:{c.hessian_s:.1f}s gptq:{c.quantize_s:.1f}s measured:{c.measured_s:.1f}s "
                 f"reserve:{c.reserve_s:.1f}s ({how})")
    lines.append(f"plan eval val_tokens:{e.val_tokens:,} documents:{e.documents:,} ({e.source}) "
                 f"roundtrip:{e.roundtrip_s:.1f}s sliding:{e.sliding_s:.1f}s ttt:{e.ttt_s:.1f}s "
                 f"(global_sgd_steps:{e.sgd_steps}) compile:{e.compile_s:.0f}s ngram:0s (not in train_gpt.py's "
                 f"evaluation) total:{e.total_s:.0f}s of:{tg.EVAL_CAP_SECONDS:.0f}s")
    over = []
    for v in plan.verdicts():
        lines.append(f"verdict {v.limit} {v.text}")
        if not v.fits:
            over.append(v.limit)
    lines.append(f"plan {'over: ' + ', '.join(over) if over else 'ok: every limit fits'} "
                 f"(planned in {seconds:.0f}s; docs/plan.md: how far to trust each number)")
    return lines


def as_json(plan: pr.Plan) -> dict:
    out = dataclasses.asdict(plan)
    out["h"] = {f.name: getattr(plan.h, f.name) for f in dataclasses.fields(plan.h)}
    out["verdicts"] = [dataclasses.asdict(v) for v in plan.verdicts()]
    return out


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val-tokens", type=int, help="validation tokens (default: DATA_PATH's, else the public count "
                                                   "for the vocabulary)")
    ap.add_argument("--json", type=Path, help="also write the plan here (scripts/make_record.py reads it)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        h = tg.Hyperparameters.from_env(dict(os.environ if env is None else env))
        plan = pr.make_plan(h, h.train_seq_schedule, args.val_tokens)
    except (tg.SettingError, pr.PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = block(plan, time.perf_counter() - t0)
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(as_json(plan), indent=1) + "\n", encoding="utf-8")
    return 1 if any(not v.fits for v in plan.verdicts()) else 0


if __name__ == "__main__":
    sys.exit(main())
