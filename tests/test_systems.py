"""Configuration of the systems: presets, validation and error messages."""

import dataclasses
import math

import numpy as np
import pytest

from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, FASystem, make_system


def test_paper_preset_matches_the_design():
    system = make_system("active", preset="paper")
    assert (system.L, system.N, system.D, system.v_plus, system.v_other) == (30, 112, 0.1, 25.0, 1.0)
    assert math.isclose(system.density, 0.124, abs_tol=1e-3)


def test_density_stands_in_for_n_and_overrides_a_preset():
    assert make_system("active", {"density": 0.5}, preset="paper").N == 450
    assert make_system("active", {"N": 10}, preset="paper").N == 10
    assert make_system("active", {"L": 10, "density": 0.3}).N == 30


def test_configurations_are_frozen():
    system = make_system("fa", {"L": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        system.c = 0.5


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("active", {"L": 1}, "L"),
        ("active", {"L": 2.5}, "L"),
        ("active", {"L": 4, "N": 17}, "N"),
        ("active", {"N": 0}, "N"),
        ("active", {"density": 0.0}, "density"),
        ("active", {"density": 1.5}, "density"),
        ("active", {"D": -0.1}, "D"),
        ("active", {"v_plus": math.inf}, "v_plus"),
        ("active", {"v_other": math.nan}, "v_other"),
        ("active", {"temperature": 1.0}, "temperature"),
        ("fa", {"c": 1.5}, "c"),
        ("fa", {"c": -0.1}, "c"),
        ("fa", {"dim": 3}, "dim"),
        ("fa", {"L": 1}, "L"),
        ("fa", {"density": 0.3}, "density"),
    ],
)
def test_invalid_parameters_are_refused_by_name(name, params, field):
    with pytest.raises(ConfigurationError) as error:
        make_system(name, params)
    assert str(error.value).startswith(f"{field}:"), str(error.value)


def test_unknown_system_and_preset_list_the_valid_ones():
    with pytest.raises(ConfigurationError, match="system: must be one of \\['active', 'fa', 'quorum'\\]"):
        make_system("ising")
    with pytest.raises(ConfigurationError, match="preset: .*chain"):
        make_system("fa", preset="paper")


def test_unknown_field_message_lists_known_fields():
    with pytest.raises(ConfigurationError, match="known parameters are \\['D', 'L', 'N', 'v_other', 'v_plus'\\]"):
        make_system("active", {"Dr": 0.1})


def test_active_initial_configuration_has_no_overlaps():
    system = ActiveSystem(L=10, N=100)
    positions, states = system.initial_configuration(np.random.default_rng(0))
    sites = positions[:, 1] * 10 + positions[:, 0]
    assert len(set(sites.tolist())) == 100
    assert set(states.tolist()) <= {0, 1, 2, 3}


def test_fa_initial_configuration_lists_sites_in_row_major_order():
    system = FASystem(L=4, dim=2, c=0.5)
    positions, states = system.initial_configuration(np.random.default_rng(0))
    assert positions.tolist()[:5] == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]]
    assert states.shape == (16,)
