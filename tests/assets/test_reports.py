"""assets.reports: xrd_patterns materialised through Dagster on real Ba-Ru-O structures."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from assets.reports import contract_checks, xrd_patterns_asset, xrd_patterns_complete
from lib.contracts import conform
from lib.store import TableStore
from orchestration.resources import CgwganHome

SURROGATE = "M3GNet-MP-2021.2.8-PES"


@pytest.fixture()
def ba_ru_o_store(store: TableStore, ba_ru_o_mp: pl.DataFrame) -> TableStore:
    """The 23 real Ba-Ru-O MP structures as ``mp_structures`` and as ``relaxed`` cells (partitioned
    like screening tables); the ones within 0.1 eV/atom of the MP hull as ``shortlist`` (no cells,
    as lib.screening writes it). Every table in its contract's shape."""
    mp = ba_ru_o_mp
    store.write("mp_structures", conform("mp_structures", mp))
    rel = mp.with_columns(candidate_id="cand-" + pl.col("material_id"), surrogate_name=pl.lit(SURROGATE),
                          energy_ev=-5.0 * pl.col("nsites"), status=pl.lit("ok"))
    for (sys_,), part in rel.group_by("chemical_system"):
        key = f"{sys_}|{SURROGATE}"
        store.write("relaxed", conform("relaxed", part), partition=key)
        short = part.filter(pl.col("e_above_hull_ev_per_atom") < 0.1).sort("e_above_hull_ev_per_atom")
        store.write("shortlist", conform("shortlist", short.with_columns(
            rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)).select(
            "rank", "candidate_id", "surrogate_name", "formula", "reduced_formula", "e_above_hull_ev_per_atom",
            "formation_energy_per_atom_ev")), partition=key)
    return store


def _materialize(home, **config):
    return dg.materialize(
        [xrd_patterns_asset, xrd_patterns_complete, *contract_checks],
        resources={"cgwgan_home": CgwganHome(home=str(home))},
        run_config={"ops": {"xrd_patterns": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def test_xrd_of_shortlist_and_discoveries(ba_ru_o_store):
    store = ba_ru_o_store
    mp = store.read("mp_structures")
    # four BaO2 polymorphs as DFT discoveries (no cell: xrd_patterns finds it in relaxed by candidate_id)
    found = mp.filter(pl.col("reduced_formula") == "BaO2").select(
        "formula", "reduced_formula", candidate_id="cand-" + pl.col("material_id"),
        result_id="dftres-" + pl.col("material_id"), run_name="cand-" + pl.col("material_id"),
        status=pl.lit("ok"), is_linked=pl.lit(True), formation_energy_per_atom_ev=pl.lit(-1.0))
    store.write("discoveries", conform("discoveries", found))
    res = _materialize(store.home)
    assert res.success
    n_short = store.rows("shortlist")
    assert {m.asset_key.to_user_string() for m in res.asset_materializations_for_node("xrd_patterns")} == {
        "xrd_patterns", "xrd_similarity"}
    meta = next(m.metadata for m in res.asset_materializations_for_node("xrd_patterns")
                if m.asset_key == dg.AssetKey("xrd_patterns"))
    assert meta["n_patterns"].value == n_short + 4
    assert meta["n_rows_not_rebuilt"].value == 0
    assert meta["xrd_plot"].value.startswith("![simulated powder XRD patterns](data:image/png;base64,")
    checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
    assert checks == {"xrd_patterns_complete": True, "xrd_patterns_matches_contract": True,
                      "xrd_similarity_matches_contract": True}

    peaks = store.read("xrd_patterns")
    assert set(peaks["source_table"].unique()) == {"shortlist", "discoveries"}
    assert peaks["surrogate_name"].drop_nulls().unique().to_list() == [SURROGATE]
    assert peaks.group_by("pattern_id").agg(pl.col("intensity").max())["intensity"].to_list() == \
        [pytest.approx(100.0)] * (n_short + 4)
    # the four BaO2 polymorphs: different patterns, each identical to itself in the other table
    sim = store.read("xrd_similarity")
    bao2 = sim.filter(pl.col("pattern_id_a").str.starts_with("discoveries:")
                      & pl.col("pattern_id_b").str.starts_with("discoveries:"))
    assert bao2.height == 6 and bao2["cosine_similarity"].max() < 0.999
    same = sim.filter(pl.col("pattern_id_a").str.replace("^[a-z]+:", "")
                      == pl.col("pattern_id_b").str.replace("^[a-z]+:", ""))
    assert same.height >= 1 and same["cosine_similarity"].min() == pytest.approx(1.0)


def test_missing_required_table_fails_with_its_name(home):
    res = _materialize(home)
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    assert "shortlist" in failure.event_specific_data.error.message
    assert "required_tables" in failure.event_specific_data.error.message


def test_any_structure_table_can_be_selected(ba_ru_o_store):
    res = _materialize(ba_ru_o_store.home, tables=["mp_structures"], required_tables=["mp_structures"],
                       max_structures_per_table=5)
    assert res.success
    peaks = ba_ru_o_store.read("xrd_patterns")
    assert peaks["material_id"].n_unique() == 5 and peaks["source_table"].unique().to_list() == ["mp_structures"]


def test_xrd_of_a_dft_result_is_of_its_dft_relaxed_cell(ba_ru_o_store):
    """A discovery row gets its pattern from the DFT-relaxed cell in ``dft_results`` (by result_id),
    also when its candidate is in no relaxed table; rows without a DFT cell fall back to ``relaxed``."""
    store = ba_ru_o_store
    mp = store.read("mp_structures")
    bao = mp.filter(pl.col("material_id") == "mp-1342")
    bao2 = mp.filter(pl.col("reduced_formula") == "BaO2").sort("material_id").head(1)
    assert bao.height == 1 and bao2.height == 1
    bao2_id = "cand-" + bao2["material_id"][0]
    disc = pl.DataFrame({"result_id": ["dftres-gone", "dftres-moved", "dftres-nocell"],
                         "candidate_id": ["cand-not-relaxed-anywhere", bao2_id, bao2_id],
                         "run_name": ["a", "b", "c"], "status": ["ok", "ok", "failed"],
                         "is_linked": [True, True, True]})
    store.write("discoveries", conform("discoveries", disc))
    cell = bao.select(*("lattice_matrix", "species", "frac_coords"))
    dft = pl.concat([cell, cell]).with_columns(result_id=pl.Series(["dftres-gone", "dftres-moved"]),
                                               candidate_id=pl.Series(["cand-not-relaxed-anywhere", bao2_id]),
                                               status=pl.lit("ok"), is_linked=pl.lit(True))
    store.write("dft_results", conform("dft_results", dft))
    res = _materialize(store.home)
    assert res.success
    meta = next(m.metadata for m in res.asset_materializations_for_node("xrd_patterns")
                if m.asset_key == dg.AssetKey("xrd_patterns"))
    assert meta["n_rows_not_rebuilt"].value == 0
    peaks = store.read("xrd_patterns").filter(pl.col("source_table") == "discoveries")

    def pattern(i: int) -> list[tuple[float, float]]:
        rows = peaks.filter(pl.col("pattern_id") == peaks["pattern_id"].unique(maintain_order=True)[i])
        return sorted(zip(rows["two_theta_deg"].round(3).to_list(), rows["intensity"].round(2).to_list(),
                          strict=True))

    assert peaks["pattern_id"].n_unique() == 3
    # rows 0 and 1 are BaO rocksalt (their DFT cells), row 2 the relaxed BaO2 of its candidate
    assert pattern(0) == pattern(1) and pattern(2) != pattern(1)
