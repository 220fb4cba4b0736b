"""Sufficient statistics of a trajectory for a key family (DESIGN 1.6, 3.4).

    stats = trajectory_statistics(open_trajectory("run.zarr"), "vn1", validation_fraction=0.1)
    stats.keys          # int64 [K]: every environment key seen
    stats.exposure      # float64 [2, K]: time-integrated number of tokens in each key (train, held-out)
    stats.counts        # int64 [2, K, M]: events of each move made in each key (train, held-out)

For a model whose rates depend only on a token's key p (a hard-local model of that key family),

    U = sum_{p,m} n_{p,m} ln W_m(p) - sum_p E_p sum_m W_m(p)

exactly, for the training part and for the held-out part alike. The split is the trainer's
(``split_points``): events [0, train_stop) train, [boundary, K) are held out together with the
censored tail up to ``t_final``; events in between (``max_train_events``) count in neither.

One compiled pass over the event log, block by block (bounded memory: the lattice, each token's
key index, and per distinct key its token count, last update time and accumulators). Exposure is
accumulated lazily: a key's exposure grows by count x elapsed time only when its count changes
(and at the part boundaries). Keys live in an open-addressing hash map (int64 -> index) grown
by doubling. Only exact (non-hashed) key families are supported: every attention stencil's is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
from pathlib import Path
from typing import Iterator

import numba
import numpy as np

from hpcdyn.physics.environments import EnvironmentEncoder, make_encoder, stencil_table, token_key
from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, System

PARTS = ("train", "heldout")
DISCARD = 2  # events between train_stop and boundary (max_train_events): counted nowhere


def split_points(n_events: int, validation_fraction: float, max_train_events: int | None = None) -> tuple[int, int]:
    """(train_stop, boundary) exactly as ``hpcdyn.learning.training.split`` cuts a trajectory."""
    n_validation = max(1, int(round(n_events * validation_fraction)))
    boundary = n_events - n_validation
    train_stop = boundary if max_train_events is None else min(boundary, max_train_events)
    return max(train_stop, 0), max(boundary, 0)


@dataclasses.dataclass
class SufficientStatistics:
    """Per distinct key: exposure and per-move event counts, for the training and held-out parts."""

    family: str
    system: str
    keys: np.ndarray  # int64 [K], ascending
    exposure: np.ndarray  # float64 [2, K]
    counts: np.ndarray  # int64 [2, K, M]
    t_train: float  # length of the training window
    t_heldout: float  # length of the held-out window (with the censored tail)
    n_events: tuple[int, int]  # events in each part
    split: dict  # validation_fraction, max_train_events, train_stop, boundary, n_events
    fingerprint: str  # the store's (hpcdyn.learning.checkpoint.store_identity)
    encoder_description: dict

    @property
    def n_keys(self) -> int:
        return int(self.keys.shape[0])

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        index = PARTS.index(name)
        return self.exposure[index], self.counts[index]

    def ml_log_likelihood(self, part: str = "train") -> float:
        """U of the non-parametric maximum-likelihood rates n_{p,m} / E_p fitted on the training part,
        scored on ``part``: the ceiling any model of this key family reaches on the training data."""
        train_exposure, train_counts = self.part("train")
        exposure, counts = self.part(part)
        with np.errstate(divide="ignore", invalid="ignore"):
            rates = train_counts / train_exposure[:, None]
            rates = np.where(train_exposure[:, None] > 0, rates, 0.0)
            log_rates = np.log(rates)
            events = np.where(counts > 0, counts * log_rates, 0.0).sum()  # -inf if a held-out event had no training one
        return float(events - (exposure[:, None] * rates).sum())

    def summary(self) -> dict:
        return {
            "family": self.family,
            "keys": self.n_keys,
            "events": list(self.n_events),
            "T": [self.t_train, self.t_heldout],
            "ml_train_U_per_T": self.ml_log_likelihood("train") / max(self.t_train, 1e-300),
        }


def check_exact_family(encoder: EnvironmentEncoder) -> None:
    if encoder.hashed:
        raise ConfigurationError(
            f"key family {encoder.name!r}: its keys are hashed; sufficient statistics need an exact family "
            "(vn1, block3, diamond2, block5 and their -occ variants)"
        )


# ----------------------------------------------------------------------------- compiled pass
@numba.njit(cache=True)
def _slot(table_keys, key):
    """Slot of ``key`` in the open-addressing table (its own, or the empty one where it would go)."""
    mask = table_keys.shape[0] - 1
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    slot = np.int64((h >> np.uint64(20)) & np.uint64(mask))
    while table_keys[slot] != -1 and table_keys[slot] != key:
        slot = (slot + 1) & mask
    return slot


@numba.njit(cache=True)
def _index_of(key, table_keys, table_index, key_of_index, scalars):
    slot = _slot(table_keys, key)
    if table_keys[slot] == key:
        return table_index[slot]
    index = scalars[2]
    table_keys[slot] = key
    table_index[slot] = index
    key_of_index[index] = key
    scalars[2] = index + 1
    return index


@numba.njit(cache=True)
def _flush(index, now, population, last, exposure, part):
    exposure[part, index] += population[index] * (now - last[index])
    last[index] = now


@numba.njit(cache=True)
def _rekey(token, grid, token_site, token_state, token_index, stencil, n_sites, digits, weights, n_own,
           table_keys, table_index, key_of_index, population, last, exposure, scalars, times):  # fmt: skip
    site = token_site[token]
    key, _ = token_key(grid, stencil, site * n_sites, n_sites, token_state[token], digits, weights, n_own, False)
    old = token_index[token]
    if old >= 0 and key_of_index[old] == key:
        return
    now, part = times[0], scalars[0]
    if old >= 0:
        _flush(old, now, population, last, exposure, part)
        population[old] -= 1
    new = _index_of(key, table_keys, table_index, key_of_index, scalars)
    if population[new] == 0:
        last[new] = now
    else:
        _flush(new, now, population, last, exposure, part)
    population[new] += 1
    token_index[token] = new


@numba.njit(cache=True)
def _flush_all(population, last, exposure, scalars, now):
    for index in range(scalars[2]):
        _flush(index, now, population, last, exposure, scalars[0])


@numba.njit(cache=True)
def _pass(tokens, moves, dwell, first, lo, grid, token_site, token_state, site_token, token_index, move_table,
          lx, ly, n_states, content_shift, stencil, inverse, n_sites, digits, weights, n_own,
          table_keys, table_index, key_of_index, population, last, exposure, counts, scalars, times,
          train_stop, boundary, capacity):  # fmt: skip
    """Process events lo.. of a block (global index first + k); returns where it stopped (grow, resume).

    scalars int64: [part, unused, n_keys]; times float64: [now].
    """
    n_moves = move_table.shape[0]
    for k in range(lo, tokens.shape[0]):
        if scalars[2] + 2 * (n_sites + 1) + 2 > capacity:
            return k
        event = first + k
        if event == train_stop:
            _flush_all(population, last, exposure, scalars, times[0])
            scalars[0] = 2
        if event == boundary:
            _flush_all(population, last, exposure, scalars, times[0])
            scalars[0] = 1
        token, move = tokens[k], moves[k]
        counts[scalars[0], token_index[token], move] += 1
        times[0] += dwell[k]
        old_site = token_site[token]
        x, y = old_site % lx, old_site // lx
        x = (x + move_table[move, 0]) % lx
        y = (y + move_table[move, 1]) % ly
        new_site = y * lx + x
        state = (token_state[token] + move_table[move, 2]) % n_states
        grid[old_site] = 0
        site_token[old_site] = -1
        grid[new_site] = state + content_shift
        site_token[new_site] = token
        token_site[token] = new_site
        token_state[token] = state
        for site in (old_site, new_site):
            for i in range(n_sites):
                neighbour = site_token[inverse[site * n_sites + i]]
                if neighbour >= 0:
                    _rekey(neighbour, grid, token_site, token_state, token_index, stencil, n_sites, digits, weights,
                           n_own, table_keys, table_index, key_of_index, population, last, exposure, scalars, times)  # fmt: skip
        _rekey(token, grid, token_site, token_state, token_index, stencil, n_sites, digits, weights, n_own,
               table_keys, table_index, key_of_index, population, last, exposure, scalars, times)  # fmt: skip
        _ = n_moves
    return tokens.shape[0]


class _Accumulator:
    """The state of the pass; grows its key arrays by doubling."""

    def __init__(self, encoder: EnvironmentEncoder, system: System, positions, states, capacity: int = 1 << 12):
        ly, lx = system.shape
        self.encoder, self.system = encoder, system
        self.lx, self.ly = lx, ly
        self.content_shift = 1 if isinstance(system, ActiveSystem) else 0
        self.move_table = np.asarray(system.move_table, np.int64)
        offsets = encoder.offset_array
        self.stencil = stencil_table(offsets, system.shape)
        self.inverse = stencil_table(-offsets, system.shape)
        self.digits, self.weights = encoder.digit_array, encoder.weights
        positions, states = np.asarray(positions, np.int64), np.asarray(states, np.int64)
        n_tokens = states.shape[0]
        self.token_site = positions[:, 1] * lx + positions[:, 0]
        self.token_state = states.copy()
        self.grid = np.zeros(lx * ly, np.int64)
        self.grid[self.token_site] = states + self.content_shift
        self.site_token = np.full(lx * ly, -1, np.int64)
        self.site_token[self.token_site] = np.arange(n_tokens)
        self.token_index = np.full(n_tokens, -1, np.int64)
        self.scalars = np.zeros(3, np.int64)  # part 0 (train) first
        self.times = np.zeros(1, np.float64)
        self._allocate(max(capacity, 4 * n_tokens))
        for token in range(n_tokens):
            _rekey(token, self.grid, self.token_site, self.token_state, self.token_index, self.stencil,
                   encoder.n_sites, self.digits, self.weights, encoder.n_own_states, self.table_keys,
                   self.table_index, self.key_of_index, self.population, self.last, self.exposure, self.scalars,
                   self.times)  # fmt: skip

    def _allocate(self, capacity: int) -> None:
        n_moves = self.system.n_moves
        old = None if not hasattr(self, "key_of_index") else (self.key_of_index, self.population, self.last, self.exposure, self.counts)
        self.capacity = capacity  # key indices
        table_size = 1 << int(math.ceil(math.log2(2 * capacity)))
        self.table_keys = np.full(table_size, -1, np.int64)
        self.table_index = np.zeros(table_size, np.int64)
        self.key_of_index = np.full(capacity, -1, np.int64)
        self.population = np.zeros(capacity, np.int64)
        self.last = np.zeros(capacity, np.float64)
        self.exposure = np.zeros((3, capacity), np.float64)
        self.counts = np.zeros((3, capacity, n_moves), np.int64)
        if old is not None:
            n = int(self.scalars[2])
            keys, population, last, exposure, counts = old
            self.key_of_index[:n], self.population[:n], self.last[:n] = keys[:n], population[:n], last[:n]
            self.exposure[:, :n], self.counts[:, :n] = exposure[:, :n], counts[:, :n]
            _rehash(self.table_keys, self.table_index, self.key_of_index, n)

    def run(self, tokens, moves, dwell, first: int, train_stop: int, boundary: int) -> None:
        tokens = np.ascontiguousarray(tokens, np.int64)
        moves = np.ascontiguousarray(moves, np.int64)
        dwell = np.ascontiguousarray(dwell, np.float64)
        lo = 0
        while lo < len(tokens):
            lo = _pass(tokens, moves, dwell, first, lo, self.grid, self.token_site, self.token_state, self.site_token,
                       self.token_index, self.move_table, self.lx, self.ly, self.system.n_states, self.content_shift,
                       self.stencil, self.inverse, self.encoder.n_sites, self.digits, self.weights,
                       self.encoder.n_own_states, self.table_keys, self.table_index, self.key_of_index,
                       self.population, self.last, self.exposure, self.counts, self.scalars, self.times,
                       train_stop, boundary, self.capacity)  # fmt: skip
            if lo < len(tokens):
                self._allocate(2 * self.capacity)

    def finish(self, t_final: float, n_events: int, train_stop: int, boundary: int) -> None:
        """Part switches not reached by an event (an empty part), then the censored tail up to t_final."""
        for event, part in ((train_stop, DISCARD), (boundary, 1)):
            if event == n_events:
                _flush_all(self.population, self.last, self.exposure, self.scalars, self.times[0])
                self.scalars[0] = part
        _flush_all(self.population, self.last, self.exposure, self.scalars, max(t_final, self.times[0]))


@numba.njit(cache=True)
def _rehash(table_keys, table_index, key_of_index, n):
    for index in range(n):
        slot = _slot(table_keys, key_of_index[index])
        table_keys[slot] = key_of_index[index]
        table_index[slot] = index


def trajectory_statistics(
    source,
    family: str,
    validation_fraction: float = 0.1,
    max_train_events: int | None = None,
    block_events: int = 1 << 20,
    fingerprint: str | None = None,
) -> SufficientStatistics:
    """One streaming pass over ``source``'s events: exposure and counts per key of ``family``."""
    from hpcdyn.learning.checkpoint import store_identity

    system = source.system
    encoder = make_encoder(family, system)
    check_exact_family(encoder)
    from hpcdyn.physics.environments import check_fits

    check_fits(encoder, system.shape)
    n_events = int(source.n_events)
    train_stop, boundary = split_points(n_events, validation_fraction, max_train_events)
    accumulator = _Accumulator(encoder, system, source.initial_positions, source.initial_states)
    first = 0
    dwell_train = dwell_heldout = 0.0
    for tokens, moves, dwell in source.iter_event_blocks(block_events):
        accumulator.run(tokens, moves, dwell, first, train_stop, boundary)
        dwell = np.asarray(dwell, np.float64)
        index = np.arange(first, first + len(dwell))
        dwell_train += float(dwell[index < train_stop].sum())
        dwell_heldout += float(dwell[index >= boundary].sum())
        first += len(dwell)
    elapsed = float(accumulator.times[0])
    accumulator.finish(float(source.t_final), n_events, train_stop, boundary)
    n = int(accumulator.scalars[2])
    order = np.argsort(accumulator.key_of_index[:n], kind="stable")
    keys = accumulator.key_of_index[:n][order]
    exposure = accumulator.exposure[:2, :n][:, order]
    counts = accumulator.counts[:2, :n][:, order]
    seen = (exposure > 0).any(0) | (counts > 0).any((0, 2))
    t_heldout = dwell_heldout + max(float(source.t_final) - elapsed, 0.0)
    return SufficientStatistics(
        family=encoder.name,
        system=system.name,
        keys=keys[seen],
        exposure=exposure[:, seen],
        counts=counts[:, seen],
        t_train=dwell_train,
        t_heldout=t_heldout,
        n_events=(train_stop, n_events - boundary),
        split={
            "validation_fraction": float(validation_fraction),
            "max_train_events": max_train_events,
            "train_stop": train_stop,
            "boundary": boundary,
            "n_events": n_events,
            "tail": max(float(source.t_final) - elapsed, 0.0),
        },
        fingerprint=fingerprint or store_identity(source)["fingerprint"],
        encoder_description=encoder.describe(),
    )


# ----------------------------------------------------------------------------- persistence
def save(stats: SufficientStatistics, path) -> None:
    from hpcdyn.storage.statistics_store import save_statistics

    save_statistics(path, {"keys": stats.keys, "exposure": stats.exposure, "counts": stats.counts}, _attrs(stats))


def _attrs(stats: SufficientStatistics) -> dict:
    return {
        "fingerprint": stats.fingerprint,
        "family": stats.family,
        "system": stats.system,
        "encoder": stats.encoder_description,
        "split": stats.split,
        "t_train": stats.t_train,
        "t_heldout": stats.t_heldout,
        "n_events": list(stats.n_events),
    }


def load(path, fingerprint: str | None = None, family: str | None = None, split: dict | None = None) -> SufficientStatistics:
    """Statistics from a group; refused (by name) with another store, key family or split."""
    from hpcdyn.storage.statistics_store import load_statistics

    arrays, attrs = load_statistics(path, fingerprint, family, split)
    return SufficientStatistics(
        family=attrs["family"],
        system=attrs["system"],
        keys=arrays["keys"],
        exposure=arrays["exposure"],
        counts=arrays["counts"],
        t_train=float(attrs["t_train"]),
        t_heldout=float(attrs["t_heldout"]),
        n_events=tuple(attrs["n_events"]),
        split=attrs["split"],
        fingerprint=attrs["fingerprint"],
        encoder_description=attrs["encoder"],
    )


def cached_statistics(source, family: str, validation_fraction: float = 0.1, max_train_events: int | None = None,
                      block_events: int = 1 << 20) -> tuple[SufficientStatistics, bool]:  # fmt: skip
    """(statistics, reused): read from beside a store when computed before, else computed and saved there.

    An in-memory source (no ``path``) is computed every time.
    """
    from hpcdyn.learning.checkpoint import store_identity
    from hpcdyn.storage.statistics_store import statistics_path

    fingerprint = store_identity(source)["fingerprint"]
    store_path = getattr(source, "path", None)
    if store_path is None:
        return trajectory_statistics(source, family, validation_fraction, max_train_events, block_events, fingerprint), False
    path = statistics_path(store_path, family, fingerprint, validation_fraction, max_train_events)
    split = {"validation_fraction": float(validation_fraction), "max_train_events": max_train_events}
    if path.exists():
        return load(path, fingerprint, family, split), True
    with _computing(path):  # trials that start together: one computes, the others wait and read
        if path.exists():
            return load(path, fingerprint, family, split), True
        stats = trajectory_statistics(source, family, validation_fraction, max_train_events, block_events, fingerprint)
        save(stats, path)
    return stats, False


@contextlib.contextmanager
def _computing(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file beside ``path`` (released when the file closes, also when the
    process dies); without one (a directory this process cannot write) nothing is held, and saving
    fails there as it would anyway."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "w")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
