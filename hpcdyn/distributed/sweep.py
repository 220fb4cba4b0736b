"""Sweeps: many trainings at once as a Ray Tune experiment, resumable, GPU-aware.

    study = Study("ntheta", base={"data.t_final": 300.0, "model.mode": 2},
                  grids=({"model.n_classes": [1, 2, 3, 4], "training.seed": [0, 1, 2]},))
    outcome = run_sweep(study, storage="runs/sweeps")          # local Ray; address=... joins a cluster

A study is plain data: a base of dotted parameters (``data.*``: the trajectory to learn from,
``model.*``: TransformerConfig, ``training.*``: TrainingConfig) and one or more grids whose
Cartesian products are joined into the trials. Every trial is validated before Ray starts.

Each trial is the ordinary ``hpcdyn.learning.training.train`` with a report hook: after every epoch the run
directory (best.pt, last.pt, metrics.jsonl) becomes a Tune checkpoint, so a retried trial or a
restored experiment continues from it exactly. Each distinct training trajectory is simulated once
into ``STORAGE/trajectories`` (deterministic from its parameters and seed; a file lock and an
atomic rename make racing trials safe) and shared by every trial that learns from it.

Rerunning a sweep with the same storage and name restores it with ``Tuner.restore``: finished
trials are kept, unfinished and failed ones continue from their last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcdyn.distributed.sweep_results import coordinate_names
from hpcdyn.learning.training import TrainingConfig
from hpcdyn.learning.transformer import TransformerConfig
from hpcdyn.physics.rates import distinct_rates
from hpcdyn.physics.systems import SYSTEMS, ConfigurationError, System, make_system

SECTIONS = ("data", "model", "training")
DATA_KEYS = ("system", "preset", "t_final", "seed", "density")
DERIVED_MODEL_KEYS = ("system", "lattice_size")  # taken from the trajectory
DERIVED_TRAINING_KEYS = ("model", "device")  # the model section; the trial's resources
DEFAULT_DATA = {"system": "active", "t_final": 100.0, "seed": 1}
METRIC = "val_U_per_T"  # what ASHA and the results rank trials by (held-out U/T, higher is better)
DEFINITION_FILE = "sweep.json"


def valid_keys() -> list[str]:
    """Every dotted parameter a study may set or sweep."""
    system_fields = {field.name for cls in SYSTEMS.values() for field in dataclasses.fields(cls)}
    data = sorted(set(DATA_KEYS) | system_fields)
    model = sorted(f.name for f in dataclasses.fields(TransformerConfig) if f.name not in DERIVED_MODEL_KEYS)
    training = sorted(f.name for f in dataclasses.fields(TrainingConfig) if f.name not in DERIVED_TRAINING_KEYS)
    return [f"data.{k}" for k in data] + [f"model.{k}" for k in model] + [f"training.{k}" for k in training]


def check_keys(keys, where: str) -> None:
    """Refuse unknown dotted keys, listing the valid ones."""
    known = set(valid_keys())
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigurationError(
            f"{unknown[0]}: unknown sweep parameter in {where}; valid keys are {', '.join(valid_keys())}"
        )


@dataclasses.dataclass(frozen=True)
class Study:
    """A declarative sweep: base parameters and the grids whose products are the trials."""

    name: str
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grids: tuple[Mapping[str, Sequence[Any]], ...] = ({},)
    description: str = ""

    def __post_init__(self) -> None:
        check_keys(self.base, f"study {self.name!r} (base)")
        for grid in self.grids:
            check_keys(grid, f"study {self.name!r} (grid)")
            for key, values in grid.items():
                if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                    raise ConfigurationError(f"{key}: a grid axis must be a non-empty list of values, got {values!r}")

    @property
    def swept_keys(self) -> list[str]:
        """The dotted keys of every grid axis, in order of first appearance."""
        return list(dict.fromkeys(key for grid in self.grids for key in grid))

    def points(self) -> list[dict[str, Any]]:
        """One full parameter dict per trial; grids joined, duplicates dropped, order kept."""
        points: dict[str, dict[str, Any]] = {}
        for grid in self.grids:
            keys = list(grid)
            for values in itertools.product(*(list(grid[key]) for key in keys)):
                point = {**self.base, **dict(zip(keys, values))}
                points.setdefault(json.dumps(point, sort_keys=True), point)
        return [_complete(point, self.swept_keys) for point in points.values()]

    def with_overrides(self, values: Mapping[str, Any] | None = None, axes: Mapping[str, Sequence[Any]] | None = None):
        """Fix parameters (``values``: removed from every grid) or replace grid axes (``axes``).

        An axis replaces that key in every grid that sweeps it, or is added to every grid if none does.
        """
        values, axes = dict(values or {}), dict(axes or {})
        check_keys(values, "--set")
        check_keys(axes, "--grid")
        grids = [{key: axis for key, axis in grid.items() if key not in values} for grid in self.grids]
        for key, axis in axes.items():
            sweeping = [grid for grid in grids if key in grid] or grids
            for grid in sweeping:
                grid[key] = list(axis)
        base = {key: value for key, value in {**self.base, **values}.items() if key not in axes}
        return dataclasses.replace(self, base=base, grids=tuple(grids))


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What one trial needs: the trajectory to simulate (or reuse) and the training configuration."""

    system: System
    t_final: float
    data_seed: int
    training: TrainingConfig


def _sections(point: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in point.items():
        section, _, field = key.partition(".")
        sections[section][field] = value
    return sections


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def _field_kinds(annotation: Any) -> tuple[type, ...] | None:
    """Python types a dataclass field annotated ``int | None`` (etc.) accepts; None when not simple."""
    names = [part.strip() for part in str(annotation).split("|")]
    if not all(name in _KINDS for name in names):
        return None
    return tuple(kind for name in names for kind in _KINDS[name])


def _field_annotations() -> dict[str, Any]:
    fields = {f"model.{f.name}": f.type for f in dataclasses.fields(TransformerConfig)}
    fields.update({f"training.{f.name}": f.type for f in dataclasses.fields(TrainingConfig)})
    for cls in SYSTEMS.values():
        fields.update({f"data.{f.name}": f.type for f in dataclasses.fields(cls)})
    fields.update({"data.t_final": "float", "data.seed": "int", "data.density": "float", "data.system": "str",
                   "data.preset": "str | None"})  # fmt: skip
    return fields


def check_value_types(point: Mapping[str, Any]) -> None:
    """Each dotted parameter has the type its field takes (an integer, a number, a string, ...)."""
    annotations = _field_annotations()
    for key, value in point.items():
        kinds = _field_kinds(annotations.get(key, ""))
        if kinds is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds):
            expected = " or ".join(sorted({kind.__name__ for kind in kinds}))
            raise ConfigurationError(f"{key}: must be {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigurationError(f"{key}: must be a finite number, got {value!r}")


def trial_setup(point: Mapping[str, Any]) -> TrialSetup:
    """Build and validate one trial's system and training configuration from its dotted parameters."""
    check_value_types(point)
    sections = _sections(point)
    data = {**DEFAULT_DATA, **sections["data"]}
    name, preset = data.pop("system"), data.pop("preset", None)
    t_final, seed = data.pop("t_final"), data.pop("seed")
    if not (isinstance(t_final, (int, float)) and math.isfinite(t_final) and t_final > 0):
        raise ConfigurationError(f"data.t_final: must be a finite simulated time > 0, got {t_final!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigurationError(f"data.seed: must be an integer >= 0, got {seed!r}")
    system = make_system(name, data, preset=preset)
    model = TransformerConfig.from_dict({**sections["model"], "system": system.name, "lattice_size": max(system.shape)})
    training = TrainingConfig.from_dict({**sections["training"], "model": model})
    return TrialSetup(system, float(t_final), seed, training)


def _complete(point: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Give every swept key a value: one a grid does not sweep takes the value the trial will use
    (Mode 1 trials of an N_theta scan sit at the default n_classes)."""
    missing = [key for key in keys if key not in point]
    if not missing:
        return point
    setup = trial_setup(point)
    owners = {"data": setup.system, "model": setup.training.model, "training": setup.training}
    completed = dict(point)
    for key in missing:
        section, _, field = key.partition(".")
        if section == "data" and field in ("t_final", "seed"):
            completed[key] = setup.t_final if field == "t_final" else setup.data_seed
        else:
            completed[key] = getattr(owners[section], field)
    return completed


def check_study(study: Study, storage: Path | None = None) -> list[dict[str, Any]]:
    """The study's trials, each validated (system, model, training, the size of its trajectory);
    raises before any work starts."""
    from hpcdyn.simulation.work_size import check_simulation_size

    points = study.points()
    for point in points:
        setup = trial_setup(point)
        out = None if storage is None else storage / "trajectories" / "trajectory.zarr"
        check_simulation_size(setup.system, setup.t_final, None, out)
    return points


def trajectory_path(system: System, t_final: float, seed: int, directory: Path) -> Path:
    """Where the trajectory of these parameters lives: a name derived from all of them."""
    identity = json.dumps({"system": system.name, "params": system.params(), "t_final": t_final, "seed": seed}, sort_keys=True)
    return directory / f"{system.name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.zarr"


def prepare_trajectory(system: System, t_final: float, seed: int, directory: str | Path) -> Path:
    """Simulate the trajectory once into ``directory``, or reuse it; safe when trials race.

    A lock file keeps a second trial from simulating the same trajectory while the first does;
    the store is written under a private name and renamed into place only when complete.
    """
    from hpcdyn.simulation.drivers import simulate_to_store

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = trajectory_path(system, t_final, seed, directory)
    with open(directory / f".{final.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        if final.exists():
            return final
        private = directory / f".{final.stem}.{uuid.uuid4().hex[:8]}.zarr"
        try:
            simulate_to_store(system, t_final=t_final, seed=seed, out=private)
            os.rename(private, final)
        finally:
            shutil.rmtree(private, ignore_errors=True)
    return final


def _tune_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars for Tune (lists stay in metrics.jsonl, which travels in the checkpoint)."""
    flat = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    for index, rate in enumerate(metrics.get("class_rates", [])):
        flat[f"class_rate_{index}"] = rate
    return flat


def train_trial(config: dict[str, Any]) -> None:
    """One Tune trial: train on the (shared) trajectory, a Tune checkpoint after every epoch.

    The latest Tune checkpoint is the authority: a retried or restored trial starts from it, or
    from nothing, never from a newer local file that Tune did not record.
    """
    import torch
    from ray import tune

    from hpcdyn.storage.trajectory_store import open_trajectory
    from hpcdyn.learning.training import train

    torch.set_num_threads(max(1, int(config["threads"])))
    setup = trial_setup(config["trial"]["point"])
    training = dataclasses.replace(setup.training, device=config["device"])
    store = prepare_trajectory(setup.system, setup.t_final, setup.data_seed, Path(config["storage"]) / "trajectories")
    run_dir = Path.cwd() / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(run_dir))

    def report(metrics: dict[str, Any], directory: Path) -> None:
        tune.report(_tune_metrics(metrics), checkpoint=tune.Checkpoint.from_directory(str(directory)))

    train(training, open_trajectory(store), run_dir, resume=checkpoint is not None, report=report)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What each trial asks of Ray, and how many run at once."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        if not (_finite(self.cpus_per_trial) and self.cpus_per_trial > 0):
            raise ConfigurationError(f"cpus_per_trial: must be a finite number > 0, got {self.cpus_per_trial!r}")
        if not (_finite(self.gpus_per_trial) and self.gpus_per_trial >= 0):
            raise ConfigurationError(f"gpus_per_trial: must be a finite number >= 0 (fractions share a GPU), got {self.gpus_per_trial!r}")
        if self.max_concurrent is not None and not (_integer(self.max_concurrent) and self.max_concurrent >= 1):
            raise ConfigurationError(f"max_concurrent: must be an integer >= 1, got {self.max_concurrent!r}")

    def check_local(self, num_cpus: int | None) -> None:
        """For a local Ray about to start (no --address): a trial must fit this machine, or Tune would
        wait forever. A Ray already running in this process is checked by its own resources later."""
        from hpcdyn.distributed.cluster import ray_running

        if ray_running():
            return
        cpus = num_cpus or os.cpu_count() or 1
        gpus = 0
        if self.gpus_per_trial > 0:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for kind, wanted, have in (("CPU", self.cpus_per_trial, cpus), ("GPU", self.gpus_per_trial, gpus)):
            if wanted > have:
                raise ConfigurationError(
                    f"{kind.lower()}s_per_trial: each trial asks for {wanted} {kind}, the Ray cluster has {have:g} "
                    f"(the local Ray this machine would start); lower --{kind.lower()}s-per-trial or use a cluster with --address"
                )

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_trial))


@dataclasses.dataclass
class SweepOutcome:
    """A finished (or partly failed) sweep: where it lives, its trials and Tune's ResultGrid."""

    path: Path
    study: Study
    points: list[dict[str, Any]]
    result_grid: Any
    restored: bool

    @property
    def errors(self) -> list[BaseException]:
        return list(self.result_grid.errors)

    @property
    def unfinished(self) -> int:
        """Trials neither finished nor failed: the sweep was interrupted (Tune returns normally on SIGINT).

        Counted against the study's points: Tune creates trials lazily, so an interrupted sweep's
        ResultGrid may lack the trials that never started.
        """
        return len(self.points) - self.result_grid.num_terminated - self.result_grid.num_errors


def _entries(study: Study, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = coordinate_names(study.swept_keys)
    entries = []
    for index, point in enumerate(points):
        label = ",".join(f"{names[key]}={point[key]}" for key in study.swept_keys if key in point)
        entries.append({"index": index, "label": label, "point": point})
    return entries


def _trial_dirname(trial) -> str:
    entry = trial.config["trial"]
    safe = "".join(character if character.isalnum() or character in "=,._-" else "_" for character in entry["label"])
    return f"trial_{entry['index']:04d}_{safe}"[:120]


def _definition(study: Study, points: list[dict[str, Any]]) -> dict[str, Any]:
    return {"study": study.name, "swept": study.swept_keys, "points": points}


def _check_same_definition(path: Path, definition: dict[str, Any]) -> None:
    """A rerun under the same name must be the same sweep, or restoring it would mix two."""
    saved_file = path / DEFINITION_FILE
    if not saved_file.exists():
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"name: {saved_file} cannot be read ({error}); it is damaged: restore it or choose another --name") from error
    if not isinstance(saved, dict) or saved != json.loads(json.dumps(definition)):
        saved = saved if isinstance(saved, dict) else {}
        raise ConfigurationError(
            f"name: a different sweep {saved.get('study')!r} with {len(saved.get('points', []))} trials is stored at "
            f"{path}; rerun it with the same options to resume it, or choose another --name"
        )


def _write_definition(path: Path, definition: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / f".{DEFINITION_FILE}.tmp"
    temporary.write_text(json.dumps(definition, indent=1))
    temporary.replace(path / DEFINITION_FILE)


def _progress_callback(total: int, enabled: bool):
    """A Tune callback with a tqdm bar of finished trials (defined here: ray is imported lazily)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.bar = None

        def __getstate__(self):  # Tune pickles callbacks with the experiment; the bar stays behind
            return {"bar": None}

        def _bar(self):
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled)
            return self.bar

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._bar().update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._bar().update(1)

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _check_cluster_resources(ray, resources: Resources) -> None:
    available = ray.cluster_resources()
    for kind, wanted in (("CPU", resources.cpus_per_trial), ("GPU", resources.gpus_per_trial)):
        if wanted > available.get(kind, 0):
            option = f"--{kind.lower()}s-per-trial"
            raise ConfigurationError(
                f"{kind.lower()}s_per_trial: each trial asks for {wanted} {kind}, the Ray cluster has "
                f"{available.get(kind, 0):g}; lower {option} or add nodes with {kind}s"
            )


def run_sweep(
    study: Study,
    storage: str | Path,
    name: str | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    resources: Resources = Resources(),
    max_failures: int = 2,
    asha: bool = False,
    progress: bool = False,
    trial: Callable[[dict[str, Any]], None] = train_trial,
) -> SweepOutcome:
    """Run (or resume) ``study`` as the Tune experiment STORAGE/NAME; returns its ResultGrid.

    ``trial`` is the function each trial runs (``train_trial``; tests wrap it to inject faults).
    Everything is validated and every path made absolute before Ray starts.
    """
    storage = Path(storage).expanduser().absolute()
    points = check_study(study, storage)
    if not (_integer(max_failures) and max_failures >= 0):
        raise ConfigurationError(f"max_failures: must be an integer >= 0, got {max_failures!r}")
    if num_cpus is not None and not (_integer(num_cpus) and num_cpus >= 1):
        raise ConfigurationError(f"num_cpus: must be an integer >= 1, got {num_cpus!r}")
    name = name or study.name
    if not name or "/" in name or name.startswith(".") or name in ("trajectories", ".."):
        raise ConfigurationError(f"name: must be a plain directory name (not 'trajectories'), got {name!r}")
    path = storage / name
    definition = _definition(study, points)
    _check_same_definition(path, definition)
    if not address:
        resources.check_local(num_cpus)
    from hpcdyn.storage.output_lock import output_lock

    with output_lock(path, "name"):
        return _run_locked(study, storage, name, path, points, definition, address, num_cpus, resources,
                           max_failures, asha, progress, trial)  # fmt: skip


def _run_locked(study, storage, name, path, points, definition, address, num_cpus, resources, max_failures, asha,
                progress, trial) -> SweepOutcome:  # fmt: skip
    from hpcdyn.distributed.cluster import init_ray

    # Snapshots at every trial checkpoint are what make a killed driver resumable; not a warning here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray = init_ray(address, num_cpus=num_cpus, log_to_driver=False)
    from ray import tune

    _check_cluster_resources(ray, resources)
    trainable = tune.with_resources(trial, {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial})
    restored = tune.Tuner.can_restore(str(path))
    if restored:
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        _write_definition(path, definition)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(study, points, storage, resources),
            tune_config=_tune_config(points, resources, asha),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # num_to_keep also makes Tune snapshot the experiment at every trial checkpoint
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_progress_callback(len(points), progress)],
                verbose=0,
            ),
        )
    with contextlib.redirect_stdout(sys.stderr):  # Tune's tables are for people; stdout stays for the summary
        result_grid = tuner.fit()
    return SweepOutcome(path, study, points, result_grid, restored)


def _param_space(study, points, storage: Path, resources: Resources) -> dict[str, Any]:
    from ray import tune

    return {
        "trial": tune.grid_search(_entries(study, points)),
        "storage": str(storage),
        "device": resources.device,
        "threads": resources.threads,
    }


def _tune_config(points, resources: Resources, asha: bool):
    from ray import tune

    scheduler = None
    if asha:
        from ray.tune.schedulers import ASHAScheduler

        max_epochs = max(trial_setup(point).training.epochs for point in points)
        scheduler = ASHAScheduler(metric=METRIC, mode="max", time_attr="training_iteration", max_t=max_epochs, grace_period=1)
    return tune.TuneConfig(
        scheduler=scheduler,
        max_concurrent_trials=resources.max_concurrent,
        trial_dirname_creator=_trial_dirname,
        trial_name_creator=_trial_dirname,
        reuse_actors=True,  # torch is imported once per worker, not once per trial
    )


def results_attrs(study: Study, points: list[dict[str, Any]], smoke: bool = False) -> dict[str, Any]:
    """What the results Dataset records about its sweep; the true rates when all trials share one trajectory."""
    attrs: dict[str, Any] = {"study": study.name, "smoke": int(smoke), "base": dict(study.base), "trials": len(points)}
    setups = [trial_setup(point) for point in points]
    data = {(s.system, s.t_final, s.data_seed) for s in setups}
    if len(data) == 1:
        attrs["true_rates"] = distinct_rates(setups[0].system)
    return attrs


@dataclasses.dataclass
class SweepSummary:
    """What a finished sweep leaves beside its Tune results: the Dataset, its figures and N*."""

    dataset: Any  # xarray.Dataset
    results_path: Path
    figures: list[Path]
    plateau: Any  # hpcdyn.distributed.sweep_results.Plateau or None


def finish_sweep(outcome: SweepOutcome, smoke: bool = False) -> SweepSummary:
    """Turn a sweep's ResultGrid into its Dataset (saved as results.zarr) and figures beside it."""
    from hpcdyn.distributed.sweep_results import records_from_result_grid, results_dataset, save_results, write_figures

    records = records_from_result_grid(outcome.result_grid)
    dataset = results_dataset(records, outcome.study.swept_keys, results_attrs(outcome.study, outcome.points, smoke))
    results_path = save_results(dataset, outcome.path)
    figures, plateau = write_figures(dataset, outcome.path)
    return SweepSummary(dataset, results_path, figures, plateau)

