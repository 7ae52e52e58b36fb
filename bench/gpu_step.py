"""One local training step of a Llama 3.2 3B tensor-parallel slice on a CUDA GPU: tokens/s, peak memory, MFU.

For each world size (default 2 and 4, then the full model for comparison while time remains), the rank-0
slice is built on the meta device and materialised directly on the GPU (`build_model(..., seed=None)`, i.e.
`to_empty(device="cuda")`, then a normal(0, 0.02) init drawn on the GPU), so host RAM is never a limit.
It is trained by `fedtp_flwr.training.loop.train_local` exactly as a client trains it: bf16 autocast over
float32 master weights, fused AdamW, gradient clipping, optionally gradient checkpointing. One optimizer is
kept across a warm-up call and a timed call, so allocating the AdamW state is not timed.

  tokens/s      batch * seq * timed steps / seconds of the timed call (train_local's own clock; it
                synchronises every step)
  peak memory   torch.cuda.max_memory_allocated since just before the model was built (weights,
                gradients, AdamW state, activations); max_memory_reserved as well
  MFU           model FLOPs / s / --peak-tflops. Model FLOPs per token: 6 x matmul parameters of the slice
                (split weights + output projection; the embedding is a lookup) + causal attention
                (6 x layers x heads x head_dim x seq); recomputation under checkpointing is not counted.
                --peak-tflops defaults to 989 (H100/H200 SXM, dense bf16).

A time guard (--time-budget-s, default 420) skips configurations that would not finish within 8 minutes.
`--dry-run` runs the same code on the CPU with the llama3.2-tiny preset in seconds (memory: peak RSS).

    python bench/gpu_step.py                              # on a CUDA machine, < 8 min
    python bench/gpu_step.py --gradient-checkpointing     # the same with activation recomputation
    python bench/gpu_step.py --dry-run --out /tmp/g.json  # CPU, seconds
    python bench/gpu_step.py --options today,best          # the client memory options of client_memory.py

With --options, each option of bench/client_memory.py (its run-config keys: context slices, vocabulary
splitting, low-bit / bf16 optimizers, the step in backward, a chunked loss) is measured at each world size,
the client model built as the client builds it (`_memory_model.client_model`, random weights drawn on the
device), next to its analytic peak (`_memory_model.client_peak`). With the step in backward each train_local
call makes its own optimizer, so the timed call includes allocating the optimizer state.
Without a CUDA device (and without --dry-run) the script says so and exits 0 without measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path

import torch

_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:  # also importable as a module from the tests
    sys.path.insert(0, str(_BENCH))

import _common  # noqa: E402
import _memory_model as mm  # noqa: E402
import client_memory  # noqa: E402

from fedtp_flwr.model import build_model  # noqa: E402
from fedtp_flwr.model.sharding import shard_args, valid_world_sizes  # noqa: E402
from fedtp_flwr.training import TrainSettings, make_optimizer, train_local  # noqa: E402


@torch.no_grad()
def init_on_device(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """A fast stand-in for Transformer.init_weights (which draws on the CPU): normal(0, std) drawn where the
    parameter lives, RMSNorm weights ones. Speed does not depend on the values, only that they are sane."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


def measure(model_name: str, world_size: int, a, device: torch.device, option: str | None = None) -> dict:
    args = _common.model_args(model_name)
    sub = shard_args(args, world_size)
    opts = None if option is None else client_memory.OPTIONS[option]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _common.rss_bytes()
    _common.reset_peak_rss()

    t0 = time.perf_counter()
    if opts is None:
        model = build_model(sub, device=device, seed=None)  # meta -> to_empty(device): nothing on the host
        init_on_device(model)
        settings = TrainSettings(learning_rate=1e-5, local_steps=a.warmup_steps, precision=a.precision,
                                 gradient_checkpointing=a.gradient_checkpointing, device=str(device), seed=0,
                                 max_grad_norm=1.0)
    else:
        model = mm.client_model(args, world_size, opts, device=str(device))
        settings = dataclasses.replace(client_memory.settings_for(opts, a.warmup_steps), device=str(device))
    if cuda:
        torch.cuda.synchronize()
    build_seconds = time.perf_counter() - t0

    g = torch.Generator().manual_seed(world_size)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=g)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    optimizer = None if settings.optimizer_in_backward else make_optimizer(model, settings)
    warm = train_local(model, itertools.repeat(batch), settings, optimizer=optimizer)
    timed_settings = dataclasses.replace(settings, local_steps=a.steps)
    timed = train_local(model, itertools.repeat(batch), timed_settings, optimizer=optimizer)

    params = sum(p.numel() for p in model.parameters())
    tokens_per_step = a.batch * a.seq
    step_seconds = timed["seconds"] / a.steps
    flops_per_token = _common.training_flops(args, world_size, a.seq)
    achieved = flops_per_token * tokens_per_step / step_seconds
    result = {
        "option": option, "world_size": world_size, "params": params, "batch": a.batch, "seq": a.seq, "steps": a.steps,
        "warmup_steps": a.warmup_steps, "build_seconds": build_seconds, "warmup_seconds": warm["seconds"],
        "step_seconds": step_seconds, "tokens_per_second": tokens_per_step / step_seconds,
        "model_flops_per_token": flops_per_token, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (a.peak_tflops * 1e12), "train_loss": timed["train_loss"],
        "loss_finite": math.isfinite(timed["train_loss"]),
    }
    if cuda:
        torch.cuda.synchronize()
        result["peak_memory_allocated"] = torch.cuda.max_memory_allocated() - base_alloc
        result["peak_memory_reserved"] = torch.cuda.max_memory_reserved()
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_allocated"] = _common.peak_rss_bytes() - base_rss
        result["memory_kind"] = "peak RSS delta (CPU dry run)"
    # the analytic figure of bench/client_memory.py, for comparison
    if opts is None:
        autocast = a.precision == "bf16" or (a.precision == "auto" and cuda)
        profile = _common.activation_profile(sub, a.batch, a.seq, autocast=autocast)
        result["analytic_peak"] = _common.training_peak_bytes(profile)["peak"]
    else:
        result["analytic_peak"] = mm.client_peak(args, world_size, opts, a.batch, a.seq)["peak"]
    del model, optimizer
    return result


def result_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3.2-3b")
    p.add_argument("--world-sizes", default="2,4,1", help="in this order; 1 (the full model) is for comparison")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "auto"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--options", default="", help="comma list of bench/client_memory.py options (default: none, "
                                                  "the plain slice with --precision and --gradient-checkpointing)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--time-budget-s", type=float, default=420.0, help="skip configurations past this")
    p.add_argument("--dry-run", action="store_true", help="CPU, llama3.2-tiny, 1+1 steps of 1 x 64 tokens")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_step.json; dry run: "
                                               "bench/results/gpu_step_dry_run.json)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    if a.dry_run:
        a.model, a.batch, a.seq, a.steps, a.warmup_steps = "llama3.2-tiny", 1, 64, 1, 1
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpu_step.py: skipped, no CUDA device here (use --dry-run to run the same code on the CPU)",
                  file=sys.stderr)
            return {"skipped": "no CUDA device"}
        device = torch.device("cuda")
    out = a.out or str(_common.RESULTS_DIR / ("gpu_step_dry_run.json" if a.dry_run else "gpu_step.json"))
    args = _common.model_args(a.model)
    world_sizes = [int(w) for w in a.world_sizes.split(",") if int(w) in valid_world_sizes(args)]
    options = [o for o in a.options.split(",") if o] or [None]
    unknown = [o for o in options if o is not None and o not in client_memory.OPTIONS]
    if unknown:
        p.error(f"unknown option(s) {unknown}; known: {list(client_memory.OPTIONS)}")

    rows, skipped = [], []
    for option, w in itertools.product(options, world_sizes):
        elapsed = time.perf_counter() - t_start
        if rows and elapsed + 1.5 * max(r["wall_seconds"] for r in rows) > a.time_budget_s:
            skipped.append({"option": option, "world_size": w,
                            "reason": f"time budget: {elapsed:.0f} s spent of {a.time_budget_s:.0f}"})
            continue
        t0 = time.perf_counter()
        try:
            r = measure(a.model, w, a, device, option)
        except torch.OutOfMemoryError as e:
            skipped.append({"option": option, "world_size": w, "reason": f"out of memory: {str(e).splitlines()[0]}"})
            torch.cuda.empty_cache()
            continue
        r["wall_seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(f"  {option or 'plain'} W={w}: {r['tokens_per_second']:,.0f} tokens/s, peak {r['peak_memory_allocated'] / 1e9:.1f} GB, "
              f"MFU {r['mfu']:.1%}, {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    for r in rows:
        full = next((x for x in rows if x["world_size"] == 1 and x["option"] == r["option"]), None)
        r["step_time_vs_full"] = r["step_seconds"] / full["step_seconds"] if full else None
    _common.table(
        ["option", "W", "params", "tokens/s", "s/step", "peak GB", "analytic peak GB", "TFLOP/s", "MFU", "vs full"],
        [[r["option"] or "plain", r["world_size"] if r["world_size"] > 1 else "1 (full)", r["params"], f"{r['tokens_per_second']:,.0f}",
          f"{r['step_seconds']:.3f}", f"{r['peak_memory_allocated'] / 1e9:.2f}", f"{r['analytic_peak'] / 1e9:.2f}",
          f"{r['achieved_tflops']:.1f}", f"{r['mfu']:.1%}",
          f"{r['step_time_vs_full']:.3f}" if r["step_time_vs_full"] else "-"] for r in rows],
        title=f"{a.model} slice, one local training step on {result_device(device)}: batch {a.batch} x {a.seq}, "
              f"{a.precision}, gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, "
              f"{a.steps} timed steps",
    )
    for s in skipped:
        print(f"  skipped {s['option'] or 'plain'} W={s['world_size']}: {s['reason']}")
    result = {
        "dry_run": a.dry_run, "device": result_device(device),
        "cuda_version": torch.version.cuda, "model": a.model, "precision": a.precision,
        "gradient_checkpointing": a.gradient_checkpointing, "peak_tflops": a.peak_tflops, "batch": a.batch,
        "seq": a.seq, "rows": rows, "skipped": skipped, "seconds": time.perf_counter() - t_start,
    }
    _common.write_results("gpu_step", result, out)
    return result


if __name__ == "__main__":
    main()
