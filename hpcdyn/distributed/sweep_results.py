"""Sweep results: an xarray Dataset indexed by the swept parameters, the plateau N*, figures.

    dataset = load_sweep_results("runs/sweeps/ntheta")       # no ray needed
    plateau = find_plateau(dataset)                          # N*: where U/T stops rising with N_theta
    dataset.val_U_per_T.sel(mode=2).mean("seed")

One dimension per swept parameter (named by its last part: ``n_classes``, ``seed``, ``lr``; the
whole dotted key with underscores when two would clash), plus ``class`` (learned class rates,
sorted ascending so that classes, which are exchangeable, line up across seeds) and ``epoch``
(learning curves). Grid points that no trial ran (Mode 1 at other N_theta) hold NaN.
Every figure of merit is taken at the trial's best epoch (highest held-out U/T), the epoch its
``best.pt`` holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr

RESULTS_NAME = "results.zarr"
SCALARS = ("val_U_per_T", "train_U_per_T", "true_val_U_per_T", "gap_per_event", "val_U_per_event")
# A gain of held-out likelihood below this many nats per event (about the gap of a well-trained
# model), or below the seed spread, is no gain; where the sweep lacks the held-out event count,
# a gain below TOLERANCE of the whole rise is none.
TOLERANCE_PER_EVENT = 0.002
TOLERANCE = 0.05


@dataclasses.dataclass
class TrialRecord:
    """One trial's outcome, independent of Ray: its parameters, epoch metrics and bookkeeping."""

    point: dict[str, Any]
    metrics: list[dict[str, Any]]
    status: str  # done or error
    name: str = ""
    checkpoint: str = ""  # the best.pt of the trial's latest Tune checkpoint
    wall_time_s: float = math.nan  # Tune's time_total_s, summed over restores
    restored: bool = False  # continued from a checkpoint after a failure or a restored driver


def records_from_result_grid(result_grid) -> list[TrialRecord]:
    """TrialRecords from a Tune ResultGrid; metrics are read from each trial's checkpoint."""
    records = []
    for result in result_grid:
        metrics: list[dict[str, Any]] = []
        checkpoint = ""
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                lines = (Path(directory) / "metrics.jsonl").read_text().splitlines()
                metrics = [json.loads(line) for line in lines]
            checkpoint = str(Path(result.checkpoint.path) / "best.pt")
        last = result.metrics or {}
        iterations = last.get("training_iteration", 0)
        records.append(
            TrialRecord(
                point=result.config["trial"]["point"],
                metrics=metrics,
                status="error" if result.error else "done",
                name=Path(result.path).name,
                checkpoint=checkpoint,
                wall_time_s=float(last.get("time_total_s", math.nan)),
                restored=bool(iterations and last.get("iterations_since_restore", iterations) < iterations),
            )
        )
    return records


def _sorted_values(values: Iterable[Any]) -> list[Any]:
    unique = list(dict.fromkeys(values))
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=repr)


def _best(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    return max(metrics, key=lambda row: row["val_U_per_T"]) if metrics else {}


def coordinate_names(keys: Sequence[str]) -> dict[str, str]:
    """Short names for swept keys: the last part (n_classes), or the whole key when two would clash."""
    last = [key.split(".")[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key.replace(".", "_") for key, short in zip(keys, last)}


def results_dataset(records: Sequence[TrialRecord], swept: Sequence[str], attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """The Dataset of a sweep: one dimension per swept key, NaN where no trial ran."""
    names = coordinate_names(swept)
    coords = {names[key]: _sorted_values(record.point.get(key) for record in records) for key in swept}
    shape = tuple(len(values) for values in coords.values())
    n_classes = max((len(_best(r.metrics).get("class_rates", [])) for r in records), default=0)
    n_epochs = max((len(r.metrics) for r in records), default=0)
    numbers = {name: np.full(shape, np.nan) for name in (*SCALARS, "best_epoch", "epochs_done", "wall_time_s", "train_seconds")}
    class_rate = np.full(shape + (n_classes,), np.nan)
    curve = np.full(shape + (n_epochs,), np.nan)
    texts = {name: np.full(shape, "", dtype=object) for name in ("status", "checkpoint", "trial")}
    restored = np.zeros(shape, dtype=bool)
    for record in records:
        index = tuple(coords[names[key]].index(record.point.get(key)) for key in swept)
        best = _best(record.metrics)
        for name in SCALARS:
            numbers[name][index] = best.get(name, np.nan)
        numbers["best_epoch"][index] = best.get("epoch", np.nan)
        numbers["epochs_done"][index] = len(record.metrics)
        numbers["wall_time_s"][index] = record.wall_time_s
        numbers["train_seconds"][index] = sum(row.get("seconds", 0.0) for row in record.metrics)
        rates = sorted(best.get("class_rates", []))
        class_rate[index + (slice(0, len(rates)),)] = rates
        curve[index + (slice(0, len(record.metrics)),)] = [row["val_U_per_T"] for row in record.metrics]
        texts["status"][index], texts["checkpoint"][index], texts["trial"][index] = record.status, record.checkpoint, record.name
        restored[index] = record.restored
    dims = list(coords)
    variables = {name: (dims, values) for name, values in numbers.items()}
    variables["class_rate"] = (dims + ["class"], class_rate)
    variables["val_U_per_T_curve"] = (dims + ["epoch"], curve)
    variables.update({name: (dims, values) for name, values in texts.items()})  # variable-length strings
    variables["restored"] = (dims, restored)
    dataset = xr.Dataset(variables, coords={**coords, "class": np.arange(n_classes), "epoch": np.arange(n_epochs)})
    dataset.attrs.update({"swept": json.dumps({names[key]: key for key in swept}), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    dataset.attrs.update({key: value if isinstance(value, (str, int, float)) else json.dumps(value) for key, value in (attrs or {}).items()})
    _describe(dataset)
    return dataset


def _describe(dataset: xr.Dataset) -> None:
    descriptions = {
        "val_U_per_T": "held-out U/T of the learned model at its best epoch",
        "train_U_per_T": "training U/T in the best epoch",
        "true_val_U_per_T": "held-out U/T of the generating rates (the ceiling)",
        "gap_per_event": "(U_true - U_model) / events on the held-out part, nats per event",
        "class_rate": "learned Mode-2 class rates at the best epoch, sorted ascending",
        "val_U_per_T_curve": "held-out U/T after each epoch",
        "checkpoint": "best.pt of the trial's latest Tune checkpoint",
        "wall_time_s": "Tune's wall time of the trial, summed over restores",
        "restored": "the trial continued from a checkpoint (after a failure or a restored driver)",
    }
    for name, text in descriptions.items():
        dataset[name].attrs["description"] = text


def save_results(dataset: xr.Dataset, directory: str | Path) -> Path:
    """Write the Dataset as Zarr beside the Tune results, replacing an older one atomically."""
    directory = Path(directory)
    final = directory / RESULTS_NAME
    temporary = directory / f".{RESULTS_NAME}.{uuid.uuid4().hex[:8]}"
    try:
        dataset.to_zarr(temporary, mode="w", consolidated=False)
        if final.exists():
            old = directory / f".{RESULTS_NAME}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old)
        temporary.rename(final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def load_sweep_results(path: str | Path) -> xr.Dataset:
    """The results Dataset of a sweep, from its directory (STORAGE/NAME) or its results.zarr."""
    path = Path(path)
    if (path / RESULTS_NAME).exists():
        path = path / RESULTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no sweep results here; a finished `hpcdyn sweep` writes {RESULTS_NAME}")
    with xr.open_zarr(path, consolidated=False) as dataset:
        return dataset.load()


@dataclasses.dataclass
class Plateau:
    """U/T against N_theta (mean and spread over the other axes) and the plateau N* it shows."""

    n_star: int | None
    n_classes: list[int]
    mean: list[float]
    spread: list[float]  # standard deviation over seeds (and any other axis)
    gains: list[float]  # mean(N_next) - mean(N)
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _mode2(dataset: xr.Dataset) -> xr.Dataset:
    return dataset.sel(mode=2) if "mode" in dataset.dims else dataset


def find_plateau(dataset: xr.Dataset, variable: str = "val_U_per_T", tolerance: float = TOLERANCE,
                 per_event: float = TOLERANCE_PER_EVENT) -> Plateau:  # fmt: skip
    """N*: the smallest N_theta whose mean U/T is within reach of the best one.

    Reach = max(per_event x held-out events per unit time, spread of the best point over seeds):
    beyond N*, adding classes gains less than ``per_event`` nats per event, or less than the noise
    between seeds. A fraction of the whole rise would not do: one class cannot tell forward hops
    from the rest, so the first gains are hundreds of times the last real one (the blocked hops'
    class, ~0.01 nats per event for the active model). Without val_U_per_event the reach is
    ``tolerance`` x (best - worst mean).
    """
    if "n_classes" not in dataset.dims:
        raise ValueError("n_classes: the sweep does not scan N_theta (model.n_classes), so it has no plateau")
    mode2 = _mode2(dataset)
    values = mode2[variable]
    replicas = [dim for dim in values.dims if dim != "n_classes"]
    stacked = values.stack(replica=replicas) if replicas else values.expand_dims("replica")
    counts = stacked.count("replica")
    stacked = stacked.where(counts > 0, drop=True)
    mean = stacked.mean("replica", skipna=True).values
    spread = stacked.std("replica", skipna=True).values
    n_classes = [int(value) for value in stacked["n_classes"].values]
    if len(mean) == 0:
        return Plateau(None, [], [], [], [], math.nan)
    best = int(np.argmax(mean))
    rate = _events_per_time(mode2, variable)
    gain = per_event * rate if math.isfinite(rate) else tolerance * (mean[best] - mean.min())
    threshold = mean[best] - max(gain, float(np.nan_to_num(spread[best])))
    n_star = next(n for n, value in zip(n_classes, mean) if value >= threshold)
    return Plateau(n_star, n_classes, mean.tolist(), np.nan_to_num(spread).tolist(), np.diff(mean).tolist(), float(threshold))


def _events_per_time(dataset: xr.Dataset, variable: str) -> float:
    """Held-out events per unit time (U/T over U per event, the same for every trial), NaN if unknown."""
    if variable != "val_U_per_T" or "val_U_per_event" not in dataset:
        return math.nan
    ratio = (dataset["val_U_per_T"] / dataset["val_U_per_event"]).values
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.median(ratio)) if ratio.size else math.nan


def _replicas(values: xr.DataArray, keep: str) -> np.ndarray:
    """[n(keep), replicas] of the values, every other dimension flattened."""
    others = [dim for dim in values.dims if dim != keep]
    return values.transpose(keep, *others).values.reshape(values.sizes[keep], -1)


def plot_ntheta(dataset: xr.Dataset, plateau: Plateau, path: Path) -> Path:
    """Held-out U/T against N_theta: every seed, mean with spread, the truth, Mode 1, N*."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    mode2 = _mode2(dataset)
    values = _replicas(mode2["val_U_per_T"], "n_classes")
    x = mode2["n_classes"].values
    for column in values.T:
        axes.plot(x, column, "o", color="tab:blue", alpha=0.35, markersize=4)
    axes.errorbar(plateau.n_classes, plateau.mean, yerr=plateau.spread, color="tab:blue", marker="s", capsize=3,
                  label="Mode 2: mean ± std over seeds")  # fmt: skip
    truth = float(np.nanmean(dataset["true_val_U_per_T"].values))
    axes.axhline(truth, color="black", linestyle="--", label=f"generating rates ({truth:.4g})")
    if "mode" in dataset.dims and 1 in dataset["mode"].values:
        mode1 = dataset["val_U_per_T"].sel(mode=1).values
        mean, std = float(np.nanmean(mode1)), float(np.nan_to_num(np.nanstd(mode1)))
        axes.axhspan(mean - std, mean + std, color="tab:green", alpha=0.2)
        axes.axhline(mean, color="tab:green", label=f"Mode 1 ({mean:.4g})")
    if plateau.n_star is not None:
        axes.axvline(plateau.n_star, color="tab:red", linestyle=":", label=f"N* = {plateau.n_star}")
    axes.set_xlabel("N_theta (classes of move)")
    axes.set_ylabel("held-out U/T")
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title(dataset.attrs.get("study", "sweep"))
    return _save(figure, path)


def plot_class_rates(dataset: xr.Dataset, path: Path) -> Path:
    """Learned Mode-2 class rates per N_theta (every seed) against the generating rates."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    mode2 = _mode2(dataset)["class_rate"]
    others = [dim for dim in mode2.dims if dim not in ("n_classes", "class")]
    for n in mode2["n_classes"].values:
        rates = mode2.sel(n_classes=n).transpose(*others, "class").values.reshape(-1)
        rates = rates[np.isfinite(rates) & (rates > 0)]
        axes.plot(np.full(len(rates), n), rates, "o", color="tab:blue", alpha=0.5, markersize=4)
    true_rates = json.loads(dataset.attrs.get("true_rates", "{}"))
    for index, (name, rate) in enumerate(true_rates.items()):
        if rate > 0:
            axes.axhline(rate, color=f"C{index + 1}", linestyle="--", label=f"{name} = {rate:g}")
    axes.set_yscale("log")
    axes.set_xlabel("N_theta (classes of move)")
    axes.set_ylabel("learned class rate")
    if true_rates:
        axes.legend(fontsize=8)
    axes.set_title("learned class rates against the generating rates")
    return _save(figure, path)


def plot_metric(dataset: xr.Dataset, path: Path) -> Path:
    """Held-out U/T per configuration: against the one swept axis, or ranked when there are several."""
    import matplotlib.pyplot as plt

    axes_names = [dim for dim in json.loads(dataset.attrs["swept"]) if dim != "seed"]
    figure, axes = plt.subplots(figsize=(7, 4))
    if len(axes_names) == 1:
        axis = axes_names[0]
        for variable, label in (("val_U_per_T", "learned"), ("true_val_U_per_T", "generating rates")):
            values = _replicas(dataset[variable], axis)
            axes.errorbar(dataset[axis].values, np.nanmean(values, 1), yerr=np.nan_to_num(np.nanstd(values, 1)), marker="o",
                          capsize=3, label=label)  # fmt: skip
        axes.set_xlabel(axis)
        axes.legend(fontsize=8)
    elif not axes_names and "seed" in dataset.dims:  # a sweep over training seeds only: each seed's score
        for variable, label in (("val_U_per_T", "learned"), ("true_val_U_per_T", "generating rates")):
            values = dataset[variable].transpose("seed", ...).values.reshape(dataset.sizes["seed"], -1)
            axes.plot(dataset["seed"].values, np.nanmean(values, 1), marker="o", label=label)
        axes.set_xlabel("training seed")
        axes.legend(fontsize=8)
    else:
        mean = dataset["val_U_per_T"].mean("seed") if "seed" in dataset.dims else dataset["val_U_per_T"]
        flat = mean.stack(configuration=[dim for dim in mean.dims]).dropna("configuration")
        order = np.argsort(flat.values)[-20:]
        labels = [",".join(f"{name}={value}" for name, value in zip(flat.indexes["configuration"].names, key))
                  for key in flat.indexes["configuration"][order]]  # fmt: skip
        axes.barh(range(len(order)), flat.values[order])
        axes.set_yticks(range(len(order)), labels, fontsize=6)
        axes.set_xlabel("held-out U/T (mean over seeds), best 20")
    axes.set_title(dataset.attrs.get("study", "sweep"))
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_figures(dataset: xr.Dataset, directory: str | Path) -> tuple[list[Path], Plateau | None]:
    """Every figure that fits the sweep, as PNGs in ``directory``; the plateau when N_theta is swept."""
    import matplotlib

    matplotlib.use("Agg")
    directory = Path(directory)
    figures, plateau = [], None
    if "n_classes" in dataset.dims and dataset.sizes["n_classes"] > 1:
        plateau = find_plateau(dataset)
        figures.append(plot_ntheta(dataset, plateau, directory / "u_per_t_vs_ntheta.png"))
    if dataset.sizes.get("class", 0) > 0:
        if "n_classes" in dataset.dims:
            figures.append(plot_class_rates(dataset, directory / "class_rates.png"))
    if plateau is None:
        figures.append(plot_metric(dataset, directory / "u_per_t.png"))
    return figures, plateau
