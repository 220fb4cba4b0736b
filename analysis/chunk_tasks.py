"""Per-chunk observables as tasks on other processes or machines; the reduction stays here.

    from hpcdyn.distributed.analysis_tasks import ray_tasks
    with ray_tasks("auto") as submit:                             # or HOST:PORT, or "local"
        summary = summarize_on_workers("ensemble.zarr", submit)   # == summarize("ensemble.zarr").compute()

What runs where. The driver opens the store (metadata only) and plans its chunks exactly as
``snapshot_dataset`` does: chunks along y and x merged (a cluster may span the lattice), the store's
chunks along model, density, replica and time kept. Consecutive chunks are grouped into tasks of at
least ``MIN_TASK_SITES`` lattice sites (about 70-100 ms of the kernel; a Ray task should carry 50 ms
or more), and into larger groups beyond ``MAX_TASKS`` tasks. Each task opens the store *by path*
where it runs, reads its chunks and returns their per-snapshot tables (5 float64 per snapshot: 40
bytes against L*L bytes of occupancy), so the data is read where the task runs and never passes
through the driver. The driver wraps the tables in dask arrays with the chunks of the local analysis
and runs the very same reductions (time averages after the burn-in, replica means and standard
errors) on its own threads: the same arithmetic on the same blocks in the same order, hence the same
numbers as the local analysis, to the last digit.

Memory on the driver: every task is submitted at once; a block's table is fetched when the
reductions reach it and dropped once reduced (dask's ordering, as in the local analysis), so the
driver holds a few blocks at a time, never the occupancy. The results wait where the runner keeps
them (Ray: its object store, 40 bytes a snapshot).

``submit(function, arguments) -> futures``: one future per call ``function(*arguments[i])``, in
order, whose ``result()`` returns the value or raises the call's exception.
``hpcdyn.distributed.analysis_tasks.RayTasks`` submits them as Ray tasks on a cluster's workers;
``run_here`` runs them in this process (no Ray). Every worker must see the store at the same path
as the driver: a filesystem shared by the cluster's nodes (on one machine, any path); a worker that
sees other dims, sizes or coordinates there refuses the task.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import socket
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dask.array
import numpy as np
import xarray as xr

from analysis.lattice import SNAPSHOT_OBSERVABLES, snapshot_observables
from analysis.observables import compute, open_ensemble, summarize
from hpcdyn.physics.systems import ConfigurationError

CORE_DIMS = ("y", "x")
# Lattice sites per task, at least: ~70-100 ms of snapshot_observables at its 20-30 M sites/s.
MIN_TASK_SITES = 1 << 21
# Tasks per analysis, at most (larger groups beyond): bounds what the driver submits and tracks.
MAX_TASKS = 10_000


class Future(Protocol):
    def result(self) -> Any: ...


Submit = Callable[[Callable[..., Any], Sequence[tuple]], Sequence[Future]]
Selection = tuple[tuple[int, int], ...]  # (start, stop) along each loop dim


class _Later:
    """A call made on the first ``result()``, once, whichever thread asks first."""

    def __init__(self, function: Callable[..., Any], arguments: tuple):
        self._call = functools.partial(function, *arguments)
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None

    def result(self) -> Any:
        with self._lock:
            if not self._done:
                self._value, self._done = self._call(), True
            return self._value


def run_here(function: Callable[..., Any], arguments: Sequence[tuple]) -> list[Future]:
    """A ``submit`` that runs each call in this process when its result is first asked for (no Ray)."""
    return [_Later(function, tuple(call)) for call in arguments]


@dataclass(frozen=True)
class ChunkPlan:
    """The blocks of the per-snapshot columns: their grid, and where each lies in the store."""

    loop_dims: tuple[str, ...]
    chunks: tuple[tuple[int, ...], ...]  # per loop dim, as in dask
    sites_per_snapshot: int

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(sizes) for sizes in self.chunks)

    @property
    def sites(self) -> int:
        return self.sites_per_snapshot * math.prod(sum(sizes) for sizes in self.chunks)

    def blocks(self) -> list[tuple[tuple[int, ...], Selection]]:
        """(block index, selection) in C order of the block grid."""
        bounds = [np.concatenate([[0], np.cumsum(sizes)]).tolist() for sizes in self.chunks]
        return [
            (index, tuple((bounds[axis][i], bounds[axis][i + 1]) for axis, i in enumerate(index)))
            for index in itertools.product(*(range(count) for count in self.grid))
        ]

    def groups(self, min_sites: int) -> list[list[tuple[tuple[int, ...], Selection]]]:
        """Consecutive blocks, each group holding at least ``min_sites`` lattice sites (the last may hold fewer)."""
        groups, current, sites = [], [], 0
        for block in self.blocks():
            current.append(block)
            sites += self.sites_per_snapshot * math.prod(stop - start for start, stop in block[1])
            if sites >= min_sites:
                groups.append(current)
                current, sites = [], 0
        if current:
            groups.append(current)
        return groups


def chunk_plan(occupancy: xr.DataArray) -> ChunkPlan:
    """The plan of ``snapshot_dataset``'s columns for an occupancy whose y and x are one chunk each."""
    loop_dims = tuple(dim for dim in occupancy.dims if dim not in CORE_DIMS)
    if occupancy.chunks is None:
        raise ConfigurationError("store: the occupancy is not chunked (dask); open the store with open_ensemble")
    # the array's own chunks: ``chunksizes`` also reads the coordinates', and a store's per-density
    # coordinate (n_particles, one chunk) differs from the occupancy's chunks along density
    sizes = dict(zip(occupancy.dims, occupancy.chunks))
    if any(len(sizes[dim]) != 1 for dim in CORE_DIMS):
        raise ConfigurationError("store: the per-chunk plan needs y and x in one chunk each (snapshot_dataset merges them)")
    sites = int(occupancy.sizes["y"]) * int(occupancy.sizes["x"])
    return ChunkPlan(loop_dims, tuple(tuple(sizes[dim]) for dim in loop_dims), sites)


class OnWorkers:
    """The ``per_chunk`` hook of ``snapshot_dataset``: the columns of the store at ``store``, computed by
    tasks that ``submit`` runs (each reading its own chunks by path), as dask arrays with the local
    analysis's chunks. The tasks are submitted when the hook is called; a block waits for its task's
    result when the reductions compute.
    """

    def __init__(self, store: str | Path, submit: Submit, min_task_sites: int | None = None):
        self.store = str(Path(store).expanduser().absolute())
        self.submit = submit
        self.min_task_sites = min_task_sites  # None: MIN_TASK_SITES
        self.tasks = 0  # how many tasks the last call submitted

    def __call__(self, occupancy: xr.DataArray, columns: tuple[xr.DataArray, ...]) -> tuple[xr.DataArray, ...]:
        plan = chunk_plan(occupancy)
        least = MIN_TASK_SITES if self.min_task_sites is None else self.min_task_sites
        groups = plan.groups(max(least, math.ceil(plan.sites / MAX_TASKS)))
        token = uuid.uuid4().hex  # one opening of the store per worker and analysis
        expected = fingerprint(occupancy, plan.loop_dims)
        futures = self.submit(
            block_observables,
            [(self.store, token, expected, plan.loop_dims, [selection for _, selection in group]) for group in groups],
        )
        self.tasks = len(groups)
        located = {
            index: (futures[number], position, selection)
            for number, group in enumerate(groups)
            for position, (index, selection) in enumerate(group)
        }
        table = functools.partial(_table, located, self.store)
        tables = dask.array.map_blocks(
            table,
            chunks=(*plan.chunks, (len(SNAPSHOT_OBSERVABLES),)),
            dtype=np.float64,
            meta=np.empty((0,) * (len(plan.loop_dims) + 1), np.float64),
            name=f"per-chunk-tables-{token}",
        )
        # block by block what snapshot_dataset's _columns returns: the views table[..., column]
        return tuple(column.copy(data=tables[..., number]) for number, column in enumerate(columns))


def _table(located: dict, store: str, block_id: tuple[int, ...]) -> np.ndarray:
    """The per-snapshot table [block..., observable] of one block, from its task's result."""
    future, position, selection = located[tuple(block_id[:-1])]
    found = future.result()[position]
    shape = (*(stop - start for start, stop in selection), len(SNAPSHOT_OBSERVABLES))
    if found.shape != shape:
        raise ConfigurationError(
            f"store: a worker read a block of {found.shape[:-1]} snapshots at {selection} where the driver "
            f"expects {shape[:-1]}; {store} differs between this machine and the workers"
        )
    return found


def fingerprint(occupancy: xr.DataArray, loop_dims: Sequence[str]) -> str:
    """What identifies the occupancy a plan was made for: its loop dims, their sizes and coordinates."""
    described = [
        (dim, int(occupancy.sizes[dim]), occupancy[dim].values.tolist() if dim in occupancy.coords else None)
        for dim in loop_dims
    ]
    return hashlib.sha256(repr((described, int(occupancy.sizes["y"]), int(occupancy.sizes["x"]))).encode()).hexdigest()


@functools.lru_cache(maxsize=2)
def _opened_occupancy(store: str, token: str, loop_dims: tuple[str, ...]) -> tuple[xr.Variable, str]:
    """The store's occupancy, lazily indexed (reads only what is selected), and its fingerprint; once
    per worker and analysis (``token``)."""
    try:
        with warnings.catch_warnings():  # the same decoding as open_ensemble, without dask
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
            occupancy = xr.open_zarr(store, chunks=None)["occupancy"]
            return occupancy.variable, fingerprint(occupancy, loop_dims)
    except Exception as error:  # missing path, not a store: the worker cannot see the driver's store
        raise ConfigurationError(
            f"store: {store} does not open on worker {socket.gethostname()} ({type(error).__name__}: {error}); "
            "the workers read the store by path, so it must be on a filesystem they share with the driver"
        ) from None


def block_observables(
    store: str, token: str, expected: str, loop_dims: Sequence[str], selections: Sequence[Selection]
) -> list[np.ndarray]:
    """One task: the per-snapshot tables [block..., observable] of the given chunks of ``store``'s occupancy.

    ``expected``: the driver's fingerprint of the occupancy; a store that differs here is refused.
    """
    occupancy, found = _opened_occupancy(store, token, tuple(loop_dims))
    if found != expected:
        raise ConfigurationError(
            f"store: {store} on worker {socket.gethostname()} is not the occupancy the driver planned for (other "
            "dims, sizes or coordinates): a different store at that path, or a selection of the store was analysed"
        )
    tables = []
    for selection in selections:
        block = occupancy.isel({dim: slice(start, stop) for dim, (start, stop) in zip(loop_dims, selection, strict=True)})
        tables.append(snapshot_observables(block.transpose(*loop_dims, *CORE_DIMS).values))
    return tables


def summarize_on_workers(
    store: str | Path,
    submit: Submit,
    burn_in: float | None = None,
    ensemble: xr.Dataset | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """``summarize(store, burn_in).compute()`` with the per-chunk observables computed by ``submit``'s tasks.

    ``ensemble``: the store already opened with ``open_ensemble(store)`` (not a selection of it);
    ``progress``: a bar over the driver's dask tasks (each block waits for its task).
    """
    ensemble = open_ensemble(store) if ensemble is None else ensemble
    return compute(summarize(ensemble, burn_in, per_chunk=OnWorkers(store, submit)), progress=progress)
