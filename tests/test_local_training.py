"""Training a hard-local model on sufficient statistics through train() (hpcdyn.learning.local_training)."""

import json
import math

import numpy as np
import pytest
import torch

from hpcdyn.cli.main import main
from hpcdyn.learning.likelihood import path_log_likelihood
from hpcdyn.learning.statistics import split_points
from hpcdyn.learning.training import TrainingConfig, load_model, train
from hpcdyn.learning.transformer import TransformerConfig
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.simulation.drivers import simulate, simulate_to_store
from hpcdyn.storage.events import EventWindow

SYSTEM = make_system("active", {"L": 10, "N": 14, "D": 0.1, "v_plus": 10.0, "v_other": 1.0})


@pytest.fixture(scope="module")
def events():
    return simulate(SYSTEM, 30.0, seed=1).events


def local_config(mode=2, **training) -> TrainingConfig:
    model = TransformerConfig(system="active", lattice_size=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, mode=mode,
                              n_classes=4, rotary=False, attention_stencil="vn1")  # fmt: skip
    values = {"epochs": 3, "lr": 2e-2, "statistics_steps": 20, "segment_events": 64, **training}
    return TrainingConfig(model=model, **values)


def test_train_dispatches_hard_local_models_to_statistics(events, tmp_path):
    result = train(local_config(class_rate_fit="closed_form"), events, tmp_path / "run")
    last = result.metrics[-1]
    assert last["trained_on"] == "statistics:vn1"
    assert last["statistics_keys"] > 10
    assert last["train_U_per_T"] <= last["ml_train_U_per_T"] + 1e-9  # the ceiling of every vn1 model
    # the validation U/T reported is the path likelihood of the held-out tail, exactly (float32 model: 1e-5)
    model, _ = load_model(tmp_path / "run")
    _, boundary = split_points(events.n_events, 0.1)
    heldout = path_log_likelihood(EventWindow(events, boundary, events.n_events), model)
    best = result.best
    assert best["val_U_per_T"] == pytest.approx(heldout.per_time, rel=1e-5)
    assert best["gap_per_event"] >= -0.05  # the true rates explain the held-out data at least about as well


@pytest.mark.slow
@pytest.mark.parametrize("class_init", ["none", "auto"])
def test_statistics_training_improves_and_resumes_identically(events, tmp_path, class_init):
    """From scratch the gradient steps raise U; from the partition start (already near the optimum) an
    epoch never lowers the held-out U (steps that would are undone). Either way a resumed run
    continues exactly as an uninterrupted one."""
    config = local_config(epochs=4, lr_schedule="constant", patience=10, class_init=class_init)
    full = train(config, events, tmp_path / "full")
    if class_init == "none":
        assert full.metrics[-1]["train_U_per_T"] > full.metrics[0]["train_U_per_T"]
    else:
        held_out = [m["val_U_per_T"] for m in full.metrics]
        assert held_out == sorted(held_out)
    train(local_config(epochs=2, lr_schedule="constant", patience=10, class_init=class_init), events, tmp_path / "half")
    resumed = train(config, events, tmp_path / "half", resume=True)
    assert [m["val_U_per_T"] for m in resumed.metrics] == [m["val_U_per_T"] for m in full.metrics]


def test_mode_1_and_mini_batches(events, tmp_path):
    result = train(local_config(mode=1, statistics_batch_keys=8), events, tmp_path / "mode1")
    assert result.metrics[-1]["trained_on"] == "statistics:vn1"
    assert result.metrics[-1]["val_U_per_T"] > result.metrics[0]["val_U_per_T"] - 1.0


def test_the_classifier_fit_takes_its_own_lr_or_the_lr(events, tmp_path, monkeypatch):
    from hpcdyn.learning import local_training

    taken = []
    fit = local_training.fit_classifier

    def recording(objective, model, targets, weights, lr, **options):
        taken.append(lr)
        return fit(objective, model, targets, weights, lr, **options)

    monkeypatch.setattr(local_training, "fit_classifier", recording)
    for name, options in (("default", {}), ("own", {"classifier_lr": 5e-2})):
        result = train(local_config(epochs=1, **options), events, tmp_path / name)
        assert result.metrics[0]["class_init_steps"] >= 1  # the start ran its fit
    assert taken == [2e-2, 5e-2]
    for bad in (0.0, -1e-3, math.inf, True):
        with pytest.raises(ConfigurationError, match="^classifier_lr:"):
            TrainingConfig(classifier_lr=bad)


def test_bad_statistics_options_refused():
    with pytest.raises(ConfigurationError, match="^statistics_steps:"):
        TrainingConfig(statistics_steps=0)
    with pytest.raises(ConfigurationError, match="^statistics_batch_keys:"):
        TrainingConfig(statistics_batch_keys=0)
    with pytest.raises(ConfigurationError, match="^class_init:"):
        TrainingConfig(class_init="kmeans")


def test_cli_trains_from_statistics_and_refuses_mode_2_recipes_on_mode_1(tmp_path, capsys):
    store = simulate_to_store(SYSTEM, 8.0, seed=2, out=tmp_path / "run.zarr")
    common = ["train", str(store), "--attention-stencil", "vn1", "--d-model", "16", "--n-heads", "2", "--n-layers", "1",
              "--d-ff", "16", "--epochs", "1", "--statistics-steps", "5", "--segment-events", "32"]  # fmt: skip
    assert main([*common, "--mode", "2", "--classifier-lr", "0.03", "--out", str(tmp_path / "out")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["trained_on"] == "statistics:vn1"
    config = json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    assert (config["lr"], config["classifier_lr"]) == (3e-3, 0.03)
    assert list((tmp_path / "run.zarr.statistics").glob("vn1-*.zarr"))  # kept beside the store
    capsys.readouterr()
    for option in (["--class-rate-fit", "closed_form"], ["--expected-from-epoch", "1"], ["--class-init", "partition"]):
        assert main([*common, "--mode", "1", *option, "--out", str(tmp_path / "refused")]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and option[0] in error
        assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit) as exit_info:  # a stencil no system knows: argparse refuses it by name
        main([*common, "--attention-stencil", "hex7", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "hex7" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_rules_reads_classes_and_a_tree(tmp_path, capsys):
    store = simulate_to_store(SYSTEM, 8.0, seed=4, out=tmp_path / "run.zarr")
    common = ["train", str(store), "--attention-stencil", "vn1", "--d-model", "16", "--n-heads", "2", "--n-layers", "1",
              "--d-ff", "16", "--epochs", "2", "--statistics-steps", "10"]  # fmt: skip
    assert main([*common, "--mode", "2", "--out", str(tmp_path / "m2")]) == 0
    assert main([*common, "--mode", "1", "--out", str(tmp_path / "m1")]) == 0
    capsys.readouterr()
    assert main(["rules", str(tmp_path / "m2")]) == 0
    text = capsys.readouterr().out
    assert "events/exposure" in text and "accuracy" in text and "if " in text
    header = text.splitlines().index("class  rate        events      exposure        events/exposure  99 % interval of n/E")
    assert all(line.split()[0].isdigit() for line in text.splitlines()[header + 1 : header + 5])
    assert main(["rules", str(tmp_path / "m1"), "--bins", "3"]) == 0
    assert "level 2" in capsys.readouterr().out
    _class_evidence_two_ways(tmp_path / "m2", tmp_path / "m1")


def _class_evidence_two_ways(mode2, mode1):
    # The intervals' counts come from the sufficient statistics; replaying every training event through
    # the same model (the path of a model that is not hard-local) must give the same events and exposure.
    from hpcdyn.learning.class_rates import class_statistics
    from hpcdyn.learning.rate_intervals import class_rates_with_intervals
    from hpcdyn.learning.training import split
    from hpcdyn.storage.trajectory_store import open_trajectory

    evidence = class_rates_with_intervals(mode2)
    model, state = load_model(mode2)
    training = TrainingConfig.from_dict(state["training_config"])
    window = split(open_trajectory(state["store"]["path"]), training)[0]
    replayed = class_statistics(model.double(), window)
    order = np.argsort(model.class_rates())
    assert [entry.events for entry in evidence.classes] == replayed.events.numpy()[order].astype(int).tolist()
    assert sum(entry.events for entry in evidence.classes) == window.n_events  # every event is in one class
    np.testing.assert_allclose([entry.exposure for entry in evidence.classes], replayed.exposure.numpy()[order], rtol=1e-9)
    assert all(entry.low <= entry.events / entry.exposure <= entry.high for entry in evidence.classes if entry.events)
    assert set(evidence.true_rates) == {"D", "v_other", "v_plus"}
    with pytest.raises(ConfigurationError, match="^run: .*Mode 1"):
        class_rates_with_intervals(mode1)


def test_range_study_and_its_plateau(tmp_path):
    import numpy as np
    import xarray as xr

    from hpcdyn.distributed.sweep import check_study
    from sweeps import get_study
    from sweeps.range import STENCILS, find_range, plot_range

    points = check_study(get_study("range", smoke=True))
    assert {p["model.attention_stencil"] for p in points} == set(STENCILS[:3]) and {p["model.mode"] for p in points} == {1, 2}
    # held-out U/T (1000 events per unit time): vn1 already at the plateau for Mode 2, block3 for Mode 1
    values = np.array([[[100.0, 100.1], [80.0, 80.2]], [[100.2, 100.1], [99.9, 100.0]],
                       [[100.3, 100.2], [100.1, 100.0]], [[100.1, 100.0], [100.0, 100.2]]])  # fmt: skip
    dataset = xr.Dataset(
        {"val_U_per_T": (("attention_stencil", "mode", "seed"), values),
         "val_U_per_event": (("attention_stencil", "mode", "seed"), values / 1000.0)},  # fmt: skip
        coords={"attention_stencil": STENCILS, "mode": [2, 1], "seed": [0, 1]},
    )
    plateau = find_range(dataset)
    assert plateau.r_star == {2: "vn1", 1: "block3"}
    assert plot_range(dataset, plateau, tmp_path / "range.png").exists()
    from sweeps import study_summary

    summary = study_summary("range", dataset, tmp_path)  # what `hpcdyn sweep range` prints and records
    assert summary["r_star"] == {"mode_2": "vn1", "mode_1": "block3"}
    assert summary["lines"][0].startswith("r* = vn1 (Mode 2") and (tmp_path / "range.png").exists()
    assert study_summary("ntheta", dataset, tmp_path) == {}


def test_the_quorum_range_study_climbs_a_count_ladder_and_orders_it_by_range():
    import numpy as np
    import xarray as xr

    from hpcdyn.distributed.sweep import check_study
    from sweeps import get_study
    from hpcdyn.learning.names import stencil_reach
    from sweeps.range import COUNT_LADDER, find_range, ladder_order

    points = check_study(get_study("range", smoke=True, system="quorum"))
    assert {p["model.attention_stencil"] for p in points} == set(COUNT_LADDER)
    assert [stencil_reach(name) for name in COUNT_LADDER] == [1, 1, 2, 3]
    assert ladder_order(["vn1+count7", "block5", "vn1+count5", "vn1", "vn1+count3"]) == [
        "vn1", "vn1+count3", "vn1+count5", "block5", "vn1+count7"]  # fmt: skip
    # held-out U/T rises until the count covers the 5 x 5 block (R 2), then stays: r* = vn1+count5
    values = np.array([[111.9], [114.2], [145.8], [145.8]])
    dataset = xr.Dataset({"val_U_per_T": (("attention_stencil", "seed"), values),
                          "val_U_per_event": (("attention_stencil", "seed"), values / 300.0)},  # fmt: skip
                         coords={"attention_stencil": COUNT_LADDER, "seed": [0]})  # fmt: skip
    assert find_range(dataset).r_star == {0: "vn1+count5"}


def test_rate_intervals_follow_the_poisson_standard_error():
    import math

    from hpcdyn.learning.rate_intervals import rate_interval

    low, high = rate_interval(400, 100.0)  # n/E = 4, standard error sqrt(400)/100 = 0.2
    assert (low, high) == pytest.approx((4 - 2.5758 * 0.2, 4 + 2.5758 * 0.2), rel=1e-4)
    assert rate_interval(0, 10.0) == pytest.approx((0.0, math.log(100) / 10))  # P(no event | rate) = 1 % at the top
    assert all(math.isnan(v) for v in rate_interval(3, 0.0))


def test_a_class_holds_a_true_rate_its_99_percent_interval_misses_by_chance_but_not_a_mixed_one():
    """The large preset's T 5000 trajectory, every kind of move in its own class (counted by true move type):
    v_other's n/E 1.00273 +- 0.00093 lies 2.9 standard errors from 1, outside its 99 % interval; the class
    still holds those moves (within MATCH_ERRORS). A class of rotations and other hops together (n/E 0.55)
    holds neither, nor does a class 5 standard errors off."""
    from hpcdyn.distributed.pipeline import interval_words
    from hpcdyn.learning.rate_intervals import ClassRate, RateEvidence, rate_interval

    def class_entry(events, exposure):
        return ClassRate(events / exposure, events, exposure, *rate_interval(events, exposure))

    true_rates = {"D": 0.1, "v_other": 1.0, "v_plus": 25.0}
    counts = [(0, 605529.4), (101285, 1007491.6), (1158408, 1155250.1), (6356598, 254203.8)]
    evidence = RateEvidence([class_entry(n, e) for n, e in counts], true_rates)
    assert evidence.covering() == {"D": 1, "v_other": None, "v_plus": 3}
    assert evidence.matching() == {"D": 1, "v_other": 2, "v_plus": 3}
    assert evidence.matching(errors=2.5)["v_other"] is None
    record = {"classes": [entry.as_dict() for entry in evidence.classes], "true_rates": true_rates,
              "covered_by": evidence.covering(), "matched_by": evidence.matching(), "blocked": evidence.blocked()}  # fmt: skip
    assert "NOT covered: v_other 1 (its moves in class 2 all the same, 2.9 standard errors off)" in interval_words(record)
    mixed = RateEvidence([class_entry(0, 6e5), class_entry(110_000, 200_000.0), class_entry(6356598, 254203.8)], true_rates)
    assert mixed.matching() == {"D": None, "v_other": None, "v_plus": 2}
    off = RateEvidence([class_entry(10_000, 10_000 / (1 + 5 / 100))], {"v_other": 1.0})  # n/E 5 errors (sqrt(n)/E ~ 1/100) up
    assert off.matching() == {"v_other": None}


def test_tree_rules_name_the_classes_the_tree_saw():
    import numpy as np
    from sklearn.tree import DecisionTreeClassifier

    from hpcdyn.cli.rules import tree_rules

    features = np.array([[0], [1], [2], [3]])
    target = np.array([1, 1, 3, 3])  # classes 0 and 2 unused: the tree's own indices are 0 and 1
    tree = DecisionTreeClassifier(max_depth=2, random_state=0).fit(features, target)
    text = tree_rules(tree, ["move"], ["class 0", "class 1", "class 2", "class 3"])
    assert "-> class 1" in text and "-> class 3" in text and "class 0" not in text and "class 2" not in text


def test_mode_2_from_the_partition_puts_every_kind_of_move_in_a_class_of_its_own(tmp_path):
    """The default Mode 2 recipe on statistics (class_init auto) on a trajectory of ~21 k events: the
    forward, other and blocked hops each wholly in one class, the rotations at least 98 % in theirs
    (a rotation never seen in a rare environment is indistinguishable from a blocked move there), the
    four classes distinct, each rate within 10 % of the truth (hundreds of events per kind or more:
    > 2 standard errors), the held-out gap below 0.002 nats/event. The blocked class's rate is that of
    the rotations sharing it (<= 2 % of them: below 1e-2 D here; the paper-size trajectory in
    benchmarks/TRAINING.md reaches 1e-4 D)."""
    from hpcdyn.learning.evaluation import class_table

    events = simulate(SYSTEM, 150.0, seed=1).events
    result = train(local_config(epochs=1, lr=2e-2), events, tmp_path / "run")
    assert result.metrics[0]["class_init_steps"] >= 25
    assert result.best["gap_per_event"] < 0.002
    model, _ = load_model(tmp_path / "run")
    table = class_table(model, events)
    classes = {kind: max(range(4), key=lambda k: row[k]) for kind, row in table.items()}
    assert len(set(classes.values())) == 4
    for kind in ("forward_hop", "other_hop", "blocked_hop"):
        assert sum(1 for count in table[kind] if count) == 1, (kind, table[kind])
    assert table["rotation"][classes["rotation"]] >= 0.98 * sum(table["rotation"])
    rates = model.class_rates()
    assert rates[classes["blocked_hop"]] < 1e-2 * SYSTEM.D
    for kind, rate in (("rotation", SYSTEM.D), ("forward_hop", SYSTEM.v_plus), ("other_hop", SYSTEM.v_other)):
        assert rates[classes[kind]] == pytest.approx(rate, rel=0.1), kind


def test_pair_pools_join_the_pairs_of_one_move_own_state_and_target_content(events):
    """A pair's pool (the prior of the pooled partition) is its move, the moving particle's orientation and
    the key digit of the site the move goes to: every rotation pair of an orientation in one pool whatever
    its neighbours, a hop's pairs split by what sits on the target site."""
    from hpcdyn.learning.local_training import StatisticsObjective, pair_pools
    from hpcdyn.learning.statistics import trajectory_statistics
    from hpcdyn.physics.environments import decode_keys

    stats = trajectory_statistics(events, "vn1", 0.1)
    objective = StatisticsObjective(stats, SYSTEM)
    pools = pair_pools(objective, SYSTEM.n_moves).reshape(stats.n_keys, SYSTEM.n_moves)
    patches = decode_keys(objective.encoder, stats.keys).astype(int)
    stencil = list(objective.encoder.offsets)
    for move, (dx, dy, _) in enumerate(SYSTEM.move_table):
        target = patches[:, 1 + stencil.index((int(dx), int(dy)))] if (dx, dy) != (0, 0) else np.zeros(stats.n_keys, int)
        label = patches[:, 0] * 100 + target
        # the same (own state, target digit) <=> the same pool, within a move
        assert len(set(zip(label, pools[:, move]))) == len(set(label)) == len(set(pools[:, move]))
    assert not set(pools[:, 0]) & set(pools[:, 2])  # different moves never share a pool


def test_a_step_takes_every_key_up_to_a_bound_and_a_sample_beyond():
    from hpcdyn.learning.local_training import FULL_BATCH_KEYS, SAMPLED_KEYS, batch_keys

    config = TrainingConfig()
    assert batch_keys(config, FULL_BATCH_KEYS) is None and batch_keys(config, FULL_BATCH_KEYS + 1) == SAMPLED_KEYS
    assert batch_keys(TrainingConfig(statistics_batch_keys=8), 10) == 8  # asked for: as asked
