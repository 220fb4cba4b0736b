"""Mode 2's start on segments: the unrestricted classifier fitted to the nearest-neighbour partition."""

import math

import pytest
import torch

from hpcdyn.learning import training as training_module
from hpcdyn.learning.class_rates import class_statistics
from hpcdyn.learning.evaluation import class_table
from hpcdyn.learning.rate_intervals import rate_interval
from hpcdyn.learning.training import TrainingConfig, load_model, split, train
from hpcdyn.learning.transformer import TransformerConfig
from hpcdyn.physics.systems import make_system
from hpcdyn.simulation.drivers import simulate

SYSTEM = make_system("active", {"L": 6, "N": 5, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})
MODEL = TransformerConfig(mode=2, n_classes=4)
TRUE_RATES = {"rotation": 0.3, "forward_hop": 4.0, "other_hop": 0.8}


@pytest.fixture(scope="module")
def events():
    return simulate(SYSTEM, 300.0, seed=5).events  # about 9 k events, 800 of them rotations


def config(**changes) -> TrainingConfig:
    values = dict(model=MODEL, epochs=2, segment_events=64)
    values.update(changes)
    return TrainingConfig(**values)


def test_the_plain_mode_2_run_recovers_every_kind_of_move_and_its_rate(events, tmp_path):
    result = train(config(), events, tmp_path / "run")
    first = result.metrics[0]
    assert first["class_init"] == "partition:vn1-occ" and first["class_init_agreement"] > 0.99
    model = load_model(tmp_path / "run")[0]
    table = class_table(model, events, max_events=events.n_events)
    statistics = class_statistics(model, split(events, config())[0])
    chosen = {}
    for kind, row in table.items():  # each true kind of move: >= 99 % of its candidate moves in one class
        if sum(row):
            chosen[kind] = max(range(len(row)), key=row.__getitem__)
            assert row[chosen[kind]] >= 0.99 * sum(row), (kind, row)
    assert len(set(chosen.values())) == len(chosen), chosen  # and each kind in a class of its own
    for kind, rate in TRUE_RATES.items():  # the 99 % interval of n / E covers the true rate
        k = chosen[kind]
        low, high = rate_interval(int(statistics.events[k]), float(statistics.exposure[k]))
        assert low <= rate <= high, (kind, low, high)
    blocked = chosen["blocked_hop"]
    assert statistics.events[blocked] == 0 and model.class_rates()[blocked] < 1e-3 * TRUE_RATES["rotation"]


@pytest.mark.parametrize("changes", [{"class_init": "none"}, {"expected_from_epoch": 1}, {"class_rate_fit": "closed_form_last"}])
def test_a_from_scratch_recipe_runs_as_asked(events, tmp_path, changes):
    result = train(config(epochs=1, **changes), events, tmp_path / "run")
    assert "class_init" not in result.metrics[0]


@pytest.mark.parametrize("jump", [1.0, 0.0])  # a bad jump after the steps; no step at all (no gain)
def test_an_epoch_without_a_clear_held_out_gain_is_undone(events, tmp_path, monkeypatch, jump):
    original = training_module._train_epoch

    def jumping(model, optimizer, window, config, generator, progress):
        if not jump:
            return {"train_U_per_T": 0.0, "train_events": 0}
        stats = original(model, optimizer, window, config, generator, progress)
        with torch.no_grad():
            for parameter in model.classifier.parameters():
                parameter.add_(jump * torch.randn_like(parameter))
        return stats

    monkeypatch.setattr(training_module, "_train_epoch", jumping)
    first = train(config(epochs=1), events, tmp_path / "undone").metrics[0]
    # undone: the held-out U is the start's, exactly (the start's state, scored again)
    assert first["steps_reverted"] and first["val_U_per_T"] == pytest.approx(first["start_val_U_per_T"], rel=1e-12)
    assert math.isfinite(first["val_U_per_T"])


def test_a_run_stops_after_three_undone_epochs_in_a_row(events, tmp_path, monkeypatch):
    # Steps that never move the model: every epoch after the start is undone, and the run stops after
    # UNDONE_EPOCHS_TO_STOP of them instead of running on to its patience (here 8); a resumed run too.
    monkeypatch.setattr(training_module, "_train_epoch", lambda *args: {"train_U_per_T": 0.0, "train_events": 0})
    result = train(config(epochs=8, patience=8), events, tmp_path / "stops")
    assert training_module.UNDONE_EPOCHS_TO_STOP == 3
    assert len(result.metrics) == 3 and result.stopped_early
    assert all(row["steps_reverted"] for row in result.metrics)
    resumed = train(config(epochs=10, patience=8), events, tmp_path / "stops", resume=True)
    assert len(resumed.metrics) == 3 and resumed.stopped_early


@pytest.mark.parametrize("system_name, params, t_final, classes, expected", [
    ("quorum", {"L": 12, "N": 18}, 300.0, 5, "vn1+count5"),  # its forward hops read the 5 x 5 block (R 2)
    ("active", {"L": 12, "density": 0.124}, 50.0, 4, "vn1-occ"),  # a count adds only sparser pairs
])  # fmt: skip
def test_the_start_reads_its_key_family_from_the_data(system_name, params, t_final, classes, expected):
    """Held-out scores of the candidate families' partitions pick the family the rule needs: about 51 k
    quorum events prefer vn1+count5 by 0.08 nats per held-out event; 17 k active events vn1-occ by 0.003
    (the pooled partition's sparse pairs take their pool's classes, so a finer family loses little for
    its sparseness), three times the margin within which the choice takes the smaller family."""
    from hpcdyn.learning.segment_start import PER_EVENT, choose_family
    from hpcdyn.learning.transformer import TransformerRates

    system = make_system(system_name, params, preset="paper")
    log = simulate(system, t_final, seed=3).events
    model = TransformerRates(TransformerConfig(system=system_name, lattice_size=12, mode=2, n_classes=classes))
    objective, _, scores = choose_family(log, model, TrainingConfig(model=model.config))
    assert objective.stats.family == expected
    held_out_events = float(objective.stats.counts[1].sum())
    others = [score for family, score in scores.items() if family != expected]
    assert scores[expected] - max(others) > 2 * PER_EVENT * held_out_events  # decisive, not a tie broken by order
