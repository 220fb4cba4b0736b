"""Work sizes estimated before any work: a simulation that this machine cannot finish or hold is refused.

    estimate = check_simulation_size(system, t_final=100.0, snapshot_every=1.0, out=Path("run.zarr"))

The expected number of events is at most the largest escape rate of the system (every move allowed)
times the simulated time; the snapshot volume is the number of snapshots times the lattice; the
memory is what the simulator's tables and buffers take for the lattice. A run is refused, with the
estimate and the option to change, when its events exceed ``EVENT_LIMIT`` (hours of the compiled
simulator) or its snapshots ``SNAPSHOT_LIMIT`` per trajectory, its store would not fit the free space of the output's filesystem, or its tables would
not fit half of this machine's memory. ``force`` skips the refusal (``--force`` on the command line).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, QuorumSystem, System, neighbour_directions

EVENT_LIMIT = 1e11  # about 4 hours of the compiled simulator on one core (7-9 M events/s)
SNAPSHOT_LIMIT = 1e8  # snapshots of one trajectory (the paper's runs record hundreds)
EVENT_BYTES = 13  # int32 token + int8 move + float64 dwell, before compression
SNAPSHOT_BUFFER_BYTES = 64 << 20  # the simulator's snapshot buffer holds at most this much
FORCE_HINT = "or pass --force to run it anyway"


@dataclasses.dataclass(frozen=True)
class WorkEstimate:
    """Upper estimates of one simulation's work: events, snapshots, bytes stored and bytes of memory."""

    escape_rate: float
    events: float
    snapshots: float
    store_bytes: float
    memory_bytes: float


def max_escape_rate(system: System) -> float:
    """The largest total rate of the system: every move of every token at its rate (nothing blocked)."""
    if isinstance(system, ActiveSystem):
        forward = max(system.v_plus, system.v_crowded) if isinstance(system, QuorumSystem) else system.v_plus
        return system.N * (2 * system.D + forward + 3 * system.v_other)
    degree = len(neighbour_directions(system.dim))
    return system.n_tokens * degree * max(system.c, 1.0 - system.c)


def snapshot_count(t_final: float, snapshot_every: float | None, burn_in: float = 0.0) -> float:
    """Snapshots at burn_in, burn_in + every, ... up to t_final (a float: it may be astronomically large)."""
    if not snapshot_every:
        return 0.0
    return math.floor((t_final - burn_in) / snapshot_every + 1e-9) + 1.0


def simulator_memory(system: System, snapshots: bool) -> float:
    """Bytes of the compiled simulator's tables (class lists, lattice, neighbours) and buffers."""
    sites = system.shape[0] * system.shape[1]
    if isinstance(system, ActiveSystem):
        classes = 4 if isinstance(system, QuorumSystem) else 3
    else:
        classes = 2 * (len(neighbour_directions(system.dim)) + 1)
    move_ids = system.n_tokens * system.n_moves
    tables = 8.0 * move_ids * (classes + 2) + 64.0 * sites + 32.0 * system.n_tokens
    buffers = (1 << 20) * 13.0 + (SNAPSHOT_BUFFER_BYTES if snapshots else 0)
    return tables + buffers


def estimate_simulation(system: System, t_final: float, snapshot_every: float | None = None) -> WorkEstimate:
    rate = max_escape_rate(system)
    events = rate * t_final
    snapshots = snapshot_count(t_final, snapshot_every)
    sites = system.shape[0] * system.shape[1]
    store = events * EVENT_BYTES + snapshots * (sites + 8) + system.n_tokens * 17.0
    return WorkEstimate(rate, events, snapshots, store, simulator_memory(system, snapshot_every is not None))


def physical_memory() -> float:
    """Bytes of memory of this machine (inf where the system does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def free_bytes(path: Path) -> float:
    """Free bytes on the filesystem that would hold ``path`` (its nearest existing ancestor)."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            try:
                return float(shutil.disk_usage(candidate).free)
            except OSError:
                return math.inf
    return math.inf


def gigabytes(value: float) -> str:
    return f"{value / 1e9:.3g} GB"


def check_events(events: float, rate: float, t_final: float, what: str = "the simulation") -> None:
    if not (math.isfinite(events) and events <= EVENT_LIMIT):
        raise ConfigurationError(
            f"t_final: {what} expects up to {events:.3g} events (escape rate up to {rate:.3g} per unit time x "
            f"t_final {t_final:g}), more than the {EVENT_LIMIT:.0e} this tool runs without asking (hours of "
            f"simulation); lower --t-final or the rates, {FORCE_HINT}"
        )


def check_snapshots(snapshots: float, t_final: float, every: float | None) -> None:
    if not (math.isfinite(snapshots) and snapshots <= SNAPSHOT_LIMIT):
        raise ConfigurationError(
            f"snapshot_every: {snapshots:.3g} snapshots per trajectory (t_final {t_final:g} / snapshot_every {every:g}), "
            f"more than the {SNAPSHOT_LIMIT:.0e} this tool records without asking; raise --snapshot-every, {FORCE_HINT}"
        )


def check_memory(needed: float, field: str, what: str) -> None:
    available = physical_memory() / 2
    if not (math.isfinite(needed) and needed <= available):
        raise ConfigurationError(
            f"{field}: {what} needs about {gigabytes(needed)} of memory, more than half of this machine's "
            f"{gigabytes(2 * available)}; make it smaller, {FORCE_HINT}"
        )


def check_disk(needed: float, out: Path, field: str, what: str) -> None:
    free = free_bytes(out)
    if not (math.isfinite(needed) and needed <= free):
        raise ConfigurationError(
            f"{field}: {what} would take up to {gigabytes(needed)} before compression, {gigabytes(free)} are free at "
            f"{out.absolute().parent}; make it smaller or write elsewhere, {FORCE_HINT}"
        )


def check_simulation_size(
    system: System,
    t_final: float,
    snapshot_every: float | None = None,
    out: Path | None = None,
    force: bool = False,
) -> WorkEstimate:
    """The estimate; refused (ConfigurationError naming the option) when absurd for this machine, unless ``force``."""
    estimate = estimate_simulation(system, t_final, snapshot_every)
    if force:
        return estimate
    ly, lx = system.shape
    check_memory(estimate.memory_bytes, "L", f"a {ly} x {lx} lattice with {system.n_tokens} tokens")
    check_events(estimate.events, estimate.escape_rate, t_final)
    check_snapshots(estimate.snapshots, t_final, snapshot_every)
    if out is not None:
        field = "snapshot_every" if estimate.snapshots * ly * lx > estimate.events * EVENT_BYTES else "t_final"
        what = f"the store ({estimate.events:.3g} events, {estimate.snapshots:.3g} snapshots of {ly} x {lx})"
        check_disk(estimate.store_bytes, Path(out), field, what)
    return estimate
