"""Helpers shared by the bench scripts: results files, tables, peak memory, subprocess isolation.

Every script runs standalone (`python bench/<name>.py`); Python puts bench/ on sys.path, so
`import _common` works from any working directory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from fedtp_flwr.model import ModelArgs, Transformer
from fedtp_flwr.model.sharding import shard_args
from fedtp_flwr.server import memory

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

GB = 1e9
GIB = 2**30


# A CPU-sized model whose parameters dominate training memory, with the 3B's proportions: the output
# projection is ~14% of the split (attention + FFN) parameters (3B: 394M / 2,818M), GQA with 4 query heads
# per kv head (3B: 3), and W = 1, 2, 4 all valid. 230M parameters, 3.7 GB of fp32 AdamW state.
BENCH_MODEL = dict(
    dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=24576, multiple_of=256,
    ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=2048,
)
# The same shape family, small enough for the dry runs in tests (a few seconds).
TINY_BENCH_MODEL = dict(BENCH_MODEL, dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512)


def model_args(name: str) -> ModelArgs:
    """'bench' / 'bench-tiny' (above) or a preset name of fedtp_flwr.model.transformer."""
    from fedtp_flwr.model import preset_args

    if name == "bench":
        return ModelArgs(**BENCH_MODEL)
    if name == "bench-tiny":
        return ModelArgs(**TINY_BENCH_MODEL)
    return preset_args(name)


def param_counts(args: ModelArgs, world_size: int) -> dict[str, int]:
    """Parameters of one rank's slice (meta device, nothing allocated): total, split and replicated."""
    from fedtp_flwr.model.sharding import is_split

    with torch.device("meta"):
        sd = Transformer(shard_args(args, world_size)).state_dict()
    split = sum(t.numel() for k, t in sd.items() if is_split(k))
    total = sum(t.numel() for t in sd.values())
    return {"total": total, "split": split, "replicated": total - split}


class _FlashAttentionSaves(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention when counting on the meta device: saves what the flash
    kernels (CUDA, and torch's CPU flash kernel) save, q, k, v, out and a float32 logsumexp [B, H, T], where
    the meta device would otherwise take the math path and count a [B, H, T, T] attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_like_sdpa(q, k, v, *args, **kwargs):
    return _FlashAttentionSaves.apply(q, k, v)


def activation_profile(args: ModelArgs, batch: int, seq: int, autocast: bool = False,
                       device: str = "meta", model: torch.nn.Module | None = None, chunk_tokens: int = 0) -> list[dict]:
    """What one forward + loss of `args` (float32 weights) on [batch, seq] tokens leaves for backward, per
    block in forward order (tok_embeddings, layers.0, ..., output incl. the final norm and the loss):
    {"block", "saved" (bytes of the tensors autograd saves, each storage once, parameters excluded, counted in
    the block that saves it first), "params" (trainable parameters of the block), "transient" (bytes that
    exist only while backward works on the block: for the loss, the float32 gradients of the logits and of
    the log-softmax, 2 x batch x seq x vocab x 4 B; 0 elsewhere)}.

    On the meta device (default) nothing is allocated; attention is counted as a flash kernel saves it, and
    `autocast` (bf16) is emulated as torch.autocast does it for this model: every nn.Linear casts its input
    and weight to bfloat16 (the weight copies are saved for backward, 2 B per linear parameter), everything
    else keeps its dtype. `device="cpu"` counts a real forward (under real torch.autocast), to check.

    `model`: count this model (on `device`; e.g. a context-mode client model) instead of Transformer(args).
    `chunk_tokens` > 0: the loss as training computes it then (chunked_loss.chunked_token_loss)."""
    from unittest import mock

    from fedtp_flwr.training.chunked_loss import chunked_token_loss

    if model is None:
        with torch.device("meta"):
            model = Transformer(args)
        if device != "meta":
            model = model.to_empty(device=device)
            model.init_weights(0)
    key = (lambda s: s._cdata) if device == "meta" else (lambda s: s.data_ptr())
    params = {key(p.untyped_storage()) for p in model.parameters()}
    blocks = [("tok_embeddings", model.tok_embeddings)] + [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
    blocks.append(("output", model.norm))  # the final norm, the output projection and the loss
    profile = {name: {"block": name, "saved": 0, "params": sum(p.numel() for p in m.parameters()), "transient": 0}
               for name, m in blocks}
    profile["output"]["params"] += model.output.weight.numel()
    profile["output"]["transient"] = 2 * batch * seq * args.vocab_size * 4
    current = ["tok_embeddings"]
    for name, m in blocks:
        m.register_forward_pre_hook(lambda _m, _x, name=name: current.__setitem__(0, name))
    seen: set[int] = set()

    def pack(t):
        s = t.untyped_storage()
        if key(s) not in params and key(s) not in seen:
            seen.add(key(s))
            profile[current[0]]["saved"] += s.nbytes()
        return t

    linear = torch.nn.functional.linear

    def bf16_linear(x, w, b=None):
        return linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16))

    tokens = torch.zeros(batch, seq, dtype=torch.long, device=device)
    with contextlib.ExitStack() as stack:
        if device == "meta":
            sdpa = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_like_sdpa)
            stack.enter_context(sdpa)
            if autocast:
                stack.enter_context(mock.patch.object(torch.nn.functional, "linear", bf16_linear))
        elif autocast:
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        if chunk_tokens:
            loss = chunked_token_loss(model.hidden_states(tokens), model.output, tokens, chunk_tokens)
        else:
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="sum")
    del loss
    return list(profile.values())


def activation_bytes(args: ModelArgs, batch: int, seq: int, autocast: bool = False, device: str = "meta") -> int:
    """Total bytes autograd saves for backward (see activation_profile)."""
    return sum(b["saved"] for b in activation_profile(args, batch, seq, autocast, device))


def training_peak_bytes(profile: list[dict]) -> dict[str, int]:
    """Analytic peak of AdamW training with float32 master weights, from an activation_profile.

    Per trainable parameter: weights 4 B, AdamW exp_avg + exp_avg_sq 8 B (from the first step on), gradients
    4 B (set to None between steps). A step's forward ends with 12 B/param + all saved activations; backward
    walks the blocks in reverse, and while it works on block b, the activations of blocks <= b are alive, the
    gradients of blocks >= b exist, and so do b's transient buffers. So the peak is
        12 P + max(4 P, max_b (saved[0..b] + 4 * params[b..end] + transient[b]))
    Smaller transients (a block's input gradient, kernel workspace) are not counted."""
    params = sum(b["params"] for b in profile)
    best = 4 * params
    for i in range(len(profile)):
        live = (sum(b["saved"] for b in profile[: i + 1]) + 4 * sum(b["params"] for b in profile[i:])
                + profile[i].get("transient", 0))
        best = max(best, live)
    activations = sum(b["saved"] for b in profile)
    return {"params": params, "static": 16 * params, "activations": activations, "peak": 12 * params + best,
            "upper": 16 * params + activations}


def training_flops(args: ModelArgs, world_size: int, seq: int) -> float:
    """Model training FLOPs per token of one rank's slice (no recomputation counted):
    6 x matmul parameters (the split weights and the output projection; the embedding is a lookup)
    + causal attention: QK^T and AV, 2 FLOPs x T x head_dim per head each, x3 for backward, /2 causal."""
    counts = param_counts(args, world_size)
    matmul_params = counts["split"] + args.vocab_size * args.dim
    sub = shard_args(args, world_size)
    return 6 * matmul_params + 6 * sub.n_layers * sub.n_heads * sub.head_dim * seq


# ----------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    return memory.status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) since start or the last reset_peak_rss()."""
    return memory.status_bytes("VmHWM") or 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); a no-op where /proc does not allow it."""
    memory.reset_peak()


def portable_command(cmd: str) -> str:
    """A process's command line without this machine's paths: the program's own name (the first word that is
    not the Python interpreter), then its arguments, e.g. "flower-superlink --host 127.0.0.1 ..."."""
    words = cmd.split()
    start = next((i for i, w in enumerate(words) if not os.path.basename(w).startswith("python")), 0)
    return " ".join([os.path.basename(words[start]), *words[start + 1:]]) if words else cmd


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def touch(t: torch.Tensor, value: float = 0.01) -> torch.Tensor:
    """Write every page of `t` (torch.empty memory is not resident until written)."""
    return t.fill_(value)


# ------------------------------------------------------------------------------------ subprocesses


# glibc malloc keeps freed heap blocks (its mmap threshold grows up to 32 MiB after the first large free),
# so RSS can stay above the live tensor bytes. With a fixed threshold every block >= 64 KiB is mmap'ed and
# returned to the OS when freed: peak RSS then tracks the live bytes.
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(script: Path | str, argv: Sequence[str], timeout: float = 1800, env: dict | None = None,
               stream_stderr: bool = False) -> dict:
    """Run `python script --worker argv...` in a fresh interpreter; it prints one JSON line last. With
    `stream_stderr` its stderr (progress) goes to this process's stderr as it comes, not into the error message."""
    cmd = [sys.executable, str(script), "--worker", *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if stream_stderr else subprocess.PIPE, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env={**os.environ, **(env or {})})
    stderr = "(its stderr is above)" if stream_stderr else proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd)} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {' '.join(cmd)} printed no JSON:\n{proc.stdout[-2000:]}\n{stderr[-2000:]}")
    return json.loads(lines[-1])


def worker_reply(result: dict) -> None:
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ output


def machine_info() -> dict[str, Any]:
    import flwr

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "mem_total_gb": round(_meminfo_total() / GB, 1),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def write_results(name: str, data: dict, out: Path | str | None = None) -> Path:
    """bench/results/<name>.json (or `out`), with the command line, the date, the machine and the script's wall
    time so far (`wall_seconds`, since this process started: what the bench README's "time here" column quotes)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "wall_seconds": round(_dt.datetime.now().timestamp() - _process_start(), 1),
        **data,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    print(f"\nwrote {os.path.relpath(path)}")
    return path


def _process_start() -> float:
    """This process's start time (Linux: /proc/self/stat's starttime after boot), in seconds since the epoch."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    booted = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                  if line.startswith("btime "))
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (readable in a terminal and pasteable into the README); printed and returned."""
    rows = [[_cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines += [f"\n{title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _numeric(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?x?%?", s))


def matplotlib_pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
