"""Rebuild crystal structures from table rows and write them as CIF, POSCAR, extended XYZ or an ASE database.

Two row layouts are understood (``docs/architecture.md``):

* **cell** columns, as in ``mp_structures`` and the relaxed screening tables: ``lattice_matrix``
  (9 floats, row vectors, Å, or 3 lists of 3), ``species`` (list[str]) and ``frac_coords``
  (list[list[f64]]). A ``relaxed_`` prefix (``relaxed_lattice_matrix``, ...) is accepted too.
* **ASU** columns, as in ``candidates`` / ``templates`` / ``mp_symmetry``: ``spacegroup_number``,
  Wyckoff letters (``asu_letters`` or ``wyckoff_letters``), species (``asu_species`` or
  ``asu_elements``), ``asu_frac_coords`` and ``a_a, b_a, c_a, alpha_deg, beta_deg, gamma_deg``;
  the conventional cell is rebuilt with :func:`lib.cells.asu_to_structure`.

When a frame carries both, the cell columns win (a relaxed structure is what a scientist wants to
look at); pass ``layout="asu"`` to force the generated, unrelaxed cell.

Rows that cannot be rebuilt are never dropped silently: :func:`structures_from_frame` returns them
as failures with the row's id and the reason, and :func:`export_structures` reports them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from lib.cells import asu_to_structure, cell_to_structure
from lib.wyckoff import LATTICE_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

ExportFormat = Literal["cif", "poscar", "extxyz", "ase-db"]
Layout = Literal["auto", "cell", "asu"]

FORMATS: tuple[str, ...] = ("cif", "poscar", "extxyz", "ase-db")
#: File suffix used when the export target is a single file (or each file of a folder).
SUFFIX: dict[str, str] = {"cif": ".cif", "poscar": ".vasp", "extxyz": ".extxyz", "ase-db": ".db"}
#: Columns tried, in order, as a row's identifier.
ID_COLUMNS: tuple[str, ...] = ("candidate_id", "material_id", "template_id", "dft_id", "id")
LATTICE_PARAM_COLUMNS: tuple[str, ...] = LATTICE_COLUMNS

_CELL_PREFIXES = ("", "relaxed_", "final_")
_ASU_ALIASES = {
    "letters": ("asu_letters", "wyckoff_letters"),
    "species": ("asu_species", "asu_elements"),
    "coords": ("asu_frac_coords",),
}


@dataclass(frozen=True)
class StructureColumns:
    """Which columns of a frame describe the structure."""

    layout: Literal["cell", "asu"]
    columns: dict[str, str]
    id_column: str | None


@dataclass(frozen=True)
class BuiltStructures:
    """Structures rebuilt from a frame, in row order, plus the rows that failed."""

    ids: list[str]
    structures: list[Structure]
    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (row id, reason)


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    files: list[Path]
    n_structures: int
    failures: list[tuple[str, str]]
    layout: str


# --------------------------------------------------------------------------- detection
def _cell_columns(cols: set[str]) -> dict[str, str] | None:
    for prefix in _CELL_PREFIXES:
        names = {k: f"{prefix}{k}" for k in ("lattice_matrix", "species", "frac_coords")}
        if set(names.values()) <= cols:
            return names
    return None


def _asu_columns(cols: set[str]) -> dict[str, str] | None:
    picked = {k: next((c for c in v if c in cols), None) for k, v in _ASU_ALIASES.items()}
    if not all(picked.values()) or "spacegroup_number" not in cols or not set(LATTICE_PARAM_COLUMNS) <= cols:
        return None
    out = {k: v for k, v in picked.items() if v is not None}
    out["spacegroup_number"] = "spacegroup_number"
    return out


def detect_structure_columns(df: pl.DataFrame, *, layout: Layout = "auto") -> StructureColumns:
    """Find the structure columns of ``df``; raise ``ValueError`` naming what is missing.

    With ``layout="auto"`` the cell layout is preferred when both are present.
    """
    cols = set(df.columns)
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    cell, asu = _cell_columns(cols), _asu_columns(cols)
    if layout in ("auto", "cell") and cell is not None:
        return StructureColumns("cell", cell, id_col)
    if layout in ("auto", "asu") and asu is not None:
        return StructureColumns("asu", asu, id_col)
    want = {
        "cell": "lattice_matrix, species, frac_coords",
        "asu": "spacegroup_number, asu_letters, asu_species, asu_frac_coords, " + ", ".join(LATTICE_PARAM_COLUMNS),
    }
    asked = want if layout == "auto" else {layout: want[layout]}
    raise ValueError(
        "no structure columns found: need "
        + " or ".join(f"{k} columns ({v})" for k, v in asked.items())
        + f"; the frame has {sorted(cols)}"
    )


def has_structure_columns(df: pl.DataFrame) -> bool:
    cols = set(df.columns)
    return _cell_columns(cols) is not None or _asu_columns(cols) is not None


def attach_structures(
    selection: pl.DataFrame,
    sources: Sequence[pl.DataFrame],
    *,
    keys: Sequence[str] = ("candidate_id", "surrogate_name"),
) -> pl.DataFrame:
    """Give ``selection`` structure columns from the first of ``sources`` that has them.

    For tables that carry results but no cell (``shortlist``, ``phonons``, ``prescreen``): the
    cell columns are left-joined from, say, ``relaxed`` on the ``keys`` both frames share
    (``candidate_id`` must be one of them; ``surrogate_name`` picks the cell relaxed by the same
    surrogate, with its ``energy_ev`` when the selection has none). From an ASU source (``candidates_dedup``) the ASU columns *and* its lattice
    parameters replace the selection's, so coordinates and cell always belong together. Rows
    without a match keep null structure columns and are reported by :func:`structures_from_frame`.
    """
    if has_structure_columns(selection):
        return selection
    cols = set(selection.columns)
    for src in sources:
        scols = set(src.columns)
        on = [k for k in keys if k in cols and k in scols]
        if not on or on[0] != keys[0]:
            continue
        cell = _cell_columns(scols)
        asu = None if cell else _asu_columns(scols)
        if cell:
            # the total energy belongs to this cell: bring it along for the ASE db's energy
            take = list(cell.values()) + (["energy_ev"] if "energy_ev" in scols and "energy_ev" not in cols else [])
        elif asu:
            take = [*asu.values(), *LATTICE_PARAM_COLUMNS]
        else:
            continue
        right = src.select(*on, *take).unique(subset=on, keep="first", maintain_order=True)
        return selection.drop([c for c in take if c in cols]).join(right, on=on, how="left")
    return selection


# --------------------------------------------------------------------------- rebuild
def structures_from_frame(df: pl.DataFrame, *, layout: Layout = "auto") -> BuiltStructures:
    """Rebuild one pymatgen ``Structure`` per row of ``df`` (cell or ASU layout, see module doc).

    With ``layout="auto"`` and both layouts present (say, shortlist rows and generated candidates
    in one selection), a row whose cell columns are null is rebuilt from its ASU. Rows that fail
    (bad lattice, ragged lists, unknown element, ...) are returned in ``failures`` with their id
    and the reason, never dropped silently.
    """
    spec = detect_structure_columns(df, layout=layout)
    cell = spec.columns if spec.layout == "cell" else None
    asu = spec.columns if spec.layout == "asu" else (_asu_columns(set(df.columns)) if layout == "auto" else None)
    ids = _row_ids(df, spec.id_column)
    scalar_cols = [c for c, t in df.schema.items() if not isinstance(t, (pl.List, pl.Array, pl.Struct))]
    scalars = df.select(scalar_cols).to_dicts() if scalar_cols else [{} for _ in range(df.height)]
    none = [None] * df.height
    cell_parts = (zip(df[cell["lattice_matrix"]].to_list(), df[cell["species"]].to_list(),
                      df[cell["frac_coords"]].to_list(), strict=True) if cell else none)
    asu_parts = (zip(df[asu["spacegroup_number"]].to_list(), df[asu["letters"]].to_list(),
                     df[asu["species"]].to_list(), df[asu["coords"]].to_list(),
                     df.select(LATTICE_PARAM_COLUMNS).rows(), strict=True) if asu else none)

    out_ids: list[str] = []
    out_structs: list[Structure] = []
    out_rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    for rid, row, cpart, apart in zip(ids, scalars, cell_parts, asu_parts, strict=True):
        try:
            if cpart is not None and cpart[0] is not None:
                matrix, species, frac = cpart
                if len(species) != len(frac):
                    raise ValueError(f"{len(species)} species but {len(frac)} coordinates")
                s = cell_to_structure(matrix, species, frac)
            elif apart is not None and apart[0] is not None:
                sg, letters, species, coords, params = apart
                if any(p is None or not math.isfinite(p) for p in params):
                    raise ValueError(f"lattice parameters missing or not finite: {params}")
                s = asu_to_structure(int(sg), list(letters), list(species), coords, tuple(params))
            else:
                raise ValueError("structure columns are null")
            if s.volume <= 0 or not math.isfinite(s.volume):
                raise ValueError(f"cell volume {s.volume}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its row
            failures.append((rid, f"{type(exc).__name__}: {exc}"))
            continue
        out_ids.append(rid)
        out_structs.append(s)
        out_rows.append(row)
    return BuiltStructures(out_ids, out_structs, out_rows, failures)


def _row_ids(df: pl.DataFrame, id_col: str | None) -> list[str]:
    if id_col is None:
        return [f"row-{i}" for i in range(df.height)]
    return [str(v) if v is not None else f"row-{i}" for i, v in enumerate(df[id_col].to_list())]


# --------------------------------------------------------------------------- writing
def export_structures(
    df: pl.DataFrame,
    *,
    fmt: ExportFormat,
    out: str | Path,
    layout: Layout = "auto",
    overwrite: bool = False,
    cif_symprec: float | None = None,
) -> ExportResult:
    """Write the structures of ``df``'s rows to ``out``.

    * ``cif``: a folder of ``<id>.cif`` files, or one multi-block CIF when ``out`` ends in ``.cif``;
      ``cif_symprec`` writes symmetrised CIFs (default: P1, exactly the stored cell).
    * ``poscar``: a folder of ``<id>.vasp`` files (first line: id and formula).
    * ``extxyz``: one extended XYZ file, a frame per structure, the row's scalar columns in
      each frame's info line.
    * ``ase-db``: one ASE SQLite database, a row per structure with the scalar columns as
      key-value pairs (``candidate_id``, ``reduced_formula``, energies, ...; ASE's reserved names
      such as ``formula`` and ``energy`` are stored with an ``_ev``/``mp_`` safe name or skipped).
      A total energy column ``energy_ev`` is attached as the row's energy when the cell layout
      (the relaxed cell the energy belongs to) is exported.

    Refuses to replace an existing ``out`` unless ``overwrite``. Rows that cannot be rebuilt
    are listed in ``ExportResult.failures``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {FORMATS}")
    out = Path(out).expanduser()
    built = structures_from_frame(df, layout=layout)
    layout_used = detect_structure_columns(df, layout=layout).layout
    names = unique_names(built.ids)
    single_cif = fmt == "cif" and out.suffix.lower() == ".cif"
    is_dir = fmt == "poscar" or (fmt == "cif" and not single_cif)

    if out.exists() and not overwrite:
        if not (is_dir and out.is_dir() and not any(out.iterdir())):
            raise FileExistsError(f"{out} exists; choose another --out or pass overwrite=True")
    if out.exists() and overwrite and not is_dir and out.is_file():
        out.unlink()

    files: list[Path] = []
    if is_dir:
        out.mkdir(parents=True, exist_ok=True)
        for name, rid, s in zip(names, built.ids, built.structures, strict=True):
            path = out / f"{name}{SUFFIX[fmt]}"
            if fmt == "cif":
                path.write_text(_cif_text(s, rid, cif_symprec))
            else:
                from pymatgen.io.vasp import Poscar

                Poscar(s, comment=f"{rid} {s.composition.reduced_formula}").write_file(str(path))
            files.append(path)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "cif":
            out.write_text("\n".join(_cif_text(s, rid, cif_symprec) for rid, s in
                                     zip(built.ids, built.structures, strict=True)))
        elif fmt == "extxyz":
            _write_extxyz(out, built, names)
        else:
            _write_ase_db(out, built, attach_energy=layout_used == "cell")
        files.append(out)
    return ExportResult(fmt, out, files, len(built.structures), built.failures, layout_used)


def unique_names(ids: Sequence[str], *, file_safe: bool = True) -> list[str]:
    """Names for ids, made unique with ``-2``, ``-3`` ... (same id in two partitions); with
    ``file_safe`` every character but ``A-Za-z0-9._+-`` becomes ``_``."""
    seen: dict[str, int] = {}
    out = []
    for rid in ids:
        base = (re.sub(r"[^A-Za-z0-9._+-]", "_", rid) if file_safe else rid) or "structure"
        n = seen.get(base, 0) + 1
        seen[base] = n
        out.append(base if n == 1 else f"{base}-{n}")
    return out


def _cif_text(s: Structure, rid: str, symprec: float | None) -> str:
    from pymatgen.io.cif import CifWriter

    text = str(CifWriter(s, symprec=symprec))
    # Name the data block after the row id so a multi-block file says which crystal is which.
    block = re.sub(r"[^A-Za-z0-9._-]", "_", rid)
    return re.sub(r"^data_.*$", f"data_{block}", text, count=1, flags=re.M)


#: ASE db names we must not use as key-value pairs, and what to store them as instead.
_RENAME = {"formula": "formula_text", "energy": "energy_value", "id": "row_id"}


def key_value_pairs(row: dict[str, Any]) -> dict[str, Any]:
    """A row's scalar columns as ASE-db key-value pairs (str/int/float/bool, no None/NaN)."""
    from ase.db.core import reserved_keys

    kv: dict[str, Any] = {}
    for k, v in row.items():
        key = _RENAME.get(k, k)
        if key in reserved_keys or not key.isidentifier():
            continue
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        if isinstance(v, (bool, np.bool_)):
            kv[key] = bool(v)
        elif isinstance(v, (int, np.integer)):
            kv[key] = int(v)
        elif isinstance(v, (float, np.floating)):
            kv[key] = float(v)
        else:
            kv[key] = str(v)
    return kv


def _write_extxyz(out: Path, built: BuiltStructures, names: list[str]) -> None:
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = []
    for name, s, row in zip(names, built.structures, built.rows, strict=True):
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.info = {"name": name, **key_value_pairs(row)}
        frames.append(atoms)
    write(str(out), frames, format="extxyz")


def _write_ase_db(out: Path, built: BuiltStructures, *, attach_energy: bool) -> None:
    import ase.db
    from ase.calculators.singlepoint import SinglePointCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    with ase.db.connect(str(out), type="db", append=False) as db:
        for s, row in zip(built.structures, built.rows, strict=True):
            atoms = AseAtomsAdaptor.get_atoms(s)
            energy = row.get("energy_ev")
            if attach_energy and isinstance(energy, float) and math.isfinite(energy):
                atoms.calc = SinglePointCalculator(atoms, energy=energy)
            kv = key_value_pairs(row)
            kv.setdefault("reduced_formula", s.composition.reduced_formula)
            db.write(atoms, key_value_pairs=kv)
