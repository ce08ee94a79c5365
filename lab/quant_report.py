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
    python3 lab/quant_report.py codecs --checkpoint DIR/float.pt  # per-group bytes and seconds per codec
    python3 lab/quant_report.py code-bytes                   # the shipped code: minifier, codec, embedding
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
            for codec in tg.installed_codecs():
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


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def codecs_report(checkpoint: Path | None, codecs: list[str]) -> None:
    """Per-group compression codec by codec, on a checkpoint quantized like its run (or the default model
    at random init): for every group (and the stream of everything else) its bytes, compression and
    decompression seconds under each codec (best layout for that codec; one thread, one stream at a
    time), then the model bytes under each choice: one stream per codec, per-group streams all in one
    codec, and COMPRESSOR=auto as a run does it (threads), with and without zpaq."""
    if checkpoint is None:
        state, h, _ = random_default_state()
        hessians, fp16_names, what = {}, build_model(h).fp16_param_names(), "random init"
    else:
        ckpt, h = load_checkpoint(checkpoint)
        state, model = ckpt["state"], build_model(h)
        fp16_names, what = model.fp16_param_names(), str(checkpoint)
        hessians = complete_hessians(model, state, ckpt["hessians"], ckpt["plan"], h)
    packed = quantize_like_a_run(state, hessians, fp16_names, h)
    manifest, data = tg.encode_payload(packed, h.quant_storage)
    if h.byte_shuffle:
        data = data[:manifest["levels_bytes"]] + tg.byte_shuffle(data[manifest["levels_bytes"]:])
    params = sum(t.numel() for t in state.values())
    print(f"model {what} params:{params} raw_bytes:{len(data)} codecs:{','.join(codecs)} "
          f"torch_threads:{torch.get_num_threads()}")
    groups = tg.level_groups(manifest)
    roles = tg.parse_roles(h.pergroup_sort)
    streams = {}  # (group, layout) -> raw streams
    for role, items in groups.items():
        levels = [np.frombuffer(data, np.int8, math.prod(it["shape"]), it["parts"]["q"][0]).reshape(it["rows"], -1)
                  for it in items]
        for layout, raws in tg.group_layouts(levels, role in roles).items():
            streams[role, layout] = raws
    grouped = [it for its in groups.values() for it in its]
    rest = b"".join(data[a:b] for a, b in tg.outside_levels(len(data), grouped))
    streams["(manifest, scales, fp16)", "rows"] = [tg.manifest_bytes(dict(manifest, groups=[])) + rest]
    # (group, layout, codec) -> (bytes, compress s, decompress s), each stream checked to decode exactly
    result = {}
    for (group, layout), raws in streams.items():
        for codec in codecs:
            _, compress, decompress = tg.CODECS[tg.CODEC_IDS[codec]]
            size = tc = td = 0.0
            for raw in raws:
                body, dt = timed(compress, raw)
                try:
                    back, dd = timed(decompress, body)
                except Exception as e:  # noqa: BLE001 (a codec that fails to decode is a finding)
                    back, dd = repr(e), 0.0
                if back != raw:
                    print(f"DECODE FAILURE: {codec} on {group} {layout}: {str(back)[:80]}", flush=True)
                size, tc, td = size + len(body), tc + dt, td + dd
            result[group, layout, codec] = (int(size), tc, td)
            print(f"  ({group} {layout} {codec}: {int(size)} {tc:.1f}s {td:.1f}s)", file=sys.stderr, flush=True)
    names = list(dict.fromkeys(g for g, _ in streams))
    print(f"| group | raw bytes | {' | '.join(codecs)} | smallest |\n|---|---|{'---|' * (len(codecs) + 1)}")
    best_of = {}
    for g in names:
        layouts = [lay for gg, lay in streams if gg == g]
        cells, sizes = [], {}
        for codec in codecs:
            lay = min(layouts, key=lambda x: result[g, x, codec][0])
            size, tc, td = result[g, lay, codec]
            sizes[codec] = (size, lay)
            cells.append(f"{size:,} ({lay}, {tc:.1f} / {td:.1f} s)")
        best_of[g] = sizes
        raw = sum(len(r) for r in streams[g, "rows"])
        smallest = min(sizes, key=lambda c: sizes[c][0])
        print(f"| {g} | {raw:,} | {' | '.join(cells)} | {smallest} |")
    print("\n| choice | bytes_model | vs brotli one stream | compress s | decompress s |\n|---|---|---|---|---|")
    single = {}
    for codec in codecs:
        payload = tg.manifest_bytes(manifest) + data
        _, compress, decompress = tg.CODECS[tg.CODEC_IDS[codec]]
        body, tc = timed(compress, payload)
        _, td = timed(decompress, body)
        single[codec] = (len(body), tc, td)
    base = single.get("brotli", next(iter(single.values())))[0]
    rows = [(f"one stream, {c}", *single[c]) for c in codecs]

    def pergroup(allowed: list[str]) -> tuple[int, float, float]:
        size = tc = td = 0.0
        for g in names:
            codec = min(allowed, key=lambda c: best_of[g][c][0])
            s_, c_, d_ = result[g, best_of[g][codec][1], codec]
            size, tc, td = size + s_, tc + c_, td + d_
        return int(size), tc, td

    rows += [(f"per-group, {c} only", *pergroup([c])) for c in codecs]
    if "lrzip" in codecs:
        rows.append((f"per-group, smallest of {', '.join(codecs)}", *pergroup(codecs)))
    for label, hide in (("COMPRESSOR=auto (zstd, lzma, brotli; zpaq on the chosen layouts)", False),
                        ("COMPRESSOR=auto without zpaq (before this change)", True)):
        saved = sys.modules.get("zpaq")
        if hide:
            sys.modules["zpaq"] = None  # import fails: auto goes on without it
        try:
            blob, tc = timed(lambda: tg.serialize_artifact(packed, compressor="auto", shuffle=h.byte_shuffle,
                                                           storage=h.quant_storage, sort_roles=h.pergroup_sort))
            _, td = timed(tg.deserialize_artifact, blob)
        finally:
            sys.modules["zpaq"] = saved
        rows.append((label + ", threads", len(blob) - tg._ARTIFACT_HEADER.size, tc, td))
    for label, size, tc, td in rows:
        print(f"| {label} | {size:,} | {size - base:+,} ({(size - base) / base:+.1%}) | {tc:.1f} | {td:.1f} |")
    print("(per-group rows: the groups' compressed streams plus the stream of everything else, without the "
          "stream table; seconds: one thread, summed over the streams; auto rows: the artifact less its header, "
          "wall seconds with the run's threads)")


# python-minifier settings compared for the shipped code (COMPACT_MINIFY is the smallest)
MINIFY_VARIANTS = {
    "none (the source as it is)": None,
    "python-minifier defaults": {},
    "+ remove docstrings (remove_literal_statements)": {"remove_literal_statements": True},
    "+ no literal hoisting": {"remove_literal_statements": True, "hoist_literals": False},
    "+ rename globals": {"remove_literal_statements": True, "rename_globals": True},
    "+ rename globals, no hoisting (Muon kept: COMPACT_MINIFY)": tg.COMPACT_MINIFY,
}


def section_costs(source: str, program: str, compressed: int) -> None:
    """What each section of the readable source costs in the compact file: its functions and classes
    cut from the minified program (which keeps them in the same order), the ZPAQ bytes that saves."""
    import ast
    import re

    import zpaq
    lines, heads = source.splitlines(), []
    for i, line in enumerate(lines):
        if m := re.match(r"^# ---- (.+?) -+$", line):
            heads.append((i + 1, m[1]))
        elif re.match(r"^# -{90,}$", line) and i + 2 < len(lines) and re.match(r"^# -{90,}$", lines[i + 2]):
            heads.append((i + 2, lines[i + 1][2:].strip().upper()))
    defs = [[n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            for text in (source, program)]
    if len(defs[0]) != len(defs[1]):  # the names differ (renamed), their order does not
        raise SystemExit("the minified program's definitions do not follow the source's")
    cut: dict[str, list[tuple[int, int]]] = {}
    for readable, minified in zip(*defs):
        section = next((h for start, h in reversed(heads) if start <= readable.lineno), "(top)")
        first = (minified.decorator_list[0] if minified.decorator_list else minified).lineno - 1
        cut.setdefault(section, []).append((first, minified.end_lineno))
    program_lines = program.splitlines(keepends=True)
    print("| section | definitions | minified chars | compact bytes it costs |\n|---|---|---|---|")
    for section, spans in cut.items():
        gone = {i for a, b in spans for i in range(a, b)}
        rest = "".join(line for i, line in enumerate(program_lines) if i not in gone).encode()
        chars = sum(len(program_lines[i]) for i in gone)
        saved = compressed - len(zpaq.compress(rest, level=tg.ZPAQ_LEVEL))
        print(f"| {section} | {len(spans)} | {chars:,} | {saved:,} |", flush=True)


def code_bytes_report(path: Path) -> None:
    """The shipped code's bytes by minifier setting and codec, and by how the compressed bytes sit in a
    Python file (base85 text, or the latin-1 literal that compact_code writes)."""
    import base64
    import lzma

    import brotli
    import zpaq
    source = path.read_text(encoding="utf-8")
    print(f"{path}: {len(source.encode()):,} bytes, compact file {len(tg.compact_code(source.encode())):,} bytes")
    raw_lzma = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0,
                 "nice_len": 273}]
    codecs = {"brotli q11 w24": lambda b: brotli.compress(b, quality=11, lgwin=24),
              "lzma 9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
              "lzma raw lc3 lp0 pb0": lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=raw_lzma),
              "zstd 22": tg.CODECS[tg.CODEC_IDS["zstd"]][1],
              "ZPAQ 4": lambda b: zpaq.compress(b, level=4), "ZPAQ 5": lambda b: zpaq.compress(b, level=5)}
    print(f"| minifier | program bytes | {' | '.join(codecs)} |\n|---|---|{'---|' * len(codecs)}")
    chosen = b""
    for label, options in MINIFY_VARIANTS.items():
        program = (source if options is None else tg.optional_module(*tg.MINIFIER_NEEDS).minify(source, **options))
        program = program.encode("utf-8")
        print(f"| {label} | {len(program):,} | " + " | ".join(f"{len(c(program)):,}" for c in codecs.values()) + " |",
              flush=True)
        chosen = program
    blob = zpaq.compress(chosen, level=tg.ZPAQ_LEVEL)
    latin1 = len(tg.latin1_literal(blob).encode("latin-1"))
    print(f"\nembedding {len(blob):,} compressed bytes: base85 {len(base64.b85encode(blob)):,} "
          f"(+{len(base64.b85encode(blob)) / len(blob) - 1:.1%}), latin-1 literal {latin1:,} "
          f"(+{latin1 / len(blob) - 1:.1%}); the wrapper's own lines: "
          f"{len(tg.COMPACT_WRAPPER.format(sha='0' * 64, blob='').encode())} bytes\n")
    section_costs(source, chosen.decode("utf-8"), len(blob))


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
    codec = sub.add_parser("codecs", help="per-group bytes and seconds of every codec (and lrzip)")
    codec.add_argument("--checkpoint", type=Path, help="default: the default model at random init")
    codec.add_argument("--codec", action="append", default=[],
                       help="codecs to measure (default: every installed one, lrzip too)")
    code = sub.add_parser("code-bytes", help="the shipped code's bytes by minifier setting, codec and embedding")
    code.add_argument("source", type=Path, nargs="?", default=Path(tg.__file__))
    args = parser.parse_args()
    if args.command == "code-bytes":
        code_bytes_report(args.source)
    elif args.command == "codecs":
        codecs_report(args.checkpoint, args.codec or [c for c in tg.CODEC_IDS if tg.codec_missing(c) is None])
    elif args.command == "pack-bench":
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
