"""Options and errors shared by the subcommands: system parameters, numbers, times, devices,
output paths, progress bars, and the parser whose errors are one line naming the option."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from hpcdyn.physics.systems import SYSTEMS, ActiveSystem, ConfigurationError

SYSTEM_OPTIONS = {  # CLI option -> (parameter name, type, help)
    "--L": ("L", int, "lattice side (sites per dimension)"),
    "--N": ("N", int, "number of particles (active, quorum)"),
    "--density": ("density", float, "particle density N/L^2 in (0, 1] (active, quorum; instead of --N)"),
    "--D": ("D", float, "rotation rate (active, quorum)"),
    "--v-plus": ("v_plus", float, "hop rate along the orientation (active; quorum: when not crowded)"),
    "--v-other": ("v_other", float, "hop rate in the three other directions (active, quorum)"),
    "--R": ("R", int, "quorum: the block counted is (2R+1) x (2R+1) sites around the particle"),
    "--q": ("q", int, "quorum: crowded when at least q other particles sit in the block"),
    "--v-crowded": ("v_crowded", float, "quorum: hop rate along the orientation when crowded"),
    "--c": ("c", float, "FA up-spin bias: flip rates m*c (0->1) and m*(1-c) (1->0)"),
    "--dim": ("dim", int, "FA lattice dimension, 1 or 2"),
}


class CommandError(Exception):
    """A user error reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hpcdyn simulate: error: argument --seed: must be ... (see --help)``.

    Subcommand parsers are of the same class (argparse makes them with ``type(parent)``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


def check_device(device: str) -> str:
    """A torch device that exists on this machine (cpu, cuda, cuda:N, mps), else a one-line error."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigurationError(f"device: {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigurationError(f"device: {device} is not available: this machine has no CUDA GPU; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigurationError(f"device: {device} is not available: this machine has {count} CUDA GPU(s)")
        return device
    if parsed.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return device
    raise ConfigurationError(f"device: {device} is not available on this machine; use cpu" + (" or cuda" if torch.cuda.is_available() else ""))


def check_output_path(path: str | os.PathLike, option: str = "out") -> Path:
    """An output path whose nearest existing ancestor is a writable directory (not a file); absolute."""
    from hpcdyn.storage.trajectory_store import check_output_location

    target = Path(path).expanduser().absolute()
    check_output_location(target, option)
    return target


def check_existing_path(path: str | os.PathLike, option: str, what: str) -> Path:
    target = Path(path).expanduser().absolute()
    if not target.exists():
        raise ConfigurationError(f"{option}: {target} does not exist; give {what}")
    return target


def system_parameters(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for name, _, _ in SYSTEM_OPTIONS.values()}
    given = {name: value for name, value in given.items() if value is not None}
    known = {field for field in SYSTEMS[args.system].__dataclass_fields__} | (
        {"density"} if issubclass(SYSTEMS[args.system], ActiveSystem) else set()
    )
    foreign = sorted(set(given) - known)
    if foreign:
        option = "--" + foreign[0].replace("_", "-")
        raise ConfigurationError(f"{foreign[0]}: {option} is not a parameter of system {args.system!r}")
    return given


def positive_time(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite time > 0, got {text}")
    return value


def non_negative_time(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
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
