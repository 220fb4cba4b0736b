"""Writes that a Ctrl-C or SIGTERM cannot cut in half.

Zarr writes chunks from its own I/O thread: a KeyboardInterrupt raised in the main thread while it
waits leaves that thread writing, so a partial store removed on the way out can reappear a moment
later. Inside ``deferred_interrupts()`` a SIGINT (and a SIGTERM that ``hpcdyn`` turns into one) is
recorded and delivered as soon as the block ends, when no write is pending any more.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT until the block is done, then deliver it as the previous handler would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous, received[-1])


def _deliver(handler, frame) -> None:
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt
