"""Simulation: exact continuous-time Monte Carlo of any rate model.

``compiled`` is the numba n-fold way of the original dynamics, ``reference`` a plain numpy simulator for
the tests, ``batched`` runs any rate model (a trained transformer) in lock-step replicas, ``drivers``
streams a simulation into a trajectory store, and ``work_size`` refuses a simulation too large for the
machine before it starts. It hands event logs and snapshots to storage.
"""
