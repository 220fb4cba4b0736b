"""Evaluation diagnostics: the gap split by true move type."""

import dataclasses
import math

import pytest

from hpcdyn.learning.evaluation import gap_by_move_type
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import make_system

SYSTEM = make_system("active", {"L": 8, "N": 16, "D": 0.2, "v_plus": 5.0, "v_other": 1.0})


@pytest.fixture(scope="module")
def events():
    return simulate(SYSTEM, 20.0, seed=3).events


def test_the_true_rates_have_no_gap_in_any_move_type(events):
    split = gap_by_move_type(true_rate_model(SYSTEM), events)
    assert set(split) == {"rotation", "forward_hop", "other_hop", "blocked_hop"}
    for name, figures in split.items():
        assert figures["gap_per_event"] == pytest.approx(0.0, abs=1e-12), name
        assert figures["learned_rate"] == pytest.approx(figures["true_rate"], rel=1e-12), name
    assert split["blocked_hop"]["true_rate"] == 0.0 and split["blocked_hop"]["exposure"] > 0


def test_a_wrong_rate_shows_up_in_its_own_move_type_with_the_closed_form_gap(events):
    # Learned = truth with v_other doubled: only other hops differ, and for them the expected gap
    # per unit time is exposure * (u - w + w ln(w / u)) with w = 1, u = 2, exactly.
    wrong = true_rate_model(dataclasses.replace(SYSTEM, v_other=2.0))
    split = gap_by_move_type(wrong, events)
    other = split["other_hop"]
    assert other["learned_rate"] == pytest.approx(2.0) and other["true_rate"] == pytest.approx(1.0)
    per_time = other["exposure"] * (2.0 - 1.0 + 1.0 * math.log(1.0 / 2.0))
    events_per_time = events.n_events / events.dwell.sum()
    # the split covers the configurations before every event (not the censored tail): same rate
    assert other["gap_per_event"] == pytest.approx(per_time / events_per_time, rel=1e-9)
    for name in ("rotation", "forward_hop", "blocked_hop"):
        assert split[name]["gap_per_event"] == pytest.approx(0.0, abs=1e-12), name
