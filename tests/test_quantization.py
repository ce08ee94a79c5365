"""Quantization (clip search, int5/6/8, GPTQ against a slow reference), the byte-target rule, storage
(6-bit packing, byte shuffle), the codecs and the self-describing artifact, and a pipeline run that
proves calibration sees training tokens only."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import cpu_runtime, gptq_one, tiny_env
from data.shards import write_shard

# ---- round-to-nearest and the clip search -------------------------------------------------------


def test_clip_search_picks_the_least_error_percentile():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((48, 4000))  # heavy tails: clipping pays in some rows
    q, scale = tg.quantize_rows_rtn(w, 6)
    chosen = []
    for r in range(w.size(0)):  # the obvious version: every percentile, numpy's quantile, pick the best
        row = w[r].double().numpy()
        errs, scales = [], []
        for p in tg.CLIP_PERCENTILES:
            s = np.float16(np.quantile(np.abs(row), p) / 31).astype(np.float64)
            levels = np.clip(np.round(row / s), -31, 31)
            errs.append(((levels * s - row) ** 2).sum())
            scales.append(s)
        best = int(np.argmin(errs))
        chosen.append(best)
        assert scale[r].item() == pytest.approx(scales[best], rel=1e-3)
    assert len(set(chosen)) > 1  # the rows really disagree, so the search is doing something


@pytest.mark.parametrize("bits, top", [(5, 15), (6, 31), (8, 127)])
def test_integer_ranges(bits, top):
    torch.manual_seed(1)
    w = torch.randn(32, 512)
    w[:, 7] = 0.0  # columns of zeros and an all-zero row must not break the scale
    w[3] = 0.0
    q, scale = tg.quantize_rows_rtn(w, bits)
    assert tg.qmax(bits) == top
    assert q.dtype == torch.int8 and int(q.max()) == top and int(q.min()) == -top
    assert scale.dtype == torch.float16 and (scale > 0).all()
    assert not q[3].any()


# ---- GPTQ -------------------------------------------------------------------------------------


def correlated_layer(rows=64, cols=128, tokens=4096, seed=0):
    """A random layer and inputs whose features are strongly correlated, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)[:, None]
    x = torch.randn(tokens, cols, generator=g) @ mix
    w = torch.randn(rows, cols, generator=g) / cols ** 0.5
    return w, x, x.T @ x / tokens


def output_error(w, q, scale, x):
    return (((q.float() * scale.float()[:, None] - w) @ x.T) ** 2).sum().item()


@pytest.mark.parametrize("bits", [5, 6])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits):
    w, x, h = correlated_layer()
    rtn = output_error(w, *tg.quantize_rows_rtn(w, bits), x)
    gptq = output_error(w, *gptq_one(w, h, bits), x)
    assert gptq < 0.3 * rtn  # measured: about 0.13


def gptq_reference(w, h, scale, bits):
    """Optimal Brain Quantization one column at a time, with an explicit inverse of the Hessian of the
    columns not yet quantized: slow and obvious. Columns are taken in the given order."""
    w, q = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    remaining = list(range(w.size(1)))
    while remaining:
        j, rest = remaining[0], remaining[1:]
        hinv = torch.linalg.inv(h.double()[remaining][:, remaining])
        q[:, j] = torch.clamp(torch.round(w[:, j] / scale), -tg.qmax(bits), tg.qmax(bits))
        err = w[:, j] - q[:, j] * scale
        w[:, rest] -= err[:, None] * hinv[0, 1:][None, :] / hinv[0, 0]
        remaining = rest
    return q


def test_blocked_gptq_matches_the_reference():
    w, _, h = correlated_layer(rows=24, cols=40, tokens=500, seed=3)
    scale = tg.clip_scales(w, 6)[-1].double()
    u = tg.damped_inverse_cholesky(h.double(), 0.01, "w", print)
    fast = tg.gptq_columns(w.double(), u, scale, 6, block=7)  # blocks that do not divide 40
    ref = gptq_reference(w, h + 0.01 * h.diagonal().mean() * torch.eye(40), scale, 6)
    assert (fast == ref).float().mean() > 0.99


def test_gptq_act_order_and_dead_inputs():
    w, x, h = correlated_layer(rows=16, cols=64, tokens=2000, seed=4)
    h[5, :] = h[:, 5] = 0.0  # an input that is always zero
    q, scale = gptq_one(w, h, block=16)
    assert not q[:, 5].any()  # its weights cannot matter: quantized to 0
    x[:, 5] = 0.0
    rtn = output_error(w, *tg.quantize_rows_rtn(w, 6), x)
    assert output_error(w, q, scale, x) < rtn


def test_failed_cholesky_raises_the_damping_and_logs_it():
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.02]))  # indefinite: 1% of mean diag is not enough
    logged = []
    u = tg.damped_inverse_cholesky(h, 0.01, "blocks.0.mlp.fc.weight", logged.append)
    assert logged == ["gptq_damping_raised tensor:blocks.0.mlp.fc.weight damp:0.01 -> 0.1 reason:cholesky_failed"]
    damped = h + 0.1 * h.diagonal().mean() * torch.eye(4)
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), atol=1e-4)


def test_hopeless_cholesky_fails_loudly():
    logged = []
    with pytest.raises(RuntimeError, match="GPTQ w: Cholesky factorization failed"):
        tg.damped_inverse_cholesky(-torch.eye(3), 0.01, "w", logged.append)
    assert len(logged) == tg.GPTQ_MAX_DAMP_RAISES


def test_hessians_come_from_the_inputs_of_each_linear():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.fc = torch.nn.Linear(8, 6, bias=False)
            self.out = torch.nn.Linear(6, 3, bias=False)

        def forward(self, x, y):
            return self.out(torch.relu(self.fc(self.emb(x))))

    net = Net()
    batches = [torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (1, 7))]
    hessians = tg.collect_hessians(net, [(x, x) for x in batches], {"fc.weight", "out.weight"}, cpu_runtime())
    assert set(hessians) == {"fc.weight", "out.weight"}
    x = torch.cat([net.emb(b).reshape(-1, 8) for b in batches]).detach()
    hidden = torch.relu(net.fc(x)).detach()
    assert torch.allclose(hessians["fc.weight"], x.T @ x / 17, atol=1e-6)
    assert torch.allclose(hessians["out.weight"], hidden.T @ hidden / 17, atol=1e-6)


# ---- the plan and the byte target ---------------------------------------------------------------


def small_state():
    torch.manual_seed(0)
    return {"tok_emb.weight": torch.randn(300, 256), "blocks.0.mlp.fc.weight": torch.randn(512, 128),
            "blocks.0.mlp.proj.weight": torch.randn(128, 512), "blocks.0.attn.c_k.weight": torch.randn(64, 64),
            "blocks.0.attn_scale": torch.ones(65536), "step": torch.tensor(3), "skip_weights": torch.ones(0, 8)}


def test_default_plan():
    plan = tg.build_quant_plan(small_state(), min_numel=65_536)
    assert plan == {"tok_emb.weight": 8, "blocks.0.mlp.fc.weight": 6, "blocks.0.mlp.proj.weight": 6,
                    "blocks.0.attn.c_k.weight": 16, "blocks.0.attn_scale": 16, "skip_weights": 16}


def test_plan_rules_apply_in_order_and_fp16_names_win():
    rules = tg.parse_quant_plan("blocks.*.mlp.*=5, blocks.0.mlp.proj.weight=8,tok_emb.weight=16,")
    plan = tg.build_quant_plan(small_state(), fp16_names=frozenset({"blocks.0.mlp.fc.weight"}), rules=rules)
    assert plan["blocks.0.mlp.fc.weight"] == 16 and plan["blocks.0.mlp.proj.weight"] == 8
    assert plan["tok_emb.weight"] == 16
    packed = tg.quantize_state_dict(small_state(), fp16_names=frozenset({"blocks.0.mlp.proj.weight"}), plan=plan)
    assert packed["blocks.0.mlp.proj.weight"]["kind"] == "fp16" and packed["step"]["kind"] == "raw"


@pytest.mark.parametrize("text, message", [
    ("blocks.*.mlp.*", "QUANT_PLAN entry 'blocks.\\*.mlp.\\*' is invalid"),
    ("tok_emb.weight=4", "QUANT_PLAN entry 'tok_emb.weight=4' is invalid"),
    ("=6", "QUANT_PLAN entry '=6' is invalid"),
])
def test_plan_syntax_errors_name_the_variable(text, message):
    with pytest.raises(ValueError, match=message):
        tg.Hyperparameters.from_env({"QUANT_PLAN": text})


def test_plan_rules_set_the_bits_of_big_matrices_only():
    plan = tg.build_quant_plan(small_state(), rules=tg.parse_quant_plan("blocks.0.*=8"))
    assert plan["blocks.0.mlp.fc.weight"] == plan["blocks.0.mlp.proj.weight"] == 8
    assert plan["blocks.0.attn.c_k.weight"] == plan["blocks.0.attn_scale"] == 16  # small or 1-D: still fp16
    plan = tg.build_quant_plan(small_state(), rules=tg.parse_quant_plan("blocks.0.attn*=16"))
    assert plan["blocks.0.attn_scale"] == 16 and plan["blocks.0.mlp.fc.weight"] == 6


def test_plan_errors_name_the_variable_and_what_was_missed():
    with pytest.raises(ValueError, match="QUANT_PLAN blocks.9.\\*=5: the pattern matches no matrix"):
        tg.build_quant_plan(small_state(), rules=tg.parse_quant_plan("blocks.9.*=5"))
    with pytest.raises(ValueError, match="QUANT_PLAN blocks.0.attn_scale=6: .* no matrix of at least "
                                         "QUANT_MIN_NUMEL=65536 elements"):
        tg.build_quant_plan(small_state(), rules=tg.parse_quant_plan("blocks.0.attn_scale=6"))
    with pytest.raises(ValueError, match="QUANT_PLAN nothing=16: the pattern matches no float tensor"):
        tg.build_quant_plan(small_state(), rules=tg.parse_quant_plan("nothing=16"))


def test_byte_target_demotes_the_least_sensitive_tensor_first():
    torch.manual_seed(0)
    # Alike weights (not identical: the coder would find the copy); a's inputs are 100x stronger.
    state = {"a.weight": torch.randn(256, 256), "b.weight": torch.randn(256, 256)}
    hessians = {"a.weight": 100 * torch.eye(256), "b.weight": torch.eye(256)}
    plan = {"a.weight": 6, "b.weight": 6}
    logged = []
    qz = tg.Quantizer(state, hessians, tg.QuantSettings(compressor="zstd", lqer_top=0), None, logged.append)
    packed = qz.quantize(plan)
    stored, blob = qz.finish(packed)
    int5 = len(qz.finish(qz.quantize({"a.weight": 5, "b.weight": 5}))[1])
    budget = len(blob) - (len(blob) - int5) // 4  # one demotion is enough, not two
    new_plan, stored, fitted = tg.fit_byte_target(qz, plan, packed, (stored, blob), budget)
    assert new_plan == {"a.weight": 6, "b.weight": 5} and len(fitted) <= budget
    assert stored["b.weight"]["bits"] == 5 and fitted == qz.finish(stored)[1]  # what it stores is what it wrote
    assert "quant_fit demote:b.weight bits:6->5" in [x for x in logged if x.startswith("quant_fit")][0]
    with pytest.raises(RuntimeError, match="QUANT_TARGET_BYTES"):
        tg.fit_byte_target(qz, plan, packed, qz.finish(packed), 1000)


# ---- storage, codecs and the artifact -----------------------------------------------------------


def pack6_reference(levels):
    """Bit by bit: code = level + 32 in 6 bits, least significant first, into little-endian bytes."""
    bits = []
    for v in list(levels) + [-32] * (-len(levels) % 4):
        bits += [(v + 32) >> i & 1 for i in range(6)]
    return bytes(sum(bits[b + i] << i for i in range(8)) for b in range(0, len(bits), 8))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1001])
def test_pack6_matches_the_reference_and_unpack_inverts_it(n):
    levels = np.random.default_rng(n).integers(-32, 32, n).astype(np.int8)
    packed = tg.pack6(levels)
    assert packed.tobytes() == pack6_reference(levels.tolist())
    assert len(packed) == 3 * ((n + 3) // 4)
    assert np.array_equal(tg.unpack6(packed, n), levels)


@pytest.mark.parametrize("n", [0, 1, 6, 7])
def test_byte_shuffle(n):
    b = bytes(range(10, 10 + n))
    assert tg.byte_shuffle(b) == b[0::2] + b[1::2]
    assert tg.byte_unshuffle(tg.byte_shuffle(b)) == b


def packed_model():
    state = small_state()
    state["blocks.0.mlp.proj.weight"] = state["blocks.0.mlp.proj.weight"].bfloat16()
    plan = tg.build_quant_plan(state, rules=tg.parse_quant_plan("blocks.0.mlp.proj.weight=5"))
    return tg.quantize_state_dict(state, plan=plan)


def assert_same_packed(a, b):
    assert list(a) == list(b)
    for name in a:
        for key in a[name]:
            va, vb = a[name][key], b[name][key]
            assert (torch.equal(va, vb) and va.dtype == vb.dtype) if isinstance(va, torch.Tensor) else va == vb


LRZIP = pytest.mark.skipif(tg.codec_missing("lrzip") is not None, reason="the lrzip program is not installed")
SLOW_CODECS = ("zpaq", "lrzip")  # context mixing: 0.2-1 MB/s, so one combination each


@pytest.mark.parametrize("compressor", ["zstd", "lzma", "brotli", "zpaq", pytest.param("lrzip", marks=LRZIP)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("storage", ["byte", "packed6"])
def test_every_codec_and_storage_round_trips(compressor, shuffle, storage):
    if compressor in SLOW_CODECS and (shuffle, storage) != (True, "packed6"):
        pytest.skip("a slow codec: the storage and shuffle combinations are the fast codecs' tests")
    packed = packed_model()
    blob = tg.serialize_artifact(packed, compressor=compressor, shuffle=shuffle, storage=storage)
    assert blob[6] == tg.CODEC_IDS[compressor] and blob[7] == shuffle  # the header says what was used
    _, restored = tg.deserialize_artifact(blob)
    assert_same_packed(restored, packed)
    state = tg.dequantize_state_dict(restored)
    assert state["blocks.0.mlp.proj.weight"].dtype == torch.bfloat16 and state["step"].item() == 3
    assert state["skip_weights"].shape == (0, 8)


@pytest.mark.parametrize("name", [n for n in tg.CODEC_IDS if n != "lrzip"] + [pytest.param("lrzip", marks=LRZIP)])
def test_each_codec_round_trips_awkward_streams(name):
    _, compress, decompress = tg.CODECS[tg.CODEC_IDS[name]]
    rng = np.random.default_rng(0)
    for raw in (b"", b"\x00", bytes(range(256)) * 3, rng.integers(-31, 32, 20_000).astype(np.int8).tobytes()):
        assert decompress(compress(raw)) == raw


def little_model():
    """packed_model's kinds of tensor (int5, int6, int8, fp16, bf16, integer, empty) in 60 kB."""
    state = {k: v[:64] if v.ndim == 2 and k != "skip_weights" else v for k, v in small_state().items()}
    state["blocks.0.attn_scale"] = state["blocks.0.attn_scale"][:4096]
    state["blocks.0.mlp.proj.weight"] = state["blocks.0.mlp.proj.weight"].bfloat16()
    rules = tg.parse_quant_plan("blocks.0.mlp.proj.weight=5,blocks.0.mlp.fc.weight=6,tok_emb.weight=8")
    return tg.quantize_state_dict(state, plan=tg.build_quant_plan(state, min_numel=1, rules=rules))


def test_auto_keeps_the_smallest_codec():
    packed = little_model()
    logged = []
    auto = tg.serialize_artifact(packed, compressor="auto", log=logged.append)
    sizes = {c: len(tg.serialize_artifact(packed, compressor=c)) for c in [*tg.FAST_CODECS, "pergroup"]}
    assert len(auto) == min(sizes.values())
    best = min(sizes, key=sizes.get)
    assert auto[6] == (tg.PERGROUP_ID if best == "pergroup" else tg.CODEC_IDS[best])
    line = next(x for x in logged if x.startswith("compression raw_bytes"))
    logged_sizes = dict(re.findall(r" (\w+):(\d+)", line))
    header = tg._ARTIFACT_HEADER.size
    assert {c: int(logged_sizes[c]) + header for c in sizes} == sizes
    assert line.endswith(f" chosen:{best}")


def test_a_missing_codec_is_named_when_loading_when_starting_and_skipped_by_auto(tmp_path, monkeypatch):
    path = tmp_path / "zpaq.ptz"
    path.write_bytes(tg.serialize_artifact(little_model(), compressor="zpaq"))
    monkeypatch.setitem(sys.modules, "zpaq", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="compressed with zpaq, which is not installed here: pip install zpaq") as err:
        tg.deserialize_artifact(path.read_bytes(), str(path))
    assert str(path) in str(err.value)
    with pytest.raises(tg.SettingError, match=r"COMPRESSOR=zpaq: that codec is not installed here \(pip install zpaq\)"):
        tg.Hyperparameters.from_env({"COMPRESSOR": "zpaq"})
    logged = []
    blob = tg.serialize_artifact(little_model(), compressor="auto", log=logged.append)
    assert "compression codec_missing:zpaq install:'pip install zpaq' (auto goes on without it)" in logged
    assert not any("zpaq:" in x for x in logged if x.startswith("compression"))
    assert_same_packed(tg.deserialize_artifact(blob)[1], little_model())


def flip_a_payload_bit(blob: bytearray) -> None:
    blob[len(blob) // 2] ^= 0x10


def flip_shuffle_flag(blob: bytearray) -> None:
    # The flag says how to read the payload: flipped, the fp16 bytes would load as scrambled weights
    # without any error unless the checksum covers the header fields too.
    assert blob[7] == 1  # header: magic (5 bytes), format version, codec id, shuffle flag, CRC-32
    blob[7] = 0


@pytest.mark.parametrize("codec, damage, message", [
    ("brotli", flip_a_payload_bit, "corrupt or truncated"),  # brotli has no checksum of its own
    ("zstd", flip_shuffle_flag, "CRC-32 mismatch"),
])
def test_a_flipped_bit_is_caught(tmp_path, codec, damage, message):
    blob = bytearray(tg.serialize_artifact(packed_model(), compressor=codec, shuffle=True))
    damage(blob)
    path = tmp_path / "flipped.ptz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=message) as err:
        tg.load_artifact(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("version", [3, tg.ARTIFACT_FORMAT_VERSION + 1])
def test_another_format_version_is_refused_by_name(tmp_path, version):
    blob = bytearray(tg.serialize_artifact(packed_model(), compressor="zstd"))
    blob[5] = version  # an older artifact (format 3: no LQER factors, no per-group streams) or a newer one
    path = tmp_path / f"format{version}.ptz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"{path}: artifact format {version}"):
        tg.load_artifact(path)


def test_a_format_4_artifact_still_loads(monkeypatch):
    # Format 5 only added codec ids: what format 4 wrote (zstd, lzma, brotli, per-group) reads the same.
    monkeypatch.setattr(tg, "ARTIFACT_FORMAT_VERSION", 4)
    blob = tg.serialize_artifact(packed_model(), compressor="brotli")
    assert blob[5] == 4
    assert_same_packed(tg.deserialize_artifact(blob)[1], packed_model())


def test_an_artifact_without_its_model_config_is_refused(tmp_path):
    path = tmp_path / "bare.ptz"
    path.write_bytes(tg.serialize_artifact(packed_model(), compressor="zstd"))
    with pytest.raises(ValueError, match="records no model config") as err:
        tg.load_artifact(path)
    assert str(path) in str(err.value)


# ---- the pipeline -------------------------------------------------------------------------------

TRAIN_IDS, VAL_IDS = range(0, 190), range(190, 380)


@pytest.fixture(scope="module")
def disjoint_data(tiny_data, tmp_path_factory):
    """tiny_data's tokens folded so that every training id is < 190 and every validation id >= 190:
    any validation token reaching calibration would be visible."""
    from train_gpt import find_shards, load_data_shard
    root = tmp_path_factory.mktemp("disjoint")
    for i, f in enumerate(find_shards(str(tiny_data["output_dir"]), "train")):
        write_shard(root / f"fineweb_train_{i:06d}.bin", load_data_shard(f) % len(TRAIN_IDS))
    val = load_data_shard(find_shards(str(tiny_data["output_dir"]), "val")[0])
    write_shard(root / "fineweb_val_000000.bin", VAL_IDS.start + val % len(VAL_IDS))
    return dict(tiny_data, output_dir=root)


def test_calibration_sees_training_tokens_only(disjoint_data, tmp_path, monkeypatch):
    seen = []
    real = tg.collect_hessians

    def spy(model, batches, *args, **kwargs):
        batches = list(batches)
        seen.extend(torch.cat([x.flatten(), y.flatten()]) for x, y in batches)
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(tg, "collect_hessians", spy)
    env = tiny_env(disjoint_data, tmp_path, GPTQ_CALIB_SEQS="24", ITERATIONS="4")
    tg.main(env)
    log = (tmp_path / "tiny.txt").read_text()
    tokens = torch.cat(seen)
    assert len(tokens) == 2 * 24 * 64
    assert int(tokens.max()) < VAL_IDS.start
    # 6 linears x 2 layers + the bigram and value-embedding projections + the tied embedding (through the head)
    assert re.search(r"^quantize gptq:1 hessians:15 calib_seqs:24 ", log, re.M)
    assert re.search(r"^gptq_calibration_time:\d+ms reserve:\d+ms$", log, re.M)
    assert re.search(r"^quant_plan int6_params:\d+ int8_params:12288 fp16_params:\d+", log, re.M)
    assert re.search(r"^compression raw_bytes:\d+ zstd:\d+ lzma:\d+ brotli:\d+ pergroup:\d+ chosen:\w+$", log, re.M)
    floats = dict(re.findall(r"^(final_float_exact|final_roundtrip_exact) val_loss:\S+ val_bpb:(\S+)", log, re.M))
    assert abs(float(floats["final_roundtrip_exact"]) - float(floats["final_float_exact"])) < 0.02


def test_empty_tensors_survive_the_artifact():
    # A 1-layer model has a (0, dim) skip-weight tensor; the artifact must carry it.
    state = {"empty": torch.zeros(0, 8), "w": torch.randn(4, 8)}
    packed = tg.quantize_state_dict(state, plan={"empty": tg.FP16_BITS, "w": tg.FP16_BITS})
    blob = tg.serialize_artifact(packed)
    restored = tg.dequantize_state_dict(tg.deserialize_artifact(blob)[1])
    assert restored["empty"].shape == (0, 8) and torch.allclose(restored["w"], state["w"], atol=1e-2)


def test_no_calibration_when_no_quantized_weight_has_a_hessian(monkeypatch):
    # Only the bigram table (a lookup, no Hessian site) is quantized: GPTQ has nothing to do, so no
    # forwards run (and no training data is read: DATA_PATH does not even exist here).
    model = tg.GPT(tg.ModelConfig(vocab_size=64, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                                  mlp_mult=2, rope_dims=4, bigram_buckets=32, bigram_dim=8))
    plan = {name: tg.FP16_BITS for name in model.state_dict()} | {"bigram.table.weight": 8}
    monkeypatch.setattr(tg, "collect_hessians", lambda *a, **k: pytest.fail("calibration ran"))
    h = tg.Hyperparameters.from_env({"DATA_PATH": "/nonexistent"})
    assert tg.calibrate(model, plan, h, cpu_runtime()) == {}


def test_the_tied_embedding_hessian_comes_from_the_output_head_inputs():
    # The embedding's GPTQ Hessian is X^T X of what the head multiplies by it: the final norm of the
    # last block's output (one layer: no U-Net skips, no value embedding), not the lookup side.
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig(vocab_size=64, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                                  mlp_mult=2, rope_dims=4, bigram_buckets=32, bigram_dim=8, ve_layers="none")).eval()
    for p in model.parameters():  # zero-initialized projections would hide a wrong site
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 64, (3, 10))
    hessians = tg.collect_hessians(model, [(ids, ids)], {"tok_emb.weight", "blocks.0.mlp.fc.weight"}, cpu_runtime())
    with torch.no_grad():
        x0 = model.embed(ids)
        p = model.plan[0]
        x = tg.rms_norm(model.blocks[0](x0, tg.PassInputs(x0, p.input_scale, p.xsa))).reshape(-1, 16)
    assert hessians["tok_emb.weight"].shape == (16, 16)
    assert torch.allclose(hessians["tok_emb.weight"], x.T @ x / 30, atol=1e-5)
    assert not torch.allclose(hessians["tok_emb.weight"], hessians["blocks.0.mlp.fc.weight"], atol=1e-3)
