"""The n-gram agreement pass: the C state against the Python reference, causality, normalization of
the tilt and of the cache mixture, table growth and errors, and eval_ngram_on_checkpoint.py against
train_gpt.py's sliding-window number."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_ngram_on_checkpoint as ev
import online_ngram as ng
import train_gpt as tg
from conftest import ROOT, TINY_VOCAB, tiny_env

KINDS = (ng.PIECE_CONTINUATION, ng.PIECE_WORD_START, ng.PIECE_BOUNDARY)


def random_tables(vocab: int, seed: int) -> ng.WordTables:
    rng = np.random.default_rng(seed)
    kind = rng.choice(KINDS, size=vocab, p=[0.5, 0.45, 0.05]).astype(np.uint8)
    norm_id = rng.integers(0, vocab // 2, size=vocab).astype(np.int32)  # several pieces share a normal form
    return ng.WordTables(kind, norm_id)


def repetitive_stream(n: int, vocab: int, seed: int) -> np.ndarray:
    """Random tokens with long repeated stretches, so that every expert's contexts recur."""
    rng = np.random.default_rng(seed)
    motifs = [rng.integers(0, vocab, size=rng.integers(5, 60)) for _ in range(20)]
    parts = [motifs[i] if rng.random() < 0.7 else rng.integers(0, vocab, size=8)
             for i in rng.integers(0, len(motifs), size=n // 10)]
    return np.concatenate(parts)[:n].astype(np.uint16)


@pytest.fixture(scope="module")
def real(tiny_data):
    """The tiny dataset's validation tokens and its tokenizer's word tables."""
    sp = tg.load_tokenizer(str(tiny_data["tokenizer_model"]))
    tokens = tg.load_validation_tokens(str(tiny_data["output_dir"]))
    return tokens, ng.build_word_tables(sp, TINY_VOCAB)


def assert_hints_match_reference(tokens, tables) -> ng.Hints:
    hints = ng.hint_pass(tokens, tables)
    ref_hint, ref_conf = ng.reference_hints(tokens, tables)
    np.testing.assert_array_equal(hints.hint, ref_hint)
    np.testing.assert_array_equal(hints.conf, ref_conf)
    return hints


# ---- the C state against the reference --------------------------------------------------------------


@pytest.mark.parametrize("vocab, seed", [(12, 0), (40, 1), (300, 2)])
def test_hints_match_reference_on_random_streams(vocab, seed):
    hints = assert_hints_match_reference(repetitive_stream(6000, vocab, seed), random_tables(vocab, seed))
    assert ((hints.hint >= 0).mean(axis=1) > 0.05).all()  # every expert really hinted
    assert ((hints.conf > 0) & (hints.conf < 1)).any(axis=1).all()  # and with mixed counts


def test_hints_match_reference_on_real_text(real):
    tokens, tables = real
    hints = assert_hints_match_reference(tokens[:15000], tables)
    for e, threshold in enumerate((0.8, 0.45, 0.65)):
        assert (hints.conf[e] >= threshold).sum() > 50, ng.EXPERTS[e]
    # The within-word expert hints continuation pieces only; the word-start expert word-initial ones,
    # except at a document's start, where any piece starts a word.
    kinds = tables.kind[hints.hint[1:].clip(0)]
    assert (kinds[0][hints.hint[1] >= 0] == ng.PIECE_CONTINUATION).all()
    continuation = (kinds[1] == ng.PIECE_CONTINUATION) & (hints.hint[2] >= 0)
    assert continuation.any() and (tables.kind[tokens[np.flatnonzero(continuation) - 1]] == ng.PIECE_BOUNDARY).all()


def test_table_sizes_do_not_change_results(real, monkeypatch):
    tokens, tables = real
    roomy = ng.hint_pass(tokens, tables)
    tight = ng.hint_pass(tokens, tables, slots_per_entry=1.05)  # nearly full tables: long probes
    np.testing.assert_array_equal(tight.hint, roomy.hint)
    np.testing.assert_array_equal(tight.conf, roomy.conf)
    assert (tight.stats.used == roomy.stats.used).all() and tight.stats.slots[0] < roomy.stats.slots[0]
    assert (roomy.stats.slots[2::3] > 64).any()  # a pairs table grew beyond its first 64 slots
    prob, stats = ng.cache_pass(tokens[:5000], TINY_VOCAB)
    monkeypatch.setattr(ng, "INITIAL_SLOTS", 4)  # cache tables that start tiny and double many times
    grown, grown_stats = ng.cache_pass(tokens[:5000], TINY_VOCAB)
    np.testing.assert_array_equal(grown, prob)
    assert (grown_stats.used == stats.used).all()


def test_cache_matches_reference(real):
    tokens, _ = real
    for stream, vocab in ((tokens[:3000], TINY_VOCAB), (repetitive_stream(3000, 20, 3), 20)):
        prob, _ = ng.cache_pass(stream, vocab)
        np.testing.assert_array_equal(prob, ng.reference_cache(stream, vocab))
        assert (prob > 0).all() and (prob <= 1).all()


def test_full_table_and_bad_tokens_are_clear_errors(real):
    tokens, tables = real
    with pytest.raises(RuntimeError, match=r"n-gram table token_singles is full \(\d+ slots\) on a stream of"):
        ng.hint_pass(tokens, tables, slots_per_entry=0.5)
    caps = ng.cache_capacities(len(tokens), TINY_VOCAB, ng.CACHE_MAX_ORDER)
    caps[3] = 100  # order3_pairs
    with pytest.raises(RuntimeError, match=r"n-gram table order3_pairs is full \(100 slots\)"):
        ng.cache_pass(tokens, TINY_VOCAB, max_slots=caps)
    bad = tokens[:100].copy()
    bad[57] = TINY_VOCAB
    with pytest.raises(ValueError, match=f"token {TINY_VOCAB} at position 57 is outside the vocabulary"):
        ng.hint_pass(bad, tables)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ng.cache_pass(bad, TINY_VOCAB)
    wide = tokens[:100].astype(np.int64)
    for value in (65536 + 7, -1):  # in range once narrowed to uint16 (7, 65535 -> caught only as a wide id)
        wide[40] = value
        for run in (lambda: ng.hint_pass(wide, tables), lambda: ng.cache_pass(wide, TINY_VOCAB)):
            with pytest.raises(ValueError, match=f"token {value} at position 40 is outside the vocabulary"):
                run()


def test_library_rebuilds_when_the_source_is_newer_and_needs_a_compiler(tmp_path, monkeypatch):
    source = tmp_path / ng.SOURCE.name
    shutil.copy(ng.SOURCE, source)
    monkeypatch.setattr(ng, "SOURCE", source)
    monkeypatch.setattr(ng, "BUILD_DIR", tmp_path / "build")
    ng.load_library()
    lib = tmp_path / "build" / (source.stem + ".so")
    os.utime(lib, (1, 1))  # older than the source: must be rebuilt
    ng.load_library()
    assert lib.stat().st_mtime > source.stat().st_mtime - 1
    os.utime(lib, (1, 1))
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(RuntimeError, match="needs a C compiler and `no-such-compiler` is not on PATH"):
        ng.load_library()


# ---- legality ---------------------------------------------------------------------------------------


def tiny_model(vocab: int, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    cfg = tg.ModelConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                         rope_dims=4)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.3)  # peaked distributions, so that gains and gates vary
    return model.eval()


def tilt_decisions(model, tokens: np.ndarray, tables: ng.WordTables, cfg: ng.TiltConfig):
    """(hint, beta, expert) for positions 1..N-1 of one sequence, as the evaluation computes them."""
    hints = ng.hint_pass(tokens, tables)
    x = torch.from_numpy(tokens[:-1].astype(np.int64))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(x)[0].double(), -1)  # row i predicts token i + 1
    pos = torch.arange(1, len(tokens))
    boundary = torch.from_numpy(tables.kind == ng.PIECE_BOUNDARY)
    h, beta, expert, _ = ng.select_hints(logp, boundary[x[0]], torch.from_numpy(hints.hint)[:, pos].long(),
                                         torch.from_numpy(hints.conf)[:, pos].double(),
                                         ng.piece_masks(tables, "cpu").double(), cfg)
    return hints, torch.stack([h.double(), beta, expert.double()])


LOW_GATES = ng.TiltConfig((0.3, 0.3, 0.3), (2.625, 0.75, 0.75), 0.5)


def test_changing_token_t_changes_nothing_up_to_t(real):
    tokens, tables = real
    tokens = tokens[:2000].copy()
    model = tiny_model(TINY_VOCAB)
    hints, decisions = tilt_decisions(model, tokens, tables, LOW_GATES)
    assert (decisions[0] >= 0).sum() > 50  # the tilt fires: the check below has something to compare
    rng = np.random.default_rng(0)
    later_changed = 0
    for t in (100, 777, 1234, 1500, 1998):
        changed = tokens.copy()
        changed[t] = (changed[t] + rng.integers(1, TINY_VOCAB)) % TINY_VOCAB
        hints2, decisions2 = tilt_decisions(model, changed, tables, LOW_GATES)
        # Hints for positions 0..t (t's own included) and decisions for targets 1..t are unchanged.
        np.testing.assert_array_equal(hints2.hint[:, :t + 1], hints.hint[:, :t + 1])
        np.testing.assert_array_equal(hints2.conf[:, :t + 1], hints.conf[:, :t + 1])
        assert torch.equal(decisions2[:, :t], decisions[:, :t])
        later_changed += not np.array_equal(hints2.hint[:, t + 1:], hints.hint[:, t + 1:])
    assert later_changed >= 3  # later positions do see the change


def random_rows(n: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3, -1)
    hint = torch.randint(-1, vocab, (3, n), generator=g)
    conf = torch.rand(3, n, generator=g, dtype=torch.float64)
    after_boundary = torch.rand(n, generator=g) < 0.2
    return logp, hint, conf, after_boundary


def test_tilted_distribution_is_normalized():
    tables = random_tables(50, 0)
    logp, hint, conf, after_boundary = random_rows(400, 50, 0)
    cfg = ng.TiltConfig((0.2, 0.2, 0.2), (2.625, 0.75, 0.75), 0.5)
    h, beta, _, _ = ng.select_hints(logp, after_boundary, hint, conf, ng.piece_masks(tables, "cpu").double(), cfg)
    assert (h >= 0).float().mean() > 0.3
    for b in (beta, beta * 5):  # also far beyond the public boosts
        tilted = ng.tilt_logprobs(logp, h, b)
        assert torch.allclose(tilted.exp().sum(-1), torch.ones(400, dtype=torch.float64), rtol=0, atol=1e-9)
        moved = (tilted - logp).abs().amax(-1) > 0
        assert torch.equal(moved, h >= 0)  # rows without a hint come back unchanged


def test_selection_follows_the_expected_gain_rule():
    vocab = 6
    kind = np.array([ng.PIECE_WORD_START] * 3 + [ng.PIECE_CONTINUATION] * 2 + [ng.PIECE_BOUNDARY], dtype=np.uint8)
    masks = ng.piece_masks(ng.WordTables(kind, np.arange(vocab, dtype=np.int32)), "cpu").double()
    probs = torch.tensor([[0.3, 0.1, 0.1, 0.2, 0.2, 0.1]] * 4, dtype=torch.float64)
    hint = torch.tensor([[0, -1, 0, 1], [3, 3, 3, 3], [1, 1, 0, 0]])
    conf = torch.tensor([[0.9, 0.0, 0.9, 0.5], [0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.7]], dtype=torch.float64)
    after_boundary = torch.tensor([False, True, False, False])
    cfg = ng.TiltConfig((0.8, 0.45, 0.65), (2.625, 0.75, 0.75), 0.5)
    h, beta, expert, agreed = ng.select_hints(probs.log(), after_boundary, hint, conf, masks, cfg)

    def gain(p, b, q):
        return p * b - math.log1p(q * math.expm1(b))
    # Row 0: token expert p=0.9; within-word weighed by P(continuation)=0.4, word-start by P(start)=0.5.
    gains = [gain(0.9, 2.625, 0.3), gain(0.9 * 0.4, 0.75, 0.2), gain(0.9 * 0.5, 0.75, 0.1)]
    assert expert[0] == int(np.argmax(gains)) == 0 and h[0] == 0 and beta[0] == 2.625
    # Row 1: after a boundary no continuation can follow: the within-word expert never wins there.
    assert expert[1] == 2 and h[1] == 1
    # Row 2: the token and word-start experts agree on token 0: beta gets the agreement boost.
    assert expert[2] == 0 and agreed[2] and beta[2] == 2.625 + 0.5
    # Row 3: the token expert is below its threshold; the word-start hint is the model's own favourite
    # (q=0.3) and would lose: the within-word expert wins.
    assert gain(0.9 * 0.4, 0.75, 0.2) > 0 > gain(0.7 * 0.5, 0.75, 0.3)
    assert expert[3] == 1 and h[3] == 3 and beta[3] == 0.75 and not agreed[3]
    off = ng.TiltConfig(cfg.thresholds, (0.0, 0.0, 0.0), 0.5)  # boost 0: an expert never gains
    assert (ng.select_hints(probs.log(), after_boundary, hint, conf, masks, off)[0] == -1).all()


def test_cache_mixture_is_normalized(real):
    tokens, _ = real
    stream = [int(t) for t in tokens[:2500]]
    prob, _ = ng.cache_pass(tokens[:2500], TINY_VOCAB)
    cache = ng.ReferenceCache(TINY_VOCAB)
    checks = set(np.random.default_rng(0).choice(np.arange(1, 2500), 25, replace=False).tolist())
    logp, _, _, _ = random_rows(len(checks), TINY_VOCAB, 1)
    rows = []
    for t, tok in enumerate(stream):
        if t in checks:
            dist = cache.distribution(stream[:t])
            assert dist[tok] == prob[t]  # the C pass reads this very distribution at the token
            rows.append(torch.from_numpy(dist))
        cache.learn(stream[:t], tok)
    cache_p = torch.stack(rows)
    assert torch.allclose(cache_p.sum(-1), torch.ones(len(rows), dtype=torch.float64), rtol=0, atol=1e-9)
    weight = ng.cache_weight(logp, 0.3)
    assert (weight > 0).all() and (weight <= 0.3).all()
    mixed = ng.mix_logprobs(logp, cache_p, weight[:, None])
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(len(rows), dtype=torch.float64), rtol=0, atol=1e-9)


# ---- the evaluation script --------------------------------------------------------------------------

FINAL = re.compile(r"^(\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})", re.M)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ngram_run")
    env = tiny_env(tiny_data, out, RUN_ID="ng")
    tg.main(env)
    log = (out / "ng.txt").read_text()
    env["ARTIFACT_PATH"] = str(out / "ng.ptz")
    return env, {m[0]: (m[1], m[2]) for m in FINAL.findall(log)}


def run_eval(env: dict, **overrides) -> tuple[dict, str]:
    env = {**env, **{k: str(v) for k, v in overrides.items()}}
    sums = ev.main(env)
    log = (Path(env["OUT_DIR"]) / "ng_ngram.txt").read_text()
    return sums, log


def test_plain_score_equals_train_gpt_sliding_window(trained):
    env, finals = trained
    sums, log = run_eval(env, NGRAM_CACHE=1)
    lines = {m[0]: (m[1], m[2]) for m in FINAL.findall(log)}
    assert lines["ngram_eval_plain"] == finals["final_sliding_window_exact"]
    assert lines["ngram_eval_tilted"] != lines["ngram_eval_plain"] and "ngram_eval_cache" in lines
    fire = dict(re.findall(r"(\w+):(\d\.\d+)", re.search(r"^ngram_fire .*$", log, re.M)[0]))
    assert float(fire["any"]) > 0.01 and float(fire["any"]) == pytest.approx(
        sum(float(fire[e]) for e in ng.EXPERTS), abs=1e-5)
    for setting in ("ngram_token_threshold:0.8", "ngram_word_boost:0.75", "ngram_cache:True"):
        assert f"ngram_setting {setting}\n" in log
    assert re.search(r"^ngram_hints tokens:\d+ .*memory_bytes:\d+$", log, re.M)
    assert re.search(r"^ngram_timing prepare_ms:\d+ share_ms:\d+ eval_ms:\d+ total_ms:\d+$", log, re.M)


def test_scoring_reports_progress(trained, monkeypatch, capsys):
    monkeypatch.setattr(tg, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(tg.sys.stderr, "isatty", lambda: False)
    env, _ = trained
    h = tg.Hyperparameters.from_env(env)
    total = tg.num_eval_batches(len(tg.load_validation_tokens(h.data_path)), tg.EvalSpec.sliding(h))
    run_eval(env)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("progress phase:ngram_score")]
    assert total > 2 and len(lines) == total - 1 and f" done:1/{total} " in lines[0]


def test_zero_boosts_and_zero_cache_weight_leave_the_model_unchanged(trained):
    env, _ = trained
    sums, _ = run_eval(env, NGRAM_TOKEN_BOOST=0, NGRAM_WITHIN_BOOST=0, NGRAM_WORD_BOOST=0, NGRAM_CACHE=1,
                       NGRAM_CACHE_WEIGHT=0)
    assert sums["tilted_nats"] == sums["plain_nats"] and sums["fired_token"] == 0
    assert sums["cache_nats"] == pytest.approx(sums["plain_nats"], rel=1e-12)


def test_two_ranks_share_the_hints_and_match_one(trained, tmp_path):
    env, _ = trained
    one, _ = run_eval(env)
    env2 = {**env, "OUT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "eval_ngram_on_checkpoint.py")]
    proc = subprocess.run(cmd, env=env2, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "ng_ngram.txt").read_text()
    assert "runtime world_size:2" in log and log.count("ngram_hints tokens:") == 1
    two = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall(log)}
    assert two["ngram_eval_tilted"][1] == pytest.approx(one["tilted_nats"] / one["bytes"] / math.log(2), abs=1e-7)


def test_an_artifact_scores_with_only_its_path(trained, tmp_path):
    # The architecture comes from the artifact: with none of the model's variables set (and wrong ones
    # set), the plain score is still the training run's sliding-window number.
    env, finals = trained
    model_vars = {f.name.upper() for f in dataclasses.fields(tg.ModelConfig)}
    bare = {k: v for k, v in env.items() if k not in model_vars}
    for extra in ({}, {"NUM_LAYERS": "3", "MODEL_DIM": "48"}):
        _, log = run_eval({**bare, **extra, "OUT_DIR": str(tmp_path)})
        lines = {m[0]: (m[1], m[2]) for m in FINAL.findall(log)}
        assert lines["ngram_eval_plain"] == finals["final_sliding_window_exact"]
        assert "model_from_artifact vocab_size:384 bos_id:1 num_layers:2 model_dim:32" in log


def test_missing_artifact_and_wrong_tokenizer_are_clear_errors(trained, tmp_path):
    env, _ = trained
    with pytest.raises(FileNotFoundError, match="ARTIFACT_PATH=.*no such file"):
        ev.main({**env, "ARTIFACT_PATH": str(tmp_path / "none.ptz")})
    with pytest.raises(ValueError, match="ARTIFACT_PATH is not set"):
        ev.main({k: v for k, v in env.items() if k != "ARTIFACT_PATH"})


def test_the_tilted_score_counts_the_evaluation_code_bytes(trained, tmp_path, monkeypatch):
    env, _ = trained
    artifact = Path(env["ARTIFACT_PATH"])
    shipped_train = tg.code_form((ROOT / "train_gpt.py").read_text()).bytes_code  # the compact wrapper
    assert shipped_train < (ROOT / "train_gpt.py").stat().st_size
    code = shipped_train + sum((ROOT / f).stat().st_size for f in ("eval_ngram_on_checkpoint.py", "online_ngram.py",
                                                                   "online_ngram_state.c"))
    _, log = run_eval({**env, "OUT_DIR": str(tmp_path)})
    line = re.search(r"^ngram_artifact .* bytes_code:(\d+) bytes_model:(\d+) bytes_total:(\d+) cap:16000000$", log, re.M)
    assert line and int(line[1]) == code and int(line[2]) == artifact.stat().st_size
    assert int(line[3]) == code + artifact.stat().st_size
    # Under a cap that the training script plus model would fit but the whole submission does not: refused.
    monkeypatch.setattr(tg, "ARTIFACT_CAP_BYTES", shipped_train + artifact.stat().st_size + 1)
    with pytest.raises(RuntimeError, match=f"bytes_code:{code} \\+ bytes_model"):
        run_eval({**env, "OUT_DIR": str(tmp_path)})


# ---- train_gpt.py's own token tilt (NGRAM_TILT=token) ------------------------------------------------------


@pytest.mark.parametrize("vocab, seed", [(2, 0), (12, 1), (40, 2), (300, 3), (1024, 4)])
def test_train_gpt_token_expert_equals_the_reference(vocab, seed):
    tokens = repetitive_stream(6000, vocab, seed)
    hint, conf = tg.token_ngram_hints(tokens)
    ref_hint, ref_conf = ng.reference_hints(tokens, random_tables(max(vocab, 4), seed))
    np.testing.assert_array_equal(hint, ref_hint[0])
    np.testing.assert_array_equal(conf, ref_conf[0])
    assert (hint >= 0).mean() > 0.2 and ((conf > 0) & (conf < 1)).any()  # hints, with mixed counts
    rand = np.random.default_rng(seed).integers(0, vocab, 3000).astype(np.uint16)  # few repeats (none: vocab 300+)
    np.testing.assert_array_equal(tg.token_ngram_hints(rand)[0], ng.reference_hints(rand, random_tables(
        max(vocab, 4), seed))[0][0])


def test_train_gpt_token_expert_equals_the_c_pass_on_real_text(real):
    tokens, tables = real
    hints = ng.hint_pass(tokens, tables)
    hint, conf = tg.token_ngram_hints(tokens)
    np.testing.assert_array_equal(hint, hints.hint[0])
    np.testing.assert_array_equal(conf, hints.conf[0])
    assert (conf >= 0.8).sum() > 50


def test_train_gpt_token_expert_survives_fingerprint_collisions(monkeypatch):
    """A multiplier of 0 gives every context the same fingerprint: caught, and the next one is used."""
    tokens = repetitive_stream(3000, 12, 5)
    expected = tg.token_ngram_hints(tokens)
    monkeypatch.setattr(tg, "NGRAM_HASH_MULTIPLIERS", (0, 2, *tg.NGRAM_HASH_MULTIPLIERS))
    got = tg.token_ngram_hints(tokens)
    np.testing.assert_array_equal(got[0], expected[0]) and np.testing.assert_array_equal(got[1], expected[1])
    monkeypatch.setattr(tg, "NGRAM_HASH_MULTIPLIERS", (0,))
    with pytest.raises(RuntimeError, match="collided"):
        tg.token_ngram_hints(tokens)


def test_train_gpt_token_hints_at_t_come_from_tokens_before_t():
    tokens = repetitive_stream(4000, 30, 6)
    hint, conf = tg.token_ngram_hints(tokens)
    later = 0
    for t in (15, 16, 500, 2222, 3999):
        changed = tokens.copy()
        changed[t] = (changed[t] + 7) % 30
        hint2, conf2 = tg.token_ngram_hints(changed)
        np.testing.assert_array_equal(hint2[:t + 1], hint[:t + 1])  # t's own hint too: it reads tokens before t
        np.testing.assert_array_equal(conf2[:t + 1], conf[:t + 1])
        later += not (np.array_equal(hint2[t + 1:], hint[t + 1:]) and np.array_equal(conf2[t + 1:], conf[t + 1:]))
    assert later >= 3


def tilt_settings(**overrides) -> tg.Hyperparameters:
    return tg.Hyperparameters(ngram_tilt="token", **overrides)


def test_train_gpt_tilt_is_normalized_for_any_hint():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2000, 50, generator=g, dtype=torch.float64) * 3, -1)
    hint = torch.randint(-1, 50, (2000,), generator=g)
    conf = torch.rand(2000, generator=g, dtype=torch.float64)
    for s in (tilt_settings(), tilt_settings(ngram_token_threshold=0.0, ngram_token_boost=20.0)):
        tilted = tg.tilt_log_probs(logp, hint, conf, s)
        assert torch.allclose(tilted.exp().sum(-1), torch.ones(2000, dtype=torch.float64), rtol=0, atol=1e-9)
        fired = (tilted != logp).any(-1)
        q = logp.gather(1, hint.clamp_min(0)[:, None])[:, 0].exp()
        gain = conf * s.ngram_token_boost - torch.log1p(q * math.expm1(s.ngram_token_boost))
        assert torch.equal(fired, (hint >= 0) & (conf >= s.ngram_token_threshold) & (gain > 0))
        assert fired.float().mean() > 0.05


def test_train_gpt_tilt_sums_keep_the_plain_sums_and_score_the_tilted_distribution():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(3, 7, 40, generator=g) * 4, torch.randint(0, 40, (3, 7), generator=g)
    pos = torch.arange(21).view(3, 7) + 1
    scored = torch.rand(3, 7, generator=g) < 0.8
    hints = tg.NgramHints(torch.randint(-1, 40, (30,), generator=g, dtype=torch.int32), torch.rand(30, generator=g),
                          0.0)
    hints.hint[pos[0, :3]] = y[0, :3].int()  # a few right hints
    luts = tg.ByteLUTs(torch.ones(40, dtype=torch.int32), torch.zeros(40, dtype=torch.bool),
                       torch.zeros(40, dtype=torch.bool))
    s = tilt_settings(ngram_token_threshold=0.3)
    sums = tg.ngram_tilt_sums(luts, hints, s)(logits, y, y, scored, pos)
    assert torch.equal(sums[:3], tg.logit_sums(luts)(logits, y, y, scored, pos))  # the untilted numbers as they were
    tilted = tg.tilt_log_probs(torch.log_softmax(logits, -1), hints.hint[pos], hints.conf[pos], s)
    expected = -(tilted.gather(-1, y[..., None])[..., 0] * scored).sum()
    assert float(sums[3]) == pytest.approx(float(expected), rel=1e-6)
    fired = (tilted != torch.log_softmax(logits, -1)).any(-1)
    assert float(sums[4]) == float((fired & scored).sum()) > 0


def _repeated_documents() -> torch.Tensor:
    """Documents that repeat a motif, so that 16-grams recur and the tilt fires (vocabulary 64, BOS 1)."""
    rng = np.random.default_rng(3)
    motif = rng.integers(2, 64, 40)
    toks = np.concatenate([np.concatenate(([1], motif[:n], rng.integers(2, 64, 5))) for n in (40, 33, 40, 21, 40, 38)])
    return torch.from_numpy(toks.astype(np.int32))


def _tilted_distributions(val: torch.Tensor, s: tg.Hyperparameters) -> tuple[dict, torch.Tensor, np.ndarray]:
    """TTT with the tilt: target position -> the tilted log-distribution it was scored with; the sums; counts."""
    import test_ttt as tt
    hint, conf = tg.token_ngram_hints(val.numpy())
    hints = tg.NgramHints(torch.from_numpy(hint), torch.from_numpy(conf), 0.0)
    rows, counts, tilt = {}, np.zeros(len(val), dtype=np.int64), tg.ngram_tilt_sums(tt._unit_bytes(), hints, s)

    def score(logits, x, y, scored, pos):
        tilted = tg.tilt_log_probs(torch.log_softmax(logits.double(), -1), hints.hint[pos], hints.conf[pos].double(), s)
        for b, j in scored.nonzero().tolist():
            rows[int(pos[b, j])] = tilted[b, j]
            counts[int(pos[b, j])] += 1
        return tilt(logits, x, y, scored, pos)
    sums = tg.ttt_score(tt.model(), score, val, s, tt.CPU)
    return rows, sums, counts


def test_ttt_with_the_tilt_is_causal_normalized_and_learns_from_the_untilted_loss():
    import test_ttt as tt
    val = _repeated_documents()
    s = tt.spec(ngram_tilt="token", ttt_short_chunks="6:2", ttt_lora_targets="k,o,mlp,head")
    base, sums, counts = _tilted_distributions(val, s)
    assert counts[0] == 0 and (counts[1:] == 1).all()  # every target once
    assert sums[4] > 20  # the tilt fired
    stacked = torch.stack([base[p] for p in sorted(base)])
    assert torch.allclose(stacked.exp().sum(-1), torch.ones(len(base), dtype=torch.float64), atol=1e-9)
    plain = tg.ttt_score(tt.model(), tg.logit_sums(tt._unit_bytes()), val, s, tt.CPU)
    assert torch.equal(sums[:3], plain)  # TTT itself never saw the tilt
    for t in (30, 90, 150, len(val) - 2):
        changed = val.clone()
        changed[t] = (int(val[t]) - 2 + 5) % 62 + 2
        after = _tilted_distributions(changed, s)[0]
        assert all(torch.equal(after[p], base[p]) for p in range(1, t + 1)), t


def test_the_sliding_window_tilt_equals_the_tools_token_expert(trained, tmp_path):
    """NGRAM_TILT=token with TTT=0: train_gpt.py's final_sliding_window_ngram_exact is the evaluation tool's tilt
    with the token expert alone (the word experts' boosts and the agreement boost at 0)."""
    from conftest import run_context
    env, finals = trained
    _, log = run_eval(env, NGRAM_WITHIN_BOOST=0, NGRAM_WORD_BOOST=0, NGRAM_AGREE_BOOST=0)
    tool = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall(log)}
    h = tg.Hyperparameters.from_env({**{k: v for k, v in env.items() if k != "ARTIFACT_PATH"}, "NGRAM_TILT": "token"})
    cfg, state = tg.load_artifact(env["ARTIFACT_PATH"])
    model = tg.build_model(cfg, torch.device("cpu"))
    model.load_state_dict(state)
    lines = []
    val = torch.from_numpy(tg.load_validation_tokens(h.data_path).astype(np.int32))
    luts = tg.build_byte_luts(tg.load_tokenizer(h.tokenizer_path), cfg.vocab_size)
    tg.run_ngram_windows(model, val, luts, run_context(h, lines.append))
    ours = {m[0]: (float(m[1]), float(m[2])) for m in FINAL.findall("\n".join(lines))}
    assert ours["final_sliding_window_ngram_exact"] == pytest.approx(tool["ngram_eval_tilted"], abs=2e-7)
    assert ours["final_sliding_window_ngram_exact"] != tool["ngram_eval_plain"]
    assert re.search(r"^final_sliding_window_ngram_exact .* expert:token threshold:0.8 boost:2.625 fired:0\.\d{6}$",
                     "\n".join(lines), re.M)
