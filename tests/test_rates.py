"""The torch rate models against an independent numpy implementation, and event replay."""

import numpy as np
import pytest
import torch

from hpcdyn.simulation import reference
from hpcdyn.physics.rates import ActiveRates, true_rate_model
from hpcdyn.physics.replay import advance, replay_segment
from hpcdyn.physics.systems import make_system

SYSTEMS = [
    make_system("active", {"L": 6, "N": 11, "D": 0.3, "v_plus": 2.0, "v_other": 0.7}),
    make_system("active", {"L": 30, "density": 0.5}, preset="paper"),
    make_system("fa", {"L": 9, "dim": 1, "c": 0.3}),
    make_system("fa", {"L": 5, "dim": 2, "c": 0.6}),
]


def random_batch(system, batch, seed):
    rng = np.random.default_rng(seed)
    configurations = [system.initial_configuration(rng) for _ in range(batch)]
    positions = np.stack([p for p, _ in configurations])
    states = np.stack([s for _, s in configurations]).astype(np.int64)
    return positions, states


@pytest.mark.parametrize("system", SYSTEMS, ids=lambda s: f"{s.name}-{s.shape}")
def test_torch_rates_equal_numpy_reference_rates(system):
    positions, states = random_batch(system, 5, seed=3)
    log_rates = true_rate_model(system)(torch.as_tensor(positions), torch.as_tensor(states))
    assert log_rates.shape == (5, system.n_tokens, system.n_moves)
    assert log_rates.dtype == torch.float64
    for b in range(5):
        expected = reference.rates(system, positions[b], states[b])
        np.testing.assert_allclose(np.exp(log_rates[b].numpy()), expected, rtol=1e-15)
        assert np.array_equal(np.isneginf(log_rates[b].numpy()), expected == 0)


def test_blocked_hops_are_minus_infinity_and_forward_hops_get_v_plus():
    system = make_system("active", {"L": 4, "N": 2, "D": 0.1, "v_plus": 5.0, "v_other": 1.0})
    positions = torch.tensor([[[0, 0], [1, 0]]])  # token 1 sits at +x of token 0
    states = torch.tensor([[0, 2]])  # token 0 faces +x, token 1 faces -x: both face each other
    log_rates = ActiveRates(system)(positions, states)[0]
    assert log_rates[0, 2] == -np.inf and log_rates[1, 4] == -np.inf
    assert torch.allclose(log_rates[0, [0, 1]].exp(), torch.tensor([0.1, 0.1], dtype=torch.float64))
    assert torch.allclose(log_rates[1, 2].exp(), torch.tensor(1.0, dtype=torch.float64))  # +x, not forward
    assert torch.allclose(log_rates[0, 4].exp(), torch.tensor(1.0, dtype=torch.float64))  # -x of a +x particle
    types = ActiveRates(system).move_types(positions, states)[0]
    assert types[0].tolist() == [0, 0, 3, 2, 2, 2]
    assert types[1].tolist() == [0, 0, 2, 2, 3, 2]


def test_fa_rates_count_up_neighbours_on_a_chain():
    system = make_system("fa", {"L": 5, "dim": 1, "c": 0.25})
    positions = torch.tensor([[[x, 0] for x in range(5)]])
    states = torch.tensor([[1, 1, 0, 0, 0]])
    rates = true_rate_model(system)(positions, states)[0, :, 0].exp()
    # site 0: up, neighbours 4 (down) and 1 (up) -> m=1, rate 1*(1-c); site 2: down, m=1 -> c;
    # site 3: down, m=0 -> 0; site 4: down, neighbour 0 up -> c
    np.testing.assert_allclose(rates.numpy(), [0.75, 0.75, 0.25, 0.0, 0.25])


@pytest.mark.parametrize("system", SYSTEMS[:1] + SYSTEMS[2:], ids=lambda s: f"{s.name}-{s.shape}")
def test_replay_equals_applying_events_one_by_one(system):
    rng = np.random.default_rng(1)
    positions, states = system.initial_configuration(rng)
    tokens = rng.integers(0, system.n_tokens, 50)
    moves = rng.integers(0, system.n_moves, 50)
    replayed_positions, replayed_states = replay_segment(
        system, torch.as_tensor(positions), torch.as_tensor(states).long(), torch.as_tensor(tokens), torch.as_tensor(moves)
    )
    ly, lx = system.shape
    current_positions, current_states = positions.copy(), states.astype(np.int64)
    for k in range(50):
        assert np.array_equal(replayed_positions[k].numpy(), current_positions)
        assert np.array_equal(replayed_states[k].numpy(), current_states)
        dx, dy, dstate = system.move_table[moves[k]]
        token = tokens[k]
        current_positions[token] = ((current_positions[token, 0] + dx) % lx, (current_positions[token, 1] + dy) % ly)
        current_states[token] = (current_states[token] + dstate) % system.n_states
    end_positions, end_states = advance(
        system, torch.as_tensor(positions), torch.as_tensor(states).long(), torch.as_tensor(tokens), torch.as_tensor(moves)
    )
    assert np.array_equal(replayed_positions[50].numpy(), current_positions)
    assert np.array_equal(end_positions.numpy(), current_positions)
    assert np.array_equal(end_states.numpy(), current_states)
