"""``hpcdyn analyze``: figures, a summary JSON and a Markdown report from an ensemble store.

    hpcdyn analyze ensemble.zarr --out report/ [--sweep sweep.nc] [--activity vp5.zarr ...] [--burn-in 50]
    hpcdyn analyze ensemble.zarr --out report/ --address auto          # per-chunk work on a Ray cluster's workers
    hpcdyn analyze ensemble.zarr --out report/ --address local --num-cpus 4   # a Ray started here

A thin wrapper over ``analysis.report.write_report``; with --address the per-chunk observables run
as Ray tasks (``hpcdyn.distributed.analysis_tasks``), the reduction here, with identical results.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from hpcdyn.cli.options import (
    CommandError,
    add_progress,
    check_existing_path,
    check_output_path,
    non_negative_time,
    positive_int,
    show_progress,
)


def add_parser(commands) -> None:
    """Register ``analyze`` on the CLI's sub-command set."""

    parser = commands.add_parser(
        "analyze",
        help="observables, phase diagrams and a report from an ensemble store",
        description="Compute f4, its variance, cluster counts and sizes per model and density (xarray/dask, "
        "chunk by chunk), compare learned models with the original dynamics, and write figures (PNG, PDF), "
        "summary.json and report.md into REPORT_DIR.",
    )
    parser.add_argument("store", metavar="ENSEMBLE_STORE", help="ensemble store written by `hpcdyn ensemble`")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory to write the report into")
    parser.add_argument(
        "--sweep",
        metavar="RESULTS",
        help="sweep results to plot U/T against N_theta: the directory `hpcdyn sweep` wrote (or its results.zarr), "
        "or a Zarr/NetCDF Dataset with dim n_classes and variable validation_U_per_T (see analysis/README.md)",
    )
    parser.add_argument(
        "--activity",
        action="append",
        default=[],
        metavar="STORE",
        help="ensemble store at another activity v_plus/D for the (density, activity) maps; repeat for several",
    )
    parser.add_argument(
        "--burn-in", type=non_negative_time, help="discard snapshots before this time (default: the store's burn_in attribute)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing REPORT_DIR")
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="compute the per-chunk observables as Ray tasks on the cluster at ADDR (HOST:PORT, or auto for the "
        "cluster this machine belongs to; local starts a Ray here), the reduction here; the workers read the "
        "stores by path, so they must be on a filesystem the workers share (default: dask threads here)",
    )
    parser.add_argument(
        "--num-cpus", type=positive_int, help="CPUs of the Ray that --address local starts (default: all); not with a cluster"
    )
    add_progress(parser)
    parser.set_defaults(handler=_analyze, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    return f"the partial report was removed and {args.out} is as it was before; rerun the same command"


def _check_inputs(args: argparse.Namespace) -> None:
    check_existing_path(args.store, "store", "the ensemble store `hpcdyn ensemble --out` wrote")
    for store in args.activity:
        check_existing_path(store, "activity", "an ensemble store at another activity")
    if args.sweep is not None:
        check_existing_path(args.sweep, "sweep", "the directory `hpcdyn sweep` wrote, or its results.zarr")
    if args.num_cpus is not None and args.address != "local":
        raise CommandError("num_cpus: --num-cpus sizes the Ray that --address local starts; a cluster has its own CPUs")
    out = check_output_path(args.out)
    if args.overwrite and out.exists() and not (out.is_dir() and (out / "summary.json").exists()):
        raise CommandError(f"out: {out} exists and is not a report directory (no summary.json); --overwrite replaces only a report")


def _damaged_store(stores: list[str]) -> None:
    """After a failure inside the analysis: read every hpcdyn ensemble store fully; a damaged one is
    named (StoreError). Stores of other writers are left to the original error."""
    from hpcdyn.storage.ensemble_store import SCHEMA, verify_ensemble
    from hpcdyn.storage.trajectory_store import store_schema

    for store in stores:
        if store_schema(Path(store)) == SCHEMA:
            verify_ensemble(store)


def _analyze(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args)
    with contextlib.ExitStack() as stack:
        run_tasks = None
        if args.address is not None:
            from hpcdyn.distributed.analysis_tasks import ray_tasks

            run_tasks = stack.enter_context(ray_tasks(args.address, args.num_cpus))
        summary = _report(args, run_tasks)
        cluster = None if run_tasks is None else {"address": args.address, "cpus": run_tasks.cpus, "tasks": run_tasks.submitted}
    result = {
        "out": args.out,
        "report": f"{args.out}/report.md",
        "burn_in": summary["burn_in"],
        "models": sorted({row["model"] for row in summary["results"]}),
        "densities": sorted({row["density"] for row in summary["results"]}),
        "figures": summary["figures"],
    }
    return result if cluster is None else {**result, "ray": cluster}


def _report(args: argparse.Namespace, run_tasks) -> dict[str, Any]:
    from analysis.report import write_report
    from hpcdyn.distributed.analysis_tasks import ClusterFailure  # no ray import
    from hpcdyn.physics.systems import ConfigurationError
    from hpcdyn.storage.integrity import StoreError

    try:
        return write_report(
            args.store,
            args.out,
            sweep=args.sweep,
            activity_stores=args.activity,
            burn_in=args.burn_in,
            overwrite=args.overwrite,
            progress=show_progress(args),
            run_tasks=run_tasks,
        )
    except (ConfigurationError, StoreError, FileExistsError):
        raise
    except ClusterFailure as error:  # the cluster failed, not the store: one line, exit 2
        raise CommandError(str(error)) from error
    except (RuntimeError, ValueError, OSError):  # a chunk that does not decode surfaces deep inside dask (or a task)
        _damaged_store([args.store, *args.activity])
        raise
