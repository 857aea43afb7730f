"""Lineage of a DFT result: candidate → template → generator checkpoint → training snapshot → MP
source, and the surrogates that ranked it. The same chain as the ``dft_lineage`` DuckDB view
(``sql/views/lineage.sql``), as a polars function for the ``discoveries`` asset.

Every upstream frame is optional: a missing one leaves its columns null (the schema is the same
either way), so a result ingested before the upstream tables exist still gets a row.
"""

from __future__ import annotations

import polars as pl

from lib import contracts

#: Columns :func:`attach_lineage` adds (name -> dtype).
LINEAGE_SCHEMA: dict[str, pl.DataType] = contracts.schema(
    "discoveries", exclude=contracts.schema("dft_results"))


def _pick(frame: pl.DataFrame | None, key: str, cols: dict[str, str]) -> pl.DataFrame | None:
    """``frame``'s key plus the columns it has of ``cols`` (source -> output name), one row per key."""
    if frame is None or key not in frame.columns:
        return None
    have = {src: out for src, out in cols.items() if src in frame.columns}
    return frame.select(pl.col(key).cast(pl.String),
                        *[pl.col(s).alias(o) for s, o in have.items()]).unique(key, keep="first", maintain_order=True)


def attach_lineage(
    results: pl.DataFrame,
    *,
    candidates: pl.DataFrame | None = None,
    templates: pl.DataFrame | None = None,
    checkpoints: pl.DataFrame | None = None,
    mp_structures: pl.DataFrame | None = None,
    shortlist: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """``results`` (needs ``candidate_id``; ``template_id``/``checkpoint_id`` used when the
    candidates table does not give them) with the :data:`LINEAGE_SCHEMA` columns added."""
    if "candidate_id" not in results.columns:
        raise ValueError(f"results need a candidate_id column (have {results.columns})")
    out = results
    for c in ("template_id", "checkpoint_id"):
        if c not in out.columns:
            out = out.with_columns(pl.lit(None, pl.String).alias(c))
    cand = _pick(candidates, "candidate_id", {
        "template_id": "_template_id", "checkpoint_id": "_checkpoint_id", "formula": "candidate_formula",
        "spacegroup_number": "candidate_spacegroup_number", "wyckoff_species_sequence": "wyckoff_species_sequence"})
    if cand is not None:
        out = out.join(cand, on="candidate_id", how="left")
        for c in ("template_id", "checkpoint_id"):
            if f"_{c}" in out.columns:
                out = out.with_columns(pl.coalesce(f"_{c}", c).alias(c)).drop(f"_{c}")
    tpl = _pick(templates, "template_id", {"spacegroup_number": "template_spacegroup_number",
                                           "wyckoff_sequence": "template_wyckoff_sequence",
                                           "checkpoint_id": "_tpl_checkpoint_id"})
    if tpl is not None:
        out = out.join(tpl, on="template_id", how="left")
        if "_tpl_checkpoint_id" in out.columns:
            out = out.with_columns(pl.coalesce("checkpoint_id", "_tpl_checkpoint_id").alias("checkpoint_id")
                                   ).drop("_tpl_checkpoint_id")
    ck = _pick(checkpoints, "checkpoint_id", {"path": "checkpoint_path", "created_at": "checkpoint_created_at",
                                              "training_snapshot_id": "training_snapshot_id"})
    if ck is not None:
        out = out.join(ck.with_columns(pl.col("^checkpoint_created_at$").cast(pl.String)), on="checkpoint_id",
                       how="left")
    if mp_structures is not None and {"snapshot_id", "source"} <= set(mp_structures.columns) \
            and "training_snapshot_id" in out.columns:
        snap = mp_structures.group_by("snapshot_id").agg(
            pl.col("source").first().alias("mp_source"), pl.len().cast(pl.Int64).alias("mp_n_structures"))
        out = out.join(snap.rename({"snapshot_id": "training_snapshot_id"}), on="training_snapshot_id", how="left")
    if shortlist is not None and {"candidate_id", "surrogate_name", "rank"} <= set(shortlist.columns):
        eh = "e_above_hull_ev_per_atom"
        sl = shortlist.select(
            pl.col("candidate_id").cast(pl.String), "surrogate_name",
            (pl.col("surrogate_sha256") if "surrogate_sha256" in shortlist.columns else pl.lit(None, pl.String))
            .alias("surrogate_sha256"),
            pl.col("rank").cast(pl.Int64),
            (pl.col(eh) if eh in shortlist.columns else pl.lit(None, pl.Float64)).cast(pl.Float64).alias(eh),
        ).sort("candidate_id", "surrogate_name")
        agg = sl.group_by("candidate_id", maintain_order=True).agg(
            pl.col("surrogate_name").alias("ranked_by_surrogates"),
            pl.col("surrogate_sha256").alias("ranked_by_surrogate_sha256s"),
            pl.col("rank").alias("surrogate_ranks"),
            pl.col(eh).alias("surrogate_e_above_hull_ev_per_atom"),
        )
        out = out.join(agg, on="candidate_id", how="left")
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in LINEAGE_SCHEMA.items() if name not in out.columns]
    if missing:
        out = out.with_columns(missing)
    return out.with_columns([pl.col(n).cast(t) for n, t in LINEAGE_SCHEMA.items()])
