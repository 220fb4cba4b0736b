"""A plain numpy simulator that rebuilds every rate at every event.

It is the baseline the compiled simulator is measured against and an independent implementation
of the physics for the statistical tests: the rates here are written directly from DESIGN 1.1, 1.2 and 1.7
in numpy, sharing no code with ``hpcdyn.physics.rates`` (torch) or ``hpcdyn.simulation.compiled`` (numba).
"""

from __future__ import annotations

import numpy as np

from hpcdyn.storage.events import EventLog
from hpcdyn.physics.systems import HOP_DISPLACEMENTS, ActiveSystem, FASystem, QuorumSystem, System, neighbour_directions


def active_rates(system: ActiveSystem, positions: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Rates [N, 6] of the active model."""
    side = system.L
    occupied = np.zeros((side, side), dtype=bool)
    occupied[positions[:, 1], positions[:, 0]] = True
    rates = np.empty((len(states), 6))
    rates[:, :2] = system.D
    for direction, (dx, dy) in enumerate(HOP_DISPLACEMENTS):
        target_x = (positions[:, 0] + dx) % side
        target_y = (positions[:, 1] + dy) % side
        speed = np.where(states == direction, system.v_plus, system.v_other)
        rates[:, 2 + direction] = np.where(occupied[target_y, target_x], 0.0, speed)
    return rates


def quorum_rates(system: QuorumSystem, positions: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Rates [N, 6] of the quorum model: the active rates, the forward hop at v_crowded when crowded."""
    side, radius = system.L, system.R
    particles = np.zeros((side, side), dtype=np.int64)
    np.add.at(particles, (positions[:, 1], positions[:, 0]), 1)
    others = -np.ones(len(states), dtype=np.int64)  # the particle itself is counted below
    for dx in range(-radius, radius + 1):
        for dy in range(-radius, radius + 1):
            others += particles[(positions[:, 1] + dy) % side, (positions[:, 0] + dx) % side]
    rates = active_rates(system, positions, states)
    forward = rates[np.arange(len(states)), 2 + states]  # 0 if blocked, else v_plus
    crowded = (others >= system.q) & (forward > 0)
    rates[np.arange(len(states)), 2 + states] = np.where(crowded, system.v_crowded, forward)
    return rates


def fa_rates(system: FASystem, positions: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Rates [n_sites, 1] of the FA model."""
    ly, lx = system.shape
    spins = np.zeros((ly, lx), dtype=np.int64)
    spins[positions[:, 1], positions[:, 0]] = states
    up = np.zeros(len(states), dtype=np.int64)
    for dx, dy in HOP_DISPLACEMENTS[neighbour_directions(system.dim)]:
        up += spins[(positions[:, 1] + dy) % ly, (positions[:, 0] + dx) % lx]
    return np.where(states == 0, up * system.c, up * (1.0 - system.c))[:, None]


def rates(system: System, positions: np.ndarray, states: np.ndarray) -> np.ndarray:
    if isinstance(system, QuorumSystem):
        return quorum_rates(system, positions, states)
    if isinstance(system, ActiveSystem):
        return active_rates(system, positions, states)
    return fa_rates(system, positions, states)


def simulate_reference(
    system: System,
    t_final: float,
    seed: int,
    max_events: int | None = None,
    initial: tuple[np.ndarray, np.ndarray] | None = None,
) -> EventLog:
    """Gillespie's direct method, rebuilding all rates per event (slow on purpose).

    With ``max_events`` the run may stop before ``t_final``; the log then ends at its last event.
    ``initial`` (positions, states) replaces the seeded random initial configuration.
    """
    rng = np.random.default_rng(seed)
    positions, states = initial if initial is not None else system.initial_configuration(rng)
    initial_positions, initial_states = positions.copy(), states.copy()
    positions, states = positions.copy(), states.astype(np.int64)
    table = system.move_table
    ly, lx = system.shape
    tokens, moves, dwells = [], [], []
    now, log_likelihood, end = 0.0, 0.0, None
    while max_events is None or len(tokens) < max_events:
        flat = rates(system, positions, states).reshape(-1)
        escape = flat.sum()
        dwell = rng.exponential(1.0 / escape) if escape > 0 else np.inf
        if now + dwell > t_final:
            log_likelihood -= (t_final - now) * escape
            end = float(t_final)
            break
        chosen = min(int(np.searchsorted(np.cumsum(flat), rng.random() * escape, side="right")), len(flat) - 1)
        token, move = divmod(chosen, system.n_moves)
        dx, dy, dstate = table[move]
        positions[token] = ((positions[token, 0] + dx) % lx, (positions[token, 1] + dy) % ly)
        states[token] = (states[token] + dstate) % system.n_states
        log_likelihood += np.log(flat[chosen]) - dwell * escape
        now += dwell
        tokens.append(token)
        moves.append(move)
        dwells.append(dwell)
    return EventLog(
        system,
        end if end is not None else now,  # stopped by max_events: the window ends at the last event
        initial_positions,
        initial_states,
        np.array(tokens, dtype=np.int32),
        np.array(moves, dtype=np.int8),
        np.array(dwells, dtype=np.float64),
        log_likelihood,
    )
