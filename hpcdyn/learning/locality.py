"""Locality certificate of a trained rate model: may an environment table stand in for it? (DESIGN 1.6)

    samples = [samples_from_store(open_trajectory("run.zarr"), count=40)]       # or fresh ones (cli)
    certificate = certify("runs/mode2", samples)                                 # every default family
    certificate.family        # the smallest key family that passes (None: none does)
    write_certificate(certificate, "runs/mode2")                                  # locality.json + .png

An environment table gives each token the log-rates of its key's patch (own state and stencil
contents) placed alone, centred, on an empty lattice of the training size (what
``hpcdyn.simulation.environment_table.PatchEvaluator`` does; occupancy-only keys stand for
orientation 0). A key of a count family holds how many particles its block has, not where: the
table evaluates one patch per key (the first it meets), and so does the certificate (the first in
the sample), so a model that reads where they sit fails it. The certificate measures, for every
token of real configurations, how far those log-rates are from the network's in the full
configuration: |delta log-rate| (max and percentiles, per move type) and, for Mode 2, the fraction
of candidate moves whose class differs.

Where the training store is at hand (``training_keys``), each sample also says which of its tokens
have a key (in the family) that the training part never showed, and the criterion on the others
alone: a model placed far from its training density meets crowds it never learned, and there a
disagreement is the network's guess against the table's, not a range the data taught it. With the
store, each family's table is also scored on the training's held-out events beside the network
(``heldout_scores``): ``Certificate.heldout_family`` is the smallest table that loses at most
HELDOUT_TOLERANCE nats per event to it, what the data say the model reads (a Mode 1 model's scatter
within a key fails the rate tolerance for every family without costing its table anything there).

A family passes when, at every sample (density), Mode 2's class disagreement is at most the
tolerance (default 1e-4) or Mode 1's 99th percentile of |delta log-rate| is (default 0.01). The
smallest passing family, by number of possible keys (the table's size), is the answer; a hard-local
model passes at its ``config.key_family`` by construction, to rounding. The certificate carries the
checkpoint's sha256, so a reader (the ensemble's ``--engine auto``) can tell it belongs to the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hpcdyn.learning.checkpoint import load_checkpoint
from hpcdyn.learning.names import COUNT_FAMILIES, DEFAULT_FAMILIES
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
from hpcdyn.physics.environments import (
    EnvironmentEncoder, check_fits, decode_keys, keys_of_patches, make_encoder, patch_configurations, patches,
)  # fmt: skip
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.replay import advance
from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, FASystem, System, make_system

FORMAT = "hpcdyn.locality/1"
CERTIFICATE_FILE = "locality.json"
FIGURE_FILE = "locality.png"
# What the engine's tables are built from (DESIGN 1.6); larger families are not cacheable.
DEFAULT_TOLERANCE = {1: 0.01, 2: 1e-4}  # Mode 1: 99th percentile |delta log-rate|; Mode 2: class disagreement
CRITERIA = {1: "log_rate_p99", 2: "class_disagreement"}
PERCENTILES = (50, 90, 99)
# a family's table may lose this many nats per held-out event to the network and still hold what the
# data taught it (the tie margin of the Mode 2 start's family choice, segment_start.choose_family)
HELDOUT_TOLERANCE = 1e-3
PATCHES_PER_CALL = 4096
SITES_PER_CALL = 1 << 22  # lattice sites of the patches evaluated in one call (fa patches fill the lattice)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Configurations of one system at one density, to certify a model on: positions [C, T, 2], states [C, T]."""

    label: str  # "density 0.3" or the store it came from
    density: float
    positions: np.ndarray
    states: np.ndarray

    def __post_init__(self) -> None:
        if self.positions.ndim != 3 or self.positions.shape[-1] != 2 or self.states.shape != self.positions.shape[:2]:
            raise ConfigurationError(
                f"sample {self.label}: positions must be [configurations, tokens, 2] and states [configurations, tokens], "
                f"got {self.positions.shape} and {self.states.shape}"
            )


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """One family on one sample: |delta log-rate| statistics and (Mode 2) the class disagreement."""

    label: str
    density: float
    tokens: int  # tokens compared (configurations x tokens)
    distinct_keys: int
    max: float
    percentiles: dict[str, float]  # "p50", "p90", "p99" of |delta log-rate| over every candidate move
    by_move_type: dict[str, dict[str, float]]  # type name -> {"max", "p99", "moves"}
    class_disagreement: float | None  # Mode 2: fraction of candidate moves whose class differs
    # on the tokens whose key the training part showed (None: the training's keys were not given):
    # {"unseen_tokens": share of tokens with a key it never showed, "moves": candidate moves on the
    # others, "p99": their 99th percentile of |delta log-rate|, "class_disagreement": Mode 2's on them}
    seen: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class FamilyResult:
    family: str
    key_space: int  # number of possible keys: the size a table of this family may reach
    passes: bool
    samples: tuple[SampleResult, ...]
    # the family's table scored on the training trajectory's held-out part beside the network
    # (``heldout_scores``; None: the training store was not given)
    heldout: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Certificate:
    """Whether, and with which key family, an environment table reproduces a trained model."""

    checkpoint: str
    checkpoint_sha256: str
    mode: int
    criterion: str  # "class_disagreement" (Mode 2) or "log_rate_p99" (Mode 1)
    tolerance: float
    receptive_family: str | None  # a hard-local model's covering family (exact by construction); else None
    families: tuple[FamilyResult, ...]
    family: str | None  # the smallest passing family; None: none passes
    # the smallest family whose table loses at most HELDOUT_TOLERANCE nats per held-out event to the
    # network on the training trajectory (what the data say the model reads); None: none, or not scored
    heldout_family: str | None = None

    @property
    def passes(self) -> bool:
        return self.family is not None

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self), "passes": self.passes}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Certificate":
        if values.get("format") != FORMAT:
            raise ConfigurationError(f"locality: format {values.get('format')!r}, this version reads {FORMAT!r}")
        fields = {key: values[key] for key in ("checkpoint", "checkpoint_sha256", "mode", "criterion", "tolerance",
                                               "receptive_family", "family")}  # fmt: skip
        fields["heldout_family"] = values.get("heldout_family")  # absent from certificates written before it
        families = tuple(
            FamilyResult(row["family"], row["key_space"], row["passes"],
                         tuple(SampleResult(**_finite(sample)) for sample in row["samples"]), _heldout(row.get("heldout")))  # fmt: skip
            for row in values["families"]
        )
        return cls(families=families, **fields)


# ----------------------------------------------------------------------------- the model and its system
def checkpoint_file(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    return path / "best.pt" if path.is_dir() else path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_certified_model(path: Path, device: str = "cpu") -> tuple[TransformerRates, System]:
    """The model of a checkpoint and the system it was trained on (training lattice and parameters)."""
    return model_of_checkpoint(load_checkpoint(path), path, device)


def model_of_checkpoint(state: dict[str, Any], path: Path, device: str = "cpu") -> tuple[TransformerRates, System]:
    """``load_certified_model`` on a checkpoint's state already read."""
    config = TransformerConfig.from_dict(state["model_config"])
    model = TransformerRates(config)
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as error:
        raise ConfigurationError(f"checkpoint: {path} does not match its own model configuration ({error})") from error
    params = dict(state["store"].get("params", {}))
    return model.to(device).eval(), make_system(config.system, params)


def check_sample(sample: Sample, system: System) -> None:
    """A sample must be configurations of the training lattice."""
    ly, lx = system.shape
    positions = sample.positions
    if positions.size and (positions[..., 0].max() >= lx or positions[..., 1].max() >= ly or positions.min() < 0):
        raise ConfigurationError(f"sample {sample.label}: positions outside the model's {lx} x {ly} training lattice")
    if isinstance(system, FASystem) and sample.states.shape[1] != lx * ly:
        raise ConfigurationError(f"sample {sample.label}: an fa configuration has one token per site ({lx * ly})")


# ----------------------------------------------------------------------------- samples from a store
def samples_from_store(trajectory, count: int, label: str | None = None) -> Sample:
    """``count`` configurations of a trajectory, before evenly spaced events (the first: the initial one)."""
    if count < 1:
        raise ConfigurationError(f"count: must be >= 1 configurations, got {count}")
    stops = np.unique(np.linspace(0, trajectory.n_events, count, endpoint=False).astype(np.int64))
    positions = torch.as_tensor(trajectory.initial_positions, dtype=torch.long)
    states = torch.as_tensor(trajectory.initial_states, dtype=torch.long)
    taken, done = [], 0
    for stop in stops:
        for tokens, moves, _ in trajectory.iter_event_blocks(start=done, stop=int(stop)):
            events = torch.as_tensor(tokens), torch.as_tensor(moves)
            positions, states = advance(trajectory.system, positions, states, *events)
        done = int(stop)
        taken.append((positions.numpy().copy(), states.numpy().copy()))
    system = trajectory.system
    density = system.density if isinstance(system, ActiveSystem) else float(np.mean([s.mean() for _, s in taken]))
    return Sample(label or str(getattr(trajectory, "path", "store")), float(density),
                  np.stack([p for p, _ in taken]), np.stack([s for _, s in taken]).astype(np.int64))  # fmt: skip


# ----------------------------------------------------------------------------- patches placed alone
def evaluate_patches(model, encoder: EnvironmentEncoder, lattice: System, patch_rows: np.ndarray,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """(log_rates float64 [K, M], Mode 2 classes long [K, M] or None) of each patch placed alone."""
    check_fits(encoder, lattice.shape)
    log_rates = np.zeros((len(patch_rows), model.n_moves))
    classes = np.zeros((len(patch_rows), model.n_moves), np.int64) if model.config.mode == 2 else None
    for rows, positions, states, centre in patch_configurations(encoder, lattice, patch_rows, PATCHES_PER_CALL, SITES_PER_CALL):
        positions = torch.as_tensor(positions, device=device)
        states = torch.as_tensor(states, device=device)
        with torch.inference_mode():
            log_rates[rows] = model(positions, states, token=centre)[:, 0].double().cpu().numpy()
            if classes is not None:
                classes[rows] = model.move_classes(positions, states, token=centre)[:, 0].cpu().numpy()
    return log_rates, classes


def evaluate_full(model, sample: Sample, device: str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """(log_rates [C, T, M], Mode 2 classes or None) of every token in its full configuration."""
    per_call = max(1, SITES_PER_CALL // max(sample.states.shape[1] ** 2, 1))
    log_rates, classes = [], []
    for start in range(0, len(sample.states), per_call):
        positions = torch.as_tensor(sample.positions[start : start + per_call], device=device)
        states = torch.as_tensor(sample.states[start : start + per_call], device=device)
        with torch.inference_mode():
            log_rates.append(model(positions, states).double().cpu().numpy())
            if model.config.mode == 2:
                classes.append(model.move_classes(positions, states).cpu().numpy())
    return np.concatenate(log_rates), (np.concatenate(classes) if classes else None)


# ----------------------------------------------------------------------------- the comparison
def log_rate_difference(one: np.ndarray, other: np.ndarray) -> np.ndarray:
    """|delta log-rate| elementwise: 0 where both are -inf (a masked move), inf where only one is."""
    with np.errstate(invalid="ignore"):
        return np.where(one == other, 0.0, np.abs(one - other))


def compare(model, system: System, sample: Sample, encoder: EnvironmentEncoder, full, device: str = "cpu",
            seen_keys: np.ndarray | None = None) -> SampleResult:  # fmt: skip
    """One family on one sample; ``full`` is ``evaluate_full``'s result for the sample; ``seen_keys``:
    the family's keys the training part showed (``training_keys``), or None."""
    full_log_rates, full_classes = full
    digits = patches(encoder, system, sample.positions, sample.states).reshape(-1, encoder.patch_width)
    # One patch per KEY, as a table keeps (its first sighting): a count family's key holds the number of
    # particles in its block, not where they sit, so tokens of one key may show different patches; a
    # model that reads where they sit is then judged against the one patch its table would evaluate.
    keys, checks = keys_of_patches(encoder, digits)
    _, first, inverse = np.unique(np.stack([keys, checks], axis=1), axis=0, return_index=True, return_inverse=True)
    alone_log_rates, alone_classes = evaluate_patches(model, encoder, system, digits[first], device)
    inverse = inverse.reshape(-1)
    difference = log_rate_difference(alone_log_rates[inverse], full_log_rates.reshape(-1, model.n_moves))
    differs = None
    if alone_classes is not None:
        differs = alone_classes[inverse] != full_classes.reshape(-1, model.n_moves)  # [tokens, moves]
    return SampleResult(
        label=sample.label, density=sample.density, tokens=int(digits.shape[0]), distinct_keys=int(len(first)),
        max=float(difference.max()), percentiles={f"p{q}": _percentile(difference, q) for q in PERCENTILES},
        by_move_type=by_move_type(system, sample, difference),
        class_disagreement=None if differs is None else float(differs.mean()),
        seen=None if seen_keys is None else on_seen_keys(np.isin(keys, seen_keys), difference, differs),
    )  # fmt: skip


def on_seen_keys(seen: np.ndarray, difference: np.ndarray, differs: np.ndarray | None) -> dict[str, Any]:
    """The criterion on the tokens whose key the training part showed (seen: bool [tokens])."""
    moves = difference[seen]
    return {
        "unseen_tokens": float(1.0 - seen.mean()) if seen.size else 0.0,
        "moves": int(moves.size),
        "p99": _percentile(moves, 99) if moves.size else None,
        "class_disagreement": float(differs[seen].mean()) if differs is not None and moves.size else None,
    }


def by_move_type(system: System, sample: Sample, difference: np.ndarray) -> dict[str, dict[str, float]]:
    """Max and 99th percentile of |delta log-rate| [tokens, moves] per true move type (active: rotations,
    forward hops, other hops, hops onto occupied sites; fa: spin and up-neighbour count)."""
    truth = true_rate_model(system)
    with torch.inference_mode():
        types = truth.move_types(torch.as_tensor(sample.positions), torch.as_tensor(sample.states))
    types = types.reshape(difference.shape).numpy()
    rows = {}
    for index, name in enumerate(truth.type_names):
        values = difference[types == index]
        if values.size:
            rows[name] = {"max": float(values.max()), "p99": _percentile(values, 99), "moves": int(values.size)}
    return rows


def _percentile(values: np.ndarray, q: float) -> float:
    # "higher": an observed value, so a p99 of 0 means at least 99 % of the differences are exactly 0
    return float(np.percentile(values, q, method="higher"))


def _finite(sample: dict[str, Any]) -> dict[str, Any]:
    """A stored sample result with JSON nulls (written for infinities) read back as inf."""
    restore = lambda value: math.inf if value is None else value  # noqa: E731
    sample = dict(sample)
    if sample.get("seen") and sample["seen"]["moves"]:
        sample["seen"] = {**sample["seen"], "p99": restore(sample["seen"]["p99"])}
    sample["max"] = restore(sample["max"])
    sample["percentiles"] = {key: restore(value) for key, value in sample["percentiles"].items()}
    sample["by_move_type"] = {
        name: {key: restore(value) for key, value in row.items()} for name, row in sample["by_move_type"].items()
    }
    return sample


def _heldout(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    """Held-out scores read back: a table that gives a held-out event rate 0 scores -inf (written null)."""
    if scores is None:
        return None
    signs = {"table_U_per_event": -1, "table_minus_network_per_event": -1, "table_gap_per_event": 1}
    return {key: signs.get(key, 1) * math.inf if value is None else value for key, value in scores.items()}


def sample_passes(result: SampleResult, mode: int, tolerance: float) -> bool:
    if mode == 2:
        return result.class_disagreement is not None and result.class_disagreement <= tolerance
    return result.percentiles["p99"] <= tolerance


def default_families(system: System) -> tuple[str, ...]:
    """The families certified unless told: DEFAULT_FAMILIES, and COUNT_FAMILIES for particle systems."""
    return DEFAULT_FAMILIES + (COUNT_FAMILIES if isinstance(system, ActiveSystem) else ())


def check_families(families: Sequence[str], system: System) -> list[EnvironmentEncoder]:
    """Encoders of the families, in the order given; an unknown one is refused with the valid ones listed."""
    if not families:
        raise ConfigurationError(f"family: give at least one key family, e.g. {', '.join(DEFAULT_FAMILIES)}")
    encoders = [make_encoder(family, system) for family in families]  # ConfigurationError lists the names
    for encoder in encoders:
        check_fits(encoder, system.shape)
    return encoders


def training_statistics(source, family: str, training_config: dict[str, Any]):
    """The sufficient statistics of ``family`` on ``source`` split as the run was: read from beside the
    store when computed before, else computed (and kept there when the store's folder can be written)."""
    from hpcdyn.learning.statistics import cached_statistics, trajectory_statistics

    split = (training_config.get("validation_fraction", 0.1), training_config.get("max_train_events"))
    try:
        return cached_statistics(source, family, *split)[0]
    except OSError:  # a read-only folder: computed, not kept
        return trajectory_statistics(source, family, *split)


def training_keys(stats) -> np.ndarray:
    """The keys the training part showed (exposure > 0), int64 ascending."""
    exposure, _ = stats.part("train")
    return stats.keys[exposure > 0]


def heldout_scores(model, encoder: EnvironmentEncoder, system: System, stats, metrics: list[dict[str, Any]],
                   device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """The family's table (each key's patch alone, the patch decoded from the key) scored on the held-out
    part of the training trajectory: U from its statistics, sum n log(rate) - E rate over (key, move),
    against the network's own held-out U and the generating rates' from the run's best epoch, in nats
    per held-out event. A table that loses nothing to the network here holds what the data taught it,
    whatever the network does with context the key leaves out; a table that misses what the rule reads
    loses what that reading earned (a Mode 1 test that the rates' own imprecision does not fail)."""
    exposure, counts = stats.part("heldout")
    present = exposure > 0
    log_rates, _ = evaluate_patches(model, encoder, system, decode_keys(encoder, stats.keys[present]), device)
    counts, exposure = counts[present], exposure[present]
    with np.errstate(invalid="ignore", over="ignore"):
        events = np.where(counts > 0, counts * log_rates, 0.0).sum()
        escape = (exposure[:, None] * np.where(np.isfinite(log_rates), np.exp(log_rates), 0.0)).sum()
    table_u = float(events - escape)
    best = max(metrics, key=lambda row: row["val_U_per_T"])
    n_events, t_heldout = stats.n_events[1], stats.t_heldout
    network_u, true_u = best["val_U_per_T"] * t_heldout, best.get("true_val_U_per_T", math.nan) * t_heldout
    recorded = best.get("val_U_per_event")
    if recorded is not None and not math.isclose(network_u / max(n_events, 1), recorded, rel_tol=1e-6, abs_tol=1e-9):
        raise ConfigurationError(f"statistics: their held-out part ({n_events} events, T {t_heldout:g}) is not the run's "
                                 f"(U per event {recorded} recorded, {network_u / max(n_events, 1)} here)")  # fmt: skip
    per_event = lambda value: value / max(n_events, 1)  # noqa: E731
    return {"events": int(n_events), "table_U_per_event": per_event(table_u), "network_U_per_event": per_event(network_u),
            "table_gap_per_event": per_event(true_u - table_u), "network_gap_per_event": per_event(true_u - network_u),
            "table_minus_network_per_event": per_event(table_u - network_u)}  # fmt: skip


def certify(
    run_or_checkpoint: str | Path,
    samples: Sequence[Sample],
    families: Sequence[str] | None = None,
    tolerance: float | None = None,
    device: str = "cpu",
    training_store=None,
    progress: bool = False,
) -> Certificate:
    """Measure, per key family and sample, how far a table's log-rates are from the network's in full context.

    tolerance: Mode 2's largest class disagreement (default 1e-4) or Mode 1's largest 99th percentile
    of |delta log-rate| (default 0.01) at which a family passes; it must pass at every sample.
    families: default ``default_families(system)``. training_store: the trajectory the model was
    trained on (an open store); with it each sample also reports the criterion on the tokens whose key
    its training part showed (``SampleResult.seen``), and each family's table is scored on its
    held-out events (``FamilyResult.heldout``, ``Certificate.heldout_family``). The verdict stays on
    every token: a table serves all of them. progress: a bar over the families on stderr.
    """
    path = checkpoint_file(run_or_checkpoint)
    state = load_checkpoint(path)  # once: the model, and with a training store its split and metrics
    model, system = model_of_checkpoint(state, path, device)
    mode = model.config.mode
    tolerance = DEFAULT_TOLERANCE[mode] if tolerance is None else tolerance
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigurationError(f"tolerance: must be a finite number >= 0, got {tolerance!r}")
    if not samples:
        raise ConfigurationError("samples: give at least one sample of configurations to certify on")
    encoders = check_families(default_families(system) if families is None else families, system)
    for sample in samples:
        check_sample(sample, system)
    full = [evaluate_full(model, sample, device) for sample in samples]
    results = []
    for encoder in _families_bar(encoders, progress):
        stats = None if training_store is None else training_statistics(training_store, encoder.name,
                                                                         state.get("training_config", {}))  # fmt: skip
        seen = None if stats is None else training_keys(stats)
        rows = tuple(compare(model, system, sample, encoder, values, device, seen) for sample, values in zip(samples, full))
        passes = all(sample_passes(row, mode, tolerance) for row in rows)
        heldout = None
        if stats is not None and state.get("metrics"):
            heldout = heldout_scores(model, encoder, system, stats, state["metrics"], device)
        results.append(FamilyResult(encoder.name, int(min(encoder.key_space, 2**63)), passes, rows, heldout))
    passing = [result for result in results if result.passes]
    smallest = min(passing, key=lambda result: result.key_space).family if passing else None
    holding = [result for result in results
               if result.heldout is not None and result.heldout["table_minus_network_per_event"] >= -HELDOUT_TOLERANCE]  # fmt: skip
    heldout_family = min(holding, key=lambda result: result.key_space).family if holding else None
    return Certificate(str(path.absolute()), file_sha256(path), mode, CRITERIA[mode], float(tolerance),
                       model.config.key_family, tuple(results), smallest, heldout_family)  # fmt: skip


def _families_bar(encoders: list[EnvironmentEncoder], enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(encoders, desc="locality", unit="family", disable=not enabled)


# ----------------------------------------------------------------------------- beside the checkpoint
def certificate_directory(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    return path if path.is_dir() else path.parent


def write_certificate(certificate: Certificate, directory: str | Path) -> tuple[Path, Path]:
    """locality.json and locality.png in ``directory``, each written whole under a temporary name first."""
    from hpcdyn.storage.strict_json import dumps

    directory = Path(directory)
    json_path, figure_path = directory / CERTIFICATE_FILE, directory / FIGURE_FILE
    temporary = directory / f".{CERTIFICATE_FILE}.{os.getpid()}.tmp"
    temporary.write_text(dumps(certificate.as_dict(), indent=2) + "\n")
    temporary.replace(json_path)
    plot_certificate(certificate, figure_path)
    return json_path, figure_path


def read_certificate(run_or_directory: str | Path) -> Certificate:
    """The certificate beside a checkpoint (a run directory, its locality.json, or a checkpoint file)."""
    import json

    path = Path(run_or_directory)
    if path.suffix != ".json":
        path = certificate_directory(path) / CERTIFICATE_FILE
    if not path.exists():
        raise ConfigurationError(f"locality: {path} does not exist; run `hpcdyn locality RUN` first")
    return Certificate.from_dict(json.loads(path.read_text()))


def plot_certificate(certificate: Certificate, path: Path) -> None:
    """One panel per family: |delta log-rate| percentiles (and Mode 2's class disagreement) by sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-9  # exact zeros drawn at the floor of the log axis
    count = len(certificate.families)
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), squeeze=False, sharey=True)
    for axis, family in zip(axes.flat, certificate.families):
        densities = [sample.density for sample in family.samples]
        for name in ("p50", "p90", "p99"):
            axis.plot(densities, [max(sample.percentiles[name], floor) for sample in family.samples], "o-", label=name)
        axis.plot(densities, [max(sample.max, floor) for sample in family.samples], "k^--", label="max")
        if certificate.mode == 2:
            axis.plot(densities, [max(sample.class_disagreement, floor) for sample in family.samples], "rs:",
                      label="class disagreement")  # fmt: skip
        seen = [sample for sample in family.samples if sample.seen is not None and sample.seen["moves"]]
        if seen:  # the criterion on the tokens whose key the training part showed
            name = "class_disagreement" if certificate.mode == 2 else "p99"
            axis.plot([sample.density for sample in seen], [max(sample.seen[name], floor) for sample in seen], "gD",
                      mfc="none", label=f"{name.replace('_', ' ')}, keys seen in training")  # fmt: skip
        axis.axhline(certificate.tolerance, color="grey", lw=0.8, ls="--")
        axis.set_yscale("log")
        heldout = "" if family.heldout is None else f"\nheld out: table - network {family.heldout['table_minus_network_per_event']:+.2g} nats/event"
        axis.set_title(f"{family.family}: {'passes' if family.passes else 'fails'}{heldout}", fontsize=9)
        axis.set_xlabel("density")
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    axes[0, 0].set_ylabel(f"|Δ log-rate| (zeros at {floor:g})")
    axes[0, 0].legend(fontsize=7)
    title = (f"locality of {Path(certificate.checkpoint).parent.name}: mode {certificate.mode}, "
             f"{certificate.criterion} <= {certificate.tolerance:g}; smallest passing: {certificate.family}")
    if any(family.heldout is not None for family in certificate.families):
        title += (f"\non the training's held-out events, the smallest table within {HELDOUT_TOLERANCE:g} nats/event "
                  f"of the network: {certificate.heldout_family}")  # fmt: skip
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)
