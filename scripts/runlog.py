"""Read the logs train_gpt.py writes: the embedded source, the settings, the curves, the final lines.

The log contract (train_gpt.py's Logger and log_preamble; README "Reading the log"):

    ======== source: train_gpt.py ========     the exact source that ran, then a line of 100 "="
    hparam <name>:<value>                      every setting
    runtime world_size:.. / versions ..:.. / env KEY:value ... / gpu name:..
    step:N/M train_loss:.. ... train_time:..ms, step:N/M val_loss:.. val_bpb:.. train_time:..ms
    final_<name> val_loss:.. val_bpb:.. [eval_time:..ms] [compile_time:..ms]  every final evaluation, any name
    code form:.. bytes_code:.. bytes_source:.. source_sha256:..  the shipped (compact) size, the embedded
                                               source's size, the readable source's sha256
    dataset name:.. source:.. val_sha256:.. tokenizer_sha256:..     which data the run trained and scored on
    artifact path:.. bytes_code:.. bytes_model:.. bytes_total:..
    resume from:.. step:N train_time:..ms signal:..  where a run stopped by a signal went on from its checkpoint

Final evaluations are read generically (every `final_<name>` line with val_loss and val_bpb), so new
evaluations need no change here. A log is complete (its run finished) when it has a step line, the
artifact line and the submission line (final_ttt_exact when the run has TTT on, else
final_sliding_window_exact; with NGRAM_TILT=token their tilted forms, final_ttt_ngram_exact or
final_sliding_window_ngram_exact). Shared by scripts/sweep.py, scripts/summarize.py and
scripts/make_record.py; this module has no command line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable

SOURCE_OPEN = re.compile(r"^=+ source: train_gpt\.py =+$")
SOURCE_CLOSE = "=" * 100
SUBMISSION_METRIC = "final_sliding_window_exact"  # without test-time training
TTT_SUBMISSION_METRIC = "final_ttt_exact"  # with it (TTT=1): score-first TTT after the sliding window
NGRAM_SUFFIX = "_ngram"  # NGRAM_TILT=token: the tilted line of the same pass (final_ttt_ngram_exact, ...)
# Settings that name one seed's run inside a sweep; every other hparam must agree between seeds.
PER_SEED_HPARAMS = ("seed", "run_id", "out_dir")

STEP_LINE = re.compile(r"^step:(\d+)/\d+ (.*)$")
FINAL_LINE = re.compile(r"^(final_\w+) (.*)$")


class LogError(ValueError):
    """A log that cannot be used; the message names the file and says what is wrong."""


@dataclass(frozen=True)
class FinalEval:
    val_loss: float
    val_bpb: float
    eval_time_ms: float  # 0 for an evaluation that logs no eval_time (it ran inside training)


@dataclass
class RunLog:
    """One log, filled line by line by parse_log."""
    path: Path
    source: str  # train_gpt.py as it ran
    hparams: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the `env` line: the variables set at the start
    versions: dict[str, str] = field(default_factory=dict)
    world_size: int | None = None
    gpu: str | None = None
    train_curve: list[tuple[float, float]] = field(default_factory=list)  # (train_time_s, train_loss)
    val_curve: list[tuple[float, float]] = field(default_factory=list)  # (train_time_s, val_bpb)
    steps: int | None = None  # from the last step line: where training stopped
    train_time_ms: float | None = None
    finals: dict[str, FinalEval] = field(default_factory=dict)  # in log order
    artifact: dict[str, int] = field(default_factory=dict)  # bytes_code, bytes_model, bytes_total
    code: dict[str, str] = field(default_factory=dict)  # the `code` line: form, bytes_code, bytes_source
    dataset: dict[str, str] = field(default_factory=dict)  # the `dataset` line: name, source, sha256s
    resumed_at: list[int] = field(default_factory=list)  # the steps the run resumed from a checkpoint at

    @property
    def code_hash(self) -> str:
        """sha256 of the readable train_gpt.py: the code line names it (a compact run embeds its minified
        program, not the readable source); older logs embed the readable source."""
        return self.code.get("source_sha256") or source_hash(self.source)

    @property
    def seed(self) -> int:
        return int(self.hparams["seed"])

    @property
    def eval_time_ms(self) -> float:
        """Evaluation time after training: the sum over the final evaluations."""
        return sum(f.eval_time_ms for f in self.finals.values())

    @property
    def submission_metric(self) -> str:
        """The line a run submits: TTT's when the run has TTT on (its `hparam ttt:True`), else the sliding window's;
        their tilted form when it has the n-gram tilt on (`hparam ngram_tilt:token`)."""
        return submission_metric_for(self.hparams)

    @property
    def submission(self) -> FinalEval:
        return self.finals[self.submission_metric]

    def configuration(self) -> dict[str, str]:
        return {k: v for k, v in self.hparams.items() if k not in PER_SEED_HPARAMS}


def submission_metric_for(hparams: dict[str, str]) -> str:
    metric = TTT_SUBMISSION_METRIC if hparams.get("ttt") == "True" else SUBMISSION_METRIC
    return metric.replace("_exact", f"{NGRAM_SUFFIX}_exact") if hparams.get("ngram_tilt") == "token" else metric


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def key_values(text: str) -> dict[str, str]:
    """'a:1 b:x:y' -> {'a': '1', 'b': 'x:y'} (values run to the next space)."""
    pairs = (item.split(":", 1) for item in text.split())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


def milliseconds(value: str) -> float:
    return float(value.removesuffix("ms"))


def split_source(text: str, path: Path) -> tuple[str, str]:
    """(embedded source, the log after it)."""
    first, _, rest = text.partition("\n")
    if not SOURCE_OPEN.match(first):
        raise LogError(f"{path}: does not start with the `source: train_gpt.py` banner: not a train_gpt.py log")
    # The Logger ends every message with a newline, so the source is followed by one extra "\n".
    end = rest.find("\n" + SOURCE_CLOSE + "\n")
    if end < 0:
        raise LogError(f"{path}: the embedded source has no closing line of 100 '=': the log is truncated")
    return rest[:end], rest[end + len(SOURCE_CLOSE) + 2:]


def parse_log(path: str | Path) -> RunLog:
    """Everything summaries need from one log; raises LogError on a log that is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"{path}: cannot read the log: {e}") from None
    source, body = split_source(text, path)
    run = RunLog(path, source)
    for line in body.splitlines():
        try:
            parse_line(run, line)
        except LogError:
            raise
        except (KeyError, ValueError) as e:  # a damaged value: name the line rather than crash
            raise LogError(f"{path}: cannot read the line {line!r}: {e!r}") from None
    if "seed" not in run.hparams:
        raise LogError(f"{path}: no `hparam seed:` line: the log stops before its settings")
    source_bytes = run.code.get("bytes_source")
    if source_bytes is not None and int(source_bytes) != len(source.encode("utf-8")):
        raise LogError(f"{path}: the embedded source has {len(source.encode('utf-8'))} bytes but the code "
                       f"line says bytes_source:{source_bytes}: the source block was altered")
    return run


def parse_line(run: RunLog, line: str) -> None:
    head, _, rest = line.partition(" ")
    if head == "hparam":
        name, _, value = rest.partition(":")
        run.hparams[name] = value
    elif head == "env":
        run.env = key_values(rest)
    elif head == "versions":
        run.versions = key_values(rest)
    elif head == "runtime":
        run.world_size = int(key_values(rest)["world_size"])
    elif head == "gpu":
        run.gpu = rest.removeprefix("name:")
    elif head == "code":
        run.code = key_values(rest)
    elif head == "dataset":
        run.dataset = key_values(rest)
    elif head == "resume":
        run.resumed_at.append(int(key_values(rest)["step"]))
    elif head == "artifact":
        run.artifact = {k: int(v) for k, v in key_values(rest).items() if k.startswith("bytes_")}
    elif m := STEP_LINE.match(line):
        parse_step(run, int(m[1]), key_values(m[2]))
    elif m := FINAL_LINE.match(line):
        parse_final(run, m[1], key_values(m[2]))


def parse_step(run: RunLog, step: int, kv: dict[str, str]) -> None:
    if "train_time" not in kv:
        return
    time_ms = milliseconds(kv["train_time"])
    run.steps, run.train_time_ms = step, time_ms
    if "train_loss" in kv:
        run.train_curve.append((time_ms / 1000, float(kv["train_loss"])))
    if "val_bpb" in kv:
        run.val_curve.append((time_ms / 1000, float(kv["val_bpb"])))


def parse_final(run: RunLog, name: str, kv: dict[str, str]) -> None:
    if "val_loss" not in kv or "val_bpb" not in kv:
        return
    if name in run.finals:
        raise LogError(f"{run.path}: two `{name}` lines: two runs wrote into one log")
    eval_ms = milliseconds(kv["eval_time"]) if "eval_time" in kv else 0.0
    eval_ms += milliseconds(kv["compile_time"]) if "compile_time" in kv else 0.0  # TTT's warm-up is evaluation time too
    run.finals[name] = FinalEval(float(kv["val_loss"]), float(kv["val_bpb"]), eval_ms)


def missing_final_lines(run: RunLog) -> list[str]:
    needed = {"step:N/M ... train_time:": run.train_time_ms is not None,
              "artifact ... bytes_total:": "bytes_total" in run.artifact,
              run.submission_metric: run.submission_metric in run.finals}
    return [line for line, present in needed.items() if not present]


def is_complete(path: Path) -> bool:
    """Whether the run that wrote this log finished (a missing or damaged log is not)."""
    try:
        return path.is_file() and not missing_final_lines(parse_log(path))
    except LogError:
        return False


def disagreement(runs: Iterable[RunLog], get: Callable[[RunLog], Hashable]) -> str | None:
    """None when every run gives the same value, else 'log: value; log: value ...'."""
    values = {run.path: get(run) for run in runs}
    if len(set(values.values())) <= 1:
        return None
    return "; ".join(f"{path}: {value}" for path, value in values.items())


def common_value(runs: list[RunLog], what: str, get: Callable[[RunLog], Hashable]):
    """The value every run shares, or a LogError that lists each log's value."""
    differ = disagreement(runs, get)
    if differ:
        raise LogError(f"the logs disagree on {what}: {differ}")
    return get(runs[0])


def check_one_experiment(runs: list[RunLog]) -> None:
    """Seeds of one experiment: same code, same settings but the seed, the same final evaluations."""
    checks = [("the code (sha256 of the readable train_gpt.py)", lambda r: r.code_hash[:16]),
              ("the final evaluations", lambda r: " ".join(r.finals))]
    names = sorted({name for run in runs for name in run.configuration()})
    checks += [(f"hparam {n}", lambda r, n=n: r.hparams.get(n, "(no line)")) for n in names]
    problems = [f"{what}: {differ}" for what, get in checks if (differ := disagreement(runs, get))]
    seeds = [run.seed for run in runs]
    problems += [f"seed {s} appears in more than one log" for s in sorted(set(seeds)) if seeds.count(s) > 1]
    if problems:
        raise LogError("these logs are not seeds of one experiment:\n  " + "\n  ".join(problems))


def load_runs(paths: Iterable[str | Path]) -> list[RunLog]:
    """Parse finished logs of one experiment, given as files or as sweep folders (their *.txt)."""
    paths, files = [Path(p) for p in paths], []
    for p in paths:
        files += sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise LogError(f"no logs found in {', '.join(map(str, paths))}")
    runs = [parse_log(f) for f in files]
    for run in runs:
        if missing := missing_final_lines(run):
            raise LogError(f"{run.path}: no {' or '.join(f'`{m}`' for m in missing)} line: the run did not "
                           f"finish (rerun the sweep to resume it)")
    check_one_experiment(runs)
    return sorted(runs, key=lambda r: r.seed)
