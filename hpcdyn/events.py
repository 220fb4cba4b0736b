"""Event logs: one observed trajectory as an initial configuration plus a list of events.

An event k is (token, move, dwell): the trajectory sat in configuration C_k for ``dwell`` time
units, then ``move`` was applied to ``token``. The observation window is [0, t_final]; the time
after the last event, t_final - sum(dwell), is the censored tail of the likelihood.

Two sources share this interface: ``EventLog`` (in memory) and ``hpcdyn.store.Trajectory`` (a
Zarr store, read block by block). Consumers only call ``iter_event_blocks``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

from hpcdyn.systems import System

EventBlock = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int32, moves int8, dwell float64


class EventSource(Protocol):
    system: System
    t_final: float
    initial_positions: np.ndarray
    initial_states: np.ndarray

    @property
    def n_events(self) -> int: ...

    def iter_event_blocks(self, block_events: int | None = None) -> Iterator[EventBlock]: ...


@dataclasses.dataclass
class EventLog:
    """A whole trajectory in memory (small runs, tests, notebooks)."""

    system: System
    t_final: float
    initial_positions: np.ndarray  # int64 [n_tokens, 2]
    initial_states: np.ndarray  # int8 [n_tokens]
    tokens: np.ndarray  # int32 [K]
    moves: np.ndarray  # int8 [K]
    dwell: np.ndarray  # float64 [K]
    log_likelihood: float | None = None  # as accumulated by the simulator that produced it

    @property
    def n_events(self) -> int:
        return int(self.tokens.shape[0])

    def iter_event_blocks(self, block_events: int | None = None) -> Iterator[EventBlock]:
        size = block_events or max(self.n_events, 1)
        for start in range(0, self.n_events, size):
            stop = start + size
            yield self.tokens[start:stop], self.moves[start:stop], self.dwell[start:stop]
