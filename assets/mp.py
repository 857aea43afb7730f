"""Group ``mp``: Materials Project structures -> symmetry / Wyckoff ASU -> GAN training table.

Thin wrappers around :mod:`lib.mp_sources`, :mod:`lib.symmetry` and :mod:`lib.training`.
Parsing and symmetry analysis run as Ray tasks (``ray_runtime``; local unless ``RAY_ADDRESS``).
Tables (each an asset, checked against its contract in ``lib/contracts.py``): ``mp_structures``
and ``mp_structures_rejects`` (one multi-asset), ``mp_symmetry``, ``training_templates``.
"""

import time
from collections.abc import Iterator
from typing import Literal

import dagster as dg
import polars as pl

from assets._checks import build_contract_checks
from lib.mp_sources import load_mp_source
from lib.parallel import map_row_chunks
from lib.symmetry import analyse_symmetry, round_trip_reason, spacegroup_histogram
from lib.training import build_training_templates
from orchestration.resources import CgwganHome, MPSource, RayResource

GROUP = "mp"
ROUND_TRIP_MIN_RATE = 0.99


class MPStructuresConfig(dg.Config):
    n_workers: int = 0  # Ray tasks in flight; 0 = every Ray CPU


class MPSymmetryConfig(dg.Config):
    symprec: float = 0.1
    # structure_matcher (pymatgen, default) | direct (site mapping, cheaper) | none (no check, profiling)
    round_trip_method: Literal["structure_matcher", "direct", "none"] = "structure_matcher"
    n_workers: int = 0


class TrainingTemplatesConfig(dg.Config):
    min_asu_sites: int = 1
    max_asu_sites: int = 4
    exclude_chemical_systems: list[str] = []
    exclude_material_ids: list[str] = []
    exclude_subsystems: bool = False


def _counts_md(counts: dict[str, int]) -> str:
    if not counts:
        return "(none)"
    return "| reason | rows |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in counts.items())


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


@dg.multi_asset(name="mp_structures", specs=[
    dg.AssetSpec("mp_structures", group_name=GROUP, kinds={"parquet", "ray"},
                 description="Validated MP structures (source/snapshot id); bad rows go to mp_structures_rejects."),
    dg.AssetSpec("mp_structures_rejects", group_name=GROUP, kinds={"parquet"},
                 description="Input rows of the MP source that were not loaded, with the reason."),
])
def mp_structures(context: dg.AssetExecutionContext, config: MPStructuresConfig, cgwgan_home: CgwganHome,
                  mp_source: MPSource, ray_runtime: RayResource) -> Iterator[dg.MaterializeResult]:
    ray_runtime.init()
    chemsys = [s for s in mp_source.mp_api_chemsys.split(",") if s.strip()] or None
    t0 = time.perf_counter()
    loaded = load_mp_source(mp_source.resolved_source, api_key=mp_source.resolved_api_key,
                            chemsys=chemsys, max_parallel=config.n_workers, use_ray=True)
    seconds = time.perf_counter() - t0
    store = cgwgan_home.store
    meta = {"snapshot_id": loaded.snapshot_id, "source": loaded.source, "n_input": loaded.n_input}
    store.write("mp_structures", loaded.structures, metadata=meta)
    store.write("mp_structures_rejects", loaded.rejects, metadata=meta)
    cgwgan_home.refresh_catalog()
    by_reason = loaded.rejects_by_reason()
    context.log.info(f"{loaded.source}: {loaded.structures.height} structures, rejects {by_reason}")
    yield dg.MaterializeResult(asset_key="mp_structures", metadata={
        "source": loaded.source,
        "snapshot_id": loaded.snapshot_id,
        "dagster/row_count": loaded.structures.height,
        "n_input": loaded.n_input,
        "n_rejects": loaded.rejects.height,
        "rejects_by_reason": dg.MetadataValue.md(_counts_md(by_reason)),
        "seconds": round(seconds, 2),
        "structures_per_s": _rate(loaded.n_input, seconds),
        "parse_backend": loaded.parse_stats.backend if loaded.parse_stats else "none",
        "parse_workers": loaded.parse_stats.workers if loaded.parse_stats else 0,
        "n_chemical_systems": loaded.structures["chemical_system"].n_unique(),
    })
    yield dg.MaterializeResult(asset_key="mp_structures_rejects", metadata={
        "source": loaded.source,
        "snapshot_id": loaded.snapshot_id,
        "dagster/row_count": loaded.rejects.height,
        "rejects_by_reason": dg.MetadataValue.md(_counts_md(by_reason)),
    })


@dg.asset_check(asset="mp_structures", description="Every input row is either a structure or a reject.")
def mp_structures_rows_accounted(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    n_input = int((store.pointer("mp_structures") or {}).get("metadata", {}).get("n_input", -1))
    kept, rejected = store.rows("mp_structures"), store.rows("mp_structures_rejects")
    no_reason = store.read("mp_structures_rejects").filter(pl.col("reason").is_null()).height
    return dg.AssetCheckResult(
        passed=bool(kept + rejected == n_input and no_reason == 0),
        metadata={"n_input": n_input, "structures": kept, "rejects": rejected, "rejects_without_reason": no_reason})


@dg.asset(group_name=GROUP, kinds={"parquet", "ray"}, deps=["mp_structures"],
          description="Space group, conventional cell and Wyckoff ASU per structure, with a round-trip check.")
def mp_symmetry(context: dg.AssetExecutionContext, config: MPSymmetryConfig, cgwgan_home: CgwganHome,
                ray_runtime: RayResource) -> dg.MaterializeResult:
    ray_runtime.init()
    store = cgwgan_home.store
    structures = store.read("mp_structures")
    out, stats = map_row_chunks(analyse_symmetry, structures, max_parallel=config.n_workers, use_ray=True,
                                symprec=config.symprec, round_trip_method=config.round_trip_method)
    store.write("mp_symmetry", out, metadata={"symprec": config.symprec, "round_trip_method": config.round_trip_method})
    cgwgan_home.refresh_catalog()
    n_ok = int(out["is_round_trip_ok"].fill_null(False).sum())
    failures = (out.filter(~pl.col("is_round_trip_ok").fill_null(False))
                .group_by(round_trip_reason(pl.col("round_trip_error")).alias("reason")).len().sort("reason"))
    sg_counts = out.drop_nulls("spacegroup_number").group_by("spacegroup_number").len()
    context.log.info(f"{out.height} structures in {stats.seconds:.1f} s on {stats.workers} Ray worker(s)")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": out.height,
        "round_trip_ok": n_ok,
        "round_trip_rate": round(n_ok / out.height, 5) if out.height else 0.0,
        "round_trip_failures_by_reason": dg.MetadataValue.md(
            _counts_md(dict(zip(failures["reason"].to_list(), failures["len"].to_list(), strict=True)))),
        "round_trip_method": config.round_trip_method,
        "symprec": config.symprec,
        "seconds": round(stats.seconds, 2),
        "structures_per_s": round(stats.rows_per_s, 1),
        "backend": stats.backend,
        "workers": stats.workers,
        "n_spacegroups": sg_counts.height,
        "spacegroup_histogram": dg.MetadataValue.md(spacegroup_histogram(sg_counts)),
    })


@dg.asset_check(asset=mp_symmetry, description=f"At least {ROUND_TRIP_MIN_RATE:.0%} of structures round-trip "
                "through their ASU; every failure carries a reason.")
def mp_symmetry_round_trip_rate(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    df = cgwgan_home.store.read("mp_symmetry", columns=["is_round_trip_ok", "round_trip_error"])
    ok = df["is_round_trip_ok"].fill_null(False)  # null = not checked (round_trip_method "none")
    rate = float(ok.mean()) if df.height else 0.0
    unexplained = df.filter(~pl.col("is_round_trip_ok") & pl.col("round_trip_error").is_null()).height
    return dg.AssetCheckResult(passed=bool(rate >= ROUND_TRIP_MIN_RATE and unexplained == 0),
                               metadata={"round_trip_rate": rate, "rows": df.height,
                                         "failures_without_reason": unexplained})


@dg.asset_check(asset=mp_symmetry, description="One mp_symmetry row per mp_structures row, no duplicates.")
def mp_symmetry_covers_structures(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    sym = store.read("mp_symmetry", columns=["material_id"])["material_id"]
    src = store.read("mp_structures", columns=["material_id"])["material_id"]
    missing = int((~src.is_in(sym.implode())).sum())
    dup = int(sym.is_duplicated().sum())
    return dg.AssetCheckResult(passed=missing == 0 and dup == 0 and sym.len() == src.len(),
                               metadata={"structures": src.len(), "symmetry_rows": sym.len(),
                                         "missing": missing, "duplicated": dup})


@dg.asset(group_name=GROUP, kinds={"parquet"}, deps=[mp_symmetry],
          description="The GAN's training table: 1-4 ASU sites above P1, encoded, with hold-out filters.")
def training_templates(context: dg.AssetExecutionContext, config: TrainingTemplatesConfig,
                       cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    store = cgwgan_home.store
    symmetry = store.read("mp_symmetry")
    out, report = build_training_templates(
        symmetry, min_asu_sites=config.min_asu_sites, max_asu_sites=config.max_asu_sites,
        exclude_chemical_systems=config.exclude_chemical_systems,
        exclude_material_ids=config.exclude_material_ids, exclude_subsystems=config.exclude_subsystems)
    held = {"exclude_chemical_systems": config.exclude_chemical_systems,
            "exclude_material_ids": config.exclude_material_ids, "exclude_subsystems": config.exclude_subsystems}
    store.write("training_templates", out, metadata=held)
    cgwgan_home.refresh_catalog()
    version = out["encoding_version"][0] if out.height else ""
    sg_counts = out.group_by("spacegroup_number").len()
    sites = out.group_by("n_asu_sites").len().sort("n_asu_sites")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": out.height,
        "n_input": report.n_input,
        "removed_by_step": dg.MetadataValue.md(_counts_md(report.removed)),
        "encoding_version": version,
        "encoding_dim": int(out["encoding"].list.len().max() or 0) if out.height else 0,
        "rows_by_asu_sites": dg.MetadataValue.json(dict(zip(map(str, sites["n_asu_sites"].to_list()),
                                                            sites["len"].to_list(), strict=True))),
        "n_spacegroups": sg_counts.height,
        "held_out": dg.MetadataValue.json(held),
        "spacegroup_histogram": dg.MetadataValue.md(spacegroup_histogram(sg_counts)),
    })


@dg.asset_check(asset=training_templates, description="Encodings have one length and one version, values in "
                "[-1, 1]; held-out systems and ids are absent; all rows above P1 with 1..max ASU sites.")
def training_templates_valid(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    from lib.training import normalise_chemical_system

    store = cgwgan_home.store
    df = store.read("training_templates")
    held = (store.pointer("training_templates") or {}).get("metadata", {})
    systems = [normalise_chemical_system(s) for s in held.get("exclude_chemical_systems", [])]
    leaked = df.filter(pl.col("chemical_system").is_in(systems)
                       | pl.col("material_id").is_in(held.get("exclude_material_ids", []))).height
    lens = df["encoding"].list.len().unique().to_list()
    flat = df["encoding"].explode()
    in_range = bool(flat.is_empty() or (flat.abs().max() <= 1.0 + 1e-6))
    bad_rows = df.filter((pl.col("spacegroup_number") < 2) | (pl.col("n_asu_sites") < 1)).height
    versions = df["encoding_version"].unique().to_list()
    return dg.AssetCheckResult(
        passed=bool(len(lens) <= 1 and len(versions) <= 1 and in_range and leaked == 0 and bad_rows == 0),
        metadata={"rows": df.height, "encoding_lengths": str(lens), "versions": str(versions),
                  "values_in_range": in_range, "held_out_rows_present": leaked, "rows_p1_or_empty": bad_rows})


contract_checks = build_contract_checks(["mp_structures", "mp_structures_rejects", "mp_symmetry", "training_templates"])
