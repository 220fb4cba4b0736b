"""Simulate the original dynamics of a system, into memory or into a trajectory store.

    events = simulate(system, t_final=100.0, seed=1)                    # EventLog in memory
    path = simulate_to_store(system, t_final=1e4, seed=1, out="run.zarr")  # streamed to Zarr

One seed fixes everything: the initial configuration and the whole trajectory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hpcdyn.simulation.compiled import CompiledSimulator
from hpcdyn.storage.events import EventLog
from hpcdyn.physics.systems import ConfigurationError, System


@dataclasses.dataclass
class Simulation:
    """An in-memory simulation: the event log, the snapshots and the final configuration."""

    events: EventLog
    snapshot_times: np.ndarray
    snapshot_grids: np.ndarray
    final_positions: np.ndarray
    final_states: np.ndarray


def check_seed(seed: int) -> None:
    """A seed of numpy's generators: an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigurationError(f"seed: must be an integer >= 0, got {seed!r}")


def start(
    system: System,
    t_final: float,
    seed: int,
    snapshot_every: float | None = None,
    chunk_events: int = 1 << 20,
) -> tuple[CompiledSimulator, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    positions, states = system.initial_configuration(rng)
    simulator = CompiledSimulator(system, positions, states, rng, t_final, snapshot_every, chunk_events)
    return simulator, positions, states


def simulate(
    system: System,
    t_final: float,
    seed: int,
    snapshot_every: float | None = None,
    chunk_events: int = 1 << 20,
) -> Simulation:
    """Run the compiled simulator and keep everything in memory (short runs)."""
    simulator, positions, states = start(system, t_final, seed, snapshot_every, chunk_events)
    parts: list[list[np.ndarray]] = [[], [], [], [], []]
    for chunk in simulator.chunks():
        for buffer, array in zip(parts, dataclasses.astuple(chunk)[:5]):
            buffer.append(array.copy())
    tokens, moves, dwell, times, grids = (np.concatenate(buffer) for buffer in parts)
    events = EventLog(system, float(t_final), positions, states, tokens, moves, dwell, simulator.log_likelihood)
    final_positions, final_states = simulator.configuration()
    return Simulation(events, times, grids, final_positions, final_states)


def simulate_to_store(
    system: System,
    t_final: float,
    seed: int,
    out: str | Path,
    snapshot_every: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    chunk_events: int = 1 << 20,
    force: bool = False,
) -> Path:
    """Stream a simulation into a trajectory store; the store appears only once complete.

    Everything is checked before the simulation starts: the output (``overwrite``), the seed, and
    the work size (events, snapshots, memory; ``hpcdyn.simulation.work_size``; ``force`` skips it).
    """
    from hpcdyn.simulation.work_size import check_simulation_size
    from hpcdyn.storage.trajectory_store import TrajectoryWriter, check_writable

    check_writable(Path(out).absolute(), overwrite)  # fail before simulating, not after
    check_seed(seed)
    check_simulation_size(system, t_final, snapshot_every, Path(out), force)
    simulator, positions, states = start(system, t_final, seed, snapshot_every, chunk_events)
    bar = _progress_bar(t_final, progress)
    writer = TrajectoryWriter(
        out,
        system,
        t_final=t_final,
        seed=seed,
        initial_positions=positions,
        initial_states=states,
        snapshot_every=snapshot_every,
        overwrite=overwrite,
        chunk_events=chunk_events,
    )
    with writer:
        for chunk in simulator.chunks():
            writer.append_events(chunk.tokens, chunk.moves, chunk.dwell)
            if snapshot_every is not None:
                writer.append_snapshots(chunk.snapshot_times, chunk.snapshot_grids)
            bar.update(chunk.time - bar.n)
            bar.set_postfix(events=writer.n_events, refresh=False)
        bar.close()
        final_positions, final_states = simulator.configuration()
        return writer.finish(
            log_likelihood=simulator.log_likelihood,
            final_position=final_positions.tolist(),
            final_state=final_states.tolist(),
        )


def _progress_bar(total: float, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="time", desc="simulate", bar_format=None)
