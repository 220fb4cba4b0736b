"""Mode 2's start on segments: an unrestricted classifier fitted to the maximum-likelihood partition
of the (environment key, move) pairs (DESIGN 1.6).

    started = initialise_classes(model, source, training, validation, config)

Started from arbitrary classes, the straight-through epochs sort the moves slowly: on a 50 k-event
trajectory the rotations' class rate climbs by ~0.01 per epoch from where the blocked hops sit, and
the held-out optimum comes before it arrives (benchmarks/TRAINING.md, mode2-defaults). The
maximum-likelihood partition of the (key, move) pairs of a key family gives every pair a class in one
pass over the statistics, each pair with its pool's prior (``class_partition.pooled_partition``: a
blocked hop in a rare environment is decisive evidence through the blocked hops of its pool). The
classifier is fitted to those classes on the trajectory's own configurations, the class rates set in
closed form, and the trainer then refines with the expected-U gradient. The model stays unrestricted;
the start's family is read from the data (``choose_family``): for particles, the occupancy of the nearest neighbours (what volume exclusion
needs) or the nearest neighbours with the count of a 3 x 3, 5 x 5 or 7 x 7 block (what a density
rule such as quorum sensing needs), whichever partition scores the held-out part best, the smallest
within 1e-3 nats per held-out event of the best; an FA chain's, the spins of the nearest neighbours.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcdyn.learning.class_partition import predictive_log_likelihood
from hpcdyn.learning.class_rates import fit_class_rates
from hpcdyn.learning.likelihood import iter_segments
from hpcdyn.learning.local_training import StatisticsObjective, balanced, evidence_weights, key_partition
from hpcdyn.learning.names import COUNT_FAMILIES
from hpcdyn.learning.statistics import cached_statistics
from hpcdyn.physics.environments import environment_keys, key_family
from hpcdyn.physics.replay import replay_segment
from hpcdyn.physics.systems import ActiveSystem, FASystem

TRAIN_CONFIGURATIONS = 4096  # configurations the classifier is fitted on, spread over the training part
CHECK_CONFIGURATIONS = 512  # held-out configurations that decide when the fit stops
BATCH_CONFIGURATIONS = 32
CHECK_EVERY, PATIENCE, MAX_STEPS = 25, 4, 600
# A pair teaches the classifier only when its evidence for its class over the next best is decisive
# (a likelihood ratio of e^3 = 20): few events in little exposure fit several classes (no rotation in a
# rare environment looks like a blocked move), and a classifier taught those learns the noise; the
# structure learned from the decisive pairs decides the others.
DECISIVE_NATS = 3.0
# The targets spread this much probability over the other classes: a classifier fitted to one-hot targets
# saturates its softmax, and the expected-U gradient that refines the start (it acts through the class
# probabilities) then vanishes: measured, a start with 14 % of the blocked hops in the other hops' class
# kept every one of them there for three epochs.
LABEL_SMOOTHING = 0.1


# A larger family must score the held-out part better by this much (nats per held-out event) to be chosen.
PER_EVENT = 1e-3


def start_families(system) -> tuple[str, ...]:
    """The key families the start chooses from, smallest first, those that fit on the lattice (none
    where the system has no keys)."""
    if isinstance(system, FASystem):
        return ("vn1",)
    if not isinstance(system, ActiveSystem):
        return ()
    fitting = []
    for name in ("vn1-occ", *COUNT_FAMILIES):
        reach_x, reach_y = key_family(name).radius
        if system.shape[1] >= 2 * reach_x + 1 and system.shape[0] >= 2 * reach_y + 1:
            fitting.append(name)
    return tuple(fitting)


def held_out_score(objective: StatisticsObjective, model, partition) -> float:
    """U of the held-out part at the rates the partition predicts from the training part
    (``class_partition.predictive_log_likelihood``: a family too fine for the data pays for what its
    sparse pairs leave unknown, not for the rate 0 its hard classes would give them)."""
    exposure, counts = objective.stats.part("train")
    held_exposure, held_counts = objective.stats.part("heldout")
    floor = float(model.class_log_rates.detach().min().exp())
    train = counts, np.broadcast_to(exposure[:, None], counts.shape)
    heldout = held_counts, np.broadcast_to(held_exposure[:, None], counts.shape)
    return predictive_log_likelihood(partition, train, heldout, floor)


def choose_family(source, model, config) -> tuple[StatisticsObjective, object, dict]:
    """(objective, partition) of the start's family and the held-out score of every candidate."""
    candidates, scores = [], {}
    for family in start_families(source.system):
        stats, _ = cached_statistics(source, family, config.validation_fraction, config.max_train_events)
        objective = StatisticsObjective(stats, source.system, config.device)
        partition = key_partition(objective, model)
        scores[family] = held_out_score(objective, model, partition)
        candidates.append((objective, partition))
    reach = PER_EVENT * float(candidates[0][0].stats.counts[1].sum())
    best = max(scores.values())
    index = next(i for i, score in enumerate(scores.values()) if score >= best - reach)
    return candidates[index][0], candidates[index][1], scores


def applies(model, config, system) -> bool:
    """Whether a run on segments starts from the partition (``TrainingConfig.class_init``): always with
    "partition"; with "auto" unless a from-scratch recipe was asked for (an expected-U switch epoch or
    a class rate fit other than the default), which then runs as given."""
    if model.config.mode != 2 or not start_families(system):
        return False
    if config.class_init == "partition":
        return True
    return config.class_init == "auto" and config.expected_from_epoch is None and config.class_rate_fit == "gradient"


def initialise_classes(model, source, training, validation, config) -> dict:
    """Class rates and classifier from the partition of the chosen family; returns what the start did."""
    objective, partition, scores = choose_family(source, model, config)
    stats, family = objective.stats, objective.stats.family
    exposure, counts = stats.part("train")
    pair_counts = counts.reshape(-1).astype(np.float64)
    pair_exposure = np.broadcast_to(exposure[:, None], counts.shape).reshape(-1)
    margins = evidence_weights(partition, pair_counts, pair_exposure).reshape(counts.shape)
    targets = partition.classes.reshape(counts.shape)
    train_set = _labelled(training, objective, targets, margins, TRAIN_CONFIGURATIONS, config)
    check_set = _labelled(validation, objective, targets, margins, CHECK_CONFIGURATIONS, config)
    steps, agreement = _fit(model, train_set, check_set, config)
    fitted = fit_class_rates(model, training, max(config.segment_events or 0, 512), config.device, empty_to_lowest=True)
    # None: a class without events (no estimate); NaN is not JSON and metrics.jsonl must stay readable
    return {"class_init": f"partition:{family}", "class_init_steps": steps, "class_init_agreement": agreement,
            "start_family_scores": scores,
            "partition_rates": partition.rates.tolist(), "partition_classes": len(partition.rates),
            "class_init_rates": [rate if math.isfinite(rate) else None for rate in fitted.rates().tolist()]}  # fmt: skip


def _labelled(window, objective, targets, margins, wanted: int, config):
    """(positions, states, target [C, T, M], weight [C, T, M]) of about ``wanted`` configurations
    evenly spread over ``window``: each (token, move) labelled with its key's class in the partition,
    weighted 1 where its pair's evidence for that class is decisive (else 0), then every class given the
    same total weight (a class of rare moves, forward hops, counts as much as the blocked hops)."""
    stride = max(1, window.n_events // wanted)
    kept_positions, kept_states = [], []
    offset = 0
    for start_positions, start_states, tokens, moves, _ in iter_segments(window, max(config.segment_events or 0, 512)):
        positions, states = replay_segment(window.system, start_positions, start_states, tokens, moves)
        chosen = torch.arange((-offset) % stride, len(tokens), stride)
        kept_positions.append(positions[chosen])
        kept_states.append(states[chosen])
        offset += len(tokens)
    positions, states = torch.cat(kept_positions), torch.cat(kept_states)
    keys, _ = environment_keys(objective.encoder, window.system, positions.numpy(), states.numpy())
    rows = np.clip(np.searchsorted(objective.stats.keys, keys), 0, objective.stats.n_keys - 1)
    known = objective.stats.keys[rows] == keys  # a key the statistics never saw teaches nothing
    target = targets[rows]  # [C, T, M]
    weight = np.where(known[..., None] & (target >= 0) & (margins[rows] >= DECISIVE_NATS), 1.0, 0.0)
    weight = balanced(weight.reshape(-1), target.reshape(-1)).reshape(target.shape)
    device = config.device
    return (positions.to(device), states.to(device), torch.as_tensor(np.maximum(target, 0), device=device),
            torch.as_tensor(weight / max(weight.sum(), 1e-300), dtype=torch.float32, device=device))  # fmt: skip


def _loss(model, positions, states, target, weight) -> torch.Tensor:
    logits = model.class_logits(positions, states)  # [C, T, M, K]
    cross = torch.nn.functional.cross_entropy(logits.flatten(0, 2).float(), target.flatten(), reduction="none",
                                              label_smoothing=LABEL_SMOOTHING)  # fmt: skip
    return (weight.flatten() * cross).sum()


@torch.no_grad()
def _agreement(model, positions, states, target, weight) -> float:
    """Weighted share of the labelled (token, move) pairs the classifier puts in their partition class."""
    model.eval()
    chosen = model.class_logits(positions, states).argmax(-1)
    return float((weight * (chosen == target)).sum() / weight.sum().clamp_min(1e-30))


def _fit(model, train_set, check_set, config) -> tuple[int, float]:
    """Weighted cross-entropy on batches of configurations; stops when the held-out configurations' loss
    no longer falls (checked every CHECK_EVERY steps, PATIENCE checks), keeping the best state."""
    parameters = [p for name, p in model.named_parameters() if name != "class_log_rates" and p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.start_lr)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + 99_991)
    positions, states, target, weight = train_set
    n_configurations = len(positions)
    best_loss, best_step, best_state, since_best = math.inf, 0, None, 0
    for step in range(1, MAX_STEPS + 1):
        model.train()
        batch = torch.randint(n_configurations, (min(BATCH_CONFIGURATIONS, n_configurations),), generator=generator)
        batch = batch.to(positions.device)
        optimizer.zero_grad(set_to_none=True)
        scale = n_configurations / len(batch)  # the batch's share of the normalised weights, scaled to one
        (_loss(model, positions[batch], states[batch], target[batch], weight[batch]) * scale).backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.gradient_clip)
        optimizer.step()
        if step % CHECK_EVERY and step != MAX_STEPS:
            continue
        model.eval()
        with torch.no_grad():
            held_out = float(_loss(model, *check_set))
        if held_out < best_loss:
            best_loss, best_step, since_best = held_out, step, 0
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= PATIENCE:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_step, _agreement(model, *check_set)
