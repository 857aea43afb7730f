"""The paper's TensorFlow M3GNet vs matgl's M3GNet on real Ba-Ru-O structures.

    python benchmarks/bench_m3gnet_tf_vs_matgl.py [--models-dir DIR] [--tf-python PY] [--n 12]

Both through ``lib.surrogates.load_surrogate``: ``M3GNet-TF-MP-2021.2.8-EFS`` (m3gnet 0.2.4 in
its TensorFlow worker) and ``M3GNet-MP-2021.2.8-PES`` (matgl, DGL conventions restored). Static
single points (no relaxation) on two sets:

* ``mp_compounds``: the ``n`` smallest cells of the compounds (two or more elements) of the
  shared MP Ba-Ru-O source (``data/mp/ba_ru_o/ba_ru_o_mp_structures.csv``, MP-relaxed, as
  stored);
* ``mp_elements``: its elemental phases (Ba, O2 polymorphs), the hull's end points;
* ``generated``: ``n`` seeded PyXtal random Ba-Ru-O crystals of 4-8 atoms, like the generator's
  candidates before relaxation, keeping those both models put below 0 eV/atom (random cells
  with squeezed atoms reach +10 eV/atom and say nothing about a shortlist; how many were
  dropped is recorded).

Reports per structure E_tf, E_matgl (eV/atom) and their difference, and per set the mean and max
|E_tf - E_matgl| and the mean and spread of the signed difference (a constant offset would not
reorder a shortlist; the spread does). Writes ``benchmarks/results/m3gnet_tf_vs_matgl.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from lib.surrogates import load_surrogate  # noqa: E402

TF = "M3GNet-TF-MP-2021.2.8-EFS"
MATGL = "M3GNet-MP-2021.2.8-PES"
COMPOSITIONS = [  # (species, counts), 4-8 atoms per cell
    (["Ba", "Ru", "O"], [1, 1, 3]), (["Ba", "Ru", "O"], [2, 1, 4]), (["Ba", "Ru", "O"], [1, 2, 4]),
    (["Ba", "Ru", "O"], [1, 1, 2]), (["Ba", "Ru", "O"], [1, 2, 3]), (["Ba", "Ru", "O"], [2, 2, 4]),
]


def mp_structures(shared: Path, n: int, *, compounds: bool) -> list[tuple[str, object]]:
    from pymatgen.core import Composition, Structure

    path = shared / "data" / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv"
    df = pl.read_csv(path).sort(["nsites", "material_id"])
    keep = [(len(Composition(f).elements) > 1) == compounds for f in df["pretty_formula"]]
    df = df.filter(pl.Series(keep)).head(n)
    return [(f"{r['material_id']} {r['pretty_formula']}", Structure.from_str(r["cif"], fmt="cif"))
            for r in df.iter_rows(named=True)]


def generated_structures(n: int, seed: int) -> list[tuple[str, object]]:
    """Random Ba-Ru-O crystals of 4-8 atoms, as the generator makes them (bench_screening's pyxtal draw)."""
    from benchmarks.bench_screening import random_structures

    drawn = random_structures(n, seed=seed, compositions=COMPOSITIONS, atoms=(4, 8))
    return [(f"gen-{i:02d} {s.composition.reduced_formula} sg{sg}", s) for i, (s, sg) in enumerate(drawn)]


def compare(tf, matgl, items: list[tuple[str, object]], *, below_zero_only: bool = False) -> dict:
    structures = [s for _, s in items]
    p_tf = tf.predict(structures, energy_only=True)
    p_mg = matgl.predict(structures, energy_only=True)
    n_in = len(items)
    if below_zero_only:
        kept = [k for k, (a, b) in enumerate(zip(p_tf, p_mg, strict=True))
                if a.energy_per_atom_ev < 0 and b.energy_per_atom_ev < 0]
        items, p_tf, p_mg = ([x[k] for k in kept] for x in (items, p_tf, p_mg))
    rows = [{"structure": name, "n_atoms": len(s), "e_tf_ev_per_atom": a.energy_per_atom_ev,
             "e_matgl_ev_per_atom": b.energy_per_atom_ev,
             "diff_ev_per_atom": a.energy_per_atom_ev - b.energy_per_atom_ev}
            for (name, s), a, b in zip(items, p_tf, p_mg, strict=True)]
    d = np.array([r["diff_ev_per_atom"] for r in rows])
    return {"rows": rows, "n": len(rows), "n_dropped": n_in - len(rows), "mean_abs_diff_ev_per_atom": float(np.abs(d).mean()),
            "max_abs_diff_ev_per_atom": float(np.abs(d).max()),
            "mean_signed_diff_ev_per_atom": float(d.mean()), "std_signed_diff_ev_per_atom": float(d.std())}


def markdown(result: dict) -> str:
    lines = [f"# {TF} vs {MATGL}", "",
             "Static single points through `lib.surrogates.load_surrogate`; diff = E_tf - E_matgl.", "",
             "| set | n (dropped) | mean abs diff (eV/atom) | max abs diff | mean signed | spread (std) |",
             "|---|---|---|---|---|---|"]
    for name, s in result["sets"].items():
        lines.append(f"| {name} | {s['n']} ({s['n_dropped']}) | {s['mean_abs_diff_ev_per_atom']:.4f} | "
                     f"{s['max_abs_diff_ev_per_atom']:.4f} | {s['mean_signed_diff_ev_per_atom']:+.4f} | "
                     f"{s['std_signed_diff_ev_per_atom']:.4f} |")
    for name, s in result["sets"].items():
        lines += ["", f"## {name}", "", "| structure | atoms | E_tf | E_matgl | diff |", "|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['structure']} | {r['n_atoms']} | {r['e_tf_ev_per_atom']:.4f} | "
                         f"{r['e_matgl_ev_per_atom']:.4f} | {r['diff_ev_per_atom']:+.4f} |")
    lines += ["", f"Versions: {result['versions']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models-dir", default="")
    ap.add_argument("--tf-python", default=str(ROOT / ".venv-m3gnet-tf" / "bin" / "python"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "m3gnet_tf_vs_matgl"))
    args = ap.parse_args()
    shared = Path(args.shared)
    models_dir = args.models_dir or str(shared / "models")
    t0 = time.perf_counter()
    with load_surrogate(TF, models_dir=models_dir, worker_python=args.tf_python, threads=1) as tf:
        matgl = load_surrogate(MATGL, models_dir=models_dir)
        sets = {"mp_compounds": compare(tf, matgl, mp_structures(shared, args.n, compounds=True)),
                "mp_elements": compare(tf, matgl, mp_structures(shared, args.n, compounds=False)),
                "generated": compare(tf, matgl, generated_structures(2 * args.n, args.seed),
                                     below_zero_only=True)}
        versions = {"tf": tf.library_version, "matgl": matgl.library_version,
                    "tf_surrogate_id": tf.surrogate_id, "matgl_surrogate_id": matgl.surrogate_id}
    result = {"sets": sets, "versions": versions, "seconds": time.perf_counter() - t0,
              "machine": platform.platform()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    for name, s in sets.items():
        print(f"{name}: n={s['n']} mean |dE| {s['mean_abs_diff_ev_per_atom']:.4f} eV/atom, "
              f"max {s['max_abs_diff_ev_per_atom']:.4f}, signed {s['mean_signed_diff_ev_per_atom']:+.4f} "
              f"± {s['std_signed_diff_ev_per_atom']:.4f}")


if __name__ == "__main__":
    main()
