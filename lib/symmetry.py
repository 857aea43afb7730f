"""Space group, conventional cell and Wyckoff asymmetric unit of structures, with a round-trip check.

Per structure (``mp_structures`` rows in, ``mp_symmetry`` rows out):

1. spglib finds the space group at ``symprec`` and standardises the cell in the Hall setting that
   pyxtal's Wyckoff tables use (``pyxtal.symmetry.Group(sg).hall_number``: origin choice 2 for
   the 24 groups with two origins, hexagonal axes for the rhombohedral groups, unique axis b).
   spglib's default setting differs from pyxtal's only for the two-origin groups; for those the
   dataset is recomputed with the pyxtal Hall number.
2. Each crystallographic orbit (spglib ``crystallographic_orbits``) becomes one ASU site:
   Wyckoff letter and multiplicity from spglib, the element, and a representative point in the
   form of the position's first pyxtal operation (the orbit point ``q`` of the symmetrised
   conventional cell with ``wp.project(q) == q``).
3. Round trip: ``lib.cells.asu_to_structure`` rebuilds the conventional cell from the ASU and
   pymatgen's ``StructureMatcher`` compares it with the input structure (first on primitive
   cells of equal size without the matcher's own reduction, then the full matcher before a
   failure is declared). ``round_trip_method="direct"`` maps sites through spglib's
   transformation instead (cheaper). Failures are recorded per row as
   ``"<reason>: <detail>"`` in ``round_trip_error``.

Reasons: ``symmetry_failed`` (spglib found no symmetry), ``setting_mismatch`` (an orbit has no
point in pyxtal's representative form, or multiplicities disagree), ``atom_count_mismatch``
(rebuilt cell has a different number of atoms than spglib's conventional cell),
``no_match`` (StructureMatcher rejects the rebuilt structure), ``error`` (anything else).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Literal

import numpy as np
import polars as pl
import spglib
import spglib.error

from lib import contracts
from lib import wyckoff as W
from lib.cells import (
    MATCHER_TOLERANCES,
    asu_to_structure,
    atomic_number,
    cell_to_structure,
    lattice_matrix,
    lattice_parameters,
    minimum_image,
)
from lib.plots import figure_markdown, subplots

SYMMETRY_SCHEMA: dict[str, pl.DataType] = contracts.schema("mp_symmetry")

# The round trip's StructureMatcher uses pymatgen's default tolerances (lib.cells.MATCHER_TOLERANCES),
# without volume scaling.
_REP_TOL = 1e-3  # how close an orbit point must be to its own projection to be the representative


class SymmetryError(ValueError):
    """A structure whose ASU could not be built; ``reason`` is one of the module's reasons."""

    def __init__(self, reason: str, detail: str, *, spacegroup_number: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.spacegroup_number = spacegroup_number


@lru_cache(maxsize=256)
def _pyxtal_setting(sg: int) -> tuple[int, str]:
    g = W.group(sg)  # the Group lib.wyckoff loads and caches (loading one costs ~5 ms)
    return int(g.hall_number), str(g.symbol[0])


def pyxtal_hall_number(sg: int) -> int:
    """The Hall number of the setting pyxtal's Wyckoff tables are written in."""
    return _pyxtal_setting(sg)[0]


def dataset_in_pyxtal_setting(lattice: np.ndarray, frac: np.ndarray, numbers: np.ndarray, *, symprec: float):
    """spglib's dataset, standardised in pyxtal's Hall setting (``None`` when spglib fails)."""
    import spglib

    cell = (lattice, frac, numbers)
    ds = spglib.get_symmetry_dataset(cell, symprec=symprec)  # type: ignore[arg-type]  # spglib takes array_like; its Sequence hints reject ndarrays
    if ds is None:
        return None
    hall = pyxtal_hall_number(int(ds.number))
    if int(ds.hall_number) != hall:
        ds2 = spglib.get_symmetry_dataset(cell, symprec=symprec, hall_number=hall)  # type: ignore[arg-type]  # spglib takes array_like; its Sequence hints reject ndarrays
        if ds2 is not None and int(ds2.number) == int(ds.number):
            return ds2
    return ds


def asymmetric_unit(
    lattice: np.ndarray, species: list[str], frac: np.ndarray, *, symprec: float = 0.1
) -> dict:
    """Space group, conventional lattice and ASU (pyxtal representative form) of one structure.

    Raises :class:`SymmetryError` with a reason when no consistent ASU exists.
    """
    numbers = np.array([atomic_number(s) for s in species], dtype=np.intc)
    try:
        ds = dataset_in_pyxtal_setting(np.asarray(lattice, float), np.asarray(frac, float), numbers,
                                       symprec=symprec)
    except spglib.error.SpglibError as exc:  # spglib >= 2.5 raises instead of returning None
        raise SymmetryError("symmetry_failed", f"spglib: {exc} (symprec={symprec})") from exc
    if ds is None:
        raise SymmetryError("symmetry_failed", f"spglib found no symmetry at symprec={symprec}")
    sg = int(ds.number)
    std_pos = np.asarray(ds.std_positions, float)
    std_types = np.asarray(ds.std_types)
    # std atom -> primitive atom -> an input atom -> its orbit and letter. The orbit must be
    # ``crystallographic_orbits`` (orbits of the primitive cell's group), not ``equivalent_atoms``
    # (orbits under the operations found for the input cell): for an input supercell at a loose
    # symprec the latter splits one Wyckoff orbit into several (4 of 2,725 MP structures).
    mapping = np.asarray(ds.mapping_to_primitive)
    std_prim = np.asarray(ds.std_mapping_to_primitive)
    first_input = np.full(int(max(mapping.max(), std_prim.max())) + 1, -1, dtype=np.int64)
    prims, first = np.unique(mapping, return_index=True)  # the first input atom of each primitive atom
    first_input[prims] = first
    if (first_input[std_prim] < 0).any():
        raise KeyError(int(std_prim[first_input[std_prim] < 0][0]))
    std_orbit = np.asarray(ds.crystallographic_orbits)[first_input[std_prim]]
    sym_of = {int(n): s for n, s in zip(numbers, species, strict=True)}
    sites = []
    for orbit in np.unique(std_orbit):
        in_orbit = std_orbit == orbit
        members = std_pos[in_orbit]
        letter = str(ds.wyckoffs[orbit])
        wp = W.position(sg, letter)
        if len(members) != wp.multiplicity:
            raise SymmetryError(
                "setting_mismatch",
                f"orbit {letter} of sg {sg} has {len(members)} atoms in the conventional cell, "
                f"pyxtal multiplicity {wp.multiplicity}", spacegroup_number=sg)
        proj = wp.project(members)
        dev = np.abs(minimum_image(proj - members)).max(axis=1)
        k = int(np.argmin(dev))
        if dev[k] > _REP_TOL:
            raise SymmetryError(
                "setting_mismatch",
                f"no point of orbit {wp.label} (sg {sg}, Hall {int(ds.hall_number)}) in pyxtal's "
                f"form; closest off by {dev[k]:.3g}", spacegroup_number=sg)
        rep = proj[k].copy()
        rep[np.abs(rep - 1.0) <= 1e-10 + 1e-5] = 0.0  # np.isclose(rep, 1.0, atol=1e-10), its rtol 1e-5 kept
        sites.append((W.letter_index(sg, letter), sym_of[int(std_types[in_orbit][0])],
                      letter, wp.multiplicity, rep))
    sites.sort(key=lambda s: (s[0], s[1], tuple(np.round(s[4], 6))))
    params = tuple(lattice_parameters(np.asarray(ds.std_lattice, float)).tolist())
    return {
        "spacegroup_number": sg,
        "crystal_system": W.crystal_system(sg),
        "lattice_params": params,
        "n_atoms": len(std_types),
        "wyckoff_letters": [s[2] for s in sites],
        "multiplicities": [s[3] for s in sites],
        "asu_elements": [s[1] for s in sites],
        "asu_frac_coords": [s[4].tolist() for s in sites],
        "dataset": ds,
    }


#: Primitive basis (rows, in conventional fractional coordinates) for each centring letter.
_PRIMITIVE_BASIS: dict[str, np.ndarray] = {
    "P": np.eye(3),
    "A": np.array([[1, 0, 0], [0, 0.5, -0.5], [0, 0.5, 0.5]]),
    "C": np.array([[0.5, 0.5, 0], [-0.5, 0.5, 0], [0, 0, 1]]),
    "I": np.array([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.5, 0.5, -0.5]]),
    "F": np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]),
    "R": np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]]),
}


def centring(sg: int) -> str:
    """Lattice centring letter of ``sg`` (P, A, C, I, F or R) from pyxtal's symbol."""
    return _pyxtal_setting(sg)[1]


def to_primitive(sg: int, lattice: np.ndarray, frac: np.ndarray, species: list[str]):
    """A conventional cell reduced to a primitive one by its centring (duplicates merged)."""
    basis = _PRIMITIVE_BASIS[centring(sg)]
    if centring(sg) == "P":
        return lattice, frac, species
    lat_p = basis @ lattice
    fp = np.mod(frac @ np.linalg.inv(basis), 1.0)
    key = np.round(fp * 1e4).astype(np.int64) % 10_000
    codes = np.unique(np.asarray(species), return_inverse=True)[1].reshape(-1, 1)
    _, keep = np.unique(np.hstack([key, codes]), axis=0, return_index=True)
    keep = np.sort(keep)
    return lat_p, fp[keep], [species[i] for i in keep]


def _matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(scale=False, primitive_cell=False, **MATCHER_TOLERANCES)


def _matcher_primitive():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(scale=False, primitive_cell=True, **MATCHER_TOLERANCES)


def rebuild(asu: dict):
    """The conventional cell (pymatgen ``Structure``) rebuilt from an :func:`asymmetric_unit` dict
    (:func:`lib.cells.asu_to_structure`)."""
    return asu_to_structure(asu["spacegroup_number"], asu["wyckoff_letters"], asu["asu_elements"],
                              asu["asu_frac_coords"], asu["lattice_params"])


def rebuild_cell(asu: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rebuild` as arrays, without a pymatgen ``Structure``: ``(lattice (3, 3), fractional
    coordinates (N, 3), species (N,))``, the same numbers as the Structure's."""
    frac, owner = W.expand_asu(asu["spacegroup_number"], asu["wyckoff_letters"], asu["asu_frac_coords"])
    return lattice_matrix(*asu["lattice_params"]), frac, np.asarray(asu["asu_elements"])[owner]


def round_trip(lattice: np.ndarray, species: list[str], frac: np.ndarray, asu: dict, *,
               matchers: tuple | None = None) -> None:
    """Rebuild the conventional cell from ``asu`` and match it against the input with
    pymatgen's ``StructureMatcher``; raise :class:`SymmetryError` on failure.

    The rebuilt cell is reduced to its primitive cell by its centring (exact, cheap); when that
    has as many atoms as the input, the matcher first runs without its own cell reduction
    (``skip_structure_reduction``: pymatgen's primitive search and Niggli reduction are ~80% of
    its time). Anything that does not match that way gets the full matcher
    (``primitive_cell=True``) before it is called a failure.
    """
    rebuilt = rebuild(asu)
    if len(rebuilt) != asu["n_atoms"]:
        raise SymmetryError("atom_count_mismatch",
                            f"rebuilt {len(rebuilt)} atoms, conventional cell has {asu['n_atoms']}")
    fast, slow = matchers or (_matcher(), _matcher_primitive())
    original = cell_to_structure(lattice, species, frac)
    lat_p, frac_p, sp_p = to_primitive(asu["spacegroup_number"], rebuilt.lattice.matrix,
                                       rebuilt.frac_coords, [s.symbol for s in rebuilt.species])
    ok = False
    if len(sp_p) == len(original):  # same cell size: no primitive search or Niggli reduction needed
        ok = fast.fit(original, cell_to_structure(lat_p, sp_p, frac_p), skip_structure_reduction=True)
    if not ok:  # the full StructureMatcher (reduces both cells) before declaring a mismatch
        ok = slow.fit(original, rebuilt)
    if not ok:
        raise SymmetryError("no_match", "StructureMatcher rejects the structure rebuilt from the ASU")


def direct_round_trip(lattice: np.ndarray, species: list[str], frac: np.ndarray, asu: dict, ds, *,
                      stol: float = MATCHER_TOLERANCES["stol"]) -> None:
    """Cheap exact check through spglib's transformation ``x_std = P x + p``: every rebuilt atom,
    taken back to the input cell, lies on an input atom of its element (distance in the input
    lattice), and every input atom, taken to the conventional cell, lies on a rebuilt atom
    (distance in the rebuilt lattice). The tolerance is ``stol * (V/N)^(1/3)`` of the input, as
    StructureMatcher's. Raises :class:`SymmetryError` on failure.
    """
    rebuilt_lat, rebuilt_frac, rebuilt_species = rebuild_cell(asu)
    P = np.asarray(ds.transformation_matrix, float)
    p = np.asarray(ds.origin_shift, float)
    x_in = np.asarray(frac, float)
    lat = np.asarray(lattice, float)
    n_expected = len(x_in) / abs(np.linalg.det(P))
    if len(rebuilt_frac) != round(n_expected):
        raise SymmetryError("atom_count_mismatch",
                            f"rebuilt {len(rebuilt_frac)} atoms, input implies {n_expected:g}")
    expected = lattice_parameters(np.linalg.inv(P).T @ lat)
    got = np.asarray(asu["lattice_params"])
    length_err = np.abs(got[:3] / np.asarray(expected[:3]) - 1).max()
    angle_err = np.abs(got[3:] - np.asarray(expected[3:])).max()
    if length_err > MATCHER_TOLERANCES["ltol"] or angle_err > MATCHER_TOLERANCES["angle_tol"]:
        raise SymmetryError("no_match", f"conventional lattice off by {length_err:.1%} in length, "
                            f"{angle_err:.1f} deg in angle")
    tol = stol * (abs(np.linalg.det(lat)) / len(x_in)) ** (1 / 3)
    back = (rebuilt_frac - p) @ np.linalg.inv(P).T
    d = minimum_image(back[:, None, :] - x_in[None, :, :]) @ lat
    dist = np.linalg.norm(d, axis=-1)
    same = rebuilt_species[:, None] == np.asarray(species)[None, :]
    dist[~same] = np.inf
    nearest = dist.min(axis=1)
    if nearest.max() > tol:
        raise SymmetryError("no_match", f"a rebuilt atom is {nearest.max():.3f} Å from any input atom")
    # the other way round in the conventional frame (complete there modulo its lattice)
    fwd = x_in @ P.T + p
    d2 = minimum_image(fwd[:, None, :] - rebuilt_frac[None, :, :]) @ rebuilt_lat
    dist2 = np.linalg.norm(d2, axis=-1)
    dist2[~same.T] = np.inf
    missed = dist2.min(axis=1)
    if missed.max() > tol:
        raise SymmetryError("no_match", f"an input atom is {missed.max():.3f} Å from any rebuilt atom")


def analyse_symmetry(
    structures: pl.DataFrame,
    *,
    symprec: float = 0.1,
    round_trip_method: Literal["structure_matcher", "direct", "none"] = "structure_matcher",
) -> pl.DataFrame:
    """``mp_symmetry`` rows for ``mp_structures`` rows (one output row per input row).

    Needs columns ``material_id``, ``lattice_matrix`` (9 floats, row vectors), ``species``,
    ``frac_coords``; ``snapshot_id`` is carried over when present. ``round_trip_method``:
    ``structure_matcher`` (pymatgen, the default), ``direct`` (site mapping through spglib's
    transformation, ~3x cheaper) or ``none`` (no check; ``is_round_trip_ok`` stays null).
    """
    if round_trip_method not in ("structure_matcher", "direct", "none"):
        raise ValueError(f"round_trip_method must be structure_matcher, direct or none, not {round_trip_method!r}")
    missing = {"material_id", "lattice_matrix", "species", "frac_coords"} - set(structures.columns)
    if missing:
        raise ValueError(f"analyse_symmetry needs columns {sorted(missing)}")
    snaps = (structures["snapshot_id"].to_list() if "snapshot_id" in structures.columns
             else [None] * structures.height)
    matchers = (_matcher(), _matcher_primitive())
    rows: list[dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mid, lat, sp, fc, snap in zip(structures["material_id"].to_list(),
                                          structures["lattice_matrix"].to_list(),
                                          structures["species"].to_list(),
                                          structures["frac_coords"].to_list(), snaps, strict=True):
            lattice = np.asarray(lat, float).reshape(3, 3)
            frac = np.asarray(fc, float)
            row: dict = {"material_id": mid, "symprec": symprec, "snapshot_id": snap}
            try:
                asu = asymmetric_unit(lattice, sp, frac, symprec=symprec)
                a, b, c, al, be, ga = asu["lattice_params"]
                row.update(
                    spacegroup_number=asu["spacegroup_number"], crystal_system=asu["crystal_system"],
                    a_a=a, b_a=b, c_a=c, alpha_deg=al, beta_deg=be, gamma_deg=ga,
                    n_atoms=asu["n_atoms"], n_asu_sites=len(asu["wyckoff_letters"]),
                    wyckoff_letters=asu["wyckoff_letters"], multiplicities=asu["multiplicities"],
                    asu_elements=asu["asu_elements"], asu_frac_coords=asu["asu_frac_coords"],
                    wyckoff_sequence=" ".join([str(asu["spacegroup_number"]), *asu["wyckoff_letters"]]),
                )
                if round_trip_method == "structure_matcher":
                    round_trip(lattice, sp, frac, asu, matchers=matchers)
                elif round_trip_method == "direct":
                    direct_round_trip(lattice, sp, frac, asu, asu["dataset"])
                # "none" (profiling only) leaves is_round_trip_ok null: nothing was checked
                row.update(is_round_trip_ok=None if round_trip_method == "none" else True, round_trip_error=None)
            except SymmetryError as exc:
                row.update(is_round_trip_ok=False, round_trip_error=str(exc))
                if exc.spacegroup_number is not None and "spacegroup_number" not in row:
                    row.update(spacegroup_number=exc.spacegroup_number,
                               crystal_system=W.crystal_system(exc.spacegroup_number))
            except Exception as exc:  # noqa: BLE001 - a bad row must not stop the batch; it carries its reason
                row.update(is_round_trip_ok=False, round_trip_error=f"error: {type(exc).__name__}: {exc}")
            rows.append(row)
    return pl.DataFrame(rows, schema=SYMMETRY_SCHEMA)


def round_trip_reason(error: pl.Expr) -> pl.Expr:
    """The reason part (before ':') of ``round_trip_error``; null when the round trip passed."""
    return error.str.split(":").list.first()


def spacegroup_histogram(counts: pl.DataFrame, *, title: str = "structures per space group") -> str:
    """Markdown image (base64 PNG) of a ``spacegroup_number``/``len`` count frame, for metadata."""
    fig, ax = subplots(figsize=(8, 2.8))
    if counts.height:
        ax.bar(counts["spacegroup_number"].to_numpy(), counts["len"].to_numpy(), width=1.0, color="#3b6ea5")
        ax.set_yscale("log")
    ax.set_xlim(0, 231)
    ax.set_xlabel("space group number")
    ax.set_ylabel("structures")
    ax.set_title(title)
    return figure_markdown(fig, alt=title)
