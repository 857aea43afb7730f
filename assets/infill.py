"""Group ``infill``: templates -> candidates of a chemical system -> deduplicated, MP-flagged candidates.

Thin wrappers around :mod:`lib.infill` (columnar infill, streamed into the store shard by shard)
and :mod:`lib.dedup` (fingerprint + bucketed StructureMatcher in worker processes + MP matching).
All assets are partitioned by chemical system (``Ba-O-Ru``); the store partition is the same string.
Tables (each an asset, checked against its contract in ``lib/contracts.py``): ``candidates`` and
``candidates_template_rejects`` (one multi-asset), ``candidates_dedup``.
"""


import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl

from assets._checks import build_contract_checks
from assets.partitions import chemical_system_partitions
from lib.dedup import MATCHER_DEFAULTS, apply_dedup, dedup_candidates
from lib.infill import InfillTotals, chemical_system, iter_infill, parse_chemical_system
from orchestration.resources import CgwganHome, RayResource

GROUP = "infill"
#: Rows per Parquet shard: shards cover disjoint template_id ranges, so a lookup reads one.
SHARD_ROWS = 100_000


class CandidatesConfig(dg.Config):
    elements: list[str] = []  # empty = the partition's elements; else must name the same system
    require_all_elements: bool = True
    allow_subsystems: bool = False
    max_atoms: int = 0  # 0 = no limit (atoms in the conventional cell)
    volume_mode: Literal["template", "rescaled"] = "template"
    templates_partition: str = ""  # generation run of `templates`; "" = the newest; "*" = every run
    batch_templates: int = 20_000


class CandidatesDedupConfig(dg.Config):
    mp_reference_path: str = ""  # a CSV/Parquet/folder in an MP layout; "" = the mp_structures table
    # within the system: near-identical duplicates (lib.dedup.MATCHER_DEFAULTS); MP: pymatgen defaults
    ltol: float = MATCHER_DEFAULTS["ltol"]
    stol: float = MATCHER_DEFAULTS["stol"]
    angle_tol: float = MATCHER_DEFAULTS["angle_tol"]
    # pre-screen: 0 = the bound derived from ltol/stol/angle_tol (skips only pairs that cannot
    # match); > 0 = a fixed window on the scaled orbit distances (faster, misses matches)
    distance_window: float = 0.0
    workers: int = 0  # local worker processes for the matcher; 0 = every CPU of the machine
    use_ray: bool = False  # match buckets as Ray tasks on the Ray runtime instead of local processes


def _elements_for(context: dg.AssetExecutionContext, override: list[str]) -> list[str]:
    elements = parse_chemical_system(context.partition_key)
    if override and chemical_system(override) != "-".join(elements):
        raise dg.Failure(f"config elements {override} name the system {chemical_system(override)}, "
                         f"but this run is for partition {context.partition_key!r}")
    return elements


def _templates_scan(cgwgan_home: CgwganHome, generation: str) -> tuple[pl.LazyFrame, str]:
    store = cgwgan_home.store
    parts = store.partitions("templates")
    if not parts:
        raise dg.Failure(f"no `templates` table under {store.home}: materialise `templates` first")
    if generation == "*":
        return store.scan("templates"), "*"
    if not generation:
        generation = max(parts, key=lambda p: (store.pointer("templates", p) or {}).get("written_at", ""))
    if generation not in parts:
        raise dg.Failure(f"templates partition {generation!r} not found; runs: {parts}")
    return store.scan("templates", generation), generation


def _sg_plot(by_sg: pl.DataFrame) -> str:
    from lib.plots import figure_markdown, subplots

    fig, ax = subplots(figsize=(7, 2.8))
    ax.bar([str(s) for s in by_sg["spacegroup_number"]], by_sg["len"].to_list(), color="#4878a8")
    ax.set_xlabel("space group number")
    ax.set_ylabel("candidates")
    ax.set_title("candidates by space group (top 20)")
    ax.tick_params(axis="x", labelrotation=90)
    return figure_markdown(fig, alt="candidates by space group")


def _md_table(df: pl.DataFrame) -> str:
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


@dg.multi_asset(name="candidates", partitions_def=chemical_system_partitions, specs=[
    dg.AssetSpec("candidates", group_name=GROUP, kinds={"parquet", "duckdb"}, deps=["templates"],
                 description="Templates filled with the elements of a chemical system: one row per distinct "
                             "assignment (site-permutation symmetry and fingerprint folded), Parquet shards."),
    dg.AssetSpec("candidates_template_rejects", group_name=GROUP, kinds={"parquet"}, deps=["templates"],
                 description="Templates the infill of a chemical system could not use, with the reason."),
])
def candidates(context: dg.AssetExecutionContext, config: CandidatesConfig,
               cgwgan_home: CgwganHome) -> Iterator[dg.MaterializeResult]:
    elements = _elements_for(context, config.elements)
    chemsys = "-".join(elements)
    scan, generation = _templates_scan(cgwgan_home, config.templates_partition)
    totals = InfillTotals()
    t0 = time.perf_counter()
    stream = iter_infill(scan, elements=elements, require_all_elements=config.require_all_elements,
                         allow_subsystems=config.allow_subsystems, max_atoms=config.max_atoms or None,
                         volume_mode=config.volume_mode, batch_templates=config.batch_templates, totals=totals)
    info = cgwgan_home.store.write("candidates", stream, partition=chemsys, max_rows_per_shard=SHARD_ROWS,
                                   metadata={"templates_partition": generation, **totals.counts()})
    seconds = time.perf_counter() - t0
    rejects = totals.rejects_frame()
    cgwgan_home.store.write("candidates_template_rejects", rejects, partition=chemsys)
    cgwgan_home.refresh_catalog()
    by_sg = (cgwgan_home.store.scan("candidates", chemsys).group_by("spacegroup_number").len()
             .sort("len", descending=True).head(20).collect())
    context.log.info(f"{chemsys}: {info.rows} candidates from {totals.n_templates} templates in {seconds:.1f} s")
    yield dg.MaterializeResult(asset_key="candidates", metadata={
        "rows": info.rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(info.rows / seconds, 1) if seconds > 0 else 0.0,
        "bytes_on_disk": info.bytes_on_disk,
        "shards": len(info.files),
        "templates_partition": generation,
        "n_templates": totals.n_templates,
        "n_templates_rejected": totals.n_rejected,
        "n_templates_too_few_sites": totals.n_templates_too_few_sites,
        "n_templates_filtered_max_atoms": totals.n_templates_filtered_max_atoms,
        "n_assignments": totals.n_assignments,
        "n_folded_symmetry": totals.n_folded_symmetry,
        "n_folded_fingerprint": totals.n_folded_fingerprint,
        "volume_mode": config.volume_mode,
        "top_space_groups": dg.MetadataValue.md(_md_table(by_sg.rename({"len": "candidates"}))),
        "space_group_plot": dg.MetadataValue.md(_sg_plot(by_sg) if by_sg.height else "(no candidates)"),
    })
    by_reason = rejects.group_by("reason").len().sort("reason")
    yield dg.MaterializeResult(asset_key="candidates_template_rejects", metadata={
        "rows": rejects.height,
        "templates_partition": generation,
        "rejects_by_reason": dg.MetadataValue.md(
            _md_table(by_reason.rename({"len": "templates"})) if rejects.height else "(none)"),
    })


def _mp_reference(cgwgan_home: CgwganHome, path: str) -> tuple[pl.DataFrame | None, str]:
    if path:
        from lib.mp_sources import load_mp_source

        loaded = load_mp_source(str(Path(path).expanduser()))
        return loaded.structures, f"file:{path}"
    if cgwgan_home.store.exists("mp_structures"):
        return cgwgan_home.store.read("mp_structures"), "table:mp_structures"
    return None, "none"


@dg.asset(group_name=GROUP, kinds={"parquet", "pymatgen"}, deps=["candidates"],
          partitions_def=chemical_system_partitions,
          description="One row per unique candidate (fingerprint, then StructureMatcher in buckets), "
                      "with n_folded and the MP material it matches (is_known_in_mp, mp_material_id).")
def candidates_dedup(context: dg.AssetExecutionContext, config: CandidatesDedupConfig,
                     cgwgan_home: CgwganHome, ray_runtime: RayResource) -> dg.MaterializeResult:
    elements = _elements_for(context, [])
    chemsys = "-".join(elements)
    store = cgwgan_home.store
    if config.use_ray:
        ray_runtime.init()
    mp, mp_label = _mp_reference(cgwgan_home, config.mp_reference_path)
    t0 = time.perf_counter()
    res = dedup_candidates(store.scan("candidates", chemsys), mp_structures=mp, elements=elements,
                           matcher={"ltol": config.ltol, "stol": config.stol, "angle_tol": config.angle_tol},
                           distance_window=config.distance_window or None,
                           workers=config.workers or os.cpu_count() or 1, use_ray=config.use_ray)
    unique = res.unique

    def frames():
        for f in store.files("candidates", chemsys):
            yield apply_dedup(pl.read_parquet(f), unique)

    info = store.write("candidates_dedup", frames(), partition=chemsys,
                       metadata={"mp_reference": mp_label, **res.counts()})
    seconds = time.perf_counter() - t0
    cgwgan_home.refresh_catalog()
    hits = res.mp_matches_by_material
    return dg.MaterializeResult(metadata={
        "rows": info.rows,
        "input_rows": res.n_input,
        "seconds": round(seconds, 2),
        "rows_per_s": round(res.n_input / seconds, 1) if seconds > 0 else 0.0,
        "bytes_on_disk": info.bytes_on_disk,
        "n_folded_fingerprint": res.n_folded_fingerprint,
        "n_folded_matcher": res.n_folded_matcher,
        "n_buckets": res.n_buckets,
        "largest_bucket": res.largest_bucket,
        "structure_matcher_pairs_compared": res.n_pairs_compared,
        "pairs_in_buckets": res.n_pairs_in_buckets,
        "pairs_screened_out": res.n_pairs_screened_out,
        "pairs_skipped_primitive_or_folded": res.n_pairs_skipped_primitive + res.n_pairs_skipped_folded,
        "structures_reduced": res.n_structures_reduced,
        "prescreen": res.prescreen,
        "matcher_backend": f"{res.backend} x{res.workers}",
        "mp_reference": mp_label,
        "n_mp_references": res.n_mp_references,
        "mp_pairs_compared": res.n_mp_pairs_compared,
        "mp_matches": res.n_mp_matches,
        "mp_matches_by_material": dg.MetadataValue.md(
            _md_table(pl.DataFrame({"material_id": list(hits), "candidates": list(hits.values())},
                                   schema={"material_id": pl.String, "candidates": pl.Int64}))
            if hits else "(none)"),
    })


# ----------------------------------------------------------------------------- checks
def _check_partitions(cgwgan_home: CgwganHome, table: str) -> tuple[list[str], dict]:
    store = cgwgan_home.store
    parts = store.partitions(table)
    out: dict = {"partitions": len(parts), "rows": 0, "duplicate_ids": 0, "null_fingerprints": 0,
                 "foreign_elements": 0, "wrong_chemical_system": 0}
    failed: list[str] = []
    con = store.connect()
    for p in parts:
        files = ", ".join(f"'{f}'" for f in store.files(table, p))
        row = con.execute(f"""
            SELECT count(*), count(*) - count(DISTINCT candidate_id), count(*) - count(fingerprint),
                   count(*) FILTER (WHERE NOT list_has_all(string_split(?, '-'), asu_species)),
                   count(*) FILTER (WHERE chemical_system <> ?)
            FROM read_parquet([{files}])""", [p, p]).fetchone()
        n, dup, nullfp, foreign, wrong = (int(x or 0) for x in row)
        out["rows"] += n
        out["duplicate_ids"] += dup
        out["null_fingerprints"] += nullfp
        out["foreign_elements"] += foreign
        out["wrong_chemical_system"] += wrong
        if dup or nullfp or foreign or wrong:
            failed.append(p)
    con.close()
    return failed, out


def _make_check(asset_key: str, name: str, fields: tuple[str, ...], description: str):
    @dg.asset_check(asset=asset_key, name=name, description=description)
    def _check(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
        if not cgwgan_home.store.exists(asset_key):
            return dg.AssetCheckResult(passed=False, metadata={"reason": f"{asset_key} has not been written"})
        failed, stats = _check_partitions(cgwgan_home, asset_key)
        bad = {k: stats[k] for k in fields}
        passed = not any(bad.values())
        return dg.AssetCheckResult(passed=passed, metadata={
            **stats, "failing_partitions": ", ".join(failed) if not passed else "", "checked": ", ".join(fields)})

    return _check


# candidate_id unique within every partition and fingerprints present: <table>_matches_contract
candidates_in_system = _make_check(
    "candidates", "candidates_in_system", ("foreign_elements", "wrong_chemical_system"),
    "Every candidate's ASU species are elements of its partition's chemical system.")
candidates_dedup_in_system = _make_check(
    "candidates_dedup", "candidates_dedup_in_system", ("foreign_elements", "wrong_chemical_system"),
    "Every deduplicated candidate uses only its system's elements.")


@dg.asset_check(asset="candidates_dedup", description="The dedup rows plus the folded counts add up to the "
                "candidates table, partition by partition, and the MP flag agrees with mp_material_id.")
def candidates_dedup_accounts_for_every_candidate(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    if not store.exists("candidates_dedup"):
        return dg.AssetCheckResult(passed=False, metadata={"reason": "candidates_dedup has not been written"})
    bad, meta = [], {}
    for p in store.partitions("candidates_dedup"):
        n_in = store.rows("candidates", p)
        d = store.read("candidates_dedup", p, columns=["n_folded", "is_known_in_mp", "mp_material_id"])
        total = d.height + int(d["n_folded"].sum() or 0)
        flag_ok = bool((d["is_known_in_mp"] == d["mp_material_id"].is_not_null()).all()) if d.height else True
        meta[p] = f"{d.height} unique + {total - d.height} folded = {total} of {n_in}; mp flags consistent: {flag_ok}"
        if total != n_in or not flag_ok:
            bad.append(p)
    return dg.AssetCheckResult(passed=not bad, metadata={**meta, "failing_partitions": ", ".join(bad)})


contract_checks = build_contract_checks(["candidates", "candidates_template_rejects", "candidates_dedup"])
