"""Training a hard-local model on the exact sufficient statistics of a trajectory (DESIGN 1.6).

    objective = StatisticsObjective(stats, lattice=source.system)
    u = objective.log_likelihood(model, "train")        # exact U, differentiable, one call per key

A hard-local model's rates depend on its key alone (``TransformerConfig.key_family``), so

    U = sum_{p,m} n_{p,m} ln W_m(p) - sum_p E_p sum_m W_m(p)

Each key's patch is placed alone on an empty lattice of the training size (as the environment
table's evaluator does: ``hpcdyn.physics.environments.patch_configurations``) and evaluated once: an
epoch costs one network call per distinct key, whatever the trajectory's length. The batches of
patch configurations are built once per statistics.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpcdyn.learning.class_partition import Partition, log_poisson, pooled_partition
from hpcdyn.learning.class_rates import ClassStatistics, set_class_rates
from hpcdyn.learning.statistics import PARTS, SufficientStatistics
from hpcdyn.physics.environments import decode_keys, make_encoder, patch_configurations
from hpcdyn.physics.systems import ConfigurationError, System


class StatisticsObjective:
    """U of a hard-local model from sufficient statistics, in batches of keys."""

    def __init__(self, stats: SufficientStatistics, lattice: System, device: str = "cpu"):
        self.stats, self.lattice, self.device = stats, lattice, device
        self.encoder = make_encoder(stats.family, lattice)
        patch_rows = decode_keys(self.encoder, stats.keys)
        # (rows, positions, states, centre) per batch of patches, filled to one token count: a call per
        # batch rather than per count (a small model's step costs per call)
        self.batches = [
            (torch.as_tensor(rows, device=device), torch.as_tensor(positions, device=device),
             torch.as_tensor(states, device=device), centre)  # fmt: skip
            for rows, positions, states, centre in patch_configurations(self.encoder, lattice, patch_rows, padded=True)
        ]
        self.exposure = torch.as_tensor(stats.exposure, dtype=torch.float64, device=device)  # [2, K]
        self.counts = torch.as_tensor(stats.counts, dtype=torch.float64, device=device)  # [2, K, M]

    def check_model(self, model) -> None:
        family = model.config.key_family
        if not model.config.hard_local or family is None:
            raise ConfigurationError("model: only a hard-local model (attention_stencil) trains on sufficient statistics")
        if family != self.stats.family:
            raise ConfigurationError(
                f"statistics: they are of key family {self.stats.family!r}, the model needs {family!r}; "
                "compute the statistics of the model's key family"
            )

    def key_log_rates(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(event, exposure) log-rates of the centre token of each patch of a batch, [B, M] each."""
        _, positions, states, centre = batch
        if getattr(model, "scores_events_apart", False):
            event, exposure = model.split_log_rates(positions, states, token=centre)
            return event[:, 0], exposure[:, 0]
        log_rates = model(positions, states, token=centre)[:, 0]
        return log_rates, log_rates

    def batch_log_likelihood(self, model, batch, part: str | int = "train") -> torch.Tensor:
        """U contributed by the keys of one batch (float64, differentiable)."""
        index = PARTS.index(part) if isinstance(part, str) else part
        rows = batch[0]
        event, exposure = self.key_log_rates(model, batch)
        counts = self.counts[index, rows]
        event = event.double()
        taken = torch.where(counts > 0, counts * event, torch.zeros_like(event)).sum()
        return taken - (self.exposure[index, rows, None] * exposure.double().exp()).sum()

    def log_likelihood(self, model, part: str = "train") -> torch.Tensor:
        """U of the whole part (sum over every batch of keys)."""
        self.check_model(model)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.batches:
            total = total + self.batch_log_likelihood(model, batch, part)
        return total

    def both_parts(self, model) -> tuple[float, float]:
        """(U train, U held-out), without gradients, one network call per key."""
        totals = [0.0, 0.0]
        with torch.no_grad():
            for batch in self.batches:
                rows = batch[0]
                log_rates = model(batch[1], batch[2], token=batch[3])[:, 0].double()
                for index in range(2):
                    counts = self.counts[index, rows]
                    taken = torch.where(counts > 0, counts * log_rates, torch.zeros_like(log_rates)).sum()
                    totals[index] += float(taken - (self.exposure[index, rows, None] * log_rates.exp()).sum())
        return totals[0], totals[1]

    @torch.no_grad()
    def fit_class_rates(self, model) -> torch.Tensor:
        """Mode 2: class rates set to n_k / E_k over the training part (a class without events: see below)."""
        n_classes = model.config.n_classes
        events = torch.zeros(n_classes, dtype=torch.float64, device=self.device)
        exposure = torch.zeros(n_classes, dtype=torch.float64, device=self.device)
        for rows, positions, states, centre in self.batches:
            classes = model.move_classes(positions, states, token=centre)[:, 0]  # [B, M], -1 masked
            valid = classes >= 0
            safe = classes.clamp_min(0)
            events.index_add_(0, safe[valid], self.counts[0, rows][valid])
            exposure.index_add_(0, safe[valid], self.exposure[0, rows, None].expand_as(classes)[valid])
        # a class with exposure and no event (the blocked moves) has the best rate 0: it goes down to the
        # lowest rate the classes started at, rather than keep a rate it had while other moves sat in it
        set_class_rates(model, ClassStatistics(events, exposure), empty_to_lowest=True)
        return events / exposure.clamp_min(torch.finfo(torch.float64).tiny)

    @torch.no_grad()
    def key_classes(self, model) -> np.ndarray:
        """Mode 2: the class of every (key, move), int64 [K, M] (-1 masked)."""
        out = np.zeros((self.stats.n_keys, model.n_moves), np.int64)
        for rows, positions, states, centre in self.batches:
            out[rows.cpu().numpy()] = model.move_classes(positions, states, token=centre)[:, 0].cpu().numpy()
        return out

    @torch.no_grad()
    def masked_moves(self, model) -> np.ndarray:
        """The (key, move) pairs the model's exclusion mask forbids, bool [K, M] (none without the mask)."""
        out = np.zeros((self.stats.n_keys, model.n_moves), bool)
        if model.config.exclusion_mask:
            for rows, positions, states, centre in self.batches:
                out[rows.cpu().numpy()] = (model.move_classes(positions, states, token=centre)[:, 0] < 0).cpu().numpy()
        return out

    @torch.no_grad()
    def key_log_rates_all(self, model) -> np.ndarray:
        out = np.zeros((self.stats.n_keys, model.n_moves))
        for rows, positions, states, centre in self.batches:
            out[rows.cpu().numpy()] = model(positions, states, token=centre)[:, 0].double().cpu().numpy()
        return out


def statistics_log_likelihood(model, stats: SufficientStatistics, lattice: System, part: str = "train") -> float:
    """U of ``model`` on one part of a trajectory, from its sufficient statistics (no gradient)."""
    objective = StatisticsObjective(stats, lattice)
    objective.check_model(model)
    with torch.no_grad():
        return float(objective.log_likelihood(model, part))


def ml_rates(stats: SufficientStatistics) -> np.ndarray:
    """The non-parametric maximum-likelihood rates n_{p,m} / E_p on the training part, [K, M]."""
    exposure, counts = stats.part("train")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(exposure[:, None] > 0, counts / exposure[:, None], 0.0)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


# ----------------------------------------------------------------------------- Mode 2's start
def uses_partition(model, config) -> bool:
    """Mode 2 on statistics starts from the maximum-likelihood partition (``TrainingConfig.class_init``)."""
    return model.config.mode == 2 and config.class_init in ("auto", "partition")


def pair_pools(objective: StatisticsObjective, n_moves: int) -> np.ndarray:
    """The pool of every (key, move) pair, int64 [K * M]: pairs of the same move, the same own state of
    the moving token and the same key digit at the site the move goes to (the token's own site for a
    rotation or a spin flip; no digit when the key's stencil does not hold the site)."""
    patches = decode_keys(objective.encoder, objective.stats.keys).astype(np.int64)
    own = patches[:, 0]
    stencil = objective.encoder.offsets[: objective.encoder.n_stencil]
    columns = []
    for dx, dy, _ in objective.lattice.move_table[:n_moves]:
        step = (int(dx), int(dy))
        target = patches[:, 1 + stencil.index(step)] if step != (0, 0) and step in stencil else np.zeros_like(own)
        columns.append(target)
    target = np.stack(columns, axis=1)  # [K, M]
    move = np.broadcast_to(np.arange(n_moves)[None, :], target.shape)
    code = (move * objective.encoder.n_own_states + own[:, None]) * objective.encoder.base + target
    _, pools = np.unique(code.reshape(-1), return_inverse=True)
    return pools.reshape(-1).astype(np.int64)


def key_partition(objective: StatisticsObjective, model) -> Partition:
    """The ML partition of the training part's (key, move) pairs into at most the model's classes
    (masked pairs: -1), each pair's class with its pool's prior (``class_partition.pooled_partition``,
    pools by ``pair_pools``), without the classes the held-out part does not support."""
    masked = objective.masked_moves(model)
    parts = []
    for name in PARTS:
        exposure, counts = objective.stats.part(name)
        parts.append((counts, np.where(masked, 0.0, np.broadcast_to(exposure[:, None], counts.shape))))
    floor = float(model.class_log_rates.detach().min().exp())  # the rate the model starts its lowest class at
    pools = pair_pools(objective, model.n_moves)
    return pooled_partition(*parts[0], pools, model.config.n_classes, heldout=parts[1], floor=floor)


def evidence_weights(partition: Partition, counts: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Nats by which each pair prefers its class to the next best one under the partition's rates.

    A pair with few events in little exposure could sit in several classes at almost no cost (no event
    in one time unit: a rotation or a blocked hop alike); weighting the classifier's fit by this margin
    lets the pairs that do show their rate teach it, and the structure it learns decide the others."""
    score = log_poisson(counts, exposure, partition.rates)
    if partition.log_prior is not None:  # a pooled partition: the pool's prior is part of the evidence
        score = score + partition.log_prior
    rows = np.arange(len(counts))
    assigned = np.maximum(partition.classes, 0)
    own = score[rows, assigned]
    score[rows, assigned] = -np.inf
    margin = own - score.max(axis=1)
    return np.where((partition.classes >= 0) & np.isfinite(margin), margin, 0.0)


def balanced(weights: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Weights scaled so that every class has the same total: a class of many weak pairs (blocked hops,
    each a little exposure without events) counts as much as one of a few strong ones (forward hops)."""
    totals = np.bincount(np.maximum(classes, 0), weights=np.where(classes >= 0, weights, 0.0))
    scale = np.where(totals > 0, 1.0 / np.maximum(totals, 1e-300), 0.0)
    return np.where(classes >= 0, weights * scale[np.maximum(classes, 0)], 0.0)


# Keys per step of the classifier's fit to the partition: full batch below, a random sample above (the
# fit costs ~155 us per key and step on CPU; 600 full steps over the 29 k keys of a paper-size quorum
# trajectory would take 45 min).
CLASSIFIER_KEYS = 4096


# Checks without a better held-out U before the fit ends. Traced on 11 fits (active at L 30, N_theta 3-6,
# seeds 0-2, v_plus 2.5-25; vn1 and block3 at L 12; the quorum count model): the best state was never
# found after 3 checks without one, and the 4th to 6th cost a sixth of every fit (benchmarks/TRAINING.md).
CLASSIFIER_PATIENCE = 3


def fit_classifier(objective: StatisticsObjective, model, targets: np.ndarray, weights: np.ndarray, lr: float,
                   max_steps: int = 600, check_every: int = 25, patience: int = CLASSIFIER_PATIENCE,
                   seed: int = 0) -> dict:  # fmt: skip
    """Fit the classifier to a class of every (key, move) by weighted cross-entropy over the keys.

    targets, weights: [K, M] (weight 0: no say). The targets are noisy where a pair has little
    exposure (no event in a short time looks like a blocked move), and a classifier fitted to the end
    learns that noise key by key. It learns the structure first, so the fit stops early on the
    held-out part: every ``check_every`` steps the class rates are set in closed form and the
    held-out U scored; the best state is kept, and the fit ends after ``patience`` checks without a
    better one (or at ``max_steps``). Only keys with a weight take part; above CLASSIFIER_KEYS of them
    each step takes a uniform sample of that many, its loss scaled up to the whole (unbiased)."""
    parameters = [p for name, p in model.named_parameters() if name != "class_log_rates"]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    target = torch.as_tensor(np.maximum(targets, 0), device=objective.device)
    weight = torch.as_tensor(weights / max(weights.sum(), 1e-300), dtype=torch.float32, device=objective.device)
    taking = (weight > 0).any(dim=1)  # [K]: keys with something to teach
    fraction = min(1.0, CLASSIFIER_KEYS / max(int(taking.sum()), 1))
    generator = torch.Generator().manual_seed(seed * 100_003 + 77_777)
    best_u, best_step, best_state, since_best, step = -math.inf, 0, None, 0, 0
    for step in range(1, max_steps + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for rows, positions, states, centre in objective.batches:  # gradients accumulate batch by batch:
            # memory holds one batch's graph (about 21 kB per key at once for block5 keys otherwise)
            chosen = taking[rows]
            if fraction < 1.0:
                chosen = chosen & (torch.rand(len(rows), generator=generator, device="cpu") < fraction).to(chosen.device)
            if not bool(chosen.any()):
                continue
            rows, positions, states = rows[chosen], positions[chosen], states[chosen]
            logits = model.class_logits(positions, states, token=centre)[:, 0]  # [B, M, K]
            cross = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target[rows].flatten(), reduction="none")
            ((weight[rows].flatten() * cross).sum() / fraction).backward()
        optimizer.step()
        if step % check_every and step != max_steps:
            continue
        model.eval()
        objective.fit_class_rates(model)
        u_heldout = objective.both_parts(model)[1]
        if u_heldout > best_u:
            best_u, best_step, since_best = u_heldout, step, 0
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"class_init_steps": best_step, "class_init_steps_run": step}


def initialise_classes(objective: StatisticsObjective, model, config) -> dict:
    """Mode 2's start on statistics: class rates n_k / E_k of the ML partition, the classifier fitted to it.

    From there the trainer's expected-U steps and closed-form refits (hard EM) only settle what the
    data leave open; started from arbitrary classes they sort the moves slowly and can stall (a class
    that two kinds of move share keeps both)."""
    exposure, counts = objective.stats.part("train")
    partition = key_partition(objective, model)
    pair_counts = counts.reshape(-1).astype(np.float64)
    pair_exposure = np.broadcast_to(exposure[:, None], counts.shape).reshape(-1)
    weights = balanced(evidence_weights(partition, pair_counts, pair_exposure), partition.classes).reshape(counts.shape)
    with torch.no_grad():
        for k, rate in enumerate(partition.rates):
            if rate > 0:  # a class of moves never seen keeps its initial near-zero rate
                model.class_log_rates[k] = math.log(rate)
    fitted = fit_classifier(objective, model, partition.classes.reshape(counts.shape), weights, config.start_lr, seed=config.seed)
    objective.fit_class_rates(model)
    t_train = max(objective.stats.t_train, 1e-300)
    return {**fitted, "partition_U_per_T": partition.log_likelihood / t_train, "partition_rates": partition.rates.tolist(),
            "partition_classes": len(partition.rates)}


# ----------------------------------------------------------------------------- the trainer's epoch
CLOSED_FORM_EVERY = 5
# Without ``statistics_batch_keys`` a step takes every key up to this many, else SAMPLED_KEYS of them: the
# 29 k keys of a paper-size quorum trajectory (vn1+count5) cost ~4.5 s a full step on one CPU core, and
# a step over 4,096 sampled keys reached the same held-out U (TRAINING.md quorum-count).
FULL_BATCH_KEYS, SAMPLED_KEYS = 16_384, 4_096


def batch_keys(config, n_keys: int) -> int | None:
    """Keys per gradient step: ``config.statistics_batch_keys``, or by default every key (None) up to
    FULL_BATCH_KEYS, SAMPLED_KEYS beyond."""
    if config.statistics_batch_keys is not None:
        return config.statistics_batch_keys
    return None if n_keys <= FULL_BATCH_KEYS else SAMPLED_KEYS


def train_epoch(objective: StatisticsObjective, model, optimizer, config, generator: torch.Generator, progress,
                epoch: int = 0) -> dict:  # fmt: skip
    """``config.statistics_steps`` gradient steps on -U / T of the training part.

    Full batch (every key each step) unless ``batch_keys`` is smaller than the number of keys: then
    each step takes random groups of keys (the patch batches) adding up to about that many, their U
    scaled up to the whole (an unbiased estimate of U).
    """
    t_train = max(objective.stats.t_train, 1e-300)
    n_keys = objective.stats.n_keys
    sizes = [len(batch[0]) for batch in objective.batches]
    limit = batch_keys(config, n_keys)
    total_u = 0.0
    started = {}
    partition = uses_partition(model, config)
    if partition and epoch == 0:
        started = initialise_classes(objective, model, config)
    if partition:  # the steps below must earn their place on the held-out part (see the end)
        model.eval()
        start_heldout = objective.both_parts(model)[1]
        start_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    model.train()
    if partition:  # from a sorted start the exact expected-U gradient refines; straight-through would scatter
        model.expected_gradient = True
    # Mode 2 with closed-form class rates and the expected-U gradient: after one epoch in which the
    # classifier sorts the moves by the rates as they are (or from the partition's start), the rates
    # are refitted every CLOSED_FORM_EVERY steps (hard EM; cheap on statistics: one no-grad call per
    # key). Refitted earlier, while the moves still sit in arbitrary classes, every class goes to the mean rate.
    start = config.expected_from_epoch
    refit = model.config.mode == 2 and (partition or (config.class_rate_fit == "closed_form" and start is not None and epoch > start))
    for step in range(config.statistics_steps):
        if limit is None or limit >= n_keys:
            chosen, scale = range(len(objective.batches)), 1.0
        else:
            order = torch.randperm(len(objective.batches), generator=generator).tolist()
            chosen, taken = [], 0
            for index in order:
                if taken >= limit:
                    break
                chosen.append(index)
                taken += sizes[index]
            scale = n_keys / taken
        optimizer.zero_grad(set_to_none=True)
        total_u = 0.0
        for index in chosen:  # U is a sum over batches of keys: its gradient accumulates batch by batch,
            # so memory holds one batch's graph, not the whole key set's (16 GB for a two-layer model's
            # ~10^5 diamond2 keys of the paper's trajectory when summed first)
            u = objective.batch_log_likelihood(model, objective.batches[index], "train") * scale
            (-u / t_train).backward()
            total_u += float(u.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimizer.step()
        if refit and (step + 1) % CLOSED_FORM_EVERY == 0:  # cheap on statistics: one no-grad call per key
            objective.fit_class_rates(model)
    progress.update(objective.stats.n_events[0])
    model.eval()
    u_train, u_heldout = objective.both_parts(model)
    if partition and u_heldout < start_heldout:
        # From the partition's start the steps refine what the data leave open; where they lower the
        # held-out U instead (measured on an 8-key FA chain: the expected-U steps mixed two classes of
        # a fitted classifier), the epoch keeps the state it started from.
        model.load_state_dict(start_state)
        u_train, u_heldout = objective.both_parts(model)
        started["steps_reverted"] = True
    return {
        "train_U_per_T": u_train / t_train,
        "train_events": objective.stats.n_events[0],
        "train_step_U_per_T": total_u / t_train,
        **started,
    }


def validate(objective: StatisticsObjective, model):
    """Held-out U as the trainer's LikelihoodResult (exactly path_log_likelihood's, from the statistics)."""
    from hpcdyn.learning.likelihood import LikelihoodResult

    model.eval()
    _, u_heldout = objective.both_parts(model)
    stats = objective.stats
    return LikelihoodResult(u_heldout, stats.t_heldout, stats.n_events[1], float(stats.split.get("tail", 0.0)))


def ceiling_metrics(stats: SufficientStatistics) -> dict:
    """The non-parametric ML rates' U/T (every key its own rate, fitted on the training part)."""
    return {
        "statistics_keys": stats.n_keys,
        "ml_train_U_per_T": stats.ml_log_likelihood("train") / max(stats.t_train, 1e-300),
        "ml_val_U_per_T": _finite(stats.ml_log_likelihood("heldout") / max(stats.t_heldout, 1e-300)),
    }
