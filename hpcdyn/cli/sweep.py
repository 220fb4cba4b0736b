"""``hpcdyn sweep STUDY``: run a study of sweeps/ on Ray Tune, then write its Dataset and figures.

    hpcdyn sweep ntheta --smoke                                 # local Ray on this machine
    hpcdyn sweep ntheta --address auto --gpus-per-trial 0.25    # a running cluster, 4 trials per GPU
    hpcdyn sweep ntheta --smoke --set training.epochs=2 --grid model.n_classes=1,2,3

Rerunning the same command (same --storage and --name) resumes the sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hpcdyn.cli.options import (
    CommandError,
    add_progress,
    check_output_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    show_progress,
)
from hpcdyn.physics.systems import SYSTEMS
from hpcdyn.storage import strict_json

SYSTEM_NAMES = tuple(SYSTEMS)


def add_parser(commands) -> None:

    parser = commands.add_parser(
        "sweep",
        help="train many models at once on Ray Tune (N_theta scans, hyper-parameter grids, activity scans)",
        description="Run a study of sweeps/ as a Ray Tune experiment under STORAGE/NAME: one training per grid "
        "point, a checkpoint after every epoch, failed trials retried. Rerunning the same command resumes it: "
        "finished trials are kept, unfinished ones continue from their last checkpoint. The results become an "
        "xarray Dataset (STORAGE/NAME/results.zarr, load with hpcdyn.distributed.sweep_results.load_sweep_results) and PNG "
        "figures beside it; an N_theta scan prints its plateau N*, a range scan its r*.",
    )
    parser.add_argument("study", help="study name: ntheta, hparams, activity or range (modules of sweeps/)")
    parser.add_argument("--smoke", action="store_true", help="the study's small size (minutes on 2 CPU cores)")
    parser.add_argument("--system", choices=SYSTEM_NAMES,
                        help="learn from this system's trajectory instead of the study's (e.g. quorum; fa: the range study)")  # fmt: skip
    parser.add_argument("--address", help="join the Ray cluster at this address (e.g. auto); default: start a local Ray")
    parser.add_argument("--storage", default="runs/sweeps", help="directory of sweeps and shared trajectories (default runs/sweeps)")
    parser.add_argument("--name", help="experiment name under --storage (default: STUDY, or STUDY-smoke)")
    parser.add_argument("--gpus-per-trial", type=non_negative_float, default=0.0, help="GPUs per trial; fractions share a GPU (default 0: CPU)")
    parser.add_argument("--cpus-per-trial", type=positive_float, default=1.0, help="CPUs per trial, also its torch threads (default 1)")
    parser.add_argument("--max-concurrent", type=positive_int, help="at most this many trials at once (default: as resources allow)")
    parser.add_argument("--num-cpus", type=positive_int, help="CPUs of a local Ray (default: all); not with --address")
    parser.add_argument("--max-failures", type=non_negative_int, default=2, help="retries of a failed trial from its last checkpoint (default 2)")
    parser.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on held-out U/T)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="fix a parameter for every trial, e.g. --set training.epochs=2 (repeatable)")  # fmt: skip
    parser.add_argument("--grid", metavar="KEY=V1,V2", action="append", default=[],
                        help="sweep a parameter over these values, e.g. --grid model.n_classes=1,2,3 (repeatable)")  # fmt: skip
    add_progress(parser)
    parser.set_defaults(handler=run_command, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted sweep leaves: Tune's experiment with its finished trials and checkpoints."""
    name = args.name or (f"{args.study}-smoke" if args.smoke else args.study)
    return (
        f"the experiment {Path(args.storage) / name} keeps its finished trials and every trial's last checkpoint; "
        "rerun the same command to resume it"
    )


def _value(text: str) -> Any:
    """A parameter value as JSON when it parses (numbers, true, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _assignments(items: list[str], option: str, axis: bool) -> dict[str, Any]:
    from hpcdyn.physics.systems import ConfigurationError

    values: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key.strip() or not text.strip():
            raise ConfigurationError(f"{option}: expected KEY={'V1,V2' if axis else 'VALUE'}, got {item!r}")
        values[key.strip()] = [_value(part.strip()) for part in text.split(",")] if axis else _value(text.strip())
    return values


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.distributed.sweep import Resources, finish_sweep, run_sweep
    from hpcdyn.physics.systems import ConfigurationError
    from sweeps import get_study, study_summary

    study = get_study(args.study, smoke=args.smoke, system=args.system).with_overrides(
        _assignments(args.set, "--set", axis=False), _assignments(args.grid, "--grid", axis=True)
    )
    if args.address and args.num_cpus is not None:
        raise ConfigurationError("num_cpus: --num-cpus sizes a local Ray; a cluster at --address has its own CPUs")
    check_output_path(args.storage, "storage")
    resources = Resources(args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent)
    name = args.name or (f"{study.name}-smoke" if args.smoke else study.name)
    outcome = run_sweep(
        study,
        storage=args.storage,
        name=name,
        address=args.address,
        num_cpus=args.num_cpus,
        resources=resources,
        max_failures=args.max_failures,
        asha=args.asha,
        progress=show_progress(args),
    )
    finished = finish_sweep(outcome, smoke=args.smoke)
    dataset, results_path, figures, plateau = finished.dataset, finished.results_path, finished.figures, finished.plateau
    summary: dict[str, Any] = {
        "sweep": str(outcome.path),
        "trials": len(outcome.points),
        "finished": int((dataset["status"] == "done").sum()),
        "errored": int((dataset["status"] == "error").sum()),
        "resumed": outcome.restored,
        "results": str(results_path),
        "figures": [str(path) for path in figures],
    }
    if plateau is not None:
        summary["n_star"] = plateau.n_star
        summary["plateau"] = {"n_classes": plateau.n_classes, "mean_val_U_per_T": plateau.mean, "gains": plateau.gains}
        print(f"N* = {plateau.n_star} (held-out U/T against N_theta: "
              + ", ".join(f"{n}: {value:.4g}" for n, value in zip(plateau.n_classes, plateau.mean)) + ")",
              file=sys.stderr)  # fmt: skip
    extra = study_summary(args.study, dataset, outcome.path)
    for line in extra.pop("lines", []):
        print(line, file=sys.stderr)
    summary["figures"] += extra.pop("figures", [])
    summary.update(extra)
    if outcome.unfinished:

        print(strict_json.dumps({**summary, "unfinished": outcome.unfinished}, indent=2))
        raise CommandError(
            f"interrupted with {outcome.unfinished} trial(s) unfinished; the results written to {Path(results_path)} "
            "lack them; rerun the same command to resume"
        )
    if outcome.errors:
        summary["errors"] = [str(error).splitlines()[0][:300] for error in outcome.errors]
        print(strict_json.dumps(summary, indent=2))

        raise CommandError(
            f"{len(outcome.errors)} trial(s) failed after {args.max_failures} retries; the results written to "
            f"{Path(results_path)} lack them; rerun the same command to retry them from their last checkpoint"
        )
    return summary
