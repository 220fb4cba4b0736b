"""Seconds of one quick-preset Mode 2 trial on sufficient statistics, on one core, and what it learned.

    python benchmarks/trial_time.py --study ntheta   # vn1, N_theta 4, the paper's trajectory (L 30, T 500)
    python benchmarks/trial_time.py --study range    # block3, N_theta 4, the range study's (L 12, T 40)

The trial is the pipeline's (``hpcdyn.distributed.pipeline.QUICK``: the ntheta study's smoke base with
the preset's overrides, or the range study's), its trajectory simulated into --data once. Compare two
versions back to back (these machines are noisy): ``git worktree add ../before HEAD~1``, then
``PYTHONPATH=../before python benchmarks/trial_time.py ...`` beside the same command here.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hpcdyn.distributed.pipeline import QUICK, range_study
from hpcdyn.distributed.sweep import prepare_trajectory, trial_setup
from hpcdyn.learning.statistics import cached_statistics
from hpcdyn.learning.training import train, true_validation
from hpcdyn.storage.trajectory_store import open_trajectory
from sweeps import get_study


def point(study: str, n_classes: int, seed: int) -> dict:
    if study == "range":
        base = range_study(QUICK, n_classes).base
        stencil = "block3"
    else:
        base = {**get_study("ntheta", smoke=QUICK.smoke_sweep).base, **dict(QUICK.sweep_overrides)}
        stencil = "vn1"
    return {**base, "model.mode": 2, "model.n_classes": n_classes, "model.attention_stencil": stencil, "training.seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("ntheta", "range"), default="ntheta")
    parser.add_argument("--n-classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("runs/bench-trial-data"), help="where the trajectory is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = trial_setup(point(args.study, args.n_classes, args.seed))
    store = prepare_trajectory(setup.system, setup.t_final, setup.data_seed, args.data)
    trajectory = open_trajectory(store)
    training = setup.training
    # what the pipeline prepares before its trials: the statistics and the held-out U under the true rates
    cached_statistics(trajectory, training.model.key_family, training.validation_fraction, training.max_train_events)
    true_validation(trajectory, training)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo: once per process
    out = Path(tempfile.mkdtemp()) / "run"
    begin = time.perf_counter()
    metrics = train(training, trajectory, out, progress=False).metrics[-1]
    seconds = time.perf_counter() - begin
    shutil.rmtree(out.parent, ignore_errors=True)
    rates = ", ".join(f"{rate:.5g}" for rate in metrics["class_rates"])
    print(f"{args.study} ({training.model.attention_stencil}, N_theta {args.n_classes}, seed {args.seed}): "
          f"{seconds:.1f} s; classifier's best step {metrics.get('class_init_steps')} of {metrics.get('class_init_steps_run')}; "
          f"held-out U/T {metrics['val_U_per_T']:.6f}; gap {metrics['gap_per_event']:.3g} nats/event; class rates {rates}")


if __name__ == "__main__":
    main()
