"""The compact train_gpt.py (minified, ZPAQ, latin-1 literal) runs exactly the readable source's program."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import runpy
import subprocess
import sys

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


def test_the_compact_file_holds_the_minified_source_and_names_the_readable_one(compact):
    readable = (ROOT / "train_gpt.py").read_bytes()
    data = compact.read_bytes()
    sha, program = tg.compact_program(data)
    assert sha == hashlib.sha256(readable).hexdigest() and data.split(b"\n")[1] == b"#train_gpt.py sha256:" + sha.encode()
    assert program == tg.minify_code(readable.decode("utf-8"))
    assert '"""' not in program[:200] and len(program) < len(readable) / 2  # docstrings and comments went
    assert len(data) < len(readable) / 6  # 8x smaller today: minified, then ZPAQ
    form = tg.code_form(data)
    assert (form.form, form.bytes_code, form.source, form.source_sha256) == ("compact", len(data), program, sha)
    readable_form = tg.code_form(readable)
    assert (readable_form.form, readable_form.bytes_code) == ("readable", len(data))
    assert readable_form.source_sha256 == sha  # a checkpoint of either form resumes with the other


def test_nothing_stops_the_minifier_renaming():
    # python-minifier renames no global (and no name of the module's scope) in a module that calls one
    # of these builtins, which can reach a name by its string: one `vars(cls)` cost 5 kB of shipped code.
    tree = ast.parse((ROOT / "train_gpt.py").read_text())
    calls = sorted({(n.id, n.lineno) for n in ast.walk(tree)
                    if isinstance(n, ast.Name) and n.id in ("exec", "eval", "locals", "globals", "vars")})
    assert not calls, f"train_gpt.py calls {calls}: use obj.__dict__ (or another spelling) instead"


# Every byte Python would read otherwise, in every position: NUL before an octal digit and not, CR,
# CRLF, backslashes before a quote, runs of quotes (which could close the literal) and one at the end.
AWKWARD = bytes(range(256)) + b"\x00" + b"\x007\x008\x00\x00" + b"\r\n\r\\\\\\\"" + b'"' * 7 + b"a\"\"\"b" + b"\""


@pytest.mark.parametrize("blob", [AWKWARD, os.urandom(50_000), b"", b'"', b"\x00", b"\\"],
                         ids=["awkward", "random", "empty", "quote", "nul", "backslash"])
def test_python_reads_the_latin1_literal_as_the_bytes(blob, tmp_path):
    literal = tg.latin1_literal(blob)
    assert tg.latin1_blob(literal) == blob
    assert len(literal) <= len(blob) * 1.02 + 8 or blob is AWKWARD or len(blob) < 2
    script = tmp_path / "literal.py"
    script.write_bytes(('#coding:latin1\nimport sys\nsys.stdout.buffer.write("""' + literal +
                        '""".encode("latin1"))\n').encode("latin-1"))
    assert subprocess.run([sys.executable, str(script)], capture_output=True, check=True).stdout == blob


def test_without_the_minifier_bytes_code_is_an_upper_bound_that_says_why(monkeypatch):
    readable = (ROOT / "train_gpt.py").read_bytes()
    exact = tg.code_form(readable).bytes_code
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # import fails as if not installed
    tg.compact_code.cache_clear()
    try:
        bound = tg.code_form(readable)
    finally:
        tg.compact_code.cache_clear()
    assert bound.bytes_code > exact and bound.form == "readable"
    assert "python_minifier" in bound.bound_because and "pip install python-minifier" in bound.bound_because


def test_a_readable_file_counts_its_compact_size_once_per_machine(tmp_path, monkeypatch):
    readable = (ROOT / "train_gpt.py").read_bytes()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    size = tg.code_form(readable).bytes_code
    assert [int(p.read_text()) for p in (tmp_path / "train_gpt_compact").iterdir()] == [size]

    def minified_again(source):
        raise AssertionError("minified again")

    monkeypatch.setattr(tg, "compact_code", minified_again)  # a second process: remembered, not minified again
    assert tg.code_form(readable).bytes_code == size
    with pytest.raises(AssertionError, match="minified again"):  # another source is another key
        tg.code_form(readable + b"\n")


def normalized(log: str) -> list[str]:
    """The log after the embedded source, without what may differ between two runs of one program:
    times, the output folder, and the code line (it says which form ran)."""
    body = log[log.index("=" * 100 + "\n") + 101:]
    body = re.sub(r"\b(\w*time\w*|\w*_ms|elapsed\w*|\w*seconds|\w*per_s\w*|tok_s|throughput\w*):\S+", r"\1:T", body)
    body = re.sub(r"\d+(\.\d+)?ms\b", "Tms", body)
    return [line for line in body.splitlines() if not line.startswith("code form:")]


def test_the_compact_file_runs_the_same_pipeline_byte_for_byte(compact, tiny_data, tmp_path, monkeypatch):
    env = dict(ITERATIONS="3", VAL_LOSS_EVERY="0", COMPRESSOR="zstd")
    tg.main(tiny_env(tiny_data, tmp_path / "readable", **env))
    for key, value in tiny_env(tiny_data, tmp_path / "compact", **env).items():
        monkeypatch.setenv(key, value)
    runpy.run_path(str(compact), run_name="__main__")  # what `torchrun ... train_gpt.py` does
    log_a = (tmp_path / "readable" / "tiny.txt").read_text()
    log_b = (tmp_path / "compact" / "tiny.txt").read_text()
    assert FINAL.findall(log_a) == FINAL.findall(log_b) and len(FINAL.findall(log_b)) == 3
    assert (tmp_path / "readable" / "tiny.ptz").read_bytes() == (tmp_path / "compact" / "tiny.ptz").read_bytes()
    lines_a = [line.replace(str(tmp_path / "readable"), "OUT") for line in normalized(log_a)]
    lines_b = [line.replace(str(tmp_path / "compact"), "OUT") for line in normalized(log_b)]
    assert lines_a == lines_b
    # The cap counts the compact file, which embeds the program that ran in its log; both forms name
    # the readable source.
    sha = hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()
    assert f"code form:compact bytes_code:{compact.stat().st_size} " in log_b and f"source_sha256:{sha}" in log_b
    assert f"code form:readable bytes_code:{compact.stat().st_size} " in log_a and f"source_sha256:{sha}" in log_a
    assert tg.compact_program(compact.read_bytes())[1] in log_b
