"""Materialise the dft group on small real tables: hand-off, ingest (twice), discoveries, lineage SQL, churn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets._checks import contract_check
from assets.dft import (
    dft_inputs,
    dft_inputs_folders_complete,
    dft_results,
    dft_results_consistent,
    discoveries,
    discoveries_meet_thresholds,
    surrogate_churn,
    surrogate_churn_bounds,
)
from lib.contracts import conform
from lib.store import TableStore
from orchestration.resources import REPO_ROOT, CgwganHome, DftResource, view_statements

pytestmark = pytest.mark.filterwarnings("ignore")

LINEAGE = {"template_id": "tpl-nacl", "checkpoint_id": "ckpt-test", "code_version": "screening-1"}
SURROGATES = {"S-a": "a" * 64, "S-b": "b" * 64}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def _cells():
    from pymatgen.core import Lattice, Structure

    rock = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6903), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cscl = Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.4), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return {"cand-nacl": rock, "cand-cscl": cscl}


def _mp_rows(mp_file: Path, ids: tuple[str, ...]) -> pl.DataFrame:
    """Real MP rows (shared mp_structures.csv.gz) in the mp_structures layout: cells and MP energies."""
    from pymatgen.core import Structure

    raw = pl.read_csv(mp_file, infer_schema_length=0).filter(pl.col("material_id").is_in(list(ids)))
    assert raw.height == len(ids)
    rows = []
    for r in raw.iter_rows(named=True):
        s = Structure.from_str(r["cif"], fmt="cif")
        rows.append({"material_id": r["material_id"], "formula": s.composition.formula.replace(" ", ""),
                     "reduced_formula": s.composition.reduced_formula, "chemical_system": s.composition.chemical_system,
                     "elements": sorted({e.symbol for e in s.composition.elements}), "nsites": len(s),
                     "lattice_matrix": s.lattice.matrix.ravel().tolist(), "species": [x.specie.symbol for x in s],
                     "frac_coords": s.frac_coords.tolist(),
                     "formation_energy_per_atom_ev": float(r["formation_energy_per_atom"]),
                     "e_above_hull_ev_per_atom": float(r["e_above_hull"]),
                     "source": "file:mp_structures.csv.gz", "snapshot_id": "snap-test"})
    return conform("mp_structures", pl.DataFrame(rows))


def _write_upstream(store: TableStore, mp_file: Path) -> None:
    """Small real tables for every link of the chain, written through the store (the columns the
    chain reads; the others null, in the contract's shape)."""
    store.write("mp_structures", _mp_rows(mp_file, ("mp-22862",)))
    store.write("wgan_checkpoints", conform("wgan_checkpoints", pl.DataFrame({
        "checkpoint_id": ["ckpt-test"], "path": ["/checkpoints/ckpt-test"], "encoding_version": ["enc-1"],
        "training_snapshot_id": ["snap-test"], "seed": [7], "epochs": [3], "created_at": ["2026-11-25T00:00:00Z"],
        "hyperparameters": ["{}"]})))
    store.write("templates", conform("templates", pl.DataFrame({
        "template_id": ["tpl-nacl"], "checkpoint_id": ["ckpt-test"], "spacegroup_number": [225],
        "crystal_system": ["cubic"], "n_sites": [2], "wyckoff_sequence": ["225 a b"]})), partition="gen-1")
    cells = _cells()
    store.write("candidates", conform("candidates", pl.DataFrame({
        "candidate_id": list(cells), "template_id": ["tpl-nacl"] * 2, "checkpoint_id": ["ckpt-test"] * 2,
        "chemical_system": ["Cl-Na"] * 2, "formula": ["Na4Cl4", "Na1Cl1"], "reduced_formula": ["NaCl"] * 2,
        "n_atoms": [8, 2], "spacegroup_number": [225, 221],
        "wyckoff_species_sequence": ["Na:4a Cl:4b", "Na:1a Cl:1b"],
        "fingerprint": ["fp-nacl", "fp-cscl"]})), partition="Cl-Na")
    for sur, sha in SURROGATES.items():
        part = f"Cl-Na|{sur}"
        ids = list(cells)
        lineage = {"candidate_id": ids, **{k: [v] * 2 for k, v in LINEAGE.items()},
                   "surrogate_name": [sur] * 2, "surrogate_sha256": [sha] * 2}
        energies = [-3.4, -3.2] if sur == "S-a" else [-3.1, -3.3]
        store.write("prescreen", conform("prescreen", pl.DataFrame({
            **lineage, "energy_ev": energies, "energy_per_atom_ev": energies, "status": ["ok"] * 2})), partition=part)
        store.write("relaxed", conform("relaxed", pl.DataFrame({
            **lineage, "energy_per_atom_ev": energies, "is_converged": [True, True], "status": ["ok"] * 2,
            "lattice_matrix": [cells[c].lattice.matrix.ravel().tolist() for c in ids],
            "species": [[s.symbol for s in cells[c].species] for c in ids],
            "frac_coords": [cells[c].frac_coords.tolist() for c in ids]})), partition=part)
        ranks = [1, 2] if sur == "S-a" else [2, 1]
        store.write("shortlist", conform("shortlist", pl.DataFrame({
            "rank": ranks, **lineage, "formation_energy_per_atom_ev": [-2.0, -1.9],
            "e_above_hull_ev_per_atom": [0.0, 0.05] if sur == "S-a" else [0.04, 0.0],
            "min_frequency_thz": [0.0, -1.5], "is_dynamically_stable": [True, sur == "S-b"],
            # novel as the surrogate stage saw them (only novel rows are handed off); DFT checks again
            "is_novel": [True, True]})), partition=part)


def test_dft_group_end_to_end_with_lineage(home: Path, store: TableStore, fixtures_dir: Path,
                                           shared_dir: Path, mp_file: Path, tmp_path: Path) -> None:
    _write_upstream(store, mp_file)
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "dft": DftResource()}
    instance = dg.DagsterInstance.ephemeral()

    # hand-off
    res = dg.materialize([dft_inputs, dft_inputs_folders_complete, contract_check("dft_inputs")],
                         resources=resources, instance=instance)
    assert res.success
    manifest = store.read("dft_inputs")
    assert sorted(manifest["candidate_id"].to_list()) == ["cand-cscl", "cand-nacl"]
    assert (manifest["status"] == "written").all() and not manifest["has_potcar"].any()
    meta = res.asset_materializations_for_node("dft_inputs")[0].metadata
    assert meta["n_written"].value == 2 and "NOT written" in meta["potcar"].value
    checks = res.get_asset_check_evaluations()
    assert len(checks) == 2 and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    nacl = manifest.filter(pl.col("candidate_id") == "cand-nacl").row(0, named=True)
    assert nacl["structure_source"] == "relaxed:S-a" and nacl["surrogates"] == ["S-a", "S-b"]

    # results come back: the hand-off folder + VASP/phonopy outputs, an external fixture, a bad copy,
    # and a link escaping the results root
    results = home / "dft" / "results"
    run = _copy(Path(nacl["run_dir"]), results / "cand-nacl")
    for f in ("vasprun.xml", "OUTCAR"):
        shutil.copy(fixtures_dir / "NaCl-VASPdfpt" / f, run / f)
    for f in ("phonopy_disp.yaml", "FORCE_SETS", "BORN"):
        shutil.copy(fixtures_dir / "NaCl" / f, run / "phonopy" / f)
    _copy(fixtures_dir / "Si", results / "Si-external")
    bad = _copy(fixtures_dir / "Si", results / "Si-truncated")
    text = (bad / "vasprun.xml").read_bytes()
    (bad / "vasprun.xml").write_bytes(text[: len(text) // 3])
    _copy(fixtures_dir / "Si", tmp_path / "elsewhere")
    (results / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    refs = str(shared_dir / "data" / "mp" / "mp_elemental_reference_entries.json.gz")
    config = {"ops": {"dft_results": {"config": {"references_path": refs}}}}
    res = dg.materialize([dft_results, dft_results_consistent, contract_check("dft_results")], resources=resources,
                         instance=instance, run_config=config)
    assert res.success
    meta = res.asset_materializations_for_node("dft_results")[0].metadata
    assert meta["n_new"].value == 4 and meta["n_ok"].value == 1 and meta["n_unlinked"].value == 1
    assert meta["n_failed"].value == 1 and meta["n_refused"].value == 1
    checks = res.get_asset_check_evaluations()
    assert len(checks) == 2 and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    rows = {r["run_name"]: r for r in store.read("dft_results").to_dicts()}
    assert rows["cand-nacl"]["status"] == "ok" and rows["cand-nacl"]["candidate_id"] == "cand-nacl"
    assert rows["Si-truncated"]["status"] == "failed" and "vasprun.xml" in rows["Si-truncated"]["reason"]
    assert rows["escape"]["status"] == "refused" and "outside the results root" in rows["escape"]["reason"]
    versions = {p: store.pointer("dft_results", p)["version"] for p in store.partitions("dft_results")}

    # re-ingest: nothing changes
    res = dg.materialize([dft_results], resources=resources, instance=instance, run_config=config)
    meta = res.asset_materializations_for_node("dft_results")[0].metadata
    assert meta["n_new"].value == 0 and meta["n_already_ingested"].value == 4
    assert {p: store.pointer("dft_results", p)["version"] for p in store.partitions("dft_results")} == versions

    # discoveries: the linked NaCl, placed on MP's hull (MP2020) and matched against MP's cells: the
    # rock-salt NaCl handed off is MP's mp-22862, a rediscovery listed apart, with its lineage
    res = dg.materialize([discoveries, discoveries_meet_thresholds, contract_check("discoveries")],
                         resources=resources, instance=instance,
                         run_config={"ops": {"discoveries": {"config": {"references_path": refs}}}})
    assert res.success and len(res.get_asset_check_evaluations()) == 2
    assert all(c.passed for c in res.get_asset_check_evaluations())
    found = store.read("discoveries")
    assert found["candidate_id"].to_list() == ["cand-nacl"]
    d = found.row(0, named=True)
    assert d["formation_energy_per_atom_ev"] < 0 and d["min_frequency_thz"] > -0.1
    assert d["verdict"] == "rediscovery" and d["known_material_id"] == "mp-22862" and not d["is_discovery"]
    assert d["energy_footing"] == "MP2020" and d["e_above_hull_dft_ev_per_atom"] is not None
    meta = res.asset_materializations_for_node("discoveries")[0].metadata
    assert meta["n_rediscovery"].value == 1 and meta["n_discovery"].value == 0
    # the shortlist's key plots: DFT energy above the hull vs the DFT phonon minimum; no screening hull here
    assert meta["e_above_hull_vs_phonon_min"].value.count("data:image/png;base64") == 1
    assert meta["hull_diagram"].value.startswith("(no reference_energies for Cl-Na: no hull)")
    assert (d["template_id"], d["checkpoint_id"], d["training_snapshot_id"], d["mp_source"]) == (
        "tpl-nacl", "ckpt-test", "snap-test", "file:mp_structures.csv.gz")
    assert d["ranked_by_surrogates"] == ["S-a", "S-b"] and d["surrogate_ranks"] == [1, 2]

    # the lineage query: the full chain and each surrogate's ranking, for the ingested result
    con = store.connect(extra_sql=view_statements())
    sql = (REPO_ROOT / "sql" / "examples" / "lineage_of_result.sql").read_text()
    sql = sql.replace("CAST(NULL AS VARCHAR) AS candidate_id", "'cand-nacl' AS candidate_id")
    out = con.sql(sql).pl()
    assert out.height == 2 and out["surrogate_name"].to_list() == ["S-a", "S-b"]
    first = out.row(0, named=True)
    assert first["run_name"] == "cand-nacl" and first["status"] == "ok"
    assert (first["template_id"], first["template_wyckoff_sequence"], first["checkpoint_id"],
            first["checkpoint_path"], first["training_snapshot_id"], first["mp_source"]) == (
        "tpl-nacl", "225 a b", "ckpt-test", "/checkpoints/ckpt-test", "snap-test", "file:mp_structures.csv.gz")
    assert out["shortlist_rank"].to_list() == [1, 2] and out["prescreen_rank"].to_list() == [1, 2]
    assert out["surrogate_sha256"].to_list() == [SURROGATES["S-a"], SURROGATES["S-b"]]
    assert first["dft_formation_energy_per_atom_ev"] == pytest.approx(d["formation_energy_per_atom_ev"])
    every = con.sql((REPO_ROOT / "sql" / "examples" / "lineage_of_result.sql").read_text()).pl()
    assert set(every["run_name"]) == {"cand-nacl", "Si-external", "Si-truncated", "escape"}
    # the catalog file carries the views too
    import duckdb

    cat = duckdb.connect(str(store.catalog_path), read_only=True)
    views = {r[0] for r in cat.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"dft_results_latest", "dft_lineage", "candidate_surrogate_rankings"} <= views
    cat.close()

    # churn between the two surrogates' shortlists
    res = dg.materialize([surrogate_churn, surrogate_churn_bounds, contract_check("surrogate_churn")],
                         resources=resources, instance=instance)
    assert res.success and len(res.get_asset_check_evaluations()) == 2
    assert all(c.passed for c in res.get_asset_check_evaluations())
    churn = store.read("surrogate_churn").row(0, named=True)
    assert (churn["surrogate_a"], churn["surrogate_b"], churn["chemical_system"]) == ("S-a", "S-b", "Cl-Na")
    assert churn["spearman_rho"] == pytest.approx(-1.0) and churn["flipped_candidate_ids"] == ["cand-cscl"]
    meta = res.asset_materializations_for_node("surrogate_churn")[0].metadata
    assert "rank_a" in meta["rankings_side_by_side"].value and "data:image/png;base64" in meta["plot"].value
    assert json.loads(json.dumps(store.pointer("surrogate_churn")["metadata"])) == {"top_k": 10}


# --------------------------------------------------------------------------- GPAW, here: dft_runs -> discoveries
GPAW_SYSTEM = "I-Rb"
#: Real MP rows of the Rb-I system (shared mp_structures.csv.gz): Rb, I and rock-salt RbI, 1-2 atoms each.
RB_I_PHASES = ("mp-639755", "mp-639751", "mp-22903")
SURROGATES_M3GNET = ("M3GNet-MP-2021.2.8-PES", "M3GNet-MatPES-PBE-v2025.1-PES")


def _rb_i_candidates():
    """Two hypothetical RbI polymorphs (zinc blende, CsCl type) and a relaxed duplicate."""
    from pymatgen.core import Lattice, Structure

    zb = Structure.from_spacegroup("F-43m", Lattice.cubic(8.4), ["Rb", "I"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    cscl = Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.45), ["Rb", "I"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return {"cand-rbi-zb": zb.get_primitive_structure(), "cand-rbi-cscl": cscl, "cand-rbi-dup": cscl.copy()}


def _write_rb_i_upstream(store: TableStore, mp: pl.DataFrame, m3gnet_dir: Path) -> dict[str, dict[str, float]]:
    """mp_structures (real MP rows) and each M3GNet's shortlist of the candidates, with the energy
    above the hull the surrogate itself predicts (real inference on the cells, against its own
    energies of the three MP phases). Returns {surrogate: {candidate: e_above_hull}}."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    from lib.cells import cell_to_structure
    from lib.screening import predict_energies
    from lib.surrogates import load_surrogate

    store.write("mp_structures", mp)
    cands = _rb_i_candidates()
    phases = [cell_to_structure(r["lattice_matrix"], r["species"], r["frac_coords"]) for r in mp.iter_rows(named=True)]
    out: dict[str, dict[str, float]] = {}
    for name in SURROGATES_M3GNET:
        sur = load_surrogate(name, models_dir=str(m3gnet_dir))
        energies = predict_energies(sur, [*phases, *cands.values()])
        assert all(isinstance(e, float) for e in energies), energies
        pd_ = PhaseDiagram([PDEntry(s.composition, e) for s, e in zip(phases, energies, strict=False)])
        ehull = {cid: float(pd_.get_e_above_hull(PDEntry(s.composition, e), allow_negative=True))
                 for (cid, s), e in zip(cands.items(), energies[len(phases):], strict=True)}
        out[name] = ehull
        ids = list(cands)
        order = sorted(ids[:2], key=lambda c: ehull[c])
        lineage = {"candidate_id": ids, "template_id": ["tpl-rbi"] * 3, "checkpoint_id": ["ckpt-test"] * 3,
                   "code_version": ["screening-1"] * 3, "surrogate_name": [name] * 3,
                   "surrogate_sha256": [sur.weights_sha256] * 3}
        part = f"{GPAW_SYSTEM}|{name}"
        store.write("relaxed", conform("relaxed", pl.DataFrame({
            **lineage, "status": ["ok"] * 3, "is_converged": [True] * 3,
            "lattice_matrix": [cands[c].lattice.matrix.ravel().tolist() for c in ids],
            "species": [[x.specie.symbol for x in cands[c]] for c in ids],
            "frac_coords": [cands[c].frac_coords.tolist() for c in ids]})), partition=part)
        ranks = [order.index(ids[0]) + 1, order.index(ids[1]) + 1, 3]
        store.write("shortlist", conform("shortlist", pl.DataFrame({
            **lineage, "rank": ranks, "unique_rank": [ranks[0], ranks[1], None],
            "duplicate_of": [None, None, "cand-rbi-cscl"], "n_atoms": [2, 2, 2],
            "e_above_hull_ev_per_atom": [ehull[c] for c in ids]})), partition=part)
    return out


def _sensor_ingest(instance, resources, cursor):
    from orchestration.sensors import make_dft_results_sensor

    sensor = make_dft_results_sensor(settle_seconds=0)
    res = sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor))
    if not res.run_requests:
        return None, res.cursor
    req = res.run_requests[0]
    run = dg.materialize([dft_results], resources=resources, instance=instance, run_config=req.run_config)
    assert run.success
    return req.run_config["ops"]["dft_results"]["config"]["run_names"], res.cursor


@pytest.mark.slow
@pytest.mark.ray
def test_gpaw_verification_through_dagster(home: Path, store: TableStore, mp_file: Path, m3gnet_dir: Path,
                                           gpaw_version: str, capsys: pytest.CaptureFixture) -> None:
    """dft_runs (real GPAW, preset fast) -> the dft_results sensor -> ingest -> discoveries ->
    surrogate_accuracy on the Rb-I system: two hypothetical RbI polymorphs and their competing phases."""
    import ray

    from assets.dft import dft_runs, dft_runs_finished, surrogate_accuracy
    from orchestration.cli import main as cli_main
    from orchestration.resources import RayResource

    surrogate_ehull = _write_rb_i_upstream(store, _mp_rows(mp_file, RB_I_PHASES), m3gnet_dir)
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "dft": DftResource(),
                 "ray_runtime": RayResource(num_cpus=2, object_store_mb=256)}
    instance = dg.DagsterInstance.ephemeral()
    base = {"preset": "fast", "k": 2, "phonons": False, "max_atoms": 8, "max_phase_atoms": 4}
    results = home / "dft" / "results"

    # 1. the candidates alone (no competing phases yet), in-process
    cfg = {"ops": {"dft_runs": {"config": {**base, "competing_phases": False, "use_ray": False}}}}
    res = dg.materialize([dft_runs, dft_runs_finished, contract_check("dft_runs")], resources=resources,
                         instance=instance, run_config=cfg)
    assert res.success and all(c.passed for c in res.get_asset_check_evaluations())
    runs = store.read("dft_runs")
    assert sorted(runs["candidate_id"].to_list()) == ["cand-rbi-cscl", "cand-rbi-zb"]  # the duplicate is left out
    assert runs["was_computed"].all() and (runs["status"] == "ok").all(), runs.select("run_name", "status", "reason")
    meta = res.asset_materializations_for_node("dft_runs")[0].metadata
    assert json.loads(meta["candidates_left_out"].value) == {"duplicate": 2, "known_phase": 0, "too_many_atoms": 0}
    first_seconds = dict(zip(runs["run_name"], runs["gpaw_wall_time_s"], strict=True))
    mtimes = {n: (results / n / "gpaw_summary.json").stat().st_mtime_ns for n in runs["run_name"]}

    names, cursor = _sensor_ingest(instance, resources, None)
    assert sorted(names) == sorted(runs["run_name"].to_list())
    res = dg.materialize([discoveries, discoveries_meet_thresholds, contract_check("discoveries")],
                         resources=resources, instance=instance)
    assert res.success and all(c.passed for c in res.get_asset_check_evaluations())
    d = store.read("discoveries")
    assert set(d["verdict"]) == {"missing_references"}
    assert all("no competing phases computed with the same backend and preset" in r for r in d["verdict_reason"])

    # 2. again with the competing phases, as Ray tasks: the finished candidates are kept as they are
    cfg = {"ops": {"dft_runs": {"config": {**base, "use_ray": True, "num_cpus_per_run": 1}}}}
    try:
        res = dg.materialize([dft_runs, dft_runs_finished], resources=resources, instance=instance, run_config=cfg)
    finally:
        ray.shutdown()
    assert res.success and all(c.passed for c in res.get_asset_check_evaluations())
    runs = store.read("dft_runs")
    phases = runs.filter(pl.col("kind") == "competing_phase")
    assert sorted(phases["material_id"].to_list()) == sorted(RB_I_PHASES)
    assert (phases["status"] == "ok").all() and phases["was_computed"].all(), phases.select("run_name", "reason")
    cands = runs.filter(pl.col("kind") == "candidate")
    assert not cands["was_computed"].any() and (cands["action"] == "kept").all()
    assert {n: (results / n / "gpaw_summary.json").stat().st_mtime_ns for n in cands["run_name"]} == mtimes
    assert res.asset_materializations_for_node("dft_runs")[0].metadata["backend"].value == "ray"
    assert phases["dft_preset_sha256"].n_unique() == 1 and cands["dft_preset_sha256"].n_unique() == 1
    assert phases["dft_preset_sha256"][0] == cands["dft_preset_sha256"][0]  # one footing: phonons aside

    names, cursor = _sensor_ingest(instance, resources, cursor)
    assert sorted(names) == sorted(phases["run_name"].to_list())  # only the new folders
    ingested = store.read("dft_results")
    assert set(ingested.filter(pl.col("run_name").is_in(phases["run_name"].to_list()))["status"]) == {"unlinked"}
    assert (ingested["dft_code"] == "gpaw").all()

    # 3. discoveries on the GPAW hull of the same preset
    res = dg.materialize([discoveries, discoveries_meet_thresholds, contract_check("discoveries")],
                         resources=resources, instance=instance)
    assert res.success and all(c.passed for c in res.get_asset_check_evaluations())
    d = {r["candidate_id"]: r for r in store.read("discoveries").to_dicts()}
    zb = d["cand-rbi-zb"]
    # zinc-blende RbI: strongly bound (negative formation energy), yet above rock-salt RbI: rejected
    assert zb["formation_energy_dft_ev_per_atom"] < -1.0 and zb["e_above_hull_dft_ev_per_atom"] > 0.02
    assert zb["verdict"] == "above_hull" and not zb["is_discovery"]
    assert "above the hull" in zb["verdict_reason"] and "formation energy -" in zb["verdict_reason"]
    assert zb["energy_footing"].startswith("gpaw:") and zb["n_competing_phases"] == 3 and zb["is_novel"]
    assert zb["template_id"] == "tpl-rbi" and set(zb["ranked_by_surrogates"]) == set(SURROGATES_M3GNET)
    assert d["cand-rbi-cscl"]["e_above_hull_dft_ev_per_atom"] is not None
    hull = {c: (r["formation_energy_dft_ev_per_atom"], r["e_above_hull_dft_ev_per_atom"], r["verdict"])
            for c, r in d.items()}
    print(f"GPAW fast Rb-I hull: {hull}; first wall times {first_seconds}")

    # 4. each surrogate's energy above the hull against DFT's
    res = dg.materialize([surrogate_accuracy, contract_check("surrogate_accuracy")], resources=resources,
                         instance=instance)
    assert res.success and all(c.passed for c in res.get_asset_check_evaluations())
    acc = store.read("surrogate_accuracy")
    overall = {r["surrogate_name"]: r for r in acc.filter(pl.col("chemical_system") == "all").to_dicts()}
    assert set(overall) == set(SURROGATES_M3GNET)
    for name, r in overall.items():
        assert r["n_candidates"] == 2
        dft_e = {c: d[c]["e_above_hull_dft_ev_per_atom"] for c in ("cand-rbi-zb", "cand-rbi-cscl")}
        want = sum(abs(surrogate_ehull[name][c] - dft_e[c]) for c in dft_e) / 2
        assert r["mae_ev_per_atom"] == pytest.approx(want)
        thr = r["hull_threshold_ev_per_atom"] + 1e-6  # on the hull: at most the threshold
        s_e = [surrogate_ehull[name][c] for c in dft_e]
        d_e = list(dft_e.values())
        assert r["n_sign_agree"] == sum((s <= thr) == (x <= thr) for s, x in zip(s_e, d_e, strict=True))
        # two candidates: Spearman is the sign of the two orders' agreement (None on a tie)
        both = (s_e[1] - s_e[0]) * (d_e[1] - d_e[0])
        assert r["spearman_rho"] == (None if both == 0 else (1.0 if both > 0 else -1.0))
    meta = res.asset_materializations_for_node("surrogate_accuracy")[0].metadata
    assert "data:image/png;base64" in meta["parity_plot"].value

    # 5. the CLI lists the folders and their states
    assert cli_main(["dft", "status", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "5 run folders" in out and "5 done" in out and "gpaw-fast-phase-mp-22903" in out

    # 6. a folder edited after ingest is ingested once more, then left alone
    (results / phases["run_name"][0] / "notes.txt").write_text("checked by hand\n")
    names, cursor = _sensor_ingest(instance, resources, cursor)
    assert names == [phases["run_name"][0]]
    assert _sensor_ingest(instance, resources, cursor)[0] is None
    assert store.read("dft_results").filter(pl.col("run_name") == phases["run_name"][0]).height == 2
