"""World sizes beyond the kv heads: each kv head held by a replica group of W / n_kv_heads ranks (issue 31).

Shard/merge identity, the slices summing to the full layer and context mode at W = 8 are in test_sharding.py,
test_context.py and test_rest_adapter.py (their cases include W = 8 and 12). Here: which W are valid for the
real models, and the server's merges of a replica group's replies against a float64 reference."""

import pytest
import torch

from fedtp_flwr.model import ModelArgs, preset_args
from fedtp_flwr.model.sharding import block, block_position, rule_for, shard, shard_args, valid_world_sizes
from fedtp_flwr.server.aggregation import Contribution, WeightedFold
from fedtp_flwr.server.robust import robust_aggregate_slices

# 4 query heads over 2 kv heads: at W = 4 each kv head is held by 2 ranks
ARGS = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8)
W = 4
KV = "layers.0.attention.wk.weight"


@pytest.mark.parametrize("preset, sizes", [
    ("llama3.2-3b", [1, 2, 4, 8]),  # 24 query heads: 16 does not divide them
    ("llama3.1-8b", [1, 2, 4, 8, 16, 32]),
    ("llama3.1-70b", [1, 2, 4, 8, 16, 32, 64]),
])
def test_world_sizes_go_past_the_kv_heads_where_heads_and_ffn_divide(preset, sizes):
    assert valid_world_sizes(preset_args(preset)) == sizes


def test_smollm2_stays_at_three_its_ffn_does_not_divide_by_nine():
    """SmolLM2-135M: 9 heads over 3 kv heads, FFN 1536 = 2^9 x 3, so W = 9 would cut FFN units unequally."""
    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536)
    assert valid_world_sizes(smollm2) == [1, 3]
    with pytest.raises(ValueError, match="FFN hidden size 1536"):
        shard_args(smollm2, 9)


def test_a_rank_holds_its_groups_kv_head_and_its_own_query_heads():
    sub = shard_args(ARGS, W)
    assert (sub.n_heads, sub.n_kv_heads) == (1, 1)
    rule = rule_for(KV)
    assert [block_position(ARGS, rule, r, W) for r in range(W)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [block(ARGS, rule, r, W) for r in range(W)] == [(0, 4), (0, 4), (4, 4), (4, 4)]
    # query head h reads kv head h // 2: rank r's query head r reads kv head r // 2, the one it holds
    assert [block(ARGS, rule_for("layers.0.attention.wq.weight"), r, W)[0] // ARGS.head_dim for r in range(W)] == \
        [0, 1, 2, 3]


def _state(seed: int) -> dict[str, torch.Tensor]:
    from fedtp_flwr.model import build_model

    return build_model(ARGS, seed=seed).state_dict()


def _replies(ranks: list[int]) -> list[Contribution]:
    """One reply per entry of `ranks`: that rank's slice of another random model, weights 1, 2, 3, ..."""
    return [Contribution(r, shard(_state(10 + i), ARGS, r, W), float(i + 1)) for i, r in enumerate(ranks)]


def _kv_rows(state, index):
    lo, size = block(ARGS, rule_for(KV), 2 * index, W)
    return state[KV][lo:lo + size]


@pytest.mark.parametrize("weighting", ["per-rank", "all-clients"])
def test_a_kv_block_is_the_weighted_mean_of_its_groups_replies(weighting):
    old = _state(0)
    replies = _replies([0, 1, 1, 3])  # group 0: ranks 0, 1 (3 replies); group 1: rank 3 only
    fold = WeightedFold(old, ARGS, W, weighting)
    for c in replies:
        fold.add(c)
    got = fold.result()
    group0 = [c for c in replies if c.rank in (0, 1)]
    total = sum(c.weight for c in replies)
    if weighting == "per-rank":
        want0 = sum(c.weight * c.state[KV].double() for c in group0) / sum(c.weight for c in group0)
        want1 = replies[3].state[KV].double()  # the group's one reply
    else:  # every reply counts, a reply of the other group as a zero update of this block
        base0, base1 = _kv_rows(old, 0).double(), _kv_rows(old, 1).double()
        want0 = base0 + sum(c.weight * (c.state[KV].double() - base0) for c in group0) / total
        want1 = base1 + replies[3].weight * (replies[3].state[KV].double() - base1) / total
    torch.testing.assert_close(_kv_rows(got, 0).double(), want0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_kv_rows(got, 1).double(), want1, rtol=1e-6, atol=1e-7)
    # a query block is still its own rank's: rank 2 sent nothing, so its block keeps the old value
    lo, size = block(ARGS, rule_for("layers.0.attention.wq.weight"), 2, W)
    q = "layers.0.attention.wq.weight"
    assert torch.equal(got[q][lo:lo + size], old[q][lo:lo + size])


def test_the_robust_merge_takes_the_median_over_the_whole_replica_group():
    old = _state(0)
    replies = _replies([0, 1, 1, 2])
    got = robust_aggregate_slices(old, replies, ARGS, W, "median")
    group0 = torch.stack([c.state[KV] for c in replies if c.rank in (0, 1)])
    assert torch.equal(_kv_rows(got, 0), group0.median(dim=0).values)  # 3 replies: the middle one, exactly
    assert torch.equal(_kv_rows(got, 1), replies[3].state[KV])


@pytest.mark.slow  # three in-process runs of 8 nodes (tiny preset): tens of seconds each
@pytest.mark.parametrize("mode, codecs", [("independent", {}), ("context", {}),
                                          ("context", {"upload-codec": "int4-delta", "download-codec": "int4"})])
def test_a_run_at_twice_the_kv_heads_trains_every_rank(tmp_path, mode, codecs, caplog):
    """llama3.2-tiny (8 heads, 4 kv heads) at W = 8 through server.run and the client code, 8 nodes: every rank
    trains, the held-out loss falls, and each kv head's rows moved (the group's replies merged into it); also with
    the recipes' int4 codecs both ways (the update uploaded as low-bit deltas of the replicated rows)."""
    from fedtp_flwr.config import RunConfig
    from fedtp_flwr.server.app import experiment_key, run
    from fedtp_flwr.server.outputs import load_run_checkpoint, read_results
    from fedtp_flwr.testing.inprocess import InProcessGrid

    cfg = {"num-server-rounds": 1, "world-size": 8, "local-steps": 2, "batch-size": 2, "max-seq-len": 32,
           "eval-batches": 2, "max-batch-size": 4, "learning-rate": 1e-3, "slice-mode": mode,
           "output-dir": str(tmp_path), **codecs}
    run(InProcessGrid([{"partition-id": i, "num-partitions": 8} for i in range(8)], cfg), cfg, run_id=1)
    history = read_results(tmp_path / "run-1" / "experiment_results_llama32.pkl")[
        experiment_key(RunConfig.from_run_config(cfg))]
    assert history[1][1] < history[0][1], history
    assert "1 of 1 round trained (1: 8 clients)" in caplog.text
    ckpt = load_run_checkpoint(tmp_path / "run-1" / "checkpoints" / "llama32_tiny_ws8_lr0.001_round1.pth")
    from fedtp_flwr.server.app import initial_state

    args, start, *_ = initial_state(RunConfig.from_run_config(cfg))  # the round-0 model the server sent
    assert args.n_kv_heads == 4
    k = "layers.0.attention.wk.weight"
    for index in range(args.n_kv_heads):
        lo, size = block(args, rule_for(k), 2 * index, 8)
        assert not torch.equal(ckpt["model_state_dict"][k][lo:lo + size], start[k][lo:lo + size]), index
