"""The maximum-likelihood partition of (environment, move) pairs into Mode 2 classes."""

import itertools
import math

import numpy as np
import pytest

from hpcdyn.learning.class_partition import poisson_partition


def brute_force(counts, exposure, n_classes) -> float:
    """The best U over every assignment of the pairs to n_classes classes (rates n_k / E_k)."""
    best = -np.inf
    for assignment in itertools.product(range(n_classes), repeat=len(counts)):
        classes = np.array(assignment)
        events = np.bincount(classes, weights=counts, minlength=n_classes)
        exposure_k = np.bincount(classes, weights=exposure, minlength=n_classes)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(events > 0, events * np.log(events / exposure_k) - events, 0.0)
        best = max(best, terms.sum())
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_partition_is_the_maximum_likelihood_one(seed):
    rng = np.random.default_rng(seed)
    n_pairs, n_classes = 7, int(rng.integers(1, 4))
    exposure = rng.uniform(0.1, 5.0, n_pairs)
    counts = rng.poisson(exposure * rng.choice([0.0, 0.1, 1.0, 5.0], n_pairs)).astype(float)
    partition = poisson_partition(counts, exposure, n_classes)
    assert partition.log_likelihood == pytest.approx(brute_force(counts, exposure, n_classes), rel=1e-12, abs=1e-12)
    # the rates are each class's n / E, ascending, and the classes are runs of the pairs sorted by n / E
    events = np.bincount(partition.classes, weights=counts)
    assert np.allclose(partition.rates, events / np.bincount(partition.classes, weights=exposure))
    assert np.all(np.diff(partition.rates) > 0)


def test_well_separated_kinds_are_recovered_with_their_rates():
    rng = np.random.default_rng(0)
    truth = np.repeat([0.0, 0.1, 1.0, 25.0], 200)
    exposure = rng.uniform(150.0, 300.0, truth.size)  # >= 15 expected events of the 0.1 kind: P(none) < 1e-6
    counts = rng.poisson(truth * exposure).astype(float)
    partition = poisson_partition(counts, exposure, 4)
    kinds = np.repeat(np.arange(4), 200)
    assert np.array_equal(partition.classes, kinds)  # every pair of a kind in the class of its rate
    for kind in range(4):
        chosen = kinds == kind
        assert partition.rates[kind] == pytest.approx(counts[chosen].sum() / exposure[chosen].sum(), rel=1e-12)


def test_pairs_without_exposure_have_no_class_and_bad_input_is_refused():
    partition = poisson_partition(np.array([0.0, 3.0, 0.0]), np.array([0.0, 1.0, 2.0]), 2)
    assert partition.classes[0] == -1 and set(partition.classes[1:]) == {0, 1}
    with pytest.raises(ValueError, match="^n_classes:"):
        poisson_partition(np.ones(3), np.ones(3), 0)
    with pytest.raises(ValueError, match="^exposure:"):
        poisson_partition(np.ones(3), np.zeros(3), 2)


def test_classes_the_held_out_pairs_do_not_support_are_pruned():
    """Three kinds of pair (rates 0, 1, 25) fitted with five classes: the extra classes split a kind by
    noise, and the held-out events of the same pairs drop them again; the rate-0 class stays."""
    from hpcdyn.learning.class_partition import PRUNE_NATS, pooled_partition, predictive_log_likelihood

    rng = np.random.default_rng(3)
    truth = np.repeat([0.0, 1.0, 25.0], 300)
    exposure = rng.uniform(10.0, 20.0, truth.size)  # >= 10 expected events of the rate-1 kind: P(none) < 5e-5
    train, heldout = (rng.poisson(truth * exposure).astype(float) for _ in range(2))
    one_pool = np.zeros(truth.size, np.int64)
    partition = pooled_partition(train, exposure, one_pool, 5)
    assert len(partition.rates) == 5
    pruned = pooled_partition(train, exposure, one_pool, 5, heldout=(heldout, exposure), floor=1e-6)
    assert len(pruned.rates) == 3 and pruned.rates[0] == 0.0
    assert np.array_equal(pruned.classes, np.repeat([0, 1, 2], 300))
    scored = [predictive_log_likelihood(p, (train, exposure), (heldout, exposure), 1e-6) for p in (pruned, partition)]
    assert scored[0] >= scored[1] - PRUNE_NATS  # a split earning fewer held-out nats is not kept


def test_predicted_rates_follow_the_evidence_and_fall_back_on_the_prior():
    """A pair with many events gets its class's rate, one never seen the prior mean of the classes
    (the share of pairs in each class), one with a little exposure and no event a mixture in between."""
    from hpcdyn.learning.class_partition import predicted_rates, predictive_log_likelihood

    counts = np.array([0.0] * 50 + [10.0] * 50)  # half blocked (rate 0), half at rate 1 with exposure 10
    exposure = np.full(100, 10.0)
    partition = poisson_partition(counts, exposure, 2)
    assert partition.rates.tolist() == [0.0, 1.0]
    new = predicted_rates(partition, np.array([40.0, 0.0, 0.0]), np.array([40.0, 0.0, 0.5]), floor=1e-9)
    assert new[0] == pytest.approx(1.0) and new[1] == pytest.approx(0.5)  # prior 1/2, 1/2
    assert 1e-9 < new[2] < 0.5  # exp(-0.5) / (1 + exp(-0.5)) = 0.38: evidence leans to the blocked class
    assert new[2] == pytest.approx(math.exp(-0.5) / (1 + math.exp(-0.5)))
    # held out: the same pairs again; a blocked pair keeps the weight e^-10 of the rate-1 class
    u = predictive_log_likelihood(partition, (counts, exposure), (counts, exposure), floor=1e-9)
    leak = math.exp(-10) / (1 + math.exp(-10))
    assert u == pytest.approx(50 * (10 * math.log(1.0) - 10.0) - 50 * 10 * leak, rel=1e-12)


def sparse_pairs(seed: int):
    """Pairs of four pools seen ~1.5 time units each: rotations (0.1), blocked hops (0), other hops (1),
    forward hops (a pool of two kinds: 5 for 90 % of its pairs, 25 for the rest)."""
    rng = np.random.default_rng(seed)
    truth = np.concatenate([np.full(3000, 0.1), np.zeros(3000), np.ones(1500), np.where(rng.random(1000) < 0.9, 5.0, 25.0)])
    pools = np.repeat([0, 1, 2, 3], [3000, 3000, 1500, 1000])
    exposure = rng.exponential(1.5, truth.size)
    return truth, pools, exposure, rng.poisson(truth * exposure).astype(float)


def test_a_pooled_partition_classes_sparse_pairs_by_their_pool_and_finds_the_rates():
    from hpcdyn.learning.class_partition import pooled_partition

    truth, pools, exposure, counts = sparse_pairs(0)
    hard = poisson_partition(counts, exposure, 4)
    pooled = pooled_partition(counts, exposure, pools, 5)
    rotations = truth == 0.1
    # the hard partition puts the rotations without an event (~86 %) with the blocked hops
    assert np.mean(hard.classes[rotations] == hard.classes[truth == 0].min()) > 0.5
    assert len(pooled.rates) == 5
    for rate in (0.1, 1.0, 5.0, 25.0):
        chosen = truth == rate
        events = counts[chosen].sum()
        k = int(np.argmin(np.abs(np.log(np.maximum(pooled.rates, 1e-12) / rate))))
        # the class rate is within 3 standard errors (sqrt(n) / E of the kind's own pairs) of the truth
        assert abs(pooled.rates[k] - rate) < 3 * math.sqrt(events) / exposure[chosen].sum() + 1e-12, (rate, pooled.rates)
        if rate in (0.1, 1.0):  # pools of one kind: every pair in its kind's class, however sparse
            assert np.mean(pooled.classes[chosen] == k) > 0.99
    assert np.all(pooled.classes[truth == 0] == 0) and pooled.rates[0] == 0.0
    # the prior is each pair's pool's shares: rotations expect the rotations' class
    assert np.allclose(np.exp(pooled.log_prior).sum(axis=1), 1.0)
    assert np.exp(pooled.log_prior[rotations]).max(axis=1).min() > 0.95


def test_pruning_a_pooled_partition_drops_a_class_the_held_out_pairs_do_not_support():
    from hpcdyn.learning.class_partition import pooled_partition

    truth, pools, exposure, counts = sparse_pairs(1)
    heldout = (np.random.default_rng(2).poisson(truth * exposure).astype(float), exposure)
    pruned = pooled_partition(counts, exposure, pools, 7, heldout=heldout, floor=1e-6)
    # five kinds of rate (0, 0.1, 1, 5, 25): seven classes split some kind by noise, and the held-out
    # pairs do not pay for the split
    assert len(pruned.rates) == 5, pruned.rates
    assert np.allclose(pruned.rates, [0.0, 0.1, 1.0, 5.0, 25.0], rtol=0.15)
    with pytest.raises(ValueError, match="^pools:"):
        pooled_partition(counts, exposure, pools[:-1], 4)
