"""The server's elementwise passes run block by block (aggregation.blocks), so their temporaries do not grow
with the largest tensor (Llama 3.2 3B: a 394M-value embedding and output).

- the fold (WeightedFold) is bit for bit the whole-tensor fold, under both weightings, with replicated and
  split parameters (column slices of row-parallel weights included), several world sizes, vocab_parallel
  on and off, at block sizes small enough that every tensor is cut into many blocks;
- update_rms equals a whole-tensor float64 reference up to summation order;
- check_reply still finds and counts NaN/Inf in a late block;
- blocks are views of at most BLOCK_VALUES elements that cover every element once, and no op of the fold
  or of update_rms yields a tensor larger than a block.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.model.sharding import REPLICATE, rule_for, shard, slice_shapes
from fedtp_flwr.server import aggregation
from fedtp_flwr.server.aggregation import Contribution, WeightedFold, blocks
from fedtp_flwr.server.replies import ReplyError, check_reply
from fedtp_flwr.server.robust import update_rms
from fedtp_flwr.wire import WIRE_DTYPES, encode

ARGS = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=32, multiple_of=8)


class WholeTensorFold(WeightedFold):
    """The fold as it was before blocking: each reply tensor converted and added whole."""

    def add(self, c, release=False):
        if self.sums is None:
            self.sums = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in self.old.items()}
        w = float(c.weight)
        self.ref = self.ref or w
        for k in list(c.state):
            x = c.state[k].float()
            if rule_for(k, self.vocab_parallel) is REPLICATE:
                self.sums[k].add_(x, alpha=w / self.ref)
                continue
            _, alpha = self._write(k, c.rank, w)
            if self.weighting == "all-clients":
                x = x - self._block(self.old, k, c.rank)
            self._block(self.sums, k, c.rank).add_(x, alpha=alpha)
        self.rank_weight[c.rank] += w
        self.total += w
        self.count += 1


def global_state():
    return {k: v.detach().clone() for k, v in build_model(ARGS, seed=0).state_dict().items()}


def replies(state, world_size, vocab_parallel, dtype, seed=0):
    """Two to three replies per rank but the last (nobody trained it when world_size > 1), uneven weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    ranks = range(max(1, world_size - 1))
    for i, rank in enumerate([r for r in ranks for _ in range(2 + r % 2)]):
        sl = shard(state, ARGS, rank, world_size, vocab_parallel)
        trained = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in sl.items()}
        out.append(Contribution(rank, trained, float(3 + 7 * i)))
    return out


def fold(cls, state, contributions, world_size, weighting, vocab_parallel):
    f = cls(state, ARGS, world_size, weighting, vocab_parallel)
    for c in contributions:
        f.add(c)
    return f.result()


@pytest.mark.parametrize("block_values", [1, 7, 40])
@pytest.mark.parametrize("vocab_parallel", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("weighting", ["per-rank", "all-clients"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_fold_is_bit_identical_to_the_whole_tensor_fold(monkeypatch, block_values, vocab_parallel,
                                                                world_size, weighting, dtype):
    state = global_state()
    contributions = replies(state, world_size, vocab_parallel, dtype)
    want = fold(WholeTensorFold, state, contributions, world_size, weighting, vocab_parallel)
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", block_values)
    got = fold(WeightedFold, state, contributions, world_size, weighting, vocab_parallel)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_release_still_empties_the_reply(monkeypatch):
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", 7)
    state = global_state()
    contributions = replies(state, 2, False, torch.float32)
    want = fold(WholeTensorFold, state, contributions, 2, "per-rank", False)
    f = WeightedFold(state, ARGS, 2)
    for c in contributions:
        c.state = dict(c.state)
        f.add(c, release=True)
        assert not c.state
    got = f.result()
    assert all(torch.equal(got[k], want[k]) for k in want)


def reference_rms(state, c, world_size, vocab_parallel):
    old = shard(state, ARGS, c.rank, world_size, vocab_parallel)
    sums, counts = {"split": 0.0, "replicated": 0.0}, {"split": 0, "replicated": 0}
    for k, new in c.state.items():
        part = "replicated" if rule_for(k, vocab_parallel) is REPLICATE else "split"
        sums[part] += float((new.double() - old[k].double()).square().sum())
        counts[part] += new.numel()
    return {p: (sums[p] / counts[p]) ** 0.5 for p in sums if counts[p]}


@pytest.mark.parametrize("block_values", [1, 7, 40, 1 << 22])
@pytest.mark.parametrize("vocab_parallel", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_update_rms_equals_the_whole_tensor_float64_value(monkeypatch, block_values, vocab_parallel, world_size):
    state = global_state()
    contributions = replies(state, world_size, vocab_parallel, torch.bfloat16)
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", block_values)
    for c in contributions:
        got, want = update_rms(state, c, ARGS, world_size, vocab_parallel), reference_rms(state, c, world_size,
                                                                                           vocab_parallel)
        assert got.keys() == want.keys()
        for p in want:
            assert got[p] == pytest.approx(want[p], rel=1e-12, abs=0)


def test_update_rms_of_huge_values_does_not_overflow(monkeypatch):
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", 7)
    state = global_state()
    c = Contribution(0, {k: torch.full(v.shape, 3e38) for k, v in state.items()}, 1.0)
    rms = update_rms(state, c, ARGS, 1)
    assert all(math.isfinite(v) and 1e38 < v < 4e38 for v in rms.values())


def train_reply(state, wire_dtype):
    return Message(RecordDict({"arrays": encode(state, wire_dtype),
                               "metrics": MetricRecord({"num-examples": 5})}), dst_node_id=1, message_type="train")


@pytest.mark.parametrize("wire_dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_reply_finds_non_finite_values_in_a_late_block(server_identity, monkeypatch, wire_dtype, bad):
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", 7)
    state = {k: v.clone() for k, v in shard(global_state(), ARGS, 1, 2).items()}
    shapes = slice_shapes(ARGS, 2)
    assert check_reply(train_reply(state, wire_dtype), shapes, wire_dtype, 10).num_examples == 5
    k = "layers.0.attention.wo.weight"  # [dim, heads / 2]: the value sits in a late block of a late row
    state[k][-1, -1] = bad
    state[k][-2, 3] = bad
    state[k][0, 0] = bad
    with pytest.raises(ReplyError, match=rf"^{k}: 3 non-finite value\(s\) \(NaN/Inf\)$"):
        check_reply(train_reply(state, wire_dtype), shapes, wire_dtype, 10)


@pytest.mark.parametrize("block_values", [1, 5, 7, 16, 40, 100, 10_000])
def test_blocks_are_small_views_that_cover_every_element_once(monkeypatch, block_values):
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", block_values)
    base = torch.zeros(12, 6, 10)
    views = [base, base[:, 1:5, ::2], base.narrow(2, 3, 4), base.transpose(0, 2)[1:], base[0, 0], base[0, 0, 0]]
    for v in views:
        counts = torch.zeros(v.shape)
        for a, b in blocks(v, counts):
            assert a.shape == b.shape
            assert a.numel() <= block_values
            assert a.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # a view, not a copy
            b += 1
        assert torch.equal(counts, torch.ones(v.shape))  # writes land in the tensor, each element once


def test_blocks_refuse_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        list(blocks(torch.zeros(4, 3), torch.zeros(3, 4)))


class Spy(torch.Tensor):
    """Records the largest new tensor (not a view of, or in place into, an argument) that any op on a reply
    tensor yields: conversions, differences, squares."""

    largest = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            inputs = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                      if isinstance(a, torch.Tensor)}
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                    Spy.largest = max(Spy.largest, o.numel())
        return out


@pytest.mark.parametrize("weighting", ["per-rank", "all-clients"])
def test_no_op_of_the_fold_or_update_rms_yields_more_than_a_block(monkeypatch, weighting):
    state = global_state()
    largest = max(v.numel() for v in state.values())
    contributions = replies(state, 2, True, torch.bfloat16)

    def spied():
        Spy.largest = 0
        f = WeightedFold(state, ARGS, 2, weighting, True)
        for c in contributions:
            spy = Contribution(c.rank, {k: v.as_subclass(Spy) for k, v in c.state.items()}, c.weight)
            update_rms(state, spy, ARGS, 2, True)
            f.add(spy)
        return Spy.largest

    assert spied() == largest // 2  # the spy sees whole tensors when one block holds a whole tensor
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", 7)
    assert 0 < spied() <= 7
