"""Training throughput of train_local: the full model against tensor-parallel slices, side by side.

    python bench/train_throughput.py                       # 'bench' model (230M), W = 1, 2, 4; ~1-2 min
    python bench/train_throughput.py --preset llama3.2-tiny --batch-size 4 --seq-len 64 --steps 5
    python bench/train_throughput.py --quick               # seconds (used by the tests)

For each device (cpu, and cuda when present) the full model and the rank-0 slice of every world size are
built once, each with one persistent AdamW optimizer, and trained one untimed warm-up step each (kernels,
allocator, AdamW state). Then --steps timed rounds: in every round each model runs one step (its own
train_local call, timed by train_local), in an order rotated from round to round, so that load from
other processes on a shared machine hits every model alike. Reported: target tokens per second of the
median step (and of the best), and the median over rounds of (slice step time / full-model step time in
the same round). Random tokens, no padding, so every position is a target.

On the CPU the default is one torch thread (--threads): on a machine shared with other processes,
multi-threaded matmuls stall on busy cores and step times scatter by 10x; one thread keeps ratios stable.

Default model 'bench' (bench/_common.py): 230M parameters with the 3B's proportions (output projection
~14% of the split parameters). With a preset like llama3.2-tiny the 128,256-token vocabulary (embeddings
and output, replicated in every slice) dominates, and a slice is barely faster than the full model.
Expected ratio from FLOPs (bench/_common.py: training_flops) is printed next to the measured one.
Writes bench/results/train_throughput.json. Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

_BENCH = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(_BENCH), str(_BENCH.parent)) if p not in sys.path]

import _common  # noqa: E402

from fedtp_flwr.model import build_model, count_parameters  # noqa: E402
from fedtp_flwr.model.sharding import shard_args, valid_world_sizes  # noqa: E402
from fedtp_flwr.training import TrainSettings, autocast_dtype, make_optimizer, train_local  # noqa: E402

RESULTS = _BENCH / "results" / "train_throughput.json"


def random_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        yield ids[:, :-1], ids[:, 1:]


def measure_device(full_args, world_sizes: list[int], device: torch.device, opts) -> list[dict]:
    """All models on one device, timed in interleaved rounds (see the module docstring)."""
    settings = TrainSettings(learning_rate=1e-5, local_steps=1, precision=opts.precision, device=str(device),
                             gradient_checkpointing=opts.gradient_checkpointing)
    models, optimizers, batches = {}, {}, {}
    for w in world_sizes:
        models[w] = build_model(shard_args(full_args, w), device=device, seed=0)
        optimizers[w] = make_optimizer(models[w], settings)
        batches[w] = random_batches(full_args.vocab_size, opts.batch_size, opts.seq_len, seed=0)
        train_local(models[w], batches[w], settings, optimizer=optimizers[w])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runs: dict[int, list[dict]] = {w: [] for w in world_sizes}
    for step in range(opts.steps):
        k = step % len(world_sizes)
        for w in world_sizes[k:] + world_sizes[:k]:
            runs[w].append(train_local(models[w], batches[w], settings, optimizer=optimizers[w]))
        print(f"  {device} round {step + 1}/{opts.steps}: "
              + ", ".join(f"W={w} {runs[w][-1]['seconds']:.3f} s" for w in world_sizes), file=sys.stderr, flush=True)

    flops_full = _common.training_flops(full_args, 1, opts.seq_len)
    rows = []
    for w in world_sizes:
        step_s = [m["seconds"] for m in runs[w]]
        median = statistics.median(step_s)
        tokens = runs[w][0]["num_tokens"]
        ratios = [a["seconds"] / f["seconds"] for a, f in zip(runs[w], runs[world_sizes[0]])]
        flops = _common.training_flops(full_args, w, opts.seq_len)
        row = {
            "model": "full" if w == 1 else f"slice W={w}", "world_size": w,
            "device": str(device),
            "precision": "bf16" if autocast_dtype(opts.precision, device) else "fp32",
            "parameters": count_parameters(models[w]),
            "tokens_per_second": tokens / median,
            "tokens_per_second_best": tokens / min(step_s),
            "seconds_per_step": median,
            "seconds_per_step_all": step_s,
            "time_ratio_vs_full": statistics.median(ratios),
            "time_ratios_vs_full_all": ratios,
            "flops_ratio_vs_full": flops / flops_full,
            "achieved_gflops": flops * tokens / median / 1e9,
            "train_loss": runs[w][-1]["train_loss"],
        }
        rows.append(row)
    if device.type == "cuda":
        rows[-1]["peak_memory_gib_all_models"] = torch.cuda.max_memory_allocated(device) / 2**30
    del models, optimizers
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench", help="'bench' (230M), 'bench-tiny' or a fedtp_flwr preset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=7, help="timed rounds (one step of every model per round)")
    p.add_argument("--world-size", type=int, default=2, help="W of the slice to compare with the full model")
    p.add_argument("--world-sizes", default=None, help="several, comma-separated (e.g. 2,4); overrides --world-size")
    p.add_argument("--vocab-size", type=int, default=None, help="override the model's vocabulary")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="bench-tiny, 2 rounds: the dry run of the tests")
    p.add_argument("--out", type=Path, default=RESULTS)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.preset, opts.steps, opts.seq_len, opts.world_sizes = "bench-tiny", 2, 64, "2,4"
    torch.set_num_threads(opts.threads or 1)

    full_args = _common.model_args(opts.preset)
    if opts.vocab_size:
        full_args = dataclasses.replace(full_args, vocab_size=opts.vocab_size)
    if opts.seq_len > full_args.max_seq_len:
        p.error(f"--seq-len {opts.seq_len} exceeds the model's max_seq_len {full_args.max_seq_len}")
    wanted = [int(w) for w in (opts.world_sizes or str(opts.world_size)).split(",")]
    bad = sorted(set(wanted) - set(valid_world_sizes(full_args)))
    if bad:
        p.error(f"world size(s) {bad} do not divide the model; valid: {valid_world_sizes(full_args)}")
    world_sizes = [1] + [w for w in wanted if w != 1]
    devices = [torch.device(d) for d in opts.devices.split(",") if d != "cuda" or torch.cuda.is_available()]

    rows = []
    for device in devices:
        rows += measure_device(full_args, world_sizes, device, opts)
    for row in rows:
        full = next(r for r in rows if r["device"] == row["device"] and r["world_size"] == 1)
        row["speedup_vs_full"] = row["tokens_per_second"] / full["tokens_per_second"]
    _common.table(
        ["device", "model", "precision", "params", "tok/s", "best", "s/step", "time vs full (median, range)",
         "FLOPs vs full", "GFLOP/s"],
        [[r["device"], r["model"], r["precision"], r["parameters"], f"{r['tokens_per_second']:.0f}",
          f"{r['tokens_per_second_best']:.0f}", f"{r['seconds_per_step']:.3f}",
          f"{r['time_ratio_vs_full']:.3f} ({min(r['time_ratios_vs_full_all']):.2f}-"
          f"{max(r['time_ratios_vs_full_all']):.2f})", f"{r['flops_ratio_vs_full']:.3f}",
          f"{r['achieved_gflops']:.1f}"] for r in rows],
        title=f"{opts.preset} (vocab {full_args.vocab_size}), batch {opts.batch_size} x seq {opts.seq_len}, "
              f"median of {opts.steps} interleaved rounds, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU thread(s)",
    )
    big = _common.model_args("llama3.2-3b")
    flops_3b = {w: _common.training_flops(big, w, 2048) / _common.training_flops(big, 1, 2048) for w in (1, 2, 4, 8)}
    print("Llama 3.2 3B, training FLOPs of a slice vs the full model (seq 2048): "
          + ", ".join(f"W={w}: {r:.3f}" for w, r in flops_3b.items()))
    w2 = [r for r in rows if r["world_size"] == 2]
    summary = {"aim": "W=2 slice step at most 0.65x the full model's time",
               "w2_time_ratio": {r["device"]: r["time_ratio_vs_full"] for r in w2},
               "aim_met": bool(w2) and all(r["time_ratio_vs_full"] <= 0.65 for r in w2)}
    for r in w2:
        verdict = "met" if r["time_ratio_vs_full"] <= 0.65 else "MISSED"
        print(f"\n{r['device']}: W=2 slice step {r['time_ratio_vs_full']:.3f}x the full model's time (FLOPs "
              f"{r['flops_ratio_vs_full']:.3f}x; aim <= 0.65: {verdict})")
    result = {
        "preset": opts.preset, "model_args": full_args.to_params(), "vocab_size": full_args.vocab_size,
        "batch_size": opts.batch_size, "seq_len": opts.seq_len, "steps": opts.steps, "world_sizes": world_sizes,
        "world_size": opts.world_size, "gradient_checkpointing": opts.gradient_checkpointing,
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows, "llama3.2-3b_flops_ratio": flops_3b, "summary": summary,
    }
    _common.write_results("train_throughput", result, opts.out)
    return result


if __name__ == "__main__":
    main()
