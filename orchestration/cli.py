"""``cgwgan``: the scientist's command line.

    cgwgan main                      run the whole pipeline (the main job) on CGWGAN_HOME
    cgwgan main --gan-epochs 20 --n-templates 200 --no-use-ray    ... with other sizes
    cgwgan main --run-config more.yaml   ... and any stage's config ({job: {ops: {op: {config: ...}}}})
    cgwgan main --system Ba-Ru-O --surrogate CHGNet-0.3.0 --profile standard --relax 200
    cgwgan tables                    tables and views with their row counts
    cgwgan sql "SELECT ..."          a read-only query over the tables, printed as a table
    cgwgan sql -f sql/examples/x.sql the queries of a file
    cgwgan export --format cif --out shortlist/              the shortlist as CIF files
    cgwgan export --table relaxed --where "e_above_hull_ev_per_atom < 0.1" --format ase-db --out r.db
    cgwgan export --ids cand-0123 cand-4567 --format poscar --out picked/
    cgwgan report --system Ba-Ru-O   one self-contained HTML discovery report (<home>/reports/)
    cgwgan dft status                GPAW run folders (dft_runs) and their states

``--home`` (or ``CGWGAN_HOME``, else ``.cgwgan`` in the checkout) says where the tables are.
Queries are read-only: only SELECT-like statements are accepted (SELECT, WITH, FROM, VALUES,
DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), and the DuckDB connection may read nothing but the tables'
Parquet files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import duckdb
import polars as pl

from lib.store import TableStore

#: Tables searched, in order, for ``cgwgan export --ids`` without ``--table``: the most processed
#: version of a candidate first (discovered, shortlisted, relaxed), then the generated cell.
ID_LOOKUP_TABLES = ("discoveries", "shortlist", "relaxed", "candidates_dedup", "candidates")
DEFAULT_EXPORT_TABLE = "shortlist"
#: Where rows without a cell (shortlist, phonons, ...) get their structure, in order.
STRUCTURE_SOURCES = ("relaxed", "candidates_dedup", "candidates")
_READ_ONLY_TYPES = {"SELECT", "EXPLAIN"}


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


# ----------------------------------------------------------------------------- helpers
def resolve_home(home: str | None) -> Path:
    """``--home``, else the configured ``CGWGAN_HOME``, else ``.cgwgan`` in the checkout."""
    from orchestration.paths import home_path  # as the cgwgan_home resource reads it, without Dagster

    return home_path(home)


def check_read_only(sql: str) -> list[str]:
    """Split ``sql`` into statements and refuse anything but queries; returns the statements."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise CliError(f"cannot parse SQL: {exc}") from None
    if not statements:
        raise CliError("no SQL statement given")
    for st in statements:
        kind = st.type.name
        if kind not in _READ_ONLY_TYPES:
            raise CliError(
                f"refused: {kind} statement ({st.query.strip()[:80]!r}); `cgwgan sql` is read-only "
                "(SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN). Tables are written "
                "only by the pipeline's assets."
            )
    return [st.query.strip() for st in statements]


def read_only_connection(home: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view per table and the derived views, locked to the tables' files."""
    from orchestration.paths import view_statements

    store = TableStore(home)
    con = store.connect(extra_sql=view_statements())
    files = [str(f) for t in store.tables() for f in store.files(t)]
    # Reading stays possible only for the Parquet files behind the views; nothing can be written
    # or read elsewhere, and the settings cannot be changed back.
    con.execute("SET allowed_paths = $1", [files])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise CliError(f"{type(exc).__name__}: {exc}") from None


def select_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """:func:`run_query` for a statement that must return rows (a SELECT)."""
    rel = run_query(con, sql)
    if rel is None:
        raise CliError(f"statement returned no result set: {sql}")
    return rel


def _printable(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Nested columns (lists, structs) as text, so CSV and tables print them readably."""
    nested = ("[]", "STRUCT", "MAP", "UNION", "[")
    exprs = []
    for name, typ in zip(rel.columns, rel.types, strict=True):
        q = '"' + name.replace('"', '""') + '"'
        exprs.append(f"CAST({q} AS VARCHAR) AS {q}" if any(t in str(typ) for t in nested) else q)
    return rel.select(", ".join(exprs)) if exprs else rel


def print_relation(rel: duckdb.DuckDBPyRelation, *, fmt: str, max_rows: int, out=None) -> int:
    out = out or sys.stdout
    if fmt == "table":
        df = _printable(rel).limit(max_rows + 1).pl()
        # Count the whole result only when it does not fit (that runs the query a second time).
        n = df.height if df.height <= max_rows else rel.aggregate("count(*)").fetchall()[0][0]
        df = df.head(max_rows)
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=False):
            print(df, file=out)
        shown = min(n, max_rows)
        print(f"({n} row{'s' if n != 1 else ''}" + (f", first {shown} shown; --max-rows to see more)"
                                                     if n > shown else ")"), file=out)
        return n
    df = _printable(rel).pl() if fmt == "csv" else rel.pl()
    if fmt == "csv":
        out.write(df.write_csv())
    else:
        out.write(df.write_ndjson())
    return df.height


# ----------------------------------------------------------------------------- commands
def cmd_sql(args: argparse.Namespace) -> int:
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise CliError(f"SQL file not found: {path}")
        sql = path.read_text()
    elif args.query:
        sql = " ".join(args.query)
    else:
        raise CliError('give a query (cgwgan sql "SELECT ...") or a file (cgwgan sql -f FILE)')
    statements = check_read_only(sql)
    home = resolve_home(args.home)
    con = read_only_connection(home)
    try:
        for i, st in enumerate(statements):
            if len(statements) > 1 and args.format == "table":
                print(("\n" if i else "") + "-- " + " ".join(st.split())[:100])
            rel = run_query(con, st)
            if rel is not None:
                print_relation(rel, fmt=args.format, max_rows=args.max_rows)
    finally:
        con.close()
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from orchestration.paths import view_statements

    home = resolve_home(args.home)
    store = TableStore(home)
    names = store.tables()
    rows = []
    for t in names:
        parts = store.partitions(t)
        rows.append({"name": t, "kind": "table", "partitions": len(parts), "rows": store.rows(t),
                     "columns": len(pl.read_parquet_schema(store.files(t)[0])) if parts else 0})
    con = store.connect(extra_sql=view_statements())
    try:
        views = con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'"
        ).fetchall()
        for (v,) in sorted(views):
            if v in names:
                continue
            try:
                rel = con.sql(f'SELECT * FROM "{v}"')
                n = rel.aggregate("count(*)").fetchall()[0][0]
                rows.append({"name": v, "kind": "view", "partitions": None, "rows": n,
                             "columns": len(rel.columns)})
            except duckdb.Error as exc:
                rows.append({"name": v, "kind": f"view (error: {str(exc)[:60]})", "partitions": None,
                             "rows": None, "columns": None})
    finally:
        con.close()
    if not rows:
        print(f"no tables under {home} yet: run `cgwgan main` (or materialise assets in `dagster dev`)")
        return 0
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(pl.DataFrame(rows, schema={"name": pl.String, "kind": pl.String, "partitions": pl.Int64,
                                         "rows": pl.Int64, "columns": pl.Int64}))
    print(f"home: {home}")
    return 0


def main_settings(args: argparse.Namespace):
    """``cgwgan main``'s sizes: the ``--profile``'s, overridden by the options given; the chemical
    system and the surrogate checked (a clear error before anything runs)."""
    from orchestration.jobs import MainSettings
    from orchestration.profiles import DEFAULT_PROFILE, profile_settings

    try:
        fields = profile_settings(getattr(args, "profile", None) or DEFAULT_PROFILE)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    fields.update({f.name: getattr(args, f.name) for f in dataclasses.fields(MainSettings)
                   if getattr(args, f.name, None) is not None})
    settings = MainSettings(**fields)
    settings.chemical_system = check_chemical_system(settings.chemical_system)
    if settings.surrogate:
        check_surrogate(settings.surrogate)
    try:
        from lib.screening import check_volume_scan
        from orchestration.jobs import volume_scan_factors

        check_volume_scan(volume_scan_factors(settings.volume_scan))
    except ValueError as exc:
        raise CliError(f"--volume-scan: {exc}") from None
    for name in ("gan_epochs", "n_templates", "max_asu_sites", "prescreen_limit", "relax_top_k", "phonon_top_n",
                 "dft_top_k"):
        value = getattr(settings, name)
        if value < 0 or (value == 0 and name not in ("prescreen_limit",)):
            flag = "--" + name.replace("_", "-")
            raise CliError(f"{flag} must be {'>= 0 (0 = all)' if name == 'prescreen_limit' else '> 0'}, got {value}")
    return settings


def check_chemical_system(system: str) -> str:
    """``--system Ba-Ru-O`` (any order, '-' or ',') -> ``Ba-O-Ru``; at least two elements."""
    from lib.training import normalise_chemical_system

    try:
        canonical = normalise_chemical_system(system)
    except ValueError as exc:
        raise CliError(f"--system {system!r}: {exc}; give element symbols joined by '-', e.g. Ba-Ru-O") from None
    if canonical.count("-") < 1:
        raise CliError(f"--system {system!r}: a chemical system needs at least two elements, e.g. Ba-Ru-O")
    return canonical


def check_surrogate(name: str) -> None:
    """``--surrogate NAME`` must be in the surrogate registry (``CGWGAN_SURROGATES``, else built in)."""
    from lib.surrogates import load_registry
    from orchestration.resources import SurrogateRegistryResource, configured

    reg = configured("surrogate_registry")
    assert isinstance(reg, SurrogateRegistryResource)
    try:
        names = list(load_registry(reg.resolved_registry_path or None, models_dir=reg.resolved_models_dir or None))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the surrogate registry: {exc}") from None
    if name not in names:
        raise CliError(f"--surrogate {name!r} is not in the surrogate registry; known: {', '.join(names)}")


def cmd_main(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    settings = main_settings(args)
    run_config = read_run_config(args.run_config) if args.run_config else None
    from orchestration.main import run_main  # lazy: imports the whole pipeline

    try:
        run_main(home=str(home), settings=settings, run_config=run_config, verbose=args.verbose)
    except Exception as exc:  # a failed step: say which and why; --traceback for the whole story
        if args.traceback:
            raise
        raise CliError(f"the main job failed ({type(exc).__name__}): {str(exc)[:2000]}\n"
                       "rerun with --traceback for the full trace, or inspect the run in "
                       "`dagster dev -w workspace.yaml`") from None
    return 0


def read_run_config(path: str) -> dict:
    """``--run-config``: a YAML (or JSON) file ``{job name: run config}``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CliError(f"run config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"run config file {p} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CliError(f"run config file {p} must map job names to run configs, "
                       "e.g. {screening_job: {ops: {relaxed: {config: {steps: 50}}}}}")
    return data


def select_rows(args: argparse.Namespace, con: duckdb.DuckDBPyConnection, home: Path) -> tuple[pl.DataFrame, str]:
    """The rows ``cgwgan export`` writes, and a description of the selection."""
    store = TableStore(home)
    available = set(store.tables()) | {
        v for (v,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    limit = f" LIMIT {int(args.limit)}" if args.limit else ""
    if args.ids:
        ids = list(dict.fromkeys(args.ids))
        tables = [args.table] if args.table else [t for t in ID_LOOKUP_TABLES if t in available]
        if not tables:
            raise CliError(f"none of the tables {', '.join(ID_LOOKUP_TABLES)} exists under {home}")
        found: list[pl.DataFrame] = []
        missing = set(ids)
        used = []
        for t in tables:
            if not missing:
                break
            _require_table(t, available, home)
            cols = select_query(con, f'SELECT * FROM "{t}" LIMIT 0').columns
            key = next((c for c in ("candidate_id", "material_id") if c in cols), None)
            if key is None:
                continue
            df = con.sql(f'SELECT * FROM "{t}" WHERE list_contains($ids, "{key}"){limit}',
                         params={"ids": sorted(missing)}).pl()
            if df.height:
                found.append(with_structures(df, home))
                used.append(t)
                missing -= set(df[key].to_list())
        if missing:
            raise CliError(f"ids not found in {', '.join(tables)}: {', '.join(sorted(missing))}")
        return pl.concat(found, how="diagonal_relaxed"), f"{len(ids)} ids from {', '.join(used)}"
    table = args.table or DEFAULT_EXPORT_TABLE
    _require_table(table, available, home)
    where = f" WHERE {args.where}" if args.where else ""
    sql = f'SELECT * FROM "{table}"{where}{limit}'
    check_read_only(sql)
    if len(duckdb.extract_statements(sql)) != 1:
        raise CliError(f"--where must be one filter expression, got {args.where!r}")
    df = select_query(con, sql).pl()
    return (with_structures(df, home) if df.height else df), f"{table}{where}{limit}"


def with_structures(df: pl.DataFrame, home: Path) -> pl.DataFrame:
    """Rows without structure columns get them from ``relaxed`` (or the generated candidates)."""
    from lib.export import attach_structures, has_structure_columns

    if has_structure_columns(df) or "candidate_id" not in df.columns:
        return df
    store = TableStore(home)
    ids = df["candidate_id"].unique().implode()
    sources = [store.scan(t).filter(pl.col("candidate_id").is_in(ids)).collect()
               for t in STRUCTURE_SOURCES if store.exists(t)]
    out = attach_structures(df, sources)
    if not has_structure_columns(out):
        raise CliError(f"the selection has no structure columns and none of {', '.join(STRUCTURE_SOURCES)} "
                       f"holds its candidates under {home}")
    return out


def _require_table(table: str, available: set[str], home: Path) -> None:
    if table not in available:
        have = ", ".join(sorted(available)) or "none"
        raise CliError(f"table {table!r} not found under {home} (tables: {have}); "
                       "materialise it first (cgwgan main, or dagster dev)")


def cmd_export(args: argparse.Namespace) -> int:
    from lib.export import SUFFIX, export_structures
    from orchestration.paths import timestamped_path

    if args.ids and args.where:
        raise CliError("give either --ids or --where, not both")
    home = resolve_home(args.home)
    con = read_only_connection(home)
    try:
        df, what = select_rows(args, con, home)
    finally:
        con.close()
    if df.height == 0:
        raise CliError(f"the selection ({what}) has no rows; nothing exported")
    out = Path(args.out) if args.out else timestamped_path(
        Path(home, "exports"), "export", "" if args.format in ("poscar", "cif") else SUFFIX[args.format])
    try:
        res = export_structures(df, fmt=args.format, out=out, layout=args.layout,
                                overwrite=args.overwrite, cif_symprec=args.cif_symprec)
    except (ValueError, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    print(f"exported {res.n_structures} of {df.height} rows ({what}; {res.layout} layout) "
          f"as {res.format} to {res.path}")
    for rid, reason in res.failures:
        print(f"  not exported: {rid}: {reason}", file=sys.stderr)
    if res.failures:
        print(f"{len(res.failures)} row(s) could not be rebuilt (listed above)", file=sys.stderr)
        return 2
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``cgwgan report``: the discovery report of one system (lib.report), one HTML file."""
    from lib.report import write_report

    home = resolve_home(args.home)
    chemsys = check_chemical_system(args.system)
    out = Path(args.out) if args.out else home / "reports" / f"discovery-{chemsys}.html"
    t0 = time.perf_counter()
    try:
        res = write_report(TableStore(home), out, chemical_system=chemsys, surrogate=args.surrogate or None,
                           top_n=args.top)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    funnel = " -> ".join(f"{r['stage']} {r['count'] if r['count'] is not None else '-'}" for r in res.funnel)
    print(f"wrote {res.path} ({res.path.stat().st_size / 1024:.0f} KiB, {res.top.height} candidates, "
          f"plots: {', '.join(dict.fromkeys(res.plots)) or 'none'}; {time.perf_counter() - t0:.1f} s)")
    print(f"  {funnel}")
    return 0


# ----------------------------------------------------------------------------- parser
def cmd_dft_status(args: argparse.Namespace) -> int:
    """The GPAW run folders under the DFT results root and their states (lib.dft_gpaw.folder_state)."""
    import json

    from lib.dft_gpaw import RUN_FILE, folder_states, summary_fields
    from orchestration.resources import CgwganHome, configured

    home = resolve_home(args.home)
    if args.results_dir:
        root = Path(args.results_dir).expanduser().resolve()
    else:
        root = configured("dft").results_root(CgwganHome(home=str(home)))  # type: ignore[attr-defined]
    states = folder_states(root)
    if not states:
        print(f"no GPAW run folders under {root} (materialise dft_runs)")
        return 0
    rows = []
    for name, state in states.items():
        folder = root / name
        try:
            rec = json.loads((folder / RUN_FILE).read_text())
        except (OSError, ValueError):
            rec = {}
        f = summary_fields(folder)
        rows.append({"run_name": name, "state": state, "kind": rec.get("kind"), "formula": rec.get("formula"),
                     "preset": rec.get("preset_name"), "energy_per_atom_ev": f["energy_per_atom_ev"],
                     "gpaw_wall_time_s": f["gpaw_wall_time_s"], "reason": (f["reason"] or "")[:100]})
    if args.state:
        rows = [r for r in rows if r["state"] in args.state]
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, fmt_str_lengths=100,
                   tbl_width_chars=220):
        print(pl.DataFrame(rows, schema={"run_name": pl.String, "state": pl.String, "kind": pl.String,
                                         "formula": pl.String, "preset": pl.String, "energy_per_atom_ev": pl.Float64,
                                         "gpaw_wall_time_s": pl.Float64, "reason": pl.String}))
    counts = {s: sum(1 for v in states.values() if v == s) for s in ("pending", "running", "partial", "ok", "failed")}
    print(f"{len(states)} run folders under {root}: {counts['pending']} pending, {counts['running']} running, "
          f"{counts['partial']} partial (killed: redone by the next dft_runs), {counts['ok']} done, "
          f"{counts['failed']} failed")
    return 0


def _main_settings_arguments(sp: argparse.ArgumentParser) -> None:
    """One option per field of :class:`orchestration.jobs.MainSettings` (``--gan-epochs``, ...);
    an option not given keeps the field's default."""
    from orchestration.jobs import MainSettings
    from orchestration.profiles import PROFILES

    for f in dataclasses.fields(MainSettings):
        flags = ["--" + f.name.replace("_", "-"), *MAIN_OPTION_ALIASES.get(f.name, ())]
        by_profile = {p: v[f.name] for p, v in PROFILES.items() if f.name in v}
        default = f"(default: {f.default!r}" + (
            "; " + ", ".join(f"{p}: {v!r}" for p, v in by_profile.items()) if by_profile else "") + ")"
        if f.type in (bool, "bool"):
            sp.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=MAIN_OPTION_HELP.get(f.name, "") + default)
        else:
            conv = {"int": int, "float": float}.get(str(getattr(f.type, "__name__", f.type)), str)
            sp.add_argument(*flags, dest=f.name, type=conv, default=None,
                            help=MAIN_OPTION_HELP.get(f.name, "") + default)


#: Short names of ``cgwgan main``'s size options (``--templates`` = ``--n-templates``, ...).
MAIN_OPTION_ALIASES = {"chemical_system": ("--system",), "gan_epochs": ("--epochs",),
                       "n_templates": ("--templates",), "prescreen_limit": ("--prescreen",),
                       "relax_top_k": ("--relax",), "phonon_top_n": ("--phonons",)}
MAIN_OPTION_HELP = {
    "chemical_system": "elements joined by '-' in any order, e.g. Ba-Ru-O ",
    "surrogate": "a name of the surrogate registry (default: M3GNet when CGWGAN_M3GNET_DIR is set, else CHGNet) ",
    "prescreen_limit": "candidates pre-screened, 0 = all ",
    "dft": "also verify the best --dft-top-k novel candidates with GPAW (preset fast, with their competing "
           "phases; make dft-deps) before the report ",
    "dft_top_k": "candidates the --dft verification runs ",
    "volume_scan": "linear scale factors of the pre-screen's volume scan, e.g. 0.9,1.0,1.1 (a candidate "
                   "generated at the wrong volume is scored at its best one; 4 evaluations per candidate "
                   "instead of 1); "
                   "'' = off ",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (``command`` None); with ``command`` (the subcommand about to run, "" for
    none), ``main``'s size options only when it is ``main``: they come from ``orchestration.jobs``,
    which imports Dagster, and the quick commands (``sql``, ``tables``, ...) start without it."""
    p = argparse.ArgumentParser(prog="cgwgan", description="CGWGAN crystal discovery platform.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_home(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--home", help="CGWGAN_HOME (default: $CGWGAN_HOME, else .cgwgan in the checkout)")
        return sp

    sp = with_home(sub.add_parser("main", help="run the whole pipeline (the main job)"))
    sp.add_argument("--traceback", action="store_true", help="show the full Python trace of a failure")
    sp.add_argument("--run-config", help="YAML/JSON file {job name: run config}, merged into the run "
                                         "config the options below give (e.g. relaxation steps)")
    sp.add_argument("--verbose", action="store_true",
                    help="Dagster's full event stream on the console (always in <home>/logs/), no progress bars")
    from orchestration.profiles import DEFAULT_PROFILE, PROFILE_COSTS, PROFILES

    sp.add_argument("--profile", choices=list(PROFILES), default=DEFAULT_PROFILE,
                    help="sizes of every stage; the options below override it. "
                    + "; ".join(f"{p}: {c}" for p, c in PROFILE_COSTS.items()))
    if command in (None, "main"):
        _main_settings_arguments(sp)
    sp.set_defaults(func=cmd_main)

    sp = with_home(sub.add_parser("tables", help="tables and views with their row counts"))
    sp.set_defaults(func=cmd_tables)

    sp = with_home(sub.add_parser("sql", help="run read-only SQL over the tables"))
    sp.add_argument("query", nargs="*", help="SQL text (quote it)")
    sp.add_argument("-f", "--file", help="a .sql file (statements separated by ';')")
    sp.add_argument("--max-rows", type=int, default=40, help="rows printed per result (table format)")
    sp.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sp.set_defaults(func=cmd_sql)

    sp = with_home(sub.add_parser("export", help="write structures as CIF, POSCAR, extended XYZ or an ASE db"))
    sp.add_argument("--format", required=True, choices=("cif", "poscar", "extxyz", "ase-db"))
    sp.add_argument("--out", help="file (extxyz, ase-db, a .cif) or folder (cif, poscar); "
                                  "default: <home>/exports/export-<time>")
    sp.add_argument("--table", help=f"table or view to select from (default: {DEFAULT_EXPORT_TABLE}; "
                                    f"with --ids: the first of {', '.join(ID_LOOKUP_TABLES)} holding them)")
    sp.add_argument("--where", help="SQL filter, e.g. \"e_above_hull_ev_per_atom < 0.1\"")
    sp.add_argument("--ids", nargs="+", help="candidate (or material) ids")
    sp.add_argument("--shortlist", action="store_true", help="the shortlist (the default selection)")
    sp.add_argument("--limit", type=int, help="at most this many rows")
    sp.add_argument("--layout", choices=("auto", "cell", "asu"), default="auto",
                    help="cell: stored (relaxed) cell; asu: rebuild from the Wyckoff ASU; auto: cell if present")
    sp.add_argument("--cif-symprec", type=float, default=None, help="write symmetrised CIFs with this tolerance")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sp.set_defaults(func=cmd_export)

    sp = with_home(sub.add_parser("report", help="one self-contained HTML discovery report of a chemical system"))
    sp.add_argument("--system", required=True, help="elements joined by '-' in any order, e.g. Ba-Ru-O")
    sp.add_argument("--surrogate", help="whose shortlist ranks the candidates (default: the newest)")
    sp.add_argument("--top", type=int, default=10, help="distinct candidates shown (default: 10)")
    sp.add_argument("--out", help="the HTML file (default: <home>/reports/discovery-<system>.html)")
    sp.set_defaults(func=cmd_report)

    dft = sub.add_parser("dft", help="GPAW runs of the DFT verification (dft_runs)")
    dft_sub = dft.add_subparsers(dest="dft_command", required=True, metavar="DFT_COMMAND")
    sp = with_home(dft_sub.add_parser("status", help="run folders: pending, running, partial, done, failed"))
    sp.add_argument("--results-dir", help="the DFT results folder (default: CGWGAN_DFT_RESULTS, else <home>/dft/results)")
    sp.add_argument("--state", nargs="+", choices=("pending", "running", "partial", "ok", "failed"),
                    help="list only folders in these states")
    sp.set_defaults(func=cmd_dft_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the subcommand: the first word that is not an option (the top level has only -h)
    args = build_parser(next((a for a in argv if not a.startswith("-")), "")).parse_args(argv)
    if getattr(args, "shortlist", False):
        if (args.table and args.table != "shortlist") or args.ids:
            print("cgwgan: error: --shortlist cannot be combined with --table or --ids", file=sys.stderr)
            return 1
        args.table = "shortlist"
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"cgwgan: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `cgwgan sql ... | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
