"""Vocabulary-parallel context mode: tok_embeddings and output split by vocabulary rows.

Against the unsharded model (bf16-representable weights, a 16-bit frozen rest): the context model's logits
are the full model's, and the gradients of the rows a rank trains are the full model's gradients of those
rows; the plan's round trip is bit-exact; vocabularies a world size does not divide, and vocabulary
splitting of independent sub-models, are refused with a message that says why.
"""

import pytest
import torch
from conftest import random_model, rel_err, tokens

from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.data.loss import token_loss
from fedtp_flwr.model import ModelArgs
from fedtp_flwr.model.context import (
    FrozenContextEmbedding,
    build_context_model,
    context_rest,
    quantize_rest,
    split_names,
)
from fedtp_flwr.model.sharding import (
    REPLICATE,
    check_world_size,
    rule_for,
    shard,
    slice_shapes,
    split_fraction,
    valid_world_sizes,
)
from fedtp_flwr.server.aggregation import Contribution, aggregate_slices, merge
from fedtp_flwr.training.chunked_loss import chunked_token_loss

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32)
CASES = [(2, 0), (2, 1), (4, 3)]
VOCAB = ("tok_embeddings.weight", "output.weight")


def vp_model(full, rank, world_size, bits=16):
    sd = full.state_dict()
    rest = quantize_rest(context_rest(sd, ARGS, rank, world_size, vocab_parallel=True), bits)
    return build_context_model(ARGS, rank, world_size, shard(sd, ARGS, rank, world_size, vocab_parallel=True), rest,
                               vocab_parallel=True)


def test_plan_splits_the_vocabulary_only_when_asked():
    for name in VOCAB:
        assert rule_for(name) is REPLICATE
        assert rule_for(name, vocab_parallel=True).dim == 0 and rule_for(name, vocab_parallel=True).unit == "vocab"
    assert slice_shapes(ARGS, 4, vocab_parallel=True)["output.weight"] == (64, 64)
    assert slice_shapes(ARGS, 4)["output.weight"] == (256, 64)
    assert set(VOCAB) <= set(split_names(ARGS, vocab_parallel=True)) and not set(VOCAB) & set(split_names(ARGS))
    assert split_fraction(ARGS, vocab_parallel=True) > split_fraction(ARGS)


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_shard_merge_round_trip_is_bit_exact(world_size):
    sd = random_model().state_dict()
    shards = [shard(sd, ARGS, r, world_size, vocab_parallel=True) for r in range(world_size)]
    for name in VOCAB:  # each rank holds its contiguous block of rows
        size = ARGS.vocab_size // world_size
        assert torch.equal(shards[1][name], sd[name][size:2 * size])
    merged = merge(shards, ARGS, vocab_parallel=True)
    assert merged.keys() == sd.keys()
    for k in sd:
        assert torch.equal(merged[k], sd[k]), k


def test_a_vocabulary_the_world_size_does_not_divide_is_refused():
    odd = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=258, multiple_of=32)
    assert valid_world_sizes(odd, vocab_parallel=True) == [1, 2]
    with pytest.raises(ValueError, match="vocab_size=258"):
        check_world_size(odd, 4, vocab_parallel=True)
    check_world_size(odd, 4)  # fine without vocabulary splitting


def test_independent_mode_refuses_vocabulary_splitting():
    with pytest.raises(ConfigError, match="vocab-parallel.*context"):
        RunConfig.from_run_config({"vocab-parallel": True})
    RunConfig.from_run_config({"vocab-parallel": True, "slice-mode": "context"})


@pytest.mark.parametrize("world_size, rank", CASES)
@torch.no_grad()
def test_bits16_logits_equal_the_full_model(world_size, rank):
    full = random_model()
    x = tokens()
    assert len(set((x // (ARGS.vocab_size // world_size)).flatten().tolist())) > 1  # tokens of several ranks
    torch.testing.assert_close(vp_model(full, rank, world_size)(x), full(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_token_of_another_rank_reads_its_frozen_row():
    """Guard: the parity above can fail. Changing one frozen embedding row changes exactly the positions of
    that token; changing an own row changes the own token's positions."""
    full = random_model()
    ctx = vp_model(full, 0, 2)
    emb = ctx.tok_embeddings
    assert isinstance(emb, FrozenContextEmbedding)
    x = torch.tensor([[3, 200, 5, 200]])  # 3, 5: rank 0's rows (0..127); 200: a frozen row
    before = emb(x).clone()
    emb.rest_data[200 - 128] += 1  # bf16 rest: row 200 of the vocabulary is row 72 of the rest
    after = emb(x)
    assert torch.equal(after[0, [0, 2]], before[0, [0, 2]])
    assert not torch.equal(after[0, [1, 3]], before[0, [1, 3]])
    emb.weight[3] += 1
    assert not torch.equal(emb(x)[0, 0], after[0, 0])


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("world_size, rank", CASES)
def test_gradients_of_the_trained_rows_are_the_full_models(world_size, rank, chunk):
    full = random_model()
    ctx = vp_model(full, rank, world_size)
    x, t = tokens(1), tokens(2)
    t[0, :3] = -100
    for model in (full, ctx):
        if chunk:
            chunked_token_loss(model.hidden_states(x), model.output, t, chunk).backward()
        else:
            token_loss(model(x), t)[0].backward()
    expected = shard({k: p.grad for k, p in full.named_parameters()}, ARGS, rank, world_size, vocab_parallel=True)
    for name, p in ctx.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert ctx.tok_embeddings.weight.grad.abs().sum() > 0 and ctx.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_low_bit_vocabulary_rest_stays_close(bits):
    full = random_model()
    x = tokens()
    err = rel_err(vp_model(full, 1, 2, bits)(x), full(x))
    assert 0 < err < {8: 0.03, 4: 0.45}[bits]  # the same bounds as the split layers' (test_context.py)


def test_all_clients_merge_of_vocabulary_rows():
    """A rank's rows move by its replies' updates weighted over every reply (a reply of another rank counts
    as a zero update for them); the norms stay averaged over all."""
    sd = random_model().state_dict()
    replies = []
    for rank in (0, 1):
        s = {k: v.clone() for k, v in shard(sd, ARGS, rank, 2, vocab_parallel=True).items()}
        s["output.weight"] += 1.0 + rank
        s["norm.weight"] += 4.0 * rank
        replies.append(Contribution(rank, s, 1.0))
    merged = aggregate_slices(sd, replies, ARGS, 2, "all-clients", vocab_parallel=True)
    torch.testing.assert_close(merged["output.weight"][:128], sd["output.weight"][:128] + 0.5)
    torch.testing.assert_close(merged["output.weight"][128:], sd["output.weight"][128:] + 1.0)
    torch.testing.assert_close(merged["norm.weight"], sd["norm.weight"] + 2.0)


def test_many_row_blocks_give_the_same_logits_and_gradients(monkeypatch):
    """Large layers rebuild their full weight a block of rows at a time (context.ROW_BLOCK_VALUES); with
    blocks of 100 values every layer here takes many blocks, of both split dims, and nothing changes."""
    import fedtp_flwr.model.context as context

    full = random_model()
    x, t = tokens(1), tokens(2)
    ref_ctx = vp_model(full, 1, 4)
    token_loss(ref_ctx(x), t)[0].backward()
    monkeypatch.setattr(context, "ROW_BLOCK_VALUES", 100)
    ctx = vp_model(full, 1, 4)
    assert len(list(ctx.layers[0].feed_forward.w2._row_blocks(ctx.layers[0].feed_forward.w2.weight, torch.float32))) > 1
    token_loss(ctx(x), t)[0].backward()
    torch.testing.assert_close(ctx(x), full(x), rtol=0, atol=1e-5)
    for (name, p), q in zip(ctx.named_parameters(), ref_ctx.parameters()):
        # only the float32 summation order differs: measured <= 2e-6 of the largest entry
        assert (p.grad - q.grad).abs().max() <= 2e-5 * q.grad.abs().max(), name
