"""The locality certificate: exact for hard-local models by construction, failing for unrestricted ones,
written beside the checkpoint, and refusing bad input by name."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from hpcdyn.cli.main import main
from hpcdyn.learning.checkpoint import save_checkpoint
from hpcdyn.learning.locality import (
    Sample, certify, evaluate_patches, read_certificate, samples_from_store, write_certificate,
)  # fmt: skip
from hpcdyn.learning.training import load_model
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
from hpcdyn.physics.environments import make_encoder, patches
from hpcdyn.physics.replay import replay_segment
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.simulation.drivers import simulate, simulate_to_store

SYSTEM = make_system("active", {"L": 8, "N": 8, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})


def perturbed(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(noise * 0.1 if name.endswith("offset_bias") else parameter + 0.3 * noise)
    return model


def save_run(directory, config, system=SYSTEM, seed=0):
    """A run directory with best.pt holding a model of random weights trained, nominally, on system."""
    model = perturbed(TransformerRates(config), seed)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format": "hpcdyn.checkpoint/1", "model_config": config.as_dict(), "model_state": model.state_dict(),
             "optimizer_state": {}, "training_config": {}, "metrics": [],
             "store": {"system": system.name, "params": system.params()}}  # fmt: skip
    save_checkpoint(state, directory / "best.pt")
    return directory


def random_samples(densities=(0.125, 0.5), configurations=6, seed=1):
    rng = np.random.default_rng(seed)
    samples = []
    for density in densities:
        system = make_system("active", {**SYSTEM.params(), "N": int(density * 64)})
        drawn = [system.initial_configuration(rng) for _ in range(configurations)]
        samples.append(Sample(f"density {density}", density, np.stack([p for p, _ in drawn]),
                              np.stack([s for _, s in drawn]).astype(np.int64)))  # fmt: skip
    return samples


def local_config(stencil="vn1", layers=2, mode=1):
    return TransformerConfig(lattice_size=8, d_model=16, n_heads=4, n_layers=layers, d_ff=16, mode=mode, n_classes=3,
                             attention_stencil=stencil, rotary=False)  # fmt: skip


@pytest.mark.parametrize("stencil, layers, mode", [("vn1", 2, 1), ("vn1", 1, 2)])
def test_a_hard_local_model_passes_at_its_receptive_field_and_only_at_families_covering_it(tmp_path, stencil, layers, mode):
    run = save_run(tmp_path / "run", local_config(stencil, layers, mode))
    families = ("vn1-occ", "vn1", "block3", "diamond2")
    certificate = certify(run, random_samples(), families)
    expected = "vn1" if layers == 1 else "diamond2"
    assert certificate.receptive_family == expected and certificate.family == expected and certificate.passes
    rows = {row.family: row for row in certificate.families}
    covering = {"vn1", "block3", "diamond2"} if layers == 1 else {"diamond2"}
    for family, row in rows.items():
        worst = max(sample.max for sample in row.samples)
        if family in covering:
            assert row.passes and worst < 1e-5, (family, worst)  # float32 rounding only
        else:
            assert not row.passes and worst > 1e-3, (family, worst)  # random weights see what the key misses
    if mode == 2:
        assert all(sample.class_disagreement == 0 for sample in rows[expected].samples)
    sample = rows[expected].samples[0]
    assert set(sample.by_move_type) <= {"rotation", "forward_hop", "other_hop", "blocked_hop"}
    assert sample.tokens == 6 * 8 and 0 < sample.distinct_keys <= sample.tokens


def test_an_unrestricted_model_fails_and_its_certificate_says_by_how_much(tmp_path):
    config = TransformerConfig(lattice_size=8, d_model=16, n_heads=4, n_layers=1, d_ff=16)
    run = save_run(tmp_path / "run", config)
    certificate = certify(run, random_samples(), ("vn1", "block5"))
    assert certificate.family is None and not certificate.passes and certificate.receptive_family is None
    assert all(row.samples[0].percentiles["p99"] > 0.01 for row in certificate.families)


def test_patches_alone_are_placed_as_the_keys_say(tmp_path):
    """Evaluating a key's patch alone equals the model on that patch centred on an empty lattice
    (checked through a hard-local model, whose rates depend on the patch only)."""
    model = perturbed(TransformerRates(local_config("vn1", 1))).eval()
    encoder = make_encoder("vn1", SYSTEM)
    positions = torch.tensor([[[4, 4], [5, 4], [4, 3]]])  # a centre, its +x and -y neighbours
    states = torch.tensor([[2, 0, 3]])
    digits = patches(encoder, SYSTEM, positions.numpy(), states.numpy())[0, :1]
    alone, _ = evaluate_patches(model, encoder, SYSTEM, digits)
    with torch.no_grad():
        direct = model(positions, states)[0, 0].double().numpy()
    np.testing.assert_allclose(alone[0], direct, atol=1e-6)


def test_certificate_is_written_beside_the_checkpoint_and_read_back(tmp_path):
    run = save_run(tmp_path / "run", local_config("vn1", 1, mode=2))
    certificate = certify(run, random_samples(configurations=2), ("vn1-occ", "vn1"))
    json_path, figure_path = write_certificate(certificate, run)
    assert json_path == run / "locality.json" and figure_path.stat().st_size > 1000
    stored = json.loads(json_path.read_text())
    assert stored["passes"] is True and stored["family"] == "vn1" and len(stored["checkpoint_sha256"]) == 64
    assert read_certificate(run) == certificate


def test_samples_from_a_store_are_the_configurations_before_evenly_spaced_events(tmp_path):
    from hpcdyn.storage.trajectory_store import open_trajectory

    path = simulate_to_store(SYSTEM, 5.0, seed=2, out=tmp_path / "run.zarr")
    trajectory = open_trajectory(path)
    sample = samples_from_store(trajectory, 4)
    events = simulate(SYSTEM, 5.0, seed=2).events
    every_positions, every_states = replay_segment(
        SYSTEM, torch.as_tensor(events.initial_positions), torch.as_tensor(events.initial_states).long(),
        torch.as_tensor(events.tokens), torch.as_tensor(events.moves),
    )  # fmt: skip
    stops = np.linspace(0, events.n_events, 4, endpoint=False).astype(int)
    assert np.array_equal(sample.positions, every_positions[stops].numpy())
    assert np.array_equal(sample.states, every_states[stops].numpy())


def test_an_old_checkpoint_without_the_stencil_field_loads_as_unrestricted(tmp_path):
    config = TransformerConfig(lattice_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=8)
    run = save_run(tmp_path / "run", config)
    state = torch.load(run / "best.pt", weights_only=True)
    del state["model_config"]["attention_stencil"]  # as written before the field existed
    save_checkpoint(state, run / "best.pt")
    model, _ = load_model(run)
    assert model.config.attention_stencil is None and model.config.key_family is None


@pytest.mark.slow
def test_the_command_certifies_fresh_configurations_and_writes_beside_the_run(tmp_path, capsys):
    run = save_run(tmp_path / "run", local_config("vn1", 1, mode=1))
    assert main(["locality", str(run), "--family", "vn1", "--family", "vn1-occ", "--configurations", "2",
                 "--burn-in", "1", "--spacing", "0.5"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["family"] == "vn1" and printed["families"]["vn1"]["passes"]
    stored = json.loads((run / "locality.json").read_text())
    assert [sample["density"] for sample in stored["families"][0]["samples"]] == [0.125, 0.296875, 0.5]
    assert (run / "locality.png").exists()


def test_the_command_refuses_an_unknown_family_and_a_store_of_another_system_by_name(tmp_path, capsys):
    run = save_run(tmp_path / "run", local_config("vn1", 1, mode=1))
    assert main(["locality", str(run), "--family", "hexagon3"]) == 2
    error = capsys.readouterr().err
    assert "key family: must be one of" in error and "block5-occ" in error and "'hexagon3'" in error
    fa = simulate_to_store(make_system("fa", {"L": 8, "dim": 2, "c": 0.3}), 1.0, seed=1, out=tmp_path / "fa.zarr")
    assert main(["locality", str(run), "--store", str(fa)]) == 2
    error = capsys.readouterr().err
    assert "store: " in error and "'fa' system" in error and "trained on 'active'" in error
    assert not (run / "locality.json").exists()


def test_a_count_family_fails_for_a_model_that_reads_where_the_counted_particles_sit(tmp_path):
    """A count key holds how many particles its block has, not where: a table keeps one patch per key.
    A hard-local block3 model reads where they sit. On configurations whose particles all point one way
    (orientation 0, what a count patch's occupied sites stand for) every token's own vn1+count3 patch is
    its whole block, so a certificate that evaluated each token's own patch passed this model; the
    table would not hold it, and the certificate, one patch per key as the table, fails it. A
    vn1+count3 model passes at its own family."""
    aligned = [dataclasses.replace(sample, states=np.zeros_like(sample.states)) for sample in random_samples()]
    reading = certify(save_run(tmp_path / "block3", local_config("block3", 1)), aligned, ("vn1+count3", "block3"))
    rows = {row.family: row for row in reading.families}
    assert rows["block3"].passes and not rows["vn1+count3"].passes
    assert max(sample.percentiles["p99"] for sample in rows["vn1+count3"].samples) > 0.01
    assert all(sample.distinct_keys < sample.tokens for sample in rows["vn1+count3"].samples)  # keys shared by patches
    counting = certify(save_run(tmp_path / "count", local_config("vn1+count3", 1)), random_samples(), ("vn1+count3",))
    assert counting.passes and counting.family == "vn1+count3"


def trained_on(run, store, metrics=()):
    """Point a saved run's checkpoint at the trajectory it was (nominally) trained on."""
    from hpcdyn.learning.checkpoint import store_identity

    state = torch.load(run / "best.pt", weights_only=True)
    state["store"], state["training_config"] = store_identity(store), {"validation_fraction": 0.1}
    state["metrics"] = list(metrics)
    save_checkpoint(state, run / "best.pt")
    return run


def test_the_certificate_reports_the_criterion_on_the_keys_the_training_part_showed(tmp_path):
    """Configurations of the training part have only keys it showed (so the statistics' keys and the
    certificate's are the same encoding); crowds a density-1/8 trajectory never had have mostly new
    block3 keys, and the criterion is taken on the others alone. Read back as written."""
    from hpcdyn.storage.trajectory_store import open_trajectory

    trajectory = open_trajectory(simulate_to_store(SYSTEM, 5.0, seed=2, out=tmp_path / "train.zarr"))
    config = TransformerConfig(lattice_size=8, d_model=16, n_heads=4, n_layers=1, d_ff=16, mode=2, n_classes=3)
    run = trained_on(save_run(tmp_path / "run", config), trajectory)
    own = samples_from_store(trajectory, 4)  # before events 0, n/4, n/2, 3n/4: all in the training 90 %
    crowded = random_samples(densities=(0.5,))[0]
    certificate = certify(run, [own, crowded], ("vn1-occ", "block3"), training_store=trajectory)
    for row in certificate.families:
        training, dense = row.samples
        assert training.seen == {"unseen_tokens": 0.0, "moves": training.tokens * SYSTEM.n_moves,
                                 "p99": training.percentiles["p99"], "class_disagreement": training.class_disagreement}
        seen_tokens = round((1 - dense.seen["unseen_tokens"]) * dense.tokens)
        assert dense.seen["moves"] == seen_tokens * SYSTEM.n_moves
    block3 = certificate.families[1].samples[1]
    assert block3.seen["unseen_tokens"] > 0.5 and block3.seen["p99"] <= block3.max
    write_certificate(certificate, run)
    assert read_certificate(run) == certificate
    assert certify(run, [own], ("vn1",)).families[0].samples[0].seen is None  # not asked: not computed


def test_on_seen_keys_takes_the_criterion_over_the_tokens_with_a_seen_key():
    from hpcdyn.learning.locality import on_seen_keys

    seen = np.array([True, False, True])
    difference = np.array([[0.0, 0.5], [9.0, 9.0], [0.25, 0.0]])
    differs = np.array([[False, True], [True, True], [False, False]])
    assert on_seen_keys(seen, difference, differs) == {"unseen_tokens": pytest.approx(1 / 3), "moves": 4, "p99": 0.5,
                                                      "class_disagreement": 0.25}  # fmt: skip
    assert on_seen_keys(np.zeros(3, bool), difference, None) == {"unseen_tokens": 1.0, "moves": 0, "p99": None,
                                                                 "class_disagreement": None}  # fmt: skip


def test_the_command_finds_the_training_store_and_refuses_another_by_name(tmp_path, capsys):
    from hpcdyn.storage.trajectory_store import open_trajectory

    store = simulate_to_store(SYSTEM, 3.0, seed=2, out=tmp_path / "train.zarr")
    other = simulate_to_store(SYSTEM, 3.0, seed=3, out=tmp_path / "other.zarr")
    run = trained_on(save_run(tmp_path / "run", local_config("vn1", 1, mode=1)), open_trajectory(store))
    assert main(["locality", str(run), "--store", str(store), "--family", "vn1", "--configurations", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["training_store"] == str(store)
    assert printed["families"]["vn1"]["on_seen_keys"][str(store)]["unseen_tokens"] == 0.0
    assert main(["locality", str(run), "--store", str(store), "--family", "vn1", "--no-training-keys"]) == 0
    assert json.loads(capsys.readouterr().out)["training_store"] is None
    assert main(["locality", str(run), "--store", str(store), "--family", "vn1", "--training-store", str(other)]) == 2
    error = capsys.readouterr().err
    assert "training-store: " in error and "not the trajectory the model was trained on" in error


def test_a_table_is_scored_on_the_held_out_events_as_the_network_is(tmp_path):
    """A hard-local vn1 model's table at vn1 (and at block3, which covers it) is the model: its held-out U
    from the statistics (sum n log(rate) - E rate over keys and moves) equals the network's path
    log-likelihood over the held-out events (float32 rates: 1e-6 per event); at vn1-occ, which drops
    the neighbours' orientations that random weights read, the table scores otherwise."""
    from hpcdyn.learning.likelihood import path_log_likelihood
    from hpcdyn.learning.locality import load_certified_model
    from hpcdyn.learning.training import TrainingConfig, split, true_validation
    from hpcdyn.storage.trajectory_store import open_trajectory

    trajectory = open_trajectory(simulate_to_store(SYSTEM, 100.0, seed=2, out=tmp_path / "train.zarr"))
    config = local_config("vn1", 1, mode=1)
    torch.manual_seed(0)  # the model's initial weights, before save_run perturbs them
    run = save_run(tmp_path / "run", config)
    model, _ = load_certified_model(run / "best.pt")
    training = TrainingConfig(model=config, segment_events=64)
    network = path_log_likelihood(split(trajectory, training)[1], model)
    truth = true_validation(trajectory, training)
    metrics = [{"val_U_per_T": network.per_time, "val_U_per_event": network.per_event, "true_val_U_per_T": truth.per_time}]
    certificate = certify(trained_on(run, trajectory, metrics), random_samples(configurations=2),
                          ("vn1-occ", "vn1", "block3"), training_store=trajectory)  # fmt: skip
    rows = {row.family: row.heldout for row in certificate.families}
    assert rows["vn1"]["events"] == network.n_events > 100
    for covering in ("vn1", "block3"):
        assert abs(rows[covering]["table_minus_network_per_event"]) < 1e-6, rows[covering]
        assert rows[covering]["network_gap_per_event"] == pytest.approx((truth.log_likelihood - network.log_likelihood) / network.n_events)
    occupancy = rows["vn1-occ"]["table_minus_network_per_event"]
    assert abs(occupancy) > 1e-3  # random weights: the table may score above the network or below it
    assert certificate.heldout_family == ("vn1-occ" if occupancy >= -1e-3 else "vn1")  # the smallest within 1e-3
    assert read_certificate(write_certificate(certificate, run)[0]) == certificate


def test_a_table_that_makes_a_held_out_event_impossible_reads_back_as_minus_infinity(tmp_path):
    """Its held-out U is -inf, which JSON writes as null: read back with its sign."""
    run = save_run(tmp_path / "run", local_config("vn1", 1, mode=1))
    certificate = certify(run, random_samples(configurations=2), ("vn1",))
    scores = {"events": 10, "table_U_per_event": -math.inf, "network_U_per_event": 0.5, "table_gap_per_event": math.inf,
              "network_gap_per_event": 0.01, "table_minus_network_per_event": -math.inf}  # fmt: skip
    family = dataclasses.replace(certificate.families[0], heldout=scores)
    certificate = dataclasses.replace(certificate, families=(family,))
    write_certificate(certificate, run)
    assert read_certificate(run).families[0].heldout == scores
