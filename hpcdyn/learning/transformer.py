"""The transformer rate model (DESIGN 1.4): one token per particle or site, a rate for every move.

    model = TransformerRates(TransformerConfig(system="active", lattice_size=30, mode=2, n_classes=4))
    log_rates = model(positions, states)     # [batch, n_tokens, n_moves], the rate-model protocol

Token embedding = E_x[x] + E_y[y] + E_s[state] (trainable tables, summed); pre-norm multi-head
self-attention blocks (``scaled_dot_product_attention``); no locality assumed, any number of tokens.

- Mode 1: a shared head maps each token to one log-rate per candidate move.
- Mode 2: a classifier puts each candidate move in one of N_theta classes (hard in the forward pass,
  straight-through gradient, or a Gumbel-softmax relaxation while training; the trainer can switch
  the classifier to the exact gradient of the expected U, ``split_log_rates``); each class has one
  learned rate, so the learned dynamics is read off as N_theta numbers.

The position tables start as periodic Fourier features of the lattice coordinate: the attention can
then express relative offsets on the torus (a rotation of the query) from the first step, which
speeds learning of who-neighbours-whom; the tables stay fully trainable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as functional

from hpcdyn.physics.systems import SYSTEMS, ConfigurationError


ESTIMATORS = ("straight_through", "gumbel")
# The offset scores are stored divided by this factor: Adam's steps in them are then this much
# larger, so a head can sharpen onto one offset among L^2 within a few epochs.
OFFSET_BIAS_SCALE = 10.0
# Mode 2: the initial class log-rates span this range around the log of the data's mean rate.
CLASS_LOG_RATE_SPREAD = (-12.0, 3.0)
MASKED_CLASS_LOG_RATE_SPREAD = (-5.0, 3.0)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the rate model; frozen and validated, stored in every checkpoint."""

    system: str = "active"
    lattice_size: int = 30  # side L of the lattice the position tables cover
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    mode: int = 1
    n_classes: int = 4  # N_theta, Mode 2 only
    estimator: str = "straight_through"  # Mode 2 gradient: straight_through or gumbel
    exclusion_mask: bool = False  # opt-in: forbid hops onto occupied sites (active only)
    rotary: bool = True  # periodic 2-D rotary encoding of q and k (relative offsets on the torus)
    attention_sink: bool = True  # a learned key/value every query can attend to (add_bias_kv)
    relative_bias: bool = True  # a learned score per head for every offset on the torus (all L^2 of them)
    initial_log_rate: float = 0.0  # where all log-rates start
    # Where every offset score starts, below the sink's 0: a head attends to nothing until training
    # raises the offsets that matter. Offsets left at a score near 0 would leak weight that grows with
    # the number of tokens, a dependence on crowding that a model trained at one density cannot undo.
    initial_offset_score: float = -8.0

    def __post_init__(self) -> None:
        def require(condition: bool, field: str, message: str) -> None:
            if not condition:
                raise ConfigurationError(f"{field}: {message}")

        require(self.system in SYSTEMS, "system", f"must be one of {sorted(SYSTEMS)}, got {self.system!r}")
        for field, minimum in (("lattice_size", 2), ("d_model", 1), ("n_heads", 1), ("n_layers", 0), ("d_ff", 1)):
            value = getattr(self, field)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                    field, f"must be an integer >= {minimum}, got {value!r}")  # fmt: skip
        require(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}")
        require(self.mode in (1, 2), "mode", f"must be 1 (free rates) or 2 (classes), got {self.mode!r}")
        require(
            isinstance(self.n_classes, int) and 1 <= self.n_classes <= 64,
            "n_classes",
            f"must be an integer in [1, 64], got {self.n_classes!r}",
        )
        require(self.estimator in ESTIMATORS, "estimator", f"must be one of {ESTIMATORS}, got {self.estimator!r}")
        require(
            not self.exclusion_mask or self.system == "active",
            "exclusion_mask",
            "only the active system has volume exclusion to mask",
        )
        require(math.isfinite(self.initial_log_rate), "initial_log_rate", "must be finite")
        require(math.isfinite(self.initial_offset_score), "initial_offset_score", "must be finite")

    @property
    def n_moves(self) -> int:
        return SYSTEMS[self.system].n_moves

    @property
    def n_states(self) -> int:
        return SYSTEMS[self.system].n_states

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(f"{unknown[0]}: unknown model parameter; known: {sorted(known)}")
        return cls(**values)


def rotary_angles(positions: torch.Tensor, lattice_size: int, head_width: int) -> torch.Tensor:
    """Rotation angles [batch, 1, tokens, head_width // 2]: x in the first half, y in the second.

    Frequencies are whole multiples of 2 pi / L, so a score q_i . k_j depends on x_i - x_j only
    modulo L: relative offsets on the torus, with no preferred range (no locality assumed).
    """
    pairs = head_width // 4
    # float64 angles: exact periodicity, whatever precision the network then runs in
    frequencies = torch.arange(1, pairs + 1, device=positions.device, dtype=torch.float64) * (2 * math.pi / lattice_size)
    x = positions[..., 0, None].double() * frequencies
    y = positions[..., 1, None].double() * frequencies
    angles = torch.cat([x, y], dim=-1)  # [batch, tokens, 2 * pairs]
    padding = head_width // 2 - angles.shape[-1]
    return functional.pad(angles, (0, padding)).unsqueeze(1)


def relative_offsets(positions: torch.Tensor, lattice_size: int, sink: bool = False) -> torch.Tensor:
    """Index of the offset of token j from token i on the torus, dx * L + dy, long [batch, tokens, tokens].

    With ``sink``, one more column holds L^2: the index of the sink's entry after the L^2 offsets.
    """
    difference = (positions[..., None, :, :] - positions[..., :, None, :]).remainder(lattice_size)
    offsets = difference[..., 0] * lattice_size + difference[..., 1]
    return functional.pad(offsets, (0, 1), value=lattice_size**2) if sink else offsets


def rotate(features: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive channel pairs of q or k [batch, heads, tokens, width] by (cos, sin)."""
    even, odd = features[..., 0::2], features[..., 1::2]
    cos, sin = (part.to(features.dtype) for part in rotation)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class SelfAttention(torch.nn.Module):
    """Multi-head self-attention, optionally with a learned sink key/value (torch's add_bias_kv).

    Softmax weights sum to one, so without a sink a head cannot say "nothing matched": the sink
    absorbs the weight when no token fits the query, which makes "is there a token at offset d?"
    a linear read-out of the attention output instead of a comparison with the token itself.
    """

    def __init__(self, d_model: int, n_heads: int, sink: bool = True, offsets: int = 0, offset_score: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        # A learned score for each relative offset (dx, dy) mod L, added to q . k: a head can single
        # out one offset exactly ("the site to my right"), which a few rotary frequencies only blur.
        # The table covers every offset, so no range is preferred.
        initial = torch.full((n_heads, offsets), offset_score / OFFSET_BIAS_SCALE)
        self.offset_bias = torch.nn.Parameter(initial) if offsets else None
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)
        head_width = d_model // n_heads
        # The sink's score is a learned number per head, not q . k: a key would meet rotated
        # queries and make the score depend on absolute position.
        self.sink_logit = torch.nn.Parameter(torch.zeros(n_heads)) if sink else None
        self.sink_value = torch.nn.Parameter(torch.randn(n_heads, 1, head_width) * 0.1) if sink else None

    def forward(
        self,
        h: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, tokens, width = h.shape
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        scale = 1.0 / math.sqrt(q.shape[-1])
        bias = None
        if self.offset_bias is not None and offsets is not None:
            # offsets index a table with the sink's logit as its last entry, so one gather gives
            # the whole score mask, sink column included (``relative_offsets(..., sink=True)``)
            table = self.offset_bias * OFFSET_BIAS_SCALE
            if self.sink_logit is not None:
                table = torch.cat([table, self.sink_logit[:, None]], dim=1)
            bias = table.t().to(q.dtype)[offsets].permute(0, 3, 1, 2)  # [batch, heads, tokens, keys]
        if self.sink_logit is not None:
            # One more key/value whose score is the learned logit whatever the query.
            v = torch.cat([v, self.sink_value.to(v.dtype).expand(batch, -1, -1, -1)], dim=2)
            if bias is not None:  # the mask holds the logit already; the sink's key is zero
                k = torch.cat([k, k.new_zeros(batch, self.n_heads, 1, k.shape[-1])], dim=2)
            else:  # no mask: an extra channel, 1 in every query and logit/scale in the sink key only,
                # keeps the efficient kernels (a mask would force the slow one)
                sink_key = functional.pad(k.new_zeros(self.n_heads, 1, k.shape[-1]), (0, 1))
                sink_key[..., -1] = self.sink_logit.to(q.dtype).view(-1, 1) / scale
                q = functional.pad(q, (0, 1), value=1.0)
                k = torch.cat([functional.pad(k, (0, 1)), sink_key.expand(batch, -1, -1, -1)], dim=2)
        attended = functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, width))


class Block(torch.nn.Module):
    """Pre-norm transformer block: h + attention(norm(h)), then h + feed-forward(norm(h))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, sink: bool = True, offsets: int = 0, offset_score: float = 0.0):
        super().__init__()
        self.attention_norm = torch.nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads, sink, offsets, offset_score)
        self.feed_forward_norm = torch.nn.LayerNorm(d_model)
        self.feed_forward = torch.nn.Sequential(
            torch.nn.Linear(d_model, d_ff), torch.nn.GELU(), torch.nn.Linear(d_ff, d_model)
        )

    def forward(
        self,
        h: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), rotation, offsets)
        return h + self.feed_forward(self.feed_forward_norm(h))


def fourier_table(size: int, width: int) -> torch.Tensor:
    """[size, width] table: cos/sin of 2 pi k x / size for k = 1, 2, ... in the first columns."""
    table = torch.zeros(size, width)
    coordinate = torch.arange(size, dtype=torch.float64)
    for column in range(0, width - 1, 2):
        frequency = column // 2 + 1
        if frequency > size // 2:
            break
        angle = 2 * math.pi * frequency * coordinate / size
        table[:, column], table[:, column + 1] = torch.cos(angle).float(), torch.sin(angle).float()
    return table


class TransformerRates(torch.nn.Module):
    """A rate model (``hpcdyn.physics.rates.RateModel``) learned from trajectories."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.n_moves = config.n_moves
        width = config.d_model
        self.embed_x = torch.nn.Embedding(config.lattice_size, width)
        self.embed_y = torch.nn.Embedding(config.lattice_size, width)
        self.embed_state = torch.nn.Embedding(config.n_states, width)
        with torch.no_grad():
            self.embed_x.weight.zero_()
            self.embed_y.weight.zero_()
            if not config.rotary:  # absolute Fourier features: x in the first half, y in the second
                half = width // 2
                self.embed_x.weight[:, :half] = fourier_table(config.lattice_size, half)
                self.embed_y.weight[:, half : 2 * half] = fourier_table(config.lattice_size, half)
        offsets = config.lattice_size**2 if config.relative_bias else 0
        self.blocks = torch.nn.ModuleList(
            Block(width, config.n_heads, config.d_ff, config.attention_sink, offsets, config.initial_offset_score)
            for _ in range(config.n_layers)
        )
        self.final_norm = torch.nn.LayerNorm(width)
        if config.mode == 1:
            self.head = torch.nn.Linear(width, config.n_moves)
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.constant_(self.head.bias, config.initial_log_rate)
        else:
            self.classifier = torch.nn.Linear(width, config.n_moves * config.n_classes)
            # initial class rates log-spaced from e^-12 to e^3 times the mean rate: distinguishable from
            # the start, and the lowest far below any rate that moves which do happen could have, so
            # the moves that never happen (blocked hops) find a class of their own
            # (with the exclusion mask no move needs a near-zero class: a class started there would
            # stay unused, so the classes start over the narrower range of rates that do happen)
            low, high = MASKED_CLASS_LOG_RATE_SPREAD if config.exclusion_mask else CLASS_LOG_RATE_SPREAD
            spread = torch.linspace(low, high, config.n_classes) if config.n_classes > 1 else torch.zeros(1)
            self.class_log_rates = torch.nn.Parameter(config.initial_log_rate + spread)
        self.temperature = 1.0  # Gumbel-softmax temperature, annealed by the trainer
        self.expected_gradient = False  # Mode 2: set by the trainer (TrainingConfig.expected_from_epoch)

    def encode(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        h = self.embed_x(positions[..., 0]) + self.embed_y(positions[..., 1]) + self.embed_state(states)
        rotation = None
        if self.config.rotary:  # cos and sin once per forward, shared by every layer
            angles = rotary_angles(positions, self.config.lattice_size, self.config.d_model // self.config.n_heads)
            rotation = (angles.cos().to(h.dtype), angles.sin().to(h.dtype))
        offsets = None
        if self.config.relative_bias:
            offsets = relative_offsets(positions, self.config.lattice_size, sink=self.config.attention_sink)
        for block in self.blocks:
            h = block(h, rotation, offsets)
        return self.final_norm(h)

    def class_probabilities(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Mode 2: softmax over classes of every move, [batch, n_tokens, n_moves, n_classes]."""
        return self._class_logits(self.encode(positions, states)).float().softmax(-1)

    def classes(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Mode 2: the class of every move (the hard choice), long [batch, n_tokens, n_moves]."""
        return self.class_probabilities(positions, states).argmax(-1)

    def move_classes(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Mode 2: the class of every move, -1 where the exclusion mask forbids it [batch, n_tokens, n_moves]."""
        positions, states = positions.long(), states.long()
        classes = self.classes(positions, states)
        if self.config.exclusion_mask:
            classes = classes.masked_fill(self._blocked(positions, states), -1)
        return classes

    def forward(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        positions, states = positions.long(), states.long()
        h = self.encode(positions, states)
        if self.config.mode == 1:
            log_rates = self.head(h)
        else:
            log_rates = self._class_log_rates(h)
        return self._masked(log_rates, positions, states)

    def _masked(self, log_rates: torch.Tensor, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """-inf for the moves the exclusion mask forbids, when it is on."""
        if self.config.exclusion_mask:
            log_rates = log_rates.masked_fill(self._blocked(positions, states), -math.inf)
        return log_rates

    def _class_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h).unflatten(-1, (self.n_moves, self.config.n_classes))

    def _straight_through(self, logits: torch.Tensor) -> torch.Tensor:
        """One-hot argmax class weights in the forward pass, the softmax's gradient in the backward."""
        soft = logits.softmax(-1)
        hard = functional.one_hot(soft.argmax(-1), self.config.n_classes).to(soft.dtype)
        return hard + (soft - soft.detach())

    def _class_log_rates(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._class_logits(h)
        rates = self.class_log_rates.to(logits.dtype)
        if self.training and self.config.estimator == "gumbel":
            weights = functional.gumbel_softmax(logits, tau=self.temperature, hard=False)
        else:
            weights = self._straight_through(logits)
        return (weights * rates).sum(-1)

    @property
    def scores_events_apart(self) -> bool:
        """Whether ``split_log_rates`` differs from ``forward`` now: Mode 2, training, expected gradient."""
        return self.training and self.config.mode == 2 and self.expected_gradient

    def split_log_rates(self, positions: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-rates to score the moves taken and the exposure of all moves: (event, exposure).

        Both equal ``forward``. While training Mode 2 with ``expected_gradient`` they differ in their
        gradients: the classifier then follows the exact gradient of the U expected when every move
        draws its class from the softmax, whose terms are linear in the class probabilities: the
        event term through sum_k p_k ln(lambda_k), the exposure through sum_k p_k lambda_k. Summed
        over the moves of one kind (n events, exposure E) this prefers the class whose rate maximises
        n ln(lambda) - E lambda, the nearest one; the straight-through gradient of ln(lambda) alone
        pushes a move towards the largest or the smallest rate, by the sign of n - E lambda.
        """
        if not self.scores_events_apart:
            log_rates = self(positions, states)
            return log_rates, log_rates
        positions, states = positions.long(), states.long()
        weights = self._straight_through(self._class_logits(self.encode(positions, states)))
        rates = self.class_log_rates.to(weights.dtype)
        top = rates.detach().max()
        event = (weights * rates).sum(-1)
        exposure = (weights * (rates - top).exp()).sum(-1).log() + top
        return self._masked(event, positions, states), self._masked(exposure, positions, states)

    def _blocked(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        from hpcdyn.physics.rates import ActiveRates

        system = SYSTEMS["active"](L=self.config.lattice_size, N=states.shape[-1])
        types = ActiveRates(system).move_types(positions, states)
        return types == ActiveRates.BLOCKED_HOP

    def class_rates(self) -> list[float]:
        """Mode 2: the learned rate of each class."""
        return self.class_log_rates.detach().double().exp().tolist()
