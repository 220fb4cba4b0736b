"""Range scan: hard-local models of increasing stencil, Mode 2 at N_theta = N* and Mode 1, x seeds.

Each trial trains a one-layer hard-local model (attention within the stencil, relative offsets
only) on the exact sufficient statistics of its key family (``hpcdyn.learning.statistics``). The
held-out U/T rises with the stencil until it covers the interaction range of the dynamics and then
flattens: r* = vn1, the nearest neighbours, for the active model (volume exclusion acts on the
target site of a hop) and for the FA model (the constraint counts up neighbours). The quorum model's
forward hops depend on how many particles sit in the (2R+1) x (2R+1) block, which no tabulated
full-state stencil of that size can hold (about 4 new block5 environments per event), so its ladder
is vn1 with the count of a growing block: vn1, vn1+count3, vn1+count5, vn1+count7, and r* =
vn1+count5, range 2 = R (preset paper). ``find_range``
reads r* off the results Dataset as ``find_plateau`` reads N*; ``plot_range`` draws it.

    hpcdyn sweep range --smoke
    python -c "from sweeps.range import summarise; summarise('runs/sweeps/range')"
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from hpcdyn.distributed.sweep import Study
from hpcdyn.learning.names import stencil_reach
from sweeps.common import ACTIVE_DATA, SMOKE_DATA, TINY_MODEL

NAME = "range"
STENCILS = ["vn1", "block3", "diamond2", "block5"]  # in order of size (ATTENTION_STENCILS)
COUNT_LADDER = ["vn1", "vn1+count3", "vn1+count5", "vn1+count7"]  # quorum: the nearest neighbours and a count
LADDERS = {"quorum": COUNT_LADDER}
N_STAR = 4  # the active model's N* (sweeps/ntheta.py)
N_STARS = {"active": N_STAR, "quorum": 5}  # quorum adds v_crowded; its range R 2 makes r* = block5 (preset paper)
LOCAL = {"model.rotary": False, "model.n_layers": 1, "training.statistics": True, "training.statistics_steps": 50}
# Mode 2 on statistics needs no recipe option: it starts from the maximum-likelihood partition
# (TrainingConfig.class_init); the held-out U stops each trial when it no longer improves
RECIPE = {"training.epochs": 10, "training.patience": 3}
PER_EVENT = 1e-3  # a larger stencil must gain more than this (nats per held-out event) to count

FULL = Study(
    NAME,
    # 4 heads: a one-layer Mode 1 model needs about one per neighbour (vn1 at L 12, T 300: held-out gap
    # 0.033 nats/event with 2 heads, 0.0026 with 4; Mode 2 reaches 2e-5 with 2)
    base={**ACTIVE_DATA, **LOCAL, **RECIPE, "model.d_model": 32, "model.n_heads": 4, "model.d_ff": 64},
    grids=(
        {"model.attention_stencil": STENCILS, "model.mode": [2], "model.n_classes": [N_STAR], "training.seed": [0, 1, 2]},
        {"model.attention_stencil": STENCILS, "model.mode": [1], "training.seed": [0, 1, 2]},
    ),
    description=__doc__,
)

SMOKE = Study(
    NAME,
    base={**SMOKE_DATA, **TINY_MODEL, **LOCAL, **RECIPE, "training.epochs": 3, "training.patience": 3,
          "training.statistics_steps": 20},  # fmt: skip
    grids=(
        {"model.attention_stencil": STENCILS[:3], "model.mode": [2], "model.n_classes": [N_STAR], "training.seed": [0]},
        {"model.attention_stencil": STENCILS[:3], "model.mode": [1], "training.seed": [0]},
    ),
    description=__doc__,
)


# The FA chain of issue-sized data (L 64, about 80 events per site); its rates m c and m (1 - c) for
# m = 0, 1, 2 up neighbours take five values (0, 0.3, 0.6, 0.7, 1.4 at c = 0.3): N* = 5
FA_DATA = {"data.system": "fa", "data.preset": "chain", "data.L": 64, "data.t_final": 350.0}
N_STARS["fa"] = 5
SYSTEMS = ("active", "quorum", "fa")  # the systems this study runs on (get_study's system=)


def for_system(study: Study, system: str) -> Study:
    """The study on another system's trajectory, Mode 2 at that system's N*."""
    if system == "fa":  # a chain of spins: no particle density
        base = {key: value for key, value in study.base.items() if key != "data.density"}
        study = dataclasses.replace(study, base=base).with_overrides(FA_DATA)
    else:
        study = study.with_overrides({"data.system": system})
    axes: dict[str, list] = {"model.n_classes": [N_STARS[system]]}
    if system in LADDERS:
        axes["model.attention_stencil"] = LADDERS[system]
    return study.with_overrides(axes=axes)


def ladder_order(names) -> list[str]:
    """Stencils from the smallest: by range, then a count before a full-state stencil of that range
    (one number against the states of every site), then by size."""
    known = ["vn1", "vn1+count3", "block3", "vn1+count5", "diamond2", "block5", "vn1+count7"]
    return sorted(set(names), key=lambda name: (stencil_reach(name), known.index(name) if name in known else len(known), name))


@dataclasses.dataclass
class RangePlateau:
    """Held-out U/T against the stencil (mean, spread over seeds) per mode, and r* per mode."""

    stencils: list[str]
    mean: dict[int, list[float]]
    spread: dict[int, list[float]]
    r_star: dict[int, str | None]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def find_range(dataset, per_event: float = PER_EVENT) -> RangePlateau:
    """r*: the smallest stencil whose mean held-out U/T is within reach of the best stencil's.

    Reach = max(per_event x held-out events per unit time, the best stencil's spread over seeds).
    """
    present = ladder_order(str(v) for v in dataset["attention_stencil"].values)
    modes = [int(m) for m in dataset["mode"].values] if "mode" in dataset.dims else [0]
    mean, spread, r_star = {}, {}, {}
    for mode in modes:
        part = dataset.sel(mode=mode) if "mode" in dataset.dims else dataset
        values = part["val_U_per_T"]
        others = [dim for dim in values.dims if dim != "attention_stencil"]
        rows = [values.sel(attention_stencil=name).values.reshape(-1) for name in present]
        rows = [row[np.isfinite(row)] for row in rows]
        means = [float(row.mean()) if row.size else math.nan for row in rows]
        spreads = [float(row.std()) if row.size else math.nan for row in rows]
        ratio = (part["val_U_per_T"] / part["val_U_per_event"]).values if "val_U_per_event" in part else np.array([])
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        rate = float(np.median(ratio)) if ratio.size else math.nan
        finite = [i for i, value in enumerate(means) if math.isfinite(value)]
        if not finite:
            mean[mode], spread[mode], r_star[mode] = means, spreads, None
            continue
        best = max(finite, key=lambda i: means[i])
        reach = max(per_event * rate if math.isfinite(rate) else 0.0, np.nan_to_num(spreads[best]))
        r_star[mode] = next(present[i] for i in finite if means[i] >= means[best] - reach)
        mean[mode], spread[mode] = means, spreads
        _ = others
    return RangePlateau(present, mean, spread, r_star)


def plot_range(dataset, plateau: RangePlateau, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    x = np.arange(len(plateau.stencils))
    n_classes = int(np.nanmax(dataset["n_classes"].values)) if "n_classes" in dataset else None
    for mode, means in plateau.mean.items():
        axes.errorbar(x, means, yerr=plateau.spread[mode], marker="o", capsize=3,
                      label=f"Mode {mode}" + (f" (N_theta = {n_classes})" if mode == 2 and n_classes else "") + f": r* = {plateau.r_star[mode]}")  # fmt: skip
    if "true_val_U_per_T" in dataset:
        truth = float(np.nanmedian(dataset["true_val_U_per_T"].values))
        axes.axhline(truth, color="k", linestyle="--", label="generating rates")
    axes.set_xticks(x, plateau.stencils)
    axes.set_xlabel("attention stencil (one layer)")
    axes.set_ylabel("held-out U/T")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def summarise_results(dataset, directory: str | Path) -> dict[str, Any]:
    """r* of a finished range sweep: the lines to print, range.png beside the results, and r* per mode."""
    plateau = find_range(dataset)
    figure = plot_range(dataset, plateau, Path(directory) / "range.png")
    lines = [f"r* = {name} (Mode {mode}; held-out U/T against the stencil: "
             + ", ".join(f"{s}: {v:.4g}" for s, v in zip(plateau.stencils, plateau.mean[mode])) + ")"
             for mode, name in plateau.r_star.items()]  # fmt: skip
    return {"r_star": {f"mode_{mode}": name for mode, name in plateau.r_star.items()}, "range": plateau.as_dict(),
            "figures": [str(figure)], "lines": lines}  # fmt: skip


def summarise(sweep_directory: str | Path) -> RangePlateau:
    """Print r* of a finished range sweep (its results Dataset) and draw range.png beside it."""
    from hpcdyn.distributed.sweep_results import load_sweep_results

    directory = Path(sweep_directory)
    candidates = sorted(directory.glob("*.zarr")) or [directory]
    dataset = load_sweep_results(candidates[0])
    summary = summarise_results(dataset, directory)
    print("\n".join(summary["lines"]))
    print(f"figure: {summary['figures'][0]}")
    return find_range(dataset)
