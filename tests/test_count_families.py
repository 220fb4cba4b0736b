"""Count key families ("vn1+count5": a stencil's states and the number of particles in a block) and the
hard-local models that see them: keys, canonical patches, exact statistics, the table engine.

The quorum system's true rates depend on the target site of a hop and on the number of particles in
the (2R+1) x (2R+1) block, so a table of them in family vn1+count5 (R 2) must be exact: the table
engine's running likelihood then equals a recomputation with the true rates, and every audited
lookup agrees.
"""

import numpy as np
import pytest
import torch

from hpcdyn.learning.likelihood import path_log_likelihood
from hpcdyn.learning.local_training import StatisticsObjective
from hpcdyn.learning.statistics import split_points, trajectory_statistics
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
from hpcdyn.physics.environments import (
    all_patches,
    decode_keys,
    environment_keys,
    keys_of_patches,
    make_encoder,
    patch_configurations,
    patches,
)
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.simulation.drivers import simulate
from hpcdyn.simulation.environment_table import EnvironmentTable, PatchEvaluator, model_lattice
from hpcdyn.simulation.table_engine import EngineOptions, TableEngine
from hpcdyn.storage.environment_tables import original_rates_identity
from hpcdyn.storage.events import EventWindow

QUORUM = make_system("quorum", {"L": 12, "density": 0.3})


def configurations(system, count, seed):
    rng = np.random.default_rng(seed)
    pairs = [system.initial_configuration(rng) for _ in range(count)]
    return np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs]).astype(np.int64)


def count_model(system, mode=1, seed=0, stencil="vn1+count5") -> TransformerRates:
    torch.manual_seed(seed)
    config = TransformerConfig(system=system.name, lattice_size=system.L, d_model=16, n_heads=2, n_layers=1, d_ff=16,
                               mode=mode, n_classes=3, rotary=False, attention_stencil=stencil, initial_offset_score=0.0)  # fmt: skip
    model = TransformerRates(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model


def test_keys_hold_the_count_and_decode_to_a_canonical_patch_of_the_same_key():
    encoder = make_encoder("vn1+count5", QUORUM)
    assert (encoder.n_stencil, encoder.n_counted, encoder.key_space) == (4, 24, 4 * 5**4 * 25)
    positions, states = configurations(QUORUM, 3, seed=1)
    keys, _ = environment_keys(encoder, QUORUM, positions, states)
    decoded = decode_keys(encoder, keys.reshape(-1))
    assert np.array_equal(keys_of_patches(encoder, decoded)[0], keys.reshape(-1))
    # the count is the number of other particles within Chebyshev distance 2, counted directly
    delta = np.abs(positions[:, :, None, :] - positions[:, None, :, :])
    delta = np.minimum(delta, QUORUM.L - delta).max(-1)
    direct = (delta <= 2).sum(-1) - 1
    assert np.array_equal((decoded[:, 1 + encoder.n_stencil :] > 0).sum(1), direct.reshape(-1))
    # the stencil's digits survive; a count the stencil contradicts is refused
    found = patches(encoder, QUORUM, positions, states).reshape(-1, encoder.patch_width)
    assert np.array_equal(decoded[:, : 1 + encoder.n_stencil], found[:, : 1 + encoder.n_stencil])
    impossible = 3 + 4 * (4 * 5**0)  # own state 3, one neighbour (digit 4) but a count of 0
    with pytest.raises(ConfigurationError, match="count their stencil contradicts"):
        decode_keys(encoder, [impossible])
    every = all_patches(encoder)
    every_keys = keys_of_patches(encoder, every)[0]
    assert np.all(np.diff(every_keys) > 0) and set(keys.reshape(-1)) <= set(every_keys)


def test_a_count_family_is_refused_for_spins():
    with pytest.raises(ConfigurationError, match="counts particles"):
        make_encoder("vn1+count3", make_system("fa", {"L": 10}))
    with pytest.raises(ConfigurationError, match="^attention_stencil: .* counts particles"):
        TransformerConfig(system="fa", lattice_size=10, rotary=False, attention_stencil="vn1+count3")


@pytest.mark.parametrize("mode, padded", [(1, False), (1, True), (2, False), (2, True)])
def test_a_count_model_depends_on_its_key_alone(mode, padded):
    """Each token's log-rates in a full configuration equal those of its key's canonical patch placed
    alone (another placement of the counted particles, orientation 0), on the training lattice and a
    larger one; padded, with filler tokens opposite the centre (outside the 5 x 5 block)."""
    model = count_model(QUORUM, mode)
    assert model.config.key_family == "vn1+count5"
    encoder = make_encoder(model.config.key_family, QUORUM)
    positions, states = configurations(QUORUM, 2, seed=4)
    with torch.no_grad():
        full = model(torch.as_tensor(positions), torch.as_tensor(states)).reshape(-1, QUORUM.n_moves)
        keys, _ = environment_keys(encoder, QUORUM, positions, states)
        for side in (12, 17):
            lattice = make_system("quorum", {"L": side, "N": 1})
            alone = torch.zeros_like(full)
            batches = patch_configurations(encoder, lattice, decode_keys(encoder, keys.reshape(-1)), padded=padded)
            for rows, where, what, centre in batches:
                alone[torch.as_tensor(rows)] = model(torch.as_tensor(where), torch.as_tensor(what), lattice_size=side)[:, centre]
            torch.testing.assert_close(alone, full, rtol=0, atol=1e-9)
        # the count matters: a particle added two sites away (outside vn1, inside the block) changes the
        # token's features (its Mode 2 class may stay the same), one three sites away does not
        lone = model.encode(torch.tensor([[[5, 5]]]), torch.tensor([[0]]))[0, 0]
        near = model.encode(torch.tensor([[[5, 5], [7, 7]]]), torch.tensor([[0, 0]]))[0, 0]
        far = model.encode(torch.tensor([[[5, 5], [8, 7]]]), torch.tensor([[0, 0]]))[0, 0]
        assert (lone - near).abs().max() > 1e-3 and (lone - far).abs().max() < 1e-12


def test_statistics_of_a_count_family_reproduce_the_path_likelihood():
    events = simulate(QUORUM, 4.0, seed=2).events
    model = count_model(QUORUM, 2, seed=3)
    stats = trajectory_statistics(events, "vn1+count5", 0.1, block_events=89)
    u_train, u_heldout = StatisticsObjective(stats, QUORUM).both_parts(model)
    train_stop, boundary = split_points(events.n_events, 0.1)
    assert events.n_events > 500
    for u, window in ((u_train, EventWindow(events, 0, train_stop)), (u_heldout, EventWindow(events, boundary, events.n_events))):
        assert u == pytest.approx(path_log_likelihood(window, model).log_likelihood, rel=1e-9)


@pytest.mark.parametrize("selection", ["groups", "tree"])
def test_a_table_of_the_quorum_rates_in_a_count_family_is_exact(selection):
    """The engine keeps each token's count current by digit deltas: its keys equal a recomputation, its
    running likelihood equals the true rates' and no audited lookup differs."""
    system = make_system("quorum", {"density": 0.3}, preset="small")
    model = true_rate_model(system)
    evaluator = PatchEvaluator(model, model_lattice(model, system))
    encoder = make_encoder("vn1+count5", system)
    table = EnvironmentTable(encoder, evaluator.header_for(encoder, original_rates_identity(system)))
    rng = np.random.default_rng(5)
    positions, states = system.initial_configuration(rng)
    engine = TableEngine(table, evaluator, system, positions, states, rng, 5.0, None,
                         EngineOptions(selection=selection, audit_fraction=0.5))  # fmt: skip
    run = engine.run()
    assert run.events.n_events > 1000 and run.statistics.audited > 0
    assert run.statistics.audit_largest_difference == 0.0
    recomputed = path_log_likelihood(run.events, true_rate_model(system), segment_events=1000)
    assert recomputed.log_likelihood == pytest.approx(run.events.log_likelihood, rel=1e-9)
    now_positions, now_states = engine.configuration()
    keys, _ = environment_keys(encoder, system, now_positions[None], now_states[None])
    assert np.array_equal(engine.token_keys, keys[0])


def test_a_count_larger_than_any_trained_acts_as_the_largest_seen():
    """The count's embedding is cumulative: counts never seen in training get no gradient for their
    steps, so a model trained at low density treats a crowd larger than it saw as the largest it saw."""
    model = count_model(QUORUM, mode=1)
    with torch.no_grad():
        model.embed_count.weight[3:] = 0.0  # as trained on counts 0..2 only
    # the token at (5, 5) with 2 others two sites away (count 2), then with 6 (count 6); no vn1 neighbour
    ring = [[7, 7], [3, 3], [7, 3], [3, 7], [5, 7], [5, 3]]
    two = torch.tensor([[[5, 5], *ring[:2]]]), torch.zeros(1, 3, dtype=torch.long)
    six = torch.tensor([[[5, 5], *ring]]), torch.zeros(1, 7, dtype=torch.long)
    assert model.block_counts(two[0], 12)[0, 0] == 2 and model.block_counts(six[0], 12)[0, 0] == 6
    with torch.no_grad():
        torch.testing.assert_close(model(*six)[0, 0], model(*two)[0, 0], rtol=0, atol=1e-12)
    loss = model(*two)[0, 0].sum()
    model.zero_grad()
    loss.backward()
    assert model.embed_count.weight.grad[3:].abs().max() == 0 and model.embed_count.weight.grad[:3].abs().max() > 0


@pytest.mark.parametrize("stencil, side, room", [("vn1", 12, True), ("vn1", 4, True), ("vn1+count5", 12, True),
                                                 ("vn1+count5", 5, False)])  # fmt: skip
def test_padded_batches_fill_with_far_tokens_where_the_lattice_leaves_room(stencil, side, room):
    """Padded, every patch of the family goes in one batch (a network call), filled to its largest token
    count with tokens on the site opposite the centre, and the centre's log-rates are those of the
    equal-count batches. Where that site is one of the key's (a 5 x 5 block on a 5 x 5 lattice), the
    batches stay of equal count."""
    lattice = make_system("active", {"L": side, "N": 1})
    model = count_model(lattice, 2, stencil=stencil)
    encoder = make_encoder(model.config.key_family, lattice)
    rows = all_patches(encoder)
    rows = rows[:: max(1, len(rows) // 2000)]  # ~2,000 patches spread over the key space
    log_rates = {}
    with torch.no_grad():
        for padded in (False, True):
            batches = list(patch_configurations(encoder, lattice, rows, batch_size=1 << 20, padded=padded))
            out = torch.zeros(len(rows), lattice.n_moves, dtype=torch.float64)
            for index, where, what, centre in batches:
                assert centre == 0 and (where[:, 0] == [side // 2, side // 2]).all()
                out[torch.as_tensor(index)] = model(torch.as_tensor(where), torch.as_tensor(what))[:, centre]
            assert sorted(np.concatenate([index for index, *_ in batches]).tolist()) == list(range(len(rows)))
            log_rates[padded] = out
            if padded and room:
                assert len(batches) == 1
                _, where, what, _ = batches[0]
                far = (where == [0, 0]).all(-1)  # the site opposite (side // 2, side // 2)
                assert far.any() and (what[far] == 0).all()
    unpadded = list(patch_configurations(encoder, lattice, rows, batch_size=1 << 20))
    assert len(unpadded) > 1 and (room or len(list(patch_configurations(encoder, lattice, rows, padded=True))) == len(unpadded))
    torch.testing.assert_close(log_rates[True], log_rates[False], rtol=0, atol=1e-12)
