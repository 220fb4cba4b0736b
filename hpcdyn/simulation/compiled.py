"""Compiled exact simulator of the original dynamics: the n-fold way (BKL) with local updates.

Every candidate move with a non-zero rate sits in the list of its rate class (active: rotation D,
forward hop v_plus, other hop v_other; quorum: the same plus a crowded forward hop v_crowded; fa:
one class per (spin, up-neighbour count)). An event:
draw the dwell time from the escape rate R = sum_c count_c * rate_c, pick a class with probability
count_c * rate_c / R, pick a member uniformly, apply it, and re-class only the few moves whose rate
it changed (the mover's own hops and its old and new neighbours' hops onto those sites; for quorum,
also the forward hop of every particle whose block around it holds the hop's source or target and
whose crowding flipped). The cost per event is O(1) in the system size (O(R^2) for quorum).

The loops run in numba with an explicit ``numpy.random.Generator``, so a seed fixes the trajectory
whatever the chunk sizes the caller drains it in. Events are returned in bounded chunks so long
runs stream to the store.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numba
import numpy as np

from hpcdyn.physics.environments import block_offsets, stencil_table
from hpcdyn.physics.systems import HOP_DISPLACEMENTS, ActiveSystem, FASystem, QuorumSystem, System, neighbour_directions

DX = HOP_DISPLACEMENTS[:, 0].copy()
DY = HOP_DISPLACEMENTS[:, 1].copy()

# clock layout shared by the loops: [time, pending dwell (-1: none), next snapshot index, log-likelihood]
TIME, PENDING, NEXT_SNAPSHOT, LOG_LIKELIHOOD = 0, 1, 2, 3


# ----------------------------------------------------------------------------- class lists
# Helpers that take the class-list arrays are written out inline in the hot loops below: numba's
# calls (and IR inlining) of array-taking functions cost several times the event itself.
@numba.njit(cache=True)
def _set_class(move, new, class_of, slot, members, count):
    """Move ``move`` from its class list to class ``new`` (-1: rate zero, in no list). Not hot."""
    old = class_of[move]
    if old == new:
        return
    if old >= 0:
        position = slot[move]
        last = members[old, count[old] - 1]
        members[old, position] = last
        slot[last] = position
        count[old] -= 1
    if new >= 0:
        members[new, count[new]] = move
        slot[move] = count[new]
        count[new] += 1
    class_of[move] = new


@numba.njit(cache=True, inline="always")
def _escape_rate(count, rate):
    total = 0.0
    for c in range(count.shape[0]):
        total += count[c] * rate[c]
    return total


@numba.njit(cache=True, inline="always")
def _pick(r, count, rate, members):
    """Member and class chosen by r uniform in [0, R); the remainder of r picks within the class."""
    last_nonempty = -1
    for c in range(count.shape[0]):
        weight = count[c] * rate[c]
        if weight <= 0.0:
            continue
        last_nonempty = c
        if r < weight:
            index = min(int(r / rate[c]), count[c] - 1)
            return members[c, index], c
        r -= weight
    # r at the very top of [0, R) after rounding: take the last member of the last live class
    return members[last_nonempty, count[last_nonempty] - 1], last_nonempty


@numba.njit(cache=True, inline="always")
def _next_dwell(clock, escape, rng):
    if clock[PENDING] >= 0.0:
        dwell = clock[PENDING]
        clock[PENDING] = -1.0
        return dwell
    if escape <= 0.0:
        return np.inf
    return -math.log(1.0 - rng.random()) / escape


# ----------------------------------------------------------------------------- lattice
def neighbour_table(shape: tuple[int, int], directions: np.ndarray) -> np.ndarray:
    """Flat site index of each neighbour: table[site * k + j] for direction directions[j].

    Precomputed so the compiled loops never take a modulo (an integer division costs more than
    the rest of an event).
    """
    ly, lx = shape
    sites = np.arange(lx * ly)
    x, y = sites % lx, sites // lx
    columns = [((y + DY[d]) % ly) * lx + (x + DX[d]) % lx for d in directions]
    return np.stack(columns, axis=1).reshape(-1).astype(np.int64)


# ----------------------------------------------------------------------------- active model
@numba.njit(cache=True)
def _active_class(token, move, site, orient, occupancy, neighbours):
    """Rate class of a move: 0 rotation (D), 1 forward hop (v_plus), 2 other hop, -1 blocked."""
    if move < 2:
        return 0
    direction = move - 2
    if occupancy[neighbours[site[token] * 4 + direction]] > 0:
        return -1
    return 1 if direction == orient[token] else 2


@numba.njit(cache=True)
def _active_init(site, orient, occupancy, neighbours, class_of, slot, members, count):
    for token in range(site.shape[0]):
        for move in range(6):
            new = _active_class(token, move, site, orient, occupancy, neighbours)
            _set_class(token * 6 + move, new, class_of, slot, members, count)


@numba.njit(cache=True)
def _active_snapshot(site, orient, grid):
    flat = grid.reshape(-1)
    flat[:] = 0
    for token in range(site.shape[0]):
        flat[site[token]] = 1 + orient[token]


@numba.njit(cache=True)
def _active_run(
    site, orient, occupancy, neighbours, class_of, slot, members, count, rate, log_rate,
    rng, clock, t_final, out_token, out_move, out_dwell, snapshot_every, snapshot_time, snapshot_grid,
):  # fmt: skip
    touched = np.empty(12, np.int64)  # moves whose class an event may change
    n_events = 0
    n_snapshots = 0
    while n_events < out_token.shape[0]:
        escape = _escape_rate(count, rate)
        dwell = _next_dwell(clock, escape, rng)
        now = clock[TIME]
        if snapshot_every > 0.0:
            while True:
                when = clock[NEXT_SNAPSHOT] * snapshot_every
                if when > t_final or when >= now + dwell:
                    break
                if n_snapshots == snapshot_time.shape[0]:
                    clock[PENDING] = dwell
                    return n_events, n_snapshots, False
                _active_snapshot(site, orient, snapshot_grid[n_snapshots])
                snapshot_time[n_snapshots] = when
                n_snapshots += 1
                clock[NEXT_SNAPSHOT] += 1.0
        if now + dwell > t_final:
            clock[LOG_LIKELIHOOD] -= (t_final - now) * escape
            clock[TIME] = t_final
            return n_events, n_snapshots, True
        move_id, chosen_class = _pick(rng.random() * escape, count, rate, members)
        token = move_id // 6
        move = move_id - token * 6
        # The mover's four hops change class on a rotation (which one is forward) and on a hop
        # (its new neighbourhood); a hop also changes each neighbour's hop onto the two sites.
        for direction in range(4):
            touched[direction] = token * 6 + 2 + direction
        n_touched = 4
        if move < 2:
            orient[token] = (orient[token] + (1 if move == 0 else 3)) & 3
        else:
            old_site = site[token]
            new_site = neighbours[old_site * 4 + move - 2]
            occupancy[old_site] = 0
            occupancy[new_site] = token + 1
            site[token] = new_site
            for centre in (old_site, new_site):
                for direction in range(4):
                    neighbour = occupancy[neighbours[centre * 4 + direction]] - 1
                    if neighbour >= 0 and neighbour != token:
                        touched[n_touched] = neighbour * 6 + 2 + ((direction + 2) & 3)
                        n_touched += 1
        for index in range(n_touched):  # _set_class, written out (see the note above)
            changed = touched[index]
            hopper = changed // 6
            direction = changed - hopper * 6 - 2
            if occupancy[neighbours[site[hopper] * 4 + direction]] > 0:
                new = -1  # blocked: rate zero
            else:
                new = 1 if direction == orient[hopper] else 2
            old = class_of[changed]
            if old == new:
                continue
            if old >= 0:
                position = slot[changed]
                last = members[old, count[old] - 1]
                members[old, position] = last
                slot[last] = position
                count[old] -= 1
            if new >= 0:
                members[new, count[new]] = changed
                slot[changed] = count[new]
                count[new] += 1
            class_of[changed] = new
        clock[LOG_LIKELIHOOD] += log_rate[chosen_class] - dwell * escape
        clock[TIME] = now + dwell
        out_token[n_events] = token
        out_move[n_events] = move
        out_dwell[n_events] = dwell
        n_events += 1
    return n_events, n_snapshots, False


# ----------------------------------------------------------------------------- quorum model
# Classes: 0 rotation (D), 1 forward hop (v_plus), 2 other hop (v_other), 3 crowded forward hop
# (v_crowded); -1 blocked. ``others[token]`` counts the other particles in the token's block. The
# block is symmetric, so a site lies in a particle's block exactly when the particle lies in the
# site's block: a hop from a to b changes the count of the particles in block(a) xor block(b) only,
# the block's trailing edge (-1) and the edge it moves onto (+1), 2R + 1 sites each.
def block_edges(radius: int, shape: tuple[int, int]) -> np.ndarray:
    """int64 [sites * 4 * 2 * (2R+1)]: for a hop from site a in direction d, the sites of
    block(a) - block(b) at [((a * 4 + d) * 2 + 0) * (2R+1) + i] and of block(b) - block(a) at
    [((a * 4 + d) * 2 + 1) * (2R+1) + i]. On a side of exactly 2R + 1 sites the two edges coincide
    (the blocks are equal), and their -1 and +1 cancel."""
    span = range(-radius, radius + 1)
    block = {(dx, dy) for dx in span for dy in span}
    columns = []
    for dx, dy in HOP_DISPLACEMENTS.tolist():
        moved = {(x + dx, y + dy) for x, y in block}
        trailing = sorted(block - moved, key=lambda o: (o[1], o[0]))
        leading = sorted(moved - block, key=lambda o: (o[1], o[0]))
        columns.append(stencil_table(np.array(trailing + leading), shape).reshape(-1, len(trailing) + len(leading)))
    return np.stack(columns, axis=1).reshape(-1).astype(np.int64)


@numba.njit(cache=True)
def _quorum_class(token, move, site, orient, occupancy, neighbours, others, q):
    if move < 2:
        return 0
    direction = move - 2
    if occupancy[neighbours[site[token] * 4 + direction]] > 0:
        return -1
    if direction != orient[token]:
        return 2
    return 3 if others[token] >= q else 1


@numba.njit(cache=True)
def _quorum_init(site, orient, occupancy, neighbours, block, others, q, class_of, slot, members, count):
    width = block.shape[0] // occupancy.shape[0]
    for token in range(site.shape[0]):
        found = 0
        for i in range(width):
            if occupancy[block[site[token] * width + i]] > 0:
                found += 1
        others[token] = found
    for token in range(site.shape[0]):
        for move in range(6):
            new = _quorum_class(token, move, site, orient, occupancy, neighbours, others, q)
            _set_class(token * 6 + move, new, class_of, slot, members, count)


@numba.njit(cache=True)
def _quorum_run(
    site, orient, occupancy, neighbours, edges, others, q, class_of, slot, members, count, rate, log_rate,
    rng, clock, t_final, out_token, out_move, out_dwell, snapshot_every, snapshot_time, snapshot_grid,
):  # fmt: skip
    span = edges.shape[0] // (occupancy.shape[0] * 8)  # 2R + 1 sites per edge
    touched = np.empty(12 + 2 * span, np.int64)  # moves whose class an event may change
    n_events = 0
    n_snapshots = 0
    while n_events < out_token.shape[0]:
        escape = _escape_rate(count, rate)
        dwell = _next_dwell(clock, escape, rng)
        now = clock[TIME]
        if snapshot_every > 0.0:
            while True:
                when = clock[NEXT_SNAPSHOT] * snapshot_every
                if when > t_final or when >= now + dwell:
                    break
                if n_snapshots == snapshot_time.shape[0]:
                    clock[PENDING] = dwell
                    return n_events, n_snapshots, False
                _active_snapshot(site, orient, snapshot_grid[n_snapshots])
                snapshot_time[n_snapshots] = when
                n_snapshots += 1
                clock[NEXT_SNAPSHOT] += 1.0
        if now + dwell > t_final:
            clock[LOG_LIKELIHOOD] -= (t_final - now) * escape
            clock[TIME] = t_final
            return n_events, n_snapshots, True
        move_id, chosen_class = _pick(rng.random() * escape, count, rate, members)
        token = move_id // 6
        move = move_id - token * 6
        for direction in range(4):  # the mover's hops, as in the active loop
            touched[direction] = token * 6 + 2 + direction
        n_touched = 4
        if move < 2:
            orient[token] = (orient[token] + (1 if move == 0 else 3)) & 3
        else:
            old_site = site[token]
            new_site = neighbours[old_site * 4 + move - 2]
            occupancy[old_site] = 0
            occupancy[new_site] = token + 1
            site[token] = new_site
            for centre in (old_site, new_site):  # exclusion: neighbours' hops onto the two sites
                for direction in range(4):
                    neighbour = occupancy[neighbours[centre * 4 + direction]] - 1
                    if neighbour >= 0 and neighbour != token:
                        touched[n_touched] = neighbour * 6 + 2 + ((direction + 2) & 3)
                        n_touched += 1
            # Quorum: re-rate a forward hop when the particle's count crosses q.
            first = (old_site * 4 + move - 2) * 2 * span
            change = 0
            for i in range(span):  # the trailing edge: block(a) - block(b) loses the particle
                other = occupancy[edges[first + i]] - 1
                if other >= 0:
                    change -= 1
                    others[other] -= 1
                    if others[other] == q - 1:
                        touched[n_touched] = other * 6 + 2 + orient[other]
                        n_touched += 1
            for i in range(span, 2 * span):  # the leading edge: block(b) - block(a) gains it
                other = occupancy[edges[first + i]] - 1
                if other >= 0:
                    change += 1
                    others[other] += 1
                    if others[other] == q:
                        touched[n_touched] = other * 6 + 2 + orient[other]
                        n_touched += 1
            others[token] += change  # its block lost the trailing edge and gained the leading one
        for index in range(n_touched):  # _set_class, written out (see the note on class lists)
            changed = touched[index]
            hopper = changed // 6
            direction = changed - hopper * 6 - 2
            if occupancy[neighbours[site[hopper] * 4 + direction]] > 0:
                new = -1  # blocked: rate zero
            elif direction != orient[hopper]:
                new = 2
            else:
                new = 3 if others[hopper] >= q else 1
            old = class_of[changed]
            if old == new:
                continue
            if old >= 0:
                position = slot[changed]
                last = members[old, count[old] - 1]
                members[old, position] = last
                slot[last] = position
                count[old] -= 1
            if new >= 0:
                members[new, count[new]] = changed
                slot[changed] = count[new]
                count[new] += 1
            class_of[changed] = new
        clock[LOG_LIKELIHOOD] += log_rate[chosen_class] - dwell * escape
        clock[TIME] = now + dwell
        out_token[n_events] = token
        out_move[n_events] = move
        out_dwell[n_events] = dwell
        n_events += 1
    return n_events, n_snapshots, False


# ----------------------------------------------------------------------------- FA model
@numba.njit(cache=True)
def _fa_class(site, spin, neighbours, degree):
    """Rate class of a flip: spin * (degree + 1) + up-neighbour count, -1 with no up neighbour."""
    up = 0
    for j in range(degree):
        up += spin[neighbours[site * degree + j]]
    if up == 0:
        return -1
    return spin[site] * (degree + 1) + up


@numba.njit(cache=True)
def _fa_init(spin, neighbours, degree, class_of, slot, members, count):
    for site in range(spin.shape[0]):
        _set_class(site, _fa_class(site, spin, neighbours, degree), class_of, slot, members, count)


@numba.njit(cache=True)
def _fa_run(
    spin, neighbours, degree, class_of, slot, members, count, rate, log_rate,
    rng, clock, t_final, out_token, out_move, out_dwell, snapshot_every, snapshot_time, snapshot_grid,
):  # fmt: skip
    n_events = 0
    n_snapshots = 0
    while n_events < out_token.shape[0]:
        escape = _escape_rate(count, rate)
        dwell = _next_dwell(clock, escape, rng)
        now = clock[TIME]
        if snapshot_every > 0.0:
            while True:
                when = clock[NEXT_SNAPSHOT] * snapshot_every
                if when > t_final or when >= now + dwell:
                    break
                if n_snapshots == snapshot_time.shape[0]:
                    clock[PENDING] = dwell
                    return n_events, n_snapshots, False
                snapshot_grid[n_snapshots].reshape(-1)[:] = spin
                snapshot_time[n_snapshots] = when
                n_snapshots += 1
                clock[NEXT_SNAPSHOT] += 1.0
        if now + dwell > t_final:
            clock[LOG_LIKELIHOOD] -= (t_final - now) * escape
            clock[TIME] = t_final
            return n_events, n_snapshots, True
        site, chosen_class = _pick(rng.random() * escape, count, rate, members)
        spin[site] = 1 - spin[site]
        # The flipped site changes class (its spin) and so does each neighbour (its up count).
        for index in range(degree + 1):
            changed = site if index == degree else neighbours[site * degree + index]
            up = 0
            for j in range(degree):
                up += spin[neighbours[changed * degree + j]]
            new = spin[changed] * (degree + 1) + up if up > 0 else -1
            old = class_of[changed]  # _set_class, written out (see the note on class lists)
            if old == new:
                continue
            if old >= 0:
                position = slot[changed]
                last = members[old, count[old] - 1]
                members[old, position] = last
                slot[last] = position
                count[old] -= 1
            if new >= 0:
                members[new, count[new]] = changed
                slot[changed] = count[new]
                count[new] += 1
            class_of[changed] = new
        clock[LOG_LIKELIHOOD] += log_rate[chosen_class] - dwell * escape
        clock[TIME] = now + dwell
        out_token[n_events] = site
        out_move[n_events] = 0
        out_dwell[n_events] = dwell
        n_events += 1
    return n_events, n_snapshots, False


# ----------------------------------------------------------------------------- driver
@dataclasses.dataclass
class Chunk:
    """Events and snapshots produced by one call into the compiled loop (views, copy to keep)."""

    tokens: np.ndarray
    moves: np.ndarray
    dwell: np.ndarray
    snapshot_times: np.ndarray
    snapshot_grids: np.ndarray
    time: float


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


class CompiledSimulator:
    """Exact simulation of a system's original dynamics from a given configuration.

    ``chunks()`` drains the trajectory in bounded pieces until ``t_final``; afterwards
    ``log_likelihood`` is the exact U of what was produced (tail included) and ``configuration()``
    the final state.
    """

    def __init__(
        self,
        system: System,
        positions: np.ndarray,
        states: np.ndarray,
        rng: np.random.Generator,
        t_final: float,
        snapshot_every: float | None = None,
        chunk_events: int = 1 << 20,
        snapshot_chunk: int | None = None,
    ):
        if not (math.isfinite(t_final) and t_final >= 0):
            raise ValueError(f"t_final: must be a finite time >= 0, got {t_final!r}")
        if snapshot_every is not None and not (math.isfinite(snapshot_every) and snapshot_every > 0):
            raise ValueError(f"snapshot_every: must be a finite time > 0, got {snapshot_every!r}")
        self.system = system
        self.rng = rng
        self.t_final = float(t_final)
        self.snapshot_every = float(snapshot_every or 0.0)
        self.clock = np.array([0.0, -1.0, 0.0, 0.0])
        self.done = False
        self.out_token = np.empty(chunk_events, np.int32)
        self.out_move = np.empty(chunk_events, np.int8)
        self.out_dwell = np.empty(chunk_events, np.float64)
        if snapshot_chunk is None:  # up to 1024 grids per chunk, at most 64 MiB of them on a large lattice
            snapshot_chunk = max(1, min(1024, (64 << 20) // (system.shape[0] * system.shape[1])))
        self.snapshot_time = np.empty(snapshot_chunk if snapshot_every else 0, np.float64)
        self.snapshot_grid = np.empty((len(self.snapshot_time), *system.shape), np.int8)
        if isinstance(system, QuorumSystem):  # before ActiveSystem, of which it is a kind
            self._init_quorum(positions, states)
        elif isinstance(system, ActiveSystem):
            self._init_active(positions, states)
        elif isinstance(system, FASystem):
            self._init_fa(positions, states)
        else:
            raise TypeError(f"no compiled simulator for {type(system).__name__}")

    def _class_lists(self, n_move_ids: int, n_classes: int, rates: list[float]) -> None:
        self.class_of = np.full(n_move_ids, -1, np.int64)
        self.slot = np.zeros(n_move_ids, np.int64)
        self.members = np.zeros((n_classes, n_move_ids), np.int64)
        self.count = np.zeros(n_classes, np.int64)
        self.rate = np.array(rates, np.float64)
        self.log_rate = np.array([_log(rate) for rate in rates], np.float64)

    def _particles(self, positions: np.ndarray, states: np.ndarray) -> None:
        system = self.system
        side = system.L
        self.site = np.ascontiguousarray(positions[:, 1] * side + positions[:, 0], dtype=np.int64)
        self.orient = np.ascontiguousarray(states, dtype=np.int64)
        if len(np.unique(self.site)) != len(self.site):
            raise ValueError(f"positions: two particles on one site; the {system.name} model excludes overlaps")
        self.occupancy = np.zeros(side * side, np.int64)
        self.occupancy[self.site] = np.arange(1, system.N + 1)
        self.neighbours = neighbour_table(system.shape, np.arange(4))

    def _init_active(self, positions: np.ndarray, states: np.ndarray) -> None:
        system = self.system
        self._particles(positions, states)
        self._class_lists(system.N * 6, 3, [system.D, system.v_plus, system.v_other])
        _active_init(self.site, self.orient, self.occupancy, self.neighbours, *self._lists()[:4])

    def _init_quorum(self, positions: np.ndarray, states: np.ndarray) -> None:
        system = self.system
        self._particles(positions, states)
        block = stencil_table(np.array(block_offsets(system.block_side)), system.shape)
        self.edges = block_edges(system.R, system.shape)
        self.others = np.zeros(system.N, np.int64)  # other particles in each particle's block
        self._class_lists(system.N * 6, 4, [system.D, system.v_plus, system.v_other, system.v_crowded])
        state = (self.site, self.orient, self.occupancy, self.neighbours, block, self.others, system.q)
        _quorum_init(*state, *self._lists()[:4])

    def _init_fa(self, positions: np.ndarray, states: np.ndarray) -> None:
        system = self.system
        ly, lx = system.shape
        expected = np.stack([np.arange(lx * ly) % lx, np.arange(lx * ly) // lx], axis=1)
        if positions.shape != expected.shape or not np.array_equal(positions, expected):
            raise ValueError("positions: FA tokens must be the lattice sites in row-major order")
        self.spin = np.ascontiguousarray(states, dtype=np.int64)
        directions = neighbour_directions(system.dim)
        self.neighbours = neighbour_table(system.shape, directions)
        self.degree = most = len(directions)  # classes: spin * (most + 1) + up-neighbour count
        rates = [0.0] * (2 * (most + 1))
        for up in range(1, most + 1):
            rates[up] = up * system.c
            rates[most + 1 + up] = up * (1.0 - system.c)
        self._class_lists(lx * ly, len(rates), rates)
        _fa_init(self.spin, self.neighbours, self.degree, *self._lists()[:4])

    @property
    def time(self) -> float:
        return float(self.clock[TIME])

    @property
    def log_likelihood(self) -> float:
        return float(self.clock[LOG_LIKELIHOOD])

    def escape_rate(self) -> float:
        return float(np.dot(self.count, self.rate))

    def _lists(self) -> tuple[np.ndarray, ...]:
        return self.class_of, self.slot, self.members, self.count, self.rate, self.log_rate

    def configuration(self) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.system, ActiveSystem):
            side = self.system.L
            return np.stack([self.site % side, self.site // side], axis=1), self.orient.astype(np.int8)
        ly, lx = self.system.shape
        sites = np.arange(lx * ly)
        return np.stack([sites % lx, sites // lx], axis=1), self.spin.astype(np.int8)

    def _step(self) -> Chunk:
        outputs = (self.rng, self.clock, self.t_final, self.out_token, self.out_move, self.out_dwell,
                   self.snapshot_every, self.snapshot_time, self.snapshot_grid)  # fmt: skip
        if isinstance(self.system, QuorumSystem):
            state = (self.site, self.orient, self.occupancy, self.neighbours, self.edges, self.others, self.system.q)
            n_events, n_snapshots, self.done = _quorum_run(*state, *self._lists(), *outputs)
        elif isinstance(self.system, ActiveSystem):
            state = (self.site, self.orient, self.occupancy, self.neighbours)
            n_events, n_snapshots, self.done = _active_run(*state, *self._lists(), *outputs)
        else:
            state = (self.spin, self.neighbours, self.degree)
            n_events, n_snapshots, self.done = _fa_run(*state, *self._lists(), *outputs)
        return Chunk(
            self.out_token[:n_events],
            self.out_move[:n_events],
            self.out_dwell[:n_events],
            self.snapshot_time[:n_snapshots],
            self.snapshot_grid[:n_snapshots],
            self.time,
        )

    def chunks(self) -> Iterator[Chunk]:
        """Run to t_final, yielding bounded chunks (their arrays are reused: copy what you keep)."""
        while not self.done:
            yield self._step()
