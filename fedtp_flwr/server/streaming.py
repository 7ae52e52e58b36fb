"""Replies one at a time, as they arrive: the transport half of the server's streaming aggregation.

`receive` pushes a round's messages through the Grid (`push_messages`) one batch at a time (the strategy
makes one batch per rank, so only one rank's encoded slice exists at once) and drops its references to
each batch once pushed. It then pulls each outstanding reply on its own (pull.pull_replies: on a deployment
the reply's arrays are assembled chunk by chunk, so the ServerApp holds one reply's bytes, once), so the
ServerApp never holds more than one reply, whatever the number of nodes. The strategy checks each reply,
folds it into running sums and releases it before the next one is pulled.

A round's replies end when every message has its reply, at `timeout`, or as soon as `enough()` says so
(round-quorum). Whatever is still outstanding then is left in `outstanding`, so the caller can name the
nodes and later remove their replies from the SuperLink unread (pull.discard_replies). A grid without
push/pull (a test double) is read through send_and_receive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from flwr.app import Message

from .pull import pull_replies

POLL_SECONDS = 1.0  # between sweeps over the outstanding replies (Flower's send_and_receive sleeps 3 s)


def receive(grid, batches: Iterable[list[Message]], timeout: float, outstanding: dict[str, None],
            enough: Callable[[], bool] = lambda: False, poll: float = POLL_SECONDS) -> Iterator[Message]:
    """Push each batch of `batches` (lists of messages; each list is emptied once pushed, so the caller must
    hold no other reference to its messages for their memory to go), then yield the replies one at a time.
    `outstanding` (filled here; a dict used as an ordered set, so replies are pulled in a fixed order and a
    run is reproducible) ends up holding the ids of the messages that got no reply."""
    if not hasattr(grid, "push_messages") or not hasattr(grid, "pull_messages"):
        yield from grid.send_and_receive([m for batch in batches for m in _take(batch)], timeout=timeout)
        return
    end = time.monotonic() + timeout
    pushed_ids = []
    for batch in batches:
        pushed = _take(batch)
        del batch
        pushed_ids.append([mid for mid in grid.push_messages(pushed) if mid])
        del pushed
    # Pulled round-robin over the batches: with the strategy's one batch per rank, that is node id order
    # (nodes in id order take ranks 0, 1, ..., W-1, 0, ...), so every rank is heard from early (round-quorum).
    for i in range(max(map(len, pushed_ids), default=0)):
        outstanding.update(dict.fromkeys(ids[i] for ids in pushed_ids if i < len(ids)))
    while outstanding and not enough():
        for mid in list(outstanding):
            replies = pull_replies(grid, mid)
            if replies:
                del outstanding[mid]
            while replies:
                yield replies.pop(0)  # the caller folds and releases it before the next pull
            if not outstanding or enough() or time.monotonic() >= end:
                return
        if time.monotonic() >= end:
            return
        time.sleep(min(poll, max(0.0, end - time.monotonic())))


def _take(messages: list[Message]) -> list[Message]:
    out = list(messages)
    if isinstance(messages, list):
        messages.clear()
    return out
