"""Training-step and evaluation speed of train_gpt.py's model on whatever device this process finds.

    python3 scripts/benchmark.py                              # the record config (default env)
    NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=8192 \\
      EVAL_SEQ_LEN=128 EVAL_STRIDE=64 OMP_NUM_THREADS=1 python3 scripts/benchmark.py --steps 5 --warmup 2

The model and optimizers come from train_gpt.py's Hyperparameters (env vars) and build_model /
build_optimizers; batches are random tokens, so no dataset is needed. One step is one micro-batch of
TRAIN_BATCH_TOKENS / 8 tokens: what each GPU of the 8-GPU run computes per step. Appends one JSON line
to --out and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results.jsonl"
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
    reused block counts once per pass), the BigramHash projection, and the tied output projection
    (vocab x dim) counted once; embedding lookups are no matmuls. 6 = 2 (multiply-add) x 3 (forward,
    two backward matmuls). Attention: P passes, T = sequence length, d = model width: QK^T and AV are
    2 * T * d multiply-adds each per token forward, x 3 for the backward; causal masking is not halved
    (the usual convention, which makes MFU comparable with public figures)."""
    def linear_params(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    per_pass = sum(linear_params(model.blocks[p.block]) for p in model.plan)
    extra = linear_params(model.bigram) if model.bigram is not None else 0
    n = per_pass + extra + model.tok_emb.weight.numel()
    return 6.0 * n + 12.0 * len(model.plan) * seq_len * model.cfg.model_dim


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

    return timed(forward_backward, rt), timed(lambda: tg.optimizer_step(model, optimizers, h), rt)


def eval_speed(eval_model, h: tg.Hyperparameters, rt: tg.Runtime, tokens: int) -> float:
    """Scored tokens per second of train_gpt.evaluate on random tokens, after one untimed call (compile)."""
    val = torch.randint(0, h.vocab_size, (tokens,), generator=torch.Generator().manual_seed(h.seed)).to(rt.device)
    ones = torch.ones(h.vocab_size, dtype=torch.int32)  # one byte per token: bpb is not measured here
    luts = tg.ByteLUTs(ones, torch.zeros_like(ones, dtype=torch.bool), torch.zeros_like(ones, dtype=torch.bool))
    luts = luts.to(rt.device)
    def run():
        tg.evaluate(eval_model, val, luts, tg.EvalSpec.sliding(h), autocast=rt.autocast)
    run()
    return (tokens - 1) / timed(run, rt)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RUSAGE_KIB / GIB  # whole process, peak RSS


def benchmark(h: tg.Hyperparameters, steps: int, warmup: int, eval_tokens: int) -> dict:
    rt = dataclasses.replace(tg.setup_runtime(h, {}), grad_accum=1)
    tg.seed_everything(h.seed)
    base = tg.build_model(tg.ModelConfig.from_hparams(h), rt.device)
    plan = tg.plan_from_hparams(base.state_dict(), h, base.fp16_param_names())
    model, eval_model, orthogonalize = tg.compile_for_training(base, plan, h, rt, log_nothing)
    optimizers = tg.build_optimizers(base, h, rt.rank, rt.world_size, rt.ns_dtype, orthogonalize)
    loader = RandomLoader(h.vocab_size, rt.device, h.seed)
    compiles = rt.device.type == "cuda" and h.compile
    first = sum(step_phases(model, optimizers, loader, h, rt))
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
        config={f.name: getattr(h, f.name) for f in dataclasses.fields(h)},
        tokens_per_step=tokens_per_step, steps=steps, warmup=warmup, flops_per_token=flops,
        ms_per_step=1000 * step_s, tokens_per_s=tokens_per_s,
        mfu=None if peak is None else tokens_per_s * flops / peak, mfu_reason=peak_why,
        peak_mem_gib=peak_memory_gib(rt.device), optimizer_share=opt_s / step_s,
        compile_s=first - step_s if compiles else None, eval_tokens_per_s=eval_tps,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def fmt(value) -> str:
    return "null" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median taken)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the first one")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="random tokens evaluated")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines file to append to")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.eval_tokens < 2:
        ap.error("--steps must be >= 1, --warmup >= 0, --eval-tokens >= 2")
    h = tg.Hyperparameters.from_env()
    if h.train_batch_tokens // tg.MICRO_BATCHES_PER_STEP < h.train_seq_len:
        raise ValueError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} gives less than one sequence of "
                         f"TRAIN_SEQ_LEN={h.train_seq_len} per GPU (TRAIN_BATCH_TOKENS / 8 per GPU)")
    result = benchmark(h, args.steps, args.warmup, args.eval_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    for key, value in result.items():
        if key != "config":
            print(f"{key:<18} {fmt(value)}")
    print(f"appended to {args.out}")
    return result


if __name__ == "__main__":
    main()
