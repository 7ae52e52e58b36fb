"""bench/communication.py's count of a round with codecs lists exactly the Arrays that the strategy and the client
really send: the same keys, shapes and dtypes (so its 3B figures are those of real messages)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import CONTEXT_ARGS as ARGS
from conftest import random_model
from flwr.app import ConfigRecord, MessageType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import communication  # noqa: E402

from fedtp_flwr.client.app import SliceJob, build_slice_model, upload  # noqa: E402
from fedtp_flwr.config import RunConfig  # noqa: E402
from fedtp_flwr.server.strategy import FederatedTensorParallel  # noqa: E402
from fedtp_flwr.wire import encode  # noqa: E402


def _listed(record_dict, names):
    return {f"{r}/{k}": (tuple(a.shape), str(a.dtype)) for r in names if r in record_dict
            for k, a in record_dict[r].items()}


@pytest.mark.parametrize("opts", [
    {"slice_mode": "context", "context_bits": 4, "context_group_size": 32, "wire_dtype": "bfloat16"},
    {"slice_mode": "context", "context_bits": 4, "upload_codec": "int4-delta", "download_codec": "int8"},
    {"slice_mode": "context", "upload_codec": "int8-delta", "download_codec": "int4", "rest_adapter_rank": 0},
    {"slice_mode": "independent", "upload_codec": "int4-delta"},
])
def test_recipe_arrays_are_the_arrays_of_real_messages(server_identity, opts):
    cfg = RunConfig(world_size=2, min_available_nodes=1, **opts)
    strategy = FederatedTensorParallel(ARGS, cfg)
    (msg,) = [m for b in strategy._message_batches(1, encode(random_model().state_dict()), ConfigRecord(), [5],
                                                    MessageType.TRAIN) for m in b]
    job = SliceJob.from_config(msg.content["config"])
    model = build_slice_model(job, msg.content, torch.device("cpu"))
    reply = upload(model.state_dict(), msg.content["arrays"], job, seed=0)
    counted = communication.recipe_arrays(ARGS, cfg)
    assert counted["down"] == _listed(msg.content, ("arrays", "context"))
    assert counted["up"] == _listed(reply, ("arrays", "delta"))


def test_lora_r16_counts_a_and_b_of_every_linear_of_the_3b():
    from fedtp_flwr.model import preset_args

    shapes = communication.lora_shapes(preset_args("llama3.2-3b"), 16)
    assert len(shapes) == 28 * 7 * 2  # wq wk wv wo w1 w2 w3, A and B, 28 blocks
    assert shapes["layers.0.attention.wk.weight:lora_A"] == (16, 3072)
    assert shapes["layers.0.attention.wk.weight:lora_B"] == (1024, 16)
    assert shapes["layers.0.feed_forward.w2.weight:lora_A"] == (16, 8192)
    # 16 x (in + out) per linear: 28 x 16 x (2 x 6144 + 2 x 4096 + 3 x 11264)
    assert sum(a * b for a, b in shapes.values()) == 28 * 16 * (2 * 6144 + 2 * 4096 + 3 * 11264) == 24_313_856
