"""Streaming aggregation: replies pulled one at a time, folded into running sums and released (issue 12).

- the streamed merge equals the merge rule written out from its definition (a reference in this file, not
  the server's code) over the same valid replies, with duplicates, errors and late replies in the stream,
  under both weightings;
- the number of replies alive at once does not grow with the number of nodes (in-process grid, counted
  replies, not RSS);
- a round ends at round-quorum or round-timeout, and the nodes left out are named.
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
from conftest import FakeGrid
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedtp_flwr.compat import set_message_id
from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.server.aggregation import Contribution, WeightedFold, aggregate_slices
from fedtp_flwr.server.strategy import FederatedTensorParallel, RunFailed
from fedtp_flwr.testing.inprocess import InProcessGrid
from fedtp_flwr.wire import decode, encode

pytestmark = pytest.mark.usefixtures("server_identity")

ARGS = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8)


def initial_state():
    return {k: v.detach().clone() for k, v in build_model(ARGS, seed=0).state_dict().items()}


def honest_reply(msg: Message, weight: int) -> tuple[Message, dict]:
    node, rnd = msg.metadata.dst_node_id, msg.content["config"]["server-round"]
    g = torch.Generator().manual_seed(100 * rnd + node)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in decode(msg.content["arrays"]).items()}
    content = RecordDict({"arrays": encode(state), "metrics": MetricRecord({"num-examples": weight, "train-loss": 1.0})})
    return Message(content, reply_to=msg), state


class ScriptedGrid(FakeGrid):
    """Push/pull as Flower's Grid: each pull of one message id returns its node's honest reply, plus what the
    script adds: node 1 answers twice, node 4 fails, node 2's round-1 reply comes again in round 2 (late),
    and nodes in `silent` never answer."""

    def __init__(self, node_ids, silent=()):
        super().__init__(node_ids)
        self.queued, self.silent, self.seq = {}, set(silent), 0
        self.accepted: list[tuple[int, Contribution]] = []  # (round, contribution) of every honest reply, in order
        self.round1_reply_of_2 = None

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.seq += 1
            set_message_id(m.metadata, mid := f"m{self.seq}")
            self.queued[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        (mid,) = message_ids
        msg = self.queued[mid]
        node, rnd, rank = msg.metadata.dst_node_id, msg.content["config"]["server-round"], msg.content["config"]["rank"]
        if node in self.silent:
            return []
        del self.queued[mid]
        if node == 4:
            return [Message(Error(code=2, reason="ClientApp raised"), reply_to=msg)]
        reply, state = honest_reply(msg, weight=node * 3)
        self.accepted.append((rnd, Contribution(rank, state, node * 3)))
        out = [reply]
        if node == 1:
            out.append(honest_reply(msg, weight=1000)[0])  # a second reply: only the first counts
        if node == 2:
            if rnd == 1:
                self.round1_reply_of_2 = reply
            else:
                out.insert(0, self.round1_reply_of_2)  # last round's reply, arriving now
        return out


def reference_merge(old: dict, contributions: list[Contribution], weighting: str) -> dict:
    """The merge rule from its definition, in float64: a replicated tensor is the weighted mean of every reply;
    a rank's block is the weighted mean of its replies (per-rank), or the old block plus every reply's change
    of it weighted over all replies (all-clients). A rank nobody answered keeps its block."""
    from fedtp_flwr.model.sharding import REPLICATE, rule_for, shard

    total = sum(c.weight for c in contributions)
    out = {k: v.double().clone() for k, v in old.items()}
    for k in old:
        if rule_for(k) is REPLICATE:
            out[k] = sum(c.weight * c.state[k].double() for c in contributions) / total
    for rank in range(2):
        group = [c for c in contributions if c.rank == rank]
        dst, before = shard(out, ARGS, rank, 2), shard(old, ARGS, rank, 2)
        for k in dst:
            if rule_for(k) is REPLICATE or not group:
                continue
            if weighting == "per-rank":
                value = sum(c.weight * c.state[k].double() for c in group) / sum(c.weight for c in group)
            else:
                b = before[k].double()
                value = b + sum(c.weight * (c.state[k].double() - b) for c in group) / total
            dst[k].copy_(value)
    return out


@pytest.mark.parametrize("weighting", ["per-rank", "all-clients"])
def test_streamed_merge_equals_the_rule_over_the_valid_replies(weighting, caplog):
    cfg = RunConfig(world_size=2, merge_weighting=weighting, min_available_nodes=1)
    s = FederatedTensorParallel(ARGS, cfg)
    grid = ScriptedGrid([1, 2, 3, 4, 5])
    recorded = {}
    s.start(grid, encode(initial_state()), num_rounds=2, timeout=60,
            record_fn=lambda rnd, arrays, m, trained: recorded.__setitem__(rnd, decode(arrays)))
    for rnd in (1, 2):
        contributions = [c for r, c in grid.accepted if r == rnd]
        assert len(contributions) == 4  # nodes 1, 2, 3, 5
        want = reference_merge(recorded[rnd - 1], contributions, weighting)
        for k in want:  # float32 sums in another order than float64's
            torch.testing.assert_close(recorded[rnd][k].double(), want[k], rtol=0, atol=1e-6, msg=f"{rnd} {k}")
        assert not torch.equal(recorded[rnd]["norm.weight"], recorded[rnd - 1]["norm.weight"])  # not vacuous
    text = caplog.text
    assert "round 2: dropping training reply from node 2: it answers no message of this round (a late reply)" in text
    assert "round 1: dropping training reply from node 1: a second reply from this node" in text
    assert "round 1: dropping reply from node 4 (rank 1): error reply (code 2): ClientApp raised" in text


def test_fold_of_one_reply_is_that_reply_exactly():
    state = initial_state()
    g = torch.Generator().manual_seed(1)
    c = Contribution(0, {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()}, 7)
    merged = aggregate_slices(state, [c], ARGS, 1)
    assert all(torch.equal(merged[k], c.state[k]) for k in state)  # as Flower's FedAvg: x * (7 / 7)


def test_fold_keeps_no_reference_to_a_reply():
    state = initial_state()
    fold = WeightedFold(state, ARGS, 1)
    reply = {k: v + 1 for k, v in state.items()}
    alive = weakref.ref(reply["norm.weight"])
    fold.add(Contribution(0, reply, 3))
    del reply
    gc.collect()
    assert alive() is None
    assert torch.equal(fold.result()["norm.weight"], state["norm.weight"] + 1)


def live_replies_peak(n_nodes: int, **cfg) -> int:
    """Most earlier replies still referenced by the server (its strategy, Flower's objects, the grid) whenever a
    node makes its reply, over a round of `n_nodes` in-process nodes. The test keeps each reply's tensor
    bytes (the first Array's data) and counts those with a reference besides its own."""
    datas, peak = [], [0]

    def live() -> int:  # no gc.collect(): a reply kept only by a reference cycle counts as alive
        return sum(sys.getrefcount(d) > 3 for d in datas)  # 3: the list, the loop variable, getrefcount's argument

    def handler(msg, run_cfg, node_config):
        peak[0] = max(peak[0], live())
        reply, _ = honest_reply(msg, weight=1 + msg.metadata.dst_node_id)
        datas.append(next(iter(reply.content["arrays"].values())).data)
        return reply

    class Forgetful(InProcessGrid):  # the in-process grid without its inspection lists
        def pull_messages(self, message_ids):
            out = super().pull_messages(message_ids)
            self.delivered.clear()
            self.replies.clear()
            return out

    run = {"world-size": 2, "min-available-nodes": 1, **cfg}
    grid = Forgetful([{}] * n_nodes, run, handler=handler)
    s = FederatedTensorParallel(ARGS, RunConfig.from_run_config(run))
    s.start(grid, encode(initial_state()), num_rounds=1, timeout=60)
    assert len(datas) == n_nodes and live() == 0  # not vacuous; nothing is kept after the run
    return peak[0]


def test_replies_alive_at_once_do_not_grow_with_the_number_of_nodes(tmp_path):
    # The outlier check's first two replies wait for a third parked on disk (spill-dir), as do a robust
    # rank-merge's: no earlier reply is referenced in memory when a node makes its reply, whatever the rule.
    spill = {"spill-dir": str(tmp_path / "spill")}
    for extra in ({}, {"outlier-norm-factor": 0.0}, {"rank-merge": "median"}, {"rank-merge": "trimmed-mean"}):
        assert live_replies_peak(3, **spill, **extra) == live_replies_peak(9, **spill, **extra) == 0, extra
    assert not (tmp_path / "spill").exists()  # each round's parked replies are removed, and the folder it made


def test_slices_are_sent_one_rank_at_a_time():
    """With W=2 and 6 nodes, each push carries one rank's messages, and when it is made only that rank's slice
    record exists (counted among all live objects): one rank's encoded slice at a time, not W."""
    full_rows = initial_state()["layers.0.attention.wq.weight"].shape[0]
    pushes, live_slices = [], []

    def slice_records() -> int:
        gc.collect()
        return sum(type(o) is ArrayRecord and "layers.0.attention.wq.weight" in o
                   and o["layers.0.attention.wq.weight"].shape[0] < full_rows for o in gc.get_objects())

    class Silent(FakeGrid):  # keeps no message
        def push_messages(self, messages):
            live_slices.append(slice_records())
            pushes.append(sorted({m.content["config"]["rank"] for m in messages}))
            return [f"m{len(pushes)}-{i}" for i in range(len(messages))]

        def pull_messages(self, message_ids):
            return []

    s = FederatedTensorParallel(ARGS, RunConfig(world_size=2, min_available_nodes=1, allow_failed_rounds=True))
    with pytest.raises(RunFailed, match="no round trained"):  # nobody answers: skipped, and nothing trained
        s.start(Silent(range(1, 7)), encode(initial_state()), num_rounds=1, timeout=0.1)
    assert pushes == [[0], [1]]
    assert live_slices == [1, 1]


def test_a_round_ends_at_round_quorum_and_names_the_late_node(caplog):
    cfg = RunConfig(world_size=2, min_available_nodes=1, round_quorum=0.5, outlier_norm_factor=0.0)
    s = FederatedTensorParallel(ARGS, cfg)
    result = s.start(ScriptedGrid([2, 3, 5, 6], silent={6}), encode(initial_state()), num_rounds=1, timeout=600)
    assert "round 1: no reply from node 6 (rank 1) before the round ended at round-quorum 0.5" in caplog.text
    assert "round 1: 2 valid replies" in caplog.text  # nodes 2 and 3: half the nodes, both ranks
    assert result.arrays is not None


def test_a_round_ends_at_round_timeout_with_the_replies_it_has(caplog):
    s = FederatedTensorParallel(ARGS, RunConfig(world_size=2, min_available_nodes=1))
    result = s.start(ScriptedGrid([2, 3], silent={3}), encode(initial_state()), num_rounds=1, timeout=0.5)
    assert "round 1: no reply from node 3 (rank 1) within round-timeout" in caplog.text
    assert "round 1: 1 valid reply" in caplog.text and result.arrays is not None


def test_round_quorum_is_a_fraction():
    with pytest.raises(ConfigError, match="round-quorum.*1.5.*\\(0, 1\\]"):
        RunConfig(round_quorum=1.5)
    with pytest.raises(ConfigError, match="round-quorum"):
        RunConfig.from_run_config({"round-quorum": 0.0})


def test_a_grid_without_push_and_pull_still_works():
    class OldGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [honest_reply(m, 5)[0] for m in messages]

    s = FederatedTensorParallel(ARGS, RunConfig(world_size=2, min_available_nodes=1))
    state = initial_state()
    result = s.start(OldGrid([1, 2]), encode(state), num_rounds=1, timeout=5)
    assert not torch.equal(decode(result.arrays)["norm.weight"], state["norm.weight"])


def test_encode_with_release_empties_the_state_and_encodes_the_same_bytes():
    from fedtp_flwr.wire import encode as wire_encode

    state = initial_state()
    kept = {k: t.clone() for k, t in state.items()}
    released = wire_encode(state, "float32", release=True)
    assert state == {}  # every tensor was dropped once copied
    plain = wire_encode(kept, "float32")
    assert list(released) == list(plain) and all(released[k].data == plain[k].data for k in plain)
