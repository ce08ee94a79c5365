"""The Model section. A small model is causal, soft-caps its logits, gives normalized distributions and
per-token cross-entropy, and attends with GQA through SDPA on a CPU. The record architecture
(docs/architecture.md): every switch keeps the model causal and changes what it
computes, SmearGate stops at documents, BigramHash keys on context tokens only, depth recurrence
reuses one block K times, the mini-recurrence switch works eagerly and under torch.compile, and the
default model has the record's size. The April parts (docs/april.md) the same way, and each adds exactly its
parameters: parallel residuals keep attention and the MLP on their own lanes, the loop's U-Net, the gates
start where the public run starts them, the input SmearGate stops at documents."""

from __future__ import annotations

import math
import re

import pytest
import torch

import train_gpt as tg
from conftest import assert_env_error, tiny_env, tiny_model

VOCAB, DIM, HEADS, KV_HEADS, MLP_MULT, LAYERS, BOS = 64, 32, 4, 2, 2, 4, 1
HEAD_DIM = DIM // HEADS
# Every part off: the baseline model (full RoPE, plain additive skips, default init, ...).
BASELINE = dict(mlp_activation="relu2", rope_dims=HEAD_DIM, block_input_scale=False, unet_gates=False,
                xsa_layers="none", smear_gate=False, bigram_buckets=0, ve_layers="none", ortho_init=False)
WINDOW = 6  # the gates' input window (GATE_WINDOW) at this size
PARTS = {  # each part alone, on top of the baseline (the March record's, then the April record's)
    "leaky_relu2": dict(mlp_activation="leaky_relu2"),
    "partial_rope": dict(rope_dims=4),
    "block_input_scale": dict(block_input_scale=True),
    "unet_gates": dict(unet_gates=True),
    "xsa": dict(xsa_layers="all"),
    "smear_gate": dict(smear_gate=True),
    "bigram": dict(bigram_buckets=32, bigram_dim=8),
    "value_embed": dict(ve_layers="-2,-1", ve_dim=8),
    "ortho_init": dict(ortho_init=True),
    "recurrence": dict(recurrence=True, recur_prelude=1, recur_passes=2, recur_coda=1),
    "mini_recurrence": dict(mini_recur_repeats=2, mini_recur_first=1, mini_recur_last=2),
    "parallel": dict(parallel_start_layer=2),
    "attn_out_gate": dict(attn_out_gate=True, gate_window=WINDOW),
    "input_smear_gate": dict(smear_gate=True, smear_gate_form="input", gate_window=WINDOW),
}
RECORD = dict(bigram_buckets=32, bigram_dim=8, ve_dim=8)  # the defaults (partial RoPE: 4 of 8 dims), shrunk


def config(**overrides) -> tg.ModelConfig:
    base = dict(vocab_size=VOCAB, num_layers=LAYERS, model_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS,
                mlp_mult=MLP_MULT, rope_dims=4, bos_id=BOS)
    return tg.ModelConfig(**{**base, **overrides})


def model(cfg: tg.ModelConfig, seed: int = 0) -> tg.GPT:
    """A model whose every parameter is nudged off its init, so that zero-initialized projections,
    gates and iteration vectors all take part in the output."""
    torch.manual_seed(seed)
    m = tg.GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def tokens(batch=2, length=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, length), generator=g)
    x[:, 9] = BOS  # a document boundary inside the window
    return x


APRIL_SMALL = dict(  # the April model's shape on 4 layers: lanes from layer 3, layers 1..2 three times
    parallel_start_layer=3, attn_out_gate=True, attn_gate_scale=0.5, smear_gate_form="input",
    gate_window=WINDOW, bigram_buckets=0, mlp_activation="leaky_relu2", qk_gain_init=5.0,
    mini_recur_repeats=2, mini_recur_first=1, mini_recur_last=2, mini_recur_unet=True)
CAUSALITY_CASES = {"baseline": BASELINE, **{k: {**BASELINE, **v} for k, v in PARTS.items()}, "record": RECORD,
                   "record+recurrence": {**RECORD, **PARTS["recurrence"]},
                   "record+mini_recurrence": {**RECORD, **PARTS["mini_recurrence"]},
                   "parallel_from_layer_1": {**BASELINE, "parallel_start_layer": 1},  # lanes in the encoder half
                   "record+parallel+recurrence": {**RECORD, "parallel_start_layer": 2, "recurrence": True,
                                                  "recur_prelude": 1, "recur_passes": 2, "recur_coda": 1},
                   "april": APRIL_SMALL}


def assert_causal(m: tg.GPT, case: str) -> None:
    """Changing input token t changes no logit before t, and changes the logits at t."""
    x = tokens()
    with torch.no_grad():
        base = m.logits(x)
        for t in (0, 5, 9, 10, 23):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 7) % VOCAB
            out = m.logits(x2)
            assert torch.equal(out[:, :t], base[:, :t]), f"{case}: position {t} leaks backwards"
            assert not torch.allclose(out[:, t], base[:, t])  # input token t is context from position t on


@pytest.mark.parametrize("case", CAUSALITY_CASES)
def test_changing_token_t_changes_no_earlier_logit(case):
    assert_causal(model(config(**CAUSALITY_CASES[case])), case)


@pytest.mark.parametrize("part", [p for p in PARTS if p not in ("ortho_init", "recurrence", "value_embed")])
def test_each_part_changes_the_output(part):  # value_embed: its own test (its init output is ~1e-4)
    # The same weights with the part switched off: a dead flag would give the same logits.
    on = model(config(**{**BASELINE, **PARTS[part]}))
    off = tg.GPT(config(**BASELINE)).eval()
    missing, _ = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing
    if part == "mini_recurrence":
        off.set_mini_recurrence(False)
    with torch.no_grad():
        assert not torch.allclose(on.logits(tokens()), off.logits(tokens()), atol=1e-4)


def test_default_config_has_the_record_size():
    h = tg.Hyperparameters.from_env({})
    with torch.device("meta"):  # no memory: shapes only
        m = tg.GPT(tg.ModelConfig.from_hparams(h))
    params = sum(p.numel() for p in m.parameters())
    assert 26_500_000 <= params <= 27_500_000
    assert m.describe().startswith(f"model params:{params} unique_blocks:11 passes:11 ")


# ---- parts --------------------------------------------------------------------------------------


def test_smear_gate_never_mixes_across_a_document_start():
    torch.manual_seed(0)
    smear = tg.SmearGate(DIM, BOS)
    with torch.no_grad():
        smear.gate.normal_()
    ids = tokens(batch=1)
    x = torch.randn(1, ids.size(1), DIM)
    out = smear(x, ids)
    x2 = x.clone()
    x2[:, :9] = torch.randn(1, 9, DIM)  # a different previous document
    out2 = smear(x2, ids)
    assert torch.equal(out2[:, 9:], out[:, 9:])  # the BOS and everything after it
    assert torch.equal(out[:, 9], x[:, 9]) and torch.equal(out[:, 0], x[:, 0])
    x3 = x.clone()
    x3[:, 9] += 1.0  # inside the document the previous token is mixed in
    assert not torch.allclose(smear(x3, ids)[:, 10], out[:, 10])


def test_bigram_gives_every_bos_the_reserved_row():
    ids = tokens(batch=1)
    idx = tg.bigram_bucket_ids(ids, 37, BOS)
    at_bos = ids[0] == BOS
    assert at_bos[9] and (idx[0, at_bos] == 36).all() and (idx[0, 1:][~at_bos[1:]] < 36).all()


@pytest.mark.parametrize("parts", ["smear_gate", "bigram", "smear_gate+bigram"])
def test_model_input_at_a_document_start_ignores_the_previous_document(parts):
    overrides = {"smear_gate": False, "bigram_buckets": 0}
    for part in parts.split("+"):
        overrides.update({"smear_gate": True} if part == "smear_gate" else PARTS["bigram"])
    m = model(config(**{**BASELINE, **overrides}))
    ids = tokens(batch=1)
    ids2 = ids.clone()
    ids2[:, :9] = (ids[:, :9] + 5) % VOCAB
    ids2[:, :9][ids2[:, :9] == BOS] = 0  # a different previous document with no extra boundary
    with torch.no_grad():
        assert torch.equal(m.embed(ids)[:, 9:], m.embed(ids2)[:, 9:])


def test_bigram_index_depends_on_previous_and_current_token_only():
    buckets = 37
    ids = torch.randint(0, 1024, (3, 40))
    ids[ids == BOS] = 0  # no document start here: every pair is hashed
    idx = tg.bigram_bucket_ids(ids, buckets, BOS)
    assert (idx[:, 0] == buckets - 1).all() and (idx[:, 1:] < buckets - 1).all()
    for b in range(3):
        for t in range(1, 40):
            prev, cur = int(ids[b, t - 1]), int(ids[b, t])
            assert idx[b, t] == ((36313 * cur) ^ (27191 * prev)) % (buckets - 1)
    # Every position t >= 1 gives the same bucket when the window is just (t-1, t).
    pairs = torch.stack((ids[:, :-1], ids[:, 1:]), dim=-1).reshape(-1, 2)
    assert torch.equal(tg.bigram_bucket_ids(pairs, buckets, BOS)[:, 1].view(3, 39), idx[:, 1:])


def test_bigram_position_zero_reads_the_reserved_row():
    torch.manual_seed(0)
    bigram = tg.BigramHash(config(bigram_buckets=16, bigram_dim=4))
    with torch.no_grad():
        bigram.proj.weight.normal_()
        ids = torch.randint(0, VOCAB, (2, 12))
        before = bigram(ids)
        bigram.table.weight[-1] += 1.0
        after = bigram(ids)
    assert not torch.allclose(after[:, 0], before[:, 0]) and torch.equal(after[:, 1:], before[:, 1:])


def test_value_embedding_reaches_the_values_of_its_layers_only():
    cfg = config(**{**BASELINE, "ve_layers": "1,-1", "ve_dim": 8})
    m = model(cfg)
    assert [p.ve for p in m.plan] == [-1, 0, -1, 1]  # layers 1 and 3, one scale each
    seen = {}
    for i, block in enumerate(m.blocks):
        block.attn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, args[4]))
    x = tokens()
    with torch.no_grad():
        m.value_embed.scale.fill_(1.0)
        m.value_embed.table.weight.normal_()  # rows of unit size: an effect far above rounding
        base = m.logits(x)
        ve = m.value_embed(x)
        assert seen[0] is None and seen[2] is None
        assert torch.allclose(seen[1], ve * m.ve_layer_scales[0]) and torch.allclose(seen[3], ve * m.ve_layer_scales[1])
        off = tg.GPT(config(**BASELINE)).eval()  # the same weights without value embeddings
        off.load_state_dict(m.state_dict(), strict=False)
        assert not torch.allclose(off.logits(x), base, atol=1e-3)
        m.ve_layer_scales.zero_()  # the per-layer scales gate the whole path
        assert torch.allclose(off.logits(x), m.logits(x), atol=1e-6)


def test_value_embedding_of_a_position_reads_its_own_token_only():
    torch.manual_seed(0)
    ve = tg.ValueEmbedding(config(ve_dim=8))
    with torch.no_grad():
        ve.proj.weight.normal_()
        x = tokens()
        out = ve(x)
        x2 = x.clone()
        x2[:, 7] = (x2[:, 7] + 1) % VOCAB
        out2 = ve(x2)
    assert out.shape == (2, 24, KV_HEADS * HEAD_DIM)
    assert torch.equal(out2[:, :7], out[:, :7]) and torch.equal(out2[:, 8:], out[:, 8:])
    assert not torch.allclose(out2[:, 7], out[:, 7])


def test_negative_layer_ids_count_from_the_end():
    assert tg.parse_layer_set("-2,-1", 11, "VE_LAYERS") == {9, 10}
    assert tg.parse_layer_set("0,-1", 4, "VE_LAYERS") == {0, 3}
    assert tg.parse_layer_set("-2,-1", 1, "VE_LAYERS") == {0}  # the default holds at any depth
    with pytest.raises(ValueError, match=r"VE_LAYERS.*\[0, 3\]"):
        tg.parse_layer_set("4", 4, "VE_LAYERS")


def test_xsa_removes_the_own_value_component_per_kv_group():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = tg.exclude_self_value(y, v)
    for h in range(4):
        own = v[:, :, h // 2]  # query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
        assert (out[:, :, h] * own).sum(-1).abs().max() < 1e-5
        residual = y[:, :, h] - out[:, :, h]  # what was removed lies along the own value
        cos = torch.cosine_similarity(residual, own, dim=-1).abs()
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)


def test_partial_rope_rotates_only_the_first_dims():
    rot = tg.Rotary(4, 10000.0)
    x = torch.randn(1, 6, 2, HEAD_DIM)
    out = rot(x)
    assert torch.equal(out[..., 4:], x[..., 4:]) and torch.allclose(out[:, 0], x[:, 0])
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(out[:, 1:, :, :4], x[:, 1:, :, :4])


def test_layer_plan_scales_unet_and_xsa():
    plan = tg.layer_plan(config(num_layers=5, xsa_layers="0,3"), repeats_on=True)
    assert [p.block for p in plan] == [0, 1, 2, 3, 4]
    assert [p.input_scale for p in plan] == [1 / math.sqrt(l + 1) for l in range(5)]
    assert [p.xsa for p in plan] == [True, False, False, True, False]
    assert [p.push for p in plan] == [True, True, False, False, False]
    assert [p.pop for p in plan] == [-1, -1, 0, 1, -1]  # layer 2 pops layer 1's output, layer 3 layer 0's
    off = tg.layer_plan(config(num_layers=5, block_input_scale=False), repeats_on=True)
    assert all(p.input_scale == 1.0 for p in off)


def test_gated_skip_starts_as_the_even_blend():
    m = tg.GPT(config())
    x, skip = torch.randn(2, 3, DIM), torch.randn(2, 3, DIM)
    assert torch.allclose(m.skip_blend(x, skip, 0), (x + skip) / 2)


def test_orthogonal_init_and_projection_scales():
    torch.manual_seed(0)
    m = tg.GPT(config(num_layers=3))
    for block in m.blocks:
        q = block.attn.c_q.weight
        assert torch.allclose(q @ q.T, torch.eye(DIM), atol=1e-5)
        s = torch.linalg.svdvals(block.mlp.proj.weight)
        assert torch.allclose(s, torch.full_like(s, 1 / math.sqrt(2 * 3)), atol=1e-5)
        assert not block.attn.proj.weight.any()
    p = m.bigram.proj.weight  # BIGRAM_INIT=zero_table: zero rows, an orthogonal projection [32, 128]
    assert not m.bigram.table.weight.any() and torch.allclose(p @ p.T, torch.eye(DIM), atol=1e-5)
    other = tg.GPT(config(num_layers=3, bigram_init="zero_proj")).bigram
    assert not other.proj.weight.any() and 0.9 < other.table.weight.std() < 1.1
    plain = tg.GPT(config(num_layers=3, ortho_init=False))
    assert not plain.blocks[0].mlp.proj.weight.any()  # the baseline: zero output projections
    zero = tg.GPT(config(num_layers=3, mlp_proj_init="zero"))  # the record's: MLP outputs start at zero too
    assert not any(block.mlp.proj.weight.any() for block in zero.blocks)
    fc = zero.blocks[0].mlp.fc.weight  # the rest of the orthogonal init stays
    assert torch.allclose(fc.T @ fc, torch.eye(DIM), atol=1e-5)


def test_fp16_names_are_the_small_control_tensors():
    m = tg.GPT(config(recurrence=True, recur_prelude=1, recur_passes=2, recur_coda=1))
    names = m.fp16_param_names()
    for name in ("blocks.0.attn.q_gain", "blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix",
                 "skip_weights", "skip_gates", "smear.gate", "bigram.scale", "iteration_vectors"):
        assert name in names
    assert not {"tok_emb.weight", "bigram.table.weight", "bigram.proj.weight", "blocks.0.attn.c_q.weight"} & names
    big = torch.randn(512, 256)
    packed = tg.quantize_state_dict({"kept": big, "quantized": big}, fp16_names=frozenset({"kept"}))
    assert packed["kept"]["kind"] == "fp16" and packed["quantized"]["kind"] == "int"


# ---- depth recurrence ---------------------------------------------------------------------------


def block_params(d: int, kv: int, heads: int, mult: int) -> int:
    return 2 * d * d + 2 * d * kv + 2 * mult * d * d + 4 * d + heads  # q, proj, k, v, MLP, scales+mix, q_gain


def test_recurrence_unique_parameters_match_the_formula():
    P, K, C = 1, 3, 2
    m = tg.GPT(config(num_layers=P + K + C, recurrence=True, recur_prelude=P, recur_passes=K, recur_coda=C,
                      bigram_buckets=32, bigram_dim=8, ve_layers="0,-1", ve_dim=8))
    kv = KV_HEADS * HEAD_DIM
    expected = (VOCAB * DIM + (32 * 8 + 8 * DIM + 1) + DIM  # embedding, bigram, smear gate
                + (VOCAB * 8 + 8 * kv + 1) + 2  # value embedding: table, projection, scale; 2 layer scales
                + (P + 1 + C) * block_params(DIM, kv, HEADS, MLP_MULT)
                + K * DIM  # iteration vectors
                + 2 * ((P + K + C) // 2) * DIM)  # skip weights and gates over the effective depth
    assert sum(p.numel() for p in m.parameters()) == expected


def count_calls(m: tg.GPT) -> list[int]:
    calls = [0] * len(m.blocks)
    for i, block in enumerate(m.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_shared_block_runs_k_times_with_its_iteration_vectors():
    m = model(config(num_layers=6, recurrence=True, recur_prelude=2, recur_passes=3, recur_coda=1))
    calls = count_calls(m)
    x = tokens()
    with torch.no_grad():
        base = m.logits(x)
        assert calls == [1, 1, 3, 1]
        m.iteration_vectors.zero_()
        assert not torch.allclose(m.logits(x), base)


def test_mini_recurrence_repeats_layers_and_switches():
    m = model(config(**PARTS["mini_recurrence"]))
    calls = count_calls(m)
    x = tokens()
    with torch.no_grad():
        on = m.logits(x)
        assert calls == [1, 3, 3, 1]
        assert m.set_mini_recurrence(False) and not m.set_mini_recurrence(False)
        off = m.logits(x)
        assert calls == [2, 4, 4, 2]
        assert not torch.allclose(on, off)


def test_mini_recurrence_switch_recompiles_under_torch_compile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = model(config(**PARTS["mini_recurrence"]))
    counter = CompileCounter()  # traces with dynamo, runs eagerly: checks the guards, not codegen
    compiled = torch.compile(m, backend=counter)
    x = tokens()
    with torch.no_grad():
        on = compiled(x, x)
        m.set_mini_recurrence(False)
        off, eager_off = compiled(x, x), m(x, x)
        m.set_mini_recurrence(True)
        again = compiled(x, x)
    assert counter.frame_count == 2  # one graph per state, both cached
    assert torch.allclose(off, eager_off) and torch.equal(on, again) and not torch.allclose(on, off)


def test_training_switches_mini_recurrence_on_at_its_fraction(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="mini", ITERATIONS="4", VAL_LOSS_EVERY="0", MINI_RECUR_REPEATS="1",
                   MINI_RECUR_FIRST="0", MINI_RECUR_LAST="1", MINI_RECUR_START_FRAC="0.5")
    tg.main(env)
    log = (tmp_path / "mini.txt").read_text()
    assert re.findall(r"^mini_recurrence:(\w+) step:(\d+)", log, re.M) == [("off", "0"), ("on", "2")]
    assert "hparam mini_recur_start_frac:0.5\n" in log
    assert re.search(r"^model params:\d+ unique_blocks:2 passes:4 plan:0,1,0,1 ", log, re.M)


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("env, words", [
    ({"ROPE_DIMS": "80"}, ["ROPE_DIMS", "MODEL_DIM/NUM_HEADS=64"]),
    ({"ROPE_DIMS": "15"}, ["ROPE_DIMS", "even"]),
    ({"XSA_LAYERS": "0,11"}, ["XSA_LAYERS", "[0, 10]"]),
    ({"XSA_LAYERS": "first"}, ["XSA_LAYERS", "comma-separated"]),
    ({"VE_LAYERS": "11"}, ["VE_LAYERS", "[0, 10]", "negative"]),
    ({"VE_DIM": "0"}, ["VE_DIM", "[1, 4096]"]),
    ({"BIGRAM_BUCKETS": "1"}, ["BIGRAM_BUCKETS"]),
    ({"RECURRENCE": "1", "RECUR_PASSES": "5"}, ["RECURRENCE", "NUM_LAYERS=11", "= 9"]),
    ({"RECURRENCE": "1", "MINI_RECUR_REPEATS": "1"}, ["MINI_RECUR_REPEATS", "RECURRENCE"]),
    ({"MINI_RECUR_REPEATS": "1", "MINI_RECUR_FIRST": "6", "MINI_RECUR_LAST": "5"}, ["MINI_RECUR_FIRST"]),
    ({"MLP_ACTIVATION": "gelu"}, ["MLP_ACTIVATION", "leaky_relu2"]),
])
def test_bad_architecture_values_name_the_variable(env, words):
    assert_env_error(env, words)


def test_model_config_follows_the_hyperparameters():
    h = tg.Hyperparameters.from_env({"XSA_LAYERS": "1,2", "SMEAR_GATE": "0", "BIGRAM_DIM": "96", "VE_LAYERS": "none",
                                     "VE_DIM": "64"})
    cfg = tg.ModelConfig.from_hparams(h)
    assert (cfg.xsa_layers, cfg.smear_gate, cfg.bigram_dim, cfg.bos_id) == ("1,2", False, 96, 1)
    assert (cfg.ve_layers, cfg.ve_dim) == ("none", 64)
    assert type(cfg) is tg.ModelConfig and not hasattr(cfg, "seed")


def test_model_config_defaults_are_the_record_configuration():
    assert tg.ModelConfig() == tg.ModelConfig.from_hparams(tg.Hyperparameters.from_env({}))


# ---- causality, soft cap, loss and attention of a small default-shaped model ------------------------


def test_changing_token_t_changes_no_earlier_prediction():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 24))
    base = model.logits(x)
    for t in (0, 7, 23):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 64
        out = model.logits(x2)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])  # the token itself is seen from position t on


def test_logits_are_soft_capped_and_distributions_normalized():
    model = tiny_model()
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e4)  # drive raw logits far beyond the cap
    logits = model.logits(torch.randint(0, 64, (1, 16)))
    assert logits.abs().max() <= model.cfg.logit_softcap
    probs = torch.softmax(logits.double(), dim=-1).sum(-1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-9)


def test_forward_is_per_token_cross_entropy():
    model = tiny_model()
    x, y = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10))
    logp = torch.log_softmax(model.logits(x), -1)
    expected = -logp.gather(-1, y[..., None])[..., 0]
    assert torch.allclose(model(x, y), expected, atol=1e-5)


def test_gqa_matches_repeated_kv_heads():
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    ref = tg._sdpa(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    assert torch.allclose(tg._sdpa(q, k, v), ref, atol=1e-6)


def test_cpu_attention_backend_is_sdpa():
    name, _, why = tg.select_attention(torch.device("cpu"))
    assert name == "sdpa" and why


@pytest.mark.parametrize("setting, value", [("attn_gate_scale", 0.5), ("gate_window", 3)])
def test_gate_settings_change_the_output(setting, value):
    parts = {**BASELINE, **PARTS["attn_out_gate"], "smear_gate": True, "smear_gate_form": "input"}
    a = model(config(**parts))
    b = tg.GPT(config(**{**parts, setting: value})).eval()
    if setting == "gate_window":  # the gates' weights are narrower: load their first columns
        state = a.state_dict()
        for name in state:
            if name.endswith("out_gate") or name == "smear.gate":
                state[name] = state[name][..., :value]
        b.load_state_dict(state)
    else:
        b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert not torch.allclose(a.logits(tokens()), b.logits(tokens()), atol=1e-4)


def count(cfg: tg.ModelConfig) -> int:
    return sum(p.numel() for p in tg.GPT(cfg).parameters())


def test_each_part_adds_exactly_its_parameters():
    base = count(config(**BASELINE))
    assert count(config(**BASELINE, parallel_start_layer=1)) - base == 6 * (LAYERS - 1)  # 2 resid + 2x2 post
    assert count(config(**{**BASELINE, **PARTS["attn_out_gate"]})) - base == LAYERS * HEADS * WINDOW
    assert count(config(**{**BASELINE, **PARTS["input_smear_gate"]})) - base == WINDOW + 1  # W, lambda
    # The channel SmearGate has one gate per channel; the input form replaces it.
    assert count(config(**{**BASELINE, "smear_gate": True})) - base == DIM
    # The loop adds no parameter (a repeated layer shares its lane row too) unless its U-Net pairs the 8 passes
    # of the looped model: 2 more skips than the 4 layers' 2, each a weight and a gate per channel.
    plain_loop = {**APRIL_SMALL, "mini_recur_unet": False}
    assert count(config(**plain_loop)) == count(config(**{**plain_loop, "mini_recur_repeats": 0}))
    assert count(config(**APRIL_SMALL)) - count(config(**plain_loop)) == 2 * 2 * DIM


def test_april_preset_size_is_the_record_model_less_what_we_build_differently():
    h = tg.Hyperparameters.from_env({"PRESET": "april"})
    with torch.device("meta"):
        m = tg.GPT(tg.ModelConfig.from_hparams(h))
    params = sum(p.numel() for p in m.parameters())
    d, layers, heads, vocab = 512, 11, 8, 8192
    blocks = layers * (2 * d * d + 2 * d * 256 + 2 * 4 * d * d  # q, proj, k, v, MLP 4x
                       + 4 * d + heads + heads * 12)  # scales, resid mix, q gain, attention output gate
    skips = (11 + 2 * 3) // 2  # the U-Net spans the 17 passes of the looped model: 8 skips
    expected = vocab * d + blocks + 2 * skips * d + 6 * (layers - 8) + 12 + 1
    assert params == expected
    # The public run (35,945,671) also has lane weights for its 8 serial layers, which never uses them.
    assert params == 35_945_671 - 8 * 6
    assert m.describe().startswith(f"model params:{params} unique_blocks:11 passes:17 "
                                   "plan:0,1,2,3,4,5,3,4,5,3,4,5,6,7,8,9,10 ")
    assert m.describe().endswith(" parallel_passes:14,15,16 doc_masked_attention:sdpa_mask")  # the CPU's form


def block_inputs(m: tg.GPT, block: int) -> dict[str, list[torch.Tensor]]:
    """What the attention and the MLP of one block read, recorded on each call."""
    seen = {"attn": [], "mlp": []}
    for name in seen:
        getattr(m.blocks[block], name).register_forward_hook(
            lambda mod, args, out, name=name: seen[name].append(args[0].detach().clone()))
    return seen


def test_parallel_mlp_does_not_read_its_own_layers_attention():
    m = model(config(**{**BASELINE, "parallel_start_layer": 2}))
    seen = block_inputs(m, 2)
    x = tokens()
    with torch.no_grad():
        m.logits(x)
        m.blocks[2].attn.c_v.weight.mul_(3.0)  # changes layer 2's attention output only
        m.logits(x)
    assert torch.equal(seen["mlp"][0], seen["mlp"][1])  # the MLP read lane 1, untouched by that attention


def test_sequential_mlp_reads_its_own_layers_attention():
    # The check above could fail for the wrong reason; in a plain block the MLP does see the attention.
    m = model(config(**BASELINE))
    seen = block_inputs(m, 2)
    with torch.no_grad():
        m.logits(tokens())
        m.blocks[2].attn.c_v.weight.mul_(3.0)
        m.logits(tokens())
    assert not torch.allclose(seen["mlp"][0], seen["mlp"][1])


def test_lanes_follow_their_weights():
    m = model(config(**{**BASELINE, "parallel_start_layer": 2}))
    seen = block_inputs(m, 3)
    x = tokens()
    with torch.no_grad():
        m.logits(x)
        m.lane_post[0, :, 1] = 0.0  # layer 2 writes nothing to lane 1, which keeps its weight-scaled input
        m.lane_resid[0, 1] = 1.0
        m.logits(x)
        m.lane_post[0, 0, 1] = 2.0  # layer 2's attention into lane 1: layer 3's MLP input moves
        m.logits(x)
    lane1_in = seen["mlp"]
    assert not torch.allclose(lane1_in[0], lane1_in[1]) and not torch.allclose(lane1_in[1], lane1_in[2])
    assert torch.equal(seen["attn"][1], seen["attn"][2])  # attention reads lane 0, which did not change


def test_the_output_is_the_mean_of_the_lanes():
    m = model(config(**{**BASELINE, "parallel_start_layer": LAYERS - 1}))
    captured = {}
    m.final_norm.register_forward_hook(lambda mod, args, out: captured.update(x=args[0]))
    last = m.blocks[LAYERS - 1]
    lanes = {}
    orig = last.forward_lanes

    def spy(*args):
        lanes["out"] = orig(*args)
        return lanes["out"]
    last.forward_lanes = spy
    with torch.no_grad():
        m.logits(tokens())
    assert torch.allclose(captured["x"], (lanes["out"][0] + lanes["out"][1]) / 2)


def test_parallel_lane_weights_start_as_in_the_public_run():
    m = tg.GPT(config(**{**BASELINE, "parallel_start_layer": 1}))
    assert m.lane_resid.shape == (LAYERS - 1, 2) and (m.lane_resid == 1.1).all()
    assert m.lane_post.shape == (LAYERS - 1, 2, 2) and (m.lane_post == 1.0).all()
    plan = tg.layer_plan(config(**APRIL_SMALL), repeats_on=True)
    assert [p.block for p in plan] == [0, 1, 2, 1, 2, 1, 2, 3]
    assert [p.lanes for p in plan] == [-1] * 7 + [0]
    assert {"lane_resid", "lane_post"} <= m.fp16_param_names()


def test_loop_unet_spans_the_passes_of_the_looped_model():
    on, off = (tg.layer_plan(config(**APRIL_SMALL), repeats_on=r) for r in (True, False))
    assert [p.push for p in on] == [True] * 4 + [False] * 4  # blocks 0, 1, 2, 1 push ...
    assert [p.pop for p in on] == [-1] * 4 + [0, 1, 2, 3]  # ... blocks 2, 1, 2, 3 pop, in reverse order
    assert [(p.block, p.push, p.pop) for p in off] == [(0, True, -1), (1, True, -1), (2, False, 0), (3, False, 1)]
    plain = tg.layer_plan(config(**{**APRIL_SMALL, "mini_recur_unet": False}), repeats_on=True)
    assert [(p.push, p.pop) for p in plain] == [(True, -1), (True, -1), (False, 0), (False, -1), (False, -1),
                                                (False, -1), (False, -1), (False, 1)]  # repeats take no part
    m = tg.GPT(config(**APRIL_SMALL))
    assert m.skip_weights.shape[0] == 4 and m.skip_gates.shape[0] == 4  # the longer plan's skips


def test_loop_unet_changes_the_output_and_needs_the_loop():
    on = model(config(**APRIL_SMALL))
    off = tg.GPT(config(**{**APRIL_SMALL, "mini_recur_unet": False})).eval()
    state = {k: (v[:2] if k.startswith("skip_") else v) for k, v in on.state_dict().items()}
    off.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(on.logits(tokens()), off.logits(tokens()), atol=1e-4)
    assert_env_error({"MINI_RECUR_UNET": "1"}, ["MINI_RECUR_UNET", "MINI_RECUR_REPEATS"])


def test_attention_output_gate_starts_at_one_half_per_head():
    torch.manual_seed(0)
    gated = tg.CausalSelfAttention(config(**PARTS["attn_out_gate"]), tg._sdpa)
    plain = tg.CausalSelfAttention(config(), tg._sdpa)
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert unexpected == ["out_gate"] and not missing
    x = torch.randn(2, 10, DIM)
    with torch.no_grad():
        for attn in (gated, plain):
            attn.proj.weight.copy_(torch.eye(DIM))  # the output is the heads' outputs themselves
        heads = plain(x, True).view(2, 10, HEADS, -1)
        assert torch.allclose(gated(x, True).view_as(heads), 0.5 * heads, atol=1e-6)
        gated.out_gate[1] = 1.0  # head 1's gate now reads the first WINDOW dims of its input
        g = torch.sigmoid(gated.gate_scale * x[..., :WINDOW].sum(-1))
        expected = 0.5 * heads
        expected[:, :, 1] = g[..., None] * heads[:, :, 1]
        assert torch.allclose(gated(x, True).view_as(heads), expected, atol=1e-5)


def test_input_smear_gate_is_the_identity_at_init_and_stops_at_documents():
    torch.manual_seed(0)
    smear = tg.InputSmearGate(WINDOW, BOS)
    ids = tokens(batch=1)
    x = torch.randn(1, ids.size(1), DIM)
    assert torch.equal(smear(x, ids), x)  # W = 0, lambda = 0
    with torch.no_grad():
        smear.gate.normal_()
        smear.scale.fill_(0.7)
    out = smear(x, ids)
    g = torch.sigmoid(x[0, 10, :WINDOW] @ smear.gate)
    assert torch.allclose(out[0, 10], x[0, 10] + 0.7 * g * x[0, 9])  # x_t + lambda sigmoid(W x_t[:w]) x_{t-1}
    x2 = x.clone()
    x2[:, :9] = torch.randn(1, 9, DIM)  # a different previous document
    assert torch.equal(smear(x2, ids)[:, 9:], out[:, 9:])
    assert torch.equal(out[:, 9], x[:, 9]) and torch.equal(out[:, 0], x[:, 0])


def test_input_smear_gate_acts_before_the_embedding_norm():
    m = model(config(**{**BASELINE, **PARTS["input_smear_gate"]}))
    ids = tokens(batch=1)
    with torch.no_grad():
        raw = m.tok_emb(ids)
        assert torch.allclose(m.embed(ids), tg.rms_norm(m.smear(raw, ids)))
        ids2 = ids.clone()
        ids2[:, :9] = (ids[:, :9] + 5) % VOCAB
        ids2[:, :9][ids2[:, :9] == BOS] = 0
        assert torch.equal(m.embed(ids)[:, 9:], m.embed(ids2)[:, 9:])
