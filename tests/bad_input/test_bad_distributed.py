"""hpcdyn ensemble, sweep, pipeline and analyze: every option validated before Ray starts or
anything is written; damaged ensemble stores named by array and chunk."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from hpcdyn.physics.systems import ConfigurationError

from .common import assert_refused, listing, run_cli

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
TOO_MANY_CPUS = str((os.cpu_count() or 1) + 1)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Bad input must be refused before Ray starts: starting it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr("hpcdyn.distributed.cluster.init_ray", refuse)


ENSEMBLE = ["ensemble", "--model", "original", "--density", "0.2", "--replicas", "2", "--t-final", "2",
            "--snapshot-every", "1", "--L", "8"]  # fmt: skip

ENSEMBLE_OPTIONS = [
    (["--cpus-per-actor", "0"], "--cpus-per-actor"),
    (["--cpus-per-actor", TOO_MANY_CPUS], "cpus_per_actor:"),
    (["--gpus-per-actor", "nan"], "--gpus-per-actor"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor"),
    (["--actors", "0"], "--actors"),
    (["--max-restarts", "-1"], "--max-restarts"),
    (["--replicas", "0"], "replicas:"),
    (["--replicas-per-unit", "0"], "--replicas-per-unit"),
    (["--seed", "-3"], "--seed"),
    (["--density", "1.5"], "density:"),
    (["--density", "0.3", "0.3"], "density:"),
    (["--density", "nan"], "density:"),
    (["--t-final", "-1"], "--t-final"),
    (["--burn-in", "5"], "burn_in:"),
    (["--snapshot-every", "1e-9"], "snapshot_every:"),
    (["--v-plus", "1e308"], "t_final:"),
    (["--t-final", "1e9", "--snapshot-every", "1e6"], "t_final:"),
    (["--L", "1"], "L:"),
    (["--D", "-1"], "D:"),
    (["--model", "runs/none"], "model:"),
    (["--model", "original"], "model:"),  # twice
    (["--table-family", "vn1"], "table_family:"),  # without --engine table
    (["--engine", "table", "--table-family", "block4"], "table_family:"),
]


@pytest.mark.parametrize("arguments, field", ENSEMBLE_OPTIONS)
def test_ensemble_options(tmp_path, capsys, arguments, field):
    assert_refused(run_cli([*ENSEMBLE, "--out", tmp_path / "e.zarr", *arguments], capsys), field)
    assert listing(tmp_path) == []


@NO_GPU
def test_ensemble_gpus_that_this_machine_lacks(tmp_path, capsys):
    assert_refused(run_cli([*ENSEMBLE, "--out", tmp_path / "e.zarr", "--gpus-per-actor", "1"], capsys), "gpus_per_actor:")
    assert listing(tmp_path) == []


def test_ensemble_never_writes_into_or_replaces_another_product(trajectory_template, tmp_path, capsys):
    before = listing(trajectory_template)
    for extra in ([], ["--overwrite"]):
        assert_refused(run_cli([*ENSEMBLE, "--out", trajectory_template, *extra], capsys), "out:")
    assert listing(trajectory_template) == before
    (tmp_path / "a-file").write_text("x")
    assert_refused(run_cli([*ENSEMBLE, "--out", tmp_path / "a-file" / "e.zarr"], capsys), "out:")


SWEEP = ["sweep", "ntheta", "--smoke"]
SWEEP_OPTIONS = [
    (["--num-cpus", "-2"], "--num-cpus"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--cpus-per-trial", "inf"], "--cpus-per-trial"),
    (["--cpus-per-trial", TOO_MANY_CPUS], "cpus_per_trial:"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial"),
    (["--max-failures", "-1"], "--max-failures"),
    (["--max-concurrent", "0"], "--max-concurrent"),
    (["--set", "data.t_final=Infinity"], "data.t_final:"),
    (["--set", "data.t_final=1e13"], "t_final:"),
    (["--set", "data.seed=-1"], "data.seed:"),
    (["--set", "training.lr=fast"], "training.lr:"),
    (["--set", "training.epochs=true"], "training.epochs:"),
    (["--set", "nope.x=1"], "nope.x:"),
    (["--grid", "model.n_classes="], "--grid"),
    (["--name", "../elsewhere"], "name:"),
    (["--address", "auto", "--num-cpus", "2"], "num_cpus:"),
]


@pytest.mark.parametrize("arguments, field", SWEEP_OPTIONS)
def test_sweep_options(tmp_path, capsys, arguments, field):
    assert_refused(run_cli([*SWEEP, "--storage", tmp_path / "sweeps", *arguments], capsys), field)
    assert listing(tmp_path) == []


def test_sweep_study_and_storage(tmp_path, capsys):
    assert_refused(run_cli(["sweep", "nthetaa", "--storage", tmp_path / "s"], capsys), "study:")
    (tmp_path / "a-file").write_text("x")
    assert_refused(run_cli([*SWEEP, "--storage", tmp_path / "a-file" / "s"], capsys), "storage:")
    assert listing(tmp_path) == ["a-file"]


PIPELINE_OPTIONS = [
    (["--cpus-per-actor", "0"], "--cpus-per-actor"),
    (["--num-cpus", "0"], "--num-cpus"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial"),
    (["--cpus-per-trial", "-1"], "--cpus-per-trial"),
    (["--cpus-per-trial", TOO_MANY_CPUS], "cpus_per_trial:"),
    (["--cpus-per-actor", TOO_MANY_CPUS], "cpus_per_actor:"),
    (["--address", "10.0.0.1:6379", "--num-cpus", "2"], "num_cpus:"),
    (["--preset", "huge"], "--preset"),
]


@pytest.mark.parametrize("arguments, field", PIPELINE_OPTIONS)
def test_pipeline_options_are_checked_before_any_stage(tmp_path, capsys, arguments, field):
    assert_refused(run_cli(["pipeline", "--out", tmp_path / "study", *arguments], capsys), field)
    assert listing(tmp_path) == []


def test_pipeline_options_in_the_library():
    from hpcdyn.distributed.pipeline import PipelineOptions

    for options, field in (({"cpus_per_actor": 0}, "cpus_per_actor"), ({"gpus_per_actor": float("nan")}, "gpus_per_actor"),
                           ({"cpus_per_trial": 0}, "cpus_per_trial"), ({"num_cpus": -2}, "num_cpus")):  # fmt: skip
        with pytest.raises(ConfigurationError, match=f"^{field}:"):
            PipelineOptions(**options)


def test_pipeline_refuses_a_directory_it_did_not_write(trajectory_template, tmp_path, capsys):
    before = listing(trajectory_template)
    assert_refused(run_cli(["pipeline", "--out", trajectory_template], capsys), "out:")
    assert listing(trajectory_template) == before
    (tmp_path / "a-file").write_text("x")
    assert_refused(run_cli(["pipeline", "--out", tmp_path / "a-file"], capsys), "out:")


def _shard(store, name="occupancy"):
    return sorted((store / name / "c").rglob("*"), key=str)[-1]


ANALYZE_DAMAGE = {
    "missing shard": (lambda s: _shard(s).unlink(), "occupancy: chunk"),
    "garbage shard": (lambda s: _shard(s).write_bytes(b"garbage" * 30), "occupancy (chunk"),
    "extra chunk": (lambda s: (s / "events" / "c" / "9" / "9").mkdir(parents=True) or (s / "events/c/9/9/9").write_bytes(b"x"), "events: unexpected chunk"),
    "missing array": (lambda s: shutil.rmtree(s / "move_count"), "move_count"),
}


@pytest.mark.parametrize("damage", sorted(ANALYZE_DAMAGE))
def test_analyze_names_the_damaged_array_and_leaves_no_report(ensemble_store, tmp_path, capsys, damage):
    apply, field = ANALYZE_DAMAGE[damage]
    apply(ensemble_store)
    assert [path for path in _shard(ensemble_store).parts if path == "c"]  # the layout the damage assumes
    out = tmp_path / "report"
    assert_refused(run_cli(["analyze", ensemble_store, "--out", out, "--no-progress"], capsys), field)
    assert not out.exists() and not [path for path in tmp_path.iterdir() if path.name.startswith(".report")]


def test_analyze_options(ensemble_template, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notes").mkdir()
    cases = [
        ([tmp_path / "absent.zarr", "--out", tmp_path / "r"], "store:"),
        ([ensemble_template, "--out", tmp_path / "a-file" / "r"], "out:"),
        ([ensemble_template, "--out", tmp_path / "r", "--sweep", tmp_path / "no-sweep"], "sweep:"),
        ([ensemble_template, "--out", tmp_path / "r", "--activity", tmp_path / "no.zarr"], "activity:"),
        ([ensemble_template, "--out", tmp_path / "notes", "--overwrite"], "out:"),
        ([ensemble_template, "--out", tmp_path / "r", "--burn-in", "-1"], "--burn-in"),
    ]
    for arguments, field in cases:
        assert_refused(run_cli(["analyze", *arguments], capsys), field)
    assert listing(tmp_path) == ["a-file", "notes"]
