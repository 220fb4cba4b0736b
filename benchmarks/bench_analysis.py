"""Analysis of an ensemble store larger than the memory the analysis may use.

    python benchmarks/bench_analysis.py --write              # build a ~3.8 GB (decompressed) store, analyse it
    python benchmarks/bench_analysis.py --replicas 16 --ray-workers 1 2 --write   # also on a local Ray, 1 and 2 workers

1. Builds an ensemble store (DESIGN 3.2) from compiled simulations of the active model, one
   trajectory at a time written straight into its Zarr chunks, so building it never holds the store.
2. Analyses it in a fresh process whose private memory (RLIMIT_DATA: heap and anonymous mappings)
   is capped below the store's decompressed size: f4, clusters and their replica statistics, chunk by chunk with dask.
   Reports wall time, snapshots per second and peak resident memory.
3. Baseline in the same run: the same per-snapshot kernel on one chunk already in memory (no Zarr,
   no dask), so the ratio shows what reading, decompressing and scheduling cost.
4. With ``--ray-workers N ...``: for each N, a local Ray of N CPUs started by this (uncapped) process,
   and the capped process joins it as the driver of ``hpcdyn analyze --address`` does
   (``analysis.chunk_tasks.summarize_on_workers`` through ``hpcdyn.distributed.analysis_tasks.ray_tasks``):
   the per-chunk observables run as Ray tasks on the workers, the reduction in the capped driver.
   Wall times against the local (dask threads) analysis, and the summaries compared exactly.
   Written to the section ``analysis-ray``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
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
    parser.add_argument("--ray-workers", type=int, nargs="+", default=[],
                        help="also analyse on a local Ray with each of these numbers of CPUs (workers)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--reuse", action="store_true", help="analyse the store at --store if it has the requested shape")
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    parser.add_argument("--analyse-only", type=Path, help=argparse.SUPPRESS)  # the capped child process
    parser.add_argument("--address", help=argparse.SUPPRESS)  # the child: join this Ray as the driver
    parser.add_argument("--summary-out", type=Path, help=argparse.SUPPRESS)  # the child: pickle the summary here
    return parser.parse_args(argv)


def existing_store_fits(args: argparse.Namespace) -> bool:
    """Whether --store already holds a complete store of the requested shape and chunks (for --reuse)."""
    import zarr

    try:
        occupancy = zarr.open_array(str(args.store / "occupancy"), mode="r")
    except Exception:
        return False
    shape = (len(MODELS), len(args.densities), args.replicas, args.snapshots, args.L, args.L)
    return occupancy.shape == shape and occupancy.chunks[3] == args.time_chunk and bool(occupancy[-1, -1, -1, -1].any())


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


def analyse(store: Path, memory_limit_mb: int, workers: int, address: str | None = None, summary_out: Path | None = None) -> dict:
    """Run in the capped child: summarise the whole store and report time and memory.

    With ``address``: join that Ray (under the cap) and run the per-chunk observables as its tasks.
    """
    import dask

    from analysis.observables import open_ensemble, summarize

    baseline_rss = peak_rss_mb()
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    ensemble = open_ensemble(store)
    cluster = {}
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=workers):
        if address is None:
            summary = summarize(ensemble).compute()
        else:
            from analysis.chunk_tasks import summarize_on_workers
            from hpcdyn.distributed.analysis_tasks import ray_tasks

            with ray_tasks(address) as run:
                cluster["cpus"] = run.cpus  # joins the cluster
                cluster["connect_seconds"] = time.perf_counter() - start
                summary = summarize_on_workers(store, run, ensemble=ensemble)
                cluster["tasks"] = run.submitted
    elapsed = time.perf_counter() - start
    if summary_out is not None:
        summary_out.write_bytes(pickle.dumps(summary))
    occupancy = ensemble["occupancy"]
    return {
        **cluster,
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
        print(json.dumps(analyse(args.analyse_only, args.memory_limit_mb, args.workers, args.address, args.summary_out)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    build_seconds = None if args.reuse and existing_store_fits(args) else build_store(args)
    store_bytes = sum(path.stat().st_size for path in args.store.rglob("*") if path.is_file())
    with tempfile.TemporaryDirectory() as scratch:
        measured = run_capped(args, Path(scratch) / "local.pickle")
        on_ray = {}
        for cpus in args.ray_workers:
            on_ray[cpus] = run_on_local_ray(args, cpus, Path(scratch) / f"ray{cpus}.pickle")
            on_ray[cpus]["identical"] = same_summary(Path(scratch) / "local.pickle", Path(scratch) / f"ray{cpus}.pickle")
    baseline = kernel_baseline(args.store)
    report = format_report(args, measured, baseline, build_seconds, store_bytes)
    if on_ray:
        report = format_ray_report(args, measured, on_ray, build_seconds, store_bytes)
    print(report)
    if args.write:
        write_section("analysis-ray" if on_ray else "analysis", report)
    if not args.keep:
        shutil.rmtree(args.store)


def run_capped(args: argparse.Namespace, summary_out: Path, address: str | None = None) -> dict:
    """The analysis in a fresh process under the memory cap; its measurements."""
    child = [sys.executable, __file__, "--analyse-only", str(args.store), "--memory-limit-mb", str(args.memory_limit_mb),
             "--workers", str(args.workers), "--summary-out", str(summary_out)]
    if address is not None:
        child += ["--address", address]
    load = os.getloadavg()[0]
    completed = subprocess.run(child, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        where = "on Ray" if address else "locally"
        sys.exit(f"analysis {where} failed under the {args.memory_limit_mb} MB cap:\n{completed.stderr[-3000:]}")
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "load_before": load}


def run_on_local_ray(args: argparse.Namespace, cpus: int, summary_out: Path) -> dict:
    """Start a Ray of ``cpus`` CPUs here (uncapped: its workers are not the driver), run the capped driver against it."""
    from hpcdyn.distributed.cluster import init_ray

    ray = init_ray(num_cpus=cpus, log_to_driver=False)
    try:
        return run_capped(args, summary_out, address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def same_summary(first: Path, second: Path) -> bool:
    """Whether two pickled summaries are identical: every value, coordinate and attribute, bit for bit."""
    import xarray as xr

    try:
        xr.testing.assert_identical(pickle.loads(first.read_bytes()), pickle.loads(second.read_bytes()))
    except AssertionError:
        return False
    return True


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
            f"{args.snapshots} snapshots of {args.L}x{args.L} (compiled simulations, {built(build_seconds)}): "
            f"occupancy **{gigabytes:.2f} GB decompressed**, {store_bytes / 1e6:.0f} MB "
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



def built(build_seconds: float | None) -> str:
    if build_seconds is None:
        return "built by an earlier run (--reuse)"
    return f"built trajectory by trajectory in {build_seconds:.0f} s"


def format_ray_report(args, measured: dict, on_ray: dict[int, dict], build_seconds: float | None, store_bytes: int) -> str:
    flags = [f"--{name.replace('_', '-')} {value}" for name, value in (
        ("replicas", args.replicas), ("snapshots", args.snapshots), ("time_chunk", args.time_chunk),
        ("memory_limit_mb", args.memory_limit_mb), ("workers", args.workers))]
    flags.append("--ray-workers " + " ".join(str(cpus) for cpus in on_ray))
    gigabytes = measured["decompressed_bytes"] / 1e9
    local = measured["seconds"]
    rows = [
        f"| local: dask, {args.workers} threads (no Ray) | {local:.1f} s | {measured['snapshots'] / local:,.0f} | 1.00 | "
        f"{measured['peak_rss_mb']:.0f} MB | – | {measured['load_before']:.1f} | – |"
    ]
    for cpus, result in on_ray.items():
        rows.append(
            f"| Ray, {cpus} worker{'s' if cpus > 1 else ''} (joined in {result['connect_seconds']:.1f} s) | "
            f"{result['seconds']:.1f} s | {result['snapshots'] / result['seconds']:,.0f} | {result['seconds'] / local:.2f} | "
            f"{result['peak_rss_mb']:.0f} MB | {result['tasks']} | {result['load_before']:.1f} | "
            f"{'**yes**' if result['identical'] else '**NO**'} |"
        )
    counts = sorted(on_ray)
    speedup = (
        f" Wall time with {counts[-1]} workers / with {counts[0]}: "
        f"{on_ray[counts[-1]]['seconds'] / on_ray[counts[0]]['seconds']:.2f}."
        if len(counts) > 1 else ""
    )
    return "\n".join([
        "## Analysis on a Ray cluster's workers (`hpcdyn analyze --address`) against the local analysis",
        "",
        f"Command: `python benchmarks/bench_analysis.py {' '.join(flags)} --write`",
        (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other work), "
            f"Python {platform.python_version()}; {date.today().isoformat()}."
        ),
        "",
        (
            f"Store: {len(MODELS)} models x {len(args.densities)} densities x {args.replicas} replicas x "
            f"{args.snapshots} snapshots of {args.L}x{args.L} ({built(build_seconds)}): occupancy "
            f"**{gigabytes:.2f} GB decompressed**, {store_bytes / 1e6:.0f} MB on disk, chunks of "
            f"{measured['chunk_bytes'] / 1e6:.1f} MB. Each analysis runs in a fresh driver process whose private memory "
            f"(RLIMIT_DATA) is capped at **{args.memory_limit_mb} MB**; the Ray of N CPUs is started by the benchmark "
            "outside the cap, and the capped driver joins it by address, as `hpcdyn analyze --address` does."
        ),
        "",
        "| analysis of the whole store | wall time | snapshots/s | time / local | driver peak RSS | Ray tasks | load before (1 min) | summary identical to local |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        (
            "Ray tasks: groups of consecutive chunks of at least 2^21 lattice sites (~70-100 ms of kernel each); each "
            "opens the store by path, reads and labels its chunks, and returns 40 bytes a snapshot; the driver runs the "
            "same reduction graph as the local analysis. The Ray wall time includes joining the cluster and starting "
            "the job's worker processes. \"Identical\": every value, coordinate and attribute of the summary Dataset "
            "equal bit for bit (xarray.testing.assert_identical)." + speedup
        ),
        "",
        (
            f"Load: the machine's {os.cpu_count()} cores are shared with other jobs (the 1-minute load average before "
            "each analysis is in the table; above about 1, a second worker finds no free core, and the driver's "
            "reduction competes with the workers). On an idle machine with more cores than workers, rerun the command "
            "for the scaling itself."
        ),
    ])


if __name__ == "__main__":
    main()
