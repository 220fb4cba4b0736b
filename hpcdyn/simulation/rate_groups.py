"""Rate groups: the table engine's selection structure for tables with few distinct rates.

When a table's rates take few distinct values (a Mode 2 model's class rates; the original active
rates D, v_plus, v_other), every candidate move (token, move) with a positive rate sits in the list
of its rate's group, as in the compiled simulator's class lists:

    escape rate R = sum_g count_g * rate_g                     (exact: counts are integers)
    event: a group with probability count_g * rate_g / R, then a member uniformly

A token whose table row changes moves only those of its moves whose group changed (swap-remove from
the old list through a position index, append to the new one): O(n_moves) per re-keyed token,
O(1) per draw for a fixed number of groups. The draw and the moves between lists are written out in
the table engine's compiled loop (``table_engine._run``: numba counts references to every array
handed to a helper, which cost more than the work); this module builds and grows the arrays. A sum tree over tokens costs O(log n_tokens) dependent
memory reads per draw and per update; at large lattices those are cache misses.

Arrays (``RateGroups``): ``rate`` float64 [G] (group ids in order of first appearance), ``order``
int64 [G] (ids by increasing rate: the order draws scan, so a table filled in another order draws
the same trajectory), ``count`` int64 [G], ``members`` int32 [G, n_tokens * n_moves] (entries
token * n_moves + move), ``slot`` int32 [n_tokens * n_moves] (a member's index in its list),
``entry_group`` int64 [table rows, n_moves] (group of each table row's move, -1 for rate 0).
"""

from __future__ import annotations

import numba
import numpy as np

NO_GROUP = -1


def distinct_rates(rates: np.ndarray) -> np.ndarray:
    """Sorted distinct positive values of a table's rates float64 [K, M]."""
    values = np.unique(rates)
    return values[values > 0]


class RateGroups:
    """Group lists of one engine's tokens; group ids stay fixed as the table grows (new rates: new groups)."""

    def __init__(self, n_tokens: int, n_moves: int):
        self.n_moves = n_moves
        self.rate = np.zeros(0)
        self.order = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.int64)
        self.members = np.zeros((0, n_tokens * n_moves), np.int32)
        self.slot = np.full(n_tokens * n_moves, -1, np.int32)
        self.entry_group = np.full((0, n_moves), NO_GROUP, np.int64)

    def map_rows(self, rates: np.ndarray) -> None:
        """Give the table's rows not mapped yet (``rates`` [size, M], the table's first rows) their groups."""
        mapped = len(self.entry_group)
        new = rates[mapped:]
        if not len(new):
            return
        values = distinct_rates(new)
        fresh = values[~np.isin(values, self.rate)]
        if len(fresh):
            self._add_groups(fresh)
        ids = np.full(new.shape, NO_GROUP, np.int64)
        positive = new > 0
        by_value = np.argsort(self.rate)
        ids[positive] = by_value[np.searchsorted(self.rate[by_value], new[positive])]
        self.entry_group = np.concatenate([self.entry_group, ids])

    def _add_groups(self, values: np.ndarray) -> None:
        self.rate = np.concatenate([self.rate, values])
        self.order = np.argsort(self.rate, kind="stable").astype(np.int64)
        self.count = np.concatenate([self.count, np.zeros(len(values), np.int64)])
        extra = np.zeros((len(values), self.members.shape[1]), np.int32)
        self.members = np.concatenate([self.members, extra])

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(entry_group, rate, order, count, members, slot) for the compiled loop; fetch again after ``map_rows``."""
        return self.entry_group, self.rate, self.order, self.count, self.members, self.slot

    def escape_rate(self) -> float:
        return float(escape_rate(self.rate, self.order, self.count))


@numba.njit(cache=True, inline="always")
def escape_rate(rate, order, count):
    """sum_g count_g * rate_g, summed by increasing rate."""
    total = 0.0
    for index in range(order.shape[0]):
        group = order[index]
        total += count[group] * rate[group]
    return total
