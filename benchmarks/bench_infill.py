"""Infill at the paper's scale: 120,000 templates filled with Ba, Ru and O into the Parquet store.

    python benchmarks/bench_infill.py [--templates 120000] [--home /tmp/cgwgan_bench_infill] [--seed 0]

Templates: ``lib.infill.random_templates`` (pyxtal Wyckoff tables, random free coordinates and
lattices), space groups drawn with the frequencies of the shared MP file (``mp_structures.csv.gz``,
``spacegroup_number``) when it is there, 1-4 ASU sites (weights 5/15/45/35 %). Generated first,
written as the ``templates`` table, not timed. Timed: ``iter_infill`` streamed through
``TableStore.write`` (the ``candidates`` asset's path), wall and CPU seconds, peak RSS, bytes on
disk; then DuckDB: the top-20 reduced formulas and a 100-row lookup by ``template_id``.
The one-off load of pyxtal's Wyckoff tables (all 230 groups) is timed separately.

Writes ``benchmarks/results/bench_infill.json`` and ``.md``. The store stays under ``--home`` for
``bench_dedup.py``.
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

from benchmarks._machine import load_note  # noqa: E402
from lib import wyckoff  # noqa: E402
from lib.infill import InfillTotals, iter_infill, random_templates  # noqa: E402
from lib.store import TableStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CHEMSYS = "Ba-O-Ru"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sg_weights(shared: Path) -> tuple[list[int], list[float]] | tuple[None, None]:
    f = shared / "data" / "mp" / "mp_structures.csv.gz"
    if not f.exists():
        return None, None
    counts = (pl.read_csv(f, columns=["spacegroup_number"]).drop_nulls()
              .with_columns(pl.col("spacegroup_number").cast(pl.Int64))
              .filter(pl.col("spacegroup_number") > 1).group_by("spacegroup_number").len()
              .sort("spacegroup_number"))
    return counts["spacegroup_number"].to_list(), counts["len"].cast(pl.Float64).to_list()


def _timed(con, sql: str, params=None, repeat: int = 3) -> tuple[float, float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        rows = len(con.execute(sql, params or []).fetchall())
        times.append(time.perf_counter() - t)
    return times[0], min(times), rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", type=int, default=120_000)
    ap.add_argument("--home", default="/tmp/cgwgan_bench_infill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-templates", type=int, default=20_000)
    args = ap.parse_args()
    shared = Path(os.environ.get("CGWGAN_SHARED") or ROOT.parent / "shared")
    store = TableStore(Path(args.home))

    t = time.perf_counter()
    for sg in range(1, 231):
        for let in wyckoff.letters(sg):
            wyckoff.position(sg, let)
    warm_s = time.perf_counter() - t

    sgs, weights = _sg_weights(shared)
    t = time.perf_counter()
    tpl = random_templates(args.templates, seed=args.seed, spacegroups=sgs, spacegroup_weights=weights)
    gen_s = time.perf_counter() - t
    store.write("templates", tpl, partition="gen-bench")
    del tpl
    rss_before = _rss_mb()

    totals = InfillTotals()
    t, c = time.perf_counter(), time.process_time()
    info = store.write("candidates", iter_infill(store.scan("templates", "gen-bench"), elements=["Ba", "Ru", "O"],
                                                 batch_templates=args.batch_templates, totals=totals),
                       partition=CHEMSYS, metadata=totals.counts(), max_rows_per_shard=100_000)
    infill_s, infill_cpu = time.perf_counter() - t, time.process_time() - c
    rss_after = _rss_mb()
    store.refresh_catalog()

    con = store.connect()
    q_top = "SELECT reduced_formula, count(*) FROM candidates GROUP BY 1 ORDER BY 2 DESC LIMIT 20"
    top_first, top_best, _ = _timed(con, q_top)
    top = con.execute(q_top).fetchall()
    ids = [r[0] for r in con.execute(
        "SELECT template_id FROM candidates GROUP BY 1 HAVING count(*) >= 10 ORDER BY hash(template_id) LIMIT 10"
    ).fetchall()]
    q_lookup = "SELECT * FROM candidates WHERE list_contains(?, template_id) LIMIT 100"
    look_first, look_best, look_rows = _timed(con, q_lookup, [ids])
    one_first, one_best, one_rows = _timed(con, "SELECT * FROM candidates WHERE template_id = ?", [ids[0]])
    con.close()

    load = os.getloadavg()
    out = {
        "templates": args.templates,
        "candidates": info.rows,
        "candidates_per_template": round(info.rows / args.templates, 2),
        "infill_wall_s": round(infill_s, 2),
        "infill_cpu_s": round(infill_cpu, 2),
        "rows_per_s": round(info.rows / infill_s, 1),
        "target_infill_s": 30,
        "wyckoff_tables_load_s": round(warm_s, 2),
        "template_generation_s": round(gen_s, 2),
        "peak_rss_mb_before_infill": round(rss_before, 1),
        "peak_rss_mb_after_infill": round(rss_after, 1),
        "bytes_on_disk": info.bytes_on_disk,
        "shards": len(info.files),
        "counts": totals.counts(),
        "duckdb_top20_formulas_s": {"first": round(top_first, 4), "best_of_3": round(top_best, 4)},
        "duckdb_100_row_lookup_by_template_id_s": {"first": round(look_first, 4), "best_of_3": round(look_best, 4),
                                                   "rows": look_rows, "templates": len(ids)},
        "duckdb_one_template_lookup_s": {"first": round(one_first, 4), "best_of_3": round(one_best, 4),
                                         "rows": one_rows},
        "top_formulas": [[f, n] for f, n in top],
        "machine": f"{platform.node()} {os.cpu_count()} cores, load average at end {load[0]:.1f}",
        "note": load_note(load[0]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_infill.json").write_text(json.dumps(out, indent=1))
    md = [
        "# bench_infill: 120k templates -> Ba-Ru-O candidates -> Parquet store",
        "",
        "| metric | value |",
        "|---|---|",
        f"| templates | {args.templates:,} |",
        f"| candidates | {info.rows:,} ({out['candidates_per_template']} per template) |",
        f"| infill + write, wall | {out['infill_wall_s']} s (target < 30 s) |",
        f"| infill + write, CPU | {out['infill_cpu_s']} s |",
        f"| rows/s (wall) | {out['rows_per_s']:,} |",
        f"| folded by site symmetry / fingerprint | {totals.n_folded_symmetry:,} / {totals.n_folded_fingerprint:,} |",
        f"| peak RSS before / after infill | {out['peak_rss_mb_before_infill']} / {out['peak_rss_mb_after_infill']} MB |",
        f"| bytes on disk | {info.bytes_on_disk:,} ({len(info.files)} shards) |",
        f"| Wyckoff tables load (once per process) | {out['wyckoff_tables_load_s']} s |",
        f"| DuckDB top-20 formulas | first {top_first:.3f} s, best {top_best:.3f} s |",
        f"| DuckDB 100-row lookup by template_id (10 ids) | first {look_first:.3f} s, best {look_best:.3f} s |",
        f"| DuckDB all rows of one template_id ({one_rows}) | first {one_first:.3f} s, best {one_best:.3f} s |",
        "",
        f"Machine: {out['machine']}. {out['note']}.",
    ]
    (RESULTS / "bench_infill.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
