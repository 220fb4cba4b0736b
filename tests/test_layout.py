"""The package layout: stages import one way, checked by import-linter's contract in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.fail("lint-imports not found beside this python: install the test extra (pip install -e '.[test]')")
    return subprocess.run([command, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_stages_import_one_way():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_a_lower_stage_importing_a_higher_one(tmp_path):
    # A copy of the package with one deliberate violation: physics imports the command line.
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "hpcdyn", copy / "hpcdyn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    systems = copy / "hpcdyn" / "physics" / "systems.py"
    systems.write_text(systems.read_text() + "\nfrom hpcdyn.cli.options import CommandError  # violation\n")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         "--no-cache"],
        cwd=copy, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0, result.stdout
    assert "hpcdyn.physics.systems -> hpcdyn.cli.options" in result.stdout
