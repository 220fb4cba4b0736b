"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts: the model's weights and
configuration, the optimizer state, the training configuration, the metrics so far, and the
identity of the trajectory it was trained on. Nothing in it needs pickle to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdyn.physics.systems import ConfigurationError

FORMAT = "hpcdyn.checkpoint/1"
REQUIRED = ("format", "model_config", "model_state", "training_config", "metrics", "store")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigurationError(f"checkpoint: {path} does not exist (a run directory holds best.pt and last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise ConfigurationError(f"checkpoint: {path} is corrupt or not an hpcdyn checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigurationError(f"checkpoint: {path} has format {found!r}, this version reads {FORMAT!r}")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise ConfigurationError(f"checkpoint: {path} lacks {missing}; it is incomplete")
    check_finite_weights(state["model_state"], path)
    return state


def check_finite_weights(weights: Any, path: str | Path) -> None:
    """Refuse weights that are not all finite numbers: a model with NaN or infinite weights gives
    NaN rates, so every U it scores and every trajectory it simulates would be meaningless."""
    if not isinstance(weights, dict):
        raise ConfigurationError(f"checkpoint: {path}: model_state is not a dict of tensors; it is damaged")
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConfigurationError(f"checkpoint: {path}: weight {name} is not a tensor; the checkpoint is damaged")
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ConfigurationError(
                    f"checkpoint: {path}: weight {name} has {bad} non-finite value(s) (NaN or infinity); the training "
                    "diverged: use an earlier checkpoint or train again with a lower --lr"
                )


def store_identity(source) -> dict[str, Any]:
    """Enough to recognise a trajectory again: where it was, what it is, and a fingerprint."""
    system = source.system
    identity = {
        "path": str(getattr(source, "path", "<memory>")),
        "system": system.name,
        "params": system.params(),
        "n_events": int(source.n_events),
        "t_final": float(source.t_final),
        "seed": getattr(source, "seed", None),
    }
    attrs = getattr(source, "attrs", None)
    if attrs is not None:  # a store: its attrs pin it down (created, total_dwell, ...)
        material = json.dumps({key: attrs.get(key) for key in sorted(attrs)}, sort_keys=True, default=str)
    else:  # an in-memory log: hash its arrays
        digest = hashlib.sha256()
        for block in source.iter_event_blocks():
            for column in block:
                digest.update(np.ascontiguousarray(column).tobytes())
        material = digest.hexdigest() + json.dumps(identity, sort_keys=True)
    identity["fingerprint"] = hashlib.sha256(material.encode()).hexdigest()[:16]
    return identity
