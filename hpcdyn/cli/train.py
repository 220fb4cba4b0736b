"""``hpcdyn train``: a transformer rate model trained on one trajectory store."""

from __future__ import annotations

import argparse
from typing import Any

from hpcdyn.cli.options import add_progress, check_device, check_output_path, non_negative_int, show_progress


def add_parser(commands) -> None:
    from hpcdyn.learning.names import (ATTENTION_STENCILS, CLASS_INITS, CLASS_RATE_FITS, COUNT_SIDES, ESTIMATORS,
                                       OPTIMIZERS, STENCIL_NAMES)

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
    model.add_argument("--attention-stencil", choices=STENCIL_NAMES, metavar="STENCIL",
                       help=f"hard-local model: each layer attends only within this stencil ({', '.join(ATTENTION_STENCILS)}), "
                            "relative offsets only (no position tables, no rotary); its rates depend exactly on the "
                            "stencil grown --n-layers times; add +countN (vn1+count5) to let each particle also see how "
                            f"many others sit in the N x N block around it, N in {COUNT_SIDES} "
                            "(default: unrestricted, the paper's)")  # fmt: skip
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=int, default=20)
    optimisation.add_argument("--lr", type=float, default=3e-3)
    optimisation.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    optimisation.add_argument("--segment-events", type=int,
                              help="consecutive events per gradient step (default: 256, halved down to 16 while an "
                                   "epoch would take fewer than 128 steps; config.json records the value used)")  # fmt: skip
    optimisation.add_argument("--average-weights", action=argparse.BooleanOptionalAction, default=None,
                              help="end each epoch on the mean of its weights over the epoch's steps (default: on below "
                                   "32,768 training events; config.json records the value used)")  # fmt: skip
    optimisation.add_argument("--learn-position-tables", action=argparse.BooleanOptionalAction, default=None,
                              help="train the absolute position tables; --no-learn-position-tables keeps them at their "
                                   "initial values (default: trained from 32,768 training events on, fixed below; "
                                   "config.json records the value used)")  # fmt: skip
    optimisation.add_argument("--validation-fraction", type=float, default=0.1)
    optimisation.add_argument("--max-train-events", type=int, help="use only the first events for training")
    optimisation.add_argument("--gradient-clip", type=float, default=1.0)
    optimisation.add_argument("--patience", type=int,
                              help="epochs without a better held-out U/T before stopping (default: half of --epochs, "
                                   "at least 5)")  # fmt: skip
    optimisation.add_argument("--seed", type=non_negative_int, default=0)
    optimisation.add_argument("--class-rate-fit", choices=CLASS_RATE_FITS, default="gradient",
                              help="Mode 2 from scratch: leave the class rates to the gradient (default), set them "
                                   "to events / exposure per class after each epoch (closed_form) or after the last "
                                   "one only (closed_form_last); given, an unrestricted model starts from scratch "
                                   "(the default start sets them after every epoch; --class-init)")  # fmt: skip
    optimisation.add_argument("--expected-from-epoch", type=int, metavar="EPOCH",
                              help="Mode 2: from this epoch on, train the classifier by the exact gradient of the "
                                   "expected U instead of --estimator (e.g. 4 of 10 epochs, with --class-rate-fit "
                                   "closed_form_last; README)")  # fmt: skip
    optimisation.add_argument("--class-init", choices=CLASS_INITS, default="auto",
                              help="Mode 2: start from the maximum-likelihood partition of the (environment, move) pairs, "
                                   "the classifier fitted to it (auto, partition; default), or from scratch (none). On "
                                   "statistics the model's own key family; an unrestricted model starts from the nearest "
                                   "neighbours' and refines (expected-U gradient, class rates in closed form after every "
                                   "epoch); there auto means none when --expected-from-epoch or --class-rate-fit is given")  # fmt: skip
    optimisation.add_argument("--classifier-lr", type=float, default=None,
                              help="Mode 2: learning rate of the classifier's fit to the partition at the start "
                                   "(default: --lr); the fit stops on the held-out part")  # fmt: skip
    local = parser.add_argument_group("hard-local model (--attention-stencil)")
    local.add_argument("--no-statistics", dest="statistics", action="store_false",
                       help="train on segments of events instead of the exact sufficient statistics of the model's "
                            "key family (default: statistics, computed once beside the store and reused)")  # fmt: skip
    local.add_argument("--statistics-steps", type=int, default=50, help="gradient steps per epoch on the statistics")
    local.add_argument("--statistics-batch-keys", type=int, metavar="KEYS",
                       help="keys per gradient step (default: every key up to 16,384, else 4,096 sampled keys a step)")  # fmt: skip
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    hardware.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the encoder (CUDA)")
    hardware.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    add_progress(parser)
    parser.set_defaults(handler=_train, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted train leaves: the run up to its last finished epoch, resumable."""
    from hpcdyn.learning.training import run_progress

    epochs = run_progress(args.out)
    if epochs is None:
        return f"no epoch had finished: {args.out} holds no checkpoint; rerun the same command to start again"
    return (
        f"{args.out} holds the run up to its last finished epoch ({epochs} epoch(s): last.pt, best.pt, "
        "metrics.jsonl); rerun the same command with --resume to continue it exactly"
    )


def check_mode_options(args: argparse.Namespace) -> None:
    """Mode 2 recipes asked of a Mode 1 model are refused by name, before any work."""
    from hpcdyn.physics.systems import ConfigurationError

    if args.mode == 1 and args.class_rate_fit != "gradient":
        raise ConfigurationError("class_rate_fit: --class-rate-fit fits Mode 2 class rates; this model is Mode 1 (use --mode 2)")
    if args.mode == 1 and args.class_init == "partition":
        raise ConfigurationError("class_init: --class-init partition starts Mode 2's classifier; this model is Mode 1 (use --mode 2)")
    if args.mode == 1 and args.expected_from_epoch is not None:
        raise ConfigurationError("expected_from_epoch: --expected-from-epoch trains Mode 2's classifier; this model is Mode 1 (use --mode 2)")


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.storage.trajectory_store import open_trajectory
    from hpcdyn.learning.training import TrainingConfig, train
    from hpcdyn.learning.transformer import TransformerConfig

    check_device(args.device)
    check_output_path(args.out)
    check_mode_options(args)
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
        rotary=args.rotary and args.attention_stencil is None,  # a hard-local model has no rotary encoding
        attention_sink=args.attention_sink,
        relative_bias=args.relative_bias,
        attention_stencil=args.attention_stencil,
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
        average_weights=args.average_weights,
        learn_position_tables=args.learn_position_tables,
        class_rate_fit=args.class_rate_fit,
        expected_from_epoch=args.expected_from_epoch,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        compile=args.compile,
        statistics=args.statistics,
        statistics_steps=args.statistics_steps,
        class_init=args.class_init,
        classifier_lr=args.classifier_lr,
        statistics_batch_keys=args.statistics_batch_keys,
    )
    result = train(config, trajectory, args.out, resume=args.resume, progress=show_progress(args))
    return {"run_dir": str(result.run_dir), "epochs": len(result.metrics), "stopped_early": result.stopped_early,
            "best": result.best}  # fmt: skip
