"""The measured figures of the README and of docs/ cannot drift from the benchmark results: a figure a page takes
from bench/results is listed here, under the page that quotes it; a re-run benchmark that changes it fails this test
until the page is updated. A quote that is not on its page fails too (naming the page it moved to, if any).

Each quote is a few words of the page with `{}` for each figure, the results file, and per figure a key path and a
formatter that writes the value as the page does. The test formats the values, fills them in and looks for the
text on its page (runs of whitespace, line breaks included, count as one space on both sides).

Key paths: keys joined by dots (a key that holds a dot, such as `llama3.2-3b`, is written as it is); a list is
entered by selecting the one element whose fields have the given values, `rows[model=llama3.2-3b,world_size=2]`.
A figure a page derives from several values names a tuple of paths, and its formatter takes them in order.

Not here: the tables of docs/alternatives.md and docs/bytes-per-round.md, quoted as the benchmarks wrote them
(tests/test_readme_results.py), the configuration tables (tests/test_config.py), the checkpoint sizes and the
first-run log (tests/test_docs.py).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: The pages that quote measured figures: the README and every page of docs/.
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


def fmt(spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[float], str]:
    """format(value * scale, spec) + suffix: fmt(".1f", 1e-9) writes bytes as GB with one decimal."""
    return lambda v: format(v if scale == 1 else v * scale, spec) + suffix


def span(spec: str, scale: float = 1.0) -> Callable[..., str]:
    """'lo-hi' of several values as the README writes a range, or one figure when both ends read the same."""
    def write(*values: float) -> str:
        lo, hi = fmt(spec, scale)(min(values)), fmt(spec, scale)(max(values))
        return lo if lo == hi else f"{lo}-{hi}"
    return write


GB1, GB2 = fmt(".1f", 1e-9), fmt(".2f", 1e-9)
MB0, MB2 = fmt(",.0f", 1e-6), fmt(".2f", 1e-6)
PCT0, PCT1 = fmt(".0f", 100), fmt(".1f", 100)  # shares: 0.9906 -> "99" / "99.1"
X2, X3 = fmt(".2f"), fmt(".3f")
INT = fmt(",")


def gpu_size(v: int | None) -> str:
    return "none" if v is None else f"{v} GB"


def points(a: float, b: float) -> str:
    """Points between two shares, one decimal."""
    return f"{(a - b) * 100:.1f}"


class Quote(NamedTuple):
    text: str
    file: str
    figures: tuple  # (path or tuple of paths, formatter) per {}


def Q(text: str, file: str, *figures: tuple) -> Quote:
    assert text.count("{}") == len(figures), text
    return Quote(text, file, figures)


# ------------------------------------------------------------------------------------------------ the quotes

CM, CMR = "client_memory.json", "client_memory_rest_adapter.json"
MOQ, MOQ43 = "memory_options_quality.json", "memory_options_quality_seed43.json"
LQ, AC, ACH = "learning_quality.json", "adapter_comparison.json", "adapter_comparison_h32.json"
ACC = "adapter_comparison_code_h32.json"
SD = "strategy_defaults.json"
CMM = "client_memory_measured_3b.json"
KVR = "adapter_comparison_kv_replicas_short.json"
G, F4 = (lambda v: f"{v:g}"), (lambda v: f"{v:.4f}")
ACC128 = "adapter_comparison_code_h128.json"
COMM, SS, SM, TR = "communication.json", "server_scaling.json", "server_merge.json", "transport.json"


def _3b(option: str, w: int, field: str = "peak") -> str:
    return f"llama3.2-3b[option={option},world_size={w}].{field}"


def _cm_row(label: str, option: str, file: str = CM, bold: tuple = ()) -> Quote:
    cells = " | ".join("**{}**" if w in bold else "{}" for w in (1, 2, 4, 8))
    return Q(f"| {label} | {cells} |", file, *[(_3b(option, w), GB2) for w in (1, 2, 4, 8)])


def _gpu_row(model: str, w: int) -> Quote:
    row = f"gpu_table[model={model.lower().replace('llama ', 'llama').replace(' ', '-')},world_size={w}]"
    return Q(f"| {model} | {w} | {{}} GB | {{}} | {{}} GB | {{}} |", CM,
             (f"{row}.today_gb", fmt(".1f")), (f"{row}.today_gpu_gb", gpu_size),
             (f"{row}.best_gb", fmt(".1f")), (f"{row}.best_gpu_gb", gpu_size))


def _moq_row(label: str, config: str, points: bool = True) -> Quote:
    s = f"summary.{config}"
    figures = [(f"{s}.final_ppl", X3), (f"{s}.final_vs_fedavg", fmt(".4f", suffix="x")),
               (f"{s}.gain_share", fmt(".0%"))]
    if points:
        figures.append((f"{s}.gain_points_vs_baseline", fmt("+.0f")))
    figures += [(f"{s}.bytes_down", MB2), (f"{s}.bytes_up", MB2)]
    return Q(f"| {label} | {{}} | {{}} | {{}} | {'{}' if points else '-'} | {{}} / {{}} |", MOQ, *figures)


def _lq_row(label: str, w2: str, w4: str, bold: bool = False, download: bool = True, note: str = "",
            spec: str = ".3f") -> Quote:
    b = "**" if bold else ""
    text = f"| {label} | {b}{{}}{b}{note} | {b}{{}}{b} |" + (" {}, {} |" if download else "")
    figures = [(f"summary[config={c}].ratio_to_fedavg_mean", fmt(spec, suffix="x")) for c in (w2, w4)]
    if download:
        figures += [(f"summary[config={c}].down_frac_fp32", fmt(".2f", suffix="x")) for c in (w2, w4)]
    return Q(text, LQ, *figures)


def _val(corpus: str, method: str, file: str = AC) -> str:
    return f"summary.{corpus}.{method}.val_loss_share_at_rounds.mean"


def _final_val_loss(method: str) -> Callable[[list], str]:
    """Mean over seeds of the code corpus's last-round validation loss of `method` (from the runs' histories)."""
    def write(runs: list) -> str:
        losses = [r["history"][-1][1] for r in runs if r["corpus"] == "code" and r["method"] == method]
        assert losses, method
        return f"{sum(losses) / len(losses):.3f}"
    return write


def _comm(w: int, dtype: str) -> str:
    return f"rows[model=llama3.2-3b,world_size={w},wire_dtype={dtype}].down.wire"


def _independent_seed_spread(rows: list[dict]) -> str:
    """The largest final-perplexity spread between seeds of the independent-mode rows."""
    return f"{max(max(r['final_ppl']) - min(r['final_ppl']) for r in rows if r['config'].startswith('ind-')):.2f}"


def _worst_3b_overhead(rows: list[dict]) -> str:
    """How far the 3B's serialized bytes exceed the analytic slice size at worst, either direction."""
    worst = max(max(r["down_over_analytic"], r["up_over_analytic"]) for r in rows if r["model"] == "llama3.2-3b")
    return f"{worst - 1:.3%}"


W2_CTX_AD = tuple(_val(c, "ctx-ad-w2") for c in ("code", "plays", "pydocs"))
W4_CTX_AD = tuple(_val(c, "ctx-ad-w4") for c in ("code", "plays", "pydocs"))

# The README's first-run sample until `python bench/first_run.py` regenerates it from a real `flwr run .`; its lines
# are then held by tests/test_docs.py against bench/results/first_run.log, and these entries can go. Checked only while
# the README marks the sample pending.
MAIN_RUN_SAMPLE = [
    Q("over the in-process grid, {} nodes;", "main_run.json", ("nodes", str)),
    Q("world size {}, rounds 1..{}, outputs in", "main_run.json",
          ("run_config.world-size", str), ("run_config.num-server-rounds", str)),
    Q("round 0: held-out loss {}, perplexity {} ({} tokens)", "main_run.json",
          ("rounds.0.loss", fmt(".4f")), ("rounds.0.perplexity", fmt(".2f")), ("rounds.0.tokens", str)),
    Q("sending {} MB (float32 slices) round 1: {} valid replies, {} MB received round 1: held-out loss {}, "
          "perplexity {} ({} tokens)", "main_run.json",
          ("rounds.1.sent_mb", fmt(".1f")), ("rounds.1.valid_replies", str), ("rounds.1.received_mb", fmt(".1f")),
          ("rounds.1.loss", fmt(".4f")), ("rounds.1.perplexity", fmt(".2f")), ("rounds.1.tokens", str)),
    Q("round 2: held-out loss {}, perplexity {} ({} tokens)", "main_run.json",
          ("rounds.2.loss", fmt(".4f")), ("rounds.2.perplexity", fmt(".2f")), ("rounds.2.tokens", str)),
]

QUOTES_BY_PAGE = {
    "README.md": [
        Q("W=8 {} GB\nagainst {} GB analytic, W=4 {} GB against {} GB)", CMM,
          ("summary.by_world_size.8.measured_gb", fmt(".2f")), ("summary.by_world_size.8.analytic_gb", fmt(".2f")),
          ("summary.by_world_size.4.measured_gb", fmt(".2f")), ("summary.by_world_size.4.analytic_gb", fmt(".2f"))),
        # Which mode to pick: one row per pick (each quote reads one results file), then why
        Q("in int4 | W=2: {} GB without the adapters (fp32 AdamW) |", CM, (_3b("context-int4", 2), GB2)),
        Q("without the adapters (fp32 AdamW) | W=2: {} GB | W=2:", COMM,
          ("matrix[model=llama3.2-3b,world_size=2,layout=context,codec=bf16].total", GB2)),
        Q("| W=2: {}% (three corpora, 3 seeds) |", AC, (W2_CTX_AD, span(".0f", 100))),
        Q("| {} GB GPUs: context slices, every memory option, int4 both ways |", CM,
          (tuple(f"gpu_table[model=llama3.2-3b,world_size={w}].best_gpu_gb" for w in (2, 4, 8)),
           lambda *gb: f"{min(gb)}-{max(gb)}")),
        Q("int4 both ways | {} / {} / {} GB at W=2 / 4 / 8 |", CMR, *[(_3b("best+rest-adapter", w), GB2) for w in (2, 4, 8)]),
        Q("GB at W=2 / 4 / 8 | {} / {} / {} GB |", COMM, *[(f"3b_recipe_round_gb.{w}", X2) for w in (2, 4, 8)]),
        Q("vocabulary rows split + int4 both ways: {}% (pydocs) to {}% (plays) |", AC,
          *[(_val(c, "ctx-ad-w2-vp-up4-down4"), PCT1) for c in ("pydocs", "plays")]),
        Q("DiLoCo's outer step and 200 local steps | {} GB |", CMR, (_3b("best+rest-adapter", 2), GB2)),
        Q("| {} GB, for 10x the local steps |", COMM, ("3b_recipe_round_gb.2", X2)),
        Q("| code, {} local steps: {}%; worse where a run already overfits |", ACC,
          ("settings.local_steps", str), (_val("code", "ctx-ad-w2-up4-down4-diloco-m05"), PCT1)),
        Q("cannot hold even the low-bit rest of the model | W=2: {} GB |", CM, (_3b("today", 2), GB2)),
        Q("| W=2: {} GB | ends at", COMM, ("matrix[model=llama3.2-3b,world_size=2,layout=independent,codec=bf16].total", GB2)),
        Q("ends at {} FedAvg's perplexity, above where it started |", LQ,
          ("summary[config=ind-pr-w2].ratio_to_fedavg_mean", fmt(".3f", suffix="x"))),
        Q("every client holds the whole model | {} GB |", CM, (_3b("today", 1), GB2)),
        Q("| {} GB | 100% |", COMM, ("matrix[model=llama3.2-3b,world_size=1,layout=FedAvg,codec=bf16].total", GB2)),
        Q("bytes ({} GB per 3B round against the recipe's {})", COMM,
          ("matrix[model=llama3.2-3b,layout=federated LoRA r16].total", GB2), ("3b_recipe_round_gb.2", X2)),
        Q("context slices kept {}% of FedAvg's gain against LoRA's {}% at the same client memory", AC,
          (_val("code", "ctx-ad-w2"), PCT1), (_val("code", "lora-w2mem"), PCT1)),
    ],
    "docs/architecture.md": [
        Q("adapters): ctx-ad-w4 kept {}% ({}) of FedAvg's gain in validation loss and ctx-ad-w8 {}% ({})", KVR,
          ("summary.pydocs.ctx-ad-w4.val_loss_share_at_rounds.mean", fmt(".1f", 100)),
          (("summary.pydocs.ctx-ad-w4.val_loss_share_at_rounds.min", "summary.pydocs.ctx-ad-w4.val_loss_share_at_rounds.max"), span(".1f", 100)),
          ("summary.pydocs.ctx-ad-w8.val_loss_share_at_rounds.mean", fmt(".1f", 100)),
          (("summary.pydocs.ctx-ad-w8.val_loss_share_at_rounds.min", "summary.pydocs.ctx-ad-w8.val_loss_share_at_rounds.max"), span(".1f", 100))),
    ],
    "docs/memory.md": [
        Q("local steps on the CPU, peaked at {} GB above the process's pre-build RSS against the analytic {} GB", CMM,
          ("summary.by_world_size.8.measured_gb", fmt(".2f")), ("summary.by_world_size.8.analytic_gb", fmt(".2f"))),
        Q("for the same\nrun at W=8 ({}x), and at {} GB against {} GB at W=4 ({}x)", CMM,
          ("summary.by_world_size.8.ratio", fmt(".3f")), ("summary.by_world_size.4.measured_gb", fmt(".2f")),
          ("summary.by_world_size.4.analytic_gb", fmt(".2f")), ("summary.by_world_size.4.ratio", fmt(".3f"))),
        Q("each W=2 client needs about {} GB", CM, (_3b("today", 2), fmt(".0f", 1e-9))),
        Q("the server holds the fp32 model ({} GB of RAM)", SS, ("3b_analytic_gb.model_gb", fmt(".1f"))),
        Q("every client trains the replicated embeddings and output ({} parameters)", LQ,
          ("wire.llama3.2-3b[world_size=1,wire=float32].replicated_params", fmt(".0f", 1e-6, "M"))),
        Q("(batch {} x {} tokens, int4 context with {}-column groups, chunks of {} tokens)", CM,
          ("table_batch", str), ("table_seq", str), ("3b_best.config.context-group-size", str),
          ("3b_best.config.loss-chunk-tokens", str)),
        _cm_row("today (independent, fp32 weights + AdamW, bf16 autocast, checkpointing)", "today"),
        _cm_row("context int4", "context-int4"),
        _cm_row("+ vocab-parallel", "+vocab-parallel"),
        _cm_row("+ adamw4bit", "+adamw4bit"),
        _cm_row("(adamw8bit in its place)", "+adamw8bit"),
        _cm_row("+ bf16 weights", "+bf16-weights"),
        _cm_row("+ optimizer in backward", "+in-backward"),
        _cm_row("**+ chunked loss, 128-column int4 groups (the recipes)**", "best", bold=(1, 2, 4, 8)),
        _cm_row("the same options on independent slices", "independent-best"),
        _cm_row("**+ rank-16 rest adapters (context mode's default, in the recipes)**", "best+rest-adapter", CMR,
                bold=(2, 4, 8)),
        Q("The targets W=2 <= {} GB, W=4 <= {} GB, W=8 <= {} GB", CM,
          ("summary.goal_3b_gb.2", str), ("summary.goal_3b_gb.4", str), ("summary.goal_3b_gb.8", str)),
        *[_gpu_row("Llama 3.2 3B", w) for w in (1, 2, 4, 8)],
        *[_gpu_row("Llama 3.1 8B", w) for w in (2, 8)],
        _gpu_row("Llama 3.1 70B", 8),
        Q("the same options on independent slices need {} GB at W=8", CM,
          ("llama3.1-70b[option=independent-best,world_size=8].peak", GB1)),
        Q("came out {}x to {}x the analytic figure", CM,
          ("rows", lambda rows: f"{min(r['measured_over_analytic'] for r in rows):.3f}"),
          ("rows", lambda rows: f"{max(r['measured_over_analytic'] for r in rows):.3f}")),
        Q("a model whose embeddings + output are {} of it (`bytes-small` with a {}-token BPE vocabulary", MOQ,
          ("pretrain.embeddings_output_share", fmt(".0%")), ("pretrain.settings.params.vocab_size", INT)),
        Q("with `tokenizers`; the 3B: {}), pretrained", LQ,
          ("wire.llama3.2-3b[world_size=1,wire=float32]", lambda r: f"{r['replicated_params'] / r['full_params']:.2%}")),
        Q("fine-tuned on 4 non-IID clients for {} rounds x {} steps", MOQ,
          ("settings.rounds", str), ("settings.local_steps", str)),
        Q("Start perplexity {} (seed {}):", MOQ, ("summary.fedavg.start_ppl", X3), ("settings.seed", str)),
        _moq_row("FedAvg (full model)", "fedavg", points=False),
        _moq_row("context int4, W=2 (baseline)", "ctx4-w2", points=False),
        _moq_row("+ vocab-parallel", "ctx4-w2+vocab"),
        _moq_row("+ adamw8bit", "ctx4-w2+8bit"),
        _moq_row("+ adamw4bit", "ctx4-w2+4bit"),
        _moq_row("+ bf16 weights", "ctx4-w2+bf16"),
        _moq_row("+ optimizer in backward (no clipping)", "ctx4-w2+in-bwd"),
        _moq_row("+ chunked loss", "ctx4-w2+chunk"),
        _moq_row("**all of them (the recipes), W=2**", "best-w2"),
        _moq_row("context int4, W=4 (baseline)", "ctx4-w4", points=False),
        _moq_row("**all of them, W=4**", "best-w4"),
        Q("main rows): baseline W=2 {}, + vocab-parallel {}, all options {}; W=4 {} -> {}.", MOQ43,
          *[(f"summary.{c}.gain_share", fmt(".0%"))
            for c in ("ctx4-w2", "ctx4-w2+vocab", "best-w2", "ctx4-w4", "best-w4")]),
        Q("At 70B the frozen int4 context alone is {} GB per client at W=8", CM,
          ("llama3.1-70b[option=best,world_size=8].rest", GB1)),
        *[Q(f"| {label} | {{}} | {{}} |", CM, (_3b("today", w, "params"), INT),
            (tuple(_3b("today", w, part) for part in ("weights", "grads", "state")),
             lambda *b: f"{sum(b) / 1e9:.1f} GB ({sum(b) / 2**30:.1f} GiB)"))
          for label, w in (("1 (full model)", 1), ("2", 2), ("4", 4), ("8", 8))],
        Q("Each slice still carries the full {} replicated embedding and output parameters", LQ,
          ("wire.llama3.2-3b[world_size=1,wire=float32].replicated_params", fmt(".0f", 1e-6, "M"))),
        Q("W=2 needs about {} GB, not the seed's 24 GB", CM, (_3b("today", 2), fmt(".0f", 1e-9))),
        Q("(below: {} GB at W=2). A server that only holds the model needs {} GB in fp32 ({} GB in bf16)", CM,
          (_3b("best", 2), GB1), (_3b("today", 1, "weights"), GB1), (_3b("today", 1, "weights"), fmt(".1f", 0.5e-9))),
    ],
    "docs/slice-modes.md": [
        Q("The client uploads the factors beside its slice ({} values at 3B W=2, under 1% of its {}-value slice", CMR,
          ((_3b("best+rest-adapter", 2, "params"), _3b("best", 2, "params")), lambda a, b: f"{(a - b) / 1e6:.1f}M"),
          (_3b("best", 2, "params"), fmt(".2f", 1e-9, "B"))),
        Q("costs {} points of FedAvg's gain on code and {} on pydocs and gains {} on the plays", AC,
          ((_val("code", "ctx-ad-w2"), _val("code", "ctx-ad-w2-vp")), points),
          ((_val("pydocs", "ctx-ad-w2"), _val("pydocs", "ctx-ad-w2-vp")), points),
          ((_val("plays", "ctx-ad-w2-vp"), _val("plays", "ctx-ad-w2")), lambda a, b: f"{(a - b) * 100:.0f}")),
        Q("(`bytes-small`, {} parameters, {} split) on 4 non-IID clients (one Shakespeare play each), {} rounds x {} "
          "local steps", LQ,
          ("model.params", fmt(".1f", 1e-6, "M")),
          ("wire.bytes-small[world_size=1,wire=float32]",
           lambda r: f"{1 - r['replicated_params'] / r['full_params']:.0%}"),
          ("settings.rounds", str), ("settings.local_steps", str)),
        Q("Start {}; full-model FedAvg ends at {}.", LQ,
          ("summary[config=fedavg].start_ppl", X3), ("summary[config=fedavg].final_ppl_mean", X3)),
        _lq_row("independent, per-rank merge", "ind-pr-w2", "ind-pr-w4", note=" (worse than the start)"),
        _lq_row("independent, all-clients merge", "ind-ac-w2", "ind-ac-w4"),
        _lq_row("independent + rank swapping", "ind-pr-w2-swap", "ind-pr-w4-swap"),
        _lq_row("context int8, all-clients", "ctx8-ac-w2", "ctx8-ac-w4", bold=True),
        _lq_row("context int4, all-clients", "ctx4-ac-w2", "ctx4-ac-w4", bold=True),
        _lq_row("context int8, per-rank merge", "ctx8-pr-w2", "ctx8-pr-w4", note=" (diverging)", spec=".2f"),
        Q("Seed spread of the final perplexity: {} (FedAvg) to {} (independent).", LQ,
          ("summary[config=fedavg].final_ppl", lambda p: f"{max(p) - min(p):.3f}"),
          ("summary", _independent_seed_spread)),
        Q("embeddings and output ({} parameters, {} of the model)", LQ,
          ("wire.llama3.2-3b[world_size=1,wire=float32].replicated_params", fmt(".0f", 1e-6, "M")),
          ("wire.llama3.2-3b[world_size=1,wire=float32]",
           lambda r: f"{r['replicated_params'] / r['full_params']:.2f}x")),
        Q("context int4 downloads {} (W=2) and {} (W=4) of the fp32 model in bf16, {} and {} with fp32 slices", LQ,
          *[(f"wire.llama3.2-3b[world_size={w},mode=context,context_bits=4,wire={d}].down_frac_fp32",
             fmt(".2f", suffix="x")) for d in ("bfloat16", "float32") for w in (2, 4)]),
    ],
    "docs/alternatives.md": [
        Q("Three corpora, 4 non-IID nodes, {} local steps of {} x {} tokens per round, 3 seeds ({}) for the main rows",
          AC, ("settings.local_steps", str), ("settings.batch", str), ("settings.seq", str),
          ("settings.seeds", lambda s: s.replace(",", ", "))),
        Q("(near domain, {} rounds)", AC, ("settings.rounds", str)),
        Q("(far domain, continued pre-training, {} rounds)", AC, ("settings.code_rounds", str)),
        Q("code (bytes-small, {} rounds): start test loss {}, English loss {};", AC,
          ("settings.code_rounds", str), ("corpora.code.start_scores.test", X3), ("corpora.code.start_scores.forget", X3)),
        Q("plays (bpe-small, {} rounds): start test loss {};", AC,
          ("settings.rounds", str), ("corpora.plays.start_scores.test", X3)),
        Q("pydocs (bytes-small, {} rounds): start test loss {};", AC,
          ("settings.rounds", str), ("corpora.pydocs.start_scores.test", X3)),
        Q("at W=2 {}% of its gain at equal rounds, at W=4 {}%", AC,
          (W2_CTX_AD, span(".0f", 100)), (W4_CTX_AD, span(".0f", 100))),
        Q("on the code corpus without the adapter: {}% against {}% with it", AC,
          (_val("code", "ctx-w2"), PCT1), (_val("code", "ctx-ad-w2"), PCT1)),
        Q("at both memory points: {}% against {}% at W=2 (five times the seeds' spread), {}% against", AC,
          (_val("code", "ctx-ad-w2"), PCT1), (_val("code", "lora-w2mem"), PCT1), (_val("code", "ctx-ad-w4"), PCT1)),
        Q("forget less English than FedAvg (+{} against +{} in loss; the merged LoRA forgets least, +{} to +{})", AC,
          *[(f"summary.code.{m}.forgetting_best_round.mean", X2)
            for m in ("ctx-ad-w2", "fedavg", "lora-merged-w4mem", "lora-merged-w2mem")]),
        Q("ahead of both LoRAs at W=2 ({}% against {}%) and tie at W=4 ({}% against {}%, within the spread)", AC,
          *[(_val("pydocs", m), PCT1) for m in ("ctx-ad-w2", "lora-w2mem", "ctx-ad-w4", "lora-w4mem")]),
        Q("**LoRA beats context slices with the default options**: {}% (merged LoRA) against {}% at W=2, {}% against "
          "{}% at W=4.", AC,
          *[(_val("plays", m), PCT1) for m in ("lora-merged-w2mem", "ctx-ad-w2", "lora-merged-w4mem", "ctx-ad-w4")]),
        Q("turns that around on the plays, {}% ({}-{}) against LoRA's {}%, but costs {} points on pydocs ({}%) and {} "
          "on code ({}%)", AC,
          (_val("plays", "ctx-ad-w2-vp"), PCT1),
          ("summary.plays.ctx-ad-w2-vp.val_loss_share_at_rounds.min", PCT1),
          ("summary.plays.ctx-ad-w2-vp.val_loss_share_at_rounds.max", PCT1),
          (_val("plays", "lora-merged-w2mem"), PCT1),
          ((_val("pydocs", "ctx-ad-w2"), _val("pydocs", "ctx-ad-w2-vp")), points), (_val("pydocs", "ctx-ad-w2-vp"), PCT1),
          ((_val("code", "ctx-ad-w2"), _val("code", "ctx-ad-w2-vp")), points), (_val("code", "ctx-ad-w2-vp"), PCT1)),
        Q("keep {}% (plays), {}% (pydocs) and {}% (code) of FedAvg's gain against {}%, {}% and {}% uncompressed, at {}x "
          "and {}x of the bytes per round; int8 down costs nothing measurable ({}%). At W=4 the codecs keep {}% (plays), "
          "{}% (pydocs) and {}% (code) against {}%, {}% and {}%. The recipes' full option set (vocabulary rows split + "
          "both codecs) keeps {}% on the plays and {}% on pydocs.", AC,
          *[(_val(c, "ctx-ad-w2-up4-down4"), PCT1) for c in ("plays", "pydocs", "code")],
          *[(_val(c, "ctx-ad-w2"), PCT1) for c in ("plays", "pydocs", "code")],
          *[((f"summary.{c}.ctx-ad-w2-up4-down4.mb_per_round", f"summary.{c}.ctx-ad-w2.mb_per_round"),
             lambda a, b: f"{a / b:.2f}") for c in ("plays", "pydocs")],
          (_val("plays", "ctx-ad-w2-up4-down8"), PCT1),
          *[(_val(c, "ctx-ad-w4-up4-down4"), PCT1) for c in ("plays", "pydocs", "code")],
          *[(_val(c, "ctx-ad-w4"), PCT1) for c in ("plays", "pydocs", "code")],
          (_val("plays", "ctx-ad-w2-vp-up4-down4"), PCT1), (_val("pydocs", "ctx-ad-w2-vp-up4-down4"), PCT1)),
        Q("plays {}% against FedAvg's {}% and LoRA's {}% on the same bytes", AC,
          (_val("plays", "ctx-ad-w2-up4-down4"), PCT1),
          ("targets.plays.ctx-ad-w2-up4-down4 >= fedavg at equal total bytes.fedavg_at_codec_bytes", PCT1),
          ("targets.plays.ctx-ad-w2-up4-down4 >= lora-w2mem at equal total bytes.lora-w2mem_at_codec_bytes", PCT1)),
        Q("memory-matched (ranks {} on these small models)", AC,
          ("corpora", lambda cs: span("d")(*[r for c in cs.values() for r in c["ranks"].values()]))),
        Q("against the recipe's {} GB", COMM, ("3b_recipe_round_gb.2", X2)),
        Q("on pydocs it overtakes FedAvg ({}%), on the plays it overshoots into overfitting ({}% at round {}; the "
          "best-validation checkpoint keeps {}%)", AC,
          (_val("pydocs", "ctx-ad-w2-up4-down4-diloco"), PCT1), (_val("plays", "ctx-ad-w2-up4-down4-diloco"), PCT0),
          ("settings.rounds", str), ("summary.plays.ctx-ad-w2-up4-down4-diloco.test_loss_share_best_round.mean", PCT0)),
        Q("at {} local steps per round (the paper's outer lr 0.7", AC, ("settings.local_steps", str)),
        Q("The outer step at lr 1.0 / momentum 0.5 keeps {}% of FedAvg's gain (the codecs without it {}%, federated LoRA "
          "{}%) and forgets more English ({} in loss against {}): its validation loss after 160 steps, {}, is below", ACC,
          (_val("code", "ctx-ad-w2-up4-down4-diloco-m05"), PCT1), (_val("code", "ctx-ad-w2-up4-down4"), PCT1),
          (_val("code", "lora-w2mem"), PCT1),
          ("summary.code.ctx-ad-w2-up4-down4-diloco-m05.forgetting_best_round.mean", fmt("+.2f")),
          ("summary.code.fedavg.forgetting_best_round.mean", fmt("+.2f")),
          ("runs", _final_val_loss("ctx-ad-w2-up4-down4-diloco-m05"))),
        Q("FedAvg's after 20 rounds of 8 steps ({}) at 4x fewer rounds", AC, ("runs", _final_val_loss("fedavg"))),
        Q("At {} local steps per round ({} rounds, one seed,", ACC128,
          ("settings.local_steps", str), ("settings.code_rounds", str)),
        Q("it still leads: {}% against {}% for the codecs without it (validation loss {} against FedAvg's {})", ACC128,
          (_val("code", "ctx-ad-w2-up4-down4-diloco-m05"), PCT1), (_val("code", "ctx-ad-w2-up4-down4"), PCT1),
          ("runs", _final_val_loss("ctx-ad-w2-up4-down4-diloco-m05")), ("runs", _final_val_loss("fedavg"))),
        Q("With {} local steps per round ({} rounds, one seed,", ACH,
          ("settings.local_steps", str), ("settings.rounds", str)),
        Q("pydocs {}% (momentum 0.5 at lr 1.0: {}%) against {}% without the outer step; the plays again overfit ({}% and "
          "{}%)", ACH,
          *[(_val(c, m, ACH), PCT1) for c, m in (("pydocs", "ctx-ad-w2-up4-down4-diloco"),
                                                 ("pydocs", "ctx-ad-w2-up4-down4-diloco-m05"),
                                                 ("pydocs", "ctx-ad-w2-up4-down4"),
                                                 ("plays", "ctx-ad-w2-up4-down4-diloco"),
                                                 ("plays", "ctx-ad-w2-up4-down4-diloco-m05"))]),
        Q("training every weight pays off there, {}% of FedAvg's gain against LoRA's {}%", AC,
          (_val("code", "ctx-ad-w2"), PCT0), (_val("code", "lora-w2mem"), PCT1)),
        Q("{}% against {}% at W=4", AC, (_val("code", "ctx-ad-w4"), PCT1), (_val("code", "lora-w4mem"), PCT1)),
    ],
    "docs/bytes-per-round.md": [
        Q("under 2 points of FedAvg's gain ({}%, {}% and {}% against {}%, {}% and {}% uncompressed on the plays", AC,
          *[(_val(c, "ctx-ad-w2-up4-down4"), PCT1) for c in ("plays", "pydocs", "code")],
          *[(_val(c, "ctx-ad-w2"), PCT1) for c in ("plays", "pydocs", "code")]),
        Q("in int4 whatever the codec (the 3B's {} GB floor)", COMM,
          ("matrix[model=llama3.2-3b,world_size=2,layout=context,codec=int4].down", GB2)),
        Q("the 3B recipe still moves {}x federated LoRA's bytes ({} GB against {} at W=2)", COMM,
          (("3b_recipe_round_gb.2", "matrix[model=llama3.2-3b,layout=federated LoRA r16].total"),
           lambda gb, lora: f"{gb * 1e9 / lora:.0f}"),
          ("3b_recipe_round_gb.2", X2), ("matrix[model=llama3.2-3b,layout=federated LoRA r16].total", GB2)),
        Q("at W=2 a round moves {} GB per client instead of {}", COMM,
          ("recipes[world_size=2,recipe=True].total", GB2), ("recipes[world_size=2,variant=bf16 both ways].total", GB2)),
        Q("a W=2 slice is {} GB in float32 and {} GB in bfloat16", COMM,
          (_comm(2, "float32"), GB1), (_comm(2, "bfloat16"), GB1)),
    ],
    "docs/server-memory.md": [
        Q("what Flower's push adds while it deflates it (~{} R)", SS, ("3b_analytic_gb.push_factor_p", fmt(".1f"))),
        Q("(Flower's `pull_messages` holds a reply about {} times over; ours {} times, `bench/transport.py`)", TR,
          ("by_pull.flower.pull_added_rss_per_byte", fmt(".1f")), ("by_pull.fedtp.pull_added_rss_per_byte", X2)),
        Q("and one reply ({} R)", SS, ("3b_analytic_gb.pull_factor_q", X2)),
        Q("vocabulary x 4 B: {} GB with the 3B recipe)", SS, ("3b_analytic_gb.eval_activations_gb", fmt(".1f"))),
        Q("(`nice -n 10 python bench/server_scaling.py`: a {} model, W={}, bfloat16 replies, {} rounds", SS,
          ("model_bytes", fmt(".0f", 1 / 4e6, "M")), ("world_size", str),
          ("runs[clients=2].received_mb_per_round", lambda rounds: str(len(rounds)))),
        Q("the ServerApp's peak RSS is {} / {} / {} GB with 2 / 4 / 8 clients (max / min {}; the aim was 1.15)", SS,
          *[(f"peak_rss_bytes.{n}", GB2) for n in (2, 4, 8)], ("peak_ratio", X3)),
        Q("predicts {} GB; the measured peaks are {}x that, a fixed {} GB of the process", SS,
          ("accounting_vs_measured[clients=2].predicted_bytes", GB2),
          ("accounting_vs_measured", lambda rows: span(".2f")(*[r["measured_vs_predicted"] for r in rows])),
          ("accounting_vs_measured",
           lambda rows: span(".2f", 1e-9)(*[r["measured_bytes"] - r["predicted_bytes"] for r in rows]))),
        Q("the same accounting gives {} GB at the peak (receiving and merging; sending {} GB, evaluating {} GB), {}x the "
          "float32 model (aim: 3x = {} GB), whatever the number of clients; scaled up by the worst measured fit it is "
          "{} GB. Before streaming it was {} / {} / {} GB for 2 / 4 / 8 clients.", SS,
          ("3b_analytic_gb.server_peak_gb", fmt(".1f")), ("3b_analytic_gb.phases_gb.sending", fmt(".1f")),
          ("3b_analytic_gb.phases_gb.evaluating", fmt(".1f")), ("3b_analytic_gb.server_peak_vs_model", X2),
          ("3b_analytic_gb.budget_gb", fmt(".1f")), ("3b_analytic_gb.server_peak_gb_scaled_by_worst_fit", fmt(".1f")),
          *[(f"3b_analytic_gb.before_streaming_gb.{n}", fmt(".0f")) for n in (2, 4, 8)]),
    ],
    "docs/strategies.md": [  # bench/strategy_defaults.py: the measured server-side defaults
        Q("sweeps {} settings over", SD, ("rows", len)),
        Q("(from {}) |", SD, ("rows[strategy=fedavg].loss", lambda l: f"{l[0]:.4f}")),
        Q("| `fedavg`, `fedprox` | no server step | {} |", SD, ("rows[strategy=fedavg].loss", lambda l: f"{l[-1]:.4f}")),
        Q("| `fedavgm` | lr {}, momentum {} | {} |", SD, ("chosen.fedavgm.server-learning-rate", G),
          ("chosen.fedavgm.server-momentum", G), ("chosen.fedavgm.final_loss", F4)),
        Q("| `diloco` | lr {}, Nesterov momentum {} | {} |", SD, ("chosen.diloco.server-learning-rate", G),
          ("chosen.diloco.server-momentum", G), ("chosen.diloco.final_loss", F4)),
        Q("| `fedadam` | eta 30 x `learning-rate` ({} at the default 0.001) | {} |", SD,
          ("chosen.fedadam.server-learning-rate", G), ("chosen.fedadam.final_loss", F4)),
        Q("| `fedyogi` | eta 30 x `learning-rate` | {} |", SD, ("chosen.fedyogi.final_loss", F4)),
        Q("| `fedadagrad` | eta 10 x `learning-rate` | {} |", SD, ("chosen.fedadagrad.final_loss", F4)),
        Q("3 rounds 1.0 / 0.9 is best, {}, then 0.7 / 0.9, {}, then 1.0 / 0.5, {}, so", SD,
          ("rows[strategy=diloco,server_learning_rate=1.0,server_momentum=0.9].loss", lambda l: f"{l[-1]:.4f}"),
          ("rows[strategy=diloco,server_learning_rate=0.7,server_momentum=0.9].loss", lambda l: f"{l[-1]:.4f}"),
          ("rows[strategy=diloco,server_learning_rate=1.0,server_momentum=0.5].loss", lambda l: f"{l[-1]:.4f}")),
    ],
    "docs/robustness.md": [
        Q("({} GB per 3B W=2 bf16 reply)", SS, ("3b_analytic_gb.reply_gb", fmt(".1f"))),
    ],
    "docs/benchmarks.md": [
        Q("W=1 (FedAvg) {} MB fp32; W=2 {} MB fp32", COMM, (_comm(1, "float32"), MB0), (_comm(2, "float32"), MB0)),
        Q("MB fp32 / {} MB bf16; W=4 {} / {}; W=8 {} / {} (each direction); within {} of the analytic slice size", COMM,
          (_comm(2, "bfloat16"), MB0), (_comm(4, "float32"), MB0), (_comm(4, "bfloat16"), MB0),
          (_comm(8, "float32"), MB0), (_comm(8, "bfloat16"), MB0),
          ("rows", _worst_3b_overhead)),
        Q("3B: {} / {} / {} GB at W=2 / 4 / 8 today, {} / {} / {} GB with the small-GPU recipes; measured within {} of "
          "the analytic figure", CM,
          *[(_3b("today", w), GB1) for w in (2, 4, 8)], *[(_3b("best", w), GB1) for w in (2, 4, 8)],
          ("summary.max_abs_deviation", fmt(".1%"))),
        Q("| learning quality of the memory options ({} embeddings model)", MOQ,
          ("pretrain.embeddings_output_share", fmt(".0%"))),
        Q("| {} GB slices through a real SuperLink + SuperNode", TR, ("server_app.tensor_bytes", fmt(".0f", 1e-9))),
        Q("a W=2 step takes {}x the full model's time, W=4 {}x", "train_throughput.json",
          ("rows[world_size=2].time_ratio_vs_full", X2), ("rows[world_size=4].time_ratio_vs_full", X2)),
        Q("| {} s (extrapolated to {} layers), {}x a copy of the model into float32; {}x a bfloat16 copy; peak RSS {}x "
          "(model + received slices)", SM,
          ("rows[op=aggregate].seconds", fmt(".0f")), ("rows[op=aggregate].layers", str),
          ("summary.aggregate_time_vs_copy_float32", X2), ("summary.aggregate_time_vs_copy", fmt(".1f")),
          ("summary.aggregate_peak_vs_nominal", X2)),
        Q("round trip {} s; serialized bytes {}x the array bytes; bf16 echo exact; pulling a reply adds {} B per byte to "
          "the ServerApp with Flower's `pull_messages`, {} B with `fedtp_flwr.server.pull`; {} B per byte across all "
          "Flower processes", TR,
          (("by_pull.fedtp.round_trip_seconds", "by_pull.flower.round_trip_seconds"), span(".0f")),
          (("server_app.down_object_bytes", "server_app.payload_bytes"), lambda a, b: f"{a / b:.5f}"),
          ("by_pull.flower.pull_added_rss_per_byte", X2), ("by_pull.fedtp.pull_added_rss_per_byte", X2),
          (("all_processes_rss_peak", "server_app.payload_bytes"), lambda a, b: f"{a / b:.1f}")),
        Q("ServerApp peak {} / {} / {} GB with 2 / 4 / 8 clients (max / min {}, aim 1.15); 3B W=2 bf16 by the same "
          "accounting: {} GB, {}x the float32 model", SS,
          *[(f"peak_rss_bytes.{n}", GB2) for n in (2, 4, 8)], ("peak_ratio", X3),
          ("3b_analytic_gb.server_peak_gb", fmt(".1f")), ("3b_analytic_gb.server_peak_vs_model", X2)),
        Q("its {} runs took {} min on 2 shared cores, {} min with setup and timing", "method_comparison.json",
          ("runs", lambda runs: str(len(runs))), ("runs", lambda runs: f"{sum(r['seconds'] for r in runs) / 60:.0f}"),
          ("total_seconds", fmt(".0f", 1 / 60))),
        Q("context W=2: {}% of FedAvg's gain at equal rounds; LoRA at the same client memory {}%",
          "method_comparison.json",
          (("summary.plays.ctx-w2.gain_share_mean", "summary.pydocs.ctx-w2.gain_share_mean"), span(".0f", 100)),
          (("summary.plays.lora-w2mem.gain_share_mean", "summary.pydocs.lora-w2mem.gain_share_mean"), span(".0f", 100))),
        Q("W=2: {}% of FedAvg's gain on every corpus (3 seeds); ahead of the best LoRA on code ({}% vs {}%)", AC,
          (W2_CTX_AD, span(".0f", 100)), (_val("code", "ctx-ad-w2"), PCT1), (_val("code", "lora-w2mem"), PCT1)),
        Q("the server's merge takes {}x a bfloat16 copy's time and {}x (model + received slices) of memory", SM,
          ("summary.aggregate_time_vs_copy", fmt(".1f")), ("summary.aggregate_peak_vs_nominal", X2)),
        Q("Against a copy into float32 it takes {}x the time", SM, ("summary.aggregate_time_vs_copy_float32", X2)),
    ],
}
QUOTES = [(page, q) for page, quotes in QUOTES_BY_PAGE.items() for q in quotes]


# ------------------------------------------------------------------------------------------------ the machinery

class KeyPathError(LookupError):
    pass


def resolve(doc: Any, path: str) -> Any:
    """The value at `path` (see the module docstring): `a.b`, `a[field=value,...].b`; a dict key may hold dots."""
    tokens = re.findall(r"\[[^\]]*\]|[^.\[]+", path)
    obj, i = doc, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("["):
            if not isinstance(obj, list):
                raise KeyPathError(f"{path}: {tok} selects from a list, found {type(obj).__name__}")
            want = dict(kv.split("=", 1) for kv in tok[1:-1].split(","))
            hits = [e for e in obj if isinstance(e, dict) and all(str(e.get(k)) == v for k, v in want.items())]
            if len(hits) != 1:
                raise KeyPathError(f"{path}: {tok} matches {len(hits)} elements, not 1")
            obj, i = hits[0], i + 1
            continue
        if not isinstance(obj, dict):
            raise KeyPathError(f"{path}: key {tok!r} on a {type(obj).__name__}")
        j = i  # the longest run of dot-joined names that is a key: `llama3.2-3b` is one key
        for k in range(len(tokens), i, -1):
            name = ".".join(tokens[i:k])
            if "[" not in name and name in obj:
                obj, j = obj[name], k
                break
        if j == i:
            raise KeyPathError(f"{path}: no key {tok!r} (keys: {', '.join(map(str, list(obj)[:12]))})")
        i = j
    return obj


def _norm(text: str) -> str:
    return " ".join(text.split())


@functools.cache
def _doc(file: str) -> Any:
    return json.loads((RESULTS / file).read_text(encoding="utf-8"))


def _figures(quote: Quote) -> list[tuple[Any, str]]:
    """(raw value or values, formatted) for each figure of the quote."""
    out = []
    for paths, write in quote.figures:
        values = [resolve(_doc(quote.file), p) for p in (paths if isinstance(paths, tuple) else (paths,))]
        out.append((values if isinstance(paths, tuple) else values[0], write(*values)))
    return out


def _id(item: tuple[str, Quote]) -> str:
    page, quote = item
    words = re.sub(r"[*`|]", "", quote.text.replace("{}", "#"))
    return f"{page} <- {quote.file}: {_norm(words)[:60]}"


@functools.cache
def _page(page: str) -> str:
    return _norm((ROOT / page).read_text(encoding="utf-8"))


def _sample_pending() -> bool:
    return "<!-- first-run sample: pending -->" in (ROOT / "README.md").read_text(encoding="utf-8")


def _checked() -> list[tuple[str, Quote]]:
    return QUOTES + ([("README.md", q) for q in MAIN_RUN_SAMPLE] if _sample_pending() else [])


@pytest.mark.parametrize("item", _checked(), ids=_id)
def test_the_page_quotes_the_results_file(item: tuple[str, Quote]):
    page, quote = item
    figures = _figures(quote)
    expected = _norm(quote.text.format(*(f for _, f in figures)))
    text = _page(page)
    if expected not in text:
        elsewhere = [p for p in PAGES if p != page and expected in _page(p)]
        head = _norm(quote.text.split("{}")[0])
        at = text.find(head) if head else -1
        found = text[at:at + len(expected) + 20] if at >= 0 else "(not even the words before the first figure)"
        sources = "; ".join(f"{p} = {v!r}" for (p, _), (v, _) in zip(quote.figures, figures))
        moved = f"\n(the quote is in {', '.join(elsewhere)}: move its entry there)" if elsewhere else ""
        pytest.fail(f"{page} should say\n  {expected}\nfrom bench/results/{quote.file} ({sources});"
                    f"\nit says\n  {found}{moved}")


@pytest.mark.parametrize("item", QUOTES + [("README.md", q) for q in MAIN_RUN_SAMPLE], ids=_id)
def test_every_key_path_resolves(item: tuple[str, Quote]):
    page, quote = item
    assert (ROOT / page).is_file(), f"{_id(item)}: {page} is missing"
    assert (RESULTS / quote.file).is_file(), f"{_id(item)}: bench/results/{quote.file} is missing"
    for paths, _ in quote.figures:
        for path in paths if isinstance(paths, tuple) else (paths,):
            try:
                resolve(_doc(quote.file), path)
            except KeyPathError as e:
                pytest.fail(f"{_id(item)}: bench/results/{quote.file}: {e}")


def test_resolve_reads_dotted_keys_and_selections():
    doc = {"llama3.2-3b": [{"w": 1, "v": "a"}, {"w": 2, "v": "b"}], "x": {"2": 7}}
    assert resolve(doc, "llama3.2-3b[w=2].v") == "b" and resolve(doc, "x.2") == 7
    with pytest.raises(KeyPathError, match="matches 0"):
        resolve(doc, "llama3.2-3b[w=3].v")
    with pytest.raises(KeyPathError, match="no key"):
        resolve(doc, "y")
