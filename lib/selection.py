"""Composition-aware selection: the pre-screen sample, static hull distances, what gets relaxed.

In a ternary system the raw energy per atom mostly measures composition (Ru's elemental energy
is -9.3 eV/atom, Ba's -1.9), so "the best K by energy per atom" is a list of Ru-rich suboxides.
This module holds the three pieces that replace it:

* :func:`stratified_sample`: a reduced run's pre-screen input, a seeded random sample
  stratified by composition (proportional allocation, at least one row per stratum when ``n``
  allows), deterministic: rows are ordered inside each stratum by a content hash of
  ``(seed, key)``, so the same seed and candidates always give the same sample, whatever the
  input order;
* :func:`static_hull_distance`: each pre-screened candidate's formation energy and energy
  above the hull of the system's references relaxed with the **same surrogate**, from its static
  (unrelaxed) energy;
* :func:`select_for_relaxation`: the best ``k`` by ``rank_by`` (energy above that hull by
  default; formation energy or raw energy per atom as options), with an optional quota per
  composition so one formula cannot fill the relaxation budget.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import polars as pl

from lib.ids import hash_column

#: Columns :func:`static_hull_distance` adds.
STATIC_HULL_SCHEMA: dict[str, pl.DataType] = {
    "static_formation_energy_per_atom_ev": pl.Float64(),
    "static_e_above_hull_ev_per_atom": pl.Float64(),
    "static_decomposition": pl.String(),
    "static_hull_error": pl.String(),
}
RankBy = Literal["e_above_hull", "formation_energy", "energy_per_atom"]
#: The column each ``rank_by`` of :func:`select_for_relaxation` sorts on.
RANK_COLUMNS: dict[str, str] = {
    "e_above_hull": "static_e_above_hull_ev_per_atom",
    "formation_energy": "static_formation_energy_per_atom_ev",
    "energy_per_atom": "energy_per_atom_ev",
}


def _require(frame: pl.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing} (has {frame.columns[:20]})")


def _hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


# --------------------------------------------------------------------------- stratified sample
def allocate_strata(sizes: Mapping[str | None, int], n: int, *, seed: int = 0) -> dict[str | None, int]:
    """Rows to draw from each stratum: proportional to its size (``n * size / total``, rounded
    by largest remainder), at least one per stratum and at most its size.

    When ``n`` is below the number of strata, one row from each of the ``n`` largest strata
    (ties in a seeded hash order). The allocation sums to ``min(n, total)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    names = list(sizes)
    size = np.array([int(sizes[s]) for s in names], dtype=np.int64)
    if (size < 1).any():
        raise ValueError("every stratum needs at least one row")
    total = int(size.sum())
    tie = np.array([_hash(seed, str(s)) for s in names])
    if n >= total:
        return {s: int(v) for s, v in zip(names, size, strict=True)}
    if n < len(names):
        order = sorted(range(len(names)), key=lambda i: (-size[i], tie[i]))
        chosen = set(order[:n])
        return {s: int(i in chosen) for i, s in enumerate(names)}
    target = n * size / total
    alloc = np.clip(np.floor(target).astype(np.int64), 1, size)
    diff = n - int(alloc.sum())
    if diff > 0:  # largest remainders first
        elig = [i for i in range(len(names)) if alloc[i] < size[i]]
        for i in sorted(elig, key=lambda i: (-(target[i] - alloc[i]), tie[i]))[:diff]:
            alloc[i] += 1
    while diff < 0:  # the minimum of one pushed the sum over n: take from the most over-allocated
        elig = sorted((i for i in range(len(names)) if alloc[i] > 1), key=lambda i: (target[i] - alloc[i], tie[i]))
        for i in elig[:-diff]:
            alloc[i] -= 1
        diff = n - int(alloc.sum())
    return {s: int(v) for s, v in zip(names, alloc, strict=True)}


def stratified_sample(candidates: pl.DataFrame, n: int, *, seed: int, by: str = "reduced_formula",
                      key: str = "candidate_id") -> pl.DataFrame:
    """A seeded random sample of ``n`` rows, stratified by ``by`` (:func:`allocate_strata`).

    Inside each stratum, rows are taken in the order of ``sha256(seed, key)``, so the result
    depends only on the seed and the set of rows. Returns the sampled rows (all columns) sorted
    by ``key``; all rows when ``n`` is at least their number. A null ``by`` is a stratum of its
    own. Raises ``ValueError`` on a missing column, a duplicated or null ``key``, or ``n < 0``.
    """
    _require(candidates, (key, by), "candidates")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if candidates[key].null_count():
        raise ValueError(f"stratified_sample: {candidates[key].null_count()} row(s) without {key}")
    if candidates[key].is_duplicated().any():
        dups = candidates.filter(pl.col(key).is_duplicated())[key].unique().head(5).to_list()
        raise ValueError(f"stratified_sample: duplicate {key} (e.g. {dups})")
    if n >= candidates.height:
        return candidates.sort(key)
    sizes = dict(candidates.group_by(by).len().iter_rows())
    alloc = allocate_strata(sizes, n, seed=seed)
    quota = pl.DataFrame({by: list(alloc), "_quota": list(alloc.values())},
                         schema={by: candidates.schema[by], "_quota": pl.Int64})
    ranked = (candidates
              .with_columns(hash_column(pl.lit(f"{seed}\0") + pl.col(key).cast(pl.String), length=64).alias("_h"))
              .sort(by, "_h", key, nulls_last=True)
              .with_columns(pl.int_range(pl.len()).over(by).alias("_i"))
              .join(quota, on=by, how="left", nulls_equal=True))
    return ranked.filter(pl.col("_i") < pl.col("_quota")).drop("_h", "_i", "_quota").sort(key)


# --------------------------------------------------------------------------- static hull distance
def static_hull_distance(prescreen: pl.DataFrame, references: pl.DataFrame, *,
                         elements: Iterable[str] | None = None) -> pl.DataFrame:
    """``prescreen`` with :data:`STATIC_HULL_SCHEMA` columns: formation energy and energy above
    the hull of ``references`` from each candidate's static energy per atom.

    ``prescreen``: the ``prescreen`` table (``candidate_id``, ``status``, ``energy_per_atom_ev``,
    and ``reduced_formula`` or ``formula``). ``references``: the ``reference_energies`` table
    of the **same surrogate** (its ``kind = "reference"`` rows with ``status = "ok"``:
    ``phase_id``, ``formula``, ``energy_ev``). The hull is pymatgen's ``PhaseDiagram`` of
    those phases; chemical potentials are the lowest elemental energies per atom among them (as
    :func:`lib.screening.formation_and_hull`). Computed once per reduced formula, so millions
    of rows are cheap. A row that is not ``ok``, or whose formula holds an element outside the
    references (or ``elements``), gets null values and ``static_hull_error``.

    Raises ``ValueError`` on missing columns, when the two frames name different surrogates
    (``surrogate_sha256``: energies of different models are never mixed), or when an element
    of ``elements`` (default: every element of the references) has no elemental reference.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    comp_col = "reduced_formula" if "reduced_formula" in prescreen.columns else "formula"
    _require(prescreen, ("candidate_id", "status", "energy_per_atom_ev", comp_col), "prescreen")
    _require(references, ("phase_id", "formula", "energy_ev", "status"), "reference_energies")
    refs = references.filter(pl.col("status") == "ok")
    if "kind" in refs.columns:
        refs = refs.filter(pl.col("kind") == "reference")
    refs = refs.filter(pl.col("energy_ev").is_not_null() & pl.col("energy_ev").is_finite())
    if refs.is_empty():
        raise ValueError("static_hull_distance: no relaxed reference phase (status ok) to build the hull from")
    if "surrogate_sha256" in prescreen.columns and "surrogate_sha256" in refs.columns:
        a = set(prescreen["surrogate_sha256"].drop_nulls().unique().to_list())
        b = set(refs["surrogate_sha256"].drop_nulls().unique().to_list())
        if (a and b and a != b) or len(a) > 1 or len(b) > 1:
            raise ValueError(f"static_hull_distance: prescreen surrogate(s) {sorted(a)} and reference surrogate(s) "
                             f"{sorted(b)} differ: the hull must be built with the candidates' own surrogate")
    entries: list[PDEntry] = []
    mu: dict[str, float] = {}
    for pid, formula, e in refs.select("phase_id", "formula", "energy_ev").iter_rows():
        comp = Composition(formula)
        entries.append(PDEntry(comp, e, name=pid))
        if len(comp.elements) == 1:
            el = comp.elements[0].symbol
            mu[el] = min(mu.get(el, math.inf), e / comp.num_atoms)
    system = set(elements) if elements is not None else {el.symbol for e in entries for el in e.composition.elements}
    missing = sorted(system - set(mu))
    if missing:
        raise ValueError(f"static_hull_distance: no relaxed elemental reference for {missing}: "
                         "cannot compute formation energies")
    pd_ = PhaseDiagram(entries)
    per_formula: dict[str, tuple[float | None, float | None, str | None, str | None]] = {}
    for f in prescreen[comp_col].drop_nulls().unique().to_list():
        try:
            comp = Composition(f)
        except Exception as exc:  # noqa: BLE001 - reported on the rows
            per_formula[f] = (None, None, None, f"formula {f!r} does not parse: {exc}")
            continue
        extra = sorted({el.symbol for el in comp.elements} - (system & set(mu)))
        if extra:
            per_formula[f] = (None, None, None, f"element(s) {extra} outside the references' system "
                                                f"{'-'.join(sorted(system))}")
            continue
        mu_f = sum(comp.get_atomic_fraction(el) * mu[el.symbol] for el in comp.elements)
        hull = float(pd_.get_hull_energy_per_atom(comp))
        decomp = pd_.get_decomposition(comp)
        text = " + ".join(f"{amt:.3f} {getattr(e, 'name', e.composition.reduced_formula)}" for e, amt in sorted(decomp.items(), key=lambda kv: (-kv[1], str(getattr(kv[0], "name", "")))))
        per_formula[f] = (mu_f, hull, text, None)
    table = pl.DataFrame(
        {"_f": list(per_formula), "_mu": [v[0] for v in per_formula.values()],
         "_hull": [v[1] for v in per_formula.values()], "static_decomposition": [v[2] for v in per_formula.values()],
         "_err": [v[3] for v in per_formula.values()]},
        schema={"_f": pl.String, "_mu": pl.Float64, "_hull": pl.Float64, "static_decomposition": pl.String,
                "_err": pl.String})
    ok = (pl.col("status") == "ok") & pl.col("energy_per_atom_ev").is_not_null()
    base = prescreen.drop([c for c in STATIC_HULL_SCHEMA if c in prescreen.columns])
    out = base.with_columns(pl.col(comp_col).alias("_f")).join(table, on="_f", how="left", maintain_order="left")
    return out.with_columns(
        pl.when(ok).then(pl.col("energy_per_atom_ev") - pl.col("_mu")).alias("static_formation_energy_per_atom_ev"),
        pl.when(ok).then(pl.col("energy_per_atom_ev") - pl.col("_hull")).alias("static_e_above_hull_ev_per_atom"),
        pl.when(ok).then(pl.col("static_decomposition")).alias("static_decomposition"),
        pl.when(~ok).then(pl.lit("not pre-screened (status not ok)")).when(pl.col("_f").is_null())
        .then(pl.lit(f"no {comp_col}")).otherwise(pl.col("_err")).alias("static_hull_error"),
    ).drop("_f", "_mu", "_hull", "_err")


# --------------------------------------------------------------------------- selection
def select_for_relaxation(frame: pl.DataFrame, k: int, *, rank_by: RankBy = "e_above_hull",
                          per_composition_quota: int | None = None,
                          composition_col: str = "reduced_formula",
                          max_atoms: int | None = None) -> pl.DataFrame:
    """The best ``k`` pre-screened rows by ``rank_by`` (:data:`RANK_COLUMNS`; ties by
    ``candidate_id``), at most ``per_composition_quota`` of each ``composition_col`` when set,
    only rows with at most ``max_atoms`` in the cell (``n_atoms``) when set: a budget for what
    comes after (DFT verification of a few-atom shortlist on a laptop).

    Rows that are not ``ok`` or have no finite ranking value are never selected. Adds
    ``selection_rank`` (1..k) and keeps every column. Raises ``ValueError`` on an unknown
    ``rank_by``, a missing column (run :func:`static_hull_distance` first for the hull and
    formation-energy rankings), ``k < 0`` or a quota below 1.
    """
    if rank_by not in RANK_COLUMNS:
        raise ValueError(f"rank_by must be one of {list(RANK_COLUMNS)}, not {rank_by!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    if per_composition_quota is not None and per_composition_quota < 1:
        raise ValueError(f"per_composition_quota must be >= 1 or None, not {per_composition_quota}")
    if max_atoms is not None and max_atoms < 1:
        raise ValueError(f"max_atoms must be >= 1 or None, not {max_atoms}")
    col = RANK_COLUMNS[rank_by]
    need = ["candidate_id", "status", col, *([composition_col] if per_composition_quota else []),
            *(["n_atoms"] if max_atoms else [])]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        hint = " (add them with lib.selection.static_hull_distance)" if col in missing and col.startswith("static_") else ""
        raise ValueError(f"select_for_relaxation: frame lacks column(s) {missing}{hint}")
    ok = frame.filter((pl.col("status") == "ok") & pl.col(col).is_not_null() & pl.col(col).is_finite())
    if max_atoms:
        ok = ok.filter(pl.col("n_atoms") <= max_atoms)
    ranked = ok.sort([col, "candidate_id"])
    if per_composition_quota is not None:
        ranked = ranked.filter(pl.int_range(pl.len()).over(composition_col) < per_composition_quota)
    return ranked.head(k).with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("selection_rank"))


def selection_summary(selected: pl.DataFrame, *, composition_col: str = "reduced_formula") -> pl.DataFrame:
    """Per composition of a selection: rows, and the lowest / median static energy above the hull
    and formation energy (when present), most rows first: the composition spread for metadata."""
    _require(selected, (composition_col,), "selection")
    aggs = [pl.len().alias("n_rows")]
    for c in ("static_e_above_hull_ev_per_atom", "static_formation_energy_per_atom_ev", "energy_per_atom_ev"):
        if c in selected.columns:
            aggs += [pl.col(c).min().alias(f"min_{c}"), pl.col(c).median().alias(f"median_{c}")]
    return selected.group_by(composition_col).agg(aggs).sort(["n_rows", composition_col], descending=[True, False])
