"""The tensor-parallel Strategy driven directly with mock Messages (no grid, no Flower run)."""

import io
import re

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedtp_flwr.config import ETA_PER_LR, STRATEGIES, RunConfig
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.model.sharding import shard, slice_shapes
from fedtp_flwr.server.strategy import FederatedTensorParallel, assign_ranks
from fedtp_flwr.wire import decode, encode

pytestmark = pytest.mark.usefixtures("server_identity")  # messages need a run id

ARGS = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8)





def global_model(seed=0):
    return {k: v.detach().clone() for k, v in build_model(ARGS, seed=seed).state_dict().items()}


def make_strategy(world_size=2, inner=None, **cfg):
    run = RunConfig(world_size=world_size, **cfg)
    return FederatedTensorParallel(ARGS, run, inner=inner)


def configure(strategy, state, nodes, rnd=1):
    arrays = encode(state)
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), FakeGrid(nodes)))
    return arrays, msgs


def trained_reply(msg, seed, num_examples=10, wire="float32", mutate=None):
    """What a well-behaved client sends back: its slice, changed by 'training'."""
    state = decode(msg.content["arrays"], wire)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    if mutate:
        mutate(state)
    content = RecordDict({"arrays": encode(state, wire), "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0})})
    return Message(content, reply_to=msg), state


def test_ranks_fixed_rotated_and_shared():
    assert assign_ranks([30, 10, 20], 1, 2) == {10: 0, 20: 1, 30: 0}
    assert assign_ranks([1, 2], 5, 2) == {1: 0, 2: 1}  # no swapping: never moves
    rotated = [assign_ranks([1, 2, 3, 4], r, 4, enable_swapping=True, swap_period=2)[1] for r in range(1, 8)]
    assert rotated == [0, 0, 1, 1, 2, 2, 3]


def test_each_node_gets_its_slice_and_never_the_full_model():
    s = make_strategy(world_size=2)
    state = global_model()
    _, msgs = configure(s, state, [5, 6, 7, 8])
    expected = slice_shapes(ARGS, 2)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [5, 6, 7, 8]
    for m in msgs:
        cfg = m.content["config"]
        rank = cfg["rank"]
        assert cfg["world-size"] == 2 and cfg["server-round"] == 1 and cfg["lr"] == 0.1
        got = decode(m.content["arrays"])
        assert {k: tuple(v.shape) for k, v in got.items()} == expected
        want = shard(state, ARGS, rank, 2)
        assert all(torch.equal(got[k], want[k]) for k in want)
        # wq of a W=2 slice has half the rows of the full wq
        assert got["layers.0.attention.wq.weight"].shape[0] == state["layers.0.attention.wq.weight"].shape[0] // 2
    assert [m.content["config"]["rank"] for m in sorted(msgs, key=lambda m: m.metadata.dst_node_id)] == [0, 1, 0, 1]


def test_four_nodes_on_two_ranks_average_per_rank_and_replicated_over_all():
    s = make_strategy(world_size=2)
    state = global_model()
    _, msgs = configure(s, state, [1, 2, 3, 4])
    weights = {1: 1, 2: 2, 3: 3, 4: 4}
    replies, states = [], {}
    for m in msgs:
        node = m.metadata.dst_node_id
        r, st = trained_reply(m, seed=node, num_examples=weights[node])
        replies.append(r)
        states[node] = st
    arrays, metrics = s.aggregate_train(1, replies)
    new = decode(arrays)
    # rank 0 = nodes 1, 3; rank 1 = nodes 2, 4
    wq0 = (states[1]["layers.0.attention.wq.weight"] * 1 + states[3]["layers.0.attention.wq.weight"] * 3) / 4
    wq1 = (states[2]["layers.0.attention.wq.weight"] * 2 + states[4]["layers.0.attention.wq.weight"] * 4) / 6
    torch.testing.assert_close(new["layers.0.attention.wq.weight"], torch.cat([wq0, wq1]), rtol=0, atol=1e-6)
    w2_0 = (states[1]["layers.0.feed_forward.w2.weight"] + 3 * states[3]["layers.0.feed_forward.w2.weight"]) / 4
    torch.testing.assert_close(new["layers.0.feed_forward.w2.weight"][:, : w2_0.shape[1]], w2_0, rtol=0, atol=1e-6)
    emb = sum(weights[n] * states[n]["tok_embeddings.weight"] for n in states) / 10
    torch.testing.assert_close(new["tok_embeddings.weight"], emb, rtol=0, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_rank_nobody_returned_keeps_previous_values():
    s = make_strategy(world_size=2)
    state = global_model()
    _, msgs = configure(s, state, [1, 2])
    rank0 = [m for m in msgs if m.content["config"]["rank"] == 0]
    reply, st = trained_reply(rank0[0], seed=1)
    new = decode(s.aggregate_train(1, [reply])[0])
    half = state["layers.0.attention.wq.weight"].shape[0] // 2
    assert torch.equal(new["layers.0.attention.wq.weight"][half:], state["layers.0.attention.wq.weight"][half:])
    assert torch.equal(new["layers.0.attention.wq.weight"][:half], st["layers.0.attention.wq.weight"])
    assert torch.equal(new["tok_embeddings.weight"], st["tok_embeddings.weight"])


def test_all_clients_weighting_counts_non_trainers_as_zero_update():
    s = make_strategy(world_size=2, merge_weighting="all-clients")
    state = global_model()
    _, msgs = configure(s, state, [1, 2, 3])  # ranks 0, 1, 0
    out = {m.metadata.dst_node_id: trained_reply(m, seed=m.metadata.dst_node_id, num_examples=1) for m in msgs}
    new = decode(s.aggregate_train(1, [r for r, _ in out.values()])[0])
    k = "layers.0.feed_forward.w1.weight"
    old0, old1 = shard(state, ARGS, 0, 2)[k], shard(state, ARGS, 1, 2)[k]
    want0 = old0 + ((out[1][1][k] - old0) + (out[3][1][k] - old0)) / 3
    want1 = old1 + (out[2][1][k] - old1) / 3
    torch.testing.assert_close(new[k], torch.cat([want0, want1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("flower_cls", [FedAvg, FedAdam, FedAvgM])
def test_world_size_one_equals_flower_strategy(flower_cls):
    kwargs = dict(server_learning_rate=0.5, server_momentum=0.9) if flower_cls is FedAvgM else {}
    ours_inner, theirs = flower_cls(min_available_nodes=1, **kwargs), flower_cls(min_available_nodes=1, **kwargs)
    s = make_strategy(world_size=1, inner=ours_inner)
    state = global_model()
    arrays, msgs = configure(s, state, [1, 2, 3])
    list(theirs.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = [trained_reply(m, seed=m.metadata.dst_node_id, num_examples=m.metadata.dst_node_id)[0] for m in msgs]
    ours, _ = s.aggregate_train(1, replies)
    ref, _ = theirs.aggregate_train(1, replies)
    ref = ArrayRecord({k: Array(v.numpy().astype(np.float32)) for k, v in ref.items()})  # Flower's FedAdam is float64
    a, b = decode(ours), decode(ref)
    assert a.keys() == b.keys()
    # The streaming merge adds x_i (w_i / w_0) and divides once; FedAvg adds x_i (w_i / sum w): float32 rounding
    # apart (aggregation.py's docstring), at most n eps max_i |x_i| for FedAvg, and through FedAdam's/FedAvgM's
    # smooth update rules a relative 1e-6.
    sent = [decode(r.content["arrays"]) for r in replies]
    for k in a:
        bound = len(replies) * torch.finfo(torch.float32).eps * torch.stack([s[k].abs() for s in sent]).amax(0)
        if flower_cls is FedAvg:
            assert ((a[k] - b[k]).abs() <= bound).all(), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(a["tok_embeddings.weight"], state["tok_embeddings.weight"])  # not vacuous


def test_fedprox_sends_proximal_mu():
    s = make_strategy(world_size=2, strategy="fedprox", proximal_mu=0.3)
    _, msgs = configure(s, global_model(), [1, 2])
    assert all(m.content["config"]["proximal-mu"] == pytest.approx(0.3) for m in msgs)
    assert isinstance(s.inner, FedProx)


def _bad_replies(msgs):
    m = msgs[0]
    k = "layers.0.attention.wq.weight"

    def with_nan(st):
        st[k][0, 0] = float("nan")

    def with_inf(st):
        st["norm.weight"][0] = float("inf")

    def missing(st):
        del st[k]

    def extra(st):
        st["layers.0.attention.bias"] = torch.zeros(3)

    def wrong_shape(st):
        st[k] = torch.zeros(3, 3)

    def full_wq(st):
        st[k] = torch.zeros(ARGS.n_heads * ARGS.head_dim, ARGS.dim)

    bad = {name: trained_reply(m, 1, mutate=f)[0] for name, f in
           dict(nan=with_nan, inf=with_inf, missing=missing, extra=extra, shape=wrong_shape, full=full_wq).items()}
    bad["error"] = Message(Error(code=2, reason="ClientApp raised"), reply_to=m)
    bad["zero-examples"] = trained_reply(m, 1, num_examples=0)[0]
    bad["nan-examples"] = trained_reply(m, 1, num_examples=float("nan"))[0]
    wrong_dtype = trained_reply(m, 1)[0]
    arrays = wrong_dtype.content["arrays"]
    arrays[k] = Array(arrays[k].numpy().astype(np.float64))
    bad["dtype"] = wrong_dtype
    no_metrics = trained_reply(m, 1)[0]
    del no_metrics.content["metrics"]
    bad["no-metrics"] = no_metrics
    bad["fractional-examples"] = trained_reply(m, 1, num_examples=1867.5)[0]
    list_metric = trained_reply(m, 1)[0]
    list_metric.content["metrics"]["train-loss"] = [1.0, 2.0]
    bad["list-metric"] = list_metric
    # an extra MetricRecord first: Flower's aggregation would read its weight from it
    content = trained_reply(m, 1)[0].content
    bad["extra-records"] = Message(RecordDict({"extra": MetricRecord({"train-loss": [1.0]}), **dict(content.items()),
                                               "more": ConfigRecord({"x": "y"})}), reply_to=m)
    # declared float32, but the .npy header says int32 (the same bytes read as ~1e9 integers)
    relabelled = trained_reply(m, 1)[0]
    arrays = relabelled.content["arrays"]
    buf = io.BytesIO()
    np.save(buf, arrays[k].numpy().view(np.int32))
    arrays[k] = Array(dtype="float32", shape=tuple(arrays[k].shape), stype="numpy.ndarray", data=buf.getvalue())
    bad["npy-header"] = relabelled
    return bad


# The reason the server logs for each kind of bad reply (one line each: the whole-run attack tests need not repeat
# them); each names what is wrong and where.
BAD_REPLY_REASONS = {
    "nan": r"layers\.0\.attention\.wq\.weight: 1 non-finite value\(s\) \(NaN/Inf\)",
    "inf": r"norm\.weight: 1 non-finite value\(s\) \(NaN/Inf\)",
    "missing": r"keys differ from the slice sent: missing \['layers\.0\.attention\.wq\.weight'\], unexpected \[\]",
    "extra": r"keys differ from the slice sent: missing \[\], unexpected \['layers\.0\.attention\.bias'\]",
    "shape": r"layers\.0\.attention\.wq\.weight: shape \(3, 3\), expected \(8, 16\)",
    "full": r"layers\.0\.attention\.wq\.weight: shape \(16, 16\), expected \(8, 16\)",
    "error": r"error reply \(code 2\): ClientApp raised",
    "zero-examples": r"num-examples must be an integer in \[1, \d+\] \(max-num-examples\), got 0",
    "nan-examples": r"num-examples must be an integer in \[1, \d+\] \(max-num-examples\), got nan",
    "dtype": r"layers\.0\.attention\.wq\.weight: dtype float64, expected float32",
    "no-metrics": r"records \['arrays'\], expected exactly \['arrays', 'metrics'\]",
    "fractional-examples": r"num-examples must be an integer in \[1, \d+\] \(max-num-examples\), got 1867\.5",
    "list-metric": r"metric 'train-loss' must be a finite number",
    "extra-records": r"records \['arrays', 'extra', 'metrics', 'more'\], expected exactly \['arrays', 'metrics'\]",
    "npy-header": r"array 'layers\.0\.attention\.wq\.weight': the \.npy header's dtype <i4 differs from the "
                  r"declared dtype float32",
}


def test_each_kind_of_bad_reply_is_dropped_with_its_reason(caplog):
    s = make_strategy(world_size=2, min_train_nodes=1)
    state = global_model()
    _, msgs = configure(s, state, [1, 2])
    bad = _bad_replies(msgs)
    assert set(bad) == set(BAD_REPLY_REASONS)
    for name, reply in bad.items():
        caplog.clear()
        arrays, metrics = s.aggregate_train(1, [reply])
        assert arrays is None and metrics is None, name  # the only reply was bad: round skipped
        line = next((l for l in caplog.text.splitlines() if "dropping reply from node 1 (rank 0): " in l), "")
        assert re.search(BAD_REPLY_REASONS[name], line), (name, caplog.text)


def test_bad_reply_does_not_touch_the_global_slice():
    s = make_strategy(world_size=2, min_train_nodes=1)
    state = global_model()
    _, msgs = configure(s, state, [1, 2])
    good_msg = [m for m in msgs if m.content["config"]["rank"] == 1][0]
    good, _ = trained_reply(good_msg, 2)
    bad = _bad_replies([m for m in msgs if m.content["config"]["rank"] == 0])["nan"]
    new = decode(s.aggregate_train(1, [bad, good])[0])
    half = state["layers.0.attention.wq.weight"].shape[0] // 2
    assert torch.equal(new["layers.0.attention.wq.weight"][:half], state["layers.0.attention.wq.weight"][:half])
    assert torch.isfinite(new["layers.0.attention.wq.weight"]).all()


def test_reply_from_a_node_that_got_no_slice_is_dropped(caplog):
    s = make_strategy(world_size=2)
    _, msgs = configure(s, global_model(), [1, 2])
    stranger = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=99, message_type="train")
    reply, _ = trained_reply(msgs[0], 1)
    impostor = Message(reply.content, reply_to=stranger)
    assert s.aggregate_train(1, [impostor]) == (None, None)
    assert "not sent a slice" in caplog.text


def test_bfloat16_wire_round_trip_through_the_strategy():
    s = make_strategy(world_size=2, wire_dtype="bfloat16")
    state = global_model()
    _, msgs = configure(s, state, [1, 2])
    for m in msgs:
        assert all(a.dtype == "int16" for a in m.content["arrays"].values())
    replies = [trained_reply(m, m.metadata.dst_node_id, wire="bfloat16")[0] for m in msgs]
    new = decode(s.aggregate_train(1, replies)[0])
    assert new["layers.0.attention.wq.weight"].dtype == torch.float32
    torch.testing.assert_close(new["tok_embeddings.weight"], state["tok_embeddings.weight"], atol=0.05, rtol=0)


@pytest.mark.parametrize("bits,tol", [(16, 1e-5), (8, 0.05)])
def test_context_client_starts_from_the_global_models_function(bits, tol):
    """Through the real message path (strategy -> ArrayRecords -> client), a context-mode client's model at
    the start of a round computes what the global model computes: exactly with a bf16 rest (weights chosen
    bf16-representable), within a stated relative tolerance with an int8 rest."""
    from fedtp_flwr.client.app import SliceJob, build_slice_model
    from fedtp_flwr.model import Transformer

    s = make_strategy(world_size=2, slice_mode="context", context_bits=bits, context_group_size=0)
    state = {k: v.to(torch.bfloat16).float() for k, v in global_model(seed=4).items()}
    _, msgs = configure(s, state, [1, 2])
    full = Transformer(ARGS)
    full.load_state_dict(state)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 7))
    with torch.no_grad():
        want = full(tokens)
        for m in msgs:
            model = build_slice_model(SliceJob.from_config(m.content["config"]), m.content, torch.device("cpu"))
            got = model(tokens)
            rel = ((got - want).norm() / want.norm()).item()
            assert rel <= tol, (bits, m.content["config"]["rank"], rel)
            # uploads carry the slice and (context mode's default) the rest adapters' factors, as the server expects
            assert set(model.state_dict()) == set(s.expected_shapes) > set(slice_shapes(ARGS, 2))


# ------------------------------------------------------------------------------ server rules: log and state

def _expected_rule_words(cfg: RunConfig) -> str:
    lr, mu = cfg.effective_server_learning_rate, cfg.effective_server_momentum
    return {"fedavg": lambda: "FedAvg (the merged model as it is",
            "fedprox": lambda: f"FedProx (the merged model as it is; the clients add a proximal term, mu "
                               f"{cfg.proximal_mu:g})",
            "fedavgm": lambda: f"FedAvgM (SGD with momentum {mu:g}, lr {lr:g}, on the merged update",
            "fedadam": lambda: f"FedAdam (eta {lr:g}, beta1 0.9, beta2 0.99, tau 0.001",
            "fedyogi": lambda: f"FedYogi (eta {lr:g}, beta1 0.9, beta2 0.99, tau 0.001",
            "fedadagrad": lambda: f"FedAdagrad (eta {lr:g}, tau 0.001",
            "diloco": lambda: f"DiLoCo outer step (SGD with Nesterov momentum {mu:g}, lr {lr:g}, on the merged update",
            }[cfg.strategy]()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_log_names_the_rule_that_runs_with_its_values(strategy, caplog):
    """At the defaults, the summary names the rule and the values it runs with (the measured defaults, said to be
    so); none of Flower's own summary lines, which speak of DiLoCo as FedAvgM ("Server optimization: OFF")."""
    cfg = RunConfig(strategy=strategy)
    make_strategy(strategy=strategy).summary()
    line = next(l for l in caplog.text.splitlines() if "Server rule: " in l)
    assert _expected_rule_words(cfg) in line
    has_server_step = RunConfig(strategy=strategy).effective_server_learning_rate is not None
    assert ("measured default" in line and "(bench/results/strategy_defaults.md)" in line) == has_server_step
    assert (f"{ETA_PER_LR.get(strategy, 0):g} x learning-rate" in line) == (strategy in ETA_PER_LR)
    assert "Server optimization" not in caplog.text and "eta_l" not in caplog.text and "Flower's" not in line
    assert "this is FedAvg" not in line  # no strategy's defaults are FedAvg's
    caplog.clear()
    explicit = RunConfig(strategy=strategy, server_learning_rate=0.37, server_momentum=0.61)
    make_strategy(strategy=strategy, server_learning_rate=0.37, server_momentum=0.61).summary()
    line = next(l for l in caplog.text.splitlines() if "Server rule: " in l)
    assert _expected_rule_words(explicit) in line
    assert "measured default" not in line
    unused = [k for k, v in (("server-learning-rate", explicit.effective_server_learning_rate),
                             ("server-momentum", explicit.effective_server_momentum)) if v is None]
    for key in unused:
        assert f"{key} = " in caplog.text and f"is not used: strategy {strategy} has no such setting" in caplog.text


def test_diloco_at_lr_1_and_momentum_0_says_it_is_fedavg(caplog):
    make_strategy(strategy="diloco", server_learning_rate=1.0, server_momentum=0.0).summary()
    assert "DiLoCo outer step (SGD with Nesterov momentum 0, lr 1, on the merged update; at lr 1 and momentum 0 " \
           "this is FedAvg)" in caplog.text


def _round(strategy, state, rnd):
    """One round through the strategy with seeded mock replies from two nodes: the new global state."""
    _, msgs = configure(strategy, state, [1, 2], rnd=rnd)
    replies = [trained_reply(m, seed=100 * rnd + m.metadata.dst_node_id)[0] for m in msgs]
    new, _ = strategy.aggregate_train(rnd, replies)
    return decode(new)


def _through_a_checkpoint(state: dict) -> dict:
    """inner_state as a checkpoint stores it and load_run_checkpoint reads it back (weights_only)."""
    buf = io.BytesIO()
    torch.save({"strategy_state": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["strategy_state"]


def _resumes_exactly(make) -> dict:
    """Round 1 on one strategy, its inner state through a checkpoint into a fresh one, round 2 on both: equal bit for
    bit. Returns the state, and whether a fresh strategy without it would have given another round 2."""
    first, resumed, forgetful = make(), make(), make()
    after_1 = _round(first, global_model(), 1)
    state = _through_a_checkpoint(first.inner_state())
    resumed.load_inner_state(state)
    want = _round(first, after_1, 2)
    got = _round(resumed, after_1, 2)
    assert all(torch.equal(want[k], got[k]) for k in want)
    without = _round(forgetful, after_1, 2)
    return {"state": state, "state_matters": any(not torch.equal(want[k], without[k]) for k in want)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategys_state_is_resumed_from_a_checkpoint(strategy):
    """Every choice of config.STRATEGIES (the config's own list, so a new one cannot be left out), at its defaults: the
    state its rule keeps survives a checkpoint and a resumed round equals the uninterrupted one. Not vacuous: a
    strategy with a server step gives another round 2 without its state (and one without has no state)."""
    out = _resumes_exactly(lambda: make_strategy(strategy=strategy))
    has_server_step = RunConfig(strategy=strategy).effective_server_learning_rate is not None
    assert out["state_matters"] == has_server_step and bool(out["state"]) == has_server_step


class _TraceRule(FedAvg):
    """A server rule no Flower class is: it keeps a running mean of the merged models and a count, under names of its
    own (so a list of Flower's state names would miss them)."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        new = {k: a.numpy() for k, a in arrays.items()}
        trace = getattr(self, "trace", None)
        self.trace = new if trace is None else {k: 0.5 * trace[k] + 0.5 * v for k, v in new.items()}
        self.merges = getattr(self, "merges", 0) + 1
        return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in self.trace.items()}), metrics


def test_a_new_rules_state_under_names_of_its_own_is_checkpointed():
    out = _resumes_exactly(lambda: make_strategy(inner=_TraceRule(min_available_nodes=1)))
    assert set(out["state"]) == {"trace", "merges"} and out["state"]["merges"] == 1 and out["state_matters"]


def test_state_a_checkpoint_cannot_hold_is_refused_by_name():
    s = make_strategy(inner=FedAvg(min_available_nodes=1))
    s.inner.lock = object()
    with pytest.raises(TypeError, match="'lock' holds a object value, which a checkpoint cannot hold"):
        s.inner_state()
