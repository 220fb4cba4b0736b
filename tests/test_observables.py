"""Observables of lattice snapshots: hand-built configurations with known answers, a slow reference
implementation on random configurations, and the lazy replica statistics over an ensemble."""

from __future__ import annotations

from collections import deque

import dask
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

from analysis.lattice import (
    SNAPSHOT_OBSERVABLES,
    cluster_statistics,
    fraction_surrounded,
    periodic_cluster_labels,
    snapshot_observables,
)
from analysis.observables import (
    ENSEMBLE_DIMS,
    replica_averages,
    snapshot_dataset,
    summarize,
)
from hpcdyn.physics.systems import ConfigurationError


def reference_clusters(grid: np.ndarray) -> list[frozenset]:
    """Breadth-first search with explicit modular neighbours: the clusters as sets of (y, x)."""
    ly, lx = grid.shape
    seen: set = set()
    clusters = []
    for start in zip(*np.nonzero(grid)):
        if start in seen:
            continue
        seen.add(start)
        queue, members = deque([start]), {start}
        while queue:
            y, x = queue.popleft()
            for ny, nx in (((y + 1) % ly, x), ((y - 1) % ly, x), (y, (x + 1) % lx), (y, (x - 1) % lx)):
                if grid[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    members.add((ny, nx))
                    queue.append((ny, nx))
        clusters.append(frozenset(members))
    return clusters


def reference_f4(grid: np.ndarray) -> float:
    ly, lx = grid.shape
    particles = list(zip(*np.nonzero(grid)))
    surrounded = sum(
        all(grid[ny, nx] for ny, nx in (((y + 1) % ly, x), ((y - 1) % ly, x), (y, (x + 1) % lx), (y, (x - 1) % lx)))
        for y, x in particles
    )
    return surrounded / len(particles) if particles else float("nan")


def clusters_from_labels(labels: np.ndarray) -> set[frozenset]:
    return {frozenset(zip(*np.nonzero(labels == label))) for label in np.unique(labels[labels > 0])}


def grid_with(sites, shape=(6, 6), value=1) -> np.ndarray:
    grid = np.zeros(shape, np.int8)
    for y, x in sites:
        grid[y, x] = value
    return grid


def statistics(grid):
    return {name: value.item() for name, value in cluster_statistics(grid).items()}


# --- hand-built configurations with known answers ------------------------------------------------


@pytest.mark.parametrize("side", [2, 3, 7])
def test_full_lattice_is_one_cluster_with_every_particle_surrounded(side):
    grid = np.full((side, side), 3, np.int8)  # orientation is irrelevant: any value > 0 is a particle
    assert fraction_surrounded(grid) == 1.0
    assert statistics(grid) == {
        "n_particles": side * side, "n_clusters": 1, "mean_cluster_size": side * side, "largest_cluster": side * side
    }


def test_empty_lattice_has_no_clusters_and_undefined_averages():
    grid = np.zeros((5, 5), np.int8)
    assert np.isnan(fraction_surrounded(grid))
    result = statistics(grid)
    assert result["n_particles"] == 0 and result["n_clusters"] == 0 and result["largest_cluster"] == 0
    assert np.isnan(result["mean_cluster_size"])
    row = snapshot_observables(grid)
    assert row[0] == 0 and np.isnan(row[1:]).all()  # an unwritten snapshot is missing, not zero


@pytest.mark.parametrize("side", [4, 6, 10])
def test_checkerboard_has_isolated_particles(side):
    grid = (np.indices((side, side)).sum(axis=0) % 2).astype(np.int8)
    assert fraction_surrounded(grid) == 0.0
    assert statistics(grid) == {
        "n_particles": side * side // 2, "n_clusters": side * side // 2, "mean_cluster_size": 1.0, "largest_cluster": 1
    }


@pytest.mark.parametrize("row", [0, 3, 5])
def test_full_row_is_one_cluster_of_size_L(row):
    grid = grid_with([(row, x) for x in range(6)])
    assert statistics(grid) == {"n_particles": 6, "n_clusters": 1, "mean_cluster_size": 6.0, "largest_cluster": 6}
    assert fraction_surrounded(grid) == 0.0
    assert statistics(grid.T)["n_clusters"] == 1  # a full column too


def test_cluster_across_both_boundaries_counts_once():
    corners = grid_with([(0, 0), (0, 5), (5, 0), (5, 5)])  # the four corners touch across both edges
    assert statistics(corners) == {"n_particles": 4, "n_clusters": 1, "mean_cluster_size": 4.0, "largest_cluster": 4}
    # A plus sign centred on the corner site, its arms cut by both boundaries.
    plus = grid_with([(0, 0), (0, 1), (0, 5), (1, 0), (5, 0)], value=2)
    assert statistics(plus)["n_clusters"] == 1
    assert fraction_surrounded(plus) == pytest.approx(1 / 5)  # only the centre has four neighbours


def test_boundary_joins_are_transitive():
    # Two vertical strips joined only through the x wrap at row 2, and through the y wrap at column 3.
    strips = [(0, 0), (1, 0), (2, 0), (2, 5), (3, 5), (4, 5), (5, 3), (0, 3), (4, 3)]
    result = statistics(grid_with(strips))
    assert result["n_clusters"] == 2  # strips 0 and 5 joined; (4,3)-(5,3) adjacent, (5,3)-(0,3) wrapped
    grid = grid_with(strips + [(0, 4), (0, 5)])  # now row 0 links column 3 to the strips
    assert statistics(grid)["n_clusters"] == 1


def test_isolated_particles_including_across_the_wrap():
    sites = [(0, 0), (0, 2), (0, 4), (2, 1), (2, 3), (4, 0), (4, 2), (4, 4)]  # no two touch on the 6x6 torus
    grid = grid_with(sites)
    assert statistics(grid) == {"n_particles": 8, "n_clusters": 8, "mean_cluster_size": 1.0, "largest_cluster": 1}
    grid[5, 0] = 1  # touches (4, 0) and, across the y boundary, (0, 0)
    assert statistics(grid) == {"n_particles": 9, "n_clusters": 7, "mean_cluster_size": 9 / 7, "largest_cluster": 3}


def test_block_has_only_its_interior_surrounded():
    block = grid_with([(y, x) for y in range(1, 4) for x in range(1, 4)], shape=(7, 7))
    assert fraction_surrounded(block) == pytest.approx(1 / 9)
    assert statistics(block)["n_clusters"] == 1


def test_batches_are_independent_snapshots():
    rng = np.random.default_rng(3)
    grids = (rng.random((2, 3, 8, 5)) < 0.45).astype(np.int8)  # rectangular lattices, batch (2, 3)
    table = snapshot_observables(grids)
    assert table.shape == (2, 3, len(SNAPSHOT_OBSERVABLES))
    for index in np.ndindex(2, 3):
        np.testing.assert_array_equal(table[index], snapshot_observables(grids[index]))
    labels = periodic_cluster_labels(grids > 0)
    per_snapshot = [set(np.unique(labels[index])) - {0} for index in np.ndindex(2, 3)]
    assert sum(len(names) for names in per_snapshot) == len(set().union(*per_snapshot))  # no label shared


# --- against the slow reference on random configurations -----------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_configurations_match_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    for shape in [(2, 2), (3, 3), (5, 5), (8, 8), (4, 7), (13, 9), (1, 6)]:
        for density in (0.1, 0.3, 0.5, 0.6, 0.8, 0.95):
            grid = (rng.random(shape) < density) * rng.integers(1, 5, shape)
            expected = reference_clusters(grid)
            assert clusters_from_labels(periodic_cluster_labels(grid > 0)) == set(expected)
            result = statistics(grid)
            sizes = [len(cluster) for cluster in expected]
            assert result["n_clusters"] == len(expected)
            assert result["largest_cluster"] == max(sizes, default=0)
            if sizes:
                assert result["mean_cluster_size"] == pytest.approx(np.mean(sizes), rel=1e-12)
            np.testing.assert_equal(fraction_surrounded(grid), reference_f4(grid))


# --- lazy statistics over an ensemble ------------------------------------------------------------


def hand_built_ensemble(side: int = 4) -> xr.Dataset:
    """Two replicas whose observables are known exactly; before time 2 the lattice differs (burn-in)."""
    full = np.full((side, side), 1, np.int8)
    checker = (np.indices((side, side)).sum(axis=0) % 2).astype(np.int8) * 2
    times = np.arange(6.0)
    occupancy = np.zeros((1, 1, 2, len(times), side, side), np.int8)
    occupancy[0, 0, 0] = [checker, checker, full, full, full, full]  # after burn-in: f4 = 1 throughout
    occupancy[0, 0, 1] = [full, full, checker, full, checker, full]  # after burn-in: f4 = 0, 1, 0, 1
    return xr.Dataset(
        {"occupancy": (ENSEMBLE_DIMS, occupancy), "rejected_mass": (("model", "density", "replica"), np.zeros((1, 1, 2)))},
        coords={"model": ["original"], "density": [0.5], "replica": [0, 1], "time": times},
        attrs={"burn_in": 2.0, "config": {"L": side}},
    )


def test_replica_statistics_have_known_values():
    summary = summarize(hand_built_ensemble()).compute().sel(model="original", density=0.5)
    # Replica time averages of f4: 1 and 0.5, so mean 0.75 and se = std([1, 0.5], ddof=1) / sqrt(2) = 0.25.
    assert float(summary["f4"]) == pytest.approx(0.75)
    assert float(summary["f4_se"]) == pytest.approx(0.25)
    # Variance of f4 over time (ddof 1): 0 for replica 0, var([0, 1, 0, 1]) = 1/3 for replica 1.
    assert float(summary["f4_variance"]) == pytest.approx(1 / 6)
    # Clusters: replica 0 has 1 throughout; replica 1 averages (8 + 1 + 8 + 1) / 4 = 4.5.
    assert float(summary["n_clusters"]) == pytest.approx((1 + 4.5) / 2)
    assert float(summary["mean_cluster_size"]) == pytest.approx((16 + (1 + 16 + 1 + 16) / 4) / 2)
    assert int(summary["n_replicas"]) == 2


def test_burn_in_argument_overrides_the_attribute_and_is_checked():
    everything = summarize(hand_built_ensemble(), burn_in=0.0).compute().sel(model="original", density=0.5)
    assert float(everything["f4"]) == pytest.approx(4 / 6)  # four full lattices (f4 = 1) in each replica
    with pytest.raises(ConfigurationError, match="burn_in"):
        summarize(hand_built_ensemble(), burn_in=6.5)
    with pytest.raises(ConfigurationError, match="burn_in"):
        summarize(hand_built_ensemble(), burn_in=-1.0)


def test_unwritten_snapshots_are_missing_not_zero():
    ensemble = hand_built_ensemble()
    ensemble["occupancy"][0, 0, 1, 5] = 0  # replica 1 never wrote its last snapshot
    averages = replica_averages(snapshot_dataset(ensemble), burn_in=2.0).compute().sel(model="original", density=0.5)
    assert float(averages["f4"].sel(replica=1)) == pytest.approx(1 / 3)  # 0, 1, 0
    assert float(averages["n_clusters"].sel(replica=1)) == pytest.approx((8 + 1 + 8) / 3)


class CountingCallback(Callback):
    def __init__(self):
        super().__init__()
        self.computations = 0

    def _start(self, dsk):
        self.computations += 1


@pytest.mark.parametrize("per_density_count", [False, True])
def test_nothing_computes_until_asked_and_chunks_do_not_matter(per_density_count):
    ensemble = hand_built_ensemble(side=6)
    if per_density_count:  # as a store has: the particles each density places, a coordinate named like a column
        ensemble = ensemble.assign_coords(n_particles=("density", [36]))
    counter = CountingCallback()
    with counter:
        lazy = summarize(ensemble.chunk({"replica": 1, "time": 2, "y": 3, "x": 2}))
        assert all(isinstance(lazy[name].data, dask.array.Array) for name in lazy.data_vars)
        assert counter.computations == 0
        chunked = lazy.compute()
    assert counter.computations == 1
    xr.testing.assert_allclose(chunked, summarize(ensemble).compute())


def test_core_dims_may_come_in_any_order():
    ensemble = hand_built_ensemble(side=5)
    ensemble["occupancy"][0, 0, 0, :, 0, :] = 0  # break the y <-> x symmetry of the full lattice
    shuffled = ensemble.transpose("x", "time", "replica", "y", "density", "model")
    xr.testing.assert_allclose(summarize(shuffled).compute(), summarize(ensemble).compute())


def test_a_dataset_without_occupancy_or_with_wrong_dims_is_refused():
    with pytest.raises(ConfigurationError, match="occupancy"):
        summarize(xr.Dataset({"n_particles": ("replica", [1, 2])}))
    wrong = hand_built_ensemble().isel(model=0)
    with pytest.raises(ConfigurationError, match="dims"):
        summarize(wrong)


def test_progress_bar_counts_the_tasks_and_changes_nothing(capsys):
    from analysis.observables import compute

    lazy = summarize(hand_built_ensemble().chunk({"replica": 1}))
    xr.testing.assert_identical(compute(lazy, progress=True), lazy.compute())
    assert "analyse" in capsys.readouterr().err  # tqdm writes to stderr
