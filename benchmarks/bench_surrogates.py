"""Surrogate throughput: batched inference vs an ASE loop, lockstep vs one-at-a-time
relaxations, phonon screens, and (when Ray is importable) the pre-screen on 1 and 2 Ray actors.

For each surrogate (default: M3GNet-MP-2021.2.8-PES and CHGNet-0.3.0) on MP structures with
5-20 atoms (``--mp-file``, the MP-20 CSV layout):

- ``ase_loop``: the paper's way -- one ``Atoms`` at a time through the library's own ASE
  calculator (``get_potential_energy``; the calculators compute energy, forces and stress);
- ``batched_energy`` / ``batched_efs``: :meth:`Surrogate.predict` with ``energy_only=True``
  (no autograd) and with forces and stress, many structures per forward pass. The loop and
  the batched runs are timed in interleaved rounds so that on a shared machine they see the
  same background load;
- ``variants``: the same batched runs with this repository's speed-ups switched off, in
  interleaved rounds (M3GNet: the convolutions' first layer per bond as matgl computes it,
  ``_m3gnet_legacy.SPLIT_FIRST_LAYER = False``; CHGNet: ``CHGNet.predict_graph``'s two
  ``create_graph`` backward passes, ``single_backward = False``);
- ``relax``: FIRE + FrechetCellFilter (fmax 0.05 eV/Å, ``--relax-steps`` cap) of rattled and
  strained structures: :meth:`Surrogate.relax_many` (lockstep, one batched forward pass per
  step), :meth:`Surrogate.relax` one at a time, and ``legacy_relax`` (the code before issue 5:
  ASE's plain FrechetCellFilter, BLAS threads as the process has them) on a few of them;
- ``phonons``: :func:`lib.phonons.phonon_frame` (2x2x2 supercell, 8x8x8 mesh, band path) of
  relaxed structures: screens per hour;
- ``ray`` (CPU runs): batched energies on 1 and 2 local Ray actors (``lib.screening``), in a
  child process with a time limit; recorded as skipped where ``ray`` is not importable.

The script imports numpy, polars, torch, pymatgen, ase, phonopy, matgl/chgnet and ``lib``
modules only (no dagster, no duckdb), so it runs on a machine that has just those.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/bench_surrogates``)::

    python benchmarks/bench_surrogates.py                          # CPU, shared folder ../shared
    python benchmarks/bench_surrogates.py --quick --out /tmp/bench  # a smoke run
    python benchmarks/bench_surrogates.py --device cuda --threads 4 --out results/bench_surrogates_gpu
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

from lib.surrogates import load_surrogate, set_torch_threads  # noqa: E402

QUICK = {"n_structures": 48, "n_baseline": 16, "rounds": 2, "n_relax": 8, "n_relax_single": 4,
         "n_relax_legacy": 1, "relax_steps": 60, "n_phonon": 1}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Clock:
    """Wall and process-CPU seconds of a block (CPU seconds: the work done, less sensitive
    to other jobs on a shared machine; meaningless for GPU work)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        _sync(self.device)
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def load_structures(mp_file: Path, *, n: int, min_atoms: int, max_atoms: int, seed: int,
                    elements: frozenset[str]) -> list:
    import warnings

    from pymatgen.core import Structure

    df = pl.read_csv(mp_file, columns=["material_id", "cif", "nsites"])
    df = df.filter(pl.col("nsites").is_between(min_atoms, max_atoms)).sample(
        n=min(len(df), 3 * n), seed=seed
    )
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CIF rounding notes
        for cif in df["cif"]:
            s = Structure.from_str(cif, fmt="cif")
            if {e.symbol for e in s.composition.elements} <= elements:
                out.append(s)
            if len(out) == n:
                break
    return out


def perturbed(structures: list, *, rattle_a: float, strain: float, seed: int) -> list:
    """Rattled positions (normal, ``rattle_a`` Å) in a randomly strained cell (uniform ±``strain``)."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    out = []
    for s in structures:
        eps = rng.uniform(-strain, strain, (3, 3))
        lat = Lattice(s.lattice.matrix @ (np.eye(3) + (eps + eps.T) / 2))
        cart = s.frac_coords @ lat.matrix + rng.normal(0, rattle_a, (len(s), 3))
        out.append(Structure(lat, s.species, cart, coords_are_cartesian=True, to_unit_cell=True))
    return out


def legacy_relax(sur, structure, *, fmax: float, steps: int):
    """``Surrogate.relax`` as it was before issue 5: ASE's FrechetCellFilter (nine
    ``expm_frechet`` per force call, three calls a step) with BLAS threads left as they are."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = sur.calculator()
    atoms.get_potential_energy()
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    return converged, int(opt.nsteps), float(atoms.get_potential_energy())


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_throughput(sur, structures: list, args: argparse.Namespace) -> dict:
    from lib.surrogates import _m3gnet_legacy

    res: dict = {}
    calc = sur.calculator()
    n_rounds = max(1, args.rounds)
    chunks = np.array_split(np.arange(len(structures)), n_rounds)
    n_loop_round = max(1, args.n_baseline // n_rounds)
    clocks = {k: Clock(args.device) for k in ("loop", "energy", "efs", "energy_off", "efs_off")}
    n_loop = 0
    e_loop: dict[int, float] = {}
    store: dict[str, dict[int, object]] = {"energy": {}, "efs": {}, "energy_off": {}, "efs_off": {}}

    def switch(on: bool) -> None:
        if sur.kind == "m3gnet":
            _m3gnet_legacy.SPLIT_FIRST_LAYER = on
        else:
            sur.single_backward = on

    try:
        for chunk in chunks:
            chunk_structs = [structures[i] for i in chunk]
            with clocks["loop"]:
                for i in chunk[:n_loop_round]:
                    atoms = structures[i].to_ase_atoms()
                    atoms.calc = calc
                    e_loop[int(i)] = float(atoms.get_potential_energy())
            n_loop += min(n_loop_round, len(chunk))
            for key, energy_only, bs, on in (
                ("energy", True, args.batch_size_energy, True), ("efs", False, args.batch_size_efs, True),
                ("energy_off", True, args.batch_size_energy, False), ("efs_off", False, args.batch_size_efs, False),
            ):
                if not on and not args.variants:
                    continue
                if sur.kind == "chgnet" and key == "energy_off":
                    continue  # energies do not go through the backward pass
                switch(on)
                with clocks[key]:
                    out = sur.predict_safe(chunk_structs, batch_size=bs, energy_only=energy_only)
                store[key].update({int(i): p for i, p in zip(chunk, out, strict=True)})
    finally:
        switch(True)
    n = len(structures)
    loop = clocks["loop"]
    res["ase_loop"] = {"n": n_loop, "seconds": loop.wall, "cpu_seconds": loop.cpu,
                       "structures_per_s": _rate(n_loop, loop.wall),
                       "structures_per_cpu_s": _rate(n_loop, loop.cpu)}
    for key, bs in (("energy", args.batch_size_energy), ("efs", args.batch_size_efs)):
        c = clocks[key]
        preds = store[key]
        diffs = [abs(preds[i].energy_ev - e) / preds[i].n_atoms for i, e in e_loop.items()]
        res["batched_" + key] = {
            "n": n, "n_ok": sum(p.ok for p in preds.values()), "batch_size": bs,
            "seconds": c.wall, "cpu_seconds": c.cpu,
            "structures_per_s": _rate(n, c.wall), "structures_per_cpu_s": _rate(n, c.cpu),
            "speedup_vs_ase_loop": _rate(n, c.wall) / res["ase_loop"]["structures_per_s"],
            "speedup_vs_ase_loop_cpu": _rate(n, c.cpu) / res["ase_loop"]["structures_per_cpu_s"],
            "max_abs_diff_vs_ase_loop_ev_per_atom": float(np.nanmax(diffs)),
        }
    if args.variants:
        name = "split_first_layer" if sur.kind == "m3gnet" else "single_backward"
        var: dict = {"switch": name}
        for key in ("energy", "efs"):
            off = clocks[key + "_off"]
            if not store[key + "_off"]:
                continue
            on = clocks[key]
            diffs = [abs(store[key][i].energy_ev - p.energy_ev) / p.n_atoms for i, p in store[key + "_off"].items()]
            var[key] = {"off_structures_per_s": _rate(n, off.wall), "on_structures_per_s": _rate(n, on.wall),
                        "off_structures_per_cpu_s": _rate(n, off.cpu), "on_structures_per_cpu_s": _rate(n, on.cpu),
                        "speedup_cpu": off.cpu / on.cpu if on.cpu > 0 else float("nan"),
                        "max_abs_diff_ev_per_atom": float(np.nanmax(diffs))}
            if key == "efs":
                var[key]["max_abs_diff_forces_ev_per_a"] = float(np.nanmax([
                    np.abs(store[key][i].forces_ev_per_a - p.forces_ev_per_a).max()
                    for i, p in store[key + "_off"].items() if p.ok]))
        res["variants"] = var
    return res


def bench_relax(sur, structures: list, args: argparse.Namespace) -> tuple[dict, list]:
    relax_set = perturbed(structures[: args.n_relax], rattle_a=args.rattle, strain=args.strain, seed=args.seed)
    out: dict = {"n": len(relax_set), "step_cap": args.relax_steps, "fmax_ev_per_a": 0.05,
                 "rattle_a": args.rattle, "strain": args.strain, "batch_size": args.relax_batch_size}
    with Clock(args.device) as c:
        many = sur.relax_many(relax_set, fmax=0.05, steps=args.relax_steps, batch_size=args.relax_batch_size)
    steps = sum(r.steps for r in many if r.ok)
    out["relax_many"] = {
        "n": len(many), "n_ok": sum(r.ok for r in many), "seconds": c.wall, "cpu_seconds": c.cpu,
        "relaxations_per_min": 60 * _rate(len(many), c.wall),
        "fraction_converged": float(np.mean([r.is_converged for r in many])),
        "mean_steps": float(np.mean([r.steps for r in many])),
        "structure_steps_per_s": _rate(steps, c.wall), **sur.last_relax_stats,
    }
    k = min(args.n_relax_single, len(relax_set))
    singles = []
    with Clock(args.device) as c1:
        for s in relax_set[:k]:
            singles.append(sur.relax(s, fmax=0.05, steps=args.relax_steps))
    ssteps = sum(r.steps for r in singles)
    same = [(a, b) for a, b in zip(many[:k], singles, strict=True) if a.ok]
    out["one_at_a_time"] = {
        "n": k, "seconds": c1.wall, "cpu_seconds": c1.cpu,
        "relaxations_per_min": 60 * _rate(k, c1.wall),
        "mean_steps": float(np.mean([r.steps for r in singles])) if singles else float("nan"),
        "structure_steps_per_s": _rate(ssteps, c1.wall),
        "same_steps_as_relax_many": int(sum(a.steps == b.steps for a, b in same)),
        "max_abs_diff_vs_relax_many_ev_per_atom": float(max(
            (abs(a.energy_ev - b.energy_ev) / len(b.structure) for a, b in same), default=float("nan"))),
    }
    kl = min(args.n_relax_legacy, len(relax_set))
    if kl:
        legacy = []
        with Clock(args.device) as c2:
            for s in relax_set[:kl]:
                legacy.append(legacy_relax(sur, s, fmax=0.05, steps=args.relax_steps))
        lsteps = sum(r[1] for r in legacy)
        out["legacy_one_at_a_time"] = {
            "n": kl, "seconds": c2.wall, "cpu_seconds": c2.cpu,
            "relaxations_per_min": 60 * _rate(kl, c2.wall),
            "mean_steps": float(np.mean([r[1] for r in legacy])),
            "structure_steps_per_s": _rate(lsteps, c2.wall),
            "same_steps_as_relax": int(sum(r[1] == s.steps for r, s in zip(legacy, singles, strict=False))),
        }
    out["speedup_relax_many_vs_one_at_a_time_steps"] = (
        out["relax_many"]["structure_steps_per_s"] / out["one_at_a_time"]["structure_steps_per_s"])
    return out, many


def bench_phonons(sur, relaxed: list, args: argparse.Namespace) -> dict:
    from lib.cells import structure_to_cell
    from lib.phonons import phonon_frame

    ok = [r.structure for r in relaxed if r.ok][: args.n_phonon]
    if not ok:
        return {"status": "skipped", "reason": "no relaxed structure"}
    frame = pl.DataFrame([{"candidate_id": f"ph-{i}", **structure_to_cell(s)} for i, s in enumerate(ok)])
    with Clock(args.device) as c:
        ph = phonon_frame(sur, frame, batch_size=args.phonon_batch_size)
    good = ph.filter(pl.col("status") == "ok")
    return {"status": "ok", "n": ph.height, "n_ok": good.height, "seconds": c.wall, "cpu_seconds": c.cpu,
            "screens_per_hour": 3600 * _rate(ph.height, c.wall),
            "mean_atoms": float(np.mean([len(s) for s in ok])),
            "mean_displacements": float(good["n_displacements"].mean() or 0),
            "mean_supercell_atoms": float(good["n_supercell_atoms"].mean() or 0),
            "batch_size": args.phonon_batch_size}


# ----------------------------------------------------------------------------------- Ray part
def ray_part(args: argparse.Namespace) -> dict:
    """Batched energies (the pre-screen) on 1 and 2 local Ray actors, after their model loads."""
    import ray

    from lib import screening as scr
    from lib.cells import structure_to_cell

    sur_name = args.surrogates[0]
    structures = load_structures(Path(args.mp_file), n=args.n_structures, min_atoms=args.min_atoms,
                                 max_atoms=args.max_atoms, seed=args.seed,
                                 elements=load_surrogate(sur_name, models_dir=args.models_dir).supported_elements)
    frame = pl.DataFrame([{"candidate_id": f"bench-{i:04d}", **structure_to_cell(s)}
                          for i, s in enumerate(structures)])
    out: dict = {"surrogate": sur_name, "n": len(structures)}
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        for k in (1, 2):
            pool = scr.SurrogatePool(sur_name, num_actors=k, load_kwargs={"models_dir": args.models_dir})
            pool.info()  # wait for the model loads
            plan = scr.plan_batches(frame, rows_per_batch=max(1, len(structures) // (2 * k)),
                                    salt={"bench": time.time()})
            res, stats = scr.run_batches(plan, pool.compute("prescreen", batch_size=args.batch_size_energy),
                                         work_dir=None)
            out[f"workers_{k}_structures_per_s"] = res.height / stats.seconds
            pool.shutdown()
    finally:
        ray.shutdown()
    return out


def ray_timings(args: argparse.Namespace, argv: list[str], *, attempts: int = 2, timeout_s: int = 900) -> dict:
    """:func:`ray_part` in a child process with a time limit (a local Ray on a shared machine can
    be stopped from outside, which leaves a driver hanging); skipped when Ray is unusable."""
    if args.no_ray:
        return {"status": "skipped", "reason": "--no-ray"}
    if args.device != "cpu":
        return {"status": "skipped", "reason": "Ray part measures CPU actors only"}
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped", "reason": f"ray not importable ({exc})"}
    from benchmarks._child import run_json_child

    load_before = list(os.getloadavg())
    out, n = run_json_child([sys.executable, __file__, *argv, "--ray-part"], attempts=attempts, timeout_s=timeout_s)
    if out is None:
        return {"status": "failed", "attempts": n}
    return {"status": "ok", **out, "attempts": n,
            "load_average_before": load_before, "load_average_after": list(os.getloadavg())}


# ----------------------------------------------------------------------------------- report
def machine_info(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": device, "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None or not np.isfinite(x) else format(x, fmt)


def estimate_run(r: dict, *, n_prescreen: int = 50_000, n_relax: int = 2_000, n_phonon: int = 50) -> dict:
    """Hours for a reduced Ba-Ru-O run from this surrogate's measured rates (one process)."""
    e_rate = r["batched_energy"]["structures_per_s"]
    relax_rate = r["relax"]["relax_many"]["relaxations_per_min"]
    ph = r.get("phonons", {})
    ph_rate = ph.get("screens_per_hour") if ph.get("status") == "ok" else None
    out = {"n_prescreen": n_prescreen, "n_relax": n_relax, "n_phonon": n_phonon,
           "prescreen_h": n_prescreen / e_rate / 3600,
           "relax_h": n_relax / relax_rate / 60,
           "relax_one_at_a_time_h": n_relax / r["relax"]["one_at_a_time"]["relaxations_per_min"] / 60,
           "phonons_h": n_phonon / ph_rate if ph_rate else float("nan")}
    out["total_h"] = out["prescreen_h"] + out["relax_h"] + (out["phonons_h"] if ph_rate else 0.0)
    return out


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    la0, la1 = m.get("load_average_at_start"), m.get("load_average_at_end")
    lines = [
        "# Surrogate throughput",
        "",
        f"{result['created_at']} · device `{m['device']}`" + (f" ({m['gpu']})" if "gpu" in m else "")
        + f" · {m['cpu_count']} CPU cores, torch threads {m['torch_threads']} · {result['n_structures']} MP "
        f"structures with {result['atoms_range'][0]}-{result['atoms_range'][1]} atoms (mean "
        f"{result['mean_atoms']:.1f}) · load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in la0) if la0 else '?'}, at end "
        f"{'/'.join(f'{x:.1f}' for x in la1) if la1 else '?'} · {result['note']}",
        "",
        "## Single points",
        "",
        "| surrogate | ASE loop (structures/s) | batched energies (structures/s) | speed-up | "
        "batched E+F+S (structures/s) | speed-up | speed-up, CPU time (E / E+F+S) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["surrogates"]:
        be, bf = r["batched_energy"], r["batched_efs"]
        lines.append(
            f"| {r['surrogate']} | {_f(r['ase_loop']['structures_per_s'])} | {_f(be['structures_per_s'])} | "
            f"{_f(be['speedup_vs_ase_loop'])}× | {_f(bf['structures_per_s'])} | {_f(bf['speedup_vs_ase_loop'])}× | "
            f"{_f(be['speedup_vs_ase_loop_cpu'])}× / {_f(bf['speedup_vs_ase_loop_cpu'])}× |")
    if any("variants" in r for r in result["surrogates"]):
        lines += ["", "Speed-ups of this repository's batch path, measured against the switched-off path in "
                  "interleaved rounds of the same run (CPU-time rates, structures/s):", "",
                  "| surrogate | switch | energies off → on | E+F+S off → on | max |ΔE| (eV/atom) | max |ΔF| (eV/Å) |",
                  "|---|---|---|---|---|---|"]
        for r in result["surrogates"]:
            v = r.get("variants")
            if not v:
                continue
            e, f = v.get("energy"), v.get("efs", {})
            e_txt = (f"{_f(e['off_structures_per_cpu_s'])} → {_f(e['on_structures_per_cpu_s'])} "
                     f"({_f(e['speedup_cpu'], '.2f')}×)") if e else "same path"
            lines.append(
                f"| {r['surrogate']} | `{v['switch']}` | {e_txt} | "
                f"{_f(f.get('off_structures_per_cpu_s'))} → {_f(f.get('on_structures_per_cpu_s'))} "
                f"({_f(f.get('speedup_cpu'), '.2f')}×) | "
                f"{_f(max(x.get('max_abs_diff_ev_per_atom', 0) for x in (e or {}, f)), '.1e')} | "
                f"{_f(f.get('max_abs_diff_forces_ev_per_a'), '.1e')} |")
    lines += ["", "## Relaxations", "",
              "FIRE + FrechetCellFilter, fmax 0.05 eV/Å, rattled and strained MP structures "
              "(see `relax` in the JSON for the settings).", "",
              "| surrogate | relax_many (relax./min) | one at a time (relax./min) | before issue 5 (relax./min) | "
              "structure-steps/s: many / one / before | … per CPU-second | converged | mean steps | "
              "same steps as `relax` |",
              "|---|---|---|---|---|---|---|---|---|"]

    def per_cpu(x: dict) -> float:
        steps = x.get("mean_steps", float("nan")) * x.get("n", 0)
        return _rate(steps, x.get("cpu_seconds", 0.0))

    for r in result["surrogates"]:
        x = r["relax"]
        mny, one, leg = x["relax_many"], x["one_at_a_time"], x.get("legacy_one_at_a_time", {})
        lines.append(
            f"| {r['surrogate']} | {_f(mny['relaxations_per_min'])} (n={mny['n']}, batch {x['batch_size']}) | "
            f"{_f(one['relaxations_per_min'])} (n={one['n']}) | {_f(leg.get('relaxations_per_min'))} "
            f"(n={leg.get('n', 0)}) | {_f(mny['structure_steps_per_s'])} / {_f(one['structure_steps_per_s'])} / "
            f"{_f(leg.get('structure_steps_per_s'))} | {_f(per_cpu(mny))} / {_f(per_cpu(one))} / "
            f"{_f(per_cpu(leg) if leg else None)} | {mny['fraction_converged']:.0%} (cap {x['step_cap']}) | "
            f"{mny['mean_steps']:.0f} | {one['same_steps_as_relax_many']}/{one['n']} |")
    lines += ["", "## Phonon screens", "", "| surrogate | screens/hour | n | mean displacements | mean supercell atoms |",
              "|---|---|---|---|---|"]
    for r in result["surrogates"]:
        ph = r.get("phonons", {})
        if ph.get("status") == "ok":
            lines.append(f"| {r['surrogate']} | {_f(ph['screens_per_hour'], '.0f')} | {ph['n']} | "
                         f"{ph['mean_displacements']:.1f} | {ph['mean_supercell_atoms']:.0f} |")
        else:
            lines.append(f"| {r['surrogate']} | skipped ({ph.get('reason', '?')}) | | | |")
    ray = result.get("ray", {})
    lines += ["", "## Ray", ""]
    if ray.get("status") == "ok":
        la = ray.get("load_average_before") or m.get("load_average_at_end")
        lines.append(f"Batched energies of {ray['surrogate']} on local Ray actors: 1 worker "
                     f"{ray['workers_1_structures_per_s']:.1f} structures/s, 2 workers "
                     f"{ray['workers_2_structures_per_s']:.1f} structures/s (run last; load average "
                     f"{'/'.join(f'{x:.1f}' for x in la) if la else '?'} "
                     f"{'before' if ray.get('load_average_before') else 'at the end of'} it, so not "
                     "comparable with the single-process rates above).")
    else:
        lines.append(f"{ray.get('status', 'skipped')}: {ray.get('reason', '')}")
    lines += ["", "## Reduced Ba–Ru–O run, estimated from these rates (one process)", "",
              "| surrogate | 50,000 pre-screens (h) | 2,000 relaxations, relax_many (h) | "
              "… one at a time (h) | 50 phonon screens (h) | total (h) |", "|---|---|---|---|---|---|"]
    for r in result["surrogates"]:
        est = r["estimate_reduced_run"]
        lines.append(f"| {r['surrogate']} | {_f(est['prescreen_h'], '.2f')} | {_f(est['relax_h'], '.2f')} | "
                     f"{_f(est['relax_one_at_a_time_h'], '.2f')} | {_f(est['phonons_h'], '.2f')} | "
                     f"{_f(est['total_h'], '.2f')} |")
    lines += ["", "Relaxation time scales with the steps a structure needs: the estimate uses the mean steps of "
              "the perturbed MP structures above; generated candidates may need more (the cap is "
              f"{result['surrogates'][0]['relax']['step_cap']} steps here, 300 in the pipeline)."]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shared = Path(os.environ.get("CGWGAN_SHARED") or REPO.parent / "shared")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--surrogates", nargs="+", default=["M3GNet-MP-2021.2.8-PES", "CHGNet-0.3.0"])
    p.add_argument("--models-dir", default=os.environ.get("CGWGAN_M3GNET_DIR") or str(shared / "models"))
    p.add_argument("--mp-file", default=str(shared / "data" / "mp" / "mp_structures.csv.gz"))
    p.add_argument("--quick", action="store_true", help=f"a small run: {QUICK}")
    p.add_argument("--n-structures", type=int, default=300)
    p.add_argument("--n-baseline", type=int, default=100,
                   help="structures in the one-at-a-time ASE loop (a prefix of the batched set)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (ASE loop, batched) timing")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help="skip the switched-off timings of the batch path's speed-ups")
    p.add_argument("--n-relax", type=int, default=32, help="structures relaxed with relax_many")
    p.add_argument("--n-relax-single", type=int, default=8, help="of those, relaxed one at a time with relax")
    p.add_argument("--n-relax-legacy", type=int, default=2, help="of those, relaxed with the pre-issue-5 code")
    p.add_argument("--relax-steps", type=int, default=150)
    p.add_argument("--relax-batch-size", type=int, default=32)
    p.add_argument("--rattle", type=float, default=0.05, help="Å, normal")
    p.add_argument("--strain", type=float, default=0.02, help="uniform ± on the cell")
    p.add_argument("--n-phonon", type=int, default=4)
    p.add_argument("--phonon-batch-size", type=int, default=16)
    p.add_argument("--min-atoms", type=int, default=5)
    p.add_argument("--max-atoms", type=int, default=20)
    p.add_argument("--batch-size-energy", type=int, default=32)
    p.add_argument("--batch-size-efs", type=int, default=16)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: 1 on a CPU run -- the machine is assumed shared --, "
                        "torch's default on a GPU run)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray 1-vs-2-actor part")
    p.add_argument("--ray-part", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--markdown-from", default="", metavar="JSON",
                   help="only write <out>.md from an earlier run's JSON (no measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="shared 2-core machine: numbers are pessimistic")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_surrogates"),
                   help="results path prefix: writes <out>.json and <out>.md")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in (argv if argv is not None else sys.argv[1:]):
                setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> dict:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.markdown_from:
        result = json.loads(Path(args.markdown_from).read_text())
        write_markdown(result, Path(f"{args.out}.md"))
        print(Path(f"{args.out}.md").read_text())
        return result
    import torch

    if args.threads:
        set_torch_threads(args.threads)
    elif args.device == "cpu":
        set_torch_threads(1)
    if args.ray_part:
        print("RAYJSON " + json.dumps(ray_part(args)), flush=True)
        return {}

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
        "args": {k: v for k, v in vars(args).items() if k not in ("ray_part", "markdown_from")},
        "n_structures": len(structures),
        "atoms_range": [args.min_atoms, args.max_atoms],
        "mean_atoms": float(np.mean([len(s) for s in structures])),
        "note": args.note,
        "surrogates": [],
    }
    for sur, load_s in surrogates:
        r: dict = {"surrogate": sur.name, "surrogate_id": sur.surrogate_id, "convention": sur.convention,
                   "library": sur.library_version, "load_s": round(load_s, 2), "torch_threads": torch.get_num_threads()}
        sur.predict(structures[:4], batch_size=4)  # warm-up (first-call allocations, lazy imports)
        sur.predict(structures[:4], batch_size=4, energy_only=True)
        r["load_average_before"] = list(os.getloadavg())
        r.update(bench_throughput(sur, structures, args))
        r["relax"], relaxed = bench_relax(sur, structures, args)
        r["phonons"] = bench_phonons(sur, relaxed, args)
        r["load_average_after"] = list(os.getloadavg())
        r["estimate_reduced_run"] = estimate_run(r)
        print(json.dumps(r, indent=1, default=str), flush=True)
        result["surrogates"].append(r)
    result["ray"] = ray_timings(args, raw_argv)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=str))
    write_markdown(result, Path(f"{out}.md"))
    print(Path(f"{out}.md").read_text())
    return result


if __name__ == "__main__":
    main()
