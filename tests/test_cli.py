"""The hpcdyn command line, run as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdyn.cli import main

HPCDYN = [str(Path(sys.executable).parent / "hpcdyn")]


def run(*args, check=True):
    result = subprocess.run(HPCDYN + list(args), capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_simulate_info_likelihood_round_trip(tmp_path):
    out = tmp_path / "paper.zarr"
    simulated = json.loads(
        run("simulate", "--preset", "paper", "--t-final", "5", "--seed", "3", "--out", str(out), "--snapshot-every", "1").stdout
    )
    assert simulated["n_tokens"] == 112 and simulated["snapshots"] == 6
    table = run("info", str(out)).stdout
    assert "n_events" in table and "active" in table
    info = json.loads(run("info", str(out), "--json").stdout)
    assert info["n_events"] == simulated["n_events"] > 1000
    likelihood = json.loads(run("likelihood", str(out)).stdout)
    assert {"U", "T", "U_per_T", "events"} <= set(likelihood)
    assert likelihood["T"] == 5.0 and likelihood["events"] == info["n_events"]
    assert likelihood["U"] == pytest.approx(likelihood["simulator_U"], rel=1e-9)
    assert likelihood["U_per_T"] == pytest.approx(likelihood["U"] / 5.0)
    wrong = json.loads(run("likelihood", str(out), "--set", "v_plus=15").stdout)
    assert wrong["U"] < likelihood["U"]


def test_fa_system_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "fa.zarr"
    assert main(["simulate", "--system", "fa", "--L", "12", "--dim", "2", "--c", "0.4", "--t-final", "3", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == {"L": 12, "dim": 2, "c": 0.4} and summary["n_tokens"] == 144


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run.zarr"
    arguments = ["simulate", "--L", "6", "--N", "4", "--t-final", "1", "--out", str(out)]
    assert main(arguments) == 0
    capsys.readouterr()
    assert main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(arguments + ["--overwrite", "--seed", "8"]) == 0


@pytest.mark.parametrize(
    "arguments, field",
    [
        (["--density", "1.5"], "density"),
        (["--L", "1"], "L"),
        (["--L", "4", "--N", "20"], "N"),
        (["--D", "-1"], "D"),
        (["--v-plus", "inf"], "v_plus"),
        (["--c", "0.5"], "c"),
        (["--N", "5", "--density", "0.2"], "density"),
    ],
)
def test_bad_parameters_are_named(tmp_path, capsys, arguments, field):
    out = tmp_path / "bad.zarr"
    assert main(["simulate", "--t-final", "1", "--out", str(out), *arguments]) == 2
    error = capsys.readouterr().err
    assert f"error: {field}:" in error, error
    assert not out.exists()


def test_bad_times_are_refused_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--t-final", "-1", "--out", str(tmp_path / "x.zarr")])
    assert exit_info.value.code == 2
    assert "--t-final: must be a finite time > 0" in capsys.readouterr().err


def test_likelihood_of_something_that_is_not_a_store(tmp_path, capsys):
    assert main(["likelihood", str(tmp_path / "missing.zarr")]) == 2
    assert "no such store" in capsys.readouterr().err


def test_likelihood_refuses_unknown_or_structural_parameters(tmp_path, capsys):
    out = tmp_path / "run.zarr"
    assert main(["simulate", "--L", "6", "--N", "4", "--t-final", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["likelihood", str(out), "--set", "c=0.2"]) == 2
    assert "c: not a parameter" in capsys.readouterr().err
    assert main(["likelihood", str(out), "--set", "L=8"]) == 2
    assert "L: cannot change the lattice" in capsys.readouterr().err


def test_help_and_version():
    assert "simulate" in run("--help").stdout
    assert "--snapshot-every" in run("simulate", "--help").stdout
    assert run("--version").stdout.startswith("hpcdyn ")


def test_the_parser_is_built_without_the_heavy_libraries():
    """`hpcdyn --help`, `--version` and a refused option answer at once: building the parser (every
    subcommand's options) imports neither torch nor ray nor xarray (each command imports what it runs)."""
    code = ("import sys; from hpcdyn.cli.main import build_parser; build_parser(); "
            "print(sorted(name for name in ('torch', 'ray', 'xarray', 'zarr') if name in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
