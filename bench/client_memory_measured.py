"""Client memory measured at the size the README promises: Llama 3.2 3B with random weights, the small-GPU recipe
with its rest adapters (client_memory.py's option `best+rest-adapter`), batch 1 x 256 tokens, 2 local steps, at
W = 8, 4, 2, against the analytic figure of the same run (`_memory_model.client_peak`, same options, batch and
sequence length).

Each W runs in a fresh process, one after the other, smallest slice first: client_memory.py's worker, which
builds the model a client builds (its slice in bfloat16, the int4 rest written low-bit a block of rows at a time,
the adapters), compiles torchao's step for every shape it will step and warms up on a tiny model, then reads
the peak RSS (MALLOC_MMAP_THRESHOLD_=65536, so RSS tracks live bytes) above the RSS before the build, the
high-water mark reset after the build and after each step's forward and backward. The figure compared with the
analytic peak is training's (every phase after the build); the build's own peak (the slice held twice for a
moment, as a client's build holds it) is reported beside it. Two steps, because the optimizer's state exists
whole only from the second step's backward on.

    python bench/client_memory_measured.py                                      # 3B, W = 8, 4, 2 (hours here)
    python bench/client_memory_measured.py --model llama3.1-8b --world-sizes 8  # 8B at W=8
    python bench/client_memory_measured.py --quick   # bench-tiny, +vocab-parallel, W=2 (the tests' dry run)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common
import _memory_model as mm
import client_memory

from fedtp_flwr.model.sharding import valid_world_sizes

TAGS = {"llama3.2-3b": "3b", "llama3.1-8b": "8b"}
AIM = 0.10  # measured within 10% of the analytic figure


def measure(a, w: int) -> dict:
    """One W in a fresh process; its measured peak against the analytic one."""
    argv = ["--model", a.model, "--option", a.option, "--world-size", str(w), "--batch", str(a.batch),
            "--seq", str(a.seq), "--steps", str(a.steps), "--device", "cpu", "--progress"]
    t0 = time.perf_counter()
    m = _common.run_worker(Path(client_memory.__file__), argv, timeout=a.timeout, env=_common.LIVE_MALLOC_ENV,
                           stream_stderr=True)
    analytic = mm.client_peak(_common.model_args(a.model), w, client_memory.OPTIONS[a.option], a.batch, a.seq)
    ratio = m["train_peak_rss_delta"] / analytic["peak"]
    print(f"  W={w}: measured {m['train_peak_rss_delta'] / 1e9:.3f} GB, analytic {analytic['peak'] / 1e9:.3f} GB "
          f"({ratio:.3f}x); build peak {m['build_peak_rss_delta'] / 1e9:.3f} GB", file=sys.stderr, flush=True)
    return {"world_size": w, "measured": m["train_peak_rss_delta"], "build_peak": m["build_peak_rss_delta"],
            "analytic": analytic, "measured_over_analytic": ratio, "seconds": time.perf_counter() - t0, "worker": m}


def write(a, args, rows: list[dict], done: bool) -> dict:
    """The results so far: bench/results/client_memory_measured_<model>.json and .md (or --out)."""
    worst = max(abs(r["measured_over_analytic"] - 1) for r in rows)
    summary = {"aim": f"measured training peak within {AIM:.0%} of the analytic figure at every W",
               "max_abs_deviation": worst, "aim_met": worst <= AIM,
               "by_world_size": {str(r["world_size"]): {
                   "measured_gb": round(r["measured"] / 1e9, 2), "analytic_gb": round(r["analytic"]["peak"] / 1e9, 2),
                   "ratio": round(r["measured_over_analytic"], 3), "build_peak_gb": round(r["build_peak"] / 1e9, 2),
                   "seconds": round(r["seconds"])} for r in rows}}
    table = _common.table(
        ["W", "params", "weights GB", "rest GB", "state GB", "analytic peak GB", "measured peak GB",
         "measured/analytic", "build peak GB", f"seconds (warm-up, build, {a.steps} steps)"],
        [[r["world_size"], r["analytic"]["params"], f"{r['analytic']['weights'] / 1e9:.3f}",
          f"{r['analytic']['rest'] / 1e9:.3f}", f"{r['analytic']['state'] / 1e9:.3f}",
          f"{r['analytic']['peak'] / 1e9:.3f}", f"{r['measured'] / 1e9:.3f}", f"{r['measured_over_analytic']:.3f}",
          f"{r['build_peak'] / 1e9:.3f}",
          f"{r['seconds']:.0f} ({r['worker']['warm_seconds']:.0f}, {r['worker']['build_seconds']:.0f}, "
          f"{r['worker']['train_seconds']:.0f})"] for r in rows],
        title=f"Model {a.model!r}, option {a.option!r}, batch {a.batch} x {a.seq} tokens, {a.steps} local steps, "
              f"CPU, peak RSS above the pre-build RSS (training; the build's own peak beside it)")
    phases = _common.table(
        ["W", "phase", "peak GB", "RSS after GB", "seconds"],
        [[r["world_size"], ph["phase"], f"{ph['peak_rss_delta'] / 1e9:.3f}", f"{ph['rss_after_delta'] / 1e9:.3f}",
          f"{ph['seconds']:.0f}"] for r in rows for ph in r["worker"]["phases"]],
        title="Phases (peak RSS above the pre-build RSS, the high-water mark reset at each phase's end)")
    print(f"\nmeasured/analytic deviates at most {worst:.1%} (aim <= {AIM:.0%}: {'met' if worst <= AIM else 'MISSED'})")
    result = {"model": a.model, "model_args": args.to_params(), "option": a.option,
              "config": client_memory.run_config(client_memory.OPTIONS[a.option]), "batch": a.batch, "seq": a.seq,
              "steps": a.steps, "device": "cpu",
              "measured_kind": "peak RSS delta above the pre-build RSS, MALLOC_MMAP_THRESHOLD_=65536, the high-water "
                               "mark reset after the build (training phases only)",
              "complete": done, "rows": rows, "summary": summary}
    path = _common.write_results(f"client_memory_measured_{TAGS.get(a.model, a.model)}", result, a.out)
    command = " ".join(["python", "bench/client_memory_measured.py", *sys.argv[1:]])
    path.with_suffix(".md").write_text(
        f"# Client memory measured: {a.model}\n\n`{command}`"
        f"\n{table}\n{phases}\n\nmeasured/analytic deviates at most {worst:.1%} (aim <= {AIM:.0%}: "
        f"{'met' if worst <= AIM else 'missed'})\n")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3.2-3b", help="a preset of fedtp_flwr.model, 'bench' or 'bench-tiny'")
    p.add_argument("--option", default="best+rest-adapter", choices=list(client_memory.OPTIONS))
    p.add_argument("--world-sizes", default="8,4,2", help="measured in this order, one process at a time")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per W")
    p.add_argument("--quick", action="store_true",
                   help="bench-tiny, +vocab-parallel, W=2, 32 tokens: the tests' dry run")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.option, a.world_sizes, a.seq = "bench-tiny", "+vocab-parallel", "2", 32
    args = _common.model_args(a.model)
    ws = [int(x) for x in a.world_sizes.split(",")]
    bad = [w for w in ws if w not in valid_world_sizes(args, vocab_parallel=True)]
    if bad:
        p.error(f"--world-sizes {bad} do not divide {a.model!r}; valid: {valid_world_sizes(args, vocab_parallel=True)}")

    rows = []
    for w in ws:  # the results are rewritten after each W: a long run keeps what it has measured
        rows.append(measure(a, w))
        result = write(a, args, rows, done=len(rows) == len(ws))
    return result


if __name__ == "__main__":
    main()
