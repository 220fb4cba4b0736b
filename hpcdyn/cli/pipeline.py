"""``hpcdyn pipeline``: the whole study (simulate, sweep, pick, ensembles, report) in one command.

    hpcdyn pipeline --preset quick --out runs/pipeline          # minutes on a laptop, local Ray
    hpcdyn pipeline --preset paper --out study --address auto  # GPU nodes or a cluster
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from hpcdyn.cli.options import add_progress, check_output_path, non_negative_float, positive_float, positive_int, show_progress


def add_parser(commands) -> None:
    from hpcdyn.distributed.pipeline import PRESETS

    parser = commands.add_parser(
        "pipeline",
        help="the whole study: N_theta and range sweeps, best model, ensembles of original and learned dynamics, report",
        description="Simulate the training trajectory at density 0.124, run the N_theta study (Mode 1 and Mode 2) "
        "on Ray Tune, copy the best Mode 2 model at N* to OUT/models/learned, run the range study (r*), simulate "
        "original and learned dynamics at several densities on Ray actors (OUT/ensemble.zarr) and on a large "
        "lattice (OUT/snapshots.zarr; with --preset large also judged on 256 x 256, OUT/large.zarr), learn and simulate the activity study, and write the report "
        "(OUT/report/report.md). Prints N*, r* and the verdict. Rerunning the same command resumes an interrupted "
        "run and reuses finished stages.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick (default): the paper's study in minutes on 2 CPU cores; large: quick on a 10x longer training "
                        "trajectory (T 5000), then learned against original dynamics on 256 x 256 (OUT/large.zarr); paper: the paper-scale study for GPUs or a cluster")  # fmt: skip
    parser.add_argument("--out", required=True, help="directory of the whole study (resumed when it exists)")
    parser.add_argument("--address", help="join the Ray cluster at this address (default: start a local Ray)")
    parser.add_argument("--num-cpus", type=positive_int, help="CPUs of a local Ray (default: all); not with --address")
    parser.add_argument("--cpus-per-trial", type=positive_float, default=1.0, help="CPUs per training trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=non_negative_float, default=0.0, help="GPUs per training trial, fractions share (default 0)")
    parser.add_argument("--cpus-per-actor", type=positive_int, default=1, help="CPUs per ensemble actor (default 1)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float, default=0.0, help="GPU fraction per ensemble actor (default 0)")
    add_progress(parser)
    parser.set_defaults(handler=_pipeline, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted pipeline leaves: its finished stages and the resumable work of the current one."""
    return (
        f"{args.out} keeps every finished stage (listed in pipeline.json) and the resumable work of the "
        "interrupted one (sweep trials' checkpoints, the ensemble's finished units); rerun the same command to resume"
    )


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.distributed.pipeline import PipelineOptions, pipeline_summary, result_lines, run_pipeline
    from hpcdyn.physics.systems import ConfigurationError

    if args.address and args.num_cpus is not None:
        raise ConfigurationError("num_cpus: --num-cpus sizes a local Ray; a cluster at --address has its own CPUs")
    check_output_path(args.out)
    options = PipelineOptions(
        address=args.address,
        num_cpus=args.num_cpus,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        progress=show_progress(args),
    )

    def log(message: str) -> None:
        print(f"hpcdyn pipeline: {message}", file=sys.stderr, flush=True)

    # Ray and Tune print notices on stdout; stdout is for the JSON summary.
    with contextlib.redirect_stdout(sys.stderr):
        record = run_pipeline(args.preset, args.out, options, log=log)
    for line in result_lines(record):  # what the study found, in words; the JSON summary follows on stdout
        log(line)
    return pipeline_summary(record, args.out)
