"""From generator vectors to symmetric crystal templates, and the quality of a generation run.

Decoding (``decode_templates``), batched over all samples:

1. ``lib.encoding.decode_vectors``: space group (argmax restricted to the requested groups),
   present sites, Wyckoff letter of each site (argmax over the letters that exist in the
   group), raw coordinates and lattice.
2. Sites are grouped by (space group, letter); each group's points are projected onto the
   position's free parameters with ``WyckoffArrays.project`` and expanded through the orbit with
   ``WyckoffArrays.expand`` in one call. Nothing is snapped afterwards. The stored representative
   is the canonical one: the lexicographically smallest orbit point that is in the position's
   representative form (so equivalent descriptions get the same fingerprint).
3. Lattice: ``lib.wyckoff.constrain_lattice`` per crystal system (vectorised), volume from
   ``lib.wyckoff.cell_volume``.
4. Rejections, each counted under one reason (the first that applies, in this order):
   ``no_sites``; ``invalid_lattice`` (angles form no cell); ``duplicate_fixed_site`` (two sites
   on the same zero-freedom position); ``too_many_atoms`` (> ``max_atoms``);
   ``degenerate_orbit`` (a site's own orbit has coinciding points: its coordinates sit on a more
   special position); ``overlapping_orbits`` (atoms of two sites coincide); ``min_distance``
   (shortest periodic interatomic distance < ``min_distance_a``); ``density_low`` /
   ``density_high`` (number density outside the window). Points "coincide" below
   ``coincidence_tol_a``. Optional repairs (``TemplateFilters.repair``, ``dedupe_fixed_sites``)
   run first and are counted in ``DecodeResult.repairs``: a repeated fixed site is dropped, and
   a template below the minimum distance has its free parameters moved within their Wyckoff
   forms (``repair_free_parameters``) and/or its lattice scaled isotropically; both keep the
   symmetry exact.
5. Valid templates get a content-hash ``template_id`` (``tpl-``), duplicates within the run
   (same id) are folded and counted.

Quality (``quality_report``): validity, symmetry exactness by ``check_symmetry`` (spglib's
operations from its own database, independent of the decoder and of pyxtal), density overlap,
distribution distances, uniqueness and novelty, all defined in the docstrings below.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal, cast

import numpy as np
import polars as pl
import pyarrow as pa

from lib import contracts, wyckoff
from lib.cells import lattice_matrices
from lib.encoding import (
    DEFAULT_SCHEMA,
    EncodingSchema,
    atoms_per_cell,
    decode_vectors,
    letter_counts,
    template_arrays,
)
from lib.ids import hash_column
from lib.plots import subplots
from lib.wyckoff import LATTICE_COLUMNS, constrain_lattices

REJECT_REASONS = (
    "no_sites",
    "invalid_lattice",
    "duplicate_fixed_site",
    "too_many_atoms",
    "degenerate_orbit",
    "overlapping_orbits",
    "min_distance",
    "density_low",
    "density_high",
)

#: The quality gate on generated templates: the number-density overlap (:func:`density_overlap`)
#: with ``training_templates`` that a generation run must reach (``templates_quality`` check).
MIN_DENSITY_OVERLAP = 0.93

#: Columns of a ``templates`` row, in order (its contract in :mod:`lib.contracts`).
TEMPLATE_COLUMNS = tuple(contracts.schema("templates"))

_SYSTEM_NAMES = np.array([c[0] for c in wyckoff.CRYSTAL_SYSTEMS])
_SYSTEM_HI = np.array([c[2] for c in wyckoff.CRYSTAL_SYSTEMS])


#: Repair modes of :class:`TemplateFilters` (see :func:`build_templates`).
RepairMode = Literal["none", "rescale", "free_params", "free_params+rescale"]
REPAIR_MODES: tuple[RepairMode, ...] = ("none", "rescale", "free_params", "free_params+rescale")
#: Keys of ``DecodeResult.repairs``.
REPAIR_KINDS = ("dedupe_fixed_site", "free_params_attempted", "free_params", "rescale")


@dataclass(frozen=True)
class TemplateFilters:
    """Filters applied to decoded templates (paper: minimum distance 1 Å), and the repairs tried
    before a template is rejected for its minimum distance.

    ``repair``: ``"none"`` (reject, as the paper); ``"free_params"`` (move the free parameters of
    the sites, within each site's Wyckoff form, to push atoms closer than ``min_distance_a``
    apart; at most ``repair_iterations`` vectorised push steps); ``"rescale"`` (scale the lattice
    isotropically by ``min_distance_a / min_distance``, at most ``max_rescale``); or
    ``"free_params+rescale"`` (both, in that order). Both keep the symmetry exact: the sites stay
    on their Wyckoff positions and an isotropic scaling maps the metric's symmetry onto itself.
    ``dedupe_fixed_sites``: drop a repeated zero-freedom site (same letter twice) instead of
    rejecting the template for ``duplicate_fixed_site``; the template keeps one site fewer.
    """

    min_distance_a: float = 1.0
    min_density_per_a3: float = 0.005
    max_density_per_a3: float = 0.25
    max_atoms: int = 100
    coincidence_tol_a: float = 1e-3
    repair: RepairMode = "none"
    max_rescale: float = 1.25
    dedupe_fixed_sites: bool = False
    repair_iterations: int = 20

    def __post_init__(self) -> None:
        if self.repair not in REPAIR_MODES:
            raise ValueError(f"TemplateFilters.repair must be one of {REPAIR_MODES}, got {self.repair!r}")
        if not self.max_rescale >= 1.0:
            raise ValueError(f"TemplateFilters.max_rescale must be >= 1 (a length factor), got {self.max_rescale}")
        if self.repair_iterations < 1:
            raise ValueError(f"TemplateFilters.repair_iterations must be >= 1, got {self.repair_iterations}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodeResult:
    """Valid, deduplicated templates plus the counts of everything that was not kept."""

    templates: pl.DataFrame
    n_samples: int
    n_valid: int  # samples that decoded and passed the filters (before folding duplicates)
    rejects: dict[str, int]
    n_duplicates: int
    timings_s: dict[str, float] = field(default_factory=dict)
    #: templates repaired, by kind (``REPAIR_KINDS``): ``dedupe_fixed_site`` samples that lost a
    #: repeated fixed site; ``free_params_attempted`` samples below the minimum distance given to
    #: the free-parameter repair, ``free_params`` those it brought to the minimum distance;
    #: ``rescale`` samples whose lattice was scaled up to the minimum distance. A repaired sample
    #: can still be rejected by a later filter (the density window).
    repairs: dict[str, int] = field(default_factory=dict)
    #: sizes of the repairs: rescale factors (mean, median, max) and the number-density ratio
    #: they cause (mean of 1/f³); free-parameter moves of the repaired sites (Å, mean and max).
    repair_stats: dict[str, float] = field(default_factory=dict)

    @property
    def validity(self) -> float:
        return self.n_valid / self.n_samples if self.n_samples else 0.0

    @property
    def uniqueness_exact(self) -> float:
        return self.templates.height / self.n_valid if self.n_valid else 0.0


# ------------------------------------------------------------------------------- helpers
def crystal_systems(sg: np.ndarray) -> np.ndarray:
    """Crystal-system names of space-group numbers (vectorised)."""
    return _SYSTEM_NAMES[np.searchsorted(_SYSTEM_HI, np.asarray(sg))]


def number_density(n_atoms: np.ndarray, volume_a3: np.ndarray) -> np.ndarray:
    """Atomic number density (atoms per Å^3) of conventional cells: ``n_atoms / volume``."""
    return np.asarray(n_atoms, dtype=np.float64) / np.asarray(volume_a3, dtype=np.float64)


@lru_cache(maxsize=4096)
def _position_by_index(sg: int, li: int) -> wyckoff.WyckoffArrays:
    return wyckoff.position(sg, wyckoff.letters(sg)[li])


def _list_column(values: np.ndarray | list, offsets: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(values, type=type_))


# ------------------------------------------------------------------------------- orbits
@dataclass
class ExpandedSites:
    """Flat arrays over all present sites and all atoms of a batch of templates."""

    site_row: np.ndarray  # (K,) template row of each site (sorted by row, then letter index)
    site_sg: np.ndarray
    site_letter_index: np.ndarray
    site_letter: np.ndarray  # (K,) str
    site_mult: np.ndarray
    site_dof: np.ndarray
    site_xyz: np.ndarray  # (K, 3) canonical representative
    site_slot: np.ndarray  # (K,) the site's slot in the input arrays
    atom_row: np.ndarray  # (A,) template row of each atom (sorted by row)
    atom_site: np.ndarray  # (A,) index into the site arrays
    atom_xyz: np.ndarray  # (A, 3) fractional, in [0, 1)


def expand_sites(sg: np.ndarray, present: np.ndarray, letter_index: np.ndarray, xyz: np.ndarray, *,
                 project: bool = True) -> ExpandedSites:
    """Project every present site onto its Wyckoff position (unless ``project=False``: points
    are taken as they are) and expand its orbit, batched per (space group, letter)."""
    rows, slots = np.nonzero(present)
    # sort sites inside a row by letter index (then slot) so output order is canonical
    li = letter_index[rows, slots]
    order = np.lexsort((slots, li, rows))
    rows, slots, li = rows[order], slots[order], li[order]
    ssg = np.asarray(sg)[rows]
    raw = xyz[rows, slots]
    K = len(rows)
    site_xyz = np.zeros((K, 3))
    site_mult = np.zeros(K, dtype=np.int64)
    site_dof = np.zeros(K, dtype=np.int64)
    site_letter = np.empty(K, dtype=object)
    atom_chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (site index repeated, coords)
    key = ssg * 32 + li
    uniq, inverse = np.unique(key, return_inverse=True)
    for u, k in enumerate(uniq.tolist()):
        idx = np.flatnonzero(inverse == u)
        wp = _position_by_index(k // 32, k % 32)
        p = wp.project(raw[idx]) if project else raw[idx]
        orbit = wp.expand(p)  # (k, m, 3)
        # canonical representative: smallest orbit point already in the representative form
        proj_orbit = wp.project(orbit)
        d = np.abs((proj_orbit - orbit + 0.5) % 1.0 - 0.5).max(axis=2)
        fixed = d < 1e-9
        r = np.round(orbit, 8)
        score = np.where(fixed, r[..., 0] * 1e6 + r[..., 1] * 1e3 + r[..., 2], np.inf)
        best = np.argmin(score, axis=1)
        site_xyz[idx] = orbit[np.arange(len(idx)), best]
        site_mult[idx] = wp.multiplicity
        site_dof[idx] = wp.dof
        site_letter[idx] = wp.letter
        m = wp.multiplicity
        atom_chunks.append((np.repeat(idx, m), orbit.reshape(-1, 3)))
    if atom_chunks:
        a_site = np.concatenate([c[0] for c in atom_chunks])
        a_xyz = np.concatenate([c[1] for c in atom_chunks])
        o = np.argsort(a_site, kind="stable")
        a_site, a_xyz = a_site[o], a_xyz[o]
    else:
        a_site, a_xyz = np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    return ExpandedSites(rows, ssg, li, site_letter.astype(str) if K else np.zeros(0, dtype=str), site_mult,
                         site_dof, site_xyz, slots, rows[a_site], a_site, a_xyz)


_SHIFTS = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.float64)
_ZERO_SHIFT = 13  # index of (0, 0, 0) in _SHIFTS


def _site_layout(ex: ExpandedSites, n_total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per template: atom counts and starts; per site: index of its first atom (its orbit's
    first point); per template: index of its first site."""
    counts = np.bincount(ex.atom_row, minlength=n_total)
    starts = np.cumsum(counts) - counts
    site_first_atom = np.searchsorted(ex.atom_site, np.arange(len(ex.site_row)))
    row_first_site = np.searchsorted(ex.site_row, np.arange(n_total))
    return counts, starts, site_first_atom, row_first_site


def periodic_distances(
    ex: ExpandedSites, matrices: np.ndarray, rows: np.ndarray, *, coincidence_tol_a: float = 1e-3,
    max_elements: int = 2_000_000,
) -> dict[str, np.ndarray]:
    """Per template in ``rows``: shortest periodic distance between two atoms (or an atom and its
    own periodic image), and whether two atoms of one orbit / of two orbits coincide.

    Because the cell is symmetric (every atom is the image of its site's reference point under
    an isometry of the crystal), the shortest distance over all pairs equals the shortest
    distance from each site's reference point to every atom, so only (sites x atoms) pairs are
    computed. Minimum image over the 27 neighbouring cells after wrapping fractional
    differences to [-0.5, 0.5); exact for the distances that matter here (a few Å) unless a
    cell is extremely skewed. Batched over templates with the same atom count.
    """
    n_total = matrices.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    out_min = np.full(n_total, np.inf)
    out_self = np.zeros(n_total, dtype=bool)
    out_cross = np.zeros(n_total, dtype=bool)
    if rows.size == 0:
        return {"min_distance_a": out_min[rows], "degenerate": out_self[rows], "overlap": out_cross[rows]}
    counts, starts, site_first_atom, row_first_site = _site_layout(ex, n_total)
    n_sites = np.bincount(ex.site_row, minlength=n_total)
    S = max(1, int(n_sites[rows].max()))
    for N in np.unique(counts[rows]).tolist():
        if N == 0:
            continue
        rows_n = rows[counts[rows] == N]
        step = max(1, max_elements // (S * N * 27))
        for k in range(0, len(rows_n), step):
            chunk = rows_n[k:k + step]
            B = len(chunk)
            atom_idx = starts[chunk][:, None] + np.arange(N)[None, :]  # (B, N)
            frac = ex.atom_xyz[atom_idx]
            owner = ex.atom_site[atom_idx]
            site_ok = np.arange(S)[None, :] < n_sites[chunk][:, None]  # (B, S)
            site_idx = np.where(site_ok, row_first_site[chunk][:, None] + np.arange(S)[None, :], 0)
            ref_atom = site_first_atom[site_idx]  # (B, S) global atom index
            ref = ex.atom_xyz[ref_atom]  # (B, S, 3)
            diff = ref[:, :, None, :] - frac[:, None, :, :]  # (B, S, N, 3)
            diff -= np.round(diff)
            vec = diff[:, :, :, None, :] + _SHIFTS  # (B, S, N, 27, 3)
            cart = np.matmul(vec.reshape(B, -1, 3), matrices[chunk]).reshape(vec.shape)
            d2 = np.einsum("bsnki,bsnki->bsnk", cart, cart)
            is_ref = atom_idx[:, None, :] == ref_atom[:, :, None]  # (B, S, N)
            d2[..., _ZERO_SHIFT] = np.where(is_ref, np.inf, d2[..., _ZERO_SHIFT])
            d = np.sqrt(d2.min(axis=3))
            d = np.where(site_ok[:, :, None], d, np.inf)
            out_min[chunk] = d.reshape(B, -1).min(axis=1)
            close = d < coincidence_tol_a
            same = owner[:, None, :] == site_idx[:, :, None]
            out_self[chunk] = np.any(close & same, axis=(1, 2))
            out_cross[chunk] = np.any(close & ~same, axis=(1, 2))
    return {"min_distance_a": out_min[rows], "degenerate": out_self[rows], "overlap": out_cross[rows]}


# ------------------------------------------------------------------------------- repairs
#: The free-parameter repair pushes pairs apart to (1 + margin) x the minimum distance, so that
#: a pair it resolves ends above the threshold rather than converging onto it from below.
_REPAIR_MARGIN = 0.02
#: Templates with coinciding atoms (no push direction) first get a small kick (Cartesian, Å) of
#: each site, a fixed pseudo-random vector per site slot and step, so that the pairs have a
#: direction that respects the symmetry (a site on a mirror leaves it; two sites on one orbit
#: split).
_KICK_A = 1e-3
_KICKS = np.random.default_rng(20261204).normal(size=(64, 3))
_KICKS *= _KICK_A / np.linalg.norm(_KICKS, axis=1, keepdims=True)
_COINCIDENT_A = 1e-6


def drop_duplicate_fixed_sites(sg: np.ndarray, present: np.ndarray, letter_index: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray]:
    """``present`` without the repeats of a zero-freedom site (the same fixed letter twice in one
    template keeps its first slot), and the mask of the rows that lost a site."""
    sg = np.asarray(sg, dtype=np.int64)
    li = np.where(present, letter_index, 0)
    fixed = np.zeros(present.shape, dtype=bool)
    rows, slots = np.nonzero(present)
    keys = sg[rows] * 32 + li[rows, slots]
    uniq, inverse = np.unique(keys, return_inverse=True)
    dof = np.array([_position_by_index(k // 32, k % 32).dof for k in uniq.tolist()], dtype=np.int64)
    fixed[rows, slots] = dof[inverse] == 0 if len(uniq) else False
    drop = np.zeros(present.shape, dtype=bool)
    n_slots = present.shape[1]
    for j in range(1, n_slots):
        for i in range(j):
            drop[:, j] |= fixed[:, i] & fixed[:, j] & (li[:, i] == li[:, j]) & ~drop[:, i]
    return present & ~drop, np.asarray(drop.any(axis=1))


def _atom_operations(ex: ExpandedSites, site_first_atom: np.ndarray, sites: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For ``sites`` (indices into ``ex``): each site's first operation (R0, t0), which maps any
    point onto its representative form, and for every atom of those sites the orbit operation
    that generated it (atoms are stored in operation order). Returned over all sites / atoms of
    ``ex``, filled only for ``sites`` and their atoms."""
    K, A = len(ex.site_row), len(ex.atom_row)
    r0, t0 = np.zeros((K, 3, 3)), np.zeros((K, 3))
    a_rot, a_trans = np.zeros((A, 3, 3)), np.zeros((A, 3))
    op_index = np.arange(A) - site_first_atom[ex.atom_site]
    wanted = np.zeros(K, dtype=bool)
    wanted[sites] = True
    key = ex.site_sg * 32 + ex.site_letter_index
    atom_wanted = wanted[ex.atom_site]
    for k in np.unique(key[sites]).tolist():
        wp = _position_by_index(k // 32, k % 32)
        s_idx = np.flatnonzero(wanted & (key == k))
        r0[s_idx], t0[s_idx] = wp.rot[0], wp.trans[0]
        a_idx = np.flatnonzero(atom_wanted & (key[ex.atom_site] == k))
        a_rot[a_idx], a_trans[a_idx] = wp.rot[op_index[a_idx]], wp.trans[op_index[a_idx]]
    return r0, t0, a_rot, a_trans


def repair_free_parameters(
    ex: ExpandedSites, matrices: np.ndarray, rows: np.ndarray, *, min_distance_a: float, iterations: int = 20,
    max_elements: int = 2_000_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Push atoms closer than ``min_distance_a`` apart by moving the free parameters of their
    sites, within each site's Wyckoff form, for the templates in ``rows``.

    Each site is moved through its representative point ``p`` (the orbit's first atom); its atoms
    are ``R_m p + t_m`` for the position's operations, so every move keeps the site on its
    Wyckoff position and the template exactly symmetric. One step, vectorised over the templates
    of one atom count: for every pair (site reference atom, atom or periodic image) closer than
    ``(1 + 0.02) · min_distance_a``, the reference is pushed straight away from the other atom by
    the missing distance, half of it when the other atom moves too (same orbit or a free site),
    all of it when it sits on a fixed position; the summed Cartesian push (capped at
    ``min_distance_a``) is projected, in the cell metric, onto the directions the site's form
    leaves free (``R0 (R0ᵀ G R0)⁺ R0ᵀ G``, zero for a fixed position) and the point is mapped
    back onto its form by the position's first operation. A template stops moving once its
    shortest distance reaches ``min_distance_a`` or no site can move; each template keeps the
    positions with the largest shortest distance seen.

    Returns ``(site_points, best_min_distance, moved)``: representative points for every site of
    ``ex`` (changed only for sites of ``rows`` whose template improved), the shortest distance
    of each row of ``rows`` after the repair, and whether the row's points changed.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_total = matrices.shape[0]
    counts, starts, site_first_atom, row_first_site = _site_layout(ex, n_total)
    points = ex.atom_xyz[site_first_atom].copy() if len(ex.site_row) else np.zeros((0, 3))
    best_out = np.full(len(rows), np.inf)
    moved_out = np.zeros(len(rows), dtype=bool)
    if rows.size == 0:
        return points, best_out, moved_out
    n_sites = np.bincount(ex.site_row, minlength=n_total)
    in_rows = np.zeros(n_total, dtype=bool)
    in_rows[rows] = True
    row_sites = np.flatnonzero(in_rows[ex.site_row])
    r0_all, t0_all, rot_all, trans_all = _atom_operations(ex, site_first_atom, row_sites)
    movable_all = ex.site_dof > 0
    target = min_distance_a * (1.0 + _REPAIR_MARGIN)
    S = max(1, int(n_sites[rows].max()))
    pos_in_rows = np.zeros(n_total, dtype=np.int64)
    pos_in_rows[rows] = np.arange(len(rows))
    for N in np.unique(counts[rows]).tolist():
        rows_n = rows[counts[rows] == N]
        step_n = max(1, max_elements // (S * N * 27))
        for k0 in range(0, len(rows_n), step_n):
            chunk = rows_n[k0:k0 + step_n]
            B = len(chunk)
            atom_idx = starts[chunk][:, None] + np.arange(N)[None, :]  # (B, N)
            site_ok = np.arange(S)[None, :] < n_sites[chunk][:, None]  # (B, S)
            site_idx = np.where(site_ok, row_first_site[chunk][:, None] + np.arange(S)[None, :], 0)
            owner = ex.atom_site[atom_idx] - row_first_site[chunk][:, None]  # (B, N) local site
            first = np.where(site_ok, site_first_atom[site_idx] - starts[chunk][:, None], 0)  # (B, S)
            a_rot, a_trans = rot_all[atom_idx], trans_all[atom_idx]
            r0, t0 = r0_all[site_idx], t0_all[site_idx]
            movable = movable_all[site_idx] & site_ok
            mats = matrices[chunk]
            minv = np.linalg.inv(mats)
            G = np.einsum("bij,bkj->bik", mats, mats)
            r0tgr0 = np.einsum("bsji,bjk,bskl->bsil", r0, G, r0)
            proj = np.einsum("bsij,bsjk,bslk,blm->bsim", r0, np.linalg.pinv(r0tgr0), r0, G)
            p = points[site_idx]  # (B, S, 3)
            best = np.full(B, -np.inf)
            best_p = p.copy()
            active = np.ones(B, dtype=bool)
            jj = np.arange(N)
            for it in range(iterations + 1):
                a = np.flatnonzero(active)
                if a.size == 0:
                    break
                A_ = len(a)
                ps = p[a]
                x = np.einsum("bnij,bnj->bni", a_rot[a], ps[np.arange(A_)[:, None], owner[a]]) + a_trans[a]
                ref = x[np.arange(A_)[:, None], first[a]]  # (A_, S, 3)
                diff = ref[:, :, None, :] - x[:, None, :, :]
                diff -= np.round(diff)
                vec = diff[:, :, :, None, :] + _SHIFTS  # (A_, S, N, 27, 3)
                cart = np.matmul(vec.reshape(A_, -1, 3), mats[a]).reshape(vec.shape)
                d2 = np.einsum("bsnki,bsnki->bsnk", cart, cart)
                is_ref = jj[None, None, :] == first[a][:, :, None]  # (A_, S, N)
                d2[~site_ok[a]] = np.inf
                zero = d2[..., _ZERO_SHIFT]  # a view: the reference atom itself is no neighbour
                zero[is_ref] = np.inf
                row_min = np.sqrt(d2.reshape(A_, -1).min(axis=1))
                better = row_min > best[a]
                best[a[better]] = row_min[better]
                best_p[a[better]] = ps[better]
                done = row_min >= min_distance_a
                if it == iterations:
                    break
                # pushes: pairs below the target, not an atom with its own images (few: gathered)
                close = d2 < target * target
                close &= ~is_ref[..., None]
                b_, s_, n_, k_ = np.nonzero(close)
                dd = np.sqrt(d2[b_, s_, n_, k_])
                o = owner[a][b_, n_]  # the other atom's site
                w = np.where((o == s_) | movable[a][b_, o], 0.5, 1.0)
                push = (w * (target - dd) / np.maximum(dd, _COINCIDENT_A))[:, None] * cart[b_, s_, n_, k_]
                flat = b_ * S + s_
                dc = np.stack([np.bincount(flat, weights=push[:, i], minlength=A_ * S) for i in range(3)],
                              axis=1).reshape(A_, S, 3).astype(np.float64)  # Cartesian push of each site
                norm = np.linalg.norm(dc, axis=2, keepdims=True)
                dc *= np.minimum(1.0, min_distance_a / np.where(norm > 0, norm, 1.0))
                kick = row_min < _COINCIDENT_A
                dc[kick] = _KICKS[(np.arange(S) + 7 * it) % len(_KICKS)]
                df = np.einsum("bsi,bij->bsj", dc, minv[a])
                step = np.einsum("bsij,bsj->bsi", proj[a], df)
                step = np.where(movable[a][..., None], step, 0.0)
                new = np.mod(np.einsum("bsij,bsj->bsi", r0[a], ps + step) + t0[a], 1.0)
                new = np.where(site_ok[a][..., None], new, ps)
                stuck = np.abs(step).max(axis=(1, 2)) < 1e-12
                p[a] = new
                active[a[done | stuck]] = False
            changed = np.any(np.where(site_ok[..., None], best_p != points[site_idx], False), axis=(1, 2))
            write = site_ok & changed[:, None]
            points[site_idx[write]] = best_p[write]
            best_out[pos_in_rows[chunk]] = best
            moved_out[pos_in_rows[chunk]] = changed
    return points, best_out, moved_out


# ------------------------------------------------------------------------------- decoding
def decode_templates(
    x: np.ndarray,
    *,
    checkpoint_id: str,
    schema: EncodingSchema = DEFAULT_SCHEMA,
    allowed_spacegroups: Any | None = None,
    filters: TemplateFilters = TemplateFilters(),
) -> DecodeResult:
    """Decode generator vectors (n, dim) into valid, symmetric, deduplicated templates."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    raw = decode_vectors(x, schema=schema, allowed_spacegroups=allowed_spacegroups)
    timings["decode_vectors"] = time.perf_counter() - t
    return build_templates(raw.sg, raw.present, raw.letter_index, raw.xyz, raw.lattice,
                           checkpoint_id=checkpoint_id, filters=filters, timings=timings,
                           keep_volume_per_atom=schema.lattice_encoding == "vpa_ratios")


def build_templates(
    sg: np.ndarray, present: np.ndarray, letter_index: np.ndarray, xyz: np.ndarray, lattice: np.ndarray,
    *, checkpoint_id: str, filters: TemplateFilters = TemplateFilters(), timings: dict[str, float] | None = None,
    keep_volume_per_atom: bool = False,
) -> DecodeResult:
    """Templates from raw site arrays (see ``lib.encoding.DecodedArrays``): projection, orbit
    expansion, lattice constraints, rejections, filters, ids.

    Repairs (``filters.repair``, ``filters.dedupe_fixed_sites``; counted in
    ``DecodeResult.repairs``) run before the rejections they would avoid: repeated fixed sites
    are dropped before the orbits are expanded; a template still in the running whose shortest
    distance (or a coinciding orbit) is below ``min_distance_a`` gets the free-parameter repair
    (``repair_free_parameters``) and then, if still short, the isotropic rescaling (factor
    ``min_distance_a / min_distance``, applied only when it is at most ``max_rescale``). The
    distances, coincidences and volume are recomputed on the repaired template before the
    rejections. ``keep_volume_per_atom``: the lattice came from a volume per atom (the v2
    encoding), so a template that loses a repeated fixed site is scaled isotropically to keep
    the generator's volume per atom (its number density) rather than its cell volume.
    """
    timings = {} if timings is None else timings
    n = len(sg)
    sg = np.asarray(sg, dtype=np.int64)
    reason = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, why: str) -> None:
        m = mask & (reason == "")
        reason[m] = why

    t = time.perf_counter()
    # letters beyond a group's count cannot come out of decode_vectors; check anyway (raw input)
    if np.any(present & (letter_index >= letter_counts()[sg][:, None])):
        raise ValueError("letter index beyond the space group's Wyckoff positions")
    reject(present.sum(axis=1) == 0, "no_sites")
    lat = constrain_lattices(sg, lattice)
    volume = wyckoff.cell_volume(*(lat[:, i] for i in range(6)))
    reject(~np.isfinite(volume) | (volume < 1e-3), "invalid_lattice")
    repairs = dict.fromkeys(REPAIR_KINDS, 0)
    repair_stats: dict[str, float] = {}
    if filters.dedupe_fixed_sites:
        n_before = atoms_per_cell(sg, letter_index, present)
        present, deduped = drop_duplicate_fixed_sites(sg, present, letter_index)
        repairs["dedupe_fixed_site"] = int(np.sum(deduped & (reason == "")))
        if keep_volume_per_atom and deduped.any():
            lat = lat.copy()
            lat[deduped, :3] *= np.cbrt(atoms_per_cell(sg, letter_index, present)[deduped] / n_before[deduped])[:, None]
            volume = wyckoff.cell_volume(*(lat[:, i] for i in range(6)))
    ex = expand_sites(sg, present, letter_index, xyz)
    timings["expand_orbits"] = time.perf_counter() - t
    t = time.perf_counter()
    # two sites on the same zero-freedom position of one template
    fixed = ex.site_dof == 0
    fk = ex.site_row[fixed] * 64 + ex.site_letter_index[fixed]
    u, c = np.unique(fk, return_counts=True)
    dup_rows = np.zeros(n, dtype=bool)
    dup_rows[(u[c > 1] // 64)] = True
    reject(dup_rows, "duplicate_fixed_site")
    n_atoms = np.bincount(ex.atom_row, minlength=n)
    n_sites = np.bincount(ex.site_row, minlength=n)
    reject(n_atoms > filters.max_atoms, "too_many_atoms")
    mats = lattice_matrices(lat)
    todo = np.flatnonzero(reason == "")
    dist = periodic_distances(ex, mats, todo, coincidence_tol_a=filters.coincidence_tol_a)
    min_d = np.full(n, np.nan)
    min_d[todo] = dist["min_distance_a"]
    deg = np.zeros(n, dtype=bool)
    deg[todo] = dist["degenerate"]
    ovl = np.zeros(n, dtype=bool)
    ovl[todo] = dist["overlap"]
    timings["distances"] = time.perf_counter() - t
    if filters.repair in ("free_params", "free_params+rescale"):
        t = time.perf_counter()
        cand = np.flatnonzero((reason == "") & (min_d < filters.min_distance_a))
        repairs["free_params_attempted"] = len(cand)
        points, _, moved = repair_free_parameters(ex, mats, cand, min_distance_a=filters.min_distance_a,
                                                  iterations=filters.repair_iterations)
        moved_rows = cand[moved]
        if moved_rows.size:
            old_points = ex.atom_xyz[_site_layout(ex, n)[2]]
            site_moved = np.isin(ex.site_row, moved_rows)
            xyz = np.array(xyz, dtype=np.float64, copy=True)
            xyz[ex.site_row[site_moved], ex.site_slot[site_moved]] = points[site_moved]
            ex = expand_sites(sg, present, letter_index, xyz)
            shift = points[site_moved] - old_points[site_moved]
            shift -= np.round(shift)
            shift_a = np.linalg.norm(np.einsum("ki,kij->kj", shift, mats[ex.site_row[site_moved]]), axis=1)
            dist = periodic_distances(ex, mats, moved_rows, coincidence_tol_a=filters.coincidence_tol_a)
            min_d[moved_rows] = dist["min_distance_a"]
            deg[moved_rows] = dist["degenerate"]
            ovl[moved_rows] = dist["overlap"]
            fixed_rows = min_d[moved_rows] >= filters.min_distance_a
            repairs["free_params"] = int(fixed_rows.sum())
            moved_fixed = np.isin(ex.site_row[site_moved], moved_rows[fixed_rows]) & (shift_a > 0)
            if moved_fixed.any():
                repair_stats["free_params_shift_mean_a"] = float(shift_a[moved_fixed].mean())
                repair_stats["free_params_shift_max_a"] = float(shift_a[moved_fixed].max())
        timings["repair_free_params"] = time.perf_counter() - t
    if filters.repair in ("rescale", "free_params+rescale"):
        t = time.perf_counter()
        short = (reason == "") & (min_d < filters.min_distance_a) & ~deg & ~ovl & (min_d > 0)
        factor = np.ones(n)
        with np.errstate(divide="ignore"):
            factor[short] = filters.min_distance_a / min_d[short] * (1.0 + 1e-9)
        scale_rows = np.flatnonzero(short & (factor <= filters.max_rescale))
        if scale_rows.size:
            f = factor[scale_rows]
            lat = lat.copy()
            lat[scale_rows, :3] *= f[:, None]
            volume = wyckoff.cell_volume(*(lat[:, i] for i in range(6)))
            mats = lattice_matrices(lat)
            dist = periodic_distances(ex, mats, scale_rows, coincidence_tol_a=filters.coincidence_tol_a)
            min_d[scale_rows] = dist["min_distance_a"]
            repairs["rescale"] = len(scale_rows)
            repair_stats.update(rescale_factor_mean=float(f.mean()), rescale_factor_median=float(np.median(f)),
                                rescale_factor_max=float(f.max()),
                                rescale_density_ratio_mean=float(np.mean(f ** -3.0)))
        timings["repair_rescale"] = time.perf_counter() - t
    t = time.perf_counter()
    reject(deg, "degenerate_orbit")
    reject(ovl, "overlapping_orbits")
    reject(min_d < filters.min_distance_a, "min_distance")
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = number_density(n_atoms, volume)
    reject(dens < filters.min_density_per_a3, "density_low")
    reject(dens > filters.max_density_per_a3, "density_high")
    keep = reason == ""
    rejects = {r: int(np.sum(reason == r)) for r in REJECT_REASONS}
    frame = _template_frame(ex, keep, sg, lat, volume, n_atoms, n_sites, dens, min_d, checkpoint_id)
    n_valid = frame.height
    frame = frame.unique(subset="template_id", keep="first", maintain_order=True)
    timings["assemble"] = time.perf_counter() - t
    return DecodeResult(templates=frame, n_samples=n, n_valid=n_valid, rejects=rejects,
                        n_duplicates=n_valid - frame.height, timings_s=timings, repairs=repairs,
                        repair_stats=repair_stats)


def _template_frame(ex: ExpandedSites, keep: np.ndarray, sg, lat, volume, n_atoms, n_sites, dens, min_d,
                    checkpoint_id: str) -> pl.DataFrame:
    rows = np.flatnonzero(keep)
    site_keep = keep[ex.site_row]
    s_row = ex.site_row[site_keep]
    ns = n_sites[rows]
    offsets = np.concatenate([[0], np.cumsum(ns)])
    letters = ex.site_letter[site_keep]
    mult = ex.site_mult[site_keep]
    coords = ex.site_xyz[site_keep]
    coord_lists = pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(coords.reshape(-1), type=pa.float64()), 3).cast(
            pa.list_(pa.float64())),
    )
    del s_row
    tbl = pa.table({
        "checkpoint_id": pa.array([checkpoint_id] * len(rows), type=pa.string()),
        "spacegroup_number": pa.array(sg[rows], type=pa.int64()),
        "crystal_system": pa.array(crystal_systems(sg[rows]).astype(str), type=pa.string()),
        "n_sites": pa.array(ns, type=pa.int64()),
        "wyckoff_letters": _list_column(letters.astype(str), offsets, pa.string()),
        "multiplicities": _list_column(mult.astype(np.int64), offsets, pa.int64()),
        "asu_frac_coords": coord_lists,
        "a_a": pa.array(lat[rows, 0]), "b_a": pa.array(lat[rows, 1]), "c_a": pa.array(lat[rows, 2]),
        "alpha_deg": pa.array(lat[rows, 3]), "beta_deg": pa.array(lat[rows, 4]),
        "gamma_deg": pa.array(lat[rows, 5]),
        "volume_a3": pa.array(volume[rows]),
        "n_atoms": pa.array(n_atoms[rows], type=pa.int64()),
        "number_density_per_a3": pa.array(dens[rows]),
        "min_distance_a": pa.array(min_d[rows]),
    })
    df = cast(pl.DataFrame, pl.from_arrow(tbl))  # a Table gives a DataFrame
    df = df.with_columns(
        pl.concat_str([pl.col("spacegroup_number").cast(pl.String),
                       pl.col("wyckoff_letters").list.join(" ")], separator=" ").alias("wyckoff_sequence"),
    )
    key = pl.concat_str([
        pl.col("spacegroup_number").cast(pl.String),
        pl.col("wyckoff_letters").list.join(","),
        pl.col("asu_frac_coords").list.eval(
            pl.element().list.eval(pl.element().round(6).cast(pl.String)).list.join(",")).list.join(";"),
        pl.concat_str([pl.col(c).round(4).cast(pl.String) for c in
                       LATTICE_COLUMNS], separator=","),
    ], separator="|")
    df = df.with_columns(hash_column(key, prefix="tpl-").alias("template_id"))
    return df.select(TEMPLATE_COLUMNS)


# ------------------------------------------------------------------------------- symmetry check
@lru_cache(maxsize=1)
def _hall_numbers() -> dict[int, list[int]]:
    import spglib

    out: dict[int, list[int]] = {}
    for h in range(1, 531):
        sg_type = spglib.get_spacegroup_type(h)
        if sg_type is None:
            raise RuntimeError(f"spglib has no space-group type for Hall number {h}")
        out.setdefault(int(sg_type.number), []).append(h)
    return out


@lru_cache(maxsize=256)
def spglib_operations(sg: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rotations, translations, hall_number) from spglib's database for ``sg`` in the setting of
    the templates (conventional cell, pyxtal's tables).

    spglib's default Hall setting for a group is its smallest Hall number. pyxtal uses the same
    setting except for the 24 centrosymmetric groups with two origin choices (48, 50, 59, 68, 70,
    85, 86, 88, 125, 126, 129, 130, 133, 134, 137, 138, 141, 142, 201, 203, 222, 224, 227, 228),
    where it uses origin choice 2 (the next Hall number). We take the Hall number of the group
    whose operation set equals pyxtal's general position, and raise if none does.
    """
    import spglib

    from lib.wyckoff import letters, position

    halls = _hall_numbers()[sg]
    general = max((position(sg, letter) for letter in letters(sg)), key=lambda w: w.multiplicity)

    def opset(rot, trans):
        return sorted((tuple(np.rint(r).astype(int).ravel()), tuple(np.round(np.mod(t, 1.0), 6) % 1.0))
                      for r, t in zip(rot, trans, strict=True))

    target = opset(general.rot, general.trans)
    for h in halls:
        s = spglib.get_symmetry_from_database(h)
        if s is None:
            raise RuntimeError(f"spglib has no symmetry operations for Hall number {h}")
        if opset(s["rotations"], s["translations"]) == target:
            return np.asarray(s["rotations"], dtype=np.float64), np.asarray(s["translations"]), h
    raise ValueError(f"no spglib Hall setting of space group {sg} matches pyxtal's general position")


def check_symmetry(df: pl.DataFrame, *, tol_a: float = 1e-4, metric_rtol: float = 1e-6) -> pl.DataFrame:
    """Symmetry exactness of templates, with operations independent of the decoder.

    The cell is rebuilt from the stored columns (each representative expanded through its
    Wyckoff orbit, as ``lib.wyckoff.expand_asu`` does for every downstream consumer). Then, with
    the operations (R, t) of the group taken from spglib's database (``spglib_operations``) and
    the *stored* representative point of each site (not projected):

    1. the lattice metric is invariant under every R: ``Rᵀ G R = G`` (relative ``metric_rtol``);
    2. the spglib orbit of each stored point equals the set of that site's atoms in the cell:
       every image (R p + t) lands on one of the site's atoms and every atom is such an image
       (modulo lattice translations, within ``tol_a`` Å). A point off its Wyckoff position, a
       wrong letter or a missing orbit point all fail here;
    3. the atoms of one site are distinct (no two closer than ``tol_a``), their number equals
       the stored multiplicity and their total equals ``n_atoms`` (when stored).

    Returns ``template_id``, ``is_symmetric``, ``n_ops``, ``max_deviation_a`` (largest distance
    from a mapped atom to its nearest same-site atom).
    """
    out_schema = {"template_id": pl.String, "is_symmetric": pl.Boolean, "n_ops": pl.Int64,
                  "max_deviation_a": pl.Float64}
    if df.height == 0:
        return pl.DataFrame(schema=out_schema)
    max_sites = int(cast(int, df["wyckoff_letters"].list.len().max()))
    arrs = template_arrays(df, schema=EncodingSchema(max_sites=max_sites))
    sg = arrs["sg"]
    # stored points are expanded as they are (not projected), so a point off its position fails
    ex = expand_sites(sg, arrs["present"], arrs["letter_index"], arrs["xyz"], project=False)
    mats = lattice_matrices(arrs["lattice"])
    n = df.height
    counts = np.bincount(ex.atom_row, minlength=n)
    starts = np.cumsum(counts) - counts
    ok = np.ones(n, dtype=bool)
    # (3) counts against the stored multiplicities / n_atoms
    site_counts = np.bincount(ex.atom_site, minlength=len(ex.site_row))
    if "multiplicities" in df.columns:
        stored = df["multiplicities"].explode().to_numpy().astype(np.int64)
        # sites come back ordered by (row, letter index); reorder the stored ones the same way
        li_flat = arrs["letter_index"][arrs["present"]]  # row-major = exploded order
        row_flat = np.nonzero(arrs["present"])[0]
        order = np.lexsort((np.arange(len(stored)), li_flat, row_flat))
        bad_site = site_counts != stored[order]
        ok[np.unique(ex.site_row[bad_site])] = False
    if "n_atoms" in df.columns:
        ok &= counts == df["n_atoms"].to_numpy()
    n_ops = np.zeros(n, dtype=np.int64)
    max_dev = np.full(n, np.nan)
    _, _, _, row_first_site = _site_layout(ex, n)
    n_sites = np.bincount(ex.site_row, minlength=n)
    S = max(1, int(n_sites.max()))
    for g in np.unique(sg).tolist():
        rot, trans, _ = spglib_operations(int(g))
        n_op = len(rot)
        rows_g = np.flatnonzero(sg == g)
        n_ops[rows_g] = n_op
        G = np.einsum("bij,bkj->bik", mats[rows_g], mats[rows_g])
        RtGR = np.einsum("oji,bjk,okl->boil", rot, G, rot)
        scale = np.abs(G).max(axis=(1, 2))[:, None, None, None]
        ok[rows_g] &= np.all(np.abs(RtGR - G[:, None]) <= metric_rtol * scale, axis=(1, 2, 3))
        for N in np.unique(counts[rows_g]).tolist():
            rows_n = rows_g[counts[rows_g] == N]
            step = max(1, 2_000_000 // max(1, S * n_op * N + N * N))
            eye = np.eye(N, dtype=bool)
            for k in range(0, len(rows_n), step):
                rr = rows_n[k:k + step]
                B = len(rr)
                atom_idx = starts[rr][:, None] + np.arange(N)[None, :]
                frac = ex.atom_xyz[atom_idx]  # (B, N, 3): the decoder's cell
                own = ex.atom_site[atom_idx]
                site_ok = np.arange(S)[None, :] < n_sites[rr][:, None]
                site_idx = np.where(site_ok, row_first_site[rr][:, None] + np.arange(S)[None, :], -1)
                si = np.maximum(site_idx, 0)
                ref = np.mod(arrs["xyz"][ex.site_row[si], ex.site_slot[si]], 1.0)  # (B, S, 3) stored points
                # atoms of one site are distinct
                d0 = frac[:, :, None, :] - frac[:, None, :, :]
                d0 -= np.round(d0)
                c0 = np.matmul(d0.reshape(B, -1, 3), mats[rr]).reshape(B, N, N, 3)
                same0 = own[:, :, None] == own[:, None, :]
                ok[rr] &= ~np.any((np.einsum("bnmi,bnmi->bnm", c0, c0) < tol_a**2) & same0 & ~eye, axis=(1, 2))
                # spglib orbit of each reference point vs the decoder's atoms of that site
                img = np.einsum("oij,bsj->bsoi", rot, ref) + trans[None, None]  # (B, S, O, 3)
                diff = img[:, :, :, None, :] - frac[:, None, None, :, :]  # (B, S, O, N, 3)
                diff -= np.round(diff)
                cart = np.matmul(diff.reshape(B, -1, 3), mats[rr]).reshape(diff.shape)
                d = np.sqrt(np.einsum("bsoni,bsoni->bson", cart, cart))
                same = (own[:, None, :] == site_idx[:, :, None])[:, :, None, :]  # (B, S, 1, N)
                d = np.where(same, d, np.inf)
                # every image lands on an atom of its site ...
                img_dev = np.where(site_ok[:, :, None], d.min(axis=3), 0.0).reshape(B, -1).max(axis=1)
                # ... and every atom of the site is an image (the decoder's orbit = spglib's orbit)
                atom_dev = np.where(same[:, :, 0, :], d.min(axis=2), -np.inf).max(axis=1)  # (B, N)
                atom_dev = atom_dev.max(axis=1)
                dev = np.maximum(img_dev, atom_dev)
                max_dev[rr] = dev
                ok[rr] &= dev <= tol_a
    ids = df["template_id"] if "template_id" in df.columns else pl.Series([""] * n, dtype=pl.String)
    return pl.DataFrame({"template_id": ids, "is_symmetric": ok, "n_ops": n_ops, "max_deviation_a": max_dev},
                        schema=out_schema)


# ------------------------------------------------------------------------------- quality metrics
def density_overlap(p_values: np.ndarray, q_values: np.ndarray, *, bins: int = 50,
                    quantile_range: tuple[float, float] = (0.005, 0.995)) -> float:
    """Overlap of two distributions (e.g. atomic number densities, atoms/Å^3) as the histogram
    intersection ``Σ_i min(p_i, q_i)``.

    Both samples are binned on the same ``bins`` equal-width bins spanning the
    ``quantile_range`` quantiles of the pooled sample (values outside are counted in the end
    bins), each histogram is normalised to sum 1, and the overlap is the sum of the binwise
    minima: 1 for identical histograms, 0 for disjoint ones.
    """
    p = np.asarray(p_values, dtype=np.float64)
    q = np.asarray(q_values, dtype=np.float64)
    p, q = p[np.isfinite(p)], q[np.isfinite(q)]
    if p.size == 0 or q.size == 0:
        return 0.0
    lo, hi = np.quantile(np.concatenate([p, q]), quantile_range)
    if hi <= lo:
        hi = lo + 1e-12
    edges = np.linspace(lo, hi, bins + 1)
    hp = np.bincount(np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1), minlength=bins)
    hq = np.bincount(np.clip(np.searchsorted(edges, q, side="right") - 1, 0, bins - 1), minlength=bins)
    return float(np.minimum(hp / hp.sum(), hq / hq.sum()).sum())


#: The sample size the density-overlap gate was calibrated on (benchmarks/bench_generator.py:
#: 100,000 raw samples per seed); smaller runs read lower from histogram noise alone.
GATE_CALIBRATION_SAMPLES = 100_000


def density_overlap_floor(reference: np.ndarray, n: int, *, seed: int = 0, repeats: int = 5) -> float:
    """The density overlap that ``n`` values drawn from ``reference`` itself reach against it (mean
    of ``repeats`` seeded draws): the ceiling a perfect generator has at that sample size, so a
    run of a few thousand templates is judged against its own noise, not only the gate."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0 or n <= 0:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.mean([density_overlap(rng.choice(ref, size=n, replace=True), ref) for _ in range(repeats)]))


def total_variation(p_values: np.ndarray, q_values: np.ndarray) -> float:
    """Total-variation distance ``½ Σ |p_k - q_k|`` between the empirical distributions of two
    samples of discrete labels (0 = identical, 1 = disjoint)."""
    p_values, q_values = np.asarray(p_values), np.asarray(q_values)
    labels = np.union1d(p_values, q_values)
    p = np.searchsorted(labels, p_values)
    q = np.searchsorted(labels, q_values)
    hp = np.bincount(p, minlength=len(labels)) / max(len(p), 1)
    hq = np.bincount(q, minlength=len(labels)) / max(len(q), 1)
    return float(0.5 * np.abs(hp - hq).sum())


def lattice_distances(generated: pl.DataFrame, training: pl.DataFrame) -> dict[str, float]:
    """1-D Wasserstein distances between generated and training lattice parameters (Å, degrees,
    Å^3 for the volume; ``scipy.stats.wasserstein_distance``)."""
    from scipy.stats import wasserstein_distance

    out: dict[str, float] = {}
    for col in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg", "volume_a3"):
        if col in generated.columns and col in training.columns and generated.height and training.height:
            out[f"wasserstein_{col}"] = float(wasserstein_distance(generated[col].to_numpy(), training[col].to_numpy()))
    return out


def template_fingerprints(df: pl.DataFrame, *, coord_step: float = 0.05, ln_length_step: float = 0.05,
                          angle_step_deg: float = 2.0) -> pl.Series:
    """A coarse structural key of each template, for uniqueness and novelty.

    Key = space group ⊕ sorted (letter, canonical representative binned to ``coord_step``) ⊕
    lattice lengths binned on a log scale (``ln_length_step`` ≈ 5 %) ⊕ angles binned to
    ``angle_step_deg``. Representatives are made canonical (smallest orbit point in the
    position's representative form) before binning, so different representatives of the same
    orbit give one key; origin shifts and other normaliser operations are not folded, so
    novelty measured with it is an upper bound.
    """
    max_sites = max(1, int(cast(int, df["wyckoff_letters"].list.len().max() or 1)))
    arrs = template_arrays(df, schema=EncodingSchema(max_sites=max_sites))
    ex = expand_sites(arrs["sg"], arrs["present"], arrs["letter_index"], arrs["xyz"])
    lat = arrs["lattice"]
    site_bins = np.floor(np.mod(ex.site_xyz + coord_step / 2, 1.0) / coord_step).astype(np.int64)
    site_key = (ex.site_letter_index * 10**6 + site_bins[:, 0] * 10**4 + site_bins[:, 1] * 10**2 + site_bins[:, 2])
    sites = pl.DataFrame({"row": ex.site_row, "k": site_key}).sort(["row", "k"]).group_by(
        "row", maintain_order=True).agg(pl.col("k").cast(pl.String).str.join(","))
    lb = np.floor(np.log(lat[:, :3]) / ln_length_step).astype(np.int64)
    ab = np.floor(lat[:, 3:] / angle_step_deg + 0.5).astype(np.int64)
    base = pl.DataFrame({"row": np.arange(df.height), "sg": arrs["sg"],
                         "lat": [",".join(map(str, r)) for r in np.concatenate([lb, ab], axis=1).tolist()]})
    key = base.join(sites, on="row", how="left").sort("row").select(
        pl.concat_str([pl.col("sg").cast(pl.String), pl.col("k"), pl.col("lat")], separator="|"))
    return key.to_series().alias("fingerprint")


def training_density(training: pl.DataFrame) -> np.ndarray:
    """Number density of training templates, computed exactly as for generated ones: the sum of
    the site multiplicities over the conventional-cell volume from the six lattice parameters."""
    if "multiplicities" in training.columns:
        n_atoms = training["multiplicities"].list.sum().to_numpy()
    else:
        n_atoms = training["n_atoms"].to_numpy()
    vol = wyckoff.cell_volume(*(training[c].to_numpy() for c in
                                LATTICE_COLUMNS))
    return number_density(n_atoms, vol)


def quality_report(result: DecodeResult, training: pl.DataFrame, *, symmetry: pl.DataFrame | None = None
                   ) -> dict[str, Any]:
    """Quality metrics of one generation run against the training templates.

    * ``validity``: valid samples / raw samples (decoded and passed every filter);
    * ``symmetry_exactness``: share of stored templates passing ``check_symmetry``;
    * ``uniqueness``: distinct fingerprints / valid templates; ``uniqueness_exact``: distinct
      ``template_id`` / valid;
    * ``novelty``: share of distinct generated fingerprints absent from the training
      fingerprints; ``novelty_wyckoff_sequence``: share of templates whose space group + sorted
      Wyckoff letters never occur in training;
    * ``density_overlap``: ``density_overlap`` of generated vs training number densities;
    * ``spacegroup_tv`` / ``n_sites_tv``: total-variation distances; lattice Wasserstein distances.
    """
    gen = result.templates
    out: dict[str, Any] = {
        "n_samples": result.n_samples, "n_valid": result.n_valid, "n_templates": gen.height,
        "validity": result.validity, "uniqueness_exact": result.uniqueness_exact,
        "rejects": result.rejects,
    }
    if symmetry is not None:
        out["symmetry_exactness"] = float(cast(float, symmetry["is_symmetric"].mean())) if symmetry.height else 0.0
        out["symmetry_max_deviation_a"] = (float(cast(float, symmetry["max_deviation_a"].max() or 0.0))
                                           if symmetry.height else None)
    if gen.height == 0 or training.height == 0:
        return out
    fp_gen = template_fingerprints(gen)
    fp_train = set(template_fingerprints(training).to_list())
    uniq = fp_gen.unique()
    out["uniqueness"] = uniq.len() / result.n_valid if result.n_valid else 0.0
    out["novelty"] = float(np.mean([f not in fp_train for f in uniq.to_list()]))
    seq_train = set(_sorted_sequences(training).to_list())
    out["novelty_wyckoff_sequence"] = float(np.mean([s not in seq_train for s in _sorted_sequences(gen).to_list()]))
    out["density_overlap"] = density_overlap(gen["number_density_per_a3"].to_numpy(), training_density(training))
    out["spacegroup_tv"] = total_variation(gen["spacegroup_number"].to_numpy(), training["spacegroup_number"].to_numpy())
    out["n_sites_tv"] = total_variation(gen["wyckoff_letters"].list.len().to_numpy(),
                                        training["wyckoff_letters"].list.len().to_numpy())
    tr = training
    if "volume_a3" not in tr.columns:
        tr = tr.with_columns(pl.Series("volume_a3", wyckoff.cell_volume(
            *(tr[c].to_numpy() for c in LATTICE_COLUMNS))))
    out.update(lattice_distances(gen, tr))
    return out


def _sorted_sequences(df: pl.DataFrame) -> pl.Series:
    return df.select(pl.concat_str([pl.col("spacegroup_number").cast(pl.String),
                                    pl.col("wyckoff_letters").list.sort().list.join(" ")],
                                   separator=" ")).to_series()


# ------------------------------------------------------------------------------- plots
def distributions_figure(gen: pl.DataFrame, training: pl.DataFrame):
    """Matplotlib figure: number density, space group, ASU sites, a/c, volume (generated vs training)."""
    fig, axes = subplots(2, 3, figsize=(13, 7))
    dg = gen["number_density_per_a3"].to_numpy()
    dt = training_density(training)
    lo, hi = np.quantile(np.concatenate([dg, dt]), [0.005, 0.995])
    bins = np.linspace(lo, hi, 50)
    ax = axes[0, 0]
    ax.hist(dt, bins=bins, density=True, alpha=0.5, label="training")
    ax.hist(dg, bins=bins, density=True, alpha=0.5, label="generated")
    ax.set_title(f"number density (overlap {density_overlap(dg, dt):.3f})")
    ax.set_xlabel("atoms / Å³")
    ax.legend()
    ax = axes[0, 1]
    sb = np.arange(1, 232)
    ax.hist(training["spacegroup_number"].to_numpy(), bins=sb, density=True, alpha=0.5, label="training")
    ax.hist(gen["spacegroup_number"].to_numpy(), bins=sb, density=True, alpha=0.5, label="generated")
    ax.set_title("space group")
    ax = axes[0, 2]
    nb = np.arange(0.5, 5.5)
    ax.hist(training["wyckoff_letters"].list.len().to_numpy(), bins=nb, density=True, alpha=0.5, label="training")
    ax.hist(gen["n_sites"].to_numpy(), bins=nb, density=True, alpha=0.5, label="generated")
    ax.set_title("ASU sites")
    for ax, col in zip(axes[1], ("a_a", "c_a", "n_atoms"), strict=True):
        t = training[col].to_numpy() if col in training.columns else training["multiplicities"].list.sum().to_numpy()
        g = gen[col].to_numpy()
        lo, hi = np.quantile(np.concatenate([t, g]), [0.0, 0.995])
        b = np.linspace(lo, hi, 50)
        ax.hist(t, bins=b, density=True, alpha=0.5, label="training")
        ax.hist(g, bins=b, density=True, alpha=0.5, label="generated")
        ax.set_title(col)
    fig.tight_layout()
    return fig


def tsne_figure(real_features: np.ndarray, fake_features: np.ndarray, *, seed: int = 0, perplexity: float = 30.0):
    """t-SNE (sklearn) of critic latent features, real vs generated (paper Figure 3B)."""
    from sklearn.manifold import TSNE

    X = np.concatenate([real_features, fake_features]).astype(np.float64)
    perplexity = min(perplexity, max(2.0, (len(X) - 1) / 3))
    emb = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(X)
    n = len(real_features)
    fig, ax = subplots(figsize=(6, 6))
    ax.scatter(emb[:n, 0], emb[:n, 1], s=4, alpha=0.5, label=f"training ({n})")
    ax.scatter(emb[n:, 0], emb[n:, 1], s=4, alpha=0.5, label=f"generated ({len(fake_features)})")
    ax.set_title("t-SNE of critic latent features")
    ax.legend()
    return fig
