"""Generator robustness (issue 15): the Wyckoff WGAN-GP trained with several seeds, a held-out
chemical system and more ASU sites, each sampled and scored the same way.

    python benchmarks/bench_generator.py --symmetry mp_symmetry.parquet \
        --runs paper:0,1,2 paper-heldout:0 robust:0,1,2 robust-heldout:0 robust-s6:0 robust-s8:0 \
        --n-samples 100000 --jobs 6 --device cuda

Input: an ``mp_symmetry`` table of the shared MP file (Parquet, e.g. written by
``mp_job``), or ``--mp-file`` to build it here (slow: ~10 min on 2 cores).

A *run* is ``<variant>:<seed>``. Variants (``VARIANTS``) are the paper's defaults ("paper":
``GanConfig()``), the robust training options ("robust": generator EMA and the checkpoint
chosen by the density overlap of 10,000 evaluation samples, see ``lib.gan.GanConfig``), each
optionally with Ba-O-Ru held out of training (``-heldout``) and with 6 or 8 ASU sites
(``-s6``, ``-s8``). Every run:

1. builds ``training_templates`` from the symmetry table (``lib.training``), trains with the
   run's seed on ``--device``, and saves the checkpoint under ``--out``/checkpoints;
2. samples ``--n-samples`` vectors (seed 12345, so every run is scored on fresh samples, not
   on the evaluation samples used for selection), decodes them with each ``--repair`` mode of
   ``lib.templates.TemplateFilters`` and reports ``lib.templates.quality_report`` (density
   overlap, validity, uniqueness, novelty, space-group and site-count total variation);
3. checks the symmetry of up to ``--symmetry-rows`` templates (spglib operations).

Each run's JSON is written as soon as it finishes (``<out>/runs/<variant>-<seed>.json``), so a
time limit keeps the finished runs; the summary (``bench_generator.json`` + ``.md``) gives mean,
standard deviation, minimum and maximum per variant and the ASU-site coverage of MP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
HELD_OUT = "Ba-O-Ru"
SAMPLE_SEED = 12345

#: variant -> (GanConfig overrides, max ASU sites, held-out systems)
VARIANTS: dict[str, tuple[dict, int, tuple[str, ...]]] = {}
for _name, _cfg in (("paper", {}),
                    ("robust", {"ema_decay": 0.995, "eval_every": 5, "select_by": "density_overlap",
                                "eval_raw_weights": True}),
                    ("ema", {"ema_decay": 0.995, "eval_every": 5, "eval_raw_weights": True}),
                    # the earlier Dagster default: auto EMA (0.995 here), 5,000 evaluation samples, "quality"
                    ("quality", {"ema_decay": 0.995, "eval_every": 5, "eval_samples": 5_000, "select_by": "quality",
                                 "eval_raw_weights": True}),
                    # the Dagster default: as "quality" but selecting by "covered_density"
                    ("default", {"ema_decay": 0.995, "eval_every": 5, "eval_samples": 5_000,
                                 "select_by": "covered_density", "eval_raw_weights": True}),
                    # the Dagster default with the raw weights competing in the selection (select_raw_weights)
                    ("rawsel", {"ema_decay": 0.995, "eval_every": 5, "eval_samples": 5_000,
                                "select_by": "covered_density", "eval_raw_weights": True, "select_raw_weights": True}),
                    ("select", {"eval_every": 5, "select_by": "density_overlap"})):
    VARIANTS[_name] = (_cfg, 4, ())
    VARIANTS[f"{_name}-heldout"] = (_cfg, 4, (HELD_OUT,))
    for _s in (6, 8):
        VARIANTS[f"{_name}-s{_s}"] = (_cfg, _s, ())

METRICS = ("density_overlap", "validity", "uniqueness", "novelty", "spacegroup_tv", "n_sites_tv")


def _f(v) -> float:
    return float(v) if v is not None else float("nan")


def coverage(sym: pl.DataFrame, max_sites: int) -> dict:
    """Share of MP rows the training selection keeps at ``max_sites`` ASU sites, and the Ba-Ru-O
    phases (every structure whose elements lie in Ba-O-Ru) that become representable."""
    from lib.training import select_training_rows

    _, rep = select_training_rows(sym, max_asu_sites=max_sites)
    ok = sym.filter(pl.col("is_round_trip_ok").fill_null(False) & (pl.col("spacegroup_number") >= 2))
    inside = sym.filter(pl.col("asu_elements").list.set_difference(pl.lit(["Ba", "O", "Ru"])).list.len() == 0)
    rep_ok = inside.filter(pl.col("is_round_trip_ok").fill_null(False) & (pl.col("spacegroup_number") >= 2)
                           & (pl.col("n_asu_sites") <= max_sites))
    return {"max_asu_sites": max_sites, "n_training_rows": rep.n_selected, "n_mp_rows": sym.height,
            "share_of_mp": round(rep.n_selected / sym.height, 4),
            "share_of_round_trip_ok_above_p1": round(rep.n_selected / max(ok.height, 1), 4),
            "ba_ru_o_phases": inside.height, "ba_ru_o_representable": rep_ok.height,
            "ba_ru_o_representable_ids": sorted(rep_ok["material_id"].to_list())}


def _filters(mode: str):
    """``TemplateFilters`` of a --repair mode: a ``TemplateFilters.repair`` value, optionally with
    ``+dedupe`` (``dedupe_fixed_sites``), e.g. ``free_params+rescale+dedupe``."""
    from lib.templates import TemplateFilters

    dedupe = mode.endswith("+dedupe")
    repair = mode.removesuffix("+dedupe") or "none"
    return TemplateFilters(repair=repair, dedupe_fixed_sites=dedupe)  # type: ignore[arg-type]


def score(model, weights: dict, training: pl.DataFrame, args: dict, rec: dict) -> None:
    """Sample ``n_samples`` vectors from each generator state in ``weights`` ({"selected": ...,
    "last_raw": ...}) and add their quality per repair mode to ``rec``."""
    from lib import gan
    from lib.templates import check_symmetry, decode_templates, quality_report

    rec["by_repair"], rec["last_raw_by_repair"] = {}, {}
    for label, state in weights.items():
        model.generator.load_state_dict(state)
        t = time.perf_counter()
        xs = gan.sample_vectors(model, int(args["n_samples"]), seed=SAMPLE_SEED)
        rec[f"sample_s_{label}"] = round(time.perf_counter() - t, 2)
        for mode in (args["repair"] if label == "selected" else ["none"]):
            t = time.perf_counter()
            dec = decode_templates(xs, checkpoint_id=model.checkpoint_id, schema=model.schema, filters=_filters(mode))
            dt = time.perf_counter() - t
            sub = dec.templates.head(int(args["symmetry_rows"]))
            q = quality_report(dec, training, symmetry=check_symmetry(sub))
            q = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in q.items()}
            q.update(decode_s=round(dt, 2), symmetry_rows_checked=sub.height, repairs=getattr(dec, "repairs", None))
            rec["by_repair" if label == "selected" else "last_raw_by_repair"][mode] = q


def rescore(path: Path, args: dict) -> dict:
    """Score a run whose training finished but whose scoring did not (a time limit): its
    checkpoint's kept weights (the raw last-epoch weights are not saved, so not those)."""
    from lib import gan
    from lib.training import build_training_templates

    rec = json.loads(path.read_text())
    _, max_sites, held = VARIANTS[rec["variant"]]
    model = gan.load_checkpoint(Path(args["out"]) / "checkpoints" / rec["checkpoint_id"], device=args["device"])
    training, _ = build_training_templates(pl.read_parquet(args["symmetry"]), max_asu_sites=max_sites,
                                           exclude_chemical_systems=held)
    score(model, {"selected": model.generator.state_dict()}, training, args, rec)
    rec["rescored"] = f"scored from its checkpoint on {args['device']} ({platform.node()})"
    path.write_text(json.dumps(rec, indent=1, default=str))
    return rec


def run_one(variant: str, seed: int, args: dict) -> dict:
    """Train and score one run (in its own process)."""
    import torch

    from lib import gan
    from lib.encoding import EncodingSchema, encodings_to_numpy
    from lib.templates import (
        training_density,
    )
    from lib.training import build_training_templates

    torch.set_num_threads(int(args["threads"]))
    overrides, max_sites, held = VARIANTS[variant]
    rec: dict = {"variant": variant, "seed": seed, "max_asu_sites": max_sites, "held_out": list(held),
                 "overrides": overrides}
    sym = pl.read_parquet(args["symmetry"])
    training, report = build_training_templates(sym, max_asu_sites=max_sites, exclude_chemical_systems=held)
    schema = EncodingSchema(max_sites=max_sites)
    x = encodings_to_numpy(training, schema=schema)
    cfg = gan.GanConfig(**{"epochs": int(args["epochs"]), **overrides})
    ref = training_density(training)
    t = time.perf_counter()
    res = gan.train_wgan(x, config=cfg, schema=schema, seed=seed, device=args["device"], cpu_threads=None,
                         reference_density=ref if cfg.eval_every else None, log_every=10,
                         log=lambda m: print(f"{variant}:{seed} {m}", flush=True))
    model = res.model
    rec.update(n_training_rows=int(x.shape[0]), removed=report.removed, train_s=round(time.perf_counter() - t, 1),
               device=res.device, epochs=cfg.epochs, selected_epoch=model.extra.get("selected_epoch"),
               selected_weights=model.extra.get("selected_weights"),
               checkpoint_id=model.checkpoint_id, final_wasserstein=round(res.history["wasserstein"][-1], 4),
               eval_curve={k: v for k, v in res.history.items() if k.startswith("eval_")})
    out = Path(args["out"]) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{variant}-{seed}.json").write_text(json.dumps({**rec, "by_repair": {}}, indent=1, default=str))
    gan.save_checkpoint(model, Path(args["out"]) / "checkpoints")
    weights = {"selected": model.generator.state_dict()}
    if cfg.ema_decay or cfg.select_by != "last":  # also score what the plain recipe would have kept
        weights = {"selected": {k: v.clone() for k, v in model.generator.state_dict().items()},
                   "last_raw": res.last_raw_state}
    score(model, weights, training, args, rec)
    (out / f"{variant}-{seed}.json").write_text(json.dumps(rec, indent=1, default=str))
    return rec


def scored(runs: list[dict]) -> list[dict]:
    """One entry per scored model: a run's kept weights, and for runs with EMA or selection also
    the raw weights after the last epoch (the plain recipe's result on the same trajectory),
    as variant ``<variant>/last-raw``."""
    out = []
    for r in runs:
        out.append(r)
        if r.get("last_raw_by_repair"):
            out.append({**r, "variant": f"{r['variant']}/last-raw", "by_repair": r["last_raw_by_repair"],
                        "selected_epoch": r["epochs"], "selected_weights": None})
    return out


def summarise(runs: list[dict], repair_modes: list[str]) -> dict:
    by_variant: dict[str, dict] = {}
    for variant in sorted({r["variant"] for r in runs}):
        rs = [r for r in runs if r["variant"] == variant]
        entry: dict = {"seeds": [r["seed"] for r in rs], "n_training_rows": rs[0]["n_training_rows"],
                       "train_s_mean": round(float(np.mean([r["train_s"] for r in rs])), 1)}
        for mode in repair_modes:
            stats = {}
            for m in METRICS:
                vals = [_f(r["by_repair"].get(mode, {}).get(m)) for r in rs]
                vals = [v for v in vals if np.isfinite(v)]
                if vals:
                    stats[m] = {"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals)), 4),
                                "min": round(min(vals), 4), "max": round(max(vals), 4)}
            sym_vals = [v for r in rs if (v := r["by_repair"].get(mode, {}).get("symmetry_exactness")) is not None]
            if sym_vals:
                stats["symmetry_exactness_min"] = {"min": float(min(sym_vals))}
            entry[mode] = stats
        by_variant[variant] = entry
    return by_variant


def markdown(result: dict) -> str:
    lines = ["# bench_generator", "", result["note"], "",
             f"Samples per run: {result['n_samples']:,} (seed {SAMPLE_SEED}); epochs {result['epochs']}; "
             f"training devices: {result['device']}. Gate: density overlap >= 0.93 for every seed.", "",
             "## Per run", "",
             "| run | training rows | train s | selected epoch | repair | density overlap | validity | uniqueness "
             "| novelty | SG TV | sites TV | symmetry |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["runs"], key=lambda r: (r["variant"], r["seed"])):
        for mode, q in r["by_repair"].items():
            lines.append(
                f"| {r['variant']}:{r['seed']} | {r['n_training_rows']} | {r['train_s']} | {r.get('selected_epoch')}"
                f"{' (raw)' if r.get('selected_weights') == 'raw' else ''} | {mode} | {q.get('density_overlap', float('nan')):.3f} | {q['validity']:.3f} "
                f"| {q.get('uniqueness', float('nan')):.3f} | {q.get('novelty', float('nan')):.3f} "
                f"| {q.get('spacegroup_tv', float('nan')):.3f} | {q.get('n_sites_tv', float('nan')):.3f} "
                f"| {q.get('symmetry_exactness')} |")
    curves = [r for r in result["runs"] if r.get("eval_curve", {}).get("eval_density_overlap")
              and "/last-raw" not in r["variant"]]
    if curves:
        lines += ["", "## Training trajectories (density overlap of the evaluation samples, every 5 epochs)", "",
                  "Raw = the generator's own weights (the plain recipe's trajectory: EMA and evaluation do not "
                  "change training); kept = the weights the run keeps (EMA when on).", "",
                  "| run | raw at last epoch | raw min / max over the last half | kept: best (epoch) |",
                  "|---|---|---|---|"]
        for r in sorted(curves, key=lambda r: (r["variant"], r["seed"])):
            c = r["eval_curve"]
            raw = c.get("eval_density_overlap_raw") or c["eval_density_overlap"]
            ep = c["eval_epoch"]
            half = [v for e, v in zip(ep, raw, strict=True) if e > ep[-1] / 2] or raw
            kept = c["eval_density_overlap"]
            b = int(np.argmax(kept))
            lines.append(f"| {r['variant']}:{r['seed']} | {raw[-1]:.3f} | {min(half):.3f} / {max(half):.3f} "
                         f"| {kept[b]:.3f} ({int(ep[b])}) |")
    lines += ["", "## Per variant (mean ± sd over seeds; min)", "",
              "| variant | seeds | repair | density overlap | min overlap | validity | uniqueness | novelty |",
              "|---|---|---|---|---|---|---|---|"]
    for v, e in result["summary"].items():
        for mode in result["repair"]:
            s = e.get(mode, {})
            if "density_overlap" not in s:
                continue
            d, va, u, n = s["density_overlap"], s["validity"], s.get("uniqueness", {}), s.get("novelty", {})
            lines.append(f"| {v} | {len(e['seeds'])} | {mode} | {d['mean']:.3f} ± {d['sd']:.3f} | {d['min']:.3f} "
                         f"| {va['mean']:.3f} ± {va['sd']:.3f} | {u.get('mean', float('nan')):.3f} "
                         f"| {n.get('mean', float('nan')):.3f} |")
    if result.get("coverage"):
        lines += ["", "## ASU sites: coverage of the shared MP data", "",
                  "| max ASU sites | training rows | share of MP | share of round-trip-ok rows above P1 "
                  "| Ba-Ru-O-system phases representable |", "|---|---|---|---|---|"]
        for c in result["coverage"]:
            lines.append(f"| {c['max_asu_sites']} | {c['n_training_rows']} | {c['share_of_mp']:.3f} "
                         f"| {c['share_of_round_trip_ok_above_p1']:.3f} | {c['ba_ru_o_representable']} of "
                         f"{c['ba_ru_o_phases']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symmetry", type=Path, default=None, help="mp_symmetry Parquet")
    ap.add_argument("--mp-file", type=Path, default=None, help="build mp_symmetry from this MP file instead")
    ap.add_argument("--runs", nargs="+", default=["paper:0,1,2", "paper-heldout:0"],
                    help="<variant>:<seed>[,<seed>...] with variants " + ", ".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--n-samples", type=int, default=100_000)
    ap.add_argument("--repair", nargs="+", default=["none"], help="TemplateFilters.repair modes to score")
    ap.add_argument("--symmetry-rows", type=int, default=20_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=RESULTS / "generator")
    ap.add_argument("--name", default="bench_generator")
    ap.add_argument("--summary-dir", type=Path, default=RESULTS, help="where <name>.json and .md go")
    ap.add_argument("--table-only", action="store_true", help="rebuild the summary from <out>/runs/*.json")
    ap.add_argument("--rescore", action="store_true",
                    help="score the runs under <out>/runs whose training finished but whose scoring did not")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    sym_path = args.symmetry
    if args.rescore:
        shared = {"symmetry": str(sym_path), "n_samples": args.n_samples, "repair": args.repair,
                  "symmetry_rows": args.symmetry_rows, "device": args.device, "out": str(args.out)}
        for path in sorted((args.out / "runs").glob("*.json")):
            if not json.loads(path.read_text()).get("by_repair"):
                print(path.name, json.dumps(rescore(path, shared)["by_repair"], default=str)[:300], flush=True)
    elif not args.table_only:
        if sym_path is None:
            if args.mp_file is None:
                raise SystemExit("give --symmetry (an mp_symmetry Parquet) or --mp-file")
            from lib.ids import content_hash
            from lib.mp_sources import raw_from_table_file, validate_records
            from lib.symmetry import analyse_symmetry

            loaded = validate_records(raw_from_table_file(args.mp_file), source=f"file:{args.mp_file.name}",
                                      snapshot_id=content_hash({"f": args.mp_file.name}, prefix="snap-"))
            sym_path = args.out / "mp_symmetry.parquet"
            analyse_symmetry(loaded.structures, round_trip_method="direct").write_parquet(sym_path)
        todo: list[tuple[str, int]] = []
        for spec in args.runs:
            variant, _, seeds = spec.partition(":")
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
            todo += [(variant, int(s)) for s in (seeds or "0").split(",")]
        shared = {"symmetry": str(sym_path), "epochs": args.epochs, "n_samples": args.n_samples,
                  "repair": args.repair, "symmetry_rows": args.symmetry_rows, "device": args.device,
                  "threads": args.threads, "out": str(args.out)}
        t0 = time.perf_counter()
        if args.jobs <= 1:
            for v, s in todo:
                print(json.dumps(run_one(v, s, shared)["by_repair"], default=str)[:400], flush=True)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
                futs = {ex.submit(run_one, v, s, shared): (v, s) for v, s in todo}
                for f in as_completed(futs):
                    v, s = futs[f]
                    try:
                        r = f.result()
                        q = r["by_repair"][args.repair[0]]
                        print(f"{v}:{s} done at {time.perf_counter() - t0:.0f}s: overlap "
                              f"{q.get('density_overlap')} validity {q.get('validity')}", flush=True)
                    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                        print(f"{v}:{s} FAILED: {type(e).__name__}: {e}", flush=True)
    runs = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    if not runs:
        raise SystemExit(f"no finished runs under {args.out / 'runs'}")
    repair = sorted({m for r in runs for m in r["by_repair"]}, key=lambda m: (m != "none", m))
    cov = []
    sym_file = sym_path or (args.out / "mp_symmetry.parquet")
    if sym_file and Path(sym_file).exists():
        sym = pl.read_parquet(sym_file)
        cov = [coverage(sym, s) for s in sorted({4, *(r["max_asu_sites"] for r in runs)})]
    devices = ", ".join(f"{d} x{n}" for d, n in sorted(
        {d: sum(r.get("device") == d for r in runs) for d in {r.get("device") for r in runs}}.items()))
    result = {"note": args.note or f"{platform.node()}, {os.cpu_count()} CPUs", "device": devices,
              "epochs": runs[0].get("epochs"), "n_samples": args.n_samples, "repair": repair,
              "runs": scored(runs), "summary": summarise(scored(runs), repair), "coverage": cov}
    args.summary_dir.mkdir(parents=True, exist_ok=True)
    (args.summary_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.summary_dir / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
