"""Defences against a bad update that passed the reply checks: outlier norms and robust merging.

Update norms. Each reply's update relative to the global model is measured in two parts: its rank's slice
of the split layers and the replicated layers (embeddings, norms, output), each as an RMS (norm / sqrt of
the element count, computed in float64 so that 3e38 does not overflow). Every rank's slice has the same
size, so the split-layer RMS of all replies of a round compare with each other. A reply whose RMS in either
part exceeds `factor` x the round's median of that part is an outlier; with fewer than 3 replies there is
no median to trust and nothing is dropped.

Robust merging (rank-merge): within each rank group, and over all replies for the replicated layers, the
coordinate-wise median (Flower's FedMedian: np.median) or trimmed mean (Flower's FedTrimmedAvg: its
trim_mean) of the replies, unweighted as in Flower. With all-clients weighting a rank group's robust value
moves the global slice by the group's share of the round's replies, the count analogue of that rule:
    new = old + (|group| / |all|) (robust(group) - old)
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from .aggregation import Contribution, blocks, merge_by_plan
from .model import ModelArgs
from .sharding import REPLICATE, rule_for, shard

RULES = ("median", "trimmed-mean")


def update_rms(global_state: Mapping[str, torch.Tensor], c: Contribution, args: ModelArgs, world_size: int,
               vocab_parallel: bool = False) -> dict[str, float]:
    """{"split": RMS of the rank slice's update, "replicated": RMS of the replicated layers' update}
    (a part with no parameters is left out)."""
    old_slice = shard(global_state, args, c.rank, world_size, vocab_parallel)  # views, no copy
    sums = {"split": 0.0, "replicated": 0.0}
    counts = {"split": 0, "replicated": 0}
    for k, new in c.state.items():
        part = "replicated" if rule_for(k, vocab_parallel) is REPLICATE else "split"
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
    same-shaped tensors, in float32. Stacks one parameter's replies at a time."""
    stacked = np.stack([t.float().numpy() for t in tensors])
    if rule == "median":
        return torch.from_numpy(np.asarray(np.median(stacked, axis=0), dtype=np.float32))
    if rule == "trimmed-mean":
        return torch.from_numpy(np.asarray(trim_mean(stacked, beta), dtype=np.float32))
    raise ValueError(f"robust rule {rule!r} is not one of {RULES}")


def robust_aggregate_slices(global_state: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                            args: ModelArgs, world_size: int, rule: str, beta: float = 0.2,
                            weighting: str = "per-rank", vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """aggregation.aggregate_slices with `rule` in place of the weighted mean (see the module docstring)."""
    if not contributions:
        raise ValueError("no contributions to aggregate")

    def replicated(k: str) -> torch.Tensor:
        return robust_mean([c.state[k] for c in contributions], rule, beta)

    def split(k: str, dst: torch.Tensor, old: torch.Tensor, group: Sequence[Contribution]) -> None:
        value = robust_mean([c.state[k] for c in group], rule, beta)
        if weighting == "per-rank":
            dst.copy_(value)
        else:
            dst.copy_(old + (value - old.float()) * (len(group) / len(contributions)))

    return merge_by_plan(global_state, contributions, args, world_size, vocab_parallel, replicated, split)
