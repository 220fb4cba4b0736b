"""``hpcdyn locality``: the locality certificate of a trained model, written beside its checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from hpcdyn.cli.options import (
    add_progress, check_device, check_existing_path, non_negative_float, positive_float, positive_int, show_progress,
)  # fmt: skip

# Fresh configurations: the original dynamics run this long from a random configuration (time units,
# thousands of events per particle at the paper's rates), then one configuration every SPACING.
BURN_IN = 20.0
SPACING = 2.0
EVALUATION_DENSITIES = (0.3, 0.5)  # besides the training density (DESIGN 1.1)
CANDIDATE_MOVES = 20_000  # per density by default: a class disagreement of 1e-4 is then resolved


def add_parser(commands) -> None:
    from hpcdyn.learning.names import COUNT_FAMILIES, DEFAULT_FAMILIES

    parser = commands.add_parser(
        "locality",
        help="certify whether an environment table reproduces a trained model, and with which key family",
        description="For each key family, compare every token's log-rates in full configurations with those of "
        "its key's patch evaluated alone on an empty lattice of the training size: max and percentiles of "
        "|delta log-rate| per move type and, for Mode 2, the fraction of moves whose class differs. Reports the "
        "smallest family within --tolerance and writes RUN/locality.json and RUN/locality.png. Default "
        "configurations: the original dynamics at the training density, 0.3 and 0.5, after a burn-in.",
    )
    parser.add_argument("run", help="run directory (uses best.pt) or checkpoint file")
    parser.add_argument("--store", action="append", default=[], metavar="STORE",
                        help="take configurations from this trajectory store (repeatable; replaces the fresh "
                             "configurations unless --density is given too)")  # fmt: skip
    parser.add_argument("--density", type=positive_float, nargs="+",
                        help="densities of fresh original-dynamics configurations "
                             "(default: the training density, 0.3, 0.5)")  # fmt: skip
    parser.add_argument("--family", action="append", metavar="FAMILY",
                        help=f"key family to certify (repeatable; default: {' '.join(DEFAULT_FAMILIES)}, and for particle "
                             f"systems {' '.join(COUNT_FAMILIES)})")  # fmt: skip
    parser.add_argument("--tolerance", type=non_negative_float,
                        help="largest Mode 2 class disagreement (default 1e-4) or Mode 1 99th percentile of "
                             "|delta log-rate| (default 0.01) at which a family passes")  # fmt: skip
    parser.add_argument("--configurations", type=positive_int,
                        help=f"configurations per density or store (default: enough for {CANDIDATE_MOVES} "
                             "candidate moves, 4 to 200)")  # fmt: skip
    parser.add_argument("--burn-in", type=non_negative_float, default=BURN_IN,
                        help=f"time before the first fresh configuration (default {BURN_IN:g})")  # fmt: skip
    parser.add_argument("--spacing", type=positive_float, default=SPACING,
                        help=f"time between fresh configurations (default {SPACING:g})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh configurations")
    parser.add_argument("--training-store", metavar="STORE",
                        help="the trajectory the model was trained on (default: the checkpoint's, where it still is): "
                             "each density also reports the share of tokens whose key its training part never "
                             "showed, and the criterion on the others; each family's table is scored on its held-out "
                             "events beside the network")  # fmt: skip
    parser.add_argument("--no-training-keys", action="store_true",
                        help="skip those comparisons (they compute each family's statistics over the training "
                             "trajectory and evaluate the network on every held-out key's patch)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_progress(parser)
    parser.set_defaults(handler=_locality)


def _locality(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.learning.locality import (
        certificate_directory, certify, check_families, checkpoint_file, default_families, load_certified_model,
        write_certificate,
    )  # fmt: skip

    check_device(args.device)
    check_existing_path(args.run, "run", "a training run directory (with best.pt) or a checkpoint file")
    _, system = load_certified_model(checkpoint_file(args.run))
    families = args.family or default_families(system)
    check_families(families, system)  # before any simulation: an unknown family is named with the valid ones
    samples = [_store_sample(store, system, args.configurations) for store in args.store]
    if args.density is not None or not args.store:
        samples += _fresh_samples(system, args)
    training_store = None if args.no_training_keys else _training_store(args.run, args.training_store)
    certificate = certify(args.run, samples, families, args.tolerance, args.device, training_store, show_progress(args))
    json_path, figure_path = write_certificate(certificate, certificate_directory(args.run))
    return {
        "family": certificate.family,
        "passes": certificate.passes,
        "receptive_family": certificate.receptive_family,
        "heldout_family": certificate.heldout_family,
        "training_store": None if training_store is None else str(training_store.path),
        "criterion": certificate.criterion,
        "tolerance": certificate.tolerance,
        "families": {row.family: _summary(row, certificate.mode) for row in certificate.families},
        "certificate": str(json_path),
        "figure": str(figure_path),
    }


def _summary(row, mode: int) -> dict[str, Any]:
    worst = {"passes": row.passes, "max_p99": max(sample.percentiles["p99"] for sample in row.samples),
             "max": max(sample.max for sample in row.samples)}  # fmt: skip
    if mode == 2:
        worst["max_class_disagreement"] = max(sample.class_disagreement for sample in row.samples)
    if row.heldout is not None:
        worst["heldout_table_minus_network_per_event"] = row.heldout["table_minus_network_per_event"]
    if all(sample.seen is not None for sample in row.samples):
        criterion = "class_disagreement" if mode == 2 else "p99"
        worst["on_seen_keys"] = {sample.label: {"unseen_tokens": sample.seen["unseen_tokens"],
                                                criterion: sample.seen[criterion], "moves": sample.seen["moves"]}
                                 for sample in row.samples}  # fmt: skip
    return worst


def _training_store(run: str, given: str | None):
    """The model's training trajectory: --training-store (it must be the one the checkpoint names, by
    fingerprint), else the checkpoint's own where it still is, else None (the comparison is skipped)."""
    from pathlib import Path

    from hpcdyn.cli.options import CommandError
    from hpcdyn.learning.checkpoint import load_checkpoint, store_identity
    from hpcdyn.learning.locality import checkpoint_file
    from hpcdyn.storage.trajectory_store import open_trajectory

    recorded = load_checkpoint(checkpoint_file(run)).get("store", {})
    path = given or recorded.get("path")
    if path is None or (given is None and not Path(path).exists()):
        return None
    check_existing_path(path, "training-store", "the trajectory store the model was trained on")
    store = open_trajectory(path)
    fingerprint = store_identity(store)["fingerprint"]
    if recorded.get("fingerprint") not in (None, fingerprint):
        if given is None:  # the checkpoint's path holds another trajectory now: skipped, not refused
            return None
        raise CommandError(f"training-store: {path} is not the trajectory the model was trained on (fingerprint "
                           f"{fingerprint}, the checkpoint names {recorded['fingerprint']}); give that store or "
                           "--no-training-keys")  # fmt: skip
    return store


def _configurations(args: argparse.Namespace, n_tokens: int, n_moves: int) -> int:
    if args.configurations is not None:
        return args.configurations
    return int(min(200, max(4, -(-CANDIDATE_MOVES // (n_tokens * n_moves)))))


def _store_sample(store: str, system, configurations: int | None):
    """Configurations of a store of the model's system and lattice; another system is refused by name."""
    from hpcdyn.cli.options import CommandError
    from hpcdyn.learning.locality import samples_from_store
    from hpcdyn.storage.trajectory_store import open_trajectory

    trajectory = open_trajectory(store)
    found = trajectory.system
    if found.name != system.name:
        raise CommandError(f"store: {store} holds the {found.name!r} system; the model was trained on {system.name!r}")
    if found.shape != system.shape:
        raise CommandError(f"store: {store} has a {found.shape[1]} x {found.shape[0]} lattice; the model was trained on "
                           f"{system.shape[1]} x {system.shape[0]}")  # fmt: skip
    count = configurations or int(min(200, max(4, -(-CANDIDATE_MOVES // (found.n_tokens * found.n_moves)))))
    return samples_from_store(trajectory, count, label=str(store))


def _fresh_samples(system, args: argparse.Namespace) -> list:
    """Configurations of the original dynamics at each density, after a burn-in from a random start."""
    from hpcdyn.cli.options import CommandError
    from hpcdyn.physics.systems import ActiveSystem, make_system

    if not isinstance(system, ActiveSystem):
        if args.density is not None:
            raise CommandError(f"density: the {system.name!r} system has no density; certify on --store configurations")
        return [_draw(system, f"{system.name} (training parameters)", system.c, args, seed_offset=0)]
    densities = args.density or (system.density, *EVALUATION_DENSITIES)
    samples = []
    for index, density in enumerate(dict.fromkeys(round(value, 6) for value in densities)):
        params = {**system.params(), "density": density}
        params.pop("N")
        at_density = make_system(system.name, params)
        samples.append(_draw(at_density, f"density {density:g}", at_density.density, args, seed_offset=index))
    return samples


def _draw(system, label: str, density: float, args: argparse.Namespace, seed_offset: int):
    import numpy as np

    from hpcdyn.learning.locality import Sample
    from hpcdyn.simulation.compiled import CompiledSimulator

    rng = np.random.default_rng([args.seed, seed_offset])
    positions, states = system.initial_configuration(rng)
    count = _configurations(args, system.n_tokens, system.n_moves)
    taken = []
    for leg in range(count):
        duration = args.burn_in if leg == 0 else args.spacing
        simulator = CompiledSimulator(system, positions, states, rng, duration, chunk_events=1 << 16)
        for _ in simulator.chunks():
            pass
        positions, states = simulator.configuration()
        taken.append((positions.astype(np.int64), states.astype(np.int64)))
    return Sample(label, float(density), np.stack([p for p, _ in taken]), np.stack([s for _, s in taken]))
