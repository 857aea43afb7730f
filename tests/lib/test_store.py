"""The Parquet store: atomic replace, sharding, partitions, DuckDB views."""

from __future__ import annotations

import json

import polars as pl
import pytest

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
