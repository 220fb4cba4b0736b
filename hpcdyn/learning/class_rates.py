"""Mode 2 class rates in closed form (DESIGN 1.4).

With the classifier's hard assignment held fixed, U depends on the rate w_k of class k only through

    U = sum_k [ n_k ln w_k - w_k E_k ] + terms without w,

where n_k counts the events whose move is in class k and E_k = sum over configurations of
dwell x (number of candidate moves in class k) is the class's exposure. So the best rate is
w_k = n_k / E_k, exactly, in one pass over the data. With ``class_rate_fit="closed_form"`` the
trainer sets the class rates to it after every epoch: gradient steps on the rates alone converge
slowly (a rate whose moves are rare gets a small gradient), and the epoch chosen on the held-out
data then carries rates that are right for its classifier rather than rates still on their way.
It is opt-in: a rate kept at the average of the moves its class holds also weakens the push on
misassigned moves to leave (benchmarks/TRAINING.md has runs where each way wins).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from hpcdyn.storage.events import EventSource
from hpcdyn.learning.likelihood import iter_segments
from hpcdyn.physics.replay import replay_segment


@dataclasses.dataclass(frozen=True)
class ClassStatistics:
    """Per class: the events whose move it holds and the time-integrated number of its moves."""

    events: torch.Tensor  # float64 [K]
    exposure: torch.Tensor  # float64 [K]

    def rates(self) -> torch.Tensor:
        """Maximum-likelihood class rates n_k / E_k; NaN for a class with no event (no estimate)."""
        rates = self.events / self.exposure.clamp_min(torch.finfo(torch.float64).tiny)
        return torch.where(self.events > 0, rates, torch.full_like(rates, math.nan))


@torch.no_grad()
def class_statistics(model, source: EventSource, segment_events: int = 512, device: str = "cpu") -> ClassStatistics:
    """Count events and exposure per class of a Mode 2 model over every event of ``source``.

    Moves the model masks (the exclusion mask) carry no exposure. The censored tail after the last
    event, if any, counts as exposure of the final configuration's moves.
    """
    if model.config.mode != 2:
        raise ValueError("class_statistics: the model is Mode 1 (free rates); class rates need Mode 2")
    n_classes = model.config.n_classes
    events = torch.zeros(n_classes, dtype=torch.float64, device=device)
    exposure = torch.zeros(n_classes, dtype=torch.float64, device=device)
    elapsed = 0.0
    final = None
    for start_positions, start_states, tokens, moves, dwell in iter_segments(source, segment_events, device):
        positions, states = replay_segment(source.system, start_positions, start_states, tokens, moves)
        classes = model.move_classes(positions, states)  # [S + 1, n_tokens, n_moves], -1 where masked
        counts = _class_counts(classes, n_classes)  # [S + 1, K]
        exposure += dwell.double() @ counts[:-1]
        taken = classes[torch.arange(len(tokens), device=device), tokens.long(), moves.long()]
        events += torch.bincount(taken, minlength=n_classes).double()
        elapsed += float(dwell.sum())
        final = counts[-1]
    tail = source.t_final - elapsed
    if final is not None and tail > 0:
        exposure += tail * final
    return ClassStatistics(events, exposure)


def _class_counts(classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Number of candidate moves in each class, per configuration [batch, K] (masked moves, -1, not counted)."""
    one_hot = torch.nn.functional.one_hot(classes.clamp_min(0), n_classes) * (classes >= 0)[..., None]
    return one_hot.flatten(1, -2).sum(1).double()


@torch.no_grad()
def fit_class_rates(model, source: EventSource, segment_events: int = 512, device: str = "cpu",
                    empty_to_lowest: bool = False) -> ClassStatistics:  # fmt: skip
    """Set the class rates of a Mode 2 model to their maximum-likelihood values on ``source``.

    A class no event of the data falls in has the best rate 0: it keeps its current rate, which the
    gradient steps approach 0 from, or with ``empty_to_lowest`` goes down to the lowest rate the
    classes started at (a class that held events for a while, moves since sorted out of it, would
    otherwise keep their rate).
    """
    statistics = class_statistics(model, source, segment_events, device)
    set_class_rates(model, statistics, empty_to_lowest)
    return statistics


@torch.no_grad()
def set_class_rates(model, statistics: ClassStatistics, empty_to_lowest: bool) -> None:
    """Class rates n_k / E_k where a class holds events; a class with exposure and no event keeps its
    rate, or with ``empty_to_lowest`` goes down to the lowest rate the classes started at."""
    rates = statistics.rates().to(model.class_log_rates.device)
    fitted = torch.isfinite(rates)
    model.class_log_rates[fitted] = rates[fitted].log().to(model.class_log_rates.dtype)
    if empty_to_lowest:
        empty = ~fitted & (statistics.exposure.to(fitted.device) > 0)
        lowest = torch.full_like(model.class_log_rates, model.lowest_class_log_rate)
        model.class_log_rates[empty] = torch.minimum(model.class_log_rates, lowest)[empty]
