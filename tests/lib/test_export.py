"""lib.export: rebuild structures from cell and ASU rows, write every format, read it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from lib.export import (
    detect_structure_columns,
    export_structures,
    key_value_pairs,
    structures_from_frame,
    unique_names,
)


def _nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _perovskite() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.0), ["Ba", "Ru", "O"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])


def _rutile() -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.49, 3.11), ["Ru", "O"],
                                     [[0, 0, 0], [0.305, 0.305, 0]])


ASU_ROWS = pl.DataFrame({
    "candidate_id": ["cand-nacl", "cand-perov", "cand-rutile"],
    "formula": ["Na4Cl4", "BaRuO3", "Ru2O4"],
    "spacegroup_number": [225, 221, 136],
    "asu_letters": [["a", "b"], ["a", "b", "c"], ["a", "f"]],
    "asu_species": [["Na", "Cl"], ["Ba", "Ru", "O"], ["Ru", "O"]],
    "asu_frac_coords": [[[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]],
                        [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]],
                        [[0.0, 0.0, 0.0], [0.305, 0.305, 0.0]]],
    "a_a": [5.64, 4.0, 4.49], "b_a": [5.64, 4.0, 4.49], "c_a": [5.64, 4.0, 3.11],
    "alpha_deg": [90.0] * 3, "beta_deg": [90.0] * 3, "gamma_deg": [90.0] * 3,
    "energy_per_atom_ev": [-3.37, -7.1, None],
})
EXPECTED = {"cand-nacl": _nacl(), "cand-perov": _perovskite(), "cand-rutile": _rutile()}


def _cell_rows(structs: dict[str, Structure]) -> pl.DataFrame:
    return pl.DataFrame({
        "candidate_id": list(structs),
        "lattice_matrix": [s.lattice.matrix.ravel().tolist() for s in structs.values()],
        "species": [[site.specie.symbol for site in s] for s in structs.values()],
        "frac_coords": [s.frac_coords.tolist() for s in structs.values()],
        "energy_ev": [-10.0 * len(s) for s in structs.values()],
        "is_dynamically_stable": [True] * len(structs),
    })


def test_asu_rows_rebuild_the_known_crystals():
    built = structures_from_frame(ASU_ROWS)
    assert built.failures == []
    m = StructureMatcher()
    for rid, s in zip(built.ids, built.structures, strict=True):
        assert m.fit(s, EXPECTED[rid]), rid
        assert len(s) == len(EXPECTED[rid])  # conventional cell, same atom count


def test_cell_layout_wins_and_asu_can_be_forced():
    both = ASU_ROWS.join(_cell_rows({"cand-nacl": _nacl().scale_lattice(200.0)}), on="candidate_id")
    assert detect_structure_columns(both).layout == "cell"
    assert structures_from_frame(both).structures[0].volume == pytest.approx(200.0)
    assert structures_from_frame(both, layout="asu").structures[0].volume == pytest.approx(5.64**3)


def test_mp_symmetry_style_aliases_and_missing_columns():
    alias = ASU_ROWS.rename({"asu_letters": "wyckoff_letters", "asu_species": "asu_elements",
                             "candidate_id": "material_id"})
    spec = detect_structure_columns(alias)
    assert spec.layout == "asu" and spec.id_column == "material_id"
    with pytest.raises(ValueError, match="lattice_matrix, species, frac_coords"):
        detect_structure_columns(ASU_ROWS.drop("asu_frac_coords"))


def test_bad_rows_are_reported_not_dropped():
    bad = pl.concat([
        ASU_ROWS,
        ASU_ROWS.head(1).with_columns(candidate_id=pl.lit("cand-badletter"), asu_letters=pl.lit(["a", "zz"])),
        ASU_ROWS.head(1).with_columns(candidate_id=pl.lit("cand-nan"), a_a=pl.lit(float("nan"))),
    ])
    built = structures_from_frame(bad)
    assert len(built.structures) == 3
    reasons = dict(built.failures)
    assert set(reasons) == {"cand-badletter", "cand-nan"}
    assert "no Wyckoff position 'zz'" in reasons["cand-badletter"]
    assert "not finite" in reasons["cand-nan"]


def test_every_format_reads_back(tmp_path: Path):
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifParser

    m = StructureMatcher()
    res = export_structures(ASU_ROWS, fmt="cif", out=tmp_path / "cifs")
    assert sorted(p.name for p in res.files) == ["cand-nacl.cif", "cand-perov.cif", "cand-rutile.cif"]
    for p in res.files:
        assert m.fit(CifParser(str(p)).parse_structures(primitive=False)[0], EXPECTED[p.stem])

    res = export_structures(ASU_ROWS, fmt="cif", out=tmp_path / "all.cif", cif_symprec=0.01)
    blocks = CifParser(str(res.path)).parse_structures(primitive=False)
    assert len(blocks) == 3 and (tmp_path / "all.cif").read_text().count("data_cand-") == 3
    assert "Fm-3m" in (tmp_path / "all.cif").read_text()  # symmetrised

    res = export_structures(ASU_ROWS, fmt="poscar", out=tmp_path / "poscars")
    for p in res.files:
        s = Structure.from_file(str(p))
        assert m.fit(s, EXPECTED[p.stem]) and p.read_text().startswith(p.stem)

    res = export_structures(ASU_ROWS, fmt="extxyz", out=tmp_path / "x.extxyz")
    frames = read(str(res.path), index=":")
    assert [f.info["candidate_id"] for f in frames] == ASU_ROWS["candidate_id"].to_list()
    assert frames[0].info["energy_per_atom_ev"] == pytest.approx(-3.37)
    assert m.fit(AseAtomsAdaptor.get_structure(frames[2]), _rutile())


def test_ase_db_key_value_pairs_and_energy(tmp_path: Path):
    import ase.db

    cells = _cell_rows(EXPECTED)
    res = export_structures(cells, fmt="ase-db", out=tmp_path / "screened.db")
    db = ase.db.connect(str(res.path))
    rows = {r.candidate_id: r for r in db.select()}
    assert set(rows) == set(EXPECTED)
    r = rows["cand-perov"]
    assert r.reduced_formula == "BaRuO3" and r.is_dynamically_stable is True
    assert r.energy == pytest.approx(-50.0)  # energy_ev attached as the relaxed cell's energy
    np.testing.assert_allclose(r.toatoms().cell[:], _perovskite().lattice.matrix, atol=1e-8)
    with pytest.raises(FileExistsError):
        export_structures(cells, fmt="ase-db", out=tmp_path / "screened.db")
    export_structures(cells.head(1), fmt="ase-db", out=tmp_path / "screened.db", overwrite=True)
    assert ase.db.connect(str(tmp_path / "screened.db")).count() == 1


def test_key_value_pairs_and_names():
    kv = key_value_pairs({"formula": "NaCl", "energy": 1.0, "id": 3, "x": None, "y": float("nan"),
                          "n": np.int64(2), "ok": np.bool_(True), "natoms": 8})
    assert kv == {"formula_text": "NaCl", "energy_value": 1.0, "row_id": 3, "n": 2, "ok": True}
    assert unique_names(["a", "a", "b/c", "a"]) == ["a", "a-2", "b_c", "a-3"]


def test_unknown_format(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_structures(ASU_ROWS, fmt="xyz", out=tmp_path / "x")  # type: ignore[arg-type]


def test_mixed_selection_falls_back_to_asu_per_row():
    mixed = pl.concat([_cell_rows({"cand-relaxed": _rutile()}), ASU_ROWS.head(1)], how="diagonal_relaxed")
    built = structures_from_frame(mixed)
    assert built.failures == [] and built.ids == ["cand-relaxed", "cand-nacl"]
    assert StructureMatcher().fit(built.structures[1], _nacl())
    only_cells = structures_from_frame(mixed, layout="cell")
    assert [f[0] for f in only_cells.failures] == ["cand-nacl"]
    assert "null" in only_cells.failures[0][1]


def test_attach_structures_from_relaxed_then_asu():
    from lib.export import attach_structures, has_structure_columns

    shortlist = pl.DataFrame({"candidate_id": ["cand-perov", "cand-nacl", "cand-perov"],
                              "surrogate_name": ["m3gnet", "m3gnet", "chgnet"],
                              "a_a": [9.9, 9.9, 9.9], "e_above_hull_ev_per_atom": [0.0, 0.01, 0.02]})
    relaxed = _cell_rows({"cand-perov": _perovskite().scale_lattice(70.0)}).with_columns(
        surrogate_name=pl.lit("m3gnet"))
    joined = attach_structures(shortlist, [relaxed, ASU_ROWS])
    built = structures_from_frame(joined)
    # only (cand-perov, m3gnet) has a relaxed cell; the others are reported, not dropped
    assert built.ids == ["cand-perov"] and built.structures[0].volume == pytest.approx(70.0)
    assert sorted(f[0] for f in built.failures) == ["cand-nacl", "cand-perov"]
    # from an ASU source the lattice parameters come along with the coordinates
    from_asu = attach_structures(shortlist, [ASU_ROWS])
    assert has_structure_columns(from_asu) and from_asu["a_a"].to_list() == [4.0, 5.64, 4.0]
    assert structures_from_frame(from_asu).failures == []
    assert attach_structures(ASU_ROWS, [relaxed]) is ASU_ROWS
