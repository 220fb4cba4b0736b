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

Readers trust nothing: ``open_trajectory`` checks every attribute (types, ranges, ``params`` against
the named system, the checksum of the attributes), the arrays' shapes against the attributes, the
initial configuration's chunks and values; reading events checks every block (holes, token and move
in range, dwell times finite and >= 0, decoding) and a full pass the sum of the dwell times.
``Trajectory.check_chunks`` (cheap: the file listing) and ``Trajectory.verify`` (a full read) serve
``hpcdyn info`` and ``hpcdyn info --verify``. Every failure is a one-line ``StoreError`` naming the
store, the array or attribute and what is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

import hpcdyn
from hpcdyn.physics.systems import SYSTEMS, ConfigurationError, System, make_system
from hpcdyn.storage.events import EventBlock, EventLog
from hpcdyn.storage.integrity import StoreError, check_chunk_files, first_line, read_array, verify_chunks
from hpcdyn.storage.output_lock import output_lock
from hpcdyn.storage.signals import deferred_interrupts

SCHEMA = "hpcdyn.trajectory/1"
CHUNK_EVENTS = 1 << 20  # 1 MiB of int8 moves, 4 MiB of tokens, 8 MiB of dwell times per chunk
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)
DIGEST_ATTRIBUTE = "attributes_sha256"  # checksum of every other attribute, written last

__all__ = ["SCHEMA", "StoreError", "Trajectory", "TrajectoryWriter", "check_writable", "open_trajectory", "store_schema"]


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
        self.n_events = 0
        self.total_dwell = 0.0
        # One writer per store: a second one is refused; leftovers of killed runs are removed.
        self._lock = output_lock(self.path, "out")
        self._lock.__enter__()
        self.partial = self.path.with_name(f".{self.path.name}.partial-{uuid.uuid4().hex[:8]}")
        attrs = {
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
        try:
            with deferred_interrupts():
                self._layout(attrs, initial_positions, initial_states, snapshot_every, chunk_events)
        except BaseException:
            self.abort()
            raise

    def _layout(self, attrs, initial_positions, initial_states, snapshot_every, chunk_events) -> None:
        self.group = group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        group.attrs.update(attrs)
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
            rows = _snapshot_chunk(self.system.shape)
            times = self._empty("snapshot_time", np.float64, np.nan, rows, dims=["snapshot"])
            grid = group.create_array(
                "snapshot_occupancy",
                shape=(0, *self.system.shape),
                chunks=(rows, *self.system.shape),
                dtype=np.int8,
                fill_value=-1,
                compressors=COMPRESSOR,
                dimension_names=["snapshot", "y", "x"],
            )
            self.snapshots = _ChunkedAppender([times, grid], rows)

    def _create(self, name: str, data: np.ndarray, dims: list[str]) -> None:
        # fill -1: every chunk is written (Zarr skips chunks equal to the fill value), so a missing one is a hole
        array = self.group.create_array(
            name, shape=data.shape, dtype=data.dtype, fill_value=-1, compressors=COMPRESSOR, dimension_names=dims
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
        with deferred_interrupts():  # a chunk is written whole, or not at all
            self.events.append(tokens.astype(np.int32), moves.astype(np.int8), dwell.astype(np.float64))
        self.n_events += len(tokens)
        self.total_dwell += float(np.sum(dwell))

    def append_snapshots(self, times: np.ndarray, grids: np.ndarray) -> None:
        if self.snapshots is None:
            raise ValueError("snapshot_every: this store was created without snapshots")
        with deferred_interrupts():
            self.snapshots.append(times.astype(np.float64), grids.astype(np.int8))

    def finish(self, **final_attrs: Any) -> Path:
        """Flush, mark complete and move the store into place atomically."""
        with deferred_interrupts():
            return self._finish(final_attrs)

    def _finish(self, final_attrs: dict[str, Any]) -> Path:
        self.events.flush()
        if self.snapshots is not None:
            self.snapshots.flush()
        self.group.attrs.update(
            {"complete": True, "n_events": self.n_events, "total_dwell": self.total_dwell, **final_attrs}
        )
        self.group.attrs[DIGEST_ATTRIBUTE] = attributes_digest(dict(self.group.attrs))
        _consolidate(self.partial)
        check_writable(self.path, self.overwrite)
        if self.path.exists():
            retired = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            self.path.rename(retired)
            self.partial.rename(self.path)
            shutil.rmtree(retired)
        else:
            self.partial.rename(self.path)
        self._release()
        return self.path

    def abort(self) -> None:
        with deferred_interrupts():
            shutil.rmtree(self.partial, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        self._release()


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output without ``overwrite``, and anything but a trajectory
    store even with it (``--overwrite`` of a home directory must not delete it)."""
    check_output_location(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    if path.is_symlink() or not path.is_dir() or store_schema(path) != SCHEMA:
        raise StoreError(
            f"out: {path} exists and is not a trajectory store; --overwrite replaces only a store; move it away or choose another --out"
        )


def check_output_location(path: Path, option: str = "out") -> None:
    """The output's nearest existing ancestor must be a writable directory (not a file)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"{option}: {parent} is a file, not a directory; {path} cannot be created under it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StoreError(f"{option}: directory {parent} is not writable; choose another --{option.replace('_', '-')}")
            return


def store_schema(path: Path) -> Any:
    """The ``schema`` attribute of the Zarr group at ``path`` (None when it is not one)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("schema")
    except (OSError, ValueError, AttributeError):
        return None


def attributes_digest(attrs: dict[str, Any]) -> str:
    """sha256 of every attribute but the digest itself, in canonical JSON: an edit shows."""
    material = {key: value for key, value in attrs.items() if key != DIGEST_ATTRIBUTE}
    canonical = json.dumps(json.loads(json.dumps(material, default=str)), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Trajectory:
    """A complete trajectory store opened for reading (see ``open_trajectory``)."""

    def __init__(self, path: Path, group: zarr.Group, system: System | None = None):
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.system: System = system or make_system(self.attrs["system"], self.attrs["params"])
        self.t_final = float(self.attrs["t_final"])
        self.seed = int(self.attrs["seed"])
        self.initial_positions = self._read("initial_position").astype(np.int64)
        self.initial_states = self._read("initial_state").astype(np.int8)

    def _read(self, name: str, selection: Any = Ellipsis, what: str = "") -> np.ndarray:
        return read_array(self.path, name, self.group[name], selection, what)

    def _read_events(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Events [lo, hi) of one array; a block that does not decode is searched for its damaged chunk."""
        try:
            return self._read(name, slice(lo, hi), f"events {lo}-{hi - 1}")
        except StoreError:
            verify_chunks(self.path, name, self.group[name])  # raises naming the chunk
            raise

    def _fail(self, message: str) -> StoreError:
        return StoreError(f"{self.path}: {message}")

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
        """Events [start, stop) in blocks (default: one storage chunk), each block checked as read:
        decodable, no hole, token and move in range, dwell times finite and >= 0.

        A full pass also checks the sum of the dwell times against the one recorded at writing.
        """
        stop = self.n_events if stop is None else stop
        size = block_events or self.group["event_token"].chunks[0]
        total = 0.0
        for lo in range(start, stop, size):
            hi = min(lo + size, stop)
            tokens, moves, dwell = (self._read_events(name, lo, hi) for name in ("event_token", "event_move", "event_dwell"))
            self._check_events(lo, tokens, moves, dwell)
            total += float(dwell.sum())
            yield tokens, moves, dwell
        expected = float(self.attrs["total_dwell"])
        whole = start == 0 and stop == self.n_events
        if whole and not math.isclose(total, expected, rel_tol=1e-9, abs_tol=1e-12):
            raise self._fail(f"array event_dwell: event times sum to {total}, attribute total_dwell says {expected}; the store is corrupt")

    def _check_events(self, lo: int, tokens: np.ndarray, moves: np.ndarray, dwell: np.ndarray) -> None:
        checks = (
            ("event_token", tokens < 0, "missing (the store is truncated)"),
            ("event_move", moves < 0, "missing (the store is truncated)"),
            ("event_dwell", np.isnan(dwell), "missing (the store is truncated)"),
            ("event_token", tokens >= self.system.n_tokens, f"out of range: a token >= {self.system.n_tokens} tokens"),
            ("event_move", moves >= self.system.n_moves, f"out of range: a move >= {self.system.n_moves} moves"),
            ("event_dwell", ~np.isfinite(dwell) | (dwell < 0), "out of range: a dwell time negative or infinite"),
        )
        for name, bad, problem in checks:
            if bad.any():
                index = lo + int(np.argmax(bad))
                raise self._fail(f"array {name}: event {index} is {problem}")

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
        """Snapshot times and grids, checked: decodable, no hole, states and times in range."""
        if not self.has_snapshots:
            raise self._fail("no snapshots; simulate with --snapshot-every DT to record them")
        times, grids = self._read("snapshot_time"), self._read("snapshot_occupancy")
        if (~np.isfinite(times) | (times < 0) | (times > self.t_final * (1 + 1e-9))).any() or (np.diff(times) < 0).any():
            raise self._fail(f"array snapshot_time: times must be finite, increasing and within [0, t_final = {self.t_final}]")
        if ((grids < 0) | (grids > self.system.n_states)).any():
            raise self._fail(f"array snapshot_occupancy: values must be 0 (empty) to {self.system.n_states}; a chunk is missing or damaged")
        return times, grids

    def check_chunks(self) -> None:
        """Every chunk file of every array present and none extra (the file listing only, no decoding)."""
        for name in self.group.array_keys():
            check_chunk_files(self.path, name, self.group[name])

    def verify(self) -> dict[str, Any]:
        """A full read: every chunk decoded and every value checked; what was read."""
        self.check_chunks()
        for name in sorted(self.group.array_keys()):
            verify_chunks(self.path, name, self.group[name])
        events = sum(len(tokens) for tokens, _, _ in self.iter_event_blocks())  # ranges, holes, dwell sum
        snapshots = len(self.snapshots()[0]) if self.has_snapshots else 0
        return {"events": events, "total_dwell": float(self.attrs["total_dwell"]), "snapshots": snapshots}

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
# attribute -> (kinds it may have, a description for the message)
REQUIRED_ATTRS = {
    "system": ((str,), "a system name"),
    "params": ((dict,), "an object of the system's parameters"),
    "t_final": ((int, float), "a finite time > 0"),
    "seed": ((int,), "an integer"),
    "n_events": ((int,), "an integer >= 0"),
    "total_dwell": ((int, float), "a finite time in [0, t_final]"),
}


def open_trajectory(path: str | Path) -> Trajectory:
    """Open a complete trajectory store, refusing anything this version cannot trust."""
    path = Path(path).absolute()
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not path.is_dir():
        raise StoreError(f"{path}: not a trajectory store (a file, not a Zarr directory)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: not a Zarr group ({first_line(error)})") from error
    attrs = dict(group.attrs)
    schema = attrs.get("schema")
    if schema != SCHEMA:
        raise StoreError(f"{path}: schema is {schema!r}, this version of hpcdyn reads {SCHEMA!r}")
    if not attrs.get("complete"):
        raise StoreError(f"{path}: the store is incomplete (its simulation did not finish)")
    system = _check_attrs(path, attrs)
    _check_arrays(path, group, attrs, system)
    trajectory = Trajectory(path, group, system)
    _check_initial_configuration(trajectory)
    return trajectory


def _attribute_error(path: Path, name: str, problem: str) -> StoreError:
    return StoreError(f"{path}: attribute {name}: {problem}; the store's attributes are damaged or were edited")


def _check_attrs(path: Path, attrs: dict[str, Any]) -> System:
    for name, (kinds, description) in REQUIRED_ATTRS.items():
        value = attrs.get(name)
        if name not in attrs:
            raise _attribute_error(path, name, "missing")
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _attribute_error(path, name, f"must be {description}, got {value!r}")
    if attrs["system"] not in SYSTEMS:
        raise _attribute_error(path, "system", f"must be one of {sorted(SYSTEMS)}, got {attrs['system']!r}")
    system = _check_params(path, attrs["system"], attrs["params"])
    t_final, total = attrs["t_final"], attrs["total_dwell"]
    if not (math.isfinite(t_final) and t_final > 0):
        raise _attribute_error(path, "t_final", f"must be a finite time > 0, got {t_final!r}")
    if attrs["n_events"] < 0:
        raise _attribute_error(path, "n_events", f"must be >= 0, got {attrs['n_events']}")
    if not (math.isfinite(total) and 0 <= total <= t_final * (1 + 1e-9) + 1e-12):
        raise _attribute_error(path, "total_dwell", f"must be a time in [0, t_final = {t_final}], got {total!r}")
    recorded = attrs.get(DIGEST_ATTRIBUTE)
    if recorded is not None and recorded != attributes_digest(attrs):
        raise _attribute_error(path, DIGEST_ATTRIBUTE, "does not match the other attributes: one was changed after the store was written")
    return system


def _check_params(path: Path, name: str, params: dict[str, Any]) -> System:
    fields = {field.name for field in dataclasses.fields(SYSTEMS[name])}
    missing = sorted(fields - set(params))
    if missing:
        raise _attribute_error(path, "params", f"lacks {missing} of system {name!r}")
    try:
        return make_system(name, params)
    except ConfigurationError as error:
        raise _attribute_error(path, "params", str(error)) from error


def _check_arrays(path: Path, group: zarr.Group, attrs: dict[str, Any], system: System) -> None:
    missing = [name for name in REQUIRED_ARRAYS if name not in group]
    if missing:
        raise StoreError(f"{path}: arrays {missing} are missing; the store is truncated")
    lengths = {name: group[name].shape[0] for name in REQUIRED_ARRAYS[2:]}
    if set(lengths.values()) != {attrs.get("n_events")}:
        raise StoreError(
            f"{path}: attribute n_events says {attrs.get('n_events')}, the event arrays have lengths {lengths}; "
            "the store is truncated or its attributes were edited"
        )
    shapes = {"initial_position": (system.n_tokens, 2), "initial_state": (system.n_tokens,)}
    if ("snapshot_time" in group) != ("snapshot_occupancy" in group):
        raise StoreError(f"{path}: only one of the arrays snapshot_time and snapshot_occupancy is present; the store is truncated")
    if "snapshot_time" in group:
        shapes["snapshot_occupancy"] = (group["snapshot_time"].shape[0], *system.shape)
    for name, shape in shapes.items():
        if tuple(group[name].shape) != shape:
            raise StoreError(
                f"{path}: array {name} has shape {tuple(group[name].shape)}, attribute params ({system.params()}) "
                f"implies {shape}; the attributes do not match the arrays"
            )
    for name in ("initial_position", "initial_state"):
        check_chunk_files(path, name, group[name])


def _check_initial_configuration(trajectory: Trajectory) -> None:
    system, positions, states = trajectory.system, trajectory.initial_positions, trajectory.initial_states
    ly, lx = system.shape
    if (positions < 0).any() or (positions[:, 0] >= lx).any() or (positions[:, 1] >= ly).any():
        raise trajectory._fail(f"array initial_position: positions must lie on the {ly} x {lx} lattice of attribute params")
    if ((states < 0) | (states >= system.n_states)).any():
        raise trajectory._fail(f"array initial_state: states must be in [0, {system.n_states}) for system {system.name!r}")
    sites = positions[:, 1] * lx + positions[:, 0]
    if system.name == "fa":
        if not np.array_equal(sites, np.arange(system.n_tokens)):
            raise trajectory._fail("array initial_position: FA tokens must be the lattice sites in row-major order")
    elif len(np.unique(sites)) != len(sites):
        raise trajectory._fail("array initial_position: two tokens share a site (the active model excludes overlaps); a chunk is missing or damaged")
