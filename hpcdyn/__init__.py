"""hpcdyn: learn the stochastic dynamics of lattice many-body systems from one trajectory.

One subpackage per stage, imports flowing one way (DESIGN 2; checked by import-linter):
cli -> distributed (ray) -> learning (torch) | simulation (numba, torch) -> storage (zarr) -> physics.
Everything below ``distributed`` runs where ray is absent, and physics, simulation and learning
run without zarr.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("hpcdyn")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
