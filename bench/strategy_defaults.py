"""The server-side defaults of every strategy, measured: server learning rates (and momenta) per strategy on the
built-in corpus with the app's default model, held-out loss after every round.

Every setting is a run of the real ServerApp logic (`server.run`), strategy and client code over
`inprocess.InProcessGrid` with the app's default run-config (pyproject.toml: llama3.2-tiny, world size 2, two nodes,
local AdamW at lr 1e-3, the built-in corpus, 3 rounds) but for the strategy's keys and `SMALLER`: half the local steps
(5) and fewer tokens per step and per evaluation: the 19 settings take ~15 CPU-minutes (39 minutes here on 2 cores
shared with other jobs, load ~7.7). The
server's step acts on the merged update, whose size is set by the local steps and the client learning rate (an AdamW
step moves a weight by about the learning rate, whatever the batch); with half the steps, a learning rate or eta
chosen here errs small for the default 10 steps, not large.

Choice, per strategy: among the settings whose held-out loss fell in every round (a merge refused by the loss guard
keeps the previous model, so its loss does not fall), the one with the lowest loss after the last round. FedAvg runs
too, as the reference (it has no server settings; nor has FedProx). The chosen values are the config's auto values
(config.SERVER_LR, SERVER_MOMENTUM, and for the FedOpt rules ETA_PER_LR = the chosen eta / learning-rate, since their
step per weight is about eta whatever the update's size; tests/test_config.py checks they agree).

Round 1 starts from the same model with the same client seeds in every setting, so the clients' replies to a message
already answered (same node, same arrays, same config) are reused instead of trained again (`CachedClients`): what
they would compute is what they computed.

    python bench/strategy_defaults.py                      # the sweep (bench/results/strategy_defaults.{json,md})
    python bench/strategy_defaults.py --quick              # smoke run (tests): two settings, 2 rounds, 1 step
    python bench/strategy_defaults.py --strategies diloco  # one strategy's settings
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import _common
import tomllib
from fedtp_flwr.config import RunConfig
from fedtp_flwr.server.app import experiment_key, run
from fedtp_flwr.server.outputs import read_results
from fedtp_flwr.testing.inprocess import CachedClients, InProcessGrid

# The app's defaults, but half the local steps (5 instead of 10), fewer tokens per step (2 x 32 instead of 4 x 64)
# and per evaluation (2 x 8 x 32 instead of 8 x 8 x 64), and one checkpoint per run: a setting of 3 rounds then takes
# ~45 CPU-seconds (recorded: cpu_seconds).
SMALLER = {"local-steps": 5, "batch-size": 2, "max-seq-len": 32, "eval-batches": 2, "max-batch-size": 8,
           "checkpoint-every": 0}

# FedOpt's step moves every weight by about eta at first (m / sqrt(v) is about the sign of the update), while 5 client
# AdamW steps at lr 1e-3 move a weight by at most 0.005. Its eta is searched on a ladder of factors ~3 (ETA_LADDER):
# the two middle rungs first, then on from the better of the two while the loss keeps falling every round and ends
# lower. Flower's own default, 0.1, moves every weight by ~0.07 in round 1, three times the init's std.
ETA_LADDER = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
ETA_START = (0.003, 0.01)
# strategy -> settings tried: (server-learning-rate, server-momentum); None: the key is not the strategy's.
GRID = {
    "fedavg": [(None, None)],
    "fedadam": "ladder",
    "fedyogi": "ladder",
    "fedadagrad": "ladder",
    # FedAvgM and DiLoCo: lr up to 1 (the merged update, not beyond it), momentum up to 0.9 (Hsu et al.'s FedAvgM,
    # DiLoCo's paper)
    "fedavgm": [(1.0, 0.5), (1.0, 0.9), (0.7, 0.9)],
    # the slow-link recipe's 1.0 / 0.5 (tuned on the code corpus) and DiLoCo's paper's 0.7 / 0.9 among them
    "diloco": [(lr, mu) for lr in (0.7, 1.0) for mu in (0.5, 0.9)],
}
QUICK_GRID = {"fedadam": [(0.01, None)], "diloco": [(1.0, 0.5)]}  # --quick: no ladder
QUICK = {"num-server-rounds": 2, "local-steps": 1, "eval-batches": 1, "max-batch-size": 4}


class _Refusals(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "refusing the merged model" in record.getMessage()


def default_run_config() -> dict:
    with open(_common.REPO_ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def run_setting(base: dict, strategy: str, lr: float | None, mu: float | None, clients: CachedClients) -> dict:
    cfg = {**base, "strategy": strategy}
    if lr is not None:
        cfg["server-learning-rate"] = lr
    if mu is not None:
        cfg["server-momentum"] = mu
    refusals = _Refusals()
    logging.getLogger("flwr").addHandler(refusals)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg["output-dir"] = tmp
            run(InProcessGrid([{"partition-id": i, "num-partitions": 2} for i in range(2)], cfg, handler=clients), cfg)
            results = read_results(Path(tmp) / "experiment_results_llama32.pkl")
    finally:
        logging.getLogger("flwr").removeHandler(refusals)
    history = results[experiment_key(RunConfig.from_run_config(cfg))]
    losses = [round(loss, 4) for _, loss, _ in history]
    return {"strategy": strategy, "server_learning_rate": lr, "server_momentum": mu, "loss": losses,
            "fell_every_round": all(b < a for a, b in zip(losses, losses[1:])), "refused_merges": refusals.count,
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per strategy with server settings: the row with the lowest final loss among those that fell every round."""
    chosen = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        ok = [r for r in rows if r["strategy"] == strategy and r["fell_every_round"]]
        if ok and ok[0]["server_learning_rate"] is not None:
            chosen[strategy] = min(ok, key=lambda r: r["loss"][-1])
    return chosen


def report(rows: list[dict], chosen: dict[str, dict], base: dict) -> str:
    rounds = len(rows[0]["loss"]) - 1
    fedavg = next((r["loss"][-1] for r in rows if r["strategy"] == "fedavg"), None)
    lines = ["# Server-side defaults per strategy (bench/strategy_defaults.py)", "",
             f"{base['model']}, world size {base['world-size']}, 2 nodes, built-in corpus, {rounds} rounds of "
             f"{base['local-steps']} local steps ({base['batch-size']} x {base['max-seq-len']} tokens, lr "
             f"{base['learning-rate']:g}); held-out loss of the global model after each round (round 0: the initial "
             "model). Chosen: the lowest last-round loss among the settings whose loss fell every round. FedOpt's eta "
             "is searched on a ladder (0.003 and 0.01, then on from the better one while it improves).", ""]
    for name, r in chosen.items():
        lr, mu = r["server_learning_rate"], r["server_momentum"]
        what = f"eta {lr:g} ({lr / base['learning-rate']:g} x learning-rate)" if mu is None else \
            f"lr {lr:g}, momentum {mu:g}"
        vs = f" (FedAvg: {fedavg:.4f})" if fedavg is not None else ""
        lines.append(f"- {name}: {what}: loss {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}{vs}")
    table = _common.table(
        ["strategy", "server lr / eta", "momentum", *[f"loss r{i}" for i in range(rounds + 1)], "fell every round",
         "refused", "vs FedAvg", "chosen"],
        [[r["strategy"], _show(r["server_learning_rate"]), _show(r["server_momentum"]),
          *(f"{x:.4f}" for x in r["loss"]), "yes" if r["fell_every_round"] else "no", r["refused_merges"],
          f"{r['loss'][-1] - fedavg:+.4f}" if fedavg is not None else "-",
          "yes" if chosen.get(r["strategy"]) is r else ""] for r in rows])
    return "\n".join(lines + ["", table, ""])


def _show(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default=None, help="comma-separated subset of the grid's strategies")
    p.add_argument("--rounds", type=int, default=3, help="num-server-rounds")
    p.add_argument("--quick", action="store_true", help="smoke run: two settings, 2 rounds of 1 local step")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown table from the results JSON, "
                                                                 "running nothing")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/strategy_defaults.json; the "
                                               "Markdown table beside it)")
    a = p.parse_args(argv)

    grid = QUICK_GRID if a.quick else GRID
    if a.strategies:
        grid = {s: grid[s] for s in a.strategies.split(",")}
    base = {**default_run_config(), **SMALLER, "num-server-rounds": a.rounds, **(QUICK if a.quick else {})}
    out = Path(a.out) if a.out else _common.RESULTS_DIR / "strategy_defaults.json"
    if a.report_only:
        doc = json.loads(out.read_text())
        out.with_suffix(".md").write_text(report(doc["rows"], choose(doc["rows"]), doc["run_config"]))
        return
    clients, rows = CachedClients(), []

    def measure(strategy: str, lr: float | None, mu: float | None) -> dict:
        rows.append(run_setting(base, strategy, lr, mu, clients))
        print(rows[-1], flush=True)
        write(out, base, grid, rows, clients)  # after every setting: a stopped sweep leaves its numbers
        return rows[-1]

    for strategy, settings in grid.items():
        if settings == "ladder":
            climb(lambda eta: measure(strategy, eta, None))
        else:
            for lr, mu in settings:
                measure(strategy, lr, mu)


def climb(measure) -> None:
    """ETA_START's two rungs, then on along ETA_LADDER past the better one while each step is better (fell every round
    and ended lower)."""
    def better(a: dict, b: dict) -> bool:
        return a["fell_every_round"] and (not b["fell_every_round"] or a["loss"][-1] < b["loss"][-1])

    low, high = (measure(eta) for eta in ETA_START)
    best, step = (high, +1) if better(high, low) else (low, -1)
    i = ETA_LADDER.index(best["server_learning_rate"]) + step
    while 0 <= i < len(ETA_LADDER):
        row = measure(ETA_LADDER[i])
        if not better(row, best):
            break
        best, i = row, i + step

def write(out: Path, base: dict, grid: dict, rows: list[dict], clients: CachedClients) -> None:
    chosen = choose(rows)
    _common.write_results("strategy_defaults", {
        "run_config": {k: v for k, v in base.items() if k != "output-dir"},
        "grid": {s: g if g == "ladder" else list(g) for s, g in grid.items()}, "eta_ladder": ETA_LADDER,
        "eta_start": ETA_START,
        "rows": rows, "chosen": {s: {"server-learning-rate": r["server_learning_rate"],
                                     "server-momentum": r["server_momentum"], "final_loss": r["loss"][-1]}
                                 for s, r in chosen.items()},
        "reused_client_replies": clients.hits, "trained_client_replies": clients.misses,
    }, out)
    out.with_suffix(".md").write_text(report(rows, chosen, base))


if __name__ == "__main__":
    main()
