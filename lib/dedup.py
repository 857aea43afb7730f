"""Deduplicate candidates within a chemical system and flag those already known in the Materials Project.

Three stages, each cheap enough for the 1.35 M Ba-Ru-O candidates of 120,000 templates:

1. **Exact duplicates by fingerprint** (``lib.infill`` structure fingerprint: isometry- and
   scale-invariant). One ``group_by``; the smallest ``candidate_id`` of a group represents it.
2. **StructureMatcher inside buckets that could match.** A bucket holds fingerprint
   representatives with the same reduced formula, space group, number of atoms and *prototype
   label* (the multiset of ``element:Wyckoff letter``, minimised over the letter permutations of
   the space group's normalizer in pyxtal's table, which holds the origin shifts and, for the
   orthorhombic groups that allow it, the axis permutations). Inside a bucket:

   * a **pre-screen** drops pairs that cannot match: volume-normalised lattice lengths
     (sorted where the normalizer permutes axes) within ``ltol``, angles within ``angle_tol``,
     and, per pair of element types, the sorted shortest orbit-orbit distances over
     ``(V/N)^(1/3)`` within the change the matcher allows (``|x1 - x2| <= a + b max(x1, x2)``
     with ``a = 2 stol (1 + ltol)`` for two atoms each displaced by up to ``stol`` and
     ``b = (1 + ltol)(1 + angle_tol) - 1`` for the strain of the cell). Pairs are found with a
     KD-tree in that (log-transformed) space. The bound assumes that a match maps Wyckoff orbits
     onto orbits and the cells onto each other (up to the normalizer), which holds unless a
     structure is within tolerance of a higher symmetry. A fixed ``distance_window`` (the earlier,
     tighter screen) is still accepted and is much faster, but it skips pairs that do match
     (on the full Ba-Ru-O set it keeps 7,121 more candidates; ``benchmarks/bench_dedup.py``);
   * each structure is rebuilt and **reduced once** (primitive cell, then Niggli): the centring
     of the space group gives the primitive cell directly; when pymatgen's candidate-translation
     filter (mirrored here, same 0.25 A tolerance) finds translations beyond the centring, exact
     ones go to spglib's primitive cell (positions not idealised) and near-translations to
     pymatgen's own reduction of the centred cell. pymatgen's reduction depends on the input
     cell at its tolerance, so for such near-translation cases the primitive cell can differ from
     the one StructureMatcher's reduction of the conventional cell gives (3 of 3,000 sampled
     candidates; 2 of 2,000 sampled pair verdicts);
   * representatives are chosen like pymatgen's ``StructureMatcher.group_structures``: members in
     ``candidate_id`` order, each compared (``fit(representative, member)``) with the earlier
     representatives that passed the pre-screen and have as many atoms in the primitive cell,
     in id order, and folded into the first that matches; otherwise it becomes a representative.
     So every folded candidate matched its representative directly (no chains).
     :func:`fit_reduced` is ``StructureMatcher.fit(s1, s2, skip_structure_reduction=True)`` on the
     reduced cells without its per-call copies; the tests check identical decisions on real pairs.
3. **Against MP**: representatives whose reduced formula appears among the system's MP
   structures, and whose primitive cell could hold as many atoms as the MP structure's (the
   conventional atom count over the centring multiplicity is a multiple of the MP primitive
   count), are matched with StructureMatcher (pymatgen's default tolerances) against every such
   MP structure; a match sets ``is_known_in_mp`` and keeps the ``mp_material_id`` (the first
   matching id in id order). Nothing is deleted.

Why the bucket key cannot split a duplicate: ``fit`` requires the same reduced formula (its
comparator hash) and, without supercells, the same number of sites after reduction. Candidates
are exact realisations of their template's space group in its standard setting, so two
descriptions of one crystal in the same group differ by an element of the group's normalizer,
which maps Wyckoff letters onto Wyckoff letters (the label is minimised over those) and keeps
the atom count. What the key does not cover, by construction: the same crystal reached from
templates of *different* space groups (a structure whose real symmetry is higher than its
template's, e.g. P4/mmm with c = a), from monoclinic/triclinic cells in different cell
choices (not in pyxtal's normalizer table), or from a template whose sites happen to repeat
with a translation beyond the centring (a smaller crystal described in a larger cell, bucketed
by the larger atom count). Those stay separate candidates.

Buckets are matched through :func:`lib.parallel.map_row_chunks` (Ray tasks with ``use_ray``,
else ``workers`` local processes); the work is dealt by cost so that the chunks are even, and every
decision is made inside one bucket, so the output does not depend on the number of workers.
Every compared pair is counted.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import polars as pl

from lib import contracts, wyckoff
from lib.cells import (
    ASU_COLUMNS,
    MATCHER_TOLERANCES,
    asu_to_structure,
    atomic_number,
    cell_to_structure,
    element_symbol,
    lattice_matrix,
    lattice_parameters,
    minimum_image,
)
from lib.infill import (
    explode_sites,
    fold_hash,
    group_rows,
    letter_indices,
    normalizer_ops,
    site_distance_matrix,
)
from lib.parallel import map_row_chunks
from lib.wyckoff import LATTICE_COLUMNS

#: StructureMatcher settings against MP: pymatgen's defaults (what the paper used).
MP_MATCHER_DEFAULTS = {**MATCHER_TOLERANCES, "primitive_cell": True, "scale": True}
#: Within the system: near-identical duplicates only. pymatgen's loose defaults would compare
#: (and fold) about 30% of the bucketed candidates of random templates.
MATCHER_DEFAULTS = {"ltol": 0.05, "stol": 0.05, "angle_tol": 1.0, "primitive_cell": True, "scale": True}
#: pymatgen's ``get_primitive_structure`` tolerance (A), used by StructureMatcher.
PRIMITIVE_TOLERANCE = 0.25

#: The columns ``candidates_dedup`` adds to ``candidates``.
DEDUP_EXTRA_SCHEMA: dict[str, pl.DataType] = contracts.schema(
    "candidates_dedup", exclude=contracts.schema("candidates"))

_NARROW = ("candidate_id", "fingerprint", "reduced_formula", "spacegroup_number", "n_atoms",
           "asu_letters", "asu_species", "asu_frac_coords", *LATTICE_COLUMNS)
_STRUCT = ("candidate_id", "spacegroup_number", "asu_letters", "asu_species", "asu_frac_coords",
           *LATTICE_COLUMNS)
_BUCKET_STATS = ("pairs_compared", "pairs_skipped_primitive", "pairs_skipped_folded",
                 "structures_reduced", "reduce_fallbacks")


@dataclass
class DedupResult:
    """Per unique candidate: ``candidate_id``, ``n_folded``, ``is_known_in_mp``, ``mp_material_id``;
    per folded candidate: ``folded`` (``candidate_id``, ``representative_id``, ``reason``)."""

    unique: pl.DataFrame
    folded: pl.DataFrame
    n_input: int = 0
    n_folded_fingerprint: int = 0
    n_folded_matcher: int = 0
    n_buckets: int = 0
    n_bucket_members: int = 0
    largest_bucket: int = 0
    n_pairs_in_buckets: int = 0
    n_pairs_screened_out: int = 0
    n_pairs_prescreen_passed: int = 0
    n_pairs_compared: int = 0
    n_pairs_skipped_primitive: int = 0
    n_pairs_skipped_folded: int = 0
    n_structures_reduced: int = 0
    n_reduce_fallbacks: int = 0
    n_mp_references: int = 0
    n_mp_candidates: int = 0
    n_mp_pairs_compared: int = 0
    n_mp_matches: int = 0
    mp_matches_by_material: dict[str, int] = field(default_factory=dict)
    prescreen: str = "derived"
    seconds_fingerprint: float = 0.0
    seconds_prescreen: float = 0.0
    seconds_matcher: float = 0.0
    seconds_mp: float = 0.0
    backend: str = "local"
    workers: int = 1

    @property
    def n_unique(self) -> int:
        return self.unique.height

    def counts(self) -> dict[str, int | float | str]:
        return {
            "n_input": self.n_input,
            "n_unique": self.n_unique,
            "n_folded_fingerprint": self.n_folded_fingerprint,
            "n_folded_matcher": self.n_folded_matcher,
            "n_buckets": self.n_buckets,
            "n_bucket_members": self.n_bucket_members,
            "largest_bucket": self.largest_bucket,
            "n_pairs_in_buckets": self.n_pairs_in_buckets,
            "n_pairs_screened_out": self.n_pairs_screened_out,
            "n_pairs_prescreen_passed": self.n_pairs_prescreen_passed,
            "n_pairs_compared": self.n_pairs_compared,
            "n_pairs_skipped_primitive": self.n_pairs_skipped_primitive,
            "n_pairs_skipped_folded": self.n_pairs_skipped_folded,
            "n_structures_reduced": self.n_structures_reduced,
            "n_reduce_fallbacks": self.n_reduce_fallbacks,
            "n_mp_references": self.n_mp_references,
            "n_mp_candidates": self.n_mp_candidates,
            "n_mp_pairs_compared": self.n_mp_pairs_compared,
            "n_mp_matches": self.n_mp_matches,
            "prescreen": self.prescreen,
            "seconds_fingerprint": round(self.seconds_fingerprint, 3),
            "seconds_prescreen": round(self.seconds_prescreen, 3),
            "seconds_matcher": round(self.seconds_matcher, 3),
            "seconds_mp": round(self.seconds_mp, 3),
            "backend": self.backend,
            "workers": self.workers,
        }


# ----------------------------------------------------------------------------- symmetry helpers
#: Primitive basis vectors (rows) in conventional fractional coordinates, per centring letter
#: (R: hexagonal axes, obverse setting, as pyxtal's standard settings).
_CENTRING = {
    "P": np.eye(3),
    "A": np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, -0.5, 0.5]]),
    "B": np.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [-0.5, 0.0, 0.5]]),
    "C": np.array([[0.5, 0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]),
    "I": np.array([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.5, 0.5, -0.5]]),
    "F": np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]),
    "R": np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]]),
}


@functools.lru_cache(maxsize=256)
def _centring(sg: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    letter = wyckoff.group(int(sg)).symbol[0]
    m = _CENTRING.get(letter, _CENTRING["P"])
    return letter, m, np.linalg.inv(m), round(1.0 / abs(np.linalg.det(m)))


@functools.lru_cache(maxsize=8)
def _centring_vectors(letter: str) -> np.ndarray:
    """The lattice translations of the centring inside the conventional cell (fractional, incl. 0)."""
    m = _CENTRING[letter]
    g = np.array(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij")).reshape(3, -1).T @ m
    g = g - np.floor(g + 1e-9)
    return np.unique(np.round(g, 9), axis=0)


def centring_multiplicity(sg: np.ndarray) -> np.ndarray:
    """Lattice points per conventional cell (P 1, A/B/C/I 2, R in hexagonal axes 3, F 4)."""
    out = np.ones(sg.shape, dtype=np.int64)
    for s in np.unique(sg):
        out[sg == s] = _centring(int(s))[3]
    return out


@functools.lru_cache(maxsize=256)
def _permutes_axes(sg: int) -> bool:
    """Whether pyxtal's normalizer table for ``sg`` holds an operation that permutes the cell axes."""
    for op in normalizer_ops(int(sg)):
        p = np.abs(op.rot)
        if np.allclose(p.sum(axis=0), 1) and np.allclose(p.sum(axis=1), 1) and not np.allclose(p, np.eye(3)):
            return True
    return False


# ----------------------------------------------------------------------------- prototype labels
def prototype_labels(df: pl.DataFrame) -> np.ndarray:
    """uint64 label per row: the multiset of (atomic number, Wyckoff letter) minimised over the
    letter permutations of the space group's normalizer (origin choices fold together)."""
    n = df["asu_letters"].list.len().to_numpy().astype(np.int64)
    if df.height == 0:
        return np.zeros(0, dtype=np.uint64)
    nmax = int(n.max())
    owner = np.repeat(np.arange(df.height), n)
    pos = np.arange(owner.size) - np.concatenate([[0], np.cumsum(n)])[owner]
    sg_row = df["spacegroup_number"].to_numpy().astype(np.int64)
    lidx = letter_indices(sg_row[owner], df["asu_letters"].explode().to_numpy().astype(str))
    sp = df["asu_species"].explode()
    symbols = sp.unique().to_list()
    zmap = pl.DataFrame({"s": symbols, "z": [atomic_number(s) for s in symbols]})
    z = pl.DataFrame({"s": sp}).join(zmap, on="s", how="left", maintain_order="left")["z"].to_numpy().astype(np.int64)
    L = np.full((df.height, nmax), -1, dtype=np.int64)
    Z = np.zeros((df.height, nmax), dtype=np.int64)
    L[owner, pos] = lidx
    Z[owner, pos] = z
    pad = np.uint64(np.iinfo(np.uint64).max)
    best = np.full(df.height, pad, dtype=np.uint64)
    for (s,), rows in group_rows(sg_row):
        perms = [np.arange(len(wyckoff.letters(s)))] + [op.letter_perm for op in normalizer_ops(s)]
        seen = set()
        for perm in perms:
            key = perm.tobytes()
            if key in seen:
                continue
            seen.add(key)
            lr = L[rows]
            ml = np.where(lr >= 0, perm[np.clip(lr, 0, None)], 0)
            code = np.where(lr >= 0, (Z[rows] * 64 + ml).astype(np.uint64), pad)
            code.sort(axis=1)
            best[rows] = np.minimum(best[rows], fold_hash(code, axis=1, seed=11))
    return best


# ----------------------------------------------------------------------------- reduced cells
@dataclass(frozen=True)
class ReducedCell:
    """A structure reduced the way StructureMatcher reduces it (primitive cell, Niggli basis):
    ``matrix`` (3, 3) row vectors in A, ``frac`` (n, 3) in [0, 1), ``z`` (n,) atomic numbers
    ordered by element symbol (pymatgen's site order after ``get_primitive_structure``)."""

    matrix: np.ndarray
    frac: np.ndarray
    z: np.ndarray

    @property
    def n(self) -> int:
        return int(self.z.size)

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.matrix)))


def reduce_structure(structure) -> ReducedCell:
    """StructureMatcher's own reduction (Niggli, then ``get_primitive_structure``) as a :class:`ReducedCell`."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = StructureMatcher._get_reduced_structure(structure, True, True)
    return ReducedCell(np.array(r.lattice.matrix, dtype=float), np.mod(np.array(r.frac_coords, dtype=float), 1.0),
                       np.array([sp.Z for sp in r.species], dtype=np.int64))


def extra_translations(frac: np.ndarray, z: np.ndarray, lattice: np.ndarray, sg: int,
                       tolerance: float = PRIMITIVE_TOLERANCE) -> np.ndarray:
    """Candidate lattice translations of a conventional cell beyond its centring.

    pymatgen's ``get_primitive_structure`` first keeps, out of the differences inside the
    smallest species group, the vectors that send every site onto a site of its species within
    twice the tolerance per axis; only those can become lattice vectors of a smaller cell. The
    same filter, minus the centring vectors of the space group. Empty = the centred primitive
    cell is the primitive cell pymatgen would find.
    """
    tol2 = 2.0 * tolerance / np.linalg.norm(lattice, axis=1)
    order = sorted(np.unique(z).tolist(), key=element_symbol)  # pymatgen groups by species string
    groups = [frac[z == lab] for lab in order]
    g0 = min(groups, key=len)
    v = g0 - g0[0]
    for g in sorted(groups, key=len):
        if v.shape[0] == 0:
            break
        d = v[:, None, None, :] - (g[None, None, :, :] - g[None, :, None, :])  # (vector, site, partner, 3)
        v = v[np.all(np.abs(minimum_image(d)) < tol2, axis=-1).any(axis=2).all(axis=1)]
    cv = _centring_vectors(_centring(sg)[0])
    trivial = np.all(np.abs(minimum_image(v[:, None, :] - cv[None, :, :])) < tol2, axis=-1).any(axis=1)
    return v[~trivial]


def _niggli(matrix: np.ndarray, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    import spglib

    try:
        red = spglib.niggli_reduce(matrix, eps=1e-5)
    except (spglib.SpglibError, ValueError):  # degenerate cell: the caller falls back
        return None
    if red is None:
        return None
    red = np.asarray(red, dtype=float)
    t = np.rint(red @ np.linalg.inv(matrix))
    if abs(abs(np.linalg.det(t)) - 1.0) > 1e-6 or np.abs(t @ matrix - red).max() > 1e-6 * np.abs(matrix).max():
        return None
    f = frac @ np.linalg.inv(t)
    return red, f - np.floor(f)


def reduce_candidate(sg: int, letters: list[str], species: list[str], asu_frac_coords,
                     lattice_params: tuple[float, ...]) -> tuple[ReducedCell, bool]:
    """One candidate (ASU description) reduced like StructureMatcher reduces its structure.

    The conventional cell is expanded from the ASU; the space group's centring gives the primitive
    cell (the centring copies of each atom coincide exactly). If the species counts of that cell
    share a factor and pymatgen's translation filter (:func:`extra_translations`) finds a
    translation beyond the centring, pymatgen's own reduction decides (returned flag ``True``).
    The basis is Niggli-reduced (spglib) and the sites ordered by element symbol.
    """
    frac, zs = _expand(int(sg), letters, species, asu_frac_coords)
    lat = lattice_matrix(*lattice_params)
    _, m, minv, mult = _centring(int(sg))
    fp = frac @ minv
    fp -= np.floor(fp)
    zp = zs
    if mult > 1:
        q = np.round(fp * 1e6).astype(np.int64) % 1_000_000
        _, first = np.unique((q[:, 0] * 1_000_000 + q[:, 1]) * 1_000_000 + q[:, 2], return_index=True)
        if first.size * mult != frac.shape[0]:  # not expected for a valid template: pymatgen decides
            return reduce_structure(asu_to_structure(int(sg), list(letters), list(species),
                                                     np.asarray(asu_frac_coords, dtype=float),
                                                     tuple(lattice_params))), True
        first.sort()
        fp, zp = fp[first], zs[first]
    counts = np.bincount(zp)
    red = None
    extra = (np.zeros((0, 3)) if math.gcd(*counts[counts > 0].tolist()) == 1
             else extra_translations(frac, zs, lat, int(sg)))
    if not extra.size:
        red = _niggli(m @ lat, fp)
    elif _exact_translations(frac, zs, extra):
        # every candidate translation is an exact symmetry translation: the primitive cell is the
        # cell of all exact translations, whatever the tolerance (spglib, positions not idealised)
        red = _exact_primitive(m @ lat, fp, zp)
        if red is not None:
            zp = red[2]
            red = red[:2]
    if red is None:  # a near-translation within pymatgen's tolerance: pymatgen's reduction of the centred cell
        return reduce_structure(cell_to_structure(m @ lat, [element_symbol(x) for x in zp], fp)), True
    order = np.argsort(np.array([element_symbol(x) for x in zp]), kind="stable")
    return ReducedCell(red[0], red[1][order], zp[order]), False


def _exact_translations(frac: np.ndarray, z: np.ndarray, vectors: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether every vector maps every atom exactly (``tol``, fractional) onto an atom of its species."""
    d = frac[None, :, None, :] + vectors[:, None, None, :] - frac[None, None, :, :]
    hit = np.all(np.abs(minimum_image(d)) < tol, axis=-1) & (z[:, None] == z[None, :])[None]
    return bool(hit.any(axis=2).all())


def _exact_primitive(matrix: np.ndarray, frac: np.ndarray, z: np.ndarray):
    """Primitive cell of exact translations (spglib, symprec 1e-5, not idealised), Niggli-reduced:
    ``(matrix, frac, z)`` or ``None``."""
    import spglib

    try:
        cell = spglib.standardize_cell(
            (matrix, frac, z),  # type: ignore[arg-type]  # spglib takes array_like; its hints say Sequence
            to_primitive=True, no_idealize=True, symprec=1e-5)
    except (spglib.SpglibError, ValueError):  # degenerate cell: the caller falls back
        return None
    if cell is None:
        return None
    lat, pos, num = (np.asarray(x) for x in cell)
    if len(num) * round(abs(np.linalg.det(matrix) / np.linalg.det(lat))) != len(z):
        return None
    red = _niggli(np.asarray(lat, dtype=float), np.asarray(pos, dtype=float))
    return None if red is None else (red[0], red[1], np.asarray(num, dtype=np.int64))


def _expand(sg: int, letters, species, asu_frac_coords) -> tuple[np.ndarray, np.ndarray]:
    """Conventional-cell atoms of an ASU description: fractional coordinates in [0, 1), atomic numbers."""
    coords, zs = [], []
    for letter, sp, xyz in zip(letters, species, asu_frac_coords, strict=True):
        wp = wyckoff.position(sg, letter)
        p = wp.rot[0] @ np.asarray(xyz, dtype=float) + wp.trans[0]
        coords.append(np.einsum("mij,j->mi", wp.rot, p - np.floor(p)) + wp.trans)
        zs.append(np.full(wp.multiplicity, atomic_number(sp), dtype=np.int64))
    frac = np.concatenate(coords)
    return frac - np.floor(frac), np.concatenate(zs)


def reduce_candidates(df: pl.DataFrame) -> tuple[list[ReducedCell], int]:
    """:func:`reduce_candidate` for every row (``candidates`` columns); also the number of fallbacks."""
    out, fallbacks = [], 0
    for sg, let, sp, xyz, *lat in df.select(ASU_COLUMNS).iter_rows():
        cell, fb = reduce_candidate(sg, let, sp, xyz, tuple(lat))
        out.append(cell)
        fallbacks += fb
    return out, fallbacks


# ----------------------------------------------------------------------------- StructureMatcher.fit
def _from_parameters(p: np.ndarray) -> np.ndarray:
    """``Lattice.from_parameters`` (vesta=False) for (M, 6) parameters -> (M, 3, 3)."""
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    rad = np.radians(p[:, 3:])
    ca, cb, cg = np.cos(rad).T
    sa, sb, _ = np.sin(rad).T
    gamma_star = np.arccos(np.clip((ca * cb - cg) / (sa * sb), -1, 1))
    out = np.zeros((p.shape[0], 3, 3))
    out[:, 0, 0] = a * sb
    out[:, 0, 2] = a * cb
    out[:, 1, 0] = -b * sa * np.cos(gamma_star)
    out[:, 1, 1] = b * sa * np.sin(gamma_star)
    out[:, 1, 2] = b * ca
    out[:, 2, 2] = c
    return out


def _angles(v1: np.ndarray, v2: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    x = np.clip(np.inner(v1, v2) / l1[:, None] / l2, -1, 1)
    return np.rad2deg(np.arccos(x))


@functools.lru_cache(maxsize=64)
def _hash_weights(n: int) -> np.ndarray:
    return np.random.default_rng(5).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)


def fit_reduced(r1: ReducedCell, r2: ReducedCell, *, ltol: float, stol: float, angle_tol: float) -> bool:
    """``StructureMatcher(ltol, stol, angle_tol, primitive_cell=True, scale=True).fit(s1, s2,
    skip_structure_reduction=True)`` for two reduced cells (species comparator, no supercells).

    The same steps on the same numbers: both cells scaled to a common volume; every lattice of
    ``r1`` whose vectors match ``r2``'s lengths within ``ltol`` and angles within ``angle_tol``
    (``Lattice.find_all_mappings``, unimodular); for each, every translation that puts an atom of
    ``r1`` on the reference atom of ``r2``; the fractional-tolerance subset test, then the
    Cartesian distances in the average lattice (pymatgen's ``pbc_shortest_vectors`` with its LLL
    tolerance, linear assignment, mean translation removed) below ``stol``. What is vectorised:
    the lattices and the subset tests of all (lattice, translation) pairs at once; what is
    skipped: (lattice, translation) pairs that pose the identical problem as one already
    evaluated (same average lattice and same translated point set).
    """
    from pymatgen.core import Lattice
    from pymatgen.util.coord_cython import pbc_shortest_vectors
    from scipy.optimize import linear_sum_assignment

    if r1.n != r2.n or not np.array_equal(np.bincount(r1.z), np.bincount(r2.z)):
        return False
    n = r1.n
    ratio = (r2.volume / r1.volume) ** (1 / 6)
    m1 = r1.matrix * ratio
    m2 = r2.matrix / ratio
    p2 = lattice_parameters(m2[None])[0]
    lengths, (alpha, beta, gamma) = p2[:3], p2[3:]
    # pymatgen's hint omits the 4-tuple that zip_results=False returns
    frac, dist, _, _ = Lattice(m1).get_points_in_sphere(  # type: ignore[misc]
        [[0, 0, 0]], [0, 0, 0], max(lengths) * (1 + ltol), zip_results=False)
    frac = np.asarray(frac, dtype=float)
    dist = np.asarray(dist, dtype=float)
    cart = frac @ m1
    sel = [(dist / ln < 1 + ltol) & (dist / ln > 1 / (1 + ltol)) for ln in lengths]
    c_a, c_b, c_c = (cart[s] for s in sel)
    f_a, f_b, f_c = (frac[s] for s in sel)
    if not (len(c_a) and len(c_b) and len(c_c)):
        return False
    l_a, l_b, l_c = (np.sqrt(np.sum(c**2, axis=-1)) for c in (c_a, c_b, c_c))
    alpha_ok = np.abs(_angles(c_b, c_c, l_b, l_c) - alpha) <= angle_tol
    beta_ok = np.abs(_angles(c_a, c_c, l_a, l_c) - beta) <= angle_tol
    gamma_ok = np.abs(_angles(c_a, c_b, l_a, l_b) - gamma) <= angle_tol
    ii, jj, kk = np.nonzero(gamma_ok[:, :, None] & alpha_ok[None, :, :] & beta_ok[:, None, :])
    if ii.size == 0:
        return False
    det = np.linalg.det(np.stack([f_a[ii], f_b[jj], f_c[kk]], axis=1).round())
    keep = (np.abs(det) >= 1e-8) & (np.abs(np.abs(det) - 1) <= 0.5)
    if not keep.any():
        return False
    aligned = np.stack([c_a[ii[keep]], c_b[jj[keep]], c_c[kk[keep]]], axis=1)  # (M, 3, 3)
    fc = np.einsum("nj,mjk->mnk", r1.frac @ m1, np.linalg.inv(aligned))
    fc -= np.floor(fc)
    avg = _from_parameters((lattice_parameters(aligned) + p2) / 2)
    vol = np.abs(np.einsum("mi,mi->m", np.cross(avg[:, 0], avg[:, 1]), avg[:, 2]))
    norm = (n / vol) ** (1 / 3)
    inv_abc = np.linalg.norm(np.linalg.inv(avg).transpose(0, 2, 1) * 2 * np.pi, axis=2)
    frac_tol = inv_abc * stol / (np.pi * norm[:, None])  # (M, 3)
    s2fc = r2.frac
    mask = (r2.z[:, None] != r1.z[None, :]).astype(np.int64)
    ref = int(np.argmax(mask.sum(axis=1)))
    inds = np.flatnonzero(mask[ref] == 0)
    shift = fc[:, inds, :] - s2fc[ref][None, None, :]  # (M, T, 3)
    # the subset test (every atom of r2, shifted, within frac_tol of an atom of r1 of its species),
    # species by species from the smallest group, keeping only the (lattice, translation) pairs left
    mm, tt = (x.ravel() for x in np.indices(shift.shape[:2]))
    for zz in sorted(np.unique(r2.z).tolist(), key=lambda v: (int(np.sum(r2.z == v)), v)):
        a2, a1 = s2fc[r2.z == zz], fc[:, r1.z == zz]
        keep = np.zeros(mm.size, dtype=bool)
        step = max(1, 1_000_000 // (a2.shape[0] * a1.shape[1] * 3))
        for lo in range(0, mm.size, step):
            m_, t_ = mm[lo:lo + step], tt[lo:lo + step]
            d = a1[m_][:, None, :, :] - (a2[None, :, None, :] + shift[m_, t_][:, None, None, :])
            d -= np.round(d)
            close = np.all(np.abs(d) <= frac_tol[m_][:, None, None, :], axis=-1)
            keep[lo:lo + step] = close.any(axis=2).all(axis=1)
        mm, tt = mm[keep], tt[keep]
        if mm.size == 0:
            return False
    if mm.size > 1:
        x = fc[mm] - fc[mm, inds[tt]][:, None, :]
        q = np.rint((x - np.floor(x + 0.5e-6)) * 1e6).astype(np.int64)
        h = np.sort((q[..., 0] * 1_000_003 + q[..., 1]) * 1_000_033 + q[..., 2] + r1.z[None, :] * 7919, axis=1)
        sig = np.concatenate([np.rint(avg[mm].reshape(mm.size, -1) * 1e6).astype(np.int64), h], axis=1)
        w = _hash_weights(sig.shape[1])
        _, first = np.unique((sig.astype(np.uint64) * w[None, :]).sum(axis=1, dtype=np.uint64), return_index=True)
        first.sort()
        mm, tt = mm[first], tt[first]
    lattices: dict[int, tuple] = {}
    for m, ti in zip(mm.tolist(), tt.tolist(), strict=True):
        if m not in lattices:
            avg_l = Lattice(avg[m])
            inv_lll_abc = np.array(avg_l.get_lll_reduced_lattice().reciprocal_lattice.abc)
            lattices[m] = (avg_l, inv_lll_abc * stol / (np.pi * norm[m]))
        avg_l, lll_frac_tol = lattices[m]
        vecs, d_2 = pbc_shortest_vectors(avg_l, s2fc + shift[m, ti], fc[m], mask, True, lll_frac_tol)
        _, sol = linear_sum_assignment(np.asarray(d_2, dtype=float))
        short = vecs[np.arange(len(sol)), sol]
        d = np.sqrt(np.sum((short - short.mean(axis=0)) ** 2, axis=-1)) * norm[m]
        if d.max() < stol:
            return True
    return False


# ----------------------------------------------------------------------------- pre-screen
def prescreen_constants(settings: dict) -> tuple[float, float]:
    """``(a, b)`` of the orbit-distance pre-screen: two matched structures have scaled shortest
    orbit-orbit distances with ``|x1 - x2| <= a + b max(x1, x2)``."""
    ltol = float(settings.get("ltol", MATCHER_TOLERANCES["ltol"]))
    stol = float(settings.get("stol", MATCHER_TOLERANCES["stol"]))
    angle = math.radians(float(settings.get("angle_tol", MATCHER_TOLERANCES["angle_tol"])))
    return 2.0 * stol * (1.0 + ltol), (1.0 + ltol) * (1.0 + angle) - 1.0


def match_descriptors(df: pl.DataFrame, *, settings: dict, distance_window: float | None = None,
                      n_sites: int | None = None) -> np.ndarray:
    """Pre-screen descriptor per row, scaled so that rows which could match lie within 1 (L-inf).

    ``[log(a/V^(1/3)), log(b/..), log(c/..)] / log(1 + ltol)`` (sorted where the space group's
    normalizer permutes the axes), angles / ``angle_tol`` and, per pair of element types, the
    sorted shortest orbit-orbit distances ``x`` over ``(V/N)^(1/3)``: ``log(x + a/b) / -log(1 - b)``
    (see :func:`prescreen_constants`; then ``|x1 - x2| <= a + b max(x1, x2)`` implies a
    difference <= 1), or ``x / distance_window`` when a fixed window is given. Rows of one bucket
    share their multiset of (element, letter), so the entries line up; sorting is 1-Lipschitz in
    L-inf, so a site correspondence within the bound survives it. ``n_sites`` fixes the width
    (the largest number of ASU sites expected), so that chunks of rows line up.
    """
    lat = df.select(LATTICE_COLUMNS).to_numpy().astype(float)
    vol = wyckoff.cell_volume(*lat.T)
    s = np.cbrt(vol)
    lengths = np.log(lat[:, :3] / s[:, None]) / np.log1p(settings.get("ltol", MATCHER_TOLERANCES["ltol"]))
    sg = df["spacegroup_number"].to_numpy().astype(np.int64)
    perm = np.array([_permutes_axes(int(x)) for x in np.unique(sg)], dtype=bool)
    rows = np.isin(sg, np.unique(sg)[perm])
    lengths[rows] = np.sort(lengths[rows], axis=1)
    angles = lat[:, 3:] / settings.get("angle_tol", MATCHER_TOLERANCES["angle_tol"])
    sites = explode_sites(df)
    D = site_distance_matrix(sites)
    if n_sites is not None and n_sites > D.shape[1]:
        pad = n_sites - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad), (0, pad)), constant_values=np.nan)
    scale = np.cbrt(vol / df["n_atoms"].to_numpy())
    symbols = df["asu_species"].explode()
    Z = sites.padded(np.array([atomic_number(x) for x in symbols.to_list()], dtype=np.int64), 0)
    if Z.shape[1] < D.shape[1]:
        Z = np.pad(Z, ((0, 0), (0, D.shape[1] - Z.shape[1])))
    iu = np.triu_indices(D.shape[1])
    dist = np.nan_to_num(D[:, iu[0], iu[1]] / scale[:, None], nan=0.0).clip(0.0, 99.0)
    zi, zj = Z[:, iu[0]], Z[:, iu[1]]
    key = np.minimum(zi, zj) * 200 + np.maximum(zi, zj)
    combined = np.sort(key * 100.0 + dist, axis=1)
    keys = np.floor(combined / 100.0)  # identical within a bucket; kept so that mismatches cannot pair
    x = combined - keys * 100.0
    if distance_window is None:
        a, b = prescreen_constants(settings)
        tri = np.log(x + a / b) / -np.log1p(-b)
    else:
        tri = x / distance_window
    return np.concatenate([lengths, angles, tri, keys * 1e6], axis=1)


def _descriptor_frame(df: pl.DataFrame, *, settings: dict, distance_window: float | None, n_sites: int) -> pl.DataFrame:
    return pl.from_numpy(match_descriptors(df, settings=settings, distance_window=distance_window, n_sites=n_sites))


def prescreen_pairs(desc: np.ndarray, bucket: np.ndarray) -> tuple[np.ndarray, int]:
    """Index pairs ``(i, j)``, ``i < j``, of rows in the same bucket (``bucket`` sorted) whose
    descriptors lie within 1 in L-inf (scipy cKDTree), and the number of pairs in the buckets."""
    from scipy.spatial import cKDTree

    cuts = np.concatenate([[0], np.flatnonzero(bucket[1:] != bucket[:-1]) + 1, [bucket.size]])
    out, total = [], 0
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        n = hi - lo
        total += n * (n - 1) // 2
        if n < 2:
            continue
        p = cKDTree(desc[lo:hi]).query_pairs(r=1.0 + 1e-9, p=np.inf, output_type="ndarray")
        if len(p):
            out.append(np.sort(p, axis=1) + lo)
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    return pairs.astype(np.int64), total


# ----------------------------------------------------------------------------- matching work units
def match_buckets(buckets: pl.DataFrame, *, settings: dict) -> pl.DataFrame:
    """Representatives inside each bucket (one row per bucket: list columns ``rows`` (structs with
    the candidate columns, in ``candidate_id`` order) and ``pi``/``pj`` (pre-screened pairs, local
    indices, ``pi < pj``)).

    Members in order; each is compared, ``fit(representative, member)``, with the earlier
    representatives it is paired with and that have as many atoms in the primitive cell, in order,
    and folded into the first that matches. Returns one row per folded member (``candidate_id``,
    ``representative_id``) plus one summary row with null ids carrying the counts
    (:data:`_BUCKET_STATS`).
    """
    tol = {k: float(settings[k]) for k in ("ltol", "stol", "angle_tol")}
    out_id, out_rep = [], []
    stats = dict.fromkeys(_BUCKET_STATS, 0)
    for rows, pi, pj in buckets.select("rows", "pi", "pj").iter_rows():
        ids = [r["candidate_id"] for r in rows]
        cells: dict[int, ReducedCell] = {}

        def cell(k: int, rows=rows, cells=cells) -> ReducedCell:
            if k not in cells:
                r = rows[k]
                cells[k], fb = reduce_candidate(r["spacegroup_number"], r["asu_letters"], r["asu_species"],
                                                r["asu_frac_coords"], tuple(r[c] for c in LATTICE_COLUMNS))
                stats["structures_reduced"] += 1
                stats["reduce_fallbacks"] += fb
            return cells[k]

        earlier: dict[int, list[int]] = {}
        for i, j in zip(pi, pj, strict=True):
            earlier.setdefault(j, []).append(i)
        is_rep = [True] * len(ids)
        for j in sorted(earlier):
            for i in sorted(earlier[j]):
                if not is_rep[i]:
                    stats["pairs_skipped_folded"] += 1
                    continue
                if cell(i).n != cell(j).n:  # different primitive cells never fit
                    stats["pairs_skipped_primitive"] += 1
                    continue
                stats["pairs_compared"] += 1
                if fit_reduced(cell(i), cell(j), **tol):
                    is_rep[j] = False
                    out_id.append(ids[j])
                    out_rep.append(ids[i])
                    break
    schema = {"candidate_id": pl.String, "representative_id": pl.String}
    out = pl.DataFrame({"candidate_id": out_id, "representative_id": out_rep}, schema=schema)
    summary = pl.DataFrame({"candidate_id": [None], "representative_id": [None]}, schema=schema)
    return pl.concat([out, summary]).with_columns(
        pl.when(pl.col("candidate_id").is_null()).then(pl.lit(v)).otherwise(0).cast(pl.Int64).alias(k)
        for k, v in stats.items())


def match_mp(cands: pl.DataFrame, *, references: list[tuple[str, str, int, ReducedCell]], settings: dict) -> pl.DataFrame:
    """Match candidate rows against MP reference cells (``(material_id, reduced_formula,
    n_primitive, ReducedCell)``, in id order): ``fit(reference, candidate)``, first match wins.
    Returns ``candidate_id``, ``mp_material_id`` (null = no match), ``pairs_compared``."""
    tol = {k: float(settings[k]) for k in ("ltol", "stol", "angle_tol")}
    cells, _ = reduce_candidates(cands)
    per_prim = (cands["n_atoms"] // pl.Series(centring_multiplicity(cands["spacegroup_number"].to_numpy()))).to_list()
    out_mid, out_cmp = [], []
    for cell, rf, npc in zip(cells, cands["reduced_formula"].to_list(), per_prim, strict=True):
        hit, cmp = None, 0
        for mid, rrf, npr, ref in references:
            if rrf != rf or npc % npr or cell.n != ref.n:
                continue
            cmp += 1
            if fit_reduced(ref, cell, **tol):
                hit = mid
                break
        out_mid.append(hit)
        out_cmp.append(cmp)
    return pl.DataFrame({"candidate_id": cands["candidate_id"], "mp_material_id": out_mid,
                         "pairs_compared": out_cmp},
                        schema={"candidate_id": pl.String, "mp_material_id": pl.String, "pairs_compared": pl.Int64})


# ----------------------------------------------------------------------------- MP references
def mp_references(mp_structures: pl.DataFrame, *, elements: list[str]) -> list[tuple[str, str, int, ReducedCell]]:
    """MP structures (``mp_structures`` contract) inside the chemical system, as matcher references:
    ``(material_id, reduced_formula, n_primitive_atoms, reduced cell)`` sorted by material_id."""
    need = ("material_id", "reduced_formula", "lattice_matrix", "species", "frac_coords")
    missing = [c for c in need if c not in mp_structures.columns]
    if missing:
        raise ValueError(f"MP structures lack column(s) {missing} (mp_structures contract)")
    allowed = set(elements)
    rows = mp_structures.select(need).sort("material_id")
    out = []
    for mid, rf, lat, species, frac in rows.iter_rows():
        if not set(species) <= allowed:
            continue
        cell = reduce_structure(cell_to_structure(lat, species, frac))
        out.append((mid, rf, cell.n, cell))
    return out


# ----------------------------------------------------------------------------- scheduling
def _deal(cost: np.ndarray, n_chunks: int) -> np.ndarray:
    """Row order that makes ``n_chunks`` contiguous, near-equal-count slices near-equal in cost:
    rows by cost (descending, ties by index), dealt boustrophedon over the chunks."""
    order = np.lexsort((np.arange(cost.size), -cost))
    n_chunks = max(1, min(n_chunks, cost.size))
    rnd, pos = np.divmod(np.arange(cost.size), n_chunks)
    chunk = np.where(rnd % 2 == 0, pos, n_chunks - 1 - pos)
    return order[np.lexsort((np.arange(cost.size), chunk))]


def _map(fn, df: pl.DataFrame, *, cost: np.ndarray, workers: int, n_chunks: int | None, min_rows: int,
         use_ray: bool, **kwargs):
    """``map_row_chunks`` with the rows dealt by ``cost`` (the output order follows the deal)."""
    chunks = n_chunks or _chunks_for(df.height, workers, min_rows, use_ray=use_ray)
    df = df[_deal(cost, chunks).tolist()] if df.height else df
    return map_row_chunks(fn, df, n_chunks=chunks, processes=workers, use_ray=use_ray, **kwargs)


# ----------------------------------------------------------------------------- entry point
def dedup_candidates(
    candidates: pl.DataFrame | pl.LazyFrame,
    *,
    mp_structures: pl.DataFrame | None = None,
    elements: list[str] | None = None,
    matcher: dict | None = None,
    mp_matcher: dict | None = None,
    distance_window: float | None = None,
    workers: int = 1,
    n_chunks: int | None = None,
    use_ray: bool = False,
) -> DedupResult:
    """Dedup decisions for the candidates of one chemical system (see the module docstring).

    ``candidates``: the ``candidates`` table (a LazyFrame over its shards is fine: only the
    columns dedup needs are collected). ``mp_structures``: the ``mp_structures`` contract (any
    rows; those outside ``elements`` are ignored). ``distance_window``: ``None`` = the pre-screen
    bound derived from the matcher tolerances; a number = a fixed window on the scaled orbit
    distances (faster, misses matches). ``use_ray``: match as Ray tasks (Ray must be initialised;
    its CPUs are the workers); else ``workers`` local processes. The result does not depend on
    ``workers``, ``n_chunks`` or ``use_ray``.
    """
    settings = {**MATCHER_DEFAULTS, **(matcher or {})}
    mp_settings = {**MP_MATCHER_DEFAULTS, **(mp_matcher or {})}
    lf = candidates.lazy() if isinstance(candidates, pl.DataFrame) else candidates
    t0 = time.perf_counter()
    narrow = lf.select(_NARROW).collect()
    res = DedupResult(unique=pl.DataFrame(), folded=pl.DataFrame(), n_input=narrow.height,
                      prescreen="derived" if distance_window is None else f"window={distance_window}")
    if narrow["fingerprint"].null_count():
        raise ValueError(f"{narrow['fingerprint'].null_count()} candidates have no fingerprint")
    if narrow["candidate_id"].is_duplicated().any():
        raise ValueError("candidate_id is not unique in the candidates given to dedup")

    # 1. exact duplicates by fingerprint
    narrow = narrow.with_columns(pl.col("candidate_id").min().over("fingerprint").alias("_rep"))
    fp_folded = narrow.filter(pl.col("candidate_id") != pl.col("_rep")).select(
        "candidate_id", pl.col("_rep").alias("representative_id"), pl.lit("fingerprint").alias("reason"))
    reps = narrow.filter(pl.col("candidate_id") == pl.col("_rep")).drop("_rep")
    del narrow
    res.n_folded_fingerprint = fp_folded.height
    res.seconds_fingerprint = time.perf_counter() - t0

    # 2. StructureMatcher inside buckets
    t1 = time.perf_counter()
    reps = reps.with_columns(pl.Series("_label", prototype_labels(reps)))
    bucket_key = ["reduced_formula", "spacegroup_number", "n_atoms", "_label"]
    reps = reps.with_columns(pl.len().over(bucket_key).alias("_bsize"))
    multi = reps.filter(pl.col("_bsize") > 1)
    res.n_bucket_members = multi.height
    sm_folded = pl.DataFrame(schema={"candidate_id": pl.String, "representative_id": pl.String, "reason": pl.String})
    backend, used = "local", 1
    if multi.height:
        multi = (multi.with_columns(pl.struct(bucket_key).rank("dense").alias("bucket"))
                 .sort(["bucket", "candidate_id"]))
        res.n_buckets = int(multi["bucket"].n_unique())
        res.largest_bucket = int(cast(int, multi["_bsize"].max()))
        n_sites = int(cast(int, multi["asu_letters"].list.len().max()))
        desc, _ = map_row_chunks(_descriptor_frame, multi.select(*_STRUCT, "n_atoms"), processes=workers,
                                 n_chunks=_chunks_for(multi.height, workers, 20_000, use_ray=use_ray),
                                 use_ray=use_ray, settings=settings,
                                 distance_window=distance_window, n_sites=n_sites)
        d = desc.to_numpy()
        del desc
        pairs, res.n_pairs_in_buckets = prescreen_pairs(d, multi["bucket"].to_numpy())
        res.n_pairs_prescreen_passed = int(pairs.shape[0])
        res.n_pairs_screened_out = res.n_pairs_in_buckets - res.n_pairs_prescreen_passed
        res.seconds_prescreen = time.perf_counter() - t1
        if pairs.shape[0]:
            work = _work_units(multi, pairs)
            cost = (work["pi"].list.len() * 4 + work["rows"].list.len()).to_numpy().astype(float)
            matched, stats = _map(match_buckets, work, cost=cost, workers=workers, n_chunks=n_chunks, use_ray=use_ray,
                                  min_rows=50, settings=settings)
            backend, used = stats.backend, stats.workers
            summary = matched.filter(pl.col("candidate_id").is_null())
            res.n_pairs_compared = int(summary["pairs_compared"].sum())
            res.n_pairs_skipped_primitive = int(summary["pairs_skipped_primitive"].sum())
            res.n_pairs_skipped_folded = int(summary["pairs_skipped_folded"].sum())
            res.n_structures_reduced = int(summary["structures_reduced"].sum())
            res.n_reduce_fallbacks = int(summary["reduce_fallbacks"].sum())
            sm_folded = matched.filter(pl.col("candidate_id").is_not_null()).select(
                "candidate_id", "representative_id", pl.lit("structure_matcher").alias("reason"))
    res.backend, res.workers = backend, used
    res.n_folded_matcher = sm_folded.height
    res.seconds_matcher = time.perf_counter() - t1

    folded = pl.concat([fp_folded, sm_folded])
    # a fingerprint duplicate of a candidate folded by the matcher counts for the matcher's representative
    folded = folded.join(sm_folded.select("candidate_id", pl.col("representative_id").alias("_up")),
                         left_on="representative_id", right_on="candidate_id", how="left").with_columns(
        pl.coalesce("_up", "representative_id").alias("representative_id")).drop("_up").sort("candidate_id")
    unique = reps.join(folded.select("candidate_id"), on="candidate_id", how="anti")
    n_folded = folded.group_by("representative_id").agg(pl.len().cast(pl.Int64).alias("n_folded"))
    unique = unique.join(n_folded, left_on="candidate_id", right_on="representative_id", how="left").with_columns(
        pl.col("n_folded").fill_null(0))

    # 3. against MP
    t2 = time.perf_counter()
    mp_hits = pl.DataFrame(schema={"candidate_id": pl.String, "mp_material_id": pl.String})
    if mp_structures is not None and mp_structures.height:
        refs = mp_references(mp_structures, elements=elements or sorted(
            {e for f in unique["reduced_formula"].unique().to_list() for e in _formula_elements(f)}))
        res.n_mp_references = len(refs)
        prim: dict[str, set[int]] = {}
        for _mid, rf, npr, _cell in refs:
            prim.setdefault(rf, set()).add(npr)
        if refs:
            per_prim = unique["n_atoms"].to_numpy() // centring_multiplicity(unique["spacegroup_number"].to_numpy())
            ok = np.array([rf in prim and any(p % q == 0 for q in prim[rf])
                           for rf, p in zip(unique["reduced_formula"].to_list(), per_prim.tolist(), strict=True)],
                          dtype=bool)
            rows = unique.filter(pl.Series(ok)).select(*_STRUCT, "reduced_formula", "n_atoms")
            res.n_mp_candidates = rows.height
            if rows.height:
                matched, _ = _map(match_mp, rows, cost=np.ones(rows.height), workers=workers, n_chunks=n_chunks,
                                  use_ray=use_ray,
                                  min_rows=200, references=refs, settings=mp_settings)
                res.n_mp_pairs_compared = int(matched["pairs_compared"].sum())
                mp_hits = matched.filter(pl.col("mp_material_id").is_not_null()).select("candidate_id", "mp_material_id")
    res.n_mp_matches = mp_hits.height
    res.mp_matches_by_material = dict(sorted(mp_hits.group_by("mp_material_id").len().iter_rows()))
    res.seconds_mp = time.perf_counter() - t2
    unique = unique.join(mp_hits, on="candidate_id", how="left").with_columns(
        pl.col("mp_material_id").is_not_null().alias("is_known_in_mp"))
    res.unique = unique.select("candidate_id", "n_folded", "is_known_in_mp", "mp_material_id").sort("candidate_id")
    res.folded = folded
    return res


def _chunks_for(n_rows: int, workers: int, min_rows: int, *, use_ray: bool = False) -> int:
    """Chunks for ``n_rows`` rows: 8 per worker (with ``use_ray``, per Ray CPU), or 1 (in-process)
    when the work is too small to pay for starting worker processes (fewer than ``min_rows`` rows
    per worker)."""
    from lib.parallel import ray_cpus

    par = ray_cpus() if use_ray else max(1, workers)
    return 1 if par == 1 or n_rows < min_rows * par else min(n_rows, par * 8)


def _work_units(multi: pl.DataFrame, pairs: np.ndarray) -> pl.DataFrame:
    """One row per bucket with pre-screened pairs: the bucket's members that take part in a pair
    (struct list ``rows``, in candidate_id order) and the pairs as local indices ``pi``/``pj``."""
    involved = np.unique(pairs)
    local = np.full(multi.height, -1, dtype=np.int64)
    members = multi[involved.tolist()].select("bucket", *_STRUCT)
    b = members["bucket"].to_numpy()
    first = np.concatenate([[0], np.flatnonzero(b[1:] != b[:-1]) + 1])
    start = np.repeat(first, np.diff(np.concatenate([first, [b.size]])))
    local[involved] = np.arange(involved.size) - start
    pb = multi["bucket"].to_numpy()[pairs[:, 0]]
    pr = pl.DataFrame({"bucket": pb, "pi": local[pairs[:, 0]], "pj": local[pairs[:, 1]]}).sort("bucket", "pj", "pi")
    rows = members.group_by("bucket", maintain_order=True).agg(pl.struct(pl.all().exclude("bucket")).alias("rows"))
    pr = pr.group_by("bucket", maintain_order=True).agg("pi", "pj")
    return rows.join(pr, on="bucket", how="inner", maintain_order="left").drop("bucket")


def _formula_elements(formula: str) -> list[str]:
    import re

    return re.findall(r"[A-Z][a-z]?", formula)


def apply_dedup(candidates: pl.DataFrame, unique: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``candidates`` that survive dedup, with ``n_folded``, ``is_known_in_mp``, ``mp_material_id``."""
    return candidates.join(unique, on="candidate_id", how="inner", maintain_order="left").cast(pl.Schema(DEDUP_EXTRA_SCHEMA))
