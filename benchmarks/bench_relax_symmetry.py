"""Symmetry-constrained relaxation (ASE ``FixSymmetry``) against the unconstrained one, by size.

    python benchmarks/bench_relax_symmetry.py [--home /tmp/demo_home] [--system Ba-O-Ru]
        [--surrogate M3GNet-MP-2021.2.8-PES] [--per-bin 12] [--pool 120]
        [--configs FIRE,FIRE+sym,BFGS+sym,BFGS~0.02] [--fix-symprec 1e-3] [--seed 0] [--steps 300]
        [--within 100,200,300] [--reorder SEED] [--out PATH]
    python benchmarks/bench_relax_symmetry.py --out PATH --pool-with OTHER.json[,...]   # pool seeds, no relaxing

Candidates: the home's ``candidates_dedup`` partition of ``system`` (real generated candidates,
exactly symmetric in their template's space group). For each atom-count bin (2-4, 5-8, 9-16,
17-32 atoms in the candidate's cell) ``pool`` candidates are drawn (seeded), pre-screened with
the surrogate (static energy) and the ``per-bin`` lowest per atom kept: the ones the ``relaxed``
stage takes first. The same candidates are then relaxed under each setting with
``lib.screening.relax_frame`` (one torch thread, batched lockstep, fmax 0.05 eV/Å, at most 300
steps); ``+sym`` adds ``fix_symmetry`` (the space group spglib finds at ``fix-symprec`` Å kept). A
setting is an optimiser of ``lib.surrogates.relax.OPTIMIZERS`` (FIRE, FIRE2, BFGS, LBFGS), with
``+sym`` or not; ``~SIGMA`` (e.g. ``BFGS~0.02``) starts from the candidate rattled by a seeded
normal displacement of SIGMA Å per Cartesian component (:func:`rattled`), out of the template's
space group.

``--within`` counts, from the same runs, the rows converged within fewer steps than ``--steps``
(an ASE optimiser's path does not depend on its step limit, so a run with a limit of 1,000
steps that converged at step 240 converged within 300): one run gives the whole curve of
converged share against the step limit.

``--reorder SEED`` runs every setting a second time on the same starts in a seeded shuffled row
order: a candidate then shares its lockstep batches with other candidates, and nothing else
changes. A symmetric start has symmetric forces, so an unconstrained relaxation leaves its
template's group only through numerical noise, which depends on the batch: this measures how far
the endings move for that reason alone.

Recorded per setting and bin: converged share, mean steps, compute seconds (the rows' share of
the batched passes plus their own optimiser work, ``relax_seconds``), energy per atom against
the first setting (the unconstrained reference; positive = the setting stopped higher) and
whether the space group at ``fix-symprec`` survived. Writes
``benchmarks/results/relax_symmetry.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks._relax_args import add_candidate_source, open_home_and_surrogate, write_results  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "relax_symmetry"
BINS: tuple[tuple[int, int], ...] = ((2, 4), (5, 8), (9, 16), (17, 32))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = add_candidate_source(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--per-bin", type=int, default=12)
    p.add_argument("--pool", type=int, default=120, help="candidates pre-screened per bin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="FIRE,FIRE+sym,BFGS+sym")
    p.add_argument("--fix-symprec", type=float, default=1e-3)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--within", default="",
                   help="comma-separated step limits <= --steps: converged share within each, from the same runs")
    p.add_argument("--reorder", type=int, default=-1,
                   help="seed >= 0: run every setting again on the rows in a seeded shuffled order (other "
                        "batch-mates) and report how far each candidate's ending moved")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--pool-with", default="",
                   help="comma-separated .json of other runs (other seeds): no relaxation, pool them with --out's")
    return p.parse_args(argv)


def bin_label(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


def pick_candidates(cands: pl.DataFrame, sur, *, per_bin: int, pool: int, seed: int) -> pl.DataFrame:
    """``per_bin`` lowest pre-screen energies per atom of ``pool`` seeded draws in each bin."""
    from lib import screening as scr

    picked = []
    for lo, hi in BINS:
        b = cands.filter(pl.col("n_atoms").is_between(lo, hi)).sort("candidate_id")
        b = b.sample(min(pool, b.height), seed=seed, shuffle=True) if b.height > pool else b
        pre = scr.prescreen_frame(sur, b)
        top = scr.select_top(pre, per_bin).select("candidate_id")
        picked.append(b.join(top, on="candidate_id", how="semi").with_columns(pl.lit(bin_label(lo, hi)).alias("bin")))
    return pl.concat(picked).sort(["n_atoms", "candidate_id"])


def rattled(cands: pl.DataFrame, sigma_a: float) -> pl.DataFrame:
    """``cands`` in cell form, every atom displaced by a normal draw of ``sigma_a`` Å per
    Cartesian component, seeded by the candidate's id (the same start on every run): a start
    out of the template's space group."""
    import hashlib

    from lib.cells import frame_structures, structure_to_cell

    rows = []
    for cid, s in zip(cands["candidate_id"].to_list(), frame_structures(cands), strict=True):
        rng = np.random.default_rng(int(hashlib.sha256(cid.encode()).hexdigest()[:16], 16))
        moved = type(s)(s.lattice, s.species, s.cart_coords + rng.normal(0.0, sigma_a, (len(s), 3)),
                        coords_are_cartesian=True)
        rows.append({"candidate_id": cid, **structure_to_cell(moved)})
    return pl.DataFrame(rows)


def relax_setting(sur, start: pl.DataFrame, args, *, opt: str, sym: bool) -> tuple[pl.DataFrame, float]:
    """(``relax_frame`` of ``start`` under one setting, wall seconds)."""
    from lib.screening import relax_frame

    t0 = time.perf_counter()
    out = relax_frame(sur, start, fmax=args.fmax, steps=args.steps, optimizer=opt, fix_symmetry=sym,
                      fix_symmetry_symprec=args.fix_symprec)
    return out, time.perf_counter() - t0


def reorder_run(sur, start: pl.DataFrame, first: pl.DataFrame, args, *, opt: str, sym: bool) -> dict:
    """The same setting on the same starts in a seeded shuffled row order: every candidate shares
    its lockstep batches (``relax_frame``'s ``batch_size``) with other candidates, nothing else
    changes. Per candidate (in ``first``'s order): the ending energy's change and whether the
    reported space group changed."""
    again, seconds = relax_setting(sur, start.sample(fraction=1.0, shuffle=True, seed=args.reorder), args,
                                   opt=opt, sym=sym)
    j = first.select("key", "energy_per_atom_ev", "spacegroup_number_relaxed").join(
        again.select("key", pl.col("energy_per_atom_ev").alias("e2"),
                     pl.col("spacegroup_number_relaxed").alias("sg2")), on="key", how="left", maintain_order="left")
    return {"seed": args.reorder, "seconds": seconds,
            "delta_ev_per_atom": [None if x is None else float(x)
                                  for x in (j["e2"] - j["energy_per_atom_ev"]).to_list()],
            "spacegroup_changed": [a != b for a, b in zip(j["spacegroup_number_relaxed"], j["sg2"], strict=True)]}


def reorder_lines(settings: dict) -> list[str]:
    """Markdown: how far each setting's endings move when only the batch-mates change."""
    lines = ["| setting | endings moved > 0.01 eV/atom | > 0.001 eV/atom | largest move (eV/atom) "
             "| space group (0.1 Å) changed |", "|---|---:|---:|---:|---:|"]
    for name, r in settings.items():
        if "reorder" not in r:
            continue
        d = np.abs(np.asarray([np.nan if x is None else x for x in r["reorder"]["delta_ev_per_atom"]], dtype=float))
        n = len(d)
        lines.append(f"| {name} | {int((d > 0.01).sum())}/{n} | {int((d > 0.001).sum())}/{n} | {np.nanmax(d):.3f} | "
                     f"{sum(r['reorder']['spacegroup_changed'])}/{n} |")
    return lines


def spglib_numbers(structures, symprec: float) -> list[int | None]:
    from lib.screening import spacegroup_number

    return [spacegroup_number(s, symprec=symprec) if is_structure(s) else None for s in structures]


def is_structure(s) -> bool:
    """False for a failed relaxation's row: no structure, its error reported instead."""
    return hasattr(s, "lattice")


def n_operations(structures, symprec: float) -> list[int]:
    """Symmetry operations spglib finds at ``symprec`` (same cell before and after: fewer = lowered)."""
    import spglib

    out = []
    for s in structures:
        if not is_structure(s):
            out.append(0)
            continue
        sym = spglib.get_symmetry((s.lattice.matrix, s.frac_coords, [sp.Z for sp in s.species]), symprec=symprec)
        out.append(len(sym["rotations"]) if sym else 1)
    return out


def render(res: dict) -> str:
    ref = res["reference"]
    lines = [
        "# Relaxation with and without ASE `FixSymmetry`, by size",
        "",
        f"{res['n']} real candidates of `{res['system']}` (home `{res['home']}`, `candidates_dedup`): in each "
        f"atom-count bin the {res['per_bin']} lowest pre-screen energies per atom of {res['pool']} seeded draws. "
        f"{res['surrogate']}, fmax {res['fmax']} eV/Å, at most {res['steps']} steps, one torch thread, "
        f"`relax_frame` (batched lockstep). `+sym`: `fix_symmetry=True` at symprec {res['fix_symprec']} Å. "
        f"Reference for ΔE: **{ref}**. Load average at start {res['load_average_start']}, at end "
        f"{res['load_average_end']} (2 shared cores).",
        "",
        "| setting | atoms | converged | mean steps | compute s (wall s) | same space group | symmetry lowered | mean ΔE vs ref (eV/atom) "
        "| > 0.01 eV/atom higher | > 0.01 eV/atom lower |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["settings"].items():
        for b in [*res["bins"], "all"]:
            s = r["by_bin"][b]
            lines.append(
                f"| {name} | {b} | {s['n_converged']}/{s['n']} ({100 * s['converged_share']:.1f} %) | "
                f"{s['mean_steps']:.1f} | {s['compute_seconds']:.1f}"
                + (f" ({r['seconds']:.1f})" if b == "all" else "")
                + f" | {s['n_spacegroup_kept']}/{s['n']} | {s['n_symmetry_lowered']}/{s['n']} | "
                f"{s['mean_delta_ev_per_atom']:+.4f} | "
                f"{s['n_higher']} | {s['n_lower']} |")
    lines += ["", "Goal of issue 16 (at least 95 % converged within the step limit in every bin): " + "; ".join(
        f"{name}: {'met' if min(r['by_bin'][b]['converged_share'] for b in res['bins']) >= 0.95 else 'not met'} "
        f"(lowest bin {100 * min(r['by_bin'][b]['converged_share'] for b in res['bins']):.1f} %)"
        for name, r in res["settings"].items()) + "."]
    within = [k for k in res.get("within", []) if k < res["steps"]]
    if within:
        lines += ["", f"Converged within a lower step limit (from the same runs at {res['steps']} steps; "
                  "a path does not depend on its limit):", "",
                  *within_table(res["settings"], res["bins"], [*within, res["steps"]])]
    if any("reorder" in r for r in res["settings"].values()):
        seed = next(r["reorder"]["seed"] for r in res["settings"].values() if "reorder" in r)
        lines += ["", f"Batch sensitivity: each setting run again on the same starts in a shuffled row order "
                  f"(seed {seed}), so that each candidate shares its lockstep batches with other candidates; "
                  "the same candidate's ending before and after:", "", *reorder_lines(res["settings"])]
    lines += ["", "Candidates where a setting ends more than 0.01 eV/atom from the reference "
              "(energy per atom / steps, c = converged; space group at the fix symprec before → after):", "",
              "| candidate | atoms | sg | " + " | ".join(res["settings"]) + " |",
              "|---|---:|---:|" + "---:|" * len(res["settings"])]
    for i, cid in enumerate(res["candidate_ids"]):
        es = [r["energy_per_atom_ev"][i] for r in res["settings"].values()]
        if max(es) - min(es) > 0.01:
            cells = [f"{r['energy_per_atom_ev'][i]:.3f} / {r['steps'][i]}{'c' if r['converged'][i] else ''} "
                     f"(→{r['spacegroup_after'][i]})" for r in res["settings"].values()]
            lines.append(f"| {cid} | {res['n_atoms'][i]} | {res['spacegroup_before'][i]} | " + " | ".join(cells) + " |")
    if res.get("pooled"):
        pooled = res["pooled"]
        lines += ["", f"## All samples pooled ({', '.join(pooled['sources'])}: {pooled['n']} distinct candidates, "
                  f"{pooled['n_shared']} drawn twice counted once)", "",
                  "| setting | " + " | ".join(f"{b} atoms" for b in res["bins"]) + " | all | mean steps "
                  "| > 0.01 eV/atom higher than the reference | mean ΔE (eV/atom) |",
                  "|---|" + "---:|" * (len(res["bins"]) + 4)]
        for name, r in pooled["settings"].items():
            cells = [f"{s['n_converged']}/{s['n']} ({100 * s['converged_share']:.1f} %)"
                     for s in (r["by_bin"][b] for b in [*res["bins"], "all"])]
            a = r["by_bin"]["all"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {a['mean_steps']:.1f} | {a['n_higher']} | "
                         f"{a['mean_delta_ev_per_atom']:+.4f} |")
        if any("reorder" in r for r in pooled["settings"].values()):
            lines += ["", "Pooled, batch sensitivity (the same candidate's ending in a shuffled row order):", "",
                      *reorder_lines(pooled["settings"])]
        if within:
            lines += ["", "Pooled, converged within a lower step limit:", "",
                      *within_table(pooled["settings"], res["bins"], [*within, res["steps"]])]
    return "\n".join(lines) + "\n"


def within_table(settings: dict, bins: list[str], limits: Sequence[int]) -> list[str]:
    """Markdown rows: each setting's converged share by bin within each step limit, and the goal."""
    lines = ["| setting | step limit | " + " | ".join(f"{b} atoms" for b in bins) + " | all | goal |",
             "|---|---:|" + "---:|" * (len(bins) + 2)]
    for name, r in settings.items():
        for k in limits:
            shares = [r["by_bin"][b]["converged_within"][str(k)] / r["by_bin"][b]["n"] for b in bins]
            a = r["by_bin"]["all"]
            lines.append(f"| {name} | {k} | " + " | ".join(f"{100 * x:.1f} %" for x in shares)
                         + f" | {a['converged_within'][str(k)]}/{a['n']} | {'met' if min(shares) >= 0.95 else 'not met'} |")
    return lines


def pool(results: list[dict]) -> dict:
    """The settings every result has, their rows pooled by bin; a candidate two samples share
    counts once (its first sample's row)."""
    names = [n for n in results[0]["settings"] if all(n in r["settings"] for r in results)]
    bins = results[0]["bins"]
    seen: set[str] = set()
    take: list[tuple[int, int]] = []  # (result, row)
    for k, r in enumerate(results):
        for i, cid in enumerate(r["candidate_ids"]):
            if cid not in seen:
                seen.add(cid)
                take.append((k, i))
    out: dict = {"sources": [f"seed {r['seed']}" for r in results], "n": len(take),
                 "n_shared": sum(r["n"] for r in results) - len(take), "settings": {}}
    row_bins = [results[k]["bin"][i] for k, i in take]
    sg_before = [results[k]["spacegroup_before"][i] for k, i in take]
    for name in names:
        merged = {key: [results[k]["settings"][name][key][i] for k, i in take]
                  for key in ("steps", "converged", "delta_ev_per_atom", "relax_seconds", "spacegroup_after",
                              "n_ops_before", "n_ops_after")}
        out["settings"][name] = {"by_bin": summarise(merged, bins, row_bins, sg_before,
                                                     results[0].get("within", ()))}
        if all("reorder" in r["settings"][name] for r in results):
            out["settings"][name]["reorder"] = {
                "seed": results[0]["settings"][name]["reorder"]["seed"],
                **{key: [results[k]["settings"][name]["reorder"][key][i] for k, i in take]
                   for key in ("delta_ev_per_atom", "spacegroup_changed")}}
    return out


def summarise(r: dict, bins: list[str], row_bins: list[str], sg_before: list, within: Sequence[int] = ()) -> dict:
    out = {}
    for b in [*bins, "all"]:
        idx = [i for i, x in enumerate(row_bins) if b in ("all", x)]
        d = np.asarray([r["delta_ev_per_atom"][i] for i in idx], dtype=float)
        conv = [bool(r["converged"][i]) for i in idx]
        out[b] = {
            "n": len(idx), "n_converged": int(sum(conv)), "converged_share": float(np.mean(conv)) if idx else float("nan"),
            "mean_steps": float(np.mean([r["steps"][i] or 0 for i in idx])),
            "compute_seconds": float(np.nansum([r["relax_seconds"][i] for i in idx])),
            "n_spacegroup_kept": int(sum(r["spacegroup_after"][i] == sg_before[i] for i in idx)),
            "n_symmetry_lowered": int(sum(r["n_ops_after"][i] < r["n_ops_before"][i] for i in idx)),
            "mean_delta_ev_per_atom": float(np.nanmean(d)), "n_higher": int((d > 0.01).sum()),
            "n_lower": int((d < -0.01).sum()),
            "converged_within": {str(k): int(sum(bool(r["converged"][i]) and (r["steps"][i] or 0) <= k for i in idx))
                                 for k in within},
        }
    return out


def rerender(path: str | Path, pool_with: Sequence[str | Path] = ()) -> str:
    """The ``.md`` of a written ``.json`` again (after a change of :func:`render`); with
    ``pool_with`` (more results' ``.json``, other seeds) its pooled table added to both files."""
    base = Path(path).with_suffix(".json")
    res = json.loads(base.read_text())
    if pool_with:
        res["pooled"] = pool([res, *(json.loads(Path(p).with_suffix(".json").read_text()) for p in pool_with)])
        base.write_text(json.dumps(res, indent=1))
    Path(path).with_suffix(".md").write_text(text := render(res))
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.pool_with:
        print(rerender(args.out, args.pool_with.split(",")))
        return json.loads(Path(args.out).with_suffix(".json").read_text())
    from lib.cells import frame_structures

    store, sur = open_home_and_surrogate(args)
    t0 = time.perf_counter()
    cands = pick_candidates(store.read("candidates_dedup", partition=args.system), sur,
                            per_bin=args.per_bin, pool=args.pool, seed=args.seed)
    t_pick = time.perf_counter() - t0
    row_bins = cands["bin"].to_list()
    before = frame_structures(cands)
    sg_before = spglib_numbers(before, args.fix_symprec)
    ops_before = n_operations(before, args.fix_symprec)
    bins = [bin_label(lo, hi) for lo, hi in BINS]
    res: dict = {"home": str(args.home), "system": args.system, "surrogate": sur.name,
                 "surrogate_sha256": sur.weights_sha256, "n": cands.height, "per_bin": args.per_bin,
                 "pool": args.pool, "seed": args.seed, "fmax": args.fmax, "steps": args.steps,
                 "fix_symprec": args.fix_symprec, "bins": bins, "pick_seconds": t_pick,
                 "within": sorted({int(k) for k in args.within.split(",") if k} | {args.steps}),
                 "candidate_ids": cands["candidate_id"].to_list(), "n_atoms": cands["n_atoms"].to_list(),
                 "bin": row_bins, "spacegroup_template": cands["spacegroup_number"].to_list(),
                 "spacegroup_before": sg_before, "load_average_start": round(os.getloadavg()[0], 2),
                 "settings": {}}
    configs = args.configs.split(",")
    res["reference"] = configs[0]
    ref_e = None
    for name in configs:
        base, _, sigma = name.partition("~")
        opt, _, suffix = base.partition("+")
        sym = suffix == "sym"
        start = rattled(cands, float(sigma)) if sigma else cands
        out, dt = relax_setting(sur, start, args, opt=opt, sym=sym)
        if (out["status"] != "ok").any():
            print(f"{name}: errors: {out.filter(pl.col('status') != 'ok')['error'].to_list()}", flush=True)
        e = out["energy_per_atom_ev"].to_numpy()
        after = frame_structures(out.rename({"key": "candidate_id"}))
        ref_e = e if ref_e is None else ref_e
        r: dict = {"seconds": dt, "steps": out["n_steps"].to_list(), "converged": out["is_converged"].to_list(),
                   "energy_per_atom_ev": [float(x) for x in e], "delta_ev_per_atom": [float(x) for x in e - ref_e],
                   "relax_seconds": out["relax_seconds"].to_list(),
                   "spacegroup_after": spglib_numbers(after, args.fix_symprec),
                   "n_ops_before": ops_before, "n_ops_after": n_operations(after, args.fix_symprec),
                   "forward_passes": int(sur.last_relax_stats["forward_passes"])}
        if args.reorder >= 0:
            r["reorder"] = reorder_run(sur, start, out, args, opt=opt, sym=sym)
        r["by_bin"] = summarise(r, bins, row_bins, sg_before, res["within"])
        res["settings"][name] = r
        print(f"{name}: {dt:.1f} s, " + ", ".join(
            f"{b}: {s['n_converged']}/{s['n']}" for b, s in r["by_bin"].items()), flush=True)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    write_results(args.out, res, render(res))
    return res


if __name__ == "__main__":
    main()
