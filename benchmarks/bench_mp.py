"""Benchmark of the ``mp`` group on the shared MP file.

Measures (writes ``benchmarks/results/bench_mp.json`` and ``.md``):

* the whole ``mp`` group (mp_structures -> mp_symmetry -> training_templates) through
  ``dg.materialize`` on a local Ray with the largest worker count, with its round-trip rate;
* ``mp_symmetry`` alone (``analyse_symmetry`` over Ray tasks) in structures/s for each worker
  count, on the same structures;
* a per-stage profile in-process on a sample (ms per structure: CIF parse, spglib + ASU,
  StructureMatcher round trip, direct round trip).

``--pipeline`` times the computation alone instead, as the speed goal states it: parse + validate
(``validate_records``) then ``mp_symmetry`` (``analyse_symmetry``) in ``--processes`` local worker
processes, no Dagster, no Ray; with the per-stage profile (CPU ms per structure, the pymatgen
CifParser reading beside the fast P1 reader) and, with ``--compare``, a column-by-column comparison
of the ``mp_symmetry`` rows with a reference table (the same file analysed by earlier code). The
previous result file's table is kept in the new one as "before".

    python benchmarks/bench_mp.py                    # full shared file, 1 and 2 workers
    python benchmarks/bench_mp.py --rows 2000        # a quick run
    python benchmarks/bench_mp.py --pipeline --method direct --processes 2 \
        --compare /work/runs/gen/mp_symmetry.parquet --before-seconds 71.9 69.9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._machine import load_note  # noqa: E402


def _default_mp_file() -> str:
    shared = os.environ.get("CGWGAN_SHARED") or str(REPO.parent / "shared")
    return str(Path(shared) / "data" / "mp" / "mp_structures.csv.gz")


def _slice_file(src: str, rows: int, every: int, tmp: Path) -> str:
    """The file itself, or its first ``rows`` rows / every ``every``-th row as a temporary CSV.gz."""
    if rows <= 0 and every <= 1:
        return src
    import gzip

    df = pl.read_csv(src, infer_schema_length=0)
    if every > 1:
        df = df.gather_every(every)
    if rows > 0:
        df = df.head(rows)
    out = tmp / f"mp_sample_{df.height}.csv.gz"
    with gzip.open(out, "wb") as fh:
        df.write_csv(fh)
    return str(out)


def profile_stages(structures: pl.DataFrame, raw_cifs: list[str], *, n: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Milliseconds per structure of each stage, in-process, on ``n`` structures, after one
    warm-up pass (pyxtal's per-space-group tables load once per process, a start-up cost, not a
    per-structure one). ``clock=time.process_time`` gives CPU ms (a fair figure on a shared machine).
    Parse: the fast P1 reader (``parse_cif_ms``) and pymatgen's CifParser (``parse_cif_pymatgen_ms``)."""
    from lib import symmetry as S
    from lib.mp_sources import parse_records

    sample = structures.head(n)
    raw = pl.DataFrame({"material_id": sample["material_id"], "text": raw_cifs[:n], "fmt": ["cif"] * n,
                        "source_ref": [str(i) for i in range(n)]})
    out: dict[str, float] = {}
    parse_records(raw.head(5))
    parse_records(raw.head(5), fast_cif=False)
    t = clock()
    parse_records(raw)
    out["parse_cif_ms"] = (clock() - t) / n * 1e3
    t = clock()
    parse_records(raw, fast_cif=False)
    out["parse_cif_pymatgen_ms"] = (clock() - t) / n * 1e3
    cells = [(np.asarray(lat, float).reshape(3, 3), sp, np.asarray(fc, float))
             for lat, sp, fc in zip(sample["lattice_matrix"].to_list(), sample["species"].to_list(),
                                    sample["frac_coords"].to_list(), strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for warm in (True, False):
            items = []
            t = clock()
            for lat_a, sp, fc_a in cells:
                try:
                    items.append((lat_a, sp, fc_a, S.asymmetric_unit(lat_a, sp, fc_a)))
                except S.SymmetryError:
                    pass
            if not warm:
                out["spglib_asu_ms"] = (clock() - t) / n * 1e3
        matchers = (S._matcher(), S._matcher_primitive())
        for name, fn in (("round_trip_structure_matcher_ms",
                          lambda it: S.round_trip(*it[:4], matchers=matchers)),
                         ("round_trip_direct_ms", lambda it: S.direct_round_trip(*it[:4], it[3]["dataset"]))):
            t = clock()
            for it in items:
                try:
                    fn(it)
                except S.SymmetryError:
                    pass
            out[name] = (clock() - t) / max(len(items), 1) * 1e3
    return {k: round(v, 3) for k, v in out.items()}


def compare_tables(after: pl.DataFrame, before: pl.DataFrame, *, key: str = "material_id",
                   skip: tuple[str, ...] = ()) -> dict:
    """Column-by-column comparison of two tables on ``key``: rows only in one of them, and for
    each column the number of rows whose values differ (nulls equal to nulls), with examples."""
    cols = [c for c in before.columns if c in after.columns and c != key and c not in skip]
    joined = after.select(key, *cols).join(before.select(key, *cols), on=key, how="inner", suffix="__before")
    report: dict = {"rows_after": after.height, "rows_before": before.height, "rows_compared": joined.height,
                    "only_after": after.join(before, on=key, how="anti")[key].head(20).to_list(),
                    "only_before": before.join(after, on=key, how="anti")[key].head(20).to_list(),
                    "skipped_columns": list(skip), "columns": {}}
    for c in cols:
        differs = joined.filter(pl.col(c).ne_missing(pl.col(f"{c}__before")))
        report["columns"][c] = {"rows_differing": differs.height,
                                "examples": differs.select(key, c, f"{c}__before").head(5).to_dicts()}
    report["identical"] = (not report["only_after"] and not report["only_before"]
                           and all(v["rows_differing"] == 0 for v in report["columns"].values()))
    return report


def timed_symmetry(chunk: pl.DataFrame, **kwargs) -> pl.DataFrame:
    """``analyse_symmetry`` of a chunk plus a ``_cpu_s`` column: the worker's CPU seconds for it
    (on the first row, 0 on the others), so a loaded machine's wall time can be told from the work."""
    from lib.symmetry import analyse_symmetry

    c0 = time.process_time()
    out = analyse_symmetry(chunk, **kwargs)
    cpu = [0.0] * out.height
    if cpu:
        cpu[0] = time.process_time() - c0
    return out.with_columns(pl.Series("_cpu_s", cpu, dtype=pl.Float64))


def run_pipeline(args: argparse.Namespace) -> None:
    """parse + validate -> mp_symmetry in ``args.processes`` local processes (no Dagster, no Ray)."""
    from lib.ids import content_hash, file_sha256
    from lib.mp_sources import raw_from_table_file, validate_records
    from lib.parallel import map_row_chunks

    out_dir = Path(args.out)
    previous_md = out_dir / f"{args.name}.md"
    previous = previous_md.read_text() if previous_md.is_file() else ""
    results: dict = {"mode": "pipeline", "mp_file": args.mp_file, "rows_requested": args.rows, "every": args.every,
                     "method": args.method, "processes": args.processes, "cpu_count": os.cpu_count(),
                     "platform": platform.platform(), "load_average_start": list(os.getloadavg())}
    results["note"] = load_note(results["load_average_start"][0])
    with tempfile.TemporaryDirectory(prefix="bench_mp_") as tmpd:
        src = Path(_slice_file(args.mp_file, args.rows, args.every, Path(tmpd)))
        c0, t0 = time.process_time(), time.perf_counter()
        raw = raw_from_table_file(src)
        loaded = validate_records(raw, source=f"file:{src.name}",
                                  snapshot_id=content_hash({"file": file_sha256(str(src))}, prefix="snap-"),
                                  processes=args.processes if args.parse_processes else 0)
        t1, parse_cpu = time.perf_counter(), time.process_time() - c0
        sym, stats = map_row_chunks(timed_symmetry, loaded.structures, use_ray=False, processes=args.processes,
                                    chunks_per_cpu=8, round_trip_method=args.method)
        t2 = time.perf_counter()
        sym_cpu = float(sym["_cpu_s"].sum())
        sym = sym.drop("_cpu_s")
        parse_s, sym_s, total_s = t1 - t0, t2 - t1, t2 - t0
        n = loaded.structures.height
        results["pipeline"] = {
            "structures": n, "rejects": loaded.rejects.height, "parse_processes": args.processes if
            args.parse_processes else 1, "parse_validate_seconds": round(parse_s, 2),
            "symmetry_seconds": round(sym_s, 2), "symmetry_chunks": stats.n_chunks,
            "total_seconds": round(total_s, 2), "structures_per_s": round(n / total_s, 1),
            "parse_validate_cpu_seconds": round(parse_cpu, 2),
            "symmetry_worker_cpu_seconds": round(sym_cpu, 2),
            "idle_projection_seconds": round(parse_cpu + sym_cpu / args.processes, 1),
            "round_trip_ok": int(sym["is_round_trip_ok"].fill_null(False).sum()),
            "goal_seconds": 120, "goal_met": total_s <= 120}
        print(json.dumps(results["pipeline"], indent=1), flush=True)
        if args.compare:
            ref = pl.read_parquet(args.compare).join(raw.select("material_id"), on="material_id", how="semi")
            results["comparison"] = {"reference": args.compare,
                                     **compare_tables(sym, ref, skip=("snapshot_id",))}
            print("identical to the reference:", results["comparison"]["identical"], flush=True)
        sample = loaded.structures.head(args.profile_rows)
        cifs = raw.join(sample.select("material_id"), on="material_id", how="semi")["text"].to_list()
        results["profile_cpu_ms_per_structure"] = profile_stages(sample, cifs, n=min(args.profile_rows, len(cifs)),
                                                                 clock=time.process_time)
    results["before"] = {"seconds": args.before_seconds, "source": args.before_source}
    results["load_average_end"] = list(os.getloadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str))
    g, prof = results["pipeline"], results["profile_cpu_ms_per_structure"]
    lines = [
        f"# {args.name}", "",
        f"Input: `{Path(args.mp_file).name}`" + (f", every {args.every}th row" if args.every > 1 else "")
        + (f", first {args.rows}" if args.rows else "")
        + f" ({g['structures'] + g['rejects']} rows); parse + validate, then `mp_symmetry` (round trip "
        f"`{args.method}`) in {args.processes} local processes, no Dagster/Ray; {results['cpu_count']} CPUs, "
        f"{results['note']} (load {results['load_average_start'][0]:.1f} at start, "
        f"{results['load_average_end'][0]:.1f} at end).", "",
        "| measure | before | after |", "|---|---|---|",
    ]
    before = args.before_seconds or []
    b_parse, b_sym = [*before, None, None][:2]
    b_total = round(b_parse + b_sym, 1) if b_parse is not None and b_sym is not None else None
    lines += [
        f"| parse + validate (after: {g['parse_processes']} process(es)) | {b_parse if b_parse is not None else '-'} s "
        f"| {g['parse_validate_seconds']} s ({g['parse_validate_cpu_seconds']} CPU s) |",
        f"| mp_symmetry, {args.processes} processes | {b_sym if b_sym is not None else '-'} s | {g['symmetry_seconds']} s "
        f"({g['symmetry_worker_cpu_seconds']} CPU s in the workers) |",
        f"| **total** (goal <= 120 s) | {b_total if b_total is not None else '-'} s | **{g['total_seconds']} s** |",
        f"| idle-machine projection: parse CPU + worker CPU / {args.processes} | | {g['idle_projection_seconds']} s |",
        f"| structures / rejects | | {g['structures']} / {g['rejects']} |",
        f"| round trip ok | | {g['round_trip_ok']} |",
    ]
    share = g["symmetry_worker_cpu_seconds"] / (args.processes * g["symmetry_seconds"]) if g["symmetry_seconds"] else 0
    lines += ["", f"The symmetry workers got {share:.0%} of {args.processes} cores' time during their "
              f"{g['symmetry_seconds']} s (the rest went to other jobs on the machine); the idle-machine projection "
              "counts CPU seconds instead of wall time."]
    if args.before_source:
        lines += ["", f"Before: {args.before_source}."]
    lines += ["", f"Per stage, in-process CPU ms per structure ({args.profile_rows} structures, warm caches):", "",
              "| stage | ms |", "|---|---|"]
    lines += [f"| {k.removesuffix('_ms')} | {v} |" for k, v in prof.items()]
    if "comparison" in results:
        cmp_ = results["comparison"]
        lines += ["", f"`mp_symmetry` against `{cmp_['reference']}` ({cmp_['rows_compared']} rows joined on "
                  f"material_id; only after {len(cmp_['only_after'])}, only before {len(cmp_['only_before'])}; "
                  f"`snapshot_id` skipped: its lineage hash is made differently): "
                  + ("**identical in every column**." if cmp_["identical"] else "**differences**:"), ""]
        lines += ["| column | rows differing |", "|---|---|"]
        lines += [f"| {c} | {v['rows_differing']} |" for c, v in cmp_["columns"].items()]
    if previous.strip():
        lines += ["", "## before: the previous result of this benchmark", "",
                  *[("#" + ln if ln.startswith("#") else ln) for ln in previous.strip().splitlines()]]
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp-file", default=_default_mp_file())
    ap.add_argument("--rows", type=int, default=0, help="first N rows only (0 = the whole file)")
    ap.add_argument("--every", type=int, default=1, help="every N-th row only (a sample spread over the file)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--method", default="structure_matcher", choices=["structure_matcher", "direct", "none"])
    ap.add_argument("--profile-rows", type=int, default=400)
    ap.add_argument("--other-workers-rows", type=int, default=0,
                    help="structures for the worker counts below the largest (0 = all of them)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="bench_mp", help="result file stem")
    ap.add_argument("--pipeline", action="store_true",
                    help="time parse + validate -> mp_symmetry in local processes (the speed goal), see above")
    ap.add_argument("--processes", type=int, default=2, help="--pipeline: worker processes")
    ap.add_argument("--parse-processes", action="store_true",
                    help="--pipeline: parse in the worker processes too (default: in-process)")
    ap.add_argument("--compare", default="", help="--pipeline: reference mp_symmetry parquet to compare with")
    ap.add_argument("--before-seconds", type=float, nargs=2, default=None, metavar=("PARSE", "SYMMETRY"),
                    help="--pipeline: the same measurement with earlier code, for the table")
    ap.add_argument("--before-source", default="", help="--pipeline: where --before-seconds come from")
    args = ap.parse_args()
    if args.pipeline:
        run_pipeline(args)
        return

    import dagster as dg
    import ray

    from assets import mp as mp_assets
    from lib.parallel import map_row_chunks
    from lib.store import TableStore
    from lib.symmetry import analyse_symmetry
    from orchestration.resources import CgwganHome, MPSource, RayResource

    # Ray starts its workers at niceness 15; on a machine shared with other jobs that starves them
    # and measures the neighbours, not this code. Workers at the driver's priority instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    results: dict = {"mp_file": args.mp_file, "rows_requested": args.rows, "every": args.every,
                     "method": args.method,
                     "cpu_count": os.cpu_count(), "platform": platform.platform(),
                     "load_average_start": list(os.getloadavg())}
    results["note"] = load_note(results["load_average_start"][0])
    with tempfile.TemporaryDirectory(prefix="bench_mp_") as tmpd:
        tmp = Path(tmpd)
        src = _slice_file(args.mp_file, args.rows, args.every, tmp)
        home = tmp / "home"
        top = max(args.workers)
        if ray.is_initialized():
            ray.shutdown()
        t0 = time.perf_counter()
        res = dg.materialize(
            [mp_assets.mp_structures, mp_assets.mp_symmetry, mp_assets.training_templates],
            resources={"cgwgan_home": CgwganHome(home=str(home)), "mp_source": MPSource(source=src),
                       "ray_runtime": RayResource(num_cpus=top, object_store_mb=512)},
            run_config={"ops": {"mp_symmetry": {"config": {"round_trip_method": args.method}}}},
        )
        group_s = time.perf_counter() - t0
        assert res.success
        md = {node: {k: v.value for k, v in res.asset_materializations_for_node(node)[0].metadata.items()
                     if not isinstance(v.value, str) or len(v.value) < 2000}
              for node in ("mp_structures", "mp_symmetry", "training_templates")}
        store = TableStore(home)
        structures = store.read("mp_structures")
        sym = store.read("mp_symmetry")
        failures = (sym.filter(~pl.col("is_round_trip_ok"))
                    .select("material_id", "spacegroup_number", "round_trip_error").to_dicts())
        results["group"] = {
            "workers": top, "seconds": round(group_s, 1), "n_input": md["mp_structures"]["n_input"],
            "structures": structures.height, "rejects": md["mp_structures"]["n_rejects"],
            "parse_seconds": md["mp_structures"]["seconds"],
            "parse_structures_per_s": md["mp_structures"]["structures_per_s"],
            "symmetry_seconds": md["mp_symmetry"]["seconds"],
            "symmetry_structures_per_s": md["mp_symmetry"]["structures_per_s"],
            "round_trip_ok": md["mp_symmetry"]["round_trip_ok"],
            "round_trip_rate": md["mp_symmetry"]["round_trip_rate"],
            "training_rows": md["training_templates"]["dagster/row_count"],
            "n_spacegroups": md["mp_symmetry"]["n_spacegroups"],
        }
        results["round_trip_failures"] = failures
        print(json.dumps(results["group"], indent=1), flush=True)
        results["symmetry_by_workers"] = {str(top): {"structures": structures.height,
                                                     "seconds": md["mp_symmetry"]["seconds"],
                                                     "structures_per_s": md["mp_symmetry"]["structures_per_s"],
                                                     "source": "the group run"}}
        ray.shutdown()
        for w in sorted(set(args.workers) - {top}):
            ray.init(num_cpus=w, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
            subset = structures.head(args.other_workers_rows) if args.other_workers_rows else structures
            out, stats = map_row_chunks(analyse_symmetry, subset, use_ray=True, round_trip_method=args.method)
            ray.shutdown()
            results["symmetry_by_workers"][str(w)] = {
                "structures": subset.height,
                "seconds": round(stats.seconds, 1), "structures_per_s": round(stats.rows_per_s, 1),
                "round_trip_ok": int(out["is_round_trip_ok"].sum())}
            print(w, results["symmetry_by_workers"][str(w)], flush=True)
        raw_cifs = (pl.read_csv(src, infer_schema_length=0, n_rows=args.profile_rows * 2)
                    .join(structures.select("material_id"), on="material_id")["cif"].to_list())
        results["profile_ms_per_structure"] = profile_stages(
            structures.filter(pl.col("material_id").is_in(
                pl.read_csv(src, infer_schema_length=0, n_rows=args.profile_rows * 2)["material_id"].implode())),
            raw_cifs, n=min(args.profile_rows, len(raw_cifs)))
    results["load_average_end"] = list(os.getloadavg())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str))
    g = results["group"]
    lines = [
        f"# {args.name}", "",
        f"Input: `{Path(args.mp_file).name}`"
        + (f", every {args.every}th row" if args.every > 1 else "") + (f", first {args.rows}" if args.rows else "")
        + f" ({g['n_input']} rows), round trip `{args.method}`, "
        f"{results['cpu_count']} CPUs, {results['note']} "
        f"(load {results['load_average_start'][0]:.1f} at start).", "",
        "| measure | value |", "|---|---|",
        f"| whole mp group, {g['workers']} Ray workers | {g['seconds']} s |",
        f"| parse + validate | {g['parse_seconds']} s ({g['parse_structures_per_s']} structures/s) |",
        f"| structures / rejects | {g['structures']} / {g['rejects']} |",
        f"| round trip ok | {g['round_trip_ok']} ({g['round_trip_rate']:.4%}) |",
        f"| training rows | {g['training_rows']} |",
    ]
    for w, r in sorted(results["symmetry_by_workers"].items()):
        lines.append(f"| mp_symmetry, {w} Ray worker(s), {r['structures']} structures | {r['seconds']} s "
                     f"({r['structures_per_s']} structures/s) |")
    for k, v in results["profile_ms_per_structure"].items():
        lines.append(f"| profile: {k} (in-process) | {v} |")
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
