"""Lattice systems: what a configuration is and what each candidate move does to it.

A configuration is a set of tokens, each with a lattice position (x, y) and an integer state:
- "active": one token per particle, state = orientation o in {0, 1, 2, 3} (+x, +y, -x, -y);
- "quorum": the active model with quorum sensing (same tokens, states and moves; DESIGN 1.7);
- "fa": one token per lattice site, state = spin in {0, 1}.

Every move of every system is an additive step (dx, dy, dstate) applied to one token, positions
taken modulo the periodic lattice and states modulo ``n_states``. That single fact lets the
likelihood, the trainers and the simulators replay any event log with cumulative sums instead of
per-event Python loops. The rates of moves live elsewhere (``hpcdyn.physics.rates``): a system only says
which moves exist and what they do.

Configurations are frozen dataclasses validated at construction; errors name the field and the
allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import numpy as np

# Hop directions d = 0..3 mean +x, +y, -x, -y (the active model's orientation convention too).
HOP_DISPLACEMENTS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)


def neighbour_directions(dim: int) -> np.ndarray:
    """Hop directions to the nearest neighbours of a site: +-x on a chain, all four on a square."""
    return np.array([0, 2] if dim == 1 else [0, 1, 2, 3], dtype=np.int64)


class ConfigurationError(ValueError):
    """An invalid parameter; the message names the field and what it accepts."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"{field}: {message}")


def _require_rate(value: float, field: str) -> None:
    _require(
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
        field,
        f"must be a finite rate >= 0, got {value!r}",
    )


def _require_int(value: Any, field: str, minimum: int) -> None:
    _require(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum,
        field,
        f"must be an integer >= {minimum}, got {value!r}",
    )


@dataclasses.dataclass(frozen=True)
class ActiveSystem:
    """Lattice active matter (DESIGN 1.1): N oriented particles with volume exclusion.

    Moves per particle: m=0 rotate +1, m=1 rotate -1 (rate D); m=2..5 hop in direction d=m-2
    (rate v_plus if d equals the orientation, else v_other, 0 onto an occupied site).
    """

    L: int = 30
    N: int = 112
    D: float = 0.1
    v_plus: float = 25.0
    v_other: float = 1.0

    name: ClassVar[str] = "active"
    n_moves: ClassVar[int] = 6
    n_states: ClassVar[int] = 4
    move_names: ClassVar[tuple[str, ...]] = ("rotate+", "rotate-", "hop+x", "hop+y", "hop-x", "hop-y")

    def __post_init__(self) -> None:
        _require_int(self.L, "L", 2)
        _require_int(self.N, "N", 1)
        _require(self.N <= self.L * self.L, "N", f"must be <= L*L = {self.L * self.L} sites, got {self.N}")
        _require_rate(self.D, "D")
        _require_rate(self.v_plus, "v_plus")
        _require_rate(self.v_other, "v_other")

    @property
    def shape(self) -> tuple[int, int]:
        """Lattice shape as (Ly, Lx)."""
        return (self.L, self.L)

    @property
    def n_tokens(self) -> int:
        return self.N

    @property
    def density(self) -> float:
        return self.N / (self.L * self.L)

    @property
    def move_table(self) -> np.ndarray:
        """[n_moves, 3] additive steps (dx, dy, dstate)."""
        table = np.zeros((6, 3), dtype=np.int64)
        table[0, 2] = 1
        table[1, 2] = 3  # -1 modulo 4
        table[2:, :2] = HOP_DISPLACEMENTS
        return table

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def initial_configuration(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """N particles on distinct uniformly random sites, with uniformly random orientations."""
        sites = rng.choice(self.L * self.L, size=self.N, replace=False)
        positions = np.stack([sites % self.L, sites // self.L], axis=1).astype(np.int64)
        states = rng.integers(0, 4, size=self.N).astype(np.int8)
        return positions, states


@dataclasses.dataclass(frozen=True)
class QuorumSystem(ActiveSystem):
    """Active matter with quorum sensing (DESIGN 1.7): a nonlocal rule of range R.

    Tokens, states and moves are the active model's (so it is an ``ActiveSystem`` wherever only
    those matter); only the forward hop's rate differs: v_plus while fewer than q other particles
    sit in the (2R+1) x (2R+1) block centred on the particle, v_crowded otherwise.
    """

    R: int = 2
    q: int = 3
    v_crowded: float = 5.0

    name: ClassVar[str] = "quorum"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_int(self.R, "R", 1)
        _require(2 * self.R < self.L, "R", f"must be < L/2 (the block must not wrap onto itself), got R={self.R} with L={self.L}")
        most = (2 * self.R + 1) ** 2 - 1
        _require_int(self.q, "q", 0)
        _require(self.q <= most, "q", f"must be <= (2R+1)^2 - 1 = {most} other sites of the block, got {self.q}")
        _require_rate(self.v_crowded, "v_crowded")

    @property
    def block_side(self) -> int:
        """Side 2R + 1 of the square block whose particles are counted."""
        return 2 * self.R + 1


@dataclasses.dataclass(frozen=True)
class FASystem:
    """Fredrickson-Andersen model (DESIGN 1.2) on a periodic chain (dim 1) or square lattice (dim 2).

    One token per site, one move per token (flip). Flip rate m*c for 0->1 and m*(1-c) for 1->0,
    m = number of up nearest neighbours.
    """

    L: int = 64
    dim: int = 1
    c: float = 0.3

    name: ClassVar[str] = "fa"
    n_moves: ClassVar[int] = 1
    n_states: ClassVar[int] = 2
    move_names: ClassVar[tuple[str, ...]] = ("flip",)

    def __post_init__(self) -> None:
        _require_int(self.L, "L", 2)
        _require(self.dim in (1, 2) and not isinstance(self.dim, bool), "dim", f"must be 1 or 2, got {self.dim!r}")
        _require(
            isinstance(self.c, (int, float)) and math.isfinite(self.c) and 0 <= self.c <= 1,
            "c",
            f"must be in [0, 1] (up-flip rate m*c, down-flip rate m*(1-c)), got {self.c!r}",
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.L, self.L) if self.dim == 2 else (1, self.L)

    @property
    def n_tokens(self) -> int:
        return self.L**self.dim

    @property
    def move_table(self) -> np.ndarray:
        return np.array([[0, 0, 1]], dtype=np.int64)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def initial_configuration(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Every site a token (row-major), spins up with probability c (the equilibrium density)."""
        ly, lx = self.shape
        sites = np.arange(self.n_tokens)
        positions = np.stack([sites % lx, sites // lx], axis=1).astype(np.int64)
        states = (rng.random(self.n_tokens) < self.c).astype(np.int8)
        if self.c > 0 and not states.any():
            # All-down is absorbing: seed one up spin so the chain is not frozen from the start.
            states[rng.integers(self.n_tokens)] = 1
        return positions, states


System = ActiveSystem | QuorumSystem | FASystem
SYSTEMS: dict[str, type] = {"active": ActiveSystem, "quorum": QuorumSystem, "fa": FASystem}
# Systems whose tokens are particles with volume exclusion (the active model's tokens, states and moves).
PARTICLE_SYSTEMS: tuple[str, ...] = tuple(name for name, cls in SYSTEMS.items() if issubclass(cls, ActiveSystem))

_ACTIVE_PAPER = {"L": 30, "density": 0.124, "D": 0.1, "v_plus": 25.0, "v_other": 1.0}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "active": {"paper": dict(_ACTIVE_PAPER)},
    "quorum": {
        "paper": {**_ACTIVE_PAPER, "R": 2, "q": 3, "v_crowded": 5.0},
        # CPU-sized: 18 particles on 12 x 12, about as often crowded as not (3 others expected in a block of 24).
        "small": {**_ACTIVE_PAPER, "L": 12, "R": 2, "q": 3, "v_crowded": 5.0},
    },
    "fa": {"chain": {"L": 64, "dim": 1, "c": 0.3}, "square": {"L": 32, "dim": 2, "c": 0.3}},
}


def make_system(name: str, params: Mapping[str, Any] | None = None, preset: str | None = None) -> System:
    """Build a validated system from a name, an optional preset and parameter overrides.

    For particle systems ("active", "quorum"), ``density`` may stand in for ``N`` (N = round(density * L^2)).
    Unknown fields are refused with the list of known ones.
    """
    if name not in SYSTEMS:
        raise ConfigurationError(f"system: must be one of {sorted(SYSTEMS)}, got {name!r}")
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS[name]:
            raise ConfigurationError(f"preset: system {name!r} has presets {sorted(PRESETS[name])}, got {preset!r}")
        merged.update(PRESETS[name][preset])
    overrides = {key: value for key, value in (params or {}).items() if value is not None}
    if "N" in overrides:
        merged.pop("density", None)
    if "density" in overrides:
        merged.pop("N", None)
    merged.update(overrides)
    cls = SYSTEMS[name]
    known = {field.name for field in dataclasses.fields(cls)}
    particles = issubclass(cls, ActiveSystem)
    if particles and "density" in merged:
        _require("N" not in merged, "density", "give either N or density, not both")
        density = merged.pop("density")
        _require(
            isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1,
            "density",
            f"must be in (0, 1], got {density!r}",
        )
        side = merged.get("L", cls.L)
        _require_int(side, "L", 2)
        merged["N"] = max(1, int(round(density * side * side)))
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigurationError(
            f"{unknown[0]}: unknown parameter for system {name!r}; known parameters are {sorted(known)}"
            + (" (and density)" if particles else "")
        )
    return cls(**merged)
