"""Dedup over the Ba-Ru-O candidates written by ``bench_infill.py``: fingerprints, bucketed
StructureMatcher, MP matching against the shared Ba-Ru-O structures.

    python benchmarks/bench_dedup.py --full [--workers 2]             # all candidates (120,000 templates)
    python benchmarks/bench_dedup.py --templates 10000 [--workers 1]  # candidates of the first N templates
    python benchmarks/bench_dedup.py --templates 10000 --compare-workers 1,2  # same output for 1 and 2 workers?

``--home`` is the store ``bench_infill.py`` wrote (default ``/tmp/cgwgan_bench_infill``).
``--workers K`` matches buckets in K local processes (``--ray K``: Ray tasks on K local CPUs
instead). ``--distance-window W`` uses the old fixed pre-screen window instead of the bound
derived from the matcher tolerances. Records candidates in, unique out, folded by fingerprint /
by matcher, buckets, StructureMatcher pairs actually compared, pairs skipped by each pre-screen,
MP pairs compared and matches, stage seconds, wall and CPU time, workers, peak RSS (this
process and its worker processes) and the load average before and after.

Writes ``benchmarks/results/bench_dedup.json`` and ``.md`` (``--out NAME`` for another name);
``--compare-workers`` adds its table to them (key ``worker_comparison``, a section of the .md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from benchmarks._machine import load_note  # noqa: E402
from lib import wyckoff  # noqa: E402
from lib.dedup import MATCHER_DEFAULTS, MP_MATCHER_DEFAULTS, apply_dedup, dedup_candidates  # noqa: E402
from lib.mp_sources import load_mp_source  # noqa: E402
from lib.store import TableStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CHEMSYS = "Ba-O-Ru"


def _digest(res) -> str:
    """sha256 over the decisions (unique rows and folded rows, sorted), to compare runs."""
    h = hashlib.sha256()
    for df in (res.unique.sort("candidate_id"), res.folded.sort("candidate_id")):
        h.update(df.write_csv().encode())
    return h.hexdigest()[:16]


def _run(scan, mp, args, workers: int) -> tuple:
    t, c = time.perf_counter(), time.process_time()
    c_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = dedup_candidates(scan, mp_structures=mp, elements=["Ba", "Ru", "O"], workers=workers,
                           distance_window=args.distance_window, use_ray=bool(args.ray))
    wall = time.perf_counter() - t
    cpu = time.process_time() - c
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_children = (ch.ru_utime + ch.ru_stime) - (c_children.ru_utime + c_children.ru_stime)
    return res, wall, cpu, cpu_children


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/cgwgan_bench_infill")
    scope = ap.add_mutually_exclusive_group(required=True)
    scope.add_argument("--full", action="store_true", help="every candidate of the store (120k templates)")
    scope.add_argument("--templates", type=int, help="candidates of the first N templates (by template_id)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ray", type=int, default=0)
    ap.add_argument("--distance-window", type=float, default=None)
    ap.add_argument("--compare-workers", default="", help="e.g. 1,2: run once per worker count, compare outputs")
    ap.add_argument("--no-write", action="store_true", help="skip writing candidates_dedup")
    ap.add_argument("--out", default="bench_dedup")
    ap.add_argument("--merge-as", default="", help="store this run under that key of the existing result "
                    "(and as a section of the .md) instead of replacing it")
    args = ap.parse_args()
    shared = Path(os.environ.get("CGWGAN_SHARED") or ROOT.parent / "shared")
    store = TableStore(Path(args.home))
    if not store.exists("candidates", CHEMSYS):
        raise SystemExit(f"no candidates under {args.home}: run benchmarks/bench_infill.py first")
    load_before = os.getloadavg()
    for sg in range(1, 231):
        wyckoff.letters(sg)
    mp = load_mp_source(str(shared / "data" / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv")).structures

    scan = store.scan("candidates", CHEMSYS)
    n_templates = scan.select(pl.col("template_id").n_unique()).collect().item()
    if args.templates:
        tids = scan.select("template_id").unique().sort("template_id").head(args.templates).collect()["template_id"]
        scan = scan.filter(pl.col("template_id").is_in(tids.implode()))
        n_templates = tids.len()
    n_rows = scan.select(pl.len()).collect().item()

    if args.compare_workers:
        runs = []
        for w in (int(x) for x in args.compare_workers.split(",")):
            res, wall, cpu, cpu_ch = _run(scan, mp, args, w)
            runs.append({"workers": w, "backend": res.backend, "wall_s": round(wall, 1),
                         "cpu_s": round(cpu + cpu_ch, 1), "n_unique": res.n_unique,
                         "n_folded_matcher": res.n_folded_matcher, "n_pairs_compared": res.n_pairs_compared,
                         "n_mp_matches": res.n_mp_matches, "decisions_sha256": _digest(res)})
            print(runs[-1], flush=True)
        check = {"candidates": n_rows, "templates": n_templates, "runs": runs,
                 "identical": len({r["decisions_sha256"] for r in runs}) == 1,
                 "load_average_before": [round(x, 2) for x in load_before],
                 "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        section = [f"## Same output for {args.compare_workers} workers? ({n_rows:,} candidates, "
                   f"{n_templates:,} templates)", "",
                   f"Identical decisions (sha256 of the unique and folded tables): **{check['identical']}**.", "",
                   "| workers | backend | wall s | CPU s | unique | folded by matcher | pairs compared | MP matches "
                   "| sha256 |", "|---|---|---|---|---|---|---|---|---|"]
        section += [f"| {r['workers']} | {r['backend']} | {r['wall_s']} | {r['cpu_s']} | {r['n_unique']:,} | "
                    f"{r['n_folded_matcher']:,} | {r['n_pairs_compared']:,} | {r['n_mp_matches']} | "
                    f"`{r['decisions_sha256']}` |" for r in runs]
        section += ["", f"Load average before {check['load_average_before']}, after {check['load_average_after']}."]
        # stored next to the main result (bench_dedup.json key "worker_comparison", a section of the .md)
        RESULTS.mkdir(parents=True, exist_ok=True)
        jpath, mpath = RESULTS / f"{args.out}.json", RESULTS / f"{args.out}.md"
        data = json.loads(jpath.read_text()) if jpath.exists() else {}
        data["worker_comparison"] = check
        jpath.write_text(json.dumps(data, indent=1, default=str))
        md = mpath.read_text().split("\n## Same output")[0].rstrip("\n") + "\n\n" if mpath.exists() else ""
        mpath.write_text(md + "\n".join(section) + "\n")
        print("\n".join(section))
        return

    if args.ray:
        import ray

        ray.init(num_cpus=args.ray, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        res, dedup_s, dedup_cpu, cpu_children = _run(scan, mp, args, args.ray or args.workers)
        load_after_dedup = os.getloadavg()
        write_s, rows_written = 0.0, None
        if not args.no_write:
            t = time.perf_counter()
            files = store.files("candidates", CHEMSYS)
            info = store.write("candidates_dedup", (apply_dedup(pl.read_parquet(f), res.unique) for f in files),
                               partition=CHEMSYS if not args.templates else f"{CHEMSYS}-subset")
            write_s, rows_written = time.perf_counter() - t, info.rows
    finally:
        if args.ray:
            import ray

            ray.shutdown()
    c = res.counts()
    out = {
        "candidates": n_rows,
        "templates": n_templates,
        "scope": "full" if args.full else f"first {args.templates} templates",
        **c,
        "dedup_wall_s": round(dedup_s, 1),
        "dedup_cpu_s_main_process": round(dedup_cpu, 1),
        "dedup_cpu_s_worker_processes": round(cpu_children, 1),
        "write_s": round(write_s, 1),
        "rows_written": rows_written,
        "decisions_sha256": _digest(res),
        "peak_rss_mb_main_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "peak_rss_mb_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1),
        "within_system_matcher": MATCHER_DEFAULTS,
        "mp_matcher": MP_MATCHER_DEFAULTS,
        "mp_matches_by_material": res.mp_matches_by_material,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after_dedup": [round(x, 2) for x in load_after_dedup],
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "note": load_note(load_before[0]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = [
        f"## {args.merge_as}" if args.merge_as else "# bench_dedup: Ba-Ru-O candidates -> candidates_dedup",
        "",
        "| metric | value |",
        "|---|---|",
        f"| candidates in | {n_rows:,} ({out['scope']}: {n_templates:,} templates) |",
        f"| unique out | {res.n_unique:,} |",
        f"| folded by fingerprint / StructureMatcher | {res.n_folded_fingerprint:,} / {res.n_folded_matcher:,} |",
        f"| buckets (>= 2 members) / members / largest | {res.n_buckets:,} / {res.n_bucket_members:,} / "
        f"{res.largest_bucket:,} |",
        f"| pairs inside buckets | {res.n_pairs_in_buckets:,} |",
        f"| pairs skipped by the descriptor pre-screen ({res.prescreen}) | {res.n_pairs_screened_out:,} |",
        f"| pairs passing it | {res.n_pairs_prescreen_passed:,} |",
        f"| of those skipped: different primitive atom count / member already folded | "
        f"{res.n_pairs_skipped_primitive:,} / {res.n_pairs_skipped_folded:,} |",
        f"| **StructureMatcher pairs compared (within system)** | **{res.n_pairs_compared:,}** |",
        f"| structures reduced / by pymatgen's reduction (extra translations) | {res.n_structures_reduced:,} / "
        f"{res.n_reduce_fallbacks:,} |",
        f"| MP references / candidates checked / pairs compared / matches | {res.n_mp_references} / "
        f"{res.n_mp_candidates:,} / {res.n_mp_pairs_compared:,} / {res.n_mp_matches} |",
        f"| stage seconds: fingerprint / pre-screen / matcher (incl. pre-screen) / MP | "
        f"{res.seconds_fingerprint:.1f} / {res.seconds_prescreen:.1f} / {res.seconds_matcher:.1f} / "
        f"{res.seconds_mp:.1f} |",
        f"| **dedup wall** | **{out['dedup_wall_s']} s** ({res.backend}, {res.workers} workers) |",
        f"| CPU: main process / worker processes | {out['dedup_cpu_s_main_process']} s / "
        f"{out['dedup_cpu_s_worker_processes']} s |",
        f"| write candidates_dedup | {out['write_s']} s ({rows_written} rows) |",
        f"| peak RSS: main process / largest worker | {out['peak_rss_mb_main_process']} MB / "
        f"{out['peak_rss_mb_largest_worker']} MB |",
        f"| load average (1/5/15 min) before / after dedup | {out['load_average_before']} / "
        f"{out['load_average_after_dedup']} |",
        f"| decisions sha256 | `{out['decisions_sha256']}` |",
        "",
        f"Machine: {out['machine']}. {out['note']}.",
    ]
    jpath, mpath = RESULTS / f"{args.out}.json", RESULTS / f"{args.out}.md"
    if args.merge_as:
        data = json.loads(jpath.read_text()) if jpath.exists() else {}
        data[args.merge_as] = out
        jpath.write_text(json.dumps(data, indent=1, default=str))
        old = mpath.read_text().split(f"\n## {args.merge_as}\n")[0].rstrip("\n") + "\n\n" if mpath.exists() else ""
        mpath.write_text(old + "\n".join(md) + "\n")
    else:
        jpath.write_text(json.dumps(out, indent=1, default=str))
        mpath.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
