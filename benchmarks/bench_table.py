"""Benchmark: the table engine against the compiled simulator (and a trained model's network), same run, one core.

    python benchmarks/bench_table.py                                  # print the tables
    python benchmarks/bench_table.py --model runs/locality/mode2_local --write   # a trained model too; RESULTS.md

Each case runs the compiled n-fold-way simulator and the table engine (family ``vn1``, exact for
the active model) from the same initial configuration for the same time. The table engine runs
"cold" from an empty table (its misses stop the loop and are filled by the rate model; the run's
events/s include that, with the selection structure "auto" chooses), then "warm" on the table the
cold run left, once with each selection structure (rate groups and the sum tree). Rates are events
per CPU second of this process (``time.process_time``, one thread), so machines shared with other
jobs give comparable figures for all of them. A last case runs the 3 x 3 block family ('block3',
0.2-0.9 M keys in long runs), where misses dominate.

``--model RUN``: a trained hard-local model on its table (the family ``hpcdyn ensemble --engine auto``
chooses) at L 30 (N 112, N 450) and L 256 (density 0.5): the cold run's misses are filled by the
network on each key's patch (its wall time is the network time on first sightings); at L 30 also
the network engine itself (lock-step, ``--network-replicas`` replicas, the same weights on the
larger lattice: a hard-local model has no position tables) for about ``--network-events`` events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results import write_section

from hpcdyn.distributed.engines import choose_engine
from hpcdyn.learning.training import load_model
from hpcdyn.learning.transformer import TransformerRates
from hpcdyn.physics.environments import make_encoder
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.physics.systems import make_system
from hpcdyn.simulation.batched import replica_streams, simulate_batched
from hpcdyn.simulation.compiled import CompiledSimulator
from hpcdyn.simulation.environment_table import EnvironmentTable, PatchEvaluator, model_lattice
from hpcdyn.simulation.table_engine import EngineOptions, TableEngine
from hpcdyn.storage.environment_tables import checkpoint_identity, original_rates_identity

CASES = [
    ("active L30 N112 (paper)", {"L": 30, "density": 0.124}, "vn1"),
    ("active L30 N450 (density 0.5)", {"L": 30, "density": 0.5}, "vn1"),
    ("active L256 N32768 (density 0.5)", {"L": 256, "density": 0.5}, "vn1"),
    ("active L30 N112, block3 keys", {"L": 30, "density": 0.124}, "block3"),
]
MODEL_CASES = [
    ("L30 N112 (paper)", {"L": 30, "density": 0.124}, True),
    ("L30 N450 (density 0.5)", {"L": 30, "density": 0.5}, True),
    ("L256 N32768 (density 0.5)", {"L": 256, "density": 0.5}, False),
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


def table_run(system, t_final, seed, table, evaluator, options, audit_model=None) -> tuple[int, float, float, object, str]:
    """Events, CPU seconds, wall seconds, statistics and selection structure of one table-engine run."""
    positions, states, rng = start(system, seed)
    begin, wall = time.process_time(), time.perf_counter()
    audit = {} if audit_model is None else {"audit_model": audit_model}
    engine = TableEngine(table, evaluator, system, positions, states, rng, t_final, options=options, **audit)
    events = sum(len(chunk.tokens) for chunk in engine.chunks())
    return events, time.process_time() - begin, time.perf_counter() - wall, engine.statistics(), engine.selection


def table_runs(system, t_final, seed, table, evaluator, options, audit_model=None) -> dict:
    """Cold (from ``table`` as given, misses filled) and warm runs with each selection structure.

    The two structures draw different trajectories from one seed: the structure the cold run did not
    choose runs once untimed first, so that its timed run meets its keys in the table too.
    """
    events, seconds, wall, cold, chosen = table_run(system, t_final, seed, table, evaluator, options, audit_model)
    row = {"events": events, "cold": events / seconds, "chosen": chosen, "cold_wall": wall,
           "first_sightings": cold.first_sightings, "misses": cold.misses, "filled": cold.keys_filled,
           "fill_calls": cold.fill_calls, "fill_seconds": cold.fill_seconds, "draws": cold.draws,
           "rejected": cold.rejected}  # fmt: skip
    audits = [cold]
    for selection in ("groups", "tree"):
        warm_options = dataclasses.replace(options, selection=selection)
        if selection != chosen:
            table_run(system, t_final, seed, table, evaluator, warm_options)
        warm_events, warm_seconds, _, warm, _ = table_run(system, t_final, seed, table, evaluator, warm_options, audit_model)
        row[selection] = warm_events / warm_seconds
        audits.append(warm)
    row["keys"] = table.size
    row["audited"] = sum(item.audited for item in audits)
    found = [item.audit_largest_difference for item in audits if item.audited]
    row["audit"] = max(found) if found else None
    return row


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
    warm_up(system, encoder, table.header, evaluator, options)
    compiled_events, compiled_seconds = compiled_run(system, t_final, args.seed)
    row = {"label": label, "family": family, "t_final": t_final, "compiled": compiled_events / compiled_seconds,
           **table_runs(system, t_final, args.seed, table, evaluator, options)}  # fmt: skip
    report(row)
    return row


def warm_up(system, encoder, header, evaluator, options) -> None:
    """Compile (or load the caches of) both simulators and both selection structures outside the timings."""
    compiled_run(system, 0.01, seed=0)
    for selection in ("groups", "tree"):
        warmup = EnvironmentTable(encoder, header)
        table_run(system, 0.01, 0, warmup, evaluator, dataclasses.replace(options, selection=selection))


def report(row: dict) -> None:
    network = f"   network {row['network'] / 1e3:5.2f} k/s" if row.get("network") else ""
    print(
        f"{row['label']:36s} compiled {row['compiled'] / 1e6:5.2f} M/s   table cold ({row['chosen']}) "
        f"{row['cold'] / 1e6:5.2f} M/s, warm groups {row['groups'] / 1e6:5.2f} M/s, tree {row['tree'] / 1e6:5.2f} M/s"
        f"{network}   keys {row['keys']:,}, first sightings {row['first_sightings']:,}, fill {row['fill_seconds']:.2f} s "
        f"in {row['fill_calls']} calls, audit max |dlog| {audit(row)}",
        flush=True,
    )


# ----------------------------------------------------------------------------- a trained model
def on_lattice(model: TransformerRates, side: int) -> TransformerRates:
    """The same hard-local weights on an L x L lattice (no position tables: only the torus size changes)."""
    if side == model.config.lattice_size:
        return model
    copy = TransformerRates(dataclasses.replace(model.config, lattice_size=side))
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def network_run(model, system, events: int, replicas: int, events_per_time: float, seed: int) -> float:
    """Events per CPU second of the lock-step network engine, ``replicas`` replicas, about ``events`` events."""
    streams = [replica_streams(seed, 0, replica) for replica in range(replicas)]
    starts = [system.initial_configuration(stream.configuration) for stream in streams]
    positions = np.stack([p for p, _ in starts])
    states = np.stack([s for _, s in starts]).astype(np.int64)
    keys = np.array([stream.key for stream in streams])
    t_final = events / (replicas * events_per_time)
    begin = time.process_time()
    result = simulate_batched(model, system, positions, states, keys, t_final)
    return float(result.events.sum()) / (time.process_time() - begin)


def measure_model(label, params, with_network, model, family, identity, args) -> dict:
    system = make_system("active", params)
    evaluator = PatchEvaluator(model, model_lattice(model, system))
    encoder = make_encoder(family, system)
    header = evaluator.header_for(encoder, identity)
    options = EngineOptions(audit_fraction=args.audit_fraction)
    lattice_model = on_lattice(model, system.L) if with_network else None  # audits and the network engine at L 30
    t_final = t_final_for(system, args.model_events)
    warm_up(system, encoder, header, evaluator, options)
    compiled_events, compiled_seconds = compiled_run(system, t_final, args.seed)
    table = EnvironmentTable(encoder, header)
    row = {"label": label, "family": family, "t_final": t_final, "compiled": compiled_events / compiled_seconds,
           "patch_lattice": evaluator.lattice.L,
           **table_runs(system, t_final, args.seed, table, evaluator, options, lattice_model)}  # fmt: skip
    if with_network:
        with torch.inference_mode():
            row["network"] = network_run(lattice_model, system, args.network_events, args.network_replicas,
                                         row["events"] / t_final, args.seed)  # fmt: skip
    report(row)
    return row


def model_rows(args) -> tuple[list[dict], str]:
    model, _ = load_model(args.model)
    checkpoint = Path(args.model) / "best.pt" if Path(args.model).is_dir() else Path(args.model)
    identity = checkpoint_identity(checkpoint)
    chosen = choose_engine("auto", model.config, checkpoint, identity.removeprefix("sha256:"))
    if chosen["engine"] != "table":
        raise SystemExit(f"--model: {args.model} does not run on a table ({chosen['reason']})")
    rows = [measure_model(label, params, network, model, chosen["key_family"], identity, args)
            for label, params, network in MODEL_CASES]  # fmt: skip
    large = by_label(rows, "L256")
    again = next_seed(args)
    large["repeats"] = [rates_of(measure_model(*case_of(MODEL_CASES, large), model, chosen["key_family"], identity, again))
                        for _ in range(args.large_repeats)]  # fmt: skip
    return rows, f"{chosen['key_family']} ({chosen['reason']})"


# The L 256 cases run again (--large-repeats), all with seed + 1: the same events, so the repeats' spread is the
# machine's (memory-bound rates on a shared machine vary by tens of percent from one run to the next).
def next_seed(args) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "seed": args.seed + 1})


def case_of(cases, row: dict) -> tuple:
    return next(case for case in cases if case[0] == row["label"])


def rates_of(row: dict) -> dict:
    return {key: row[key] for key in ("compiled", "cold", "groups", "tree")}


def values_of(row: dict, key: str) -> list[float]:
    """``key``'s rate in ``row`` and in its repeats, sorted."""
    return sorted([row[key]] + [repeat[key] for repeat in row.get("repeats", [])])


def median(row: dict, key: str) -> float:
    return float(np.median(values_of(row, key)))


def spread(row: dict, key: str) -> str:
    """``key``'s rate in ``row`` and its repeats: "x" alone, else "median x (min-max over n runs)"."""
    values = values_of(row, key)
    if len(values) == 1:
        return speed(values[0])
    return f"median {speed(median(row, key))} ({values[0] / 1e6:.2f}-{values[-1] / 1e6:.2f} M/s over {len(values)} runs)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(args) -> str:
    model = f" --model {args.model} --model-events {args.model_events} --network-events {args.network_events}" if args.model else ""
    return (f"OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_table.py --min-events {args.min_events} "
            f"--block-events {args.block_events} --audit-fraction {args.audit_fraction} --seed {args.seed}{model}"
            f"{f' --large-repeats {args.large_repeats}' if args.large_repeats else ''} --write")  # fmt: skip


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Machine: {cpu_name()}, {os.cpu_count()} cores (load average {load:.1f} at the end of the run: shared), "
            f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; one thread; "
            f"{time.strftime('%Y-%m-%d')}.")  # fmt: skip


def audit(row: dict) -> str:
    return "not run" if row["audit"] is None else f"{row['audit']:.3g} ({row['audited']:,} lookups)"


def speed(value: float) -> str:
    return f"{value / 1e6:.2f} M/s" if value >= 1e5 else f"{value / 1e3:.1f} k/s"


def original_table(rows) -> list[str]:
    lines = [
        "| case | keys | compiled | table engine, cold (misses included) | warm, rate groups | warm, sum tree | "
        "first sightings | fill: calls, wall time of the cold run's | audit max abs dlog-rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} ({row['events']:,} events) | {row['family']}: {row['keys']:,} | {speed(row['compiled'])} "
            f"| {speed(row['cold'])} ({row['chosen']}) | {speed(row['groups'])} | {speed(row['tree'])} "
            f"| {row['first_sightings']:,} | {row['fill_calls']}, {row['fill_seconds']:.2f} s of {row['cold_wall']:.1f} s "
            f"| {audit(row)} |"
        )
    return lines


def model_table(rows) -> list[str]:
    lines = [
        "| case | keys | compiled (original rates) | table engine, cold (misses included) | warm, rate groups "
        "| warm, sum tree | network engine | first sightings (per event) | network on misses: calls, wall time "
        "of the cold run's | audit max abs dlog-rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        network = f"{row['network'] / 1e3:.2f} k/s" if row.get("network") else "not run"
        lines.append(
            f"| {row['label']} ({row['events']:,} events) | {row['keys']:,} | {speed(row['compiled'])} "
            f"| {speed(row['cold'])} ({row['chosen']}) | {speed(row['groups'])} | {speed(row['tree'])} | {network} "
            f"| {row['first_sightings']:,} ({row['first_sightings'] / row['events']:.1e}) "
            f"| {row['fill_calls']}, {row['fill_seconds']:.2f} s of {row['cold_wall']:.1f} s | {audit(row)} |"
        )
    return lines


def markdown(rows, model, args, machine_line: str) -> str:
    lines = ["## Environment tables and the table engine", "", f"Command: `{command_line(args)}`", machine_line,
             "Events per CPU second of the process, every simulator of a row in the same run from the same initial "
             "configuration for the same time; the table engine with the default audit (0.1 % of lookups "
             "re-evaluated by the rate model in the full configuration).", "", "Original rates:", "",
             *original_table(rows), "", *NOTES_ORIGINAL, "", speed_note(rows)]  # fmt: skip
    if model:
        model_rows_, chosen = model
        lines += ["", f"A trained hard-local Mode 2 model (`{args.model}`), on its table: {chosen}. Compiled: the "
                  "original dynamics on the same lattice, same run. Network engine: lock-step, "
                  f"{args.network_replicas} replicas per call, about {args.network_events:,} events.", "",
                  *model_table(model_rows_), "", model_note(model_rows_), "",
                  *(NOTES_MODEL if any((row.get("audit") or 0) > 1 for row in model_rows_) else [])]  # fmt: skip
    return "\n".join(lines + [""])


NOTES_ORIGINAL = [
    "vn1 fills its whole key space (2,500 keys) at the first miss, in one call of the rate model "
    "(`prefetch='auto'`: key spaces up to 32,768 are enumerated); the first sightings are the keys the run "
    "met. block3 (1.6 M possible keys) fills on the fly: each miss stops the loop and is filled with the "
    "keys one likely event away (`prefetch='step'`): there the misses dominate, and a table that has met "
    "them runs at the warm rate. Exactness of the same code, both selection structures: "
    "`tests/test_table_engine.py` (exp(Qt), likelihood to 1e-9, event statistics against the compiled "
    "simulator, a lazily filled run equal event for event to a run on a pre-filled table).",
]


def by_label(rows, start: str) -> dict:
    return next(row for row in rows if row["label"].startswith(start))


def best_warm(row: dict) -> float:
    return max(row["groups"], row["tree"])


def speed_note(rows) -> str:
    """Where the table engine stands against the compiled simulator, from this run's figures."""
    small, large = by_label(rows, "active L30 N112 (paper)"), by_label(rows, "active L256")
    verdict = "met" if median(large, "cold") >= 1e6 else "not met"
    return (
        f"At L 30 the table engine runs at {speed(small['cold'])} cold ({speed(best_warm(small))} warm) against "
        f"{speed(small['compiled'])} for the compiled simulator: an event re-keys every token whose stencil holds "
        "the source or the target site (up to 9 for vn1): key deltas, lookups and the update of the selection "
        "structure, several times the work of the compiled simulator's event, which re-classes at most 12 moves by "
        f"fixed rules. At L 256 (32,768 tokens on 65,536 sites) both are bound by memory latency: the compiled "
        f"simulator runs at {spread(large, 'compiled')}, the table engine at {spread(large, 'cold')} cold, "
        f"{spread(large, 'groups')} (groups) and {spread(large, 'tree')} (tree) warm (the median cold run "
        f"{median(large, 'cold') / median(large, 'compiled'):.2f} of the median compiled one). Its L 256 loop keeps "
        "token and site arrays narrow (int32, contents int8), "
        "computes neighbours instead of reading site tables (megabytes at that size), with one token per site "
        "walks no site lists, and has the queue, the draw and the selection structures written out in the compiled "
        "loop (numba counts the references to every array handed to a helper, atomically: sampled with perf, that "
        "was over half of an event); 'auto' takes the tree beyond 4,096 tokens. Earlier runs of this benchmark: "
        "0.31-0.33 M/s against 1.04 M/s compiled before the narrow arrays, 0.58-0.66 M/s against 1.37 M/s before the "
        f"written-out loop. The >= 1 M events/s per core of the issue at L 256 (the median cold run) is {verdict} in "
        "this run on this shared machine."
    )


def model_note(rows) -> str:
    small, dense = by_label(rows, "L30 N112"), by_label(rows, "L30 N450")
    large = by_label(rows, "L256")
    side = small.get("patch_lattice", 12)  # rows of runs before it was recorded: the 12 x 12 locality models
    network = ", ".join(f"{row['network'] / 1e3:.2f} k/s" for row in (small, dense) if row.get("network"))
    times = [row["cold"] / row["network"] for row in (small, dense) if row.get("network")]
    return (
        "The model's vn1 table fills all 2,500 keys at the first miss in one batched network call on patches placed "
        f"alone on its {side} x {side} training lattice ({small['fill_seconds']:.2f}-{max(dense['fill_seconds'], large['fill_seconds']):.2f} s "
        "of wall time), included in the cold rates. The table engine runs the trained model at "
        f"{speed(small['cold'])} (N 112) and {speed(dense['cold'])} (N 450, where the audit's calls of the network on "
        f"the full 450-token configuration count too) at L 30, against {network} for the network engine "
        f"({', '.join(f'{value:,.0f}' for value in times)} times faster); at L 256, {spread(large, 'cold')} cold, "
        f"{spread(large, 'tree')} warm (tree), compiled original {spread(large, 'compiled')} (no network engine and no "
        "audit there: one network call on 32,768 tokens is out of reach on this machine): the >= 1 M events/s of the "
        f"issue for a trained model at L 256 including its misses (the median cold run) is "
        f"{'met' if median(large, 'cold') >= 1e6 else 'not met'} in this run (memory-bound runs on this shared machine "
        "vary by tens of percent from one run to the next, the compiled simulator's as much as the table engine's)."
        + rejections(large)
    )


def rejections(row: dict) -> str:
    """The share of the model's draws rejected (hops onto occupied sites it gives a rate): events/s counts the rest."""
    if not row.get("draws") or not row.get("rejected"):
        return ""
    share = row["rejected"] / row["draws"]
    if share < 1e-3:
        return f" {row['rejected']:,} of the cold run's {row['draws']:,} draws at L 256 were rejected hops onto occupied sites."
    return (f" {share:.1%} of the cold run's draws at L 256 were hops onto occupied sites, which the model gives a rate "
            f"and the engine rejects (the clock advances): the rates count accepted events, {speed(row['cold'] / (1 - share))} "
            "in draws.")  # fmt: skip


NOTES_MODEL = [
    "The audit at L 30 N 450 (when it shows a difference): a max |delta log-rate| near 10 = ln(0.92 / 4e-5) means "
    "that in at least one audited lookup the vn1 table and the network in the full configuration put a move in "
    "different classes (the v_other class against the blocked-hop class). The model's receptive field is diamond2; "
    "its certificate passes at vn1 with a class disagreement of 4.9e-5 at density 0.5 (inside the 1e-4 tolerance, "
    "not zero). Every such disagreement found is on a hop onto an occupied site, which is rejected whatever its "
    "rate, so the dynamics is the network's: on 31 snapshots of a table-engine run at L 30 N 450 (83,700 candidate "
    "moves, `compare_engines.disagreement`), 8 hops onto occupied sites differ and no hop onto an empty site and no "
    "rotation does (the compare-engines section gives the counts at L 12)."
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-events", type=int, default=5_000_000, help="about this many events per run (vn1 cases)")
    parser.add_argument("--block-events", type=int, default=300_000, help="events of the block3 case")
    parser.add_argument("--audit-fraction", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", help="a trained hard-local model's run directory (or checkpoint)")
    parser.add_argument("--model-events", type=int, default=3_000_000, help="about this many events per model run")
    parser.add_argument("--network-events", type=int, default=5_000, help="events of the network engine at L 30")
    parser.add_argument("--network-replicas", type=int, default=16)
    parser.add_argument("--large-repeats", type=int, default=0,
                        help="run the L 256 cases this many more times (all with seed + 1): the notes give the median and range")
    parser.add_argument("--rows", type=Path, help="write this JSON of the figures (and read it back with --from-rows)")
    parser.add_argument("--from-rows", action="store_true", help="render the figures of --rows without running")
    parser.add_argument("--write", nargs="?", const="benchmarks/RESULTS.md", help="write the section into this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.from_rows:
        saved = json.loads(args.rows.read_text())
        rows, model, machine_line = saved["rows"], saved["model"], saved["machine"]
    else:
        rows = [measure(label, params, family, args) for label, params, family in CASES]
        large, again = by_label(rows, "active L256"), next_seed(args)
        large["repeats"] = [rates_of(measure(*case_of(CASES, large), again)) for _ in range(args.large_repeats)]
        model = model_rows(args) if args.model else None
        machine_line = machine()
        if args.rows:
            args.rows.write_text(json.dumps({"rows": rows, "model": model, "machine": machine_line}, indent=1, default=float))
    print(markdown(rows, model, args, machine_line))
    if args.write:
        write_section("table-engine", markdown(rows, model, args, machine_line), Path(args.write))


if __name__ == "__main__":
    main()
