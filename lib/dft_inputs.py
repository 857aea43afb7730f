"""DFT hand-off: one VASP relaxation input set and one phonopy displacement set per candidate.

For each shortlisted candidate :func:`write_dft_inputs` writes a run folder::

    <root>/<candidate_id>/INCAR, KPOINTS, POSCAR, POTCAR (or POTCAR.spec), cgwgan_run.json
    <root>/<candidate_id>/phonopy/phonopy_disp.yaml, SPOSCAR, POSCAR-001 ...

The VASP set is a pymatgen input set (``MPRelaxSet`` by default, any set class of
``pymatgen.io.vasp.sets`` by name, with user INCAR/KPOINTS settings), recorded in the manifest
and in ``cgwgan_run.json``. POTCARs are licensed: they are written only when ``write_potcar`` is
true (the caller checks :func:`potcar_available`); otherwise ``POTCAR.spec`` lists the symbols and
``has_potcar`` is false. ``cgwgan_run.json`` carries the candidate and its lineage, so results
copied back into the results folder link to their candidate (:mod:`lib.dft_ingest`).

A folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written run folder behind; a rerun replaces it whole.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lib import contracts
from lib.ids import canonical_json, content_hash

CODE_VERSION = "dft-inputs-1"
RUN_FILE = "cgwgan_run.json"

#: Column contract of the ``dft_inputs`` manifest (one row per candidate).
MANIFEST_SCHEMA: dict[str, pl.DataType] = contracts.schema("dft_inputs")


@dataclass(frozen=True)
class DftInputSettings:
    """How the hand-off writes a run folder (all recorded in the manifest)."""

    input_set: str = "MPRelaxSet"
    user_incar_settings: dict[str, Any] = field(default_factory=dict)
    user_kpoints_settings: dict[str, Any] = field(default_factory=dict)
    user_potcar_functional: str | None = None
    supercell_min_length_a: float = 10.0
    max_supercell_atoms: int = 400
    displacement_a: float = 0.01

    def as_json(self) -> str:
        return canonical_json(asdict(self))


def potcar_available(psp_dir: str | None = None) -> tuple[bool, str]:
    """Whether pymatgen's POTCAR directory (``PMG_VASP_PSP_DIR``) is configured; never raises.

    ``psp_dir`` overrides pymatgen's setting. Returns (available, the directory or why not).
    """
    try:
        if psp_dir is None:
            from pymatgen.core import SETTINGS

            psp_dir = SETTINGS.get("PMG_VASP_PSP_DIR")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return False, f"pymatgen settings unreadable: {exc}"
    if not psp_dir:
        return False, "PMG_VASP_PSP_DIR is not set in pymatgen's settings"
    if not Path(psp_dir).expanduser().is_dir():
        return False, f"PMG_VASP_PSP_DIR={psp_dir} is not a directory"
    return True, str(psp_dir)


def input_set_class(name: str):
    """A pymatgen VASP input set class by name (``MPRelaxSet``, ``MPScanRelaxSet``, ...)."""
    from pymatgen.io.vasp import sets

    cls = getattr(sets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, sets.VaspInputSet)):
        raise ValueError(f"unknown VASP input set {name!r}: not a class of pymatgen.io.vasp.sets")
    return cls


def supercell_matrix(lattice_lengths: Sequence[float], n_atoms: int, *, min_length_a: float,
                     max_atoms: int) -> np.ndarray:
    """Diagonal supercell whose sides reach ``min_length_a``, shrunk until it has ≤ ``max_atoms``."""
    diag = [max(1, math.ceil(min_length_a / length - 1e-9)) for length in lattice_lengths]
    while n_atoms * int(np.prod(diag)) > max_atoms and max(diag) > 1:
        diag[int(np.argmax(diag))] -= 1
    return np.diag(diag).astype(int)


def _write_phonopy_set(structure, folder: Path, settings: DftInputSettings) -> dict[str, Any]:
    from phonopy import Phonopy
    from phonopy.interface.vasp import write_vasp
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(symbols=[s.specie.symbol for s in structure], cell=np.asarray(structure.lattice.matrix),
                        scaled_positions=np.asarray(structure.frac_coords))
    m = supercell_matrix(structure.lattice.abc, len(structure), min_length_a=settings.supercell_min_length_a,
                         max_atoms=settings.max_supercell_atoms)
    # The primitive cell phonopy's "auto" finds, passed explicitly (as a matrix, it is a choice, and
    # phonopy 4 does not warn that "auto" differs from phonopy 3's identity default).
    from phonopy.structure.cells import guess_primitive_matrix

    ph = Phonopy(unit, supercell_matrix=m, primitive_matrix=guess_primitive_matrix(unit))
    ph.generate_displacements(distance=settings.displacement_a)
    folder.mkdir(parents=True, exist_ok=True)
    ph.save(str(folder / "phonopy_disp.yaml"), settings={"force_sets": False, "force_constants": False})
    write_vasp(str(folder / "SPOSCAR"), ph.supercell)
    cells = ph.supercells_with_displacements
    if cells is None:
        raise RuntimeError(f"{folder}: phonopy generated no displaced supercells")
    for i, cell in enumerate(cells, start=1):
        write_vasp(str(folder / f"POSCAR-{i:03d}"), cell)
    return {"supercell_matrix": [int(x) for x in m.ravel()], "n_supercell_atoms": len(ph.supercell),
            "n_displacements": len(cells), "displacement_a": float(settings.displacement_a)}


def write_run_folder(
    structure,
    root: str | Path,
    *,
    run_name: str,
    record: dict[str, Any],
    settings: DftInputSettings = DftInputSettings(),
    write_potcar: bool = False,
) -> dict[str, Any]:
    """Write one run folder ``root/run_name`` (atomically); return the manifest fields it fills."""
    root = Path(root)
    final = root / run_name
    tmp = root / f".{run_name}.tmp-{uuid.uuid4().hex[:8]}"
    cls = input_set_class(settings.input_set)
    kwargs: dict[str, Any] = {"user_incar_settings": dict(settings.user_incar_settings) or None,
                              "user_kpoints_settings": dict(settings.user_kpoints_settings) or None}
    if settings.user_potcar_functional:
        kwargs["user_potcar_functional"] = settings.user_potcar_functional
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vis = cls(structure, **{k: v for k, v in kwargs.items() if v is not None})
            vis.write_input(str(tmp), potcar_spec=not write_potcar)
            symbols = list(vis.potcar_symbols)
            functional = str(vis.potcar_functional)
            ordered = vis.structure  # sorted by element as in its POSCAR and POTCAR
        # the phonopy set in the POSCAR's atom order: phonopy's supercells then group each element
        # once, like the POTCAR (an unsorted cell made phonopy warn and repeat element names)
        out = _write_phonopy_set(ordered, tmp / "phonopy", settings)
        full = {**record, "run_name": run_name, "input_set": settings.input_set,
                "settings": json.loads(settings.as_json()), "has_potcar": bool(write_potcar),
                "potcar_symbols": symbols, "potcar_functional": functional, **out,
                "code_version": CODE_VERSION}
        (tmp / RUN_FILE).write_text(json.dumps(full, indent=1, sort_keys=True, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    return {"potcar_symbols": symbols, "potcar_functional": functional, "has_potcar": bool(write_potcar),
            "files": files, **out}


def _candidate_groups(shortlist: pl.DataFrame) -> pl.DataFrame:
    """One row per candidate: its best-ranked shortlist row plus every surrogate that ranked it."""
    rank = pl.col("rank") if "rank" in shortlist.columns else pl.lit(None, pl.Int64)
    sl = shortlist.with_columns(rank.cast(pl.Int64).alias("rank"))
    best = sl.sort(["candidate_id", "rank", "surrogate_name"], nulls_last=True).group_by(
        "candidate_id", maintain_order=True).first()
    agg = sl.sort(["candidate_id", "surrogate_name"]).group_by("candidate_id", maintain_order=True).agg(
        pl.col("surrogate_name").alias("surrogates"),
        pl.col("surrogate_sha256").alias("surrogate_sha256s"),
        pl.col("rank").alias("ranks"),
    )
    return best.join(agg, on="candidate_id", how="left")


def write_dft_inputs(
    shortlist: pl.DataFrame,
    root: str | Path,
    *,
    settings: DftInputSettings = DftInputSettings(),
    write_potcar: bool = False,
) -> pl.DataFrame:
    """A run folder per candidate of ``shortlist`` under ``root``; the manifest (:data:`MANIFEST_SCHEMA`).

    ``shortlist`` needs ``candidate_id``, ``surrogate_name``, ``surrogate_sha256`` and a structure:
    cell columns (``lattice_matrix``, ``species``, ``frac_coords``, e.g. joined from ``relaxed``)
    or the ASU columns of ``candidates``. A candidate shortlisted by several surrogates gets one
    folder, built from its best-ranked row. A row whose structure or inputs cannot be built is a
    manifest row with ``status = 'failed'`` and the reason.
    """
    from lib.export import structures_from_frame

    for col in ("candidate_id", "surrogate_name", "surrogate_sha256"):
        if col not in shortlist.columns:
            raise ValueError(f"shortlist has no {col!r} column (has {shortlist.columns})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    groups = _candidate_groups(shortlist)
    built = structures_from_frame(groups)
    by_id = dict(zip(built.ids, built.structures, strict=True))
    failures = dict(built.failures)
    has_cell = "lattice_matrix" in groups.columns
    rows: list[dict[str, Any]] = []
    for g in groups.iter_rows(named=True):
        cid = g["candidate_id"]
        s = by_id.get(cid)
        base = {k: g.get(k) for k in ("candidate_id", "template_id", "checkpoint_id", "chemical_system",
                                      "surrogate_name", "surrogate_sha256", "rank", "surrogates",
                                      "surrogate_sha256s", "ranks")}
        row: dict[str, Any] = {**base, "run_name": cid, "run_dir": str(root / cid),
                               "input_set": settings.input_set, "settings_json": settings.as_json(),
                               "code_version": CODE_VERSION,
                               "structure_source": f"relaxed:{g['surrogate_name']}" if has_cell else "candidate"}
        if s is not None:
            comp = s.composition
            row.update(formula=comp.formula.replace(" ", ""), reduced_formula=comp.reduced_formula,
                       n_atoms=len(s))
            if not row.get("chemical_system"):
                row["chemical_system"] = "-".join(sorted(el.symbol for el in comp.elements))
        row["run_id"] = content_hash(
            {"candidate_id": cid, "structure": s.as_dict() if s is not None else None,
             "settings": settings.as_json(), "potcar": write_potcar}, prefix="dft-")
        if s is None:
            row.update(status="failed", reason=f"structure not rebuilt: {failures.get(cid, 'unknown')}",
                       has_potcar=False, files=[])
            rows.append(row)
            continue
        record = {"run_id": row["run_id"], **{k: row.get(k) for k in (
            "candidate_id", "template_id", "checkpoint_id", "chemical_system", "formula", "structure_source")},
            "surrogates": [{"surrogate_name": n, "surrogate_sha256": h, "rank": r} for n, h, r in zip(
                g["surrogates"] or [], g["surrogate_sha256s"] or [], g["ranks"] or [], strict=False)]}
        try:
            row.update(write_run_folder(s, root, run_name=cid, record=record, settings=settings,
                                        write_potcar=write_potcar))
            row.update(status="written",
                       reason="" if write_potcar else "POTCAR not written (licensed; no PMG_VASP_PSP_DIR): "
                                                      "POTCAR.spec lists the symbols")
        except Exception as exc:  # noqa: BLE001 - recorded on the manifest row
            row.update(status="failed", reason=f"inputs not written: {type(exc).__name__}: {exc}",
                       has_potcar=False, files=[])
        rows.append(row)
    return pl.DataFrame([{k: r.get(k) for k in MANIFEST_SCHEMA} for r in rows], schema=MANIFEST_SCHEMA)
