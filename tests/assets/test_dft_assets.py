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


def _write_upstream(store: TableStore) -> None:
    """Small real tables for every link of the chain, written through the store (the columns the
    chain reads; the others null, in the contract's shape)."""
    store.write("mp_structures", conform("mp_structures", pl.DataFrame({
        "material_id": ["mp-22862", "mp-22851"], "formula": ["Na4Cl4", "NaCl"], "chemical_system": ["Cl-Na"] * 2,
        "source": ["file:mp_structures.csv.gz"] * 2, "snapshot_id": ["snap-test"] * 2})))
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
            "min_frequency_thz": [0.0, -1.5], "is_dynamically_stable": [True, sur == "S-b"]})), partition=part)


def test_dft_group_end_to_end_with_lineage(home: Path, store: TableStore, fixtures_dir: Path,
                                           shared_dir: Path, tmp_path: Path) -> None:
    _write_upstream(store)
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

    # discoveries: the linked NaCl (negative formation energy, no imaginary mode) with its lineage
    res = dg.materialize([discoveries, discoveries_meet_thresholds, contract_check("discoveries")],
                         resources=resources, instance=instance)
    assert res.success and len(res.get_asset_check_evaluations()) == 2
    assert all(c.passed for c in res.get_asset_check_evaluations())
    found = store.read("discoveries")
    assert found["candidate_id"].to_list() == ["cand-nacl"]
    d = found.row(0, named=True)
    assert d["formation_energy_per_atom_ev"] < 0 and d["min_frequency_thz"] > -0.1
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
