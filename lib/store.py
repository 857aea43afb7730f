"""Atomic, sharded Parquet tables under ``CGWGAN_HOME`` and the DuckDB catalog over them.

Layout::

    <home>/tables/<table>/<partition>/v-<version>/part-00000.parquet   (zstd, sharded)
    <home>/tables/<table>/<partition>/_CURRENT.json                     (pointer, replaced atomically)
    <home>/catalog.duckdb                                               (one view per table)

A write goes to a fresh version folder; only when every shard is on disk is the partition's
``_CURRENT.json`` replaced (``os.replace``, atomic on POSIX). A crash mid-write leaves the
previous version current and readable; a repeated write replaces the partition whole, so rows
are never duplicated. Unpartitioned tables use the partition ``all``.

Readers never look at folders, only at pointers: ``TableStore.files`` / ``scan`` / ``read`` and
the DuckDB views all resolve ``_CURRENT.json``.

A table with a contract (:mod:`lib.contracts`) is validated as it is written: missing columns,
wrong dtypes, columns the contract does not allow, nulls in key (or other non-null) columns and
duplicated keys raise :class:`lib.contracts.ContractViolation` naming the table, the column and
the reason. A single frame is checked before anything touches the disk; a stream is checked chunk
by chunk and its keys at the end, before the commit point, so a refused write leaves the previous
version current.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from lib import contracts as _contracts

DEFAULT_PARTITION = "all"
POINTER = "_CURRENT.json"
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def partition_dirname(key: str) -> str:
    """Folder name of a partition key (``Ba-O-Ru|chgnet`` -> ``Ba-O-Ru+chgnet``)."""
    if not key:
        raise ValueError("partition key must not be empty")
    return _SAFE.sub("+", key)


@dataclass(frozen=True)
class WriteInfo:
    table: str
    partition: str
    version: str
    rows: int
    files: tuple[str, ...]
    bytes_on_disk: int


@dataclass(frozen=True)
class TableStore:
    """Parquet tables under ``home``. Cheap to construct; holds no open handles.

    ``contracts``: table name -> contract checked on every write (default: every contract of
    :mod:`lib.contracts`); tables without one are written as they come.
    """

    home: Path
    contracts: Mapping[str, _contracts.Contract] = field(
        default_factory=lambda: _contracts.CONTRACTS, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())

    # ------------------------------------------------------------------ paths
    @property
    def tables_dir(self) -> Path:
        return self.home / "tables"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"

    def table_dir(self, table: str) -> Path:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", table):
            raise ValueError(f"bad table name {table!r}: use lower_snake_case")
        return self.tables_dir / table

    def partition_dir(self, table: str, partition: str = DEFAULT_PARTITION) -> Path:
        return self.table_dir(table) / partition_dirname(partition)

    # ---------------------------------------------------------------- pointers
    def pointer(self, table: str, partition: str = DEFAULT_PARTITION) -> dict[str, Any] | None:
        p = self.partition_dir(table, partition) / POINTER
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def tables(self) -> list[str]:
        if not self.tables_dir.exists():
            return []
        return sorted(
            d.name for d in self.tables_dir.iterdir() if d.is_dir() and any(d.glob(f"*/{POINTER}"))
        )

    def partitions(self, table: str) -> list[str]:
        d = self.table_dir(table)
        if not d.exists():
            return []
        out = []
        for ptr in sorted(d.glob(f"*/{POINTER}")):
            out.append(json.loads(ptr.read_text())["partition"])
        return out

    def exists(self, table: str, partition: str | None = None) -> bool:
        if partition is None:
            return bool(self.partitions(table))
        return self.pointer(table, partition) is not None

    def files(self, table: str, partition: str | None = None) -> list[Path]:
        """Parquet files of the current version of one partition, or of all partitions."""
        parts = self.partitions(table) if partition is None else [partition]
        out: list[Path] = []
        for part in parts:
            ptr = self.pointer(table, part)
            if ptr is None:
                raise FileNotFoundError(
                    f"table {table!r} partition {part!r} has not been written under {self.home}"
                )
            base = self.partition_dir(table, part) / ptr["version"]
            out.extend(base / f for f in ptr["files"])
        return out

    # ------------------------------------------------------------------ write
    def write(
        self,
        table: str,
        data: pl.DataFrame | pa.Table | Iterable[pl.DataFrame | pa.Table],
        *,
        partition: str = DEFAULT_PARTITION,
        max_rows_per_shard: int = 250_000,
        metadata: dict[str, Any] | None = None,
        compression_level: int = 3,
    ) -> WriteInfo:
        """Replace ``table``/``partition`` with ``data``, atomically.

        ``data`` may be one frame or an iterator of frames (streamed shard by shard, so a
        producer never needs the whole table in memory). All frames must share one schema.
        A table with a contract is validated first (see the module docstring).
        """
        contract = self.contracts.get(table)
        check = contract.validator(partition) if contract is not None else None
        if contract is not None and check is not None and isinstance(data, (pl.DataFrame, pa.Table)):
            frame = data if isinstance(data, pl.DataFrame) else _polars(data)
            contract.validate(frame, partition=partition)  # before anything touches the disk
            check = None
        pdir = self.partition_dir(table, partition)
        pdir.mkdir(parents=True, exist_ok=True)
        version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        vdir = pdir / version
        vdir.mkdir()
        files: list[str] = []
        rows = 0
        schema: pa.Schema | None = None
        try:
            for chunk in _iter_chunks(data, max_rows_per_shard):
                if check is not None:
                    check.check(_polars(chunk))
                if schema is None:
                    schema = chunk.schema
                elif not chunk.schema.equals(schema, check_metadata=False):
                    chunk = chunk.cast(schema)
                if chunk.num_rows == 0:
                    continue
                name = f"part-{len(files):05d}.parquet"
                pq.write_table(chunk, vdir / name, compression="zstd",
                               compression_level=compression_level)
                files.append(name)
                rows += chunk.num_rows
            if check is not None:
                check.finish()  # keys over every chunk, before the commit point
            if not files:  # keep the schema visible even for an empty result
                if schema is None and contract is not None:
                    schema = contract.empty().to_arrow().schema
                empty = schema.empty_table() if schema is not None else _empty_of(data)
                pq.write_table(empty, vdir / "part-00000.parquet", compression="zstd")
                files.append("part-00000.parquet")
            size = sum((vdir / f).stat().st_size for f in files)
            ptr = {
                "table": table,
                "partition": partition,
                "version": version,
                "files": files,
                "rows": rows,
                "bytes": size,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "metadata": metadata or {},
            }
            tmp = pdir / f".{POINTER}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(ptr, indent=1, default=str))
            os.replace(tmp, pdir / POINTER)  # the commit point
        except BaseException:
            shutil.rmtree(vdir, ignore_errors=True)
            raise
        self._collect_garbage(pdir, keep=version)
        return WriteInfo(table, partition, version, rows, tuple(str(vdir / f) for f in files), size)

    def delete_partition(self, table: str, partition: str) -> None:
        pdir = self.partition_dir(table, partition)
        ptr = pdir / POINTER
        if ptr.exists():
            ptr.unlink()
        shutil.rmtree(pdir, ignore_errors=True)

    @staticmethod
    def _collect_garbage(pdir: Path, *, keep: str) -> None:
        """Drop versions other than the current one (and half-written ones from crashed runs)."""
        for d in pdir.iterdir():
            if d.is_dir() and d.name.startswith("v-") and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)
            elif d.name.startswith(f".{POINTER}."):
                d.unlink(missing_ok=True)

    # ------------------------------------------------------------------- read
    def scan(self, table: str, partition: str | None = None) -> pl.LazyFrame:
        files = self.files(table, partition)
        if not files:
            raise FileNotFoundError(f"table {table!r} has no data under {self.home}")
        return pl.scan_parquet([str(f) for f in files])

    def read(self, table: str, partition: str | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        lf = self.scan(table, partition)
        if columns is not None:
            lf = lf.select(columns)
        return lf.collect()

    def rows(self, table: str, partition: str | None = None) -> int:
        parts = self.partitions(table) if partition is None else [partition]
        return sum((self.pointer(table, p) or {}).get("rows", 0) for p in parts)

    # ---------------------------------------------------------------- catalog
    def view_sql(self, table: str) -> str:
        files = ", ".join(f"'{f}'" for f in self.files(table))
        return (f"CREATE OR REPLACE VIEW \"{table}\" AS SELECT * FROM read_parquet([{files}], "
                f"union_by_name = true)")

    def connect(self, *, extra_sql: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with one view per table (no file lock needed)."""
        con = duckdb.connect(":memory:")
        _create_views(con, self)
        for stmt in extra_sql:
            with contextlib.suppress(duckdb.CatalogException, duckdb.BinderException):
                con.execute(stmt)
        return con

    def refresh_catalog(self, *, extra_sql: Iterable[str] = ()) -> Path:
        """(Re)write ``catalog.duckdb``: a view per table, then the views in ``extra_sql``.

        Serialised by a file lock so concurrent runs do not fight over DuckDB's write lock.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".catalog.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                con = duckdb.connect(str(self.catalog_path))
                try:
                    _create_views(con, self)
                    for stmt in extra_sql:
                        with contextlib.suppress(duckdb.CatalogException, duckdb.BinderException):
                            con.execute(stmt)
                finally:
                    con.close()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self.catalog_path


def _create_views(con: duckdb.DuckDBPyConnection, store: TableStore) -> None:
    for table in store.tables():
        con.execute(store.view_sql(table))


def _iter_chunks(
    data: pl.DataFrame | pa.Table | Iterable[pl.DataFrame | pa.Table], max_rows: int
) -> Iterator[pa.Table]:
    if isinstance(data, (pl.DataFrame, pa.Table)):
        data = [data]
    for frame in data:
        tbl: pa.Table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
        if tbl.num_rows == 0:
            yield tbl  # carries the schema of an empty result
            continue
        for offset in range(0, tbl.num_rows, max_rows):
            yield tbl.slice(offset, max_rows)


def _polars(tbl: pa.Table) -> pl.DataFrame:
    out = pl.from_arrow(tbl)
    if not isinstance(out, pl.DataFrame):  # pragma: no cover - a Table always gives a frame
        raise TypeError(f"expected a table, got {type(tbl).__name__}")
    return out


def _empty_of(data: Any) -> pa.Table:
    if isinstance(data, pl.DataFrame):
        return data.to_arrow().slice(0, 0)
    if isinstance(data, pa.Table):
        return data.slice(0, 0)
    return pa.table({"_empty": pa.array([], pa.int8())})
