"""How much two surrogates disagree on a system's ranking ("churn").

:func:`rank_pairs` puts two surrogates' shortlist rankings side by side, one row per candidate
either of them ranked; :func:`surrogate_churn` summarises each pair of surrogates per chemical
system: Spearman rank correlation over the candidates both ranked, the overlap of their top-k,
and the candidates whose phonon verdict flipped. Pure DataFrame functions.

Like is compared with like: only unique structures count (a shortlist row with ``duplicate_of``
set relaxed into a better-ranked one and is dropped; the rank is ``unique_rank`` when the frame has
it), and the top-k overlap and the rank correlation are taken over the candidates *both*
surrogates ranked (re-ranked within that common set), so two shortlists drawn from different pools
or of different sizes are not compared row for row. The counts (unique rows each, duplicates
dropped each, common) are stated in the result.
"""

from __future__ import annotations

from itertools import combinations

import polars as pl

from lib import contracts
from lib.plots import subplots

#: Columns accepted as the phonon verdict, first found wins.
VERDICT_COLUMNS: tuple[str, ...] = ("is_dynamically_stable", "is_phonon_stable")

PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "chemical_system": pl.String(), "surrogate_a": pl.String(), "surrogate_b": pl.String(),
    "candidate_id": pl.String(), "rank_a": pl.Int64(), "rank_b": pl.Int64(),
    "is_stable_a": pl.Boolean(), "is_stable_b": pl.Boolean(),
    "common_rank_a": pl.Int64(), "common_rank_b": pl.Int64(),
    "is_in_top_k_a": pl.Boolean(), "is_in_top_k_b": pl.Boolean(), "is_verdict_flipped": pl.Boolean(),
}

CHURN_SCHEMA: dict[str, pl.DataType] = contracts.schema("surrogate_churn")


def _verdict_column(frame: pl.DataFrame, verdict_column: str | None) -> str | None:
    if verdict_column is not None:
        if verdict_column not in frame.columns:
            raise ValueError(f"verdict column {verdict_column!r} not in {frame.columns}")
        return verdict_column
    return next((c for c in VERDICT_COLUMNS if c in frame.columns), None)


def _with_columns_checked(shortlist: pl.DataFrame) -> None:
    need = {"candidate_id", "surrogate_name", "rank"}
    missing = need - set(shortlist.columns)
    if missing:
        raise ValueError(f"shortlist frame lacks columns {sorted(missing)} (has {shortlist.columns})")


def _keyed(shortlist: pl.DataFrame) -> pl.DataFrame:
    cs = pl.col("chemical_system") if "chemical_system" in shortlist.columns else pl.lit("all")
    return shortlist.with_columns(cs.cast(pl.String).alias("chemical_system"),
                                  pl.col("surrogate_name").cast(pl.String))


def duplicate_counts(shortlist: pl.DataFrame) -> pl.DataFrame:
    """Rows with ``duplicate_of`` set per (chemical system, surrogate): ``n_duplicates``."""
    _with_columns_checked(shortlist)
    sl = _keyed(shortlist)
    dup = pl.col("duplicate_of").is_not_null() if "duplicate_of" in sl.columns else pl.lit(False)
    return sl.group_by("chemical_system", "surrogate_name").agg(dup.sum().cast(pl.Int64).alias("n_duplicates"))


def _normalised(shortlist: pl.DataFrame, *, verdict_column: str | None) -> pl.DataFrame:
    """Unique rows only (``duplicate_of`` null), ranked 1, 2, ... by ``unique_rank`` (else ``rank``)
    within each (chemical system, surrogate)."""
    _with_columns_checked(shortlist)
    vcol = _verdict_column(shortlist, verdict_column)
    sl = _keyed(shortlist)
    if "duplicate_of" in sl.columns:
        sl = sl.filter(pl.col("duplicate_of").is_null())
    order = (pl.coalesce(pl.col("unique_rank").cast(pl.Int64), pl.col("rank").cast(pl.Int64))
             if "unique_rank" in sl.columns else pl.col("rank").cast(pl.Int64))
    sha = pl.col("surrogate_sha256") if "surrogate_sha256" in sl.columns else pl.lit(None, pl.String)
    verdict = pl.col(vcol).cast(pl.Boolean) if vcol else pl.lit(None, pl.Boolean)
    out = sl.select(
        "chemical_system", "surrogate_name",
        sha.cast(pl.String).alias("surrogate_sha256"),
        pl.col("candidate_id").cast(pl.String),
        order.alias("rank"),
        verdict.alias("is_stable"),
    ).sort("chemical_system", "surrogate_name", "rank", "candidate_id", nulls_last=True)
    out = out.unique(["chemical_system", "surrogate_name", "candidate_id"], keep="first", maintain_order=True)
    return out.with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("chemical_system", "surrogate_name").alias("rank"))


def rank_pairs(shortlist: pl.DataFrame, *, top_k: int = 10, verdict_column: str | None = None) -> pl.DataFrame:
    """Every pair of surrogates per chemical system, side by side (:data:`PAIRS_SCHEMA`).

    ``shortlist``: rows ``candidate_id``, ``surrogate_name``, ``rank`` (1 = best), optionally
    ``chemical_system``, ``surrogate_sha256``, ``duplicate_of``/``unique_rank`` and a verdict
    (``is_dynamically_stable`` or ``is_phonon_stable``). One output row per unique candidate ranked
    by either surrogate of a pair; ``rank_*`` is the rank among that surrogate's unique rows,
    ``common_rank_*`` the rank among the candidates both ranked (null for the others), and
    ``is_in_top_k_*`` is ``common_rank_* <= top_k``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    sl = _normalised(shortlist, verdict_column=verdict_column)
    frames = []
    for (cs,), g in sl.group_by(["chemical_system"], maintain_order=True):
        names = sorted(g["surrogate_name"].unique().to_list())
        for a, b in combinations(names, 2):
            fa = g.filter(pl.col("surrogate_name") == a).select(
                "candidate_id", pl.col("rank").alias("rank_a"), pl.col("is_stable").alias("is_stable_a"))
            fb = g.filter(pl.col("surrogate_name") == b).select(
                "candidate_id", pl.col("rank").alias("rank_b"), pl.col("is_stable").alias("is_stable_b"))
            j = fa.join(fb, on="candidate_id", how="full", coalesce=True)
            both = pl.col("rank_a").is_not_null() & pl.col("rank_b").is_not_null()
            j = j.with_columns(
                pl.when(both).then(pl.col(f"rank_{s}").rank("ordinal").over(both)).cast(pl.Int64)
                .alias(f"common_rank_{s}") for s in ("a", "b"))
            frames.append(j.with_columns(
                pl.lit(cs).alias("chemical_system"), pl.lit(a).alias("surrogate_a"), pl.lit(b).alias("surrogate_b"),
                (pl.col("common_rank_a") <= top_k).fill_null(False).alias("is_in_top_k_a"),
                (pl.col("common_rank_b") <= top_k).fill_null(False).alias("is_in_top_k_b"),
                (pl.col("is_stable_a") != pl.col("is_stable_b")).fill_null(False).alias("is_verdict_flipped"),
            ))
    if not frames:
        return pl.DataFrame(schema=PAIRS_SCHEMA)
    out = pl.concat(frames, how="diagonal").select(list(PAIRS_SCHEMA)).cast(pl.Schema(PAIRS_SCHEMA))
    return out.sort(["chemical_system", "surrogate_a", "surrogate_b", "rank_a", "rank_b", "candidate_id"],
                    nulls_last=True)


def surrogate_churn(shortlist: pl.DataFrame, *, top_k: int = 10, verdict_column: str | None = None) -> pl.DataFrame:
    """One row per (chemical system, surrogate pair): :data:`CHURN_SCHEMA`.

    Only unique structures count (rows with ``duplicate_of`` set are dropped and counted in
    ``n_duplicates_*``). Spearman's rho and the top-k overlap are computed on the candidates both
    surrogates ranked (``n_common``; ranks re-ranked within that common set), so the top-k of each
    side is its best ``top_k`` among the same candidates; a verdict flips when both gave one and
    they differ.
    """
    sl = _normalised(shortlist, verdict_column=verdict_column)
    pairs = rank_pairs(shortlist, top_k=top_k, verdict_column=verdict_column)
    if pairs.is_empty():
        return pl.DataFrame(schema=CHURN_SCHEMA)
    sha = sl.group_by("chemical_system", "surrogate_name").agg(pl.col("surrogate_sha256").first())
    sha = sha.join(duplicate_counts(shortlist), on=["chemical_system", "surrogate_name"], how="left")
    common = pl.col("rank_a").is_not_null() & pl.col("rank_b").is_not_null()
    both_verdicts = common & pl.col("is_stable_a").is_not_null() & pl.col("is_stable_b").is_not_null()
    summary = pairs.group_by("chemical_system", "surrogate_a", "surrogate_b", maintain_order=True).agg(
        pl.col("rank_a").is_not_null().sum().cast(pl.Int64).alias("n_ranked_a"),
        pl.col("rank_b").is_not_null().sum().cast(pl.Int64).alias("n_ranked_b"),
        common.sum().cast(pl.Int64).alias("n_common"),
        pl.corr(pl.col("common_rank_a").filter(common), pl.col("common_rank_b").filter(common), method="spearman")
        .alias("spearman_rho"),
        (pl.col("is_in_top_k_a") & pl.col("is_in_top_k_b")).sum().cast(pl.Int64).alias("top_k_overlap"),
        both_verdicts.sum().cast(pl.Int64).alias("n_verdict_compared"),
        (pl.col("is_verdict_flipped") & both_verdicts).sum().cast(pl.Int64).alias("n_verdict_flipped"),
        pl.col("candidate_id").filter(pl.col("is_verdict_flipped") & both_verdicts).alias("flipped_candidate_ids"),
        pl.col("candidate_id").alias("candidate_ids"),
        pl.col("rank_a").alias("ranks_a"),
        pl.col("rank_b").alias("ranks_b"),
    )
    k_eff = pl.min_horizontal(pl.lit(top_k), pl.col("n_common"))
    summary = summary.with_columns(
        pl.when(pl.col("n_common") >= 2).then(pl.col("spearman_rho")).otherwise(None).alias("spearman_rho"),
        pl.lit(top_k, pl.Int64).alias("top_k"),
        pl.when(k_eff > 0).then(pl.col("top_k_overlap") / k_eff).otherwise(None).alias("top_k_overlap_fraction"),
    )
    for s in ("a", "b"):
        summary = summary.join(sha.rename({"surrogate_name": f"surrogate_{s}", "surrogate_sha256": f"surrogate_sha256_{s}",
                                           "n_duplicates": f"n_duplicates_{s}"}),
                               on=["chemical_system", f"surrogate_{s}"], how="left")
    return summary.select(list(CHURN_SCHEMA)).cast(pl.Schema(CHURN_SCHEMA))


def churn_figure(pairs: pl.DataFrame, *, max_panels: int = 6):
    """Rank of surrogate A against rank of surrogate B per pair (flipped verdicts in red)."""
    keys = pairs.select("chemical_system", "surrogate_a", "surrogate_b").unique(maintain_order=True).rows()
    keys = keys[:max_panels] or [("", "", "")]
    fig, axes = subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
    for ax, (cs, a, b) in zip(axes[0], keys, strict=False):
        g = pairs.filter((pl.col("chemical_system") == cs) & (pl.col("surrogate_a") == a)
                         & (pl.col("surrogate_b") == b) & pl.col("rank_a").is_not_null()
                         & pl.col("rank_b").is_not_null())
        flip = g["is_verdict_flipped"].to_list() if g.height else []
        ax.scatter(g["rank_a"].to_list(), g["rank_b"].to_list(),
                   c=["tab:red" if f else "tab:blue" for f in flip], s=18)
        hi = max([1, *g["rank_a"].to_list(), *g["rank_b"].to_list()])
        ax.plot([1, hi], [1, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"rank, {a}")
        ax.set_ylabel(f"rank, {b}")
        ax.set_title(cs, fontsize=9)
    fig.tight_layout()
    return fig
