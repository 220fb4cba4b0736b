"""Evaluate a trained model on any trajectory: U/T, the gap to the true dynamics, learned classes.

    report = evaluate("runs/mode2", open_trajectory("other_density.zarr"))

The gap per event, (U_true - U_model) / K, is the mean log-likelihood ratio per event: 0 for a
model that has learned the generating rates exactly, positive otherwise (in expectation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpcdyn.storage.events import EventSource
from hpcdyn.learning.likelihood import iter_segments, path_log_likelihood
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.replay import replay_segment
from hpcdyn.physics.systems import ConfigurationError
from hpcdyn.learning.training import load_model


def _check_compatible(model, source: EventSource) -> None:
    system = source.system
    if model.config.system != system.name:
        raise ConfigurationError(f"store: the model was trained on system {model.config.system!r}, the store holds {system.name!r}")
    if max(system.shape) > model.config.lattice_size:
        raise ConfigurationError(
            f"store: lattice side {max(system.shape)} exceeds the model's position tables ({model.config.lattice_size})"
        )


@torch.no_grad()
def class_table(model, source: EventSource, max_events: int = 20_000, device: str = "cpu") -> dict[str, list[int]]:
    """Mode 2: for each true move type, how many candidate moves land in each learned class.

    Counted over the configurations before the first ``max_events`` events. Moves the exclusion
    mask forbids have no class and are not counted.
    """
    truth = true_rate_model(source.system)
    counts = torch.zeros(len(truth.type_names), model.config.n_classes, dtype=torch.long)
    seen = 0
    for positions, states, tokens, moves, _ in iter_segments(source, 1000, device):
        configurations = replay_segment(source.system, positions, states, tokens, moves)
        configurations = tuple(part[:-1] for part in configurations)
        types = truth.move_types(*configurations).flatten().cpu()
        classes = model.move_classes(*configurations).flatten().cpu()
        kept = classes >= 0
        counts.index_put_((types[kept], classes[kept]), torch.ones_like(types[kept]), accumulate=True)
        seen += len(tokens)
        if seen >= max_events:
            break
    return {name: row.tolist() for name, row in zip(truth.type_names, counts)}


@torch.no_grad()
def gap_by_move_type(model, source: EventSource, max_events: int = 50_000, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Where the gap comes from: the expected log-likelihood ratio per unit time, split by true move type.

    For rates w (true) and u (learned) the expected gap per unit time is the sum over candidate moves
    of u - w + w ln(w / u) (>= 0; u for a move the truth forbids). Time-averaged over the
    configurations before the first ``max_events`` events, with the exposure (mean number of
    candidate moves of the type) and the exposure-weighted mean true and learned rates per type.
    Summed over types and divided by the event rate, it is the expected gap per event.
    """
    truth = true_rate_model(source.system)
    n_types = len(truth.type_names)
    totals = {name: torch.zeros(n_types, dtype=torch.float64) for name in ("gap", "exposure", "true", "learned")}
    elapsed, seen = 0.0, 0
    for positions, states, tokens, moves, dwell in iter_segments(source, 1000, device):
        configurations = tuple(part[:-1] for part in replay_segment(source.system, positions, states, tokens, moves))
        weight = dwell.double()[:, None, None]
        learned_log, true_log = model(*configurations).double(), truth(*configurations).double()
        learned, true = learned_log.exp(), true_log.exp()
        ratio = torch.where(true > 0, true * (true_log - learned_log), torch.zeros_like(true))
        terms = {"gap": learned - true + ratio, "exposure": torch.ones_like(true), "true": true, "learned": learned}
        types = truth.move_types(*configurations).flatten().cpu()
        for name, values in terms.items():
            totals[name].index_add_(0, types, (weight * values).flatten().cpu())
        elapsed += float(dwell.sum())
        seen += len(tokens)
        if seen >= max_events:
            break
    event_rate = seen / elapsed
    exposure = totals["exposure"].clamp_min(1e-300)
    return {
        name: {
            "exposure": float(totals["exposure"][index] / elapsed),
            "true_rate": float(totals["true"][index] / exposure[index]),
            "learned_rate": float(totals["learned"][index] / exposure[index]),
            "gap_per_event": float(totals["gap"][index] / elapsed / event_rate),
        }
        for index, name in enumerate(truth.type_names)
    }


def evaluate(run: str | Path, source: EventSource, device: str = "cpu", segment_events: int = 1024) -> dict[str, Any]:
    """U/T of a trained model (run directory or checkpoint) on ``source``, against the truth."""
    model, state = load_model(run, device)
    _check_compatible(model, source)
    learned = path_log_likelihood(source, model, segment_events, device)
    report: dict[str, Any] = {
        "run": str(run),
        "store": str(getattr(source, "path", "<memory>")),
        "mode": model.config.mode,
        **learned.as_dict(),
    }
    true = path_log_likelihood(source, true_rate_model(source.system), segment_events, device)
    report["true_U"] = true.log_likelihood
    report["true_U_per_T"] = true.per_time
    report["gap_per_event"] = (true.log_likelihood - learned.log_likelihood) / max(learned.n_events, 1)
    if model.config.mode == 2:
        report["n_classes"] = model.config.n_classes
        report["class_rates"] = model.class_rates()
        report["class_table"] = class_table(model, source, device=device)
    report["gap_by_move_type"] = gap_by_move_type(model, source, device=device)
    report["trained_on"] = state["store"]
    return report
