"""Reference parity: a public record train_gpt.py and ours, trained side by side on CPU at the same small
size, on the same data, for the same number of steps; prints both scripts' results per seed.

Two record scripts are known (docs/parity.md has both comparisons), recognised from their text:
  * march: records/track_10min_16mb/2026-03-29_Loader_FullGPTQ_XSA11_BigramHash2816/train_gpt.py, against
    our defaults (the seed stack);
  * april: records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py,
    against our PRESET=april.

    # the April comparison's data: short documents, shuffled across sources (why: docs/parity.md), sp1024
    python3 lab/parity_benchmark.py data --corpus ../shared/corpus --out DATA_ROOT
    OMP_NUM_THREADS=1 python3 lab/parity_benchmark.py --reference PATH/TO/record/train_gpt.py \
        --data DATA_ROOT/data --tokenizer DATA_ROOT/tokenizer.model [--seeds 1337,42] [--out bench/parity]

    # ours with other settings (one variant = one name and its environment), two seeds each:
    python3 lab/parity_benchmark.py ... --no-reference --kind april --variant "docmask:DOC_MASKED_ATTENTION=1"

Nothing is fetched: the record script is a file the user points at (from a clone of the challenge
repository). For each seed the reference and ours run AT THE SAME TIME, one thread each, so their per-step
and evaluation times are measured under the same load (a relative number; wallclock on a shared machine is
noisy). Variants run two at a time (the two seeds of one variant together). A run whose log already holds
its final metrics, made with the same command and environment, is reused, so an interrupted benchmark
resumes.

The record script runs with its math untouched through `parity_benchmark.py shim PATH`, which installs
these shims (CUDA-only facilities replaced; every operation of the record's model, optimizer, schedule,
averaging, quantization and evaluation is its own), executes the file's definitions, replaces the two
functions that launch Triton kernels, then calls its main():
  1. flash_attn_interface.flash_attn_func(q, k, v, causal=True) on [B, T, H, D] (GQA: fewer k/v heads):
     torch's scaled_dot_product_attention, causal, with enable_gqa.
  2. flash_attn_interface.flash_attn_varlen_func(q, k, v, cu_seqlens, ..., causal=True) on packed [N, H, D]:
     each document (segment of cu_seqlens) attends causally to itself only; done as one SDPA over the
     documents padded to the longest (padding sits after every real key, so causality hides it).
  3. triton: a stand-in module (jit, language, tools.tensor_descriptor) whose kernels refuse to launch; the
     record's two launchers are replaced by what they compute, in PyTorch (each checked against the
     kernel's own formula in tests/test_parity_benchmark.py):
     softcapped_cross_entropy -> cross entropy of c*tanh(z/c) (the kernel's 2c*sigmoid(2z/c) is the same
     logits shifted by the constant c); FusedLeakyReLUSquareMLP -> F.linear(leaky_relu(x W1^T, 0.5)^2, W2).
  4. torch.compile: returns the model or function unchanged (eager, like our CPU runs).
  5. torch.cuda: is_available() -> True (the script refuses to run without CUDA); set_device,
     synchronize, empty_cache -> no-ops; max_memory_allocated / max_memory_reserved -> 0; Stream,
     stream(), current_stream() -> a stream whose wait_stream does nothing (CPU work is in order).
  6. torch.device: "cuda" (any index) -> "cpu".
  7. torch.autocast(device_type="cuda", ...): disabled, so the forward runs in fp32 like ours on CPU.
  8. bf16 casts: Tensor.bfloat16() returns a float32 tensor and Module.bfloat16() is a no-op, so the
     weights, the embedding tables and Muon's momentum and Newton-Schulz are fp32, like ours on CPU.
  9. torch.backends.cuda.enable_{cudnn,flash,mem_efficient,math}_sdp: no-ops (they pick CUDA kernels;
     the math backend stays available to CPU attention).
 10. pinned memory: torch.empty(..., pin_memory=True) and Tensor.pin_memory() give ordinary CPU memory.
 11. subprocess.run(["nvidia-smi", ...]): empty output (there is no GPU to describe).
The April record's per-group compression calls the lrzip binary (`apt-get install lrzip`); it is lossless,
so it changes the artifact's size only. The shim prints this list at start-up, and its output is the
record script's own log.

Sizes and steps (both scripts, by their own variables): NUM_LAYERS, MODEL_DIM, NUM_HEADS, NUM_KV_HEADS,
MLP_MULT, TRAIN_SEQ_LEN = EVAL_SEQ_LEN, TRAIN_BATCH_TOKENS, ITERATIONS, no wallclock cap, no priming
steps. Each script keeps its own defaults, except the settings counted in steps, scaled from the record's
steps to this run, and the record run's own command-line settings. Layer indices are mapped to the small
depth (March: value embeddings on the last two layers; April: the loop over the middle layers, the lanes in
the last third).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.machinery
import json
import lzma
import math
import os
import random
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RecordFacts:
    """What a record run did at full scale, for scaling its step-counted settings to a short run."""
    steps: int  # steps of the record runs in 600 s on 8 x H100 (their logs)
    ema_decay: float  # per step; the average spans 1 / (1 - decay) steps


RECORDS = {
    "march": RecordFacts(steps=6700, ema_decay=0.997),  # its logs: 6,704 steps on average
    "april": RecordFacts(steps=4931, ema_decay=0.9965),  # its README: 4,945 / 4,932 / 4,917 steps
}
APRIL_VAL_DOCS = 50_000  # the challenge's validation documents; the April record's TTT phases cover 2,500
APRIL_PHASE_PREFIX_DOCS = 2_500
VAL_BATCH_SEQS = 16  # sequences per evaluation forward, both scripts (the April record's eval_val drops a
# last partial batch, so the validation tokens are cut to a multiple of VAL_BATCH_SEQS x TRAIN_SEQ_LEN)


def record_kind(script: Path) -> str:
    """'april' for the 2026-04-27 record (it packs documents and attends within them), 'march' otherwise."""
    return "april" if "flash_attn_varlen_func" in script.read_text(encoding="utf-8") else "march"


# ---- the shim -----------------------------------------------------------------------------------

SHIMS = (
    ("flash_attn_interface.flash_attn_func", "-> scaled_dot_product_attention (causal, GQA)"),
    ("flash_attn_interface.flash_attn_varlen_func", "-> SDPA per document of cu_seqlens (causal, GQA)"),
    ("triton", "stand-in; kernels refuse to launch; softcapped_cross_entropy and FusedLeakyReLUSquareMLP "
               "-> their PyTorch formulas"),
    ("torch.compile", "identity: eager"),
    ("torch.cuda", "is_available -> True; set_device/synchronize/empty_cache no-ops; max_memory_* -> 0; "
                   "streams no-ops"),
    ("torch.device", "cuda -> cpu"),
    ("torch.autocast", "device_type=cuda disabled: fp32"),
    ("bf16 casts", "Tensor.bfloat16 -> float32, Module.bfloat16 no-op: fp32 weights, tables, Muon state"),
    ("torch.backends.cuda.enable_*_sdp", "no-ops"),
    ("pinned memory", "torch.empty(pin_memory=True), Tensor.pin_memory -> ordinary CPU memory"),
    ("subprocess.run(nvidia-smi)", "empty output"),
)


def flash_attn_func(q, k, v, causal: bool = False, **_):
    """FlashAttention 3's call on [B, T, H, D] tensors (k, v may have fewer heads), done by SDPA."""
    import torch.nn.functional as F

    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           window_size=(-1, -1), **_):
    """FlashAttention 3's varlen call on packed [N, H, D] tensors: the segments cu_seqlens[i]..[i+1] are
    independent sequences (repeated ends, the record's padding, are empty segments). Each is attended
    causally on its own: the segments are gathered into rows padded to the longest, SDPA runs on the rows,
    and the real positions, in order, are the packed output."""
    import torch

    if not causal or tuple(window_size or (-1, -1)) != (-1, -1) or not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the shim covers causal self-attention without a window (the record's use)")
    cu = cu_seqlens_q.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    if int(cu[0]) != 0 or int(lengths.sum()) != q.size(0) or int(lengths.max()) > max(max_seqlen_q, 1):
        raise ValueError("cu_seqlens must cover the packed tokens from 0, no segment longer than max_seqlen")
    width = int(lengths.max())
    cols = torch.arange(width, device=q.device)
    real = cols[None, :] < lengths[:, None]  # [segments, width]
    index = torch.where(real, starts[:, None] + cols[None, :], 0)
    y = flash_attn_func(q[index], k[index], v[index], causal=True)  # [segments, width, H, D]
    return y[real]  # the real positions, segment by segment: the packed order


def softcapped_cross_entropy(logits, targets, softcap: float, reduction: str = "mean"):
    """What the record's fused Triton kernel computes: cross entropy of z = 2c*sigmoid(2x/c) = c*tanh(x/c) + c,
    i.e. of the soft-capped logits shifted by the constant c, which cross entropy does not see."""
    import torch
    import torch.nn.functional as F

    z = softcap * torch.tanh(logits.float() / softcap)
    return F.cross_entropy(z, targets, reduction=reduction)


LEAKY_SLOPE = 0.5


def fused_leaky_relu2_mlp(x, w1, w2):
    """What the record's fused Triton MLP computes: (leaky_relu(x W1^T, 0.5))^2 W2^T; its backward kernel is
    this formula's derivative (2 pre for pre > 0, 0.5 pre below), which autograd gives here."""
    import torch.nn.functional as F

    return F.linear(F.leaky_relu(F.linear(x, w1), negative_slope=LEAKY_SLOPE).square(), w2)


# The record's functions that launch Triton kernels, and their replacements (installed after its definitions
# run, before its main()).
KERNEL_SHIMS = {"softcapped_cross_entropy": softcapped_cross_entropy,
                "FusedLeakyReLUSquareMLP": fused_leaky_relu2_mlp}


class _Anything(types.ModuleType):
    """A module whose every missing attribute is a placeholder (tl.constexpr in annotations, tl.bfloat16...)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _Kernel:
    """triton.jit's stand-in: defining a kernel works, launching one fails (every launch must be shimmed)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"Triton kernel {self.fn.__name__} launched on CPU: its caller is not shimmed")


def triton_modules() -> dict[str, types.ModuleType]:
    triton = _Anything("triton")
    triton.jit = lambda fn=None, **_: _Kernel(fn) if fn is not None else _Kernel
    triton.cdiv = lambda a, b: -(-a // b)
    language, tools, descriptor = _Anything("triton.language"), _Anything("triton.tools"), _Anything(
        "triton.tools.tensor_descriptor")
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    for module in (triton, language, tools, descriptor):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    return {m.__name__: m for m in (triton, language, tools, descriptor)}


class _Stream:
    def wait_stream(self, *_):
        return None


def install_shims() -> None:
    """Patch torch and friends in this process so that a CUDA record script runs on the CPU in fp32."""
    import torch

    fa = types.ModuleType("flash_attn_interface")
    fa.flash_attn_func = flash_attn_func
    fa.flash_attn_varlen_func = flash_attn_varlen_func
    sys.modules["flash_attn_interface"] = fa

    def compile_(model=None, **_):
        return model if model is not None else (lambda fn: fn)
    torch.compile = compile_

    torch.cuda.is_available = lambda: True
    for name in ("set_device", "synchronize", "empty_cache"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.Stream = lambda *a, **k: _Stream()
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()

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

    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        return real_empty(*args, **kwargs)
    torch.empty = empty
    torch.Tensor.pin_memory = lambda self, *a, **k: self

    real_run = subprocess.run

    def run(args, *a, **k):
        if isinstance(args, (list, tuple)) and args and args[0] == "nvidia-smi":
            return subprocess.CompletedProcess(args, 0, stdout="" if k.get("text") else b"",
                                               stderr="" if k.get("text") else b"")
        return real_run(args, *a, **k)
    subprocess.run = run


def load_record(script: Path) -> types.ModuleType:
    """The record script as a module (shims installed, its definitions run, its Triton launchers replaced),
    main() not called: what `shim` runs, and what a diagnostic (lab/eval_speed.py) builds models from."""
    install_shims()
    sys.path.insert(0, str(script.parent))
    module = types.ModuleType("__parity_record__")
    module.__file__ = str(script)
    sys.modules[module.__name__] = module  # dataclasses and pickling look a class's module up here
    # The triton stand-in is visible to the script's own imports only: torch imports the real triton where one
    # is installed (torch._dynamo and the inductor's helpers, imported first here, then know there is none).
    import torch._dynamo  # noqa: F401
    import torch._inductor.utils  # noqa: F401
    stand_in = triton_modules()
    sys.modules.update(stand_in)
    try:
        exec(compile(script.read_text(encoding="utf-8"), str(script), "exec"), module.__dict__)
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    module.parity_kernels_replaced = [name for name in KERNEL_SHIMS if name in module.__dict__]
    for name in module.parity_kernels_replaced:
        setattr(module, name, KERNEL_SHIMS[name])
    return module


def run_shimmed(script: Path) -> None:
    """List the shims, load the record (load_record: its own __file__ and argv), then run its main() as its
    `if __name__ == "__main__"` would."""
    for name, what in SHIMS:
        print(f"parity_shim {name}: {what}", flush=True)
    sys.argv = [str(script)]
    module = load_record(script)
    print(f"parity_shim kernels_replaced: {','.join(module.parity_kernels_replaced) or 'none'}", flush=True)
    if not callable(getattr(module, "main", None)):
        raise SystemExit(f"{script}: no main() to run")
    module.main()


# ---- data ---------------------------------------------------------------------------------------
# The April record's loader packs documents in shard order; at a few thousand tokens a step, whole
# FineWeb-sized documents (1,500-4,500 tokens at sp1024 here) put one or two documents in a step. The
# benchmark's documents are therefore short pieces of the corpus documents (paragraphs grouped to
# PIECE_MIN_CHARS..PIECE_MAX_CHARS, about 165 tokens: 0.65 of a 256-token sequence, as a 1,240-token
# FineWeb document is 0.6 of the record's 2,048 at sp1024), shuffled across sources and documents, so that
# both loaders see about 25 unrelated documents per 4,096-token step, as the record's 786,432-token
# steps see hundreds of unrelated documents.

PIECE_MIN_CHARS, PIECE_MAX_CHARS = 200, 800
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TRAIN_FILES = ("fineweb_legal.jsonl.xz", "c4_1000.jsonl.xz", "wiki_AA.jsonl.xz")
VAL_FILE = "fineweb_300.jsonl.xz"
DATA_SEED = 1234


def short_documents(text: str, lo: int = PIECE_MIN_CHARS, hi: int = PIECE_MAX_CHARS) -> list[str]:
    """A document cut into pieces of at most hi characters, mostly at least lo: paragraphs in order, a paragraph
    longer than hi cut at a sentence end (else a space) past lo, consecutive paragraphs grouped until a piece
    reaches lo (or the next would pass hi); a last piece under lo / 2 joins the one before if it fits."""
    paragraphs = []
    for p in (p.strip() for p in text.split("\n")):
        while len(p) > hi:
            ends = [m.end() for m in SENTENCE_END.finditer(p, 0, hi) if m.end() >= lo]
            cut = ends[-1] if ends else p.rfind(" ", lo, hi)
            cut = cut if cut > 0 else hi
            paragraphs.append(p[:cut].strip())
            p = p[cut:].strip()
        if p:
            paragraphs.append(p)
    pieces, current = [], ""
    for p in paragraphs:
        if current and len(current) + 1 + len(p) > hi:
            pieces.append(current)
            current = ""
        current = f"{current}\n{p}" if current else p
        if len(current) >= lo:
            pieces.append(current)
            current = ""
    if current:
        if pieces and len(current) < lo // 2 and len(pieces[-1]) + 1 + len(current) <= hi:
            pieces[-1] += "\n" + current
        else:
            pieces.append(current)
    return pieces


def read_texts(path: Path) -> list[str]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def build_data(corpus: Path, out: Path, vocab: int, train_chars: int) -> None:
    """Short, shuffled documents from the corpus (train: TRAIN_FILES, at most train_chars characters;
    validation: all of VAL_FILE), then data/build_dataset.py: out/data (shards), out/tokenizer.model."""
    rng = random.Random(DATA_SEED)
    train = [p for name in TRAIN_FILES for doc in read_texts(corpus / name) for p in short_documents(doc)]
    val = [p for doc in read_texts(corpus / VAL_FILE) for p in short_documents(doc)]
    rng.shuffle(train)
    rng.shuffle(val)
    kept, chars = [], 0
    for p in train:
        if chars >= train_chars:
            break
        kept.append(p)
        chars += len(p)
    (out / "jsonl").mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "jsonl" / "train_pieces.jsonl", kept)
    write_jsonl(out / "jsonl" / "val_pieces.jsonl", val)
    print(f"pieces: train {len(kept)} ({chars} chars), val {len(val)}", file=sys.stderr)
    subprocess.run([sys.executable, str(ROOT / "data" / "build_dataset.py"),
                    "--input", str(out / "jsonl" / "train_pieces.jsonl"),
                    "--val-input", str(out / "jsonl" / "val_pieces.jsonl"), "--vocab-size", str(vocab),
                    "--output-dir", str(out / "data"), "--tokenizer-prefix", str(out / "tokenizer"),
                    "--tokenizer-train-chars", str(min(train_chars, 20_000_000)), "--shard-tokens", "20000000",
                    "--no-progress"], check=True)


def run_data(data: Path, tokenizer: Path, out: Path, val_tokens: int, seq_len: int) -> tuple[Path, Path]:
    """Folders the two scripts read (links to the training shards, the same validation tokens): ours
    (out/data_ours) and the April record's (out/data_reference, which also holds the byte sidecar that its
    evaluation reads: fineweb_val_bytes_000000.bin, each token's bytes by our ByteLUTs, so both count the
    same bytes). The validation stream is its first 1 + k x VAL_BATCH_SEQS x seq_len tokens, at most
    val_tokens + 1: every target is scored by both (the record drops a last partial batch)."""
    import numpy as np
    import sentencepiece as spm
    import torch

    sys.path.insert(0, str(ROOT))
    from data.shards import write_shard
    from train_gpt import build_byte_luts, find_shards, load_validation_tokens

    tokens = load_validation_tokens(str(data))
    unit = VAL_BATCH_SEQS * seq_len
    keep = 1 + (min(val_tokens, len(tokens) - 1) // unit) * unit
    if keep == 1:
        raise SystemExit(f"{data}: {len(tokens)} validation tokens, fewer than one evaluation batch ({unit} + 1)")
    tokens = tokens[:keep]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    luts = build_byte_luts(sp, sp.vocab_size())
    t = torch.from_numpy(tokens.astype(np.int64))
    sidecar = np.zeros(len(tokens), dtype=np.int64)  # token 0 has no previous token: it is a BOS, 0 bytes
    sidecar[1:] = luts.token_bytes(t[:-1], t[1:]).numpy()
    folders = (out / "data_ours", out / "data_reference")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for f in find_shards(str(data), "train"):
            link = folder / Path(f).name
            if not link.exists():
                link.symlink_to(Path(f).resolve())
        write_shard(folder / "fineweb_val_000000.bin", tokens)
    write_shard(folders[1] / "fineweb_val_bytes_000000.bin", sidecar)
    return folders


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
    val_tokens: int = 0  # April: validation tokens both scripts score (0: all of the data's, cut as run_data)


SIZES = {
    "march": Size(),
    # 6 layers keep the April shape (layers 2-3 loop: the record's 3-5 of 11; lanes from 4: its 8), MLP 4x;
    # 8 sequences a step (about 13 of the benchmark's short documents); 207 validation documents, so that
    # both test-time trainings fit a run of about 15 minutes on a shared CPU.
    "april": Size(layers=6, mlp_mult=4, batch_tokens=2048, steps=200, val_tokens=32_768),
}


def april_layers(layers: int) -> dict[str, int]:
    """The record's layer ids at another depth: the loop over layers 3..5 and the lanes from 8 of 11."""
    return dict(loop_first=round(3 * layers / 11), loop_last=round(5 * layers / 11),
                parallel_start=round(8 * layers / 11))


def scaled(record_value: int, steps: int, kind: str = "march") -> int:
    """A count of steps in a full record run, scaled to a run of `steps`."""
    return max(1, round(record_value * steps / RECORDS[kind].steps))


def ema_decay(steps: int, kind: str = "march") -> float:
    """The EMA decay whose span 1 / (1 - decay) is the same share of a `steps` run as the record's (0 once
    that span is under a step: the raw weights)."""
    r = RECORDS[kind]
    return round(max(0.0, 1 - (1 - r.ema_decay) * r.steps / steps), 4)


def common_env(size: Size, data: Path, tokenizer: Path, seed: int, kind: str = "march",
               ttt_prefix_docs: int = 0) -> dict[str, str]:
    """Variables both scripts read under the same names (ttt_prefix_docs: April, see prefix_docs)."""
    env = dict(
        DATA_PATH=data, TOKENIZER_PATH=tokenizer, SEED=seed,
        NUM_LAYERS=size.layers, MODEL_DIM=size.dim, NUM_HEADS=size.heads, NUM_KV_HEADS=size.kv_heads,
        MLP_MULT=size.mlp_mult, TRAIN_SEQ_LEN=size.seq_len, EVAL_SEQ_LEN=size.seq_len,
        TRAIN_BATCH_TOKENS=size.batch_tokens, ITERATIONS=size.steps, MAX_WALLCLOCK_SECONDS=0,
        # a step line at the last step: the April record's throughput line is its only step time
        WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=math.gcd(size.steps, 50), EVAL_STRIDE=size.eval_stride,
        MUON_MOMENTUM_WARMUP_STEPS=scaled(1500, size.steps, kind), OMP_NUM_THREADS=1,
    )
    if kind == "april":
        env.update(
            VOCAB_SIZE=vocab_size(tokenizer), TTT_EVAL_SEQ_LEN=size.seq_len, EMA_DECAY=ema_decay(size.steps, kind),
            # Its command line's TTT settings, ours' defaults; the LoRA rank the same share of the width (80 of
            # 512); the phases cover the same share of the documents.
            TTT_LORA_RANK=lora_rank(size.dim), TTT_CHUNK_SIZE=48, TTT_BATCH_SIZE=64, TTT_BETA2=0.99,
            TTT_WEIGHT_DECAY=0.5,
            PHASED_TTT_NUM_PHASES=3, PHASED_TTT_PREFIX_DOCS=ttt_prefix_docs,
            # A global SGD step of 32,768 tokens would take a whole small phase in one step (and the record
            # skips each phase's last chunk): 4 sequences a step instead.
            GLOBAL_TTT_CHUNK_TOKENS=4 * size.seq_len,
        )
    return {k: str(v) for k, v in env.items()}


APRIL_WIDTH, APRIL_LORA_RANK, APRIL_LORA_ALPHA = 512, 80, 144.0  # its LoRAs' output is x alpha / rank = 1.8


def lora_rank(dim: int) -> int:
    return max(1, round(APRIL_LORA_RANK * dim / APRIL_WIDTH))


def vocab_size(tokenizer: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()


def prefix_docs(data: Path) -> int:
    """The April record's TTT phases cover 2,500 of the 50,000 validation documents: the same share of the
    documents of `data` (a folder of ours: its validation shards only), at least one per phase."""
    sys.path.insert(0, str(ROOT))
    from train_gpt import load_validation_tokens

    docs = int((load_validation_tokens(str(data)) == 1).sum())
    return max(3, round(docs * APRIL_PHASE_PREFIX_DOCS / APRIL_VAL_DOCS))


def reference_env(size: Size, kind: str = "march") -> dict[str, str]:
    """The record run's command line at this depth, and its step counts scaled."""
    if kind == "march":  # README: BIGRAM_VOCAB_SIZE=2816 BIGRAM_DIM=112 XSA_LAST_N=11 USE_GPTQ=1 TTT_ENABLED=0
        env = dict(
            BIGRAM_VOCAB_SIZE=2816, BIGRAM_DIM=112, XSA_LAST_N=size.layers, USE_GPTQ=1, TTT_ENABLED=0,
            VE_LAYERS=f"{max(0, size.layers - 2)},{size.layers - 1}", WARMDOWN_ITERS=scaled(3500, size.steps),
            VAL_BATCH_SIZE=8 * 16 * size.seq_len,  # the record divides it by 8 micro-batches: 16 sequences
        )
    else:  # README's command (its defaults for the rest); CASEOPS_ENABLED=1 only makes it read the byte
        # sidecar (its evaluation reads the sidecar whatever the setting: without it, it fails)
        ids = april_layers(size.layers)
        env = dict(
            CASEOPS_ENABLED=1, XSA_LAST_N=size.layers, LOOP_START=ids["loop_first"], LOOP_END=ids["loop_last"],
            NUM_LOOPS=2, ENABLE_LOOPING_AT=0.35, PARALLEL_START_LAYER=ids["parallel_start"],
            EMBED_BITS=7, MATRIX_LR=0.026, MIN_LR=0.1, MLP_CLIP_SIGMAS=11.5, ATTN_CLIP_SIGMAS=13.0,
            EMBED_CLIP_SIGMAS=14.0, GRAD_CLIP_NORM=0.3, MUON_BACKEND_STEPS=5, GLOBAL_TTT_MOMENTUM=0.9,
            WARMDOWN_FRAC=0.85, BETA2=0.99, SPARSE_ATTN_GATE_SCALE=0.5, GPTQ_RESERVE_SECONDS=0,
            GPTQ_CALIBRATION_BATCHES=16, GATED_ATTN_QUANT_GATE=1, SPARSE_ATTN_GATE_ENABLED=1, GATE_WINDOW=12,
            SMEAR_GATE_ENABLED=1, LQER_ENABLED=1, LQER_ASYM_ENABLED=1, LQER_RANK=4, LQER_FACTOR_BITS=4,
            LQER_ASYM_GROUP=64, LQER_TOP_K=3, FUSED_CE_ENABLED=1, COMPRESSOR="pergroup", TTT_ENABLED=1,
            VAL_BATCH_TOKENS=8 * VAL_BATCH_SEQS * size.seq_len,  # divided by its 8 micro-batches
            # its LoRA output scale alpha / rank stays the full run's 1.8 at the smaller rank
            TTT_LORA_ALPHA=APRIL_LORA_ALPHA / APRIL_LORA_RANK * lora_rank(size.dim),
        )
    return {k: str(v) for k, v in env.items()}


def ours_env(size: Size, kind: str = "march") -> dict[str, str]:
    """Our defaults (March) or PRESET=april, with the settings counted in steps scaled (the warmdown is a
    fraction already) and the layer ids of the small depth."""
    if kind == "march":
        env = dict(EMA_DECAY=ema_decay(size.steps), SWA_EVERY=scaled(50, size.steps),
                   QAT_SOFT_RAMP_STEPS=scaled(500, size.steps), GPTQ_RESERVE_SECONDS=0,
                   VAL_BATCH_SIZE=16 * size.seq_len, TTT=0)  # the March record ran no TTT either
    else:
        ids = april_layers(size.layers)
        env = dict(PRESET="april", MINI_RECUR_FIRST=ids["loop_first"], MINI_RECUR_LAST=ids["loop_last"],
                   PARALLEL_START_LAYER=ids["parallel_start"], GPTQ_RESERVE_SECONDS=0,
                   VAL_BATCH_SIZE=VAL_BATCH_SEQS * size.seq_len, TTT=1,
                   # the record stores tensors of at most 65,536 values in fp16, ours those under QUANT_MIN_NUMEL:
                   # the same set at full width, but a 128-wide MLP matrix has exactly 65,536
                   QUANT_MIN_NUMEL=65_537,
                   # the record's calibration: 16 batches of TRAIN_BATCH_TOKENS / 8 tokens
                   GPTQ_CALIB_SEQS=max(1, 16 * size.batch_tokens // 8 // size.seq_len))
    return {k: str(v) for k, v in env.items()}


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

METRICS = ("raw", "float", "quant", "sliding", "ttt")
_BPB = r" val_loss:\S+ val_bpb:([0-9.]+)"
_TIMED = _BPB + r".* eval_time:(\d+)ms"
# Per log kind: metric -> (pattern, whether its second group is an evaluation time in ms). A metric missing
# from a kind's table is not computed by that script (the April record has no sliding-window pass).
PATTERNS = {
    "ours": {
        "raw": r"^raw_float_exact" + _BPB, "float": r"^final_float_exact" + _BPB,
        "quant": r"^final_roundtrip_exact" + _TIMED, "sliding": r"^final_sliding_window_exact" + _TIMED,
        "ttt": r"^final_ttt_exact" + _TIMED,
    },
    "march": {
        "raw": r"^step:\d+/\d+" + _BPB, "float": r"^DIAGNOSTIC post_ema" + _BPB,
        # With EVAL_STRIDE >= the sequence the record skips its own-stride pass; it always adds stride 64.
        "quant": r"^final_int6_roundtrip_exact" + _BPB, "sliding": r"^final_int6_sliding_window(?:_s64)?_exact" + _BPB,
    },
    "april": {
        "raw": r"^\d+/\d+ val_loss: \S+ val_bpb: ([0-9.]+)$",
        "float": r"^diagnostic pre-quantization post-ema" + _TIMED, "quant": r"^diagnostic quantized" + _TIMED,
        "ttt": r"^quantized_ttt_phased" + _TIMED,
    },
}
OPTIONAL = {"ours": {"ttt"}}  # ours runs TTT only where the comparison asks for it
# Ours and the March record end training with this line (the step counter, then time spent training).
FINAL_STEP = r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:\S+ train_time:(\d+)ms step_avg:([0-9.]+)ms"
# The April record logs steps and throughput: "300/300 train_loss: 4.1 train_time: 5.0m tok/s: 4096".
APRIL_STEP = r"^(\d+)/\d+ train_loss: \S+ train_time: \S+ tok/s: (\d+)"
APRIL_BATCH = r"^\s+train_batch_tokens: (\d+)"


@dataclass(frozen=True)
class Result:
    raw: float
    float: float | None
    quant: float | None
    sliding: float | None
    steps: int
    step_ms: float
    ttt: float | None = None
    eval_s: dict = field(default_factory=dict)  # metric -> its evaluation's seconds, where the log says


def parse_result(text: str, kind: str, source: str = "<log>") -> Result:
    """The last value of each metric in a log of `kind` ('ours', 'march' or 'april')."""
    values, eval_s = {}, {}
    for metric, pattern in PATTERNS[kind].items():
        found = re.findall(pattern, text, re.M)
        if not found:
            if metric in OPTIONAL.get(kind, ()):
                continue
            raise ValueError(f"{source}: no {metric} result (a line matching {pattern!r}): the run did not finish")
        last = found[-1]
        if isinstance(last, tuple):
            values[metric], eval_s[metric] = float(last[0]), int(last[1]) / 1000
        else:
            values[metric] = float(last)
    if kind == "april":  # steps: the final evaluation's line; time: the last throughput line (all steps so far)
        final = re.findall(r"^(\d+)/\d+ val_loss: ", text, re.M)
        steps, batch = re.findall(APRIL_STEP, text, re.M), re.findall(APRIL_BATCH, text, re.M)
        if not steps or not batch:
            raise ValueError(f"{source}: no step line (N/M train_loss: .. tok/s: ..) or train_batch_tokens")
        step, step_ms = int(final[-1]), 1000.0 * int(batch[-1]) / int(steps[-1][1])
    else:
        steps = re.findall(FINAL_STEP, text, re.M)
        if not steps:
            raise ValueError(f"{source}: no final step line (step:N/M val_loss:.. train_time:..ms step_avg:..ms)")
        step, step_ms = int(steps[-1][0]), float(steps[-1][2])
    return Result(raw=values["raw"], float=values.get("float"), quant=values.get("quant"),
                  sliding=values.get("sliding"), steps=step, step_ms=step_ms, ttt=values.get("ttt"), eval_s=eval_s)


# ---- running ------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    kind: str  # the log's kind: 'ours', 'march' or 'april'
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
                  extra: dict[str, str], kind: str = "march", ttt_prefix_docs: int = 0) -> Job:
    # The April record keeps TTT counters in /tmp/ttt_*_<RUN_ID>: one id per run folder.
    run_id = "reference" if kind == "march" else f"parity_{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}_{seed}"
    env = {**common_env(size, data, tokenizer, seed, kind, ttt_prefix_docs), **reference_env(size, kind), **extra,
           "RUN_ID": run_id}
    return Job(f"reference seed {seed}", kind,
               [sys.executable, str(Path(__file__).resolve()), "shim", str(script.resolve())],
               env, out / f"reference_seed{seed}")


def ours_job(name: str, script: Path, size: Size, data: Path, tokenizer: Path, seed: int, out: Path,
             extra: dict[str, str], kind: str = "march", ttt_prefix_docs: int = 0) -> Job:
    folder = out / f"{name}_seed{seed}"
    env = {**common_env(size, data, tokenizer, seed, kind, ttt_prefix_docs), **ours_env(size, kind), **extra,
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


def mean(values) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_parity(seeds: list[int], ref: dict[int, Result], ours: dict[int, Result]) -> None:
    print("| run | seed | steps | raw val_bpb | float val_bpb (averaged) | after quantization | sliding | TTT | "
          "ms/step (run together) | eval s: plain, sliding, TTT |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def times(rs: list[Result]) -> str:
        return ", ".join(fmt(mean(r.eval_s.get(m) for r in rs), 1) for m in ("quant", "sliding", "ttt"))

    for label, results in (("reference", ref), ("ours", ours)):
        for seed in seeds:
            r = results[seed]
            print(f"| {label} | {seed} | {r.steps} | " + " | ".join(fmt(getattr(r, m)) for m in METRICS) +
                  f" | {r.step_ms:.1f} | {times([r])} |")
        rs = [results[s] for s in seeds]
        print(f"| {label} | mean | | " + " | ".join(fmt(mean(getattr(r, m) for r in rs)) for m in METRICS) +
              f" | {mean(r.step_ms for r in rs):.1f} | {times(rs)} |")
    ratio = mean(ours[s].step_ms for s in seeds) / mean(ref[s].step_ms for s in seeds)
    deltas = []
    for m in METRICS:
        d = mean(None if getattr(ours[s], m) is None or getattr(ref[s], m) is None
                 else getattr(ours[s], m) - getattr(ref[s], m) for s in seeds)
        if d is not None:
            deltas.append(f"{m} {d:+.4f}")
    print(f"\nours - reference (mean val_bpb): {', '.join(deltas)}; ours' step time / reference's: {ratio:.3f}")


def print_variants(seeds: list[int], base: dict[int, Result] | None, variants: dict[str, dict[int, Result]]) -> None:
    """Per variant: the final metric of each seed (TTT where it ran, else sliding), their mean, the float
    mean, the change against ours, ms/step."""
    def final(r: Result) -> float:
        return r.ttt if r.ttt is not None else r.sliding

    print("| variant | " + " | ".join(f"final seed {s}" for s in seeds) + " | mean final | mean float | "
          "delta final vs ours | ms/step |")
    print("|---" * (len(seeds) + 5) + "|")
    for name, results in variants.items():
        rs = [results[s] for s in seeds]
        d = mean(final(r) for r in rs) - mean(final(base[s]) for s in seeds) if base else None
        print(f"| {name} | " + " | ".join(fmt(final(r)) for r in rs) +
              f" | {fmt(mean(final(r) for r in rs))} | {fmt(mean(r.float for r in rs))} | "
              f"{'-' if d is None else f'{d:+.4f}'} | {mean(r.step_ms for r in rs):.1f} |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shim"]:
        if len(argv) != 2:
            sys.exit("usage: parity_benchmark.py shim PATH/TO/train_gpt.py")
        run_shimmed(Path(argv[1]).resolve())
        return
    if argv[:1] == ["data"]:
        p = argparse.ArgumentParser(prog="parity_benchmark.py data", description=build_data.__doc__)
        p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--vocab-size", type=int, default=1024)
        p.add_argument("--train-chars", type=int, default=30_000_000)
        a = p.parse_args(argv[1:])
        build_data(a.corpus, a.out, a.vocab_size, a.train_chars)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, help="a public record train_gpt.py (needed unless --no-reference)")
    p.add_argument("--no-reference", action="store_true", help="run only ours (and the variants)")
    p.add_argument("--kind", choices=tuple(RECORDS), help="which comparison (default: the reference's, else march)")
    p.add_argument("--ours", type=Path, default=ROOT / "train_gpt.py", help="our script (default: this checkout's)")
    p.add_argument("--data", type=Path, required=True, help="folder of fineweb_train_*.bin / fineweb_val_*.bin")
    p.add_argument("--tokenizer", type=Path, required=True, help="sentencepiece model of the data")
    p.add_argument("--seeds", default="1337,42")
    for name in Size().__dict__:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="(default: the kind's, see SIZES)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "parity")
    p.add_argument("--ours-env", default="", help="KEY=VALUE,... on top of ours' settings")
    p.add_argument("--reference-env", default="", help="KEY=VALUE,... on top of the reference's settings")
    p.add_argument("--variant", action="append", default=[], help="name:KEY=VALUE,... ours with these settings")
    args = p.parse_args(argv)
    if not args.no_reference and (args.reference is None or not args.reference.is_file()):
        p.error("--reference must name a record train_gpt.py (or pass --no-reference)")
    kind = args.kind or (record_kind(args.reference) if not args.no_reference else "march")
    seeds = [int(s) for s in args.seeds.split(",")]
    size = replace(SIZES[kind], **{f.name: getattr(args, f.name) for f in fields(Size)
                                   if getattr(args, f.name) is not None})
    # absolute: each run's working directory is its own folder, and the April data folders are made under --out
    data, tok, args.out = args.data.resolve(), args.tokenizer.resolve(), args.out.resolve()
    ref_data, ttt_prefix = data, 0
    if kind == "april":
        data, ref_data = run_data(data, tok, args.out, size.val_tokens or 2**62, size.seq_len)
        ttt_prefix = prefix_docs(data)
    ours_extra, ref_extra = parse_assignments(args.ours_env), parse_assignments(args.reference_env)
    variants = dict(parse_variant(v) for v in args.variant)
    print(f"kind: {kind}; size: {size}; shared: {common_env(size, data, tok, seeds[0], kind, ttt_prefix)}",
          file=sys.stderr)
    print(f"reference settings: {reference_env(size, kind)} {ref_extra}", file=sys.stderr)
    print(f"ours settings: {ours_env(size, kind)} {ours_extra}", file=sys.stderr)

    def ours_run(name: str, seed: int, extra: dict[str, str]) -> Job:
        return ours_job(name, args.ours, size, data, tok, seed, args.out, extra, kind, ttt_prefix)

    ours, ref = {}, {}
    if args.no_reference:  # the seeds of ours run together instead
        results = run_together([ours_run("ours", s, ours_extra) for s in seeds])
        ours = {s: results[f"ours seed {s}"] for s in seeds}
    for seed in [] if args.no_reference else seeds:  # each seed: the reference and ours together
        results = run_together([reference_job(args.reference, size, ref_data, tok, seed, args.out, ref_extra, kind,
                                              ttt_prefix),
                                ours_run("ours", seed, ours_extra)])
        ref[seed], ours[seed] = results[f"reference seed {seed}"], results[f"ours seed {seed}"]
    variant_results = {}
    for name, env in variants.items():
        results = run_together([ours_run(name, s, {**ours_extra, **env}) for s in seeds])
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
