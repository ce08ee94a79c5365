"""Interrupts and resume: SIGINT/SIGTERM stop a run after the current step with a checkpoint, and
RESUME_FROM continues it to the same numbers as a run that was never stopped; a stop outside training
says what was kept; ranks agree on the step; the sweep resumes a stopped seed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import cpu_runtime, ROOT, tiny_env

TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) lr_mult:(\S+)", re.M)
VAL = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+)", re.M)
FINAL = re.compile(r"^(final_\w+) val_loss:(\S+) val_bpb:(\S+)", re.M)
# QAT switches on at step 8 of 12 and SWA takes every second step of the warmdown: the checkpoint must
# carry both.
RECIPE = dict(ITERATIONS=12, VAL_LOSS_EVERY=6, QAT_LR_THRESHOLD=0.7, FINAL_WEIGHTS="swa", SWA_EVERY=2)


def numbers(log: str) -> tuple:
    return TRAIN.findall(log), VAL.findall(log), FINAL.findall(log)


def signal_at_step(monkeypatch, step: int, sig: int = signal.SIGINT) -> None:
    """Deliver `sig` to this process during training step `step` (1-based), as Ctrl-C would."""
    real, calls = tg.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(tg, "train_step", train_step)


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    env = tiny_env(tiny_data, out, RUN_ID="whole", **RECIPE)
    tg.main(env)
    return (out / "whole.txt").read_text(), (out / "whole.ptz").read_bytes()


@pytest.mark.parametrize("stop_step, sig", [(4, signal.SIGINT), (10, signal.SIGTERM), (12, signal.SIGINT)])
def test_a_stopped_run_resumes_to_the_same_numbers(whole, tiny_data, tmp_path, monkeypatch, capsys, stop_step, sig):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="cut", **RECIPE)
    with monkeypatch.context() as m:
        signal_at_step(m, stop_step, sig)
        with pytest.raises(SystemExit) as stopped:
            tg.main(env)
    assert stopped.value.code == 128 + sig
    name, ckpt = signal.Signals(sig).name, tmp_path / "cut.ckpt"
    out = capsys.readouterr().out
    assert f"{name} during training: stopping after the next step to write a checkpoint" in out
    stopped_after = min(stop_step + 1, 12)  # the ranks' stop vote is read one step late (StopVote)
    assert re.search(rf"^stopped by {name}: kept the log {tmp_path / 'cut.txt'}; the checkpoint {ckpt} \(weights, "
                     rf"optimizer state, averages, schedule, data position, RNG, after step {stopped_after}/12\); "
                     rf"resume with: RESUME_FROM={ckpt} python train_gpt.py$", out, re.M)
    assert sorted(p.name for p in ckpt.iterdir()) == ["rank0.pt", "shared.pt"]
    assert not (tmp_path / "cut.ptz").exists()

    # The same command with RESUME_FROM (nothing else needed: the settings come from the checkpoint).
    tg.main({k: v for k, v in env.items() if k not in ("ITERATIONS", "QAT_LR_THRESHOLD")} | {"RESUME_FROM": str(ckpt)})
    log = (tmp_path / "cut.txt").read_text()
    assert numbers(log) == numbers(whole[0])
    assert (tmp_path / "cut.ptz").read_bytes() == whole[1]  # the very same artifact
    # One log, one preamble: it says where the run stopped and where it went on.
    assert log.count("\nhparam seed:1337\n") == 1 and log.startswith("=" * 40 + " source: train_gpt.py")
    assert re.search(rf"^interrupted signal:{name} step:{stopped_after}/12 train_time:\d+ms checkpoint:{ckpt}$", log, re.M)
    assert re.search(rf"^resume from:{ckpt} step:{stopped_after} train_time:\d+ms signal:{name} world_size:1 ", log, re.M)
    assert not re.search(r"^stopped by", log, re.M)  # the log went on from the checkpoint's copy
    if stop_step == 10:
        assert log.index("\nqat_on step:8 ") < log.index("\ninterrupted") and log.count("\nqat_on ") == 1


def test_resume_refuses_other_settings_other_code_and_other_world_sizes(tiny_data, tmp_path, monkeypatch):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="cut", ITERATIONS=6, VAL_LOSS_EVERY=0)
    with monkeypatch.context() as m:
        signal_at_step(m, 2)
        with pytest.raises(SystemExit):
            tg.main(env)
    ckpt = tmp_path / "cut.ckpt"
    shared, _ = tg.read_checkpoint(ckpt)
    code = tg.code_form((ROOT / "train_gpt.py").read_bytes()).source_sha256  # either form's: the readable's
    resumed = dict(env, RESUME_FROM=str(ckpt), CPU_THREADS="1")  # the threads may change
    h = tg.resumed_hparams(tg.Hyperparameters.from_env(resumed), resumed, shared, code, 1)
    assert (h.iterations, h.run_id, h.resume_from, h.cpu_threads) == (6, "cut", str(ckpt), 1)
    other = dict(resumed, MODEL_DIM="64", SEED="7")
    with pytest.raises(ValueError, match="the checkpoint's run has other settings") as err:
        tg.resumed_hparams(tg.Hyperparameters.from_env(other), other, shared, code, 1)
    assert "MODEL_DIM=64 (the run: 32)" in str(err.value) and "SEED=7 (the run: 1337)" in str(err.value)
    with pytest.raises(ValueError, match="train_gpt.py changed since the checkpoint was written"):
        tg.resumed_hparams(tg.Hyperparameters.from_env(resumed), resumed, shared, code[::-1], 1)
    with pytest.raises(ValueError, match="the run had 1 processes, this one 2: resume with --nproc_per_node=1"):
        tg.resumed_hparams(tg.Hyperparameters.from_env(resumed), resumed, shared, code, 2)
    with pytest.raises(ValueError, match=r"RESUME_FROM=.*nope: not a checkpoint \(shared.pt is missing\)"):
        tg.read_checkpoint(tmp_path / "nope")


def test_a_stop_after_training_says_what_was_kept(tiny_data, tmp_path, monkeypatch, capsys):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="late", ITERATIONS=3, VAL_LOSS_EVERY=0)
    real = tg.timed_eval

    def timed_eval(label, *args, **kwargs):
        if label == "final_sliding_window_exact":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the last evaluation: stops at once
        return real(label, *args, **kwargs)
    monkeypatch.setattr(tg, "timed_eval", timed_eval)
    with pytest.raises(SystemExit) as stopped:
        tg.main(env)
    assert stopped.value.code == 130
    artifact = tmp_path / "late.ptz"
    expected = (f"stopped by SIGINT: kept the log {tmp_path / 'late.txt'}; the artifact {artifact} (score it: "
                f"ARTIFACT_PATH={artifact} python eval_ngram_on_checkpoint.py)")
    assert expected in capsys.readouterr().out.splitlines()
    assert (tmp_path / "late.txt").read_text().endswith(expected + "\n") and artifact.is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


@pytest.mark.parametrize("kind", ["coprime", "sequential"])
def test_the_data_loader_continues_where_it_stopped(tiny_data, kind):
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, tiny_data["output_dir"], TRAIN_LOADER=kind))
    a = tg.make_train_loader(h, cpu_runtime())
    for _ in range(7):  # more than one pass of the coprime order over the tiny shards
        a.next_batch(h.train_batch_tokens, h.train_seq_len)
    state = a.state_dict()
    b = tg.make_train_loader(h, cpu_runtime())
    b.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    for _ in range(9):
        xa, ya = a.next_batch(h.train_batch_tokens, h.train_seq_len)
        xb, yb = b.next_batch(h.train_batch_tokens, h.train_seq_len)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_rng_states_survive_a_checkpoint():
    state = tg.rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    tg.set_rng_state(torch.load(_roundtrip(state), weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]


def test_a_repeated_signal_within_the_grace_is_one_request():
    stops = tg.Interrupts(verbose=False)
    stops.enter("training", tg.AFTER_STEP)
    stops.handle(signal.SIGINT, None)  # the terminal's Ctrl-C...
    stops.handle(signal.SIGINT, None)  # ...and torchrun's copy of it: still one request
    assert stops.received == signal.SIGINT
    stops.first_at -= tg.SIGNAL_REPEAT_GRACE_S
    with pytest.raises(tg.RunInterrupted):  # a second Ctrl-C later on stops at once
        stops.handle(signal.SIGINT, None)


def test_two_processes_stop_on_the_same_step_and_resume(tiny_data, tmp_path):
    # A wallclock cap far away keeps the run step-exact (LR multiplier 1, no QAT) and makes the ranks
    # compare their stop flags every step.
    settings = dict(ITERATIONS=10, VAL_LOSS_EVERY=0, MAX_WALLCLOCK_SECONDS=100000, QAT="off", EVAL_STRIDE=64,
                    GPTQ_CALIB_SEQS=16)
    tg.main(tiny_env(tiny_data, tmp_path / "one", RUN_ID="one", **settings))
    reference = (tmp_path / "one" / "one.txt").read_text()
    env = tiny_env(tiny_data, tmp_path, RUN_ID="two", **settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py")]
    log = tmp_path / "two.txt"
    with subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        deadline = time.monotonic() + 180
        while not (log.exists() and "\nstep:3/10 train_loss" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
        output = proc.communicate(timeout=120)[0]
    stop = re.search(r"^interrupted signal:SIGTERM step:(\d+)/10", log.read_text(), re.M)
    assert stop and int(stop[1]) < 10, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "two.ckpt").iterdir()) == ["rank0.pt", "rank1.pt", "shared.pt"]
    resume = {k: v for k, v in env.items()} | {"RESUME_FROM": str(tmp_path / "two.ckpt")}
    proc = subprocess.run(cmd, env=resume, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = numbers(reference), numbers(log.read_text())
    assert [s for s, *_ in one[0]] == [s for s, *_ in two[0]]
    for (_, a, _), (_, b, _) in zip(one[0], two[0]):
        assert abs(float(a) - float(b)) <= 2e-4  # one process against two: printed with 4 decimals
    for (name, la, ba), (_, lb, bb) in zip(one[2], two[2]):
        assert abs(float(la) - float(lb)) < 1e-4 and abs(float(ba) - float(bb)) < 1e-4, name


# ---- a signal in every phase of a run (docs/resume.md) ----------------------------------------------
# Each phase is reached through the function the run calls there; the patched function sends the signal to
# this process (as Ctrl-C or a scheduler would) and goes on, so the signal lands inside the phase.
PHASE_HOOKS = {  # phase -> (function of train_gpt the signal is sent from, which call: a test on its arguments)
    "start-up": ("build_model", lambda *a, **k: True),
    "the end of training": ("evaluate", lambda *a, **k: k.get("phase") == "val"),  # the last step's evaluation
    "the export": ("gptq_work", lambda *a, **k: True),
    "the round trip": ("timed_eval", lambda label, *a, **k: label == "final_roundtrip_exact"),
    "test-time training": ("ttt_evaluate", lambda *a, **k: True),
}
PHASE_RUN = dict(ITERATIONS=3, VAL_LOSS_EVERY=0, TTT="1", TTT_EVAL_SEQ_LEN="64", TTT_CHUNK_SIZE="16",
                 TTT_LORA_RANK="4", TTT_BATCH_SIZE="8", PHASED_TTT_PREFIX_DOCS="0")


def signal_in(monkeypatch, phase: str, sig: int, ranks=(0,)) -> None:
    """Send `sig` to this process the first time the run calls phase's function as PHASE_HOOKS says, on
    the ranks listed."""
    name, which = PHASE_HOOKS[phase]
    real, sent = getattr(tg, name), []

    def hooked(*args, **kwargs):
        if not sent and which(*args, **kwargs) and int(os.environ.get("RANK", "0")) in ranks:
            sent.append(1)
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(tg, name, hooked)


# phase -> (what is kept besides the log, the last final line written, the answer printed first)
PHASE_OUTCOMES = {
    "start-up": ((), None, None),
    "the end of training": (("artifact",), "final_float_exact", "once the artifact is written"),
    "the export": (("artifact",), "final_float_exact", "once the artifact is written"),
    "the round trip": (("artifact",), "final_float_exact", None),
    "test-time training": (("artifact",), "final_sliding_window_exact", None),
}


@pytest.mark.parametrize("phase", PHASE_HOOKS)
def test_a_signal_in_every_phase_is_acted_on(tiny_data, tmp_path, monkeypatch, capsys, phase):
    """The answer of each phase: at once, or at the phase's end (the artifact written); never dropped, and
    the exit status says which signal stopped the run."""
    sig = signal.SIGTERM if phase != "the round trip" else signal.SIGINT
    env = tiny_env(tiny_data, tmp_path, RUN_ID="p", **PHASE_RUN)
    signal_in(monkeypatch, phase, sig)
    with pytest.raises(SystemExit) as stopped:
        tg.main(env)
    assert stopped.value.code == 128 + sig
    kept, last_final, answer = PHASE_OUTCOMES[phase]
    out, name = capsys.readouterr().out, signal.Signals(sig).name
    log, artifact = tmp_path / "p.txt", tmp_path / "p.ptz"
    expected = f"stopped by {name}: kept the log {log}" + (
        f"; the artifact {artifact} (score it: ARTIFACT_PATH={artifact} python eval_ngram_on_checkpoint.py)"
        if "artifact" in kept else "")
    assert expected in out.splitlines() and log.read_text().endswith(expected + "\n")
    assert artifact.exists() == ("artifact" in kept) and not (tmp_path / "p.ckpt").exists()
    finals = re.findall(r"^(final_\w+) ", log.read_text(), re.M)
    assert (finals[-1] if finals else None) == last_final
    if answer:
        assert f"{name} during {phase if phase != 'the export' else 'the end of training'}: stopping {answer}" in out
    assert signal.getsignal(sig) is (signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_a_request_left_pending_is_acted_on_when_the_next_phase_answers_at_once():
    stops = tg.Interrupts(verbose=False)
    stops.enter("the end of training", tg.AT_ARTIFACT)
    stops.handle(signal.SIGTERM, None)  # remembered, not acted on...
    with pytest.raises(tg.RunInterrupted) as stopped:
        stops.enter("the final evaluations", tg.AT_ONCE)  # ...until a phase that acts at once begins
    assert stopped.value.signum == signal.SIGTERM


def _phase_worker(rank: int, cases: list, out: str) -> None:
    """Rank `rank` of 2 (gloo): each case's run with the signal sent on the case's ranks; the exit codes."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")
    codes = []
    for phase, ranks, env in cases:
        os.environ["MASTER_PORT"] = env["MASTER_PORT"]
        with pytest.MonkeyPatch.context() as mp:
            signal_in(mp, phase, signal.SIGTERM, ranks)
            try:
                tg.main(dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"))
                codes.append(0)
            except SystemExit as e:
                codes.append(e.code)
    Path(f"{out}.{rank}").write_text(json.dumps(codes))


def test_two_processes_agree_on_every_phase(tiny_data, tmp_path):
    """Two gloo ranks. Where a phase waits for its end, a signal that reached one rank only stops both
    there (the end of training: both write the artifact, then stop); where it acts at once, each rank the
    signal reaches stops (torchrun forwards it to all of them)."""
    import socket

    import torch.multiprocessing as mp

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    cases = [("start-up", (0, 1)), ("the end of training", (1,)), ("the export", (1,)),
             ("test-time training", (0, 1))]
    envs = [tiny_env(tiny_data, tmp_path / str(k), RUN_ID="p", **PHASE_RUN, MASTER_PORT=free_port())
            for k in range(len(cases))]
    out = str(tmp_path / "codes")
    mp.spawn(_phase_worker, args=([(p, r, e) for (p, r), e in zip(cases, envs)], out), nprocs=2, join=True)
    codes = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert codes == [[143] * len(cases)] * 2
    for k, (phase, _) in enumerate(cases):
        log = (tmp_path / str(k) / "p.txt").read_text()
        assert ("p.ptz" in log.splitlines()[-1]) == (phase != "start-up"), (phase, log.splitlines()[-1])
        assert (tmp_path / str(k) / "p.ptz").exists() == (phase != "start-up")
        if phase == "test-time training":
            assert re.findall(r"^(final_\w+) ", log, re.M)[-1] == "final_sliding_window_exact"
