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

Hard-local variant (opt-in, ``TransformerConfig(attention_stencil="vn1", rotary=False)``; DESIGN 1.6):
no position tables and no rotary encoding; each layer attends only to the tokens within a stencil
of offsets around each token ("vn1", "block3", "diamond2", "block5", the token's own site always
included), with one learned score per head and offset of the stencil. Its rates then depend exactly
on the content of its receptive field (the stencil grown ``n_layers`` times) and on nothing else:
translation invariant, on a lattice of any size, and reproduced exactly by an environment table of
the key family ``config.key_family``. A stencil with a count (``"vn1+count5"``, particle systems)
also gives each token the number of other particles in the block around it: embedded after the
attention and mixed into the token's features by a feed-forward of its own (one token at a time,
so no neighbour's count leaks in); the key family is then ``"vn1+count5"`` too. The count's
embedding is cumulative (count c adds the learned steps 1..c to the embedding of 0, each step
starting at zero): a count larger than any in the training data gets no step of its own and acts
as the largest one seen, so a model trained at one density extrapolates a crowding rule by
saturating it instead of meeting an untrained embedding (measured: with one free embedding per
count, the model trained at density 0.125 clustered too little at 0.3-0.5, RESULTS.md quorum-phase).

Every layer's offset scores form a mask [batch, heads, tokens, tokens (+ sink)], gathered from a
per-head table head-major (``table[:, index]``: a layout the attention kernel reads without a
copy). In lock-step simulation ``AttentionMasks`` keeps the masks of a batch and rewrites one row
and one column per moved token instead of rebuilding them every event.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as functional

from hpcdyn.learning.names import ATTENTION_STENCILS, ESTIMATORS, STENCIL_NAMES, Offset, split_stencil, stencil_reach
from hpcdyn.physics.systems import PARTICLE_SYSTEMS, SYSTEMS, ConfigurationError


# The offset scores are stored divided by this factor: Adam's steps in them are then this much
# larger, so a head can sharpen onto one offset among L^2 within a few epochs.
OFFSET_BIAS_SCALE = 10.0
# Mode 2: the initial class log-rates span this range around the log of the data's mean rate.
CLASS_LOG_RATE_SPREAD = (-12.0, 3.0)
MASKED_CLASS_LOG_RATE_SPREAD = (-5.0, 3.0)

def receptive_field(stencil: str, n_layers: int) -> frozenset[Offset]:
    """Offsets whose content can reach a token's rates through n_layers of stencil attention.

    The stencil grown n_layers times (its n-fold Minkowski sum): a layer mixes each token with the
    tokens at the stencil's offsets, whose features already hold their own fields.
    """
    field: set[Offset] = {(0, 0)}
    attended, _ = split_stencil(stencil)  # a counted block is not attended: it adds one number, not a field
    for _ in range(n_layers):
        field = {(x + dx, y + dy) for x, y in field for dx, dy in ATTENTION_STENCILS[attended]}
    return frozenset(field)


def covering_family(field: frozenset[Offset]) -> str | None:
    """The smallest environment key family (full state) whose stencil holds every offset of field.

    None when no family is wide enough (the model then has no exact table).
    """
    covering = [name for name, offsets in ATTENTION_STENCILS.items() if field <= set(offsets)]
    return min(covering, key=lambda name: len(ATTENTION_STENCILS[name]), default=None)


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
    exclusion_mask: bool = False  # opt-in: forbid hops onto occupied sites (particle systems only)
    rotary: bool = True  # periodic 2-D rotary encoding of q and k (relative offsets on the torus)
    attention_sink: bool = True  # a learned key/value every query can attend to (add_bias_kv)
    relative_bias: bool = True  # a learned score per head for every offset on the torus (all L^2 of them)
    initial_log_rate: float = 0.0  # where all log-rates start
    # Where every offset score starts, below the sink's 0: a head attends to nothing until training
    # raises the offsets that matter. Offsets left at a score near 0 would leak weight that grows with
    # the number of tokens, a dependence on crowding that a model trained at one density cannot undo.
    initial_offset_score: float = -8.0
    # Opt-in hard-local model: a stencil name of ATTENTION_STENCILS. Each layer then attends only
    # within the stencil, with no position tables (requires rotary=False): its rates depend exactly
    # on its receptive field. None: the paper's unrestricted model.
    attention_stencil: str | None = None
    # A learned value per head for every offset of the stencil, added to what a head reads from a token
    # at that offset (relative position values): without it a head's output says which states it
    # attended to, not where, and a hard-local model needs one sharp head per neighbour to tell which
    # neighbouring sites are empty. None: on for a hard-local model, off for the unrestricted one.
    offset_values: bool | None = None

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
            not self.exclusion_mask or self.system in PARTICLE_SYSTEMS,
            "exclusion_mask",
            f"only the particle systems {PARTICLE_SYSTEMS} have volume exclusion to mask",
        )
        require(math.isfinite(self.initial_log_rate), "initial_log_rate", "must be finite")
        require(math.isfinite(self.initial_offset_score), "initial_offset_score", "must be finite")
        self._check_stencil(require)
        if self.offset_values is None:
            object.__setattr__(self, "offset_values", self.hard_local)
        require(isinstance(self.offset_values, bool), "offset_values", f"must be True, False or None, got {self.offset_values!r}")
        require(not self.offset_values or self.hard_local, "offset_values",
                "offset values belong to a hard-local model's stencil; set attention_stencil or leave offset_values None")  # fmt: skip

    def _check_stencil(self, require) -> None:
        stencil = self.attention_stencil
        if stencil is None:
            return
        require(stencil in STENCIL_NAMES, "attention_stencil",
                f"must be one of {list(STENCIL_NAMES)} or None (unrestricted), got {stencil!r}")  # fmt: skip
        require(self.count_side is None or self.system in PARTICLE_SYSTEMS, "attention_stencil",
                f"{stencil!r} counts particles; the {self.system!r} system has none (use a stencil without +count)")  # fmt: skip
        require(not self.rotary, "rotary",
                "a hard-local model (attention_stencil) sees relative offsets only; set rotary=False")  # fmt: skip
        require(self.relative_bias, "relative_bias",
                "a hard-local model learns one score per offset of its stencil; leave relative_bias=True")  # fmt: skip
        smallest = 2 * stencil_reach(stencil) + 1
        require(self.lattice_size >= smallest, "lattice_size",
                f"must be >= {smallest} for the stencil {stencil!r} to fit on the torus, got {self.lattice_size}")  # fmt: skip

    @property
    def hard_local(self) -> bool:
        """Whether attention is restricted to a stencil (rates depend on a finite receptive field)."""
        return self.attention_stencil is not None

    @property
    def count_side(self) -> int | None:
        """Side of the block whose particles a token counts ("vn1+count5": 5), None without a count."""
        return None if self.attention_stencil is None else split_stencil(self.attention_stencil)[1]

    @property
    def receptive_field(self) -> frozenset[Offset] | None:
        """Offsets whose content the rates of a token depend on; None for the unrestricted model."""
        if self.attention_stencil is None:
            return None
        return receptive_field(self.attention_stencil, self.n_layers)

    @property
    def key_family(self) -> str | None:
        """The smallest environment key family (full state) covering the receptive field.

        An environment table of this family reproduces the model exactly, by construction (a 1-layer
        vn1 model: 'vn1'; 2 layers of vn1: 'diamond2'). None for the unrestricted model, whose
        locality must be measured (``hpcdyn.learning.locality``), or a field wider than every family.
        """
        field = self.receptive_field
        family = None if field is None else covering_family(field)
        if family is None or self.count_side is None:
            return family
        return f"{family}+count{self.count_side}"

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
        values = dict(values)
        if known - {"offset_values"} <= set(values):  # every other field: written by as_dict, so by a checkpoint
            values.setdefault("offset_values", False)  # from before offset values existed: a model without them
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


def offsets_between(sources: torch.Tensor, targets: torch.Tensor, lattice_size: int) -> torch.Tensor:
    """Index dx * L + dy of the offset of each target from each source on the torus.

    sources long [..., n, 2], targets long [..., m, 2] -> long [..., n, m].
    """
    difference = (targets[..., None, :, :] - sources[..., :, None, :]).remainder(lattice_size)
    return difference[..., 0] * lattice_size + difference[..., 1]


def relative_offsets(positions: torch.Tensor, lattice_size: int, sink: bool = False) -> torch.Tensor:
    """Index of the offset of token j from token i on the torus, dx * L + dy, long [batch, tokens, tokens].

    With ``sink``, one more column holds L^2: the index of the sink's entry after the L^2 offsets.
    """
    offsets = offsets_between(positions, positions, lattice_size)
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

    ``offsets`` learned scores per head (one per offset of the torus, or of a stencil) form the
    score table; with ``outside`` one more entry, -inf, stands for every offset outside a stencil.
    """

    def __init__(self, d_model: int, n_heads: int, sink: bool = True, offsets: int = 0, offset_score: float = 0.0,
                 outside: bool = False, offset_values: bool = False):  # fmt: skip
        super().__init__()
        self.n_heads = n_heads
        # A learned score for each relative offset (dx, dy) mod L, added to q . k: a head can single
        # out one offset exactly ("the site to my right"), which a few rotary frequencies only blur.
        # The table covers every offset (or every offset of a stencil), so no range is preferred.
        initial = torch.full((n_heads, offsets), offset_score / OFFSET_BIAS_SCALE)
        self.offset_bias = torch.nn.Parameter(initial) if offsets else None
        self.outside = outside
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)
        head_width = d_model // n_heads
        # The sink's score is a learned number per head, not q . k: a key would meet rotated
        # queries and make the score depend on absolute position.
        self.sink_logit = torch.nn.Parameter(torch.zeros(n_heads)) if sink else None
        self.sink_value = torch.nn.Parameter(torch.randn(n_heads, 1, head_width) * 0.1) if sink else None
        entries = offsets + int(outside) + int(sink)  # the score table's entries
        self.offset_values = torch.nn.Parameter(torch.randn(n_heads, entries, head_width) * 0.1) if offset_values else None

    def score_table(self) -> torch.Tensor:
        """Score of each table entry per head, [heads, entries]: the offsets, -inf outside a stencil, the sink."""
        table = self.offset_bias * OFFSET_BIAS_SCALE
        if self.outside:
            table = functional.pad(table, (0, 1), value=-math.inf)
        if self.sink_logit is not None:
            table = torch.cat([table, self.sink_logit[:, None]], dim=1)
        return table

    def score_mask(self, index: torch.Tensor) -> torch.Tensor:
        """The score mask [batch, heads, tokens, keys] of an entry index long [batch, tokens, keys].

        Gathered head-major (heads outermost in memory, each [tokens, keys] block contiguous), which
        the attention kernel reads as it is; gathering [batch, tokens, keys, heads] and permuting
        costs a copy of the mask and a slower kernel.
        """
        return self.score_table()[:, index].permute(1, 0, 2, 3)

    def forward(
        self,
        h: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        query: int | None = None,
    ) -> torch.Tensor:
        """h [batch, tokens, d_model]; mask: score mask [batch, heads, tokens, tokens (+1 sink)] or None;
        index: the score-table entry of every (query, key) pair [batch, tokens, keys] (offset values only);
        query: only this token asks (output [batch, 1, d_model]), every token still answers."""
        batch, tokens, width = h.shape
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        query_rotation = rotation
        if query is not None:
            asking = slice(query, query + 1)
            q = q[:, :, asking]
            query_rotation = None if rotation is None else tuple(part[..., asking, :] for part in rotation)
            mask = None if mask is None else mask[:, :, asking]
            index = None if index is None else index[:, asking]
        if rotation is not None:
            q, k = rotate(q, query_rotation), rotate(k, rotation)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if mask is not None:
            mask = mask.to(q.dtype)
        if self.sink_logit is not None:
            q, k, v = self._with_sink(q, k, v, scale, masked=mask is not None)
        if self.offset_values is not None:
            attended = self._with_offset_values(q, k, v, scale, mask, index)
        else:
            attended = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        attended = attended[..., : width // self.n_heads]  # the sink channel's padding, when added
        return self.out(attended.transpose(1, 2).reshape(batch, q.shape[2], width))

    def _with_offset_values(self, q, k, v, scale: float, mask, index) -> torch.Tensor:
        """Attention written out: the weights summed per table entry read the entries' learned values."""
        weights = ((q @ k.transpose(-1, -2)) * scale + mask).softmax(-1)  # [batch, heads, tokens, keys]
        per_entry = weights.new_zeros(*weights.shape[:3], self.offset_values.shape[1])
        per_entry.scatter_add_(-1, index.unsqueeze(1).expand_as(weights), weights)
        return weights @ v + torch.einsum("bhte,hew->bhtw", per_entry, self.offset_values.to(weights.dtype))

    def _with_sink(self, q, k, v, scale: float, masked: bool):
        """q, k, v with one more key/value, the sink, whose score is the learned logit whatever the query."""
        batch = q.shape[0]
        v = torch.cat([v, self.sink_value.to(v.dtype).expand(batch, -1, -1, -1)], dim=2)
        if masked:  # the mask holds the logit already; the sink's key is zero
            k = torch.cat([k, k.new_zeros(batch, self.n_heads, 1, k.shape[-1])], dim=2)
            return q, k, v
        # No mask: an extra channel, 1 in every query and logit/scale in the sink key only, keeps the
        # fused kernels (a mask would force a slower one). v gets a zero channel too: the fused CPU
        # kernel runs only when q, k and v have the same width (DESIGN 4); the caller drops it.
        sink_key = functional.pad(k.new_zeros(self.n_heads, 1, k.shape[-1]), (0, 1))
        sink_key[..., -1] = self.sink_logit.to(q.dtype).view(-1, 1) / scale
        q = functional.pad(q, (0, 1), value=1.0)
        k = torch.cat([functional.pad(k, (0, 1)), sink_key.expand(batch, -1, -1, -1)], dim=2)
        return q, k, functional.pad(v, (0, 1))


class Block(torch.nn.Module):
    """Pre-norm transformer block: h + attention(norm(h)), then h + feed-forward(norm(h))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, sink: bool = True, offsets: int = 0, offset_score: float = 0.0,
                 outside: bool = False, offset_values: bool = False):  # fmt: skip
        super().__init__()
        self.attention_norm = torch.nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads, sink, offsets, offset_score, outside, offset_values)
        self.feed_forward_norm = torch.nn.LayerNorm(d_model)
        self.feed_forward = torch.nn.Sequential(
            torch.nn.Linear(d_model, d_ff), torch.nn.GELU(), torch.nn.Linear(d_ff, d_model)
        )

    def forward(
        self,
        h: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        query: int | None = None,
    ) -> torch.Tensor:
        """query: the output of this token alone, [batch, 1, d_model] (see ``TransformerRates.encode``)."""
        attended = self.attention(self.attention_norm(h), rotation, mask, index, query)
        h = (h if query is None else h[:, query : query + 1]) + attended
        return h + self.feed_forward(self.feed_forward_norm(h))


@dataclasses.dataclass
class AttentionMasks:
    """The score mask of every layer for a batch of configurations, kept current in lock-step simulation.

    When one token per replica moves, only its row (its offsets to every token) and its column
    (every token's offset to it) change: ``update`` rewrites those, O(tokens) per replica, where a
    rebuild costs O(tokens^2). The tables are the weights' scores when built: valid while the
    weights do not change (inference).
    """

    model: "TransformerRates" = dataclasses.field(repr=False)
    lattice_size: int
    tables: list[torch.Tensor] = dataclasses.field(repr=False)  # [heads, entries] per layer
    storage: list[torch.Tensor] = dataclasses.field(repr=False)  # [heads, batch, tokens, keys] per layer: head-major

    def layer(self, index: int) -> torch.Tensor:
        """Layer ``index``'s mask [batch, heads, tokens, keys] (a view of the storage)."""
        return self.storage[index].permute(1, 0, 2, 3)

    def update(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """positions long [batch, n_tokens, 2] after the move of token tokens[b] of replica b (long [batch]).

        A replica whose token did not move gets its row and column rewritten with the same values.
        """
        rows = torch.arange(positions.shape[0], device=positions.device)
        n_tokens = positions.shape[1]
        moved = positions[rows, tokens].unsqueeze(1)  # [batch, 1, 2]
        outgoing = self.model.offset_index(moved, positions, self.lattice_size).squeeze(1)  # [batch, n_tokens]
        incoming = self.model.offset_index(positions, moved, self.lattice_size).squeeze(2)  # [batch, n_tokens]
        for table, storage in zip(self.tables, self.storage):
            storage[:, rows, tokens, :n_tokens] = table[:, outgoing]  # the row: [heads, batch, n_tokens]
            storage[:, rows, :, tokens] = table[:, incoming].permute(1, 0, 2)  # the column: [batch, heads, n_tokens]


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
        if not config.hard_local:  # absolute position tables: the hard-local model has none
            self.embed_x = torch.nn.Embedding(config.lattice_size, width)
            self.embed_y = torch.nn.Embedding(config.lattice_size, width)
            with torch.no_grad():
                self.embed_x.weight.zero_()
                self.embed_y.weight.zero_()
                if not config.rotary:  # absolute Fourier features: x in the first half, y in the second
                    half = width // 2
                    self.embed_x.weight[:, :half] = fourier_table(config.lattice_size, half)
                    self.embed_y.weight[:, half : 2 * half] = fourier_table(config.lattice_size, half)
        self.embed_state = torch.nn.Embedding(config.n_states, width)
        if config.hard_local:
            offsets = len(ATTENTION_STENCILS[split_stencil(config.attention_stencil)[0]])
        else:
            offsets = config.lattice_size**2 if config.relative_bias else 0
        self.blocks = torch.nn.ModuleList(
            Block(width, config.n_heads, config.d_ff, config.attention_sink, offsets, config.initial_offset_score,
                  outside=config.hard_local, offset_values=config.offset_values)  # fmt: skip
            for _ in range(config.n_layers)
        )
        # the table entry of the sink: after the offsets (and the stencil's "outside" entry)
        self.sink_entry = offsets + int(config.hard_local)
        self._stencil_lookups: dict[tuple[int, str], torch.Tensor] = {}
        if config.count_side is not None:  # the counted block: cumulative steps per count, then a token-wise mix
            self.embed_count = torch.nn.Embedding(config.count_side**2, width)
            self.count_mix = torch.nn.Sequential(
                torch.nn.LayerNorm(width), torch.nn.Linear(width, config.d_ff), torch.nn.GELU(), torch.nn.Linear(config.d_ff, width)
            )
            with torch.no_grad():  # the count starts without effect
                self.embed_count.weight.zero_()
                self.count_mix[-1].weight.zero_()
                self.count_mix[-1].bias.zero_()
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
            self.lowest_class_log_rate = float(self.class_log_rates.detach().min())  # where the rates start, at least
        self.temperature = 1.0  # Gumbel-softmax temperature, annealed by the trainer
        self.expected_gradient = False  # Mode 2: set by the trainer (TrainingConfig.expected_from_epoch)

    def encode(
        self,
        positions: torch.Tensor,
        states: torch.Tensor,
        *,
        lattice_size: int | None = None,
        masks: AttentionMasks | None = None,
        token: int | None = None,
    ) -> torch.Tensor:
        """Features [batch, tokens, d_model]; with ``token``, of that token alone, [batch, 1, d_model].

        The last layer's other tokens feed nothing that a token's rates read: training on statistics
        wants the centre of every patch only, and skips them (in a one-layer model, the whole layer
        but the keys and values)."""
        size = self.lattice_size_for(lattice_size)
        h = self.embed_state(states)
        if not self.config.hard_local:
            h = h + self.embed_x(positions[..., 0]) + self.embed_y(positions[..., 1])
        rotation = None
        if self.config.rotary:  # cos and sin once per forward, shared by every layer
            angles = rotary_angles(positions, size, self.config.d_model // self.config.n_heads)
            rotation = (angles.cos().to(h.dtype), angles.sin().to(h.dtype))
        index = None
        if self.config.relative_bias and (masks is None or self.config.offset_values):
            index = self.attention_index(positions, size)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            if masks is not None:
                mask = masks.layer(layer)
            else:
                mask = None if index is None else block.attention.score_mask(index)
            h = block(h, rotation, mask, index if self.config.offset_values else None, token if layer == last else None)
        if self.config.count_side is not None:
            steps = self.embed_count.weight.cumsum(0)  # [side^2, width]: count c -> step_0 + ... + step_c
            h = h + steps[self.block_counts(positions, size, token)]
            h = h + self.count_mix(h)
        return self.final_norm(h)

    def block_counts(self, positions: torch.Tensor, lattice_size: int, token: int | None = None) -> torch.Tensor:
        """Other tokens within the counted block of each token (Chebyshev distance <= side // 2), long
        [batch, tokens]; with ``token``, of that token alone, [batch, 1]."""
        half = self.config.count_side // 2
        centres = positions if token is None else positions[..., token : token + 1, :]
        delta = (positions[..., None, :, :] - centres[..., :, None, :]) % lattice_size  # [B, T or 1, T, 2]
        near = torch.minimum(delta, lattice_size - delta).amax(-1) <= half
        return near.sum(-1) - 1  # the token itself excluded

    def lattice_size_for(self, lattice_size: int | None) -> int:
        """The lattice side to run on: the training one, or any other for a hard-local model."""
        if lattice_size is None or lattice_size == self.config.lattice_size:
            return self.config.lattice_size
        if not self.config.hard_local:
            raise ConfigurationError(
                f"lattice_size: this model's position tables cover a {self.config.lattice_size} x "
                f"{self.config.lattice_size} lattice, got {lattice_size}; only a hard-local model "
                f"(attention_stencil) runs on other lattices"
            )
        smallest = 2 * stencil_reach(self.config.attention_stencil) + 1
        if not (isinstance(lattice_size, int) and lattice_size >= smallest):
            raise ConfigurationError(
                f"lattice_size: must be an integer >= {smallest} for the stencil of this model, got {lattice_size!r}"
            )
        return lattice_size

    def offset_index(self, sources: torch.Tensor, targets: torch.Tensor, lattice_size: int) -> torch.Tensor:
        """Score-table entry of the offset of each target from each source, long [..., n_sources, n_targets].

        Unrestricted: the offset itself, dx * L + dy on the torus. Hard-local: the offset's slot in the
        stencil, or the "outside" entry (score -inf); only the signed offset counts, so the same
        neighbourhood gives the same entries on a lattice of any size.
        """
        offsets = offsets_between(sources, targets, lattice_size)
        if not self.config.hard_local:
            return offsets
        return self._stencil_lookup(lattice_size, offsets.device)[offsets]

    def _stencil_lookup(self, lattice_size: int, device: torch.device) -> torch.Tensor:
        """Stencil slot of each offset index dx * L + dy of an L x L torus (long [L^2]), cached per (L, device)."""
        key = (lattice_size, str(device))
        if key not in self._stencil_lookups:
            stencil = ATTENTION_STENCILS[split_stencil(self.config.attention_stencil)[0]]
            lookup = torch.full((lattice_size**2,), len(stencil), dtype=torch.long)
            for slot, (dx, dy) in enumerate(stencil):
                lookup[(dx % lattice_size) * lattice_size + dy % lattice_size] = slot
            self._stencil_lookups[key] = lookup.to(device)
        return self._stencil_lookups[key]

    def attention_index(self, positions: torch.Tensor, lattice_size: int) -> torch.Tensor:
        """Score-table entry of every (query, key) pair, long [batch, tokens, tokens (+1 for the sink)]."""
        index = self.offset_index(positions, positions, lattice_size)
        return functional.pad(index, (0, 1), value=self.sink_entry) if self.config.attention_sink else index

    def attention_masks(self, positions: torch.Tensor, lattice_size: int | None = None) -> AttentionMasks | None:
        """Every layer's score mask for a batch, to pass to ``forward(..., masks=)`` and keep current with
        ``AttentionMasks.update`` while the weights stay fixed (lock-step simulation). None without offset scores."""
        if not self.config.relative_bias:
            return None
        size = self.lattice_size_for(lattice_size)
        positions = positions.long()
        index = self.attention_index(positions, size)
        dtype = self.embed_state.weight.dtype
        with torch.no_grad():
            tables = [block.attention.score_table().detach().to(dtype) for block in self.blocks]
            storage = [table[:, index] for table in tables]  # [heads, batch, tokens, keys]
        return AttentionMasks(self, size, tables, storage)

    # ``token`` below: the moves of that token alone (the token axis of length 1), see ``encode``.
    def class_logits(self, positions: torch.Tensor, states: torch.Tensor, *, token: int | None = None) -> torch.Tensor:
        """Mode 2: the classifier's logits of every move, [batch, n_tokens, n_moves, n_classes]."""
        return self._class_logits(self.encode(positions.long(), states.long(), token=token))

    def class_probabilities(self, positions: torch.Tensor, states: torch.Tensor, *,
                            lattice_size: int | None = None, token: int | None = None) -> torch.Tensor:  # fmt: skip
        """Mode 2: softmax over classes of every move, [batch, n_tokens, n_moves, n_classes]."""
        h = self.encode(positions.long(), states.long(), lattice_size=lattice_size, token=token)
        return self._class_logits(h).float().softmax(-1)

    def classes(self, positions: torch.Tensor, states: torch.Tensor, *, lattice_size: int | None = None,
                token: int | None = None) -> torch.Tensor:  # fmt: skip
        """Mode 2: the class of every move (the hard choice), long [batch, n_tokens, n_moves]."""
        return self.class_probabilities(positions, states, lattice_size=lattice_size, token=token).argmax(-1)

    def move_classes(self, positions: torch.Tensor, states: torch.Tensor, *,
                     lattice_size: int | None = None, token: int | None = None) -> torch.Tensor:  # fmt: skip
        """Mode 2: the class of every move, -1 where the exclusion mask forbids it [batch, n_tokens, n_moves]."""
        positions, states = positions.long(), states.long()
        classes = self.classes(positions, states, lattice_size=lattice_size, token=token)
        if self.config.exclusion_mask:
            classes = classes.masked_fill(self._blocked(positions, states, lattice_size, token), -1)
        return classes

    def forward(
        self,
        positions: torch.Tensor,
        states: torch.Tensor,
        *,
        lattice_size: int | None = None,
        masks: AttentionMasks | None = None,
        token: int | None = None,
    ) -> torch.Tensor:
        """Log-rates [batch, n_tokens, n_moves]. lattice_size: a hard-local model's lattice, if not the
        training one; masks: from ``attention_masks`` for these positions (lock-step simulation);
        token: that token's alone, [batch, 1, n_moves] (``encode``)."""
        positions, states = positions.long(), states.long()
        if masks is not None:
            lattice_size = masks.lattice_size
        h = self.encode(positions, states, lattice_size=lattice_size, masks=masks, token=token)
        if self.config.mode == 1:
            log_rates = self.head(h)
        else:
            log_rates = self._class_log_rates(h)
        return self._masked(log_rates, positions, states, lattice_size, token)

    def _masked(self, log_rates: torch.Tensor, positions: torch.Tensor, states: torch.Tensor,
                lattice_size: int | None = None, token: int | None = None) -> torch.Tensor:  # fmt: skip
        """-inf for the moves the exclusion mask forbids, when it is on."""
        if self.config.exclusion_mask:
            log_rates = log_rates.masked_fill(self._blocked(positions, states, lattice_size, token), -math.inf)
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

    def split_log_rates(self, positions: torch.Tensor, states: torch.Tensor, *,
                        token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
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
            log_rates = self(positions, states, token=token)
            return log_rates, log_rates
        positions, states = positions.long(), states.long()
        weights = self._straight_through(self._class_logits(self.encode(positions, states, token=token)))
        rates = self.class_log_rates.to(weights.dtype)
        top = rates.detach().max()
        event = (weights * rates).sum(-1)
        exposure = (weights * (rates - top).exp()).sum(-1).log() + top
        return self._masked(event, positions, states, token=token), self._masked(exposure, positions, states, token=token)

    def _blocked(self, positions: torch.Tensor, states: torch.Tensor, lattice_size: int | None = None,
                 token: int | None = None) -> torch.Tensor:  # fmt: skip
        from hpcdyn.physics.rates import ActiveRates

        system = SYSTEMS["active"](L=self.lattice_size_for(lattice_size), N=states.shape[-1])
        types = ActiveRates(system).move_types(positions, states)
        blocked = types == ActiveRates.BLOCKED_HOP
        return blocked if token is None else blocked[:, token : token + 1]

    def class_rates(self) -> list[float]:
        """Mode 2: the learned rate of each class."""
        return self.class_log_rates.detach().double().exp().tolist()
