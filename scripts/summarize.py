"""Summarize a seed sweep from its logs: a per-seed table, mean and sample std, and the significance test.

    python scripts/summarize.py runs/my_idea                       # a sweep folder, or log files
    python scripts/summarize.py runs/my_idea --baseline-val-loss 1.8911 1.8935 1.8902

Reads the logs, never the console. Refuses logs that are not seeds of one experiment (different
code or settings) or that did not finish. The submission number is final_ttt_exact when the runs have TTT on, else
final_sliding_window_exact (with NGRAM_TILT=token: final_ttt_ngram_exact, final_sliding_window_ngram_exact).

The test (docs/challenge.md): a new record must beat the current one by at least 0.005 nats of val_loss
at p < 0.01. H0: mean(baseline) - mean(ours) <= 0.005; H1: it is larger. One-sided Welch t-test
(unequal variances): t = (mean_b - mean_o - 0.005) / sqrt(s_b^2/n_b + s_o^2/n_o), with the
Welch-Satterthwaite degrees of freedom; p = P(T_df >= t).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scipy import stats

if __package__ in (None, ""):
    # Run as a script (python scripts/summarize.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.runlog import RunLog, load_runs  # noqa: E402

MIN_IMPROVEMENT_NATS = 0.005  # a record must beat the current one by this much val_loss ...
SIGNIFICANCE_P = 0.01  # ... at this significance level


@dataclass(frozen=True)
class WelchTest:
    t: float
    df: float
    p_value: float

    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE_P


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of one value is nan."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def welch_one_sided(ours: list[float], baseline: list[float], margin: float = MIN_IMPROVEMENT_NATS) -> WelchTest:
    """Test that mean(baseline) - mean(ours) > margin (lower is better), unequal variances."""
    if len(ours) < 2 or len(baseline) < 2:
        raise ValueError(f"the t-test needs at least 2 values per side, got {len(ours)} ours and "
                         f"{len(baseline)} baseline")
    (m_o, s_o), (m_b, s_b) = mean_std(ours), mean_std(baseline)
    v_o, v_b = s_o ** 2 / len(ours), s_b ** 2 / len(baseline)
    if v_o + v_b == 0:
        raise ValueError("the t-test is undefined: both samples have zero variance")
    t = (m_b - m_o - margin) / math.sqrt(v_o + v_b)
    df = (v_o + v_b) ** 2 / (v_o ** 2 / (len(ours) - 1) + v_b ** 2 / (len(baseline) - 1))
    return WelchTest(t, df, float(stats.t.sf(t, df)))


@dataclass(frozen=True)
class Column:
    header: str
    get: Callable[[RunLog], float]
    decimals: int


def columns(run: RunLog, totals: dict[int, int] | None = None) -> list[Column]:
    """The table's columns: one val_loss and one val_bpb column for each final evaluation of the log.
    bytes_total is the log's unless `totals` (seed -> bytes) gives the shipped count."""
    cols = [Column("steps", lambda r: r.steps, 0),
            Column("train_s", lambda r: r.train_time_ms / 1000, 3),
            Column("eval_s", lambda r: r.eval_time_ms / 1000, 3),
            Column("bytes_total", lambda r: (totals or {}).get(r.seed, r.artifact["bytes_total"]), 0)]
    for name in run.finals:
        label = name.removeprefix("final_")
        cols.append(Column(f"{label} val_loss", lambda r, n=name: r.finals[n].val_loss, 8))
        cols.append(Column(f"{label} val_bpb", lambda r, n=name: r.finals[n].val_bpb, 8))
    return cols


def seed_table(runs: list[RunLog], totals: dict[int, int] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per seed with the logs' numbers as logged, then mean and sample std."""
    cols = columns(runs[0], totals)
    rows = [[str(r.seed)] + [f"{c.get(r):.{c.decimals}f}" for c in cols] for r in runs]
    summaries = [mean_std([c.get(r) for r in runs]) for c in cols]
    # Whole-number columns get one decimal in the summary rows: a mean of steps is not whole.
    rows.append(["mean"] + [f"{m:.{max(c.decimals, 1)}f}" for c, (m, _) in zip(cols, summaries)])
    rows.append(["std"] + [f"{s:.{max(c.decimals, 1)}f}" for c, (_, s) in zip(cols, summaries)])
    return ["seed"] + [c.header for c in cols], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def describe_test(ours: list[float], baseline: list[float], test: WelchTest) -> str:
    verdict = "significant" if test.significant() else "NOT significant"
    return (f"one-sided Welch t-test, H1: baseline mean val_loss - our mean > {MIN_IMPROVEMENT_NATS} nats: "
            f"ours {statistics.fmean(ours):.8f} (n={len(ours)}), baseline {statistics.fmean(baseline):.8f} "
            f"(n={len(baseline)}), t={test.t:.4f} df={test.df:.2f} p={test.p_value:.3g}: {verdict} at "
            f"p<{SIGNIFICANCE_P}")


def summary_text(runs: list[RunLog], baseline: list[float] | None) -> str:
    lines = [f"{len(runs)} logs, code sha256 {runs[0].code_hash[:16]}, submission metric {runs[0].submission_metric}",
             markdown_table(*seed_table(runs))]
    if baseline:
        ours = [r.submission.val_loss for r in runs]
        lines.append(describe_test(ours, baseline, welch_one_sided(ours, baseline)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log files, or sweep folders (their *.txt logs)")
    parser.add_argument("--baseline-val-loss", type=float, nargs="+", metavar="NATS",
                        help="per-seed val_loss of the current record, for the significance test")
    args = parser.parse_args(argv)
    try:
        print(summary_text(load_runs(args.logs), args.baseline_val_loss))
    except ValueError as e:  # LogError included: bad logs, bad baseline
        sys.exit(f"summarize: {e}")


if __name__ == "__main__":
    main()
