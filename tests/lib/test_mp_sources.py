"""MP sources: the four loaders, validation and quarantine of every kind of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from lib import known_phases
from lib.mp_sources import (
    EMBEDDED_LABEL,
    EMBEDDED_PROTOTYPES_LABEL,
    REJECT_SCHEMA,
    STRUCTURE_SCHEMA,
    MPSourceError,
    load_mp_source,
    parse_records,
    raw_from_known_phases,
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
    assert loaded.n_input == 288 + 7
    assert loaded.structures.height == 288 + 7 and loaded.rejects.height == 0
    assert loaded.structures["material_id"].is_unique().all()
    protos = loaded.structures.filter(pl.col("source") == EMBEDDED_PROTOTYPES_LABEL)
    assert protos.height == 288 and protos["material_id"].str.starts_with("aflow:").all()
    assert loaded.source == EMBEDDED_LABEL
    assert load_mp_source("embedded").snapshot_id == loaded.snapshot_id  # deterministic


def test_embedded_known_phases(ba_ru_o_dir: Path) -> None:
    """The Ba-Ru-O known phases shipped in the package: built from their structure types in the
    stated space groups, parsed by the embedded source into the system's ternaries, binaries and
    elements, and every "same crystal as mp-..." claim confirmed by StructureMatcher against the
    Materials Project structures of the shared data."""
    import warnings

    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    shipped = known_phases.read_known_phases()
    assert shipped.columns == list(known_phases.COLUMNS) and shipped.height == 7
    assert set(shipped["formula"]) == {"BaO", "BaO2", "RuO2", "BaRuO3", "Ba2RuO4", "Ba", "Ru"}
    assert shipped["reference"].is_not_null().all()
    loaded = load_mp_source("embedded")
    mine = loaded.structures.filter(pl.col("source") == known_phases.SOURCE_LABEL)
    assert mine["material_id"].to_list() == shipped["material_id"].to_list()
    assert dict(zip(mine["material_id"], mine["nsites"], strict=True)) == dict(
        zip(shipped["material_id"], shipped["nsites"], strict=True))  # primitive cells, e.g. BaO: 2
    assert mine["chemical_system"].is_in(["Ba", "Ru", "Ba-O", "O-Ru", "Ba-O-Ru"]).all()
    mp = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv", infer_schema_length=0)
    matcher = StructureMatcher()
    claimed = shipped.filter(pl.col("mp_material_id").is_not_null())
    assert set(claimed["mp_material_id"]) == {"mp-1342", "mp-1105", "mp-1025237"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp_structs = {r["material_id"]: Structure.from_str(r["cif"], fmt="cif") for r in mp.iter_rows(named=True)}
        for row in shipped.iter_rows(named=True):
            ours = Structure.from_str(row["cif"], fmt="cif")
            same = {mid for mid, s in mp_structs.items()
                    if s.composition.reduced_formula == row["formula"] and matcher.fit(ours, s)}
            # a claim holds, and no unclaimed MP twin exists in the shared Ba-Ru-O structures
            assert same == ({row["mp_material_id"]} if row["mp_material_id"] else set()), row["material_id"]


def test_known_phases_bad_input_names_the_row(tmp_path: Path) -> None:
    import json

    data = json.loads(known_phases.KNOWN_PHASES_FILE.read_text())
    data["phases"][1]["spacegroup"] = 221  # BaO2's Wyckoff sites in the wrong group
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(known_phases.KnownPhasesError, match=r"bad\.json phase 1 \(known:BaO2-CaC2\)"):
        known_phases.read_known_phases(bad)
    # a package without its data file: a clear error from the embedded source
    with pytest.raises(MPSourceError, match=r"gone\.json are missing"):
        raw_from_known_phases(tmp_path / "gone.json")


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


def test_infill_dedup_flags_a_known_phase_of_the_embedded_source() -> None:
    """A rocksalt template filled with Ba and O is BaO (known:BaO-rocksalt, the crystal of
    mp-1342): the offline default flags it."""
    from lib.dedup import apply_dedup, dedup_candidates
    from lib.infill import infill
    from tests.lib.test_infill import template

    tpl = template(225, ["a", "b"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], (5.9, 5.9, 5.9, 90.0, 90.0, 90.0),
                   tid="tpl-rocksalt")
    decoy = template(221, ["a", "b", "d"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.0, 0.0]],
                     (4.0, 4.0, 4.0, 90.0, 90.0, 90.0), tid="tpl-decoy")  # Ba/O in a perovskite frame
    cands = infill(pl.concat([tpl, decoy]), elements=["Ba", "O"]).candidates
    embedded = load_mp_source("embedded").structures
    res = dedup_candidates(cands, mp_structures=embedded, elements=["Ba", "O"])
    out = apply_dedup(cands, res.unique)
    known = out.filter(pl.col("is_known_in_mp"))
    assert set(known["mp_material_id"]) == {"known:BaO-rocksalt"} and (known["template_id"] == "tpl-rocksalt").all()
    decoys = out.filter(pl.col("template_id") == "tpl-decoy")
    assert decoys.height == 6 and not decoys["is_known_in_mp"].any()
    assert res.n_mp_references == 5  # the Ba-O phases of the embedded source: BaO, BaO2, Ba, 2 O2 prototypes
