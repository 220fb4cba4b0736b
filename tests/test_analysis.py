"""Analysis of ensemble stores built from real simulations: figures, report, CLI, notebooks."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from analysis.chunk_tasks import OnWorkers, run_here, summarize_on_workers
from analysis.observables import ENSEMBLE_DIMS, open_ensemble, summarize
from analysis.phase_diagram import (
    PANELS,
    difference_table,
    plot_activity_maps,
    plot_learned_vs_original,
    plot_snapshots,
    save_figure,
)
from analysis.report import write_report
from analysis.sweep_plots import plateau, plot_sweep
from hpcdyn.cli import main
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import ConfigurationError, make_system

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis" / "notebooks"
DENSITIES = (0.1, 0.3, 0.5)
L, T_FINAL, SNAPSHOT_EVERY, BURN_IN, REPLICAS = 16, 20.0, 1.0, 5.0, 3


def build_store(path: Path, models: dict[str, float], v_plus: float, seed: int, chunks: dict[str, int]) -> Path:
    """An ensemble store by the contract of DESIGN 3.2, from compiled simulations of the original rules.

    ``models`` maps a model name to the v_plus it is simulated with (a stand-in for a learned model
    whose dynamics differ); extra variables and nested attrs mimic what an ensemble writer may add.
    """
    n_times = round(T_FINAL / SNAPSHOT_EVERY) + 1
    occupancy = np.zeros((len(models), len(DENSITIES), REPLICAS, n_times, L, L), np.int8)
    for i, model_v_plus in enumerate(models.values()):
        for j, density in enumerate(DENSITIES):
            system = make_system("active", {"L": L, "density": density, "v_plus": model_v_plus}, preset="paper")
            for replica in range(REPLICAS):
                run = simulate(system, T_FINAL, seed=seed + 1000 * i + 100 * j + replica, snapshot_every=SNAPSHOT_EVERY)
                occupancy[i, j, replica] = run.snapshot_grids[:n_times]
    dataset = xr.Dataset(
        {
            "occupancy": (ENSEMBLE_DIMS, occupancy),
            "rejected_mass": (ENSEMBLE_DIMS[:3], np.zeros(occupancy.shape[:3])),
            "n_particles": (ENSEMBLE_DIMS[:3], (occupancy[:, :, :, 0] > 0).sum(axis=(-2, -1))),
        },
        coords={
            "model": np.array(list(models), dtype=object),
            "density": list(DENSITIES),
            "replica": np.arange(REPLICAS),
            "time": np.arange(n_times) * SNAPSHOT_EVERY,
        },
        attrs={
            "L": L, "D": 0.1, "v_plus": v_plus, "v_other": 1.0, "burn_in": BURN_IN, "t_final": T_FINAL,
            "snapshot_every": SNAPSHOT_EVERY, "seeds": {"base": seed}, "models": {name: {"v_plus": vp} for name, vp in models.items()},
        },
    )
    # a coordinate along density in one chunk whatever the occupancy's chunks, as `hpcdyn ensemble` writes n_particles
    particles = ("density", [round(density * L * L) for density in DENSITIES])
    dataset.chunk(chunks).assign_coords(particles=particles).to_zarr(path, zarr_format=3, mode="w", consolidated=True)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """``main``: original (v_plus 25) and a slower model (v_plus 5); ``slow``: original at v_plus 5 (activity 50)."""
    root = tmp_path_factory.mktemp("ensembles")
    main_chunks = {"model": 1, "density": 1, "replica": 2, "time": 8}
    return {
        "main": build_store(root / "main.zarr", {"original": 25.0, "slower": 5.0}, 25.0, 1, main_chunks),
        "slow": build_store(root / "slow.zarr", {"original": 5.0}, 5.0, 7, {"replica": 1, "y": 8, "x": 4}),
    }


def test_store_opens_lazily_and_summary_shows_the_physics(stores):
    ensemble = open_ensemble(stores["main"])
    assert ensemble["occupancy"].chunks is not None  # dask-backed
    summary = summarize(ensemble).compute()
    original = summary.sel(model="original")
    # f4 rises with density (motility-induced clustering): each step by more than 3 standard errors.
    for low, high in itertools.pairwise(DENSITIES):
        gap = float(original["f4"].sel(density=high) - original["f4"].sel(density=low))
        error = float(np.hypot(original["f4_se"].sel(density=high), original["f4_se"].sel(density=low)))
        assert gap > 3 * error, (low, high, gap, error)
    assert (summary["n_replicas"] == REPLICAS).all()


def test_chunks_along_the_lattice_and_extra_variables_do_not_change_results(stores):
    chunked = open_ensemble(stores["slow"])
    assert len(chunked["occupancy"].chunks[-1]) > 1  # really chunked along x
    whole = xr.open_zarr(stores["slow"]).load().chunk({"replica": -1, "time": -1, "y": -1, "x": -1})
    xr.testing.assert_allclose(summarize(chunked).compute(), summarize(whole).compute())


def test_learned_vs_original_figure_and_difference_table(stores, tmp_path):
    summary = summarize(stores["main"]).compute()
    figure = plot_learned_vs_original(summary)
    assert len(figure.axes) == len(PANELS)
    assert [axis.get_ylabel() for axis in figure.axes] == list(PANELS.values())
    png, pdf = save_figure(figure, tmp_path / "figure")
    assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")

    # another training seed of a model (NAME-seedS): one curve for the model, the seeds' range as a band
    seeded = xr.concat([summary, summary.sel(model=["slower"]).assign_coords(model=["slower-seed1"]) * 1.01], dim="model")
    figure = plot_learned_vs_original(seeded)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels == ["original", "slower (band: 2 training seeds)"]
    band = figure.axes[0].collections[-1].get_paths()[0].vertices[:, 1]  # fill_between: lower and upper edges
    values = seeded["f4"].sel(model=["slower", "slower-seed1"])
    assert band.min() == pytest.approx(float(values.min())) and band.max() == pytest.approx(float(values.max()))

    table = difference_table(stores["main"])
    assert set(table["model"]) == {"slower"} and len(table) == len(DENSITIES) * 5
    np.testing.assert_allclose(table["difference"], table["value"] - table["reference_value"])
    np.testing.assert_allclose(table["z"], table["difference"] / table["standard_error"])
    # Five times less active particles cluster less at density 0.5: f4 lower by many standard errors.
    dense = table[(table["density"] == 0.5) & (table["observable"] == "f4")]
    assert float(dense["z"].iloc[0]) < -3


def test_activity_maps_and_snapshots(stores):
    figure = plot_activity_maps([stores["main"], stores["slow"]])
    assert len([axis for axis in figure.axes if axis.get_title()]) == len(PANELS)  # one row: original only
    mesh = figure.axes[0].collections[0]
    assert mesh.get_array().shape == (2, len(DENSITIES))  # (activity, density)
    with pytest.raises(ConfigurationError, match="learned models"):
        plot_activity_maps([stores["main"], stores["slow"]], learned=[stores["main"], stores["slow"]])
    snapshots = plot_snapshots(stores["main"], density=0.3, time=10.0)
    assert [axis.get_title() for axis in snapshots.axes] == ["original", "slower"]
    image = snapshots.axes[0].images[0].get_array()
    expected = xr.open_zarr(stores["main"])["occupancy"].sel(model="original", density=0.3, time=10.0).isel(replica=0)
    np.testing.assert_array_equal(image, expected.values)


def sweep_dataset(path: Path) -> Path:
    """Minimal sweep schema: U/T rising with N_theta to a plateau at 4, two seeds."""
    n_classes = np.arange(1, 7)
    level = np.array([-3.0, -2.0, -1.2, -1.0, -0.995, -0.99])
    scores = np.stack([level - 0.004, level + 0.004], axis=1)
    rates = np.full((6, 6), np.nan)
    for index, count in enumerate(n_classes):
        rates[index, :count] = np.geomspace(0.1, 25, count)
    results = xr.Dataset(
        {
            "validation_U_per_T": (("n_classes", "seed"), scores),
            "true_U_per_T": -0.98,
            "class_rate": (("n_classes", "class"), rates),
        },
        coords={"n_classes": n_classes, "seed": [0, 1]},
        attrs={"true_rates": [0.1, 1.0, 25.0]},
    )
    results.to_netcdf(path)
    return path


def test_sweep_plateau_and_figure(tmp_path):
    results = xr.open_dataset(sweep_dataset(tmp_path / "sweep.nc")).load()
    assert plateau(results) == 4
    assert len(plot_sweep(results).axes) == 2


def test_results_of_the_sweep_module_are_drawn_by_it(stores, tmp_path):
    sweep_results = pytest.importorskip("hpcdyn.distributed.sweep_results")
    levels = {1: -3.0, 2: -2.0, 3: -1.2, 4: -1.0, 5: -0.995}
    records = [
        sweep_results.TrialRecord(
            point={"model.n_classes": n, "seed": seed},
            metrics=[
                {
                    "epoch": 0,
                    "val_U_per_T": level + 0.004 * seed,
                    "true_val_U_per_T": -0.98,
                    "class_rates": list(np.geomspace(0.1, 25, n)),
                }
            ],
            status="done",
        )
        for n, level in levels.items()
        for seed in (0, 1)
    ]
    dataset = sweep_results.results_dataset(records, ["model.n_classes", "seed"], {"true_rates": {"D": 0.1, "v_plus": 25.0}})
    directory = tmp_path / "ntheta"
    directory.mkdir()
    sweep_results.save_results(dataset, directory)
    summary = write_report(stores["main"], tmp_path / "report", sweep=directory)
    assert summary["sweep_results"]["source"] == "hpcdyn.distributed.sweep_results"
    assert summary["sweep_results"]["plateau_n_classes"] == 4
    assert {"u_per_t_vs_ntheta.png", "class_rates.png"} <= set(summary["figures"])
    assert "N* = 4" in (tmp_path / "report" / "report.md").read_text()


def test_report_directory(stores, tmp_path):
    out = tmp_path / "report"
    summary = write_report(stores["main"], out, sweep=sweep_dataset(tmp_path / "sweep.nc"), activity_stores=[stores["slow"]])
    names = {path.name for path in out.iterdir()}
    for stem in ("learned_vs_original", "snapshots", "activity_maps", "sweep"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert {"summary.json", "report.md", "differences.csv"} <= names
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["burn_in"] == BURN_IN and written["sweep_results"]["plateau_n_classes"] == 4
    assert len(written["results"]) == 2 * len(DENSITIES)
    report = (out / "report.md").read_text()
    assert "| slower | 0.5 |" in report and "differs" in report
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".report")]  # no partial left

    with pytest.raises(FileExistsError):
        write_report(stores["main"], out)
    before = (out / "summary.json").read_text()
    with pytest.raises(ConfigurationError, match="burn_in"):
        write_report(stores["main"], out, burn_in=1e6, overwrite=True)
    assert (out / "summary.json").read_text() == before  # a failed rerun leaves the old report alone


def test_cli_analyze(stores, tmp_path, capsys):
    out = tmp_path / "cli-report"
    assert main(["analyze", str(stores["main"]), "--out", str(out), "--burn-in", "2", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["burn_in"] == 2.0 and printed["models"] == ["original", "slower"]
    assert (out / "report.md").exists()

    assert main(["analyze", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "x")]) == 2
    assert "store:" in capsys.readouterr().err
    assert main(["analyze", str(stores["main"]), "--out", str(tmp_path / "y"), "--sweep", str(stores["slow"])]) == 2
    assert "sweep:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any work
    with pytest.raises(SystemExit):
        main(["analyze", str(stores["main"]), "--out", str(tmp_path / "z"), "--burn-in", "-1"])


def test_per_chunk_tasks_give_the_local_results_to_the_last_digit(stores):
    """The per-chunk tables computed as separate tasks (here: in process), reduced by the same dask graph."""
    for store in stores.values():  # "slow" is chunked along y and x: the plan merges them like snapshot_dataset
        local = summarize(store).compute()
        for min_task_sites in (1, None):  # one chunk per task; the default grouping (several chunks a task)
            hook = OnWorkers(store, run_here, min_task_sites=min_task_sites)
            xr.testing.assert_identical(summarize(store, per_chunk=hook).compute(), local)
            assert hook.tasks >= (1 if min_task_sites is None else 2)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray of 2 CPUs for the module's Ray tests (started by the first that needs it)."""
    pytest.importorskip("ray")
    from hpcdyn.distributed.cluster import init_ray

    ray = init_ray(num_cpus=2, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_analyze_address_on_ray_equals_the_local_analysis(stores, ray_address, tmp_path, capsys, monkeypatch):
    """`hpcdyn analyze --address` against the plain local analysis: summary.json identical (but its
    creation time), the summary Datasets identical; chunks spread over several Ray tasks."""
    import analysis.chunk_tasks
    from hpcdyn.distributed.analysis_tasks import ray_tasks

    monkeypatch.setattr(analysis.chunk_tasks, "MIN_TASK_SITES", 10_000)  # several tasks on the small stores
    common = [str(stores["main"]), "--activity", str(stores["slow"]), "--no-progress"]
    assert main(["analyze", *common, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main(["analyze", *common, "--out", str(tmp_path / "ray"), "--address", ray_address]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ray"]["address"] == ray_address and printed["ray"]["tasks"] > 2
    local, on_ray = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("local", "ray"))
    assert local.pop("created") and on_ray.pop("created")
    assert on_ray == local
    assert (tmp_path / "ray" / "differences.csv").read_bytes() == (tmp_path / "local" / "differences.csv").read_bytes()
    assert {"activity_maps.png", "learned_vs_original.pdf"} <= {path.name for path in (tmp_path / "ray").iterdir()}

    with ray_tasks(ray_address) as run:
        for store in stores.values():
            xr.testing.assert_identical(summarize_on_workers(store, run), summarize(store).compute())
        # a task that fails on its worker raises its own error here: the store's occupancy is not the planned one
        with pytest.raises(ConfigurationError, match="not the occupancy the driver planned for"):
            summarize_on_workers(stores["main"], run, ensemble=open_ensemble(stores["slow"]))


def test_analyze_address_refusals_are_one_line(stores, tmp_path, capsys, monkeypatch):
    """Refused in one line (exit 2) before Ray is joined or started, and before anything is written."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr("hpcdyn.distributed.cluster.init_ray", refuse)
    out = tmp_path / "report"
    for arguments, message in [
        (["--address", "127.0.0.1:1"], "address: no Ray cluster answers at --address 127.0.0.1:1"),
        (["--address", "not an address"], "address: --address 'not an address' is not HOST:PORT"),
        (["--num-cpus", "2"], "num_cpus: --num-cpus sizes the Ray that --address local starts"),
        (["--address", "auto", "--num-cpus", "2"], "num_cpus:"),
        (["--address", "local", "--sweep", str(stores["slow"])], "sweep:"),  # inputs checked before Ray starts
    ]:
        assert main(["analyze", str(stores["main"]), "--out", str(out), "--no-progress", *arguments]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["observables", "phase_diagrams"])
def test_notebooks_run_end_to_end(name, stores, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("HPCDYN_ENSEMBLE", str(stores["main"]))
    monkeypatch.setenv("HPCDYN_ACTIVITY_STORES", str(stores["slow"]))
    monkeypatch.setenv("HPCDYN_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS.parents[1]), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(cell.get("outputs", []) == [] for cell in notebook.cells)  # committed without outputs
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output["output_type"] == "error"]
    assert not errors
    if name == "phase_diagrams":
        figures = {path.name for path in (tmp_path / "figures").iterdir()}
        assert {"learned_vs_original.png", "snapshots.pdf", "activity_maps.png"} <= figures
    else:
        shown = "".join(str(output.get("data", {}).get("text/plain", "")) for cell in notebook.cells for output in cell.get("outputs", []))
        assert "f4" in shown and "mean_cluster_size" in shown


@pytest.mark.slow
def test_store_written_by_the_ensemble_driver(stores, tmp_path):
    """The real writer (hpcdyn.distributed.ensemble, in this process, no Ray) plugs into the analysis unchanged."""
    from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble

    config = EnsembleConfig(
        models=("original",), densities=DENSITIES, replicas=REPLICAS, t_final=T_FINAL,
        snapshot_every=SNAPSHOT_EVERY, burn_in=BURN_IN, seed=3, L=L,
    )  # fmt: skip
    path = tmp_path / "driver.zarr"
    run_ensemble(config, path, Placement(in_process=True))
    written = summarize(path).compute().sel(model="original")
    assert written.attrs["burn_in"] == BURN_IN  # read from the nested configuration
    # Same physics as the fixture's original model (other seeds): f4 agrees within 4 standard errors.
    fixture = summarize(stores["main"]).compute().sel(model="original")
    z = (written["f4"] - fixture["f4"]) / np.hypot(written["f4_se"], fixture["f4_se"])
    assert (abs(z) < 4).all(), z.values
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "No learned model" in (out / "report.md").read_text()


def test_the_report_judges_many_cells_as_a_family():
    """Every |z| < 3 and the chi-square of all z's p >= 0.01 (28 cells: some |z| > 2 by chance are fine)."""
    from analysis.report import family_verdicts

    def rows(scores, model="learned", observable="f4"):
        return [{"model": model, "observable": observable, "z": z} for z in scores]

    chance = family_verdicts(rows([2.4, -2.1, 1.0, -0.5] + [0.8] * 24))[0]
    assert chance["agrees"] and chance["cells"] == 28
    one_far = family_verdicts(rows([3.2] + [0.5] * 27))[0]
    assert not one_far["agrees"] and one_far["max_abs_z"] == pytest.approx(3.2)
    shifted = family_verdicts(rows([2.5] * 28))[0]  # no cell beyond 3, but together far too many standard errors
    assert shifted["p"] < 0.01 and not shifted["agrees"]
    ignored = family_verdicts(rows([9.0], observable="other") + rows([float("nan"), 0.3]))[0]
    assert ignored["cells"] == 1 and ignored["agrees"]  # only the compared observables, finite z's


def _correlated_pair(generator: np.random.Generator, shift: float = 0.0, densities: int = 7,
                     replicas: int = 24) -> xr.Dataset:  # fmt: skip
    """A summary of two models drawn from one distribution (``shift``: learned's n_c moved, in its sd),
    replica averages with n_c and <s> correlated like N / n_c (rho -0.99) and f4 with both (+-0.4)."""
    from analysis.observables import OBSERVABLES, replica_statistics

    names = list(OBSERVABLES)
    correlation = np.eye(len(names))
    pairs = {("n_clusters", "mean_cluster_size"): -0.99, ("f4", "n_clusters"): 0.4, ("f4", "mean_cluster_size"): -0.4}
    for (a, b), rho in pairs.items():
        i, j = names.index(a), names.index(b)
        correlation[i, j] = correlation[j, i] = rho
    draws = generator.multivariate_normal(np.zeros(len(names)), correlation, size=(2, densities, replicas))
    draws[1, ..., names.index("n_clusters")] += shift
    coords = {"model": ["original", "learned"], "density": np.linspace(0.1, 0.6, densities)}
    per_replica = xr.Dataset({name: (("model", "density", "replica"), draws[..., k]) for k, name in enumerate(names)},
                             coords=coords)  # fmt: skip
    return replica_statistics(per_replica)


def test_the_family_chi_square_accounts_for_correlated_observables():
    """Same dynamics at 600 independent densities: per density, Hotelling's p-values are uniform (KS p
    >= 0.01, fixed seed) and reject at their 5 % level (allowed 18 to 42 of 600: +-4 sd), while the sum
    of the 4 z's squares rejects far more (n_c and <s> carry one fluctuation twice: 62 of 600 here). A family
    of 7 densities with n_c shifted by 1.2 sd per replica is found; the same family unshifted agrees."""
    from scipy.stats import chi2, kstest

    from analysis.phase_diagram import joint_differences
    from analysis.report import COMPARED, family_verdicts

    summary = _correlated_pair(np.random.default_rng(20261130), densities=600)
    joint = joint_differences(summary, COMPARED)
    assert (joint["dof"] == 4).all() and (joint["denominator_dof"] == 43).all()
    assert kstest(joint["p"], "uniform").pvalue >= 0.01
    assert 18 <= (joint["p"] < 0.05).sum() <= 42
    table = difference_table(summary)
    squares = table[table["observable"].isin(COMPARED)].groupby("density")["z"].apply(lambda z: float((z**2).sum()))
    assert (chi2.sf(squares, 4) < 0.05).sum() >= 45
    for shift, agrees in ((0.0, True), (1.2, False)):
        family = _correlated_pair(np.random.default_rng(7), shift=shift)
        verdict = family_verdicts(difference_table(family).to_dict(orient="records"),
                                  joint_differences(family, COMPARED).to_dict(orient="records"))[0]  # fmt: skip
        assert verdict["test"] == "hotelling" and verdict["dof"] == 28 and verdict["agrees"] == agrees, verdict


def test_joint_differences_leave_out_directions_without_variance():
    """An observable constant in every replica (no variance, no difference) is not a degree of freedom."""
    from analysis.phase_diagram import joint_differences
    from analysis.report import COMPARED

    summary = _correlated_pair(np.random.default_rng(3))
    summary["covariance"].loc[{"observable": "f4_variance"}] = 0.0
    summary["covariance"].loc[{"observable_other": "f4_variance"}] = 0.0
    summary["f4_variance"][:] = 0.5
    joint = joint_differences(summary, COMPARED)
    assert (joint["dof"] == 3).all() and np.isfinite(joint["chi2"]).all()
    with pytest.raises(ConfigurationError, match="covariance"):
        joint_differences(summary.drop_vars("covariance"), COMPARED)
