"""The screening assets materialised with Dagster on a tiny Ba-Ru-O candidates_dedup partition:
prescreen on a local Ray actor, then relaxed, references, phonons and shortlist in-process."""

from __future__ import annotations

import dagster as dg
import duckdb
import polars as pl
import pytest

from assets._checks import contract_check
from assets.screening import phonons, prescreen, references, relaxed, shortlist, surrogate_models
from orchestration.resources import REPO_ROOT, CgwganHome, RayResource, SurrogateRegistryResource
from tests.lib.test_screening import SURROGATE, ba_ru_o_dedup_frame

CHEMSYS = "Ba-O-Ru"
PART = f"{CHEMSYS}|{SURROGATE}"


def _instance() -> dg.DagsterInstance:
    inst = dg.DagsterInstance.ephemeral()
    inst.add_dynamic_partitions("chemical_system", [CHEMSYS])
    inst.add_dynamic_partitions("surrogate", [SURROGATE])
    return inst


def _resources(home) -> dict:
    return {"cgwgan_home": CgwganHome(home=str(home)),
            "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
            "surrogate_registry": SurrogateRegistryResource()}


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_surrogate_models_table(home, store):
    inst = dg.DagsterInstance.ephemeral()
    res = dg.materialize([surrogate_models, contract_check("surrogate_models")], instance=inst,
                         resources=_resources(home))
    assert res.success and _checks(res) == {"surrogate_models_matches_contract": True}
    df = store.read("surrogate_models")
    assert {"CHGNet-0.3.0", "M3GNet-MP-2021.2.8-PES"} <= set(df["surrogate_name"])
    chg = df.filter(pl.col("surrogate_name") == "CHGNet-0.3.0").row(0, named=True)
    assert chg["kind"] == "chgnet" and len(chg["surrogate_sha256"]) == 64 and chg["surrogate_id"].startswith("sur-")
    assert "CHGNet-0.3.0" in inst.get_dynamic_partitions("surrogate")


@pytest.mark.ray
@pytest.mark.slow
def test_screening_chain_on_a_tiny_partition(home, store, ba_ru_o_dir, tmp_path, monkeypatch):
    import ray
    import torch

    torch.set_num_threads(1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store.write("candidates_dedup", ba_ru_o_dedup_frame(), partition=CHEMSYS)
    # a small slice of the real Ba-Ru-O MP file: BaO, one O2, one Ba (Ru comes from ASE's reference state)
    mp = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", infer_schema_length=0)
    csv = tmp_path / "ba_ru_o_small.csv"
    mp.filter(pl.col("material_id").is_in(["mp-1342", "mp-1009490", "mp-1977763"])).write_csv(csv)
    run_config = {"ops": {
        "prescreen": {"config": {"use_ray": True, "num_actors": 1, "batch_rows": 2, "batch_size": 4}},
        "relaxed": {"config": {"use_ray": False, "top_k": 2, "steps": 80}},
        "references": {"config": {"use_ray": False, "mp_csv_path": str(csv), "steps": 40}},
        "phonons": {"config": {"use_ray": False, "top_n": 2, "supercell": [1, 1, 1], "mesh": [4, 4, 4],
                               "band_npoints": 9}},
        "shortlist": {"config": {"n_plots": 2}},
    }}
    inst = _instance()
    pk = dg.MultiPartitionKey({"chemical_system": CHEMSYS, "surrogate": SURROGATE})
    try:
        tables = ("prescreen", "relaxed", "reference_energies", "phonons", "shortlist")
        res = dg.materialize([prescreen, relaxed, references, phonons, shortlist,
                              *(contract_check(t) for t in tables)], partition_key=pk, instance=inst,
                             resources=_resources(home), run_config=run_config)
        assert res.success
        checks = _checks(res)
        assert checks == {"covers_every_candidate": True, "convergence_rate": checks["convergence_rate"],
                          "hull_is_consistent": True, "ranked_and_unique": True,
                          **{f"{t}_matches_contract": True for t in tables}}, checks
        assert {m.asset_key.to_user_string() for m in res.asset_materializations_for_node("references")} == {
            "references", "reference_energies"}

        pre = store.read("prescreen", partition=PART)
        assert pre.height == 5 and pre["candidate_id"].n_unique() == 5
        assert pre.columns[:6] == ["candidate_id", "template_id", "checkpoint_id", "surrogate_name",
                                   "surrogate_sha256", "code_version"]
        assert pre["template_id"].null_count() == 0 and set(pre["surrogate_name"]) == {SURROGATE}
        bad = pre.filter(pl.col("status") == "error")
        assert bad["candidate_id"].to_list() == ["cand-og-bad"] and "Og" in bad["error"][0]
        mat = res.asset_materializations_for_node("prescreen")[0].metadata
        assert mat["backend"].value == "ray" and mat["batches"].value == 3 and mat["batches_run"].value == 3

        rel = store.read("relaxed", partition=PART)
        assert rel.height == 2 and set(rel["candidate_id"]) <= set(pre["candidate_id"])
        best2 = pre.filter(pl.col("status") == "ok").sort("energy_per_atom_ev").head(2)["candidate_id"]
        assert sorted(rel["candidate_id"]) == sorted(best2)
        assert rel["prescreen_energy_per_atom_ev"].null_count() == 0

        refs = store.read("reference_energies", partition=PART)
        ref_rows = refs.filter(pl.col("kind") == "reference")
        assert sorted(ref_rows["phase_id"]) == ["ase-Ru", "mp-1009490", "mp-1342", "mp-1977763"]
        assert ref_rows.filter(pl.col("is_elemental"))["e_above_hull_ev_per_atom"].min() >= -1e-9
        cand_rows = refs.filter(pl.col("kind") == "candidate")
        assert cand_rows.height == 2 and cand_rows["e_above_hull_ev_per_atom"].null_count() == 0

        ph = store.read("phonons", partition=PART)
        assert ph.height == 2 and ph["status"].to_list() == ["ok", "ok"]

        sl = store.read("shortlist", partition=PART)
        assert sl["rank"].to_list() == [1, 2] and sl["has_phonons"].all()
        assert sl["e_above_hull_ev_per_atom"].is_sorted()
        md = res.asset_materializations_for_node("shortlist")[0].metadata["band_structures"].value
        assert md.count("data:image/png;base64") == 2

        # the catalog has the table views, the derived view and answers the example query
        con = duckdb.connect(str(home / "catalog.duckdb"), read_only=True)
        top = pl.from_arrow(con.execute((REPO_ROOT / "sql/examples/shortlist_top.sql").read_text()).to_arrow_table())
        assert top["candidate_id"].to_list() == sl["candidate_id"].to_list()
        n_stable = con.execute("select count(*) from shortlist_stable").fetchone()[0]
        assert n_stable == sl.filter((pl.col("e_above_hull_ev_per_atom") <= 0.1)
                                     & pl.col("is_dynamically_stable")).height
        con.close()

        # a rerun of the pre-screen resumes: every batch is found on disk, nothing is recomputed
        res2 = dg.materialize([prescreen], partition_key=pk, instance=inst, resources=_resources(home),
                              run_config={"ops": {"prescreen": run_config["ops"]["prescreen"]}})
        meta2 = res2.asset_materializations_for_node("prescreen")[0].metadata
        assert meta2["batches_skipped_resumed"].value == 3 and meta2["batches_run"].value == 0
        assert store.read("prescreen", partition=PART).sort("candidate_id").equals(pre.sort("candidate_id"))
    finally:
        ray.shutdown()
