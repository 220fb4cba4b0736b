"""Helpers of the bad-input suite: run the CLI in this process and check how it refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from hpcdyn.cli import main


@dataclasses.dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[str], capsys) -> Outcome:
    """``hpcdyn ARGV`` in this process; argparse's exits become exit codes too."""
    try:
        code = main([str(item) for item in argv])
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def assert_refused(outcome: Outcome, field: str) -> str:
    """Exit status 2, one line that names ``field``, no traceback; returns the message."""
    error = outcome.err.strip()
    assert outcome.code == 2, f"exit status {outcome.code}, stderr {error!r}"
    assert "Traceback" not in outcome.err, outcome.err
    assert "\n" not in error, f"not one line: {error!r}"
    assert error.startswith("hpcdyn ") and ": error: " in error, error
    message = error.split(": error: ", 1)[1]
    assert field in message, f"{field!r} not named in {message!r}"
    return message


def listing(directory: Path) -> list[str]:
    """Every file and directory under ``directory`` (hidden ones too), relative and sorted."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def strict_json(text: str):
    """Parse as strict JSON: NaN and Infinity are refused, as strict parsers do."""

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)
