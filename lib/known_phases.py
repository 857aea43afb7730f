"""The showcase system's known phases, shipped inside the package: ``lib/data/known_phases_ba_ru_o.json``.

Seven Ba–Ru–O crystals (BaO, BaO2, RuO2, cubic BaRuO3, Ba2RuO4, Ba, Ru) written from their
textbook structure types — space group, Wyckoff positions, experimental lattice constants, each
with its literature reference — not copied from a database. The embedded MP source
(:func:`lib.mp_sources.load_mp_source` with ``"embedded"``) adds them to pymatgen's AFLOW
prototypes, so the offline demo's references and convex hull hold real competing phases (the
hull's energies come from the surrogate relaxing them, as for any MP source), and the infill
dedup flags candidates that are these phases.

Where a row is the same crystal as a Materials Project entry, ``mp_material_id`` names it; the
test suite checks each such claim with StructureMatcher against MP's structures.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

DATA_DIR = Path(__file__).resolve().parent / "data"
KNOWN_PHASES_FILE = DATA_DIR / "known_phases_ba_ru_o.json"
#: The ``source`` of these rows in ``mp_structures`` (and of the phases in ``reference_energies``).
SOURCE_LABEL = "embedded:known_phases_ba_ru_o (textbook structure types)"
#: Columns of :func:`read_known_phases`, in order.
COLUMNS = ("material_id", "formula", "structure_type", "spacegroup_number", "nsites", "mp_material_id",
           "reference", "cif")


class KnownPhasesError(ValueError):
    """The shipped known-phases file is missing or a row of it is invalid (named)."""


def _structure(phase: dict, where: str):
    from pymatgen.core import Lattice, Structure

    try:
        species = [s[0] for s in phase["sites"]]
        coords = [s[2] for s in phase["sites"]]
        conv = Structure.from_spacegroup(int(phase["spacegroup"]), Lattice.from_parameters(*phase["lattice"]),
                                         species, coords)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise KnownPhasesError(f"{where}: cannot build the structure: {type(exc).__name__}: {exc}") from exc
    got = conv.get_space_group_info(symprec=1e-3)[1]
    if got != int(phase["spacegroup"]):
        raise KnownPhasesError(f"{where}: built structure has space group {got}, not {phase['spacegroup']}")
    if conv.composition.reduced_formula != phase["formula"]:
        raise KnownPhasesError(f"{where}: built formula {conv.composition.reduced_formula} != {phase['formula']}")
    return conv.get_primitive_structure()


def read_known_phases(path: Path = KNOWN_PHASES_FILE) -> pl.DataFrame:
    """The shipped phases as rows (primitive cells as CIF), in file order; a clear
    :class:`KnownPhasesError` naming the file and row for a missing file or a bad row."""
    if not path.is_file():
        raise KnownPhasesError(f"embedded known phases {path} are missing from the package (reinstall it)")
    try:
        phases = json.loads(path.read_text())["phases"]
    except (ValueError, KeyError) as exc:
        raise KnownPhasesError(f"{path}: not a known-phases file: {exc}") from exc
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    seen: set[str] = set()
    for i, phase in enumerate(phases):
        where = f"{path.name} phase {i} ({phase.get('id', '?')})"
        pid = str(phase.get("id") or "")
        if not pid.startswith("known:") or pid in seen:
            raise KnownPhasesError(f"{where}: id must be unique and start with 'known:'")
        seen.add(pid)
        s = _structure(phase, where)
        rows["material_id"].append(pid)
        rows["formula"].append(phase["formula"])
        rows["structure_type"].append(phase.get("structure_type"))
        rows["spacegroup_number"].append(int(phase["spacegroup"]))
        rows["nsites"].append(len(s))
        rows["mp_material_id"].append(phase.get("mp_material_id"))
        rows["reference"].append(phase.get("reference"))
        rows["cif"].append(s.to(fmt="cif"))
    return pl.DataFrame(rows, schema={"material_id": pl.String, "formula": pl.String, "structure_type": pl.String,
                                      "spacegroup_number": pl.Int64, "nsites": pl.Int64,
                                      "mp_material_id": pl.String, "reference": pl.String, "cif": pl.String})
