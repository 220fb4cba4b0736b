"""Mode 2 classes of (environment, move) pairs by exact maximum likelihood (DESIGN 1.6).

    partition = poisson_partition(counts, exposure, n_classes=4)
    partition.classes       # int64 [P]: the class of every pair (-1: no exposure, no information)
    partition.rates         # float64 [K]: n_k / E_k of each class, ascending
    partition.log_likelihood

With sufficient statistics every (key p, move m) pair has n_{p,m} events in exposure E_p. Putting the
pairs into K classes of one rate each, the best U is the maximum over partitions of

    sum_k (N_k ln(N_k / E_k) - N_k),        N_k, E_k: the events and exposure of class k.

For fixed class rates a pair goes to argmax_k (x ln r_k - r_k), x = n / E, which is monotone in x:
an optimal partition is a set of contiguous runs of the pairs sorted by x. So a dynamic programme
over the sorted pairs finds it exactly. The pairs are first merged into bins of x no wider than a
factor 1 + resolution (the zeros in a bin of their own), which keeps the programme small
(O(K B^2) for B bins); then every pair is reassigned to its best class and the rates refitted until
nothing changes (neither step lowers U), which undoes what the binning cost at its edges.

This is the ceiling of a Mode 2 model with K classes whose classifier may give every pair its own
class, and the Mode 2 trainer's starting point on statistics (``hpcdyn.learning.local_training``):
the classifier is first fitted to this partition, then refined by the expected-U gradient.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Partition:
    classes: np.ndarray  # int64 [P]: class of each pair, -1 for pairs without exposure
    rates: np.ndarray  # float64 [K]: n_k / E_k, ascending (0 for a class of pairs without events)
    events: np.ndarray  # float64 [K]
    exposure: np.ndarray  # float64 [K]
    log_likelihood: float  # U of the partition with its rates n_k / E_k


def _segment_log_likelihood(events: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """N ln(N / E) - N of runs of bins (0 where N = 0: the rate 0 costs nothing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = events * np.log(events / exposure) - events
    return np.where(events > 0, value, 0.0)


def _bins(x: np.ndarray, resolution: float) -> np.ndarray:
    """Bin of each pair (ascending in x): zeros in bin 0, then geometric bins of width 1 + resolution."""
    positive = x > 0
    out = np.zeros(x.shape, np.int64)
    if positive.any():
        low = x[positive].min()
        out[positive] = 1 + np.floor(np.log(x[positive] / low) / math.log1p(resolution)).astype(np.int64)
    _, dense = np.unique(out, return_inverse=True)
    return dense.reshape(x.shape)


def _best_runs(events: np.ndarray, exposure: np.ndarray, n_classes: int) -> tuple[list[int], float]:
    """Exact DP: the cut points (bin indices) of the best split of the bins into at most n_classes runs."""
    n_bins = len(events)
    cumulative_events = np.concatenate([[0.0], np.cumsum(events)])
    cumulative_exposure = np.concatenate([[0.0], np.cumsum(exposure)])
    runs = min(n_classes, n_bins)
    best = np.full((runs + 1, n_bins + 1), -np.inf)
    choice = np.zeros((runs + 1, n_bins + 1), np.int64)
    best[0, 0] = 0.0
    for k in range(1, runs + 1):
        for j in range(k, n_bins + 1):
            starts = np.arange(k - 1, j)
            value = best[k - 1, starts] + _segment_log_likelihood(
                cumulative_events[j] - cumulative_events[starts], cumulative_exposure[j] - cumulative_exposure[starts]
            )
            choice[k, j] = starts[int(np.argmax(value))]
            best[k, j] = value.max()
    k = int(np.argmax(best[:, n_bins]))  # fewer runs can tie (more classes than distinct bins)
    cuts, j = [n_bins], n_bins
    while k > 0:
        j = int(choice[k, j])
        cuts.append(j)
        k -= 1
    return cuts[::-1], float(best[:, n_bins].max())


def poisson_partition(counts: np.ndarray, exposure: np.ndarray, n_classes: int, resolution: float = 0.01) -> Partition:
    """The maximum-likelihood partition of pairs (events ``counts``, ``exposure``) into ``n_classes`` rates."""
    if not (isinstance(n_classes, int) and n_classes >= 1):
        raise ValueError(f"n_classes: must be an integer >= 1, got {n_classes!r}")
    counts = np.asarray(counts, np.float64).reshape(-1)
    exposure = np.asarray(exposure, np.float64).reshape(-1)
    informative = exposure > 0
    if not informative.any():
        raise ValueError("exposure: no pair has any exposure; the trajectory is empty")
    n, e = counts[informative], exposure[informative]
    bins = _bins(n / e, resolution)
    cuts, _ = _best_runs(np.bincount(bins, weights=n), np.bincount(bins, weights=e), n_classes)
    run_of_bin = np.zeros(bins.max() + 1, np.int64)
    for run, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:])):
        run_of_bin[start:stop] = run
    classes = np.full(counts.shape, -1, np.int64)
    classes[informative] = _refine(n, e, run_of_bin[bins], len(cuts) - 1)
    return _sorted_partition(classes, counts, exposure)


def _totals(n, e, classes, n_classes) -> tuple[np.ndarray, np.ndarray]:
    return np.bincount(classes, weights=n, minlength=n_classes), np.bincount(classes, weights=e, minlength=n_classes)


def _refine(n, e, classes, n_classes, rounds: int = 20) -> np.ndarray:
    """Undo what binning cost: reassign every pair to its best class, refit the rates, until stable.
    Neither step lowers U, so the result is at least as good as the binned programme's."""
    for _ in range(rounds):
        events, exposure = _totals(n, e, classes, n_classes)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_rates = np.log(events / exposure)  # -inf for a class without events: only pairs with n = 0 fit there
            score = np.where(n[:, None] > 0, n[:, None] * log_rates[None, :], 0.0) - e[:, None] * np.exp(log_rates)[None, :]
        score[:, exposure <= 0] = -np.inf  # a class emptied by the reassignment takes nothing back
        updated = np.argmax(score, axis=1)
        keep = score[np.arange(len(n)), classes] >= score[np.arange(len(n)), updated]  # no change on ties
        updated = np.where(keep, classes, updated)
        if np.array_equal(updated, classes):
            break
        classes = updated
    return classes


def predicted_rates(partition: Partition, counts: np.ndarray, exposure: np.ndarray, floor: float) -> np.ndarray:
    """Each pair's rate predicted from its training events ``counts`` in ``exposure`` under the partition:
    the posterior mean over the classes, with the share of the pairs in each class as the prior.

    A pair that has shown its rate gets its class's; one seen too little (no rotation in a rare
    environment looks like a blocked move) a mixture; one never seen the prior's mean. At least
    ``floor`` (the near-zero rate a model gives the moves never seen)."""
    counts = np.asarray(counts, np.float64).reshape(-1)
    exposure = np.asarray(exposure, np.float64).reshape(-1)
    inside = partition.classes >= 0
    rates = partition.rates
    prior = np.bincount(partition.classes[inside], minlength=len(rates)) / max(int(inside.sum()), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_post = (np.log(prior)[None, :] + np.where(counts[:, None] > 0, counts[:, None] * np.log(rates)[None, :], 0.0)
                    - exposure[:, None] * rates[None, :])  # fmt: skip
    log_post = np.nan_to_num(log_post, nan=-np.inf)
    log_post -= log_post.max(axis=1, keepdims=True)
    posterior = np.exp(log_post)
    return np.maximum((posterior * rates).sum(1) / posterior.sum(1), floor)


def predictive_log_likelihood(partition: Partition, train: tuple[np.ndarray, np.ndarray],
                              heldout: tuple[np.ndarray, np.ndarray], floor: float) -> float:  # fmt: skip
    """U of the held-out pairs (events, exposure) at the rates ``predicted_rates`` gives them from the
    training pairs (events, exposure): a partition of a fine key family pays for what its sparse pairs
    leave unknown, where hard classes would score a held-out event of a pair that showed none in
    training at the rate 0 (``floor``) and lose everything on it."""
    predicted = predicted_rates(partition, *train, floor)
    n, e = (np.asarray(a, np.float64).reshape(-1) for a in heldout)
    return float(np.where(n > 0, n * np.log(predicted), 0.0).sum() - (e * predicted).sum())


def held_out_log_likelihood(partition: Partition, counts: np.ndarray, exposure: np.ndarray, floor: float) -> float:
    """U of held-out pairs (their events ``counts`` in ``exposure``) under the partition's classes and
    rates, a rate-0 class scored at ``floor`` (the near-zero rate a model gives the moves never seen)."""
    rates = np.maximum(partition.rates, floor)
    inside = partition.classes >= 0
    chosen = rates[partition.classes[inside]]
    n, e = np.asarray(counts, np.float64).reshape(-1)[inside], np.asarray(exposure, np.float64).reshape(-1)[inside]
    return float(np.where(n > 0, n * np.log(chosen), 0.0).sum() - (e * chosen).sum())


def prune(partition: Partition, train: tuple[np.ndarray, np.ndarray], heldout: tuple[np.ndarray, np.ndarray],
          floor: float) -> Partition:  # fmt: skip
    """Drop the classes the held-out pairs do not support, one at a time.

    With more classes than the data have rates, the best partition splits a kind of move by the noise
    of n/E (forward hops at 24.6 and 25.3); a classifier fitted to that split learns noise. A class is
    dropped, its pairs reassigned to their best remaining class and the rates refitted, when that does
    not lower the held-out U; the rate-0 class (moves never seen) is kept. Returns the pruned partition."""
    counts, exposure = (np.asarray(a, np.float64).reshape(-1) for a in train)
    while len(partition.rates) > 1:
        current = held_out_log_likelihood(partition, *heldout, floor)
        candidates = [_without(partition, k, counts, exposure) for k in range(len(partition.rates)) if partition.rates[k] > 0]
        scored = [(held_out_log_likelihood(c, *heldout, floor), i) for i, c in enumerate(candidates)]
        if not scored:
            break
        best, index = max(scored)
        if best < current:
            break
        partition = candidates[index]
    return partition


def _without(partition: Partition, dropped: int, counts: np.ndarray, exposure: np.ndarray) -> Partition:
    """The partition with class ``dropped`` removed: its pairs to their best remaining class, rates refitted."""
    keep = [k for k in range(len(partition.rates)) if k != dropped]
    rates = partition.rates[keep]
    classes = partition.classes.copy()
    moved = classes == dropped
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(counts[moved, None] > 0, counts[moved, None] * np.log(rates)[None, :], 0.0) - exposure[moved, None] * rates[None, :]
    renumber = np.full(len(partition.rates), -1, np.int64)
    renumber[keep] = np.arange(len(keep))
    inside = classes >= 0
    classes[inside] = renumber[classes[inside]]
    classes[moved] = np.argmax(np.nan_to_num(score, nan=-np.inf), axis=1)
    classes[inside] = _refine(counts[inside], exposure[inside], classes[inside], len(keep))
    return _sorted_partition(classes, counts, exposure)


def _sorted_partition(classes: np.ndarray, counts: np.ndarray, exposure: np.ndarray) -> Partition:
    """A Partition of these labels: empty classes dropped, the rest numbered by ascending rate."""
    inside = classes >= 0
    used, labels = np.unique(classes[inside], return_inverse=True)
    events, class_exposure = _totals(counts[inside], exposure[inside], labels, len(used))
    order = np.argsort(events / class_exposure, kind="stable")
    rank = np.empty(len(used), np.int64)
    rank[order] = np.arange(len(used))
    out = np.full(classes.shape, -1, np.int64)
    out[inside] = rank[labels]
    events, class_exposure = events[order], class_exposure[order]
    return Partition(out, events / class_exposure, events, class_exposure,
                     float(_segment_log_likelihood(events, class_exposure).sum()))  # fmt: skip
