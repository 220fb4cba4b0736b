"""Evaluate a trained model on any trajectory: U/T, the gap to the true dynamics, learned classes.

    report = evaluate("runs/mode2", open_trajectory("other_density.zarr"))

The gap per event, (U_true - U_model) / K, is the mean log-likelihood ratio per event: 0 for a
model that has learned the generating rates exactly, positive otherwise (in expectation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpcdyn.events import EventSource
from hpcdyn.likelihood import iter_segments, path_log_likelihood
from hpcdyn.rates import true_rate_model
from hpcdyn.replay import replay_segment
from hpcdyn.systems import ConfigurationError
from hpcdyn.training import load_model


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

    Counted over the configurations before the first ``max_events`` events.
    """
    truth = true_rate_model(source.system)
    counts = torch.zeros(len(truth.type_names), model.config.n_classes, dtype=torch.long)
    seen = 0
    for positions, states, tokens, moves, _ in iter_segments(source, 1000, device):
        configurations = replay_segment(source.system, positions, states, tokens, moves)
        configurations = tuple(part[:-1] for part in configurations)
        types = truth.move_types(*configurations).flatten().cpu()
        classes = model.classes(*configurations).flatten().cpu()
        counts.index_put_((types, classes), torch.ones_like(types), accumulate=True)
        seen += len(tokens)
        if seen >= max_events:
            break
    return {name: row.tolist() for name, row in zip(truth.type_names, counts)}


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
    report["trained_on"] = state["store"]
    return report
