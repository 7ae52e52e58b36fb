"""Learning quality: held-out perplexity per round of federated fine-tuning, slicing modes against FedAvg.

Phase A (pretrain, cached): the byte-level `bytes-small` preset (3.1M parameters, 96% of them split; a
Llama 3 vocabulary would make a CPU-sized model nearly all replicated embeddings) is trained centrally on
four plays of the built-in corpus with `training.train_local` and saved as a Meta checkpoint
(params.json + consolidated.00.pth) under --cache-dir, keyed by the pretraining settings.

Phase B (the comparison): federated fine-tuning from that checkpoint on the other four plays, one play per
node (4 nodes, non-IID), held-out perplexity of the merged model on Macbeth after every round. Every
configuration is the real ServerApp logic (`server.run`) with the real strategy and client code, over
`inprocess.InProcessGrid` (no Flower transport), with the same data, rounds, local steps, learning rate
and seed; only world size, slice mode, merge weighting, context bits and swapping differ:

  fedavg             world size 1: full-model FedAvg, the reference
  ind-{pr,ac}-w{2,4} independent slices (the user's method), per-rank / all-clients merge
  ind-pr-w{2,4}-swap the same with rank swapping (every swap-period rounds)
  ctx8-{pr,ac}-w{2,4} context slices, int8 frozen rest (absmax, group 64)
  ctx4-ac-w{2,4}     context slices, int4 frozen rest
Main rows (fedavg, ind-pr-w2/4, ctx8-ac-w2/4) run with every --seeds value (the seed sets the clients' data
order); the others with the first seed.

Bytes per client per round: the Arrays' bytes (`wire.record_nbytes`) of every message the grid delivered
(slice + low-bit context) and of every reply (the trained slice), against the full float32 model.
Client memory, analytic from the real client model (built as the client builds it): 16 B per trainable
parameter (fp32 weight, gradient, AdamW m and v) + the frozen low-bit rest it holds + the tensors
autograd saves in one forward of a [batch, seq] micro-batch (counted with saved_tensors_hooks) + the
transient dequantized weight of the largest split layer (context mode). Not a measured RSS peak.
The wire table at 3B (and this model) is analytic from meta-device shapes.

    python bench/learning_quality.py                  # the full benchmark (~25 min on 2 busy CPU cores)
    python bench/learning_quality.py --quick          # smoke run (seconds; used by the tests)
    python bench/learning_quality.py --configs fedavg,ctx8-ac-w2 --rounds 4 --local-steps 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import _common
import torch
from flwr.app import MessageType

from fedtp_flwr.data import (
    ByteTokenizer,
    build_dataset,
    builtin_corpus_path,
    eval_batches,
    iterate_batches,
    load_examples,
)
from fedtp_flwr.model import ModelArgs, Transformer, build_model, preset_args
from fedtp_flwr.model.checkpoint import save_meta_checkpoint
from fedtp_flwr.model.context import build_context_model, context_rest, quantize_rest, rest_shapes
from fedtp_flwr.model.quant import quantized_nbytes
from fedtp_flwr.model.sharding import is_split, shard, shard_args, slice_shapes
from fedtp_flwr.server.app import run as server_run
from fedtp_flwr.server.outputs import read_results, run_folders
from fedtp_flwr.testing.inprocess import InProcessGrid
from fedtp_flwr.training import TrainSettings, evaluate, train_local

PRESET = "bytes-small"
CORPUS_TRAIN = builtin_corpus_path("train")
PRETRAIN_PLAYS = ("a-midsummer-night-s-dream", "henry-v", "julius-caesar", "richard-ii")
FINETUNE_PLAYS = ("romeo-and-juliet", "the-comedy-of-errors", "the-tempest", "twelfth-night")
EVAL_FILE = builtin_corpus_path("eval") / "macbeth.jsonl"
GROUP_SIZE = 64


def _config(world_size: int, mode: str = "independent", weighting: str = "per-rank", bits: int = 8,
            swap: bool = False) -> dict:
    return {"world-size": world_size, "slice-mode": mode, "merge-weighting": weighting, "context-bits": bits,
            "context-group-size": GROUP_SIZE, "enable-swapping": swap, "rest-adapter-rank": 0}


CONFIGS: dict[str, dict] = {
    "fedavg": _config(1),
    "ind-pr-w2": _config(2), "ind-pr-w4": _config(4),
    "ind-ac-w2": _config(2, weighting="all-clients"), "ind-ac-w4": _config(4, weighting="all-clients"),
    "ind-pr-w2-swap": _config(2, swap=True), "ind-pr-w4-swap": _config(4, swap=True),
    "ctx8-pr-w2": _config(2, "context", "per-rank", 8), "ctx8-pr-w4": _config(4, "context", "per-rank", 8),
    "ctx8-ac-w2": _config(2, "context", "all-clients", 8), "ctx8-ac-w4": _config(4, "context", "all-clients", 8),
    "ctx4-ac-w2": _config(2, "context", "all-clients", 4), "ctx4-ac-w4": _config(4, "context", "all-clients", 4),
}
MAIN = ("fedavg", "ind-pr-w2", "ind-pr-w4", "ctx8-ac-w2", "ctx8-ac-w4")
QUICK_CONFIGS = ("fedavg", "ctx8-ac-w2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="clients' AdamW learning rate (fine-tuning)")
    p.add_argument("--seeds", default="42,43", help="comma list; main rows run all, the others the first")
    p.add_argument("--configs", default="all", help=f"comma list of {', '.join(CONFIGS)} (or 'all')")
    p.add_argument("--seq", type=int, default=128, help="max-seq-len (bytes per training sequence)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 8 sequences")
    p.add_argument("--swap-period", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine 2 threads ran 2-10x slower, not faster)")
    p.add_argument("--cache-dir", default=str(_common.RESULTS_DIR / "quality_cache"))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/learning_quality.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 steps, 2 configs, tiny pretrain")
    p.add_argument("--verbose", action="store_true", help="show the server's per-round log")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.local_steps, a.seq, a.batch, a.eval_batches, a.pretrain_steps = 1, 2, 32, 4, 2, 3
        if a.configs == "all":
            a.configs = ",".join(QUICK_CONFIGS)
        if a.seeds == "42,43":
            a.seeds = "42"
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    names = list(CONFIGS) if a.configs == "all" else [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    a.config_names = names
    return a


# ------------------------------------------------------------------------------------------ phase A


def _examples(plays):
    return [e for play in plays for e in load_examples(CORPUS_TRAIN / f"{play}.jsonl")]


def held_out_batches(seq: int, n_batches: int):
    """What server.run evaluates on: Macbeth packed, the first n_batches batches of 8 sequences."""
    held = build_dataset(load_examples(EVAL_FILE), ByteTokenizer(), seq, pack=True)
    return eval_batches(held, 8, n_batches or None)


def pretrain(a) -> tuple[Path, dict]:
    """The pretrained Meta checkpoint (cached) and what pretraining did."""
    settings = dict(preset=PRESET, params=preset_args(PRESET).to_params(), plays=PRETRAIN_PLAYS,
                    steps=a.pretrain_steps, lr=a.pretrain_lr, schedule="cosine", warmup=min(20, a.pretrain_steps // 10),
                    seq=a.seq, batch=a.batch, seed=0, eval_batches=a.eval_batches)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(a.cache_dir) / f"pretrain-{PRESET}-{key}"
    info_path = out / "pretrain.json"
    if info_path.exists() and (out / "consolidated.00.pth").exists():
        info = json.loads(info_path.read_text())
        print(f"phase A: cached pretrained model {out} (held-out perplexity {info['ppl_before']:.2f} -> "
              f"{info['ppl_after']:.2f}, {info['steps']} steps)")
        return out, {**info, "cached": True}
    args = preset_args(PRESET)
    model = build_model(args, seed=0)
    data = build_dataset(_examples(PRETRAIN_PLAYS), ByteTokenizer(), a.seq, pack=True)
    held = held_out_batches(a.seq, a.eval_batches)
    before = evaluate(model, held)
    t0 = time.perf_counter()
    m = train_local(model, iterate_batches(data, a.batch, 0), TrainSettings(
        learning_rate=a.pretrain_lr, lr_schedule="cosine", warmup_steps=settings["warmup"], local_steps=a.pretrain_steps,
        weight_decay=0.01, max_grad_norm=1.0, seed=0, device="cpu"))
    seconds = time.perf_counter() - t0
    after = evaluate(model, held)
    save_meta_checkpoint(model.state_dict(), args, out)
    info = {"settings": settings, "steps": a.pretrain_steps, "seconds": seconds, "train_loss": m["train_loss"],
            "ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
            "held_out_tokens": after["num_tokens"], "train_sequences": len(data), "checkpoint": str(out)}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"phase A: pretrained {PRESET} for {a.pretrain_steps} steps in {seconds:.0f} s: held-out perplexity "
          f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}; saved {out}")
    return out, {**info, "cached": False}


# ------------------------------------------------------------------------------------------ phase B


def run_config(a, name: str, seed: int, ckpt: Path, c: dict | None = None, tokenizer: str = "bytes",
               node_files: list[Path] | None = None, eval_file: Path | None = None, after=None) -> dict:
    """One federated run of config `name` (CONFIGS[name], or the run-config keys `c`) through server.run,
    one node per file of `node_files` (default: the fine-tuning plays), held-out data `eval_file` (Macbeth).
    `after(output_dir)`, when given, reads the run's outputs before they are deleted; its dict joins the result."""
    c = CONFIGS[name] if c is None else c
    node_files = node_files or [CORPUS_TRAIN / f"{play}.jsonl" for play in FINETUNE_PLAYS]
    nodes = [{"data-path": str(f), "partition-id": i} for i, f in enumerate(node_files)]
    with tempfile.TemporaryDirectory(prefix="lq-") as tmp:
        cfg = {
            "num-server-rounds": a.rounds, "local-steps": a.local_steps, "learning-rate": a.lr, "seed": seed,
            "checkpoint-dir": str(ckpt), "tokenizer-path": tokenizer, "eval-data": str(eval_file or EVAL_FILE),
            "max-seq-len": a.seq, "batch-size": a.batch, "max-batch-size": 8, "eval-batches": a.eval_batches,
            "packing": True, "min-available-nodes": len(nodes), "swap-period": a.swap_period, "device": "cpu",
            "precision": "fp32", "lr-schedule": "constant", "weight-decay": 0.01, "max-grad-norm": 1.0,
            "output-dir": tmp, "checkpoint-every": 0, **c,
        }
        grid = InProcessGrid(nodes, cfg, keep_arrays=False)  # only the bytes and metrics are read
        t0 = time.perf_counter()
        server_run(grid, cfg)
        seconds = time.perf_counter() - t0
        (folder,) = run_folders(tmp)  # the run's own folder under output-dir
        results = read_results(folder / "experiment_results_llama32.pkl")
        extra = after(folder) if after else {}
    (history,) = results.values()
    down = [n for m, n in zip(grid.delivered, grid.delivered_bytes) if m.metadata.message_type == MessageType.TRAIN]
    up = [n for m, n in zip(grid.replies, grid.reply_bytes) if not m.has_error()]
    errors = [m.error.reason for m in grid.replies if m.has_error()]
    if errors:
        raise RuntimeError(f"{name}: client errors: {errors[:3]}")
    return {
        "config": name, "seed": seed, **{k: v for k, v in c.items()},
        "history": [[int(r), float(l), float(p)] for r, l, p in history],
        "final_loss": float(history[-1][1]), "final_ppl": float(history[-1][2]), "seconds": seconds,
        "bytes_down_per_client_round": sum(down) / len(down), "bytes_up_per_client_round": sum(up) / len(up),
        "messages": len(down), "replies": len(up), **extra,
        # each reply's local training time (its num-tokens / tokens-per-second), in reply order
        "client_seconds": [float(m.content["metrics"]["num-tokens"]) / float(m.content["metrics"]["tokens-per-second"])
                           for m in grid.replies if not m.has_error()],
    }


# ------------------------------------------------------------------------------------ client memory


def saved_tensor_bytes(model: torch.nn.Module, batch: int, seq: int) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + loss (parameters and buffers
    excluded), each storage once."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        # detached: a saved output handed back as itself would hold its own grad_fn, a cycle in C++ that kept
        # every counted forward alive (1.7 GB a call on SmolLM2-135M)
        return t.detach()

    tokens = torch.zeros(batch, seq + 1, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    del loss, logits
    return sum(seen.values())


def client_model(state: dict, args: ModelArgs, c: dict) -> tuple[torch.nn.Module, int]:
    """The model a client (rank 0) of run config `c` trains, as the client builds it from the full `state`, and
    the bytes of its transient dequantized weight (context mode: the largest split layer's rest in fp32 + cat)."""
    W, mode = c["world-size"], c["slice-mode"]
    if mode == "context" and W > 1:
        rest = quantize_rest(context_rest(state, args, 0, W), c["context-bits"], c["context-group-size"] or None)
        model = build_context_model(args, 0, W, shard(state, args, 0, W), rest,
                                    rest_adapter_rank=c.get("rest-adapter-rank", 0))
        transient = 2 * 4 * max(math.prod(t.shape) for k, t in state.items() if is_split(k))  # rest fp32 + cat
    else:
        model = build_model(shard_args(args, W), seed=None)
        model.load_state_dict(shard(state, args, 0, W))
        transient = 0
    return model, transient


def client_memory(state: dict, args: ModelArgs, c: dict, batch: int, seq: int) -> dict:
    """Analytic training memory of one client (rank 0), from the model the client really builds."""
    model, transient = client_model(state, args, c)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(b.nbytes for b in model.buffers()) + sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    acts = saved_tensor_bytes(model, batch, seq)
    return {"trainable_params": trainable, "state_bytes": 16 * trainable, "frozen_bytes": frozen,
            "activation_bytes": acts, "transient_bytes": transient,
            "total_bytes": 16 * trainable + frozen + acts + transient}


# ------------------------------------------------------------------------------- analytic wire table


def wire_table(args: ModelArgs, world_sizes, group_size: int = GROUP_SIZE) -> list[dict]:
    """Download / upload bytes per client per round from meta-device shapes: the slice (float32 or bfloat16
    on the wire) plus, in context mode, the low-bit rest of the split layers; and the client's training
    state (16 B per trainable parameter + the low-bit rest, activations excluded)."""
    with torch.device("meta"):
        full = {k: math.prod(t.shape) for k, t in Transformer(args).state_dict().items()}
    n_full = sum(full.values())
    replicated = sum(n for k, n in full.items() if not is_split(k))
    rows = []
    for W in world_sizes:
        n_slice = sum(math.prod(s) for s in slice_shapes(args, W).values())
        shapes = rest_shapes(args, W) if W > 1 else {}
        for mode, bits in (("independent", None), ("context", 8), ("context", 4)):
            if W == 1 and mode == "context":
                continue
            rest = sum(quantized_nbytes(s, bits, group_size) for s in shapes.values()) if bits else 0
            for wire, bpe in (("float32", 4), ("bfloat16", 2)):
                down, up = n_slice * bpe + rest, n_slice * bpe
                rows.append({"world_size": W, "mode": mode if W > 1 else "full (FedAvg)", "context_bits": bits,
                             "wire": wire, "slice_params": n_slice, "replicated_params": replicated,
                             "full_params": n_full, "down_bytes": down, "up_bytes": up,
                             "down_frac_fp32": down / (4 * n_full), "up_frac_fp32": up / (4 * n_full),
                             "client_state_bytes": 16 * n_slice + rest})
    return rows


# --------------------------------------------------------------------------------------- summary


def summarize(runs: list[dict], full_fp32: int, memory: dict[str, dict]) -> list[dict]:
    fedavg = {r["seed"]: r["final_ppl"] for r in runs if r["config"] == "fedavg"}
    out = []
    for name in CONFIGS:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        ratios = [r["final_ppl"] / fedavg[r["seed"]] for r in mine if r["seed"] in fedavg]
        ppls = [r["final_ppl"] for r in mine]
        out.append({
            "config": name, "seeds": [r["seed"] for r in mine], "final_ppl": ppls,
            "final_ppl_mean": sum(ppls) / len(ppls), "start_ppl": mine[0]["history"][0][2],
            "best_ppl_mean": sum(min(h[2] for h in r["history"]) for r in mine) / len(mine),
            "ratio_to_fedavg": ratios, "ratio_to_fedavg_mean": sum(ratios) / len(ratios) if ratios else None,
            "down_frac_fp32": mine[0]["bytes_down_per_client_round"] / full_fp32,
            "up_frac_fp32": mine[0]["bytes_up_per_client_round"] / full_fp32,
            "bytes_down": mine[0]["bytes_down_per_client_round"], "bytes_up": mine[0]["bytes_up_per_client_round"],
            "memory_bytes": memory[name]["total_bytes"],
            "memory_frac_fedavg": memory[name]["total_bytes"] / memory["fedavg"]["total_bytes"] if "fedavg" in memory else None,
            "seconds_mean": sum(r["seconds"] for r in mine) / len(mine),
        })
    return out


def plot(runs: list[dict], path: Path) -> bool:
    plt = _common.matplotlib_pyplot()
    if plt is None:
        print("matplotlib not installed: no plot (pip install -e '.[plot]')")
        return False
    world_sizes = sorted({r["world-size"] for r in runs if r["world-size"] > 1}) or [1]
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(6.5 * len(world_sizes), 5.4), squeeze=False)
    first_seed = min(r["seed"] for r in runs)
    styles = {"ind": "--", "ctx8": "-", "ctx4": ":"}
    start = runs[0]["history"][0][2]
    top = 1.12 * start  # diverging runs would flatten every other line; they leave the plot, marked in the legend
    for ax, W in zip(axes[0], world_sizes):
        low = top
        for r in runs:
            if r["seed"] != first_seed or r["world-size"] not in (1, W):
                continue
            rounds = [h[0] for h in r["history"]]
            ppl = [h[2] for h in r["history"]]
            low = min(low, *ppl)
            off = f" (off scale: {max(ppl):.1f})" if max(ppl) > top else ""
            if r["config"] == "fedavg":
                ax.plot(rounds, ppl, color="black", lw=2.2, label="FedAvg (full model)")
            else:
                ax.plot(rounds, ppl, styles[r["config"].split("-")[0]], marker="o", ms=3, label=r["config"] + off)
        ax.set_ylim(low - 0.02 * start, top)
        ax.set_title(f"world size {W} (seed {first_seed})")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out perplexity (Macbeth, bytes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.suptitle(f"Federated fine-tuning of {PRESET}: 4 non-IID clients")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")
    return True


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.replot:
        out = Path(a.out) if a.out else _common.RESULTS_DIR / "learning_quality.json"
        plot(json.loads(out.read_text())["runs"], Path(a.plot) if a.plot else out.with_suffix(".png"))
        return {}
    torch.set_num_threads(a.threads)
    if not a.verbose:  # the server's per-round log and the clients' progress bars, hundreds of lines
        logging.getLogger("flwr").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    ckpt, pre = pretrain(a)
    args = preset_args(PRESET)
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    full_fp32 = 4 * sum(t.numel() for t in state.values())

    plan = [(n, s) for s in a.seed_list for n in a.config_names if s == a.seed_list[0] or n in MAIN]
    print(f"phase B: {len(plan)} runs ({a.rounds} rounds x {a.local_steps} local steps x 4 clients, lr {a.lr}, "
          f"seq {a.seq}, batch {a.batch}, {torch.get_num_threads()} torch thread(s))")
    runs = []
    for i, (name, seed) in enumerate(plan, 1):
        r = run_config(a, name, seed, ckpt)
        runs.append(r)
        print(f"  [{i}/{len(plan)}] {name:15s} seed {seed}: perplexity {r['history'][0][2]:.3f} -> {r['final_ppl']:.3f} "
              f"({r['seconds']:.0f} s; down {_mb(r['bytes_down_per_client_round'])} MB, up "
              f"{_mb(r['bytes_up_per_client_round'])} MB per client per round)", flush=True)

    memory = {n: client_memory(state, args, CONFIGS[n], a.batch, a.seq) for n in a.config_names}
    wire = {"bytes-small": wire_table(args, (1, 2, 4)), "llama3.2-3b": wire_table(preset_args("llama3.2-3b"), (1, 2, 4, 8))}
    analytic = {(w["world_size"], w["context_bits"]): w for w in wire["bytes-small"] if w["wire"] == "float32"}
    for r in runs:  # the bytes the grid carried against the slice size from meta-device shapes
        w = analytic[(r["world-size"], r["context-bits"] if r["slice-mode"] == "context" and r["world-size"] > 1 else None)]
        r["analytic_down_bytes"], r["analytic_up_bytes"] = w["down_bytes"], w["up_bytes"]
        r["down_vs_analytic"] = r["bytes_down_per_client_round"] / w["down_bytes"]
        r["up_vs_analytic"] = r["bytes_up_per_client_round"] / w["up_bytes"]
    summary = summarize(runs, full_fp32, memory)
    rows = []
    for s in summary:
        ratio = s["ratio_to_fedavg_mean"]
        rows.append([s["config"], len(s["seeds"]), f"{s['start_ppl']:.3f}",
                     " / ".join(f"{p:.3f}" for p in s["final_ppl"]),
                     "-" if ratio is None else f"{ratio:.4f}x", f"{s['down_frac_fp32']:.3f}x", f"{s['up_frac_fp32']:.3f}x",
                     _mb(s["memory_bytes"]), "-" if s["memory_frac_fedavg"] is None else f"{s['memory_frac_fedavg']:.3f}x",
                     f"{s['seconds_mean']:.0f}"])
    table = _common.table(
        ["config", "seeds", "start ppl", "final ppl (per seed)", "vs FedAvg", "down / full fp32", "up / full fp32",
         "client MB", "mem / FedAvg", "s / run"], rows,
        title=f"Held-out perplexity after {a.rounds} rounds x {a.local_steps} local steps (full fp32 model: "
              f"{_mb(full_fp32)} MB)")
    wire_rows = []
    for w in wire["llama3.2-3b"]:
        wire_rows.append([w["world_size"], w["mode"], w["context_bits"] or "-", w["wire"], f"{w['down_bytes'] / 1e9:.2f}",
                          f"{w['down_frac_fp32']:.3f}x", f"{w['up_bytes'] / 1e9:.2f}", f"{w['up_frac_fp32']:.3f}x",
                          f"{w['client_state_bytes'] / 1e9:.1f}"])
    wire_text = _common.table(["W", "mode", "rest bits", "wire", "down GB", "down / full fp32", "up GB", "up / full fp32",
                               "client state GB"], wire_rows,
                              title="Llama 3.2 3B, analytic, per client per round (client state: 16 B/trainable param "
                                    "+ low-bit rest, no activations)")
    out = Path(a.out) if a.out else _common.RESULTS_DIR / "learning_quality.json"
    png = Path(a.plot) if a.plot else out.with_suffix(".png")
    plotted = plot(runs, png)
    data = {
        "settings": {"preset": PRESET, "rounds": a.rounds, "local_steps": a.local_steps, "lr": a.lr,
                     "seeds": a.seed_list, "seq": a.seq, "batch": a.batch, "eval_batches": a.eval_batches,
                     "eval_batch_size": 8, "swap_period": a.swap_period, "context_group_size": GROUP_SIZE,
                     "threads": a.threads, "quick": a.quick, "pretrain_plays": PRETRAIN_PLAYS,
                     "finetune_plays": FINETUNE_PLAYS, "eval_file": EVAL_FILE.name, "configs": a.config_names,
                     "main_rows": [n for n in MAIN if n in a.config_names]},
        "pretrain": pre,
        "model": {"preset": PRESET, "params": sum(t.numel() for t in state.values()), "full_fp32_bytes": full_fp32},
        "runs": runs, "summary": summary, "memory": memory, "wire": wire,
        "table_md": table, "wire_table_md": wire_text, "plot": str(png) if plotted else None,
        "total_seconds": time.perf_counter() - t_start,
    }
    _common.write_results("learning_quality", data, out)
    worst = max(max(abs(r["down_vs_analytic"] - 1), abs(r["up_vs_analytic"] - 1)) for r in runs)
    print(f"bytes on the grid vs analytic slice sizes: within {100 * worst:.3f}% (.npy headers)")
    print(f"total {data['total_seconds']:.0f} s")
    return data


if __name__ == "__main__":
    main()
