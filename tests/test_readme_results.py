"""The README's learning-quality figures cannot drift from what the benchmark wrote: its "Against the
alternatives" tables are bench/results/adapter_comparison.md's, line for line, and every target line of that file
is quoted as written."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("name, table_lines", [("adapter_comparison.md", 10), ("adapter_comparison_code_h32.md", 5)])
def test_readme_quotes_the_adapter_comparison_tables_and_targets_as_written(name, table_lines):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "bench" / "results" / name).read_text(encoding="utf-8")
    lines = _tables(results)
    assert len(lines) >= table_lines  # every corpus's table
    missing = [line for line in lines if line not in readme.splitlines()]
    assert missing == []
    targets = [line for line in results.splitlines() if line.startswith("- ") and ": " in line]
    assert targets and [t for t in targets if t not in readme.splitlines()] == []


def test_readme_bytes_per_round_table_is_communication_json():
    import json

    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    doc = json.loads((ROOT / "bench" / "results" / "communication.json").read_text(encoding="utf-8"))
    rows = {}
    for r in doc["recipes"]:
        rows.setdefault(r["world_size"], []).append(f"{r['total'] / 1e9:.2f} GB ({r['total'] * 8 / 100e6 / 60:.1f} min)")
    for w, cells in rows.items():
        assert f"| {w} | " + " | ".join(cells) + " |" in readme, w


def test_readme_layout_and_codec_table_is_communication_json():
    import json

    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    matrix = json.loads((ROOT / "bench" / "results" / "communication.json").read_text(encoding="utf-8"))["matrix"]
    models = ("llama3.2-3b", "llama3.1-8b", "llama3.1-70b")
    keys = dict.fromkeys((r["world_size"], r["layout"]) for r in matrix)
    assert len(keys) == 11 and {r["model"] for r in matrix} == set(models)
    for w, layout in keys:
        cells = []
        for model in models:
            gb = {r["codec"]: f"{r['total'] / 1e9:.2f}" for r in matrix
                  if (r["model"], r["world_size"], r["layout"]) == (model, w, layout)}
            cells.append(" / ".join(gb[c] for c in ("bf16", "int8", "int4") if c in gb))
        assert f"| {w} | {layout} | " + " | ".join(cells) + " |" in readme, (w, layout)
