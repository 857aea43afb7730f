"""Dedup over the Ba-Ru-O candidates written by ``bench_infill.py``: fingerprints, bucketed
StructureMatcher, MP matching against the shared Ba-Ru-O structures.

    python benchmarks/bench_dedup.py [--home /tmp/cgwgan_bench_infill] [--templates 0] [--ray 0]

``--templates N`` restricts the run to the candidates of the first N templates (by template_id);
0 = the full set. ``--ray K`` matches buckets as Ray tasks on K local CPUs (0 = in-process).
Records how many StructureMatcher pairs were actually compared (within the system and against
MP), how many the descriptor pre-screen skipped, and the stage timings.

Writes ``benchmarks/results/bench_dedup.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
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

from lib import wyckoff  # noqa: E402
from lib.dedup import MATCHER_DEFAULTS, MP_MATCHER_DEFAULTS, apply_dedup, dedup_candidates  # noqa: E402
from lib.mp_sources import load_mp_source  # noqa: E402
from lib.store import TableStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CHEMSYS = "Ba-O-Ru"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/cgwgan_bench_infill")
    ap.add_argument("--templates", type=int, default=0)
    ap.add_argument("--ray", type=int, default=0)
    args = ap.parse_args()
    shared = Path(os.environ.get("CGWGAN_SHARED") or ROOT.parent / "shared")
    store = TableStore(Path(args.home))
    if not store.exists("candidates", CHEMSYS):
        raise SystemExit(f"no candidates under {args.home}: run benchmarks/bench_infill.py first")
    for sg in range(1, 231):
        wyckoff.letters(sg)
    mp = load_mp_source(str(shared / "data" / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv")).structures

    scan = store.scan("candidates", CHEMSYS)
    if args.templates:
        tids = scan.select("template_id").unique().sort("template_id").head(args.templates).collect()["template_id"]
        scan = scan.filter(pl.col("template_id").is_in(tids.implode()))
    n_rows = scan.select(pl.len()).collect().item()
    if args.ray:
        import ray

        ray.init(num_cpus=args.ray, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        t, c = time.perf_counter(), time.process_time()
        res = dedup_candidates(scan, mp_structures=mp, elements=["Ba", "Ru", "O"])
        dedup_s, dedup_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        unique = res.unique
        files = store.files("candidates", CHEMSYS)
        info = store.write("candidates_dedup", (apply_dedup(pl.read_parquet(f), unique) for f in files),
                           partition=CHEMSYS if not args.templates else f"{CHEMSYS}-subset")
        write_s = time.perf_counter() - t
    finally:
        if args.ray:
            import ray

            ray.shutdown()
    load = os.getloadavg()
    out = {
        "candidates": n_rows,
        "templates_subset": args.templates or "all",
        **res.counts(),
        "dedup_wall_s": round(dedup_s, 1),
        "dedup_cpu_s_main_process": round(dedup_cpu, 1),
        "write_s": round(write_s, 1),
        "rows_written": info.rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "within_system_matcher": MATCHER_DEFAULTS,
        "mp_matcher": MP_MATCHER_DEFAULTS,
        "mp_matches_by_material": res.mp_matches_by_material,
        "machine": f"{platform.node()} {os.cpu_count()} cores, load average at end {load[0]:.1f}",
        "note": "shared 2-core machine (several engineers' jobs running): wall times are pessimistic",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_dedup.json").write_text(json.dumps(out, indent=1, default=str))
    md = [
        "# bench_dedup: Ba-Ru-O candidates -> candidates_dedup",
        "",
        "| metric | value |",
        "|---|---|",
        f"| candidates in | {n_rows:,} (templates: {out['templates_subset']}) |",
        f"| unique out | {res.n_unique:,} |",
        f"| folded by fingerprint / StructureMatcher | {res.n_folded_fingerprint:,} / {res.n_folded_matcher:,} |",
        f"| buckets (>= 2 members) / members / largest | {res.n_buckets:,} / {res.n_bucket_members:,} / {res.largest_bucket} |",
        f"| StructureMatcher pairs compared (within system) | {res.n_pairs_compared:,} |",
        f"| pairs skipped by the descriptor pre-screen | {res.n_pairs_screened_out:,} |",
        f"| MP references / candidates checked / pairs compared / matches | {res.n_mp_references} / "
        f"{res.n_mp_candidates:,} / {res.n_mp_pairs_compared:,} / {res.n_mp_matches} |",
        f"| stage seconds: fingerprint / matcher / MP | {res.seconds_fingerprint:.1f} / {res.seconds_matcher:.1f} / "
        f"{res.seconds_mp:.1f} |",
        f"| dedup wall / write | {out['dedup_wall_s']} s / {out['write_s']} s ({res.backend}, {res.workers} workers) |",
        "",
        f"Machine: {out['machine']}. {out['note']}.",
    ]
    (RESULTS / "bench_dedup.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
