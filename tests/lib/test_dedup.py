"""Dedup: exact fingerprint duplicates, StructureMatcher inside buckets, and the MP match on real Ba-Ru-O data."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib.cells import candidate_structures
from lib.dedup import (
    MATCHER_DEFAULTS,
    MP_MATCHER_DEFAULTS,
    apply_dedup,
    dedup_candidates,
    fit_reduced,
    prototype_labels,
    reduce_candidates,
    reduce_structure,
)
from lib.infill import infill, random_templates
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


def _matcher(settings: dict):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**settings)


@pytest.mark.parametrize(("strain", "folded"), [(1.06, True), (1.09, False)])
def test_default_tolerances_follow_structure_matcher_on_a_strained_copy(strain: float, folded: bool) -> None:
    """6% longer c: StructureMatcher (ltol 0.05, volumes scaled to each other) matches it, 9% not.
    The pre-screen must not decide that on its own (its bound is derived from the tolerances)."""
    a = template(194, *SITES, LAT, tid="tpl-a")
    strained = template(194, *SITES, (5.7, 5.7, 9.6 * strain, 90.0, 90.0, 120.0), tid="tpl-strained")
    cands = infill(pl.concat([a, strained]), elements=ELEMENTS).candidates
    s = dict(zip(cands["candidate_id"], candidate_structures(cands), strict=True))
    by_seq = {(t, q): c for c, t, q in cands.select("candidate_id", "template_id", "wyckoff_species_sequence").iter_rows()}
    sm = _matcher(MATCHER_DEFAULTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth = [bool(sm.fit(s[by_seq[("tpl-a", q)]], s[c])) for (t, q), c in by_seq.items() if t == "tpl-strained"]
    assert truth == [folded] * 6
    res = dedup_candidates(cands)
    assert res.n_folded_matcher == (6 if folded else 0)
    assert res.n_unique == cands.height - res.n_folded_matcher


def test_the_same_crystal_from_two_templates_is_folded_and_a_different_one_is_kept() -> None:
    """Template b is template a after the origin shift (0, 0, 1/2) of P6_3/mmc (2c -> 2d, 4f z -> z + 1/2),
    with c 1% longer and z moved by 0.002 (so not a fingerprint duplicate); template o has another z."""
    a = template(194, ["b", "c", "f"], [[0, 0, 0.25], [1 / 3, 2 / 3, 0.25], [1 / 3, 2 / 3, 0.61]], LAT, tid="tpl-a")
    b = template(194, ["b", "d", "f"], [[0, 0, 0.25], [1 / 3, 2 / 3, 0.75], [1 / 3, 2 / 3, 0.112]],
                 (5.7, 5.7, 9.6 * 1.01, 90.0, 90.0, 120.0), tid="tpl-b")
    o = template(194, ["b", "c", "f"], [[0, 0, 0.25], [1 / 3, 2 / 3, 0.25], [1 / 3, 2 / 3, 0.70]], LAT, tid="tpl-o")
    cands = infill(pl.concat([a, b, o]), elements=ELEMENTS).candidates
    assert cands.height == 18 and cands["fingerprint"].n_unique() == 18
    assert len(set(prototype_labels(cands).tolist())) == 6  # the normalizer puts 2c and 2d in one bucket
    res = dedup_candidates(cands)
    assert res.n_folded_fingerprint == 0 and res.n_folded_matcher == 6 and res.n_unique == 12
    tmpl = dict(cands.select("candidate_id", "template_id").iter_rows())
    assert all({tmpl[c], tmpl[r]} == {"tpl-a", "tpl-b"} for c, r, _ in res.folded.iter_rows())
    assert not any(tmpl[c] == "tpl-o" for c in res.unique.filter(pl.col("n_folded") > 0)["candidate_id"])
    s = dict(zip(cands["candidate_id"], candidate_structures(cands), strict=True))
    sm = _matcher(MATCHER_DEFAULTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(sm.fit(s[r], s[c]) for c, r, _ in res.folded.iter_rows())  # pymatgen's own verdict
        kept_o = [c for c in res.unique["candidate_id"] if tmpl[c] == "tpl-o"]
        kept_a = [c for c in res.unique["candidate_id"] if tmpl[c] == "tpl-a"]
        assert not any(sm.fit(s[x], s[y]) for x in kept_a for y in kept_o)


@pytest.fixture(scope="module")
def z_family() -> pl.DataFrame:
    """21 templates of one P6_3/mmc prototype whose free z runs from 0.60 to 0.68 in steps of
    0.004 (0.04 A): neighbours match, the ends do not. Six buckets of 21 (one per assignment)."""
    tpl = pl.concat([template(194, ["b", "c", "f"], [[0, 0, 0.25], [1 / 3, 2 / 3, 0.25], [1 / 3, 2 / 3, 0.60 + 0.004 * k]],
                              LAT, tid=f"tpl-z{k:02d}") for k in range(21)])
    return infill(tpl, elements=ELEMENTS).candidates


def test_every_member_matches_its_representative_and_workers_do_not_change_the_result(z_family: pl.DataFrame) -> None:
    cands = z_family
    one = dedup_candidates(cands, workers=1)
    assert one.n_folded_fingerprint == 0 and one.n_buckets == 6 and one.largest_bucket == 21
    assert one.n_folded_matcher >= 30 and one.n_pairs_compared >= one.n_folded_matcher
    assert one.n_unique + one.n_folded_matcher == cands.height
    for kw in ({"workers": 1, "n_chunks": 4}, {"workers": 2, "n_chunks": 5}):
        other = dedup_candidates(cands, **kw)
        assert other.unique.equals(one.unique) and other.folded.equals(one.folded), kw
        assert other.n_pairs_compared == one.n_pairs_compared
        assert other.backend == ("processes" if kw["workers"] == 2 else "local")
    # representatives as in StructureMatcher.group_structures: each folded member matched its
    # representative directly (pymatgen's own fit on the conventional cells, own reduction), and
    # representatives are never folded themselves
    s = dict(zip(cands["candidate_id"], candidate_structures(cands), strict=True))
    sm = _matcher(MATCHER_DEFAULTS)
    rows = one.folded.filter(pl.col("reason") == "structure_matcher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(sm.fit(s[r], s[c]) for c, r, _ in rows.iter_rows())
    assert (rows["representative_id"] < rows["candidate_id"]).all()
    assert not set(rows["representative_id"]) & set(rows["candidate_id"])
    # no chains: the two ends of the family (z 0.60 and 0.68) never share a representative
    tmpl = dict(cands.select("candidate_id", "template_id").iter_rows())
    rep = {c: c for c in cands["candidate_id"]} | dict(rows.select("candidate_id", "representative_id").iter_rows())
    groups: dict[str, set[str]] = {}
    for c, r in rep.items():
        groups.setdefault(r, set()).add(tmpl[c])
    assert not any({"tpl-z00", "tpl-z20"} <= g for g in groups.values())
    assert one.n_unique >= 6 * 3


def test_reduced_cells_and_fit_agree_with_pymatgen(z_family: pl.DataFrame, mp_ba_ru_o: pl.DataFrame) -> None:
    """The fast reduction gives pymatgen's primitive cell; fit_reduced gives StructureMatcher.fit's verdict."""
    from pymatgen.core import Lattice, Structure

    tpl = random_templates(150, seed=3, spacegroups=[221, 225, 229, 139, 123, 191, 166, 62, 14])
    cands = pl.concat([z_family, infill(tpl, elements=ELEMENTS, max_atoms=24).candidates.head(150)])
    fast, _ = reduce_candidates(cands)
    structs = candidate_structures(cands)
    ref = [reduce_structure(x) for x in structs]
    assert [f.n for f in fast] == [r.n for r in ref]
    assert np.allclose([f.volume for f in fast], [r.volume for r in ref])
    # pairs of one formula and primitive size, both tolerance sets, real MP structures included
    mp = [Structure(Lattice(np.reshape(lat, (3, 3))), sp, fc)
          for lat, sp, fc in mp_ba_ru_o.select("lattice_matrix", "species", "frac_coords").iter_rows()]
    pool = list(zip(structs, fast, strict=True)) + [(x, reduce_structure(x)) for x in mp]
    groups: dict[tuple, list] = {}
    for st, cell in pool:
        groups.setdefault((st.composition.reduced_formula, cell.n), []).append((st, cell))
    pairs = [p for g in groups.values() for p in itertools.combinations(g, 2)]
    pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))[:400]]
    assert len(pairs) >= 100
    for settings in (MATCHER_DEFAULTS, MP_MATCHER_DEFAULTS):
        sm = _matcher(settings)
        tol = {k: settings[k] for k in ("ltol", "stol", "angle_tol")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = [bool(sm.fit(a[0], b[0])) for a, b in pairs]
        got = [fit_reduced(a[1], b[1], **tol) for a, b in pairs]
        assert got == want
        assert any(want) and not all(want)


def test_dedup_rejects_bad_input() -> None:
    a = infill(template(194, *SITES, LAT, tid="tpl-a"), elements=ELEMENTS).candidates
    with pytest.raises(ValueError, match="not unique"):
        dedup_candidates(pl.concat([a, a]))
    with pytest.raises(ValueError, match="no fingerprint"):
        dedup_candidates(a.with_columns(pl.lit(None, dtype=pl.String).alias("fingerprint")))
