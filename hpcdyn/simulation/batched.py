"""Lock-step batched exact simulation of any rate model (DESIGN 1.5): B replicas, one event each per step.

    result = simulate_batched(model, system, positions, states, keys, t_final=50.0,
                              snapshot_times=snapshot_grid(50.0, every=1.0))
    result.occupancy      # int8 [replica, time, y, x]: 0 empty, 1 + orientation (active) / spin (fa)

Every step evaluates the rate model once on the whole batch [B, n_tokens, n_moves], draws each
replica's dwell time from its own escape rate and its event from its own flattened rates, and
applies the events; all of it stays on the model's device (no ``.item()`` per event: the host looks
at the batch only every ``sync_every`` steps, to see whether every replica has reached t_final).

Random numbers come from a counter-based stream (SplitMix64 of key + counter) computed in torch:
draw k of a replica depends only on its key and k, so a replica's trajectory does not depend on
which other replicas share its batch, on the batch size, or on the device's scheduling. Keys are
derived from (seed, case, replica) by ``replica_streams``.

A learned model gives hops onto occupied sites a small rate instead of zero. By default such a draw
is rejected: the replica stays where it is and its clock advances, which is exactly the dynamics
with those rates removed (a rejected draw is a self-loop of the chain). The draws rejected and the
probability mass they carried are reported per replica; ``reject_overlaps=False`` applies them and
records the overlaps instead.

A model that keeps per-batch attention masks (``TransformerRates.attention_masks``) has them built
once and updated one row and one column per event, instead of rebuilt by every forward pass.
A rate or clock that becomes non-finite (NaN weights, say) stops the run with ``NonFiniteRateError``
at the next host synchronisation: a NaN clock would never reach t_final.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from hpcdyn.storage.events import EventLog
from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, System

# SplitMix64 constants, as signed 64-bit integers (torch has no unsigned 64-bit arithmetic).
_MASK64 = (1 << 64) - 1


class NonFiniteRateError(ConfigurationError):
    """The rate model gave a NaN or infinite escape rate: the lock-step simulation cannot go on."""


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)
MIX_1 = _signed(0xBF58476D1CE4E5B9)
MIX_2 = _signed(0x94D049BB133111EB)


def _shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic): clear the sign-extended bits."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _mix(value: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser; int64 multiplication wraps modulo 2^64 like uint64."""
    value = (value ^ _shift_right(value, 30)) * MIX_1
    value = (value ^ _shift_right(value, 27)) * MIX_2
    return value ^ _shift_right(value, 31)


def uniforms(keys: torch.Tensor, counter: int) -> torch.Tensor:
    """Draw number ``counter`` of each replica's stream: float64 in [0, 1), [B] (53 random bits)."""
    mixed = _mix(keys + _signed(counter * GOLDEN_GAMMA))
    return _shift_right(mixed, 11).double() * 2.0**-53


@dataclasses.dataclass(frozen=True)
class ReplicaStreams:
    """The random streams of one replica: its initial configuration and its dynamics."""

    configuration: np.random.Generator
    dynamics: np.random.Generator  # for the compiled simulator
    key: int  # for the batched simulator's counter-based stream


def replica_streams(seed: int, case: int, replica: int) -> ReplicaStreams:
    """Streams derived from (seed, case, replica) alone, whatever batch or worker runs the replica."""
    configuration, dynamics = np.random.SeedSequence([seed, case, replica]).spawn(2)
    key = _signed(int(dynamics.generate_state(1, np.uint64)[0]))
    return ReplicaStreams(np.random.default_rng(configuration), np.random.default_rng(dynamics), key)


def snapshot_grid(t_final: float, every: float, start: float = 0.0) -> np.ndarray:
    """Snapshot times start + k * every for every k with k * every <= t_final - start.

    The same float comparison as the compiled simulator's, so both record the same number of
    snapshots over a window of the same length.
    """
    if not (math.isfinite(every) and every > 0):
        raise ConfigurationError(f"snapshot_every: must be a finite time > 0, got {every!r}")
    if not (0 <= start <= t_final):
        raise ConfigurationError(f"burn_in: must be in [0, t_final = {t_final}], got {start!r}")
    window = t_final - start
    count = int(math.floor(window / every))
    while (count + 1) * every <= window:
        count += 1
    while count > 0 and count * every > window:
        count -= 1
    return start + np.arange(count + 1) * every


@dataclasses.dataclass
class BatchedResult:
    """What a batched run produced, on the host. Per-replica arrays have the replica first."""

    snapshot_times: np.ndarray  # float64 [S]
    occupancy: np.ndarray  # int8 [B, S, Ly, Lx]
    overlaps: np.ndarray  # int32 [B, S]: tokens beyond the first on a site (0 without overlaps)
    events: np.ndarray  # int64 [B]: events applied
    move_counts: np.ndarray  # int64 [B, n_moves]: events applied, per move index
    draws: np.ndarray  # int64 [B]: events drawn before t_final (applied + rejected)
    rejected: np.ndarray  # int64 [B]: draws of a move onto an occupied site, rejected
    overlap_events: np.ndarray  # int64 [B]: such draws applied (reject_overlaps=False)
    rejected_mass: np.ndarray  # float64 [B]: mean over draws of the probability on such moves
    final_positions: np.ndarray  # int64 [B, n_tokens, 2]
    final_states: np.ndarray  # int64 [B, n_tokens]
    steps: int
    event_logs: list[EventLog] | None = None


class _Recorder:
    """Per-step draws kept on the device for event logs (tests, short runs)."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def add(self, token, move, time, applied) -> None:
        self.rows.append((token.int(), move.to(torch.int8), time, applied))

    def logs(self, system, t_final, positions, states) -> list[EventLog]:
        tokens, moves, times, applied = (torch.stack(column, 1).cpu().numpy() for column in zip(*self.rows))
        logs = []
        for replica in range(tokens.shape[0]):
            keep = applied[replica]
            event_times = times[replica][keep]
            dwell = np.diff(event_times, prepend=0.0)  # rejected draws fold into the next dwell
            logs.append(EventLog(system, float(t_final), positions[replica], states[replica].astype(np.int8),
                                 tokens[replica][keep], moves[replica][keep], dwell))  # fmt: skip
        return logs


class _Batch:
    """The state of B replicas on one device, and one lock-step event."""

    def __init__(self, model, system, positions, states, keys, t_final, snapshot_times, reject_overlaps, device):
        self.model, self.system = model, system
        self.device = torch.device(device)
        self.positions = torch.as_tensor(positions, dtype=torch.long, device=self.device).clone()
        self.states = torch.as_tensor(states, dtype=torch.long, device=self.device).clone()
        self.keys = torch.as_tensor(keys, dtype=torch.long, device=self.device)
        self.batch, self.n_tokens = self.states.shape
        self.t_final = float(t_final)
        self.reject_overlaps = reject_overlaps
        table = torch.as_tensor(system.move_table, dtype=torch.long, device=self.device)
        self.move_table = table
        self.displaced = (table[:, :2] != 0).any(1)  # [M]: moves that change a position
        self.any_displaced = bool(self.displaced.any())
        self.excludes = isinstance(system, ActiveSystem)  # particles; fa tokens are the sites themselves
        self.sides = torch.tensor([system.shape[1], system.shape[0]], device=self.device)
        self.times = torch.as_tensor(snapshot_times, dtype=torch.float64, device=self.device)
        self._allocate()
        # a model with per-batch attention masks: built once here, updated per event by _apply
        build_masks = getattr(model, "attention_masks", None)
        self.masks = build_masks(self.positions) if build_masks is not None else None

    def _log_rates(self) -> torch.Tensor:
        if self.masks is not None:
            return self.model(self.positions, self.states, masks=self.masks)
        return self.model(self.positions, self.states)

    def _allocate(self) -> None:
        batch, device, n_snapshots = self.batch, self.device, len(self.times)
        sites = self.system.shape[0] * self.system.shape[1]
        self.clock = torch.zeros(batch, dtype=torch.float64, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.next_snapshot = torch.zeros(batch, dtype=torch.long, device=device)
        # one spare slot per replica takes the writes of replicas with nothing to record
        self.snapshots = torch.zeros(batch, n_snapshots + 1, sites, dtype=torch.int8, device=device)
        self.overlaps = torch.zeros(batch, n_snapshots + 1, dtype=torch.int32, device=device)
        self.written = torch.zeros(batch, n_snapshots + 1, dtype=torch.bool, device=device)
        counters = ("events", "draws", "rejected", "overlap_events")
        self.counts = {name: torch.zeros(batch, dtype=torch.long, device=device) for name in counters}
        self.move_counts = torch.zeros(batch, self.move_table.shape[0], dtype=torch.long, device=device)
        self.rejected_mass = torch.zeros(batch, dtype=torch.float64, device=device)
        self.rows = torch.arange(batch, device=device)
        # first step at which a replica's escape rate was NaN or infinite (-1: never)
        self.first_non_finite = torch.full((batch,), -1, dtype=torch.long, device=device)

    def _flat_sites(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[..., 1] * self.sides[0] + positions[..., 0]

    def _grid(self) -> torch.Tensor:
        """Occupancy values [B, sites] (1 + state on a particle's site; the spin for fa).

        With overlaps, the largest value on a site is kept: deterministic on every device.
        """
        values = self.states + 1 if self.excludes else self.states
        sites = self.system.shape[0] * self.system.shape[1]
        grid = torch.zeros(self.batch, sites, dtype=torch.long, device=self.device)
        return grid.scatter_reduce_(1, self._flat_sites(self.positions), values, reduce="amax")

    def _blocked(self, grid: torch.Tensor) -> torch.Tensor:
        """Moves onto an occupied site, bool [B, n_tokens * M]."""
        targets = (self.positions.unsqueeze(2) + self.move_table[:, :2]) % self.sides  # [B, T, M, 2]
        occupied = grid.gather(1, self._flat_sites(targets).flatten(1)) > 0
        return occupied & self.displaced.repeat(self.n_tokens)

    def step(self, step: int, recorder: _Recorder | None) -> None:
        log_rates = self._log_rates()  # [B, T, M]
        rates = log_rates.double().exp().flatten(1)  # exp(-inf) = 0
        cumulative = rates.cumsum(1)
        total = cumulative[:, -1]  # the escape rate, summed in the order the pick uses
        self._note_non_finite(total, step)
        grid = self._grid()
        dwell = -torch.log1p(-uniforms(self.keys, 2 * step)) / total  # inf when nothing can happen
        new_time = self.clock + dwell
        target = torch.minimum(uniforms(self.keys, 2 * step + 1) * total, torch.nextafter(total, torch.zeros_like(total)))
        chosen = torch.searchsorted(cumulative, target.unsqueeze(1), right=True).squeeze(1).clamp_max(rates.shape[1] - 1)
        finishing = new_time > self.t_final
        live = ~self.done & ~finishing
        self._record_snapshots(grid, new_time, finishing)
        if self.excludes:
            blocked = self._blocked(grid)
            onto_occupied = blocked.gather(1, chosen.unsqueeze(1)).squeeze(1) & live
            mass = (rates * blocked).sum(1) / total
            self.rejected_mass += torch.where(live, mass, torch.zeros_like(mass))
        else:
            onto_occupied = torch.zeros_like(live)
        applied = live & ~onto_occupied if self.reject_overlaps else live
        token, move = chosen // self.move_table.shape[0], chosen % self.move_table.shape[0]
        self._apply(token, move, applied)
        self.counts["draws"] += live
        self.counts["events"] += applied
        self.counts["rejected" if self.reject_overlaps else "overlap_events"] += onto_occupied
        self.move_counts.view(-1).index_add_(0, self.rows * self.move_table.shape[0] + move, applied.long())
        if recorder is not None:
            recorder.add(token, move, new_time, applied)
        self.clock = torch.where(live, new_time, torch.full_like(new_time, self.t_final))
        self.done |= finishing

    def _note_non_finite(self, total: torch.Tensor, step: int) -> None:
        """Remember the first step at which a running replica's escape rate is NaN or inf (any NaN or
        +inf rate makes the sum so; a sum of 0, nothing can happen, is finite and ends the replica)."""
        bad = ~torch.isfinite(total) & ~self.done & (self.first_non_finite < 0)
        self.first_non_finite = torch.where(bad, torch.full_like(self.first_non_finite, step), self.first_non_finite)

    def finished(self) -> bool:
        """Whether every replica has reached t_final, in one host synchronisation; first raises
        NonFiniteRateError if a replica met a non-finite escape rate."""
        done, broken = torch.stack([self.done.all(), (self.first_non_finite >= 0).any()]).tolist()
        if broken:
            self._raise_non_finite()
        return done

    def _raise_non_finite(self) -> None:
        bad = self.first_non_finite >= 0
        replica = int(bad.nonzero()[0, 0])
        raise NonFiniteRateError(
            f"rates: the rate model gave a non-finite (NaN or infinite) escape rate to {int(bad.sum())} of "
            f"{self.batch} replicas (first: replica {replica} at step {int(self.first_non_finite[replica])}); "
            f"a model with NaN or infinite weights cannot be simulated: check the checkpoint or retrain"
        )

    def _record_snapshots(self, grid: torch.Tensor, new_time: torch.Tensor, finishing: torch.Tensor) -> None:
        """Snapshots in [clock, new_time) show the configuration before this event.

        At most one slot is written per replica per step (the first); slots skipped by a long dwell
        hold the same configuration and are filled forward at the end.
        """
        n_snapshots = len(self.times)
        end = torch.searchsorted(self.times, new_time.unsqueeze(1)).squeeze(1)  # snapshots before new_time
        end = torch.where(finishing, torch.full_like(end, n_snapshots), end)
        write = end > self.next_snapshot
        slot = torch.where(write, self.next_snapshot, torch.full_like(end, n_snapshots))
        self.snapshots[self.rows, slot] = grid.to(torch.int8)
        self.overlaps[self.rows, slot] = (self.n_tokens - (grid > 0).sum(1)).int() if self.excludes else 0
        self.written[self.rows, slot] = True
        self.next_snapshot = torch.maximum(self.next_snapshot, end)

    def _apply(self, token: torch.Tensor, move: torch.Tensor, applied: torch.Tensor) -> None:
        steps = self.move_table[move] * applied.unsqueeze(1)  # [B, 3], zero where nothing happens
        self.positions[self.rows, token] = (self.positions[self.rows, token] + steps[:, :2]) % self.sides
        self.states[self.rows, token] = (self.states[self.rows, token] + steps[:, 2]) % self.system.n_states
        if self.masks is not None and self.any_displaced:  # fa: positions never change, nor the masks
            self.masks.update(self.positions, token)

    def filled_snapshots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Snapshot grids [B, S, sites] and overlaps [B, S], skipped slots filled forward."""
        n_snapshots = len(self.times)
        written = self.written[:, :n_snapshots]
        index = torch.arange(n_snapshots, device=self.device).expand_as(written)
        source = torch.where(written, index, torch.full_like(index, -1)).cummax(1).values
        if n_snapshots and bool((source < 0).any()):
            raise RuntimeError("snapshots: a slot was never written; the clock did not reach it")
        grids = self.snapshots.gather(1, source.unsqueeze(2).expand(-1, -1, self.snapshots.shape[2]))
        return grids, self.overlaps.gather(1, source)


def check_lattice(model, system: System) -> None:
    """A trained transformer runs only on the lattice its position tables were built for."""
    config = getattr(model, "config", None)
    size = getattr(config, "lattice_size", None)
    if size is not None and size != max(system.shape):
        raise ConfigurationError(
            f"L: the model was trained on a {size} x {size} lattice and runs only there, got L = {max(system.shape)}; "
            f"use --L {size}"
        )
    if model.n_moves != system.n_moves:
        raise ConfigurationError(f"model: it has {model.n_moves} moves per token, system {system.name!r} has {system.n_moves}")


def simulate_batched(
    model,
    system: System,
    positions,
    states,
    keys,
    t_final: float,
    snapshot_times: np.ndarray | None = None,
    *,
    reject_overlaps: bool = True,
    record_events: bool = False,
    device: str | torch.device | None = None,
    sync_every: int = 32,
    on_sync: Callable[[float], None] | None = None,
) -> BatchedResult:
    """Run B replicas of ``model`` on ``system`` from [0, t_final] in lock-step.

    positions long [B, n_tokens, 2], states [B, n_tokens], keys int64 [B] (``replica_streams``).
    ``on_sync(slowest_time)`` is called at each host synchronisation (progress bars).
    """
    if not (math.isfinite(t_final) and t_final >= 0):
        raise ConfigurationError(f"t_final: must be a finite time >= 0, got {t_final!r}")
    check_lattice(model, system)
    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else "cpu"
    times = np.zeros(0) if snapshot_times is None else np.asarray(snapshot_times, dtype=np.float64)
    batch = _Batch(model, system, positions, states, keys, t_final, times, reject_overlaps, device)
    recorder = _Recorder() if record_events else None
    step = 0
    with torch.inference_mode():
        while True:
            for _ in range(sync_every):
                batch.step(step, recorder)
                step += 1
            finished = batch.finished()  # the only host synchronisation, once per sync_every steps
            if on_sync is not None:
                on_sync(float(batch.clock.min()))
            if finished:
                break
        grids, overlaps = batch.filled_snapshots()
    return _result(batch, grids, overlaps, times, step, recorder, positions, states)


def _result(batch: _Batch, grids, overlaps, times, steps, recorder, positions, states) -> BatchedResult:
    host = {name: value.cpu().numpy() for name, value in batch.counts.items()}
    draws = host["draws"]
    ly, lx = batch.system.shape
    logs = None
    if recorder is not None:
        logs = recorder.logs(batch.system, batch.t_final, np.asarray(positions), np.asarray(states))
    return BatchedResult(
        snapshot_times=times,
        occupancy=grids.cpu().numpy().reshape(batch.batch, len(times), ly, lx),
        overlaps=overlaps.cpu().numpy(),
        events=host["events"],
        move_counts=batch.move_counts.cpu().numpy(),
        draws=draws,
        rejected=host["rejected"],
        overlap_events=host["overlap_events"],
        rejected_mass=batch.rejected_mass.cpu().numpy() / np.maximum(draws, 1),
        final_positions=batch.positions.cpu().numpy(),
        final_states=batch.states.cpu().numpy(),
        steps=steps,
        event_logs=logs,
    )
