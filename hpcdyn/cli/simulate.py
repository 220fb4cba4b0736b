"""``hpcdyn simulate``: the original dynamics simulated exactly and streamed to a trajectory store."""

from __future__ import annotations

import argparse
from typing import Any

from hpcdyn.cli.options import (
    SYSTEM_OPTIONS,
    add_progress,
    check_output_path,
    non_negative_int,
    positive_time,
    show_progress,
    system_parameters,
)
from hpcdyn.physics.systems import PRESETS, SYSTEMS, ConfigurationError


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "simulate",
        help="simulate the original dynamics exactly and store the trajectory (Zarr)",
        description="Exact continuous-time Monte Carlo (n-fold way) of a lattice system, streamed to a Zarr store.",
    )
    parser.add_argument("--system", choices=sorted(SYSTEMS), default="active", help="which model (default active)")
    presets = sorted({name for table in PRESETS.values() for name in table})
    parser.add_argument("--preset", choices=presets, help="start from a named parameter set, e.g. paper")
    for option, (name, kind, text) in SYSTEM_OPTIONS.items():
        parser.add_argument(option, dest=name, type=kind, help=text)
    parser.add_argument("--t-final", type=positive_time, required=True, help="simulated time T")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed >= 0; fixes the whole run (default 0)")
    parser.add_argument("--out", required=True, help="path of the trajectory store to write")
    parser.add_argument("--snapshot-every", type=positive_time, help="also record the lattice every DT time units")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    parser.add_argument("--force", action="store_true",
                        help="run even when the expected events, snapshots or memory look absurd for this machine")  # fmt: skip
    add_progress(parser)
    parser.set_defaults(handler=_simulate, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted simulate leaves: nothing (the partial store is removed on the way out)."""
    return (
        f"the partial store was removed and {args.out} is as it was before; "
        "rerun the same command to simulate again (the same seed gives the same trajectory)"
    )


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.simulation.drivers import simulate_to_store
    from hpcdyn.storage.trajectory_store import open_trajectory
    from hpcdyn.physics.systems import make_system

    if args.N is not None and args.density is not None:
        raise ConfigurationError("density: give either --N or --density, not both")
    system = make_system(args.system, system_parameters(args), preset=args.preset)
    check_output_path(args.out)
    path = simulate_to_store(
        system,
        t_final=args.t_final,
        seed=args.seed,
        out=args.out,
        snapshot_every=args.snapshot_every,
        overwrite=args.overwrite,
        progress=show_progress(args),
        force=args.force,
    )
    return open_trajectory(path).summary()
