"""Benchmark: the table engine on the original rates against the compiled simulator, same run, one core.

    python benchmarks/bench_table.py                      # print the table
    python benchmarks/bench_table.py --write              # and replace its section of RESULTS.md

Each case runs the compiled n-fold-way simulator and the table engine (family ``vn1``, exact for
the active model) from the same initial configuration for the same time. The table engine runs
twice: "cold" from an empty table (its misses stop the loop and are filled by the true rate model;
the run's events/s include that), then "warm" on the table the cold run left. Rates are events
per CPU second of this process (``time.process_time``, one thread), so machines shared with other
jobs give comparable figures for both simulators. A last case runs the 3 x 3 block family
('block3', 0.2-0.9 M keys in long runs), where misses dominate.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results import write_section

from hpcdyn.physics.environments import make_encoder
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.systems import make_system
from hpcdyn.simulation.compiled import CompiledSimulator
from hpcdyn.simulation.environment_table import EnvironmentTable, PatchEvaluator, model_lattice
from hpcdyn.simulation.table_engine import EngineOptions, TableEngine
from hpcdyn.storage.environment_tables import original_rates_identity

CASES = [
    ("active L30 N112 (paper)", {"L": 30, "density": 0.124}, "vn1"),
    ("active L30 N450 (density 0.5)", {"L": 30, "density": 0.5}, "vn1"),
    ("active L256 N32768 (density 0.5)", {"L": 256, "density": 0.5}, "vn1"),
    ("active L30 N112, block3 keys", {"L": 30, "density": 0.124}, "block3"),
]


def start(system, seed):
    rng = np.random.default_rng(seed)
    positions, states = system.initial_configuration(rng)
    return positions, states, rng


def compiled_run(system, t_final, seed) -> tuple[int, float]:
    positions, states, rng = start(system, seed)
    simulator = CompiledSimulator(system, positions, states, rng, t_final)
    begin = time.process_time()
    events = sum(len(chunk.tokens) for chunk in simulator.chunks())
    return events, time.process_time() - begin


def table_run(system, t_final, seed, table, evaluator, options) -> tuple[int, float, float, object]:
    """Events, CPU seconds, wall seconds and statistics of one table-engine run."""
    positions, states, rng = start(system, seed)
    begin, wall = time.process_time(), time.perf_counter()
    engine = TableEngine(table, evaluator, system, positions, states, rng, t_final, options=options)
    events = sum(len(chunk.tokens) for chunk in engine.chunks())
    return events, time.process_time() - begin, time.perf_counter() - wall, engine.statistics()


def t_final_for(system, events: int) -> float:
    probe_time = 5.0
    probe, _ = compiled_run(system, probe_time, seed=0)
    return probe_time * events / max(probe, 1)


def measure(label, params, family, args) -> dict:
    system = make_system("active", params)
    model = true_rate_model(system)
    evaluator = PatchEvaluator(model, model_lattice(model, system))
    encoder = make_encoder(family, system)
    table = EnvironmentTable(encoder, evaluator.header_for(encoder, original_rates_identity(system)))
    options = EngineOptions(audit_fraction=args.audit_fraction)
    events = args.block_events if family != "vn1" else args.min_events
    t_final = t_final_for(system, events)
    compiled_run(system, 0.01, seed=0)  # compile or load the caches outside the timings
    warmup = EnvironmentTable(encoder, table.header)
    table_run(system, 0.01, 0, warmup, evaluator, options)
    compiled_events, compiled_seconds = compiled_run(system, t_final, args.seed)
    cold_events, cold_seconds, cold_wall, cold = table_run(system, t_final, args.seed, table, evaluator, options)
    warm_events, warm_seconds, _, warm = table_run(system, t_final, args.seed, table, evaluator, options)
    row = {
        "label": label, "family": family, "t_final": t_final, "keys": table.size,
        "compiled": compiled_events / compiled_seconds, "compiled_events": compiled_events,
        "cold": cold_events / cold_seconds, "warm": warm_events / warm_seconds, "events": cold_events,
        "first_sightings": cold.first_sightings, "misses": cold.misses, "filled": cold.keys_filled,
        "fill_calls": cold.fill_calls, "fill_seconds": cold.fill_seconds, "cold_wall": cold_wall,
        "audited": cold.audited + warm.audited,
        "audit": np.nanmax([cold.audit_largest_difference, warm.audit_largest_difference]),
    }  # fmt: skip
    print(
        f"{label:36s} compiled {row['compiled'] / 1e6:5.2f} M/s   table cold {row['cold'] / 1e6:5.2f} M/s "
        f"warm {row['warm'] / 1e6:5.2f} M/s   keys {row['keys']:,}, first sightings {row['first_sightings']:,}, "
        f"fill {row['fill_seconds']:.2f} s in {row['fill_calls']} calls, audit max |dlog| {row['audit']:.3g}",
        flush=True,
    )
    return row


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(rows, args) -> str:
    command = (f"OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_table.py --min-events {args.min_events} "
               f"--block-events {args.block_events} --audit-fraction {args.audit_fraction} --seed {args.seed} --write")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Environment tables and the table engine",
        "",
        f"Command: `{command}`",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (load average {load:.1f} at the end of the run: shared), "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; one thread; "
        f"{time.strftime('%Y-%m-%d')}. Events per CPU second of the process, both simulators in the same run from "
        "the same initial configuration for the same time; the table engine with the default audit (0.1 % of "
        "lookups re-evaluated by the true rate model in the full configuration).",
        "",
        "| case | keys | compiled | table engine, cold (misses included) | table engine, warm | "
        "first sightings | fill: calls, wall time of the cold run's | audit max abs dlog-rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} ({row['events']:,} events) | {row['family']}: {row['keys']:,} | {row['compiled'] / 1e6:.2f} M/s "
            f"| {row['cold'] / 1e6:.2f} M/s | {row['warm'] / 1e6:.2f} M/s | {row['first_sightings']:,} "
            f"| {row['fill_calls']}, {row['fill_seconds']:.2f} s of {row['cold_wall']:.1f} s | {row['audit']:.3g} |"
        )
    lines += [
        "",
        "vn1 fills its whole key space (2,500 keys) at the first miss, in one call of the true rate model "
        "(`prefetch='auto'`: key spaces up to 32,768 are enumerated); the first sightings are the keys the run "
        "met. block3 (1.6 M possible keys) fills on the fly: each miss stops the loop and is filled with the "
        "keys one likely event away (`prefetch='step'`): there the misses dominate (about 0.2-0.3 new keys per "
        "event in a short run, each stop costing a few milliseconds of Python and of a small rate-model call), "
        "and a table that has met them runs at the warm rate. Goal (issue): >= 1 M events/s per core; the "
        "prototype read 1.7-2.6 M draws/s from a 2,500-key table. At L 256 both simulators are bound by memory "
        "latency, not arithmetic: the chosen token is anywhere on a 65,536-site lattice, so an event's token "
        "records, sites, stencil tables and sum-tree path are cache misses (the compiled simulator loses 5-7x "
        "between L 30 and L 256 too); packing each token's fields into one cache line and an 8-ary sum tree "
        "(one line per level) were measured and kept or dropped on that basis (the packing gained nothing). "
        "Exactness of the same code: `tests/test_table_engine.py` (exp(Qt), likelihood to 1e-9, event "
        "statistics against the compiled simulator).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-events", type=int, default=5_000_000, help="about this many events per run (vn1 cases)")
    parser.add_argument("--block-events", type=int, default=300_000, help="events of the block3 case")
    parser.add_argument("--audit-fraction", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", nargs="?", const="benchmarks/RESULTS.md", help="write the section into this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(label, params, family, args) for label, params, family in CASES]
    if args.write:
        write_section("table-engine", markdown(rows, args), Path(args.write))


if __name__ == "__main__":
    main()
