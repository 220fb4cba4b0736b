"""The ``hpcdyn`` command line: thin wrappers over library functions.

    hpcdyn simulate --system active --preset paper --t-final 100 --seed 1 --out run.zarr
    hpcdyn likelihood run.zarr
    hpcdyn info run.zarr
    hpcdyn train run.zarr --mode 2 --n-classes 4 --out runs/mode2
    hpcdyn evaluate runs/mode2 [other.zarr]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable, Sequence

from hpcdyn.systems import PRESETS, SYSTEMS, ConfigurationError

SYSTEM_OPTIONS = {  # CLI option -> (parameter name, type, help)
    "--L": ("L", int, "lattice side (sites per dimension)"),
    "--N": ("N", int, "number of particles (active)"),
    "--density": ("density", float, "particle density N/L^2 in (0, 1] (active; instead of --N)"),
    "--D": ("D", float, "rotation rate (active)"),
    "--v-plus": ("v_plus", float, "hop rate along the orientation (active)"),
    "--v-other": ("v_other", float, "hop rate in the three other directions (active)"),
    "--c": ("c", float, "FA up-spin bias: flip rates m*c (0->1) and m*(1-c) (1->0)"),
    "--dim": ("dim", int, "FA lattice dimension, 1 or 2"),
}


class CommandError(Exception):
    """A user error reported as one line, exit status 2."""


def _system_parameters(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for name, _, _ in SYSTEM_OPTIONS.values()}
    given = {name: value for name, value in given.items() if value is not None}
    known = {field for field in SYSTEMS[args.system].__dataclass_fields__} | (
        {"density"} if args.system == "active" else set()
    )
    foreign = sorted(set(given) - known)
    if foreign:
        option = "--" + foreign[0].replace("_", "-")
        raise ConfigurationError(f"{foreign[0]}: {option} is not a parameter of system {args.system!r}")
    return given


def _positive_time(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite time > 0, got {text}")
    return value


def _non_negative_time(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite time >= 0, got {text}")
    return value


def _add_simulate(commands) -> None:
    parser = commands.add_parser(
        "simulate",
        help="simulate the original dynamics exactly and store the trajectory (Zarr)",
        description="Exact continuous-time Monte Carlo (n-fold way) of a lattice system, streamed to a Zarr store.",
    )
    parser.add_argument("--system", choices=sorted(SYSTEMS), default="active", help="which model (default active)")
    presets = sorted({name for table in PRESETS.values() for name in table})
    parser.add_argument("--preset", choices=presets, help="start from a named parameter set, e.g. paper")
    for option, (name, kind, text) in SYSTEM_OPTIONS.items():
        parser.add_argument(option, dest=name, type=kind, help=text)
    parser.add_argument("--t-final", type=_positive_time, required=True, help="simulated time T")
    parser.add_argument("--seed", type=int, default=0, help="random seed; fixes the whole run (default 0)")
    parser.add_argument("--out", required=True, help="path of the trajectory store to write")
    parser.add_argument("--snapshot-every", type=_positive_time, help="also record the lattice every DT time units")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    _add_progress(parser)
    parser.set_defaults(handler=_simulate)


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.simulate import simulate_to_store
    from hpcdyn.store import open_trajectory
    from hpcdyn.systems import make_system

    if args.N is not None and args.density is not None:
        raise ConfigurationError("density: give either --N or --density, not both")
    system = make_system(args.system, _system_parameters(args), preset=args.preset)
    path = simulate_to_store(
        system,
        t_final=args.t_final,
        seed=args.seed,
        out=args.out,
        snapshot_every=args.snapshot_every,
        overwrite=args.overwrite,
        progress=_show_progress(args),
    )
    return open_trajectory(path).summary()


def _add_likelihood(commands) -> None:
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
    parser.add_argument("--segment-events", type=int, default=4096, help="events scored per batch (default 4096)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(handler=_likelihood)


def _parse_assignments(items: list[str]) -> dict[str, float]:
    values = {}
    for item in items:
        name, separator, text = item.partition("=")
        if not separator:
            raise ConfigurationError(f"--set: expected NAME=VALUE, got {item!r}")
        try:
            values[name.strip()] = int(text) if name.strip() in ("L", "N", "dim") else float(text)
        except ValueError as error:
            raise ConfigurationError(f"{name.strip()}: {text!r} is not a number") from error
    return values


def _likelihood(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from hpcdyn.likelihood import path_log_likelihood
    from hpcdyn.rates import true_rate_model
    from hpcdyn.store import open_trajectory

    trajectory = open_trajectory(args.store)
    changes = _parse_assignments(args.set)
    structural = sorted(set(changes) & {"L", "N", "dim"})
    if structural:
        raise ConfigurationError(f"{structural[0]}: cannot change the lattice of a stored trajectory; set rates only")
    known = set(trajectory.system.params())
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigurationError(f"{unknown[0]}: not a parameter of this store's system; known: {sorted(known)}")
    system = dataclasses.replace(trajectory.system, **changes)
    result = path_log_likelihood(trajectory, true_rate_model(system), args.segment_events, args.device)
    summary = {"store": str(trajectory.path), **result.as_dict(), "model": "generating rates", "params": system.params()}
    if trajectory.log_likelihood is not None and not changes:
        summary["simulator_U"] = trajectory.log_likelihood
    return summary


def _add_info(commands) -> None:
    parser = commands.add_parser("info", help="summarise a trajectory store", description="Summarise a trajectory store.")
    parser.add_argument("store", help="trajectory store")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_info)


def _info(args: argparse.Namespace) -> dict[str, Any] | str:
    from hpcdyn.store import open_trajectory

    summary = open_trajectory(args.store).summary()
    if args.json:
        return summary
    width = max(len(key) for key in summary)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in summary.items())


def _add_train(commands) -> None:
    from hpcdyn.optim import OPTIMIZERS
    from hpcdyn.training import CLASS_RATE_FITS
    from hpcdyn.transformer import ESTIMATORS

    parser = commands.add_parser(
        "train",
        help="train a transformer on one trajectory by maximising its path log-likelihood",
        description="Train a transformer rate model on a trajectory store. Mode 1: free rates per move; "
        "Mode 2: N_theta classes of move with one learned rate each. The last --validation-fraction of "
        "the events is held out; best.pt, last.pt, metrics.jsonl and config.json go to --out.",
    )
    parser.add_argument("store", help="trajectory store to learn from")
    parser.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    model = parser.add_argument_group("model")
    model.add_argument("--mode", type=int, choices=(1, 2), default=1, help="1: free rates, 2: classes (default 1)")
    model.add_argument("--n-classes", type=int, default=4, help="N_theta, the number of move classes (Mode 2)")
    model.add_argument("--estimator", choices=ESTIMATORS, default="straight_through", help="Mode 2 gradient estimator")
    model.add_argument("--exclusion-mask", action="store_true", help="tell the model hops onto occupied sites are forbidden")
    model.add_argument("--d-model", type=int, default=64)
    model.add_argument("--n-heads", type=int, default=4)
    model.add_argument("--n-layers", type=int, default=2)
    model.add_argument("--d-ff", type=int, default=128)
    model.add_argument("--no-rotary", dest="rotary", action="store_false", help="absolute position tables only")
    model.add_argument("--no-attention-sink", dest="attention_sink", action="store_false", help="plain softmax attention")
    model.add_argument("--no-relative-bias", dest="relative_bias", action="store_false",
                       help="no learned attention score per offset on the torus")  # fmt: skip
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=int, default=20)
    optimisation.add_argument("--lr", type=float, default=3e-3)
    optimisation.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    optimisation.add_argument("--segment-events", type=int, default=256, help="consecutive events per gradient step")
    optimisation.add_argument("--validation-fraction", type=float, default=0.1)
    optimisation.add_argument("--max-train-events", type=int, help="use only the first events for training")
    optimisation.add_argument("--gradient-clip", type=float, default=1.0)
    optimisation.add_argument("--patience", type=int, default=5, help="epochs without improvement before stopping")
    optimisation.add_argument("--seed", type=int, default=0)
    optimisation.add_argument("--class-rate-fit", choices=CLASS_RATE_FITS, default="gradient",
                              help="Mode 2: leave the class rates to the gradient (default), set them to "
                                   "events / exposure per class after each epoch (closed_form) or after the last "
                                   "one only (closed_form_last)")  # fmt: skip
    optimisation.add_argument("--expected-from-epoch", type=int, metavar="EPOCH",
                              help="Mode 2: from this epoch on, train the classifier by the exact gradient of the "
                                   "expected U instead of --estimator (e.g. 4 of 10 epochs, with --class-rate-fit "
                                   "closed_form_last; README)")  # fmt: skip
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    hardware.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the encoder (CUDA)")
    hardware.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    _add_progress(parser)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.store import open_trajectory
    from hpcdyn.training import TrainingConfig, train
    from hpcdyn.transformer import TransformerConfig

    trajectory = open_trajectory(args.store)
    model = TransformerConfig(
        system=trajectory.system.name,
        lattice_size=max(trajectory.system.shape),
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_layers=args.n_layers,
        d_ff=args.d_ff,
        mode=args.mode,
        n_classes=args.n_classes,
        estimator=args.estimator,
        exclusion_mask=args.exclusion_mask,
        rotary=args.rotary,
        attention_sink=args.attention_sink,
        relative_bias=args.relative_bias,
    )
    config = TrainingConfig(
        model=model,
        epochs=args.epochs,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        optimizer=args.optimizer,
        segment_events=args.segment_events,
        validation_fraction=args.validation_fraction,
        max_train_events=args.max_train_events,
        gradient_clip=args.gradient_clip,
        patience=args.patience,
        class_rate_fit=args.class_rate_fit,
        expected_from_epoch=args.expected_from_epoch,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        compile=args.compile,
    )
    result = train(config, trajectory, args.out, resume=args.resume, progress=_show_progress(args))
    return {"run_dir": str(result.run_dir), "epochs": len(result.metrics), "stopped_early": result.stopped_early,
            "best": result.best}  # fmt: skip


def _add_evaluate(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="U/T of a trained model on a trajectory, and its gap to the true dynamics",
        description="Score a trained model (run directory or checkpoint file) on a trajectory store: U, U/T, "
        "the gap to the generating rates in nats per event, and for Mode 2 the learned class rates and "
        "which true move types land in which class. Without STORE, the training store is used.",
    )
    parser.add_argument("run", help="run directory (uses best.pt) or checkpoint file")
    parser.add_argument("store", nargs="?", help="trajectory store (default: the one the model was trained on)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from hpcdyn.checkpoint import load_checkpoint
    from hpcdyn.evaluation import evaluate
    from hpcdyn.store import open_trajectory

    store = args.store
    if store is None:
        checkpoint = Path(args.run) / "best.pt" if Path(args.run).is_dir() else Path(args.run)
        store = load_checkpoint(checkpoint)["store"]["path"]
        if store == "<memory>":
            raise CommandError("store: this model was trained on an in-memory trajectory; name a STORE to evaluate on")
    return evaluate(args.run, open_trajectory(store), device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcdyn",
        description="Learn stochastic dynamics of lattice many-body systems from one trajectory, "
        "and predict their emergent behaviour at scale.",
    )
    from hpcdyn import __version__

    parser.add_argument("--version", action="version", version=f"hpcdyn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_simulate, _add_likelihood, _add_info, _add_train, _add_evaluate):
        add(commands)
    # The distributed and analysis commands live in their own modules (each imports ray or
    # xarray only when it runs).
    from hpcdyn import analyze_command, ensemble_command, pipeline_command, slurm_command, sweep_command

    for module in (sweep_command, ensemble_command, analyze_command, pipeline_command, slurm_command):
        module.add_parser(commands)
    return parser


def _emit(result: dict[str, Any] | str | None) -> None:
    if result is None:
        return
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    from hpcdyn.store import StoreError

    try:
        _emit(handler(args))
    except (ConfigurationError, StoreError, FileExistsError, CommandError) as error:
        print(f"hpcdyn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpcdyn {args.command}: interrupted; nothing incomplete was left at the output path", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Run through the imported module, not this __main__ copy: the command modules raise
    # hpcdyn.cli.CommandError, which main() must recognise as its own class.
    from hpcdyn.cli import main as package_main

    sys.exit(package_main())
