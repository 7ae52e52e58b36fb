"""Client memory of local training: a tensor-parallel slice against the full model of the same config.

Measured: peak memory of `fedtp_flwr.training.train_local` (weights, gradients, AdamW state, activations),
each configuration in a fresh Python process: on the CPU the peak resident set size (VmHWM) above the
process's RSS just before the model is built; on CUDA (when present) torch.cuda.max_memory_allocated
above the memory allocated before. On the CPU each configuration runs twice: with
MALLOC_MMAP_THRESHOLD_=65536, so that glibc returns every freed block >= 64 KiB to the OS and the peak RSS
tracks the live tensor bytes (the figure compared with the analytic one), and with glibc's defaults,
which keep freed heap memory (what a client process occupies). Three local steps, so the AdamW state
exists while the second step's activations and gradients do.

Analytic (bench/_common.py: training_peak_bytes): 16 B per trainable parameter (float32 weights,
gradients, AdamW exp_avg and exp_avg_sq) and the activations autograd saves for backward, counted exactly
per block on the meta device (activation_profile, which matches a real CPU forward byte for byte). The
peak is not their sum: gradients are set to None between steps and appear during backward while the
activations are freed, block by block in reverse, so the peak is
12 B/param + max over blocks b of (activations of blocks <= b + gradients of blocks >= b + b's transient
buffers, which are counted for the loss only: the float32 gradients of the logits and the log-softmax),
at least 16 B/param.
16 B/param + all activations is kept in the JSON as "upper".

bf16 mixed precision (`precision="bf16"`, the default on CUDA) is torch.autocast with float32 master
weights: the same 16 B/param, plus bf16 activations, plus the bf16 copies of every nn.Linear weight that
autocast makes and saves for backward (2 B per linear parameter, freed after backward), all counted in
the activation figure.

    python bench/client_memory.py                      # the 230M 'bench' model, W = 1, 2, 4, ~3 min
    python bench/client_memory.py --quick              # tiny model (used by the tests)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time

import torch

import _common
from fedtp_flwr.model import build_model
from fedtp_flwr.sharding import shard_args, valid_world_sizes
from fedtp_flwr.training import TrainSettings, train_local


def worker(a) -> dict:
    """One configuration, in this (fresh) process."""
    args = shard_args(_common.model_args(a.model), a.world_size)
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=g)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    settings = TrainSettings(learning_rate=1e-4, local_steps=a.steps, precision=a.precision, device=a.device,
                             seed=0, max_grad_norm=1.0)
    # Warm up the same code path on a tiny model first, so that torch's one-time allocations (thread pools,
    # kernel caches, autograd engine) are part of the baseline and not of the measured training memory.
    tiny = build_model(shard_args(_common.model_args("bench-tiny"), 1), device=device, seed=0)
    small = torch.randint(0, 512, (1, 17), generator=g)
    train_local(tiny, itertools.repeat((small[:, :-1], small[:, 1:])), TrainSettings(
        learning_rate=1e-4, local_steps=2, precision=a.precision, device=a.device, seed=0, max_grad_norm=1.0))
    del tiny
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _common.rss_bytes()
    _common.reset_peak_rss()
    model = build_model(args, device=device, seed=0)
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    t0 = time.perf_counter()
    m = train_local(model, itertools.repeat(batch), settings)
    seconds = time.perf_counter() - t0
    out = {"params": params, "linear_params": linear_params, "peak_rss_delta": _common.peak_rss_bytes() - base_rss,
           "base_rss": base_rss, "train_seconds": seconds, "train_loss": m["train_loss"]}
    if device.type == "cuda":
        out["cuda_peak_allocated_delta"] = torch.cuda.max_memory_allocated() - base
    return out


def analytic(args, world_size: int, batch: int, seq: int, autocast: bool) -> dict:
    profile = _common.activation_profile(shard_args(args, world_size), batch, seq, autocast=autocast)
    return dict(_common.training_peak_bytes(profile), profile=profile)


def checkpointed_peak(args, profile: list[dict], batch: int, seq: int) -> int:
    """Estimate with gradient checkpointing, from the activation profile without it: every block keeps only
    its input (the float32 residual stream, 4 B x dim per token); one block's full activations exist while
    it is recomputed."""
    block_input = 4 * batch * seq * args.dim
    layers = [b for b in profile if b["block"].startswith("layers.")]
    ckpt = [dict(b, saved=block_input) if b["block"].startswith("layers.") else b for b in profile]
    return _common.training_peak_bytes(ckpt)["peak"] + max(b["saved"] for b in layers)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="'bench' (230M, 3B-like proportions), 'bench-tiny' or a preset")
    p.add_argument("--world-sizes", default="1,2,4")
    p.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16 (bf16 on the CPU is slow)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--table-batch", type=int, default=1, help="batch of the 3B analytic table")
    p.add_argument("--table-seq", type=int, default=2048, help="sequence length of the 3B analytic table")
    p.add_argument("--quick", action="store_true", help="bench-tiny model, W = 1, 2, 2 steps: the dry run of the tests")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _common.worker_reply(worker(a))
        return {}
    if a.quick:
        a.model, a.steps, a.seq, a.world_sizes = "bench-tiny", 2, 32, "1,2"

    # 1. Measured, each configuration in a fresh process.
    args = _common.model_args(a.model)
    rows = []
    for prec in a.precisions.split(","):
        for w in [int(x) for x in a.world_sizes.split(",") if int(x) in valid_world_sizes(args)]:
            argv_w = ["--model", a.model, "--world-size", str(w), "--precision", prec, "--batch", str(a.batch),
                      "--seq", str(a.seq), "--steps", str(a.steps), "--device", a.device]
            if a.quick:  # the dry run checks the plumbing: in this process, no fresh interpreter
                m = worker(p.parse_args(["--worker", *argv_w]))
            else:
                m = _common.run_worker(__file__, argv_w, env=_common.LIVE_MALLOC_ENV)
            # glibc's default malloc: what a client process occupies (skipped in the quick dry run)
            m_default = m if a.quick else _common.run_worker(__file__, argv_w)
            an = analytic(args, w, a.batch, a.seq, autocast=prec == "bf16")
            cuda = "cuda_peak_allocated_delta" in m
            measured = m["cuda_peak_allocated_delta"] if cuda else m["peak_rss_delta"]
            rows.append({"world_size": w, "precision": prec, "device": a.device, "measured": measured,
                         "measured_kind": "cuda max_memory_allocated" if cuda else
                         "peak RSS delta, MALLOC_MMAP_THRESHOLD_=65536 (tracks live bytes)",
                         "measured_default_malloc": m_default["peak_rss_delta"],
                         "analytic": an, "measured_over_analytic": measured / an["peak"],
                         "default_malloc_over_analytic": m_default["peak_rss_delta"] / an["peak"],
                         "worker": m, "worker_default_malloc": m_default})
            print(f"  W={w} {prec}: measured {measured / 1e9:.3f} GB (default malloc "
                  f"{m_default['peak_rss_delta'] / 1e9:.3f} GB), analytic {an['peak'] / 1e9:.3f} GB", file=sys.stderr)
    for r in rows:
        full = next((x for x in rows if x["world_size"] == 1 and x["precision"] == r["precision"]), None)
        r["vs_full"] = r["measured"] / full["measured"] if full else None
    _common.table(
        ["W", "precision", "params", "measured GB", "default malloc GB", "16 B/p GB", "activations GB",
         "analytic peak GB", "measured/analytic", "default malloc/analytic", "vs full model"],
        [[r["world_size"] if r["world_size"] > 1 else "1 (full)", r["precision"], r["analytic"]["params"],
          f"{r['measured'] / 1e9:.3f}", f"{r['measured_default_malloc'] / 1e9:.3f}",
          f"{r['analytic']['static'] / 1e9:.3f}", f"{r['analytic']['activations'] / 1e9:.3f}",
          f"{r['analytic']['peak'] / 1e9:.3f}", f"{r['measured_over_analytic']:.3f}",
          f"{r['default_malloc_over_analytic']:.3f}", f"{r['vs_full']:.3f}" if r["vs_full"] else "-"] for r in rows],
        title=f"Measured ({rows[0]['measured_kind'] if rows else ''}, {a.device}) vs analytic: model {a.model!r}, "
              f"batch {a.batch} x {a.seq} tokens, AdamW, {a.steps} local steps, fresh process each",
    )

    # 2. Analytic table for the 3B.
    big = _common.model_args("llama3.2-3b")
    table3b = []
    for w in (1, 2, 4, 8):
        fp32 = analytic(big, w, a.table_batch, a.table_seq, autocast=False)
        bf16 = analytic(big, w, a.table_batch, a.table_seq, autocast=True)
        table3b.append({"world_size": w, "params": fp32["params"], "fp32": fp32, "bf16_autocast": bf16,
                        "bf16_checkpointed_peak": checkpointed_peak(big, bf16["profile"], a.table_batch, a.table_seq)})
    _common.table(
        ["W", "params", "16 B/param GB", "fp32 activations GB", "fp32 peak GB", "bf16 activations GB",
         "bf16 autocast peak GB", "bf16 peak, ckpt GB"],
        [[t["world_size"] if t["world_size"] > 1 else "1 (full)", t["params"], f"{t['fp32']['static'] / 1e9:.1f}",
          f"{t['fp32']['activations'] / 1e9:.1f}", f"{t['fp32']['peak'] / 1e9:.1f}",
          f"{t['bf16_autocast']['activations'] / 1e9:.1f}", f"{t['bf16_autocast']['peak'] / 1e9:.1f}",
          f"{t['bf16_checkpointed_peak'] / 1e9:.1f}"] for t in table3b],
        title=f"Llama 3.2 3B, analytic (GB = 1e9 B): AdamW, float32 master weights; activations for batch "
              f"{a.table_batch} x {a.table_seq} tokens, flash attention; bf16 autocast activations include its "
              "bf16 weight copies (2 B per linear parameter); 'ckpt': with gradient checkpointing (estimate: "
              "each block keeps its input, one block's activations are recomputed at a time)",
    )
    slices = [r for r in rows if r["world_size"] > 1]
    worst = max((abs(r["measured_over_analytic"] - 1) for r in slices), default=None)
    summary = {"aim": "slice training memory within 10% of the analytic figure",
               "max_abs_deviation_slices": worst, "aim_met": worst is not None and worst <= 0.10}
    if worst is not None:
        print(f"\nslices: measured/analytic deviates at most {worst:.1%} (aim <= 10%: "
              f"{'met' if summary['aim_met'] else 'MISSED'})")
    result = {"model": a.model, "model_args": _common.model_args(a.model).to_params(), "batch": a.batch,
              "seq": a.seq, "steps": a.steps, "rows": rows, "llama3.2-3b": table3b, "summary": summary}
    _common.write_results("client_memory", result, a.out)
    return result


if __name__ == "__main__":
    main()
