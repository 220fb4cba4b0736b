"""Sufficient statistics of a trajectory (hpcdyn.learning.statistics): exact U, split, persistence."""

import numpy as np
import pytest
import torch

from hpcdyn.learning.likelihood import path_log_likelihood
from hpcdyn.learning.local_training import StatisticsObjective, ml_rates
from hpcdyn.learning.statistics import cached_statistics, load, save, split_points, trajectory_statistics
from hpcdyn.learning.training import TrainingConfig, split
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.simulation.drivers import simulate, simulate_to_store
from hpcdyn.storage.events import EventWindow
from hpcdyn.storage.trajectory_store import open_trajectory

RELATIVE = 1e-9  # statistics U against path_log_likelihood, float64 model
CASES = {"active": ({"L": 8, "N": 12}, 6.0), "fa": ({"L": 12}, 60.0)}


@pytest.fixture(scope="module")
def trajectories():
    return {name: simulate(make_system(name, params), t_final, seed=1).events for name, (params, t_final) in CASES.items()}


def random_local_model(system, layers: int, mode: int, seed: int = 0) -> TransformerRates:
    torch.manual_seed(seed)
    config = TransformerConfig(system=system.name, lattice_size=max(system.shape), d_model=16, n_heads=2, n_layers=layers,
                               d_ff=16, mode=mode, n_classes=3, rotary=False, attention_stencil="vn1",
                               initial_offset_score=0.0)  # fmt: skip
    model = TransformerRates(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def windows(events, validation_fraction=0.1, max_train_events=None):
    train_stop, boundary = split_points(events.n_events, validation_fraction, max_train_events)
    return EventWindow(events, 0, train_stop), EventWindow(events, boundary, events.n_events)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("mode", [1, 2])
def test_statistics_reproduce_the_path_likelihood_exactly(trajectories, name, layers, mode):
    events = trajectories[name]
    model = random_local_model(events.system, layers, mode)
    stats = trajectory_statistics(events, model.config.key_family, 0.1, block_events=97)  # blocks cut anywhere
    u_train, u_heldout = StatisticsObjective(stats, events.system).both_parts(model)
    train_window, heldout_window = windows(events)
    expected_train = path_log_likelihood(train_window, model).log_likelihood
    expected_heldout = path_log_likelihood(heldout_window, model).log_likelihood
    assert u_train == pytest.approx(expected_train, rel=RELATIVE)
    assert u_heldout == pytest.approx(expected_heldout, rel=RELATIVE)
    assert stats.t_train == pytest.approx(train_window.t_final, rel=1e-12)
    assert stats.t_heldout == pytest.approx(heldout_window.t_final, rel=1e-12)
    assert stats.counts.sum((1, 2)).tolist() == [train_window.n_events, heldout_window.n_events]


def test_max_train_events_leaves_the_gap_out(trajectories):
    events = trajectories["active"]
    model = random_local_model(events.system, 1, 1)
    stats = trajectory_statistics(events, "vn1", 0.2, max_train_events=300)
    train_window, heldout_window = windows(events, 0.2, 300)
    u_train, u_heldout = StatisticsObjective(stats, events.system).both_parts(model)
    assert u_train == pytest.approx(path_log_likelihood(train_window, model).log_likelihood, rel=RELATIVE)
    assert u_heldout == pytest.approx(path_log_likelihood(heldout_window, model).log_likelihood, rel=RELATIVE)


def test_split_matches_the_trainer(trajectories):
    events = trajectories["active"]
    for fraction, limit in ((0.1, None), (0.25, 200), (0.05, 10**9)):
        config = TrainingConfig(validation_fraction=fraction, max_train_events=limit, segment_events=16)
        train_window, heldout_window = split(events, config)
        assert split_points(events.n_events, fraction, limit) == (train_window.stop, heldout_window.start)


def test_ml_rates_are_the_ceiling(trajectories):
    events = trajectories["active"]
    stats = trajectory_statistics(events, "vn1", 0.1)
    rates = ml_rates(stats)
    exposure, counts = stats.part("train")
    # U(rates) = sum n ln(n/E) - sum n: every other choice of per-key rates scores lower
    best = stats.ml_log_likelihood("train")
    for factor in (0.9, 1.1):
        scaled = rates * factor
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(counts > 0, counts * np.log(scaled), 0.0).sum() - (exposure[:, None] * scaled).sum()
        assert u < best


def test_hashed_family_refused(trajectories):
    with pytest.raises(ConfigurationError, match="hashed"):
        trajectory_statistics(simulate(make_system("active", {"L": 12, "N": 10}), 0.5, seed=1).events, "block7")


def test_statistics_persist_beside_the_store_and_refuse_others(tmp_path):
    system = make_system("active", {"L": 8, "N": 10})
    path = simulate_to_store(system, 3.0, seed=2, out=tmp_path / "run.zarr")
    other_path = simulate_to_store(system, 3.0, seed=3, out=tmp_path / "other.zarr")
    source = open_trajectory(path)
    stats, reused = cached_statistics(source, "vn1", 0.1)
    assert not reused
    again, reused = cached_statistics(open_trajectory(path), "vn1", 0.1)
    assert reused
    np.testing.assert_array_equal(again.keys, stats.keys)
    np.testing.assert_array_equal(again.counts, stats.counts)
    np.testing.assert_array_equal(again.exposure, stats.exposure)
    assert (again.t_train, again.t_heldout) == (stats.t_train, stats.t_heldout)
    saved = tmp_path / "explicit.zarr"
    save(stats, saved)
    other = cached_statistics(open_trajectory(other_path), "vn1", 0.1)[0]
    with pytest.raises(ConfigurationError, match="another trajectory"):
        load(saved, fingerprint=other.fingerprint)
    with pytest.raises(ConfigurationError, match="key family"):
        load(saved, fingerprint=stats.fingerprint, family="diamond2")
    with pytest.raises(ConfigurationError, match="split"):
        load(saved, split={"validation_fraction": 0.2})


def test_concurrent_callers_compute_the_statistics_once(tmp_path):
    """Trials that start together on one store: one computes and saves, the others wait and read it."""
    import threading

    system = make_system("active", {"L": 8, "N": 10})
    path = simulate_to_store(system, 3.0, seed=2, out=tmp_path / "run.zarr")
    results, start = [], threading.Barrier(3)

    def call():
        start.wait()
        results.append(cached_statistics(open_trajectory(path), "vn1", 0.1))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(reused for _, reused in results) == [False, True, True]
    for stats, _ in results:
        np.testing.assert_array_equal(stats.counts, results[0][0].counts)
