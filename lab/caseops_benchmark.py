"""CaseOps against the plain tokenizer on the same text (docs/data.md): two datasets built from the stand-in
corpus at the same vocabulary size, one plain and one through the CaseOps transform (data/build_dataset.py
--caseops), the same small model trained the same steps on each with two seeds, then quantized and scored like
a real run. Both score the same validation documents in bits per byte of the original text (the plain one
with the tokenizer's byte tables, the CaseOps one with its byte sidecar): the byte totals are printed and must
agree. Prints a markdown table.

    OMP_NUM_THREADS=1 python3 lab/caseops_benchmark.py --corpus ../shared/corpus --out bench/caseops

Training text: fineweb_legal + c4_1000 (about 22 MB); validation: the first --val-docs documents of
fineweb_300 (written as a JSON-lines file under --out, the --val-input of both builds). Builds once (reused
when its manifest is there), runs --jobs runs side by side (train_gpt.py subprocesses, OMP_NUM_THREADS=1 each
unless set), and reuses a finished run's log (lab/ablate_architecture.py's runner), so an interrupted
benchmark resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.ablate_architecture import FINAL, PARAMS, SMALL, run_variant  # noqa: E402

TRAIN_FILES = ("fineweb_legal.jsonl.xz", "c4_1000.jsonl.xz")
VAL_FILE = "fineweb_300.jsonl.xz"
KINDS = {"plain": [], "caseops": ["--caseops"]}
SEEDS = (1337, 42)
VAL_BYTES = re.compile(r"^val_bytes source:(\w+)(?: files:\d+)? total:(\d+) targets:(\d+)$", re.M)
STEP_AVG = re.compile(r"^step:\d+/\d+ train_loss:\S+ lr_mult:\S+ train_time:\d+ms step_avg:(\S+)ms", re.M)


def write_val_docs(corpus: Path, out: Path, n: int) -> tuple[Path, int]:
    """The first n documents of the validation file as JSON lines, and their UTF-8 length."""
    path = out / f"val_{n}_docs.jsonl"
    with lzma.open(corpus / VAL_FILE, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(n))]
    if len(texts) < n:
        raise SystemExit(f"{corpus / VAL_FILE} has {len(texts)} documents, --val-docs is {n}")
    out.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path, sum(len(t.encode("utf-8")) for t in texts)


def build(kind: str, args, val_input: Path) -> tuple[Path, Path]:
    """(dataset folder, tokenizer model) of one tokenization, built unless its manifest is there."""
    data, prefix = args.out / f"data_{kind}", args.out / "tok" / f"{kind}_{args.vocab}"
    model = Path(f"{prefix}.model")
    manifest = data / "dataset_manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        cmd = [sys.executable, str(ROOT / "data" / "build_dataset.py"),
               "--input", *[str(args.corpus / f) for f in TRAIN_FILES], "--val-input", str(val_input),
               "--vocab-size", str(args.vocab), "--output-dir", str(data), "--tokenizer-prefix", str(prefix),
               "--tokenizer-train-chars", "20000000", "--shard-tokens", "20000000", "--no-progress", *KINDS[kind]]
        subprocess.run(cmd, check=True)
    return data, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus", help="the stand-in corpus")
    p.add_argument("--out", type=Path, default=Path("bench/caseops"))
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=4096, help="TRAIN_BATCH_TOKENS (TRAIN_SEQ_LEN x a multiple of 8)")
    p.add_argument("--val-docs", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    val_input, original = write_val_docs(args.corpus, args.out, args.val_docs)
    small = {k: str(v) for k, v in {**SMALL, "VOCAB_SIZE": args.vocab}.items()}
    jobs = []
    for kind in KINDS:
        data, model = build(kind, args, val_input)
        a = copy.copy(args)
        a.out, a.tokenizer = args.out / kind, model
        jobs += [(kind, seed, a, data) for seed in SEEDS]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        logs = list(pool.map(lambda j: run_variant(f"{j[0]} seed {j[1]}", {"SEED": j[1]}, small, j[2], j[3]), jobs))
    print(f"validation: the first {args.val_docs} documents of {VAL_FILE}, {original:,} bytes of UTF-8")
    print("| tokenization | val tokens | val bytes (source) | bytes/token | params | sliding val_bpb seed 1337 "
          "| seed 42 | mean | float val_bpb (mean) | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, kind in enumerate(KINDS):
        runs = logs[2 * k:2 * k + 2]
        source, total, targets = VAL_BYTES.search(runs[0]).groups()
        finals = [{m[0]: float(m[2]) for m in FINAL.findall(log)} for log in runs]
        sliding = [f["final_sliding_window_exact"] for f in finals]
        ms = np.mean([float(STEP_AVG.findall(log)[-1]) for log in runs])
        print(f"| {kind} sp{args.vocab} | {int(targets):,} | {int(total):,} ({source}) | "
              f"{int(total) / int(targets):.3f} | {int(PARAMS.search(runs[0])[1]):,} | {sliding[0]:.4f} | "
              f"{sliding[1]:.4f} | {np.mean(sliding):.4f} | {np.mean([f['final_float_exact'] for f in finals]):.4f} | "
              f"{ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
