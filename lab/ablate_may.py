"""Ablation of the May parts (docs/may.md) on a small CPU config, two seeds, and their predicted evaluation time
on 8 x H100 at full size.

    OMP_NUM_THREADS=1 python3 lab/ablate_may.py --data DIR --tokenizer FILE --out DIR   # the ablation
    python3 lab/ablate_may.py budget                                                    # the 8 x H100 prediction

The ablation trains the small PRESET=april model of lab/ablate_april.py once per seed (train_gpt.py, TTT on
with the April TTT settings) and once per seed for each training part (TRAIN_SEQ_SCHEDULE, AWQ_GROUPS; scored
float, quantized and sliding, without TTT). Each
evaluation part is then scored on the baseline's own artifact: `score` below rebuilds the run's evaluation
context from the artifact and calls train_gpt.run_ttt, the function that writes a run's final_ttt_exact (and,
with NGRAM_TILT=token, final_ttt_ngram_exact), with that part's settings; train_gpt.py itself has no
evaluate-only mode. So the evaluation parts cost one training per seed; `score` with the baseline's own settings
gives its training run's final_ttt_exact (checked by hand, docs/may.md). The two seeds run side by side.

`budget` prints train_gpt.py's own `legality ttt_eval` line (log_ttt_budget, predict_eval_seconds) for
PRESET=may and each part at the record's size, on the public validation token count with lab/predict.py's
synthetic document lengths: nothing is trained or loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.ablate_april import LAYER_IDS, SMALL_APRIL  # noqa: E402
from lab.ablate_architecture import prepare_data  # noqa: E402
from lab.ablate_architecture import FINAL, run_variant  # noqa: E402

SEEDS = (1337, 42)
TTT_RANK = 16  # the default's share of the width (80 of 512) at width 128, as docs/ttt.md's CPU measurement
# The small run: the April shape of lab/ablate_april.py (its PRESET=april row), with TTT on. Every block matrix is
# quantized (QUANT_MIN_NUMEL below 128 x 128), as every one is at full size, so that AWQ has groups to choose.
# The global TTT phases cover the first half of the validation documents (set from --val-docs) in steps of
# one training batch, so that they run at all on a few dozen documents (the public 2,500 of 50,000 would be
# one document here). GPTQ calibrates on 32 sequences and the artifact is compressed with zstd alone (COMPRESSOR=auto
# tries every codec: a minute here), to keep the export short: the bytes are not what this ablation measures.
SMALL_MAY = {**SMALL_APRIL, "TTT": 1, "TTT_EVAL_SEQ_LEN": 256, "TTT_LORA_RANK": TTT_RANK, "QUANT_MIN_NUMEL": 4096,
             "GPTQ_CALIB_SEQS": 32, "GLOBAL_TTT_CHUNK_TOKENS": 2048, "COMPRESSOR": "zstd"}
BASELINE = "PRESET=april (small)"
# Training parts, each on top of the baseline, one training per seed. The public schedule 1024,2048,3072 at
# 10% / 70% / 100% of the run, shrunk to end at the small run's 256 (1:2:4, so that the loader's block, the
# lengths' least common multiple, divides the 256-token micro-batch), with its 32-step LR re-ramp scaled like
# the run (32 of about 4,900 steps: 1 to 2 of 100 to 200).
TRAIN_PARTS = {
    "+progressive context 64/128/256": dict(TRAIN_SEQ_SCHEDULE="64@0.1,128@0.7,256@1.0", SEQ_CHANGE_WARMUP_STEPS=2),
    "+AWQ_GROUPS=1": dict(AWQ_GROUPS=1),
}
# Evaluation parts, each scored on the baseline's artifact with the April TTT settings plus the part.
LORA_K_OFF = dict(TTT_LORA_TARGETS="q,v,o,mlp,head")
LORA_ALPHA = dict(TTT_LORA_ALPHA=1.8 * TTT_RANK)  # the public 144 / 80: each adapter's output x 1.8
SHORT_CHUNKS = dict(TTT_SHORT_CHUNKS="256:8,2000:24")
ONE_PHASE = dict(PHASED_TTT_NUM_PHASES=1)
EVAL_PARTS = {
    "+ASYM_LOGIT=1": dict(ASYM_LOGIT=1),
    "+LoRA K-off (q,v,o,mlp,head), alpha 1.8 x rank": {**LORA_K_OFF, **LORA_ALPHA},
    "+short chunks 256:8,2000:24": SHORT_CHUNKS,
    "1 global phase (April: 3)": ONE_PHASE,
    "+NGRAM_TILT=token": dict(NGRAM_TILT="token"),
    "all evaluation parts": dict(ASYM_LOGIT=1, NGRAM_TILT="token", **LORA_K_OFF, **LORA_ALPHA, **SHORT_CHUNKS,
                                 **ONE_PHASE),
}
# Alternatives, not in "all": #1953's mask, and PRESET=may's LoRA LR and weight decay (#2135's).
EVAL_PARTS.update({
    "+LoRA no_qv (k,o,mlp,head)": dict(TTT_LORA_TARGETS="k,o,mlp,head"),
    "+LoRA LR 8e-5, WD 2.0": dict(TTT_LORA_LR=8e-5, TTT_WEIGHT_DECAY=2.0),
})
ALTERNATIVES = ("+LoRA no_qv (k,o,mlp,head)", "+LoRA LR 8e-5, WD 2.0")
# The metrics a table row shows, by what the part can change: a training part every score, an evaluation part
# only TTT's (and the tilted one where it tilts).
TRAIN_METRICS = ("final_float_exact", "final_roundtrip_exact", "final_sliding_window_exact")
BASE_METRICS = TRAIN_METRICS + ("final_ttt_exact",)
SHORT = {"final_float_exact": "float", "final_roundtrip_exact": "quantized", "final_sliding_window_exact": "sliding",
         "final_ttt_exact": "TTT", "final_ttt_ngram_exact": "TTT+tilt"}


def final_bpb(log: str) -> dict[str, float]:
    """{final line name: val_bpb} of a train_gpt.py log (the last of each name)."""
    return {name: float(bpb) for name, _, bpb in FINAL.findall(log)}


def run_id(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


@dataclasses.dataclass(frozen=True)
class Row:
    part: str
    metric: str
    values: tuple[float, ...]  # one per seed
    baseline: tuple[float, ...]  # the baseline's same metric, per seed

    @property
    def deltas(self) -> tuple[float, ...]:
        return tuple(v - b for v, b in zip(self.values, self.baseline))

    @property
    def mean_delta(self) -> float:
        return float(np.mean(self.deltas))

    @property
    def delta_spread(self) -> float:
        """How far apart the seeds' deltas are (max - min): a mean delta not clear of it is not a finding."""
        return max(self.deltas) - min(self.deltas)


def format_table(rows: list[Row], seeds=SEEDS) -> list[str]:
    head = ("| part | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | "
            + " | ".join(f"delta {s}" for s in seeds) + " | mean delta | delta spread |")
    lines = [head, "|" + "---|" * (4 + 2 * len(seeds))]
    for r in rows:
        same = all(d == 0 for d in r.deltas)
        lines.append(f"| {r.part} | {r.metric} | " + " | ".join(f"{v:.5f}" for v in r.values) + " | "
                     + " | ".join("0" if same else f"{d:+.5f}" for d in r.deltas) + " | "
                     + ("0" if same else f"{r.mean_delta:+.5f}") + f" | {r.delta_spread:.5f} |")
    return lines


def rows_for(part: str, results: list[dict[str, float]], baseline: list[dict[str, float]], metrics) -> list[Row]:
    """Rows for the metrics of `metrics` both the part's and the baseline's results have (a tilted score against
    the untilted baseline: the tilt's own effect)."""
    rows = []
    for m in metrics:
        if all(m in r for r in results):
            ref = m if all(m in b for b in baseline) else "final_ttt_exact"
            rows.append(Row(part, SHORT[m], tuple(r[m] for r in results), tuple(b[ref] for b in baseline)))
    return rows


# ---- scoring an artifact with train_gpt.py's TTT ---------------------------------------------------------------


def score(artifact: Path, log_path: Path, env=None) -> None:
    """final_ttt_exact (and final_ttt_ngram_exact with NGRAM_TILT=token) of `artifact` under env's settings, by
    train_gpt.run_ttt, logged to log_path as a run logs them. The model is the artifact's: its config, except
    ASYM_LOGIT, which is the environment's. That is sound because ASYM_LOGIT is a TTT setting kept in the model
    config: training never creates the two soft caps, so the artifact's weights are the same either way
    (GPT.use_asym_logit)."""
    import torch

    import train_gpt as tg
    env = os.environ if env is None else env
    h = tg.Hyperparameters.from_env(env)
    rt = tg.setup_runtime(h, env)
    code = tg.code_form(Path(tg.__file__).read_bytes())
    ctx = tg.RunContext(h, rt, tg.RunState(log_path.stem, h.gptq_reserve_seconds), tg.Logger(log_path), code)
    tg.log_preamble(ctx, env)
    tg.seed_everything(h.seed)
    cfg, weights = tg.load_artifact(artifact)
    cfg = dataclasses.replace(cfg, asym_logit=h.asym_logit)
    ctx.log(f"score artifact:{artifact} asym_logit:{cfg.asym_logit}")
    sp = tg.load_tokenizer(h.tokenizer_path)
    luts = tg.build_byte_luts(sp, cfg.vocab_size).to(rt.device)
    val_np = tg.load_validation_tokens(h.data_path)
    val_tokens = torch.from_numpy(val_np.astype(np.int32)).to(rt.device)
    counter = tg.validation_byte_counter(luts, sp, h.data_path, cfg.bos_id).to(rt.device)
    tg.log_ttt_budget(cfg, val_np, h, ctx.log, windows=False)
    tg.run_ttt(cfg, weights, val_tokens, counter, ctx)


def score_variant(name: str, artifact: Path, overrides: dict, small: dict, args, data: Path) -> str:
    """The log of `artifact` scored with the small config plus overrides (reused when it holds the final line)."""
    log_path = args.out / "scores" / f"{run_id(name)}.txt"
    if log_path.exists() and re.search(r"^final_ttt_exact ", log_path.read_text(), re.M):
        return log_path.read_text()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **small, **{k: str(v) for k, v in overrides.items()}}
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(args.tokenizer), OUT_DIR=str(log_path.parent))
    code = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); import lab.ablate_may as m; "
            f"m.score(Path({str(artifact)!r}), Path({str(log_path)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"scoring {name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    print(f"{name}: scored", file=sys.stderr, flush=True)
    return log_path.read_text()


def finished(path: Path, last: str) -> bool:
    return path.exists() and re.search(rf"^{last} ", path.read_text(), re.M) is not None


def seed_runs(seed: int, vocab: int, small: dict, args, data: Path) -> dict[str, dict[str, float]]:
    """Every run of one seed: {part: {final line: val_bpb}}. The evaluation parts first (they need only the
    baseline's training), then the training parts. With --report nothing runs: only finished logs are read."""
    base = dict(PRESET="april", VOCAB_SIZE=vocab, MLP_MULT=4, SEED=seed, **LAYER_IDS)
    out = {}
    base_name = f"{BASELINE} seed {seed}"
    if args.report and not finished(args.out / "logs" / f"{run_id(base_name)}.txt", "final_ttt_exact"):
        return out
    out[BASELINE] = final_bpb(run_variant(base_name, base, small, args, data))
    artifact = args.out / "logs" / f"{run_id(base_name)}.ptz"
    for part, overrides in EVAL_PARTS.items():
        name = f"{part} seed {seed}"
        if not args.report or finished(args.out / "scores" / f"{run_id(name)}.txt", "final_ttt_exact"):
            out[part] = final_bpb(score_variant(name, artifact, {**base, **overrides}, small, args, data))
    for part, overrides in TRAIN_PARTS.items():  # scored without TTT: its pass would double these runs' time here
        name = f"{part} seed {seed}"
        if not args.report or finished(args.out / "logs" / f"{run_id(name)}.txt", "final_sliding_window_exact"):
            out[part] = final_bpb(run_variant(name, {**base, **overrides, "TTT": 0}, small, args, data))
    return out


def ablate(args) -> None:
    import sentencepiece as spm
    data = prepare_data(args.data, args.out, val_docs=args.val_docs)
    vocab = spm.SentencePieceProcessor(model_file=str(args.tokenizer)).vocab_size()
    small = {k: str(v) for k, v in SMALL_MAY.items()}
    small["PHASED_TTT_PREFIX_DOCS"] = str(args.val_docs // 2)
    small["ITERATIONS"] = str(args.steps)
    with ThreadPoolExecutor(max_workers=len(SEEDS)) as pool:
        results = list(pool.map(lambda s: seed_runs(s, vocab, small, args, data), SEEDS))
    if not all(BASELINE in r for r in results):
        raise SystemExit(f"{args.out}: the baseline has not finished for every seed")
    base = [r[BASELINE] for r in results]
    rows = []
    for part in TRAIN_PARTS:  # a part that has not finished for every seed is left out
        if all(part in r for r in results):
            rows += rows_for(part, [r[part] for r in results], base, TRAIN_METRICS)
    for part in EVAL_PARTS:
        if all(part in r for r in results):
            rows += rows_for(part, [r[part] for r in results], base, ("final_ttt_exact", "final_ttt_ngram_exact"))
    spread = {SHORT[m]: max(b[m] for b in base) - min(b[m] for b in base) for m in BASE_METRICS}
    print("| baseline | " + " | ".join(f"{SHORT[m]} seed {s}" for m in BASE_METRICS for s in SEEDS) + " |")
    print("|---|" + "---|" * (len(BASE_METRICS) * len(SEEDS)))
    print(f"| {BASELINE} | " + " | ".join(f"{b[m]:.5f}" for m in BASE_METRICS for b in base) + " |")
    print("\nseed spread of the baseline (max - min): " + ", ".join(f"{k} {v:.5f}" for k, v in spread.items()))
    print("\n".join(format_table(rows)))


# ---- the predicted evaluation time at full size ----------------------------------------------------------------

BUDGET_PARTS = {  # each on top of PRESET=may
    "PRESET=may": {},
    "+ASYM_LOGIT=1": dict(ASYM_LOGIT=1),
    "+LoRA K-off, alpha 144": dict(TTT_LORA_TARGETS="q,v,o,mlp,head", TTT_LORA_ALPHA=144),
    "+LoRA no_qv (k,o,mlp,head)": dict(TTT_LORA_TARGETS="k,o,mlp,head"),
    "+short chunks 256:8,2000:24": SHORT_CHUNKS,
    "3 global phases (April's)": dict(PHASED_TTT_NUM_PHASES=3),
    "+NGRAM_TILT=token": dict(NGRAM_TILT="token"),
    "+progressive context to 3072 (eval/TTT at 3072)": dict(
        TRAIN_SEQ_SCHEDULE="1024@0.1,2048@0.7,3072@1.0", SEQ_CHANGE_WARMUP_STEPS=32, TRAIN_SEQ_LEN=3072,
        EVAL_SEQ_LEN=3072, EVAL_STRIDE=1536, TTT_EVAL_SEQ_LEN=3072, TTT_BATCH_SIZE=24),
    "+AWQ_GROUPS=1": dict(AWQ_GROUPS=1),
    "all evaluation parts (K-off, alpha 144)": dict(ASYM_LOGIT=1, TTT_LORA_TARGETS="q,v,o,mlp,head",
                                                    TTT_LORA_ALPHA=144, NGRAM_TILT="token", **SHORT_CHUNKS),
    "all evaluation parts, sliding stride 1280": dict(ASYM_LOGIT=1, TTT_LORA_TARGETS="q,v,o,mlp,head",
                                                      TTT_LORA_ALPHA=144, NGRAM_TILT="token", EVAL_STRIDE=1280,
                                                      **SHORT_CHUNKS),
    "PRESET=april (for reference)": dict(PRESET="april"),
}
LEGALITY = re.compile(r"legality ttt_eval (\S+).*")


def budget_line(overrides: dict, tokens: np.ndarray) -> str:
    """train_gpt.py's `legality ttt_eval` line for PRESET=may plus overrides, on the stream `tokens`."""
    import train_gpt as tg
    env = {"PRESET": "may", **{k: str(v) for k, v in overrides.items()}}
    h = tg.Hyperparameters.from_env(env)
    lines = []
    tg.log_ttt_budget(tg.ModelConfig.from_hparams(h), tokens, h, lines.append)
    return next(line for line in lines if line.startswith("legality ttt_eval"))


def stream_of(num_tokens: int, spans: np.ndarray, bos_id: int) -> np.ndarray:
    """A token stream holding the documents `spans` (lab/predict.py's synthetic lengths): BOS at each document's
    start, zeros elsewhere (the budget reads only where the documents are). The synthetic lengths are rounded
    (and at least 2), so the stream is as long as their sum where that exceeds num_tokens."""
    tokens = np.zeros(max(num_tokens, int(spans[-1, 1]) + 1), dtype=np.uint16)
    tokens[spans[:, 0]] = bos_id
    return tokens


LINE_FIELDS = ("predicted_8xh100", "global_sgd", "sgd_steps", "windows", "ngram", "compile", "total", "margin")


def budget(args) -> None:
    import train_gpt as tg
    from lab import predict as pr
    h = tg.Hyperparameters.from_env({"PRESET": "may"})
    tokens = stream_of(*pr.validation(h, args.val_tokens)[:2], h.bos_id)
    print(f"validation: {len(tokens):,} tokens, {int((tokens == h.bos_id).sum()):,} documents (synthetic lengths)\n")
    print("| setting | TTT pass s | of which global SGD s | SGD steps | window passes s | n-gram s | compile s | "
          "total s | margin to 600 s |")
    print("|---|" + "---|" * len(LINE_FIELDS))
    for name, overrides in BUDGET_PARTS.items():
        line = budget_line(overrides, tokens)
        fields = dict(re.findall(r"(\w+):(\S+)", line))
        print(f"| {name} | " + " | ".join(fields[f].rstrip("s") for f in LINE_FIELDS) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=("ablate", "budget"), default="ablate")
    p.add_argument("--data", type=Path, help="folder of fineweb_train_*.bin / fineweb_val_*.bin")
    p.add_argument("--tokenizer", type=Path, help="sentencepiece model of the data")
    p.add_argument("--out", type=Path, default=Path("bench/ablate_may"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=2048, help="TRAIN_BATCH_TOKENS (TRAIN_SEQ_LEN x a multiple of 8)")
    p.add_argument("--val-docs", type=int, default=32)
    p.add_argument("--val-tokens", type=int, help="budget: validation tokens (default: the public count)")
    p.add_argument("--report", action="store_true", help="run nothing: the table of the runs that have finished")
    args = p.parse_args()
    if args.what == "budget":
        budget(args)
    elif args.data is None or args.tokenizer is None:
        p.error("the ablation needs --data and --tokenizer")
    else:
        ablate(args)


if __name__ == "__main__":
    main()
