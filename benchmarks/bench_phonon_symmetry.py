"""Phonon screens of symmetry-kept and unconstrained relaxations of the same candidates.

    python benchmarks/bench_phonon_symmetry.py [--home /tmp/demo_home] [--system Ba-O-Ru]
        [--surrogate M3GNet-MP-2021.2.8-PES] [--seed 0] [--per-bin 12] [--pool 120] [--steps 1000]
        [--out PATH]

Phonon screens are most of a campaign's cost (``campaign.md``: 18.8 of 21.9 laptop hours), and
phonopy needs one displaced supercell per symmetry-distinct displacement, so the symmetry a
relaxation ends in sets the cost. The candidates of ``bench_relax_symmetry.pick_candidates``
(per atom-count bin the ``per-bin`` lowest pre-screen energies of ``pool`` seeded draws) are
relaxed twice, ``fix_symmetry=False`` (the earlier default) and ``True`` (the default now), both
FIRE at fmax 0.05 eV/Å and ``steps``; every ending is phonon-screened with ``lib.phonons.phonon_frame``
(2×2×2 supercell, 8×8×8 mesh, stable above -0.5 THz; the ``phonons`` asset's defaults). Recorded
per setting: displacements and supercell atoms per screen, their product (the force work), wall
seconds, screens per hour, and the stable share. Writes ``benchmarks/results/phonon_symmetry.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks._relax_args import add_candidate_source, open_home_and_surrogate, write_results  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "phonon_symmetry"
SETTINGS = {"unconstrained": False, "symmetry kept (default)": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = add_candidate_source(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-bin", type=int, default=12)
    p.add_argument("--pool", type=int, default=120)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def render(res: dict) -> str:
    lines = [
        "# Phonon screens of symmetry-kept and unconstrained relaxations",
        "",
        f"{res['n']} real {res['system']} candidates (seed {res['seed']}, {res['per_bin']} per atom-count bin of "
        f"{res['pool']} seeded draws, lowest pre-screen energies), {res['surrogate']}, FIRE, fmax 0.05 eV/Å, "
        f"{res['steps']} steps; `phonon_frame` with the `phonons` asset's defaults (2×2×2, 8×8×8 mesh, stable above "
        f"-0.5 THz), one torch thread; load {res['load_average_start']} → {res['load_average_end']}.",
        "",
        "| relaxation | screens ok | mean displacements | mean supercell atoms | mean displacements × atoms | "
        "phonon wall s | screens/h | stable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["settings"].items():
        lines.append(f"| {name} | {r['n_ok']}/{r['n']} | {r['mean_displacements']:.1f} | {r['mean_supercell_atoms']:.1f} | "
                     f"{r['mean_force_work']:,.0f} | {r['phonon_seconds']:.0f} | {r['screens_per_hour']:.0f} | "
                     f"{r['n_stable']}/{r['n_ok']} |")
    a, b = (res["settings"][k] for k in SETTINGS)
    lines += ["", f"Phonon wall time, symmetry kept against unconstrained: {b['phonon_seconds'] / a['phonon_seconds']:.2f}×; "
              f"force work (displacements × supercell atoms): {b['mean_force_work'] / a['mean_force_work']:.2f}×."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import polars as pl
    from bench_relax_symmetry import pick_candidates

    from lib import screening as scr
    from lib.phonons import phonon_frame

    store, sur = open_home_and_surrogate(args)
    cands = pick_candidates(store.read("candidates_dedup", partition=args.system), sur,
                            per_bin=args.per_bin, pool=args.pool, seed=args.seed)
    res: dict = {"home": str(args.home), "system": args.system, "surrogate": sur.name, "seed": args.seed,
                 "per_bin": args.per_bin, "pool": args.pool, "steps": args.steps, "n": cands.height,
                 "candidate_ids": cands["candidate_id"].to_list(),
                 "load_average_start": round(os.getloadavg()[0], 2), "settings": {}}
    for name, fix in SETTINGS.items():
        rel = scr.relax_frame(sur, cands, steps=args.steps, fix_symmetry=fix).rename({"key": "candidate_id"})
        t0 = time.perf_counter()
        ph = phonon_frame(sur, rel.filter(pl.col("status") == "ok"))
        dt = time.perf_counter() - t0
        ok = ph.filter(pl.col("status") == "ok")
        work = (ok["n_displacements"] * ok["n_supercell_atoms"]).cast(pl.Float64)
        res["settings"][name] = {
            "fix_symmetry": fix, "n": ph.height, "n_ok": ok.height, "phonon_seconds": dt,
            "screens_per_hour": 3600.0 * ok.height / dt if dt else None,
            "mean_displacements": float(ok["n_displacements"].mean()),
            "mean_supercell_atoms": float(ok["n_supercell_atoms"].mean()),
            "mean_force_work": float(work.mean()), "n_stable": int(ok["is_dynamically_stable"].sum()),
            "n_displacements": ph["n_displacements"].to_list(), "min_frequency_thz": ph["min_frequency_thz"].to_list(),
        }
        print(f"{name}: {ok.height} screens in {dt:.0f} s, {res['settings'][name]['mean_displacements']:.1f} "
              f"displacements on average", flush=True)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    write_results(args.out, res, render(res))
    return res


if __name__ == "__main__":
    main()
