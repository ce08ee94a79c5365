"""lab/parity_benchmark.py without the record script: the CPU shim on a stand-in that uses every
CUDA facility a record script uses, the result parsing of both log formats, the scaled settings, and
the whole benchmark (the stand-in as the reference, a tiny run of ours) end to end."""

from __future__ import annotations

import os
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

    def main():
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
        print(f"argv:{sys.argv[0]} file:{__file__}")
        print("step:4/4 val_loss:2.0000 val_bpb:1.5000 train_time:400ms step_avg:100.00ms")
        print("DIAGNOSTIC post_ema val_loss:1.9000 val_bpb:1.4000 eval_time:5ms")
        print("final_int6_roundtrip_exact val_loss:1.91000000 val_bpb:1.41000000")
        print("final_int6_sliding_window_exact val_loss:1.88000000 val_bpb:1.38000000")

    if __name__ == "__main__":
        main()
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
    assert len(listed) == len(pb.SHIMS) + 1 and "parity_shim torch.compile: identity: eager" in listed
    assert f"argv:{stand_in} file:{stand_in}" in out and "peak memory allocated: 0 MiB" in out
    assert "parity_shim kernels_replaced: none" in out
    r = pb.parse_result(out, "march")
    assert (r.raw, r.float, r.quant, r.sliding, r.steps, r.step_ms) == (1.5, 1.4, 1.41, 1.38, 4, 100.0)


def run_shim(script) -> subprocess.CompletedProcess:
    """`parity_benchmark.py shim SCRIPT`: the script run under the CPU shims."""
    return subprocess.run([sys.executable, str(ROOT / "lab" / "parity_benchmark.py"), "shim", str(script)],
                          capture_output=True, text=True, timeout=120)


def test_shim_failure_is_the_scripts_own_error(tmp_path):
    bad = tmp_path / "train_gpt.py"
    bad.write_text("import torch\nraise SystemExit('record stopped: ' + str(torch.device('cuda', 1)))\n")
    proc = run_shim(bad)
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
    r = pb.parse_result(REFERENCE_LOG, "march")
    assert (r.raw, r.float, r.quant, r.sliding, r.steps) == (2.3, 2.7, 2.701, 2.69, 300)
    with pytest.raises(ValueError, match="no sliding result"):
        pb.parse_result(REFERENCE_LOG.replace("_s64_exact", "_s32_exact"), "march")


def test_step_counted_settings_scale_to_the_run():
    size = pb.Size(layers=4, steps=300)
    ref, ours = pb.reference_env(size), pb.ours_env(size)
    common = pb.common_env(size, ROOT, ROOT, 7)
    assert ref["WARMDOWN_ITERS"] == "157" and common["MUON_MOMENTUM_WARMUP_STEPS"] == "67"  # 3500, 1500 of 6700
    assert ref["VE_LAYERS"] == "2,3" and ref["XSA_LAST_N"] == "4"  # 9,10 and all of 11 layers
    assert (ref["BIGRAM_VOCAB_SIZE"], ref["BIGRAM_DIM"], ref["USE_GPTQ"]) == ("2816", "112", "1")
    assert ours["EMA_DECAY"] == "0.933" and common["SEED"] == "7" and common["ITERATIONS"] == "300"
    assert pb.scaled(3500, pb.RECORDS["march"].steps) == 3500
    april = pb.Size(layers=6, steps=200)  # the April record: 4,931 steps, EMA 0.9965 (a 286-step span)
    assert pb.scaled(1500, april.steps, "april") == 61
    assert pb.ema_decay(200, "april") == round(1 - 0.0035 * 4931 / 200, 4)
    assert pb.april_layers(11) == dict(loop_first=3, loop_last=5, parallel_start=8)
    assert pb.april_layers(6) == dict(loop_first=2, loop_last=3, parallel_start=4)
    # TTT LoRA: the full run's share of the width (80 of 512), and its output scale alpha / rank = 1.8 kept
    assert pb.lora_rank(128) == 20 and float(pb.reference_env(april, "april")["TTT_LORA_ALPHA"]) / 20 == 1.8


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
    """The stand-in as the reference and a tiny run of ours, one seed, run together (the variants' path is
    the April test's, on stand-ins: a second real run would double this test's time)."""
    argv = ["--reference", str(stand_in), "--data", str(tiny_data["output_dir"]),
            "--tokenizer", str(tiny_data["tokenizer_model"]), "--seeds", "1337", "--out", str(tmp_path / "out"),
            "--layers", "2", "--dim", "32", "--heads", "4", "--kv-heads", "2", "--mlp-mult", "2", "--seq-len", "64",
            "--batch-tokens", "512", "--steps", "4", "--eval-stride", "32",
            "--ours-env", f"VOCAB_SIZE={TINY_VOCAB},ROPE_DIMS=4,VE_DIM=8,BIGRAM_DIM=8,VAL_BATCH_SIZE=4096"]
    pb.main(argv)
    out = capsys.readouterr().out
    assert "| reference | 1337 | 4 | 1.5000 | 1.4000 | 1.4100 | 1.3800 | - | 100.0 | -, -, - |" in out
    ours = pb.parse_result((tmp_path / "out" / "ours_seed1337" / "output.txt").read_text(), "ours")
    assert ours.steps == 4 and 0 < ours.sliding < 10 and ours.ttt is None  # the March record ran no TTT
    assert f"| ours | 1337 | 4 | {ours.raw:.4f} | {ours.float:.4f} |" in out and "ours' step time / reference's" in out
    log = (tmp_path / "out" / "ours_seed1337" / "ours.txt").read_text()
    assert "hparam ema_decay:0.0" in log and "hparam ttt:False" in log  # a span under one step


# ---- the April record's shims: each kernel against the formula it computes -------------------------------


def test_varlen_shim_attends_causally_within_each_document_only():
    """FlashAttention's varlen call: packed tokens, documents from cu_seqlens (padded with repeated ends, as
    the record pads them), GQA; against softmax attention computed document by document."""
    torch.manual_seed(0)
    n, heads, kv_heads, d = 13, 4, 2, 8
    q, k, v = (torch.randn(n, h, d, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 5, 6, 13, 13, 13], dtype=torch.int32)
    y = pb.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, window_size=(-1, -1))
    assert y.shape == q.shape
    for a, b in ((0, 5), (5, 6), (6, 13)):
        t = b - a
        for h in range(heads):
            s = q[a:b, h] @ k[a:b, h // 2].T / d ** 0.5
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            assert torch.allclose(y[a:b, h], s.softmax(-1) @ v[a:b, h // 2], atol=1e-5)
    y.sum().backward()  # training runs through it
    assert q.grad is not None and k.grad.abs().sum() > 0
    with pytest.raises(ValueError):  # a segment longer than max_seqlen: the record never packs one
        pb.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)


def test_softcapped_ce_shim_is_the_kernels_formula():
    """The fused kernel: z = 2c sigmoid(2x / c), loss = logsumexp(z) - z[target]; its backward kernel:
    grad_x = g (softmax(z) - onehot) 4 sigmoid (1 - sigmoid). The shim's values and autograd gradients."""
    torch.manual_seed(0)
    c, rows, vocab = 30.0, 7, 11
    x = (torch.randn(rows, vocab) * 40).requires_grad_()  # past the cap: the softcap matters
    t = torch.randint(0, vocab, (rows,))
    sig = torch.sigmoid(x.detach() * 2 / c)
    z = 2 * c * sig
    losses = torch.logsumexp(z, dim=1) - z[torch.arange(rows), t]
    got = pb.softcapped_cross_entropy(x, t, c, reduction="none")
    assert torch.allclose(got, losses, atol=1e-4)
    assert torch.allclose(pb.softcapped_cross_entropy(x, t, c), losses.mean(), atol=1e-5)
    assert torch.allclose(pb.softcapped_cross_entropy(x, t, c, reduction="sum"), losses.sum(), atol=1e-3)
    g = torch.rand(rows)
    (got * g).sum().backward()
    onehot = torch.nn.functional.one_hot(t, vocab).float()
    expected = g[:, None] * (torch.softmax(z, dim=1) - onehot) * (4 * sig * (1 - sig))
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_fused_mlp_shim_is_the_kernels_formula():
    """The fused MLP kernels: pre = x W1^T, post = leaky(pre, 0.5)^2, out = post W2^T; backward
    dpre = (g W2) * where(pre > 0, 2 pre, 0.5 pre), dW1 = dpre^T x, dW2 = g^T post, dx = dpre W1."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, requires_grad=True)
    w1 = torch.randn(12, 6, requires_grad=True)
    w2 = torch.randn(6, 12, requires_grad=True)
    out = pb.fused_leaky_relu2_mlp(x, w1, w2)
    xf = x.detach().reshape(-1, 6)
    pre = xf @ w1.detach().T
    post = torch.where(pre > 0, pre, 0.5 * pre) ** 2
    assert torch.allclose(out.reshape(-1, 6), post @ w2.detach().T, atol=1e-4)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    gf = g.reshape(-1, 6)
    dpre = (gf @ w2.detach()) * torch.where(pre > 0, 2 * pre, 0.5 * pre)
    assert torch.allclose(w1.grad, dpre.T @ xf, atol=1e-3)
    assert torch.allclose(w2.grad, gf.T @ post, atol=1e-3)
    assert torch.allclose(x.grad.reshape(-1, 6), dpre @ w1.detach(), atol=1e-3)


# A stand-in of the April record: its imports (triton, the varlen call), two functions that launch Triton
# kernels (replaced by the shim before main), pinned memory and streams; then its final log lines.
APRIL_STAND_IN = textwrap.dedent('''
    import os, sys
    import torch
    from flash_attn_interface import flash_attn_func as flash_attn_3_func, flash_attn_varlen_func
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _kernel(x_ptr, n, block: tl.constexpr):
        pass

    def softcapped_cross_entropy(logits, targets, softcap, reduction="mean"):
        _kernel[(1,)](logits, 1, block=4)

    def linear_leaky_relu_square(a, b):
        _kernel[(1,)](a, 1, block=4)

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w1, w2):
            return linear_leaky_relu_square(x, w1)

    FusedLeakyReLUSquareMLP = Fused.apply

    def main():
        assert "triton" not in sys.modules or not hasattr(sys.modules["triton"], "_Kernel")
        buf = torch.empty(4, dtype=torch.int64, pin_memory=True).pin_memory()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            buf.zero_()
        x, w1, w2 = torch.randn(3, 4), torch.randn(8, 4), torch.randn(4, 8)
        assert torch.allclose(FusedLeakyReLUSquareMLP(x, w1, w2), torch.nn.functional.leaky_relu(x @ w1.T, 0.5) ** 2 @ w2.T)
        loss = softcapped_cross_entropy(torch.randn(5, 7), torch.randint(0, 7, (5,)), 30.0)
        assert loss.ndim == 0
        cu = torch.tensor([0, 2, 3, 3], dtype=torch.int32)
        q = torch.randn(3, 2, 4)
        assert flash_attn_varlen_func(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2,
                                      max_seqlen_k=2, causal=True, window_size=(-1, -1)).shape == q.shape
        assert os.environ.get("CASEOPS_ENABLED") == "1" and os.environ["NUM_LOOPS"] == "2"
        sidecar = os.path.join(os.environ["DATA_PATH"], "fineweb_val_bytes_000000.bin")
        print(f"sidecar:{os.path.exists(sidecar)} layers:{os.environ['LOOP_START']},{os.environ['LOOP_END']},"
              f"{os.environ['PARALLEL_START_LAYER']} ema:{os.environ['EMA_DECAY']}")
        print("Hyperparameters:")
        print(f"  train_batch_tokens: {os.environ['TRAIN_BATCH_TOKENS']}")
        print("4/4 train_loss: 6.0000 train_time: 0.1m tok/s: 2048")
        print("4/4 val_loss: 6.0000 val_bpb: 3.5000")
        print("diagnostic pre-quantization post-ema val_loss:5.90000000 val_bpb:3.40000000 eval_time:1500ms")
        print("diagnostic quantized val_loss:5.91000000 val_bpb:3.41000000 eval_time:1400ms")
        print("quantized_ttt_phased val_loss:5.80000000 val_bpb:3.30000000 eval_time:9000ms")

    if __name__ == "__main__":
        main()
''')

# A stand-in of ours for the April path: it checks the settings it was given and prints ours' final lines.
OURS_APRIL_STAND_IN = textwrap.dedent('''
    import os
    e = os.environ
    assert e["PRESET"] == "april" and e["TTT"] == "1" and e["VOCAB_SIZE"] == e["EXPECT_VOCAB"]
    print(f"layers:{e['MINI_RECUR_FIRST']},{e['MINI_RECUR_LAST']},{e['PARALLEL_START_LAYER']} ema:{e['EMA_DECAY']} "
          f"prefix:{e['PHASED_TTT_PREFIX_DOCS']} data:{e['DATA_PATH']}")
    print("step:4/4 val_loss:5.9 val_bpb:3.45 train_time:4000ms step_avg:1000.00ms")
    print("raw_float_exact val_loss:5.9 val_bpb:3.45000000 steps:4 train_time:4000ms")
    print("final_float_exact val_loss:5.8 val_bpb:3.35000000 weights:ema")
    print("final_roundtrip_exact val_loss:5.8 val_bpb:3.36000000 eval:plain seq_len:64 stride:64 eval_time:1200ms")
    print("final_sliding_window_exact val_loss:5.8 val_bpb:3.34000000 eval:sliding seq_len:64 stride:16 eval_time:4800ms")
    ttt = "3.20000000" if e.get("MLP_PROJ_INIT") == "zero" else "3.25000000"
    print(f"final_ttt_exact val_loss:5.7 val_bpb:{ttt} eval_time:12000ms compile_time:0ms chunk:48")
''')


def test_shim_runs_an_april_stand_in(tmp_path):
    script = tmp_path / "record" / "train_gpt.py"
    script.parent.mkdir()
    script.write_text(APRIL_STAND_IN)
    assert pb.record_kind(script) == "april"
    env = {**os.environ, "CASEOPS_ENABLED": "1", "NUM_LOOPS": "2", "DATA_PATH": str(tmp_path), "LOOP_START": "2",
           "LOOP_END": "3", "PARALLEL_START_LAYER": "4", "EMA_DECAY": "0.9", "TRAIN_BATCH_TOKENS": "4096"}
    proc = subprocess.run([sys.executable, str(ROOT / "lab" / "parity_benchmark.py"), "shim", str(script)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity_shim kernels_replaced: softcapped_cross_entropy,FusedLeakyReLUSquareMLP" in proc.stdout
    r = pb.parse_result(proc.stdout, "april")
    assert (r.raw, r.float, r.quant, r.sliding, r.ttt, r.steps) == (3.5, 3.4, 3.41, None, 3.3, 4)
    assert r.step_ms == 2000.0 and r.eval_s == {"float": 1.5, "quant": 1.4, "ttt": 9.0}


def test_an_unshimmed_triton_launch_fails_loudly(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text("import triton\n@triton.jit\ndef k(x):\n    pass\ndef main():\n    k[(1,)](0)\n")
    proc = run_shim(script)
    assert proc.returncode == 1 and "Triton kernel k launched on CPU" in proc.stderr


def test_short_documents_keep_the_text_in_pieces_of_the_target_length():
    text = "\n".join(["Short line."] * 3 + ["A long paragraph. " * 80, "Tail."])
    pieces = pb.short_documents(text, lo=100, hi=400)
    assert all(len(p) <= 400 for p in pieces) and sum(len(p) >= 100 for p in pieces) >= len(pieces) - 2
    assert pieces[0] == "Short line.\nShort line.\nShort line." and pieces[-1].endswith("paragraph.\nTail.")
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_april_path_end_to_end_on_stand_ins(tiny_data, tmp_path, capsys, monkeypatch):
    """The April comparison's wiring with both scripts as stand-ins (seconds): the data folders (the same
    validation tokens cut to whole evaluation batches, the record's byte sidecar = our byte tables), the
    settings each side gets, and the table. --out is relative: each run works in its own folder."""
    import numpy as np
    import sentencepiece as spm
    import train_gpt

    record = tmp_path / "record" / "train_gpt.py"
    record.parent.mkdir()
    record.write_text(APRIL_STAND_IN)
    ours = tmp_path / "ours.py"
    ours.write_text(OURS_APRIL_STAND_IN)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    argv = ["--reference", str(record), "--ours", str(ours), "--data", str(tiny_data["output_dir"]),
            "--tokenizer", str(tiny_data["tokenizer_model"]), "--seeds", "7", "--out", "out",
            "--seq-len", "64", "--batch-tokens", "4096", "--steps", "4", "--val-tokens", "2000",
            "--variant", "mlp0:MLP_PROJ_INIT=zero"]
    os.environ["EXPECT_VOCAB"] = str(TINY_VOCAB)
    try:
        pb.main(argv)
    finally:
        del os.environ["EXPECT_VOCAB"]
    table = capsys.readouterr().out
    assert "| reference | 7 | 4 | 3.5000 | 3.4000 | 3.4100 | - | 3.3000 | 2000.0 | 1.4, -, 9.0 |" in table
    assert "| ours | 7 | 4 | 3.4500 | 3.3500 | 3.3600 | 3.3400 | 3.2500 | 1000.0 | 1.2, 4.8, 12.0 |" in table
    assert "ttt -0.0500" in table and "ours' step time / reference's: 0.500" in table
    assert "| mlp0 | 3.2000 | 3.2000 | 3.3500 | -0.0500 | 1000.0 |" in table  # TTT: the final metric
    ref_log = (out / "reference_seed7" / "output.txt").read_text()
    ours_log = (out / "ours_seed7" / "output.txt").read_text()
    assert "sidecar:True layers:2,3,4" in ref_log and "layers:2,3,4" in ours_log  # 6 layers: 3-5 and 8 of 11
    ema = ours_log.split("ema:")[1].split()[0]
    assert f"ema:{ema}" in ref_log and float(ema) == pb.ema_decay(4, "april")
    val = train_gpt.load_data_shard(out / "data_ours" / "fineweb_val_000000.bin")
    assert (len(val) - 1) % (pb.VAL_BATCH_SEQS * 64) == 0 and len(val) <= 2001
    assert np.array_equal(val, train_gpt.load_data_shard(out / "data_reference" / "fineweb_val_000000.bin"))
    sidecar = train_gpt.load_data_shard(out / "data_reference" / "fineweb_val_bytes_000000.bin")
    luts = train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_model"])),
                                     TINY_VOCAB)
    t = torch.from_numpy(val.astype(np.int64))
    assert sidecar[0] == 0 and np.array_equal(sidecar[1:], luts.token_bytes(t[:-1], t[1:]).numpy())
    prefix = ours_log.split("prefix:")[1].split()[0]
    assert int(prefix) == max(3, round((val == 1).sum() * 2500 / 50000))
