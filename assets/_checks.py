"""Asset checks generated from the table contracts (:mod:`lib.contracts`).

``build_contract_checks(["mp_structures", ...])`` gives one ``<table>_matches_contract`` check per
table, on the asset that writes it (``Contract.asset``, the table name unless the contract says
otherwise): it reads the current version of every partition and
checks the columns and dtypes against the contract (missing, wrong dtype, extra where not
allowed), nulls in key and other non-null columns, and that the primary key is unique within each
partition. Every stage module registers the checks of its tables in one line.

The store already refuses writes that break a contract; the checks catch what did not go through
the store (tables written by an older version of the code, files edited or replaced by hand) and
show the contract in the UI.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from lib import contracts
from lib.contracts import Contract, Violation
from orchestration.resources import CgwganHome


def _partition_violations(store, c: Contract, partition: str) -> list[Violation]:
    """Schema violations of every shard, then nulls and duplicated keys over the partition."""
    schemas = store.shard_schemas(c.table, partition)
    found: list[Violation] = []
    for s in schemas:
        found.extend(v for v in c.schema_violations(s, partition=partition) if v not in found)
    cols = [n for n in dict.fromkeys((*c.primary_key, *c.non_null_columns)) if all(n in s for s in schemas)]
    if cols:
        frame = store.scan(c.table, partition).select(cols).collect()
        found += c.null_violations(frame, partition=partition) + c.key_violations(frame, partition=partition)
    return found


def contract_check(table: str) -> dg.AssetChecksDefinition:
    """The ``<table>_matches_contract`` check of one table."""
    c = contracts.get(table)
    key = ", ".join(c.primary_key) or "none"

    @dg.asset_check(asset=dg.AssetKey(c.asset), name=f"{table}_matches_contract",
                    description=f"Every partition of {table} matches its contract (lib/contracts.py): "
                                f"{len(c.columns)} columns with their dtypes"
                                + ("" if c.extra_columns_allowed else ", no others")
                                + f", key ({key}) unique and non-null within a partition.")
    def _check(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
        store = cgwgan_home.store
        parts = store.partitions(table)
        meta: dict = {"primary_key": key, "partition_key": c.partition_key or "none",
                      "contract_columns": len(c.columns), "partitions": len(parts)}
        if not parts:
            return dg.AssetCheckResult(passed=False, metadata={**meta, "reason": f"{table} has not been written"})
        found: list[Violation] = []
        rows = 0
        failing = []
        for p in parts:
            v = _partition_violations(store, c, p)
            rows += store.rows(table, p)
            if v:
                failing.append(p)
                found += v
        kinds = {"missing_columns": "missing", "wrong_dtypes": "dtype", "extra_columns": "not in the contract",
                 "null_values": "null value", "duplicated_keys": "primary key duplicated"}
        counts = {k: sum(1 for v in found if reason in v.reason) for k, reason in kinds.items()}
        return dg.AssetCheckResult(passed=not found, metadata={
            **meta, "rows": rows, **counts, "failing_partitions": ", ".join(failing[:50]),
            "violations": dg.MetadataValue.md("\n".join(f"- {v}" for v in found[:50]) or "(none)")})

    return _check


def build_contract_checks(tables: Sequence[str]) -> list[dg.AssetChecksDefinition]:
    """One ``<table>_matches_contract`` check per table."""
    return [contract_check(t) for t in tables]
