"""Ensembles of forward simulations on Ray actors, written to one Zarr store (DESIGN 1.5, 3.2).

    config = EnsembleConfig(models=("original", "runs/mode2"), densities=(0.124, 0.3, 0.5),
                            replicas=32, t_final=200.0, snapshot_every=1.0, burn_in=50.0, seed=1)
    summary = run_ensemble(config, "ensemble.zarr")            # local Ray; address=... for a cluster

The grid is model x density x replica. Work is cut into units of one model, one density and a block
of replicas (``replicas_per_unit``, the lock-step batch of a learned model); a unit's trajectories
depend only on (seed, case, replica), so the store is the same whatever the number of actors, the
order of the units or how often the run was interrupted. The original dynamics runs in the compiled
simulator, a trained checkpoint in the batched simulator; both write the same snapshot format.

Everything is checked before Ray starts: checkpoints exist and load, the lattice matches them, each
density fits on the lattice, times are sane, the work fits this machine (events of the original
dynamics, snapshot volume against the free disk, a unit's arrays against the memory; ``force``
skips that), an actor fits the local CPUs. The store is locked against a second driver. Actors (explicit ``num_cpus``, a GPU fraction) run a
unit per call, write its shards themselves and return a small summary; an actor killed mid-unit is
restarted and the call retried; a rerun of the same command skips the units in the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

import hpcdyn
from hpcdyn.distributed.engines import ENGINES, TableUnits, choose_engine
from hpcdyn.physics.environments import FAMILIES
from hpcdyn.simulation.batched import replica_streams, simulate_batched, snapshot_grid
from hpcdyn.simulation.compiled import CompiledSimulator
from hpcdyn.simulation.work_size import (
    check_disk,
    check_events,
    check_memory,
    check_snapshots,
    max_escape_rate,
    simulator_memory,
    snapshot_count,
)
from hpcdyn.physics.systems import PARTICLE_SYSTEMS, PRESETS, SYSTEMS, ActiveSystem, ConfigurationError, make_system

ORIGINAL = "original"
MIN_UNIT_EVENTS = 500_000  # about 60 ms of the compiled simulator: Ray calls should carry >= 50 ms
LEARNED_BLOCK = 64  # lock-step batch of a learned model: the network's throughput grows with it


class EnsembleError(RuntimeError):
    """A unit failed for good; the finished units stay in the store and a rerun resumes."""


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """What to simulate. System parameters left as None come from the checkpoints or the paper preset.

    ``system`` is a particle system (active, quorum); None: the checkpoints' system, else active.
    """

    models: tuple[str, ...]
    densities: tuple[float, ...]
    replicas: int
    t_final: float
    snapshot_every: float
    burn_in: float = 0.0
    seed: int = 0
    L: int | None = None
    D: float | None = None
    v_plus: float | None = None
    v_other: float | None = None
    system: str | None = None
    R: int | None = None  # quorum only, as q and v_crowded
    q: int | None = None
    v_crowded: float | None = None
    replicas_per_unit: int | None = None
    reject_overlaps: bool = True
    engine: str = "auto"  # learned models: auto, network or table (hpcdyn.distributed.engines)
    table_family: str | None = None  # the table's key family, asked for (engine table); None: chosen

    def __post_init__(self) -> None:
        def require(condition: bool, field: str, message: str) -> None:
            if not condition:
                raise ConfigurationError(f"{field}: {message}")

        require(len(self.models) > 0, "model", "give at least one: original or a run directory")
        require(len(set(self.models)) == len(self.models), "model", f"each model once, got {list(self.models)}")
        require(len(self.densities) > 0, "density", "give at least one density")
        require(len(set(self.densities)) == len(self.densities), "density", f"each density once, got {list(self.densities)}")
        require(_is_int(self.replicas) and self.replicas >= 1, "replicas", f"must be an integer >= 1, got {self.replicas!r}")
        require(_is_int(self.seed) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        for field in ("t_final", "snapshot_every"):
            value = getattr(self, field)
            require(_finite(value) and value > 0, field, f"must be a finite time > 0, got {value!r}")
        require(
            _finite(self.burn_in) and 0 <= self.burn_in <= self.t_final,
            "burn_in",
            f"must be a time in [0, t_final = {self.t_final}], got {self.burn_in!r}",
        )
        require(self.engine in ENGINES, "engine", f"must be one of {ENGINES}, got {self.engine!r}")
        require(self.table_family is None or self.engine == "table", "table_family",
                f"a key family is for the table engine; add --engine table (got --engine {self.engine})")
        require(self.table_family is None or self.table_family in FAMILIES, "table_family",
                f"must be a key family ({', '.join(FAMILIES)}), got {self.table_family!r}")
        require(self.system is None or self.system in PARTICLE_SYSTEMS, "system",
                f"ensembles run the particle systems {PARTICLE_SYSTEMS}, got {self.system!r}")  # fmt: skip
        block = self.replicas_per_unit
        require(block is None or (_is_int(block) and block >= 1), "replicas_per_unit", f"must be an integer >= 1, got {block!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- resolution
def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_path(source: str) -> Path:
    path = Path(source).absolute()
    return path / "best.pt" if path.is_dir() else path


def _describe_model(source: str, labels: set[str], engine: str = "auto", family: str | None = None) -> dict[str, Any]:
    """Identity of one model; a checkpoint is loaded to prove it is usable."""
    if source == ORIGINAL:
        return {"label": ORIGINAL, "kind": ORIGINAL}
    from hpcdyn.learning.checkpoint import load_checkpoint
    from hpcdyn.learning.transformer import TransformerConfig

    path = checkpoint_path(source)
    if not path.exists():
        raise ConfigurationError(
            f"model: {source} is neither 'original' nor a run directory with best.pt nor a checkpoint file"
        )
    state = load_checkpoint(path)
    model_config = TransformerConfig.from_dict(state["model_config"])
    if model_config.system not in PARTICLE_SYSTEMS:
        raise ConfigurationError(
            f"model: {source} was trained on the {model_config.system!r} system; ensembles run the particle systems {PARTICLE_SYSTEMS}"
        )
    label = path.parent.name if path.name == "best.pt" else f"{path.parent.name}/{path.stem}"
    while label in labels or label == ORIGINAL:
        label += "+"
    sha256 = file_digest(path)
    return {
        "label": label,
        "kind": "checkpoint",
        "path": str(path),
        "sha256": sha256,
        "model_config": model_config.as_dict(),
        "trained_on": state["store"],
        **choose_engine(engine, model_config, path, sha256, family),
    }


def _system_value(field: str, given: Any, models: list[dict[str, Any]], fallback: Any) -> Any:
    """An explicit value, else the one all checkpoints agree on, else the paper preset's."""
    if given is not None:
        return given
    learned = [model for model in models if model["kind"] != ORIGINAL]
    if field == "L":  # network models fix L; table-engine models default to their training size
        network = [model for model in learned if model.get("engine") != "table"]
        found = {model["model_config"]["lattice_size"] for model in (network or learned)}
    else:
        found = {model["trained_on"].get("params", {}).get(field) for model in learned} - {None}
    if len(found) > 1:
        option = "--" + field.replace("_", "-")
        raise ConfigurationError(f"{field}: the checkpoints disagree ({sorted(found)}); choose one with {option}")
    return found.pop() if found else fallback


def _system_name(config: EnsembleConfig, models: list[dict[str, Any]]) -> str:
    """The ensemble's system: the one asked for, else the checkpoints', else active; all must agree."""
    trained = {model["label"]: model["model_config"]["system"] for model in models if model["kind"] != ORIGINAL}
    name = config.system or (sorted(set(trained.values()))[0] if trained else "active")
    for label, system in trained.items():
        if system != name:
            raise ConfigurationError(f"system: model {label} was trained on the {system!r} system, the ensemble runs {name!r}")
    return name


def _system_fields(name: str) -> tuple[str, ...]:
    """The parameters an ensemble sets (N comes from each density)."""
    return tuple(field.name for field in dataclasses.fields(SYSTEMS[name]) if field.name != "N")


def resolve(config: EnsembleConfig, out: Path | None = None, force: bool = False) -> dict[str, Any]:
    """The full, validated configuration written into the store; raises before any work starts.

    Unless ``force``, the work must fit this machine (``check_work_size``; the disk at ``out``)."""
    models: list[dict[str, Any]] = []
    for source in config.models:
        models.append(_describe_model(source, {model["label"] for model in models}, config.engine, config.table_family))
    name = _system_name(config, models)
    paper = PRESETS[name]["paper"]
    for field in ("R", "q", "v_crowded"):
        if getattr(config, field) is not None and field not in _system_fields(name):
            raise ConfigurationError(f"{field}: not a parameter of the {name!r} system (quorum only)")
    system = {field: _system_value(field, getattr(config, field), models, paper[field]) for field in _system_fields(name)}
    for model in models:
        size = model.get("model_config", {}).get("lattice_size", system["L"])
        if size != system["L"] and model.get("engine") != "table":
            raise ConfigurationError(
                f"L: model {model['label']} was trained on a {size} x {size} lattice and runs only there, got L = {system['L']} "
                f"(on the network engine; a hard-local model, or one whose locality certificate passes, runs at any L on the table)"
            )
    particles = [_particles(density, name, system) for density in config.densities]
    block = config.replicas_per_unit or _default_block(config, models, name, system, max(particles))
    if not force:
        check_work_size(config, models, name, system, particles, min(block, config.replicas), out)
    times = snapshot_grid(config.t_final, config.snapshot_every, config.burn_in)
    return {
        "system": {"name": name, **system},
        "models": models,
        "densities": [float(density) for density in config.densities],
        "n_particles": particles,
        "replicas": int(config.replicas),
        "replicas_per_unit": int(min(block, config.replicas)),
        "t_final": float(config.t_final),
        "snapshot_every": float(config.snapshot_every),
        "burn_in": float(config.burn_in),
        "n_snapshots": len(times),
        "seed": int(config.seed),
        "cases": [[case_key(model["label"], density) for density in config.densities] for model in models],
        "streams": "numpy SeedSequence([seed, case, replica]).spawn(2): initial configuration, dynamics; "
        "case = first 4 bytes of sha256('<model label>|<density>')",
        "reject_overlaps": bool(config.reject_overlaps),
        "move_names": list(SYSTEMS[name].move_names),
    }


def check_work_size(config: EnsembleConfig, models, name: str, system: dict[str, Any], particles: list[int], block: int,
                    out: Path | None) -> None:  # fmt: skip
    """Refuse an ensemble this machine cannot run or hold: events of the original dynamics, the
    snapshot volume against the free disk at ``out``, one unit's arrays against the memory."""
    times = snapshot_count(config.t_final, config.snapshot_every, config.burn_in)
    check_snapshots(times, config.t_final - config.burn_in, config.snapshot_every)
    sites = system["L"] * system["L"]
    grids = len(models) * len(particles) * config.replicas * times
    densest = make_system(name, {**system, "N": max(particles)})
    check_memory(simulator_memory(densest, snapshots=True), "L", f"a {system['L']} x {system['L']} lattice with {densest.N} particles")
    check_memory(block * times * (sites + 4) + 8 * times, "snapshot_every",
                 f"one unit ({block} replicas x {times:.3g} snapshots of {system['L']} x {system['L']})")  # fmt: skip
    if any(model["kind"] == ORIGINAL for model in models):
        rate = sum(max_escape_rate(make_system(name, {**system, "N": n})) for n in particles)
        check_events(rate * config.replicas * config.t_final, rate * config.replicas, config.t_final,
                     "the original dynamics of the ensemble")  # fmt: skip
    if out is not None:
        check_disk(grids * (sites + 4), out, "snapshot_every",
                   f"the store ({grids:.3g} snapshots of {system['L']} x {system['L']})")  # fmt: skip


def _particles(density: float, name: str, system: dict[str, Any]) -> int:
    sites = system["L"] * system["L"]
    if not (_finite(density) and density > 0):
        raise ConfigurationError(f"density: must be a number > 0, got {density!r}")
    needed = max(1, int(round(density * sites)))
    if needed > sites:
        raise ConfigurationError(
            f"density: {density} needs N = {needed} particles on L*L = {sites} sites; use a density in (0, 1]"
        )
    built = make_system(name, {**system, "density": density})  # validates the rates too
    return built.N


def _default_block(config: EnsembleConfig, models, name: str, system, most_particles: int) -> int:
    """Replicas per unit: a full lock-step batch for learned models, else enough events for >= 50 ms."""
    if any(model["kind"] != ORIGINAL for model in models):
        return min(config.replicas, LEARNED_BLOCK)
    rate = max_escape_rate(make_system(name, {**system, "N": 1}))  # per particle, when nothing blocks
    per_replica = max(config.t_final * most_particles * rate, 1.0)
    block = 1
    while block < config.replicas and block * per_replica < MIN_UNIT_EVENTS:
        block *= 2
    return min(block, config.replicas)


def case_key(label: str, density: float) -> int:
    """The case part of a replica's stream: stable when other models or densities join the grid."""
    return int.from_bytes(hashlib.sha256(f"{label}|{float(density)!r}".encode()).digest()[:4], "little")


def plan_units(config: dict[str, Any]) -> list[dict[str, int]]:
    """Every unit of work, in a fixed order: model, density, replica block."""
    block = config["replicas_per_unit"]
    return [
        {"model": m, "density": d, "start": start, "stop": min(start + block, config["replicas"])}
        for m in range(len(config["models"]))
        for d in range(len(config["densities"]))
        for start in range(0, config["replicas"], block)
    ]


# ----------------------------------------------------------------------------- one unit
def unit_system(config: dict[str, Any], density_index: int) -> ActiveSystem:
    """The unit's system (active or quorum; a store written before the name was recorded is active)."""
    params = {key: value for key, value in config["system"].items() if key != "name"}
    return SYSTEMS[config["system"].get("name", "active")](**params, N=config["n_particles"][density_index])


class UnitRunner:
    """Runs units of one ensemble in this process; trained models are loaded once and kept."""

    def __init__(self, config: dict[str, Any], store: str | Path, device: str = "cpu"):
        self.config = config
        self.store = Path(store)
        self.device = device
        self.models: dict[int, Any] = {}
        self.tables: dict[int, TableUnits] = {}

    def rate_model(self, index: int):
        if index not in self.models:
            from hpcdyn.learning.training import load_model

            described = self.config["models"][index]
            path = Path(described["path"])
            if file_digest(path) != described["sha256"]:
                raise ConfigurationError(f"model: {path} changed since the ensemble was created; restore it or start a new store")
            self.models[index], _ = load_model(path, self.device)
        return self.models[index]

    def table_units(self, index: int) -> TableUnits:
        if index not in self.tables:
            described = self.config["models"][index]
            self.tables[index] = TableUnits(self.rate_model(index), described, not self.config["reject_overlaps"])
        return self.tables[index]

    def simulate(self, unit: dict[str, int]) -> dict[str, np.ndarray]:
        """The unit's arrays, indexed [replica in block, ...]."""
        config = self.config
        system = unit_system(config, unit["density"])
        case = config["cases"][unit["model"]][unit["density"]]
        streams = [replica_streams(config["seed"], case, replica) for replica in range(unit["start"], unit["stop"])]
        starts = [system.initial_configuration(stream.configuration) for stream in streams]
        if config["models"][unit["model"]]["kind"] == ORIGINAL:
            return _original_unit(system, config, starts, streams)
        times = snapshot_grid(config["t_final"], config["snapshot_every"], config["burn_in"])
        if config["models"][unit["model"]].get("engine") == "table":
            return self.table_units(unit["model"]).simulate(system, starts, streams, config["t_final"], times)
        positions = np.stack([start[0] for start in starts])
        states = np.stack([start[1] for start in starts]).astype(np.int64)
        result = simulate_batched(
            self.rate_model(unit["model"]), system, positions, states, [stream.key for stream in streams],
            config["t_final"], times, reject_overlaps=config["reject_overlaps"], device=self.device,
        )  # fmt: skip
        return {
            "occupancy": result.occupancy,
            "overlap": result.overlaps,
            "events": result.events,
            "draws": result.draws,
            "rejected": result.rejected,
            "overlap_events": result.overlap_events,
            "rejected_mass": result.rejected_mass,
            "move_count": result.move_counts,
        }

    def run(self, unit: dict[str, int]) -> dict[str, Any]:
        """Simulate a unit, write its shards, commit it to the manifest; returns a small summary."""
        from hpcdyn.storage.ensemble_store import mark_done, mark_running, write_unit

        details = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        mark_running(self.store, unit, details)
        begin = time.perf_counter()
        arrays = self.simulate(unit)
        table = arrays.pop("table", None)  # the table engine's misses and audit, for the manifest
        write_unit(self.store, unit, arrays)
        summary = {
            **details,
            "seconds": time.perf_counter() - begin,
            "events": int(arrays["events"].sum()),
            "rejected": int(arrays["rejected"].sum()),
            **({"table": table} if table is not None else {}),
        }
        mark_done(self.store, unit, summary)
        return summary


def _original_unit(system: ActiveSystem, config, starts, streams) -> dict[str, np.ndarray]:
    """The compiled simulator, replica by replica: a burn-in leg, then the recorded leg."""
    expected = config["n_snapshots"]
    columns: dict[str, list] = {"occupancy": [], "events": [], "move_count": []}
    for (positions, states), stream in zip(starts, streams):
        events, move_count = 0, np.zeros(system.n_moves, np.int64)
        if config["burn_in"] > 0:
            burn = CompiledSimulator(system, positions, states, stream.dynamics, config["burn_in"])
            for chunk in burn.chunks():
                events += len(chunk.moves)
                move_count += np.bincount(chunk.moves, minlength=system.n_moves)
            positions, states = burn.configuration()
        window = config["t_final"] - config["burn_in"]
        simulator = CompiledSimulator(system, positions, states, stream.dynamics, window, config["snapshot_every"])
        grids = []
        for chunk in simulator.chunks():
            events += len(chunk.moves)
            move_count += np.bincount(chunk.moves, minlength=system.n_moves)
            grids.append(chunk.snapshot_grids.copy())
        grid = np.concatenate(grids)
        if len(grid) != expected:
            raise RuntimeError(f"snapshots: the compiled simulator recorded {len(grid)}, the store expects {expected}")
        columns["occupancy"].append(grid)
        columns["events"].append(events)
        columns["move_count"].append(move_count)
    replicas = len(starts)
    events = np.asarray(columns["events"], np.int64)
    return {
        "occupancy": np.stack(columns["occupancy"]),
        "overlap": np.zeros((replicas, expected), np.int32),
        "events": events,
        "draws": events,
        "rejected": np.zeros(replicas, np.int64),
        "overlap_events": np.zeros(replicas, np.int64),
        "rejected_mass": np.zeros(replicas),
        "move_count": np.stack(columns["move_count"]),
    }


class EnsembleWorker:
    """A Ray actor's body: one UnitRunner, threads and device fixed at start."""

    def __init__(self, config: dict[str, Any], store: str, threads: int, use_gpu: bool):
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.runner = UnitRunner(config, store, device)

    def run_unit(self, unit: dict[str, int]) -> dict[str, Any]:
        return self.runner.run(unit)


# ----------------------------------------------------------------------------- driver
def _prepare_store(path: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Create the store, or check that an existing one is this ensemble (then it is resumed)."""
    from hpcdyn.storage.ensemble_store import create_store, stored_config

    attrs = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }
    if path.exists() or path.is_symlink():
        _check_is_ensemble_store(path, overwrite)
    if path.exists() and overwrite:
        retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(retired)
        shutil.rmtree(retired)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        times = snapshot_grid(config["t_final"], config["snapshot_every"], config["burn_in"])
        create_store(path, config, times, attrs)
        return
    existing = stored_config(path)
    wanted = json.loads(json.dumps(config))
    if existing != wanted:
        differing = sorted(key for key in set(existing) | set(wanted) if existing.get(key) != wanted.get(key))
        raise ConfigurationError(
            f"out: {path} holds an ensemble with another configuration (differs in {differing}); "
            "rerun with the same options to resume it, choose another --out, or pass --overwrite"
        )


def _check_is_ensemble_store(path: Path, overwrite: bool) -> None:
    """An existing --out is resumed or replaced only when it is an ensemble store (not a trajectory
    store, a report or a home directory)."""
    from hpcdyn.storage.ensemble_store import SCHEMA
    from hpcdyn.storage.trajectory_store import store_schema

    schema = store_schema(path)
    if path.is_symlink() or not path.is_dir() or schema != SCHEMA:
        action = "replace" if overwrite else "resume"
        raise ConfigurationError(
            f"out: {path} exists and is not an ensemble store (schema {schema!r}); refusing to {action} it; "
            "choose another --out"
        )


def store_progress(out: str | Path) -> tuple[int, int] | None:
    """(finished units, all units) of the ensemble store at ``out``, or None when there is none."""
    from hpcdyn.storage.ensemble_store import finished_units, stored_config

    path = Path(out).absolute()
    if not (path / "zarr.json").exists():
        return None
    return len(finished_units(path)), len(plan_units(stored_config(path)))


def _versions() -> dict[str, str]:
    import torch
    import zarr

    return {"hpcdyn": hpcdyn.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "zarr": zarr.__version__, "python": platform.python_version()}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Placement:
    """How units are run: on Ray actors (the default) or in this process (debugging, baselines)."""

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    max_restarts: int = 3
    in_process: bool = False

    def __post_init__(self) -> None:
        if not (_is_int(self.cpus_per_actor) and self.cpus_per_actor >= 1):
            raise ConfigurationError(f"cpus_per_actor: must be an integer >= 1, got {self.cpus_per_actor!r}")
        if not (_finite(self.gpus_per_actor) and self.gpus_per_actor >= 0):
            raise ConfigurationError(f"gpus_per_actor: must be a number >= 0 (a fraction shares a GPU), got {self.gpus_per_actor!r}")
        if self.actors is not None and not (_is_int(self.actors) and self.actors >= 1):
            raise ConfigurationError(f"actors: must be an integer >= 1, got {self.actors!r}")
        if not (_is_int(self.max_restarts) and self.max_restarts >= 0):
            raise ConfigurationError(f"max_restarts: must be an integer >= 0, got {self.max_restarts!r}")

    def check_local(self) -> None:
        """Without --address, Ray starts here: an actor must fit this machine, or it would wait forever."""
        from hpcdyn.distributed.cluster import ray_running

        if self.address or self.in_process or ray_running():  # a running Ray is checked by its own resources
            return
        cpus = os.cpu_count() or 1
        if self.cpus_per_actor > cpus:
            raise ConfigurationError(f"cpus_per_actor: {self.cpus_per_actor} per actor, this machine has {cpus} CPUs")
        if self.gpus_per_actor > 0:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if self.gpus_per_actor > gpus:
                raise ConfigurationError(
                    f"gpus_per_actor: {self.gpus_per_actor} per actor, this machine has {gpus} GPUs; use 0 to run on CPUs"
                )


def run_ensemble(
    config: EnsembleConfig,
    out: str | Path,
    placement: Placement = Placement(),
    overwrite: bool = False,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Simulate every unit not yet in the store's manifest, then finish the store; returns a summary.

    Everything is validated before the store is touched; the store is locked for the whole run, so a
    second driver on the same ``out`` is refused (rerun after the first ends: it skips what is done)."""
    from hpcdyn.storage.output_lock import output_lock

    path = Path(out).absolute()
    resolved = resolve(config, path, force)
    placement.check_local()
    with output_lock(path, "out"):
        return _run_locked(resolved, path, placement, overwrite, progress)


def _run_locked(resolved: dict[str, Any], path: Path, placement: Placement, overwrite: bool, progress: bool) -> dict[str, Any]:
    from hpcdyn.storage.ensemble_store import MANIFEST, finish, finished_units, unit_name

    _prepare_store(path, resolved, overwrite)
    for leftover in (path / MANIFEST).glob("*/.*.tmp"):  # manifest entries a killed run left half-written
        leftover.unlink(missing_ok=True)
    units = plan_units(resolved)
    done = finished_units(path)
    pending = [unit for unit in units if unit_name(unit) not in done]
    begin = time.perf_counter()
    bar = _progress_bar(len(units), len(units) - len(pending), progress)
    try:
        if pending and placement.in_process:
            runner = UnitRunner(resolved, path)
            for unit in pending:
                runner.run(unit)
                bar.update(1)
        elif pending:
            _run_on_ray(resolved, path, pending, placement, bar)
    finally:
        bar.close()
    entries = finished_units(path)
    totals = {"events": sum(entry["events"] for entry in entries.values()),
              "rejected": sum(entry["rejected"] for entry in entries.values())}  # fmt: skip
    finish(path, units, totals)
    return {
        "store": str(path),
        "engines": {model["label"]: model.get("engine", "compiled") for model in resolved["models"]},
        "units": len(units),
        "units_run": len(pending),
        "units_skipped": len(units) - len(pending),
        "seconds": time.perf_counter() - begin,
        **totals,
    }


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="unit", desc="ensemble")


def _actor_count(ray, placement: Placement, pending: int) -> int:
    """Actors that fit the cluster; asking for more than it has would wait forever, so refuse."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if placement.cpus_per_actor > cpus:
        raise ConfigurationError(f"cpus_per_actor: {placement.cpus_per_actor} per actor, the Ray cluster has {cpus:g} CPUs")
    if placement.gpus_per_actor > gpus:
        raise ConfigurationError(
            f"gpus_per_actor: {placement.gpus_per_actor} per actor, the Ray cluster has {gpus:g} GPUs; use 0 to run on CPUs"
        )
    fits = int(cpus // placement.cpus_per_actor)
    if placement.gpus_per_actor > 0:
        fits = min(fits, int(gpus // placement.gpus_per_actor))
    return max(1, min(placement.actors or fits, pending))


def _run_on_ray(config: dict[str, Any], path: Path, pending: list[dict[str, int]], placement: Placement, bar) -> None:
    from hpcdyn.distributed.cluster import import_ray, init_ray

    connected = import_ray().is_initialized()
    # Worker log lines would land in stdout, where the command prints its JSON summary; failures
    # reach the driver as exceptions instead.
    ray = init_ray(placement.address, log_to_driver=False)
    try:
        _dispatch(ray, config, path, pending, placement, bar)
    finally:
        if not connected:  # a Ray this call started or joined is left again
            ray.shutdown()


def _dispatch(ray, config: dict[str, Any], path: Path, pending: list[dict[str, int]], placement: Placement, bar) -> None:
    count = _actor_count(ray, placement, len(pending))
    worker = ray.remote(EnsembleWorker).options(
        num_cpus=placement.cpus_per_actor,
        num_gpus=placement.gpus_per_actor,
        max_restarts=placement.max_restarts,
        max_task_retries=placement.max_restarts,
    )
    actors = [worker.remote(config, str(path), placement.cpus_per_actor, placement.gpus_per_actor > 0) for _ in range(count)]
    queue = deque(pending)
    in_flight: dict[Any, tuple[Any, dict[str, int]]] = {}

    def submit(actor) -> None:
        if queue:
            unit = queue.popleft()
            in_flight[actor.run_unit.remote(unit)] = (actor, unit)

    try:
        for actor in actors:  # two calls queued per actor hide the round trip between units
            submit(actor)
            submit(actor)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, unit = in_flight.pop(ready[0])
            try:
                summary = ray.get(ready[0])
            except Exception as error:  # RayActorError (restarts exhausted) or RayTaskError (the unit raised)
                raise EnsembleError(_failure(unit, error)) from error
            bar.update(1)
            bar.set_postfix(events=summary["events"], refresh=False)
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _failure(unit: dict[str, int], error: Exception) -> str:
    from hpcdyn.storage.ensemble_store import unit_name

    cause = getattr(error, "cause", None) or error
    first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
    return f"unit {unit_name(unit)} failed ({first}); finished units are kept: rerun the same command to resume"
