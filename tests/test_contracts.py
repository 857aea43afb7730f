"""Table contracts (lib/contracts.py): the doc is generated from them, every written table has one,
every table's asset has its generated check, and typed config refuses a wrong word at launch."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from lib import contracts
from lib.contracts import CONTRACTS, Column, Contract, ContractViolation, conform

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def test_architecture_doc_is_generated_from_the_contracts() -> None:
    text = DOC.read_text()
    assert contracts.generated_block(text) == contracts.render_markdown(), (
        "docs/architecture.md is out of date with lib/contracts.py: run `python -m lib.contracts --update-docs`")
    for table in CONTRACTS:
        assert f"#### `{table}`" in text
    assert contracts.main(["--check-docs", str(DOC)]) == 0


def test_check_docs_fails_on_a_stale_doc(tmp_path: Path) -> None:
    stale = tmp_path / "architecture.md"
    stale.write_text(DOC.read_text().replace("| `material_id` | str |", "| `material_id` | i64 |", 1))
    assert contracts.main(["--check-docs", str(stale)]) == 1
    assert contracts.main(["--update-docs", str(stale)]) == 0
    assert contracts.main(["--check-docs", str(stale)]) == 0 and stale.read_text() == DOC.read_text()


def _written_tables() -> set[str]:
    """Every table name the assets and lib write through ``TableStore.write``."""
    names = set()
    for path in [*REPO.glob("assets/*.py"), *REPO.glob("lib/**/*.py")]:
        src = path.read_text()
        names |= set(re.findall(r"\.write\(\s*\"([a-z][a-z0-9_]*)\"", src))
        if re.search(r"\.write\(\s*scr\.REFERENCES_TABLE", src):
            from lib.screening import REFERENCES_TABLE

            names.add(REFERENCES_TABLE)
    return names


def test_every_written_table_has_a_contract() -> None:
    written = _written_tables()
    assert len(written) >= 20
    assert written <= set(CONTRACTS), f"tables written without a contract: {sorted(written - set(CONTRACTS))}"
    assert set(CONTRACTS) <= written, f"contracts of tables nobody writes: {sorted(set(CONTRACTS) - written)}"


def test_every_table_is_an_asset_with_its_contract_check() -> None:
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    for table, c in CONTRACTS.items():
        assert c.asset in keys, f"{table}: no asset {c.asset!r}"
        assert graph.get(dg.AssetKey(c.asset)).group_name == c.group, table
        assert (c.asset, f"{table}_matches_contract") in checks, f"{table}: no generated contract check"
    generated = [n for _, n in checks if n.endswith("_matches_contract")]
    assert len(generated) == len(CONTRACTS)
    # the side-written tables are assets of their own
    assert {"mp_structures_rejects", "candidates_template_rejects", "reference_energies", "xrd_similarity"} <= keys


def test_lib_schemas_are_derived_from_the_contracts() -> None:
    from lib import (
        churn,
        dedup,
        dft_ingest,
        dft_inputs,
        infill,
        lineage,
        mp_sources,
        phonons,
        screening,
        symmetry,
        xrd,
    )

    assert mp_sources.STRUCTURE_SCHEMA == contracts.schema("mp_structures")
    assert mp_sources.REJECT_SCHEMA == contracts.schema("mp_structures_rejects")
    assert symmetry.SYMMETRY_SCHEMA == contracts.schema("mp_symmetry")
    assert infill.CANDIDATE_SCHEMA == contracts.schema("candidates")
    assert {**infill.CANDIDATE_SCHEMA, **dedup.DEDUP_EXTRA_SCHEMA} == contracts.schema("candidates_dedup")
    assert churn.CHURN_SCHEMA == contracts.schema("surrogate_churn")
    assert dft_ingest.RESULT_SCHEMA == contracts.schema("dft_results")
    assert dft_inputs.MANIFEST_SCHEMA == contracts.schema("dft_inputs")
    assert set(lineage.LINEAGE_SCHEMA) | set(dft_ingest.RESULT_SCHEMA) - {"lattice_matrix", "species", "frac_coords",
                                                                          "files"} == set(contracts.schema("discoveries"))
    # compute outputs: the table's columns without what the asset adds (lineage, batch id, carried columns)
    phonon_cols = [c for c in contracts.schema("phonons") if c not in (*contracts.LINEAGE, "batch_id", "formula")]
    assert list(phonons.PHONON_SCHEMA) == ["key", *phonon_cols]
    assert set(screening.RELAX_SCHEMA) - {"key"} < set(contracts.schema("relaxed"))
    assert set(xrd.PATTERN_SCHEMA) - {"candidate_id"} < set(contracts.schema("xrd_patterns"))


def test_contract_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="key columns \\['nope'\\] are not columns"):
        Contract("t", "g", "m", (Column("a", pl.Int64()),), primary_key=("nope",))
    with pytest.raises(ValueError, match="columns listed twice"):
        Contract("t", "g", "m", (Column("a", pl.Int64()), Column("a", pl.Int64())), primary_key=("a",))
    with pytest.raises(ValueError, match="say which extra columns"):
        Contract("t", "g", "m", (Column("a", pl.Int64()),), primary_key=("a",), extra_columns_allowed=True)
    for c in CONTRACTS.values():
        assert c.meaning and all(col.description for col in c.columns), c.table
        assert all(not c.column(k).nullable for k in c.primary_key), c.table


def test_conform_fills_casts_and_orders_but_never_invents_keys() -> None:
    out = conform("xrd_similarity", pl.DataFrame({"pattern_id_b": ["b"], "pattern_id_a": ["a"]}))
    assert out.schema == pl.Schema(contracts.schema("xrd_similarity"))
    assert out.row(0) == ("a", "b", None)
    assert conform("shortlist", pl.DataFrame({"candidate_id": ["c"], "rank": pl.Series([1], dtype=pl.Int32)})
                   )["rank"].dtype == pl.Int64
    with pytest.raises(ContractViolation, match="table 'xrd_similarity': column 'pattern_id_b': missing"):
        conform("xrd_similarity", pl.DataFrame({"pattern_id_a": ["a"]}))
    with pytest.raises(KeyError, match="no contract for table 'nope'"):
        contracts.get("nope")


# ------------------------------------------------------------------------------------ typed config
@pytest.mark.parametrize(("job", "op", "field", "good", "bad"), [
    ("screening_job", "phonons", "rank_by", "e_above_hull", "energy"),
    ("screening_job", "relaxed", "optimizer", "FIRE2", "LBFGSLineSearch"),
    ("screening_job", "references", "optimizer", "FIRE", "fire"),
    ("infill_job", "candidates", "volume_mode", "rescaled", "scaled"),
    ("mp_job", "mp_symmetry", "round_trip_method", "direct", "matcher"),
    ("generator_job", "templates", "crystal_system", "cubic", "cubic-ish"),
    ("dft_handoff_job", "xrd_patterns", "wavelength", "MoKa", "Cu"),
    ("dft_handoff_job", "dft_inputs", "input_set", "MPScanRelaxSet", "MPRelax"),
])
def test_a_wrong_word_fails_config_validation_at_launch(job: str, op: str, field: str, good: str, bad: str) -> None:
    from dagster._core.errors import DagsterInvalidConfigError

    from orchestration.definitions import defs

    job_def = defs.resolve_job_def(job)
    dg.validate_run_config(job_def, {"ops": {op: {"config": {field: good}}}})
    with pytest.raises(DagsterInvalidConfigError, match=rf"{field}.*not in enum type.*got {re.escape(bad)}"):
        dg.validate_run_config(job_def, {"ops": {op: {"config": {field: bad}}}})


def test_a_bad_rank_by_fails_the_launch_before_any_step(tmp_path: Path) -> None:
    """Launching the phonons asset with rank_by "energy": the run is refused at config validation
    (nothing executes, nothing is written)."""
    from dagster._core.errors import DagsterInvalidConfigError

    from assets.screening import phonons
    from orchestration.resources import CgwganHome, RayResource, SurrogateRegistryResource

    inst = dg.DagsterInstance.ephemeral()
    inst.add_dynamic_partitions("chemical_system", ["Ba-O-Ru"])
    inst.add_dynamic_partitions("surrogate", ["CHGNet-0.3.0"])
    with pytest.raises(DagsterInvalidConfigError, match=r"rank_by.*got energy"):
        dg.materialize([phonons], instance=inst, partition_key=dg.MultiPartitionKey(
            {"chemical_system": "Ba-O-Ru", "surrogate": "CHGNet-0.3.0"}),
            resources={"cgwgan_home": CgwganHome(home=str(tmp_path)), "ray_runtime": RayResource(),
                       "surrogate_registry": SurrogateRegistryResource()},
            run_config={"ops": {"phonons": {"config": {"rank_by": "energy"}}}})
    assert not (tmp_path / "tables").exists()
