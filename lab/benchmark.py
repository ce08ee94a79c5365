"""Training-step and evaluation speed of train_gpt.py's model on whatever device this process finds,
next to what the 8 x H100 run should cost, predicted without a GPU.

    python3 lab/benchmark.py                              # the record config (default env)
    NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=8192 \\
      EVAL_SEQ_LEN=128 EVAL_STRIDE=64 OMP_NUM_THREADS=1 python3 lab/benchmark.py --steps 5 --warmup 2
    python3 lab/benchmark.py --predict-only               # the predictions alone (no timing)

The model and optimizers come from train_gpt.py's Hyperparameters (env vars) and build_model /
build_optimizers; batches are random tokens, so no dataset is needed. One step is one micro-batch of
TRAIN_BATCH_TOKENS / 8 tokens: what each GPU of the 8-GPU run computes per step.

Predictions (key "predicted"), from the model's shapes and traced graphs, on any machine: FLOPs per
token (the formula, and FlopCounterMode on fake tensors), activation memory per GPU at the 8-GPU
per-rank batch (the tensors the forward saves for the backward, from the joint graph traced on fake
CUDA tensors and split by AOT autograd's partitioner as torch.compile does), optimizer and weight
state per GPU, the bytes each collective moves per step, dynamo's graph count of the training step,
GPTQ's longest column loop per rank, and a roofline lower bound of ms/step on H100 (the peak figures
are named constants below). Appends one JSON line to --out and prints a table, measured next to
predicted where both exist.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from lab import cuda_trace as ct  # noqa: E402

DEFAULT_OUT = ROOT / "lab" / "results.jsonl"
RECORD_WORLD_SIZE = 8
# H100 SXM peaks the roofline assumes (NVIDIA datasheet): dense bf16 matmul, HBM3 bandwidth, NVLink 4
# bandwidth per direction per GPU.
H100_BF16_FLOPS, H100_HBM_BYTES_PER_S, H100_NVLINK_BYTES_PER_S = 989e12, 3.35e12, 450e9
RECORD_MS_PER_STEP, RECORD_TOKENS_PER_STEP = 87.4, 786_432  # the 2026-03-29 record (docs/challenge.md)
EVAL_TOKENS = 32_768  # random validation tokens for the sliding-window evaluation timing
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts
GIB = 2**30
RUSAGE_KIB = 1024  # Linux reports ru_maxrss in KiB


def log_nothing(msg: str) -> None:
    pass


class RandomLoader:
    """train_gpt's loader interface: one GPU's micro-batch of uniform random tokens per call."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int):
        self.vocab_size, self.device = vocab_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = global_tokens // tg.MICRO_BATCHES_PER_STEP // seq_len
        tokens = torch.randint(0, self.vocab_size, (rows, seq_len + 1), generator=self.gen)
        tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]


def flops_per_token(model: tg.GPT, seq_len: int) -> float:
    """Training FLOPs per token = 6 * N + 12 * P * T * d.

    N: matmul weights one token passes through: every linear layer of every pass in the layer plan (a
    reused block counts once per pass), the BigramHash and value-embedding projections (each once: the
    shared value embedding is projected once and scaled per layer), and the tied output projection
    (vocab x dim) counted once; embedding lookups are no matmuls. 6 = 2 (multiply-add) x 3 (forward,
    two backward matmuls). Attention: P passes, T = sequence length, d = model width: QK^T and AV are
    2 * T * d multiply-adds each per token forward, x 3 for the backward; causal masking is not halved
    (the usual convention, which makes MFU comparable with public figures)."""
    def linear_params(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    per_pass = sum(linear_params(model.blocks[p.block]) for p in model.plan)
    extra = sum(linear_params(m) for m in (model.bigram, model.value_embed) if m is not None)
    n = per_pass + extra + model.tok_emb.weight.numel()
    return 6.0 * n + 12.0 * len(model.plan) * seq_len * model.cfg.model_dim


def counted_flops_per_token(model: tg.GPT, seq_len: int) -> float:
    """Training FLOPs per token as torch.utils.flop_counter counts them over a forward and backward of one
    sequence, on fake tensors (no arithmetic runs). CPU attention needs its formula registered; like the
    CUDA kernels' it does not halve causal attention, and its backward counts the score recompute that
    flash attention does (5 products against the forward's 2, where the formula above assumes 4)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
    }
    model = copy.deepcopy(model).cpu()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ct.to_device(model, mode, torch.device("cpu"))
    with mode:
        x = torch.zeros((1, seq_len), dtype=torch.long)
        counter = FlopCounterMode(display=False, custom_mapping=attention)
        with counter:
            model(x, x).mean().backward()
    return counter.get_total_flops() / seq_len


def saved_activation_bytes(h: tg.Hyperparameters, seqs: int) -> dict[str, float]:
    """Bytes the training forward saves for the backward on one GPU (seqs sequences of TRAIN_SEQ_LEN),
    from the joint graph traced on fake CUDA tensors under bf16 autocast (lab/cuda_trace.py) and
    split by AOT autograd's partitioners: "compiled" is torch.compile's (min-cut, recomputing cheap ops),
    "eager" saves what plain autograd would. Parameters the backward reads are not counted."""
    from torch._functorch.aot_autograd import aot_function, make_boxed_func
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = tg.GPT(tg.ModelConfig.from_hparams(h), ct.flash_attention_standin)
    tg.configure_qat(model, h.qat)
    mode = ct.fake_cuda_mode()
    ct.to_device(model, mode)
    with mode:
        x = torch.zeros((seqs, h.train_seq_len), dtype=torch.long, device=ct.CUDA)
        forward = ct.retarget(ct.trace_forward(model, x, x), torch.device("cpu"))
    out = {}
    for name, partition in (("compiled", min_cut_rematerialization_partition), ("eager", default_partition)):
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm)

        with FakeTensorMode(allow_non_fake_inputs=True):
            params = {n: torch.empty(p.shape, dtype=p.dtype, requires_grad=True) for n, p in model.named_parameters()}
            buffers = {n: torch.empty(b.shape, dtype=b.dtype) for n, b in model.named_buffers()}
            tokens = torch.zeros((seqs, h.train_seq_len), dtype=torch.long)
            aot_function(forward, fw_compiler=keep, bw_compiler=keep, partition_fn=partition)(
                params, buffers, tokens, tokens).backward()
        fw = graphs[0]
        inputs = {n for n in fw.graph.nodes if n.op == "placeholder"}
        (output,) = [n for n in fw.graph.nodes if n.op == "output"]
        saved = [ct.value(n) for n in output.args[0][1:] if isinstance(n, torch.fx.Node) and n not in inputs]
        out[name] = float(sum(t.numel() * t.element_size() for t in saved if isinstance(t, torch.Tensor)))
    return out


def rank0_of(world_size: int) -> tg.Runtime:
    """Rank 0 of world_size GPUs, for planning only (no process group: nothing here communicates)."""
    return tg.Runtime(0, world_size, torch.device("cpu"), tg.grad_accum_steps(world_size), contextlib.nullcontext,
                      torch.bfloat16)


def communication_bytes(model: tg.GPT, h: tg.Hyperparameters, world_size: int) -> dict[str, float]:
    """What one optimizer step moves per GPU: the tensor each collective reduces or gathers ("payload";
    Muon's stacks padded to whole slices), and the bytes a ring sends per GPU ("bus": all-reduce
    2 (W-1)/W of its payload, reduce-scatter and all-gather (W-1)/W)."""
    muon = tg.build_optimizers(model, h, rank0_of(world_size))[1]
    stacks = muon._build_stacks()
    adam = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.matrix_params())
    payload = dict(adam_all_reduce=4.0 * adam,
                   muon_reduce_scatter=float(sum(st.grads.numel() * st.grads.element_size() for st in stacks)),
                   muon_all_gather=float(sum(st.updates.numel() * st.updates.element_size() for st in stacks)))
    ring = (world_size - 1) / world_size
    bus = 2 * ring * payload["adam_all_reduce"] + ring * (payload["muon_reduce_scatter"] + payload["muon_all_gather"])
    return dict(payload, bus_per_gpu=bus)


def state_bytes(model: tg.GPT, h: tg.Hyperparameters, world_size: int) -> float:
    """Weights, gradients, optimizer state, Muon's stack buffers and the EMA sums on one GPU of
    world_size (rank 0, which owns the most matrices)."""
    params = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for p in model.matrix_params())
    muon = tg.build_optimizers(model, h, rank0_of(world_size))[1]
    stacks = muon._build_stacks()
    owned = sum(st.params[i].numel() for st in stacks for i in st.owned(0))
    buffers = sum(t.numel() * t.element_size() for st in stacks for t in (st.grads, st.shard, st.mine, st.updates))
    ema = params if h.final_weights != "raw" else 0
    return 4.0 * (2 * params + 2 * (params - matrices) + owned + ema) + buffers


def graph_count(h: tg.Hyperparameters) -> int:
    """Dynamo graphs of the training step over every state the run visits (tg.graph_states: one graph
    each when nothing breaks), compiled as build_model does and traced by dynamo on the CPU with a
    backend that runs the graphs eagerly (the shapes do not change the count)."""
    torch._dynamo.reset()
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    tg.configure_qat(model, h.qat)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False, fullgraph=True)
    layers = [m for m in model.modules() if isinstance(m, tg.CastedLinear)]
    x = torch.zeros((1, min(h.train_seq_len, 64)), dtype=torch.long)
    for qat_on, repeats_on in tg.graph_states(h):
        tg.set_qat(layers, qat_on)
        model.set_mini_recurrence(repeats_on)
        compiled(x, x).mean().backward()
    torch._dynamo.reset()
    return counter.frame_count


def gptq_column_steps(model: tg.GPT, h: tg.Hyperparameters, world_size: int) -> int:
    """GPTQ's longest per-rank column loop on world_size GPUs (each step a handful of small kernels)."""
    state = model.state_dict()
    plan = tg.plan_from_hparams(state, h, model.fp16_param_names())
    hessians = dict.fromkeys(set(tg.hessian_sites(model)) & {n for n, b in plan.items() if b != tg.FP16_BITS})
    chunks = tg.quant_chunks(state, plan, hessians if h.gptq else {})
    owners = tg.assign_chunks(chunks, state, world_size)
    steps = [0] * world_size
    for chunk, owner in zip(chunks, owners):
        if chunk[0] in hessians and h.gptq:
            steps[owner] += state[chunk[0]][0].numel()
    return max(steps)


def predict(h: tg.Hyperparameters) -> dict:
    """Everything the 8 x H100 run should cost, from shapes and traced graphs: no GPU needed."""
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    seqs = h.train_batch_tokens // RECORD_WORLD_SIZE // h.train_seq_len  # one GPU's micro-batch
    tokens = seqs * h.train_seq_len
    flops, counted = flops_per_token(model, h.train_seq_len), counted_flops_per_token(model, h.train_seq_len)
    activations = saved_activation_bytes(h, seqs)
    comm = communication_bytes(model, h, RECORD_WORLD_SIZE)
    state = state_bytes(model, h, RECORD_WORLD_SIZE)
    compute_ms = 1000 * counted * tokens / H100_BF16_FLOPS
    memory_ms = 1000 * 2 * activations["compiled"] / H100_HBM_BYTES_PER_S  # saved once, read once
    comm_ms = 1000 * comm["bus_per_gpu"] / H100_NVLINK_BYTES_PER_S  # after the backward: not overlapped
    record_mfu = flops * RECORD_TOKENS_PER_STEP / (RECORD_MS_PER_STEP / 1000) / RECORD_WORLD_SIZE / H100_BF16_FLOPS
    return dict(
        world_size=RECORD_WORLD_SIZE, tokens_per_gpu=tokens, flops_per_token=flops,
        flops_per_token_counted=counted, activation_gib_compiled=activations["compiled"] / GIB,
        activation_gib_eager=activations["eager"] / GIB, state_gib=state / GIB,
        memory_gib=(activations["compiled"] + state) / GIB,
        comm_payload_mib={k: v / 2**20 for k, v in comm.items() if k != "bus_per_gpu"},
        comm_bus_mib_per_gpu=comm["bus_per_gpu"] / 2**20, graphs=graph_count(h), graph_states=len(tg.graph_states(h)),
        gptq_column_steps_per_rank=gptq_column_steps(model, h, RECORD_WORLD_SIZE),
        roofline_ms=max(compute_ms, memory_ms) + comm_ms, roofline_compute_ms=compute_ms,
        roofline_memory_ms=memory_ms, roofline_comm_ms=comm_ms,
        record_ms_per_step=RECORD_MS_PER_STEP, record_mfu=record_mfu,
        assumptions=f"H100 SXM dense bf16 {H100_BF16_FLOPS / 1e12:g} TFLOP/s, HBM {H100_HBM_BYTES_PER_S / 1e12:g} "
                    f"TB/s, NVLink {H100_NVLINK_BYTES_PER_S / 1e9:g} GB/s per direction")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def bf16_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, why) for the device, or (None, why not)."""
    if device.type != "cuda":
        return None, "cpu: no known bf16 peak"
    name = device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{key} dense bf16 {tflops:g} TFLOP/s"
    return None, f"no known bf16 peak for {name}"


def timed(fn, rt: tg.Runtime) -> float:
    """Seconds fn takes, with the device synchronized on both sides (CUDA runs asynchronously)."""
    rt.sync()
    t0 = time.perf_counter()
    fn()
    rt.sync()
    return time.perf_counter() - t0


def step_phases(model, optimizers, loader, h: tg.Hyperparameters, rt: tg.Runtime) -> tuple[float, float]:
    """One training step like train_gpt.train_step with grad_accum 1: (fwd+bwd seconds, optimizer seconds).
    The sync between the phases costs the overlap of the two, a little on CUDA."""
    def forward_backward():
        x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len)
        with rt.autocast():
            loss = model(x, y).mean()
        loss.backward()

    return timed(forward_backward, rt), timed(lambda: tg.optimizer_step(optimizers, h, rt), rt)


def eval_speed(eval_model, h: tg.Hyperparameters, rt: tg.Runtime, tokens: int) -> float:
    """Scored tokens per second of train_gpt.evaluate on random tokens, after one untimed call (compile)."""
    val = torch.randint(0, h.vocab_size, (tokens,), generator=torch.Generator().manual_seed(h.seed)).to(rt.device)
    ones = torch.ones(h.vocab_size, dtype=torch.int32)  # one byte per token: bpb is not measured here
    luts = tg.ByteLUTs(ones, torch.zeros_like(ones, dtype=torch.bool), torch.zeros_like(ones, dtype=torch.bool))
    luts = luts.to(rt.device)
    def run():
        tg.evaluate(eval_model, val, luts, tg.EvalSpec.sliding(h), rt)
    run()
    return (tokens - 1) / timed(run, rt)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RUSAGE_KIB / GIB  # whole process, peak RSS


def benchmark(h: tg.Hyperparameters, steps: int, warmup: int, eval_tokens: int) -> dict:
    rt = dataclasses.replace(tg.setup_runtime(h, {}), grad_accum=1)
    tg.seed_everything(h.seed)
    torch._dynamo.utils.counters.clear()
    base = tg.build_model(tg.ModelConfig.from_hparams(h), rt.device)
    plan = tg.plan_from_hparams(base.state_dict(), h, base.fp16_param_names())
    model, eval_model, orthogonalize = tg.compile_for_training(base, plan, h, rt, log_nothing)
    optimizers = tg.build_optimizers(base, h, rt, orthogonalize)
    loader = RandomLoader(h.vocab_size, rt.device, h.seed)
    compiles = rt.device.type == "cuda" and h.compile
    first = sum(step_phases(model, optimizers, loader, h, rt))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiles else None
    for _ in range(warmup):
        step_phases(model, optimizers, loader, h, rt)
    phases = [step_phases(model, optimizers, loader, h, rt) for _ in range(steps)]
    step_s = statistics.median(f + o for f, o in phases)
    opt_s = statistics.median(o for _, o in phases)
    tokens_per_step = h.train_batch_tokens // tg.MICRO_BATCHES_PER_STEP // h.train_seq_len * h.train_seq_len
    tokens_per_s = tokens_per_step / step_s
    peak, peak_why = bf16_peak_flops(rt.device)
    flops = flops_per_token(base, h.train_seq_len)
    eval_tps = eval_speed(eval_model, h, rt, eval_tokens)
    return dict(
        device=device_name(rt.device), torch=torch.__version__,
        attention=tg.select_attention(rt.device)[0],
        tokens_per_step=tokens_per_step, steps=steps, warmup=warmup, flops_per_token=flops,
        ms_per_step=1000 * step_s, tokens_per_s=tokens_per_s,
        mfu=None if peak is None else tokens_per_s * flops / peak, mfu_reason=peak_why,
        peak_mem_gib=peak_memory_gib(rt.device), optimizer_share=opt_s / step_s,
        compile_s=first - step_s if compiles else None, graphs=graphs, eval_tokens_per_s=eval_tps)


def fmt(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}:{fmt(v)}" for k, v in value.items())
    return "null" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# Measured keys and the prediction each is read against.
SIDE_BY_SIDE = {"ms_per_step": "roofline_ms", "peak_mem_gib": "memory_gib", "graphs": "graphs",
                "flops_per_token": "flops_per_token_counted"}


def report(result: dict) -> None:
    predicted = result.get("predicted") or {}
    for key, value in result.items():
        if key in ("config", "predicted"):
            continue
        side = f"   predicted {SIDE_BY_SIDE[key]}: {fmt(predicted.get(SIDE_BY_SIDE[key]))}" if key in SIDE_BY_SIDE \
            and predicted else ""
        print(f"{key:<18} {fmt(value)}{side}")
    for key, value in predicted.items():
        print(f"predicted {key:<28} {fmt(value)}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median taken)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the first one")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="random tokens evaluated")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines file to append to")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--predict-only", action="store_true", help="only the predictions: no timing")
    mode.add_argument("--no-predict", action="store_true", help="only the measurements")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.eval_tokens < 2:
        ap.error("--steps must be >= 1, --warmup >= 0, --eval-tokens >= 2")
    h = tg.Hyperparameters.from_env()
    if h.train_batch_tokens // tg.MICRO_BATCHES_PER_STEP < h.train_seq_len:
        raise ValueError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} gives less than one sequence of "
                         f"TRAIN_SEQ_LEN={h.train_seq_len} per GPU (TRAIN_BATCH_TOKENS / 8 per GPU)")
    result = {} if args.predict_only else benchmark(h, args.steps, args.warmup, args.eval_tokens)
    result = dict(result, config={f.name: getattr(h, f.name) for f in dataclasses.fields(h)},
                  predicted=None if args.no_predict else predict(h),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    report(result)
    print(f"appended to {args.out}")
    return result


if __name__ == "__main__":
    main()
