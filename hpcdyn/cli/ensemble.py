"""``hpcdyn ensemble``: forward-simulate original and learned dynamics over a grid, on Ray actors.

    hpcdyn ensemble --model original --model runs/mode2 --density 0.124 0.3 0.5 --replicas 32 \
                    --t-final 200 --snapshot-every 1 --burn-in 50 --seed 1 --out ensemble.zarr
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from hpcdyn.cli.options import (
    CommandError,
    add_progress,
    check_output_path,
    non_negative_float,
    non_negative_int,
    non_negative_time,
    positive_int,
    positive_time,
    show_progress,
)
from hpcdyn.physics.systems import PARTICLE_SYSTEMS


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
    grid.add_argument("--seed", type=non_negative_int, default=0, help="seed >= 0; replica streams derive from (seed, case, replica)")
    system = parser.add_argument_group("system (default: the checkpoints' training values, else the paper preset)")
    system.add_argument("--system", choices=PARTICLE_SYSTEMS,
                        help="the particle system (default: the checkpoints', else active)")  # fmt: skip
    system.add_argument("--L", type=int, help="lattice side; must equal a trained model's on the network engine "
                        "(default: the checkpoints' training size)")
    system.add_argument("--D", type=float, help="rotation rate of the original model")
    system.add_argument("--v-plus", dest="v_plus", type=float, help="hop rate along the orientation (original model)")
    system.add_argument("--v-other", dest="v_other", type=float, help="hop rate in the other directions (original model)")
    system.add_argument("--R", type=int, help="quorum: block (2R+1) x (2R+1) counted around a particle (original model)")
    system.add_argument("--q", type=int, help="quorum: crowded from q other particles in the block (original model)")
    system.add_argument("--v-crowded", dest="v_crowded", type=float, help="quorum: forward hop rate when crowded (original model)")
    timing = parser.add_argument_group("time")
    timing.add_argument("--t-final", type=positive_time, required=True, help="simulated time per replica, burn-in included")
    timing.add_argument("--snapshot-every", type=positive_time, required=True, help="time between recorded snapshots")
    timing.add_argument("--burn-in", type=non_negative_time, default=0.0, help="time of the first snapshot, within --t-final (default 0)")
    parser.add_argument("--out", required=True, help="ensemble store to write (or resume)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store instead of resuming it")
    parser.add_argument("--keep-overlaps", action="store_true",
                        help="apply learned moves onto occupied sites (recorded as overlaps) instead of rejecting them")  # fmt: skip
    parser.add_argument("--engine", choices=("auto", "network", "table"), default="auto",
                        help="how learned models run: 'table' (n-fold way over an environment table, millions of "
                             "events/s, any --L), 'network' (one network call per event, training L only) or 'auto' "
                             "(default): the table for a hard-local model or one whose `hpcdyn locality` certificate "
                             "passes, else the network; the choice is recorded in the store")  # fmt: skip
    parser.add_argument("--table-family", help="with --engine table: the table's key family (e.g. vn1+count5); default: "
                        "the family the model's locality certificate passes, or comes closest to; its figures are recorded")  # fmt: skip
    parser.add_argument("--replicas-per-unit", type=positive_int, help="replicas per unit of work and lock-step batch (default: automatic)")
    parser.add_argument("--force", action="store_true",
                        help="run even when the expected events, snapshot volume or memory look absurd for this machine")  # fmt: skip
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--address", help="join the Ray cluster at this address (default: start a local Ray)")
    ray.add_argument("--actors", type=positive_int, help="number of actors (default: as many as the cluster fits)")
    ray.add_argument("--cpus-per-actor", type=positive_int, default=1, help="CPUs reserved per actor, also its torch threads (default 1)")
    ray.add_argument("--gpus-per-actor", type=non_negative_float, default=0.0, help="GPU fraction per actor, e.g. 0.25 (default 0: CPU)")
    ray.add_argument("--max-restarts", type=non_negative_int, default=3, help="restarts of a dead actor, and retries of its unit (default 3)")
    add_progress(parser)
    parser.set_defaults(handler=_ensemble, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted ensemble leaves: its committed units, which a rerun skips."""
    from hpcdyn.distributed.ensemble import store_progress

    progress = store_progress(args.out)
    if progress is None:
        return f"no store was created at {args.out}; rerun the same command to start"
    done, total = progress
    return (
        f"{args.out} holds {done} of {total} unit(s) finished and committed (units being simulated were dropped); "
        "rerun the same command to resume: finished units are skipped"
    )


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
        system=args.system,
        R=args.R,
        q=args.q,
        v_crowded=args.v_crowded,
        replicas_per_unit=args.replicas_per_unit,
        reject_overlaps=not args.keep_overlaps,
        engine=args.engine,
        table_family=args.table_family,
    )
    check_output_path(args.out)
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
            return run_ensemble(config, args.out, placement, overwrite=args.overwrite, progress=show_progress(args),
                                force=args.force)  # fmt: skip
    except EnsembleError as error:
        raise CommandError(str(error)) from error
