"""A Grid that delivers messages to this app's client logic in the same process.

For tests and benchmarks: the same ServerApp logic (`server.run`), Strategy and client functions as a
Flower run, without Flower's transport, processes or Ray, so many configurations can be compared side by
side quickly. Real runs use Flower's own Grid (`flwr run`).
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Iterable
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict

from fedtp_flwr.client.app import evaluate_reply, train_reply
from fedtp_flwr.compat import ErrorCode, ensure_run_identity, set_message_id
from fedtp_flwr.config import RunConfig
from fedtp_flwr.wire import record_nbytes
from fedtp_flwr.identity import identity_reply


def handle(msg: Message, cfg: RunConfig, node_config: Mapping[str, Any]) -> Message:
    """What client_app.py does with one message."""
    if msg.metadata.message_type.startswith(MessageType.QUERY):
        return identity_reply(msg, node_config)
    reply = train_reply if msg.metadata.message_type == MessageType.TRAIN else evaluate_reply
    return reply(msg, cfg, node_config)


class CachedClients:
    """`handle`, answering a message it already answered (same node, same records) with a copy of the same reply
    instead of training again: runs that differ only in the server's settings start from the same model with the same
    client seeds, so their first rounds are one computation (bench/strategy_defaults.py, the strategy tests)."""

    def __init__(self):
        self.replies: dict[str, RecordDict] = {}
        self.hits = self.misses = 0

    def __call__(self, msg: Message, cfg: RunConfig, node_config: Mapping[str, Any]) -> Message:
        if not msg.metadata.message_type.startswith("train"):  # e.g. the identity query: cheap, and not a reply to count
            return handle(msg, cfg, node_config)
        key = self._key(msg, node_config)
        if key in self.replies:
            self.hits += 1
        else:
            self.misses += 1
            reply = handle(msg, cfg, node_config)
            if reply.has_error():
                return reply
            self.replies[key] = copy.deepcopy(reply.content)
        return Message(copy.deepcopy(self.replies[key]), reply_to=msg)

    @staticmethod
    def _key(msg: Message, node_config: Mapping[str, Any]) -> str:
        h = hashlib.sha1(repr((msg.metadata.message_type, sorted(node_config.items()))).encode())
        for name, record in sorted(msg.content.items()):
            h.update(name.encode())
            if isinstance(record, ArrayRecord):
                for k, a in record.items():
                    h.update(repr((k, a.dtype, a.shape)).encode())
                    h.update(a.data)
            elif isinstance(record, ConfigRecord):
                h.update(repr(sorted(record.items())).encode())
        return h.hexdigest()


class InProcessGrid:
    """Nodes 1..N with the given node configs (e.g. partition-id/num-partitions or data-path); or, with `node_ids`,
    the nodes those ids name in turn (Flower's simulation draws random ids in every run)."""

    def __init__(self, node_configs: list[dict[str, Any]], run_config: Mapping[str, Any],
                 handler: Callable[[Message, RunConfig, Mapping[str, Any]], Message] = handle,
                 node_ids: list[int] | None = None, keep_arrays: bool = True):
        ensure_run_identity()  # Messages need a run id, as in a ServerApp process
        ids = node_ids if node_ids is not None else range(1, len(node_configs) + 1)
        self.node_configs = {i: dict(c) for i, c in zip(ids, node_configs, strict=True)}
        self.cfg = RunConfig.from_run_config(run_config)
        self.handler = handler
        self.delivered: list[Message] = []  # every train / evaluate message sent, for inspection
        self.queries: list[Message] = []  # the identity queries (fedtp_flwr/identity.py)
        self.replies: list[Message] = []  # every reply (error replies included), in the same order
        # Array bytes of each of them (wire.record_nbytes over its ArrayRecords), in the same orders. With
        # keep_arrays=False the kept messages are copies without their arrays (metadata, configs and metrics only):
        # a benchmark of a real model would otherwise hold every slice and reply of the run (GBs per round).
        self.delivered_bytes: list[int] = []
        self.reply_bytes: list[int] = []
        self.keep_arrays = keep_arrays
        self._queued: dict[str, Message] = {}  # pushed, not yet pulled

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue messages (each gets an id, as Flower's grid gives it); a node handles one when it is pulled."""
        ids = []
        for msg in messages:
            set_message_id(msg.metadata, mid := uuid.uuid4().hex)
            self._queued[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to these queued messages: their nodes handle them now (through send_and_receive)."""
        return self.send_and_receive([self._queued.pop(mid) for mid in message_ids if mid in self._queued])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            query = msg.metadata.message_type.startswith(MessageType.QUERY)  # the server's identity query
            try:
                reply = self.handler(msg, self.cfg, self.node_configs[msg.metadata.dst_node_id])
            except Exception as e:  # an exception the handler lets out becomes Flower's error reply, in its words
                reason = str(type(e)) + ":<'" + str(e) + "'>"  # flwr 1.42, supernode/runtime/run_clientapp.py
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            replies.append(reply)
            if query:
                self.queries.append(msg)
                continue
            self.delivered_bytes.append(_array_bytes(msg))
            self.reply_bytes.append(0 if reply.has_error() else _array_bytes(reply))
            if self.keep_arrays:
                self.delivered.append(msg)
                self.replies.append(reply)
            else:
                self.delivered.append(Message(_without_arrays(msg), dst_node_id=msg.metadata.dst_node_id,
                                              message_type=msg.metadata.message_type))
                self.replies.append(reply if reply.has_error() else Message(_without_arrays(reply), reply_to=msg))
        return replies


def _array_bytes(msg: Message) -> int:
    return sum(record_nbytes(r) for r in msg.content.values() if isinstance(r, ArrayRecord))


def _without_arrays(msg: Message) -> RecordDict:
    """The message's records with every ArrayRecord left empty (the other records are the same objects)."""
    return RecordDict({k: ArrayRecord() if isinstance(r, ArrayRecord) else r for k, r in msg.content.items()})
