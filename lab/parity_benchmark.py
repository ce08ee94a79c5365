"""Reference parity: a public record train_gpt.py and ours, trained side by side on CPU at the same small
size, on the same data, for the same number of steps; prints both scripts' results per seed.

    OMP_NUM_THREADS=1 python3 lab/parity_benchmark.py --reference PATH/TO/record/train_gpt.py \
        --data DATA_DIR --tokenizer TOKENIZER.model [--seeds 1337,42] [--steps 300] [--out bench/parity]

    # ours with other settings (one variant = one name and its environment), two seeds each:
    python3 lab/parity_benchmark.py ... --no-reference --variant "relu2:MLP_ACTIVATION=relu2"

Nothing is fetched: the record script is a file the user points at (for example from a clone of the
challenge repository: records/track_10min_16mb/2026-03-29_Loader_FullGPTQ_XSA11_BigramHash2816/).
For each seed the reference and ours run AT THE SAME TIME, one thread each, so their per-step times
are measured under the same load (a relative number; wallclock on a shared machine is noisy). Variants
run two at a time (the two seeds of one variant together). A run whose log already holds its final
metrics, made with the same command and environment, is reused, so an interrupted benchmark resumes.

The record script runs unmodified through `parity_benchmark.py shim PATH`, which installs these shims
(CUDA-only facilities replaced; every operation of the record's model, optimizer, schedule, averaging
and quantization is its own) and then runs the file as __main__:
  1. flash_attn_interface: a stand-in module whose flash_attn_func(q, k, v, causal=True) on [B, T, H, D]
     (GQA: fewer k/v heads) is torch's scaled_dot_product_attention, causal, with enable_gqa.
  2. torch.compile: returns the model or function unchanged (eager, like our CPU runs).
  3. torch.cuda: is_available() -> True (the script refuses to run without CUDA); set_device,
     synchronize, empty_cache -> no-ops; max_memory_allocated / max_memory_reserved -> 0.
  4. torch.device: "cuda" (any index) -> "cpu".
  5. torch.autocast(device_type="cuda", ...): disabled, so the forward runs in fp32 like ours on CPU.
  6. bf16 casts: Tensor.bfloat16() returns a float32 tensor and Module.bfloat16() is a no-op, so the
     weights, the embedding tables and Muon's momentum and Newton-Schulz are fp32, like ours on CPU.
  7. torch.backends.cuda.enable_{cudnn,flash,mem_efficient,math}_sdp: no-ops (they pick CUDA kernels;
     the math backend stays available to CPU attention).
  8. subprocess.run(["nvidia-smi", ...]): empty output (there is no GPU to describe).
The shim prints this list at start-up, and its output is the record script's own log.

Sizes and steps (both scripts, by their own variables): NUM_LAYERS, MODEL_DIM, NUM_HEADS, NUM_KV_HEADS,
MLP_MULT, TRAIN_SEQ_LEN = EVAL_SEQ_LEN, TRAIN_BATCH_TOKENS, ITERATIONS, no wallclock cap, no priming
steps. Each script keeps its own defaults, except the settings counted in steps, scaled from the
record's ~6,700 steps to this run (RECORD_STEPS), and the record run's own command-line settings
(BigramHash 2816 x 112, XSA on every layer, GPTQ on, no TTT). Layer indices are mapped to the small
depth (value embeddings on the last two layers, as 9,10 of 11). The record's EMA decay (0.997) is a
constant in its code, not a setting, so it cannot be scaled: its average keeps 0.997^steps of the
initial weights (41% at 300 steps); the table therefore also shows each script's raw weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_STEPS = 6700  # steps of the record runs in 600 s on 8 x H100 (their logs: 6,704 on average)
RECORD_EMA_DECAY = 0.997  # per step: the average spans 1 / (1 - 0.997) = 333 steps, 5% of the run
SHIMS = (
    ("flash_attn_interface", "flash_attn_func(q, k, v, causal=True) -> scaled_dot_product_attention (causal, GQA)"),
    ("torch.compile", "identity: eager"),
    ("torch.cuda", "is_available -> True; set_device/synchronize/empty_cache no-ops; max_memory_* -> 0"),
    ("torch.device", "cuda -> cpu"),
    ("torch.autocast", "device_type=cuda disabled: fp32"),
    ("bf16 casts", "Tensor.bfloat16 -> float32, Module.bfloat16 no-op: fp32 weights, tables, Muon state"),
    ("torch.backends.cuda.enable_*_sdp", "no-ops"),
    ("subprocess.run(nvidia-smi)", "empty output"),
)

# ---- the shim -----------------------------------------------------------------------------------


def flash_attn_func(q, k, v, causal: bool = False, **_):
    """FlashAttention 3's call on [B, T, H, D] tensors (k, v may have fewer heads), done by SDPA."""
    import torch.nn.functional as F

    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def install_shims() -> None:
    """Patch torch and friends in this process so that a CUDA record script runs on the CPU in fp32."""
    import torch

    fa = types.ModuleType("flash_attn_interface")
    fa.flash_attn_func = flash_attn_func
    sys.modules["flash_attn_interface"] = fa

    def compile_(model=None, **_):
        return model if model is not None else (lambda fn: fn)
    torch.compile = compile_

    torch.cuda.is_available = lambda: True
    for name in ("set_device", "synchronize", "empty_cache"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)

    real_device = torch.device

    class DeviceType(type):  # isinstance(x, torch.device) keeps working on real device objects
        def __instancecheck__(cls, obj):
            return isinstance(obj, real_device)

        def __subclasscheck__(cls, sub):
            return issubclass(sub, real_device)

    class CpuDevice(metaclass=DeviceType):
        def __new__(cls, *args, **kwargs):
            d = real_device(*args, **kwargs)
            return real_device("cpu") if d.type == "cuda" else d
    torch.device = CpuDevice

    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "cuda" else real_autocast(device_type, *args, **kwargs)
    torch.autocast = autocast

    torch.Tensor.bfloat16 = lambda self, *a, **k: self.float()
    torch.nn.Module.bfloat16 = lambda self: self

    for name in ("enable_cudnn_sdp", "enable_flash_sdp", "enable_mem_efficient_sdp", "enable_math_sdp"):
        setattr(torch.backends.cuda, name, lambda *a, **k: None)

    real_run = subprocess.run

    def run(args, *a, **k):
        if isinstance(args, (list, tuple)) and args and args[0] == "nvidia-smi":
            return subprocess.CompletedProcess(args, 0, stdout="" if k.get("text") else b"",
                                               stderr="" if k.get("text") else b"")
        return real_run(args, *a, **k)
    subprocess.run = run


def run_shimmed(script: Path) -> None:
    """Install the shims, list them, run the script as __main__ (its own argv and __file__)."""
    install_shims()
    for name, what in SHIMS:
        print(f"parity_shim {name}: {what}", flush=True)
    sys.argv = [str(script)]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


# ---- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    layers: int = 4
    dim: int = 128
    heads: int = 4
    kv_heads: int = 2
    mlp_mult: int = 3
    seq_len: int = 256
    batch_tokens: int = 4096
    steps: int = 300
    eval_stride: int = 64


def scaled(record_value: int, steps: int) -> int:
    """A count of steps in a ~RECORD_STEPS-step record run, scaled to a run of `steps`."""
    return max(1, round(record_value * steps / RECORD_STEPS))


def ema_decay(steps: int) -> float:
    """The EMA decay whose span 1 / (1 - decay) is the same share of a `steps` run as the record's (0 once
    that span is under a step: the raw weights)."""
    return round(max(0.0, 1 - (1 - RECORD_EMA_DECAY) * RECORD_STEPS / steps), 4)


def common_env(size: Size, data: Path, tokenizer: Path, seed: int) -> dict[str, str]:
    """Variables both scripts read under the same names."""
    return {k: str(v) for k, v in dict(
        DATA_PATH=data, TOKENIZER_PATH=tokenizer, SEED=seed,
        NUM_LAYERS=size.layers, MODEL_DIM=size.dim, NUM_HEADS=size.heads, NUM_KV_HEADS=size.kv_heads,
        MLP_MULT=size.mlp_mult, TRAIN_SEQ_LEN=size.seq_len, EVAL_SEQ_LEN=size.seq_len,
        TRAIN_BATCH_TOKENS=size.batch_tokens, ITERATIONS=size.steps, MAX_WALLCLOCK_SECONDS=0,
        WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=50, EVAL_STRIDE=size.eval_stride,
        MUON_MOMENTUM_WARMUP_STEPS=scaled(1500, size.steps), OMP_NUM_THREADS=1,
    ).items()}


def reference_env(size: Size) -> dict[str, str]:
    """The 2026-03-29 record's command line (README: BIGRAM_VOCAB_SIZE=2816 BIGRAM_DIM=112
    XSA_LAST_N=11 USE_GPTQ=1 TTT_ENABLED=0) at this depth, and its step counts scaled."""
    return {k: str(v) for k, v in dict(
        BIGRAM_VOCAB_SIZE=2816, BIGRAM_DIM=112, XSA_LAST_N=size.layers, USE_GPTQ=1, TTT_ENABLED=0,
        VE_LAYERS=f"{max(0, size.layers - 2)},{size.layers - 1}", WARMDOWN_ITERS=scaled(3500, size.steps),
        VAL_BATCH_SIZE=8 * 16 * size.seq_len,  # the record divides it by 8 micro-batches: 16 sequences
    ).items()}


def ours_env(size: Size) -> dict[str, str]:
    """Our defaults with the settings counted in steps scaled (the warmdown is a fraction already)."""
    return {k: str(v) for k, v in dict(
        EMA_DECAY=ema_decay(size.steps), SWA_EVERY=scaled(50, size.steps),
        QAT_SOFT_RAMP_STEPS=scaled(500, size.steps), GPTQ_RESERVE_SECONDS=0, VAL_BATCH_SIZE=16 * size.seq_len,
    ).items()}


def parse_assignments(text: str) -> dict[str, str]:
    """'A=1,B=x' -> {'A': '1', 'B': 'x'} (a value may be empty: 'VE_LAYERS=')."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            raise ValueError(f"{item!r} is not KEY=VALUE with an upper-case KEY")
        out[key] = value
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name:KEY=V,KEY=V' -> (name, env)."""
    name, sep, assignments = text.partition(":")
    if not sep or not re.fullmatch(r"[\w.+-]+", name):
        raise ValueError(f"--variant {text!r}: expected name:KEY=VALUE,KEY=VALUE")
    return name, parse_assignments(assignments)


# ---- results ------------------------------------------------------------------------------------

METRICS = ("raw", "float", "quant", "sliding")
_BPB = r" val_loss:\S+ val_bpb:([0-9.]+)"
PATTERNS = {
    "ours": {
        "raw": r"^raw_float_exact" + _BPB, "float": r"^final_float_exact" + _BPB,
        "quant": r"^final_roundtrip_exact" + _BPB, "sliding": r"^final_sliding_window_exact" + _BPB,
    },
    "reference": {
        "raw": r"^step:\d+/\d+" + _BPB, "float": r"^DIAGNOSTIC post_ema" + _BPB,
        # With EVAL_STRIDE >= the sequence the record skips its own-stride pass; it always adds stride 64.
        "quant": r"^final_int6_roundtrip_exact" + _BPB, "sliding": r"^final_int6_sliding_window(?:_s64)?_exact" + _BPB,
    },
}
# Both scripts end training with this line (the step counter, then time spent training).
FINAL_STEP = r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:\S+ train_time:(\d+)ms step_avg:([0-9.]+)ms"


@dataclass(frozen=True)
class Result:
    raw: float
    float: float
    quant: float
    sliding: float
    steps: int
    step_ms: float


def parse_result(text: str, kind: str, source: str = "<log>") -> Result:
    """The last value of each metric in a log of `kind` ('ours' or 'reference')."""
    values = {}
    for metric, pattern in PATTERNS[kind].items():
        found = re.findall(pattern, text, re.M)
        if not found:
            raise ValueError(f"{source}: no {metric} result (a line matching {pattern!r}): the run did not finish")
        values[metric] = float(found[-1])
    steps = re.findall(FINAL_STEP, text, re.M)
    if not steps:
        raise ValueError(f"{source}: no final step line (step:N/M val_loss:.. train_time:..ms step_avg:..ms)")
    return Result(**values, steps=int(steps[-1][0]), step_ms=float(steps[-1][2]))


# ---- running ------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    kind: str  # 'ours' or 'reference'
    cmd: list[str]
    env: dict[str, str]  # on top of the inherited environment
    folder: Path  # working directory; output.txt and job.json go here

    @property
    def output(self) -> Path:
        return self.folder / "output.txt"

    def signature(self) -> str:
        return json.dumps({"cmd": self.cmd, "env": self.env}, sort_keys=True)

    def done(self) -> Result | None:
        stamp = self.folder / "job.json"
        if not (stamp.exists() and self.output.exists() and stamp.read_text() == self.signature()):
            return None
        try:
            return parse_result(self.output.read_text(), self.kind, str(self.output))
        except ValueError:
            return None


def reference_job(script: Path, size: Size, data: Path, tokenizer: Path, seed: int, out: Path,
                  extra: dict[str, str]) -> Job:
    env = {**common_env(size, data, tokenizer, seed), **reference_env(size), **extra, "RUN_ID": "reference"}
    return Job(f"reference seed {seed}", "reference",
               [sys.executable, str(Path(__file__).resolve()), "shim", str(script.resolve())],
               env, out / f"reference_seed{seed}")


def ours_job(name: str, script: Path, size: Size, data: Path, tokenizer: Path, seed: int, out: Path,
             extra: dict[str, str]) -> Job:
    folder = out / f"{name}_seed{seed}"
    env = {**common_env(size, data, tokenizer, seed), **ours_env(size), **extra,
           "RUN_ID": "ours", "OUT_DIR": str(folder.resolve())}
    return Job(f"{name} seed {seed}", "ours", [sys.executable, str(script.resolve())], env, folder)


def run_together(jobs: list[Job]) -> dict[str, Result]:
    """Start every job that has no finished log, wait for all; results by job name."""
    procs = []
    for job in jobs:
        if job.done() is not None:
            print(f"reuse {job.name}: {job.output}", file=sys.stderr, flush=True)
            continue
        job.folder.mkdir(parents=True, exist_ok=True)
        (job.folder / "job.json").unlink(missing_ok=True)
        env = {**os.environ, **job.env}
        with job.output.open("w") as f:
            procs.append((job, subprocess.Popen(job.cmd, env=env, cwd=job.folder, stdout=f,
                                                stderr=subprocess.STDOUT)))
        print(f"start {job.name}", file=sys.stderr, flush=True)
    for job, proc in procs:
        if proc.wait() != 0:
            tail = job.output.read_text()[-3000:]
            raise RuntimeError(f"{job.name} failed (exit {proc.returncode}); its output, {job.output}, ends:\n{tail}")
        (job.folder / "job.json").write_text(job.signature())
    return {job.name: job.done() or parse_result(job.output.read_text(), job.kind, str(job.output)) for job in jobs}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def print_parity(seeds: list[int], ref: dict[int, Result], ours: dict[int, Result]) -> None:
    print("| run | seed | steps | raw float val_bpb | float val_bpb (averaged) | after quantization | sliding | "
          "ms/step (run together) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, results in (("reference", ref), ("ours", ours)):
        for seed in seeds:
            r = results[seed]
            print(f"| {label} | {seed} | {r.steps} | {r.raw:.4f} | {r.float:.4f} | {r.quant:.4f} | "
                  f"{r.sliding:.4f} | {r.step_ms:.1f} |")
        rs = [results[s] for s in seeds]
        print(f"| {label} | mean | | {mean(r.raw for r in rs):.4f} | {mean(r.float for r in rs):.4f} | "
              f"{mean(r.quant for r in rs):.4f} | {mean(r.sliding for r in rs):.4f} | "
              f"{mean(r.step_ms for r in rs):.1f} |")
    ratio = mean(ours[s].step_ms for s in seeds) / mean(ref[s].step_ms for s in seeds)
    deltas = ", ".join(f"{m} {mean(getattr(ours[s], m) - getattr(ref[s], m) for s in seeds):+.4f}" for m in METRICS)
    print(f"\nours - reference (mean val_bpb): {deltas}; ours' step time / reference's: {ratio:.3f}")


def print_variants(seeds: list[int], base: dict[int, Result] | None, variants: dict[str, dict[int, Result]]) -> None:
    print("| variant | " + " | ".join(f"sliding seed {s}" for s in seeds) + " | mean sliding | mean float | "
          "delta sliding vs ours | ms/step |")
    print("|---" * (len(seeds) + 5) + "|")
    for name, results in variants.items():
        rs = [results[s] for s in seeds]
        d = mean(r.sliding for r in rs) - mean(base[s].sliding for s in seeds) if base else float("nan")
        print(f"| {name} | " + " | ".join(f"{r.sliding:.4f}" for r in rs) +
              f" | {mean(r.sliding for r in rs):.4f} | {mean(r.float for r in rs):.4f} | {d:+.4f} | "
              f"{mean(r.step_ms for r in rs):.1f} |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shim"]:
        if len(argv) != 2:
            sys.exit("usage: parity_benchmark.py shim PATH/TO/train_gpt.py")
        run_shimmed(Path(argv[1]).resolve())
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, help="a public record train_gpt.py (needed unless --no-reference)")
    p.add_argument("--no-reference", action="store_true", help="run only ours (and the variants)")
    p.add_argument("--ours", type=Path, default=ROOT / "train_gpt.py", help="our script (default: this checkout's)")
    p.add_argument("--data", type=Path, required=True, help="folder of fineweb_train_*.bin / fineweb_val_*.bin")
    p.add_argument("--tokenizer", type=Path, required=True, help="sentencepiece model of the data")
    p.add_argument("--seeds", default="1337,42")
    for name, default in Size().__dict__.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"(default {default})")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "parity")
    p.add_argument("--ours-env", default="", help="KEY=VALUE,... on top of ours' settings")
    p.add_argument("--reference-env", default="", help="KEY=VALUE,... on top of the reference's settings")
    p.add_argument("--variant", action="append", default=[], help="name:KEY=VALUE,... ours with these settings")
    args = p.parse_args(argv)
    if not args.no_reference and (args.reference is None or not args.reference.is_file()):
        p.error("--reference must name a record train_gpt.py (or pass --no-reference)")
    seeds = [int(s) for s in args.seeds.split(",")]
    size = Size(**{name: getattr(args, name) for name in Size().__dict__})
    data, tok = args.data.resolve(), args.tokenizer.resolve()
    ours_extra, ref_extra = parse_assignments(args.ours_env), parse_assignments(args.reference_env)
    variants = dict(parse_variant(v) for v in args.variant)
    print(f"size: {size}; shared: {common_env(size, data, tok, seeds[0])}", file=sys.stderr)
    print(f"reference settings: {reference_env(size)} {ref_extra}", file=sys.stderr)
    print(f"ours settings: {ours_env(size)} {ours_extra}", file=sys.stderr)

    ours, ref = {}, {}
    if args.no_reference:  # the seeds of ours run together instead
        results = run_together([ours_job("ours", args.ours, size, data, tok, s, args.out, ours_extra) for s in seeds])
        ours = {s: results[f"ours seed {s}"] for s in seeds}
    for seed in [] if args.no_reference else seeds:  # each seed: the reference and ours together
        results = run_together([reference_job(args.reference, size, data, tok, seed, args.out, ref_extra),
                                ours_job("ours", args.ours, size, data, tok, seed, args.out, ours_extra)])
        ref[seed], ours[seed] = results[f"reference seed {seed}"], results[f"ours seed {seed}"]
    variant_results = {}
    for name, env in variants.items():
        jobs = [ours_job(name, args.ours, size, data, tok, s, args.out, {**ours_extra, **env}) for s in seeds]
        results = run_together(jobs)
        variant_results[name] = {s: results[f"{name} seed {s}"] for s in seeds}
    if ref:
        print_parity(seeds, ref, ours)
    else:
        print_variants(seeds, None, {"ours": ours})
    if variant_results:
        print()
        print_variants(seeds, ours, variant_results)


if __name__ == "__main__":
    main()
