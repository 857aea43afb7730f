"""Ingest finished VASP / GPAW / phonopy run folders into ``dft_results`` rows.

A *run folder* is one directory directly under a results root. It may hold:

* ``vasprun.xml`` (the relaxation or static run; pymatgen ``Vasprun``: final energy, electronic
  and ionic convergence, final structure) and ``OUTCAR`` (energy, timing);
* phonons, from the first of these that is present (top level or ``phonopy/``):
  ``phonopy_disp.yaml`` + ``FORCE_SETS``; ``phonopy_disp.yaml`` + one ``vasprun.xml-NNN`` per
  displacement (also ``disp-NNN/vasprun.xml`` or a ``vaspruns.tar[.lzma|.xz|.gz]`` archive);
  a ``phonopy_params*.yaml`` / ``phonopy.yaml`` carrying forces; ``FORCE_CONSTANTS`` with the
  unit cell (a phonopy yaml, or ``POSCAR-unitcell`` + the supercell ``SPOSCAR``/``POSCAR``); a DFPT
  ``vasprun.xml`` (IBRION 5–8) with the same cells. ``BORN`` adds the non-analytical correction.
  The result is the minimum frequency over a Γ-centred q-mesh;
* ``cgwgan_run.json``, written by the hand-off (:mod:`lib.dft_inputs`): the candidate and its
  lineage. Folders without it are ingested with ``is_linked = false`` (status ``unlinked``).

A GPAW run folder (:mod:`lib.dft_gpaw`; it holds ``run_gpaw.py`` or ``gpaw_summary.json``) is read
from ``gpaw_summary.json`` instead of ``vasprun.xml``/``OUTCAR``: energy (extrapolated to zero
smearing), SCF and relaxation convergence, final cell, wall time; its phonon stage in ``phonopy/``
(``phonopy_disp.yaml`` + ``FORCE_SETS``) goes through the same phonon code. It is ready for the
sensor only when every stage wrote its ``done`` marker; a failed stage (an SCF that did not
converge, a timeout) is a ``failed`` row with GPAW's reason. Row keys ``dft_code`` (vasp | gpaw),
``dft_preset`` and ``dft_preset_sha256`` say which code and settings made a row (they reach the
frame once the ``dft_results`` contract lists them).

:func:`ingest_run_folder` never raises: a truncated, unconverged or unreadable run becomes a row
with ``status`` (``ok | unlinked | unconverged | failed | refused``) and ``reason``. A folder whose
path leaves the results root (``..``, a symlink pointing outside) is ``refused`` without reading
anything behind it. ``result_id`` is a hash of the folder's name and file contents, so ingesting
the same folder twice yields the same row.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import tarfile
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lib import contracts
from lib.dft_gpaw import DONE_FILE as GPAW_DONE
from lib.dft_gpaw import PHONON_DIR as GPAW_PHONON_DIR
from lib.dft_gpaw import SUMMARY_FILE as GPAW_SUMMARY
from lib.dft_gpaw import is_complete as is_gpaw_complete
from lib.dft_gpaw import is_gpaw_folder
from lib.dft_gpaw import read_settings as read_gpaw_settings
from lib.dft_gpaw import read_summary as read_gpaw_summary
from lib.dft_gpaw import structure_from_cell as gpaw_structure

CODE_VERSION = "dft-ingest-1"
RUN_FILE = "cgwgan_run.json"
#: Bulky VASP outputs that ingest never reads: left out of the content hash and file list.
SKIP_FILES = frozenset({"WAVECAR", "CHGCAR", "CHG", "WAVEDER", "LOCPOT", "PROCAR", "ELFCAR",
                        "AECCAR0", "AECCAR1", "AECCAR2", "vaspout.h5"})
#: Files whose presence marks a folder as holding results.
OUTPUT_PATTERNS = ("vasprun.xml*", "OUTCAR*", "FORCE_SETS", "FORCE_CONSTANTS", "phonopy_params*.yaml",
                   "vaspruns.tar*", "phonopy/FORCE_SETS", "phonopy/FORCE_CONSTANTS", "phonopy/vasprun.xml-*",
                   "disp-*/vasprun.xml", "phonopy/disp-*/vasprun.xml", "gpaw_summary.json")
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+-]*$")
STATUSES = ("ok", "unlinked", "unconverged", "failed", "refused")

#: Column contract of ``dft_results`` (one row per ingested folder version).
RESULT_SCHEMA: dict[str, pl.DataType] = contracts.schema("dft_results")


# --------------------------------------------------------------------------- references
@dataclass(frozen=True)
class ElementalReferences:
    """Energy per atom of each element's ground state (eV/atom) and where it came from.

    ``dft_code`` / ``dft_preset_sha256``: the code (and GPAW preset) the energies come from; a
    row is given a formation energy only against references of its own code and preset (GPAW's
    energies are relative to its atomic setups, VASP's to its POTCARs: they never mix)."""

    energy_per_atom_ev: dict[str, float]
    entry_ids: dict[str, str]
    source: str
    sha256: str
    dft_code: str = "vasp"
    dft_preset_sha256: str | None = None


def load_elemental_references(path: str | Path) -> ElementalReferences:
    """Read pymatgen ``ComputedEntry`` dicts keyed by element (``.json`` or ``.json.gz``).

    The energy used is ``ComputedEntry.energy_per_atom`` (MP's energy including its correction,
    zero for nearly all elemental ground states). Raises ``ValueError`` naming the file on bad input.
    """
    from pymatgen.entries.computed_entries import ComputedEntry

    p = Path(path)
    raw = p.read_bytes()
    try:
        text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a JSON (or gzipped JSON) file of ComputedEntry dicts: {exc}") from exc
    if isinstance(data, list):
        data = {ComputedEntry.from_dict(d).composition.elements[0].symbol: d for d in data}
    energies: dict[str, float] = {}
    ids: dict[str, str] = {}
    for key, d in data.items():
        try:
            entry = ComputedEntry.from_dict(d)
        except Exception as exc:
            raise ValueError(f"{p}: entry {key!r} is not a ComputedEntry dict: {exc}") from exc
        if len(entry.composition.elements) != 1:
            raise ValueError(f"{p}: entry {key!r} is not elemental ({entry.composition.formula})")
        el = entry.composition.elements[0].symbol
        energies[el] = float(entry.energy_per_atom)
        ids[el] = str(entry.entry_id or d.get("data", {}).get("material_id") or key)
    return ElementalReferences(energies, ids, str(p), hashlib.sha256(raw).hexdigest())


def elemental_references_from_rows(rows: Sequence[dict[str, Any]] | pl.DataFrame, *, dft_code: str = "gpaw",
                                   dft_preset_sha256: str | None = None) -> ElementalReferences:
    """Elemental references from ingested rows of one code (and preset): for each element, the
    lowest energy per atom among its ``ok`` / ``unlinked`` single-element rows. ``ValueError``
    when no such row exists; rows of other codes or presets are ignored."""
    rows = rows.to_dicts() if isinstance(rows, pl.DataFrame) else list(rows)
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r.get("dft_code", "vasp") != dft_code or r.get("status") not in ("ok", "unlinked"):
            continue
        if dft_preset_sha256 is not None and r.get("dft_preset_sha256") != dft_preset_sha256:
            continue
        species = set(r.get("species") or [])
        e = r.get("energy_per_atom_ev")
        if len(species) != 1 or e is None or not math.isfinite(e):
            continue
        el = species.pop()
        if el not in best or e < best[el][0]:
            best[el] = (float(e), str(r.get("result_id") or r.get("run_name")))
    if not best:
        raise ValueError(f"no finished single-element {dft_code} rows"
                         + (f" with preset {dft_preset_sha256[:12]}" if dft_preset_sha256 else ""))
    digest = hashlib.sha256(json.dumps(sorted(best.items())).encode()).hexdigest()
    return ElementalReferences({el: v[0] for el, v in best.items()}, {el: v[1] for el, v in best.items()},
                               f"{dft_code} results ({', '.join(v[1] for v in best.values())})", digest,
                               dft_code=dft_code, dft_preset_sha256=dft_preset_sha256)


def formation_energy_per_atom(composition: dict[str, float], energy_ev: float,
                              references: ElementalReferences) -> tuple[float, list[str]]:
    """``(E_total - Σ n_i E_i) / N`` and the reference entry ids used; ``KeyError`` if one is missing."""
    missing = sorted(el for el in composition if el not in references.energy_per_atom_ev)
    if missing:
        raise KeyError(f"no elemental reference for {', '.join(missing)} in {references.source}")
    n = sum(composition.values())
    ref = sum(c * references.energy_per_atom_ev[el] for el, c in composition.items())
    return (energy_ev - ref) / n, [references.entry_ids[el] for el in sorted(composition)]


# --------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class RunFolder:
    """A candidate run folder under a results root, as the sensor sees it."""

    name: str
    path: Path
    refused_reason: str = ""
    is_ready: bool = False
    signature: str = ""  # cheap (relpath, size, mtime) hash; changes when files change
    newest_mtime: float = 0.0


def check_run_path(results_root: str | Path, name: str) -> tuple[Path, str]:
    """The folder ``results_root/name`` and a refusal reason ('' when it is safe to read).

    Refused: names with a path separator or ``..``, names outside ``[A-Za-z0-9_][A-Za-z0-9._=+-]*``,
    a folder that resolves (through symlinks) outside the root, and any file or sub-folder inside it
    that resolves outside the root.
    """
    root = Path(results_root).resolve()
    raw = root / name
    if "/" in name or "\\" in name or name in (".", "..") or ".." in Path(name).parts or not _NAME_OK.match(name):
        return raw, f"run folder name {name!r} is not a plain folder name under {root}"
    real = raw.resolve()
    if not real.is_relative_to(root) or real == root:
        return raw, f"run folder {name!r} resolves to {real}, outside the results root {root}"
    if not real.is_dir():
        return raw, f"run folder {name!r} is not a directory"
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        for entry in [*dirnames, *filenames]:
            p = Path(dirpath) / entry
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root):
                    return raw, (f"{p.relative_to(real)} in run folder {name!r} links to {target}, "
                                 f"outside the results root {root}")
    return real, ""


def _walk_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        for f in filenames:
            p = Path(dirpath) / f
            if f in SKIP_FILES or f.startswith("."):
                continue
            if p.is_file():
                out.append(p)
    return sorted(out)


def content_sha256(folder: Path) -> tuple[str, list[str]]:
    """sha256 over (relative path, file sha256) of the folder's files (bulky outputs skipped)."""
    h = hashlib.sha256()
    rels = []
    for p in _walk_files(folder):
        rel = p.relative_to(folder).as_posix()
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                fh.update(block)
        h.update(f"{rel}\0{fh.hexdigest()}\n".encode())
        rels.append(rel)
    return h.hexdigest(), rels


def has_outputs(folder: Path) -> bool:
    return any(any(folder.glob(pat)) for pat in OUTPUT_PATTERNS)


def scan_results_root(results_root: str | Path, *, settle_seconds: float = 60.0,
                      now: float | None = None) -> list[RunFolder]:
    """Every entry under ``results_root``: refused ones with their reason, others with ``is_ready``.

    Ready = holds at least one output file and nothing in it changed for ``settle_seconds``
    (a run still being copied is picked up on a later tick). Never raises for one bad folder.
    """
    root = Path(results_root).resolve()
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    out: list[RunFolder] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or (entry.is_file() and not entry.is_symlink()):
            continue
        path, reason = check_run_path(root, entry.name)
        if reason:
            out.append(RunFolder(entry.name, path, refused_reason=reason,
                                 signature=hashlib.sha256(reason.encode()).hexdigest()[:16]))
            continue
        try:
            stats = []
            for p in _walk_files(path):
                st = p.stat()
                stats.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
            newest = max((s[2] for s in stats), default=0) / 1e9
            sig = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
            ready = bool(stats) and has_outputs(path) and (now - newest) >= settle_seconds
            if ready and is_gpaw_folder(path):
                ready = is_gpaw_complete(path)  # every stage wrote its done marker
            out.append(RunFolder(entry.name, path, is_ready=ready, signature=sig, newest_mtime=newest))
        except OSError as exc:
            out.append(RunFolder(entry.name, path, refused_reason=f"unreadable: {exc}"))
    return out


# --------------------------------------------------------------------------- parsing pieces
def _parse_gpaw(path: Path) -> tuple[dict[str, Any], Any, list[str], list[str]]:
    """(row fields, final structure or None, problems, notes) of a GPAW run folder."""
    fields: dict[str, Any] = {"dft_code": "gpaw"}
    problems: list[str] = []
    notes: list[str] = []
    try:
        settings = read_gpaw_settings(path)
        fields.update(dft_preset=settings.get("preset_name"), dft_preset_sha256=settings.get("preset_sha256"))
    except ValueError as exc:
        settings = {}
        problems.append(str(exc))
    summary = read_gpaw_summary(path)
    if summary is None:
        problems.append(f"GPAW run unfinished: no '{GPAW_DONE}' marker with a readable {GPAW_SUMMARY} "
                        "(killed or still running; lib.dft_gpaw.run_gpaw redoes it)")
        return fields, None, problems, notes
    if summary.get("wall_time_s") is not None:
        fields["elapsed_time_s"] = float(summary["wall_time_s"])
    if summary.get("scf_converged") is not None:
        fields["is_converged_electronic"] = bool(summary["scf_converged"])
    if summary["status"] != "ok":
        problems.append(f"GPAW {summary.get('run_kind') or 'run'} failed: {summary.get('reason') or 'no reason given'}")
        return fields, None, problems, notes
    structure = None
    if summary.get("run_kind") == "relax":
        energy = summary.get("final_energy_ev")
        if not isinstance(energy, int | float) or not math.isfinite(energy):
            problems.append(f"{GPAW_SUMMARY} has no finite final_energy_ev")
            return fields, None, problems, notes
        try:
            structure = gpaw_structure(summary["final_structure"])
        except Exception as exc:  # noqa: BLE001 - recorded on the row
            problems.append(f"{GPAW_SUMMARY}: final_structure unreadable: {type(exc).__name__}: {exc}")
            return fields, None, problems, notes
        relaxed = summary.get("relax_converged")
        fields.update(final_energy_ev=float(energy), energy_per_atom_ev=float(energy) / len(structure),
                      is_converged_ionic=True if relaxed is None else bool(relaxed),
                      n_ionic_steps=int(summary.get("n_steps") or 0))
        if relaxed is False:
            fmax = settings.get("preset", {}).get("relax", {}).get("fmax_ev_a")
            notes.append(f"relaxation not converged to fmax={fmax} eV/Å after {summary.get('n_steps')} steps")
        if settings.get("phonon_planned"):
            sub = read_gpaw_summary(path / GPAW_PHONON_DIR)
            if sub is None:
                problems.append(f"GPAW phonon stage unfinished: no '{GPAW_DONE}' marker in {GPAW_PHONON_DIR}/")
            elif sub["status"] != "ok":
                problems.append(f"phonons failed: GPAW phonon stage: {sub.get('reason') or 'no reason given'}")
        elif settings.get("phonon_skip_reason"):
            notes.append(f"phonons not computed: {settings['phonon_skip_reason']}")
    return fields, structure, problems, notes


def _parse_vasprun(path: Path) -> dict[str, Any]:
    from pymatgen.io.vasp.outputs import Vasprun

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vr = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_projected_eigen=False,
                     parse_potcar_file=False, exception_on_bad_xml=True)
    s = vr.final_structure
    energy = float(vr.final_energy)
    if not math.isfinite(energy):
        raise ValueError("vasprun.xml has no total energy")
    params = vr.parameters
    return {
        "final_energy_ev": energy,
        "energy_per_atom_ev": energy / len(s),
        "is_converged_electronic": bool(vr.converged_electronic),
        "is_converged_ionic": bool(vr.converged_ionic),
        "n_ionic_steps": len(vr.ionic_steps),
        "incar_ibrion": int(params.get("IBRION", -1)),
        "incar_nsw": int(params.get("NSW", 0)),
        "incar_encut_ev": float(params["ENCUT"]) if params.get("ENCUT") is not None else None,
        "_structure": s,
        "_nelm": int(params.get("NELM", 60)),
    }


def _parse_outcar(path: Path) -> dict[str, Any]:
    from pymatgen.io.vasp.outputs import Outcar

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oc = Outcar(str(path))
    energy = oc.final_energy  # energy(sigma->0) of the last ionic step
    elapsed = oc.run_stats.get("Elapsed time (sec)")
    return {
        "outcar_energy_ev": float(energy) if energy is not None else None,
        "elapsed_time_s": float(elapsed) if elapsed is not None else None,
    }


def _phonon_dirs(run_dir: Path) -> list[Path]:
    """Where phonon files are looked for: ``phonopy/`` first (the hand-off's layout), then the top."""
    sub = run_dir / "phonopy"
    return [sub, run_dir] if sub.is_dir() else [run_dir]


def _first(dirs: Path | Sequence[Path], names: Sequence[str]) -> Path | None:
    for d in [dirs] if isinstance(dirs, Path) else dirs:
        for n in names:
            hits = sorted(d.glob(n))
            if hits:
                return hits[0]
    return None


def _displacement_vaspruns(pdir: Path, tmp: Path) -> list[Path]:
    files = sorted(pdir.glob("vasprun.xml-[0-9]*"))
    if not files:
        files = sorted(pdir.glob("disp-[0-9]*/vasprun.xml"))
    if not files:
        archive = _first(pdir, ["vaspruns.tar*"])
        if archive is not None:
            with tarfile.open(archive, "r:*") as tar:
                members = [m for m in tar.getmembers()
                           if m.isfile() and re.search(r"vasprun\.xml-\d+$", m.name)]
                for m in members:
                    src = tar.extractfile(m)
                    if src is None:
                        continue
                    dest = tmp / Path(m.name).name  # flat: no member path is ever followed
                    dest.write_bytes(src.read())
                    files.append(dest)
            files = sorted(files)
    return files


def _supercell_matrix(unit_lattice: np.ndarray, super_lattice: np.ndarray) -> np.ndarray:
    m = super_lattice @ np.linalg.inv(unit_lattice)
    mi = np.rint(m).astype(int)
    if np.abs(m - mi).max() > 1e-3 or round(abs(np.linalg.det(mi))) < 1:
        raise ValueError(f"supercell lattice is not an integer multiple of the unit cell: {m.round(4).tolist()}")
    return mi


def _load_phonopy(run_dir: Path, tmp: Path) -> tuple[Any, str]:
    """A Phonopy object with force constants, and which inputs it came from."""
    import phonopy
    from phonopy.interface.calculator import read_crystal_structure
    from phonopy.interface.vasp import parse_set_of_forces

    dirs = _phonon_dirs(run_dir)
    disp = _first(dirs, ["phonopy_disp.yaml"])
    pdir = disp.parent if disp is not None else dirs[0]
    born = _first(dirs, ["BORN"])
    nac = {"born_filename": str(born), "is_nac": True} if born else {"is_nac": False}
    force_sets = _first(dirs, ["FORCE_SETS"])
    if disp is not None and force_sets is not None:
        return phonopy.load(str(disp), force_sets_filename=str(force_sets), log_level=0, primitive_matrix="auto", **nac), "force_sets"
    if disp is not None:
        vaspruns = _displacement_vaspruns(pdir, tmp)
        if vaspruns:
            ph = phonopy.load(str(disp), produce_fc=False, log_level=0, primitive_matrix="auto", **nac)
            n_disp = len(ph.supercells_with_displacements or [])
            if len(vaspruns) != n_disp:
                raise ValueError(f"phonopy_disp.yaml has {n_disp} displacements but "
                                 f"{len(vaspruns)} displacement vasprun.xml files were found")
            sets = parse_set_of_forces(len(ph.supercell), [str(f) for f in vaspruns], verbose=False)
            if not sets:
                raise ValueError("could not read forces from the displacement vasprun.xml files")
            ph.forces = np.asarray(sets["forces"])
            ph.produce_force_constants()
            ph.symmetrize_force_constants()  # as phonopy.load does for FORCE_SETS
            return ph, "displacement_vaspruns"
    for params in [p for d in dirs for p in [*sorted(d.glob("phonopy_params*.yaml")), *sorted(d.glob("phonopy.yaml"))]]:
        text = params.read_text(errors="replace")
        if re.search(r"^\s*forces:", text, re.M) or "force_constants:" in text:
            return phonopy.load(str(params), log_level=0, primitive_matrix="auto", **nac), "phonopy_params"

    fc_file = _first(dirs, ["FORCE_CONSTANTS"])
    dfpt = None
    if fc_file is None:
        vr = run_dir / "vasprun.xml"
        if vr.is_file():
            with open(vr, errors="replace") as fh:
                head = fh.read(400_000)
            if re.search(r'name="IBRION">\s*[5678]\s*<', head):
                dfpt = vr
    if fc_file is None and dfpt is None:
        return None, ""
    # cells: a phonopy yaml, else POSCAR-unitcell + supercell (SPOSCAR / POSCAR / the DFPT run's cell)
    yaml_cells = disp or _first(dirs, ["phonopy.yaml", "phonopy_params*.yaml"])
    if yaml_cells is not None:
        ph = phonopy.load(str(yaml_cells), produce_fc=False, log_level=0, primitive_matrix="auto", **nac)
    else:
        unit_file = _first(dirs, ["POSCAR-unitcell", "UPOSCAR"])
        super_file = _first(dirs, ["SPOSCAR", "POSCAR"])
        if unit_file is None or super_file is None:
            raise ValueError("force constants found but no unit cell (POSCAR-unitcell / phonopy yaml) "
                             "and supercell (SPOSCAR / POSCAR) to go with them")
        unit, _ = read_crystal_structure(str(unit_file), interface_mode="vasp")
        sup, _ = read_crystal_structure(str(super_file), interface_mode="vasp")
        if unit is None or sup is None:
            raise ValueError(f"{unit_file.name} / {super_file.name}: phonopy could not read the cell")
        m = _supercell_matrix(np.asarray(unit.cell), np.asarray(sup.cell))
        ph = phonopy.load(unitcell=unit, supercell_matrix=m, produce_fc=False, log_level=0, primitive_matrix="auto", **nac)
        got = ph.supercell
        if len(got) != len(sup) or list(got.symbols) != list(sup.symbols):
            raise ValueError(f"{super_file.name} has {len(sup)} atoms / a different order than "
                             f"phonopy's {len(got)}-atom supercell")
        d = got.scaled_positions - sup.scaled_positions
        if np.abs(d - np.rint(d)).max() > 1e-4:
            raise ValueError(f"{super_file.name} atom order differs from phonopy's supercell")
    n = len(ph.supercell)
    if fc_file is not None:
        from phonopy.file_IO import parse_FORCE_CONSTANTS

        fc = parse_FORCE_CONSTANTS(str(fc_file))
        source = "force_constants"
    else:
        from phonopy.interface.vasp import parse_force_constants

        fc, _elements = parse_force_constants(str(dfpt))
        source = "dfpt_vasprun"
    if fc.shape[1] != n:
        raise ValueError(f"force constants are for {fc.shape[1]} atoms, the supercell has {n}")
    ph.force_constants = fc
    ph.symmetrize_force_constants()
    return ph, source


def phonon_summary(run_dir: Path, *, q_mesh: Sequence[int] = (8, 8, 8),
                   imaginary_tol_thz: float = 0.1) -> dict[str, Any] | None:
    """Minimum/maximum frequency (THz) on a Γ-centred q-mesh, or ``None`` without phonon data."""
    with tempfile.TemporaryDirectory(prefix="cgwgan-phonon-") as tmp:
        ph, source = _load_phonopy(run_dir, Path(tmp))
        if ph is None:
            return None
        if ph.force_constants is None:
            raise ValueError(f"phonopy could not build force constants from the {source} inputs")
        ph.run_mesh(list(q_mesh), is_gamma_center=True, with_eigenvectors=False)
        freqs = np.asarray(ph.get_mesh_dict()["frequencies"])
    if not np.isfinite(freqs).all():
        raise ValueError("phonon frequencies are not finite")
    return {
        "phonon_source": source,
        "q_mesh": [int(q) for q in q_mesh],
        "min_frequency_thz": float(freqs.min()),
        "max_frequency_thz": float(freqs.max()),
        "n_imaginary_modes": int((freqs < -imaginary_tol_thz).sum()),
        "imaginary_tol_thz": float(imaginary_tol_thz),
        "is_phonon_stable": bool(freqs.min() >= -imaginary_tol_thz),
        "has_nac": bool(ph.nac_params is not None),
    }


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """The hand-off's ``cgwgan_run.json`` (``None`` when absent; ``ValueError`` when unreadable)."""
    p = run_dir / RUN_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{RUN_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(rec, dict):
        raise ValueError(f"{RUN_FILE} must hold a JSON object")
    return rec


# --------------------------------------------------------------------------- one folder
def result_id_for(results_root: str | Path, name: str) -> tuple[str, str, str]:
    """``(result_id, content_sha256, refusal reason)`` of ``results_root/name`` without parsing it."""
    path, refusal = check_run_path(results_root, name)
    if refusal:
        digest = hashlib.sha256(f"refused\0{name}\0{refusal}".encode()).hexdigest()
        return f"dftres-{digest[:16]}", digest, refusal
    digest, _files = content_sha256(path)
    return "dftres-" + hashlib.sha256(f"{name}\0{digest}".encode()).hexdigest()[:16], digest, ""


def _empty_row() -> dict[str, Any]:
    return dict.fromkeys(RESULT_SCHEMA)


def refused_row(name: str, path: Path | str, reason: str, *, ingested_at: str) -> dict[str, Any]:
    row = _empty_row()
    digest = hashlib.sha256(f"refused\0{name}\0{reason}".encode()).hexdigest()
    row.update(result_id=f"dftres-{digest[:16]}", run_name=name, run_path=str(path), content_sha256=digest,
               status="refused", reason=reason, is_linked=False, files=[], ingested_at=ingested_at,
               code_version=CODE_VERSION)
    return row


def ingest_run_folder(
    results_root: str | Path,
    name: str,
    *,
    references: ElementalReferences | None,
    q_mesh: Sequence[int] = (8, 8, 8),
    imaginary_tol_thz: float = 0.1,
    ingested_at: str | None = None,
) -> dict[str, Any]:
    """One ``dft_results`` row for ``results_root/name``. Never raises; see the module doc."""
    ingested_at = ingested_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path, refusal = check_run_path(results_root, name)
    if refusal:
        return refused_row(name, path, refusal, ingested_at=ingested_at)
    row = _empty_row()
    digest, files = content_sha256(path)
    row.update(result_id="dftres-" + hashlib.sha256(f"{name}\0{digest}".encode()).hexdigest()[:16],
               run_name=name, run_path=str(path), content_sha256=digest, files=files,
               ingested_at=ingested_at, code_version=CODE_VERSION, is_linked=False)
    problems: list[str] = []  # make the run 'failed'
    notes: list[str] = []  # explain 'unconverged' / 'unlinked' / missing pieces

    try:
        rec = read_run_record(path)
    except (OSError, ValueError) as exc:
        rec = None
        problems.append(str(exc))
    if rec is not None:
        row["candidate_id"] = rec.get("candidate_id") or None
        for k in ("template_id", "checkpoint_id", "chemical_system"):
            row[k] = rec.get(k)
        row["input_run_id"] = rec.get("input_run_id") or rec.get("run_id")
        row["shortlist_surrogates"] = [str(s.get("surrogate_name")) for s in rec.get("surrogates", [])
                                       if isinstance(s, dict)]
    row["is_linked"] = bool(row["candidate_id"])
    if not row["is_linked"]:
        notes.append(f"no candidate_id ({RUN_FILE} {'has none' if rec is not None else 'absent'})")

    vr_path = path / "vasprun.xml"
    row["has_vasprun"] = vr_path.is_file()
    structure = None
    is_gpaw = is_gpaw_folder(path)
    if is_gpaw:
        fields, structure, more_problems, more_notes = _parse_gpaw(path)
        row.update(fields)
        problems += more_problems
        notes += more_notes
    else:
        row.update(dft_code="vasp", dft_preset=(rec or {}).get("input_set"), dft_preset_sha256=None)
        if not has_outputs(path):
            problems.append("no VASP or phonopy output files (vasprun.xml, OUTCAR, FORCE_SETS, FORCE_CONSTANTS, ...)")
    if not is_gpaw and vr_path.is_file():
        try:
            vr = _parse_vasprun(vr_path)
            structure = vr.pop("_structure")
            nelm = vr.pop("_nelm")
            row.update(vr)
            if not vr["is_converged_electronic"]:
                notes.append(f"electronic loop not converged in the last ionic step (NELM={nelm})")
            if not vr["is_converged_ionic"]:
                notes.append(f"ionic loop not converged after {vr['n_ionic_steps']} steps (NSW={vr['incar_nsw']})")
        except Exception as exc:  # noqa: BLE001 - recorded on the row
            problems.append(f"vasprun.xml unreadable (truncated or corrupt?): {type(exc).__name__}: {exc}")
    elif not is_gpaw:
        notes.append("no vasprun.xml: no total energy")

    outcar = path / "OUTCAR"
    if outcar.is_file():
        try:
            row.update(_parse_outcar(outcar))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"OUTCAR unreadable: {type(exc).__name__}: {exc}")

    if structure is not None:
        comp = structure.composition
        row.update(formula=comp.formula.replace(" ", ""), reduced_formula=comp.reduced_formula,
                   n_atoms=len(structure), volume_a3=float(structure.volume),
                   lattice_matrix=[float(x) for x in np.asarray(structure.lattice.matrix).ravel()],
                   species=[sp.symbol for sp in structure.species],
                   frac_coords=np.asarray(structure.frac_coords, dtype=float).tolist())
        mismatch = references is not None and (
            references.dft_code != row["dft_code"]
            or (references.dft_preset_sha256 is not None and references.dft_preset_sha256 != row["dft_preset_sha256"]))
        if references is not None and mismatch:
            notes.append(f"no formation energy: the elemental references ({references.source}) are "
                         f"{references.dft_code} energies, this run is {row['dft_code']}"
                         + (f" preset {row['dft_preset']}" if row["dft_code"] == "gpaw" else ""))
        elif references is not None:
            row.update(reference_source=references.source, reference_sha256=references.sha256)
            try:
                ef, ids = formation_energy_per_atom(
                    {el.symbol: float(n) for el, n in comp.items()}, row["final_energy_ev"], references)
                row.update(formation_energy_per_atom_ev=ef, reference_entry_ids=ids)
            except KeyError as exc:
                notes.append(str(exc.args[0]))

    try:
        ph = phonon_summary(path, q_mesh=q_mesh, imaginary_tol_thz=imaginary_tol_thz)
        if ph is None:
            notes.append("no phonon outputs")
        else:
            row.update(ph)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"phonons failed: {type(exc).__name__}: {exc}")

    unconverged = row["is_converged_electronic"] is False or row["is_converged_ionic"] is False
    if problems:
        row["status"] = "failed"
    elif unconverged:
        row["status"] = "unconverged"
    elif not row["is_linked"]:
        row["status"] = "unlinked"
    else:
        row["status"] = "ok"
    row["reason"] = "; ".join(problems + notes)
    return row


def rows_to_frame(rows: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """Rows as a frame with exactly the ``RESULT_SCHEMA`` columns and types."""
    return pl.DataFrame([{k: r.get(k) for k in RESULT_SCHEMA} for r in rows], schema=RESULT_SCHEMA)


def ingest_run_folders(
    results_root: str | Path,
    names: Sequence[str],
    *,
    references: ElementalReferences | None,
    q_mesh: Sequence[int] = (8, 8, 8),
    imaginary_tol_thz: float = 0.1,
    ingested_at: str | None = None,
) -> pl.DataFrame:
    """:func:`ingest_run_folder` for each name, as a ``dft_results`` frame (one row per name)."""
    rows = [ingest_run_folder(results_root, n, references=references, q_mesh=q_mesh,
                              imaginary_tol_thz=imaginary_tol_thz, ingested_at=ingested_at) for n in names]
    return rows_to_frame(rows)


@dataclass(frozen=True)
class DiscoveryThresholds:
    max_formation_energy_ev_per_atom: float = 0.0
    imaginary_tol_thz: float = 0.1
    require_phonons: bool = True
    statuses: tuple[str, ...] = field(default=("ok",))


def latest_results(results: pl.DataFrame) -> pl.DataFrame:
    """The most recent ingest of each run folder."""
    if results.is_empty():
        return results
    return (results.sort(["run_name", "ingested_at", "result_id"])
            .group_by("run_name", maintain_order=True).last())


def select_discoveries(results: pl.DataFrame, *, thresholds: DiscoveryThresholds = DiscoveryThresholds()
                       ) -> pl.DataFrame:
    """Linked results that pass DFT: formation energy below the threshold and no imaginary mode."""
    t = thresholds
    latest = latest_results(results)
    ok_ph = pl.col("min_frequency_thz") >= -t.imaginary_tol_thz
    if not t.require_phonons:
        ok_ph = ok_ph | pl.col("min_frequency_thz").is_null()
    return latest.filter(
        pl.col("is_linked")
        & pl.col("status").is_in(list(t.statuses))
        & (pl.col("formation_energy_per_atom_ev") < t.max_formation_energy_ev_per_atom)
        & ok_ph.fill_null(False)
    )
