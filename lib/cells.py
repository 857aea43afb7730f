"""Cells and pymatgen Structures: the one home of their conversions.

A crystal travels through the platform in three forms:

* lattice parameters ``(a, b, c, alpha, beta, gamma)`` in Å and degrees
  (:data:`lib.wyckoff.LATTICE_COLUMNS`);
* a cell (:data:`CELL_COLUMNS`): the lattice matrix (row vectors, Å, flattened to 9 floats in
  tables), the species and the fractional coordinates;
* an asymmetric unit (:data:`ASU_COLUMNS`): space group, Wyckoff letters, species, one
  representative point per site and the lattice parameters, expanded through
  :mod:`lib.wyckoff`'s orbits.

This module converts between them (:func:`lattice_matrix`, :func:`lattice_parameters`,
:func:`cell_to_structure`, :func:`structure_to_cell`, :func:`asu_to_structure`,
:func:`frame_structures`) and holds the small cell helpers every stage shares
(:func:`atomic_number`, :func:`minimum_image`, :data:`MATCHER_TOLERANCES`). pymatgen is
imported by the functions that build Structures, not when the module loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl

from lib.wyckoff import LATTICE_COLUMNS, expand_asu

#: pymatgen ``StructureMatcher``'s default tolerances (fractional length, site distance in units
#: of (V/N)^(1/3), degrees): the round trip of ``mp_symmetry``, matching against MP and the
#: relaxed duplicates of ``shortlist``. (Within-system dedup uses tighter ones,
#: ``lib.dedup.MATCHER_DEFAULTS``.)
MATCHER_TOLERANCES: dict[str, float] = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0}

#: Columns of the ASU form (``candidates``, ``candidates_dedup``).
ASU_COLUMNS: tuple[str, ...] = ("spacegroup_number", "asu_letters", "asu_species", "asu_frac_coords", *LATTICE_COLUMNS)
#: Columns of the cell form (``relaxed``, ``reference_energies``): lattice row vectors flattened
#: to 9 floats (Å), species, fractional coordinates.
CELL_COLUMNS: tuple[str, ...] = ("lattice_matrix", "species", "frac_coords")


# ----------------------------------------------------------------------------- elements
@lru_cache(maxsize=256)
def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol (pymatgen's periodic table)."""
    from pymatgen.core import Element

    return int(Element(symbol).Z)


@lru_cache(maxsize=256)
def element_symbol(z: int) -> str:
    """Element symbol of an atomic number (pymatgen's periodic table)."""
    from pymatgen.core import Element

    return Element.from_Z(int(z)).symbol


# ----------------------------------------------------------------------------- geometry
def minimum_image(d: np.ndarray) -> np.ndarray:
    """Fractional differences moved to their nearest periodic image (each component in [-0.5, 0.5])."""
    return d - np.round(d)


def lattice_matrix(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Row-vector lattice matrix from parameters in Å and degrees (a along x, b in the xy plane).

    Raises ``ValueError`` when the angles form no cell.
    """
    al, be, ga = np.radians([alpha, beta, gamma])
    cos_al, cos_be, cos_ga = np.cos([al, be, ga])
    sin_ga = np.sin(ga)
    ax = np.array([a, 0.0, 0.0])
    bx = np.array([b * cos_ga, b * sin_ga, 0.0])
    cx = c * cos_be
    cy = c * (cos_al - cos_be * cos_ga) / sin_ga
    cz2 = c * c - cx * cx - cy * cy
    if cz2 <= 0:
        raise ValueError(f"lattice angles ({alpha}, {beta}, {gamma}) do not form a cell")
    return np.array([ax, bx, [cx, cy, np.sqrt(cz2)]])


def lattice_matrices(params: np.ndarray) -> np.ndarray:
    """:func:`lattice_matrix` for (n, 6) parameters: (n, 3, 3) row-vector matrices, NaN where the
    angles form no cell (vectorised; equal to :func:`lattice_matrix` within rounding)."""
    p = np.asarray(params, dtype=np.float64)
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    al, be, ga = np.radians(p[:, 3]), np.radians(p[:, 4]), np.radians(p[:, 5])
    out = np.zeros((len(p), 3, 3))
    out[:, 0, 0] = a
    out[:, 1, 0] = b * np.cos(ga)
    out[:, 1, 1] = b * np.sin(ga)
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz2 = c * c - cx * cx - cy * cy
    with np.errstate(invalid="ignore"):
        cz = np.where(cz2 > 0, np.sqrt(np.clip(cz2, 0, None)), np.nan)
    out[:, 2, 0], out[:, 2, 1], out[:, 2, 2] = cx, cy, cz
    return out


def lattice_parameters(m: np.ndarray) -> np.ndarray:
    """Lengths and angles (degrees) of row-vector lattice matrices, as pymatgen's
    ``Lattice.parameters``: (M, 3, 3) -> (M, 6), or one (3, 3) matrix -> (6,)."""
    m = np.asarray(m, dtype=float)
    if m.ndim == 2:
        return lattice_parameters(m[None])[0]
    g = np.einsum("mik,mjk->mij", m, m)
    lengths = np.sqrt(np.einsum("mii->mi", g))
    jk = ([1, 2, 0], [2, 0, 1])
    cosines = np.clip(g[:, jk[0], jk[1]] / (lengths[:, jk[0]] * lengths[:, jk[1]]), -1, 1)
    return np.concatenate([lengths, np.rad2deg(np.arccos(cosines))], axis=1)


# ----------------------------------------------------------------------------- structures
def cell_to_structure(lattice_matrix: Any, species: Sequence[str], coords: Any, *, cartesian: bool = False) -> Any:
    """A pymatgen ``Structure`` of a cell: lattice row vectors (a (3, 3) array or 9 floats, Å),
    species, and fractional (or, with ``cartesian``, Cartesian Å) coordinates, as they are."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.asarray(lattice_matrix, dtype=float).reshape(3, 3)), list(species),
                     np.asarray(coords, dtype=float), coords_are_cartesian=cartesian)


def structure_to_cell(structure: Any) -> dict[str, Any]:
    """Cell form of a pymatgen Structure: :data:`CELL_COLUMNS` (lattice row vectors flattened,
    species, fractional coordinates) as plain lists."""
    return {
        "lattice_matrix": [float(x) for x in np.asarray(structure.lattice.matrix).ravel()],
        "species": [site.specie.symbol for site in structure],
        "frac_coords": [[float(x) for x in fc] for fc in structure.frac_coords],
    }


def asu_to_structure(
    sg: int,
    letters: list[str],
    species: list[str],
    asu_frac_coords: list[list[float]] | np.ndarray,
    lattice_params: Sequence[float],
) -> Any:
    """A pymatgen ``Structure`` (conventional cell) from an asymmetric unit: every site expanded
    through its Wyckoff orbit (:func:`lib.wyckoff.expand_asu`). The one rebuild path."""
    frac, owner = expand_asu(sg, letters, asu_frac_coords)
    return cell_to_structure(lattice_matrix(*lattice_params), [species[i] for i in owner], frac)


def candidate_structures(df: pl.DataFrame) -> list[Any]:
    """:func:`asu_to_structure` of every row of an ASU-form frame (:data:`ASU_COLUMNS`); raises
    on a missing column or a row that cannot be rebuilt."""
    missing = [c for c in ASU_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"candidate frame lacks column(s) {missing}")
    out = []
    for sg, let, sp, xyz, *lat in df.select(ASU_COLUMNS).iter_rows():
        out.append(asu_to_structure(int(sg), list(let), list(sp), np.asarray(xyz, dtype=float), tuple(lat)))
    return out


def frame_structures(frame: pl.DataFrame, *, key: str = "candidate_id") -> list[Any]:
    """One Structure per row of a cell-form (preferred when both are present) or ASU-form
    frame, or, for a row that cannot be built, a ``str`` error naming the row (``key``)."""
    cols = set(frame.columns)
    out: list[Any] = []
    if set(CELL_COLUMNS) <= cols:
        for row in frame.select(key, *CELL_COLUMNS).iter_rows(named=True):
            try:
                out.append(cell_to_structure(row["lattice_matrix"], row["species"], row["frac_coords"]))
            except Exception as exc:  # noqa: BLE001 - reported per row
                out.append(f"{key}={row[key]}: cannot build the cell: {type(exc).__name__}: {exc}")
        return out
    missing = set(ASU_COLUMNS) - cols
    if missing:
        raise ValueError(f"frame has neither cell columns {CELL_COLUMNS} nor ASU columns; missing {sorted(missing)}")
    for row in frame.select(key, *ASU_COLUMNS).iter_rows(named=True):
        try:
            out.append(asu_to_structure(
                int(row["spacegroup_number"]), list(row["asu_letters"]), list(row["asu_species"]),
                row["asu_frac_coords"], tuple(float(row[c]) for c in LATTICE_COLUMNS)))
        except Exception as exc:  # noqa: BLE001 - reported per row
            out.append(f"{key}={row[key]}: cannot rebuild from the ASU: {type(exc).__name__}: {exc}")
    return out
