"""Distributed: the stages above run at scale on Ray, Ray Tune and SLURM.

``cluster`` connects to (or starts) Ray, ``sweep`` runs studies on Ray Tune and ``sweep_results`` turns
them into an xarray Dataset, ``ensemble`` runs forward simulations on Ray actors into one store (``engines``: on the network or on
an environment table), ``analysis_tasks`` runs the analysis's per-chunk work as Ray tasks,
``pipeline`` chains the whole study, and ``slurm`` renders sbatch scripts. Only this stage imports ray.
"""
