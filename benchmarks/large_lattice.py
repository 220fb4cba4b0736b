"""Learned against original dynamics beyond the paper's size: the pipeline's `large` stage, read back and explained.

    hpcdyn pipeline --preset large --out runs/pipeline-large
    python benchmarks/large_lattice.py runs/pipeline-large --write

Reads the stage's store (DIR/large.zarr: original and learned dynamics on L x L) and the report's
family verdict, then simulates the ORIGINAL dynamics once more with the learned model's class rates
in place of the true D, v_other and v_plus (the same L, densities, replicas, times; another seed) and
judges the learned dynamics against that too. The learned rates are n/E of one training trajectory:
on the paper's (T 500) D rests on about 10^4 rotations (1 % standard error), and at L 256 the
observables' standard errors are small enough to see such an error (the `large` preset therefore
trains on T 5000, 0.3 %); if the learned dynamics agrees with the original
dynamics at its own rates, what separates it from the truth is the training data's error on the
rates, not the model or the table engine. The class rates are matched to D < v_other < v_plus by
size (the three largest classes; the smallest is the blocked hops, ~0): valid for the paper's rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import xarray as xr
from results import write_section

from analysis.observables import REFERENCE_MODEL, open_ensemble, summarize
from analysis.phase_diagram import difference_table, joint_differences
from analysis.report import COMPARED, FAMILY_P, chi_square_words, family_verdicts
from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble

NAMES = {"f4": "f4", "f4_variance": "var f4", "n_clusters": "n_c", "mean_cluster_size": "<s>"}


def judge(model, reference, training=None) -> dict:
    """The report's family verdict (``analysis.report.family_verdicts``) of one summary against another;
    ``training``: the covariance the learned rates' own errors add (``analysis.rate_uncertainty``)."""
    pair = xr.concat([reference.assign_coords(model=REFERENCE_MODEL), model.assign_coords(model="learned")], dim="model")
    joint = joint_differences(pair, COMPARED, training=training).to_dict(orient="records")
    return family_verdicts(difference_table(pair, training=training).to_dict(orient="records"), joint)[0]


def learned_rates_store(record: dict, out: Path, seed: int) -> tuple[Path, dict, float]:
    preset = record["preset"]
    rates = sorted(record["stages"]["sweep"]["best_trial"]["class_rates"])
    if len(rates) < 3:
        raise SystemExit("the chosen model has fewer than three classes: no D, v_other, v_plus to read")
    d, v_other, v_plus = rates[-3:]
    config = EnsembleConfig(models=("original",), densities=tuple(preset["large_densities"]), replicas=preset["large_replicas"],
                            t_final=preset["large_t_final"], snapshot_every=preset["large_snapshot_every"],
                            burn_in=preset["large_burn_in"], seed=seed, L=preset["large_L"], D=d, v_plus=v_plus,
                            v_other=v_other)  # fmt: skip
    begin = time.perf_counter()
    summary = run_ensemble(config, out, Placement())
    return out, {"D": d, "v_other": v_other, "v_plus": v_plus, **{k: summary.get(k) for k in ("events", "units_run")}}, time.perf_counter() - begin


def training_time(preset: dict) -> float:
    return float(preset["sweep_overrides"]["data.t_final"])


def paper_or_not(preset: dict) -> str:
    factor = training_time(preset) / 500.0
    return ", the paper's" if factor == 1 else f", {factor:g} times the paper's"


def table(rows: list[tuple[str, object]]) -> list[str]:
    lines = ["| dynamics | density | replicas | " + " | ".join(NAMES[name] for name in COMPARED) + " |",
             "|---|---:|---:|" + "---:|" * len(COMPARED)]  # fmt: skip
    for label, summary in rows:
        for density in summary["density"].values:
            point = summary.sel(density=density)
            cells = [f"{float(point[name]):.4g} ± {float(point[f'{name}_se']):.2g}" for name in COMPARED]
            lines.append(f"| {label} | {float(density):g} | {int(point['n_replicas'])} | " + " | ".join(cells) + " |")
    return lines


def verdict(words: str, found: dict) -> str:
    return (f"{words}: {'AGREES' if found['agrees'] else 'DIFFERS'} over {found['cells']} cells, max |z| "
            f"{found['max_abs_z']:.2f}, {chi_square_words(found)}, p = {found['p']:.3g}.")


def conclusion(against_truth: dict, against_rates: dict, rates: dict, side: int, replicas: int) -> str:
    """What the two verdicts say together, in words."""
    error = f"D {rates['D'] / 0.1 - 1:+.1%} from the truth"
    if against_truth["agrees"]:
        return f"At {side} x {side} the learned dynamics agrees with the original by the family rule."
    if not against_rates["agrees"]:
        return (f"At {side} x {side} the learned dynamics differs from the original, and from the original at its own "
                "rates too: more than the training data's error on the rates separates them.")  # fmt: skip
    if against_truth["p"] >= FAMILY_P:  # only the per-cell bound fails
        return (f"At {side} x {side} one cell fails the per-cell bound (max |z| {against_truth['max_abs_z']:.2f}) while "
                f"the family chi-square passes; against the original dynamics at its own rates ({error}) every cell "
                f"agrees. With {replicas} replicas a z is Student-t with about {2 * replicas - 2} degrees of freedom "
                "(P(|t| > 3) near 1 % per cell, not 0.3 %), so this is weak evidence of the training trajectory's "
                "error on the rates, which more replicas would settle.")  # fmt: skip
    return (f"So at {side} x {side} the learned dynamics is the dynamics of its rates, run exactly by the table engine, "
            f"and those rates carry the statistical error of one training trajectory ({error}): the standard errors at "
            "this size resolve it, those of the 30 x 30 phase diagram do not.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path, help="a pipeline directory run with --preset large")
    parser.add_argument("--seed", type=int, default=7, help="seed of the original dynamics at the learned rates")
    parser.add_argument("--write", nargs="?", const="benchmarks/RESULTS.md", help="write the section into this file")
    args = parser.parse_args()
    record = json.loads((args.pipeline / "pipeline.json").read_text())
    stage = record["stages"].get("large")
    if stage is None:
        raise SystemExit(f"{args.pipeline}: no finished `large` stage; run `hpcdyn pipeline --preset large --out {args.pipeline}`")
    load = os.getloadavg()[0]
    # beside the pipeline directory, not in it (a pipeline directory holds only what the pipeline writes)
    beside = args.pipeline.parent / f"{args.pipeline.name}-learned-rates.zarr"
    store, rates, seconds = learned_rates_store(record, beside, args.seed)
    large = summarize(open_ensemble(stage["store"])).compute()
    at_rates = summarize(open_ensemble(store)).compute().sel(model="original")
    original, learned = large.sel(model="original"), large.sel(model="learned")
    against_truth, against_rates = judge(learned, original), judge(learned, at_rates)
    preset = record["preset"]
    side = preset["large_L"]
    body = [
        f"## Beyond the paper: learned against original dynamics on {side} x {side}",
        "",
        f"Command: `hpcdyn pipeline --preset large --out {args.pipeline}`, then `python benchmarks/large_lattice.py "
        f"{args.pipeline} --seed {args.seed} --write`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load:.1f} when this "
        f"script started: shared with other jobs), Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"The stage: {len(preset['large_densities'])} densities x {preset['large_replicas']} replicas of each dynamics, "
        f"t {preset['large_t_final']:g} (burn-in {preset['large_burn_in']:g}, a snapshot every "
        f"{preset['large_snapshot_every']:g}), the learned model (Mode 2, N_theta {len(record['stages']['sweep']['best_trial']['class_rates'])}, "
        f"vn1, trained on a 30 x 30 trajectory of T {training_time(preset):g}{paper_or_not(preset)}) on its environment table (engines: {stage.get('engines')}); "
        f"{stage['events']:,} events in {stage['seconds']:.0f} s of wall time on Ray actors (the whole `large` preset took "
        f"{record.get('seconds_this_run', 0):.0f} s, stage by stage: "
        + ", ".join(f"{name} {value:.0f} s" for name, value in record.get("stage_seconds", {}).items()) + ").",
        "",
        f"The original dynamics at the learned class rates (D {rates['D']:.5g}, v_other {rates['v_other']:.5g}, v_plus "
        f"{rates['v_plus']:.5g}; truth 0.1, 1, 25): {rates['events']:,} events"
        + (f" in {seconds:.0f} s." if rates.get("units_run") else " (the store was complete from an earlier run of this script)."),
        "",
        *table([("original", original), ("learned", learned), ("original at the learned rates", at_rates)]),
        "",
        "- " + verdict("learned against original (the report's family rule)", against_truth),
        "- " + verdict("learned against the original dynamics at the learned rates", against_rates),
        "",
    ]
    body.append(conclusion(against_truth, against_rates, rates, side, preset["large_replicas"]))
    text = "\n".join(body)
    print(text)
    if args.write:
        write_section("large-lattice", text, Path(args.write))


if __name__ == "__main__":
    main()
