"""The sharding plan: merge(shard) is the identity, and the slices sum to the full attention / FFN."""

import math

import pytest
import torch

from fedtp_flwr.model import ModelArgs, Transformer, build_model
from fedtp_flwr.model.sharding import block_count
from fedtp_flwr.model.transformer import rope_tables
from fedtp_flwr.sharding import (  # the public names (docs/architecture.md)
    merge,
    rule_for,
    shard,
    shard_args,
    slice_shapes,
    split_fraction,
    valid_world_sizes,
)

# GQA with 2 query heads per kv head; and 3 per kv head with an FFN multiplier (hidden 336).
CONFIGS = {
    "gqa2": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=61, multiple_of=16),
    "gqa3-ffn1.3": ModelArgs(dim=96, n_layers=2, n_heads=12, n_kv_heads=4, vocab_size=53, multiple_of=8,
                             ffn_dim_multiplier=1.3),
}
# W = 8 and 12: beyond the kv heads, each kv head held by a replica group of 2 (gqa2) or 3 (gqa3) ranks
CASES = [(name, w) for name, args in CONFIGS.items() for w in (1, 2, 4, 8, 12) if w in valid_world_sizes(args)]
assert CASES == [("gqa2", 1), ("gqa2", 2), ("gqa2", 4), ("gqa2", 8),
                 ("gqa3-ffn1.3", 1), ("gqa3-ffn1.3", 2), ("gqa3-ffn1.3", 4), ("gqa3-ffn1.3", 12)]


@torch.no_grad()
def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Fan-in scaled weights so attention scores are O(1) and every head contributes visibly."""
    model = build_model(args, seed=None)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if p.ndim == 1 else noise / math.sqrt(p.shape[1]))
    return model.eval()


def sub_models(model: Transformer, world_size: int) -> list[Transformer]:
    sub_args = shard_args(model.args, world_size)
    subs = []
    for rank in range(world_size):
        sub = build_model(sub_args, seed=None)
        sub.load_state_dict(shard(model.state_dict(), model.args, rank, world_size), strict=True)
        subs.append(sub.eval())
    return subs


@pytest.mark.parametrize("name, world_size", CASES)
def test_merge_of_shard_is_the_identity(name, world_size):
    """Split blocks come back bit for bit. A value held by n ranks (a replicated layer: n = W; a kv head of a replica
    group: n = W / n_kv_heads) is the float32 running mean of n equal values: exact for n = 1, 2 and 4 (each
    partial sum rounds back onto the grid the next one needs), within 2 ulps otherwise (W = 8, 12; kv groups of 3)."""
    args = CONFIGS[name]
    sd = random_model(args).state_dict()
    merged = merge([shard(sd, args, r, world_size) for r in range(world_size)], args)
    assert list(merged) == list(sd)
    for k in sd:
        assert merged[k].dtype == sd[k].dtype, k
        rule = rule_for(k)
        holders = world_size if rule is None else world_size // block_count(args, rule.unit, world_size)
        if holders in (1, 2, 4):
            assert torch.equal(merged[k], sd[k]), k
        else:
            torch.testing.assert_close(merged[k], sd[k], rtol=2 * torch.finfo(torch.float32).eps, atol=0, msg=k)


@pytest.mark.parametrize("name, world_size", CASES)
def test_slices_have_the_sub_model_shapes(name, world_size):
    args = CONFIGS[name]
    sd = random_model(args).state_dict()
    expected = slice_shapes(args, world_size)
    sub_args = shard_args(args, world_size)
    assert sub_args.head_dim == args.head_dim and sub_args.dim == args.dim
    for rank in range(world_size):
        assert {k: tuple(v.shape) for k, v in shard(sd, args, rank, world_size).items()} == expected


@pytest.mark.parametrize("block", ["attention", "feed_forward"])
@pytest.mark.parametrize("name, world_size", CASES)
def test_sum_of_slice_outputs_equals_full_output(name, world_size, block):
    """Tensor-parallel truth: per layer, the full block's output is the sum of the slices' outputs."""
    args = CONFIGS[name]
    model = random_model(args, seed=1)
    subs = sub_models(model, world_size)
    B, T = 2, 11
    x = torch.randn(B, T, args.dim, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_tables(args, T, x.device)  # slices share head_dim, hence the same tables

    def run(m: Transformer, i: int) -> torch.Tensor:
        mod = getattr(m.layers[i], block)
        return mod(x, cos, sin) if block == "attention" else mod(x)

    with torch.no_grad():
        for i in range(args.n_layers):
            full = run(model, i)
            parts = [run(sub, i) for sub in subs]
            torch.testing.assert_close(sum(parts), full, rtol=0, atol=1e-5)
            # Guard against a vacuous pass: outputs are substantial, and with W > 1 no single slice
            # already equals the whole.
            assert full.abs().mean().item() > 0.05
            if world_size > 1:
                assert all((p - full).abs().max().item() > 1e-2 for p in parts)


def test_invalid_world_size_lists_valid_ones():
    args = CONFIGS["gqa2"]
    assert valid_world_sizes(args) == [1, 2, 4, 8]
    sd = random_model(args).state_dict()
    for bad in (0, 3, 6, 16, 2.0):
        with pytest.raises(ValueError, match=r"valid world sizes: \[1, 2, 4, 8\]"):
            shard_args(args, bad)
        with pytest.raises(ValueError, match=r"valid world sizes: \[1, 2, 4, 8\]"):
            shard(sd, args, 0, bad)
    with pytest.raises(ValueError, match=r"valid world sizes: \[1, 2, 4, 8\]"):
        merge([sd, sd, sd], args)


def test_rank_outside_world_is_refused():
    args = CONFIGS["gqa2"]
    with pytest.raises(ValueError, match="rank 2"):
        shard(random_model(args).state_dict(), args, 2, 2)


def test_unknown_parameter_name_is_refused():
    args = CONFIGS["gqa2"]
    sd = dict(random_model(args).state_dict())
    sd["layers.0.attention.wq.bias"] = torch.zeros(args.dim)
    with pytest.raises(KeyError, match=r"layers\.0\.attention\.wq\.bias"):
        rule_for("layers.0.attention.wq.bias")
    with pytest.raises(KeyError, match=r"layers\.0\.attention\.wq\.bias"):
        shard(sd, args, 0, 2)
    with pytest.raises(KeyError, match=r"layers\.0\.attention\.wq\.bias"):
        merge([sd, sd], args)


def test_tensor_that_does_not_match_args_is_refused():
    """A state dict from other args would otherwise be cut into wrong, silently truncated slices."""
    args = CONFIGS["gqa2"]
    sd = dict(random_model(args).state_dict())
    sd["layers.1.feed_forward.w1.weight"] = torch.zeros(args.hidden_dim + 2, args.dim)
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w1\.weight"):
        shard(sd, args, 0, 2)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_returns_views_not_copies(world_size):
    args = CONFIGS["gqa2"]
    sd = random_model(args).state_dict()
    for rank in range(world_size):
        part = shard(sd, args, rank, world_size)
        for k, t in part.items():
            assert t.untyped_storage().data_ptr() == sd[k].untyped_storage().data_ptr(), k
            if rule_for(k) is None:
                assert t is sd[k], k


def test_merge_averages_replicated_parameters_with_weights():
    args = CONFIGS["gqa2"]
    sd = random_model(args).state_dict()
    a, b = shard(sd, args, 0, 2), shard(sd, args, 1, 2)
    b = {k: (v + 1.0 if rule_for(k) is None else v) for k, v in b.items()}
    merged = merge([a, b], args, weights=[3.0, 1.0])
    torch.testing.assert_close(merged["norm.weight"], sd["norm.weight"] + 0.25)
    assert torch.equal(merged["layers.0.attention.wq.weight"], sd["layers.0.attention.wq.weight"])


def test_split_fraction_of_a_tiny_model_counts_only_split_parameters():
    args = CONFIGS["gqa2"]
    sd = random_model(args).state_dict()
    split = sum(t.numel() for k, t in sd.items() if rule_for(k) is not None)
    assert split_fraction(args) == pytest.approx(split / sum(t.numel() for t in sd.values()))
