"""Event logs: one observed trajectory as an initial configuration plus a list of events.

An event k is (token, move, dwell): the trajectory sat in configuration C_k for ``dwell`` time
units, then ``move`` was applied to ``token``. The observation window is [0, t_final]; the time
after the last event, t_final - sum(dwell), is the censored tail of the likelihood.

Two sources share this interface: ``EventLog`` (in memory) and ``hpcdyn.storage.trajectory_store.Trajectory`` (a
Zarr store, read block by block). Consumers only call ``iter_event_blocks``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

from hpcdyn.physics.systems import System

EventBlock = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int32, moves int8, dwell float64


class EventSource(Protocol):
    system: System
    t_final: float
    initial_positions: np.ndarray
    initial_states: np.ndarray

    @property
    def n_events(self) -> int: ...

    def iter_event_blocks(
        self, block_events: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[EventBlock]: ...


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

    def iter_event_blocks(
        self, block_events: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[EventBlock]:
        stop = self.n_events if stop is None else stop
        size = block_events or max(stop - start, 1)
        for lo in range(start, stop, size):
            hi = min(lo + size, stop)
            yield self.tokens[lo:hi], self.moves[lo:hi], self.dwell[lo:hi]


class EventWindow:
    """Events [start, stop) of a source as a trajectory of their own.

    Its initial configuration is the source's configuration before event ``start``; its window
    ends at the source's ``t_final`` when ``stop`` is the last event (keeping the censored tail),
    else at the instant of event ``stop``. Used to hold out the tail of a trajectory for validation.
    """

    def __init__(self, source: EventSource, start: int, stop: int, block_events: int = 1 << 20):
        from hpcdyn.physics.replay import advance  # torch-based; imported here to keep this module numpy-only

        import torch

        if not 0 <= start <= stop <= source.n_events:
            raise ValueError(f"window: need 0 <= start <= stop <= {source.n_events}, got [{start}, {stop})")
        self.source, self.start, self.stop, self.system = source, start, stop, source.system
        positions = torch.as_tensor(source.initial_positions, dtype=torch.long)
        states = torch.as_tensor(source.initial_states, dtype=torch.long)
        elapsed_before = elapsed_inside = 0.0
        for tokens, moves, dwell in source.iter_event_blocks(block_events, 0, start):
            positions, states = advance(self.system, positions, states, torch.as_tensor(tokens), torch.as_tensor(moves))
            elapsed_before += float(dwell.sum())
        if stop < source.n_events:  # a window that reaches the end keeps the source's t_final instead
            for _, _, dwell in source.iter_event_blocks(block_events, start, stop):
                elapsed_inside += float(dwell.sum())
        self.initial_positions = positions.numpy()
        self.initial_states = states.numpy().astype(np.int8)
        end = source.t_final if stop == source.n_events else elapsed_before + elapsed_inside
        self.t_final = end - elapsed_before

    @property
    def n_events(self) -> int:
        return self.stop - self.start

    def iter_event_blocks(
        self, block_events: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[EventBlock]:
        """Reads only the window's own events from the source (no pass over what lies before it)."""
        stop = self.n_events if stop is None else stop
        yield from self.source.iter_event_blocks(block_events, self.start + start, self.start + stop)
