"""Score a saved artifact with the n-gram agreement tilt of docs/ngram.md: plain and tilted val_bpb.

    ARTIFACT_PATH=logs/<RUN_ID>.ptz python3 eval_ngram_on_checkpoint.py
    ARTIFACT_PATH=logs/<RUN_ID>.ptz torchrun --standalone --nproc_per_node=8 eval_ngram_on_checkpoint.py

The model is rebuilt from the config the artifact records (the architecture variables of the
environment are not read); the data and tokenizer come from DATA_PATH / TOKENIZER_PATH, the windows from
EVAL_SEQ_LEN / EVAL_STRIDE, the n-gram settings from the NGRAM_* variables (NgramSettings). With
NGRAM_TTT=1 the model's distributions are score-first test-time training's (the TTT_* settings,
docs/ttt.md) instead of the sliding window's, and the tilt applies on top of them. Rank 0 builds the hints once with
online_ngram_state.c while the model compiles, and broadcasts them; every rank scores its share of the
sliding windows and applies the tilt on its own device. The log goes to stdout and to
OUT_DIR/<artifact name>_ngram.txt.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import online_ngram as ng
import train_gpt as tg


@dataclass(frozen=True)
class NgramSettings:
    # The artifact.
    artifact_path: str = tg._hp("")  # the .ptz a training run wrote (required)
    # Experts: the least confidence at which each may fire, and its boost beta (0 turns it off). The token
    # expert's (NGRAM_TOKEN_THRESHOLD, NGRAM_TOKEN_BOOST) are train_gpt.py's settings: its own evaluation tilts too.
    ngram_within_threshold: float = tg._hp(0.45, lo=0.0, hi=1.0)  # within-word expert
    ngram_word_threshold: float = tg._hp(0.65, lo=0.0, hi=1.0)  # word-start expert
    ngram_within_boost: float = tg._hp(0.75, lo=0.0, hi=20.0)  # within-word expert
    ngram_word_boost: float = tg._hp(0.75, lo=0.0, hi=20.0)  # word-start expert
    ngram_agree_boost: float = tg._hp(0.5, lo=0.0, hi=20.0)  # added when two gated experts agree
    # Optional: the model mixed with the adaptive cache (orders 2..7).
    ngram_cache: bool = tg._hp(False)  # also score the cache mixture
    ngram_cache_weight: float = tg._hp(0.3, lo=0.0, hi=1.0)  # cache weight = this x normalized entropy
    # Optional: the tilt on top of score-first test-time training (docs/ttt.md, the TTT_* settings).
    ngram_ttt: bool = tg._hp(False)  # score with TTT's distributions instead of the sliding window's

    @classmethod
    def from_env(cls, env) -> "NgramSettings":
        names = {f.name.upper() for f in dataclasses.fields(cls)}
        tg.check_unknown_settings(env, names | {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)})
        try:
            settings = cls(**{f.name: tg._parse_env_value(f.name.upper(), env[f.name.upper()], f.default, f.metadata)
                              for f in dataclasses.fields(cls) if f.name.upper() in env})
        except ValueError as e:
            raise tg.SettingError(str(e)) from None
        if not settings.artifact_path:
            raise tg.SettingError("ARTIFACT_PATH is not set: point it at the .ptz a training run wrote "
                                  "(OUT_DIR/RUN_ID.ptz)")
        return settings

    def tilt(self, h: tg.EvalSettings) -> ng.TiltConfig:
        return ng.TiltConfig(
            (h.ngram_token_threshold, self.ngram_within_threshold, self.ngram_word_threshold),
            (h.ngram_token_boost, self.ngram_within_boost, self.ngram_word_boost), self.ngram_agree_boost)


TOKEN_EXPERT_SETTINGS = ("ngram_token_threshold", "ngram_token_boost")  # defined in train_gpt.EvalSettings

# Running sums over the scored positions (float64, all-reduced across ranks).
SUMS = ("plain_nats", "tilted_nats", "cache_nats", "tokens", "bytes", *(f"fired_{e}" for e in ng.EXPERTS),
        "agreed")


def load_model(cfg: tg.ModelConfig, state: dict, h: tg.Hyperparameters, rt: tg.Runtime, log):
    """(the artifact's model, its logits function, whether that is compiled). With NGRAM_TTT=1 the model
    itself is what scores (it adapts), compiled later by train_gpt.compile_ttt_forward."""
    model = tg.build_model(cfg, rt.device, log)
    model.load_state_dict(state)
    model.eval()
    if rt.device.type == "cuda" and h.compile:
        return model, torch.compile(model.logits, dynamic=False), True
    return model, model.logits, False


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
def warm_up(logits_fn, spec: tg.EvalSpec, rt: tg.Runtime) -> None:
    """Compile on zeros of the scoring batch's shape: never on validation tokens."""
    x = torch.zeros((spec.batch_windows, spec.seq_len), dtype=torch.long, device=rt.device)
    with rt.autocast():
        logits_fn(x)
    rt.sync()


class Experts(NamedTuple):
    """The n-gram experts' proposals for every validation position, on the device: hint and conf
    [experts, tokens], the cache's probability of each target (or None) and the piece masks."""
    hint: Tensor
    conf: Tensor
    cache_p: Tensor | None
    masks: object


def score(run_pass: Callable, luts: tg.ByteLUTs, counter: tg.ByteCounter, experts: Experts, s: NgramSettings,
          h: tg.EvalSettings) -> dict[str, float]:
    """Plain, tilted (and cache-mixed) nats, summed over this rank's windows or TTT's documents, and the bytes
    as counter gives them (the byte sidecar when the dataset has one; luts: the pieces' word boundaries):
    run_pass(sums) runs the model's pass with this score callback (tg.score_windows' or tg.ttt_score's) and
    returns the sums over every rank. The hints of a position come from the stream before it, whatever
    order the documents are scored in."""
    tilt = s.tilt(h)

    def sums(logits, x, y, scored, pos):
        logp = torch.log_softmax(logits.float()[scored], dim=-1)  # [S, V]: only the scored rows
        xs, ys, ps = x[scored], y[scored], pos[scored]
        plain = logp.gather(1, ys[:, None])[:, 0]
        hinted, beta, expert, agreed = ng.select_hints(logp, luts.is_boundary[xs], experts.hint[:, ps].long(),
                                                       experts.conf[:, ps], experts.masks, tilt)
        tilted = ng.tilt_logprobs(logp, hinted, beta).gather(1, ys[:, None])[:, 0]
        mixed = plain
        if experts.cache_p is not None:
            mixed = ng.mix_logprobs(plain, experts.cache_p[ps], ng.cache_weight(logp, s.ngram_cache_weight))
        fired = [(expert == e).sum() for e in range(len(ng.EXPERTS))]
        values = [-plain.double().sum(), -tilted.double().sum(), -mixed.double().sum(), scored.sum(),
                  counter.count(xs, ys, ps).sum(), *fired, agreed.sum()]
        return torch.stack([v.double() for v in values])

    return dict(zip(SUMS, run_pass(sums).tolist()))


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
    code = tg.code_form(Path(tg.__file__).read_text(encoding="utf-8"))
    ctx = tg.RunContext(h, rt, tg.RunState(Path(s.artifact_path).stem, h.gptq_reserve_seconds), log, code)
    tg.log_preamble(ctx, env)
    for f in dataclasses.fields(s):
        log(f"ngram_setting {f.name}:{getattr(s, f.name)}")
    for name in TOKEN_EXPERT_SETTINGS:  # train_gpt.py's settings (its own evaluation tilts with them too)
        log(f"ngram_setting {name}:{getattr(h, name)}")

    if not Path(s.artifact_path).is_file():
        raise FileNotFoundError(f"ARTIFACT_PATH={s.artifact_path}: no such file")
    cfg, state = tg.load_artifact(s.artifact_path)
    log("model_from_artifact " + " ".join(f"{k}:{v}" for k, v in dataclasses.asdict(cfg).items()))
    sp = tg.load_tokenizer(h.tokenizer_path)
    tg.check_tokenizer(sp, cfg, h.tokenizer_path)
    luts = tg.build_byte_luts(sp, cfg.vocab_size).to(rt.device)
    tables = ng.build_word_tables(sp, cfg.vocab_size)
    tokens = tg.load_validation_tokens(h.data_path)
    val_tokens = torch.from_numpy(tokens.astype(np.int32)).to(rt.device)
    log(f"data val_tokens:{len(tokens)} tokenizer_pieces:{sp.vocab_size()}")
    counter = tg.validation_byte_counter(luts, sp, h.data_path, cfg.bos_id).to(rt.device)
    log(tg.describe_byte_counter(counter, val_tokens))
    model, logits_fn, compiled = load_model(cfg, state, h, rt, log)
    spec = tg.EvalSpec.sliding(h)
    if s.ngram_ttt:
        tg.log_ttt_budget(cfg, tokens, h, log, windows=False)  # no window pass runs here

    # Rank 0 builds the hints (and the cache's probabilities) while the model compiles: the C call
    # releases the GIL. Every other rank receives them by broadcast instead of rebuilding them.
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        hints_job = pool.submit(ng.hint_pass, tokens, tables) if rt.is_main else None
        cache_job = pool.submit(ng.cache_pass, tokens, cfg.vocab_size) if rt.is_main and s.ngram_cache else None
        if s.ngram_ttt:
            ttt_forward = tg.compile_ttt_forward(model, ctx)
        elif compiled:
            warm_up(logits_fn, spec, rt)
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

    if s.ngram_ttt:
        def run_pass(sums):
            return tg.ttt_score(model, sums, val_tokens, h, rt, ttt_forward, log)
    else:
        def run_pass(sums):
            return tg.score_windows(lambda x, y: logits_fn(x), sums, val_tokens, spec, rt, phase="ngram_score")
    sums = score(run_pass, luts, counter, Experts(hint, conf, cache_p, ng.piece_masks(tables, rt.device)), s, h)
    rt.sync()
    t3 = time.perf_counter()
    log_results(log, sums, s.ngram_cache)
    log(f"ngram_timing prepare_ms:{1000 * (t1 - t0):.0f} share_ms:{1000 * (t2 - t1):.0f} "
        f"eval_ms:{1000 * (t3 - t2):.0f} total_ms:{1000 * (t3 - t_start):.0f}")
    if rt.is_main:
        check_submission_bytes(Path(s.artifact_path), log)
    return sums


def code_files() -> list[Path]:
    """The code a submission scored with the n-gram tilt must ship: training, and this evaluation."""
    return [Path(tg.__file__), Path(__file__), Path(ng.__file__), ng.SOURCE]


def check_submission_bytes(artifact: Path, log) -> None:
    """A tilted score is a submission whose artifact holds the evaluation code too: log its bytes and
    fail, with both counts, if code plus model reach the cap."""
    # train_gpt.py counts as it ships (its compact wrapper, as in train_gpt.py's own bytes_code); the
    # evaluation files ship as they are.
    files = {p.name: tg.code_form(p.read_bytes()).bytes_code if p.name == "train_gpt.py" else p.stat().st_size
             for p in code_files()}
    code, model = sum(files.values()), artifact.stat().st_size
    log("ngram_artifact " + " ".join(f"{name}:{size}" for name, size in files.items()) +
        f" bytes_code:{code} bytes_model:{model} bytes_total:{code + model} cap:{tg.ARTIFACT_CAP_BYTES}")
    tg.check_artifact_cap(code, model)


MODEL_VARIABLES = frozenset(f.name.upper() for f in dataclasses.fields(tg.ModelConfig))


def main(env=None) -> dict[str, float]:
    env = os.environ if env is None else env
    # The model is the artifact's: its variables (NUM_LAYERS, ...) are neither read nor validated here.
    env = {k: v for k, v in env.items() if k not in MODEL_VARIABLES}
    h = tg.Hyperparameters.from_env(env)
    s = NgramSettings.from_env(env)
    rt = tg.setup_runtime(h, env)
    try:
        return run(h, s, rt, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (tg.SettingError, tg.DataError, FileNotFoundError) as e:  # one line, as train_gpt.py's cli()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
