"""lab/ablate_may.py's pure parts: the log parsing, the rows' deltas and spread, the table, and the budget line on a
synthetic stream (no corpus, no training)."""

import numpy as np
import pytest

from lab import ablate_may as am
import train_gpt as tg

LOG = """source line: log(f"final_ttt_exact val_loss:{x} val_bpb:{y}")
final_float_exact val_loss:3.0 val_bpb:2.5 weights:ema
final_roundtrip_exact val_loss:3.1 val_bpb:2.6 eval:plain
final_sliding_window_exact val_loss:3.0 val_bpb:2.55 eval:sliding
final_ttt_exact val_loss:2.9 val_bpb:2.50000001 eval_time:1ms
final_ttt_ngram_exact val_loss:2.8 val_bpb:2.4 expert:token
"""


def test_final_bpb_reads_each_final_line_and_not_the_source():
    assert am.final_bpb(LOG) == {"final_float_exact": 2.5, "final_roundtrip_exact": 2.6,
                                 "final_sliding_window_exact": 2.55, "final_ttt_exact": 2.50000001,
                                 "final_ttt_ngram_exact": 2.4}


def test_row_deltas_mean_and_spread():
    r = am.Row("p", "TTT", (2.40, 2.50), (2.41, 2.49))
    assert r.deltas == pytest.approx((-0.01, 0.01))
    assert r.mean_delta == pytest.approx(0.0)
    assert r.delta_spread == pytest.approx(0.02)


def test_a_tilted_score_is_compared_with_the_untilted_baseline():
    base = [{"final_ttt_exact": 2.5}, {"final_ttt_exact": 2.6}]
    part = [{"final_ttt_exact": 2.5, "final_ttt_ngram_exact": 2.4}, {"final_ttt_exact": 2.6, "final_ttt_ngram_exact": 2.45}]
    rows = am.rows_for("tilt", part, base, ("final_ttt_exact", "final_ttt_ngram_exact"))
    assert [(r.metric, r.deltas) for r in rows] == [("TTT", (0.0, 0.0)),
                                                     ("TTT+tilt", pytest.approx((-0.1, -0.15)))]
    # A metric one seed lacks is left out rather than compared with something else.
    assert am.rows_for("p", [{"final_ttt_exact": 1.0}, {}], base, ("final_ttt_exact",)) == []


def test_table_marks_identical_scores_as_zero():
    rows = [am.Row("same", "float", (2.0, 2.1), (2.0, 2.1)), am.Row("up", "TTT", (2.02, 2.1), (2.0, 2.1))]
    table = am.format_table(rows)
    assert table[0].count("|") == 9 and table[1] == "|---|---|---|---|---|---|---|---|"
    assert table[2] == "| same | float | 2.00000 | 2.10000 | 0 | 0 | 0 | 0.00000 |"
    assert table[3] == "| up | TTT | 2.02000 | 2.10000 | +0.02000 | +0.00000 | +0.01000 | 0.02000 |"


def test_every_evaluation_part_is_a_valid_ttt_setting_and_all_of_them_combine_the_parts():
    for overrides in am.EVAL_PARTS.values():
        tg.Hyperparameters.from_env({**{k: str(v) for k, v in am.SMALL_MAY.items()},
                                     **{k: str(v) for k, v in overrides.items()}})
    combined = am.EVAL_PARTS["all evaluation parts"]
    for name, part in am.EVAL_PARTS.items():
        assert (part.items() <= combined.items()) != (name in am.ALTERNATIVES), name


def test_budget_line_is_train_gpts_and_sees_the_parts():
    h = tg.Hyperparameters.from_env({"PRESET": "may"})
    tokens = np.zeros(200_000, dtype=np.uint16)
    tokens[::400] = h.bos_id  # 500 documents of 400 tokens
    plain = am.budget_line({"NGRAM_TILT": "off"}, tokens)  # PRESET=may tilts: off names the untilted row
    tilted = am.budget_line({"NGRAM_TILT": "token"}, tokens)
    assert plain.startswith("legality ttt_eval ") and "ngram:0.0s" in plain
    assert "ngram:0.0s" not in tilted  # the precompute is counted (0.1 s at 2 M tokens/s)
    short = am.budget_line({"NGRAM_TILT": "off", **am.SHORT_CHUNKS}, tokens)
    field = lambda line, k: float(dict(kv.split(":") for kv in line.split() if ":" in kv)[k].rstrip("s"))
    assert field(short, "compile") > field(plain, "compile")  # two more chunk sizes to compile


def test_stream_of_holds_every_document():
    spans = np.array([[0, 3], [3, 5], [5, 11]])  # the last document's last target is the stream's last token
    assert am.stream_of(12, spans, 1).tolist() == [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    longer = am.stream_of(10, spans, 1)  # rounded synthetic lengths may sum past the count: every document stays
    assert len(longer) == 12 and (tg.document_spans(longer, 1)[:, 0] == spans[:, 0]).all()


def test_the_labs_data_preparation_cuts_validation_by_tokens_or_whole_documents(tmp_path):
    from data.shards import write_shard
    from lab.ablate_architecture import prepare_data
    src = tmp_path / "src"
    src.mkdir()
    write_shard(src / "fineweb_train_000000.bin", np.arange(2, 50, dtype=np.uint16))
    write_shard(src / "fineweb_val_000000.bin", np.array([1, 5, 6, 1, 7, 1, 8, 9, 9], dtype=np.uint16))
    by_docs = prepare_data(src, tmp_path / "docs", val_docs=2)
    assert tg.load_validation_tokens(str(by_docs)).tolist() == [1, 5, 6, 1, 7]  # two whole documents
    assert (by_docs / "fineweb_train_000000.bin").resolve() == (src / "fineweb_train_000000.bin").resolve()
    by_tokens = prepare_data(src, tmp_path / "tokens", val_tokens=4)
    assert tg.load_validation_tokens(str(by_tokens)).tolist() == [1, 5, 6, 1]
    with pytest.raises(SystemExit, match="has 3 documents, --val-docs is 3"):
        prepare_data(src, tmp_path / "few", val_docs=3)
