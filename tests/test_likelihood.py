"""The path log-likelihood: a hand-computed case, segmentation invariance, and its maximum."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from hpcdyn.simulation import reference
from hpcdyn.storage.events import EventLog
from hpcdyn.learning.likelihood import iter_segments, path_log_likelihood
from hpcdyn.physics.rates import ActiveRates, true_rate_model
from hpcdyn.physics.replay import replay_segment
from hpcdyn.simulation.drivers import simulate, simulate_to_store
from hpcdyn.storage.trajectory_store import open_trajectory
from hpcdyn.physics.systems import make_system


def test_hand_built_trajectory_matches_the_formula():
    """Two particles on a 3x3 torus, three events, censored tail; U from DESIGN 1.3 by hand."""
    system = make_system("active", {"L": 3, "N": 2, "D": 0.2, "v_plus": 3.0, "v_other": 0.5})
    positions = np.array([[0, 0], [2, 0]])
    states = np.array([0, 1], dtype=np.int8)
    # event 0: token 0 rotates +1 (now faces +y); event 1: token 0 hops +y (forward);
    # event 2: token 1 hops -x onto (1, 0).
    events = EventLog(
        system, 2.0, positions, states,
        np.array([0, 0, 1], np.int32), np.array([0, 3, 4], np.int8), np.array([0.3, 0.5, 0.1]),
    )  # fmt: skip
    D, vp, vo = 0.2, 3.0, 0.5
    # C0: token 0 at (0,0) facing +x: its -x neighbour (2,0) is token 1 -> blocked; +x free (forward).
    #     token 1 at (2,0) facing +y: its +x neighbour (0,0) is token 0 -> blocked; +y forward.
    escape_0 = 4 * D + (vp + 2 * vo) + (vp + 2 * vo)
    # C1: token 0 faces +y: +x free (other), +y free (forward), -x blocked, -y free (other).
    escape_1 = 4 * D + (vp + 2 * vo) + (vp + 2 * vo)
    # C2: token 0 at (0,1); token 1 at (2,0) no longer blocked by anything.
    escape_2 = 4 * D + (vp + 3 * vo) + (vp + 3 * vo)
    # C3: token 1 at (1,0): neighbours (2,0) (1,1) (0,0) (1,2), none occupied; token 0 at (0,1)
    #     neighbours (1,1) (0,2) (2,1) (0,0), none occupied.
    escape_3 = 4 * D + (vp + 3 * vo) + (vp + 3 * vo)
    expected = (
        math.log(D) - 0.3 * escape_0
        + math.log(vp) - 0.5 * escape_1
        + math.log(vo) - 0.1 * escape_2
        - (2.0 - 0.9) * escape_3
    )  # fmt: skip
    result = path_log_likelihood(events, true_rate_model(system))
    assert result.log_likelihood == pytest.approx(expected, rel=1e-14)
    assert result.tail == pytest.approx(1.1)
    assert result.n_events == 3


@pytest.mark.parametrize("segment_events", [1, 7, 333, 100_000])
def test_segmentation_does_not_change_u(segment_events):
    system = make_system("active", {"L": 10, "density": 0.35})
    events = simulate(system, 3.0, seed=1).events
    result = path_log_likelihood(events, true_rate_model(system), segment_events=segment_events)
    assert result.log_likelihood == pytest.approx(events.log_likelihood, rel=1e-10)


def test_segments_crossing_storage_chunks(tmp_path):
    system = make_system("fa", {"L": 16, "dim": 2, "c": 0.4})
    path = simulate_to_store(system, 10.0, seed=2, out=tmp_path / "fa.zarr", chunk_events=250)
    trajectory = open_trajectory(path)
    assert trajectory.n_events > 1500
    result = path_log_likelihood(trajectory, true_rate_model(system), segment_events=97, block_events=300)
    assert result.log_likelihood == pytest.approx(trajectory.log_likelihood, rel=1e-10)


def test_no_event_is_all_tail():
    system = make_system("active", {"L": 5, "N": 3, "D": 0.0, "v_plus": 0.0, "v_other": 0.0})
    rng = np.random.default_rng(0)
    positions, states = system.initial_configuration(rng)
    empty = EventLog(system, 4.0, positions, states, np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0))
    assert path_log_likelihood(empty, true_rate_model(system)).log_likelihood == 0.0
    busy = dataclasses.replace(system, D=0.5)
    assert path_log_likelihood(empty, true_rate_model(busy)).log_likelihood == pytest.approx(-4.0 * 0.5 * 6)


def test_reference_simulator_log_likelihood_agrees():
    system = make_system("fa", {"L": 8, "dim": 1, "c": 0.35})
    events = reference.simulate_reference(system, 50.0, seed=3)
    result = path_log_likelihood(events, true_rate_model(system))
    assert result.log_likelihood == pytest.approx(events.log_likelihood, rel=1e-10)


def forward_hop_statistics(events):
    """Number of forward hops taken, and the time integral of the number of forward hops open."""
    system = events.system
    model = ActiveRates(system)
    exposure, count, open_forward = 0.0, 0, None
    for positions, states, tokens, moves, dwell in iter_segments(events, 4000):
        configurations = replay_segment(system, positions, states, tokens, moves)
        types = model.move_types(*configurations)
        open_forward = (types == ActiveRates.FORWARD_HOP).sum((1, 2)).double()
        exposure += float((open_forward[:-1] * dwell).sum())
        taken = types[:-1][torch.arange(len(tokens)), tokens.long(), moves.long()]
        count += int((taken == ActiveRates.FORWARD_HOP).sum())
    exposure += float(open_forward[-1]) * (events.t_final - events.dwell.sum())
    return count, exposure


def test_the_likelihood_maximum_recovers_the_true_rate():
    """U(v_plus) = n ln v_plus - v_plus * A + const, so its maximum is v_plus* = n / A.

    The closed-form estimate is within 3 % of the truth (about 3 standard errors at ~12 000
    forward hops), and a scan of U over a grid peaks at the grid point nearest to it.
    """
    system = make_system("active", {"L": 10, "density": 0.2, "D": 0.4, "v_plus": 4.0, "v_other": 1.0})
    events = simulate(system, 200.0, seed=12).events
    count, exposure = forward_hop_statistics(events)
    estimate = count / exposure
    assert count > 10_000
    assert estimate == pytest.approx(4.0, rel=0.03)
    grid = np.array([3.6, 3.8, 4.0, 4.2, 4.4])
    scan = [
        path_log_likelihood(events, true_rate_model(dataclasses.replace(system, v_plus=value))).log_likelihood
        for value in grid
    ]
    assert grid[int(np.argmax(scan))] == grid[int(np.argmin(np.abs(grid - estimate)))]
