"""Ablation of the April parts (docs/april.md) on a small CPU config: the seed stack (the defaults), the seed
stack plus each April part alone, and PRESET=april, each with two seeds, trained with the same steps and
data, then quantized and evaluated like a real run. Prints a markdown table.

    OMP_NUM_THREADS=1 python3 lab/ablate_april.py --data DIR --tokenizer FILE --out DIR
    OMP_NUM_THREADS=1 python3 lab/ablate_april.py ... --vocab-data DIR2 --vocab-tokenizer FILE2   # + a row
                                                                   # for PRESET=april on a larger vocabulary

Runs one variant at a time (train_gpt.py in a subprocess) and reuses a finished log, so an interrupted
ablation resumes (lab/ablate_architecture.py's runner). Validation is the first --val-docs documents of
the validation split, the same text for every tokenizer, so that rows on different vocabularies compare in
bits per byte.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.ablate_architecture import FINAL, PARAMS, SMALL, prepare_data, run_variant  # noqa: E402
from train_gpt import PRESETS  # noqa: E402

# The small model of the architecture ablation, 6 layers deep so that the April shape fits: layers 2..3 loop
# (the record's 3..5 of 11: the middle), lanes from layer 4 (the record's 8: the last third), U-Net 3 + 3.
SMALL_APRIL = {**SMALL, "NUM_LAYERS": 6, "TRAIN_LOG_EVERY": 100}
LAYER_IDS = dict(PARALLEL_START_LAYER=4, MINI_RECUR_FIRST=2, MINI_RECUR_LAST=3)
ARCHITECTURE = {"VOCAB_SIZE", "DATA_VARIANT", "DATA_PATH", "TOKENIZER_PATH", "MLP_MULT", "BIGRAM_BUCKETS", "SMEAR_GATE_FORM",
                "ATTN_OUT_GATE", "ATTN_GATE_SCALE", "PARALLEL_START_LAYER", "MINI_RECUR_REPEATS", "MINI_RECUR_FIRST",
                "MINI_RECUR_LAST", "MINI_RECUR_START_FRAC", "MINI_RECUR_UNET", "MUON_ROW_NORMALIZE", "MUON_NS_COEFFS"}  # and the Muon parts
PARTS = {  # each on top of the seed stack
    "+parallel residuals (layers 4-5)": dict(PARALLEL_START_LAYER=4),
    "+loop layers 2-3 x3 from 35%": dict(MINI_RECUR_REPEATS=2, MINI_RECUR_FIRST=2, MINI_RECUR_LAST=3,
                                         MINI_RECUR_START_FRAC=0.35, MINI_RECUR_UNET=1),
    "+attention output gate": dict(ATTN_OUT_GATE=1, ATTN_GATE_SCALE=0.5),
    "+input SmearGate": dict(SMEAR_GATE_FORM="input"),
    "+MLP 4x, no BigramHash": dict(MLP_MULT=4, BIGRAM_BUCKETS=0),
    # The preset's optimizer and schedule values (QK gain, LeakyReLU^2 and QAT off with them): every preset
    # variable that is not the architecture or the data.
    "+April settings": {k: v for k, v in PRESETS["april"].items() if k not in ARCHITECTURE},
    "+MuonEq-R": dict(MUON_ROW_NORMALIZE=1),
    "+Polar Express NS": dict(MUON_NS_COEFFS="polar_express"),
}
SEEDS = (1337, 42)
STEP_AVG = re.compile(r"^step:\d+/\d+ val_loss:\S+ val_bpb:\S+ train_time:\d+ms step_avg:(\S+)ms", re.M)


def runs(vocab: int) -> dict[str, dict]:
    out = {"seed stack (defaults)": {}}
    out.update(PARTS)
    # The small config sets MLP_MULT (3) explicitly, which would win over the preset's: give the preset's.
    out["PRESET=april"] = dict(PRESET="april", VOCAB_SIZE=vocab, MLP_MULT=PRESETS["april"]["MLP_MULT"], **LAYER_IDS)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder of fineweb_train_*.bin / fineweb_val_*.bin")
    p.add_argument("--tokenizer", type=Path, required=True, help="sentencepiece model of the data")
    p.add_argument("--vocab-data", type=Path, help="the same text on a larger vocabulary: one more PRESET=april row")
    p.add_argument("--vocab-tokenizer", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/ablate_april"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=2048, help="TRAIN_BATCH_TOKENS (TRAIN_SEQ_LEN x a multiple of 8)")
    p.add_argument("--val-docs", type=int, default=24)
    p.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    args = p.parse_args()
    small = {k: str(v) for k, v in SMALL_APRIL.items()}
    jobs = []  # (row name, overrides, args, data)
    for data_dir, tok, label in ((args.data, args.tokenizer, ""), (args.vocab_data, args.vocab_tokenizer, "vocab")):
        if data_dir is None:
            continue
        a = copy.copy(args)
        a.out, a.tokenizer = args.out / label if label else args.out, tok
        data = prepare_data(data_dir, a.out, val_docs=args.val_docs)
        vocab = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()
        variants = runs(vocab) if not label else {f"PRESET=april, sp{vocab}": runs(vocab)["PRESET=april"]}
        if label:
            variants[f"seed stack, sp{vocab}"] = dict(VOCAB_SIZE=vocab)
        for name, overrides in variants.items():
            if not args.only or name in args.only:
                jobs.append((name, {"VOCAB_SIZE": vocab, **overrides}, a, data))
    print("| variant | params | sliding val_bpb seed 1337 | seed 42 | mean | float val_bpb (mean) | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides, a, data in jobs:
        logs = [run_variant(f"{name} seed {seed}", {**overrides, "SEED": seed}, small, a, data) for seed in SEEDS]
        sliding = [float(dict((m[0], m[2]) for m in FINAL.findall(log))["final_sliding_window_exact"]) for log in logs]
        floats = [float(dict((m[0], m[2]) for m in FINAL.findall(log))["final_float_exact"]) for log in logs]
        ms = [float(STEP_AVG.findall(log)[-1]) for log in logs]
        print(f"| {name} | {int(PARAMS.search(logs[0])[1]):,} | {sliding[0]:.4f} | {sliding[1]:.4f} | "
              f"{np.mean(sliding):.4f} | {np.mean(floats):.4f} | {np.mean(ms):.0f} |", flush=True)


if __name__ == "__main__":
    main()
