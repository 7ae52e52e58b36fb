"""Context mode's rest adapters (rest-adapter-rank): a low-rank update of the frozen rest of every split linear.

Client side: the layer computes what the dense layer with the rest replaced by dequant(rest) + b @ a computes,
without forming b @ a. Server side: every element of a split weight becomes the weighted mean of every
client's update of it (the slice's own delta in its block, the adapter's product elsewhere), exactly.
"""

import pytest
import torch
from conftest import CONTEXT_ARGS as ARGS
from conftest import random_model, tokens
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.model import Transformer
from fedtp_flwr.model.context import (
    FrozenContextLinear,
    adapted_names,
    adapter_key,
    adapter_shapes,
    build_context_model,
    context_rest,
    quantize_rest,
    rest_shapes,
)
from fedtp_flwr.model.quant import dequantize
from fedtp_flwr.model.sharding import REPLICATE, block, rule_for, shard, slice_shapes
from fedtp_flwr.server import aggregation
from fedtp_flwr.server.aggregation import Contribution, WeightedFold
from fedtp_flwr.server.replies import ReplyError, check_reply
from fedtp_flwr.server.robust import outliers, update_rms
from fedtp_flwr.training import TrainSettings, param_groups, train_local
from fedtp_flwr.wire import encode

RANK = 3
CASES = [(2, 0), (2, 1), (4, 2), (8, 5)]  # W = 8: kv heads held by replica groups of 2


def adapted_model(full: Transformer, rank: int, world_size: int, seed: int = 0) -> Transformer:
    sd = full.state_dict()
    rest_q = quantize_rest(context_rest(sd, ARGS, rank, world_size), 8)
    torch.manual_seed(seed)
    model = build_context_model(ARGS, rank, world_size, shard(sd, ARGS, rank, world_size), rest_q, "cpu",
                                rest_adapter_rank=RANK)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # b starts at zero; give it values so that the products matter
        for name, p in model.named_parameters():
            if name.endswith("rest_adapter.b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def insert(rest: torch.Tensor, piece: torch.Tensor, dim: int, lo: int) -> torch.Tensor:
    """The full tensor: `rest` with `piece` put back at `lo` along `dim`."""
    return torch.cat((rest.narrow(dim, 0, lo), piece, rest.narrow(dim, lo, rest.shape[dim] - lo)), dim=dim)


def dense_equivalent(model: Transformer, rank: int, world_size: int) -> Transformer:
    """A plain Transformer whose split weights are dequant(rest) + b @ a, with the slice in its place."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenContextLinear):
            rest = dequantize(module.rest) + module.rest_adapter.b @ module.rest_adapter.a
            lo = module.rank * module.weight.shape[module.split.dim]  # its block's index (kv: the replica group's)
            state[f"{name}.weight"] = insert(rest, module.weight, module.split.dim, lo).detach()
    for k, v in model.state_dict().items():
        if "rest_adapter" not in k and k not in state:
            state[k] = v
    dense = Transformer(ARGS)
    dense.load_state_dict(state)
    return dense


@pytest.mark.parametrize("world_size, rank", CASES)
def test_adapted_layers_compute_the_dense_layer_with_rest_plus_product(world_size, rank):
    model = adapted_model(random_model(), rank, world_size)
    x = tokens()
    torch.testing.assert_close(model(x), dense_equivalent(model, rank, world_size)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world_size, rank", CASES)
def test_the_adapters_start_as_no_change_and_take_gradients(world_size, rank):
    full = random_model()
    sd = full.state_dict()
    rest_q = quantize_rest(context_rest(sd, ARGS, rank, world_size), 8)
    plain = build_context_model(ARGS, rank, world_size, shard(sd, ARGS, rank, world_size), rest_q, "cpu")
    adapted = build_context_model(ARGS, rank, world_size, shard(sd, ARGS, rank, world_size), rest_q, "cpu",
                                  rest_adapter_rank=RANK)
    x = tokens()
    torch.testing.assert_close(adapted(x), plain(x), rtol=0, atol=0)  # b = 0: the received model
    adapted(x).square().mean().backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if n.endswith("rest_adapter.b")}
    assert len(grads) == len(adapted_names(ARGS)) and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_state_dict_is_the_slice_plus_the_factors_the_server_expects():
    model = adapted_model(random_model(), 1, 2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {**slice_shapes(ARGS, 2), **adapter_shapes(ARGS, 2, RANK)}
    rest = rest_shapes(ARGS, 2)
    for name in adapted_names(ARGS):
        assert shapes[adapter_key(name, "a")] == (RANK, rest[name][1])
        assert shapes[adapter_key(name, "b")] == (rest[name][0], RANK)


def test_adapter_factors_train_at_their_own_learning_rate_without_decay():
    model = adapted_model(random_model(), 0, 2)
    groups = param_groups(model, 0.1, adapter_lr_factor=4.0)
    adapter = [g for g in groups if g["lr_scale"] == 4.0]
    assert len(adapter) == 1 and adapter[0]["weight_decay"] == 0.0
    assert all("rest_adapter" in n for n in adapter[0]["names"])
    assert not any("rest_adapter" in n for g in groups if g is not adapter[0] for n in g["names"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = iter([(tokens(), tokens())] * 2)
    train_local(model, batches, TrainSettings(learning_rate=1e-3, local_steps=2, adapter_lr_factor=4.0,
                                              device="cpu", precision="fp32"))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in before if n.endswith("rest_adapter.b")} <= moved


# ------------------------------------------------------------------------------------------ the merge


def client_reply(state, rank, world_size, seed):
    """A trained slice (old + noise) and adapter factors, as a client would send them."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in shard(state, ARGS, rank, world_size).items()}
    for k, shape in adapter_shapes(ARGS, world_size, RANK).items():
        out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def expected_merge(state, replies, world_size):
    """old + sum_i w_i D_i / sum_i w_i for split weights, D_i the client's dense update (its slice delta in its
    block, b_i @ a_i elsewhere); the weighted mean for replicated ones. In float64."""
    total = sum(c.weight for c in replies)
    out = {}
    for k, old in state.items():
        if rule_for(k) is REPLICATE:
            out[k] = sum(c.weight * c.state[k].double() for c in replies) / total
            continue
        acc = torch.zeros(old.shape, dtype=torch.float64)
        for c in replies:
            rule = rule_for(k)
            lo, size = block(ARGS, rule, c.rank, world_size)
            own = c.state[k].double() - old.narrow(rule.dim, lo, size).double()
            if k in adapted_names(ARGS):
                rest = c.state[adapter_key(k, "b")].double() @ c.state[adapter_key(k, "a")].double()
            else:
                rest = torch.zeros(rest_shapes(ARGS, world_size)[k], dtype=torch.float64)
            acc += c.weight * insert(rest, own, rule.dim, lo)
        out[k] = old.double() + acc / total
    return out


@pytest.mark.parametrize("world_size, ranks", [(2, [0, 1, 1]), (4, [0, 2, 2, 3]), (2, [1]), (8, [0, 1, 1, 4, 7])])
def test_every_element_is_the_weighted_mean_of_every_clients_update(world_size, ranks):
    state = random_model().state_dict()
    replies = [Contribution(r, client_reply(state, r, world_size, seed=i), 2.0 + 3 * i) for i, r in enumerate(ranks)]
    want = expected_merge(state, replies, world_size)
    fold = WeightedFold(state, ARGS, world_size, "all-clients")
    for c in replies:
        fold.add(Contribution(c.rank, dict(c.state), c.weight), release=True)
    got = fold.result()
    for k in state:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6, msg=k)
    # ranks nobody trained still moved: the other clients' adapters reached them
    untrained = sorted(set(range(world_size)) - set(ranks))
    for r in untrained:
        k = "layers.0.attention.wq.weight"
        rule = rule_for(k)
        lo, size = block(ARGS, rule, r, world_size)
        assert not torch.equal(got[k].narrow(rule.dim, lo, size), state[k].narrow(rule.dim, lo, size))


def test_products_formed_block_by_block_give_the_same_sums(monkeypatch):
    """Products of a few rows at a time (any weight's size) equal the whole product up to float32 rounding (a
    matmul kernel may sum a row's r terms in another order for another number of rows)."""
    state = random_model().state_dict()
    replies = [Contribution(r, client_reply(state, r, 4, seed=r), 1.0 + r) for r in (0, 3)]

    def merged():
        fold = WeightedFold(state, ARGS, 4, "all-clients")
        for c in replies:
            fold.add(Contribution(c.rank, dict(c.state), c.weight))
        return fold.result()

    whole = merged()
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", 7)  # products of a row or two at a time
    blocked = merged()
    for k in whole:
        torch.testing.assert_close(blocked[k], whole[k], rtol=2e-6, atol=1e-7)


def test_per_rank_weighting_refuses_adapters():
    state = random_model().state_dict()
    fold = WeightedFold(state, ARGS, 2, "per-rank")
    with pytest.raises(ValueError, match="all-clients"):
        fold.add(Contribution(0, client_reply(state, 0, 2, seed=0), 1.0))


# ---------------------------------------------------------------------------------------- the checks


def reply_message(arrays: dict) -> Message:
    return Message(RecordDict({"arrays": encode(arrays), "metrics": MetricRecord({"num-examples": 5})}),
                   dst_node_id=0, message_type=MessageType.TRAIN)


def expected_shapes():
    return {**slice_shapes(ARGS, 2), **adapter_shapes(ARGS, 2, RANK)}


def test_a_valid_reply_with_factors_passes(server_identity):
    state = random_model().state_dict()
    checked = check_reply(reply_message(client_reply(state, 0, 2, 0)), expected_shapes(), "float32", 10**6)
    assert set(checked.state) == set(expected_shapes())


@pytest.mark.parametrize("tamper, reason", [
    (lambda s, k: s.__setitem__(k, torch.zeros(RANK + 1, s[k].shape[1])), r"rest_adapter\.a: shape"),
    (lambda s, k: s[k].__setitem__((0, 0), float("nan")), r"rest_adapter\.a: 1 non-finite"),
    (lambda s, k: s.pop(k), r"missing \['layers\.0\.attention\.wq\.rest_adapter\.a'\]"),
    (lambda s, k: s[k].fill_(1e20), r"wq\.weight: the rest adapter's update b @ a has norm .* beyond float32"),
])
def test_bad_factors_are_refused_with_the_reason(server_identity, tamper, reason):
    state = random_model().state_dict()
    reply = client_reply(state, 0, 2, 0)
    key = adapter_key("layers.0.attention.wq.weight", "a")
    if "float32" in reason:
        reply[adapter_key("layers.0.attention.wq.weight", "b")].fill_(1e20)
    tamper(reply, key)
    with pytest.raises(ReplyError, match=reason):
        check_reply(reply_message(reply), expected_shapes(), "float32", 10**6)


def test_a_huge_adapter_update_is_an_outlier_even_with_a_normal_slice():
    state = random_model().state_dict()
    replies = [Contribution(r % 2, client_reply(state, r % 2, 2, seed=r), 1.0) for r in range(4)]
    for k in replies[3].state:
        if k.endswith("rest_adapter.b"):
            replies[3].state[k] = replies[3].state[k] * 1000
    norms = [update_rms(state, c, ARGS, 2) for c in replies]
    bad = outliers(norms, 10.0)
    assert list(bad) == [3] and "split layers" in bad[3]


def test_the_key_is_refused_outside_context_mode_with_all_clients_mean():
    RunConfig(slice_mode="context", rest_adapter_rank=4)
    for bad in ({"slice_mode": "independent"}, {"slice_mode": "context", "merge_weighting": "per-rank"},
                {"slice_mode": "context", "rank_merge": "median"}):
        with pytest.raises(ConfigError, match="rest-adapter-rank"):
            RunConfig(rest_adapter_rank=4, **bad)


def test_at_3b_the_adapters_are_under_one_percent_of_the_slice():
    """What docs/slice-modes.md says of the upload: rank-16 factors at W=2 are 17.0M values beside a 1.80B slice."""
    import math

    from fedtp_flwr.model import preset_args

    args = preset_args("llama3.2-3b")
    factors = sum(math.prod(s) for s in adapter_shapes(args, 2, 16).values())
    assert factors == 16_973_824
    assert factors / sum(math.prod(s) for s in slice_shapes(args, 2, vocab_parallel=True).values()) < 0.01
