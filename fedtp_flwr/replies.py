"""Checking a client's training reply before anything of it reaches the global model.

A reply is accepted only if it is not an error, carries one ArrayRecord "arrays" whose keys are exactly
the slice the node was sent, each Array of the expected wire dtype and shape with only finite values,
and a MetricRecord "metrics" with a positive finite num-examples. Anything else raises ReplyError with
the reason; the strategy logs it and drops the reply.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from .wire import NUMPY_DTYPE, decode


class ReplyError(ValueError):
    pass


def check_reply(
    msg: Message, expected_shapes: Mapping[str, tuple[int, ...]], wire_dtype: str
) -> tuple[dict[str, torch.Tensor], float]:
    """-> (the slice, num-examples), or ReplyError. The slice's tensors are read-only views of the reply's
    bytes in the wire dtype (no copy of the slice); aggregation converts one tensor at a time."""
    if msg.has_error():
        raise ReplyError(f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    arrays = content.get("arrays") if "arrays" in content else None
    metrics = content.get("metrics") if "metrics" in content else None
    if not isinstance(arrays, ArrayRecord):
        raise ReplyError("no ArrayRecord 'arrays' in the reply")
    if not isinstance(metrics, MetricRecord):
        raise ReplyError("no MetricRecord 'metrics' in the reply")
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise ReplyError(f"num-examples must be a positive number, got {n!r}")
    missing = sorted(set(expected_shapes) - set(arrays))
    extra = sorted(set(arrays) - set(expected_shapes))
    if missing or extra:
        raise ReplyError(f"keys differ from the slice sent: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    want_dtype = NUMPY_DTYPE[wire_dtype]
    for k, shape in expected_shapes.items():
        a = arrays[k]
        if a.dtype != want_dtype:
            raise ReplyError(f"{k}: dtype {a.dtype}, expected {want_dtype} (wire dtype {wire_dtype})")
        if tuple(a.shape) != tuple(shape):
            raise ReplyError(f"{k}: shape {tuple(a.shape)}, expected {tuple(shape)}")
    try:
        state = decode(arrays, wire_dtype, dtype=None, copy=False)
    except ValueError as e:  # malformed .npy bytes
        raise ReplyError(f"arrays could not be decoded: {e}") from e
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected_shapes[k]):
            raise ReplyError(f"{k}: data shape {tuple(t.shape)} differs from its declared shape")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ReplyError(f"{k}: {bad} non-finite value(s) (NaN/Inf)")
    return state, float(n)
