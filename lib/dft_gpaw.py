"""GPAW backend: DFT (PBE, plane waves) that runs here, as an external program the way VASP is one.

GPAW comes from Debian's packages (``gpaw``, ``gpaw-data``; ``make dft-deps``) and runs under
Debian's Python (``/usr/bin/python3`` by default); this environment never imports gpaw.

A *run folder* (:func:`write_gpaw_run`) holds::

    structure.json, POSCAR, structure.cif   the input cell (structure.json is what the script reads)
    settings.json                           run kind, the resolved preset, k-point grid, spin set-up
    run_gpaw.py                             the generated script (lib/dft_presets/gpaw_script.py)
    cgwgan_run.json                         the candidate and its lineage (as the VASP hand-off)

and, after :func:`run_gpaw`, GPAW's outputs: ``relax.traj`` / ``static.traj`` (energies, forces,
stresses), ``gpaw_relax.txt`` / ``gpaw_static.txt`` (GPAW's logs), ``relax.log``,
``gpaw_summary.json`` (status ok | failed and the reason, energy, final cell, convergence, wall
time, versions, setups) and last the ``done`` marker. With phonons planned (the preset's
``phonon`` block and a primitive cell small enough), a second stage in ``phonopy/`` computes GPAW
forces on phonopy's displaced supercells of the relaxed cell and writes ``phonopy_disp.yaml`` +
``FORCE_SETS``, which :mod:`lib.dft_ingest` reads as it does VASP phonon folders.

Presets are data (``lib/dft_presets/gpaw.json``): ``fast`` (tests, demo) and ``standard``
(close to MPRelaxSet). :func:`resolve_preset` merges overrides into one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lib.ids import canonical_json

CODE_VERSION = "dft-gpaw-1"
DEFAULT_PYTHON = "/usr/bin/python3"
PRESETS_FILE = Path(__file__).resolve().parent / "dft_presets" / "gpaw.json"
SCRIPT_TEMPLATE = Path(__file__).resolve().parent / "dft_presets" / "gpaw_script.py"
SUMMARY_FILE = "gpaw_summary.json"
DONE_FILE = "done"
SETTINGS_FILE = "settings.json"
SCRIPT_FILE = "run_gpaw.py"
STRUCTURE_FILE = "structure.json"
SUPERCELLS_FILE = "phonon_supercells.json"
RUN_FILE = "cgwgan_run.json"  # the lineage record, as lib.dft_inputs writes it
PHONON_DIR = "phonopy"
#: Files written before the run; everything else in a folder is an output (removed on a redo).
INPUT_FILES = frozenset({"structure.json", "POSCAR", "structure.cif", SETTINGS_FILE, SCRIPT_FILE, RUN_FILE,
                         SUPERCELLS_FILE, "phonopy_disp.yaml", "SPOSCAR"})
RUNNING_FILE = ".running"  # {pid, host, started_at} while run_gpaw runs a stage (hidden: not hashed)
RUN_KINDS = ("relax", "phonon")
INSTALL_HINT = "install it with `make dft-deps` (Debian packages gpaw and gpaw-data)"


class GpawMissingError(RuntimeError):
    """GPAW cannot be run: the interpreter is missing or cannot import gpaw."""


# --------------------------------------------------------------------------- presets
def load_presets(path: str | Path | None = None) -> dict[str, Any]:
    """The preset file as a dict (``fast``, ``standard``, ... and ``_spin``, the magnetism table)."""
    p = Path(path) if path is not None else PRESETS_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a readable JSON preset file: {exc}") from exc
    if not isinstance(data, dict) or "_spin" not in data:
        raise ValueError(f"{p}: a preset file is a JSON object with presets and a '_spin' table")
    return data


def preset_names(path: str | Path | None = None) -> list[str]:
    return sorted(k for k in load_presets(path) if not k.startswith("_"))


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_REQUIRED = {"xc": str, "mode": dict, "kpts": dict, "occupations": dict, "convergence": dict, "maxiter": int,
             "spin": dict, "relax": dict, "phonon": dict}


def resolve_preset(preset: str | Mapping[str, Any] = "fast", overrides: Mapping[str, Any] | None = None, *,
                   path: str | Path | None = None) -> dict[str, Any]:
    """A preset by name (or a full preset dict) with ``overrides`` deep-merged, checked.

    The result carries ``name`` (``<preset>`` or ``<preset>+<hash of the overrides>``)."""
    presets = load_presets(path)
    if isinstance(preset, str):
        if preset.startswith("_") or preset not in presets:
            raise ValueError(f"unknown GPAW preset {preset!r} (have {preset_names(path)}) in {path or PRESETS_FILE}")
        base = {**presets[preset], "name": preset}
    else:
        base = copy.deepcopy(dict(preset))
        base.setdefault("name", "custom")
    if overrides:
        base = _merge(base, overrides)
        if "name" not in overrides:
            base["name"] = f"{base['name'].split('+')[0]}+{hashlib.sha256(canonical_json(overrides).encode()).hexdigest()[:8]}"
    base.setdefault("_spin", presets["_spin"])
    for key, typ in _REQUIRED.items():
        if not isinstance(base.get(key), typ):
            raise ValueError(f"GPAW preset {base['name']!r}: {key!r} must be a {typ.__name__} (got {base.get(key)!r})")
    if base["mode"].get("name", "pw") != "pw" or float(base["mode"].get("ecut_ev", 0)) <= 0:
        raise ValueError(f"GPAW preset {base['name']!r}: mode must be plane waves with ecut_ev > 0")
    if base["spin"].get("policy") not in ("magnetic_elements", "always", "never"):
        raise ValueError(f"GPAW preset {base['name']!r}: spin.policy must be magnetic_elements | always | never")
    return base


def preset_sha256(preset: Mapping[str, Any]) -> str:
    """Hash of the energy model of a resolved preset: functional, basis, k-point density, smearing,
    SCF, spin policy. Not its name, description, relaxation or phonon blocks, which change how a
    cell is relaxed or what is computed after, not the energy of a cell: runs with the same hash
    share a hull."""
    body = {k: v for k, v in preset.items() if k not in ("name", "description", "phonon", "relax")}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def kpoint_grid(structure, reciprocal_density: float, *, min_per_axis: int = 1) -> dict[str, Any]:
    """pymatgen's ``Kpoints.automatic_density_by_vol`` (MPRelaxSet's rule) as a GPAW k-point set."""
    from pymatgen.io.vasp.inputs import Kpoints

    kp = Kpoints.automatic_density_by_vol(structure, round(reciprocal_density))
    size = [max(int(min_per_axis), int(n)) for n in kp.kpts[0]]
    return {"size": size, "gamma": str(kp.style).lower().endswith("gamma"),
            "rule": f"pymatgen automatic_density_by_vol, reciprocal_density {reciprocal_density}"}


def spin_setup(symbols: list[str], preset: Mapping[str, Any]) -> tuple[bool, list[float] | None]:
    """(spin-polarised?, initial moments per atom) by the preset's spin policy and MP's MAGMOM table."""
    table = preset["_spin"]
    policy = preset["spin"]["policy"]
    magnetic = set(table["magnetic_elements"])
    alone = set(table.get("elements_spin_polarised_alone", []))  # O2: a triplet molecule
    spinpol = policy == "always" or (policy == "magnetic_elements" and (
        any(s in magnetic for s in symbols) or (bool(symbols) and set(symbols) <= alone)))
    if not spinpol:
        return False, None
    default = float(table.get("magmom_default", 0.6))
    return True, [float(table["magmom"].get(s, default)) for s in symbols]


# --------------------------------------------------------------------------- run folders
def _cell_dict(structure, magmoms: list[float] | None = None) -> dict[str, Any]:
    return {"symbols": [site.specie.symbol for site in structure],
            "cell": np.asarray(structure.lattice.matrix, dtype=float).tolist(),
            "scaled_positions": np.asarray(structure.frac_coords, dtype=float).tolist(),
            "magmoms": magmoms}


def gpaw_oriented(structure):
    """``structure`` with every axis of an axis-aligned (diagonal) lattice pointing the positive way:
    a_i -> -a_i with the fractional coordinate f_i -> -f_i, so every atom stays where it is (wrapped into the cell); any
    other cell is returned as it is. GPAW 22.8 fails before its first SCF on a diagonal cell with a
    negative entry ("negative dimensions are not allowed", from the text log's drawing of the
    atoms): spglib's primitive cell of MP's Pa-3 RuO2, mp-8909, is diag(-a, -a, a)."""
    from pymatgen.core import Lattice, Structure

    m = np.asarray(structure.lattice.matrix, dtype=float)
    sign = np.sign(np.diag(m))
    if np.abs(m - np.diag(np.diag(m))).max() > 1e-10 or np.all(sign > 0):
        return structure
    frac = (np.asarray(structure.frac_coords, dtype=float) * sign) % 1.0
    return Structure(Lattice(m * sign[:, None]), structure.species, frac,
                     site_properties=structure.site_properties or None)


def structure_from_cell(d: Mapping[str, Any]):
    """A pymatgen Structure from a ``{symbols, cell, scaled_positions}`` dict (the summary's cells)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(d["cell"]), list(d["symbols"]), d["scaled_positions"])


def _primitive_size(structure) -> int:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return len(SpacegroupAnalyzer(structure, symprec=1e-2).find_primitive())
    except Exception:  # noqa: BLE001 - spglib failure: the cell as given
        return len(structure)


def gpaw_settings(structure, *, preset: str | Mapping[str, Any] = "fast", run_kind: str = "relax",
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the run script needs (what ``settings.json`` holds) for ``structure``."""
    if run_kind not in RUN_KINDS:
        raise ValueError(f"run_kind must be one of {RUN_KINDS}, not {run_kind!r}")
    p = resolve_preset(preset, overrides)
    symbols = [site.specie.symbol for site in structure]
    spinpol, magmoms = spin_setup(symbols, p)
    kp = p["kpts"]
    settings: dict[str, Any] = {
        "run_kind": run_kind, "preset_name": p["name"], "preset": p, "preset_sha256": preset_sha256(p),
        "kpts": kpoint_grid(structure, kp["reciprocal_density"], min_per_axis=int(kp.get("min_per_axis", 1))),
        "spinpol": spinpol, "initial_magmoms": magmoms, "n_atoms": len(structure),
        "code_version": CODE_VERSION,
    }
    if run_kind == "relax":
        ph = p["phonon"]
        n_prim = _primitive_size(structure)
        planned = bool(ph.get("enabled")) and n_prim <= int(ph["max_primitive_atoms"])
        settings.update(n_primitive_atoms=n_prim, phonon_planned=planned, phonon_skip_reason="" if planned else (
            "phonons disabled by the preset" if not ph.get("enabled") else
            f"primitive cell has {n_prim} atoms > phonon.max_primitive_atoms={ph['max_primitive_atoms']}"))
    return settings


def _phonon_inputs(structure, folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """phonopy's displacements of ``structure`` (written with phonopy here) and the supercells' file."""
    from phonopy import Phonopy
    from phonopy.interface.vasp import write_vasp
    from phonopy.structure.atoms import PhonopyAtoms

    from lib.dft_inputs import supercell_matrix

    ph_set = settings["preset"]["phonon"]
    unit = PhonopyAtoms(symbols=[s.specie.symbol for s in structure], cell=np.asarray(structure.lattice.matrix),
                        scaled_positions=np.asarray(structure.frac_coords))
    m = supercell_matrix(structure.lattice.abc, len(structure), min_length_a=float(ph_set["supercell_min_length_a"]),
                         max_atoms=int(ph_set["max_supercell_atoms"]))
    ph = Phonopy(unit, supercell_matrix=m, primitive_matrix="auto")
    ph.generate_displacements(distance=float(ph_set["displacement_a"]))
    ph.save(str(folder / "phonopy_disp.yaml"), settings={"force_sets": False, "force_constants": False})
    write_vasp(str(folder / "SPOSCAR"), ph.supercell)
    sup = ph.supercell
    n_rep = round(abs(np.linalg.det(m)))
    magmoms = settings["initial_magmoms"]
    sup_struct = structure_from_cell({"symbols": list(sup.symbols), "cell": sup.cell,
                                      "scaled_positions": sup.scaled_positions})
    kp = settings["preset"]["kpts"]
    cells: dict[str, Any] = {
        "supercell": {"symbols": list(sup.symbols), "cell": np.asarray(sup.cell).tolist(),
                      "scaled_positions": np.asarray(sup.scaled_positions).tolist(),
                      # phonopy orders supercell atoms unit-cell atom by atom (n_rep copies each)
                      "magmoms": [float(x) for x in np.repeat(magmoms, n_rep)] if magmoms else None},
        "displacements": [[int(d[0]), float(d[1]), float(d[2]), float(d[3])] for d in ph.displacements],
        "kpts": kpoint_grid(sup_struct, kp["reciprocal_density"], min_per_axis=int(kp.get("min_per_axis", 1))),
        "subtract_residual_forces": bool(ph_set.get("subtract_residual_forces", True)),
        "supercell_matrix": [int(x) for x in m.ravel()],
    }
    (folder / SUPERCELLS_FILE).write_text(json.dumps(cells, indent=1))
    return {"supercell_matrix": cells["supercell_matrix"], "n_supercell_atoms": len(sup),
            "n_displacements": len(cells["displacements"]), "supercell_kpts": cells["kpts"]["size"]}


def _inputs_key(folder: Path) -> str | None:
    """Hash of a folder's settings + structure (+ supercells), or None when they are unreadable."""
    try:
        parts = [(folder / n).read_text() for n in (SETTINGS_FILE, STRUCTURE_FILE)]
        if (folder / SUPERCELLS_FILE).is_file():
            parts.append((folder / SUPERCELLS_FILE).read_text())
    except OSError:
        return None
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def write_gpaw_run(
    structure,
    folder: str | Path,
    *,
    preset: str | Mapping[str, Any] = "fast",
    run_kind: str = "relax",
    record: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run folder ``folder`` for ``structure`` (a pymatgen Structure), atomically.

    ``record``: the lineage written to ``cgwgan_run.json`` (``candidate_id``, ``run_id``,
    ``template_id``, ``checkpoint_id``, ``chemical_system``, ``surrogates``, ...), read back by
    :mod:`lib.dft_ingest`. A folder that already holds the same inputs is kept as it is (with its
    results); one with other inputs is replaced whole. Returns ``{"action": written | kept |
    replaced, "folder", "settings"}``.
    """
    folder = Path(folder)
    structure = gpaw_oriented(structure)
    settings = gpaw_settings(structure, preset=preset, run_kind=run_kind, overrides=overrides)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / STRUCTURE_FILE).write_text(json.dumps(_cell_dict(structure, settings["initial_magmoms"]), indent=1))
        structure.to(filename=str(tmp / "POSCAR"), fmt="poscar")
        structure.to(filename=str(tmp / "structure.cif"), fmt="cif")
        if run_kind == "phonon":
            settings["phonon"] = _phonon_inputs(structure, tmp, settings)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
        shutil.copyfile(SCRIPT_TEMPLATE, tmp / SCRIPT_FILE)
        comp = structure.composition
        full_record = {**(record or {}), "backend": "gpaw", "run_kind": run_kind, "preset_name": settings["preset_name"],
                       "preset_sha256": settings["preset_sha256"], "formula": comp.formula.replace(" ", ""),
                       "code_version": CODE_VERSION}
        (tmp / RUN_FILE).write_text(json.dumps(full_record, indent=1, sort_keys=True, default=str))
        action = "written"
        if folder.exists():
            if _inputs_key(folder) == _inputs_key(tmp) and (folder / RUN_FILE).is_file() and \
                    json.loads((folder / RUN_FILE).read_text()) == full_record:
                shutil.rmtree(tmp)
                return {"action": "kept", "folder": str(folder), "settings": settings}
            shutil.rmtree(folder)
            action = "replaced"
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"action": action, "folder": str(folder), "settings": settings}


# --------------------------------------------------------------------------- state
def read_settings(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / SETTINGS_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: GPAW settings unreadable: {exc}") from exc


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    """The finished stage's summary: ``None`` unless both ``done`` and a readable summary exist."""
    folder = Path(folder)
    if not (folder / DONE_FILE).is_file():
        return None
    try:
        s = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("status") in ("ok", "failed") else None


def is_gpaw_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / SCRIPT_FILE).is_file() or (folder / SUMMARY_FILE).is_file()


def phonon_stage_expected(folder: str | Path) -> bool:
    """Whether a relax folder's phonon stage (``phonopy/``) is part of its run: planned and relax ok."""
    folder = Path(folder)
    try:
        settings = read_settings(folder)
    except ValueError:
        return False
    summary = read_summary(folder)
    return bool(settings.get("phonon_planned")) and summary is not None and summary.get("status") == "ok"


def _is_running(folder: Path) -> bool:
    """A stage of ``folder`` is being run: its ``.running`` names a live process on this host, or
    another host (which cannot be checked from here)."""
    try:
        info = json.loads((folder / RUNNING_FILE).read_text())
    except (OSError, ValueError):
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


def folder_state(folder: str | Path) -> str:
    """``pending`` (inputs only) | ``running`` | ``partial`` (outputs but no ``done``: killed, to be
    redone) | ``ok`` | ``failed`` (done, a stage failed); a relax folder with phonons planned is done
    only with both stages."""
    folder = Path(folder)
    summary = read_summary(folder)
    if summary is None:
        if _is_running(folder):
            return "running"
        outputs = [p for p in folder.iterdir() if p.name not in INPUT_FILES and p.name != RUNNING_FILE] \
            if folder.is_dir() else []
        return "partial" if outputs else "pending"
    if summary["status"] != "ok":
        return "failed"
    if phonon_stage_expected(folder):
        sub = folder / PHONON_DIR
        state = folder_state(sub) if sub.is_dir() else "partial"
        return "partial" if state == "pending" else state  # the relax is done, the phonons are not
    return "ok"


def folder_states(results_root: str | Path) -> dict[str, str]:
    """:func:`folder_state` of every GPAW run folder directly under ``results_root`` (for
    ``cgwgan dft status``: pending, running, partial, ok, failed)."""
    root = Path(results_root)
    if not root.is_dir():
        return {}
    return {p.name: folder_state(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and is_gpaw_folder(p)}


def is_complete(folder: str | Path) -> bool:
    """Every stage of the folder finished (ok or failed): ready to ingest."""
    return folder_state(folder) in ("ok", "failed")


# --------------------------------------------------------------------------- running
def check_gpaw(python: str = DEFAULT_PYTHON, *, timeout_s: float = 120.0) -> str:
    """GPAW's version under ``python``; :class:`GpawMissingError` naming ``make dft-deps`` otherwise."""
    exe = shutil.which(python) if not os.path.isabs(python) else python
    if not exe or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        raise GpawMissingError(f"GPAW's Python interpreter {python!r} not found; {INSTALL_HINT}")
    try:
        out = subprocess.run([exe, "-c", "import gpaw, ase; print(gpaw.__version__)"], capture_output=True,
                             text=True, timeout=timeout_s, env=_child_env(1))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpawMissingError(f"could not run {exe} to import gpaw ({exc}); {INSTALL_HINT}") from exc
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GpawMissingError(f"{exe} cannot import gpaw ({tail[0]}); {INSTALL_HINT}")
    return out.stdout.strip().splitlines()[-1]


def _child_env(num_threads: int) -> dict[str, str]:
    """The GPAW child's environment: this process's, with the thread counts pinned."""
    env = dict(os.environ)  # passed through to the child, not read for settings
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS"):
        env[k] = str(int(num_threads))
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # Debian's Python must not see the venv
        env.pop(k, None)
    env["OMPI_MCA_plm_rsh_agent"] = ""  # serial GPAW: OpenMPI must not look for ssh
    return env


def clean_outputs(folder: str | Path) -> list[str]:
    """Remove every output of a folder (everything but its inputs); the names removed."""
    folder = Path(folder)
    removed = []
    for p in sorted(folder.iterdir()):
        if p.name in INPUT_FILES:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p.name)
    return removed


def _write_failure(folder: Path, reason: str, settings: Mapping[str, Any], wall: float) -> None:
    summary = {"status": "failed", "reason": reason, "run_kind": settings.get("run_kind"),
               "preset_name": settings.get("preset_name"), "stage": "timeout", "wall_time_s": wall}
    for name, text in ((SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True)), (DONE_FILE, "failed\n")):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)


def _run_stage(folder: Path, *, python: str, num_threads: int, timeout_s: float | None) -> dict[str, Any]:
    """Run one stage's script unless it finished already; its summary."""
    done = read_summary(folder)
    if done is not None:
        return done
    if _is_running(folder):
        raise RuntimeError(f"{folder}: a GPAW run is in progress there ({RUNNING_FILE}); not starting another")
    removed = clean_outputs(folder)  # a killed or partial run: start over
    settings = read_settings(folder)
    t0 = time.time()
    running = folder / RUNNING_FILE
    with open(folder / "gpaw_stdout.txt", "w") as out:
        proc = subprocess.Popen([python, str(folder / SCRIPT_FILE)], cwd=folder, stdout=out,
                                stderr=subprocess.STDOUT, env=_child_env(num_threads), start_new_session=True)
        running.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(),
                                       "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _write_failure(folder, f"timed out after {timeout_s:.0f} s (killed)", settings, time.time() - t0)
            rc = None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            running.unlink(missing_ok=True)
    summary = read_summary(folder)
    if summary is None:
        tail = (folder / "gpaw_stdout.txt").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{folder}: GPAW script exited with code {rc} without a summary: {' | '.join(tail)}")
    if removed:
        summary = {**summary, "redone_after_partial": removed}
    return summary


def run_gpaw(folder: str | Path, *, python: str = DEFAULT_PYTHON, num_threads: int = 1,
             timeout_s: float | None = None, check: bool = True) -> dict[str, Any]:
    """Run the folder's GPAW stages; idempotent and resumable. Returns the relax (or phonon) summary,
    with ``phonon_summary`` / ``state`` added.

    A stage with ``done`` and a valid summary is never recomputed; one without (killed, partial) is
    cleaned and redone. For a relax folder with phonons planned, the phonon stage (``phonopy/``)
    is written from the relaxed cell and run after it. ``timeout_s`` bounds each stage; a stage that
    runs out is killed and recorded as failed ("timed out"). Raises :class:`GpawMissingError`
    (naming ``make dft-deps``) when ``python`` cannot import gpaw and there is work to do.
    """
    folder = Path(folder)
    settings = read_settings(folder)
    if check and folder_state(folder) not in ("ok", "failed"):
        check_gpaw(python)
    summary = _run_stage(folder, python=python, num_threads=num_threads, timeout_s=timeout_s)
    out = dict(summary)
    if settings.get("run_kind") == "relax" and settings.get("phonon_planned") and summary["status"] == "ok":
        sub = folder / PHONON_DIR
        if read_summary(sub) is None:
            record = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else {}
            relaxed = structure_from_cell(summary["final_structure"])
            write_gpaw_run(relaxed, sub, preset=settings["preset"], run_kind="phonon",
                           record={**record, "relax_of": folder.name})
        out["phonon_summary"] = _run_stage(sub, python=python, num_threads=num_threads, timeout_s=timeout_s)
    out["state"] = folder_state(folder)
    return out


# --------------------------------------------------------------------------- many runs (dft_runs)
#: Kinds of runs ``dft_runs`` plans: shortlisted candidates and the competing phases of their hull.
PLAN_KINDS = ("candidate", "competing_phase")


def run_folder_name(kind: str, ident: str, preset_name: str) -> str:
    """``gpaw-<preset>-<id>`` (candidates) or ``gpaw-<preset>-phase-<id>`` (competing phases): a
    plain folder name under the results root (what ``lib.dft_ingest.check_run_path`` accepts)."""
    if kind not in PLAN_KINDS:
        raise ValueError(f"kind must be one of {PLAN_KINDS}, not {kind!r}")
    safe = "".join(c if c.isalnum() or c in "._=+-" else "_" for c in f"{ident}")
    return f"gpaw-{preset_name}-" + ("phase-" if kind == "competing_phase" else "") + safe


def select_candidates(shortlist, *, k: int, max_atoms: int = 0):
    """The best ``k`` novel, unique shortlist rows of each chemical system, one row per candidate.

    ``shortlist``: rows of every surrogate (``candidate_id``, ``surrogate_name``,
    ``chemical_system``, ``rank`` / ``unique_rank``, optional ``duplicate_of``, ``is_novel``,
    ``n_atoms`` and a cell). Rows with ``duplicate_of`` set or ``is_novel`` false are left out (a
    missing ``is_novel`` column counts as novel); a candidate ranked by several surrogates is
    ranked by its best rank (ties: ``candidate_id``) and keeps the list of surrogates. With
    ``max_atoms > 0`` larger cells are left out *before* the top ``k`` is taken. Returns
    ``(selected, n_left_out)`` where ``n_left_out`` counts rows dropped per reason."""
    import polars as pl

    for col in ("candidate_id", "surrogate_name", "chemical_system"):
        if col not in shortlist.columns:
            raise ValueError(f"shortlist lacks column {col!r} (has {shortlist.columns[:20]})")
    left_out: dict[str, int] = {}
    sl = shortlist
    if "duplicate_of" in sl.columns:
        left_out["duplicate"] = int(sl["duplicate_of"].is_not_null().sum())
        sl = sl.filter(pl.col("duplicate_of").is_null())
    if "is_novel" in sl.columns:
        left_out["known_phase"] = int((sl["is_novel"] == False).sum())  # noqa: E712 - null counts as novel
        sl = sl.filter(pl.col("is_novel").fill_null(True))
    if max_atoms > 0 and "n_atoms" in sl.columns:
        left_out["too_many_atoms"] = int((sl["n_atoms"] > max_atoms).sum())
        sl = sl.filter(pl.col("n_atoms").is_null() | (pl.col("n_atoms") <= max_atoms))
    rank_col = "unique_rank" if "unique_rank" in sl.columns else "rank"
    if rank_col not in sl.columns:
        raise ValueError("shortlist lacks a rank column (unique_rank or rank)")
    sl = sl.with_columns(pl.col(rank_col).cast(pl.Int64).alias("_rank"))
    sha = pl.col("surrogate_sha256") if "surrogate_sha256" in sl.columns else pl.lit(None, pl.String)
    best = sl.sort(["candidate_id", "_rank", "surrogate_name"], nulls_last=True).group_by(
        "candidate_id", maintain_order=True).first()
    agg = sl.sort(["candidate_id", "surrogate_name"]).with_columns(sha.alias("_sha")).group_by(
        "candidate_id", maintain_order=True).agg(pl.col("surrogate_name").alias("surrogates"),
                                                 pl.col("_sha").alias("surrogate_sha256s"),
                                                 pl.col("_rank").alias("ranks"))
    groups = best.join(agg, on="candidate_id", how="left").sort(["chemical_system", "_rank", "candidate_id"],
                                                                 nulls_last=True)
    if k > 0:
        groups = groups.group_by("chemical_system", maintain_order=True).head(k)
    return groups.rename({"_rank": "best_rank"}), left_out


def select_competing_phases(mp, elements, *, max_atoms: int = 0, max_e_above_hull_ev_per_atom: float = 0.1,
                            primitive: bool = True):
    """The MP structures a DFT hull of ``elements`` needs: for every reduced formula of the system and
    its subsystems, the polymorph with the lowest MP ``e_above_hull`` (ties: fewer atoms, then id)
    among those with at most ``max_atoms`` atoms in the primitive cell (0 = any), kept when it is an
    element (always needed) or within ``max_e_above_hull_ev_per_atom`` of MP's hull. ``mp``: the
    ``mp_structures`` table (``material_id`` and a cell). Returns ``(rows, skipped)``: rows
    ``{material_id, formula, reduced_formula, structure, n_atoms, mp_e_above_hull_ev_per_atom}``
    and skipped ``{material_id, reduced_formula, reason}``: formulas whose every polymorph is too
    large, compounds too far above MP's hull, and elements with no MP structure at all (their
    hull cannot be built: ``discoveries`` says so)."""
    import polars as pl

    from lib.cells import cell_to_structure

    allowed = set(elements)
    for col in ("material_id", "lattice_matrix", "species", "frac_coords"):
        if col not in mp.columns:
            raise ValueError(f"mp_structures lacks column {col!r}: no competing-phase cells")
    ehull = "e_above_hull_ev_per_atom" if "e_above_hull_ev_per_atom" in mp.columns else None
    # columnar pre-filter: only cells of the system or its subsystems reach the Python loop
    sub = mp.filter(pl.col("lattice_matrix").is_not_null() & (pl.col("species").list.len() > 0)
                    & pl.col("species").list.eval(pl.element().is_in(sorted(allowed))).list.all())
    options: dict[str, list[tuple[tuple[float, int, str], dict[str, Any]]]] = {}
    elements_seen: set[str] = set()  # elements with at least one MP cell (kept or skipped below)
    for row in sub.iter_rows(named=True):
        species = row["species"]
        if len(set(species)) == 1:
            elements_seen.add(species[0])
        structure = cell_to_structure(row["lattice_matrix"], species, row["frac_coords"])
        if primitive:
            try:
                structure = structure.get_primitive_structure()
            except Exception:  # noqa: BLE001 - the cell as stored
                pass
        red = structure.composition.reduced_formula
        e = row.get(ehull) if ehull else None
        key = (float("inf") if e is None else float(e), len(structure), str(row["material_id"]))
        options.setdefault(red, []).append((key, {
            "material_id": str(row["material_id"]), "reduced_formula": red, "structure": structure,
            "formula": structure.composition.formula.replace(" ", ""), "n_atoms": len(structure),
            "mp_e_above_hull_ev_per_atom": None if e is None else float(e), "_n_elements": len(set(species))}))
    rows, skipped = [], []
    for red in sorted(options):
        ranked = [o for _, o in sorted(options[red], key=lambda kv: kv[0])]
        fits = [o for o in ranked if max_atoms <= 0 or o["n_atoms"] <= max_atoms]
        if not fits:
            skipped.append({"material_id": ranked[0]["material_id"], "reduced_formula": red,
                            "reason": f"every {red} polymorph has more than max_phase_atoms={max_atoms} atoms "
                                      f"in its primitive cell (smallest: {min(o['n_atoms'] for o in ranked)})"})
            continue
        best = fits[0]
        e = best["mp_e_above_hull_ev_per_atom"]
        if best["_n_elements"] > 1 and e is not None and e > max_e_above_hull_ev_per_atom:
            skipped.append({"material_id": best["material_id"], "reduced_formula": red,
                            "reason": f"MP e_above_hull {e:.3f} eV/atom > {max_e_above_hull_ev_per_atom:g}"})
            continue
        rows.append({k: v for k, v in best.items() if not k.startswith("_")})
    # an element's reduced formula may not be its symbol (O2, H2, N2...): compare by element
    for el in sorted(allowed - elements_seen):
        skipped.append({"material_id": None, "reduced_formula": el,
                        "reason": f"no MP structure of element {el} in mp_structures: no elemental "
                                  "competing phase (the DFT hull of its systems cannot be built)"})
    return rows, skipped


#: Elements whose ground state is a molecular crystal: PBE has no dispersion to hold the molecules
#: together, so a cell relaxation drifts or collapses (O2 at 400 eV: 23.3 -> 8.4 A^3/atom); their
#: competing-phase runs relax positions in MP's cell.
MOLECULAR_ELEMENTS = frozenset({"H", "N", "O", "F", "Cl", "Br", "I"})


def phase_overrides(structure) -> dict[str, Any]:
    """Preset overrides of a competing-phase run: no phonons; positions only (MP's cell) for the
    molecular elements (:data:`MOLECULAR_ELEMENTS`). Neither changes the preset's energy hash."""
    out: dict[str, Any] = {"phonon": {"enabled": False}}
    els = {el.symbol for el in structure.composition.elements}
    if len(els) == 1 and els <= MOLECULAR_ELEMENTS:
        out["relax"] = {"cell_filter": "none"}
    return out


def _run_one(folder: str, python: str, num_threads: int, timeout_s: float | None) -> dict[str, Any]:
    """Run one folder (a Ray task or in-process); never raises: the error is returned."""
    t0 = time.time()
    before = folder_state(folder)
    try:
        summary = run_gpaw(folder, python=python, num_threads=num_threads, timeout_s=timeout_s, check=False)
        error = ""
    except Exception as exc:  # noqa: BLE001 - reported on the dft_runs row
        summary, error = {}, f"{type(exc).__name__}: {exc}"
    return {"folder": folder, "state_before": before, "state": folder_state(folder), "error": error,
            "seconds": time.time() - t0, "redone_after_partial": bool(summary.get("redone_after_partial"))}


def run_gpaw_folders(folders: list[str], *, use_ray: bool, num_cpus: float = 1.0, python: str = DEFAULT_PYTHON,
                     timeout_s: float | None = None, max_parallel: int = 0,
                     on_done=None) -> list[dict[str, Any]]:
    """Run the GPAW folders that are not finished, as Ray tasks with ``num_cpus`` each (``ray.init``
    is the caller's business) or one after another here. A finished folder (``ok`` / ``failed``) is
    never recomputed; a killed one (``partial``) is cleaned and redone. GPAW must be importable
    under ``python`` (:class:`GpawMissingError`, naming ``make dft-deps``, before anything runs).
    Returns one dict per folder, in order: ``folder, state_before, state, error, seconds,
    redone_after_partial``; ``on_done(result)`` is called as each finishes."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for f in folders:
        state = folder_state(f)  # read once: a finished folder is reported as it is
        if state in ("ok", "failed"):
            results[f] = {"folder": f, "state_before": state, "state": state, "error": "",
                          "seconds": 0.0, "redone_after_partial": False}
        else:
            todo.append(f)
    if todo:
        check_gpaw(python)
    threads = max(1, int(num_cpus))
    if todo and use_ray:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("use_ray=True but Ray is not initialised: call ray.init() first")
        remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_run_one)
        pending: list = []
        queue = list(todo)
        limit = max_parallel if max_parallel > 0 else len(queue)
        while queue or pending:
            while queue and len(pending) < limit:
                pending.append(remote.remote(queue.pop(0), python, threads, timeout_s))
            done, pending = ray.wait(pending, num_returns=1)
            for r in ray.get(done):
                results[r["folder"]] = r
                if on_done:
                    on_done(r)
    else:
        for f in todo:
            r = _run_one(f, python, threads, timeout_s)
            results[f] = r
            if on_done:
                on_done(r)
    return [results[f] for f in folders]


def summary_fields(folder: str | Path) -> dict[str, Any]:
    """What a ``dft_runs`` row reports of a folder: state, GPAW wall time, energies, failure reason."""
    folder = Path(folder)
    state = folder_state(folder) if folder.is_dir() else "pending"
    s = read_summary(folder) if folder.is_dir() else None
    out: dict[str, Any] = {"status": state, "gpaw_wall_time_s": None, "final_energy_ev": None,
                           "energy_per_atom_ev": None, "reason": ""}
    if s is None:
        return out
    out["gpaw_wall_time_s"] = s.get("wall_time_s")
    if s.get("status") == "ok":
        out.update(final_energy_ev=s.get("final_energy_ev"), energy_per_atom_ev=s.get("energy_per_atom_ev"))
    else:
        out["reason"] = str(s.get("reason") or "failed")
    sub = read_summary(folder / PHONON_DIR)
    if sub is not None and sub.get("status") != "ok":
        out["reason"] = f"phonon stage failed: {sub.get('reason')}"
    return out
