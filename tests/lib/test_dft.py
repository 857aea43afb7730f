"""DFT hand-off and ingest on the real VASP/phonopy fixtures (copied into tmp dirs) and bad copies."""

from __future__ import annotations

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib.dft_ingest import (
    RESULT_SCHEMA,
    DiscoveryThresholds,
    check_run_path,
    ingest_run_folder,
    ingest_run_folders,
    load_elemental_references,
    result_id_for,
    rows_to_frame,
    scan_results_root,
    select_discoveries,
)
from lib.dft_inputs import DftInputSettings, potcar_available, supercell_matrix, write_dft_inputs

pytestmark = pytest.mark.filterwarnings("ignore")


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
        if not p.is_symlink():
            os.utime(p)  # a fresh copy, as a finished calculation would be (copytree keeps old mtimes)
    return dest


@pytest.fixture(scope="module")
def refs(shared_dir: Path):
    return load_elemental_references(shared_dir / "data" / "mp" / "mp_elemental_reference_entries.json.gz")


@pytest.fixture(scope="module")
def fixture_rows(fixtures_dir: Path, tmp_path_factory, refs) -> dict[str, dict]:
    """The four fixture folders, ingested once (unlinked: they carry no cgwgan_run.json)."""
    root = tmp_path_factory.mktemp("results")
    for name in ("NaCl", "NaCl-VASPdfpt", "Si", "MgO"):
        _copy(fixtures_dir / name, root / name)
    return {n: ingest_run_folder(root, n, references=refs) for n in ("NaCl", "NaCl-VASPdfpt", "Si", "MgO")}


def _last_e0(vasprun: Path) -> float:
    """The final ionic step's energy without entropy, read with ElementTree (independent of pymatgen).

    (These vasprun.xml files carry VASP's known bug of a zero ``e_0_energy`` in the ionic step;
    with no smearing entropy ``e_wo_entrp`` is the sigma -> 0 energy.)"""
    calcs = ET.parse(vasprun).getroot().findall("calculation")
    return float(calcs[-1].find("energy").find("i[@name='e_wo_entrp']").text)


def test_fixture_energies_match_independent_parses(fixture_rows, fixtures_dir: Path, refs) -> None:
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.entries.computed_entries import ComputedEntry

    r = fixture_rows["NaCl-VASPdfpt"]
    outcar = (fixtures_dir / "NaCl-VASPdfpt" / "OUTCAR").read_text()
    e_outcar = float(re.findall(r"energy\(sigma->0\)\s*=\s*(-?\d+\.\d+)", outcar)[-1])
    assert r["final_energy_ev"] == pytest.approx(e_outcar, abs=1e-5)
    assert r["final_energy_ev"] == pytest.approx(_last_e0(fixtures_dir / "NaCl-VASPdfpt" / "vasprun.xml"), abs=1e-5)
    assert r["outcar_energy_ev"] == pytest.approx(e_outcar, abs=1e-5)
    assert r["n_atoms"] == 64 and r["reduced_formula"] == "NaCl" and r["formula"] == "Na32Cl32"
    assert r["is_converged_electronic"] and r["is_converged_ionic"] and r["incar_ibrion"] == 8
    assert r["energy_per_atom_ev"] == pytest.approx(r["final_energy_ev"] / 64)
    # formation energy: E_total - sum n_i E_i, checked against pymatgen's PhaseDiagram
    entry = ComputedEntry("Na32Cl32", r["final_energy_ev"])
    elements = [ComputedEntry(el, refs.energy_per_atom_ev[el]) for el in ("Na", "Cl")]
    assert r["formation_energy_per_atom_ev"] == pytest.approx(
        PhaseDiagram([entry, *elements]).get_form_energy_per_atom(entry), abs=1e-9)
    assert r["formation_energy_per_atom_ev"] < -1.0  # rock salt NaCl is strongly bound
    assert r["reference_entry_ids"] == [refs.entry_ids["Cl"], refs.entry_ids["Na"]]
    assert r["reference_source"].endswith("mp_elemental_reference_entries.json.gz") and len(r["reference_sha256"]) == 64

    si = fixture_rows["Si"]
    assert si["final_energy_ev"] == pytest.approx(_last_e0(fixtures_dir / "Si" / "vasprun.xml"), abs=1e-5)
    assert si["n_atoms"] == 16 and abs(si["formation_energy_per_atom_ev"]) < 0.05  # elemental Si vs MP's Si
    for name in ("NaCl", "MgO"):  # phonon-only folders: no total energy, said so
        assert fixture_rows[name]["final_energy_ev"] is None
        assert "no vasprun.xml" in fixture_rows[name]["reason"]


@pytest.mark.parametrize(("name", "source", "lo", "hi", "nac"), [
    ("NaCl", "force_sets", 6.5, 8.0, True),  # NaCl LO ~7.3 THz with NAC
    ("NaCl-VASPdfpt", "force_constants", 5.5, 7.0, False),  # no BORN: TO-like top band
    ("Si", "phonopy_params", 14.5, 15.8, False),  # Si optical phonon at Γ ~15.1 THz (PBE)
    ("MgO", "force_sets", 18.0, 22.0, True),  # MgO LO ~20-21 THz
])
def test_fixture_phonons_stable_with_known_frequencies(fixture_rows, name, source, lo, hi, nac) -> None:
    r = fixture_rows[name]
    assert r["status"] == "unlinked" and not r["is_linked"]
    assert r["phonon_source"] == source and r["has_nac"] is nac
    assert r["min_frequency_thz"] > -0.1 and r["n_imaginary_modes"] == 0 and r["is_phonon_stable"]
    assert lo < r["max_frequency_thz"] < hi
    assert r["q_mesh"] == [8, 8, 8]


def test_every_phonon_route_gives_the_same_frequencies(fixtures_dir: Path, tmp_path: Path, fixture_rows) -> None:
    """FORCE_SETS vs the displacement vaspruns (plain and in MgO's tar.lzma), FORCE_CONSTANTS vs DFPT vasprun."""
    _copy(fixtures_dir / "NaCl", tmp_path / "nacl_vaspruns")
    (tmp_path / "nacl_vaspruns" / "FORCE_SETS").unlink()
    _copy(fixtures_dir / "MgO", tmp_path / "mgo_archive")
    (tmp_path / "mgo_archive" / "FORCE_SETS").unlink()
    _copy(fixtures_dir / "NaCl-VASPdfpt", tmp_path / "nacl_dfpt")
    (tmp_path / "nacl_dfpt" / "FORCE_CONSTANTS").unlink()
    # phonopy's own computation, for one route, from the files directly
    import phonopy

    ph = phonopy.load(str(fixtures_dir / "NaCl" / "phonopy_disp.yaml"),
                      force_sets_filename=str(fixtures_dir / "NaCl" / "FORCE_SETS"),
                      born_filename=str(fixtures_dir / "NaCl" / "BORN"), primitive_matrix="auto", log_level=0)
    ph.run_mesh([8, 8, 8], is_gamma_center=True)
    freqs = ph.get_mesh_dict()["frequencies"]
    assert fixture_rows["NaCl"]["max_frequency_thz"] == pytest.approx(float(np.max(freqs)), abs=1e-6)
    for copy, orig, source in (("nacl_vaspruns", "NaCl", "displacement_vaspruns"),
                               ("mgo_archive", "MgO", "displacement_vaspruns"),
                               ("nacl_dfpt", "NaCl-VASPdfpt", "dfpt_vasprun")):
        r = ingest_run_folder(tmp_path, copy, references=None)
        assert r["phonon_source"] == source, r["reason"]
        assert r["max_frequency_thz"] == pytest.approx(fixture_rows[orig]["max_frequency_thz"], abs=2e-3)
        assert r["min_frequency_thz"] == pytest.approx(fixture_rows[orig]["min_frequency_thz"], abs=2e-3)


def test_bad_copies_land_as_failed_rows_with_reasons(fixtures_dir: Path, tmp_path: Path, refs) -> None:
    root = tmp_path / "results"
    root.mkdir()
    trunc = _copy(fixtures_dir / "NaCl-VASPdfpt", root / "truncated")
    data = (trunc / "vasprun.xml").read_bytes()
    (trunc / "vasprun.xml").write_bytes(data[: len(data) // 2])
    unconv = _copy(fixtures_dir / "NaCl-VASPdfpt", root / "unconverged")
    text = (unconv / "vasprun.xml").read_text()
    (unconv / "vasprun.xml").write_text(re.sub(r'(name="NELM">)\s*\d+', r"\g<1>    2", text, count=2))
    corrupt = _copy(fixtures_dir / "NaCl", root / "corrupt_forces")
    (corrupt / "FORCE_SETS").write_text("64\n2\n\n1\n not numbers at all\n")
    missing = _copy(fixtures_dir / "NaCl", root / "missing_displacement")
    (missing / "FORCE_SETS").unlink()
    (missing / "vasprun.xml-002").unlink()
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("the job was killed before VASP started\n")
    badjson = _copy(fixtures_dir / "Si", root / "bad_record")
    (badjson / "cgwgan_run.json").write_text("{not json")

    names = ["truncated", "unconverged", "corrupt_forces", "missing_displacement", "empty", "bad_record"]
    df = ingest_run_folders(root, names, references=refs)
    assert df.height == len(names) and df.schema == pl.Schema(RESULT_SCHEMA)
    rows = {r["run_name"]: r for r in df.to_dicts()}
    assert rows["truncated"]["status"] == "failed" and "vasprun.xml unreadable" in rows["truncated"]["reason"]
    assert rows["truncated"]["phonon_source"] == "force_constants"  # what could be read still is
    assert rows["unconverged"]["status"] == "unconverged"
    assert rows["unconverged"]["is_converged_electronic"] is False
    assert "electronic loop not converged" in rows["unconverged"]["reason"]
    assert rows["corrupt_forces"]["status"] == "failed" and "phonons failed" in rows["corrupt_forces"]["reason"]
    assert rows["missing_displacement"]["status"] == "failed"
    assert "2 displacements but 1" in rows["missing_displacement"]["reason"]
    assert rows["empty"]["status"] == "failed" and "no VASP or phonopy output" in rows["empty"]["reason"]
    assert rows["bad_record"]["status"] == "failed" and "cgwgan_run.json" in rows["bad_record"]["reason"]


def test_reingest_is_identical_and_content_keyed(fixtures_dir: Path, tmp_path: Path) -> None:
    _copy(fixtures_dir / "Si", tmp_path / "Si")
    a = ingest_run_folder(tmp_path, "Si", references=None, ingested_at="t0")
    b = ingest_run_folder(tmp_path, "Si", references=None, ingested_at="t0")
    assert a == b
    assert result_id_for(tmp_path, "Si")[0] == a["result_id"]
    (tmp_path / "Si" / "OUTCAR.note").write_text("added later\n")
    assert result_id_for(tmp_path, "Si")[0] != a["result_id"]


def test_paths_escaping_the_root_are_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "results"
    root.mkdir()
    outside = _copy(fixtures_dir / "Si", tmp_path / "outside")
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    inner = _copy(fixtures_dir / "Si", root / "inner_link")
    (inner / "OUTCAR").symlink_to(tmp_path / "outside" / "vasprun.xml")
    _copy(fixtures_dir / "Si", root / "fine")
    for name in ("../outside", "link_out", "inner_link", "a/b", ".."):
        r = ingest_run_folder(root, name, references=None)
        assert r["status"] == "refused", name
        assert "outside the results root" in r["reason"] or "not a plain folder name" in r["reason"]
        assert r["final_energy_ev"] is None and r["files"] == []
    assert check_run_path(root, "fine")[1] == ""
    scanned = {f.name: f for f in scan_results_root(root, settle_seconds=0)}
    assert scanned["link_out"].refused_reason and scanned["inner_link"].refused_reason
    assert scanned["fine"].is_ready and not scanned["fine"].refused_reason
    assert not {f.name: f for f in scan_results_root(root, settle_seconds=3600)}["fine"].is_ready


def test_handoff_writes_vasp_and_phonopy_sets_then_links_results(fixtures_dir: Path, tmp_path: Path, refs) -> None:
    from phonopy import load as phonopy_load
    from pymatgen.core import Lattice, Structure

    unit = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6903), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    shortlist = pl.DataFrame({
        "candidate_id": ["cand-nacl", "cand-nacl", "cand-bad"],
        "template_id": ["tpl-1"] * 3, "checkpoint_id": ["ckpt-1"] * 3,
        "surrogate_name": ["S-a", "S-b", "S-a"], "surrogate_sha256": ["a" * 64, "b" * 64, "a" * 64],
        "rank": [2, 1, 1],
        "lattice_matrix": [unit.lattice.matrix.ravel().tolist()] * 2 + [[0.0] * 9],
        "species": [[s.symbol for s in unit.species]] * 3,
        "frac_coords": [unit.frac_coords.tolist()] * 3,
    })
    inputs = tmp_path / "inputs"
    settings = DftInputSettings(user_incar_settings={"NCORE": 2}, supercell_min_length_a=8.0)
    m = write_dft_inputs(shortlist, inputs, settings=settings, write_potcar=False)
    rows = {r["candidate_id"]: r for r in m.to_dicts()}
    ok = rows["cand-nacl"]
    assert ok["status"] == "written" and not ok["has_potcar"] and "POTCAR not written" in ok["reason"]
    assert rows["cand-bad"]["status"] == "failed" and "cell volume" in rows["cand-bad"]["reason"]
    assert ok["surrogate_name"] == "S-b" and ok["surrogates"] == ["S-a", "S-b"] and ok["ranks"] == [2, 1]
    d = inputs / "cand-nacl"
    assert "NCORE = 2" in (d / "INCAR").read_text() and "ISIF = 3" in (d / "INCAR").read_text()
    assert (d / "POTCAR.spec").read_text().split() == ok["potcar_symbols"] == ["Na_pv", "Cl"]
    assert not (d / "POTCAR").exists()
    assert Structure.from_file(d / "POSCAR").matches(unit)
    ph = phonopy_load(str(d / "phonopy" / "phonopy_disp.yaml"), produce_fc=False, log_level=0)
    assert len(ph.supercells_with_displacements) == ok["n_displacements"] == 2  # Na and Cl, one each
    assert len(list((d / "phonopy").glob("POSCAR-0*"))) == 2 and ok["supercell_matrix"] == [2, 0, 0, 0, 2, 0, 0, 0, 2]
    assert json.loads(ok["settings_json"])["user_incar_settings"] == {"NCORE": 2}
    record = json.loads((d / "cgwgan_run.json").read_text())
    assert record["candidate_id"] == "cand-nacl" and record["run_id"] == ok["run_id"]
    assert [s["surrogate_name"] for s in record["surrogates"]] == ["S-a", "S-b"]

    # results come back: the hand-off folder plus VASP outputs -> linked, status ok
    results = tmp_path / "results"
    res = _copy(d, results / "cand-nacl")
    for f in ("vasprun.xml", "OUTCAR"):
        shutil.copy(fixtures_dir / "NaCl-VASPdfpt" / f, res / f)
    for f in ("phonopy_disp.yaml", "FORCE_SETS", "BORN"):
        shutil.copy(fixtures_dir / "NaCl" / f, res / "phonopy" / f)
    r = ingest_run_folder(results, "cand-nacl", references=refs)
    assert r["status"] == "ok" and r["reason"] == "" and r["is_linked"]
    assert r["candidate_id"] == "cand-nacl" and r["input_run_id"] == ok["run_id"]
    assert r["shortlist_surrogates"] == ["S-a", "S-b"] and r["phonon_source"] == "force_sets"
    found = select_discoveries(rows_to_frame([r]))
    assert found["candidate_id"].to_list() == ["cand-nacl"]
    strict = select_discoveries(rows_to_frame([r]),
                                thresholds=DiscoveryThresholds(max_formation_energy_ev_per_atom=-5.0))
    assert strict.is_empty()


def test_potcar_check_and_supercell_rules(tmp_path: Path) -> None:
    assert potcar_available(str(tmp_path / "nope")) == (False, f"PMG_VASP_PSP_DIR={tmp_path / 'nope'} is not a directory")
    assert potcar_available(str(tmp_path))[0] is True
    assert potcar_available("")[0] is False
    m = supercell_matrix([4.0, 4.0, 12.0], 5, min_length_a=10.0, max_atoms=400)
    assert np.diag(m).tolist() == [3, 3, 1]
    m = supercell_matrix([4.0, 4.0, 4.0], 20, min_length_a=10.0, max_atoms=200)
    assert int(np.prod(np.diag(m))) * 20 <= 200


def test_bad_reference_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "refs.json"
    bad.write_text('{"O": {"energy": 1}}')
    with pytest.raises(ValueError, match=r"refs\.json"):
        load_elemental_references(bad)


def test_phonopy_set_follows_the_poscar_order_without_warnings(tmp_path: Path) -> None:
    """A cell whose atoms are not grouped by element (as infill writes them): the phonopy set is
    written in the POSCAR's element order, each element once, and phonopy has nothing to warn of."""
    import warnings

    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(4.0), ["O", "Ba", "O", "Ru", "O"],
                  [[0.5, 0.5, 0], [0, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])
    shortlist = pl.DataFrame({"candidate_id": ["cand-bro"], "template_id": ["tpl-1"], "checkpoint_id": ["ckpt-1"],
                              "surrogate_name": ["S-a"], "surrogate_sha256": ["a" * 64], "rank": [1],
                              "lattice_matrix": [s.lattice.matrix.ravel().tolist()],
                              "species": [[x.symbol for x in s.species]], "frac_coords": [s.frac_coords.tolist()]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = write_dft_inputs(shortlist, tmp_path / "inputs", settings=DftInputSettings(supercell_min_length_a=6.0))
    assert m["status"].to_list() == ["written"], m["reason"].to_list()
    assert not [w for w in caught if "grouped by element" in str(w.message)]
    d = tmp_path / "inputs" / "cand-bro"
    poscar_elements = (d / "POSCAR").read_text().splitlines()[5].split()
    for f in ("SPOSCAR", "POSCAR-001"):
        assert (d / "phonopy" / f).read_text().splitlines()[5].split() == poscar_elements == ["Ba", "Ru", "O"]
