"""Screening throughput: batched static energies vs an ASE loop, Ray workers, relaxations, phonons.

    python benchmarks/bench_screening.py [--surrogate CHGNet-0.3.0] [--n 64] [--models-dir DIR]

Structures: PyXtal random crystals of Ba-Ru-O compositions with 5-10 atoms per cell (seeded).
Measures (all in one run):

* static energies/s: ``Surrogate.predict_safe(energy_only=True)`` batched (batch 32) vs one
  structure at a time through the surrogate's ASE calculator (``atoms.get_potential_energy()``,
  the paper's way), and the batched pre-screen on 1 and 2 Ray actors (after the model load);
* relaxations per minute (FIRE, fmax 0.05 eV/Å, at most 300 steps, cell + positions);
* phonon screens per hour (2x2x2 supercell, 8x8x8 mesh, band path).

Writes ``benchmarks/results/bench_screening.json`` and ``.md``.
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
from lib.cells import structure_to_cell  # noqa: E402
from lib.phonons import phonon_frame  # noqa: E402

COMPOSITIONS = [  # (species, counts) with 5-10 atoms per cell
    (["Ba", "Ru", "O"], [1, 1, 3]), (["Ba", "O"], [2, 4]), (["Ru", "O"], [2, 4]), (["Ba", "Ru", "O"], [2, 1, 4]),
    (["Ba", "O"], [4, 4]), (["Ba", "Ru", "O"], [1, 2, 6]), (["Ru", "O"], [1, 4]), (["Ba", "Ru", "O"], [2, 2, 6]),
]


def random_structures(n: int, *, seed: int, compositions: list | None = None,
                       atoms: tuple[int, int] = (5, 10)) -> list[tuple[object, int]]:
    """``n`` seeded random pyxtal crystals (structure, the space group it was drawn in) cycling over
    ``compositions`` (default :data:`COMPOSITIONS`), keeping those with ``atoms`` (min, max) sites."""
    from pyxtal import pyxtal

    compositions = compositions or COMPOSITIONS
    rng = np.random.default_rng(seed)
    out: list[tuple[object, int]] = []
    while len(out) < n:
        species, counts = compositions[len(out) % len(compositions)]
        sg = int(rng.choice([1, 2, 12, 14, 62, 123, 139, 166, 194, 221]))
        c = pyxtal()
        try:
            c.from_random(3, sg, species, counts, random_state=int(rng.integers(1 << 31)))
        except Exception:  # noqa: BLE001 - composition not compatible with this group
            continue
        if c.valid:
            s = c.to_pymatgen()
            if atoms[0] <= len(s) <= atoms[1]:
                out.append((s, sg))
    return out


def cell_frame(structures: list) -> pl.DataFrame:
    rows = [{"candidate_id": f"bench-{i:04d}", **structure_to_cell(s)} for i, s in enumerate(structures)]
    return pl.DataFrame(rows)


def ray_part(args) -> dict:
    """Pre-screen throughput on 1 and 2 local Ray actors (after their model loads)."""
    import ray

    structures = [s for s, _ in random_structures(args.n, seed=args.seed)]
    frame = cell_frame(structures)
    out: dict = {}
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        for k in (1, 2):
            pool = scr.SurrogatePool(args.surrogate, num_actors=k, load_kwargs={"models_dir": args.models_dir or None})
            pool.info()  # wait for the model loads
            plan = scr.plan_batches(frame, rows_per_batch=max(1, len(structures) // (2 * k)),
                                    salt={"bench": time.time()})
            res, stats = scr.run_batches(plan, pool.compute("prescreen", batch_size=32), work_dir=None)
            out[f"ray_{k}_workers_energies_per_s"] = res.height / stats.seconds
            pool.shutdown()
    finally:
        ray.shutdown()
    return out


def ray_timings(args, *, attempts: int = 3, timeout_s: int = 900) -> dict:
    """``ray_part`` in a child process with a time limit, retried: on a machine shared with other
    sessions a local Ray can be stopped from outside (``ray stop``), which leaves a driver hanging."""
    from benchmarks._child import run_json_child

    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return {"ray_status": f"skipped: ray not importable ({exc})"}
    cmd = [sys.executable, __file__, "--ray-part", "--surrogate", args.surrogate, "--n", str(args.n),
           "--seed", str(args.seed)] + (["--models-dir", args.models_dir] if args.models_dir else [])
    out, n = run_json_child(cmd, attempts=attempts, timeout_s=timeout_s, stderr_tail=500)
    return {**(out or {}), "ray_attempts": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--surrogate", default="CHGNet-0.3.0")
    ap.add_argument("--models-dir", default=os.environ.get("CGWGAN_M3GNET_DIR", ""))
    ap.add_argument("--n", type=int, default=64, help="structures for the static-energy timings")
    ap.add_argument("--n-relax", type=int, default=4)
    ap.add_argument("--n-phonon", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--ray-part", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_screening"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    if args.ray_part:
        print("RAYJSON " + json.dumps(ray_part(args)), flush=True)
        return
    t0 = time.perf_counter()
    sur = scr.load_configured_surrogate(args.surrogate, models_dir=args.models_dir or None)
    load_s = time.perf_counter() - t0
    structures = [s for s, _ in random_structures(args.n, seed=args.seed)]
    res: dict = {"surrogate": sur.name, "surrogate_sha256": sur.weights_sha256, "n_structures": len(structures),
                 "atoms_per_cell_mean": float(np.mean([len(s) for s in structures])), "model_load_s": load_s,
                 "machine": f"{platform.node()} {os.cpu_count()} CPUs, shared with other jobs",
                 "torch_threads": torch.get_num_threads()}

    sur.predict_safe(structures[:4], batch_size=4, energy_only=True)  # warm-up
    t = time.perf_counter()
    batched = sur.predict_safe(structures, batch_size=32, energy_only=True)
    res["batched_energies_per_s"] = len(structures) / (time.perf_counter() - t)

    from pymatgen.io.ase import AseAtomsAdaptor

    calc = sur.calculator()
    n_loop = min(len(structures), 32)
    t = time.perf_counter()
    loop_e = []
    for s in structures[:n_loop]:
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.calc = calc
        loop_e.append(atoms.get_potential_energy())
    res["ase_loop_energies_per_s"] = n_loop / (time.perf_counter() - t)
    res["batched_vs_ase_loop_speedup"] = res["batched_energies_per_s"] / res["ase_loop_energies_per_s"]
    res["max_abs_diff_batched_vs_loop_ev_per_atom"] = float(max(
        abs(p.energy_ev - e) / len(s) for p, e, s in zip(batched[:n_loop], loop_e, structures[:n_loop], strict=True)))

    if args.skip_ray:
        res["ray_status"] = "skipped: --skip-ray"
    else:
        res.update(ray_timings(args))

    rel_structs = structures[: args.n_relax]
    t = time.perf_counter()
    rel = scr.relax_frame(sur, cell_frame(rel_structs), fmax=0.05, steps=300)
    dt = time.perf_counter() - t
    res["relaxations"] = rel.height
    res["relaxations_converged"] = int(rel["is_converged"].sum() or 0)
    res["relax_steps_mean"] = float(rel["n_steps"].mean() or 0)
    res["relaxations_per_min"] = 60 * rel.height / dt

    ok = rel.filter(pl.col("status") == "ok").head(args.n_phonon).rename({"key": "candidate_id"})
    t = time.perf_counter()
    ph = phonon_frame(sur, ok)
    dt = time.perf_counter() - t
    res["phonon_screens"] = ph.height
    res["phonon_displacements_mean"] = float(ph["n_displacements"].mean() or 0)
    res["phonon_supercell_atoms_mean"] = float(ph["n_supercell_atoms"].mean() or 0)
    res["phonon_screens_per_hour"] = 3600 * ph.height / dt
    res["total_s"] = time.perf_counter() - t0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    rows = [
        ("static energies/s, batched (batch 32)", res["batched_energies_per_s"]),
        ("static energies/s, ASE calculator loop", res["ase_loop_energies_per_s"]),
        ("speed-up batched / loop", res["batched_vs_ase_loop_speedup"]),
        ("static energies/s, Ray 1 worker", res.get("ray_1_workers_energies_per_s", float("nan"))),
        ("static energies/s, Ray 2 workers", res.get("ray_2_workers_energies_per_s", float("nan"))),
        ("relaxations/min (fmax 0.05, <= 300 steps)", res["relaxations_per_min"]),
        ("phonon screens/hour (2x2x2, 8x8x8 mesh)", res["phonon_screens_per_hour"]),
    ]
    md = [f"# bench_screening — {res['surrogate']}, {res['n_structures']} structures of "
          f"{res['atoms_per_cell_mean']:.1f} atoms on average", "",
          f"Machine: {res['machine']} (numbers are pessimistic); torch threads {res['torch_threads']}; "
          f"CPU only.", "", "| measure | value |", "|---|---|"]
    md += [f"| {k} | {v:.3g} |" if v == v else f"| {k} | {res.get('ray_status', 'failed')} |" for k, v in rows]
    md += ["", f"Relaxations: {res['relaxations_converged']}/{res['relaxations']} converged, "
           f"{res['relax_steps_mean']:.0f} steps on average. Max |batched − loop| "
           f"{res['max_abs_diff_batched_vs_loop_ev_per_atom']:.1e} eV/atom."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
