"""Server aggregation at 3B scale: time and peak memory to merge W slices of the real Llama 3.2 3B parameter
set (bfloat16, so that it fits in this machine's 24 GB), against a plain memory copy of the model's bytes.

Three operations, each in a fresh Python process (peak RSS measured separately, /proc VmHWM):
  copy       the physical floor: a new tensor for every parameter of the global model, copy_ of the old one
  copy-float32  the floor for an output in float32 (the server's global model is float32 and so are merge's
             and aggregate's outputs): a new float32 tensor per parameter, copy_ (convert) of the old one
  merge      fedtp_flwr.sharding.merge(shards, args): concatenate split parameters, average replicated ones
  aggregate  fedtp_flwr.server.aggregation.aggregate_slices(global, contributions, args, W): what the server runs
             each round (per-rank weighting, one reply per rank), which calls merge

Inputs, built with torch.empty and written once (values do not matter for time; written pages are resident):
the global model G, and W received slices. To fit in memory, a slice's split parameters are views of G
(a real server holds them in separate memory; their bytes are counted in 'model + received slices' below,
not in the measured RSS), while every rank's replicated parameters are separate tensors with their own
values, so averaging them is real work.

Reported per operation: seconds, and 'extra' = peak RSS above the resident inputs (what the operation
allocates). For a real server, peak = model + received slices + extra; the aim compares it with
model + received slices (<= 1.2x), and the time with the copy floor (<= 3x), at the same layer count, run
back to back. Time includes first-touching the new memory: this machine is a Firecracker VM whose memory is
backed lazily, so writing fresh pages costs more than the copy itself (the copy run also reports a second
copy into the now-resident memory, the bandwidth alone).

Memory: the full 3B needs about 16 GB for the copy and ~20-23 GB for merge/aggregate. The script first runs
every operation on the real 3B tensors with fewer transformer layers (--layers, default 2 and 6), fits
time and extra memory linearly in the layer count, and runs the full 28 layers only where the fitted
peak plus --margin-gb fits in MemAvailable; otherwise it reports the fit's prediction for 28 layers,
marked as extrapolated.

Every operation runs with --threads torch threads (default 1, so that ratios hold on a shared machine).

    python bench/server_merge.py                  # ~3-5 min
    python bench/server_merge.py --quick          # tiny model (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import _common
import torch

from fedtp_flwr.model import Transformer
from fedtp_flwr.model.sharding import REPLICATE, rule_for, shard
from fedtp_flwr.server.aggregation import Contribution, aggregate_slices, merge

OPS = ("copy", "copy-float32", "merge", "aggregate")


def build_inputs(args, world_size: int, dtype: torch.dtype):
    """(global state, [rank slices]); split parameters of the slices are views of the global state."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state = {k: _common.touch(torch.empty(s, dtype=dtype), 0.01) for k, s in shapes.items()}
    slices = []
    for r in range(world_size):
        sl = shard(state, args, r, world_size)
        if r > 0:  # every rank's replicated parameters are its own (different values)
            sl = {k: (_common.touch(torch.empty_like(v), 0.01 + 0.001 * r) if rule_for(k) is REPLICATE else v)
                  for k, v in sl.items()}
        slices.append(sl)
    return state, slices


def worker(a) -> dict:
    torch.set_num_threads(a.threads)
    args = _common.model_args(a.model)
    if a.layers:
        args = dataclasses.replace(args, n_layers=a.layers)
    dtype = getattr(torch, a.dtype)
    base = _common.rss_bytes()
    state, slices = build_inputs(args, a.world_size, dtype)
    inputs_rss = _common.rss_bytes() - base
    _common.reset_peak_rss()
    t0 = time.perf_counter()
    warm = None
    if a.op in ("copy", "copy-float32"):
        out_dtype = torch.float32 if a.op == "copy-float32" else dtype
        out = {k: torch.empty(t.shape, dtype=out_dtype).copy_(t) for k, t in state.items()}
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()  # the same copy again, into memory that is now resident: bandwidth only
        for k, t in state.items():
            out[k].copy_(t)
        warm = time.perf_counter() - t1
    elif a.op == "merge":
        out = merge(slices, args, weights=[1.0] * a.world_size)
    else:
        out = aggregate_slices(state, [Contribution(r, s, 100.0 + r) for r, s in enumerate(slices)], args,
                               a.world_size, "per-rank")
    if warm is None:
        seconds = time.perf_counter() - t0
    peak = _common.peak_rss_bytes() - base
    esize = torch.tensor([], dtype=dtype).element_size()
    model_bytes = sum(t.numel() for t in state.values()) * esize
    slice_bytes = [sum(t.numel() for t in s.values()) * esize for s in slices]
    out_bytes = sum(t.numel() * t.element_size() for t in out.values())
    return {"op": a.op, "layers": args.n_layers, "world_size": a.world_size, "seconds": seconds,
            "seconds_into_resident": warm,
            "inputs_rss": inputs_rss, "peak_rss": peak, "extra": peak - inputs_rss, "model_bytes": model_bytes,
            "received_bytes": sum(slice_bytes), "out_bytes": out_bytes,
            "model_numel": sum(t.numel() for t in state.values()), "out_numel": sum(t.numel() for t in out.values()),
            "out_dtypes": sorted({str(t.dtype) for t in out.values()})}


def fit(points: list[tuple[int, float]], x: int) -> float:
    """Least-squares line through (layers, value) points, evaluated at x."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    return my + slope * (x - mx)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3.2-3b")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--layers", default="2,6", help="layer counts run first (real tensor shapes, fewer layers)")
    p.add_argument("--full", choices=("auto", "yes", "no"), default="auto",
                   help="run all layers: auto = where the fitted peak + margin fits in MemAvailable")
    p.add_argument("--margin-gb", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each operation (1: stable ratios on a machine shared with other work)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every operation at the small layer counts (the fastest counts: other processes "
                        "and the VM's lazily backed memory only ever add time)")
    p.add_argument("--quick", action="store_true", help="bench-tiny model: the dry run of the tests")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--op", choices=OPS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.layers = int(a.layers) if a.layers else 0
        _common.worker_reply(worker(a))
        return {}
    if a.quick:
        a.model, a.layers, a.full = "bench-tiny", "2", "yes"
    full_layers = _common.model_args(a.model).n_layers

    def run(op: str, layers: int) -> dict:
        argv_w = ["--op", op, "--model", a.model, "--world-size", str(a.world_size), "--dtype", a.dtype,
                  "--layers", str(layers), "--threads", str(a.threads)]
        if a.quick:  # the dry run checks the plumbing: in this process, no fresh interpreter per operation
            ns = p.parse_args(["--worker", *argv_w])
            ns.layers = layers
            r = worker(ns)
        else:
            r = _common.run_worker(__file__, argv_w, env=_common.LIVE_MALLOC_ENV)
        print(f"  {op:9s} {layers:2d} layers: {r['seconds']:.2f} s, inputs {r['inputs_rss'] / 1e9:.2f} GB, "
              f"extra {r['extra'] / 1e9:.2f} GB", file=sys.stderr)
        return r

    runs = []
    small = [int(x) for x in a.layers.split(",")]
    for layers in small:
        tries: dict[str, list[dict]] = {op: [] for op in OPS}
        for _ in range(1 if a.quick else a.repeats):
            for op in OPS:  # side by side: every op at one size before the next size
                tries[op].append(run(op, layers))
        for op in OPS:
            best = min(tries[op], key=lambda r: r["seconds"])
            runs.append(dict(best, seconds_all=[r["seconds"] for r in tries[op]],
                             extra_all=[r["extra"] for r in tries[op]]))
    results = {}
    for op in OPS:
        pts = [r for r in runs if r["op"] == op]
        predicted_peak = fit([(r["layers"], r["peak_rss"]) for r in pts], full_layers)
        fits = predicted_peak + a.margin_gb * 1e9 <= _common.mem_available_bytes()
        if a.full == "yes" or (a.full == "auto" and fits):
            if full_layers not in small:
                runs.append(run(op, full_layers))
            r = next(x for x in runs if x["op"] == op and x["layers"] == full_layers)
            results[op] = dict(r, extrapolated=False)
        else:
            print(f"  {op}: predicted peak {predicted_peak / 1e9:.1f} GB + margin does not fit in MemAvailable "
                  f"{_common.mem_available_bytes() / 1e9:.1f} GB: extrapolating to {full_layers} layers",
                  file=sys.stderr)
            ref = pts[-1]
            results[op] = {
                "op": op, "layers": full_layers, "extrapolated": True, "world_size": a.world_size,
                **{k: fit([(r["layers"], r[k]) for r in pts], full_layers)
                   for k in ("seconds", "inputs_rss", "peak_rss", "extra", "model_bytes", "received_bytes",
                             "out_bytes", "model_numel", "out_numel")},
                "out_dtypes": ref["out_dtypes"],
            }
    # Time ratios side by side: at the largest layer count where every operation ran (back to back).
    common = max(L for L in {r["layers"] for r in runs} if all(any(r["op"] == op and r["layers"] == L for r in runs)
                                                               for op in OPS))
    at_common = {r["op"]: r for r in runs if r["layers"] == common}
    rows = []
    for op in OPS:
        r = results[op]
        nominal = r["model_bytes"] + r["received_bytes"]
        rows.append(dict(r, time_vs_copy=at_common[op]["seconds"] / at_common["copy"]["seconds"],
                         time_vs_copy_float32=at_common[op]["seconds"] / at_common["copy-float32"]["seconds"],
                         time_ratio_layers=common, nominal_inputs=nominal, server_peak=nominal + r["extra"],
                         peak_vs_nominal=(nominal + r["extra"]) / nominal))
    # Like-for-like ratios at every measured size (same layers, run back to back).
    same_size = []
    for layers in sorted({r["layers"] for r in runs}):
        at = {r["op"]: r for r in runs if r["layers"] == layers}
        if "copy" in at:
            same_size.append({"layers": layers, **{f"{op}_time_vs_copy": at[op]["seconds"] / at["copy"]["seconds"]
                                                   for op in OPS if op in at},
                              **{f"{op}_extra_gb": at[op]["extra"] / 1e9 for op in OPS if op in at}})
    for r in runs:
        if r["op"] in ("copy", "copy-float32"):
            print(f"  {r['op']} into resident memory, {r['layers']} layers: {r['seconds_into_resident']:.2f} s "
                  f"({r['model_bytes'] / r['seconds_into_resident'] / 1e9:.1f} GB/s; with fresh allocation: "
                  f"{r['model_bytes'] / r['seconds'] / 1e9:.1f} GB/s)")
    _common.table(["layers", *[f"{op} s" for op in OPS], *[f"{op} extra GB" for op in OPS]],
                  [[L, *[f"{next(r['seconds'] for r in runs if r['op'] == op and r['layers'] == L):.2f}"
                         if any(r['op'] == op and r['layers'] == L for r in runs) else "-" for op in OPS],
                    *[f"{next(r['extra'] for r in runs if r['op'] == op and r['layers'] == L) / 1e9:.2f}"
                      if any(r['op'] == op and r['layers'] == L for r in runs) else "-" for op in OPS]]
                   for L in sorted({r["layers"] for r in runs})],
                  title=f"Every run ({a.model} tensor shapes, {a.dtype}, W={a.world_size}; extra = peak RSS above "
                        "the resident inputs)")
    _common.table(
        ["operation", "layers", "seconds", f"time vs copy ({common} layers)", "time vs copy-float32",
         "extra GB", "model + received GB", "server peak GB", "peak / (model + received)", "output dtypes"],
        [[r["op"], f"{r['layers']}{' (extrapolated)' if r['extrapolated'] else ''}", f"{r['seconds']:.2f}",
          f"{r['time_vs_copy']:.2f}x", f"{r['time_vs_copy_float32']:.2f}x", f"{r['extra'] / 1e9:.2f}", f"{r['nominal_inputs'] / 1e9:.2f}",
          f"{r['server_peak'] / 1e9:.2f}", f"{r['peak_vs_nominal']:.3f}", ",".join(r["out_dtypes"])] for r in rows],
        title=f"{a.model}, {a.dtype}, W={a.world_size}: merge against the memory-copy floor "
              "(server peak = model + received slices + extra)",
    )
    agg = next(r for r in rows if r["op"] == "aggregate")
    mrg = next(r for r in rows if r["op"] == "merge")
    summary = {
        "aim": "merge within 3x the memory-copy floor, peak RSS at most 1.2x (model + received slices)",
        "aggregate_time_vs_copy": agg["time_vs_copy"], "aggregate_peak_vs_nominal": agg["peak_vs_nominal"],
        "merge_time_vs_copy": mrg["time_vs_copy"], "merge_peak_vs_nominal": mrg["peak_vs_nominal"],
        "aggregate_time_vs_copy_float32": agg["time_vs_copy_float32"],
        "merge_time_vs_copy_float32": mrg["time_vs_copy_float32"],
        "time_aim_met": agg["time_vs_copy"] <= 3 and mrg["time_vs_copy"] <= 3,
        "memory_aim_met": agg["peak_vs_nominal"] <= 1.2 and mrg["peak_vs_nominal"] <= 1.2,
    }
    print(f"\naggregate_slices: {agg['time_vs_copy']:.2f}x the copy floor's time "
          f"({agg['time_vs_copy_float32']:.2f}x a copy into float32), server peak "
          f"{agg['peak_vs_nominal']:.2f}x (model + received); merge: {mrg['time_vs_copy']:.2f}x, "
          f"{mrg['peak_vs_nominal']:.2f}x (aims 3x / 1.2x)")
    result = {"model": a.model, "dtype": a.dtype, "world_size": a.world_size, "threads": a.threads, "runs": runs,
              "same_size": same_size,
              "rows": rows, "summary": summary}
    _common.write_results("server_merge", result, a.out)
    return result


if __name__ == "__main__":
    main()
