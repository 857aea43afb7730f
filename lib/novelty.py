"""Known phases caught after relaxation: match relaxed cells against every known structure.

``candidates_dedup`` flags MP matches *before* relaxation; a candidate that relaxes into a known
phase must still be caught. :func:`match_known_phases` compares each relaxed row with every known
structure of the same reduced formula (StructureMatcher only matches equal reduced formulas, so
this covers the chemical system and all its subsystems) and adds:

* ``known_material_id``: the id of the first known structure that matches (null when none);
* ``known_source``: where that structure came from (see :func:`known_structures`);
* ``is_novel``: ``False`` on a match, ``True`` when compared and nothing matched, null when the
  row could not be compared (not relaxed, no cell).

The known structures (:func:`known_structures`) come from several tables, each a ``source``:

* ``mp``: the MP source (``mp_structures`` table, or :func:`lib.screening.mp_csv_cells` of an
  MP-20-layout file), cells as stored;
* ``references``: the competing phases of the ``references`` asset (``reference_energies``
  rows with ``kind = "reference"``) as relaxed by the surrogate: a candidate that relaxed into
  the surrogate's version of a known phase counts as known;
* ``dft_results``: every ingested DFT result (its final cell; ``candidate_id`` kept, so a
  row is never matched with its own DFT result).

Matching is pymatgen's ``StructureMatcher(ltol, stol, angle_tol, primitive_cell=True,
scale=True)`` (default tolerances: :data:`lib.cells.MATCHER_TOLERANCES`, pymatgen's own,
0.2 / 0.3 / 5°) through :mod:`lib.dedup`'s reduce-once path: every structure is reduced once
(``reduce_structure``, StructureMatcher's own reduction) and pairs are decided by
``fit_reduced(known, candidate)``; pairs whose reduced cells have different atom counts cannot
fit and are skipped. Known structures are tried in ``source_priority`` order, then by
``material_id``, and the first match wins. Nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

from lib.cells import CELL_COLUMNS, MATCHER_TOLERANCES, cell_to_structure

#: Columns of a known-structures frame (:func:`known_structures`).
KNOWN_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "material_id": pl.String(),
    "candidate_id": pl.String(),
    "formula": pl.String(),
    "reduced_formula": pl.String(),
    "lattice_matrix": pl.List(pl.Float64),
    "species": pl.List(pl.String),
    "frac_coords": pl.List(pl.List(pl.Float64)),
}
#: Columns :func:`match_known_phases` adds.
NOVELTY_SCHEMA: dict[str, pl.DataType] = {
    "known_material_id": pl.String(),
    "known_source": pl.String(),
    "is_novel": pl.Boolean(),
}
#: Default order in which sources are tried (the first match wins).
SOURCE_PRIORITY: tuple[str, ...] = ("mp", "references", "dft_results")
#: dft_results statuses whose final cell counts as a known structure.
DFT_KNOWN_STATUSES: tuple[str, ...] = ("ok", "unlinked")


def _require(frame: pl.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing} (has {frame.columns[:20]})")


def _formulas(species: list[str]) -> tuple[str, str]:
    from pymatgen.core import Composition

    comp = Composition({el: species.count(el) for el in dict.fromkeys(species)})
    return comp.formula.replace(" ", ""), comp.reduced_formula


def _known_part(frame: pl.DataFrame, *, source: str, id_col: str, candidate_col: str | None,
                elements: set[str] | None) -> pl.DataFrame:
    rows = []
    for i, row in enumerate(frame.iter_rows(named=True)):
        species = row["species"]
        if row[id_col] is None:
            raise ValueError(f"known structures ({source}): row {i} has no {id_col}")
        if species is None or row["lattice_matrix"] is None or row["frac_coords"] is None:
            raise ValueError(f"known structures ({source}): row {i} ({id_col}={row[id_col]}) has no cell")
        if elements is not None and not set(species) <= elements:
            continue
        formula, reduced = _formulas(list(species))
        rows.append({"source": source, "material_id": str(row[id_col]),
                     "candidate_id": row[candidate_col] if candidate_col else None,
                     "formula": formula, "reduced_formula": reduced,
                     "lattice_matrix": row["lattice_matrix"], "species": species, "frac_coords": row["frac_coords"]})
    return pl.DataFrame(rows, schema=KNOWN_SCHEMA)


def known_structures(
    *,
    mp_structures: pl.DataFrame | None = None,
    references: pl.DataFrame | None = None,
    dft_results: pl.DataFrame | None = None,
    elements: Iterable[str] | None = None,
) -> pl.DataFrame:
    """The known structures of a chemical system and its subsystems, one frame (:data:`KNOWN_SCHEMA`).

    ``mp_structures``: the ``mp_structures`` table (``material_id``) or an
    :func:`lib.screening.mp_csv_cells` frame (``phase_id``), cell columns as stored ->
    source ``mp``. ``references``: the ``reference_energies`` table; its ``kind = "reference"``
    rows with ``status = "ok"`` and a cell (the surrogate-relaxed cells) -> source
    ``references``, id ``phase_id``. ``dft_results``: the ``dft_results`` table; rows with
    status in :data:`DFT_KNOWN_STATUSES` and a final cell -> source ``dft_results``, id
    ``result_id``, ``candidate_id`` kept. ``elements``: keep only structures whose elements are
    a subset (the system and its subsystems); ``None`` keeps all.

    Raises ``ValueError`` naming the table and row on a missing column, id or cell.
    """
    allowed = set(elements) if elements is not None else None
    parts = []
    if mp_structures is not None:
        id_col = "material_id" if "material_id" in mp_structures.columns else "phase_id"
        _require(mp_structures, (id_col, *CELL_COLUMNS), "mp_structures")
        parts.append(_known_part(mp_structures.select(id_col, *CELL_COLUMNS), source="mp", id_col=id_col,
                                 candidate_col=None, elements=allowed))
    if references is not None:
        _require(references, ("phase_id", "status", *CELL_COLUMNS), "reference_energies")
        refs = references.filter(pl.col("status") == "ok")
        if "kind" in refs.columns:
            refs = refs.filter(pl.col("kind") == "reference")
        refs = refs.filter(pl.col("lattice_matrix").is_not_null())
        parts.append(_known_part(refs.select("phase_id", *CELL_COLUMNS), source="references", id_col="phase_id",
                                 candidate_col=None, elements=allowed))
    if dft_results is not None:
        _require(dft_results, ("result_id", "candidate_id", "status", *CELL_COLUMNS), "dft_results")
        res = dft_results.filter(pl.col("status").is_in(list(DFT_KNOWN_STATUSES))
                                 & pl.col("lattice_matrix").is_not_null())
        parts.append(_known_part(res.select("result_id", "candidate_id", *CELL_COLUMNS), source="dft_results",
                                 id_col="result_id", candidate_col="candidate_id", elements=allowed))
    if not parts:
        return pl.DataFrame(schema=KNOWN_SCHEMA)
    return pl.concat(parts, how="vertical")


def _tolerances(ltol: float, stol: float, angle_tol: float) -> dict[str, float]:
    tol = {"ltol": float(ltol), "stol": float(stol), "angle_tol": float(angle_tol)}
    bad = [k for k, v in tol.items() if not v > 0]
    if bad:
        raise ValueError(f"matcher tolerance(s) {bad} must be > 0: {tol}")
    return tol


def match_known_phases(
    relaxed: pl.DataFrame,
    known: pl.DataFrame,
    *,
    ltol: float = MATCHER_TOLERANCES["ltol"],
    stol: float = MATCHER_TOLERANCES["stol"],
    angle_tol: float = MATCHER_TOLERANCES["angle_tol"],
    key: str = "candidate_id",
    source_priority: Sequence[str] = SOURCE_PRIORITY,
    allow_empty_known: bool = False,
) -> pl.DataFrame:
    """``relaxed`` with :data:`NOVELTY_SCHEMA` columns (see the module docstring).

    ``relaxed``: rows with ``key`` and the cell columns (the ``relaxed`` table, a shortlist
    joined with its relaxed cells, or DFT results with ``key="result_id"``); a ``status``
    column, when present, limits the comparison to ``ok`` rows (others get null). ``known``:
    :func:`known_structures`. When both frames have ``candidate_id``, a known row of the same
    candidate is never used (a candidate is not known because of its own DFT result).

    Raises ``ValueError`` on missing columns, non-positive tolerances, a duplicated ``key``, or
    an empty ``known`` frame (no known phase of the system: usually a missing MP source; pass
    ``allow_empty_known=True`` to mark every compared row novel anyway).
    """
    from lib.dedup import fit_reduced, reduce_structure

    tol = _tolerances(ltol, stol, angle_tol)
    _require(relaxed, (key, *CELL_COLUMNS), "relaxed frame")
    _require(known, KNOWN_SCHEMA, "known structures")
    if known.is_empty() and not allow_empty_known:
        raise ValueError("match_known_phases: no known structures (no MP source, references or DFT results "
                         "of this system were given); every row would be called novel")
    if relaxed[key].is_duplicated().any():
        dups = relaxed.filter(pl.col(key).is_duplicated())[key].unique().head(5).to_list()
        raise ValueError(f"match_known_phases: duplicate {key} in the relaxed frame (e.g. {dups})")
    rank = {s: i for i, s in enumerate(source_priority)}
    ordered = known.with_columns(
        pl.col("source").replace_strict(rank, default=len(rank), return_dtype=pl.Int64).alias("_prio")
    ).sort("_prio", "material_id")
    buckets: dict[str, list[dict[str, Any]]] = {}
    for row in ordered.iter_rows(named=True):
        buckets.setdefault(row["reduced_formula"], []).append(row)
    reduced_known: dict[int, Any] = {}

    def known_cell(row: dict[str, Any]) -> Any:
        k = id(row)
        if k not in reduced_known:
            reduced_known[k] = reduce_structure(cell_to_structure(row["lattice_matrix"], row["species"],
                                                                  row["frac_coords"]))
        return reduced_known[k]

    own = "candidate_id" if "candidate_id" in relaxed.columns else None
    cols = [key, *CELL_COLUMNS, *([own] if own and own != key else []),
            *(["status"] if "status" in relaxed.columns else [])]
    out_id: list[str | None] = []
    out_src: list[str | None] = []
    out_novel: list[bool | None] = []
    for i, row in enumerate(relaxed.select(cols).iter_rows(named=True)):
        if ("status" in row and row["status"] != "ok") or row["lattice_matrix"] is None or row["species"] is None:
            out_id.append(None)
            out_src.append(None)
            out_novel.append(None)
            continue
        try:
            s = cell_to_structure(row["lattice_matrix"], row["species"], row["frac_coords"])
        except Exception as exc:
            raise ValueError(f"match_known_phases: row {i} ({key}={row[key]}): cannot build the cell: {exc}") from exc
        group = [k for k in buckets.get(s.composition.reduced_formula, [])
                 if not (own and k["candidate_id"] is not None and k["candidate_id"] == row[own])]
        hit = None
        if group:
            cell = reduce_structure(s)
            for k in group:
                kc = known_cell(k)
                if kc.n == cell.n and fit_reduced(kc, cell, **tol):
                    hit = k
                    break
        out_id.append(hit["material_id"] if hit else None)
        out_src.append(hit["source"] if hit else None)
        out_novel.append(hit is None)
    base = relaxed.drop([c for c in NOVELTY_SCHEMA if c in relaxed.columns])
    return base.with_columns(pl.Series(name, vals, dtype=NOVELTY_SCHEMA[name]) for name, vals in
                             (("known_material_id", out_id), ("known_source", out_src), ("is_novel", out_novel)))


def novelty_metadata(matched: pl.DataFrame, *, ltol: float = MATCHER_TOLERANCES["ltol"],
                     stol: float = MATCHER_TOLERANCES["stol"],
                     angle_tol: float = MATCHER_TOLERANCES["angle_tol"]) -> dict[str, Any]:
    """Counts and settings of a :func:`match_known_phases` result, for asset metadata: the
    tolerances used, ``n_novel``, ``n_known``, ``n_unchecked``, ``n_duplicate`` (rows with a
    ``duplicate_of``, when that column exists), ``n_novel_unique`` and the matches by source and
    by known id."""
    _require(matched, NOVELTY_SCHEMA, "matched frame")
    novel = matched["is_novel"]
    meta: dict[str, Any] = {"matcher": "pymatgen StructureMatcher (primitive_cell, scale) via lib.dedup.fit_reduced",
                            **_tolerances(ltol, stol, angle_tol),
                            "n_rows": matched.height, "n_novel": int(novel.eq(True).sum()),
                            "n_known": int(novel.eq(False).sum()), "n_unchecked": int(novel.is_null().sum())}
    if "duplicate_of" in matched.columns:
        dup = matched["duplicate_of"].is_not_null()
        meta["n_duplicate"] = int(dup.sum())
        meta["n_novel_unique"] = int((novel.eq(True) & ~dup).sum())
    known = matched.filter(pl.col("is_novel").eq(False))
    meta["known_by_source"] = dict(sorted(known.group_by("known_source").len().iter_rows()))
    meta["known_by_material"] = dict(sorted(known.group_by("known_material_id").len().iter_rows()))
    return meta
