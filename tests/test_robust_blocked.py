"""The robust merge (rank-merge median / trimmed-mean) block by block of rows: bit for bit the rule over whole
tensors (written out in this file), with replies parked on disk or in memory, and never more than one block per reply stacked."""

from typing import Mapping, Sequence

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

import fedtp_flwr.server.robust as robust
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.model.sharding import REPLICATE, rule_for, shard
from fedtp_flwr.server.aggregation import Contribution
from fedtp_flwr.server.spill import SpillDir, SpilledState

ARGS = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8)
# norms of 8 values: with 7 values a block, the last run of one-value rows would be one value long
ODD = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=15, multiple_of=8)


# ---------------------------------------------- the whole-tensor implementation this change replaced (reference)

def _whole_robust_mean(tensors, rule, beta=0.2):
    stacked = np.stack([t.float().numpy() for t in tensors])
    if rule == "median":
        return torch.from_numpy(np.asarray(np.median(stacked, axis=0), dtype=np.float32))
    return torch.from_numpy(np.asarray(trim_mean(stacked, beta), dtype=np.float32))


def _whole_robust_aggregate_slices(global_state: Mapping[str, torch.Tensor], contributions: Sequence[Contribution],
                                   args, world_size, rule, beta=0.2, weighting="per-rank", vocab_parallel=False):
    """The rule over whole tensors, written out here (shard's views, no blocks, no server merge code)."""
    out = {k: v.clone() for k, v in global_state.items()}
    for k, old in global_state.items():
        if rule_for(k, vocab_parallel) is REPLICATE:
            out[k] = _whole_robust_mean([c.state[k] for c in contributions], rule, beta).to(old.dtype)
    for rank in range(world_size):
        group = [c for c in contributions if c.rank == rank]
        dst, before = shard(out, args, rank, world_size, vocab_parallel), shard(global_state, args, rank, world_size,
                                                                              vocab_parallel)
        for k, old in before.items():
            if rule_for(k, vocab_parallel) is REPLICATE or not group:
                continue
            value = _whole_robust_mean([c.state[k] for c in group], rule, beta)
            if weighting == "per-rank":
                dst[k].copy_(value)
            else:
                dst[k].copy_(old + (value - old.float()) * (len(group) / len(contributions)))
    return out


# ------------------------------------------------------------------------------------------------- helpers

def _setup(args, n, world_size, vocab_parallel, dtype, seed=0):
    """Global state and n replies (node i trains rank i % world_size), with ties and signed zeros in them."""
    state = {k: v.detach().clone().to(dtype) for k, v in build_model(args, seed=seed).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    contribs = []
    for i in range(n):
        rank = i % world_size
        sl = shard(state, args, rank, world_size, vocab_parallel)
        reply = {}
        for k, v in sl.items():
            x = v.float() + torch.randn(v.shape, generator=g) * 10 ** torch.randint(-3, 4, v.shape, generator=g)
            x.view(-1)[: max(1, x.numel() // 5)] = 0.0 if i % 2 else -0.0  # ties and signed zeros
            reply[k] = x.to(dtype)
        contribs.append(Contribution(rank, reply, float(i + 1)))
    return state, contribs


def _park(contribs, spill):
    return [Contribution(c.rank, spill.park(c.state), c.weight) for c in contribs]


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.int8 if a.element_size() == 1 else
                                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]),
        b.contiguous().reshape(-1).view(torch.int8 if b.element_size() == 1 else
                                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()]))


# ------------------------------------------------------------------------------------------------- tests

# Every pair of values of the six factors appears in at least one case (12 cases instead of all 144 combinations).
# n, world size: 26 gives groups of 13, trim_mean over 9; 3 at W=1 is one group of all.
PAIRWISE = [  # block_values, parked, vocab_parallel, weighting, rule, (n, world_size)
    (7, False, False, "per-rank", "median", (5, 2)),
    (7, True, True, "all-clients", "trimmed-mean", (26, 2)),
    (7, True, False, "all-clients", "median", (3, 1)),
    (37, False, True, "all-clients", "median", (5, 2)),
    (37, True, False, "per-rank", "trimmed-mean", (26, 2)),
    (37, False, False, "per-rank", "trimmed-mean", (3, 1)),
    (1 << 22, True, False, "all-clients", "trimmed-mean", (5, 2)),
    (1 << 22, False, True, "per-rank", "median", (26, 2)),
    (1 << 22, True, True, "per-rank", "median", (3, 1)),
    (7, False, True, "per-rank", "trimmed-mean", (5, 2)),
    (37, True, True, "all-clients", "median", (26, 2)),
    (7, True, False, "all-clients", "median", (26, 2)),
]


def test_the_cases_cover_every_pair_of_factor_values():
    from itertools import combinations

    values = [sorted({case[i] for case in PAIRWISE}, key=str) for i in range(6)]
    assert [len(v) for v in values] == [3, 2, 2, 2, 2, 3]
    for i, j in combinations(range(6), 2):
        seen = {(case[i], case[j]) for case in PAIRWISE}
        assert len(seen) == len(values[i]) * len(values[j]), (i, j)


@pytest.mark.parametrize("block_values,parked,vocab_parallel,weighting,rule,n_w", PAIRWISE)
def test_blocked_merge_equals_whole_tensor_merge(tmp_path, monkeypatch, rule, weighting, vocab_parallel, parked,
                                                 block_values, n_w):
    n, world_size = n_w
    monkeypatch.setattr(robust.aggregation, "BLOCK_VALUES", block_values)
    state, contribs = _setup(ARGS, n, world_size, vocab_parallel, torch.float32)
    want = _whole_robust_aggregate_slices(state, contribs, ARGS, world_size, rule, 0.2, weighting, vocab_parallel)
    with SpillDir(tmp_path) as spill:
        given = _park(contribs, spill) if parked else contribs
        got = robust.robust_aggregate_slices(state, given, ARGS, world_size, rule, 0.2, weighting, vocab_parallel)
    assert list(got) == list(want)
    assert all(_bits_equal(got[k], want[k]) for k in want), [k for k in want if not _bits_equal(got[k], want[k])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parked", [False, True])
@pytest.mark.parametrize("weighting", ["per-rank", "all-clients"])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_dtypes_and_one_value_rows(tmp_path, monkeypatch, rule, weighting, parked, dtype):
    """bfloat16 or float32 model and replies; ODD's norms (8 one-value rows) with 7 values a block are cut into
    runs of 6 and 2 rows, not 7 and 1 (a (13, 1) stack's float32 mean may round differently: see _row_ranges)."""
    monkeypatch.setattr(robust.aggregation, "BLOCK_VALUES", 7)
    assert robust._row_ranges((8,)) == [(0, 6), (6, 8)]
    # ODD, float32, seeds 0 and 1: a (13, 1) stack's trimmed mean differs in the last bit from the (13, 8) one
    for args, world_size, seed in [(ARGS, 2, 3), (ODD, 1, 0), (ODD, 1, 1)]:
        state, contribs = _setup(args, 13 * world_size, world_size, False, dtype, seed=seed)
        want = _whole_robust_aggregate_slices(state, contribs, args, world_size, rule, 0.2, weighting)
        with SpillDir(tmp_path) as spill:
            given = _park(contribs, spill) if parked else contribs
            got = robust.robust_aggregate_slices(state, given, args, world_size, rule, 0.2, weighting)
        assert all(_bits_equal(got[k], want[k]) for k in want), [k for k in want if not _bits_equal(got[k], want[k])]


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_robust_mean_sees_one_block_per_reply_and_parked_replies_are_read_by_rows(tmp_path, monkeypatch,
                                                                                   vocab_parallel):
    block = 7
    monkeypatch.setattr(robust.aggregation, "BLOCK_VALUES", block)
    state, contribs = _setup(ARGS, 6, 2, vocab_parallel, torch.float32)
    seen, real_mean = [], robust.robust_mean

    def recording(tensors, rule, beta=0.2):
        seen.append(tuple(np.stack([t.numpy() for t in tensors]).shape))  # what robust_mean stacks
        return real_mean(tensors, rule, beta)

    def whole(self, k):
        raise AssertionError(f"a whole tensor {k!r} was read from a parked reply")

    monkeypatch.setattr(robust, "robust_mean", recording)
    with SpillDir(tmp_path) as spill:
        given = _park(contribs, spill)
        monkeypatch.setattr(SpilledState, "__getitem__", whole)
        robust.robust_aggregate_slices(state, given, ARGS, 2, "trimmed-mean", 0.2, "all-clients", vocab_parallel)
    assert seen
    largest = max(state[k].numel() for k in state)
    for shape in seen:
        n, rows, per_row = shape[0], shape[1], int(np.prod(shape[2:]))
        rows_per_block = max(1, block // per_row)
        assert n in (3, 6)  # a rank group, or every reply for a replicated parameter
        assert rows <= rows_per_block, shape
        assert rows * per_row <= max(block, per_row) < largest
