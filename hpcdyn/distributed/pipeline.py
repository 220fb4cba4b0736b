"""The whole study in one call: learn the dynamics from one trajectory, then predict at other densities.

    run_pipeline("quick", "runs/pipeline")

Stages, each resumable, all on one Ray (local, or the cluster at ``address``):

1. sweep: the N_theta study (Mode 1 and Mode 2) on a trajectory simulated at density 0.124;
   results.zarr, figures and the plateau N* (``hpcdyn.distributed.sweep``). The trajectory and its
   sufficient statistics are prepared here first, once, before the trials start;
2. model: the best Mode 2 trial at N* (held-out U/T); its checkpoint is copied to DIR/models/NAME so the
   ensemble keeps a stable, named copy whatever Tune later does with its own checkpoints;
   its class rates with their 99 % intervals (``hpcdyn.learning.rate_intervals``);
   seeds (when the preset names them): the same model trained again with other training seeds
   (DIR/models/learned-seedS), with N_theta = N* - 1 and N* + 1 beside it (each seed's own N*),
   simulated at the main densities (DIR/seeds.zarr): the spread of training, a band around every
   learned curve of the report and a verdict per seed;
3. range (when the preset names stencils): the ``range`` study at N* for the sweep's seed and the
   other seeds, r* (``sweeps.range.find_range``) and r* of each seed;
4. ensemble: original and learned dynamics at several densities (``hpcdyn.distributed.ensemble``);
   rate shifts (when the preset asks): the original dynamics again with each class rate of the chosen
   model shifted by a few of its standard errors (DIR/rate_shifts/), so that the report counts the
   learned rates' own errors beside the ensembles' (``analysis.rate_uncertainty``);
5. snapshots (when the preset names a lattice): both dynamics on a large lattice, DIR/snapshots.zarr;
   large (when the preset names one, e.g. ``large``): both dynamics beyond the paper's size (L 256),
   several replicas per density, DIR/large.zarr, judged in the report like the main ensemble;
6. activity: the ``activity`` study (one model learned per v_plus at density 0.124), then original
   and learned dynamics of each at the same densities: the (density, v_plus/D) maps;
7. report: observables, phase diagrams and report.md (``analysis.report``), N* and r* first.

Rerunning the same call resumes: the sweep restores (finished trials are kept), the ensemble skips
the units its manifest lists, the model copy is checked against its digest, and the report is redone
(it is cheap). DIR/pipeline.json records the preset and each finished stage (it is written first,
so an interrupted first run is recognised); a different preset in the same directory is refused
rather than mixed, and so is a directory that holds anything else (a trajectory store, a report).
Every option is checked before any stage starts; the directory is locked against a second driver.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from hpcdyn.physics.systems import ConfigurationError
from hpcdyn.storage import strict_json

RECORD = "pipeline.json"


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
    """Sizes of every stage of one pipeline run."""

    name: str
    smoke_sweep: bool  # the ntheta study's smoke size, else its full size
    sweep_overrides: tuple[tuple[str, Any], ...]  # dotted keys fixed for every trial
    sweep_grids: tuple[tuple[str, tuple[Any, ...]], ...]  # grid axes replaced (hpcdyn.distributed.sweep.Study.with_overrides)
    densities: tuple[float, ...]
    replicas: int
    t_final: float
    snapshot_every: float
    burn_in: float
    seed: int = 1
    # v_plus of the activity study's training trajectories (the main v_plus is already mapped by the
    # main ensemble); empty skips the activity stage
    activity_v_plus: tuple[float, ...] = ()
    # the activity models: Mode 1, or Mode 2 at the sweep's N* (the model the main ensemble runs)
    activity_mode: int = 1
    activity_replicas: int | None = None  # replicas of each activity ensemble (None: replicas)
    activity_snapshot_every: float | None = None  # None: snapshot_every
    # the range study (sweeps/range.py): Mode 2 at N* over these stencils (empty: no range stage), and
    # Mode 1 over them with range_mode1; range_overrides change the sweep's values for it (its trajectory)
    range_stencils: tuple[str, ...] = ()
    range_mode1: bool = False
    range_overrides: tuple[tuple[str, Any], ...] = ()
    # snapshots on a large lattice: original and learned dynamics at these densities on L x L
    # (a few replicas, a few snapshots; DIR/snapshots.zarr); None: no such stage
    snapshot_L: int | None = None
    snapshot_densities: tuple[float, ...] = ()
    snapshot_t_final: float = 100.0
    snapshot_interval: float = 25.0
    snapshot_replicas: int = 1
    # beyond the paper: original and learned dynamics on large_L x large_L at these densities, enough
    # replicas for standard errors (DIR/large.zarr), judged by the family rule; None: no such stage
    large_L: int | None = None
    large_densities: tuple[float, ...] = ()
    large_replicas: int = 8
    large_t_final: float = 60.0
    large_burn_in: float = 20.0
    large_snapshot_every: float = 2.0
    # other training seeds of the chosen model (Mode 2 at N*, the sweep's settings, the same
    # trajectory), each simulated like it at the main densities (DIR/seeds.zarr); empty: no such stage
    seed_models: tuple[int, ...] = ()
    # the learned rates' own errors in the comparison (analysis/rate_uncertainty.py): the original
    # dynamics again with each class rate of the chosen model shifted by this many of its standard
    # errors (DIR/rate_shifts/, rate_shift_replicas replicas, None: replicas); None: no such stage
    rate_shift_errors: float | None = None
    rate_shift_replicas: int | None = None

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["sweep_overrides"] = dict(self.sweep_overrides)
        values["sweep_grids"] = {key: list(axis) for key, axis in self.sweep_grids}
        values["range_overrides"] = dict(self.range_overrides)
        for name in ("densities", "activity_v_plus", "range_stencils", "snapshot_densities", "large_densities",
                     "seed_models"):
            values[name] = list(getattr(self, name))
        return values


# The paper's study at the paper's size in minutes on 2 CPU cores: the training trajectory of the
# paper (L 30, density 0.124, T 500, about 0.86 M events) learned by one-layer hard-local models
# (vn1 attention) on its exact sufficient statistics (an epoch costs one network call per distinct
# environment, ~2,400 here), the N_theta scan 1..6 and Mode 1; their dynamics run on environment
# tables (the table engine: exact, millions of events per second) at the densities of the phase
# diagram on L 30. Mode 2 needs no recipe option on statistics (README).
QUICK = PipelinePreset(
    name="quick",
    smoke_sweep=True,
    # One epoch: Mode 2 starts from the maximum-likelihood partition (the classifier fitted to it,
    # then 50 expected-U steps), which lands on the answer; three more epochs moved the held-out
    # gap of N_theta 4 from 1.1e-5 to 9e-6 nats/event at a third of the trial's time. d_model 16
    # costs 0.6-0.75 of 32 per step and ends as close (gap 5e-6, every kind in its own class). The
    # classifier's fit to the partition (most of a trial) at 10x the lr reaches its best state in a third
    # of the steps with the same held-out U to the nat on this trajectory and the activity study's; not
    # on the range study's small one (below; benchmarks/TRAINING.md, classifier-lr).
    sweep_overrides=(("data.L", 30), ("data.t_final", 500.0), ("model.attention_stencil", "vn1"),
                     ("model.rotary", False), ("model.n_layers", 1), ("model.d_model", 16), ("model.n_heads", 2),
                     ("model.d_ff", 32), ("training.statistics", True), ("training.statistics_steps", 50),
                     ("training.lr", 3e-3), ("training.classifier_lr", 3e-2), ("training.epochs", 1),
                     ("training.patience", 1)),  # fmt: skip
    sweep_grids=(("model.n_classes", (1, 2, 3, 4, 5, 6)), ("training.seed", (0,))),  # 7 trials with Mode 1
    densities=(0.1, 0.124, 0.2, 0.3, 0.4, 0.5, 0.6),
    # both engines run at millions of events per second: long enough to settle the dense states
    replicas=24,
    t_final=100.0,
    snapshot_every=0.5,
    burn_in=40.0,
    # with the main 25: v_plus/D = 25, 50, 100 and 250, a 7 x 4 map; each learned like the main model
    # (Mode 2 at N*: Mode 1 models of this size differ from their original dynamics, max |z| 13 at
    # v_plus 5), simulated with fewer replicas and snapshots. Not fewer than 16: a standard error
    # from 8 replicas makes the z's heavy-tailed (t with ~14 degrees of freedom, variance 1.17), and
    # an exact model (rates n/E) failed the family rule at v_plus 5 (max |z| 3.01, p 0.0097)
    activity_v_plus=(2.5, 5.0, 10.0),
    activity_mode=2,
    activity_replicas=16,
    activity_snapshot_every=2.0,
    # r*: vn1 against block3 at N*. On the paper's trajectory a block3 model has 152 k environments
    # (2,429 for vn1) and a trial costs over 12 min of one core; the range study's own small
    # trajectory (L 12, T 40: 13 k events, 5.7 k block3 environments) costs about one N_theta trial. Its
    # classifier fits at the trainer's lr: at 10x, block3 with seed 1 lost 220 nats of held-out U (gap
    # 0.17 nats/event against 0.005) and vn1 with seed 2 lost 2, on so few events per environment
    range_stencils=("vn1", "block3"),
    range_overrides=(("data.L", 12), ("data.t_final", 40.0), ("training.classifier_lr", None)),
    # the spread of training: the chosen model trained again with seeds 1 and 2 (with N_theta N* - 1
    # and N* + 1: six trials of about one N_theta trial each), simulated like it: a band around every
    # learned curve, N* of each seed; the range study runs every seed too (r* of each)
    seed_models=(1, 2),
    # The rates learned from the paper's trajectory are off by their standard errors (D from ~10^4
    # rotations: 1 %), which these ensembles resolve: the original dynamics at the learned rates
    # differs from it in n_c at density 0.4 by 3.2 standard errors, as the learned model does (3.5).
    # Their response is measured (one original ensemble per class, the rate 5 standard errors up) and
    # its variance added to the z's. 12 replicas: the added standard error is then known to ~0.35 of
    # an ensemble's standard error (sqrt(1 + 24 / 12) / 5)
    rate_shift_errors=5.0,
    rate_shift_replicas=12,
    # the clusters, learned beside original, on 128 x 128 (8 k particles at 0.5)
    snapshot_L=128,
    snapshot_densities=(0.3, 0.5),
    snapshot_t_final=100.0,
    snapshot_interval=25.0,
    snapshot_replicas=1,
)

PRESETS = {
    "quick": QUICK,
    # The quick study, then learned against original dynamics at 70x the paper's number of particles:
    # L 256 at densities 0.124, 0.3 and 0.5 (8 k to 33 k particles), the learned model on its
    # environment table (any lattice size), 8 replicas per density on Ray actors (measured: 217 M events,
    # 70 s on 2 cores; the whole preset 450 s). The training trajectory is ten times the paper's
    # (T 5000, about 8.6 M events): at this size the observables resolve a 1 % error in a rate (the
    # paper's T 500 gives D from about 10^4 rotations, 1 % standard error; a model learned from it had D
    # 1.8 % high and its f4 at density 0.5 differed by 3.7 standard errors, as did the original dynamics
    # at its rates). Statistics make the longer trajectory cheap: an epoch costs one network call per
    # distinct environment, as many as on the paper's.
    "large": dataclasses.replace(QUICK, name="large", large_L=256, large_densities=(0.124, 0.3, 0.5), large_replicas=8,
                                 large_t_final=60.0, large_burn_in=20.0, large_snapshot_every=2.0,
                                 sweep_overrides=tuple((key, 5000.0 if key == "data.t_final" else value)
                                                       for key, value in QUICK.sweep_overrides)),  # fmt: skip
    # The paper-scale study for GPU nodes or a cluster: the full N_theta scan (3 seeds) on the paper's
    # 30 x 30 lattice, ensembles from density 0.1 to 0.6.
    "paper": PipelinePreset(
        name="paper",
        smoke_sweep=False,
        sweep_overrides=(("data.L", 30), ("data.t_final", 300.0)),
        sweep_grids=(),
        densities=(0.1, 0.124, 0.2, 0.3, 0.4, 0.5, 0.6),
        replicas=64,
        t_final=400.0,
        snapshot_every=2.0,
        burn_in=100.0,
        activity_v_plus=(2.5, 5.0, 10.0, 50.0),
        # the learned rates' own errors in the comparison, as in the quick preset
        rate_shift_errors=5.0,
        rate_shift_replicas=32,
    ),
}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Where and how the stages run."""

    address: str | None = None  # a Ray cluster; None starts a local Ray
    num_cpus: int | None = None  # size of a local Ray
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    progress: bool = False

    def __post_init__(self) -> None:
        """Every option validated by the stage that uses it, now, before any stage starts."""
        from hpcdyn.distributed.ensemble import Placement
        from hpcdyn.distributed.sweep import Resources

        if self.num_cpus is not None and not (isinstance(self.num_cpus, int) and self.num_cpus >= 1):
            raise ConfigurationError(f"num_cpus: must be an integer >= 1, got {self.num_cpus!r}")
        if self.address and self.num_cpus is not None:
            raise ConfigurationError("num_cpus: --num-cpus sizes a local Ray; a cluster at --address has its own CPUs")
        resources = Resources(self.cpus_per_trial, self.gpus_per_trial, None)
        placement = Placement(address=self.address, cpus_per_actor=self.cpus_per_actor, gpus_per_actor=self.gpus_per_actor)
        if not self.address:
            resources.check_local(self.num_cpus)
            placement.check_local()


def get_preset(name: str) -> PipelinePreset:
    if name not in PRESETS:
        raise ConfigurationError(f"preset: no preset named {name!r}; the presets are {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# what a pipeline directory may hold besides hidden temporary files
PIPELINE_ENTRIES = (RECORD, "sweeps", "models", "ensemble.zarr", "seeds.zarr", "rate_shifts", "snapshots.zarr", "large.zarr",
                    "activity", "report")


def _read_record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"out: {path} cannot be read ({error}); restore it or choose another --out") from error
    if not isinstance(record, dict):
        raise ConfigurationError(f"out: {path} is not a pipeline record; restore it or choose another --out")
    return record


def check_pipeline_directory(out: Path) -> None:
    """--out is new, or a pipeline directory: nothing in it that a pipeline does not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigurationError(f"out: {out} is a file, not a pipeline directory; choose another --out")
    foreign = sorted(item.name for item in out.iterdir() if item.name not in PIPELINE_ENTRIES and not item.name.startswith("."))
    if foreign:
        raise ConfigurationError(
            f"out: {out} holds {foreign[0]!r}, which no pipeline writes (it is not a pipeline directory); "
            "choose a new or empty --out"
        )


def _write_record(out: Path, record: dict[str, Any]) -> None:
    temporary = out / f".{RECORD}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(strict_json.dumps(record, indent=2) + "\n")
    temporary.replace(out / RECORD)


def _check_same_preset(record: dict[str, Any], preset: PipelinePreset, out: Path) -> None:
    """Refuse a directory run with other settings. A setting the record lacks came with a later
    version (a new stage): the run resumes and does that stage."""
    recorded = record.get("preset", {})
    if record and any(recorded.get(key, value) != value for key, value in preset.as_dict().items()):
        raise ConfigurationError(
            f"out: {out} holds a pipeline run with preset {record.get('preset', {}).get('name')!r} and other "
            f"settings; resume it with the same preset or choose another --out"
        )


def _run_study(study, name: str, smoke: bool, out: Path, options: PipelineOptions):
    """Run (or resume) one study under DIR/sweeps/NAME; its finished summary, or a clear error."""
    from hpcdyn.distributed.sweep import Resources, finish_sweep, run_sweep

    outcome = run_sweep(
        study,
        storage=out / "sweeps",
        name=name,
        address=options.address,
        num_cpus=options.num_cpus,
        resources=Resources(options.cpus_per_trial, options.gpus_per_trial, None),
        progress=options.progress,
    )
    if outcome.unfinished:
        raise ConfigurationError(f"sweep: {name} interrupted with {outcome.unfinished} trial(s) unfinished; rerun to resume")
    if outcome.errors:
        raise ConfigurationError(
            f"sweep: {len(outcome.errors)} {name} trial(s) failed after retries; rerun the pipeline to retry them "
            f"(first error: {str(outcome.errors[0]).splitlines()[0][:200]})"
        )
    return outcome, finish_sweep(outcome, smoke=smoke)


def prepare_study_data(study, out: Path) -> list[str]:
    """Simulate each training trajectory of a study and compute its sufficient statistics and its
    held-out U under the generating rates, here, once.

    A trial does these itself when they are missing, but the trials that start together then wait
    for the one that simulates and for the one that computes the statistics (each holding a core while
    it waits), and each would score the held-out events under the true rates again (2-4 s a trial on
    the quick preset); done here first, every trial finds them ready. Returns the stores' paths."""
    from hpcdyn.distributed.sweep import check_study, prepare_trajectory, trial_setup
    from hpcdyn.learning.statistics import cached_statistics
    from hpcdyn.learning.training import true_validation
    from hpcdyn.storage.trajectory_store import open_trajectory

    directory = out / "sweeps" / "trajectories"
    stores: dict[Path, set] = {}
    held_out: dict[tuple, Any] = {}  # one training config per store and held-out window
    for point in check_study(study, out / "sweeps"):
        setup = trial_setup(point)
        store = prepare_trajectory(setup.system, setup.t_final, setup.data_seed, directory)
        training = setup.training
        family = training.model.key_family if training.model.hard_local else None
        if training.statistics and family is not None:
            stores.setdefault(store, set()).add((family, training.validation_fraction, training.max_train_events))
        else:
            stores.setdefault(store, set())
        window = (store, training.validation_fraction, training.max_train_events, training.segment_events)
        held_out.setdefault(window, training)
    for store, needs in stores.items():
        for family, fraction, max_events in sorted(needs, key=repr):
            cached_statistics(open_trajectory(store), family, fraction, max_events)
    for (store, *_), training in held_out.items():
        true_validation(open_trajectory(store), training)
    return [str(store) for store in stores]


def sweep_stage(preset: PipelinePreset, out: Path, options: PipelineOptions) -> dict[str, Any]:
    """The N_theta study; returns its summary (N*, results path, the chosen trial)."""
    from sweeps import get_study

    study = get_study("ntheta", smoke=preset.smoke_sweep).with_overrides(
        dict(preset.sweep_overrides), dict(preset.sweep_grids)
    )
    prepare_study_data(study, out)
    outcome, finished = _run_study(study, "ntheta", preset.smoke_sweep, out, options)
    plateau = finished.plateau
    n_star = None if plateau is None else plateau.n_star
    return {
        "path": str(outcome.path),
        "results": str(finished.results_path),
        "figures": [str(path) for path in finished.figures],
        "n_star": n_star,
        "best_trial": chosen_trial(finished.dataset, n_star),
        "best_overall": best_trial(finished.dataset),
    }


def chosen_trial(dataset, n_star: int | None) -> dict[str, Any]:
    """The model the ensembles run: the best Mode 2 trial at N_theta = N*, else the best trial.

    Beyond N* a class gains less than the noise (on the paper's trajectory N_theta 5 puts a handful
    of forward hops in a fifth class at rate 51 and scores 1e-6 nats/event above N_theta 4): the
    plateau's first model is the one whose classes are the processes of the dynamics."""
    if n_star is not None and "n_classes" in dataset.dims and n_star in dataset["n_classes"].values:
        part = dataset.sel(n_classes=[n_star])
        if "mode" in part.dims and 2 in part["mode"].values:
            part = part.sel(mode=[2])
        if int((part["status"] == "done").sum()):
            return best_trial(part)
    return best_trial(dataset)


def best_trial(dataset) -> dict[str, Any]:
    """The finished trial with the highest held-out U/T: its coordinates, figures and checkpoint."""
    import numpy as np

    scores = dataset["val_U_per_T"].where(dataset["status"] == "done")
    if int(scores.notnull().sum()) == 0:
        raise ConfigurationError("sweep: no trial finished; nothing to simulate")
    flat = scores.stack(trial_index=scores.dims)
    chosen = flat.isel(trial_index=int(np.nanargmax(flat.values)))
    coordinates = {name: chosen[name].item() for name in scores.dims}
    location = dataset.sel(coordinates)
    rates = location["class_rate"].values.tolist() if "class_rate" in location else []
    return {
        "coordinates": {name: (value if not isinstance(value, float) or value == value else None) for name, value in coordinates.items()},
        "trial": str(location["trial"].item()),
        "checkpoint": str(location["checkpoint"].item()),
        "val_U_per_T": float(location["val_U_per_T"].item()),
        "true_val_U_per_T": float(location["true_val_U_per_T"].item()),
        "gap_per_event": float(location["gap_per_event"].item()),
        "class_rates": [float(rate) for rate in rates if rate == rate],  # Mode 2, ascending
    }


def model_stage(best: dict[str, Any], out: Path, name: str = "learned") -> dict[str, Any]:
    """Copy the chosen checkpoint to DIR/models/NAME/best.pt (atomically; kept if already there)."""
    from hpcdyn.distributed.ensemble import file_digest

    source = Path(best["checkpoint"])
    directory = out / "models" / name
    target = directory / "best.pt"
    if not target.exists():
        if not source.exists():
            raise ConfigurationError(f"sweep: the best trial's checkpoint {source} is missing; rerun the pipeline")
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".best.pt.{uuid.uuid4().hex[:8]}"
        shutil.copyfile(source, temporary)
        temporary.replace(target)
    return {"run_dir": str(directory), "sha256": file_digest(target), "from_trial": best["trial"]}


def class_evidence(run_dir: str | Path) -> dict[str, Any]:
    """A Mode 2 model's class rates with their 99 % intervals (events and exposure on the training part,
    ``hpcdyn.learning.rate_intervals``), which class covers each true rate, and whether the lowest is
    blocked; empty for a Mode 1 model."""
    from hpcdyn.learning.rate_intervals import class_rates_with_intervals
    from hpcdyn.learning.training import load_model

    model, _ = load_model(run_dir)
    if model.config.mode != 2:
        return {}
    evidence = class_rates_with_intervals(run_dir)
    return {"classes": [entry.as_dict() for entry in evidence.classes], "true_rates": evidence.true_rates,
            "covered_by": evidence.covering(), "matched_by": evidence.matching(), "blocked": evidence.blocked()}  # fmt: skip


def _missed_words(model: dict[str, Any], name: str) -> str:
    """A true rate no class's interval covers, and the class that holds its moves all the same, if one does
    (``RateEvidence.matching``: its n/E within MATCH_ERRORS standard errors; the learned rates' errors are
    then still counted in the comparison)."""
    value = model["true_rates"][name]
    index = (model.get("matched_by") or {}).get(name)
    if index is None:
        return f"{name} {value:g}"
    from hpcdyn.learning.rate_intervals import ClassRate

    errors = ClassRate(**model["classes"][index]).errors_from(value)
    return f"{name} {value:g} (its moves in class {index} all the same, {errors:.1f} standard errors off)"


def interval_words(model: dict[str, Any]) -> str | None:
    """The class rates with their intervals and what they cover, in one sentence (None without them)."""
    if not model.get("classes"):
        return None
    rates = "; ".join(f"{entry['rate']:.4g} [{entry['low']:.4g}, {entry['high']:.4g}] ({entry['events']:,} events)"
                      for entry in model["classes"])  # fmt: skip
    covered = [f"{name} {model['true_rates'][name]:g} by class {index}" for name, index in model["covered_by"].items()
               if index is not None]  # fmt: skip
    missed = [_missed_words(model, name) for name, index in model["covered_by"].items() if index is None]
    words = f"Class rates with 99 % intervals (n/E on the training part, standard error sqrt(n)/E): {rates}. "
    words += ("They cover " + ", ".join(covered)) if covered else "They cover no true rate"
    words += (f"; NOT covered: {', '.join(missed)}" if missed else "")
    lowest = min(model["true_rates"].values())
    return words + (f"; the lowest class is below 1e-3 x {lowest:g} (blocked moves)." if model["blocked"] else
                    f"; no class lies below 1e-3 x {lowest:g}.")  # fmt: skip


def ensemble_stage(preset: PipelinePreset, model_dir: str | tuple[str, ...], store: Path, options: PipelineOptions,
                   **changes: Any) -> dict[str, Any]:  # fmt: skip
    """Original and learned dynamics at the preset's densities; system parameters from the checkpoint.

    ``model_dir``: one learned model, or several (then only those, without the original dynamics).
    ``changes``: EnsembleConfig fields that differ from the preset's (another L, fewer replicas)."""
    from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble

    config = EnsembleConfig(
        models=("original", model_dir) if isinstance(model_dir, str) else tuple(model_dir),
        densities=preset.densities,
        replicas=preset.replicas,
        t_final=preset.t_final,
        snapshot_every=preset.snapshot_every,
        burn_in=preset.burn_in,
        seed=preset.seed,
    )
    config = dataclasses.replace(config, **changes)
    placement = Placement(address=options.address, cpus_per_actor=options.cpus_per_actor,
                          gpus_per_actor=options.gpus_per_actor)  # fmt: skip
    return run_ensemble(config, store, placement, progress=options.progress)


def snapshots_stage(preset: PipelinePreset, model_dir: str, out: Path, options: PipelineOptions) -> dict[str, Any]:
    """Original and learned dynamics on a large lattice (DIR/snapshots.zarr): the clusters to look at.

    The learned model runs on its environment table, which serves any lattice size."""
    return ensemble_stage(preset, model_dir, out / "snapshots.zarr", options, L=preset.snapshot_L,
                          densities=preset.snapshot_densities, replicas=preset.snapshot_replicas,
                          t_final=preset.snapshot_t_final, snapshot_every=preset.snapshot_interval, burn_in=0.0)  # fmt: skip


def seeds_stage(preset: PipelinePreset, n_star: int | None, out: Path, options: PipelineOptions) -> dict[str, Any]:
    """The chosen model trained again with other seeds, each simulated like it (DIR/seeds.zarr, no original).

    Each seed also trains N_theta = N* - 1 and N* + 1, so its own plateau is checked around N*
    (``n_star_by_seed``): the seed spread of N*, at a fraction of a whole scan per seed."""
    from hpcdyn.distributed.sweep import Study
    from hpcdyn.distributed.sweep_results import find_plateau
    from sweeps import get_study

    base = get_study("ntheta", smoke=preset.smoke_sweep).base
    fixed = {**base, **dict(preset.sweep_overrides), "model.mode": 2}
    chosen = n_star if n_star is not None else 4
    near = [n for n in (chosen - 1, chosen, chosen + 1) if n >= 1]
    study = Study(SEED_STUDY, base=fixed, grids=({"training.seed": list(preset.seed_models), "model.n_classes": near},),
                  description="the chosen model (Mode 2 at N*) trained with other seeds, and N* - 1, N* + 1 beside it")  # fmt: skip
    prepare_study_data(study, out)
    outcome, finished = _run_study(study, SEED_STUDY, preset.smoke_sweep, out, options)
    models, n_star_by_seed = {}, {}
    for seed in preset.seed_models:
        own = finished.dataset.sel(seed=[seed])
        best = best_trial(own.sel(n_classes=[chosen]))
        models[str(seed)] = {**model_stage(best, out, f"learned-seed{seed}"), "class_rates": best.get("class_rates", []),
                             "gap_per_event": best["gap_per_event"], "val_U_per_T": best["val_U_per_T"]}  # fmt: skip
        n_star_by_seed[str(seed)] = find_plateau(own).n_star
    ensemble = ensemble_stage(preset, tuple(model["run_dir"] for model in models.values()), out / "seeds.zarr", options)
    return {"path": str(outcome.path), "results": str(finished.results_path), "models": models,
            "n_theta_checked": near, "n_star_by_seed": n_star_by_seed, **ensemble}  # fmt: skip


# The seeds' study has its own name: a directory from before it trained N* - 1 and N* + 1 holds a
# "seeds" study with other trials, which a sweep of the same name would refuse to mix with
SEED_STUDY = "seed-scan"


def rate_shift_stage(preset: PipelinePreset, model: dict[str, Any], out: Path, options: PipelineOptions) -> dict[str, Any]:
    """The original dynamics with each class rate of the chosen model shifted by ``rate_shift_errors`` of
    its standard errors (DIR/rate_shifts/classK.zarr; the main ensemble's system, densities and times):
    the response that carries the learned rates' own errors into the comparison (``analysis.rate_uncertainty``).
    No shift for a Mode 1 model, or one whose classes miss a true rate (its comparison counts the ensembles alone)."""
    from analysis.rate_uncertainty import rate_shifts
    from hpcdyn.distributed.ensemble import ORIGINAL
    from hpcdyn.storage.ensemble_store import stored_config

    system = dict(stored_config(out / "ensemble.zarr")["system"])
    name = system.pop("name")
    entries = []
    for index, shift in enumerate(rate_shifts(model, preset.rate_shift_errors)):
        store = out / "rate_shifts" / f"class{shift.class_index}.zarr"
        store.parent.mkdir(parents=True, exist_ok=True)
        # seeds of their own: each shifted ensemble independent of the main one (the noise of a difference)
        ensemble = ensemble_stage(preset, (ORIGINAL,), store, options, system=name, **{**system, **shift.rates},
                                  replicas=preset.rate_shift_replicas or preset.replicas, seed=preset.seed + 1 + index)  # fmt: skip
        entries.append({**shift.as_dict(), "store": str(store), "units_run": ensemble["units_run"],
                        "units_skipped": ensemble["units_skipped"]})  # fmt: skip
    return {"shift_errors": preset.rate_shift_errors, "shifts": entries}


def large_stage(preset: PipelinePreset, model_dir: str, out: Path, options: PipelineOptions) -> dict[str, Any]:
    """Original and learned dynamics beyond the paper's size (DIR/large.zarr), replicas enough to judge them."""
    return ensemble_stage(preset, model_dir, out / "large.zarr", options, L=preset.large_L, densities=preset.large_densities,
                          replicas=preset.large_replicas, t_final=preset.large_t_final,
                          snapshot_every=preset.large_snapshot_every, burn_in=preset.large_burn_in)  # fmt: skip


def range_study(preset: PipelinePreset, n_star: int | None):
    """The range study (sweeps/range.py) with the sweep's model and training: Mode 2 at N* over the
    preset's stencils (and Mode 1 with ``range_mode1``), on the trajectory of ``range_overrides``."""
    from sweeps import get_study

    fixed = {key: value for key, value in preset.sweep_overrides
             if key not in ("model.mode", "model.n_classes", "model.attention_stencil")}  # fmt: skip
    fixed.update(dict(preset.range_overrides))
    study = get_study("range", smoke=preset.smoke_sweep)
    if not preset.range_mode1:
        study = dataclasses.replace(study, grids=tuple(grid for grid in study.grids if 1 not in grid.get("model.mode", ())))
    seeds = list(dict.fromkeys([*dict(preset.sweep_grids).get("training.seed", (0,)), *preset.seed_models]))
    # the widest stencil's trials first: they cost the most (block3 3-4 x vn1 on the quick preset), and
    # started first the cheap ones fill the other cores beside them instead of one long trial ending alone
    widest_first = sorted(preset.range_stencils, key=_stencil_size, reverse=True)
    axes: dict[str, Any] = {"model.attention_stencil": widest_first, "training.seed": seeds}
    if n_star is not None:
        axes["model.n_classes"] = [n_star]
    return study.with_overrides(fixed, axes)


def _stencil_size(name: str) -> tuple[int, int]:
    """(attended sites, side of the counted block): what a stencil's environments grow with."""
    from hpcdyn.learning.names import ATTENTION_STENCILS, split_stencil

    attended, side = split_stencil(name)
    return len(ATTENTION_STENCILS[attended]), side or 0


def range_stage(preset: PipelinePreset, n_star: int | None, out: Path, options: PipelineOptions) -> dict[str, Any]:
    """The range study: held-out U/T against the attention stencil, r* (``sweeps.range.find_range``)."""
    from sweeps import study_summary

    study = range_study(preset, n_star)
    prepare_study_data(study, out)
    outcome, finished = _run_study(study, "range", preset.smoke_sweep, out, options)
    summary = study_summary("range", finished.dataset, outcome.path)
    return {
        "path": str(outcome.path),
        "results": str(finished.results_path),
        "figures": [str(path) for path in finished.figures] + list(summary["figures"]),
        "r_star": summary["r_star"],
        "r_star_by_seed": r_star_by_seed(finished.dataset),
        "range": summary["range"],
        "lines": summary["lines"],
    }


def r_star_by_seed(dataset) -> dict[str, dict[str, str | None]]:
    """r* of each training seed alone (the range study's own r* takes their mean and spread): {seed: {mode_M: r*}}."""
    from sweeps.range import find_range

    if "seed" not in dataset.dims:
        return {}
    found = {}
    for seed in dataset["seed"].values.tolist():
        plateau = find_range(dataset.sel(seed=[seed]))
        found[str(seed)] = {f"mode_{mode}": name for mode, name in plateau.r_star.items()}
    return found


def activity_stage(preset: PipelinePreset, out: Path, options: PipelineOptions, n_star: int | None = None) -> dict[str, Any]:
    """The activity study, then one ensemble store per v_plus: its original and learned dynamics."""
    from sweeps import get_study

    # the ntheta study's model and training sizes, one axis over v_plus; Mode 1, or Mode 2 at N*
    fixed = {key: value for key, value in preset.sweep_overrides if key not in ("model.mode", "model.n_classes")}
    if preset.activity_mode == 2:
        fixed.update({"model.mode": 2, "model.n_classes": n_star if n_star is not None else 4})
    seeds = dict(preset.sweep_grids).get("training.seed", (0,))
    study = get_study("activity", smoke=preset.smoke_sweep).with_overrides(
        fixed, {"data.v_plus": preset.activity_v_plus, "training.seed": seeds}
    )
    prepare_study_data(study, out)
    outcome, finished = _run_study(study, "activity", preset.smoke_sweep, out, options)
    changes: dict[str, Any] = {}
    if preset.activity_replicas is not None:
        changes["replicas"] = preset.activity_replicas
    if preset.activity_snapshot_every is not None:
        changes["snapshot_every"] = preset.activity_snapshot_every
    stores = {}
    for v_plus in preset.activity_v_plus:
        best = best_trial(finished.dataset.sel(v_plus=[v_plus]))
        model = model_stage(best, out, f"activity-vp{v_plus:g}")
        store = out / "activity" / f"vp{v_plus:g}.zarr"
        store.parent.mkdir(parents=True, exist_ok=True)
        ensemble = ensemble_stage(preset, model["run_dir"], store, options, **changes)
        stores[f"{v_plus:g}"] = {"store": str(store), "model": model, "gap_per_event": best["gap_per_event"],
                                 "class_rates": best["class_rates"], "units_run": ensemble["units_run"],
                                 "units_skipped": ensemble["units_skipped"]}  # fmt: skip
    return {"path": str(outcome.path), "results": str(finished.results_path), "stores": stores}


def headline(stages: dict[str, Any]) -> list[str]:
    """What the study found, in words: N*, the chosen model, r* (report.md states these first)."""
    sweep = stages["sweep"]
    best = sweep["best_trial"]
    coordinates = best["coordinates"]
    model = f"Mode {coordinates.get('mode')}" + (f", N_theta {coordinates['n_classes']}" if coordinates.get("mode") == 2 else "")
    rates = ", ".join(f"{rate:.4g}" for rate in best.get("class_rates", []))
    lines = [f"N* = {sweep['n_star']}: the N_theta scan's held-out U/T reaches its plateau at {sweep['n_star']} classes of move "
             f"(`{sweep['path']}`).",
             f"The learned model ({model}, held-out gap {best['gap_per_event']:.2g} nats/event)"
             + (f" has class rates {rates}." if rates else ".")]  # fmt: skip
    if (words := interval_words(stages.get("model", {}))) is not None:
        lines.append(words)
    if "range" in stages:
        found = stages["range"]["r_star"]
        words = "; ".join(f"r* = {name} ({RANGE_WORDS.get(name, name)}) for Mode {mode.split('_')[-1]}"
                          for mode, name in found.items())  # fmt: skip
        lines.append(f"{words}: the held-out U/T does not rise beyond that attention stencil (`{stages['range']['path']}`).")
    if (choices := choice_spread(stages)) is not None:
        lines.append(choices)
    spread = seed_spread(stages)
    return lines + ([spread + f" (`{stages['seeds']['store']}`, the band of every learned curve)."] if spread else [])


def choice_spread(stages: dict[str, Any]) -> str | None:
    """N* and r* of every training seed, in one sentence (None without the seeds stage)."""
    if "seeds" not in stages or "n_star_by_seed" not in stages["seeds"]:
        return None
    seeds = stages["seeds"]
    checked = seeds["n_theta_checked"]

    def bounded(value: int | None) -> str:  # the seeds' scans are local: an end of it is a bound
        if value is None:
            return "none"
        if value == min(checked) and value > 1:
            return f"<= {value}"
        return f">= {value}" if value == max(checked) and value != stages["sweep"]["n_star"] else str(value)

    per_seed = ", ".join(f"{bounded(value)} for seed {seed}" for seed, value in seeds["n_star_by_seed"].items())
    words = (f"Across training seeds: N* = {stages['sweep']['n_star']} for seed "
             f"{stages['sweep']['best_trial']['coordinates'].get('seed', 0)} (its scan over every N_theta), {per_seed} "
             f"(each seed's own plateau over N_theta {min(checked)}-{max(checked)})")  # fmt: skip
    by_seed = stages.get("range", {}).get("r_star_by_seed") or {}
    if by_seed:
        for mode in sorted({mode for found in by_seed.values() for mode in found}):
            names = ", ".join(f"{found.get(mode)} for seed {seed}" for seed, found in by_seed.items())
            words += f"; r* (Mode {mode.split('_')[-1]}) = {names}"
    return words + "."


def seed_spread(stages: dict[str, Any]) -> str | None:
    """The chosen model's numbers across its training seeds: class rates (min-max) and held-out gaps."""
    if "seeds" not in stages:
        return None
    best = stages["sweep"]["best_trial"]
    runs = [(best["coordinates"].get("seed", 0), best)] + [(int(seed), model) for seed, model in stages["seeds"]["models"].items()]
    rates = [run.get("class_rates") or [] for _, run in runs]
    words = f"Across training seeds {', '.join(str(seed) for seed, _ in runs)}"
    if rates and all(len(row) == len(rates[0]) and row for row in rates):
        columns = list(zip(*rates))
        words += ": class rates " + ", ".join(f"{min(column):.4g}-{max(column):.4g}" for column in columns)
        words += ";"
    gaps = [run["gap_per_event"] for _, run in runs]
    return words + f" held-out gap {min(gaps):.2g} to {max(gaps):.2g} nats/event"


RANGE_WORDS = {"vn1": "nearest neighbours", "block3": "the 3 x 3 block", "diamond2": "the radius-2 diamond", "block5": "the 5 x 5 block"}


def report_stage(out: Path, stages: dict[str, Any], activity_stores: list[str], options: PipelineOptions) -> dict[str, Any]:
    """The report; each store's per-chunk observables as tasks on the pipeline's Ray (the cluster
    labelling holds the GIL: dask threads here use one core, the tasks every core)."""
    from analysis.report import write_report
    from hpcdyn.distributed.analysis_tasks import RayTasks
    from hpcdyn.distributed.cluster import init_ray

    snapshots = stages.get("snapshots", {}).get("store")
    large = stages.get("large", {}).get("store")
    seeds = stages.get("seeds", {}).get("store")
    shifts = stages.get("rate_shifts", {})
    summary = write_report(out / "ensemble.zarr", out / "report", sweep=stages["sweep"]["path"], activity_stores=activity_stores,
                           snapshots=snapshots, large=large, seeds=seeds, headline=headline(stages), overwrite=True,
                           progress=options.progress, rate_shifts=shifts.get("shifts", ()),
                           shift_errors=shifts.get("shift_errors"),
                           run_tasks=RayTasks(ray=init_ray(options.address, num_cpus=options.num_cpus, log_to_driver=False)))  # fmt: skip
    return {"path": str(out / "report"), "report": str(out / "report" / "report.md"), "figures": summary["figures"],
            "family": summary.get("family"), "activity_family": summary.get("activity_family"),
            "differences": summary.get("differences"), "large_family": summary.get("large_family")}  # fmt: skip


def run_pipeline(
    preset: str | PipelinePreset,
    out: str | Path,
    options: PipelineOptions | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run (or resume) the whole study into ``out``; returns the record also written to pipeline.json.

    ``options``: default ``PipelineOptions()`` (a local Ray), made here: checking options imports the
    stages (ray, torch), which importing this module must not."""
    options = PipelineOptions() if options is None else options
    from hpcdyn.storage.output_lock import output_lock

    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out).expanduser().absolute()
    check_pipeline_directory(out)
    with output_lock(out, "out"):
        return _run_locked(preset, out, options, log)


def _run_locked(preset: PipelinePreset, out: Path, options: PipelineOptions, log: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    for leftover in [*out.glob(f".{RECORD}.*"), *out.glob("models/*/.best.pt.*")]:  # temporary files of a killed run
        leftover.unlink(missing_ok=True)
    record = _read_record(out)
    _check_same_preset(record, preset, out)
    record.update({"preset": preset.as_dict(), "stages": record.get("stages", {})})
    _write_record(out, record)  # at once: an interrupted first run is recognised as a pipeline directory
    stages = record["stages"]
    begin = time.perf_counter()
    seconds = record["stage_seconds"] = {}  # this run's seconds per stage (a resumed stage: its remainder)
    last = [begin]

    def finish(stage: str, result: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        seconds[stage] = now - last[0]
        last[0] = now
        stages[stage] = {**result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_record(out, record)
        log(f"{stage}: done in {seconds[stage]:.0f} s ({now - begin:.0f} s since start)")
        return result

    log("sweep: N_theta study (Mode 1 and Mode 2) on the training trajectory")
    sweep = finish("sweep", sweep_stage(preset, out, options))
    log(f"sweep: N* = {sweep['n_star']}; chosen model {sweep['best_trial']['trial']} "
        f"(held-out gap {sweep['best_trial']['gap_per_event']:.3g} nats/event)")  # fmt: skip
    model = model_stage(sweep["best_trial"], out)
    model = finish("model", {**model, **class_evidence(model["run_dir"])})
    if (words := interval_words(model)) is not None:
        log(f"model: {words}")
    if preset.seed_models:
        log(f"seeds: the chosen model trained again with seeds {list(preset.seed_models)}, each simulated like it")
        finish("seeds", seeds_stage(preset, sweep["n_star"], out, options))
    if preset.range_stencils:
        log(f"range: the range study at N* = {sweep['n_star']} over the stencils {list(preset.range_stencils)}")
        found = finish("range", range_stage(preset, sweep["n_star"], out, options))
        for line in found["lines"]:
            log(f"range: {line}")
    log(f"ensemble: original and learned dynamics at densities {list(preset.densities)}")
    finish("ensemble", ensemble_stage(preset, model["run_dir"], out / "ensemble.zarr", options))
    if preset.rate_shift_errors is not None:
        log(f"rate shifts: the original dynamics with each class rate {preset.rate_shift_errors:g} standard errors up "
            "(the learned rates' own errors in the comparison)")  # fmt: skip
        finish("rate_shifts", rate_shift_stage(preset, model, out, options))
    if preset.snapshot_L is not None and preset.snapshot_densities:
        log(f"snapshots: original and learned dynamics on {preset.snapshot_L} x {preset.snapshot_L} at densities "
            f"{list(preset.snapshot_densities)}")  # fmt: skip
        finish("snapshots", snapshots_stage(preset, model["run_dir"], out, options))
    if preset.large_L is not None and preset.large_densities:
        log(f"large: original and learned dynamics on {preset.large_L} x {preset.large_L} at densities "
            f"{list(preset.large_densities)}, {preset.large_replicas} replicas each")  # fmt: skip
        finish("large", large_stage(preset, model["run_dir"], out, options))
    activity_stores = []
    if preset.activity_v_plus:
        log(f"activity: one model learned per v_plus in {list(preset.activity_v_plus)}, original and learned dynamics of each")
        activity = finish("activity", activity_stage(preset, out, options, sweep["n_star"]))
        activity_stores = [entry["store"] for entry in activity["stores"].values()]
    log("report: observables and phase diagrams")
    finish("report", report_stage(out, stages, activity_stores, options))
    record["seconds_this_run"] = time.perf_counter() - begin
    _write_record(out, record)
    return record


def result_lines(record: dict[str, Any]) -> list[str]:
    """What the study found, for a person: N*, r*, the chosen model's class rates, the family verdict."""
    stages = record["stages"]
    sweep = stages["sweep"]
    best = sweep["best_trial"]
    coordinates = best["coordinates"]
    lines = [f"N* = {sweep['n_star']} classes of move"]
    if "range" in stages:
        lines[0] += "; " + ", ".join(f"r* = {name} ({RANGE_WORDS.get(name, name)}, Mode {mode.split('_')[-1]})"
                                     for mode, name in stages["range"]["r_star"].items())  # fmt: skip
    rates = ", ".join(f"{rate:.4g}" for rate in best.get("class_rates", []))
    lines.append(f"chosen model: Mode {coordinates.get('mode')}"
                 + (f", N_theta {coordinates.get('n_classes')}, class rates {rates}" if coordinates.get("mode") == 2 else "")
                 + f"; held-out gap {best['gap_per_event']:.2g} nats/event")  # fmt: skip
    if (words := interval_words(stages.get("model", {}))) is not None:
        lines.append(words)
    if (choices := choice_spread(stages)) is not None:
        lines.append(choices)
    if (spread := seed_spread(stages)) is not None:
        lines.append(spread)
    for verdict in stages.get("report", {}).get("family") or []:
        if verdict.get("agrees") is None:
            continue
        word = "AGREES with" if verdict["agrees"] else "DIFFERS from"
        alone = (f" (the learned rates' own errors counted; the ensembles' alone: max |z| {verdict['max_abs_z_ensembles']:.2f})"
                 if "max_abs_z_ensembles" in verdict else "")  # fmt: skip
        lines.append(f"{verdict['model']} {word} the original dynamics over {verdict['cells']} cells: "
                     f"max |z| {verdict['max_abs_z']:.2f}, chi-square p = {verdict['p']:.3g}{alone}")  # fmt: skip
    for verdict in stages.get("report", {}).get("large_family") or []:
        if verdict.get("agrees") is not None:
            word = "AGREES with" if verdict["agrees"] else "DIFFERS from"
            lines.append(f"L {record['preset'].get('large_L')}: {verdict['model']} {word} the original dynamics over "
                         f"{verdict['cells']} cells: max |z| {verdict['max_abs_z']:.2f}, chi-square p = {verdict['p']:.3g}")  # fmt: skip
    for verdict in stages.get("report", {}).get("activity_family") or []:
        if verdict.get("agrees") is not None:
            word = "agrees" if verdict["agrees"] else "differs"
            lines.append(f"v_plus/D = {verdict.get('activity') or 0:g}: {verdict['model']} {word} (max |z| "
                         f"{verdict['max_abs_z']:.2f}, p = {verdict['p']:.3g})")  # fmt: skip
    return lines


def pipeline_summary(record: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """What `hpcdyn pipeline` prints: where every product of the study is, and the chosen model."""
    stages = record["stages"]
    activity = stages.get("activity", {}).get("stores", {})
    return {
        "out": str(out),
        "preset": record["preset"]["name"],
        "n_star": stages["sweep"]["n_star"],
        "r_star": stages.get("range", {}).get("r_star"),
        "best_trial": stages["sweep"]["best_trial"],
        "ensemble": stages["ensemble"]["store"],
        "snapshots": stages.get("snapshots", {}).get("store"),
        "seeds": stages.get("seeds", {}).get("store"),
        "large": stages.get("large", {}).get("store"),
        "activity": {v_plus: entry["store"] for v_plus, entry in activity.items()},
        "report": stages["report"]["report"],
        "family": stages["report"].get("family"),
        "seconds": record["seconds_this_run"],
        "stage_seconds": record.get("stage_seconds", {}),
    }
