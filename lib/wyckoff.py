"""Wyckoff positions from pyxtal's tables, as arrays for batched projection and orbit expansion.

A Wyckoff position of a space group (conventional cell, pyxtal's standard setting, the same as
spglib's default Hall setting) is a list of affine operations ``x -> R x + t``; the first one
maps any point onto the position's representative form (for ``4e (0, 0, z)`` it zeroes x and y),
and the ``multiplicity`` operations together give the orbit. A site is therefore stored as its
letter plus a representative point, and the cell is obtained by expansion, never by snapping.

Everything is cached per (space group, letter) and vectorised over many sites at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Crystal system of each space group number.
CRYSTAL_SYSTEMS: tuple[tuple[str, int, int], ...] = (
    ("triclinic", 1, 2),
    ("monoclinic", 3, 15),
    ("orthorhombic", 16, 74),
    ("tetragonal", 75, 142),
    ("trigonal", 143, 167),
    ("hexagonal", 168, 194),
    ("cubic", 195, 230),
)

#: Lattice-parameter columns of every table (Å and degrees), in pymatgen's order.
LATTICE_COLUMNS: tuple[str, ...] = ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg")

#: Largest number of Wyckoff positions in one space group (Pmmm, No. 47).
MAX_WYCKOFF_LETTERS = 27


def crystal_system(sg: int) -> str:
    for name, lo, hi in CRYSTAL_SYSTEMS:
        if lo <= sg <= hi:
            return name
    raise ValueError(f"space group number must be 1..230, got {sg}")


def space_groups_of(system: str) -> list[int]:
    for name, lo, hi in CRYSTAL_SYSTEMS:
        if name == system:
            return list(range(lo, hi + 1))
    raise ValueError(f"unknown crystal system {system!r}; one of {[c[0] for c in CRYSTAL_SYSTEMS]}")


@dataclass(frozen=True)
class WyckoffArrays:
    """One Wyckoff position as arrays: ``rot`` (m, 3, 3), ``trans`` (m, 3)."""

    sg: int
    letter: str
    multiplicity: int
    dof: int
    rot: np.ndarray
    trans: np.ndarray
    site_symmetry: str

    @property
    def label(self) -> str:
        return f"{self.multiplicity}{self.letter}"

    def project(self, xyz: np.ndarray) -> np.ndarray:
        """Map points (..., 3) onto this position's representative form (first operation), mod 1."""
        out = np.einsum("ij,...j->...i", self.rot[0], xyz) + self.trans[0]
        return np.mod(out, 1.0)

    def expand(self, xyz: np.ndarray) -> np.ndarray:
        """Orbits of representative points: (n, 3) -> (n, m, 3), fractional, wrapped to [0, 1)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        out = np.einsum("mij,nj->nmi", self.rot, xyz) + self.trans[None, :, :]
        out = np.mod(out, 1.0)
        out[np.isclose(out, 1.0, rtol=0.0, atol=1e-10)] = 0.0
        return out

    def free_mask(self) -> np.ndarray:
        """Which of x, y, z the representative form leaves free (columns of R0 that are non-zero)."""
        return np.any(np.abs(self.rot[0]) > 1e-8, axis=0)


@lru_cache(maxsize=256)
def group(sg: int):
    """pyxtal's ``Group`` of a space group (cached: loading one costs ~5 ms)."""
    from pyxtal.symmetry import Group

    if not 1 <= sg <= 230:
        raise ValueError(f"space group number must be 1..230, got {sg}")
    return Group(sg)


@lru_cache(maxsize=256)
def letters(sg: int) -> tuple[str, ...]:
    """Wyckoff letters of ``sg`` in alphabetical order ('a' = most special)."""
    return tuple(sorted((wp.letter for wp in group(sg).Wyckoff_positions), key=_letter_key))


def _letter_key(letter: str) -> tuple[int, str]:
    # 'A' (alpha) follows 'z' in the International Tables for groups with 27 positions.
    return (1, letter) if letter.isupper() else (0, letter)


def letter_index(sg: int, letter: str) -> int:
    try:
        return letters(sg).index(letter)
    except ValueError:
        raise ValueError(f"space group {sg} has no Wyckoff position {letter!r}") from None


@lru_cache(maxsize=8192)
def position(sg: int, letter: str) -> WyckoffArrays:
    """The Wyckoff position ``letter`` of space group ``sg`` as arrays."""
    for wp in group(sg).Wyckoff_positions:
        if wp.letter == letter:
            rot = np.array([op.rotation_matrix for op in wp.ops], dtype=float)
            trans = np.array([op.translation_vector for op in wp.ops], dtype=float)
            sym = getattr(wp, "site_symm", "") or ""
            return WyckoffArrays(sg, letter, int(wp.multiplicity), int(wp.get_dof()), rot, trans, str(sym))
    raise ValueError(f"space group {sg} has no Wyckoff position {letter!r}; it has {letters(sg)}")


def multiplicities(sg: int) -> dict[str, int]:
    return {letter: position(sg, letter).multiplicity for letter in letters(sg)}


def cell_volume(a, b, c, alpha, beta, gamma):
    """Cell volume (Å^3); works elementwise on arrays. NaN where the angles form no cell."""
    ca, cb, cg = (np.cos(np.radians(x)) for x in (alpha, beta, gamma))
    arg = 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg
    with np.errstate(invalid="ignore"):
        return np.where(arg > 0, a * b * c * np.sqrt(np.clip(arg, 0, None)), np.nan)


def constrain_lattice(sg: int, a: float, b: float, c: float, alpha: float, beta: float, gamma: float):
    """Lattice parameters obeying the crystal system of ``sg`` (conventional setting).

    cubic a=b=c, 90°; tetragonal a=b, 90°; orthorhombic 90°; hexagonal and trigonal (hexagonal
    axes, including the rhombohedral groups) a=b, α=β=90°, γ=120°; monoclinic (unique axis b)
    α=γ=90°; triclinic free.
    """
    system = crystal_system(sg)
    if system == "cubic":
        m = (a + b + c) / 3.0
        return m, m, m, 90.0, 90.0, 90.0
    if system == "tetragonal":
        m = (a + b) / 2.0
        return m, m, c, 90.0, 90.0, 90.0
    if system == "orthorhombic":
        return a, b, c, 90.0, 90.0, 90.0
    if system in ("hexagonal", "trigonal"):
        m = (a + b) / 2.0
        return m, m, c, 90.0, 90.0, 120.0
    if system == "monoclinic":
        return a, b, c, 90.0, beta, 90.0
    return a, b, c, alpha, beta, gamma


def constrain_lattices(sg: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """(n, 6) lattice parameters obeying each row's crystal system (``wyckoff.constrain_lattice``)."""
    sg = np.asarray(sg)
    lat = np.asarray(lattice, dtype=np.float64)
    out = np.empty_like(lat)
    system_idx = np.searchsorted(np.array([c[2] for c in CRYSTAL_SYSTEMS]), sg)
    for k, (_, lo, _) in enumerate(CRYSTAL_SYSTEMS):
        m = system_idx == k
        if not m.any():
            continue
        cols = constrain_lattice(lo, *(lat[m, i] for i in range(6)))
        out[m] = np.column_stack([np.broadcast_to(np.asarray(c, dtype=np.float64), (int(m.sum()),))
                                  for c in cols])
    return out


def expand_asu(
    sg: int, letters_: list[str], asu_frac_coords: list[list[float]] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Expand ASU sites through their Wyckoff orbits.

    Returns ``(frac_coords (N, 3), site_index (N,))``: every atom of the conventional cell and
    the ASU site it came from. Representatives are projected onto their position first (a
    no-op for points already in the representative form). :func:`lib.cells.asu_to_structure`
    builds the pymatgen Structure from them.
    """
    coords, owner = [], []
    for i, (letter, xyz) in enumerate(zip(letters_, asu_frac_coords, strict=True)):
        wp = position(sg, letter)
        orbit = wp.expand(wp.project(np.asarray(xyz, dtype=float)))[0]
        coords.append(orbit)
        owner.append(np.full(len(orbit), i))
    return np.concatenate(coords), np.concatenate(owner)
