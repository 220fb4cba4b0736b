"""Hyper-parameter grid for Mode 2 at N_theta = 4: learning rate x d_model x n_layers x n_heads x segment length."""

from hpcdyn.distributed.sweep import Study
from sweeps.common import ACTIVE_DATA, SMOKE_DATA, SMOKE_TRAINING, TINY_MODEL, VALIDATED_TRAINING

NAME = "hparams"

FULL = Study(  # 3 x 2 x 2 x 2 x 3 = 72 trials
    NAME,
    base={**ACTIVE_DATA, **VALIDATED_TRAINING, "model.mode": 2, "model.n_classes": 4, "training.seed": 0},
    grids=(
        {
            "training.lr": [1e-3, 3e-3, 1e-2],
            "model.d_model": [32, 64],
            "model.n_layers": [1, 2],
            "model.n_heads": [2, 4],
            "training.segment_events": [32, 64, 256],
        },
    ),
    description=__doc__,
)

SMOKE = Study(  # 2 x 1 x 1 x 2 x 2 = 8 tiny trials
    NAME,
    base={**SMOKE_DATA, **TINY_MODEL, **SMOKE_TRAINING, "model.mode": 2, "model.n_classes": 4, "training.seed": 0},
    grids=(
        {
            "training.lr": [3e-3, 1e-2],
            "model.d_model": [16],
            "model.n_layers": [1],
            "model.n_heads": [1, 2],
            "training.segment_events": [32, 128],
        },
    ),
    description=__doc__,
)
