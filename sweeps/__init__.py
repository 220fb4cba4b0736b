"""Ray Tune studies, one module per study, each with a full size and a ``smoke`` size.

    from sweeps import get_study
    study = get_study("ntheta", smoke=True)     # an hpcdyn.distributed.sweep.Study: base parameters and grids
    study = get_study("range", system="quorum")  # the same study on another particle system's trajectory

Run them with ``hpcdyn sweep STUDY [--smoke]``. A study is plain data (dotted keys ``data.*``,
``model.*``, ``training.*``); ``hpcdyn.distributed.sweep.valid_keys()`` lists every key.
"""

from __future__ import annotations

from hpcdyn.distributed.sweep import Study
from hpcdyn.physics.systems import PARTICLE_SYSTEMS, ConfigurationError
from sweeps import activity, hparams, ntheta
from sweeps import range as range_study

STUDIES = {module.NAME: module for module in (ntheta, hparams, activity, range_study)}


def get_study(name: str, smoke: bool = False, system: str | None = None) -> Study:
    """The study called ``name`` (its smoke size with ``smoke``); an unknown name lists the known ones.

    ``system`` trains on that particle system's trajectory instead (``data.system``; the study's
    other data parameters kept); a study whose grid depends on the system adapts it (``for_system``).
    """
    if name not in STUDIES:
        raise ConfigurationError(f"study: no study named {name!r}; the studies are {', '.join(sorted(STUDIES))}")
    module = STUDIES[name]
    study = module.SMOKE if smoke else module.FULL
    if system is None:
        return study
    accepted = getattr(module, "SYSTEMS", PARTICLE_SYSTEMS)
    if system not in accepted:
        raise ConfigurationError(f"system: the {name} study runs on the systems {accepted}, got {system!r}")
    adapt = getattr(module, "for_system", None)
    return adapt(study, system) if adapt is not None else study.with_overrides({"data.system": system})


def study_summary(name: str, dataset, directory) -> dict:
    """What a finished study adds to the sweep's summary (e.g. the range study's r*): its own
    ``summarise_results(dataset, directory)``, or nothing. Key ``lines``: what to print."""
    summarise = getattr(STUDIES[name], "summarise_results", None) if name in STUDIES else None
    return summarise(dataset, directory) if summarise is not None else {}
