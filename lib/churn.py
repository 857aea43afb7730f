"""How much two surrogates disagree on a system's ranking ("churn").

:func:`rank_pairs` puts two surrogates' shortlist rankings side by side, one row per candidate
either of them ranked; :func:`surrogate_churn` summarises each pair of surrogates per chemical
system: Spearman rank correlation over the candidates both ranked, the overlap of their top-k,
and the candidates whose phonon verdict flipped. Pure DataFrame functions.
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
    "is_in_top_k_a": pl.Boolean(), "is_in_top_k_b": pl.Boolean(), "is_verdict_flipped": pl.Boolean(),
}

CHURN_SCHEMA: dict[str, pl.DataType] = contracts.schema("surrogate_churn")


def _verdict_column(frame: pl.DataFrame, verdict_column: str | None) -> str | None:
    if verdict_column is not None:
        if verdict_column not in frame.columns:
            raise ValueError(f"verdict column {verdict_column!r} not in {frame.columns}")
        return verdict_column
    return next((c for c in VERDICT_COLUMNS if c in frame.columns), None)


def _normalised(shortlist: pl.DataFrame, *, verdict_column: str | None) -> pl.DataFrame:
    need = {"candidate_id", "surrogate_name", "rank"}
    missing = need - set(shortlist.columns)
    if missing:
        raise ValueError(f"shortlist frame lacks columns {sorted(missing)} (has {shortlist.columns})")
    vcol = _verdict_column(shortlist, verdict_column)
    cs = pl.col("chemical_system") if "chemical_system" in shortlist.columns else pl.lit("all")
    sha = pl.col("surrogate_sha256") if "surrogate_sha256" in shortlist.columns else pl.lit(None, pl.String)
    verdict = pl.col(vcol).cast(pl.Boolean) if vcol else pl.lit(None, pl.Boolean)
    return shortlist.select(
        cs.cast(pl.String).alias("chemical_system"),
        pl.col("surrogate_name").cast(pl.String),
        sha.cast(pl.String).alias("surrogate_sha256"),
        pl.col("candidate_id").cast(pl.String),
        pl.col("rank").cast(pl.Int64),
        verdict.alias("is_stable"),
    ).unique(["chemical_system", "surrogate_name", "candidate_id"], keep="first", maintain_order=True)


def rank_pairs(shortlist: pl.DataFrame, *, top_k: int = 10, verdict_column: str | None = None) -> pl.DataFrame:
    """Every pair of surrogates per chemical system, side by side (:data:`PAIRS_SCHEMA`).

    ``shortlist``: rows ``candidate_id``, ``surrogate_name``, ``rank`` (1 = best), optionally
    ``chemical_system``, ``surrogate_sha256`` and a verdict (``is_dynamically_stable`` or
    ``is_phonon_stable``). One output row per candidate ranked by either surrogate of a pair.
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
            frames.append(j.with_columns(
                pl.lit(cs).alias("chemical_system"), pl.lit(a).alias("surrogate_a"), pl.lit(b).alias("surrogate_b"),
                (pl.col("rank_a") <= top_k).fill_null(False).alias("is_in_top_k_a"),
                (pl.col("rank_b") <= top_k).fill_null(False).alias("is_in_top_k_b"),
                (pl.col("is_stable_a") != pl.col("is_stable_b")).fill_null(False).alias("is_verdict_flipped"),
            ))
    if not frames:
        return pl.DataFrame(schema=PAIRS_SCHEMA)
    out = pl.concat(frames, how="diagonal").select(list(PAIRS_SCHEMA)).cast(pl.Schema(PAIRS_SCHEMA))
    return out.sort(["chemical_system", "surrogate_a", "surrogate_b", "rank_a", "rank_b", "candidate_id"],
                    nulls_last=True)


def surrogate_churn(shortlist: pl.DataFrame, *, top_k: int = 10, verdict_column: str | None = None) -> pl.DataFrame:
    """One row per (chemical system, surrogate pair): :data:`CHURN_SCHEMA`.

    Spearman's rho is computed on the candidates both surrogates ranked (their ranks re-ranked
    within that common set, ties averaged); the top-k overlap compares each surrogate's own
    top ``top_k``; a verdict flips when both gave one and they differ.
    """
    sl = _normalised(shortlist, verdict_column=verdict_column)
    pairs = rank_pairs(shortlist, top_k=top_k, verdict_column=verdict_column)
    if pairs.is_empty():
        return pl.DataFrame(schema=CHURN_SCHEMA)
    sha = sl.group_by("chemical_system", "surrogate_name").agg(pl.col("surrogate_sha256").first())
    common = pl.col("rank_a").is_not_null() & pl.col("rank_b").is_not_null()
    both_verdicts = common & pl.col("is_stable_a").is_not_null() & pl.col("is_stable_b").is_not_null()
    summary = pairs.group_by("chemical_system", "surrogate_a", "surrogate_b", maintain_order=True).agg(
        pl.col("rank_a").is_not_null().sum().cast(pl.Int64).alias("n_ranked_a"),
        pl.col("rank_b").is_not_null().sum().cast(pl.Int64).alias("n_ranked_b"),
        common.sum().cast(pl.Int64).alias("n_common"),
        pl.corr(pl.col("rank_a").filter(common), pl.col("rank_b").filter(common), method="spearman")
        .alias("spearman_rho"),
        (pl.col("is_in_top_k_a") & pl.col("is_in_top_k_b")).sum().cast(pl.Int64).alias("top_k_overlap"),
        both_verdicts.sum().cast(pl.Int64).alias("n_verdict_compared"),
        (pl.col("is_verdict_flipped") & both_verdicts).sum().cast(pl.Int64).alias("n_verdict_flipped"),
        pl.col("candidate_id").filter(pl.col("is_verdict_flipped") & both_verdicts).alias("flipped_candidate_ids"),
        pl.col("candidate_id").alias("candidate_ids"),
        pl.col("rank_a").alias("ranks_a"),
        pl.col("rank_b").alias("ranks_b"),
    )
    k_eff = pl.min_horizontal(pl.lit(top_k), pl.col("n_ranked_a"), pl.col("n_ranked_b"))
    summary = summary.with_columns(
        pl.when(pl.col("n_common") >= 2).then(pl.col("spearman_rho")).otherwise(None).alias("spearman_rho"),
        pl.lit(top_k, pl.Int64).alias("top_k"),
        pl.when(k_eff > 0).then(pl.col("top_k_overlap") / k_eff).otherwise(None).alias("top_k_overlap_fraction"),
    )
    summary = summary.join(sha.rename({"surrogate_name": "surrogate_a", "surrogate_sha256": "surrogate_sha256_a"}),
                           on=["chemical_system", "surrogate_a"], how="left")
    summary = summary.join(sha.rename({"surrogate_name": "surrogate_b", "surrogate_sha256": "surrogate_sha256_b"}),
                           on=["chemical_system", "surrogate_b"], how="left")
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
