"""Writes that a Ctrl-C or SIGTERM cannot cut in half.

Zarr writes chunks from its own I/O thread: a KeyboardInterrupt raised in the main thread while it
waits leaves that thread writing, so a partial store removed on the way out can reappear a moment
later. Inside ``deferred_interrupts()`` a SIGINT (and a SIGTERM that ``hpcdyn`` turns into one) is
recorded and delivered as soon as the block ends, when no write is pending any more.

A SIGTERM forwarded here arrives with its own number: it stops the command even where SIGINT is
ignored (a script's background job starts with SIGINT ignored, and a SIGTERM landing during a write
was once dropped that way), whereas a SIGINT the process ignores stays ignored.
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
    received: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            terminated = any(signum == signal.SIGTERM for signum, _ in received)
            _deliver(previous, terminated, received[-1][1])


def _deliver(handler, terminated: bool, frame) -> None:
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif terminated or handler != signal.SIG_IGN:
        raise KeyboardInterrupt
