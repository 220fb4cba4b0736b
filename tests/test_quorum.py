"""The quorum-sensing system (DESIGN 1.7): parameters, true rates, exact simulation, command line.

Statistical tests use fixed seeds, so each is deterministic; the stated p-value threshold is the
rate at which a correct sampler would fail for an arbitrary seed.
"""

import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats
import torch

from hpcdyn.cli import main
from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, resolve, run_ensemble, unit_system
from hpcdyn.storage.ensemble_store import open_ensemble, stored_config
from hpcdyn.learning.likelihood import iter_segments, path_log_likelihood, segment_terms
from hpcdyn.physics.environments import make_encoder, patch_configurations, patches, rate_family
from hpcdyn.physics.rates import ActiveRates, QuorumRates, true_rate_model
from hpcdyn.physics.replay import replay_segment
from hpcdyn.physics.systems import ConfigurationError, QuorumSystem, make_system
from hpcdyn.simulation.compiled import CompiledSimulator
from hpcdyn.simulation.drivers import simulate, simulate_to_store, start
from hpcdyn.simulation.reference import rates as reference_rates
from hpcdyn.simulation.reference import simulate_reference

P_THRESHOLD = 1e-3  # a correct sampler fails one such test in a thousand seeds


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "params, field",
    [
        ({"R": 0}, "R"),
        ({"R": 1.5}, "R"),
        ({"R": 15}, "R"),  # R < L/2 with L 30
        ({"L": 4, "N": 3, "R": 2}, "R"),  # a 5 x 5 block on a 4 x 4 lattice
        ({"q": -1}, "q"),
        ({"q": 25}, "q"),  # (2R+1)^2 - 1 = 24 with R 2
        ({"R": 1, "q": 9}, "q"),
        ({"q": 2.5}, "q"),
        ({"v_crowded": -1.0}, "v_crowded"),
        ({"v_crowded": float("nan")}, "v_crowded"),
        ({"v_plus": -1.0}, "v_plus"),
        ({"D": float("inf")}, "D"),
        ({"N": 901}, "N"),
        ({"radius": 2}, "radius"),
    ],
)
def test_invalid_parameters_are_refused_by_name(params, field):
    with pytest.raises(ConfigurationError) as error:
        make_system("quorum", params, preset="paper")
    assert str(error.value).startswith(f"{field}:"), str(error.value)


def test_presets_extend_the_active_paper_preset():
    paper, active = make_system("quorum", preset="paper"), make_system("active", preset="paper")
    assert isinstance(paper, QuorumSystem)
    assert (paper.L, paper.N, paper.D, paper.v_plus, paper.v_other) == (active.L, active.N, active.D, active.v_plus, active.v_other)
    assert (paper.R, paper.q, paper.v_crowded) == (2, 3, 5.0)
    small = make_system("quorum", preset="small")
    assert small.L == 12 and small.N == round(0.124 * 144) and small.R == 2
    assert make_system("quorum", {"L": 5, "density": 0.2, "R": 2, "q": 24}).N == 5  # the largest q and R allowed
    assert paper.params()["v_crowded"] == 5.0 and paper.n_moves == 6 and paper.n_states == 4


# ----------------------------------------------------------------------------- true rates
def random_configurations(system, count, seed):
    rng = np.random.default_rng(seed)
    taken = [system.initial_configuration(rng) for _ in range(count)]
    return np.stack([p for p, _ in taken]), np.stack([s for _, s in taken]).astype(np.int64)


@pytest.mark.parametrize("params", [{"L": 12, "density": 0.3, "R": 2, "q": 3}, {"L": 7, "density": 0.5, "R": 3, "q": 10},
                                    {"L": 10, "density": 0.2, "R": 1, "q": 0}])  # fmt: skip
def test_torch_rates_equal_the_numpy_reference(params):
    system = make_system("quorum", {**params, "D": 0.3, "v_plus": 7.0, "v_other": 1.5, "v_crowded": 2.0})
    positions, states = random_configurations(system, 20, seed=1)
    log_rates = true_rate_model(system)(torch.as_tensor(positions), torch.as_tensor(states))
    expected = np.stack([reference_rates(system, p, s) for p, s in zip(positions, states)])
    np.testing.assert_allclose(log_rates.exp().numpy(), expected, rtol=1e-12)
    assert set(np.unique(expected)) <= {0.0, 0.3, 7.0, 1.5, 2.0}


def test_only_crowded_forward_hops_differ_from_the_active_model():
    system = make_system("quorum", {"L": 12, "density": 0.3, "R": 2, "q": 4, "v_crowded": 3.0}, preset="paper")
    positions, states = (torch.as_tensor(array) for array in random_configurations(system, 10, seed=2))
    quorum, active = QuorumRates(system), ActiveRates(system)
    types, active_types = quorum.move_types(positions, states), active.move_types(positions, states)
    crowded = types == QuorumRates.CROWDED_HOP
    assert 0 < crowded.sum() < (active_types == ActiveRates.FORWARD_HOP).sum()  # the test has power both ways
    assert torch.all(active_types[crowded] == ActiveRates.FORWARD_HOP)
    assert torch.equal(types[~crowded], active_types[~crowded])
    assert torch.all(quorum(positions, states)[crowded] == np.log(3.0))
    assert quorum.type_names[QuorumRates.CROWDED_HOP] == "crowded_forward_hop"


@pytest.mark.parametrize("radius", [1, 2])
def test_true_rates_are_a_function_of_the_block_key_and_not_of_a_smaller_one(radius):
    """Each token's patch of its rate family, placed alone, gives its full-context rates; the
    nearest neighbours' key (vn1-occ) does not determine them."""
    system = make_system("quorum", {"L": 12, "density": 0.35, "R": radius, "q": 2 * radius}, preset="paper")
    assert rate_family(system) == f"block{2 * radius + 1}-occ"
    model = true_rate_model(system)
    positions, states = random_configurations(system, 8, seed=3)
    full = model(torch.as_tensor(positions), torch.as_tensor(states)).exp().numpy().reshape(-1, 6)

    def patch_rates(family):
        encoder = make_encoder(family, system)
        rows = patches(encoder, system, positions, states).reshape(-1, encoder.patch_width)
        placed = np.zeros_like(full)
        for index, patch_positions, patch_states, centre in patch_configurations(encoder, system, rows):
            log_rates = model(torch.as_tensor(patch_positions), torch.as_tensor(patch_states).long())
            placed[index] = log_rates[:, centre].exp().numpy()
        return placed

    np.testing.assert_allclose(patch_rates(rate_family(system)), full, rtol=1e-12)
    assert not np.allclose(patch_rates("vn1-occ"), full)


# ----------------------------------------------------------------------------- exact simulation
@pytest.mark.parametrize(
    "params, t_final",
    [
        ({"L": 30, "density": 0.124}, 20.0),
        ({"L": 30, "density": 0.5}, 4.0),
        ({"L": 12, "density": 0.124, "R": 1, "q": 1}, 200.0),
        ({"L": 9, "density": 0.3, "R": 4, "q": 6}, 200.0),  # the block covers the whole 9 x 9 lattice
    ],
    ids=["paper", "paper-0.5", "R1", "block-equals-lattice"],
)
def test_running_log_likelihood_equals_recomputation(params, t_final):
    system = make_system("quorum", params, preset="paper")
    run = simulate(system, t_final, seed=11)
    assert run.events.n_events > 5000
    recomputed = path_log_likelihood(run.events, true_rate_model(system), segment_events=1000)
    assert recomputed.log_likelihood == pytest.approx(run.events.log_likelihood, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    "params",
    [{"L": 12, "density": 0.45, "R": 2, "q": 8}, {"L": 5, "N": 8, "R": 2, "q": 5}, {"L": 6, "N": 9, "R": 2, "q": 4},
     {"L": 10, "density": 0.3, "R": 1, "q": 0}, {"L": 3, "N": 3, "R": 1, "q": 1}],
)  # fmt: skip
def test_class_lists_stay_consistent_with_the_configuration(params):
    """After many nonlocal updates, counts, classes and lists equal those built from scratch
    (L = 2R + 1 included: there the trailing and leading block edges are the same sites)."""
    system = make_system("quorum", {**params, "D": 0.5, "v_plus": 4.0, "v_other": 1.0, "v_crowded": 0.5})
    evolved, _, _ = start(system, 100.0, seed=3)
    assert sum(len(chunk.tokens) for chunk in evolved.chunks()) > 1000
    positions, states = evolved.configuration()
    fresh = CompiledSimulator(system, positions, states, np.random.default_rng(0), 1.0)
    assert np.array_equal(evolved.others, fresh.others)
    assert np.array_equal(evolved.count, fresh.count)
    assert np.array_equal(evolved.class_of, fresh.class_of)
    for c in range(len(fresh.count)):
        members = evolved.members[c, : evolved.count[c]]
        assert sorted(members) == sorted(fresh.members[c, : fresh.count[c]])
        assert np.array_equal(evolved.slot[members], np.arange(len(members)))
    escape = reference_rates(system, positions, states.astype(np.int64)).sum()
    assert evolved.escape_rate() == pytest.approx(escape, rel=1e-12)


def test_chunk_sizes_do_not_change_the_trajectory():
    system = make_system("quorum", {"L": 10, "density": 0.4, "R": 1, "q": 2})
    whole = simulate(system, 20.0, seed=2, snapshot_every=0.5)
    pieces = simulate(system, 20.0, seed=2, snapshot_every=0.5, chunk_events=97)
    for name in ("tokens", "moves", "dwell"):
        assert np.array_equal(getattr(whole.events, name), getattr(pieces.events, name))
    assert np.array_equal(whole.snapshot_grids, pieces.snapshot_grids)


def observed_and_expected_types(system, events):
    """Per-event move types taken, and the sum over events of P(type | C_k); dwell * escape rate."""
    model = true_rate_model(system)
    taken, expected, scaled = [], np.zeros(5), []
    for positions, states, tokens, moves, dwell in iter_segments(events, 2000):
        terms = segment_terms(model, system, positions, states, tokens, moves, dwell)
        configurations = replay_segment(system, positions, states, tokens, moves)
        types = model.move_types(*configurations)[:-1]
        rates = model(*configurations)[:-1].exp()
        expected += np.array([float((rates * (types == t)).sum((1, 2)).div(terms.escape_rate).sum()) for t in range(5)])
        taken.append(types[torch.arange(len(tokens)), tokens.long(), moves.long()])
        scaled.append((dwell * terms.escape_rate).numpy())
    return np.bincount(torch.cat(taken).numpy(), minlength=5), expected, np.concatenate(scaled)


def test_move_types_and_dwell_times_match_the_rates():
    """Chi-square of the move types taken (crowded forward hops included) and KS of dwell x escape rate."""
    system = make_system("quorum", {"L": 16, "density": 0.3, "D": 0.5, "v_plus": 3.0, "v_other": 1.0,
                                    "R": 2, "q": 7, "v_crowded": 0.8})  # fmt: skip
    events = simulate(system, 40.0, seed=8).events
    observed, expected, scaled = observed_and_expected_types(system, events)
    assert observed[ActiveRates.BLOCKED_HOP] == 0 and expected[ActiveRates.BLOCKED_HOP] == 0
    live = [0, 1, 2, 4]
    assert expected[live].min() > 1000  # the test has power, crowded hops included
    statistic = ((observed[live] - expected[live]) ** 2 / expected[live]).sum()
    assert scipy.stats.chi2.sf(statistic, df=3) > P_THRESHOLD
    assert scipy.stats.kstest(scaled, "expon").pvalue > P_THRESHOLD


def test_compiled_and_reference_simulators_agree():
    """Event rate and move-type fractions over independent runs agree within 4 standard errors."""
    system = make_system("quorum", {"L": 10, "density": 0.3, "D": 0.5, "v_plus": 3.0, "v_other": 1.0,
                                    "R": 1, "q": 2, "v_crowded": 0.6})  # fmt: skip

    def statistics(events):
        observed, _, _ = observed_and_expected_types(system, events)
        return np.concatenate([[events.n_events / events.t_final], observed[[0, 1, 2, 4]] / events.n_events])

    runs = 12
    compiled = np.array([statistics(simulate(system, 15.0, seed=100 + k).events) for k in range(runs)])
    plain = np.array([statistics(simulate_reference(system, 15.0, seed=200 + k)) for k in range(runs)])
    assert compiled[:, 4].mean() > 0.05  # crowded forward hops are a sizeable share of the events
    difference = compiled.mean(0) - plain.mean(0)
    standard_error = np.sqrt(compiled.var(0, ddof=1) / runs + plain.var(0, ddof=1) / runs)
    assert np.all(np.abs(difference) < 4 * standard_error), (difference, standard_error)


# ----------------------------------------------------------------------------- exp(Qt)
class TinyChain:
    """Every labelled configuration of a tiny quorum system and its sparse generator.

    A configuration's code is sum_t (site_t * 4 + o_t) * (4 L^2)^t; codes with two tokens on a site
    are not configurations and are left out of the index."""

    def __init__(self, system):
        self.system = system
        sites, n = system.L * system.L, system.N
        self.radix = 4 * sites
        codes = np.arange(self.radix**n)
        digits = (codes[:, None] // self.radix ** np.arange(n)) % self.radix  # [codes, N]
        site = digits // 4
        valid = np.array([len(set(row)) == n for row in site]) if n > 1 else np.ones(len(codes), bool)
        self.codes = codes[valid]
        self.index = np.full(len(codes), -1, np.int64)
        self.index[self.codes] = np.arange(len(self.codes))
        self.positions = np.stack([site[valid] % system.L, site[valid] // system.L], axis=-1)  # [S, N, 2]
        self.states = digits[valid] % 4

    def generator_transpose(self):
        """Q^T as a sparse matrix: column i holds the rates out of configuration i."""
        system, n = self.system, self.system.N
        model = true_rate_model(system)
        rows, columns, values = [], [], []
        for start in range(0, len(self.codes), 1 << 16):
            batch = slice(start, start + (1 << 16))
            positions, states = self.positions[batch], self.states[batch]
            rates = model(torch.as_tensor(positions), torch.as_tensor(states)).exp().numpy()  # [B, N, 6]
            for token in range(n):
                for move in range(6):
                    dx, dy, dstate = system.move_table[move]
                    moved_x = (positions[:, token, 0] + dx) % system.L
                    moved_y = (positions[:, token, 1] + dy) % system.L
                    moved_state = (states[:, token] + dstate) % 4
                    digit = (moved_y * system.L + moved_x) * 4 + moved_state
                    old = (positions[:, token, 1] * system.L + positions[:, token, 0]) * 4 + states[:, token]
                    target_codes = self.codes[batch] + (digit - old) * self.radix**token
                    live = rates[:, token, move] > 0
                    rows.append(self.index[target_codes[live]])
                    columns.append(np.arange(start, start + len(positions))[live])
                    values.append(rates[live, token, move])
        rows, columns, values = np.concatenate(rows), np.concatenate(columns), np.concatenate(values)
        assert (rows >= 0).all()  # no allowed move leads to an overlap
        size = len(self.codes)
        out = scipy.sparse.csc_matrix((values, (rows, columns)), shape=(size, size))
        return out - scipy.sparse.diags(np.asarray(out.sum(0)).ravel())

    def distribution(self, positions, states, t):
        start = np.zeros(len(self.codes))
        start[self.code_index(positions, states)] = 1.0
        exact = scipy.sparse.linalg.expm_multiply(self.generator_transpose() * t, start)
        return np.clip(exact, 0.0, None) / np.clip(exact, 0.0, None).sum()

    def code_index(self, positions, states):
        digit = (positions[:, 1] * self.system.L + positions[:, 0]) * 4 + np.asarray(states)
        return int(self.index[int((digit * self.radix ** np.arange(self.system.N)).sum())])


def chi_square_against(counts, probabilities):
    """Goodness of fit, pooling bins whose expected count is below 5 into one bin."""
    expected = probabilities * counts.sum()
    small = expected < 5
    observed_bins = np.append(counts[~small], counts[small].sum())
    expected_bins = np.append(expected[~small], expected[small].sum())
    keep = expected_bins > 0
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum()
    return scipy.stats.chi2.sf(statistic, df=keep.sum() - 1)


def p_values(chain, counts, exact):
    """The full distribution, each token's (site, state) marginal, and the marginal of the first two
    tokens' torus Chebyshev distance (what the quorum rule acts on) with the first one's orientation."""
    system = chain.system
    values = [chi_square_against(counts, exact)]
    for token in range(system.N):
        marginal = (chain.positions[:, token, 1] * system.L + chain.positions[:, token, 0]) * 4 + chain.states[:, token]
        values.append(chi_square_against(np.bincount(marginal, counts), np.bincount(marginal, exact)))
    gap = np.abs(chain.positions[:, 0] - chain.positions[:, 1])
    distance = np.minimum(gap, system.L - gap).max(-1)
    marginal = distance * 4 + chain.states[:, 0]
    values.append(chi_square_against(np.bincount(marginal, counts), np.bincount(marginal, exact)))
    return values


TINY = [
    make_system("quorum", {"L": 5, "N": 2, "R": 1, "q": 1, "D": 0.7, "v_plus": 2.0, "v_other": 0.5, "v_crowded": 0.3}),
    make_system("quorum", {"L": 5, "N": 3, "R": 1, "q": 2, "D": 0.7, "v_plus": 2.0, "v_other": 0.5, "v_crowded": 0.3}),
]
TINY_START = (np.array([[0, 0], [1, 1], [0, 2]]), np.array([0, 3, 1]))  # close enough to be crowded at once


@pytest.mark.slow
@pytest.mark.parametrize("system", TINY, ids=["5x5-N2-q1", "5x5-N3-q2"])
def test_compiled_state_distribution_matches_exp_qt(system):
    chain = TinyChain(system)
    positions, states = TINY_START[0][: system.N], TINY_START[1][: system.N].astype(np.int8)
    t = 0.8
    exact = chain.distribution(positions, states, t)
    counts = np.zeros(len(exact))
    for replica in range(20000):
        simulator = CompiledSimulator(system, positions, states, np.random.default_rng(replica), t, chunk_events=256)
        for _ in simulator.chunks():
            pass
        counts[chain.code_index(*simulator.configuration())] += 1
    values = p_values(chain, counts, exact)
    assert min(values) > P_THRESHOLD / len(values), values  # Bonferroni over the tests


@pytest.mark.slow
def test_reference_state_distribution_matches_exp_qt():
    system = TINY[0]
    chain = TinyChain(system)
    positions, states = TINY_START[0][:2], TINY_START[1][:2]
    t = 0.8
    exact = chain.distribution(positions, states, t)
    counts = np.zeros(len(exact))
    table = system.move_table
    for replica in range(3000):
        log = simulate_reference(system, t, seed=replica, initial=(positions.copy(), states.astype(np.int8)))
        end_positions, end_states = positions.copy(), states.astype(np.int64)
        for token, move in zip(log.tokens, log.moves):
            dx, dy, dstate = table[move]
            end_positions[token] = ((end_positions[token, 0] + dx) % system.L, (end_positions[token, 1] + dy) % system.L)
            end_states[token] = (end_states[token] + dstate) % 4
        counts[chain.code_index(end_positions, end_states)] += 1
    values = p_values(chain, counts, exact)
    assert min(values) > P_THRESHOLD / len(values), values


def test_the_tiny_generator_is_a_generator_and_knows_the_quorum():
    """Columns of Q^T sum to zero, and the crowded start's forward hop leaves at v_crowded."""
    system = TINY[0]
    chain = TinyChain(system)
    generator = chain.generator_transpose()
    assert len(chain.codes) == 25 * 24 * 16
    np.testing.assert_allclose(np.asarray(generator.sum(0)).ravel(), 0.0, atol=1e-12)
    positions, states = TINY_START[0][:2], TINY_START[1][:2]  # token 0 at (0,0) facing +x, token 1 at (1,1)
    here = chain.code_index(positions, states)
    moved = positions.copy()
    moved[0, 0] = 1  # token 0 hops +x along its orientation: crowded (one other in its 3 x 3 block, q 1)
    assert generator[chain.code_index(moved, states), here] == pytest.approx(system.v_crowded)
    apart = np.array([[0, 0], [3, 3]])
    moved_apart = apart.copy()
    moved_apart[0, 0] = 1
    assert generator[chain.code_index(moved_apart, states), chain.code_index(apart, states)] == pytest.approx(system.v_plus)


# ----------------------------------------------------------------------------- command line
def test_simulate_and_train_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "quorum.zarr"
    arguments = ["simulate", "--system", "quorum", "--preset", "small", "--R", "1", "--q", "2", "--v-crowded", "4",
                 "--t-final", "15", "--seed", "3", "--out", str(out)]  # fmt: skip
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["system"] == "quorum" and summary["n_events"] > 2000
    assert summary["params"]["R"] == 1 and summary["params"]["q"] == 2 and summary["params"]["v_crowded"] == 4.0
    assert main(["likelihood", str(out)]) == 0
    likelihood = json.loads(capsys.readouterr().out)
    assert likelihood["U"] == pytest.approx(likelihood["simulator_U"], rel=1e-9)
    for wrong in ("q=3", "R=2", "v_crowded=8"):  # the quorum's parameters, changed: a worse fit
        assert main(["likelihood", str(out), "--set", wrong]) == 0
        assert json.loads(capsys.readouterr().out)["U"] < likelihood["U"]
    assert main(["simulate", "--system", "quorum", "--q", "99", "--t-final", "1", "--out", str(tmp_path / "bad.zarr")]) == 2
    assert "q:" in capsys.readouterr().err
    assert main(["simulate", "--system", "fa", "--R", "1", "--t-final", "1", "--out", str(tmp_path / "fa.zarr")]) == 2
    assert "--R" in capsys.readouterr().err
    trained = ["train", str(out), "--out", str(tmp_path / "model"), "--epochs", "1", "--d-model", "16", "--n-heads", "2",
               "--n-layers", "1", "--d-ff", "32", "--segment-events", "128", "--mode", "2", "--n-classes", "5"]  # fmt: skip
    assert main(trained) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs"] == 1 and np.isfinite(result["best"]["val_U_per_T"])
    recorded = json.loads((tmp_path / "model" / "config.json").read_text())
    assert recorded["config"]["model"]["system"] == "quorum"
    # The trained model and the original dynamics forward-simulated side by side (in this process).
    config = EnsembleConfig(models=("original", str(tmp_path / "model")), densities=(0.124, 0.3), replicas=2,
                            t_final=1.0, snapshot_every=0.5, seed=1, engine="network")  # fmt: skip
    run_ensemble(config, tmp_path / "ensemble.zarr", Placement(in_process=True))
    stored = stored_config(tmp_path / "ensemble.zarr")
    assert stored["system"] == {"name": "quorum", "L": 12, "D": 0.1, "v_plus": 25.0, "v_other": 1.0, "R": 1, "q": 2,
                                "v_crowded": 4.0}  # the checkpoint's training values  # fmt: skip
    occupancy = open_ensemble(tmp_path / "ensemble.zarr")["occupancy"].values  # [model, density, replica, time, y, x]
    assert occupancy.shape == (2, 2, 2, 3, 12, 12)
    assert np.array_equal((occupancy[0] > 0).sum((-1, -2)), np.broadcast_to(np.array([18, 43])[:, None, None], (2, 2, 3)))


def test_ensemble_of_the_original_quorum_dynamics_and_its_refusals(tmp_path):
    config = EnsembleConfig(models=("original",), system="quorum", densities=(0.2,), replicas=2, t_final=2.0,
                            snapshot_every=1.0, L=10, R=1, q=2, v_crowded=3.0, seed=4)  # fmt: skip
    resolved = resolve(config)
    assert resolved["system"] == {"name": "quorum", "L": 10, "D": 0.1, "v_plus": 25.0, "v_other": 1.0, "R": 1, "q": 2,
                                  "v_crowded": 3.0}  # fmt: skip
    assert isinstance(unit_system(resolved, 0), QuorumSystem) and unit_system(resolved, 0).N == 20
    run_ensemble(config, tmp_path / "original.zarr", Placement(in_process=True))
    ensemble = open_ensemble(tmp_path / "original.zarr")
    assert ensemble["occupancy"].shape == (1, 1, 2, 3, 10, 10) and int(ensemble["events"].sum()) > 0
    with pytest.raises(ConfigurationError, match="^R: not a parameter of the 'active' system"):
        resolve(dataclasses.replace(config, system=None))
    with pytest.raises(ConfigurationError, match="^system:"):
        dataclasses.replace(config, system="fa")
    with pytest.raises(ConfigurationError, match="^q:"):
        resolve(dataclasses.replace(config, q=9))


# ----------------------------------------------------------------------------- studies
def test_ntheta_and_range_studies_accept_the_quorum_system():
    from hpcdyn.distributed.sweep import check_study, trial_setup
    from sweeps import get_study
    from sweeps.range import COUNT_LADDER

    for smoke in (True, False):
        ntheta = check_study(get_study("ntheta", smoke=smoke, system="quorum"))
        assert {point["data.system"] for point in ntheta} == {"quorum"}
        assert 5 in {point.get("model.n_classes") for point in ntheta}  # N* = 5 is scanned
        ranges = check_study(get_study("range", smoke=smoke, system="quorum"))
        assert {point["model.n_classes"] for point in ranges if point["model.mode"] == 2} == {5}
        # the quorum ladder: the nearest neighbours with the count of a growing block (what its rule reads)
        assert {point["model.attention_stencil"] for point in ranges} == set(COUNT_LADDER)
        active = check_study(get_study("range", smoke=smoke))
        assert len(ranges) == len(active) // len({point["model.attention_stencil"] for point in active}) * len(COUNT_LADDER)
    setup = trial_setup(ntheta[0])
    assert isinstance(setup.system, QuorumSystem) and setup.training.model.system == "quorum"
    assert (setup.system.L, setup.system.R, setup.system.q) == (12, 2, 3)
    with pytest.raises(ConfigurationError, match="system:"):
        get_study("ntheta", system="fa")


def test_sweep_command_takes_the_system(tmp_path, capsys):
    storage = tmp_path / "storage"
    arguments = ["sweep", "range", "--smoke", "--system", "quorum", "--storage", str(storage), "--grid", "model.nclasses=1"]
    assert main(arguments) == 2  # parsed up to the study's keys, refused before Ray starts
    assert "model.nclasses: unknown sweep parameter" in capsys.readouterr().err and not storage.exists()
    # the N_theta study is written for particle systems (the range study also runs on the FA chain)
    assert main(["sweep", "ntheta", "--smoke", "--system", "fa", "--storage", str(storage)]) == 2
    assert "system: the ntheta study runs on the systems" in capsys.readouterr().err and not storage.exists()


def test_an_environment_table_of_the_quorum_system_knows_where_hops_land():
    """A hop's target column in the key decides whether it is blocked: the quorum's tokens hop like
    the active model's, so its tables find the same target sites (blocked moves are then counted)."""
    from hpcdyn.physics.environments import make_encoder
    from hpcdyn.simulation.environment_table import _target_digits

    quorum = make_system("quorum", preset="small")
    active = make_system("active", {"L": quorum.L, "N": quorum.N})
    columns = _target_digits(make_encoder("block5", quorum))
    assert (columns[2:] >= 0).all() and (columns[:2] == -1).all()  # four hops land in the stencil, rotations stay
    assert np.array_equal(columns, _target_digits(make_encoder("block5", active)))
