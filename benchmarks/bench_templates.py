"""Templates per second: WGAN sampling + decoding + filtering vs PyXtal's random symmetric generation.

    python benchmarks/bench_templates.py [--checkpoint DIR] [--n-samples 140000] [--n-pyxtal 300]

1. WGAN: sample ``n_samples`` vectors from a checkpoint, decode them (projection, orbit
   expansion, lattice constraints, rejections) and filter (1 Å minimum distance, density window,
   max atoms): the whole ``templates`` path without the symmetry check and writing, timed. The
   symmetry check is timed separately.
2. PyXtal: for a random subset of the valid WGAN templates (``n_pyxtal``), one
   ``pyxtal().from_random(3, sg, species, numIons)`` per template with the same space group and
   one species per ASU site whose count is that site's multiplicity (so the same site count and
   cell size), pyxtal's default distance tolerances. Successes per second of wall time are
   extrapolated from the subset (PyXtal is far too slow for 140,000 here).

Writes ``benchmarks/results/bench_templates.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib import gan  # noqa: E402
from lib.templates import TemplateFilters, check_symmetry, decode_templates  # noqa: E402


def newest_checkpoint() -> Path:
    home = Path(os.environ.get("CGWGAN_HOME") or ROOT / ".cgwgan")
    ckpts = sorted((home / "checkpoints").glob("ckpt-*/model.json"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise SystemExit(f"no checkpoint under {home / 'checkpoints'}; pass --checkpoint or materialise "
                         "wgan_checkpoint first")
    return ckpts[-1].parent


def bench_wgan(model, n: int, seed: int, filters: TemplateFilters) -> tuple[dict, object]:
    t0 = time.perf_counter()
    x = gan.sample_vectors(model, n, seed=seed)
    t1 = time.perf_counter()
    res = decode_templates(x, checkpoint_id=model.checkpoint_id, schema=model.schema, filters=filters)
    t2 = time.perf_counter()
    sym = check_symmetry(res.templates)
    t3 = time.perf_counter()
    out = {
        "n_samples": n, "n_valid": res.n_valid, "n_unique": res.templates.height,
        "validity": res.validity, "sample_s": t1 - t0, "decode_filter_s": t2 - t1,
        "total_s": t2 - t0, "raw_samples_per_s": n / (t2 - t0), "valid_templates_per_s": res.n_valid / (t2 - t0),
        "symmetry_check_s": t3 - t2, "symmetry_exactness": float(sym["is_symmetric"].mean()),
        "decode_timings_s": res.timings_s, "rejects": res.rejects,
    }
    return out, res


def bench_pyxtal(templates, n: int, seed: int, time_budget_s: float) -> dict:
    from pyxtal import pyxtal

    rng = np.random.default_rng(seed)
    idx = rng.choice(templates.height, size=min(n, templates.height), replace=False)
    sub = templates[idx.tolist()]
    species_pool = ["Si", "Ge", "Sn", "Pb"]
    ok = fail = 0
    t0 = time.perf_counter()
    tried = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in sub.iter_rows(named=True):
            if time.perf_counter() - t0 > time_budget_s:
                break
            tried += 1
            species = species_pool[: row["n_sites"]]
            try:
                c = pyxtal()
                c.from_random(3, row["spacegroup_number"], species, list(row["multiplicities"]))
                ok += int(bool(c.valid))
                fail += int(not c.valid)
            except Exception:  # noqa: BLE001 - pyxtal raises (various types) when it cannot place the ions
                fail += 1
    wall = time.perf_counter() - t0
    return {"n_tried": tried, "n_ok": ok, "n_failed": fail, "wall_s": wall,
            "seconds_per_attempt": wall / max(tried, 1), "valid_templates_per_s": ok / wall if wall else 0.0,
            "extrapolated_s_for_140000": 140_000 / (ok / wall) if ok else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--n-samples", type=int, default=140_000)
    ap.add_argument("--n-pyxtal", type=int, default=300)
    ap.add_argument("--pyxtal-budget-s", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    ckpt = args.checkpoint or newest_checkpoint()
    model = gan.load_checkpoint(ckpt, device="cpu")
    filters = TemplateFilters()
    wgan, res = bench_wgan(model, args.n_samples, args.seed, filters)
    print(json.dumps({k: v for k, v in wgan.items() if k not in ("decode_timings_s", "rejects")}, indent=1))
    pyx = bench_pyxtal(res.templates, args.n_pyxtal, args.seed, args.pyxtal_budget_s)
    print(json.dumps(pyx, indent=1))
    ratio = wgan["valid_templates_per_s"] / pyx["valid_templates_per_s"] if pyx["valid_templates_per_s"] else None
    result = {
        "benchmark": "bench_templates", "checkpoint_id": model.checkpoint_id, "checkpoint": str(ckpt),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "note": "2-core machine shared with six other engineers' jobs: timings are pessimistic"},
        "filters": filters.to_dict(), "wgan": wgan, "pyxtal": pyx, "speedup_valid_templates_per_s": ratio,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_templates.json").write_text(json.dumps(result, indent=1, default=float))
    md = [
        "# bench_templates", "",
        f"Checkpoint `{model.checkpoint_id}`; {result['machine']['note']}.", "",
        "| method | attempts | valid templates | wall s | valid templates / s |",
        "|---|---|---|---|---|",
        f"| WGAN sample + decode + filter | {wgan['n_samples']} | {wgan['n_valid']} | {wgan['total_s']:.1f} | "
        f"{wgan['valid_templates_per_s']:.0f} |",
        f"| PyXtal `from_random` (subset of {pyx['n_tried']}, same groups and site multiplicities) | "
        f"{pyx['n_tried']} | {pyx['n_ok']} | {pyx['wall_s']:.1f} | {pyx['valid_templates_per_s']:.1f} |",
        "",
        f"Speed-up (valid templates per second): **{ratio:.0f}x**." if ratio else "PyXtal produced nothing.",
        f"WGAN validity {wgan['validity']:.3f}; symmetry check of the {wgan['n_unique']} unique templates "
        f"{wgan['symmetry_check_s']:.1f} s, exactness {wgan['symmetry_exactness']:.4f}.",
        f"PyXtal for 140,000 templates, extrapolated: {pyx['extrapolated_s_for_140000'] / 3600:.1f} h.",
    ]
    (args.out / "bench_templates.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
