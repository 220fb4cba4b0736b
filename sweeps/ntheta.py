"""N_theta scan: Mode 2 with N_theta = 1..8 classes x 3 seeds, and Mode 1 as the reference.

U/T rises with N_theta up to the number of distinct processes of the dynamics and then flattens:
N* = 4 for the active model (rotations D, forward hops v_plus, other hops v_other, blocked hops 0),
5 for quorum (``hpcdyn sweep ntheta --system quorum``: crowded forward hops v_crowded besides).
Every trial learns from the same trajectory, so the seed spread is the spread of training. Mode 2
trains with the defaults of ``hpcdyn train --mode 2`` (no recipe option): it starts from the pooled
maximum-likelihood partition of local environments (hpcdyn.learning.segment_start), which puts every
kind of move in a class of its own (benchmarks/TRAINING.md, mode2-defaults-record).
"""

from hpcdyn.distributed.sweep import Study
from sweeps.common import ACTIVE_DATA, SMOKE_DATA, SMOKE_TRAINING, TINY_MODEL, VALIDATED_TRAINING

NAME = "ntheta"

FULL = Study(
    NAME,
    base={**ACTIVE_DATA, **VALIDATED_TRAINING},
    grids=(
        {"model.mode": [2], "model.n_classes": list(range(1, 9)), "training.seed": [0, 1, 2]},
        {"model.mode": [1], "training.seed": [0, 1, 2]},
    ),
    description=__doc__,
)

SMOKE = Study(  # 16 tiny trials: N_theta 1..7 x 2 seeds, Mode 1 x 2 seeds
    NAME,
    base={**SMOKE_DATA, **TINY_MODEL, **SMOKE_TRAINING},
    grids=(
        {"model.mode": [2], "model.n_classes": list(range(1, 8)), "training.seed": [0, 1]},
        {"model.mode": [1], "training.seed": [0, 1]},
    ),
    description=__doc__,
)
