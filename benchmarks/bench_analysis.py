"""Analysis of an ensemble store larger than the memory the analysis may use.

    python benchmarks/bench_analysis.py --write              # build a ~3.8 GB (decompressed) store, analyse it

1. Builds an ensemble store (DESIGN 3.2) from compiled simulations of the active model, one
   trajectory at a time written straight into its Zarr chunks, so building it never holds the store.
2. Analyses it in a fresh process whose private memory (RLIMIT_DATA: heap and anonymous mappings)
   is capped below the store's decompressed size: f4, clusters and their replica statistics, chunk by chunk with dask.
   Reports wall time, snapshots per second and peak resident memory.
3. Baseline in the same run: the same per-snapshot kernel on one chunk already in memory (no Zarr,
   no dask), so the ratio shows what reading, decompressing and scheduling cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import write_section

MODELS = {"original": 25.0, "slower": 5.0}  # model name -> v_plus of the compiled simulation


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("runs/bench_analysis.zarr"), help="where to build the store")
    parser.add_argument("--L", type=int, default=30, help="lattice side")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.124, 0.3, 0.5, 0.6], help="densities")
    parser.add_argument("--replicas", type=int, default=32, help="replicas per (model, density)")
    parser.add_argument("--snapshots", type=int, default=16384, help="snapshots per trajectory")
    parser.add_argument("--snapshot-every", type=float, default=0.05, help="time between snapshots")
    parser.add_argument("--time-chunk", type=int, default=2048, help="snapshots per Zarr chunk")
    parser.add_argument("--memory-limit-mb", type=int, default=768, help="data-segment cap (RLIMIT_DATA) of the analysis process")
    parser.add_argument("--workers", type=int, default=2, help="dask threads of the analysis")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    parser.add_argument("--analyse-only", type=Path, help=argparse.SUPPRESS)  # the capped child process
    return parser.parse_args(argv)


def build_store(args: argparse.Namespace) -> float:
    """Create the store's metadata lazily, then write one trajectory at a time into its own chunks."""
    import dask.array
    import xarray as xr
    import zarr
    from tqdm.auto import tqdm

    from hpcdyn.simulation.drivers import simulate
    from hpcdyn.physics.systems import make_system

    shape = (len(MODELS), len(args.densities), args.replicas, args.snapshots, args.L, args.L)
    chunks = (1, 1, 1, args.time_chunk, args.L, args.L)
    template = xr.Dataset(
        {"occupancy": (("model", "density", "replica", "time", "y", "x"), dask.array.zeros(shape, dtype=np.int8, chunks=chunks))},
        coords={
            "model": np.array(list(MODELS), dtype=object),
            "density": args.densities,
            "replica": np.arange(args.replicas),
            "time": np.arange(args.snapshots) * args.snapshot_every,
        },
        attrs={"L": args.L, "D": 0.1, "v_plus": MODELS["original"], "v_other": 1.0, "burn_in": 0.0, "models": MODELS},
    )
    shutil.rmtree(args.store, ignore_errors=True)
    template.to_zarr(args.store, zarr_format=3, compute=False, mode="w", consolidated=True)
    occupancy = zarr.open_array(str(args.store / "occupancy"), mode="r+")
    t_final = (args.snapshots - 1) * args.snapshot_every
    start = time.perf_counter()
    cases = [(i, j, r) for i in range(len(MODELS)) for j in range(len(args.densities)) for r in range(args.replicas)]
    for i, j, replica in tqdm(cases, desc="build store", unit="trajectory"):
        v_plus = list(MODELS.values())[i]
        system = make_system("active", {"L": args.L, "density": args.densities[j], "v_plus": v_plus}, preset="paper")
        run = simulate(system, t_final, seed=10_000 * i + 100 * j + replica, snapshot_every=args.snapshot_every)
        occupancy[i, j, replica] = run.snapshot_grids[: args.snapshots]
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM); ru_maxrss would include the parent's, inherited at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def analyse(store: Path, memory_limit_mb: int, workers: int) -> dict:
    """Run in the capped child: summarise the whole store and report time and memory."""
    import dask

    from analysis.observables import open_ensemble, summarize

    baseline_rss = peak_rss_mb()
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    ensemble = open_ensemble(store)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=workers):
        summary = summarize(ensemble).compute()
    elapsed = time.perf_counter() - start
    occupancy = ensemble["occupancy"]
    return {
        "seconds": elapsed,
        "snapshots": int(np.prod(occupancy.shape[:4])),
        "decompressed_bytes": int(occupancy.size * occupancy.dtype.itemsize),
        "chunk_bytes": int(np.prod([chunks[0] for chunks in occupancy.chunks])),
        "peak_rss_mb": peak_rss_mb(),
        "import_rss_mb": baseline_rss,
        "f4": {
            str(model): [round(float(value), 4) for value in summary["f4"].sel(model=model).values]
            for model in summary["model"].values
        },
    }


def kernel_baseline(store: Path) -> dict:
    """The per-snapshot kernel alone on one chunk already in memory."""
    import zarr

    from analysis.lattice import snapshot_observables

    occupancy = zarr.open_array(str(store / "occupancy"), mode="r")
    block = occupancy[0, -1, 0, : occupancy.chunks[3]]
    snapshot_observables(block)  # warm-up
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        snapshot_observables(block)
    return {"snapshots_per_second": repeats * len(block) / (time.perf_counter() - start)}


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if args.analyse_only is not None:
        print(json.dumps(analyse(args.analyse_only, args.memory_limit_mb, args.workers)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    build_seconds = build_store(args)
    store_bytes = sum(path.stat().st_size for path in args.store.rglob("*") if path.is_file())
    child = [sys.executable, __file__, "--analyse-only", str(args.store), "--memory-limit-mb", str(args.memory_limit_mb),
             "--workers", str(args.workers)]
    completed = subprocess.run(child, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.exit(f"analysis failed under the {args.memory_limit_mb} MB cap:\n{completed.stderr[-3000:]}")
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    baseline = kernel_baseline(args.store)
    report = format_report(args, measured, baseline, build_seconds, store_bytes)
    print(report)
    if args.write:
        write_section("analysis", report)
    if not args.keep:
        shutil.rmtree(args.store)


def format_report(args, measured: dict, baseline: dict, build_seconds: float, store_bytes: int) -> str:
    rate = measured["snapshots"] / measured["seconds"]
    flags = [f"--{name.replace('_', '-')} {value}" for name, value in (
        ("replicas", args.replicas), ("snapshots", args.snapshots), ("time_chunk", args.time_chunk),
        ("memory_limit_mb", args.memory_limit_mb), ("workers", args.workers))]
    gigabytes = measured["decompressed_bytes"] / 1e9
    return "\n".join([
        "## Analysis of an ensemble store larger than the memory allowed",
        "",
        f"Command: `python benchmarks/bench_analysis.py {' '.join(flags)} --write`",
        (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; {date.today().isoformat()}."
        ),
        "",
        (
            f"Store: {len(MODELS)} models x {len(args.densities)} densities x {args.replicas} replicas x "
            f"{args.snapshots} snapshots of {args.L}x{args.L} (compiled simulations, built trajectory by trajectory "
            f"in {build_seconds:.0f} s): occupancy **{gigabytes:.2f} GB decompressed**, {store_bytes / 1e6:.0f} MB "
            f"on disk, chunks of {measured['chunk_bytes'] / 1e6:.1f} MB."
        ),
        "",
        "| | value |",
        "|---|---:|",
        f"| memory cap of the analysis process (RLIMIT_DATA: heap and private anonymous memory) | {args.memory_limit_mb} MB |",
        f"| peak resident memory of the analysis | **{measured['peak_rss_mb']:.0f} MB** |",
        f"| of which the interpreter with numpy, scipy, xarray, dask, zarr imported | {measured['import_rss_mb']:.0f} MB |",
        f"| wall time, f4 + clusters + replica statistics ({args.workers} dask threads) | {measured['seconds']:.1f} s |",
        f"| snapshots per second, whole store from Zarr | {rate:,.0f} |",
        f"| snapshots per second, the kernel alone on one chunk in memory (1 thread) | {baseline['snapshots_per_second']:,.0f} |",
        f"| ratio store / kernel | {rate / baseline['snapshots_per_second']:.2f} |",
        "",
        (
            f"The process could not have held the store: its private memory was capped at {args.memory_limit_mb} MB "
            f"against {gigabytes * 1e3:.0f} MB of decompressed occupancy. Each dask task holds one chunk and its "
            "labels; the task graph itself grows with the number of chunks."
        ),
        f"f4 per density {args.densities}: " + "; ".join(f"{model} {values}" for model, values in measured["f4"].items()) + ".",
    ])


if __name__ == "__main__":
    main()
