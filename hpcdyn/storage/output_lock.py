"""One writer per output: a lock beside each output path, and the cleaning of stale leftovers.

    with output_lock(Path("run.zarr"), option="out"):
        ...   # the only hpcdyn process writing run.zarr; a second one is refused at once

The lock is ``.<name>.lock`` beside the output, held with ``flock`` (released by the kernel when
the process dies, however it dies) and removed when the writer is done. A second driver on the
same output gets a one-line refusal that names the holder (pid, host, start time) instead of
running every unit twice. While the lock is held, no other hpcdyn process can be writing that
output, so temporary files of earlier, killed runs (``.<name>.partial-*``, ``.<name>.old-*``) are
stale and are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from hpcdyn.storage.integrity import StoreError

STALE_PATTERNS = ("partial-*", "old-*")


class OutputBusyError(StoreError):
    """Another process holds the output's lock."""


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _holder(descriptor: int) -> str:
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        return os.read(descriptor, 200).decode(errors="replace").strip() or "unknown process"
    except OSError:
        return "unknown process"


def _acquire(path: Path, option: str) -> int:
    target = lock_path(path)
    while True:
        descriptor = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise OutputBusyError(
                f"{option}: {path} is being written by another hpcdyn process ({holder}); "
                f"wait for it to finish (or stop it), or choose another --{option.replace('_', '-')}"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock
            if os.stat(target).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def remove_stale(path: Path) -> list[str]:
    """Remove this tool's temporary leftovers of ``path`` (call only while holding its lock)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for leftover in path.parent.glob(f".{path.name}.{pattern}"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
    return removed


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, option: str = "out", clean: bool = True) -> Iterator[Path]:
    """Hold the lock of ``path`` (its parent is created, and removed again when nothing was written
    there); with ``clean``, stale leftovers go first."""
    path = Path(path).absolute()
    created = [parent for parent in path.parents if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _acquire(path, option)
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}".encode())
        if clean:
            remove_stale(path)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path(path))
        os.close(descriptor)
        _remove_empty(created)


def _remove_empty(directories: list[Path]) -> None:
    """Directories this lock created for nothing (deepest first); stops at the first that holds something."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return
