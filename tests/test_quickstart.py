"""The README's quick-start command runs the whole pipeline (here with an even smaller model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_quickstart_script_runs_the_pipeline(tmp_path):
    # The interpreter running the tests (a venv's, not activated) is the one the script must use: a
    # python3 on PATH that cannot run anything proves it does not fall back to that one.
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "python3").write_text("#!/bin/sh\necho 'the wrong python3' >&2\nexit 3\n")
    (broken / "python3").chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{broken}{os.pathsep}{os.environ['PATH']}",
               QS_DIR=str(tmp_path), QS_DOCS="400", NUM_LAYERS="1", MODEL_DIM="32", ROPE_DIMS="4",
               TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", ITERATIONS="3", EVAL_SEQ_LEN="64",
               EVAL_STRIDE="32", RUN_ID="qs", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "logs" / "qs.txt").read_text()
    assert re.search(r"^final_sliding_window_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}", log, re.M)
    assert (tmp_path / "logs" / "qs.ptz").exists()
    # The script chose the threads before its own data build (here from OMP_NUM_THREADS=1) and said so.
    assert re.search(r"^runtime .* cpu_threads:1 cpu_threads_from:CPU_THREADS$", log, re.M)
    assert re.search(r"^dataset name:synthetic_sp1024 source:custom ", log, re.M)
