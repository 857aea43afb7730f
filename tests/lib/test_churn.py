"""Surrogate churn on small frames: rank correlation, top-k overlap, phonon verdict flips."""

from __future__ import annotations

import polars as pl
import pytest
from scipy.stats import spearmanr

from lib.churn import CHURN_SCHEMA, PAIRS_SCHEMA, churn_figure, rank_pairs, surrogate_churn


def _sl(system: str, surrogate: str, ids: list[str], stable: list[bool | None] | None = None) -> pl.DataFrame:
    return pl.DataFrame({
        "chemical_system": [system] * len(ids), "surrogate_name": [surrogate] * len(ids),
        "surrogate_sha256": [surrogate.lower() * 8] * len(ids), "candidate_id": ids,
        "rank": list(range(1, len(ids) + 1)),
        "is_dynamically_stable": stable if stable is not None else [True] * len(ids),
    }, schema_overrides={"is_dynamically_stable": pl.Boolean})


def test_identical_and_reversed_rankings() -> None:
    ids = [f"c{i}" for i in range(6)]
    same = surrogate_churn(pl.concat([_sl("X", "A", ids), _sl("X", "B", ids)]), top_k=3)
    assert same.schema == pl.Schema(CHURN_SCHEMA)
    row = same.row(0, named=True)
    assert row["spearman_rho"] == pytest.approx(1.0) and row["top_k_overlap"] == 3
    assert row["top_k_overlap_fraction"] == pytest.approx(1.0) and row["n_verdict_flipped"] == 0
    assert row["surrogate_sha256_a"] == "a" * 8 and row["surrogate_sha256_b"] == "b" * 8
    rev = surrogate_churn(pl.concat([_sl("X", "A", ids), _sl("X", "B", ids[::-1])]), top_k=3).row(0, named=True)
    assert rev["spearman_rho"] == pytest.approx(-1.0) and rev["top_k_overlap"] == 0


def test_partial_overlap_matches_scipy_and_counts_flips() -> None:
    a = _sl("Ba-O-Ru", "M3GNet-MP", ["c1", "c2", "c3", "c4", "c5"], [True, True, False, True, None])
    b = _sl("Ba-O-Ru", "M3GNet-MatPES", ["c2", "c1", "c4", "c6", "c3"], [True, False, True, True, True])
    row = surrogate_churn(pl.concat([a, b]), top_k=2).row(0, named=True)
    common = ["c1", "c2", "c3", "c4"]
    ra = [1, 2, 3, 4]
    rb = [2, 1, 5, 3]
    assert row["n_common"] == len(common) and row["n_ranked_a"] == 5 and row["n_ranked_b"] == 5
    assert row["spearman_rho"] == pytest.approx(spearmanr(ra, rb).statistic)
    assert row["top_k_overlap"] == 2  # {c1, c2} both ways
    # pairs are ordered by name: surrogate_a = M3GNet-MP, surrogate_b = M3GNet-MatPES
    assert (row["surrogate_a"], row["surrogate_b"]) == ("M3GNet-MP", "M3GNet-MatPES")
    assert sorted(row["flipped_candidate_ids"]) == ["c1", "c3"]  # c5 has no verdict from A, c6 not in A
    assert row["n_verdict_compared"] == 4
    side = dict(zip(row["candidate_ids"], zip(row["ranks_a"], row["ranks_b"], strict=True), strict=True))
    assert side["c6"] == (None, 4) and side["c5"] == (5, None) and side["c3"] == (3, 5)


def test_systems_and_pairs_are_kept_apart() -> None:
    ids = ["c1", "c2", "c3"]
    frame = pl.concat([_sl("X", "A", ids), _sl("X", "B", ids), _sl("X", "C", ids[::-1]), _sl("Y", "A", ids)])
    churn = surrogate_churn(frame, top_k=2)
    assert churn.select("chemical_system", "surrogate_a", "surrogate_b").rows() == [
        ("X", "A", "B"), ("X", "A", "C"), ("X", "B", "C")]  # Y has one surrogate: no pair
    pairs = rank_pairs(frame, top_k=2)
    assert pairs.schema == pl.Schema(PAIRS_SCHEMA) and pairs.height == 9
    fig = churn_figure(pairs)
    assert len(fig.axes) == 3


def test_too_few_common_candidates_gives_null_rho_and_bad_input_raises() -> None:
    row = surrogate_churn(pl.concat([_sl("X", "A", ["c1", "c2"]), _sl("X", "B", ["c2", "c3"])])).row(0, named=True)
    assert row["n_common"] == 1 and row["spearman_rho"] is None
    assert surrogate_churn(_sl("X", "A", ["c1"])).is_empty()
    with pytest.raises(ValueError, match="rank"):
        surrogate_churn(_sl("X", "A", ["c1"]).drop("rank"))
    with pytest.raises(ValueError, match="top_k"):
        rank_pairs(_sl("X", "A", ["c1"]), top_k=0)
    with pytest.raises(ValueError, match="verdict column"):
        surrogate_churn(_sl("X", "A", ["c1"]), verdict_column="is_phonon_stable")


def test_duplicates_are_dropped_and_only_common_candidates_are_compared() -> None:
    """A's top rows are one structure three times (d1, d2 relaxed into c1), and B drew c9, which A
    never saw. Each side's own top-2 rows ({c1, d1} and {c9, c2}) share nothing; counting the
    duplicates but only common candidates shares one; unique structures both ranked share both."""
    a = _sl("Ba-O-Ru", "A", ["c1", "d1", "d2", "c2", "c3"], [True, False, False, True, True]).with_columns(
        pl.Series("duplicate_of", [None, "c1", "c1", None, None], pl.String),
        pl.Series("unique_rank", [1, None, None, 2, 3], pl.Int64))
    b = _sl("Ba-O-Ru", "B", ["c9", "c2", "c1", "c3", "d1"], [True, True, True, False, True]).with_columns(
        pl.Series("duplicate_of", [None] * 5, pl.String), pl.Series("unique_rank", [1, 2, 3, 4, 5], pl.Int64))
    frame = pl.concat([a, b])
    naive = surrogate_churn(frame.drop("duplicate_of", "unique_rank"), top_k=2).row(0, named=True)
    row = surrogate_churn(frame, top_k=2).row(0, named=True)
    assert naive["n_common"] == 4 and naive["top_k_overlap"] == 1
    assert row["n_common"] == 3  # d1 is a duplicate under A: not compared
    assert (row["n_ranked_a"], row["n_ranked_b"], row["n_duplicates_a"], row["n_duplicates_b"]) == (3, 5, 2, 0)
    assert row["top_k_overlap"] == 2 and row["top_k_overlap_fraction"] == pytest.approx(1.0)
    # common ranks: A c1 1, c2 2, c3 3; B c2 1, c1 2, c3 3
    assert row["spearman_rho"] == pytest.approx(spearmanr([1, 2, 3], [2, 1, 3]).statistic)
    assert row["spearman_rho"] != pytest.approx(naive["spearman_rho"])
    assert row["n_verdict_compared"] == 3 and row["flipped_candidate_ids"] == ["c3"]  # d1's flip is not counted
    pairs = rank_pairs(frame, top_k=2)
    d1 = pairs.filter(pl.col("candidate_id") == "d1").row(0, named=True)
    assert d1["rank_a"] is None and d1["rank_b"] == 5 and d1["common_rank_b"] is None
    c9 = pairs.filter(pl.col("candidate_id") == "c9").row(0, named=True)
    assert c9["rank_b"] == 1 and not c9["is_in_top_k_b"]
    assert sorted(pairs.filter(pl.col("is_in_top_k_a"))["candidate_id"].to_list()) == ["c1", "c2"]
