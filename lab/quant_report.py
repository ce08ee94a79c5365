"""Quantization measurements for the README: GPTQ against round-to-nearest on a trained model, artifact
bytes per compressor, byte shuffle and storage, and the speed of the 6-bit packing.

    python3 lab/quant_report.py pack-bench                   # time to pack 27 M values, one core
    python3 lab/quant_report.py train --out DIR              # train with train_gpt.py's env settings,
                                                                 # keep the float weights and Hessians
    python3 lab/quant_report.py gptq DIR/float.pt            # float / round-to-nearest / GPTQ bpb
    python3 lab/quant_report.py sizes --checkpoint DIR/float.pt
    python3 lab/quant_report.py sizes                        # the default 27 M model, random init
    python3 lab/quant_report.py frontier DIR/float.pt        # SDClip, int7, LQER, per-group: bpb, bytes
    python3 lab/quant_report.py sizes --frontier             # their bytes on the default 27 M model
    PRESET=april python3 lab/quant_report.py sizes --frontier  # ... on the April model (36 M)

`train` runs train_gpt.main() unchanged (model and data come from the usual variables: DATA_PATH,
TOKENIZER_PATH, NUM_LAYERS, ...) and saves what its quantization step receives: the trained float
weights and the GPTQ Hessians of the training-data calibration. Run with OMP_NUM_THREADS=1 on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

PACK_BENCH_VALUES = 27_000_000  # about the record model's parameter count


def pack_bench(values: int) -> None:
    levels = np.random.default_rng(0).integers(-31, 32, values).astype(np.int8)
    t0 = time.perf_counter()
    packed = tg.pack6(levels)
    t1 = time.perf_counter()
    restored = tg.unpack6(packed, values)
    t2 = time.perf_counter()
    assert np.array_equal(restored, levels)
    print(f"pack6 values:{values} bytes:{len(packed)} pack_ms:{1000 * (t1 - t0):.0f} "
          f"unpack_ms:{1000 * (t2 - t1):.0f} torch_threads:{torch.get_num_threads()}")


def train(out: Path) -> None:
    """train_gpt.main() with the current environment; keeps what its quantization step receives."""
    captured = {}

    def keep_inputs(inputs: tg.ExportInputs) -> None:
        captured["state"] = {k: v.detach().cpu().clone() for k, v in inputs.state.items()}
        captured["hessians"] = {k: v.cpu() for k, v in inputs.hessians.items()}
        captured["plan"] = dict(inputs.plan)

    env = dict(os.environ, OUT_DIR=str(out), RUN_ID=os.environ.get("RUN_ID", "quant_report"))
    tg.main(env, export_hook=keep_inputs)
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    captured["env"] = {k: v for k, v in env.items() if k in names}
    torch.save(captured, out / "float.pt")
    print(f"saved {out / 'float.pt'} tensors:{len(captured['state'])} hessians:{len(captured['hessians'])}")


def gptq_only(h: tg.Hyperparameters) -> tg.QuantSettings:
    """GPTQ with the run's damping and block, every other quantizer setting at its default (the
    percentile clip, no LQER): the baseline the reports compare against."""
    return tg.QuantSettings(gptq_damp=h.gptq_damp, gptq_block=h.gptq_block)


def load_checkpoint(path: Path) -> tuple[dict, tg.Hyperparameters]:
    ckpt = torch.load(path, weights_only=True)
    return ckpt, tg.Hyperparameters.from_env(ckpt["env"])


def build_model(h: tg.Hyperparameters) -> tg.GPT:
    return tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu")).eval()


def val_bpb(model: tg.GPT, state: dict, h: tg.Hyperparameters, val_tokens, luts) -> float:
    """Plain evaluation (non-overlapping windows of TRAIN_SEQ_LEN), the final_roundtrip_exact number."""
    model.load_state_dict(state)
    _, bpb = tg.evaluate(model, val_tokens, luts, tg.EvalSpec.plain(h), tg.Runtime.single())
    return bpb


def complete_hessians(model: tg.GPT, state: dict, hessians: dict, plan: dict[str, int],
                      h: tg.Hyperparameters) -> dict:
    """The checkpoint's Hessians plus those of quantized weights it lacks (a checkpoint from before a
    Hessian site existed, e.g. the tied embedding's), by the run's own calibration on training data."""
    missing = {n for n, b in plan.items() if b != tg.FP16_BITS} & tg.hessian_sites(model).keys() - hessians.keys()
    if not missing:
        return hessians
    model.load_state_dict(state)
    rt = tg.Runtime(0, 1, torch.device("cpu"), tg.grad_accum_steps(1), contextlib.nullcontext, torch.float32)
    print(f"hessians computed here (missing from the checkpoint): {', '.join(sorted(missing))}")
    return hessians | tg.calibrate(model, {n: plan[n] if n in missing else tg.FP16_BITS for n in plan}, h, rt)


def val_gradient(model: tg.GPT, state: dict, h: tg.Hyperparameters, val_tokens, luts) -> dict[str, torch.Tensor]:
    """d(val_bpb)/dw at the float weights, over the plain evaluation's windows. A model that is not at a
    minimum of the validation loss has g != 0, so a quantization error e moves the bpb by about g.e
    (first order, sign by luck) on top of the curvature term that GPTQ minimizes: reported apart."""
    model.load_state_dict(state)
    model.zero_grad()
    total_bytes = 0.0
    for x, y, scored, _ in tg.eval_batches(val_tokens, tg.EvalSpec.plain(h)):
        model(x, y)[scored].sum().backward()
        total_bytes += float(luts.token_bytes(x, y)[scored].sum())
    grads = {n: p.grad.detach() / math.log(2) / total_bytes for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad()
    return grads


def gptq_report(path: Path, breakdown_bits: int) -> None:
    """val_bpb of the float weights, of the tied embedding alone quantized, of the block matrices alone
    at 8, 6 and 5 bits, of the run's own plan (both together), each by round-to-nearest and by GPTQ,
    then of each block's matrices alone at breakdown_bits. Every row also gives the first-order part of
    its gap, g.e (val_gradient), and the rest, which is what GPTQ's objective stands for."""
    ckpt, h = load_checkpoint(path)
    state = ckpt["state"]
    sp = tg.load_tokenizer(h.tokenizer_path)
    tg.check_tokenizer(sp, h, h.tokenizer_path)
    model = build_model(h)
    val_tokens = torch.from_numpy(tg.load_validation_tokens(h.data_path).astype(np.int32))
    luts = tg.build_byte_luts(sp, h.vocab_size)
    hessians = complete_hessians(model, state, ckpt["hessians"], ckpt["plan"], h)
    print(f"model params:{sum(t.numel() for t in state.values())} layers:{h.num_layers} dim:{h.model_dim} "
          f"val_tokens:{len(val_tokens)} hessians:{len(hessians)} min_numel:{h.quant_min_numel}")
    grads = val_gradient(model, state, h, val_tokens, luts)
    float_bpb = val_bpb(model, state, h, val_tokens, luts)
    print("| weights | method | val_bpb | gap | first order g.e | gap - g.e |\n|---|---|---|---|---|---|\n"
          f"| float | | {float_bpb:.5f} | | | |", flush=True)

    def row(label: str, plan: dict[str, int]) -> None:
        for method, hs in (("round-to-nearest", None), ("GPTQ", hessians)):
            packed = tg.quantize_state_dict(state, plan=plan, hessians=hs, q=gptq_only(h))
            weights = tg.dequantize_state_dict(packed)
            bpb = val_bpb(model, weights, h, val_tokens, luts)
            first = sum(float((grads[n] * (weights[n].float() - state[n].float())).sum())
                        for n, b in plan.items() if b != tg.FP16_BITS and n in grads)
            gap = bpb - float_bpb
            print(f"| {label} | {method} | {bpb:.5f} | {gap:+.5f} | {first:+.5f} | {gap - first:+.5f} |", flush=True)

    def plan(bits: int, embed_bits: int) -> dict[str, int]:
        return tg.build_quant_plan(state, model.fp16_param_names(), bits, embed_bits, h.quant_min_numel)

    row(f"embedding int{h.quant_embed_bits} alone", plan(tg.FP16_BITS, h.quant_embed_bits))
    for bits in (8, 6, 5):
        row(f"blocks int{bits} alone", plan(bits, tg.FP16_BITS))
    row("the run's plan", ckpt["plan"])
    # Where the gap comes from: one group of matrices at a time (each block, then the rest).
    blocks_plan = plan(breakdown_bits, tg.FP16_BITS)
    for group in sorted({group_of(n) for n, b in blocks_plan.items() if b != tg.FP16_BITS}):
        row(f"{group} alone, int{breakdown_bits}",
            {n: b if group_of(n) == group else tg.FP16_BITS for n, b in blocks_plan.items()})


def group_of(name: str) -> str:
    """"blocks.3" for the tensors of block 3, "other matrices" for the rest (bigram projection, ...)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else "other matrices"


def random_default_state() -> tuple[dict, tg.Hyperparameters, dict[str, int]]:
    """The model of the environment's settings (the default, record-size one when none is set; PRESET=april
    for the April model) at random init and its plan. Its output projections start at zero, which would
    compress to nothing, so every all-zero matrix is filled like its neighbours (N(0, 1/cols))."""
    h = tg.Hyperparameters.from_env()
    torch.manual_seed(0)
    model = build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=p.size(1) ** -0.5)
    state = model.state_dict()
    return state, h, tg.plan_from_hparams(state, h, model.fp16_param_names())


def sizes_report(checkpoint: Path | None) -> None:
    if checkpoint is None:
        (state, h, plan), hessians, what = random_default_state(), {}, "random init (zero-init matrices filled)"
    else:
        ckpt, h = load_checkpoint(checkpoint)
        state, plan, what = ckpt["state"], ckpt["plan"], f"trained ({checkpoint})"
        model = build_model(h)
        hessians = complete_hessians(model, state, ckpt["hessians"], plan, h)
    packed = tg.quantize_state_dict(state, plan=plan, hessians=hessians, q=gptq_only(h))
    params = sum(t.numel() for t in state.values())
    bits = {}
    for name, b in plan.items():
        bits[b] = bits.get(b, 0) + state[name].numel()
    print(f"model {what} params:{params} quantization:{'GPTQ' if hessians else 'round-to-nearest'} "
          f"params_by_bits:{dict(sorted(bits.items()))}")
    print("| storage | byte shuffle | codec | bytes | bits/param | seconds |\n|---|---|---|---|---|---|")
    for storage in ("byte", "packed6"):
        for shuffle in (False, True):
            for codec in tg.CODEC_IDS:
                t0 = time.perf_counter()
                blob = tg.serialize_artifact(packed, compressor=codec, shuffle=shuffle, storage=storage)
                print(f"| {storage} | {int(shuffle)} | {codec} | {len(blob):,} | {8 * len(blob) / params:.4f} | "
                      f"{time.perf_counter() - t0:.1f} |", flush=True)


# Each variant: Hyperparameters fields changed from TODAY, the checkpoint's run with the frontier's
# additions off (whatever the defaults), so that each row measures its additions alone.
TODAY = {"clip_method": "percentile", "quant_embed_bits": 8, "lqer_top": 0}
FRONTIER_VARIANTS = {
    "GPTQ + percentile clip (today)": {},
    "blocks int5 (bytes reference)": {"quant_bits": 5},
    "SDClip": {"clip_method": "sdclip"},
    "SDClip, Hessian-aware": {"clip_method": "sdclip_hessian"},
    "int7 embedding": {"quant_embed_bits": 7},
    "LQER, largest error": {"lqer_top": 3, "lqer_select": "error"},
    "LQER, largest output gain": {"lqer_top": 3, "lqer_select": "hessian"},
    "SDClip + int7 + LQER-H": {"clip_method": "sdclip", "quant_embed_bits": 7, "lqer_top": 3, "lqer_select": "hessian"},
    "SDClip-H + int7 + LQER-H": {"clip_method": "sdclip_hessian", "quant_embed_bits": 7, "lqer_top": 3,
                                    "lqer_select": "hessian"},
    "int7 + LQER-H": {"quant_embed_bits": 7, "lqer_top": 3, "lqer_select": "hessian"},
    "int7 + LQER, largest error": {"quant_embed_bits": 7, "lqer_top": 3, "lqer_select": "error"},
    "blocks int7 + SDClip": {"quant_bits": 7, "clip_method": "sdclip"},
}


def parse_variant(text: str) -> tuple[str, dict]:
    """"label:FIELD=value,FIELD=value" (Hyperparameters field or env names) -> (label, overrides)."""
    label, _, spec = text.partition(":")
    fields = {f.name: f for f in dataclasses.fields(tg.Hyperparameters)}
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.strip().lower() not in fields:
            raise ValueError(f"--variant {text!r}: {key.strip()} is not a train_gpt.py hyperparameter")
        f = fields[key.strip().lower()]
        overrides[f.name] = tg._parse_env_value(f.name.upper(), value.strip(), f.default, f.metadata)
    return label, overrides


def quantize_like_a_run(state: dict, hessians: dict, fp16_names, h: tg.Hyperparameters) -> dict:
    """What export_model would store for these weights and Hessians (no byte-target fitting)."""
    plan = tg.plan_from_hparams(state, h, fp16_names)
    quiet = lambda *_: None  # noqa: E731
    packed = tg.quantize_state_dict(state, plan=plan, hessians=hessians if tg.calibrates(h) else {}, q=h, log=quiet)
    return tg.add_lqer(packed, state, h, quiet, hessians)


def variant_encoder(state: dict, hessians: dict, fp16_names, h: tg.Hyperparameters, overrides: dict):
    """A frontier variant quantized like a run (TODAY's quantizer plus its overrides) -> its
    encode(compressor=...), which returns the artifact's bytes."""
    hv = dataclasses.replace(h, **(TODAY | overrides))
    packed = quantize_like_a_run(state, hessians, fp16_names, hv)
    return functools.partial(tg.serialize_artifact, packed, shuffle=hv.byte_shuffle, storage=hv.quant_storage,
                             sort_roles=hv.pergroup_sort)


def frontier_report(path: Path, extra: list[str], only: list[str]) -> None:
    """val_bpb and bytes of each FRONTIER_VARIANTS entry (and --variant ones) on a trained checkpoint:
    gap to the float weights, its first-order part g.e, the artifact bytes with the best single-stream
    codec and with per-group compression, bits per parameter."""
    ckpt, h = load_checkpoint(path)
    state = ckpt["state"]
    sp = tg.load_tokenizer(h.tokenizer_path)
    model = build_model(h)
    fp16_names = model.fp16_param_names()
    val_tokens = torch.from_numpy(tg.load_validation_tokens(h.data_path).astype(np.int32))
    luts = tg.build_byte_luts(sp, h.vocab_size)
    hessians = complete_hessians(model, state, ckpt["hessians"], ckpt["plan"], h)
    params = sum(t.numel() for t in state.values())
    grads = val_gradient(model, state, h, val_tokens, luts)
    float_bpb = val_bpb(model, state, h, val_tokens, luts)
    print(f"model params:{params} layers:{h.num_layers} dim:{h.model_dim} val_tokens:{len(val_tokens)} "
          f"float_bpb:{float_bpb:.5f} run settings: gptq:{int(h.gptq)} bits:{h.quant_bits} "
          f"embed_bits:{h.quant_embed_bits} min_numel:{h.quant_min_numel}")
    print("| variant | val_bpb | gap | g.e | gap - g.e | bytes, best codec | bytes, per-group | bits/param |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    variants = dict(FRONTIER_VARIANTS) | dict(parse_variant(v) for v in extra)
    for label, overrides in variants.items():
        if only and label not in only and not any(label.startswith(o) for o in only):
            continue
        t0 = time.perf_counter()
        encode = variant_encoder(state, hessians, fp16_names, h, overrides)
        single = min((encode(compressor=c) for c in tg.CODEC_IDS), key=len)
        grouped = encode(compressor="pergroup")
        weights = tg.dequantize_state_dict(tg.deserialize_artifact(single)[1])
        assert all(torch.equal(weights[n], w) for n, w in tg.dequantize_state_dict(
            tg.deserialize_artifact(grouped)[1]).items())
        bpb = val_bpb(model, weights, h, val_tokens, luts)
        first = sum(float((grads[n] * (weights[n].float() - state[n].float())).sum()) for n in grads)
        gap = bpb - float_bpb
        print(f"| {label} | {bpb:.5f} | {gap:+.5f} | {first:+.5f} | {gap - first:+.5f} | {len(single):,} | "
              f"{len(grouped):,} | {8 * min(len(single), len(grouped)) / params:.4f} |", flush=True)
        print(f"  ({label}: {overrides} {time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def frontier_sizes(checkpoint: Path | None, only: list[str]) -> None:
    """Bytes of each FRONTIER_VARIANTS entry on the default 27 M model at random init (round-to-nearest:
    no Hessians, so sdclip_hessian and LQER's hessian selection fall back as a run without them
    would) or on a checkpoint: brotli (the smallest single-stream codec throughout here) and per-group."""
    if checkpoint is None:
        state, h, _ = random_default_state()
        hessians, fp16_names = {}, build_model(h).fp16_param_names()
    else:
        ckpt, h = load_checkpoint(checkpoint)
        state, model = ckpt["state"], build_model(h)
        fp16_names = model.fp16_param_names()
        hessians = complete_hessians(model, state, ckpt["hessians"], ckpt["plan"], h)
    params = sum(t.numel() for t in state.values())
    print(f"model {'random init' if checkpoint is None else checkpoint} params:{params}")
    print("| variant | bytes, brotli | bytes, per-group | bits/param | seconds |\n|---|---|---|---|---|", flush=True)
    for label, overrides in FRONTIER_VARIANTS.items():
        if only and not any(label.startswith(o) for o in only):
            continue
        t0 = time.perf_counter()
        encode = variant_encoder(state, hessians, fp16_names, h, overrides)
        single, grouped = len(encode(compressor="brotli")), len(encode(compressor="pergroup"))
        print(f"| {label} | {single:,} | {grouped:,} | {8 * min(single, grouped) / params:.4f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("pack-bench", help="time pack6/unpack6")
    bench.add_argument("--values", type=int, default=PACK_BENCH_VALUES)
    sub.add_parser("train", help="train with train_gpt.py, keep float weights + Hessians").add_argument(
        "--out", type=Path, required=True)
    gptq = sub.add_parser("gptq", help="float vs round-to-nearest vs GPTQ bpb")
    gptq.add_argument("checkpoint", type=Path)
    gptq.add_argument("--breakdown-bits", type=int, choices=(5, 6, 8), default=5,
                      help="bits of the per-block rows (int5 shows the largest, clearest gaps)")
    sizes = sub.add_parser("sizes", help="bytes per storage, shuffle and codec")
    sizes.add_argument("--checkpoint", type=Path)
    sizes.add_argument("--frontier", action="store_true", help="bytes of the frontier variants instead")
    sizes.add_argument("--only", action="append", default=[], help="with --frontier: these variants only")
    front = sub.add_parser("frontier", help="SDClip, int7, LQER, per-group compression: bpb and bytes")
    front.add_argument("checkpoint", type=Path)
    front.add_argument("--variant", action="append", default=[],
                       help='extra variant "label:FIELD=value,..." (e.g. "k x1.5:clip_method=sdclip,sdclip_k_mlp=17")')
    front.add_argument("--only", action="append", default=[], help="run only the variants with these labels")
    args = parser.parse_args()
    if args.command == "pack-bench":
        pack_bench(args.values)
    elif args.command == "train":
        train(args.out)
    elif args.command == "gptq":
        gptq_report(args.checkpoint, args.breakdown_bits)
    elif args.command == "frontier":
        frontier_report(args.checkpoint, args.variant, args.only)
    elif args.frontier:
        frontier_sizes(args.checkpoint, args.only)
    else:
        sizes_report(args.checkpoint)


if __name__ == "__main__":
    main()
