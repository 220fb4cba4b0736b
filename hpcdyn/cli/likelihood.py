"""``hpcdyn likelihood``: the exact path log-likelihood of a stored trajectory under its own or changed rates."""

from __future__ import annotations

import argparse
from typing import Any

from hpcdyn.cli.options import check_device, positive_int
from hpcdyn.physics.systems import ConfigurationError


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "likelihood",
        help="exact path log-likelihood of a stored trajectory",
        description="U, U/T and U per event of a trajectory store under its own generating rates, "
        "or under other rate parameters with --set.",
    )
    parser.add_argument("store", help="trajectory store")
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="evaluate under changed rate parameters, e.g. --set v_plus=20 (repeatable)",
    )
    parser.add_argument("--segment-events", type=positive_int, default=4096, help="events scored per batch (default 4096)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(handler=_likelihood)


def _parse_assignments(items: list[str]) -> dict[str, float]:
    values = {}
    for item in items:
        name, separator, text = item.partition("=")
        if not separator or not name.strip():
            raise ConfigurationError(f"set: expected --set NAME=VALUE, got {item!r}")
        try:
            values[name.strip()] = int(text) if name.strip() in ("L", "N", "dim", "R", "q") else float(text)
        except ValueError as error:
            raise ConfigurationError(f"{name.strip()}: {text!r} is not a number") from error
    return values


def _likelihood(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from hpcdyn.learning.likelihood import check_generating_likelihood, path_log_likelihood
    from hpcdyn.physics.rates import true_rate_model
    from hpcdyn.storage.trajectory_store import open_trajectory

    check_device(args.device)
    changes = _parse_assignments(args.set)
    trajectory = open_trajectory(args.store)
    structural = sorted(set(changes) & {"L", "N", "dim"})
    if structural:
        raise ConfigurationError(f"{structural[0]}: cannot change the lattice of a stored trajectory; set rates only")
    known = set(trajectory.system.params())
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigurationError(f"{unknown[0]}: not a parameter of this store's system; known: {sorted(known)}")
    system = dataclasses.replace(trajectory.system, **changes)
    result = path_log_likelihood(trajectory, true_rate_model(system), args.segment_events, args.device)
    if not changes:  # the store's own rates must explain its events (and match what the simulator recorded)
        check_generating_likelihood(trajectory, result)
    summary = {"store": str(trajectory.path), **result.as_dict(), "model": "generating rates", "params": system.params()}
    if trajectory.log_likelihood is not None and not changes:
        summary["simulator_U"] = trajectory.log_likelihood
    return summary
