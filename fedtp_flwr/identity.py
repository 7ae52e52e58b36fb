"""What a node tells the server about itself: a name that stays the same across runs (both apps load this).

Flower's node ids are drawn at random each time a node registers (every simulation, every SuperNode that
registers anew), so an order of nodes by id is not the same from one run to the next. The server orders nodes
(ranks, sampling) by this identity instead, so a resumed run gives each node the rank the uninterrupted run
gave it. The identity is the node config's `node-name` (a SuperNode's --node-config) or, in simulation, its
`partition-id`; a node with neither says nothing and is ordered by Flower's id.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ConfigRecord, Message, RecordDict

IDENTITY_ACTION = "identity"  # the query's action: message type "query.identity"
IDENTITY_RECORD = "identity"
IDENTITY_KEYS = ("node-name", "partition-id")


def node_identity(node_config: Mapping[str, Any]) -> dict[str, str | int]:
    """{"node-name": str} and / or {"partition-id": int}, from this node's config (empty when it has neither)."""
    out: dict[str, str | int] = {}
    if "node-name" in node_config:
        out["node-name"] = str(node_config["node-name"])
    if "partition-id" in node_config:
        out["partition-id"] = int(node_config["partition-id"])
    return out


def identity_reply(msg: Message, node_config: Mapping[str, Any]) -> Message:
    """The ClientApp's answer to the server's identity query."""
    return Message(RecordDict({IDENTITY_RECORD: ConfigRecord(node_identity(node_config))}), reply_to=msg)


MAX_NAME = 256  # characters of a node-name the server keeps (a reply is untrusted)


def identity_from_record(record: Any) -> dict[str, str | int] | None:
    """The identity a reply's record states, or None when it states none that can be used (wrong types, an
    over-long name): such a node is ordered by Flower's id, as if it had said nothing."""
    if not isinstance(record, ConfigRecord):
        return None
    out: dict[str, str | int] = {}
    name = record.get("node-name")
    if isinstance(name, str) and 0 < len(name) <= MAX_NAME:
        out["node-name"] = name
    pid = record.get("partition-id")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
        out["partition-id"] = pid
    return out or None


def order_key(identity: Mapping[str, str | int] | None, node_id: int) -> tuple:
    """Sort key of a node: named nodes by name, then simulated nodes by partition id, then the rest by Flower's
    id (also the tiebreak between nodes that state the same identity)."""
    if identity and "node-name" in identity:
        return (0, str(identity["node-name"]), 0, node_id)
    if identity and "partition-id" in identity:
        return (1, "", int(identity["partition-id"]), node_id)
    return (2, "", 0, node_id)


def describe(identity: Mapping[str, str | int] | None) -> str:
    if identity and "node-name" in identity:
        return repr(identity["node-name"])
    if identity and "partition-id" in identity:
        return f"partition {identity['partition-id']}"
    return "unnamed"
