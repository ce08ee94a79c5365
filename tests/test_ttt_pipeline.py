"""Test-time training in the whole pipeline (docs/ttt.md): final_ttt_exact after the sliding-window line,
the earlier lines unchanged, the budget and legality lines; the artifact's weights are what adapts; the
n-gram tilt on top of TTT; document-masked training; the log readers submit TTT's line. (Two gloo
processes: tests/test_ttt.py, on ttt_score itself.)"""

from __future__ import annotations

import hashlib
import math
import os
import re

import pytest
import torch

import train_gpt as tg
from conftest import run_in_process, tiny_env

FINAL = re.compile(r"^(final_\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)
TTT_SETTINGS = dict(TTT="1", TTT_EVAL_SEQ_LEN="64", TTT_CHUNK_SIZE="16", TTT_LORA_RANK="4", TTT_BATCH_SIZE="8",
                    TTT_LORA_LR="0.003", PHASED_TTT_PREFIX_DOCS="12", PHASED_TTT_NUM_PHASES="2",
                    GLOBAL_TTT_CHUNK_TOKENS="512", ITERATIONS="6", VAL_LOSS_EVERY="0")


@pytest.fixture(scope="module")
def ttt_run(tiny_data, tmp_path_factory):
    """A run with TTT, watched: the weights TTT starts from, the artifact's bytes when it starts and after."""
    out = tmp_path_factory.mktemp("ttt")
    env = tiny_env(tiny_data, out, RUN_ID="ttt", **TTT_SETTINGS)
    seen = {}
    evaluate = tg.ttt_evaluate

    def watched(model, *args, **kwargs):
        seen["start"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["artifact_at_start"] = hashlib.sha256((out / "ttt.ptz").read_bytes()).hexdigest()
        result = evaluate(model, *args, **kwargs)
        seen["end"] = {k: v.clone() for k, v in model.state_dict().items()}
        return result
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "ttt_evaluate", watched)
        log = run_in_process(env)
    return env, log, seen


@pytest.fixture(scope="module")
def plain_run(tiny_data, tmp_path_factory):
    """The same run without TTT."""
    env = tiny_env(tiny_data, tmp_path_factory.mktemp("plain"), RUN_ID="plain", **{**TTT_SETTINGS, "TTT": "0"})
    return run_in_process(env)


def test_final_ttt_line_follows_the_sliding_window_line(ttt_run, plain_run):
    env, log, _ = ttt_run
    names = [m[0] for m in FINAL.findall(log)]
    assert names == ["final_float_exact", "final_roundtrip_exact", "final_sliding_window_exact", "final_ttt_exact"]
    assert re.search(r"^final_ttt_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8} eval_time:\d+ms ", log, re.M)
    assert re.search(r"^ttt_budget docs:40 flops:\S+ assumed_tflops_per_gpu:147 predicted_8xh100:\S+s$", log, re.M)
    assert re.search(r"^legality ttt_eval verdict:within predicted_8xh100:\S+s global_sgd:\S+s sgd_steps:\d+ "
                     r"windows:\S+s ngram:0.0s compile:\S+s total:\S+s margin:\S+s cap:600s$", log, re.M)
    measured = re.search(r"^legality ttt_eval verdict:not_8xh100 measured:(\S+)s windows:(\S+)s total:(\S+)s "
                         r"on:1xcpu cap:600s$", log, re.M)
    window_ms = sum(map(float, re.findall(r"^final_(?:roundtrip|sliding_window)_exact .* eval_time:(\d+)ms", log,
                                          re.M)))
    assert float(measured[2]) >= window_ms / 1000 - 0.1  # the window passes count with TTT
    assert float(measured[3]) == pytest.approx(float(measured[1]) + float(measured[2]), abs=0.11)
    assert len(re.findall(r"^ttt_phase \d/3 ", log, re.M)) == 3 and "global_sgd_tokens:" in log
    for line in ("hparam ttt:True", "hparam ttt_lora_rank:4", "hparam phased_ttt_prefix_docs:12"):
        assert line in log
    # TTT changes none of the lines before it: the same run without it logs the same numbers.
    assert FINAL.findall(plain_run) == FINAL.findall(log)[:3]
    assert not re.search(r"^(ttt_budget|final_ttt_exact) ", plain_run, re.M)


def test_what_adapts_is_the_artifact(ttt_run):
    env, _, seen = ttt_run
    artifact = os.path.join(env["OUT_DIR"], "ttt.ptz")
    _, state = tg.load_artifact(artifact)
    assert seen["start"].keys() == state.keys()
    assert all(torch.equal(seen["start"][k], state[k].to(seen["start"][k].dtype)) for k in state)
    assert any(not torch.equal(seen["end"][k], seen["start"][k]) for k in state)  # the global SGD adapted it
    with open(artifact, "rb") as f:  # ... and nothing adapted was written back
        assert hashlib.sha256(f.read()).hexdigest() == seen["artifact_at_start"]


def test_ngram_tilt_on_top_of_ttt(ttt_run):
    import eval_ngram_on_checkpoint as ev
    env, log, _ = ttt_run
    finals = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall(log)}
    ng_env = {k: v for k, v in env.items() if k != "TTT"}
    ng_env.update(ARTIFACT_PATH=os.path.join(env["OUT_DIR"], "ttt.ptz"), NGRAM_TTT="1")
    ev.main(ng_env)
    ng_log = open(os.path.join(env["OUT_DIR"], "ttt_ngram.txt"), encoding="utf-8").read()
    lines = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"^(ngram_eval_\w+) val_loss:(\S+) val_bpb:(\S+)",
                                                                  ng_log, re.M)}
    assert lines["ngram_eval_plain"] == pytest.approx(finals["final_ttt_exact"], abs=2e-8)  # TTT's own score
    assert lines["ngram_eval_tilted"] != lines["ngram_eval_plain"]
    assert "ngram_setting ngram_ttt:True" in ng_log and "ttt_budget docs:40" in ng_log


def test_document_masked_training_is_recorded_and_logged(tiny_data, tmp_path, plain_run):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="masked", DOC_MASKED_ATTENTION="1", **{**TTT_SETTINGS, "TTT": "0"})
    log = run_in_process(env)
    assert "hparam doc_masked_attention:True" in log and " doc_masked_attention:sdpa_mask" in log
    assert " doc_masked_attention:off" in plain_run
    cfg, _ = tg.load_artifact(tmp_path / "masked.ptz")
    assert cfg.doc_masked_attention
    assert FINAL.findall(plain_run)[0] != FINAL.findall(log)[0]  # the mask changes what the model learns


def test_the_logs_readers_submit_ttts_line_when_ttt_is_on(ttt_run, plain_run):
    from scripts.runlog import parse_log
    env, log, _ = ttt_run
    with_ttt = parse_log(os.path.join(env["OUT_DIR"], "ttt.txt"))
    finals = {m[0]: float(m[2]) for m in FINAL.findall(log)}
    assert with_ttt.submission_metric == "final_ttt_exact"
    assert with_ttt.submission.val_bpb == finals["final_ttt_exact"] != finals["final_sliding_window_exact"]
    times = re.search(r"^final_ttt_exact .*eval_time:(\d+)ms compile_time:(\d+)ms", log, re.M)
    assert with_ttt.finals["final_ttt_exact"].eval_time_ms == float(times[1]) + float(times[2])  # the warm-up counts
    without = parse_log(os.path.join(re.search(r"^hparam out_dir:(\S+)", plain_run, re.M)[1], "plain.txt"))
    assert without.submission_metric == "final_sliding_window_exact"


MAY_SETTINGS = dict(ASYM_LOGIT="1", TTT_LORA_TARGETS="k,o,mlp,head", TTT_LORA_ALPHA="8", TTT_SHORT_CHUNKS="16:4,40:8",
                    PHASED_TTT_NUM_PHASES="1", NGRAM_TILT="token")


def test_the_may_evaluation_parts_together(ttt_run, tiny_data, tmp_path):
    """AsymLogit, LoRA targets and alpha, short chunks, one global phase and the token tilt in one run: training and
    the window passes as without them; TTT's line, then the tilted line; the soft caps adapted by the one global
    SGD phase and absent from the artifact; the budget line with the n-gram precompute."""
    _, april, _ = ttt_run
    env = tiny_env(tiny_data, tmp_path, RUN_ID="may", **{**TTT_SETTINGS, **MAY_SETTINGS})
    log = run_in_process(env)
    names = [m[0] for m in FINAL.findall(log)]
    assert names == ["final_float_exact", "final_roundtrip_exact", "final_sliding_window_exact", "final_ttt_exact",
                     "final_ttt_ngram_exact"]
    assert FINAL.findall(log)[:3] == FINAL.findall(april)[:3]  # ASYM_LOGIT changes nothing before TTT
    assert FINAL.findall(log)[3] != FINAL.findall(april)[3]
    assert re.search(r"^final_ttt_ngram_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8} expert:token threshold:0.8 "
                     r"boost:2.625 fired:0\.\d{6}$", log, re.M)
    assert re.search(r"^ngram_hints expert:token context:15 tokens:\d+ time:\d+ms$", log, re.M)
    phases = re.findall(r"^ttt_phase (\d)/(\d) .*$", log, re.M)
    assert [p[:2] for p in phases] == [("1", "2"), ("2", "2")]  # one global phase: SGD after document 12, then the rest
    caps = re.search(r"^ttt_phase 1/2 .* softcap_pos:(\S+) softcap_neg:(\S+) ", log, re.M)
    # The phase logs both caps; the tiny model's logits stay where tanh is straight, so the SGD moves them by less
    # than the 7 decimals printed: that it adapts them is test_ttt's (at a cap of 3).
    assert caps and math.isfinite(float(caps[1])) and math.isfinite(float(caps[2]))
    parts = re.search(r"^legality ttt_eval verdict:within .* ngram:(\S+)s compile:(\S+)s total:\S+s margin:\S+s",
                      log, re.M)
    # the n-gram precompute of a tiny validation set is under 0.05 s (its prediction: test_ttt's); the line names it
    assert parts and float(parts[1]) >= 0 and float(parts[2]) == tg.TTT_COMPILE_SECONDS + 2 * tg.TTT_COMPILE_SECONDS_PER_CHUNK
    for line in ("hparam asym_logit:True", "hparam ttt_lora_targets:k,o,mlp,head", "hparam ttt_lora_alpha:8.0",
                 "hparam ttt_short_chunks:16:4,40:8", "hparam ngram_tilt:token", "hparam ngram_token_boost:2.625"):
        assert line in log
    cfg, state = tg.load_artifact(tmp_path / "may.ptz")
    assert cfg.asym_logit and not any("softcap" in k for k in state)  # 0 bytes: rebuilt from LOGIT_SOFTCAP


def test_the_logs_readers_submit_the_tilted_line_when_the_tilt_is_on(tmp_path):
    from scripts.runlog import submission_metric_for
    assert submission_metric_for({"ttt": "True", "ngram_tilt": "token"}) == "final_ttt_ngram_exact"
    assert submission_metric_for({"ttt": "False", "ngram_tilt": "token"}) == "final_sliding_window_ngram_exact"
    assert submission_metric_for({"ttt": "True", "ngram_tilt": "off"}) == "final_ttt_exact"
    assert submission_metric_for({"ttt": "True"}) == "final_ttt_exact"  # logs from before the setting
    assert submission_metric_for({"ttt": "False"}) == "final_sliding_window_exact"
