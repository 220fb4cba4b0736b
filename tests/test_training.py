"""Training runs: learning, checkpoints, resume, the report hook, errors, and the CLI."""

import json
import math

import pytest
import torch

from hpcdyn.learning import training as training_module
from hpcdyn.learning.checkpoint import load_checkpoint
from hpcdyn.cli import main
from hpcdyn.learning.evaluation import evaluate
from hpcdyn.simulation.drivers import simulate, simulate_to_store
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.learning.training import TrainingConfig, load_model, train
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates

SYSTEM = make_system("active", {"L": 6, "N": 5, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})
SMALL = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32)


@pytest.fixture(scope="module")
def events():
    """Short: enough for the mechanics of training, not for learning."""
    return simulate(SYSTEM, 40.0, seed=1).events


@pytest.fixture(scope="module")
def long_events():
    return simulate(SYSTEM, 300.0, seed=1).events


def quick(**changes):
    values = dict(model=SMALL, epochs=2, lr=1e-2, segment_events=64)
    values.update(changes)
    return TrainingConfig(**values)


def test_training_improves_the_validation_likelihood_and_writes_its_files(long_events, tmp_path):
    events = long_events
    seen = []
    result = train(quick(epochs=3), events, tmp_path / "run", report=lambda metrics, folder: seen.append((metrics, folder)))
    assert [m["epoch"] for m, _ in seen] == [0, 1, 2]
    assert all(folder == tmp_path / "run" for _, folder in seen)
    first, last = result.metrics[0], result.metrics[-1]
    assert last["val_U_per_T"] > first["val_U_per_T"]
    assert last["gap_per_event"] < first["gap_per_event"]
    assert {"train_U_per_T", "val_U_per_T", "true_val_U_per_T", "gap_per_event", "train_events_per_second"} <= set(last)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["val_U_per_T"] == last["val_U_per_T"]
    for name in ("best.pt", "last.pt"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        assert state["model_config"]["d_model"] == 16
        assert state["store"]["n_events"] == events.n_events
        assert "optimizer_state" in state and "training_config" in state
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs_done"] == 3


def test_resume_continues_exactly_as_an_uninterrupted_run(events, tmp_path):
    whole = train(quick(epochs=3), events, tmp_path / "whole")
    train(quick(epochs=1), events, tmp_path / "split")
    resumed = train(quick(epochs=3), events, tmp_path / "split", resume=True)
    assert [m["val_U_per_T"] for m in resumed.metrics] == [m["val_U_per_T"] for m in whole.metrics]
    whole_state = load_checkpoint(tmp_path / "whole" / "last.pt")["model_state"]
    resumed_state = load_checkpoint(tmp_path / "split" / "last.pt")["model_state"]
    for name, tensor in whole_state.items():
        assert torch.equal(tensor, resumed_state[name]), name


def test_a_run_checkpointed_before_a_setting_existed_resumes_with_its_default(events, tmp_path):
    train(quick(epochs=1), events, tmp_path / "older")
    state = load_checkpoint(tmp_path / "older" / "last.pt")
    del state["training_config"]["class_rate_fit"]  # as written before the setting existed
    torch.save(state, tmp_path / "older" / "last.pt")
    assert len(train(quick(epochs=2), events, tmp_path / "older", resume=True).metrics) == 2
    with pytest.raises(ConfigurationError, match="class_rate_fit"):  # another value is still refused
        train(quick(epochs=3, class_rate_fit="closed_form"), events, tmp_path / "older", resume=True)


def test_mode_2_training_reports_class_rates(events, tmp_path):
    model = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=2, n_classes=3)
    result = train(quick(model=model, optimizer="adabelief"), events, tmp_path / "mode2")
    assert len(result.metrics[-1]["class_rates"]) == 3
    report = evaluate(tmp_path / "mode2", events)
    assert report["n_classes"] == 3 and len(report["class_rates"]) == 3
    table = report["class_table"]
    assert set(table) == {"rotation", "forward_hop", "other_hop", "blocked_hop"}
    counted = min(events.n_events, 20_000)  # configurations before the first events, each 6 moves per particle
    assert sum(map(sum, table.values())) == pytest.approx(counted * SYSTEM.N * 6, rel=0.01)


def test_the_class_table_leaves_out_the_moves_the_exclusion_mask_forbids(events, tmp_path):
    model = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=2, n_classes=3, exclusion_mask=True)
    train(quick(model=model, epochs=1), events, tmp_path / "masked")
    table = evaluate(tmp_path / "masked", events)["class_table"]
    assert sum(table["blocked_hop"]) == 0
    assert sum(table["rotation"]) == min(events.n_events, 20_000) * SYSTEM.N * 2  # two rotations per particle


def test_gumbel_training_anneals_the_temperature(events, tmp_path):
    model = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=2, n_classes=3, estimator="gumbel")
    temperatures = []
    original = training_module._set_schedules

    def spy(model, optimizer, config, epoch, *more):
        original(model, optimizer, config, epoch, *more)
        temperatures.append(model.temperature)

    training_module._set_schedules = spy
    try:
        train(quick(model=model, epochs=3, gumbel_temperature=(2.0, 0.5)), events, tmp_path / "gumbel")
    finally:
        training_module._set_schedules = original
    assert temperatures == pytest.approx([2.0, 1.0, 0.5])


def test_training_holds_one_segment_of_configurations_at_a_time(events, tmp_path, monkeypatch):
    sizes = []
    original = training_module.segment_terms

    def spy(model, system, positions, states, tokens, moves, dwell):
        sizes.append(len(tokens))
        return original(model, system, positions, states, tokens, moves, dwell)

    monkeypatch.setattr(training_module, "segment_terms", spy)
    train(quick(epochs=1, segment_events=20), events, tmp_path / "memory")
    assert max(sizes) == 20 and len(sizes) > 10


def test_a_finished_run_is_not_overwritten_without_resume(events, tmp_path):
    train(quick(epochs=1), events, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(quick(epochs=1), events, tmp_path / "run")


def test_resume_on_another_trajectory_is_refused(events, tmp_path):
    train(quick(epochs=1), events, tmp_path / "run")
    other = simulate(SYSTEM, 60.0, seed=2).events
    with pytest.raises(ConfigurationError, match="store: the run was trained on"):
        train(quick(epochs=2), other, tmp_path / "run", resume=True)


def test_resume_with_another_configuration_is_refused(events, tmp_path):
    train(quick(epochs=1), events, tmp_path / "run")
    with pytest.raises(ConfigurationError, match="resume: the training configuration differs"):
        train(quick(epochs=2, lr=1e-4), events, tmp_path / "run", resume=True)


def test_corrupt_and_foreign_checkpoints_get_clear_errors(events, tmp_path):
    train(quick(epochs=1), events, tmp_path / "run")
    (tmp_path / "run" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigurationError, match="corrupt"):
        load_model(tmp_path / "run")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigurationError, match="format"):
        load_model(tmp_path / "foreign.pt")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["model_config"]["d_model"] = 32
    torch.save(state, tmp_path / "mismatched.pt")
    with pytest.raises(ConfigurationError, match="does not match"):
        load_model(tmp_path / "mismatched.pt")
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_model(tmp_path / "absent")


@pytest.mark.parametrize(
    "field, changes",
    [
        ("epochs", {"epochs": 0}),
        ("lr", {"lr": -1.0}),
        ("lr", {"lr": math.nan}),
        ("optimizer", {"optimizer": "sgd"}),
        ("segment_events", {"segment_events": 0}),
        ("validation_fraction", {"validation_fraction": 1.0}),
        ("gumbel_temperature", {"gumbel_temperature": (0.1, 1.0)}),
        ("expected_from_epoch", {"expected_from_epoch": -1}),
        ("expected_from_epoch", {"expected_from_epoch": 1.5}),
    ],
)
def test_bad_training_configuration_is_refused_by_name(field, changes):
    with pytest.raises(ConfigurationError, match=f"^{field}:"):
        TrainingConfig(**changes)


def test_too_short_a_trajectory_is_refused(tmp_path):
    short = simulate(SYSTEM, 0.2, seed=1).events
    with pytest.raises(ConfigurationError, match="segment_events: the trajectory has"):
        train(quick(segment_events=10_000), short, tmp_path / "run")


def test_train_and_evaluate_from_the_command_line(tmp_path, capsys):
    store = simulate_to_store(SYSTEM, 20.0, seed=3, out=tmp_path / "run.zarr")
    arguments = ["train", str(store), "--out", str(tmp_path / "model"), "--epochs", "1", "--d-model", "16",
                 "--n-heads", "2", "--n-layers", "1", "--segment-events", "64", "--mode", "2", "--n-classes", "3",
                 "--class-rate-fit", "closed_form", "--expected-from-epoch", "0"]  # fmt: skip
    assert main(arguments) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["epochs"] == 1 and "val_U_per_T" in trained["best"]
    recorded = json.loads((tmp_path / "model" / "config.json").read_text())["config"]
    assert recorded["class_rate_fit"] == "closed_form" and recorded["expected_from_epoch"] == 0
    assert main(arguments) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "model")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"U", "T", "U_per_T", "events", "gap_per_event", "class_rates", "class_table"} <= set(report)
    denser = make_system("active", {"L": 6, "N": 12})  # same lattice, more particles than in training
    other = simulate_to_store(denser, 5.0, seed=4, out=tmp_path / "dense.zarr")
    assert main(["evaluate", str(tmp_path / "model"), str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["events"] > 0
    fa = simulate_to_store(make_system("fa", {"L": 6}), 5.0, seed=4, out=tmp_path / "fa.zarr")
    assert main(["evaluate", str(tmp_path / "model"), str(fa)]) == 2
    assert "system" in capsys.readouterr().err


@pytest.mark.slow
def test_mode_2_with_the_exclusion_mask_recovers_the_three_rates(tmp_path):
    """Told about exclusion, the learner only has to sort moves by the particle's orientation.

    Three classes must come out as D, v_other and v_plus. Tolerance 10 %: with ~17 000 training
    events the statistical error of the rarest rate (rotations, ~2 000 events) is ~2 %, and the
    rest is the finite training budget.
    """
    system = make_system("active", {"L": 8, "N": 6, "D": 0.5, "v_plus": 5.0, "v_other": 1.0})
    events = simulate(system, 400.0, seed=5).events
    model = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=2, n_classes=3, exclusion_mask=True)
    result = train(quick(model=model, epochs=10, lr=1e-2, segment_events=128), events, tmp_path / "masked")
    rates = sorted(result.best["class_rates"])
    assert rates == pytest.approx([0.5, 1.0, 5.0], rel=0.10), rates
    assert result.best["gap_per_event"] < 0.01


def test_the_classifier_switches_to_the_expected_gradient_at_the_chosen_epoch(tmp_path, monkeypatch):
    events = simulate(SYSTEM, 20.0, seed=3).events
    model = TransformerConfig(mode=2, n_classes=3, d_model=16, n_heads=2, n_layers=1, d_ff=16)
    config = TrainingConfig(model=model, epochs=3, lr=1e-2, segment_events=64, expected_from_epoch=1)
    seen = []  # per training step, whether the events were scored apart; the epoch after each epoch
    original_split, original_forward = TransformerRates.split_log_rates, TransformerRates.forward

    def split(self, positions, states):
        seen.append(True)
        return original_split(self, positions, states)

    def forward(self, positions, states):
        if self.training and not self.scores_events_apart:
            seen.append(False)
        return original_forward(self, positions, states)

    monkeypatch.setattr(TransformerRates, "split_log_rates", split)
    monkeypatch.setattr(TransformerRates, "forward", forward)
    result = train(config, events, tmp_path / "run", report=lambda metrics, folder: seen.append(metrics["epoch"]))
    epochs = [i for i, value in enumerate(seen) if not isinstance(value, bool)]
    first, second, third = seen[: epochs[0]], seen[epochs[0] + 1 : epochs[1]], seen[epochs[1] + 1 : epochs[2]]
    assert first and not any(first) and second and all(second) and third and all(third)
    assert len(result.metrics) == 3 and all(math.isfinite(m["val_U_per_T"]) for m in result.metrics)


def test_the_held_out_U_under_the_true_rates_is_kept_beside_the_store_and_read_back(tmp_path, monkeypatch):
    """Every run on a store scores the same held-out window under the store's own rates: computed once,
    kept beside the store (named by its fingerprint and the window's first event), read back to the bit;
    an unreadable file is computed again."""
    from hpcdyn.storage.trajectory_store import open_trajectory

    source = open_trajectory(simulate_to_store(SYSTEM, 40.0, seed=1, out=tmp_path / "t.zarr"))
    config = quick(epochs=1)
    first = training_module.true_validation(source, config)
    kept = list((tmp_path / "t.zarr.statistics").glob("true-heldout-*.json"))
    start = training_module.split(source, config)[1].start
    assert len(kept) == 1 and kept[0].name.endswith(f"-e{start}-s512.json") and math.isfinite(first.log_likelihood)
    computing = training_module.path_log_likelihood
    monkeypatch.setattr(training_module, "path_log_likelihood", lambda *args, **kwargs: pytest.fail("computed again"))
    assert training_module.true_validation(source, config) == first
    assert set(json.loads(kept[0].read_text())) == {"log_likelihood", "t_final", "n_events", "tail"}  # written again
    monkeypatch.setattr(training_module, "path_log_likelihood", computing)  # the run scores its model with it
    run = train(config, source, tmp_path / "run")
    assert run.metrics[0]["true_val_U_per_T"] == first.per_time
    kept[0].write_text("{not json")
    assert training_module.true_validation(source, config) == first
    assert set(json.loads(kept[0].read_text())) == {"log_likelihood", "t_final", "n_events", "tail"}  # written again
