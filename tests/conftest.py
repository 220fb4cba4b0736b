"""Shared fixtures and exact references for the tests."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.systems import ActiveSystem, FASystem, System

# The tests' models are tiny: one thread is faster than two fighting over small kernels, and it
# keeps floating-point reductions in one order.
torch.set_num_threads(1)


def enumerate_states(system: System) -> tuple[np.ndarray, np.ndarray]:
    """Every configuration of a tiny system: positions [S, T, 2], states [S, T] (labelled tokens)."""
    ly, lx = system.shape
    if isinstance(system, FASystem):
        sites = np.arange(lx * ly)
        positions = np.stack([sites % lx, sites // lx], axis=1)
        spins = np.array(list(itertools.product([0, 1], repeat=len(sites))))
        return np.broadcast_to(positions, (len(spins), *positions.shape)).copy(), spins
    assert isinstance(system, ActiveSystem)
    all_positions, all_states = [], []
    for sites in itertools.permutations(range(lx * ly), system.N):
        for orientations in itertools.product(range(4), repeat=system.N):
            all_positions.append([(site % lx, site // lx) for site in sites])
            all_states.append(orientations)
    return np.array(all_positions), np.array(all_states)


def state_key(positions: np.ndarray, states: np.ndarray) -> tuple:
    return tuple(np.asarray(positions).reshape(-1).tolist()) + tuple(np.asarray(states).reshape(-1).tolist())


def dense_generator(system: System) -> tuple[np.ndarray, dict[tuple, int], np.ndarray, np.ndarray]:
    """Q[i, j] = rate i -> j from the torch rate model and the system's move table."""
    positions, states = enumerate_states(system)
    index = {state_key(p, s): i for i, (p, s) in enumerate(zip(positions, states))}
    log_rates = true_rate_model(system)(torch.as_tensor(positions), torch.as_tensor(states)).numpy()
    rates = np.exp(log_rates)
    ly, lx = system.shape
    generator = np.zeros((len(states), len(states)))
    for i in range(len(states)):
        for token, move in zip(*np.nonzero(rates[i])):
            dx, dy, dstate = system.move_table[move]
            new_positions = positions[i].copy()
            new_states = states[i].copy()
            new_positions[token] = ((new_positions[token, 0] + dx) % lx, (new_positions[token, 1] + dy) % ly)
            new_states[token] = (new_states[token] + dstate) % system.n_states
            j = index[state_key(new_positions, new_states)]
            generator[i, j] += rates[i, token, move]
            generator[i, i] -= rates[i, token, move]
    return generator, index, positions, states


@pytest.fixture(scope="session")
def paper_system() -> ActiveSystem:
    from hpcdyn.physics.systems import make_system

    return make_system("active", preset="paper")
