"""Rediscovery benchmark (issue 13 section 5): the chain with Ba-Ru-O held out of training.

    python benchmarks/bench_rediscovery.py [--mp-rows 2500] [--epochs 150] [--templates 3000]
        [--prescreen 3000] [--relax 48] [--seed 0]
    python benchmarks/bench_rediscovery.py --table-only   # rebuild rediscovery.md from the JSON

Does the generator find the known phases of a chemical system it never saw? The chain, through
the project's lib functions in one process (one torch thread), reusing
``benchmarks/bench_campaign.py``'s stage functions:

1. ``mp``: every k-th row of the shared MP file (``--mp-rows`` of 27,248) **plus every row of the
   held-out system** (so the exclusion is exercised, not vacuous), parsed, symmetry + ASU, and the
   GAN's training table ``lib.training.build_training_templates(..., exclude_chemical_systems=
   ["Ba-O-Ru"])`` (1-4 ASU sites; ``--exclude-subsystems`` also holds out BaO, RuO2, ...).
2. ``training`` / ``templates`` / ``infill`` (Ba, Ru, O) / ``dedup`` (against the 23 Ba-Ru-O MP
   structures of ``ba_ru_o_mp_structures.csv``: ``is_known_in_mp``): bench_campaign's stages.
3. ``references``: the system's competing phases (``lib.screening.reference_phases`` of those MP
   structures + ASE elemental states) relaxed with the same surrogate, and their hull
   (``formation_and_hull``), as the ``references`` asset does.
4. ``prescreen``: static energies of a seeded sample of ``--prescreen`` unique candidates,
   stratified by reduced formula (``lib.selection.stratified_sample``, the prescreen asset's
   reduced-run sample).
5. ``selection``: ``lib.selection.static_hull_distance`` + ``select_for_relaxation`` (best
   ``--relax`` by static energy above the surrogate's hull; ``--quota`` per composition).
6. ``relax``: bench_campaign's ``stage_relax`` (FIRE, fmax 0.05 eV/A, 300 steps).
7. ``shortlist``: relaxed hull columns, ``build_shortlist``, ``mark_relaxed_duplicates`` (unique
   ranks) and ``lib.novelty.match_known_phases`` against the MP structures as stored and the
   surrogate-relaxed references (known phases caught after relaxation).

Every MP phase's ASU site count comes from ``lib.symmetry.analyse_symmetry`` (symprec 0.1, the
training table's): a phase with more than 4 ASU sites cannot be encoded by the 4-site GAN, and a
phase without all of Ba, Ru and O cannot come out of a ternary infill, so neither can appear.
Those verdicts and the per-phase counts (candidates matching it before relaxation, selected,
relaxed rows matching it after, best ranks) are ``lib.rediscovery``'s, the same code the
``shortlist`` asset's ``rediscovery*`` metadata comes from; this script adds the pre-screen
sample, static orders and the probe.

Writes ``benchmarks/results/rediscovery.json`` and ``rediscovery.md``.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_campaign as bc  # noqa: E402
import polars as pl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ELEMENTS = bc.ELEMENTS  # Ba, Ru, O
HELD_OUT = "Ba-O-Ru"
MAX_ASU_SITES = 4
MP_SYSTEM_FILE = Path("data") / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv"


# ----------------------------------------------------------------------------- stages
def _cif_elements(text: pl.Expr) -> pl.Expr:
    """Element symbols of a CIF's ``_chemical_formula_sum`` line (a cheap pre-filter on raw text)."""
    return (text.str.extract(r"_chemical_formula_sum\s+'?([^'\n]+)'?", 1)
            .str.extract_all(r"[A-Z][a-z]?").list.unique().list.sort())


def stage_mp_held_out(args, shared: Path, rec: dict) -> pl.DataFrame:
    """bench_campaign.stage_mp with the held-out system: every k-th row plus every row of the
    system, and ``exclude_chemical_systems`` in the training table (the report counts it)."""
    from lib.mp_sources import raw_from_table_file
    from lib.training import chemical_system_expr, normalise_chemical_system

    raw_all = raw_from_table_file(shared / "data" / "mp" / "mp_structures.csv.gz")
    step = max(1, raw_all.height // max(args.mp_rows, 1))
    held = sorted(HELD_OUT.split("-"))
    els = _cif_elements(pl.col("text"))
    in_system = (els.list.set_difference(pl.lit(held)).list.len() == 0) & (els.list.len() == len(held))
    sample = raw_all.gather_every(step).head(args.mp_rows)
    extra = raw_all.filter(in_system).join(sample.select("material_id"), on="material_id", how="anti")
    raw = pl.concat([sample, extra])
    _, _, training, report = bc.mp_tables(
        raw, source=f"file:mp_structures.csv.gz (every {step}th row + {HELD_OUT} rows)",
        snapshot_key={"bench_rediscovery": step}, rec=rec, exclude_chemical_systems=[HELD_OUT],
        exclude_subsystems=args.exclude_subsystems)
    n_sys_file = raw_all.filter(in_system).height
    rec.update(every_nth_row=step, n_held_out_system_rows_in_file=n_sys_file,
               n_held_out_system_rows_added=extra.height,
               held_out_material_ids=sorted(raw_all.filter(in_system)["material_id"].to_list()),
               selection_removed=report.removed,
               training_rows_in_held_out_system=int(training.select(chemical_system_expr(pl.col("asu_elements"))
                                                                    .eq(normalise_chemical_system(HELD_OUT))
                                                                    .sum()).item() or 0))
    return training


def mp_phases(shared: Path) -> pl.DataFrame:
    """Per MP phase of the system: formula, MP source, sites, MP energy above hull, and
    ``lib.rediscovery``'s space group, ASU site count and whether the 4-site GAN can reach it
    (``reachable``: at most 4 ASU sites and all of Ba, Ru, O; ``unreachable_reason``)."""
    from lib.mp_sources import load_mp_source
    from lib.rediscovery import rediscovery_table, system_phases

    path = shared / MP_SYSTEM_FILE
    mp = load_mp_source(str(path)).structures
    known = rediscovery_table(system_phases(mp, elements=ELEMENTS), elements=ELEMENTS, max_asu_sites=MAX_ASU_SITES)
    info = pl.read_csv(path, columns=["material_id", "source", "pretty_formula", "e_above_hull", "nsites"])
    return info.join(known.select("material_id", "spacegroup_number", "n_asu_sites", "n_elements",
                                  pl.col("can_appear").alias("reachable"), "unreachable_reason"),
                     on="material_id", how="left")


def stage_references(args, sur, shared: Path, rec: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ``references`` asset in-process: competing phases relaxed with the surrogate + hull."""
    from lib import screening as scr

    mp_cells = scr.mp_csv_cells(shared / MP_SYSTEM_FILE, elements=ELEMENTS)
    if args.ref_max_atoms > 0:
        mp_cells = mp_cells.filter(pl.col("species").list.len() <= args.ref_max_atoms)
    phases = scr.reference_phases(ELEMENTS, mp_cells)
    frame = phases.rename({"phase_id": "candidate_id"}).select("candidate_id", "lattice_matrix", "species",
                                                               "frac_coords", "is_cell_relaxed")
    t = time.perf_counter()
    res = scr.relax_frame(sur, frame, batch_size=args.relax_batch_size)
    wall = time.perf_counter() - t
    refs = phases.select("phase_id", "formula", "source").join(res.rename({"key": "phase_id"}), on="phase_id",
                                                               how="left")
    no_cands = pl.DataFrame(schema={"candidate_id": pl.String, "formula": pl.String, "energy_ev": pl.Float64,
                                    "status": pl.String})
    hull = scr.formation_and_hull(refs, no_cands, elements=ELEMENTS)
    refs = refs.join(hull.references, on="phase_id", how="left").with_columns(
        pl.lit("reference").alias("kind"), pl.lit(sur.name).alias("surrogate_name"),
        pl.lit(sur.weights_sha256).alias("surrogate_sha256"))
    ok = refs.filter(pl.col("status") == "ok")
    rec.update(n_phases=refs.height, n_ok=ok.height, n_converged=int(ok["is_converged"].sum() or 0),
               compute_s=round(wall, 2), atoms_max=int(bc._f(ok["n_atoms"].max())),
               chemical_potentials_ev={k: round(v, 4) for k, v in hull.chemical_potentials_ev.items()},
               on_hull=sorted(ok.filter(pl.col("e_above_hull_ev_per_atom") < 1e-6)["formula"].to_list()))
    return mp_cells, refs


def stage_selection(args, sur, sample: pl.DataFrame, pre: pl.DataFrame, refs: pl.DataFrame,
                    rec: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Static hull distances of the pre-screened sample (with ``static_order``: the position in
    the selection's order) and the best ``--relax`` by them."""
    from lib.selection import select_for_relaxation, selection_summary, static_hull_distance

    meta = sample.select("candidate_id", "formula", "reduced_formula", "spacegroup_number")
    pre = pre.join(meta, on="candidate_id", how="left").with_columns(
        pl.lit(sur.weights_sha256).alias("surrogate_sha256"))
    static = static_hull_distance(pre, refs, elements=ELEMENTS)
    order = select_for_relaxation(static, static.height, rank_by="e_above_hull")
    static = static.join(order.select("candidate_id", pl.col("selection_rank").alias("static_order")),
                         on="candidate_id", how="left")
    top = select_for_relaxation(static, args.relax, rank_by="e_above_hull",
                                per_composition_quota=args.quota or None)
    raw = select_for_relaxation(static, args.relax, rank_by="energy_per_atom")
    hull = top["static_e_above_hull_ev_per_atom"]
    rec.update(n_prescreened_with_hull=int(static["static_e_above_hull_ev_per_atom"].is_not_null().sum()),
               n_selected=top.height, n_selected_compositions=int(top["reduced_formula"].n_unique()),
               selected_static_e_above_hull_min_median_max=[round(bc._f(x), 4) for x in
                                                           (hull.min(), hull.median(), hull.max())],
               by_energy_per_atom_overlap=raw.join(top, on="candidate_id", how="semi").height,
               by_composition=selection_summary(top).head(12).select(
                   "reduced_formula", "n_rows").to_dicts())
    return static, top


def _relaxed_table(rel: pl.DataFrame, top: pl.DataFrame, sample: pl.DataFrame, refs: pl.DataFrame,
                   sur) -> pl.DataFrame:
    """``relax_frame`` output as the ``relaxed`` asset writes it: selection columns, lineage, and the
    relaxed cell's formation energy and energy above the surrogate's hull."""
    from lib import screening as scr

    sel = [c for c in scr.RELAXED_SELECTION_COLUMNS if c in top.columns]
    rel = rel.rename({"key": "candidate_id"}).join(
        top.select("candidate_id", "formula", "reduced_formula", "spacegroup_number",
                   pl.col("energy_per_atom_ev").alias("prescreen_energy_per_atom_ev"), *sel),
        on="candidate_id", how="left").join(
        sample.select("candidate_id", "template_id", "is_known_in_mp", "mp_material_id"), on="candidate_id",
        how="left").with_columns(pl.lit(sur.name).alias("surrogate_name"),
                                 pl.lit(sur.weights_sha256).alias("surrogate_sha256"))
    return scr.relaxed_hull_columns(rel, refs, elements=ELEMENTS)


def stage_probe(args, sur, unique: pl.DataFrame, static: pl.DataFrame, top: pl.DataFrame, short: pl.DataFrame,
                mp_cells: pl.DataFrame, refs: pl.DataFrame, phases: pl.DataFrame, rec: dict) -> list[dict[str, Any]]:
    """Outside the pipeline's choices: every unique candidate that the pipeline did not relax (not
    sampled, or not selected) and that dedup matched to an MP phase before relaxation
    (``probe_reason`` ``mp_match_before``) or, with ``--probe-same-formula-sg``, that has the
    reduced formula and space group of a reachable MP phase (``same_formula_sg``) is pre-screened
    and relaxed here the same way and matched with ``lib.novelty``; its energy above the hull
    gives the unique rank it would have had in this shortlist. Nothing here changes the
    pipeline's rows."""
    from lib import screening as scr
    from lib.cells import ASU_COLUMNS
    from lib.novelty import known_structures, match_known_phases

    keys = pl.DataFrame(
        [(_reduced(f), sg) for f, sg in phases.filter(pl.col("reachable"))
         .select("pretty_formula", "spacegroup_number").iter_rows()],
        schema={"reduced_formula": pl.String, "_sg": pl.Int64}, orient="row").with_columns(pl.lit(True).alias("_same"))
    probe = (unique.join(keys, left_on=["reduced_formula", pl.col("spacegroup_number").cast(pl.Int64)],
                         right_on=["reduced_formula", "_sg"], how="left")
             .with_columns(pl.when(pl.col("is_known_in_mp")).then(pl.lit("mp_match_before"))
                           .when(pl.col("_same").fill_null(False) & pl.lit(args.probe_same_formula_sg))
                           .then(pl.lit("same_formula_sg")).otherwise(None).alias("probe_reason"))
             .filter(pl.col("probe_reason").is_not_null())
             .join(top.select("candidate_id"), on="candidate_id", how="anti"))
    rec["n"] = probe.height
    if probe.is_empty():
        return []
    frame = probe.select("candidate_id", *ASU_COLUMNS)
    pre = scr.prescreen_frame(sur, frame, batch_size=args.batch_size, volume_scan=args.volume_scan)
    rel = scr.relax_frame(sur, frame.join(pre.select("candidate_id", "volume_scale"), on="candidate_id",
                                          how="left"), batch_size=args.relax_batch_size)
    rel = _relaxed_table(rel, pre.join(probe.select("candidate_id", "formula", "reduced_formula",
                                                    "spacegroup_number"), on="candidate_id"), probe, refs, sur)
    known = known_structures(mp_structures=mp_cells, references=refs, elements=ELEMENTS)
    rel = match_known_phases(rel, known).join(probe.select("candidate_id", "probe_reason"), on="candidate_id",
                                              how="left")
    uniq_e = short.filter(pl.col("duplicate_of").is_null())["e_above_hull_ev_per_atom"].to_list()
    st = static.select("candidate_id", "static_e_above_hull_ev_per_atom", "static_order")
    rows = []
    for r in rel.join(st, on="candidate_id", how="left").join(pre.select(
            "candidate_id", pl.col("energy_per_atom_ev").alias("static_energy_per_atom_ev")),
            on="candidate_id", how="left").iter_rows(named=True):
        e = r["e_above_hull_ev_per_atom"]
        rows.append({
            "candidate_id": r["candidate_id"], "probe_reason": r["probe_reason"], "formula": r["formula"], "spacegroup_number": r["spacegroup_number"],
            "mp_material_id_before": r["mp_material_id"], "in_prescreen_sample": r["static_order"] is not None,
            "static_order": r["static_order"], "n_prescreened": static.height,
            "static_e_above_hull_ev_per_atom": (round(r["static_e_above_hull_ev_per_atom"], 4)
                                                if r["static_e_above_hull_ev_per_atom"] is not None else None),
            "status": r["status"], "is_converged": r["is_converged"], "n_steps": r["n_steps"],
            "spacegroup_number_relaxed": r["spacegroup_number_relaxed"],
            "e_above_hull_ev_per_atom": None if e is None else round(e, 4),
            "known_material_id_after": r["known_material_id"], "known_source_after": r["known_source"],
            "is_novel": r["is_novel"],
            "unique_rank_if_relaxed": None if e is None else 1 + sum(x < e for x in uniq_e if x is not None),
            "n_unique_rows": len(uniq_e),
        })
    rec.update(n_known_after=sum(r["is_novel"] is False for r in rows),
               by_reason={why: {"n": sum(r["probe_reason"] == why for r in rows),
                                "n_known_after": sum(r["probe_reason"] == why and r["is_novel"] is False
                                                     for r in rows)}
                          for why in ("mp_match_before", "same_formula_sg")})
    rows.sort(key=lambda r: (r["probe_reason"] != "mp_match_before", r["e_above_hull_ev_per_atom"] is None,
                             r["e_above_hull_ev_per_atom"] or 0.0, r["candidate_id"]))
    return rows


def stage_shortlist(rel: pl.DataFrame, top: pl.DataFrame, sample: pl.DataFrame, mp_cells: pl.DataFrame,
                    refs: pl.DataFrame, sur, rec: dict) -> pl.DataFrame:
    """The ``shortlist`` asset's ranking, relaxed duplicates and known-phase matching."""
    from lib import screening as scr
    from lib.cells import CELL_COLUMNS
    from lib.novelty import known_structures, match_known_phases, novelty_metadata

    rel = _relaxed_table(rel, top, sample, refs, sur)
    ranked = scr.build_shortlist(rel, scr.relaxed_stability(rel), None)
    out = scr.mark_relaxed_duplicates(ranked, rel)
    known = known_structures(mp_structures=mp_cells, references=refs, elements=ELEMENTS)
    cells = rel.filter(pl.col("status") == "ok").select("candidate_id", *CELL_COLUMNS)
    out = match_known_phases(out.join(cells, on="candidate_id", how="left", maintain_order="left"),
                             known).drop(*CELL_COLUMNS)
    out = out.join(rel.select("candidate_id", "selection_rank", "static_e_above_hull_ev_per_atom",
                              "is_known_in_mp", "mp_material_id"), on="candidate_id", how="left")
    meta = novelty_metadata(out)
    rec.update(n_rows=out.height, n_unique=int(out["duplicate_of"].is_null().sum()),
               n_known_structures=known.height,
               **{k: meta[k] for k in ("n_novel", "n_known", "n_unchecked", "n_novel_unique", "known_by_source",
                                       "known_by_material", "ltol", "stol", "angle_tol")})
    return out


# ----------------------------------------------------------------------------- report
def _reduced(formula: str) -> str:
    from pymatgen.core import Composition

    return Composition(formula).reduced_formula


def phase_table(phases: pl.DataFrame, unique: pl.DataFrame, static: pl.DataFrame, top: pl.DataFrame,
                short: pl.DataFrame, refs: pl.DataFrame) -> list[dict[str, Any]]:
    """One row per MP phase: reachable or why not, candidates matching it before relaxation (dedup),
    in the pre-screen sample, selected, and relaxed rows matching it after relaxation with ranks
    (the counts the ``shortlist`` asset reports: ``lib.rediscovery.rediscovery_table``)."""
    from lib.rediscovery import rediscovery_table

    lib_rows = {r["material_id"]: r for r in rediscovery_table(
        phases.select("material_id", pl.col("pretty_formula").alias("reduced_formula"), "n_elements",
                      "spacegroup_number", "n_asu_sites"),
        elements=ELEMENTS, max_asu_sites=MAX_ASU_SITES, candidates=unique,
        relaxed_ids=top["candidate_id"].to_list(), shortlist=short).iter_rows(named=True)}
    sample = static.join(unique.select("candidate_id", "is_known_in_mp", "mp_material_id"), on="candidate_id",
                         how="left")
    in_sample = dict(sample.filter(pl.col("is_known_in_mp")).group_by("mp_material_id").len().iter_rows())
    best_order = dict(sample.filter(pl.col("is_known_in_mp")).group_by("mp_material_id")
                      .agg(pl.col("static_order").min()).iter_rows())
    same_f = dict(unique.group_by("reduced_formula").len().iter_rows())
    same_fsg = {(f, sg): n for f, sg, n in unique.group_by("reduced_formula", "spacegroup_number").len().iter_rows()}
    ref_hull = dict(refs.filter(pl.col("status") == "ok").select("phase_id", "e_above_hull_ev_per_atom").iter_rows())
    rows = []
    for p in phases.sort("n_elements", "pretty_formula", "material_id", descending=[True, False, False]).iter_rows(
            named=True):
        mid, lib = p["material_id"], lib_rows[p["material_id"]]
        after = short.filter(pl.col("known_material_id") == mid).sort("rank")
        uniq = after.filter(pl.col("duplicate_of").is_null())
        rows.append({
            "material_id": mid, "formula": p["pretty_formula"], "mp_source": p["source"],
            "spacegroup_number": p["spacegroup_number"], "nsites": p["nsites"], "n_asu_sites": p["n_asu_sites"],
            "mp_e_above_hull_ev_per_atom": p["e_above_hull"],
            "surrogate_e_above_hull_ev_per_atom": (round(ref_hull[mid], 4) if ref_hull.get(mid) is not None
                                                   else None),
            "reachable": p["reachable"], "unreachable_reason": p["unreachable_reason"],
            "n_unique_candidates_same_formula": same_f.get(_reduced(p["pretty_formula"]), 0),
            "n_unique_candidates_same_formula_and_spacegroup": same_fsg.get(
                (_reduced(p["pretty_formula"]), p["spacegroup_number"]), 0),
            "n_elements": p["n_elements"],
            "n_candidates_before_relaxation": lib["n_candidates_before_relaxation"],
            "n_in_prescreen_sample": in_sample.get(mid, 0),
            "n_selected_matching_before": lib["n_selected_matching_before"],
            "best_static_order_matching_before": best_order.get(mid),
            "n_relaxed_rows_matching": lib["n_relaxed_rows_matching"],
            "best_rank": lib["best_rank"], "best_unique_rank": lib["best_unique_rank"],
            "known_sources": sorted(set(after["known_source"].to_list())),
            "ranks": after["rank"].to_list(), "unique_ranks": uniq["unique_rank"].to_list(),
            "candidate_ids": after["candidate_id"].to_list(),
            "e_above_hull_ev_per_atom_relaxed": [round(x, 4) for x in after["e_above_hull_ev_per_atom"].to_list()],
        })
    return rows


def _same_formula_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines on the probed candidates with a reachable MP phase's formula and space group."""
    if not rows:
        return []
    out = ["Candidates with a reachable MP phase's reduced formula and space group that dedup did *not* match "
           f"before relaxation and the pipeline did not relax: {len(rows)}, relaxed here the same way:", "",
           "| formula, SG | n | converged | relaxed into a known phase | best static order | "
           "lowest E_hull eV/at (known ones) | best unique rank if relaxed |", "|---|---:|---:|---|---:|---:|---:|"]
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["formula"], r["spacegroup_number"]), []).append(r)
    agg: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for (f, sg), rs in groups.items():
        agg.setdefault((_reduced(f.replace(" ", "")), sg), []).extend(rs)
    for (f, sg), rs in sorted(agg.items()):
        known = [r for r in rs if r["is_novel"] is False]
        ids: dict[str, int] = {}
        for r in known:
            ids[r["known_material_id_after"]] = ids.get(r["known_material_id_after"], 0) + 1
        orders = [r["static_order"] for r in rs if r["static_order"] is not None]
        ek = [r["e_above_hull_ev_per_atom"] for r in known if r["e_above_hull_ev_per_atom"] is not None]
        ranks = [r["unique_rank_if_relaxed"] for r in known if r["unique_rank_if_relaxed"] is not None]
        out.append(f"| {f}, {sg} | {len(rs)} | {sum(bool(r['is_converged']) for r in rs)} | "
                   f"{len(known)} ({', '.join(f'{k}: {v}' for k, v in sorted(ids.items())) or '-'}) | "
                   f"{min(orders) if orders else '-'} | {min(ek) if ek else '-'} | {min(ranks) if ranks else '-'} |")
    return [*out, ""]


def write_markdown(run: dict[str, Any], path: Path) -> None:
    st, rows = run["stages"], run["phases"]
    a = run["args"]
    sl = st.get("shortlist", {})
    probe_mp = [r for r in run.get("probe", []) if r.get("probe_reason", "mp_match_before") == "mp_match_before"]
    md = [
        "# Rediscovery benchmark: Ba-Ru-O held out of training",
        "",
        f"`python benchmarks/bench_rediscovery.py --mp-rows {a['mp_rows']} --epochs {a['epochs']} "
        f"--templates {a['templates']} --prescreen {a['prescreen']} --relax {a['relax']} --seed {a['seed']}"
        f"{' --exclude-subsystems' if a['exclude_subsystems'] else ''}"
        f"{' --volume-scan ' + ' '.join(map(str, a['volume_scan'])) if a.get('volume_scan') else ''}"
        f"{' --quota ' + str(a['quota']) if a.get('quota') else ''}` on {run['machine']}; "
        f"{run['torch_threads']} torch thread; surrogate {run.get('surrogate')}; started {run['started_at']}, "
        f"total {run.get('total_s', 0):.0f} s wall, {run.get('total_cpu_s', 0):.0f} s CPU; load average "
        f"{run['load_start']} at the start, {run.get('load_end')} at the end.",
        "",
        f"Held out: chemical system `{HELD_OUT}`"
        f"{' and its subsystems' if a['exclude_subsystems'] else ' (exact system; subsystems such as BaO, RuO2 stay in)'}"
        f"; the MP file has {st['mp']['n_held_out_system_rows_in_file']} rows of it "
        f"({', '.join(st['mp']['held_out_material_ids'])}); the training table's selection removed "
        f"{st['mp']['selection_removed'].get('held_out_chemical_system', 0)} as held out (the others fail an "
        "earlier step, e.g. more than 4 ASU sites), and it holds "
        f"{st['mp']['training_rows_in_held_out_system']} rows of the system.",
        "",
        "## Known Ba-Ru-O MP phases (`ba_ru_o_mp_structures.csv`)",
        "",
        "ASU sites: `lib.symmetry.analyse_symmetry` (symprec 0.1). *Before*: unique candidates that `lib.dedup` "
        "matched to the phase (`is_known_in_mp`), then how many of them the stratified pre-screen sample and "
        "the relaxation selection kept. *After*: relaxed rows that `lib.novelty.match_known_phases` matched to "
        "the phase (as stored in MP, or as relaxed by the surrogate in `references`), their ranks among all "
        "shortlist rows and among unique rows (`unique_rank`, relaxed duplicates folded).",
        "",
        "| phase | formula | SG | sites | ASU sites | MP E_hull eV/at | surrogate E_hull eV/at | can appear? "
        "| unique candidates: same formula / + same SG | before: MP matches / sampled / selected "
        "| after: relaxed rows | rank(s) | unique rank(s) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---|---|",
    ]
    for r in rows:
        sh = r["surrogate_e_above_hull_ev_per_atom"]
        md.append(
            f"| {r['material_id']} | {r['formula']} | {r['spacegroup_number'] or ''} | {r['nsites']} | "
            f"{r['n_asu_sites']} | {r['mp_e_above_hull_ev_per_atom']:.3f} | {'' if sh is None else f'{sh:.3f}'} | "
            f"{'yes' if r['reachable'] else 'no: ' + str(r['unreachable_reason'])} | "
            f"{r['n_unique_candidates_same_formula']} / {r['n_unique_candidates_same_formula_and_spacegroup']} | "
            f"{r['n_candidates_before_relaxation']} / {r['n_in_prescreen_sample']}"
            f"{'' if r['best_static_order_matching_before'] is None else ' (best static order ' + str(r['best_static_order_matching_before']) + ')'}"
            f" / {r['n_selected_matching_before']}"
            f" | {r['n_relaxed_rows_matching']} | {', '.join(map(str, r['ranks'])) or '-'} | "
            f"{', '.join(map(str, r['unique_ranks'])) or '-'} |")
    tern = [r for r in rows if r.get("n_elements", len(ELEMENTS) if (  # older JSON: no n_elements
        r["unreachable_reason"] is None or "ASU" in str(r["unreachable_reason"])) else 0) == len(ELEMENTS)]
    reach = [r for r in tern if r["reachable"]]
    found_before = [r["material_id"] for r in rows if r["n_candidates_before_relaxation"]]
    found_after = [r["material_id"] for r in rows if r["n_relaxed_rows_matching"]]
    md += [
        "",
        f"Summary: {len(tern)} ternary Ba-Ru-O phases, {len(reach)} reachable (<= {MAX_ASU_SITES} ASU sites), "
        f"{len(tern) - len(reach)} never reachable ({', '.join(r['material_id'] + ' ' + r['formula'] + ' ' + str(r['n_asu_sites']) + ' ASU sites' for r in tern if not r['reachable'])}). "
        f"Among the candidates before relaxation: {', '.join(found_before) or 'none'}. Among the relaxed rows: "
        f"{', '.join(found_after) or 'none'}. Shortlist: {sl.get('n_rows')} relaxed rows, {sl.get('n_unique')} "
        f"unique, {sl.get('n_known')} known ({sl.get('known_by_source')}), {sl.get('n_novel')} novel, "
        f"{sl.get('n_novel_unique')} novel and unique.",
        "",
        "## Probe: the MP-matched candidates the pipeline did not relax",
        "",
        "Outside the pipeline's choices (its rows are unchanged): each unique candidate that `lib.dedup` matched "
        "to an MP phase before relaxation but that was not selected (or not sampled) is pre-screened and relaxed "
        "the same way here, then matched by `lib.novelty`. *Static order*: its position in the selection's order "
        f"(static energy above the surrogate's hull) among the {st['selection'].get('n_prescreened_with_hull')} "
        f"pre-screened rows; {a['relax']} were relaxed. *Unique rank if relaxed*: where its relaxed energy above "
        "the hull would put it among the shortlist's unique rows.",
        "",
        "| candidate | formula | SG | MP match before | static order | static E_hull eV/at | relaxed: SG, "
        "steps, converged | E_hull eV/at | known after relaxation | unique rank if relaxed |",
        "|---|---|---:|---|---:|---:|---|---:|---|---:|",
        *[f"| {r['candidate_id']} | {r['formula']} | {r['spacegroup_number']} | {r['mp_material_id_before']} | "
          f"{r['static_order'] if r['static_order'] is not None else 'not sampled'} | "
          f"{'' if r['static_e_above_hull_ev_per_atom'] is None else r['static_e_above_hull_ev_per_atom']} | "
          f"{r['spacegroup_number_relaxed']}, {r['n_steps']}, {r['is_converged']} | {r['e_above_hull_ev_per_atom']} | "
          f"{r['known_material_id_after'] or 'no (novel)'}"
          f"{' (' + r['known_source_after'] + ')' if r['known_source_after'] else ''} | "
          f"{r['unique_rank_if_relaxed']} of {r['n_unique_rows'] + 1} |" for r in probe_mp],
        *([] if probe_mp else ["| (none) | | | | | | | | | |"]),
        "",
        *_same_formula_summary([r for r in run.get("probe", []) if r["probe_reason"] == "same_formula_sg"]),
        "## Stages",
        "",
        "| stage | wall s | CPU s | load (1 min) before → after | key numbers |", "|---|---:|---:|---|---|",
    ]
    keys = {
        "mp": ("n_input", "every_nth_row", "n_held_out_system_rows_added", "n_training_rows"),
        "training": ("epochs", "n_rows", "s_per_epoch", "final_wasserstein"),
        "templates": ("n_samples", "validity", "n_templates", "n_asu_sites"),
        "infill": ("n_candidates", "candidates_per_template"),
        "dedup": ("n_input", "n_unique", "n_mp_matches"),
        "references": ("n_phases", "n_ok", "n_converged", "on_hull"),
        "prescreen": ("n", "n_ok", "structures_per_s", "atoms_mean"),
        "selection": ("n_selected", "n_selected_compositions", "selected_static_e_above_hull_min_median_max",
                      "by_energy_per_atom_overlap"),
        "relax": ("n", "n_converged", "steps_mean", "atoms_mean", "relaxations_per_min"),
        "shortlist": ("n_rows", "n_unique", "n_known", "n_novel_unique"),
        "probe": ("n", "n_known_after", "by_reason"),
    }
    for name, rec in st.items():
        kv = ", ".join(f"{k} {rec[k]}" for k in keys.get(name, ()) if k in rec)
        md.append(f"| {name} | {rec['wall_s']} | {rec['cpu_s']} | {rec['load_before'][0]} → {rec['load_after'][0]} "
                  f"| {kv} |")
    md += ["", "Rebuild this table from the JSON: `python benchmarks/bench_rediscovery.py --table-only`."]
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mp-rows", type=int, default=2500, help="MP rows (every k-th of the shared file)")
    ap.add_argument("--exclude-subsystems", action="store_true", help="hold out BaO, RuO2, ... as well")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--templates", type=int, default=3000)
    ap.add_argument("--prescreen", type=int, default=3000, help="0 = every unique candidate")
    ap.add_argument("--batch-size", type=int, default=32, help="pre-screen structures per forward pass")
    ap.add_argument("--relax", type=int, default=48)
    ap.add_argument("--quota", type=int, default=0, help="> 0: at most this many selected per reduced formula")
    ap.add_argument("--relax-batch-size", type=int, default=32)
    ap.add_argument("--ref-max-atoms", type=int, default=0, help="> 0: skip larger MP reference phases")
    ap.add_argument("--surrogate", default=bc.SURROGATE)
    ap.add_argument("--models-dir", default="")
    ap.add_argument("--probe-same-formula-sg", action=argparse.BooleanOptionalAction, default=True,
                    help="also probe unrelaxed candidates with a reachable MP phase's formula and space group")
    ap.add_argument("--volume-scan", type=float, nargs="*", default=[],
                    help="pre-screen volume scan: linear scale factors, e.g. 0.9 1.0 1.1 (default: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "rediscovery")
    args = ap.parse_args()
    args.checkpoint = None  # bench_campaign.stage_training trains when no checkpoint is given
    if args.table_only:
        write_markdown(json.loads(args.out.with_suffix(".json").read_text()), args.out.with_suffix(".md"))
        return

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    shared = Path(os.environ.get("CGWGAN_SHARED") or ROOT.parent / "shared")
    models_dir = args.models_dir or os.environ.get("CGWGAN_M3GNET_DIR") or str(shared / "models")
    run: dict[str, Any] = {"benchmark": "bench_rediscovery", "held_out": HELD_OUT,
                           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, shared with other jobs",
                           "torch_threads": torch.get_num_threads(), "load_start": bc._load(),
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    st = run["stages"]
    t0, c0 = time.perf_counter(), time.process_time()
    from lib import screening as scr
    from lib.selection import stratified_sample

    with bc.Stage(st, "mp") as rec:
        training = stage_mp_held_out(args, shared, rec)
        phases = mp_phases(shared)
    with bc.Stage(st, "training") as rec:
        model, _ = bc.stage_training(args, training, rec)
    with bc.Stage(st, "templates") as rec:
        tpl = bc.stage_templates(args, model, rec)
    with bc.Stage(st, "infill") as rec:
        cands = bc.stage_infill(tpl, rec)
    if cands.height == 0:
        raise SystemExit(f"no Ba-Ru-O candidates from {tpl.height} templates: train longer (--epochs, --mp-rows)")
    with bc.Stage(st, "dedup") as rec:
        unique = bc.stage_dedup(cands, shared, rec)
        rec["mp_matches_by_material"] = dict(sorted(
            unique.filter(pl.col("is_known_in_mp")).group_by("mp_material_id").len().iter_rows()))
    t = time.perf_counter()
    sur = scr.load_configured_surrogate(args.surrogate, models_dir=models_dir)
    run.update(surrogate=sur.name, surrogate_sha256=sur.weights_sha256, model_load_s=round(time.perf_counter() - t, 2))
    with bc.Stage(st, "references") as rec:
        mp_cells, refs = stage_references(args, sur, shared, rec)
    with bc.Stage(st, "prescreen") as rec:
        args.prescreen = args.prescreen if args.prescreen > 0 else unique.height  # 0 = every unique candidate
        strat = stratified_sample(unique, args.prescreen, seed=args.seed, by="reduced_formula")
        sample, pre = bc.stage_prescreen(args, sur, strat, rec)  # n = all of the stratified sample
        rec["n_compositions"] = int(sample["reduced_formula"].n_unique())
    with bc.Stage(st, "selection") as rec:
        static, top = stage_selection(args, sur, sample, pre, refs, rec)
    with bc.Stage(st, "relax") as rec:
        rel = bc.stage_relax(args, sur, sample, top, rec)
    with bc.Stage(st, "shortlist") as rec:
        short = stage_shortlist(rel, top, sample, mp_cells, refs, sur, rec)
    with bc.Stage(st, "probe") as rec:
        run["probe"] = stage_probe(args, sur, unique, static, top, short, mp_cells, refs, phases, rec)
    run["phases"] = phase_table(phases, unique, static, top, short, refs)
    run["shortlist_top"] = short.filter(pl.col("duplicate_of").is_null()).head(15).select(
        "rank", "unique_rank", "candidate_id", "formula", "spacegroup_number_relaxed", "e_above_hull_ev_per_atom",
        "known_material_id", "is_novel").to_dicts()
    run.update(total_s=round(time.perf_counter() - t0, 1), total_cpu_s=round(time.process_time() - c0, 1),
               load_end=bc._load())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(run, indent=1, default=str))
    write_markdown(run, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
