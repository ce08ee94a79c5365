"""lab/parity_benchmark.py without the record script: the CPU shim on a stand-in that uses every
CUDA facility a record script uses, the result parsing of both log formats, the scaled settings, and
the whole benchmark (the stand-in as the reference, a tiny run of ours) end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY_VOCAB

sys.path.insert(0, str(ROOT / "lab"))
import parity_benchmark as pb  # noqa: E402

# A stand-in record script: it touches every shimmed facility the way the 2026-03-29 record does, checks
# what the shim promises, then prints the record's final lines.
STAND_IN = textwrap.dedent('''
    import subprocess, sys
    import torch
    from flash_attn_interface import flash_attn_func

    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is required")
    device = torch.device("cuda", 0)
    assert device.type == "cpu" and isinstance(device, torch.device)
    torch.cuda.set_device(device)
    from torch.backends.cuda import enable_flash_sdp, enable_math_sdp
    enable_flash_sdp(True)
    enable_math_sdp(False)
    model = torch.nn.Linear(8, 8, bias=False).to(device).bfloat16()
    assert model.weight.dtype == torch.float32, "Module.bfloat16 must keep fp32"
    assert torch.compile(model, dynamic=False, fullgraph=True) is model
    assert torch.randn(3, 3).bfloat16().dtype == torch.float32
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=True):
        assert model(torch.randn(2, 8)).dtype == torch.float32
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    y = flash_attn_func(q, k, v, causal=True)
    for h in range(4):  # query head h reads key/value head h // 2
        s = q[:, :, h] @ k[:, :, h // 2].transpose(1, 2) / 8 ** 0.5
        s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        assert torch.allclose(y[:, :, h], s.softmax(-1) @ v[:, :, h // 2], atol=1e-5)
    assert subprocess.run(["nvidia-smi"], stdout=subprocess.PIPE, text=True, check=False).stdout == ""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    print(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB")
    print(f"argv:{sys.argv[0]} name:{__name__}")
    print("step:4/4 val_loss:2.0000 val_bpb:1.5000 train_time:400ms step_avg:100.00ms")
    print("DIAGNOSTIC post_ema val_loss:1.9000 val_bpb:1.4000 eval_time:5ms")
    print("final_int6_roundtrip_exact val_loss:1.91000000 val_bpb:1.41000000")
    print("final_int6_sliding_window_exact val_loss:1.88000000 val_bpb:1.38000000")
''')


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "record" / "train_gpt.py"
    path.parent.mkdir()
    path.write_text(STAND_IN)
    return path


def test_shim_runs_a_cuda_script_on_cpu_in_fp32(stand_in, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "lab" / "parity_benchmark.py"), "shim", str(stand_in)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    listed = [line for line in out.splitlines() if line.startswith("parity_shim ")]
    assert len(listed) == len(pb.SHIMS) and "parity_shim torch.compile: identity: eager" in listed
    assert f"argv:{stand_in} name:__main__" in out and "peak memory allocated: 0 MiB" in out
    r = pb.parse_result(out, "reference")
    assert (r.raw, r.float, r.quant, r.sliding, r.steps, r.step_ms) == (1.5, 1.4, 1.41, 1.38, 4, 100.0)


def test_shim_failure_is_the_scripts_own_error(tmp_path):
    bad = tmp_path / "train_gpt.py"
    bad.write_text("import torch\nraise SystemExit('record stopped: ' + str(torch.device('cuda', 1)))\n")
    proc = subprocess.run([sys.executable, str(ROOT / "lab" / "parity_benchmark.py"), "shim", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "record stopped: cpu" in proc.stderr


REFERENCE_LOG = """\
step:300/300 val_loss:3.9000 val_bpb:2.3000 train_time:60000ms step_avg:200.00ms
DIAGNOSTIC post_ema val_loss:4.5000 val_bpb:2.7000 eval_time:5ms
final_int6_roundtrip_exact val_loss:4.50100000 val_bpb:2.70100000
final_int6_sliding_window_s64_exact val_loss:4.49000000 val_bpb:2.69000000
"""

OURS_LOG = """\
step:300/300 val_loss:3.9000 val_bpb:2.3000 train_time:60000ms step_avg:200.00ms
raw_float_exact val_loss:3.90000000 val_bpb:2.30000000 steps:300 train_time:60000ms
final_float_exact val_loss:3.80000000 val_bpb:2.29000000 weights:ema
final_roundtrip_exact val_loss:3.80100000 val_bpb:2.29100000 seq_len:256 stride:256 eval_time:10ms
final_sliding_window_exact val_loss:3.79000000 val_bpb:2.28500000 seq_len:256 stride:64 eval_time:40ms
"""


def test_parse_result_reads_ours_and_names_what_is_missing():
    r = pb.parse_result(OURS_LOG, "ours")
    assert (r.raw, r.float, r.quant, r.sliding, r.steps, r.step_ms) == (2.3, 2.29, 2.291, 2.285, 300, 200.0)
    cut = OURS_LOG.split("final_sliding")[0]
    with pytest.raises(ValueError, match="run.txt: no sliding result"):
        pb.parse_result(cut, "ours", "run.txt")


def test_parse_result_reads_the_records_stride_64_pass_when_its_own_stride_is_skipped():
    # EVAL_STRIDE=256 at seq 256: the record runs no own-stride pass, only its extra stride-64 one
    r = pb.parse_result(REFERENCE_LOG, "reference")
    assert (r.raw, r.float, r.quant, r.sliding, r.steps) == (2.3, 2.7, 2.701, 2.69, 300)
    with pytest.raises(ValueError, match="no sliding result"):
        pb.parse_result(REFERENCE_LOG.replace("_s64_exact", "_s32_exact"), "reference")


def test_step_counted_settings_scale_to_the_run():
    size = pb.Size(layers=4, steps=300)
    ref, ours = pb.reference_env(size), pb.ours_env(size)
    common = pb.common_env(size, ROOT, ROOT, 7)
    assert ref["WARMDOWN_ITERS"] == "157" and common["MUON_MOMENTUM_WARMUP_STEPS"] == "67"  # 3500, 1500 of 6700
    assert ref["VE_LAYERS"] == "2,3" and ref["XSA_LAST_N"] == "4"  # 9,10 and all of 11 layers
    assert (ref["BIGRAM_VOCAB_SIZE"], ref["BIGRAM_DIM"], ref["USE_GPTQ"]) == ("2816", "112", "1")
    assert ours["EMA_DECAY"] == "0.933" and common["SEED"] == "7" and common["ITERATIONS"] == "300"
    assert pb.scaled(3500, pb.RECORD_STEPS) == 3500


def test_variants_and_assignments_are_checked():
    assert pb.parse_variant("ve_off:VE_LAYERS=,QAT=off") == ("ve_off", {"VE_LAYERS": "", "QAT": "off"})
    for bad in ("no_colon", "bad name:QAT=off", "x:qat=off", "x:QAT"):
        with pytest.raises(ValueError):
            pb.parse_variant(bad)


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path):
    script = f"print({OURS_LOG!r})"
    job = pb.Job("fake seed 1", "ours", [sys.executable, "-c", script], {"A": "1"}, tmp_path / "fake")
    assert job.done() is None
    first = pb.run_together([job])["fake seed 1"]
    assert first.sliding == 2.285 and job.done() == first
    changed = pb.Job("fake seed 1", "ours", job.cmd, {"A": "2"}, job.folder)
    assert changed.done() is None  # another environment: run again
    failing = pb.Job("bad seed 1", "ours", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], {},
                     tmp_path / "bad")
    with pytest.raises(RuntimeError, match=r"(?s)bad seed 1 failed \(exit 3\).*boom"):
        pb.run_together([failing])


def test_benchmark_end_to_end_on_tiny_data(tiny_data, stand_in, tmp_path, capsys):
    """The stand-in as the reference and a tiny run of ours, one seed, run together; then a variant."""
    argv = ["--reference", str(stand_in), "--data", str(tiny_data["output_dir"]),
            "--tokenizer", str(tiny_data["tokenizer_model"]), "--seeds", "1337", "--out", str(tmp_path / "out"),
            "--layers", "2", "--dim", "32", "--heads", "4", "--kv-heads", "2", "--mlp-mult", "2", "--seq-len", "64",
            "--batch-tokens", "512", "--steps", "4", "--eval-stride", "32",
            "--ours-env", f"VOCAB_SIZE={TINY_VOCAB},ROPE_DIMS=4,VE_DIM=8,BIGRAM_DIM=8,VAL_BATCH_SIZE=4096"]
    pb.main(argv + ["--variant", "relu2:MLP_ACTIVATION=relu2"])
    out = capsys.readouterr().out
    assert "| reference | 1337 | 4 | 1.5000 | 1.4000 | 1.4100 | 1.3800 | 100.0 |" in out
    ours = pb.parse_result((tmp_path / "out" / "ours_seed1337" / "output.txt").read_text(), "ours")
    assert ours.steps == 4 and 0 < ours.sliding < 10
    assert f"| ours | 1337 | 4 | {ours.raw:.4f} | {ours.float:.4f} |" in out
    assert "| relu2 | " in out and "ours' step time / reference's" in out
    log = (tmp_path / "out" / "relu2_seed1337" / "ours.txt").read_text()
    assert "hparam mlp_activation:relu2" in log and "hparam ema_decay:0.0" in log  # a span under one step
