"""Training-table selection (ASU sites, P1, round trip, hold-outs) and its encoding."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from pymatgen.core import Lattice, Structure

from lib.symmetry import analyse_symmetry
from lib.training import (
    build_training_templates,
    normalise_chemical_system,
    select_training_rows,
)


def _row(mid: str, s: Structure) -> dict:
    return {"material_id": mid, "lattice_matrix": s.lattice.matrix.reshape(-1).tolist(),
            "species": [x.symbol for x in s.species], "frac_coords": s.frac_coords.tolist(),
            "snapshot_id": "snap-t"}


@pytest.fixture(scope="module")
def symmetry() -> pl.DataFrame:
    """Real mp_symmetry rows of small structures, plus a P1 one, a 5-site one and a failed one."""
    cubic = Lattice.cubic
    structures = {
        "bao": Structure(cubic(5.5), ["Ba", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),  # 221, 2 sites
        "ruo2": Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.49, 3.1), ["Ru", "O"],
                                          [[0, 0, 0], [0.306, 0.306, 0]]),
        "barup": Structure(cubic(4.0), ["Ba", "Ru", "O", "O", "O"],
                           [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]),
        "nacl": Structure(cubic(2.8), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "p1": Structure(Lattice.from_parameters(4.1, 5.3, 6.2, 81, 77, 69), ["K", "Br"],
                        [[0.1, 0.2, 0.3], [0.55, 0.61, 0.93]]),
        # 5 ASU sites in P4/mmm: a, b, c, d, plus h (1/2, 1/2, z)
        "five": Structure(Lattice.tetragonal(3.9, 7.0), ["Sr", "Ti", "O", "O", "O"],
                          [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0.5, 0.23]]),
    }
    df = analyse_symmetry(pl.DataFrame([_row(k, v) for k, v in structures.items()]))
    failed = df.filter(pl.col("material_id") == "nacl").with_columns(
        pl.lit("failed").alias("material_id"), pl.lit(False).alias("is_round_trip_ok"),
        pl.lit("no_match: test").alias("round_trip_error"))
    return pl.concat([df, failed])


def test_selection_filters_and_counts(symmetry: pl.DataFrame) -> None:
    assert symmetry.filter(pl.col("material_id") == "five")["n_asu_sites"].item() == 5
    selected, report = select_training_rows(symmetry)
    assert sorted(selected["material_id"]) == ["bao", "barup", "nacl", "ruo2"]
    assert report.n_input == 7 and report.n_selected == 4
    assert report.removed == {"round_trip_failed": 1, "spacegroup_below_2": 1, "asu_sites_outside_1_4": 1}
    assert set(selected.columns) >= {"chemical_system", "wyckoff_letters", "asu_frac_coords", "a_a"}
    assert selected.filter(pl.col("material_id") == "barup")["chemical_system"].item() == "Ba-O-Ru"


def test_max_sites_configurable(symmetry: pl.DataFrame) -> None:
    five, _ = select_training_rows(symmetry, max_asu_sites=5)
    assert "five" in five["material_id"].to_list()
    two, report = select_training_rows(symmetry, max_asu_sites=2)
    assert sorted(two["material_id"]) == ["bao", "nacl", "ruo2"]
    assert report.removed["asu_sites_outside_1_2"] == 2


def test_hold_out_chemical_system_and_ids(symmetry: pl.DataFrame) -> None:
    exact, report = select_training_rows(symmetry, exclude_chemical_systems=["Ru-Ba-O"])
    assert sorted(exact["material_id"]) == ["bao", "nacl", "ruo2"]
    assert report.removed["held_out_chemical_system"] == 1
    sub, report = select_training_rows(symmetry, exclude_chemical_systems=["O-Ru-Ba"], exclude_subsystems=True)
    assert sub["material_id"].to_list() == ["nacl"]
    assert report.removed["held_out_chemical_system"] == 3
    ids, report = select_training_rows(symmetry, exclude_material_ids=["nacl", "not-there"])
    assert "nacl" not in ids["material_id"].to_list() and report.removed["held_out_material_id"] == 1


def test_normalise_chemical_system() -> None:
    assert normalise_chemical_system("Ru-Ba-O") == "Ba-O-Ru"
    assert normalise_chemical_system("O,Ba") == "Ba-O"
    with pytest.raises(ValueError, match="Qq"):
        normalise_chemical_system("Ba-Qq")
    with pytest.raises(ValueError, match="ASU site range"):
        select_training_rows(pl.DataFrame(), min_asu_sites=3, max_asu_sites=2)


def test_build_training_templates_encodes(symmetry: pl.DataFrame) -> None:
    from lib.encoding import ENCODING_VERSION, EncodingSchema

    out, report = build_training_templates(symmetry)
    assert out.height == report.n_selected == 4
    assert out["encoding_version"].unique().to_list() == [ENCODING_VERSION]
    dim = EncodingSchema(max_sites=4).dim
    assert out["encoding"].list.len().unique().to_list() == [dim]
    assert out.schema["encoding"] == pl.List(pl.Float32)
    vec = np.array(out["encoding"].to_list())
    assert np.abs(vec).max() <= 1.0
    # the space-group one-hot sits at the row's space group
    sg = out["spacegroup_number"].to_numpy()
    assert (vec[np.arange(len(sg)), sg - 1] == 1.0).all()
    five, _ = build_training_templates(symmetry, max_asu_sites=5)
    assert five["encoding"].list.len().unique().to_list() == [EncodingSchema(max_sites=5).dim]
