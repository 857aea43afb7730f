"""Relaxation settings compared on real candidates: ASE FIRE vs BFGS, conventional vs primitive cell.

    python benchmarks/bench_relax_optimizer.py [--home $CGWGAN_HOME] [--system Ba-O-Ru]
        [--surrogate M3GNet-MP-2021.2.8-PES] [-n 48] [--configs FIRE-conv,FIRE-prim,BFGS-conv,BFGS-prim]

The ``n`` candidates with the lowest pre-screen energy per atom (the ``prescreen`` table of the
home's ``<system>+<surrogate>`` partition, so the ones the ``relaxed`` stage takes first) are
relaxed with ``lib.screening.relax_frame`` under each setting, one after the other in this
process (one torch thread, batched lockstep relaxation, fmax 0.05 eV/Å, at most 300 steps).
Recorded per setting: wall time, atoms relaxed, steps, convergence, forward passes; per
candidate: final energy per atom and its difference to the first setting (the reference,
default FIRE on the candidate's own cell, the platform's default). A positive difference is a
relaxation that stopped higher than the reference did.

Why: BFGS and the primitive cell are both faster, and the question is whether they find the same
minima. Writes ``benchmarks/results/relax_optimizer.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._relax_args import add_candidate_source, open_home_and_surrogate, write_results  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "relax_optimizer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = add_candidate_source(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("-n", type=int, default=48)
    p.add_argument("--configs", default="FIRE-conv,FIRE-prim,BFGS-conv,BFGS-prim")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def render(res: dict) -> str:
    ref = res["reference"]
    lines = [
        "# Relaxation settings: FIRE vs BFGS, conventional vs primitive cell",
        "",
        f"{res['n']} lowest pre-screen candidates of `{res['partition']}` ({res['surrogate']}), "
        f"fmax {res['fmax']} eV/Å, at most {res['steps']} steps, one torch thread, "
        f"`relax_frame` (batched lockstep). Reference: **{ref}**. Load average at start "
        f"{res['load_average_start']}, at end {res['load_average_end']}.",
        "",
        "| setting | wall s | atoms | converged | mean steps | forward passes | mean ΔE vs ref (eV/atom) "
        "| stopped > 0.01 eV/atom higher | ended > 0.01 eV/atom lower |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["settings"].items():
        d = np.asarray(r["delta_ev_per_atom"], dtype=float)
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['atoms']} | {r['n_converged']}/{res['n']} | "
                     f"{np.mean(r['steps']):.1f} | {r['forward_passes']} | {np.nanmean(d):+.3f} | "
                     f"{int((d > 0.01).sum())} | {int((d < -0.01).sum())} |")
    lines += ["", "Candidates where the settings disagree by more than 0.01 eV/atom "
              "(energy per atom / steps, c = converged):", "",
              "| candidate | " + " | ".join(res["settings"]) + " |",
              "|---|" + "---:|" * len(res["settings"])]
    for i, cid in enumerate(res["candidate_ids"]):
        es = [r["energy_per_atom_ev"][i] for r in res["settings"].values()]
        if max(es) - min(es) > 0.01:
            cells = [f"{r['energy_per_atom_ev'][i]:.3f} / {r['steps'][i]}{'c' if r['converged'][i] else ''}"
                     for r in res["settings"].values()]
            lines.append(f"| {cid} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from lib import screening as scr

    store, sur = open_home_and_surrogate(args)
    part = scr.store_partition(args.system, args.surrogate)
    pre = store.read("prescreen", partition=part)
    top = scr.select_top(pre, args.n).select("candidate_id")
    cands = store.scan("candidates_dedup", partition=args.system).join(
        top.lazy(), on="candidate_id", how="semi").collect().sort("candidate_id")
    res: dict = {"home": str(args.home), "partition": part, "surrogate": sur.name,
                 "surrogate_sha256": sur.weights_sha256, "n": cands.height, "fmax": args.fmax,
                 "steps": args.steps, "candidate_ids": cands["candidate_id"].to_list(),
                 "load_average_start": round(os.getloadavg()[0], 2), "settings": {}}
    configs = args.configs.split(",")
    res["reference"] = configs[0]
    ref_e = None
    for name in configs:
        opt, cell = name.split("-")
        t0 = time.perf_counter()
        out = scr.relax_frame(sur, cands, fmax=args.fmax, steps=args.steps, optimizer=opt,
                              primitive=(cell == "prim"), fix_symmetry=False)  # as measured: unconstrained
        dt = time.perf_counter() - t0
        stats = sur.last_relax_stats
        e = out["energy_per_atom_ev"].to_numpy()
        ref_e = e if ref_e is None else ref_e
        res["settings"][name] = {
            "seconds": dt, "atoms": int(out["n_atoms"].sum()), "steps": out["n_steps"].to_list(),
            "converged": out["is_converged"].to_list(), "n_converged": int(out["is_converged"].sum()),
            "energy_per_atom_ev": [float(x) for x in e], "delta_ev_per_atom": [float(x) for x in e - ref_e],
            "forward_passes": int(stats["forward_passes"]), "structure_evaluations": int(stats["structure_evaluations"]),
        }
        print(f"{name}: {dt:.1f} s, converged {res['settings'][name]['n_converged']}/{cands.height}, "
              f"mean steps {np.mean(res['settings'][name]['steps']):.1f}", flush=True)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    write_results(args.out, res, render(res))
    return res


if __name__ == "__main__":
    main()
