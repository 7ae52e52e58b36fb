"""Replies one at a time, as they arrive: the transport half of the server's streaming aggregation.

`receive` pushes a round's messages through the Grid (`push_messages`), drops its references to them (the
slices it sent), and then pulls each outstanding reply on its own (`pull_messages` with one message id), so
the ServerApp never holds more than one reply that Flower inflated, whatever the number of nodes. The
strategy checks each reply, folds it into running sums and releases it before the next one is pulled.

A round's replies end when every message has its reply, at `timeout`, or as soon as `enough()` says so
(round-quorum). Whatever is still outstanding then is left in `outstanding` so the caller can log it; Flower
keeps such a late reply until its message's TTL expires, and it is never pulled: only this round's
message ids are asked for. A grid without push/pull (a test double) is read through send_and_receive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from flwr.app import Message

POLL_SECONDS = 1.0  # between sweeps over the outstanding replies (Flower's send_and_receive sleeps 3 s)


def receive(grid, messages: list[Message], timeout: float, outstanding: dict[str, None],
            enough: Callable[[], bool] = lambda: False, poll: float = POLL_SECONDS) -> Iterator[Message]:
    """Yield the replies to `messages` one at a time. `messages` is emptied (the caller must hold no other
    reference to them for their memory to go). `outstanding` (filled here; a dict used as an ordered set, so replies
    are pulled in push order and a run is reproducible) ends up holding the ids of the messages that got no
    reply; the caller names their nodes from what it sent."""
    if not hasattr(grid, "push_messages") or not hasattr(grid, "pull_messages"):
        yield from grid.send_and_receive(_take(messages), timeout=timeout)
        return
    end = time.monotonic() + timeout
    batch = _take(messages)
    outstanding.update(dict.fromkeys(mid for mid in grid.push_messages(batch) if mid))
    del batch
    while outstanding and not enough():
        for mid in list(outstanding):
            replies = list(grid.pull_messages([mid]))
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
