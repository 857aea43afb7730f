"""The Parquet store: atomic replace, sharding, partitions, DuckDB views."""

from __future__ import annotations

import json

import polars as pl
import pytest

from lib.contracts import Column, Contract, ContractViolation, conform
from lib.store import POINTER, TableStore, partition_dirname


def _frame(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(start, start + n)), "x": [float(i) for i in range(n)]})


def test_write_read_and_shards(store: TableStore) -> None:
    info = store.write("demo", _frame(1000), max_rows_per_shard=300)
    assert info.rows == 1000
    assert len(info.files) == 4  # 300 + 300 + 300 + 100
    assert store.read("demo")["id"].to_list() == list(range(1000))
    assert store.rows("demo") == 1000


def test_rewrite_replaces_not_appends(store: TableStore) -> None:
    store.write("demo", _frame(10))
    store.write("demo", _frame(5, start=100))
    df = store.read("demo")
    assert df["id"].to_list() == [100, 101, 102, 103, 104]
    # only the current version folder is left on disk
    versions = [d for d in store.partition_dir("demo").iterdir() if d.is_dir()]
    assert len(versions) == 1


def test_crash_mid_write_keeps_previous_version(store: TableStore) -> None:
    store.write("demo", _frame(10))

    def frames():
        yield _frame(3, start=50)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        store.write("demo", frames(), max_rows_per_shard=2)
    assert store.read("demo")["id"].to_list() == list(range(10))
    versions = [d for d in store.partition_dir("demo").iterdir() if d.is_dir()]
    assert len(versions) == 1  # the half-written version was removed


def test_partitions_are_independent(store: TableStore) -> None:
    store.write("cands", _frame(3), partition="Ba-O-Ru")
    store.write("cands", _frame(2, start=10), partition="Na-Cl|CHGNet-0.3.0")
    assert sorted(store.partitions("cands")) == ["Ba-O-Ru", "Na-Cl|CHGNet-0.3.0"]
    assert store.read("cands", "Ba-O-Ru").height == 3
    assert store.read("cands").height == 5
    assert partition_dirname("Na-Cl|CHGNet-0.3.0") == "Na-Cl+CHGNet-0.3.0"


def test_empty_result_keeps_schema(store: TableStore) -> None:
    store.write("empty", _frame(0))
    ptr = json.loads((store.partition_dir("empty") / POINTER).read_text())
    assert ptr["rows"] == 0
    assert store.read("empty").columns == ["id", "x"]


def test_duckdb_views(store: TableStore) -> None:
    store.write("demo", _frame(20))
    con = store.connect(extra_sql=["CREATE VIEW demo_big AS SELECT * FROM demo WHERE id >= 15"])
    assert con.execute("SELECT count(*) FROM demo").fetchone()[0] == 20
    assert con.execute("SELECT count(*) FROM demo_big").fetchone()[0] == 5
    path = store.refresh_catalog()
    import duckdb

    ro = duckdb.connect(str(path), read_only=True)
    assert ro.execute("SELECT sum(id) FROM demo").fetchone()[0] == sum(range(20))


def test_bad_table_name(store: TableStore) -> None:
    with pytest.raises(ValueError, match="bad table name"):
        store.write("Bad-Name", _frame(1))


def test_missing_table_names_it(store: TableStore) -> None:
    with pytest.raises(FileNotFoundError, match="nothing"):
        store.files("nothing", "all")


# ----------------------------------------------------------------------------- contracts
DEMO = Contract("demo", "test", "A test table.", (
    Column("id", pl.Int64()), Column("x", pl.Float64(), "eV"), Column("tag", pl.String(), nullable=False)),
    primary_key=("id",))


def _tagged(n: int, start: int = 0) -> pl.DataFrame:
    return _frame(n, start).with_columns(pl.lit("t").alias("tag"))


@pytest.fixture()
def checked(home) -> TableStore:
    return TableStore(home, contracts={"demo": DEMO})


@pytest.mark.parametrize(("frame", "column", "reason"), [
    (_tagged(3).drop("x"), "x", "missing"),
    (_tagged(3).with_columns(pl.col("x").cast(pl.Float32)), "x", "dtype f32, contract says f64"),
    (_tagged(3).with_columns(pl.lit(1).alias("extra")), "extra", "not in the contract"),
    (_tagged(3).with_columns(pl.Series("id", [1, None, 3])), "id", "1 null value(s); the contract allows none"),
    (_tagged(3).with_columns(pl.Series("tag", ["a", None, "c"])), "tag", "1 null value(s)"),
    (pl.concat([_tagged(3), _tagged(1)]), "id", "primary key duplicated: 1 extra row(s)"),
])
def test_write_refuses_a_frame_that_breaks_its_contract(checked: TableStore, frame, column, reason) -> None:
    checked.write("demo", _tagged(5, start=100), partition="p")
    before = checked.pointer("demo", "p")
    with pytest.raises(ContractViolation) as err:
        checked.write("demo", frame, partition="p")
    assert (err.value.table, err.value.column) == ("demo", column) and reason in err.value.reason
    assert f"table 'demo' partition 'p': column '{column}': {reason}" in str(err.value)
    assert checked.pointer("demo", "p") == before  # nothing committed, previous version intact
    assert [d.name for d in checked.partition_dir("demo", "p").iterdir() if d.is_dir()] == [before["version"]]


def test_refused_first_write_leaves_no_table(checked: TableStore) -> None:
    with pytest.raises(ContractViolation, match="column 'x': missing"):
        checked.write("demo", _tagged(2).drop("x"))
    assert not checked.exists("demo") and not checked.table_dir("demo").exists()


def test_stream_keys_are_checked_across_chunks(checked: TableStore) -> None:
    checked.write("demo", _tagged(4))

    def chunks():
        yield _tagged(3)
        yield _tagged(3, start=2)  # id 2 again, in a later chunk (and a later shard)

    with pytest.raises(ContractViolation, match=r"column 'id': primary key duplicated: 1 extra row\(s\), e.g. \[\(2,\)"):
        checked.write("demo", chunks(), max_rows_per_shard=2)
    assert checked.read("demo")["id"].to_list() == [0, 1, 2, 3]
    assert len([d for d in checked.partition_dir("demo").iterdir() if d.is_dir()]) == 1

    def bad_later_chunk():
        yield _tagged(2)
        yield _tagged(2, start=5).with_columns(pl.col("x").cast(pl.Int64))

    with pytest.raises(ContractViolation, match="column 'x': dtype i64, contract says f64"):
        checked.write("demo", bad_later_chunk())
    assert checked.read("demo")["id"].to_list() == [0, 1, 2, 3]
    info = checked.write("demo", (_tagged(2, start=s) for s in (0, 2, 4)), max_rows_per_shard=2)
    assert info.rows == 6 and len(info.files) == 3


def test_empty_stream_gets_the_contract_schema(checked: TableStore) -> None:
    checked.write("demo", iter(()))
    assert checked.read("demo").schema == pl.Schema(DEMO.schema)


def test_default_store_checks_the_platform_contracts(store: TableStore) -> None:
    sim = pl.DataFrame({"pattern_id_a": ["a"], "pattern_id_b": ["b"], "cosine_similarity": [0.5]})
    store.write("xrd_similarity", sim)
    with pytest.raises(ContractViolation, match="table 'xrd_similarity' partition 'all': column 'cosine_similarity': "
                                                "missing"):
        store.write("xrd_similarity", sim.drop("cosine_similarity"))
    # extra columns only where the contract allows them (rows accumulate across code versions)
    ckpt = conform("wgan_checkpoints", pl.DataFrame({"checkpoint_id": ["ckpt-1"]})).with_columns(
        pl.lit("old").alias("column_of_an_older_version"))
    store.write("wgan_checkpoints", ckpt)
    with pytest.raises(ContractViolation, match="column 'extra': not in the contract"):
        store.write("xrd_similarity", sim.with_columns(pl.lit(1).alias("extra")))
    store.write("scratch_table_without_contract", _frame(2).drop("x"))  # no contract: written as it comes
