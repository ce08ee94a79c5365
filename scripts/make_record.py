"""Write the record folder for a pull request from a finished seed sweep.

    python scripts/make_record.py runs/my_idea --name "11L XSA GPTQ" --author "Ada Lovelace" \\
        --github-id ada --blurb "one line on what changed" --baseline-val-loss 1.8911 1.8935 1.8902

writes records/track_10min_16mb/<date>_<Name>/ (docs/challenge.md) with README.md (results, checks,
significance, the exact command, timings, byte counts), submission.json, train_gpt.py (the code the
logs ran, as embedded in them), every seed's log as train_seed<S>.log, requirements.txt (the package
versions the logs name) and train_curves.png. Every number comes from the logs.

Nothing is written unless every check passes: each seed's artifact (shipped train_gpt.py + its
compressed model) under 16,000,000 bytes, training and evaluation each at most 600 s, and the
improvement over the current record significant (see scripts/summarize.py). A failure names each
failed check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files only: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402

if __package__ in (None, ""):
    # Run as a script (python scripts/make_record.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.compact_train_gpt import write_compact  # noqa: E402
from scripts.runlog import SUBMISSION_METRIC, RunLog, common_value, load_runs  # noqa: E402
from scripts.summarize import (MIN_IMPROVEMENT_NATS, SIGNIFICANCE_P, WelchTest, describe_test,  # noqa: E402
                               markdown_table, mean_std, seed_table, welch_one_sided)

ROOT = Path(__file__).resolve().parent.parent
RECORDS_DIR = ROOT / "records" / "track_10min_16mb"
# The challenge's limits (docs/challenge.md), checked here whatever train_gpt.py was told.
ARTIFACT_CAP_BYTES = 16_000_000
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
# Set by the launcher (torchrun) or per seed by the sweep: not part of the command a reader reruns.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SEED", "RUN_ID", "OUT_DIR")
PLOT_NAME = "train_curves.png"


class RecordError(RuntimeError):
    """The record cannot be written; the message lists what failed."""


@dataclass(frozen=True)
class Meta:
    name: str
    author: str
    github_id: str
    blurb: str
    date: str


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def ship_train_gpt(src: Path, dst: Path) -> None:
    """The one place that decides the form of the shipped train_gpt.py, whose bytes count against the
    cap: the self-extracting compact form of the source the logs ran (brotli + base85 + exec)."""
    write_compact(src, dst)


def folder_name(meta: Meta) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", meta.name).strip("_")
    if not slug:
        raise RecordError(f"--name {meta.name!r} has no letters or digits for the folder name")
    return f"{meta.date}_{slug}"


def shipped_totals(runs: list[RunLog], code_bytes: int) -> dict[int, int]:
    """Each seed's artifact as submitted: the shipped code plus the model bytes its log reports."""
    return {r.seed: code_bytes + r.artifact["bytes_model"] for r in runs}


def largest(values: dict[int, float]) -> tuple[int, float]:
    """(seed, value) of the seed with the largest value."""
    seed = max(values, key=values.get)
    return seed, values[seed]


def record_checks(runs: list[RunLog], totals: dict[int, int], test: WelchTest) -> list[Check]:
    b_seed, b_max = largest(totals)
    t_seed, t_max = largest({r.seed: r.train_time_ms / 1000 for r in runs})
    e_seed, e_max = largest({r.seed: r.eval_time_ms / 1000 for r in runs})
    return [
        Check("artifact size", b_max < ARTIFACT_CAP_BYTES,
              f"bytes_total must be under {ARTIFACT_CAP_BYTES:,} for every seed: largest {b_max:,} (seed {b_seed})"),
        Check("train time", t_max <= TRAIN_LIMIT_S,
              f"training must take at most {TRAIN_LIMIT_S:.0f} s: longest {t_max:.3f} s (seed {t_seed})"),
        Check("eval time", e_max <= EVAL_LIMIT_S,
              f"the final evaluations must take at most {EVAL_LIMIT_S:.0f} s in all: longest {e_max:.3f} s "
              f"(seed {e_seed})"),
        Check("significance", test.significant(),
              f"the mean val_loss must beat the baseline by more than {MIN_IMPROVEMENT_NATS} nats at "
              f"p < {SIGNIFICANCE_P}: p = {test.p_value:.3g}"),
    ]


def launch_line(runs: list[RunLog]) -> str:
    """The command every seed ran, rebuilt from the logs' `env` and `runtime` lines."""
    env = common_value(runs, "the environment (the `env` line, but the seed)",
                       lambda r: tuple((k, v) for k, v in r.env.items() if k not in LAUNCH_VARS))
    nproc = common_value(runs, "the number of processes (`runtime world_size`)", lambda r: r.world_size)
    launcher = ("python train_gpt.py" if nproc == 1 else
                f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py")
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env] + ["SEED=$SEED", launcher])


def requirements_text(runs: list[RunLog]) -> str:
    versions = common_value(runs, "package versions (the `versions` line)", lambda r: tuple(r.versions.items()))
    lines = ["# The packages and versions the logged runs used (their `versions` line)."]
    for package, version in versions:
        if package != "python":
            release, _, build = version.partition("+")  # a build tag such as +cu128 is not on PyPI
            lines.append(f"{package}=={release}" + (f"  # build {version}" if build else ""))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Record:
    """Everything the folder says, computed before anything is written."""
    runs: list[RunLog]
    meta: Meta
    baseline: list[float]
    test: WelchTest
    code_bytes: int  # of the shipped train_gpt.py
    totals: dict[int, int]  # seed -> shipped bytes_total
    checks: list[Check]
    command: str
    requirements: str


def submission_json(rec: Record) -> dict:
    runs = rec.runs
    loss_mean, loss_std = mean_std([r.submission.val_loss for r in runs])
    bpb_mean, bpb_std = mean_std([r.submission.val_bpb for r in runs])
    per_seed = {str(r.seed): {"val_loss": r.submission.val_loss, "val_bpb": r.submission.val_bpb,
                              "steps": r.steps, "train_time_ms": r.train_time_ms, "eval_time_ms": r.eval_time_ms,
                              "bytes_model": r.artifact["bytes_model"], "bytes_total": rec.totals[r.seed]}
                for r in runs}
    return {
        "author": rec.meta.author, "github_id": rec.meta.github_id, "name": rec.meta.name,
        "blurb": rec.meta.blurb, "date": rec.meta.date,
        "val_loss": round(loss_mean, 8), "val_bpb": round(bpb_mean, 8), "bytes_total": max(rec.totals.values()),
        "bytes_code": rec.code_bytes, "metric": SUBMISSION_METRIC,
        "seeds": [r.seed for r in runs], "seed_results": per_seed,
        "val_loss_std": round(loss_std, 8), "val_bpb_std": round(bpb_std, 8),
        "baseline_val_loss": rec.baseline, "t_stat": rec.test.t, "df": rec.test.df, "p_value": rec.test.p_value,
        "code_sha256": runs[0].code_hash,
    }


def readme_text(rec: Record) -> str:
    runs, meta, sub = rec.runs, rec.meta, submission_json(rec)
    seeds = " ".join(str(r.seed) for r in runs)
    bytes_rows = [[str(r.seed), str(r.artifact["bytes_model"]), str(rec.code_bytes), str(rec.totals[r.seed])]
                  for r in runs]
    return f"""# {meta.name}

{meta.blurb}

**val_bpb {sub['val_bpb']:.8f}** (std {sub['val_bpb_std']:.8f}), val_loss {sub['val_loss']:.8f} nats
(std {sub['val_loss_std']:.8f}): mean of {len(runs)} seeds ({seeds}); largest artifact {sub['bytes_total']:,}
bytes. The submission number is `{SUBMISSION_METRIC}`. By {meta.author} (@{meta.github_id}), {meta.date}.

## Results (from the logs)

Per seed: steps, training time, evaluation time (the sum over the final evaluations), bytes_total as
logged, and val_loss / val_bpb of every final evaluation; then mean and sample std.

{markdown_table(*seed_table(runs))}

## Significance

{describe_test([r.submission.val_loss for r in runs], rec.baseline, rec.test)}.
Baseline (the current record) per-seed val_loss: {', '.join(f'{v:.8f}' for v in rec.baseline)}.

## Checks

{chr(10).join(f"- {c.name}: {'pass' if c.ok else 'FAIL'}: {c.detail}" for c in rec.checks)}

## Byte counts

The shipped `train_gpt.py` is {rec.code_bytes:,} bytes; each seed's artifact is that plus its compressed
model.

{markdown_table(["seed", "bytes_model", "bytes_code", "bytes_total"], bytes_rows)}

## What the run does

{meta.blurb}

It is this folder's `train_gpt.py` with the settings of the command below (every other setting at
its default; every value is in the `hparam` lines of each log). Training stops at the wallclock cap
or the step limit; then the weights are quantized, compressed, reloaded and evaluated.
Hardware: {runs[0].world_size} x {runs[0].gpu or "CPU"}.

## Command

```bash
for SEED in {seeds}; do
  {rec.command}
done
```

Code sha256 `{runs[0].code_hash}`.

## Files

- `train_gpt.py`: the code the logs ran; `requirements.txt`: the package versions they used.
- {', '.join(f'`train_seed{r.seed}.log`' for r in runs)}: the full log of each seed.
- `submission.json`; `{PLOT_NAME}`: train loss and val bpb against training time for every seed.
"""


def plot_curves(runs: list[RunLog], path: Path) -> None:
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        ax_loss.plot([t for t, _ in run.train_curve], [v for _, v in run.train_curve], label=f"seed {run.seed}")
        ax_bpb.plot([t for t, _ in run.val_curve], [v for _, v in run.val_curve], marker=".", label=f"seed {run.seed}")
    for ax, ylabel in ((ax_loss, "train loss (nats)"), (ax_bpb, "val bpb")):
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare(logs: list[str | Path], meta: Meta, baseline: list[float], shipped: Path) -> Record:
    """Read and check the sweep; ship train_gpt.py (from the logs' embedded source) to `shipped`."""
    runs = load_runs(logs)
    readable = shipped.with_name("readable_train_gpt.py")
    readable.write_text(runs[0].source, encoding="utf-8")
    ship_train_gpt(readable, shipped)
    code_bytes = shipped.stat().st_size
    totals = shipped_totals(runs, code_bytes)
    test = welch_one_sided([r.submission.val_loss for r in runs], baseline)
    return Record(runs, meta, baseline, test, code_bytes, totals, record_checks(runs, totals, test),
                  launch_line(runs), requirements_text(runs))


def write_record(rec: Record, shipped: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    shutil.copyfile(shipped, folder / "train_gpt.py")
    for run in rec.runs:
        shutil.copyfile(run.path, folder / f"train_seed{run.seed}.log")
    (folder / "requirements.txt").write_text(rec.requirements, encoding="utf-8")
    (folder / "submission.json").write_text(json.dumps(submission_json(rec), indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(readme_text(rec), encoding="utf-8")
    plot_curves(rec.runs, folder / PLOT_NAME)


def make_record(logs: list[str | Path], meta: Meta, baseline: list[float], records_dir: Path = RECORDS_DIR) -> Path:
    """Check the sweep, then write the record folder and return it; writes nothing if a check fails."""
    folder = records_dir / folder_name(meta)
    if folder.exists():
        raise RecordError(f"{folder} already exists: remove it to write it again")
    with tempfile.TemporaryDirectory() as tmp:
        shipped = Path(tmp) / "train_gpt.py"
        rec = prepare(logs, meta, baseline, shipped)
        if failed := [c for c in rec.checks if not c.ok]:
            raise RecordError("not written, failed checks:\n  " + "\n  ".join(f"{c.name}: {c.detail}" for c in failed))
        write_record(rec, shipped, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log files, or sweep folders (their *.txt logs)")
    parser.add_argument("--name", required=True, help="the submission's name; the folder is <date>_<name>")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", required=True, help="one or two sentences on what the run does")
    parser.add_argument("--baseline-val-loss", type=float, nargs="+", required=True, metavar="NATS",
                        help="per-seed val_loss of the current record (the run to beat)")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), type=iso_date, help="YYYY-MM-DD")
    parser.add_argument("--records-dir", type=Path, default=RECORDS_DIR)
    args = parser.parse_args(argv)
    meta = Meta(args.name, args.author, args.github_id, args.blurb, args.date)
    try:
        print(f"make_record: wrote {make_record(args.logs, meta, args.baseline_val_loss, args.records_dir)}")
    except (RecordError, ValueError) as e:  # ValueError: bad logs (LogError) or too few values for the test
        sys.exit(f"make_record: {e}")


def iso_date(text: str) -> str:
    return datetime.date.fromisoformat(text).isoformat()


if __name__ == "__main__":
    main()
