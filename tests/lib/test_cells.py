"""lib.cells: lattice parameters <-> matrices, cells <-> Structures, ASU rebuild, shared helpers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pymatgen.core import Lattice, Structure

from lib.cells import (
    ASU_COLUMNS,
    asu_to_structure,
    atomic_number,
    candidate_structures,
    cell_to_structure,
    element_symbol,
    frame_structures,
    lattice_matrices,
    lattice_matrix,
    lattice_parameters,
    minimum_image,
    structure_to_cell,
)

PARAMS = np.array([[4.0, 5.0, 6.0, 80.0, 95.0, 105.0], [3.0, 3.1, 7.0, 90.0, 90.0, 120.0],
                   [5.5, 5.5, 5.5, 90.0, 90.0, 90.0]])


def test_lattice_matrix_and_parameters_round_trip_like_pymatgen() -> None:
    for p in PARAMS:
        m = lattice_matrix(*p)
        np.testing.assert_allclose(lattice_parameters(m), p, rtol=1e-12)
        np.testing.assert_allclose(lattice_parameters(m), Lattice(m).parameters, rtol=1e-12)
        assert abs(np.linalg.det(m) - Lattice.from_parameters(*p).volume) < 1e-9
    batched = lattice_parameters(lattice_matrices(PARAMS))
    assert batched.shape == (3, 6)
    np.testing.assert_allclose(batched, PARAMS, rtol=1e-12)


def test_impossible_angles_are_refused_or_nan() -> None:
    bad = [4.0, 4.0, 4.0, 30.0, 30.0, 90.0]  # alpha + beta < gamma: no cell
    with pytest.raises(ValueError, match="do not form a cell"):
        lattice_matrix(*bad)
    m = lattice_matrices(np.array([bad, PARAMS[0]]))
    assert np.isnan(m[0]).any() and np.isfinite(m[1]).all()


def test_minimum_image_and_elements() -> None:
    d = np.array([0.9, -0.7, 0.3, 2.2])
    np.testing.assert_allclose(minimum_image(d), [-0.1, 0.3, 0.3, 0.2], atol=1e-12)
    assert atomic_number("Ru") == 44 and element_symbol(44) == "Ru" and element_symbol(atomic_number("O")) == "O"


def test_cell_round_trip_fractional_and_cartesian() -> None:
    s = Structure(Lattice.from_parameters(*PARAMS[0]), ["Ba", "O"], [[0.1, 0.2, 0.3], [0.6, 0.7, 0.9]])
    cell = structure_to_cell(s)
    assert len(cell["lattice_matrix"]) == 9 and cell["species"] == ["Ba", "O"]
    back = cell_to_structure(cell["lattice_matrix"], cell["species"], cell["frac_coords"])
    np.testing.assert_allclose(back.lattice.matrix, s.lattice.matrix)
    np.testing.assert_allclose(back.frac_coords, s.frac_coords)
    cart = cell_to_structure(s.lattice.matrix, ["Ba", "O"], s.cart_coords, cartesian=True)
    np.testing.assert_allclose(cart.frac_coords, s.frac_coords, atol=1e-12)


def _rocksalt(cid: str, a: float, species: list[str]) -> dict:
    return {"candidate_id": cid, "spacegroup_number": 225, "asu_letters": ["a", "b"], "asu_species": species,
            "asu_frac_coords": [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], "a_a": a, "b_a": a, "c_a": a,
            "alpha_deg": 90.0, "beta_deg": 90.0, "gamma_deg": 90.0}


def test_asu_rebuild_gives_the_conventional_cell() -> None:
    s = asu_to_structure(225, ["a", "b"], ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]], (5.64, 5.64, 5.64, 90, 90, 90))
    assert len(s) == 8 and s.composition.reduced_formula == "NaCl"
    assert s.volume == pytest.approx(5.64**3)
    frame = pl.DataFrame([_rocksalt("c1", 5.64, ["Na", "Cl"])])
    assert [len(x) for x in candidate_structures(frame)] == [8]
    with pytest.raises(ValueError, match="lacks column"):
        candidate_structures(frame.drop("a_a"))


def test_frame_structures_report_bad_rows_by_key() -> None:
    bad = _rocksalt("bad", 5.64, ["Na", "Cl"]) | {"asu_letters": ["a", "zz"]}  # Fm-3m has no position zz
    asu = pl.DataFrame([_rocksalt("good", 5.64, ["Na", "Cl"]), bad])
    out = frame_structures(asu)
    assert len(out[0]) == 8
    assert isinstance(out[1], str) and out[1].startswith("candidate_id=bad: cannot rebuild from the ASU")
    # the cell form wins when both are present
    cells = asu.with_columns(pl.Series("lattice_matrix", [list(np.eye(3).ravel() * 3.0)] * 2),
                             pl.Series("species", [["Na"], ["Cl", "Cl"]]),
                             pl.Series("frac_coords", [[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]))
    out = frame_structures(cells)
    assert len(out[0]) == 1 and out[1].startswith("candidate_id=bad: cannot build the cell")
    with pytest.raises(ValueError, match="neither cell columns"):
        frame_structures(asu.drop(ASU_COLUMNS[1]))


def _lib_imports(module: str) -> set[str]:
    """``lib.*`` modules ``module`` imports anywhere in its source, function bodies included."""
    root = Path(__file__).resolve().parents[2]
    tree = ast.parse((root / (module.replace(".", "/") + ".py")).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"lib.{a.name}" for a in node.names] if node.module == "lib" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("lib.") and (root / (n.replace(".", "/") + ".py")).exists()}
    return out


def test_phonons_does_not_reach_screening() -> None:
    """The former cycle lib.phonons <-> lib.screening (through ``_prepared``): nothing lib.phonons
    imports, even inside a function, leads back to lib.screening."""
    seen, todo = set(), ["lib.phonons"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_lib_imports(m))
    assert "lib.screening" not in seen, sorted(seen)
    assert "lib.phonons" in _lib_imports("lib.screening")  # the direction that stays


@pytest.mark.parametrize(("module", "absent"), [("lib.plots", "matplotlib"), ("lib.cells", "pymatgen")])
def test_no_import_time_work(module: str, absent: str) -> None:
    """lib.plots and lib.cells load matplotlib / pymatgen only when a figure or a Structure is made."""
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr
