"""End to end: a small templates table in the store -> candidates -> candidates_dedup, with checks and DuckDB."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest

from assets import infill as infill_assets
from lib.contracts import ContractViolation
from lib.infill import random_templates
from lib.store import TableStore
from orchestration.resources import SQL_DIR, CgwganHome, RayResource

CHEMSYS = "Ba-O-Ru"


def _instance() -> dg.DagsterInstance:
    inst = dg.DagsterInstance.ephemeral()
    inst.add_dynamic_partitions("chemical_system", [CHEMSYS])
    return inst


def _checks() -> list:
    return [*(v for v in vars(infill_assets).values() if isinstance(v, dg.AssetChecksDefinition)),
            *infill_assets.contract_checks]


def _replace_on_disk(store: TableStore, table: str, partition: str, frame: pl.DataFrame) -> None:
    """Overwrite the current version's file behind the store's back (what the checks must catch:
    a file edited by hand, or written by code that did not go through the contract)."""
    (path,) = store.files(table, partition)
    pq.write_table(frame.to_arrow(), path)


def test_materialize_candidates_and_dedup(home: Path, store: TableStore, ba_ru_o_dir: Path) -> None:
    tpl = random_templates(40, seed=5, spacegroups=[14, 62, 139, 166, 194, 221, 225])
    store.write("templates", tpl, partition="gen-test")
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "ray_runtime": RayResource(num_cpus=1)}
    run_config = dg.RunConfig(ops={
        "candidates": infill_assets.CandidatesConfig(max_atoms=40, batch_templates=15),
        "candidates_dedup": infill_assets.CandidatesDedupConfig(
            mp_reference_path=str(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")),
    })
    result = dg.materialize([infill_assets.candidates, infill_assets.candidates_dedup, *_checks()],
                            resources=resources, instance=_instance(), partition_key=CHEMSYS,
                            run_config=run_config)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert {c.check_name for c in checks} == {
        "candidates_in_system", "candidates_dedup_in_system", "candidates_dedup_accounts_for_every_candidate",
        "candidates_matches_contract", "candidates_template_rejects_matches_contract",
        "candidates_dedup_matches_contract"}
    assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]

    cands = store.read("candidates", CHEMSYS)
    dedup = store.read("candidates_dedup", CHEMSYS)
    assert cands.height > 40 and cands["candidate_id"].is_unique().all()
    assert 0 < dedup.height <= cands.height
    assert dedup.height + int(dedup["n_folded"].sum()) == cands.height
    meta = result.asset_materializations_for_node("candidates")[0].metadata
    assert meta["rows"].value == cands.height and meta["bytes_on_disk"].value > 0
    assert meta["n_templates"].value == 40
    dmeta = result.asset_materializations_for_node("candidates_dedup")[0].metadata
    assert dmeta["rows"].value == dedup.height
    assert dmeta["n_mp_references"].value == 23

    # DuckDB views and the example queries run against the catalog
    con = store.connect()
    top = con.execute("SELECT reduced_formula, count(*) FROM candidates GROUP BY 1 ORDER BY 2 DESC LIMIT 20").fetchall()
    assert sum(n for _, n in top) <= cands.height and top[0][1] >= top[-1][1]
    for name in ("candidates_by_spacegroup_formula", "candidates_of_formula", "candidates_from_template"):
        rows = con.execute((SQL_DIR / "examples" / f"{name}.sql").read_text()).fetchall()
        assert rows, name
    one = con.execute("SELECT count(*) FROM candidates WHERE template_id = ?", [cands["template_id"][0]]).fetchone()[0]
    assert one == cands.filter(pl.col("template_id") == cands["template_id"][0]).height


def test_checks_fail_on_a_corrupted_partition(home: Path, store: TableStore) -> None:
    tpl = random_templates(10, seed=2, spacegroups=[62, 225])
    store.write("templates", tpl, partition="gen-test")
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "ray_runtime": RayResource(num_cpus=1)}
    assert dg.materialize([infill_assets.candidates], resources=resources, instance=_instance(),
                          partition_key=CHEMSYS).success
    good = store.read("candidates", CHEMSYS)
    version = store.pointer("candidates", CHEMSYS)["version"]
    bad = pl.concat([good, good.head(1).with_columns(pl.lit(["Na"]).alias("asu_species"))])
    # the store refuses the duplicated key before anything is written
    with pytest.raises(ContractViolation, match="table 'candidates' partition 'Ba-O-Ru': column 'candidate_id': "
                                                "primary key duplicated: 1 extra row"):
        store.write("candidates", bad, partition=CHEMSYS)
    assert store.pointer("candidates", CHEMSYS)["version"] == version and store.read("candidates").equals(good)

    # the same rows on disk behind the store's back: the checks catch them
    _replace_on_disk(store, "candidates", CHEMSYS, bad.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("fingerprint")).alias("fingerprint")))
    contract = next(c for c in infill_assets.contract_checks
                    if c.check_key.name == "candidates_matches_contract")
    res = dg.materialize([contract, infill_assets.candidates_in_system],
                         resources=resources, instance=_instance(), selection=dg.AssetSelection.all_asset_checks())
    evals = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert not evals["candidates_matches_contract"].passed
    meta = evals["candidates_matches_contract"].metadata
    assert meta["duplicated_keys"].value == 1 and meta["null_values"].value == 1
    assert meta["missing_columns"].value == 0 and meta["failing_partitions"].value == CHEMSYS
    assert "fingerprint" in meta["violations"].value and "candidate_id" in meta["violations"].value
    assert not evals["candidates_in_system"].passed
    assert evals["candidates_in_system"].metadata["foreign_elements"].value == 1

    # a column dropped and another retyped: named by the check
    _replace_on_disk(store, "candidates", CHEMSYS, good.drop("volume_mode").with_columns(pl.col("n_atoms").cast(pl.Int32)))
    res = dg.materialize([contract], resources=resources, instance=_instance(),
                         selection=dg.AssetSelection.all_asset_checks())
    (ev,) = res.get_asset_check_evaluations()
    assert not ev.passed and ev.metadata["missing_columns"].value == 1 and ev.metadata["wrong_dtypes"].value == 1
    assert "column 'volume_mode': missing" in ev.metadata["violations"].value
    assert "column 'n_atoms': dtype i32, contract says i64" in ev.metadata["violations"].value


def test_wrong_elements_override_fails_clearly(home: Path, store: TableStore) -> None:
    store.write("templates", random_templates(5, seed=1, spacegroups=[225]), partition="gen-test")
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "ray_runtime": RayResource(num_cpus=1)}
    res = dg.materialize([infill_assets.candidates], resources=resources, instance=_instance(),
                         partition_key=CHEMSYS, raise_on_error=False,
                         run_config=dg.RunConfig(ops={"candidates": infill_assets.CandidatesConfig(
                             elements=["Na", "Cl"])}))
    assert not res.success
    assert not store.exists("candidates")
