"""upload-codec int8-delta / int4-delta: a client uploads its update (trained - received) in low-bit blockwise absmax
with stochastic rounding; the server checks it and folds it, a block of rows at a time, into the same merge."""

import math

import pytest
import torch
from conftest import CONTEXT_ARGS as ARGS
from conftest import random_model
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtp_flwr.model.quant import dequantize, quantize
from fedtp_flwr.model.sharding import shard, slice_shapes
from fedtp_flwr.server import aggregation
from fedtp_flwr.server.aggregation import Contribution, WeightedFold
from fedtp_flwr.server.replies import ReplyError, check_reply
from fedtp_flwr.server.robust import update_rms
from fedtp_flwr.wire import decode_delta, encode, encode_delta

W = 2


def trained(state, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in shard(state, ARGS, rank, W).items()}


def deltas(state, rank, new, bits, seed=0):
    sent = shard(state, ARGS, rank, W)
    record = encode_delta(new, lambda name: sent[name], bits, torch.Generator().manual_seed(seed))
    return record, decode_delta(record, slice_shapes(ARGS, W), bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_update_round_trips_within_its_scale(bits):
    state = random_model().state_dict()
    new = trained(state, 0, 1)
    _, q = deltas(state, 0, new, bits)
    old = shard(state, ARGS, 0, W)
    for k, t in new.items():
        d = dequantize(q[k]).reshape(t.shape)
        step = q[k].scale.max()  # stochastic rounding: |error| < one step of the group's scale
        assert (d - (t - old[k])).abs().max() <= step * (1 + 1e-5), k


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    mean = torch.stack([dequantize(quantize(x, 4, 64, torch.Generator().manual_seed(s))) for s in range(2000)]).mean(0)
    nearest = (dequantize(quantize(x, 4, 64)) - x).abs().mean()
    assert (mean - x).abs().mean() < nearest / 10  # the bias of round-to-nearest, averaged away


@pytest.mark.parametrize("weighting", ["per-rank", "all-clients"])
def test_folding_updates_equals_folding_the_weights_they_stand_for(weighting, monkeypatch):
    """A block of rows at a time (BLOCK_VALUES small here), the fold of the updates gives the merge of the weights
    old + dequantized update, up to float32 rounding."""
    monkeypatch.setattr(aggregation, "BLOCK_VALUES", 100)
    state = random_model().state_dict()
    replies, weights = [], []
    for i, rank in enumerate([0, 1, 1]):
        _, q = deltas(state, rank, trained(state, rank, i), 4, seed=i)
        old = shard(state, ARGS, rank, W)
        replies.append(Contribution(rank, q, 2.0 + i))
        weights.append(Contribution(rank, {k: old[k] + dequantize(v).reshape(old[k].shape) for k, v in q.items()},
                                    2.0 + i))
    merged = []
    for cs in (replies, weights):
        fold = WeightedFold(state, ARGS, W, weighting)
        for c in cs:
            fold.add(Contribution(c.rank, dict(c.state), c.weight), release=True)
        merged.append(fold.result())
    for k in state:
        torch.testing.assert_close(merged[0][k], merged[1][k], rtol=1e-5, atol=1e-6, msg=k)
    rms = [update_rms(state, c, ARGS, W) for c in (replies[0], weights[0])]
    assert rms[0] == pytest.approx(rms[1], rel=1e-4)


def _message(state, record):
    return Message(RecordDict({"arrays": ArrayRecord(), "delta": record, "metrics": MetricRecord({"num-examples": 4})}),
                   dst_node_id=0, message_type=MessageType.TRAIN)


def test_a_valid_update_passes_and_bad_ones_are_refused_with_the_reason(server_identity):
    state = random_model().state_dict()
    record, _ = deltas(state, 0, trained(state, 0, 0), 8)
    expect = (slice_shapes(ARGS, W), 8)
    checked = check_reply(_message(state, record), {}, "float32", 10**6, expect)
    assert set(checked.state) == set(slice_shapes(ARGS, W))
    k = "layers.0.attention.wq.weight"
    cases = {
        "scale": (lambda r: r.__setitem__(f"{k}:scale", Array(torch.full(tuple(r[f"{k}:scale"].shape),
                                                                           math.nan).numpy())),
                  r"wq\.weight: scales must be finite"),
        "dtype": (lambda r: r.__setitem__(f"{k}:q", Array(torch.zeros(tuple(r[f"{k}:q"].shape)).numpy())),
                  r"wq\.weight:q: dtype float32, expected int8"),
        "missing": (lambda r: r.pop(f"{k}:q"), r"delta arrays differ: missing \['layers\.0\.attention\.wq\.weight:q'\]"),
        "shape": (lambda r: r.__setitem__(f"{k}:q", Array(torch.zeros(3, 3, dtype=torch.int8).numpy())),
                  r"wq\.weight: array 'q' is torch\.int8 \(3, 3\)"),
    }
    for name, (tamper, reason) in cases.items():
        bad, _ = deltas(state, 0, trained(state, 0, 0), 8)
        tamper(bad)
        with pytest.raises(ReplyError, match=reason):
            check_reply(_message(state, bad), {}, "float32", 10**6, expect)
    weights_only = Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 4})}),
                           dst_node_id=0, message_type=MessageType.TRAIN)
    with pytest.raises(ReplyError, match=r"expected exactly \['arrays', 'delta', 'metrics'\]"):
        check_reply(weights_only, {}, "float32", 10**6, expect)


# ------------------------------------------------------------------------------------------- download-codec


def test_a_low_bit_download_needs_an_update_upload():
    from fedtp_flwr.config import ConfigError, RunConfig

    RunConfig(download_codec="int8", upload_codec="int4-delta")
    with pytest.raises(ConfigError, match="download-codec.*needs upload-codec"):
        RunConfig(download_codec="int8")


def test_a_client_refuses_a_codec_it_does_not_know(server_identity):
    """A server of another app version asking for a codec this client lacks: refused by name, never read as the
    default codec (the client's table is wire.py's, the one config.py offers)."""
    from fedtp_flwr.client.app import SliceJob
    from fedtp_flwr.config import RunConfig
    from fedtp_flwr.server.strategy import FederatedTensorParallel

    s = FederatedTensorParallel(ARGS, RunConfig(world_size=W, min_available_nodes=1))
    (msg,) = [m for batch in s._message_batches(1, encode(random_model().state_dict()), ConfigRecord(), [7],
                                                MessageType.TRAIN) for m in batch]
    assert SliceJob.from_config(msg.content["config"]).upload_codec == "weights"
    for key, codec in (("upload-codec", "int2-delta"), ("download-codec", "int2")):
        config = ConfigRecord({**dict(msg.content["config"]), key: codec})
        with pytest.raises(ValueError, match=f"the server asks for {key} '{codec}', which this client does not know"):
            SliceJob.from_config(config)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_client_starts_from_the_dequantized_slice_and_its_update_is_relative_to_it(server_identity, bits):
    """The server sends the slice quantized; the client's model holds its dequantization, and the update it uploads
    is trained - that start, so the server's float32 master plus the update is what the client ended with (up to
    the update's own rounding)."""
    from fedtp_flwr.client.app import SliceJob, build_slice_model, upload
    from fedtp_flwr.config import RunConfig
    from fedtp_flwr.server.strategy import FederatedTensorParallel

    codec = {8: "int8", 4: "int4"}[bits]
    cfg = RunConfig(world_size=W, download_codec=codec, upload_codec="int8-delta", min_available_nodes=1)
    s = FederatedTensorParallel(ARGS, cfg)
    state = random_model().state_dict()
    (msg,) = [m for batch in s._message_batches(1, encode(state), ConfigRecord(), [7], MessageType.TRAIN)
              for m in batch]
    job = SliceJob.from_config(msg.content["config"])
    model = build_slice_model(job, msg.content, torch.device("cpu"))
    sent = shard(state, ARGS, 0, W)
    for k, t in model.state_dict().items():
        err = (t - sent[k]).abs().max() / sent[k].abs().max().clamp_min(1e-12)
        assert 0 < err <= 1 / {8: 127, 4: 7}[bits], (k, err)  # quantized: near the master, not equal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    trained = model.state_dict()
    records = upload(dict(trained), msg.content["arrays"], job, seed=0)
    update = decode_delta(records["delta"], slice_shapes(ARGS, W), 8)
    start = {k: v for k, v in model.state_dict().items()}
    for k, q in update.items():
        torch.testing.assert_close(dequantize(q).reshape(start[k].shape), torch.full_like(start[k], 0.01),
                                   atol=0.01 / 100, rtol=0)  # the update is the 0.01 step, not the quantization error
