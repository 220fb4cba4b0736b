"""The exact path log-likelihood of a trajectory under a rate model (DESIGN 1.3).

    U = sum_k [ ln W(C_k -> C_k+1) - dt_k R(C_k) ] - dt_K R(C_K)
    R(C) = sum of the rates of ALL candidate moves of C;  dt_K = T - sum_k dt_k (censored tail)

The log is processed in segments of consecutive events: each segment's configurations are rebuilt
on the device (``hpcdyn.physics.replay``), scored in one batched call of the model and dropped, so memory
is one segment's worth whatever the trajectory length. Sums are float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np
import torch

from hpcdyn.storage.events import EventSource
from hpcdyn.storage.integrity import StoreError
from hpcdyn.physics.replay import advance, replay_segment
from hpcdyn.physics.systems import System


@dataclasses.dataclass(frozen=True)
class SegmentTerms:
    """Per-event terms of one segment: ln W of the event taken and the escape rate R before it."""

    log_rate: torch.Tensor  # float64 [S]
    escape_rate: torch.Tensor  # float64 [S]
    dwell: torch.Tensor  # float64 [S]
    final_escape_rate: torch.Tensor  # float64 [] escape rate after the segment's last event

    def log_likelihood(self) -> torch.Tensor:
        return (self.log_rate - self.dwell * self.escape_rate).sum()


def escape_rates(log_rates: torch.Tensor) -> torch.Tensor:
    """R(C) for each configuration of a batch: the sum over every token and move, float64."""
    return torch.logsumexp(log_rates.flatten(1).double(), dim=1).exp()


def segment_terms(
    model,
    system: System,
    start_positions: torch.Tensor,
    start_states: torch.Tensor,
    tokens: torch.Tensor,
    moves: torch.Tensor,
    dwell: torch.Tensor,
) -> SegmentTerms:
    """Score one segment; differentiable through the model, for training."""
    positions, states = replay_segment(system, start_positions, start_states, tokens, moves)
    # A model may score the events taken and the exposure apart (Mode 2's expected-U gradient); only
    # then is its own method called, so a compiled model's forward stays compiled otherwise.
    if getattr(model, "scores_events_apart", False):
        event_log_rates, log_rates = model.split_log_rates(positions, states)  # [S + 1, T, M]
    else:
        event_log_rates = log_rates = model(positions, states)
    escape = escape_rates(log_rates)
    index = torch.arange(tokens.shape[0], device=tokens.device)
    taken = event_log_rates[index, tokens.long(), moves.long()].double()
    return SegmentTerms(taken, escape[:-1], dwell.double(), escape[-1])


@dataclasses.dataclass(frozen=True)
class LikelihoodResult:
    log_likelihood: float  # U
    t_final: float  # T
    n_events: int
    tail: float  # censored time after the last event

    @property
    def per_time(self) -> float:
        return self.log_likelihood / self.t_final

    @property
    def per_event(self) -> float:
        return self.log_likelihood / max(self.n_events, 1)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "U": self.log_likelihood,
            "T": self.t_final,
            "U_per_T": self.per_time,
            "U_per_event": self.per_event,
            "events": self.n_events,
            "tail": self.tail,
        }


def iter_segments(
    source: EventSource, segment_events: int, device: torch.device | str = "cpu", block_events: int = 1 << 20
) -> Iterator[tuple[torch.Tensor, ...]]:
    """(start_positions, start_states, tokens, moves, dwell) for consecutive segments, on device.

    Events are read from the source in blocks of about ``block_events`` (a whole number of
    segments), so a store's compressed chunks are each decoded once.
    """
    positions = torch.as_tensor(source.initial_positions, dtype=torch.long, device=device)
    states = torch.as_tensor(source.initial_states, dtype=torch.long, device=device)
    block_size = max(segment_events, block_events) // segment_events * segment_events
    for block in source.iter_event_blocks(block_size):
        block_tokens, block_moves, block_dwell = (torch.as_tensor(np.asarray(part), device=device) for part in block)
        for start in range(0, block_tokens.shape[0], segment_events):
            stop = start + segment_events
            tokens, moves, dwell = block_tokens[start:stop], block_moves[start:stop], block_dwell[start:stop]
            yield positions, states, tokens, moves, dwell
            positions, states = advance(source.system, positions, states, tokens, moves)


@torch.no_grad()
def path_log_likelihood(
    source: EventSource,
    model,
    segment_events: int = 2048,
    device: torch.device | str = "cpu",
    block_events: int = 1 << 20,
) -> LikelihoodResult:
    """U of a whole trajectory under ``model``, with the censored tail."""
    if segment_events < 1:
        raise ValueError(f"segment_events: must be >= 1, got {segment_events}")
    total = torch.zeros((), dtype=torch.float64, device=device)
    elapsed = torch.zeros((), dtype=torch.float64, device=device)
    final_escape = None
    count = 0
    for start_positions, start_states, tokens, moves, dwell in iter_segments(source, segment_events, device, block_events):
        terms = segment_terms(model, source.system, start_positions, start_states, tokens, moves, dwell)
        total += terms.log_likelihood()
        elapsed += terms.dwell.sum()
        final_escape = terms.final_escape_rate
        count += tokens.shape[0]
    if final_escape is None:  # no event at all: the whole window is the tail
        positions = torch.as_tensor(source.initial_positions, dtype=torch.long, device=device)[None]
        states = torch.as_tensor(source.initial_states, dtype=torch.long, device=device)[None]
        final_escape = escape_rates(model(positions, states))[0]
    tail = source.t_final - float(elapsed)
    if tail < -1e-9 * max(source.t_final, 1.0):
        raise ValueError(f"t_final: events span {float(elapsed)} > t_final {source.t_final}; the log is inconsistent")
    tail = max(tail, 0.0)
    total -= tail * final_escape
    return LikelihoodResult(float(total), source.t_final, count, tail)


def check_generating_likelihood(source: EventSource, result: LikelihoodResult) -> None:
    """Refuse a trajectory whose own generating rates (its ``params``) do not explain its events.

    ``result`` is U under ``true_rate_model(source.system)``. It must be finite (an event with rate
    0 under the params is impossible) and, when the simulator recorded U (``log_likelihood``),
    equal to it: a store whose params were edited, or whose events were altered, fails here.
    """
    where = getattr(source, "path", "trajectory")
    params = source.system.params()
    if not math.isfinite(result.log_likelihood):
        raise StoreError(
            f"{where}: attribute params: under {params} the events are impossible (U = {result.log_likelihood}); "
            "the params do not match the events (edited?) or the events are damaged"
        )
    recorded = getattr(source, "log_likelihood", None)
    if isinstance(recorded, (int, float)) and math.isfinite(recorded):
        if not math.isclose(result.log_likelihood, recorded, rel_tol=1e-6, abs_tol=1e-6):
            raise StoreError(
                f"{where}: attribute params: under {params} the events have U = {result.log_likelihood:.10g}, the "
                f"simulator recorded log_likelihood = {recorded:.10g}; the params or the events were changed"
            )
