"""Write the record folder for a pull request from a finished seed sweep.

    python scripts/make_record.py runs/my_idea --name "11L XSA GPTQ" --author "Ada Lovelace" \\
        --github-id ada --blurb "one line on what changed" --baseline-val-loss 1.8911 1.8935 1.8902

writes records/track_10min_16mb/<date>_<Name>/ (docs/challenge.md; records/README.md) with README.md
(results, checks, significance, the exact command, timings, byte counts), submission.json (the fields
the challenge's records use), train_gpt.py (the compact form of the code the logs ran:
the file whose bytes count), train_gpt_readable.py (the same code, readable: not counted), every
seed's log as train_seed<S>.log, requirements.txt (the package versions the logs name) and
train_curves.png. Every number comes from the logs; every byte count is the shipped files'.

A record is written only if every check passes: each seed's artifact (shipped train_gpt.py + its
compressed model) under 16,000,000 bytes, training and evaluation each at most 600 s, the improvement
over the current record significant (see scripts/summarize.py), the challenge's published validation
data and tokenizer (the logs' `dataset` line), and 8 x H100. A failure names each failed check.
With --non-record the folder goes to records/track_non_record_16mb/ instead; only the artifact cap
must hold, and the README says which record checks failed (why it is not a record).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
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
from scripts.runlog import RunLog, common_value, load_runs  # noqa: E402
from scripts.summarize import (MIN_IMPROVEMENT_NATS, SIGNIFICANCE_P, WelchTest, describe_test,  # noqa: E402
                               markdown_table, mean_std, seed_table, welch_one_sided)
from train_gpt import compact_program  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECORDS_ROOT = ROOT / "records"
# track -> (folder under records/, the `track` field of submission.json)
TRACKS = {"record": ("track_10min_16mb", "10min_16mb"), "non-record": ("track_non_record_16mb", "non_record_16mb")}
# The challenge's limits (docs/challenge.md), checked here whatever train_gpt.py was told.
ARTIFACT_CAP_BYTES = 16_000_000
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
RECORD_WORLD_SIZE, RECORD_GPU = 8, "H100"
# Repositories publishing the challenge's data in its manifest layout: the organisers' (sp1024) and the
# community one the accepted sp4096 / sp8192 records used.
PUBLISHED_DATA_REPOS = ("willdepueoai/parameter-golf", "kevclark/parameter-golf")
# Set by the launcher (torchrun) or per seed by the sweep: not part of the command a reader reruns.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SEED", "RUN_ID", "OUT_DIR")
PLOT_NAME = "train_curves.png"
PLAN_FILE = "plan.json"  # scripts/plan.py --json, which scripts/sweep.py writes into the sweep's folder
SHIPPED, READABLE = "train_gpt.py", "train_gpt_readable.py"


class RecordError(RuntimeError):
    """The record cannot be written; the message lists what failed."""


@dataclass(frozen=True)
class Meta:
    name: str
    author: str
    github_id: str
    blurb: str
    date: str  # UTC timestamp YYYY-MM-DDTHH:MM:SSZ, as the challenge's submission.json files write it


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    record_only: bool = True  # a non-record folder needs only the checks with record_only False


def ship_train_gpt(src: Path, dst: Path) -> None:
    """The one place that decides the form of the shipped train_gpt.py, whose bytes count against the
    cap: the compact form of the source the logs ran (minified, ZPAQ, exec: train_gpt.compact_code)."""
    write_compact(src, dst)


def folder_name(meta: Meta) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", meta.name).strip("_")
    if not slug:
        raise RecordError(f"--name {meta.name!r} has no letters or digits for the folder name")
    return f"{meta.date[:10]}_{slug}"


def shipped_totals(runs: list[RunLog], code_bytes: int) -> dict[int, int]:
    """Each seed's artifact as submitted: the shipped code plus the model bytes its log reports."""
    return {r.seed: code_bytes + r.artifact["bytes_model"] for r in runs}


def largest(values: dict[int, float]) -> tuple[int, float]:
    """(seed, value) of the seed with the largest value."""
    seed = max(values, key=values.get)
    return seed, values[seed]


def data_check(runs: list[RunLog]) -> Check:
    """The challenge's published validation shards and tokenizer, as each log's `dataset` line says."""
    bad = {r.seed: r.dataset for r in runs
           if r.dataset.get("source") != "challenge" or r.dataset.get("repo") not in PUBLISHED_DATA_REPOS}
    hashes = {(r.dataset.get("val_sha256"), r.dataset.get("tokenizer_sha256")) for r in runs}
    if bad:
        seed, info = next(iter(bad.items()))
        why = (f"seed {seed}: source:{info.get('source', '(no dataset line)')} repo:{info.get('repo', '-')} "
               f"{info.get('reason', '')}".rstrip())
        detail = (f"validation data and tokenizer must be the challenge's published ones (fetched by "
                  f"data/cached_challenge_fineweb.py from {' or '.join(PUBLISHED_DATA_REPOS)}): {why}")
        return Check("data", False, detail)
    if len(hashes) > 1:
        return Check("data", False, "the seeds ran on different validation data or tokenizers (sha256 differ)")
    val, tok = hashes.pop()
    return Check("data", True, f"the challenge's published data, val sha256 {val[:16]}..., "
                               f"tokenizer sha256 {tok[:16]}...")


def hardware_check(runs: list[RunLog]) -> Check:
    found = sorted({f"{r.world_size} x {r.gpu or 'CPU'}" for r in runs})
    ok = all(r.world_size == RECORD_WORLD_SIZE and RECORD_GPU in (r.gpu or "") for r in runs)
    return Check("hardware", ok, f"the track runs on {RECORD_WORLD_SIZE} x {RECORD_GPU}: {', '.join(found)}")


def record_checks(runs: list[RunLog], totals: dict[int, int], test: WelchTest | None) -> list[Check]:
    b_seed, b_max = largest(totals)
    t_seed, t_max = largest({r.seed: r.train_time_ms / 1000 for r in runs})
    e_seed, e_max = largest({r.seed: r.eval_time_ms / 1000 for r in runs})
    significance = (Check("significance", test.significant(),
                          f"the mean val_loss must beat the baseline by more than {MIN_IMPROVEMENT_NATS} nats at "
                          f"p < {SIGNIFICANCE_P}: p = {test.p_value:.3g}") if test else
                    Check("significance", False, "no --baseline-val-loss: nothing to beat"))
    return [
        Check("artifact size", b_max < ARTIFACT_CAP_BYTES,
              f"bytes_total must be under {ARTIFACT_CAP_BYTES:,} for every seed: largest {b_max:,} (seed {b_seed})",
              record_only=False),
        Check("train time", t_max <= TRAIN_LIMIT_S,
              f"training must take at most {TRAIN_LIMIT_S:.0f} s: longest {t_max:.3f} s (seed {t_seed})"),
        Check("eval time", e_max <= EVAL_LIMIT_S,
              f"the final evaluations must take at most {EVAL_LIMIT_S:.0f} s in all: longest {e_max:.3f} s "
              f"(seed {e_seed})"),
        significance,
        data_check(runs),
        hardware_check(runs),
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


def find_plan(logs: list[str | Path]) -> dict | None:
    """The plan scripts/plan.py wrote beside the logs (a sweep folder's plan.json), or None."""
    for p in map(Path, logs):
        path = (p if p.is_dir() else p.parent) / PLAN_FILE
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def plan_section(runs: list[RunLog], plan: dict | None, totals: dict[int, int]) -> str:
    """The plan beside what the logs measured: a line or two of the README."""
    if plan is None:
        return (f"No `{PLAN_FILE}` beside the logs: the run was not planned (`python3 scripts/plan.py --json "
                f"{PLAN_FILE}`; scripts/sweep.py writes one).")
    differ = sorted(k for k in runs[0].configuration() if k in plan["h"] and str(plan["h"][k]) != runs[0].hparams[k])
    ms = sum(r.train_time_ms / r.steps for r in runs) / len(runs)
    steps = sum(r.steps for r in runs) / len(runs)
    planned_ms = 1000 * plan["train"]["train_s"] / max(1, plan["train"]["steps"])
    seconds = max(r.eval_time_ms for r in runs) / 1000
    total = max(totals.values())
    text = (f"Planned (scripts/plan.py) against measured: {planned_ms:.3g} against {ms:.3g} ms/step, "
            f"{plan['train']['steps']:,} against {steps:,.0f} steps, bytes_total {plan['artifact']['bytes_total']:,} "
            f"against {total:,} (largest seed), evaluation {plan['evaluation']['total_s']:.0f} against {seconds:.0f} s "
            f"(longest seed). The plan predicts 8 x H100.")
    if differ:
        text += f" The plan was made for other settings: {', '.join(differ)} differ from the logs'."
    return text


@dataclass(frozen=True)
class Record:
    """Everything the folder says, computed before anything is written."""
    runs: list[RunLog]
    meta: Meta
    baseline: list[float] | None
    test: WelchTest | None
    code_bytes: int  # of the shipped train_gpt.py
    readable_bytes: int  # of the readable train_gpt.py it is made from (not counted)
    totals: dict[int, int]  # seed -> shipped bytes_total
    checks: list[Check]
    command: str
    requirements: str
    track: str  # "record" or "non-record"
    plan: dict | None = None  # scripts/plan.py's prediction for the sweep, when it wrote one

    def failed(self, record_only: bool | None = None) -> list[Check]:
        return [c for c in self.checks if not c.ok and (record_only is None or c.record_only == record_only)]


def hardware_text(runs: list[RunLog]) -> str:
    return f"{runs[0].world_size}x{runs[0].gpu or 'CPU'}"


def mean_of(runs: list[RunLog], name: str, field: str) -> float | None:
    values = [getattr(r.finals[name], field) for r in runs if name in r.finals]
    return round(mean_std(values)[0], 8) if len(values) == len(runs) else None


def submission_json(rec: Record) -> dict:
    """The fields the challenge's records write (author ... bytes_code, track, seeds, seed_results with
    artifact_bytes, hardware, pytorch_version, pre_quant_*), then ours (the test, the code hash)."""
    runs = rec.runs
    loss_mean, loss_std = mean_std([r.submission.val_loss for r in runs])
    bpb_mean, bpb_std = mean_std([r.submission.val_bpb for r in runs])
    per_seed = {str(r.seed): {"val_loss": r.submission.val_loss, "val_bpb": r.submission.val_bpb,
                              "artifact_bytes": rec.totals[r.seed], "bytes_model": r.artifact["bytes_model"],
                              "steps": r.steps, "train_time_s": round(r.train_time_ms / 1000, 3),
                              "eval_time_s": round(r.eval_time_ms / 1000, 3), "resumed_at_steps": r.resumed_at}
                for r in runs}
    sub = {
        "author": rec.meta.author, "github_id": rec.meta.github_id, "name": rec.meta.name,
        "blurb": rec.meta.blurb, "date": rec.meta.date, "track": TRACKS[rec.track][1],
        "val_loss": round(loss_mean, 8), "val_bpb": round(bpb_mean, 8),
        "bytes_total": max(rec.totals.values()), "bytes_code": rec.code_bytes,
        "val_loss_std": round(loss_std, 8), "val_bpb_std": round(bpb_std, 8),
        "seeds": [r.seed for r in runs], "seed_results": per_seed,
        "hardware": hardware_text(runs), "pytorch_version": runs[0].versions.get("torch"),
        "pre_quant_val_loss": mean_of(runs, "final_float_exact", "val_loss"),
        "pre_quant_val_bpb": mean_of(runs, "final_float_exact", "val_bpb"),
        "metric": runs[0].submission_metric, "code_sha256": runs[0].code_hash,
    }
    if rec.test:
        sub.update(baseline_val_loss=rec.baseline, t_stat=rec.test.t, df=rec.test.df, p_value=rec.test.p_value)
    if rec.track == "non-record":
        sub["not_a_record_because"] = [f"{c.name}: {c.detail}" for c in rec.failed(record_only=True)]
    return sub


def code_section(rec: Record) -> str:
    return f"""## The code: which file counts

`{SHIPPED}` ({rec.code_bytes:,} bytes) is the file that runs and the one whose bytes count against the cap:
`{READABLE}` minified (python-minifier), compressed (ZPAQ) and executed under the name `train_gpt.py`
(it needs the `zpaq` package: requirements.txt). `{READABLE}` ({rec.readable_bytes:,} bytes, not
counted) is the same code to read; its sha256 is the second line of `{SHIPPED}`. To check that
`{SHIPPED}` is exactly what `{READABLE}` compacts to (with python-minifier and zpaq of
requirements.txt's versions):

```bash
python3 -c "import train_gpt_readable as t; print(t.compact_code(open('{READABLE}','rb').read()) == open('{SHIPPED}','rb').read())"
```

Every byte count here (README, submission.json) is the shipped files': `bytes_total` = {rec.code_bytes:,}
bytes of `{SHIPPED}` + the seed's compressed model."""


def why_not_a_record(rec: Record) -> str:
    failed = rec.failed(record_only=True)
    if rec.track == "record":
        return ""
    reasons = "\n".join(f"- {c.name}: {c.detail}" for c in failed) or "- none failed: submitted as non-record by choice"
    return f"""## Why this is a non-record submission

The record checks this run does not pass:

{reasons}
"""


def resumed_text(runs: list[RunLog]) -> str:
    """Whether any seed was stopped by a signal and resumed from its checkpoint (the logs' `resume` lines)."""
    resumed = [f"seed {r.seed} at step{'s' if len(r.resumed_at) > 1 else ''} {', '.join(map(str, r.resumed_at))}"
               for r in runs if r.resumed_at]
    if not resumed:
        return "Every seed ran in one piece (no log has a `resume` line)."
    return (f"Resumed from a checkpoint after a stop (RESUME_FROM; the log's `resume` line): {'; '.join(resumed)}. "
            f"A resumed run continues the same computation; its train_time is the sum of the pieces.")


def readme_text(rec: Record) -> str:
    runs, meta, sub = rec.runs, rec.meta, submission_json(rec)
    seeds = " ".join(str(r.seed) for r in runs)
    bytes_rows = [[str(r.seed), str(r.artifact["bytes_model"]), str(rec.code_bytes), str(rec.totals[r.seed])]
                  for r in runs]
    significance = (describe_test([r.submission.val_loss for r in runs], rec.baseline, rec.test) + ".\n"
                    f"Baseline (the current record) per-seed val_loss: {', '.join(f'{v:.8f}' for v in rec.baseline)}."
                    if rec.test else "No baseline was given: no significance test.")
    kind = "Record" if rec.track == "record" else "Non-record submission"
    return f"""# {meta.name}

{kind} (`records/{TRACKS[rec.track][0]}/`). {meta.blurb}

**val_bpb {sub['val_bpb']:.8f}** (std {sub['val_bpb_std']:.8f}), val_loss {sub['val_loss']:.8f} nats
(std {sub['val_loss_std']:.8f}): mean of {len(runs)} seeds ({seeds}); largest artifact {sub['bytes_total']:,}
bytes. The submission number is `{runs[0].submission_metric}`. By {meta.author} (@{meta.github_id}), {meta.date}.

{why_not_a_record(rec)}
## Results (from the logs)

Per seed: steps, training time, evaluation time (the sum over the final evaluations), bytes_total (the
shipped code plus the seed's model), and val_loss / val_bpb of every final evaluation; then mean and
sample std.

{markdown_table(*seed_table(runs, rec.totals))}

{resumed_text(runs)}

{plan_section(runs, rec.plan, rec.totals)}

## Significance

{significance}

## Checks

{chr(10).join(f"- {c.name}: {'pass' if c.ok else 'FAIL'}: {c.detail}" for c in rec.checks)}

## Byte counts

{markdown_table(["seed", "bytes_model", "bytes_code", "bytes_total"], bytes_rows)}

{code_section(rec)}

## What the run does

{meta.blurb}

It is this folder's code with the settings of the command below (every other setting at its default;
every value is in the `hparam` lines of each log). Training stops at the wallclock cap or the step
limit; then the weights are quantized, compressed, reloaded and evaluated.
Hardware: {runs[0].world_size} x {runs[0].gpu or "CPU"}. Data: {runs[0].dataset.get('name', '?')}
(source {runs[0].dataset.get('source', '?')}, validation sha256 {runs[0].dataset.get('val_sha256', '?')}).

## Command

```bash
for SEED in {seeds}; do
  {rec.command}
done
```

Code sha256 `{runs[0].code_hash}` (of `{READABLE}`).

## Files

- `{SHIPPED}`: the code that runs and counts; `{READABLE}`: the same code, readable (not counted).
- `requirements.txt`: the package versions the logs used.
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


def readable_source(run: RunLog, source: Path | None) -> bytes:
    """The readable train_gpt.py the logs ran. The log of a readable run embeds it; the log of a compact
    run embeds the minified program it ran and names the readable source's sha256, which `source`
    (default: this repository's train_gpt.py) must have."""
    if run.code.get("form") != "compact":
        return run.source.encode("utf-8")
    path = source or ROOT / "train_gpt.py"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != run.code_hash:
        raise RecordError(f"the logs ran a compact train_gpt.py made from a readable source with sha256 "
                          f"{run.code_hash[:16]}..., and {path} is another file: give that source with --source")
    return data


def check_shipped_program(run: RunLog, shipped: Path) -> None:
    """A compact run's log embeds the program it ran: the shipped file must hold exactly that program
    (another python-minifier version may minify the same source differently)."""
    if run.code.get("form") == "compact" and compact_program(shipped.read_bytes())[1] != run.source:
        raise RecordError("the compact train_gpt.py made here holds another program than the one the logs ran "
                          "(python-minifier's version differs from the run's? the logs' `versions` line has it)")


def prepare(logs: list[str | Path], meta: Meta, baseline: list[float] | None, shipped: Path,
            track: str = "record", source: Path | None = None) -> Record:
    """Read and check the sweep; ship train_gpt.py (the compact form of the readable source the logs
    ran) to `shipped`, with the readable source beside it."""
    runs = load_runs(logs)
    readable = shipped.with_name(READABLE)
    readable.write_bytes(readable_source(runs[0], source))
    ship_train_gpt(readable, shipped)
    check_shipped_program(runs[0], shipped)
    code_bytes = shipped.stat().st_size
    totals = shipped_totals(runs, code_bytes)
    test = welch_one_sided([r.submission.val_loss for r in runs], baseline) if baseline else None
    return Record(runs, meta, baseline, test, code_bytes, readable.stat().st_size, totals,
                  record_checks(runs, totals, test), launch_line(runs), requirements_text(runs), track,
                  find_plan(logs))


def write_record(rec: Record, shipped: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    shutil.copyfile(shipped, folder / SHIPPED)
    shutil.copyfile(shipped.with_name(READABLE), folder / READABLE)
    for run in rec.runs:
        shutil.copyfile(run.path, folder / f"train_seed{run.seed}.log")
    (folder / "requirements.txt").write_text(rec.requirements, encoding="utf-8")
    (folder / "submission.json").write_text(json.dumps(submission_json(rec), indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(readme_text(rec), encoding="utf-8")
    plot_curves(rec.runs, folder / PLOT_NAME)


def make_record(logs: list[str | Path], meta: Meta, baseline: list[float] | None,
                records_root: Path = RECORDS_ROOT, non_record: bool = False, source: Path | None = None) -> Path:
    """Check the sweep, then write the folder (under records_root/<track folder>/) and return it;
    writes nothing if a check the track needs fails."""
    track = "non-record" if non_record else "record"
    folder = records_root / TRACKS[track][0] / folder_name(meta)
    if folder.exists():
        raise RecordError(f"{folder} already exists: remove it to write it again")
    with tempfile.TemporaryDirectory() as tmp:
        shipped = Path(tmp) / SHIPPED
        rec = prepare(logs, meta, baseline, shipped, track, source)
        failed = rec.failed() if track == "record" else rec.failed(record_only=False)
        if failed:
            hint = ("" if non_record or any(not c.record_only for c in failed) else
                    "\n(--non-record writes it to records/track_non_record_16mb/ instead, saying why)")
            raise RecordError("not written, failed checks:\n  " +
                              "\n  ".join(f"{c.name}: {c.detail}" for c in failed) + hint)
        write_record(rec, shipped, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log files, or sweep folders (their *.txt logs)")
    parser.add_argument("--name", required=True, help="the submission's name; the folder is <date>_<name>")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", required=True, help="one or two sentences on what the run does")
    parser.add_argument("--baseline-val-loss", type=float, nargs="+", metavar="NATS",
                        help="per-seed val_loss of the current record (the run to beat); needed for a record")
    parser.add_argument("--date", default=None, type=timestamp,
                        help="YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC); default: now")
    parser.add_argument("--non-record", action="store_true",
                        help="write to records/track_non_record_16mb/: only the artifact cap must hold")
    parser.add_argument("--records-root", type=Path, default=RECORDS_ROOT,
                        help="the folder holding the track folders")
    parser.add_argument("--source", type=Path, default=None,
                        help="logs of the compact train_gpt.py: the readable source it was made from "
                             "(default: this repository's train_gpt.py; its sha256 must match the logs')")
    args = parser.parse_args(argv)
    meta = Meta(args.name, args.author, args.github_id, args.blurb, args.date or timestamp(None))
    try:
        folder = make_record(args.logs, meta, args.baseline_val_loss, args.records_root, args.non_record, args.source)
        print(f"make_record: wrote {folder}")
    except (RecordError, ValueError) as e:  # ValueError: bad logs (LogError) or too few values for the test
        sys.exit(f"make_record: {e}")


def timestamp(text: str | None) -> str:
    """A UTC timestamp as the challenge's submission.json files write it; a bare date is its midnight."""
    if text is None:
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.date.fromisoformat(text).isoformat() + "T00:00:00Z"
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give the time zone (e.g. Z for UTC)")
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    main()
