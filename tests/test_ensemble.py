"""Ensembles on a real local Ray writing a real Zarr store: layout, determinism across actors and
reruns, faults (an actor and the driver killed with SIGKILL), and the refusal of bad input.

One local Ray serves the module; the fault tests run the driver as a subprocess that joins it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hpcdyn.learning.checkpoint import save_checkpoint, store_identity
from hpcdyn.cli import main
from hpcdyn.distributed.cluster import init_ray
from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble
from hpcdyn.storage.ensemble_store import MANIFEST, finished_units, open_ensemble, running_units
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import make_system
from hpcdyn.learning.training import TrainingConfig
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates

ARRAYS = ("occupancy", "overlap", "events", "draws", "rejected", "overlap_events", "rejected_mass", "move_count")
TRAINED_ON = make_system("active", {"L": 10, "N": 20, "D": 0.1, "v_plus": 5.0, "v_other": 1.0})


@pytest.fixture(scope="module")
def ray_address():
    ray = init_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained transformer saved the way training saves it (a run directory with best.pt)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    model_config = TransformerConfig(lattice_size=10, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    torch.manual_seed(0)
    model = TransformerRates(model_config)
    state = {
        "format": "hpcdyn.checkpoint/1",
        "model_config": model_config.as_dict(),
        "model_state": model.state_dict(),
        "optimizer_state": {},
        "training_config": TrainingConfig(model=model_config).as_dict(),
        "metrics": [],
        "store": store_identity(simulate(TRAINED_ON, 2.0, seed=1).events),
    }
    save_checkpoint(state, run / "best.pt")
    return run


def quick(checkpoint) -> EnsembleConfig:
    return EnsembleConfig(models=("original", str(checkpoint)), densities=(0.2, 0.3), replicas=3, t_final=2.0,
                          snapshot_every=0.5, burn_in=0.5, seed=3, replicas_per_unit=2)  # fmt: skip


@pytest.fixture(scope="module")
def reference(ray_address, checkpoint, tmp_path_factory):
    """The quick ensemble, run once with one actor."""
    path = tmp_path_factory.mktemp("stores") / "reference.zarr"
    summary = run_ensemble(quick(checkpoint), path, Placement(actors=1))
    return path, summary


def assert_same_store(first: Path, second: Path) -> None:
    """Every array equal bit for bit, and the same resolved configuration."""
    a, b = zarr.open_group(str(first), mode="r"), zarr.open_group(str(second), mode="r")
    for name in ARRAYS:
        assert np.array_equal(a[name][...], b[name][...], equal_nan=True), name
    assert a.attrs["config"] == b.attrs["config"]
    assert a.attrs["complete"] and b.attrs["complete"]


def test_store_opens_lazily_with_named_dims_coordinates_and_attrs(reference, checkpoint):
    path, summary = reference
    assert summary["units"] == 8 and summary["units_run"] == 8  # 2 models x 2 densities x 2 blocks
    ensemble = open_ensemble(path)
    occupancy = ensemble["occupancy"]
    assert occupancy.dims == ("model", "density", "replica", "time", "y", "x")
    assert occupancy.dtype == np.int8 and occupancy.chunks is not None  # dask-backed: lazy
    assert ensemble["model"].values.tolist() == ["original", "tiny"]
    assert ensemble["density"].values.tolist() == [0.2, 0.3]
    assert ensemble["n_particles"].values.tolist() == [20, 30]
    assert ensemble["replica"].values.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ensemble["time"].values, [0.5, 1.0, 1.5, 2.0])
    values = occupancy.values
    assert values.min() >= 0 and values.max() <= 4
    # every snapshot holds exactly N particles: overlaps of the learned model were rejected
    counts = (occupancy > 0).sum(("y", "x"))
    assert (counts == ensemble["n_particles"]).all()
    assert (ensemble["overlap"] == 0).all()
    assert (ensemble["rejected"].sel(model="tiny") > 0).all() and (ensemble["rejected"].sel(model="original") == 0).all()
    assert (ensemble["events"] > 0).all()
    config = ensemble.attrs["config"]
    learned = config["models"][1]
    assert learned["sha256"] and learned["model_config"]["lattice_size"] == 10
    assert learned["trained_on"]["params"] == TRAINED_ON.params()
    assert config["system"] == {"name": "active", "L": 10, "D": 0.1, "v_plus": 5.0, "v_other": 1.0}
    assert config["seed"] == 3 and config["burn_in"] == 0.5 and config["replicas_per_unit"] == 2
    assert {"hpcdyn", "torch", "zarr"} <= set(ensemble.attrs["versions"])
    assert ensemble.attrs["complete"] is True
    assert (path / "zarr.json").exists() and "consolidated_metadata" in (path / "zarr.json").read_text()


def test_two_actors_give_the_same_store_and_a_rerun_skips_finished_work(reference, checkpoint, tmp_path):
    path, _ = reference
    two = run_ensemble(quick(checkpoint), tmp_path / "two.zarr", Placement(actors=2))
    assert two["units_run"] == 8
    assert_same_store(path, tmp_path / "two.zarr")
    again = run_ensemble(quick(checkpoint), tmp_path / "two.zarr", Placement(actors=2))
    assert again["units_run"] == 0 and again["units_skipped"] == 8
    assert_same_store(path, tmp_path / "two.zarr")


def test_a_unit_lost_before_its_commit_is_redone_on_rerun(reference, checkpoint, tmp_path):
    """A crash between writing a shard and committing it: the rerun rewrites exactly that unit."""
    path, _ = reference
    copy = tmp_path / "copy.zarr"
    run_ensemble(quick(checkpoint), copy, Placement(in_process=True))
    assert_same_store(path, copy)
    (copy / MANIFEST / "done" / "m1-d0-r2.json").unlink()
    group = zarr.open_group(str(copy), mode="r+")
    group["occupancy"][1, 0, 2:3] = 7  # a torn write of the uncommitted unit
    group["events"][1, 0, 2:3] = -1
    rerun = run_ensemble(quick(checkpoint), copy, Placement(actors=1))
    assert rerun["units_run"] == 1
    assert_same_store(path, copy)


# ----------------------------------------------------------------------------- faults
SLOW = ["--model", "original", "--L", "16", "--density", "0.3", "--replicas", "4", "--replicas-per-unit", "1",
        "--t-final", "5000", "--snapshot-every", "250", "--seed", "8"]  # fmt: skip  # about a second per unit


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    """The slow ensemble, uninterrupted, in this process."""
    path = tmp_path_factory.mktemp("stores") / "slow.zarr"
    config = EnsembleConfig(models=("original",), densities=(0.3,), replicas=4, replicas_per_unit=1, L=16,
                            t_final=5000.0, snapshot_every=250.0, seed=8)  # fmt: skip
    run_ensemble(config, path, Placement(in_process=True))
    return path


def start_driver(out: Path, address: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "hpcdyn.cli", "ensemble", *SLOW, "--out", str(out), "--address", address, *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process pid is a descendant of ancestor (so this test started it)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            return False
    return False


def finish_driver(driver: subprocess.Popen) -> dict:
    try:
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err[-2000:]
    return json.loads(out)  # stdout holds the summary alone


@pytest.mark.slow
def test_an_actor_killed_mid_unit_is_restarted_and_the_unit_redone(ray_address, slow_reference, tmp_path):
    out = tmp_path / "actor.zarr"
    driver = start_driver(out, ray_address, "--actors", "1")
    try:
        running = wait_for(lambda: out.exists() and running_units(out), what="a unit in progress")[0]
        assert descends_from(running["pid"], os.getpid())  # an actor of this test's Ray
        os.kill(running["pid"], signal.SIGKILL)
        summary = finish_driver(driver)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert summary["units_run"] == 4
    assert_same_store(slow_reference, out)
    name = f"m{running['unit']['model']}-d{running['unit']['density']}-r{running['unit']['start']}"
    assert finished_units(out)[name]["pid"] != running["pid"]  # redone by the restarted actor
    assert not running_units(out)


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_on_rerun_without_losing_or_repeating_work(ray_address, slow_reference, tmp_path):
    out = tmp_path / "driver.zarr"
    driver = start_driver(out, ray_address, "--actors", "1")
    try:
        wait_for(lambda: out.exists() and len(finished_units(out)) >= 1, what="a finished unit")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    done_before = set(finished_units(out))
    assert 1 <= len(done_before) < 4
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    with pytest.raises(Exception, match="incomplete"):
        open_ensemble(out)
    summary = finish_driver(start_driver(out, ray_address, "--actors", "2"))
    assert summary["units_skipped"] >= len(done_before) and summary["units_run"] + summary["units_skipped"] == 4
    assert_same_store(slow_reference, out)


# ----------------------------------------------------------------------------- bad input
def ensemble_arguments(out: Path, *changes: str) -> list[str]:
    base = ["ensemble", "--model", "original", "--density", "0.3", "--replicas", "2", "--t-final", "1",
            "--snapshot-every", "0.5", "--out", str(out)]  # fmt: skip
    return base + list(changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (("--model", "no/such/run"), "model: no/such/run is neither 'original' nor a run directory"),
        (("--density", "1.5"), "density: 1.5 needs N = 1350 particles on L*L = 900 sites"),
        (("--burn-in", "5"), "burn_in: must be a time in [0, t_final = 1.0]"),
        (("--replicas", "0"), "replicas: must be an integer >= 1"),
        (("--D", "-1"), "D: must be a finite rate >= 0"),
        (("--cpus-per-actor", "64"), "cpus_per_actor: 64 per actor, the Ray cluster has 2 CPUs"),
    ],
)
def test_bad_input_is_refused_by_name_before_any_work(ray_address, tmp_path, capsys, changes, message):
    out = tmp_path / "bad.zarr"
    arguments = ensemble_arguments(out, *changes)
    if "--cpus-per-actor" in changes:
        arguments += ["--address", ray_address]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    if "--cpus-per-actor" not in changes:  # refused before the store is created
        assert not out.exists()


def test_lattice_not_matching_the_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "bad.zarr"
    assert main(ensemble_arguments(out, "--model", str(checkpoint), "--L", "12")) == 2
    assert "L: model tiny was trained on a 10 x 10 lattice and runs only there, got L = 12" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("option", ["--t-final", "--snapshot-every", "--burn-in"])
def test_negative_times_are_refused_by_argparse(tmp_path, capsys, option):
    arguments = ensemble_arguments(tmp_path / "bad.zarr")
    arguments += [option, "-1"]
    with pytest.raises(SystemExit) as stop:
        main(arguments)
    assert stop.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "bad.zarr").exists()


def test_an_existing_store_of_another_ensemble_is_not_resumed(reference, checkpoint, tmp_path, capsys):
    path, _ = reference
    copy = tmp_path / "other.zarr"
    run_ensemble(quick(checkpoint), copy, Placement(in_process=True))
    arguments = ["ensemble", "--model", "original", "--model", str(checkpoint), "--density", "0.2", "0.3",
                 "--replicas", "3", "--t-final", "2", "--snapshot-every", "0.5", "--burn-in", "0.5",
                 "--replicas-per-unit", "2", "--seed", "4", "--out", str(copy)]  # fmt: skip
    assert main(arguments) == 2
    assert "holds an ensemble with another configuration (differs in ['seed'])" in capsys.readouterr().err
    assert_same_store(path, copy)
