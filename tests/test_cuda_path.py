"""The CUDA path without a GPU: every attention call meets FlashAttention 3's input contract under
torch's real CUDA bf16 autocast rules, and tensors have the dtypes train_gpt.py's dtype plan says.

On a CPU the model runs on fake CUDA tensors (lab/cuda_trace.py says how); on a machine with a GPU
the same tests run on real CUDA tensors. Covered: the default (record) model's training forward and
backward, both recurrence modes and every QAT mode on a small model, GPTQ calibration, and both
evaluation entries (train_gpt.evaluate's loop and the model eval_ngram_on_checkpoint.py loads), and
score-first TTT's step with its per-document LoRAs.

Run:
    python3 -m pytest -q tests/test_cuda_path.py
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import eval_ngram_on_checkpoint as ngram_eval
import train_gpt as tg
from lab import cuda_trace as ct

BF16, FP32 = torch.bfloat16, torch.float32
REAL = ct.real_cuda()
# One process on the first CUDA device (fake or real), bf16 autocast where the test allows it.
CUDA_RT = tg.Runtime(0, 1, ct.CUDA, tg.grad_accum_steps(1), ct.cuda_autocast, BF16)
# The per-GPU micro-batch of the record run (786,432 tokens / 8 GPUs / 2048) costs nothing on fake tensors.
SEQS, SEQ_LEN = (2, 256) if REAL else (48, 2048)
SMALL = dict(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=4,
             bigram_buckets=32, bigram_dim=16)
MODES = {  # QAT hard on the default model; each other mode once, on a small one
    "recurrence_qat_soft": dict(qat="soft", recurrence=True, num_layers=4, recur_prelude=1, recur_passes=2,
                                recur_coda=1),
    "mini_recurrence_qat_hard": dict(qat="hard", num_layers=3, mini_recur_repeats=1, mini_recur_first=1,
                                     mini_recur_last=1),
    "qat_off": dict(qat="off"),
    # PRESET=april's model parts: two residual lanes, the loop in its U-Net form, gated attention output,
    # the input-dependent SmearGate, no BigramHash or value embeddings.
    "april_parts_qat_off": dict(qat="off", num_layers=4, parallel_start_layer=3, mini_recur_repeats=1,
                                mini_recur_first=1, mini_recur_last=2, mini_recur_unet=True, attn_out_gate=True,
                                smear_gate_form="input", gate_window=12, bigram_buckets=0, ve_layers="none"),
}


@pytest.fixture
def device_mode():
    """The fake-tensor mode to build tensors in (None on a real GPU); records every attention call."""
    ct.attention_calls.clear()
    ct.attention_backward_calls.clear()
    mode = None if REAL else ct.fake_cuda_mode()
    with (mode or contextlib.nullcontext()):
        yield mode


def build(cfg: tg.ModelConfig, qat: str, mode) -> tg.GPT:
    """The model on (fake) CUDA with the FlashAttention stand-in and QAT switched on if it has a mode."""
    with _outside(mode):
        model = tg.GPT(cfg, ct.flash_attention_standin)
        tg.configure_qat(model, qat)
        tg.set_qat([m for m in model.modules() if isinstance(m, tg.CastedLinear)], True)
    return ct.to_device(model, mode)


@contextlib.contextmanager
def _outside(mode):
    """Real CPU tensors while the model is built (its initializers need real values)."""
    if mode is None:
        yield
        return
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        yield


def tokens(vocab: int, seqs: int = SEQS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, vocab, (seqs, seq_len), device=ct.CUDA)


def plan_passes(model: tg.GPT) -> int:
    return len(model.plan)


def assert_attention_checked(calls: int) -> None:
    assert len(ct.attention_calls) == calls, ct.attention_calls
    assert all(c[:3] == (BF16, BF16, BF16) for c in ct.attention_calls)


STREAM_ROLES = {"stream", "x0", "attention_output", "mlp_output", "linear_input", "head_input"}


def assert_activations_bf16(seen: dict) -> None:
    """The dtype plan's bf16 rows: the residual stream, block outputs, every linear layer's input."""
    assert seen.keys() == STREAM_ROLES and all(d == {BF16} for d in seen.values()), dict(seen)


def outputs(gm: torch.fx.GraphModule) -> list:
    """The values a traced graph returns, flattened."""
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return _flatten(out.args[0])


def _flatten(arg) -> list:
    if isinstance(arg, (list, tuple)):
        return [v for a in arg for v in _flatten(a)]
    return [ct.value(arg)] if isinstance(arg, torch.fx.Node) else []


def check_training_step(model: tg.GPT, x: torch.Tensor) -> None:
    """Forward and backward of the training loss: the contract at every attention call, both ways; the
    stream and activations in bf16; every matrix product in bf16; the loss and every gradient in fp32."""
    passes = plan_passes(model)
    with ct.dtype_probe(model) as seen:
        forward = ct.trace_forward(model, x, x)
    assert_activations_bf16(seen)
    assert_attention_checked(passes)
    joint = ct.trace_joint(model, forward, x, x)
    assert len(ct.attention_backward_calls) == passes
    assert ct.matmul_dtypes(joint).keys() == {"bfloat16"}, ct.matmul_dtypes(joint)
    loss, *grads = outputs(joint)
    assert loss.dtype == FP32 and loss.dim() == 0
    assert len(grads) == len(list(model.parameters())) and {g.dtype for g in grads} == {FP32}


# ---- training -------------------------------------------------------------------------------------


def test_default_model_training_step_meets_the_flash_attention_contract(device_mode):
    cfg = tg.ModelConfig.from_hparams(tg.Hyperparameters())
    model = build(cfg, tg.Hyperparameters.qat, device_mode)
    assert plan_passes(model) == 11 and cfg.model_dim // cfg.num_heads == 64
    check_training_step(model, tokens(cfg.vocab_size))


@pytest.mark.parametrize("mode_name", MODES)
def test_every_mode_meets_the_flash_attention_contract(device_mode, mode_name):
    options = {**SMALL, **MODES[mode_name]}
    qat = options.pop("qat")
    model = build(tg.ModelConfig(**options), qat, device_mode)
    check_training_step(model, tokens(model.cfg.vocab_size, 2, 64))


def test_the_contract_check_catches_what_flash_attention_rejects(device_mode):
    q = torch.empty(2, 8, 4, 64, dtype=BF16, device=ct.CUDA)
    kv = torch.empty(2, 8, 2, 64, dtype=BF16, device=ct.CUDA)
    ct.check_flash_inputs(q, kv, kv)
    bad = {
        "one dtype": (q.float(), kv.float(), kv),
        "bf16 or fp16": (q.float(), kv.float(), kv.float()),
        "multiple of key/value heads": (q, kv[:, :, :1].expand(2, 8, 3, 64), kv[:, :, :1].expand(2, 8, 3, 64)),
        "head dim": (q[..., :60], kv[..., :60], kv[..., :60]),
        "contiguous": tuple(torch.empty(2, 8, 64, t.size(2), dtype=BF16, device=ct.CUDA).transpose(2, 3)
                            for t in (q, kv, kv)),
    }
    for words, (a, b, c) in bad.items():
        with pytest.raises(AssertionError, match=words):
            ct.check_flash_inputs(a, b, c)


# ---- GPTQ calibration and evaluation ---------------------------------------------------------------


def small_model(mode) -> tg.GPT:
    return build(tg.ModelConfig(**SMALL), "off", mode)


def test_gptq_calibration_meets_the_contract_and_sums_in_fp32(device_mode):
    model = small_model(device_mode)
    names = set(tg.hessian_sites(model))
    batches = [(x, x) for x in (tokens(64, 2, 64), tokens(64, 2, 64))]
    with ct.cuda_autocast_allowed(), ct.dtype_probe(model) as seen:
        hessians = tg.collect_hessians(model, batches, names, CUDA_RT)
    assert_activations_bf16(seen)
    assert_attention_checked(2 * plan_passes(model))
    assert hessians.keys() == names
    for name, h in hessians.items():
        cols = model.get_parameter(name).size(1)
        assert h.dtype == FP32 and h.shape == (cols, cols), name


def test_evaluation_meets_the_contract_without_host_syncs(device_mode, monkeypatch):
    copies = []  # host-to-device copies (fake tensors cannot be pinned: count them, copy plainly)

    def to_device(t, device):
        copies.append(tuple(t.shape))
        return t.to(device)

    monkeypatch.setattr(tg, "_to_device", to_device)
    model = small_model(device_mode).eval()
    val = torch.randint(0, 64, (300,), dtype=torch.int32, device=ct.CUDA)
    ones = torch.ones(64, dtype=torch.int32)
    luts = tg.ByteLUTs(ones, ones == 0, ones == 0).to(ct.CUDA)
    with ct.cuda_autocast_allowed(), ct.dtype_probe(model) as seen:
        sums = tg.score_windows(model, tg.bpb_sums(luts), val, tg.EvalSpec("sliding", 64, 32, 4), CUDA_RT)
    windows = len(tg.sliding_window_plan(len(val) - 1, 64, 32)[0])
    assert_attention_checked(-(-windows // 4) * plan_passes(model))  # padded to whole batches
    assert_activations_bf16(seen)
    assert sums.shape == (3,) and sums.dtype == torch.float64 and sums.device.type == "cuda"
    assert copies == [(2, -(-windows // 4) * 4)]  # the padded window plan, once; nothing per batch


def test_ngram_evaluation_model_meets_the_contract(device_mode, tmp_path, monkeypatch):
    h = tg.Hyperparameters(**SMALL, eval_seq_len=64, compile=False, qat="off")
    with _outside(device_mode):
        cfg = tg.ModelConfig.from_hparams(h)
        blob = tg.serialize_artifact(tg.quantize_state_dict(tg.GPT(cfg).state_dict()), config=cfg, compressor="zstd")
        path = tmp_path / "small.ptz"
        path.write_bytes(blob)
        monkeypatch.setattr(tg, "select_attention", lambda device: ("standin", ct.flash_attention_standin, "test"))
        cpu = tg.Runtime(0, 1, torch.device("cpu"), 1, contextlib.nullcontext, FP32)
        _, logits_fn, compiled = ngram_eval.load_model(*tg.load_artifact(path), h, cpu, lambda msg: None)
    assert not compiled
    model = ct.to_device(logits_fn.__self__, device_mode)
    rt = tg.Runtime(0, 1, ct.CUDA, 1, ct.cuda_autocast, BF16)
    if not REAL:
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    with ct.cuda_autocast_allowed(), torch.no_grad(), ct.dtype_probe(model) as seen, rt.autocast():
        logits = model.logits(torch.zeros((3, h.eval_seq_len), dtype=torch.long, device=ct.CUDA))
    assert logits.dtype == FP32 and logits.shape == (3, 64, 64)
    assert_activations_bf16(seen)
    assert_attention_checked(plan_passes(model))
    with ct.cuda_autocast_allowed():
        ngram_eval.warm_up(model.logits, tg.EvalSpec("sliding", h.eval_seq_len, 32, 3), rt)
    assert_attention_checked(2 * plan_passes(model))


def test_the_runtime_autocasts_cuda_to_bf16(monkeypatch):
    """setup_runtime's choice on a GPU, which the tests above use as ct.cuda_autocast."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with ct.cuda_autocast_allowed():  # entered first: it looks for a real GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        try:
            rt = tg.setup_runtime(tg.Hyperparameters(), {})
            with rt.autocast():
                assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == BF16
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert rt.device == ct.CUDA and rt.ns_dtype == BF16


@pytest.mark.skipif(not REAL, reason="needs a CUDA GPU: the fake-tensor tests above cover the CPU")
@pytest.mark.parametrize("backend", ["standin", "selected"])
def test_real_gpu_training_step_runs_with_the_selected_attention(backend):
    """On a GPU: a real forward and backward, with the stand-in or with the backend train_gpt selects
    (FlashAttention 3 or 2 where installed, else SDPA); fp32 gradients, finite."""
    cfg = tg.ModelConfig.from_hparams(tg.Hyperparameters())
    name, attention, _ = tg.select_attention(ct.CUDA)
    model = tg.GPT(cfg, ct.flash_attention_standin if backend == "standin" else attention).to(ct.CUDA)
    tg.configure_qat(model, "hard")
    x = tokens(cfg.vocab_size, 4, 2048)
    with ct.cuda_autocast():
        loss = model(x, x).mean()
    loss.backward()
    assert loss.dtype == FP32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == FP32 and torch.isfinite(g).all() for g in grads), name


@pytest.mark.skipif(not REAL, reason="needs a CUDA GPU: tests/test_step_speed.py covers the CPU")
def test_real_gpu_training_step_has_no_host_sync():
    """torch.cuda's sync debug mode turns any host sync inside a training step into an error."""
    h = tg.Hyperparameters(qat="hard", train_seq_len=256, train_batch_tokens=256 * 8 * 4)
    model = tg.GPT(tg.ModelConfig.from_hparams(h)).to(ct.CUDA)
    tg.configure_qat(model, h.qat)
    rt = CUDA_RT
    optimizers = tg.build_optimizers(model, h, rt)

    class Loader:
        def next_batch(self, global_tokens, seq_len):
            x = tokens(h.vocab_size, 4, seq_len)
            return x, x

    tg.set_step_hparams(optimizers, 1.0, 0.95)
    tg.train_step(model, optimizers, Loader(), h, rt)  # creates the optimizer state
    vote = tg.StopVote(rt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for qat_on in (False, True):
            tg.set_qat([m for m in model.modules() if isinstance(m, tg.CastedLinear)], qat_on)
            tg.train_step(model, optimizers, Loader(), h, rt)
            vote(False, False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_ttt_step_meets_the_contract_with_fp32_adapters(device_mode):
    """Score-first TTT's step (docs/ttt.md): the frozen model plus each document's LoRAs, forward under CUDA
    autocast (the backward runs through the same stand-in's autograd, checked for training above)."""
    s = tg.Hyperparameters(ttt_lora_rank=4, ttt_chunk_size=8, ttt_eval_seq_len=32, ttt_batch_size=3, seed=1)
    model = small_model(device_mode)
    with _outside(device_mode):
        lora = tg.DocumentLoRA(model, s.ttt_lora_rank, s.seed)
    lora = ct.to_device(lora, device_mode)
    lora.reset(s.ttt_batch_size)
    x = tokens(64, s.ttt_batch_size, s.ttt_eval_seq_len)
    with ct.cuda_autocast_allowed(), ct.dtype_probe(model) as seen, ct.cuda_autocast():
        logits = tg.ttt_forward(model, s.ttt_chunk_size)(x, lora)
    assert_activations_bf16(seen)
    assert_attention_checked(plan_passes(model))
    assert logits.dtype == FP32 and logits.shape == (s.ttt_batch_size, s.ttt_chunk_size, 64)  # the head on the chunk only
    assert {p.dtype for p in lora.parameters()} == {FP32} and {p.device.type for p in lora.parameters()} == {"cuda"}
