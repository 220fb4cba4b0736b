"""Checks that trust nothing on disk: every chunk file present and none extra, every read decoded.

A Zarr array whose chunk file is missing reads as its fill value, silently. Arrays of hpcdyn stores
use a fill value that no real datum has (-1, NaN), so a hole is visible; these helpers find holes
from the file listing alone (cheap: no chunk is decoded) and turn decoding failures (a damaged
blosc frame raises RuntimeError deep inside the codec pipeline) into one-line ``StoreError``s that
name the store, the array and the chunk.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np


class StoreError(ValueError):
    """A store that cannot be read: wrong schema, unfinished, truncated, damaged or not a store at all."""


def first_line(error: BaseException) -> str:
    """An exception as one short line (its type when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def fill_marks_holes(array: Any) -> bool:
    """True when the array's fill value is no valid datum (negative or NaN): a missing chunk is a hole.

    Arrays whose fill value is a valid datum (0) do not store chunks equal to it, so there a missing
    chunk may be data and only the values can tell.
    """
    fill = array.fill_value
    try:
        value = float(fill)
    except (TypeError, ValueError):
        return False
    return math.isnan(value) or value < 0


def expected_chunk_keys(array: Any) -> list[str]:
    """Keys of every chunk (or shard) file the array's grid defines, in grid order."""
    outer = array.metadata.chunk_grid.chunk_shape
    counts = [math.ceil(size / chunk) if chunk else 0 for size, chunk in zip(array.shape, outer)]
    return [array.metadata.encode_chunk_key(index) for index in itertools.product(*(range(count) for count in counts))]


def stored_chunk_keys(directory: Path) -> set[str]:
    """Keys of the chunk files under an array's directory (its metadata and hidden files excluded)."""
    keys = set()
    for item in directory.rglob("*"):
        relative = item.relative_to(directory)
        if item.is_file() and relative.name != "zarr.json" and not any(part.startswith(".") for part in relative.parts):
            keys.add(relative.as_posix())
    return keys


def check_chunk_files(store: Path, name: str, array: Any) -> None:
    """Refuse an array with a missing chunk (where its fill value marks holes) or an extra one."""
    expected = expected_chunk_keys(array)
    stored = stored_chunk_keys(store / name)
    extra = sorted(stored - set(expected))
    if extra:
        raise StoreError(
            f"{store}: array {name}: unexpected chunk file {extra[0]} beyond its {len(expected)} chunk(s) "
            f"({len(extra)} extra); the store was altered"
        )
    if fill_marks_holes(array):
        missing = [key for key in expected if key not in stored]
        if missing:
            raise StoreError(
                f"{store}: array {name}: chunk {missing[0]} is missing ({len(missing)} of {len(expected)} missing); "
                "the store is truncated"
            )


def read_array(store: Path, name: str, array: Any, selection: Any = Ellipsis, what: str = "") -> np.ndarray:
    """``array[selection]``, with a decoding failure reported as a StoreError naming store, array and part."""
    try:
        return np.asarray(array[selection])
    except Exception as error:  # the codec pipeline raises RuntimeError, ValueError, ... for a damaged frame
        part = f" ({what})" if what else ""
        raise StoreError(
            f"{store}: array {name}{part} cannot be decoded ({first_line(error)}); the store is damaged"
        ) from error


def verify_chunks(store: Path, name: str, array: Any) -> None:
    """Decode every chunk (or shard) of an array, one at a time; the first failure names its chunk."""
    outer = array.metadata.chunk_grid.chunk_shape
    counts = [math.ceil(size / chunk) if chunk else 0 for size, chunk in zip(array.shape, outer)]
    for index in itertools.product(*(range(count) for count in counts)):
        region = tuple(slice(i * chunk, min((i + 1) * chunk, size)) for i, chunk, size in zip(index, outer, array.shape))
        read_array(store, name, array, region, f"chunk {array.metadata.encode_chunk_key(index)}")
