"""Atom infill: canonicalisation (same crystal once, different crystals apart), rows, volumes, store atomicity."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher

from lib import wyckoff
from lib.cells import asu_to_structure, candidate_structures
from lib.infill import (
    CANDIDATE_SCHEMA,
    assignment_table,
    chemical_system,
    expected_volume,
    infill,
    iter_infill,
    random_templates,
)
from lib.store import TableStore


def template(sg: int, letters: list[str], coords: list[list[float]], lat: tuple, tid: str = "tpl-test") -> pl.DataFrame:
    """One row of the ``templates`` contract."""
    mult = [wyckoff.position(sg, let).multiplicity for let in letters]
    coords = [[float(v) for v in xyz] for xyz in coords]
    vol = float(wyckoff.cell_volume(*lat))
    return pl.DataFrame({
        "template_id": [tid], "checkpoint_id": ["ckpt-test"], "spacegroup_number": [sg],
        "crystal_system": [wyckoff.crystal_system(sg)], "n_sites": [len(letters)],
        "wyckoff_letters": [letters], "multiplicities": [mult], "asu_frac_coords": [coords],
        "a_a": [lat[0]], "b_a": [lat[1]], "c_a": [lat[2]], "alpha_deg": [lat[3]], "beta_deg": [lat[4]],
        "gamma_deg": [lat[5]], "volume_a3": [vol], "n_atoms": [sum(mult)],
        "number_density_per_a3": [sum(mult) / vol], "min_distance_a": [1.5],
        "wyckoff_sequence": [f"{sg} " + " ".join(letters)],
    })


def all_assignments(tpl: pl.DataFrame, elements: list[str]):
    """Every surjective assignment as a pymatgen Structure (the brute-force reference)."""
    import itertools

    row = tpl.row(0, named=True)
    lat = tuple(row[c] for c in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg"))
    out = []
    for a in itertools.product(elements, repeat=len(row["wyckoff_letters"])):
        if set(a) == set(elements):
            out.append(asu_to_structure(row["spacegroup_number"], row["wyckoff_letters"], list(a),
                                        row["asu_frac_coords"], lat))
    return out


def n_distinct_crystals(structures) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(StructureMatcher().group_structures(structures))


CUBIC = (4.0, 4.0, 4.0, 90.0, 90.0, 90.0)


def test_chemical_system_string() -> None:
    assert chemical_system(["Ru", "O", "Ba"]) == "Ba-O-Ru"
    with pytest.raises(ValueError, match="unknown element"):
        chemical_system(["Ba", "Xx"])


def test_cscl_sites_swapped_by_origin_shift_fold_to_one() -> None:
    # Pm-3m 1a + 1b: (1/2,1/2,1/2) is in the normalizer, so A:1a B:1b == B:1a A:1b.
    tpl = template(221, ["a", "b"], [[0, 0, 0], [0.5, 0.5, 0.5]], CUBIC)
    r = infill(tpl, elements=["Cs", "Cl"])
    assert r.n_assignments == 2
    assert r.n_candidates == 1 and r.n_folded_symmetry == 1
    assert n_distinct_crystals(all_assignments(tpl, ["Cs", "Cl"])) == 1


def test_perovskite_assignments_stay_apart() -> None:
    # 1a/1b/3c: the origin shift maps {a,b,c} to {b,a,d}, a different template: 6 different crystals.
    tpl = template(221, ["a", "b", "c"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]], CUBIC)
    r = infill(tpl, elements=["Ba", "Ru", "O"])
    assert r.n_candidates == 6 and r.n_folded_symmetry == 0
    assert r.candidates["fingerprint"].n_unique() == 6
    assert n_distinct_crystals(candidate_structures(r.candidates)) == 6
    seqs = set(r.candidates["wyckoff_species_sequence"].to_list())
    assert "Ba:1a Ru:1b O:3c" in seqs and "Ru:1a Ba:1b O:3c" in seqs
    row = r.candidates.filter(pl.col("wyckoff_species_sequence") == "Ba:1a Ru:1b O:3c").row(0, named=True)
    assert row["reduced_formula"] == "BaRuO3" and row["formula"] == "Ba1 Ru1 O3" and row["n_atoms"] == 5


def test_four_fixed_sites_fold_exactly_like_structure_matcher() -> None:
    # {1a,1b,3c,3d} is mapped onto itself by the origin shift (a<->b, c<->d): 36 -> 18.
    tpl = template(221, ["a", "b", "c", "d"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5], [0.5, 0, 0]], CUBIC)
    r = infill(tpl, elements=["Ba", "Ru", "O"])
    assert r.n_assignments == 36
    assert r.n_candidates == 18 and r.n_folded_symmetry == 18
    assert n_distinct_crystals(all_assignments(tpl, ["Ba", "Ru", "O"])) == 18
    assert n_distinct_crystals(candidate_structures(r.candidates)) == 18  # none of the kept ones coincide


def test_free_sites_related_by_a_normalizer_translation() -> None:
    # P-1: two 2i sites half a cell apart along a are swapped by t(1/2,0,0).
    lat = (5.0, 5.5, 6.0, 80.0, 95.0, 100.0)
    x = [0.11, 0.23, 0.37]
    same = template(2, ["i", "i"], [x, [x[0] + 0.5, x[1], x[2]]], lat)
    r = infill(same, elements=["Ba", "O"])
    assert (r.n_candidates, r.n_folded_symmetry) == (1, 1)
    assert n_distinct_crystals(all_assignments(same, ["Ba", "O"])) == 1
    # shift the second site off the half-translation: the two assignments are different crystals
    apart = template(2, ["i", "i"], [x, [0.61, 0.05, 0.82]], lat)
    r2 = infill(apart, elements=["Ba", "O"])
    assert (r2.n_candidates, r2.n_folded_symmetry) == (2, 0)
    assert n_distinct_crystals(all_assignments(apart, ["Ba", "O"])) == 2


def test_assignment_table_counts() -> None:
    table, n_allowed = assignment_table(4, 3, "", True, False)
    assert n_allowed == 36 and table.shape == (36, 4)
    table, n_allowed = assignment_table(3, 3, "", False, True)  # every non-empty subset
    assert n_allowed == 27
    table, n_allowed = assignment_table(2, 2, "10", True, False)
    assert n_allowed == 2 and table.tolist() == [[0, 1]]


def test_random_templates_rows_follow_the_contract() -> None:
    tpl = random_templates(150, seed=7, spacegroups=[2, 14, 62, 139, 166, 194, 221, 225])
    assert tpl.height == 150 and tpl["template_id"].is_unique().all()
    assert (tpl["min_distance_a"] >= 1.0).all()
    r = infill(tpl, elements=["Ba", "Ru", "O"])
    c = r.candidates
    assert dict(c.schema) == CANDIDATE_SCHEMA
    assert c.height > 0 and c["candidate_id"].is_unique().all()
    assert c["candidate_id"].str.starts_with("cand-").all()
    assert c["fingerprint"].null_count() == 0
    # every candidate has all three elements (surjective default) and nothing else
    assert c["asu_species"].list.eval(pl.element().n_unique()).explode().eq(3).all()
    assert (c["chemical_system"] == "Ba-O-Ru").all() and (c["volume_mode"] == "template").all()
    # counts add up: allowed = kept + folded
    assert r.n_assignments == c.height + r.n_folded_symmetry + r.n_folded_fingerprint
    # a rebuilt structure has the row's composition and atom count
    s = candidate_structures(c.head(3))
    for st, row in zip(s, c.head(3).iter_rows(named=True), strict=True):
        assert len(st) == row["n_atoms"] and st.composition.reduced_formula == row["reduced_formula"]
    # same input, same ids (content hashes)
    again = infill(tpl, elements=["O", "Ru", "Ba"]).candidates
    assert again["candidate_id"].to_list() == c["candidate_id"].to_list()


def test_options_subsystems_max_atoms_and_rescaled_volume() -> None:
    tpl = random_templates(60, seed=3, spacegroups=[62, 139, 194, 225])
    full = infill(tpl, elements=["Ba", "Ru", "O"])
    subs = infill(tpl, elements=["Ba", "Ru", "O"], allow_subsystems=True)
    assert subs.n_candidates > full.n_candidates
    assert subs.candidates["asu_species"].list.eval(pl.element().n_unique()).explode().min() == 1
    binaries = infill(tpl, elements=["Ba", "Ru", "O"], require_all_elements=False)
    n_el = binaries.candidates["asu_species"].list.eval(pl.element().n_unique()).explode()
    assert n_el.min() == 2 and n_el.max() == 3
    small = infill(tpl, elements=["Ba", "Ru", "O"], max_atoms=8)
    assert small.n_templates_filtered_max_atoms > 0 and (small.candidates["n_atoms"] <= 8).all()
    res = infill(tpl, elements=["Ba", "Ru", "O"], volume_mode="rescaled").candidates
    assert (res["volume_mode"] == "rescaled").all()
    counts = np.array([[1, 1, 3]])  # Ba, O, Ru order is irrelevant here: one composition
    v = expected_volume(counts, ["Ba", "Ru", "O"])[0]
    assert 40 < v < 100  # BaRuO3: 1.1 x covalent-sphere volumes ~ 64 A^3 per formula unit
    # rescaled volume per atom is the composition's, whatever the template's volume was
    joined = res.join(full.candidates.select("candidate_id"), on="candidate_id", how="anti")
    assert joined.height == res.height  # the volume mode is part of the id
    vol = wyckoff.cell_volume(*(res[c].to_numpy() for c in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg")))
    assert np.allclose(vol, res["volume_a3"].to_numpy(), rtol=1e-9)


def test_bad_templates_are_quarantined_with_reasons() -> None:
    good = template(221, ["a", "b", "c"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]], CUBIC, tid="tpl-good")
    bad_letter = template(221, ["a", "b", "c"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]], CUBIC, tid="tpl-bad")
    bad_letter = bad_letter.with_columns(pl.lit(["a", "b", "zz"]).alias("wyckoff_letters"))
    ragged = good.with_columns(pl.lit("tpl-ragged").alias("template_id"),
                               pl.lit([[0.0, 0.0, 0.0]]).alias("asu_frac_coords"))
    r = infill(pl.concat([good, bad_letter, ragged]), elements=["Ba", "Ru", "O"])
    assert r.n_candidates == 6
    reasons = dict(zip(r.rejects["template_id"], r.rejects["reason"], strict=True))
    assert reasons == {"tpl-bad": "unknown_wyckoff", "tpl-ragged": "ragged_sites"}
    assert r.rejects["detail"].str.contains("templates row").all()
    with pytest.raises(ValueError, match="lacks column"):
        infill(good.drop("asu_frac_coords"), elements=["Ba", "O"])


def test_streamed_write_is_atomic_and_repeatable(store: TableStore) -> None:
    tpl = random_templates(80, seed=11, spacegroups=[14, 62, 139, 225])
    first = store.write("candidates", iter_infill(tpl, elements=["Ba", "Ru", "O"], batch_templates=25),
                        partition="Ba-O-Ru", max_rows_per_shard=100)
    before = store.read("candidates", "Ba-O-Ru").sort("candidate_id")
    assert first.rows == before.height and len(first.files) > 1

    def crashing():
        stream = iter_infill(tpl, elements=["Ba", "Ru", "O"], batch_templates=25)
        yield next(stream)
        raise RuntimeError("infill worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        store.write("candidates", crashing(), partition="Ba-O-Ru", max_rows_per_shard=100)
    after = store.read("candidates", "Ba-O-Ru").sort("candidate_id")
    assert after.equals(before)
    versions = [d for d in store.partition_dir("candidates", "Ba-O-Ru").iterdir() if d.is_dir()]
    assert len(versions) == 1
    # a repeat replaces the partition: same rows, no duplicates
    store.write("candidates", iter_infill(tpl, elements=["Ba", "Ru", "O"], batch_templates=40),
                partition="Ba-O-Ru", max_rows_per_shard=100)
    again = store.read("candidates", "Ba-O-Ru").sort("candidate_id")
    assert again.height == before.height and again["candidate_id"].is_unique().all()
    assert again.equals(before)
