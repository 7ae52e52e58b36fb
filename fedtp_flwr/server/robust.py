"""Defences against a bad update that passed the reply checks: outlier norms and robust merging.

Update norms. Each reply's update relative to the global model is measured in two parts: its rank's slice
of the split layers and the replicated layers (embeddings, norms, output), each as an RMS (norm / sqrt of
the element count, computed in float64 so that 3e38 does not overflow). Every rank's slice has the same
size, so the split-layer RMS of all replies of a round compare with each other. A reply whose RMS in either
part exceeds `factor` x the round's median of that part is an outlier; with fewer than 3 replies there is
no median to trust and nothing is dropped.

Robust merging (rank-merge): within each rank group (for kv heads held by a replica group, the replies of every
rank of the group), and over all replies for the replicated layers, the
coordinate-wise median (Flower's FedMedian: np.median) or trimmed mean (Flower's FedTrimmedAvg: its
trim_mean) of the replies, unweighted as in Flower. With all-clients weighting a rank group's robust value
moves the global slice by the group's share of the round's replies, the count analogue of that rule:
    new = old + (|group| / |all|) (robust(group) - old)

Memory of the robust merge: each parameter is computed a block of dim-0 rows at a time (rows_per_block =
BLOCK_VALUES // values per row): that block is read from every reply of the group (SpilledState.rows reads it
alone from disk; an in-memory reply is sliced), stacked and reduced, and the result written into the output's
block. Besides the output model, the merge holds (replies in the group) x (one block) plus the reduction's own
temporaries of that size, whatever the parameter's size. np.median / trim_mean are per coordinate, so the
result is bit for bit that of stacking whole tensors (see _row_ranges for the one layout that is avoided).
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

import numpy as np
import torch

import fedtp_flwr.server.aggregation as aggregation
from fedtp_flwr.compat import trim_mean
from fedtp_flwr.config import ROBUST_RULES
from fedtp_flwr.model import ModelArgs
from fedtp_flwr.model.quant import QTensor
from fedtp_flwr.model.rows import row_slices, rows_per_block
from fedtp_flwr.model.context import adapter_pairs, adapter_target, adapter_update_sq_norm
from fedtp_flwr.model.sharding import REPLICATE, block_position, rule_for, shard

from .aggregation import Contribution, blocks, delta_rows
from .spill import SpilledState


def update_rms(global_state: Mapping[str, torch.Tensor], c: Contribution, args: ModelArgs, world_size: int,
               vocab_parallel: bool = False) -> dict[str, float]:
    """{"split": RMS of the update of the split layers (the rank slice's, and the rest adapters' products over
    the rest, when the reply has them), "replicated": RMS of the replicated layers' update} (a part with no
    parameters is left out)."""
    old_slice = shard(global_state, args, c.rank, world_size, vocab_parallel)  # views, no copy
    sums = {"split": 0.0, "replicated": 0.0}
    counts = {"split": 0, "replicated": 0}
    for a, b in adapter_pairs(c.state).values():
        sums["split"] += adapter_update_sq_norm(a, b)
        counts["split"] += b.shape[0] * a.shape[1]
    for k, new in c.state.items():
        if adapter_target(k) is not None:
            continue
        part = "replicated" if rule_for(k, vocab_parallel) is REPLICATE else "split"
        if isinstance(new, QTensor):  # an uploaded update, a block of rows at a time
            for _, d in delta_rows(new, old_slice[k].shape):
                sums[part] += float(d.double().square().sum())
            counts[part] += old_slice[k].numel()
            continue
        for n, o in blocks(new, old_slice[k]):  # float64 temporaries of one block, not of the tensor
            sums[part] += float((n.double() - o.double()).square().sum())
        counts[part] += new.numel()
    return {p: (sums[p] / counts[p]) ** 0.5 for p in sums if counts[p]}


def outliers(norms: Sequence[Mapping[str, float]], factor: float) -> dict[int, str]:
    """Index -> reason, for each reply whose RMS in some part exceeds factor x that part's median."""
    if factor <= 0 or len(norms) < 3:
        return {}
    out = {}
    for part in ("split", "replicated"):
        values = [n[part] for n in norms if part in n]
        if len(values) < 3:
            continue
        median = statistics.median(values)
        for i, n in enumerate(norms):
            if i not in out and part in n and n[part] > factor * median:
                out[i] = (f"update RMS of the {part} layers {n[part]:.3g} is more than {factor:g} x the round's "
                          f"median {median:.3g} (outlier-norm-factor)")
    return out


def robust_mean(tensors: Sequence[torch.Tensor], rule: str, beta: float = 0.2) -> torch.Tensor:
    """Coordinate-wise median (np.median, as FedMedian) or trimmed mean (FedTrimmedAvg's trim_mean) of
    same-shaped tensors, in float32. robust_aggregate_slices gives it one block of rows per reply."""
    stacked = np.stack([t.float().numpy() for t in tensors])
    if rule == "median":
        return torch.from_numpy(np.asarray(np.median(stacked, axis=0), dtype=np.float32))
    if rule == "trimmed-mean":
        return torch.from_numpy(np.asarray(trim_mean(stacked, beta), dtype=np.float32))
    raise ValueError(f"robust rule {rule!r} is not one of {ROBUST_RULES}")


def _row_count(shape: Sequence[int]) -> int:
    return shape[0] if len(shape) else 1  # a 0-d tensor is one row of one value


def _row_ranges(shape: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) runs of dim-0 rows of at most rows_per_block = max(1, BLOCK_VALUES // values per row) rows
    (read at call time, so tests can shrink it). Whole rows only: a reply's block must be one contiguous read.

    One layout is avoided: a block of a single value (rows of one value, the last run one row long) while the
    tensor has more. numpy reduces a stack of shape (n, 1) along its contiguous axis (pairwise summation), but
    (n, m >= 2) one reply row at a time, so trim_mean's float32 mean could differ in the last bit from the
    whole-tensor merge. The run before it then gives it one row (both keep >= 2 values with rows_per_block >= 3;
    with a budget of 1 or 2 values the lone row joins the run before it instead, one value over the budget)."""
    rows = _row_count(shape)
    per_row = math.prod(shape[1:]) if len(shape) else 1
    step = rows_per_block(per_row, aggregation.BLOCK_VALUES)
    out = [(s.start, s.stop) for s in row_slices(rows, per_row, aggregation.BLOCK_VALUES)]
    if per_row == 1 and len(out) > 1 and out[-1][1] - out[-1][0] == 1:
        a, mid = out[-2]
        out[-2:] = [(a, mid - 1), (mid - 1, rows)] if step >= 3 else [(a, rows)]
    return out


def _rows(state: Mapping[str, torch.Tensor], k: str, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of dim 0 of state[k] (a 0-d tensor: as one row of shape (1,)). A parked reply (SpilledState)
    reads only those rows from disk; an in-memory one is sliced (a view)."""
    if isinstance(state, SpilledState):
        return state.rows(k, a, b)
    t = state[k]
    return (t.reshape(1) if t.dim() == 0 else t)[a:b]


def _shape(state: Mapping[str, torch.Tensor], k: str) -> tuple[int, ...]:
    return tuple(state.shape(k) if isinstance(state, SpilledState) else state[k].shape)


def merge_by_plan(global_state: Mapping[str, torch.Tensor], contributions: Sequence[Contribution], args: ModelArgs,
                  world_size: int, vocab_parallel: bool, replicated, split) -> dict[str, torch.Tensor]:
    """The robust merge's walk: `replicated(name)` gives a replicated parameter's new value; each split
    parameter is allocated once and `split(name, dst, old, group)` writes each trained rank's block into `dst`
    (a view from `shard`) from the rank's replies; a rank nobody trained keeps `old`. (The weighted mean is a
    running fold instead, aggregation.WeightedFold: an order statistic needs every reply's block at once.)"""
    out = {}
    for k, old in global_state.items():  # the global model's key order (Flower's FedAvgM pairs arrays by position)
        if rule_for(k, vocab_parallel) is REPLICATE:
            out[k] = replicated(k).to(old.dtype)
        else:
            out[k] = torch.empty(old.shape, dtype=old.dtype)
    for rank in range(world_size):
        dst = shard(out, args, rank, world_size, vocab_parallel)  # views into `out`
        src = shard(global_state, args, rank, world_size, vocab_parallel)
        for k, old in src.items():
            rule = rule_for(k, vocab_parallel)
            if rule is REPLICATE:
                continue
            # the replies that trained this block: rank's, or its kv replica group's (written once, by its first rank)
            index, count = block_position(args, rule, rank, world_size)
            if rank % (world_size // count):
                continue
            group = [c for c in contributions if block_position(args, rule, c.rank, world_size)[0] == index]
            if group:
                split(k, dst[k], old, group)
            else:
                dst[k].copy_(old)
    return out


def robust_aggregate_slices(global_state: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                            args: ModelArgs, world_size: int, rule: str, beta: float = 0.2,
                            weighting: str = "per-rank", vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """aggregation.aggregate_slices with `rule` in place of the weighted mean (see the module docstring), block
    by block of rows: a reply's tensor has its slice's shape, and `dst` (a view of the full output) the same,
    so rows [a, b) of every reply make rows [a, b) of dst (for a row-parallel weight, a column block of the
    full tensor)."""
    if not contributions:
        raise ValueError("no contributions to aggregate")
    if rule not in ROBUST_RULES:
        raise ValueError(f"robust rule {rule!r} is not one of {ROBUST_RULES}")

    def blockwise(k: str, dst: torch.Tensor, group: Sequence[Contribution], write) -> None:
        shapes = {_shape(c.state, k) for c in group}
        if shapes != {tuple(dst.shape)}:
            raise ValueError(f"parameter {k!r}: replies of shapes {sorted(shapes)}, expected {tuple(dst.shape)}")
        rows_view = dst.reshape(1) if dst.dim() == 0 else dst  # a view: writes land in dst
        for a, b in _row_ranges(dst.shape):
            # (|group|, b - a, *row shape): the only stack, one block per reply
            write(rows_view[a:b], a, b, robust_mean([_rows(c.state, k, a, b) for c in group], rule, beta))

    def replicated(k: str) -> torch.Tensor:
        out = torch.empty(global_state[k].shape, dtype=torch.float32)
        blockwise(k, out, contributions, lambda d, a, b, value: d.copy_(value))
        return out

    def split(k: str, dst: torch.Tensor, old: torch.Tensor, group: Sequence[Contribution]) -> None:
        if weighting == "per-rank":
            blockwise(k, dst, group, lambda d, a, b, value: d.copy_(value))
            return
        share = len(group) / len(contributions)
        old_rows = old.reshape(1) if old.dim() == 0 else old

        def moved(d: torch.Tensor, a: int, b: int, value: torch.Tensor) -> None:
            o = old_rows[a:b]
            d.copy_(o + (value - o.float()) * share)  # elementwise: the whole-tensor formula, block by block

        blockwise(k, dst, group, moved)

    return merge_by_plan(global_state, contributions, args, world_size, vocab_parallel, replicated, split)
