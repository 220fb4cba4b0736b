"""Environment keys: a token's local environment encoded as one int64 (DESIGN 1.6).

A key family is a stencil of offsets (dx, dy) around a token, the centre excluded, and what each
stencil site contributes:

- ``state`` (full state): 0 empty, 1 + o for a particle of orientation o (active); the spin (fa);
- ``occupancy``: 0 empty, 1 occupied (active); the spin (fa: a site's content is its spin, so
  both variants coincide there).

A token's *patch* is its own state followed by the digits of its stencil sites, int8 [1 + S]. Its
key is the exact mixed-radix code of the patch,

    key = own_state + n_own_states * sum_i digit_i * base**i        (0 <= key < n_own * base**S)

whenever that fits in 63 bits, else a 63-bit hash of the patch; a hashed key comes with a second,
independent 63-bit hash (``check``) that tables compare on insert and lookup, so a collision is
caught instead of silently merging two environments (exact keys have check 0). Keys are >= 0.

Families have short names for the command line: ``vn1`` (the 4 nearest neighbours), ``diamond2``
and ``diamond3`` (|dx| + |dy| <= r), ``block3``, ``block5``, ``block7``, ``block9`` (the square
around the token), each with an ``-occ`` (occupancy-only) variant; vn1, block3, diamond2 and block5
also with a ``+countN`` variant, N in 3, 5, 7, 9 (``vn1+count5``): the stencil's states and the
number of particles in the N x N block around the token. A count family's patch lists the stencil's
digits, then one occupancy digit per block site (``count_offsets``), all of which share the weight
base**S: the key holds their sum, the count, so key = own + n_own * (code of the stencil + base**S *
count). Keys stay linear in the patch digits, with a digit map per patch column (``digit_array``
[S, contents]). ``make_encoder(name, system)`` binds a family to a system (own states, site digits);
on a chain (fa, dim 1) the stencil keeps its offsets along x only.

Shapes: positions long [B, T, 2] (x, y), states [B, T], a site's content int64 [B, Ly * Lx]
(``content_grid``), patches int8 [B, T, 1 + S], keys and checks int64 [B, T]. The numba functions
``token_key`` and ``token_patch`` encode one token from a flat content grid and a precomputed
stencil table (``stencil_table``) for compiled simulators' local updates.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numba
import numpy as np

from hpcdyn.physics.systems import ActiveSystem, ConfigurationError, FASystem, QuorumSystem, System

CONTENTS = ("state", "occupancy")
KEY_BITS = 63
MASK_63 = np.uint64((1 << 63) - 1)
# Two independent 64-bit hashes (FNV-1a style over the patch digits, different bases and odd
# multipliers), each finished with a different SplitMix64-style mixer.
HASH_BASIS = (np.uint64(0xCBF29CE484222325), np.uint64(0x84222325CBF29CE4))
HASH_PRIME = (np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15))
MIX = (
    (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)),
    (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)),
)
SHIFT = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(33))


@dataclasses.dataclass(frozen=True)
class KeyFamily:
    """A stencil around a token and what its sites contribute; independent of the system."""

    name: str
    offsets: tuple[tuple[int, int], ...]  # (dx, dy), centre excluded, in key-digit order
    content: str  # "state" or "occupancy"
    count_offsets: tuple[tuple[int, int], ...] = ()  # a block whose occupied sites are counted (one key digit)

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ConfigurationError(f"content: must be one of {CONTENTS}, got {self.content!r}")
        for field in ("offsets", "count_offsets"):
            offsets = getattr(self, field)
            if (field == "offsets" and not offsets) or (0, 0) in offsets or len(set(offsets)) != len(offsets):
                raise ConfigurationError(f"{field}: need distinct offsets other than (0, 0), got {offsets!r}")

    @property
    def radius(self) -> tuple[int, int]:
        """Largest |dx| and |dy| of the stencil (and of the counted block)."""
        every = self.offsets + self.count_offsets
        return max(abs(dx) for dx, _ in every), max(abs(dy) for _, dy in every)


def _ordered(offsets) -> tuple[tuple[int, int], ...]:
    """Row-major order (dy, then dx): a fixed digit order for every family."""
    return tuple(sorted(offsets, key=lambda offset: (offset[1], offset[0])))


def diamond_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    span = range(-radius, radius + 1)
    return _ordered((dx, dy) for dx in span for dy in span if 0 < abs(dx) + abs(dy) <= radius)


def block_offsets(side: int) -> tuple[tuple[int, int], ...]:
    half = side // 2
    span = range(-half, half + 1)
    return _ordered((dx, dy) for dx in span for dy in span if (dx, dy) != (0, 0))


def _registry() -> dict[str, KeyFamily]:
    stencils = {"vn1": diamond_offsets(1), "diamond2": diamond_offsets(2), "diamond3": diamond_offsets(3)}
    stencils.update({f"block{side}": block_offsets(side) for side in (3, 5, 7, 9)})
    families = {}
    for name, offsets in stencils.items():
        families[name] = KeyFamily(name, offsets, "state")
        families[f"{name}-occ"] = KeyFamily(f"{name}-occ", offsets, "occupancy")
        if name in ("vn1", "block3", "diamond2", "block5"):  # the attention stencils' families, with a count
            for side in (3, 5, 7, 9):
                families[f"{name}+count{side}"] = KeyFamily(f"{name}+count{side}", offsets, "state", block_offsets(side))
    return families


FAMILIES: dict[str, KeyFamily] = _registry()


def key_family(name: str | KeyFamily) -> KeyFamily:
    """A family by its short name; the error lists the valid names."""
    if isinstance(name, KeyFamily):
        return name
    if name not in FAMILIES:
        raise ConfigurationError(f"key family: must be one of {', '.join(FAMILIES)}; got {name!r}")
    return FAMILIES[name]


@dataclasses.dataclass(frozen=True)
class EnvironmentEncoder:
    """A key family bound to a system: how many own states, which digit each site content gives.

    ``digit_of_content[c]`` is the key digit of a site whose content is c (``content_grid``).
    """

    family: KeyFamily
    system: str  # system name
    offsets: tuple[tuple[int, int], ...]  # every patch column's site: the stencil, then the counted block
    n_own_states: int
    digit_of_content: tuple[int, ...]  # the stencil's digit of each site content
    base: int  # number of distinct digits
    n_counted: int = 0  # the counted block's sites, the last columns (occupancy digits)

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def n_sites(self) -> int:
        """Patch columns after the own state (a counted block's sites included)."""
        return len(self.offsets)

    @property
    def n_stencil(self) -> int:
        return self.n_sites - self.n_counted

    @property
    def patch_width(self) -> int:
        return 1 + self.n_sites

    @property
    def key_space(self) -> int:
        """Number of distinct keys (a Python int; may exceed 2**63)."""
        return self.n_own_states * self.base**self.n_stencil * (self.n_counted + 1)

    @property
    def hashed(self) -> bool:
        return self.key_space > 1 << KEY_BITS

    @property
    def weights(self) -> np.ndarray:
        """int64 [S]: base**i for exact keys, base**S_stencil for each counted site (zeros when hashed)."""
        if self.hashed:
            return np.zeros(self.n_sites, np.int64)
        stencil = [self.base**i for i in range(self.n_stencil)]
        return np.array(stencil + [self.base**self.n_stencil] * self.n_counted, np.int64)

    @property
    def digit_array(self) -> np.ndarray:
        """int64 [S, contents]: the digit of each patch column for each site content."""
        occupancy = [min(digit, 1) for digit in range(len(self.digit_of_content))]
        rows = [self.digit_of_content] * self.n_stencil + [occupancy] * self.n_counted
        return np.array(rows, np.int64).reshape(self.n_sites, len(self.digit_of_content))

    @property
    def offset_array(self) -> np.ndarray:
        return np.array(self.offsets, np.int64).reshape(-1, 2)

    def describe(self) -> dict:
        """Everything that fixes what a key means, for a table's metadata."""
        return {
            "family": self.name,
            "system": self.system,
            "content": self.family.content,
            "offsets": [list(offset) for offset in self.offsets],
            "n_own_states": self.n_own_states,
            "digit_of_content": list(self.digit_of_content),
            "hashed": self.hashed,
            **({"counted_sites": self.n_counted} if self.n_counted else {}),
        }


def make_encoder(family: str | KeyFamily, system: System) -> EnvironmentEncoder:
    """Bind a family to a system (its own states and site contents; a chain keeps x offsets only)."""
    family = key_family(family)
    offsets = family.offsets
    if system.shape[0] == 1:  # a chain: the stencil's row through the token
        offsets = tuple(offset for offset in offsets if offset[1] == 0)
    if isinstance(system, ActiveSystem):
        digits = tuple(range(1 + system.n_states)) if family.content == "state" else (0,) + (1,) * system.n_states
    elif isinstance(system, FASystem):
        digits = (0, 1)
        if family.count_offsets:
            raise ConfigurationError(f"key family: {family.name!r} counts particles; the fa system has none")
    else:
        raise TypeError(f"no environment keys for {type(system).__name__}")
    counted = family.count_offsets
    return EnvironmentEncoder(family, system.name, offsets + counted, system.n_states, digits, max(digits) + 1, len(counted))


def rate_family(system: System) -> str:
    """The smallest registered family whose keys fix a system's true rates.

    active: the nearest neighbours' occupancy (``vn1-occ``); fa: the nearest neighbours' spins
    (``vn1``); quorum: the occupancy of the (2R+1) x (2R+1) block it counts (``block5-occ`` for R 2),
    which holds the hop targets too. Quorum blocks wider than the registered ones are refused.
    """
    if isinstance(system, QuorumSystem):
        name = f"block{system.block_side}-occ"
        if name not in FAMILIES:
            widest = max(int(family[5:-4]) for family in FAMILIES if family.startswith("block") and family.endswith("-occ"))
            raise ConfigurationError(f"R: no key family covers a {system.block_side} x {system.block_side} block; "
                                     f"the widest is block{widest} (R <= {widest // 2})")  # fmt: skip
        return name
    return "vn1-occ" if isinstance(system, ActiveSystem) else "vn1"


# ----------------------------------------------------------------------------- lattice tables
def check_fits(encoder: EnvironmentEncoder, shape: tuple[int, int]) -> None:
    """A stencil must not wrap onto itself: each side at least 2 * radius + 1 (else keys alias sites)."""
    ly, lx = shape
    rx = max(abs(dx) for dx, _ in encoder.offsets)
    ry = max((abs(dy) for _, dy in encoder.offsets), default=0)
    if lx < 2 * rx + 1 or ly < 2 * ry + 1:
        raise ConfigurationError(
            f"L: key family {encoder.name!r} spans {2 * rx + 1} x {2 * ry + 1} sites, larger than the "
            f"{lx} x {ly} lattice; use a smaller family or a larger lattice"
        )


def stencil_table(offsets: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """int64 [sites * S]: flat site index of offset i from site s at [s * S + i] (periodic)."""
    ly, lx = shape
    sites = np.arange(lx * ly)
    x, y = sites % lx, sites // lx
    columns = [((y + dy) % ly) * lx + (x + dx) % lx for dx, dy in np.asarray(offsets).reshape(-1, 2)]
    return np.stack(columns, axis=1).reshape(-1).astype(np.int64)


def content_grid(system: System, positions: np.ndarray, states: np.ndarray) -> np.ndarray:
    """int64 [B, sites]: 0 empty, 1 + state on a particle's site (the largest if several); fa: the spin."""
    positions, states = np.asarray(positions), np.asarray(states, dtype=np.int64)
    ly, lx = system.shape
    batch = states.shape[0]
    flat = positions[..., 1] * lx + positions[..., 0]
    grid = np.zeros((batch, lx * ly), np.int64)
    rows = np.broadcast_to(np.arange(batch)[:, None], flat.shape)
    values = states + 1 if isinstance(system, ActiveSystem) else states
    np.maximum.at(grid, (rows, flat), values)
    return grid


# ----------------------------------------------------------------------------- vectorised encoding
def patches(encoder: EnvironmentEncoder, system: System, positions, states) -> np.ndarray:
    """int8 [B, T, 1 + S]: each token's own state, then the digits of its stencil sites."""
    positions, states = np.asarray(positions, dtype=np.int64), np.asarray(states, dtype=np.int64)
    check_fits(encoder, system.shape)
    ly, lx = system.shape
    grid = content_grid(system, positions, states)
    x = (positions[..., 0, None] + encoder.offset_array[:, 0]) % lx  # [B, T, S]
    y = (positions[..., 1, None] + encoder.offset_array[:, 1]) % ly
    contents = np.take_along_axis(grid, (y * lx + x).reshape(len(grid), -1), axis=1).reshape(x.shape)
    digits = encoder.digit_array[np.arange(encoder.n_sites), contents]
    return np.concatenate([states[..., None], digits], axis=-1).astype(np.int8)


def _mix(value: np.ndarray, which: int) -> np.ndarray:
    first, second = MIX[which]
    value = (value ^ (value >> SHIFT[0])) * first
    value = (value ^ (value >> SHIFT[1])) * second
    return value ^ (value >> SHIFT[2])


def _hash(patch_digits: np.ndarray, which: int) -> np.ndarray:
    """63-bit hash number ``which`` of each patch row, int64 [...]; uint64 arithmetic wraps."""
    value = np.full(patch_digits.shape[:-1], HASH_BASIS[which], np.uint64)
    for column in range(patch_digits.shape[-1]):
        value = (value ^ patch_digits[..., column].astype(np.uint64)) * HASH_PRIME[which]
    return (_mix(value, which) & MASK_63).astype(np.int64)


def keys_of_patches(encoder: EnvironmentEncoder, patch_digits) -> tuple[np.ndarray, np.ndarray]:
    """(keys, checks) int64 [...] of patches [..., 1 + S]; checks are 0 for exact keys."""
    patch_digits = np.asarray(patch_digits, dtype=np.int64)
    if encoder.hashed:
        return _hash(patch_digits, 0), _hash(patch_digits, 1)
    code = patch_digits[..., 1:] @ encoder.weights  # < key_space / n_own, no overflow: the code fits 63 bits
    return patch_digits[..., 0] + encoder.n_own_states * code, np.zeros(code.shape, np.int64)


def environment_keys(encoder: EnvironmentEncoder, system: System, positions, states) -> tuple[np.ndarray, np.ndarray]:
    """(keys, checks) int64 [B, T] of every token of a batch of configurations."""
    return keys_of_patches(encoder, patches(encoder, system, positions, states))


def decode_keys(encoder: EnvironmentEncoder, keys) -> np.ndarray:
    """Patches int8 [K, 1 + S] of exact keys (hashed keys cannot be decoded: tables keep patches).

    A count family's key holds the count, not where the counted particles sit: its patch marks the
    counted block's sites that the stencil shows occupied, then the first others in digit order (a
    canonical patch of the same key). A count the stencil contradicts (fewer than the stencil's
    particles in the block, or more than the block holds) is refused.
    """
    if encoder.hashed:
        raise ConfigurationError(f"key family {encoder.name!r}: hashed keys cannot be decoded; read the table's patches")
    keys = np.asarray(keys, dtype=np.int64)
    own, code = keys % encoder.n_own_states, keys // encoder.n_own_states
    stencil = encoder.n_stencil
    digits = (code[:, None] // encoder.weights[:stencil]) % encoder.base
    patches = np.concatenate([own[:, None], digits], axis=1)
    if encoder.n_counted:
        counted = _canonical_counted(encoder, digits, code // encoder.base**stencil)
        patches = np.concatenate([patches, counted], axis=1)
    return patches.astype(np.int8)


def _consistent_counts(encoder: EnvironmentEncoder, digits: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """(seen [K, C]: counted sites the stencil shows occupied, free [C]: counted sites outside the stencil,
    ok [K]: whether each count fits the stencil's digits)."""
    stencil_offsets = encoder.offsets[: encoder.n_stencil]
    counted = encoder.offsets[encoder.n_stencil :]
    column = np.array([stencil_offsets.index(offset) if offset in stencil_offsets else -1 for offset in counted])
    seen = np.zeros((len(digits), len(counted)), bool)
    inside = column >= 0
    seen[:, inside] = digits[:, column[inside]] > 0
    extra = counts - seen.sum(1)
    return seen, ~inside, (extra >= 0) & (extra <= (~inside).sum())


def _canonical_counted(encoder: EnvironmentEncoder, digits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    seen, free, ok = _consistent_counts(encoder, digits, counts)
    if not ok.all():
        raise ConfigurationError(f"keys: {int((~ok).sum())} keys of family {encoder.name!r} have a count their stencil contradicts")
    extra = counts - seen.sum(1)
    rank = np.cumsum(free) * free  # 1, 2, ... over the counted sites outside the stencil, 0 inside
    return (seen | (free & (rank <= extra[:, None]))).astype(np.int64)


def all_patches(encoder: EnvironmentEncoder, limit: int = 1 << 20) -> np.ndarray:
    """Every patch of a small exact family, int8 [K, 1 + S] in key order (K = key_space, less the keys
    of a count family whose count contradicts the stencil)."""
    if encoder.hashed or encoder.key_space > limit:
        raise ConfigurationError(
            f"key family {encoder.name!r}: {encoder.key_space:.3g} patches, more than the {limit} enumerated at most"
        )
    keys = np.arange(encoder.key_space)
    if encoder.n_counted:
        code = keys // encoder.n_own_states
        digits = (code[:, None] // encoder.weights[: encoder.n_stencil]) % encoder.base
        keys = keys[_consistent_counts(encoder, digits, code // encoder.base**encoder.n_stencil)[2]]
    return decode_keys(encoder, keys)


# ----------------------------------------------------------------------------- compiled encoding
_BASIS_0, _BASIS_1 = HASH_BASIS
_PRIME_0, _PRIME_1 = HASH_PRIME
(_MIX_00, _MIX_01), (_MIX_10, _MIX_11) = MIX
_S30, _S27, _S31 = SHIFT[0], SHIFT[1], SHIFT[2]


@numba.njit(cache=True, inline="always")
def _finish(value, first, second):
    value = (value ^ (value >> _S30)) * first
    value = (value ^ (value >> _S27)) * second
    return np.int64((value ^ (value >> _S31)) & MASK_63)


@numba.njit(cache=True)
def _hashed_token_key(grid, stencil_sites, first, n_sites, own_state, digit_of_content):
    """Both hashes of one token's patch, as ``keys_of_patches`` computes them."""
    value = (_BASIS_0 ^ np.uint64(own_state)) * _PRIME_0
    check = (_BASIS_1 ^ np.uint64(own_state)) * _PRIME_1
    for i in range(n_sites):
        digit = np.uint64(digit_of_content[i, grid[stencil_sites[first + i]]])
        value = (value ^ digit) * _PRIME_0
        check = (check ^ digit) * _PRIME_1
    return _finish(value, _MIX_00, _MIX_01), _finish(check, _MIX_10, _MIX_11)


@numba.njit(cache=True, inline="always")
def token_key(grid, stencil_sites, first, n_sites, own_state, digit_of_content, weights, n_own_states, hashed):
    """(key, check) of one token: ``grid`` int64 [sites] of contents, its stencil sites at
    ``stencil_sites[first : first + n_sites]`` (``first = site * n_sites``), ``digit_of_content``
    the encoder's ``digit_array`` [S, contents]."""
    if hashed:
        return _hashed_token_key(grid, stencil_sites, first, n_sites, own_state, digit_of_content)
    code = 0
    for i in range(n_sites):
        code += digit_of_content[i, grid[stencil_sites[first + i]]] * weights[i]
    return own_state + n_own_states * code, 0


@numba.njit(cache=True)
def token_patch(grid, stencil_sites, first, n_sites, own_state, digit_of_content, out):
    """Write one token's patch (own state, then its site digits) into ``out`` int8 [1 + S]."""
    out[0] = own_state
    for i in range(n_sites):
        out[1 + i] = digit_of_content[i, grid[stencil_sites[first + i]]]


def patch_configurations(encoder: "EnvironmentEncoder", lattice: System, patch_rows: np.ndarray, batch_size: int = 4096,
                         sites_per_call: int = 1 << 22, padded: bool = False) -> Iterator[tuple]:
    """(rows, positions [B, T, 2], states [B, T], centre token) per batch of patches of equal token count
    (or, ``padded``, filled to one).

    Each patch is placed alone, centred at (Lx // 2, Ly // 2) of an empty lattice; active: the centre
    particle first, then the stencil's particles (an occupancy digit stands for orientation 0); fa:
    every site a token, spin 0 outside the stencil. Batches hold at most ``batch_size`` patches and,
    for fa (whose patches fill the lattice), about ``sites_per_call`` lattice sites. The environment
    table's evaluator and the locality certificate both place patches here, so they cannot drift apart.

    padded (active): batches of ``batch_size`` patches whatever their token counts (fewer, larger network
    calls: a small model's cost is per call), each patch filled up to its batch's largest count with
    tokens of state 0 on the site opposite the centre. That site lies outside the key's offsets, so a
    model whose rates depend on those offsets alone (a hard-local one, whose key family this is) gives
    the centre the same rates; where the lattice is too small for such a site, equal-count batches.
    """
    ly, lx = lattice.shape
    centre = np.array([lx // 2, ly // 2])
    sites = (centre + encoder.offset_array) % [lx, ly]  # [S, 2]
    content_of_digit = np.array([encoder.digit_of_content.index(digit) for digit in range(encoder.base)])
    patch_rows = np.asarray(patch_rows, np.int64)
    if isinstance(lattice, FASystem):
        per_call = max(1, min(batch_size, sites_per_call // (lx * ly)))
        every = np.stack(np.meshgrid(np.arange(lx), np.arange(ly)), -1).reshape(-1, 2)
        for start in range(0, len(patch_rows), per_call):
            rows = np.arange(start, min(start + per_call, len(patch_rows)))
            spins = np.zeros((len(rows), ly, lx), np.int64)
            spins[:, sites[:, 1], sites[:, 0]] = content_of_digit[patch_rows[rows, 1:]]
            spins[:, centre[1], centre[0]] = patch_rows[rows, 0]
            positions = np.broadcast_to(every, (len(rows), lx * ly, 2)).copy()
            yield rows, positions, spins.reshape(len(rows), -1), centre[1] * lx + centre[0]
        return
    # site contents (0 empty, 1 + state) of the stencil, then of the counted sites outside it (a counted
    # particle stands for orientation 0: a count family's rates depend on the count alone there)
    stencil = encoder.n_stencil
    outside = [stencil + i for i, offset in enumerate(encoder.offsets[stencil:]) if offset not in encoder.offsets[:stencil]]
    contents = np.concatenate([content_of_digit[patch_rows[:, 1 : 1 + stencil]], patch_rows[:, [1 + i for i in outside]]], axis=1)
    sites = sites[list(range(stencil)) + outside]
    occupied = contents > 0
    counts = occupied.sum(1)
    far = (centre + [lx // 2, ly // 2]) % [lx, ly]
    if padded and not ((sites == far).all(1).any() or (centre == far).all()):
        yield from _padded_patches(patch_rows, contents, occupied, counts, sites, centre, far, batch_size)
        return
    for count in np.unique(counts):
        group = np.flatnonzero(counts == count)
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            site_index = np.nonzero(occupied[rows])[1].reshape(len(rows), count)
            positions = np.concatenate([np.broadcast_to(centre, (len(rows), 1, 2)), sites[site_index]], axis=1)
            neighbour_states = np.take_along_axis(contents[rows], site_index, 1) - 1
            yield rows, positions, np.concatenate([patch_rows[rows, :1], neighbour_states], axis=1), 0


def _padded_patches(patch_rows, contents, occupied, counts, sites, centre, far, batch_size: int) -> Iterator[tuple]:
    """Batches of patches in order of token count, each filled to its largest count with tokens on ``far``."""
    order = np.argsort(counts, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(counts[rows].max())
        columns = np.argsort(~occupied[rows], axis=1, kind="stable")[:, :width]  # each patch's particles first
        present = np.take_along_axis(occupied[rows], columns, 1)
        positions = np.concatenate([np.broadcast_to(centre, (len(rows), 1, 2)),
                                    np.where(present[..., None], sites[columns], far)], axis=1)  # fmt: skip
        neighbour_states = np.where(present, np.take_along_axis(contents[rows], columns, 1) - 1, 0)
        yield rows, positions, np.concatenate([patch_rows[rows, :1], neighbour_states], axis=1), 0
