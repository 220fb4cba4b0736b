"""Activity scan: one training trajectory per activity v_plus / D at density 0.124, each learned.

The input of a learned phase diagram: each trained model is later forward-simulated at higher
densities and compared with the original model there. Mode 1 (free rates), 2 seeds per activity.
"""

from hpcdyn.distributed.sweep import Study
from sweeps.common import ACTIVE_DATA, SMOKE_DATA, SMOKE_TRAINING, TINY_MODEL, VALIDATED_TRAINING

NAME = "activity"

FULL = Study(  # D = 0.1, so v_plus / D = 25 ... 500
    NAME,
    base={**ACTIVE_DATA, **VALIDATED_TRAINING, "model.mode": 1},
    grids=({"data.v_plus": [2.5, 5.0, 10.0, 25.0, 50.0], "training.seed": [0, 1]},),
    description=__doc__,
)

SMOKE = Study(
    NAME,
    base={**SMOKE_DATA, **TINY_MODEL, **SMOKE_TRAINING, "model.mode": 1, "training.seed": 0},
    grids=({"data.v_plus": [5.0, 25.0]},),
    description=__doc__,
)
