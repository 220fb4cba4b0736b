"""Phase diagrams of learned versus original dynamics, each figure one call on the stores.

    figure = plot_learned_vs_original("ensemble.zarr")           # four observables against density
    table = difference_table("ensemble.zarr")                     # learned - original, in standard errors
    joint = joint_differences("ensemble.zarr", COMPARED)          # per density, observables together
    figure = plot_activity_maps(["vp5.zarr", "vp25.zarr"], learned=["vp5_learned.zarr", ...])
    figure = plot_snapshots("ensemble.zarr", density=0.3)         # lattices side by side
    figure = plot_snapshot_grid("snapshots.zarr")                 # a row per density, a column per model
    save_figure(figure, "report/learned_vs_original")            # PNG and PDF

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state, any backend): save them with
``save_figure`` or show them in a notebook with ``display(figure)``.
A "source" is an ensemble store path, an opened ensemble dataset, or a summary from
``analysis.observables.summarize`` (computed here when lazy).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.observables import (
    OBSERVABLES,
    REFERENCE_MODEL,
    open_ensemble,
    setting,
    summarize,
)
from hpcdyn.physics.systems import ConfigurationError

# The four observables of the phase diagrams (DESIGN 1.5), with axis labels.
PANELS = {
    "f4": r"$f_4$",
    "f4_variance": r"var $f_4$",
    "n_clusters": r"clusters $n_c$",
    "mean_cluster_size": r"mean cluster size $\langle s\rangle$",
}
# Empty sites white; the four orientations (+x, +y, -x, -y) in distinct colours.
SNAPSHOT_COLOURS = ListedColormap(["#ffffff", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"])
ORIENTATIONS = ("+x", "+y", "-x", "-y")


def summary_of(source: Any, burn_in: float | None = None) -> xr.Dataset:
    """A computed summary (model, density) from a store path, an ensemble dataset or a summary."""
    if isinstance(source, xr.Dataset) and "f4_se" in source:
        return source.compute()
    return summarize(source, burn_in).compute()


def save_figure(figure: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight")
    return paths


def _model_order(models: Sequence[str], reference: str) -> list[str]:
    return sorted(models, key=lambda name: (name != reference, name))


def seed_models(models: Sequence[str]) -> dict[str, str]:
    """{NAME-seedS: NAME} for every model that is another training seed of a model in ``models``."""
    found = {}
    for model in models:
        base, separator, seed = model.rpartition("-seed")
        if separator and seed.isdigit() and base in models:
            found[model] = base
    return found


def plot_learned_vs_original(
    source: Any, reference: str = REFERENCE_MODEL, burn_in: float | None = None
) -> Figure:
    """f4, var f4, n_c and <s> against density for every model, one panel each, error bars = 1 s.e.

    A model trained again with other seeds (models named ``NAME-seedS`` beside ``NAME``) is drawn as
    one curve with a band: the range of its seeds' values at each density."""
    summary = summary_of(source, burn_in)
    models = [str(model) for model in summary["model"].values.tolist()]
    seeds = seed_models(models)
    figure = Figure(figsize=(9, 7), layout="constrained")
    axes = figure.subplots(2, 2)
    for axis, (name, label) in zip(axes.flat, PANELS.items()):
        for model in _model_order([model for model in models if model not in seeds], reference):
            values = summary.sel(model=model)
            style = {"color": "black", "marker": "o"} if model == reference else {"marker": "s", "linestyle": "--"}
            group = [model] + [other for other, of in seeds.items() if of == model]
            shown = f"{model} (band: {len(group)} training seeds)" if len(group) > 1 else str(model)
            line = axis.errorbar(values["density"], values[name], yerr=values[f"{name}_se"], capsize=3, label=shown, **style)
            if len(group) > 1:
                spread = summary[name].sel(model=group)
                axis.fill_between(values["density"], spread.min("model"), spread.max("model"), alpha=0.25,
                                  color=line.lines[0].get_color(), linewidth=0)  # fmt: skip
        axis.set_xlabel(r"density $\phi$")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    # below the panels: inside one, a long model name covers the curves
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), title="model")
    figure.suptitle(f"Learned vs original dynamics (burn-in {summary.attrs.get('burn_in', 0):g})")
    return figure


def difference_table(source: Any, reference: str = REFERENCE_MODEL, burn_in: float | None = None,
                     training: xr.DataArray | None = None) -> pd.DataFrame:  # fmt: skip
    """Every model against the reference at every density and observable.

    Columns: model, density, observable, value, reference_value, difference, standard_error
    (sqrt(se_model^2 + se_reference^2 + training_error^2)), z = difference / standard_error, and
    z_ensembles (the ensembles' noise alone). ``training``: the covariance [density, observable,
    observable_other] that the learned rates' own errors add to every model compared
    (``analysis.rate_uncertainty.training_covariance``); training_error is its diagonal's root (0 without).
    """
    summary = summary_of(source, burn_in)
    models = summary["model"].values.tolist()
    if reference not in models:
        raise ConfigurationError(f"reference: model {reference!r} is not in the store (models: {models})")
    rows = []
    for model in _model_order(models, reference)[1:]:
        for density in summary["density"].values:
            here, there = summary.sel(model=model, density=density), summary.sel(model=reference, density=density)
            for name in OBSERVABLES:
                difference = float(here[name] - there[name])
                ensembles = float(np.hypot(here[f"{name}_se"], there[f"{name}_se"]))
                added = _training_error(training, density, name)
                error = float(np.hypot(ensembles, added))
                rows.append(
                    {
                        "model": str(model),
                        "density": float(density),
                        "observable": name,
                        "value": float(here[name]),
                        "reference_value": float(there[name]),
                        "difference": difference,
                        "standard_error": error,
                        "training_error": added,
                        "z": difference / error if error > 0 else float("nan"),
                        "z_ensembles": difference / ensembles if ensembles > 0 else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def _training_error(training: xr.DataArray | None, density: float, name: str) -> float:
    """The standard error the learned rates' errors add to one observable at one density (0 without)."""
    if training is None or name not in training["observable"].values:
        return 0.0
    return float(np.sqrt(training.sel(density=density, observable=name, observable_other=name)))


def joint_differences(source: Any, observables: Sequence[str], reference: str = REFERENCE_MODEL,
                      burn_in: float | None = None, training: xr.DataArray | None = None) -> pd.DataFrame:  # fmt: skip
    """Every model against the reference at every density, its ``observables`` judged together.

    The observables of one replica are correlated (n_c and <s> = N / n_c nearly perfectly), so their
    z's are not independent and the sum of their squares is not chi-square. Here the difference vector
    d of the replica means is judged by Hotelling's two-sample T^2 with the pooled covariance S across
    replicas (under agreement both ensembles share it): T^2 = d' [S (1/n + 1/n_ref)]^-1 d, and
    T^2 (nu - k + 1) / (k nu) follows F(k, nu - k + 1) with nu = n + n_ref - 2 and k the rank of S
    (directions with no variance left out). ``chi2`` is the chi-square on k degrees of freedom with
    the same p-value, so the chi2's of independent densities add up to one chi-square of the family.
    With ``training`` (as in ``difference_table``) its covariance is added to the difference's, and the
    F reference is then approximate (the added part is estimated from other ensembles).
    Columns: model, density, observables (the k kept), t2, dof (k), denominator_dof, p, chi2.
    """
    from scipy.stats import chi2, f

    summary = summary_of(source, burn_in)
    if "covariance" not in summary:
        raise ConfigurationError("source: the summary has no covariance across replicas; summarize the store again")
    models = summary["model"].values.tolist()
    if reference not in models:
        raise ConfigurationError(f"reference: model {reference!r} is not in the store (models: {models})")
    names = list(observables)
    means = summary[names].to_array("observable").transpose("model", "density", "observable").values
    covariance = summary["covariance"].sel(observable=names, observable_other=names).transpose(
        "model", "density", "observable", "observable_other").values  # fmt: skip
    counts = summary["n_replicas"].transpose("model", "density").values
    there = models.index(reference)
    rows = []
    for model in _model_order(models, reference)[1:]:
        here = models.index(model)
        for column, density in enumerate(summary["density"].values):
            pair = [(means[at, column], covariance[at, column], int(counts[at, column])) for at in (here, there)]
            added = None if training is None else training.sel(density=density, observable=names, observable_other=names).values
            tested = _hotelling(pair, names, added)
            if tested is None:
                continue
            t2, rank, count, kept = tested
            denominator = count - 2 - rank + 1
            p_value = float(f.sf(t2 * denominator / (rank * (count - 2)), rank, denominator))
            rows.append({"model": str(model), "density": float(density), "observables": " ".join(kept), "t2": t2,
                         "dof": rank, "denominator_dof": denominator, "p": p_value,
                         "chi2": float(chi2.isf(p_value, rank)) if p_value > 0 else float("inf")})  # fmt: skip
    return pd.DataFrame(rows)


def _hotelling(pair: list[tuple[np.ndarray, np.ndarray, int]], names: list[str],
               added: np.ndarray | None = None) -> tuple[float, int, int, list[str]] | None:  # fmt: skip
    """(T^2, rank, n + n_ref, observables kept) of (means, covariance, replicas) of a model and its reference,
    ``added`` a covariance added to the difference's; None when there is nothing to judge."""
    (mean, spread, count), (mean_ref, spread_ref, count_ref) = pair
    finite = np.isfinite(mean) & np.isfinite(mean_ref)
    if min(count, count_ref) < 2 or not finite.any():
        return None
    difference = (mean - mean_ref)[finite]
    pooled = ((count - 1) * spread + (count_ref - 1) * spread_ref)[np.ix_(finite, finite)] / (count + count_ref - 2)
    if not np.isfinite(pooled).all():
        return None
    # directions with variance (1e-12 of the largest), at most nu of them so that F has a denominator
    spread = pooled * (1 / count + 1 / count_ref)
    if added is not None:
        spread = spread + added[np.ix_(finite, finite)]
    values, vectors = np.linalg.eigh(spread)
    kept = values > max(values.max(), 0) * 1e-12
    kept &= np.cumsum(kept[::-1])[::-1] <= count + count_ref - 2
    rank = int(kept.sum())
    if rank == 0:
        return None
    projected = vectors[:, kept].T @ difference
    return float((projected**2 / values[kept]).sum()), rank, count + count_ref, [n for n, ok in zip(names, finite) if ok]


def activity_summary(
    stores: Sequence[Any], model: str | None = REFERENCE_MODEL, burn_in: float | None = None
) -> xr.Dataset:
    """Observables on the (activity, density) plane, activity = v_plus / D read from each store's attrs.

    ``model`` picks the model in every store; None takes each store's only non-reference model.
    """
    layers = []
    for source in stores:
        ensemble = source if isinstance(source, xr.Dataset) else open_ensemble(source)
        summary = summary_of(ensemble, burn_in)
        chosen = model if model is not None else _only_learned_model(summary, source)
        if chosen not in summary["model"].values.tolist():
            raise ConfigurationError(f"model: {chosen!r} is not in store {source} (models: {summary['model'].values.tolist()})")
        layer = summary.sel(model=chosen, drop=True).expand_dims(activity=[_activity(ensemble, source)])
        layers.append(layer)
    activities = [float(layer["activity"][0]) for layer in layers]
    if len(set(activities)) != len(activities):
        raise ConfigurationError(f"stores: two stores have the same activity v_plus/D (activities {activities})")
    return xr.concat(layers, dim="activity", join="outer").sortby("activity")


def _activity(ensemble: xr.Dataset, name: Any) -> float:
    v_plus, rotation = setting(ensemble.attrs, "v_plus"), setting(ensemble.attrs, "D")
    if v_plus is None or rotation is None:
        raise ConfigurationError(f"stores: {name} has no v_plus and D in its attrs; the activity v_plus/D is unknown")
    return float(v_plus) / float(rotation)


def learned_models(source: Any) -> list[str]:
    """The models of a store (path, ensemble or summary) other than the original dynamics."""
    data = source if isinstance(source, xr.Dataset) else open_ensemble(source)
    return [str(model) for model in data["model"].values.tolist() if model != REFERENCE_MODEL]


def _only_learned_model(summary: xr.Dataset, name: Any) -> str:
    learned = learned_models(summary)
    if len(learned) != 1:
        raise ConfigurationError(f"model: store {name} holds learned models {learned}; name the one to map")
    return learned[0]


def plot_activity_maps(
    original: Sequence[Any],
    learned: Sequence[Any] | None = None,
    learned_model: str | None = None,
    burn_in: float | None = None,
) -> Figure:
    """2-D maps of the four observables over (density, activity v_plus/D).

    ``original``: ensemble stores at several v_plus (their "original" model is mapped). ``learned``:
    stores of learned models at those activities, drawn beside the original on the same colour scale.
    """
    rows = {"original": activity_summary(original, REFERENCE_MODEL, burn_in)}
    if learned:
        rows["learned"] = activity_summary(learned, learned_model, burn_in)
    figure = Figure(figsize=(3.6 * len(PANELS), 3.2 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(PANELS), squeeze=False)
    for column, (name, label) in enumerate(PANELS.items()):
        low = min(float(data[name].min()) for data in rows.values())
        high = max(float(data[name].max()) for data in rows.values())
        for row, (title, data) in enumerate(rows.items()):
            axis = axes[row, column]
            logarithmic = bool(data["activity"].min() > 0)
            mesh = axis.pcolormesh(
                _cell_edges(data["density"].values, False),
                _cell_edges(data["activity"].values, logarithmic),
                data[name].transpose("activity", "density").values,
                vmin=low,
                vmax=high,
                cmap="viridis",
            )
            axis.set_yscale("log" if logarithmic else "linear")
            axis.set_xlabel(r"density $\phi$")
            axis.set_ylabel(r"activity $v_+/D$")
            axis.set_title(f"{title}: {label}")
            figure.colorbar(mesh, ax=axis)
    return figure


def _cell_edges(centres: np.ndarray, logarithmic: bool) -> np.ndarray:
    """Cell boundaries half-way between sorted centres (geometrically on a log axis)."""
    values = np.log(centres) if logarithmic else np.asarray(centres, float)
    if len(values) == 1:
        edges = values + np.array([-0.5, 0.5]) * (abs(values[0]) * 0.2 or 1.0)
    else:
        middle = (values[1:] + values[:-1]) / 2
        edges = np.concatenate([[2 * values[0] - middle[0]], middle, [2 * values[-1] - middle[-1]]])
    return np.exp(edges) if logarithmic else edges


def plot_snapshots(
    source: Any,
    density: float | None = None,
    time: float | None = None,
    replica: int = 0,
    models: Sequence[str] | None = None,
) -> Figure:
    """Lattices of every model side by side at one density and time (defaults: highest density, last time)."""
    ensemble = source if isinstance(source, xr.Dataset) else open_ensemble(source)
    occupancy = ensemble["occupancy"]
    density = float(occupancy["density"].max()) if density is None else density
    time = float(occupancy["time"].max()) if time is None else time
    models = _model_order(occupancy["model"].values.tolist(), REFERENCE_MODEL) if models is None else list(models)
    frames = occupancy.sel(density=density, time=time, method="nearest").isel(replica=replica).sel(model=models)
    frames = frames.transpose("model", "y", "x").values
    figure = Figure(figsize=(3.4 * len(models), 3.6), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False)
    chosen_density = float(occupancy["density"].sel(density=density, method="nearest"))
    chosen_time = float(occupancy["time"].sel(time=time, method="nearest"))
    for axis, model, frame in zip(axes[0], models, frames):
        _draw_lattice(axis, frame, f"{model}")
    _orientation_legend(figure)
    figure.suptitle(f"density {chosen_density:g}, time {chosen_time:g}, replica {replica}")
    return figure


def plot_snapshot_grid(
    source: Any,
    densities: Sequence[float] | None = None,
    time: float | None = None,
    replica: int = 0,
    models: Sequence[str] | None = None,
) -> Figure:
    """Lattices of every model (columns, the original first) at each density (rows), at one time
    (default: the last), the same replica: learned beside original where the clusters show."""
    ensemble = source if isinstance(source, xr.Dataset) else open_ensemble(source)
    occupancy = ensemble["occupancy"]
    densities = [float(value) for value in occupancy["density"].values] if densities is None else list(densities)
    time = float(occupancy["time"].max()) if time is None else time
    models = _model_order(occupancy["model"].values.tolist(), REFERENCE_MODEL) if models is None else list(models)
    chosen_time = float(occupancy["time"].sel(time=time, method="nearest"))
    size = int(occupancy.sizes["x"])
    figure = Figure(figsize=(3.6 * len(models), 3.6 * len(densities) + 0.6), layout="constrained")
    axes = figure.subplots(len(densities), len(models), squeeze=False)
    for row, density in enumerate(densities):
        frames = occupancy.sel(density=density, time=time, method="nearest").isel(replica=replica).sel(model=models)
        frames = frames.transpose("model", "y", "x").values
        chosen_density = float(occupancy["density"].sel(density=density, method="nearest"))
        for column, (model, frame) in enumerate(zip(models, frames)):
            _draw_lattice(axes[row, column], frame, f"{model}, density {chosen_density:g}")
    _orientation_legend(figure)
    figure.suptitle(f"{size} x {size} lattice, time {chosen_time:g}, replica {replica}")
    return figure


def _draw_lattice(axis, frame, title: str) -> None:
    """One lattice: empty sites blank, particles coloured by orientation."""
    axis.imshow(frame, cmap=SNAPSHOT_COLOURS, vmin=0, vmax=4, interpolation="nearest", origin="lower")
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])


def _orientation_legend(figure) -> None:
    handles = [Patch(color=SNAPSHOT_COLOURS(index), label=label) for index, label in enumerate(ORIENTATIONS, start=1)]
    figure.legend(handles=handles, loc="outside lower center", ncol=4, title="orientation")
