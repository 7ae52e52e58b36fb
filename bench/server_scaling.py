"""Server memory against the number of clients: the real app through a SuperLink and N SuperNodes on 127.0.0.1.

For each N (default 2, 4, 8) a fresh deployment (fedtp_flwr/flower_harness.py: Deployment, which stops every
process it started) runs `flwr run` of this app on a model written here as a Meta checkpoint (default
~67M parameters: dim 1024, 6 layers, byte tokenizer, so that its float32 size, not the processes' baseline,
dominates the ServerApp), W=2, bfloat16 slices, 2 rounds of 1 local step, the default outlier check on.
N > W: several nodes train each rank (TP x DP). The ServerApp logs its own peak RSS (VmHWM) and its RSS at
start (server.py); the deployment's processes are also sampled every 0.25 s.

The streaming server's round has two memory peaks (the ServerApp logs each phase's peak RSS):
- sending: the global model (float32 record, M), one rank's encoded slice (R bytes; slices go out one rank
  at a time) and what Flower's push adds while it deflates it (p R);
- receiving and merging: the global model (M), the running sums (M, which become the merged record) and the
  reply being pulled (q R: fedtp_flwr.server.pull assembles each array in one buffer, q ~ 1.1).
- evaluating: the global model and the merged one (2 M), and the held-out batch's float32 logits and
  cross-entropy's log-softmax (E = 2 x max-batch-size x max-seq-len x vocab x 4 B; 4.2 GB with the 3B
  recipe's 8 x 512, negligible with this script's byte vocabulary).
p and q are the ServerApp's per-byte figures of bench/results/transport.json (a >= 0.5 GB slice, fixed costs
negligible). Replies the outlier check or a robust merge keeps are parked on disk (spill-dir). Nothing of
that grows with N:
    peak = RSS at start + max(M + (1 + p) R, 2 M + q R, 2 M + E)
The script prints that accounting beside each measured peak, and applies it to Llama 3.2 3B at W=2.

    nice -n 10 python bench/server_scaling.py             # ~10-20 min, ~10 GB of memory at N = 8
    python bench/server_scaling.py --clients 2,3 --dim 256 --layers 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
import tomllib

from fedtp_flwr.model import ModelArgs, build_model  # noqa: E402
from fedtp_flwr.model.checkpoint import save_meta_checkpoint  # noqa: E402
from fedtp_flwr.server.memory import status_bytes
from fedtp_flwr.testing.flower_harness import Deployment, find_tagged_processes

PEAK_RE = re.compile(r"ServerApp memory: peak RSS ([\d.]+) GB, RSS at start ([\d.]+) GB")
MB_RE = re.compile(r"round (\d+): (\d+) valid repl\w+, ([\d.]+) MB received")
PHASES_RE = re.compile(r"round (\d+): ServerApp peak RSS: (.*)")
PHASE_RE = re.compile(r"([a-z ]+?) ([\d.]+) GB")


def bench_args(a) -> ModelArgs:
    return ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, n_kv_heads=max(2, a.dim // 256),
                     vocab_size=260, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0,
                     use_scaled_rope=True)


def one_run(n: int, ckpt: Path, work: Path, a) -> dict:
    cfg = {"checkpoint-dir": str(ckpt), "tokenizer-path": "bytes", "world-size": a.world_size,
           "wire-dtype": a.wire_dtype, "num-server-rounds": a.rounds, "local-steps": 1, "batch-size": 1,
           "max-seq-len": 16, "eval-batches": 1, "max-batch-size": 1, "min-available-nodes": n, "device": "cpu",
           "checkpoint-every": 0, "output-dir": str(work / f"out-{n}")}
    sampled = {"together": 0, "serverapp": 0}
    stop = threading.Event()

    def sample(tag: str):
        while not stop.wait(0.25):
            procs = find_tagged_processes(tag)
            sampled["together"] = max(sampled["together"], sum((status_bytes("VmRSS", p) or 0) for p in procs))
            for pid, cmd in procs.items():
                if "flwr-serverapp" in cmd:
                    sampled["serverapp"] = max(sampled["serverapp"], (status_bytes("VmHWM", pid) or 0))

    t0 = time.perf_counter()
    configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    with Deployment(num_supernodes=n, node_configs=configs) as dep:
        sampler = threading.Thread(target=sample, args=(dep.tag,), daemon=True)
        sampler.start()
        run = dep.run(_common.REPO_ROOT, cfg, timeout_s=a.timeout_s)
        stop.set()
        sampler.join()
        if not run.ok:
            print(run.describe(), file=sys.stderr)
            for node in dep.supernodes:
                print(node.output[-2000:], file=sys.stderr)
            raise SystemExit(f"the Flower run with {n} clients did not complete")
    m = PEAK_RE.search(run.log_text)
    if not m:
        raise SystemExit(f"no ServerApp memory line in the log of the run with {n} clients")
    received = [(int(r), int(v), float(mb)) for r, v, mb in MB_RE.findall(run.log_text)]
    if any(v != n for _, v, _ in received):
        raise SystemExit(f"not every reply was valid with {n} clients: {received}")
    phases: dict[str, int] = {}  # each phase's peak over the rounds
    for _, line in PHASES_RE.findall(run.log_text):
        for name, gb in PHASE_RE.findall(line):
            phases[name.strip(", ")] = max(phases.get(name.strip(", "), 0), int(float(gb) * 1e9))
    return {"clients": n, "peak_rss_bytes": int(float(m.group(1)) * 1e9), "rss_at_start_bytes": int(float(m.group(2)) * 1e9),
            "phase_peak_bytes": phases,
            "sampled_serverapp_peak_bytes": sampled["serverapp"], "all_processes_peak_bytes": sampled["together"],
            "received_mb_per_round": [mb for _, _, mb in received], "seconds": time.perf_counter() - t0}


def accounting(runs: list[dict], model_bytes: int, reply_bytes: int) -> tuple[dict, list[dict]]:
    """The server's peak as the module docstring counts it, checked against the runs and applied to 3B.

    peak = RSS at start + max(sending: M + (1 + p) R, receiving: 2 M + q R), p and q the ServerApp's
    per-byte push and pull figures of bench/results/transport.json (fedtp_flwr.server.pull)."""
    transport = _common.RESULTS_DIR / "transport.json"
    fedtp = json.loads(transport.read_text())["by_pull"]["fedtp"]
    p, q = fedtp["push_added_rss_per_byte"], fedtp["pull_added_rss_per_byte"]

    def phases(start, m, r, e=0):
        return {"sending": start + m + (1 + p) * r, "receiving and merging": start + 2 * m + q * r,
                "evaluating": start + 2 * m + e}

    def peak(start, m, r, e=0):
        return max(phases(start, m, r, e).values())

    validation = []
    for r in runs:
        predicted = phases(r["rss_at_start_bytes"], model_bytes, reply_bytes)
        validation.append({"clients": r["clients"], "predicted_bytes": max(predicted.values()),
                           "measured_bytes": r["peak_rss_bytes"],
                           "phases": {k: {"predicted_bytes": v, "measured_bytes": r["phase_peak_bytes"].get(k)}
                                      for k, v in predicted.items()}})
    for v in validation:
        v["measured_vs_predicted"] = v["measured_bytes"] / v["predicted_bytes"]
    b3 = _common.model_args("llama3.2-3b")
    m3 = 4 * sum(t.numel() for t in build_model(b3, device="meta", seed=None).state_dict().values())
    r3 = 2 * _common.param_counts(b3, 2)["total"]  # a W=2 bfloat16 reply
    start = max(r["rss_at_start_bytes"] for r in runs)
    worst_fit = max(v["measured_vs_predicted"] for v in validation)
    f = json.loads(transport.read_text())["by_pull"]["flower"]["pull_added_rss_per_byte"]  # Flower's own pull
    recipe = tomllib.loads((_common.REPO_ROOT / "configs" / "llama32-3b.toml").read_text())
    e3 = 2 * recipe["max-batch-size"] * recipe["max-seq-len"] * b3.vocab_size * 4  # eval logits + log-softmax
    analytic = {"model_gb": m3 / 1e9, "reply_gb": r3 / 1e9, "push_factor_p": p, "pull_factor_q": q,
                "eval_activations_gb": e3 / 1e9, "rss_at_start_gb": start / 1e9, "budget_gb": 3 * m3 / 1e9,
                "phases_gb": {k: v / 1e9 for k, v in phases(start, m3, r3, e3).items()},
                "server_peak_gb": peak(start, m3, r3, e3) / 1e9, "server_peak_vs_model": peak(start, m3, r3, e3) / m3,
                "server_peak_gb_scaled_by_worst_fit": peak(start, m3, r3, e3) * worst_fit / 1e9,
                "before_streaming_gb": {str(n): (start + 3 * m3 + n * (1 + f) * r3) / 1e9 for n in (2, 4, 8)}}
    return analytic, validation


def measure(clients: list[int], args: ModelArgs, a) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="server-scaling-") as tmp:
        work = Path(tmp)
        save_meta_checkpoint(build_model(args, seed=0).state_dict(), args, work / "model")
        for n in clients:
            r = one_run(n, work / "model", work, a)
            print(f"  {n} clients: ServerApp peak {r['peak_rss_bytes'] / 1e9:.2f} GB (start "
                  f"{r['rss_at_start_bytes'] / 1e9:.2f} GB), all processes {r['all_processes_peak_bytes'] / 1e9:.2f} GB, "
                  f"{r['seconds']:.0f} s", file=sys.stderr)
            runs.append(r)
    return runs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="2,4,8")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--wire-dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--out", default=None)
    p.add_argument("--accounting-only", action="store_true",
                   help="no runs: redo the accounting over the runs in the results file (--out or the default one)")
    a = p.parse_args(argv)
    args = bench_args(a)
    clients = [int(x) for x in a.clients.split(",")]
    counts = _common.param_counts(args, a.world_size)
    model_bytes = 4 * sum(t.numel() for t in build_model(args, device="meta", seed=None).state_dict().values())
    reply_bytes = counts["total"] * (2 if a.wire_dtype != "float32" else 4)
    runs = []
    if a.accounting_only:
        saved = json.loads(Path(a.out or _common.RESULTS_DIR / "server_scaling.json").read_text())
        runs = saved["runs"]
        args, clients = ModelArgs(**saved["model_args"]), [r["clients"] for r in saved["runs"]]
        a.world_size, a.wire_dtype = saved["world_size"], saved["wire_dtype"]
        counts = _common.param_counts(args, a.world_size)
        model_bytes, reply_bytes = saved["model_bytes"], saved["reply_bytes"]
    else:
        runs = measure(clients, args, a)
    peaks = {str(r["clients"]): r["peak_rss_bytes"] for r in runs}
    ratio = max(r["peak_rss_bytes"] for r in runs) / min(r["peak_rss_bytes"] for r in runs)
    analytic, validation = accounting(runs, model_bytes, reply_bytes)
    rows = [[r["clients"], f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['rss_at_start_bytes'] / 1e9:.2f}",
             f"{r['peak_rss_bytes'] / runs[0]['peak_rss_bytes']:.3f}", f"{r['all_processes_peak_bytes'] / 1e9:.2f}",
             f"{r['seconds']:.0f}"] for r in runs]
    _common.table(["clients", "ServerApp peak GB", "at start GB", "peak / peak(first)", "all processes GB", "s"], rows,
                  title=f"{model_bytes / 4 / 1e6:.0f}M parameters (float32 {model_bytes / 1e9:.2f} GB), "
                        f"W={a.world_size}, {a.wire_dtype} replies of {reply_bytes / 1e9:.3f} GB, real SuperLink + N SuperNodes")
    for v in validation:
        print(f"  {v['clients']} clients: measured {v['measured_bytes'] / 1e9:.3f} GB, accounting "
              f"{v['predicted_bytes'] / 1e9:.3f} GB ({v['measured_vs_predicted']:.3f}x)")
    print(f"\nmax / min peak over {clients} clients = {ratio:.3f} (aim <= 1.15); 3B W=2 bf16 server peak "
          f"{analytic['server_peak_gb']:.1f} GB ({analytic['server_peak_vs_model']:.2f}x the float32 model), any "
          f"number of clients (aim <= 3x = {analytic['budget_gb']:.1f} GB); phases: "
          + ", ".join(f"{k} {v:.1f} GB" for k, v in analytic["phases_gb"].items()))
    result = {"model_bytes": model_bytes, "reply_bytes": reply_bytes, "peak_rss_bytes": peaks,
              "peak_ratio": ratio, "ratio_aim_met": ratio <= 1.15, "3b_analytic_gb": analytic,
              "3b_aim_met": analytic["server_peak_vs_model"] <= 3.0,
              "accounting_vs_measured": validation, "runs": runs,
              "model_args": args.to_params(), "world_size": a.world_size, "wire_dtype": a.wire_dtype}
    if a.accounting_only:  # where the runs' own numbers came from
        result["runs_measured_by"] = saved.get("runs_measured_by") or {
            k: saved.get(k) for k in ("command", "date", "wall_seconds", "machine")}
    _common.write_results("server_scaling", result, a.out)
    return result


if __name__ == "__main__":
    main()
