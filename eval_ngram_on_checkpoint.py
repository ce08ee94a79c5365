"""Score a saved artifact with the n-gram agreement tilt of SPEC section 6: plain and tilted val_bpb.

    ARTIFACT_PATH=logs/<RUN_ID>.ptz python3 eval_ngram_on_checkpoint.py
    ARTIFACT_PATH=logs/<RUN_ID>.ptz torchrun --standalone --nproc_per_node=8 eval_ngram_on_checkpoint.py

The architecture comes from the same environment variables as the training run (train_gpt.py's
Hyperparameters: NUM_LAYERS, MODEL_DIM, ...), the windows from EVAL_SEQ_LEN / EVAL_STRIDE, the n-gram
settings from the NGRAM_* variables (NgramSettings). Rank 0 builds the hints once with
online_ngram_state.c while the model compiles, and broadcasts them; every rank scores its share of the
sliding windows and applies the tilt on its own device. The log goes to stdout and to
OUT_DIR/<artifact name>_ngram.txt.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import online_ngram as ng
import train_gpt as tg


@dataclass(frozen=True)
class NgramSettings:
    artifact_path: str = tg._hp("")  # the .ptz a training run wrote (required)
    # Per expert (token 16-gram, within-word, word-start): the least confidence that may fire, and the
    # boost beta. A boost of 0 turns an expert off.
    ngram_token_threshold: float = tg._hp(0.80, lo=0.0, hi=1.0)
    ngram_within_threshold: float = tg._hp(0.45, lo=0.0, hi=1.0)
    ngram_word_threshold: float = tg._hp(0.65, lo=0.0, hi=1.0)
    ngram_token_boost: float = tg._hp(2.625, lo=0.0, hi=20.0)
    ngram_within_boost: float = tg._hp(0.75, lo=0.0, hi=20.0)
    ngram_word_boost: float = tg._hp(0.75, lo=0.0, hi=20.0)
    ngram_agree_boost: float = tg._hp(0.5, lo=0.0, hi=20.0)  # added when two gated experts agree
    # Optional: mix the model with the adaptive cache (orders 2..7), weight = this x normalized entropy.
    ngram_cache: bool = tg._hp(False)
    ngram_cache_weight: float = tg._hp(0.3, lo=0.0, hi=1.0)

    @classmethod
    def from_env(cls, env) -> "NgramSettings":
        values = {}
        for f in dataclasses.fields(cls):
            if f.name.upper() in env:
                values[f.name] = tg._parse_env_value(f.name.upper(), env[f.name.upper()], f.default, f.metadata)
        settings = cls(**values)
        if not settings.artifact_path:
            raise ValueError("ARTIFACT_PATH is not set: point it at the .ptz a training run wrote "
                             "(OUT_DIR/RUN_ID.ptz)")
        return settings

    def tilt(self) -> ng.TiltConfig:
        return ng.TiltConfig(
            (self.ngram_token_threshold, self.ngram_within_threshold, self.ngram_word_threshold),
            (self.ngram_token_boost, self.ngram_within_boost, self.ngram_word_boost), self.ngram_agree_boost)


# Running sums over the scored positions (float64, all-reduced across ranks).
SUMS = ("plain_nats", "tilted_nats", "cache_nats", "tokens", "bytes", *(f"fired_{e}" for e in ng.EXPERTS),
        "agreed")


def load_model(h: tg.Hyperparameters, s: NgramSettings, rt: tg.Runtime, bos_id: int, log):
    """(logits function, whether it is compiled) for the artifact, built as the environment describes."""
    path = Path(s.artifact_path)
    if not path.is_file():
        raise FileNotFoundError(f"ARTIFACT_PATH={path}: no such file")
    name, attention, why = tg.select_attention(rt.device)
    log(f"attention_backend:{name} reason:{why}")
    model = tg.GPT(tg.ModelConfig.from_hparams(h, bos_id), attention)  # SmearGate needs the tokenizer's BOS
    try:
        model.load_state_dict(tg.load_artifact(path))
    except RuntimeError as e:
        raise ValueError(f"ARTIFACT_PATH={path} does not fit the architecture the environment describes "
                         f"(NUM_LAYERS, MODEL_DIM, NUM_HEADS, ... must be the training run's): {e}") from e
    model = model.to(rt.device).eval()
    if rt.device.type == "cuda" and h.compile:
        return torch.compile(model.logits, dynamic=False), True
    return model.logits, False


def broadcast_from_main(array: np.ndarray | None, shape, dtype: torch.dtype, rt: tg.Runtime) -> torch.Tensor:
    """Rank 0's array as a tensor on every rank's device."""
    out = torch.empty(shape, dtype=dtype, device=rt.device)
    if rt.is_main:
        out.copy_(torch.from_numpy(array))
    if rt.world_size > 1:
        dist.broadcast(out, 0)
    return out


def log_tables(log, label: str, stats: ng.TableStats, n: int) -> None:
    log(f"{label} tokens:{n} wall_ms:{1000 * stats.seconds:.0f} cpu_ms:{1000 * stats.cpu_seconds:.0f} "
        f"tokens_per_s_cpu:{n / max(stats.cpu_seconds, 1e-9):.0f} memory_bytes:{stats.memory_bytes}")
    for line in stats.lines():
        log(f"{label}_table {line}")


@torch.no_grad()
def warm_up(logits_fn, h: tg.Hyperparameters, batch: int, rt: tg.Runtime) -> None:
    x = torch.zeros((batch, h.eval_seq_len), dtype=torch.long, device=rt.device)
    with rt.autocast():
        logits_fn(x)
    rt.sync()


@torch.no_grad()
def score(logits_fn, val_tokens, luts: tg.ByteLUTs, hint, conf, cache_p, masks, s: NgramSettings,
          h: tg.Hyperparameters, batch: int, rt: tg.Runtime) -> dict[str, float]:
    """Sliding-window scoring of this rank's windows: plain, tilted (and cache-mixed) nats, summed."""
    tilt = s.tilt()
    sums = torch.zeros(len(SUMS), dtype=torch.float64, device=rt.device)
    batches = tg.eval_batches(val_tokens, h.eval_seq_len, h.eval_stride, batch, rt.rank, rt.world_size)
    total = tg.num_eval_batches(len(val_tokens), h.eval_seq_len, h.eval_stride, batch, rt.rank, rt.world_size)
    for x, y, scored, pos in tg.Progress("ngram_score", total, rt.is_main).wrap(batches):
        with rt.autocast():
            logits = logits_fn(x)
        logp = torch.log_softmax(logits.float()[scored], dim=-1)  # [S, V]: only the scored rows
        xs, ys, ps = x[scored], y[scored], pos[scored]
        plain = logp.gather(1, ys[:, None])[:, 0]
        hinted, beta, expert, agreed = ng.select_hints(logp, luts.is_boundary[xs], hint[:, ps].long(), conf[:, ps],
                                                       masks, tilt)
        tilted = ng.tilt_logprobs(logp, hinted, beta).gather(1, ys[:, None])[:, 0]
        mixed = plain
        if cache_p is not None:
            mixed = ng.mix_logprobs(plain, cache_p[ps], ng.cache_weight(logp, s.ngram_cache_weight))
        fired = [(expert == e).sum() for e in range(len(ng.EXPERTS))]
        values = [-plain.double().sum(), -tilted.double().sum(), -mixed.double().sum(), scored.sum(),
                  luts.token_bytes(xs, ys).sum(), *fired, agreed.sum()]
        sums += torch.stack([v.double() for v in values])
    if rt.world_size > 1:
        dist.all_reduce(sums)
    return dict(zip(SUMS, sums.tolist()))


def log_results(log, sums: dict[str, float], cache: bool) -> None:
    tokens, nbytes = sums["tokens"], sums["bytes"]
    labels = [("plain", "plain_nats"), ("tilted", "tilted_nats")] + ([("cache", "cache_nats")] if cache else [])
    for label, key in labels:
        log(f"ngram_eval_{label} val_loss:{sums[key] / tokens:.8f} "
            f"val_bpb:{sums[key] / math.log(2) / nbytes:.8f} tokens:{tokens:.0f}")
    fired = {e: sums[f"fired_{e}"] / tokens for e in ng.EXPERTS}
    log("ngram_fire " + " ".join(f"{e}:{v:.6f}" for e, v in fired.items()) +
        f" any:{sum(fired.values()):.6f} agreed:{sums['agreed'] / tokens:.6f}")


def run(h: tg.Hyperparameters, s: NgramSettings, rt: tg.Runtime, env) -> dict[str, float]:
    t_start = time.perf_counter()
    log = tg.Logger(Path(h.out_dir) / f"{Path(s.artifact_path).stem}_ngram.txt" if rt.is_main else None)
    tg.log_preamble(log, h, rt, Path(tg.__file__).read_text(encoding="utf-8"), env)
    for f in dataclasses.fields(s):
        log(f"ngram_setting {f.name}:{getattr(s, f.name)}")

    sp = tg.load_tokenizer(h.tokenizer_path)
    luts = tg.build_byte_luts(sp, h.vocab_size).to(rt.device)
    tables = ng.build_word_tables(sp, h.vocab_size)
    tokens = tg.load_validation_tokens(h.data_path)
    val_tokens = torch.from_numpy(tokens.astype(np.int32)).to(rt.device)
    log(f"data val_tokens:{len(tokens)} tokenizer_pieces:{sp.vocab_size()}")
    logits_fn, compiled = load_model(h, s, rt, sp.bos_id(), log)
    batch = h.val_batch_seqs(h.eval_seq_len)

    # Rank 0 builds the hints (and the cache's probabilities) while the model compiles: the C call
    # releases the GIL. Every other rank receives them by broadcast instead of rebuilding them.
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        hints_job = pool.submit(ng.hint_pass, tokens, tables) if rt.is_main else None
        cache_job = pool.submit(ng.cache_pass, tokens, h.vocab_size) if rt.is_main and s.ngram_cache else None
        if compiled:
            warm_up(logits_fn, h, batch, rt)
            log(f"compile warm_up_ms:{1000 * (time.perf_counter() - t0):.0f}")
        hints = hints_job.result() if hints_job else None
        cache = cache_job.result() if cache_job else None
    if hints:
        log_tables(log, "ngram_hints", hints.stats, len(tokens))
    if cache:
        log_tables(log, "ngram_cache", cache[1], len(tokens))
    t1 = time.perf_counter()
    shape = (len(ng.EXPERTS), len(tokens))
    hint = broadcast_from_main(hints.hint if hints else None, shape, torch.int32, rt)
    conf = broadcast_from_main(hints.conf if hints else None, shape, torch.float32, rt)
    cache_p = (broadcast_from_main(cache[0] if cache else None, (len(tokens),), torch.float64, rt)
               if s.ngram_cache else None)
    rt.sync()
    t2 = time.perf_counter()

    sums = score(logits_fn, val_tokens, luts, hint, conf, cache_p, ng.piece_masks(tables, rt.device), s, h,
                 batch, rt)
    rt.sync()
    t3 = time.perf_counter()
    log_results(log, sums, s.ngram_cache)
    log(f"ngram_timing prepare_ms:{1000 * (t1 - t0):.0f} share_ms:{1000 * (t2 - t1):.0f} "
        f"eval_ms:{1000 * (t3 - t2):.0f} total_ms:{1000 * (t3 - t_start):.0f}")
    return sums


def main(env=None) -> dict[str, float]:
    env = os.environ if env is None else env
    h = tg.Hyperparameters.from_env(env)
    s = NgramSettings.from_env(env)
    rt = tg.setup_runtime(h, env)
    try:
        return run(h, s, rt, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
