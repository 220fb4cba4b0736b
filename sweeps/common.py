"""Parameters the studies share: the training trajectory and the model sizes that were validated.

The active model on a 12 x 12 torus at density 0.124 (N = 18) with the paper's rates: T = 300
gives about 100 k events, on which Mode 2 with d_model 64 rises from U/T 43 (N_theta 1) to 543
(N_theta 4) and then flattens (benchmarks/TRAINING.md).
"""

ACTIVE_DATA = {
    "data.system": "active",
    "data.preset": "paper",
    "data.L": 12,
    "data.density": 0.124,
    "data.t_final": 300.0,
    "data.seed": 1,
}

VALIDATED_TRAINING = {"training.lr": 3e-3, "training.segment_events": 64, "training.epochs": 6, "training.patience": 6}

TINY_MODEL = {"model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.d_ff": 32}

SMOKE_DATA = {**ACTIVE_DATA, "data.t_final": 40.0}  # about 13 k events
SMOKE_TRAINING = {"training.lr": 1e-2, "training.segment_events": 64, "training.epochs": 3, "training.patience": 3}
