"""Checking a client's reply before anything of it reaches the global model or the logs.

A training reply is accepted only if it is not an error and holds exactly two records: an ArrayRecord
"arrays" whose keys are exactly the slice the node was sent, each Array's declared dtype and shape, and its
.npy header's, equal to the expected wire dtype and shape, with only finite values; and a MetricRecord
"metrics" whose num-examples (local training examples) is an integer in [1, max-num-examples] and whose known
metrics (below) are finite numbers. An evaluation reply (client-eval) holds exactly one MetricRecord "metrics",
checked the same way, with num-tokens (the held-out target tokens it scored) as its weight. Anything else raises ReplyError with the reason; the strategy logs it and drops the reply.

Metrics are reduced here, from the known keys of checked replies only (unknown keys are ignored): no
client's records are handed to code that could throw on them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedtp_flwr.model.context import adapter_pairs, adapter_update_sq_norm
from fedtp_flwr.wire import NUMPY_DTYPE, decode, decode_delta

from .aggregation import blocks

# Metrics this project's client sends (besides the weight key), and that the server averages.
# slice-parameters: the parameters this client received, trained and uploaded (its slice, never the model).
TRAIN_METRICS = ("train-loss", "train-perplexity", "num-tokens", "tokens-per-second", "slice-parameters")
TRAIN_WEIGHT, EVAL_WEIGHT = "num-examples", "num-tokens"  # the key each reply is weighted by
EVAL_METRICS = ("slice-loss", "slice-perplexity")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class ReplyError(ValueError):
    pass


def safe_text(text: object, limit: int = 500) -> str:
    """A client's (or a file's) text as one short, printable line: control and non-ASCII characters escaped,
    cut to `limit` characters with the number of characters left out."""
    s = str(text)
    cut = s[:limit]
    out = cut.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)
    return out + (f"... ({len(s) - limit} more characters)" if len(s) > limit else "")


# How Flower words an exception it caught in a ClientApp: "<class 'pkg.mod.Type'>:<'message'>". In simulation the
# exception is Ray's, and its message is the ClientApp's whole remote traceback (ANSI colours included).
_FLOWER_REASON = re.compile(r"<class '(?P<type>[^']+)'>:<'(?P<message>.*)'>", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The last line of a Python traceback: "pkg.mod.Type: message" at the start of a line.
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*): (?P<message>\S.*)$")
_WRAPPERS = ("ClientAppException", "RayTaskError")  # exceptions Flower and Ray wrap the ClientApp's in


def error_cause(reason: object) -> str:
    """A client's error reason as the one line that says what went wrong, e.g. "DataError: /data/a.jsonl:3: invalid
    JSON: Expecting value (column 10)". This project's ClientApp sends that line already (client/app.error_reply);
    Flower's own wording is shortened to it: "<class 'pkg.Type'>:<'message'>" gives "Type: message", and a
    traceback (Ray's, in simulation) gives the line of the last exception in it that is not Flower's or Ray's
    wrapper (else the traceback's last line). Anything else comes back as it is, on one line."""
    text = _ANSI.sub("", str(reason))
    m = _FLOWER_REASON.fullmatch(text.strip())
    if m is not None:
        kind, message = m["type"].rpartition(".")[2], _one_line(m["message"])
        if not kind.startswith(_WRAPPERS):
            return f"{kind}: {message}" if message else kind
        text = m["message"]
    causes = [(t.rpartition(".")[2], message) for t, message in
              (m.group("type", "message") for m in map(_EXCEPTION_LINE.match, text.splitlines()) if m)]
    causes = [(t, message) for t, message in causes if not t.startswith(_WRAPPERS)]
    if causes:
        kind, message = causes[-1]
        return f"{kind}: {message.strip()}"
    lines = [part.strip() for part in text.splitlines() if part.strip()]
    if any(line.startswith('File "') for line in lines):  # a traceback without an exception line we know
        return lines[-1].removeprefix("Exception ClientAppException occurred. Message: ")
    return " ".join(lines)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@dataclass
class CheckedReply:
    state: dict[str, torch.Tensor]  # the slice: read-only views of the reply's bytes, in the wire dtype
    num_examples: int
    metrics: dict[str, float]  # known metric keys only


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_metrics(msg: Message, records: tuple[str, ...], weight_key: str, known: tuple[str, ...],
                   max_num_examples: int) -> tuple[int, dict[str, float]]:
    """The reply is not an error and holds exactly `records`; -> (its weight, known metrics)."""
    if msg.has_error():
        raise ReplyError(f"error reply (code {msg.error.code}): {safe_text(error_cause(msg.error.reason))}")
    content = msg.content
    names = sorted(content.keys())
    if names != sorted(records):
        raise ReplyError(f"records {safe_text(names)}, expected exactly {sorted(records)}")
    metrics = content["metrics"]
    if not isinstance(metrics, MetricRecord):
        raise ReplyError("no MetricRecord 'metrics' in the reply")
    n = metrics.get(weight_key)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_num_examples:
        raise ReplyError(f"{weight_key} must be an integer in [1, {max_num_examples}] (max-num-examples), "
                         f"got {safe_text(repr(n), 60)}")
    values = {}
    for key in known:
        if key in metrics:
            v = metrics[key]
            if not _is_number(v) or not math.isfinite(v):
                raise ReplyError(f"metric {key!r} must be a finite number, got {safe_text(repr(v), 60)}")
            values[key] = float(v)
    return n, values


def check_reply(msg: Message, expected_shapes: Mapping[str, tuple[int, ...]], wire_dtype: str,
                max_num_examples: int, delta: tuple[Mapping[str, tuple[int, ...]], int] | None = None) -> CheckedReply:
    """A training reply -> CheckedReply, or ReplyError. The slice's tensors are read-only views of the
    reply's bytes in the wire dtype (no copy of the slice); aggregation converts one tensor at a time.

    With `delta` = (shapes, bits) (upload-codec int8-delta / int4-delta) the tensors of `shapes` come as their
    quantized updates in the record "delta": the state holds them as QTensors (views; the fold dequantizes a
    block of rows at a time), checked for layout, dtypes and finite scales; "arrays" holds the rest."""
    records = ("arrays", "metrics") if delta is None else ("arrays", "delta", "metrics")
    n, values = _check_metrics(msg, records, TRAIN_WEIGHT, TRAIN_METRICS, max_num_examples)
    arrays = msg.content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise ReplyError("no ArrayRecord 'arrays' in the reply")
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    if missing or extra:
        raise ReplyError(f"keys differ from the slice sent: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {safe_text(extra[:3], 120)}{'...' if len(extra) > 3 else ''}")
    want_dtype = NUMPY_DTYPE[wire_dtype]
    for k, shape in expected_shapes.items():
        a = arrays[k]
        if a.stype != "numpy.ndarray":
            raise ReplyError(f"{k}: serialization {safe_text(a.stype, 40)}, expected numpy.ndarray")
        if a.dtype != want_dtype:
            raise ReplyError(f"{k}: dtype {safe_text(a.dtype, 40)}, expected {want_dtype} (wire dtype {wire_dtype})")
        if tuple(a.shape) != tuple(shape):
            raise ReplyError(f"{k}: shape {safe_text(tuple(a.shape), 60)}, expected {tuple(shape)}")
    try:
        state = decode(arrays, wire_dtype, dtype=None, copy=False)
    except Exception as e:  # malformed .npy bytes, or a header that contradicts the declared dtype/shape
        raise ReplyError(f"arrays could not be decoded: {safe_text(e)}") from None
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected_shapes[k]):
            raise ReplyError(f"{k}: data shape {tuple(t.shape)} differs from its declared shape")
        if not all(bool(torch.isfinite(b).all()) for (b,) in blocks(t)):  # bool temporaries of one block
            bad = sum(int((~torch.isfinite(b)).sum()) for (b,) in blocks(t))
            raise ReplyError(f"{k}: {bad} non-finite value(s) (NaN/Inf)")
    if delta is not None:
        if not isinstance(msg.content["delta"], ArrayRecord):
            raise ReplyError("no ArrayRecord 'delta' in the reply")
        try:
            state.update(decode_delta(msg.content["delta"], delta[0], delta[1]))
        except Exception as e:  # a layout, dtype or scale the run did not ask for, or malformed .npy bytes
            raise ReplyError(f"the update could not be decoded: {safe_text(e)}") from None
    for name, (a, b) in adapter_pairs(state).items():  # the update the server will form from the factors
        norm = adapter_update_sq_norm(a, b) ** 0.5
        if not norm < FLOAT32_MAX:
            raise ReplyError(f"{name}: the rest adapter's update b @ a has norm {norm:.3g}, beyond float32's range")
    return CheckedReply(state, n, values)


def check_eval_reply(msg: Message, max_num_examples: int) -> tuple[int, dict[str, float]]:
    """A client-eval reply -> (num-tokens, known metrics), or ReplyError."""
    return _check_metrics(msg, ("metrics",), EVAL_WEIGHT, EVAL_METRICS, max_num_examples)


def reduce_metrics(replies: Iterable[tuple[int, Mapping[str, float]]]) -> MetricRecord:
    """Weighted mean (by each reply's num-examples, or num-tokens for evaluation) of each known metric over the
    checked replies that report it (the weight key itself left out, as Flower's aggregate_metricrecords does)."""
    replies = list(replies)
    out = {}
    for key in sorted({k for _, m in replies for k in m}):
        pairs = [(n, m[key]) for n, m in replies if key in m]
        total = sum(n for n, _ in pairs)
        out[key] = sum(v * (n / total) for n, v in pairs)
    return MetricRecord(out)
