"""``hpcdyn analyze``: figures, a summary JSON and a Markdown report from an ensemble store.

    hpcdyn analyze ensemble.zarr --out report/ [--sweep sweep.nc] [--activity vp5.zarr ...] [--burn-in 50]

A thin wrapper over ``analysis.report.write_report``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hpcdyn.cli.options import CommandError, add_progress, check_existing_path, check_output_path, non_negative_time, show_progress


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
    from analysis.report import write_report
    from hpcdyn.physics.systems import ConfigurationError
    from hpcdyn.storage.integrity import StoreError

    _check_inputs(args)
    try:
        summary = write_report(
            args.store,
            args.out,
            sweep=args.sweep,
            activity_stores=args.activity,
            burn_in=args.burn_in,
            overwrite=args.overwrite,
            progress=show_progress(args),
        )
    except (ConfigurationError, StoreError, FileExistsError):
        raise
    except (RuntimeError, ValueError, OSError):  # a chunk that does not decode surfaces deep inside dask
        _damaged_store([args.store, *args.activity])
        raise
    return {
        "out": args.out,
        "report": f"{args.out}/report.md",
        "burn_in": summary["burn_in"],
        "models": sorted({row["model"] for row in summary["results"]}),
        "densities": sorted({row["density"] for row in summary["results"]}),
        "figures": summary["figures"],
    }
