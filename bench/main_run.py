"""The README's main job, measured: the embedded default run-config over the in-process grid.

`flwr run .` runs the defaults of pyproject.toml's [tool.flwr.app.config] on a local simulation with two
SuperNodes (partition-id 0 and 1 of 2). This script runs the very same ServerApp logic (`server.run`), Strategy
and ClientApp logic over `fedtp_flwr.testing.inprocess.InProcessGrid` with the same two partitions, in one process,
and records the held-out loss and perplexity after every round (round 0: before training), the megabytes of slices
sent and received per round, and the wall time. (What `flwr run .` itself prints, the README's first-run sample, is
bench/first_run.py's.)
Outputs (checkpoints, eval files) go to a temporary folder that is removed afterwards.

    python bench/main_run.py                 # the defaults (3 rounds of llama3.2-tiny)
    python bench/main_run.py --rounds 1      # shorter
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time

import _common
import tomllib

from fedtp_flwr.server.app import run
from fedtp_flwr.testing.inprocess import InProcessGrid

HELD_OUT = re.compile(r"round (\d+): held-out loss ([\d.]+), perplexity ([\d.]+) \((\d+) tokens\)")
SENT = re.compile(r"round (\d+): node -> rank .*; sending ([\d.]+) MB")
RECEIVED = re.compile(r"round (\d+): (\d+) valid replies, ([\d.]+) MB received")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def default_run_config() -> dict:
    with open(_common.REPO_ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="num-server-rounds (default: the run-config's)")
    p.add_argument("--nodes", type=int, default=2, help="simulated SuperNodes (the local federation has 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, TOML value syntax (e.g. --set 'model=\"bytes-small\"')")
    p.add_argument("--out", default=None, help="results file (default bench/results/main_run.json)")
    a = p.parse_args(argv)

    cfg = default_run_config()
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        cfg[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    if a.rounds is not None:
        cfg["num-server-rounds"] = a.rounds
    capture = _Lines()
    logger = logging.getLogger("flwr")
    logger.addHandler(capture)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg["output-dir"] = tmp
        grid = InProcessGrid([{"partition-id": i, "num-partitions": a.nodes} for i in range(a.nodes)], cfg)
        run(grid, cfg)
    seconds = time.perf_counter() - start
    logger.removeHandler(capture)

    rounds: dict[int, dict] = {}
    for line in capture.lines:
        if m := HELD_OUT.search(line):
            rounds.setdefault(int(m[1]), {}).update(loss=float(m[2]), perplexity=float(m[3]), tokens=int(m[4]))
        elif m := SENT.search(line):
            rounds.setdefault(int(m[1]), {})["sent_mb"] = float(m[2])
        elif m := RECEIVED.search(line):
            rounds.setdefault(int(m[1]), {}).update(valid_replies=int(m[2]), received_mb=float(m[3]))
    rows = [[r, v.get("loss"), v.get("perplexity"), v.get("sent_mb"), v.get("received_mb")]
            for r, v in sorted(rounds.items())]
    _common.table(["round", "held-out loss", "perplexity", "MB sent", "MB received"], rows,
                  title=f"{cfg['model']}, world size {cfg['world-size']}, {a.nodes} nodes: {seconds:.1f} s")
    _common.write_results("main_run", {
        "run_config": {k: v for k, v in cfg.items() if k != "output-dir"}, "nodes": a.nodes,
        "rounds": {str(r): v for r, v in sorted(rounds.items())}, "run_seconds": seconds,
    }, a.out)


if __name__ == "__main__":
    main()
