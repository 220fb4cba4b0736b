"""The N_theta plateau and learned class rates from sweep results.

Results written by ``hpcdyn sweep`` (a sweep directory or its ``results.zarr``, variables
``val_U_per_T``, ``true_val_U_per_T``, ``class_rate``) are read and drawn by ``hpcdyn.distributed.sweep_results``
itself (``load_sweep_results``, ``find_plateau``, ``write_figures``: PNG). Any other xarray Dataset
(NetCDF or Zarr) is accepted with this minimal schema and drawn here (PNG and PDF):

- dim ``n_classes`` (N_theta); any other dims (seed, learning rate, ...) are spread over;
- ``validation_U_per_T`` (n_classes, ...): held-out path log-likelihood per unit time (required);
- ``true_U_per_T``: the generating rates' U/T on the same data, drawn as a line (optional);
- ``class_rate`` (n_classes, class, ...): learned Mode-2 class rates, NaN for unused classes (optional),
  with ``true_rates`` in the attrs (a list) drawn as horizontal lines.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hpcdyn.physics.systems import ConfigurationError

REQUIRED = "validation_U_per_T"
PLATEAU_TOLERANCE = 0.05  # a gain below 5 % of the whole rise (or below the seed spread) is no gain


SWEEP_MODULE_VARIABLE = "val_U_per_T"  # marks results in the format of hpcdyn.distributed.sweep_results


def open_sweep(path: str | Path) -> xr.Dataset:
    """Open sweep results (a sweep directory, its results.zarr, another Zarr or a NetCDF file), checked."""
    path = Path(path)
    if not path.exists():
        raise ConfigurationError(f"sweep: no sweep results at {path}; give the directory `hpcdyn sweep` wrote")
    if (path / "results.zarr").exists():
        path = path / "results.zarr"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
            results = xr.open_zarr(path, consolidated=None) if path.is_dir() else xr.open_dataset(path)
    except Exception as error:
        raise ConfigurationError(f"sweep: {path} does not open as an xarray Dataset ({error})") from error
    if not is_sweep_module_format(results):
        check_sweep(results, str(path))
    return results.load()


def is_sweep_module_format(results: xr.Dataset) -> bool:
    return SWEEP_MODULE_VARIABLE in results and importlib.util.find_spec("hpcdyn.distributed.sweep_results") is not None


def check_sweep(results: xr.Dataset, name: str = "sweep") -> None:
    if "n_classes" not in results.dims or REQUIRED not in results:
        raise ConfigurationError(
            f"sweep: {name} needs a dim 'n_classes' and a variable '{REQUIRED}' (see analysis/sweep_plots.py)"
        )


def plateau(results: xr.Dataset, tolerance: float = PLATEAU_TOLERANCE) -> int:
    """N*: the smallest N_theta whose mean U/T is within reach of the best mean.

    Within reach: closer than the larger of the seed spread (std at the best N_theta) and
    ``tolerance`` times the whole rise of the mean from its lowest to its best value.
    """
    scores = results[REQUIRED]
    others = [dim for dim in scores.dims if dim != "n_classes"]
    mean = (scores.mean(others) if others else scores).values
    best = int(np.nanargmax(mean))
    spread = float(scores.isel(n_classes=best).std()) if others else 0.0
    reach = max(spread, tolerance * (mean[best] - np.nanmin(mean)))
    within = np.flatnonzero(mean >= mean[best] - reach)
    return int(results["n_classes"].values[within.min()])


def plot_sweep(results: xr.Dataset) -> Figure:
    """U/T against N_theta (mean, min-max band over the other dims, true U/T), and class rates if present."""
    check_sweep(results)
    panels = 2 if "class_rate" in results else 1
    figure = Figure(figsize=(5.2 * panels, 4), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)
    axis = axes[0, 0]
    scores = results[REQUIRED]
    others = [dim for dim in scores.dims if dim != "n_classes"]
    classes = results["n_classes"].values
    if others:
        axis.fill_between(classes, scores.min(others), scores.max(others), alpha=0.25, label="range over " + ", ".join(others))
    axis.plot(classes, scores.mean(others) if others else scores, marker="o", label="validation U/T")
    if "true_U_per_T" in results:
        axis.axhline(float(results["true_U_per_T"].mean()), color="black", linestyle="--", label="true rates")
    best = plateau(results)
    axis.axvline(best, color="grey", linestyle=":", label=f"plateau N* = {best}")
    axis.set_xlabel(r"number of classes $N_\theta$")
    axis.set_ylabel("U / T")
    axis.legend()
    if panels == 2:
        _plot_class_rates(axes[0, 1], results)
    return figure


def _plot_class_rates(axis: Axes, results: xr.Dataset) -> None:
    rates = results["class_rate"]
    others = [dim for dim in rates.dims if dim not in ("n_classes", "class")]
    rates = rates.median(others) if others else rates
    for n_classes in results["n_classes"].values:
        values = rates.sel(n_classes=n_classes).values
        values = values[np.isfinite(values) & (values > 0)]
        axis.scatter(np.full(len(values), n_classes), values, color="tab:blue", s=18)
    for rate in results.attrs.get("true_rates", []):
        axis.axhline(float(rate), color="black", linestyle="--", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_xlabel(r"number of classes $N_\theta$")
    axis.set_ylabel("learned class rate (dashed: true rates)")


def sweep_figures(path: str | Path, out_stem: str | Path) -> dict[str, Any]:
    """Figures from sweep results at ``path`` beside ``out_stem``; returns N* and the figure paths."""
    results = open_sweep(path)
    if is_sweep_module_format(results):
        from hpcdyn.distributed import sweep_results

        files, found = sweep_results.write_figures(results, Path(out_stem).parent)
        n_star = None if found is None else found.n_star
        return {"plateau_n_classes": n_star, "figures": [str(file) for file in files], "source": "hpcdyn.distributed.sweep_results"}
    from analysis.phase_diagram import save_figure

    files = save_figure(plot_sweep(results), out_stem)
    return {"plateau_n_classes": plateau(results), "figures": [str(file) for file in files], "source": "minimal schema"}
