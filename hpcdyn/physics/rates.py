"""Rate models: the one protocol that joins physics, learning, likelihood and simulation.

A rate model maps a batch of configurations to the log-rate of every candidate move:

    log_rates = model(positions, states)
    positions: long [batch, n_tokens, 2]  (x, y)
    states:    long [batch, n_tokens]
    log_rates: float [batch, n_tokens, n_moves], -inf for a move of rate zero

The original physics of each system is implemented here, vectorised in torch; the transformer of
the learning layer implements the same call, so nothing downstream asks which one it holds.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from hpcdyn.physics.systems import HOP_DISPLACEMENTS, ActiveSystem, FASystem, QuorumSystem, System, neighbour_directions


@runtime_checkable
class RateModel(Protocol):
    n_moves: int

    def __call__(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor: ...


def _flat_sites(positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Row-major site index y*Lx + x of each position, [batch, n_tokens]."""
    return positions[..., 1] * shape[1] + positions[..., 0]


def _neighbour_sites(positions: torch.Tensor, shape: tuple[int, int], dim: int = 2) -> torch.Tensor:
    """Flat site index of each nearest neighbour, [batch, n_tokens, 2 * dim] (hop-direction order)."""
    steps = torch.as_tensor(HOP_DISPLACEMENTS[neighbour_directions(dim)], device=positions.device)
    moved = positions.unsqueeze(-2) + steps  # [batch, n_tokens, directions, 2]
    x = moved[..., 0] % shape[1]
    y = moved[..., 1] % shape[0]
    return y * shape[1] + x


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _lattice_field(positions: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Scatter per-token values onto the flattened lattice, [batch, sites] (0 where no token)."""
    field = torch.zeros(values.shape[0], shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return field.scatter_(1, _flat_sites(positions, shape), values)


class _PhysicsRates(torch.nn.Module):
    """The generating rates of a system: no parameters, float64 by default."""

    def __init__(self, system: System, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.system = system
        self.n_moves = system.n_moves
        self.dtype = dtype


class ActiveRates(_PhysicsRates):
    """True rates of the active lattice model (DESIGN 1.1) as a rate model."""

    # Move types, used to check learned classes and move statistics against the physics.
    ROTATION, FORWARD_HOP, OTHER_HOP, BLOCKED_HOP = 0, 1, 2, 3
    TYPE_NAMES = ("rotation", "forward_hop", "other_hop", "blocked_hop")
    type_names = TYPE_NAMES

    def move_types(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Type of every candidate move, long [batch, n_tokens, 6]."""
        batch, n_tokens = states.shape
        shape = self.system.shape
        occupied = _lattice_field(positions, torch.ones_like(states, dtype=torch.bool), shape)
        targets = _neighbour_sites(positions, shape).reshape(batch, -1)
        blocked = occupied.gather(1, targets).reshape(batch, n_tokens, 4)
        directions = torch.arange(4, device=states.device)
        forward = directions == states.unsqueeze(-1)
        hop_types = torch.where(forward, self.FORWARD_HOP, self.OTHER_HOP)
        hop_types = torch.where(blocked, self.BLOCKED_HOP, hop_types)
        rotations = torch.full((batch, n_tokens, 2), self.ROTATION, device=states.device, dtype=hop_types.dtype)
        return torch.cat([rotations, hop_types], dim=-1)

    def type_log_rates(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Log-rate of each move type, in TYPE_NAMES order."""
        system = self.system
        values = [_log(system.D), _log(system.v_plus), _log(system.v_other), -math.inf]
        return torch.tensor(values, dtype=self.dtype, device=device)

    def forward(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        types = self.move_types(positions, states)
        return self.type_log_rates(states.device)[types]


def block_counts(positions: torch.Tensor, shape: tuple[int, int], radius: int) -> torch.Tensor:
    """Number of OTHER particles in the (2 radius + 1)^2 block centred on each token, long [batch, n_tokens]."""
    batch, n_tokens = positions.shape[:2]
    ones = torch.ones(batch, n_tokens, dtype=torch.long, device=positions.device)
    particles = torch.zeros(batch, shape[0] * shape[1], dtype=torch.long, device=positions.device)
    particles.scatter_add_(1, _flat_sites(positions, shape), ones)  # particles per site
    span = torch.arange(-radius, radius + 1, device=positions.device)
    offsets = torch.cartesian_prod(span, span)  # [(2R+1)^2, 2] (dx, dy), the centre included
    x = (positions[..., 0, None] + offsets[:, 0]) % shape[1]  # [batch, n_tokens, (2R+1)^2]
    y = (positions[..., 1, None] + offsets[:, 1]) % shape[0]
    inside = particles.gather(1, (y * shape[1] + x).reshape(batch, -1)).reshape(x.shape)
    return inside.sum(-1) - 1  # the token itself sits at the centre


class QuorumRates(ActiveRates):
    """True rates of the quorum-sensing active model (DESIGN 1.7) as a rate model.

    As ``ActiveRates``, plus one move type: the forward hop of a crowded particle (at least q other
    particles in its block), at rate v_crowded.
    """

    CROWDED_HOP = 4
    TYPE_NAMES = ActiveRates.TYPE_NAMES + ("crowded_forward_hop",)
    type_names = TYPE_NAMES

    def move_types(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        types = super().move_types(positions, states)
        crowded = block_counts(positions, self.system.shape, self.system.R) >= self.system.q  # [batch, n_tokens]
        forward = (types == self.FORWARD_HOP) & crowded.unsqueeze(-1)
        return torch.where(forward, self.CROWDED_HOP, types)

    def type_log_rates(self, device: torch.device | str = "cpu") -> torch.Tensor:
        crowded = torch.tensor([_log(self.system.v_crowded)], dtype=self.dtype, device=device)
        return torch.cat([super().type_log_rates(device), crowded])


class FARates(_PhysicsRates):
    """True rates of the Fredrickson-Andersen model (DESIGN 1.2) as a rate model."""

    def up_neighbours(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Number of up nearest neighbours m of every token, long [batch, n_tokens]."""
        batch, n_tokens = states.shape
        shape = self.system.shape
        spins = _lattice_field(positions, states.long(), shape)
        neighbours = _neighbour_sites(positions, shape, self.system.dim)
        directions = neighbours.shape[-1]
        up = spins.gather(1, neighbours.reshape(batch, -1)).reshape(batch, n_tokens, directions)
        return up.sum(-1)

    @property
    def type_names(self) -> tuple[str, ...]:
        """Move types: (spin before the flip, number of up neighbours m)."""
        degree = 2 * self.system.dim
        return tuple(f"{'up' if spin else 'down'} m={m}" for spin in (0, 1) for m in range(degree + 1))

    def move_types(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Type index spin * (2 dim + 1) + m of every flip, long [batch, n_tokens, 1]."""
        m = self.up_neighbours(positions, states)
        return (states.long() * (2 * self.system.dim + 1) + m).unsqueeze(-1)

    def forward(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        m = self.up_neighbours(positions, states).to(self.dtype)
        c = self.system.c
        rate = torch.where(states == 0, m * c, m * (1.0 - c))
        return torch.log(rate).unsqueeze(-1)


def true_rate_model(system: System, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The generating rates of a system, as a rate model."""
    if isinstance(system, QuorumSystem):  # before ActiveSystem, of which it is a kind
        return QuorumRates(system, dtype)
    if isinstance(system, ActiveSystem):
        return ActiveRates(system, dtype)
    if isinstance(system, FASystem):
        return FARates(system, dtype)
    raise TypeError(f"no rate model for {type(system).__name__}")


def distinct_rates(system: System) -> dict[str, float]:
    """The distinct non-zero rates of a system's generating dynamics by name, for comparison with learned classes."""
    params = system.params()
    if isinstance(system, QuorumSystem):
        return {name: float(params[name]) for name in ("D", "v_crowded", "v_other", "v_plus")}
    if isinstance(system, ActiveSystem):
        return {name: float(params[name]) for name in ("D", "v_other", "v_plus")}
    c, neighbours = float(params["c"]), 2 * int(params["dim"])
    rates = {f"{m}c": m * c for m in range(1, neighbours + 1)}
    rates.update({f"{m}(1-c)": m * (1 - c) for m in range(1, neighbours + 1)})
    return rates
