"""lib.rediscovery on the real Ba-Ru-O MP phases: which can the 4-site generator represent, which
appear among the candidates before relaxation (lib.dedup's MP match) and which among the shortlist
rows after (lib.novelty's match), with their best ranks.

Real data and code: the shared ``ba_ru_o_mp_structures.csv`` (23 phases), lib.symmetry's ASU,
a candidate built by lib.infill from mp-1025237's own Wyckoff ASU, lib.dedup's MP match and
lib.novelty's StructureMatcher on the cells.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pymatgen.core import Lattice, Structure

from lib.cells import candidate_structures, structure_to_cell
from lib.dedup import apply_dedup, dedup_candidates
from lib.infill import infill
from lib.mp_sources import load_mp_source
from lib.novelty import known_structures, match_known_phases
from lib.rediscovery import (
    max_training_asu_sites,
    rediscovery_markdown,
    rediscovery_summary,
    rediscovery_table,
    system_phases,
)
from lib.symmetry import analyse_symmetry
from tests.lib.test_infill import template

ELEMENTS = ["Ba", "Ru", "O"]
TERNARY = {"mp-1025237": 4, "mp-3597": 5, "mp-3598": 6, "mp-17304": 8, "mp-559442": 14}


@pytest.fixture(scope="module")
def mp(ba_ru_o_dir: Path) -> pl.DataFrame:
    return load_mp_source(str(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")).structures


@pytest.fixture(scope="module")
def symmetry(mp: pl.DataFrame) -> pl.DataFrame:
    return analyse_symmetry(mp, symprec=0.1, round_trip_method="none")


@pytest.fixture(scope="module")
def phases(mp: pl.DataFrame, symmetry: pl.DataFrame) -> pl.DataFrame:
    return system_phases(mp, elements=ELEMENTS, symmetry=symmetry)


def test_known_phases_and_their_asu_sites(mp: pl.DataFrame, symmetry: pl.DataFrame, phases: pl.DataFrame) -> None:
    assert phases.height == 23
    ternary = phases.filter(pl.col("n_elements") == 3)
    assert dict(ternary.select("material_id", "n_asu_sites").iter_rows()) == TERNARY
    # without mp_symmetry the ASU is analysed here, with the same result
    computed = system_phases(mp, elements=ELEMENTS)
    assert computed.equals(phases)
    # a subsystem keeps only its own phases
    assert set(system_phases(mp, elements=["Ru", "O"], symmetry=symmetry)["reduced_formula"]) == {"RuO2",
                                                                                                "RuO4", "O2"}
    assert max_training_asu_sites(symmetry.filter(pl.col("n_asu_sites") <= 4)) == 4
    assert max_training_asu_sites(None, default=6) == 6
    with pytest.raises(ValueError, match="lacks column"):
        system_phases(mp.drop("species"), elements=ELEMENTS)


def test_rediscovered_before_and_after_relaxation(mp: pl.DataFrame, symmetry: pl.DataFrame,
                                                  phases: pl.DataFrame) -> None:
    # before relaxation: mp-1025237's ASU as a template, filled by lib.infill, matched by lib.dedup
    sym = symmetry.filter(pl.col("material_id") == "mp-1025237").row(0, named=True)
    tpl = template(sym["spacegroup_number"], list(sym["wyckoff_letters"]), sym["asu_frac_coords"],
                   tuple(sym[c] for c in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg")),
                   tid="tpl-mp-1025237")
    cands = infill(tpl, elements=ELEMENTS).candidates
    res = dedup_candidates(cands, mp_structures=mp, elements=ELEMENTS)
    dedup = apply_dedup(cands, res.unique)
    hit = dedup.filter(pl.col("is_known_in_mp"))
    assert hit["mp_material_id"].to_list() == ["mp-1025237"]
    hit_id = hit["candidate_id"][0]
    other = dedup.filter(~pl.col("is_known_in_mp"))["candidate_id"][0]

    # after relaxation: shortlist rows whose cells lib.novelty matches to the known phases
    known_cell = structure_to_cell(candidate_structures(hit)[0])
    layered = structure_to_cell(Structure.from_spacegroup(
        123, Lattice.tetragonal(4.0, 6.8), ["Ru", "O", "O", "Ba"],
        [[0, 0, 0], [0, 0.5, 0], [0, 0, 0.3], [0.5, 0.5, 0.3]]))  # a Ba2RuO4 that MP does not hold
    rows = pl.DataFrame([
        {"candidate_id": "cand-layered", "rank": 1, "unique_rank": 1, "duplicate_of": None, **layered},
        {"candidate_id": hit_id, "rank": 2, "unique_rank": 2, "duplicate_of": None, **known_cell},
        {"candidate_id": "cand-twin", "rank": 3, "unique_rank": None, "duplicate_of": hit_id, **known_cell},
    ], schema_overrides={"duplicate_of": pl.String, "unique_rank": pl.Int64})
    shortlist = match_known_phases(rows, known_structures(mp_structures=mp, elements=ELEMENTS))
    assert shortlist["known_material_id"].to_list() == [None, "mp-1025237", "mp-1025237"]

    table = rediscovery_table(phases, elements=ELEMENTS, max_asu_sites=4, candidates=dedup,
                              relaxed_ids=[hit_id, "cand-layered"], shortlist=shortlist)
    row = table.filter(pl.col("material_id") == "mp-1025237").row(0, named=True)
    assert row["can_appear"] and row["is_representable"] and row["unreachable_reason"] is None
    assert (row["n_candidates_before_relaxation"], row["n_selected_matching_before"]) == (1, 1)
    assert (row["n_relaxed_rows_matching"], row["n_unique_rows_matching"]) == (2, 1)
    assert (row["best_rank"], row["best_unique_rank"]) == (2, 2)
    assert row["candidate_ids_after"] == [hit_id, "cand-twin"]
    hexa = table.filter(pl.col("material_id") == "mp-3597").row(0, named=True)
    assert not hexa["can_appear"] and hexa["unreachable_reason"] == "5 ASU sites > 4"
    bao = table.filter(pl.col("material_id") == "mp-1342").row(0, named=True)
    assert bao["is_representable"] and not bao["can_appear"] and "places all of Ba/O/Ru" in bao["unreachable_reason"]

    s = rediscovery_summary(table)
    assert s["n_known_phases"] == 23 and s["n_known_phases_all_elements"] == 5
    assert s["can_appear"] == ["mp-1025237 Ba2RuO4"]
    # the four larger ternary phases and two 6-site BaO2 polymorphs need more than 4 ASU sites
    assert sorted(x.split()[0] for x in s["not_representable"]) == sorted(
        {*TERNARY, "mp-1182141", "mp-1182259"} - {"mp-1025237"})
    assert s["before_relaxation"] == {"mp-1025237 Ba2RuO4": 1}
    assert s["after_relaxation_best_unique_rank"] == {"mp-1025237 Ba2RuO4": 2}
    md = rediscovery_markdown(table)
    assert "| mp-1025237 | Ba2RuO4 | 139 | 4 | yes | 1 / 1 | 2 (1) | 2 | 2 |" in md
    assert md.count("\n") == 23 + 1
    # a larger generator could represent the hexagonal BaRuO3 polytypes
    wide = rediscovery_summary(rediscovery_table(phases, elements=ELEMENTS, max_asu_sites=6))
    assert wide["n_can_appear"] == 3 and wide["n_before_relaxation"] == 0
    assert other not in shortlist["candidate_id"].to_list()
    with pytest.raises(ValueError, match="shortlist lacks column"):
        rediscovery_table(phases, elements=ELEMENTS, shortlist=shortlist.drop("unique_rank"))
