"""lib.novelty: a known MP phase, perturbed and relaxed with a real surrogate, is caught as known.

Real data and model: the shared Ba-Ru-O MP structures (loaded through lib.mp_sources), matgl's
M3GNet-MP-2021.2.8-PES from the shared models folder, relaxations by lib.screening.relax_frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from lib.cells import cell_to_structure, frame_structures, structure_to_cell
from lib.novelty import KNOWN_SCHEMA, known_structures, match_known_phases, novelty_metadata

ELEMENTS = ["Ba", "Ru", "O"]
TIGHT = {"ltol": 0.05, "stol": 0.05, "angle_tol": 1.0}


@pytest.fixture(scope="module")
def mp(ba_ru_o_dir: Path) -> pl.DataFrame:
    from lib.mp_sources import load_mp_source

    return load_mp_source(str(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")).structures


def mp_structure(mp: pl.DataFrame, material_id: str) -> Structure:
    row = mp.filter(pl.col("material_id") == material_id).row(0, named=True)
    return cell_to_structure(row["lattice_matrix"], row["species"], row["frac_coords"])


def perturbed_ba2ruo4(mp: pl.DataFrame) -> Structure:
    """mp-1025237 (Ba2RuO4, I4/mmm) with its cell vectors strained by +3 / -2 / +4 % and every
    atom rattled by 0.05 A (seeded)."""
    s = mp_structure(mp, "mp-1025237").copy()
    s.apply_strain([0.03, -0.02, 0.04])
    rng = np.random.default_rng(7)
    return Structure(s.lattice, s.species, s.cart_coords + rng.normal(0.0, 0.05, (len(s), 3)),
                     coords_are_cartesian=True)


def layered_ba2ruo4() -> Structure:
    """A different Ba2RuO4 with the same 7 atoms: RuO2 planes and BaO rock-salt layers stacked
    without the body-centring shift (P4/mmm)."""
    return Structure.from_spacegroup(123, Lattice.tetragonal(4.0, 6.8), ["Ru", "O", "O", "Ba"],
                                     [[0, 0, 0], [0, 0.5, 0], [0, 0, 0.3], [0.5, 0.5, 0.3]])


@pytest.fixture(scope="module")
def inputs(mp: pl.DataFrame) -> pl.DataFrame:
    """Candidates in the relaxed table's cell form, plus the MP phase itself (relaxed as a reference)."""
    rows = [("cand-perturbed", perturbed_ba2ruo4(mp)), ("cand-layered", layered_ba2ruo4()),
            ("mp-1025237", mp_structure(mp, "mp-1025237"))]
    return pl.DataFrame([{"candidate_id": k, **structure_to_cell(s)} for k, s in rows])


@pytest.fixture(scope="module")
def relaxed(inputs: pl.DataFrame, m3gnet_dir: Path) -> pl.DataFrame:
    import torch

    from lib.screening import relax_frame
    from lib.surrogates import load_surrogate

    torch.set_num_threads(1)
    sur = load_surrogate("M3GNet-MP-2021.2.8-PES", models_dir=str(m3gnet_dir))
    out = relax_frame(sur, inputs).rename({"key": "candidate_id"})
    assert out["status"].to_list() == ["ok"] * 3, out["error"].to_list()
    assert out["is_converged"].all()
    return out


@pytest.fixture(scope="module")
def references(relaxed: pl.DataFrame) -> pl.DataFrame:
    """reference_energies-like rows: the MP phase as relaxed by the surrogate."""
    return relaxed.filter(pl.col("candidate_id") == "mp-1025237").select(
        pl.col("candidate_id").alias("phase_id"), pl.lit("reference").alias("kind"), "status", "energy_ev",
        "lattice_matrix", "species", "frac_coords")


def candidates(relaxed: pl.DataFrame) -> pl.DataFrame:
    return relaxed.filter(pl.col("candidate_id").str.starts_with("cand-"))


def test_known_structures_frame(mp, references):
    known = known_structures(mp_structures=mp, references=references, elements=ELEMENTS)
    assert known.schema == pl.Schema(KNOWN_SCHEMA)
    assert known.filter(pl.col("source") == "mp").height == mp.height  # all 23 are Ba-Ru-O (sub)systems
    ref = known.filter(pl.col("source") == "references").row(0, named=True)
    assert ref["material_id"] == "mp-1025237" and ref["reduced_formula"] == "Ba2RuO4"
    # subsystems only: restricting to Ba-O keeps BaO, BaO2, BaO6, O2 and Ba, nothing with Ru
    bao = known_structures(mp_structures=mp, elements=["Ba", "O"])
    assert set(bao["reduced_formula"]) == {"BaO", "BaO2", "BaO6", "O2", "Ba"}


def test_perturbed_known_phase_relaxes_back_and_is_caught(mp, inputs, relaxed, references):
    known = known_structures(mp_structures=mp, references=references, elements=ELEMENTS)
    cands_in = inputs.filter(pl.col("candidate_id").str.starts_with("cand-"))
    before = match_known_phases(cands_in, known)
    # as built, neither candidate matches anything: the perturbation is beyond pymatgen's tolerances
    assert before["is_novel"].to_list() == [True, True]
    after = match_known_phases(candidates(relaxed), known)
    got = {r["candidate_id"]: r for r in after.iter_rows(named=True)}
    assert got["cand-perturbed"]["known_material_id"] == "mp-1025237"
    assert got["cand-perturbed"]["known_source"] == "mp"
    assert got["cand-perturbed"]["is_novel"] is False
    # the different structure of the same formula stays novel
    assert got["cand-layered"]["known_material_id"] is None and got["cand-layered"]["is_novel"] is True
    # the verdicts are pymatgen's StructureMatcher's (default tolerances) on the same cells
    sm = StructureMatcher()
    ref = mp_structure(mp, "mp-1025237")
    assert [sm.fit(ref, s) for s in frame_structures(cands_in)] == [False, False]
    assert [sm.fit(ref, s) for s in frame_structures(candidates(relaxed))] == [True, False]


def test_surrogate_version_of_known_phase_counts(relaxed, references):
    # only the surrogate-relaxed reference is known, at tight tolerances: still caught
    known = known_structures(references=references)
    out = match_known_phases(candidates(relaxed), known, **TIGHT)
    assert out["known_material_id"].to_list() == ["mp-1025237", None]
    assert out["known_source"].to_list() == ["references", None]


def test_source_priority_and_metadata(mp, relaxed, references):
    known = known_structures(mp_structures=mp, references=references, elements=ELEMENTS)
    out = match_known_phases(candidates(relaxed), known, source_priority=("references", "mp"))
    assert out["known_source"].to_list() == ["references", None]
    meta = novelty_metadata(out.with_columns(pl.lit(None, pl.String).alias("duplicate_of")))
    assert (meta["ltol"], meta["stol"], meta["angle_tol"]) == (0.2, 0.3, 5.0)
    assert (meta["n_novel"], meta["n_known"], meta["n_unchecked"], meta["n_duplicate"]) == (1, 1, 0, 0)
    assert meta["known_by_material"] == {"mp-1025237": 1}


def test_dft_result_of_same_candidate_is_not_known(relaxed):
    # a DFT result holding the perturbed candidate's own relaxed cell: not known for that
    # candidate, known for any other candidate that relaxed into it
    row = candidates(relaxed).filter(pl.col("candidate_id") == "cand-perturbed")
    dft = row.select(pl.lit("dftres-0001").alias("result_id"), "candidate_id", pl.lit("ok").alias("status"),
                     "lattice_matrix", "species", "frac_coords")
    known = known_structures(dft_results=dft)
    assert match_known_phases(row, known)["is_novel"].to_list() == [True]
    other = row.with_columns(pl.lit("cand-other").alias("candidate_id"))
    hit = match_known_phases(other, known)
    assert hit["known_material_id"].to_list() == ["dftres-0001"] and hit["known_source"].to_list() == ["dft_results"]


def test_subsystem_phase_and_unrelaxed_rows(mp):
    known = known_structures(mp_structures=mp, elements=ELEMENTS)
    bao = Structure.from_spacegroup(225, Lattice.cubic(5.3), ["Ba", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    frame = pl.DataFrame([
        {"candidate_id": "c-bao", "status": "ok", **structure_to_cell(bao)},
        {"candidate_id": "c-failed", "status": "error", "lattice_matrix": None, "species": None, "frac_coords": None},
    ], schema_overrides={"lattice_matrix": pl.List(pl.Float64), "species": pl.List(pl.String),
                         "frac_coords": pl.List(pl.List(pl.Float64))})
    out = match_known_phases(frame, known)
    assert out["known_material_id"].to_list() == ["mp-1342", None]
    assert out["is_novel"].to_list() == [False, None]
    assert out.height == 2  # nothing dropped


def test_bad_input(mp):
    known = known_structures(mp_structures=mp, elements=ELEMENTS)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['lattice_matrix'"):
        match_known_phases(pl.DataFrame({"candidate_id": ["a"]}), known)
    with pytest.raises(ValueError, match="must be > 0"):
        match_known_phases(mp.rename({"material_id": "candidate_id"}), known, ltol=0.0)
    dup = mp.head(2).rename({"material_id": "candidate_id"}).with_columns(pl.lit("x").alias("candidate_id"))
    with pytest.raises(ValueError, match="duplicate candidate_id"):
        match_known_phases(dup, known)
    with pytest.raises(ValueError, match="no known structures"):
        match_known_phases(mp.rename({"material_id": "candidate_id"}), known.head(0))
    assert match_known_phases(mp.rename({"material_id": "candidate_id"}).head(2), known.head(0),
                              allow_empty_known=True)["is_novel"].to_list() == [True, True]
    with pytest.raises(ValueError, match=r"dft_results lacks column\(s\) \['result_id'"):
        known_structures(dft_results=pl.DataFrame({"candidate_id": ["a"]}))
