"""When the Mode 2 start's classifier fit should stop: its held-out U at every check, per training run.

    python benchmarks/classifier_patience.py CASE=STORE:STENCIL:N_THETA:SEED [...] [--jobs 2]

Each case runs `hpcdyn train STORE --mode 2 --n-classes N_THETA --attention-stencil STENCIL --seed SEED`
with the quick preset's model (one layer, d_model 16, no rotary; d_model 32 and 4 heads for a count
stencil, as the quorum record) for one epoch, the fit's checks recorded with the patience it ran with
(``local_training.CLASSIFIER_PATIENCE``) raised to 6 so that both rules can be read from one trace:
where each would have stopped and the best held-out U it would have kept. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHECK_EVERY = 25
TRACE = r'''
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
import hpcdyn.learning.local_training as training
checks = []
score = training.StatisticsObjective.both_parts
def scored(self, model):
    parts = score(self, model)
    checks.append(float(parts[1]))
    return parts
training.StatisticsObjective.both_parts = scored
fit = training.fit_classifier
def fitted(*args, **kwargs):
    result = fit(*args, **{**kwargs, "patience": 6})
    checks.append(None)
    return result
training.fit_classifier = fitted
from hpcdyn.cli.main import main
try:
    main(["train", *sys.argv[2:]])
except SystemExit:
    pass
Path(sys.argv[1]).write_text(json.dumps(checks[:checks.index(None)]))
'''


def stop(checks: list[float], patience: int) -> tuple[float, int, int]:
    """(best held-out U, its step, the step the fit ends at) under ``patience`` checks without a better one."""
    best, since, best_at = -float("inf"), 0, 0
    for index, value in enumerate(checks):
        if value > best:
            best, since, best_at = value, 0, index
        else:
            since += 1
            if since >= patience:
                return best, (best_at + 1) * CHECK_EVERY, (index + 1) * CHECK_EVERY
    return best, (best_at + 1) * CHECK_EVERY, len(checks) * CHECK_EVERY


def trace(case: str, directory: Path, extra: tuple[str, ...] = ()) -> tuple[str, list[float]]:
    """The held-out U at every check of one case's fit (``extra``: more `hpcdyn train` options); the run
    is left in ``directory``/NAME."""
    name, _, spec = case.partition("=")
    store, stencil, n_classes, seed = spec.rsplit(":", 3)
    model = ["--d-model", "32", "--n-heads", "4", "--d-ff", "64"] if "count" in stencil else ["--d-model", "16", "--n-heads", "2", "--d-ff", "32"]
    arguments = [store, "--mode", "2", "--n-classes", n_classes, "--attention-stencil", stencil, "--seed", seed, "--no-rotary",
                 "--n-layers", "1", *model, "--statistics-steps", "50", "--lr", "3e-3", "--epochs", "1", "--patience", "1",
                 "--no-progress", *extra, "--out", str(directory / name)]  # fmt: skip
    output = directory / f"{name}.json"
    subprocess.run([sys.executable, "-c", TRACE, str(output), *arguments], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    return name, json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="NAME=STORE:STENCIL:N_THETA:SEED")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(args.jobs) as pool:
        traces = list(pool.map(lambda case: trace(case, Path(scratch)), args.cases))
    print("| case | best at step | steps run, patience 6 | patience 3 | held-out U lost with 3 |")
    print("|---|---:|---:|---:|---:|")
    for name, checks in traces:
        (best, best_at, six), (kept, _, three) = stop(checks, 6), stop(checks, 3)
        print(f"| {name} | {best_at} | {six} | {three} | {best - kept:.3g} |")


if __name__ == "__main__":
    main()
