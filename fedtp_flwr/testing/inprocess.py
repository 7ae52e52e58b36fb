"""A Grid that delivers messages to this app's client logic in the same process.

For tests and benchmarks: the same ServerApp logic (`server.run`), Strategy and client functions as a
Flower run, without Flower's transport, processes or Ray, so many configurations can be compared side by
side quickly. Real runs use Flower's own Grid (`flwr run`).
"""

from __future__ import annotations

import copy
import hashlib
import traceback
import uuid
from collections.abc import Iterable
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict

from fedtp_flwr.client.app import evaluate_reply, train_reply
from fedtp_flwr.compat import ensure_run_identity, set_message_id
from fedtp_flwr.config import RunConfig


def handle(msg: Message, cfg: RunConfig, node_config: Mapping[str, Any]) -> Message:
    """What client_app.py does with one message."""
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
    """Nodes 1..N with the given node configs (e.g. partition-id/num-partitions or data-path)."""

    def __init__(self, node_configs: list[dict[str, Any]], run_config: Mapping[str, Any],
                 handler: Callable[[Message, RunConfig, Mapping[str, Any]], Message] = handle):
        ensure_run_identity()  # Messages need a run id, as in a ServerApp process
        self.node_configs = {i + 1: dict(c) for i, c in enumerate(node_configs)}
        self.cfg = RunConfig.from_run_config(run_config)
        self.handler = handler
        self.delivered: list[Message] = []  # every message sent, for inspection
        self.replies: list[Message] = []  # every reply (error replies included), in the same order
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
            self.delivered.append(msg)
            try:
                replies.append(self.handler(msg, self.cfg, self.node_configs[msg.metadata.dst_node_id]))
            except Exception as e:  # a ClientApp exception becomes an error reply, as in Flower
                reason = "".join(traceback.format_exception_only(type(e), e)).strip()
                replies.append(Message(Error(code=2, reason=reason), reply_to=msg))
        self.replies.extend(replies)
        return replies
