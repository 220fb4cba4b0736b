"""Learning: rates learned from one trajectory by maximising its exact path log-likelihood.

``likelihood`` computes U segment by segment, ``transformer`` is the rate model (Mode 1 and Mode 2),
``training`` the loop with ``optim`` and atomic ``checkpoint``s, ``class_rates`` the closed-form Mode 2
rates and ``evaluation`` scores a trained model on any store. It hands checkpoints to simulation and sweeps.
"""
