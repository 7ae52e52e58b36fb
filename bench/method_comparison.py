"""Context slices against a user's real alternatives: full-model FedAvg and federated LoRA, at equal rounds,
equal bytes moved per client and equal client compute time, on two corpora.

Each corpus: a model pretrained centrally on some documents (cached), then fine-tuned federated on four
other documents, one per node (non-IID), held-out perplexity of the global model after every round.

  plays   the built-in Shakespeare corpus and the `bpe-small` model of memory_options_quality.py (2,048-id
          byte-level BPE, 4.0M parameters, 26% embeddings + output): pretrained on four plays, fine-tuned on
          four others, held out: Macbeth (the same setup as memory_options_quality.py, whose cache it shares).
  pydocs  a second, different corpus that ships with every Python: the docstrings of the interpreter's own
          standard library (module, class and function docstrings read with `ast`, one docstring per
          example; technical English, not verse), grouped by top-level package as topics. The byte-level
          `bytes-small` preset (3.1M parameters) is pretrained on ten packages, fine-tuned on four others
          (one per node); held out: every 8th docstring of those four. The corpus depends on the Python
          version (recorded).

Methods (full-parameter ones through the real `server.run` over the in-process grid, as learning_quality.py):
  fedavg          world size 1: every client trains the whole model
  ctx-w2, ctx-w4  context slices, int4 frozen rest, all-clients merge (docs/slice-modes.md's recommendation)
  ctx-best-w2/w4  the same with the memory options of the 3B recipes (memory_options_quality.BEST)
  ind-w2          independent slices (the user's method), per-rank merge
  lora-w2mem      federated LoRA: adapters from `peft` (every linear of every block: wq wk wv wo w1 w2 w3;
  lora-w4mem      lora_alpha = rank) on the frozen float32 model, Flower's own FedAvg of the adapters over
                  the same in-process grid; the rank is the one whose client training memory (analytic, as
                  learning_quality.client_memory counts it: 16 B per trainable parameter, the frozen weights,
                  the saved activations) is closest to ctx-w2's (ctx-w4's) client
  lora-3b-ratio   LoRA at the 3B's ratio of rank to width (rank 16 of dim 3072 -> round(dim * 16 / 3072))

Full-parameter methods train at --lr (3e-4); LoRA at --lora-lr (1e-3) and --lora-lr-small (3e-3) for ranks
below 32 (the learning rates the issue found best for each family; not re-tuned here).

Gain share: (start ppl - final ppl) / (start ppl - FedAvg's final ppl, same seed, same round).
Bytes: what the grid carried per client (slice + low-bit rest down, slice up; LoRA: the adapters each way,
plus one download of the float32 base model before the first round). Equal bytes: every method's perplexity
at the bytes a ctx run moved in --rounds rounds, linearly interpolated along its own curve. Equal time:
the same along client compute time, from each method's client step time measured here on the same inputs
(all methods timed in turn, best of --time-reps). A budget a run did not reach is reported as missing.
Seed 42's fedavg, ctx-w2 and lora runs go --long-rounds rounds so that the cheaper methods reach the
others' budgets and to see what a longer fine-tune does; every table at --rounds reads round --rounds.

Results are written after every run (a stopped run still leaves numbers): bench/results/method_comparison.json.

    nice -n 19 python bench/method_comparison.py             # the whole PLAN (more than the 18 committed runs,
                                                              # a subset chosen with --only: 55 min here)
    python bench/method_comparison.py --quick                 # smoke run (tests)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import _common
import _memory_model
import learning_quality as lq
import memory_options_quality as moq
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtp_flwr.client.app import local_dataset, node_seed
from fedtp_flwr.data import build_dataset, eval_batches, iterate_batches, load_examples, load_tokenizer
from fedtp_flwr.model import ModelArgs, build_model, preset_args
from fedtp_flwr.model.checkpoint import load_checkpoint, save_meta_checkpoint
from fedtp_flwr.testing.inprocess import InProcessGrid
from fedtp_flwr.training import TrainSettings, evaluate, train_local
from fedtp_flwr.wire import decode, encode

LORA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
# plain context slices (no rest adapter: rest-adapter-rank's auto default would add one)
_CTX = {"slice-mode": "context", "merge-weighting": "all-clients", "context-bits": 4, "context-group-size": 64,
        "rest-adapter-rank": 0}
SERVER_METHODS = {
    "fedavg": {"world-size": 1},
    "ctx-w2": {"world-size": 2, **_CTX}, "ctx-w4": {"world-size": 4, **_CTX},
    "ctx-best-w2": {"world-size": 2, **_CTX, **moq.BEST}, "ctx-best-w4": {"world-size": 4, **_CTX, **moq.BEST},
    "ind-w2": {"world-size": 2, "slice-mode": "independent", "merge-weighting": "per-rank"},
}
LORA_METHODS = {"lora-w2mem": "ctx-w2", "lora-w4mem": "ctx-w4", "lora-3b-ratio": None}  # memory matched to
METHODS = [*SERVER_METHODS, *LORA_METHODS]
LONG = ("fedavg", "ctx-w2", "lora-w2mem", "lora-w4mem")  # seed 42 runs --long-rounds

PYDOCS_PRETRAIN = ("distutils", "email", "asyncio", "_pydecimal", "logging", "xml", "importlib", "unittest", "http",
                   "typing")
PYDOCS_FINETUNE = ("idlelib", "tkinter", "turtle", "doctest")
EVAL_EVERY = 8  # held out: every 8th docstring of each fine-tuning package

# (corpus, seed, methods) in order of importance: a stopped run keeps the most useful numbers.
PLAN = [
    ("plays", 42, ["fedavg", "ctx-w2", "lora-w2mem", "ctx-w4", "lora-w4mem", "ind-w2", "ctx-best-w2"]),
    ("pydocs", 42, ["fedavg", "ctx-w2", "lora-w2mem", "ctx-w4", "lora-w4mem", "ind-w2"]),
    ("plays", 43, ["fedavg", "ctx-w2", "lora-w2mem", "ctx-w4", "lora-w4mem"]),
    ("pydocs", 43, ["fedavg", "ctx-w2", "lora-w2mem", "ctx-w4", "lora-w4mem"]),
    ("plays", 42, ["lora-3b-ratio", "ctx-best-w4"]),
    ("plays", 44, ["fedavg", "ctx-w2", "lora-w2mem"]),
]
QUICK_PLAN = [("plays", 42, ["fedavg", "ctx-w2", "lora-w2mem"]), ("pydocs", 42, ["fedavg", "lora-w2mem"])]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--long-rounds", type=int, default=10)
    p.add_argument("--long-methods", default=",".join(LONG), help="methods whose seed-42 runs go --long-rounds")
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr-small", type=float, default=3e-3, help="LoRA learning rate for ranks below 32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--swap-period", type=int, default=2)
    p.add_argument("--time-steps", type=int, default=4, help="local steps per timing of a client step")
    p.add_argument("--time-reps", type=int, default=3)
    p.add_argument("--only", default="", help="comma list of corpus:seed:method to run (default: the whole plan)")
    p.add_argument("--cache-dir", default=str(_common.RESULTS_DIR / "quality_cache"))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/method_comparison.json)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the rest")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 2 steps, tiny pretrain, 5 runs")
    p.add_argument("--report", action="store_true", help="run nothing: summarize the runs in --out again")
    a = p.parse_args(argv)
    a.plan = QUICK_PLAN if a.quick else PLAN
    if a.quick:
        a.rounds, a.long_rounds, a.local_steps, a.seq, a.batch, a.eval_batches = 1, 2, 2, 32, 4, 2
        a.pretrain_steps, a.time_steps, a.time_reps = 3, 1, 1
    if a.only:
        wanted = [tuple(x.split(":")) for x in a.only.split(",") if x.strip()]
        for w in wanted:
            if len(w) != 3 or w[0] not in ("plays", "pydocs") or w[2] not in METHODS or not w[1].isdigit():
                p.error(f"--only entry {':'.join(w)!r}: expected corpus:seed:method with corpus plays|pydocs "
                        f"and method one of {METHODS}")
        a.plan = [(c, int(s), [m]) for c, s, m in wanted]
    return a


# -------------------------------------------------------------------------------------------- corpora


def stdlib_docstrings(packages=None) -> dict[str, list[str]]:
    """Docstrings of the standard library by top-level package (tests and site-packages excluded); with
    `packages`, of those only (the same lists, without parsing the rest of the library)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    topics: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] == "site-packages" or any(x in ("test", "tests") for x in parts):
            continue
        if packages is not None and parts[0].removesuffix(".py") not in packages:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    topics.setdefault(parts[0].removesuffix(".py"), []).append(doc)
    return topics


def build_pydocs(cache: Path) -> dict:
    """pydocs-v2/{pretrain,eval,node-*}.jsonl under the cache (rebuilt per Python version); their sha256s.
    Every EVAL_EVERY-th docstring of each fine-tuning topic is held out (eval.jsonl); the rest is the node's.
    (v1 held out four other packages: fine-tuning on the nodes' packages did not lower their perplexity, so
    no method had a gain to share.)"""
    out = cache / f"pydocs-v2-py{platform.python_version()}"
    info_path = out / "corpus.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    topics = stdlib_docstrings(PYDOCS_PRETRAIN + PYDOCS_FINETUNE)
    missing = [t for t in PYDOCS_PRETRAIN + PYDOCS_FINETUNE if t not in topics]
    if missing:
        raise RuntimeError(f"this Python's standard library has no docstrings for {missing}")
    out.mkdir(parents=True, exist_ok=True)
    docs = {"pretrain": [d for t in PYDOCS_PRETRAIN for d in topics[t]],
            "eval": [d for t in PYDOCS_FINETUNE for d in topics[t][::EVAL_EVERY]],
            **{f"node-{t}": [d for i, d in enumerate(topics[t]) if i % EVAL_EVERY] for t in PYDOCS_FINETUNE}}
    groups = {"pretrain": PYDOCS_PRETRAIN, "eval": PYDOCS_FINETUNE, **{f"node-{t}": (t,) for t in PYDOCS_FINETUNE}}
    info = {"python": platform.python_version(), "eval_every": EVAL_EVERY, "files": {}}
    for name, group in groups.items():
        text = "".join(json.dumps({"text": d}) + "\n" for d in docs[name])
        (out / f"{name}.jsonl").write_text(text)
        info["files"][name] = {"topics": list(group), "docstrings": text.count("\n"), "chars": len(text),
                               "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
    info["dir"] = str(out)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def pretrain(a, examples, args: ModelArgs, tokenizer: str, name: str) -> Path:
    """Central pretraining (cached by its settings), as learning_quality.pretrain does it."""
    tok = load_tokenizer(tokenizer)
    settings = dict(name=name, params=args.to_params(), steps=a.pretrain_steps, lr=1e-3, seq=a.seq, batch=a.batch,
                    seed=0, n=len(examples))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(a.cache_dir) / f"pretrain-{name}-{key}"
    if (out / "consolidated.00.pth").exists():
        return out
    model = build_model(args, seed=0)
    data = build_dataset(examples, tok, a.seq, pack=True)
    train_local(model, iterate_batches(data, a.batch, 0), TrainSettings(
        learning_rate=1e-3, lr_schedule="cosine", warmup_steps=min(20, a.pretrain_steps // 10),
        local_steps=a.pretrain_steps, weight_decay=0.01, max_grad_norm=1.0, seed=0, device="cpu"))
    save_meta_checkpoint(model.state_dict(), args, out)
    return out


def corpus_setup(a, corpus: str) -> dict:
    """checkpoint, tokenizer, node files and held-out file of a corpus."""
    cache = Path(a.cache_dir)
    if corpus == "plays":
        tok = moq.train_tokenizer(cache)
        ckpt, _ = moq.pretrain(a, tok)
        return {"ckpt": ckpt, "tokenizer": str(tok), "model": "bpe-small",
                "nodes": [lq.CORPUS_TRAIN / f"{p}.jsonl" for p in lq.FINETUNE_PLAYS], "eval": lq.EVAL_FILE,
                "corpus": {"pretrain": lq.PRETRAIN_PLAYS, "finetune": lq.FINETUNE_PLAYS, "eval": "macbeth"}}
    info = build_pydocs(cache)
    d = Path(info["dir"])
    ckpt = pretrain(a, load_examples(d / "pretrain.jsonl"), preset_args("bytes-small"), "bytes", "pydocs-bytes-small")
    return {"ckpt": ckpt, "tokenizer": "bytes", "model": "bytes-small",
            "nodes": [d / f"node-{t}.jsonl" for t in PYDOCS_FINETUNE], "eval": d / "eval.jsonl",
            "corpus": {k: v for k, v in info.items() if k != "dir"}}


# ----------------------------------------------------------------------------------------------- LoRA


def lora_model(args: ModelArgs, state: dict, rank: int, seed: int = 0, alpha: int | None = None) -> torch.nn.Module:
    """The full model (frozen, float32) with peft LoRA adapters (rank `rank`, lora_alpha = `alpha`, default rank) on every
    linear of every block; only the adapters train. Adapter init is seeded (A: kaiming, B: zeros)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = build_model(args, seed=None)
    model.load_state_dict(state)
    model.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0,
                                                   target_modules=LORA_TARGETS), model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def load_adapters(model, arrays: ArrayRecord) -> None:
    from peft import set_peft_model_state_dict

    sd = decode(arrays)
    expected = adapter_state(model)
    if set(sd) != set(expected) or any(sd[k].shape != expected[k].shape for k in sd):
        raise ValueError(f"adapter arrays differ from this model's adapters (keys or shapes): "
                         f"{sorted(set(sd) ^ set(expected))[:4]}")
    res = set_peft_model_state_dict(model, sd)
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"unexpected adapter keys {res.unexpected_keys[:4]}")


def lora_memory(args: ModelArgs, state: dict, rank: int, batch: int, seq: int) -> dict:
    """Client training memory as learning_quality.client_memory counts it (16 B per trainable parameter +
    the frozen weights + the tensors autograd saves in one forward)."""
    model = lora_model(args, state, rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad) + sum(b.nbytes for b in model.buffers())
    acts = lq.saved_tensor_bytes(model, batch, seq)
    return {"trainable_params": trainable, "state_bytes": 16 * trainable, "frozen_bytes": frozen,
            "activation_bytes": acts, "transient_bytes": 0, "total_bytes": 16 * trainable + frozen + acts,
            "rank": rank}


def matched_rank(args: ModelArgs, state: dict, target_bytes: int, batch: int, seq: int) -> int:
    """The LoRA rank in 1..dim whose client memory is closest to target_bytes (memory grows with rank)."""
    lo, hi = 1, args.dim
    while lo < hi:  # smallest rank with memory >= target
        mid = (lo + hi) // 2
        if lora_memory(args, state, mid, batch, seq)["total_bytes"] >= target_bytes:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1:
        below, above = (lora_memory(args, state, r, batch, seq)["total_bytes"] for r in (lo - 1, lo))
        if abs(below - target_bytes) < abs(above - target_bytes):
            return lo - 1
    return lo


def lora_run(a, setup: dict, seed: int, rank: int, lr: float, rounds: int, on_round=None,
             alpha: int | None = None) -> dict:
    """Federated LoRA: Flower's FedAvg (weighted by num-examples) of the adapters over the in-process grid;
    each client loads the adapters into its own frozen base model and trains them; the server evaluates
    base + averaged adapters on the held-out data after every round (and hands them to `on_round(round,
    adapter state)` when given)."""
    args, state = load_checkpoint(setup["ckpt"])
    state = {k: v.float() for k, v in state.items()}
    nodes = [{"data-path": str(f), "partition-id": i} for i, f in enumerate(setup["nodes"])]
    cfg = {"num-server-rounds": rounds, "local-steps": a.local_steps, "learning-rate": lr, "seed": seed,
           "checkpoint-dir": str(setup["ckpt"]), "tokenizer-path": setup["tokenizer"], "max-seq-len": a.seq,
           "batch-size": a.batch, "max-batch-size": 8, "eval-batches": a.eval_batches, "packing": True,
           "device": "cpu", "precision": "fp32", "lr-schedule": "constant", "weight-decay": 0.01,
           "max-grad-norm": 1.0}

    def handle(msg: Message, rc, node_config) -> Message:
        model = lora_model(args, state, rank, alpha=alpha)  # the client's own copy of the base (downloaded once)
        load_adapters(model, msg.content["arrays"])
        data = local_dataset(rc, node_config, "train")
        s = node_seed(rc, node_config, int(msg.content["config"]["server-round"]))
        m = train_local(model, iterate_batches(data, rc.batch_size, s), TrainSettings(
            learning_rate=lr, weight_decay=rc.weight_decay, max_grad_norm=rc.max_grad_norm, lr_schedule="constant",
            local_steps=rc.local_steps, precision="fp32", device="cpu", seed=s, progress=False))
        metrics = MetricRecord({"num-examples": data.n_examples, "train-loss": m["train_loss"], "seconds": m["seconds"]})
        return Message(RecordDict({"arrays": encode(adapter_state(model)), "metrics": metrics}), reply_to=msg)

    tok = load_tokenizer(setup["tokenizer"])
    held = build_dataset(load_examples(setup["eval"], "auto"), tok, a.seq, pack=True)
    batches = eval_batches(held, 8, a.eval_batches or None)
    eval_model = lora_model(args, state, rank, alpha=alpha)
    history = []

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapters(eval_model, arrays)
        if on_round is not None:
            on_round(rnd, decode(arrays))
        res = evaluate(eval_model, batches, precision="fp32")
        history.append([rnd, res["loss"], res["perplexity"]])
        return MetricRecord({"loss": res["loss"], "perplexity": res["perplexity"]})

    grid = InProcessGrid(nodes, cfg, handler=handle, keep_arrays=False)  # only the bytes and metrics are read
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=len(nodes))
    init = encode(adapter_state(lora_model(args, state, rank, seed=seed, alpha=alpha)))
    t0 = time.perf_counter()
    strategy.start(grid, init, num_rounds=rounds, evaluate_fn=evaluate_fn)
    seconds = time.perf_counter() - t0
    errors = [m.error.reason for m in grid.replies if m.has_error()]
    if errors:
        raise RuntimeError(f"LoRA rank {rank}: client errors: {errors[:3]}")
    down, up = grid.delivered_bytes, grid.reply_bytes
    return {"history": history, "final_ppl": history[-1][2], "seconds": seconds, "rank": rank, "lr": lr,
            "bytes_down_per_client_round": sum(down) / len(down), "bytes_up_per_client_round": sum(up) / len(up),
            "bytes_once": 4 * sum(t.numel() for t in state.values()),  # the float32 base, downloaded once
            "client_seconds": [float(m.content["metrics"]["seconds"]) for m in grid.replies],
            "adapter_params": sum(math.prod(a.shape) for a in init.values())}


# -------------------------------------------------------------------------------- memory and step time


def server_method_memory(args: ModelArgs, state: dict, method: str, batch: int, seq: int) -> dict:
    c = {"slice-mode": "independent", "context-bits": 4, "context-group-size": 64, **SERVER_METHODS[method]}
    return lq.client_memory(state, args, c, batch, seq)


def _client_for_timing(args, state, method: str, ranks: dict) -> tuple[torch.nn.Module, dict]:
    """A client model built as the runs build it (random weights for slices: the time does not depend on
    them) and the TrainSettings keys its run uses."""
    if method in LORA_METHODS:
        return lora_model(args, state, ranks[method]), {}
    opts = SERVER_METHODS[method]
    W = opts["world-size"]
    mopts = {**{k: v for k, v in opts.items() if k in _memory_model.BASELINE}, "precision": "fp32",
             "gradient-checkpointing": False}
    model = _memory_model.client_model(args, W, mopts, device="cpu")
    keys = {"optimizer": opts.get("optimizer", "adamw"), "optimizer_in_backward": opts.get("optimizer-in-backward", False),
            "max_grad_norm": opts.get("max-grad-norm", 1.0), "loss_chunk_tokens": opts.get("loss-chunk-tokens", 0)}
    return model, keys


def step_times(a, args, state, methods: list[str], ranks: dict, vocab: int) -> dict[str, float]:
    """Seconds per local step (batch x seq tokens) of each method's client, best of time_reps timings of
    time_steps steps, methods timed in turn (a shared machine's load hits them alike)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g)

    def batches():
        while True:
            yield tokens[:, :-1], tokens[:, 1:]

    built = {m: _client_for_timing(args, state, m, ranks) for m in methods}
    best = {m: float("inf") for m in methods}
    for rep in range(a.time_reps + 1):  # rep 0 warms up (torchao compiles its step once per shape)
        for m, (model, keys) in built.items():
            r = train_local(model, batches(), TrainSettings(learning_rate=1e-5, local_steps=a.time_steps, device="cpu",
                                                             precision="fp32", progress=False, **{"max_grad_norm": 1.0, **keys}))
            if rep:
                best[m] = min(best[m], r["seconds"] / a.time_steps)
    return best


# -------------------------------------------------------------------------------------------- summary


def _interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x on the piecewise-linear curve (xs increasing); None when x is beyond the curve."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[0] if xs and x == xs[0] else None


def curves(run: dict, step_seconds: float | None, local_steps: int) -> dict:
    """Cumulative bytes per client (down + up) and client compute seconds at the end of each round."""
    per_round = run["bytes_down_per_client_round"] + run["bytes_up_per_client_round"]
    once = run.get("bytes_once", 0)
    rounds = [h[0] for h in run["history"]]
    return {"bytes": [0.0 if r == 0 else once + r * per_round for r in rounds],
            "seconds": None if step_seconds is None else [r * local_steps * step_seconds for r in rounds],
            "ppl": [h[2] for h in run["history"]],
            "best": [min(h[2] for h in run["history"][:i + 1]) for i in range(len(run["history"]))]}


def summarize(doc: dict) -> None:
    """Per corpus: gain shares per round, at --rounds, at equal bytes and equal time; tables; targets."""
    a = doc["settings"]
    R, L = a["rounds"], a["long_rounds"]
    doc["summary"], tables = {}, []
    for corpus, cdoc in doc["corpora"].items():
        runs = [r for r in doc["runs"] if r["corpus"] == corpus]
        fed = {r["seed"]: r for r in runs if r["method"] == "fedavg"}
        steps = cdoc.get("step_seconds", {})
        rows, out = [], {}
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method and r["seed"] in fed]
            if not mine:
                continue
            s = {"seeds": [r["seed"] for r in mine]}

            def share(r, rnd):
                f, start = fed[r["seed"]]["history"], r["history"][0][2]
                if rnd >= len(r["history"]) or rnd >= len(f) or start == f[rnd][2]:
                    return None
                return (start - r["history"][rnd][2]) / (start - f[rnd][2])

            per_round = []
            for rnd in range(1, max(len(r["history"]) for r in mine)):
                vals = [v for v in (share(r, rnd) for r in mine) if v is not None]
                per_round.append(sum(vals) / len(vals) if vals else None)
            at_r = [share(r, R) for r in mine if share(r, R) is not None]
            best = [(r["history"][0][2] - min(h[2] for h in r["history"][:R + 1]))
                    / (r["history"][0][2] - min(h[2] for h in fed[r["seed"]]["history"][:R + 1])) for r in mine]
            s["best_round_gain_share"] = sum(best) / len(best)  # early stopping: each run's best round <= R
            s["gain_share_per_round"] = per_round
            s["gain_share_at_rounds"] = at_r
            s["gain_share_mean"] = sum(at_r) / len(at_r) if at_r else None
            s["final_ppl_at_rounds"] = [r["history"][R][2] for r in mine if len(r["history"]) > R]
            s["start_ppl"] = mine[0]["history"][0][2]
            s["bytes_per_round"] = mine[0]["bytes_down_per_client_round"] + mine[0]["bytes_up_per_client_round"]
            s["bytes_once"] = mine[0].get("bytes_once", 0)
            s["memory_bytes"] = cdoc["memory"][method]["total_bytes"] if method in cdoc.get("memory", {}) else None
            s["step_seconds"] = steps.get(method)
            s["rank"] = mine[0].get("rank")
            # equal bytes / equal time: budgets of ctx-w2 and ctx-w4 at R rounds, per seed
            for budget_of in ("ctx-w2", "ctx-w4"):
                for kind in ("bytes", "seconds"):
                    vals = []
                    for r in mine:
                        ref = next((x for x in runs if x["method"] == budget_of and x["seed"] == r["seed"]), None)
                        if ref is None or len(ref["history"]) <= R or steps.get(budget_of) is None:
                            continue
                        budget = curves(ref, steps[budget_of], a["local_steps"])[kind][R]
                        c_me = curves(r, steps.get(method), a["local_steps"])
                        c_fed = curves(fed[r["seed"]], steps.get("fedavg"), a["local_steps"])
                        if c_me[kind] is None or c_fed[kind] is None:
                            continue
                        p_me, p_fed = _interp(c_me[kind], c_me["ppl"], budget), _interp(c_fed[kind], c_fed["ppl"], budget)
                        b_me, b_fed = _interp(c_me[kind], c_me["best"], budget), _interp(c_fed[kind], c_fed["best"], budget)
                        start = r["history"][0][2]
                        vals.append(None if p_me is None or p_fed is None or start in (p_fed, b_fed)
                                    else {"seed": r["seed"], "ppl": p_me, "fedavg_ppl": p_fed, "best_ppl": b_me,
                                          "fedavg_best_ppl": b_fed,
                                          "share_of_fedavg_at_budget": (start - p_me) / (start - p_fed),
                                          "best_share_of_fedavg_at_budget": (start - b_me) / (start - b_fed),
                                          "share_of_fedavg_at_rounds": (start - p_me) / (start - fed[r["seed"]]["history"][R][2])})
                    ok = [v for v in vals if v]

                    def mean(key):
                        return sum(v[key] for v in ok) / len(ok) if ok else None

                    s[f"equal_{kind}_{budget_of}"] = {
                        "per_seed": ok, "missing": len(vals) - len(ok), "share_mean": mean("share_of_fedavg_at_rounds"),
                        "vs_fedavg_at_budget_mean": mean("share_of_fedavg_at_budget"),
                        "best_vs_fedavg_at_budget_mean": mean("best_share_of_fedavg_at_budget")}
            out[method] = s

            def pct(x):
                return "-" if x is None else f"{100 * x:.0f}%"

            eb, et = s["equal_bytes_ctx-w2"], s["equal_seconds_ctx-w2"]
            name = method + (f" (r={s['rank']})" if s["rank"] else "")
            rows.append([name, len(s["seeds"]), pct(s["gain_share_mean"]), pct(s["best_round_gain_share"]),
                         " / ".join(pct(x) for x in s["gain_share_per_round"][:R]),
                         pct(s["gain_share_per_round"][L - 1]) if len(s["gain_share_per_round"]) >= L else "-",
                         "-" if s["memory_bytes"] is None else f"{s['memory_bytes'] / 1e6:.1f}",
                         f"{s['bytes_per_round'] / 1e6:.2f}" + (f" + {s['bytes_once'] / 1e6:.1f} once" if s["bytes_once"] else ""),
                         f"{pct(eb['vs_fedavg_at_budget_mean'])} / {pct(eb['best_vs_fedavg_at_budget_mean'])}"
                         + ("" if not eb["missing"] else f" ({eb['missing']} short)"),
                         "-" if s["step_seconds"] is None else f"{1000 * s['step_seconds']:.0f}",
                         f"{pct(et['vs_fedavg_at_budget_mean'])} / {pct(et['best_vs_fedavg_at_budget_mean'])}"
                         + ("" if not et["missing"] else f" ({et['missing']} short)")])
        doc["summary"][corpus] = out
        tables.append(_common.table(
            ["method", "seeds", f"gain share, round {R}", f"best round <= {R}", "per round 1..R", f"round {L} (seed 42)", "client MB", "MB per round (down+up)",
             "at ctx-w2's bytes (last / best)", "ms / step", "at ctx-w2's client time (last / best)"], rows,
            title=f"{corpus} ({cdoc['model']}): start ppl {out.get('fedavg', {}).get('start_ppl', float('nan')):.3f}; "
                  f"gain shares of FedAvg's gain (same seed). 'At ctx-w2's bytes / client time': the gain reached "
                  f"with the bytes (client compute time) ctx-w2 used in {R} rounds, over FedAvg's gain with the same "
                  f"budget; last: the perplexity of the round the budget ends in; best: the best round so far"))
    doc["tables_md"] = tables
    doc["targets"] = targets(doc)


def targets(doc: dict) -> dict:
    """The issue's targets, per corpus: met or not, with the numbers."""
    out = {}
    for corpus, s in doc["summary"].items():
        t = {}
        for W in (2, 4):
            ctx, lora = s.get(f"ctx-w{W}"), s.get(f"lora-w{W}mem")
            if not ctx:
                continue
            e = ctx[f"equal_bytes_ctx-w{W}"]
            eb, ebb = e["vs_fedavg_at_budget_mean"], e["best_vs_fedavg_at_budget_mean"]
            t[f"ctx-w{W} >= FedAvg's gain at equal bytes"] = {"last": eb, "best_so_far": ebb,
                                                               "met": eb is not None and eb >= 1.0}
            if lora:
                lb, lbb = (lora[f"equal_bytes_ctx-w{W}"][k] for k in ("vs_fedavg_at_budget_mean", "best_vs_fedavg_at_budget_mean"))
                t[f"ctx-w{W} beats LoRA at equal memory and bytes"] = {
                    "ctx": eb, "lora": lb, "ctx_best_so_far": ebb, "lora_best_so_far": lbb,
                    "met": None if eb is None or lb is None else eb > lb}
            g = ctx["gain_share_mean"]
            goal = 0.95 if W == 2 else 0.90
            t[f"moonshot ctx-w{W} >= {goal:.0%} of FedAvg's gain at equal rounds"] = {"value": g, "met": g is not None and g >= goal}
        out[corpus] = t
    return out


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = Path(a.out) if a.out else _common.RESULTS_DIR / "method_comparison.json"
    settings = {k: v for k, v in vars(a).items() if k not in ("plan", "cache_dir", "out", "only")}
    settings["cache_dir"] = os.path.relpath(a.cache_dir, _common.REPO_ROOT)
    doc = {"settings": settings, "corpora": {}, "runs": []}
    before = 0.0  # seconds the runs kept from --out took
    if (a.resume or a.report) and out.exists():
        old = json.loads(out.read_text())
        doc["runs"], doc["corpora"], before = old.get("runs", []), old.get("corpora", {}), old.get("total_seconds", 0.0)
        for key in ("discarded", "invocations"):  # runs of an earlier, replaced setup; the commands so far
            if key in old:
                doc[key] = old[key]
        if a.report:  # the settings the runs were made with
            doc["settings"], a.plan = old["settings"], []
    doc.setdefault("invocations", []).append(" ".join(["python bench/method_comparison.py", *(argv or sys.argv[1:])]))
    done = {(r["corpus"], r["seed"], r["method"]) for r in doc["runs"]}
    t0 = time.perf_counter()
    setups = {}

    def save():
        doc["total_seconds"] = before + time.perf_counter() - t0
        summarize(doc)
        _common.write_results("method_comparison", doc, out)
        targets_md = [f"- {corpus}: {goal}: " + ("met" if t["met"] else "NOT met" if t["met"] is False else "not measured")
                      + " (" + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if isinstance(v, float)) + ")"
                      for corpus, ts in doc["targets"].items() for goal, t in ts.items()]
        out.with_suffix(".md").write_text("# Method comparison (bench/method_comparison.py)\n" + "\n".join(doc["tables_md"])
                                          + "\n\nTargets (issue 15):\n\n" + "\n".join(targets_md) + "\n")

    for corpus, seed, methods in a.plan:
        if corpus not in setups:
            setups[corpus] = corpus_setup(a, corpus)
            su = setups[corpus]
            args, state = load_checkpoint(su["ckpt"])
            state = {k: v.float() for k, v in state.items()}
            c = doc["corpora"].setdefault(corpus, {})
            if "ranks" not in c:  # memory per method, LoRA ranks matched to it, client step times
                mem = {m: server_method_memory(args, state, m, a.batch, a.seq) for m in SERVER_METHODS}
                ranks = {m: matched_rank(args, state, mem[ref]["total_bytes"], a.batch, a.seq) if ref
                         else max(1, round(args.dim * 16 / 3072)) for m, ref in LORA_METHODS.items()}
                mem.update({m: lora_memory(args, state, r, a.batch, a.seq) for m, r in ranks.items()})
                timed = [m for m in METHODS if not m.startswith("ctx-best") or corpus == "plays"]
                c.update({"model": su["model"], "params": sum(t.numel() for t in state.values()), "dim": args.dim,
                          "tokenizer": os.path.basename(su["tokenizer"]), "corpus": su["corpus"], "memory": mem,
                          "ranks": ranks, "step_seconds": step_times(a, args, state, timed, ranks, args.vocab_size)})
                print(f"{corpus}: LoRA ranks {ranks}; step ms " +
                      ", ".join(f"{m} {1000 * v:.0f}" for m, v in c["step_seconds"].items()), flush=True)
        su, c = setups[corpus], doc["corpora"][corpus]
        for method in methods:
            if (corpus, seed, method) in done:
                continue
            rounds = a.long_rounds if seed == 42 and method in a.long_methods.split(",") else a.rounds
            if method in LORA_METHODS:
                rank = c["ranks"][method]
                lr = a.lora_lr if rank >= 32 else a.lora_lr_small
                r = lora_run(a, su, seed, rank, lr, rounds)
            else:
                ra = argparse.Namespace(**{**vars(a), "rounds": rounds})
                r = lq.run_config(ra, method, seed, su["ckpt"], SERVER_METHODS[method], tokenizer=su["tokenizer"],
                                  node_files=su["nodes"], eval_file=su["eval"])
                r = {k: v for k, v in r.items() if k not in ("config",)}
            r.update({"corpus": corpus, "method": method, "seed": seed, "rounds": rounds})
            doc["runs"].append(r)
            print(f"  {corpus} seed {seed} {method:13s}: ppl {r['history'][0][2]:.3f} -> {r['final_ppl']:.3f} "
                  f"({rounds} rounds, {r['seconds']:.0f} s)", flush=True)
            save()
    save()
    return doc


if __name__ == "__main__":
    main()
