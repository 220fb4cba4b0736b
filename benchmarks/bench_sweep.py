"""Overhead of Ray Tune: the 16-trial smoke N_theta sweep against the same trainings one after another.

    python benchmarks/bench_sweep.py --write            # figures into benchmarks/RESULTS.md

Both sides train the same 16 models (sweeps/ntheta.py, SMOKE) on the same trajectory, simulated
once beforehand so neither pays for it. The sweep runs on a local Ray with one CPU per trial (as
many trials at once as cores); the baseline runs them in this process, one after another, with
one torch thread. Ratio = sweep wall time / sequential wall time: 1 / cores would be perfect
parallel speed-up with no overhead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from results import write_section

from hpcdyn.storage.trajectory_store import open_trajectory
from hpcdyn.distributed.sweep import Resources, check_study, prepare_trajectory, run_sweep, trial_setup
from hpcdyn.learning.training import train
from sweeps import get_study

COMMAND = "python benchmarks/bench_sweep.py --write"


def sequential(points, storage: Path) -> tuple[float, float]:
    """Wall time of every training in this process, and the time inside the training epochs."""
    torch.set_num_threads(1)
    begin, epochs_time = time.perf_counter(), 0.0
    for index, point in enumerate(points):
        setup = trial_setup(point)
        store = prepare_trajectory(setup.system, setup.t_final, setup.data_seed, storage / "trajectories")
        result = train(setup.training, open_trajectory(store), storage / "sequential" / f"trial_{index:04d}")
        epochs_time += sum(row["seconds"] for row in result.metrics)
    return time.perf_counter() - begin, epochs_time


def swept(study, storage: Path, cpus: int) -> tuple[float, float]:
    """Wall time of the Tune sweep including starting Ray, and Ray's start alone."""
    from hpcdyn.distributed.cluster import init_ray

    begin = time.perf_counter()
    init_ray(num_cpus=cpus, log_to_driver=False)
    ray_start = time.perf_counter() - begin
    outcome = run_sweep(study, storage, "bench", resources=Resources(cpus_per_trial=1))
    if outcome.errors:
        raise RuntimeError(f"{len(outcome.errors)} trials failed: {outcome.errors[0]}")
    return time.perf_counter() - begin, ray_start


def record_sweep(directory: Path, command: str) -> None:
    """Write a finished sweep's N_theta scan (table, N*, figures) into benchmarks/RESULTS.md."""
    from hpcdyn.distributed.sweep_results import find_plateau, load_sweep_results

    dataset = load_sweep_results(directory)
    plateau = find_plateau(dataset)
    figures = Path(__file__).with_name("figures")
    figures.mkdir(exist_ok=True)
    names = []
    for png in sorted(directory.glob("*.png")):
        target = figures / f"sweep_{directory.name}_{png.name}"
        shutil.copyfile(png, target)
        names.append(f"![{png.stem}](figures/{target.name})")
    mode1 = dataset["val_U_per_T"].sel(mode=1) if "mode" in dataset.dims else None
    truth = float(dataset["true_val_U_per_T"].mean())
    rows = "\n".join(f"| {n} | {mean:.1f} | {spread:.1f} | {gain:+.1f} |" for n, mean, spread, gain
                     in zip(plateau.n_classes, plateau.mean, plateau.spread, [*plateau.gains, float("nan")]))
    minutes = float(dataset["wall_time_s"].sum()) / 60
    size = "smoke size" if int(dataset.attrs.get("smoke", 0)) else "full study at a size reduced for CPU"
    body = f"""## N_theta sweep: {size} (`{command}`)

Recorded by `python benchmarks/bench_sweep.py --record-sweep STORAGE/NAME --sweep-command "..."`.
{int((dataset.status == "done").sum())} trials, {minutes:.0f} trial-minutes in all; held-out U/T of the generating
rates {truth:.1f}{f", Mode 1 {float(mode1.mean()):.1f}" if mode1 is not None else ""}.

| N_theta | held-out U/T (mean over seeds) | std | gain to next |
|---:|---:|---:|---:|
{rows}

**N* = {plateau.n_star}** (plateau threshold {plateau.threshold:.1f}: 0.002 nats per held-out event, or the seed spread, below the best mean).

{" ".join(names)}
"""
    print(body)
    write_section(f"sweep-{directory.name}", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    parser.add_argument("--record-sweep", type=Path, help="instead: record this finished N_theta sweep directory")
    parser.add_argument("--sweep-command", default="hpcdyn sweep ntheta", help="the command that ran it (for the record)")
    args = parser.parse_args()
    if args.record_sweep:
        return record_sweep(args.record_sweep.absolute(), args.sweep_command)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    study = get_study("ntheta", smoke=True)
    points = check_study(study)
    storage = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        setup = trial_setup(points[0])
        prepare_trajectory(setup.system, setup.t_final, setup.data_seed, storage / "trajectories")  # shared, untimed
        load_before = os.getloadavg()[0]
        sequential_s, epochs_s = sequential(points, storage)
        sweep_s, ray_start_s = swept(study, storage, args.cpus)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    ratio = sweep_s / sequential_s
    body = f"""## Ray Tune sweep overhead (`benchmarks/bench_sweep.py`)

Command: `{COMMAND}` ({os.cpu_count()} cores; local Ray with {args.cpus} CPUs, 1 CPU and 1 torch thread per
trial; load average {load_before:.1f} before, {load_after:.1f} after: the machine is shared).
The {len(points)} trials of `hpcdyn sweep ntheta --smoke` (12 x 12 torus, ~13 k events, d_model 16,
3 epochs), the trajectory simulated once beforehand for both.

| | wall time (s) |
|---|---:|
| sequential, one process, one thread | {sequential_s:.1f} |
| of which inside training epochs | {epochs_s:.1f} |
| Tune sweep, including Ray start | {sweep_s:.1f} |
| of which Ray start | {ray_start_s:.1f} |
| **ratio sweep / sequential** | **{ratio:.2f}** (ideal on {args.cpus} cores: {1 / args.cpus:.2f}) |
| overhead per trial, (sweep x {args.cpus} - sequential) / trials | {(sweep_s * args.cpus - sequential_s) / len(points):.1f} |
"""
    print(body)
    if args.write:
        write_section("sweep", body)


if __name__ == "__main__":
    main()
