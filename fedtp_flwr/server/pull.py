"""One reply from the SuperLink with its array bytes held once; late replies removed without pulling them.

Flower's HttpGrid.pull_messages (flwr 1.42) pulls every object of a reply (its arrays cut into 5 MiB chunks)
into one dict, inflates all the chunks, copies them into each Array's bytes and drops the chunks only when
the whole message is built: about 2-3.5 bytes of ServerApp memory per byte of the reply at its peak
(bench/results/transport.json). `pull_replies` makes the same Runtime API calls (PullMessages, PullObject per
object, ConfirmMessageReceived) but walks the reply's object tree itself and appends each chunk into its
Array's buffer as it arrives, so a reply costs its own bytes plus one chunk in flight.

`discard_replies` takes replies the server no longer wants (a round ended at round-quorum or round-timeout)
off the SuperLink without pulling their arrays: PullMessages deletes the message entries and
ConfirmMessageReceived the reply's objects, as after a normal pull. Without it a late reply would sit in the
SuperLink's memory until the run ends.

Any other grid (the simulation's InMemoryGrid, whose messages are in this process already; test doubles)
goes through its own pull_messages.

A reply whose objects do not form a valid Flower message (a client is never trusted) becomes an error reply
naming what is wrong, like Flower's own reply for objects that never arrive; the strategy drops it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import cast

from flwr.app import Array, ArrayRecord, Error, Message

from fedtp_flwr.compat import (
    PULL_BACKOFF_CAP,
    PULL_INITIAL_BACKOFF,
    PULL_MAX_TIME,
    ConfirmMessageReceivedRequest,
    ErrorCode,
    HttpGrid,
    ObjectPullError,
    ObjectUnavailableError,
    PullAppMessagesRequest,
    array_layout,
    error_reply_metadata,
    inflatable_class,
    make_message,
    make_pull_object_fn_protobuf,
    object_body,
    object_head,
    record_children,
    runtime_client,
    set_message_id,
)

Fetch = Callable[[str], bytes]


class MalformedReply(ValueError):
    pass


def pull_replies(grid, message_id: str, max_wait: float = PULL_MAX_TIME) -> list[Message]:
    """The replies to `message_id` that have arrived (Flower's SuperLink keeps one; another grid may give
    more), [] if none has. On the deployment's HttpGrid the reply is built chunk by chunk (module
    docstring); its Arrays' `data` are then bytearrays (read them as buffers)."""
    if not isinstance(grid, HttpGrid):
        return list(grid.pull_messages([message_id]))
    reply = _pull_one(grid, message_id, max_wait)
    return [] if reply is None else [reply]


def _pull_one(grid: HttpGrid, message_id: str, max_wait: float) -> Message | None:
    client, run_id = runtime_client(grid), grid.run.run_id
    res = client.PullMessages(PullAppMessagesRequest(message_ids=[message_id]))
    if not res.messages_list:
        return None
    proto, tree = res.messages_list[0], res.message_object_trees[0]
    msg_id = proto.metadata.message_id
    fetch = _fetcher(make_pull_object_fn_protobuf(client.PullObject, grid.node, run_id), max_wait)
    try:
        message = cast(Message, _inflate(tree, fetch))
        if not isinstance(message, Message):
            raise MalformedReply(f"its root object is a {type(message).__name__}, not a Message")
    except ObjectPullError as e:  # objects that never arrived: Flower answers the same way (and keeps them)
        return _error_reply(grid, run_id, proto, ErrorCode.MESSAGE_UNAVAILABLE,
                            f"Reply message objects are unavailable. {e}")
    except Exception as e:  # noqa: BLE001 - whatever a client's objects hold, the server keeps running
        _confirm(grid, run_id, msg_id)
        return _error_reply(grid, run_id, proto, ErrorCode.UNKNOWN,
                            f"the reply's objects do not form a Flower message ({type(e).__name__}: {e})")
    _confirm(grid, run_id, msg_id)
    set_message_id(message.metadata, msg_id)
    return message


def discard_replies(grid, message_ids: Iterable[str]) -> set[str]:
    """Remove the replies to `message_ids` that have arrived from the SuperLink, unread; -> the ids of the
    messages whose replies were removed."""
    ids = list(message_ids)
    if not ids:
        return set()
    if not isinstance(grid, HttpGrid):
        return {m.metadata.reply_to_message_id for m in grid.pull_messages(ids)}
    res = runtime_client(grid).PullMessages(PullAppMessagesRequest(message_ids=ids))
    for proto in res.messages_list:
        _confirm(grid, grid.run.run_id, proto.metadata.message_id)
    return {proto.metadata.reply_to_message_id for proto in res.messages_list}


def _confirm(grid, run_id: int, msg_id: str) -> None:
    runtime_client(grid).ConfirmMessageReceived(
        ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=msg_id))


def _fetcher(pull: Fetch, max_wait: float) -> Fetch:
    """pull(object_id) retried with backoff while the SuperLink says the object is not there yet (the sender
    may still be uploading it), as Flower's pull_objects does; ObjectPullError after max_wait seconds."""
    def fetch(object_id: str) -> bytes:
        start, delay = time.monotonic(), float(PULL_INITIAL_BACKOFF)
        while True:
            try:
                return pull(object_id)
            except ObjectUnavailableError:
                if time.monotonic() - start >= max_wait:
                    raise ObjectPullError(object_id, "timeout or retry limit reached") from None
                time.sleep(delay)
                delay = min(delay * 2, float(PULL_BACKOFF_CAP))
    return fetch


def _inflate(tree, fetch: Fetch):
    """The object at the root of `tree` (a Flower ObjectTree), its children first. An Array's chunks are
    appended into one buffer as they are fetched; nothing else of the reply is held twice."""
    content = fetch(tree.object_id)
    obj_type, children_ids = object_head(content)
    cls = inflatable_class(obj_type)
    if cls is None or obj_type in ("Array", "ArrayChunk"):  # an Array is only read as an ArrayRecord's child
        raise MalformedReply(f"object {tree.object_id[:12]} has type {obj_type[:40]!r} here")
    subtrees = {t.object_id: t for t in tree.children}
    children, buffers = {}, {}
    for cid in children_ids:
        if cid not in subtrees:
            raise MalformedReply(f"child {cid[:12]} of {obj_type} is missing from the reply's object tree")
        if cid in children:
            continue
        if obj_type == ArrayRecord.__qualname__:
            children[cid], buffers[cid] = _inflate_array(subtrees[cid], fetch)
        else:
            children[cid] = _inflate(subtrees[cid], fetch)
    obj = cls.inflate(content, children=children)
    if buffers:  # ArrayRecord.inflate copies its Arrays, accepting only bytes: the data goes in afterwards
        for name, cid in record_children(object_body(content)).items():
            obj[name].data = buffers[cid]  # a bytearray: no second copy of the array's bytes
    return obj


def _inflate_array(tree, fetch: Fetch) -> tuple[Array, bytearray]:
    """An Array with empty data, and its data assembled from its chunks."""
    content = fetch(tree.object_id)
    kind, children_ids = object_head(content)
    if kind != Array.__qualname__:
        raise MalformedReply(f"a child of an ArrayRecord has type {kind[:40]!r}")
    dtype, shape, stype, order = array_layout(object_body(content), children_ids)  # chunk ids in data order
    data = bytearray()
    for cid in order:
        chunk = fetch(cid)
        kind, _ = object_head(chunk)
        if kind != "ArrayChunk":
            raise MalformedReply(f"a chunk of an Array has type {kind[:40]!r}")
        data += object_body(chunk)  # one chunk at a time: the buffer grows in place
        del chunk
    return Array(dtype=dtype, shape=shape, stype=stype, data=b""), data


def _error_reply(grid, run_id: int, proto, code: int, reason: str) -> Message:
    """A reply standing for one that could not be pulled, as Flower's HttpGrid makes it: from the SuperLink's
    node, replying to the original message (the strategy names the node it was meant for from that)."""
    return make_message(metadata=error_reply_metadata(grid, run_id, proto.metadata.reply_to_message_id),
                        error=Error(code=code, reason=reason))
