"""The screening assets materialised with Dagster on a tiny Ba-Ru-O candidates_dedup partition:
prescreen on a local Ray actor, then references, relaxed (selected by static energy above the
surrogate's hull, one per composition), phonons and shortlist (known phases, charge balance)
in-process, with the real CHGNet surrogate and the shared Ba-Ru-O MP structures."""

from __future__ import annotations

import dagster as dg
import duckdb
import polars as pl
import pytest

from assets._checks import contract_check
from assets.screening import consensus, phonons, prescreen, references, relaxed, shortlist, surrogate_models
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
def test_screening_chain_on_a_tiny_partition(home, store, ba_ru_o_dir, m3gnet_dir, tmp_path, monkeypatch):
    import ray
    import torch

    torch.set_num_threads(1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store.write("candidates_dedup", ba_ru_o_dedup_frame(), partition=CHEMSYS)
    # a small slice of the real Ba-Ru-O MP file: BaO, one O2, one Ba (Ru comes from ASE's reference state)
    mp = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", infer_schema_length=0)
    csv = tmp_path / "ba_ru_o_small.csv"
    mp.filter(pl.col("material_id").is_in(["mp-1342", "mp-1009490", "mp-1977763"])).write_csv(csv)
    full_mp = ba_ru_o_dir / "ba_ru_o_mp_structures.csv"  # the known phases the shortlist matches against
    run_config = {"ops": {
        "prescreen": {"config": {"use_ray": True, "num_actors": 1, "batch_rows": 2, "batch_size": 4}},
        "relaxed": {"config": {"use_ray": False, "top_k": 3, "per_composition_quota": 1, "steps": 80}},
        "references": {"config": {"use_ray": False, "mp_csv_path": str(csv), "steps": 40}},
        "phonons": {"config": {"use_ray": False, "top_n": 2, "supercell": [1, 1, 1], "mesh": [4, 4, 4],
                               "band_npoints": 9}},
        "shortlist": {"config": {"n_plots": 2, "mp_csv_path": str(full_mp)}},
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

        refs = store.read("reference_energies", partition=PART)
        assert set(refs["kind"]) == {"reference"}  # computed before the selection: no candidate rows
        assert sorted(refs["phase_id"]) == ["ase-Ru", "mp-1009490", "mp-1342", "mp-1977763"]
        assert refs.filter(pl.col("is_elemental"))["e_above_hull_ev_per_atom"].min() >= -1e-9

        # relaxed: the best 3 by static energy above the references' hull, one per composition
        from lib.selection import select_for_relaxation, static_hull_distance

        static = static_hull_distance(pre, refs, elements=["Ba", "O", "Ru"])
        want = select_for_relaxation(static, 3, per_composition_quota=1)
        rel = store.read("relaxed", partition=PART)
        assert rel["candidate_id"].to_list() == want["candidate_id"].to_list()
        assert rel["selection_rank"].to_list() == [1, 2, 3]
        assert rel["reduced_formula"].n_unique() == 3  # the two BaO polymorphs compete for one place
        assert {"cand-bao-rocksalt", "cand-bruo3-cubic", "cand-ruo2-rutile"} == set(rel["candidate_id"])
        assert rel["static_e_above_hull_ev_per_atom"].is_sorted()
        assert rel["prescreen_energy_per_atom_ev"].null_count() == 0
        # the relaxed cells' hull values, against the same references
        assert rel["e_above_hull_ev_per_atom"].null_count() == 0 and rel["decomposition"].null_count() == 0
        bao = rel.filter(pl.col("candidate_id") == "cand-bao-rocksalt").row(0, named=True)
        assert abs(bao["e_above_hull_ev_per_atom"]) < 0.02  # rock-salt BaO relaxes onto mp-1342's hull point
        rmeta = res.asset_materializations_for_node("relaxed")[0].metadata
        assert rmeta["n_selected"].value == 3 and rmeta["n_selected_compositions"].value == 3
        assert rmeta["rank_by"].value == "e_above_hull"

        # phonons: the best 2 by energy above the hull (the default order)
        ph = store.read("phonons", partition=PART)
        assert ph["status"].to_list() == ["ok", "ok"]
        assert sorted(ph["candidate_id"]) == sorted(rel.sort("e_above_hull_ev_per_atom").head(2)["candidate_id"])

        sl = store.read("shortlist", partition=PART)
        assert sl["rank"].to_list() == [1, 2, 3] and sl["has_phonons"].sum() == 2
        assert sl["e_above_hull_ev_per_atom"].is_sorted()
        md = res.asset_materializations_for_node("shortlist")[0].metadata["band_structures"].value
        assert md.count("data:image/png;base64") == 2
        # the key plots: the Ba-O-Ru hull diagram and energy above the hull vs the phonon minimum
        for key in ("hull_diagram", "e_above_hull_vs_phonon_min"):
            plot = res.asset_materializations_for_node("shortlist")[0].metadata[key].value
            assert plot.count("data:image/png;base64") == 1 and len(plot) > 5000, plot[:200]
        # known phases after relaxation: rock-salt BaO (not flagged before relaxation) is MP's mp-1342;
        # the cubic perovskite and rutile RuO2 are not in the MP file: novel
        by_id = {r["candidate_id"]: r for r in sl.iter_rows(named=True)}
        assert by_id["cand-bao-rocksalt"]["is_novel"] is False
        assert by_id["cand-bao-rocksalt"]["known_material_id"] == "mp-1342"
        assert by_id["cand-bao-rocksalt"]["known_source"] == "mp"
        for cid in ("cand-bruo3-cubic", "cand-ruo2-rutile"):
            assert by_id[cid]["is_novel"] is True and by_id[cid]["known_material_id"] is None, by_id[cid]
        smeta = res.asset_materializations_for_node("shortlist")[0].metadata
        assert (smeta["n_novel"].value, smeta["n_known"].value, smeta["n_duplicate"].value) == (2, 1, 0)
        assert smeta["ltol"].value == 0.2 and smeta["stol"].value == 0.3 and smeta["angle_tol"].value == 5.0
        assert smeta["n_known_structures"].value == 23 + 4  # the MP file as stored + the 4 relaxed references
        assert smeta["n_rediscovered_phases"].value == 1 and "| mp-1342 | mp | 1 | 3 | 3 |" in smeta[
            "rediscovered_phases"].value
        # rediscovery counts over the 23 known phases (lib.rediscovery): no training table here, so
        # the 4-site default; 6 need more ASU sites (the 4 larger ternaries, two BaO2); only
        # mp-1025237 Ba2RuO4 is a representable ternary; none matched before relaxation (the dedup
        # frame says so), BaO mp-1342 matched after it, at unique rank 3
        assert smeta["rediscovery_max_asu_sites"].value == 4
        assert (smeta["rediscovery_n_known_phases"].value, smeta["rediscovery_n_representable"].value,
                smeta["rediscovery_n_can_appear"].value) == (23, 17, 1)
        assert len(smeta["rediscovery_not_representable"].value) == 6
        assert smeta["rediscovery_n_before_relaxation"].value == 0
        assert smeta["rediscovery_after_relaxation_best_unique_rank"].value == {"mp-1342 BaO": 3}
        assert "| mp-1342 | BaO | 225 | 2 | no: not 3-element" in smeta["rediscovery"].value
        assert "| mp-3597 | BaRuO3 | 194 | 5 | no: 5 ASU sites > 4 | 0 / 0 | 0 (0) | - | - |" in smeta[
            "rediscovery"].value
        # charge balance: columns, not a filter
        assert by_id["cand-bruo3-cubic"]["oxidation_states"] == "Ba:+2,Ru:+4,O:-2"
        assert sl["charge_balanced"].to_list() == [True, True, True]

        # the catalog has the table views, the derived view and answers the example query
        con = duckdb.connect(str(home / "catalog.duckdb"), read_only=True)
        top = pl.from_arrow(con.execute((REPO_ROOT / "sql/examples/shortlist_top.sql").read_text()).to_arrow_table())
        novel = sl.filter(pl.col("duplicate_of").is_null() & pl.col("is_novel"))
        assert top["candidate_id"].to_list() == novel["candidate_id"].to_list() and novel.height == 2
        n_stable = con.execute("select count(*) from shortlist_stable").fetchone()[0]
        assert n_stable == sl.filter((pl.col("e_above_hull_ev_per_atom") <= 0.1)
                                     & pl.col("is_dynamically_stable")).height
        con.close()

        # consensus: the 2 unique novel rows re-evaluated by matgl's M3GNet on its own hull, and a
        # surrogate that does not exist (its rows carry the error; nothing is dropped)
        m3g = "M3GNet-MP-2021.2.8-PES"
        cres = dg.materialize(
            [consensus, contract_check("consensus")], partition_key=pk, instance=inst,
            resources={**_resources(home), "surrogate_registry": SurrogateRegistryResource(models_dir=str(m3gnet_dir))},
            run_config={"ops": {"consensus": {"config": {"top_k": 5, "surrogates": [m3g, "No-Such-Surrogate"],
                                                         "steps": 60, "top_n_overlap": 1, "rank_by": "lcb"}}}})
        assert cres.success
        assert _checks(cres) == {"every_surrogate_evaluated": False, "consensus_matches_contract": True}
        con_t = store.read("consensus", partition=PART)
        assert con_t.height == 2 * 3 and set(con_t["candidate_id"]) == set(novel["candidate_id"])
        ok = con_t.filter(pl.col("status") == "ok")
        assert sorted(set(ok["evaluated_surrogate"])) == [SURROGATE, m3g] and ok.height == 4
        bad = con_t.filter(pl.col("evaluated_surrogate") == "No-Such-Surrogate")
        assert bad["status"].to_list() == ["error", "error"] and "No-Such-Surrogate" in bad["error"][0]
        prim = ok.filter(pl.col("evaluated_surrogate") == SURROGATE).sort("candidate_id")
        assert prim["e_above_hull_ev_per_atom"].to_list() == novel.sort("candidate_id")["e_above_hull_ev_per_atom"].to_list()
        for _cid, g in ok.group_by("candidate_id"):
            e = g["e_above_hull_ev_per_atom"].to_list()
            row = g.row(0, named=True)
            assert row["n_surrogates_ok"] == 2
            assert abs(row["e_above_hull_mean_ev_per_atom"] - sum(e) / 2) < 1e-12
            assert abs(row["e_above_hull_spread_ev_per_atom"] - abs(e[0] - e[1])) < 1e-12
            assert abs(row["e_above_hull_lcb_ev_per_atom"] - (sum(e) / 2 + abs(e[0] - e[1]) / 2)) < 1e-12
        lcb = con_t.unique("candidate_id").sort("consensus_rank")["e_above_hull_lcb_ev_per_atom"].to_list()
        assert lcb == sorted(lcb)
        cmeta = cres.asset_materializations_for_node("consensus")[0].metadata
        first = con_t.sort("primary_rank")["candidate_id"][0] == con_t.sort("consensus_rank")["candidate_id"][0]
        assert cmeta["top_1_overlap"].value == int(first) and "No-Such-Surrogate" in cmeta["surrogate_failures"].value
        assert cmeta["references_by_surrogate"].value[m3g].startswith("the primary's relaxed reference cells")

        # a rerun of the pre-screen resumes: every batch is found on disk, nothing is recomputed
        res2 = dg.materialize([prescreen], partition_key=pk, instance=inst, resources=_resources(home),
                              run_config={"ops": {"prescreen": run_config["ops"]["prescreen"]}})
        meta2 = res2.asset_materializations_for_node("prescreen")[0].metadata
        assert meta2["batches_skipped_resumed"].value == 3 and meta2["batches_run"].value == 0
        assert store.read("prescreen", partition=PART).sort("candidate_id").equals(pre.sort("candidate_id"))

        # a reduced pre-screen is a seeded sample stratified by composition, not the first N ids
        from lib.selection import stratified_sample

        cfg = {"use_ray": False, "max_candidates": 3, "sample_seed": 5, "batch_rows": 4}
        res3 = dg.materialize([prescreen], partition_key=pk, instance=inst, resources=_resources(home),
                              run_config={"ops": {"prescreen": {"config": cfg}}})
        sample = store.read("prescreen", partition=PART)["candidate_id"].sort().to_list()
        dedup = store.read("candidates_dedup", partition=CHEMSYS)
        assert sample == stratified_sample(dedup, 3, seed=5)["candidate_id"].to_list()
        assert len(sample) == 3 and sample != dedup["candidate_id"].sort().head(3).to_list()
        meta3 = res3.asset_materializations_for_node("prescreen")[0].metadata
        assert meta3["n_candidates_input"].value == 5 and meta3["n_compositions_sampled"].value == 3

        # the volume scan: every candidate's lowest energy over 0.9/1.0/1.1 and the parabola's vertex,
        # never above its single evaluation; the relaxation starts from the scanned cell
        scan = [0.9, 1.0, 1.1]
        res4 = dg.materialize([prescreen, relaxed], partition_key=pk, instance=inst, resources=_resources(home),
                              run_config={"ops": {"prescreen": {"config": {"use_ray": False, "volume_scan": scan}},
                                                  "relaxed": {"config": {"use_ray": False, "top_k": 2, "steps": 3}}}})
        assert res4.success
        pre4 = store.read("prescreen", partition=PART).sort("candidate_id")
        ok4 = pre4.filter(pl.col("status") == "ok")
        assert ok4.height == 4 and ok4["volume_scale"].null_count() == 0 and (ok4["volume_scale"] != 1.0).any()
        single = pre.sort("candidate_id").filter(pl.col("status") == "ok")["energy_per_atom_ev"].to_numpy()
        assert (ok4["energy_per_atom_ev"].to_numpy() <= single + 1e-9).all()
        assert pre4.filter(pl.col("status") == "error")["volume_scale"].to_list() == [None]
        meta4 = res4.asset_materializations_for_node("prescreen")[0].metadata
        assert meta4["volume_scan"].value == scan
        assert meta4["n_volume_rescaled"].value == int((ok4["volume_scale"] != 1.0).sum())
        assert store.pointer("prescreen", PART)["metadata"]["volume_scan"] == scan
        rel4 = store.read("relaxed", partition=PART)
        assert rel4.height == 2 and rel4["status"].to_list() == ["ok", "ok"]
        bad = dg.materialize([prescreen], partition_key=pk, instance=inst, resources=_resources(home),
                             raise_on_error=False,
                             run_config={"ops": {"prescreen": {"config": {"use_ray": False, "volume_scan": [1.0, 1.1]}}}})
        assert not bad.success
        assert "at least 3 distinct" in str(bad.get_step_failure_events()[0].event_specific_data.error)
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_phonons_cap_skips_large_supercells_and_sizes_actors_to_memory(home, store, ba_ru_o_dir, monkeypatch):
    """Two real MP cells as the relaxed rows: rock-salt BaO (2x2x2: 16 atoms) is screened, the
    30-atom BaRuO3 mp-3598 (240 atoms) is above a 200-atom cap: skipped, counted, with its reason.
    The force batches and the number of actors follow the memory model of the surrogate's kind,
    and the actors' measured peak RSS stays under its per-actor estimate."""
    import ray
    import torch

    from lib import screening as scr
    from lib.phonons import max_batch_atoms, memory_aware_num_actors, phonon_rss_estimate_gb
    from lib.store import TableStore

    torch.set_num_threads(1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cells = scr.mp_csv_cells(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", elements=["Ba", "Ru", "O"]).filter(
        pl.col("phase_id").is_in(["mp-1342", "mp-3598"])).sort("phase_id")
    rel = cells.select(pl.col("phase_id").alias("candidate_id"), "formula", "lattice_matrix", "species",
                       "frac_coords").with_columns(
        pl.lit("tpl-test").alias("template_id"), pl.lit("ckpt-test").alias("checkpoint_id"),
        pl.lit(SURROGATE).alias("surrogate_name"), pl.lit("x" * 64).alias("surrogate_sha256"),
        pl.lit(scr.CODE_VERSION).alias("code_version"), pl.lit("ok").alias("status"),
        pl.Series("formation_energy_per_atom_ev", [-2.8, -2.2]), pl.Series("e_above_hull_ev_per_atom", [0.0, 0.02]),
        pl.lit("").alias("decomposition"))
    TableStore(home, contracts={}).write("relaxed", rel, partition=PART)  # the phonons stage's input only
    cfg = {"use_ray": True, "num_actors": 2, "cpus_per_actor": 0.5, "batch_rows": 1, "top_n": 2,
           "max_supercell_atoms": 200, "actor_memory_gb": 2.0, "mesh": [4, 4, 4], "band_npoints": 5}
    pk = dg.MultiPartitionKey({"chemical_system": CHEMSYS, "surrogate": SURROGATE})
    try:
        res = dg.materialize([phonons, contract_check("phonons")], partition_key=pk, instance=_instance(),
                             resources=_resources(home), run_config={"ops": {"phonons": {"config": cfg}}})
    finally:
        ray.shutdown()
    assert res.success and _checks(res) == {"phonons_matches_contract": True}
    ph = {r["candidate_id"]: r for r in store.read("phonons", partition=PART).iter_rows(named=True)}
    assert ph["mp-1342"]["status"] == "ok" and ph["mp-1342"]["n_supercell_atoms"] == 16
    big = ph["mp-3598"]
    assert big["status"] == "skipped" and big["n_supercell_atoms"] == 240 and big["min_frequency_thz"] is None
    assert "supercell of 240 atoms > max_supercell_atoms 200" in big["error"]
    md = {k: v.value for k, v in res.asset_materializations_for_node("phonons")[0].metadata.items()}
    assert md["n_skipped_size"] == 1 and md["n_ok"] == 1 and "mp-3598" in md["skipped_size"]
    assert md["surrogate_kind"] == "chgnet" and md["max_batch_atoms"] == max_batch_atoms(2.0, "chgnet") == 297
    assert md["per_actor_rss_estimate_gb"] == round(phonon_rss_estimate_gb("chgnet", 297), 2) == 2.0
    assert md["actors_by_cpu"] == 2 and md["actors"] == memory_aware_num_actors(
        2, available_gb=md["available_memory_gb"], per_actor_gb=2.0)
    assert 0.2 < md["actor_peak_rss_gb"] < md["per_actor_rss_estimate_gb"]
    stored = store.pointer("phonons", PART)["metadata"]
    assert stored["max_supercell_atoms"] == "200" and stored["max_batch_atoms"] == 297
