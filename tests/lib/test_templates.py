"""lib.templates: decoding, rejections, filters, symmetry exactness, quality metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib import wyckoff
from lib.cells import asu_to_structure, lattice_matrices, lattice_matrix
from lib.encoding import DEFAULT_SCHEMA, encode_templates, encodings_to_numpy
from lib.templates import (
    TEMPLATE_COLUMNS,
    TemplateFilters,
    build_templates,
    check_symmetry,
    constrain_lattices,
    decode_templates,
    density_overlap,
    quality_report,
    spglib_operations,
    template_fingerprints,
    total_variation,
    training_density,
)
from tests.lib.test_encoding import real_training_rows

NO_FILTERS = TemplateFilters(min_distance_a=0.0, min_density_per_a3=0.0, max_density_per_a3=1e9, max_atoms=10_000)


@pytest.fixture(scope="module")
def training_rows(mp_file: Path) -> pl.DataFrame:
    return real_training_rows(mp_file)


def test_real_rows_decode_to_themselves(training_rows: pl.DataFrame) -> None:
    x = encodings_to_numpy(encode_templates(training_rows))
    res = decode_templates(x, checkpoint_id="ckpt-test", filters=NO_FILTERS)
    assert res.n_valid == training_rows.height, res.rejects
    out = res.templates
    assert tuple(out.columns) == TEMPLATE_COLUMNS
    assert out["template_id"].str.starts_with("tpl-").all()
    # every template matches its source row: group, sorted letters, atom count, lattice
    src = training_rows.with_columns(pl.col("wyckoff_letters").list.sort().list.join(" ").alias("_l"))
    got = out.with_columns(pl.col("wyckoff_letters").list.join(" ").alias("_l"))
    for a, b in zip(src.iter_rows(named=True), got.iter_rows(named=True), strict=False):
        assert a["spacegroup_number"] == b["spacegroup_number"] and a["_l"] == b["_l"]
        assert a["n_atoms"] == b["n_atoms"]
        np.testing.assert_allclose([a["a_a"], a["c_a"], a["beta_deg"]], [b["a_a"], b["c_a"], b["beta_deg"]],
                                   rtol=1e-4)
        assert b["wyckoff_sequence"] == f"{b['spacegroup_number']} {b['_l']}"
    sym = check_symmetry(out)
    assert sym["is_symmetric"].all()
    # the rebuild path every consumer uses gives the same cell size
    r = out.row(0, named=True)
    s = asu_to_structure(r["spacegroup_number"], r["wyckoff_letters"], ["Si"] * r["n_sites"],
                         r["asu_frac_coords"], tuple(r[c] for c in ("a_a", "b_a", "c_a", "alpha_deg",
                                                                     "beta_deg", "gamma_deg")))
    assert len(s) == r["n_atoms"]
    assert abs(s.volume - r["volume_a3"]) < 1e-6 * s.volume


def test_random_vectors_are_exactly_symmetric() -> None:
    """Random points in the generator's output range (tanh): every kept template is symmetric."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(3000, DEFAULT_SCHEMA.dim)).astype(np.float32)
    res = decode_templates(x, checkpoint_id="ckpt-test", filters=NO_FILTERS)
    assert res.templates.height > 500
    assert sum(res.rejects.values()) + res.n_valid == 3000
    sym = check_symmetry(res.templates)
    assert sym["is_symmetric"].all(), sym.filter(~pl.col("is_symmetric")).head()
    assert sym["max_deviation_a"].max() < 1e-6
    assert (sym["n_ops"] >= 1).all()


def _frame(sg, letters, coords, lat, **extra) -> pl.DataFrame:
    d = {"template_id": ["tpl-x"], "spacegroup_number": [sg], "wyckoff_letters": [letters],
         "asu_frac_coords": [coords], **{c: [float(v)] for c, v in
                                       zip(("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg"), lat,
                                           strict=True)}}
    d.update({k: [v] for k, v in extra.items()})
    return pl.DataFrame(d)


def test_symmetry_check_catches_broken_templates() -> None:
    cubic = (4.0, 4.0, 4.0, 90.0, 90.0, 90.0)
    good = _frame(221, ["a", "b", "c"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]], cubic,
                  multiplicities=[1, 1, 3], n_atoms=5)
    assert check_symmetry(good)["is_symmetric"].to_list() == [True]
    off_position = _frame(221, ["a"], [[0.1, 0.0, 0.0]], cubic)
    assert check_symmetry(off_position)["is_symmetric"].to_list() == [False]
    not_cubic = _frame(221, ["a"], [[0.0, 0.0, 0.0]], (4.0, 4.0, 4.3, 90.0, 90.0, 90.0))
    assert check_symmetry(not_cubic)["is_symmetric"].to_list() == [False]
    wrong_mult = _frame(221, ["c"], [[0.0, 0.5, 0.5]], cubic, multiplicities=[6], n_atoms=6)
    assert check_symmetry(wrong_mult)["is_symmetric"].to_list() == [False]
    hexagonal_ok = _frame(194, ["c"], [[1 / 3, 2 / 3, 0.25]], (3.0, 3.0, 5.0, 90.0, 90.0, 120.0))
    assert check_symmetry(hexagonal_ok)["is_symmetric"].to_list() == [True]


def test_spglib_setting_matches_pyxtal_for_origin_choice_groups() -> None:
    # Fd-3m: pyxtal uses origin choice 2, spglib's smallest Hall number is origin choice 1
    _, _, hall = spglib_operations(227)
    assert hall == 526
    _, _, hall = spglib_operations(225)
    assert hall == 523


def _raw(sg, sites, lat):
    n = len(sites)
    present = np.zeros((1, 4), bool)
    li = np.zeros((1, 4), np.int64)
    xyz = np.zeros((1, 4, 3))
    for j, (letter, p) in enumerate(sites):
        present[0, j] = True
        li[0, j] = wyckoff.letter_index(sg, letter)
        xyz[0, j] = p
    assert n <= 4
    return np.array([sg]), present, li, xyz, np.array([lat], float)


def test_rejections_are_counted() -> None:
    cubic = (4.0, 4.0, 4.0, 90.0, 90.0, 90.0)
    cases = {
        "duplicate_fixed_site": _raw(221, [("a", (0, 0, 0)), ("a", (0, 0, 0))], cubic),
        # (0.8, 0, 0) is a point of the orbit of (0.2, 0, 0): the two 6e sites are one orbit
        "overlapping_orbits": _raw(221, [("e", (0.2, 0, 0)), ("e", (0.8, 0, 0))], (9.0, 9.0, 9.0, 90, 90, 90)),
        "min_distance": _raw(221, [("a", (0, 0, 0)), ("e", (0.1, 0, 0))], cubic),
        "too_many_atoms": _raw(225, [("l", (0.1, 0.2, 0.3))], (9.0, 9.0, 9.0, 90, 90, 90)),
        "density_low": _raw(221, [("a", (0, 0, 0))], (30.0, 30.0, 30.0, 90, 90, 90)),
        "invalid_lattice": _raw(2, [("i", (0.1, 0.2, 0.3))], (4.0, 4.0, 4.0, 170.0, 170.0, 170.0)),
    }
    filters = TemplateFilters(max_atoms=100)
    for why, raw in cases.items():
        res = build_templates(*raw, checkpoint_id="ckpt-test", filters=filters)
        assert res.rejects[why] == 1, (why, res.rejects)
        assert res.n_valid == 0
    # a general position collapsing onto a special one: its own orbit has coinciding points
    deg = _raw(221, [("n", (0.0, 0.0, 0.0))], (9.0, 9.0, 9.0, 90, 90, 90))
    res = build_templates(*deg, checkpoint_id="ckpt-test", filters=TemplateFilters(max_atoms=1000))
    assert res.rejects["degenerate_orbit"] == 1
    ok = build_templates(*_raw(221, [("a", (0, 0, 0)), ("b", (0.5, 0.5, 0.5))], cubic),
                         checkpoint_id="ckpt-test", filters=filters)
    assert ok.n_valid == 1 and ok.templates["n_atoms"].to_list() == [2]
    np.testing.assert_allclose(ok.templates["min_distance_a"][0], 4.0 * np.sqrt(3) / 2)


def test_min_distance_matches_pymatgen() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(400, DEFAULT_SCHEMA.dim)).astype(np.float32)
    res = decode_templates(x, checkpoint_id="ckpt-test", filters=NO_FILTERS)
    for r in res.templates.head(15).iter_rows(named=True):
        s = asu_to_structure(r["spacegroup_number"], r["wyckoff_letters"], ["Si"] * r["n_sites"],
                             r["asu_frac_coords"], tuple(r[c] for c in ("a_a", "b_a", "c_a", "alpha_deg",
                                                                         "beta_deg", "gamma_deg")))
        dm = s.distance_matrix + np.eye(len(s)) * 1e9
        bound = min(dm.min(), min(s.lattice.abc))
        # the exact periodic minimum over every pair and image (self-images included): in a skewed
        # cell a lattice vector combination can be shorter than a, b and c, so search the sphere
        _, _, _, dist = s.get_neighbor_list(bound + 1e-3)
        want = float(dist[dist > 1e-8].min())
        assert r["min_distance_a"] == pytest.approx(want, rel=1e-6)


def test_lattice_helpers_agree_with_wyckoff() -> None:
    p = np.array([[4.0, 5.0, 6.0, 80.0, 95.0, 105.0], [3.0, 3.1, 7.0, 90.0, 90.0, 120.0]])
    m = lattice_matrices(p)
    for i in range(2):
        np.testing.assert_allclose(m[i], lattice_matrix(*p[i]), atol=1e-12)
    c = constrain_lattices(np.array([2, 191]), p)
    np.testing.assert_allclose(c[1], wyckoff.constrain_lattice(191, *p[1]))
    np.testing.assert_allclose(c[0], p[0])


def test_metric_known_values() -> None:
    assert density_overlap(np.arange(100.0), np.arange(100.0)) == pytest.approx(1.0)
    assert density_overlap(np.zeros(50) + 0.01, np.zeros(50) + 0.2) == pytest.approx(0.0)
    # half the mass of q sits where p has none
    p = np.full(100, 0.05)
    q = np.concatenate([np.full(50, 0.05), np.full(50, 0.15)])
    assert density_overlap(p, q, bins=10, quantile_range=(0.0, 1.0)) == pytest.approx(0.5)
    assert total_variation(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 1])) == pytest.approx(0.5)
    assert total_variation(np.array([3]), np.array([3])) == 0.0


def test_quality_report_and_fingerprints(training_rows: pl.DataFrame) -> None:
    x = encodings_to_numpy(encode_templates(training_rows))
    res = decode_templates(x, checkpoint_id="ckpt-test", filters=NO_FILTERS)
    q = quality_report(res, training_rows, symmetry=check_symmetry(res.templates))
    # decoding the training set itself: nothing is novel, densities are the same
    assert q["novelty"] == 0.0 and q["novelty_wyckoff_sequence"] == 0.0
    assert q["density_overlap"] == pytest.approx(1.0)
    assert q["spacegroup_tv"] == pytest.approx(0.0)
    assert q["symmetry_exactness"] == 1.0 and q["validity"] == 1.0
    np.testing.assert_allclose(np.sort(training_density(training_rows)),
                               np.sort(res.templates["number_density_per_a3"].to_numpy()), rtol=1e-4)
    # a representative replaced by another point of its orbit keeps the fingerprint
    r = training_rows.filter(pl.col("spacegroup_number") == 194).head(1)
    if r.height == 0:
        r = res.templates.head(1)
    fp = template_fingerprints(r)
    row = r.row(0, named=True)
    wp = wyckoff.position(row["spacegroup_number"], row["wyckoff_letters"][0])
    orbit = wp.expand(np.array(row["asu_frac_coords"][0]))[0]
    fixed = [p for p in orbit if np.allclose(wp.project(p), p, atol=1e-9)]
    moved = r.with_columns(pl.Series("asu_frac_coords", [[fixed[-1].tolist(), *row["asu_frac_coords"][1:]]]))
    assert template_fingerprints(moved).to_list() == fp.to_list()
