"""fedtp_flwr.server.pull: a reply assembled array by array from the SuperLink's objects (issue 12).

A stand-in for the SuperLink's Runtime API (PullMessages, PullObject, ConfirmMessageReceived) serves the objects
Flower itself makes of a message, so the walk over the object tree is tested against Flower's own format; the
real SuperLink path is covered by the deployment tests and bench/transport.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid

from fedtp_flwr.server import pull
from fedtp_flwr.wire import _npy_view, decode, encode

pytestmark = pytest.mark.usefixtures("server_identity")


def reply_message() -> tuple[Message, dict]:
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(700, 3001, generator=g).bfloat16(),  # > 4 chunks of 5 MiB
             "zeros": torch.zeros(6_000_000, dtype=torch.bfloat16),  # identical chunks (one object id, repeated)
             "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.ones(7, dtype=torch.bfloat16)}  # one Array object
    msg = Message(RecordDict({"arrays": encode(state, "bfloat16"), "metrics": MetricRecord({"num-examples": 3})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    return msg, state


class Runtime:
    """The three Runtime API calls pull makes, over one message's objects (content may be tampered with)."""

    def __init__(self, msg: Message, tamper=None):
        self.msg_id = msg.object_id
        self.contents = {k: o.deflate() for k, o in get_all_nested_objects(msg).items()}
        if tamper:
            tamper(self.contents)
        proto = message_to_proto(remove_content_from_message(msg))
        proto.metadata.message_id = self.msg_id
        proto.metadata.reply_to_message_id = "sent-1"
        self.res = PullAppMessagesResponse(messages_list=[proto], message_object_trees=[get_object_tree(msg)])
        self.pulled, self.confirmed = [], []

    def PullMessages(self, request):  # noqa: N802 - Flower's names
        return self.res if "sent-1" in request.message_ids else PullAppMessagesResponse()

    def PullObject(self, request):  # noqa: N802
        self.pulled.append(request.object_id)
        content = self.contents.get(request.object_id)
        return PullObjectResponse(object_found=content is not None, object_available=True, object_content=content or b"")

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)


def http_grid(runtime: Runtime) -> HttpGrid:
    grid = HttpGrid.__new__(HttpGrid)  # no connection: the runtime client is the stand-in
    grid.__dict__.update(_client=runtime, node=Node(node_id=0))
    grid.__dict__["_run"] = Run.create_empty(run_id=1)
    return grid


def test_a_reply_is_assembled_bit_for_bit_and_confirmed():
    msg, state = reply_message()
    runtime = Runtime(msg)
    grid = http_grid(runtime)
    assert pull.pull_replies(grid, "not-sent") == []
    (reply,) = pull.pull_replies(grid, "sent-1")
    assert runtime.confirmed == [runtime.msg_id] and reply.metadata.message_id == runtime.msg_id
    arrays = reply.content["arrays"]
    assert all(isinstance(a.data, bytearray) for a in arrays.values())
    got = decode(arrays, "bfloat16", dtype=None, copy=False)
    assert list(got) == list(state)
    assert all(torch.equal(got[k].view(torch.int16), state[k].view(torch.int16)) for k in state)
    assert int(reply.content["metrics"]["num-examples"]) == 3
    # the tensors are views of the assembled buffer, not copies of it
    assert np.shares_memory(_npy_view(arrays["a"]), np.frombuffer(arrays["a"].data, dtype=np.uint8))


def _retype(kind: str, new: str):
    def tamper(contents):
        for k, c in contents.items():
            if c.startswith(kind.encode()):
                contents[k] = new.encode() + c[len(kind):]
                return
    return tamper


@pytest.mark.parametrize("tamper, why", [
    (lambda c: c.pop(next(k for k, v in c.items() if v.startswith(b"MetricRecord"))), "could not be found"),
    (_retype("ArrayChunk", "ConfigRecord"), "a chunk of an Array has type 'ConfigRecord'"),
    (_retype("Array ", "ArrayChunk "), "a child of an ArrayRecord has type 'ArrayChunk'"),
])
def test_objects_that_do_not_form_a_message_become_an_error_reply(tamper, why):
    msg, _ = reply_message()
    runtime = Runtime(msg, tamper)
    (reply,) = pull.pull_replies(http_grid(runtime), "sent-1")  # no exception reaches the server
    assert reply.has_error() and why in reply.error.reason
    assert reply.metadata.reply_to_message_id == "sent-1"  # the strategy names the node from the message it sent


def test_late_replies_are_removed_unread():
    msg, _ = reply_message()
    runtime = Runtime(msg)
    assert pull.discard_replies(http_grid(runtime), ["sent-1", "sent-2"]) == {"sent-1"}
    assert runtime.confirmed == [runtime.msg_id] and runtime.pulled == []  # no object was pulled
