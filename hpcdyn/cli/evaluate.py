"""``hpcdyn evaluate``: a trained model scored on a trajectory store."""

from __future__ import annotations

import argparse
from typing import Any

from hpcdyn.cli.options import CommandError, check_device, check_existing_path


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="U/T of a trained model on a trajectory, and its gap to the true dynamics",
        description="Score a trained model (run directory or checkpoint file) on a trajectory store: U, U/T, "
        "the gap to the generating rates in nats per event, and for Mode 2 the learned class rates and "
        "which true move types land in which class. Without STORE, the training store is used.",
    )
    parser.add_argument("run", help="run directory (uses best.pt) or checkpoint file")
    parser.add_argument("store", nargs="?", help="trajectory store (default: the one the model was trained on)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from hpcdyn.learning.checkpoint import load_checkpoint
    from hpcdyn.learning.evaluation import evaluate
    from hpcdyn.storage.trajectory_store import open_trajectory

    check_device(args.device)
    check_existing_path(args.run, "run", "a training run directory (with best.pt) or a checkpoint file")
    store = args.store
    if store is None:
        checkpoint = Path(args.run) / "best.pt" if Path(args.run).is_dir() else Path(args.run)
        store = load_checkpoint(checkpoint)["store"].get("path", "<memory>")
        if store == "<memory>":
            raise CommandError("store: this model was trained on an in-memory trajectory; name a STORE to evaluate on")
    return evaluate(args.run, open_trajectory(store), device=args.device)
