"""The compact self-extracting train_gpt.py runs exactly the readable source."""

from __future__ import annotations

import base64
import inspect
import re
import runpy

import brotli
import pytest

import train_gpt as tg
from conftest import ROOT, tiny_env
from scripts.compact_train_gpt import write_compact

FINAL = re.compile(r"^(final_\w+ val_loss:\S+ val_bpb:\S+)", re.M)


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    path = tmp_path_factory.mktemp("record") / "train_gpt.py"
    size = write_compact(ROOT / "train_gpt.py", path)
    assert size == path.stat().st_size
    return path


def test_embedded_source_is_the_readable_file_byte_for_byte(compact):
    text = compact.read_text(encoding="ascii")
    (blob,) = re.findall(r'b85decode\("([^"]+)"\)', text)
    assert brotli.decompress(base64.b85decode(blob)) == (ROOT / "train_gpt.py").read_bytes()
    assert len(text) < (ROOT / "train_gpt.py").stat().st_size / 2


def test_compact_file_defines_the_same_code(compact):
    ns = runpy.run_path(str(compact), run_name="compact_check")  # not __main__: defines, runs nothing
    functions = {k: v for k, v in vars(tg).items() if callable(v) and getattr(v, "__module__", "") == "train_gpt"}
    assert len(functions) > 50
    for name, fn in functions.items():
        if inspect.isfunction(fn):
            code, other = inspect.unwrap(fn).__code__, inspect.unwrap(ns[name]).__code__
            assert other.co_code == code.co_code and other.co_consts == code.co_consts, name
            assert other.co_filename == "train_gpt.py"


def test_compact_file_runs_the_same_pipeline(compact, tiny_data, tmp_path, monkeypatch):
    readable = tiny_env(tiny_data, tmp_path / "readable", ITERATIONS="3", VAL_LOSS_EVERY="0")
    tg.main(readable)
    for key, value in tiny_env(tiny_data, tmp_path / "compact", ITERATIONS="3", VAL_LOSS_EVERY="0").items():
        monkeypatch.setenv(key, value)
    runpy.run_path(str(compact), run_name="__main__")  # what `torchrun ... train_gpt.py` does
    log_a = (tmp_path / "readable" / "tiny.txt").read_text()
    log_b = (tmp_path / "compact" / "tiny.txt").read_text()
    assert FINAL.findall(log_a) == FINAL.findall(log_b) and len(FINAL.findall(log_b)) == 3
    assert f"bytes_code:{compact.stat().st_size} " in log_b  # the cap counts the compact file
