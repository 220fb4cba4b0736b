"""``hpcdyn info``: a summary of a trajectory store, checked cheaply, or fully with --verify."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "info",
        help="summarise a trajectory store (and check it)",
        description="Summarise a trajectory store. Its attributes, the arrays' shapes and every chunk file are "
        "checked (cheap: nothing is decoded); --verify also reads everything: every chunk decoded, every value "
        "in range, the dwell times' sum, and the path log-likelihood under the store's params against the one "
        "the simulator recorded.",
    )
    parser.add_argument("store", help="trajectory store")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--verify", action="store_true", help="read the whole store and check every value (slower)")
    parser.set_defaults(handler=_info)


def _verify(trajectory) -> dict[str, Any]:
    from hpcdyn.learning.likelihood import check_generating_likelihood, path_log_likelihood
    from hpcdyn.physics.rates import true_rate_model

    read = trajectory.verify()
    result = path_log_likelihood(trajectory, true_rate_model(trajectory.system))
    check_generating_likelihood(trajectory, result)
    return {**read, "U": result.log_likelihood}


def _info(args: argparse.Namespace) -> dict[str, Any] | str:
    from hpcdyn.storage.trajectory_store import open_trajectory

    trajectory = open_trajectory(args.store)
    trajectory.check_chunks()
    summary = trajectory.summary()
    summary["checked"] = "everything (--verify)" if args.verify else "attributes, shapes, chunk files"
    if args.verify:
        summary["verified"] = _verify(trajectory)
    if args.json:
        return summary
    width = max(len(key) for key in summary)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in summary.items())
