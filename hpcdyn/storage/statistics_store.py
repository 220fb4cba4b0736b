"""Sufficient statistics of a trajectory, persisted as a Zarr group beside its store (DESIGN 3.4).

    <store>.statistics/<family>-<fingerprint>-v<validation_fraction>[-m<max_train_events>].zarr
        keys int64 [K]; exposure float64 [2, K]; counts int64 [2, K, M]   (part 0: training, 1: held-out)
        attrs: schema, fingerprint, family, encoder, system, split, t_train, t_heldout, n_events

Written to a temporary name and renamed into place (a reader never sees half a group; of two
workers writing the same group, the first one's stays). A group is
refused, by name, when it belongs to another store (fingerprint), another key family, or another
split of the events.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpcdyn.physics.systems import ConfigurationError
from hpcdyn.storage.side_files import statistics_directory

SCHEMA = "hpcdyn.statistics/1"
ARRAYS = ("keys", "exposure", "counts")


def statistics_path(store_path: str | Path, family: str, fingerprint: str, validation_fraction: float,
                    max_train_events: int | None) -> Path:  # fmt: skip
    name = f"{family}-{fingerprint}-v{validation_fraction:g}"
    if max_train_events is not None:
        name += f"-m{max_train_events}"
    return statistics_directory(store_path) / f"{name}.zarr"


def save_statistics(path: str | Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        group = zarr.open_group(str(temporary), mode="w", zarr_format=3)
        for name in ARRAYS:
            data = np.ascontiguousarray(arrays[name])
            array = group.create_array(name, shape=data.shape, dtype=data.dtype, fill_value=0)
            array[...] = data
        group.attrs.update({"schema": SCHEMA, **attrs})
        try:
            temporary.rename(path)
        except OSError:  # another worker (a sweep's trials share a store) put the same statistics there first
            if not path.exists():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return path


def load_statistics(path: str | Path, fingerprint: str | None = None, family: str | None = None,
                    split: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """(arrays, attrs) of a statistics group; refused when it is not of this store, family or split."""
    path = Path(path)
    if not path.exists():
        raise ConfigurationError(f"statistics: {path} does not exist")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as error:  # zarr raises several types for a damaged group
        raise ConfigurationError(f"statistics: {path} is not a statistics group ({error})") from error
    if attrs.get("schema") != SCHEMA:
        raise ConfigurationError(f"statistics: {path} has schema {attrs.get('schema')!r}, this version reads {SCHEMA!r}")
    if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
        raise ConfigurationError(
            f"statistics: {path} are of another trajectory (fingerprint {attrs.get('fingerprint')}, this store's is "
            f"{fingerprint}); compute them from this store"
        )
    if family is not None and attrs.get("family") != family:
        raise ConfigurationError(
            f"statistics: {path} are of key family {attrs.get('family')!r}, not {family!r}; compute them for {family!r}"
        )
    if split is not None:
        saved = attrs.get("split", {})
        differing = sorted(key for key in split if saved.get(key) != split[key])
        if differing:
            raise ConfigurationError(f"statistics: {path} split the events otherwise ({differing}); compute them again")
    arrays = {name: np.asarray(group[name][...]) for name in ARRAYS}
    return arrays, attrs
