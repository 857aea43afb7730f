"""Selection for relaxation, before and after issue 13: composition spread and hull distances.

    python benchmarks/bench_selection.py [--templates 3000] [--sample 3000] [--k 150] [--quota 10]
                                         [--surrogate M3GNet-MP-2021.2.8-PES] [--ref-steps 200]

Ba-Ru-O candidates from random templates (``lib.infill.random_templates`` + ``iter_infill``,
volumes rescaled to the elements, no generator), then:

1. the pre-screen input of a reduced run: the first N by ``candidate_id`` (before) and a seeded
   sample stratified by reduced formula (after, ``lib.selection.stratified_sample``);
2. the static energy of the stratified sample (the surrogate, batched) and the shared Ba-Ru-O MP
   phases relaxed with the same surrogate (the ``references`` asset's hull);
3. the K candidates ``relaxed`` would take: by raw energy per atom (before), by static energy
   above the hull (after, the default), by static formation energy, and by energy above the hull
   with at most ``--quota`` per reduced formula. For each: compositions, the most frequent ones,
   static energy above the hull (min / median / max), how many lie within 0.1 eV/atom of the hull,
   and the overlap with the energy-per-atom set.

Writes ``benchmarks/results/bench_selection.json`` and ``.md``. Needs ``CGWGAN_SHARED`` (the
shared data folder, default ``../shared``) for the MP phases and the matgl weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from lib import screening as scr  # noqa: E402
from lib.infill import iter_infill, random_templates  # noqa: E402
from lib.selection import select_for_relaxation, static_hull_distance, stratified_sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ELEMENTS = ["Ba", "O", "Ru"]


def _spread(frame: pl.DataFrame, *, top: int = 6) -> dict:
    counts = frame.group_by("reduced_formula").len().sort(["len", "reduced_formula"], descending=[True, False])
    sizes = counts["len"].to_list()
    out: dict = {"rows": frame.height, "n_compositions": counts.height,
                 "top_compositions": [f"{f} x{n}" for f, n in counts.head(top).iter_rows()],
                 "largest_share": round(max(sizes) / max(frame.height, 1), 3) if sizes else 0.0}
    if "static_e_above_hull_ev_per_atom" in frame.columns:
        h = np.asarray(frame["static_e_above_hull_ev_per_atom"].drop_nulls().to_list(), dtype=float)
        out |= {f"static_e_above_hull_{k}": round(float(f(h)), 4) if h.size else None
                for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}
        out["n_within_0_1_ev_of_hull"] = int((h <= 0.1).sum())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--templates", type=int, default=3000)
    ap.add_argument("--sample", type=int, default=3000)
    ap.add_argument("--k", type=int, default=150)
    ap.add_argument("--quota", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--surrogate", default="M3GNet-MP-2021.2.8-PES")
    ap.add_argument("--ref-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "bench_selection"))
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("CGWGAN_SHARED") or ROOT.parent / "shared")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    tpl = random_templates(args.templates, seed=args.seed, max_atoms=20)
    cands = pl.concat(list(iter_infill(tpl, elements=ELEMENTS, max_atoms=20, volume_mode="rescaled")))
    cands = cands.unique("candidate_id", keep="first")
    timings["candidates_s"] = time.perf_counter() - t
    first = cands.sort("candidate_id").head(args.sample)
    sample = stratified_sample(cands, args.sample, seed=args.seed)

    sur = scr.load_configured_surrogate(args.surrogate, models_dir=str(shared / "models"), threads=args.threads)
    t = time.perf_counter()
    pre = scr.prescreen_frame(sur, sample, batch_size=64).join(
        sample.select("candidate_id", "formula", "reduced_formula"), on="candidate_id")
    timings["prescreen_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mp = scr.mp_csv_cells(shared / "data" / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv", elements=ELEMENTS)
    phases = scr.reference_phases(ELEMENTS, mp)
    res = scr.relax_frame(sur, phases.rename({"phase_id": "candidate_id"}), steps=args.ref_steps)
    refs = phases.select("phase_id", "formula", "source").join(res.rename({"key": "phase_id"}), on="phase_id")
    timings["references_s"] = time.perf_counter() - t
    static = static_hull_distance(pre, refs, elements=ELEMENTS)

    sets = {
        "energy_per_atom (before)": select_for_relaxation(static, args.k, rank_by="energy_per_atom"),
        "e_above_hull (after, default)": select_for_relaxation(static, args.k),
        "formation_energy": select_for_relaxation(static, args.k, rank_by="formation_energy"),
        f"e_above_hull, quota {args.quota}": select_for_relaxation(static, args.k,
                                                                    per_composition_quota=args.quota),
    }
    raw_ids = set(sets["energy_per_atom (before)"]["candidate_id"])
    selections = {name: _spread(s) | {"overlap_with_energy_per_atom": len(raw_ids & set(s["candidate_id"]))}
                  for name, s in sets.items()}
    result = {
        "surrogate": args.surrogate, "surrogate_sha256": sur.weights_sha256, "templates": args.templates,
        "candidates": cands.height, "candidate_compositions": cands["reduced_formula"].n_unique(),
        "sample": args.sample, "k": args.k, "quota": args.quota, "seed": args.seed,
        "prescreen_input": {"first N by candidate_id (before)": _spread(first),
                            "stratified sample (after)": _spread(sample)},
        "prescreen_ok": int((pre["status"] == "ok").sum()),
        "references": {"phases": refs.height, "ok": int((refs["status"] == "ok").sum()),
                       "converged": int(refs["is_converged"].fill_null(False).sum()), "steps": args.ref_steps},
        "selections": selections,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# bench_selection: which {args.k} Ba-Ru-O candidates get relaxed ({args.surrogate})", "",
             f"{cands.height:,} candidates ({result['candidate_compositions']} compositions) from "
             f"{args.templates:,} random templates; pre-screen sample {args.sample:,} (seed {args.seed}); "
             f"{result['prescreen_ok']:,} pre-screened ok; hull of {result['references']['ok']} MP/ASE "
             f"reference phases relaxed with the same surrogate ({args.ref_steps} steps).", "",
             "## Pre-screen input of a reduced run", "", "| input | compositions | largest share | most frequent |",
             "|---|---|---|---|"]
    for name, s in result["prescreen_input"].items():
        lines.append(f"| {name} | {s['n_compositions']} | {s['largest_share']} | {', '.join(s['top_compositions'])} |")
    lines += ["", f"## The {args.k} selected for relaxation", "",
              "| rank_by | compositions | largest share | static E above hull min / median / max (eV/atom) "
              "| within 0.1 eV/atom | overlap with energy/atom | most frequent |", "|---|---|---|---|---|---|---|"]
    for name, s in selections.items():
        lines.append(f"| {name} | {s['n_compositions']} | {s['largest_share']} | {s['static_e_above_hull_min']} / "
                     f"{s['static_e_above_hull_median']} / {s['static_e_above_hull_max']} | "
                     f"{s['n_within_0_1_ev_of_hull']} | {s['overlap_with_energy_per_atom']} | "
                     f"{', '.join(s['top_compositions'])} |")
    lines += ["", f"Timings (s): {result['timings_s']}. Machine: {result['machine']} (shared).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
