"""Validity by construction (issue 15): the decoder's repairs keep templates exactly symmetric.

Hand-built templates check the free-parameter push, the isotropic rescaling and the dropping of
a repeated fixed site against coordinates worked out by hand; a small WGAN trained here on real
MP rows (the shared file, through the mp group's own functions) gives real generator output on
which every repair mode is compared with no repair on the same samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib import gan, wyckoff
from lib.cells import asu_to_structure, lattice_matrices
from lib.encoding import DEFAULT_SCHEMA, decode_vectors, encode_templates, encodings_to_numpy
from lib.templates import (
    REPAIR_MODES,
    TemplateFilters,
    build_templates,
    check_symmetry,
    expand_sites,
    periodic_distances,
)
from lib.wyckoff import constrain_lattices
from tests.lib.test_encoding import real_training_rows

TETRAGONAL = (5.0, 5.0, 10.0, 90.0, 90.0, 90.0)


def _raw(sg: int, sites: list[tuple[str, tuple[float, float, float]]], lat) -> tuple:
    present = np.zeros((1, 4), bool)
    li = np.zeros((1, 4), np.int64)
    xyz = np.zeros((1, 4, 3))
    for j, (letter, p) in enumerate(sites):
        present[0, j] = True
        li[0, j] = wyckoff.letter_index(sg, letter)
        xyz[0, j] = p
    return np.array([sg]), present, li, xyz, np.array([lat], float)


def _coords(res) -> dict[str, list[float]]:
    row = res.templates.row(0, named=True)
    return dict(zip(row["wyckoff_letters"], row["asu_frac_coords"], strict=True))


def test_filters_validate_and_serialise() -> None:
    f = TemplateFilters(repair="free_params+rescale", max_rescale=1.2, dedupe_fixed_sites=True)
    assert f.to_dict()["repair"] == "free_params+rescale" and f.to_dict()["max_rescale"] == 1.2
    assert TemplateFilters().repair == "none"
    with pytest.raises(ValueError, match="repair must be one of"):
        TemplateFilters(repair="snap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rescale"):
        TemplateFilters(max_rescale=0.9)


def test_free_params_push_pair_apart_exactly() -> None:
    """P4/mmm 2g (0, 0, z) with z = 0.03, c = 10 Å: its two atoms (0, 0, ±z) are 0.6 Å apart.

    One push moves the reference by half the missing distance to the target 1.02 Å (the other
    atom is its mirror image and moves the other way): z = 0.03 + 0.21 / 10 = 0.051, so the pair
    ends exactly at 1.02 Å, x and y stay 0."""
    raw = _raw(123, [("g", (0.0, 0.0, 0.03))], TETRAGONAL)
    none = build_templates(*raw, checkpoint_id="ckpt-test", filters=TemplateFilters())
    assert none.rejects["min_distance"] == 1 and none.n_valid == 0
    res = build_templates(*raw, checkpoint_id="ckpt-test", filters=TemplateFilters(repair="free_params"))
    assert res.n_valid == 1 and res.repairs["free_params"] == 1 and res.repairs["free_params_attempted"] == 1
    np.testing.assert_allclose(_coords(res)["g"], [0.0, 0.0, 0.051], atol=1e-12)
    assert res.templates["min_distance_a"][0] == pytest.approx(1.02, abs=1e-12)
    np.testing.assert_allclose(res.templates["c_a"][0], 10.0)  # the lattice is untouched
    assert res.repair_stats["free_params_shift_mean_a"] == pytest.approx(0.21, abs=1e-12)
    assert check_symmetry(res.templates)["is_symmetric"].all()


def test_free_params_do_not_move_fixed_sites() -> None:
    """1a (0, 0, 0) fixed + 2g at z = 0.03 (0.3 Å from 1a): the 2g reference takes the whole
    missing distance to the fixed atom (1.02 − 0.3 = 0.72 Å) plus half of its own pair's
    (0.21 Å): z = 0.03 + 0.93 / 10 = 0.123; 1a stays at the origin."""
    raw = _raw(123, [("a", (0.0, 0.0, 0.0)), ("g", (0.0, 0.0, 0.03))], TETRAGONAL)
    res = build_templates(*raw, checkpoint_id="ckpt-test", filters=TemplateFilters(repair="free_params"))
    assert res.n_valid == 1
    c = _coords(res)
    np.testing.assert_allclose(c["a"], [0.0, 0.0, 0.0], atol=0)
    np.testing.assert_allclose(c["g"], [0.0, 0.0, 0.123], atol=1e-12)
    assert res.templates["min_distance_a"][0] == pytest.approx(1.23, abs=1e-12)
    assert check_symmetry(res.templates)["is_symmetric"].all()
    # two fixed atoms too close cannot be repaired by free parameters: rejected as before
    tight = _raw(221, [("a", (0, 0, 0)), ("b", (0.5, 0.5, 0.5))], (1.0, 1.0, 1.0, 90, 90, 90))
    res = build_templates(*tight, checkpoint_id="ckpt-test", filters=TemplateFilters(repair="free_params"))
    assert res.rejects["min_distance"] == 1 and res.repairs["free_params"] == 0


def test_free_params_split_coinciding_atoms() -> None:
    """Coinciding atoms have no push direction of their own: the repair kicks them apart first.
    Two 6e sites of Pm-3m on one orbit ((0.8, 0, 0) is the image of (0.2, 0, 0)) split into two
    orbits; a 48n general position collapsed onto the origin (48 atoms on one point) opens up
    (given more push steps than the default 20)."""
    cubic9 = (9.0, 9.0, 9.0, 90.0, 90.0, 90.0)
    one_orbit = _raw(221, [("e", (0.2, 0.0, 0.0)), ("e", (0.8, 0.0, 0.0))], cubic9)
    assert build_templates(*one_orbit, checkpoint_id="ckpt-test").rejects["overlapping_orbits"] == 1
    res = build_templates(*one_orbit, checkpoint_id="ckpt-test", filters=TemplateFilters(repair="free_params"))
    assert res.n_valid == 1 and res.repairs["free_params"] == 1
    row = res.templates.row(0, named=True)
    assert row["wyckoff_letters"] == ["e", "e"] and row["n_atoms"] == 12 and row["min_distance_a"] >= 1.0
    assert all(p[1] == 0.0 and p[2] == 0.0 for p in row["asu_frac_coords"])  # still (x, 0, 0)
    assert check_symmetry(res.templates)["is_symmetric"].all()
    collapsed = _raw(221, [("n", (0.0, 0.0, 0.0))], cubic9)
    filters = TemplateFilters(repair="free_params", max_atoms=1000, repair_iterations=60)
    res = build_templates(*collapsed, checkpoint_id="ckpt-test", filters=filters)
    assert res.n_valid == 1 and res.templates["n_atoms"][0] == 48 and res.templates["min_distance_a"][0] >= 1.0
    assert check_symmetry(res.templates)["is_symmetric"].all()


def test_rescale_up_to_max_rescale() -> None:
    """P4/mmm 1a with a = 0.95 Å: the atom's own image is 0.95 Å away, so the cell is scaled by
    1/0.95 (a → 1 Å, c → 6/0.95 Å); with a = 0.7 Å the factor 1.43 exceeds max_rescale 1.25."""
    raw = _raw(123, [("a", (0.0, 0.0, 0.0))], (0.95, 0.95, 6.0, 90.0, 90.0, 90.0))
    res = build_templates(*raw, checkpoint_id="ckpt-test", filters=TemplateFilters(repair="rescale"))
    assert res.n_valid == 1 and res.repairs["rescale"] == 1
    row = res.templates.row(0, named=True)
    assert row["a_a"] == pytest.approx(1.0, rel=1e-8) and row["c_a"] == pytest.approx(6.0 / 0.95, rel=1e-8)
    assert row["min_distance_a"] >= 1.0
    assert row["number_density_per_a3"] == pytest.approx(1.0 / (6.0 / 0.95), rel=1e-8)
    assert res.repair_stats["rescale_factor_max"] == pytest.approx(1 / 0.95, rel=1e-8)
    assert check_symmetry(res.templates)["is_symmetric"].all()
    far = _raw(123, [("a", (0.0, 0.0, 0.0))], (0.7, 0.7, 6.0, 90.0, 90.0, 90.0))
    res = build_templates(*far, checkpoint_id="ckpt-test", filters=TemplateFilters(repair="rescale"))
    assert res.n_valid == 0 and res.rejects["min_distance"] == 1 and res.repairs["rescale"] == 0


def test_dedupe_fixed_site() -> None:
    cubic = (4.0, 4.0, 4.0, 90.0, 90.0, 90.0)
    raw = _raw(221, [("a", (0, 0, 0)), ("a", (0, 0, 0)), ("b", (0.5, 0.5, 0.5))], cubic)
    assert build_templates(*raw, checkpoint_id="ckpt-test").rejects["duplicate_fixed_site"] == 1
    res = build_templates(*raw, checkpoint_id="ckpt-test", filters=TemplateFilters(dedupe_fixed_sites=True))
    assert res.n_valid == 1 and res.repairs["dedupe_fixed_site"] == 1
    row = res.templates.row(0, named=True)
    assert row["wyckoff_letters"] == ["a", "b"] and row["n_atoms"] == 2 and row["a_a"] == 4.0
    # with the v2 lattice (volume per atom) the cell shrinks to keep the generator's density 3/64
    res = build_templates(*raw, checkpoint_id="ckpt-test", filters=TemplateFilters(dedupe_fixed_sites=True),
                          keep_volume_per_atom=True)
    assert res.templates["number_density_per_a3"][0] == pytest.approx(3 / 64, rel=1e-12)
    assert check_symmetry(res.templates)["is_symmetric"].all()


# ------------------------------------------------------------------------------- real generator output
@pytest.fixture(scope="module")
def generated(mp_file: Path) -> np.ndarray:
    """2,000 vectors from a small WGAN trained (seeded, a second) on the real MP training rows of
    the shared file's first 120 structures (86 rows)."""
    rows = real_training_rows(mp_file, n_rows=120)
    x = encodings_to_numpy(encode_templates(rows))
    # 30 epochs: about 1 sample in 30 has atoms closer than 1 Å, some of them close enough to the
    # threshold for the rescaling (after 10 epochs the short distances are all below 0.7 Å)
    config = gan.GanConfig(latent_dim=16, generator_hidden=64, critic_hidden=64, attn_tokens=4, epochs=30,
                           batch_size=32, n_critic=2)
    result = gan.train_wgan(x, config=config, seed=3, device="cpu", training_snapshot_id="snap-test-repair")
    return gan.sample_vectors(result.model, 2000, seed=5)


def _min_distance_pymatgen(row: dict) -> float:
    s = asu_to_structure(row["spacegroup_number"], row["wyckoff_letters"], ["Si"] * row["n_sites"],
                         row["asu_frac_coords"], tuple(row[c] for c in wyckoff.LATTICE_COLUMNS))
    _, _, _, dist = s.get_neighbor_list(1.5)
    return float(dist[dist > 1e-8].min()) if np.any(dist > 1e-8) else np.inf


def test_repair_modes_on_generator_output(generated: np.ndarray) -> None:
    raw = decode_vectors(generated, schema=DEFAULT_SCHEMA)
    args = (raw.sg, raw.present, raw.letter_index, raw.xyz, raw.lattice)
    results = {mode: build_templates(*args, checkpoint_id="ckpt-test", filters=TemplateFilters(repair=mode),
                                     keep_volume_per_atom=True) for mode in REPAIR_MODES}
    base = results["none"]
    assert base.rejects["min_distance"] > 50, base.rejects  # the repairs have something to do
    for mode, res in results.items():
        assert res.n_samples == base.n_samples == sum(res.rejects.values()) + res.n_valid
        assert res.validity >= base.validity, (mode, res.validity, base.validity)
        assert (res.templates["min_distance_a"] >= 1.0).all()
        sym = check_symmetry(res.templates)
        assert sym["is_symmetric"].all() and sym["max_deviation_a"].to_numpy().max() < 1e-9, mode
        # rejects other than the minimum distance are those of the unrepaired run or fewer
        assert res.rejects["duplicate_fixed_site"] == base.rejects["duplicate_fixed_site"]
        if mode != "none":
            repaired = res.repairs["free_params"] + res.repairs["rescale"]
            assert repaired > 0 and res.rejects["min_distance"] < base.rejects["min_distance"]
            assert res.n_valid - base.n_valid <= repaired
    fp, rs, both = results["free_params"], results["rescale"], results["free_params+rescale"]
    assert fp.repairs["free_params"] > 0 and fp.repairs["rescale"] == 0 and rs.repairs["free_params"] == 0
    assert both.validity >= max(fp.validity, rs.validity)
    assert 1.0 < rs.repair_stats["rescale_factor_max"] <= 1.25
    # the rescaled templates have a lower density than the generator gave them, by 1/f^3
    assert rs.repair_stats["rescale_density_ratio_mean"] < 1.0
    # independent check of the repaired minimum distances with pymatgen on templates new to the repair
    new = both.templates.filter(~pl.col("template_id").is_in(base.templates["template_id"].implode()))
    assert new.height > 0
    for row in new.head(25).iter_rows(named=True):
        assert _min_distance_pymatgen(row) == pytest.approx(row["min_distance_a"], rel=1e-6)
    # dropping repeated fixed sites adds templates; everything stays symmetric
    dd = build_templates(*args, checkpoint_id="ckpt-test", keep_volume_per_atom=True,
                         filters=TemplateFilters(repair="free_params+rescale", dedupe_fixed_sites=True))
    assert dd.rejects["duplicate_fixed_site"] == 0 and dd.repairs["dedupe_fixed_site"] == base.rejects[
        "duplicate_fixed_site"]
    assert dd.validity >= both.validity
    assert check_symmetry(dd.templates)["is_symmetric"].all()


def test_free_params_keep_group_letters_and_lattice(generated: np.ndarray) -> None:
    """Sample by sample: a template repaired by free parameters has the space group, letters and
    lattice of its sample; only coordinates move, and only within their Wyckoff form."""
    raw = decode_vectors(generated, schema=DEFAULT_SCHEMA)
    lat = constrain_lattices(raw.sg, raw.lattice)
    ex = expand_sites(raw.sg, raw.present, raw.letter_index, raw.xyz)
    rows = np.arange(len(raw.sg))
    d = periodic_distances(ex, lattice_matrices(lat), rows)["min_distance_a"]
    short = np.flatnonzero((d < 1.0) & (d > 0.0))
    assert short.size >= 50
    filters = TemplateFilters(repair="free_params", max_atoms=10_000, min_density_per_a3=0.0, max_density_per_a3=1e9)
    n_fixed = 0
    for i in short.tolist():
        one = (raw.sg[i:i + 1], raw.present[i:i + 1], raw.letter_index[i:i + 1], raw.xyz[i:i + 1],
               raw.lattice[i:i + 1])
        res = build_templates(*one, checkpoint_id="ckpt-test", filters=filters)
        if res.n_valid == 0:
            continue
        n_fixed += 1
        row = res.templates.row(0, named=True)
        assert row["spacegroup_number"] == raw.sg[i]
        want = sorted(wyckoff.letters(int(raw.sg[i]))[k] for k in raw.letter_index[i][raw.present[i]].tolist())
        assert sorted(row["wyckoff_letters"]) == want
        np.testing.assert_allclose([row[c] for c in wyckoff.LATTICE_COLUMNS], lat[i], rtol=1e-12)
        for letter, p in zip(row["wyckoff_letters"], row["asu_frac_coords"], strict=True):
            wp = wyckoff.position(int(raw.sg[i]), letter)
            dev = (wp.project(np.asarray(p)) - np.asarray(p) + 0.5) % 1.0 - 0.5
            assert np.abs(dev).max() < 1e-9  # on its Wyckoff form
        assert row["min_distance_a"] >= 1.0
    assert n_fixed >= short.size // 2
