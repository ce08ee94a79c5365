"""How far the start-up artifact estimate (random init) is from the artifact of the trained model, measured
on models small enough to train here: the data behind the trained/init ratio of lab/predict.py.

    OMP_NUM_THREADS=1 python3 lab/artifact_ratio.py --data bench/corpus_sp1024 \
        --tokenizer bench/corpus_1024_bpe.model --steps 0 300 1200 --out lab/artifact_ratio.jsonl
    python3 lab/artifact_ratio.py --table             # the results as docs/plan.md shows them

For each configuration below and each step count, train_gpt.main() runs unchanged (one process, no
wallclock cap, no byte fitting: QUANT_TARGET_BYTES=0) with an export hook that also estimates the trained
weights; one JSON line per run:
  est_init     train_gpt.estimate_model_bytes of the initial weights (the `artifact_estimate` line less code)
  est_trained  the same estimator on the weights the quantizer receives after training
  bytes_model  the artifact's compressed model bytes (the `artifact` line): what the cap counts
Step count 0 exports the initial weights, whose zero-initialized tensors (the bigram table, the output
projections) the estimator counts as Gaussian (trained, they will not stay zero) while the artifact stores
them as zeros. `bench/` is built by lab/corpus_benchmark.sh (the benchmark corpus, sp1024). Runs go two at
a time (--jobs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="256",
             TRAIN_BATCH_TOKENS="4096", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", VAL_LOSS_EVERY="0",
             TRAIN_LOG_EVERY="100", EVAL_SEQ_LEN="256", EVAL_STRIDE="256", VAL_BATCH_SIZE="16384",
             QUANT_MIN_NUMEL="4096", GPTQ_CALIB_SEQS="128", TTT="0", QUANT_TARGET_BYTES="0", COMPRESSOR="brotli")
# The two quantizer classes of the plan: the seed stack (percentile clip search, int8 embedding) and the
# April stack (SDClip, int7 embedding, LQER), each at the small size; the April layer ids shrink with the
# depth as in scripts/ablate_april.py (loop 2-3, lanes from 4 of 6).
CONFIGS = {
    "seed_4x128": dict(SMALL, PRESET="seed"),
    "april_6x128": dict(SMALL, PRESET="april", VOCAB_SIZE="1024", NUM_LAYERS="6", MINI_RECUR_FIRST="2",
                        MINI_RECUR_LAST="3", PARALLEL_START_LAYER="4"),
}


def one(config: str, steps: int, data: str, tokenizer: str) -> dict:
    """One run in this process: the three byte counts."""
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg
    out = tempfile.mkdtemp(prefix="artifact_ratio_")
    env = dict(os.environ, **CONFIGS[config], ITERATIONS=str(steps), DATA_PATH=data, TOKENIZER_PATH=tokenizer,
               OUT_DIR=out, RUN_ID="run")
    seen = {}

    def hook(inputs) -> None:
        h = tg.Hyperparameters.from_env(env)
        seen["est_trained"] = tg.estimate_model_bytes(inputs.state, inputs.plan, h)

    tg.main(env, export_hook=hook)
    log = Path(out, "run.txt").read_text(encoding="utf-8")
    estimate = re.search(r"^artifact_estimate bytes_total:(\d+) bytes_code:(\d+)", log, re.M)
    artifact = re.search(r"^artifact path:\S+ bytes_code:(\d+) bytes_model:(\d+)", log, re.M)
    params = re.search(r"^model params:(\d+)", log, re.M)
    return dict(config=config, steps=steps, params=int(params[1]),
                est_init=int(estimate[1]) - int(estimate[2]), est_trained=seen["est_trained"],
                bytes_model=int(artifact[2]), env={k: v for k, v in CONFIGS[config].items()})


def table(path: Path) -> str:
    rows = ["| configuration | steps | params | estimate at init | estimate of the trained weights | artifact "
            "(bytes_model) | artifact / estimate at init | artifact / estimate of the same weights |",
            "|---|---|---|---|---|---|---|---|"]
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append(f"| {r['config']} | {r['steps']} | {r['params']:,} | {r['est_init']:,} | {r['est_trained']:,} | "
                    f"{r['bytes_model']:,} | {r['bytes_model'] / r['est_init']:.4f} | "
                    f"{r['bytes_model'] / r['est_trained']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="the benchmark corpus' shards (needed to train)")
    ap.add_argument("--tokenizer", help="its tokenizer model (needed to train)")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 300, 1200])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=ROOT / "lab" / "artifact_ratio.jsonl")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print --out's results as a markdown table and stop")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return
    if not (args.data and args.tokenizer):
        ap.error("--data and --tokenizer are needed to train")
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], int(args.one[1]), args.data, args.tokenizer)), flush=True)
        return

    def launch(config: str, steps: int) -> dict:
        cmd = [sys.executable, __file__, "--data", args.data, "--tokenizer", args.tokenizer, "--one", config, str(steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"{config} {steps}: failed\n{done.stderr[-3000:]}")
        return json.loads(lines[-1].removeprefix("RESULT "))

    jobs = [(c, s) for c in args.configs for s in args.steps]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda job: launch(*job), jobs):
            result["ratio_trained_to_init_estimate"] = round(result["bytes_model"] / result["est_init"], 4)
            print(json.dumps(result), flush=True)
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
