"""Whether our evaluation is slower per token than the record scripts' on CPU (issue 28; docs/parity.md): the same
model size, the same tokens, both evaluation loops timed in one process, one after the other, then variants
of ours that each change one thing, and a torch.profiler table of where the time goes.

    OMP_NUM_THREADS=1 python3 lab/eval_speed.py --reference RECORD_0329/train_gpt.py [--tokens 32768]

The reference model is built by the record's own code through lab/parity_benchmark.py's shims (its
Hyperparameters from the same variables the parity benchmark gives it) and evaluated by its own
eval_val_sliding; ours is built by build_model and evaluated by evaluate(). Both models are at their random
init: evaluation time does not depend on the weights' values. The tokens are random ids (no BOS), which
changes nothing either script computes per token.

With the 2026-04-27 record (recognised from its text, as the parity benchmark does), the April comparison's
size instead (parity_benchmark.SIZES["april"]): the record's model at that size (loop on, as it evaluates)
scored by its own eval_val, which attends within documents, against ours with PRESET=april scored by
evaluate(), plain windows; the tokens hold a BOS every APRIL_DOC_TOKENS (the benchmark's documents' mean).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lab"))

import parity_benchmark as pb  # noqa: E402
# ours first: load_record puts the record's folder, with its own train_gpt.py, first on the path
import train_gpt as tg  # noqa: E402

# The March parity benchmark's size (docs/parity.md) and the record's command line at that depth.
SIZE = pb.SIZES["march"]


def set_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def reference_model(script: Path):
    """The record module and its GPT at SIZE, built as its main() builds it (fp32 on CPU through the shims)."""
    set_env({**pb.common_env(SIZE, ROOT, ROOT, 1337), **pb.reference_env(SIZE), "VOCAB_SIZE": "1024"})
    rec = pb.load_record(script)
    a = rec.Hyperparameters()
    model = rec.GPT(vocab_size=a.vocab_size, num_layers=a.num_layers, model_dim=a.model_dim, num_heads=a.num_heads,
                    num_kv_heads=a.num_kv_heads, mlp_mult=a.mlp_mult, tie_embeddings=a.tie_embeddings,
                    tied_embed_init_std=a.tied_embed_init_std, logit_softcap=a.logit_softcap, rope_base=a.rope_base,
                    qk_gain_init=a.qk_gain_init, bigram_vocab_size=a.bigram_vocab_size, bigram_dim=a.bigram_dim,
                    xsa_last_n=a.xsa_last_n, rope_dims=a.rope_dims, ln_scale=a.ln_scale, ve_enabled=a.ve_enabled,
                    ve_dim=a.ve_dim, ve_layers=a.ve_layers, neg_slope=a.negative_slope)
    return rec, a, model.float()


def our_model():
    env = {**pb.common_env(SIZE, ROOT, ROOT, 1337), **pb.ours_env(SIZE), "VOCAB_SIZE": "1024"}
    h = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")})
    return h, tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))


def luts(vocab: int):
    """Byte tables of a made-up vocabulary (2 bytes a piece, a leading space on every other one): the same for
    both loops, and their time does not depend on the values."""
    base = torch.full((vocab,), 2, dtype=torch.int32)
    space = torch.arange(vocab) % 2 == 0
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:4] = True
    return tg.ByteLUTs(base, space, boundary)


APRIL_DOC_TOKENS = 152  # the April benchmark's validation: 32,769 tokens in 216 documents
BOS = 1


def april_models(script: Path):
    """The April record module, its settings and its model at SIZES["april"] (loop on, eval mode), and ours
    with PRESET=april at the same size: as the parity benchmark configures each."""
    size = pb.SIZES["april"]
    # the shape and evaluation settings both share (the April TTT settings play no part here; the April kind
    # would read the vocabulary from a tokenizer, and these tokens are random ids)
    common = pb.common_env(size, ROOT, ROOT, 1337)
    set_env({**common, **pb.reference_env(size, "april"), "VOCAB_SIZE": "1024"})
    rec = pb.load_record(script)
    rec.BOS_ID = BOS  # its loaders set the global; eval_val reads it
    a = rec.Hyperparameters()
    ref = rec.GPT(a).float()
    ref.looping_active = True
    env = {**common, **pb.ours_env(size, "april"), "VOCAB_SIZE": "1024"}
    h = tg.Hyperparameters.from_env({k: v for k, v in env.items()
                                     if k not in ("DATA_PATH", "TOKENIZER_PATH", "OMP_NUM_THREADS")})
    ours = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    return rec, a, ref.eval(), ours.eval(), size


def april_main(args) -> None:
    """Interleaved tries of the record's eval_val and ours' plain evaluate() on the same tokens."""
    import types

    rec, a, ref, ours, size = april_models(args.reference.resolve())
    tokens = torch.randint(2, 1024, (args.tokens + 1,), dtype=torch.int64)
    tokens[::APRIL_DOC_TOKENS] = BOS
    val = types.SimpleNamespace(val_tokens=tokens, val_bytes=torch.ones(len(tokens), dtype=torch.int32),
                                caseops_enabled=True)  # its evaluation counts bytes from the sidecar
    rt, lut, seq = tg.Runtime.single("cpu"), luts(1024), size.seq_len
    rows = [("reference eval_val (plain, within documents), 16 sequences a forward",
             lambda: rec.eval_val(a, torch.device("cpu"), val, ref)),
            ("ours evaluate(plain), 16 sequences a forward",
             lambda: tg.evaluate(ours, tokens.to(torch.int32), lut, tg.EvalSpec("plain", seq, seq, 16), rt))]
    print(f"size: {size}; tokens: {args.tokens}; a BOS every {APRIL_DOC_TOKENS}; threads {torch.get_num_threads()}")
    params = [sum(p.numel() for p in m.parameters()) for m in (ref, ours)]
    print(f"params: reference {params[0]}, ours {params[1]}")
    report(rows, args)


def report(rows, args, profiled=(0, 1)) -> None:
    """Each row's loop args.repeats times, interleaved; the best and every try; with --profile, torch.profiler's
    table of the rows `profiled`."""
    times = {label: [] for label, _ in rows}
    losses = {}
    for _ in range(args.repeats):  # interleaved, so that no row gets the warm caches or a quiet minute alone
        for label, fn in rows:
            with torch.inference_mode() if "inference_mode" in label else contextlib.nullcontext():
                seconds, (losses[label], _) = timed(fn)
            times[label].append(seconds)
    print("| loop | best s | us/token (best) | every try, s | loss |\n|---|---|---|---|---|")
    for label, _ in rows:
        best = min(times[label])
        print(f"| {label} | {best:.2f} | {1e6 * best / args.tokens:.0f} | "
              f"{', '.join(f'{t:.2f}' for t in times[label])} | {losses[label]:.4f} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for label, fn in (rows[i] for i in profiled):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n== {label} ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="the 2026-03-29 or 2026-04-27 record's train_gpt.py")
    p.add_argument("--tokens", type=int, default=32_768, help="validation tokens scored (random ids)")
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="tries of each loop, interleaved; the best is reported")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of each")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    if pb.record_kind(args.reference) == "april":
        april_main(args)
        return
    rec, ra, ref = reference_model(args.reference.resolve())
    h, ours = our_model()
    ref.eval()
    ours.eval()
    tokens = torch.randint(4, 1024, (args.tokens + 1,), dtype=torch.int64)
    lut = luts(1024)
    seq = SIZE.seq_len
    rt = tg.Runtime.single("cpu")  # fp32, one process: what the benchmark's CPU runs use
    print(f"size: {SIZE}; tokens: {args.tokens}; stride {args.stride}; threads {torch.get_num_threads()}")
    print(f"params: reference {sum(p.numel() for p in ref.parameters())}, ours {sum(p.numel() for p in ours.parameters())}")

    def reference_sliding(batch: int = 32):
        return rec.eval_val_sliding(ra, ref, 0, 1, torch.device("cpu"), tokens, lut.base_bytes, lut.has_leading_space,
                                    lut.is_boundary, args.stride, batch_seqs=batch, eval_seq_len=seq)

    def ours_sliding(batch: int = 16, model=None):
        spec = tg.EvalSpec("sliding", seq, args.stride, batch)
        return tg.evaluate(model or ours, tokens.to(torch.int32), lut, spec, rt)

    def reference_plain():  # VAL_BATCH_SIZE 8 x 16 x seq over its 8 micro-batches: 16 sequences a forward
        return rec.eval_val(ra, ref, 0, 1, torch.device("cpu"), 8, tokens, lut.base_bytes, lut.has_leading_space,
                            lut.is_boundary, eval_seq_len=seq)

    def ours_plain():
        return tg.evaluate(ours, tokens.to(torch.int32), lut, tg.EvalSpec("plain", seq, seq, 16), rt)

    rows = [("reference eval_val (plain), 16 sequences a forward", reference_plain),
            ("ours evaluate(plain), 16 sequences a forward", ours_plain),
            ("reference eval_val_sliding, 32 windows a forward (its default)", lambda: reference_sliding(32)),
            ("reference eval_val_sliding, 16 windows a forward", lambda: reference_sliding(16)),
            ("ours evaluate(sliding), 16 windows a forward (the benchmark's VAL_BATCH_SIZE)", lambda: ours_sliding(16)),
            ("ours evaluate(sliding), 32 windows a forward", lambda: ours_sliding(32)),
            ("ours, 32 windows, under inference_mode", lambda: ours_sliding(32))]
    report(rows, args, profiled=(2, 5))  # the two sliding loops at 32 windows a forward


if __name__ == "__main__":
    main()
