"""Atom infill: crystal templates (space group + Wyckoff sites + lattice) -> candidates of a chemical system.

Each template's ASU sites receive elements of the system. Everything is columnar: for every
``(n_sites, site-permutation group)`` class one small *assignment table* (which element index each
site receives) is built once and exploded against all templates of that class with numpy index
arithmetic; formulas come from multiplicity x element-count matrices; strings, ids and
fingerprints are polars/numpy columns. No Python object is made per candidate; a structure is
rebuilt from a row only on demand (:func:`lib.cells.candidate_structures`).

Canonicalisation (assignments that give the same crystal are generated once):

1. *Site-permutation symmetry of the template.* The Euclidean-normalizer coset representatives of
   the space group (pyxtal's ``wyckoff_sets`` table, i.e. the Bilbao "Wyckoff sets") that keep the
   template's metric and map its set of sites onto itself (same Wyckoff letters after the
   normalizer's letter permutation, and coordinates landing on the image site's orbit) induce
   permutations of the ASU sites. Assignments ``s`` and ``s o p`` give congruent crystals, so only
   the lexicographically smallest of each orbit is kept (``n_folded_symmetry``). Example: CsCl-type
   ``Pm-3m 1a + 1b``: ``A:1a B:1b`` and ``B:1a A:1b`` differ by the origin shift (1/2,1/2,1/2).
2. *Structure fingerprint.* A 64-bit hash of an isometry- and scale-invariant description:
   space group, the sorted lattice shape (lengths / V^(1/3), angles) and, for every site, its
   element, multiplicity and the sorted list of (element, multiplicity, shortest distance /
   (V/N)^(1/3)) to every site orbit. Assignments of one template with equal fingerprints are
   folded too (``n_folded_fingerprint``); ``candidates_dedup`` uses the same column across
   templates.

Volume: ``volume_mode="template"`` keeps the template's lattice (the paper); ``"rescaled"`` scales
the cell isotropically to the composition's expected volume, ``1.1 x sum_i n_i (4/3) pi r_cov,i^3``
with pyxtal's covalent radii (``pyxtal.database.element``) and pyxtal's default volume factor 1.1
(its lower estimate for random crystals; BaRuO3 gives 12.8 A^3/atom vs 14.1 in mp-3597).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from lib import contracts, wyckoff
from lib.cells import atomic_number, lattice_matrices
from lib.ids import hash_column
from lib.wyckoff import LATTICE_COLUMNS

VolumeMode = Literal["template", "rescaled"]

#: pyxtal's default volume factor for random crystals (``pyxtal.crystal``).
VOLUME_FACTOR = 1.1

TEMPLATE_COLUMNS = (
    "template_id", "checkpoint_id", "spacegroup_number", "wyckoff_letters", "multiplicities",
    "asu_frac_coords", "a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg",
)

CANDIDATE_SCHEMA: dict[str, pl.DataType] = contracts.schema("candidates")

REJECT_SCHEMA: dict[str, pl.DataType] = contracts.schema("candidates_template_rejects")


# ----------------------------------------------------------------------------- chemical systems
def normalise_elements(elements: Sequence[str]) -> list[str]:
    """Validated, de-duplicated element symbols sorted alphabetically (``["Ru","Ba","O"]`` -> Ba, O, Ru)."""
    from pymatgen.core import Element

    out = sorted({str(e).strip() for e in elements})
    if not out:
        raise ValueError("a chemical system needs at least one element")
    for e in out:
        if not Element.is_valid_symbol(e):
            raise ValueError(f"unknown element symbol {e!r} in chemical system {list(elements)}")
    return out


def chemical_system(elements: Sequence[str]) -> str:
    """The chemical system string: elements sorted and joined by '-' (``Ba-O-Ru``)."""
    return "-".join(normalise_elements(elements))


def parse_chemical_system(chemsys: str) -> list[str]:
    """``"Ba-O-Ru"`` -> ``["Ba", "O", "Ru"]`` (validated)."""
    return normalise_elements([p for p in chemsys.replace(",", "-").split("-") if p])


# ----------------------------------------------------------------------------- results
@dataclass
class InfillResult:
    """Candidates of one infill call (or one batch) and what was folded or filtered on the way."""

    candidates: pl.DataFrame
    rejects: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=REJECT_SCHEMA))
    chemical_system: str = ""
    volume_mode: str = "template"
    n_templates: int = 0
    n_templates_filtered_max_atoms: int = 0
    n_templates_too_few_sites: int = 0
    n_templates_with_site_symmetry: int = 0
    n_assignments: int = 0  # allowed assignments before any folding
    n_folded_symmetry: int = 0
    n_folded_fingerprint: int = 0
    seconds: float = 0.0

    @property
    def n_candidates(self) -> int:
        return self.candidates.height

    @property
    def n_rejected(self) -> int:
        return self.rejects.height

    def counts(self) -> dict[str, int | float | str]:
        return _infill_counts(self)


def _infill_counts(r: InfillResult | InfillTotals) -> dict[str, int | float | str]:
    """The counts an infill run reports (one batch or the running totals of a stream)."""
    return {
        "chemical_system": r.chemical_system,
        "volume_mode": r.volume_mode,
        "n_templates": r.n_templates,
        "n_templates_rejected": r.n_rejected,
        "n_templates_filtered_max_atoms": r.n_templates_filtered_max_atoms,
        "n_templates_too_few_sites": r.n_templates_too_few_sites,
        "n_templates_with_site_symmetry": r.n_templates_with_site_symmetry,
        "n_assignments": r.n_assignments,
        "n_folded_symmetry": r.n_folded_symmetry,
        "n_folded_fingerprint": r.n_folded_fingerprint,
        "n_candidates": r.n_candidates,
        "seconds": round(r.seconds, 3),
    }


@dataclass
class InfillTotals:
    """Running totals over streamed batches (see :func:`iter_infill`)."""

    chemical_system: str = ""
    volume_mode: str = "template"
    n_templates: int = 0
    n_rejected: int = 0
    n_templates_filtered_max_atoms: int = 0
    n_templates_too_few_sites: int = 0
    n_templates_with_site_symmetry: int = 0
    n_assignments: int = 0
    n_folded_symmetry: int = 0
    n_folded_fingerprint: int = 0
    n_candidates: int = 0
    seconds: float = 0.0
    rejects: list[pl.DataFrame] = field(default_factory=list)

    def add(self, r: InfillResult) -> None:
        self.chemical_system, self.volume_mode = r.chemical_system, r.volume_mode
        for k in ("n_templates", "n_templates_filtered_max_atoms", "n_templates_too_few_sites",
                  "n_templates_with_site_symmetry", "n_assignments", "n_folded_symmetry",
                  "n_folded_fingerprint", "n_candidates", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(r, k))
        self.n_rejected += r.n_rejected
        if r.n_rejected:
            self.rejects.append(r.rejects)

    def counts(self) -> dict[str, int | float | str]:
        return _infill_counts(self)

    def rejects_frame(self) -> pl.DataFrame:
        return pl.concat(self.rejects) if self.rejects else pl.DataFrame(schema=REJECT_SCHEMA)


# ----------------------------------------------------------------------------- geometry helpers
_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)  # (27, 3)


@dataclass(frozen=True)
class Sites:
    """Templates exploded to one row per ASU site, as numpy arrays."""

    n_sites: np.ndarray  # (T,)
    offsets: np.ndarray  # (T+1,)
    sg: np.ndarray  # (M,)
    letter: np.ndarray  # (M,) str
    letter_idx: np.ndarray  # (M,) index into lib.wyckoff.letters(sg)
    mult: np.ndarray  # (M,)
    xyz: np.ndarray  # (M, 3), projected onto the position's representative form
    owner: np.ndarray  # (M,) template index
    pos: np.ndarray  # (M,) index within the template
    lattice: np.ndarray  # (T, 3, 3)

    @property
    def nmax(self) -> int:
        return int(self.n_sites.max()) if self.n_sites.size else 0

    def padded(self, values: np.ndarray, fill) -> np.ndarray:
        """Per-site values as a (T, nmax, ...) array padded with ``fill``."""
        out = np.full((self.n_sites.size, self.nmax, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.owner, self.pos] = values
        return out


def letter_indices(sg: np.ndarray, letter: np.ndarray) -> np.ndarray:
    """Index of each (space group, letter) in ``lib.wyckoff.letters(sg)``; -1 when unknown."""
    table = pl.DataFrame({"sg": sg.astype(np.int64), "letter": letter.astype(str)}).with_row_index("_i")
    needed = set(np.unique(sg).tolist())
    rows = [(s, let, i) for s in needed for i, let in enumerate(wyckoff.letters(int(s)))]
    known = pl.DataFrame(rows, schema={"sg": pl.Int64, "letter": pl.String, "letter_idx": pl.Int64}, orient="row")
    out = table.join(known, on=["sg", "letter"], how="left").sort("_i")["letter_idx"].fill_null(-1)
    return out.to_numpy()


def group_rows(*keys: np.ndarray):
    """Yield (key tuple, row indices) for every distinct combination of integer key arrays."""
    if keys[0].size == 0:
        return
    order = np.lexsort(keys[::-1])
    stacked = np.stack([k[order] for k in keys], axis=1)
    change = np.flatnonzero(np.any(stacked[1:] != stacked[:-1], axis=1)) + 1
    bounds = np.concatenate([[0], change, [order.size]])
    for lo, hi in itertools.pairwise(bounds):
        yield tuple(int(x) for x in stacked[lo]), order[lo:hi]


def explode_sites(tpl: pl.DataFrame) -> Sites:
    if "wyckoff_letters" not in tpl.columns and "asu_letters" in tpl.columns:
        tpl = tpl.rename({"asu_letters": "wyckoff_letters"})
    n = tpl["wyckoff_letters"].list.len().to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)])
    owner = np.repeat(np.arange(tpl.height), n)
    pos = np.arange(offsets[-1]) - offsets[owner]
    sg = tpl["spacegroup_number"].to_numpy().astype(np.int64)[owner]
    letter = tpl["wyckoff_letters"].explode().to_numpy().astype(str)
    lidx = letter_indices(sg, letter)
    if "multiplicities" in tpl.columns:
        mult = tpl["multiplicities"].explode().to_numpy().astype(np.int64)
    else:  # candidate rows: multiplicities follow from the letters
        mult = np.zeros(sg.size, dtype=np.int64)
        for (s, li), rows in group_rows(sg, lidx):
            mult[rows] = wyckoff.position(s, wyckoff.letters(s)[li]).multiplicity
    xyz = tpl["asu_frac_coords"].explode().list.to_array(3).to_numpy().astype(float).reshape(-1, 3)
    lat = lattice_matrices(np.stack([tpl[c].to_numpy() for c in LATTICE_COLUMNS], axis=1))
    xyz = xyz.copy()
    for (s, li), rows in group_rows(sg, lidx):
        wp = wyckoff.position(s, wyckoff.letters(s)[li])
        xyz[rows] = wp.project(xyz[rows])
    return Sites(n, offsets, sg, letter, lidx, mult, xyz, owner, pos, lat)


def _orbit_min_distance(
    sites: Sites, i: np.ndarray, j: np.ndarray, points: np.ndarray | None = None, *,
    images: bool, exclude_self: bool, max_points: int = 4_000_000,
) -> np.ndarray:
    """Shortest distance (Å) from ``points`` (default: site ``i``'s representative) to site ``j``'s orbit.

    ``images=False`` takes the nearest image of each fractional difference (exact for
    near-orthogonal cells, an isometry-invariant upper bound otherwise); ``images=True`` also tries
    the 26 neighbouring cells. ``exclude_self`` ignores zero distances (a point to its own orbit).
    """
    pts = sites.xyz[i] if points is None else points
    out = np.full(i.size, np.inf)
    for (s, li), rows in group_rows(sites.sg[j], sites.letter_idx[j]):
        wp = wyckoff.position(s, wyckoff.letters(s)[li])
        per = wp.multiplicity * (27 if images else 1)
        step = max(1, max_points // per)
        for lo in range(0, rows.size, step):
            rr = rows[lo:lo + step]
            jj, ii = j[rr], i[rr]
            orbit = np.einsum("mab,pb->pma", wp.rot, sites.xyz[jj]) + wp.trans[None]
            diff = orbit - pts[rr][:, None, :]
            diff -= np.rint(diff)
            lat = sites.lattice[sites.owner[ii]]
            cart = np.einsum("pma,pab->pmb", diff, lat)
            if images:
                img = np.einsum("ka,pab->pkb", _IMAGES, lat)
                cart = (cart[:, :, None, :] + img[:, None, :, :]).reshape(rr.size, -1, 3)
            d = np.sqrt(np.einsum("pmb,pmb->pm", cart, cart))
            if exclude_self:
                d = np.where(d < 1e-6, np.inf, d)
            out[rr] = d.min(axis=1)
    return out


def site_distance_matrix(sites: Sites, *, images: bool = False) -> np.ndarray:
    """Shortest distance (Å) between the orbits of every pair of ASU sites: (T, nmax, nmax), NaN padded.

    ``D[t, i, i]`` is the shortest distance between two atoms of one orbit (lattice images
    included when ``images``). Vectorised per (space group, letter) of the target site.
    """
    T, nmax = sites.n_sites.size, sites.nmax
    D = np.full((T, nmax, nmax), np.nan)
    if T == 0:
        return D
    pi, pj = [], []
    for n in np.unique(sites.n_sites):
        base = sites.offsets[np.flatnonzero(sites.n_sites == n)]
        for a in range(n):
            for b in range(n):
                pi.append(base + a)
                pj.append(base + b)
    i, j = np.concatenate(pi), np.concatenate(pj)
    d = _orbit_min_distance(sites, i, j, images=images, exclude_self=True)
    if not images:  # a one-atom orbit has no partner inside the cell: its shortest lattice vector
        lat_len = np.linalg.norm(sites.lattice, axis=2).min(axis=1)
        d = np.where(np.isinf(d), lat_len[sites.owner[i]], d)
    D[sites.owner[i], sites.pos[i], sites.pos[j]] = d
    return np.fmin(D, np.swapaxes(D, 1, 2))


# ----------------------------------------------------------------------------- normalizer
@dataclass(frozen=True)
class _NormOp:
    rot: np.ndarray
    trans: np.ndarray
    letter_perm: np.ndarray  # letter index -> image letter index


@lru_cache(maxsize=1)
def _wyckoff_sets() -> dict:
    import json
    from importlib.resources import files

    return json.loads((files("pyxtal") / "database" / "wyckoff_sets.json").read_text())


@lru_cache(maxsize=256)
def normalizer_ops(sg: int) -> tuple[_NormOp, ...]:
    """Coset representatives of the Euclidean normalizer of ``sg`` (pyxtal's Wyckoff-set table), identity excluded."""
    from pymatgen.core.operations import SymmOp

    alt = _wyckoff_sets()[str(sg)]
    wps = alt["Transformed WP"]
    base = wps[0].split()
    lets = wyckoff.letters(sg)
    out = []
    for xyz, img in zip(alt["Coset Representative"][1:], wps[1:], strict=True):
        op = SymmOp.from_xyz_str(xyz)
        m = dict(zip(base, img.split(), strict=True))
        perm = np.array([lets.index(m.get(let, let)) for let in lets], dtype=np.int64)
        out.append(_NormOp(np.array(op.rotation_matrix, dtype=float), np.array(op.translation_vector, dtype=float),
                           perm))
    return tuple(out)


def _close_group(perms: set[tuple[int, ...]], n: int) -> tuple[tuple[int, ...], ...]:
    group = {tuple(range(n))} | set(perms)
    while True:
        new = {tuple(p[q[i]] for i in range(n)) for p in group for q in group} - group
        if not new:
            return tuple(sorted(group))
        group |= new


def site_permutation_groups(sites: Sites, *, tol_a: float = 1e-2) -> list[tuple[tuple[int, ...], ...]]:
    """For each template, the permutations of its ASU sites induced by normalizer operations.

    A coset representative ``x -> R x + t`` counts when it keeps the template's metric
    (``R^T G R = G``), maps the multiset of Wyckoff letters onto itself, and sends every site's
    representative onto the orbit of a site with the image letter (within ``tol_a`` Å).
    Returns the identity-only group for most templates.
    """
    T, nmax = sites.n_sites.size, sites.nmax
    groups: list[tuple[tuple[int, ...], ...]] = [(tuple(range(int(n))),) for n in sites.n_sites]
    if T == 0:
        return groups
    tpl_sg = sites.sg[sites.offsets[:-1]]
    lpad = sites.padded(sites.letter_idx, -1)
    xpad = sites.padded(sites.xyz, np.nan)
    lsorted = np.sort(lpad, axis=1)
    metric = np.einsum("tij,tkj->tik", sites.lattice, sites.lattice)
    # candidate (template, op) pairs: metric kept and letter multiset mapped onto itself
    e_t, e_i, e_j, e_y, e_pair = [], [], [], [], []
    pair_t: list[np.ndarray] = []
    pair_op: list[_NormOp] = []
    n_pairs = 0
    for s in np.unique(tpl_sg):
        ops = normalizer_ops(int(s))
        if not ops:
            continue
        tt = np.flatnonzero(tpl_sg == s)
        for op in ops:
            lp = lpad[tt]
            mapped = np.where(lp >= 0, op.letter_perm[np.clip(lp, 0, None)], -1)
            same = np.all(np.sort(mapped, axis=1) == lsorted[tt], axis=1)
            if not same.any():
                continue
            cand = tt[same]
            G = metric[cand]
            rgr = op.rot.T @ G @ op.rot
            ok = np.all(np.abs(rgr - G) <= 1e-4 * np.abs(G).max(axis=(1, 2))[:, None, None] + 1e-8, axis=(1, 2))
            cand = cand[ok]
            if cand.size == 0:
                continue
            mp = mapped[same][ok]  # (c, nmax) image letters
            hit = (mp[:, :, None] == lpad[cand][:, None, :]) & (mp[:, :, None] >= 0)  # (c, i, j)
            c_idx, a, b = np.nonzero(hit)
            y = xpad[cand[c_idx], a] @ op.rot.T + op.trans
            e_t.append(cand[c_idx])
            e_i.append(a)
            e_j.append(b)
            e_y.append(y)
            e_pair.append(n_pairs + c_idx)
            pair_t.append(cand)
            pair_op.extend([op] * cand.size)
            n_pairs += cand.size
    if not n_pairs:
        return groups
    et, ei, ej, ey, ep = (np.concatenate(x) for x in (e_t, e_i, e_j, e_y, e_pair))
    site_i = sites.offsets[et] + ei
    site_j = sites.offsets[et] + ej
    d = _orbit_min_distance(sites, site_i, site_j, ey, images=False, exclude_self=False)
    good = d < tol_a
    pts = np.concatenate(pair_t)
    # for each (pair, i) the matched j; a pair gives a permutation when every site maps, bijectively
    perm = np.full((n_pairs, nmax), -1, dtype=np.int64)
    perm[ep[good], ei[good]] = ej[good]
    ar = np.arange(nmax)
    pad = ar[None, :] >= sites.n_sites[pts][:, None]
    perm = np.where(pad, ar[None, :], perm)
    is_perm = np.all(np.sort(perm, axis=1) == ar[None, :], axis=1) & np.any(perm != ar[None, :], axis=1)
    found: dict[int, set[tuple[int, ...]]] = {}
    for p in np.flatnonzero(is_perm):
        t = int(pts[p])
        found.setdefault(t, set()).add(tuple(int(x) for x in perm[p, : int(sites.n_sites[t])]))
    for t, perms in found.items():
        groups[t] = _close_group(perms, int(sites.n_sites[t]))
    return groups


def _perm_key(group: tuple[tuple[int, ...], ...]) -> str:
    return ";".join("".join(chr(48 + i) for i in p) for p in group if p != tuple(range(len(p))))


# ----------------------------------------------------------------------------- assignment tables
def _allowed(used: int, k: int, require_all_elements: bool, allow_subsystems: bool) -> bool:
    if allow_subsystems:
        return used >= 1
    if require_all_elements:
        return used == k
    return used >= min(2, k)


@lru_cache(maxsize=4096)
def assignment_table(
    n_sites: int, n_elements: int, perm_key: str, require_all_elements: bool, allow_subsystems: bool,
) -> tuple[np.ndarray, int]:
    """Canonical assignments of ``n_elements`` element indices to ``n_sites`` sites.

    Returns ``(table (n_kept, n_sites) int8, n_allowed)``: every allowed assignment (surjective
    when ``require_all_elements``) that is the lexicographic minimum of its orbit under the site
    permutations of ``perm_key``, and how many allowed assignments there were before folding.
    """
    perms = [tuple(ord(ch) - 48 for ch in p) for p in perm_key.split(";") if p]
    kept, n_allowed = [], 0
    for a in itertools.product(range(n_elements), repeat=n_sites):
        if not _allowed(len(set(a)), n_elements, require_all_elements, allow_subsystems):
            continue
        n_allowed += 1
        if all(a <= tuple(a[p[i]] for i in range(n_sites)) for p in perms):
            kept.append(a)
    table = np.array(kept, dtype=np.int8).reshape(len(kept), n_sites)
    return table, n_allowed


# ----------------------------------------------------------------------------- fingerprints
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (elementwise, uint64, wrapping)."""
    h = h.astype(np.uint64, copy=True)
    h ^= h >> np.uint64(30)
    h *= _M2
    h ^= h >> np.uint64(27)
    h *= _M3
    h ^= h >> np.uint64(31)
    return h


def fold_hash(values: np.ndarray, axis: int, seed: int = 0) -> np.ndarray:
    """Order-dependent hash of ``values`` (uint64) along ``axis`` (sort first for a set hash)."""
    v = np.moveaxis(values, axis, -1)
    h = np.full(v.shape[:-1], np.uint64(seed) ^ _M1, dtype=np.uint64)
    for k in range(v.shape[-1]):
        h = _mix(h ^ (v[..., k] + _M1 + (h << np.uint64(6)) + (h >> np.uint64(2))))
    return h


def fingerprint_hex(h: np.ndarray) -> pl.Series:
    """uint64 fingerprints as 16-character hex strings."""
    be = np.ascontiguousarray(h.astype(">u8"))
    return pl.Series("fingerprint", be.view("S8").ravel(), dtype=pl.Binary).bin.encode("hex")


def structure_fingerprints(
    *, sg: np.ndarray, lattice_key: np.ndarray, z: np.ndarray, mult: np.ndarray, dist_q: np.ndarray,
) -> np.ndarray:
    """uint64 fingerprint per candidate.

    ``z`` (C, n) atomic numbers (0 = no site), ``mult`` (C, n) multiplicities, ``dist_q`` (C, n, n)
    quantised scaled orbit distances, ``lattice_key`` (C,) a hash of the quantised lattice shape.
    Invariant to the order of the sites and to isometries (the normalizer) of the crystal.
    """
    valid = z > 0
    zu, mu = z.astype(np.uint64), mult.astype(np.uint64)
    pad = np.uint64(np.iinfo(np.uint64).max)
    ent = (zu[:, None, :] << np.uint64(48)) | (mu[:, None, :] << np.uint64(32)) | dist_q.astype(np.uint64)
    ent = np.where(valid[:, None, :], ent, pad)
    ent.sort(axis=2)
    row = fold_hash(ent, axis=2, seed=1)
    site = fold_hash(np.stack([zu, mu, row], axis=2), axis=2, seed=2)
    site = np.where(valid, site, pad)
    site.sort(axis=1)
    h = fold_hash(site, axis=1, seed=3)
    return _mix(h ^ _mix(sg.astype(np.uint64) ^ lattice_key.astype(np.uint64)))


def _lattice_keys(tpl: pl.DataFrame) -> np.ndarray:
    p = np.stack([tpl[c].to_numpy().astype(float) for c in LATTICE_COLUMNS], axis=1)
    vol = wyckoff.cell_volume(*p.T)
    lengths = np.sort(p[:, :3] / np.cbrt(vol)[:, None], axis=1)
    angles = np.sort(p[:, 3:], axis=1)
    q = np.concatenate([np.round(lengths * 50), np.round(angles * 2)], axis=1)
    q = np.nan_to_num(q, nan=0.0).astype(np.int64).astype(np.uint64)
    return fold_hash(q, axis=1, seed=4)


# ----------------------------------------------------------------------------- validation
def validate_templates(templates: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split templates into (valid, rejects). Raises when required columns are missing.

    Rejects (``template_id``, ``reason``, ``detail``): ``ragged_sites`` (letters, multiplicities
    and coordinates of different lengths), ``unknown_wyckoff`` (a letter the space group lacks or
    a multiplicity that disagrees with it), ``bad_coordinates`` (not 3 finite numbers),
    ``bad_lattice`` (parameters that form no cell), ``duplicate_template_id``.
    """
    missing = [c for c in TEMPLATE_COLUMNS if c not in templates.columns]
    if missing:
        raise ValueError(f"templates frame lacks column(s) {missing}; the templates contract needs {list(TEMPLATE_COLUMNS)}")
    df = templates.with_row_index("_row")
    reasons: list[pl.DataFrame] = []

    def reject(mask: pl.Expr | pl.Series, reason: str, detail: pl.Expr) -> None:
        nonlocal df
        bad = df.filter(mask)
        if bad.height:
            reasons.append(bad.select(pl.col("template_id"), pl.lit(reason).alias("reason"),
                                      detail.alias("detail")))
            df = df.filter(~mask)

    row = pl.format("templates row {}", pl.col("_row"))
    reject(pl.col("template_id").is_duplicated() & (pl.col("_row") != pl.col("_row").min().over("template_id")),
           "duplicate_template_id", pl.format("{}: template_id {} seen earlier", row, pl.col("template_id")))
    nl = pl.col("wyckoff_letters").list.len()
    reject(nl.is_null() | (nl == 0) | (pl.col("multiplicities").list.len() != nl)
           | (pl.col("asu_frac_coords").list.len() != nl),
           "ragged_sites", pl.format("{}: letters, multiplicities and coordinates differ in length", row))
    reject(~pl.col("spacegroup_number").is_between(1, 230),
           "unknown_wyckoff", pl.format("{}: space group {} out of 1..230", row, pl.col("spacegroup_number")))
    if df.height:
        coords = df.select("_row", "asu_frac_coords").explode("asu_frac_coords")
        bad_rows = coords.filter(
            (pl.col("asu_frac_coords").list.len() != 3)
            | ~pl.col("asu_frac_coords").list.eval(pl.element().is_finite()).list.all().fill_null(False)
        )["_row"].unique()
        reject(pl.col("_row").is_in(bad_rows.implode()), "bad_coordinates",
               pl.format("{}: a site's coordinates are not 3 finite numbers", row))
    if df.height:
        known = pl.DataFrame(
            [(s, let, wyckoff.position(s, let).multiplicity) for s in df["spacegroup_number"].unique().to_list()
             for let in wyckoff.letters(int(s))],
            schema={"spacegroup_number": df.schema["spacegroup_number"], "letter": pl.String, "m": pl.Int64},
            orient="row",
        )
        sites = (df.select("_row", "spacegroup_number", pl.col("wyckoff_letters").alias("letter"),
                           pl.col("multiplicities").alias("mult")).explode(["letter", "mult"])
                 .join(known, on=["spacegroup_number", "letter"], how="left"))
        bad_rows = sites.filter(pl.col("m").is_null() | (pl.col("m") != pl.col("mult")))["_row"].unique()
        reject(pl.col("_row").is_in(bad_rows.implode()), "unknown_wyckoff",
               pl.format("{}: Wyckoff letters {} / multiplicities {} do not exist in space group {}",
                         row, pl.col("wyckoff_letters").list.join(","),
                         pl.col("multiplicities").cast(pl.List(pl.String)).list.join(","),
                         pl.col("spacegroup_number")))
    if df.height:
        vol = wyckoff.cell_volume(*(df[c].to_numpy().astype(float) for c in LATTICE_COLUMNS))
        badv = pl.Series(~(np.isfinite(vol) & (vol > 0)))
        reject(badv, "bad_lattice", pl.format("{}: lattice parameters form no cell", row))
    rejects = pl.concat(reasons) if reasons else pl.DataFrame(schema=REJECT_SCHEMA)
    return df.drop("_row"), rejects.cast(pl.Schema(REJECT_SCHEMA))


# ----------------------------------------------------------------------------- infill
def _formula_table(counts: np.ndarray, elements: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    frame = pl.DataFrame(counts, schema=[f"c{i}" for i in range(counts.shape[1])], orient="row")
    inverse = frame.select(pl.struct(pl.all()).rank("dense").cast(pl.Int64) - 1).to_series().to_numpy()
    uniq = np.zeros((int(inverse.max()) + 1 if inverse.size else 0, counts.shape[1]), dtype=counts.dtype)
    uniq[inverse] = counts
    pairs = [_formulas(tuple(elements), tuple(int(x) for x in row)) for row in uniq]
    return inverse, [p[0] for p in pairs], [p[1] for p in pairs]


@lru_cache(maxsize=65536)
def _formulas(elements: tuple[str, ...], counts: tuple[int, ...]) -> tuple[str, str]:
    """(``formula``, ``reduced_formula``) in pymatgen's convention, as in ``mp_structures``."""
    from pymatgen.core import Composition

    comp = Composition({e: n for e, n in zip(elements, counts, strict=True) if n > 0})
    return comp.formula, comp.reduced_formula


@lru_cache(maxsize=256)
def covalent_volume(symbol: str) -> float:
    """(4/3) pi r_cov^3 (Å^3) with pyxtal's covalent radius of ``symbol``."""
    from pyxtal.database.element import Element

    r = Element(symbol).covalent_radius
    return float(4.0 / 3.0 * np.pi * r**3)


def expected_volume(counts: np.ndarray, elements: list[str]) -> np.ndarray:
    """Expected cell volume (Å^3) of compositions ``counts`` (C, k): 1.1 x sum n_i (4/3) pi r_cov,i^3."""
    v = np.array([covalent_volume(e) for e in elements])
    return VOLUME_FACTOR * counts @ v


def infill(
    templates: pl.DataFrame,
    *,
    elements: list[str],
    require_all_elements: bool = True,
    allow_subsystems: bool = False,
    max_atoms: int | None = None,
    volume_mode: VolumeMode = "template",
) -> InfillResult:
    """Fill every template's ASU sites with the elements of a chemical system.

    ``require_all_elements`` (default, the paper's ternary study): every element appears in
    every candidate. ``require_all_elements=False``: candidates with at least two of the
    elements (binaries of a ternary, ...). ``allow_subsystems=True``: every non-empty subset,
    elementals included (overrides ``require_all_elements``). ``max_atoms``: templates with more
    atoms in the conventional cell are skipped (counted). ``volume_mode``: ``template`` keeps the
    lattice, ``rescaled`` scales it to :func:`expected_volume`.

    Returns the candidates (``CANDIDATE_SCHEMA``, the ``candidates`` table contract) and counts.
    """
    t0 = time.perf_counter()
    if volume_mode not in ("template", "rescaled"):
        raise ValueError(f"volume_mode must be 'template' or 'rescaled', got {volume_mode!r}")
    if max_atoms is not None and max_atoms < 1:
        raise ValueError(f"max_atoms must be positive, got {max_atoms}")
    elems = normalise_elements(elements)
    chemsys = "-".join(elems)
    k = len(elems)
    valid, rejects = validate_templates(templates)
    res = InfillResult(candidates=pl.DataFrame(schema=CANDIDATE_SCHEMA), rejects=rejects,
                       chemical_system=chemsys, volume_mode=volume_mode, n_templates=templates.height)
    n_atoms_t = valid["multiplicities"].list.sum().cast(pl.Int64)
    valid = valid.with_columns(n_atoms_t.alias("_n_atoms"), pl.col("wyckoff_letters").list.len().alias("_n_sites"))
    if max_atoms is not None:
        over = valid["_n_atoms"] > max_atoms
        res.n_templates_filtered_max_atoms = int(over.sum())
        valid = valid.filter(~over)
    min_sites = 1 if allow_subsystems else (k if require_all_elements else min(2, k))
    few = valid["_n_sites"] < min_sites
    res.n_templates_too_few_sites = int(few.sum())
    valid = valid.filter(~few)
    if valid.height == 0:
        res.seconds = time.perf_counter() - t0
        return res

    sites = explode_sites(valid)
    nmax = sites.nmax
    groups = site_permutation_groups(sites)
    keys = [_perm_key(g) for g in groups]
    res.n_templates_with_site_symmetry = sum(1 for key in keys if key)

    # explode templates x canonical assignments
    cls = pl.DataFrame({"n": sites.n_sites, "key": keys, "t": np.arange(valid.height)})
    cand_t_parts, sigma_parts = [], []
    for (n, key), part in cls.group_by(["n", "key"], maintain_order=True):
        table, n_allowed = assignment_table(int(n), k, str(key), require_all_elements, allow_subsystems)
        tt = part["t"].to_numpy()
        res.n_assignments += n_allowed * tt.size
        res.n_folded_symmetry += (n_allowed - table.shape[0]) * tt.size
        if table.shape[0] == 0:
            continue
        cand_t_parts.append(np.repeat(tt, table.shape[0]))
        sig = np.full((tt.size * table.shape[0], nmax), -1, dtype=np.int8)
        sig[:, : int(n)] = np.tile(table, (tt.size, 1))
        sigma_parts.append(sig)
    if not cand_t_parts:
        res.seconds = time.perf_counter() - t0
        return res
    cand_t = np.concatenate(cand_t_parts)
    sigma = np.concatenate(sigma_parts)
    order = np.argsort(cand_t, kind="stable")
    cand_t, sigma = cand_t[order], sigma[order]
    valid_site = sigma >= 0

    # per-template arrays (padded)
    T = valid.height
    mult_t = np.zeros((T, nmax), dtype=np.int64)
    mult_t[sites.owner, sites.pos] = sites.mult
    D = site_distance_matrix(sites)
    vol_t = wyckoff.cell_volume(*(valid[c].to_numpy().astype(float) for c in LATTICE_COLUMNS))
    n_at = valid["_n_atoms"].to_numpy()
    scale = np.cbrt(vol_t / n_at)
    dq = np.nan_to_num(np.round(D / scale[:, None, None] * 100.0), nan=0.0).clip(0, 2**31).astype(np.uint64)
    lat_key = _lattice_keys(valid)
    sg_t = valid["spacegroup_number"].to_numpy().astype(np.int64)

    # fingerprints and within-template folding
    z_el = np.array([atomic_number(e) for e in elems], dtype=np.int64)
    z = np.where(valid_site, z_el[np.clip(sigma, 0, None)], 0)
    mult = mult_t[cand_t]
    fp = structure_fingerprints(sg=sg_t[cand_t], lattice_key=lat_key[cand_t], z=z, mult=mult, dist_q=dq[cand_t])
    first = pl.DataFrame({"t": cand_t, "fp": fp}).select(pl.struct("t", "fp").is_first_distinct()).to_series().to_numpy()
    res.n_folded_fingerprint = int((~first).sum())
    cand_t, sigma, valid_site, mult, fp = cand_t[first], sigma[first], valid_site[first], mult[first], fp[first]

    # compositions and formulas
    counts = np.stack([np.where(sigma == e, mult, 0).sum(axis=1) for e in range(k)], axis=1)
    inv, formulas, reduced = _formula_table(counts, elems)
    if volume_mode == "rescaled":
        v_new = expected_volume(counts, elems)
        f = np.cbrt(v_new / vol_t[cand_t])
    else:
        v_new = vol_t[cand_t]
        f = np.ones(cand_t.size)

    # assemble the frame
    base = valid.select("template_id", "checkpoint_id", "spacegroup_number", "wyckoff_letters",
                        "asu_frac_coords", *LATTICE_COLUMNS, "_n_atoms")[cand_t]
    n_sites_c = valid_site.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(n_sites_c)]).astype(np.int32)
    flat = sigma[valid_site].astype(np.int32)
    species = pa.ListArray.from_arrays(pa.array(offsets), pa.array(elems).take(pa.array(flat)))
    sp_col = pl.Series("asu_species", species)
    mult_list = pl.Series("_mult", pa.ListArray.from_arrays(pa.array(offsets), pa.array(mult[valid_site])))
    df = base.with_columns(
        sp_col,
        mult_list,
        pl.Series("formula", np.array(formulas, dtype=object)[inv], dtype=pl.String),
        pl.Series("reduced_formula", np.array(reduced, dtype=object)[inv], dtype=pl.String),
        pl.Series("volume_a3", v_new),
        fingerprint_hex(fp),
        *(pl.Series(c, base[c].to_numpy() * f) for c in ("a_a", "b_a", "c_a")),
    )
    tokens = [
        pl.format("{}:{}{}", pl.col("asu_species").list.get(i, null_on_oob=True),
                  pl.col("_mult").list.get(i, null_on_oob=True), pl.col("wyckoff_letters").list.get(i, null_on_oob=True))
        for i in range(nmax)
    ]
    df = df.with_columns(pl.concat_str(tokens, separator=" ", ignore_nulls=True).alias("wyckoff_species_sequence"))
    df = df.with_columns(
        hash_column(pl.concat_str([pl.col("template_id"), pl.col("wyckoff_species_sequence"), pl.lit(volume_mode)],
                                  separator="|"), prefix="cand-").alias("candidate_id"),
        pl.lit(chemsys).alias("chemical_system"),
        pl.col("_n_atoms").alias("n_atoms"),
        pl.lit(volume_mode).alias("volume_mode"),
        pl.col("wyckoff_letters").alias("asu_letters"),
    )
    res.candidates = df.select(list(CANDIDATE_SCHEMA)).cast(pl.Schema(CANDIDATE_SCHEMA))
    res.seconds = time.perf_counter() - t0
    return res


def iter_infill(
    templates: pl.DataFrame | pl.LazyFrame,
    *,
    elements: list[str],
    require_all_elements: bool = True,
    allow_subsystems: bool = False,
    max_atoms: int | None = None,
    volume_mode: VolumeMode = "template",
    batch_templates: int = 20_000,
    totals: InfillTotals | None = None,
) -> Iterator[pl.DataFrame]:
    """Stream candidates batch by batch (``batch_templates`` templates at a time), for ``store.write``.

    Folding is per template, so batches are independent. Counts accumulate into ``totals``.
    Templates are processed in ``template_id`` order, so consecutive shards cover disjoint
    ``template_id`` ranges (Parquet min/max statistics then prune lookups by template).
    """
    if batch_templates < 1:
        raise ValueError("batch_templates must be positive")
    df = templates.collect() if isinstance(templates, pl.LazyFrame) else templates
    df = df.sort("template_id")
    n = df.height
    for lo in range(0, max(n, 1), batch_templates):
        batch = df.slice(lo, batch_templates)
        r = infill(batch, elements=elements, require_all_elements=require_all_elements,
                   allow_subsystems=allow_subsystems, max_atoms=max_atoms, volume_mode=volume_mode)
        if totals is not None:
            totals.add(r)
        yield r.candidates


# ----------------------------------------------------------------------------- synthetic templates
def random_templates(
    n: int,
    *,
    seed: int,
    spacegroups: Sequence[int] | None = None,
    spacegroup_weights: Sequence[float] | None = None,
    n_sites_weights: Sequence[float] = (0.05, 0.15, 0.45, 0.35),
    max_atoms: int = 40,
    volume_per_atom_a3: tuple[float, float] = (10.0, 20.0),
    min_distance_a: float = 1.0,
    checkpoint_id: str = "ckpt-pyxtal-random",
) -> pl.DataFrame:
    """``n`` random templates in the ``templates`` contract (for tests and benchmarks without a generator).

    Space groups drawn from ``spacegroups`` (default 2..230) with ``spacegroup_weights``; 1..len
    (``n_sites_weights``) ASU sites from pyxtal's Wyckoff tables (fixed positions at most once),
    random free coordinates, a random lattice obeying the crystal system scaled to
    ``volume_per_atom_a3``; templates whose shortest orbit distance is below ``min_distance_a``
    are redrawn.
    """
    rng = np.random.default_rng(seed)
    sgs = np.array(spacegroups if spacegroups is not None else range(2, 231), dtype=np.int64)
    w = np.asarray(spacegroup_weights if spacegroup_weights is not None else np.ones(sgs.size), dtype=float)
    w = w / w.sum()
    ns_w = np.asarray(n_sites_weights, dtype=float)
    ns_w = ns_w / ns_w.sum()
    frames: list[pl.DataFrame] = []
    have = 0
    while have < n:
        want = int((n - have) * 1.3) + 16
        rows = _draw_templates(rng, want, sgs, w, ns_w, max_atoms, volume_per_atom_a3, checkpoint_id)
        if rows.height == 0:
            continue
        sites = explode_sites(rows)
        D = site_distance_matrix(sites, images=True)
        dmin = np.nanmin(D.reshape(D.shape[0], -1), axis=1)
        rows = rows.with_columns(pl.Series("min_distance_a", dmin)).filter(pl.col("min_distance_a") >= min_distance_a)
        frames.append(rows)
        have += rows.height
    out = pl.concat(frames).head(n)
    return out.unique("template_id", keep="first", maintain_order=True)


def _draw_templates(rng, want, sgs, w, ns_w, max_atoms, vpa, checkpoint_id) -> pl.DataFrame:
    recs: dict[str, list] = {k: [] for k in ("spacegroup_number", "wyckoff_letters", "multiplicities",
                                             "asu_frac_coords", "lat")}
    sg_draw = rng.choice(sgs, size=want, p=w)
    ns_draw = rng.choice(np.arange(1, ns_w.size + 1), size=want, p=ns_w)
    for sg, ns in zip(sg_draw.tolist(), ns_draw.tolist(), strict=True):
        lets = wyckoff.letters(sg)
        pos = [wyckoff.position(sg, let) for let in lets]
        chosen: list[int] = []
        total = 0
        for _ in range(ns):
            ok = [i for i, p in enumerate(pos) if total + p.multiplicity <= max_atoms and not (p.dof == 0 and i in chosen)]
            if not ok:
                break
            i = ok[int(rng.integers(len(ok)))]
            chosen.append(i)
            total += pos[i].multiplicity
        if len(chosen) < ns:
            continue
        xyz = [pos[i].project(rng.random(3)).round(4).tolist() for i in chosen]
        a, b, c = rng.uniform(0.8, 1.25, 3)
        al, be, ga = rng.uniform(75, 105, 3)
        lat = np.array(wyckoff.constrain_lattice(sg, a, b, c, al, be, ga), dtype=float)
        v = float(wyckoff.cell_volume(*lat))
        target = total * rng.uniform(*vpa)
        lat[:3] *= (target / v) ** (1 / 3)
        recs["spacegroup_number"].append(sg)
        recs["wyckoff_letters"].append([lets[i] for i in chosen])
        recs["multiplicities"].append([pos[i].multiplicity for i in chosen])
        recs["asu_frac_coords"].append(xyz)
        recs["lat"].append(lat.round(4).tolist())
    if not recs["lat"]:
        return pl.DataFrame()
    lat = np.array(recs.pop("lat"))
    df = pl.DataFrame(recs, schema={"spacegroup_number": pl.Int64, "wyckoff_letters": pl.List(pl.String),
                                    "multiplicities": pl.List(pl.Int64),
                                    "asu_frac_coords": pl.List(pl.List(pl.Float64))})
    df = df.with_columns(*(pl.Series(c, lat[:, i]) for i, c in enumerate(LATTICE_COLUMNS)))
    vol = wyckoff.cell_volume(*lat.T)
    df = df.with_columns(
        pl.lit(checkpoint_id).alias("checkpoint_id"),
        pl.col("spacegroup_number").map_elements(wyckoff.crystal_system, return_dtype=pl.String).alias("crystal_system"),
        pl.col("wyckoff_letters").list.len().cast(pl.Int64).alias("n_sites"),
        pl.Series("volume_a3", vol),
        pl.col("multiplicities").list.sum().cast(pl.Int64).alias("n_atoms"),
        pl.concat_str([pl.col("spacegroup_number").cast(pl.String), pl.col("wyckoff_letters").list.join(" ")],
                      separator=" ").alias("wyckoff_sequence"),
    ).with_columns((pl.col("n_atoms") / pl.col("volume_a3")).alias("number_density_per_a3"))
    key = pl.concat_str([pl.col("wyckoff_sequence"),
                         pl.col("asu_frac_coords").list.eval(pl.element().cast(pl.List(pl.String)).list.join(","))
                         .list.join(";"),
                         *(pl.col(c).cast(pl.String) for c in LATTICE_COLUMNS)], separator="|")
    return df.with_columns(hash_column(key, prefix="tpl-").alias("template_id")).select(
        "template_id", "checkpoint_id", "spacegroup_number", "crystal_system", "n_sites", "wyckoff_letters",
        "multiplicities", "asu_frac_coords", *LATTICE_COLUMNS, "volume_a3", "n_atoms", "number_density_per_a3",
        "wyckoff_sequence")
