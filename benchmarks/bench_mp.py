"""Benchmark of the ``mp`` group on the shared MP file.

Measures (writes ``benchmarks/results/bench_mp.json`` and ``.md``):

* the whole ``mp`` group (mp_structures -> mp_symmetry -> training_templates) through
  ``dg.materialize`` on a local Ray with the largest worker count, with its round-trip rate;
* ``mp_symmetry`` alone (``analyse_symmetry`` over Ray tasks) in structures/s for each worker
  count, on the same structures;
* a per-stage profile in-process on a sample (ms per structure: CIF parse, spglib + ASU,
  StructureMatcher round trip, direct round trip).

    python benchmarks/bench_mp.py                    # full shared file, 1 and 2 workers
    python benchmarks/bench_mp.py --rows 2000        # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]


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


def profile_stages(structures: pl.DataFrame, raw_cifs: list[str], *, n: int) -> dict[str, float]:
    """Milliseconds per structure of each stage, in-process, on ``n`` structures."""
    from lib import symmetry as S
    from lib.mp_sources import parse_records

    sample = structures.head(n)
    raw = pl.DataFrame({"material_id": sample["material_id"], "text": raw_cifs[:n], "fmt": ["cif"] * n,
                        "source_ref": [str(i) for i in range(n)]})
    out: dict[str, float] = {}
    t = time.perf_counter()
    parse_records(raw)
    out["parse_cif_ms"] = (time.perf_counter() - t) / n * 1e3
    items = []
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lat, sp, fc in zip(sample["lattice_matrix"].to_list(), sample["species"].to_list(),
                               sample["frac_coords"].to_list(), strict=True):
            lat_a, fc_a = np.asarray(lat, float).reshape(3, 3), np.asarray(fc, float)
            try:
                items.append((lat_a, sp, fc_a, S.asymmetric_unit(lat_a, sp, fc_a)))
            except S.SymmetryError:
                pass
        out["spglib_asu_ms"] = (time.perf_counter() - t) / n * 1e3
        matchers = (S._matcher(), S._matcher_primitive())
        for name, fn in (("round_trip_structure_matcher_ms",
                          lambda it: S.round_trip(*it[:4], matchers=matchers)),
                         ("round_trip_direct_ms", lambda it: S.direct_round_trip(*it[:4], it[3]["dataset"]))):
            t = time.perf_counter()
            for it in items:
                try:
                    fn(it)
                except S.SymmetryError:
                    pass
            out[name] = (time.perf_counter() - t) / max(len(items), 1) * 1e3
    return {k: round(v, 2) for k, v in out.items()}


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
    args = ap.parse_args()

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
                     "load_average_start": list(os.getloadavg()),
                     "note": "2-core machine shared with other engineers' jobs: numbers are pessimistic"}
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
        f"{results['cpu_count']} CPUs, machine shared with other jobs (load {results['load_average_start'][0]:.1f} "
        f"at start): numbers are pessimistic.", "",
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
