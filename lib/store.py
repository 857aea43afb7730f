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

Object storage: ``home`` may be an S3-compatible URL, ``s3://bucket/prefix`` (with
:class:`S3Options`: endpoint, credentials, region; no environment is read here). The layout is the
same, under the prefix; Parquet is written and read through ``pyarrow.fs.S3FileSystem``. The
atomic swap holds the same way: a write PUTs every shard under a fresh ``v-<version>/`` prefix
first, and only then uploads ``_CURRENT.json``, a small object, in one request sequence that S3
makes visible as a whole when it completes (a PUT, or pyarrow's CompleteMultipartUpload) and that
replaces the previous pointer whole: a reader sees the old pointer or the new one, never a part of
one, and S3's read-after-write consistency makes the new one visible to every reader at once. A
failure before that PUT leaves the old pointer, hence the old version, current; the fresh prefix
is deleted (or, after a crash, collected by the next write). On S3 ``scan``/``read`` go through a
``pyarrow.dataset`` of the current files and :meth:`TableStore.connect` registers one such Arrow
dataset per table in DuckDB (no ``httpfs`` extension, nothing downloaded). What needs a local
disk refuses an ``s3://`` store with :class:`LocalOnlyError` naming it: ``catalog.duckdb``
(:meth:`TableStore.refresh_catalog`, a file with a lock), ``view_sql`` (``read_parquet`` of
``s3://`` URLs needs ``httpfs``) and the ``Path`` helpers (``files``, ``partition_dir``, ...);
:meth:`TableStore.uris` names the current files on either kind of store.
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
import pyarrow.dataset as pads
import pyarrow.fs as pafs
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


def is_object_store_url(home: str | Path) -> bool:
    """Whether ``home`` names an S3-compatible object store (``s3://bucket[/prefix]``)."""
    return isinstance(home, str) and home.strip().lower().startswith("s3://")


class LocalOnlyError(NotImplementedError):
    """A store feature that needs a local folder, asked of an ``s3://`` store."""

    def __init__(self, feature: str, home: str, instead: str) -> None:
        super().__init__(f"{feature} needs a local folder; the store at {home} is an object store: {instead}")
        self.feature = feature


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible object store. Empty fields take the S3 defaults.

    ``endpoint``: ``http://host:port`` or ``https://host`` of an S3-compatible server (MinIO, Ceph,
    a local ``moto``); "" = AWS. ``access_key``/``secret_key``: "" = the AWS SDK's own credential
    chain (instance role, ``~/.aws``). ``region``: "" = ``us-east-1``.
    """

    endpoint: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    region: str = ""

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {"region": self.region or "us-east-1"}
        if self.endpoint:
            scheme, sep, host = self.endpoint.partition("://")
            if not sep:
                scheme, host = "https", self.endpoint
            if scheme not in ("http", "https") or not host.strip("/"):
                raise ValueError(f"bad S3 endpoint {self.endpoint!r}: use http://host:port or https://host")
            kwargs.update(endpoint_override=host.strip("/"), scheme=scheme)
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError("S3 credentials: give both the access key and the secret key, or neither")
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
        return pafs.S3FileSystem(**kwargs)


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

    ``home``: a local folder, or an ``s3://bucket/prefix`` URL reached with ``s3`` (see the module
    docstring; a local home is a resolved :class:`~pathlib.Path`, an S3 one stays a string).
    ``contracts``: table name -> contract checked on every write (default: every contract of
    :mod:`lib.contracts`); tables without one are written as they come.
    """

    home: Path | str
    contracts: Mapping[str, _contracts.Contract] = field(
        default_factory=lambda: _contracts.CONTRACTS, compare=False, repr=False)
    s3: S3Options | None = field(default=None, compare=False, repr=False)
    _fs: pafs.FileSystem | None = field(default=None, init=False, compare=False, repr=False)
    _root: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if is_object_store_url(self.home):
            url = str(self.home).strip()
            root = url[len("s3://"):].strip("/")
            if not root or root.startswith("/"):
                raise ValueError(f"bad object-store home {url!r}: use s3://bucket/prefix")
            object.__setattr__(self, "home", f"s3://{root}")
            object.__setattr__(self, "_fs", (self.s3 or S3Options()).filesystem())
            object.__setattr__(self, "_root", root)
        else:
            home = Path(self.home).expanduser().resolve()
            object.__setattr__(self, "home", home)
            object.__setattr__(self, "_root", str(home))

    @property
    def is_object_store(self) -> bool:
        return self._fs is not None

    def _local(self, feature: str, instead: str) -> Path:
        """The local home, or :class:`LocalOnlyError` naming ``feature`` on an object store."""
        if not isinstance(self.home, Path):
            raise LocalOnlyError(feature, str(self.home), instead)
        return self.home

    def _key(self, *parts: str) -> str:
        """A path under the home on the store's own filesystem (``bucket/prefix/...`` on S3)."""
        return "/".join((self._root, *parts))

    def _pkey(self, table: str, partition: str) -> str:
        _check_table(table)
        return self._key("tables", table, partition_dirname(partition))

    # ------------------------------------------------------------------ paths
    @property
    def tables_dir(self) -> Path:
        return self._local("tables_dir", "use uris()") / "tables"

    @property
    def catalog_path(self) -> Path:
        return self._local("catalog.duckdb", "use connect() for SQL") / "catalog.duckdb"

    def table_dir(self, table: str) -> Path:
        _check_table(table)
        return self.tables_dir / table

    def partition_dir(self, table: str, partition: str = DEFAULT_PARTITION) -> Path:
        return self.table_dir(table) / partition_dirname(partition)

    # ---------------------------------------------------------------- pointers
    def pointer(self, table: str, partition: str = DEFAULT_PARTITION) -> dict[str, Any] | None:
        if self._fs is not None:
            try:
                with self._fs.open_input_stream(f"{self._pkey(table, partition)}/{POINTER}") as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                return None
        p = self.partition_dir(table, partition) / POINTER
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def _pointer_keys(self, under: str) -> list[str]:
        """Object store: the pointer objects ``<under>/.../_CURRENT.json``, sorted."""
        assert self._fs is not None
        sel = pafs.FileSelector(under, recursive=True, allow_not_found=True)
        return sorted(i.path for i in self._fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.base_name == POINTER)

    def tables(self) -> list[str]:
        if self._fs is not None:
            tables_key = self._key("tables")
            depth = tables_key.count("/") + 3  # tables/<table>/<partition>/_CURRENT.json
            return sorted({k.split("/")[depth - 2] for k in self._pointer_keys(tables_key)
                           if k.count("/") == depth})
        if not self.tables_dir.exists():
            return []
        return sorted(
            d.name for d in self.tables_dir.iterdir() if d.is_dir() and any(d.glob(f"*/{POINTER}"))
        )

    def partitions(self, table: str) -> list[str]:
        if self._fs is not None:
            _check_table(table)
            tkey = self._key("tables", table)
            out = []
            for k in self._pointer_keys(tkey):
                if k.count("/") == tkey.count("/") + 2:  # <table>/<partition>/_CURRENT.json
                    with self._fs.open_input_stream(k) as f:
                        out.append(json.loads(f.read())["partition"])
            return out
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
        self._local("files()", "use uris() (s3:// URLs), scan() or connect()")
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

    def _file_keys(self, table: str, partition: str | None = None) -> list[str]:
        """Like :meth:`files`, as paths on the store's filesystem (``bucket/prefix/...`` on S3)."""
        if self._fs is None:
            return [str(f) for f in self.files(table, partition)]
        parts = self.partitions(table) if partition is None else [partition]
        out: list[str] = []
        for part in parts:
            ptr = self.pointer(table, part)
            if ptr is None:
                raise FileNotFoundError(
                    f"table {table!r} partition {part!r} has not been written under {self.home}"
                )
            out.extend(f"{self._pkey(table, part)}/{ptr['version']}/{f}" for f in ptr["files"])
        return out

    def shard_schemas(self, table: str, partition: str | None = None) -> list[dict[str, pl.DataType]]:
        """The polars schema of every current Parquet file (local or on S3), for contract checks."""
        if self._fs is None:
            return [pl.read_parquet_schema(f) for f in self.files(table, partition)]
        return [dict(pl.DataFrame(pq.read_schema(k, filesystem=self._fs).empty_table()).schema)
                for k in self._file_keys(table, partition)]

    def uris(self, table: str, partition: str | None = None) -> list[str]:
        """The current Parquet files as strings: local paths, or ``s3://`` URLs on S3."""
        keys = self._file_keys(table, partition)
        return keys if self._fs is None else [f"s3://{k}" for k in keys]

    def dataset(self, table: str, partition: str | None = None) -> pads.Dataset:
        """A ``pyarrow.dataset`` over the current files (on the store's filesystem), its schema
        the union of each partition's (columns missing from a partition read as null)."""
        parts = self.partitions(table) if partition is None else [partition]
        keys: list[str] = []
        schemas: list[pa.Schema] = []
        for part in parts:
            part_keys = self._file_keys(table, part)
            if part_keys:
                schemas.append(pq.read_schema(part_keys[0], filesystem=self._fs))
            keys.extend(part_keys)
        if not keys:
            raise FileNotFoundError(f"table {table!r} has no data under {self.home}")
        schema = pa.unify_schemas(schemas) if len(schemas) > 1 else schemas[0]
        return pads.dataset(keys, schema=schema, format="parquet", filesystem=self._fs)

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
        version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if self._fs is not None:
            return self._write_object_store(table, data, partition=partition, version=version, check=check,
                                            contract=contract, max_rows_per_shard=max_rows_per_shard,
                                            metadata=metadata, compression_level=compression_level)
        pdir = self.partition_dir(table, partition)
        pdir.mkdir(parents=True, exist_ok=True)
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

    def _write_object_store(
        self, table: str, data: pl.DataFrame | pa.Table | Iterable[pl.DataFrame | pa.Table], *,
        partition: str, version: str, check: Any, contract: _contracts.Contract | None,
        max_rows_per_shard: int, metadata: dict[str, Any] | None, compression_level: int,
    ) -> WriteInfo:
        """:meth:`write` on S3: shards under a fresh version prefix, then one PUT of the pointer."""
        fs = self._fs
        assert fs is not None
        pkey = self._pkey(table, partition)
        vkey = f"{pkey}/{version}"
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
                pq.write_table(chunk, f"{vkey}/{name}", filesystem=fs, compression="zstd",
                               compression_level=compression_level)
                files.append(name)
                rows += chunk.num_rows
            if check is not None:
                check.finish()  # keys over every chunk, before the commit point
            if not files:  # keep the schema visible even for an empty result
                if schema is None and contract is not None:
                    schema = contract.empty().to_arrow().schema
                empty = schema.empty_table() if schema is not None else _empty_of(data)
                pq.write_table(empty, f"{vkey}/part-00000.parquet", filesystem=fs, compression="zstd")
                files.append("part-00000.parquet")
            size = sum(i.size or 0 for i in fs.get_file_info([f"{vkey}/{f}" for f in files]))
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
            body = json.dumps(ptr, indent=1, default=str).encode()
            with fs.open_output_stream(f"{pkey}/{POINTER}") as out:  # the commit point: one object
                out.write(body)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_dir(vkey)
            raise
        self._collect_garbage_object_store(pkey, keep=version)
        return WriteInfo(table, partition, version, rows, tuple(f"s3://{vkey}/{f}" for f in files), size)

    def _collect_garbage_object_store(self, pkey: str, *, keep: str) -> None:
        assert self._fs is not None
        for info in self._fs.get_file_info(pafs.FileSelector(pkey, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("v-") and info.base_name != keep:
                with contextlib.suppress(OSError):
                    self._fs.delete_dir(info.path)

    def delete_partition(self, table: str, partition: str) -> None:
        if self._fs is not None:
            pkey = self._pkey(table, partition)
            with contextlib.suppress(FileNotFoundError):
                self._fs.delete_file(f"{pkey}/{POINTER}")  # readers stop seeing it first
            with contextlib.suppress(FileNotFoundError):
                self._fs.delete_dir(pkey)
            return
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
        if self._fs is not None:
            return pl.scan_pyarrow_dataset(self.dataset(table, partition))
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
        self._local("view_sql()", "read_parquet of s3:// URLs needs DuckDB's httpfs; use connect()")
        files = ", ".join(f"'{f}'" for f in self.files(table))
        return (f"CREATE OR REPLACE VIEW \"{table}\" AS SELECT * FROM read_parquet([{files}], "
                f"union_by_name = true)")

    def connect(self, *, extra_sql: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with one view per table (no file lock needed).

        On S3 each table is an Arrow dataset registered by name (:meth:`dataset`): DuckDB scans it
        through pyarrow's S3 filesystem, with column and filter push-down, and needs no extension.
        """
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
        home = self._local("refresh_catalog() (catalog.duckdb and its file lock)",
                           "use connect() for in-memory views over the S3 tables")
        home.mkdir(parents=True, exist_ok=True)
        with open(home / ".catalog.lock", "w") as lock:
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
        if store.is_object_store:
            con.register(table, store.dataset(table))
        else:
            con.execute(store.view_sql(table))


def _check_table(table: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", table):
        raise ValueError(f"bad table name {table!r}: use lower_snake_case")


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
