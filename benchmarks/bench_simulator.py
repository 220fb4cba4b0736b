"""Benchmark: compiled n-fold-way simulator against the plain numpy simulator, same run, one core.

    python benchmarks/bench_simulator.py                      # print the table
    python benchmarks/bench_simulator.py --write benchmarks/RESULTS.md

Also measures peak memory of a long run streamed to a Zarr store (bounded by the chunk size,
not by the trajectory length), in a child process so the figure is that run's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import write_section

from hpcdyn.simulation.reference import simulate_reference
from hpcdyn.simulation.drivers import start
from hpcdyn.physics.systems import make_system

CASES = [
    ("active L30 N112 (paper)", "active", {"density": 0.124}, "paper"),
    ("active L30 N450 (density 0.5)", "active", {"density": 0.5}, "paper"),
    ("fa chain L1000 c0.3", "fa", {"L": 1000, "dim": 1, "c": 0.3}, None),
    ("fa square L100 c0.3", "fa", {"L": 100, "dim": 2, "c": 0.3}, None),
]


def compiled_rate(system, min_events: int, repeats: int) -> float:
    """Best events/s over repeats of a run long enough to hold min_events."""
    warm, _, _ = start(system, 1.0, seed=0)
    for _ in warm.chunks():  # compile (or load the cache) outside the timing
        pass
    probe, _, _ = start(system, 10.0, seed=0)
    probe_events = sum(len(chunk.tokens) for chunk in probe.chunks())
    t_final = 10.0 * min_events / max(probe_events, 1)
    best = 0.0
    for repeat in range(repeats):
        simulator, _, _ = start(system, t_final, seed=1 + repeat)
        begin = time.perf_counter()
        events = sum(len(chunk.tokens) for chunk in simulator.chunks())
        best = max(best, events / (time.perf_counter() - begin))
    return best


def reference_rate(system, events: int) -> float:
    begin = time.perf_counter()
    log = simulate_reference(system, 1e12, seed=1, max_events=events)
    return log.n_events / (time.perf_counter() - begin)


def streamed_run_memory(events: int) -> dict:
    """Peak RSS of a child that streams ``events`` events of the paper preset into a store."""
    system = make_system("active", preset="paper")
    probe, _, _ = start(system, 10.0, seed=0)
    per_time = sum(len(chunk.tokens) for chunk in probe.chunks()) / 10.0
    t_final = 1.05 * events / per_time  # a little over, so the run holds at least ``events``
    code = (
        "import resource, json, time, sys\n"
        "from hpcdyn.physics.systems import make_system\n"
        "from hpcdyn.simulation.drivers import simulate_to_store\n"
        "from hpcdyn.storage.trajectory_store import open_trajectory\n"
        "system = make_system('active', preset='paper')\n"
        "baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "begin = time.perf_counter()\n"
        f"path = simulate_to_store(system, {t_final!r}, seed=1, out=sys.argv[1])\n"
        "seconds = time.perf_counter() - begin\n"
        "summary = open_trajectory(path).summary()\n"
        "print(json.dumps({'events': summary['n_events'], 'seconds': seconds, 'stored_bytes': summary['stored_bytes'],\n"
        "  'baseline_rss_mb': baseline / 1024, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        output = subprocess.run(
            [sys.executable, "-c", code, str(Path(folder) / "long.zarr")], capture_output=True, text=True, check=True
        )
    return json.loads(output.stdout)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-events", type=int, default=5_000_000, help="events per compiled timing run")
    parser.add_argument("--reference-events", type=int, default=20_000, help="events of the numpy baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-events", type=float, default=1e8, help="events of the streamed memory run (0: skip)")
    parser.add_argument("--write", help="also write the results as Markdown to this file")
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")

    rows = []
    for label, name, params, preset in CASES:
        system = make_system(name, params, preset=preset)
        compiled = compiled_rate(system, args.min_events, args.repeats)
        plain = reference_rate(system, args.reference_events)
        rows.append((label, compiled, plain, compiled / plain))
        print(f"{label:32s} compiled {compiled / 1e6:6.2f} M events/s   numpy {plain / 1e3:6.1f} k events/s   x{compiled / plain:6.0f}")
    memory = streamed_run_memory(int(args.long_events)) if args.long_events else None
    if memory:
        print(f"streamed run: {memory}")
    if args.write:
        write_section("simulator", markdown(rows, memory, args), Path(args.write))


def markdown(rows, memory, args) -> str:
    command = "python benchmarks/bench_simulator.py " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key != "write"
    )
    lines = [
        "## Compiled simulator (n-fold way, numba) against the plain numpy simulator",
        "",
        f"Command: `{command} --write benchmarks/RESULTS.md` (or `make bench`)",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}; one core, both simulators measured in the same run; "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| system | compiled (events/s) | numpy, all rates rebuilt per event (events/s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {compiled / 1e6:.2f} M | {plain / 1e3:.1f} k | {ratio:.0f}x |" for label, compiled, plain, ratio in rows]
    lines += ["", "Goals (issue): >= 5 M events/s at N = 112 and >= 3 M at N = 450, >= 50x over the numpy baseline.", ""]
    if memory:
        lines += [
            "## Memory of a long run streamed to Zarr",
            "",
            f"Paper preset, {memory['events']:,} events simulated and written to a store in "
            f"{memory['seconds']:.1f} s ({memory['events'] / memory['seconds'] / 1e6:.2f} M events/s including compression "
            f"and writing); store size {memory['stored_bytes'] / 1e6:.0f} MB "
            f"({memory['events'] * 13 / memory['stored_bytes']:.1f}x smaller than the raw 13 bytes/event; the "
            "float64 dwell times are random mantissas and dominate; token and move columns compress several-fold).",
            f"Peak resident memory {memory['peak_rss_mb']:.0f} MB, of which {memory['baseline_rss_mb']:.0f} MB "
            "is the interpreter with torch, numba and zarr loaded before the run: the trajectory itself never "
            "sits in memory (events stream in chunks of 2^20).",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
