"""The in-process grid's record of a run: every message and reply, or (keep_arrays=False, the benchmarks on real
models) the same messages without their arrays, with their array bytes counted either way."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtp_flwr.testing.inprocess import InProcessGrid
from fedtp_flwr.wire import record_nbytes


def echo(msg, cfg, node_config):
    """A client that answers with 10 float32 values and a metric."""
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(10, np.float32))}),
                          "metrics": MetricRecord({"x": 1.0})})
    return Message(content, reply_to=msg)


def train_message():
    content = RecordDict({"arrays": ArrayRecord({"a": Array(np.zeros(4, np.float32))}), "config": ConfigRecord({"k": 1})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("keep_arrays", [True, False])
def test_the_grid_counts_array_bytes_and_keeps_arrays_only_when_asked(keep_arrays):
    grid = InProcessGrid([{"partition-id": 0, "num-partitions": 1}], {}, handler=echo, keep_arrays=keep_arrays)
    (reply,) = grid.send_and_receive([train_message()])
    assert len(reply.content["arrays"]) == 1  # the server always gets the whole reply
    sent_bytes, reply_bytes = record_nbytes(train_message().content["arrays"]), record_nbytes(reply.content["arrays"])
    assert sent_bytes > 0 and reply_bytes > sent_bytes  # 10 values against 4
    assert grid.delivered_bytes == [sent_bytes] and grid.reply_bytes == [reply_bytes]
    (sent,), (kept,) = grid.delivered, grid.replies
    assert len(sent.content["arrays"]) == len(kept.content["arrays"]) == (1 if keep_arrays else 0)
    assert sent.metadata.message_type == MessageType.TRAIN and sent.content["config"]["k"] == 1
    assert kept.content["metrics"]["x"] == 1.0 and not kept.has_error()
