"""Sufficient statistics: exactness, speed and memory of the streaming pass, epoch time vs length.

    python benchmarks/bench_statistics.py --events 1e7 --write benchmarks/RESULTS.md

1. Exactness: U from the statistics against path_log_likelihood (float64 hard-local models, Mode 1
   and Mode 2, 1 and 2 layers of vn1, active and fa; training and held-out parts).
2. Scale: a paper-preset trajectory of about --events events streamed to a store, then one pass over
   it in a fresh process (its peak RSS is the pass's, with the interpreter); events/s, extrapolated
   to 1e8 events.
3. Epoch time (one full-batch U over every key) against trajectory length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAPER = {"L": 30, "N": 112, "D": 0.1, "v_plus": 25.0, "v_other": 1.0}
EVENTS_PER_TIME = 3000.0  # paper preset, about (measured 1720 events per unit time: see the run)


def exactness() -> list[dict]:
    import torch

    from hpcdyn.learning.likelihood import path_log_likelihood
    from hpcdyn.learning.local_training import StatisticsObjective
    from hpcdyn.learning.statistics import split_points, trajectory_statistics
    from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
    from hpcdyn.physics.systems import make_system
    from hpcdyn.simulation.drivers import simulate
    from hpcdyn.storage.events import EventWindow

    rows = []
    for name, params, t_final in (("active", PAPER, 5.0), ("fa", {"L": 64}, 20.0)):
        system = make_system(name, params)
        events = simulate(system, t_final, seed=1).events
        for layers in (1, 2):
            for mode in (1, 2):
                torch.manual_seed(layers * 10 + mode)
                config = TransformerConfig(system=name, lattice_size=max(system.shape), d_model=16, n_heads=2,
                                           n_layers=layers, d_ff=16, mode=mode, rotary=False, attention_stencil="vn1",
                                           initial_offset_score=0.0)  # fmt: skip
                model = TransformerRates(config).double().eval()
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.add_(0.3 * torch.randn_like(parameter))
                stats = trajectory_statistics(events, config.key_family, 0.1)
                u = StatisticsObjective(stats, system).both_parts(model)
                a, b = split_points(events.n_events, 0.1)
                ref = (path_log_likelihood(EventWindow(events, 0, a), model).log_likelihood,
                       path_log_likelihood(EventWindow(events, b, events.n_events), model).log_likelihood)  # fmt: skip
                rows.append({"system": name, "layers": layers, "mode": mode, "family": stats.family, "keys": stats.n_keys,
                             "events": events.n_events,
                             "rel_train": abs(u[0] - ref[0]) / abs(ref[0]), "rel_heldout": abs(u[1] - ref[1]) / abs(ref[1])})  # fmt: skip
    return rows


def peak_rss_mb() -> float:
    """VmHWM of this process (reset by exec, unlike ru_maxrss, which a child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pass_only(store: str) -> None:
    """Child process: one statistics pass over a store; prints JSON with its time and peak RSS."""
    from hpcdyn.learning.statistics import trajectory_statistics
    from hpcdyn.storage.trajectory_store import open_trajectory

    source = open_trajectory(store)
    trajectory_statistics(source, "vn1", 0.1, block_events=1 << 16)  # compile (numba cache) outside the timing
    before = peak_rss_mb()
    begin, cpu = time.perf_counter(), time.process_time()
    stats = trajectory_statistics(source, "vn1", 0.1)
    seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
    peak = peak_rss_mb()
    print(json.dumps({"events": source.n_events, "seconds": seconds, "cpu_seconds": cpu_seconds, "keys": stats.n_keys,
                      "rss_before_MB": before, "peak_rss_MB": peak}))  # fmt: skip


def scale(n_events: float, workdir: Path) -> dict:
    from hpcdyn.physics.systems import make_system
    from hpcdyn.simulation.drivers import simulate_to_store

    store = workdir / f"paper-{int(n_events)}.zarr"
    if not store.exists():
        simulate_to_store(make_system("active", PAPER), n_events / 1650.0, seed=7, out=store, force=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--pass-only", str(store)], capture_output=True, text=True, env=env, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["events_per_second"] = row["events"] / row["cpu_seconds"]  # CPU time: the cores are shared
    row["extrapolated_1e8_seconds"] = 1e8 / row["events_per_second"]
    row["store"] = str(store)
    return row


def epoch_times(workdir: Path, big_store: Path | None = None) -> list[dict]:
    import torch

    from hpcdyn.learning.local_training import StatisticsObjective
    from hpcdyn.learning.statistics import trajectory_statistics
    from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
    from hpcdyn.physics.systems import make_system
    from hpcdyn.simulation.drivers import simulate

    torch.set_num_threads(1)
    system = make_system("active", PAPER)
    model = TransformerRates(TransformerConfig(system="active", lattice_size=30, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                                               mode=2, rotary=False, attention_stencil="vn1"))  # fmt: skip
    rows = []
    sources = [(t_final, simulate(system, t_final, seed=3).events) for t_final in (10.0, 100.0, 1000.0)]
    if big_store is not None:  # the scale run's store (1e8 events by default), read from disk
        from hpcdyn.storage.trajectory_store import open_trajectory

        big = open_trajectory(big_store)
        sources.append((float(big.t_final), big))
    for t_final, events in sources:
        objective = StatisticsObjective(trajectory_statistics(events, "vn1", 0.1), system)
        objective.log_likelihood(model).backward()  # warm up
        begin = time.perf_counter()
        for _ in range(3):
            model.zero_grad()
            objective.log_likelihood(model).backward()
        rows.append({"t_final": t_final, "events": events.n_events, "keys": objective.stats.n_keys,
                     "step_seconds": (time.perf_counter() - begin) / 3})  # fmt: skip
    return rows


def markdown(exact, big, epochs, command) -> str:
    import numba
    import numpy

    lines = ["<!-- section: statistics -->", "## Sufficient statistics of a trajectory (hard-local training)", "",
             f"Command: `{command}`",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
             f"Python {platform.python_version()}, numpy {numpy.__version__}, numba {numba.__version__}; one core; "
             f"{datetime.date.today()}.", "",
             "Exactness: U from the statistics against `path_log_likelihood`, float64 models (vn1 attention; 2 layers: diamond2 keys).", "",
             "| system | layers | mode | key family | keys | events | rel. diff. train | rel. diff. held-out |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in exact:
        lines.append(f"| {row['system']} | {row['layers']} | {row['mode']} | {row['family']} | {row['keys']} | {row['events']} | "
                     f"{row['rel_train']:.1e} | {row['rel_heldout']:.1e} |")  # fmt: skip
    lines += ["", "Scale: one pass (vn1 keys) over a paper-preset store, in a fresh process on one core.", "",
              f"- {big['events']:,} events in {big['cpu_seconds']:.2f} s of CPU ({big['seconds']:.2f} s wall on shared cores): "
              f"{big['events_per_second'] / 1e6:.2f} M events per CPU second, "
              f"{big['keys']} distinct keys" + (" (measured at 1e8 events; target <= 2 min of one core)" if big["events"] >= 1e8 else
              f"; extrapolated to 1e8 events: {big['extrapolated_1e8_seconds']:.0f} s (the pass is linear in the events)")
              + "; reading and decompressing the store are included.",
              f"- Peak RSS {big['peak_rss_MB']:.0f} MB, of which {big['rss_before_MB']:.0f} MB before the timed pass (interpreter, "
              "numba, zarr, a warm-up pass): the events stream in blocks of 2^20, the pass keeps the lattice and per-key arrays.",
              "", "Epoch cost against trajectory length (one full-batch U and its gradient over every key; d_model 32, 1 layer):", "",
              "| T | events | keys | seconds per step |", "|---:|---:|---:|---:|"]  # fmt: skip
    for row in epochs:
        lines.append(f"| {row['t_final']:g} | {row['events']:,} | {row['keys']} | {row['step_seconds']:.3f} |")
    lines += ["", "<!-- end: statistics -->", ""]  # the section's own markers; write_section keeps what follows
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    current = path.read_text() if path.exists() else ""
    start, end = "<!-- section: statistics -->", "<!-- end: statistics -->"
    if start in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        current = head + text + ("\n" if tail else "") + tail
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=float, default=1e7)
    parser.add_argument("--workdir", default="/tmp/hpcdyn-bench-statistics")
    parser.add_argument("--write", help="markdown file to write the section into")
    parser.add_argument("--pass-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pass_only:
        pass_only(args.pass_only)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exact = exactness()
    print(json.dumps(exact, indent=1), flush=True)
    big = scale(args.events, workdir)
    print(json.dumps(big), flush=True)
    epochs = epoch_times(workdir, Path(big["store"]))
    print(json.dumps(epochs), flush=True)
    command = "python benchmarks/bench_statistics.py " + " ".join(sys.argv[1:])
    text = markdown(exact, big, epochs, command)
    print(text)
    if args.write:
        write_section(Path(args.write), text)


if __name__ == "__main__":
    main()
