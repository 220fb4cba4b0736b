"""Training: maximise the path log-likelihood of one trajectory (DESIGN 1.3-1.4).

    result = train(TrainingConfig(store="run.zarr", out="runs/mode2", model=TransformerConfig(mode=2)))

The trajectory is cut into segments of consecutive events; each step rebuilds one segment's
configurations on the device, scores them with the model, and takes a gradient step on
loss = -U(segment) / time(segment). The last ``validation_fraction`` of the events (with the
censored tail) is held out; its U/T, against the U/T of the generating rates when the store knows
them, drives early stopping and is the figure of merit.

``train`` is the one entry point: the CLI calls it, and so does a Ray Tune trial through the
``report`` hook. Runs resume from their last checkpoint with identical continuation: every random
stream is reseeded from (seed, epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hpcdyn.learning.checkpoint import load_checkpoint, save_checkpoint, store_identity
from hpcdyn.storage.integrity import StoreError
from hpcdyn.storage.side_files import heldout_path, read_heldout, write_heldout
from hpcdyn.storage.output_lock import output_lock
from hpcdyn.learning.class_rates import fit_class_rates
from hpcdyn.storage.events import EventSource, EventWindow
from hpcdyn.learning.likelihood import LikelihoodResult, iter_segments, path_log_likelihood, segment_terms
from hpcdyn.learning.names import CLASS_INITS, CLASS_RATE_FITS, OPTIMIZERS
from hpcdyn.learning.optim import cosine_factor, make_optimizer
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.systems import ConfigurationError
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates

Report = Callable[[dict[str, Any], Path], None]
# closed_form_last: by gradient, then once in closed form after the last epoch, when the classifier
# has settled (a fit while moves still sit in the wrong class lifts the near-zero class for good)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs besides the trajectory; frozen, validated, checkpointed."""

    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    epochs: int = 20
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # cosine (down to 5 % at the last epoch) or constant
    optimizer: str = "adam"
    # events per gradient step; None: chosen from the training events (default_segment_events),
    # 256 on long trajectories, shorter on short ones so an epoch still takes enough steps
    segment_events: int | None = None
    shuffle_segments: int = 64  # segments read ahead and visited in random order
    max_train_events: int | None = None  # use only the first events of the training part
    validation_fraction: float = 0.1
    gradient_clip: float = 1.0
    # epochs without a better validation U/T before stopping; None: half the epoch budget, at least 5
    # (default_patience), so a noisy held-out tail does not stop a run before its learning rate has decayed
    patience: int | None = None
    # the weights at the end of each epoch replaced by their mean over that epoch's gradient steps;
    # None: chosen from the training events (default_average_weights), on below 32,768
    average_weights: bool | None = None
    # train the absolute position tables (zero at the start with rotary); False: they keep their initial
    # values and the rates depend on positions only through relative offsets (rotary, offset scores);
    # None: chosen from the training events (default_learn_position_tables), learned from 32,768 on
    learn_position_tables: bool | None = None
    gumbel_temperature: tuple[float, float] = (1.0, 0.1)  # start, end (Mode 2, gumbel)
    # Mode 2: leave the class rates to the gradient steps, or set them to n_k / E_k, their best values
    # for the classifier (hpcdyn.learning.class_rates), after each epoch or after the last one (CLASS_RATE_FITS)
    class_rate_fit: str = "gradient"
    # Mode 2: from this epoch on the classifier follows the exact gradient of the expected U
    # (TransformerRates.split_log_rates) instead of the model's estimator; None: never. Started
    # from scratch it leaves the classes where the initial rates put them, after a few
    # straight-through epochs it sorts every move into the class of its rate (README, Mode 2).
    expected_from_epoch: int | None = None
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False  # autocast the encoder to bfloat16 (CUDA); likelihood sums stay float64
    compile: bool = False  # torch.compile the model (CUDA)
    # A hard-local model (model.attention_stencil) trains on the exact sufficient statistics of its key
    # family (hpcdyn.learning.statistics; computed once beside the store and reused): an epoch is
    # statistics_steps gradient steps over keys, whatever the trajectory's length. False: on segments.
    statistics: bool = True
    statistics_steps: int = 50
    statistics_batch_keys: int | None = None  # keys per step; None: local_training.batch_keys decides
    # Mode 2's start. On statistics, "auto" (= "partition") starts from the maximum-likelihood partition
    # of the (key, move) pairs (hpcdyn.learning.class_partition), the classifier fitted to it, then
    # follows the expected-U gradient with closed-form class rates refitted every few steps. On
    # segments (an unrestricted model) the start is the partition of the nearest-neighbour environments
    # (hpcdyn.learning.segment_start), then the expected-U gradient from the first epoch, the class rates
    # in closed form after every epoch, and an epoch undone when it lowers the held-out U; "auto" takes it
    # unless expected_from_epoch or class_rate_fit ask for a from-scratch recipe. "none": from scratch.
    class_init: str = "auto"
    # Mode 2's start: the learning rate of the classifier's fit to the partition; None: lr. The fit stops
    # on the held-out part, so a larger rate only reaches its best state sooner where the fit tolerates it
    # (the quick preset's small models: benchmarks/TRAINING.md, classifier-lr)
    classifier_lr: float | None = None

    def __post_init__(self) -> None:
        def require(condition: bool, field: str, message: str) -> None:
            if not condition:
                raise ConfigurationError(f"{field}: {message}")

        require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", f"must be an integer >= 1, got {self.epochs!r}")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a finite learning rate > 0, got {self.lr!r}")
        require(self.lr_schedule in ("cosine", "constant"), "lr_schedule", f"must be cosine or constant, got {self.lr_schedule!r}")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.segment_events is None or (isinstance(self.segment_events, int) and self.segment_events >= 1),
                "segment_events", f"must be None (chosen from the trajectory) or an integer >= 1, got {self.segment_events!r}")  # fmt: skip
        require(self.shuffle_segments >= 1, "shuffle_segments", f"must be >= 1, got {self.shuffle_segments!r}")
        require(0 < self.validation_fraction < 1, "validation_fraction",
                f"must be in (0, 1), got {self.validation_fraction!r}")  # fmt: skip
        require(self.max_train_events is None or self.max_train_events >= 1, "max_train_events", "must be >= 1")
        require(math.isfinite(self.gradient_clip) and self.gradient_clip > 0, "gradient_clip", "must be > 0")
        require(self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
                "patience", f"must be None (half the epochs, at least 5) or an integer >= 1, got {self.patience!r}")  # fmt: skip
        require(self.average_weights in (None, True, False), "average_weights",
                f"must be None (chosen from the trajectory), true or false, got {self.average_weights!r}")  # fmt: skip
        require(self.learn_position_tables in (None, True, False), "learn_position_tables",
                f"must be None (chosen from the trajectory), true or false, got {self.learn_position_tables!r}")  # fmt: skip
        require(self.class_rate_fit in CLASS_RATE_FITS, "class_rate_fit",
                f"must be one of {CLASS_RATE_FITS}, got {self.class_rate_fit!r}")  # fmt: skip
        require(self.expected_from_epoch is None or (isinstance(self.expected_from_epoch, int) and self.expected_from_epoch >= 0),
                "expected_from_epoch", f"must be None or an epoch >= 0, got {self.expected_from_epoch!r}")  # fmt: skip
        require(isinstance(self.statistics_steps, int) and self.statistics_steps >= 1, "statistics_steps",
                f"must be an integer >= 1, got {self.statistics_steps!r}")  # fmt: skip
        require(self.statistics_batch_keys is None or (isinstance(self.statistics_batch_keys, int) and self.statistics_batch_keys >= 1),
                "statistics_batch_keys", f"must be None or an integer >= 1, got {self.statistics_batch_keys!r}")  # fmt: skip
        require(self.class_init in CLASS_INITS, "class_init", f"must be one of {CLASS_INITS}, got {self.class_init!r}")
        require(self.classifier_lr is None or (isinstance(self.classifier_lr, (int, float)) and not isinstance(self.classifier_lr, bool)
                                               and math.isfinite(self.classifier_lr) and self.classifier_lr > 0),
                "classifier_lr", f"must be None (the lr) or a finite learning rate > 0, got {self.classifier_lr!r}")  # fmt: skip
        start, end = self.gumbel_temperature
        require(0 < end <= start, "gumbel_temperature", f"must be (start, end) with 0 < end <= start, got {self.gumbel_temperature!r}")

    @property
    def start_lr(self) -> float:
        """The learning rate of Mode 2's classifier fit to the partition (``classifier_lr``, else ``lr``)."""
        return self.lr if self.classifier_lr is None else float(self.classifier_lr)

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["gumbel_temperature"] = list(self.gumbel_temperature)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        values = dict(values)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(f"{unknown[0]}: unknown training parameter; known: {sorted(known)}")
        model = values.pop("model", {})
        if "gumbel_temperature" in values:
            values["gumbel_temperature"] = tuple(values["gumbel_temperature"])
        return cls(model=model if isinstance(model, TransformerConfig) else TransformerConfig.from_dict(model), **values)


@dataclasses.dataclass
class TrainingResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    best: dict[str, Any]
    stopped_early: bool


LONG_TRAJECTORY_EVENTS = 32_768  # training events from which the defaults are those of the active L 12 and L 30 runs
SEGMENT_EVENTS_LONG = 256  # the default on long trajectories (the active L 12 and L 30 runs: 90 k, 770 k training events)
SEGMENT_EVENTS_SHORTEST = 16
STEPS_PER_EPOCH = 128  # a shorter trajectory is cut into shorter segments until an epoch takes this many steps


def default_segment_events(n_train_events: int) -> int:
    """Events per gradient step when none is given: 256 halved (down to 16) while an epoch would take
    fewer than 128 steps. 4,660 training events (FA chain, L 64, T 350) give 32; 23 k (L 10, T 1e4) 128;
    32,768 and more keep 256 (benchmarks/TRAINING.md, fa-defaults: 16-event segments overfit sooner)."""
    segment = SEGMENT_EVENTS_LONG
    while segment > SEGMENT_EVENTS_SHORTEST and n_train_events // segment < STEPS_PER_EPOCH:
        segment //= 2
    return max(1, min(segment, n_train_events))


def default_learn_position_tables(n_train_events: int, mode: int = 1) -> bool:
    """Whether the absolute position tables are trained when not said: from 32,768 training events on,
    and always in Mode 2 (not measured there; see default_average_weights).
    A table gives every site its own parameters; on ~5 k training events (FA chain, L 64, T 350: ~75 events
    a site) it learns the sites' fluctuations. Measured with default_average_weights (benchmarks/TRAINING.md,
    fa-defaults): L 64 seed 1, best held-out gap 0.0070 with trained tables, 0.0027 with fixed ones.
    Long trajectories keep learning them: their validated active-matter runs are unchanged."""
    return n_train_events >= LONG_TRAJECTORY_EVENTS or mode != 1


def default_average_weights(n_train_events: int, mode: int = 1) -> bool:
    """Whether each epoch ends on the mean of its weights when not said: below 32,768 training events,
    in Mode 1 only (measured there; in Mode 2 the averaging together with fixed tables left the class
    rates of tests/test_training.py's 17 k-event exclusion-mask run at 0.26 instead of 0.5 after 10
    epochs, so Mode 2 keeps the last weights and trained tables).
    Measured on the FA chain (benchmarks/TRAINING.md, fa-defaults): at L 64, T 350 (~5 k training
    events, 32-event segments) the held-out gap of the last weights jumped by up to 0.04 nats/event from
    one epoch to the next and the best epoch reached 0.0076 / 0.0055 / -0.0010 on three trajectories;
    with the epoch's mean (seed 1) the gap fell steadily, 0.020 -> 0.0070 over epochs 3-8 (counted from 1), best 0.0070
    (0.0076 before); together with fixed position tables (default_learn_position_tables) 0.0027.
    Only training on segments averages (a hard-local model trained on its statistics does not).
    Long trajectories keep the last weights: their validated active-matter runs are unchanged."""
    return n_train_events < LONG_TRAJECTORY_EVENTS and mode == 1


def default_patience(epochs: int) -> int:
    """Epochs without improvement before stopping when none is given: half the budget, at least 5."""
    return max(5, math.ceil(epochs / 2))


def training_events(n_events: int, config: TrainingConfig) -> int:
    """How many events the training part holds (the held-out tail and max_train_events taken off)."""
    boundary = n_events - _validation_events(n_events, config)
    return boundary if config.max_train_events is None else min(boundary, config.max_train_events)


def resolve_defaults(config: TrainingConfig, source: EventSource, saved: dict[str, Any] | None = None) -> TrainingConfig:
    """The configuration with the values it leaves open (segment_events, patience, average_weights,
    learn_position_tables) chosen for this trajectory; a resumed run keeps its checkpoint's segment length,
    averaging and tables (``saved``: its training config; a checkpoint without average_weights or
    learn_position_tables was written before they existed: without averaging, with trained tables)."""
    segment_events, patience, average = config.segment_events, config.patience, config.average_weights
    n_train = training_events(source.n_events, config)
    if average is None:  # a run saved before the setting existed kept its last weights
        average = saved.get("average_weights", False) if saved is not None else default_average_weights(n_train, config.model.mode)
    tables = config.learn_position_tables
    if tables is None:  # likewise, a run saved before it existed learned its tables
        tables = saved.get("learn_position_tables", True) if saved is not None else default_learn_position_tables(n_train, config.model.mode)
    if segment_events is None:
        saved_segment = (saved or {}).get("segment_events")
        segment_events = saved_segment if saved_segment is not None else default_segment_events(n_train)
    if patience is None:
        patience = default_patience(config.epochs)
    return dataclasses.replace(config, segment_events=segment_events, patience=patience, average_weights=bool(average),
                               learn_position_tables=bool(tables))


def _validation_events(n_events: int, config: TrainingConfig) -> int:
    return max(1, int(round(n_events * config.validation_fraction)))


def split(source: EventSource, config: TrainingConfig) -> tuple[EventWindow, EventWindow]:
    """Training events first, the held-out validation tail last."""
    config = resolve_defaults(config, source)
    n_validation = _validation_events(source.n_events, config)
    boundary = source.n_events - n_validation
    if boundary < config.segment_events:
        raise ConfigurationError(
            f"segment_events: the trajectory has {source.n_events} events, too few for training segments of "
            f"{config.segment_events} after holding out {n_validation}; simulate longer or lower --segment-events"
        )
    train_stop = boundary if config.max_train_events is None else min(boundary, config.max_train_events)
    return EventWindow(source, 0, train_stop), EventWindow(source, boundary, source.n_events)


def build_model(config: TrainingConfig, source: EventSource) -> TransformerRates:
    """A model sized for the source's lattice, its rates starting at the data's mean rate."""
    system = source.system
    model_config = config.model
    if model_config.system != system.name or model_config.lattice_size != max(system.shape):
        model_config = dataclasses.replace(model_config, system=system.name, lattice_size=max(system.shape))
    if model_config.initial_log_rate == 0.0 and source.n_events:
        mean_rate = source.n_events / source.t_final / (system.n_tokens * system.n_moves)
        model_config = dataclasses.replace(model_config, initial_log_rate=math.log(mean_rate))
    return TransformerRates(model_config)


def _segments_in_shuffled_blocks(window: EventWindow, config: TrainingConfig, generator: torch.Generator):
    """Segments in order of blocks, each block of ``shuffle_segments`` visited in random order."""
    pending = []
    for segment in iter_segments(window, config.segment_events, config.device):
        pending.append(segment)
        if len(pending) == config.shuffle_segments:
            yield from (pending[i] for i in torch.randperm(len(pending), generator=generator).tolist())
            pending = []
    yield from (pending[i] for i in torch.randperm(len(pending), generator=generator).tolist())


def _train_epoch(model, optimizer, window, config, generator, progress) -> dict[str, float]:
    model.train()
    system = window.system
    total_u, total_time, total_events = 0.0, 0.0, 0
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    mean, steps = ([parameter.detach().clone() for parameter in parameters] if config.average_weights else None), 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16 and config.device.startswith("cuda"))
    for positions, states, tokens, moves, dwell in _segments_in_shuffled_blocks(window, config, generator):
        with autocast:
            terms = segment_terms(model, system, positions, states, tokens, moves, dwell)
        u = terms.log_likelihood()
        elapsed = terms.dwell.sum()
        loss = -u / elapsed
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimizer.step()
        if mean is not None:  # running mean of the weights after each step
            steps += 1
            with torch.no_grad():
                for average, parameter in zip(mean, parameters):
                    average.lerp_(parameter.detach(), 1.0 / steps)
        total_u += float(u.detach())
        total_time += float(elapsed)
        total_events += len(tokens)
        progress.update(len(tokens))
    if mean is not None and steps:
        with torch.no_grad():
            for average, parameter in zip(mean, parameters):
                parameter.copy_(average)
    return {"train_U_per_T": total_u / total_time, "train_events": total_events}


def _validate(model, validation, config) -> LikelihoodResult:
    model.eval()
    return path_log_likelihood(validation, model, segment_events=max(config.segment_events, 512), device=config.device)


def _epoch_metrics(epoch, train_stats, validation_result, true_result, model, seconds) -> dict[str, Any]:
    metrics: dict[str, Any] = {"epoch": epoch, **train_stats, "val_U_per_T": validation_result.per_time}
    metrics["val_U_per_event"] = validation_result.per_event
    if true_result is not None:
        metrics["true_val_U_per_T"] = true_result.per_time
        metrics["gap_per_event"] = (true_result.log_likelihood - validation_result.log_likelihood) / max(
            validation_result.n_events, 1
        )
    if model.config.mode == 2:
        metrics["class_rates"] = model.class_rates()
    metrics["seconds"] = seconds
    metrics["train_events_per_second"] = train_stats["train_events"] / max(seconds, 1e-9)
    return metrics


def train(
    config: TrainingConfig,
    source: EventSource,
    run_dir: str | Path,
    *,
    resume: bool = False,
    report: Report | None = None,
    progress: bool = False,
) -> TrainingResult:
    """Train a transformer on one trajectory; checkpoints and metrics go to ``run_dir``.

    ``report(metrics, run_dir)`` is called after every epoch, once its checkpoint is on disk. The run
    directory is locked for the whole run (a second ``train`` on it is refused); temporary files of
    an earlier, killed run are removed.
    """
    run_dir = Path(run_dir).absolute()
    check_run_directory(run_dir, resume)
    with output_lock(run_dir, "out"):
        _remove_stale_files(run_dir)
        return _train_locked(config, source, run_dir, resume, report, progress)


RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl", "config.json")


def check_run_directory(run_dir: Path, resume: bool) -> None:
    """A run directory is new, or holds a run (resumed only with ``resume``), and nothing else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigurationError(f"out: {run_dir} is a file, not a run directory; choose another --out")
    if not run_dir.exists():
        return
    foreign = sorted(item.name for item in run_dir.iterdir() if item.name not in RUN_FILES and not item.name.startswith("."))
    if foreign:
        raise ConfigurationError(
            f"out: {run_dir} holds {foreign[0]!r}, which no training run writes (it is not a run directory); "
            "choose a new or empty --out"
        )
    if not resume and (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir} holds a run already; pass --resume to continue it or choose another --out")


def _remove_stale_files(run_dir: Path) -> None:
    """Temporary files of a killed run (checkpoints and metrics written under a temporary name)."""
    if run_dir.is_dir():
        for leftover in run_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def run_progress(run_dir: str | Path) -> int | None:
    """Epochs finished in a run directory (its metrics.jsonl), or None when it holds no checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").exists():
        return None
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _train_locked(config, source, run_dir: Path, resume: bool, report, progress) -> TrainingResult:
    last_path = run_dir / "last.pt"
    torch.manual_seed(config.seed)
    state = load_checkpoint(last_path) if resume and last_path.exists() else None
    # resolved: segment length, patience, averaging; a resumed run keeps its checkpoint's segment length and averaging
    config = resolve_defaults(config, source, state["training_config"] if state is not None else None)
    training, validation = split(source, config)
    model = build_model(config, source).to(config.device)
    if not config.learn_position_tables and hasattr(model, "embed_x"):  # kept at their initial values
        model.embed_x.weight.requires_grad_(False)
        model.embed_y.weight.requires_grad_(False)
    config = dataclasses.replace(config, model=model.config)  # resolved: lattice, system, initial rate
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    metrics: list[dict[str, Any]] = []
    identity = store_identity(source)
    if state is not None:
        _check_resumable(state, config, identity)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        metrics = state["metrics"]
    scored = compiled_model(model, config)
    local = _statistics_objective(model, source, config)
    partition_start = _partition_start(model, config, local, source.system)
    true_result = _true_validation(source, validation, config)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once everything checked out: a refused run leaves nothing
    best = max(metrics, key=lambda m: m["val_U_per_T"]) if metrics else None
    since_best = _epochs_since_best(metrics)
    bar = _progress_bar(config.epochs * training.n_events, len(metrics) * training.n_events, progress)
    stopped_early = False
    for epoch in range(len(metrics), config.epochs):
        if since_best >= config.patience or (partition_start and _undone_in_a_row(metrics) >= UNDONE_EPOCHS_TO_STOP):
            stopped_early = True
            break
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)  # Gumbel noise
        _set_schedules(model, optimizer, config, epoch, partition_start)
        begin = time.perf_counter()
        if local is not None:  # a hard-local model: exact U from the sufficient statistics
            from hpcdyn.learning import local_training

            train_stats = local_training.train_epoch(local, scored, optimizer, config, generator, bar, epoch)
            if model.config.mode == 2 and _closed_form_epoch(config, epoch):
                local.fit_class_rates(model)
                train_stats["train_U_per_T"] = local.both_parts(model)[0] / max(local.stats.t_train, 1e-300)
            validation_result = local_training.validate(local, scored)
        else:
            train_stats, validation_result = _segment_epoch(model, scored, optimizer, source, (training, validation),
                                                            config, generator, bar, epoch, partition_start, metrics)  # fmt: skip
        epoch_metrics = _epoch_metrics(epoch, train_stats, validation_result, true_result, model, time.perf_counter() - begin)
        if local is not None:
            epoch_metrics.update(local_training.ceiling_metrics(local.stats), trained_on=f"statistics:{local.stats.family}")
        metrics.append(epoch_metrics)
        improved = best is None or epoch_metrics["val_U_per_T"] > best["val_U_per_T"]
        best, since_best = (epoch_metrics, 0) if improved else (best, since_best + 1)
        state = _checkpoint_state(model, optimizer, config, metrics, identity)
        if improved:
            save_checkpoint(state, run_dir / "best.pt")
        save_checkpoint(state, last_path)
        _write_metrics(run_dir, metrics, config, identity)
        bar.set_postfix(val_U_per_T=f"{epoch_metrics['val_U_per_T']:.4g}", refresh=False)
        if report is not None:
            report(epoch_metrics, run_dir)
    bar.close()
    return TrainingResult(run_dir, metrics, best or {}, stopped_early)


# From the partition's start an epoch's steps are kept only when they raise the held-out U by this much
# (a likelihood ratio of e^2): the start is near the optimum, and steps kept for a smaller gain are
# noise the classifier learned (measured: an epoch that put 23 of 18,800 other hops of a 100 k-event
# trajectory in the blocked hops' class raised the held-out U by 0.16 nats).
HELD_OUT_GAIN_NATS = 2.0
# From the partition's start a run stops once this many epochs in a row were undone: the steps no longer
# find a gain the held-out data tell from noise, and each further epoch costs a full pass (measured:
# every epoch after the start was undone on the five trajectories of benchmarks/TRAINING.md's
# mode2-defaults-record, 1 to 11 of them, and in the quorum N_theta scan; a worse start, the hard
# partition of an earlier version, had an epoch kept after one undone).
UNDONE_EPOCHS_TO_STOP = 3


def _segment_epoch(model, scored, optimizer, source, windows, config, generator, progress, epoch: int,
                   partition_start: bool, metrics) -> tuple[dict[str, Any], LikelihoodResult]:  # fmt: skip
    """One epoch on segments of events, then the Mode 2 class rates in closed form when due.

    From the partition's start (segment_start: the classes sorted, the rates n_k / E_k, refitted after
    every epoch) the steps refine what the start leaves open; an epoch whose steps do not raise the
    held-out U by HELD_OUT_GAIN_NATS is undone (model and optimiser), as on statistics where a lower
    held-out U undoes it: the next epoch tries again at its lower learning rate.
    """
    training, validation = windows
    started, start_u = {}, None
    if partition_start:
        if epoch == 0:
            from hpcdyn.learning import segment_start

            started = segment_start.initialise_classes(model, source, training, validation, config)
            start_u = _validate(scored, validation, config).per_time
            started["start_val_U_per_T"] = start_u
        else:
            start_u = metrics[-1]["val_U_per_T"]
        start_state = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    train_stats = {**started, **_train_epoch(scored, optimizer, training, config, generator, progress)}
    if model.config.mode == 2 and (_closed_form_epoch(config, epoch) or partition_start):
        fit_class_rates(model, training, max(config.segment_events, 512), config.device, empty_to_lowest=partition_start)
    validation_result = _validate(scored, validation, config)
    if start_u is not None and (validation_result.per_time - start_u) * validation_result.t_final < HELD_OUT_GAIN_NATS:
        model.load_state_dict(start_state[0])
        optimizer.load_state_dict(start_state[1])
        train_stats.update(steps_reverted=True, steps_val_U_per_T=validation_result.per_time)  # what was undone
        validation_result = _validate(scored, validation, config)
    return train_stats, validation_result


def _statistics_objective(model: TransformerRates, source: EventSource, config: TrainingConfig):
    """The statistics of a hard-local model's key family (cached beside the store), or None."""
    if not (model.config.hard_local and config.statistics):
        return None
    from hpcdyn.learning.local_training import StatisticsObjective
    from hpcdyn.learning.statistics import cached_statistics

    family = model.config.key_family
    if family is None:
        raise ConfigurationError(
            f"attention_stencil: {model.config.n_layers} layers of {model.config.attention_stencil!r} reach beyond every "
            "key family; use fewer layers, a smaller stencil, or statistics=False"
        )
    stats, _ = cached_statistics(source, family, config.validation_fraction, config.max_train_events)
    return StatisticsObjective(stats, source.system, config.device)


def _partition_start(model, config, local, system) -> bool:
    """Whether a Mode 2 run on segments starts from the nearest-neighbour partition (class_init)."""
    if local is not None or model.config.mode != 2:
        return False
    from hpcdyn.learning import segment_start  # numba's statistics: imported only for Mode 2

    return segment_start.applies(model, config, system)


def compiled_model(model: TransformerRates, config: TrainingConfig):
    if config.compile:
        return torch.compile(model, dynamic=True)
    return model


def _true_validation(source, validation, config) -> LikelihoodResult | None:
    """U/T of the held-out events under the store's own rates; impossible events are refused. The same
    for every run on the store's held-out window, so kept beside a store (``side_files``) and read back."""
    try:
        model = true_rate_model(source.system)
    except TypeError:
        return None
    segment_events = max(config.segment_events, 512)
    kept = _heldout_file(source, validation, segment_events)
    values = read_heldout(kept) if kept is not None else None
    if values is not None:
        result = LikelihoodResult(**values)
    else:
        result = path_log_likelihood(validation, model, segment_events=segment_events, device=config.device)
        if kept is not None and math.isfinite(result.log_likelihood):
            write_heldout(kept, dataclasses.asdict(result))
    if not math.isfinite(result.log_likelihood):
        where = getattr(source, "path", "trajectory")
        raise StoreError(
            f"{where}: attribute params: under {source.system.params()} the held-out events are impossible "
            f"(U = {result.log_likelihood}); the params do not match the events (edited?) or the events are damaged"
        )
    return result


def _heldout_file(source, validation, segment_events: int) -> Path | None:
    """Where a store keeps its held-out U (None for an in-memory trajectory)."""
    path = getattr(source, "path", None)
    if path is None or not isinstance(validation, EventWindow) or validation.stop != source.n_events:
        return None
    return heldout_path(path, store_identity(source)["fingerprint"], validation.start, segment_events)


def true_validation(source, config: TrainingConfig) -> LikelihoodResult | None:
    """The held-out U under the store's own rates for a run of ``config`` (kept beside the store): a
    study computes it once before its trials start, as it does the statistics."""
    config = resolve_defaults(config, source)
    return _true_validation(source, split(source, config)[1], config)


def _set_schedules(model, optimizer, config, epoch, partition_start: bool = False) -> None:
    factor = cosine_factor(epoch, config.epochs) if config.lr_schedule == "cosine" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * factor
    start, end = config.gumbel_temperature
    model.temperature = start * (end / start) ** (epoch / max(config.epochs - 1, 1))  # geometric annealing
    # from the partition's start (segment_start) the classes are sorted: the expected-U gradient refines
    # them from the first epoch, where straight-through steps would scatter them
    start = 0 if partition_start and config.expected_from_epoch is None else config.expected_from_epoch
    model.expected_gradient = start is not None and epoch >= start


def _closed_form_epoch(config: TrainingConfig, epoch: int) -> bool:
    return config.class_rate_fit == "closed_form" or (config.class_rate_fit == "closed_form_last" and epoch == config.epochs - 1)


def _undone_in_a_row(metrics: list[dict[str, Any]]) -> int:
    """How many of the last epochs had their steps undone (no clear held-out gain from a partition start)."""
    count = 0
    for row in reversed(metrics):
        if not row.get("steps_reverted"):
            break
        count += 1
    return count


def _epochs_since_best(metrics: list[dict[str, Any]]) -> int:
    if not metrics:
        return 0
    best_epoch = max(range(len(metrics)), key=lambda i: metrics[i]["val_U_per_T"])
    return len(metrics) - 1 - best_epoch


def _checkpoint_state(model, optimizer, config, metrics, identity) -> dict[str, Any]:
    return {
        "format": "hpcdyn.checkpoint/1",
        "model_config": model.config.as_dict(),
        "training_config": config.as_dict(),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "metrics": metrics,
        "store": identity,
    }


RESUMABLE_CHANGES = ("epochs", "device", "patience")  # what may differ when a run is continued


def _check_resumable(state, config, identity) -> None:
    if state["store"]["fingerprint"] != identity["fingerprint"]:
        raise ConfigurationError(
            f"store: the run was trained on {state['store']['path']}, not on this trajectory; resume with the same store"
        )
    saved, current = state["training_config"], config.as_dict()
    # a setting the checkpoint lacks was added later: the run had its default
    defaults = {**TrainingConfig(model=config.model).as_dict(), "average_weights": False, "learn_position_tables": True}
    differing = sorted(key for key in current
                       if key not in RESUMABLE_CHANGES and current[key] != saved.get(key, defaults[key]))  # fmt: skip
    if differing:
        raise ConfigurationError(
            f"resume: the training configuration differs from the checkpoint's in {differing}; "
            f"only {list(RESUMABLE_CHANGES)} may change"
        )


def _write_metrics(run_dir: Path, metrics, config, identity) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in metrics)
    temporary = run_dir / ".metrics.jsonl.tmp"
    temporary.write_text(lines)
    temporary.replace(run_dir / "metrics.jsonl")
    summary = {"config": config.as_dict(), "store": identity, "epochs_done": len(metrics)}
    (run_dir / ".config.json.tmp").write_text(json.dumps(summary, indent=2))
    (run_dir / ".config.json.tmp").replace(run_dir / "config.json")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="event", desc="train", unit_scale=True)


def load_model(path: str | Path, device: str = "cpu") -> tuple[TransformerRates, dict[str, Any]]:
    """A trained model from a checkpoint file or a run directory (its best.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    state = load_checkpoint(path)
    model = TransformerRates(TransformerConfig.from_dict(state["model_config"]))
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as error:
        raise ConfigurationError(f"checkpoint: {path} does not match its own model configuration ({error})") from error
    return model.to(device).eval(), state

