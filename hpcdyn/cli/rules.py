"""``hpcdyn rules``: a trained hard-local model's dynamics as rules a person reads.

Mode 2: each class with its learned rate, the events and the exposure behind it (and their ratio,
the class's maximum-likelihood rate), and a shallow decision tree over the stencil's site contents
and the move that reproduces the class of every (observed environment, move), printed as if/else
rules with its accuracy; each class rate n/E with its 99 % interval (standard error sqrt(n)/E).
Mode 1: the same tree over log-rates binned to --bins levels.

Features of a (key, move) row: ``move``, ``own`` (the token's state), ``move-own`` (the move index
minus the own state: for the active model 2 marks the hop along the orientation), ``target`` (the
content of the site the move sends the token to, -1 if it stays), and ``site(dx,dy)`` (the content of
each stencil site: 0 empty, 1 + orientation for a particle; the spin for fa).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from hpcdyn.cli.options import CommandError, check_existing_path
from hpcdyn.learning.rate_intervals import class_counts, rate_interval


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "rules",
        help="the learned dynamics of a hard-local model as readable rules (classes, rates, a decision tree)",
        description="Read a trained hard-local model (--attention-stencil) as rules: Mode 2 classes with their rates, "
        "events and exposure, and a shallow decision tree over the stencil's sites and the move that reproduces "
        "the class assignment on every observed environment (Mode 1: binned log-rates).",
    )
    parser.add_argument("run", help="run directory (uses best.pt) or checkpoint file of a hard-local model")
    parser.add_argument("--max-depth", type=int, default=6, help="depth of the decision tree (default 6)")
    parser.add_argument("--bins", type=int, default=4, help="Mode 1: log-rate levels the tree predicts (default 4)")
    parser.set_defaults(handler=_rules)


def feature_table(system, encoder, keys: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """[K * M, F] features of every (key, move) row, and the feature names."""
    from hpcdyn.physics.environments import decode_keys

    patches = decode_keys(encoder, keys).astype(np.int64)  # [K, 1 + S] own state, site digits
    n_moves = system.n_moves
    table = np.asarray(system.move_table)
    offsets = [tuple(int(v) for v in offset) for offset in encoder.offsets[: encoder.n_stencil]]
    sites = patches[:, 1 : 1 + encoder.n_stencil]
    names = ["move", "own", "move-own", "target"] + [f"site({dx},{dy})" for dx, dy in offsets]
    if encoder.n_counted:  # a count family: the count is one feature (where its particles sit is not known)
        side = int(round(math.sqrt(encoder.n_counted + 1)))
        sites = np.column_stack([sites, patches[:, 1 + encoder.n_stencil :].sum(1)])
        names.append(f"count{side}x{side}")
    rows = []
    for move in range(n_moves):
        dx, dy = int(table[move, 0]), int(table[move, 1])
        target = patches[:, 1 + offsets.index((dx, dy))] if (dx, dy) in offsets else np.full(len(keys), -1)
        rows.append(np.column_stack([np.full(len(keys), move), patches[:, 0], move - patches[:, 0], target, sites]))
    return np.stack(rows, axis=1).reshape(len(keys) * n_moves, -1), names


def tree_rules(tree, names: list[str], labels: list[str]) -> str:
    """The fitted tree as nested if/else lines."""
    inner = tree.tree_
    lines: list[str] = []

    def walk(node: int, depth: int) -> None:
        pad = "  " * depth
        if inner.children_left[node] == inner.children_right[node]:
            lines.append(f"{pad}-> {labels[int(tree.classes_[int(np.argmax(inner.value[node]))])]}")  # classes_: the labels seen
            return
        name, threshold = names[inner.feature[node]], inner.threshold[node]
        lines.append(f"{pad}if {name} <= {threshold:g}:")
        walk(inner.children_left[node], depth + 1)
        lines.append(f"{pad}else:  # {name} > {threshold:g}")
        walk(inner.children_right[node], depth + 1)

    walk(0, 0)
    return "\n".join(lines)


def _rules(args: argparse.Namespace) -> str:
    from pathlib import Path

    from sklearn.tree import DecisionTreeClassifier

    from hpcdyn.learning.local_training import StatisticsObjective
    from hpcdyn.learning.statistics import cached_statistics
    from hpcdyn.learning.training import load_model
    from hpcdyn.storage.trajectory_store import open_trajectory

    if args.max_depth < 1 or args.bins < 2:
        raise CommandError("--max-depth: must be >= 1; --bins: must be >= 2")
    check_existing_path(args.run, "run", "a training run directory (with best.pt) or a checkpoint file")
    model, state = load_model(args.run)
    config = model.config
    if not config.hard_local or config.key_family is None:
        raise CommandError("run: rules are read from a hard-local model (trained with --attention-stencil); this one is not")
    store = state["store"].get("path", "<memory>")
    if store == "<memory>" or not Path(store).exists():
        raise CommandError(f"store: the model's trajectory {store} is not available; rules are read on its environments")
    source = open_trajectory(store)
    training = state["training_config"]
    stats, _ = cached_statistics(source, config.key_family, training["validation_fraction"], training.get("max_train_events"))
    objective = StatisticsObjective(stats, source.system)
    model = model.double()
    features, names = feature_table(source.system, objective.encoder, stats.keys)
    exposure, counts = stats.part("train")
    row_exposure = np.repeat(exposure, source.system.n_moves)
    lines = [f"{Path(args.run)}: Mode {config.mode} hard-local model, stencil {config.attention_stencil}, "
             f"key family {stats.family}; {stats.n_keys} observed environments x {source.system.n_moves} moves "
             f"({', '.join(getattr(source.system, 'move_names', ()))})"]  # fmt: skip
    if config.mode == 2:
        classes = objective.key_classes(model)  # [K, M]
        rates = model.class_rates()
        class_events, class_exposure = class_counts(classes, exposure, counts, len(rates))
        labels = []
        lines.append("")
        lines.append("class  rate        events      exposure        events/exposure  99 % interval of n/E")
        for k, rate in enumerate(rates):
            n_k, e_k = int(class_events[k]), float(class_exposure[k])
            ml = n_k / e_k if e_k > 0 else float("nan")
            low, high = rate_interval(n_k, e_k)
            lines.append(f"{k:>5}  {rate:<10.4g}  {n_k:<10d}  {e_k:<14.6g}  {ml:<15.4g}  [{low:.4g}, {high:.4g}]")
            labels.append(f"class {k} (rate {rate:.4g})")
        target = classes.reshape(-1)
        target = np.where(target < 0, len(rates), target)
        labels.append("masked (rate 0)")
    else:
        log_rates = objective.key_log_rates_all(model).reshape(-1)
        edges = np.quantile(log_rates, np.linspace(0, 1, args.bins + 1)[1:-1])
        target = np.digitize(log_rates, edges)
        labels = []
        for level in range(args.bins):
            inside = log_rates[target == level]
            span = (np.exp(inside.min()), np.exp(inside.max())) if inside.size else (float("nan"),) * 2
            labels.append(f"level {level} (rates {span[0]:.3g} .. {span[1]:.3g})")
    tree = DecisionTreeClassifier(max_depth=args.max_depth, random_state=0).fit(features, target)
    predicted = tree.predict(features)
    accuracy = float((predicted == target).mean())
    weighted = float(((predicted == target) * row_exposure).sum() / max(row_exposure.sum(), 1e-300))
    lines += ["", f"decision tree (depth <= {args.max_depth}, {tree.get_n_leaves()} leaves): accuracy {accuracy:.4f} over "
              f"the observed (environment, move) rows, {weighted:.4f} weighted by exposure", ""]  # fmt: skip
    lines.append(tree_rules(tree, names, labels))
    return "\n".join(lines)
