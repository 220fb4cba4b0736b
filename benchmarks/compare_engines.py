"""The same trained model on the table engine and on the network engine: observables and speed.

    python benchmarks/compare_engines.py --model runs/locality/mode2_local --out runs/engines --write

Runs ``hpcdyn ensemble --engine network`` and ``--engine table`` on one model (same densities,
replicas, times and seed; the two engines draw different random streams, so they agree in
distribution, not event for event), then compares f4, var f4, n_c and <s> per density:
z = (table - network) / sqrt(se_table^2 + se_network^2). Many cells are judged as a family: every
|z| < 3 and a chi-square test of all the z's together, p >= 0.01 (a perfect engine shows some
|z| > 2 by chance among 12 cells). Also the wall time and events per second of each engine, from
the same run. Optionally writes a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import write_section  # noqa: E402

OBSERVABLES = ("f4", "f4_variance", "n_clusters", "mean_cluster_size")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run directory of a trained model (hard-local, or certified)")
    parser.add_argument("--out", type=Path, default=Path("runs/engines"))
    parser.add_argument("--density", type=float, nargs="+", default=[0.124, 0.3, 0.5])
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--t-final", type=float, default=40.0)
    parser.add_argument("--burn-in", type=float, default=10.0)
    parser.add_argument("--snapshot-every", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    return parser.parse_args(argv)


def run_engine(args: argparse.Namespace, engine: str) -> tuple[Path, dict]:
    out = args.out / f"{engine}.zarr"
    command = [sys.executable, "-m", "hpcdyn.cli", "ensemble", "--model", args.model, "--engine", engine,
               "--density", *map(str, args.density), "--replicas", str(args.replicas), "--t-final", str(args.t_final),
               "--burn-in", str(args.burn_in), "--snapshot-every", str(args.snapshot_every), "--seed", str(args.seed),
               "--out", str(out), "--actors", "1", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return out, json.loads(result.stdout)


def unit_seconds(store: Path) -> float:
    """Simulation time of the store's units (summed from the manifest): what the engine cost, without
    Ray's start-up and whatever a resumed command skipped."""
    from hpcdyn.storage.ensemble_store import MANIFEST

    return sum(json.loads(entry.read_text())["seconds"] for entry in (store / MANIFEST / "done").glob("*.json"))


def z_table(table_store: Path, network_store: Path) -> tuple[list[list], np.ndarray]:
    from analysis.observables import summarize

    table = summarize(table_store).compute()
    network = summarize(network_store).compute()
    rows, zs = [], []
    for density in table["density"].values:
        row = [float(density)]
        for name in OBSERVABLES:
            a = table[name].sel(density=density).values.item()
            b = network[name].sel(density=density).values.item()
            se = np.hypot(table[f"{name}_se"].sel(density=density).values.item(),
                          network[f"{name}_se"].sel(density=density).values.item())  # fmt: skip
            z = (a - b) / se if se > 0 else 0.0
            zs.append(z)
            row.append(f"{a:.4g} / {b:.4g} ({z:+.1f})")
        rows.append(row)
    return rows, np.asarray(zs)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    network_store, network_summary = run_engine(args, "network")
    table_store, table_summary = run_engine(args, "table")
    rows, zs = z_table(table_store, network_store)
    chi_square = float(np.sum(zs**2))
    p_value = float(stats.chi2.sf(chi_square, len(zs)))
    agrees = bool(np.all(np.abs(zs) < 3) and p_value >= 0.01)
    lines = [
        f"Command: `python benchmarks/compare_engines.py --model {args.model} --out {args.out} --write`",
        f"({date.today()}; 2 shared cores; densities {args.density}, {args.replicas} replicas, t_final {args.t_final}, "
        f"burn-in {args.burn_in}, one actor each). Cells: table / network (z).",
        "",
        "| density | f4 | var f4 | n_c | <s> |",
        "|---:|---|---|---|---|",
        *(f"| {row[0]} | " + " | ".join(row[1:]) + " |" for row in rows),
        "",
        f"Family verdict: max |z| = {np.abs(zs).max():.2f}, chi-square {chi_square:.1f} on {len(zs)} cells, "
        f"p = {p_value:.3f}: {'agree' if agrees else 'DIFFER'} (rule: every |z| < 3 and p >= 0.01).",
        "",
        "| engine | events | unit seconds (sum) | events/s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {summary['events']} | {seconds:.1f} | {summary['events'] / seconds:.3g} |"
          for name, summary, seconds in (("network", network_summary, unit_seconds(network_store)),
                                         ("table", table_summary, unit_seconds(table_store)))),  # fmt: skip
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("compare-engines", "## One trained hard-local model on the table engine and on the network engine\n\n" + text)
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
