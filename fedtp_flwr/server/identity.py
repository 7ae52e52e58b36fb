"""The federation's nodes in an order that is the same in every run: by the identity each node states.

Flower draws node ids at random when a node registers (every simulation draws new ones), and its strategies
sample with random.sample over the grid's list of ids; ranks were assigned in id order. So the same nodes got
other ranks and other samples in another run, and a resumed run was not the uninterrupted one. Here each node
is asked once per run, the first time it is seen, for its identity (fedtp_flwr/identity.py: node-name, else
partition-id), and both the rank assignment and the list Flower samples from follow that order; Flower's id is
only the tiebreak, and the order of nodes that state nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore import log

from fedtp_flwr.identity import IDENTITY_ACTION, IDENTITY_RECORD, describe, identity_from_record, order_key

from .streaming import receive

IDENTITY_MESSAGE_TYPE = f"{MessageType.QUERY}.{IDENTITY_ACTION}"
MAX_WAIT_S = 120.0  # for the identity replies; a node that has not answered by then is ordered by Flower's id


class NodeOrder:
    """node id -> the identity it stated (None: none), learned as nodes come online."""

    def __init__(self, timeout: float, ttl: float, ask: bool = True):
        self.timeout, self.ttl, self.ask = min(timeout, MAX_WAIT_S), ttl, ask
        self.identities: dict[int, dict | None] = {}

    def learn(self, grid, node_ids: Iterable[int]) -> None:
        """Ask the nodes not seen before for their identity (one small query each, answered in parallel)."""
        new = [n for n in node_ids if n not in self.identities]
        if not new:
            return
        if not self.ask:  # Flower's ids order them
            self.identities.update(dict.fromkeys(new))
            return
        msgs = [Message(RecordDict({"config": ConfigRecord({"fedtp": IDENTITY_ACTION})}), dst_node_id=n,
                        message_type=IDENTITY_MESSAGE_TYPE, ttl=self.ttl) for n in sorted(new)]
        stated: dict[int, dict | None] = {}
        for reply in receive(grid, [msgs], self.timeout, {}):
            node = reply.metadata.src_node_id
            if node in stated or node not in new:
                continue
            try:
                stated[node] = None if reply.has_error() else identity_from_record(reply.content.get(IDENTITY_RECORD))
            except Exception:  # noqa: BLE001 - an untrusted reply: whatever it holds, the node is just unnamed
                stated[node] = None
        for n in new:
            self.identities[n] = stated.get(n)
        log(INFO, "node identities: %s", ", ".join(f"{n}: {describe(self.identities[n])}" for n in self.sorted(new)))
        counts = Counter(order_key(i, 0) for i in self.identities.values() if i)
        if same := sorted(describe(i) for i in self.identities.values() if i and counts[order_key(i, 0)] > 1):
            log(WARNING, "several nodes state the same identity (%s): their order follows Flower's node ids, which "
                "change between runs (give each SuperNode its own --node-config node-name)", ", ".join(sorted(set(same))))

    def key(self, node_id: int) -> tuple:
        return order_key(self.identities.get(node_id), node_id)

    def sorted(self, node_ids: Iterable[int]) -> list[int]:
        return sorted(node_ids, key=self.key)


class OrderedGrid:
    """The grid as Flower's strategies see it: get_node_ids() in the stable order (learning new nodes first), so
    random.sample over that list picks the same nodes in every run that has the same `random` state."""

    def __init__(self, grid, order: NodeOrder):
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        ids = list(self._grid.get_node_ids())
        self._order.learn(self._grid, ids)
        return self._order.sorted(ids)

    def __getattr__(self, name):
        return getattr(self._grid, name)
