"""Analysis of ensemble stores: observables with xarray/dask, phase diagrams, reports.

Modules: ``lattice`` (per-snapshot observables in numpy), ``observables`` (lazy over a store),
``phase_diagram`` (figures and difference tables), ``sweep_plots`` (N_theta plateau),
``report`` (the report directory that ``hpcdyn analyze`` writes), ``chunk_tasks`` (the per-chunk
observables as tasks on a cluster's workers, the reduction here: ``hpcdyn analyze --address``),
``kl_rate`` (path-space fidelity: the KL divergence rate between two dynamics, both directions).
"""
