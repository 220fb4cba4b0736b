"""The named choices of learning (optimisers, Mode 2 options, attention stencils, key families to certify).

Plain Python, no torch: the command line builds its parser from these, so ``hpcdyn --help``, a
refused option and ``--version`` answer without importing torch. The modules that implement each
choice import its names from here.
"""

from __future__ import annotations

OPTIMIZERS = ("adam", "adabelief")
CLASS_RATE_FITS = ("gradient", "closed_form", "closed_form_last")
CLASS_INITS = ("auto", "partition", "none")
ESTIMATORS = ("straight_through", "gumbel")

Offset = tuple[int, int]


def _diamond(radius: int) -> tuple[Offset, ...]:
    span = range(-radius, radius + 1)
    return tuple((dx, dy) for dx in span for dy in span if abs(dx) + abs(dy) <= radius)


def _block(radius: int) -> tuple[Offset, ...]:
    span = range(-radius, radius + 1)
    return tuple((dx, dy) for dx in span for dy in span)


# The stencils a hard-local model may attend within, named as the environment key families
# (DESIGN 1.6; hpcdyn.physics.environments), in order of size. Each holds the token's own site
# (0, 0): a token always has itself to attend to, so a token with no neighbours in its stencil still
# gets a finite softmax (and the sink, when on, can take the weight besides).
ATTENTION_STENCILS: dict[str, tuple[Offset, ...]] = {
    "vn1": _diamond(1),
    "block3": _block(1),
    "diamond2": _diamond(2),
    "block5": _block(2),
}

# A stencil may add a count: "vn1+count5" attends within vn1 and also sees the number of other
# particles in the 5 x 5 block around the token (one number, not where they are), the summary a
# density-dependent rule such as quorum sensing needs (DESIGN 1.6). Particle systems only.
COUNT_SIDES = (3, 5, 7, 9)
STENCIL_NAMES = tuple(ATTENTION_STENCILS) + tuple(
    f"{stencil}+count{side}" for stencil in ATTENTION_STENCILS for side in COUNT_SIDES
)


def split_stencil(name: str) -> tuple[str, int | None]:
    """(attention stencil, side of the counted block or None) of a stencil name such as "vn1+count5"."""
    stencil, _, count = name.partition("+count")
    return stencil, (int(count) if count else None)


def stencil_reach(stencil: str) -> int:
    """The Chebyshev radius of what a stencil sees: its offsets, or its counted block if wider."""
    attended, side = split_stencil(stencil)
    return max(max(max(abs(dx), abs(dy)) for dx, dy in ATTENTION_STENCILS[attended]), (side or 1) // 2)


# key families `hpcdyn locality` certifies by default, smallest first
DEFAULT_FAMILIES = ("vn1-occ", "vn1", "block3-occ", "block3", "diamond2-occ", "diamond2", "block5-occ", "block5")
# and, for particle systems, the nearest neighbours with the count of a block (a density rule's summary)
COUNT_FAMILIES = ("vn1+count3", "vn1+count5", "vn1+count7")
