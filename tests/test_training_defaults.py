"""The defaults training chooses from the trajectory: segment length, patience, weight averaging and
whether the absolute position tables are trained."""

import json

import pytest
import torch

from hpcdyn.cli import main
from hpcdyn.learning.checkpoint import load_checkpoint, save_checkpoint
from hpcdyn.learning.training import (
    TrainingConfig,
    default_average_weights,
    default_learn_position_tables,
    default_patience,
    default_segment_events,
    resolve_defaults,
    train,
    training_events,
)
from hpcdyn.learning.transformer import TransformerConfig
from hpcdyn.physics.systems import make_system
from hpcdyn.simulation.drivers import simulate, simulate_to_store

SYSTEM = make_system("active", {"L": 6, "N": 5, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})
SMALL = TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def events():
    return simulate(SYSTEM, 40.0, seed=1).events  # 1,151 events


def recorded(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())["config"]


def test_short_trajectories_get_shorter_segments_and_long_ones_keep_256():
    assert default_segment_events(4_660) == 32  # FA chain L 64, T 350: 145 steps an epoch instead of 18
    assert default_segment_events(23_000) == 128  # FA chain L 10, T 1e4
    assert default_segment_events(32_767) == 128
    assert default_segment_events(32_768) == 256
    assert default_segment_events(1_000) == 16  # the shortest segments
    assert default_segment_events(90_000) == 256  # active L 12, T 300 (about 100 k events)
    assert default_segment_events(774_000) == 256  # active L 30, T 500 (860 k events)
    assert default_segment_events(10) == 10  # never longer than the training part
    assert default_patience(20) == 10 and default_patience(4) == 5 and default_patience(1) == 5


def test_the_training_events_decide_and_an_explicit_value_wins(events):
    config = TrainingConfig(model=SMALL)
    assert training_events(events.n_events, config) == events.n_events - round(0.1 * events.n_events)
    resolved = resolve_defaults(config, events)
    assert resolved.segment_events == 16 and resolved.patience == 10
    assert resolve_defaults(TrainingConfig(max_train_events=100), events).segment_events == 16
    explicit = resolve_defaults(TrainingConfig(segment_events=256, patience=3), events)
    assert (explicit.segment_events, explicit.patience) == (256, 3)
    # a resumed run keeps its checkpoint's segment length unless one is given
    assert resolve_defaults(config, events, {"segment_events": 256}).segment_events == 256
    assert resolve_defaults(TrainingConfig(segment_events=32), events, {"segment_events": 256}).segment_events == 32


def test_the_value_used_is_recorded_and_a_resumed_run_keeps_it(events, tmp_path):
    result = train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2), events, tmp_path / "auto")
    assert recorded(tmp_path / "auto")["segment_events"] == 16 and recorded(tmp_path / "auto")["patience"] == 5
    assert result.metrics[0]["train_events"] == training_events(events.n_events, TrainingConfig())
    # a run started with 256 segments (the former default) resumes without naming them
    train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2, segment_events=256), events, tmp_path / "old")
    resumed = train(TrainingConfig(model=SMALL, epochs=2, lr=1e-2), events, tmp_path / "old", resume=True)
    assert len(resumed.metrics) == 2 and recorded(tmp_path / "old")["segment_events"] == 256


def test_the_command_line_leaves_both_to_the_trajectory_unless_given(tmp_path, capsys):
    store = simulate_to_store(SYSTEM, 20.0, seed=3, out=tmp_path / "run.zarr")
    small = ["--epochs", "1", "--d-model", "16", "--n-heads", "2", "--n-layers", "1"]
    assert main(["train", str(store), "--out", str(tmp_path / "auto"), *small]) == 0
    assert main(["train", str(store), "--out", str(tmp_path / "given"), *small, "--segment-events", "40", "--patience", "2"]) == 0
    capsys.readouterr()
    auto, given = recorded(tmp_path / "auto"), recorded(tmp_path / "given")
    assert auto["segment_events"] == 16 and auto["patience"] == 5 and auto["average_weights"] is True
    assert auto["learn_position_tables"] is False
    assert given["segment_events"] == 40 and given["patience"] == 2


def test_short_trajectories_end_each_epoch_on_its_mean_weights_and_long_ones_do_not(events, tmp_path):
    assert default_average_weights(4_660) and default_average_weights(23_000) and default_average_weights(32_767)
    assert not default_average_weights(32_768) and not default_average_weights(90_000)  # active L 12, L 30: unchanged
    assert not default_average_weights(4_660, mode=2) and default_learn_position_tables(4_660, mode=2)  # Mode 2: unchanged
    config = TrainingConfig(model=SMALL)
    assert resolve_defaults(config, events).average_weights is True
    assert resolve_defaults(TrainingConfig(average_weights=False), events).average_weights is False
    # a checkpoint written before the setting existed ran without it, and resumes so
    assert resolve_defaults(config, events, {"segment_events": 256}).average_weights is False
    assert resolve_defaults(config, events, {"average_weights": True}).average_weights is True
    # the epoch ends on the mean of its steps' weights: not the last step's weights
    averaged = train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2), events, tmp_path / "mean")
    last = train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2, average_weights=False), events, tmp_path / "last")
    assert recorded(tmp_path / "mean")["average_weights"] is True and recorded(tmp_path / "last")["average_weights"] is False
    assert averaged.metrics[0]["train_U_per_T"] == last.metrics[0]["train_U_per_T"]  # same steps
    assert averaged.metrics[0]["val_U_per_T"] != last.metrics[0]["val_U_per_T"]  # other weights scored
    resumed = train(TrainingConfig(model=SMALL, epochs=2, lr=1e-2), events, tmp_path / "last", resume=True)
    assert len(resumed.metrics) == 2 and recorded(tmp_path / "last")["average_weights"] is False


def test_a_run_saved_before_averaging_existed_resumes(events, tmp_path):
    train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2), events, tmp_path / "old")
    for name in ("last.pt", "best.pt"):  # as written before the setting existed
        state = load_checkpoint(tmp_path / "old" / name)
        del state["training_config"]["average_weights"], state["training_config"]["learn_position_tables"]
        save_checkpoint(state, tmp_path / "old" / name)
    resumed = train(TrainingConfig(model=SMALL, epochs=2, lr=1e-2), events, tmp_path / "old", resume=True)
    assert len(resumed.metrics) == 2 and recorded(tmp_path / "old")["average_weights"] is False
    assert recorded(tmp_path / "old")["learn_position_tables"] is True


def test_short_trajectories_keep_the_position_tables_fixed_and_long_ones_train_them(events, tmp_path):
    assert not default_learn_position_tables(4_660) and not default_learn_position_tables(32_767)
    assert default_learn_position_tables(32_768) and default_learn_position_tables(774_000)  # active L 30: unchanged
    assert resolve_defaults(TrainingConfig(model=SMALL), events).learn_position_tables is False
    assert resolve_defaults(TrainingConfig(learn_position_tables=True), events).learn_position_tables is True
    assert resolve_defaults(TrainingConfig(), events, {"segment_events": 256}).learn_position_tables is True  # an older run
    fixed = train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2), events, tmp_path / "fixed")
    learned = train(TrainingConfig(model=SMALL, epochs=1, lr=1e-2, learn_position_tables=True), events, tmp_path / "learned")
    assert recorded(tmp_path / "fixed")["learn_position_tables"] is False
    assert recorded(tmp_path / "learned")["learn_position_tables"] is True
    tables = {name: load_checkpoint(tmp_path / name / "last.pt")["model_state"]["embed_x.weight"] for name in ("fixed", "learned")}
    assert torch.count_nonzero(tables["fixed"]) == 0 and torch.count_nonzero(tables["learned"]) > 0  # zero at the start
    assert fixed.metrics[0]["val_U_per_T"] != learned.metrics[0]["val_U_per_T"]
    resumed = train(TrainingConfig(model=SMALL, epochs=2, lr=1e-2), events, tmp_path / "fixed", resume=True)
    assert len(resumed.metrics) == 2
    assert torch.count_nonzero(load_checkpoint(tmp_path / "fixed" / "last.pt")["model_state"]["embed_x.weight"]) == 0
