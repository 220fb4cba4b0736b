"""The compiled simulator: determinism, exact likelihood, and its statistics against exact results.

Statistical tests use fixed seeds, so each is deterministic; the stated p-value threshold is the
rate at which a correct sampler would fail for an arbitrary seed.
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from hpcdyn.simulation.compiled import CompiledSimulator
from hpcdyn.learning.likelihood import iter_segments, path_log_likelihood, segment_terms
from hpcdyn.physics.replay import replay_segment
from hpcdyn.physics.rates import ActiveRates, true_rate_model
from hpcdyn.simulation.reference import simulate_reference
from hpcdyn.simulation.drivers import simulate, start
from hpcdyn.physics.systems import make_system

from conftest import dense_generator, state_key

P_THRESHOLD = 1e-3  # a correct sampler fails one such test in a thousand seeds


def test_same_seed_same_trajectory_different_seed_different():
    system = make_system("active", {"L": 12, "density": 0.3})
    first, second = simulate(system, 20.0, seed=5), simulate(system, 20.0, seed=5)
    other = simulate(system, 20.0, seed=6)
    assert np.array_equal(first.events.tokens, second.events.tokens)
    assert np.array_equal(first.events.dwell, second.events.dwell)
    assert first.events.n_events != other.events.n_events or not np.array_equal(first.events.dwell, other.events.dwell)


@pytest.mark.parametrize("system_name, params", [("active", {"L": 10, "density": 0.4}), ("fa", {"L": 6, "dim": 2})])
def test_chunk_sizes_do_not_change_the_trajectory(system_name, params):
    system = make_system(system_name, params)
    whole = simulate(system, 30.0, seed=2, snapshot_every=0.5)
    pieces = simulate(system, 30.0, seed=2, snapshot_every=0.5, chunk_events=97)
    for name in ("tokens", "moves", "dwell"):
        assert np.array_equal(getattr(whole.events, name), getattr(pieces.events, name))
    assert np.array_equal(whole.snapshot_grids, pieces.snapshot_grids)
    assert len(whole.snapshot_times) == 61  # 0, 0.5, ..., 30
    np.testing.assert_allclose(whole.snapshot_times, np.arange(61) * 0.5)


def test_snapshot_buffer_overflow_does_not_change_the_trajectory():
    system = make_system("active", {"L": 8, "N": 5, "D": 0.01, "v_plus": 0.02, "v_other": 0.01})
    rng = np.random.default_rng(4)
    positions, states = system.initial_configuration(rng)
    small = CompiledSimulator(system, positions, states, np.random.default_rng(9), 50.0, 0.01, snapshot_chunk=3)
    times = np.concatenate([chunk.snapshot_times.copy() for chunk in small.chunks()])
    large = simulate_direct(system, positions, states, 9, 50.0, 0.01)
    np.testing.assert_allclose(times, np.arange(5001) * 0.01)
    assert small.log_likelihood == large.log_likelihood


def simulate_direct(system, positions, states, seed, t_final, snapshot_every=None):
    simulator = CompiledSimulator(system, positions, states, np.random.default_rng(seed), t_final, snapshot_every)
    for _ in simulator.chunks():
        pass
    return simulator


@pytest.mark.parametrize(
    "system",
    [
        make_system("active", preset="paper"),
        make_system("active", {"density": 0.5}, preset="paper"),
        make_system("fa", {"L": 500, "dim": 1, "c": 0.4}),
        make_system("fa", {"L": 30, "dim": 2, "c": 0.2}),
    ],
    ids=["active-paper", "active-0.5", "fa-chain", "fa-square"],
)
def test_running_log_likelihood_equals_recomputation(system):
    run = simulate(system, 20.0, seed=11)
    assert run.events.n_events > 1000
    recomputed = path_log_likelihood(run.events, true_rate_model(system), segment_events=1000)
    assert recomputed.log_likelihood == pytest.approx(run.events.log_likelihood, rel=1e-9)


@pytest.mark.parametrize("system_name, params", [("active", {"L": 12, "density": 0.45}), ("fa", {"L": 10, "dim": 2})])
def test_class_lists_stay_consistent_with_the_configuration(system_name, params):
    """After many local updates, the class lists equal those built from scratch on the final state."""
    system = make_system(system_name, params)
    evolved, _, _ = start(system, 50.0, seed=3)
    for _ in evolved.chunks():
        pass
    positions, states = evolved.configuration()
    fresh = CompiledSimulator(system, positions, states, np.random.default_rng(0), 1.0)
    assert np.array_equal(evolved.count, fresh.count)
    assert np.array_equal(evolved.class_of, fresh.class_of)
    for c in range(len(fresh.count)):
        members = evolved.members[c, : evolved.count[c]]
        assert sorted(members) == sorted(fresh.members[c, : fresh.count[c]])
        assert np.array_equal(evolved.slot[members], np.arange(len(members)))
    log_rates = true_rate_model(system)(torch.as_tensor(positions)[None], torch.as_tensor(states).long()[None])
    assert evolved.escape_rate() == pytest.approx(float(log_rates.exp().sum()), rel=1e-12)


def per_event_terms(events):
    system = events.system
    model = true_rate_model(system)
    escape, probabilities = [], []
    for positions, states, tokens, moves, dwell in iter_segments(events, 2000):
        terms = segment_terms(model, system, positions, states, tokens, moves, dwell)
        escape.append(terms.escape_rate)
        if isinstance(model, ActiveRates):
            configurations = replay_segment(system, positions, states, tokens, moves)
            types = model.move_types(*configurations)[:-1]
            rates = model(*configurations)[:-1].exp()
            by_type = torch.stack([(rates * (types == t)).sum((1, 2)) for t in range(3)], 1)
            probabilities.append(by_type / terms.escape_rate[:, None])
    return torch.cat(escape).numpy(), (torch.cat(probabilities).numpy() if probabilities else None)


@pytest.mark.parametrize("system_name, params", [("active", {"L": 20, "density": 0.3}), ("fa", {"L": 600, "dim": 1, "c": 0.4})])
def test_dwell_times_are_exponential_with_the_escape_rate(system_name, params):
    system = make_system(system_name, params)
    events = simulate(system, 30.0, seed=21).events
    escape, _ = per_event_terms(events)
    scaled = events.dwell * escape  # Exp(1) if dwell ~ Exp(R(C_k))
    assert len(scaled) > 5000
    assert scipy.stats.kstest(scaled, "expon").pvalue > P_THRESHOLD


def test_move_fractions_match_the_rates_chi_square():
    system = make_system("active", {"L": 20, "density": 0.3, "D": 0.5, "v_plus": 3.0, "v_other": 1.0})
    events = simulate(system, 40.0, seed=8).events
    _, probabilities = per_event_terms(events)
    expected = probabilities.sum(0)  # sum over events of P(type | C_k)
    rates = true_rate_model(system)
    types = []
    for positions, states, tokens, moves, _ in iter_segments(events, 2000):
        configurations = replay_segment(system, positions, states, tokens, moves)
        all_types = rates.move_types(*configurations)[:-1]
        types.append(all_types[torch.arange(len(tokens)), tokens.long(), moves.long()])
    observed = np.bincount(torch.cat(types).numpy(), minlength=4)
    assert observed[3] == 0  # never a hop onto an occupied site
    statistic = ((observed[:3] - expected) ** 2 / expected).sum()
    assert scipy.stats.chi2.sf(statistic, df=2) > P_THRESHOLD
    assert expected.min() > 1000  # the test has power


def final_state_histogram(simulate_final, index, replicas):
    counts = np.zeros(len(index))
    for replica in range(replicas):
        positions, states = simulate_final(replica)
        counts[index[state_key(positions, states)]] += 1
    return counts


def chi_square_against(counts, probabilities):
    """Goodness of fit, pooling states whose expected count is below 5 into one bin."""
    expected = probabilities * counts.sum()
    small = expected < 5
    observed_bins = np.append(counts[~small], counts[small].sum())
    expected_bins = np.append(expected[~small], expected[small].sum())
    keep = expected_bins > 0
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum()
    return scipy.stats.chi2.sf(statistic, df=keep.sum() - 1)


def distribution_p_values(system, counts, exact, positions, states):
    """p-values of the full state distribution and of each token's (site, state) marginal.

    The marginals have far fewer bins than the joint distribution, so they carry the power
    against a wrong rate (a 15 % error in any one rate fails them at 40 000 replicas).
    """
    p_values = [chi_square_against(counts, exact)]
    lx = system.shape[1]
    for token in range(min(positions.shape[1], 2)):
        site = positions[:, token, 1] * lx + positions[:, token, 0]
        marginal = site * system.n_states + states[:, token]
        size = marginal.max() + 1
        p_values.append(
            chi_square_against(np.bincount(marginal, counts, size), np.bincount(marginal, exact, size))
        )
    return p_values


TINY = [
    make_system("active", {"L": 3, "N": 1, "D": 0.7, "v_plus": 2.0, "v_other": 0.5}),
    make_system("active", {"L": 3, "N": 2, "D": 0.7, "v_plus": 2.0, "v_other": 0.5}),
    make_system("fa", {"L": 8, "dim": 1, "c": 0.35}),
    make_system("fa", {"L": 3, "dim": 2, "c": 0.6}),
]
TINY_IDS = ["active-1", "active-2", "fa-chain-8", "fa-square-3"]


def tiny_start(system):
    if system.name == "active":
        return np.array([[0, 0], [1, 1]])[: system.N], np.array([0, 3])[: system.N].astype(np.int8)
    sites = np.arange(system.n_tokens)
    ly, lx = system.shape
    spins = (sites % 3 == 0).astype(np.int8)
    return np.stack([sites % lx, sites // lx], axis=1), spins


@pytest.mark.slow
@pytest.mark.parametrize("system", TINY, ids=TINY_IDS)
def test_compiled_state_distribution_matches_exp_qt(system):
    generator, index, all_positions, all_states = dense_generator(system)
    positions, states = tiny_start(system)
    t = 0.8
    exact = scipy.linalg.expm(generator * t)[index[state_key(positions, states)]]

    def final(replica):
        return simulate_direct(system, positions, states, replica, t).configuration()

    counts = final_state_histogram(final, index, replicas=40000)
    p_values = distribution_p_values(system, counts, exact, all_positions, all_states)
    assert min(p_values) > P_THRESHOLD / len(p_values), p_values  # Bonferroni over the tests


@pytest.mark.slow
@pytest.mark.parametrize("system", [TINY[1], TINY[2]], ids=[TINY_IDS[1], TINY_IDS[2]])
def test_reference_state_distribution_matches_exp_qt(system):
    generator, index, all_positions, all_states = dense_generator(system)
    positions, states = tiny_start(system)
    t = 0.8
    exact = scipy.linalg.expm(generator * t)[index[state_key(positions, states)]]
    table, (ly, lx) = system.move_table, system.shape

    def final(replica):
        log = simulate_reference(system, t, seed=replica, initial=(positions.copy(), states.copy()))
        end_positions, end_states = positions.copy(), states.astype(np.int64)
        for token, move in zip(log.tokens, log.moves):
            dx, dy, dstate = table[move]
            end_positions[token] = ((end_positions[token, 0] + dx) % lx, (end_positions[token, 1] + dy) % ly)
            end_states[token] = (end_states[token] + dstate) % system.n_states
        return end_positions, end_states

    counts = final_state_histogram(final, index, replicas=5000)
    p_values = distribution_p_values(system, counts, exact, all_positions, all_states)
    assert min(p_values) > P_THRESHOLD / len(p_values), p_values


@pytest.mark.slow
def test_compiled_and_reference_simulators_agree_at_density_0_3():
    """Event rate and move fractions over independent runs agree within 4 standard errors."""
    system = make_system("active", {"L": 10, "density": 0.3, "D": 0.5, "v_plus": 3.0, "v_other": 1.0})
    rates = true_rate_model(system)

    def statistics(events):
        fractions = np.zeros(3)
        for positions, states, tokens, moves, _ in iter_segments(events, 4000):
            configurations = replay_segment(system, positions, states, tokens, moves)
            taken = rates.move_types(*configurations)[:-1][torch.arange(len(tokens)), tokens.long(), moves.long()]
            fractions += np.bincount(taken.numpy(), minlength=4)[:3]
        return np.concatenate([[events.n_events / events.t_final], fractions / events.n_events])

    compiled = np.array([statistics(simulate(system, 20.0, seed=100 + k).events) for k in range(12)])
    plain = np.array([statistics(simulate_reference(system, 20.0, seed=200 + k)) for k in range(12)])
    difference = compiled.mean(0) - plain.mean(0)
    standard_error = np.sqrt(compiled.var(0, ddof=1) / 12 + plain.var(0, ddof=1) / 12)
    assert np.all(np.abs(difference) < 4 * standard_error), (difference, standard_error)
