"""Options and errors shared by the subcommands: system parameters, times, progress bars."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from hpcdyn.physics.systems import SYSTEMS, ConfigurationError

SYSTEM_OPTIONS = {  # CLI option -> (parameter name, type, help)
    "--L": ("L", int, "lattice side (sites per dimension)"),
    "--N": ("N", int, "number of particles (active)"),
    "--density": ("density", float, "particle density N/L^2 in (0, 1] (active; instead of --N)"),
    "--D": ("D", float, "rotation rate (active)"),
    "--v-plus": ("v_plus", float, "hop rate along the orientation (active)"),
    "--v-other": ("v_other", float, "hop rate in the three other directions (active)"),
    "--c": ("c", float, "FA up-spin bias: flip rates m*c (0->1) and m*(1-c) (1->0)"),
    "--dim": ("dim", int, "FA lattice dimension, 1 or 2"),
}


class CommandError(Exception):
    """A user error reported as one line, exit status 2."""


def system_parameters(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for name, _, _ in SYSTEM_OPTIONS.values()}
    given = {name: value for name, value in given.items() if value is not None}
    known = {field for field in SYSTEMS[args.system].__dataclass_fields__} | (
        {"density"} if args.system == "active" else set()
    )
    foreign = sorted(set(given) - known)
    if foreign:
        option = "--" + foreign[0].replace("_", "-")
        raise ConfigurationError(f"{foreign[0]}: {option} is not a parameter of system {args.system!r}")
    return given


def positive_time(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite time > 0, got {text}")
    return value


def non_negative_time(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite time >= 0, got {text}")
    return value


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )


def show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress
