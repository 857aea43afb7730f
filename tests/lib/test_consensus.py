"""lib.consensus: the ensemble's aggregates, the lower-confidence-bound order, rank agreement,
and the reference phases as relaxation inputs for another surrogate."""

from __future__ import annotations

import polars as pl
import pytest

from lib import screening as scr
from lib.cells import structure_to_cell
from lib.consensus import consensus_table, rank_agreement, reference_inputs


def _rows(values: dict[str, dict[str, float | None]]) -> pl.DataFrame:
    """One row per (candidate, surrogate); a None energy is a failed evaluation."""
    rows = []
    for prank, (cid, per) in enumerate(values.items(), start=1):
        for sur, e in per.items():
            rows.append({"candidate_id": cid, "evaluated_surrogate": sur, "primary_rank": prank,
                         "status": "ok" if e is not None else "error", "e_above_hull_ev_per_atom": e,
                         "formula": "BaRuO3"})
    return pl.DataFrame(rows)


# "liked-by-one": the primary (A) puts it lowest, the other two surrogates put it high
VALUES = {
    "liked-by-one": {"A": -0.10, "B": 0.20, "C": 0.25},
    "agreed": {"A": 0.02, "B": 0.03, "C": 0.04},
    "higher": {"A": 0.05, "B": 0.06, "C": 0.08},
    "one-failed": {"A": 0.06, "B": None, "C": 0.07},
}


def test_mean_spread_and_lower_confidence_bound():
    mean = consensus_table(_rows(VALUES), rank_by="mean")
    first = mean.filter(pl.col("candidate_id") == "liked-by-one").row(0, named=True)
    assert first["n_surrogates_ok"] == 3
    assert first["e_above_hull_mean_ev_per_atom"] == pytest.approx(0.35 / 3)
    assert first["e_above_hull_spread_ev_per_atom"] == pytest.approx(0.35)
    failed = mean.filter(pl.col("candidate_id") == "one-failed").row(0, named=True)
    assert failed["n_surrogates_ok"] == 2 and failed["e_above_hull_mean_ev_per_atom"] == pytest.approx(0.065)
    assert mean.height == 12  # every row kept, the failed one included
    order = lambda t: t.unique("candidate_id").sort("consensus_rank")["candidate_id"].to_list()  # noqa: E731
    assert order(mean) == ["agreed", "higher", "one-failed", "liked-by-one"]
    assert order(consensus_table(_rows(VALUES), rank_by="primary")) == list(VALUES)
    lcb = consensus_table(_rows(VALUES), rank_by="lcb", kappa=2.0)
    assert order(lcb) == ["agreed", "one-failed", "higher", "liked-by-one"]
    row = lcb.filter(pl.col("candidate_id") == "agreed").row(0, named=True)
    assert row["e_above_hull_lcb_ev_per_atom"] == pytest.approx(0.03 + 2.0 * (2 / 3) ** 0.5 * 0.01)


def test_rank_agreement_and_top_n_overlap():
    table = consensus_table(_rows(VALUES), rank_by="mean")
    agree = rank_agreement(table, primary="A", top_n=2)
    # on the 3 candidates both evaluated, B ranks "liked-by-one" last where A ranks it first
    assert agree["n_common"] == {"A vs B": 3, "A vs C": 4, "B vs C": 3}
    assert agree["spearman"]["B vs C"] == pytest.approx(1.0)
    assert agree["spearman"]["A vs B"] == pytest.approx(-0.5)
    assert agree["top_n_overlap"] == 1  # A's top 2: liked-by-one, agreed; consensus top 2: agreed, higher
    with pytest.raises(ValueError, match="rank_by must be mean, lcb or primary"):
        consensus_table(_rows(VALUES), rank_by="median")  # type: ignore[arg-type]
    dup = pl.concat([_rows(VALUES), _rows(VALUES).head(1)])
    with pytest.raises(ValueError, match="candidate_id=liked-by-one evaluated by A twice"):
        consensus_table(dup)


def test_reference_inputs_keep_molecules_fixed(ba_ru_o_dir):
    cells = scr.mp_csv_cells(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", elements=["Ba", "O", "Ru"]).filter(
        pl.col("phase_id").is_in(["mp-1342", "mp-1977763"]))
    phases = scr.reference_phases(["Ba", "O", "Ru"], cells.filter(pl.col("phase_id") == "mp-1342"))
    # no elemental MP phase given: ASE's Ba (bcc), Ru (hcp) and the O2 molecule in a box
    refs = phases.with_columns(pl.lit("ok").alias("status"), pl.lit("reference").alias("kind"))
    out = reference_inputs(refs)
    flags = dict(zip(out["phase_id"].to_list(), out["is_cell_relaxed"].to_list(), strict=True))
    assert flags == {"mp-1342": True, "ase-Ba": True, "ase-O": False, "ase-Ru": True}
    with pytest.raises(ValueError, match="no relaxed"):
        reference_inputs(refs.with_columns(pl.lit("error").alias("status")))


def test_relaxed_hull_columns_refuses_another_surrogates_hull(ba_ru_o_dir):
    """Real MP energies: the elemental ground states of Ba and O (mp-122, O2) and rocksalt BaO at
    MP's formation energy (-2.824 eV/atom, mp-1342); the hull arithmetic gives that formation
    energy back, and refuses references made by another surrogate."""
    import json

    from pymatgen.core import Lattice, Structure

    elemental = json.loads((ba_ru_o_dir / "mp_elemental_refs_Ba_Ru_O.json").read_text())
    mu = {el: elemental[el]["energy"] / sum(elemental[el]["composition"].values()) for el in ("Ba", "O")}
    mp = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", infer_schema_length=0)
    ef_bao = float(mp.filter(pl.col("material_id") == "mp-1342")["formation_energy_per_atom"][0])
    rs = Structure.from_spacegroup(225, Lattice.cubic(5.5), ["Ba", "O"], [[0, 0, 0], [.5, .5, .5]])
    e_bao = len(rs) * (ef_bao + (mu["Ba"] + mu["O"]) / 2)
    rel = pl.DataFrame([{"candidate_id": "c", "status": "ok", "energy_ev": e_bao, "surrogate_sha256": "aaa",
                         **structure_to_cell(rs)}])
    refs = pl.DataFrame({"phase_id": ["ba", "o"], "formula": ["Ba", "O2"], "energy_ev": [mu["Ba"], 2 * mu["O"]],
                         "status": ["ok", "ok"], "kind": ["reference"] * 2, "surrogate_sha256": ["bbb"] * 2})
    with pytest.raises(ValueError, match="differ: the hull must be built with the candidates' own surrogate"):
        scr.relaxed_hull_columns(rel, refs, elements=["Ba", "O"])
    out = scr.relaxed_hull_columns(rel, refs.with_columns(pl.lit("aaa").alias("surrogate_sha256")),
                                   elements=["Ba", "O"])
    # only the elements on the hull: BaO's formation energy is its energy above (below) the hull
    assert out["formation_energy_per_atom_ev"][0] == pytest.approx(ef_bao, abs=1e-9)
    assert out["e_above_hull_ev_per_atom"][0] == pytest.approx(ef_bao, abs=1e-9)
    assert out["decomposition"][0] is not None
