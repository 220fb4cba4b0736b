"""Rebuild configurations from an event log, vectorised and on any device.

Each move is an additive step (dx, dy, dstate) on one token (see ``hpcdyn.physics.systems``), so the
configuration before event k of a segment is the start configuration plus the cumulative sum of
the steps of events 0..k-1, scattered onto their tokens. No Python loop runs per event, and only
one segment's configurations ever exist at a time.
"""

from __future__ import annotations

import torch

from hpcdyn.physics.systems import System


def _steps(system: System, moves: torch.Tensor) -> torch.Tensor:
    table = torch.as_tensor(system.move_table, device=moves.device, dtype=torch.int32)
    return table[moves.long()]  # [S, 3]


def _wrap(positions: torch.Tensor, states: torch.Tensor, system: System) -> tuple[torch.Tensor, torch.Tensor]:
    ly, lx = system.shape
    x = positions[..., 0] % lx
    y = positions[..., 1] % ly
    return torch.stack([x, y], dim=-1), states % system.n_states


def replay_segment(
    system: System,
    start_positions: torch.Tensor,
    start_states: torch.Tensor,
    tokens: torch.Tensor,
    moves: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Configurations before each event and after the last one.

    start_positions long [T, 2], start_states long [T], tokens/moves [S]
    returns positions long [S + 1, T, 2], states long [S + 1, T]; index k is the configuration
    before event k (index S: after the last event).
    """
    n_events = tokens.shape[0]
    n_tokens = start_states.shape[0]
    steps = torch.zeros(n_events + 1, n_tokens, 3, dtype=torch.int32, device=tokens.device)
    event_index = torch.arange(1, n_events + 1, device=tokens.device)
    steps[event_index, tokens.long()] = _steps(system, moves)
    offsets = steps.cumsum(0)  # [S + 1, T, 3]
    positions = start_positions.unsqueeze(0) + offsets[..., :2]
    states = start_states.unsqueeze(0) + offsets[..., 2]
    return _wrap(positions.long(), states.long(), system)


def advance(
    system: System,
    start_positions: torch.Tensor,
    start_states: torch.Tensor,
    tokens: torch.Tensor,
    moves: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configuration after all events, without building the intermediate ones (O(S + T))."""
    total = torch.zeros(start_states.shape[0], 3, dtype=torch.int64, device=tokens.device)
    total.index_add_(0, tokens.long(), _steps(system, moves).long())
    return _wrap(start_positions + total[:, :2], start_states + total[:, 2], system)
