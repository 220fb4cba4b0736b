"""Each class rate of a trained Mode 2 model with the evidence behind it and its interval.

A class rate is fitted as n_k / E_k (``class_rates``): the events whose move is in class k over the
class's exposure, both counted on the training part of the model's own trajectory. n_k is Poisson,
so the rate's standard error is sqrt(n_k) / E_k and its interval at level 99 % is
n_k / E_k -+ 2.576 sqrt(n_k) / E_k; a class with no event has the one-sided interval
[0, -ln(0.01) / E_k] (the rates at which seeing no event is that unlikely).

    evidence = class_rates_with_intervals("runs/model")
    for entry in evidence.classes:
        print(entry.rate, entry.low, entry.high)
    evidence.covering()  # which class's interval covers each true rate of the dynamics
    evidence.matching()  # which class holds each true rate's moves (within MATCH_ERRORS standard errors)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np

from hpcdyn.physics.systems import ConfigurationError

LEVEL = 0.99


def rate_interval(events: int, exposure: float, level: float = LEVEL) -> tuple[float, float]:
    """Interval of a class rate n / E at ``level``: n / E -+ z sqrt(n) / E (the rate's standard error
    sqrt(n) / E); with no event, [0, -ln(1 - level) / E] (the rates at which seeing none is that unlikely)."""
    if exposure <= 0:
        return float("nan"), float("nan")
    if events == 0:
        return 0.0, -math.log(1.0 - level) / exposure
    z = NormalDist().inv_cdf(0.5 + level / 2)
    rate, error = events / exposure, math.sqrt(events) / exposure
    return max(rate - z * error, 0.0), rate + z * error


@dataclasses.dataclass(frozen=True)
class ClassRate:
    """One class: the model's rate, the events and exposure on the training part, the interval of n / E."""

    rate: float
    events: int
    exposure: float
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def errors_from(self, value: float) -> float:
        """|n / E - value| in the class's standard errors sqrt(n) / E; a class without events: 0 when its
        interval covers the value, else infinite."""
        if self.events <= 0 or self.exposure <= 0:
            return 0.0 if self.covers(value) else math.inf
        return abs(self.events / self.exposure - value) / (math.sqrt(self.events) / self.exposure)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# A class holds a true kind of move when its n / E lies within this many standard errors of the true rate
# (``RateEvidence.matching``). Wider than the 99 % intervals reported (2.58 errors), which an exact
# partition misses for one rate in a hundred: with three rates, on one trajectory in about 35 (the large
# preset's T 5000 trajectory: every other hop in one class, n / E 1.00273 +- 0.00093, 2.9 errors from 1).
# At 4.5 an exact class is missed about once in 150,000, while a class that mixes two kinds of move lies
# tens to hundreds of errors from both.
MATCH_ERRORS = 4.5


@dataclasses.dataclass(frozen=True)
class RateEvidence:
    """A Mode 2 model's classes (lowest rate first) and the distinct rates of the dynamics that made its
    trajectory, to hold them against."""

    classes: list[ClassRate]
    true_rates: dict[str, float]

    def covering(self) -> dict[str, int | None]:
        """For each true rate, the index of the first class whose interval covers it (None: no class does)."""
        found: dict[str, int | None] = {}
        for name, value in self.true_rates.items():
            covering = [index for index, entry in enumerate(self.classes) if entry.covers(value)]
            found[name] = covering[0] if covering else None
        return found

    def matching(self, errors: float | None = None) -> dict[str, int | None]:
        """For each true rate, the class that holds its moves: the one whose n / E lies nearest it in
        standard errors, when within ``errors`` of them (MATCH_ERRORS; None: no class is). A class with no
        event holds a rate its interval covers."""
        errors = MATCH_ERRORS if errors is None else errors
        found: dict[str, int | None] = {}
        for name, value in self.true_rates.items():
            distances = [entry.errors_from(value) for entry in self.classes]
            nearest = int(np.argmin(distances)) if distances else None
            found[name] = nearest if nearest is not None and distances[nearest] <= errors else None
        return found

    def blocked(self, fraction: float = 1e-3) -> bool:
        """Whether the lowest class lies wholly below ``fraction`` of the smallest true rate (the moves the
        dynamics forbids: blocked hops)."""
        return bool(self.classes and self.true_rates and self.classes[0].high < fraction * min(self.true_rates.values()))


def class_rates_with_intervals(run: str | Path, level: float = LEVEL, device: str = "cpu") -> RateEvidence:
    """The classes of a Mode 2 model (a run directory or checkpoint) with their intervals.

    The counts are taken on the training part of the trajectory the model was trained on (its store
    must still be there): from the sufficient statistics for a hard-local model, else by replaying
    every training event through the model."""
    from hpcdyn.learning.training import TrainingConfig, load_model, split
    from hpcdyn.physics.rates import distinct_rates
    from hpcdyn.storage.trajectory_store import open_trajectory

    model, state = load_model(run, device)
    if model.config.mode != 2:
        raise ConfigurationError(f"run: {run} is a Mode 1 model (free rates); class rates and their intervals are Mode 2's")
    store = state["store"].get("path")
    if not store or not Path(store).exists():
        raise ConfigurationError(f"store: the model's trajectory {store} is not available; the class counts are taken on it")
    source = open_trajectory(store)
    training = TrainingConfig.from_dict(state["training_config"])
    if model.config.hard_local and model.config.key_family is not None:
        events, exposure = _statistics_counts(model.double(), source, training)
    else:
        from hpcdyn.learning.class_rates import class_statistics

        counted = class_statistics(model, split(source, training)[0], device=device)
        events, exposure = counted.events.cpu().numpy(), counted.exposure.cpu().numpy()
    classes = [ClassRate(float(rate), int(round(n)), float(e), *rate_interval(int(round(n)), float(e), level))
               for rate, n, e in zip(model.class_rates(), events, exposure)]  # fmt: skip
    return RateEvidence(sorted(classes, key=lambda entry: entry.rate), distinct_rates(source.system))


def _statistics_counts(model, source, training) -> tuple[np.ndarray, np.ndarray]:
    """Per class: events and exposure on the training part, from the (cached) sufficient statistics."""
    from hpcdyn.learning.local_training import StatisticsObjective
    from hpcdyn.learning.statistics import cached_statistics

    stats, _ = cached_statistics(source, model.config.key_family, training.validation_fraction, training.max_train_events)
    classes = StatisticsObjective(stats, source.system).key_classes(model)  # [K, M], -1 masked
    exposure, counts = stats.part("train")
    return class_counts(classes, exposure, counts, model.config.n_classes)


def class_counts(classes: np.ndarray, exposure: np.ndarray, counts: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the events and exposure of the (key, move) pairs it holds: ``classes`` [K, M] (-1
    masked), ``exposure`` [K] (time spent by tokens in each key), ``counts`` [K, M] (events)."""
    events = np.array([counts[classes == k].sum() for k in range(n_classes)], float)
    class_exposure = np.array([(exposure[:, None] * (classes == k)).sum() for k in range(n_classes)], float)
    return events, class_exposure
