"""``hpcdyn ensemble``: forward-simulate original and learned dynamics over a grid, on Ray actors.

    hpcdyn ensemble --model original --model runs/mode2 --density 0.124 0.3 0.5 --replicas 32 \
                    --t-final 200 --snapshot-every 1 --burn-in 50 --seed 1 --out ensemble.zarr
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from hpcdyn.cli.options import CommandError, add_progress, show_progress, positive_time, non_negative_time


def add_parser(commands) -> None:

    parser = commands.add_parser(
        "ensemble",
        help="forward-simulate original and learned dynamics over models x densities x replicas (Ray, Zarr)",
        description="Simulate a grid of cases (model x density x replica) on Ray actors and write the snapshots "
        "into one Zarr ensemble store (dims model, density, replica, time, y, x). Rerunning the same command "
        "resumes an interrupted ensemble; finished units are skipped.",
    )
    grid = parser.add_argument_group("cases")
    grid.add_argument("--model", action="append", required=True, metavar="{original|RUN_DIR}",
                      help="'original' (compiled exact simulator) or a training run directory / checkpoint; repeatable")  # fmt: skip
    grid.add_argument("--density", type=float, nargs="+", required=True, help="particle densities N/L^2 in (0, 1]")
    grid.add_argument("--replicas", type=int, required=True, help="independent replicas per model and density")
    grid.add_argument("--seed", type=int, default=0, help="seed; replica streams derive from (seed, case, replica)")
    system = parser.add_argument_group("system (default: the checkpoints' training values, else the paper preset)")
    system.add_argument("--L", type=int, help="lattice side; must equal a trained model's")
    system.add_argument("--D", type=float, help="rotation rate of the original model")
    system.add_argument("--v-plus", dest="v_plus", type=float, help="hop rate along the orientation (original model)")
    system.add_argument("--v-other", dest="v_other", type=float, help="hop rate in the other directions (original model)")
    timing = parser.add_argument_group("time")
    timing.add_argument("--t-final", type=positive_time, required=True, help="simulated time per replica, burn-in included")
    timing.add_argument("--snapshot-every", type=positive_time, required=True, help="time between recorded snapshots")
    timing.add_argument("--burn-in", type=non_negative_time, default=0.0, help="time of the first snapshot, within --t-final (default 0)")
    parser.add_argument("--out", required=True, help="ensemble store to write (or resume)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store instead of resuming it")
    parser.add_argument("--keep-overlaps", action="store_true",
                        help="apply learned moves onto occupied sites (recorded as overlaps) instead of rejecting them")  # fmt: skip
    parser.add_argument("--replicas-per-unit", type=int, help="replicas per unit of work and lock-step batch (default: automatic)")
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--address", help="join the Ray cluster at this address (default: start a local Ray)")
    ray.add_argument("--actors", type=int, help="number of actors (default: as many as the cluster fits)")
    ray.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs reserved per actor, also its torch threads (default 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPU fraction per actor, e.g. 0.25 (default 0: CPU)")
    ray.add_argument("--max-restarts", type=int, default=3, help="restarts of a dead actor, and retries of its unit (default 3)")
    add_progress(parser)
    parser.set_defaults(handler=_ensemble)


def _ensemble(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.distributed.ensemble import EnsembleConfig, EnsembleError, Placement, run_ensemble

    config = EnsembleConfig(
        models=tuple(args.model),
        densities=tuple(args.density),
        replicas=args.replicas,
        t_final=args.t_final,
        snapshot_every=args.snapshot_every,
        burn_in=args.burn_in,
        seed=args.seed,
        L=args.L,
        D=args.D,
        v_plus=args.v_plus,
        v_other=args.v_other,
        replicas_per_unit=args.replicas_per_unit,
        reject_overlaps=not args.keep_overlaps,
    )
    placement = Placement(
        address=args.address,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        max_restarts=args.max_restarts,
    )
    try:
        # Ray's driver prints its error notices (an actor died, a task is retried) on stdout, from a
        # thread; stdout is for the JSON summary, so they go to stderr with the progress bar.
        with contextlib.redirect_stdout(sys.stderr):
            return run_ensemble(config, args.out, placement, overwrite=args.overwrite, progress=show_progress(args))
    except EnsembleError as error:
        raise CommandError(str(error)) from error
