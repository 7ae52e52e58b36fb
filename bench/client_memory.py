"""Client memory of local training for every memory option, x world size: Llama 3.2 3B (and Llama 3.1 8B /
70B) analytic, the 230M `bench` model measured against its analytic figure.

The options form a ladder, each adding one run-config change to the one before (bench/_memory_model.py
defines the keys and how each is counted):

  today            independent slices, float32 weights, torch AdamW, bf16 autocast, gradient checkpointing
  context-int4     slice-mode "context" (int4 frozen rest, absmax per 64 columns)
  +vocab-parallel  tok_embeddings and output split by vocabulary rows too
  +adamw4bit       torchao AdamW with 4-bit state (adamw8bit is reported beside it)
  +bf16-weights    client-param-dtype "bfloat16" (stochastic rounding, no float32 master copy)
  +in-backward     optimizer-in-backward: no gradient buffers (max-grad-norm 0)
  best             + loss-chunk-tokens 128, context-group-size 128: the configs/llama32-3b-small-gpu*.toml recipes
  best+rest-adapter  + rest-adapter-rank 16 (context mode's low-rank update of the frozen rest, issue 21)
  independent-best (beside the ladder) the optimizer and loss options of best on independent slices

Analytic (`_memory_model.client_peak`): from the very model the client builds (meta device), its trainable
weights, frozen rest, optimizer state as each optimizer allocates it, gradients, saved activations
(counted per block, flash attention) and the loss's transients, walked through backward block by block.

Measured (the 230M `bench` model, dims of the 3B's proportions): each (option, W) in a fresh process, the
peak RSS above the RSS before the client model is built, with MALLOC_MMAP_THRESHOLD_=65536 so that RSS
tracks live bytes; on CUDA torch.cuda.max_memory_allocated. A warm-up on a tiny model with the same options
comes first, so torch's (and torch.compile's, for torchao) one-time allocations are in the baseline.

    python bench/client_memory.py                     # ~25 min on 2 CPU cores (torchao compiles per process)
    python bench/client_memory.py --measure none      # the analytic tables only (seconds)
    python bench/client_memory.py --quick             # tiny model, two options, W = 1, 2 (the tests' dry run)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import itertools
import sys
import time
from unittest import mock

import _common
import _memory_model as mm
import torch

from fedtp_flwr.model.sharding import valid_world_sizes
from fedtp_flwr.server import memory
from fedtp_flwr.training import TrainSettings, train_local
from fedtp_flwr.training import loop as training

_CTX = {"slice-mode": "context"}
_VOCAB = {**_CTX, "vocab-parallel": True}
_4BIT = {**_VOCAB, "optimizer": "adamw4bit"}
_BF16 = {**_4BIT, "client-param-dtype": "bfloat16"}
_INBWD = {**_BF16, "optimizer-in-backward": True}
BEST = {**_INBWD, "loss-chunk-tokens": 128, "context-group-size": 128}
OPTIONS: dict[str, dict] = {
    "today": {},
    "context-int4": _CTX,
    "+vocab-parallel": _VOCAB,
    "+adamw8bit": {**_VOCAB, "optimizer": "adamw8bit"},
    "+adamw4bit": _4BIT,
    "+bf16-weights": _BF16,
    "+in-backward": _INBWD,
    "best": BEST,
    "best+rest-adapter": {**BEST, "rest-adapter-rank": 16},
    # Not in the ladder: the same optimizer and loss options on independent slices (no frozen rest to hold;
    # embeddings and output replicated).
    "independent-best": {k: v for k, v in BEST.items() if k not in ("slice-mode", "vocab-parallel")},
}
GPUS_GB = (8, 12, 16, 24, 32, 40, 48, 80)
CUDA_OVERHEAD_GB = 1.0  # CUDA context (~0.5 GB) and allocator slack, added before picking a GPU


def run_config(opts: dict) -> dict:
    """The run-config keys of an option (what a user puts in --run-config)."""
    full = {**mm.BASELINE, **opts}
    if full["optimizer-in-backward"]:
        full["max-grad-norm"] = 0.0
    return full


def settings_for(opts: dict, steps: int) -> TrainSettings:
    o = run_config(opts)
    return TrainSettings(learning_rate=1e-4, local_steps=steps, precision=o["precision"], seed=0,
                         max_grad_norm=o.get("max-grad-norm", 1.0), optimizer=o["optimizer"],
                         optimizer_in_backward=o["optimizer-in-backward"], loss_chunk_tokens=o["loss-chunk-tokens"],
                         gradient_checkpointing=o["gradient-checkpointing"])


def warm_optimizer_compile(args, world_size: int, opts: dict, device: str) -> None:
    """Step the option's optimizer once on zero tensors of every (shape, dtype) the client model's optimizer
    will step (row blocks with the step in backward), with both weight-decay values, so that torch.compile
    has compiled torchao's step for each before the baseline is taken: compiled code is a one-time cost of
    the process, not training memory. A no-op cost for torch's AdamW."""
    settings = settings_for(opts, 1)
    shapes = set()
    for p in mm.client_model(args, world_size, opts).parameters():  # meta: allocates nothing
        rows = p.shape[0]
        if settings.optimizer_in_backward and p.dim() > 1:
            rows = min(rows, max(1, training.STEP_BLOCK_VALUES // p[0].numel()))
        shapes.add(((rows, *p.shape[1:]), p.dtype))
        if p.shape[0] % rows:
            shapes.add(((p.shape[0] % rows, *p.shape[1:]), p.dtype))
    for shape, dtype in sorted(shapes, key=str):
        for wd in {settings.weight_decay, 0.0}:
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            opt = training._build_optimizer([{"params": [p], "weight_decay": wd}], settings)
            for _ in range(2):
                p.grad = torch.full_like(p, 1e-3)
                training.set_lr(opt, 1e-4)
                opt.step()
            del p, opt


def _say(a, text: str) -> None:
    if a.progress:
        print(f"[{time.strftime('%H:%M:%S')}] {a.model} {a.option} W={a.world_size}: {text}", file=sys.stderr,
              flush=True)


def worker(a) -> dict:
    """One (option, W), in this (fresh) process. Peak RSS above the RSS before the client model is built: of the
    build (the slice is held twice for a moment, as a client's build holds it) and of each phase of training
    (each step's forward, then its backward and optimizer step), the high-water mark read and reset at each."""
    opts = OPTIONS[a.option]
    args = _common.model_args(a.model)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    warm_optimizer_compile(args, a.world_size, opts, a.device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=g)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    # Warm up the same code path (optimizer, compile, autograd) on a tiny model of the same family first, at
    # the largest world size up to W that it divides into.
    tiny_args = _common.model_args("bench-tiny")
    tiny_w = max(w for w in valid_world_sizes(tiny_args, vocab_parallel=True) if w <= a.world_size)
    tiny = mm.client_model(tiny_args, tiny_w, opts, device=a.device)
    small = torch.randint(0, 512, (1, 17), generator=g)
    train_local(tiny, itertools.repeat((small[:, :-1], small[:, 1:])), settings_for(opts, 2))
    del tiny
    gc.collect()
    warm_seconds = time.perf_counter() - t0
    _say(a, f"warmed up (optimizer compiled for every shape) in {warm_seconds:.0f} s")
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    memory.release_freed_memory()
    base_rss = _common.rss_bytes()
    _common.reset_peak_rss()
    phases, clock = [], [time.perf_counter()]

    def mark(name):  # ends a phase: its peak and the RSS it leaves (above the base), then resets the peak
        now, peak = time.perf_counter(), _common.peak_rss_bytes()
        memory.release_freed_memory()
        phases.append({"phase": name, "peak_rss_delta": peak - base_rss,
                       "rss_after_delta": _common.rss_bytes() - base_rss, "seconds": now - clock[0]})
        _say(a, f"{name}: peak {phases[-1]['peak_rss_delta'] / 1e9:.3f} GB above the base, {now - clock[0]:.0f} s")
        _common.reset_peak_rss()
        clock[0] = time.perf_counter()

    model = mm.client_model(args, a.world_size, opts, device=a.device)
    gc.collect()
    mark("build")
    real_loss, real_set_lr = training._loss, training.set_lr

    def loss(*args_, **kw):  # training's _loss: a step's forward and loss
        out = real_loss(*args_, **kw)
        mark(f"step {sum(p['phase'].endswith('forward') for p in phases) + 1} forward")
        return out

    def set_lr(opt, lr):  # called as every step starts: the previous step's backward (and step) has ended
        if len(phases) > 1:
            mark(f"step {len(phases) // 2} backward+step")
        real_set_lr(opt, lr)

    t0 = time.perf_counter()
    with mock.patch.object(training, "_loss", loss), mock.patch.object(training, "set_lr", set_lr):
        m = train_local(model, itertools.repeat(batch), settings_for(opts, a.steps))
    mark(f"step {len(phases) // 2} backward+step")
    train = [p for p in phases if p["phase"] != "build"]
    out = {"params": sum(p.numel() for p in model.parameters()),
           "peak_rss_delta": max(p["peak_rss_delta"] for p in phases),  # build and training
           "build_peak_rss_delta": phases[0]["peak_rss_delta"],
           "train_peak_rss_delta": max(p["peak_rss_delta"] for p in train),
           "model_rss_delta": phases[0]["rss_after_delta"], "phases": phases,
           "base_rss": base_rss, "warm_seconds": warm_seconds, "build_seconds": phases[0]["seconds"],
           "train_seconds": time.perf_counter() - t0, "train_loss": m["train_loss"]}
    if device.type == "cuda":
        out["cuda_peak_allocated_delta"] = torch.cuda.max_memory_allocated() - base
    return out


def analytic_table(args, world_sizes, options, batch: int, seq: int) -> list[dict]:
    rows = []
    for name in options:
        for w in world_sizes:
            if w in valid_world_sizes(args, vocab_parallel=True):
                rows.append({"option": name, "world_size": w, **mm.client_peak(args, w, OPTIONS[name], batch, seq)})
    return rows


def smallest_gpu(peak: int) -> int | None:
    need = peak / 1e9 + CUDA_OVERHEAD_GB
    return next((g for g in GPUS_GB if g >= need), None)


def _pivot(rows: list[dict], title: str) -> str:
    ws = sorted({r["world_size"] for r in rows})
    names = list(dict.fromkeys(r["option"] for r in rows))
    by = {(r["option"], r["world_size"]): r for r in rows}
    return _common.table(["option"] + [f"W={w}" + (" (full model)" if w == 1 else "") + " GB" for w in ws],
                         [[n] + [f"{by[(n, w)]['peak'] / 1e9:.2f}" if (n, w) in by else "-" for w in ws] for n in names],
                         title=title)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="'bench' (230M, 3B-like proportions), 'bench-tiny' or a preset")
    p.add_argument("--measure", default="some",
                   help="'some': today and best at every W, each option at W=2; 'all': every option x W; 'none'")
    p.add_argument("--world-sizes", default="1,2,4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="workers at once (each is its own process; RSS is per process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--table-batch", type=int, default=1, help="batch of the analytic tables")
    p.add_argument("--table-seq", type=int, default=2048, help="sequence length of the analytic tables")
    p.add_argument("--quick", action="store_true", help="bench-tiny, today and +vocab-parallel, W = 1, 2; the 3B table for today and best only, no 8B / "
                   "70B: the tests' dry run")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--option", default="today", help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # the worker's phases on stderr
    a = p.parse_args(argv)
    if a.worker:
        _common.worker_reply(worker(a))
        return {}
    if a.quick:
        a.model, a.steps, a.seq, a.world_sizes = "bench-tiny", 2, 32, "1,2"

    # 1. Measured, each (option, W) in a fresh process (in this process for the quick dry run).
    args = _common.model_args(a.model)
    ws = [int(x) for x in a.world_sizes.split(",") if int(x) in valid_world_sizes(args, vocab_parallel=True)]
    if a.measure == "none":
        plan = []
    elif a.measure == "all":
        plan = [(n, w) for n in OPTIONS for w in ws]
    elif a.quick:  # no torchao option: its torch.compile would take a minute (tests/test_optimizers.py covers it)
        plan = [(n, w) for n in ("today", "+vocab-parallel") for w in ws]
    else:
        plan = [(n, w) for n in ("today", "best") for w in ws]
        plan += [(n, 2) for n in OPTIONS if n not in ("today", "best", "independent-best")]
    def measure(item):
        name, w = item
        argv_w = ["--model", a.model, "--option", name, "--world-size", str(w), "--batch", str(a.batch),
                  "--seq", str(a.seq), "--steps", str(a.steps), "--device", a.device]
        if a.quick:
            return worker(p.parse_args(["--worker", *argv_w]))
        return _common.run_worker(__file__, argv_w, env=_common.LIVE_MALLOC_ENV)

    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        measured_all = list(pool.map(measure, plan))
    rows = []
    for (name, w), m in zip(plan, measured_all):
        an = mm.client_peak(args, w, OPTIONS[name], a.batch, a.seq)
        cuda = "cuda_peak_allocated_delta" in m
        measured = m["cuda_peak_allocated_delta"] if cuda else m["peak_rss_delta"]
        rows.append({"option": name, "world_size": w, "device": a.device, "measured": measured,
                     "measured_kind": "cuda max_memory_allocated" if cuda else
                     "peak RSS delta, MALLOC_MMAP_THRESHOLD_=65536 (tracks live bytes)",
                     "analytic": an, "measured_over_analytic": measured / an["peak"], "worker": m})
        print(f"  {name} W={w}: measured {measured / 1e9:.3f} GB, analytic {an['peak'] / 1e9:.3f} GB "
              f"({measured / an['peak']:.3f}x)", file=sys.stderr, flush=True)
    if rows:
        _common.table(
            ["option", "W", "params", "weights GB", "rest GB", "state GB", "activations GB", "analytic peak GB",
             "measured GB", "measured/analytic"],
            [[r["option"], r["world_size"], r["analytic"]["params"], f"{r['analytic']['weights'] / 1e9:.3f}",
              f"{r['analytic']['rest'] / 1e9:.3f}", f"{r['analytic']['state'] / 1e9:.3f}",
              f"{r['analytic']['activations'] / 1e9:.3f}", f"{r['analytic']['peak'] / 1e9:.3f}",
              f"{r['measured'] / 1e9:.3f}", f"{r['measured_over_analytic']:.3f}"] for r in rows],
            title=f"Measured ({rows[0]['measured_kind']}, {a.device}) vs analytic: model {a.model!r}, batch "
                  f"{a.batch} x {a.seq} tokens, {a.steps} local steps, fresh process each")

    # 2. Analytic: Llama 3.2 3B for every option; Llama 3.1 8B and 70B for today and best.
    tb, ts = a.table_batch, a.table_seq
    # quick: the 3B's two ends only and no 8B / 70B (each analytic peak runs a meta-device forward and backward:
    # the full tables take minutes; the quick run checks their plumbing, the same function)
    t3b = analytic_table(mm.llama32_3b(), (1, 2, 4, 8), ("today", "best") if a.quick else OPTIONS, tb, ts)
    _pivot(t3b, f"Llama 3.2 3B, analytic peak (GB = 1e9 B), batch {tb} x {ts} tokens; each option adds to the one above")
    big = {}
    for name in () if a.quick else ("llama3.1-8b", "llama3.1-70b"):
        big[name] = analytic_table(mm.llama31(name), (1, 2, 4, 8), ("today", "best", "independent-best"), tb, ts)
        _pivot(big[name], f"{name} ({mm.n_params(mm.llama31(name)) / 1e9:.2f}B parameters), analytic, batch {tb} x {ts}")
    best3b = {str(r["world_size"]): round(r["peak"] / 1e9, 2) for r in t3b if r["option"] == "best"}
    gpu_rows = []
    for model_name, table in (("llama3.2-3b", t3b), *big.items()):
        for w in (1, 2, 4, 8):
            today = next(r for r in table if r["option"] == "today" and r["world_size"] == w)
            best = next(r for r in table if r["option"] == "best" and r["world_size"] == w)
            gpu_rows.append({"model": model_name, "world_size": w, "today_gb": today["peak"] / 1e9,
                             "best_gb": best["peak"] / 1e9, "today_gpu_gb": smallest_gpu(today["peak"]),
                             "best_gpu_gb": smallest_gpu(best["peak"])})
    _common.table(["model", "W", "today GB", "smallest GPU today", "best GB", "smallest GPU best"],
                  [[g["model"], g["world_size"], f"{g['today_gb']:.1f}", g["today_gpu_gb"] or "> 80",
                    f"{g['best_gb']:.1f}", g["best_gpu_gb"] or "> 80"] for g in gpu_rows],
                  title=f"Which GPU for which W (smallest of {GPUS_GB} GB holding the analytic peak + "
                        f"{CUDA_OVERHEAD_GB} GB of CUDA context and allocator slack)")

    worst = max((abs(r["measured_over_analytic"] - 1) for r in rows), default=None)
    summary = {"aim": "measured within 10% of the analytic figure", "max_abs_deviation": worst,
               "aim_met": worst is not None and worst <= 0.10,
               "goal_3b_gb": {"2": 8, "4": 6, "8": 4},
               "goal_3b_met": all(best3b[w] <= g for w, g in {"2": 8, "4": 6, "8": 4}.items())}
    if worst is not None:
        print(f"\nmeasured/analytic deviates at most {worst:.1%} (aim <= 10%: {'met' if summary['aim_met'] else 'MISSED'})")
    print(f"3B best: {best3b} GB (goal W=2 <= 8, W=4 <= 6, W=8 <= 4: "
          f"{'met' if summary['goal_3b_met'] else 'MISSED'})")
    result = {"model": a.model, "model_args": args.to_params(), "batch": a.batch, "seq": a.seq, "steps": a.steps,
              "table_batch": tb, "table_seq": ts, "options": {n: run_config(o) for n, o in OPTIONS.items()},
              "rows": rows, "llama3.2-3b": t3b, **big, "gpu_table": gpu_rows,
              "3b_best": {"config": run_config(BEST), "peak_gb": best3b}, "summary": summary}
    _common.write_results("client_memory", result, a.out)
    return result


if __name__ == "__main__":
    main()
