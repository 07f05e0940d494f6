"""The docs' tables of measured numbers are benchmarks/tables.py's rendering of the JSON they name, so a
number edited by hand, or a JSON rerun without `tables.py --write`, fails here; the README's links land on
RESULTS.md sections; and the docs say what is true now, without the project's history (internal issue
numbers, sessions)."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tables  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "docs" / "RESULTS.md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_marked_table_equals_its_rendering_from_the_json(doc):
    assert tables.differences(doc.read_text(), doc.name) == []


def test_a_number_edited_by_hand_is_caught_and_write_restores_it():
    text = RESULTS.read_text()
    body = tables.blocks(text)[0]["body"]
    row = body.strip().splitlines()[2]  # the first data row, below the header and its rule
    i = text.index(row, text.index(body)) + re.search(r"\d", row).start()
    edited = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]
    assert len(tables.differences(edited)) == 1
    assert tables.rewrite(edited) == text


def test_results_renders_a_table_from_every_result_file_and_shows_every_plot():
    text = RESULTS.read_text()
    named = {Path(p).name for b in tables.blocks(text) for p in b["paths"]}
    assert {p.name for p in (ROOT / "docs" / "results").glob("*.json")} - named <= {"quality_extended.json"}
    assert "quality_extended.json" in text  # no table, but the one figure RESULTS.md takes from it is cited
    shown = set(re.findall(r"results/([\w.-]+\.png)", text))
    assert {p.name for p in (ROOT / "docs" / "results").glob("*.png")} - shown == set()


def test_every_renderer_named_in_the_docs_exists_and_every_renderer_is_used():
    used = {b["name"] for doc in DOCS for b in tables.blocks(doc.read_text())}
    assert used <= set(tables.RENDERERS)
    assert set(tables.RENDERERS) - used == set()


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_results_sections_land_on_a_heading():
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", RESULTS.read_text(), flags=re.M)}
    links = re.findall(r"docs/RESULTS\.md#([\w-]+)", (ROOT / "README.md").read_text())
    links += re.findall(r"\]\(#([\w-]+)\)", RESULTS.read_text())
    assert links and set(links) <= anchors, set(links) - anchors


# Words that tell the project's history rather than what is true now. "issue" alone is a normal word, an issue
# number is not; a llama.cpp reference like ggml-org/llama.cpp#20824 has no "issue" before it. pytest's
# scope="session" is pytest's API, not history.
HISTORY = {
    "an internal issue number": re.compile(r"\bissues?\s*#?\d+", re.I),
    "a session": re.compile(r"\bsessions?\b", re.I),
    "a sitting": re.compile(r"\bsittings?\b", re.I),
}
DOCS_ONLY = {"superseded material": re.compile(r"\bsupersed(e|es|ed|ing)\b", re.I)}


def project_text_files():
    for folder, suffixes in (("benchmarks", {".py", ".yaml", ".sh"}),
                             ("modularforge", {".py", ".yaml", ".md"}), ("tests", {".py"})):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in suffixes and path != Path(__file__).resolve():
                yield path


def history_words(path: Path, patterns: dict) -> list[str]:
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.replace('scope="session"', "")
        found += [f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}" for what, p in patterns.items()
                  if p.search(line)]
    return found


def test_the_docs_tell_no_history():
    assert [w for doc in DOCS for w in history_words(doc, {**HISTORY, **DOCS_ONLY})] == []


def test_code_comments_and_docstrings_name_no_issue_or_session():
    assert [w for path in project_text_files() for w in history_words(path, HISTORY)] == []


def test_the_history_patterns_catch_history_and_spare_ordinary_words():
    caught = ["issue 18's expert recipe", "(issue #3)", "issues 17 and 20", "this session's run",
              "in one sitting", "the sixth session run"]
    spared = ["a known issue of llama.cpp", "ggml-org/llama.cpp#20824", "an open issue in llama.cpp",
              "a single man in possession", "sessional"]
    assert all(any(p.search(t) for p in HISTORY.values()) for t in caught)
    assert not any(p.search(t) for p in HISTORY.values() for t in spared)
