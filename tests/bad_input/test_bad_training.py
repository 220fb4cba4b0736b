"""hpcdyn train and evaluate: options, run directories and checkpoints (NaN weights refused on load)."""

from __future__ import annotations

import shutil

import pytest
import torch

from hpcdyn.learning.checkpoint import save_checkpoint

from .common import assert_refused, listing, run_cli
from .conftest import tiny_checkpoint_state

TINY = ["--epochs", "1", "--segment-events", "16", "--d-model", "8", "--n-heads", "1", "--n-layers", "1", "--d-ff", "8"]

OPTIONS = [
    (["--device", "bogus"], "device:"),
    (["--device", "cuda:3"], "device:"),
    (["--seed", "-1"], "--seed"),
    (["--lr", "nan"], "lr:"),
    (["--lr", "0"], "lr:"),
    (["--epochs", "0"], "epochs:"),
    (["--segment-events", "0"], "segment_events:"),
    (["--segment-events", "100000"], "segment_events:"),  # more than the trajectory holds
    (["--validation-fraction", "1.5"], "validation_fraction:"),
    (["--mode", "2", "--n-classes", "0"], "n_classes:"),
    (["--d-model", "0"], "d_model:"),
    (["--n-heads", "3"], "n_heads:"),
    (["--gradient-clip", "inf"], "gradient_clip:"),
    (["--patience", "0"], "patience:"),
    (["--max-train-events", "0"], "max_train_events:"),
    (["--expected-from-epoch", "-1"], "expected_from_epoch:"),
    (["--mode", "3"], "--mode"),
]


@pytest.mark.parametrize("arguments, field", OPTIONS)
def test_bad_option_is_refused_and_nothing_is_written(trajectory_template, tmp_path, capsys, arguments, field):
    outcome = run_cli(["train", trajectory_template, "--out", tmp_path / "runs" / "r", *TINY, *arguments], capsys)
    assert_refused(outcome, field)
    assert listing(tmp_path) == []


def test_output_that_is_not_a_run_directory(trajectory_template, store, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    before = listing(tmp_path)
    for out, field in ((tmp_path / "a-file" / "run", "out:"), (tmp_path / "a-file", "out:"), (store, "out:")):
        assert_refused(run_cli(["train", trajectory_template, "--out", out, *TINY], capsys), field)
    assert listing(tmp_path) == before  # in particular nothing was written into the trajectory store


def test_existing_run_needs_resume(trajectory_template, run_template, tmp_path, capsys):
    run = shutil.copytree(run_template, tmp_path / "run")
    shutil.copy(run / "best.pt", run / "last.pt")
    assert_refused(run_cli(["train", trajectory_template, "--out", run, *TINY], capsys), "--resume")


def _nan_run(tmp_path, trajectory_template):
    state = tiny_checkpoint_state(trajectory_template)
    name = next(name for name, value in state["model_state"].items() if value.is_floating_point())
    state["model_state"][name] = torch.full_like(state["model_state"][name], float("nan"))
    run = tmp_path / "diverged"
    run.mkdir()
    save_checkpoint(state, run / "best.pt")
    return run, name


def test_checkpoint_with_nan_weights_is_refused_everywhere(trajectory_template, tmp_path, capsys):
    run, name = _nan_run(tmp_path, trajectory_template)
    message = assert_refused(run_cli(["evaluate", run, trajectory_template], capsys), "checkpoint:")
    assert name in message and "non-finite" in message
    shutil.copy(run / "best.pt", run / "last.pt")
    assert_refused(run_cli(["train", trajectory_template, "--out", run, "--resume", *TINY], capsys), "checkpoint:")
    out = tmp_path / "ensemble.zarr"
    outcome = run_cli(["ensemble", "--model", run, "--density", "0.2", "--replicas", "1", "--t-final", "1",
                       "--snapshot-every", "1", "--out", out], capsys)  # fmt: skip
    assert_refused(outcome, "checkpoint:")  # refused before Ray starts
    assert not out.exists()


@pytest.mark.parametrize("make, field", [
    (lambda run: (run / "best.pt").write_bytes(b"\x00garbage" * 10), "checkpoint:"),
    (lambda run: torch.save({"format": "something/else"}, run / "best.pt"), "checkpoint:"),
    (lambda run: None, "checkpoint:"),  # a run directory without best.pt
])  # fmt: skip
def test_damaged_checkpoints(trajectory_template, tmp_path, capsys, make, field):
    run = tmp_path / "run"
    run.mkdir()
    make(run)
    assert_refused(run_cli(["evaluate", run, trajectory_template], capsys), field)


def test_evaluate_options(trajectory_template, run_template, tmp_path, capsys):
    assert_refused(run_cli(["evaluate", tmp_path / "absent", trajectory_template], capsys), "run:")
    assert_refused(run_cli(["evaluate", run_template, trajectory_template, "--device", "bogus"], capsys), "device:")


def test_running_out_of_memory_is_one_line_and_leaves_nothing(trajectory_template, tmp_path, capsys, monkeypatch):
    # torch reports a failed CPU allocation as a RuntimeError, not a MemoryError: it must read the same
    import hpcdyn.learning.transformer as transformer

    def exhausted(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 15728640 bytes")

    monkeypatch.setattr(transformer.TransformerRates, "forward", exhausted)
    out = tmp_path / "run"
    outcome = run_cli(["train", trajectory_template, "--out", out, *TINY], capsys)
    message = assert_refused(outcome, "memory:")
    assert "make the run smaller" in message and "can't allocate memory" in message
    assert not out.exists() or list(out.iterdir()) == []  # an empty directory a new run accepts
