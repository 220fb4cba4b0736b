"""Strict JSON for everything hpcdyn prints or writes for people and programs: no NaN, no Infinity.

Python's ``json`` writes ``NaN`` and ``-Infinity``, which strict parsers (JavaScript, jq, Go, Rust)
reject. Here a non-finite number becomes ``null`` and the object at the top gains one field,
``non_finite``, mapping the dotted path of each such number to the value it had ("NaN",
"Infinity" or "-Infinity"), so nothing is silently lost:

    {"U": null, "events": 12, "non_finite": {"U": "-Infinity"}}
"""

from __future__ import annotations

import json
import math
from typing import Any

NON_FINITE_FIELD = "non_finite"


def _name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _clean(value: Any, path: str, found: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: _clean(item, f"{path}.{key}" if path else str(key), found) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item, f"{path}[{index}]", found) for index, item in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        found[path or "value"] = _name(value)
        return None
    return value


def strict(value: Any) -> Any:
    """``value`` with every non-finite number replaced by None, and ``non_finite`` added at the top
    (a dict at the top level; otherwise the value is wrapped as {"value": ..., "non_finite": ...})."""
    found: dict[str, str] = {}
    cleaned = _clean(value, "", found)
    if not found:
        return cleaned
    if isinstance(cleaned, dict):
        return {**cleaned, NON_FINITE_FIELD: found}
    return {"value": cleaned, NON_FINITE_FIELD: found}


def dumps(value: Any, **options: Any) -> str:
    """Strict JSON text (``allow_nan=False`` after cleaning; objects json cannot write become strings)."""
    options.setdefault("default", str)
    return json.dumps(strict(value), allow_nan=False, **options)
