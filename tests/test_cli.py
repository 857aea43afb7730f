"""``cgwgan`` CLI: read-only SQL over a real store, tables, export in every format read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from lib.store import TableStore
from orchestration.cli import check_read_only, main

SURROGATE = "M3GNet-MP-2021.2.8-PES"


@pytest.fixture()
def ba_ru_o_store(store: TableStore, ba_ru_o_mp: pl.DataFrame) -> TableStore:
    """The 23 real Ba-Ru-O MP structures as ``mp_structures``; the ones within 0.1 eV/atom of the
    MP hull as ``relaxed`` (cells) and ``shortlist`` (no cells, as lib.screening writes it), both
    partitioned like screening tables; plus two ``candidates`` rows in the ASU layout. The tables
    hold only the columns the CLI reads, so they are written without the pipeline's contracts."""
    store = TableStore(store.home, contracts={})
    mp = ba_ru_o_mp
    store.write("mp_structures", mp)
    short = (mp.filter(pl.col("e_above_hull_ev_per_atom") < 0.1)
             .with_columns(candidate_id="cand-" + pl.col("material_id"), surrogate_name=pl.lit(SURROGATE)))
    for sys_, part in short.group_by("chemical_system"):
        store.write("relaxed", part.with_columns(energy_ev=-5.0 * pl.col("nsites")),
                    partition=f"{sys_[0]}|{SURROGATE}")
        store.write("shortlist", part.drop("lattice_matrix", "species", "frac_coords"),
                    partition=f"{sys_[0]}|{SURROGATE}")
    store.write("candidates", pl.DataFrame({
        "candidate_id": ["cand-perov", "cand-rocksalt"],
        "formula": ["BaRuO3", "Ba4O4"],
        "spacegroup_number": [221, 225],
        "asu_letters": [["a", "b", "c"], ["a", "b"]],
        "asu_species": [["Ba", "Ru", "O"], ["Ba", "O"]],
        "asu_frac_coords": [[[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]],
                            [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]],
        "a_a": [4.0, 5.5], "b_a": [4.0, 5.5], "c_a": [4.0, 5.5],
        "alpha_deg": [90.0, 90.0], "beta_deg": [90.0, 90.0], "gamma_deg": [90.0, 90.0],
    }), partition="Ba-O-Ru")
    return store


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_sql_prints_a_table(ba_ru_o_store, capsys):
    rc, out, _ = run(capsys, "sql", "SELECT reduced_formula, count(*) AS n FROM mp_structures "
                     "GROUP BY 1 ORDER BY n DESC, 1 LIMIT 3")
    assert rc == 0
    assert "O2" in out and "reduced_formula" in out and "(3 rows)" in out
    # the shortlist is partitioned; the view unions every partition
    rc, out, _ = run(capsys, "sql", "--format", "csv", "SELECT count(*) AS n FROM shortlist")
    n = ba_ru_o_store.read("mp_structures").filter(pl.col("e_above_hull_ev_per_atom") < 0.1).height
    assert rc == 0 and out.splitlines() == ["n", str(n)]
    # list columns print as text
    rc, out, _ = run(capsys, "sql", "--format", "csv", "SELECT species FROM mp_structures "
                     "WHERE material_id = 'mp-3597'")
    assert rc == 0 and out.startswith("species\n\"[Ba, Ba, Ba, Ba, Ru, Ru, Ru, Ru, O, O,")


def test_sql_file_and_max_rows(ba_ru_o_store, capsys, tmp_path):
    f = tmp_path / "q.sql"
    f.write_text("-- two queries\nSELECT material_id FROM mp_structures ORDER BY 1;\n"
                 "DESCRIBE shortlist;\n")
    rc, out, _ = run(capsys, "sql", "-f", str(f), "--max-rows", "5")
    assert rc == 0
    assert "(23 rows, first 5 shown" in out and "column_name" in out


@pytest.mark.parametrize("stmt", [
    "CREATE TABLE x AS SELECT 1",
    "DROP VIEW mp_structures",
    "COPY (SELECT 1) TO 'out.csv'",
    "SELECT 1; DELETE FROM mp_structures",
    "ATTACH 'other.duckdb'",
    "INSTALL httpfs",
    "SET enable_external_access = true",
])
def test_writes_are_refused(ba_ru_o_store, capsys, stmt):
    rc, out, err = run(capsys, "sql", stmt)
    assert rc == 1 and "refused" in err and "read-only" in err and out == ""


def test_reads_outside_the_tables_are_refused(ba_ru_o_store, capsys):
    rc, _, err = run(capsys, "sql", "SELECT * FROM read_csv('/etc/passwd')")
    assert rc == 1 and "Permission" in err
    rc, _, err = run(capsys, "sql", "SELECT * FROM no_such_table")
    assert rc == 1 and "no_such_table" in err


def test_check_read_only_accepts_queries():
    assert len(check_read_only("WITH a AS (SELECT 1) SELECT * FROM a; SUMMARIZE SELECT 1; "
                               "EXPLAIN SELECT 1; FROM range(2)")) == 4


def test_tables(ba_ru_o_store, capsys):
    rc, out, _ = run(capsys, "tables")
    assert rc == 0
    line = next(ln for ln in out.splitlines() if "mp_structures" in ln)
    assert "23" in line
    assert "shortlist" in out and "candidates" in out


def test_tables_on_empty_home(home, capsys):
    rc, out, _ = run(capsys, "tables")
    assert rc == 0 and "no tables" in out


def test_export_shortlist_every_format(ba_ru_o_store, capsys, tmp_path):
    import ase.db
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    mp = ba_ru_o_store.read("mp_structures")
    short = mp.filter(pl.col("e_above_hull_ev_per_atom") < 0.1)
    originals = {f"cand-{r['material_id']}": Structure(r["lattice_matrix"][:3] and
                                                       [r["lattice_matrix"][i:i + 3] for i in (0, 3, 6)],
                                                       r["species"], r["frac_coords"])
                 for r in short.iter_rows(named=True)}
    m = StructureMatcher()

    rc, out, _ = run(capsys, "export", "--format", "cif", "--out", str(tmp_path / "cif"))
    assert rc == 0 and f"exported {short.height} of {short.height}" in out
    from pymatgen.io.cif import CifParser
    files = sorted((tmp_path / "cif").glob("*.cif"))
    assert short.height == 13 and sorted(f.stem for f in files) == sorted(originals)  # one file per row, no other
    assert sorted(p.name for p in (tmp_path / "cif").iterdir()) == [f.name for f in files]
    for f in files:
        assert m.fit(CifParser(str(f)).parse_structures(primitive=False)[0], originals[f.stem])

    rc, _, _ = run(capsys, "export", "--shortlist", "--format", "poscar", "--out", str(tmp_path / "pos"))
    files = sorted((tmp_path / "pos").iterdir())
    assert rc == 0 and sorted(f.name for f in files) == sorted(f"{k}.vasp" for k in originals)
    for f in files:
        assert m.fit(Structure.from_file(str(f)), originals[f.stem])

    rc, _, _ = run(capsys, "export", "--format", "extxyz", "--out", str(tmp_path / "s.extxyz"))
    frames = read(str(tmp_path / "s.extxyz"), index=":")
    assert rc == 0 and len(frames) == short.height
    for fr in frames:
        assert m.fit(AseAtomsAdaptor.get_structure(fr), originals[fr.info["candidate_id"]])

    rc, _, _ = run(capsys, "export", "--format", "ase-db", "--out", str(tmp_path / "s.db"),
                   "--where", "e_above_hull_ev_per_atom < 0.01")
    db = ase.db.connect(str(tmp_path / "s.db"))
    want = short.filter(pl.col("e_above_hull_ev_per_atom") < 0.01)
    assert rc == 0 and db.count() == want.height > 0
    for row in db.select():
        assert row.e_above_hull_ev_per_atom < 0.01
        assert row.surrogate_name == SURROGATE and row.candidate_id in originals
        assert row.energy == pytest.approx(-5.0 * row.natoms)  # relaxed energy_ev of the same cell
        assert m.fit(AseAtomsAdaptor.get_structure(row.toatoms()), originals[row.candidate_id])

    # an existing target is not replaced without --overwrite
    rc, _, err = run(capsys, "export", "--format", "ase-db", "--out", str(tmp_path / "s.db"))
    assert rc == 1 and "exists" in err
    rc, _, _ = run(capsys, "export", "--format", "ase-db", "--out", str(tmp_path / "s.db"), "--overwrite")
    assert rc == 0 and ase.db.connect(str(tmp_path / "s.db")).count() == short.height


def test_export_ids_across_tables_and_errors(ba_ru_o_store, capsys, tmp_path):
    import ase.db

    rc, out, _ = run(capsys, "export", "--ids", "cand-perov", "cand-mp-3597", "--format", "ase-db",
                     "--out", str(tmp_path / "ids.db"))
    assert rc == 0 and "shortlist" in out and "candidates" in out
    rows = {r.candidate_id: r for r in ase.db.connect(str(tmp_path / "ids.db")).select()}
    assert set(rows) == {"cand-perov", "cand-mp-3597"}
    assert rows["cand-perov"].natoms == 5 and rows["cand-mp-3597"].natoms == 20

    rc, _, err = run(capsys, "export", "--ids", "cand-nope", "--format", "cif", "--out", str(tmp_path / "n"))
    assert rc == 1 and "cand-nope" in err
    rc, _, err = run(capsys, "export", "--table", "discoveries", "--format", "cif", "--out", str(tmp_path / "d"))
    assert rc == 1 and "'discoveries' not found" in err
    rc, _, err = run(capsys, "export", "--where", "1 = 0", "--format", "cif", "--out", str(tmp_path / "e"))
    assert rc == 1 and "no rows" in err
    rc, _, err = run(capsys, "export", "--where", "1=1; DROP VIEW shortlist", "--format", "cif",
                     "--out", str(tmp_path / "f"))
    assert rc == 1 and "refused" in err


def test_export_generated_cells_from_asu(ba_ru_o_store, capsys, tmp_path):
    rc, _, _ = run(capsys, "export", "--table", "candidates", "--format", "poscar", "--out", str(tmp_path / "c"))
    assert rc == 0
    s = Structure.from_file(str(tmp_path / "c" / "cand-rocksalt.vasp"))
    assert s.get_space_group_info()[1] == 225 and len(s) == 8


def test_console_entry_point(ba_ru_o_store):
    """The module runs as a program (what the ``cgwgan`` console script calls)."""
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "sql", "--home", str(ba_ru_o_store.home),
                          "SELECT count(*) AS n FROM mp_structures", "--format", "csv"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["n", "23"]
    help_ = subprocess.run([sys.executable, "-m", "orchestration.cli", "--help"], capture_output=True,
                           text=True, timeout=60)
    assert all(c in help_.stdout for c in ("main", "tables", "sql", "export"))


def test_example_queries_are_read_only():
    """Every file in sql/examples passes the guard `cgwgan sql -f` applies."""
    files = sorted((Path(__file__).resolve().parents[1] / "sql" / "examples").glob("*.sql"))
    for f in files:
        assert check_read_only(f.read_text()), f


# ----------------------------------------------------------------------------- cgwgan main options
def test_main_options_profile_and_overrides():
    """--profile sets every size, an individual option overrides it, --system takes any order."""
    from orchestration.cli import build_parser, main_settings
    from orchestration.jobs import main_run_config
    from orchestration.profiles import PROFILES

    args = build_parser().parse_args(["main", "--system", "Ru-Ba-O", "--profile", "standard", "--relax", "7",
                                      "--surrogate", "CHGNet-0.3.0"])
    s = main_settings(args)
    assert s.chemical_system == "Ba-O-Ru" and s.surrogate == "CHGNet-0.3.0"
    assert s.relax_top_k == 7  # the option, not the profile's 500
    assert s.n_templates == PROFILES["standard"]["n_templates"] == 5000
    assert s.prescreen_limit == 0 and s.phonon_top_n == PROFILES["standard"]["phonon_top_n"]
    assert s.volume_scan == "0.9,1.0,1.1"  # standard scans volumes; its run config carries the factors
    assert main_run_config(s)["screening_job"]["ops"]["prescreen"]["config"]["volume_scan"] == [0.9, 1.0, 1.1]
    demo = main_settings(build_parser().parse_args(["main", "--templates", "10", "--epochs", "2"]))
    assert (demo.n_templates, demo.gan_epochs, demo.relax_top_k) == (10, 2, 8)  # demo: MainSettings' defaults
    assert main_run_config(demo)["screening_job"]["ops"]["prescreen"]["config"]["volume_scan"] == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--system", "Ba-Xx-O"], "'Xx' is not an element"),
    (["--system", "Ba"], "at least two elements"),
    (["--system=,"], "empty chemical system"),
    (["--surrogate", "NoSuchNet-1.0"], "not in the surrogate registry"),
    (["--relax", "-1"], "--relax-top-k must be > 0"),
    (["--prescreen", "-5"], "--prescreen-limit must be >= 0"),
    (["--volume-scan", "0.9,x"], "give linear scale factors separated by commas"),
    (["--volume-scan", "0.9,1.1"], "at least 3 distinct linear scale factors"),
])
def test_main_options_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    rc, _, err = run(capsys, "main", "--home", str(tmp_path / "h"), *argv)
    assert rc == 1 and message in err and "cgwgan: error:" in err, err
    assert not (tmp_path / "h").exists()  # refused before the pipeline started


def test_main_unknown_profile_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["main", "--profile", "huge"])
    assert exc.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_dft_status_lists_run_folders_and_states(tmp_path, capsys):
    """Folders written by lib.dft_gpaw (no GPAW needed): one pending, one killed part-way, one failed."""
    import json

    from pymatgen.core import Lattice

    from lib.dft_gpaw import write_gpaw_run

    results = tmp_path / "results"
    si = Structure(Lattice.cubic(5.43), ["Si"] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
    for name in ("gpaw-fast-cand-a", "gpaw-fast-cand-b", "gpaw-fast-phase-mp-149"):
        write_gpaw_run(si, results / name, preset="fast", record={"kind": "candidate"})
    (results / "gpaw-fast-cand-b" / "gpaw_relax.txt").write_text("cut short\n")
    failed = results / "gpaw-fast-phase-mp-149"
    (failed / "gpaw_summary.json").write_text(json.dumps({"status": "failed", "reason": "SCF did not converge"}))
    (failed / "done").write_text("failed\n")
    rc, out, _ = run(capsys, "dft", "status", "--home", str(tmp_path / "h"), "--results-dir", str(results))
    assert rc == 0
    assert "3 run folders" in out and "1 pending" in out and "1 partial" in out and "1 failed" in out
    assert "SCF did not converge" in out and "gpaw-fast-cand-b" in out
    rc, out, _ = run(capsys, "dft", "status", "--home", str(tmp_path / "h"), "--results-dir", str(results),
                     "--state", "failed")
    assert rc == 0 and "gpaw-fast-cand-a" not in out and "gpaw-fast-phase-mp-149" in out
    rc, out, _ = run(capsys, "dft", "status", "--home", str(tmp_path / "h"), "--results-dir", str(tmp_path / "none"))
    assert rc == 0 and "no GPAW run folders" in out


def test_quick_commands_refuse_an_object_store_home() -> None:
    from orchestration.paths import home_path

    with pytest.raises(ValueError, match="local home"):
        home_path("s3://bucket/prefix")
    with pytest.raises(ValueError, match="local home"):
        home_path(None, environ={"CGWGAN_HOME": "s3://bucket/prefix"})


def test_the_example_dft_run_config_is_valid_for_the_main_job() -> None:
    """docs/examples/dft_verify_small_cells.yaml (the README's small-cell verification) names real
    jobs, ops and config fields with valid values."""
    import yaml

    from assets.dft import DftRunsConfig
    from assets.screening import PrescreenConfig, RelaxConfig
    from orchestration.jobs import MainSettings, main_run_config

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dft_verify_small_cells.yaml"
    rc = yaml.safe_load(path.read_text())
    assert set(rc) <= set(main_run_config(MainSettings(dft=True)))
    classes = {"prescreen": PrescreenConfig, "relaxed": RelaxConfig, "dft_runs": DftRunsConfig}
    for job in rc.values():
        for op, op_config in job["ops"].items():
            fields = op_config["config"]
            assert set(fields) <= set(classes[op].model_fields), (op, fields)
            assert classes[op](**fields).model_dump()["max_atoms" if op != "prescreen" else "max_candidates"] \
                == fields["max_atoms" if op != "prescreen" else "max_candidates"]
