"""Does the bf16 dtype plan change the result? One small train_gpt.py run per seed in fp32 and again under
CPU bf16 autocast (bf16 activations, stream and Newton-Schulz, fp32 master weights and optimizer state:
the plan CUDA runs use), compared with the seed-to-seed spread of the fp32 runs.

    python3 lab/bf16_check.py --data-path bench/corpus_sp1024 --tokenizer bench/corpus_1024_bpe.model

CPU autocast has its own op lists (CUDA's run a few more ops in fp32), but the casts train_gpt.py makes
itself (the stream, the head, the norms) follow the autocast dtype on either device. Steps, not
wallclock, limit the runs, so the numbers do not depend on the machine's load. Prints one line per run
and a summary for the raw weights after the last step and for the final (EMA) weights; each run's log
stays under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

CONFIG = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8", TRAIN_SEQ_LEN="128",
              TRAIN_BATCH_TOKENS=str(128 * 32), ITERATIONS="200", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0",
              VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="50", EVAL_SEQ_LEN="128", EVAL_STRIDE="128",
              VAL_BATCH_SIZE="16384", GPTQ="0", COMPRESSOR="zstd", QAT="off", EMA_DECAY="0.99",
              MUON_MOMENTUM_WARMUP_STEPS="100", QUANT_MIN_NUMEL="4096",
              TTT="0")  # it compares the float scores; test-time training would add minutes per run
VAL_TOKENS = 65_536  # the first validation tokens: enough to separate seeds, quick to evaluate
RESULT = re.compile(r"^(raw|final)_float_exact val_loss:(\S+) val_bpb:(\S+)", re.M)  # last step's, averaged


def bf16_runtime(setup):
    """setup_runtime, then CPU bf16 autocast and bf16 Newton-Schulz as on CUDA."""
    def setup_bf16(h, env):
        rt = setup(h, env)
        return dataclasses.replace(rt, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                                   ns_dtype=torch.bfloat16)
    return setup_bf16


def make_dataset(data_path: Path, out: Path, val_tokens: int) -> Path:
    """out/data: links to the training shards and the first val_tokens + 1 validation tokens."""
    from data.shards import shard_filename, write_shard
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for shard in tg.find_shards(str(data_path), "train"):
        link = data / Path(shard).name
        if not link.exists():
            link.symlink_to(Path(shard).resolve())
    write_shard(data / shard_filename("val", 0), tg.load_validation_tokens(str(data_path))[:val_tokens + 1])
    return data


def run(env: dict, bf16: bool) -> dict[str, float]:
    setup = tg.setup_runtime
    if bf16:
        tg.setup_runtime = bf16_runtime(setup)
    try:
        tg.main(env)
    finally:
        tg.setup_runtime = setup
    log = (Path(env["OUT_DIR"]) / f"{env['RUN_ID']}.txt").read_text()
    return {f"{kind}_{key}": float(v) for kind, loss, bpb in RESULT.findall(log)
            for key, v in (("loss", loss), ("bpb", bpb))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--val-tokens", type=int, default=VAL_TOKENS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "bf16_check")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override a train_gpt.py variable")
    args = ap.parse_args(argv)
    config = {**CONFIG, **dict(item.split("=", 1) for item in args.set)}
    data = make_dataset(Path(args.data_path), args.out, args.val_tokens)
    results = {}
    for seed in args.seeds:
        for bf16 in (False, True):
            label = "bf16" if bf16 else "fp32"
            env = {**config, "DATA_PATH": str(data), "TOKENIZER_PATH": args.tokenizer, "SEED": str(seed),
                   "OUT_DIR": str(args.out), "RUN_ID": f"{label}_seed{seed}"}
            results[seed, label] = r = run(env, bf16)
            print(f"bf16_check seed:{seed} mode:{label} " + " ".join(f"{k}:{v:.8f}" for k, v in r.items()),
                  flush=True)
    for kind in ("raw", "final"):
        fp32 = [results[s, "fp32"][f"{kind}_bpb"] for s in args.seeds]
        gaps = [results[s, "bf16"][f"{kind}_bpb"] - results[s, "fp32"][f"{kind}_bpb"] for s in args.seeds]
        spread = statistics.stdev(fp32) if len(fp32) > 1 else float("nan")
        print(f"bf16_check_summary weights:{kind} seeds:{len(args.seeds)} fp32_bpb_mean:{statistics.mean(fp32):.6f} "
              f"fp32_bpb_seed_std:{spread:.6f} bf16_minus_fp32_mean:{statistics.mean(gaps):+.6f} "
              f"bf16_minus_fp32_max_abs:{max(map(abs, gaps)):.6f}")


if __name__ == "__main__":
    main()
