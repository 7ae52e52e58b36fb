"""Server-side aggregation of tensor-parallel slices, as plain tensor math (no Flower types).

Weights follow Flower's FedAvg exactly (`f_i = w_i / sum(w)`, then `acc = x_0 f_0; acc += x_i f_i`), so with
world size 1 the result equals Flower's FedAvg bit for bit.

Two rules for a split parameter of rank r, whose current global value is `old`:
- per-rank (the user's rule): the weighted mean of the replies that trained rank r,
      new = sum_{i in r} (w_i / sum_{j in r} w_j) x_i
- all-clients (FedAvg's view of a partial update): every reply of the round counts, and a reply that did
      not train rank r counts as a zero update for it,
      new = old + sum_{i in r} (w_i / sum_{all j} w_j) (x_i - old)
Replicated parameters are the weighted mean over all replies under both rules. A rank that nobody
trained keeps `old` under both rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .model import ModelArgs
from .sharding import REPLICATE, rule_for, shard

WEIGHTINGS = ("per-rank", "all-clients")


@dataclass
class Contribution:
    rank: int
    state: Mapping[str, torch.Tensor]  # this rank's slice as one node trained it (any float dtype; read only)
    weight: float  # num-examples


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i (w_i / sum w) t_i, accumulated as Flower does (x_0 f_0, then += x_i f_i) in float32, into `out`
    if given. Each t is converted to float32 on its own (a no-op for float32)."""
    total = sum(weights)
    for i, (t, w) in enumerate(zip(tensors, weights)):
        f = w / total
        t = t.float()
        if i == 0:
            out = t * f if out is None else torch.mul(t, f, out=out)
        else:
            out.add_(t * f)  # one temporary of this tensor's size, not of the model
    return out


def aggregate_slices(
    global_state: Mapping[str, torch.Tensor],
    contributions: Sequence[Contribution],
    args: ModelArgs,
    world_size: int,
    weighting: str = "per-rank",
    vocab_parallel: bool = False,
) -> dict[str, torch.Tensor]:
    """New full state dict from this round's slices (see the module docstring for the rules).

    Each split parameter is allocated once and every rank's result is written straight into its block
    (a view from `shard`), so the merge holds no per-rank copies and needs no concatenation."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"merge weighting {weighting!r} is not one of {WEIGHTINGS}")
    if not contributions:
        raise ValueError("no contributions to aggregate")
    weights = [c.weight for c in contributions]
    total = sum(weights)

    def replicated(k: str) -> torch.Tensor:
        return weighted_mean([c.state[k] for c in contributions], weights)

    def split(k: str, dst: torch.Tensor, old: torch.Tensor, group: Sequence[Contribution]) -> None:
        if weighting == "per-rank":
            weighted_mean([c.state[k] for c in group], [c.weight for c in group], out=dst)
        else:
            dst.copy_(old)
            for c in group:
                dst.add_((c.state[k].float() - old) * (c.weight / total))

    return merge_by_plan(global_state, contributions, args, world_size, vocab_parallel, replicated, split)


def merge_by_plan(global_state: Mapping[str, torch.Tensor], contributions: Sequence[Contribution], args: ModelArgs,
                  world_size: int, vocab_parallel: bool, replicated, split) -> dict[str, torch.Tensor]:
    """The walk every merge rule shares: `replicated(name)` gives a replicated parameter's new value; each split
    parameter is allocated once and `split(name, dst, old, group)` writes each trained rank's block into `dst`
    (a view from `shard`) from the rank's replies; a rank nobody trained keeps `old`."""
    out = {}
    for k, old in global_state.items():  # the global model's key order (Flower's FedAvgM pairs arrays by position)
        if rule_for(k, vocab_parallel) is REPLICATE:
            out[k] = replicated(k).to(old.dtype)
        else:
            out[k] = torch.empty(old.shape, dtype=old.dtype)
    for rank in range(world_size):
        group = [c for c in contributions if c.rank == rank]
        dst = shard(out, args, rank, world_size, vocab_parallel)  # views into `out`
        src = shard(global_state, args, rank, world_size, vocab_parallel)
        for k, old in src.items():
            if rule_for(k, vocab_parallel) is REPLICATE:
                continue
            if group:
                split(k, dst[k], old, group)
            else:
                dst[k].copy_(old)
    return out
