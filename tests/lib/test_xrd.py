"""lib.xrd: known rocksalt peaks, pattern similarity, the stacked plot."""

from __future__ import annotations

import polars as pl
import pytest
from pymatgen.core import Lattice, Structure

from lib.xrd import (
    PATTERN_SCHEMA,
    pattern_similarity,
    plot_patterns,
    similarity_matrix,
    structure_similarity,
    xrd_patterns,
)


def _rocksalt(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _cscl_type(a: float = 3.3) -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _zincblende(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup("F-43m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def test_rocksalt_peaks_at_known_two_theta():
    p = xrd_patterns(["nacl"], [_rocksalt()])
    assert dict(p.schema) == PATTERN_SCHEMA
    by_hkl = {r["hkl"]: r for r in p.iter_rows(named=True)}
    # Bragg's law with Cu K-alpha (1.5418 A): d(200) = 2.82 A -> 31.70 deg, d(220) = 1.994 A -> 45.45 deg
    assert by_hkl["2 0 0"]["two_theta_deg"] == pytest.approx(31.7, abs=0.1)
    assert by_hkl["2 2 0"]["two_theta_deg"] == pytest.approx(45.4, abs=0.15)
    assert by_hkl["2 0 0"]["d_spacing_a"] == pytest.approx(2.82, abs=1e-6)
    assert by_hkl["2 0 0"]["intensity"] == pytest.approx(100.0)  # the strongest reflection of NaCl
    assert by_hkl["2 2 0"]["multiplicity"] == 12
    assert "1 0 0" not in by_hkl  # F-centring extinguishes mixed-parity reflections
    assert p["wavelength_a"].unique().to_list() == [pytest.approx(1.54184)]


def test_similarity_self_is_one_and_polymorphs_lower():
    nacl = _rocksalt()
    assert structure_similarity(nacl, nacl.copy()) == pytest.approx(1.0)
    # Same composition, other polymorphs: CsCl-type and zinc blende (the latter has the same
    # F lattice and the same peak positions; only intensities tell it apart).
    assert structure_similarity(nacl, _cscl_type()) < 0.2
    zb = structure_similarity(nacl, _zincblende())
    assert 0.2 < zb < 0.99
    # A 1 % larger cell shifts every peak: still the same pattern shape, but not identical.
    assert structure_similarity(nacl, _rocksalt(5.70)) < 0.9


def test_pairwise_table_and_matrix():
    p = xrd_patterns(["a", "b", "c"], [_rocksalt(), _cscl_type(), _rocksalt()])
    ids, m = similarity_matrix(p)
    assert ids == ["a", "b", "c"]
    assert m[0, 2] == pytest.approx(1.0) and m[0, 0] == pytest.approx(1.0)
    pairs = pattern_similarity(p)
    assert pairs.height == 3
    top = pairs.row(0, named=True)
    assert {top["candidate_id_a"], top["candidate_id_b"]} == {"a", "c"}
    assert top["cosine_similarity"] == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(ValueError, match="2 ids for 1 structures"):
        xrd_patterns(["a", "b"], [_rocksalt()])
    with pytest.raises(ValueError, match="two_theta_range"):
        xrd_patterns(["a"], [_rocksalt()], two_theta_range=(90.0, 10.0))
    assert xrd_patterns([], []).height == 0


def test_plot_renders_png():
    from lib.plots import figure_png

    p = xrd_patterns(["x1", "x2"], [_rocksalt(), _zincblende()])
    png = figure_png(plot_patterns(p, labels={"x1": "NaCl Fm-3m"}))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    empty = figure_png(plot_patterns(pl.DataFrame(schema=PATTERN_SCHEMA)))
    assert empty[:4] == b"\x89PNG"


def test_report_over_tables_keeps_ids_and_failures():
    from lib.xrd import REPORT_ID_COLUMNS, xrd_report

    nacl, cscl = _rocksalt(), _cscl_type()
    cells = pl.DataFrame({
        "candidate_id": ["c1", "c2", "c1"],
        "reduced_formula": ["NaCl", "NaCl", "NaCl"],
        "lattice_matrix": [s.lattice.matrix.ravel().tolist() for s in (nacl, cscl, nacl)],
        "species": [[x.specie.symbol for x in s] for s in (nacl, cscl, nacl)],
        "frac_coords": [s.frac_coords.tolist() for s in (nacl, cscl, nacl)],
    })
    broken = cells.head(1).with_columns(candidate_id=pl.lit("bad"), species=pl.lit(["Na"]))
    rep = xrd_report({"shortlist": cells, "discoveries": broken})
    assert rep.n_patterns == 3  # the repeated c1 gets its own, suffixed id
    assert set(rep.peaks["pattern_id"]) == {"shortlist:c1", "shortlist:c2", "shortlist:c1-2"}
    assert set(REPORT_ID_COLUMNS) <= set(rep.peaks.columns)
    assert rep.failures[0][:2] == ("discoveries", "bad") and "species" in rep.failures[0][2]
    assert rep.per_table["discoveries"] == {"rows": 1, "patterns": 0, "failed": 1}
    top = rep.similarity.row(0, named=True)
    assert {top["pattern_id_a"], top["pattern_id_b"]} == {"shortlist:c1", "shortlist:c1-2"}
    assert rep.labels["shortlist:c2"] == "NaCl [shortlist] c2"
