"""The whole study in one call, at a tiny size, on a real local Ray: every stage's output exists and
is consistent, and a rerun reuses what is done instead of redoing it."""

import dataclasses
import json

import pytest
import xarray as xr

from analysis.observables import setting
from hpcdyn.distributed.pipeline import PRESETS, _check_same_preset, pipeline_summary, run_pipeline
from hpcdyn.physics.systems import ConfigurationError

TINY = dataclasses.replace(
    PRESETS["quick"],
    name="tiny",
    # the main job's models (hard-local, trained on statistics, simulated on environment tables), tiny
    sweep_overrides=(("data.t_final", 8.0), ("training.epochs", 1), ("training.patience", 1),
                     ("model.attention_stencil", "vn1"), ("model.rotary", False), ("model.n_layers", 1),
                     ("training.statistics", True), ("training.statistics_steps", 5)),  # fmt: skip
    sweep_grids=(("model.n_classes", (1, 2)), ("training.seed", (0,))),
    densities=(0.124, 0.3),
    replicas=2,
    t_final=4.0,
    snapshot_every=1.0,
    burn_in=1.0,
    activity_v_plus=(5.0,),
)


@pytest.fixture(scope="module")
def ray_session():
    from hpcdyn.distributed.cluster import init_ray

    ray = init_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_and_a_rerun_reuses_them(tmp_path, ray_session):
    out = tmp_path / "study"
    record = run_pipeline(TINY, out)
    stages = record["stages"]
    assert list(stages) == ["sweep", "model", "ensemble", "activity", "report"]
    # the sweep: Mode 2 with N_theta 1, 2 and Mode 1 (3 trials), the best one by held-out U/T
    results = xr.open_zarr(stages["sweep"]["results"], consolidated=False)
    assert int((results["status"] == "done").sum()) == 3
    best = stages["sweep"]["best_trial"]
    assert best["val_U_per_T"] == pytest.approx(float(results["val_U_per_T"].max()))
    # the model copy and the ensemble of original and learned dynamics
    assert (out / "models" / "learned" / "best.pt").exists()
    ensemble = xr.open_zarr(stages["ensemble"]["store"])
    assert list(ensemble["model"].values) == ["original", "learned"]
    assert list(ensemble["density"].values) == [0.124, 0.3]
    assert ensemble.sizes["replica"] == 2
    assert stages["ensemble"]["units_skipped"] == 0
    learned = ensemble.attrs["config"]["models"][1]  # the hard-local model ran on its environment table
    assert (learned["engine"], learned["key_family"]) == ("table", "vn1")
    # the activity study: one Mode 1 model at v_plus 5, its own ensemble beside the main one
    activity = xr.open_zarr(stages["activity"]["results"], consolidated=False)
    assert activity["v_plus"].values.tolist() == [5.0] and bool((activity["status"] == "done").all())
    activity_store = xr.open_zarr(stages["activity"]["stores"]["5"]["store"])
    assert list(activity_store["model"].values) == ["original", "activity-vp5"]
    assert setting(activity_store.attrs, "v_plus") == 5.0
    # the report, with the (density, activity) maps of both stores
    assert (out / "report" / "activity_maps.png").exists()
    report = (out / "report" / "report.md").read_text()
    assert "learned" in report and "original" in report
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {row["model"] for row in summary["results"]} == {"original", "learned"}
    assert json.loads((out / "pipeline.json").read_text())["stages"].keys() == stages.keys()
    printed = pipeline_summary(record, out)  # what the command prints
    assert printed["preset"] == "tiny" and printed["activity"] == {"5": stages["activity"]["stores"]["5"]["store"]}
    assert printed["ensemble"] == stages["ensemble"]["store"] and printed["report"] == stages["report"]["report"]

    again = run_pipeline(TINY, out)["stages"]
    assert again["ensemble"]["units_run"] == 0 and again["ensemble"]["units_skipped"] == stages["ensemble"]["units"]
    assert again["activity"]["stores"]["5"]["units_run"] == 0
    assert again["model"]["sha256"] == stages["model"]["sha256"]
    assert again["sweep"]["best_trial"] == best


def test_another_preset_in_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"preset": PRESETS["paper"].as_dict(), "stages": {}}))
    with pytest.raises(ConfigurationError, match="^out: .* preset 'paper'"):
        run_pipeline("quick", out)


def test_a_run_recorded_before_a_setting_existed_is_resumed_not_refused(tmp_path):
    older = PRESETS["quick"].as_dict()
    del older["activity_v_plus"]  # recorded before the activity stage existed
    _check_same_preset({"preset": older, "stages": {}}, PRESETS["quick"], tmp_path)
    older["replicas"] += 1  # a setting that differs is still refused
    with pytest.raises(ConfigurationError, match="^out: .* preset 'quick'"):
        _check_same_preset({"preset": older, "stages": {}}, PRESETS["quick"], tmp_path)


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigurationError, match="^preset: .*paper, quick"):
        run_pipeline("huge", tmp_path / "study")
