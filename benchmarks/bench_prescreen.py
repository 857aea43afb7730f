"""The pre-screen's overhead over the model's own batched pass, side by side, on real candidates.

    python benchmarks/bench_prescreen.py --home /path/to/home [--n 600] [--surrogate M3GNet-MP-2021.2.8-PES]
        [--batch-sizes 16,32,64] [--batch-atoms 128,256,512] [--threads 1,2] [--rounds 3]

Input: a seeded sample of ``--n`` rows of the home's ``candidates_dedup`` (ASU form, as the
``prescreen`` asset reads them). For each torch thread count and batch size, ``--rounds``
alternating rounds of:

* ``prescreen``: ``lib.screening.prescreen_frame`` on the frame (rebuild every structure from its
  ASU, check its elements, predict, build the result frame): what the asset's Ray task runs;
* ``model``: ``Surrogate.predict_safe(energy_only=True)`` on the structures rebuilt once beforehand:
  the model's own batched pass (graph construction included; it is part of the model's API).

Each batch size is a fixed count of structures per forward pass; each ``--batch-atoms`` budget
is batches of at most that many atoms (and 32 structures): ``lib.surrogates.base.batch_bounds``.

``--compile`` adds ``prescreen_frame`` with the energy pass compiled (``torch.compile``,
``compile_energy=True``) against the eager model, alternating rounds at the first thread count and
256 atoms per pass: the first call's seconds (compiling), the rate after it, the largest energy
difference.

Overhead = prescreen time / model time - 1, from the medians of the rounds (alternating rounds
share whatever load the machine has). Also: the rebuild alone, and the rate by atom-count bin
(``model``, best batch size, one thread). Writes ``benchmarks/results/bench_prescreen.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BINS = ((1, 8), (9, 16), (17, 32), (33, 64), (65, 10_000))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _batch(bs: int, ba: int) -> str:
    return f"<= {ba} atoms (<= {bs})" if ba else str(bs)


def _compiled(args, frame, threads: int) -> dict:
    """Eager against compiled energy pass on the same frame (fresh surrogates, alternating rounds)."""
    import numpy as np
    import torch

    from lib import screening as scr

    torch.set_num_threads(threads)
    ba = scr.CPU_BATCH_ATOMS
    models = {k: scr.load_configured_surrogate(args.surrogate, models_dir=args.models_dir or None,
                                               compile_energy=(k == "compiled")) for k in ("eager", "compiled")}
    first, frames, times = {}, {}, {k: [] for k in models}
    for k, sur in models.items():
        t0 = time.perf_counter()
        frames[k] = scr.prescreen_frame(sur, frame, batch_size=32, batch_atoms=ba)
        first[k] = time.perf_counter() - t0
    for _ in range(args.rounds):
        for k, sur in models.items():
            times[k].append(_timed(lambda sur=sur: scr.prescreen_frame(sur, frame, batch_size=32, batch_atoms=ba)))
    n = frame.height
    e, c = (frames[k]["energy_per_atom_ev"].to_numpy() for k in ("eager", "compiled"))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"threads": threads, "batch_atoms": ba, "eager_first_s": round(first["eager"], 2),
            "compiled_first_s": round(first["compiled"], 2), "eager_per_s": round(n / med["eager"], 1),
            "compiled_per_s": round(n / med["compiled"], 1), "speedup": round(med["eager"] / med["compiled"], 3),
            "max_abs_de_ev_per_atom": float(np.nanmax(np.abs(e - c))),
            "rounds_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def main() -> None:
    import torch

    from lib import screening as scr
    from lib.store import TableStore
    from lib.surrogate_inputs import prepared_structures

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, help="a cgwgan home with candidates_dedup")
    ap.add_argument("--system", default="Ba-O-Ru")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--surrogate", default="M3GNet-MP-2021.2.8-PES")
    ap.add_argument("--models-dir", default=os.environ.get("CGWGAN_M3GNET_DIR", ""))
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--batch-atoms", default="128,256,512", help="atom budgets per forward pass ('' = none)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure the compiled energy pass")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_prescreen")
    args = ap.parse_args()
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    budgets = [int(x) for x in args.batch_atoms.split(",") if x.strip()]
    # (structures per pass, atoms per pass; 0 = no atom budget)
    configs = [(bs, 0) for bs in batch_sizes] + [(32, ba) for ba in budgets]
    threads = [int(x) for x in args.threads.split(",")]

    store = TableStore(args.home)
    frame = store.read("candidates_dedup", partition=args.system)
    frame = frame.sample(n=min(args.n, frame.height), seed=args.seed).sort("candidate_id")
    sur = scr.load_configured_surrogate(args.surrogate, models_dir=args.models_dir or None)
    prepared_structures(sur, frame.head(20), "candidate_id")  # warm-up: lazy imports and caches
    t_build = [_timed(lambda: prepared_structures(sur, frame, "candidate_id")) for _ in range(args.rounds)]
    _, structures = prepared_structures(sur, frame, "candidate_id")
    built = [s for s in structures if not isinstance(s, str)]
    n_atoms = [len(s) for s in built]
    load0 = os.getloadavg()
    runs = []
    for th in threads:
        torch.set_num_threads(th)
        for bs, ba in configs:
            sur.predict_safe(built[:bs], batch_size=bs, energy_only=True, batch_atoms=ba)  # warm-up
            pre, mod = [], []
            for _ in range(args.rounds):
                pre.append(_timed(lambda bs=bs, ba=ba: scr.prescreen_frame(sur, frame, batch_size=bs, batch_atoms=ba)))
                mod.append(_timed(lambda bs=bs, ba=ba: sur.predict_safe(built, batch_size=bs, energy_only=True,
                                                                        batch_atoms=ba)))
            p, m = statistics.median(pre), statistics.median(mod)
            runs.append({"threads": th, "batch_size": bs, "batch_atoms": ba, "prescreen_s": round(p, 3), "model_s": round(m, 3),
                         "prescreen_per_s": round(len(built) / p, 1), "model_per_s": round(len(built) / m, 1),
                         "overhead": round(p / m - 1.0, 4), "rounds_prescreen_s": [round(x, 3) for x in pre],
                         "rounds_model_s": [round(x, 3) for x in mod]})
            print(json.dumps(runs[-1]), flush=True)
    pooled = {th: round(sum(sum(r["rounds_prescreen_s"]) for r in runs if r["threads"] == th)
                        / sum(sum(r["rounds_model_s"]) for r in runs if r["threads"] == th) - 1.0, 4)
              for th in threads}  # every round of every batch size: steadier than one median
    one = [r for r in runs if r["threads"] == threads[0]]
    best = min(one, key=lambda r: r["model_s"])
    best_bs, best_ba = best["batch_size"], best["batch_atoms"]
    torch.set_num_threads(threads[0])
    by_bin = []
    for lo, hi in BINS:
        sel = [s for s in built if lo <= len(s) <= hi]
        if not sel:
            continue
        t = statistics.median(_timed(lambda sel=sel: sur.predict_safe(sel, batch_size=best_bs, energy_only=True,
                                                                      batch_atoms=best_ba))
                              for _ in range(args.rounds))
        by_bin.append({"atoms": f"{lo}-{hi}" if hi < 10_000 else f">= {lo}", "n": len(sel),
                       "structures_per_s": round(len(sel) / t, 1), "atoms_per_s": round(sum(map(len, sel)) / t, 1)})
    compiled = _compiled(args, frame, threads[0]) if args.compile else None
    out = {"benchmark": "bench_prescreen", "surrogate": sur.name, "n_structures": len(built),
           "mean_atoms": round(statistics.mean(n_atoms), 2), "median_atoms": statistics.median(n_atoms),
           "rebuild_s_median": round(statistics.median(t_build), 3),
           "rebuild_ms_per_structure": round(1000 * statistics.median(t_build) / len(built), 3),
           "runs": runs, "overhead_pooled_by_threads": pooled, "by_atoms": by_bin, "by_atoms_batch_size": best_bs,
           "by_atoms_batch_atoms": best_ba,
           "machine": f"{platform.node()} {os.cpu_count()} CPUs", "load_start": load0, "load_end": os.getloadavg(),
           "torch": torch.__version__, "compile": compiled, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    md = [f"# bench_prescreen: {sur.name}, {len(built)} Ba-Ru-O candidates "
          f"({out['mean_atoms']} atoms on average, median {out['median_atoms']})", "",
          f"Machine: {out['machine']}, CPU only, torch {torch.__version__}; load (1 min) "
          f"{load0[0]:.2f} at the start, {out['load_end'][0]:.2f} at the end. Medians of {args.rounds} "
          "alternating rounds.", "",
          "| torch threads | batch | prescreen_frame (structures/s) | model's batched pass (structures/s) "
          "| overhead (goal <= 15 %) |", "|---:|---:|---:|---:|---:|"]
    md += [f"| {r['threads']} | {_batch(r['batch_size'], r['batch_atoms'])} | {r['prescreen_per_s']} | {r['model_per_s']} | "
           f"{100 * r['overhead']:+.1f} % |" for r in runs]
    md += ["", "Pooled over every round and batch size (the rounds differ by up to ~15 % on a shared machine, "
           "more than the overhead): " + ", ".join(f"{th} thread(s) {100 * o:+.1f} %" for th, o in pooled.items())
           + "."]
    md += ["", f"Rebuilding the structures from their ASU rows: {out['rebuild_ms_per_structure']} ms each "
           f"({out['rebuild_s_median']} s for {len(built)}).", "",
           f"Model rate by cell size ({threads[0]} thread, batch {_batch(best_bs, best_ba)}):", "",
           "| atoms | n | structures/s | atoms/s |", "|---|---:|---:|---:|"]
    md += [f"| {b['atoms']} | {b['n']} | {b['structures_per_s']} | {b['atoms_per_s']} |" for b in by_bin]
    if compiled:
        md += ["", f"`torch.compile` of the energy pass (`compile_energy=True`), {compiled['threads']} thread, "
               f"<= {compiled['batch_atoms']} atoms per pass, medians of {args.rounds} alternating rounds:", "",
               "| model | first call (s) | structures/s after it |", "|---|---:|---:|",
               f"| eager | {compiled['eager_first_s']} | {compiled['eager_per_s']} |",
               f"| compiled | {compiled['compiled_first_s']} | {compiled['compiled_per_s']} |", "",
               f"Speed-up {compiled['speedup']:.2f}x; largest energy difference {compiled['max_abs_de_ev_per_atom']:.1e} "
               "eV/atom. The first compiled call compiles (torch caches the result on disk: a later process "
               "starts faster)."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
