"""A surrogate ensemble's verdict on the best shortlist rows: per-surrogate hull distances, their
mean and spread, a lower-confidence-bound ranking, and how far the surrogates agree.

The ``consensus`` asset re-evaluates the best K unique novel rows of one surrogate's shortlist
(the *primary*) with every registered surrogate: each row is relaxed by that surrogate from the
primary's relaxed cell, and its energy above **that surrogate's own hull** is computed against
the system's reference phases relaxed by the same surrogate (never a mix of models). This module
holds the pure parts:

* :func:`reference_inputs`: the reference phases of a ``reference_energies`` partition as
  relaxation inputs for another surrogate (the primary's relaxed cells; molecules in a box keep
  their cell fixed);
* :func:`consensus_table`: from one row per (candidate, evaluated surrogate), the per-candidate
  ``e_above_hull`` mean, spread (max - min), standard deviation, the bound
  ``mean + kappa * std`` (the lower confidence bound of the stability ``-e_above_hull``: a row
  that only one surrogate likes gets a large std and sinks), and ``consensus_rank`` by
  ``rank_by``;
* :func:`rank_agreement`: Spearman rank correlation between every pair of surrogates (on the
  candidates both evaluated) and how many of the primary's top N stay in the consensus top N.

A candidate that a surrogate could not evaluate (an element it does not cover, a failed load or
relaxation) keeps its row with ``status = "error"`` and the reason; the aggregates use the
surrogates that did evaluate it (``n_surrogates_ok``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any, Literal

import numpy as np
import polars as pl

ConsensusRankBy = Literal["mean", "lcb", "primary"]
#: Columns :func:`consensus_table` adds (per candidate, repeated on each of its rows).
AGGREGATE_SCHEMA: dict[str, pl.DataType] = {
    "n_surrogates_ok": pl.Int64(),
    "e_above_hull_mean_ev_per_atom": pl.Float64(),
    "e_above_hull_spread_ev_per_atom": pl.Float64(),
    "e_above_hull_std_ev_per_atom": pl.Float64(),
    "e_above_hull_lcb_ev_per_atom": pl.Float64(),
    "consensus_rank": pl.Int64(),
}


def reference_inputs(reference_energies: pl.DataFrame) -> pl.DataFrame:
    """The ``ok`` reference phases of a ``reference_energies`` partition as relaxation inputs:
    ``phase_id``, ``formula``, ``source``, cell columns (the relaxed cells) and
    ``is_cell_relaxed`` (False for ASE's molecules in a box, whose cell must stay fixed).

    Raises ``ValueError`` when a column is missing or no phase is ``ok``.
    """
    from lib.screening import ase_reference_structure

    need = ("phase_id", "formula", "source", "status", "lattice_matrix", "species", "frac_coords")
    missing = [c for c in need if c not in reference_energies.columns]
    if missing:
        raise ValueError(f"reference_energies lacks column(s) {missing}")
    ok = reference_energies.filter((pl.col("status") == "ok") & pl.col("lattice_matrix").is_not_null())
    if "kind" in ok.columns:
        ok = ok.filter(pl.col("kind") == "reference")
    if ok.is_empty():
        raise ValueError("reference_energies has no relaxed (status ok) reference phase")
    molecule = [src == "ase.data.reference_states" and ase_reference_structure(sp[0])[1]
                for src, sp in zip(ok["source"].to_list(), ok["species"].to_list(), strict=True)]
    return ok.select("phase_id", "formula", "source", "lattice_matrix", "species", "frac_coords").with_columns(
        pl.Series("is_cell_relaxed", [not m for m in molecule], dtype=pl.Boolean))


def consensus_table(rows: pl.DataFrame, *, rank_by: ConsensusRankBy = "mean", kappa: float = 1.0) -> pl.DataFrame:
    """``rows`` (one per ``candidate_id`` x ``evaluated_surrogate``, with ``status``,
    ``e_above_hull_ev_per_atom`` and ``primary_rank``) with :data:`AGGREGATE_SCHEMA` columns.

    ``rank_by``: ``mean`` (mean e_above_hull), ``lcb`` (``mean + kappa * std``; std is the
    population standard deviation over the surrogates that evaluated the row, 0 with one) or
    ``primary`` (the primary's shortlist order); ties by ``primary_rank``. A candidate that no
    surrogate evaluated gets null aggregates and ranks last. Sorted by ``consensus_rank``, then
    ``evaluated_surrogate``. Raises ``ValueError`` on a missing column, a duplicated
    (candidate, surrogate) pair, an unknown ``rank_by`` or a negative ``kappa``.
    """
    if rank_by not in ("mean", "lcb", "primary"):
        raise ValueError(f"rank_by must be mean, lcb or primary, not {rank_by!r}")
    if not kappa >= 0:
        raise ValueError(f"kappa must be >= 0, not {kappa}")
    need = ("candidate_id", "evaluated_surrogate", "status", "e_above_hull_ev_per_atom", "primary_rank")
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise ValueError(f"consensus rows lack column(s) {missing}")
    if rows.select("candidate_id", "evaluated_surrogate").is_duplicated().any():
        dup = rows.filter(pl.struct("candidate_id", "evaluated_surrogate").is_duplicated()).row(0, named=True)
        raise ValueError(f"consensus rows: candidate_id={dup['candidate_id']} evaluated by "
                         f"{dup['evaluated_surrogate']} twice")
    base = rows.drop([c for c in AGGREGATE_SCHEMA if c in rows.columns])
    good = pl.col("e_above_hull_ev_per_atom").filter(
        (pl.col("status") == "ok") & pl.col("e_above_hull_ev_per_atom").is_not_null())
    agg = base.group_by("candidate_id").agg(
        pl.col("primary_rank").min().alias("_prank"),
        good.len().cast(pl.Int64).alias("n_surrogates_ok"),
        good.mean().alias("e_above_hull_mean_ev_per_atom"),
        (good.max() - good.min()).alias("e_above_hull_spread_ev_per_atom"),
        good.std(ddof=0).alias("e_above_hull_std_ev_per_atom"),
    ).with_columns((pl.col("e_above_hull_mean_ev_per_atom") + kappa * pl.col("e_above_hull_std_ev_per_atom"))
                   .alias("e_above_hull_lcb_ev_per_atom"))
    key = {"mean": "e_above_hull_mean_ev_per_atom", "lcb": "e_above_hull_lcb_ev_per_atom",
           "primary": "_prank"}[rank_by]
    agg = agg.sort([key, "_prank", "candidate_id"], nulls_last=True).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("consensus_rank")).drop("_prank")
    return base.join(agg, on="candidate_id", how="left").sort("consensus_rank", "evaluated_surrogate")


def rank_agreement(table: pl.DataFrame, *, primary: str, top_n: int = 20) -> dict[str, Any]:
    """How far the surrogates agree on a :func:`consensus_table`: Spearman's rho of the
    e_above_hull order for every pair of surrogates (candidates both evaluated; null with fewer
    than 3), and ``top_n_overlap``: how many of the primary's top ``top_n`` (by ``primary_rank``)
    are in the consensus top ``top_n`` (by ``consensus_rank``)."""
    from scipy.stats import spearmanr

    ok = table.filter((pl.col("status") == "ok") & pl.col("e_above_hull_ev_per_atom").is_not_null())
    per = {s: dict(zip(g["candidate_id"].to_list(), g["e_above_hull_ev_per_atom"].to_list(), strict=True))
           for (s,), g in ok.group_by("evaluated_surrogate")}
    pairs: dict[str, float | None] = {}
    n_common: dict[str, int] = {}
    for a, b in combinations(sorted(per), 2):
        common = sorted(set(per[a]) & set(per[b]))
        name = f"{a} vs {b}"
        n_common[name] = len(common)
        if len(common) < 3:
            pairs[name] = None
            continue
        rho = spearmanr([per[a][c] for c in common], [per[b][c] for c in common]).statistic
        pairs[name] = None if not np.isfinite(rho) else round(float(rho), 4)
    cand = table.select("candidate_id", "primary_rank", "consensus_rank").unique("candidate_id")
    top_primary = set(cand.sort("primary_rank").head(top_n)["candidate_id"].to_list())
    top_consensus = set(cand.sort("consensus_rank").head(top_n)["candidate_id"].to_list())
    with_primary = [v for k, v in pairs.items() if primary in k.split(" vs ") and v is not None]
    return {"spearman": pairs, "n_common": n_common, "top_n": top_n,
            "top_n_overlap": len(top_primary & top_consensus), "n_candidates": cand.height,
            "mean_spearman_with_primary": round(float(np.mean(with_primary)), 4) if with_primary else None}


def wide_view(table: pl.DataFrame, surrogates: Sequence[str]) -> pl.DataFrame:
    """One row per candidate with a column of e_above_hull per surrogate (for metadata and reports)."""
    wide = table.pivot(on="evaluated_surrogate", index="candidate_id", values="e_above_hull_ev_per_atom")
    front = table.select("consensus_rank", "primary_rank", "candidate_id", "formula",
                         "e_above_hull_mean_ev_per_atom", "e_above_hull_spread_ev_per_atom",
                         "e_above_hull_lcb_ev_per_atom").unique("candidate_id")
    cols = [s for s in surrogates if s in wide.columns]
    return front.join(wide.select("candidate_id", *cols), on="candidate_id").sort("consensus_rank")
