"""assets.reports: xrd_patterns materialised through Dagster on real Ba-Ru-O structures."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from assets.reports import xrd_patterns_asset, xrd_patterns_complete
from orchestration.resources import CgwganHome
from tests.test_cli import SURROGATE, ba_ru_o_store  # noqa: F401  (fixture)


def _materialize(home, **config):
    return dg.materialize(
        [xrd_patterns_asset, xrd_patterns_complete],
        resources={"cgwgan_home": CgwganHome(home=str(home))},
        run_config={"ops": {"xrd_patterns": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def test_xrd_of_shortlist_and_discoveries(ba_ru_o_store):  # noqa: F811
    store = ba_ru_o_store
    mp = store.read("mp_structures")
    store.write("discoveries", mp.filter(pl.col("reduced_formula") == "BaO2").with_columns(
        candidate_id="cand-" + pl.col("material_id"), dft_formation_energy_per_atom_ev=pl.lit(-1.0)))
    res = _materialize(store.home)
    assert res.success
    n_short = store.rows("shortlist")
    meta = res.asset_materializations_for_node("xrd_patterns")[0].metadata
    assert meta["n_patterns"].value == n_short + 4
    assert meta["n_rows_not_rebuilt"].value == 0
    assert meta["xrd_plot"].value.startswith("![simulated powder XRD patterns](data:image/png;base64,")
    checks = res.get_asset_check_evaluations()
    assert len(checks) == 1 and checks[0].passed

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


def test_any_structure_table_can_be_selected(ba_ru_o_store):  # noqa: F811
    res = _materialize(ba_ru_o_store.home, tables=["mp_structures"], required_tables=["mp_structures"],
                       max_structures_per_table=5)
    assert res.success
    peaks = ba_ru_o_store.read("xrd_patterns")
    assert peaks["material_id"].n_unique() == 5 and peaks["source_table"].unique().to_list() == ["mp_structures"]
