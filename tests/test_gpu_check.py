"""scripts/gpu_check.sh, the first GPU session's check, as a dry run on the CPU (--cpu: tiny settings):
every part runs, writes its file, and the summary line reports each part.

Run:
    python3 -m pytest -q tests/test_gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_a_cpu_dry_run_goes_through_every_part(tiny_data, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_RUN_DIR=str(tmp_path / "run"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--data",
                           str(tiny_data["output_dir"]), "--tokenizer", str(tiny_data["tokenizer_model"])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary == "gpu_check summary env:ok tests:ok bench:ok train:ok", (summary, (out / "gpu_check.log").read_text()[-4000:])
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "env.txt", "pytest.txt", "bench.txt", "results.jsonl",
                                               "train.txt"}
    assert "attention_backend sdpa" in (out / "env.txt").read_text()
    assert json.loads((out / "results.jsonl").read_text())["config"]["num_layers"] == 2
    train = (out / "train.txt").read_text()
    assert "final_sliding_window_exact" in train and "legality gptq_calibration verdict:" in train
