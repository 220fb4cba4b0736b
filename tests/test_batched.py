"""The batched lock-step simulator: its random streams, exactness, snapshots, overlaps, and its
statistics against the compiled simulator.

Statistical tests use fixed seeds, so each is deterministic; the stated thresholds are the rate at
which a correct sampler would fail for an arbitrary seed.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from hpcdyn.simulation.batched import NonFiniteRateError, replica_streams, simulate_batched, snapshot_grid, uniforms
from hpcdyn.learning.likelihood import iter_segments
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.replay import replay_segment
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates

from conftest import dense_generator, state_key
from test_simulator import TINY, TINY_IDS, distribution_p_values, tiny_start

P_THRESHOLD = 1e-3


def starts(system, seed, case, replicas):
    """Initial configurations and keys of replicas 0..replicas-1, as an ensemble derives them."""
    streams = [replica_streams(seed, case, replica) for replica in range(replicas)]
    configurations = [system.initial_configuration(stream.configuration) for stream in streams]
    positions = np.stack([positions for positions, _ in configurations])
    states = np.stack([states for _, states in configurations]).astype(np.int64)
    return positions, states, np.array([stream.key for stream in streams])


def splitmix64(key: int, counter: int) -> float:
    """SplitMix64 of key + counter * gamma in plain Python integers (modulo 2^64)."""
    mask = (1 << 64) - 1
    z = (key + counter * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


def test_counter_stream_is_splitmix64_bit_for_bit():
    keys = [0, 1, -1, 2**62 + 12345, -(2**63), replica_streams(5, 9, 3).key]
    tensor = torch.tensor(keys, dtype=torch.long)
    for counter in (0, 1, 7, 2**40 + 3):
        expected = [splitmix64(key & ((1 << 64) - 1), counter) for key in keys]
        assert uniforms(tensor, counter).tolist() == expected


def test_counter_stream_is_uniform_and_replicas_are_independent():
    keys = torch.tensor([replica_streams(1, 2, replica).key for replica in range(1000)])
    draws = torch.stack([uniforms(keys, counter) for counter in range(100)]).numpy()  # [counter, replica]
    assert draws.min() >= 0 and draws.max() < 1
    assert scipy.stats.kstest(draws.reshape(-1), "uniform").pvalue > P_THRESHOLD
    correlation = np.corrcoef(draws[:, :-1].reshape(-1), draws[:, 1:].reshape(-1))[0, 1]
    assert abs(correlation) < 4 / math.sqrt(draws[:, 1:].size)  # neighbouring replicas: 4 standard errors


def test_a_replica_does_not_depend_on_its_batch():
    system = make_system("active", {"L": 10, "density": 0.3})
    positions, states, keys = starts(system, seed=4, case=1, replicas=4)
    times = snapshot_grid(3.0, 0.5)
    model = true_rate_model(system)
    together = simulate_batched(model, system, positions, states, keys, 3.0, times)
    for part in (slice(0, 1), slice(1, 3), slice(3, 4)):
        alone = simulate_batched(model, system, positions[part], states[part], keys[part], 3.0, times, sync_every=5)
        assert np.array_equal(alone.occupancy, together.occupancy[part])
        assert np.array_equal(alone.move_counts, together.move_counts[part])
        assert np.array_equal(alone.final_positions, together.final_positions[part])
    assert together.events.min() > 100


def test_snapshots_are_the_configuration_at_each_grid_time():
    """Replaying the recorded events up to each snapshot time rebuilds the snapshot exactly.

    Slow rates make many dwell times longer than the snapshot interval (several snapshots per step).
    """
    system = make_system("active", {"L": 6, "N": 9, "D": 0.05, "v_plus": 0.4, "v_other": 0.1})
    positions, states, keys = starts(system, seed=2, case=0, replicas=3)
    times = snapshot_grid(30.0, 0.25, start=2.0)
    result = simulate_batched(true_rate_model(system), system, positions, states, keys, 30.0, times, record_events=True)
    assert np.allclose(result.snapshot_times, 2.0 + 0.25 * np.arange(113))
    for replica, log in enumerate(result.event_logs):
        event_times = np.cumsum(log.dwell)
        assert np.sum(np.diff(np.searchsorted(event_times, times)) == 0) > 20  # long gaps are exercised
        steps = system.move_table
        current_positions, current_states, applied = positions[replica].copy(), states[replica].copy(), 0
        for index, when in enumerate(times):
            while applied < log.n_events and event_times[applied] <= when:
                dx, dy, dstate = steps[log.moves[applied]]
                token = log.tokens[applied]
                current_positions[token] = (current_positions[token] + (dx, dy)) % system.L
                current_states[token] = (current_states[token] + dstate) % 4
                applied += 1
            grid = np.zeros((system.L, system.L), np.int8)
            grid[current_positions[:, 1], current_positions[:, 0]] = 1 + current_states
            assert np.array_equal(result.occupancy[replica, index], grid), (replica, index)
        assert applied == log.n_events == result.events[replica]


class LeakyRates(torch.nn.Module):
    """The true rates, but hops onto occupied sites get a positive rate, as a learned model's do."""

    def __init__(self, system, leak: float):
        super().__init__()
        self.truth, self.leak, self.n_moves = true_rate_model(system), math.log(leak), system.n_moves

    def forward(self, positions, states):
        log_rates = self.truth(positions, states)
        return torch.where(torch.isinf(log_rates), torch.full_like(log_rates, self.leak), log_rates)


def final_distribution_p_values(system, model, replicas=20000, t=0.8, **options):
    generator, index, all_positions, all_states = dense_generator(system)
    positions, states = tiny_start(system)
    exact = scipy.linalg.expm(generator * t)[index[state_key(positions, states)]]
    keys = np.array([replica_streams(11, 0, replica).key for replica in range(replicas)])
    batch_positions = np.broadcast_to(positions, (replicas, *positions.shape)).copy()
    batch_states = np.broadcast_to(states.astype(np.int64), (replicas, len(states))).copy()
    result = simulate_batched(model, system, batch_positions, batch_states, keys, t, **options)
    counts = np.zeros(len(index))
    for final_positions, final_states in zip(result.final_positions, result.final_states):
        counts[index[state_key(final_positions, final_states)]] += 1
    return distribution_p_values(system, counts, exact, all_positions, all_states), result


@pytest.mark.parametrize("system", [TINY[1], TINY[2], TINY[3]], ids=[TINY_IDS[1], TINY_IDS[2], TINY_IDS[3]])
def test_state_distribution_matches_exp_qt(system):
    """20 000 lock-step replicas of a tiny system against the exact distribution exp(Qt)."""
    p_values, _ = final_distribution_p_values(system, true_rate_model(system))
    assert min(p_values) > P_THRESHOLD / len(p_values), p_values  # Bonferroni over the tests


def test_rejecting_moves_onto_occupied_sites_is_exactly_the_true_dynamics():
    """A draw rejected is a self-loop: the leaky model with rejection has the true law, exp(Qt)."""
    system = TINY[1]
    p_values, result = final_distribution_p_values(system, LeakyRates(system, leak=1.5))
    assert min(p_values) > P_THRESHOLD / len(p_values), p_values
    assert result.rejected.sum() > 1000  # rejections happened
    # The rejected count is a sum of Bernoulli draws with the reported mass: within 4 standard errors.
    expected = (result.rejected_mass * result.draws).sum()
    assert abs(result.rejected.sum() - expected) < 4 * math.sqrt(expected)


def test_overlaps_are_rejected_by_default_and_recorded_when_kept():
    system = make_system("active", {"L": 8, "density": 0.4, "D": 0.2, "v_plus": 3.0, "v_other": 1.0})
    positions, states, keys = starts(system, seed=3, case=2, replicas=6)
    times = snapshot_grid(4.0, 0.5)
    model = LeakyRates(system, leak=0.2)
    rejected = simulate_batched(model, system, positions, states, keys, 4.0, times)
    assert rejected.rejected.min() > 0 and rejected.overlap_events.sum() == 0
    assert (rejected.rejected_mass > 0).all() and (rejected.rejected_mass < 1).all()
    assert rejected.overlaps.max() == 0
    assert ((rejected.occupancy > 0).sum((2, 3)) == system.N).all()
    assert rejected.draws.tolist() == (rejected.events + rejected.rejected).tolist()
    kept = simulate_batched(model, system, positions, states, keys, 4.0, times, reject_overlaps=False)
    assert kept.rejected.sum() == 0 and kept.overlap_events.min() > 0
    assert kept.overlaps.max() > 0
    assert np.array_equal(kept.overlaps, system.N - (kept.occupancy > 0).sum((2, 3)))
    final_sites = kept.final_positions[..., 1] * system.L + kept.final_positions[..., 0]
    distinct = np.array([len(np.unique(sites)) for sites in final_sites])
    assert np.array_equal(kept.overlaps[:, -1], system.N - distinct)  # last snapshot is at t_final


def f4(occupancy: np.ndarray) -> np.ndarray:
    """Fraction of particles whose four neighbour sites are all occupied, per snapshot [..., y, x]."""
    occupied = occupancy > 0
    surrounded = occupied.copy()
    for shift, axis in ((1, -1), (-1, -1), (1, -2), (-1, -2)):
        surrounded &= np.roll(occupied, shift, axis=axis)
    return surrounded.sum((-2, -1)) / occupied.sum((-2, -1))


def type_fractions(log, rates):
    """Fractions of rotations, forward hops and other hops among a trajectory's events."""
    counts = np.zeros(4)
    for positions, states, tokens, moves, _ in iter_segments(log, 4000):
        configurations = replay_segment(log.system, positions, states, tokens, moves)
        taken = rates.move_types(*configurations)[:-1][torch.arange(len(tokens)), tokens.long(), moves.long()]
        counts += np.bincount(taken.numpy(), minlength=4)
    assert counts[3] == 0  # never a hop onto an occupied site
    return counts[:3] / counts.sum()


@pytest.mark.slow
def test_true_rates_in_the_batched_simulator_agree_with_the_compiled_simulator_at_density_0_3():
    """Event rate, move-type fractions and f4 over independent replicas agree within 4 standard errors."""
    system = make_system("active", {"L": 12, "density": 0.3}, preset="paper")
    rates, t_final, replicas = true_rate_model(system), 8.0, 16
    times = snapshot_grid(t_final, 0.5)
    positions, states, keys = starts(system, seed=7, case=0, replicas=replicas)
    batched = simulate_batched(rates, system, positions, states, keys, t_final, times, record_events=True)
    assert batched.rejected.sum() == 0 and batched.rejected_mass.max() == 0

    def statistics(log, grids):
        return np.concatenate([[log.n_events / t_final], type_fractions(log, rates), [f4(grids).mean()]])

    ours = np.array([statistics(log, grids) for log, grids in zip(batched.event_logs, batched.occupancy)])
    runs = [simulate(system, t_final, seed=300 + k, snapshot_every=0.5) for k in range(replicas)]
    compiled = np.array([statistics(run.events, run.snapshot_grids) for run in runs])
    assert ours[:, 0].mean() > 300 and ours[:, -1].mean() > 0.02  # the test has power
    difference = ours.mean(0) - compiled.mean(0)
    standard_error = np.sqrt(ours.var(0, ddof=1) / replicas + compiled.var(0, ddof=1) / replicas)
    assert np.all(np.abs(difference) < 4 * standard_error), (difference, standard_error)


def test_a_transformer_runs_in_lock_step_on_its_own_lattice_only():
    torch.manual_seed(0)
    model = TransformerRates(TransformerConfig(lattice_size=8, d_model=16, n_heads=2, n_layers=1, d_ff=32)).eval()
    system = make_system("active", {"L": 8, "density": 0.3})
    positions, states, keys = starts(system, seed=1, case=0, replicas=3)
    result = simulate_batched(model, system, positions, states, keys, 0.5, snapshot_grid(0.5, 0.25))
    assert result.occupancy.shape == (3, 3, 8, 8) and result.events.min() > 0
    assert result.rejected.min() > 0  # an untrained model puts rate on blocked hops
    assert ((result.occupancy > 0).sum((2, 3)) == system.N).all()
    other = make_system("active", {"L": 10, "density": 0.3})
    positions, states, keys = starts(other, seed=1, case=0, replicas=1)
    with pytest.raises(ConfigurationError, match="L: the model was trained on a 8 x 8 lattice"):
        simulate_batched(model, other, positions, states, keys, 0.5)


def test_bad_times_are_refused_by_name():
    with pytest.raises(ConfigurationError, match="snapshot_every"):
        snapshot_grid(1.0, -0.5)
    with pytest.raises(ConfigurationError, match="burn_in"):
        snapshot_grid(1.0, 0.5, start=2.0)
    system = make_system("active", {"L": 4, "N": 2})
    positions, states, keys = starts(system, seed=1, case=0, replicas=1)
    with pytest.raises(ConfigurationError, match="t_final"):
        simulate_batched(true_rate_model(system), system, positions, states, keys, -1.0)


class WithoutMasks(torch.nn.Module):
    """The same rate model, rebuilding its attention masks in every forward pass (no attention_masks)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.n_moves, self.config = model, model.n_moves, model.config

    def forward(self, positions, states):
        return self.model(positions, states)


@pytest.mark.parametrize("stencil", [None, "block3"])
def test_masks_updated_per_event_give_the_same_trajectories_as_masks_rebuilt(stencil):
    """Masks kept current one row and column per event reproduce, draw for draw, the run whose
    forward pass rebuilds them; overlaps kept, so tokens sharing a site are exercised too."""
    extra = {"attention_stencil": stencil, "rotary": False} if stencil else {}
    config = TransformerConfig(lattice_size=8, d_model=16, n_heads=2, n_layers=2, d_ff=16, **extra)
    torch.manual_seed(0)
    model = TransformerRates(config).double().eval()
    with torch.no_grad():
        for block in model.blocks:  # offset scores of order 1: the masks shape the rates
            block.attention.offset_bias.normal_(0.0, 0.1)
    system = make_system("active", {"L": 8, "density": 0.3})
    positions, states, keys = starts(system, seed=5, case=0, replicas=3)
    times = snapshot_grid(1.0, 0.25)
    runs = [simulate_batched(rates, system, positions, states, keys, 1.0, times, reject_overlaps=False, record_events=True)
            for rates in (model, WithoutMasks(model))]  # fmt: skip
    updated, rebuilt = runs
    assert updated.events.min() > 50 and updated.overlap_events.sum() > 0
    assert np.array_equal(updated.occupancy, rebuilt.occupancy)
    for ours, theirs in zip(updated.event_logs, rebuilt.event_logs):
        assert np.array_equal(ours.tokens, theirs.tokens) and np.array_equal(ours.moves, theirs.moves)
        assert np.array_equal(ours.dwell, theirs.dwell)


def test_a_model_with_nan_weights_stops_with_a_clear_error():
    """A NaN clock never reaches t_final: without the check the run would never end."""
    model = TransformerRates(TransformerConfig(lattice_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=8)).eval()
    with torch.no_grad():
        model.blocks[0].attention.qkv.weight.fill_(float("nan"))
    system = make_system("active", {"L": 8, "density": 0.3})
    positions, states, keys = starts(system, seed=1, case=0, replicas=2)
    with pytest.raises(NonFiniteRateError, match="^rates: .*non-finite.*2 of 2 replicas .*step 0"):
        simulate_batched(model, system, positions, states, keys, 10.0, sync_every=4)
    assert issubclass(NonFiniteRateError, ConfigurationError)  # the command line reports it, exit status 2


def test_an_infinite_rate_stops_with_a_clear_error():
    """An infinite rate gives zero dwell times: the clock would never advance."""
    system = make_system("active", {"L": 6, "N": 4})

    class Infinite(LeakyRates):
        def forward(self, positions, states):
            log_rates = super().forward(positions, states).clone()
            log_rates[1:, 0, 0] = math.inf  # replicas 1 and 2 only
            return log_rates

    positions, states, keys = starts(system, seed=1, case=0, replicas=3)
    with pytest.raises(NonFiniteRateError, match="2 of 3 replicas .*replica 1"):
        simulate_batched(Infinite(system, 0.1), system, positions, states, keys, 5.0)
