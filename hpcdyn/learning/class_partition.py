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

A pair seen for one unit of time tells little: a rotation (rate 0.1) without an event fits the
blocked hops' class (rate 0) as well as its own, so on a trajectory of many sparse keys (29 k keys of
a 5 x 5 count family at L 30, ~3.5 time units per rotation pair) the hard partition puts most
rotations in a class of rate 0.06 between the two, and the class rates are biased. ``pooled_partition``
gives every pair a prior over the classes, the classes' shares among the pairs of its *pool* (pairs
that share the move, the moving token's state and the content of the site the move goes to), and
fits the rates and the pools' shares by expectation-maximisation of the marginal likelihood of this
Poisson mixture: the pairs that show their rate teach the pool's shares, and the sparse ones take
their class from them. The pool only sets a prior, learned from the data: a pool whose pairs differ
(forward hops, crowded or not) gets a mixed prior and its pairs decide by their own events.
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
    # pooled partitions: float64 [P, K] log prior of each pair's class (its pool's shares); None: the
    # classes' shares among all pairs
    log_prior: np.ndarray | None = None


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


def log_poisson(counts: np.ndarray, exposure: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """n ln r - E r of every pair [P] at every rate [K] -> [P, K] (0 ln 0 = 0; an event at rate 0: -inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(counts[:, None] > 0, counts[:, None] * np.log(rates)[None, :], 0.0) - exposure[:, None] * rates[None, :]
    return np.nan_to_num(value, nan=-np.inf)


def _log_prior(partition: Partition) -> np.ndarray:
    """log prior of each pair's class, [P, K] (or [1, K]): its pool's shares, else the classes' shares."""
    if partition.log_prior is not None:
        return partition.log_prior
    inside = partition.classes >= 0
    share = np.bincount(partition.classes[inside], minlength=len(partition.rates)) / max(int(inside.sum()), 1)
    with np.errstate(divide="ignore"):
        return np.log(share)[None, :]


def predicted_rates(partition: Partition, counts: np.ndarray, exposure: np.ndarray, floor: float) -> np.ndarray:
    """Each pair's rate predicted from its training events ``counts`` in ``exposure`` under the partition:
    the posterior mean over the classes, with the share of the pairs in each class (or, in a pooled
    partition, in the pair's pool) as the prior.

    A pair that has shown its rate gets its class's; one seen too little (no rotation in a rare
    environment looks like a blocked move) a mixture; one never seen the prior's mean. At least
    ``floor`` (the near-zero rate a model gives the moves never seen)."""
    counts = np.asarray(counts, np.float64).reshape(-1)
    exposure = np.asarray(exposure, np.float64).reshape(-1)
    rates = partition.rates
    log_post = _log_prior(partition) + log_poisson(counts, exposure, rates)
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


# ----------------------------------------------------------------------------- pooled partitions
EM_ROUNDS = 500
EM_TOLERANCE = 1e-9  # relative change of the marginal log-likelihood that ends the iteration
# EM drains a class of the pairs without events towards rate 0 geometrically and never reaches it
DRAINED = 1e-8
# A class must earn this many held-out nats to stay. A split of one kind by noise is one extra rate,
# whose held-out gain is O(1) whatever the data's size: measured on 41 draws of 900 pairs (rates 0, 1,
# 25, four classes against three), at most 3.3 nats, and below 1.5 in 40 of them; a real kind of move
# earns hundreds (the rotations' class against the blocked hops' on 50 k events).
PRUNE_NATS = 5.0


def pooled_partition(counts: np.ndarray, exposure: np.ndarray, pools: np.ndarray, n_classes: int,
                     heldout: tuple[np.ndarray, np.ndarray] | None = None, floor: float = 1e-6) -> Partition:  # fmt: skip
    """The Poisson mixture of ``n_classes`` rates whose class shares depend on each pair's pool
    (int64 ``pools`` [P]), fitted by expectation-maximisation from the hard ML partition; classes the
    held-out pairs (events, exposure) do not support are dropped (``prune_pooled``) when given.

    Returns a Partition whose classes are each pair's most probable class, rates the mixture's (the
    class totals of events and exposure weighted by the posterior), log_prior its pools' shares."""
    counts = np.asarray(counts, np.float64).reshape(-1)
    exposure = np.asarray(exposure, np.float64).reshape(-1)
    pools = np.asarray(pools, np.int64).reshape(-1)
    if pools.shape != counts.shape or (pools < 0).any():
        raise ValueError(f"pools: need one pool index >= 0 per pair ({counts.shape[0]}), got shape {pools.shape}")
    start = poisson_partition(counts, exposure, n_classes)
    partition = _mixture(counts, exposure, pools, start.classes, len(start.rates))
    if heldout is not None:
        partition = prune_pooled(partition, (counts, exposure), heldout, pools, floor)
    return partition


def _mixture(counts, exposure, pools, classes, n_classes) -> Partition:
    """EM of the pooled mixture from the hard ``classes`` (-1: no exposure, kept out)."""
    inside = (classes >= 0) & (exposure > 0)
    n, e, g = counts[inside], exposure[inside], pools[inside]
    n_pools = int(pools.max()) + 1
    responsibility = np.zeros((len(n), n_classes))
    responsibility[np.arange(len(n)), classes[inside]] = 1.0
    previous = -np.inf
    for _ in range(EM_ROUNDS):
        rates, log_shares = _maximise(n, e, g, responsibility, n_pools)
        # n ln r - E r with ln 0 clamped to ln 1e-300 (an event at rate 0: ~ -690 nats, never chosen),
        # cheaper than log_poisson's exact -inf on these [P, K] arrays in every round
        log_joint = log_shares[g] + n[:, None] * np.log(np.maximum(rates, 1e-300))[None, :] - e[:, None] * rates[None, :]
        top = log_joint.max(axis=1, keepdims=True)
        marginal = top[:, 0] + np.log(np.exp(log_joint - top).sum(axis=1))
        responsibility = np.exp(log_joint - marginal[:, None])
        total = float(marginal.sum())
        if total - previous <= EM_TOLERANCE * abs(total):
            break
        previous = total
    rates, log_shares = _maximise(n, e, g, responsibility, n_pools)
    labels = np.full(counts.shape, -1, np.int64)
    labels[inside] = np.argmax(log_shares[g] + log_poisson(n, e, rates), axis=1)
    return _sorted_mixture(labels, rates, responsibility.T @ n, responsibility.T @ e, log_shares[pools], counts, exposure)


def _maximise(n, e, g, responsibility, n_pools) -> tuple[np.ndarray, np.ndarray]:
    """(class rates [K], log shares of the classes in each pool [G, K]). A pool's shares are smoothed
    by one pseudo-pair spread as the classes' overall shares, so that no share is exactly 0 and a pool
    with few pairs leans on the whole."""
    events, class_exposure = responsibility.T @ n, responsibility.T @ e
    with np.errstate(divide="ignore", invalid="ignore"):  # a class expecting < DRAINED events is the rate-0 one
        rates = np.where((class_exposure > 0) & (events > DRAINED), events / class_exposure, 0.0)
    overall = responsibility.sum(axis=0) / max(len(n), 1)
    per_pool = np.stack([np.bincount(g, weights=responsibility[:, k], minlength=n_pools) for k in range(len(rates))], axis=1)
    sizes = np.bincount(g, minlength=n_pools)[:, None]
    with np.errstate(divide="ignore"):
        return rates, np.log((per_pool + overall[None, :]) / (sizes + 1.0))


def _sorted_mixture(labels, rates, events, class_exposure, log_prior, counts, exposure) -> Partition:
    """The mixture as a Partition: classes that hold no pair dropped, the rest by ascending rate."""
    used = np.unique(labels[labels >= 0])
    order = used[np.argsort(rates[used], kind="stable")]
    rank = np.full(len(rates), -1, np.int64)
    rank[order] = np.arange(len(order))
    out = np.where(labels >= 0, rank[np.maximum(labels, 0)], -1)
    rates = rates[order]
    with np.errstate(divide="ignore"):
        prior = log_prior[:, order] - np.log(np.exp(log_prior[:, order]).sum(axis=1, keepdims=True))
    inside = out >= 0
    u = float(np.where(counts[inside] > 0, counts[inside] * np.log(np.maximum(rates[out[inside]], 1e-300)), 0.0).sum()
              - (exposure[inside] * rates[out[inside]]).sum())  # fmt: skip
    return Partition(out, rates, events[order], class_exposure[order], u, prior)


def prune_pooled(partition: Partition, train: tuple[np.ndarray, np.ndarray], heldout: tuple[np.ndarray, np.ndarray],
                 pools: np.ndarray, floor: float) -> Partition:  # fmt: skip
    """Drop the classes the held-out pairs do not support, one at a time.

    With more classes than the data have rates, the best partition splits a kind of move by the noise
    of n/E (forward hops at 24.6 and 25.3); a classifier fitted to that split learns noise. A class is
    dropped (its pairs to their best remaining class, the mixture refitted) unless the held-out pairs'
    U at the rates predicted from the training part (``predictive_log_likelihood``) falls by more than
    PRUNE_NATS; the rate-0 class (moves never seen) is kept."""
    counts, exposure = (np.asarray(a, np.float64).reshape(-1) for a in train)
    pools = np.asarray(pools, np.int64).reshape(-1)
    while len(partition.rates) > 1:
        current = predictive_log_likelihood(partition, train, heldout, floor)
        scored = []
        for k in range(len(partition.rates)):
            if partition.rates[k] <= 0:
                continue
            keep = [j for j in range(len(partition.rates)) if j != k]
            score = partition.log_prior[:, keep] + log_poisson(counts, exposure, partition.rates[keep])
            labels = np.where(partition.classes >= 0, np.argmax(score, axis=1), -1)
            candidate = _mixture(counts, exposure, pools, labels, len(keep))
            scored.append((predictive_log_likelihood(candidate, train, heldout, floor), k, candidate))
        if not scored:
            break
        best, _, candidate = max(scored, key=lambda item: item[0])
        if best < current - PRUNE_NATS:
            break
        partition = candidate
    return partition
