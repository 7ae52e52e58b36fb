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
from .sharding import REPLICATE, merge, rule_for, shard

WEIGHTINGS = ("per-rank", "all-clients")


@dataclass
class Contribution:
    rank: int
    state: Mapping[str, torch.Tensor]  # this rank's slice, as trained by one node (float32)
    weight: float  # num-examples


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    acc = None
    for t, w in zip(tensors, weights):
        f = w / total
        acc = t * f if acc is None else acc.add_(t * f)
    return acc


def aggregate_slices(
    global_state: Mapping[str, torch.Tensor],
    contributions: Sequence[Contribution],
    args: ModelArgs,
    world_size: int,
    weighting: str = "per-rank",
) -> dict[str, torch.Tensor]:
    """New full state dict from this round's slices (see the module docstring for the rules)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"merge weighting {weighting!r} is not one of {WEIGHTINGS}")
    if not contributions:
        raise ValueError("no contributions to aggregate")
    weights = [c.weight for c in contributions]
    total = sum(weights)
    replicated = {
        k: weighted_mean([c.state[k] for c in contributions], weights)
        for k in global_state if rule_for(k) is REPLICATE
    }
    shards = []
    for rank in range(world_size):
        group = [c for c in contributions if c.rank == rank]
        old = shard(global_state, args, rank, world_size)
        part = {}  # in the global model's key order (Flower's FedAvgM pairs arrays by position)
        for k, old_t in old.items():
            if k in replicated:
                part[k] = replicated[k]
            elif not group:
                part[k] = old_t
            elif weighting == "per-rank":
                part[k] = weighted_mean([c.state[k] for c in group], [c.weight for c in group])
            else:
                acc = old_t.to(torch.float32, copy=True)
                for c in group:
                    acc.add_((c.state[k] - old_t) * (c.weight / total))
                part[k] = acc
        shards.append(part)
    return merge(shards, args)
