"""The Mode 2 start's classifier fit at the trainer's lr and at a larger classifier lr, case by case.

    python benchmarks/classifier_lr.py CASE=STORE:STENCIL:N_THETA:SEED [...] [--classifier-lr 3e-2] [--jobs 2]

Each case is traced as in ``classifier_patience.py`` (the quick preset's model, lr 3e-3, one epoch),
once with the classifier at that lr and once with ``--classifier-lr``: the step of the best state,
the steps the fit runs (patience 3), the best held-out U (nats) and the run's held-out gap per event
and class rates. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from classifier_patience import stop, trace

LR = 3e-3


def run(case: str, directory: Path, classifier_lr: float | None) -> dict:
    extra = () if classifier_lr is None else ("--classifier-lr", repr(classifier_lr))
    place = directory / ("base" if classifier_lr is None else "fast")
    place.mkdir(exist_ok=True)
    name, checks = trace(case, place, extra)
    best, best_at, _ = stop(checks, 6)
    kept, _, ran = stop(checks, 3)
    metrics = json.loads((place / name / "metrics.jsonl").read_text().splitlines()[0])
    return {"name": name, "best": best, "best_at": best_at, "kept": kept, "ran": ran, "gap": metrics["gap_per_event"],
            "rates": metrics.get("class_rates", [])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="NAME=STORE:STENCIL:N_THETA:SEED")
    parser.add_argument("--classifier-lr", type=float, default=3e-2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(case, rate) for case in args.cases for rate in (None, args.classifier_lr)]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run(job[0], Path(scratch), job[1]), jobs))
    fast = f"{args.classifier_lr:g}"
    print(f"| case | best at step, {LR:g} -> {fast} | fit steps (patience 3) | held-out U at {fast} minus at {LR:g} (nats) "
          f"| gap per event, {LR:g} / {fast} | class rates at {fast} |")
    print("|---|---:|---:|---:|---:|---|")
    for base, quick in zip(rows[::2], rows[1::2]):
        rates = ", ".join(f"{rate:.4g}" for rate in quick["rates"])
        print(f"| {base['name']} | {base['best_at']} -> {quick['best_at']} | {base['ran']} -> {quick['ran']} "
              f"| {quick['kept'] - base['kept']:+.3g} | {base['gap']:.2g} / {quick['gap']:.2g} | {rates} |")


if __name__ == "__main__":
    main()
