"""train_gpt.py's model traced on fake CUDA tensors under torch's own CUDA autocast rules, without a GPU.

A CPU-only torch build carries the CUDA autocast op lists (which ops run in bf16, which in fp32) and
FakeTensorMode can make tensors that claim to live on "cuda:0" and carry only shapes and dtypes. Two
things stand in the way, and this module removes them:

- torch.autocast("cuda") switches itself off when no CUDA is available: cuda_autocast_allowed() lets it on.
- A CPU-only build has no device guard for CUDA, so even a view of a fake CUDA tensor fails ("PyTorch is
  not linked with support for cuda devices"). torch._C._ensureCUDADeviceGuardSet() installs torch's own
  fake CUDA guard, but only over an existing guard that reports no device, and a CPU build has none:
  install_fake_cuda_guard() first copies the Lazy device's guard (0 devices) into the CUDA slot of
  c10's guard registry, then lets torch replace it.

The autograd engine still refuses a backward on CUDA tensors without a real accelerator (it asks the
accelerator for the current stream). So the backward is traced differently: make_fx records the forward
on fake CUDA tensors, autocast's casts included (each one an explicit aten op in the graph); the graph
is moved to the CPU (only device arguments change, every dtype stays as CUDA autocast chose it) and its
joint forward+backward graph is traced there. On a machine with a GPU none of this is needed: the same
checks run on real CUDA tensors (tests/test_cuda_path.py).

Used by tests/test_cuda_path.py (FlashAttention's input contract, the dtype plan) and by
lab/benchmark.py (activation memory from the saved tensors of the joint graph).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

CUDA = torch.device("cuda", 0)
# c10::DeviceType values: the slots of c10::impl::device_guard_impl_registry.
_CUDA_SLOT, _LAZY_SLOT, _SLOTS = 1, 17, 21
_REGISTRY_SYMBOL = "_ZN3c104impl26device_guard_impl_registryE"  # c10::impl::device_guard_impl_registry

# FlashAttention 3 (and 2): q, k, v of one 16-bit dtype, [B, T, H, D] with a contiguous last dim, the
# same B and T, k and v of one shape, query heads a multiple of key/value heads, D a multiple of 8 and
# at most 256 (FA3's kernels are built for head dims 64, 96, 128, 192, 256 and round up to them).
FLASH_DTYPES = (torch.bfloat16, torch.float16)
FLASH_MAX_HEAD_DIM = 256
FLASH_HEAD_DIM_MULTIPLE = 8


def real_cuda() -> bool:
    return torch.cuda.is_available()


def install_fake_cuda_guard() -> None:
    """Give a CPU-only build a (no-op) CUDA device guard, so fake CUDA tensors can be viewed and traced.
    Idempotent; does nothing where CUDA is real."""
    if real_cuda():
        return
    if torch.backends.cuda.is_built():  # a CUDA build on a machine without a GPU has a guard to replace
        torch._C._ensureCUDADeviceGuardSet()
        return
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    slots = (ctypes.c_void_p * _SLOTS).in_dll(lib, _REGISTRY_SYMBOL)
    if slots[_CUDA_SLOT]:
        return  # already installed
    if not slots[_LAZY_SLOT]:
        raise RuntimeError("fake CUDA tracing: this torch build registers no Lazy device guard to stand in")
    slots[_CUDA_SLOT] = slots[_LAZY_SLOT]
    torch._C._ensureCUDADeviceGuardSet()  # replaces a guard that reports 0 devices by its fake CUDA guard
    if slots[_CUDA_SLOT] == slots[_LAZY_SLOT]:
        slots[_CUDA_SLOT] = None
        raise RuntimeError("fake CUDA tracing: torch did not install its fake CUDA device guard")


@contextlib.contextmanager
def cuda_autocast_allowed():
    """torch.autocast("cuda") as on a GPU: the CPU build has the rules but turns autocast off without CUDA."""
    if real_cuda():
        yield
        return
    with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        yield


def cuda_autocast():
    """train_gpt's CUDA autocast (setup_runtime's choice)."""
    return torch.autocast("cuda", dtype=torch.bfloat16)


def fake_cuda_mode() -> FakeTensorMode:
    install_fake_cuda_guard()
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_device(module: nn.Module, mode: FakeTensorMode | None, device: torch.device = CUDA) -> nn.Module:
    """Move every parameter and buffer to `device`: for real, or (mode given) as fake tensors of the same
    shapes and dtypes. In place; returns the module."""
    if mode is None:
        return module.to(device)

    def fake(t: Tensor) -> Tensor:
        return FakeTensor(mode, t.detach().to("meta"), device)

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = fake(b)
    return module


# ---- the FlashAttention stand-in -------------------------------------------------------------------

attention_calls: list[tuple] = []  # (q, k, v) dtypes and shapes of every checked forward call
attention_backward_calls: list[tuple] = []


def check_flash_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise AssertionError unless FlashAttention 3 accepts (q, k, v) as they are."""
    shapes = f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
    assert q.dtype == k.dtype == v.dtype, f"FlashAttention needs one dtype for q, k, v: {shapes}"
    assert q.dtype in FLASH_DTYPES, f"FlashAttention needs bf16 or fp16 inputs: {shapes}"
    assert q.device == k.device == v.device and q.device.type == "cuda", f"not on one CUDA device: {q.device}"
    assert q.dim() == k.dim() == v.dim() == 4, f"FlashAttention needs [B, T, H, D]: {shapes}"
    assert k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3], shapes
    assert q.shape[2] % k.shape[2] == 0, f"query heads must be a multiple of key/value heads: {shapes}"
    d = q.shape[3]
    assert d % FLASH_HEAD_DIM_MULTIPLE == 0 and d <= FLASH_MAX_HEAD_DIM, f"unsupported head dim {d}: {shapes}"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, f"the head dim must be contiguous: {shapes}"


@torch.library.custom_op("pgolf_cuda_trace::flash_attention_standin", mutates_args=())
def flash_attention_standin(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention with FlashAttention 3's input contract checked at every call (SDPA computes)."""
    check_flash_inputs(q, k, v)
    attention_calls.append((q.dtype, k.dtype, v.dtype, tuple(q.shape), tuple(k.shape)))
    return tg._sdpa(q, k, v).contiguous()


@flash_attention_standin.register_fake
def _(q, k, v):
    if q.device.type == "cuda":  # the retargeted CPU replay checks only the backward
        check_flash_inputs(q, k, v)
        attention_calls.append((q.dtype, k.dtype, v.dtype, tuple(q.shape), tuple(k.shape)))
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    """FlashAttention's backward takes the output gradient in the inputs' dtype and returns dq, dk, dv in
    it; recompute the stand-in's forward and differentiate it."""
    q, k, v = ctx.saved_tensors
    assert grad.dtype == q.dtype, f"attention output gradient {grad.dtype} for {q.dtype} inputs"
    attention_backward_calls.append((grad.dtype, q.dtype))
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = tg._sdpa(*leaves)
    return torch.autograd.grad(out, leaves, grad)


flash_attention_standin.register_autograd(_backward, setup_context=_setup_context)


# ---- dtypes at module boundaries -------------------------------------------------------------------


@contextlib.contextmanager
def dtype_probe(model: tg.GPT):
    """Yields {role: set of dtypes} filled by hooks while the model runs: the residual stream entering
    (x, x0) and leaving each block, the attention and MLP outputs, every linear layer's input, and the
    final norm's output (the tied head's input)."""
    seen: dict[str, set] = collections.defaultdict(set)

    def note(role: str, t) -> None:
        if isinstance(t, Tensor) and t.is_floating_point():
            seen[role].add(t.dtype)

    def on_input(*roles):
        return lambda module, args: [note(role, a) for role, a in zip(roles, args)] and None

    def on_block_input(module, args):  # Block(x, PassInputs): the stream, and x0 inside the inputs
        note("stream", args[0])
        note("x0", args[1].x0)

    def on_output(role):
        return lambda module, args, out: note(role, out)

    hooks = []
    for m in model.modules():
        if isinstance(m, tg.Block):
            hooks += [m.register_forward_pre_hook(on_block_input),
                      m.register_forward_hook(on_output("stream"))]
        elif isinstance(m, tg.CausalSelfAttention):
            hooks.append(m.register_forward_hook(on_output("attention_output")))
        elif isinstance(m, tg.MLP):
            hooks.append(m.register_forward_hook(on_output("mlp_output")))
        elif isinstance(m, tg.CastedLinear):
            hooks.append(m.register_forward_pre_hook(on_input("linear_input")))
        elif isinstance(m, tg.RMSNorm):
            hooks.append(m.register_forward_hook(on_output("head_input")))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


# ---- tracing --------------------------------------------------------------------------------------


def functional_loss(model: nn.Module, autocast):
    """loss(params, buffers, x, y) = the mean training loss of model under `autocast`, as train_step runs it."""
    def loss(params, buffers, x, y):
        with autocast():
            return torch.func.functional_call(model, {**params, **buffers}, (x, y)).mean()
    return loss


def trace_forward(model: nn.Module, x: Tensor, y: Tensor, autocast=cuda_autocast) -> torch.fx.GraphModule:
    """The training loss of a model whose tensors are fake CUDA tensors, as an aten graph in which every
    autocast cast is an explicit op. Runs the stand-in's checks at every attention call."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with cuda_autocast_allowed():
        return make_fx(functional_loss(model, autocast))(params, buffers, x, y)


def retarget(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """The same graph with every device argument moved to `device` (dtypes untouched)."""
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if isinstance(dev, torch.device) and dev.type != device.type:
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
    return gm


def trace_joint(model: nn.Module, forward: torch.fx.GraphModule, x: Tensor, y: Tensor) -> torch.fx.GraphModule:
    """Forward and backward of a traced loss graph (moved to the CPU), on fake CPU tensors of the model's
    shapes and dtypes: returns (loss, gradients of every parameter) as one aten graph, the backward in
    the dtypes the CUDA forward chose."""
    cpu = torch.device("cpu")
    forward = retarget(forward, cpu)
    names = [n for n, _ in model.named_parameters()]
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
        buffers = {n: torch.empty(b.shape, dtype=b.dtype) for n, b in model.named_buffers()}
        xs, ys = torch.empty(x.shape, dtype=x.dtype), torch.empty(y.shape, dtype=y.dtype)

        def joint(params, buffers, x, y):
            leaves = {n: p.requires_grad_() for n, p in params.items()}
            loss = forward(leaves, buffers, x, y)
            return loss, torch.autograd.grad(loss, [leaves[n] for n in names])
        return make_fx(joint)(params, buffers, xs, ys)


def value(node: torch.fx.Node):
    return node.meta.get("val")


def matmul_dtypes(gm: torch.fx.GraphModule) -> dict[str, int]:
    """dtype -> number of matrix products (mm, bmm, addmm) in the graph."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
                                                          torch.ops.aten.addmm.default):
            key = str(value(node).dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + 1
    return counts
