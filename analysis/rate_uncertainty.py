"""The training data's uncertainty in the learned class rates, carried into learned-vs-original comparisons.

A Mode 2 class rate is n_c / E_c counted on ONE trajectory: even an exact learner is off by its
standard error, sqrt(n_c) / E_c, a relative 1 / sqrt(n_c) (1 % for the paper's ~10^4 rotations).
Ensembles precise enough resolve that (the original dynamics at the rates learned from the paper's
trajectory differ from it in n_c at density 0.4 by 3 standard errors, as the learned model does), so a
comparison that counts the ensembles' noise alone fails a perfect learner once the replicas are many.

The variance a class rate's error adds to a learned observable is measured, not assumed (delta
method): the original dynamics runs again with the class's true rates multiplied by e^h_c, a shift
of ``SHIFT_IN_ERRORS`` standard errors in the log-rate (h_c = m / sqrt(n_c)), and with Delta_c its
observables less those of the unshifted original dynamics,

    Var added = s_c^2 (dO / dlog k_c)^2 = s_c^2 (Delta_c / h_c)^2 = Delta_c^2 / m^2.

Over the observables of one density the added covariance is sum_c (Delta_c Delta_c' - Cov Delta_c) / m^2:
the outer product less its own noise (so that its expectation is the true one), negative eigenvalues
set to zero. The rates of one trajectory's classes are independent (Poisson counts of disjoint
events). The response is a finite difference: curvature over h_c (5 standard errors) is neglected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from analysis.observables import REFERENCE_MODEL

SHIFT_IN_ERRORS = 5.0


@dataclasses.dataclass(frozen=True)
class RateShift:
    """One class's shifted run of the original dynamics: which true rates it moves, and by how much."""

    class_index: int
    kinds: tuple[str, ...]  # the true rates the class covers
    events: int  # n_c on the training part
    log_shift: float  # h_c = m / sqrt(n_c)
    rates: dict[str, float]  # every true rate, the class's kinds multiplied by e^h_c

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kinds": list(self.kinds)}


def rate_shifts(model: Mapping[str, Any], shift_errors: float = SHIFT_IN_ERRORS) -> list[RateShift]:
    """The shifted runs for a learned model's record (``classes``, ``true_rates``, ``matched_by`` as the
    pipeline's model stage writes them): one per class that holds a non-zero true rate's moves.

    ``matched_by`` (``RateEvidence.matching``: the class whose n/E lies within MATCH_ERRORS standard errors
    of the rate), not the 99 % intervals' ``covered_by``, which a model exact in kind misses for one rate in
    a hundred: its comparison would lose the rates' errors by chance. A record without it (written before)
    takes ``covered_by``. Empty when some true rate is held by no class: the model is then wrong in kind,
    and its comparison keeps the ensembles' noise alone."""
    classes, true_rates = model.get("classes") or [], model.get("true_rates") or {}
    covered = model.get("matched_by") or model.get("covered_by") or {}
    if not classes or any(covered.get(kind) is None for kind in true_rates):
        return []
    kinds_of: dict[int, list[str]] = {}
    for kind, index in covered.items():
        if true_rates[kind] > 0:
            kinds_of.setdefault(int(index), []).append(kind)
    shifts = []
    for index, kinds in sorted(kinds_of.items()):
        events = int(classes[index]["events"])
        if events == 0:  # an interval [0, x] covers only rates near zero: nothing to shift by
            continue
        step = shift_errors / math.sqrt(events)
        rates = {kind: value * math.exp(step) if kind in kinds else value for kind, value in true_rates.items()}
        shifts.append(RateShift(index, tuple(kinds), events, step, rates))
    return shifts


def training_covariance(base: xr.Dataset, shifted: Sequence[xr.Dataset], observables: Sequence[str],
                        shift_errors: float = SHIFT_IN_ERRORS) -> xr.DataArray:  # fmt: skip
    """The covariance [density, observable, observable_other] that the class rates' errors add to a
    learned observable: sum over the shifted runs of (Delta Delta' - Cov Delta) / m^2, per density,
    negative eigenvalues set to zero.

    ``base``: a summary (``analysis.observables.summarize``) holding the unshifted original dynamics;
    ``shifted``: one summary per class, its original dynamics at the shifted rates, the same densities."""
    names = list(observables)
    reference = base.sel(model=REFERENCE_MODEL)
    densities = reference["density"].values
    total = np.zeros((len(densities), len(names), len(names)))
    for summary in shifted:
        moved = summary.sel(model=REFERENCE_MODEL).sel(density=densities)
        delta = (moved[names].to_array("observable") - reference[names].to_array("observable")).transpose("density", "observable").values
        noise = _mean_covariance(moved, names) + _mean_covariance(reference, names)
        total += (delta[:, :, None] * delta[:, None, :] - noise) / shift_errors**2
    total = np.where(np.isfinite(total), total, 0.0)
    values, vectors = np.linalg.eigh(total)
    clipped = np.einsum("dij,dj,dkj->dik", vectors, np.clip(values, 0.0, None), vectors)
    return xr.DataArray(clipped, dims=("density", "observable", "observable_other"),
                        coords={"density": densities, "observable": names, "observable_other": names})  # fmt: skip


def _mean_covariance(point: xr.Dataset, names: list[str]) -> np.ndarray:
    """The covariance of the replica means [density, k, k]: the covariance across replicas over n."""
    spread = point["covariance"].sel(observable=names, observable_other=names).transpose("density", "observable", "observable_other")
    return spread.values / point["n_replicas"].values[:, None, None]
