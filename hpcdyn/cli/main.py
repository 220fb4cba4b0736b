"""The ``hpcdyn`` command line: thin wrappers over library functions, one module per subcommand.

    hpcdyn simulate --system active --preset paper --t-final 100 --seed 1 --out run.zarr
    hpcdyn likelihood run.zarr
    hpcdyn info run.zarr
    hpcdyn train run.zarr --mode 2 --n-classes 4 --out runs/mode2
    hpcdyn evaluate runs/mode2 [other.zarr]
    hpcdyn sweep | ensemble | analyze | pipeline | slurm ...
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from hpcdyn.cli import analyze, ensemble, evaluate, info, likelihood, pipeline, simulate, slurm, sweep, train
from hpcdyn.cli.options import CommandError
from hpcdyn.physics.systems import ConfigurationError

# The order of `hpcdyn --help`. Each module imports torch, ray or xarray only when its command runs.
COMMANDS = (simulate, likelihood, info, train, evaluate, sweep, ensemble, analyze, pipeline, slurm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcdyn",
        description="Learn stochastic dynamics of lattice many-body systems from one trajectory, "
        "and predict their emergent behaviour at scale.",
    )
    from hpcdyn import __version__

    parser.add_argument("--version", action="version", version=f"hpcdyn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(commands)
    return parser


def _emit(result: dict[str, Any] | str | None) -> None:
    if result is None:
        return
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    from hpcdyn.storage.trajectory_store import StoreError

    try:
        _emit(handler(args))
    except (ConfigurationError, StoreError, FileExistsError, CommandError) as error:
        print(f"hpcdyn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpcdyn {args.command}: interrupted; nothing incomplete was left at the output path", file=sys.stderr)
        return 130
    return 0
