"""Share of generated templates usable for a target formula, without and with stoichiometry
conditioning (``lib.stoichiometry``).

    python benchmarks/bench_stoichiometry.py --checkpoint DIR [--n-samples 20000]
        [--formulas Ba2RuO4,BaRuO3,BaRu2O6] [--seed 0] [--max-z 4] [--out benchmarks/results]

For each formula, on ``n_samples`` raw generator samples each:

* **unconditioned**: ``lib.gan.sample_vectors`` (training prior over space groups), decoded by
  ``lib.templates.decode_templates`` with the default filters;
* **conditioned**: ``lib.stoichiometry.sample_for_formula`` (prior restricted to the groups that
  can host the formula, then the generator's best-scoring feasible Wyckoff letters);
* **conditioned, geometry-aware**: the same with ``filters``: the best-scoring of the
  ``--max-tries`` best feasible configurations whose decoding passes the geometric filters;
* **post hoc**: ``lib.stoichiometry.condition_on_formula`` applied to the unconditioned vectors
  (the group is replaced when it cannot host the formula).

Reported per variant: validity (valid / raw samples), distinct templates, the share of distinct
templates usable for the formula (``usable_for_formula``: its sites can be split into element
groups with multiplicity sums Z x the reduced counts), usable templates per raw sample, distinct
usable Wyckoff sequences, the symmetry exactness of the usable templates
(``lib.templates.check_symmetry``) and the wall times. Writes ``bench_stoichiometry.json`` and
``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib import gan  # noqa: E402
from lib.stoichiometry import (  # noqa: E402
    condition_on_formula_with_stats,
    feasible_spacegroups,
    formula_counts,
    sample_for_formula,
    usable_for_formula,
)
from lib.templates import DecodeResult, TemplateFilters, check_symmetry, decode_templates  # noqa: E402


def _variant(res: DecodeResult, formula: str, max_z: int | None, *, seconds: dict[str, float]) -> dict[str, Any]:
    tpl = res.templates
    usable = usable_for_formula(tpl, formula, max_z=max_z) if tpl.height else pl.Series([], dtype=pl.Boolean)
    good = tpl.filter(usable) if tpl.height else tpl
    t = time.perf_counter()
    sym = check_symmetry(good)
    seconds = {**seconds, "symmetry_check_s": time.perf_counter() - t}
    seqs = good.select(pl.concat_str([pl.col("spacegroup_number").cast(pl.String),
                                      pl.col("wyckoff_letters").list.sort().list.join(" ")], separator=" "))
    return {
        "n_samples": res.n_samples, "n_valid": res.n_valid, "validity": res.validity,
        "n_templates": tpl.height, "n_usable": int(usable.sum()),
        "usable_share": float(usable.mean()) if tpl.height else 0.0,  # type: ignore[arg-type]
        "usable_per_raw_sample": int(usable.sum()) / res.n_samples,
        "n_usable_wyckoff_sequences": seqs.n_unique(),
        "n_usable_spacegroups": good["spacegroup_number"].n_unique(),
        "symmetry_exactness_usable": float(sym["is_symmetric"].mean()) if sym.height else None,  # type: ignore[arg-type]
        "rejects": res.rejects, "seconds": seconds,
    }


def run(model: gan.WganModel, formulas: list[str], n: int, seed: int, max_z: int | None,
        filters: TemplateFilters, max_tries: int) -> dict[str, Any]:
    t = time.perf_counter()
    x = gan.sample_vectors(model, n, seed=seed)
    sample_s = time.perf_counter() - t
    t = time.perf_counter()
    raw = decode_templates(x, checkpoint_id=model.checkpoint_id, schema=model.schema, filters=filters)
    decode_raw_s = time.perf_counter() - t
    out: dict[str, Any] = {}
    for formula in formulas:
        t = time.perf_counter()
        feas = feasible_spacegroups(formula, model.schema.max_sites, filters.max_atoms, max_z)
        feasible_s = time.perf_counter() - t
        row: dict[str, Any] = {"counts": formula_counts(formula), "n_feasible_spacegroups": int(feas.size),
                               "feasible_spacegroups_s": feasible_s,
                               "training_prior_mass_on_feasible": float(model.spacegroup_prior[feas - 1].sum()
                                                                        / model.spacegroup_prior.sum())}
        row["unconditioned"] = _variant(raw, formula, max_z, seconds={"sample_s": sample_s, "decode_s": decode_raw_s})
        t = time.perf_counter()
        xc, st = sample_for_formula(model, n, seed=seed, formula=formula, max_atoms=filters.max_atoms, max_z=max_z)
        cond_s = time.perf_counter() - t
        t = time.perf_counter()
        rc = decode_templates(xc, checkpoint_id=model.checkpoint_id, schema=model.schema, filters=filters)
        row["conditioned"] = _variant(rc, formula, max_z, seconds={"sample_and_condition_s": cond_s,
                                                                   "condition_s": st.seconds,
                                                                   "decode_s": time.perf_counter() - t})
        row["conditioned"]["stats"] = {k: v for k, v in st.to_dict().items() if k != "n_configurations"}
        row["conditioned"]["stats"]["n_configurations_total"] = int(sum(st.n_configurations.values()))
        t = time.perf_counter()
        xg, sg_ = sample_for_formula(model, n, seed=seed, formula=formula, max_atoms=filters.max_atoms, max_z=max_z,
                                     filters=filters, max_tries=max_tries)
        cond_s = time.perf_counter() - t
        t = time.perf_counter()
        rg = decode_templates(xg, checkpoint_id=model.checkpoint_id, schema=model.schema, filters=filters)
        row["conditioned_geometry"] = _variant(rg, formula, max_z, seconds={"sample_and_condition_s": cond_s,
                                                                            "condition_s": sg_.seconds,
                                                                            "decode_s": time.perf_counter() - t})
        row["conditioned_geometry"]["stats"] = {k: v for k, v in sg_.to_dict().items() if k != "n_configurations"}
        t = time.perf_counter()
        xp, sp = condition_on_formula_with_stats(x, formula=formula, schema=model.schema, max_atoms=filters.max_atoms,
                                                 max_z=max_z, spacegroup_prior=model.spacegroup_prior)
        cond_p = time.perf_counter() - t
        t = time.perf_counter()
        rp = decode_templates(xp, checkpoint_id=model.checkpoint_id, schema=model.schema, filters=filters)
        row["post_hoc"] = _variant(rp, formula, max_z, seconds={"condition_s": cond_p,
                                                                "decode_s": time.perf_counter() - t})
        row["post_hoc"]["stats"] = {k: v for k, v in sp.to_dict().items() if k != "n_configurations"}
        out[formula] = row
        u, c, g = row["unconditioned"], row["conditioned"], row["conditioned_geometry"]
        print(f"{formula}: usable share {u['usable_share']:.4f} -> {c['usable_share']:.4f}; validity "
              f"{u['validity']:.3f} -> {c['validity']:.3f} (geometry-aware {g['validity']:.3f}); usable per raw "
              f"sample {u['usable_per_raw_sample']:.4f} -> {c['usable_per_raw_sample']:.4f} "
              f"({g['usable_per_raw_sample']:.4f})", flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    md = [
        "# bench_stoichiometry", "",
        f"Checkpoint `{result['checkpoint_id']}` ({result['checkpoint']}), {result['n_samples']} raw samples per "
        f"variant, seed {result['seed']}, Z <= {result['max_z']}, default filters; {result['machine']['note']}.", "",
        "Usable: the template's sites can be split into one group per element with multiplicity sums Z x the "
        "reduced counts (`lib.stoichiometry.usable_for_formula`). Shares are over distinct valid templates; "
        "'per raw sample' = usable templates / raw samples. Conditioned = `sample_for_formula` (prior restricted "
        "to feasible groups + best-scoring feasible letters); conditioned_geometry = the same with `filters` "
        f"(the best-scoring of the {result['max_tries']} best configurations that passes the decoder's geometric "
        "filters); post hoc = `condition_on_formula` (best-scoring) on the unconditioned vectors.", "",
        "| formula | variant | validity | templates | usable share | usable / raw sample | usable Wyckoff "
        "sequences | usable groups | symmetry exactness | condition s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f, row in result["formulas"].items():
        for name in ("unconditioned", "conditioned", "conditioned_geometry", "post_hoc"):
            v = row[name]
            sym = v["symmetry_exactness_usable"]
            cs = v["seconds"].get("condition_s")
            md.append(f"| {f} | {name} | {v['validity']:.3f} | {v['n_templates']} | {v['usable_share']:.4f} | "
                      f"{v['usable_per_raw_sample']:.4f} | {v['n_usable_wyckoff_sequences']} | "
                      f"{v['n_usable_spacegroups']} | {'-' if sym is None else f'{sym:.4f}'} | "
                      f"{'-' if cs is None else f'{cs:.2f}'} |")
    md.append("")
    for f, row in result["formulas"].items():
        st = row["conditioned"]["stats"]
        md.append(f"- {f}: {row['n_feasible_spacegroups']} feasible space groups (training prior mass on them "
                  f"{row['training_prior_mass_on_feasible']:.3f}); conditioning changed {st['n_samples_changed']} of "
                  f"{st['n_samples']} samples ({st['n_letters_changed']} letters changed, {st['n_sites_added']} sites "
                  f"added, {st['n_sites_removed']} removed; {st['n_configurations_total']} configurations scored); "
                  f"post hoc replaced the group of {row['post_hoc']['stats']['n_spacegroup_replaced']} samples; "
                  f"geometry-aware: rank of the chosen configuration {row['conditioned_geometry']['stats']['rank_chosen']}"
                  f", {row['conditioned_geometry']['stats']['n_geometry_failed']} samples with none passing.")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a WGAN checkpoint folder (model.json, state.pt)")
    ap.add_argument("--n-samples", type=int, default=20_000)
    ap.add_argument("--formulas", default="Ba2RuO4,BaRuO3,BaRu2O6", help="comma-separated formulas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-z", type=int, default=4, help="largest formula units per conventional cell (0 = any)")
    ap.add_argument("--max-tries", type=int, default=8, help="configurations tried by the geometry-aware variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    formulas = [f.strip() for f in args.formulas.split(",") if f.strip()]
    for f in formulas:
        formula_counts(f)  # fail early on a bad formula
    max_z = args.max_z or None
    model = gan.load_checkpoint(args.checkpoint, device="cpu")
    filters = TemplateFilters()
    t0 = time.perf_counter()
    res = run(model, formulas, args.n_samples, args.seed, max_z, filters, args.max_tries)
    result = {
        "benchmark": "bench_stoichiometry", "checkpoint_id": model.checkpoint_id, "checkpoint": str(args.checkpoint),
        "n_samples": args.n_samples, "seed": args.seed, "max_z": max_z, "max_tries": args.max_tries,
        "filters": filters.to_dict(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "note": "2-core machine shared with other jobs: timings are pessimistic"},
        "formulas": res, "total_s": time.perf_counter() - t0,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_stoichiometry.json").write_text(json.dumps(result, indent=1, default=float))
    md = markdown(result)
    (args.out / "bench_stoichiometry.md").write_text(md)
    print(md)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
