"""Damaged and inconsistent trajectory stores given to info, likelihood, train and evaluate.

Every damage is refused with one line naming the store's array or attribute: decoding errors,
missing or extra chunks, values out of range, attributes that do not match the arrays.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from .common import assert_refused, listing, run_cli, strict_json


def garbage(store, key):
    (store / key).write_bytes(b"not a blosc frame " * 8)


def edit_attrs(store, drop_digest=True, **changes):
    group = zarr.open_group(str(store), mode="r+")
    for name, value in changes.items():
        if value is None:
            del group.attrs[name]
        else:
            group.attrs[name] = value
    if drop_digest and "attributes_sha256" in group.attrs:
        del group.attrs["attributes_sha256"]  # an older store, without the checksum
    zarr.consolidate_metadata(str(store))


def edit_params(store, drop_digest=True, **changes):
    params = dict(zarr.open_group(str(store), mode="r").attrs["params"])
    edit_attrs(store, drop_digest, params={**params, **changes})


def edit_array(store, name, index, value):
    zarr.open_group(str(store), mode="r+")[name][index] = value


DAMAGE = {  # name -> (damage, the field the message must name)
    "garbage event chunk": (lambda s: garbage(s, "event_dwell/c/1"), "event_dwell"),
    "garbage token chunk": (lambda s: garbage(s, "event_token/c/0"), "event_token"),
    "garbage initial chunk": (lambda s: garbage(s, "initial_state/c/0"), "initial_state"),
    "missing event chunk": (lambda s: (s / "event_move/c/2").unlink(), "event_move"),
    "missing initial_position chunk": (lambda s: (s / "initial_position/c/0/0").unlink(), "initial_position"),
    "missing initial_position array": (lambda s: shutil.rmtree(s / "initial_position"), "initial_position"),
    "missing params": (lambda s: edit_attrs(s, params=None), "params"),
    "params lack a rate": (lambda s: edit_attrs(s, params={"L": 6, "N": 4, "D": 0.1, "v_plus": 25.0}), "params"),
    "params edited (checksum kept)": (lambda s: edit_params(s, drop_digest=False, v_plus=20.0), "attributes_sha256"),
    "params edited: impossible events": (lambda s: edit_params(s, v_other=0.0), "params"),
    "params edited: other rates": (lambda s: edit_params(s, v_plus=20.0), "params"),
    "params edited: another N": (lambda s: edit_params(s, N=5), "initial_position has shape (4, 2)"),
    "params of another system": (lambda s: edit_attrs(s, system="fa"), "params"),
    "unknown system": (lambda s: edit_attrs(s, system="ising"), "system"),
    "t_final not a number": (lambda s: edit_attrs(s, t_final="long"), "t_final"),
    "total_dwell beyond t_final": (lambda s: edit_attrs(s, total_dwell=1e9), "total_dwell"),
    "n_events missing": (lambda s: edit_attrs(s, n_events=None), "n_events"),
    "n_events wrong": (lambda s: edit_attrs(s, n_events=5), "n_events"),
    "token out of range": (lambda s: edit_array(s, "event_token", 7, 99), "event_token"),
    "move out of range": (lambda s: edit_array(s, "event_move", 3, 6), "event_move"),
    "negative dwell time": (lambda s: edit_array(s, "event_dwell", 2, -0.5), "event_dwell"),
    "infinite dwell time": (lambda s: edit_array(s, "event_dwell", 2, np.inf), "event_dwell"),
    "two particles on one site": (lambda s: edit_array(s, "initial_position", 1, [0, 0]) or edit_array(s, "initial_position", 0, [0, 0]), "initial_position"),
    "state out of range": (lambda s: edit_array(s, "initial_state", 0, 4), "initial_state"),
    "position off the lattice": (lambda s: edit_array(s, "initial_position", 0, [6, 0]), "initial_position"),
    "another schema": (lambda s: edit_attrs(s, schema="hpcdyn.trajectory/9"), "schema"),
    "unfinished": (lambda s: edit_attrs(s, complete=False), "incomplete"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_likelihood_refuses_a_damaged_store(store, capsys, damage):
    apply, field = DAMAGE[damage]
    apply(store)
    assert_refused(run_cli(["likelihood", store], capsys), field)


CHEAP = {  # what `info` finds from the attributes and the file listing alone
    "missing event chunk": ((lambda s: (s / "event_move/c/2").unlink()), "event_move: chunk c/2 is missing"),
    "missing snapshot chunk": ((lambda s: (s / "snapshot_time/c/0").unlink()), "snapshot_time: chunk c/0 is missing"),
    "extra chunk": ((lambda s: (s / "event_dwell/c/99").write_bytes(b"x")), "event_dwell: unexpected chunk file c/99"),
    "missing params": ((lambda s: edit_attrs(s, params=None)), "params"),
    "params edited": ((lambda s: edit_params(s, drop_digest=False, D=0.2)), "attributes_sha256"),
}


@pytest.mark.parametrize("damage", sorted(CHEAP))
def test_info_checks_every_chunk_file_and_attribute(store, capsys, damage):
    apply, field = CHEAP[damage]
    apply(store)
    assert_refused(run_cli(["info", store], capsys), field)


FULL = {  # what only a full read finds: `info --verify`
    "garbage event chunk": ((lambda s: garbage(s, "event_dwell/c/1")), "event_dwell (chunk c/1) cannot be decoded"),
    "garbage snapshot chunk": ((lambda s: garbage(s, "snapshot_occupancy/c/0/0/0")), "snapshot_occupancy (chunk c/0/0/0)"),
    "params edited, no checksum": ((lambda s: edit_params(s, v_plus=20.0)), "params"),
    "negative dwell time": ((lambda s: edit_array(s, "event_dwell", 2, -0.5)), "event_dwell"),
}


@pytest.mark.parametrize("damage", sorted(FULL))
def test_info_verify_reads_everything(store, capsys, damage):
    apply, field = FULL[damage]
    apply(store)
    info = run_cli(["info", store, "--json"], capsys)
    assert info.code == 0 and strict_json(info.out)["checked"] == "attributes, shapes, chunk files"
    assert_refused(run_cli(["info", store, "--verify"], capsys), field)


def test_info_verify_of_a_sound_store(store, capsys):
    outcome = run_cli(["info", store, "--verify", "--json"], capsys)
    assert outcome.code == 0, outcome.err
    verified = strict_json(outcome.out)["verified"]
    assert verified["events"] == strict_json(outcome.out)["n_events"] and verified["snapshots"] == 21


@pytest.mark.parametrize("damage", ["garbage event chunk", "params edited: impossible events", "token out of range",
                                    "missing initial_position chunk"])  # fmt: skip
def test_train_refuses_a_damaged_store_and_leaves_nothing(store, tmp_path, capsys, damage):
    apply, field = DAMAGE[damage]
    apply(store)
    before = listing(tmp_path)
    outcome = run_cli(["train", store, "--out", tmp_path / "runs" / "r", "--epochs", "1", "--segment-events", "16",
                       "--d-model", "8", "--n-heads", "1", "--n-layers", "1", "--d-ff", "8"], capsys)  # fmt: skip
    assert_refused(outcome, field)
    assert listing(tmp_path) == before


def test_evaluate_refuses_a_damaged_store(store, run_template, capsys):
    garbage(store, "event_move/c/0")
    assert_refused(run_cli(["evaluate", run_template, store], capsys), "event_move")


@pytest.mark.parametrize("make, field", [
    (lambda p: p.write_text("plain text"), "not a trajectory store"),
    (lambda p: p.mkdir(), "not a Zarr group"),
    (lambda p: None, "no such store"),
])  # fmt: skip
def test_things_that_are_not_stores(tmp_path, capsys, make, field):
    target = tmp_path / "thing.zarr"
    make(target)
    for command in (["info", target], ["likelihood", target], ["info", target, "--verify"]):
        assert_refused(run_cli(command, capsys), field)


def test_likelihood_json_is_strict_when_the_answer_is_minus_infinity(store, capsys):
    """Under v_other = 0 some observed hops are impossible: U is -infinity, written as null and explained."""
    outcome = run_cli(["likelihood", store, "--set", "v_other=0"], capsys)
    assert outcome.code == 0, outcome.err
    result = strict_json(outcome.out)
    assert result["U"] is None and result["U_per_T"] is None
    assert result["non_finite"]["U"] == "-Infinity"


@pytest.mark.parametrize("arguments, field", [
    (["--set", "v_plus"], "set:"),
    (["--set", "v_plus=fast"], "v_plus:"),
    (["--set", "v_plus=nan"], "v_plus:"),
    (["--set", "L=8"], "L:"),
    (["--set", "c=0.2"], "c:"),
    (["--segment-events", "0"], "--segment-events"),
    (["--device", "bogus"], "device:"),
    (["--device", "cuda:7"], "device:"),
])  # fmt: skip
def test_likelihood_options(store, capsys, arguments, field):
    assert_refused(run_cli(["likelihood", store, *arguments], capsys), field)
