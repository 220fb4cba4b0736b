"""The plain `hpcdyn train STORE --mode 2 --n-classes 4` judged on several trajectories: are the rates recovered?

    python benchmarks/mode2_defaults.py "L 12, density 0.124=runs/mode2-defaults/a-L12.zarr:runs/mode2-defaults/start-a-L12" \
        ... [--rows runs/mode2-defaults/rows.json] [--write]

Each case is LABEL=STORE:RUN (a run directory of `hpcdyn train`; its best.pt is judged). For every case:
the class of each true kind of move (the class holding most of its candidate moves over the store's first
50 k events, and the share it holds), each class rate n_k / E_k over the run's training part with its 99 %
interval (``hpcdyn.learning.rate_intervals.rate_interval``: standard error sqrt(n_k) / E_k), and the verdict: RECOVERED
when every kind holds >= 99 % of its moves in a class of its own, the intervals of the rotations', the
forward hops' and the other hops' classes cover D, v_plus and v_other, and the blocked hops' class sits
below 1e-3 D (the events it took are shown). `--write` replaces the `mode2-defaults-record` section of benchmarks/TRAINING.md;
`--rows` keeps the measured rows (JSON) and, with --from-rows, renders them again without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from results import write_section  # noqa: E402

from hpcdyn.learning.rate_intervals import rate_interval  # noqa: E402
from hpcdyn.learning.class_rates import class_statistics  # noqa: E402
from hpcdyn.learning.evaluation import class_table  # noqa: E402
from hpcdyn.learning.training import TrainingConfig, load_model, split  # noqa: E402
from hpcdyn.storage.trajectory_store import open_trajectory  # noqa: E402

TRAINING = Path(__file__).with_name("TRAINING.md")
SECTION = "mode2-defaults-record"
KIND_RATE = {"rotation": "D", "forward_hop": "v_plus", "other_hop": "v_other"}
ONE_CLASS = 0.99  # share of a kind's candidate moves its class must hold
BLOCKED_BELOW = 1e-3  # the blocked hops' class rate, in units of D
TABLE_EVENTS = 50_000


def judge(label: str, store: str, run: str) -> dict:
    """One case: classes, rates with intervals, and the verdict (see the module's docstring)."""
    torch.set_num_threads(1)
    source = open_trajectory(store)
    model, state = load_model(run)
    config = TrainingConfig.from_dict(state["training_config"])
    training = split(source, config)[0]
    statistics = class_statistics(model, training)
    table = class_table(model, source, max_events=TABLE_EVENTS)
    params = source.system.params()
    kinds = {}
    for kind, row in table.items():
        if sum(row):
            chosen = max(range(len(row)), key=row.__getitem__)
            kinds[kind] = {"class": chosen, "share": row[chosen] / sum(row)}
    classes = []
    for k, rate in enumerate(model.class_rates()):
        events, exposure = int(statistics.events[k]), float(statistics.exposure[k])
        classes.append({"rate": rate, "events": events, "exposure": exposure, "interval_99": rate_interval(events, exposure)})
    checks = _checks(kinds, classes, params)
    metrics = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    best = max(metrics, key=lambda row: row["val_U_per_T"])
    return {
        "label": label, "store": store, "run": run, "L": params["L"], "N": params["N"],
        "density": params["N"] / params["L"] ** 2, "seed": source.seed, "events": source.n_events,
        "training_events": int(training.n_events), "segment_events": config.segment_events,
        "class_init": metrics[0].get("class_init", "none (from scratch)"), "best_epoch": best["epoch"],
        "epochs_run": len(metrics), "gap_per_event": best["gap_per_event"],
        "seconds_per_epoch": sum(row["seconds"] for row in metrics) / len(metrics),
        "kinds": kinds, "classes": classes, "checks": checks, "recovered": all(checks.values()),
    }  # fmt: skip


def _checks(kinds: dict, classes: list[dict], params: dict) -> dict[str, bool]:
    checks = {"one class per kind": all(kind["share"] >= ONE_CLASS for kind in kinds.values())}
    checks["kinds apart"] = len({kind["class"] for kind in kinds.values()}) == len(kinds)
    for kind, name in KIND_RATE.items():
        low, high = classes[kinds[kind]["class"]]["interval_99"] if kind in kinds else (float("nan"),) * 2
        checks[f"{name} covered"] = bool(low <= params[name] <= high)
    blocked = classes[kinds["blocked_hop"]["class"]] if "blocked_hop" in kinds else None
    checks["blocked ~0"] = blocked is not None and blocked["rate"] < BLOCKED_BELOW * params["D"]
    return checks


def _interval(entry: dict) -> str:
    low, high = entry["interval_99"]
    return f"{entry['rate']:.4g} [{low:.3g}, {high:.3g}]"


def render(rows: list[dict], command: str) -> str:
    lines = [
        "## The plain Mode 2 command on several trajectories: the record",
        "",
        f"Written by `{command}` from the runs of",
        "",
        "```bash",
        "hpcdyn train STORE --mode 2 --n-classes 4 --out RUN      # no other option: the unrestricted transformer",
        "```",
        "",
        f"Judged at best.pt: each true kind of move must put >= {ONE_CLASS:.0%} of its candidate moves (over the first "
        f"{TABLE_EVENTS:,} events) in a class of its own; the 99 % interval of its class's n/E (over the training part) "
        f"must cover D, v_plus, v_other; the blocked hops' class must sit below {BLOCKED_BELOW:g} D. "
        "Truth: D 0.1, v_other 1, v_plus 25 (the paper's rates).",
        "",
        "| case | L | density | events (training) | seed | start | best / run | gap (nats/event) | D class (99 %) "
        "| v_other class | v_plus class | blocked class | least share in one class | s / epoch | verdict |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        kinds, classes = row["kinds"], row["classes"]
        entry = {kind: classes[kinds[kind]["class"]] for kind in kinds}
        failed = [name for name, passed in row["checks"].items() if not passed]
        verdict = "RECOVERED" if row["recovered"] else "not recovered: " + ", ".join(failed)
        least = min(kind["share"] for kind in kinds.values())
        blocked = f"{entry['blocked_hop']['rate']:.2g} ({entry['blocked_hop']['events']} events)" if "blocked_hop" in entry else "-"
        lines.append(
            f"| {row['label']} | {row['L']} | {row['density']:.3g} | {row['events']:,} ({row['training_events']:,}) "
            f"| {row['seed']} | {row['class_init']} | {row['best_epoch']} / {row['epochs_run']} | {row['gap_per_event']:.4f} "
            f"| {_interval(entry['rotation'])} | {_interval(entry['other_hop'])} | {_interval(entry['forward_hop'])} "
            f"| {blocked} | {least:.4f} | {row['seconds_per_epoch']:.0f} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="LABEL=STORE:RUN")
    parser.add_argument("--rows", type=Path, help="JSON file of the measured rows (written; read with --from-rows)")
    parser.add_argument("--from-rows", action="store_true", help="render the rows of --rows without measuring")
    parser.add_argument("--write", action="store_true", help=f"replace the {SECTION} section of benchmarks/TRAINING.md")
    args = parser.parse_args()
    if args.from_rows:
        if args.rows is None:
            parser.error("--from-rows: needs --rows FILE")
        rows = json.loads(args.rows.read_text())
    else:
        if not args.cases:
            parser.error("cases: give at least one LABEL=STORE:RUN")
        rows = []
        for case in args.cases:
            label, _, paths = case.partition("=")
            store, _, run = paths.partition(":")
            if not (label and store and run):
                parser.error(f"cases: {case!r} is not LABEL=STORE:RUN")
            rows.append(judge(label, store, run))
        if args.rows is not None:
            args.rows.write_text(json.dumps(rows, indent=1))
    body = render(rows, "python benchmarks/mode2_defaults.py CASES --rows ROWS --write")
    print(body)
    if args.write:
        write_section(SECTION, body, TRAINING)


if __name__ == "__main__":
    main()
