"""Path-space fidelity: the Kullback-Leibler divergence rate between two rate models' dynamics.

Observables compare a few summaries of the dynamics; the KL divergence rate compares the whole law
of the trajectories. For rate models a and b of one system and a trajectory of a over [0, T],

    KL(a || b) rate  ~  (U_a - U_b) / T,     U_x = sum of ln W_x over the events - integral of R_x dt

(U_x is the path log-likelihood of DESIGN 1.3 under rates x). Its expectation is >= 0, and 0 iff
the two dynamics agree on the configurations a visits. Both directions are measured: trajectories
of a judged under b, and of b judged under a.

Exact and cheap. Each model is simulated with the table engine (exact for a model whose rates
depend on a key family alone: the original rates on vn1, a hard-local model on its receptive family
or the family its locality certificate passes, as ensembles choose it). One compiled pass over the
event log gives the trajectory's sufficient statistics for a key family (exposure E_p and counts
n_{p,m} per key, ``hpcdyn.learning.statistics``); then, for each model x exact on that family,

    U_x = sum_{p,m} n_{p,m} ln W_x(p, m) - sum_p E_p sum_m W_x(p, m)

in closed form. The same statistics give a second, lower-variance estimator of the same rate (the
compensator of U_a - U_b under a, Girsanov for jump processes):

    KL rate  ~  sum_p E_p sum_m [W_a ln(W_a / W_b) - W_a + W_b] / T

which is >= 0 on every trajectory; both are reported (``kl_rate`` and ``kl_rate_exposure``).

Overlaps. Simulations reject hops onto occupied sites (the ensembles' default), which is exactly the
dynamics without those moves; so both U's use the rates with such moves set to 0 (the dynamics as
simulated). A learned model's small rates of those moves are reported apart: ``blocked_rate`` is
their time-averaged total under each model (DESIGN 1.3's U subtracts that too).

    study = kl_rate_study([Pair(system, original(), trained("runs/x/models/learned"))],
                          densities=[0.124, 0.3], replicas=8, t_final=50.0, burn_in=20.0)
    plot_kl_rate(study); plot_kl_map(study); save(study, "kl.zarr")

Command line: ``python -m analysis.kl_rate --models original RUN_DIR --densities 0.1 0.3 --out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from hpcdyn.physics.systems import PARTICLE_SYSTEMS, QuorumSystem, ConfigurationError, System, make_system

ORIGINAL = "original"
DIRECTIONS = ("forward", "reverse")  # forward: trajectories of a judged under b; reverse: of b under a


# ----------------------------------------------------------------------------- rate sources
@dataclasses.dataclass(frozen=True)
class RateSource:
    """A rate model as the study needs it: a label, how to build it for a system, and the key family
    on which its rates are exact (None: chosen from the system, for the original rates)."""

    label: str
    build: Callable[[System], torch.nn.Module]
    identity: Callable[[System], str]  # names the table (its rows do not depend on L or N)
    family: str | None = None
    trained_on: dict | None = None  # a checkpoint's training store (system, params), else None
    changed: dict = dataclasses.field(default_factory=dict)  # original rates: the parameters changed

    def family_for(self, system: System) -> str:
        """vn1 is exact for the original rates of the active system; quorum needs its block."""
        from hpcdyn.physics.environments import rate_family

        if self.family is not None:
            return self.family
        return rate_family(system) if isinstance(system, QuorumSystem) else "vn1"


def original(label: str = ORIGINAL, **changed) -> RateSource:
    """The system's generating rates, with some parameters changed if asked (a deliberately wrong
    model, e.g. ``original("vp50", v_plus=50.0)``); unchanged ones follow the system's."""
    from hpcdyn.physics.rates import true_rate_model
    from hpcdyn.storage.environment_tables import original_rates_identity

    def rates_system(system: System) -> System:
        return dataclasses.replace(system, **changed) if changed else system

    return RateSource(label, lambda system: true_rate_model(rates_system(system)),
                      lambda system: original_rates_identity(rates_system(system)), changed=dict(changed))  # fmt: skip


def trained(path: str | Path) -> RateSource:
    """A trained model (run directory or checkpoint), on the key family an ensemble would simulate it
    on (``choose_engine('auto')``); a model no table represents exactly is refused."""
    from hpcdyn.distributed.engines import choose_engine
    from hpcdyn.learning.training import load_model
    from hpcdyn.storage.environment_tables import checkpoint_identity

    checkpoint = Path(path) / "best.pt" if Path(path).is_dir() else Path(path)
    if not checkpoint.is_file():
        raise ConfigurationError(f"models: {path} is neither 'original' nor a run directory with best.pt nor a checkpoint file")
    model, state = load_model(checkpoint)
    identity = checkpoint_identity(checkpoint)
    chosen = choose_engine("auto", model.config, checkpoint, identity.removeprefix("sha256:"))
    if chosen["engine"] != "table":
        raise ConfigurationError(f"models: {path} has no exact environment table ({chosen['reason']}); "
                                 "the KL rate needs a hard-local or certified-local model")  # fmt: skip
    label = checkpoint.parent.name if checkpoint.name == "best.pt" else checkpoint.stem
    return model_source(model, label, chosen["key_family"], identity, dict(state["store"]))


def model_source(model, label: str, family: str | None = None, identity: str | None = None,
                 trained_on: dict | None = None) -> RateSource:  # fmt: skip
    """Any rate model in memory exact on ``family`` (default: a hard-local model's receptive family)."""
    family = family or getattr(getattr(model, "config", None), "key_family", None)
    if family is None:
        raise ConfigurationError(f"models: {label} has no key family on which its rates are exact; give one")
    identity = identity or f"model:{label}"
    return RateSource(label, lambda system: model, lambda system: identity, family, trained_on)


def rate_source(spec: str) -> RateSource:
    """'original', 'original:NAME=VALUE[,NAME=VALUE]' (changed rates) or a trained model's path."""
    if spec == ORIGINAL:
        return original()
    if spec.startswith(ORIGINAL + ":"):
        changed = {}
        for item in spec.split(":", 1)[1].split(","):
            name, _, value = item.partition("=")
            try:
                changed[name.strip()] = float(value)
            except ValueError:
                raise ConfigurationError(f"models: {spec!r}: expected original:NAME=VALUE, got {item!r}") from None
        return original(spec, **changed)
    return trained(spec)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two rate models compared on one system (its rate parameters and L; N follows each density)."""

    system: System
    a: RateSource
    b: RateSource


# ----------------------------------------------------------------------------- tables
class Tables:
    """One environment table per (model, rate parameters, family), filled on demand and kept: a row
    is the model's rates for one key, the same on every lattice size and density."""

    def __init__(self):
        self._tables: dict = {}

    def get(self, source: RateSource, system: System):
        """(table, evaluator) of ``source`` on ``system``'s family."""
        from hpcdyn.physics.environments import make_encoder
        from hpcdyn.simulation.environment_table import EnvironmentTable, PatchEvaluator, model_lattice

        family = source.family_for(system)
        key = (source.label, source.identity(system), family, system.name, system.shape[0] == 1)
        if key not in self._tables:
            model = source.build(system)
            evaluator = PatchEvaluator(model, model_lattice(model, system))
            encoder = make_encoder(family, system)
            self._tables[key] = (EnvironmentTable(encoder, evaluator.header_for(encoder, source.identity(system))), evaluator)
        return self._tables[key]


def key_rates(table, evaluator, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rates, blocked) [K, M] of exact keys: the model's rates (keys not yet in the table are filled
    first) and which moves are hops onto occupied sites (a function of the key, see the table)."""
    from hpcdyn.physics.environments import decode_keys

    entries = table.fill(evaluator, decode_keys(table.encoder, keys))
    targets = table.target_digits
    patches = table.patches[entries]
    blocked = np.zeros((len(entries), table.n_moves), bool)
    for move, digit in enumerate(targets):
        if digit >= 0:
            blocked[:, move] = patches[:, digit] > 0
    return table.rates[entries], blocked


# ----------------------------------------------------------------------------- one trajectory
def trajectory_statistics(events, family: str):
    """Exposure [K] and counts [K, M] of the whole trajectory (both parts of the trainer's split)."""
    from hpcdyn.learning.statistics import trajectory_statistics as statistics

    stats = statistics(events, family, validation_fraction=0.0, fingerprint="kl-rate")
    return stats.keys, stats.exposure.sum(0), stats.counts.sum(0)


def log_likelihood(rates: np.ndarray, blocked: np.ndarray, exposure: np.ndarray, counts: np.ndarray,
                   exclude_blocked: bool = True) -> float:  # fmt: skip
    """U = sum n ln W - sum E sum_m W in closed form; blocked moves at rate 0 unless asked otherwise
    (a blocked move that happened then makes U = -inf)."""
    if exclude_blocked:
        rates = np.where(blocked, 0.0, rates)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * ln 0 where a move never happened: dropped
        taken = np.where(counts > 0, counts * np.log(rates), 0.0).sum()
    return float(taken - (exposure[:, None] * rates).sum())


def exposure_divergence(rates_a: np.ndarray, rates_b: np.ndarray, blocked: np.ndarray, exposure: np.ndarray) -> float:
    """sum_p E_p sum_m [W_a ln(W_a/W_b) - W_a + W_b]: the compensator of U_a - U_b along a's path."""
    a, b = np.where(blocked, 0.0, rates_a), np.where(blocked, 0.0, rates_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0) - a + b
    return float((exposure[:, None] * term).sum())


def judge(events, simulated: RateSource, other: RateSource, system: System, tables: Tables) -> dict[str, float]:
    """U of a trajectory of ``simulated`` under both models, their blocked rates and the compensator."""
    found: dict[str, tuple] = {}
    values: dict[str, float] = {}
    for role, source in (("simulated", simulated), ("other", other)):
        family = source.family_for(system)
        if family not in found:
            found[family] = trajectory_statistics(events, family)
        keys, exposure, counts = found[family]
        rates, blocked = key_rates(*tables.get(source, system), keys)
        values[f"u_{role}"] = log_likelihood(rates, blocked, exposure, counts)
        values[f"blocked_{role}"] = float((exposure[:, None] * np.where(blocked, rates, 0.0)).sum())
    values["divergence"] = _divergence(found, simulated, other, system, tables)
    return values


def _divergence(found: dict, simulated: RateSource, other: RateSource, system: System, tables: Tables) -> float:
    """The compensator needs both models' rates on one set of keys: their shared family's (the usual
    case: vn1 for the original and a vn1 hard-local model); NaN when their families differ."""
    family_a, family_b = simulated.family_for(system), other.family_for(system)
    if family_a != family_b:
        return math.nan
    keys, exposure, _ = found[family_a]
    rates_a, blocked = key_rates(*tables.get(simulated, system), keys)
    rates_b, _ = key_rates(*tables.get(other, system), keys)
    return exposure_divergence(rates_a, rates_b, blocked, exposure)


def simulate(source: RateSource, system: System, tables: Tables, stream: np.random.SeedSequence, t_final: float,
             burn_in: float):  # fmt: skip
    """An EventLog of ``source``'s dynamics on [0, t_final] after ``burn_in`` (table engine, overlaps
    rejected, no audit): the initial configuration and the dynamics have their own streams."""
    from hpcdyn.simulation.table_engine import EngineOptions, TableEngine

    table, evaluator = tables.get(source, system)
    start, dynamics = stream.spawn(2)
    positions, states = system.initial_configuration(np.random.default_rng(start))
    rng = np.random.default_rng(dynamics)
    options = EngineOptions(audit_fraction=0.0)
    if burn_in > 0:
        engine = TableEngine(table, evaluator, system, positions, states, rng, burn_in, None, options)
        for _ in engine.chunks():
            pass
        positions, states = engine.configuration()
    return TableEngine(table, evaluator, system, positions, states, rng, t_final, None, options).run().events


def replica_stream(seed: int, label: str, v_plus: float, density: float, replica: int) -> np.random.SeedSequence:
    """Fixed per (seed, simulated model, activity, density, replica): stable when the grid grows."""
    case = int.from_bytes(hashlib.sha256(f"{label}|{float(v_plus)!r}|{float(density)!r}".encode()).digest()[:4], "little")
    return np.random.SeedSequence([seed, case, replica])


# ----------------------------------------------------------------------------- the study
def check_study(pairs: Sequence[Pair], densities: Sequence[float], replicas: int, t_final: float, burn_in: float,
                seed: int) -> None:  # fmt: skip
    """Refuse bad input before any work, one message naming the field."""
    if not pairs:
        raise ConfigurationError("models: give at least one pair of models")
    for pair in pairs:
        if pair.system.name not in PARTICLE_SYSTEMS:
            raise ConfigurationError(f"system: the KL study runs the particle systems {PARTICLE_SYSTEMS}, got {pair.system.name!r}")
        for source in (pair.a, pair.b):
            if source.changed:  # names and values checked as the system checks its own
                make_system(pair.system.name, {**pair.system.params(), **source.changed})
    if len({pair.system.L for pair in pairs}) > 1:
        raise ConfigurationError(f"L: every pair must be on one lattice size, got {sorted({p.system.L for p in pairs})}")
    activities = [float(pair.system.v_plus) for pair in pairs]
    if len(set(activities)) != len(activities):
        raise ConfigurationError(f"models: each pair must be at its own activity v_plus, got {activities}")
    if not densities:
        raise ConfigurationError("densities: give at least one density")
    for density in densities:
        if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density < 1):
            raise ConfigurationError(f"densities: each must be in (0, 1), got {density!r}")
    if len(set(densities)) != len(densities):
        raise ConfigurationError(f"densities: must be distinct, got {list(densities)}")
    if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer)) or replicas < 2:
        raise ConfigurationError(f"replicas: must be an integer >= 2 (a standard error needs two), got {replicas!r}")
    if not (isinstance(t_final, (int, float)) and math.isfinite(t_final) and t_final > 0):
        raise ConfigurationError(f"t_final: must be a finite time > 0, got {t_final!r}")
    if not (isinstance(burn_in, (int, float)) and math.isfinite(burn_in) and burn_in >= 0):
        raise ConfigurationError(f"burn_in: must be a finite time >= 0, got {burn_in!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigurationError(f"seed: must be an integer >= 0, got {seed!r}")


def kl_rate_study(pairs: Sequence[Pair], densities: Sequence[float], replicas: int, t_final: float,
                  burn_in: float = 0.0, seed: int = 1, progress: Callable[[str], None] | None = None) -> xr.Dataset:  # fmt: skip
    """KL rates of every pair (one per activity v_plus), both directions, per density: a Dataset with
    dims (direction, v_plus, density[, replica]); see ``summarize`` for its variables."""
    check_study(pairs, densities, replicas, t_final, burn_in, seed)
    tables = Tables()
    names = ("u_simulated", "u_other", "blocked_simulated", "blocked_other", "divergence", "events")
    shape = (len(DIRECTIONS), len(pairs), len(densities), replicas)
    raw = {name: np.zeros(shape) for name in names}
    particles = np.zeros(len(densities), np.int64)
    for p, pair in enumerate(pairs):
        for d, density in enumerate(densities):
            system = dataclasses.replace(pair.system, N=max(1, int(round(density * pair.system.L**2))))
            particles[d] = system.N
            for k, (simulated, other) in enumerate(((pair.a, pair.b), (pair.b, pair.a))):
                began = time.perf_counter()
                for r in range(replicas):
                    stream = replica_stream(seed, simulated.label, pair.system.v_plus, density, r)
                    events = simulate(simulated, system, tables, stream, t_final, burn_in)
                    for name, value in judge(events, simulated, other, system, tables).items():
                        raw[name][k, p, d, r] = value
                    raw["events"][k, p, d, r] = events.n_events
                if progress is not None:
                    progress(f"v_plus {pair.system.v_plus:g} density {density:g} {simulated.label}||{other.label}: "
                             f"{int(raw['events'][k, p, d].sum())} events, {time.perf_counter() - began:.1f} s")  # fmt: skip
    return summarize(_dataset(raw, pairs, densities, particles, t_final, burn_in, seed))


def _dataset(raw, pairs, densities, particles, t_final, burn_in, seed) -> xr.Dataset:
    dims = ("direction", "v_plus", "density", "replica")
    variables = {name: (dims, values) for name, values in raw.items()}
    variables["events"] = (dims, raw["events"].astype(np.int64))
    labels = [[pair.a.label for pair in pairs], [pair.b.label for pair in pairs]]
    coords = {
        "direction": np.array(DIRECTIONS, dtype=object),
        "v_plus": [float(pair.system.v_plus) for pair in pairs],
        "density": [float(d) for d in densities],
        "replica": np.arange(raw["events"].shape[-1]),
        "N": ("density", particles),
        "simulated": (("direction", "v_plus"), np.array(labels, dtype=object)),  # variable-length strings
        "judged_under": (("direction", "v_plus"), np.array(labels[::-1], dtype=object)),
    }
    attrs = {
        "T": float(t_final),
        "t_final": float(t_final),
        "burn_in": float(burn_in),
        "seed": int(seed),
        "L": int(pairs[0].system.L),
        "system": pairs[0].system.name,
        "params": json.dumps([{k: v for k, v in pair.system.params().items() if k != "N"} for pair in pairs]),
        "families": json.dumps([[pair.a.family_for(pair.system), pair.b.family_for(pair.system)] for pair in pairs]),
        "engine": "table engine (hpcdyn.simulation.table_engine), hops onto occupied sites rejected",
        "definition": "kl_rate = mean over replicas of (u_simulated - u_other) / T; kl_rate_exposure = mean of "
                      "divergence / T (compensator); *_se = std(ddof 1) / sqrt(replicas)",
    }
    return xr.Dataset(variables, coords, attrs)


def summarize(study: xr.Dataset) -> xr.Dataset:
    """Add the per-replica estimates and their means and standard errors over replicas:
    kl_rate (U_sim - U_other)/T, kl_rate_exposure (the compensator / T), blocked rates, events."""
    T, n = study.attrs["T"], study.sizes["replica"]
    study["kl_rate_replica"] = (study.u_simulated - study.u_other) / T
    study["kl_exposure_replica"] = study.divergence / T
    for name, source in (("kl_rate", "kl_rate_replica"), ("kl_rate_exposure", "kl_exposure_replica")):
        study[name] = study[source].mean("replica")
        study[f"{name}_se"] = study[source].std("replica", ddof=1) / math.sqrt(n)
    study["blocked_rate_simulated"] = (study.blocked_simulated / T).mean("replica")
    study["blocked_rate_other"] = (study.blocked_other / T).mean("replica")
    study["events_per_time"] = (study.events / T).mean("replica")
    return study


def combine(studies: Sequence[xr.Dataset]) -> xr.Dataset:
    """Studies of other activities (same densities, replicas, times, seed) as one along v_plus: a pair
    measured once serves its own figure and the map (its streams do not depend on the others)."""
    keys = ("T", "burn_in", "seed", "L", "system")
    if len({tuple(study.attrs[key] for key in keys) for study in studies}) > 1:
        raise ConfigurationError(f"studies: they differ in {keys}; combine only studies of one design")
    combined = xr.concat(studies, dim="v_plus", data_vars="minimal", coords="minimal", compat="override",
                         combine_attrs="override")  # fmt: skip
    order = np.argsort(combined.v_plus.values, kind="stable")
    for key in ("params", "families"):  # one entry per pair, in the order of v_plus
        items = [item for study in studies for item in json.loads(study.attrs[key])]
        combined.attrs[key] = json.dumps([items[i] for i in order])
    return combined.isel(v_plus=order)


# ----------------------------------------------------------------------------- output
def save(study: xr.Dataset, path: str | Path) -> Path:
    """Write to Zarr (``.zarr``) or NetCDF (``.nc``), replacing a previous result at ``path``."""
    path = Path(path)
    if path.suffix not in (".nc", ".zarr"):
        raise ConfigurationError(f"out: a study is written to a .zarr or .nc path, got {str(path)!r}")
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")  # appears under its name only when complete
    try:
        with warnings.catch_warnings():  # zarr 3 notes that consolidated metadata is not in its spec; xarray reads it
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            study.to_netcdf(temporary) if path.suffix == ".nc" else study.to_zarr(temporary, mode="w")
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        temporary.rename(path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)
    return path


def table_lines(study: xr.Dataset) -> list[str]:
    """Markdown rows: per activity, density and direction, both estimators with standard errors."""
    lines = ["| v_plus | density | N | KL(a‖b): trajectories of a, judged under b | events/T | (U_a − U_b)/T ± s.e. "
             "| compensator/T ± s.e. | blocked rate of b |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v_plus in study.v_plus.values:
        for density in study.density.values:
            for direction in study.direction.values:
                cell = study.sel(v_plus=v_plus, density=density, direction=direction)
                lines.append(
                    f"| {v_plus:g} | {density:g} | {int(cell.N)} | {cell.simulated.item()} ‖ {cell.judged_under.item()} "
                    f"| {float(cell.events_per_time):.0f} | {float(cell.kl_rate):.3g} ± {float(cell.kl_rate_se):.2g} "
                    f"| {float(cell.kl_rate_exposure):.3g} ± {float(cell.kl_rate_exposure_se):.2g} "
                    f"| {float(cell.blocked_rate_other):.2g} |"
                )
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _name(cell) -> str:
    return f"KL({cell.simulated.item()} ‖ {cell.judged_under.item()})"


def plot_kl_rate(study: xr.Dataset):
    """KL rate against density, both directions, one panel per activity: (U_a − U_b)/T as points with
    standard errors, the compensator estimate of the same rate as a dashed line (its errors are tiny)."""
    plt = _pyplot()
    panels = study.sizes["v_plus"]
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False, constrained_layout=True)
    for axis, v_plus in zip(axes[0], study.v_plus.values):
        for direction, marker, colour in zip(study.direction.values, ("o", "s"), ("C0", "C1")):
            cell = study.sel(v_plus=v_plus, direction=direction)
            axis.errorbar(study.density, cell.kl_rate, yerr=cell.kl_rate_se, marker=marker, ls="none", capsize=3,
                          color=colour, label=f"{_name(cell)}: (U_a − U_b)/T")  # fmt: skip
            axis.errorbar(study.density, cell.kl_rate_exposure, yerr=cell.kl_rate_exposure_se, ls="--", color=colour,
                          label=f"{_name(cell)}: compensator")  # fmt: skip
        axis.axhline(0.0, color="grey", lw=0.8)
        axis.set(xlabel="density", ylabel="KL rate (nats / unit time)", title=f"v_plus {v_plus:g}")
        axis.legend(fontsize=7)
    figure.suptitle(f"Path-space KL rate, L {study.attrs['L']}, T {study.attrs['T']:g}, "
                    f"{study.sizes['replica']} replicas, ± 1 s.e.", fontsize=10)  # fmt: skip
    return figure


def plot_kl_compare(studies: dict[str, xr.Dataset], estimator: str = "kl_rate_exposure"):
    """Several studies on one log axis (the compensator is > 0): how far apart good and bad models are."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for index, (label, study) in enumerate(studies.items()):
        for direction, marker in zip(study.direction.values, ("o", "s")):
            for v_plus in study.v_plus.values:
                cell = study.sel(v_plus=v_plus, direction=direction)
                axis.errorbar(study.density, cell[estimator], yerr=cell[f"{estimator}_se"], marker=marker, capsize=3,
                              color=f"C{index}", ls="-" if direction == DIRECTIONS[0] else ":",
                              label=f"{label}: {_name(cell)}, v_plus {v_plus:g}")  # fmt: skip
    axis.set(yscale="log", xlabel="density", ylabel="KL rate (nats / unit time)")
    axis.legend(fontsize=7)
    return figure


def plot_kl_map(study: xr.Dataset, estimator: str = "kl_rate_exposure"):
    """Heat map of the KL rate over (density, v_plus), one panel per direction, cells annotated with
    value ± s.e.; a log colour scale when every value is > 0 (the compensator's always is)."""
    from matplotlib.colors import LogNorm, Normalize

    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 1.4 + 0.9 * study.sizes["v_plus"]), constrained_layout=True)
    values = study[estimator].transpose("direction", "v_plus", "density").values
    positive = bool(np.all(values > 0))
    limit = float(np.nanmax(np.abs(values))) or 1.0
    norm = LogNorm(np.nanmin(values), limit) if positive else Normalize(-limit, limit)
    for k, axis in enumerate(axes):
        image = axis.imshow(values[k], cmap="viridis" if positive else "RdBu_r", norm=norm, aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(values[k]):
            error = float(study[f"{estimator}_se"].isel(direction=k, v_plus=i, density=j))
            shade = "white" if positive and norm(value) < 0.5 else "black"
            axis.text(j, i, f"{value:.2g}\n±{error:.1g}", ha="center", va="center", fontsize=7, color=shade)
        axis.set_xticks(range(study.sizes["density"]), [f"{d:g}" for d in study.density.values])
        rows = study.isel(direction=k)
        axis.set_yticks(range(study.sizes["v_plus"]), [f"{v:g}\n{_name(rows.sel(v_plus=v))}" for v in study.v_plus.values],
                        fontsize=7)  # fmt: skip
        axis.set(xlabel="density", ylabel="v_plus", title=f"{DIRECTIONS[k]}: trajectories of "
                 + ("a judged under b" if k == 0 else "b judged under a"))  # fmt: skip
        figure.colorbar(image, ax=axis, label="KL rate (nats / unit time)")
    return figure


def save_figure(figure, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return Path(path)


# ----------------------------------------------------------------------------- command line
def build_pairs(model_pairs: Sequence[Sequence[str]], system_name: str | None, L: int | None) -> list[Pair]:
    """Each pair's system: the trained model's training parameters (L from ``L``, else its own),
    else the paper preset of ``system_name`` (active by default)."""
    pairs = []
    for specs in model_pairs:
        a, b = (rate_source(spec) for spec in specs)
        if a.label == b.label and specs[0] != specs[1]:  # two runs named alike: tell them apart in the output
            b = dataclasses.replace(b, label=b.label + "+")
        trained_on = [s.trained_on for s in (a, b) if s.trained_on is not None]
        systems = {t["system"] for t in trained_on} | ({system_name} if system_name else set())
        if len(systems) > 1:
            raise ConfigurationError(f"system: the models of pair {list(specs)} are of systems {sorted(systems)}")
        name = systems.pop() if systems else "active"
        params = dict(trained_on[0]["params"]) if trained_on else None
        if len(trained_on) == 2 and trained_on[0]["params"] != trained_on[1]["params"]:
            params = None  # two models trained at different rates: the preset's unless --set
        base = make_system(name, params, preset=None if params else "paper")
        pairs.append(Pair(dataclasses.replace(base, L=L or base.L, N=1), a, b))
    return pairs


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="python -m analysis.kl_rate",
        description="Kullback-Leibler divergence rate between the dynamics of two rate models, both directions, "
        "per density (table engine, exact sufficient statistics). A trained model's pair runs at its training "
        "rates; 'original' follows them.",
    )
    parse.add_argument("--models", nargs=2, action="append", required=True, metavar=("A", "B"),
                       help="a pair of models: 'original', 'original:NAME=VALUE[,NAME=VALUE]' (the original rates "
                            "with changed parameters) or a trained run directory / checkpoint; repeat for other "
                            "activities (one pair per v_plus) for the (density, v_plus) map")  # fmt: skip
    parse.add_argument("--densities", nargs="+", type=float, required=True, help="densities in (0, 1)")
    parse.add_argument("--system", choices=PARTICLE_SYSTEMS, help="system when no trained model fixes it (default active)")
    parse.add_argument("--L", type=int, help="lattice side (default: the trained model's training size, else 30)")
    parse.add_argument("--replicas", type=int, default=8, help="independent trajectories per density and direction (>= 2)")
    parse.add_argument("--t-final", type=float, default=50.0, help="time of each trajectory after burn-in")
    parse.add_argument("--burn-in", type=float, default=20.0, help="time simulated and discarded first")
    parse.add_argument("--seed", type=int, default=1, help="seed of every stream")
    parse.add_argument("--out", required=True, help="directory for kl_rate.zarr (or .nc) and the figures")
    parse.add_argument("--format", choices=("zarr", "netcdf"), default="zarr", help="format of the dataset")
    parse.add_argument("--overwrite", action="store_true", help="replace a previous result in --out")
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    prog = "analysis.kl_rate"
    try:
        out = Path(args.out)
        dataset_path = out / ("kl_rate.zarr" if args.format == "zarr" else "kl_rate.nc")
        if dataset_path.exists() and not args.overwrite:
            raise ConfigurationError(f"out: {dataset_path} exists; pass --overwrite to replace it")
        if args.L is not None and args.L < 3:
            raise ConfigurationError(f"L: must be an integer >= 3 (the stencil must fit), got {args.L}")
        _check_numbers(args)
        pairs = build_pairs(args.models, args.system, args.L)
        study = kl_rate_study(pairs, args.densities, args.replicas, args.t_final, args.burn_in, args.seed,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    except (ConfigurationError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    study.attrs["command"] = "python -m analysis.kl_rate " + " ".join(sys.argv[1:] if argv is None else argv)
    out.mkdir(parents=True, exist_ok=True)
    save(study, dataset_path)
    figures = [save_figure(plot_kl_rate(study), out / "kl_rate.png")]
    if study.sizes["v_plus"] > 1:
        figures.append(save_figure(plot_kl_map(study), out / "kl_rate_map.png"))
    print("\n".join(table_lines(study)))
    print(f"wrote {dataset_path} and {', '.join(str(f) for f in figures)}")
    return 0


def _check_numbers(args) -> None:
    """The plain numbers first, so a bad one is named before any model is loaded."""
    for density in args.densities:
        if not (math.isfinite(density) and 0 < density < 1):
            raise ConfigurationError(f"densities: each must be in (0, 1), got {density!r}")
    if args.replicas < 2:
        raise ConfigurationError(f"replicas: must be an integer >= 2 (a standard error needs two), got {args.replicas}")
    if not (math.isfinite(args.t_final) and args.t_final > 0):
        raise ConfigurationError(f"t_final: must be a finite time > 0, got {args.t_final!r}")
    if not (math.isfinite(args.burn_in) and args.burn_in >= 0):
        raise ConfigurationError(f"burn_in: must be a finite time >= 0, got {args.burn_in!r}")
    if args.seed < 0:
        raise ConfigurationError(f"seed: must be an integer >= 0, got {args.seed}")


if __name__ == "__main__":
    sys.exit(main())
