"""Environment keys: the registry, exact and hashed codes, numpy against numba, and the locality of
the true rates (the reason a 'vn1' table of the original rates is exact)."""

import numpy as np
import pytest
import torch

from hpcdyn.physics.environments import (
    FAMILIES,
    content_grid,
    decode_keys,
    environment_keys,
    key_family,
    keys_of_patches,
    make_encoder,
    patches,
    stencil_table,
    token_key,
    token_patch,
)
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.systems import ConfigurationError, make_system

SYSTEMS = {
    "active": make_system("active", {"L": 20, "density": 0.45}),
    "fa-square": make_system("fa", {"L": 20, "dim": 2, "c": 0.4}),
    "fa-chain": make_system("fa", {"L": 40, "dim": 1, "c": 0.4}),
}


def configurations(system, count, seed):
    rng = np.random.default_rng(seed)
    pairs = [system.initial_configuration(rng) for _ in range(count)]
    return np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs]).astype(np.int64)


def test_unknown_family_is_refused_with_the_valid_names():
    with pytest.raises(ConfigurationError) as error:
        key_family("block4")
    for name in ("vn1", "vn1-occ", "block3", "diamond2-occ", "block5"):
        assert name in str(error.value)


def test_families_have_the_documented_stencils_and_key_spaces():
    active, chain = SYSTEMS["active"], SYSTEMS["fa-chain"]
    assert make_encoder("vn1", active).key_space == 2500  # own orientation x 5 states on 4 neighbours
    assert make_encoder("vn1-occ", active).key_space == 4 * 2**4
    assert make_encoder("diamond2-occ", active).n_sites == 12
    assert len(key_family("block3").offsets) == 8 and len(key_family("block5").offsets) == 24
    assert not make_encoder("block5", active).hashed  # 4 * 5**24 < 2**63: exact
    assert make_encoder("block7", active).hashed and not make_encoder("block7-occ", active).hashed
    assert make_encoder("vn1", chain).offsets == ((-1, 0), (1, 0))  # a chain keeps the row through the token
    assert make_encoder("vn1", SYSTEMS["fa-square"]).key_space == 2 * 2**4


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("system_name", sorted(SYSTEMS))
def test_compiled_encoder_agrees_with_the_vectorised_one(family, system_name):
    system = SYSTEMS[system_name]
    if "+count" in family and system_name.startswith("fa"):  # spins: nothing to count
        with pytest.raises(ConfigurationError, match="key family: .* counts particles"):
            make_encoder(family, system)
        return
    encoder = make_encoder(family, system)
    positions, states = configurations(system, 2, seed=3)
    keys, checks = environment_keys(encoder, system, positions, states)
    expected_patches = patches(encoder, system, positions, states)
    table = stencil_table(encoder.offset_array, system.shape)
    lx = system.shape[1]
    for row in range(2):
        grid = content_grid(system, positions[row : row + 1], states[row : row + 1])[0]
        out = np.zeros(encoder.patch_width, np.int8)
        for token in range(0, states.shape[1], 7):
            site = positions[row, token, 1] * lx + positions[row, token, 0]
            first = site * encoder.n_sites
            arguments = (grid, table, first, encoder.n_sites, states[row, token], encoder.digit_array)
            key, check = token_key(*arguments, encoder.weights, encoder.n_own_states, encoder.hashed)
            assert (key, check) == (keys[row, token], checks[row, token])
            token_patch(*arguments, out)
            assert np.array_equal(out, expected_patches[row, token])
    assert (keys >= 0).all() and ((checks != 0) == encoder.hashed).all()


@pytest.mark.parametrize("family", ["vn1", "vn1-occ", "block3", "diamond2", "block5"])
def test_exact_keys_decode_to_their_patches_and_distinct_patches_have_distinct_keys(family):
    system = SYSTEMS["active"]
    encoder = make_encoder(family, system)
    found = patches(encoder, system, *configurations(system, 4, seed=5)).reshape(-1, encoder.patch_width)
    keys, _ = keys_of_patches(encoder, found)
    assert np.array_equal(decode_keys(encoder, keys), found)
    distinct_patches = len(np.unique(found, axis=0))
    assert len(np.unique(keys)) == distinct_patches
    assert keys.max() < encoder.key_space


def test_hashed_keys_separate_every_patch_and_checks_are_independent():
    system = SYSTEMS["active"]
    encoder = make_encoder("block9", system)
    assert encoder.hashed
    rng = np.random.default_rng(1)
    random_patches = rng.integers(0, 5, size=(200_000, encoder.patch_width)).astype(np.int8)
    random_patches[:, 0] %= 4
    random_patches = np.unique(random_patches, axis=0)
    keys, checks = keys_of_patches(encoder, random_patches)
    assert len(np.unique(keys)) == len(random_patches)  # no collision among 2e5 (expected 2e-9)
    assert len(np.unique(checks)) == len(random_patches)
    assert abs(np.corrcoef(keys.astype(float), checks.astype(float))[0, 1]) < 0.01
    with pytest.raises(ConfigurationError, match="cannot be decoded"):
        decode_keys(encoder, keys[:3])


@pytest.mark.parametrize("family", ["vn1", "vn1-occ"])
@pytest.mark.parametrize("density", [0.124, 0.5])
def test_true_active_rates_are_a_function_of_the_radius_1_key(family, density):
    """Own orientation + neighbour occupancy fix the rates: one rate row per key, over many tokens."""
    system = make_system("active", {"L": 16, "density": density})
    positions, states = configurations(system, 40, seed=7)
    keys, _ = environment_keys(make_encoder(family, system), system, positions, states)
    log_rates = true_rate_model(system)(torch.as_tensor(positions), torch.as_tensor(states)).numpy()
    keys, rows = keys.reshape(-1), log_rates.reshape(-1, 6)
    order = np.argsort(keys, kind="stable")
    first_of_key = np.unique(keys[order], return_index=True)[1]
    reference = np.repeat(rows[order][first_of_key], np.diff(np.append(first_of_key, len(keys))), axis=0)
    assert np.array_equal(rows[order], reference)


def test_fa_rates_are_a_function_of_the_vn1_key():
    for system in (SYSTEMS["fa-square"], SYSTEMS["fa-chain"]):
        positions, states = configurations(system, 20, seed=2)
        keys, _ = environment_keys(make_encoder("vn1", system), system, positions, states)
        rates = true_rate_model(system)(torch.as_tensor(positions), torch.as_tensor(states)).numpy()[..., 0]
        for key in np.unique(keys):
            assert np.unique(rates[keys == key]).size == 1


def test_a_stencil_wider_than_the_lattice_is_refused():
    system = make_system("active", {"L": 4, "N": 3})
    positions, states = configurations(system, 1, seed=0)
    with pytest.raises(ConfigurationError, match="larger than the 4 x 4 lattice"):
        environment_keys(make_encoder("block5", system), system, positions, states)


def test_overlapping_particles_show_the_largest_state():
    system = make_system("active", {"L": 5, "N": 3})
    positions = np.array([[[1, 1], [1, 1], [3, 2]]])
    grid = content_grid(system, positions, np.array([[0, 2, 1]]))[0]
    assert grid[1 * 5 + 1] == 3 and grid[2 * 5 + 3] == 2 and grid.sum() == 5
