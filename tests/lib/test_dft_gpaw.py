"""GPAW backend: real GPAW runs (Debian's /usr/bin/python3, preset ``fast``) on 2-atom Si, through
lib.dft_gpaw (run folders, subprocess runs) and lib.dft_ingest (the same rows as VASP folders).

GPAW missing: skipped with the install command outside CI, failed in CI (``CI=true``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lib.dft_gpaw import (
    DEFAULT_PYTHON,
    DONE_FILE,
    SCRIPT_FILE,
    SUMMARY_FILE,
    GpawMissingError,
    folder_state,
    folder_states,
    gpaw_oriented,
    gpaw_settings,
    resolve_preset,
    run_gpaw,
    write_gpaw_run,
)
from lib.dft_ingest import (
    elemental_references_from_rows,
    ingest_run_folder,
    load_elemental_references,
    result_id_for,
    scan_results_root,
)

pytestmark = pytest.mark.filterwarnings("ignore")

SI_PBE_A = 5.47  # PBE lattice constant of diamond Si (Å); MP's mp-149 (PBE) has 5.469
NO_PHONONS = {"phonon": {"enabled": False}}


def _si(a: float = 5.40):
    from pymatgen.core import Lattice, Structure

    h = a / 2
    return Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def _conventional_a(row: dict) -> float:
    m = row["lattice_matrix"]
    vectors = [m[0:3], m[3:6], m[6:9]]
    return sum(math.sqrt(2) * math.sqrt(sum(x * x for x in v)) for v in vectors) / 3


@pytest.fixture(scope="module")
def si_done(gpaw_version, tmp_path_factory) -> Path:
    """One finished Si relax + static run (no phonons), linked to a candidate."""
    root = tmp_path_factory.mktemp("gpaw_results")
    out = write_gpaw_run(_si(), root / "cand-si", preset="fast", overrides=NO_PHONONS,
                         record={"candidate_id": "cand-si", "run_id": "dft-si", "chemical_system": "Si",
                                 "surrogates": [{"surrogate_name": "m3gnet", "rank": 1}]})
    assert out["action"] == "written"
    summary = run_gpaw(root / "cand-si", timeout_s=300)
    assert summary["status"] == "ok", summary["reason"]
    return root / "cand-si"


def test_presets_are_data_and_standard_is_mp_like() -> None:
    std = resolve_preset("standard")
    assert std["xc"] == "PBE" and std["mode"]["ecut_ev"] == 800 and std["kpts"]["reciprocal_density"] == 64
    fast = resolve_preset("fast", {"maxiter": 2})
    assert fast["maxiter"] == 2 and fast["name"].startswith("fast+") and fast["mode"]["ecut_ev"] < 800
    with pytest.raises(ValueError, match="unknown GPAW preset 'nope'"):
        resolve_preset("nope")
    with pytest.raises(ValueError, match=r"spin\.policy"):
        resolve_preset("fast", {"spin": {"policy": "sometimes"}})
    # spin-polarised for Ru (MP's default 0.6 muB on every atom), not for BaO; MP's k-point rule
    from pymatgen.core import Lattice, Structure

    bao = Structure(Lattice.cubic(5.6), ["Ba", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    ruo = Structure(Lattice.cubic(3.0), ["Ru", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert gpaw_settings(bao, preset="standard")["spinpol"] is False
    s = gpaw_settings(ruo, preset="standard")
    assert s["spinpol"] is True and s["initial_magmoms"] == [0.6, 0.6]
    assert gpaw_settings(_si(5.43), preset="standard")["kpts"]["size"] == [7, 7, 7]


def test_si_run_is_ingested_as_an_ok_row(si_done: Path, gpaw_version: str) -> None:
    summary = json.loads((si_done / SUMMARY_FILE).read_text())
    assert summary["gpaw_version"] == gpaw_version and summary["setups"]["Si"].endswith("Si.PBE.gz")
    assert summary["scf_converged"] and summary["relax_converged"] and summary["n_steps"] >= 1
    for name in ("relax.traj", "static.traj", "gpaw_relax.txt", "gpaw_static.txt", "settings.json", SCRIPT_FILE,
                 "POSCAR", "structure.cif", DONE_FILE):
        assert (si_done / name).is_file(), name

    folders = scan_results_root(si_done.parent, settle_seconds=0)
    assert [(f.name, f.is_ready) for f in folders] == [("cand-si", True)]
    row = ingest_run_folder(si_done.parent, "cand-si", references=None)
    assert row["status"] == "ok", row["reason"]
    assert row["dft_code"] == "gpaw" and row["dft_preset"].startswith("fast+") and len(row["dft_preset_sha256"]) == 64
    assert row["is_linked"] and row["candidate_id"] == "cand-si" and row["input_run_id"] == "dft-si"
    assert row["shortlist_surrogates"] == ["m3gnet"]
    assert row["reduced_formula"] == "Si" and row["n_atoms"] == 2 and not row["has_vasprun"]
    assert row["is_converged_electronic"] and row["is_converged_ionic"]
    # PBE Si: the lattice relaxes from 5.40 Å to ~5.47 Å; the energy is GPAW's (relative to atoms)
    assert _conventional_a(row) == pytest.approx(SI_PBE_A, rel=0.02)
    assert abs(_conventional_a(row) - 5.40) > 0.02  # the cell did relax
    assert -6.5 < row["energy_per_atom_ev"] < -4.5
    assert row["final_energy_ev"] == pytest.approx(summary["final_energy_ev"])
    assert "phonons not computed: phonons disabled by the preset" in row["reason"]


def test_formation_energy_only_against_references_of_the_same_code(si_done: Path, shared_dir: Path) -> None:
    mp_refs = load_elemental_references(shared_dir / "data" / "mp" / "mp_elemental_reference_entries.json.gz")
    row = ingest_run_folder(si_done.parent, "cand-si", references=mp_refs)
    assert row["formation_energy_per_atom_ev"] is None and "are vasp energies, this run is gpaw" in row["reason"]
    refs = elemental_references_from_rows([row], dft_code="gpaw", dft_preset_sha256=row["dft_preset_sha256"])
    assert refs.energy_per_atom_ev["Si"] == pytest.approx(row["energy_per_atom_ev"])
    again = ingest_run_folder(si_done.parent, "cand-si", references=refs)
    assert again["formation_energy_per_atom_ev"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no finished single-element vasp rows"):
        elemental_references_from_rows([row], dft_code="vasp")


def test_finished_run_is_never_recomputed_and_an_edit_changes_the_result_id(si_done: Path) -> None:
    before = (si_done / SUMMARY_FILE).stat().st_mtime_ns
    assert run_gpaw(si_done)["status"] == "ok"
    assert (si_done / SUMMARY_FILE).stat().st_mtime_ns == before
    again = write_gpaw_run(_si(), si_done, preset="fast", overrides=NO_PHONONS,
                           record={"candidate_id": "cand-si", "run_id": "dft-si", "chemical_system": "Si",
                                   "surrogates": [{"surrogate_name": "m3gnet", "rank": 1}]})
    assert again["action"] == "kept" and (si_done / DONE_FILE).is_file()
    rid, digest, _ = result_id_for(si_done.parent, "cand-si")
    assert ingest_run_folder(si_done.parent, "cand-si", references=None)["result_id"] == rid
    note = si_done / "notes.txt"
    try:
        note.write_text("edited after ingest\n")
        rid2, digest2, _ = result_id_for(si_done.parent, "cand-si")
        assert rid2 != rid and digest2 != digest
    finally:
        note.unlink()


def test_a_cell_with_negative_axes_runs(gpaw_version, tmp_path: Path) -> None:
    """spglib's primitive cell of MP's Pa-3 RuO2 is diag(-a, -a, a): GPAW 22.8 failed on it before
    its first SCF ("negative dimensions are not allowed"). The run folder flips such axes (atoms
    unmoved); here on CsCl-type NaCl in a diag(-a, -a, a) cell, one SCF step."""
    from pymatgen.core import Lattice, Structure

    a = 3.3
    flipped = Structure(Lattice([[-a, 0, 0], [0, -a, 0], [0, 0, a]]), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    oriented = gpaw_oriented(flipped)
    assert np.allclose(oriented.lattice.matrix, np.diag([a, a, a]))
    shift = oriented.lattice.get_fractional_coords(flipped.cart_coords) - oriented.frac_coords
    assert np.allclose(shift, np.round(shift))  # every atom where it was, up to a lattice vector
    si = _si()
    assert gpaw_oriented(si) is si  # a cell that is not a flipped diagonal one comes back as it was given
    write_gpaw_run(flipped, tmp_path / "nacl", preset="fast",
                   overrides={"maxiter": 1, "scf_retry": {"maxiter": 1}, "relax": {"enabled": False}, **NO_PHONONS})
    summary = run_gpaw(tmp_path / "nacl", timeout_s=120)
    assert "negative dimensions" not in str(summary.get("reason")), summary["reason"]
    assert summary["stage"] != "relax" and "SCF did not converge within maxiter=1" in str(summary["reason"])
    assert summary["scf_retried"]  # the retry (maxiter 1 too) ran on the same cell without the error


def test_scf_that_does_not_converge_is_retried_with_a_gentler_mixer(gpaw_version, tmp_path: Path) -> None:
    """maxiter=2 fails; the preset's scf_retry (Pulay mixer, beta 0.02, 300 iterations) reruns the
    stage from the input cell and converges; the summary says so."""
    write_gpaw_run(_si(), tmp_path / "si-retry", preset="fast",
                   overrides={"maxiter": 2, "relax": {"enabled": False}, **NO_PHONONS})
    summary = run_gpaw(tmp_path / "si-retry", timeout_s=120)
    assert summary["status"] == "ok", summary["reason"]
    assert summary["scf_retried"] is True and "maxiter=2" in summary["first_failure"]
    assert summary["n_scf_iterations"] > 2


def test_scf_that_does_not_converge_is_a_failed_row(gpaw_version, tmp_path: Path) -> None:
    write_gpaw_run(_si(), tmp_path / "si-maxiter2", preset="fast",
                   overrides={"maxiter": 2, "scf_retry": {"maxiter": 2}, **NO_PHONONS},
                   record={"candidate_id": "cand-si"})
    summary = run_gpaw(tmp_path / "si-maxiter2", timeout_s=120)
    assert summary["status"] == "failed" and summary["scf_converged"] is False and summary["scf_retried"]
    assert "SCF did not converge within maxiter=2 iterations, then 2 with the scf_retry mixer" in summary["reason"]
    assert folder_state(tmp_path / "si-maxiter2") == "failed"
    assert [f.is_ready for f in scan_results_root(tmp_path, settle_seconds=0)] == [True]
    row = ingest_run_folder(tmp_path, "si-maxiter2", references=None)
    assert row["status"] == "failed" and row["is_converged_electronic"] is False
    assert "GPAW relax failed: SCF did not converge within maxiter=2" in row["reason"]
    assert row["final_energy_ev"] is None and row["is_linked"]


def test_killed_run_is_redone(gpaw_version, tmp_path: Path) -> None:
    folder = tmp_path / "si-killed"
    write_gpaw_run(_si(), folder, preset="fast", overrides=NO_PHONONS, record={"candidate_id": "cand-si"})
    proc = subprocess.Popen([DEFAULT_PYTHON, str(folder / SCRIPT_FILE)], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (folder / "gpaw_relax.txt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    assert not (folder / DONE_FILE).exists() and folder_states(tmp_path) == {"si-killed": "partial"}
    assert [f.is_ready for f in scan_results_root(tmp_path, settle_seconds=0)] == [False]
    row = ingest_run_folder(tmp_path, "si-killed", references=None)
    assert row["status"] == "failed" and "GPAW run unfinished" in row["reason"]

    summary = run_gpaw(folder, timeout_s=300)
    assert summary["status"] == "ok" and "gpaw_relax.txt" in summary["redone_after_partial"]
    assert ingest_run_folder(tmp_path, "si-killed", references=None)["status"] == "ok"


def test_missing_gpaw_names_make_dft_deps(tmp_path: Path) -> None:
    write_gpaw_run(_si(), tmp_path / "si", preset="fast", overrides=NO_PHONONS)
    with pytest.raises(GpawMissingError, match=r"make dft-deps"):
        run_gpaw(tmp_path / "si", python=str(tmp_path / "no" / "python3"))
    with pytest.raises(GpawMissingError, match=r"cannot import gpaw.*make dft-deps"):
        run_gpaw(tmp_path / "si", python=sys.executable)  # the venv: no gpaw, by design
    assert folder_state(tmp_path / "si") == "pending"


@pytest.mark.slow
def test_phonon_stage_with_gpaw_forces(gpaw_version, tmp_path: Path) -> None:
    """Relax, then phonopy displacements of the relaxed cell with GPAW forces (a 1x1x1 supercell
    to stay fast: the Γ optical mode of Si, ~15 THz in PBE, is exact on it)."""
    folder = tmp_path / "si-ph"
    write_gpaw_run(_si(5.47), folder, preset="fast", overrides={"phonon": {"supercell_min_length_a": 3.0}},
                   record={"candidate_id": "cand-si"})
    summary = run_gpaw(folder, timeout_s=300)
    assert summary["status"] == "ok" and summary["phonon_summary"]["status"] == "ok", summary
    assert (folder / "phonopy" / "FORCE_SETS").is_file() and (folder / "phonopy" / "phonopy_disp.yaml").is_file()
    assert [f.is_ready for f in scan_results_root(tmp_path, settle_seconds=0)] == [True]
    row = ingest_run_folder(tmp_path, "si-ph", references=None)
    assert row["status"] == "ok", row["reason"]
    assert row["phonon_source"] == "force_sets"
    assert 13.5 < row["max_frequency_thz"] < 16.5


# --------------------------------------------------------------------------- dft_runs planning
def _shortlist_rows():
    import polars as pl

    return pl.DataFrame({
        "candidate_id": ["c1", "c2", "c3", "c1", "c4", "c5"],
        "surrogate_name": ["A", "A", "A", "B", "B", "A"],
        "surrogate_sha256": ["a" * 64, "a" * 64, "a" * 64, "b" * 64, "b" * 64, "a" * 64],
        "chemical_system": ["Ba-O-Ru", "Ba-O-Ru", "Ba-O-Ru", "Ba-O-Ru", "Ba-O-Ru", "Cl-Na"],
        "rank": [2, 1, 3, 1, 2, 1],
        "unique_rank": [2, 1, None, 1, 2, 1],
        "duplicate_of": [None, None, "c2", None, None, None],
        "n_atoms": [5, 5, 5, 5, 40, 2],
    })


def test_select_candidates_takes_the_best_k_unique_rows_of_each_system() -> None:
    import polars as pl

    from lib.dft_gpaw import select_candidates

    picked, left_out = select_candidates(_shortlist_rows(), k=2, max_atoms=20)
    assert left_out == {"duplicate": 1, "too_many_atoms": 1}
    by_sys = {s: g["candidate_id"].to_list() for (s,), g in picked.group_by(["chemical_system"], maintain_order=True)}
    # c1 is ranked 1 by B and 2 by A: its best rank is 1; c2 is 1 under A; ties by candidate_id
    assert by_sys == {"Ba-O-Ru": ["c1", "c2"], "Cl-Na": ["c5"]}
    c1 = picked.filter(pl.col("candidate_id") == "c1").row(0, named=True)
    assert c1["surrogates"] == ["A", "B"] and c1["ranks"] == [2, 1] and c1["best_rank"] == 1
    # a known phase (is_novel false) is left out; a null is_novel counts as novel
    known = _shortlist_rows().with_columns(pl.Series("is_novel", [False, True, True, False, True, None]))
    picked, left_out = select_candidates(known, k=0)
    assert sorted(picked["candidate_id"].to_list()) == ["c2", "c4", "c5"] and left_out["known_phase"] == 2
    with pytest.raises(ValueError, match="lacks column 'chemical_system'"):
        select_candidates(_shortlist_rows().drop("chemical_system"), k=1)


def test_competing_phases_of_ba_ru_o_from_real_mp_rows(ba_ru_o_mp) -> None:
    from lib.dft_gpaw import run_folder_name, select_competing_phases

    rows, skipped = select_competing_phases(ba_ru_o_mp, ["Ba", "Ru", "O"], max_atoms=20,
                                            max_e_above_hull_ev_per_atom=0.1)
    chosen = {r["reduced_formula"]: (r["material_id"], r["n_atoms"]) for r in rows}
    # lowest MP e_above_hull per formula among cells of <= 20 atoms: RuO4 mp-554791 (40 atoms, on
    # the hull) gives way to mp-547094 (10 atoms, 1 meV/atom above); every element but Ru has a cell
    assert chosen["BaO"] == ("mp-1342", 2) and chosen["O2"][0] == "mp-12957" and chosen["Ba"][0] == "mp-570384"
    assert chosen["RuO4"] == ("mp-547094", 10) and chosen["BaRuO3"][0] == "mp-3597"
    assert chosen["RuO2"][0] == "mp-8909" and chosen["Ba2RuO4"][0] == "mp-1025237"
    why = {s["reduced_formula"]: s["reason"] for s in skipped}
    assert "no MP structure of element Ru" in why["Ru"]
    assert chosen["BaO6"][0] == "mp-1182169"  # 0.039 eV/atom above MP's hull, below the 0.1 threshold
    assert "Ba4Ru3O10" in why and "Ba2Ru7O18" in why  # 34- and 27-atom cells: max_phase_atoms
    tight, tight_skipped = select_competing_phases(ba_ru_o_mp, ["Ba", "Ru", "O"], max_atoms=20,
                                                   max_e_above_hull_ev_per_atom=0.01)
    kept = {r["reduced_formula"] for r in tight}
    assert {"BaO6", "RuO2"}.isdisjoint(kept) and {"Ba", "O2", "BaRuO3"} <= kept  # elements are always kept
    assert any("MP e_above_hull 0.067" in s["reason"] for s in tight_skipped)
    # every O cell too large (the 1-atom mp-1056831 left out): skipped as O2, never reported as an
    # element without any MP cell
    no_1_atom_o = ba_ru_o_mp.filter(ba_ru_o_mp["material_id"] != "mp-1056831")
    _, tiny_skipped = select_competing_phases(no_1_atom_o, ["Ba", "Ru", "O"], max_atoms=1)
    tiny_why = {s["reduced_formula"]: s["reason"] for s in tiny_skipped}
    assert "max_phase_atoms=1" in tiny_why["O2"] and "O" not in tiny_why
    assert "no MP structure of element Ru" in tiny_why["Ru"]
    assert run_folder_name("competing_phase", "mp-1342", "fast") == "gpaw-fast-phase-mp-1342"
    assert run_folder_name("candidate", "cand-1/x", "fast") == "gpaw-fast-cand-1_x"


def test_run_gpaw_folders_never_recomputes_a_finished_folder(si_done: Path, tmp_path: Path) -> None:
    from lib.dft_gpaw import run_gpaw_folders, summary_fields

    before = (si_done / SUMMARY_FILE).stat().st_mtime_ns
    fresh = tmp_path / "si-fresh"
    write_gpaw_run(_si(5.47), fresh, preset="fast", overrides={**NO_PHONONS, "relax": {"enabled": False}})
    out = run_gpaw_folders([str(si_done), str(fresh)], use_ray=False)
    assert [(o["state_before"], o["state"]) for o in out] == [("ok", "ok"), ("pending", "ok")]
    assert out[0]["seconds"] == 0.0 and (si_done / SUMMARY_FILE).stat().st_mtime_ns == before
    f = summary_fields(fresh)
    assert f["status"] == "ok" and f["energy_per_atom_ev"] < -4.5 and f["gpaw_wall_time_s"] > 0
    # a run killed part-way (outputs, no done marker) is cleaned and redone
    killed = tmp_path / "si-killed"
    write_gpaw_run(_si(5.47), killed, preset="fast", overrides={**NO_PHONONS, "relax": {"enabled": False}})
    (killed / "gpaw_static.txt").write_text("GPAW log cut short by a kill\n")
    assert folder_state(killed) == "partial"
    out = run_gpaw_folders([str(killed)], use_ray=False)
    assert out[0]["state_before"] == "partial" and out[0]["state"] == "ok" and out[0]["redone_after_partial"]
    # finished folders need no GPAW at all; a folder to run does, and says how to install it
    again = run_gpaw_folders([str(fresh)], use_ray=False, python=str(tmp_path / "no" / "python3"))
    assert again[0]["state"] == "ok" and again[0]["seconds"] == 0.0
    pending = tmp_path / "si-pending"
    write_gpaw_run(_si(5.47), pending, preset="fast", overrides=NO_PHONONS)
    with pytest.raises(GpawMissingError, match="make dft-deps"):
        run_gpaw_folders([str(fresh), str(pending)], use_ray=False, python=str(tmp_path / "no" / "python3"))


def test_dft_verdicts_on_real_mp_energies(ba_ru_o_mp, ba_ru_o_dir: Path) -> None:
    """Results on MP's own footing (MP2020 energies rebuilt from MP's formation energies): BaO2
    mp-1006878 has a negative formation energy but lies 0.12 eV/atom above MP's hull -> rejected
    with its reason; BaO mp-1342 matches MP's own cell -> a rediscovery; a GPAW result without any
    GPAW competing phase of its preset -> missing_references (never compared with MP)."""
    import polars as pl
    from pymatgen.core import Composition

    from lib.dft_ingest import load_elemental_references, rows_to_frame
    from lib.dft_verdicts import dft_verdicts

    refs = load_elemental_references(ba_ru_o_dir / "mp_elemental_refs_Ba_Ru_O.json")
    mp = {r["material_id"]: r for r in ba_ru_o_mp.to_dicts()}
    rows = []
    for mid, code in (("mp-1006878", "vasp"), ("mp-1342", "vasp"), ("mp-1105", "gpaw")):
        r = mp[mid]
        comp = Composition(r["formula"])
        mu = sum(comp.get_atomic_fraction(el) * refs.energy_per_atom_ev[el.symbol] for el in comp.elements)
        e = (r["formation_energy_per_atom_ev"] + mu) * r["nsites"]
        rows.append({"result_id": f"dftres-{mid}", "run_name": f"run-{mid}", "status": "ok", "is_linked": True,
                     "candidate_id": f"cand-{mid}", "chemical_system": "Ba-O", "formula": r["formula"],
                     "n_atoms": r["nsites"], "final_energy_ev": e, "energy_per_atom_ev": e / r["nsites"],
                     "lattice_matrix": r["lattice_matrix"], "species": r["species"], "frac_coords": r["frac_coords"],
                     "dft_code": code, "dft_preset_sha256": "f" * 64 if code == "gpaw" else None,
                     "ingested_at": "2026-12-04T00:00:00Z"})
    # a GPAW phase run of the same preset whose relaxation did not converge: not a competing phase
    rows.append({"result_id": "dftres-o2", "run_name": "gpaw-fast-phase-mp-12957", "status": "unconverged",
                 "reason": "relaxation not converged to fmax=0.05 eV/Å after 40 steps", "is_linked": False,
                 "formula": "O8", "n_atoms": 8, "dft_code": "gpaw", "dft_preset_sha256": "f" * 64,
                 "ingested_at": "2026-12-04T00:00:00Z"})
    results = rows_to_frame(rows).with_columns(
        pl.when(pl.col("dft_code") == "vasp").then(pl.lit("MP2020")).alias("energy_footing"))
    known = ba_ru_o_mp.filter(pl.col("material_id") != "mp-1006878")  # that polymorph is "new" here
    out = {r["candidate_id"]: r for r in dft_verdicts(results, mp_structures=known, mp_references=refs,
                                                      require_phonons=False).to_dicts()}
    bao2 = out["cand-mp-1006878"]
    assert bao2["verdict"] == "above_hull" and not bao2["is_discovery"] and bao2["is_novel"]
    assert bao2["e_above_hull_dft_ev_per_atom"] == pytest.approx(mp["mp-1006878"]["e_above_hull_ev_per_atom"], abs=2e-3)
    assert bao2["formation_energy_dft_ev_per_atom"] == pytest.approx(-2.050, abs=2e-3)
    assert "0.1200 eV/atom above the hull" in bao2["verdict_reason"]
    assert "formation energy -2.05" in bao2["verdict_reason"] and "mp-1105" in bao2["verdict_reason"]
    bao = out["cand-mp-1342"]
    assert bao["verdict"] == "rediscovery" and bao["known_material_id"] == "mp-1342"
    assert bao["e_above_hull_dft_ev_per_atom"] == pytest.approx(0.0, abs=1e-6)
    g = out["cand-mp-1105"]
    assert g["verdict"] == "missing_references" and g["e_above_hull_dft_ev_per_atom"] is None
    assert "no competing phases computed with the same backend and preset (gpaw:ffff" in g["verdict_reason"]
    assert "cannot be used: gpaw-fast-phase-mp-12957 (O8, unconverged: relaxation not converged" in g["verdict_reason"]
    assert set(out) == {"cand-mp-1006878", "cand-mp-1342", "cand-mp-1105"}  # phase runs get no verdict
    assert bao2["n_competing_phases"] > 3 and g["n_competing_phases"] == 0


def test_molecular_phases_keep_mp_cell_and_the_energy_footing() -> None:
    from pymatgen.core import Lattice, Structure

    from lib.dft_gpaw import phase_overrides

    o2 = Structure(Lattice.orthorhombic(3.3, 3.3, 4.6), ["O", "O"], [[0, 0, 0.0], [0, 0, 0.26]])
    assert phase_overrides(o2) == {"phonon": {"enabled": False}, "relax": {"cell_filter": "none"}}
    assert phase_overrides(_si()) == {"phonon": {"enabled": False}}
    # neither the relaxation nor the phonon settings change the energy model's hash: one hull
    plain = gpaw_settings(o2, preset="fast")
    gas = gpaw_settings(o2, preset="fast", overrides=phase_overrides(o2))
    assert gas["preset"]["relax"]["cell_filter"] == "none" and gas["preset_name"] != plain["preset_name"]
    assert gas["preset_sha256"] == plain["preset_sha256"]
    assert plain["spinpol"] is True and plain["initial_magmoms"] == [0.6, 0.6]  # O2 is a triplet
    assert gpaw_settings(o2, preset="fast", overrides={"mode": {"ecut_ev": 300}})["preset_sha256"] != plain["preset_sha256"]
