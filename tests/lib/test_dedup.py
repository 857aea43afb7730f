"""Dedup: exact fingerprint duplicates, StructureMatcher inside buckets, and the MP match on real Ba-Ru-O data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from lib.dedup import MP_MATCHER_DEFAULTS, apply_dedup, dedup_candidates, prototype_labels
from lib.infill import infill
from lib.mp_sources import load_mp_source
from lib.symmetry import analyse_symmetry
from tests.lib.test_infill import template

ELEMENTS = ["Ba", "Ru", "O"]
LAT = (5.7, 5.7, 9.6, 90.0, 90.0, 120.0)
SITES = (["b", "c", "f"], [[0.0, 0.0, 0.25], [1 / 3, 2 / 3, 0.25], [1 / 3, 2 / 3, 0.61]])


@pytest.fixture(scope="module")
def mp_ba_ru_o(ba_ru_o_dir: Path) -> pl.DataFrame:
    return load_mp_source(str(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")).structures


def test_fingerprint_duplicates_across_templates_fold() -> None:
    a = template(194, *SITES, LAT, tid="tpl-a")
    b = template(194, *SITES, LAT, tid="tpl-b")  # the generator produced the same template twice
    cands = infill(pl.concat([a, b]), elements=ELEMENTS).candidates
    assert cands.height == 12
    res = dedup_candidates(cands)
    assert res.n_folded_fingerprint == 6 and res.n_unique == 6
    assert int(res.unique["n_folded"].sum()) == 6
    assert set(res.folded["reason"]) == {"fingerprint"}
    kept = apply_dedup(cands, res.unique)
    assert kept.height == 6 and kept["candidate_id"].is_unique().all()
    assert {"n_folded", "is_known_in_mp", "mp_material_id"} <= set(kept.columns)


def test_structure_matcher_folds_a_strained_copy_and_keeps_a_different_one() -> None:
    a = template(194, *SITES, LAT, tid="tpl-a")
    strained = template(194, *SITES, (5.7, 5.7, 9.6 * 1.06, 90.0, 90.0, 120.0), tid="tpl-strained")
    other = template(194, *SITES, (5.7, 5.7, 14.0, 90.0, 90.0, 120.0), tid="tpl-other")  # c/a +46%
    cands = infill(pl.concat([a, strained, other]), elements=ELEMENTS).candidates
    assert cands["fingerprint"].n_unique() == cands.height  # nothing identical by fingerprint
    labels = prototype_labels(cands)
    assert len(set(labels.tolist())) == 6  # the three templates share their six prototype labels
    res = dedup_candidates(cands, matcher=MP_MATCHER_DEFAULTS, distance_window=0.3)  # pymatgen's tolerances
    assert res.n_pairs_compared > 0 and res.n_folded_matcher >= 6
    rep = dict(zip(cands["candidate_id"], cands["candidate_id"], strict=True))
    rep.update(dict(res.folded.select("candidate_id", "representative_id").iter_rows()))
    tmpl = dict(zip(cands["candidate_id"], cands["template_id"], strict=True))
    by_seq: dict[tuple[str, str], str] = {(t, q): c for c, t, q in cands.select(
        "candidate_id", "template_id", "wyckoff_species_sequence").iter_rows()}
    for (t, q), c in by_seq.items():
        if t == "tpl-strained":  # the strained copy lands in the same cluster as its twin
            assert rep[c] == rep[by_seq[("tpl-a", q)]]
        if t == "tpl-other":  # 46% longer c is beyond ltol: never merged with the others
            assert tmpl[rep[c]] == "tpl-other"
            assert all(tmpl[x] == "tpl-other" for x, r in rep.items() if r == rep[c])
    assert res.n_unique + res.n_folded_matcher + res.n_folded_fingerprint == cands.height


def test_known_mp_structure_placed_into_the_candidates_is_flagged(mp_ba_ru_o: pl.DataFrame) -> None:
    ref = mp_ba_ru_o.filter(pl.col("material_id") == "mp-3597")
    assert ref.height == 1 and ref["reduced_formula"][0] == "BaRuO3"
    sym = analyse_symmetry(ref, symprec=0.1, round_trip_method="none").row(0, named=True)
    tpl = template(sym["spacegroup_number"], list(sym["wyckoff_letters"]), sym["asu_frac_coords"],
                   tuple(sym[c] for c in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg")),
                   tid="tpl-mp-3597")
    # plus a decoy template that must not match anything in MP
    decoy = template(194, *SITES, LAT, tid="tpl-decoy")
    cands = infill(pl.concat([tpl, decoy]), elements=ELEMENTS).candidates
    truth = " ".join(f"{e}:{m}{w}" for e, m, w in zip(sym["asu_elements"], sym["multiplicities"],
                                                      sym["wyckoff_letters"], strict=True))
    assert truth in set(cands["wyckoff_species_sequence"])
    res = dedup_candidates(cands, mp_structures=mp_ba_ru_o, elements=ELEMENTS)
    assert res.n_mp_references == 23 and res.n_mp_pairs_compared >= 1
    out = apply_dedup(cands, res.unique)
    hit = out.filter(pl.col("wyckoff_species_sequence") == truth)
    assert hit.height == 1
    assert hit["is_known_in_mp"][0] and hit["mp_material_id"][0] == "mp-3597"
    known = out.filter(pl.col("is_known_in_mp"))
    assert set(known["mp_material_id"]) == {"mp-3597"}
    assert (known["template_id"] == "tpl-mp-3597").all()
    assert res.n_mp_matches == known.height and res.mp_matches_by_material == {"mp-3597": known.height}
    # flagged, not deleted: every unique candidate is still there
    assert out.height == res.n_unique


def test_default_tolerances_keep_a_strained_copy_apart() -> None:
    a = template(194, *SITES, LAT, tid="tpl-a")
    strained = template(194, *SITES, (5.7, 5.7, 9.6 * 1.06, 90.0, 90.0, 120.0), tid="tpl-strained")
    cands = infill(pl.concat([a, strained]), elements=ELEMENTS).candidates
    res = dedup_candidates(cands)  # near-identical only: 6% strain is beyond ltol=0.05
    assert res.n_folded_matcher == 0 and res.n_unique == cands.height


def test_dedup_rejects_bad_input() -> None:
    a = infill(template(194, *SITES, LAT, tid="tpl-a"), elements=ELEMENTS).candidates
    with pytest.raises(ValueError, match="not unique"):
        dedup_candidates(pl.concat([a, a]))
    with pytest.raises(ValueError, match="no fingerprint"):
        dedup_candidates(a.with_columns(pl.lit(None, dtype=pl.String).alias("fingerprint")))
