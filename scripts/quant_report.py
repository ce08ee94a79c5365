"""Quantization measurements for the README: GPTQ against round-to-nearest on a trained model, artifact
bytes per compressor, byte shuffle and storage, and the speed of the 6-bit packing.

    python3 scripts/quant_report.py pack-bench                   # time to pack 27 M values, one core
    python3 scripts/quant_report.py train --out DIR              # train with train_gpt.py's env settings,
                                                                 # keep the float weights and Hessians
    python3 scripts/quant_report.py gptq DIR/float.pt            # float / round-to-nearest / GPTQ bpb
    python3 scripts/quant_report.py sizes --checkpoint DIR/float.pt
    python3 scripts/quant_report.py sizes                        # the default 27 M model, random init

`train` runs train_gpt.main() unchanged (model and data come from the usual variables: DATA_PATH,
TOKENIZER_PATH, NUM_LAYERS, ...) and saves what its quantization step receives: the trained float
weights and the GPTQ Hessians of the training-data calibration. Run with OMP_NUM_THREADS=1 on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    """train_gpt.main() with the current environment; keeps the first quantization call's inputs."""
    captured, real = {}, tg.quantize_state_dict

    def keep_inputs(state, *args, **kwargs):
        if not captured:
            captured["state"] = {k: v.detach().cpu().clone() for k, v in state.items()}
            captured["hessians"] = {k: v.cpu() for k, v in (kwargs.get("hessians") or {}).items()}
        return real(state, *args, **kwargs)

    tg.quantize_state_dict = keep_inputs
    env = dict(os.environ, OUT_DIR=str(out), RUN_ID=os.environ.get("RUN_ID", "quant_report"))
    tg.main(env)
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    captured["env"] = {k: v for k, v in env.items() if k in names}
    torch.save(captured, out / "float.pt")
    print(f"saved {out / 'float.pt'} tensors:{len(captured['state'])} hessians:{len(captured['hessians'])}")


def load_checkpoint(path: Path) -> tuple[dict, tg.Hyperparameters]:
    ckpt = torch.load(path, weights_only=True)
    return ckpt, tg.Hyperparameters.from_env(ckpt["env"])


def val_bpb(state: dict, h: tg.Hyperparameters, val_tokens, luts) -> float:
    """Plain evaluation (non-overlapping windows of TRAIN_SEQ_LEN), the final_roundtrip_exact number."""
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    model.load_state_dict(state)
    _, bpb = tg.evaluate(model.eval(), val_tokens, luts, h.train_seq_len, h.train_seq_len,
                         max(1, h.val_batch_size // h.train_seq_len))
    return bpb


def gptq_report(path: Path) -> None:
    """val_bpb of the float weights, of the embedding alone quantized, of the block matrices alone at
    8, 6 and 5 bits (round-to-nearest, then GPTQ), and of the run's own plan (both together)."""
    ckpt, h = load_checkpoint(path)
    state, hessians = ckpt["state"], ckpt["hessians"]
    val_tokens = torch.from_numpy(tg.load_validation_tokens(h.data_path).astype(np.int32))
    luts = tg.build_byte_luts(tg.load_tokenizer(h.tokenizer_path), h.vocab_size)
    print(f"model params:{sum(t.numel() for t in state.values())} layers:{h.num_layers} dim:{h.model_dim} "
          f"val_tokens:{len(val_tokens)} hessians:{len(hessians)} min_numel:{h.quant_min_numel}")
    float_bpb = val_bpb(state, h, val_tokens, luts)
    print(f"| weights | val_bpb | gap to float |\n|---|---|---|\n| float | {float_bpb:.5f} | |", flush=True)

    def row(label: str, bits: int, embed_bits: int, hs: dict | None) -> None:
        plan = tg.build_quant_plan(state, bits=bits, embed_bits=embed_bits, min_numel=h.quant_min_numel)
        t0 = time.perf_counter()
        packed = tg.quantize_state_dict(state, plan=plan, hessians=hs, damp=h.gptq_damp, block=h.gptq_block)
        seconds = time.perf_counter() - t0
        bpb = val_bpb(tg.dequantize_state_dict(packed), h, val_tokens, luts)
        print(f"| {label} ({seconds:.1f} s) | {bpb:.5f} | {bpb - float_bpb:+.5f} |", flush=True)

    row(f"embedding int{h.quant_embed_bits} alone, round-to-nearest", tg.FP16_BITS, h.quant_embed_bits, None)
    for bits in (8, 6, 5):
        row(f"blocks int{bits} alone, round-to-nearest", bits, tg.FP16_BITS, None)
        row(f"blocks int{bits} alone, GPTQ", bits, tg.FP16_BITS, hessians)
    row(f"run plan: embedding int{h.quant_embed_bits} + blocks int{h.quant_bits} GPTQ", h.quant_bits,
        h.quant_embed_bits, hessians)


def random_default_state() -> tuple[dict, tg.Hyperparameters]:
    """The default (record-size) model at random init. Its output projections start at zero, which
    would compress to nothing, so every all-zero matrix is filled like its neighbours (N(0, 1/cols))."""
    h = tg.Hyperparameters()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=p.size(1) ** -0.5)
    return model.state_dict(), h


def sizes_report(checkpoint: Path | None) -> None:
    if checkpoint is None:
        (state, h), hessians, what = random_default_state(), {}, "random init (zero-init matrices filled)"
    else:
        ckpt, h = load_checkpoint(checkpoint)
        state, hessians, what = ckpt["state"], ckpt["hessians"], f"trained ({checkpoint})"
    plan = tg.plan_from_hparams(state, h)
    packed = tg.quantize_state_dict(state, plan=plan, hessians=hessians, damp=h.gptq_damp, block=h.gptq_block)
    params = sum(t.numel() for t in state.values())
    print(f"model {what} params:{params} quantization:{'GPTQ' if hessians else 'round-to-nearest'} "
          f"plan:{sorted(set(plan.values()))}")
    print("| storage | byte shuffle | codec | bytes | bits/param | seconds |\n|---|---|---|---|---|---|")
    for storage in ("byte", "packed6"):
        for shuffle in (False, True):
            for codec in tg.CODEC_IDS:
                t0 = time.perf_counter()
                blob = tg.serialize_artifact(packed, compressor=codec, shuffle=shuffle, storage=storage)
                print(f"| {storage} | {int(shuffle)} | {codec} | {len(blob):,} | {8 * len(blob) / params:.4f} | "
                      f"{time.perf_counter() - t0:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("pack-bench", help="time pack6/unpack6")
    bench.add_argument("--values", type=int, default=PACK_BENCH_VALUES)
    sub.add_parser("train", help="train with train_gpt.py, keep float weights + Hessians").add_argument(
        "--out", type=Path, required=True)
    sub.add_parser("gptq", help="float vs round-to-nearest vs GPTQ bpb").add_argument("checkpoint", type=Path)
    sub.add_parser("sizes", help="bytes per storage, shuffle and codec").add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    if args.command == "pack-bench":
        pack_bench(args.values)
    elif args.command == "train":
        train(args.out)
    elif args.command == "gptq":
        gptq_report(args.checkpoint)
    else:
        sizes_report(args.checkpoint)


if __name__ == "__main__":
    main()
