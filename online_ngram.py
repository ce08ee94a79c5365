"""Online n-gram experts for the evaluation-time agreement pass (docs/ngram.md), and an adaptive cache.

- `build_word_tables`: the sentencepiece piece tables the C state reads (no Python dicts on the hot path).
- `hint_pass` / `cache_pass`: run online_ngram_state.c (built with the system compiler on first use,
  rebuilt when the source is newer) over a token stream.
- `reference_hints` / `reference_cache`: the same experts in plain Python, keyed by token tuples
  instead of hashes: the definition the tests hold the C code to.
- `select_hints`, `tilt_logprobs`, `cache_weight`, `mix_logprobs`: the torch side, run on the model's
  device. Nothing there reads the token being scored: the hint, gate and boost of a position come from
  the prefix (through the experts) and the model's distribution only.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.ctypeslib import ndpointer
from torch import Tensor

import train_gpt as tg

SOURCE = Path(__file__).resolve().with_name("online_ngram_state.c")
BUILD_DIR = SOURCE.parent / "build"
CFLAGS = ("-O3", "-shared", "-fPIC", "-Wall", "-Wextra",
          "-ffp-contract=off")  # no fused multiply-add: the cache's doubles must match the reference's

EXPERTS = ("token", "within", "word")  # token 16-gram, within-word, word-start (the C order)
TOKEN_CONTEXT = 15  # the token expert's context: the previous 15 tokens
CACHE_MAX_ORDER = 7  # the cache counts orders 2..7: contexts of 1..6 tokens
MAX_VOCAB = 65536  # tokens are uint16
# Piece kinds, as online_ngram_state.c numbers them.
PIECE_CONTINUATION, PIECE_WORD_START, PIECE_BOUNDARY = 0, 1, 2
# The hint pass sizes each bucket's tables from its number of learning positions, at most half full
# (short linear probes): with these sizes they cannot fill up. The cache's tables start small and double
# whenever they are over half full, up to the same bound over the whole stream.
SLOTS_PER_ENTRY = 2.0
INITIAL_SLOTS = 1 << 16
TABLE_PARTS = ("singles", "contexts", "pairs")  # per expert, as online_ngram_state.c orders them
SLOT_BYTES = 16
_STATUS = {1: "full", 2: "no_memory", 3: "bad_token", 4: "bad_argument"}


# ---- piece tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WordTables:
    kind: np.ndarray  # uint8 [V]: PIECE_CONTINUATION, PIECE_WORD_START or PIECE_BOUNDARY
    norm_id: np.ndarray  # int32 [V]: same id <=> same text once the space mark is removed and lower-cased


def build_word_tables(sp, vocab_size: int) -> WordTables:
    """Words as the experts see them: a piece with the space mark starts one, a boundary ends it."""
    luts = tg.build_byte_luts(sp, vocab_size)
    boundary, space = luts.is_boundary.numpy(), luts.has_leading_space.numpy()
    kind = np.where(boundary, PIECE_BOUNDARY, np.where(space, PIECE_WORD_START, PIECE_CONTINUATION))
    texts = [sp.id_to_piece(i).removeprefix(tg.SPACE_MARK).lower() if i < sp.vocab_size() else f"<id{i}>"
             for i in range(vocab_size)]
    _, norm_id = np.unique(np.array(texts, dtype=object), return_inverse=True)
    return WordTables(kind.astype(np.uint8), norm_id.astype(np.int32))


# ---- the C library -------------------------------------------------------------------------------


def _compile(lib: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"{SOURCE.name} needs a C compiler and `{cc}` is not on PATH: install one "
                           f"(apt-get install gcc) or point CC at it")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.tmp{os.getpid()}")  # concurrent builders never see a partial file
    result = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE} with {cc} failed:\n{result.stderr}")
    os.replace(tmp, lib)


def load_library() -> ctypes.CDLL:
    lib_path = BUILD_DIR / (SOURCE.stem + ".so")
    if not lib_path.exists() or lib_path.stat().st_mtime < SOURCE.stat().st_mtime:
        _compile(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    i64, i32 = ctypes.c_int64, ctypes.c_int32
    arr = lambda dtype: ndpointer(dtype, flags="C_CONTIGUOUS")  # noqa: E731
    lib.ngram_hints.argtypes = [arr(np.uint16), i64, i32, arr(np.uint8), arr(np.int32), ctypes.c_double,
                                arr(np.int32), arr(np.float32), arr(np.int64), arr(np.int64), arr(np.int64),
                                arr(np.int64)]
    lib.ngram_cache.argtypes = [arr(np.uint16), i64, i32, i32, arr(np.int64), arr(np.int64), arr(np.float64),
                                arr(np.int64), arr(np.int64), arr(np.int64)]
    lib.ngram_hints.restype = lib.ngram_cache.restype = ctypes.c_int
    return lib


_LIB: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = load_library()
    return _LIB


@dataclass
class TableStats:
    names: list[str]
    slots: np.ndarray  # int64 [tables]: the largest size of each table
    used: np.ndarray  # int64 [tables]: entries made in it
    memory_bytes: int  # peak bytes of the pass's tables (and buffers)
    seconds: float  # wall time of the pass
    cpu_seconds: float  # CPU time of the pass (its thread only)

    def lines(self) -> list[str]:
        return [f"name:{n} slots:{s} used:{u}" for n, s, u in zip(self.names, self.slots.tolist(), self.used.tolist())]


@dataclass
class Hints:
    hint: np.ndarray  # int32 [E, N]: the hinted token for position t, -1: none
    conf: np.ndarray  # float32 [E, N]: its share of the context's continuations
    stats: TableStats


def _bad_token(tokens: np.ndarray, pos: int, vocab: int) -> ValueError:
    return ValueError(f"token {int(tokens[pos])} at position {pos} is outside the vocabulary of {vocab} "
                      f"(does VOCAB_SIZE match the tokenizer and the data?)")


def _check_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The stream as contiguous uint16, after checking every id against the vocabulary in its own type:
    checked after the narrowing cast, 65543 would pass as 7."""
    if not 2 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocabulary size {vocab_size} is outside [2, {MAX_VOCAB}]")
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token ids must be integers, not {tokens.dtype}")
    outside = (tokens < 0) | (tokens >= vocab_size)
    if outside.any():
        raise _bad_token(tokens, int(np.argmax(outside)), vocab_size)
    return np.ascontiguousarray(tokens, dtype=np.uint16)


def _run(fn, names: list[str], tokens: np.ndarray, vocab: int, inputs: tuple, outputs: tuple,
         more_outputs: tuple = ()) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Call a pass of the C library: fn(tokens, N, V, *inputs, *outputs, slots, used, *more_outputs,
    err_info). Returns (slots, used, wall seconds, CPU seconds); raises a clear error for a bad status."""
    slots, used = np.zeros(len(names), dtype=np.int64), np.zeros(len(names), dtype=np.int64)
    err = np.zeros(1, dtype=np.int64)
    t0, c0 = time.perf_counter(), time.thread_time()  # ctypes runs the call on this thread
    status = fn(tokens, len(tokens), vocab, *inputs, *outputs, slots, used, *more_outputs, err)
    seconds, cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
    info = int(err[0])
    kind = _STATUS.get(status, f"status {status}")
    if kind in ("full", "no_memory"):
        what = "is full" if kind == "full" else "could not be allocated"
        raise RuntimeError(f"n-gram table {names[info]} {what} ({slots[info]} slots) on a stream of "
                           f"{len(tokens)} tokens")
    if kind == "bad_token":
        raise _bad_token(tokens, info, vocab)
    if status:
        raise ValueError(f"online_ngram_state.c rejected its arguments ({kind}, table {names[info]})")
    return slots, used, seconds, cpu_seconds


def hint_pass(tokens: np.ndarray, tables: WordTables, slots_per_entry: float = SLOTS_PER_ENTRY) -> Hints:
    """Every expert's hint and confidence for every position of the stream, from the tokens before it."""
    vocab = len(tables.kind)
    tokens = _check_tokens(tokens, vocab)
    hint = np.empty((len(EXPERTS), len(tokens)), dtype=np.int32)
    conf = np.empty((len(EXPERTS), len(tokens)), dtype=np.float32)
    memory = np.zeros(1, dtype=np.int64)
    names = [f"{e}_{part}" for e in EXPERTS for part in TABLE_PARTS]
    slots, used, seconds, cpu = _run(_library().ngram_hints, names, tokens, vocab,
                                     inputs=(tables.kind, tables.norm_id, slots_per_entry), outputs=(hint, conf),
                                     more_outputs=(memory,))
    return Hints(hint, conf, TableStats(names, slots, used, int(memory[0]), seconds, cpu))


def cache_capacities(n: int, vocab_size: int, max_order: int) -> np.ndarray:
    """The most slots each cache table may need: per context length k, min(N, V^k) contexts and
    min(N, V^(k+1)) pairs."""
    entries = []
    for k in range(1, max_order):
        entries += [min(n, vocab_size ** k), min(n, vocab_size ** (k + 1))]
    return np.array([SLOTS_PER_ENTRY * e + 2 for e in entries], dtype=np.int64)


def cache_pass(tokens: np.ndarray, vocab_size: int, max_order: int = CACHE_MAX_ORDER,
               max_slots: np.ndarray | None = None) -> tuple[np.ndarray, TableStats]:
    """P_cache(tokens[t]) for every t: the cache's distribution from tokens[:t], read at the token."""
    tokens = _check_tokens(tokens, vocab_size)
    n = len(tokens)
    max_slots = cache_capacities(n, vocab_size, max_order) if max_slots is None else np.asarray(max_slots, np.int64)
    prob = np.empty(n, dtype=np.float64)
    names = [f"order{k + 1}_{part}" for k in range(1, max_order) for part in ("contexts", "pairs")]
    slots, used, seconds, cpu = _run(_library().ngram_cache, names, tokens, vocab_size,
                                     inputs=(max_order - 1, np.minimum(max_slots, INITIAL_SLOTS), max_slots),
                                     outputs=(prob,))
    return prob, TableStats(names, slots, used, int(slots.sum()) * SLOT_BYTES, seconds, cpu)


# ---- reference implementation (plain Python, exact contexts instead of hashes) ----------------------


class _Counts:
    """Continuation counts per context; the best is the most frequent, ties going to the earliest."""

    def __init__(self):
        self.counts = defaultdict(lambda: defaultdict(int))
        self.best = {}  # context -> (token, count)

    def hint(self, ctx) -> tuple[int, float]:
        if ctx not in self.best:
            return -1, 0.0
        tok, count = self.best[ctx]
        return tok, float(np.float32(count / sum(self.counts[ctx].values())))

    def learn(self, ctx, tok: int) -> None:
        self.counts[ctx][tok] += 1
        if ctx not in self.best or self.counts[ctx][tok] > self.best[ctx][1]:
            self.best[ctx] = (tok, self.counts[ctx][tok])


def reference_hints(tokens, tables: WordTables) -> tuple[np.ndarray, np.ndarray]:
    """(hint [E, N], conf [E, N]) exactly as hint_pass defines them, one position at a time."""
    tokens = [int(t) for t in tokens]
    experts = [_Counts() for _ in EXPERTS]
    hint = np.full((len(EXPERTS), len(tokens)), -1, dtype=np.int32)
    conf = np.zeros((len(EXPERTS), len(tokens)), dtype=np.float32)
    words, word = [], []  # completed words of this document (normalized ids), current word (token ids)
    after_boundary = True
    for t, tok in enumerate(tokens):
        norm = tuple(int(tables.norm_id[x]) for x in word)
        history = tuple(tuple(int(tables.norm_id[x]) for x in w) for w in words[-2:])
        contexts = [tuple(tokens[t - TOKEN_CONTEXT:t]) if t >= TOKEN_CONTEXT else None,
                    tuple(word) if word else None,
                    (((),) * 2 + history)[-2:] + (norm,)]
        kind = int(tables.kind[tok])
        boundary = kind == PIECE_BOUNDARY
        starts = not boundary and (after_boundary or kind == PIECE_WORD_START)
        learns = [True, not boundary and not starts, starts]
        for e, ctx in enumerate(contexts):
            if ctx is None:
                continue
            hint[e, t], conf[e, t] = experts[e].hint(ctx)
            if learns[e]:
                experts[e].learn(ctx, tok)
        if boundary:
            words, word = [], []
        elif starts:
            if word:
                words.append(word)
            word = [tok]
        else:
            word = word + [tok]
        after_boundary = boundary
    return hint, conf


class ReferenceCache:
    """Witten-Bell interpolation over context lengths 1..max_order-1 on a uniform base."""

    def __init__(self, vocab_size: int, max_order: int = CACHE_MAX_ORDER):
        self.vocab_size, self.lengths = vocab_size, range(1, max_order)
        self.counts = defaultdict(lambda: defaultdict(int))  # context tuple -> token -> count

    def prob(self, prefix: list[int], tok: int) -> float:
        p = 1.0 / self.vocab_size
        for k in self.lengths:
            if len(prefix) >= k and (c := self.counts.get(tuple(prefix[-k:]))):
                p = (c.get(tok, 0) + len(c) * p) / (sum(c.values()) + len(c))
        return p

    def distribution(self, prefix: list[int]) -> np.ndarray:
        """float64 [V]: the whole distribution (the same recursion for every token at once)."""
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k in self.lengths:
            if len(prefix) >= k and (c := self.counts.get(tuple(prefix[-k:]))):
                counts = np.zeros(self.vocab_size)
                counts[list(c)] = list(c.values())
                p = (counts + len(c) * p) / (sum(c.values()) + len(c))
        return p

    def learn(self, prefix: list[int], tok: int) -> None:
        for k in self.lengths:
            if len(prefix) >= k:
                self.counts[tuple(prefix[-k:])][tok] += 1


def reference_cache(tokens, vocab_size: int, max_order: int = CACHE_MAX_ORDER) -> np.ndarray:
    tokens = [int(t) for t in tokens]
    cache = ReferenceCache(vocab_size, max_order)
    out = np.empty(len(tokens))
    for t, tok in enumerate(tokens):
        out[t] = cache.prob(tokens[:t], tok)
        cache.learn(tokens[:t], tok)
    return out


# ---- the tilt and the mixture (torch, on the model's device) ----------------------------------------


@dataclass(frozen=True)
class TiltConfig:
    thresholds: tuple[float, float, float]  # per expert: the least confidence that may fire
    boosts: tuple[float, float, float]  # per expert: beta
    agree_boost: float  # added to beta when another gated expert hints the same token


def piece_masks(tables: WordTables, device) -> Tensor:
    """float32 [V, 3]: columns mark word-start pieces, continuation pieces, and every non-boundary piece."""
    kind = torch.from_numpy(tables.kind.astype(np.int64))
    masks = torch.stack([kind == PIECE_WORD_START, kind == PIECE_CONTINUATION, kind != PIECE_BOUNDARY], 1)
    return masks.float().to(device)


def select_hints(logp: Tensor, after_boundary: Tensor, hint: Tensor, conf: Tensor, masks: Tensor,
                 cfg: TiltConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hint to apply at each position and its boost, from the prefix and the model only.

    logp [S, V] the model's log-distribution; after_boundary [S] the previous token is a boundary;
    hint [E, S] (-1: none) and conf [E, S] from the experts; masks from piece_masks.
    Each expert whose confidence reaches its threshold is scored by its expected gain
    G = p beta - log(1 + q (e^beta - 1)), where q is the model's probability of the hint and p the
    chance the hint is right: the confidence, times the model's probability that the next token is a
    continuation piece (within-word expert) or starts a word (word-start expert). The largest positive G
    wins; another gated expert hinting the same token adds agree_boost to beta.
    Returns (h [S] long, -1: no tilt; beta [S]; expert [S] long, -1: none; agreed [S] bool).
    """
    probs = logp.exp()
    mass = probs @ masks  # [S, 3]
    p_start = torch.where(after_boundary, mass[:, 2], mass[:, 0])
    p_continue = torch.where(after_boundary, torch.zeros_like(p_start), mass[:, 1])
    weight = torch.stack([torch.ones_like(p_start), p_continue, p_start])  # [E, S]
    beta = torch.tensor(cfg.boosts, device=logp.device, dtype=logp.dtype)[:, None]
    threshold = torch.tensor(cfg.thresholds, device=logp.device, dtype=conf.dtype)[:, None]
    q = probs.gather(1, hint.clamp_min(0).T).T  # [E, S]
    gain = conf * weight * beta - torch.log1p(q * torch.expm1(beta))
    gated = (hint >= 0) & (conf >= threshold)
    best_gain, expert = gain.masked_fill(~gated, -math.inf).max(0)
    fire = best_gain > 0
    h = hint.gather(0, expert[None])[0]
    agreed = fire & (((hint == h) & gated).sum(0) >= 2)
    b = beta[:, 0][expert] + cfg.agree_boost * agreed
    none = torch.full_like(h, -1)
    return torch.where(fire, h, none), torch.where(fire, b, 0.0), torch.where(fire, expert, none), agreed


def tilt_logprobs(logp: Tensor, h: Tensor, beta: Tensor) -> Tensor:
    """log p'(a) = log p(a) + beta [a == h] - log(1 + q (e^beta - 1)), q = p(h): normalized for any
    h and beta. Rows with h = -1 (beta 0) come back unchanged."""
    beta = torch.where(h >= 0, beta, 0.0).to(logp.dtype)
    idx = h.clamp_min(0)[:, None]
    q = logp.gather(1, idx).exp()[:, 0]
    out = logp - torch.log1p(q * torch.expm1(beta))[:, None]
    return out.scatter_add(1, idx, beta[:, None])


def cache_weight(logp: Tensor, max_weight: float) -> Tensor:
    """[S]: the cache's share of the mixture: max_weight times the model's entropy over its maximum,
    so the cache counts most where the model is unsure."""
    entropy = -(logp.exp() * logp).sum(-1)
    return max_weight * (entropy / math.log(logp.size(-1))).clamp(0.0, 1.0)


def mix_logprobs(logp: Tensor, cache_p: Tensor, weight: Tensor) -> Tensor:
    """log((1 - w) p + w P_cache), elementwise: over the vocabulary it is a normalized distribution
    whenever both parts are; scoring reads it at the token only."""
    w = weight.double()
    return torch.log((1 - w) * logp.double().exp() + w * cache_p.double())
