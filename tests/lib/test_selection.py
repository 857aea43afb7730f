"""lib.selection: stratified pre-screen sample, static hull distances, composition-aware selection.

Real data: the shared MP structures (27,248 rows) for the sampling; matgl's
M3GNet-MP-2021.2.8-PES (shared models) for the static energies of a few Ba-Ru-O candidates and
the relaxed energies of the references; MP's own published energies stand in for surrogate
numbers only in the quota test, which is about the ranking logic (said there).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pymatgen.core import Lattice, Structure

from lib.cells import structure_to_cell
from lib.selection import (
    STATIC_HULL_SCHEMA,
    allocate_strata,
    select_for_relaxation,
    selection_summary,
    static_hull_distance,
    stratified_sample,
)

ELEMENTS = ["Ba", "Ru", "O"]
SG = "spacegroup_number_symprec0.1"


# --------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def mp_rows(mp_file: Path) -> pl.DataFrame:
    return pl.read_csv(mp_file, columns=["material_id", "pretty_formula", SG], infer_schema_length=0)


def test_allocate_strata_proportional_with_minimum_one():
    assert allocate_strata({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    # the small strata get one each; the largest gives them up
    assert allocate_strata({"a": 97, "b": 2, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    # fewer rows than strata: one from each of the largest
    assert allocate_strata({"a": 5, "b": 9, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    assert allocate_strata({"a": 5, "b": 9}, 100) == {"a": 5, "b": 9}
    with pytest.raises(ValueError, match="n must be >= 0"):
        allocate_strata({"a": 1}, -1)


def test_stratified_sample_on_mp_structures(mp_rows):
    n = 1000
    s1 = stratified_sample(mp_rows, n, seed=42, by=SG, key="material_id")
    assert s1.height == n and s1["material_id"].n_unique() == n
    assert s1.columns == mp_rows.columns and s1["material_id"].is_sorted()
    # every one of the 196 space groups is represented, each close to its share
    sizes = dict(mp_rows.group_by(SG).len().iter_rows())
    got = dict(s1.group_by(SG).len().iter_rows())
    assert set(got) == set(sizes)
    for sg, size in sizes.items():
        assert abs(got[sg] - n * size / mp_rows.height) < 2, sg
    # deterministic: independent of input order; a new seed draws other rows
    shuffled = mp_rows.sample(fraction=1.0, shuffle=True, seed=3)
    assert stratified_sample(shuffled, n, seed=42, by=SG, key="material_id").equals(s1)
    s2 = stratified_sample(mp_rows, n, seed=43, by=SG, key="material_id")
    overlap = len(set(s1["material_id"]) & set(s2["material_id"]))
    assert 0 < overlap < n * 0.5
    assert dict(s2.group_by(SG).len().iter_rows()) == got  # the allocation does not depend on the seed
    # fewer rows than strata: one from each of the largest space groups
    few = stratified_sample(mp_rows, 5, seed=1, by=SG, key="material_id")
    largest = mp_rows.group_by(SG).len().sort("len", descending=True).head(5)[SG].to_list()
    assert sorted(few[SG].to_list()) == sorted(largest)
    assert stratified_sample(mp_rows.head(10), 20, seed=1, by=SG, key="material_id").height == 10


def test_stratified_sample_bad_input(mp_rows):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['reduced_formula'\]"):
        stratified_sample(mp_rows, 10, seed=0, key="material_id")
    dup = pl.concat([mp_rows.head(3), mp_rows.head(1)])
    with pytest.raises(ValueError, match="duplicate material_id"):
        stratified_sample(dup, 2, seed=0, by=SG, key="material_id")


# --------------------------------------------------------------------------- static hull distance
@pytest.fixture(scope="module")
def surrogate(m3gnet_dir: Path):
    import torch

    from lib.surrogates import load_surrogate

    torch.set_num_threads(1)
    return load_surrogate("M3GNet-MP-2021.2.8-PES", models_dir=str(m3gnet_dir))


@pytest.fixture(scope="module")
def references(surrogate, ba_ru_o_dir: Path) -> pl.DataFrame:
    """reference_energies-like rows: BaO, BaO2, Ba2RuO4, RuO2 (mp-8909) from the MP file and
    ASE's Ba, Ru, O2, relaxed with the surrogate (as the references asset does)."""
    from lib import screening as scr

    cells = scr.mp_csv_cells(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", elements=ELEMENTS).filter(
        pl.col("phase_id").is_in(["mp-1342", "mp-1105", "mp-1025237", "mp-8909"]))
    phases = scr.reference_phases(ELEMENTS, cells)
    res = scr.relax_frame(surrogate, phases.rename({"phase_id": "candidate_id"}), steps=200)
    assert res["status"].to_list() == ["ok"] * phases.height
    return phases.select("phase_id", "formula", "source").join(
        res.rename({"key": "phase_id"}), on="phase_id").with_columns(
        pl.lit("reference").alias("kind"), pl.lit(surrogate.weights_sha256).alias("surrogate_sha256"))


CANDIDATES = {
    # a Ru-rich rock-salt RuO, a Ba-Ru suboxide, the cubic perovskite, BaO in CsCl
    "cand-ruo-rocksalt": (225, Lattice.cubic(4.2), ["Ru", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "cand-baru2o": (123, Lattice.tetragonal(3.0, 7.5), ["Ba", "Ru", "O"], [[0, 0, 0], [0.5, 0.5, 0.25], [0.5, 0.5, 0.5]]),
    "cand-baruo3-cubic": (221, Lattice.cubic(4.0), ["Ba", "Ru", "O"], [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0]]),
    "cand-bao-cscl": (221, Lattice.cubic(3.3), ["Ba", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "cand-srtio3": (221, Lattice.cubic(3.9), ["Sr", "Ti", "O"], [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0]]),
}


@pytest.fixture(scope="module")
def prescreen(surrogate) -> pl.DataFrame:
    from lib import screening as scr

    rows = []
    for cid, (sg, lat, species, coords) in CANDIDATES.items():
        s = Structure.from_spacegroup(sg, lat, species, coords)
        rows.append({"candidate_id": cid, **structure_to_cell(s), "formula": s.composition.formula.replace(" ", ""),
                     "reduced_formula": s.composition.reduced_formula})
    frame = pl.DataFrame(rows)
    pre = scr.prescreen_frame(surrogate, frame)
    assert pre["status"].to_list() == ["ok"] * len(CANDIDATES)
    return pre.join(frame.select("candidate_id", "formula", "reduced_formula"), on="candidate_id").with_columns(
        pl.lit(surrogate.weights_sha256).alias("surrogate_sha256"))


@pytest.fixture(scope="module")
def static(prescreen, references) -> pl.DataFrame:
    return static_hull_distance(prescreen.filter(pl.col("candidate_id") != "cand-srtio3"), references)


def test_static_hull_distance_matches_screening_hull(static, prescreen, references):
    from lib.screening import formation_and_hull

    for c, dtype in STATIC_HULL_SCHEMA.items():
        assert static.schema[c] == dtype
    assert static["static_hull_error"].null_count() == static.height
    ref = formation_and_hull(references, prescreen.filter(pl.col("candidate_id") != "cand-srtio3"),
                             elements=ELEMENTS).candidates
    both = static.join(ref, on="candidate_id")
    assert both.height == 4
    for a, b in (("static_formation_energy_per_atom_ev", "formation_energy_per_atom_ev"),
                 ("static_e_above_hull_ev_per_atom", "e_above_hull_ev_per_atom")):
        assert (both[a] - both[b]).abs().max() < 1e-9
    bao = static.filter(pl.col("candidate_id") == "cand-bao-cscl").row(0, named=True)
    assert bao["static_decomposition"] == "1.000 mp-1342" and bao["static_e_above_hull_ev_per_atom"] > 0.1


def test_ranking_by_hull_is_not_ranking_by_energy_per_atom(static):
    by_energy = select_for_relaxation(static, 2, rank_by="energy_per_atom")
    by_hull = select_for_relaxation(static, 2, rank_by="e_above_hull")
    by_ef = select_for_relaxation(static, 4, rank_by="formation_energy")
    # the Ru-rich rock salt has the lowest energy per atom, but is far above the hull
    assert by_energy["candidate_id"][0] == "cand-ruo-rocksalt"
    assert by_hull["candidate_id"][0] == "cand-baruo3-cubic"
    assert "cand-ruo-rocksalt" not in by_hull["candidate_id"].to_list()
    assert by_ef["static_formation_energy_per_atom_ev"].is_sorted()
    assert by_hull["selection_rank"].to_list() == [1, 2]
    summary = selection_summary(by_hull)
    assert summary["n_rows"].sum() == 2 and "min_static_e_above_hull_ev_per_atom" in summary.columns


def test_static_hull_errors(prescreen, references):
    out = static_hull_distance(prescreen, references)
    sr = out.filter(pl.col("candidate_id") == "cand-srtio3").row(0, named=True)
    assert sr["static_e_above_hull_ev_per_atom"] is None
    assert "['Sr', 'Ti'] outside the references' system" in sr["static_hull_error"]
    assert out.height == prescreen.height  # nothing dropped
    with pytest.raises(ValueError, match="differ: the hull must be built with the candidates' own surrogate"):
        static_hull_distance(prescreen, references.with_columns(pl.lit("0" * 64).alias("surrogate_sha256")))
    with pytest.raises(ValueError, match=r"no relaxed elemental reference for \['Ru'\]"):
        static_hull_distance(prescreen, references.filter(pl.col("phase_id") != "ase-Ru"), elements=ELEMENTS)


# --------------------------------------------------------------------------- quota
def test_per_composition_quota(ba_ru_o_dir: Path):
    # MP's published energy above the hull and formation energy stand in for the static ones:
    # this test is about the ranking logic only
    mp = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv").select(
        pl.col("material_id").alias("candidate_id"), pl.col("pretty_formula").alias("reduced_formula"),
        pl.lit("ok").alias("status"), pl.col("e_above_hull").alias("static_e_above_hull_ev_per_atom"),
        pl.col("formation_energy_per_atom").alias("static_formation_energy_per_atom_ev"))
    free = select_for_relaxation(mp, 12)
    assert free.filter(pl.col("reduced_formula") == "O2").height >= 2  # polymorphs crowd in without a quota
    capped = select_for_relaxation(mp, 12, per_composition_quota=1)
    assert capped["reduced_formula"].n_unique() == capped.height
    assert capped.filter(pl.col("reduced_formula") == "BaO2")["candidate_id"].to_list() == ["mp-1105"]
    assert capped.filter(pl.col("reduced_formula") == "RuO4")["candidate_id"].to_list() == ["mp-554791"]
    assert capped["static_e_above_hull_ev_per_atom"].is_sorted()
    two = select_for_relaxation(mp, 100, per_composition_quota=2)
    assert two.group_by("reduced_formula").len()["len"].max() == 2
    assert two.height == mp.group_by("reduced_formula").len().select(pl.col("len").clip(upper_bound=2).sum()).item()
    with pytest.raises(ValueError, match="rank_by must be one of"):
        select_for_relaxation(mp, 3, rank_by="energy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['energy_per_atom_ev'\]"):
        select_for_relaxation(mp, 3, rank_by="energy_per_atom")
    with pytest.raises(ValueError, match=r"add them with lib\.selection\.static_hull_distance"):
        select_for_relaxation(mp.drop("static_e_above_hull_ev_per_atom"), 3)
    with pytest.raises(ValueError, match="per_composition_quota must be >= 1"):
        select_for_relaxation(mp, 3, per_composition_quota=0)


def test_max_atoms_keeps_the_best_small_cells(ba_ru_o_dir: Path):
    """``max_atoms``: the best K among cells of at most N atoms (MP's own cells and hull
    distances stand in for the static ones: the ranking logic only)."""
    from pymatgen.core import Structure

    raw = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")
    mp = raw.select(
        pl.col("material_id").alias("candidate_id"), pl.col("pretty_formula").alias("reduced_formula"),
        pl.lit("ok").alias("status"), pl.col("e_above_hull").alias("static_e_above_hull_ev_per_atom"),
        pl.Series("n_atoms", [len(Structure.from_str(c, fmt="cif")) for c in raw["cif"]]))
    small = select_for_relaxation(mp, 5, max_atoms=4)
    assert small.height == 5 and small["n_atoms"].max() <= 4
    assert small["static_e_above_hull_ev_per_atom"].is_sorted()
    expected = mp.filter(pl.col("n_atoms") <= 4).sort("static_e_above_hull_ev_per_atom", "candidate_id").head(5)
    assert small["candidate_id"].to_list() == expected["candidate_id"].to_list()
    assert select_for_relaxation(mp, 5)["n_atoms"].max() > 4  # without the cap larger cells rank in the best 5
    with pytest.raises(ValueError, match="max_atoms must be >= 1"):
        select_for_relaxation(mp, 3, max_atoms=0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['n_atoms'\]"):
        select_for_relaxation(mp.drop("n_atoms"), 3, max_atoms=4)
