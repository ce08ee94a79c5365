"""The quantization frontier (docs/quantization.md): SDClip and its Hessian-aware form, int7, LQER and
per-group compression, each checked against a plain reference, with exact artifact round trips."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import assert_env_error, gptq_one, tiny_env
from test_quantization import assert_same_packed, correlated_layer, output_error

# ---- SDClip -------------------------------------------------------------------------------------


def spread_rows(rows=16, cols=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 2.0, rows)[:, None]


def test_sdclip_scale_is_k_std_over_qmax():
    w = spread_rows()
    q, scale = tg.quantize_rows_rtn(w, 6, sd_k=12.85)
    std = w.double().numpy().std(axis=1)  # population std, numpy's default
    ref = torch.from_numpy((12.85 * std / 31).astype(np.float16)).float()
    assert torch.allclose(scale.float(), ref, rtol=1e-3)
    assert torch.equal(q.float(), torch.clamp(torch.round(w / scale.float()[:, None]), -31, 31))


def test_sdclip_k_follows_the_tensor_class():
    q = tg.QuantSettings(clip_method="sdclip", sdclip_k_mlp=1.0, sdclip_k_attn=2.0, sdclip_k_embed=3.0,
                         sdclip_k_other=4.0, sdclip_hessian_lambda=0.5)
    k = {n: tg.clip_rule(q, n) for n in ("blocks.0.mlp.fc.weight", "blocks.3.attn.c_k.weight",
                                         "tok_emb.weight", "bigram.proj.weight")}
    assert [v["sd_k"] for v in k.values()] == [1.0, 2.0, 3.0, 4.0]
    assert all(v["hessian_lambda"] == 0.0 for v in k.values())  # plain sdclip ignores the Hessian
    hessian = tg.QuantSettings(clip_method="sdclip_hessian", sdclip_hessian_lambda=0.5)
    assert tg.clip_rule(hessian, "x.weight")["hessian_lambda"] == 0.5
    assert tg.clip_rule(tg.QuantSettings(), "blocks.0.mlp.fc.weight") == {}  # percentile search


def test_hessian_aware_sdclip_widens_the_rows_that_carry_strong_inputs():
    w = spread_rows(rows=8, cols=64, seed=1).abs()
    power = torch.logspace(-2, 2, 64)  # inputs of very different strength
    w[2, 48:] *= 5  # row 2 puts its weight on the strong inputs
    r = tg.row_importance(w, power)
    ref = torch.tensor([sum(abs(float(w[i, j])) * float(power[j]) / float(power.mean()) for j in range(64)) / 64
                        for i in range(8)])
    assert torch.allclose(r, ref / ref.mean(), rtol=1e-4) and int(r.argmax()) == 2
    plain = tg.clip_scales(w, 6, sd_k=10.0)[0]
    aware = tg.clip_scales(w, 6, sd_k=10.0, input_power=power, hessian_lambda=0.175)[0]
    assert torch.allclose(aware / plain, 1 + 0.175 * (r - 1), rtol=2e-3)  # fp16 scales


def test_sdclip_is_coarser_and_smaller_than_the_percentile_search():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    q_pct, s_pct = tg.quantize_rows_rtn(w, 6)
    q_sd, s_sd = tg.quantize_rows_rtn(w, 6, sd_k=12.85)
    assert (s_sd > s_pct).all()  # a step of 0.41 std against about max|w| / 31
    assert tg.entropy_bytes(q_sd) < 0.8 * tg.entropy_bytes(q_pct)


def test_gptq_with_sdclip_keeps_the_sdclip_scales_and_beats_round_to_nearest():
    w, x, h = correlated_layer()
    q_rtn, s_rtn = tg.quantize_rows_rtn(w, 6, sd_k=12.85)
    q, s = gptq_one(w, h, clip_method="sdclip", sdclip_k_other=12.85)
    assert torch.equal(s, s_rtn)
    assert output_error(w, q, s, x) < 0.5 * output_error(w, q_rtn, s_rtn, x)
    q_h, s_h = gptq_one(w, h, clip_method="sdclip_hessian", sdclip_k_other=12.85, sdclip_hessian_lambda=0.175)
    assert not torch.equal(s_h, s)


def test_round_to_nearest_uses_hessians_only_for_the_clip_and_logs_a_missing_one():
    w, _, h = correlated_layer(rows=32, cols=64)
    state = {"a.weight": w, "table.weight": w.clone()}
    plan = {"a.weight": 6, "table.weight": 6}
    logged = []
    q = tg.QuantSettings(clip_method="sdclip_hessian", gptq=False)
    packed = tg.quantize_state_dict(state, plan=plan, hessians={"a.weight": h}, q=q, log=logged.append)
    ref_q, ref_s = tg.quantize_rows_rtn(w, 6, sd_k=q.sdclip_k_other, input_power=h.diagonal(),
                                        hessian_lambda=q.sdclip_hessian_lambda)
    assert torch.equal(packed["a.weight"]["q"], ref_q) and torch.equal(packed["a.weight"]["scale"], ref_s)
    assert not torch.equal(packed["table.weight"]["scale"], ref_s)
    assert logged == ["clip_fallback tensor:table.weight method:sdclip reason:no_hessian"]


def test_clip_variables_are_validated():
    assert_env_error({"CLIP_METHOD": "sigma"}, ["CLIP_METHOD", "percentile, sdclip, sdclip_hessian"])
    assert_env_error({"SDCLIP_K_MLP": "0"}, ["SDCLIP_K_MLP", "[0.1, 1000.0]"])
    assert_env_error({"SDCLIP_HESSIAN_LAMBDA": "-1"}, ["SDCLIP_HESSIAN_LAMBDA"])


# ---- int7 ---------------------------------------------------------------------------------------


def test_int7_levels_and_variables():
    q, _ = tg.quantize_rows_rtn(torch.randn(32, 512), 7)
    assert tg.qmax(7) == 63 and int(q.max()) == 63 and int(q.min()) == -63
    h = tg.Hyperparameters.from_env({"QUANT_EMBED_BITS": "7", "QUANT_BITS": "7", "QUANT_PLAN": "blocks.*=7"})
    assert (h.quant_embed_bits, h.quant_bits) == (7, 7)
    assert_env_error({"QUANT_EMBED_BITS": "9"}, ["QUANT_EMBED_BITS", "5, 6, 7, 8, 16"])
    assert tg.DEMOTE_TO == {8: 7, 7: 6, 6: 5}


def test_int7_embedding_round_trips_and_is_smaller_than_int8():
    g = torch.Generator().manual_seed(3)
    state = {"tok_emb.weight": torch.randn(512, 64, generator=g), "blocks.0.mlp.fc.weight": torch.randn(128, 64)}
    sizes = {}
    for bits in (7, 8):
        plan = tg.build_quant_plan(state, embed_bits=bits, min_numel=1024)
        packed = tg.quantize_state_dict(state, plan=plan)
        assert packed["tok_emb.weight"]["bits"] == bits
        for storage in ("byte", "packed6"):  # packed6 leaves 7- and 8-bit levels one per byte
            blob = tg.serialize_artifact(packed, compressor="zstd", storage=storage)
            assert_same_packed(tg.deserialize_artifact(blob)[1], packed)
        sizes[bits] = len(tg.serialize_artifact(packed, compressor="zstd"))
    assert sizes[7] < sizes[8] - 512 * 64 / 16  # about one bit per value fewer


# ---- LQER ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, group, lo, hi, noise", [(2, 520, -2, 1, 0.3), (4, 64, -8, 7, 0.05)])
def test_factor_levels_cover_the_signed_range(bits, group, lo, hi, noise):
    x = torch.randn(4, 130, generator=torch.Generator().manual_seed(4))
    q, scale = tg.quantize_factor(x, bits, group)
    assert q.shape == x.shape and q.dtype == torch.int8 and scale.dtype == torch.float16
    assert scale.numel() == -(-520 // group) and int(q.min()) == lo and int(q.max()) == hi
    x_hat = tg.dequantize_factor(q, scale, group)
    assert ((x_hat - x.double()) ** 2).sum() < noise * (x.double() ** 2).sum()


def lqer_state(seed=5):
    """Three layers with heavy-tailed weights (large int4 errors), of three different sizes of error."""
    torch.manual_seed(seed)
    return {f"blocks.{i}.mlp.fc.weight": torch.distributions.StudentT(3.0).sample((96, 128)) * (i + 1)
            for i in range(3)} | {"bias": torch.zeros(96)}


def test_lqer_lowers_the_error_within_the_rank_bound_and_picks_the_largest_errors():
    state = lqer_state()
    plan = {n: 5 if n != "bias" else tg.FP16_BITS for n in state}
    packed = tg.quantize_state_dict(state, plan=plan)
    logged = []
    cfg = tg.QuantSettings(lqer_top=2, lqer_rank=4, lqer_a_bits=2, lqer_b_bits=4, lqer_group=64)
    corrected = tg.add_lqer(packed, state, cfg, logged.append)
    assert [n for n, e in corrected.items() if "lqer" in e] == ["blocks.1.mlp.fc.weight", "blocks.2.mlp.fc.weight"]
    assert packed["blocks.2.mlp.fc.weight"].get("lqer") is None  # the input is not modified
    for name in ("blocks.1.mlp.fc.weight", "blocks.2.mlp.fc.weight"):
        err = state[name].double() - tg.int_weights(packed[name]).double()
        after = err - tg.lqer_product(corrected[name]["lqer"])
        best_rank4 = torch.linalg.svdvals(err)[4:].norm()  # no rank-4 correction can do better
        assert best_rank4 <= after.norm() < 0.99 * err.norm()
        f = corrected[name]["lqer"]
        assert f["a"].shape == (96, 4) and f["b"].shape == (4, 128) and f["b_scale"].numel() == 8
        assert -2 <= int(f["a"].min()) and int(f["a"].max()) <= 1 and -8 <= int(f["b"].min()) and int(f["b"].max()) <= 7
    lines = [x for x in logged if x.startswith("lqer tensor:")]
    assert len(lines) == 2 and all(re.search(r"err_frob:\S+->\S+ bytes_raw:\d+ bytes_entropy:\d+$", x) for x in lines)
    assert re.fullmatch(r"lqer tensors:2 rank:4 a_bits:2 b_bits:4 group:64 bytes_raw:\d+ bytes_entropy:\d+", logged[-1])
    weights = tg.dequantize_state_dict(corrected)
    plain = tg.dequantize_state_dict(packed)
    for name in ("blocks.1.mlp.fc.weight", "blocks.2.mlp.fc.weight"):
        assert (weights[name] - state[name]).norm() < (plain[name] - state[name]).norm()
    assert torch.equal(weights["blocks.0.mlp.fc.weight"], plain["blocks.0.mlp.fc.weight"])


def test_lqer_hessian_selection_prefers_a_correctable_error_to_a_larger_noisy_one():
    g = torch.Generator().manual_seed(9)
    packed, state = {}, {}
    errors = {"noisy.weight": 0.2 * torch.randn(64, 64, generator=g),  # large error, no structure
              "low_rank.weight": torch.randn(64, 1, generator=g) @ torch.randn(1, 64, generator=g) / 8,
              "table.weight": 0.5 * torch.randn(64, 64, generator=g)}  # the largest error, no Hessian
    for name, err in errors.items():
        q = torch.randint(-15, 16, (64, 64), generator=g, dtype=torch.int8)
        packed[name] = {"kind": "int", "bits": 5, "q": q, "scale": torch.full((64,), 0.5).half(), "shape": [64, 64],
                        "dtype": "float32"}
        state[name] = tg.int_weights(packed[name]) + err
    hessians = {"noisy.weight": torch.eye(64), "low_rank.weight": torch.eye(64)}
    assert errors["table.weight"].norm() > errors["noisy.weight"].norm() > errors["low_rank.weight"].norm()
    logged = []
    by_error = tg.add_lqer(packed, state, tg.QuantSettings(lqer_top=1, lqer_rank=1, lqer_select="error"), logged.append, hessians)
    by_output = tg.add_lqer(packed, state, tg.QuantSettings(lqer_top=1, lqer_rank=1, lqer_select="hessian"), logged.append,
                            hessians)
    assert [n for n, e in by_error.items() if "lqer" in e] == ["table.weight"]
    assert [n for n, e in by_output.items() if "lqer" in e] == ["low_rank.weight"]
    left = {n: (state[n] - tg.int_weights(e)).norm() / errors[n].norm()
            for d in (by_error, by_output) for n, e in d.items() if "lqer" in e}
    assert left["low_rank.weight"] < 0.5 and left["table.weight"] > 0.9
    assert not any("fallback" in x for x in logged)
    fallback = tg.add_lqer(packed, state, tg.QuantSettings(lqer_top=1, lqer_rank=1, lqer_select="hessian"), logged.append)
    assert "lqer" in fallback["table.weight"] and "lqer_fallback select:error reason:no_hessians" in logged


@pytest.mark.parametrize("compressor", ["zstd", "pergroup"])
def test_lqer_round_trips_exactly_through_the_artifact(compressor, tmp_path):
    state = lqer_state()
    packed = tg.add_lqer(tg.quantize_state_dict(state, plan={n: 6 for n in state if n != "bias"} | {"bias": 16}),
                         state, tg.QuantSettings(lqer_top=3, lqer_rank=3, lqer_group=50), lambda _: None)
    path = tmp_path / "lqer.ptz"
    tg.write_atomic(path, tg.serialize_artifact(packed, compressor=compressor))
    restored = tg.deserialize_artifact(path.read_bytes(), str(path))[1]
    for name, e in packed.items():
        if "lqer" in e:
            for key, value in e["lqer"].items():
                got = restored[name]["lqer"][key]
                assert (torch.equal(got, value) and got.dtype == value.dtype) if isinstance(value, torch.Tensor) \
                    else got == value
    a, b = tg.dequantize_state_dict(packed), tg.dequantize_state_dict(restored)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_lqer_variables_are_validated():
    assert_env_error({"LQER_A_BITS": "1"}, ["LQER_A_BITS", "[2, 8]"])
    assert_env_error({"LQER_RANK": "0"}, ["LQER_RANK"])
    assert_env_error({"LQER_GROUP": "0"}, ["LQER_GROUP"])
    assert_env_error({"LQER_SELECT": "size"}, ["LQER_SELECT", "error, hessian"])


# ---- per-group compression ----------------------------------------------------------------------


def test_tensor_roles():
    assert tg.tensor_role("blocks.10.attn.c_q.weight") == "attn.c_q.weight"
    assert tg.tensor_role("tok_emb.weight") == "tok_emb.weight"
    assert tg.tensor_role("blocks.x.y") == "blocks.x.y"


def nearest_neighbour_reference(levels):
    rows = [list(map(int, r)) for r in levels]
    order, left = [0], set(range(1, len(rows)))
    while left:
        cur = rows[order[-1]]
        nxt = min(left, key=lambda i: (sum(abs(a - b) for a, b in zip(rows[i], cur)), i))
        order.append(nxt)
        left.remove(nxt)
    return order


def test_nearest_neighbour_order_matches_the_reference():
    levels = np.random.default_rng(6).integers(-3, 4, (40, 12)).astype(np.int8)
    levels[17] = levels[3]  # a tie-free copy: it must follow row 3 directly
    order = tg.nearest_neighbour_order(levels)
    assert order.dtype == np.uint16 and order.tolist() == nearest_neighbour_reference(levels)


def grouped_model():
    g = torch.Generator().manual_seed(7)
    state = {f"blocks.{i}.{role}": torch.randn(48, 32, generator=g) for i in range(2)
             for role in ("attn.c_q.weight", "mlp.fc.weight")}
    state |= {"tok_emb.weight": torch.randn(64, 32, generator=g), "blocks.0.scale": torch.ones(32),
              "step": torch.tensor(3)}
    plan = tg.build_quant_plan(state, min_numel=1024, rules=tg.parse_quant_plan("blocks.1.mlp.fc.weight=5"))
    return tg.quantize_state_dict(state, plan=plan)


def test_each_stream_keeps_its_smallest_codec_zpaq_included():
    packed = grouped_model()
    # learned gains near 1 (fp16, byte-shuffled): the stream of everything but the levels is where ZPAQ
    # beats the fast codecs on a trained model
    gains = (torch.randn(16384, generator=torch.Generator().manual_seed(1)) * 0.02 + 1).half()
    packed["blocks.0.gain"] = {"kind": "fp16", "shape": [16384], "dtype": "float32", "data": gains}
    manifest, data = tg.encode_payload(packed, "byte")
    data = data[:manifest["levels_bytes"]] + tg.byte_shuffle(data[manifest["levels_bytes"]:])
    body, raws = tg.pergroup_body(manifest, data, frozenset({"mlp.fc.weight"}))
    (count,) = tg._STREAM_COUNT.unpack_from(body)
    ids = [tg._STREAM_ENTRY.unpack_from(body, tg._STREAM_COUNT.size + i * tg._STREAM_ENTRY.size)[0]
           for i in range(count)]
    assert tg.usable_codecs(tg.SLOW_CODECS) == ["zpaq"]  # requirements.txt installs it
    for codec_id, raw in zip(ids, raws):
        sizes = [len(tg.CODECS[tg.CODEC_IDS[c]][1](raw)) for c in (*tg.FAST_CODECS, *tg.SLOW_CODECS)]
        assert len(tg.CODECS[codec_id][1](raw)) == min(sizes)
    assert ids[0] == tg.CODEC_IDS["zpaq"] and tg.CODEC_IDS["brotli"] in ids


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("storage", ["byte", "packed6"])
def test_pergroup_round_trips_exactly(shuffle, storage):
    packed = grouped_model()
    logged = []
    blob = tg.serialize_artifact(packed, compressor="pergroup", shuffle=shuffle, storage=storage,
                                 log=logged.append, sort_roles="mlp.fc.weight,tok_emb.weight")
    assert blob[6] == tg.PERGROUP_ID
    assert_same_packed(tg.deserialize_artifact(blob)[1], packed)
    assert re.search(r"^compression raw_bytes:\d+ pergroup:\d+ chosen:pergroup$", logged[-1])


def test_every_layout_inverts_and_the_sorted_one_follows_the_tour():
    levels = [np.random.default_rng(8).integers(-5, 6, (rows, 12)).astype(np.int8) for rows in (30, 20)]
    items = [{"name": f"t{i}", "rows": m.shape[0], "parts": {"q": [0, m.size]}} for i, m in enumerate(levels)]
    layouts = tg.group_layouts(levels, sortable=True)
    assert set(layouts) == {"rows", "cols", "sorted"} and set(tg.group_layouts(levels, False)) == {"rows", "cols"}
    orders = [tg.nearest_neighbour_order(m) for m in levels]
    assert layouts["sorted"] == [b"".join(np.ascontiguousarray(m[o].T).tobytes() for m, o in zip(levels, orders)),
                                 b"".join(o.astype("<u2").tobytes() for o in orders)]
    assert layouts["cols"] == [levels[0].T.tobytes() + levels[1].T.tobytes()]
    for layout, streams in layouts.items():
        assert tg.ungroup_levels(layout, streams, items) == [m.tobytes() for m in levels]
    bad = bytearray(layouts["sorted"][1])
    bad[0:2] = bad[2:4]  # a permutation with a repeated row
    with pytest.raises(ValueError, match="t0 row permutation"):
        tg.ungroup_levels("sorted", [layouts["sorted"][0], bytes(bad)], items)


def test_each_group_keeps_its_smallest_layout():
    packed = grouped_model()
    # make block 0's fc rows two interleaved families: sorting brings each family together
    q = packed["blocks.0.mlp.fc.weight"]["q"]
    q[0::2] = torch.randint(-2, 3, (1, q.size(1)), dtype=torch.int8)
    q[1::2] = torch.randint(-20, 21, (1, q.size(1)), dtype=torch.int8)
    logged = []
    tg.serialize_artifact(packed, compressor="pergroup", log=logged.append, sort_roles="mlp.fc.weight")
    lines = {m[1]: m for m in (re.fullmatch(r"compression_group role:(\S+) tensors:(\d+) layout:(\w+) (.*) codecs:\S+",
                                            x) for x in logged) if m}
    assert set(lines) == {"attn.c_q.weight", "mlp.fc.weight", "tok_emb.weight"}
    for role, m in lines.items():
        sizes = {k: int(v) for k, v in (kv.split(":") for kv in m[4].split())}
        assert m[3] == min(sizes, key=sizes.get) and ("sorted" in sizes) == (role == "mlp.fc.weight")


@pytest.mark.parametrize("damage", [
    lambda b: b[:len(b) // 2],
    lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0x10]) + b[len(b) // 2 + 1:],
    lambda b: b[:tg._ARTIFACT_HEADER.size + 2] + bytes([9]) + b[tg._ARTIFACT_HEADER.size + 3:],  # a codec id
    lambda b: b[:tg._ARTIFACT_HEADER.size],
])
def test_a_corrupt_pergroup_artifact_names_the_file(damage, tmp_path):
    path = tmp_path / "bad.ptz"
    path.write_bytes(damage(tg.serialize_artifact(grouped_model(), compressor="pergroup")))
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        tg.load_artifact(path)
    assert str(path) in str(err.value)


# ---- the pipeline -------------------------------------------------------------------------------


def test_a_run_with_every_addition(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS="4", GPTQ="0", CLIP_METHOD="sdclip_hessian",
                   QUANT_EMBED_BITS="7", LQER_TOP="2", COMPRESSOR="pergroup", GPTQ_CALIB_SEQS="16")
    tg.main(env)
    log = (tmp_path / "tiny.txt").read_text()
    # no GPTQ, but the Hessian-aware clip needs the Hessians: 6 linears x 2 layers, bigram and
    # value-embedding projections, tied embedding; the tables are lookups without one
    assert re.search(r"^quantize gptq:0 hessians:15 calib_seqs:16 .* clip:sdclip_hessian$", log, re.M)
    assert "clip_fallback tensor:bigram.table.weight method:sdclip reason:no_hessian" in log
    assert re.search(r"^quant_plan int6_params:\d+ int7_params:12288 fp16_params:\d+", log, re.M)
    assert len(re.findall(r"^lqer tensor:\S+ rank:4 ", log, re.M)) == 2
    assert re.search(r"^compression raw_bytes:\d+ pergroup:\d+ chosen:pergroup$", log, re.M)
    floats = dict(re.findall(r"^(final_float_exact|final_roundtrip_exact) val_loss:\S+ val_bpb:(\S+)", log, re.M))
    assert abs(float(floats["final_roundtrip_exact"]) - float(floats["final_float_exact"])) < 0.05


# ---- AWQ-lite (AWQ_GROUPS) ----------------------------------------------------------------------


def assert_same_entries(a, b):
    """assert_same_packed, into the LQER factors too."""
    assert list(a) == list(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key, va in a[name].items():
            vb = b[name][key]
            if key == "lqer":
                assert_same_entries({"f": va}, {"f": vb})
            else:
                assert (torch.equal(va, vb) and va.dtype == vb.dtype) if isinstance(va, torch.Tensor) else va == vb


def awq_model(seed=3):
    """Three int6 matrices with Hessians from correlated inputs, an int8 one and a lookup table without a Hessian."""
    g = torch.Generator().manual_seed(seed)
    state, hessians = {}, {}
    for i, cols in enumerate((192, 128, 128)):
        w, _, h = correlated_layer(rows=48, cols=cols, tokens=2048, seed=seed + i)
        state[f"blocks.{i}.mlp.fc.weight"], hessians[f"blocks.{i}.mlp.fc.weight"] = w, h
    state["tok_emb.weight"] = torch.randn(80, 128, generator=g) * 0.05
    hessians["tok_emb.weight"] = torch.eye(128)
    state["bigram.table.weight"] = torch.randn(64, 128, generator=g)
    state["blocks.0.scale"] = torch.ones(128)
    plan = {n: 6 for n in state} | {"tok_emb.weight": 8, "blocks.0.scale": tg.FP16_BITS}
    return state, hessians, plan


def test_awq_scores_and_chooses_the_most_activation_weighted_groups():
    state, hessians, plan = awq_model()
    w, h = state["blocks.1.mlp.fc.weight"], hessians["blocks.1.mlp.fc.weight"]
    col = h.diagonal().sqrt() * w.abs().mean(dim=0)
    assert torch.allclose(tg.awq_group_scores(w, h.diagonal()), torch.stack([col[:64].sum(), col[64:].sum()]))
    narrow = tg.awq_group_scores(state["blocks.0.mlp.fc.weight"][:, :100], hessians["blocks.0.mlp.fc.weight"][:100, :100].diagonal())
    assert narrow.numel() == 2  # the last group is the 36 columns left
    boosted = dict(hessians)
    boosted["blocks.2.mlp.fc.weight"] = hessians["blocks.2.mlp.fc.weight"] * torch.linspace(1, 100, 128)  # columns 64..127
    boosted["tok_emb.weight"] = torch.eye(128) * 1e6  # int8 already: never a candidate
    chosen = tg.select_awq_groups(state, plan, boosted, 1)
    assert chosen == {"blocks.2.mlp.fc.weight": [64]}
    every = tg.select_awq_groups(state, plan, boosted, 100)
    assert every == {"blocks.0.mlp.fc.weight": [0, 64, 128], "blocks.1.mlp.fc.weight": [0, 64],
                     "blocks.2.mlp.fc.weight": [0, 64]}  # no int8 tensor, no tensor without a Hessian


def test_an_awq_group_is_rounded_on_int8_inside_gptq_with_less_error():
    w, x, h = correlated_layer()
    q = tg.QuantSettings(gptq_block=32)
    plain = tg.quantize_gptq_batch([w], [h], 6, ["w"], q, print)[0]
    assert all(torch.equal(a, b) for a, b in zip(plain, tg.quantize_gptq_batch([w], [h], 6, ["w"], q, print, [[]])[0]))
    levels, scale = tg.quantize_gptq_batch([w], [h], 6, ["w"], q, print, [[64]])[0]
    kept = slice(64, 128)
    assert levels[:, :64].abs().max() <= 31 and 31 < levels[:, kept].abs().max() <= 127
    awq = tg.int_weights({"q": levels, "scale": scale, "bits": 6, "awq": [64]})
    before = tg.int_weights({"q": plain[0], "scale": plain[1], "bits": 6})
    assert torch.equal(awq[:, kept], levels[:, kept].float() * (scale.float() * 31 / 127)[:, None])
    # GPTQ moves the kept columns to absorb earlier columns' errors, so their own error falls less than the
    # grid's (31/127)^2; the layer output gains too.
    assert ((awq - w)[:, kept] ** 2).sum() < 0.5 * ((before - w)[:, kept] ** 2).sum()
    assert (((awq - w) @ x.T) ** 2).sum() < (((before - w) @ x.T) ** 2).sum()
    # Uncorrelated inputs (diagonal H): no error feedback, each column's error is its rounding alone.
    diag = torch.diag(torch.linspace(2.0, 1.0, 128))
    alone = tg.quantize_gptq_batch([w], [diag], 6, ["w"], q, print)[0]
    kept_levels = tg.quantize_gptq_batch([w], [diag], 6, ["w"], q, print, [[64]])[0]
    err = {k: ((tg.int_weights({"q": lv, "scale": sc, "bits": 6, **extra}) - w)[:, kept] ** 2).sum()
           for k, (lv, sc), extra in (("int6", alone, {}), ("int8", kept_levels, {"awq": [64]}))}
    assert err["int8"] < 0.1 * err["int6"]  # about (31/127)^2 = 0.06


@pytest.mark.parametrize("compressor, storage", [("zstd", "packed6"), ("pergroup", "byte")])
def test_awq_groups_round_trip_exactly_through_the_artifact(compressor, storage, tmp_path):
    state, hessians, plan = awq_model()
    awq = tg.select_awq_groups(state, plan, hessians, 2)
    q = tg.QuantSettings(lqer_top=2)
    packed = tg.add_lqer(tg.quantize_state_dict(state, plan=plan, hessians=hessians, q=q, log=print, awq=awq),
                         state, q, lambda _: None)
    assert {n: e["awq"] for n, e in packed.items() if "awq" in e} == awq
    blob = tg.serialize_artifact(packed, compressor=compressor, storage=storage)
    assert blob[5] == tg.ARTIFACT_FORMAT_VERSION == 5  # an artifact with AWQ groups is format 5
    restored = tg.deserialize_artifact(blob)[1]
    assert_same_entries(restored, packed)
    a, b = tg.dequantize_state_dict(packed), tg.dequantize_state_dict(restored)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_awq_off_changes_nothing():
    state, hessians, plan = awq_model()
    packed = tg.quantize_state_dict(state, plan=plan, hessians=hessians)
    assert not any("awq" in e for e in packed.values())
    assert_same_packed(tg.quantize_state_dict(state, plan=plan, hessians=hessians, awq={}), packed)
    manifest, _ = tg.encode_payload(packed, "byte")
    assert not any("awq" in item for item in manifest["tensors"])  # the manifest is what it was without AWQ
    assert tg.select_awq_groups(state, plan, hessians, 0) == {}


def test_the_estimate_and_the_fitter_account_for_awq_groups():
    state, hessians, plan = awq_model()
    assert tg.awq_estimate_groups(state, plan, 4) == {"bigram.table.weight": [0, 64], "blocks.0.mlp.fc.weight": [0, 64]}
    plain = tg.estimate_model_bytes(state, plan, tg.QuantSettings())
    assert tg.estimate_model_bytes(state, plan, tg.QuantSettings(awq_groups=4)) > plain + 4 * 48 * 64 / 8
    # Rank the demotions with the groups left out; fit to a budget that forces one: the groups stay int8.
    awq = tg.select_awq_groups(state, plan, hessians, 2)
    ranked = {n: saved for _, n, _, saved in tg.rank_demotions(state, plan, hessians, print, tg.QuantSettings(), awq)}
    alone = {n: saved for _, n, _, saved in tg.rank_demotions(state, plan, hessians, print)}
    assert all(ranked[n] < alone[n] for n in awq) and all(ranked[n] == alone[n] for n in ranked if n not in awq)
    qz = tg.Quantizer(state, hessians, tg.QuantSettings(compressor="zstd", lqer_top=0), None, lambda _: None, awq)
    packed = qz.quantize(plan)
    finished = qz.finish(packed)
    fitted_plan, stored, blob = tg.fit_byte_target(qz, plan, packed, finished, len(finished[1]) - 200)
    assert fitted_plan != plan and len(blob) <= len(finished[1]) - 200
    assert {n: e["awq"] for n, e in stored.items() if "awq" in e} == awq
    for name, starts in awq.items():
        e = stored[name]
        kept = tg.awq_columns(starts, e["q"].size(1))
        assert e["q"][:, ~kept].abs().max() <= tg.qmax(fitted_plan[name]) and e["q"][:, kept].abs().max() > 31
    assert_same_entries(tg.deserialize_artifact(blob)[1], stored)


def test_awq_settings_are_validated():
    assert_env_error({"AWQ_GROUPS": "1", "GPTQ": "0"}, ["AWQ_GROUPS=1", "GPTQ=1"])
    assert_env_error({"AWQ_GROUPS": "-1"}, ["AWQ_GROUPS", "[0, 10000]"])


def test_a_run_with_awq_groups_logs_them_and_ships_them(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS="4", VAL_LOSS_EVERY="0", AWQ_GROUPS="3", GPTQ_CALIB_SEQS="16")
    tg.main(env)
    log = (tmp_path / "tiny.txt").read_text()
    groups = re.findall(r"^awq tensor:(\S+) start:(\d+) cols:(\d+) score:\S+ bits:6->8$", log, re.M)
    # MODEL_DIM=32: a matrix reading the residual stream has one group of 32 columns, the MLP's output
    # projection (64 inputs) one of 64
    assert len(groups) == 3 and {cols for _, _, cols in groups} <= {"32", "64"}
    assert re.search(r"^awq groups:3 of:AWQ_GROUPS=3 tensors:\d cols:64 bits:8 ", log, re.M)
    blob = (tmp_path / "tiny.ptz").read_bytes()
    assert blob[5] == 5
    shipped = {n: e["awq"] for n, e in tg.deserialize_artifact(blob)[1].items() if "awq" in e}
    assert sorted((n, int(s)) for n, s, _ in groups) == sorted((n, s) for n, starts in shipped.items() for s in starts)
    floats = dict(re.findall(r"^(final_float_exact|final_roundtrip_exact) val_loss:\S+ val_bpb:(\S+)", log, re.M))
    assert abs(float(floats["final_roundtrip_exact"]) - float(floats["final_float_exact"])) < 0.05
