"""The whole study in one call, at a tiny size, on a real local Ray: every stage's output exists and
is consistent, and a rerun reuses what is done instead of redoing it."""

import dataclasses
import json
import math

import pytest
import xarray as xr

from analysis.observables import setting
from hpcdyn.distributed.pipeline import PRESETS, _check_same_preset, check_pipeline_directory, pipeline_summary, run_pipeline
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
    activity_mode=2,  # at the sweep's N*, as the quick preset
    activity_replicas=3,
    activity_snapshot_every=2.0,
    # the range study on a smaller trajectory than the sweep's, as the quick preset
    range_stencils=("vn1", "block3"),
    range_overrides=(("data.L", 12), ("data.t_final", 6.0)),
    snapshot_L=40,
    snapshot_densities=(0.3, 0.5),
    snapshot_t_final=4.0,
    snapshot_interval=2.0,
    # the chosen model trained again with another seed: a band around the learned curves
    seed_models=(1,),
    # beyond the paper's size, judged like the main ensemble (the large preset: L 256)
    large_L=24,
    large_densities=(0.124, 0.5),
    large_replicas=3,
    large_t_final=3.0,
    large_burn_in=1.0,
    large_snapshot_every=1.0,
    rate_shift_replicas=3,
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
    assert list(stages) == ["sweep", "model", "seeds", "range", "ensemble", "rate_shifts", "snapshots", "large", "activity",
                            "report"]  # fmt: skip
    assert set(record["stage_seconds"]) == set(stages) and all(value > 0 for value in record["stage_seconds"].values())
    # the sweep: Mode 2 with N_theta 1, 2 and Mode 1 (3 trials); the chosen model: the best Mode 2 trial at N*
    results = xr.open_zarr(stages["sweep"]["results"], consolidated=False)
    assert int((results["status"] == "done").sum()) == 3
    n_star = stages["sweep"]["n_star"]
    assert n_star in (1, 2)
    best = stages["sweep"]["best_trial"]
    assert best["coordinates"] == {"mode": 2, "n_classes": n_star, "seed": 0}
    assert best["val_U_per_T"] == pytest.approx(float(results["val_U_per_T"].sel(mode=2, n_classes=n_star).max()))
    assert stages["sweep"]["best_overall"]["val_U_per_T"] == pytest.approx(float(results["val_U_per_T"].max()))
    assert len(best["class_rates"]) == n_star and best["class_rates"] == sorted(best["class_rates"])
    # the trajectory and its statistics were prepared once, before the trials: one statistics store
    trajectories = out / "sweeps" / "trajectories"
    assert len(list((trajectories).glob("*.zarr.statistics/vn1-*.zarr"))) == 3  # ntheta, range, activity
    # and so was the held-out U under the generating rates, one per trajectory, as every trial reports it
    kept = [json.loads(path.read_text()) for path in trajectories.glob("*.zarr.statistics/true-heldout-*.json")]
    assert len(kept) == 3
    assert best["true_val_U_per_T"] in [values["log_likelihood"] / values["t_final"] for values in kept]
    # the range study: Mode 2 at N* over vn1 and block3 on its own (smaller) trajectory, r* one of them
    ranged = xr.open_zarr(stages["range"]["results"], consolidated=False)
    assert sorted(ranged["attention_stencil"].values.tolist()) == ["block3", "vn1"]
    assert bool((ranged["status"] == "done").all()) and ranged["n_classes"].values.tolist() == [n_star]
    assert ranged["seed"].values.tolist() == [0, 1]  # the sweep's seed and the other training seed: r* of each
    assert set(stages["range"]["r_star_by_seed"]) == {"0", "1"}
    assert all(found["mode_2"] in ("vn1", "block3") for found in stages["range"]["r_star_by_seed"].values())
    r_star = stages["range"]["r_star"]["mode_2"]
    plateau = stages["range"]["range"]
    assert r_star in ("vn1", "block3") and plateau["stencils"] == ["vn1", "block3"]
    scores = dict(zip(plateau["stencils"], plateau["mean"]["2"] if "2" in plateau["mean"] else plateau["mean"][2]))
    assert scores["vn1"] == pytest.approx(float(ranged["val_U_per_T"].sel(attention_stencil="vn1").mean()))  # over seeds
    assert len(list(trajectories.glob("*.zarr.statistics/block3-*.zarr"))) == 1
    # the model copy and the ensemble of original and learned dynamics
    assert (out / "models" / "learned" / "best.pt").exists()
    # its class rates with their intervals: n/E of each class on the training part (every training event
    # in one class), held against the trajectory's true rates, in report.md's first lines
    classes = stages["model"]["classes"]
    assert [entry["rate"] for entry in classes] == pytest.approx(best["class_rates"], rel=1e-5)
    assert all(entry["low"] <= entry["events"] / entry["exposure"] <= entry["high"] for entry in classes if entry["events"])
    assert stages["model"]["true_rates"] == {"D": 0.1, "v_other": 1.0, "v_plus": 25.0}
    assert set(stages["model"]["covered_by"]) == {"D", "v_other", "v_plus"}
    ensemble = xr.open_zarr(stages["ensemble"]["store"])
    assert list(ensemble["model"].values) == ["original", "learned"]
    assert list(ensemble["density"].values) == [0.124, 0.3]
    assert ensemble.sizes["replica"] == 2
    assert stages["ensemble"]["units_skipped"] == 0
    learned = ensemble.attrs["config"]["models"][1]  # the hard-local model ran on its environment table
    assert (learned["engine"], learned["key_family"]) == ("table", "vn1")
    # the other training seed: the chosen model's settings, seed 1, simulated like it (without the original)
    seeds = xr.open_zarr(stages["seeds"]["store"])
    assert list(seeds["model"].values) == ["learned-seed1"] and list(seeds["density"].values) == [0.124, 0.3]
    assert seeds.sizes["replica"] == 2 and (out / "models" / "learned-seed1" / "best.pt").exists()
    seed_trial = xr.open_zarr(stages["seeds"]["results"], consolidated=False)
    assert seed_trial["seed"].values.tolist() == [1] and bool((seed_trial["status"] == "done").all())
    # each seed's own plateau around N*: N* - 1 (when there is one), N* and N* + 1 trained
    near = [n for n in (n_star - 1, n_star, n_star + 1) if n >= 1]
    assert seed_trial["n_classes"].values.tolist() == near == stages["seeds"]["n_theta_checked"]
    assert list(stages["seeds"]["n_star_by_seed"]) == ["1"] and stages["seeds"]["n_star_by_seed"]["1"] in near
    assert len(stages["seeds"]["models"]["1"]["class_rates"]) == n_star
    # the snapshots: the same model beside the original on a larger lattice, on its table
    snapshots = xr.open_zarr(stages["snapshots"]["store"])
    assert list(snapshots["model"].values) == ["original", "learned"] and list(snapshots["density"].values) == [0.3, 0.5]
    assert (snapshots.sizes["x"], snapshots.sizes["y"], snapshots.sizes["replica"]) == (40, 40, 1)
    assert snapshots["time"].values.tolist() == [0.0, 2.0, 4.0]
    assert snapshots.attrs["config"]["models"][1]["engine"] == "table"
    occupied = (snapshots["occupancy"].isel(time=-1) > 0).sum(["x", "y"]).values  # particles are conserved
    assert occupied.tolist() == [[[480], [800]], [[480], [800]]]
    # beyond the paper's size: both dynamics on 24 x 24, 3 replicas per density, the learned one on its table
    large = xr.open_zarr(stages["large"]["store"])
    assert list(large["model"].values) == ["original", "learned"] and list(large["density"].values) == [0.124, 0.5]
    assert (large.sizes["x"], large.sizes["replica"]) == (24, 3) and large["time"].values.tolist() == [1.0, 2.0, 3.0]
    assert large.attrs["config"]["models"][1]["engine"] == "table"
    # the activity study: one Mode 2 model at N* for v_plus 5, its own ensemble beside the main one
    activity = xr.open_zarr(stages["activity"]["results"], consolidated=False)
    assert activity["v_plus"].values.tolist() == [5.0] and bool((activity["status"] == "done").all())
    base = json.loads(activity.attrs["base"])
    assert base["model.mode"] == 2 and base["model.n_classes"] == n_star
    assert len(stages["activity"]["stores"]["5"]["class_rates"]) == n_star
    activity_store = xr.open_zarr(stages["activity"]["stores"]["5"]["store"])
    assert list(activity_store["model"].values) == ["original", "activity-vp5"]
    assert setting(activity_store.attrs, "v_plus") == 5.0
    assert activity_store.sizes["replica"] == 3 and activity_store["time"].values.tolist() == [1.0, 3.0]
    # the report, with the (density, activity) maps of both stores and the snapshots of the large lattice
    assert (out / "report" / "activity_maps.png").exists() and (out / "report" / "snapshots.png").exists()
    report = (out / "report" / "report.md").read_text()
    assert "learned" in report and "original" in report
    assert f"N* = {n_star}:" in report and f"r* = {r_star} (" in report
    assert "Class rates with 99 % intervals (n/E on the training part" in report.split("## ")[0]
    assert f"Across training seeds: N* = {n_star} for seed 0 (its scan over every N_theta)" in report
    assert "; r* (Mode 2) = " in report
    assert "v_plus/D = 50 (activity-vp5)" in report
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {row["model"] for row in summary["results"]} == {"original", "learned", "learned-seed1"}
    assert [row["model"] for row in summary["family"]] == ["learned", "learned-seed1"]  # a verdict per seed
    assert summary["seeds"] == stages["seeds"]["store"] and "Across training seeds 0, 1: class rates" in report
    assert summary["snapshots"] == stages["snapshots"]["store"]
    assert [row["activity"] for row in summary["activity_family"]] == [50.0]
    assert summary["large"]["store"] == stages["large"]["store"] and summary["large"]["L"] == 24
    assert {(row["model"], row["density"], row["n_replicas"]) for row in summary["large"]["results"]} == {
        (model, density, 3) for model in ("original", "learned") for density in (0.124, 0.5)}
    assert [row["model"] for row in summary["large_family"]] == ["learned"]
    assert "## Beyond the paper: 24 x 24" in report and (out / "report" / "large_snapshots.png").exists()
    assert (out / "report" / "large_learned_vs_original.png").exists()
    assert 0 < summary["activity_family"][0]["cells"] <= 8  # 4 observables x 2 densities, those with a z
    assert json.loads((out / "pipeline.json").read_text())["stages"].keys() == stages.keys()
    printed = pipeline_summary(record, out)  # what the command prints
    assert printed["preset"] == "tiny" and printed["activity"] == {"5": stages["activity"]["stores"]["5"]["store"]}
    assert printed["ensemble"] == stages["ensemble"]["store"] and printed["report"] == stages["report"]["report"]
    assert printed["n_star"] == n_star and printed["r_star"] == {"mode_2": r_star}
    assert printed["snapshots"] == stages["snapshots"]["store"] and printed["family"] == summary["family"]
    assert printed["large"] == stages["large"]["store"] and printed["seeds"] == stages["seeds"]["store"]

    check_pipeline_directory(out)  # every entry the stages wrote is a pipeline's: the command resumes here
    again = run_pipeline(TINY, out)["stages"]
    assert again["ensemble"]["units_run"] == 0 and again["ensemble"]["units_skipped"] == stages["ensemble"]["units"]
    assert again["snapshots"]["units_run"] == 0 and again["large"]["units_run"] == 0 and again["seeds"]["units_run"] == 0
    assert again["activity"]["stores"]["5"]["units_run"] == 0
    assert again["range"]["r_star"] == stages["range"]["r_star"]
    assert again["model"]["sha256"] == stages["model"]["sha256"]
    assert again["sweep"]["best_trial"] == best
    assert [entry["units_run"] for entry in again["rate_shifts"]["shifts"]] == [0] * len(stages["rate_shifts"]["shifts"])
    _check_rate_shifts(tmp_path, out, stages)


def _check_rate_shifts(tmp_path, out, stages):
    """The rate-shift stage for a model whose classes cover every true rate (the tiny one's rarely do):
    one original ensemble per class at its rate shifted by 5 standard errors, each with its own seed,
    and the report's z's counting the error each adds."""
    from analysis.report import write_report
    from hpcdyn.distributed.pipeline import PipelineOptions, rate_shift_stage
    from hpcdyn.storage.ensemble_store import stored_config

    elsewhere = tmp_path / "shifted"
    elsewhere.mkdir()
    (elsewhere / "ensemble.zarr").symlink_to(out / "ensemble.zarr")
    classes = [{"rate": rate, "events": events, "exposure": events / rate, "low": 0.0, "high": 0.0}
               for rate, events in ((0.1, 400), (1.0, 2_500), (25.0, 10_000))]  # fmt: skip
    model = {"classes": classes, "true_rates": {"D": 0.1, "v_other": 1.0, "v_plus": 25.0},
             "covered_by": {"D": 0, "v_other": 1, "v_plus": 2}}  # fmt: skip
    shifted = rate_shift_stage(TINY, model, elsewhere, PipelineOptions())
    assert [entry["kinds"] for entry in shifted["shifts"]] == [["D"], ["v_other"], ["v_plus"]]
    main = stored_config(out / "ensemble.zarr")
    for index, (entry, (kind, events)) in enumerate(zip(shifted["shifts"], (("D", 400), ("v_other", 2_500), ("v_plus", 10_000)))):
        config = stored_config(entry["store"])
        factor = math.exp(5.0 / math.sqrt(events))
        expected = {**main["system"], kind: main["system"][kind] * factor}
        assert config["system"] == pytest.approx(expected) and config["densities"] == main["densities"]
        assert [model["label"] for model in config["models"]] == ["original"] and config["replicas"] == 3
        assert config["seed"] == TINY.seed + 1 + index
    summary = write_report(out / "ensemble.zarr", tmp_path / "shifted-report", rate_shifts=shifted["shifts"], shift_errors=5.0)
    record = summary["training_uncertainty"]
    assert record["shift_errors"] == 5.0 and len(record["shifts"]) == 3
    errors = {(row["model"], row["density"]): row for row in summary["results"]}
    for row in summary["differences"]:
        at = record["densities"].index(row["density"])
        assert row["training_error"] == pytest.approx(record["errors"][row["observable"]][at])
        name, here, there = row["observable"], errors[(row["model"], row["density"])], errors[("original", row["density"])]
        if here[f"{name}_se"] is not None and there[f"{name}_se"] is not None:
            ensembles = math.hypot(here[f"{name}_se"], there[f"{name}_se"])
            assert row["standard_error"] == pytest.approx(math.hypot(ensembles, row["training_error"]))
    assert "training_error: the standard error that the learned class rates' own errors" in (tmp_path / "shifted-report" / "report.md").read_text()


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
