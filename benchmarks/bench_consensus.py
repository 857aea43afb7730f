"""Consensus benchmark (issue 13 section 3): the ``consensus`` asset on a reduced Ba-Ru-O run.

    cgwgan main --home /tmp/cons_home --relax 30 --no-use-ray      # the reduced run (demo profile)
    python benchmarks/bench_consensus.py --home /tmp/cons_home [--top-k 20] [--rank-by mean]
        [--surrogates M3GNet-MP-2021.2.8-PES M3GNet-TF-MP-2021.2.8-EFS CHGNet-0.3.0]
    python benchmarks/bench_consensus.py --table-only      # rebuild consensus_demo.md from the JSON

Materialises the ``consensus`` asset of partition ``<system>|<primary>`` on that home's Dagster
instance, through the platform's resources (``CGWGAN_M3GNET_DIR``, ``CGWGAN_M3GNET_TF_PYTHON``, ...
as ``orchestration.resources.resources_from_env`` reads them): the best ``--top-k`` unique novel
shortlist rows of the primary, each relaxed by every other surrogate from the primary's relaxed
cell and placed on that surrogate's own hull (the system's reference phases relaxed again by it).
Reports the asset's rank agreement (Spearman between every pair of surrogates and with the
primary) and how many of the primary's top N stay in the consensus top N, and per surrogate the
energy above its own hull over the rows, plus the per-row spread between surrogates.

Writes ``benchmarks/results/consensus_demo.json`` and ``consensus_demo.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SURROGATES = ["M3GNet-MP-2021.2.8-PES", "M3GNet-TF-MP-2021.2.8-EFS", "CHGNet-0.3.0"]


def _stats(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}


def summarise(table: pl.DataFrame, meta: dict[str, Any], primary: str) -> dict[str, Any]:
    """Per-surrogate energy above its own hull, per-row spread, pairwise differences to the primary."""
    ok = table.filter(pl.col("status") == "ok")
    names = list(dict.fromkeys(table["evaluated_surrogate"].to_list()))
    per: dict[str, Any] = {}
    prim = dict(ok.filter(pl.col("evaluated_surrogate") == primary).select(
        "candidate_id", "e_above_hull_ev_per_atom").iter_rows())
    for name in names:
        rows = ok.filter(pl.col("evaluated_surrogate") == name)
        e = dict(rows.select("candidate_id", "e_above_hull_ev_per_atom").iter_rows())
        diff = [e[c] - prim[c] for c in e if c in prim and e[c] is not None and prim[c] is not None]
        per[name] = {
            "n_ok": rows.height, "n_error": int(table.filter((pl.col("evaluated_surrogate") == name)
                                                             & (pl.col("status") != "ok")).height),
            "n_converged": int(rows["is_converged"].fill_null(False).sum()) if "is_converged" in rows.columns else None,
            "e_above_hull_ev_per_atom": _stats(list(e.values())),
            "n_within_0_1_ev": sum(1 for x in e.values() if x is not None and x <= 0.1),
            "minus_primary_ev_per_atom": _stats(diff),
            "mean_abs_minus_primary_ev_per_atom": (round(sum(abs(x) for x in diff) / len(diff), 4) if diff else None),
        }
    rows = table.unique("candidate_id").sort("consensus_rank")
    spread = rows["e_above_hull_spread_ev_per_atom"].to_list()
    std = rows["e_above_hull_std_ev_per_atom"].to_list() if "e_above_hull_std_ev_per_atom" in rows.columns else []
    wide = (ok.pivot(on="evaluated_surrogate", index="candidate_id", values="e_above_hull_ev_per_atom")
            .join(rows.select("candidate_id", "formula", "primary_rank", "consensus_rank",
                              "e_above_hull_mean_ev_per_atom", "e_above_hull_spread_ev_per_atom"),
                  on="candidate_id", how="left").sort("consensus_rank"))
    return {"per_surrogate": per, "row_spread_ev_per_atom": _stats(spread), "row_std_ev_per_atom": _stats(std),
            "n_rows_spread_over_0_1_ev": sum(1 for x in spread if x is not None and x > 0.1),
            "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                     for r in wide.iter_rows(named=True)]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dagster as dg

    from assets.screening import consensus
    from orchestration.resources import CgwganHome, dagster_home, resources_from_env

    home = Path(args.home).expanduser().resolve()
    res = dict(resources_from_env())
    res["cgwgan_home"] = CgwganHome(home=str(home))
    inst_dir = dagster_home(home)
    instance = dg.DagsterInstance.from_config(str(inst_dir))
    chemsys = "-".join(sorted(args.system.split("-")))
    pk = dg.MultiPartitionKey({"chemical_system": chemsys, "surrogate": args.primary})
    config = {"top_k": args.top_k, "surrogates": args.surrogates, "rank_by": args.rank_by,
              "top_n_overlap": args.top_n_overlap, "use_ray": False}
    t = time.perf_counter()
    c0 = time.process_time()
    try:
        result = dg.materialize([consensus], partition_key=pk, instance=instance, resources=res,
                                run_config={"ops": {"consensus": {"config": config}}})
    finally:
        instance.dispose()
    wall = time.perf_counter() - t
    meta: dict[str, Any] = {k: v.value for k, v in result.asset_materializations_for_node("consensus")[0].metadata.items()}
    from lib import screening as scr
    from lib.store import TableStore

    table = TableStore(home).read("consensus", partition=scr.store_partition(chemsys, args.primary))
    return {"benchmark": "bench_consensus", "home": str(home), "partition": f"{chemsys}|{args.primary}",
            "config": config, "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, shared with other jobs",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall)),
            "wall_s": round(wall, 1), "cpu_s_this_process": round(time.process_time() - c0, 1),
            "n_candidates": meta["n_candidates"], "surrogates": meta["surrogates"].split(", "),
            "spearman": meta["spearman"], "mean_spearman_with_primary": meta["mean_spearman_with_primary"],
            f"top_{args.top_n_overlap}_overlap": meta[f"top_{args.top_n_overlap}_overlap"],
            "top_n": args.top_n_overlap, "references_by_surrogate": meta["references_by_surrogate"],
            "surrogate_failures": meta["surrogate_failures"], "n_error_rows": meta["n_error_rows"],
            "asset_seconds": meta["seconds"], **summarise(table, meta, args.primary)}


def _overlap(rows: list[dict[str, Any]], k: int) -> int:
    """How many of the primary's top ``k`` rows are in the consensus top ``k``."""
    prim = {r["candidate_id"] for r in rows if r["primary_rank"] is not None and r["primary_rank"] <= k}
    cons = {r["candidate_id"] for r in rows if r["consensus_rank"] is not None and r["consensus_rank"] <= k}
    return len(prim & cons)


def write_markdown(r: dict[str, Any], path: Path) -> None:
    n, top = r["n_candidates"], r["top_n"]
    half = max(1, min(top, n) // 2)
    names = r["surrogates"]
    md = [
        "# Consensus of the surrogates on a reduced Ba-Ru-O run",
        "",
        f"`python benchmarks/bench_consensus.py --home {r['home']}` (partition `{r['partition']}`, config "
        f"`{json.dumps(r['config'])}`) on {r['machine']}; started {r['started_at']}, {r['wall_s']} s wall "
        f"(asset {r['asset_seconds']} s).",
        "",
        f"The best {n} unique novel shortlist rows of the primary ({names[0]}), each relaxed by every other "
        "surrogate from the primary's relaxed cell and placed on that surrogate's own hull; references: "
        + "; ".join(f"{k}: {v}" for k, v in r["references_by_surrogate"].items()) + ".",
        "",
        f"- Rank agreement with the primary (Spearman, mean over the others): **{r['mean_spearman_with_primary']}**",
        f"- Of the primary's top {top}, in the consensus top {top} (rank_by {r['config']['rank_by']}): "
        f"**{r[f'top_{top}_overlap']} of {min(top, n)}**",
        f"- Of the primary's top {half}, in the consensus top {half}: **{_overlap(r['rows'], half)} of {half}**"
        + (f" (with K = {n} the top-{top} overlap above counts every row: it says nothing)" if top >= n else ""),
        f"- Per-row spread of the energy above the hull between surrogates (max - min), eV/atom: "
        f"{r['row_spread_ev_per_atom']}; rows with a spread above 0.1 eV/atom: {r['n_rows_spread_over_0_1_ev']} of {n}",
        f"- Failures: {r['surrogate_failures'] or 'none'}; error rows {r['n_error_rows']}",
        "",
        "## Spearman rank correlation between surrogates (energy above each one's own hull)",
        "",
        "```json", json.dumps(r["spearman"], indent=1), "```",
        "",
        "## Per surrogate: energy above its own hull over the rows (eV/atom)",
        "",
        "| surrogate | ok / error | converged | mean | median | min | max | <= 0.1 eV/at | minus primary: mean (min, max) | mean abs minus primary |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, s in r["per_surrogate"].items():
        e, d = s["e_above_hull_ev_per_atom"], s["minus_primary_ev_per_atom"]
        md.append(f"| {name} | {s['n_ok']} / {s['n_error']} | {s['n_converged']} | {e['mean']} | {e['median']} | "
                  f"{e['min']} | {e['max']} | {s['n_within_0_1_ev']} | {d['mean']} ({d['min']}, {d['max']}) | "
                  f"{s['mean_abs_minus_primary_ev_per_atom']} |")
    md += ["", "## Rows (consensus order): energy above each surrogate's hull, eV/atom", "",
           "| consensus rank | primary rank | candidate | formula | " + " | ".join(names) + " | mean | spread |",
           "|---:|---:|---|---|" + "---:|" * (len(names) + 2)]
    for row in r["rows"]:
        md.append(f"| {row['consensus_rank']} | {row['primary_rank']} | {row['candidate_id']} | {row['formula']} | "
                  + " | ".join(str(row.get(nm)) for nm in names)
                  + f" | {row['e_above_hull_mean_ev_per_atom']} | {row['e_above_hull_spread_ev_per_atom']} |")
    md += ["", "Rebuild this file from the JSON: `python benchmarks/bench_consensus.py --table-only`."]
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default="/tmp/cons_home", help="CGWGAN_HOME of a finished `cgwgan main` run")
    ap.add_argument("--system", default="Ba-Ru-O")
    ap.add_argument("--primary", default="M3GNet-MP-2021.2.8-PES", help="the partition's surrogate")
    ap.add_argument("--surrogates", nargs="+", default=DEFAULT_SURROGATES)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--top-n-overlap", type=int, default=20)
    ap.add_argument("--rank-by", default="mean", choices=("mean", "lcb", "primary"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "consensus_demo")
    args = ap.parse_args()
    if args.table_only:
        write_markdown(json.loads(args.out.with_suffix(".json").read_text()), args.out.with_suffix(".md"))
        return
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    r = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str))
    write_markdown(r, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
