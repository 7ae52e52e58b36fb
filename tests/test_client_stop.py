"""A ClientApp stopped with SIGTERM answers its message with an error reply (so its SuperNode takes the next
message) instead of ending without one; outside a message the previous SIGTERM handler is in place."""

import os
import signal
import threading

import pytest

from fedtp_flwr.client.app import ClientAppStopped, stop_on_sigterm


def test_sigterm_while_handling_a_message_raises_an_exception_flower_replies_with():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ClientAppStopped, match="SIGTERM"):
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000_000):  # the handler runs between bytecodes: it interrupts this loop
                pass
    assert not issubclass(ClientAppStopped, (SystemExit, KeyboardInterrupt))  # Flower's `except Exception` sees it
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def worker():
        with stop_on_sigterm():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [before]
