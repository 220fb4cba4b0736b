"""Files kept beside a trajectory store, shared by every run that reads it (a sweep's trials).

    <store>.statistics/                                       the folder (statistics_store's groups live there)
    <store>.statistics/true-heldout-<fingerprint>-e<first>-s<segment_events>.json
        U, T, events and tail of the held-out events from event <first> on, under the store's own
        rates: the same for every trial of a study, so computed once

Numpy- and zarr-free: the training core reads it on machines without zarr. Written whole under a
temporary name and renamed into place; a file that does not parse is treated as absent.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

HELDOUT_FIELDS = ("log_likelihood", "t_final", "n_events", "tail")


def statistics_directory(store_path: str | Path) -> Path:
    store_path = Path(store_path).absolute()
    return store_path.with_name(store_path.name + ".statistics")


def heldout_path(store_path: str | Path, fingerprint: str, first_event: int, segment_events: int) -> Path:
    return statistics_directory(store_path) / f"true-heldout-{fingerprint}-e{first_event}-s{segment_events}.json"


def read_heldout(path: Path) -> dict[str, Any] | None:
    """The values written by ``write_heldout``, or None (absent or unreadable: compute again)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or set(values) != set(HELDOUT_FIELDS):
        return None
    return values


def write_heldout(path: Path, values: dict[str, Any]) -> None:
    """Kept when the folder can be written; a read-only one only costs recomputing next time."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({name: values[name] for name in HELDOUT_FIELDS}))
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
