"""The table engine: exact n-fold-way simulation of any local rate model from an environment table.

    encoder = make_encoder("vn1", system)
    evaluator = PatchEvaluator(model, model_lattice(model, system))
    table = EnvironmentTable(encoder, evaluator.header_for(encoder, identity))
    engine = TableEngine(table, evaluator, system, positions, states, rng, t_final=100.0,
                         snapshot_times=snapshot_grid(100.0, every=1.0), options=EngineOptions())
    for chunk in engine.chunks(): ...          # events and snapshots in bounded chunks (EventLog columns)
    engine.statistics()                        # events, rejections, first sightings, audit

Each token's rates are the table's row for its environment key (``hpcdyn.physics.environments``).
An event is drawn from one of two selection structures (``EngineOptions.selection``): when the
table's rates take few distinct values (Mode 2 class rates, the original rates), rate groups: one
list of candidate moves per distinct rate, a group drawn by its total rate and a member uniformly
(``hpcdyn.simulation.rate_groups``); otherwise a sum tree over tokens holding each token's total
rate (the leaves) and the escape rate (the root): the draw descends the tree to a token and picks
the move within the token's row. Then only the tokens whose key changed are looked up again: the
mover, and every token whose stencil holds the source or the target site of the move (a particle's
hop targets are stencil sites, so its blocked moves are covered too); their exact keys move by one
digit each, O(1) per token. The cost per event is O(stencil) with groups, O(stencil + log
n_tokens) with the tree, on a lattice of any size: the table's rows do not depend on L.

Misses. A key not yet in the table stops the compiled loop right after the event that made it:
the loop returns the missing patches, Python evaluates them in one batched call of the rate model
(``PatchEvaluator``), and the loop resumes with the same random stream where it stopped. The
tokens re-keyed after an event are updated all together or not at all (a miss leaves them queued),
so nothing drawn depends on when the table was filled: a run that meets its keys one by one is
identical, event for event, to a run on a pre-filled table (with either structure, as long as both
choose the same one).

Overlaps (active). A hop onto an occupied site has whatever rate the table gives it (zero for the
original rates, a small learned rate for a transformer). As in ``hpcdyn.simulation.batched``: by
default such a draw is rejected (the clock advances, the configuration stays, the draw is counted
and its dwell folds into the next event's), which is exactly the dynamics without those moves; the
probability mass on such moves at each draw is averaged into ``rejected_mass``. With
``EngineOptions(keep_overlaps=True)`` they are applied: several particles then share a site, whose content (for
keys and snapshots) is the largest 1 + orientation among them.

Audit. A fraction of table lookups (default 0.1 %, a separate random stream) is re-evaluated by the
rate model in the full configuration at the next stop, and the largest |delta log-rate| is reported:
a model that is not local in the family's stencil shows up there.

The running log-likelihood is the path log-likelihood (DESIGN 1.3) of the applied events under the
table's rates: ln W of each applied event minus the time spent in each configuration times its
escape rate (over every candidate move, blocked ones included), tail included.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Iterator

import numba
import numpy as np
import torch

from hpcdyn.physics.environments import (
    check_fits,
    make_encoder,
    stencil_table,
    token_key,
    token_patch,
)
from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, FASystem, System
from hpcdyn.simulation.compiled import Chunk
from hpcdyn.simulation.environment_table import (
    COLLISION,
    EMPTY,
    EnvironmentTable,
    PatchEvaluator,
    find_entry,
    home_slot,
    log_rate_difference,
)
from hpcdyn.simulation.rate_groups import NO_GROUP, RateGroups, distinct_rates
from hpcdyn.storage.environment_tables import CollisionError
from hpcdyn.storage.events import EventLog

# clock (float64): time, dwell drawn but held back (snapshot buffer full; -1 none), dwell of
# rejected draws carried into the next event, log-likelihood, sum over draws of the rejected mass,
# escape rate of moves onto occupied sites (a running sum, made exact again at every call)
TIME, PENDING, CARRIED, LOG_LIKELIHOOD, REJECTED_MASS, BLOCKED_SUM = range(6)
# counters (int64)
(EVENTS, DRAWS, REJECTED, OVERLAP_EVENTS, OUT_EVENTS, OUT_SNAPSHOTS, NEXT_SNAPSHOT, N_PENDING, N_MISSES,
 N_AUDIT, STAMP, AUDIT_COUNTDOWN, OCCUPIED_SITES, LOOKUPS) = range(14)  # fmt: skip
# why the compiled loop returned
DONE, EVENTS_FULL, SNAPSHOTS_FULL, MISSED, AUDIT_FULL, COLLIDED, RUNNING = range(7)

# Array arguments of the compiled functions (passed one by one: arrays unpacked from tuples inside
# the loop cost reference counting at every event):
#   configuration: site, state, head, next_token (the tokens on each site as linked lists: one token
#     per site without overlaps; for fa, token s is site s), count (tokens per site; kept current only
#     with overlaps), grid (each site's content: 0 empty, 1 + state; the spin for fa), entry (each
#     token's table row),
#     token_keys (each token's exact key, kept current by digit deltas), tree (the sum tree), the
#     group arrays (``RateGroups.arrays``; empty when the tree is used, and the tree then one leaf)
#   lattice: stencil_sites [site * S + i] = site + offset_i, reverse_sites = site - offset_i,
#     move_site [site * M + m], move_state [state * M + m], displacing [M], digit_of_content, weights,
#     stencil_steps [S, 2] and move_steps [M, 2] (dx, dy), sides (Lx, Ly): the hot loop computes
#     neighbours from these (``_shifted``), the site tables serve the rest (misses, prefetching)
#   table: direct, slots, keys, checks, rates, log_rates, totals, blocked_totals, sightings
#     (``EnvironmentTable.arrays``)


# ----------------------------------------------------------------------------- sum tree
# An 8-ary sum tree: a node's 8 children fill one 64-byte cache line, so a descent or an update
# touches one line per level (5 levels for 32,768 tokens, against 15 scattered nodes of a binary
# tree: at large sizes the descent's dependent cache misses dominate an event). Levels are stored
# one after another, each starting on a multiple of 8: level l has 8**l nodes; the root (level 0,
# index 0) is the escape rate; the leaves (level ``depth``) are the tokens' total rates. Every sum
# is recomputed from its children, so nothing drifts however many updates it takes.
FANOUT = 8


def sum_tree(n_leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """(tree float64, level offsets int64 [depth + 1]) for at least ``n_leaves`` leaves, all zero."""
    depth = 1
    while FANOUT**depth < n_leaves:
        depth += 1
    sizes = [FANOUT**level for level in range(depth + 1)]
    offsets = np.cumsum([0] + [-(-size // FANOUT) * FANOUT for size in sizes[:-1]])  # 8-aligned starts
    buffer = np.zeros(int(offsets[-1]) + sizes[-1] + FANOUT)
    shift = (-buffer.ctypes.data // 8) % FANOUT  # start on a 64-byte boundary
    return buffer[shift : shift + int(offsets[-1]) + sizes[-1]], offsets.astype(np.int64)


@numba.njit(cache=True, inline="always")
def _site_content(site_index, particles, head, next_token, state):
    """0 empty, else the largest 1 + state on the site (particles); the spin (site tokens)."""
    token = head[site_index]
    if not particles:
        return state[token]
    content = 0
    while token >= 0:
        content = max(content, 1 + state[token])
        token = next_token[token]
    return content


@numba.njit(cache=True, inline="always")
def _shifted(x, y, dx, dy, lx, ly):
    """Flat index of the site (x + dx, y + dy) on the torus (|dx| < lx, |dy| < ly).

    The hot loop computes neighbours instead of reading the site tables: at large lattices those
    tables (megabytes) cost a cache miss per lookup, the arithmetic a few cycles."""
    x += dx
    y += dy
    if x >= lx:
        x -= lx
    elif x < 0:
        x += lx
    if y >= ly:
        y -= ly
    elif y < 0:
        y += ly
    return y * lx + x


@numba.njit(cache=True, inline="always")
def _relink(token, old_site, new_site, head, next_token, count):
    """Move a particle between the sites' token lists; the change in the number of occupied sites."""
    if head[old_site] == token:
        head[old_site] = next_token[token]
    else:
        previous = head[old_site]
        while next_token[previous] != token:
            previous = next_token[previous]
        next_token[previous] = next_token[token]
    next_token[token] = head[new_site]
    head[new_site] = token
    count[old_site] -= 1
    count[new_site] += 1
    return (count[new_site] == 1) - (count[old_site] == 0)


@numba.njit(cache=True, inline="always")
def _audit_gap(audit_rng, log_keep):
    """Lookups until the next audited one: geometric with success probability 1 - exp(log_keep)."""
    if log_keep == 0.0:
        return -1  # audit off
    if log_keep == -np.inf:
        return 1
    return 1 + int(math.log(1.0 - audit_rng.random()) / log_keep)


@numba.njit(cache=True)
def _find_pending(
    site, state, grid, token_keys, stencil_sites, digit_of_content, weights, n_own_states, hashed,
    direct, slots, keys, checks, pending, counters, found_entries, miss_keys, miss_checks, miss_patches,
):  # fmt: skip
    """Table entry of every queued token's key into ``found_entries``; nothing changes yet (the
    first keys, before the selection structure is chosen; ``_run`` resolves its queue the same way).

    All or nothing: when a key is missing, the missing patches are returned (MISSED) and the queue
    is looked up again after the fill, so the selection structure sees the same updates in the same
    order whenever the table was filled (group lists depend on that order, a sum tree does not).
    """
    n_sites = weights.shape[0]
    missing = 0
    for index in range(counters[N_PENDING]):
        token = pending[index]
        if hashed:
            key, check = token_key(grid, stencil_sites, site[token] * n_sites, n_sites, state[token], digit_of_content,
                                   weights, n_own_states, True)  # fmt: skip
        else:
            key, check = token_keys[token], 0
        found = find_entry(direct, slots, keys, checks, key, check)
        if found == COLLISION:
            return COLLIDED
        found_entries[index] = found
        if found == EMPTY:
            miss_keys[missing] = key
            miss_checks[missing] = check
            token_patch(grid, stencil_sites, site[token] * n_sites, n_sites, state[token], digit_of_content, miss_patches[missing])
            missing += 1
    counters[N_MISSES] = missing
    return MISSED if missing else RUNNING


# ----------------------------------------------------------------------------- the loop
@numba.njit(cache=True)
def _snapshot(grid, n_overlapping, slot, when, out_snapshot_time, out_grid, out_overlap):
    for index in range(grid.shape[0]):
        out_grid[slot, index] = grid[index]
    out_overlap[slot] = n_overlapping
    out_snapshot_time[slot] = when


@numba.njit(cache=True)
def _run(
    particles, keep_overlaps, hashed, use_groups, n_own_states, log_keep, audit_capacity, t_final, rng, audit_rng, clock,
    counters, site, state, head, next_token, count, grid, entry, token_keys, tree, tree_offsets,
    entry_group, group_rate, group_order, group_count, members, member_slot,
    stencil_sites, reverse_sites, move_site, move_state, displacing, digit_of_content, weights, stencil_steps, move_steps,
    sides, direct, slots, keys, checks, rates, log_rates, totals, blocked_totals, sightings,
    pending, found_entries, stamp, miss_keys, miss_checks, miss_patches, audit_tokens,
    out_token, out_move, out_dwell, move_counts, snapshot_times, out_snapshot_time, out_grid, out_overlap,
):  # fmt: skip
    """Advance until t_final or a stop (see the status codes); every stop is resumable.

    Each pass: resolve the queue of re-keyed tokens (look every key up, all or nothing, then give each
    token its entry), draw an event, apply it and queue the tokens whose key it changed. The helpers of
    the queue, the draw and the selection structures are written out here: numba increments and
    decrements (atomically) the reference count of every array handed to a helper, inlined or not,
    and with a dozen helpers of ten arrays each that took more than half of an event's time.
    """
    n_moves, n_stencil = displacing.shape[0], weights.shape[0]
    lx, ly = sides[0], sides[1]
    depth = tree_offsets.shape[0] - 1
    direct_table = direct.shape[0] > 0
    # one token per site at most (fa; particles whose hops onto occupied sites are rejected): a hop
    # then goes onto an empty site, and the site lists and counts need no walking (``count`` is kept
    # only with overlaps)
    single = not keep_overlaps
    while True:
        # ---- resolve the queue: every key looked up first (a miss stops here, the queue kept), then applied
        n_pending, missing = counters[N_PENDING], 0
        for index in range(n_pending):
            token = pending[index]
            if hashed:
                key, check = token_key(grid, stencil_sites, site[token] * n_stencil, n_stencil, state[token],
                                       digit_of_content, weights, n_own_states, True)  # fmt: skip
            else:
                key, check = token_keys[token], 0
            if direct_table:
                found = direct[key]
            else:  # ``find_entry``: linear probing from the key's home slot
                mask = slots.shape[0] - 1
                probe = home_slot(key, mask)
                while True:
                    found = slots[probe]
                    if found == EMPTY:
                        break
                    if keys[found] == key:
                        found = found if checks[found] == check else COLLISION
                        break
                    probe = (probe + 1) & mask
            if found == COLLISION:
                return COLLIDED
            found_entries[index] = found
            if found == EMPTY:
                miss_keys[missing] = key
                miss_checks[missing] = check
                token_patch(grid, stencil_sites, site[token] * n_stencil, n_stencil, state[token], digit_of_content,
                            miss_patches[missing])  # fmt: skip
                missing += 1
        counters[N_MISSES] = missing
        if missing:
            return MISSED
        countdown, n_audit, blocked = counters[AUDIT_COUNTDOWN], counters[N_AUDIT], clock[BLOCKED_SUM]
        for index in range(n_pending):
            token, found = pending[index], found_entries[index]
            old = entry[token]
            if old != found:
                entry[token] = found
                if use_groups:  # ``rate_groups`` lists: move the moves whose group changed
                    for move in range(n_moves):
                        old_group = entry_group[old, move] if old >= 0 else NO_GROUP
                        new_group = entry_group[found, move]
                        if old_group == new_group:
                            continue
                        member = token * n_moves + move
                        if old_group >= 0:  # swap-remove: the list's last member takes this one's place
                            position = member_slot[member]
                            last = members[old_group, group_count[old_group] - 1]
                            members[old_group, position] = last
                            member_slot[last] = position
                            group_count[old_group] -= 1
                        if new_group >= 0:
                            members[new_group, group_count[new_group]] = member
                            member_slot[member] = group_count[new_group]
                            group_count[new_group] += 1
                        else:
                            member_slot[member] = -1
                elif tree[tree_offsets[depth] + token] != totals[found]:  # the leaf, its ancestors from their children
                    tree[tree_offsets[depth] + token] = totals[found]
                    node = token
                    for level in range(depth - 1, -1, -1):
                        parent = node // FANOUT
                        first = tree_offsets[level + 1] + parent * FANOUT
                        total = 0.0
                        for child in range(FANOUT):
                            total += tree[first + child]
                        tree[tree_offsets[level] + parent] = total
                        node = parent
                blocked += blocked_totals[found] - (blocked_totals[old] if old >= 0 else 0.0)
            sightings[found] += 1
            countdown -= 1
            if countdown == 0:
                audit_tokens[n_audit] = token
                n_audit += 1
                countdown = _audit_gap(audit_rng, log_keep)
        counters[LOOKUPS] += n_pending
        counters[AUDIT_COUNTDOWN], counters[N_AUDIT], clock[BLOCKED_SUM] = countdown, n_audit, blocked
        counters[N_PENDING] = 0

        # ---- the next draw
        if counters[OUT_EVENTS] == out_token.shape[0]:
            return EVENTS_FULL
        if counters[N_AUDIT] >= audit_capacity:
            return AUDIT_FULL
        if use_groups:  # sum_g count_g * rate_g, by increasing rate
            escape = 0.0
            for index in range(group_order.shape[0]):
                escape += group_count[group_order[index]] * group_rate[group_order[index]]
        else:
            escape = tree[0]
        if clock[PENDING] >= 0.0:
            dwell, clock[PENDING] = clock[PENDING], -1.0
        else:
            dwell = -math.log(1.0 - rng.random()) / escape if escape > 0.0 else np.inf
        now = clock[TIME]
        # snapshots due in [now, now + dwell) show the configuration before this draw
        while counters[NEXT_SNAPSHOT] < snapshot_times.shape[0]:
            when = snapshot_times[counters[NEXT_SNAPSHOT]]
            if when > t_final or when >= now + dwell:
                break
            if counters[OUT_SNAPSHOTS] == out_snapshot_time.shape[0]:
                clock[PENDING] = dwell
                return SNAPSHOTS_FULL
            overlapping = site.shape[0] - counters[OCCUPIED_SITES] if particles else 0
            _snapshot(grid, overlapping, counters[OUT_SNAPSHOTS], when, out_snapshot_time, out_grid, out_overlap)
            counters[OUT_SNAPSHOTS] += 1
            counters[NEXT_SNAPSHOT] += 1
        if now + dwell > t_final:
            clock[LOG_LIKELIHOOD] -= (t_final - now) * escape
            clock[TIME] = t_final
            return DONE
        r = rng.random() * escape
        if use_groups:  # a group by its weight, then a member uniformly; rounding at the top: the last member
            member, last = -1, -1
            for index in range(group_order.shape[0]):
                group = group_order[index]
                weight = group_count[group] * group_rate[group]
                if weight <= 0.0:
                    continue
                last = group
                if r < weight:
                    member = members[group, min(int(r / group_rate[group]), group_count[group] - 1)]
                    break
                r -= weight
            if member < 0:
                member = members[last, group_count[last] - 1]
            token = member // n_moves
            move = member - token * n_moves
        else:  # down the sum tree to a token (rounding: the last live child), then the move within its row
            node = 0
            for level in range(1, depth + 1):
                first = tree_offsets[level] + node * FANOUT
                chosen, last = -1, -1
                for child in range(FANOUT):
                    weight = tree[first + child]
                    if weight <= 0.0:
                        continue
                    last = child
                    if r < weight:
                        chosen = child
                        break
                    r -= weight
                if chosen < 0:
                    chosen = last
                    r = tree[first + last]
                node = node * FANOUT + chosen
            token, move = node, -1
            for candidate in range(n_moves):
                weight = rates[entry[token], candidate]
                if weight <= 0.0:
                    continue
                move = candidate
                if r < weight:
                    break
                r -= weight
        counters[DRAWS] += 1
        clock[LOG_LIKELIHOOD] -= dwell * escape
        clock[TIME] = now + dwell
        old_site = site[token]
        new_site = _shifted(old_site % lx, old_site // lx, move_steps[move, 0], move_steps[move, 1], lx, ly)
        onto_occupied = False
        if particles:
            clock[REJECTED_MASS] += clock[BLOCKED_SUM] / escape
            onto_occupied = new_site != old_site and grid[new_site] != 0  # a particle's content is 1 + state
        if onto_occupied and not keep_overlaps:
            counters[REJECTED] += 1
            clock[CARRIED] += dwell  # the time of a rejected draw folds into the next event's dwell
            continue
        counters[OVERLAP_EVENTS] += onto_occupied
        clock[LOG_LIKELIHOOD] += log_rates[entry[token], move]
        out = counters[OUT_EVENTS]
        out_token[out], out_move[out], out_dwell[out] = token, move, dwell + clock[CARRIED]
        clock[CARRIED] = 0.0
        counters[OUT_EVENTS] += 1
        counters[EVENTS] += 1
        move_counts[move] += 1

        # ---- apply: the mover's state, lists and the sites' contents
        state[token] = move_state[state[token] * n_moves + move]
        before_old, before_new = grid[old_site], grid[new_site]
        if new_site != old_site:
            site[token] = new_site
            if single:  # onto an empty site: the token alone there, its old site empty
                head[old_site], head[new_site] = -1, token
                grid[new_site], grid[old_site] = 1 + state[token], 0
            else:
                counters[OCCUPIED_SITES] += _relink(token, old_site, new_site, head, next_token, count)
                grid[new_site] = _site_content(new_site, particles, head, next_token, state)
                grid[old_site] = _site_content(old_site, particles, head, next_token, state)
        elif single:  # alone on its site: the content is its own
            grid[old_site] = 1 + state[token] if particles else state[token]
        else:
            grid[old_site] = _site_content(old_site, particles, head, next_token, state)
        # ---- queue every token whose key changed: a changed site's digit moves the key of each token
        # whose stencil holds it (the token at site - offset_i sees it as digit i) by delta * base**i,
        # O(1) per token; the new site first, then the old one (the group lists follow queue order)
        mark = counters[STAMP] + 1
        counters[STAMP] = mark
        n_pending = 0
        for which in range(2):
            if which == 0 and new_site == old_site:
                continue
            changed, before = (new_site, before_new) if which == 0 else (old_site, before_old)
            after = grid[changed]
            if after == before:
                continue
            x, y = changed % lx, changed // lx
            for i in range(n_stencil):
                # each column has its digit map (a counted block's columns see occupancy only)
                delta = (digit_of_content[i, after] - digit_of_content[i, before]) * n_own_states
                if delta == 0:
                    continue
                watcher = head[_shifted(x, y, -stencil_steps[i, 0], -stencil_steps[i, 1], lx, ly)]
                while watcher >= 0:
                    if not hashed:
                        token_keys[watcher] += delta * weights[i]
                    if stamp[watcher] != mark:
                        stamp[watcher] = mark
                        pending[n_pending] = watcher
                        n_pending += 1
                    # one token per site: its next is never read (a cache miss less at large lattices)
                    watcher = -1 if single else next_token[watcher]
        if not hashed:  # the mover's key, whole
            x, y = new_site % lx, new_site // lx
            code = 0
            for i in range(n_stencil):
                code += digit_of_content[i, grid[_shifted(x, y, stencil_steps[i, 0], stencil_steps[i, 1], lx, ly)]] * weights[i]
            token_keys[token] = state[token] + n_own_states * code
        if stamp[token] != mark:
            stamp[token] = mark
            pending[n_pending] = token
            n_pending += 1
        counters[N_PENDING] = n_pending


@numba.njit(cache=True)
def _build_configuration(particles, hashed, n_own_states, site, state, head, next_token, count, grid, token_keys,
                         stencil_sites, digit_of_content, weights):  # fmt: skip
    """Token lists (in token order), counts, contents and exact keys of a configuration; occupied sites."""
    for token in range(site.shape[0] - 1, -1, -1):
        next_token[token] = head[site[token]]
        head[site[token]] = token
        count[site[token]] += 1
    occupied = 0
    for index in range(grid.shape[0]):
        occupied += count[index] > 0
        if count[index] > 0:
            grid[index] = _site_content(index, particles, head, next_token, state)
    if not hashed:
        n_sites = weights.shape[0]
        for token in range(site.shape[0]):
            token_keys[token] = token_key(grid, stencil_sites, site[token] * n_sites, n_sites, state[token],
                                          digit_of_content, weights, n_own_states, False)[0]  # fmt: skip
    return occupied


# ----------------------------------------------------------------------------- prefetching
@numba.njit(cache=True, inline="always")
def _remember(key, seen):
    """Add a key to an open-addressing set (-1 empty); False if it was there already."""
    mask = seen.shape[0] - 1
    slot = (key * 0x9E3779B97F4A7C15 >> 20) & mask
    while seen[slot] != -1:
        if seen[slot] == key:
            return False
        slot = (slot + 1) & mask
    seen[slot] = key
    return True


@numba.njit(cache=True)
def _collect_miss(token, n_found, hashed, n_own_states, site, state, grid, stencil_sites, digit_of_content, weights,
                  direct, slots, keys, checks, seen, out_patches):  # fmt: skip
    """Write the patch of a token whose key is neither in the table nor collected yet."""
    n_sites = weights.shape[0]
    if n_found >= out_patches.shape[0]:
        return n_found
    first = site[token] * n_sites
    key, check = token_key(grid, stencil_sites, first, n_sites, state[token], digit_of_content, weights, n_own_states, hashed)
    if find_entry(direct, slots, keys, checks, key, check) != EMPTY or not _remember(key, seen):
        return n_found
    token_patch(grid, stencil_sites, first, n_sites, state[token], digit_of_content, out_patches[n_found])
    return n_found + 1


@numba.njit(cache=True)
def _one_event_ahead(
    particles, keep_overlaps, hashed, n_own_states, site, state, head, next_token, count, grid, entry, rates,
    stencil_sites, reverse_sites, move_site, move_state, displacing, digit_of_content, weights, stencil_steps, move_steps,
    sides, direct, slots, keys, checks, seen, out_patches, least_rate,
):  # fmt: skip
    """Patches of the keys one likely event away from this configuration and not in the table.

    Likely: a move with a rate of at least ``least_rate`` (any move of a token whose own key is not
    in the table yet). Each such move is applied in place, the keys it changes are collected, and
    the move is undone; the configuration ends as it began (up to the order of tokens sharing a
    site). Stops when ``out_patches`` is full: prefetching is only a shortcut, the loop still stops
    at any miss.
    """
    n_moves, n_sites = displacing.shape[0], weights.shape[0]
    found = 0
    for token in range(site.shape[0]):
        for move in range(n_moves):
            if entry[token] >= 0 and rates[entry[token], move] < least_rate:
                continue
            old_site, old_state = site[token], state[token]
            new_site = move_site[old_site * n_moves + move]
            if particles and new_site != old_site and grid[new_site] != 0 and not keep_overlaps:
                continue  # rejected if drawn: changes nothing
            if found >= out_patches.shape[0]:
                return found
            before_old, before_new = grid[old_site], grid[new_site]
            state[token] = move_state[old_state * n_moves + move]
            if new_site != old_site:
                _relink(token, old_site, new_site, head, next_token, count)
                site[token] = new_site
                grid[new_site] = _site_content(new_site, particles, head, next_token, state)
            grid[old_site] = _site_content(old_site, particles, head, next_token, state)
            found = _collect_miss(token, found, hashed, n_own_states, site, state, grid, stencil_sites, digit_of_content,
                                  weights, direct, slots, keys, checks, seen, out_patches)  # fmt: skip
            for which in range(1 if new_site == old_site else 2):
                changed = old_site if which == 0 else new_site
                for i in range(n_sites):
                    neighbour = head[reverse_sites[changed * n_sites + i]]
                    while neighbour >= 0:
                        found = _collect_miss(neighbour, found, hashed, n_own_states, site, state, grid, stencil_sites,
                                              digit_of_content, weights, direct, slots, keys, checks, seen, out_patches)  # fmt: skip
                        neighbour = next_token[neighbour]
            if new_site != old_site:
                _relink(token, new_site, old_site, head, next_token, count)
                site[token] = old_site
            grid[old_site], grid[new_site] = before_old, before_new
            state[token] = old_state
    return found


# ----------------------------------------------------------------------------- driver
PREFETCH = ("auto", "space", "step", "none")
SELECTIONS = ("auto", "groups", "tree")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the table engine runs; validated, and recorded beside what it produces.

    prefetch: what a miss fills besides the missing keys. "space": every key of the family (small
    exact families, up to ``space_limit`` keys: vn1 has 2,500); "step": the keys one likely event
    away from the configuration at the miss (moves at least as fast as the average move, at most
    ``step_limit`` patches); "none": only the missing keys; "auto": "space" when the key space is
    at most ``space_limit``, else "step". Prefetching changes what the table holds, never the
    trajectory.

    selection: how an event is drawn. "groups": one list of candidate moves per distinct rate
    (``hpcdyn.simulation.rate_groups``); "tree": a sum tree over tokens; "auto": "groups" when the
    table's rates take at most ``group_limit`` distinct positive values once every token's first key
    is in it (class rates of Mode 2, the original rates) and the lattice holds at most
    ``group_token_limit`` tokens, else "tree". Beyond that the group lists (4 bytes per group, token and
    move) outgrow the caches and the tree's 8-wide levels cost fewer misses (benchmarks/RESULTS.md,
    table-engine: 32,768 tokens, tree 1.38 M/s against groups 1.06; 112 and 450 tokens, groups as fast
    or faster). Both are exact; the choice is
    made once per run (a run that meets new rates later keeps its structure: groups stay exact with
    more groups, only slower).
    """

    keep_overlaps: bool = False  # apply hops onto occupied sites instead of rejecting them (active)
    audit_fraction: float = 1e-3  # fraction of lookups re-evaluated in the full configuration
    audit_seed: int = 0  # the audit's own random stream: auditing never changes the trajectory
    audit_capacity: int = 4096  # audited lookups gathered before one full-configuration call
    prefetch: str = "auto"
    space_limit: int = 1 << 15
    step_limit: int = 4096  # patches one "step" prefetch collects at most
    selection: str = "auto"
    group_limit: int = 16  # "auto" takes groups up to this many distinct rates
    group_token_limit: int = 4096  # and up to this many tokens
    chunk_events: int = 1 << 20
    snapshot_chunk: int = 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.audit_fraction, (int, float)) and 0 <= self.audit_fraction <= 1):
            raise ConfigurationError(f"audit_fraction: must be in [0, 1], got {self.audit_fraction!r}")
        if self.prefetch not in PREFETCH:
            raise ConfigurationError(f"prefetch: must be one of {PREFETCH}, got {self.prefetch!r}")
        if self.selection not in SELECTIONS:
            raise ConfigurationError(f"selection: must be one of {SELECTIONS}, got {self.selection!r}")
        for name in ("audit_capacity", "space_limit", "step_limit", "chunk_events", "snapshot_chunk", "group_limit",
                     "group_token_limit"):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigurationError(f"{name}: must be an integer >= 1, got {value!r}")

    def selection_for(self, rates: np.ndarray, n_tokens: int) -> str:
        """The structure for a table whose rows so far are ``rates`` [K, M], on ``n_tokens`` tokens."""
        if self.selection != "auto":
            return self.selection
        few = len(distinct_rates(rates)) <= self.group_limit and n_tokens <= self.group_token_limit
        return "groups" if few else "tree"

    def prefetch_for(self, encoder) -> str:
        if self.prefetch != "auto":
            return self.prefetch
        return "space" if not encoder.hashed and encoder.key_space <= self.space_limit else "step"


@dataclasses.dataclass
class TableChunk(Chunk):
    """A compiled-simulator ``Chunk`` plus the overlaps of each snapshot (views: copy to keep)."""

    snapshot_overlaps: np.ndarray


@dataclasses.dataclass(frozen=True)
class EngineStatistics:
    """What a run did, besides its events: rejections, misses, the audit."""

    events: int  # events applied
    draws: int  # events drawn before t_final (applied + rejected)
    rejected: int  # draws of a move onto an occupied site, rejected
    overlap_events: int  # such draws applied (keep_overlaps)
    rejected_mass: float  # mean over draws of the probability on moves onto occupied sites
    move_counts: np.ndarray  # int64 [n_moves]: events applied per move
    lookups: int  # table lookups (re-keyed tokens)
    first_sightings: int  # distinct keys this run saw first (in the table unseen, or not in it yet)
    misses: int  # keys the loop stopped at, not yet in the table (fewer with prefetching)
    keys_filled: int  # keys added to the table by this run (misses and prefetched keys)
    fill_calls: int  # stops to fill missing keys
    fill_seconds: float  # wall time spent filling them (rate-model calls and prefetching)
    audited: int  # lookups re-evaluated in the full configuration
    audit_largest_difference: float  # largest |delta log-rate| found by the audit (nan: nothing audited)

    def as_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["move_counts"] = self.move_counts.tolist()
        return values


@dataclasses.dataclass
class TableRun:
    """A whole run in memory (``TableEngine.run``)."""

    events: EventLog
    snapshot_times: np.ndarray
    snapshot_grids: np.ndarray  # int8 [S, Ly, Lx]
    snapshot_overlaps: np.ndarray  # int32 [S]
    statistics: EngineStatistics
    final_positions: np.ndarray
    final_states: np.ndarray


def _default_audit_model(evaluator: PatchEvaluator, system: System):
    """The evaluator's model, when it runs on this lattice (a transformer only runs on its training size)."""
    return evaluator.model if evaluator.lattice.shape == system.shape else None


class TableEngine:
    """Exact simulation of a rate model through its environment table, from a given configuration.

    ``table`` may be empty, partly or wholly filled; ``evaluator`` fills what is missing (and
    several engines may share one table). ``chunks()`` drains the run in bounded pieces until
    ``t_final``; ``statistics()``, ``log_likelihood`` and ``configuration()`` describe what it
    produced. ``snapshot_times``: sorted times in [0, t_final] (``batched.snapshot_grid``).
    ``audit_model`` (default: the evaluator's model when it runs on this lattice, else none)
    re-evaluates a fraction of the lookups in the full configuration.
    """

    def __init__(
        self,
        table: EnvironmentTable,
        evaluator: PatchEvaluator,
        system: System,
        positions: np.ndarray,
        states: np.ndarray,
        rng: np.random.Generator,
        t_final: float,
        snapshot_times: np.ndarray | None = None,
        options: EngineOptions = EngineOptions(),
        audit_model=dataclasses.MISSING,
    ):
        _check_inputs(table, system, t_final)
        self.table, self.evaluator, self.system, self.options = table, evaluator, system, options
        self.rng, self.audit_rng = rng, np.random.default_rng(options.audit_seed)
        self.t_final = float(t_final)
        self.audit_model = _default_audit_model(evaluator, system) if audit_model is dataclasses.MISSING else audit_model
        self.log_keep = math.log1p(-options.audit_fraction) if options.audit_fraction < 1 else -math.inf
        self.particles = isinstance(system, ActiveSystem)
        self.prefetch = options.prefetch_for(table.encoder)
        self.done = False
        self.lattice = _lattice_tables(table.encoder, system)
        self._configure(np.asarray(positions, np.int64), np.asarray(states, np.int64))
        self._buffers(snapshot_times)
        self.fill_calls, self.fill_seconds, self.misses, self.keys_filled = 0, 0.0, 0, 0
        self.unseen_at_start = np.flatnonzero(table.sightings[: table.size] == 0)
        self.size_at_start = table.size
        self.audited, self.audit_largest = 0, math.nan

    def _configure(self, positions: np.ndarray, states: np.ndarray) -> None:
        ly, lx = self.system.shape
        sites = positions[:, 1] * lx + positions[:, 0]
        if isinstance(self.system, FASystem) and not np.array_equal(sites, np.arange(lx * ly)):
            raise ValueError("positions: FA tokens must be the lattice sites in row-major order")
        if self.particles and not self.options.keep_overlaps and len(np.unique(sites)) != len(sites):
            raise ValueError("positions: two particles on one site; pass keep_overlaps=True to allow it")
        n_tokens, encoder = len(states), self.table.encoder
        # int32 token and site arrays, int8 contents: at large lattices an event is bound by memory
        # latency, and narrower arrays keep more of the lattice in cache
        self.site, self.state = sites.astype(np.int32), (states.astype(np.int64) % self.system.n_states).astype(np.int32)
        self.head, self.next_token = np.full(lx * ly, -1, np.int32), np.full(n_tokens, -1, np.int32)
        self.count, self.grid = np.zeros(lx * ly, np.int32), np.zeros(lx * ly, np.int8)
        self.token_keys = np.zeros(n_tokens, np.int64)  # exact keys: kept current by digit deltas
        stencil_sites, digits, weights = self.lattice[0], self.lattice[5], self.lattice[6]
        occupied = _build_configuration(self.particles, encoder.hashed, encoder.n_own_states, self.site, self.state,
                                        self.head, self.next_token, self.count, self.grid, self.token_keys,
                                        stencil_sites, digits, weights)  # fmt: skip
        self.entry = np.full(n_tokens, -1, np.int32)
        self.selection = None  # chosen once every token's first key is in the table (``_choose_selection``)
        self.tree, self.tree_offsets = sum_tree(1)
        self.groups = RateGroups(0, self.system.n_moves)
        self.found_entries = np.zeros(n_tokens, np.int32)
        self.clock = np.array([0.0, -1.0, 0.0, 0.0, 0.0, 0.0])
        self.counters = np.zeros(14, np.int64)
        self.counters[OCCUPIED_SITES] = occupied
        self.counters[AUDIT_COUNTDOWN] = _audit_gap(self.audit_rng, self.log_keep)
        self.pending = np.arange(n_tokens, dtype=np.int32)  # every token needs its first key
        self.counters[N_PENDING] = n_tokens
        self.stamp = np.full(n_tokens, -1, np.int64)

    def _buffers(self, snapshot_times) -> None:
        options, n_tokens = self.options, len(self.site)
        sites = self.system.shape[0] * self.system.shape[1]
        self.miss_keys, self.miss_checks = np.zeros(n_tokens, np.int64), np.zeros(n_tokens, np.int64)
        self.miss_patches = np.zeros((n_tokens, self.table.encoder.patch_width), np.int8)
        self.audit_tokens = np.zeros(options.audit_capacity + n_tokens, np.int64)  # one event may add n_tokens
        self.out_token = np.empty(options.chunk_events, np.int32)
        self.out_move = np.empty(options.chunk_events, np.int8)
        self.out_dwell = np.empty(options.chunk_events, np.float64)
        self.move_counts = np.zeros(self.system.n_moves, np.int64)
        times = np.zeros(0) if snapshot_times is None else np.asarray(snapshot_times, np.float64)
        if len(times) and (np.any(np.diff(times) < 0) or times[0] < 0):
            raise ConfigurationError("snapshot_times: must be sorted times >= 0 (see batched.snapshot_grid)")
        self.snapshot_times = times
        capacity = options.snapshot_chunk if len(times) else 0
        self.out_snapshot_time = np.empty(capacity)
        self.out_grid = np.empty((capacity, sites), np.int8)
        self.out_overlap = np.empty(capacity, np.int32)

    # ------------------------------------------------------------------------- running
    def _choose_selection(self) -> int:
        """Before the first event: find every token's first key (MISSED until all are in the table),
        then choose the selection structure from the table's rates so far."""
        table, encoder = self.table.arrays(), self.table.encoder
        status = _find_pending(self.site, self.state, self.grid, self.token_keys, self.lattice[0], self.lattice[5],
                               self.lattice[6], encoder.n_own_states, encoder.hashed, *table[:4], self.pending,
                               self.counters, self.found_entries, self.miss_keys, self.miss_checks, self.miss_patches)  # fmt: skip
        if status != RUNNING:
            return status
        self.selection = self.options.selection_for(self.table.rates[: self.table.size], len(self.site))
        if self.selection == "groups":
            self.groups = RateGroups(len(self.site), self.system.n_moves)
        else:
            self.tree, self.tree_offsets = sum_tree(len(self.site))
        return RUNNING

    def _call(self) -> int:
        if self.selection is None and (status := self._choose_selection()) != RUNNING:
            return status
        use_groups = self.selection == "groups"
        if use_groups:
            self.groups.map_rows(self.table.rates[: self.table.size])
        table = self.table.arrays()  # fetched each call: a fill may have grown them
        blocked_totals, known = table[7], self.entry >= 0
        self.clock[BLOCKED_SUM] = blocked_totals[self.entry[known]].sum()  # the running sum, exact again
        encoder = self.table.encoder
        return _run(
            self.particles, self.options.keep_overlaps, encoder.hashed, use_groups, encoder.n_own_states, self.log_keep,
            self.options.audit_capacity, self.t_final, self.rng, self.audit_rng, self.clock, self.counters,
            self.site, self.state, self.head, self.next_token, self.count, self.grid, self.entry, self.token_keys,
            self.tree, self.tree_offsets, *self.groups.arrays(),
            *self.lattice, *table,
            self.pending, self.found_entries, self.stamp, self.miss_keys, self.miss_checks, self.miss_patches,
            self.audit_tokens,
            self.out_token, self.out_move, self.out_dwell, self.move_counts, self.snapshot_times,
            self.out_snapshot_time, self.out_grid, self.out_overlap,
        )  # fmt: skip

    def _fill_misses(self) -> None:
        """Fill the keys the loop stopped at, and what the prefetch policy adds, in one batched call."""
        begin = time.perf_counter()
        missing = self.miss_patches[: self.counters[N_MISSES]]
        self.misses += len(np.unique(self.miss_keys[: self.counters[N_MISSES]]))
        before = self.table.size
        if self.prefetch == "space":
            self.table.fill_all(self.evaluator, self.options.space_limit)
        if self.prefetch == "step":
            missing = np.concatenate([missing, self._one_event_ahead()])
        self.table.fill(self.evaluator, missing)
        self.keys_filled += self.table.size - before
        self.fill_calls += 1
        self.fill_seconds += time.perf_counter() - begin

    def _one_event_ahead(self) -> np.ndarray:
        """Patches one likely event away: moves at least as fast as the average move."""
        encoder = self.table.encoder
        direct, slots, keys, checks, rates = self.table.arrays()[:5]
        limit = self.options.step_limit
        seen = np.full(1 << (2 * limit - 1).bit_length(), -1, np.int64)
        patches = np.zeros((limit, encoder.patch_width), np.int8)
        average = self.escape_rate() / (len(self.site) * self.system.n_moves)
        found = _one_event_ahead(
            self.particles, self.options.keep_overlaps, encoder.hashed, encoder.n_own_states, self.site, self.state,
            self.head, self.next_token, self.count, self.grid, self.entry, rates, *self.lattice,
            direct, slots, keys, checks, seen, patches, average,
        )  # fmt: skip
        return patches[:found]

    def _audit(self) -> None:
        count = int(self.counters[N_AUDIT])
        self.counters[N_AUDIT] = 0
        if count == 0 or self.audit_model is None:
            return
        tokens = np.unique(self.audit_tokens[:count])
        positions, states = self.configuration()
        with torch.inference_mode():
            full = self.audit_model(torch.as_tensor(positions)[None], torch.as_tensor(states, dtype=torch.long)[None])
        model_values = full[0, torch.as_tensor(tokens)].double().cpu().numpy()
        table_values = self.table.log_rates[self.entry[tokens]]
        largest = float(log_rate_difference(table_values, model_values).max())
        self.audit_largest = largest if math.isnan(self.audit_largest) else max(self.audit_largest, largest)
        self.audited += len(tokens)

    def _chunk(self) -> TableChunk:
        events, snapshots = int(self.counters[OUT_EVENTS]), int(self.counters[OUT_SNAPSHOTS])
        self.counters[OUT_EVENTS] = self.counters[OUT_SNAPSHOTS] = 0
        grids = self.out_grid[:snapshots].reshape(snapshots, *self.system.shape)
        return TableChunk(self.out_token[:events], self.out_move[:events], self.out_dwell[:events],
                          self.out_snapshot_time[:snapshots], grids, self.time, self.out_overlap[:snapshots])  # fmt: skip

    def chunks(self) -> Iterator[TableChunk]:
        """Run to t_final, yielding bounded chunks (their arrays are reused: copy what you keep)."""
        while not self.done:
            status = self._call()
            if status == MISSED:
                self._fill_misses()
            elif status == COLLIDED:
                raise CollisionError(f"key family {self.table.encoder.name!r}: a hashed key stands for two environments")
            elif status == AUDIT_FULL:
                self._audit()
            else:
                self._audit()
                self.done = status == DONE
                yield self._chunk()

    def run(self) -> TableRun:
        """Drain the whole run into memory (short runs, tests)."""
        initial_positions, initial_states = self.configuration()
        parts: list[list[np.ndarray]] = [[] for _ in range(6)]
        for chunk in self.chunks():
            columns = (chunk.tokens, chunk.moves, chunk.dwell, chunk.snapshot_times, chunk.snapshot_grids, chunk.snapshot_overlaps)
            for buffer, array in zip(parts, columns):
                buffer.append(array.copy())
        tokens, moves, dwell, times, grids, overlaps = (np.concatenate(buffer) for buffer in parts)
        log = EventLog(self.system, self.t_final, initial_positions, initial_states, tokens, moves, dwell, self.log_likelihood)
        final_positions, final_states = self.configuration()
        return TableRun(log, times, grids, overlaps, self.statistics(), final_positions, final_states)

    # ------------------------------------------------------------------------- results
    @property
    def time(self) -> float:
        return float(self.clock[TIME])

    @property
    def log_likelihood(self) -> float:
        return float(self.clock[LOG_LIKELIHOOD])

    def escape_rate(self) -> float:
        return self.groups.escape_rate() if self.selection == "groups" else float(self.tree[0])

    def configuration(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions int64 [T, 2] and states int8 [T] now."""
        lx = self.system.shape[1]
        sites = self.site.astype(np.int64)
        return np.stack([sites % lx, sites // lx], axis=1), self.state.astype(np.int8)

    def _first_sightings(self) -> int:
        sightings = self.table.sightings
        added = sightings[self.size_at_start : self.table.size]
        return int((sightings[self.unseen_at_start] > 0).sum() + (added > 0).sum())

    def statistics(self) -> EngineStatistics:
        counters, draws = self.counters, int(self.counters[DRAWS])
        return EngineStatistics(
            events=int(counters[EVENTS]),
            draws=draws,
            rejected=int(counters[REJECTED]),
            overlap_events=int(counters[OVERLAP_EVENTS]),
            rejected_mass=float(self.clock[REJECTED_MASS]) / max(draws, 1),
            move_counts=self.move_counts.copy(),
            lookups=int(counters[LOOKUPS]),
            first_sightings=self._first_sightings(),
            misses=self.misses,
            keys_filled=self.keys_filled,
            fill_calls=self.fill_calls,
            fill_seconds=self.fill_seconds,
            audited=self.audited,
            audit_largest_difference=self.audit_largest,
        )


def _check_inputs(table: EnvironmentTable, system: System, t_final: float) -> None:
    if not (math.isfinite(t_final) and t_final >= 0):
        raise ConfigurationError(f"t_final: must be a finite time >= 0, got {t_final!r}")
    if table.encoder.system != system.name:
        raise ConfigurationError(f"table: its keys are for system {table.encoder.system!r}, not {system.name!r}")
    if table.encoder.offsets != _encoder(table.encoder.family, system).offsets:
        raise ConfigurationError(f"table: its stencil is for a lattice of another dimension than {system.shape}")
    if table.n_moves != system.n_moves:
        raise ConfigurationError(f"table: {table.n_moves} moves per token, system {system.name!r} has {system.n_moves}")
    check_fits(table.encoder, system.shape)


_encoder = functools.lru_cache(maxsize=32)(make_encoder)


@functools.lru_cache(maxsize=32)
def _lattice_tables(encoder, system: System) -> tuple[np.ndarray, ...]:
    """Site tables, so the compiled loop never takes a modulo (the ``lattice`` arguments; read-only,
    shared by every engine on the same lattice)."""
    shape, steps = system.shape, system.move_table
    states = np.arange(system.n_states)[:, None]
    return (  # int32 site tables: half the cache lines of int64 (large lattices are bound by memory latency)
        stencil_table(encoder.offset_array, shape).astype(np.int32),  # site + offset_i at [site * S + i]
        stencil_table(-encoder.offset_array, shape).astype(np.int32),  # site - offset_i: the token that sees it as digit i
        stencil_table(steps[:, :2], shape).astype(np.int32),  # where move m takes a token: [site * M + m]
        ((states + steps[:, 2]) % system.n_states).reshape(-1),  # its new state: [state * M + m]
        (steps[:, :2] != 0).any(1),  # moves that change a position
        encoder.digit_array,
        encoder.weights,
        # the same neighbours by arithmetic, for the hot loop: steps (dx, dy) of the stencil and the moves, (Lx, Ly)
        np.asarray(encoder.offset_array, np.int64).reshape(-1, 2),
        np.ascontiguousarray(steps[:, :2], np.int64),
        np.array([shape[1], shape[0]], np.int64),
    )
