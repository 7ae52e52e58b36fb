"""The README is a front door and docs/ holds the rest: the README stays short, its first screen points into docs/
(the configuration reference first), every link resolves, no file cites a document the repository lacks, and the
facts the pages state about the code (the set-up commands, the keys a resumed run may change, checkpoint sizes, the
first run's output) are checked against the code or against what it printed.

The measured figures are held elsewhere: tests/test_readme_numbers.py, tests/test_readme_results.py and
tests/test_config.py (the configuration tables).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from fedtp_flwr.config import STRATEGIES, RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FIRST_SCREEN = 50  # lines
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the front door

def test_the_readme_is_a_front_door_of_at_most_300_lines():
    assert len(_text(README).splitlines()) <= 300


def test_the_readme_first_screen_points_to_every_page_of_docs_the_configuration_reference_first():
    first = "\n".join(_text(README).splitlines()[:FIRST_SCREEN])
    linked = [m for m in LINK.findall(first) if m.startswith("docs/")]
    assert linked and linked[0] == "docs/configuration.md", linked
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages - set(linked) == set(), f"pages the README's contents do not name: {pages - set(linked)}"


def _ci_commands() -> list[list[str]]:
    """.ci/run's commands, as the README writes them: `python3 -m pip install -q` is `pip install`, `python3` is
    `python`."""
    out = []
    for line in _text(ROOT / ".ci" / "run").splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith(("#", "set ", "cd ")):
            continue
        words = shlex.split(line)
        if words[:3] == ["python3", "-m", "pip"]:
            words = ["pip", *[w for w in words[3:] if w != "-q"]]
        elif words[0] == "python3":
            words = ["python", *words[1:]]
        out.append(words)
    return out


def test_the_readme_test_command_is_the_one_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)\n```", _text(README), re.S)
    readme = [shlex.split(c) for c in blocks[1].split(" && ")]
    assert readme == _ci_commands()


# ------------------------------------------------------------------------------------------------ links, citations

def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in _text(path).splitlines():
        if m := re.match(r"^#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", ""))
            out.add(slug.replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    bad = []
    for target in LINK.findall(_text(page)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#") and not target[1:]:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert bad == []


def test_no_file_cites_a_document_the_repository_lacks():
    """The design notes live in docs/architecture.md; every `docs/<page>.md` a file names exists."""
    files = [p for p in (*ROOT.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "fedtp_flwr").rglob("*.py"),
                         *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "bench").glob("*.md"),
                         *(ROOT / "configs").glob("*.toml"), *DOCS.glob("*.md"))]
    design = [p.relative_to(ROOT).as_posix() for p in files if "DESIGN" + ".md" in _text(p)]
    assert design == [], f"these cite the design notes by their old name; they are docs/architecture.md: {design}"
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in files for m in re.findall(r"\bdocs/[\w-]+\.md", _text(p))
                      if not (ROOT / m).is_file()})
    assert missing == []


# ------------------------------------------------------------------------------------------------ facts about the code

RESUME_MARK = "<!-- resume keys: RunConfig.resume_may_differ() (tests/test_docs.py) -->\n"


@pytest.mark.parametrize("page", ["docs/outputs.md", "docs/configuration.md"])
def test_the_keys_a_resumed_run_may_change_are_the_codes(page):
    text = _text(ROOT / page)
    assert RESUME_MARK in text, page
    paragraph = text.split(RESUME_MARK, 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`([\w-]+)`", paragraph)) == RunConfig.resume_may_differ()


def _state_copies(strategy: str) -> float:
    """How many model-sized arrays a rule keeps between rounds (what a checkpoint adds to the model), after two
    rounds through Flower's strategy as the app drives it (float32 in, float32 out)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedtp_flwr.compat import strategy_baseline, strategy_state
    from fedtp_flwr.server.strategy import _as_float32, make_inner_strategy

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    rule = make_inner_strategy(RunConfig(strategy=strategy, server_momentum=0.9))
    baseline = strategy_baseline(rule)
    arrays = ArrayRecord({"w": Array(np.zeros(1000, np.float32))})
    for rnd in (1, 2):
        list(rule.configure_train(rnd, arrays, ConfigRecord(), Grid()))
        reply = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(1000, rnd, np.float32))}),
                                    "metrics": MetricRecord({"num-examples": 3})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = rule.aggregate_train(rnd, [reply])
        arrays = _as_float32(arrays)
    state = strategy_state(rule, baseline)
    arrays = [a for v in state.values() if isinstance(v, (dict, list))
              for a in (v.values() if isinstance(v, dict) else v) if isinstance(a, np.ndarray)]
    return sum(a.nbytes for a in arrays) / 4000


def test_checkpoint_sizes_are_the_model_and_the_rules_state(server_identity):
    """A checkpoint is the float32 model plus the server rule's state: the pages' sizes for the tiny preset and the
    3B follow from the models' parameter counts and the copies each rule keeps."""
    from fedtp_flwr.model import build_model, preset_args

    copies = {s: _state_copies(s) for s in STRATEGIES}
    assert copies == {"fedavg": 0, "fedprox": 0, "fedavgm": 1, "diloco": 1, "fedadam": 2, "fedyogi": 2,
                      "fedadagrad": 2}, copies
    size = {}
    for preset in ("llama3.2-tiny", "llama3.2-3b"):
        model = build_model(preset_args(preset), device="meta", seed=None)
        size[preset] = 4 * sum(t.numel() for t in model.state_dict().values())
    tiny = [f"{size['llama3.2-tiny'] * (1 + k) / 1e6:.0f} MB" for k in (0, 1, 2)]
    big = [f"{size['llama3.2-3b'] * (1 + k) / 1e9:.2f}" for k in (0, 1, 2)]
    outputs = " ".join(_text(DOCS / "outputs.md").split())
    assert (f"{tiny[0]} with FedAvg or FedProx, {tiny[1]} with DiLoCo, or FedAvgM with `server-momentum` > 0 (the "
            f"momentum, as large as the model), {tiny[2]} with FedAdam, FedYogi or FedAdagrad (two moments); for Llama 3.2 3B {big[0]}, {big[1]} "
            f"and {big[2]} GB") in outputs
    assert f"per round under `checkpoints/` ({tiny[0]} each for this 33M-parameter preset)" in " ".join(
        _text(README).split())
    for recipe in ROOT.glob("configs/llama32-3b*.toml"):  # keep-checkpoints' comment: how much a checkpoint takes
        gb = size["llama3.2-3b"] * (2 if "strategy = \"diloco\"" in _text(recipe) else 1) / 1e9
        assert f"the last two {gb:.0f} GB checkpoints" in _text(recipe), recipe.name
    deployment = " ".join(_text(DOCS / "deployment.md").split())
    assert f"a {tiny[0]} checkpoint under `checkpoints/` ({tiny[1]} with DiLoCo, which keeps a momentum" in deployment


# ------------------------------------------------------------------------------------------------ the first run

def _first_run():
    spec = importlib.util.spec_from_file_location("first_run", ROOT / "bench" / "first_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample_region(readme: str) -> str:
    fr = _first_run()
    m = fr.BEGIN.search(readme)
    assert m, "README.md: the first-run sample's begin marker is missing"
    return readme[m.end():readme.index(fr.END)]


def test_the_first_run_script_runs_the_readme_command():
    fr = _first_run()
    setup = re.findall(r"```bash\n(.*?)\n```", _text(README), re.S)[0]
    assert setup.endswith(fr.COMMAND), (setup, fr.COMMAND)


def test_the_first_run_sample_is_chosen_from_the_output_and_written_between_the_markers(tmp_path):
    fr = _first_run()
    work = tmp_path / "w"
    stream = "\n".join([
        "\x1b[92mLoading project configuration... \x1b[0m",
        "Successfully started run 123",
        "INFO :      fedtp-flwr: tokenizer Tokenizer(...); held-out ...",
        f"INFO :      fedtp-flwr: llama3.2-tiny (33.2M parameters), world size 2, rounds 1..3, outputs in "
        f"{work}/outputs/run-123",
        "INFO :      round 0: held-out loss 11.7811, perplexity 130759.25 (4096 tokens)",
        "INFO :      [ROUND 1/3]",
        "INFO :      round 1: node -> rank {7: 0, 9: 1}; sending 264.2 MB (float32 slices)",
        "(ClientAppActor pid=77) INFO :      round 1: held-out loss 1.0 (a client's line)",
        "INFO :      round 1: 2 valid replies, 264.2 MB received",
        "INFO :      round 1: held-out loss 10.9207, perplexity 55311.00 (4096 tokens)\r",
        "INFO :      [ROUND 2/3]",
        "INFO :      round 2: node -> rank {7: 0, 9: 1}; sending 264.2 MB (float32 slices)",
        "INFO :      round 2: held-out loss 9.7973, perplexity 17985.51 (4096 tokens)",
        "INFO :      fedtp-flwr: 2 of 2 rounds trained (1: 2 clients, 2: 2 clients)",
    ])
    lines = fr.normalize(stream, work)
    assert f"outputs in {fr.CHECKOUT}/outputs/run-123" in lines[3] and "\x1b" not in "".join(lines)
    sample = fr.select_sample(lines)
    assert [s.split(":      ", 1)[1][:22] for s in sample] == [
        "fedtp-flwr: llama3.2-t", "round 0: held-out loss", "[ROUND 1/3]", "round 1: node -> rank ",
        "round 1: 2 valid repli", "round 1: held-out loss", "round 2: held-out loss", "fedtp-flwr: 2 of 2 rou"]
    readme = "intro\n<!-- first-run sample: begin (x) -->\n<!-- first-run sample: pending -->\nOLD SAMPLE\n" \
             "<!-- first-run sample: end -->\nrest\n"
    new = fr.readme_with_sample(readme, sample, "2026-12-01")
    assert new.startswith("intro\n") and new.endswith("<!-- first-run sample: end -->\nrest\n")
    assert "pending" not in new and "OLD SAMPLE" not in new and all(s in new.splitlines() for s in sample)
    with pytest.raises(ValueError, match="markers"):
        fr.readme_with_sample("no markers", sample, "2026-12-01")


def test_the_readme_first_run_lines_are_what_the_run_printed():
    """Each line of the README's sample is a line of bench/results/first_run.log (what `python bench/first_run.py`
    recorded of the README's first command), figures included."""
    fr = _first_run()
    region = _sample_region(_text(README))
    if not fr.LOG.is_file():
        assert "<!-- first-run sample: pending -->" in region, "the README's sample is not marked pending"
        pytest.skip("bench/results/first_run.log is not there yet: run `python bench/first_run.py`, which records "
                    "the README's first command and rewrites the sample from it")
    assert "pending" not in region, "bench/results/first_run.log exists: run `python bench/first_run.py` again"
    (code,) = re.findall(r"```\n(.*?)\n```", region, re.S)
    printed = set(_text(fr.LOG).splitlines())
    assert [line for line in code.splitlines() if line not in printed] == []
