"""The fast reader of pymatgen-written P1 CIFs: the same cells as pymatgen's CifParser on real MP
rows, and every text it does not fully understand left to CifParser (junk still rejected, by row)."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lib.mp_sources import fast_p1_cif, load_mp_source, parse_records, raw_from_table_file


@pytest.fixture(scope="module")
def spread(mp_file: Path) -> pl.DataFrame:
    """Every 100th raw record of the shared MP file (273 rows over all of it)."""
    return raw_from_table_file(mp_file).gather_every(100)


def test_fast_reader_equals_cifparser_on_real_rows(spread: pl.DataFrame) -> None:
    # every row takes the fast path, so the comparison is of the two readers
    assert all(fast_p1_cif(t) is not None for t in spread["text"])
    fast = parse_records(spread)
    slow = parse_records(spread, fast_cif=False)
    assert fast["reason"].null_count() == spread.height
    # exactly equal: lattice, site order, coordinates (1/3, 2/3 rounding, wrapping), formulas
    for col in fast.columns:
        assert fast[col].equals(slow[col]), col


def test_fast_reader_keeps_cifparser_site_order_and_rounding(spread: pl.DataFrame) -> None:
    from pymatgen.io.cif import CifParser

    text = spread["text"][0]
    lattice, species, frac = fast_p1_cif(text)  # type: ignore[misc]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = CifParser.from_str(text).parse_structures(primitive=False, check_occu=False)[0]
    assert species == [x.specie.symbol for x in s]
    assert np.array_equal(frac, s.frac_coords) and np.array_equal(lattice, s.lattice.matrix)


def _junk(real: pl.DataFrame) -> dict[str, str]:
    """Bad CIFs made from a real one by small edits, and one valid CIF that is not P1."""
    from pymatgen.io.cif import CifParser, CifWriter

    cif = real["cif"][0]
    atom = next(ln for ln in cif.splitlines() if len(ln.split()) == 7 and ln.strip().endswith(" 1"))
    tok = atom.split()
    c_line = next(ln for ln in cif.splitlines() if ln.startswith("_cell_length_c"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure = CifParser.from_str(real["cif"][1]).parse_structures(primitive=False)[0]
    return {
        "junk-number": cif.replace(atom, atom.replace(tok[3], tok[3] + "abc", 1)),
        "junk-overlap": cif.replace(atom, atom + "\n" + atom.replace(tok[0] + " ", "Se ", 1)),
        "junk-thin": cif.replace(c_line, "_cell_length_c   0.00100000"),
        "junk-truncated": cif[: cif.index(atom)],
        "junk-half-occupied": cif.replace(atom, atom[: atom.rfind(" 1")] + " 0.5"),
        "junk-text": "not a CIF at all\n",
        "symmetrised": str(CifWriter(structure, symprec=0.1)),  # valid, but not P1: CifParser reads it
    }


def test_junk_is_left_to_cifparser_and_rejected_by_row(mp_file: Path, tmp_path: Path) -> None:
    real = pl.read_csv(mp_file, infer_schema_length=0, n_rows=2)
    junk = _junk(real)
    assert all(fast_p1_cif(text) is None for text in junk.values())
    rows = pl.DataFrame({"material_id": [*real["material_id"], *junk], "cif": [*real["cif"], *junk.values()]})
    path = tmp_path / "junk.csv.gz"
    with gzip.open(path, "wb") as fh:
        rows.write_csv(fh)
    loaded = load_mp_source(str(path))
    rejects = {r["material_id"]: r for r in loaded.rejects.to_dicts()}
    assert {k: r["reason"] for k, r in rejects.items()} == {
        "junk-number": "malformed_cif", "junk-overlap": "partial_occupancy", "junk-thin": "malformed_cif",
        "junk-truncated": "malformed_cif", "junk-half-occupied": "partial_occupancy",
        "junk-text": "malformed_cif"}
    # each reject is named by file and CSV line (header = line 1) and says why
    order = rows["material_id"].to_list()
    for mid, r in rejects.items():
        assert r["source_ref"] == f"junk.csv.gz:{order.index(mid) + 2}"
    assert "0.33333300abc" in rejects["junk-number"]["detail"]
    assert "thickness" in rejects["junk-thin"]["detail"]
    assert loaded.structures["material_id"].to_list() == [*real["material_id"], "symmetrised"]
    # the same table as with CifParser alone
    raw = raw_from_table_file(path)
    assert parse_records(raw).equals(parse_records(raw, fast_cif=False))
