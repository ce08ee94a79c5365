"""Throughput of the n-gram hint pass (online_ngram_state.c) on one core.

    python3 lab/bench_ngram.py --data DIR --tokenizer MODEL [--split val] [--tokens N] [--repeats 3] [--cache]

Reads the first N tokens of the split's shards, runs the hint pass (and the cache pass with --cache)
`repeats` times and prints, per run, the wall time and the CPU time of the calling thread (the pass is
single-threaded, so tokens / CPU second is the speed of one core even on a busy machine), then the best
run, the tables' memory, and the share of positions on which each expert's confidence reaches its
public threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import online_ngram as ng  # noqa: E402
import train_gpt as tg  # noqa: E402

PUBLIC_THRESHOLDS = (0.80, 0.45, 0.65)  # token, within-word, word-start (docs/ngram.md)


def load_tokens(data: str, split: str, limit: int) -> np.ndarray:
    parts, total = [], 0
    for path in tg.find_shards(data, split):
        if limit and total >= limit:
            break
        parts.append(tg.load_data_shard(path))
        total += len(parts[-1])
    tokens = np.concatenate(parts)
    return tokens[:limit] if limit else tokens


def report(label: str, n: int, runs: list[ng.TableStats]) -> ng.TableStats:
    for i, st in enumerate(runs):
        print(f"{label}_run index:{i} tokens:{n} wall_s:{st.seconds:.3f} cpu_s:{st.cpu_seconds:.3f} "
              f"tokens_per_s_cpu:{n / st.cpu_seconds:.0f} tokens_per_s_wall:{n / st.seconds:.0f}")
    best = min(runs, key=lambda st: st.cpu_seconds)
    print(f"{label}_best tokens:{n} tokens_per_s_cpu:{n / best.cpu_seconds:.0f} "
          f"tokens_per_s_wall:{n / min(st.seconds for st in runs):.0f} memory_bytes:{best.memory_bytes}")
    for line in best.lines():
        print(f"{label}_table {line}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder of fineweb_{train,val}_*.bin shards")
    ap.add_argument("--tokenizer", required=True, help="the sentencepiece model of the shards")
    ap.add_argument("--split", default="val", choices=("val", "train"))
    ap.add_argument("--tokens", type=int, default=0, help="use the first N tokens (0: the whole split)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", action="store_true", help="also time the adaptive cache pass")
    args = ap.parse_args()

    sp = tg.load_tokenizer(args.tokenizer)
    tables = ng.build_word_tables(sp, sp.vocab_size())
    tokens = load_tokens(args.data, args.split, args.tokens)
    ng.load_library()  # build outside the timed runs
    runs = []
    for _ in range(args.repeats):  # keep one run's hints at a time: they take 24 bytes per token
        hints = ng.hint_pass(tokens, tables)
        runs.append(hints.stats)
    report("ngram_hints", len(tokens), runs)
    conf = hints.conf
    print("ngram_gated " + " ".join(f"{e}:{(conf[i] >= th).mean():.6f}"
                                    for i, (e, th) in enumerate(zip(ng.EXPERTS, PUBLIC_THRESHOLDS))))
    if args.cache:
        runs = [ng.cache_pass(tokens, sp.vocab_size())[1] for _ in range(args.repeats)]
        report("ngram_cache", len(tokens), runs)


if __name__ == "__main__":
    main()
