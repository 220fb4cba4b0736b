"""hpcdyn: learn the stochastic dynamics of lattice many-body systems from one trajectory.

Layers (DESIGN 2): systems and rates (numpy/torch) -> compiled simulator (numba) -> trajectory
store (zarr) -> likelihood -> learning -> distributed sweeps and ensembles (ray) -> analysis.
The core imports only numpy and torch, so it runs where ray or zarr are absent.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("hpcdyn")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
