"""hpcdyn simulate: options, output paths and work sizes refused before anything runs."""

from __future__ import annotations

import pytest

from .common import assert_refused, listing, run_cli

BASE = ["simulate", "--L", "6", "--N", "4", "--t-final", "1"]

OPTIONS = [  # (arguments after BASE, the field the message must name)
    (["--seed", "-1"], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--t-final", "nan"], "--t-final"),
    (["--t-final", "inf"], "--t-final"),
    (["--t-final", "0"], "--t-final"),
    (["--t-final", "ten"], "--t-final"),
    (["--snapshot-every", "-1"], "--snapshot-every"),
    (["--snapshot-every", "nan"], "--snapshot-every"),
    (["--L", "1"], "L:"),
    (["--L", "x"], "--L"),
    (["--N", "0"], "N:"),
    (["--N", "37"], "N:"),
    (["--D", "nan"], "D:"),
    (["--D", "-0.1"], "D:"),
    (["--v-other", "inf"], "v_other:"),
    (["--density", "0.5"], "density:"),  # with --N
    (["--c", "0.5"], "c:"),  # not a parameter of the active system
    (["--system", "ising"], "--system"),
    (["--preset", "chain"], "preset:"),
    (["--dim", "2"], "dim:"),
]


@pytest.mark.parametrize("arguments, field", OPTIONS)
def test_bad_option_is_refused_and_nothing_is_written(tmp_path, capsys, arguments, field):
    outcome = run_cli([*BASE, "--out", tmp_path / "run.zarr", *arguments], capsys)
    assert_refused(outcome, field)
    assert listing(tmp_path) == []


WORK = [  # absurd for any machine: refused with the estimate and how to force it
    (["--v-plus", "1e308"], "t_final:"),
    (["--t-final", "1e12"], "t_final:"),
    (["--snapshot-every", "1e-9"], "snapshot_every:"),
    (["--L", "200000"], "L:"),  # the lattice's tables alone exceed the memory
]


@pytest.mark.parametrize("arguments, field", WORK)
def test_absurd_work_is_refused_with_its_estimate_and_the_way_to_force_it(tmp_path, capsys, arguments, field):
    message = assert_refused(run_cli([*BASE, "--out", tmp_path / "run.zarr", *arguments], capsys), field)
    assert "--force" in message and ("events" in message or "snapshots" in message or "memory" in message)
    assert listing(tmp_path) == []


def test_output_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    assert_refused(run_cli([*BASE, "--out", tmp_path / "a-file" / "run.zarr"], capsys), "out:")
    assert listing(tmp_path) == ["a-file"]


def test_overwrite_replaces_only_a_trajectory_store(tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("months of work")
    assert_refused(run_cli([*BASE, "--out", precious, "--overwrite"], capsys), "out:")
    assert (precious / "thesis.tex").read_text() == "months of work"


def test_existing_store_is_not_replaced_without_overwrite(tmp_path, capsys, trajectory_template):
    before = listing(trajectory_template.parent)
    assert_refused(run_cli([*BASE, "--out", trajectory_template], capsys), "--overwrite")
    assert listing(trajectory_template.parent) == before
