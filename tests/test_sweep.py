"""Sweeps on a real local Ray: studies, retries, a killed driver, results as a Dataset, N*."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hpcdyn.distributed.sweep import Resources, Study, check_study, prepare_trajectory, results_attrs, run_sweep, train_trial
from hpcdyn.distributed.sweep_results import (
    TrialRecord,
    find_plateau,
    load_sweep_results,
    records_from_result_grid,
    results_dataset,
    save_results,
    write_figures,
)
from hpcdyn.physics.systems import ConfigurationError, make_system
from sweeps import get_study

ROOT = Path(__file__).resolve().parents[1]

# A few seconds per trial: 12 x 12 torus, ~3 k events, a one-layer d_model 16 transformer.
TINY = {
    "data.system": "active", "data.preset": "paper", "data.L": 12, "data.density": 0.124, "data.t_final": 10.0,
    "data.seed": 1, "model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.d_ff": 32,
    "training.epochs": 3, "training.patience": 3, "training.lr": 1e-2, "training.segment_events": 64,
}  # fmt: skip
TINY_OPTIONS = [f"--set={key}={json.dumps(value)}" for key, value in TINY.items() if key.startswith(("model.", "training."))]
TINY_OPTIONS += ["--set=data.t_final=10"]


def run_cli(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hpcdyn.cli", *arguments], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=environment)  # fmt: skip


# --- studies: plain data, validated before any work -------------------------------------------


def test_study_joins_grids_and_fills_unswept_keys():
    study = Study("s", base=TINY, grids=({"model.mode": [2], "model.n_classes": [1, 2]}, {"model.mode": [1]}))
    points = check_study(study)
    assert [(p["model.mode"], p["model.n_classes"]) for p in points] == [(2, 1), (2, 2), (1, 4)]  # Mode 1: default N_theta
    fixed = study.with_overrides({"model.n_classes": 3}, {"training.seed": [0, 1]})
    assert fixed.swept_keys == ["model.mode", "training.seed"]
    assert len(fixed.points()) == 4 and {p["model.n_classes"] for p in fixed.points()} == {3}
    replaced = study.with_overrides(axes={"model.n_classes": [5]})
    assert [(p["model.mode"], p["model.n_classes"]) for p in replaced.points()] == [(2, 5), (1, 4)]


def test_shipped_studies_are_valid():
    sizes = {name: (len(check_study(get_study(name))), len(check_study(get_study(name, smoke=True))))
             for name in ("ntheta", "hparams", "activity")}  # fmt: skip
    assert sizes["ntheta"] == (27, 16)  # N_theta 1..8 x 3 seeds + Mode 1 x 3; smoke 1..7 x 2 + 2
    assert sizes["hparams"][0] == 72 and sizes["activity"][0] == 10


def test_unknown_study_or_key_is_refused_before_ray_starts(tmp_path):
    storage = tmp_path / "storage"
    result = run_cli("sweep", "nthetas", "--smoke", "--storage", str(storage))
    assert result.returncode == 2
    assert "no study named 'nthetas'; the studies are activity, hparams, ntheta" in result.stderr
    result = run_cli("sweep", "ntheta", "--smoke", "--storage", str(storage), "--grid", "model.nclasses=1,2")
    assert result.returncode == 2
    assert "model.nclasses: unknown sweep parameter in --grid; valid keys are" in result.stderr
    assert "model.n_classes" in result.stderr and "training.lr" in result.stderr and "data.v_plus" in result.stderr
    assert "Ray" not in result.stderr and not storage.exists()  # nothing started, nothing written


def test_invalid_value_and_other_sweep_under_same_name_are_refused(tmp_path):
    from hpcdyn.cli import main

    storage = tmp_path / "storage"
    with pytest.raises(ConfigurationError, match="n_classes: must be an integer in"):
        check_study(get_study("ntheta", smoke=True).with_overrides(axes={"model.n_classes": [0, 1]}))
    (storage / "taken").mkdir(parents=True)
    (storage / "taken" / "sweep.json").write_text(json.dumps({"study": "hparams", "points": []}))
    assert main(["sweep", "ntheta", "--smoke", "--storage", str(storage), "--name", "taken"]) == 2
    assert sorted(path.name for path in (storage / "taken").iterdir()) == ["sweep.json"]


def test_racing_trials_simulate_a_trajectory_once(tmp_path):
    from hpcdyn.storage.trajectory_store import open_trajectory

    system = make_system("active", {"L": 8, "density": 0.2}, preset="paper")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(prepare_trajectory(system, 5.0, 3, tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1
    stores = [path for path in tmp_path.iterdir() if path.suffix == ".zarr"]
    assert stores == paths[:1]  # one store, no private leftovers
    created = open_trajectory(paths[0]).attrs["created"]
    assert prepare_trajectory(system, 5.0, 3, tmp_path) == paths[0]
    assert open_trajectory(paths[0]).attrs["created"] == created  # reused, not simulated again


# --- results and the plateau: real computations on records -------------------------------------

VALIDATION_U_PER_T = {1: 43.1, 2: 407.8, 3: 501.5, 4: 542.9, 5: 547.2, 6: 546.4}  # benchmarks/TRAINING.md scan


def _records(means: dict[int, float], offsets=(-2.0, 0.0, 2.0), events_per_time=None) -> list[TrialRecord]:
    """Mode-2 records at the given mean U/T per N_theta, three seeds spread by ``offsets``, and Mode 1;
    with ``events_per_time`` they also hold U per held-out event."""
    records = []
    for n, mean in means.items():
        for seed, offset in enumerate(offsets):
            metrics = [{"epoch": 0, "val_U_per_T": mean + offset - 50, "class_rates": [1.0] * n},
                       {"epoch": 1, "val_U_per_T": mean + offset, "true_val_U_per_T": 572.9, "gap_per_event": 0.1,
                        "class_rates": sorted(np.geomspace(0.1, 25, n).tolist(), reverse=True)}]  # fmt: skip
            if events_per_time:
                metrics[1]["val_U_per_event"] = (mean + offset) / events_per_time
            records.append(TrialRecord({"model.mode": 2, "model.n_classes": n, "training.seed": seed}, metrics, "done"))
    records.append(TrialRecord({"model.mode": 1, "model.n_classes": 4, "training.seed": 0},
                               [{"epoch": 0, "val_U_per_T": 560.0, "true_val_U_per_T": 572.9}], "done"))  # fmt: skip
    return records


SWEPT = ["model.mode", "model.n_classes", "training.seed"]


def test_plateau_is_where_gains_stop():
    dataset = results_dataset(_records(VALIDATION_U_PER_T), SWEPT)
    plateau = find_plateau(dataset)
    assert plateau.n_star == 4  # gain 3 -> 4 is 41, 4 -> 6 is 3.5: 5 % of the 504 rise is 25
    assert plateau.gains[2] > 10 * abs(plateau.mean[5] - plateau.mean[3])
    np.testing.assert_allclose(plateau.mean, list(VALIDATION_U_PER_T.values()))
    still_rising = {n: 100.0 * n for n in range(1, 7)}
    assert find_plateau(results_dataset(_records(still_rising), SWEPT)).n_star == 6
    early = {1: 43.0, 2: 400.0, 3: 540.0, 4: 541.0, 5: 541.5}
    assert find_plateau(results_dataset(_records(early), SWEPT)).n_star == 3
    noisy = {1: 43.0, 2: 400.0, 3: 520.0, 4: 541.0, 5: 541.5}  # 3 -> 4 gains less than the seed spread
    assert find_plateau(results_dataset(_records(noisy, offsets=(-30.0, 0.0, 30.0)), SWEPT)).n_star == 3


def test_plateau_in_nats_per_event_finds_the_blocked_hops_class():
    # The expected-U scan (benchmarks/TRAINING.md; 333 held-out events per unit time): 3 -> 4 gains
    # 3.5 (0.010 nats per event, the blocked hops' own class), under 1 % of the rise from N_theta 1.
    recipe = {1: 43.7, 2: 547.9, 3: 569.4, 4: 572.85, 5: 572.2, 6: 569.9}
    plateau = find_plateau(results_dataset(_records(recipe, events_per_time=333.0), SWEPT))
    assert plateau.n_star == 4 and plateau.threshold == pytest.approx(572.85 - 1.633, abs=0.01)  # the seed spread
    quiet = find_plateau(results_dataset(_records(recipe, offsets=(0.0,), events_per_time=333.0), SWEPT))
    assert quiet.n_star == 4 and quiet.threshold == pytest.approx(572.85 - 0.002 * 333.0)
    assert find_plateau(results_dataset(_records(recipe), SWEPT)).n_star == 2  # 5 % of the rise (26) hides two classes


def test_results_dataset_roundtrip_without_ray(tmp_path):
    dataset = results_dataset(_records(VALIDATION_U_PER_T), SWEPT, {"study": "ntheta", "true_rates": {"D": 0.1}})
    assert dict(dataset.sizes) == {"mode": 2, "n_classes": 6, "seed": 3, "class": 6, "epoch": 2}
    assert float(dataset.val_U_per_T.sel(mode=2, n_classes=4, seed=1)) == pytest.approx(542.9)  # best epoch
    assert np.isnan(float(dataset.val_U_per_T.sel(mode=1, n_classes=2, seed=0)))  # no such trial
    rates = dataset.class_rate.sel(mode=2, n_classes=3, seed=0).values
    np.testing.assert_allclose(rates, [*np.geomspace(0.1, 25, 3), np.nan, np.nan, np.nan])  # sorted, padded
    save_results(dataset, tmp_path)
    save_results(dataset, tmp_path)  # replaced atomically
    script = ("import sys; sys.modules['ray'] = None\n"  # any import of ray would fail
              "from hpcdyn.distributed.sweep_results import load_sweep_results\n"
              f"d = load_sweep_results({str(tmp_path)!r}); print(float(d.val_U_per_T.sel(mode=2, n_classes=4).mean()))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(542.9)
    figures, plateau = write_figures(load_sweep_results(tmp_path), tmp_path)
    assert plateau.n_star == 4 and [path.name for path in figures] == ["u_per_t_vs_ntheta.png", "class_rates.png"]
    assert all(path.stat().st_size > 10_000 for path in figures)


# --- real local Ray ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    from hpcdyn.distributed.cluster import init_ray

    ray = init_ray(num_cpus=2, log_to_driver=False)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    yield ray
    ray.shutdown()


def flaky_trial(config):
    """Trial 0 trains one epoch, reports its checkpoint, then raises once; the others run normally."""
    marker = Path(config["storage"]) / f"failed-{config['trial']['index']}"
    if config["trial"]["index"] == 0 and not marker.exists():
        first = copy.deepcopy(config)
        first["trial"]["point"]["training.epochs"] = 1
        train_trial(first)
        marker.write_text("failed once")
        raise RuntimeError("injected fault after the first checkpoint")
    train_trial(config)


def _checkpoint_metrics(trial_dir: Path) -> list[dict]:
    latest = sorted(trial_dir.glob("checkpoint_*"))[-1]
    return [json.loads(line) for line in (latest / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_failed_trial_is_retried_from_its_checkpoint(local_ray, tmp_path):
    study = Study("retry", base=TINY, grids=({"model.mode": [2], "model.n_classes": [1]}, {"model.mode": [1]}))
    outcome = run_sweep(study, tmp_path, resources=Resources(max_concurrent=2), max_failures=1, trial=flaky_trial)
    assert not outcome.errors and (tmp_path / "failed-0").exists()
    records = records_from_result_grid(outcome.result_grid)
    dataset = results_dataset(records, study.swept_keys, results_attrs(study, outcome.points))
    first = dataset.sel(mode=2, n_classes=1)
    assert bool(first.restored) and not bool(dataset.restored.sel(mode=1, n_classes=4))
    for record in records:  # every epoch once: the retry continued, it did not start over
        assert [row["epoch"] for row in record.metrics] == [0, 1, 2]
        assert record.status == "done" and Path(record.checkpoint).exists()
    assert int(dataset.epochs_done.count()) == 2 and np.isfinite(dataset.val_U_per_T).sum() == 2
    assert np.allclose(dataset.true_val_U_per_T.values[np.isfinite(dataset.true_val_U_per_T.values)], first.true_val_U_per_T)
    assert len(list((tmp_path / "trajectories").glob("*.zarr"))) == 1  # one shared trajectory
    assert json.loads(dataset.attrs["true_rates"]) == {"D": 0.1, "v_other": 1.0, "v_plus": 25.0}


@pytest.mark.slow
def test_asha_stops_a_poor_trial_after_its_first_epoch(local_ray, tmp_path):
    # One trial at a time, the good one (Mode 1) first: when N_theta = 1 (U/T ~ 10 % of Mode 1's)
    # reaches ASHA's first rung, it is below the rung's top quarter and is stopped there.
    study = Study("asha", base=TINY, grids=({"model.mode": [1]}, {"model.mode": [2], "model.n_classes": [1]}))
    outcome = run_sweep(study, tmp_path, resources=Resources(max_concurrent=1), asha=True)
    assert not outcome.errors
    epochs = {record.name.split("_", 2)[-1]: len(record.metrics) for record in records_from_result_grid(outcome.result_grid)}
    assert epochs == {"mode=1,n_classes=4": 3, "mode=2,n_classes=1": 1}, epochs


def test_gpu_request_without_gpus_is_refused(local_ray, tmp_path):
    study = Study("gpu", base=TINY)
    with pytest.raises(ConfigurationError, match="gpus_per_trial: each trial asks for 0.5 GPU, the Ray cluster has 0"):
        run_sweep(study, tmp_path, resources=Resources(gpus_per_trial=0.5))


def _trial_state(experiment: Path, epochs: int) -> dict[str, int]:
    """Epochs in each trial's latest checkpoint (0 for a trial without one)."""
    state = {}
    for trial_dir in experiment.glob("trial_*"):
        try:
            state[trial_dir.name] = len(_checkpoint_metrics(trial_dir))
        except (IndexError, FileNotFoundError, json.JSONDecodeError):
            state[trial_dir.name] = 0
    return state


def _recorded_state(experiment: Path) -> dict[str, int]:
    """Epochs of each trial as the driver recorded them in its latest experiment snapshot.

    A trial's checkpoint reaches the disk before the driver records it, so a driver killed in
    between resumes that trial from the checkpoint before (one epoch is redone, none is lost or
    counted twice); the test therefore reads what the driver knew, not the checkpoint files.
    """
    snapshots = sorted(experiment.glob("experiment_state-*.json"))
    if not snapshots:
        return {}
    try:
        trials = json.loads(snapshots[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):
        return {}  # being rewritten
    state = {}
    for trial, run in trials:
        name = json.loads(trial)["custom_dirname"]
        state[name] = int((json.loads(run).get("last_result") or {}).get("training_iteration", 0))
    return state


def _one_trial_at_a_time(storage, name: str, epochs: int) -> list[str]:
    """A sweep of 3 short trials run one after another, so a driver can be stopped part-way."""
    return ["sweep", "ntheta", "--smoke", "--storage", str(storage), "--name", name, *TINY_OPTIONS,
            f"--set=training.epochs={epochs}", f"--set=training.patience={epochs}", "--set=data.t_final=15",
            "--grid=model.n_classes=1,2", "--grid=training.seed=0", "--max-concurrent=1", "--num-cpus=1"]  # fmt: skip


def _start_driver(command: list[str], output) -> subprocess.Popen:
    """The sweep command in a session of its own (so the test can kill it and its local Ray)."""
    return subprocess.Popen([sys.executable, "-m", "hpcdyn.cli", *command], cwd=ROOT, start_new_session=True,
                            stdout=output, stderr=output, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    storage, epochs = tmp_path / "storage", 3
    command = _one_trial_at_a_time(storage, "killed", epochs)
    experiment = storage / "killed"
    driver = _start_driver(command, subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for one finished trial and one part-way through
            state = _recorded_state(experiment)
            if epochs in state.values() and any(0 < done < epochs for done in state.values()):
                break
            assert driver.poll() is None, "the sweep finished before it could be interrupted"
            time.sleep(0.05)
        else:
            pytest.fail(f"no interruptible state within 120 s: {state}")
        os.kill(driver.pid, signal.SIGKILL)  # the driver only; its local Ray goes down with it
        driver.wait(timeout=30)
    finally:
        time.sleep(1)
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # anything of that session still alive
        except ProcessLookupError:
            pass
    finished = [name for name, done in state.items() if done == epochs]
    partial = [name for name, done in state.items() if 0 < done < epochs]
    last_files = {name: (experiment / name).glob("checkpoint_*/last.pt") for name in finished}
    before = {name: sorted((path, path.stat().st_mtime_ns) for path in paths) for name, paths in last_files.items()}
    assert not (experiment / "results.zarr").exists()

    result = run_cli(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["resumed"] and summary["finished"] == summary["trials"] == 3 and "n_star" in summary
    for name in finished:  # not trained again: their checkpoints are the very same files
        after = sorted((path, path.stat().st_mtime_ns) for path in (experiment / name).glob("checkpoint_*/last.pt"))
        assert after == before[name]
    dataset = load_sweep_results(experiment)
    assert (dataset.status == "done").sum() == 3 and np.isfinite(dataset.val_U_per_T).sum() == 3
    assert (dataset.epochs_done.fillna(0) == np.where(np.isfinite(dataset.val_U_per_T), epochs, 0)).all()
    for name in partial:  # continued from its checkpoint: every epoch exactly once
        assert [row["epoch"] for row in _checkpoint_metrics(experiment / name)] == list(range(epochs))
        assert bool(dataset.restored.where(dataset.trial == name, drop=True).squeeze())


@pytest.mark.slow
def test_interrupted_sweep_says_so_and_exits_non_zero(tmp_path):
    # Tune saves its state and returns normally on SIGINT; the command must not look finished.
    storage, epochs = tmp_path / "storage", 3
    driver = _start_driver(_one_trial_at_a_time(storage, "stopped", epochs), subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(_trial_state(storage / "stopped", epochs).values()):
            assert driver.poll() is None, "the sweep finished before it could be interrupted"
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert driver.returncode == 2, stderr[-3000:]
    assert "interrupted with" in stderr and "rerun the same command to resume" in stderr
    assert json.loads(stdout)["unfinished"] >= 1


def test_figures_of_other_studies(tmp_path):
    activity = [TrialRecord({"data.v_plus": v, "training.seed": seed},
                            [{"epoch": 0, "val_U_per_T": 10 * v + seed, "true_val_U_per_T": 11 * v}], "done")
                for v in (5.0, 25.0) for seed in (0, 1)]  # fmt: skip
    dataset = results_dataset(activity, ["data.v_plus", "training.seed"])
    assert float(dataset.val_U_per_T.sel(v_plus=25.0).mean()) == pytest.approx(250.5)
    figures, plateau = write_figures(dataset, tmp_path)
    assert plateau is None and [path.name for path in figures] == ["u_per_t.png"]
    grid = [TrialRecord({"training.lr": lr, "model.d_model": width}, [{"epoch": 0, "val_U_per_T": lr * width}], "done")
            for lr in (1e-3, 1e-2) for width in (16, 32)]  # fmt: skip
    (tmp_path / "grid").mkdir()
    figures, _ = write_figures(results_dataset(grid, ["training.lr", "model.d_model"]), tmp_path / "grid")
    assert [path.name for path in figures] == ["u_per_t.png"] and figures[0].stat().st_size > 10_000
    # a sweep over training seeds only (the pipeline's seeds stage): one score per seed, one or several seeds
    for seeds in ((1,), (1, 2)):
        trials = [TrialRecord({"training.seed": seed}, [{"epoch": 0, "val_U_per_T": 5.0 + seed, "true_val_U_per_T": 6.0}],
                              "done") for seed in seeds]  # fmt: skip
        (tmp_path / f"seeds{len(seeds)}").mkdir()
        figures, plateau = write_figures(results_dataset(trials, ["training.seed"]), tmp_path / f"seeds{len(seeds)}")
        assert plateau is None and [path.name for path in figures] == ["u_per_t.png"]
