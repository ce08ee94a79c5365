"""The documentation stays true to the code: the settings table is generated from the source, the README
is a short guide whose links resolve, and no document points at one machine's paths or at a spec file
the repository does not have."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250


def test_the_settings_table_is_generated_from_the_source():
    import importlib.util
    spec = importlib.util.spec_from_file_location("env_table", ROOT / "lab" / "env_table.py")
    env_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env_table)
    text = env_table.render()
    assert (ROOT / "docs" / "environment.md").read_text() == text, "run python3 lab/env_table.py"
    import train_gpt as tg
    import dataclasses
    for f in dataclasses.fields(tg.Hyperparameters):  # every setting is documented, with a meaning
        row = re.search(rf"^\| `{f.name.upper()}` \| [^|]+ \| [^|]+ \| (.+) \|$", text, re.M)
        assert row and row[1].strip(), f"{f.name.upper()} has no comment on its line in train_gpt.py"


def test_readme_is_a_short_guide_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_machine_paths_and_no_missing_spec(doc):
    text = doc.read_text()
    assert not re.search(r"(?<![\w.])/(work|root|home|tmp)/", text), "a path on one machine"
    assert "SPEC" not in text, "the spec file is not in the repository: say it in docs/challenge.md"
    for link in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (doc.parent / link).exists(), f"{doc.name} links to {link}, which does not exist"


def test_code_cites_the_docs_not_a_missing_spec():
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.c"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    needle = "SPEC" + " section"  # spelled apart so that this file does not cite it
    cited = [f for f in files if needle in (ROOT / f).read_text(errors="replace")]
    assert not cited, f"these cite a spec the repository does not have: {cited}"


def train_gpt_sections() -> list[str]:
    """The banner sections and `# ---- ` subsections of train_gpt.py, in order."""
    lines = (ROOT / "train_gpt.py").read_text().splitlines()
    banner = re.compile(r"^# -{80,}$")
    sections = [lines[i + 1][2:] for i in range(len(lines) - 2) if banner.match(lines[i]) and banner.match(lines[i + 2])]
    subsections = [m[1] for line in lines if (m := re.match(r"^# ---- (.+?)(?: \(.*)? -+$", line))]
    return sections + subsections


def test_readme_map_names_every_section_and_subsection():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Where to change what"):]
    rows = [r.split("|")[1].strip().lstrip(". ").lower() for r in table.splitlines() if r.startswith("| ")][1:]  # [0]: the header
    for name in train_gpt_sections():
        assert any(name.lower().startswith(row) or row.startswith(name.lower().split(":")[0]) for row in rows), \
            f"README's map has no row for the section {name!r}"
