"""The Zarr trajectory store: contents, compression, readers, and refusal of bad stores."""

import json
import shutil

import numpy as np
import pytest
import xarray
import zarr

from hpcdyn.simulation.drivers import simulate, simulate_to_store
from hpcdyn.storage.trajectory_store import SCHEMA, StoreError, TrajectoryWriter, open_trajectory
from hpcdyn.physics.systems import make_system

SYSTEM = make_system("active", {"L": 12, "density": 0.3})


@pytest.fixture()
def store(tmp_path):
    return simulate_to_store(SYSTEM, 30.0, seed=4, out=tmp_path / "run.zarr", snapshot_every=1.0, chunk_events=1000)


def test_store_holds_exactly_the_simulated_trajectory(store):
    memory = simulate(SYSTEM, 30.0, seed=4, snapshot_every=1.0)
    trajectory = open_trajectory(store)
    loaded = trajectory.load()
    assert trajectory.n_events == memory.events.n_events > 3000
    for name in ("tokens", "moves", "dwell", "initial_positions", "initial_states"):
        assert np.array_equal(getattr(loaded, name), getattr(memory.events, name)), name
    times, grids = trajectory.snapshots()
    assert np.array_equal(grids, memory.snapshot_grids)
    assert len(times) == 31
    assert trajectory.log_likelihood == memory.events.log_likelihood


def test_attrs_name_schema_system_parameters_and_provenance(store):
    attrs = open_trajectory(store).attrs
    assert attrs["schema"] == SCHEMA and attrs["complete"] is True
    assert attrs["system"] == "active"
    assert attrs["params"] == {"L": 12, "N": 43, "D": 0.1, "v_plus": 25.0, "v_other": 1.0}
    assert attrs["t_final"] == 30.0 and attrs["seed"] == 4
    assert attrs["hpcdyn_version"] and attrs["created"]


def test_snapshots_are_occupancy_grids_with_orientation(store):
    trajectory = open_trajectory(store)
    _, grids = trajectory.snapshots()
    assert grids.dtype == np.int8 and grids.shape[1:] == (12, 12)
    assert ((grids > 0).sum(axis=(1, 2)) == 43).all()  # particle number is conserved
    assert set(np.unique(grids).tolist()) <= {0, 1, 2, 3, 4}
    first = np.zeros((12, 12), np.int8)
    positions, states = trajectory.initial_positions, trajectory.initial_states
    first[positions[:, 1], positions[:, 0]] = 1 + states
    assert np.array_equal(grids[0], first)


def test_opens_with_plain_zarr_and_with_xarray(store):
    group = zarr.open_group(str(store), mode="r")
    assert group["event_token"].dtype == np.int32
    assert group["event_move"].dtype == np.int8
    assert group["event_dwell"].dtype == np.float64
    dataset = xarray.open_zarr(store)
    assert dataset["event_dwell"].dims == ("event",)
    assert dataset["initial_position"].dims == ("token", "axis")
    assert dataset["snapshot_occupancy"].dims == ("snapshot", "y", "x")
    assert dataset.attrs["schema"] == SCHEMA
    assert float(dataset["event_dwell"].sum()) <= 30.0


def test_compression_is_blosc_zstd_bitshuffle_and_default_chunks_are_at_least_1_mb(tmp_path):
    path = simulate_to_store(SYSTEM, 5.0, seed=1, out=tmp_path / "default.zarr")
    metadata = json.loads((path / "event_dwell" / "zarr.json").read_text())
    blosc = [codec for codec in metadata["codecs"] if codec["name"] == "blosc"][0]["configuration"]
    assert blosc["cname"] == "zstd" and blosc["shuffle"] == "bitshuffle"
    group = zarr.open_group(str(path), mode="r")
    for name in ("event_token", "event_move", "event_dwell"):
        array = group[name]
        assert array.chunks[0] * array.dtype.itemsize >= 1 << 20, name


def test_writer_buffers_at_most_one_chunk(tmp_path):
    positions, states = SYSTEM.initial_configuration(np.random.default_rng(0))
    writer = TrajectoryWriter(
        tmp_path / "w.zarr", SYSTEM, t_final=1.0, seed=0, initial_positions=positions, initial_states=states, chunk_events=100
    )
    with writer:
        for size in (30, 250, 99, 1, 400):
            writer.append_events(np.zeros(size, np.int32), np.zeros(size, np.int8), np.full(size, 1e-4))
            assert writer.events.pending_rows < 100
        writer.finish()
    assert open_trajectory(tmp_path / "w.zarr").n_events == 780


def test_existing_store_is_never_overwritten_silently(store):
    before = (store / "zarr.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        simulate_to_store(SYSTEM, 1.0, seed=9, out=store)
    assert (store / "zarr.json").read_text() == before
    simulate_to_store(SYSTEM, 1.0, seed=9, out=store, overwrite=True)
    assert open_trajectory(store).seed == 9
    assert [p.name for p in store.parent.iterdir()] == ["run.zarr"]  # no temporary leftovers


def test_a_failed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = TrajectoryWriter.append_events

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return original(self, *args)

    monkeypatch.setattr(TrajectoryWriter, "append_events", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        simulate_to_store(SYSTEM, 30.0, seed=1, out=tmp_path / "run.zarr", chunk_events=500)
    assert list(tmp_path.iterdir()) == []


def test_store_of_another_schema_is_refused(store):
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["schema"] = "hpcdyn.trajectory/0"
    zarr.consolidate_metadata(str(store))
    with pytest.raises(StoreError, match="schema is 'hpcdyn.trajectory/0'.*reads 'hpcdyn.trajectory/1'"):
        open_trajectory(store)


def test_incomplete_store_is_refused(store):
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["complete"] = False
    zarr.consolidate_metadata(str(store))
    with pytest.raises(StoreError, match="incomplete"):
        open_trajectory(store)


def test_store_with_a_missing_chunk_is_refused_when_read(store):
    chunk = store / "event_dwell" / "c" / "1"
    assert chunk.exists()
    chunk.unlink()
    trajectory = open_trajectory(store)
    with pytest.raises(StoreError, match="truncated"):
        trajectory.load()


def test_store_with_a_shortened_array_is_refused(store):
    group = zarr.open_group(str(store), mode="r+")
    group["event_move"].resize((10,))
    zarr.consolidate_metadata(str(store))
    with pytest.raises(StoreError, match="truncated"):
        open_trajectory(store)


def test_store_without_an_array_is_refused(store):
    shutil.rmtree(store / "event_token")
    zarr.consolidate_metadata(str(store))
    with pytest.raises(StoreError, match="missing"):
        open_trajectory(store)


def test_things_that_are_not_stores_are_refused(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_trajectory(tmp_path / "absent.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError):
        open_trajectory(tmp_path / "plain")
