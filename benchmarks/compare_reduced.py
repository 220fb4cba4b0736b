"""Learned vs original dynamics at a size reduced for CPU (the paper's comparison at 0.124, 0.3, 0.5).

    python benchmarks/compare_reduced.py --model runs/validation/RUN [--model ...] --out runs/compare/NAME --write

Runs `hpcdyn ensemble` (original and the given learned models, on the models' 12 x 12 lattice) and
`hpcdyn analyze`, then (with --write) records the report's tables and figure in
benchmarks/RESULTS.md under the section compare-reduced-NAME. Rerunning resumes the ensemble.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from results import write_section

HERE = Path(__file__).parent


def hpcdyn(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "hpcdyn.cli", *arguments], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="trained run directory; repeatable")
    parser.add_argument("--out", required=True, type=Path, help="directory for ensemble.zarr and report/")
    parser.add_argument("--density", type=float, nargs="+", default=[0.124, 0.3, 0.5])
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--t-final", type=float, default=30.0)
    parser.add_argument("--burn-in", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="record the tables in benchmarks/RESULTS.md")
    args = parser.parse_args()
    store, report = args.out / "ensemble.zarr", args.out / "report"
    models = [argument for model in args.model for argument in ("--model", model)]
    ensemble = ["ensemble", "--model", "original", *models, "--density", *map(str, args.density),
                "--replicas", str(args.replicas), "--t-final", f"{args.t_final:g}", "--snapshot-every", "0.5",
                "--burn-in", f"{args.burn_in:g}", "--seed", str(args.seed), "--out", str(store),
                "--actors", str(args.actors), "--no-progress"]  # fmt: skip
    hpcdyn(*ensemble)
    hpcdyn("analyze", str(store), "--out", str(report), "--overwrite", "--no-progress")
    text = (report / "report.md").read_text()
    tables = text[text.index("| model | density | replicas") : text.index("Figures:")].strip()
    if args.write:
        name = args.out.name
        figure = HERE / "figures" / f"compare-reduced-{name}.png"
        shutil.copyfile(report / "learned_vs_original.png", figure)
        command = "python benchmarks/compare_reduced.py " + " ".join(f"--model {model}" for model in args.model)
        write_section(f"compare-reduced-{name}", "\n".join([
            f"## Learned vs original dynamics at reduced size ({name})",
            "",
            f"Command: `{command} --out {args.out} --write` (2 CPU cores), which runs",
            f"`hpcdyn {' '.join(ensemble)}` and `hpcdyn analyze`. Replica means +- one standard error.",
            "",
            tables,
            "",
            f"![learned vs original]({figure.relative_to(HERE)})",
        ]))  # fmt: skip
    print(tables)


if __name__ == "__main__":
    main()
