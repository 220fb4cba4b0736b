"""``hpcdyn info``: a summary of a trajectory store."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands) -> None:
    parser = commands.add_parser("info", help="summarise a trajectory store", description="Summarise a trajectory store.")
    parser.add_argument("store", help="trajectory store")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_info)

def _info(args: argparse.Namespace) -> dict[str, Any] | str:
    from hpcdyn.storage.trajectory_store import open_trajectory

    summary = open_trajectory(args.store).summary()
    if args.json:
        return summary
    width = max(len(key) for key in summary)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in summary.items())
