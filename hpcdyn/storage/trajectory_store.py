"""The trajectory store (DESIGN 3.1): one trajectory as a Zarr v3 group.

    attrs              schema, system, params, t_final, seed, n_events, version, created, complete, ...
    initial_position   int64  [token, axis]      (x, y)
    initial_state      int8   [token]            orientation or spin
    event_token        int32  [event]
    event_move         int8   [event]
    event_dwell        float64[event]            residence time before event k
    snapshot_time      float64[snapshot]         optional, regular times
    snapshot_occupancy int8   [snapshot, y, x]   0 empty, 1 + state of the token on the site

A store is written under a temporary sibling name and renamed into place only once it is complete,
so a crashed run never leaves a store that looks finished. Events are appended in whole chunks of
at least 1 MB, so memory stays bounded however long the trajectory is.
"""

from __future__ import annotations

import datetime
import math
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

import hpcdyn
from hpcdyn.storage.events import EventBlock, EventLog
from hpcdyn.physics.systems import System, make_system

SCHEMA = "hpcdyn.trajectory/1"
CHUNK_EVENTS = 1 << 20  # 1 MiB of int8 moves, 4 MiB of tokens, 8 MiB of dwell times per chunk
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)


class StoreError(ValueError):
    """A store that cannot be read: wrong schema, unfinished, truncated or not a store at all."""


def _snapshot_chunk(shape: tuple[int, int]) -> int:
    return max(1, math.ceil((1 << 20) / (shape[0] * shape[1])))


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(str(path))


class _ChunkedAppender:
    """Buffers rows for a group of arrays and appends them in whole chunks."""

    def __init__(self, arrays: list[zarr.Array], chunk_rows: int):
        self.arrays = arrays
        self.chunk_rows = chunk_rows
        self.pending: list[list[np.ndarray]] = [[] for _ in arrays]
        self.pending_rows = 0

    def append(self, *columns: np.ndarray) -> None:
        if len(columns[0]) == 0:
            return
        for buffer, column in zip(self.pending, columns):
            buffer.append(np.array(column, copy=True))
        self.pending_rows += len(columns[0])
        if self.pending_rows >= self.chunk_rows:
            self._write(final=False)

    def flush(self) -> None:
        self._write(final=True)

    def _write(self, final: bool) -> None:
        if self.pending_rows == 0:
            return
        rows = self.pending_rows if final else (self.pending_rows // self.chunk_rows) * self.chunk_rows
        for index, (array, buffer) in enumerate(zip(self.arrays, self.pending)):
            joined = np.concatenate(buffer)
            array.append(joined[:rows], axis=0)
            self.pending[index] = [joined[rows:]] if rows < len(joined) else []
        self.pending_rows -= rows


class TrajectoryWriter:
    """Writes one trajectory store; use as a context manager so a failure leaves nothing behind.

    The store appears at ``path`` only when ``finish`` succeeds. An existing store is replaced only
    with ``overwrite=True``, and only after the new one is complete.
    """

    def __init__(
        self,
        path: str | Path,
        system: System,
        *,
        t_final: float,
        seed: int,
        initial_positions: np.ndarray,
        initial_states: np.ndarray,
        snapshot_every: float | None = None,
        overwrite: bool = False,
        chunk_events: int = CHUNK_EVENTS,
        extra_attrs: dict[str, Any] | None = None,
    ):
        self.path = Path(path).absolute()
        check_writable(self.path, overwrite)
        self.overwrite = overwrite
        self.system = system
        self.partial = self.path.with_name(f".{self.path.name}.partial-{uuid.uuid4().hex[:8]}")
        group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        group.attrs.update(
            {
                "schema": SCHEMA,
                "complete": False,
                "system": system.name,
                "params": system.params(),
                "t_final": float(t_final),
                "seed": int(seed),
                "snapshot_every": snapshot_every,
                "hpcdyn_version": hpcdyn.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **(extra_attrs or {}),
            }
        )
        self.group = group
        self._create("initial_position", np.asarray(initial_positions, dtype=np.int64), ["token", "axis"])
        self._create("initial_state", np.asarray(initial_states, dtype=np.int8), ["token"])
        # Fill values that no real event has: a missing chunk reads as an obvious hole.
        events = [
            self._empty("event_token", np.int32, -1, chunk_events),
            self._empty("event_move", np.int8, -1, chunk_events),
            self._empty("event_dwell", np.float64, np.nan, chunk_events),
        ]
        self.events = _ChunkedAppender(events, chunk_events)
        self.snapshots: _ChunkedAppender | None = None
        if snapshot_every is not None:
            rows = _snapshot_chunk(system.shape)
            times = self._empty("snapshot_time", np.float64, np.nan, rows, dims=["snapshot"])
            grid = group.create_array(
                "snapshot_occupancy",
                shape=(0, *system.shape),
                chunks=(rows, *system.shape),
                dtype=np.int8,
                fill_value=-1,
                compressors=COMPRESSOR,
                dimension_names=["snapshot", "y", "x"],
            )
            self.snapshots = _ChunkedAppender([times, grid], rows)
        self.n_events = 0
        self.total_dwell = 0.0

    def _create(self, name: str, data: np.ndarray, dims: list[str]) -> None:
        array = self.group.create_array(
            name, shape=data.shape, dtype=data.dtype, compressors=COMPRESSOR, dimension_names=dims
        )
        array[...] = data

    def _empty(self, name: str, dtype, fill, chunk: int, dims: list[str] | None = None) -> zarr.Array:
        return self.group.create_array(
            name,
            shape=(0,),
            chunks=(chunk,),
            dtype=dtype,
            fill_value=fill,
            compressors=COMPRESSOR,
            dimension_names=dims or ["event"],
        )

    def append_events(self, tokens: np.ndarray, moves: np.ndarray, dwell: np.ndarray) -> None:
        self.events.append(tokens.astype(np.int32), moves.astype(np.int8), dwell.astype(np.float64))
        self.n_events += len(tokens)
        self.total_dwell += float(np.sum(dwell))

    def append_snapshots(self, times: np.ndarray, grids: np.ndarray) -> None:
        if self.snapshots is None:
            raise ValueError("snapshot_every: this store was created without snapshots")
        self.snapshots.append(times.astype(np.float64), grids.astype(np.int8))

    def finish(self, **final_attrs: Any) -> Path:
        """Flush, mark complete and move the store into place atomically."""
        self.events.flush()
        if self.snapshots is not None:
            self.snapshots.flush()
        self.group.attrs.update(
            {"complete": True, "n_events": self.n_events, "total_dwell": self.total_dwell, **final_attrs}
        )
        _consolidate(self.partial)
        check_writable(self.path, self.overwrite)
        if self.path.exists():
            retired = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            self.path.rename(retired)
            self.partial.rename(self.path)
            shutil.rmtree(retired)
        else:
            self.partial.rename(self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()


def check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


class Trajectory:
    """A complete trajectory store opened for reading (see ``open_trajectory``)."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.system: System = make_system(self.attrs["system"], self.attrs["params"])
        self.t_final = float(self.attrs["t_final"])
        self.seed = int(self.attrs["seed"])
        self.initial_positions = np.asarray(group["initial_position"][...], dtype=np.int64)
        self.initial_states = np.asarray(group["initial_state"][...], dtype=np.int8)

    @property
    def n_events(self) -> int:
        return int(self.attrs["n_events"])

    @property
    def log_likelihood(self) -> float | None:
        return self.attrs.get("log_likelihood")

    @property
    def has_snapshots(self) -> bool:
        return "snapshot_time" in self.group

    def iter_event_blocks(
        self, block_events: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[EventBlock]:
        """Events [start, stop) in blocks (default: one storage chunk), checked for holes as read.

        A full pass also checks the sum of the dwell times against the one recorded at writing.
        """
        arrays = [self.group[name] for name in ("event_token", "event_move", "event_dwell")]
        stop = self.n_events if stop is None else stop
        size = block_events or arrays[0].chunks[0]
        total = 0.0
        for lo in range(start, stop, size):
            tokens, moves, dwell = (array[lo : min(lo + size, stop)] for array in arrays)
            if (tokens < 0).any() or (moves < 0).any() or np.isnan(dwell).any():
                raise StoreError(f"{self.path}: events near index {lo} are missing; the store is truncated")
            total += float(dwell.sum())
            yield tokens, moves, dwell
        expected = float(self.attrs["total_dwell"])
        whole = start == 0 and stop == self.n_events
        if whole and not math.isclose(total, expected, rel_tol=1e-9, abs_tol=1e-12):
            raise StoreError(f"{self.path}: event times sum to {total}, the store recorded {expected}; it is corrupt")

    def load(self) -> EventLog:
        """The whole event log in memory (small stores only)."""
        blocks = list(self.iter_event_blocks())
        columns = [np.concatenate(parts) if parts else np.zeros(0) for parts in zip(*blocks)] or [
            np.zeros(0, np.int32),
            np.zeros(0, np.int8),
            np.zeros(0, np.float64),
        ]
        return EventLog(
            self.system,
            self.t_final,
            self.initial_positions,
            self.initial_states,
            columns[0].astype(np.int32),
            columns[1].astype(np.int8),
            columns[2].astype(np.float64),
            self.log_likelihood,
        )

    def snapshots(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_snapshots:
            raise StoreError(f"{self.path}: no snapshots; simulate with --snapshot-every DT to record them")
        return self.group["snapshot_time"][...], self.group["snapshot_occupancy"][...]

    def summary(self) -> dict[str, Any]:
        summary = {
            "path": str(self.path),
            "schema": self.attrs["schema"],
            "system": self.attrs["system"],
            "params": self.attrs["params"],
            "t_final": self.t_final,
            "seed": self.seed,
            "n_tokens": int(self.initial_states.shape[0]),
            "n_events": self.n_events,
            "events_per_time": self.n_events / self.t_final if self.t_final > 0 else None,
            "log_likelihood": self.log_likelihood,
            "snapshots": int(self.group["snapshot_time"].shape[0]) if self.has_snapshots else 0,
            "hpcdyn_version": self.attrs.get("hpcdyn_version"),
            "created": self.attrs.get("created"),
            "stored_bytes": _directory_bytes(self.path),
        }
        return summary


def _directory_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


REQUIRED_ARRAYS = ("initial_position", "initial_state", "event_token", "event_move", "event_dwell")


def open_trajectory(path: str | Path) -> Trajectory:
    """Open a complete trajectory store, refusing anything this version cannot trust."""
    path = Path(path).absolute()
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: not a Zarr group ({error})") from error
    attrs = dict(group.attrs)
    schema = attrs.get("schema")
    if schema != SCHEMA:
        raise StoreError(f"{path}: schema is {schema!r}, this version of hpcdyn reads {SCHEMA!r}")
    if not attrs.get("complete"):
        raise StoreError(f"{path}: the store is incomplete (its simulation did not finish)")
    missing = [name for name in REQUIRED_ARRAYS if name not in group]
    if missing:
        raise StoreError(f"{path}: arrays {missing} are missing; the store is truncated")
    lengths = {name: group[name].shape[0] for name in REQUIRED_ARRAYS[2:]}
    if set(lengths.values()) != {attrs.get("n_events")}:
        raise StoreError(f"{path}: event arrays have lengths {lengths}, attrs say {attrs.get('n_events')}; truncated")
    return Trajectory(path, group)
