"""The KL divergence rate between two dynamics (analysis.kl_rate): zero against itself, its closed-form
U against the slow exact path log-likelihood, the closed form of two Poisson processes, bad input.

Fixed seeds: every test is deterministic. Small lattices and short times keep the file fast.
"""

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr

from analysis.kl_rate import (
    Pair,
    Tables,
    check_study,
    combine,
    key_rates,
    kl_rate_study,
    log_likelihood,
    main,
    model_source,
    original,
    plot_kl_compare,
    plot_kl_map,
    plot_kl_rate,
    replica_stream,
    save,
    save_figure,
    simulate,
    trajectory_statistics,
)
from hpcdyn.learning.likelihood import path_log_likelihood
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
from hpcdyn.physics.rates import true_rate_model
from tests.test_table_engine import LeakyRates
from hpcdyn.physics.systems import ConfigurationError, make_system

torch.set_num_threads(1)


LEAK = 0.05  # the rate a leaky model gives hops onto occupied sites


def small(density=0.3, L=8, **params):
    return make_system("active", {"L": L, "density": density, **params})


def trajectory(source, system, tables, seed=3, t_final=4.0, burn_in=1.0):
    return simulate(source, system, tables, replica_stream(seed, source.label, system.v_plus, system.density, 0), t_final, burn_in)


def closed_form_u(source, system, tables, events, exclude_blocked):
    keys, exposure, counts = trajectory_statistics(events, source.family_for(system))
    rates, blocked = key_rates(*tables.get(source, system), keys)
    return log_likelihood(rates, blocked, exposure, counts, exclude_blocked)


# ----------------------------------------------------------------------------- (a) against itself
def test_original_against_itself_is_exactly_zero_per_trajectory():
    study = kl_rate_study([Pair(small(), original(), original())], [0.2, 0.4], replicas=3, t_final=3.0, burn_in=1.0, seed=5)
    assert (study.events > 0).all()
    assert (study.kl_rate_replica == 0.0).all() and (study.kl_exposure_replica == 0.0).all()
    assert (study.kl_rate == 0.0).all() and (study.kl_rate_se == 0.0).all()
    assert np.isfinite(study.u_simulated).all() and (study.u_simulated != 0).all()


# ----------------------------------------------------------------------------- (b) against the slow reference
def test_closed_form_u_equals_path_log_likelihood():
    system, tables = small(), Tables()
    changed = original("vp40", v_plus=40.0)
    leaky = model_source(LeakyRates(system, LEAK), "leaky", family="vn1")
    events = trajectory(original(), system, tables)
    assert events.n_events > 500
    for source, model in ((original(), true_rate_model(system)), (changed, true_rate_model(small(v_plus=40.0))),
                          (leaky, LeakyRates(system, LEAK))):  # fmt: skip
        reference = path_log_likelihood(events, model, segment_events=512).log_likelihood
        found = closed_form_u(source, system, tables, events, exclude_blocked=False)
        assert found == pytest.approx(reference, rel=1e-9), source.label
    # the leaky model's own trajectory (overlaps rejected): the engine's U counts the blocked rates
    # (DESIGN 1.3), the study's U drops them (the dynamics as simulated, the original's rates there)
    own = trajectory(leaky, system, tables, seed=4)
    reference = path_log_likelihood(own, LeakyRates(system, LEAK), segment_events=512).log_likelihood
    assert closed_form_u(leaky, system, tables, own, exclude_blocked=False) == pytest.approx(reference, rel=1e-9)
    assert own.log_likelihood == pytest.approx(reference, rel=1e-9)
    as_simulated = path_log_likelihood(own, true_rate_model(system), segment_events=512).log_likelihood
    assert closed_form_u(leaky, system, tables, own, exclude_blocked=True) == pytest.approx(as_simulated, rel=1e-9)


def test_hard_local_transformer_table_matches_the_network():
    """A hard-local model's U from its vn1 table equals the network's in full context (float32 rates)."""
    torch.manual_seed(0)
    config = TransformerConfig(lattice_size=8, d_model=16, n_heads=2, n_layers=1, d_ff=16, mode=1, rotary=False,
                               attention_stencil="vn1", initial_log_rate=0.0)  # fmt: skip
    model = TransformerRates(config).eval()
    system, tables = small(), Tables()
    source = model_source(model, "local")
    assert source.family_for(system) == "vn1"
    events = trajectory(original(), system, tables, t_final=2.0)
    reference = path_log_likelihood(events, model, segment_events=512).log_likelihood
    assert closed_form_u(source, system, tables, events, exclude_blocked=False) == pytest.approx(reference, rel=1e-6)


# ----------------------------------------------------------------------------- (c) a different model
def test_one_particle_matches_two_poisson_processes():
    """One particle: its forward hop is never blocked, so KL(v || v') rate = v ln(v/v') - v + v'
    exactly; the compensator gives it on every trajectory, (U_a - U_b)/T within its errors."""
    v, w = 25.0, 50.0
    system = make_system("active", {"L": 10, "N": 1, "v_plus": v})
    study = kl_rate_study([Pair(system, original(), original("vp50", v_plus=w))], [0.01], replicas=6, t_final=20.0,
                          burn_in=0.0, seed=2)  # fmt: skip
    expected = {"forward": v * math.log(v / w) - v + w, "reverse": w * math.log(w / v) - w + v}
    for direction, value in expected.items():
        cell = study.sel(direction=direction, v_plus=v, density=0.01)
        np.testing.assert_allclose(cell.kl_exposure_replica, value, rtol=1e-9)
        assert abs(float(cell.kl_rate) - value) < 4 * float(cell.kl_rate_se), direction
        # (U_a - U_b)/T = [n_f ln(v_a/v_b) - T (v_a - v_b)]/T with n_f ~ Poisson(v_a T): its variance is known
        v_a, v_b = (v, w) if direction == "forward" else (w, v)
        predicted_se = math.sqrt(v_a / 20.0) * abs(math.log(v_a / v_b)) / math.sqrt(6)
        assert 0.3 * predicted_se < float(cell.kl_rate_se) < 3 * predicted_se


def test_changed_activity_is_resolved_far_above_zero():
    system = small(L=10)
    study = kl_rate_study([Pair(system, original(), original("vp50", v_plus=50.0))], [0.3], replicas=4, t_final=4.0,
                          burn_in=1.0, seed=1)  # fmt: skip
    assert (study.kl_rate > 10 * study.kl_rate_se).all()
    assert (study.kl_exposure_replica > 0).all()
    # the two estimators of one rate agree
    difference = abs(study.kl_rate - study.kl_rate_exposure)
    assert (difference < 4 * np.hypot(study.kl_rate_se, study.kl_rate_exposure_se)).all()


def test_outputs_round_trip_and_figures(tmp_path):
    pairs = [Pair(small(v_plus=v), original(), original("slow", D=0.2)) for v in (25.0, 5.0)]
    study = kl_rate_study(pairs, [0.2, 0.4], replicas=2, t_final=1.0, burn_in=0.0, seed=1)
    assert dict(study.sizes) == {"direction": 2, "v_plus": 2, "density": 2, "replica": 2}
    # a pair measured alone is the same as in a study of several activities (streams are per pair)
    alone = [kl_rate_study([pair], [0.2, 0.4], replicas=2, t_final=1.0, burn_in=0.0, seed=1) for pair in pairs]
    combined = combine(alone)
    assert list(combined.v_plus.values) == [5.0, 25.0]
    np.testing.assert_array_equal(combined.kl_rate.values, study.kl_rate.sel(v_plus=[5.0, 25.0]).values)
    assert [entry["v_plus"] for entry in json.loads(combined.attrs["params"])] == [5.0, 25.0]
    for name in ("kl.zarr", "kl.nc"):
        back = xr.open_dataset(save(study, tmp_path / name))
        np.testing.assert_array_equal(back.kl_rate.values, study.kl_rate.values)
        assert list(back.simulated.values[0]) == ["original", "original"]
    figures = ((plot_kl_rate(study), "rate.png"), (plot_kl_map(study), "map.png"),
               (plot_kl_map(study, "kl_rate"), "map_u.png"), (plot_kl_compare({"a": study}), "compare.png"))  # fmt: skip
    for figure, name in figures:
        assert save_figure(figure, tmp_path / name).stat().st_size > 1000


# ----------------------------------------------------------------------------- (d) bad input
@pytest.mark.parametrize(
    "change, field",
    [
        ({"densities": ["1.5"]}, "densities:"),
        ({"densities": ["0"]}, "densities:"),
        ({"replicas": "1"}, "replicas:"),
        ({"t-final": "-1"}, "t_final:"),
        ({"models": ["original", "/nonexistent/run"]}, "models: /nonexistent/run"),
        ({"models": ["original", "original:v_plu=3"]}, "v_plu:"),
        ({"models": ["original", "original:v_plus=-3"]}, "v_plus:"),
        ({"models": ["original", "original:v_plus"]}, "models:"),
    ],
)
def test_bad_input_is_refused_naming_the_field(tmp_path, capsys, change, field):
    options = {"models": ["original", "original:v_plus=50"], "densities": ["0.2"], "replicas": "2", "t-final": "1",
               "burn-in": "0", "L": "8", "out": str(tmp_path / "out")}  # fmt: skip
    options.update(change)
    argv = []
    for name, value in options.items():
        argv += [f"--{name}", *(value if isinstance(value, list) else [value])]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("analysis.kl_rate: error: ") and field in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_study_checks_name_the_field():
    pair = Pair(small(), original(), original())
    with pytest.raises(ConfigurationError, match="^replicas:"):
        check_study([pair], [0.2], 1, 1.0, 0.0, 1)
    with pytest.raises(ConfigurationError, match="^models: each pair"):
        check_study([pair, pair], [0.2], 2, 1.0, 0.0, 1)
    with pytest.raises(ConfigurationError, match="^burn_in:"):
        check_study([pair], [0.2], 2, 1.0, -1.0, 1)


def test_command_line_writes_dataset_and_figure(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--models", "original", "original:v_plus=50", "--densities", "0.2", "--L", "8", "--replicas", "2",
            "--t-final", "1", "--burn-in", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "original ‖ original:v_plus=50" in capsys.readouterr().out
    assert (out / "kl_rate.zarr").exists() and (out / "kl_rate.png").exists()
    assert main(argv) == 2 and "out:" in capsys.readouterr().err  # never replaced without --overwrite
