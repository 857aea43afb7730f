"""Symmetry analysis: space group, Wyckoff ASU in pyxtal's setting, and the round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pymatgen.core import Lattice, Structure

from lib import symmetry as S
from lib import wyckoff as W
from lib.symmetry import SYMMETRY_SCHEMA, analyse_symmetry


def _row(mid: str, s: Structure) -> dict:
    return {"material_id": mid, "lattice_matrix": s.lattice.matrix.reshape(-1).tolist(),
            "species": [x.symbol for x in s.species], "frac_coords": s.frac_coords.tolist(),
            "snapshot_id": "snap-test"}


def _known() -> dict[str, Structure]:
    """Structures of every crystal system, with special positions; most given as primitive cells."""
    return {
        # cubic, F-centred, special positions 4a/4b
        "nacl": Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                          [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure(),
        # cubic, a group with two origin choices (pyxtal uses origin 2: Si on 8a at 1/8,1/8,1/8)
        "si": Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]]).get_primitive_structure(),
        # cubic P, 1a 1b 3c
        "srtio3": Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                            [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]),
        # tetragonal, 4f (x, x, 0)
        "rutile": Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"],
                                            [[0, 0, 0], [0.305, 0.305, 0]]),
        # trigonal, rhombohedral group given as its rhombohedral primitive cell
        "corundum": Structure.from_spacegroup("R-3c", Lattice.hexagonal(4.76, 12.99), ["Al", "O"],
                                              [[0, 0, 0.352], [0.306, 0, 0.25]]).get_primitive_structure(),
        # hexagonal, 2b (1/3, 2/3, z) twice
        "wurtzite": Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.25, 5.2), ["Zn", "O"],
                                              [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]),
        # orthorhombic, Pnma 4c (x, 1/4, z) and 8d
        "pnma": Structure.from_spacegroup("Pnma", Lattice.orthorhombic(5.5, 7.8, 5.4), ["Ca", "Ti", "O", "O"],
                                          [[0.0, 0.25, 0.99], [0, 0, 0.5], [0.07, 0.25, 0.48], [0.71, 0.04, 0.29]]),
        # monoclinic C2/m (unique axis b), given as its primitive cell
        "c2m": Structure.from_spacegroup("C2/m", Lattice.monoclinic(9.0, 3.0, 7.0, 105.0), ["Ga", "O"],
                                         [[0.09, 0, 0.79], [0.17, 0, 0.1]]).get_primitive_structure(),
        # triclinic P-1, general positions
        "p1bar": Structure.from_spacegroup("P-1", Lattice.from_parameters(4.1, 5.3, 6.2, 81, 77, 69),
                                           ["K", "Br"], [[0.12, 0.23, 0.34], [0.61, 0.72, 0.83]]),
    }


EXPECTED = {
    "nacl": (225, ["a", "b"], [4, 4], "cubic"),
    "si": (227, ["a"], [8], "cubic"),
    "srtio3": (221, ["a", "b", "c"], [1, 1, 3], "cubic"),
    "rutile": (136, ["a", "f"], [2, 4], "tetragonal"),
    "corundum": (167, ["c", "e"], [12, 18], "trigonal"),
    "wurtzite": (186, ["b", "b"], [2, 2], "hexagonal"),
    "pnma": (62, ["b", "c", "c", "d"], [4, 4, 4, 8], "orthorhombic"),
    "c2m": (12, ["i", "i"], [4, 4], "monoclinic"),
    "p1bar": (2, ["i", "i"], [2, 2], "triclinic"),
}


@pytest.fixture(scope="module")
def known() -> pl.DataFrame:
    return pl.DataFrame([_row(k, v) for k, v in _known().items()])


@pytest.fixture(scope="module")
def known_out(known: pl.DataFrame) -> pl.DataFrame:
    return analyse_symmetry(known)


def test_schema_and_one_row_per_input(known: pl.DataFrame, known_out: pl.DataFrame) -> None:
    assert known_out.schema == pl.Schema(SYMMETRY_SCHEMA)
    assert known_out["material_id"].to_list() == known["material_id"].to_list()
    assert known_out["snapshot_id"].unique().to_list() == ["snap-test"]


@pytest.mark.parametrize("mid", list(EXPECTED))
def test_known_structures_round_trip(known_out: pl.DataFrame, mid: str) -> None:
    row = known_out.filter(pl.col("material_id") == mid).row(0, named=True)
    sg, letters, mult, system = EXPECTED[mid]
    assert row["round_trip_error"] is None and row["is_round_trip_ok"]
    assert (row["spacegroup_number"], row["wyckoff_letters"], row["multiplicities"], row["crystal_system"]) == (
        sg, letters, mult, system)
    assert row["n_asu_sites"] == len(letters)
    assert row["n_atoms"] == sum(mult)
    assert row["wyckoff_sequence"] == " ".join([str(sg), *letters])
    # every representative is in the form of its position's first pyxtal operation
    for letter, xyz in zip(row["wyckoff_letters"], row["asu_frac_coords"], strict=True):
        wp = W.position(sg, letter)
        assert np.allclose(np.mod(wp.project(np.array(xyz)) - np.array(xyz) + 0.5, 1) - 0.5, 0, atol=1e-6)


def test_special_positions_and_settings(known_out: pl.DataFrame) -> None:
    by = {r["material_id"]: r for r in known_out.iter_rows(named=True)}
    # origin choice 2 of Fd-3m (pyxtal's setting; spglib's default would put Si at 0,0,0)
    assert by["si"]["asu_frac_coords"] == [pytest.approx([0.125, 0.125, 0.125])]
    assert S.pyxtal_hall_number(227) == 526
    # rutile O on 4f (x, x, 0) keeps its free parameter
    o = by["rutile"]["asu_frac_coords"][1]
    assert o[0] == pytest.approx(o[1]) and o[2] == pytest.approx(0.0) and min(o[0], 1 - o[0]) == pytest.approx(0.305, abs=1e-3)
    # rhombohedral group in hexagonal axes: conventional cell with gamma = 120 and 30 atoms
    assert (by["corundum"]["a_a"], by["corundum"]["c_a"], by["corundum"]["gamma_deg"]) == (
        pytest.approx(4.76), pytest.approx(12.99), pytest.approx(120.0))
    # monoclinic unique axis b: alpha = gamma = 90, beta free
    c2m = by["c2m"]
    assert (c2m["alpha_deg"], c2m["gamma_deg"]) == (pytest.approx(90.0), pytest.approx(90.0))
    assert c2m["beta_deg"] == pytest.approx(105.0, abs=1e-3)


def test_origin_shift_and_supercell_do_not_change_the_asu() -> None:
    s = _known()["rutile"].copy()
    s.translate_sites(list(range(len(s))), [0.13, 0.27, 0.41])
    s.make_supercell([[1, 1, 0], [-1, 1, 0], [0, 0, 2]])
    s.perturb(0.01, min_distance=0.0, seed=1)
    out = analyse_symmetry(pl.DataFrame([_row("shifted", s)])).row(0, named=True)
    assert out["is_round_trip_ok"], out["round_trip_error"]
    # the same orbits; spglib may pick another origin of the Euclidean normaliser (a<->b, f<->g)
    assert (out["spacegroup_number"], out["multiplicities"]) == (136, [2, 4])
    assert out["wyckoff_letters"] in (["a", "f"], ["b", "g"])


def test_round_trip_detects_a_wrong_asu() -> None:
    s = _known()["rutile"]
    lat, sp, fc = s.lattice.matrix, [x.symbol for x in s.species], s.frac_coords
    asu = S.asymmetric_unit(lat, sp, fc)
    S.round_trip(lat, sp, fc, asu)
    S.direct_round_trip(lat, sp, fc, asu, asu["dataset"])
    wrong = {**asu, "asu_frac_coords": [asu["asu_frac_coords"][0], [0.2, 0.2, 0.0]]}
    with pytest.raises(S.SymmetryError, match="no_match"):
        S.round_trip(lat, sp, fc, wrong)
    with pytest.raises(S.SymmetryError, match="no_match"):
        S.direct_round_trip(lat, sp, fc, wrong, asu["dataset"])
    swapped = {**asu, "asu_elements": asu["asu_elements"][::-1]}
    with pytest.raises(S.SymmetryError):
        S.round_trip(lat, sp, fc, swapped)


def test_unanalysable_rows_carry_a_reason() -> None:
    # two atoms on top of each other: spglib gives up -> a row with a reason, not a crash
    bad = {"material_id": "overlap", "lattice_matrix": np.eye(3).reshape(-1).tolist(),
           "species": ["Na", "Na"], "frac_coords": [[0, 0, 0], [0, 0, 0]]}
    out = analyse_symmetry(pl.DataFrame([bad]), symprec=0.001).row(0, named=True)
    assert not out["is_round_trip_ok"] and out["spacegroup_number"] is None
    assert out["round_trip_error"].startswith("symmetry_failed: ")
    with pytest.raises(ValueError, match="frac_coords"):
        analyse_symmetry(pl.DataFrame({"material_id": ["x"]}))


def test_shared_sample_matches_mp_space_groups(mp_file: Path) -> None:
    """Real MP structures: our space group equals the file's spglib(0.1) column (but for one
    borderline case); both round-trip methods agree, and (nearly) all pass."""
    from lib.mp_sources import parse_records, raw_from_table_file

    raw = raw_from_table_file(mp_file).slice(5000, 60)
    parsed = parse_records(raw).filter(pl.col("reason").is_null())
    ref = pl.read_csv(mp_file, infer_schema_length=0, n_rows=5060).slice(5000, 60)
    a = analyse_symmetry(parsed, round_trip_method="structure_matcher")
    b = analyse_symmetry(parsed, round_trip_method="direct")
    assert a["is_round_trip_ok"].sum() >= 59
    assert a["is_round_trip_ok"].to_list() == b["is_round_trip_ok"].to_list()
    joined = a.join(ref.select("material_id", pl.col("spacegroup_number_symprec0.1").cast(pl.Int64).alias("ref")),
                    on="material_id")
    # one borderline structure (mp-1298504: C2/m here, P-1 in the file) sits at the tolerance edge
    assert (joined["spacegroup_number"] == joined["ref"]).sum() >= 59


def test_to_primitive_of_centred_cells() -> None:
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    lat, _frac, sp = S.to_primitive(225, nacl.lattice.matrix, nacl.frac_coords, [x.symbol for x in nacl.species])
    assert sorted(sp) == ["Cl", "Na"]
    assert abs(np.linalg.det(lat)) == pytest.approx(nacl.volume / 4)


def test_spacegroup_histogram_is_markdown_image() -> None:
    md = S.spacegroup_histogram(pl.DataFrame({"spacegroup_number": [225, 62], "len": [3, 1]}))
    assert md.startswith("![") and "data:image/png;base64," in md


def test_supercell_inputs_keep_whole_orbits(mp_file: Path) -> None:
    """Regression: MP cells that are supercells of their symmetrised cell at symprec 0.1. spglib's
    ``equivalent_atoms`` splits their orbits; ``crystallographic_orbits`` does not."""
    from lib.mp_sources import parse_records, raw_from_table_file

    ids = ["mp-563010", "mp-1078906", "mp-1043513", "mp-1102092"]
    parsed = parse_records(raw_from_table_file(mp_file).filter(pl.col("material_id").is_in(ids)))
    out = analyse_symmetry(parsed)
    assert dict(zip(out["material_id"], out["wyckoff_sequence"], strict=True)) == {
        "mp-563010": "147 a b d d g", "mp-1102092": "12 a c i i i j",
        "mp-1078906": "148 a b c f", "mp-1043513": "15 e e f f f f"}
    assert out["is_round_trip_ok"].all()


def test_rebuild_cell_is_the_rebuilt_structure(known_out: pl.DataFrame) -> None:
    """The direct round trip's array rebuild gives exactly the numbers of the Structure rebuild."""
    for row in known_out.iter_rows(named=True):
        asu = {"spacegroup_number": row["spacegroup_number"], "wyckoff_letters": row["wyckoff_letters"],
               "asu_elements": row["asu_elements"], "asu_frac_coords": row["asu_frac_coords"],
               "lattice_params": [row[c] for c in W.LATTICE_COLUMNS]}
        lat, frac, species = S.rebuild_cell(asu)
        s = S.rebuild(asu)
        assert np.array_equal(lat, s.lattice.matrix) and np.array_equal(frac, s.frac_coords)
        assert species.tolist() == [x.symbol for x in s.species]


def test_every_round_trip_method_gives_the_same_asu(known: pl.DataFrame, known_out: pl.DataFrame) -> None:
    direct = analyse_symmetry(known, round_trip_method="direct")
    unchecked = analyse_symmetry(known, round_trip_method="none")
    asu_cols = [c for c in SYMMETRY_SCHEMA if c not in ("is_round_trip_ok", "round_trip_error")]
    for out in (direct, unchecked):
        assert out.select(asu_cols).equals(known_out.select(asu_cols))
    assert direct["is_round_trip_ok"].all() and known_out["is_round_trip_ok"].all()
    assert unchecked["is_round_trip_ok"].null_count() == known.height
    with pytest.raises(ValueError, match="round_trip_method"):
        analyse_symmetry(known, round_trip_method="fast")  # type: ignore[arg-type]
