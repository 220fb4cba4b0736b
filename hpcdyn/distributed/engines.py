"""Which engine simulates a trained model in an ensemble, and the table engine's unit of work.

Two engines run a learned model (DESIGN 1.5, 1.6):

- ``network``: the lock-step batched simulator, one network call per event of every replica. Exact
  for any model, at the training lattice size only; hundreds to thousands of events per second.
- ``table``: the n-fold way over an environment table (``hpcdyn.simulation.table_engine``), each
  distinct environment evaluated once; millions of events per second, at any lattice size. Exact
  only when the model's rates depend on the key alone: by construction for a hard-local model
  (``--attention-stencil``), else as measured by its locality certificate (``hpcdyn locality``).

``choose_engine`` decides per model: ``auto`` takes the table when either holds (for a hard-local
model, the smaller of its receptive family and a family its certificate passes), and the network
otherwise; ``table`` on a model whose certificate fails (or is missing) is run as asked, with a
warning and the certificate's figures recorded in the store. The table is kept beside the checkpoint
(``table-<family>.zarr``); each unit appends the keys it met first, so later units and later runs
start from a fuller table, and concurrent actors never write the same part.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hpcdyn.physics.systems import ConfigurationError

ENGINES = ("auto", "network", "table")
FALLBACK_FAMILY = "vn1"  # a table asked for without any certified family: the nearest neighbours


def choose_engine(requested: str, model_config: Any, checkpoint: Path, sha256: str, family: str | None = None) -> dict[str, Any]:
    """The engine of one checkpoint, its key family and why, as recorded in the ensemble's attrs.

    ``family``: the table's key family, asked for (only with ``requested`` table); else the one the
    certificate passes, or comes closest to."""
    if requested not in ENGINES:
        raise ConfigurationError(f"engine: must be one of {ENGINES}, got {requested!r}")
    if family is not None:
        return _asked_family(requested, family, model_config, checkpoint, sha256)
    if requested == "network":
        return {"engine": "network", "reason": "asked for (--engine network)"}
    certificate = _certificate(checkpoint, sha256)
    if model_config.key_family is not None:  # hard-local: its table is exact by construction
        return _hard_local(model_config.key_family, certificate)
    if certificate is not None and certificate.passes:
        return {"engine": "table", "key_family": certificate.family,
                "reason": f"locality certificate passes at {certificate.family}"}  # fmt: skip
    why = "no locality certificate (run `hpcdyn locality RUN`)" if certificate is None else "its locality certificate fails"
    if requested == "auto":
        return {"engine": "network", "reason": why}
    family = _closest_family(certificate)
    warnings.warn(f"engine: {checkpoint} runs on a {family} table although {why}; its rates may differ from the network's",
                  stacklevel=2)  # fmt: skip
    recorded = {"engine": "table", "key_family": family, "reason": f"asked for (--engine table) although {why}"}
    if certificate is not None:
        recorded["certificate"] = _figures(certificate)
    return recorded


def _asked_family(requested: str, family: str, model_config: Any, checkpoint: Path, sha256: str) -> dict[str, Any]:
    """A table in the family asked for; its certificate's figures recorded (a warning where it fails there)."""
    from hpcdyn.physics.environments import key_family

    if requested != "table":
        raise ConfigurationError(f"table_family: a key family is for the table engine; add --engine table (got --engine {requested})")
    key_family(family)  # a known family, or an error listing them
    if model_config.key_family == family:
        return _hard_local(family, None)
    certificate = _certificate(checkpoint, sha256)
    rows = {row.family: row for row in certificate.families} if certificate is not None else {}
    recorded = {"engine": "table", "key_family": family}
    if family in rows and rows[family].passes:
        recorded["reason"] = f"asked for (--table-family {family}); its locality certificate passes there"
    else:
        why = "no locality certificate" if certificate is None else (
            f"its locality certificate has no figure for {family}" if family not in rows else f"its locality certificate fails at {family}")
        warnings.warn(f"engine: {checkpoint} runs on a {family} table although {why}; its rates may differ from the network's",
                      stacklevel=3)  # fmt: skip
        recorded["reason"] = f"asked for (--table-family {family}) although {why}"
    if certificate is not None:
        recorded["certificate"] = _figures(certificate)
    return recorded


def _hard_local(receptive: str, certificate) -> dict[str, Any]:
    """A hard-local model's table: its receptive family (exact), or a smaller family its certificate
    passes. A large full-state family meets new keys at almost every event (diamond2: 0.6 first
    sightings per event measured at L 12), which costs more than the network it replaces."""
    chosen = {"engine": "table", "key_family": receptive,
              "reason": f"hard-local model: rates depend exactly on its {receptive} key"}  # fmt: skip
    if certificate is None or not certificate.passes or certificate.family == receptive:
        return chosen
    spaces = {family.family: family.key_space for family in certificate.families}
    if spaces.get(certificate.family, float("inf")) < spaces.get(receptive, float("inf")):
        chosen["key_family"] = certificate.family
        chosen["reason"] = (f"hard-local model whose locality certificate passes at {certificate.family}, "
                            f"a smaller key family than its receptive field's {receptive}")  # fmt: skip
    return chosen


def _certificate(checkpoint: Path, sha256: str):
    """The certificate beside the checkpoint when it is this checkpoint's, else None."""
    from hpcdyn.learning.locality import read_certificate

    try:
        certificate = read_certificate(checkpoint)
    except (ConfigurationError, OSError, ValueError, KeyError):
        return None
    return certificate if certificate.checkpoint_sha256 == sha256 else None


def _closest_family(certificate) -> str:
    """The family whose table differs least from the network (worst sample), for a forced table."""
    if certificate is None or not certificate.families:
        return FALLBACK_FAMILY
    return min(certificate.families, key=lambda family: max(_worst(sample) for sample in family.samples)).family


def _worst(sample) -> float:
    """A sample's figure under the certificate's criterion: Mode 2's class disagreement, else the p99."""
    value = sample.class_disagreement if sample.class_disagreement is not None else sample.percentiles.get("p99")
    return float(value) if value is not None and np.isfinite(value) else float("inf")


def _figures(certificate) -> dict[str, Any]:
    return {
        "criterion": certificate.criterion,
        "tolerance": certificate.tolerance,
        "families": {family.family: [_worst(sample) for sample in family.samples] for family in certificate.families},
    }


# ----------------------------------------------------------------------------- the table unit
class TableUnits:
    """Table-engine runs of one trained model: its environment table loaded once and kept."""

    def __init__(self, model, described: dict[str, Any], keep_overlaps: bool):
        self.model, self.described, self.keep_overlaps = model, described, keep_overlaps
        self.table = None
        self.path = Path(described["path"]).parent / f"table-{described['key_family']}.zarr"

    def _open(self, system):
        from hpcdyn.physics.environments import make_encoder
        from hpcdyn.simulation.environment_table import EnvironmentTable, PatchEvaluator, model_lattice

        evaluator = PatchEvaluator(self.model, model_lattice(self.model, system))
        if self.table is None:
            encoder = make_encoder(self.described["key_family"], system)
            header = evaluator.header_for(encoder, "sha256:" + self.described["sha256"])
            self.table = EnvironmentTable.open(self.path, encoder, header)
        return evaluator

    def simulate(self, system, starts, streams, t_final: float, times: np.ndarray) -> dict[str, np.ndarray]:
        """The unit's arrays (as the network engine returns them), replica by replica."""
        from hpcdyn.simulation.table_engine import EngineOptions, TableEngine

        evaluator = self._open(system)
        options = EngineOptions(keep_overlaps=self.keep_overlaps)
        columns: dict[str, list] = {name: [] for name in ("occupancy", "overlap", "statistics")}
        for (positions, states), stream in zip(starts, streams):
            engine = TableEngine(self.table, evaluator, system, positions, states, stream.dynamics, t_final, times, options)
            run = engine.run()
            if len(run.snapshot_grids) != len(times):
                raise RuntimeError(f"snapshots: the table engine recorded {len(run.snapshot_grids)}, the store expects {len(times)}")
            columns["occupancy"].append(run.snapshot_grids)
            columns["overlap"].append(run.snapshot_overlaps)
            columns["statistics"].append(run.statistics)
        self.table.save(self.path, writer=f"{socket.gethostname()}-{os.getpid()}")
        return _unit_arrays(columns)


def _unit_arrays(columns: dict[str, list]) -> dict[str, np.ndarray]:
    statistics = columns["statistics"]
    audits = [s.audit_largest_difference for s in statistics if np.isfinite(s.audit_largest_difference)]
    return {
        "occupancy": np.stack(columns["occupancy"]).astype(np.int8),
        "overlap": np.stack(columns["overlap"]).astype(np.int32),
        "events": np.array([s.events for s in statistics], np.int64),
        "draws": np.array([s.draws for s in statistics], np.int64),
        "rejected": np.array([s.rejected for s in statistics], np.int64),
        "overlap_events": np.array([s.overlap_events for s in statistics], np.int64),
        "rejected_mass": np.array([s.rejected_mass for s in statistics]),
        "move_count": np.stack([s.move_counts for s in statistics]),
        # Not arrays of the store: the unit's summary in the manifest carries them.
        "table": {
            "first_sightings": int(sum(s.first_sightings for s in statistics)),
            "fill_seconds": float(sum(s.fill_seconds for s in statistics)),
            "audited": int(sum(s.audited for s in statistics)),
            "audit_largest_difference": max(audits) if audits else None,
        },
    }
