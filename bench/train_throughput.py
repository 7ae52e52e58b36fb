"""Training throughput of train_local: the full model against one tensor-parallel slice.

    python bench/train_throughput.py --preset llama3.2-tiny --batch-size 4 --seq-len 64 --steps 5

For each device (cpu, and cuda when present) and each model (full, and the rank-0 slice of world size
W), runs one untimed warm-up step, then --steps timed AdamW steps of train_local on random tokens (no
padding, so every position is a target), and reports target tokens per second of the median step (and
of the best). Writes the table as JSON to bench/results/train_throughput.json. Not a test: the numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtp_flwr.model import build_model, count_parameters, preset_args  # noqa: E402
from fedtp_flwr.sharding import shard_args  # noqa: E402
from fedtp_flwr.training import TrainSettings, autocast_dtype, make_optimizer, train_local  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def random_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        yield ids[:, :-1], ids[:, 1:]


def measure(model_args, device: torch.device, opts) -> dict:
    """One warm-up step, then opts.steps timed steps, each its own train_local call on one persistent
    optimizer, so a step's time is known; the median step is reported (robust to a busy machine)."""
    model = build_model(model_args, device=device, seed=0)
    batches = random_batches(model_args.vocab_size, opts.batch_size, opts.seq_len, seed=0)
    settings = TrainSettings(learning_rate=1e-5, local_steps=1, precision=opts.precision, device=str(device),
                             gradient_checkpointing=opts.gradient_checkpointing)
    optimizer = make_optimizer(model, settings)
    train_local(model, batches, settings, optimizer=optimizer)  # warm-up: kernels, allocator, AdamW state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    runs = [train_local(model, batches, settings, optimizer=optimizer) for _ in range(opts.steps)]
    step_s = sorted(m["seconds"] for m in runs)
    median = statistics.median(step_s)
    tokens = runs[0]["num_tokens"]
    row = {
        "device": str(device),
        "precision": "bf16" if autocast_dtype(opts.precision, device) else "fp32",
        "parameters": count_parameters(model),
        "tokens_per_second": tokens / median,
        "tokens_per_second_best": tokens / step_s[0],
        "seconds_per_step": median,
        "seconds_per_step_all": step_s,
        "train_loss": runs[-1]["train_loss"],
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3.2-tiny")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--world-size", type=int, default=2, help="W of the slice to compare with the full model")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary (128256)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    p.add_argument("--out", type=Path, default=RESULTS)
    opts = p.parse_args(argv)

    full_args = preset_args(opts.preset, **({"vocab_size": opts.vocab_size} if opts.vocab_size else {}))
    if opts.seq_len > full_args.max_seq_len:
        p.error(f"--seq-len {opts.seq_len} exceeds the preset's max_seq_len {full_args.max_seq_len}")
    models = {"full": full_args, f"slice W={opts.world_size}": shard_args(full_args, opts.world_size)}
    devices = [torch.device(d) for d in opts.devices.split(",") if d != "cuda" or torch.cuda.is_available()]

    rows = []
    for device, (name, model_args) in itertools.product(devices, models.items()):
        row = {"model": name, **measure(model_args, device, opts)}
        rows.append(row)
        print(f"  measured {row['device']} {name}: {row['tokens_per_second']:.0f} tok/s", flush=True)

    header = (f"{'device':8s} {'model':12s} {'precision':9s} {'params':>12s} {'tok/s':>10s} {'best':>10s} "
              f"{'s/step':>8s} {'vs full':>8s}")
    print(f"\n{opts.preset} (vocab {full_args.vocab_size}), batch {opts.batch_size} x seq {opts.seq_len}, "
          f"median of {opts.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n{header}")
    for row in rows:
        full = next(r for r in rows if r["device"] == row["device"] and r["model"] == "full")
        row["speedup_vs_full"] = row["tokens_per_second"] / full["tokens_per_second"]
        print(f"{row['device']:8s} {row['model']:12s} {row['precision']:9s} {row['parameters']:12,d} "
              f"{row['tokens_per_second']:10.0f} {row['tokens_per_second_best']:10.0f} "
              f"{row['seconds_per_step']:8.3f} {row['speedup_vs_full']:7.2f}x")

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "preset": opts.preset, "vocab_size": full_args.vocab_size, "batch_size": opts.batch_size,
        "seq_len": opts.seq_len, "steps": opts.steps,
        "world_size": opts.world_size, "gradient_checkpointing": opts.gradient_checkpointing,
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
    }
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
