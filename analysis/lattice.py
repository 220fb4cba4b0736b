"""Observables of lattice snapshots on the torus, in plain numpy (DESIGN 1.5).

A snapshot is an integer grid [..., y, x]: 0 for an empty site, 1 + o for a particle of orientation o.
Every function takes any number of leading (batch) dimensions and treats the last two as a periodic
L_y x L_x lattice; nothing loops over sites in Python.

    f4 = fraction_surrounded(grid)                   # particles with all four neighbours occupied
    labels = periodic_cluster_labels(grid > 0)       # 4-connected clusters, merged across the boundaries
    table = snapshot_observables(grid)               # [..., len(SNAPSHOT_OBSERVABLES)]
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Per-snapshot observables, in the order of the last axis of snapshot_observables().
SNAPSHOT_OBSERVABLES = ("n_particles", "f4", "n_clusters", "mean_cluster_size", "largest_cluster_fraction")

# 4-connectivity inside one lattice plane, none across the batch axis.
_PLANE_CROSS = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0]] * 3], bool)


def _as_batch(grid: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    grid = np.asarray(grid)
    if grid.ndim < 2:
        raise ValueError(f"grid: needs at least two dimensions (y, x), got shape {grid.shape}")
    return grid.reshape(-1, *grid.shape[-2:]), grid.shape[:-2]


def fraction_surrounded(grid: np.ndarray) -> np.ndarray:
    """f4: the fraction of particles whose four nearest-neighbour sites (periodic) are all occupied.

    NaN for a snapshot without particles.
    """
    occupied = np.asarray(grid) > 0
    surrounded = occupied.copy()
    surrounded[..., :, 1:] &= occupied[..., :, :-1]  # left neighbour, then the wrapped column
    surrounded[..., :, :1] &= occupied[..., :, -1:]
    surrounded[..., :, :-1] &= occupied[..., :, 1:]  # right neighbour
    surrounded[..., :, -1:] &= occupied[..., :, :1]
    surrounded[..., 1:, :] &= occupied[..., :-1, :]  # neighbour below
    surrounded[..., :1, :] &= occupied[..., -1:, :]
    surrounded[..., :-1, :] &= occupied[..., 1:, :]  # neighbour above
    surrounded[..., -1:, :] &= occupied[..., :1, :]
    n_particles = occupied.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return surrounded.sum(axis=(-2, -1)) / n_particles


def _open_labels_and_merge(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open-boundary labels [B, y, x] (raster order over the batch) and, per label, its torus cluster.

    ``merged[label]`` is a cluster id (0 for the background); labels facing each other across the
    periodic edges share one.
    """
    labels, count = ndimage.label(batch, structure=_PLANE_CROSS)
    first = np.concatenate([labels[:, 0, :].ravel(), labels[:, :, 0].ravel()])
    last = np.concatenate([labels[:, -1, :].ravel(), labels[:, :, -1].ravel()])
    joined = (first > 0) & (last > 0)
    edges = coo_matrix(
        (np.ones(int(joined.sum()), np.int8), (first[joined], last[joined])), shape=(count + 1, count + 1)
    )
    _, component = connected_components(edges, directed=False)
    merged = (component + 1).astype(labels.dtype)
    merged[0] = 0
    return labels, merged


def periodic_cluster_labels(occupied: np.ndarray) -> np.ndarray:
    """Label 4-connected clusters of occupied sites on the torus.

    Returns integer labels of the same shape, 0 on empty sites; a cluster that wraps around a boundary
    keeps one label. Labels are distinct across the whole batch (a label never appears in two
    snapshots) but not consecutive.
    """
    batch, shape = _as_batch(np.asarray(occupied, dtype=bool))
    labels, merged = _open_labels_and_merge(batch)
    return merged[labels].reshape(*shape, *batch.shape[-2:])


def cluster_statistics(grid: np.ndarray) -> dict[str, np.ndarray]:
    """Per snapshot: number of clusters, mean cluster size (particles per cluster), largest cluster.

    Returns arrays of the batch shape: ``n_particles``, ``n_clusters`` (0 when empty),
    ``mean_cluster_size`` = n_particles / n_clusters and ``largest_cluster`` (both NaN / 0 when empty).
    """
    batch, shape = _as_batch(grid)
    occupied = batch > 0
    labels, merged = _open_labels_and_merge(occupied)
    # ndimage numbers labels in raster order, so snapshot b holds the labels after the last of b - 1.
    last_label = np.maximum.accumulate(labels.reshape(len(batch), -1).max(axis=1, initial=0))
    open_size = np.bincount(labels.ravel(), minlength=len(merged))
    open_size[0] = 0
    size = np.bincount(merged, weights=open_size).astype(np.int64)  # per torus cluster
    owner = np.zeros(len(size), np.int64)
    owner[merged[1:]] = np.searchsorted(last_label, np.arange(1, len(merged)), side="left")
    used = np.flatnonzero(size)
    n_clusters = np.bincount(owner[used], minlength=len(batch))
    largest = np.zeros(len(batch), np.int64)
    np.maximum.at(largest, owner[used], size[used])
    n_particles = occupied.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_size = n_particles / n_clusters
    return {
        "n_particles": n_particles.reshape(shape),
        "n_clusters": n_clusters.reshape(shape),
        "mean_cluster_size": mean_size.reshape(shape),
        "largest_cluster": largest.reshape(shape),
    }


def snapshot_observables(grid: np.ndarray) -> np.ndarray:
    """All per-snapshot observables as float64 [..., len(SNAPSHOT_OBSERVABLES)].

    Snapshots without particles (never written, or an empty lattice) give n_particles 0 and NaN
    for everything else, so averages skip them.
    """
    batch, shape = _as_batch(grid)
    clusters = cluster_statistics(batch)
    n_particles = clusters["n_particles"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        largest_fraction = clusters["largest_cluster"] / n_particles
    n_clusters = np.where(n_particles > 0, clusters["n_clusters"], np.nan)
    table = np.stack(
        [n_particles, fraction_surrounded(batch), n_clusters, clusters["mean_cluster_size"], largest_fraction],
        axis=-1,
    )
    return table.reshape(*shape, len(SNAPSHOT_OBSERVABLES))
