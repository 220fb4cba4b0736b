"""Mode 2 class rates in closed form: counts, exposure, and that n_k / E_k maximises U."""

import math

import pytest
import torch

from hpcdyn.learning.class_rates import class_statistics, fit_class_rates
from hpcdyn.learning.likelihood import path_log_likelihood
from hpcdyn.physics.rates import ActiveRates
from hpcdyn.physics.replay import advance
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.learning.training import TrainingConfig, load_model, split, train
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates

SYSTEM = make_system("active", {"L": 6, "N": 5, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})


@pytest.fixture(scope="module")
def events():
    return simulate(SYSTEM, 20.0, seed=1).events


def scrambled_model(n_classes: int = 3, exclusion_mask: bool = False, seed: int = 0) -> TransformerRates:
    """A Mode 2 model whose classifier splits the moves between all classes, in no physical way."""
    torch.manual_seed(seed)
    config = TransformerConfig(system="active", lattice_size=6, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                               mode=2, n_classes=n_classes, exclusion_mask=exclusion_mask)  # fmt: skip
    model = TransformerRates(config)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    return model.eval()


def reference_statistics(model, source):
    """Event by event: the class of the move taken, and dwell x the class's number of allowed moves."""
    n_classes = model.config.n_classes
    events, exposure = [0.0] * n_classes, [0.0] * n_classes
    positions = torch.as_tensor(source.initial_positions, dtype=torch.long)
    states = torch.as_tensor(source.initial_states, dtype=torch.long)

    def classes_now():
        classes = model.classes(positions[None], states[None])[0]
        if model.config.exclusion_mask:
            types = ActiveRates(source.system).move_types(positions[None], states[None])[0]
            classes = classes.masked_fill(types == ActiveRates.BLOCKED_HOP, -1)
        return classes

    elapsed = 0.0
    tokens, moves, dwells = next(iter(source.iter_event_blocks(source.n_events)))
    for token, move, dwell in zip(tokens.tolist(), moves.tolist(), dwells.tolist()):
        classes = classes_now()
        events[int(classes[token, move])] += 1
        for k in range(n_classes):
            exposure[k] += dwell * int((classes == k).sum())
        elapsed += dwell
        positions, states = advance(source.system, positions, states, torch.tensor([token]), torch.tensor([move]))
    classes = classes_now()  # the censored tail: the final configuration's moves
    for k in range(n_classes):
        exposure[k] += (source.t_final - elapsed) * int((classes == k).sum())
    return events, exposure


@pytest.mark.parametrize("exclusion_mask", [False, True])
def test_counts_and_exposure_match_an_event_by_event_reference(events, exclusion_mask):
    model = scrambled_model(exclusion_mask=exclusion_mask)
    statistics = class_statistics(model, events, segment_events=37)  # segments that do not divide the events
    reference_events, reference_exposure = reference_statistics(model, events)
    assert statistics.events.tolist() == reference_events
    assert sum(reference_events) == events.n_events
    assert all(count > 0 for count in reference_events)  # the scrambled classifier uses every class
    assert statistics.exposure.tolist() == pytest.approx(reference_exposure, rel=1e-12)
    total = sum(reference_exposure)  # every move (6 per particle) exposed for the whole time, unless masked
    if exclusion_mask:
        assert total < events.t_final * 6 * SYSTEM.N
    else:
        assert total == pytest.approx(events.t_final * 6 * SYSTEM.N, rel=1e-12)


def test_fitted_rates_maximise_the_likelihood_exactly(events):
    """With w_k E_k = n_k, scaling rate k by e^eps changes U by n_k (eps - e^eps + 1), exactly."""
    model = scrambled_model()
    before = path_log_likelihood(events, model).log_likelihood
    statistics = fit_class_rates(model, events)
    fitted = path_log_likelihood(events, model).log_likelihood
    assert fitted > before
    for k in range(model.config.n_classes):
        n_k = float(statistics.events[k])
        for eps in (0.1, -0.1):
            with torch.no_grad():
                model.class_log_rates[k] += eps
            shifted = path_log_likelihood(events, model).log_likelihood
            with torch.no_grad():
                model.class_log_rates[k] -= eps
            # the class rates are float32: their rounding moves U by ~1e-7 here, the tolerance is 100 x that
            assert shifted - fitted == pytest.approx(n_k * (eps - math.exp(eps) + 1), abs=1e-5)


def test_a_class_without_events_keeps_its_rate(events):
    model = scrambled_model(n_classes=3)
    with torch.no_grad():  # every move into class 1: classes 0 and 2 get no event and no exposure
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]).repeat(model.n_moves))
    kept = model.class_rates()
    statistics = fit_class_rates(model, events)
    assert statistics.events.tolist() == [0.0, events.n_events, 0.0]
    rates = model.class_rates()
    assert rates[0] == pytest.approx(kept[0]) and rates[2] == pytest.approx(kept[2])
    moves = 6 * SYSTEM.N  # one class: the rate is events / (T x all moves)
    assert rates[1] == pytest.approx(events.n_events / (events.t_final * moves), rel=1e-6)


def test_class_statistics_refuse_a_mode_1_model(events):
    model = TransformerRates(TransformerConfig(system="active", lattice_size=6, d_model=16, n_heads=2, n_layers=1, d_ff=32))
    with pytest.raises(ValueError, match="Mode 1"):
        class_statistics(model, events)


def test_training_sets_the_class_rates_to_their_closed_form_each_epoch(events, tmp_path):
    model = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=2, n_classes=3)
    config = TrainingConfig(model=model, epochs=2, lr=1e-2, segment_events=64, class_rate_fit="closed_form")
    result = train(config, events, tmp_path / "fit")
    trained = load_model(tmp_path / "fit" / "last.pt")[0]
    training_window = split(events, config)[0]
    expected = class_statistics(trained, training_window).rates()
    learned = torch.tensor(result.metrics[-1]["class_rates"], dtype=torch.float64)
    has_events = torch.isfinite(expected)
    assert bool(has_events.any())
    assert torch.allclose(learned[has_events], expected[has_events], rtol=1e-6)
    with pytest.raises(ConfigurationError, match="^class_rate_fit:"):
        TrainingConfig(class_rate_fit="bayes")


def test_closed_form_last_fits_only_after_the_last_epoch(events, tmp_path):
    model = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=2, n_classes=3)
    config = TrainingConfig(model=model, epochs=2, lr=1e-2, segment_events=64, class_rate_fit="closed_form_last")
    at_closed_form = []

    def check(metrics, folder):  # after each epoch: are the rates n_k / E_k of the classifier saved?
        trained = load_model(folder / "last.pt")[0]
        expected = class_statistics(trained, split(events, config)[0]).rates()
        learned = torch.tensor(metrics["class_rates"], dtype=torch.float64)
        has_events = torch.isfinite(expected)
        at_closed_form.append(bool(torch.allclose(learned[has_events], expected[has_events], rtol=1e-6)))

    train(config, events, tmp_path / "run", report=check)
    assert at_closed_form == [False, True]  # epoch 0: gradient rates; epoch 1, the last: closed form
