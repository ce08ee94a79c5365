"""Run train_gpt.py for several seeds with one configuration; rerun the same command to resume.

    NUM_LAYERS=11 python scripts/sweep.py --out-dir runs/my_idea --nproc 8      # seeds 1337 42 2025
    python scripts/sweep.py --out-dir runs/my_idea --nproc 1 --seeds 1 2 3 4 5

The configuration is the environment, exactly as for train_gpt.py. For each seed the sweep sets
SEED, RUN_ID=seed_<seed> and OUT_DIR=<out-dir>, so seed S writes <out-dir>/seed_S.txt (its log) and
<out-dir>/seed_S.ptz (its artifact), and launches
    python -m torch.distributed.run --standalone --nproc_per_node=N train_gpt.py   (N > 1)
    python train_gpt.py                                                            (N = 1)
Before any seed runs, scripts/plan.py plans the configuration on this machine (its block is printed and
saved as <out-dir>/plan.json, which scripts/make_record.py compares with the logs); a limit it predicts over
stops the sweep before it spends anything (--skip-plan runs it anyway). A seed whose log has its final lines
is skipped. Ctrl-C (or SIGTERM) stops the running seed after
its current step with a checkpoint <out-dir>/seed_S.ckpt; rerunning the same command resumes that
seed from it (RESUME_FROM) and then runs the rest. A seed whose log stops early without a checkpoint
(a crash, a lost machine) runs again from the start. Finished logs from another version of
train_gpt.py or another configuration stop the sweep before anything runs: those seeds could never be
summarized together.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python scripts/sweep.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.runlog import PER_SEED_HPARAMS, is_complete, parse_log, source_hash  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train_gpt.py"
PLAN_SCRIPT = ROOT / "scripts" / "plan.py"
PLAN_FILE = "plan.json"  # in the sweep's folder: what scripts/plan.py predicted for it
DEFAULT_SEEDS = (1337, 42, 2025)


class SweepError(RuntimeError):
    """The sweep cannot go on; the message says which seed or log and what to do."""


def seed_log(out_dir: Path, seed: int) -> Path:
    return out_dir / f"seed_{seed}.txt"


def seed_env(env: dict, out_dir: Path, seed: int) -> dict:
    return dict(env, SEED=str(seed), RUN_ID=f"seed_{seed}", OUT_DIR=str(out_dir))


def seed_checkpoint(out_dir: Path, seed: int) -> Path:
    """Where train_gpt.py writes the seed's checkpoint when a signal stops it (<OUT_DIR>/<RUN_ID>.ckpt)."""
    return out_dir / f"seed_{seed}.ckpt"


def run_child(cmd: list[str], env: dict) -> int:
    """Run one seed and return its exit status. Ctrl-C reaches the child as well (same process group):
    it stops after its current step and writes its checkpoint, so the sweep waits for it rather than
    killing it (as subprocess.run would)."""
    with subprocess.Popen(cmd, env=env) as proc:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                print("sweep: waiting for the run to write its checkpoint", flush=True)


def launch_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(TRAIN_SCRIPT)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(TRAIN_SCRIPT)]


def expected_configuration(env: dict) -> dict[str, str]:
    """The hparam lines (but the per-seed ones) train_gpt.py would log under this environment."""
    import train_gpt  # torch and friends: only needed here

    h = train_gpt.Hyperparameters.from_env(env)
    return {f.name: str(getattr(h, f.name)) for f in dataclasses.fields(h) if f.name not in PER_SEED_HPARAMS}


def check_resumable(logs: list[Path], env: dict) -> None:
    """Finished logs must come from this train_gpt.py and this configuration, or the sweep mixes runs."""
    code_hash = source_hash(TRAIN_SCRIPT.read_text(encoding="utf-8"))
    expected = expected_configuration(env)
    for log in filter(is_complete, logs):
        run = parse_log(log)
        found = run.configuration()
        problems = [f"hparam {k}: {found.get(k, '(no line)')} in the log, {expected.get(k, '(no field)')} now"
                    for k in sorted(found.keys() | expected.keys()) if found.get(k) != expected.get(k)]
        if run.code_hash != code_hash:
            problems.insert(0, f"train_gpt.py changed since it ran (sha256 {run.code_hash[:16]} in the log, "
                               f"{code_hash[:16]} now)")
        if problems:
            raise SweepError(f"{log} is a finished run of another experiment: {'; '.join(problems)}. "
                             f"Use another --out-dir, or delete that log to rerun its seed")


def check_plan(out_dir: Path, env: dict) -> None:
    """scripts/plan.py on the sweep's configuration before any seed runs; its plan saved in the sweep's folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    status = subprocess.run([sys.executable, str(PLAN_SCRIPT), "--json", str(out_dir / PLAN_FILE)], env=env).returncode
    if status == 1:
        raise SweepError("scripts/plan.py predicts a limit over (its `plan over:` line above names it): change the "
                         "settings, or rerun with --skip-plan to run anyway")
    if status:
        raise SweepError(f"scripts/plan.py failed with exit status {status} (see above)")


def run_sweep(seeds: list[int], out_dir: Path, nproc: int, env: dict) -> dict[int, str]:
    """Run every seed whose log is not finished; returns {seed: 'ran' or 'skipped'}."""
    out_dir = out_dir.resolve()
    check_resumable([seed_log(out_dir, s) for s in seeds], seed_env(env, out_dir, seeds[0]))
    done = {}
    for seed in seeds:
        log = seed_log(out_dir, seed)
        if is_complete(log):
            print(f"sweep: seed {seed}: {log} is finished, skipped", flush=True)
            done[seed] = "skipped"
            continue
        run_env, ckpt = seed_env(env, out_dir, seed), seed_checkpoint(out_dir, seed)
        if log.exists() and (ckpt / "shared.pt").is_file():
            run_env["RESUME_FROM"] = str(ckpt)
            how = f"resume from its checkpoint {ckpt}"
        else:
            how = "rerun, the log stops early" if log.exists() else "run"
        print(f"sweep: seed {seed}: {how}: {log}", flush=True)
        returncode = run_child(launch_command(nproc), run_env)
        if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM) and (ckpt / "shared.pt").is_file():
            raise SweepError(f"seed {seed} was stopped by a signal and wrote its checkpoint {ckpt}; rerun the "
                             f"same command to resume it")
        if returncode != 0:
            raise SweepError(f"seed {seed} failed with exit status {returncode}; its log is {log}. "
                             f"Rerun the same command to resume")
        if not is_complete(log):
            raise SweepError(f"seed {seed} exited cleanly but {log} lacks its final lines")
        done[seed] = "ran"
    return done


def main(argv: list[str] | None = None, env: dict | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True, help="the sweep's folder (logs and artifacts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs): 1, 2, 4 or 8")
    parser.add_argument("--skip-plan", action="store_true", help="run without planning first (scripts/plan.py)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")
    env = dict(os.environ if env is None else env)
    try:
        out_dir = args.out_dir.resolve()
        if not args.skip_plan and not all(is_complete(seed_log(out_dir, s)) for s in args.seeds):
            check_plan(out_dir, seed_env(env, out_dir, args.seeds[0]))
        run_sweep(args.seeds, args.out_dir, args.nproc, env)
    except (SweepError, ValueError) as e:  # ValueError: a bad setting, named by train_gpt.py
        sys.exit(f"sweep: {e}")


if __name__ == "__main__":
    main()
