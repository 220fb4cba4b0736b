"""Environment tables on disk (DESIGN 3.4): a Zarr v3 group beside a checkpoint, append-only.

    table.zarr/                 attrs: schema, header (family, encoder, model identity, moves, lattice)
      parts/<part>/             one writer's rows, written whole under a hidden name, then renamed in
        keys       int64   [K]
        checks     int64   [K]             second hash of a hashed key, 0 for exact keys
        patches    int8    [K, 1 + S]      own state, then the stencil's site digits
        log_rates  float64 [K, n_moves]    -inf for a rate of zero
        sightings  int64   [K]             lookups of the key by this writer's runs
        classes    int16   [K, n_moves]    optional: the model's class (or move type) of each move

A table belongs to one rate model (``model_identity``: the sha256 of a checkpoint file, or for the
original rates a fingerprint of the system's rate parameters) and one key family; opening it with
another refuses, naming both. Writers never share a file: each writes its own part, so Ray actors
append concurrently without locks; ``read_table`` unions the parts (a key in several parts keeps
the values of the first part by name and the sum of its sightings) and ``compact_table`` rewrites
them as one. Part names start with a UTC time stamp, so "first" is "oldest".

The header and row types import only numpy: the simulation stage uses them without zarr, which
is imported by the functions that touch a store.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from hpcdyn.physics.systems import ConfigurationError, System

SCHEMA = "hpcdyn.environment_table/1"
PARTS = "parts"
CHUNK_ROWS = 1 << 16
LATTICE_FIELDS = ("L", "N")  # the original rates do not depend on these: one table serves every size


class TableMismatchError(ConfigurationError):
    """A table built for another rate model or key family."""


class CollisionError(RuntimeError):
    """Two different environments with the same hashed key and check (never observed; 2^-126)."""


@dataclasses.dataclass(frozen=True)
class TableHeader:
    """What a table's keys and rates mean; every part of one table shares it."""

    model_identity: str  # "sha256:<hex>" of a checkpoint file, or "original:<hex>" (``original_rates_identity``)
    encoder: dict[str, Any]  # ``EnvironmentEncoder.describe()``: family, system, stencil, digits, hashed
    move_names: tuple[str, ...]
    patch_lattice: tuple[int, int]  # (Ly, Lx) of the lattice patches were placed on to fill the table

    def __post_init__(self) -> None:
        if not isinstance(self.model_identity, str) or ":" not in self.model_identity:
            raise ConfigurationError(f"model_identity: need 'sha256:<hex>' or 'original:<hex>', got {self.model_identity!r}")
        object.__setattr__(self, "move_names", tuple(self.move_names))
        object.__setattr__(self, "patch_lattice", tuple(int(side) for side in self.patch_lattice))

    @property
    def family(self) -> str:
        return self.encoder["family"]

    @property
    def n_moves(self) -> int:
        return len(self.move_names)

    @property
    def patch_width(self) -> int:
        return 1 + len(self.encoder["offsets"])

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "move_names": list(self.move_names), "patch_lattice": list(self.patch_lattice)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TableHeader":
        return cls(values["model_identity"], values["encoder"], tuple(values["move_names"]), tuple(values["patch_lattice"]))

    def check_matches(self, other: "TableHeader", where: str | Path) -> None:
        """Refuse a table of another model or family, naming both; then any other difference."""
        if (self.model_identity, self.family) != (other.model_identity, other.family):
            raise TableMismatchError(
                f"environment table {where} was built for model {other.model_identity} with key family "
                f"{other.family!r}; this run uses model {self.model_identity} with key family {self.family!r}. "
                "Give a table path of its own to this model and family."
            )
        for field in ("encoder", "move_names"):
            if getattr(self, field) != getattr(other, field):
                raise TableMismatchError(
                    f"environment table {where}: {field} is {getattr(other, field)!r}, this run needs "
                    f"{getattr(self, field)!r} (a table from another version of the key family)"
                )


@dataclasses.dataclass
class TableRows:
    """Rows of a table in memory; every array has the rows first."""

    keys: np.ndarray  # int64 [K]
    checks: np.ndarray  # int64 [K]
    patches: np.ndarray  # int8 [K, 1 + S]
    log_rates: np.ndarray  # float64 [K, n_moves]
    sightings: np.ndarray  # int64 [K]
    classes: np.ndarray | None = None  # int16 [K, n_moves], -1: no class

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def take(self, index: np.ndarray) -> "TableRows":
        classes = None if self.classes is None else self.classes[index]
        return TableRows(self.keys[index], self.checks[index], self.patches[index], self.log_rates[index],
                         self.sightings[index], classes)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """How a read unioned the parts: rows read, distinct keys, and how far duplicates disagreed."""

    parts: tuple[str, ...]
    rows_read: int
    keys: int
    largest_duplicate_difference: float  # max |delta log-rate| between parts for one key (0 if none)


# ----------------------------------------------------------------------------- identities
def original_rates_identity(system: System) -> str:
    """Fingerprint of a system's generating rates: its name and rate parameters, not L or N."""
    params = {name: value for name, value in system.params().items() if name not in LATTICE_FIELDS}
    material = json.dumps({"system": system.name, "params": params}, sort_keys=True)
    return "original:" + hashlib.sha256(material.encode()).hexdigest()[:16]


def checkpoint_identity(path: str | Path) -> str:
    """'sha256:<hex>' of a checkpoint file (the same digest ensembles record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------- writing
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def open_table_store(path: str | Path, header: TableHeader) -> Path:
    """Create the table group if it does not exist (atomically), else check it is this model's and family's."""
    import zarr

    path = Path(path).absolute()
    if not path.exists():
        staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
        group = zarr.open_group(str(staging), mode="w", zarr_format=3)
        group.attrs.update({"schema": SCHEMA, "header": header.as_dict(), "created": _now()})
        (staging / PARTS).mkdir()
        try:
            os.rename(staging, path)  # a writer that lost the race finds the winner's table below
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not path.exists():
                raise
    header.check_matches(read_header(path), path)
    return path


def read_header(path: str | Path) -> TableHeader:
    import zarr

    from hpcdyn.storage.trajectory_store import StoreError

    path = Path(path).absolute()
    try:
        attrs = dict(zarr.open_group(str(path), mode="r", use_consolidated=False).attrs)
    except Exception as error:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: not an environment table ({error})") from error
    if attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: schema is {attrs.get('schema')!r}, this version reads {SCHEMA!r}")
    return TableHeader.from_dict(attrs["header"])


def write_part(path: str | Path, header: TableHeader, rows: TableRows, writer: str = "") -> Path | None:
    """Append ``rows`` as a new part (nothing if empty); returns the part's path.

    The part is written whole under a hidden name and renamed into ``parts/``: a reader never sees
    half a part, and two writers never touch the same file.
    """
    import zarr

    from hpcdyn.storage.trajectory_store import COMPRESSOR

    path = open_table_store(path, header)
    if len(rows) == 0:
        return None
    _check_rows(rows, header)
    name = f"{_now()}-{uuid.uuid4().hex[:8]}"
    staging = path / PARTS / f".{name}.partial"
    group = zarr.open_group(str(staging), mode="w", zarr_format=3)
    arrays = {"keys": rows.keys, "checks": rows.checks, "patches": rows.patches, "log_rates": rows.log_rates,
              "sightings": rows.sightings}  # fmt: skip
    if rows.classes is not None:
        arrays["classes"] = rows.classes
    for array_name, data in arrays.items():
        chunks = (min(CHUNK_ROWS, len(rows)),) + data.shape[1:]
        array = group.create_array(array_name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=COMPRESSOR)
        array[...] = data
    group.attrs.update({"rows": len(rows), "writer": writer, "created": _now(), "complete": True})
    final = path / PARTS / name
    os.rename(staging, final)
    return final


def _check_rows(rows: TableRows, header: TableHeader) -> None:
    count = len(rows)
    shapes = {"checks": (count,), "patches": (count, header.patch_width), "log_rates": (count, header.n_moves),
              "sightings": (count,)}  # fmt: skip
    if rows.classes is not None:
        shapes["classes"] = (count, header.n_moves)
    for name, shape in shapes.items():
        if getattr(rows, name).shape != shape:
            raise ValueError(f"{name}: shape {getattr(rows, name).shape}, expected {shape}")


# ----------------------------------------------------------------------------- reading
def part_names(path: str | Path) -> list[str]:
    """Complete parts, oldest first (hidden names are parts still being written)."""
    import zarr

    folder = Path(path) / PARTS
    names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    return [name for name in names if zarr.open_group(str(folder / name), mode="r").attrs.get("complete")]


def _read_part(folder: Path) -> TableRows:
    import zarr

    group = zarr.open_group(str(folder), mode="r")
    read = {name: np.asarray(group[name][...]) for name in ("keys", "checks", "patches", "log_rates", "sightings")}
    classes = np.asarray(group["classes"][...]) if "classes" in group else None
    return TableRows(**read, classes=classes)


def read_table(path: str | Path, header: TableHeader | None = None) -> tuple[TableHeader, TableRows, MergeReport]:
    """The union of every complete part; with ``header``, refuse a table of another model or family."""
    path = Path(path).absolute()
    stored = read_header(path)
    if header is not None:
        header.check_matches(stored, path)
    names = part_names(path)
    parts = [_read_part(path / PARTS / name) for name in names]
    rows, difference = merge_rows(parts, stored)
    return stored, rows, MergeReport(tuple(names), sum(len(part) for part in parts), len(rows), difference)


def _empty_rows(header: TableHeader) -> TableRows:
    return TableRows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, header.patch_width), np.int8),
                     np.zeros((0, header.n_moves)), np.zeros(0, np.int64))  # fmt: skip


def merge_rows(parts: list[TableRows], header: TableHeader) -> tuple[TableRows, float]:
    """Union by key: the first part's values, summed sightings; the largest disagreement between parts."""
    if not parts:
        return _empty_rows(header), 0.0
    with_classes = all(part.classes is not None for part in parts)
    joined = TableRows(
        *(np.concatenate([getattr(part, name) for part in parts]) for name in ("keys", "checks", "patches", "log_rates", "sightings")),
        classes=np.concatenate([part.classes for part in parts]) if with_classes else None,
    )
    keys, first, inverse = np.unique(joined.keys, return_index=True, return_inverse=True)
    merged = joined.take(first)
    if not np.array_equal(joined.checks, merged.checks[inverse]):
        raise CollisionError(f"{header.family}: one hashed key stands for two environments (checks differ)")
    merged.sightings = np.bincount(inverse, weights=joined.sightings, minlength=len(keys)).astype(np.int64)
    reference = merged.log_rates[inverse]
    same = (reference == joined.log_rates) | (np.isnan(reference) & np.isnan(joined.log_rates))
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are -inf: masked by ``same``
        difference = np.where(same, 0.0, np.abs(reference - joined.log_rates))
    return merged, float(difference.max(initial=0.0))


def compact_table(path: str | Path) -> MergeReport:
    """Rewrite all parts as one (no loss: the parts read are removed only after the merged one is in)."""
    header, rows, report = read_table(path)
    if len(report.parts) > 1:
        write_part(path, header, rows, writer="compact")
        for name in report.parts:
            shutil.rmtree(Path(path) / PARTS / name)
    return report
