"""The learning-quality and traffic tables of docs/ cannot drift from what the benchmarks wrote:
docs/alternatives.md holds bench/results/adapter_comparison*.md's tables line for line, and every target line of
those files as written; docs/bytes-per-round.md holds the recipes' and the layout x codec tables of
bench/results/communication.json. Each table must be on the page named here, and on no other page of the README and
docs/ (a moved table fails until its entry here moves too)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALTERNATIVES, BYTES = "docs/alternatives.md", "docs/bytes-per-round.md"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


def _lines(page: str) -> list[str]:
    return (ROOT / page).read_text(encoding="utf-8").splitlines()


def _tables(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def _only_on(page: str, lines: list[str]) -> None:
    """Every line is on `page`; none of the table rows is on another page (one copy, the one tested)."""
    missing = [line for line in lines if line not in _lines(page)]
    assert missing == [], f"{page} lacks these lines as the benchmark wrote them: {missing}"
    for other in PAGES:
        if other != page:
            copies = [line for line in lines if line.startswith("|") and line in _lines(other)]
            assert copies == [], f"{other} repeats rows of {page}'s table (one copy, the tested one): {copies}"


@pytest.mark.parametrize("name, table_lines", [("adapter_comparison.md", 10), ("adapter_comparison_code_h32.md", 5)])
def test_the_adapter_comparison_tables_and_targets_are_quoted_as_written(name, table_lines):
    results = (ROOT / "bench" / "results" / name).read_text(encoding="utf-8")
    lines = _tables(results)
    assert len(lines) >= table_lines  # every corpus's table
    # the header and rule lines of these tables are shared between the two files: check them for presence only
    rows = [line for line in lines if not line.startswith(("| method", "|---", "|--"))]
    _only_on(ALTERNATIVES, rows)
    assert [line for line in lines if line not in _lines(ALTERNATIVES)] == []
    targets = [line for line in results.splitlines() if line.startswith("- ") and ": " in line]
    assert targets and [t for t in targets if t not in _lines(ALTERNATIVES)] == []


def test_the_bytes_per_round_table_is_communication_json():
    doc = json.loads((ROOT / "bench" / "results" / "communication.json").read_text(encoding="utf-8"))
    rows = {}
    for r in doc["recipes"]:
        rows.setdefault(r["world_size"], []).append(f"{r['total'] / 1e9:.2f} GB ({r['total'] * 8 / 100e6 / 60:.1f} min)")
    _only_on(BYTES, [f"| {w} | " + " | ".join(cells) + " |" for w, cells in rows.items()])


def test_the_layout_and_codec_table_is_communication_json():
    matrix = json.loads((ROOT / "bench" / "results" / "communication.json").read_text(encoding="utf-8"))["matrix"]
    models = ("llama3.2-3b", "llama3.1-8b", "llama3.1-70b")
    keys = dict.fromkeys((r["world_size"], r["layout"]) for r in matrix)
    assert len(keys) == 11 and {r["model"] for r in matrix} == set(models)
    expected = []
    for w, layout in keys:
        cells = []
        for model in models:
            gb = {r["codec"]: f"{r['total'] / 1e9:.2f}" for r in matrix
                  if (r["model"], r["world_size"], r["layout"]) == (model, w, layout)}
            cells.append(" / ".join(gb[c] for c in ("bf16", "int8", "int4") if c in gb))
        expected.append(f"| {w} | {layout} | " + " | ".join(cells) + " |")
    _only_on(BYTES, expected)
