"""Ray Tune studies, one module per study, each with a full size and a ``smoke`` size.

    from sweeps import get_study
    study = get_study("ntheta", smoke=True)     # an hpcdyn.distributed.sweep.Study: base parameters and grids

Run them with ``hpcdyn sweep STUDY [--smoke]``. A study is plain data (dotted keys ``data.*``,
``model.*``, ``training.*``); ``hpcdyn.distributed.sweep.valid_keys()`` lists every key.
"""

from __future__ import annotations

from hpcdyn.distributed.sweep import Study
from hpcdyn.physics.systems import ConfigurationError
from sweeps import activity, hparams, ntheta
from sweeps import range as range_study

STUDIES = {module.NAME: module for module in (ntheta, hparams, activity, range_study)}


def get_study(name: str, smoke: bool = False) -> Study:
    """The study called ``name`` (its smoke size with ``smoke``); an unknown name lists the known ones."""
    if name not in STUDIES:
        raise ConfigurationError(f"study: no study named {name!r}; the studies are {', '.join(sorted(STUDIES))}")
    module = STUDIES[name]
    return module.SMOKE if smoke else module.FULL
