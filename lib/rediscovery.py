"""Rediscovery of a chemical system's known phases: can the generator reach them, and did it?

For every known MP phase of a system (the system and its subsystems: every structure whose
elements lie in the system), :func:`rediscovery_table` says

* whether the generator can represent it at all: its asymmetric unit (``n_asu_sites`` of
  ``mp_symmetry``, spglib at the training table's symprec) has at most ``max_asu_sites`` sites
  (the training table's largest ASU), and, with ``require_all_elements`` (the infill's default,
  the paper's ternary study), it holds every element of the system;
* which candidates matched it *before* relaxation (``candidates_dedup``'s ``is_known_in_mp`` /
  ``mp_material_id``) and how many of those the relaxation selection kept;
* which relaxed rows of the shortlist became it (``known_material_id``, from
  :func:`lib.novelty.match_known_phases`: the MP cell as stored or as relaxed by the surrogate in
  ``references``, whose ``phase_id`` is the MP ``material_id``), and their best rank among all
  rows and among unique rows (``unique_rank``, relaxed duplicates folded).

:func:`rediscovery_summary` gives the counts and :func:`rediscovery_markdown` the table, as the
``shortlist`` asset's metadata and ``benchmarks/bench_rediscovery.py``'s report show them.
Pure functions of polars frames: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from lib.cells import CELL_COLUMNS

#: ASU sites of the paper's generator (and the training table's default cap).
DEFAULT_MAX_ASU_SITES = 4

#: Columns of :func:`system_phases`.
PHASE_SCHEMA: dict[str, pl.DataType] = {
    "material_id": pl.String(),
    "formula": pl.String(),
    "reduced_formula": pl.String(),
    "elements": pl.List(pl.String),
    "n_elements": pl.Int64(),
    "spacegroup_number": pl.Int64(),
    "n_asu_sites": pl.Int64(),
}

#: Columns of :func:`rediscovery_table` beyond :data:`PHASE_SCHEMA`.
REDISCOVERY_SCHEMA: dict[str, pl.DataType] = {
    "is_representable": pl.Boolean(),
    "can_appear": pl.Boolean(),
    "unreachable_reason": pl.String(),
    "n_candidates_before_relaxation": pl.Int64(),
    "n_selected_matching_before": pl.Int64(),
    "n_relaxed_rows_matching": pl.Int64(),
    "n_unique_rows_matching": pl.Int64(),
    "best_rank": pl.Int64(),
    "best_unique_rank": pl.Int64(),
    "candidate_ids_after": pl.List(pl.String),
}


def _reduced(species: list[str]) -> tuple[str, str]:
    from pymatgen.core import Composition

    comp = Composition({el: species.count(el) for el in dict.fromkeys(species)})
    return comp.formula.replace(" ", ""), comp.reduced_formula


def system_phases(mp_structures: pl.DataFrame, *, elements: Iterable[str],
                  symmetry: pl.DataFrame | None = None, symprec: float = 0.1) -> pl.DataFrame:
    """The known phases of the system and its subsystems, one row each (:data:`PHASE_SCHEMA`).

    ``mp_structures``: the ``mp_structures`` table (``material_id``) or a
    :func:`lib.screening.mp_csv_cells` frame (``phase_id``), with cell columns; rows whose
    elements are not a subset of ``elements`` are left out. ``symmetry``: the ``mp_symmetry``
    table (``material_id``, ``spacegroup_number``, ``n_asu_sites``); a phase it lacks (or all,
    when ``None``) is analysed here with :func:`lib.symmetry.analyse_symmetry` at ``symprec``.

    Raises ``ValueError`` naming the missing column or the row without a cell.
    """
    allowed = set(elements)
    id_col = "material_id" if "material_id" in mp_structures.columns else "phase_id"
    missing = [c for c in (id_col, *CELL_COLUMNS) if c not in mp_structures.columns]
    if missing:
        raise ValueError(f"known phases: mp_structures lacks column(s) {missing} (has {mp_structures.columns[:12]})")
    rows = []
    for i, r in enumerate(mp_structures.select(id_col, *CELL_COLUMNS).iter_rows(named=True)):
        if r["species"] is None or r["lattice_matrix"] is None or r["frac_coords"] is None:
            raise ValueError(f"known phases: mp_structures row {i} ({id_col}={r[id_col]}) has no cell")
        if not set(r["species"]) <= allowed:
            continue
        formula, reduced = _reduced(list(r["species"]))
        els = sorted(set(r["species"]))
        rows.append({"material_id": str(r[id_col]), "formula": formula, "reduced_formula": reduced,
                     "elements": els, "n_elements": len(els), "lattice_matrix": r["lattice_matrix"],
                     "species": r["species"], "frac_coords": r["frac_coords"]})
    cells = pl.DataFrame(rows, schema={**{k: v for k, v in PHASE_SCHEMA.items() if k in (
        "material_id", "formula", "reduced_formula", "elements", "n_elements")},
        "lattice_matrix": pl.List(pl.Float64), "species": pl.List(pl.String),
        "frac_coords": pl.List(pl.List(pl.Float64))})
    sym_cols = ["material_id", "spacegroup_number", "n_asu_sites"]
    known = pl.DataFrame(schema={c: PHASE_SCHEMA[c] for c in sym_cols})
    if symmetry is not None:
        bad = [c for c in sym_cols if c not in symmetry.columns]
        if bad:
            raise ValueError(f"known phases: mp_symmetry lacks column(s) {bad}")
        known = symmetry.select(sym_cols).cast({c: PHASE_SCHEMA[c] for c in sym_cols}).join(
            cells.select("material_id"), on="material_id", how="semi")
    todo = cells.join(known, on="material_id", how="anti")
    if todo.height:
        from lib.symmetry import analyse_symmetry

        computed = analyse_symmetry(todo.select("material_id", *CELL_COLUMNS), symprec=symprec,
                                    round_trip_method="none").select(sym_cols)
        known = pl.concat([known, computed.cast({c: PHASE_SCHEMA[c] for c in sym_cols})])
    return (cells.drop(*CELL_COLUMNS).join(known.unique("material_id", keep="first"), on="material_id", how="left")
            .select(list(PHASE_SCHEMA)).sort("n_elements", "reduced_formula", "material_id",
                                             descending=[True, False, False]))


def max_training_asu_sites(training_templates: pl.DataFrame | None, default: int = DEFAULT_MAX_ASU_SITES) -> int:
    """The largest ASU of the GAN's training table (``n_asu_sites``); ``default`` without one."""
    if training_templates is None or training_templates.is_empty() or "n_asu_sites" not in training_templates.columns:
        return default
    top = training_templates["n_asu_sites"].max()
    return int(top) if isinstance(top, int | float) else default


def _counts(frame: pl.DataFrame | None, key: str) -> dict[str, int]:
    if frame is None or frame.is_empty():
        return {}
    return {str(k): int(n) for k, n in frame.filter(pl.col(key).is_not_null()).group_by(key).len().iter_rows()}


def rediscovery_table(
    phases: pl.DataFrame,
    *,
    elements: Iterable[str],
    max_asu_sites: int = DEFAULT_MAX_ASU_SITES,
    require_all_elements: bool = True,
    candidates: pl.DataFrame | None = None,
    relaxed_ids: Iterable[str] | None = None,
    shortlist: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per known phase (:func:`system_phases`; at least ``material_id``, ``n_elements``,
    ``n_asu_sites``, the other :data:`PHASE_SCHEMA` columns null when absent) with
    :data:`REDISCOVERY_SCHEMA`'s columns.

    ``candidates``: ``candidate_id``, ``is_known_in_mp``, ``mp_material_id`` (``candidates_dedup``:
    the MP match before relaxation); ``relaxed_ids``: the candidate ids the relaxation selected
    (``n_selected_matching_before`` counts the pre-relaxation matches among them);
    ``shortlist``: ``candidate_id``, ``rank``, ``unique_rank``, ``duplicate_of``,
    ``known_material_id`` (after relaxation). A frame not given leaves its counts at 0 and its
    ranks null.
    """
    system = sorted(set(elements))
    bad = [c for c in ("material_id", "n_elements", "n_asu_sites") if c not in phases.columns]
    if bad:
        raise ValueError(f"rediscovery: the phases lack column(s) {bad}")
    for frame, cols, what in ((candidates, ("candidate_id", "is_known_in_mp", "mp_material_id"), "candidates_dedup"),
                              (shortlist, ("candidate_id", "rank", "unique_rank", "duplicate_of",
                                           "known_material_id"), "shortlist")):
        if frame is not None:
            bad = [c for c in cols if c not in frame.columns]
            if bad:
                raise ValueError(f"rediscovery: {what} lacks column(s) {bad}")
    matched = (candidates.filter(pl.col("is_known_in_mp").fill_null(False)).select("candidate_id", "mp_material_id")
               if candidates is not None else None)
    before = _counts(matched, "mp_material_id")
    sel = (_counts(matched.filter(pl.col("candidate_id").is_in(list(relaxed_ids))), "mp_material_id")
           if matched is not None and relaxed_ids is not None else {})
    after: dict[str, dict[str, Any]] = {}
    if shortlist is not None and shortlist.height:
        agg = (shortlist.filter(pl.col("known_material_id").is_not_null()).group_by("known_material_id").agg(
            pl.len().alias("n"), pl.col("duplicate_of").is_null().sum().alias("n_unique"),
            pl.col("rank").min().alias("best_rank"),
            pl.col("unique_rank").filter(pl.col("duplicate_of").is_null()).min().alias("best_unique_rank"),
            pl.col("candidate_id").sort_by("rank").alias("ids")))
        after = {r["known_material_id"]: r for r in agg.iter_rows(named=True)}
    rows = []
    for p in phases.iter_rows(named=True):
        mid, n_asu = p["material_id"], p["n_asu_sites"]
        representable = n_asu is not None and n_asu <= max_asu_sites
        all_elements = p["n_elements"] == len(system)
        if n_asu is None:
            reason = "no symmetry analysis (ASU unknown)"
        elif not representable:
            reason = f"{n_asu} ASU sites > {max_asu_sites}"
        elif require_all_elements and not all_elements:
            reason = f"not {len(system)}-element: the infill places all of {'/'.join(system)}"
        else:
            reason = None
        a = after.get(mid, {})
        rows.append({**{k: p.get(k) for k in PHASE_SCHEMA}, "is_representable": representable,
                     "can_appear": reason is None, "unreachable_reason": reason,
                     "n_candidates_before_relaxation": before.get(mid, 0),
                     "n_selected_matching_before": sel.get(mid, 0),
                     "n_relaxed_rows_matching": int(a.get("n", 0)), "n_unique_rows_matching": int(a.get("n_unique", 0)),
                     "best_rank": a.get("best_rank"), "best_unique_rank": a.get("best_unique_rank"),
                     "candidate_ids_after": a.get("ids", [])})
    return pl.DataFrame(rows, schema={**PHASE_SCHEMA, **REDISCOVERY_SCHEMA})


def _label(r: dict[str, Any]) -> str:
    return f"{r['material_id']} {r['reduced_formula']}"


def rediscovery_summary(table: pl.DataFrame) -> dict[str, Any]:
    """Counts of :func:`rediscovery_table` (JSON-able): phases, representable or not (with the
    ones that are not and why), those among the candidates before relaxation and among the
    relaxed rows, and the best unique rank of each rediscovered phase."""
    rows = table.to_dicts()
    n_sys = max((r["n_elements"] for r in rows), default=0)
    return {
        "n_known_phases": len(rows),
        "n_known_phases_all_elements": sum(r["n_elements"] == n_sys for r in rows),
        "n_representable": sum(bool(r["is_representable"]) for r in rows),
        "not_representable": [f"{_label(r)} ({r['unreachable_reason']})" for r in rows if not r["is_representable"]],
        "n_can_appear": sum(bool(r["can_appear"]) for r in rows),
        "can_appear": [_label(r) for r in rows if r["can_appear"]],
        "n_before_relaxation": sum(r["n_candidates_before_relaxation"] > 0 for r in rows),
        "before_relaxation": {_label(r): r["n_candidates_before_relaxation"] for r in rows
                              if r["n_candidates_before_relaxation"] > 0},
        "n_after_relaxation": sum(r["n_relaxed_rows_matching"] > 0 for r in rows),
        "after_relaxation_best_unique_rank": {_label(r): r["best_unique_rank"] for r in rows
                                              if r["n_relaxed_rows_matching"] > 0},
    }


def rediscovery_markdown(table: pl.DataFrame, *, max_rows: int = 60) -> str:
    """:func:`rediscovery_table` as a Markdown table (one line per phase, the first ``max_rows``)."""
    head = ("| phase | formula | SG | ASU sites | can appear? | before: candidates / selected | "
            "after: relaxed rows (unique) | best rank | best unique rank |\n"
            "|---|---|---:|---:|---|---|---|---:|---:|")
    lines = [head]
    for r in table.head(max_rows).iter_rows(named=True):
        dash = lambda v: "-" if v is None else str(v)  # noqa: E731
        lines.append(
            f"| {r['material_id']} | {r['reduced_formula']} | {dash(r['spacegroup_number'])} | {dash(r['n_asu_sites'])} "
            f"| {'yes' if r['can_appear'] else 'no: ' + str(r['unreachable_reason'])} "
            f"| {r['n_candidates_before_relaxation']} / {r['n_selected_matching_before']} "
            f"| {r['n_relaxed_rows_matching']} ({r['n_unique_rows_matching']}) | {dash(r['best_rank'])} "
            f"| {dash(r['best_unique_rank'])} |")
    if table.height > max_rows:
        lines.append(f"| ... {table.height - max_rows} more | | | | | | | | |")
    return "\n".join(lines)
