"""Templates for a target stoichiometry: which templates can host a formula, and generator vectors
conditioned so that every decoded template can.

Infill (``lib.infill``) gives each ASU site one element, and the site's whole Wyckoff orbit gets
it, so a template's compositions are sums of its site multiplicities. A template is **usable**
for a formula (reduced element counts ``c_e``) when its sites can be split into one group per
element whose multiplicities sum to ``Z * c_e`` for one integer ``Z >= 1`` (every site gets an
element, every element at least one site). ``Z`` is fixed by the template: ``Z = N / sum(c)``
with ``N`` the atoms of the cell, so usability is a multi-way partition of the (few) site
multiplicities, solved once per distinct sorted multiplicity tuple (:func:`site_partition`).

Conditioning (:func:`condition_on_formula`) works on generator vectors (``lib.encoding``
layout) before decoding:

1. the space group: the vector's own group when it can host the formula with at most
   ``max_sites`` ASU sites, ``max_atoms`` atoms and ``Z <= max_z`` (:func:`feasible_spacegroups`),
   else the feasible group with the highest score in the vector's space-group block (ties: the
   training prior, when given, then the lower number). :func:`sample_for_formula` avoids the
   replacement altogether: it samples the groups from the model's prior restricted to the
   feasible ones (``lib.gan.sample_vectors(space_groups=...)``) and then fixes the letters;
2. the sites: among the group's feasible *canonical* site assignments (present sites first,
   letter indices non-decreasing, no zero-freedom position twice, multiplicities that can host
   the formula; :func:`letter_configurations`, enumerated once per group and cached) the one
   that maximises the generator's own scores, ``sum over slots j`` of the slot's letter one-hot
   value at the chosen letter plus ``(presence_j - 0.5)`` for a present slot ``j >= 1`` and
   ``(0.5 - presence_j)`` for an absent one. Canonical order is the order of every training
   vector (``lib.encoding``: sites sorted by letter index), so slot ``j``'s scores are read as the
   generator learned them; 89 % of the demo checkpoint's raw samples are already canonical.
   Vectorised: one (samples x configurations) score matrix per space group; a group with more
   than ``MAX_CONFIGURATIONS`` configurations (Pmmm with 8 sites) is solved exactly by dynamic
   programming over the slots instead (:func:`best_configuration_dp`). With ``filters``, the
   best-scoring of the ``max_tries`` best configurations whose decoding passes the decoder's
   geometric filters is taken (:func:`geometry_ok`; DP groups: the best one only);
3. the chosen space group, presence flags and letters are written back as exact one-hots.
   Coordinates and the lattice block are untouched: ``lib.templates.decode_templates`` decodes
   the result unchanged (it projects the coordinates onto the chosen positions, so symmetry
   stays exact) and every template it keeps is usable for the formula.

No Dagster, no environment reads; the enumeration tables are cached per process.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from lib import wyckoff
from lib.encoding import DEFAULT_SCHEMA, N_SPACEGROUPS, EncodingSchema, letter_counts, multiplicity_table

if TYPE_CHECKING:
    from lib.gan import WganModel
    from lib.templates import TemplateFilters

#: Largest number of canonical letter configurations enumerated for one space group; groups with
#: more (e.g. Pmmm with 8 ASU sites) are solved by dynamic programming instead (best choice only).
MAX_CONFIGURATIONS = 200_000


class TooManyConfigurations(ValueError):
    """More than the allowed number of configurations for one space group."""


# --------------------------------------------------------------------------- formulas
def formula_counts(formula: str) -> dict[str, int]:
    """Reduced integer element counts of a formula: ``"Ba2RuO4" -> {"Ba": 2, "Ru": 1, "O": 4}``,
    ``"Ba2Ru2O6" -> {"Ba": 1, "Ru": 1, "O": 3}``, ``"O2" -> {"O": 1}`` (pymatgen ``Composition``,
    divided by the greatest common divisor of the counts)."""
    from pymatgen.core import Composition
    from pymatgen.core.periodic_table import Element

    if not isinstance(formula, str) or not formula.strip():
        raise ValueError(f"formula must be a non-empty string, got {formula!r}")
    try:
        comp = Composition(formula.strip())
    except Exception as exc:  # pymatgen raises several types on junk
        raise ValueError(f"formula {formula!r} is not a chemical formula: {exc}") from exc
    if comp.num_atoms <= 0:
        raise ValueError(f"formula {formula!r} has no atoms")

    amounts = comp.get_el_amt_dict()
    unknown = [str(el) for el in amounts if not Element.is_valid_symbol(str(el))]
    if unknown:
        raise ValueError(f"formula {formula!r}: {unknown} are not elements")
    out: dict[str, int] = {}
    for el, amt in amounts.items():
        if amt <= 0 or abs(amt - round(amt)) > 1e-8:
            raise ValueError(f"formula {formula!r}: {el} has the non-integer (or non-positive) count {amt}")
        out[str(el)] = round(amt)
    g = math.gcd(*out.values())  # fully reduced, also for pymatgen's special cases (O2, H2O2)
    return {el: v // g for el, v in out.items()}


def _counts_tuple(formula: str | dict[str, int]) -> tuple[int, ...]:
    counts = formula_counts(formula) if isinstance(formula, str) else dict(formula)
    if not counts or any(int(v) < 1 for v in counts.values()):
        raise ValueError(f"element counts must be positive integers, got {counts}")
    return tuple(sorted((int(v) for v in counts.values()), reverse=True))


# --------------------------------------------------------------------------- partitions
def site_partition(multiplicities: Sequence[int], counts: Sequence[int], *, max_z: int | None = None
                   ) -> tuple[int, tuple[int, ...]] | None:
    """``(Z, element index of each site)`` splitting sites of these multiplicities into one group
    per element with sums ``Z * counts[e]``, or ``None`` when none exists (or ``Z`` would exceed
    ``max_z``). ``counts`` are the reduced element counts, in any fixed order."""
    mult = tuple(int(m) for m in multiplicities)
    cnt = tuple(int(c) for c in counts)
    if not mult or any(m < 1 for m in mult) or not cnt or any(c < 1 for c in cnt):
        raise ValueError(f"multiplicities and counts must be positive integers, got {mult} / {cnt}")
    order = sorted(range(len(mult)), key=lambda i: -mult[i])
    res = _partition_sorted(tuple(mult[i] for i in order), cnt, max_z)
    if res is None:
        return None
    z, assign_sorted = res
    assign = [0] * len(mult)
    for pos, i in enumerate(order):
        assign[i] = assign_sorted[pos]
    return z, tuple(assign)


@lru_cache(maxsize=65536)
def _partition_sorted(mult: tuple[int, ...], counts: tuple[int, ...], max_z: int | None
                      ) -> tuple[int, tuple[int, ...]] | None:
    """``site_partition`` for multiplicities sorted in decreasing order (depth-first search;
    elements with equal remaining capacity are tried once, sites are few)."""
    total, nf = sum(mult), sum(counts)
    if total % nf or len(mult) < len(counts):
        return None
    z = total // nf
    if max_z is not None and z > max_z:
        return None
    rem = [z * c for c in counts]
    assign = [-1] * len(mult)

    def dfs(i: int) -> bool:
        if i == len(mult):
            return all(r == 0 for r in rem)
        m = mult[i]
        # sites left (including this one) must be at least the elements still needing atoms
        if sum(1 for r in rem if r > 0) > len(mult) - i:
            return False
        tried: set[int] = set()
        for e, r in enumerate(rem):
            if r < m or r in tried:
                continue
            tried.add(r)
            rem[e] -= m
            assign[i] = e
            if dfs(i + 1):
                return True
            rem[e] += m
        return False

    return (z, tuple(assign)) if dfs(0) else None


def can_host(multiplicities: Sequence[int], counts: Sequence[int], *, max_z: int | None = None) -> bool:
    """Whether sites with these multiplicities can host a formula of these reduced counts."""
    return site_partition(multiplicities, counts, max_z=max_z) is not None


def _row_labels(df: pl.DataFrame, rows: np.ndarray, limit: int = 5) -> str:
    rows = np.asarray(rows)[:limit]
    if "template_id" in df.columns:
        ids = df["template_id"].gather(rows.tolist()).to_list()
        return ", ".join(f"row {r} ({t})" for r, t in zip(rows.tolist(), ids, strict=True))
    return ", ".join(f"row {r}" for r in rows.tolist())


def usable_for_formula(templates: pl.DataFrame, formula: str | dict[str, int], *, max_z: int | None = None
                       ) -> pl.Series:
    """Boolean Series (one per template row, named ``usable``): whether the row's
    ``multiplicities`` (list[int], the ``templates`` contract) can host ``formula`` for some
    integer ``Z >= 1`` (``Z <= max_z`` when given; ``Z`` is the template's atoms over the
    formula's). Columnar: rows are keyed by their sorted multiplicity tuple, each distinct tuple
    is solved once and the answers are mapped back.

    Raises ``ValueError`` naming the rows whose multiplicities are missing, empty or not positive.
    """
    counts = _counts_tuple(formula)
    if "multiplicities" not in templates.columns:
        raise ValueError(f"templates lack the 'multiplicities' column; columns: {templates.columns}")
    if templates.height == 0:
        return pl.Series("usable", [], dtype=pl.Boolean)
    col = templates["multiplicities"]
    bad = (col.is_null() | (col.list.len().fill_null(0) == 0) | (col.list.min().fill_null(0) < 1)).to_numpy()
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{rows.size} template rows have missing, empty or non-positive multiplicities: "
                         f"{_row_labels(templates, rows)}")
    lens = col.list.len().to_numpy().astype(np.int64)
    flat = col.explode().cast(pl.Int64).to_numpy()
    row = np.repeat(np.arange(templates.height), lens)
    pos = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
    padded = np.zeros((templates.height, int(lens.max())), dtype=np.int64)
    padded[row, pos] = flat
    padded = -np.sort(-padded, axis=1)  # each row's multiplicities, decreasing, zero padded
    uniq, inverse = np.unique(padded, axis=0, return_inverse=True)
    answers = np.array([_partition_sorted(tuple(int(v) for v in u if v > 0), counts, max_z) is not None
                        for u in uniq], dtype=bool)
    return pl.Series("usable", answers[inverse.reshape(-1)], dtype=pl.Boolean)


# --------------------------------------------------------------------------- feasible groups
@lru_cache(maxsize=1)
def _letter_dofs() -> np.ndarray:
    """(231, 27) degrees of freedom of each group's letter index (-1 where none)."""
    out = np.full((N_SPACEGROUPS + 1, wyckoff.MAX_WYCKOFF_LETTERS), -1, dtype=np.int64)
    for sg in range(1, N_SPACEGROUPS + 1):
        for i, letter in enumerate(wyckoff.letters(sg)):
            out[sg, i] = wyckoff.position(sg, letter).dof
    return out


def _letters_by_multiplicity(sg: int) -> dict[int, tuple[list[int], list[int]]]:
    """multiplicity -> (letter indices with free parameters, zero-freedom letter indices)."""
    n = int(letter_counts()[sg])
    mult = multiplicity_table()[sg, :n]
    dof = _letter_dofs()[sg, :n]
    out: dict[int, tuple[list[int], list[int]]] = {}
    for i in range(n):
        free, fixed = out.setdefault(int(mult[i]), ([], []))
        (free if dof[i] > 0 else fixed).append(i)
    return out


@lru_cache(maxsize=8192)
def multiplicity_multisets(sg: int, counts: tuple[int, ...], max_sites: int, max_atoms: int,
                           max_z: int | None) -> tuple[tuple[int, ...], ...]:
    """Sorted (decreasing) multiplicity tuples of ``len(counts)..max_sites`` sites of group ``sg``
    that can host the counts with ``Z <= max_z`` and at most ``max_atoms`` atoms. A multiplicity
    is used at most as often as the group has zero-freedom positions of it, unless one of its
    positions has a free parameter."""
    by_m = _letters_by_multiplicity(sg)
    values = sorted(by_m, reverse=True)
    caps = [max_sites if by_m[m][0] else len(by_m[m][1]) for m in values]
    nf = sum(counts)
    limit = max_atoms if max_z is None else min(max_atoms, max_z * nf)
    out: list[tuple[int, ...]] = []

    def rec(vi: int, chosen: list[int], total: int) -> None:
        if len(chosen) >= len(counts) and total % nf == 0 and \
                _partition_sorted(tuple(chosen), counts, max_z) is not None:
            out.append(tuple(chosen))
        if len(chosen) == max_sites:
            return
        for vj in range(vi, len(values)):
            m = values[vj]
            if total + m > limit or chosen.count(m) >= caps[vj]:
                continue
            chosen.append(m)
            rec(vj, chosen, total + m)
            chosen.pop()

    rec(0, [], 0)
    return tuple(out)


def feasible_spacegroups(formula: str | dict[str, int], max_sites: int = 4, max_atoms: int = 100,
                         max_z: int | None = 4) -> np.ndarray:
    """Space groups (sorted int array) with at least one choice of at most ``max_sites`` Wyckoff
    positions (no zero-freedom position twice) whose multiplicities can host ``formula`` with
    ``Z <= max_z`` and at most ``max_atoms`` atoms."""
    counts = _counts_tuple(formula)
    if max_sites < 1 or max_atoms < 1 or (max_z is not None and max_z < 1):
        raise ValueError(f"max_sites, max_atoms and max_z must be positive, got {max_sites}, {max_atoms}, {max_z}")
    return np.array([sg for sg in range(1, N_SPACEGROUPS + 1)
                     if multiplicity_multisets(sg, counts, max_sites, max_atoms, max_z)], dtype=np.int64)


@lru_cache(maxsize=4096)
def letter_configurations(sg: int, counts: tuple[int, ...], max_sites: int, max_atoms: int,
                          max_z: int | None, limit: int = MAX_CONFIGURATIONS) -> np.ndarray:
    """(C, max_sites) int64: every feasible canonical site assignment of group ``sg``: letter
    indices non-decreasing in the first ``s`` slots, ``-1`` (absent) after; no zero-freedom
    letter twice; the multiplicities can host ``counts`` (``multiplicity_multisets``).
    Raises :class:`TooManyConfigurations` beyond ``limit``."""
    by_m = _letters_by_multiplicity(sg)
    rows: set[tuple[int, ...]] = set()
    for ms in multiplicity_multisets(sg, counts, max_sites, max_atoms, max_z):
        per_value = []
        for m in sorted(set(ms)):
            r = ms.count(m)
            free, fixed = by_m[m]
            opts = [c for c in itertools.combinations_with_replacement(sorted(free + fixed), r)
                    if all(c.count(f) <= 1 for f in fixed)]
            per_value.append(opts)
        for combo in itertools.product(*per_value):
            letters = sorted(itertools.chain.from_iterable(combo))
            rows.add(tuple(letters) + (-1,) * (max_sites - len(letters)))
            if len(rows) > limit:
                raise TooManyConfigurations(
                    f"space group {sg}: more than {limit} site configurations for counts {counts} with "
                    f"max_sites={max_sites}, max_z={max_z}")
    if not rows:
        return np.zeros((0, max_sites), dtype=np.int64)
    return np.array(sorted(rows), dtype=np.int64)


@lru_cache(maxsize=4096)
def _configurations_or_none(sg: int, counts: tuple[int, ...], max_sites: int, max_atoms: int,
                            max_z: int | None) -> np.ndarray | None:
    try:
        return letter_configurations(sg, counts, max_sites, max_atoms, max_z)
    except TooManyConfigurations:
        return None


@dataclass(frozen=True)
class _DpTables:
    """Dynamic-programming tables of one (group, counts, limits): states are multiplicity count
    vectors that are sub-multisets of a feasible multiset (index 0 = empty)."""

    letter_value: np.ndarray  # (Lg,) index of each letter's multiplicity among the group's values
    letter_free: np.ndarray  # (Lg,) the position has free parameters (may repeat)
    next_state: np.ndarray  # (n_states, n_values) state after adding one site of that value, -1 none
    prev_state: np.ndarray  # (n_states, n_values) state before, -1 none
    final: np.ndarray  # (n_states,) the count vector is a feasible multiset


@lru_cache(maxsize=1024)
def _dp_tables(sg: int, counts: tuple[int, ...], max_sites: int, max_atoms: int, max_z: int | None) -> _DpTables:
    n = int(letter_counts()[sg])
    mult = multiplicity_table()[sg, :n]
    dof = _letter_dofs()[sg, :n]
    values = sorted({int(m) for m in mult})
    vidx = {m: i for i, m in enumerate(values)}
    finals: set[tuple[int, ...]] = set()
    states: set[tuple[int, ...]] = set()
    for ms in multiplicity_multisets(sg, counts, max_sites, max_atoms, max_z):
        cv = [0] * len(values)
        for m in ms:
            cv[vidx[m]] += 1
        finals.add(tuple(cv))
        states.update(itertools.product(*(range(c + 1) for c in cv)))
    order = sorted(states, key=lambda c: (sum(c), c))
    index = {c: i for i, c in enumerate(order)}
    nxt = np.full((len(order), len(values)), -1, dtype=np.int64)
    prv = np.full((len(order), len(values)), -1, dtype=np.int64)
    for i, c in enumerate(order):
        for v in range(len(values)):
            up = (*c[:v], c[v] + 1, *c[v + 1:])
            nxt[i, v] = index.get(up, -1)
            if c[v] > 0:
                prv[i, v] = index[(*c[:v], c[v] - 1, *c[v + 1:])]
    return _DpTables(np.array([vidx[int(m)] for m in mult], dtype=np.int64), dof > 0, nxt, prv,
                     np.array([c in finals for c in order], dtype=bool))


def best_configuration_dp(table: np.ndarray, sg: int, counts: tuple[int, ...], max_sites: int, max_atoms: int,
                          max_z: int | None) -> np.ndarray:
    """(B, max_sites) best-scoring feasible canonical configuration of each row by dynamic
    programming over the slots (state: multiplicities used so far, last letter), for groups with
    too many configurations to enumerate. ``table`` (B, max_sites, n_letters + 1): the score of
    each letter in each slot, last column = the slot left absent. Exact: the same best score as
    scoring every configuration of :func:`letter_configurations`."""
    tabs = _dp_tables(sg, counts, max_sites, max_atoms, max_z)
    B, S = table.shape[0], max_sites
    Lg = int(tabs.letter_value.size)
    ns = int(tabs.final.size)
    T = table[:, :, :Lg]
    absent = table[:, :, -1]
    suffix = np.zeros((B, S + 1))
    suffix[:, 1:S] = np.cumsum(absent[:, :0:-1], axis=1)[:, ::-1]  # suffix[:, s] = sum_{j >= s} absent
    neg = -np.inf
    V = np.full((B, ns, Lg), neg)
    back = np.zeros((S, B, ns, Lg), dtype=np.int16)
    src = [np.flatnonzero(tabs.next_state[:, tabs.letter_value[lt]] >= 0) for lt in range(Lg)]
    tgt = [tabs.next_state[src[lt], tabs.letter_value[lt]] for lt in range(Lg)]
    for lt in range(Lg):
        t0 = tabs.next_state[0, tabs.letter_value[lt]]
        if t0 >= 0:
            V[:, t0, lt] = T[:, 0, lt]
    best_val = np.full(B, neg)
    best_len = np.zeros(B, dtype=np.int64)
    best_state = np.zeros(B, dtype=np.int64)
    best_letter = np.zeros(B, dtype=np.int64)
    rows = np.arange(B)

    def terminate(V: np.ndarray, length: int) -> None:
        vals = np.where(tabs.final[None, :, None], V, neg).reshape(B, -1)
        a = np.argmax(vals, axis=1)
        v = vals[rows, a] + suffix[:, length]
        better = v > best_val
        best_val[better] = v[better]
        best_len[better] = length
        best_state[better] = a[better] // Lg
        best_letter[better] = a[better] % Lg

    terminate(V, 1)
    for j in range(1, S):
        new = np.full_like(V, neg)
        run_val = np.full((B, ns), neg)
        run_arg = np.zeros((B, ns), dtype=np.int16)
        for lt in range(Lg):
            cur = V[:, :, lt]
            if tabs.letter_free[lt]:  # a position with free parameters may follow itself
                take = cur > run_val
                cand_val, cand_arg = np.where(take, cur, run_val), np.where(take, lt, run_arg)
            else:
                cand_val, cand_arg = run_val, run_arg
            new[:, tgt[lt], lt] = cand_val[:, src[lt]] + T[:, j, lt][:, None]
            back[j][:, tgt[lt], lt] = cand_arg[:, src[lt]]
            take = cur > run_val
            run_val = np.where(take, cur, run_val)
            run_arg = np.where(take, lt, run_arg)
        V = new
        terminate(V, j + 1)
    choice = np.full((B, S), -1, dtype=np.int64)
    state, letter = best_state.copy(), best_letter.copy()
    for j in range(S - 1, -1, -1):
        r = np.flatnonzero(best_len > j)
        if r.size == 0:
            continue
        choice[r, j] = letter[r]
        if j > 0:
            prev_letter = back[j][r, state[r], letter[r]].astype(np.int64)
            state[r] = tabs.prev_state[state[r], tabs.letter_value[letter[r]]]
            letter[r] = prev_letter
    return choice


# --------------------------------------------------------------------------- conditioning
@dataclass
class ConditioningStats:
    """What :func:`condition_on_formula` changed (counts over samples / sites)."""

    formula: str
    counts: dict[str, int]
    n_samples: int
    n_feasible_spacegroups: int
    n_spacegroup_replaced: int = 0  # the vector's own group could not host the formula
    n_samples_changed: int = 0  # decoded group, presence or a letter differs from the raw decoding
    n_letters_changed: int = 0  # sites present before and after whose letter changed
    n_sites_added: int = 0
    n_sites_removed: int = 0
    n_configurations: dict[int, int] = field(default_factory=dict)  # per space group used
    #: with ``filters``: samples whose chosen configuration is the r-th best (index r), and
    #: samples none of whose ``max_tries`` best configurations passed the geometry filters
    rank_chosen: list[int] = field(default_factory=list)
    n_geometry_failed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["n_configurations"] = {str(k): v for k, v in sorted(self.n_configurations.items())}
        return d


def condition_on_formula(x: np.ndarray, *, formula: str, schema: EncodingSchema = DEFAULT_SCHEMA,
                         max_atoms: int = 100, max_z: int | None = 4,
                         spacegroup_prior: np.ndarray | None = None, presence_threshold: float = 0.5,
                         filters: TemplateFilters | None = None, max_tries: int = 8) -> np.ndarray:
    """Generator vectors (n, dim) rewritten so that every template decoded from them can host
    ``formula`` (module docstring). Returns a new float32 array; ``x`` is not modified.

    ``filters`` (optional, ``lib.templates.TemplateFilters``): instead of the best-scoring
    configuration, take the best-scoring of the ``max_tries`` best that passes the decoder's
    geometric filters (cell, atom count, degenerate / overlapping orbits, minimum distance,
    density window; repairs are not tried), falling back to the best-scoring one when none does.
    """
    return condition_on_formula_with_stats(x, formula=formula, schema=schema, max_atoms=max_atoms, max_z=max_z,
                                           spacegroup_prior=spacegroup_prior,
                                           presence_threshold=presence_threshold, filters=filters,
                                           max_tries=max_tries)[0]


def _write_choice(x: np.ndarray, sg: np.ndarray, choice: np.ndarray, schema: EncodingSchema) -> np.ndarray:
    """``x`` with exact one-hots for the space groups ``sg`` (n,) and the sites ``choice`` (n, S)
    (letter index, -1 = absent); coordinates and lattice untouched."""
    out = x.copy()
    n = x.shape[0]
    L = schema.n_letters
    out[:, : schema.n_spacegroups] = 0.0
    out[np.arange(n), sg - 1] = 1.0
    for j in range(schema.max_sites):
        s = schema.site_slice(j).start
        present = choice[:, j] >= 0
        out[:, s] = present.astype(np.float32)
        out[:, s + 1: s + 1 + L] = 0.0
        out[np.flatnonzero(present), s + 1 + choice[present, j]] = 1.0
    return out


def geometry_ok(x: np.ndarray, *, schema: EncodingSchema = DEFAULT_SCHEMA,
                filters: TemplateFilters | None = None) -> np.ndarray:
    """(n,) bool: whether each vector's decoding passes the decoder's geometric filters (valid
    cell, at most ``max_atoms``, no degenerate or overlapping orbits, minimum distance, density
    window), computed with ``lib.templates``' own orbit expansion and distances, without repairs."""
    from lib.cells import lattice_matrices
    from lib.encoding import decode_vectors
    from lib.templates import TemplateFilters, expand_sites, periodic_distances

    f = filters or TemplateFilters()
    n = x.shape[0]
    raw = decode_vectors(x, schema=schema)
    lat = wyckoff.constrain_lattices(raw.sg, raw.lattice)
    vol = wyckoff.cell_volume(*(lat[:, i] for i in range(6)))
    ex = expand_sites(raw.sg, raw.present, raw.letter_index, raw.xyz)
    n_atoms = np.bincount(ex.atom_row, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        dens = n_atoms / vol
        ok = np.isfinite(vol) & (vol > 1e-3) & (n_atoms <= f.max_atoms) & (dens >= f.min_density_per_a3) & (
            dens <= f.max_density_per_a3)
    rows = np.flatnonzero(ok)
    if rows.size:
        d = periodic_distances(ex, lattice_matrices(lat), rows, coincidence_tol_a=f.coincidence_tol_a)
        ok[rows] = (d["min_distance_a"] >= f.min_distance_a) & ~d["degenerate"] & ~d["overlap"]
    return ok


def condition_on_formula_with_stats(
    x: np.ndarray, *, formula: str, schema: EncodingSchema = DEFAULT_SCHEMA, max_atoms: int = 100,
    max_z: int | None = 4, spacegroup_prior: np.ndarray | None = None, presence_threshold: float = 0.5,
    filters: TemplateFilters | None = None, max_tries: int = 8,
) -> tuple[np.ndarray, ConditioningStats]:
    """:func:`condition_on_formula` plus :class:`ConditioningStats`."""
    import time

    from lib.encoding import decode_vectors

    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != schema.dim:
        raise ValueError(f"vectors must be (n, {schema.dim}), got {x.shape}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    counts_d = formula_counts(formula)
    counts = _counts_tuple(counts_d)
    S = schema.max_sites
    feasible = feasible_spacegroups(counts_d, S, max_atoms, max_z)
    if feasible.size == 0:
        raise ValueError(f"no space group can host {formula} ({counts_d}) with at most {S} ASU sites, "
                         f"{max_atoms} atoms and Z <= {max_z}")
    n = x.shape[0]
    stats = ConditioningStats(formula=formula, counts=counts_d, n_samples=n, n_feasible_spacegroups=int(feasible.size))
    raw = decode_vectors(x, schema=schema, presence_threshold=presence_threshold)
    # space group: own group if feasible, else the best-scoring feasible group
    logits = x[:, : schema.n_spacegroups].astype(np.float64).copy()
    if spacegroup_prior is not None:
        prior = np.asarray(spacegroup_prior, dtype=np.float64)
        if prior.shape != (N_SPACEGROUPS,):
            raise ValueError(f"spacegroup_prior must have {N_SPACEGROUPS} entries, got {prior.shape}")
        logits += 1e-6 * prior / max(prior.max(), 1.0)  # breaks exact ties only
    mask = np.zeros(N_SPACEGROUPS, dtype=bool)
    mask[feasible - 1] = True
    logits[:, ~mask] = -np.inf
    sg = np.where(mask[raw.sg - 1], raw.sg, np.argmax(logits, axis=1) + 1)
    stats.n_spacegroup_replaced = int((sg != raw.sg).sum())

    L = schema.n_letters
    letters = np.stack([x[:, schema.site_slice(j).start + 1: schema.site_slice(j).start + 1 + L]
                        for j in range(S)], axis=1).astype(np.float64)  # (n, S, L)
    pres = np.stack([x[:, schema.site_slice(j).start] for j in range(S)], axis=1).astype(np.float64)  # (n, S)
    p_term = pres - presence_threshold
    p_term[:, 0] = 0.0  # slot 0 is always present
    absent = -p_term.copy()
    absent[:, 0] = -np.inf
    # table (n, S, L + 1): letter score + presence term; last column = the slot left absent
    table = np.concatenate([letters + p_term[:, :, None], absent[:, :, None]], axis=2)
    K = max_tries if filters is not None else 1
    ranked = np.full((n, K, S), -1, dtype=np.int64)
    n_ranked = np.zeros(n, dtype=np.int64)
    for g in np.unique(sg).tolist():
        rows = np.flatnonzero(sg == g)
        cfg = _configurations_or_none(int(g), counts, S, max_atoms, max_z)
        if cfg is None:  # too many to enumerate: exact best by dynamic programming, no ranking
            stats.n_configurations[int(g)] = -1
            n_ranked[rows] = 1
            dp_step = max(1, 20_000_000 // max(1, S * int(_dp_tables(int(g), counts, S, max_atoms, max_z).final.size)
                                                   * int(letter_counts()[g])))
            for start in range(0, rows.size, dp_step):
                rr = rows[start:start + dp_step]
                ranked[rr, 0] = best_configuration_dp(table[rr], int(g), counts, S, max_atoms, max_z)
            continue
        C = cfg.shape[0]
        stats.n_configurations[int(g)] = int(C)
        col = np.where(cfg < 0, L, cfg)  # (C, S) column of the table
        k = min(K, C)
        n_ranked[rows] = k
        step = max(1, 4_000_000 // max(1, C * S))
        for start in range(0, rows.size, step):
            rr = rows[start:start + step]
            score = np.zeros((rr.size, C))
            for j in range(S):
                score += table[rr, j][:, col[:, j]]
            if k == 1:
                top = np.argmax(score, axis=1)[:, None]
            else:
                part = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < C else np.tile(np.arange(C), (rr.size, 1))
                # best first; ties by configuration index (the argmax's choice)
                order = np.lexsort((part, -np.take_along_axis(score, part, axis=1)), axis=1)
                top = np.take_along_axis(part, order, axis=1)
            ranked[rr, :k] = cfg[top]

    choice = ranked[:, 0].copy()
    if filters is not None:
        chosen_rank = np.full(n, -1, dtype=np.int64)
        pending = np.arange(n)
        for r in range(K):
            pending = pending[n_ranked[pending] > r]
            if pending.size == 0:
                break
            trial = _write_choice(x[pending], sg[pending], ranked[pending, r], schema)
            ok = geometry_ok(trial, schema=schema, filters=filters)
            acc = pending[ok]
            choice[acc] = ranked[acc, r]
            chosen_rank[acc] = r
            pending = pending[~ok]
        stats.rank_chosen = np.bincount(chosen_rank[chosen_rank >= 0], minlength=K).tolist()
        stats.n_geometry_failed = int((chosen_rank < 0).sum())

    out = _write_choice(x, sg, choice, schema)
    new_present = choice >= 0
    both = raw.present & new_present
    stats.n_letters_changed = int((both & (raw.letter_index != choice)).sum())
    stats.n_sites_added = int((new_present & ~raw.present).sum())
    stats.n_sites_removed = int((raw.present & ~new_present).sum())
    changed = (sg != raw.sg) | np.any(raw.present != new_present, axis=1) | np.any(
        both & (raw.letter_index != choice), axis=1)
    stats.n_samples_changed = int(changed.sum())
    stats.seconds = time.perf_counter() - t0
    return out, stats


def sample_for_formula(model: WganModel, n: int, *, seed: int, formula: str, max_atoms: int = 100,
                       max_z: int | None = 4, filters: TemplateFilters | None = None, max_tries: int = 8
                       ) -> tuple[np.ndarray, ConditioningStats]:
    """``n`` vectors for ``formula``: space groups from the model's training prior restricted to
    :func:`feasible_spacegroups` (``lib.gan.sample_vectors``), then :func:`condition_on_formula`
    fixes presence and letters (``filters``/``max_tries`` as there). Seeded."""
    from lib.gan import sample_vectors

    feasible = feasible_spacegroups(formula, model.schema.max_sites, max_atoms, max_z)
    if feasible.size == 0:
        raise ValueError(f"no space group can host {formula} with at most {model.schema.max_sites} ASU sites, "
                         f"{max_atoms} atoms and Z <= {max_z}")
    x = sample_vectors(model, n, seed=seed, space_groups=feasible.tolist())
    return condition_on_formula_with_stats(x, formula=formula, schema=model.schema, max_atoms=max_atoms,
                                           max_z=max_z, spacegroup_prior=model.spacegroup_prior,
                                           filters=filters, max_tries=max_tries)
