"""The Parquet store on S3: a local ``moto`` S3 server started by the test, real MP rows.

Same guarantees as the local store (tests/lib/test_store.py): atomic replace through the pointer
object, a failed or refused write leaves the previous version current (and a reader in the middle
of a write sees it), partitions, and DuckDB over the S3 tables through ``connect()`` with no
extension (Arrow datasets registered in DuckDB, read through pyarrow's S3 filesystem).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

from lib.contracts import ContractViolation
from lib.store import POINTER, LocalOnlyError, S3Options, TableStore


@pytest.fixture()
def s3_store(s3: S3Options, bucket: str) -> TableStore:
    return TableStore(f"s3://{bucket}/campaign/home/", s3=s3)


@pytest.fixture(scope="module")
def mp_rows(mp_file: Path) -> pl.DataFrame:
    """20 real MP structures, parsed and validated as the ``mp_structures`` asset does."""
    from lib.mp_sources import raw_from_table_file, validate_records

    loaded = validate_records(raw_from_table_file(mp_file).head(20), source=str(mp_file), snapshot_id="s3-test")
    assert loaded.structures.height == 20 and loaded.rejects.height == 0
    return loaded.structures


def _objects(store: TableStore, under: str) -> list[str]:
    fs = store._fs
    assert fs is not None
    prefix = f"{store.home}/{under}".removeprefix("s3://")
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(i.path.removeprefix(prefix + "/") for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)


def _versions(store: TableStore, table: str, partition: str = "all") -> list[str]:
    return sorted({k.split("/")[0] for k in _objects(store, f"tables/{table}/{partition}") if k.startswith("v-")})


def test_write_read_overwrite_real_rows(s3_store: TableStore, mp_rows: pl.DataFrame) -> None:
    assert s3_store.home.startswith("s3://cgwgan-") and s3_store.home.endswith("/campaign/home")
    info = s3_store.write("mp_structures", mp_rows, max_rows_per_shard=8, metadata={"snapshot_id": "s3-test"})
    assert (info.rows, len(info.files)) == (20, 3)  # 8 + 8 + 4
    assert all(f.startswith(f"{s3_store.home}/tables/mp_structures/all/{info.version}/part-") for f in info.files)
    assert s3_store.uris("mp_structures") == list(info.files)
    assert s3_store.tables() == ["mp_structures"] and s3_store.partitions("mp_structures") == ["all"]
    assert s3_store.rows("mp_structures") == 20 and s3_store.exists("mp_structures", "all")
    ptr = s3_store.pointer("mp_structures")
    assert ptr is not None and ptr["version"] == info.version and ptr["bytes"] == info.bytes_on_disk > 0
    got = s3_store.read("mp_structures")
    assert got.equals(mp_rows)  # every column, list columns (lattice, species, coordinates) included
    assert s3_store.read("mp_structures", columns=["material_id", "nsites"]).columns == ["material_id", "nsites"]
    # a second client (another process, another machine) sees the same table; the store pickles
    # (as it travels to a Ray worker) with its filesystem and settings
    other = TableStore(s3_store.home, s3=s3_store.s3)
    assert other.read("mp_structures")["material_id"].to_list() == mp_rows["material_id"].to_list()
    shipped = pickle.loads(pickle.dumps(s3_store))
    assert shipped == s3_store and shipped.read("mp_structures", columns=["nsites"]).equals(mp_rows.select("nsites"))

    info2 = s3_store.write("mp_structures", mp_rows.tail(5))
    assert s3_store.read("mp_structures").equals(mp_rows.tail(5))  # replaced, not appended
    assert _versions(s3_store, "mp_structures") == [info2.version]  # the old version was collected
    assert _objects(s3_store, "tables/mp_structures/all") == [POINTER, f"{info2.version}/part-00000.parquet"]


def test_a_reader_never_sees_a_half_written_version(s3_store: TableStore, mp_rows: pl.DataFrame) -> None:
    old = s3_store.write("mp_structures", mp_rows.head(10))
    before = s3_store.pointer("mp_structures")
    reader = TableStore(s3_store.home, s3=s3_store.s3)
    seen: list[tuple[list[str], pl.DataFrame]] = []

    def frames():
        yield mp_rows.slice(10, 5)
        yield mp_rows.slice(15, 5)
        # two shards of the new version are on S3 now; the pointer still names the old one
        seen.append((_versions(s3_store, "mp_structures"), reader.read("mp_structures")))
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        s3_store.write("mp_structures", frames(), max_rows_per_shard=5)
    (versions_mid_write, read_mid_write), = seen
    assert len(versions_mid_write) == 2 and old.version in versions_mid_write  # really half-written
    assert read_mid_write.equals(mp_rows.head(10))
    assert reader.read("mp_structures").equals(mp_rows.head(10))
    assert _versions(s3_store, "mp_structures") == [old.version]  # the half-written prefix was removed

    def duplicated_key():  # refused at the end of the stream, before the commit point
        yield mp_rows.slice(10, 5)
        yield mp_rows.slice(12, 5)

    with pytest.raises(ContractViolation, match="column 'material_id': primary key duplicated"):
        s3_store.write("mp_structures", duplicated_key(), max_rows_per_shard=5)
    assert s3_store.pointer("mp_structures") == before and before is not None and before["version"] == old.version
    assert reader.read("mp_structures").equals(mp_rows.head(10))
    assert _versions(s3_store, "mp_structures") == [old.version]


def test_partitions_and_empty_results(s3_store: TableStore, mp_rows: pl.DataFrame) -> None:
    a, b = mp_rows.head(7), mp_rows.slice(7, 6)
    s3_store.write("mp_structures", a, partition="Ba-O-Ru")
    s3_store.write("mp_structures", b, partition="Na-Cl|CHGNet-0.3.0")
    assert sorted(s3_store.partitions("mp_structures")) == ["Ba-O-Ru", "Na-Cl|CHGNet-0.3.0"]
    assert s3_store.read("mp_structures", "Ba-O-Ru").equals(a)
    assert s3_store.read("mp_structures", "Na-Cl|CHGNet-0.3.0").equals(b)
    assert s3_store.read("mp_structures").sort("material_id").equals(pl.concat([a, b]).sort("material_id"))
    assert s3_store.rows("mp_structures") == 13
    s3_store.write("mp_structures", b.head(2), partition="Ba-O-Ru")  # one partition replaced, the other kept
    assert s3_store.read("mp_structures", "Na-Cl|CHGNet-0.3.0").equals(b)
    s3_store.delete_partition("mp_structures", "Ba-O-Ru")
    assert s3_store.partitions("mp_structures") == ["Na-Cl|CHGNet-0.3.0"]
    assert not s3_store.exists("mp_structures", "Ba-O-Ru")
    with pytest.raises(FileNotFoundError, match="'Ba-O-Ru' has not been written under s3://"):
        s3_store.read("mp_structures", "Ba-O-Ru")

    s3_store.write("mp_structures", mp_rows.head(0), partition="empty")  # schema kept for an empty result
    assert s3_store.read("mp_structures", "empty").schema == mp_rows.schema
    assert s3_store.rows("mp_structures", "empty") == 0


def test_duckdb_over_the_s3_tables_without_extensions(s3_store: TableStore, mp_rows: pl.DataFrame) -> None:
    s3_store.write("mp_structures", mp_rows.head(12), partition="p1", max_rows_per_shard=5)
    s3_store.write("mp_structures", mp_rows.slice(12, 8), partition="p2")
    extra = ["CREATE VIEW big_cells AS SELECT material_id, nsites FROM mp_structures WHERE nsites >= 10"]
    con = s3_store.connect(extra_sql=extra)
    assert con.execute("SELECT count(*), sum(nsites) FROM mp_structures").fetchone() == (20, mp_rows["nsites"].sum())
    want = mp_rows.filter(pl.col("nsites") >= 10)
    got = con.execute("SELECT material_id FROM big_cells ORDER BY material_id").fetchall()
    assert [r[0] for r in got] == sorted(want["material_id"].to_list()) and 0 < len(got) < 20
    # no extension was loaded or installed: httpfs is not needed to reach the bucket
    loaded = con.execute("SELECT extension_name FROM duckdb_extensions() WHERE loaded OR installed").fetchall()
    assert "httpfs" not in {r[0] for r in loaded}
    # what needs a local disk says so, naming the feature
    with pytest.raises(LocalOnlyError, match=r"refresh_catalog\(\) \(catalog.duckdb and its file lock\) needs a "
                                             r"local folder; the store at s3://"):
        s3_store.refresh_catalog()
    with pytest.raises(LocalOnlyError, match=r"files\(\) needs a local folder.*use uris\(\)"):
        s3_store.files("mp_structures")
    with pytest.raises(LocalOnlyError, match="httpfs"):
        s3_store.view_sql("mp_structures")


def test_bad_object_store_settings_are_named() -> None:
    with pytest.raises(ValueError, match="bad object-store home 's3://'"):
        TableStore("s3://")
    with pytest.raises(ValueError, match="bad S3 endpoint 'ftp://x'"):
        S3Options(endpoint="ftp://x").filesystem()
    with pytest.raises(ValueError, match="both the access key and the secret key"):
        S3Options(endpoint="http://127.0.0.1:1", access_key="only-the-key").filesystem()
    assert "hidden" not in repr(S3Options(access_key="k", secret_key="hidden"))


def test_cgwgan_home_on_s3(s3_endpoint: str, bucket: str, tmp_path: Path, mp_rows: pl.DataFrame) -> None:
    import dagster as dg

    from orchestration.resources import CgwganHome, resources_from_env

    env = {"CGWGAN_HOME": f"s3://{bucket}/home", "CGWGAN_S3_ENDPOINT": s3_endpoint,
           "CGWGAN_S3_ACCESS_KEY_ID": "testing", "CGWGAN_S3_SECRET_ACCESS_KEY": "s3cret-testing",
           "CGWGAN_LOCAL_DIR": str(tmp_path / "local")}
    res = resources_from_env(env)["cgwgan_home"]
    assert isinstance(res.s3_secret_key, dg.EnvVar) and "s3cret" not in repr(res)  # a secret: by name only
    home = CgwganHome(home=f"s3://{bucket}/home", s3_endpoint=s3_endpoint, s3_access_key="testing",
                      s3_secret_key="testing", local_dir=str(tmp_path / "local"))
    assert home.is_object_store and home.store.is_object_store
    home.store.write("mp_structures", mp_rows.head(3))
    assert TableStore(f"s3://{bucket}/home", s3=home.store.s3).read("mp_structures").equals(mp_rows.head(3))
    assert home.refresh_catalog() is None  # no catalog file on S3; SQL through store.connect()
    assert home.subdir("checkpoints") == (tmp_path / "local" / "checkpoints").resolve()
    assert not (tmp_path / "local" / "tables").exists()  # the tables went to the bucket


def test_contract_check_reads_shard_schemas_on_s3(s3_store: TableStore, mp_rows: pl.DataFrame,
                                                  tmp_path: Path) -> None:
    """The asset checks' contract comparison works on S3: the shard schemas read from the bucket
    equal those of the same rows in a local store, and real rows break no contract rule."""
    from assets._checks import _partition_violations
    from lib import contracts

    s3_store.write("mp_structures", mp_rows, max_rows_per_shard=8)
    local = TableStore(tmp_path / "home")
    local.write("mp_structures", mp_rows, max_rows_per_shard=8)
    assert s3_store.shard_schemas("mp_structures") == local.shard_schemas("mp_structures")
    assert len(s3_store.shard_schemas("mp_structures")) == 3
    assert _partition_violations(s3_store, contracts.get("mp_structures"), "all") == []
