"""Signals, leftovers and concurrent drivers: SIGTERM is handled like SIGINT, the message after an
interruption says what is left and how to resume, stale temporary files are cleaned on the next
run, and a second driver on the same output is refused while the first holds it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdyn.storage.output_lock import output_lock

from .common import assert_refused, listing, run_cli, strict_json

HPCDYN = [sys.executable, "-m", "hpcdyn.cli"]
LONG_SIMULATION = ["simulate", "--preset", "paper", "--t-final", "100000", "--seed", "2"]


WRITER = (  # the store writer alone, without the command line's imports: quicker to start
    "import sys\nfrom hpcdyn.physics.systems import make_system\nfrom hpcdyn.simulation.drivers import simulate_to_store\n"
    "simulate_to_store(make_system('active', preset='paper'), t_final=1e5, seed=2, out=sys.argv[1])\n"
)


def _start_long_simulation(out: Path, command_line: bool = True) -> subprocess.Popen:
    command = [*HPCDYN, *LONG_SIMULATION, "--out", str(out)] if command_line else [sys.executable, "-c", WRITER, str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*/event_token/c/*")):  # it is writing events
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the simulation did not start writing"
        time.sleep(0.05)
    return process


def test_sigterm_stops_simulate_cleanly_like_sigint(tmp_path):
    # Compile the simulator first (numba's cache), so that the signal lands while events are written.
    warm = subprocess.run([*HPCDYN, "simulate", "--preset", "paper", "--t-final", "1", "--seed", "2", "--out",
                           str(tmp_path / "warm.zarr")], capture_output=True, text=True)  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    shutil.rmtree(tmp_path / "warm.zarr")
    out = tmp_path / "run.zarr"
    process = _start_long_simulation(out)
    process.send_signal(signal.SIGTERM)  # what scancel sends
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "interrupted by SIGTERM; the partial store was removed" in stderr and "rerun the same command" in stderr
    assert listing(tmp_path) == []  # no hidden partial store, no lock


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_sigterm_during_a_deferred_write_stops_the_command_even_where_sigint_is_ignored(sigint):
    # A script's background job starts with SIGINT ignored (so did the CI's test run): a SIGTERM landing
    # while a chunk was written was forwarded to the deferred SIGINT and then dropped, and simulate ran on
    # to the end with status 0. Delivered in-process, so the signal lands inside the block every time.
    import os

    from hpcdyn.cli.main import terminate_as_interrupt
    from hpcdyn.storage.signals import deferred_interrupts

    original = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), terminate_as_interrupt() as received:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # the handler runs here, inside the block; the interrupt waits for its end
            pytest.fail("the SIGTERM was dropped")
        assert received["signal"] == "SIGTERM"
        with terminate_as_interrupt(), deferred_interrupts():  # a SIGINT the process ignores stays ignored
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        if sigint == "default":
            pytest.fail("a SIGINT with the default handler was dropped")
    except KeyboardInterrupt:
        assert sigint == "default"
    finally:
        signal.signal(signal.SIGINT, original)


LONG_ENSEMBLE = ["ensemble", "--model", "original", "--density", "0.3", "--replicas", "2", "--L", "12", "--t-final", "2e6",
                 "--snapshot-every", "1e4", "--no-progress", "--force"]  # fmt: skip


@pytest.mark.parametrize("moment", ["store laid out", "ray started", "units running"])
def test_sigterm_stops_a_ray_driver_cleanly(tmp_path, moment):
    # ray.init installs a SIGTERM handler that exits with status 15 and no message; the command keeps its
    # own. The store is laid out before Ray starts, so a signal then lands before (or while) Ray starts.
    # Just after Ray logs its start the driver's core worker is being made: a signal there met Ray's C++
    # crash handler and the process aborted on its way out (SIGABRT; 6 of 8 tries) or hung. 20 s on, units run.
    out, log = tmp_path / "ensemble.zarr", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen([*HPCDYN, *LONG_ENSEMBLE, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while not (out.exists() if moment != "ray started" else "Started a local Ray" in log.read_text()):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the ensemble did not start"
        time.sleep(0.005)
    time.sleep({"store laid out": 0.0, "ray started": 0.02, "units running": 20.0}[moment])  # 0.02 s: inside its window
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr = log.read_text()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert "hpcdyn ensemble: interrupted by SIGTERM;" in stderr and "rerun the same command to resume" in stderr


def test_leftovers_of_a_killed_simulate_are_cleaned_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "run.zarr"
    process = _start_long_simulation(out, command_line=False)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    leftovers = [path.name for path in tmp_path.iterdir()]
    assert any(name.startswith(".run.zarr.partial-") for name in leftovers)
    outcome = run_cli(["simulate", "--L", "6", "--N", "4", "--t-final", "1", "--out", out], capsys)
    assert outcome.code == 0, outcome.err
    assert [path.name for path in tmp_path.iterdir()] == ["run.zarr"]


def test_a_second_simulate_on_the_same_output_is_refused(tmp_path, capsys):
    out = tmp_path / "run.zarr"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom hpcdyn.storage.output_lock import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        outcome = run_cli(["simulate", "--L", "6", "--N", "4", "--t-final", "1", "--out", out], capsys)
        message = assert_refused(outcome, "out:")
        assert f"pid {holder.pid}" in message and "another hpcdyn process" in message
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(["simulate", "--L", "6", "--N", "4", "--t-final", "1", "--out", out], capsys).code == 0


TINY = ["--segment-events", "16", "--max-train-events", "64", "--d-model", "8", "--n-heads", "1", "--n-layers", "1",
        "--d-ff", "8", "--epochs", "2"]  # fmt: skip


def test_interrupted_training_says_what_is_left_and_resumes(trajectory_template, tmp_path, capsys, monkeypatch):
    import hpcdyn.learning.training as training

    original, calls = training._train_epoch, []

    def second_epoch_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", second_epoch_interrupted)
    run = tmp_path / "run"
    outcome = run_cli(["train", trajectory_template, "--out", run, *TINY], capsys)
    assert outcome.code == 130 and len(outcome.err.strip().splitlines()) == 1
    assert "holds the run up to its last finished epoch (1 epoch(s)" in outcome.err and "--resume" in outcome.err
    assert (run / "last.pt").exists() and not list(tmp_path.glob(".run.lock"))
    monkeypatch.setattr(training, "_train_epoch", original)
    resumed = run_cli(["train", trajectory_template, "--out", run, "--resume", *TINY], capsys)
    assert resumed.code == 0 and strict_json(resumed.out)["epochs"] == 2


def test_a_second_training_on_the_same_run_directory_is_refused(trajectory_template, tmp_path, capsys):
    run = tmp_path / "run"
    with output_lock(run):
        assert_refused(run_cli(["train", trajectory_template, "--out", run, *TINY], capsys), "another hpcdyn process")
    assert listing(tmp_path) == []


ENSEMBLE = ["ensemble", "--model", "original", "--density", "0.2", "0.4", "--replicas", "2", "--replicas-per-unit", "1",
            "--t-final", "2", "--snapshot-every", "1", "--L", "8", "--no-progress"]  # fmt: skip


def _units_in_this_process(interrupt_after: int | None):
    """Stand-in for the Ray dispatch: runs the units here, and is interrupted after some of them."""
    from hpcdyn.distributed.ensemble import UnitRunner

    def dispatch(config, path, pending, placement, bar):
        runner = UnitRunner(config, path)
        for count, unit in enumerate(pending):
            if count == interrupt_after:
                raise KeyboardInterrupt
            runner.run(unit)

    return dispatch


def test_interrupted_ensemble_says_what_is_left_and_resumes(tmp_path, capsys, monkeypatch):
    import hpcdyn.distributed.ensemble as ensemble

    out = tmp_path / "e.zarr"
    stale = tmp_path / ".e.zarr.partial-0badc0de"  # a creation killed long ago
    stale.mkdir()
    monkeypatch.setattr(ensemble, "_run_on_ray", _units_in_this_process(interrupt_after=1))
    outcome = run_cli([*ENSEMBLE, "--out", out], capsys)
    assert outcome.code == 130, outcome.err
    assert "holds 1 of 4 unit(s) finished and committed" in outcome.err and "rerun the same command" in outcome.err
    assert not stale.exists()
    monkeypatch.setattr(ensemble, "_run_on_ray", _units_in_this_process(interrupt_after=None))
    resumed = run_cli([*ENSEMBLE, "--out", out], capsys)
    assert resumed.code == 0, resumed.err
    summary = strict_json(resumed.out)
    assert summary["units_skipped"] == 1 and summary["units_run"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["e.zarr"]


@pytest.mark.parametrize("command, locked, field", [
    (ENSEMBLE, "e.zarr", "out:"),
    (["sweep", "ntheta", "--smoke", "--name", "n"], "sweeps/n", "name:"),
    (["pipeline"], "study", "out:"),
])  # fmt: skip
def test_a_second_driver_on_the_same_output_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, command, locked, field):
    monkeypatch.setattr("hpcdyn.distributed.cluster.init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    target = tmp_path / locked
    places = {"e.zarr": ["--out", target], "sweeps/n": ["--storage", tmp_path / "sweeps"], "study": ["--out", target]}
    with output_lock(target, field.rstrip(":")):
        message = assert_refused(run_cli([*command, *places[locked]], capsys), field)
    assert "another hpcdyn process" in message


def test_joining_an_address_where_nothing_listens_is_refused_not_waited_on():
    """ray.init at a HOST:PORT where nothing listens retried for minutes (Ray's messages naming other
    addresses); init_ray probes first and refuses in one line naming --address, Ray not started."""
    import ray

    from hpcdyn.distributed.cluster import init_ray
    from hpcdyn.physics.systems import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^address: no Ray cluster answers at --address 127\.0\.0\.1:1"):
        init_ray("127.0.0.1:1")
    assert not ray.is_initialized()
