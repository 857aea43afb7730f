"""GPAW (lib.dft_gpaw) on the Ba-Ru-O known phases against MP: lattice constants and BaRuO3 ordering.

    python benchmarks/bench_gpaw_known_phases.py [--preset standard] [--only mp-1342,...]
        [--runs-root /work/runs/gpaw_bench/standard] [--threads 1] [--timeout 36000]
        [--out benchmarks/results/gpaw_known_phases]

Phases (from ``$CGWGAN_SHARED/data/mp/ba_ru_o/ba_ru_o_mp_structures.csv``), cheapest first:
BaO (mp-1342), Ba2RuO4 (mp-1025237), RuO2 (mp-8909, the Pa-3 entry present there), BaRuO3
mp-3597 (20 atoms) and mp-3598 (30 atoms). Each is reduced to its primitive cell (spglib, 0.01 Å),
written as a GPAW run folder (relax of cell and positions + static, no phonons) and run with
``lib.dft_gpaw.run_gpaw`` (one process, ``--threads`` OpenMP threads). Finished folders are
reused, so a rerun resumes where a killed one stopped.

Checks: each relaxed primitive lattice length within 2 % of MP's (the same cell, so axis by axis)
for BaO, RuO2 and Ba2RuO4; the sign of E(mp-3597) - E(mp-3598) per atom against MP's (from the
formation energies in the CSV: same composition, so their difference is the energy difference).
Results (JSON + Markdown) are rewritten after every phase, so a partial run is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "gpaw_known_phases"
PHASES = [("mp-1342", "BaO"), ("mp-1025237", "Ba2RuO4"), ("mp-8909", "RuO2"), ("mp-3597", "BaRuO3"),
          ("mp-3598", "BaRuO3")]
LATTICE_CHECK = ("mp-1342", "mp-8909", "mp-1025237")
ORDERING = ("mp-3597", "mp-3598")
TOL = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("CGWGAN_SHARED") or ROOT.parent / "shared")
    p.add_argument("--csv", default=str(shared / "data" / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv"))
    p.add_argument("--preset", default="standard")
    p.add_argument("--only", default="", help="comma-separated material ids (default: all five)")
    p.add_argument("--runs-root", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=36000.0, help="seconds per phase")
    p.add_argument("--static-only", default="",
                   help="comma-separated material ids run as a static calculation at MP's relaxed cell (no "
                        "relaxation; for the BaRuO3 ordering when 20- and 30-atom relaxations do not fit)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the table from the run folders under --runs-root as they are (no folder is "
                        "written or run: a preset edited since keeps the results computed with the old one)")
    p.add_argument("--note", default="", help="a paragraph for the Markdown table (how the run went)")
    p.add_argument("--python", default="/usr/bin/python3")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def load_phases(csv: str, ids: list[str]) -> dict[str, dict]:
    import polars as pl
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    df = pl.read_csv(csv)
    out = {}
    for mid in ids:
        rows = df.filter(pl.col("material_id") == mid)
        if rows.height != 1:
            raise SystemExit(f"{csv}: {rows.height} rows for {mid}")
        r = rows.row(0, named=True)
        s = Structure.from_str(r["cif"], fmt="cif")
        prim = SpacegroupAnalyzer(s, symprec=0.01).find_primitive()
        out[mid] = {"formula": r["pretty_formula"], "structure": prim,
                    "mp_formation_energy_per_atom_ev": r["formation_energy_per_atom"],
                    "mp_e_above_hull_ev_per_atom": r["e_above_hull"]}
    return out


def _running_relaxation(folder: Path) -> dict | None:
    """A relaxation still running (or killed): its last written step from ``relax.traj``, reported
    as such (status ``running``), with the optimizer's fmax of that step from ``relax.log``."""
    from ase.io import read

    try:
        atoms = read(str(folder / "relax.traj"), index=-1)
    except Exception:  # noqa: BLE001 - an empty or half-written trajectory: nothing to report yet
        return None
    steps = [ln.split() for ln in (folder / "relax.log").read_text().splitlines() if ln.startswith(("BFGS", "FIRE"))]
    n = len(atoms)
    return {"status": "ok", "partial": True, "n_steps": len(steps) - 1, "relax_converged": False,
            "last_fmax": float(steps[-1][-1]) if steps else None,
            "energy_per_atom_ev": float(atoms.get_potential_energy()) / n,
            "final_structure": {"symbols": atoms.get_chemical_symbols(), "cell": atoms.cell.array.tolist(),
                                "scaled_positions": atoms.get_scaled_positions(wrap=False).tolist()},
            "wall_time_s": (folder / "relax.traj").stat().st_mtime - (folder / "settings.json").stat().st_mtime}


def summarise(phases: dict[str, dict], results: dict[str, dict], args: argparse.Namespace) -> dict:
    rows = []
    for mid, ph in phases.items():
        s = ph["structure"]
        res = results.get(mid) or {}
        row = {"material_id": mid, "formula": ph["formula"], "n_atoms": len(s),
               "mp_abc_a": [round(x, 4) for x in s.lattice.abc], "mp_volume_a3": round(s.volume, 3),
               "mp_formation_energy_per_atom_ev": ph["mp_formation_energy_per_atom_ev"],
               "status": res.get("state") or res.get("status") or "not run", "reason": res.get("reason", "")}
        if res.get("status") == "ok" and res.get("static_only"):  # MP's cell: an energy, no lattice check
            row.update(static_only=True, energy_per_atom_ev=res["energy_per_atom_ev"], n_relax_steps=0,
                       spinpol=res.get("spinpol"), magnetic_moment=res.get("magnetic_moment"),
                       wall_time_s=round(res.get("wall_time_s", 0), 1), status="ok (static at MP's cell)")
        elif res.get("status") == "ok":
            from lib.dft_gpaw import structure_from_cell

            relaxed = structure_from_cell(res["final_structure"])
            dev = [b / a - 1 for a, b in zip(s.lattice.abc, relaxed.lattice.abc, strict=True)]
            if res.get("partial"):
                row["status"] = f"relaxation unfinished (running or stopped): step {res['n_steps']}, fmax {res['last_fmax']} eV/Å"
            row.update(gpaw_abc_a=[round(x, 4) for x in relaxed.lattice.abc], gpaw_volume_a3=round(relaxed.volume, 3),
                       abc_deviation_pct=[round(100 * d, 2) for d in dev],
                       max_abs_deviation_pct=round(100 * max(abs(d) for d in dev), 2),
                       within_2pct=bool(max(abs(d) for d in dev) <= TOL),
                       energy_per_atom_ev=res["energy_per_atom_ev"], n_relax_steps=res.get("n_steps"),
                       relax_converged=res.get("relax_converged"), spinpol=res.get("spinpol"),
                       magnetic_moment=res.get("magnetic_moment"), wall_time_s=round(res.get("wall_time_s", 0), 1))
        rows.append(row)
    by_id = {r["material_id"]: r for r in rows}
    checks = {"lattice_within_2pct": {mid: by_id[mid].get("within_2pct") for mid in LATTICE_CHECK if mid in by_id}}
    a, b = ORDERING
    if a in by_id and b in by_id:
        mp_diff = by_id[a]["mp_formation_energy_per_atom_ev"] - by_id[b]["mp_formation_energy_per_atom_ev"]
        order = {"mp_delta_ev_per_atom": round(mp_diff, 5), "mp_lower": a if mp_diff < 0 else b}
        if "energy_per_atom_ev" in by_id[a] and "energy_per_atom_ev" in by_id[b]:
            g = by_id[a]["energy_per_atom_ev"] - by_id[b]["energy_per_atom_ev"]
            order.update(gpaw_cells="MP's relaxed cells (static)" if by_id[a].get("static_only")
                         and by_id[b].get("static_only") else "relaxed by GPAW (mixed when one is static)",
                         gpaw_delta_ev_per_atom=round(g, 5), gpaw_lower=a if g < 0 else b,
                         same_ordering=bool((g < 0) == (mp_diff < 0)))
        checks["baruo3_ordering"] = order
    return {"preset": args.preset, "threads": args.threads, "runs_root": args.runs_root, "note": args.note,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "phases": rows, "checks": checks}


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# GPAW `{report['preset']}` preset on the Ba-Ru-O known phases vs MP", "",
             f"Updated {report['updated_at']}; {report['threads']} thread(s); run folders in `{report['runs_root']}`.",
             "Primitive cells; relaxed lattice lengths compared axis by axis with MP's (tolerance 2 %).", "",
             *([report["note"], ""] if report.get("note") else []),
             "| material | formula | atoms | status | MP a, b, c (Å) | GPAW a, b, c (Å) | max dev. % | within 2 % | "
             "E/atom (eV, GPAW) | steps | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["phases"]:
        lines.append(f"| {r['material_id']} | {r['formula']} | {r['n_atoms']} | {r['status']} | "
                     f"{', '.join(f'{x:.3f}' for x in r['mp_abc_a'])} | "
                     f"{', '.join(f'{x:.3f}' for x in r.get('gpaw_abc_a', [])) or '-'} | "
                     f"{r.get('max_abs_deviation_pct', '-')} | {r.get('within_2pct', '-')} | "
                     f"{r.get('energy_per_atom_ev', '-') if 'energy_per_atom_ev' not in r else round(r['energy_per_atom_ev'], 4)} | "
                     f"{r.get('n_relax_steps', '-')} | {r.get('wall_time_s', '-')} |")
    o = report["checks"].get("baruo3_ordering")
    lines += ["", "## BaRuO3 ordering (mp-3597 vs mp-3598)", ""]
    if o:
        lines.append(f"MP: E(mp-3597) - E(mp-3598) = {o['mp_delta_ev_per_atom']} eV/atom (lower: {o['mp_lower']}).")
        if "gpaw_delta_ev_per_atom" in o:
            lines.append(f"GPAW ({o['gpaw_cells']}): {o['gpaw_delta_ev_per_atom']} eV/atom (lower: "
                         f"{o['gpaw_lower']}); same ordering: {o['same_ordering']}.")
        else:
            lines.append("GPAW: not finished yet.")
    failed = [r for r in report["phases"]
              if not r["status"].startswith(("ok", "relaxation unfinished")) and r["status"] != "not run"]
    if failed:
        lines += ["", "## Not ok", ""] + [f"- {r['material_id']}: {r['status']}: {r['reason']}" for r in failed]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from lib.dft_gpaw import run_gpaw, write_gpaw_run

    args = parse_args(argv)
    args.runs_root = args.runs_root or str(Path("/work/runs/gpaw_bench") / args.preset)
    ids = [x for x in args.only.split(",") if x] or [p[0] for p in PHASES]
    phases = load_phases(args.csv, ids)
    out = Path(args.out)
    results: dict[str, dict] = {}
    if args.report_only:
        from lib.dft_gpaw import read_settings, read_summary

        for mid in phases:
            folder = Path(args.runs_root) / mid
            res = read_summary(folder) if folder.is_dir() else None
            if res is None and (folder / "relax.traj").is_file():
                res = _running_relaxation(folder)
            if res is not None:
                settings = read_settings(folder)
                res["spinpol"] = settings["spinpol"]
                res["static_only"] = not settings["preset"]["relax"].get("enabled", True)
                results[mid] = res
        write_report(summarise(phases, results, args), out)
        return 0
    write_report(summarise(phases, results, args), out)
    for mid, ph in phases.items():
        folder = Path(args.runs_root) / mid
        folder.parent.mkdir(parents=True, exist_ok=True)
        static = mid in {x for x in args.static_only.split(",") if x}
        overrides = {"phonon": {"enabled": False}} | ({"relax": {"enabled": False}} if static else {})
        w = write_gpaw_run(ph["structure"], folder, preset=args.preset, overrides=overrides,
                           record={"material_id": mid, "chemical_system": "Ba-O-Ru", "benchmark": "gpaw_known_phases"})
        print(f"{time.strftime('%H:%M:%S')} {mid} {ph['formula']} ({len(ph['structure'])} atoms): folder {w['action']}, "
              f"k-points {w['settings']['kpts']['size']}, spin-polarised {w['settings']['spinpol']}", flush=True)
        t0 = time.time()
        try:
            res = run_gpaw(folder, python=args.python, num_threads=args.threads, timeout_s=args.timeout)
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            res = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        res["spinpol"] = w["settings"]["spinpol"]
        res["static_only"] = static
        results[mid] = res
        print(f"{time.strftime('%H:%M:%S')} {mid}: {res['status']} {res.get('reason', '')} "
              f"E/atom={res.get('energy_per_atom_ev')} in {time.time() - t0:.0f} s", flush=True)
        write_report(summarise(phases, results, args), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
