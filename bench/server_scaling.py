"""Server memory against the number of clients: the real app through a SuperLink and N SuperNodes on 127.0.0.1.

For each N (default 2, 4, 8) a fresh deployment (fedtp_flwr/flower_harness.py: Deployment, which stops every
process it started) runs `flwr run` of this app on a model written here as a Meta checkpoint (default
~67M parameters: dim 1024, 6 layers, byte tokenizer, so that its float32 size, not the processes' baseline,
dominates the ServerApp), W=2, bfloat16 slices, 2 rounds of 1 local step, the default outlier check on.
N > W: several nodes train each rank (TP x DP). The ServerApp logs its own peak RSS (VmHWM) and its RSS at
start (server.py); the deployment's processes are also sampled every 0.25 s.

The streaming server holds, at a round's peak: the global model (float32 record, M), the running sums (M,
which become the merged record), the reply being pulled (R bytes of bf16 arrays, plus f R that Flower's
transport adds while inflating it; f from bench/results/transport.json), and with >= 3 nodes the round's
first two replies, held until a third gives the outlier check a median. Nothing of that grows with N:
    peak = RSS at start + 2 M + f R (+ 2 R with >= 3 nodes)
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

from fedtp_flwr.flower_harness import Deployment, find_tagged_processes

from fedtp_flwr.checkpoint import save_meta_checkpoint  # noqa: E402
from fedtp_flwr.model import ModelArgs, build_model  # noqa: E402

PEAK_RE = re.compile(r"ServerApp memory: peak RSS ([\d.]+) GB, RSS at start ([\d.]+) GB")
MB_RE = re.compile(r"round (\d+): (\d+) valid repl\w+, ([\d.]+) MB received")


def _vm(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


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
            sampled["together"] = max(sampled["together"], sum(_vm(p, "VmRSS") for p in procs))
            for pid, cmd in procs.items():
                if "flwr-serverapp" in cmd:
                    sampled["serverapp"] = max(sampled["serverapp"], _vm(pid, "VmHWM"))

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
    return {"clients": n, "peak_rss_bytes": int(float(m.group(1)) * 1e9), "rss_at_start_bytes": int(float(m.group(2)) * 1e9),
            "sampled_serverapp_peak_bytes": sampled["serverapp"], "all_processes_peak_bytes": sampled["together"],
            "received_mb_per_round": [mb for _, _, mb in received], "seconds": time.perf_counter() - t0}


def accounting(runs: list[dict], model_bytes: int, reply_bytes: int) -> tuple[dict, list[dict]]:
    """The server's peak as the module docstring counts it, checked against the runs and applied to 3B.

    peak = RSS at start + 2 M + f R (+ 2 R while the outlier check holds a round's first two replies: with
    >= 3 nodes), f = what Flower's transport adds per byte of a reply while it is pulled and inflated: the
    ServerApp's round-trip figure of bench/results/transport.json (a 1 GB slice, fixed costs negligible)."""
    transport = _common.RESULTS_DIR / "transport.json"
    f = json.loads(transport.read_text())["round_trip_added_rss_per_byte_sent"] if transport.exists() else 3.5

    def peak(start, m, r, n):
        return start + 2 * m + f * r + (2 * r if n >= 3 else 0)

    validation = [{"clients": r["clients"], "predicted_bytes": peak(r["rss_at_start_bytes"], model_bytes, reply_bytes,
                                                                   r["clients"]),
                   "measured_bytes": r["peak_rss_bytes"]} for r in runs]
    for v in validation:
        v["measured_vs_predicted"] = v["measured_bytes"] / v["predicted_bytes"]
    b3 = _common.model_args("llama3.2-3b")
    m3 = 4 * sum(t.numel() for t in build_model(b3, device="meta", seed=None).state_dict().values())
    r3 = 2 * _common.param_counts(b3, 2)["total"]  # a W=2 bfloat16 reply
    start = max(r["rss_at_start_bytes"] for r in runs)
    worst_fit = max(v["measured_vs_predicted"] for v in validation)
    analytic = {"model_gb": m3 / 1e9, "reply_gb": r3 / 1e9, "transport_factor_f": f, "rss_at_start_gb": start / 1e9,
                "budget_gb": 3 * m3 / 1e9,
                "server_peak_gb": {"1-2 clients": peak(start, m3, r3, 2) / 1e9, "3+ clients": peak(start, m3, r3, 3) / 1e9},
                "server_peak_vs_model": {"1-2 clients": peak(start, m3, r3, 2) / m3, "3+ clients": peak(start, m3, r3, 3) / m3},
                "server_peak_gb_scaled_by_worst_fit": peak(start, m3, r3, 3) * worst_fit / 1e9,
                "before_streaming_gb": {str(n): (start + 3 * m3 + n * (1 + f) * r3) / 1e9 for n in (2, 4, 8)}}
    return analytic, validation


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
    a = p.parse_args(argv)
    args = bench_args(a)
    clients = [int(x) for x in a.clients.split(",")]
    counts = _common.param_counts(args, a.world_size)
    model_bytes = 4 * sum(t.numel() for t in build_model(args, device="meta", seed=None).state_dict().values())
    reply_bytes = counts["total"] * (2 if a.wire_dtype != "float32" else 4)
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
    g, x = analytic["server_peak_gb"], analytic["server_peak_vs_model"]
    print(f"\nmax / min peak over {clients} clients = {ratio:.3f} (aim <= 1.15); 3B W=2 bf16 server peak "
          f"{g['1-2 clients']:.1f} GB ({x['1-2 clients']:.2f}x the float32 model) with 1-2 clients, "
          f"{g['3+ clients']:.1f} GB ({x['3+ clients']:.2f}x) with more, any number (aim <= 3x = "
          f"{analytic['budget_gb']:.1f} GB)")
    result = {"model_bytes": model_bytes, "reply_bytes": reply_bytes, "peak_rss_bytes": peaks,
              "peak_ratio": ratio, "ratio_aim_met": ratio <= 1.15, "3b_analytic_gb": analytic,
              "accounting_vs_measured": validation, "runs": runs,
              "model_args": args.to_params(), "world_size": a.world_size, "wire_dtype": a.wire_dtype}
    _common.write_results("server_scaling", result, a.out)
    return result


if __name__ == "__main__":
    main()
