"""Figure 4A of the paper on this surrogate: share of relaxations that converge, by atoms per cell,
for templates infilled with real compositions versus PyXtal random structures of the same
compositions and space groups.

    python benchmarks/bench_fig4a.py [--per-bin 3] [--steps 300] [--surrogate CHGNet-0.3.0]

Templates: no trained generator checkpoint is assumed, so the templates are Wyckoff skeletons
(space group, Wyckoff letters, representative coordinates, lattice) of Materials Project
structures (``mp_structures.csv.gz`` in the shared data, via ``lib.symmetry.asymmetric_unit``),
as the generator is trained to produce. Each template T is infilled with the *real composition*
of another MP material M whose Wyckoff multiplicities are the same multiset: M's elements go to
T's sites of the same multiplicity, and T's cell is rescaled isotropically to M's volume per atom.
The random side is ``pyxtal.from_random`` with M's composition (conventional-cell counts) in T's
space group. Both are relaxed with the surrogate (FIRE, cell + positions, fmax 0.05 eV/Å, at most
``--steps`` steps). Bins by atoms per conventional cell: 2-4, 5-8, 9-16, 17-32.

Writes ``benchmarks/results/bench_fig4a.json`` and ``.md`` (with the bar chart as a PNG beside).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from lib import screening as scr  # noqa: E402

BINS = ((2, 4), (5, 8), (9, 16), (17, 32))


def _bin(n: int) -> str | None:
    for lo, hi in BINS:
        if lo <= n <= hi:
            return f"{lo}-{hi}"
    return None


def mp_templates(path: Path, *, sample: int, seed: int) -> list[dict]:
    """ASU templates of a random sample of MP structures (those whose symmetry round-trips)."""
    from pymatgen.core import Structure

    from lib.symmetry import asymmetric_unit

    df = pl.read_csv(path, infer_schema_length=0).filter(pl.col("nsites").cast(pl.Int64) <= 32)
    df = df.sample(n=min(sample, df.height), seed=seed)
    out = []
    for row in df.select("material_id", "cif").iter_rows(named=True):
        try:
            s = Structure.from_str(row["cif"], fmt="cif")
            asu = asymmetric_unit(s.lattice.matrix, [x.specie.symbol for x in s], s.frac_coords, symprec=0.1)
        except Exception:  # noqa: BLE001 - skip structures without a clean ASU
            continue
        if not 2 <= asu["n_atoms"] <= 32:
            continue
        out.append({"material_id": row["material_id"], "sg": asu["spacegroup_number"],
                    "letters": asu["wyckoff_letters"], "mult": asu["multiplicities"],
                    "elements": asu["asu_elements"], "coords": asu["asu_frac_coords"],
                    "lattice": asu["lattice_params"], "n_atoms": asu["n_atoms"],
                    "volume_per_atom": s.volume / len(s)})
    return out


def pairs(templates: list[dict], *, per_bin: int, seed: int) -> list[dict]:
    """(template, real composition of another material with the same multiplicities) per bin."""
    rng = np.random.default_rng(seed)
    by_mult: dict[tuple, list[dict]] = defaultdict(list)
    for t in templates:
        by_mult[tuple(sorted(t["mult"]))].append(t)
    chosen: dict[str, list[dict]] = defaultdict(list)
    order = rng.permutation(len(templates))
    for i in order:
        t = templates[int(i)]
        b = _bin(t["n_atoms"])
        if b is None or len(chosen[b]) >= per_bin:
            continue
        others = [m for m in by_mult[tuple(sorted(t["mult"]))]
                  if sorted(m["elements"]) != sorted(t["elements"]) and m["material_id"] != t["material_id"]]
        if not others:
            continue
        m = others[int(rng.integers(len(others)))]
        # M's elements onto T's sites, matched by multiplicity (both sorted by multiplicity)
        t_idx = sorted(range(len(t["mult"])), key=lambda k: (t["mult"][k], k))
        m_idx = sorted(range(len(m["mult"])), key=lambda k: (m["mult"][k], k))
        species = [""] * len(t_idx)
        for ti, mi in zip(t_idx, m_idx, strict=True):
            species[ti] = m["elements"][mi]
        chosen[b].append({"bin": b, "template": t["material_id"], "composition_of": m["material_id"], "sg": t["sg"],
                          "letters": t["letters"], "species": species, "coords": t["coords"],
                          "lattice": t["lattice"], "n_atoms": t["n_atoms"],
                          "volume_per_atom": m["volume_per_atom"]})
    return [p for b in sorted(chosen) for p in chosen[b]]


def template_structure(p: dict):
    from lib.wyckoff import asu_to_structure

    s = asu_to_structure(p["sg"], p["letters"], p["species"], p["coords"], tuple(p["lattice"]))
    s.scale_lattice(p["volume_per_atom"] * len(s))
    return s


def random_structure(p: dict, *, seed: int):
    """PyXtal random crystal with the pair's composition (conventional-cell counts) and space group."""
    from pyxtal import pyxtal

    counts: dict[str, int] = defaultdict(int)
    for sp, m in zip(p["species"], _mults(p), strict=True):
        counts[sp] += m
    els = sorted(counts)
    for attempt in range(5):
        c = pyxtal()
        try:
            c.from_random(3, p["sg"], els, [counts[e] for e in els], random_state=seed + attempt)
        except Exception:  # noqa: BLE001 - pyxtal gives up on some combinations
            continue
        if c.valid:
            return c.to_pymatgen()
    return None


def _mults(p: dict) -> list[int]:
    from lib.wyckoff import position

    return [position(p["sg"], letter).multiplicity for letter in p["letters"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--surrogate", default="CHGNet-0.3.0")
    ap.add_argument("--models-dir", default=os.environ.get("CGWGAN_M3GNET_DIR", ""))
    ap.add_argument("--mp-file", default=str(Path(os.environ.get("CGWGAN_SHARED", ROOT.parent / "shared"))
                                            / "data" / "mp" / "mp_structures.csv.gz"))
    ap.add_argument("--per-bin", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--fmax", type=float, default=0.05)
    ap.add_argument("--sample", type=int, default=1500, help="MP structures scanned for templates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_fig4a"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    sur = scr.load_configured_surrogate(args.surrogate, models_dir=args.models_dir or None)
    templates = mp_templates(Path(args.mp_file), sample=args.sample, seed=args.seed)
    chosen = pairs(templates, per_bin=args.per_bin, seed=args.seed)
    rows = []
    for i, p in enumerate(chosen):
        for kind in ("template", "random"):
            s = template_structure(p) if kind == "template" else random_structure(p, seed=args.seed + i)
            if s is None:
                rows.append({**_meta(p), "kind": kind, "status": "no_structure"})
                continue
            t = time.perf_counter()
            r = scr.relax_frame(sur, pl.DataFrame([{"candidate_id": f"{kind}-{i}", **scr.structure_to_cell(s)}]),
                                fmax=args.fmax, steps=args.steps).row(0, named=True)
            rows.append({**_meta(p), "kind": kind, "n_atoms": len(s), "status": r["status"],
                         "is_converged": bool(r["is_converged"]), "n_steps": r["n_steps"],
                         "seconds": time.perf_counter() - t})
            print(f"{p['bin']:>6} {kind:8} {p['template']:>12} <- {p['composition_of']:>12} "
                  f"{len(s):3d} atoms converged={r['is_converged']} steps={r['n_steps']}", flush=True)
            write_results(rows, args, sur, t0, len(templates), plot=False)
    write_results(rows, args, sur, t0, len(templates), plot=True)


def write_results(rows: list[dict], args, sur, t0: float, n_templates: int, *, plot: bool) -> None:
    """JSON + Markdown of the relaxations so far (called after each one, so a cut-short run keeps them)."""
    df = pl.DataFrame(rows)
    summary = (df.filter(pl.col("status") == "ok").group_by("bin", "kind")
               .agg(pl.len().alias("n"), pl.col("is_converged").mean().alias("share_converged"),
                    pl.col("n_steps").mean().alias("mean_steps")).sort("bin", "kind"))
    res = {"surrogate": sur.name, "surrogate_sha256": sur.weights_sha256, "per_bin": args.per_bin,
           "steps": args.steps, "fmax": args.fmax, "templates_scanned": n_templates, "complete": plot,
           "total_s": time.perf_counter() - t0, "summary": summary.to_dicts(), "relaxations": df.to_dicts()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    md = [f"# bench_fig4a — relaxation convergence by atoms per cell ({sur.name})", "",
          f"{args.per_bin} pairs per bin; FIRE, fmax {args.fmax} eV/Å, at most {args.steps} steps; "
          f"{res['total_s'] / 60:.1f} min on a 2-core machine shared with other jobs (pessimistic)"
          + ("." if plot else "; run cut short, partial results."),
          "Templates are MP Wyckoff skeletons infilled with another MP material's real composition (no trained "
          "generator checkpoint was used); random = PyXtal `from_random` with the same composition and space group.",
          "", "| atoms per cell | kind | n | share converged | mean steps |", "|---|---|---|---|---|"]
    md += [f"| {r['bin']} | {r['kind']} | {r['n']} | {r['share_converged']:.2f} | {r['mean_steps']:.0f} |"
           for r in summary.to_dicts()]
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        bins = [f"{lo}-{hi}" for lo, hi in BINS]
        fig, ax = plt.subplots(figsize=(5, 3))
        for j, kind in enumerate(("template", "random")):
            vals = [summary.filter((pl.col("bin") == b) & (pl.col("kind") == kind))["share_converged"].to_list()
                    or [0] for b in bins]
            ax.bar(np.arange(len(bins)) + (j - 0.5) * 0.38, [v[0] for v in vals], width=0.38,
                   label="MP templates + real compositions" if kind == "template" else "PyXtal random")
        ax.set_xticks(range(len(bins)), bins)
        ax.set_xlabel("atoms per cell")
        ax.set_ylabel("share of relaxations converged")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.set_title(f"{sur.name}, fmax {args.fmax} eV/Å, ≤{args.steps} steps", fontsize=8)
        fig.savefig(out.with_suffix(".png"), dpi=110, bbox_inches="tight")
        md += ["", f"![fig4a]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _meta(p: dict) -> dict:
    return {"bin": p["bin"], "template": p["template"], "composition_of": p["composition_of"], "sg": p["sg"],
            "template_atoms": p["n_atoms"]}


if __name__ == "__main__":
    main()
