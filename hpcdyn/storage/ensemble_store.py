"""The ensemble store (DESIGN 3.2): many trajectories' snapshots as one Zarr v3 group, xarray-native.

    occupancy       int8    [model, density, replica, time, y, x]   0 empty, 1 + orientation
    overlap         int32   [model, density, replica, time]         tokens beyond the first on a site
    events, draws, rejected, overlap_events   int64  [model, density, replica]
    rejected_mass   float64 [model, density, replica]   mean probability per draw on moves onto occupied sites
    move_count      int64   [model, density, replica, move]
    coordinates     model (names), density, n_particles (density), replica, time, y, x, move

The driver creates the store once, with its full shape, coordinates and attrs (the resolved
configuration, checkpoint identities, seeds, versions), under a temporary name renamed into place.
Each unit of work (one model, one density, a block of replicas) then owns whole shards: its
``occupancy`` shard and its chunks of every other array, so concurrent writers never meet in a
file (Zarr has no locks). A unit is done when its entry appears in the completion manifest
(``.manifest/done/<unit>.json``, written atomically after its data); a rerun redoes only units
without one, rewriting their shards whole. ``finish`` checks every unit, marks the store complete
and consolidates the metadata, after which ``xarray.open_zarr`` opens it lazily in one read.

Readers trust nothing: ``open_ensemble`` checks that every array the configuration implies is there
with its shape and that every chunk (shard) file is present and none extra (``check_ensemble_files``,
the file listing only); ``verify_ensemble`` decodes every shard and checks its values, and names the
first damaged one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpcdyn.storage.integrity import StoreError, check_chunk_files, first_line, read_array
from hpcdyn.storage.signals import deferred_interrupts
from hpcdyn.storage.trajectory_store import COMPRESSOR

SCHEMA = "hpcdyn.ensemble/1"
MANIFEST = ".manifest"
DIMS = ("model", "density", "replica", "time", "y", "x")
SUMMARIES = {  # per-replica arrays: dtype, fill value (a hole reads as the fill value)
    "events": (np.int64, -1),
    "draws": (np.int64, -1),
    "rejected": (np.int64, -1),
    "overlap_events": (np.int64, -1),
    "rejected_mass": (np.float64, np.nan),
}


def unit_name(unit: dict[str, int]) -> str:
    return f"m{unit['model']}-d{unit['density']}-r{unit['start']}"


def time_chunk(times: int, sites: int) -> int:
    """Snapshots per inner chunk: about 1 MiB of int8 grids, at most the whole time axis."""
    return max(1, min(times, math.ceil((1 << 20) / sites)))


@contextlib.contextmanager
def _quiet():
    """Zarr warns about consolidated metadata (not in the v3 spec) and about the manifest folder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        warnings.filterwarnings("ignore", message="Object at .manifest is not recognized")
        yield


def create_store(path: Path, config: dict[str, Any], times: np.ndarray, extra_attrs: dict[str, Any]) -> None:
    """Create the full-shape store at ``path`` (which must not exist), atomically; ``times`` of the snapshots."""
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    with deferred_interrupts():  # no zarr write may outlive the removal of the partial store
        try:
            _write_layout(partial, config, times, extra_attrs)
            (partial / MANIFEST / "done").mkdir(parents=True)
            (partial / MANIFEST / "running").mkdir()
            partial.rename(path)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _write_layout(path: Path, config: dict[str, Any], times: np.ndarray, extra_attrs: dict[str, Any]) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update({"schema": SCHEMA, "complete": False, "config": config, **extra_attrs})
    side = config["system"]["L"]
    models, densities = len(config["models"]), len(config["densities"])
    replicas, block = config["replicas"], config["replicas_per_unit"]
    times = np.asarray(times, dtype=np.float64)
    coordinates = {
        "model": (np.array([model["label"] for model in config["models"]]), str),
        "density": (np.asarray(config["densities"], dtype=np.float64), None),
        "replica": (np.arange(replicas, dtype=np.int64), None),
        "time": (times, None),
        "y": (np.arange(side, dtype=np.int64), None),
        "x": (np.arange(side, dtype=np.int64), None),
        "move": (np.array(config["move_names"]), str),
    }
    for name, (values, kind) in coordinates.items():
        array = group.create_array(name, shape=values.shape, dtype=kind or values.dtype, dimension_names=[name])
        array[...] = values
    particles = group.create_array("n_particles", shape=(densities,), dtype=np.int64, dimension_names=["density"])
    particles[...] = np.asarray(config["n_particles"], dtype=np.int64)
    n_times = len(times)
    inner = time_chunk(n_times, side * side)
    shard_times = math.ceil(n_times / inner) * inner  # a shard is a whole number of inner chunks
    group.create_array(
        "occupancy",
        shape=(models, densities, replicas, n_times, side, side),
        chunks=(1, 1, 1, inner, side, side),
        shards=(1, 1, block, shard_times, side, side),
        dtype=np.int8,
        fill_value=-1,
        compressors=COMPRESSOR,
        dimension_names=list(DIMS),
        attributes={"coordinates": "n_particles", "meaning": "0 empty, 1 + state of the particle on the site"},
    )
    per_replica = dict(compressors=COMPRESSOR, attributes={"coordinates": "n_particles"})
    group.create_array("overlap", shape=(models, densities, replicas, n_times), chunks=(1, 1, block, n_times),
                       dtype=np.int32, fill_value=-1, dimension_names=list(DIMS[:4]), **per_replica)  # fmt: skip
    for name, (dtype, fill) in SUMMARIES.items():
        group.create_array(name, shape=(models, densities, replicas), chunks=(1, 1, block), dtype=dtype,
                           fill_value=fill, dimension_names=list(DIMS[:3]), **per_replica)  # fmt: skip
    n_moves = len(config["move_names"])
    group.create_array("move_count", shape=(models, densities, replicas, n_moves), chunks=(1, 1, block, n_moves),
                       dtype=np.int64, fill_value=-1, dimension_names=[*DIMS[:3], "move"], **per_replica)  # fmt: skip


def _attrs(path: Path) -> dict[str, Any]:
    try:
        with _quiet():
            group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: not a Zarr group ({first_line(error)})") from error
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: schema is {attrs.get('schema')!r}, not an ensemble store ({SCHEMA!r})")
    return attrs


def stored_config(path: Path) -> dict[str, Any]:
    """The resolved configuration a store was created with."""
    return _attrs(path)["config"]


def write_unit(path: Path, unit: dict[str, int], arrays: dict[str, np.ndarray]) -> None:
    """Write one unit's whole shards: arrays indexed [replica in block, ...]."""
    with _quiet():
        group = zarr.open_group(str(path), mode="r+")
    region = (unit["model"], unit["density"], slice(unit["start"], unit["stop"]))
    for name, values in arrays.items():
        group[name][region] = values


def _atomic_json(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(json.dumps(content, default=str))
    os.replace(temporary, path)


def mark_running(path: Path, unit: dict[str, int], details: dict[str, Any]) -> None:
    """Note which process works on a unit (diagnostics; a rerun ignores it)."""
    _atomic_json(path / MANIFEST / "running" / f"{unit_name(unit)}.json", {"unit": unit, **details})


def mark_done(path: Path, unit: dict[str, int], summary: dict[str, Any]) -> None:
    """Commit a unit: its data is written; from now on reruns skip it."""
    _atomic_json(path / MANIFEST / "done" / f"{unit_name(unit)}.json", {"unit": unit, **summary})
    (path / MANIFEST / "running" / f"{unit_name(unit)}.json").unlink(missing_ok=True)


def _manifest_entry(entry: Path) -> dict[str, Any]:
    try:
        content = json.loads(entry.read_text())
    except (OSError, ValueError) as error:
        raise StoreError(f"{entry}: manifest entry cannot be read ({first_line(error)}); delete it to redo that unit") from error
    if not isinstance(content, dict):
        raise StoreError(f"{entry}: manifest entry is not a JSON object; delete it to redo that unit")
    return content


def finished_units(path: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the finished units, by unit name."""
    return {entry.stem: _manifest_entry(entry) for entry in sorted((path / MANIFEST / "done").glob("*.json"))}


def running_units(path: Path) -> list[dict[str, Any]]:
    return [_manifest_entry(entry) for entry in sorted((path / MANIFEST / "running").glob("*.json"))]


def finish(path: Path, units: list[dict[str, int]], final_attrs: dict[str, Any]) -> None:
    """Check that every unit is in the manifest and its data has no hole; mark complete; consolidate."""
    done = finished_units(path)
    missing = [unit_name(unit) for unit in units if unit_name(unit) not in done]
    if missing:
        raise StoreError(f"{path}: units {missing[:5]} are not finished; rerun the same command to complete them")
    with _quiet():
        group = zarr.open_group(str(path), mode="r+")
        if bool((group["events"][...] < 0).any()):
            raise StoreError(f"{path}: some replicas have no data although the manifest lists them; the store is damaged")
        finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        group.attrs.update({"complete": True, "finished": finished, **final_attrs})
        zarr.consolidate_metadata(str(path))


def _expected_shapes(path: Path, config: Any) -> dict[str, tuple[int, ...]]:
    """The shape of every data array, from the store's configuration attribute."""
    try:
        grid = (len(config["models"]), len(config["densities"]), int(config["replicas"]))
        side, times, moves = int(config["system"]["L"]), int(config["n_snapshots"]), len(config["move_names"])
    except (KeyError, TypeError, ValueError) as error:
        raise StoreError(f"{path}: attribute config: lacks {first_line(error)} or has the wrong type; the store's attributes are damaged") from error
    shapes = {"occupancy": (*grid, times, side, side), "overlap": (*grid, times), "move_count": (*grid, moves)}
    return {**shapes, **{name: grid for name in SUMMARIES}}


def _data_arrays(path: Path) -> tuple[Any, dict[str, tuple[int, ...]]]:
    with _quiet():
        group = zarr.open_group(str(path), mode="r")
    shapes = _expected_shapes(path, dict(group.attrs).get("config"))
    for name, shape in shapes.items():
        if name not in group:
            raise StoreError(f"{path}: array {name} is missing; the store is truncated")
        if tuple(group[name].shape) != shape:
            raise StoreError(f"{path}: array {name} has shape {tuple(group[name].shape)}, attribute config implies {shape}")
    return group, shapes


def check_ensemble_files(path: str | Path) -> None:
    """Cheap checks of a complete store: every array the configuration implies, its shape, and every
    chunk (shard) file present and none extra; nothing is decoded."""
    path = Path(path).absolute()
    _attrs(path)
    group, shapes = _data_arrays(path)
    for name in shapes:
        check_chunk_files(path, name, group[name])


# array -> (lowest valid value, highest valid value)
VALUE_RANGES = {"occupancy": (0, 4), "overlap": (0, None), "move_count": (0, None), "rejected_mass": (0.0, 1.0),
                **{name: (0, None) for name in ("events", "draws", "rejected", "overlap_events")}}  # fmt: skip


def verify_ensemble(path: str | Path) -> dict[str, int]:
    """A full read: every shard of every data array decoded and its values checked; the first
    damaged one is named. Returns how many shards each array has."""
    path = Path(path).absolute()
    check_ensemble_files(path)
    group, shapes = _data_arrays(path)
    counts = {}
    for name in shapes:
        array = group[name]
        outer = array.metadata.chunk_grid.chunk_shape
        grid = [range(math.ceil(size / chunk)) for size, chunk in zip(array.shape, outer)]
        counts[name] = 0
        for index in np.ndindex(*(len(axis) for axis in grid)):
            region = tuple(slice(i * chunk, (i + 1) * chunk) for i, chunk in zip(index, outer))
            key = array.metadata.encode_chunk_key(index)
            _check_values(path, name, key, read_array(path, name, array, region, f"chunk {key}"))
            counts[name] += 1
    return counts


def _check_values(path: Path, name: str, key: str, values: np.ndarray) -> None:
    low, high = VALUE_RANGES[name]
    bad = ~np.isfinite(values) | (values < low) | (values > (np.inf if high is None else high))
    if bad.any():
        raise StoreError(
            f"{path}: array {name}: chunk {key} holds {values[bad].flat[0]!r}, outside [{low}, {high if high is not None else 'inf'}]; "
            "a unit's data is missing or damaged"
        )


def open_ensemble(path: str | Path, require_complete: bool = True):
    """The store as a lazy xarray Dataset with named dims and coordinate values; a complete store's
    arrays, shapes and chunk files are checked first (``check_ensemble_files``)."""
    import xarray

    path = Path(path).absolute()
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    complete = bool(_attrs(path).get("complete"))
    if require_complete and not complete:
        raise StoreError(f"{path}: the ensemble is incomplete; rerun its command to finish it")
    if complete:
        check_ensemble_files(path)
    with _quiet():  # metadata is consolidated when the store is finished
        return xarray.open_zarr(str(path), consolidated=complete)
