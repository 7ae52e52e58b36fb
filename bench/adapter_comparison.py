"""Context slices with rest adapters against full FedAvg and the strongest federated LoRA (issue 21).

Three corpora, each a model pretrained centrally and then trained federatedly, one node per data group:
  plays   near domain: the `bpe-small` model pretrained on four Shakespeare plays, fine-tuned on four others;
          held out: Macbeth, its examples alternately in the validation and the test split (6 rounds).
  pydocs  near domain: `bytes-small` pretrained on ten standard-library packages' docstrings, fine-tuned on four
          others; held out: every 8th docstring of those four, alternately validation / test (6 rounds).
  code    far domain, continued pre-training: `bytes-small` pretrained on English (the eight built-in Shakespeare
          plays), then trained on Python source code, the standard library's own .py files of four packages, one
          package per node (asyncio, email, idlelib, tkinter); every 8th file of each is held out, alternately
          validation / test. Forgetting: the loss on Macbeth (held-out English, the pretraining distribution).
          --code-rounds rounds (20).
The server picks its best round on the validation split (`checkpoints/..._best.pth`, as every run writes it);
the test split and the forgetting set are scored at that round and at the last one.

Methods (server ones through the real server.run over the in-process grid):
  fedavg                    world size 1: every client trains the whole model
  ctx-w2                    context slices, int4 frozen rest, all-clients merge (code corpus only)
  ctx-ad-w2, ctx-ad-w4      the same with rank --adapter-rank rest adapters (rest-adapter-rank)
  ctx-ad-w8                 ctx-ad-w4 at twice the kv heads (each kv head held by 2 ranks, merged within the pair)
  ctx-ad-w2-up4[-down8|-down4]  ctx-ad-w2 with its update uploaded in int4 (and its slice downloaded in int8 / int4)
  lora-w2mem, lora-w4mem    federated LoRA (peft, every linear of every block, lora_alpha = rank): Flower's FedAvg
                            of the factors A and B
  lora-merged-w2mem/w4mem   federated LoRA that merges the clients' weighted mean *product* B A into the float32
                            base every round and restarts the adapters (the base moves, so rank accumulates)
  Both LoRA variants take the rank whose client memory (16 B per trainable parameter, the frozen weights, the
  saved activations; as learning_quality.client_memory counts it) is closest to ctx-ad-w2's (ctx-ad-w4's).

Gain share, in loss: (start loss - loss) / (start loss - FedAvg's loss), same seed, same round (perplexity moves by
large factors on the code corpus). Equal client time: each method's own measured client seconds per round.
Results after every run: bench/results/adapter_comparison.json and .md.

    nice -n 19 python bench/adapter_comparison.py --corpora code            # one corpus
    python bench/adapter_comparison.py --quick                             # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import _common
import learning_quality as lq
import method_comparison as mc
import torch

from fedtp_flwr.client.app import local_dataset, node_seed
from fedtp_flwr.config import RunConfig
from fedtp_flwr.data import build_dataset, eval_batches, iterate_batches, load_examples, load_tokenizer
from fedtp_flwr.model import build_model, preset_args
from fedtp_flwr.model.checkpoint import load_checkpoint
from fedtp_flwr.server.outputs import load_run_checkpoint
from fedtp_flwr.training import TrainSettings, evaluate, train_local

CODE_GROUPS = ("asyncio", "email", "idlelib", "tkinter")
HOLDOUT_EVERY = 8
CHUNK_CHARS = 2000  # a source file is cut into examples of about this many characters, at line ends

# plain context slices (no rest adapter: rest-adapter-rank's auto default would add one)
_CTX = {"slice-mode": "context", "merge-weighting": "all-clients", "context-bits": 4, "context-group-size": 64,
        "rest-adapter-rank": 0}
SERVER_METHODS = {
    "fedavg": {"world-size": 1},
    "ctx-w2": {"world-size": 2, **_CTX},
    "ctx-ad-w2": {"world-size": 2, **_CTX}, "ctx-ad-w4": {"world-size": 4, **_CTX},  # + the adapter keys (main)
    # beyond the kv heads (issue 31): 8 query heads over 4 kv heads at W = 8, each kv head held by 2 ranks
    "ctx-ad-w8": {"world-size": 8, **_CTX},
    # the small-GPU recipes' setting: embeddings and output split by vocabulary rows too (no adapter on those rows)
    "ctx-ad-w2-vp": {"world-size": 2, **_CTX, "vocab-parallel": True},
    # ... with the recipes' codecs: the small-GPU recipe's learning options as shipped
    "ctx-ad-w2-vp-up4-down4": {"world-size": 2, **_CTX, "vocab-parallel": True, "upload-codec": "int4-delta",
                               "download-codec": "int4"},
    # what compressing the traffic costs in learning (issue 23): the update up in int4, the slice down in int8 / int4
    "ctx-ad-w2-up4": {"world-size": 2, **_CTX, "upload-codec": "int4-delta"},
    "ctx-ad-w2-up4-down8": {"world-size": 2, **_CTX, "upload-codec": "int4-delta", "download-codec": "int8"},
    "ctx-ad-w2-up4-down4": {"world-size": 2, **_CTX, "upload-codec": "int4-delta", "download-codec": "int4"},
    "ctx-ad-w4-up4-down4": {"world-size": 4, **_CTX, "upload-codec": "int4-delta", "download-codec": "int4"},
    # ... and DiLoCo's outer Nesterov step on the merged update: the paper's outer lr and momentum, and lr 1.0 with
    # momentum 0.5 (ahead on code and pydocs at 32 local steps: the slow-link recipe's)
    "ctx-ad-w2-up4-down4-diloco": {"world-size": 2, **_CTX, "upload-codec": "int4-delta", "download-codec": "int4",
                                   "strategy": "diloco", "server-learning-rate": 0.7, "server-momentum": 0.9},
    "ctx-ad-w2-up4-down4-diloco-m05": {"world-size": 2, **_CTX, "upload-codec": "int4-delta", "download-codec": "int4",
                                       "strategy": "diloco", "server-learning-rate": 1.0, "server-momentum": 0.5},
}
LORA_METHODS = {"lora-w2mem": "ctx-ad-w2", "lora-merged-w2mem": "ctx-ad-w2",
                "lora-w4mem": "ctx-ad-w4", "lora-merged-w4mem": "ctx-ad-w4"}  # method -> memory matched to
METHODS = [*SERVER_METHODS, *LORA_METHODS]
NEAR = ["fedavg", "ctx-ad-w2", "lora-w2mem", "lora-merged-w2mem", "ctx-ad-w4", "lora-w4mem", "lora-merged-w4mem"]
CORPORA = ("code", "plays", "pydocs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpora", default=",".join(CORPORA))
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--methods", default="", help="comma list (default: all for code, all but ctx-w2 for the others)")
    p.add_argument("--rounds", type=int, default=6, help="rounds on the near-domain corpora")
    p.add_argument("--code-rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr-small", type=float, default=3e-3, help="LoRA learning rate for ranks below 32")
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--adapter-lr-factor", type=float, default=10.0)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--swap-period", type=int, default=2)
    p.add_argument("--cache-dir", default=str(_common.RESULTS_DIR / "quality_cache"))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/adapter_comparison.json)")
    p.add_argument("--fresh", action="store_true", help="drop the runs already in --out (default: keep, run the rest)")
    p.add_argument("--merge", action="append", default=[], help="another results file of this script whose runs join "
                   "--out (e.g. corpora run in parallel processes); with --corpora '' only the summary is redone")
    p.add_argument("--nodes-per-group", type=int, default=1,
                   help="split each data group's file into this many nodes (lines alternately): 2 gives 8 nodes, "
                        "so W = 8 has a node per rank")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 2 steps, tiny pretrain, few runs")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.code_rounds, a.local_steps, a.seq, a.batch, a.eval_batches = 2, 2, 2, 32, 4, 2
        a.pretrain_steps, a.seeds, a.adapter_rank = 3, "42", 2
        a.methods = a.methods or "fedavg,ctx-ad-w2,lora-merged-w2mem"
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.corpus_list = [c for c in a.corpora.split(",") if c.strip()]  # none: summarize (and merge) only
    for c in a.corpus_list:
        if c not in CORPORA:
            p.error(f"--corpora: {c!r} is not one of {CORPORA}")
    for m in (m for m in a.methods.split(",") if m):
        if m not in METHODS:
            p.error(f"--methods: {m!r} is not one of {METHODS}")
    return a


def server_method(a, method: str) -> dict:
    c = dict(SERVER_METHODS[method])
    if method.startswith("ctx-ad"):
        c.update({"rest-adapter-rank": a.adapter_rank, "rest-adapter-lr-factor": a.adapter_lr_factor})
    return c


# -------------------------------------------------------------------------------------------- corpora


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _alternate(path_val: Path, path_test: Path, texts: list[str]) -> None:
    """Held-out texts alternately into the validation and the test split."""
    _write_jsonl(path_val, texts[0::2])
    _write_jsonl(path_test, texts[1::2])


def _chunks(source: str) -> list[str]:
    out, cur = [], []
    for line in source.splitlines(keepends=True):
        cur.append(line)
        if sum(map(len, cur)) >= CHUNK_CHARS:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def build_code(cache: Path) -> dict:
    """code-v1-py<version>/{node-<group>,val,test}.jsonl: the standard library's .py files of CODE_GROUPS (tests
    excluded), every HOLDOUT_EVERY-th file held out (alternately val / test), each file cut into chunks."""
    import platform

    out = cache / f"code-v1-py{platform.python_version()}"
    info_path = out / "corpus.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    held, info = [], {"python": platform.python_version(), "groups": {}}
    for group in CODE_GROUPS:
        files = sorted(p for p in (root / group).rglob("*.py") if not any(x in ("test", "tests") for x in p.parts))
        if not files:
            raise RuntimeError(f"this Python's standard library has no {group!r} package")
        mine = []
        for i, path in enumerate(files):
            chunks = _chunks(path.read_text(encoding="utf-8", errors="replace"))
            (held if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else mine).extend(chunks)
        _write_jsonl(out / f"node-{group}.jsonl", mine)
        info["groups"][group] = {"files": len(files), "train_chunks": len(mine)}
    _alternate(out / "val.jsonl", out / "test.jsonl", held)
    info["held_out_chunks"] = len(held)
    info["dir"] = str(out)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def split_nodes(files: list[Path], parts: int, out: Path) -> list[Path]:
    """Each node file cut into `parts` files of alternate lines (records): the same groups, more nodes."""
    if parts == 1:
        return files
    out.mkdir(parents=True, exist_ok=True)
    split = []
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        for j in range(parts):
            path = out / f"{f.stem}-{j}.jsonl"
            path.write_text("".join(lines[j::parts]), encoding="utf-8")
            split.append(path)
    return split


def corpus_setup(a, corpus: str) -> dict:
    """checkpoint, tokenizer, node files, validation / test / forgetting files of a corpus (each group's node file
    split into --nodes-per-group nodes)."""
    setup = _corpus_setup(a, corpus)
    n = getattr(a, "nodes_per_group", 1)
    setup["nodes"] = split_nodes(setup["nodes"], n, Path(a.cache_dir) / f"{corpus}-nodes-x{n}")
    return setup


def _corpus_setup(a, corpus: str) -> dict:
    cache = Path(a.cache_dir)
    if corpus == "code":
        info = build_code(cache)
        d = Path(info.pop("dir"))
        english = load_examples(lq.CORPUS_TRAIN)  # all eight built-in plays
        ckpt = mc.pretrain(a, english, preset_args("bytes-small"), "bytes", "english-bytes-small")
        return {"ckpt": ckpt, "tokenizer": "bytes", "model": "bytes-small", "rounds": a.code_rounds,
                "nodes": [d / f"node-{g}.jsonl" for g in CODE_GROUPS], "val": d / "val.jsonl",
                "test": d / "test.jsonl", "forget": lq.EVAL_FILE, "corpus": info}
    su = mc.corpus_setup(a, corpus)
    split = cache / f"{corpus}-val-test"
    split.mkdir(parents=True, exist_ok=True)
    _alternate(split / "val.jsonl", split / "test.jsonl", [e.text for e in load_examples(su["eval"])])
    return {**su, "rounds": a.rounds, "val": split / "val.jsonl", "test": split / "test.jsonl", "forget": None}


def scorer(a, setup: dict):
    """score(state, which) -> {"test": loss, "forget": loss}: the split(s) the server never sees (text, or chat /
    alpaca records with the loss on the answers); `which` ("best" / "last") names the round scored."""
    args, _ = load_checkpoint(setup["ckpt"])
    tok = load_tokenizer(setup["tokenizer"])
    sets = {"test": setup["test"], "forget": setup["forget"]}
    batches = {k: eval_batches(build_dataset(load_examples(p, "auto"), tok, a.seq, pack=True), 8, a.eval_batches or None)
               for k, p in sets.items() if p is not None}
    model = build_model(args, seed=None)

    def score(state: dict, which: str | None = None) -> dict:  # which: "best" / "last" (for costlier scorers)
        model.load_state_dict(state)
        return {k: evaluate(model, b, precision="fp32")["loss"] for k, b in batches.items()}

    return score


# ------------------------------------------------------------------------------------------------ runs


def server_run(a, setup: dict, method: str, seed: int, score, config: dict | None = None) -> dict:
    """One run of `method` (its run-config keys: `config`, default server_method's) through server.run."""
    ra = argparse.Namespace(**{**vars(a), "rounds": setup["rounds"]})

    def after(out_dir: Path) -> dict:
        ckpts = out_dir / "checkpoints"
        best = load_run_checkpoint(next(ckpts.glob("*_best.pth")))
        last = load_run_checkpoint(max(ckpts.glob("*_round*.pth"), key=lambda p: int(p.stem.rsplit("round", 1)[1])))
        return {"best_round": int(best["round"]), "scores_best": score(best["model_state_dict"], "best"),
                "scores_last": score(last["model_state_dict"], "last")}

    r = lq.run_config(ra, method, seed, setup["ckpt"], config or server_method(a, method), tokenizer=setup["tokenizer"],
                      node_files=setup["nodes"], eval_file=setup["val"], after=after)
    return {k: v for k, v in r.items() if k != "config"}


def _lora_scale_products(ad: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """peft adapter state -> {weight name: scale B @ A} (scale = lora_alpha / rank; 1 when lora_alpha = rank)."""
    out = {}
    for k, a_mat in ad.items():
        if ".lora_A." in k:
            name = k.replace(".lora_A.weight", ".weight")
            out[name] = scale * (ad[k.replace(".lora_A.", ".lora_B.")].float() @ a_mat.float())
    return out


def lora_merged_run(a, setup: dict, seed: int, rank: int, lr: float, rounds: int, score) -> dict:
    """Federated LoRA merged every round: each client trains fresh adapters (A seeded per client and round, B = 0)
    on the current base; the server adds the num-examples-weighted mean of the clients' products B A to the
    float32 base and evaluates it. A client rebuilds the new base exactly from every client's factors, so a round
    moves the round's factors of all clients down and its own factors up (plus the base once)."""
    args, state = load_checkpoint(setup["ckpt"])
    base = {k: v.float().clone() for k, v in state.items()}
    nodes = [{"data-path": str(f), "partition-id": i} for i, f in enumerate(setup["nodes"])]
    rc = RunConfig.from_run_config({"local-steps": a.local_steps, "learning-rate": lr, "seed": seed,
                                    "checkpoint-dir": str(setup["ckpt"]), "tokenizer-path": setup["tokenizer"],
                                    "max-seq-len": a.seq, "batch-size": a.batch, "packing": True})
    tok = load_tokenizer(setup["tokenizer"])
    val = eval_batches(build_dataset(load_examples(setup["val"], "auto"), tok, a.seq, pack=True), 8, a.eval_batches or None)
    eval_model = build_model(args, seed=None)

    def val_loss() -> tuple[float, float]:
        eval_model.load_state_dict(base)
        res = evaluate(eval_model, val, precision="fp32")
        return res["loss"], res["perplexity"]

    history = [[0, *val_loss()]]
    best = (math.inf, 0, None)
    client_seconds, adapter_bytes = [], 0
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        sums, total = {}, 0.0
        for i, node in enumerate(nodes):
            model = mc.lora_model(args, base, rank, seed=seed * 10_007 + rnd * 101 + i)
            data = local_dataset(rc, node, "train")
            s = node_seed(rc, node, rnd)
            m = train_local(model, iterate_batches(data, rc.batch_size, s), TrainSettings(
                learning_rate=lr, weight_decay=0.01, max_grad_norm=1.0, lr_schedule="constant",
                local_steps=rc.local_steps, precision="fp32", device="cpu", seed=s, progress=False))
            client_seconds.append(m["seconds"])
            ad = mc.adapter_state(model)
            adapter_bytes = 4 * sum(t.numel() for t in ad.values())
            for name, product in _lora_scale_products(ad).items():
                w = float(data.n_examples)
                sums[name] = sums[name].add_(product, alpha=w) if name in sums else product.mul_(w)
            total += data.n_examples
        for name, s in sums.items():
            base[name].add_(s / total)
        history.append([rnd, *val_loss()])
        if history[-1][1] < best[0]:
            best = (history[-1][1], rnd, {k: v.clone() for k, v in base.items()})
    seconds = time.perf_counter() - t0
    n = len(nodes)
    return {"history": history, "final_ppl": history[-1][2], "final_loss": history[-1][1], "seconds": seconds,
            "rank": rank, "lr": lr, "best_round": best[1], "scores_best": score(best[2], "best"), "scores_last": score(base, "last"),
            "bytes_down_per_client_round": n * adapter_bytes, "bytes_up_per_client_round": adapter_bytes,
            "bytes_once": 4 * sum(t.numel() for t in state.values()), "client_seconds": client_seconds}


def lora_fedavg_run(a, setup: dict, seed: int, rank: int, lr: float, rounds: int, score, alpha: int | None = None) -> dict:
    """method_comparison's federated LoRA (Flower's FedAvg of A and B; lora_alpha = `alpha`, default the rank), on
    the validation split, scored on the test / forgetting sets at its best validation round and its last."""
    su = {**setup, "eval": setup["val"]}
    _, base = load_checkpoint(setup["ckpt"])
    kept = {}

    def keep(rnd, adapters):
        kept[rnd] = adapters

    def merged(adapters):  # base + B A: the model the server evaluated, as a plain Transformer's state
        products = _lora_scale_products(adapters, (alpha or rank) / rank)
        return {k: v.float() + products[k] if k in products else v.float() for k, v in base.items()}

    r = mc.lora_run(a, su, seed, rank, lr, rounds, on_round=keep, alpha=alpha)
    best_round = min(range(1, len(r["history"])), key=lambda i: r["history"][i][1])
    r.update({"best_round": best_round, "scores_best": score(merged(kept[best_round]), "best"),
              "scores_last": score(merged(kept[rounds]), "last"), "alpha": alpha or rank})
    return r


# -------------------------------------------------------------------------------------------- summary


def _mean_spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(doc: dict, corpora=CORPORA, methods=METHODS) -> list[str]:
    """Per corpus and method, over seeds: loss gain shares (validation per round, test at the best validation
    round), forgetting, bytes, client seconds; the issue's targets."""
    tables, doc["summary"] = [], {}
    for corpus in corpora:
        runs = [r for r in doc["runs"] if r["corpus"] == corpus]
        fed = {r["seed"]: r for r in runs if r["method"] == "fedavg"}
        if not fed:
            continue
        out, rows = {}, []
        for method in methods:
            mine = [r for r in runs if r["method"] == method and r["seed"] in fed]
            if not mine:
                continue
            R = len(mine[0]["history"]) - 1

            def share(r, rnd, key=1):
                f, start = fed[r["seed"]]["history"], r["history"][0][key]
                gain = start - f[rnd][key]
                return (start - r["history"][rnd][key]) / gain if gain else None

            def test_share(r, which):
                f = fed[r["seed"]]
                start = doc["corpora"][corpus]["start_scores"]["test"]
                gain = start - f[f"scores_{which}"]["test"]
                return (start - r[f"scores_{which}"]["test"]) / gain if gain else None

            def final_share(r, rnd):  # of FedAvg's gain at its last round, same seed: one scale for every round
                f, start = fed[r["seed"]]["history"], r["history"][0][1]
                gain = start - f[-1][1]
                return (start - r["history"][rnd][1]) / gain if gain else None

            per_round = [_mean_spread([v for r in mine if (v := share(r, i)) is not None]) for i in range(1, R + 1)]
            of_final = [_mean_spread([v for r in mine if (v := final_share(r, i)) is not None]) for i in range(R + 1)]
            s = {"seeds": [r["seed"] for r in mine], "rounds": R,
                 "val_loss_share_at_rounds": _mean_spread([v for r in mine if (v := share(r, R)) is not None]),
                 "val_loss_share_per_round": per_round,
                 "val_gain_of_fedavg_final_per_round": of_final,  # rounds 0..R
                 "test_loss_share_best_round": _mean_spread([v for r in mine if (v := test_share(r, "best")) is not None]),
                 "test_loss_share_last_round": _mean_spread([v for r in mine if (v := test_share(r, "last")) is not None]),
                 "best_round": [r["best_round"] for r in mine],
                 "mb_per_round": (mine[0]["bytes_down_per_client_round"] + mine[0]["bytes_up_per_client_round"]) / 1e6,
                 "client_seconds_per_round": statistics.fmean(sum(r["client_seconds"]) / len(r["client_seconds"])
                                                              for r in mine),
                 "rank": mine[0].get("rank"), "memory_bytes": doc["corpora"][corpus]["memory"].get(method, {}).get("total_bytes")}
            if doc["corpora"][corpus]["start_scores"].get("forget") is not None:
                start = doc["corpora"][corpus]["start_scores"]["forget"]
                s["forgetting_best_round"] = _mean_spread([r["scores_best"]["forget"] - start for r in mine])
                s["forgetting_last_round"] = _mean_spread([r["scores_last"]["forget"] - start for r in mine])
            out[method] = s

            def ms(x):
                return "-" if x is None else f"{100 * x['mean']:.1f}% ({100 * x['min']:.1f}-{100 * x['max']:.1f})"

            forget = s.get("forgetting_best_round")
            rows.append([method + (f" (r={s['rank']})" if s["rank"] else ""), len(mine), ms(s["val_loss_share_at_rounds"]),
                         ms(s["test_loss_share_best_round"]),
                         "-" if forget is None else f"{forget['mean']:+.3f} ({forget['min']:+.3f}..{forget['max']:+.3f})",
                         "-" if s["memory_bytes"] is None else f"{s['memory_bytes'] / 1e6:.1f}",
                         f"{s['mb_per_round']:.2f}", f"{s['client_seconds_per_round']:.1f}"])
        doc["summary"][corpus] = out
        start = doc["corpora"][corpus]["start_scores"]
        tables.append(_common.table(
            ["method", "seeds", f"val loss gain share, round {R} (min-max)", "test gain share at best val round",
             "forgetting: English loss change at best round", "client MB", "MB per round", "client s per round"], rows,
            title=f"{corpus} ({doc['corpora'][corpus]['model']}, {R} rounds): start test loss {start['test']:.3f}"
                  + (f", English loss {start['forget']:.3f}" if start.get("forget") is not None else "")
                  + "; shares of FedAvg's gain in loss, same seed (mean, min-max over seeds)"))
    doc["targets"] = targets(doc["summary"])
    return tables


def _share_at_budget(summary: dict, method: str, ref: str, cost: str) -> float | None:
    """method's validation gain, as a share of FedAvg's gain at FedAvg's last round (the scale of `ref`'s final
    share), once it has spent what `ref` spends in its rounds; `cost` is "client_seconds_per_round" (equal client
    time) or "mb_per_round" (equal total bytes). Linear between rounds, 0 at round 0. None when `method` ran too
    few rounds to spend that much. (A share per round against FedAvg *at that round* would not do: FedAvg's own
    would be 1 at every round.)"""
    m, r = summary.get(method), summary.get(ref)
    if not m or not r or not m.get("val_gain_of_fedavg_final_per_round"):
        return None
    x = r[cost] * r["rounds"] / m[cost]  # rounds of `method` on that budget
    curve = [p["mean"] if p else 0.0 for p in m["val_gain_of_fedavg_final_per_round"]]
    curve[0] = 0.0
    if x > len(curve) - 1:
        return None
    lo = int(x)
    return curve[lo] if lo == x or lo + 1 >= len(curve) else curve[lo] + (curve[lo + 1] - curve[lo]) * (x - lo)


# issue 23: the codec variant the small-GPU recipes ship (per W), against FedAvg and the LoRAs at equal total bytes;
# codec method -> (the same run without codecs, the LoRAs' memory point)
BYTES_METHODS = {"ctx-ad-w2-up4-down4": ("ctx-ad-w2", "w2mem"), "ctx-ad-w4-up4-down4": ("ctx-ad-w4", "w4mem")}


def targets(summary: dict) -> dict:
    out = {}
    for corpus, s in summary.items():
        t = {}
        for W, goal in ((2, 0.95), (4, 0.90)):
            ctx = s.get(f"ctx-ad-w{W}")
            if not ctx:
                continue
            share = ctx["val_loss_share_at_rounds"]["mean"]
            t[f"ctx-ad-w{W} >= {goal:.0%} of FedAvg's gain at equal rounds"] = {"value": share, "met": share >= goal}
            loras = {m: s[m]["val_loss_share_at_rounds"] for m in (f"lora-w{W}mem", f"lora-merged-w{W}mem") if m in s}
            if loras:
                best = max(loras, key=lambda m: loras[m]["mean"])
                spread = max(ctx["val_loss_share_at_rounds"]["max"] - ctx["val_loss_share_at_rounds"]["min"],
                             loras[best]["max"] - loras[best]["min"])
                t[f"ctx-ad-w{W} >= best LoRA at equal memory, equal rounds"] = {
                    "ctx": share, "lora": loras[best]["mean"], "lora_method": best, "spread": spread,
                    "met": share >= loras[best]["mean"], "ahead_by_more_than_spread": share - loras[best]["mean"] > spread}
                tm = _share_at_budget(s, best, f"ctx-ad-w{W}", "client_seconds_per_round")
                t[f"ctx-ad-w{W} >= best LoRA at equal client time"] = {
                    "ctx": share, "lora_at_ctx_time": tm, "met": None if tm is None else share >= tm}
        for method, (plain_method, mem) in BYTES_METHODS.items():
            codec = s.get(method)
            if not codec:
                continue
            share = codec["val_loss_share_at_rounds"]["mean"]
            plain = s.get(plain_method)
            if plain:
                lost = plain["val_loss_share_at_rounds"]["mean"] - share
                t[f"{method} loses <= 2 points of gain share against {plain_method} at equal rounds"] = {
                    "ctx": plain["val_loss_share_at_rounds"]["mean"], "codec": share, "met": lost <= 0.02}
            for other in ["fedavg", *(m for m in (f"lora-{mem}", f"lora-merged-{mem}") if m in s)]:
                at = _share_at_budget(s, other, method, "mb_per_round")
                t[f"{method} >= {other} at equal total bytes"] = {
                    "codec": share, f"{other}_at_codec_bytes": at, "met": None if at is None else share >= at}
        out[corpus] = t
    return out


# ------------------------------------------------------------------------------------------------ main


def _key(r: dict) -> tuple:
    return r["corpus"], r["seed"], r["method"]


def join_runs(doc: dict, theirs: dict) -> None:
    """Add another results document's runs (those this one lacks) and corpora to `doc`."""
    have = {_key(r) for r in doc["runs"]}
    doc["runs"] += [r for r in theirs.get("runs", []) if _key(r) not in have]
    doc["corpora"] = {**theirs.get("corpora", {}), **doc["corpora"]}


def open_results(out: Path, fresh: bool, merge: list, invocation: str) -> dict:
    """The results document to continue: `out`'s runs unless `fresh`, joined with the `merge` files' runs, and
    this command appended to its `invocations` (runs are keyed by corpus, seed and method)."""
    doc = {"runs": [], "corpora": {}, "invocations": []}
    if out.exists() and not fresh:
        old = json.loads(out.read_text())
        doc.update(runs=old.get("runs", []), corpora=old.get("corpora", {}), invocations=old.get("invocations", []))
    doc["invocations"].append(invocation)
    for other in merge:
        theirs = json.loads(Path(other).read_text())
        join_runs(doc, theirs)
        doc["invocations"] = [*theirs.get("invocations", []), *doc["invocations"]]
    return doc


def keep_others(doc: dict, out: Path) -> None:
    """Before writing `out`: keep the runs another process has added to it meanwhile."""
    if out.exists():
        join_runs(doc, json.loads(out.read_text()))


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = Path(a.out) if a.out else _common.RESULTS_DIR / "adapter_comparison.json"
    doc = open_results(out, a.fresh, a.merge, " ".join(["python bench/adapter_comparison.py", *(argv or sys.argv[1:])]))
    doc["settings"] = {k: v for k, v in vars(a).items()
                       if k not in ("cache_dir", "out", "seed_list", "corpus_list", "merge", "corpora")}
    done = {(r["corpus"], r["seed"], r["method"]) for r in doc["runs"]}

    def save():
        keep_others(doc, out)
        tables = summarize(doc)
        _common.write_results("adapter_comparison", doc, out)
        lines = [f"- {c}: {goal}: " + ("met" if t["met"] else "NOT met" if t["met"] is False else "not measured")
                 + " (" + ", ".join(f"{k} {v:.3f}" for k, v in t.items() if isinstance(v, float)) + ")"
                 for c, ts in doc["targets"].items() for goal, t in ts.items()]
        out.with_suffix(".md").write_text("# Rest adapters vs FedAvg vs federated LoRA (bench/adapter_comparison.py)\n"
                                          + "\n".join(tables) + "\n\nTargets (issues 21 and 23):\n\n" + "\n".join(lines) + "\n")

    for corpus in a.corpus_list:
        su = corpus_setup(a, corpus)
        args, state = load_checkpoint(su["ckpt"])
        state = {k: v.float() for k, v in state.items()}
        score = scorer(a, su)
        c = doc["corpora"].setdefault(corpus, {})
        if "ranks" not in c:
            mem = {m: lq.client_memory(state, args, {"slice-mode": "independent", **server_method(a, m)}, a.batch, a.seq)
                   for m in SERVER_METHODS}
            ranks = {m: mc.matched_rank(args, state, mem[ref]["total_bytes"], a.batch, a.seq)
                     for m, ref in LORA_METHODS.items()}
            mem.update({m: mc.lora_memory(args, state, r, a.batch, a.seq) for m, r in ranks.items()})
            c.update({"model": su["model"], "params": sum(t.numel() for t in state.values()), "dim": args.dim,
                      "corpus": su["corpus"], "memory": mem, "ranks": ranks, "start_scores": score(state)})
            print(f"{corpus}: LoRA ranks {ranks}; start {c['start_scores']}", flush=True)
        methods = [m for m in a.methods.split(",") if m] or (METHODS if corpus == "code" else NEAR)
        for seed in a.seed_list:
            for method in methods:
                if (corpus, seed, method) in done:
                    continue
                rounds = su["rounds"]
                if method in LORA_METHODS:
                    rank = c["ranks"][method]
                    lr = a.lora_lr if rank >= 32 else a.lora_lr_small
                    run = lora_merged_run if "merged" in method else lora_fedavg_run
                    r = run(a, su, seed, rank, lr, rounds, score)
                else:
                    r = server_run(a, su, method, seed, score)
                r.update({"corpus": corpus, "method": method, "seed": seed, "rounds": rounds})
                doc["runs"].append(r)
                print(f"  {corpus} seed {seed} {method:18s}: val loss {r['history'][0][1]:.3f} -> "
                      f"{r['history'][-1][1]:.3f} (best round {r['best_round']}), test {r['scores_best']} "
                      f"({rounds} rounds, {r['seconds']:.0f} s)", flush=True)
                save()
    save()
    return doc


if __name__ == "__main__":
    main()
