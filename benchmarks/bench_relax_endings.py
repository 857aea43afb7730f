"""Where two optimisers end: hull verdict, phonon verdict and phase of each ending, per candidate.

    python benchmarks/bench_relax_endings.py [--home /tmp/demo_home] [--system Ba-O-Ru]
        [--surrogate M3GNet-MP-2021.2.8-PES] [--seeds 0,1] [--per-bin 12] [--pool 120]
        [--optimizers FIRE,BFGS] [--steps 1000] [--delta 0.01] [--window 0.1] [--out PATH]

``bench_relax_symmetry.py`` showed that FIRE and BFGS (same candidates, same cell filter, fmax
0.05 eV/Å, 1,000 steps) end more than 0.01 eV/atom apart on 37 of 88 real Ba-Ru-O candidates.
Energy alone cannot say which ending a screen should trust; this benchmark asks what the
screen itself would decide from each:

* the same candidates (``bench_relax_symmetry.pick_candidates``: per seed and atom-count bin the
  ``per-bin`` lowest pre-screen energies per atom of ``pool`` seeded draws, pooled over seeds);
* both optimisers relax them without a symmetry constraint (``lib.screening.relax_frame``,
  ``fix_symmetry=False``, one torch thread);
* each ending gets its energy above the hull of the home's ``reference_energies`` (same
  surrogate, ``lib.screening.relaxed_hull_columns``) and the hull-window verdict
  (``e_above_hull <= window``);
* the two endings are compared with pymatgen's ``StructureMatcher`` (the novelty tolerances):
  one phase or two;
* every candidate whose endings differ by more than ``delta`` eV/atom gets a phonon screen of
  both endings (``lib.phonons.phonon_frame``, 2x2x2 supercell, 8x8x8 mesh, stable when the
  lowest frequency is above -0.5 THz).

Reported: per pair, which ending is lower, whether each is inside the hull window and
dynamically stable; and the counts a screen acts on (candidates a setting would shortlist: in
the window and stable). Writes ``benchmarks/results/relax_endings.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._relax_args import add_candidate_source, open_home_and_surrogate, write_results  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))

import polars as pl  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "relax_endings"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = add_candidate_source(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--per-bin", type=int, default=12)
    p.add_argument("--pool", type=int, default=120)
    p.add_argument("--optimizers", default="FIRE,BFGS", help="two optimisers: reference,other")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.01, help="eV/atom: endings further apart get phonons")
    p.add_argument("--window", type=float, default=0.1, help="eV/atom above the hull a screen keeps")
    p.add_argument("--top", type=int, default=10, help="size of the ranked list compared (lowest e_above_hull)")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def same_phase(a: list, b: list) -> list[bool | None]:
    """StructureMatcher (novelty tolerances) on each pair of endings; None where one failed."""
    from bench_relax_symmetry import is_structure
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from lib.cells import MATCHER_TOLERANCES

    sm = StructureMatcher(primitive_cell=True, scale=True, **MATCHER_TOLERANCES)
    return [bool(sm.fit(x, y)) if is_structure(x) and is_structure(y) else None for x, y in zip(a, b, strict=True)]


def ending_table(relaxed: pl.DataFrame, refs: pl.DataFrame, *, elements: list[str], window: float) -> pl.DataFrame:
    from lib.screening import relaxed_hull_columns

    out = relaxed_hull_columns(relaxed, refs, elements=elements)
    return out.with_columns((pl.col("e_above_hull_ev_per_atom") <= window).alias("in_window"))


def ranking_agreement(ea: pl.DataFrame, eb: pl.DataFrame, *, top: int) -> dict:
    """Spearman rho of the two settings' e_above_hull (rows both relaxed) and the overlap of their
    ``top`` lowest: the ranked list a screen would pass on."""
    from scipy.stats import spearmanr

    j = ea.select("candidate_id", pl.col("e_above_hull_ev_per_atom").alias("a")).join(
        eb.select("candidate_id", pl.col("e_above_hull_ev_per_atom").alias("b")), on="candidate_id").drop_nulls()
    top_a = set(j.sort("a").head(top)["candidate_id"].to_list())
    top_b = set(j.sort("b").head(top)["candidate_id"].to_list())
    return {"n_ranked": j.height, "spearman_e_hull": float(spearmanr(j["a"], j["b"]).statistic),
            "top": top, "top_overlap": len(top_a & top_b)}


def pair_frame(cands: pl.DataFrame, ea: pl.DataFrame, eb: pl.DataFrame, phase: list[bool | None]) -> pl.DataFrame:
    """One row per candidate (``cands``' order): both endings side by side (``_a``, ``_b``), the
    energy difference b − a and whether StructureMatcher calls them one phase."""
    cols = ("spacegroup_number_relaxed", "e_above_hull_ev_per_atom", "in_window", "is_converged",
            "energy_per_atom_ev")
    short = {"spacegroup_number_relaxed": "sg", "e_above_hull_ev_per_atom": "e_hull", "is_converged": "converged",
             "in_window": "in_window", "energy_per_atom_ev": "e"}
    side = [e.select("candidate_id", *(pl.col(c).alias(f"{short[c]}_{s}") for c in cols)) for e, s in ((ea, "a"), (eb, "b"))]
    return (cands.select("candidate_id", "n_atoms", pl.col("spacegroup_number").alias("spacegroup_template"))
            .join(side[0], on="candidate_id", how="left", maintain_order="left")
            .join(side[1], on="candidate_id", how="left", maintain_order="left")
            .with_columns((pl.col("e_b") - pl.col("e_a")).alias("delta"),
                          pl.Series("same_phase", phase, dtype=pl.Boolean))
            .drop("e_a", "e_b"))


def counts(pairs: pl.DataFrame, differ: pl.DataFrame, a: str, b: str) -> dict:
    """What a screen would decide from each setting's endings: over all candidates (``pairs``)
    and over the differing ones with their phonon verdicts (``differ``)."""
    def n(frame: pl.DataFrame, expr: pl.Expr) -> int:
        return int(frame.select(expr.fill_null(False).sum()).item())

    def both(expr_of) -> dict:
        return {a: n(differ, expr_of("a")), b: n(differ, expr_of("b"))}

    def listed(s: str) -> pl.Expr:
        return pl.col(f"in_window_{s}").fill_null(False) & pl.col(f"stable_{s}").fill_null(False)

    lower_is_b = pl.col("delta") < 0
    return {
        "converged": {a: n(pairs, pl.col("converged_a")), b: n(pairs, pl.col("converged_b"))},
        "in_window": {a: n(pairs, pl.col("in_window_a")), b: n(pairs, pl.col("in_window_b"))},
        "lower": {a: n(differ, pl.col("delta") > 0), b: n(differ, lower_is_b)},
        "n_differ": differ.height,
        "differ_in_window": both(lambda s: pl.col(f"in_window_{s}")),
        "differ_stable": both(lambda s: pl.col(f"stable_{s}")),
        "differ_shortlisted": both(listed),
        "same_phase": n(pairs, pl.col("same_phase")), "differ_same_phase": n(differ, pl.col("same_phase")),
        "lower_stable": n(differ, pl.when(lower_is_b).then(pl.col("stable_b")).otherwise(pl.col("stable_a"))),
        "higher_stable": n(differ, pl.when(lower_is_b).then(pl.col("stable_a")).otherwise(pl.col("stable_b"))),
        "window_verdict_differs": n(differ, pl.col("in_window_a").fill_null(False)
                                    != pl.col("in_window_b").fill_null(False)),
        "shortlist_verdict_differs": n(differ, listed("a") != listed("b")),
    }


def render(res: dict) -> str:
    a, b = res["optimizers"]
    c = res["counts"]
    lines = [
        f"# Where {a} and {b} end: hull and phonon verdicts of each ending",
        "",
        f"{res['n']} real {res['system']} candidates (seeds {res['seeds']}, {res['per_bin']} per atom-count bin of "
        f"{res['pool']} seeded draws, lowest pre-screen energies), {res['surrogate']}, fmax {res['fmax']} eV/Å, "
        f"{res['steps']} steps, one torch thread; hull of the home's `reference_energies` (same surrogate), "
        f"window {res['window']} eV/atom; phonons (2x2x2, 8x8x8 mesh, stable above -0.5 THz) on both endings of "
        f"the {c['n_differ']} candidates whose endings differ by more than {res['delta']} eV/atom. "
        f"Relaxation {res['relax_seconds'][a]:.0f} s ({a}) and {res['relax_seconds'][b]:.0f} s ({b}), "
        f"phonons {res['phonon_seconds']:.0f} s; load {res['load_average_start']} → {res['load_average_end']}.",
        "",
        "## What a screen would decide",
        "",
        f"| | {a} | {b} |",
        "|---|---:|---:|",
        f"| converged within {res['steps']} steps | {c['converged'][a]}/{res['n']} | {c['converged'][b]}/{res['n']} |",
        f"| in the hull window (all {res['n']}) | {c['in_window'][a]} | {c['in_window'][b]} |",
        f"| ending lower by > {res['delta']} eV/atom | {c['lower'][a]} | {c['lower'][b]} |",
        f"| … of the {c['n_differ']} differing: in the window | {c['differ_in_window'][a]} | {c['differ_in_window'][b]} |",
        f"| … of the {c['n_differ']} differing: dynamically stable | {c['differ_stable'][a]} | {c['differ_stable'][b]} |",
        f"| … of the {c['n_differ']} differing: in the window and stable (shortlisted) | {c['differ_shortlisted'][a]} | "
        f"{c['differ_shortlisted'][b]} |",
        "",
        f"- Endings within {res['delta']} eV/atom: {res['n'] - c['n_differ']} of {res['n']}; the same phase by "
        f"StructureMatcher: {c['same_phase']} of {res['n']} (of the differing: {c['differ_same_phase']}).",
        f"- Of the {c['n_differ']} differing pairs, the lower ending is dynamically stable in {c['lower_stable']} and the "
        f"higher in {c['higher_stable']}; the hull-window verdict differs in {c['window_verdict_differs']}, the "
        f"shortlist verdict (window and stable) in {c['shortlist_verdict_differs']}.",
        f"- Ranking by energy above the hull ({c['n_ranked']} relaxed by both): Spearman ρ "
        f"{c['spearman_e_hull']:.3f}; the {c['top']} lowest share {c['top_overlap']} candidates.",
        "",
        "## The differing candidates",
        "",
        f"| candidate | atoms | template SG | {a} SG | {b} SG | {b} − {a} (eV/atom) | {a} e_hull | {b} e_hull | "
        f"{a} min THz | {b} min THz | same phase |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["differing"]:
        def f(x, fmt="{:+.3f}"):
            return "–" if x is None else fmt.format(x)
        lines.append(
            f"| {r['candidate_id']} | {r['n_atoms']} | {r['spacegroup_template']} | {f(r['sg_a'], '{}')} | "
            f"{f(r['sg_b'], '{}')} | {f(r['delta'])} | {f(r['e_hull_a'], '{:.3f}')} | {f(r['e_hull_b'], '{:.3f}')} | "
            f"{f(r['min_thz_a'], '{:.2f}')} | {f(r['min_thz_b'], '{:.2f}')} | {f(r['same_phase'], '{}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from bench_relax_symmetry import pick_candidates

    from lib import screening as scr
    from lib.cells import frame_structures
    from lib.phonons import phonon_frame

    a, b = args.optimizers.split(",")
    store, sur = open_home_and_surrogate(args)
    elements = args.system.split("-")
    refs = store.read("reference_energies", partition=scr.store_partition(args.system, sur.name))
    cands_all = store.read("candidates_dedup", partition=args.system)
    seeds = [int(s) for s in args.seeds.split(",")]
    cands = pl.concat([pick_candidates(cands_all, sur, per_bin=args.per_bin, pool=args.pool, seed=s)
                       for s in seeds]).unique("candidate_id", keep="first").sort(["n_atoms", "candidate_id"])
    res: dict = {"home": str(args.home), "system": args.system, "surrogate": sur.name,
                 "surrogate_sha256": sur.weights_sha256, "seeds": seeds, "per_bin": args.per_bin,
                 "pool": args.pool, "n": cands.height, "optimizers": [a, b], "steps": args.steps,
                 "fmax": args.fmax, "delta": args.delta, "window": args.window,
                 "load_average_start": round(os.getloadavg()[0], 2), "relax_seconds": {}}
    endings: dict[str, pl.DataFrame] = {}
    for opt in (a, b):
        t0 = time.perf_counter()
        out = scr.relax_frame(sur, cands, fmax=args.fmax, steps=args.steps, optimizer=opt, fix_symmetry=False)
        res["relax_seconds"][opt] = time.perf_counter() - t0
        endings[opt] = ending_table(out.rename({"key": "candidate_id"}), refs, elements=elements, window=args.window)
        print(f"{opt}: {res['relax_seconds'][opt]:.0f} s, {int(out['is_converged'].sum())}/{out.height} converged",
              flush=True)
    ea, eb = endings[a], endings[b]
    pairs = pair_frame(cands, ea, eb, same_phase(frame_structures(ea), frame_structures(eb)))
    differ = pairs.filter(pl.col("delta").abs() > args.delta)
    t0 = time.perf_counter()
    ph = {side: phonon_frame(sur, endings[opt].join(differ.select("candidate_id"), on="candidate_id", how="semi"))
          for side, opt in (("a", a), ("b", b))}
    res["phonon_seconds"] = time.perf_counter() - t0
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    for side, frame in ph.items():
        differ = differ.join(frame.select(pl.col("key").alias("candidate_id"), pl.col("min_frequency_thz").alias(f"min_thz_{side}"),
                                          pl.col("is_dynamically_stable").alias(f"stable_{side}"),
                                          pl.col("status").alias(f"phonon_status_{side}")),
                             on="candidate_id", how="left")
    differ = differ.sort("delta")
    res["differing"] = differ.to_dicts()
    res["counts"] = counts(pairs, differ, a, b) | ranking_agreement(ea, eb, top=args.top)
    write_results(args.out, res, render(res))
    return res


if __name__ == "__main__":
    main()
