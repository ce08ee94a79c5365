"""The April parts (docs/april.md) and the presets: each part keeps the model causal, changes what it computes
and adds exactly its parameters; parallel residuals keep attention and the MLP on their own lanes; the gates
start where the public run starts them; the input SmearGate stops at documents; PRESET=april sets the
record's values under the explicit ones, logs what it set, and runs end to end on 1 and 2 processes; PRESET=may
is April plus the settings of the May leaderboard's best run, and runs end to end with TTT; every length of a
TRAIN_SEQ_SCHEDULE is compiled in the warm-up."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, assert_env_error, cpu_runtime, run_context, tiny_env
from test_architecture import BASELINE, BOS, assert_causal, DIM, HEADS, LAYERS, RECORD, VOCAB, config, model, tokens

WINDOW = 6
APRIL_PARTS = {  # each part alone, on top of the baseline
    "parallel": dict(parallel_start_layer=2),
    "attn_out_gate": dict(attn_out_gate=True, gate_window=WINDOW),
    "input_smear_gate": dict(smear_gate=True, smear_gate_form="input", gate_window=WINDOW),
}
APRIL_SMALL = dict(  # the April model's shape on 4 layers: lanes from layer 3, layers 1..2 three times
    parallel_start_layer=3, attn_out_gate=True, attn_gate_scale=0.5, smear_gate_form="input",
    gate_window=WINDOW, bigram_buckets=0, mlp_activation="leaky_relu2", qk_gain_init=5.0,
    mini_recur_repeats=2, mini_recur_first=1, mini_recur_last=2, mini_recur_unet=True)
CASES = {**{k: {**BASELINE, **v} for k, v in APRIL_PARTS.items()},
         "parallel_from_layer_1": {**BASELINE, "parallel_start_layer": 1},  # lanes in the U-Net's encoder half
         "record+parallel+recurrence": {**RECORD, "parallel_start_layer": 2, "recurrence": True,
                                        "recur_prelude": 1, "recur_passes": 2, "recur_coda": 1},
         "april": APRIL_SMALL}


@pytest.mark.parametrize("case", CASES)
def test_changing_token_t_changes_no_earlier_logit(case):
    assert_causal(model(config(**CASES[case])), case)


@pytest.mark.parametrize("part", APRIL_PARTS)
def test_each_part_changes_the_output(part):
    on = model(config(**{**BASELINE, **APRIL_PARTS[part]}))
    off = tg.GPT(config(**BASELINE)).eval()
    _, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert unexpected  # the part's own parameters, which the plain model lacks
    with torch.no_grad():
        assert not torch.allclose(on.logits(tokens()), off.logits(tokens()), atol=1e-4)


@pytest.mark.parametrize("setting, value", [("attn_gate_scale", 0.5), ("gate_window", 3)])
def test_gate_settings_change_the_output(setting, value):
    parts = {**BASELINE, **APRIL_PARTS["attn_out_gate"], "smear_gate": True, "smear_gate_form": "input"}
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
    assert count(config(**{**BASELINE, **APRIL_PARTS["attn_out_gate"]})) - base == LAYERS * HEADS * WINDOW
    assert count(config(**{**BASELINE, **APRIL_PARTS["input_smear_gate"]})) - base == WINDOW + 1  # W, lambda
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
    assert m.describe().endswith(" parallel_passes:14,15,16 doc_masked_attention:off")


# ---- parallel residuals -------------------------------------------------------------------------


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


# ---- the loop's U-Net ---------------------------------------------------------------------------


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


# ---- gates --------------------------------------------------------------------------------------


def test_attention_output_gate_starts_at_one_half_per_head():
    torch.manual_seed(0)
    gated = tg.CausalSelfAttention(config(**APRIL_PARTS["attn_out_gate"]), tg._sdpa)
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
    m = model(config(**{**BASELINE, **APRIL_PARTS["input_smear_gate"]}))
    ids = tokens(batch=1)
    with torch.no_grad():
        raw = m.tok_emb(ids)
        assert torch.allclose(m.embed(ids), tg.rms_norm(m.smear(raw, ids)))
        ids2 = ids.clone()
        ids2[:, :9] = (ids[:, :9] + 5) % VOCAB
        ids2[:, :9][ids2[:, :9] == BOS] = 0
        assert torch.equal(m.embed(ids)[:, 9:], m.embed(ids2)[:, 9:])


# ---- settings and presets -----------------------------------------------------------------------


@pytest.mark.parametrize("env, words", [
    ({"PARALLEL_START_LAYER": "11"}, ["PARALLEL_START_LAYER=11", "NUM_LAYERS=11"]),
    ({"PARALLEL_START_LAYER": "5", "MINI_RECUR_REPEATS": "1", "MINI_RECUR_FIRST": "4", "MINI_RECUR_LAST": "5"},
     ["MINI_RECUR_FIRST=4", "PARALLEL_START_LAYER=5"]),
    ({"SMEAR_GATE": "0", "SMEAR_GATE_FORM": "input"}, ["SMEAR_GATE_FORM=input", "SMEAR_GATE=1"]),
    ({"PRESET": "april", "SMEAR_GATE": "0"}, ["SMEAR_GATE_FORM=input", "SMEAR_GATE=1"]),
    ({"ATTN_OUT_GATE": "1", "GATE_WINDOW": "600"}, ["GATE_WINDOW=600", "MODEL_DIM=512"]),
    ({"PRESET": "june"}, ["PRESET", "seed, april, may"]),
    ({"PRESET": "april", "NUM_LAYERS": "6"}, ["PARALLEL_START_LAYER=8", "NUM_LAYERS=6"]),
])
def test_bad_settings_name_the_variables(env, words):
    assert_env_error(env, words)


def test_seed_preset_is_the_defaults():
    assert tg.Hyperparameters.from_env({}) == tg.Hyperparameters.from_env({"PRESET": "seed"})
    assert tg.PRESETS["seed"] == {}


def test_april_preset_sets_its_values_and_explicit_settings_win():
    h = tg.Hyperparameters.from_env({"PRESET": "april", "MATRIX_LR": "0.03", "SEED": "7"})
    assert (h.vocab_size, h.mlp_mult, h.parallel_start_layer, h.mini_recur_start_frac) == (8192, 4, 8, 0.35)
    assert (h.muon_momentum, h.muon_weight_decay, h.beta2, h.ema_decay, h.min_lr, h.warmdown_floor) == (
        0.97, 0.095, 0.99, 0.9965, 0.1, 0.0)
    assert (h.muon_ns_coeffs, h.muon_row_normalize) == ("polar_express", True)
    assert (h.matrix_lr, h.matrix_lr_late, h.seed) == (0.03, 0.026, 7)
    # Every variable of the preset is a setting, parses and lands in the config.
    fields = {f.name.upper(): f for f in tg.dataclasses.fields(tg.Hyperparameters)}
    april = tg.Hyperparameters.from_env({"PRESET": "april"})
    for key, raw in tg.PRESETS["april"].items():
        f = fields[key]
        assert getattr(april, f.name) == tg._parse_env_value(key, raw, f.default, f.metadata), key


def test_april_trains_on_the_caseops_variant_and_the_plain_sp8192_is_one_variable_away(tmp_path):
    """PRESET=april's data is where `data/cached_challenge_fineweb.py --variant <v>` puts variant v (its own plan
    of the files, on a manifest of the public layout); DATA_VARIANT=sp8192 is the plain sp8192; an explicit
    DATA_PATH or TOKENIZER_PATH wins over either."""
    from pathlib import Path

    import data.cached_challenge_fineweb as dl
    for env, variant in (({"PRESET": "april"}, dl.CASEOPS_VARIANT), ({"PRESET": "april", "DATA_VARIANT": "sp8192"},
                                                                     "sp8192"), ({"DATA_VARIANT": "sp1024"}, "sp1024")):
        manifest = {"datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "tok", "val_bytes_glob": "x",
                                  "stats": {"files_train": 1, "files_val": 1}}],
                    "tokenizers": [{"name": "tok", "model_path": f"tokenizers/fineweb_{variant[2:6]}_bpe"
                                    f"{variant[6:]}.model"}]}
        if variant == dl.CASEOPS_VARIANT:  # the public manifest's own names (tests/test_caseops.py's fake hub)
            assert manifest["tokenizers"][0]["model_path"] == \
                "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
        plan = dl.plan_downloads(manifest, variant, 1, Path("data"))
        h = tg.Hyperparameters.from_env(env)
        assert (h.data_variant, Path(h.data_path), Path(h.tokenizer_path)) == (
            variant, plan[0].local.parent, next(i.local for i in plan if i.role == "tokenizer"))
    assert tg.Hyperparameters.from_env({"DATA_VARIANT": "sp1024"}).data_path == tg.Hyperparameters().data_path
    h = tg.Hyperparameters.from_env({"PRESET": "april", "DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"})
    assert (h.data_path, h.tokenizer_path) == ("/d", "/t.model")
    assert_env_error({"DATA_VARIANT": "fineweb"}, ["DATA_VARIANT='fineweb'", "sp<vocab>"])


def test_describe_preset_names_what_it_set_and_what_was_overridden():
    line = tg.describe_preset("april", {"MATRIX_LR": "0.03"})
    assert line.startswith("preset name:april set:VOCAB_SIZE=8192,")
    assert "MATRIX_LR=" not in line.split(" overridden:")[0] and line.endswith(" overridden:MATRIX_LR")
    assert tg.describe_preset("seed", {}) == "preset name:seed set:none overridden:none"


def april_tiny_env(data, out, **overrides):
    """PRESET=april (or another preset on top of it) at the tiny test size: the sizes and data come from
    tiny_env (explicit, so they win), the layer ids of the parts shrink with the depth."""
    overrides.setdefault("PRESET", "april")
    return tiny_env(data, out, NUM_LAYERS="4", PARALLEL_START_LAYER="3", MINI_RECUR_FIRST="1",
                    MINI_RECUR_LAST="2", GATE_WINDOW="8", VAL_LOSS_EVERY="0", EVAL_STRIDE="32", **overrides)


FINAL = re.compile(r"^(final_\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)
TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:(\d+\.\d+)", re.M)


@pytest.fixture(scope="module")
def april_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("april")
    env = april_tiny_env(tiny_data, out, RUN_ID="april")
    tg.main(env)
    return env, (out / "april.txt").read_text()


def test_april_preset_runs_end_to_end_and_logs_every_value(april_run):
    env, log = april_run
    assert {m[0] for m in FINAL.findall(log)} == {"final_float_exact", "final_roundtrip_exact",
                                                  "final_sliding_window_exact"}
    assert "hparam preset:april\n" in log and "hparam mlp_activation:leaky_relu2\n" in log
    assert "hparam mlp_mult:2\n" in log and "hparam num_layers:4\n" in log  # set explicitly: they win
    assert "hparam parallel_start_layer:3\n" in log and "hparam smear_gate_form:input\n" in log
    preset = re.search(r"^preset name:april set:(\S+) overridden:(\S+)$", log, re.M)
    assert "MLP_ACTIVATION=leaky_relu2" in preset[1] and "MLP_MULT" not in preset[1]
    assert {"VOCAB_SIZE", "MLP_MULT", "PARALLEL_START_LAYER", "DATA_PATH"} <= set(preset[2].split(","))
    assert re.findall(r"^mini_recurrence:(\w+) step:(\d+)", log, re.M) == [("off", "0"), ("on", "5")]  # 0.35 x 12
    assert re.search(r"^model params:\d+ unique_blocks:4 passes:8 plan:0,1,2,1,2,1,2,3 .* parallel_passes:7 "
                     r"doc_masked_attention:\w+$",
                     log, re.M)


def test_april_preset_on_two_gloo_processes_matches_one(tiny_data, tmp_path, april_run):
    env = april_tiny_env(tiny_data, tmp_path, RUN_ID="april_ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "april_ddp.txt").read_text()
    assert "runtime world_size:2" in log and "preset name:april" in log
    one, two = TRAIN.findall(april_run[1]), TRAIN.findall(log)
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert abs(float(a) - float(b)) <= 2e-4
    for (name, la, ba), (_, lb, bb) in zip(FINAL.findall(april_run[1]), FINAL.findall(log)):
        assert abs(float(la) - float(lb)) < 1e-4 and abs(float(ba) - float(bb)) < 1e-4, name


def test_april_loop_graphs_are_both_compiled_in_warm_up(tiny_data, tmp_path):
    """The loop switches on at 35% of training: warm-up traces the model with and without the repeats
    (torch.compile keeps one graph per plan), so the switch in the timed run compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env(april_tiny_env(tiny_data, tmp_path, WARMUP_STEPS="2"))
    base = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    counter = CompileCounter()  # traces with dynamo, runs eagerly: checks the guards, not codegen
    compiled = torch.compile(base, backend=counter, dynamic=False, fullgraph=True)
    rt = cpu_runtime()
    optimizers = tg.build_optimizers(base, h, rt)
    logs = []
    tg.prime_kernels(tg.Trainee(compiled, base, optimizers), run_context(h, logs.append, rt))
    assert counter.frame_count == 2 and "graphs:qat0_repeats0,qat0_repeats1 " in logs[0]
    schedule, loader = tg.Schedule(h, h.gptq_reserve_seconds), tg.make_train_loader(h, rt)
    states = []
    for step in range(h.iterations):
        states.append(schedule.at(step, 0.0).repeats_on)
        base.set_mini_recurrence(states[-1])
        assert torch.isfinite(tg.train_step(compiled, optimizers, loader, h, rt))
    assert states[0] is False and states[-1] is True  # the run crossed the switch
    assert counter.frame_count == 2  # and compiled nothing more


def test_every_sequence_length_is_compiled_in_warm_up(tiny_data, tmp_path):
    """TRAIN_SEQ_SCHEDULE with the loop: the warm-up traces each (length, loop) pair the run meets (dynamic=False:
    one graph per shape), so neither a length switch nor the loop switch compiles in the timed run."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env(april_tiny_env(tiny_data, tmp_path, WARMUP_STEPS="4",
                                                   TRAIN_SEQ_SCHEDULE="16@0.2,32@0.5,64@1.0", SEQ_CHANGE_WARMUP_STEPS="2"))
    base = tg.build_model(tg.ModelConfig.from_hparams(h), torch.device("cpu"))
    counter = CompileCounter()
    compiled = torch.compile(base, backend=counter, dynamic=False, fullgraph=True)
    rt = cpu_runtime()
    optimizers = tg.build_optimizers(base, h, rt)
    logs = []
    tg.prime_kernels(tg.Trainee(compiled, base, optimizers), run_context(h, logs.append, rt))
    assert counter.frame_count == 4
    assert torch._dynamo.config.recompile_limit >= 8 + 2  # room for the two graphs the schedule adds
    assert logs[-1].startswith("warmup steps:4 graphs:seq16_qat0_repeats0,seq32_qat0_repeats0,"
                               "seq32_qat0_repeats1,seq64_qat0_repeats1 ")
    schedule, loader = tg.Schedule(h, h.gptq_reserve_seconds), tg.make_train_loader(h, rt)
    met = []
    for step in range(h.iterations):
        s = schedule.at(step, 0.0)
        base.set_mini_recurrence(s.repeats_on)
        met.append((s.seq_len, s.repeats_on))
        assert torch.isfinite(tg.train_step(compiled, optimizers, loader, h, rt, s.seq_len))
    assert list(dict.fromkeys(met)) == tg.train_shapes(h)  # the run met every primed pair
    assert counter.frame_count == 4  # and compiled nothing more


MAY_OVER_APRIL = {"EVAL_SEQ_LEN": "2560", "TTT_EVAL_SEQ_LEN": "2560", "PHASED_TTT_NUM_PHASES": "1",
                  "TTT_LORA_LR": "8e-5", "TTT_WEIGHT_DECAY": "2.0", "MATRIX_LR": "0.028", "MATRIX_LR_LATE": "0.028",
                  "LQER_GROUP": "32", "GPTQ_CALIB_SEQS": "1536"}


def test_may_preset_is_april_plus_the_best_may_run_and_explicit_settings_win():
    assert tg.PRESETS["may"] == {**tg.PRESETS["april"], **MAY_OVER_APRIL}
    h = tg.Hyperparameters.from_env({"PRESET": "may", "LQER_GROUP": "64"})
    assert (h.eval_seq_len, h.ttt_eval_seq_len, h.phased_ttt_num_phases, h.phased_ttt_prefix_docs) == (2560, 2560, 1, 2500)
    assert (h.ttt_lora_lr, h.ttt_weight_decay, h.matrix_lr, h.matrix_lr_late, h.gptq_calib_seqs) == (
        8e-5, 2.0, 0.028, 0.028, 1536)
    assert h.lqer_group == 64 and h.vocab_size == 8192 and h.parallel_start_layer == 8  # explicit wins; April under it
    # The parts each public May run added beside #2135 stay off (the CPU ablation decides): docs/may.md.
    assert (h.awq_groups, h.train_seq_schedule) == (0, "")
    fields = {f.name.upper(): f for f in tg.dataclasses.fields(tg.Hyperparameters)}
    may = tg.Hyperparameters.from_env({"PRESET": "may"})
    for key, raw in tg.PRESETS["may"].items():
        f = fields[key]
        assert getattr(may, f.name) == tg._parse_env_value(key, raw, f.default, f.metadata), key


def test_may_preset_runs_end_to_end_with_one_global_ttt_phase(tiny_data, tmp_path):
    env = april_tiny_env(tiny_data, tmp_path, PRESET="may", RUN_ID="may", ITERATIONS="6", TTT="1",
                         TTT_EVAL_SEQ_LEN="64", TTT_CHUNK_SIZE="16", TTT_LORA_RANK="4", TTT_BATCH_SIZE="8",
                         PHASED_TTT_PREFIX_DOCS="12", GLOBAL_TTT_CHUNK_TOKENS="512")  # TTT at 2,560: minutes here
    tg.main(env)
    log = (tmp_path / "may.txt").read_text()
    assert [m[0] for m in FINAL.findall(log)] == ["final_float_exact", "final_roundtrip_exact",
                                                  "final_sliding_window_exact", "final_ttt_exact"]
    for line in ("hparam preset:may", "hparam phased_ttt_num_phases:1", "hparam ttt_weight_decay:2.0",
                 "hparam matrix_lr:0.028", "hparam lqer_group:32", "hparam gptq_calib_seqs:64"):
        assert line + "\n" in log
    preset = re.search(r"^preset name:may set:(\S+) overridden:(\S+)$", log, re.M)
    assert "PHASED_TTT_NUM_PHASES=1" in preset[1] and {"GPTQ_CALIB_SEQS", "TTT_EVAL_SEQ_LEN"} <= set(preset[2].split(","))
    assert len(re.findall(r"^ttt_phase .* global_sgd_tokens:", log, re.M)) == 1  # one global phase
    assert re.search(r"^lqer tensors:\d+ rank:4 a_bits:2 b_bits:4 group:32 ", log, re.M)
