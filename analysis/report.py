"""A report directory from an ensemble store: figures, summary JSON and a short Markdown report.

    summary = write_report("ensemble.zarr", "report/", sweep="sweep.nc", activity_stores=[...])

Layout of the directory (written under a hidden temporary name, renamed into place when complete):
``summary.json``, ``report.md``, ``differences.csv``, ``learned_vs_original.{png,pdf}``,
``snapshots.{png,pdf}`` (from ``snapshots``, a store on a large lattice, when given: a row per density,
learned beside original), and when their inputs are given ``activity_maps.{png,pdf}`` and ``sweep.{png,pdf}``;
with ``seeds`` (a store of the learned model's other training seeds, without the original dynamics)
their rows join the main store's: a band around the learned curves and a verdict per seed;
with ``large`` (an ensemble store beyond the paper's size) ``large_learned_vs_original.{png,pdf}`` and
``large_snapshots.{png,pdf}``, its table and family verdict in report.md.
``headline``: lines the caller states first (what a study found: N*, r*).
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from analysis.chunk_tasks import OnWorkers, Submit, summarize_on_workers
from analysis.observables import (
    OBSERVABLES,
    REFERENCE_MODEL,
    compute,
    open_ensemble,
    resolve_burn_in,
    setting,
    summarize,
)
from analysis.phase_diagram import (
    difference_table,
    joint_differences,
    learned_models,
    plot_activity_maps,
    plot_learned_vs_original,
    plot_snapshot_grid,
    plot_snapshots,
    save_figure,
)
from analysis.rate_uncertainty import training_covariance
from hpcdyn.physics.systems import ConfigurationError

# Many cells (observables x densities) are judged as a family: a perfect model shows some |z| > 2 by
# chance, so the learned dynamics agrees when every |z| < AGREEMENT_Z and the chi-square of the family
# has p >= FAMILY_P; a cell's own verdict uses the same |z| bound. The observables of one density are
# correlated (n_c and <s> = N / n_c nearly perfectly), so with the covariance across replicas the
# chi-square adds per density Hotelling's T^2 of the observables together (``joint_differences``);
# the sum of the z's squares, which counts one fluctuation of n_c twice, only without it.
AGREEMENT_Z = 3.0
FAMILY_P = 0.01
COMPARED = ("f4", "f4_variance", "n_clusters", "mean_cluster_size")
COMPARED_WORDS = {"f4": "f4", "f4_variance": "var f4", "n_clusters": "n_c", "mean_cluster_size": "<s>"}


def family_verdicts(differences: list[dict[str, Any]], joint: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per model: max |z|, the family's chi-square, its degrees of freedom and p, and the verdict.

    ``differences``: rows of ``difference_table``; ``joint``: rows of ``joint_differences`` (the
    chi-square then sums their per-density chi2 on their dof; without it, the squares of the z's,
    one dof each, which is right only for independent cells).
    """
    from scipy.stats import chi2

    verdicts = []
    for model in dict.fromkeys(row["model"] for row in differences):
        scores = np.array([row["z"] for row in differences if row["model"] == model and row["observable"] in COMPARED
                           and row["z"] is not None], float)  # fmt: skip
        scores = scores[np.isfinite(scores)]
        if scores.size == 0:
            verdicts.append({"model": model, "cells": 0, "agrees": None})
            continue
        densities = [row for row in joint or [] if row["model"] == model]
        if joint is not None and densities:
            statistic, dof, test = sum(row["chi2"] for row in densities), sum(row["dof"] for row in densities), "hotelling"
        else:
            statistic, dof, test = float((scores**2).sum()), int(scores.size), "independent"
        p_value = float(chi2.sf(statistic, dof))
        agrees = bool(np.abs(scores).max() < AGREEMENT_Z and p_value >= FAMILY_P)
        verdict = {"model": model, "cells": int(scores.size), "max_abs_z": float(np.abs(scores).max()),
                   "chi2": float(statistic), "dof": int(dof), "test": test, "p": p_value, "agrees": agrees}  # fmt: skip
        if any(row.get("training_error") for row in differences if row["model"] == model):
            alone = [row["z_ensembles"] for row in differences if row["model"] == model and row["observable"] in COMPARED]
            verdict["max_abs_z_ensembles"] = float(np.nanmax(np.abs(np.array(alone, float))))
        verdicts.append(verdict)
    return verdicts


def _family_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    lines = []
    for verdict in verdicts:
        if verdict["agrees"] is None:
            lines.append(f"**{verdict['model']}**: no error estimate to judge it by.")
            continue
        word = "AGREES with" if verdict["agrees"] else "DIFFERS from"
        lines.append(
            f"**{verdict['model']} {word} the original dynamics** over {verdict['cells']} cells (f4, var f4, n_c, <s> "
            f"x densities): max |z| = {verdict['max_abs_z']:.2f} (rule: every |z| < {AGREEMENT_Z:g}), "
            f"{chi_square_words(verdict)}, p = {verdict['p']:.3g} (rule: p >= {FAMILY_P:g})"
            + (f"; the z's count the learned rates' own errors beside the ensembles' (max |z| from the ensembles "
               f"alone {verdict['max_abs_z_ensembles']:.2f})." if "max_abs_z_ensembles" in verdict else ".")
        )
    return lines


def chi_square_words(verdict: dict[str, Any]) -> str:
    """How a verdict's chi-square was formed, in words."""
    if verdict.get("test") == "hotelling":
        return (f"chi-square {verdict['chi2']:.1f} on {verdict['dof']} dof (per density, Hotelling's T^2 of the "
                "observables together, with their correlation across replicas)")  # fmt: skip
    return f"chi-square {verdict['chi2']:.1f} on {verdict.get('dof', verdict['cells'])} (z's taken as independent)"


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")


def write_report(
    store: str | Path,
    out: str | Path,
    sweep: str | Path | None = None,
    activity_stores: Sequence[str | Path] = (),
    burn_in: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    run_tasks: Submit | None = None,
    snapshots: str | Path | None = None,
    headline: Sequence[str] = (),
    large: str | Path | None = None,
    seeds: str | Path | None = None,
    rate_shifts: Sequence[dict[str, Any]] = (),
    shift_errors: float | None = None,
) -> dict[str, Any]:
    """Analyse ``store`` (and optionally sweep results and stores at other activities) into ``out``.

    Every input is opened and checked before any work; the directory appears only once complete.
    ``run_tasks`` (e.g. ``hpcdyn.distributed.analysis_tasks.RayTasks``) submits the per-chunk
    observables of every store as tasks elsewhere (``analysis.chunk_tasks``), the reductions stay
    here; None: everything with dask threads here.
    ``rate_shifts``: the original dynamics at shifted class rates (``analysis.rate_uncertainty``, each
    with its ``store``), by ``shift_errors`` standard errors: the learned rates' own errors are then
    added to every comparison of the main and seeds stores (their models learned from one trajectory).
    Returns the summary that is also written to summary.json.
    """
    out = Path(out)
    check_output(out, overwrite)
    ensemble = open_ensemble(store)
    burn_in = resolve_burn_in(ensemble, burn_in)
    activity_ensembles = [open_ensemble(path) for path in activity_stores]
    snapshot_ensemble = None if snapshots is None else open_ensemble(snapshots)
    large_ensemble = None if large is None else open_ensemble(large)
    seeds_ensemble = None if seeds is None else open_ensemble(seeds)
    shifted = [(entry, open_ensemble(entry["store"])) for entry in rate_shifts]
    if shifted and shift_errors is None:
        raise ConfigurationError("shift_errors: give the shift of the rate_shifts' stores, in standard errors")
    if sweep is not None:
        from analysis.sweep_plots import open_sweep

        open_sweep(sweep)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        summary = _write_contents(
            store, ensemble, partial, burn_in, sweep, activity_stores, activity_ensembles, progress, run_tasks,
            snapshots=(snapshots, snapshot_ensemble), headline=list(headline), large=(large, large_ensemble),
            seeds=(seeds, seeds_ensemble), shifted=(shifted, shift_errors),
        )
        _move_into_place(partial, out, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _summary(path, ensemble, burn_in, progress, run_tasks) -> xr.Dataset:
    """The computed summary of one store: here with dask threads, or per chunk through ``run_tasks``."""
    if run_tasks is None:
        return compute(summarize(ensemble, burn_in), progress=progress)
    return summarize_on_workers(path, run_tasks, burn_in, ensemble=ensemble, progress=progress)


class _Summaries:
    """The stores' summaries. With ``run_tasks`` every store's per-chunk tasks are submitted first, all
    of them (``start``): the workers go on to the next store's chunks while a store's reductions and
    figures are made here, instead of waiting for each store in turn."""

    def __init__(self, run_tasks, progress: bool):
        self.run_tasks, self.progress, self.started = run_tasks, progress, {}

    def start(self, path, ensemble: xr.Dataset | None, burn_in: float) -> None:
        if self.run_tasks is not None and ensemble is not None:
            self.started[(str(path), burn_in)] = summarize(ensemble, burn_in, per_chunk=OnWorkers(path, self.run_tasks))

    def get(self, path, ensemble: xr.Dataset, burn_in: float) -> xr.Dataset:
        lazy = self.started.pop((str(path), burn_in), None)
        if lazy is None:
            return _summary(path, ensemble, burn_in, self.progress, self.run_tasks)
        return compute(lazy, progress=self.progress)


def _write_contents(
    store, ensemble, directory, burn_in, sweep, activity_stores, activity_ensembles, progress, run_tasks=None,
    snapshots=(None, None), headline=(), large=(None, None), seeds=(None, None), shifted=((), None),
):
    seeds_store, seeds_ensemble = seeds
    large_store, large_ensemble = large
    summaries = _Summaries(run_tasks, progress)  # in the order they are used below
    for path, data in [(store, ensemble), *[(entry["store"], data) for entry, data in shifted[0]], seeds,
                       *zip(activity_stores, activity_ensembles)]:  # fmt: skip
        summaries.start(path, data, burn_in)
    if large_ensemble is not None:
        summaries.start(large_store, large_ensemble, resolve_burn_in(large_ensemble, None))
    statistics = summaries.get(store, ensemble, burn_in)
    main_statistics = statistics
    training, training_record = _training_uncertainty(statistics, shifted, burn_in, summaries)
    if seeds_ensemble is not None:  # the other training seeds beside the models of the main store
        seeds_statistics = summaries.get(seeds_store, seeds_ensemble, burn_in)
        statistics = xr.concat([statistics, seeds_statistics], dim="model")
    figures = save_figure(plot_learned_vs_original(statistics), directory / "learned_vs_original")
    snapshot_store, snapshot_ensemble = snapshots
    if snapshot_ensemble is not None:  # learned beside original on the large lattice, a row per density
        figures += save_figure(plot_snapshot_grid(snapshot_ensemble), directory / "snapshots")
    else:
        figures += save_figure(plot_snapshots(ensemble), directory / "snapshots")
    models = statistics["model"].values.tolist()
    differences, joint = None, None
    if REFERENCE_MODEL in models and len(models) > 1:
        differences, joint = difference_table(statistics, training=training), _joint(statistics, training)
        differences.to_csv(directory / "differences.csv", index=False)
    activity_family = []
    if activity_ensembles:  # each store summarised once, the main one already is
        stores = [main_statistics] + [
            summaries.get(path, data, burn_in) for path, data in zip(activity_stores, activity_ensembles)
        ]
        learned = stores if all(len(learned_models(data)) == 1 for data in stores) else None
        figure = plot_activity_maps(stores, learned=learned, burn_in=burn_in)
        figures += save_figure(figure, directory / "activity_maps")
        for path, data, summary_of_store in zip(activity_stores, activity_ensembles, stores[1:]):
            if REFERENCE_MODEL in summary_of_store["model"].values.tolist() and len(learned_models(summary_of_store)):
                rows = difference_table(summary_of_store).to_dict(orient="records")
                activity = _store_activity(data)
                verdicts = family_verdicts(rows, _joint(summary_of_store))
                activity_family += [{**verdict, "store": str(path), "activity": activity} for verdict in verdicts]
    large_statistics, large_differences, large_joint = None, None, None
    if large_ensemble is not None:  # beyond the paper's size: judged like the main ensemble, at its own burn-in
        large_statistics = summaries.get(large_store, large_ensemble, resolve_burn_in(large_ensemble, None))
        figures += save_figure(plot_learned_vs_original(large_statistics), directory / "large_learned_vs_original")
        figures += save_figure(plot_snapshot_grid(large_ensemble), directory / "large_snapshots")
        if REFERENCE_MODEL in large_statistics["model"].values.tolist() and len(learned_models(large_statistics)):
            large_differences = difference_table(large_statistics).to_dict(orient="records")
            large_joint = _joint(large_statistics)
    sweep_summary = None
    if sweep is not None:
        from analysis.sweep_plots import sweep_figures

        sweep_summary = sweep_figures(sweep, directory / "sweep")
        figures += [Path(path) for path in sweep_summary.pop("figures")]
    summary = {
        "store": str(store),
        "activity_stores": [str(path) for path in activity_stores],
        "seeds": None if seeds_store is None else str(seeds_store),
        "sweep": None if sweep is None else str(sweep),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "burn_in": burn_in,
        "configuration": _jsonable(dict(ensemble.attrs)),
        "observables": OBSERVABLES,
        "results": _results(statistics),
        "differences": [] if differences is None else _jsonable(differences.to_dict(orient="records")),
        "family": [] if differences is None else _jsonable(family_verdicts(differences.to_dict(orient="records"), joint)),
        "joint_differences": _jsonable(joint or []),
        "training_uncertainty": training_record,
        "activity_family": _jsonable(activity_family),
        "headline": list(headline),
        "snapshots": None if snapshot_store is None else str(snapshot_store),
        "large": None if large_store is None else _large_summary(large_store, large_ensemble, large_statistics,
                                                                 large_differences),  # fmt: skip
        "large_family": [] if large_differences is None else _jsonable(family_verdicts(large_differences, large_joint)),
        "sweep_results": sweep_summary,
        "figures": sorted(path.name for path in figures),
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (directory / "report.md").write_text(markdown_report(summary))
    return summary


def _joint(statistics: xr.Dataset, training: xr.DataArray | None = None) -> list[dict[str, Any]]:
    """Rows of ``joint_differences`` over the COMPARED observables."""
    return joint_differences(statistics, COMPARED, training=training).to_dict(orient="records")


def _training_uncertainty(statistics, shifted, burn_in, summaries: _Summaries) -> tuple[xr.DataArray | None, dict | None]:
    """The covariance the learned rates' errors add (None without shifted stores), and its record."""
    entries, shift_errors = shifted
    if not entries:
        return None, None
    shifted_statistics = [summaries.get(entry["store"], data, burn_in) for entry, data in entries]
    training = training_covariance(statistics, shifted_statistics, OBSERVABLES, shift_errors)
    errors = {name: [float(value) for value in np.sqrt(training.sel(observable=name, observable_other=name).values)]
              for name in OBSERVABLES}  # fmt: skip
    return training, {"shift_errors": shift_errors, "shifts": _jsonable([dict(entry) for entry, _ in entries]),
                      "densities": [float(value) for value in training["density"].values], "errors": errors}  # fmt: skip


def _large_summary(store, ensemble: xr.Dataset, statistics: xr.Dataset, differences) -> dict[str, Any]:
    return {"store": str(store), "L": int(ensemble.sizes["x"]), "burn_in": resolve_burn_in(ensemble, None),
            "results": _results(statistics), "differences": _jsonable(differences or [])}  # fmt: skip


def _store_activity(ensemble: xr.Dataset) -> float | None:
    """v_plus / D of a store (None when its attrs lack them)."""
    v_plus, rotation = setting(ensemble.attrs, "v_plus"), setting(ensemble.attrs, "D")
    return None if v_plus is None or not rotation else float(v_plus) / float(rotation)


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    check_output(out, overwrite)
    if out.exists():
        retired = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(retired)
        partial.rename(out)
        shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
    else:
        partial.rename(out)


def _results(statistics: xr.Dataset) -> list[dict[str, Any]]:
    rows = []
    for model in statistics["model"].values:
        for density in statistics["density"].values:
            point = statistics.sel(model=model, density=density)
            row = {"model": str(model), "density": float(density), "n_replicas": int(point["n_replicas"])}
            for name in OBSERVABLES:
                row[name] = float(point[name])
                row[f"{name}_se"] = float(point[f"{name}_se"])
            rows.append(row)
    return _jsonable(rows)


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def markdown_report(summary: dict[str, Any]) -> str:
    """The short Markdown report: observables per model and density, agreement in standard errors."""
    lines = [
        "# Learned vs original dynamics",
        "",
        f"Store `{summary['store']}`, burn-in {summary['burn_in']:g}; created {summary['created']}.",
        "Values are replica means ± one standard error across replicas.",
        "",
        *_family_lines(summary.get("family", [])),
        "",
        *[line for text in summary.get("headline", []) for line in (text, "")],
        *_activity_lines(summary.get("activity_family", [])),
        *_table_lines(summary["results"]),
    ]
    lines += ["", *_agreement_lines(summary["differences"], summary.get("training_uncertainty"))]
    lines += _large_lines(summary.get("large"), summary.get("large_family", []))
    if summary["sweep_results"]:
        n_star = summary["sweep_results"]["plateau_n_classes"]
        found = "no N_theta scan" if n_star is None else f"U/T reaches its plateau at N* = {n_star} classes"
        lines += ["", f"Sweep `{summary['sweep']}`: {found}."]
    lines += ["", "Figures: " + ", ".join(f"[{name}]({name})" for name in summary["figures"] if name.endswith(".png"))]
    return "\n".join(lines) + "\n"


def _large_lines(large: dict[str, Any] | None, verdicts: list[dict[str, Any]]) -> list[str]:
    """The ensemble beyond the paper's size: its family verdict and table."""
    if not large:
        return []
    side = large["L"]
    lines = ["", f"## Beyond the paper: {side} x {side}", "",
             f"Store `{large['store']}`, burn-in {large['burn_in']:g} (`large_learned_vs_original.png`, "
             "`large_snapshots.png`).", "", *_family_lines(verdicts), ""]  # fmt: skip
    return lines + _table_lines(large["results"])


def _table_lines(results: list[dict[str, Any]]) -> list[str]:
    """The observables per model and density, each ± its standard error."""
    lines = ["| model | density | replicas | f4 | var f4 | n_c | <s> |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        cells = [_with_error(row, name) for name in COMPARED]
        lines.append(f"| {row['model']} | {row['density']:g} | {row['n_replicas']} | " + " | ".join(cells) + " |")
    return lines


def _activity_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """One line per activity store: its learned model against its original dynamics, by the family rule."""
    if not verdicts:
        return []
    lines = ["The (density, v_plus/D) map, learned beside original (`activity_maps.png`), by the same rule per activity:", ""]
    for verdict in sorted(verdicts, key=lambda row: (row.get("activity") is None, row.get("activity") or 0.0)):
        activity = "?" if verdict.get("activity") is None else f"{verdict['activity']:g}"
        if verdict.get("agrees") is None:
            lines.append(f"- v_plus/D = {activity} ({verdict['model']}): no error estimate to judge it by.")
            continue
        word = "agrees" if verdict["agrees"] else "differs"
        lines.append(f"- v_plus/D = {activity} ({verdict['model']}): {word}; max |z| = {verdict['max_abs_z']:.2f}, "
                     f"{chi_square_words(verdict)}, p = {verdict['p']:.3g}.")  # fmt: skip
    return lines + [""]


def _with_error(row: dict[str, Any], name: str) -> str:
    value, error = row[name], row[f"{name}_se"]
    if value is None:
        return "n/a"
    return f"{value:.4g} ± {error:.2g}" if error is not None else f"{value:.4g}"


def _agreement_lines(differences: list[dict[str, Any]], training: dict[str, Any] | None = None) -> list[str]:
    if not differences:
        return ["No learned model in the store: nothing to compare with the original dynamics."]
    added = " + training_error²" if training else ""
    lines = [
        "## Difference from the original, in standard errors",
        "",
        f"z = (model − original) / √(se_model² + se_original²{added}); a cell agrees when |z| < {AGREEMENT_Z:g} (the "
        f"family rule above adds a chi-square over all the cells, each density's observables judged together with "
        f"their correlation; with this many cells some |z| > 2 are expected by chance).",
        "",
        *_training_lines(training),
        "| model | density | f4 | var f4 | n_c | <s> | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    keyed = {(row["model"], row["density"], row["observable"]): row["z"] for row in differences}
    for model, density in dict.fromkeys((row["model"], row["density"]) for row in differences):
        scores = [keyed[(model, density, name)] for name in COMPARED]
        finite = [abs(score) for score in scores if score is not None]
        verdict = "no error estimate" if not finite else (
            "agrees" if max(finite) < AGREEMENT_Z else f"differs (max \\|z\\| = {max(finite):.2f})"
        )
        cells = " | ".join("n/a" if score is None else f"{score:+.1f}" for score in scores)
        lines.append(f"| {model} | {density:g} | {cells} | {verdict} |")
    return lines


def _training_lines(training: dict[str, Any] | None) -> list[str]:
    """How the learned rates' own errors enter the z's: the shifted runs and the error each adds."""
    if not training:
        return []
    shifts = "; ".join(f"class {shift['class_index']} ({', '.join(shift['kinds'])}; {shift['events']:,} events) "
                       f"x e^{shift['log_shift']:.3g}" for shift in training["shifts"])  # fmt: skip
    lines = [
        f"training_error: the standard error that the learned class rates' own errors (n/E from one trajectory, "
        f"relative 1/√n) add to a learned observable (delta method): the original dynamics ran again with each class "
        f"rate m = {training['shift_errors']:g} of its standard errors up ({shifts}), and each class adds the "
        f"square of the observable's change over m, less the change's own noise (analysis/rate_uncertainty.py). It "
        "applies to the models trained on the main trajectory (main and seeds stores); the activity and large "
        "stores count the ensembles alone.",
        "",
        "| density | " + " | ".join(COMPARED_WORDS[name] for name in COMPARED) + " |",
        "|---:|" + "---:|" * len(COMPARED),
    ]
    for at, density in enumerate(training["densities"]):
        lines.append(f"| {density:g} | " + " | ".join(f"{training['errors'][name][at]:.2g}" for name in COMPARED) + " |")
    return lines + [""]
