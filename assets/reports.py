"""Group ``reports``: simulated powder XRD of the shortlisted and discovered crystals, and the
discovery report of a chemical system.

``xrd_patterns`` reads the tables named in its config (default: every partition of ``shortlist``,
plus ``discoveries`` when present), rebuilds each crystal (relaxed cell from ``relaxed`` for
shortlist rows; DFT final cell for discoveries), and writes one row per peak (Cu Kα) to
``xrd_patterns`` and the pairwise pattern similarity to ``xrd_similarity``, so near-identical
polymorphs can be told apart (the paper's Fig. 5H). Thin wrapper around :mod:`lib.xrd`.
Both tables are assets of one multi-asset, checked against their contracts in ``lib/contracts.py``.

``discovery_report`` (per chemical system) writes ``<home>/reports/discovery-<system>.html``, one
self-contained HTML file (:mod:`lib.report`; the same as ``cgwgan report --system``).
"""

import time
from collections.abc import Iterator
from typing import Literal

import dagster as dg
import polars as pl

from assets._checks import build_contract_checks
from assets.partitions import chemical_system_partitions
from lib.cells import CELL_COLUMNS
from lib.export import attach_structures, has_structure_columns
from lib.plots import figure_markdown
from lib.report import write_report
from lib.xrd import plot_patterns, xrd_report
from orchestration.resources import CgwganHome

GROUP = "reports"
#: Where rows without a cell get one (shortlist rows: the relaxed cell of the same surrogate).
STRUCTURE_SOURCES = ("relaxed", "candidates_dedup", "candidates")


class XrdConfig(dg.Config):
    tables: list[str] = ["shortlist", "discoveries"]
    """Tables whose crystals get a pattern (any table with, or linked by candidate_id to, structures)."""
    required_tables: list[str] = ["shortlist"]
    """Tables that must exist: the run fails naming the missing one instead of writing an empty result."""
    max_structures_per_table: int = 500
    """Rows taken from each table (in its stored order; the shortlist is ranked)."""
    wavelength: Literal["CuKa", "CuKa1", "CuKa2", "CuKb1", "MoKa", "MoKa1", "MoKa2", "MoKb1", "CrKa", "CrKa1",
                        "CrKa2", "CrKb1", "FeKa", "FeKa1", "FeKa2", "FeKb1", "CoKa", "CoKa1", "CoKa2", "CoKb1",
                        "AgKa", "AgKa1", "AgKa2", "AgKb1"] = "CuKa"
    """X-ray source line (pymatgen's ``WAVELENGTHS``)."""
    two_theta_min_deg: float = 10.0
    two_theta_max_deg: float = 90.0
    fwhm_deg: float = 0.2
    """Gaussian FWHM used for the similarity and the plot (the stored peaks are not broadened)."""
    max_plotted: int = 12


def _selection(store, table: str, limit: int) -> pl.DataFrame:
    df = store.scan(table).head(limit).collect()
    if "result_id" in df.columns and not has_structure_columns(df) and store.exists("dft_results"):
        # a DFT result's pattern is of its DFT-relaxed cell (dft_results); rows without one fall back below
        cells = store.scan("dft_results").filter(
            pl.col("result_id").is_in(df["result_id"].unique().implode()) & pl.col("lattice_matrix").is_not_null()
        ).select("result_id", *CELL_COLUMNS).unique("result_id", keep="last", maintain_order=True).collect()
        df = df.with_row_index("_order")
        with_dft = df.join(cells, on="result_id", how="inner")
        rest = df.join(cells.select("result_id"), on="result_id", how="anti")
        return pl.concat([with_dft, _selection_frame(store, table, rest)], how="diagonal_relaxed").sort(
            "_order").drop("_order")
    return _selection_frame(store, table, df)


def _selection_frame(store, table: str, df: pl.DataFrame) -> pl.DataFrame:
    if "candidate_id" in df.columns:
        ids = df["candidate_id"].unique().implode()
        sources = [store.scan(t).filter(pl.col("candidate_id").is_in(ids)).collect()
                   for t in STRUCTURE_SOURCES if t != table and store.exists(t)]
        df = attach_structures(df, sources)
    return df


@dg.multi_asset(name="xrd_patterns", specs=[
    dg.AssetSpec("xrd_patterns", group_name=GROUP, kinds={"parquet", "pymatgen"}, deps=["shortlist", "discoveries"],
                 description="Simulated powder XRD (Cu Kα) of shortlisted and discovered crystals, one row per peak."),
    dg.AssetSpec("xrd_similarity", group_name=GROUP, kinds={"parquet"}, deps=["shortlist", "discoveries"],
                 description="Pairwise cosine similarity of the broadened XRD patterns (tells near-identical "
                             "polymorphs apart), most similar first."),
])
def xrd_patterns_asset(context: dg.AssetExecutionContext, config: XrdConfig,
                       cgwgan_home: CgwganHome) -> Iterator[dg.MaterializeResult]:
    store = cgwgan_home.store
    missing = [t for t in config.required_tables if not store.exists(t)]
    if missing:
        raise dg.Failure(
            description=f"xrd_patterns needs the table(s) {', '.join(missing)}, absent under {store.home}: "
                        "materialise them first, or change `required_tables` in the run config.",
            metadata={"missing_tables": ", ".join(missing), "home": str(store.home)})
    t0 = time.perf_counter()
    selections = {}
    for table in config.tables:
        if store.exists(table):
            selections[table] = _selection(store, table, config.max_structures_per_table)
        else:
            context.log.info(f"{table}: not materialised yet, skipped (not required)")
    if not selections:
        raise dg.Failure(description=f"none of the tables {config.tables} exists under {store.home}")
    two_theta = (config.two_theta_min_deg, config.two_theta_max_deg)
    report = xrd_report(selections, wavelength=config.wavelength, two_theta_range=two_theta,
                        fwhm_deg=config.fwhm_deg)
    for table, counts in report.per_table.items():
        context.log.info(f"{table}: {counts['patterns']} patterns, {counts['failed']} rows could not be rebuilt")
    store.write("xrd_patterns", report.peaks,
                metadata={"settings": config.model_dump(), "failures": report.failures})
    store.write("xrd_similarity", report.similarity, metadata={"fwhm_deg": config.fwhm_deg})
    cgwgan_home.refresh_catalog()
    seconds = time.perf_counter() - t0

    fig = plot_patterns(report.peaks.select(pl.col("pattern_id").alias("candidate_id"), "two_theta_deg",
                                            "intensity"),
                        labels=report.labels, max_patterns=config.max_plotted, two_theta_range=two_theta,
                        fwhm_deg=config.fwhm_deg,
                        title="Simulated powder XRD ("
                              + ("Cu Kα" if config.wavelength == "CuKa" else config.wavelength) + ")")
    top = report.similarity.head(5)
    top_md = "| pattern a | pattern b | cosine similarity |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {s:.3f} |" for a, b, s in top.iter_rows()) if top.height else "(fewer than 2 patterns)"
    fail_md = "\n".join(f"- `{t}` `{rid}`: {why}" for t, rid, why in report.failures[:20]) or "(none)"
    n_patterns = report.n_patterns
    yield dg.MaterializeResult(asset_key="xrd_patterns", metadata={
        "dagster/row_count": report.peaks.height,
        "n_patterns": n_patterns,
        "per_table": dg.MetadataValue.json(report.per_table),
        "n_rows_not_rebuilt": len(report.failures),
        "rows_not_rebuilt": dg.MetadataValue.md(fail_md),
        "wavelength": config.wavelength,
        "two_theta_range_deg": f"{config.two_theta_min_deg}-{config.two_theta_max_deg}",
        "most_similar_pairs": dg.MetadataValue.md(top_md),
        "seconds": round(seconds, 2),
        "patterns_per_s": round(n_patterns / seconds, 1) if seconds > 0 else 0.0,
        "xrd_plot": dg.MetadataValue.md(figure_markdown(fig, alt="simulated powder XRD patterns")),
    })
    yield dg.MaterializeResult(asset_key="xrd_similarity", metadata={
        "dagster/row_count": report.similarity.height,
        "n_patterns": n_patterns,
        "fwhm_deg": config.fwhm_deg,
        "most_similar_pairs": dg.MetadataValue.md(top_md),
    })


@dg.asset_check(asset=dg.AssetKey("xrd_patterns"),
                description="Every selected crystal was rebuilt and has peaks, and each pattern's "
                            "strongest peak is scaled to 100.")
def xrd_patterns_complete(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    df = store.read("xrd_patterns", columns=["pattern_id", "intensity"])
    ptr = store.pointer("xrd_patterns") or {}
    n_failed = len(ptr.get("metadata", {}).get("failures", []))
    per = df.group_by("pattern_id").agg(pl.col("intensity").max().alias("max_i"), pl.len().alias("n"))
    bad_scale = per.filter((pl.col("max_i") - 100.0).abs() > 1e-6).height
    return dg.AssetCheckResult(
        passed=bool(n_failed == 0 and bad_scale == 0 and per.height > 0),
        metadata={"patterns": per.height, "rows_not_rebuilt": n_failed,
                  "patterns_not_scaled_to_100": bad_scale,
                  "min_peaks_per_pattern": int(per.select(pl.col("n").min()).item()) if per.height else 0})


contract_checks = build_contract_checks(["xrd_patterns", "xrd_similarity"])


class DiscoveryReportConfig(dg.Config):
    surrogate: str = ""
    """Whose shortlist ranks the candidates; "" = the newest shortlist of the system."""
    top_n: int = 10
    """Distinct candidates shown."""


@dg.asset(
    group_name=GROUP, kinds={"html"}, partitions_def=chemical_system_partitions,
    deps=[dg.AssetDep("shortlist", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("chemical_system")),
          "discoveries"],
    description="One self-contained HTML discovery report of the chemical system (lib.report): lineage, "
                "funnel, hull, energies, the top distinct candidates with their phonon, novelty and DFT "
                "verdicts and CIFs. Written to <home>/reports/discovery-<system>.html.")
def discovery_report(context: dg.AssetExecutionContext, config: DiscoveryReportConfig,
                     cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    chemsys = context.partition_key
    out = cgwgan_home.path / "reports" / f"discovery-{chemsys}.html"
    t0 = time.perf_counter()
    try:
        res = write_report(cgwgan_home.store, out, chemical_system=chemsys, surrogate=config.surrogate or None,
                           top_n=config.top_n)
    except ValueError as exc:
        raise dg.Failure(description=str(exc)) from exc
    funnel_md = "| stage | count | note |\n|---|---|---|\n" + "\n".join(
        f"| {r['stage']} | {r['count'] if r['count'] is not None else '—'} | {r['note']} |" for r in res.funnel)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(res.path)),
        "bytes": res.path.stat().st_size,
        "surrogates": ", ".join(res.surrogates),
        "n_candidates_shown": res.top.height,
        "plots": ", ".join(dict.fromkeys(res.plots)),
        "n_plots": len(res.plots),
        "funnel": dg.MetadataValue.md(funnel_md),
        "seconds": round(time.perf_counter() - t0, 2),
    })
