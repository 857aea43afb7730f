"""MP sources: the four loaders, validation and quarantine of every kind of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from lib.mp_sources import (
    REJECT_SCHEMA,
    STRUCTURE_SCHEMA,
    MPSourceError,
    load_mp_source,
    parse_records,
    raw_from_table_file,
)

N_GOOD = 6


@pytest.fixture(scope="module")
def real_rows(mp_file: Path) -> pl.DataFrame:
    """A few real MP-20 rows (GaTe, CuNi, ...) from the shared file."""
    return pl.read_csv(mp_file, infer_schema_length=0, n_rows=N_GOOD)


def _write_csv_gz(df: pl.DataFrame, path: Path) -> Path:
    with gzip.open(path, "wb") as fh:
        df.write_csv(fh)
    return path


def _first_atom_line(cif: str) -> str:
    return next(ln for ln in cif.splitlines() if ln.strip().endswith(" 1") and len(ln.split()) == 7)


def _bad_rows(real: pl.DataFrame) -> pl.DataFrame:
    """One row per kind of bad CIF, built from real CIFs by small edits."""
    cif0, cif1 = real["cif"][0], real["cif"][1]
    line = _first_atom_line(cif0)
    partial = cif0.replace(line, line[: line.rfind(" 1")] + " 0.5")
    el = line.split()[0]
    unknown = cif1.replace(f"  {_first_atom_line(cif1).split()[0]}  ", "  Xx  ", 1)
    rows = {
        "material_id": ["bad-malformed", "bad-partial", "bad-unknown", "bad-empty", real["material_id"][2]],
        "cif": ["data_x\n_cell_length_a 4.0\nthis is not a CIF\n", partial, unknown, "", real["cif"][2]],
    }
    assert el and partial != cif0 and unknown != cif1
    other = {c: [None] * 5 for c in real.columns if c not in rows}
    return pl.DataFrame({**rows, **other}, schema={c: pl.String for c in real.columns}).select(real.columns)


def test_mp20_file_with_every_bad_row(real_rows: pl.DataFrame, tmp_path: Path) -> None:
    path = _write_csv_gz(pl.concat([real_rows, _bad_rows(real_rows)]), tmp_path / "mixed.csv.gz")
    loaded = load_mp_source(str(path))
    assert loaded.structures.height == N_GOOD
    assert loaded.structures.schema == pl.Schema(STRUCTURE_SCHEMA)
    assert loaded.rejects.schema == pl.Schema(REJECT_SCHEMA)
    reasons = dict(zip(loaded.rejects["material_id"], loaded.rejects["reason"], strict=True))
    assert reasons == {
        "bad-malformed": "malformed_cif",
        "bad-partial": "partial_occupancy",
        "bad-unknown": "unknown_element",
        "bad-empty": "empty_input",
        real_rows["material_id"][2]: "duplicate_material_id",
    }
    # rows are named by file and line of the CSV (header = 1)
    refs = dict(zip(loaded.rejects["reason"], loaded.rejects["source_ref"], strict=True))
    assert refs["malformed_cif"] == f"mixed.csv.gz:{N_GOOD + 2}"
    assert refs["duplicate_material_id"] == f"mixed.csv.gz:{N_GOOD + 6}"
    dup_detail = loaded.rejects.filter(pl.col("reason") == "duplicate_material_id")["detail"].item()
    assert "mixed.csv.gz:4" in dup_detail  # the row it duplicates
    assert "Xx" in loaded.rejects.filter(pl.col("reason") == "unknown_element")["detail"].item()
    assert loaded.rejects_by_reason()["partial_occupancy"] == 1
    assert loaded.n_input == N_GOOD + 5

    s = loaded.structures.row(0, named=True)
    assert s["material_id"] == real_rows["material_id"][0]
    assert s["reduced_formula"] == real_rows["pretty_formula"][0]
    assert s["nsites"] == int(real_rows["nsites"][0]) == len(s["species"]) == len(s["frac_coords"])
    assert len(s["lattice_matrix"]) == 9
    assert s["chemical_system"] == "-".join(sorted(s["elements"]))
    assert s["formation_energy_per_atom_ev"] == pytest.approx(float(real_rows["formation_energy_per_atom"][0]))
    assert s["source"] == "file:mixed.csv.gz" and s["snapshot_id"].startswith("snap-")


def test_parquet_and_csv_give_the_same_structures(real_rows: pl.DataFrame, tmp_path: Path) -> None:
    real_rows.write_parquet(tmp_path / "mp.parquet")
    real_rows.write_csv(tmp_path / "mp.csv")
    a = load_mp_source(str(tmp_path / "mp.parquet"))
    b = load_mp_source(str(tmp_path / "mp.csv"))
    assert a.structures.drop("source", "snapshot_id").equals(b.structures.drop("source", "snapshot_id"))
    assert a.snapshot_id != load_mp_source(str(_write_csv_gz(real_rows.head(3), tmp_path / "x.csv.gz"))).snapshot_id


@pytest.mark.parametrize("content", [b"", b"material_id,cif\n"])
def test_empty_file_is_quarantined_as_empty_input(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    loaded = load_mp_source(str(path))
    assert loaded.structures.height == 0
    assert loaded.rejects["reason"].to_list() == ["empty_input"]
    assert "empty.csv" in loaded.rejects["detail"].item()


def test_unreadable_sources_raise_naming_them(tmp_path: Path, real_rows: pl.DataFrame) -> None:
    with pytest.raises(MPSourceError, match=r"nowhere\.csv\.gz"):
        load_mp_source(str(tmp_path / "nowhere.csv.gz"))
    corrupt = tmp_path / "corrupt.csv.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage that is not gzip")
    with pytest.raises(MPSourceError, match=r"corrupt\.csv\.gz"):
        load_mp_source(str(corrupt))
    no_cif = tmp_path / "no_cif.csv"
    real_rows.drop("cif").write_csv(no_cif)
    with pytest.raises(MPSourceError, match=r"no_cif.csv lacks column\(s\) \['cif'\]"):
        load_mp_source(str(no_cif))
    with pytest.raises(MPSourceError, match="unsupported file type"):
        (tmp_path / "notes.txt").write_text("hello")
        load_mp_source(str(tmp_path / "notes.txt"))


def test_folder_of_cif_and_poscar_files(real_rows: pl.DataFrame, tmp_path: Path) -> None:
    from pymatgen.core import Structure

    folder = tmp_path / "structures"
    folder.mkdir()
    for mid, cif in zip(real_rows["material_id"][:3], real_rows["cif"][:3], strict=True):
        (folder / f"{mid}.cif").write_text(cif)
    s = Structure.from_str(real_rows["cif"][3], fmt="cif")
    (folder / "POSCAR_gate").write_text(s.to(fmt="poscar"))
    (folder / f"{real_rows['material_id'][0]}.vasp").write_text(s.to(fmt="poscar"))  # same id as a .cif
    (folder / "broken.vasp").write_text("not a poscar\n1.0\n")
    (folder / "README.md").write_text("ignored: not a structure file")
    loaded = load_mp_source(str(folder))
    assert sorted(loaded.structures["material_id"]) == sorted([*real_rows["material_id"][:3], "POSCAR_gate"])
    assert dict(zip(loaded.rejects["source_ref"], loaded.rejects["reason"], strict=True)) == {
        "structures/broken.vasp": "malformed_poscar",
        f"structures/{real_rows['material_id'][0]}.vasp": "duplicate_material_id",
    }
    assert loaded.source == "folder:structures"
    poscar = loaded.structures.filter(pl.col("material_id") == "POSCAR_gate").row(0, named=True)
    assert poscar["reduced_formula"] == real_rows["pretty_formula"][3]
    assert poscar["formation_energy_per_atom_ev"] is None


def test_embedded_prototypes() -> None:
    loaded = load_mp_source("embedded")
    assert loaded.n_input == 288
    assert loaded.structures.height == 288 and loaded.rejects.height == 0
    assert loaded.structures["material_id"].is_unique().all()
    assert loaded.structures["material_id"].str.starts_with("aflow:").all()
    assert loaded.source == "embedded:aflow_prototypes"
    assert load_mp_source("embedded").snapshot_id == loaded.snapshot_id  # deterministic


def test_mp_api_without_key_is_a_clear_error() -> None:
    with pytest.raises(MPSourceError, match="MP_API_KEY"):
        load_mp_source("mp-api", api_key="")


def test_parse_records_is_row_wise(real_rows: pl.DataFrame, tmp_path: Path) -> None:
    raw = raw_from_table_file(_write_csv_gz(real_rows, tmp_path / "r.csv.gz"))
    whole = parse_records(raw)
    halves = pl.concat([parse_records(raw.head(3)), parse_records(raw.tail(N_GOOD - 3))])
    assert whole.equals(halves)
    assert whole["reason"].null_count() == N_GOOD


@pytest.mark.ray
def test_parsing_through_ray_equals_in_process(real_rows: pl.DataFrame, tmp_path: Path) -> None:
    import ray

    path = _write_csv_gz(pl.concat([real_rows, _bad_rows(real_rows)]), tmp_path / "mixed.csv.gz")
    local = load_mp_source(str(path))
    ray.init(num_cpus=1, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        remote = load_mp_source(str(path), n_chunks=3, use_ray=True)
        throttled = load_mp_source(str(path), n_chunks=4, max_parallel=1, use_ray=True)
    finally:
        ray.shutdown()
    assert remote.parse_stats is not None and remote.parse_stats.backend == "ray"
    assert remote.parse_stats.n_chunks == 3
    assert remote.structures.equals(local.structures)
    assert remote.rejects.equals(local.rejects)
    assert throttled.parse_stats.workers == 1 and throttled.parse_stats.n_chunks == 4
    assert throttled.structures.equals(local.structures)
