"""Parameter Golf: train a small GPT on FineWeb in 600 s and ship it in under 16,000,000 bytes.

Record run (8 x H100):   torchrun --standalone --nproc_per_node=8 train_gpt.py
One GPU or CPU:          python train_gpt.py        (same global batch, more gradient accumulation)

Every setting is an environment variable named after a Hyperparameters field in upper case
(NUM_LAYERS=11, SEED=42, ...). Importing this file does nothing: no process group, no CUDA, no file
reads. Sections: hyperparameters, data, tokenizer/bpb, model, optimizer, quantization and
serialization, evaluation, training, main.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import io
import math
import os
import platform
import random
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

# ----------------------------------------------------------------------------------------------------
# Hyperparameters
# ----------------------------------------------------------------------------------------------------

ARTIFACT_CAP_BYTES = 16_000_000  # decimal cap on code bytes + compressed model bytes
# The global batch is always cut into this many micro-batches, spread over the ranks, so that a step
# computes the same thing on 1, 2, 4 or 8 processes (each process accumulates 8 / world_size of them).
MICRO_BATCHES_PER_STEP = 8


def _hp(default, *, lo=None, hi=None, choices=None):
    """A hyperparameter field: its default and the values it accepts."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices})


@dataclass(frozen=True)
class Hyperparameters:
    # Data and run identity.
    data_path: str = _hp("./data/datasets/fineweb10B_sp1024")
    tokenizer_path: str = _hp("./data/tokenizers/fineweb_1024_bpe.model")
    run_id: str = _hp("")  # empty: a fresh id, shared by all ranks
    out_dir: str = _hp("logs")  # the log <RUN_ID>.txt and the artifact <RUN_ID>.ptz go here
    seed: int = _hp(1337, lo=0, hi=2**31 - 1)
    # Model.
    vocab_size: int = _hp(1024, lo=2, hi=65536)  # shards store uint16 tokens
    num_layers: int = _hp(11, lo=1, hi=64)
    model_dim: int = _hp(512, lo=8, hi=8192)
    num_heads: int = _hp(8, lo=1, hi=128)
    num_kv_heads: int = _hp(4, lo=1, hi=128)
    mlp_mult: int = _hp(3, lo=1, hi=16)
    rope_base: float = _hp(10000.0, lo=1.0, hi=1e9)
    logit_softcap: float = _hp(30.0, lo=1.0, hi=1e4)
    qk_gain_init: float = _hp(1.5, lo=0.0, hi=100.0)
    tied_embed_init_std: float = _hp(0.005, lo=0.0, hi=1.0)
    # Training length and batch.
    train_seq_len: int = _hp(2048, lo=2, hi=65536)
    train_batch_tokens: int = _hp(786_432, lo=16, hi=2**31 - 1)
    iterations: int = _hp(20_000, lo=0, hi=10**9)
    max_wallclock_seconds: float = _hp(600.0, lo=0.0, hi=1e7)  # 0: no cap, ITERATIONS decides
    warmup_steps: int = _hp(20, lo=0, hi=10**6)  # compile/kernel priming steps, then weights reset
    warmdown_frac: float = _hp(0.5, lo=0.0, hi=1.0)  # last fraction of the budget: LR falls to 0
    # Optimizer.
    matrix_lr: float = _hp(0.025, lo=0.0, hi=10.0)
    scalar_lr: float = _hp(0.025, lo=0.0, hi=10.0)
    tied_embed_lr: float = _hp(0.035, lo=0.0, hi=10.0)
    muon_momentum: float = _hp(0.99, lo=0.0, hi=0.9999)
    muon_backend_steps: int = _hp(5, lo=1, hi=20)
    beta1: float = _hp(0.9, lo=0.0, hi=0.9999)
    beta2: float = _hp(0.95, lo=0.0, hi=0.99999)
    adam_eps: float = _hp(1e-8, lo=1e-12, hi=1e-2)
    grad_clip_norm: float = _hp(0.3, lo=0.0, hi=1e6)  # 0: no clipping
    # Evaluation and logging.
    val_batch_size: int = _hp(65_536, lo=1, hi=2**31 - 1)  # tokens per eval forward on each rank
    val_loss_every: int = _hp(1000, lo=0, hi=10**9)  # 0: only at the end
    train_log_every: int = _hp(200, lo=0, hi=10**9)  # 0: no step lines
    eval_seq_len: int = _hp(2048, lo=2, hi=65536)
    eval_stride: int = _hp(64, lo=1, hi=65536)
    # Runtime.
    compile: bool = _hp(True)  # torch.compile on CUDA; CPU runs never compile

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            key = f.name.upper()
            if key in env:
                values[f.name] = _parse_env_value(key, env[key], f.default, f.metadata)
        hp = cls(**values)
        hp.check()
        return hp

    def check(self) -> None:
        """Cross-field rules; each error names the variables involved."""
        if self.model_dim % self.num_heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"MODEL_DIM/NUM_HEADS={self.model_dim // self.num_heads} must be even (rotary)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        seqs = self.train_batch_tokens // self.train_seq_len
        if self.train_batch_tokens % self.train_seq_len or seqs % MICRO_BATCHES_PER_STEP:
            raise ValueError(
                f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be TRAIN_SEQ_LEN={self.train_seq_len} "
                f"times a multiple of {MICRO_BATCHES_PER_STEP} sequences")
        if self.eval_stride > self.eval_seq_len:
            raise ValueError(f"EVAL_STRIDE={self.eval_stride} must be at most EVAL_SEQ_LEN={self.eval_seq_len}")


def _parse_env_value(key: str, raw: str, default, meta: dict):
    kind = type(default)
    try:
        if kind is bool:
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            value = raw.strip().lower() in ("1", "true")
        else:
            value = kind(raw)
    except ValueError:
        accepted = "0, 1, true or false" if kind is bool else f"a {kind.__name__}"
        raise ValueError(f"{key}={raw!r} is invalid: expected {accepted}") from None
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if kind in (int, float) and not (lo <= value <= hi) or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{key}={raw!r} is out of range: accepted values are {kind.__name__}s in [{lo}, {hi}]")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}={raw!r} is invalid: accepted values are {', '.join(map(str, choices))}")
    return value


def grad_accum_steps(world_size: int) -> int:
    if world_size < 1 or MICRO_BATCHES_PER_STEP % world_size:
        raise ValueError(f"WORLD_SIZE={world_size} must divide {MICRO_BATCHES_PER_STEP} (1, 2, 4 or 8 processes)")
    return MICRO_BATCHES_PER_STEP // world_size


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
FETCH_HINT = ("fetch the challenge data with `python data/cached_challenge_fineweb.py --variant sp1024 "
              "--train-shards 80`, or build a dataset with `python data/build_dataset.py --help`")


def load_data_shard(path: str | Path) -> np.ndarray:
    """Tokens of one shard as uint16, after checking its header and size against each other."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {magic}, expected {SHARD_MAGIC}: not a challenge shard")
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ValueError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_BYTES)


def find_shards(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {split} shards match {pattern}: {FETCH_HINT}")
    return files


def load_validation_tokens(data_path: str) -> np.ndarray:
    return np.concatenate([load_data_shard(f) for f in find_shards(data_path, "val")])


class TokenStream:
    """Reads shards in order, wrapping around, and hands out contiguous runs of tokens."""

    def __init__(self, files: list[str]):
        self.files = files
        self.file_index = 0
        self.tokens = load_data_shard(files[0])
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file_index = (self.file_index + 1) % len(self.files)
                self.tokens = load_data_shard(self.files[self.file_index])
                self.pos = 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            n -= k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Every rank reads the same stream; each step's global batch of sequences is cut in rank order.

    Sequence i of a step is chunk[i*L : i*L + L + 1]; rank r owns sequences [r*S/W, (r+1)*S/W), so
    the union over ranks is the same global batch whatever the world size W.
    """

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device):
        self.stream = TokenStream(files)
        self.rank, self.world_size, self.device = rank, world_size, device

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        seqs_per_rank = global_tokens // seq_len // self.world_size
        chunk = self.stream.take(global_tokens + 1)
        start = self.rank * seqs_per_rank * seq_len
        local = torch.from_numpy(chunk[start:start + seqs_per_rank * seq_len + 1].astype(np.int64))
        x = local[:-1].view(seqs_per_rank, seq_len)
        y = local[1:].view(seqs_per_rank, seq_len)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


# ----------------------------------------------------------------------------------------------------
# Tokenizer and bits per byte
# ----------------------------------------------------------------------------------------------------

SPACE_MARK = "\u2581"  # sentencepiece's visible space


@dataclass
class ByteLUTs:
    """Per-token-id tables for the bpb denominator (SPEC section 2)."""
    base_bytes: Tensor  # int32 [V]: UTF-8 bytes of the piece without its leading space mark
    has_leading_space: Tensor  # bool [V]: piece starts with the space mark
    is_boundary: Tensor  # bool [V]: control/unknown/unused ids: 0 bytes, and no space after them

    def to(self, device) -> "ByteLUTs":
        return ByteLUTs(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))

    def token_bytes(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        space = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids] + space.to(torch.int32)


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteLUTs:
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}: raise VOCAB_SIZE")
    base = np.zeros(vocab_size, dtype=np.int32)
    space = np.zeros(vocab_size, dtype=np.bool_)
    boundary = np.ones(vocab_size, dtype=np.bool_)  # ids past the tokenizer's vocab never occur
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            space[i] = True
            piece = piece[len(SPACE_MARK):]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path} not found (TOKENIZER_PATH): {FETCH_HINT}")
    return spm.SentencePieceProcessor(model_file=path)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_mult: int
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005

    @classmethod
    def from_hparams(cls, h: Hyperparameters) -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(h, n) for n in names})


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # SDPA wants [B, H, T, D]; our layout is [B, T, H, D] like FlashAttention's.
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def select_attention(device: torch.device) -> tuple[str, Callable[[Tensor, Tensor, Tensor], Tensor], str]:
    """(name, causal attention on [B, T, H, D] tensors with GQA, why this one)."""
    if device.type != "cuda":
        return "sdpa", _sdpa, "not on CUDA"
    try:
        from flash_attn_interface import flash_attn_func as fa3

        def _fa3(q, k, v):
            out = fa3(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        return "flash_attn_3", _fa3, "flash_attn_interface importable"
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func as fa2
        return "flash_attn_2", lambda q, k, v: fa2(q, k, v, causal=True), "flash_attn_interface not importable"
    except ImportError:
        return "sdpa", _sdpa, "neither flash_attn_interface nor flash_attn importable"


class CastedLinear(nn.Linear):
    """Linear layer with fp32 master weights, cast to the activation dtype at use (bf16 on GPU)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate [B, T, H, D] by position; computed per call, which compile folds into the graph."""
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: Callable):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(self.head_dim, cfg.rope_base)
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = self.attention(q, k, v)
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_mult * cfg.model_dim)
        self.proj = CastedLinear(cfg.mlp_mult * cfg.model_dim, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: Callable):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, attention)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Row 0 weighs the stream, row 1 the first-layer input x0: starts as the plain residual.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    """Tied-embedding GPT with U-Net skips: the first half of the blocks push, the second half pop."""

    def __init__(self, cfg: ModelConfig, attention: Callable = _sdpa):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.num_layers))
        self.num_encoder = cfg.num_layers // 2
        self.num_decoder = cfg.num_layers - self.num_encoder
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder, self.num_decoder), cfg.model_dim))

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Per-token negative log-likelihood [B, T] in fp32 (training takes its mean)."""
        logits = self.logits(input_ids)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="none")
        return nll.view_as(target_ids)

    def logits(self, input_ids: Tensor) -> Tensor:
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        skips = []
        for block in self.blocks[:self.num_encoder]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder:]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        logits = F.linear(rms_norm(x), self.tok_emb.weight.to(x.dtype)).float()
        return self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)

    def matrix_params(self) -> list[nn.Parameter]:
        """The 2-D block weights that Muon trains (everything else goes to Adam)."""
        return [m.weight for m in self.blocks.modules() if isinstance(m, CastedLinear)]


# ----------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients tuned for fast convergence
NS_EPS = 1e-7


def newton_schulz5(g: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Approximately orthogonalize g (the U V^T of its SVD) with a quintic Newton-Schulz iteration."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + NS_EPS)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the short side: X X^T is then the small Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon: Nesterov momentum, then orthogonalization. Rank r orthogonalizes matrices i % W == r and
    an all-reduce of one flat buffer gathers every update, so the work is shared across ranks."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, rank: int = 0,
                 world_size: int = 1, ns_dtype: torch.dtype = torch.bfloat16, orthogonalize=newton_schulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))
        self.rank, self.world_size, self.ns_dtype, self.orthogonalize = rank, world_size, ns_dtype, orthogonalize

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    flat[offset:offset + p.numel()] = self._update(p, group).flatten()
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

    def _update(self, p: Tensor, group: dict) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
        g = self.orthogonalize(g, group["backend_steps"], self.ns_dtype)
        # An orthogonal update has unit singular values; tall matrices get sqrt(rows/cols) more.
        return g * max(1.0, g.size(0) / g.size(1)) ** 0.5


def build_optimizers(model: GPT, h: Hyperparameters, rank: int, world_size: int,
                     ns_dtype: torch.dtype, orthogonalize=newton_schulz5) -> list[torch.optim.Optimizer]:
    """Muon for block matrices; Adam for the tied embedding and for every scalar/vector/gate."""
    matrices = model.matrix_params()
    matrix_ids = {id(p) for p in matrices} | {id(model.tok_emb.weight)}
    scalars = [p for p in model.parameters() if id(p) not in matrix_ids]
    fused = next(model.parameters()).device.type == "cuda"
    adam = torch.optim.Adam(
        [dict(params=[model.tok_emb.weight], lr=h.tied_embed_lr, base_lr=h.tied_embed_lr),
         dict(params=scalars, lr=h.scalar_lr, base_lr=h.scalar_lr)],
        betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=fused)
    muon = Muon(matrices, lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps,
                rank=rank, world_size=world_size, ns_dtype=ns_dtype, orthogonalize=orthogonalize)
    for group in muon.param_groups:
        group["base_lr"] = h.matrix_lr
    return [adam, muon]


# ----------------------------------------------------------------------------------------------------
# Quantization and serialization
# ----------------------------------------------------------------------------------------------------

INT8_MAX = 127
QUANT_MIN_NUMEL = 65_536  # smaller tensors (gains, gates, scales) cost little as fp16 and are touchy
ARTIFACT_MAGIC = b"PGOLF"
ARTIFACT_FORMAT_VERSION = 1
ZSTD_LEVEL = 22
CODECS = {  # id -> (name, compress, decompress); the id is written in the artifact header
    1: ("zstd", lambda b: zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b),
        lambda b: zstandard.ZstdDecompressor().decompress(b)),
}
_ARTIFACT_HEADER = struct.Struct("<5sBB")  # magic, format version, codec id


def quantize_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: q in [-127, 127], scale = max|w_row| / 127 stored as fp16."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float16).tiny).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def quantize_state_dict(state: dict[str, Tensor]) -> dict:
    """Large float matrices -> int8 per row; everything else -> fp16 passthrough."""
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.ndim == 2 and t.numel() >= QUANT_MIN_NUMEL:
            q, scale = quantize_int8_rows(t)
            tensors[name] = {"kind": "int8_row", "q": q, "scale": scale, "dtype": str(t.dtype)}
        else:
            tensors[name] = {"kind": "fp16", "data": t.half(), "dtype": str(t.dtype)}
    return {"format_version": ARTIFACT_FORMAT_VERSION, "tensors": tensors}


def dequantize_state_dict(packed: dict) -> dict[str, Tensor]:
    out = {}
    for name, entry in packed["tensors"].items():
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        if entry["kind"] == "int8_row":
            out[name] = dequantize_int8_rows(entry["q"], entry["scale"]).to(dtype)
        else:
            out[name] = entry["data"].to(dtype)
    return out


def serialize_artifact(packed: dict, codec_id: int = 1) -> bytes:
    buf = io.BytesIO()
    torch.save(packed, buf)
    name, compress, _ = CODECS[codec_id]
    return _ARTIFACT_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_FORMAT_VERSION, codec_id) + compress(buf.getvalue())


def deserialize_artifact(blob: bytes, source: str = "<bytes>") -> dict:
    if len(blob) < _ARTIFACT_HEADER.size:
        raise ValueError(f"{source}: {len(blob)} bytes is too short for an artifact header")
    magic, version, codec_id = _ARTIFACT_HEADER.unpack_from(blob)
    if magic != ARTIFACT_MAGIC:
        raise ValueError(f"{source}: not a train_gpt.py artifact (magic {magic!r})")
    if version != ARTIFACT_FORMAT_VERSION or codec_id not in CODECS:
        raise ValueError(f"{source}: unsupported artifact format {version} / codec {codec_id}")
    name, _, decompress = CODECS[codec_id]
    try:
        payload = decompress(blob[_ARTIFACT_HEADER.size:])
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:  # zstd and torch.load raise many types for a damaged payload
        raise ValueError(f"{source}: corrupt or truncated artifact ({name} payload): {e}") from e


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file, then rename, so a crash never leaves a half-written artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_artifact_cap(bytes_code: int, bytes_model: int, cap: int | None = None) -> None:
    cap = ARTIFACT_CAP_BYTES if cap is None else cap
    total = bytes_code + bytes_model
    if total >= cap:
        raise RuntimeError(f"artifact over the cap: bytes_total:{total} = bytes_code:{bytes_code} + "
                           f"bytes_model:{bytes_model}, must be under {cap}")


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def sliding_window_plan(num_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts and, per window, the offset of its first scored position.

    Targets are token positions 1..num_targets. Window w reads tokens[start : start + seq_len] and
    predicts tokens[start + 1 : start + seq_len + 1]. The first window scores all its positions; each
    later one ends `stride` targets further (the last one ends exactly at num_targets) and scores only
    the targets no earlier window scored. So every target is scored exactly once, and past the first
    window with at least seq_len - stride tokens of context. stride == seq_len is the plain,
    non-overlapping evaluation.
    """
    starts, offsets = [0], [0]
    scored = min(seq_len, num_targets)
    while scored < num_targets:
        end = min(scored + stride, num_targets)
        starts.append(end - seq_len)
        offsets.append(scored - (end - seq_len))
        scored = end
    return np.asarray(starts, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def eval_batches(val_tokens: Tensor, seq_len: int, stride: int, batch_windows: int, rank: int = 0,
                 world_size: int = 1):
    """This rank's share of the sliding windows, batch_windows at a time: (x, y, scored, target_pos).

    x, y [B, seq_len] are inputs and targets; scored [B, seq_len] marks the targets this window scores
    (over all ranks every target exactly once); target_pos [B, seq_len] is each target's index in
    val_tokens (clamped on the padding rows, which score nothing).
    """
    device = val_tokens.device
    starts, offsets = sliding_window_plan(len(val_tokens) - 1, seq_len, stride)
    mine = np.array_split(np.arange(len(starts)), world_size)[rank]
    positions = torch.arange(seq_len + 1, device=device)
    for b in range(0, len(mine), batch_windows):
        idx = mine[b:b + batch_windows]
        pad = batch_windows - len(idx)  # a fixed batch shape avoids recompiling for the last batch
        start = torch.from_numpy(np.pad(starts[idx], (0, pad))).to(device)
        first = torch.from_numpy(np.pad(offsets[idx], (0, pad), constant_values=seq_len)).to(device)
        token_pos = start[:, None] + positions[None, :]
        clamped = token_pos.clamp_max(len(val_tokens) - 1)
        window = val_tokens[clamped].long()
        scored = (positions[None, :-1] >= first[:, None]) & (token_pos[:, 1:] < len(val_tokens))
        yield window[:, :-1], window[:, 1:], scored, clamped[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, val_tokens: Tensor, luts: ByteLUTs, seq_len: int, stride: int,
             batch_windows: int, rank: int = 0, world_size: int = 1,
             autocast=contextlib.nullcontext) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) over every target of val_tokens, each scored once."""
    sums = torch.zeros(3, device=val_tokens.device, dtype=torch.float64)  # nats, tokens, bytes
    for x, y, scored, _ in eval_batches(val_tokens, seq_len, stride, batch_windows, rank, world_size):
        with autocast():
            nll = model(x, y)
        sums[0] += nll.double()[scored].sum()
        sums[1] += scored.sum()
        sums[2] += luts.token_bytes(x, y)[scored].sum()
    if world_size > 1:
        dist.all_reduce(sums)
    nats, tokens, nbytes = sums.tolist()
    return nats / tokens, nats / math.log(2) / nbytes


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def lr_multiplier(progress: float, warmdown_frac: float) -> float:
    """1 until the last warmdown_frac of the budget, then linear to 0 at its end."""
    if warmdown_frac <= 0.0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / warmdown_frac))


def training_progress(step: int, elapsed_ms: float, h: Hyperparameters) -> float:
    """Share of the budget used: elapsed training time when there is a wallclock cap, else steps."""
    if h.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * h.max_wallclock_seconds)
    return step / max(1, h.iterations)


@dataclass
class Runtime:
    """Where and how this process runs; everything derived from the environment, not from flags."""
    rank: int
    world_size: int
    device: torch.device
    grad_accum: int
    autocast: Callable
    ns_dtype: torch.dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def train_step(model: nn.Module, optimizers: list, loader: DistributedTokenLoader, h: Hyperparameters,
               rt: Runtime, lr_mult: float) -> Tensor:
    """One optimizer step over the global batch; returns the mean micro-batch loss on this rank."""
    x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len)
    total = torch.zeros((), device=rt.device)
    for i, (xm, ym) in enumerate(zip(x.chunk(rt.grad_accum), y.chunk(rt.grad_accum))):
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = i == rt.grad_accum - 1  # all-reduce once per step
        with rt.autocast():
            loss = model(xm, ym).mean()
        (loss / rt.grad_accum).backward()
        total += loss.detach()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
    if h.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total / rt.grad_accum


def prime_kernels(model, optimizers, base_model: GPT, h: Hyperparameters, rt: Runtime, log) -> None:
    """Run WARMUP_STEPS real steps to compile and warm kernels, then restore the initial weights and
    optimizer state so the timed run starts from step 0 exactly as without priming."""
    if h.warmup_steps == 0:
        return
    model_state = copy.deepcopy(base_model.state_dict())
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader = DistributedTokenLoader(find_shards(h.data_path, "train"), rt.rank, rt.world_size, rt.device)
    t0 = time.perf_counter()
    for _ in range(h.warmup_steps):
        train_step(model, optimizers, loader, h, rt, lr_mult=1.0)
    rt.sync()
    base_model.load_state_dict(model_state)
    for opt, state in zip(optimizers, opt_states):
        opt.load_state_dict(state)
    log(f"warmup steps:{h.warmup_steps} time:{1000 * (time.perf_counter() - t0):.0f}ms (weights reset)")


def all_ranks_agree(flag: bool, rt: Runtime) -> bool:
    """True if any rank says True: ranks must stop on the same step or the collectives deadlock."""
    if rt.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train(model, optimizers, base_model: GPT, eval_fn: Callable, h: Hyperparameters, rt: Runtime, log):
    """The timed loop. Returns the final (val_loss, val_bpb) of the float weights, steps and train ms."""
    loader = DistributedTokenLoader(find_shards(h.data_path, "train"), rt.rank, rt.world_size, rt.device)
    cap_ms = 1000.0 * h.max_wallclock_seconds
    train_ms, step, stop_at = 0.0, 0, None
    rt.sync()
    t0 = time.perf_counter()
    while True:
        last = step == h.iterations or step == stop_at
        if last or (h.val_loss_every > 0 and step % h.val_loss_every == 0):
            rt.sync()
            train_ms += 1000 * (time.perf_counter() - t0)  # evaluation does not count as training
            val_loss, val_bpb = eval_fn()
            log(f"step:{step}/{h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            rt.sync()
            t0 = time.perf_counter()
        if last:
            break
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        lr_mult = lr_multiplier(training_progress(step, elapsed, h), h.warmdown_frac)
        loss = train_step(model, optimizers, loader, h, rt, lr_mult)
        step += 1
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        if h.train_log_every > 0 and (step % h.train_log_every == 0 or step <= 10):
            if rt.world_size > 1:  # gloo has no AVG reduction
                dist.all_reduce(loss)
                loss /= rt.world_size
            log(f"step:{step}/{h.iterations} train_loss:{loss.item():.4f} lr_mult:{lr_mult:.4f} "
                f"train_time:{elapsed:.0f}ms step_avg:{elapsed / step:.2f}ms")
        if stop_at is None and cap_ms > 0 and all_ranks_agree(elapsed >= cap_ms, rt):
            stop_at = step
            log(f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms step:{step}/{h.iterations}")
    return val_loss, val_bpb, step, train_ms


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


LOGGED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


class Logger:
    """Rank 0 writes to stdout and to <out_dir>/<run_id>.txt; other ranks stay silent."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(msg + "\n")


def setup_runtime(h: Hyperparameters, env) -> Runtime:
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    accum = grad_accum_steps(world_size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    # CPU has no fast bf16 matmul; Newton-Schulz there runs in fp32, which also keeps it reproducible.
    ns_dtype = torch.bfloat16 if cuda else torch.float32
    return Runtime(rank, world_size, device, accum, autocast, ns_dtype)


def shared_run_id(h: Hyperparameters, rt: Runtime) -> Hyperparameters:
    if h.run_id:
        return h
    ids = [time.strftime("%Y%m%d_%H%M%S") + "_" + uuid.uuid4().hex[:6]]
    if rt.world_size > 1:
        dist.broadcast_object_list(ids, src=0)
    return dataclasses.replace(h, run_id=ids[0])


def log_preamble(log: Logger, h: Hyperparameters, rt: Runtime, source: str, env) -> None:
    log("=" * 40 + " source: train_gpt.py " + "=" * 40, console=False)
    log(source, console=False)
    log("=" * 100, console=False)
    for f in dataclasses.fields(h):
        log(f"hparam {f.name}:{getattr(h, f.name)}")
    log(f"runtime world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum} device:{rt.device} "
        f"autocast:{'bf16' if rt.device.type == 'cuda' else 'off(fp32)'} ns_dtype:{rt.ns_dtype}")
    log(f"versions python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
        f"sentencepiece:{spm.__version__} zstandard:{zstandard.__version__}")
    names = {f.name.upper() for f in dataclasses.fields(h)} | set(LOGGED_ENV)
    log("env " + " ".join(f"{k}:{env[k]}" for k in sorted(names) if k in env))
    if rt.device.type == "cuda":
        log(f"gpu name:{torch.cuda.get_device_name(rt.device)}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout, console=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def build_model(h: Hyperparameters, rt: Runtime, log) -> tuple[GPT, nn.Module, nn.Module, Callable]:
    """(base model, model to train, model to evaluate, orthogonalize fn), compiled on CUDA."""
    name, attention, why = select_attention(rt.device)
    log(f"attention_backend:{name} reason:{why}")
    base = GPT(ModelConfig.from_hparams(h), attention).to(rt.device)
    log(f"model params:{sum(p.numel() for p in base.parameters())}")
    orthogonalize, compiled = newton_schulz5, base
    if rt.device.type == "cuda" and h.compile:
        compiled = torch.compile(base, dynamic=False)
        orthogonalize = torch.compile(newton_schulz5)
        log("compile:on")
    else:
        log(f"compile:off reason:{'COMPILE=0' if rt.device.type == 'cuda' else 'cpu run'}")
    trained = compiled
    if rt.world_size > 1:
        trained = DistributedDataParallel(compiled, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return base, trained, compiled, orthogonalize


def timed_eval(label: str, eval_model: nn.Module, val_tokens: Tensor, luts: ByteLUTs, seq_len: int,
               stride: int, h: Hyperparameters, rt: Runtime, log) -> tuple[float, float]:
    rt.sync()
    t0 = time.perf_counter()
    batch = max(1, h.val_batch_size // seq_len)
    loss, bpb = evaluate(eval_model, val_tokens, luts, seq_len, stride, batch, rt.rank, rt.world_size, rt.autocast)
    rt.sync()
    log(f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} seq_len:{seq_len} stride:{stride} "
        f"eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    return loss, bpb


def save_artifact(base_model: GPT, path: Path, code_bytes: int, rt: Runtime, log) -> None:
    """Quantize, compress and write the artifact (rank 0), log byte counts, enforce the cap."""
    if rt.is_main:
        blob = serialize_artifact(quantize_state_dict(base_model.state_dict()))
        write_atomic(path, blob)
        log(f"artifact path:{path} bytes_code:{code_bytes} bytes_model:{len(blob)} "
            f"bytes_total:{code_bytes + len(blob)} cap:{ARTIFACT_CAP_BYTES}")
        check_artifact_cap(code_bytes, len(blob))
    if rt.world_size > 1:
        dist.barrier()


def load_artifact(path: Path) -> dict[str, Tensor]:
    return dequantize_state_dict(deserialize_artifact(path.read_bytes(), str(path)))


def main(env=None) -> None:
    env = os.environ if env is None else env
    h = Hyperparameters.from_env(env)
    rt = setup_runtime(h, env)
    try:
        run(h, rt, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(h: Hyperparameters, rt: Runtime, env) -> None:
    h = shared_run_id(h, rt)
    out_dir = Path(h.out_dir)
    log = Logger(out_dir / f"{h.run_id}.txt" if rt.is_main else None)
    source = Path(__file__).read_text(encoding="utf-8")
    log_preamble(log, h, rt, source, env)
    seed_everything(h.seed)

    sp = load_tokenizer(h.tokenizer_path)
    luts = build_byte_luts(sp, h.vocab_size).to(rt.device)
    val_tokens = torch.from_numpy(load_validation_tokens(h.data_path).astype(np.int32)).to(rt.device)
    log(f"data train_shards:{len(find_shards(h.data_path, 'train'))} val_tokens:{len(val_tokens)} "
        f"tokenizer_pieces:{sp.vocab_size()}")

    base, model, eval_model, orthogonalize = build_model(h, rt, log)
    optimizers = build_optimizers(base, h, rt.rank, rt.world_size, rt.ns_dtype, orthogonalize)

    def eval_fn():
        batch = max(1, h.val_batch_size // h.train_seq_len)
        return evaluate(eval_model, val_tokens, luts, h.train_seq_len, h.train_seq_len, batch,
                        rt.rank, rt.world_size, rt.autocast)

    prime_kernels(model, optimizers, base, h, rt, log)
    val_loss, val_bpb, steps, train_ms = train(model, optimizers, base, eval_fn, h, rt, log)
    log(f"final_float_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} steps:{steps} train_time:{train_ms:.0f}ms")
    if rt.device.type == "cuda":
        log(f"peak_memory allocated:{torch.cuda.max_memory_allocated() >> 20}MiB "
            f"reserved:{torch.cuda.max_memory_reserved() >> 20}MiB")

    artifact = out_dir / f"{h.run_id}.ptz"
    save_artifact(base, artifact, len(source.encode("utf-8")), rt, log)
    base.load_state_dict(load_artifact(artifact))
    timed_eval("final_roundtrip_exact", eval_model, val_tokens, luts, h.train_seq_len, h.train_seq_len, h, rt, log)
    timed_eval("final_sliding_window_exact", eval_model, val_tokens, luts, h.eval_seq_len, h.eval_stride, h, rt, log)


if __name__ == "__main__":
    main()
