"""Ablation of the record architecture (docs/architecture.md) on a small CPU config: the baseline model, the
baseline plus each part alone, and all parts (the defaults), each trained with the same steps, seed and
data, then quantized and evaluated like a real run. Prints a markdown table.

    OMP_NUM_THREADS=1 python3 lab/ablate_architecture.py --data DIR --tokenizer FILE --out DIR

Variables set in the environment override the small config (NUM_LAYERS=6 ...), not the variants' own
switches. Runs one variant at a time (train_gpt.py in a subprocess) and reuses a variant's log when it
already holds the final metrics, so an interrupted ablation resumes (use another --out for another
config). Validation is cut to the first --val-tokens tokens (written as a shard under --out, next to
links to the training shards) to keep the three evaluations of each run short; every variant is scored
on the same tokens.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.shards import write_shard  # noqa: E402
from train_gpt import find_shards, load_validation_tokens  # noqa: E402

# The small model: 4 layers x 128, head dim 32 with a quarter of it rotated (the record's 16 of 64).
SMALL = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3, ROPE_DIMS=8,
             TRAIN_SEQ_LEN=256, EVAL_SEQ_LEN=256, EVAL_STRIDE=128, VAL_BATCH_SIZE=16384,
             MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=50, SEED=1337,
             TTT=0)  # the ablation compares sliding-window scores; test-time training would add minutes per run
# Every part off: the pipeline's baseline model (and RoPE on the whole head dim).
BASELINE = dict(MLP_ACTIVATION="relu2", BLOCK_INPUT_SCALE=0, UNET_GATES=0, XSA_LAYERS="none", SMEAR_GATE=0,
                BIGRAM_BUCKETS=0, VE_LAYERS="none", ORTHO_INIT=0)
RECORD_PLUS = {  # the defaults with one of the two recurrence modes on top
    "all+recurrence_1_2_1": dict(RECURRENCE=1, RECUR_PRELUDE=1, RECUR_PASSES=2, RECUR_CODA=1),
    "all+mini_recur_1_2_half": dict(MINI_RECUR_REPEATS=1, MINI_RECUR_FIRST=1, MINI_RECUR_LAST=2,
                                    MINI_RECUR_START_FRAC=0.5),
}
FINAL = re.compile(r"^(final_\w+) val_loss:(\S+) val_bpb:(\S+)", re.M)
PARAMS = re.compile(r"^model params:(\d+)", re.M)
STEP_AVG = re.compile(r"^step:\d+/\d+ val_loss:\S+ val_bpb:\S+ train_time:\d+ms step_avg:(\S+)ms", re.M)


def small_config() -> dict[str, str]:
    """SMALL, with the values the environment sets for any of its variables."""
    return {k: os.environ.get(k, str(v)) for k, v in SMALL.items()}


def variants(small: dict[str, str]) -> dict[str, dict]:
    baseline = {**BASELINE, "ROPE_DIMS": int(small["MODEL_DIM"]) // int(small["NUM_HEADS"])}
    parts = {
        "+leaky_relu2": dict(MLP_ACTIVATION="leaky_relu2"),
        "+partial_rope": dict(ROPE_DIMS=small["ROPE_DIMS"]),
        "+block_input_scale": dict(BLOCK_INPUT_SCALE=1),
        "+unet_gates": dict(UNET_GATES=1),
        "+xsa": dict(XSA_LAYERS="all"),
        "+smear_gate": dict(SMEAR_GATE=1),
        "+bigram_hash": dict(BIGRAM_BUCKETS=2048),
        "+value_embed": dict(VE_LAYERS="-2,-1"),
        "+ortho_init": dict(ORTHO_INIT=1),
    }
    runs = {"baseline": baseline, "baseline, other seed": {**baseline, "SEED": 7}}  # the noise floor
    runs.update({name: {**baseline, **part} for name, part in parts.items()})
    runs["all (defaults)"] = {}
    runs.update(RECORD_PLUS)
    return runs


def prepare_data(data: Path, out: Path, val_tokens: int = 0, val_docs: int = 0) -> Path:
    """A dataset folder for the lab's ablations: links to the training shards and the start of the validation
    split, its first val_tokens tokens or its first val_docs whole documents (each starts with BOS, id 1)."""
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for f in find_shards(str(data), "train"):
        link = folder / Path(f).name
        if not link.exists():
            link.symlink_to(Path(f).resolve())
    val = folder / "fineweb_val_000000.bin"
    if not val.exists():
        tokens = load_validation_tokens(str(data))
        if val_docs:
            starts = np.flatnonzero(tokens == 1)
            if len(starts) <= val_docs:
                raise SystemExit(f"{data}: the validation split has {len(starts)} documents, --val-docs is {val_docs}")
            val_tokens = starts[val_docs]
        write_shard(val, tokens[:val_tokens])
    return folder


def run_variant(name: str, overrides: dict, small: dict, args, data: Path) -> str:
    run_id = re.sub(r"\W+", "_", name).strip("_")
    log_path = args.out / "logs" / f"{run_id}.txt"
    # A finished run's last line; the phrase alone is not enough: every log starts with the source, which has it.
    if log_path.exists() and re.search(r"^final_sliding_window_exact ", log_path.read_text(), re.M):
        return log_path.read_text()
    env = {**os.environ, **small, **{k: str(v) for k, v in overrides.items()}}
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(args.tokenizer), OUT_DIR=str(args.out / "logs"),
               RUN_ID=run_id, ITERATIONS=str(args.steps), TRAIN_BATCH_TOKENS=str(args.batch_tokens))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    print(f"{name}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return log_path.read_text()


def table_row(name: str, log: str) -> str:
    finals = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall(log)}
    step_ms = STEP_AVG.findall(log)[-1]
    return (f"| {name} | {int(PARAMS.search(log)[1]):,} | {finals['final_sliding_window_exact'][1]:.4f} | "
            f"{finals['final_float_exact'][1]:.4f} | {float(step_ms):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder of fineweb_train_*.bin / fineweb_val_*.bin")
    p.add_argument("--tokenizer", type=Path, required=True, help="sentencepiece model of the data")
    p.add_argument("--out", type=Path, default=Path("bench/ablate_architecture"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=2048, help="TRAIN_BATCH_TOKENS (TRAIN_SEQ_LEN x a multiple of 8)")
    p.add_argument("--val-tokens", type=int, default=32_768)
    p.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    args = p.parse_args()
    data = prepare_data(args.data, args.out, args.val_tokens)
    small = small_config()
    runs = {k: v for k, v in variants(small).items() if not args.only or k in args.only}
    print("| variant | params | final_sliding_window_exact val_bpb | final_float_exact val_bpb | ms/step |")
    print("|---|---|---|---|---|")
    for name, overrides in runs.items():
        print(table_row(name, run_variant(name, overrides, small, args, data)), flush=True)


if __name__ == "__main__":
    main()
