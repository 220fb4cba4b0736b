"""Observables of an ensemble store, lazily with xarray and dask (DESIGN 1.5 and 3.2).

    ensemble = open_ensemble("ensemble.zarr")        # occupancy (model, density, replica, time, y, x)
    per_snapshot = snapshot_dataset(ensemble)        # lazy (model, density, replica, time)
    summary = summarize(ensemble).compute()          # (model, density): replica means and standard errors

Per snapshot: f4 (fraction of particles with all four neighbour sites occupied), the number of
4-connected clusters on the torus n_c, the mean cluster size <s> = particles / clusters, and the
largest cluster as a fraction of the particles. Per replica, after the burn-in: the time averages of
these and the variance of f4 over time. Per (model, density): the mean over replicas and its standard
error std / sqrt(n_replicas), and the covariance across replicas of every pair of observables
(``covariance``: differences of correlated observables are judged together). Nothing is computed
until ``.compute()`` (or ``compute`` below) is called; each dask task labels one chunk of snapshots,
so memory follows the store's chunks, not its size.
With ``per_chunk=analysis.chunk_tasks.OnWorkers(...)`` the chunks are labelled by tasks elsewhere (a
Ray cluster's workers) and only the reductions run here, with identical results.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from analysis.lattice import SNAPSHOT_OBSERVABLES, snapshot_observables
from hpcdyn.physics.systems import ConfigurationError

ENSEMBLE_DIMS = ("model", "density", "replica", "time", "y", "x")
REFERENCE_MODEL = "original"

# Time-averaged observables per replica, and what they mean (for figures, tables and the report).
OBSERVABLES = {
    "f4": "fraction of particles with all four neighbour sites occupied",
    "f4_variance": "variance of f4 over time",
    "n_clusters": "number of 4-connected clusters on the torus",
    "mean_cluster_size": "mean cluster size (particles per cluster)",
    "largest_cluster_fraction": "largest cluster as a fraction of the particles",
}
TIME_MEANS = ("f4", "n_clusters", "mean_cluster_size", "largest_cluster_fraction")

# A hook of snapshot_dataset: (occupancy with y and x merged, the lazy per-chunk columns) -> the same
# columns, with the same chunks, computed elsewhere (analysis.chunk_tasks.OnWorkers: Ray tasks).
PerChunk = Callable[[xr.DataArray, tuple[xr.DataArray, ...]], tuple[xr.DataArray, ...]]


def open_ensemble(path: str | Path, chunks: Any = None) -> xr.Dataset:
    """Open an ensemble store lazily (dask-backed) and check it against the contract of DESIGN 3.2."""
    path = Path(path)
    if not path.exists():
        raise ConfigurationError(f"store: no ensemble store at {path}; give the path that `hpcdyn ensemble --out` wrote")
    _check_hpcdyn_store(path)
    try:
        with warnings.catch_warnings():  # consolidated metadata is not in the Zarr v3 spec; xarray says so
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
            ensemble = xr.open_zarr(path, chunks=chunks if chunks is not None else {})
    except Exception as error:  # zarr raises several types for "not a store"
        raise ConfigurationError(f"store: {path} does not open as a Zarr ensemble store ({error})") from error
    check_ensemble(ensemble, str(path))
    if ensemble.attrs.get("complete") is False:
        raise ConfigurationError(f"store: {path} is incomplete; rerun the `hpcdyn ensemble` command that writes it")
    return ensemble


def _check_hpcdyn_store(path: Path) -> None:
    """A complete store written by `hpcdyn ensemble`: every array, shape and chunk file checked (cheap)."""
    from hpcdyn.storage.ensemble_store import SCHEMA, check_ensemble_files
    from hpcdyn.storage.trajectory_store import store_schema

    if path.is_dir() and store_schema(path) == SCHEMA:
        import zarr

        if zarr.open_group(str(path), mode="r").attrs.get("complete"):
            check_ensemble_files(path)


def check_ensemble(ensemble: xr.Dataset, name: str = "ensemble") -> None:
    """Refuse a dataset that lacks an integer ``occupancy`` with dims (model, density, replica, time, y, x)."""
    if "occupancy" not in ensemble.variables:
        raise ConfigurationError(f"store: {name} has no variable 'occupancy'; it is not an ensemble store (DESIGN 3.2)")
    occupancy = ensemble["occupancy"]
    if set(occupancy.dims) != set(ENSEMBLE_DIMS):
        raise ConfigurationError(
            f"store: occupancy in {name} has dims {occupancy.dims}; an ensemble store has {ENSEMBLE_DIMS}"
        )
    if not np.issubdtype(occupancy.dtype, np.integer):
        raise ConfigurationError(f"store: occupancy in {name} is {occupancy.dtype}; expected integers (0 empty, 1+o)")
    for dim in ("density", "time"):
        if dim not in ensemble.coords:
            raise ConfigurationError(f"store: {name} has no '{dim}' coordinate values")


def setting(attrs: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A configuration value from store attrs: top level first, then nested mappings (e.g. attrs["config"])."""
    pending = [attrs]
    while pending:
        mapping = pending.pop(0)
        if name in mapping:
            return mapping[name]
        pending.extend(value for value in mapping.values() if isinstance(value, Mapping))
    return default


def resolve_burn_in(ensemble: xr.Dataset, burn_in: float | None) -> float:
    """The burn-in time: the one given, else the store's ``burn_in`` attribute, else 0."""
    value = setting(ensemble.attrs, "burn_in", 0.0) if burn_in is None else burn_in
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"burn_in: must be a time >= 0, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"burn_in: must be a finite time >= 0, got {value}")
    return value


def _columns(grid: np.ndarray) -> tuple[np.ndarray, ...]:
    table = snapshot_observables(grid)
    return tuple(table[..., index] for index in range(table.shape[-1]))


def snapshot_dataset(ensemble: xr.Dataset, per_chunk: PerChunk | None = None) -> xr.Dataset:
    """Per-snapshot observables (model, density, replica, time), lazy: one dask task per store chunk.

    Chunks along y and x are merged first (a cluster may span the whole lattice); chunks along the
    other dims are kept. Snapshots without particles (never written) are NaN throughout.
    ``per_chunk`` (e.g. ``analysis.chunk_tasks.OnWorkers``) computes the same per-chunk columns
    elsewhere, such as on a Ray cluster's workers; everything after them is unchanged.
    """
    check_ensemble(ensemble)
    occupancy = ensemble["occupancy"].chunk({"y": -1, "x": -1})  # also makes a numpy-backed array lazy
    # Left out: coordinates along y and x, and the store's per-density n_particles, a coordinate of the
    # name of a column: the Dataset below would compare the two, computing every column of the store
    # there and then (in the report, one store after another instead of all of them at once)
    occupancy = occupancy.drop_vars([name for name in occupancy.coords
                                     if set(occupancy[name].dims) & {"y", "x"} or name in SNAPSHOT_OBSERVABLES])  # fmt: skip
    columns = xr.apply_ufunc(
        _columns,
        occupancy,
        input_core_dims=[["y", "x"]],
        output_core_dims=[[] for _ in SNAPSHOT_OBSERVABLES],
        dask="parallelized",
        output_dtypes=[np.float64] * len(SNAPSHOT_OBSERVABLES),
    )
    if per_chunk is not None:
        columns = per_chunk(occupancy, columns)
    per_snapshot = xr.Dataset(dict(zip(SNAPSHOT_OBSERVABLES, columns)))
    written = per_snapshot["n_particles"] > 0
    for name in SNAPSHOT_OBSERVABLES[1:]:
        per_snapshot[name] = per_snapshot[name].where(written)
    per_snapshot.attrs = dict(ensemble.attrs)
    return per_snapshot


def replica_averages(per_snapshot: xr.Dataset, burn_in: float = 0.0) -> xr.Dataset:
    """Time averages per replica over snapshots at time >= burn_in, and the variance of f4 over time."""
    times = per_snapshot["time"].values
    kept = np.flatnonzero(times >= burn_in)
    if len(kept) == 0:
        raise ConfigurationError(
            f"burn_in: {burn_in} leaves no snapshot (the last is at time {times.max() if len(times) else 'none'}); "
            "give a smaller burn-in"
        )
    after = per_snapshot.isel(time=kept)
    averages = xr.Dataset({name: after[name].mean("time") for name in TIME_MEANS})
    averages["f4_variance"] = after["f4"].var("time", ddof=1) if len(kept) > 1 else after["f4"].isel(time=0) * np.nan
    averages = averages[list(OBSERVABLES)]
    averages.attrs = {**per_snapshot.attrs, "burn_in": burn_in, "n_times": len(kept)}
    return averages


def replica_statistics(per_replica: xr.Dataset) -> xr.Dataset:
    """Mean over replicas and its standard error for each observable: NAME and NAME_se, plus n_replicas."""
    statistics = {}
    for name in OBSERVABLES:
        values = per_replica[name]
        count = values.count("replica")
        statistics[name] = values.mean("replica")
        statistics[f"{name}_se"] = values.std("replica", ddof=1) / np.sqrt(count)
        statistics[name].attrs["description"] = OBSERVABLES[name]
    statistics["n_replicas"] = per_replica["f4"].count("replica")
    statistics["covariance"] = replica_covariance(per_replica)
    return xr.Dataset(statistics, attrs=per_replica.attrs).transpose("model", "density", ...)


def replica_covariance(per_replica: xr.Dataset) -> xr.DataArray:
    """Covariance across replicas (ddof 1) of every pair of observables, per (model, density).

    Dims (model, density, observable, observable_other). The observables of one replica are
    correlated (n_c and <s> = N / n_c most of all), so differences judged together need it.
    Replicas where either observable is missing are left out of that pair.
    """
    names = list(OBSERVABLES)
    stacked = xr.concat([per_replica[name] for name in names], dim=xr.DataArray(names, dims="observable", name="observable"))
    other = stacked.rename(observable="observable_other")
    both = stacked.notnull() & other.notnull()
    count = both.sum("replica")
    centred = stacked - stacked.where(both).mean("replica")
    centred_other = other - other.where(both).mean("replica")
    products = (centred * centred_other).where(both).sum("replica")
    covariance = products / (count - 1).where(count > 1)
    covariance.attrs["description"] = "covariance across replicas of the replica averages"
    return covariance.drop_vars("replica", errors="ignore")


def summarize(
    ensemble: xr.Dataset | str | Path, burn_in: float | None = None, per_chunk: PerChunk | None = None
) -> xr.Dataset:
    """Observables per (model, density) with standard errors across replicas, lazily.

    ``ensemble`` is a store path or an opened dataset; ``burn_in`` defaults to the store's attribute;
    ``per_chunk`` as in ``snapshot_dataset``.
    """
    if not isinstance(ensemble, xr.Dataset):
        ensemble = open_ensemble(ensemble)
    burn_in = resolve_burn_in(ensemble, burn_in)
    per_replica = replica_averages(snapshot_dataset(ensemble, per_chunk), burn_in)
    # The replica averages are small (a number per model, density, replica): one chunk each, so the
    # statistics over replicas are a few tasks, not several per store chunk (80 k tasks and 86 s of
    # scheduling for the quick preset's main store, against its 336 chunks of snapshots).
    return replica_statistics(per_replica.chunk({dim: -1 for dim in per_replica.dims}))


def compute(data: xr.Dataset | xr.DataArray, progress: bool = False):
    """Compute a lazy result, with a tqdm bar over the dask tasks when ``progress`` is true."""
    if not progress:
        return data.compute()
    from analysis.progress import TaskProgress

    with TaskProgress(desc="analyse"):
        return data.compute()
