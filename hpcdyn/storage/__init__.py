"""Storage: event logs in memory and the Zarr stores of trajectories and ensembles.

``events`` is an event log (and the interface every event source shares), ``trajectory_store`` one
trajectory on disk (DESIGN §3.1), ``ensemble_store`` many forward simulations in one xarray-native store
(§3.2). ``integrity`` finds missing, extra and undecodable chunks, ``output_lock`` keeps one writer
per output and cleans a killed run's leftovers, ``signals`` keeps Ctrl-C from cutting a write in
half, ``strict_json`` writes JSON without NaN or Infinity. It hands simulations, training and
analysis their data; it knows only the physics below it.
"""
