"""The README's first run, for real: the main job as its set-up section runs it, and what it prints.

    python bench/first_run.py               # a few minutes on 2 CPU cores: writes bench/results/first_run.log and
                                            # rewrites the README's sample (between its first-run markers) from it
    python bench/first_run.py --no-readme   # the log only

It runs `FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream` on this checkout with the embedded
defaults (pyproject.toml) and Flower's default local federation (2 SuperNodes with Flower's default resources), through
`fedtp_flwr.testing.flower_harness.run_simulation`: the same command, in a private FLWR_HOME and working folder on
free loopback ports, so the checkout gets no outputs/ and no running SuperLink is touched. What `flwr run --stream`
printed goes to bench/results/first_run.log: colours removed, and the working folder written as ~/fedtp-flwr (the
folder a user who cloned into their home runs it from). The README quotes some of its lines (`SAMPLE`), and
tests/test_docs.py checks that each quoted line is a line of that file, figures and all.

It exits 1 when the run did not end `finished:completed` (the log is written anyway, to see why).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG = REPO_ROOT / "bench" / "results" / "first_run.log"
README = REPO_ROOT / "README.md"
COMMAND = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream"
CHECKOUT = "~/fedtp-flwr"  # how the log shows the folder the run was started from
BEGIN = re.compile(r"<!-- first-run sample: begin[^\n]*-->\n")
END = "<!-- first-run sample: end -->"

# The README's sample: the ServerApp's lines that show what a run does (its set-up, round 0, the first round in full,
# every later round's held-out loss, the closing line), in the order printed.
SAMPLE = [re.compile(p) for p in (
    r"fedtp-flwr: .*outputs in ",
    r"round 0: held-out loss ",
    r"\[ROUND 1/\d+\]",
    r"round 1: node -> rank ",
    r"round 1: \d+ valid repl",
    r"round \d+: held-out loss ",
    r"fedtp-flwr: \d+ of \d+ rounds? trained",
)]


def normalize(stream_text: str, workdir: str | Path) -> list[str]:
    """The lines `flwr run --stream` printed, colours removed, the working folder shown as CHECKOUT."""
    from fedtp_flwr.testing.flower_harness import strip_ansi

    text = strip_ansi(stream_text).replace(str(Path(workdir).resolve()), CHECKOUT).replace(str(workdir), CHECKOUT)
    return [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def select_sample(lines: list[str]) -> list[str]:
    """The lines of the README's sample, in the order printed (a ClientApp's lines, prefixed by Ray, never)."""
    return [line for line in lines if not line.lstrip().startswith("(") and any(p.search(line) for p in SAMPLE)]


def readme_with_sample(readme: str, sample: list[str], when: str) -> str:
    """`readme` with the part between its first-run markers replaced by `sample` (the pending note goes)."""
    m = BEGIN.search(readme)
    end = readme.find(END)
    if m is None or end < m.end():
        raise ValueError(f"{README}: no '<!-- first-run sample: begin ... -->' ... '{END}' markers")
    body = (f"What `{COMMAND}` printed, as `python bench/first_run.py` recorded it on {when} (selected\n"
            f"lines of `bench/results/first_run.log`, which holds the whole output; the folder it ran from shown as\n"
            f"`{CHECKOUT}`):\n\n```\n" + "\n".join(sample) + "\n```\n")
    return readme[:m.end()] + body + readme[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take (default 1800)")
    p.add_argument("--no-readme", action="store_true", help="write the log only; leave the README as it is")
    a = p.parse_args(argv)

    from fedtp_flwr.testing.flower_harness import run_simulation

    with tempfile.TemporaryDirectory(prefix="fedtp-first-run-") as workdir:
        start = time.monotonic()
        res = run_simulation(REPO_ROOT, None, timeout_s=a.timeout, workdir=workdir)
        seconds = time.monotonic() - start
        lines = normalize(res.stream_text, workdir)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    print(f"{COMMAND}: {res.status} after {seconds:.0f} s; its output is in {LOG.relative_to(REPO_ROOT)}")
    if not res.ok:
        print(res.describe(), file=sys.stderr)
        return 1
    sample = select_sample(lines)
    if not a.no_readme:
        when = time.strftime("%Y-%m-%d", time.gmtime())
        README.write_text(readme_with_sample(README.read_text(encoding="utf-8"), sample, when), encoding="utf-8")
        print(f"README.md: the first-run sample is {len(sample)} lines of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
