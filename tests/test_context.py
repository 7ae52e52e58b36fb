"""Context mode: a slice trained inside the full-width model with the rest frozen and low-bit.

Against the unsharded model: with a bf16 rest (and bf16-representable weights) the logits and the
gradients are the full model's; with int8 / int4 rests the logits are the full model's with the rest
dequantized, within a stated distance of the original; only the slice and the replicated parameters
train, and the state dict is exactly the slice that `shard` makes.
"""

import math

import pytest
import torch
from conftest import CONTEXT_ARGS as ARGS
from conftest import random_model, rel_err, tokens
from flwr.app import Array, ArrayRecord

from fedtp_flwr.model import Transformer, build_model
from fedtp_flwr.model.context import (
    FrozenContextLinear,
    build_context_model,
    context_rest,
    quantize_rest,
    rest_from_arrays,
    rest_shapes,
    rest_to_arrays,
    split_names,
)
from fedtp_flwr.model.quant import dequantize
from fedtp_flwr.model.sharding import REPLICATE, block_position, rule_for, shard, shard_args, slice_shapes, valid_world_sizes
from fedtp_flwr.training import TrainSettings, param_groups, train_local

# W = 8: beyond the 4 kv heads, each kv head held by 2 ranks (a replica group)
CASES = [(w, r) for w in (1, 2, 4) for r in range(w)] + [(8, 0), (8, 5)]
assert {1, 2, 4, 8} <= set(valid_world_sizes(ARGS))  # every case really runs

# Relative logits error ||ctx - full|| / ||full|| with a per-row absmax rest, on this random model
# (fan-in scaled Gaussian weights, logits O(1)). Measured over 5 seeds x all ranks, W in 2, 4:
# int8 mean 0.013-0.017, max 0.019; int4 mean 0.24-0.30, max 0.35 (W=4 is worse: 3/4 of each split
# weight is quantized, against 1/2 at W=2). Bounds with margin:
LOGITS_TOL = {8: 0.03, 4: 0.45}


def context_model(full: Transformer, rank: int, world_size: int, bits: int, group_size=None) -> Transformer:
    sd = full.state_dict()
    rest_q = quantize_rest(context_rest(sd, ARGS, rank, world_size), bits, group_size)
    return build_context_model(ARGS, rank, world_size, shard(sd, ARGS, rank, world_size), rest_q, "cpu")


def frozen_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FrozenContextLinear)}


# ------------------------------------------------------------------------------------------ the rest


@pytest.mark.parametrize("world_size, rank", CASES)
def test_rest_is_the_other_ranks_blocks_in_order(world_size, rank):
    sd = random_model().state_dict()
    rest = context_rest(sd, ARGS, rank, world_size)
    assert list(rest) == split_names(ARGS)
    assert {k: tuple(v.shape) for k, v in rest.items()} == rest_shapes(ARGS, world_size)
    for name, t in rest.items():
        # one slice per other block: at W = 8 a kv weight's blocks are the 4 kv heads, each held by 2 ranks
        rule = rule_for(name)
        index, count = block_position(ARGS, rule, rank, world_size)
        holders = world_size // count
        others = [shard(sd, ARGS, i * holders, world_size)[name] for i in range(count) if i != index]
        if not others:  # W = 1: nothing is frozen
            assert t.numel() == 0, name
            continue
        assert torch.equal(t, torch.cat(others, dim=rule.dim)), name


def test_rest_arrays_round_trip_through_an_array_record():
    """The strategy's path: QTensors -> flat arrays -> Flower ArrayRecord -> numpy -> QTensors."""
    sd = random_model().state_dict()
    for bits in (16, 8, 4):
        rest_q = quantize_rest(context_rest(sd, ARGS, 1, 4), bits, 16)
        record = ArrayRecord({k: Array(v.numpy()) for k, v in rest_to_arrays(rest_q).items()})
        back = rest_from_arrays({k: a.numpy() for k, a in record.items()}, ARGS, 4, bits, 16)
        assert list(back) == list(rest_q)
        for name, q in rest_q.items():
            assert torch.equal(dequantize(back[name]), dequantize(q)), (bits, name)
        with pytest.raises(ValueError, match="'q'"):  # the receiver checks shapes against its own args
            rest_from_arrays({k: a.numpy() for k, a in record.items()}, ARGS, 2, bits, 16)
        with pytest.raises(ValueError, match="names no split parameter"):
            rest_from_arrays({**rest_to_arrays(rest_q), "norm.weight:q": torch.zeros(1)}, ARGS, 4, bits, 16)


# ------------------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("world_size, rank", CASES)
@torch.no_grad()
def test_bits16_logits_equal_the_full_model(world_size, rank):
    full = random_model()
    x = tokens()
    expected = full(x)
    got = context_model(full, rank, world_size, 16)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("world_size, rank", [(2, 1), (4, 2)])
@torch.no_grad()
def test_quantized_logits_are_the_full_model_with_a_dequantized_rest(bits, world_size, rank):
    """Exact semantics: the context model computes the full model whose other blocks are
    dequantize(quantize(block)); nothing else differs."""
    full = random_model()
    x = tokens()
    got = context_model(full, rank, world_size, bits, 16)(x)
    sd = full.state_dict()
    rest_q = quantize_rest(context_rest(sd, ARGS, rank, world_size), bits, 16)
    rounded = {}
    for name, t in sd.items():
        rule = rule_for(name)
        if rule is REPLICATE:
            continue
        rest, size = dequantize(rest_q[name]), t.shape[rule.dim] // world_size
        lo = rank * size
        rounded[name] = torch.cat((rest.narrow(rule.dim, 0, lo), t.narrow(rule.dim, lo, size),
                                   rest.narrow(rule.dim, lo, rest.shape[rule.dim] - lo)), dim=rule.dim)
    full.load_state_dict(rounded, strict=False)
    torch.testing.assert_close(got, full(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("world_size", [2, 4])
@torch.no_grad()
def test_quantized_logits_error_is_within_the_stated_tolerance(bits, world_size):
    full = random_model(seed=3)
    x = tokens(seed=3)
    expected = full(x)
    for rank in range(world_size):
        err = rel_err(context_model(full, rank, world_size, bits)(x), expected)
        assert 1e-4 < err < LOGITS_TOL[bits], (rank, err)  # > 1e-4: the rest really is quantized


@pytest.mark.parametrize("world_size, rank", [(2, 0), (4, 3), (8, 3)])
@torch.no_grad()
def test_slice_sits_at_the_rank_position(world_size, rank):
    """Perturbing the trainable slice changes the logits exactly as perturbing rank's block of the full
    model does (bf16 rest, bf16-representable perturbation)."""
    full = random_model()
    ctx = context_model(full, rank, world_size, 16)
    x = tokens()
    before = full(x)
    gen = torch.Generator().manual_seed(7)
    ctx_params = dict(ctx.named_parameters())
    for name, block in shard(dict(full.named_parameters()), ARGS, rank, world_size).items():
        if rule_for(name) is REPLICATE:
            continue
        delta = (0.05 * torch.randn(block.shape, generator=gen)).bfloat16().float()
        block.add_(delta)  # a view into the full model's parameter
        ctx_params[name].add_(delta)
    after = full(x)
    assert rel_err(after, before) > 0.01  # the perturbation matters
    torch.testing.assert_close(ctx(x), after, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ what trains


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("world_size, rank", [(2, 1), (4, 0), (4, 2), (8, 7)])
def test_gradients_are_the_full_models_on_the_slice_and_replicated_params(world_size, rank, checkpointing):
    full = random_model()
    ctx = context_model(full, rank, world_size, 16)
    ctx.gradient_checkpointing = checkpointing
    x = tokens()
    for model in (full, ctx):
        model(x).logsumexp(-1).mean().backward()
    names = dict(ctx.named_parameters())
    assert {k: tuple(p.shape) for k, p in names.items()} == slice_shapes(ARGS, world_size)  # no other parameters
    expected = shard({k: p.grad for k, p in full.named_parameters()}, ARGS, rank, world_size)
    for name, p in names.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, b in ctx.named_buffers():
        assert not b.requires_grad and b.grad is None, name


def test_no_full_weight_is_kept_for_backward():
    """The dequantized full weights are transient: autograd saves no tensor of a full split weight's shape
    other than a parameter. Plain autograd through torch.cat + F.linear would, which shows the check can fail."""
    full = random_model()
    ctx = context_model(full, 1, 2, 8)
    full_shapes = {tuple(p.shape) for n, p in full.named_parameters() if rule_for(n) is not REPLICATE}

    def saved_non_parameters(model, run):
        params = {p.data_ptr() for p in model.parameters()}
        shapes = set()

        def pack(t):
            if t.data_ptr() not in params:
                shapes.add(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return shapes & full_shapes

    wq = ctx.layers[0].attention.wq
    x = torch.randn(3, 8, ARGS.dim, requires_grad=True)  # B*T = 24 rows: no split weight's shape
    plain = lambda: torch.nn.functional.linear(x, wq.full_weight(wq.weight, torch.float32))  # noqa: E731
    assert saved_non_parameters(ctx, plain) == {tuple(full.layers[0].attention.wq.weight.shape)}
    assert saved_non_parameters(ctx, lambda: ctx(tokens(shape=(3, 8)))) == set()


def test_state_dict_is_exactly_the_slice():
    full = random_model()
    sd = full.state_dict()
    ctx = context_model(full, 1, 2, 4)
    state = ctx.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == slice_shapes(ARGS, 2)
    expected = shard(sd, ARGS, 1, 2)
    for name, t in state.items():
        assert torch.equal(t, expected[name]), name
    sub = build_model(shard_args(ARGS, 2), seed=None)
    sub.load_state_dict(state, strict=True)  # the independent-mode reply code accepts it unchanged


def test_weight_decay_groups_are_the_sub_models():
    """AdamW decays the slice weights like the full model's linear weights (FrozenContextLinear is an
    nn.Linear), and leaves norms and embeddings alone."""
    ctx = context_model(random_model(), 0, 2, 8)
    sub = build_model(shard_args(ARGS, 2), seed=None)
    groups = [{g["weight_decay"]: sorted(g["names"]) for g in param_groups(m, 0.1)} for m in (ctx, sub)]
    assert groups[0] == groups[1] and groups[0][0.1] and groups[0][0.0]


def test_train_local_changes_only_the_slice_and_keeps_the_rest():
    full = random_model()
    ctx = context_model(full, 1, 4, 4)
    params_before = {k: v.clone() for k, v in ctx.state_dict().items()}
    buffers_before = {k: v.clone() for k, v in ctx.named_buffers()}
    assert len(buffers_before) == 2 * len(frozen_layers(ctx))  # rest_data and rest_scale per layer

    def batches():
        gen = torch.Generator().manual_seed(0)
        while True:
            x = torch.randint(0, ARGS.vocab_size, (2, 17), generator=gen)
            yield x[:, :-1], x[:, 1:]

    settings = TrainSettings(learning_rate=1e-3, local_steps=2, device="cpu", precision="fp32")
    metrics = train_local(ctx, batches(), settings)
    assert math.isfinite(metrics["train_loss"])
    after = ctx.state_dict()
    assert list(after) == list(params_before)
    for name, t in after.items():
        assert not torch.equal(t, params_before[name]), f"{name} did not train"
    for name, b in ctx.named_buffers():
        assert b.dtype == buffers_before[name].dtype and torch.equal(b, buffers_before[name]), name


def test_bf16_autocast_matches_the_full_model():
    """Under bf16 autocast the context model computes what the full model's nn.Linear layers compute."""
    full = random_model()
    ctx = context_model(full, 1, 2, 16)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ctx(x), full(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=1e-2)
    got.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ctx.parameters())


def test_build_refuses_a_rest_that_does_not_fit():
    full = random_model()
    sd = full.state_dict()
    slice_state = shard(sd, ARGS, 0, 2)
    rest_q = quantize_rest(context_rest(sd, ARGS, 0, 2), 8)
    missing = dict(rest_q)
    missing.pop("layers.0.attention.wq.weight")
    with pytest.raises(KeyError, match="wq"):
        build_context_model(ARGS, 0, 2, slice_state, missing)
    wrong = quantize_rest(context_rest(sd, ARGS, 0, 4), 8)  # a W=4 rest for a W=2 slice
    with pytest.raises(ValueError, match="shape"):
        build_context_model(ARGS, 0, 2, slice_state, wrong)
