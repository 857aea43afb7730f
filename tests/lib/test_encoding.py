"""lib.encoding: schema, encode/decode round trip on real MP rows, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib import wyckoff
from lib.encoding import (
    DEFAULT_SCHEMA,
    ENCODING_VERSION,
    EncodingSchema,
    atoms_per_cell,
    decode_vectors,
    encode_templates,
    encodings_to_numpy,
    letter_counts,
)


def real_training_rows(mp_file: Path, n_rows: int = 60) -> pl.DataFrame:
    """Training-like template rows from the first ``n_rows`` structures of the shared MP file,
    through the mp group's own functions (parse -> symmetry/ASU -> training selection)."""
    from lib.mp_sources import parse_records, raw_from_table_file
    from lib.symmetry import analyse_symmetry
    from lib.training import select_training_rows

    raw = raw_from_table_file(mp_file).head(n_rows)
    parsed = parse_records(raw).filter(pl.col("reason").is_null())
    sym = analyse_symmetry(parsed, symprec=0.1, round_trip_method="direct")
    rows, _ = select_training_rows(sym)
    return rows


@pytest.fixture(scope="module")
def training_rows(mp_file: Path) -> pl.DataFrame:
    rows = real_training_rows(mp_file)
    assert rows.height >= 20, "the slice should give at least 20 training rows"
    return rows


def test_schema_layout_and_json(tmp_path: Path) -> None:
    s = DEFAULT_SCHEMA
    assert s.version == ENCODING_VERSION
    assert s.dim == 230 + 4 * (1 + 27 + 3) + 6 == 360
    blocks = sorted(s.layout().values())
    assert blocks[0][0] == 0 and blocks[-1][1] == s.dim
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))  # contiguous
    assert EncodingSchema.load(s.save(tmp_path / "enc.json")) == s
    assert EncodingSchema.from_json(EncodingSchema(max_sites=6).to_json()).dim == 230 + 6 * 31 + 6


def test_round_trip_on_real_training_rows(training_rows: pl.DataFrame) -> None:
    enc = encode_templates(training_rows)
    assert enc["encoding_version"].unique().to_list() == [ENCODING_VERSION]
    x = encodings_to_numpy(enc)
    assert x.shape == (training_rows.height, 360) and x.dtype == np.float32
    assert np.abs(x).max() <= 1.0
    d = decode_vectors(x)
    assert d.sg.tolist() == training_rows["spacegroup_number"].to_list()
    for i, row in enumerate(training_rows.iter_rows(named=True)):
        got = sorted(
            (wyckoff.letters(row["spacegroup_number"])[d.letter_index[i, j]], *np.round(d.xyz[i, j], 5))
            for j in range(4) if d.present[i, j])
        want = sorted((letter, *np.round(np.mod(xyz, 1.0), 5))
                      for letter, xyz in zip(row["wyckoff_letters"], row["asu_frac_coords"], strict=True))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g[0] == w[0]
            np.testing.assert_allclose(g[1:], w[1:], atol=2e-5)
        lat = [row[c] for c in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg")]
        np.testing.assert_allclose(d.lattice[i], lat, rtol=2e-5, atol=2e-4)


def test_encoding_is_order_invariant(training_rows: pl.DataFrame) -> None:
    multi = training_rows.filter(pl.col("wyckoff_letters").list.len() >= 2)
    assert multi.height > 0
    rev = multi.with_columns(pl.col("wyckoff_letters").list.reverse(), pl.col("asu_frac_coords").list.reverse())
    np.testing.assert_array_equal(encodings_to_numpy(encode_templates(multi)),
                                  encodings_to_numpy(encode_templates(rev)))


def _row(**kw) -> dict:
    base = {"material_id": "x-1", "spacegroup_number": 221, "wyckoff_letters": ["a"],
            "asu_frac_coords": [[0.0, 0.0, 0.0]], "a_a": 4.0, "b_a": 4.0, "c_a": 4.0,
            "alpha_deg": 90.0, "beta_deg": 90.0, "gamma_deg": 90.0}
    base.update(kw)
    return base


def test_bad_rows_are_named() -> None:
    bad_letter = pl.DataFrame([_row(), _row(material_id="x-2", wyckoff_letters=["z"])])
    with pytest.raises(ValueError, match=r"x-2"):
        encode_templates(bad_letter)
    five = pl.DataFrame([_row(material_id="x-5", wyckoff_letters=["a"] * 5,
                              asu_frac_coords=[[0.0, 0.0, 0.0]] * 5)])
    with pytest.raises(ValueError, match=r"x-5"):
        encode_templates(five)
    with pytest.raises(ValueError, match="lacks columns"):
        encode_templates(pl.DataFrame({"spacegroup_number": [221]}))
    neg = pl.DataFrame([_row(material_id="x-9", a_a=-1.0)])
    with pytest.raises(ValueError, match="x-9"):
        encode_templates(neg)


def test_decode_masks_groups_and_letters() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2000, DEFAULT_SCHEMA.dim)).astype(np.float32)
    d = decode_vectors(x, allowed_spacegroups=[2, 225])
    assert set(np.unique(d.sg).tolist()) <= {2, 225}
    assert np.all(d.letter_index < letter_counts()[d.sg][:, None])
    assert np.all((d.xyz >= 0) & (d.xyz < 1))
    # v2 lattice: the cell is scaled to (V/N) * N inside the 6..72 A^3/atom window, after the
    # crystal system's constraints (cubic a = b = c, 90 deg); only triclinic rows whose random
    # angles form no cell come out NaN
    from lib.wyckoff import cell_volume
    finite = np.isfinite(d.lattice).all(axis=1)
    assert np.all(finite[d.sg == 225]) and finite.mean() > 0.5
    vpa = cell_volume(*(d.lattice[finite, i] for i in range(6))) / atoms_per_cell(
        d.sg[finite], d.letter_index[finite], d.present[finite])
    assert np.all((vpa >= 6.0 - 1e-6) & (vpa <= 72.0 + 1e-6))
    cub = d.lattice[d.sg == 225]
    np.testing.assert_allclose(cub[:, 1], cub[:, 0])
    np.testing.assert_allclose(cub[:, 2], cub[:, 0])
    np.testing.assert_allclose(cub[:, 3:], 90.0)
    with pytest.raises(ValueError):
        decode_vectors(x, allowed_spacegroups=[0])
    with pytest.raises(ValueError):
        decode_vectors(x[:, :10])


def test_v1_schema_json_still_decodes_lengths() -> None:
    """Old checkpoints' schema (no lattice_encoding key) keep the ln a, ln b, ln c layout."""
    import json
    d = json.loads(EncodingSchema().to_json())
    d["version"] = "wyckoff-asu-v1"
    d.pop("lattice_encoding")
    v1 = EncodingSchema.from_dict(d)
    assert v1.lattice_encoding == "ln_abc"
    x = np.zeros((1, v1.dim), dtype=np.float32)
    x[0, 224] = 1.0  # Fm-3m
    x[0, v1.lattice_offset + 3:] = 0.0
    out = decode_vectors(x, schema=v1)
    np.testing.assert_allclose(out.lattice[0, :3], np.exp(v1.ln_length_center))
