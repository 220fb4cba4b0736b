"""Environment tables in memory: key -> log-rates of every move, filled by any rate model (DESIGN 1.6).

    encoder = make_encoder("vn1", system)
    model = true_rate_model(system)                              # or a trained transformer
    evaluator = PatchEvaluator(model, model_lattice(model, system))
    table = EnvironmentTable(encoder, evaluator.header_for(encoder, original_rates_identity(system)))
    table.fill(evaluator, patches)                               # first sight of keys: one batched call
    entries = table.lookup(keys, checks)                         # -1 where not yet in the table
    log_rates = TableRates(table, evaluator, system)(positions, states)  # the table as a rate model

An entry is a function of its key alone: the key's patch (own state and stencil digits) is placed
alone on an otherwise empty lattice of the model's own size (the training lattice of a checkpoint,
the system of the original rates), and the centre token's log-rates are read off. So one table
serves a lattice of any size. Whether the model *is* local is a separate question: the table engine
audits a fraction of its lookups against the model in full context.

Arrays (capacity-sized, the first ``size`` rows valid): keys int64 [K], checks int64 [K] (second hash
of hashed keys), patches int8 [K, 1 + S], log_rates float64 [K, M], rates float64 [K, M] (exp),
totals float64 [K] (sum over moves), blocked_totals float64 [K] (rate of the moves onto occupied
sites: a particle's hop targets are stencil sites, so this too is a function of the key),
sightings int64 [K], classes int16 [K, M] (the model's class or move type of each move when it has
them, else -1). Lookups from numba (``find_entry``) go through ``direct`` (entry per key, for exact
families of at most 2^22 keys) or an open-addressing index ``slots`` (entry or -1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numba
import numpy as np
import torch

from hpcdyn.physics.environments import (
    EnvironmentEncoder,
    all_patches,
    keys_of_patches,
    patch_configurations,
    patches,
)
from hpcdyn.physics.systems import SYSTEMS, ActiveSystem, ConfigurationError, System
from hpcdyn.storage.environment_tables import (
    CollisionError,
    MergeReport,
    TableHeader,
    TableRows,
    read_table,
    write_part,
)

EMPTY = -1
COLLISION = -2
DIRECT_LIMIT = 1 << 22  # exact families with at most this many keys are looked up by direct address
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ----------------------------------------------------------------------------- compiled index
@numba.njit(cache=True, inline="always")
def home_slot(key, mask):
    # Fibonacci hashing: exact keys are consecutive integers, the top bits of key * golden spread them
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(32)) & mask


@numba.njit(cache=True, inline="always")
def find_entry(direct, slots, keys, checks, key, check):
    """Entry of (key, check), EMPTY if absent, COLLISION if the key is there with another check.

    ``direct`` (entry per key, for small exact families; else empty) skips the hashing.
    """
    if direct.shape[0] > 0:
        return direct[key]
    mask = slots.shape[0] - 1
    slot = home_slot(key, mask)
    while True:
        entry = slots[slot]
        if entry == EMPTY:
            return EMPTY
        if keys[entry] == key:
            return entry if checks[entry] == check else COLLISION
        slot = (slot + 1) & mask


@numba.njit(cache=True)
def _index_entries(slots, keys, start, stop):
    mask = slots.shape[0] - 1
    for entry in range(start, stop):
        slot = home_slot(keys[entry], mask)
        while slots[slot] != EMPTY:
            slot = (slot + 1) & mask
        slots[slot] = entry


@numba.njit(cache=True)
def _lookup_many(direct, slots, keys, checks, wanted, wanted_checks, out):
    for index in range(wanted.shape[0]):
        out[index] = find_entry(direct, slots, keys, checks, wanted[index], wanted_checks[index])


# ----------------------------------------------------------------------------- the table
class EnvironmentTable:
    """A growing key -> log-rates table of one rate model and one key family (see the module doc)."""

    def __init__(self, encoder: EnvironmentEncoder, header: TableHeader, capacity: int = 1024):
        if header.encoder != encoder.describe():
            raise ValueError(f"header: its encoder {header.encoder} is not {encoder.describe()}")
        self.encoder, self.header = encoder, header
        self.size = 0
        self.loaded_size = 0  # rows that came from disk: ``new_rows`` writes only the others
        small = not encoder.hashed and encoder.key_space <= DIRECT_LIMIT
        self.direct = np.full(encoder.key_space if small else 0, EMPTY, np.int64)
        self.target_digits = _target_digits(encoder)
        self._allocate(max(capacity, 16))
        self.loaded_sightings = np.zeros(0, np.int64)

    @property
    def n_moves(self) -> int:
        return self.header.n_moves

    def _allocate(self, capacity: int) -> None:
        names = ("keys", "checks", "patches", "log_rates", "rates", "totals", "blocked_totals", "sightings", "classes")
        old = {name: getattr(self, name, None) for name in names}
        width, moves = self.encoder.patch_width, self.n_moves
        self.keys = np.zeros(capacity, np.int64)
        self.checks = np.zeros(capacity, np.int64)
        self.patches = np.zeros((capacity, width), np.int8)
        self.log_rates = np.zeros((capacity, moves))
        self.rates = np.zeros((capacity, moves))
        self.totals = np.zeros(capacity)
        self.blocked_totals = np.zeros(capacity)
        self.sightings = np.zeros(capacity, np.int64)
        self.classes = np.full((capacity, moves), -1, np.int16)
        if old["keys"] is not None:
            for name, array in old.items():
                getattr(self, name)[: self.size] = array[: self.size]
        self.slots = np.full(1 << max(4, (2 * capacity - 1).bit_length()), EMPTY, np.int64)  # load <= 1/2
        _index_entries(self.slots, self.keys, 0, self.size)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(direct, slots, keys, checks, rates, log_rates, totals, blocked_totals, sightings) for compiled
        loops; fetch them again after a fill (they grow)."""
        return (self.direct, self.slots, self.keys, self.checks, self.rates, self.log_rates, self.totals,
                self.blocked_totals, self.sightings)  # fmt: skip

    def lookup(self, keys, checks) -> np.ndarray:
        """Entries int64 of (keys, checks), -1 where absent; raises on a hashed-key collision."""
        keys, checks = np.ascontiguousarray(keys, np.int64), np.ascontiguousarray(checks, np.int64)
        out = np.empty(keys.shape, np.int64)
        _lookup_many(self.direct, self.slots, self.keys, self.checks, keys.reshape(-1), checks.reshape(-1), out.reshape(-1))
        if (out == COLLISION).any():
            raise CollisionError(f"key family {self.encoder.name!r}: a hashed key stands for two environments")
        return out

    def insert(self, patches, log_rates, classes=None, sightings=None) -> np.ndarray:
        """Add rows for patches not yet in the table (keys from the patches); returns every patch's entry."""
        patches = np.asarray(patches, np.int8).reshape(-1, self.encoder.patch_width)
        keys, checks = keys_of_patches(self.encoder, patches)
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)
        new = first[self.lookup(keys[first], checks[first]) == EMPTY]
        if self.size + len(new) > len(self.keys):
            self._allocate(max(2 * len(self.keys), self.size + len(new)))
        rows = slice(self.size, self.size + len(new))
        log_rates = np.asarray(log_rates, np.float64).reshape(len(patches), self.n_moves)[new]
        self.keys[rows], self.checks[rows], self.patches[rows] = keys[new], checks[new], patches[new]
        self.log_rates[rows] = log_rates
        self.rates[rows] = np.exp(log_rates)
        self.totals[rows] = self.rates[rows].sum(1)
        self.blocked_totals[rows] = self._blocked_totals(patches[new], self.rates[rows])
        if classes is not None:
            self.classes[rows] = np.asarray(classes).reshape(len(patches), self.n_moves)[new]
        if sightings is not None:
            self.sightings[rows] = np.asarray(sightings, np.int64)[new]
        _index_entries(self.slots, self.keys, self.size, self.size + len(new))
        if len(self.direct):
            self.direct[keys[new]] = np.arange(rows.start, rows.stop)
        self.size += len(new)
        return self.lookup(keys, checks)

    def _blocked_totals(self, patches: np.ndarray, rates: np.ndarray) -> np.ndarray:
        """Rate of the moves onto occupied sites: a hop's target is a stencil site, occupied iff its digit > 0."""
        blocked = np.zeros(len(patches))
        for move, digit in enumerate(self.target_digits):
            if digit >= 0:
                blocked += np.where(patches[:, digit] > 0, rates[:, move], 0.0)
        return blocked

    def fill(self, evaluator: "PatchEvaluator", patches) -> np.ndarray:
        """Evaluate the patches not yet in the table in batched model calls, insert them; entries of all."""
        patches = np.asarray(patches, np.int8).reshape(-1, self.encoder.patch_width)
        keys, checks = keys_of_patches(self.encoder, patches)
        missing = np.flatnonzero(self.lookup(keys, checks) == EMPTY)
        if len(missing):
            _, first = np.unique(keys[missing], return_index=True)
            todo = patches[missing[first]]
            log_rates, classes = evaluator(self.encoder, todo)
            self.insert(todo, log_rates, classes)
        return self.lookup(keys, checks)

    def fill_all(self, evaluator: "PatchEvaluator", limit: int = 1 << 20) -> int:
        """Fill every key of a small exact family (vn1: 2,500 keys) in one pass; returns the count."""
        self.fill(evaluator, all_patches(self.encoder, limit))
        return self.size

    # ------------------------------------------------------------------------- rows and disk
    def rows(self, index=None) -> TableRows:
        index = np.arange(self.size) if index is None else np.asarray(index)
        has_classes = bool((self.classes[index] >= 0).any()) if len(index) else False
        return TableRows(self.keys[index].copy(), self.checks[index].copy(), self.patches[index].copy(),
                         self.log_rates[index].copy(), self.sightings[index].copy(),
                         self.classes[index].copy() if has_classes else None)  # fmt: skip

    def new_rows(self) -> TableRows:
        """Rows this process added or sighted since loading, with the sightings it added."""
        loaded = self.loaded_size
        delta = self.sightings[: self.size].copy()
        delta[:loaded] -= self.loaded_sightings
        index = np.flatnonzero((np.arange(self.size) >= loaded) | (delta > 0))
        rows = self.rows(index)
        rows.sightings = delta[index]
        return rows

    def save(self, path: str | Path, writer: str = "") -> Path | None:
        """Append this process's new keys and sightings as one part of the table at ``path``."""
        written = write_part(path, self.header, self.new_rows(), writer)
        self.loaded_size, self.loaded_sightings = self.size, self.sightings[: self.size].copy()
        return written

    @classmethod
    def load(cls, path: str | Path, encoder: EnvironmentEncoder, header: TableHeader) -> tuple["EnvironmentTable", MergeReport]:
        """The union of the table's parts; refuses a table of another model or key family."""
        _, rows, report = read_table(path, header)
        table = cls(encoder, header, capacity=2 * len(rows))
        if len(rows):
            table.insert(rows.patches, rows.log_rates, rows.classes, rows.sightings)
            keys, _ = keys_of_patches(encoder, rows.patches)
            if not np.array_equal(keys, rows.keys):
                raise ValueError(f"{path}: stored keys differ from the keys of the stored patches")
        table.loaded_size, table.loaded_sightings = table.size, table.sightings[: table.size].copy()
        return table, report

    @classmethod
    def open(cls, path: str | Path, encoder: EnvironmentEncoder, header: TableHeader) -> "EnvironmentTable":
        """Load the table at ``path`` if it exists, else start an empty one (saved there later)."""
        if Path(path).exists():
            return cls.load(path, encoder, header)[0]
        return cls(encoder, header)


def _target_digits(encoder: EnvironmentEncoder) -> np.ndarray:
    """int64 [n_moves]: the patch column of each move's target site, -1 for moves that stay put.

    Particles' hops must land inside the stencil (every registered family contains the four
    neighbours), so whether a move is blocked is a function of the key.
    """
    steps = SYSTEMS[encoder.system]().move_table
    columns = np.full(len(steps), -1, np.int64)
    if not issubclass(SYSTEMS[encoder.system], ActiveSystem):  # particles (active, quorum) hop onto sites
        return columns
    for move, (dx, dy, _) in enumerate(steps.tolist()):
        if (dx, dy) == (0, 0):
            continue
        if (dx, dy) not in encoder.offsets:
            raise ConfigurationError(f"key family {encoder.name!r}: its stencil must contain every hop target, {(dx, dy)} is missing")
        columns[move] = 1 + encoder.offsets.index((dx, dy))
    return columns


# ----------------------------------------------------------------------------- filling
def model_lattice(model, system: System) -> System:
    """The lattice a rate model runs on: its own system (original rates) or its training size."""
    own = getattr(model, "system", None)
    if own is not None:
        return own
    size = getattr(getattr(model, "config", None), "lattice_size", None)
    if size is None or size == system.L:
        return system
    extra = {"N": 1} if isinstance(system, ActiveSystem) else {}
    return dataclasses.replace(system, L=size, **extra)


def _model_classes(model, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor | None:
    """Class of every move when the model has classes (Mode 2) or move types (original rates)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "mode", 1) == 2 and hasattr(model, "move_classes"):
        return model.move_classes(positions, states)
    if config is None and hasattr(model, "move_types"):
        return model.move_types(positions, states)
    return None


class PatchEvaluator:
    """Log-rates of patches: each placed alone, centred, on an empty lattice of the model's size.

    ``lattice`` is that lattice (``model_lattice`` by default). Patches are evaluated in batches of
    equal token count (active: the centre particle first, then the stencil's particles; fa: every
    site), at most ``batch_size`` per call and about 2^22 lattice sites per call.
    """

    def __init__(self, model, lattice: System, batch_size: int = 4096, device: str | torch.device | None = None):
        self.model, self.lattice = model, lattice
        self.batch_size = batch_size
        if device is None:
            parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            device = parameter.device if parameter is not None else "cpu"
        self.device = torch.device(device)
        self.calls = 0
        self.patches_evaluated = 0

    def header_for(self, encoder: EnvironmentEncoder, model_identity: str) -> TableHeader:
        return TableHeader(model_identity, encoder.describe(), self.lattice.move_names, self.lattice.shape)

    def __call__(self, encoder: EnvironmentEncoder, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(log_rates float64 [K, M], classes int16 [K, M] or None) of patches int8 [K, 1 + S]."""
        from hpcdyn.physics.environments import check_fits

        check_fits(encoder, self.lattice.shape)
        patches = np.asarray(patches, np.int64)
        log_rates = np.zeros((len(patches), self.lattice.n_moves))
        classes = np.full((len(patches), self.lattice.n_moves), -1, np.int16)
        has_classes = False
        for rows, positions, states, centre in self._configurations(encoder, patches):
            with torch.inference_mode():
                positions = torch.as_tensor(positions, device=self.device)
                states = torch.as_tensor(states, device=self.device)
                log_rates[rows] = self.model(positions, states)[:, centre].double().cpu().numpy()
                found = _model_classes(self.model, positions, states)
            if found is not None:
                classes[rows] = found[:, centre].cpu().numpy()
                has_classes = True
            self.calls += 1
        self.patches_evaluated += len(patches)
        return log_rates, (classes if has_classes else None)

    def _configurations(self, encoder, patches):
        """(rows, positions [B, T, 2], states [B, T], centre token) per batch of equal token count."""
        return patch_configurations(encoder, self.lattice, patches, self.batch_size, 1 << 22)


class TableRates(torch.nn.Module):
    """The table as a rate model (``hpcdyn.physics.rates.RateModel``) on ``system``'s lattice, any size.

    Each token's log-rates are its key's row; keys not in the table yet are filled by ``evaluator``
    first. So the path log-likelihood of a trajectory under the table, ``path_log_likelihood(log,
    TableRates(...))``, can be set against the network's: they agree when the model is local in the
    table's key family.
    """

    def __init__(self, table: EnvironmentTable, evaluator: PatchEvaluator, system: System):
        super().__init__()
        self.table, self.evaluator, self.system = table, evaluator, system
        self.n_moves = system.n_moves

    def forward(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Log-rates float64 [batch, n_tokens, n_moves] of configurations positions [batch, n_tokens, 2], states."""
        found = patches(self.table.encoder, self.system, positions.cpu().numpy(), states.cpu().numpy())
        keys, checks = keys_of_patches(self.table.encoder, found.reshape(-1, found.shape[-1]))
        entries = self.table.lookup(keys, checks)
        if (entries == EMPTY).any():
            entries = self.table.fill(self.evaluator, found.reshape(-1, found.shape[-1]))
        return torch.as_tensor(self.table.log_rates[entries.reshape(found.shape[:2])], device=positions.device)


def log_rate_difference(table_values: np.ndarray, model_values: np.ndarray) -> np.ndarray:
    """|delta log-rate| elementwise, 0 where both are -inf, inf where only one is."""
    same = table_values == model_values
    with np.errstate(invalid="ignore"):
        return np.where(same, 0.0, np.abs(table_values - model_values))

