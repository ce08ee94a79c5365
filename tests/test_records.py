"""The last mile: a real 3-seed sweep of a tiny config (resumable), its summary, the record folder, the
significance test against closed forms and scipy, and the clear refusals of broken or mixed logs.

The tests read the logs with their own regular expressions, not with scripts/runlog.py, so that the
numbers the tools print are checked against the logs independently.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from scipy import stats

from conftest import ROOT, tiny_env
from scripts.make_record import Meta, RecordError, make_record
from scripts.make_record import main as make_record_main
from scripts.runlog import LogError, load_runs
from scripts.summarize import welch_one_sided
from scripts.summarize import main as summarize_main
from scripts.sweep import DEFAULT_SEEDS, SweepError, launch_command, run_sweep
import train_gpt as tg
from train_gpt import compact_code

SWEEP_SETTINGS = dict(ITERATIONS=4, VAL_LOSS_EVERY=4, WARMUP_STEPS=0, EVAL_STRIDE=32, VAL_BATCH_SIZE=4096)
FINAL = re.compile(r"^(final_\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)
SLIDING = re.compile(r"^final_sliding_window_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
EVAL_TIME = re.compile(r"^final_\w+ .*eval_time:(\d+)ms$", re.M)
ARTIFACT = re.compile(r"^artifact .*bytes_model:(\d+) bytes_total:(\d+)", re.M)
STEP_TIME = re.compile(r"^step:(\d+)/\d+ .*train_time:(\d+)ms", re.M)
META = Meta("Tiny test run", "Test Author", "tester", "Two layers, 32 wide, four steps.", "2026-01-02T00:00:00Z")
CHALLENGE_VAL_SHA, CHALLENGE_TOK_SHA = "ab" * 32, "cd" * 32


def as_record_run(seed: int, text: str) -> str:
    """The log as an 8 x H100 run on the challenge's published data would write it (the test sweep ran
    on one CPU, on data it built): only the `dataset`, `runtime` and `gpu` lines differ."""
    text = re.sub(r"^dataset .*$", f"dataset name:fineweb10B_sp1024 source:challenge val_sha256:{CHALLENGE_VAL_SHA} "
                  f"tokenizer_sha256:{CHALLENGE_TOK_SHA} repo:willdepueoai/parameter-golf", text, count=1, flags=re.M)
    return re.sub(r"^runtime world_size:1 grad_accum_steps:8 (.*)$",
                  r"runtime world_size:8 grad_accum_steps:1 \1\ngpu name:NVIDIA H100 80GB HBM3", text, count=1,
                  flags=re.M)


def then(*edits):
    def edit(seed, text):
        for e in edits:
            text = e(seed, text)
        return text
    return edit


def log_numbers(text: str) -> dict:
    """The numbers a record reports, read straight from a log's text."""
    steps, train_ms = STEP_TIME.findall(text)[-1]
    bytes_model, bytes_total = ARTIFACT.search(text).groups()
    loss, bpb = SLIDING.search(text).groups()
    return {"steps": int(steps), "train_ms": int(train_ms), "eval_ms": sum(map(int, EVAL_TIME.findall(text))),
            "bytes_model": int(bytes_model), "bytes_total": int(bytes_total), "val_loss": loss, "val_bpb": bpb,
            "finals": FINAL.findall(text)}


class Sweep(NamedTuple):
    out: Path  # the sweep's folder
    env: dict  # its configuration
    done: dict  # run_sweep's answer
    logs: dict  # seed -> log text


@pytest.fixture(scope="module")
def sweep(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    env = tiny_env(tiny_data, out, **SWEEP_SETTINGS)
    done = run_sweep(list(DEFAULT_SEEDS), out, 1, env)
    logs = {seed: (out / f"seed_{seed}.txt").read_text() for seed in DEFAULT_SEEDS}
    return Sweep(out, env, done, logs)


def copy_logs(sweep, dst, edit=None):
    """The sweep's logs copied to dst, with edit(seed, text) -> text applied."""
    dst.mkdir(exist_ok=True)
    for seed, text in sweep.logs.items():
        (dst / f"seed_{seed}.txt").write_text(edit(seed, text) if edit else text)
    return dst


def baseline_behind(sweep, nats: float) -> list[float]:
    """A current record whose per-seed val_loss is ours plus `nats`, with some spread."""
    ours = [float(log_numbers(sweep.logs[s])["val_loss"]) for s in DEFAULT_SEEDS]
    return [v + nats + d for v, d in zip(ours, (0.004, -0.003, 0.001))]


def test_sweep_runs_every_seed_apart(sweep):
    assert sweep.done == {seed: "ran" for seed in DEFAULT_SEEDS}
    for seed, text in sweep.logs.items():
        assert f"\nhparam seed:{seed}\n" in text and f"\nhparam run_id:seed_{seed}\n" in text
        assert (sweep.out / f"seed_{seed}.ptz").stat().st_size == log_numbers(text)["bytes_model"]
    assert len({log_numbers(t)["val_loss"] for t in sweep.logs.values()}) == 3  # three seeds, three results


def test_sweep_resumes_where_it_stopped(sweep, tmp_path):
    out = copy_logs(sweep, tmp_path / "sweep")
    cut = sweep.logs[42].rindex("final_roundtrip_exact")
    (out / "seed_42.txt").write_text(sweep.logs[42][:cut])  # killed during the final evaluations
    before = {s: (out / f"seed_{s}.txt").stat().st_mtime_ns for s in (1337, 2025)}
    done = run_sweep(list(DEFAULT_SEEDS), out, 1, sweep.env)
    assert done == {1337: "skipped", 42: "ran", 2025: "skipped"}
    assert {s: (out / f"seed_{s}.txt").stat().st_mtime_ns for s in (1337, 2025)} == before
    rerun = (out / "seed_42.txt").read_text()
    assert log_numbers(rerun)["finals"] == log_numbers(sweep.logs[42])["finals"]  # same seed, same run
    assert (out / "seed_42.ptz").exists() and not (out / "seed_1337.ptz").exists()


def test_sweep_resumes_a_stopped_seed_from_its_checkpoint(sweep, tmp_path, monkeypatch):
    import scripts.sweep as sweep_module

    out = copy_logs(sweep, tmp_path / "sweep")
    text = sweep.logs[42]
    (out / "seed_42.txt").write_text(text[:text.index("\nstep:3/")])  # stopped by a signal at step 2...
    (out / "seed_42.ckpt").mkdir()
    (out / "seed_42.ckpt" / "shared.pt").write_bytes(b"")  # ...with its checkpoint
    launched = []

    def stopped_again(cmd, env):  # the resumed seed is stopped once more
        launched.append(env)
        return 130
    monkeypatch.setattr(sweep_module, "run_child", stopped_again)
    with pytest.raises(SweepError, match=r"seed 42 was stopped by a signal and wrote its checkpoint .*seed_42.ckpt; "
                                         r"rerun the same command to resume it"):
        run_sweep(list(DEFAULT_SEEDS), out, 1, sweep.env)
    assert [env["RESUME_FROM"] for env in launched] == [str((out / "seed_42.ckpt").resolve())]
    assert all(env["SEED"] == "42" for env in launched)


def test_sweep_lets_a_seed_stopped_by_ctrl_c_finish_its_checkpoint(tmp_path):
    import os
    import signal
    import threading
    import time

    from scripts.sweep import run_child

    # A stand-in for train_gpt.py: on SIGINT it takes a while to "write its checkpoint", then exits 130.
    child = ("import os, signal, sys, time\n"
             f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
             "def stop(*_):\n"
             "    time.sleep(1.0)\n"
             f"    open({str(tmp_path / 'checkpoint')!r}, 'w').write('written')\n"
             "    sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "time.sleep(60)\n")

    def ctrl_c():  # what the terminal does: SIGINT to the sweep and to its child
        while not (tmp_path / "pid").exists():
            time.sleep(0.02)
        time.sleep(0.1)
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=ctrl_c, daemon=True).start()
    assert run_child([sys.executable, "-c", child], dict(os.environ)) == 130
    assert (tmp_path / "checkpoint").read_text() == "written"  # not killed while writing it


def test_sweep_refuses_to_resume_another_experiment(sweep, tmp_path):
    out = copy_logs(sweep, tmp_path / "sweep")
    with pytest.raises(SweepError, match=r"hparam num_layers: 2 in the log, 3 now.*another --out-dir"):
        run_sweep(list(DEFAULT_SEEDS), out, 1, dict(sweep.env, NUM_LAYERS="3"))
    out = copy_logs(sweep, tmp_path / "edited", lambda s, t: other_code(t))
    with pytest.raises(SweepError, match="train_gpt.py changed since it ran"):
        run_sweep(list(DEFAULT_SEEDS), out, 1, sweep.env)
    assert not list(out.glob("*.ptz"))  # refused before running anything


def test_sweep_stops_at_a_failed_seed(sweep, tmp_path):
    (tmp_path / "no_data").mkdir()
    env = dict(sweep.env, DATA_PATH=str(tmp_path / "no_data"))
    with pytest.raises(SweepError, match=r"seed 1337 failed with exit status 2; its log is .*seed_1337.txt"):
        run_sweep(list(DEFAULT_SEEDS), tmp_path / "sweep", 1, env)
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["seed_1337.txt"]  # the later seeds never ran


def test_launch_command():
    assert launch_command(1) == [sys.executable, str(ROOT / "train_gpt.py")]
    assert launch_command(8) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=8", str(ROOT / "train_gpt.py")]


def test_summary_prints_the_logs_numbers_and_the_test(sweep, capsys):
    baseline = baseline_behind(sweep, 0.2)
    summarize_main([str(sweep.out), "--baseline-val-loss", *map(str, baseline)])
    printed = capsys.readouterr().out
    for seed, text in sweep.logs.items():
        row = next(line for line in printed.splitlines() if line.startswith(f"| {seed} |"))
        for _, loss, bpb in log_numbers(text)["finals"]:
            assert f" {loss} | {bpb} " in row
    ours = [float(log_numbers(t)["val_loss"]) for t in sweep.logs.values()]
    assert "| mean | 4.0 |" in printed
    mean_row = next(line for line in printed.splitlines() if line.startswith("| mean |"))
    std_row = next(line for line in printed.splitlines() if line.startswith("| std |"))
    assert table_cells(mean_row)[-2] == f"{statistics.fmean(ours):.8f}"
    assert table_cells(std_row)[-2] == f"{statistics.stdev(ours):.8f}"
    expected = stats.ttest_ind([b - 0.005 for b in baseline], ours, equal_var=False, alternative="greater")
    assert f"p={expected.pvalue:.3g}: significant at p<0.01" in printed


def test_record_folder(sweep, tmp_path, capsys):
    baseline = baseline_behind(sweep, 0.2)
    logs = copy_logs(sweep, tmp_path / "logs", as_record_run)
    record_logs = {seed: (logs / f"seed_{seed}.txt").read_text() for seed in sweep.logs}
    make_record_main([str(logs), "--name", META.name, "--author", META.author, "--github-id", META.github_id,
                      "--blurb", META.blurb, "--date", "2026-01-02", "--records-root", str(tmp_path / "records"),
                      "--baseline-val-loss", *map(str, baseline)])
    folder = tmp_path / "records" / "track_10min_16mb" / "2026-01-02_Tiny_test_run"
    assert capsys.readouterr().out == f"make_record: wrote {folder}\n"
    numbers = {seed: log_numbers(text) for seed, text in sweep.logs.items()}
    for seed, text in record_logs.items():
        assert (folder / f"train_seed{seed}.log").read_text() == text
    # The compact form of exactly the source that ran, and that source beside it.
    shipped = (folder / "train_gpt.py").read_bytes()
    assert shipped == compact_code((ROOT / "train_gpt.py").read_bytes())
    assert len(shipped) < len((ROOT / "train_gpt.py").read_bytes()) / 2
    assert (folder / "train_gpt_readable.py").read_bytes() == (ROOT / "train_gpt.py").read_bytes()
    assert re.search(r"^torch==\S+", (folder / "requirements.txt").read_text(), re.M)
    assert (folder / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "train_curves.png").stat().st_size > 10_000  # curves drawn, not an empty canvas

    sub = json.loads((folder / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "seeds",
                "seed_results", "val_loss_std", "val_bpb_std", "p_value"):
        assert sub[key] not in (None, ""), key
    assert (sub["author"], sub["github_id"], sub["date"]) == ("Test Author", "tester", "2026-01-02T00:00:00Z")
    assert (sub["track"], sub["hardware"]) == ("10min_16mb", "8xNVIDIA H100 80GB HBM3")
    assert sub["pytorch_version"] == torch.__version__ and "not_a_record_because" not in sub
    assert sorted(sub["seeds"]) == sorted(DEFAULT_SEEDS)
    losses = [float(n["val_loss"]) for n in numbers.values()]
    assert sub["val_loss"] == pytest.approx(statistics.fmean(losses), abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(float(n["val_bpb"]) for n in numbers.values()), abs=1e-8)
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(losses), abs=1e-8)
    # One byte count everywhere: the shipped files', which is also what every log reports.
    shipped_total = {seed: n["bytes_model"] + len(shipped) for seed, n in numbers.items()}
    assert shipped_total == {seed: n["bytes_total"] for seed, n in numbers.items()}
    assert sub["bytes_code"] == len(shipped) and sub["bytes_total"] == max(shipped_total.values())
    float_bpb = [float(dict((m[0], m[2]) for m in n["finals"])["final_float_exact"]) for n in numbers.values()]
    assert sub["pre_quant_val_bpb"] == pytest.approx(statistics.fmean(float_bpb), abs=1e-8)
    for seed, n in numbers.items():
        got = sub["seed_results"][str(seed)]
        assert (got["val_loss"], got["val_bpb"]) == (float(n["val_loss"]), float(n["val_bpb"]))
        assert (got["artifact_bytes"], got["steps"]) == (shipped_total[seed], n["steps"])
        assert got["train_time_s"] == pytest.approx(n["train_ms"] / 1000, abs=1e-9)
    expected = stats.ttest_ind([b - 0.005 for b in baseline], losses, equal_var=False, alternative="greater")
    assert sub["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)

    readme = (folder / "README.md").read_text()
    header = table_cells(next(line for line in readme.splitlines() if line.startswith("| seed | steps |")))
    for seed, n in numbers.items():
        row = dict(zip(header, table_cells(next(l for l in readme.splitlines() if l.startswith(f"| {seed} | ")))))
        assert int(row["steps"]) == n["steps"] and int(row["bytes_total"]) == n["bytes_total"]
        assert round(float(row["train_s"]) * 1000) == n["train_ms"]
        assert round(float(row["eval_s"]) * 1000) == n["eval_ms"]
        for name, loss, bpb in n["finals"]:
            short = name.removeprefix("final_")
            assert (row[f"{short} val_loss"], row[f"{short} val_bpb"]) == (loss, bpb)
    assert "ITERATIONS=4" in readme and "SEED=$SEED torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert readme.count(": pass: ") == 6 and "Every seed ran in one piece (no log has a `resume` line)." in readme
    assert f"`train_gpt.py` ({len(shipped):,} bytes) is the file that runs and the one whose bytes count" in readme
    # The README's own check that the two files are the same code, run as a reader would.
    check = re.search(r"^(python3 -c .*)$", readme, re.M)[1]
    proc = subprocess.run(check, shell=True, cwd=folder, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "True", proc.stderr

    with pytest.raises(RecordError, match="already exists"):
        make_record([logs], META, baseline, tmp_path / "records")


def as_compact_run(seed: int, text: str) -> str:
    """The log as a run of the compact train_gpt.py would write it: the minified program embedded, the
    code line saying form:compact (the program's size) and naming the readable source."""
    readable = (ROOT / "train_gpt.py").read_text()
    program = tg.minify_code(readable)
    text = text.replace(readable, program, 1)
    return re.sub(r"^code form:readable (bytes_code:\d+) bytes_source:\d+ ",
                  rf"code form:compact \1 bytes_source:{len(program.encode())} ", text, count=1, flags=re.M)


def test_a_compact_run_ships_the_readable_source_its_log_names(sweep, tmp_path):
    baseline = baseline_behind(sweep, 0.2)
    logs = copy_logs(sweep, tmp_path / "logs", then(as_record_run, as_compact_run))
    folder = make_record([logs], META, baseline, tmp_path / "records")
    assert (folder / "train_gpt.py").read_bytes() == compact_code((ROOT / "train_gpt.py").read_bytes())
    assert (folder / "train_gpt_readable.py").read_bytes() == (ROOT / "train_gpt.py").read_bytes()
    other = tmp_path / "other.py"
    other.write_bytes((ROOT / "train_gpt.py").read_bytes() + b"\n")
    with pytest.raises(RecordError, match=f"and {other} is another file: give that source with --source"):
        make_record([logs], META, baseline, tmp_path / "records2", source=other)


def test_a_cpu_run_on_built_data_is_refused_as_a_record_and_written_as_a_non_record(sweep, tmp_path):
    baseline = baseline_behind(sweep, 0.2)
    with pytest.raises(RecordError) as err:
        make_record([sweep.out], META, baseline, tmp_path / "records")
    message = str(err.value)
    assert re.search(r"^  data: validation data and tokenizer must be the challenge's published ones .*seed \d+: "
                     r"source:custom repo:-$", message, re.M)
    assert re.search(r"^  hardware: the track runs on 8 x H100: 1 x CPU$", message, re.M)
    assert "--non-record writes it to records/track_non_record_16mb/" in message
    assert not (tmp_path / "records").exists()

    def resumed(seed, text):  # seed 42 stopped after step 2 and went on from its checkpoint
        if seed != 42:
            return text
        cut = text.index("\nstep:3/")
        resume = "\nresume from:runs/x/seed_42.ckpt step:2 train_time:300ms signal:SIGINT world_size:1"
        return text[:cut] + resume + text[cut:]
    logs = copy_logs(sweep, tmp_path / "logs", resumed)
    folder = make_record([logs], META, None, tmp_path / "records", non_record=True)
    assert folder == tmp_path / "records" / "track_non_record_16mb" / "2026-01-02_Tiny_test_run"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["track"] == "non_record_16mb" and "p_value" not in sub
    reasons = sub["not_a_record_because"]
    assert [r.split(":")[0] for r in reasons] == ["significance", "data", "hardware"]
    readme = (folder / "README.md").read_text()
    assert "## Why this is a non-record submission" in readme
    assert "- data: validation data and tokenizer must be the challenge's published ones" in readme
    assert "No baseline was given: no significance test." in readme
    assert "Resumed from a checkpoint after a stop (RESUME_FROM; the log's `resume` line): seed 42 at step 2." in readme
    assert [sub["seed_results"][str(s)]["resumed_at_steps"] for s in (42, 1337)] == [[2], []]


def test_a_non_record_must_still_fit_the_cap(sweep, tmp_path):
    logs = copy_logs(sweep, tmp_path / "logs", set_field(r"^artifact .*bytes_model:(\d+)", "15990000"))
    with pytest.raises(RecordError, match=r"failed checks:\n  artifact size: .*\Z"):
        make_record([logs], META, None, tmp_path / "records", non_record=True)


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def set_field(pattern: str, value: str):
    """An edit that rewrites the last match of `pattern` (a regex with one group) to `value`."""
    def edit(seed, text):
        last = list(re.finditer(pattern, text, re.M))[-1]
        return text[:last.start(1)] + value + text[last.end(1):]
    return edit


@pytest.mark.parametrize("edit, behind, failed", [
    (set_field(r"^artifact .*bytes_model:(\d+)", "15990000"), 0.2, "artifact size: bytes_total must be under"),
    (set_field(r"^step:\d+/\d+ val_loss.*train_time:(\d+)ms", "600001"), 0.2, "train time: .* 600.001 s"),
    # Two final evaluations of 300.001 s each: each is under the limit, their sum is not.
    (lambda s, t: re.sub(r"^(final_\w+ .*eval_time:)\d+ms$", r"\g<1>300001ms", t, flags=re.M), 0.2,
     r"eval time: .* longest 600.002 s"),
    (None, 0.0, "significance: .* p = 0.[5-9]"),
])
def test_record_refuses_failed_checks(sweep, tmp_path, edit, behind, failed):
    logs = copy_logs(sweep, tmp_path / "logs", then(as_record_run, *([edit] if edit else [])))
    # That check only, then (for a check only records need) the way to write it as a non-record.
    with pytest.raises(RecordError, match=f"failed checks:\n  {failed}[^\n]*(\n\\(--non-record [^\n]*)?\\Z"):
        make_record([logs], META, baseline_behind(sweep, behind), tmp_path / "records")
    assert not (tmp_path / "records").exists()


def other_code(text: str) -> str:
    """The log of a run of another train_gpt.py: the code line names another source's sha256."""
    return re.sub(r"(?m)^(code form:.* source_sha256:)[0-9a-f]{8}", r"\g<1>00000000", text, count=1)


def only_seed(seed: int, edit):
    return lambda s, text: edit(text) if s == seed else text


@pytest.mark.parametrize("edit, error", [
    (only_seed(42, lambda t: t.replace("hparam num_layers:2\n", "hparam num_layers:3\n")),
     r"not seeds of one experiment:\n  hparam num_layers: .*seed_1337.txt: 2; .*seed_42.txt: 3"),
    (only_seed(42, other_code),
     r"not seeds of one experiment:\n  the code \(sha256 of the readable train_gpt.py\)"),
    (only_seed(2025, lambda t: t[:t.rindex("final_sliding_window_exact")]),
     r"seed_2025.txt: no `final_sliding_window_exact` line: the run did not finish"),
    (only_seed(2025, lambda t: t[:t.rindex("artifact path:")]),
     r"seed_2025.txt: no `artifact ... bytes_total:` or `final_sliding_window_exact` line"),
    (only_seed(1337, lambda t: t[:len(t) // 20]), r"seed_1337.txt: the embedded source has no closing line"),
    (only_seed(1337, lambda t: "hello\n" + t), r"seed_1337.txt: does not start with the `source: train_gpt.py`"),
    (only_seed(1337, lambda t: t.replace("Parameter Golf", "Parameter Golf!", 1)),
     r"seed_1337.txt: the embedded source has \d+ bytes but the code line says bytes_source"),
    (only_seed(42, lambda t: t.replace("hparam seed:42\n", "hparam seed:1337\n")), "seed 1337 appears in more"),
])
def test_broken_or_mismatched_logs_are_refused(sweep, tmp_path, edit, error):
    logs = copy_logs(sweep, tmp_path, edit)
    with pytest.raises(LogError, match=error):
        load_runs([logs])


def test_summary_command_refuses_with_a_message(sweep, tmp_path):
    wider = only_seed(42, lambda t: t.replace("hparam model_dim:32\n", "hparam model_dim:64\n"))
    logs = copy_logs(sweep, tmp_path, wider)
    with pytest.raises(SystemExit, match="^summarize: these logs are not seeds of one experiment:\n  hparam model_dim"):
        summarize_main([str(logs)])


def test_welch_against_closed_forms():
    # Equal variances, two values each: Welch's df is 2, where P(T >= t) = 1/2 - t / (2 sqrt(2 + t^2)).
    test = welch_one_sided([0.0, 2.0], [3.005, 5.005])
    t = 3 / math.sqrt(2)
    assert (test.t, test.df) == (pytest.approx(t), pytest.approx(2.0))
    assert test.p_value == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    # One side without spread: df is 1 (Cauchy), P(T >= t) = 1/2 - atan(t) / pi.
    test = welch_one_sided([1.0, 1.0], [2.005, 4.005])
    assert (test.t, test.df) == (pytest.approx(2.0), pytest.approx(1.0))
    assert test.p_value == pytest.approx(0.5 - math.atan(2.0) / math.pi, rel=1e-9)


@pytest.mark.parametrize("ours, baseline", [
    ([1.1001, 1.1032, 1.0987], [1.1123, 1.1150, 1.1101]),  # clearly better: small p
    ([1.1001, 1.1032, 1.0987, 1.1010, 1.0995], [1.1071, 1.1092, 1.1049]),  # near the margin, n differ
    ([1.1201, 1.1232, 1.1187], [1.1123, 1.1150, 1.1101]),  # worse: p near 1
])
def test_welch_matches_scipy(ours, baseline):
    test = welch_one_sided(ours, baseline)
    # scipy's own Welch test of "baseline - 0.005 > ours" is the same hypothesis, computed independently.
    ref = stats.ttest_ind([b - 0.005 for b in baseline], ours, equal_var=False, alternative="greater")
    assert test.t == pytest.approx(ref.statistic, rel=1e-9)
    assert test.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert test.df == pytest.approx(ref.df, rel=1e-9)


def test_welch_refuses_degenerate_samples():
    with pytest.raises(ValueError, match="at least 2 values per side, got 1 ours"):
        welch_one_sided([1.0], [1.1, 1.2])
    with pytest.raises(ValueError, match="zero variance"):
        welch_one_sided([1.0, 1.0], [1.1, 1.1])


def test_sweep_folders_are_ignored_by_git():
    assert "runs/" in (ROOT / ".gitignore").read_text().split()  # the README's sweeps write runs/<idea>/
