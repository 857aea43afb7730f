"""Surrogate throughput: batched inference vs. a one-structure-at-a-time ASE loop; relaxations.

For each surrogate (default: M3GNet-MP-2021.2.8-PES and CHGNet-0.3.0) on a few hundred 5-20-atom
Materials Project structures:

- ``ase_loop``: the paper's way -- one ``Atoms`` at a time through the library's own ASE
  calculator (``get_potential_energy``; the calculators compute energy, forces and stress);
- ``batched_energy``: :meth:`Surrogate.predict` with ``energy_only=True`` (no autograd), many
  structures per forward pass;
- ``batched_efs``: :meth:`Surrogate.predict` with forces and stress, batched;
- ``relax``: :meth:`Surrogate.relax` (FIRE + FrechetCellFilter, fmax 0.05, step cap) of rattled
  structures: relaxations per minute and the share that converge.

The loop and the batched runs are timed in interleaved rounds so that on a shared machine they
see the same background load. On a CPU run torch uses one intra-op thread unless ``--threads``.

Writes ``benchmarks/results/bench_surrogates.json`` and ``.md``. Run::

    python benchmarks/bench_surrogates.py                      # CPU, shared folder ../shared
    python benchmarks/bench_surrogates.py --device cuda --tag gpu-h100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.surrogates import load_surrogate  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def load_structures(mp_file: Path, *, n: int, min_atoms: int, max_atoms: int, seed: int,
                    elements: frozenset[str]) -> list:
    from pymatgen.core import Structure

    df = pl.read_csv(mp_file, columns=["material_id", "cif", "nsites"])
    df = df.filter(pl.col("nsites").is_between(min_atoms, max_atoms)).sample(
        n=min(len(df), 3 * n), seed=seed
    )
    out = []
    for cif in df["cif"]:
        s = Structure.from_str(cif, fmt="cif")
        if {e.symbol for e in s.composition.elements} <= elements:
            out.append(s)
        if len(out) == n:
            break
    return out


def bench_surrogate(sur, structures: list, *, args: argparse.Namespace, load_s: float) -> dict:
    res: dict = {"surrogate": sur.name, "surrogate_id": sur.surrogate_id, "convention": sur.convention,
                 "library": sur.library_version, "load_s": round(load_s, 2)}

    # warm-up (first-call allocations, lazy imports)
    sur.predict(structures[:4], batch_size=4)
    sur.predict(structures[:4], batch_size=4, energy_only=True)

    # The machine may be shared: time the ASE loop and the batched runs in interleaved rounds
    # (each round: a slice of structures through the loop, then the same round's structures
    # batched), so that all three see the same background load.
    calc = sur.calculator()
    n_rounds = max(1, args.rounds)
    chunks = np.array_split(np.arange(len(structures)), n_rounds)
    n_loop_round = max(1, args.n_baseline // n_rounds)
    t_loop = t_e = t_efs = 0.0
    n_loop = 0
    e_loop: dict[int, float] = {}
    preds_e: dict[int, object] = {}
    preds_efs: dict[int, object] = {}
    for chunk in chunks:
        chunk_structs = [structures[i] for i in chunk]
        _sync(args.device)
        t0 = time.perf_counter()
        for i in chunk[:n_loop_round]:
            atoms = structures[i].to_ase_atoms()
            atoms.calc = calc
            e_loop[int(i)] = float(atoms.get_potential_energy())
        _sync(args.device)
        t_loop += time.perf_counter() - t0
        n_loop += min(n_loop_round, len(chunk))
        for energy_only, bs, store in ((True, args.batch_size_energy, preds_e),
                                       (False, args.batch_size_efs, preds_efs)):
            _sync(args.device)
            t0 = time.perf_counter()
            out = sur.predict_safe(chunk_structs, batch_size=bs, energy_only=energy_only)
            _sync(args.device)
            dt = time.perf_counter() - t0
            if energy_only:
                t_e += dt
            else:
                t_efs += dt
            store.update({int(i): p for i, p in zip(chunk, out, strict=True)})
    loop_rate = n_loop / t_loop
    res["ase_loop"] = {"n": n_loop, "seconds": t_loop, "structures_per_s": loop_rate}
    for key, dt, store, bs in (("batched_energy", t_e, preds_e, args.batch_size_energy),
                               ("batched_efs", t_efs, preds_efs, args.batch_size_efs)):
        diffs = [abs(store[i].energy_ev - e) / store[i].n_atoms for i, e in e_loop.items()]
        res[key] = {
            "n": len(structures), "n_ok": sum(p.ok for p in store.values()), "batch_size": bs,
            "seconds": dt, "structures_per_s": len(structures) / dt,
            "speedup_vs_ase_loop": (len(structures) / dt) / loop_rate,
            "max_abs_diff_vs_ase_loop_ev_per_atom": float(np.nanmax(diffs)),
        }

    # relaxations
    from pymatgen.core import Structure

    rng = np.random.default_rng(args.seed)
    relax_set = []
    for s in structures[: args.n_relax]:
        relax_set.append(Structure(s.lattice, s.species,
                                   s.cart_coords + rng.normal(0, 0.05, (len(s), 3)),
                                   coords_are_cartesian=True, to_unit_cell=True))
    t0 = time.perf_counter()
    outcomes = [sur.relax(s, fmax=0.05, steps=args.relax_steps) for s in relax_set]
    dt = time.perf_counter() - t0
    res["relax"] = {
        "n": len(relax_set), "seconds": dt, "relaxations_per_min": 60 * len(relax_set) / dt,
        "fraction_converged": float(np.mean([o.is_converged for o in outcomes])),
        "mean_steps": float(np.mean([o.steps for o in outcomes])),
        "steps_per_s": float(sum(o.steps for o in outcomes) / dt),
        "step_cap": args.relax_steps,
    }
    return res


def machine_info(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": device, "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Surrogate throughput",
        "",
        f"{result['created_at']} · device `{result['machine']['device']}`"
        + (f" ({result['machine']['gpu']})" if "gpu" in result["machine"] else "")
        + f" · {result['machine']['cpu_count']} CPU cores, torch threads "
        f"{result['machine']['torch_threads']} · {result['n_structures']} MP structures with "
        f"{result['atoms_range'][0]}-{result['atoms_range'][1]} atoms · {result['note']}",
        "",
        "| surrogate | ASE loop (structures/s) | batched energies (structures/s) | speed-up | "
        "batched E+F+S (structures/s) | speed-up | relaxations/min | converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["surrogates"]:
        lines.append(
            f"| {r['surrogate']} | {r['ase_loop']['structures_per_s']:.1f} | "
            f"{r['batched_energy']['structures_per_s']:.1f} | "
            f"{r['batched_energy']['speedup_vs_ase_loop']:.1f}× | "
            f"{r['batched_efs']['structures_per_s']:.1f} | "
            f"{r['batched_efs']['speedup_vs_ase_loop']:.1f}× | "
            f"{r['relax']['relaxations_per_min']:.1f} | "
            f"{r['relax']['fraction_converged']:.0%} (cap {r['relax']['step_cap']} steps) |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    shared = Path(os.environ.get("CGWGAN_SHARED") or REPO.parent / "shared")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--surrogates", nargs="+", default=["M3GNet-MP-2021.2.8-PES", "CHGNet-0.3.0"])
    p.add_argument("--models-dir", default=os.environ.get("CGWGAN_M3GNET_DIR") or str(shared / "models"))
    p.add_argument("--mp-file", default=str(shared / "data" / "mp" / "mp_structures.csv.gz"))
    p.add_argument("--n-structures", type=int, default=300)
    p.add_argument("--n-baseline", type=int, default=100,
                   help="structures in the one-at-a-time ASE loop (a prefix of the batched set)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of (ASE loop, batched) timing")
    p.add_argument("--n-relax", type=int, default=6)
    p.add_argument("--relax-steps", type=int, default=150)
    p.add_argument("--min-atoms", type=int, default=5)
    p.add_argument("--max-atoms", type=int, default=20)
    p.add_argument("--batch-size-energy", type=int, default=64)
    p.add_argument("--batch-size-efs", type=int, default=32)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: 1 on a CPU run, torch's default on a GPU run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix for the result files (e.g. gpu-h100)")
    p.add_argument("--note", default="shared 2-core machine: numbers are pessimistic")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        torch.set_num_threads(1)

    from pymatgen.core import Element

    covered = frozenset(Element.from_Z(z).symbol for z in range(1, 95))
    surrogates = []
    for name in args.surrogates:
        t0 = time.perf_counter()
        sur = load_surrogate(name, models_dir=args.models_dir, device=args.device)
        surrogates.append((sur, time.perf_counter() - t0))
        covered = covered & sur.supported_elements
    structures = load_structures(Path(args.mp_file), n=args.n_structures, min_atoms=args.min_atoms,
                                 max_atoms=args.max_atoms, seed=args.seed, elements=covered)
    result = {
        "benchmark": "bench_surrogates",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "n_structures": len(structures),
        "atoms_range": [args.min_atoms, args.max_atoms],
        "mean_atoms": float(np.mean([len(s) for s in structures])),
        "note": args.note,
        "surrogates": [],
    }
    for sur, load_s in surrogates:
        r = bench_surrogate(sur, structures, args=args, load_s=load_s)
        print(json.dumps(r, indent=1), flush=True)
        result["surrogates"].append(r)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_surrogates" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / f"{stem}.md")
    print((out / f"{stem}.md").read_text())
    return result


if __name__ == "__main__":
    main()
