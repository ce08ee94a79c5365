"""Facts from the public runs' logs, for fitting and checking lab/predict.py (docs/plan.md).

    python3 lab/public_runs.py extract --repo DIR     # DIR: a clone (or bare mirror) of the challenge
                                                      # repository with refs/pull/2135/head fetched; writes
                                                      # lab/public_runs.json
    python3 lab/public_runs.py show                   # the stored facts, one line per seed

Each seed's numbers come from its log (the path and the line of each number are stored beside it); the
configuration from the log's `Hyperparameters:` block, or for the 2026-03-29 record, which logs no such
block, from its README's command over its train_gpt.py defaults (the path is stored too). The validation
documents' lengths (for the TTT prediction without the data) are rebuilt from the phased-TTT logs of the
2026-04-27 record and PR #2135 by lab/ttt_calibrate.py's interpolation and stored as points. Nothing here is our interpretation:
how each run maps onto our settings is lab/predict.py's PUBLIC_AS_OURS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = ROOT / "lab" / "public_runs.json"
TRACK = "records/track_10min_16mb"

# The runs: id -> (git ref, folder, seed logs, where the configuration comes from).
RUNS = {
    "2026-03-29": ("HEAD", f"{TRACK}/2026-03-29_Loader_FullGPTQ_XSA11_BigramHash2816",
                   ("train_seed1337.log", "train_seed42.log", "train_seed2025.log")),
    "2026-04-09": ("HEAD", f"{TRACK}/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT",
                   ("train_seed42.log", "train_seed314.log", "train_seed999.log")),
    "2026-04-27": ("HEAD", f"{TRACK}/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611",
                   ("train_seed42.log", "train_seed0.log", "train_seed1234.log")),
    "pr2135": ("refs/pull/2135/head", f"{TRACK}/2026-05-01_SP8192_PR2130Base_Calib32",
               ("train_seed42.log", "train_seed0.log", "train_seed314.log")),
    "pr2014": ("refs/pull/2014/head", f"{TRACK}/2026-04-30_SP8192_CaseOps_Progressive3k_ShortDocTTT",
               ("train_seed42.log", "train_seed0.log", "train_seed314.log")),
}
# The 2026-03-29 record logs no settings: its README's command (BIGRAM_VOCAB_SIZE=2816 BIGRAM_DIM=112
# XSA_LAST_N=11 USE_GPTQ=1 GPTQ_RESERVE_MS=14000 TTT_ENABLED=0) over its train_gpt.py defaults.
CONFIG_0329 = {"vocab_size": 1024, "num_layers": 11, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4,
               "mlp_mult": 3.0, "train_seq_len": 2048, "train_batch_tokens": 786432, "eval_seq_len": 2048,
               "eval_stride": 64, "bigram_vocab_size": 2816, "bigram_dim": 112, "xsa_last_n": 11,
               "ve_layers": "9,10", "ve_dim": 128, "use_gptq": 1, "gptq_calib_samples": 64,
               "gptq_reserve_ms": 14000, "ttt_enabled": 0, "quant_clip_range": 31, "compressor": "lzma",
               "max_wallclock_seconds": 600.0, "world_size": 8}
DOC_LENGTH_RUNS = ("2026-04-27", "pr2135")  # their TTT logs show the length range of each batch of documents
DOC_BATCH = re.compile(r"^ttp: b(\d+)/(\d+) .* dl:(\d+)-(\d+)", re.M)
DOCUMENTS, DOC_BATCH_SIZE = 50_000, 64
DOC_TOP, DOC_TOP_STEP, DOC_QUANTILES = 3000, 5, 400  # stored points: the longest documents densely, then the rest

NUM = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
# name -> pattern; the first group is the value (the last match in the log counts). Every log format the
# four runs use is covered; a run lacks the facts its code does not log.
PATTERNS = {
    "model_params": r"^model_params:(\d+)",
    "val_tokens": r"^val_(?:loader:shards .* )?tokens:\s?(\d+)",
    "steps": r"^stopping_early: wallclock_cap train_time:\s?\d+ms step:\s?(\d+)",
    "train_time_ms": r"^stopping_early: wallclock_cap train_time:\s?(\d+)ms",
    "loop_start_step": r"^layer_loop:enabled step:(\d+)",
    "loop_start_frac": r"^layer_loop:enabled step:\d+ frac:" + NUM,
    "gptq_reserve_s": r"^gptq:reserving (\d+(?:\.\d+)?)s",
    "gptq_reserve_ms": r"^gptq:reserving (\d+)ms",
    "peak_alloc_mib": r"^peak memory allocated: (\d+) MiB",
    "peak_reserved_mib": r"^peak memory allocated: \d+ MiB reserved: (\d+) MiB",
    "float_bpb": r"post[-_]ema val_loss:\S+ val_bpb:" + NUM,
    "float_eval_s": r"post[-_]ema val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms",
    "bytes_code": r"^Code size(?: \(compressed\))?: (\d+) bytes",
    "bytes_code_uncompressed": r"^Code size \(uncompressed\): (\d+) bytes",
    "hessian_s": r"^(?:gptq:calibrated \d+ layers|GPTQ:collected \d+ Hessians) in " + NUM + "s",
    "bytes_model": r"^Serialized model (?:int6\+lzma|quantized\+\w+): (\d+) bytes",
    "bytes_total": r"^Total submission size \S+: (\d+) bytes",
    "compress_s": r"^(?:Serialize: per-group compression done in|pergroup:similarity sort done in) " + NUM + "s",
    "decompress_s": r"^Deserialize: decompression done in " + NUM + "s",
    "quantized_bpb": r"^(?:final_int6_roundtrip_exact|quantized|diagnostic quantized) val_loss:\S+ val_bpb:" + NUM,
    "roundtrip_eval_s": r"^(?:final_int6_roundtrip|quantized|diagnostic quantized) val_loss:\S+ val_bpb:\S+ "
                        r"eval_time:(\d+)ms",
    "sliding_bpb": r"^(?:final_int6_sliding_window_exact|quantized_sliding_window) val_loss:\S+ val_bpb:" + NUM,
    "sliding_eval_s": r"^(?:final_int6_sliding_window|quantized_sliding_window) val_loss:\S+ val_bpb:\S+ "
                      r"(?:stride:\d+ )?eval_time:(\d+)ms",
    "ttt_bpb": r"^quantized_ttt(?:_phased)? val_loss:\S+ val_bpb:" + NUM,
    "ttt_eval_s": r"^quantized_ttt(?:_phased)? val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms",
    "ttt_compile_s": r"^ttt_lora:compile warmup done \(" + NUM + "s\\)",
    "ngram_precompute_s": r"^ngram_tilt:precompute_done elapsed=" + NUM + "s",
    "total_eval_s": r"^total_eval_time:" + NUM + "s",
}
MILLISECONDS = {"float_eval_s", "roundtrip_eval_s", "sliding_eval_s", "ttt_eval_s"}  # logged in ms, stored in s
SETTING = re.compile(r"^  (\w+): (.*)$")
# The phased TTT's global SGD logs each step (`tttg: cN/M ... t:S`, S since the phase's SGD began; N restarts
# at 1 each phase): its steps and seconds, summed over the phases.
SGD_STEP = re.compile(r"^tttg: c(\d+)/\d+ lr:\S+ t:([\d.]+)s")
# Where the step shape changes: the loop's start (`layer_loop:enabled step:S frac:F`) and a new sequence length
# (`growth_stage:seq_len:L progress:F step:S`, PR #2014's TRAIN_SEQ_SCHEDULE).
SHAPE_CHANGE = re.compile(r"^(?:layer_loop:enabled step:(\d+) frac:([\d.]+)|growth_stage:seq_len:\d+ progress:([\d.]+) "
                          r"step:(\d+))")


def git_show(repo: Path, ref: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def read_log(text: str) -> tuple[dict, dict, dict]:
    """(facts, the line number of each fact, the `Hyperparameters:` block's settings)."""
    facts, lines, settings = {}, {}, {}
    sgd_phases = []  # (steps, seconds) of each phase's global SGD
    changes = []  # (share of the budget, step) where the step shape changed
    for number, line in enumerate(text.splitlines(), 1):
        if m := SHAPE_CHANGE.match(line):
            changes.append((float(m[2]), int(m[1])) if m[1] else (float(m[3]), int(m[4])))
            lines.setdefault("shape_changes", number)
        if m := SGD_STEP.match(line):
            step, seconds = int(m[1]), float(m[2])
            if step == 1 or not sgd_phases:
                sgd_phases.append((0, 0.0))
            sgd_phases[-1] = (step, seconds)
            lines.setdefault("global_sgd_steps", number)
            continue
        if m := SETTING.match(line):
            settings[m[1]] = parse_value(m[2].strip())
            continue
        for name, pattern in PATTERNS.items():
            if m := re.search(pattern, line):
                value = parse_value(m[1])
                facts[name] = value / 1000 if name in MILLISECONDS else value
                lines[name] = number
    if changes:
        facts["shape_changes"] = sorted(changes)
    if sgd_phases:
        facts["global_sgd_steps"] = sum(n for n, _ in sgd_phases)
        facts["global_sgd_s"] = round(sum(t for _, t in sgd_phases), 3)
        lines["global_sgd_s"] = lines["global_sgd_steps"]
    if "gptq_reserve_ms" in facts:
        facts["gptq_reserve_s"] = facts.pop("gptq_reserve_ms") / 1000
        lines["gptq_reserve_s"] = lines.pop("gptq_reserve_ms")
    return facts, lines, settings


def derived(facts: dict) -> dict:
    """Step times: the whole run's mean, and the mean of each share of the budget with one step shape (cut where
    the loop starts and where the sequence length changes; the budget is the last step's training time, within
    a step), as [start share, end share, ms per step]."""
    out = {}
    if "steps" in facts:
        out["ms_per_step"] = round(facts["train_time_ms"] / facts["steps"], 3)
        cuts = [(0.0, 0), *facts.get("shape_changes", []), (1.0, facts["steps"])]
        out["segments"] = [[a, b, round((b - a) * facts["train_time_ms"] / (t - s), 3)]
                           for (a, s), (b, t) in zip(cuts, cuts[1:])]
    return out


def document_lengths(repo: Path) -> np.ndarray:
    """The 50,000 validation documents' lengths (CaseOps sp8192 tokens), longest first, rebuilt from the
    phased-TTT logs of the 2026-04-27 record and PR #2135 (six seeds): each `ttp: bN/782 ... dl:LO-HI` line gives
    the shortest and longest document of batch N (64 documents of similar length; batch 782, the longest, holds
    the last 16); lab/ttt_calibrate.py spreads each batch's lengths over its range and interpolates the
    batches no log shows."""
    sys.path.insert(0, str(ROOT))
    from lab import ttt_calibrate
    batches, total = {}, 0
    for run_id in DOC_LENGTH_RUNS:
        ref, folder, logs = RUNS[run_id]
        for log in logs:
            for n, total_, lo, hi in DOC_BATCH.findall(git_show(repo, ref, f"{folder}/{log}")):
                batches[int(n)], total = (int(lo), int(hi)), int(total_)
    run = ttt_calibrate.PublicRun({}, batches, total, DOCUMENTS, [])
    return np.sort(np.concatenate(ttt_calibrate.document_lengths(run, DOC_BATCH_SIZE)))[::-1], len(batches), total


def document_points(repo: Path) -> dict:
    """The rebuilt lengths as (rank, length) points, rank 0 the longest: every DOC_TOP_STEP-th of the longest
    DOC_TOP documents (the global TTT phases learn from them; their sum sets its steps), then DOC_QUANTILES
    points over the rest."""
    lengths, seen, total = document_lengths(repo)
    ranks = sorted(set(range(0, DOC_TOP, DOC_TOP_STEP)) |
                   set(np.linspace(DOC_TOP, len(lengths) - 1, DOC_QUANTILES).round().astype(int).tolist()))
    return {"source": f"the `ttp: bN/{total} ... dl:LO-HI` lines of {', '.join(DOC_LENGTH_RUNS)} "
                      f"({seen} of {total} batches), rebuilt by lab/ttt_calibrate.document_lengths",
            "documents": int(len(lengths)), "tokens": int(lengths.sum()), "vocab": "sp8192 CaseOps",
            "ranks": ranks, "lengths": [int(lengths[r]) for r in ranks]}


def extract(repo: Path) -> dict:
    out = {"about": "Facts from the public runs' logs (challenge repository, mirrored); written by "
                    "`python3 lab/public_runs.py extract`. Each seed: its log's path, the numbers, the line of "
                    "each number; times in seconds unless named _ms.",
           "runs": {}}
    for run_id, (ref, folder, logs) in RUNS.items():
        seeds = {}
        config = {}
        for log in logs:
            text = git_show(repo, ref, f"{folder}/{log}")
            facts, lines, settings = read_log(text)
            facts.update(derived(facts))
            seed = str(settings.get("seed", re.search(r"seed(\d+)", log)[1]))
            seeds[seed] = {"log": f"{ref}:{folder}/{log}", "facts": facts, "lines": lines}
            config = settings or config
        source = f"{ref}:{folder}/{logs[0]} (Hyperparameters block)"
        if not config:
            config, source = dict(CONFIG_0329), f"{ref}:{folder}/README.md (command) + train_gpt.py (defaults)"
        config.pop("seed", None)
        for volatile in ("run_id", "logfile", "rank", "local_rank", "is_main_process"):
            config.pop(volatile, None)
        out["runs"][run_id] = {"folder": f"{ref}:{folder}", "config_source": source, "config": config,
                               "seeds": seeds}
    out["val_documents"] = document_points(repo)
    return out


def dumps(value, indent: int = 0) -> str:
    """JSON with one key per line and every list on one line (a list holds numbers here)."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    pad = " " * (indent + 1)
    items = ",\n".join(f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items())
    return "{\n" + items + "\n" + " " * indent + "}"


def load() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def show(data: dict) -> None:
    for run_id, run in data["runs"].items():
        for seed, s in run["seeds"].items():
            f = s["facts"]
            print(f"{run_id} seed {seed}: " + " ".join(f"{k}:{v}" for k, v in f.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("extract", "show"))
    ap.add_argument("--repo", type=Path, help="the challenge repository (a git directory); extract needs it")
    args = ap.parse_args()
    if args.command == "extract":
        if args.repo is None:
            ap.error("extract needs --repo")
        data = extract(args.repo)
        DATA_FILE.write_text(dumps(data) + "\n", encoding="utf-8")
        print(f"wrote {DATA_FILE}")
    show(load())


if __name__ == "__main__":
    main()
