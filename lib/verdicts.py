"""Verdicts on DFT results: energy above the convex hull on one footing, phonons, novelty.

``discoveries`` used to select on the sign of the DFT formation energy, which nearly every oxide
passes. :func:`hull_verdicts` places each DFT result on the convex hull (pymatgen
``PhaseDiagram``) of **competing phases on the same energy footing** and gives it a ``verdict``:

===================== ======================================================================
``discovery``          on or below the hull (``e_above_hull_dft_ev_per_atom`` at most the
                       threshold, default 0.0 eV/atom), dynamically stable, novel
``rediscovery``        it matches a known phase (``is_novel`` false): listed apart, never a
                       discovery, whatever its hull distance
``above_hull``         above the threshold (formation energy may well be negative)
``unstable``           phonon minimum frequency at or below ``min_frequency_thz`` (-0.5 THz)
``no_phonons``         passes the hull, no phonon result, and phonons are required
``novelty_unchecked``  passes hull and phonons, but ``is_novel`` is null (never matched)
``missing_references`` the competing phases lack an element of the result (named), or hold no
                       compound of its system at all (``require_compounds``): no guess is made
``footing_mismatch``   the result's energies and the competing phases are on different footings
``not_evaluated``      the row is not a finished result (status, no energy, a correction that
                       cannot be applied); the reason says which
===================== ======================================================================

Checks are applied in the order ``not_evaluated``, ``footing_mismatch``, ``missing_references``,
``rediscovery``, ``above_hull``, ``unstable``, ``no_phonons``, ``novelty_unchecked``; the first
that applies is the verdict, and ``verdict_reason`` states every failed criterion with its numbers.

**Footing** (never mixed silently). Each competing-phase row carries ``footing``; a frame that
mixes footings raises. A result's footing is:

* ``energy_footing`` when the results carry that column (energies already on a footing, e.g.
  MP's own corrected energies: used as they are);
* for a VASP row (``dft_code`` ``vasp`` or null) with ``compatibility="MP2020"``: pymatgen's
  :class:`~pymatgen.entries.compatibility.MaterialsProject2020Compatibility` is applied to the
  raw energy (a ``ComputedStructureEntry`` of the final cell, so peroxides and superoxides are
  recognised from O-O distances; ``run_type`` GGA / GGA+U, ``hubbards`` JSON and, when present,
  ``potcar_symbols`` checked) -> footing ``MP2020``;
* otherwise ``<dft_code>`` or ``<dft_code>:<dft_preset_sha256>`` with no correction (a GPAW
  run is compared only with GPAW competing phases of the same preset).

Competing phases: :func:`mp_competing_phases` (MP source, footing ``MP2020``: MP's formation
energies are computed from MP2020-corrected energies, so the phase energies are rebuilt as
``E_f + sum x_i mu_i`` with the MP elemental ground states ``mu_i`` of
``mp_elemental_refs*.json``; the correction is *not* applied a second time) or
:func:`backend_competing_phases` (the DFT backend's own runs, one code and preset, no correction).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from lib.cells import CELL_COLUMNS, cell_to_structure
from lib.phonons import DEFAULT_THRESHOLD_THZ

if TYPE_CHECKING:
    from lib.dft_ingest import ElementalReferences

#: Footing label of MP2020-corrected energies.
MP2020 = "MP2020"
#: Numerical slack of the hull threshold (eV/atom): a phase on the hull computes to ~1e-12.
HULL_TOLERANCE_EV_PER_ATOM = 1e-6
DEFAULT_MAX_E_ABOVE_HULL_EV_PER_ATOM = 0.0
#: Dynamically stable when the lowest phonon frequency is above this (THz; imaginary < 0): the
#: phonon screen's own threshold, one number.
DEFAULT_MIN_FREQUENCY_THZ = DEFAULT_THRESHOLD_THZ
VERDICTS: tuple[str, ...] = ("discovery", "rediscovery", "above_hull", "unstable", "no_phonons",
                             "novelty_unchecked", "missing_references", "footing_mismatch", "not_evaluated")

#: Columns of a competing-phases frame.
COMPETING_SCHEMA: dict[str, pl.DataType] = {
    "phase_id": pl.String(),
    "formula": pl.String(),
    "reduced_formula": pl.String(),
    "energy_per_atom_ev": pl.Float64(),
    "footing": pl.String(),
    "source": pl.String(),
}
#: Columns :func:`hull_verdicts` adds (``is_novel`` and ``known_material_id`` are kept when given).
VERDICT_SCHEMA: dict[str, pl.DataType] = {
    "energy_footing": pl.String(),
    "compatibility": pl.String(),
    "energy_correction_ev_per_atom": pl.Float64(),
    "corrected_energy_per_atom_ev": pl.Float64(),
    "formation_energy_dft_ev_per_atom": pl.Float64(),
    "e_above_hull_dft_ev_per_atom": pl.Float64(),
    "decomposition_dft": pl.String(),
    "missing_references": pl.List(pl.String),
    "is_on_or_below_hull": pl.Boolean(),
    "is_dynamically_stable": pl.Boolean(),
    "is_novel": pl.Boolean(),
    "verdict": pl.String(),
    "verdict_reason": pl.String(),
}


def _composition(formula: str):
    from pymatgen.core import Composition

    return Composition(formula)


def _require(frame: pl.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing} (has {frame.columns[:20]})")


# --------------------------------------------------------------------------- competing phases
def mp_competing_phases(
    mp: pl.DataFrame,
    elemental: ElementalReferences | str | Path,
    *,
    elements: Iterable[str] | None = None,
    id_col: str = "material_id",
    formula_col: str = "formula",
    formation_col: str = "formation_energy_per_atom_ev",
    skip_missing_energies: bool = False,
) -> pl.DataFrame:
    """MP competing phases on the ``MP2020`` footing (:data:`COMPETING_SCHEMA`).

    ``mp``: MP rows with an id, a formula and MP's formation energy per atom (the
    ``mp_structures`` table; any frame with those columns, e.g. an MP-20 CSV with
    ``formation_col="formation_energy_per_atom"``). ``elemental``: the MP elemental ground states,
    a :class:`lib.dft_ingest.ElementalReferences` or the path of its JSON (``ComputedEntry``
    dicts keyed by element); each becomes a phase too. ``elements``: keep only phases inside
    this system (and its subsystems).

    Raises ``ValueError`` on a missing column, a formula that does not parse, an element with
    no elemental reference, or a null formation energy (unless ``skip_missing_energies``).
    """
    from lib.dft_ingest import ElementalReferences, load_elemental_references

    refs = (elemental if isinstance(elemental, ElementalReferences)
                                 else load_elemental_references(Path(elemental)))
    if refs.dft_code != "vasp":
        raise ValueError(f"elemental references {refs.source} are {refs.dft_code} energies, not MP (VASP) ones")
    _require(mp, (id_col, formula_col, formation_col), "MP phases")
    allowed = set(elements) if elements is not None else None
    rows = []
    for el, mu in sorted(refs.energy_per_atom_ev.items()):
        if allowed is None or el in allowed:
            rows.append({"phase_id": refs.entry_ids.get(el, el), "formula": el, "reduced_formula": el,
                         "energy_per_atom_ev": float(mu), "footing": MP2020, "source": f"elemental:{refs.source}"})
    null_ids = []
    for i, (pid, formula, ef) in enumerate(mp.select(id_col, formula_col, formation_col).iter_rows()):
        try:
            comp = _composition(formula)
        except Exception as exc:
            raise ValueError(f"MP phases: row {i} ({id_col}={pid}): formula {formula!r} does not parse: {exc}") from exc
        els = {e.symbol for e in comp.elements}
        if allowed is not None and not els <= allowed:
            continue
        if ef is None or not math.isfinite(ef):
            null_ids.append(str(pid))
            continue
        missing = sorted(els - set(refs.energy_per_atom_ev))
        if missing:
            raise ValueError(f"MP phases: row {i} ({id_col}={pid}, {formula}): no elemental reference for "
                             f"{missing} in {refs.source}")
        mu = sum(comp.get_atomic_fraction(e) * refs.energy_per_atom_ev[e.symbol] for e in comp.elements)
        rows.append({"phase_id": str(pid), "formula": comp.formula.replace(" ", ""),
                     "reduced_formula": comp.reduced_formula, "energy_per_atom_ev": float(ef) + mu,
                     "footing": MP2020, "source": "mp"})
    if null_ids and not skip_missing_energies:
        raise ValueError(f"MP phases: {len(null_ids)} row(s) have no {formation_col} (e.g. {null_ids[:5]}); "
                         "pass skip_missing_energies=True to leave them out of the hull")
    return pl.DataFrame(rows, schema=COMPETING_SCHEMA)


def _footing_of(dft_code: str | None, preset_sha: str | None) -> str:
    return (dft_code or "vasp") + (f":{preset_sha}" if preset_sha else "")


def backend_competing_phases(results: pl.DataFrame, *, dft_code: str, dft_preset_sha256: str | None = None,
                             statuses: Sequence[str] = ("ok", "unlinked")) -> pl.DataFrame:
    """Competing phases computed by the DFT backend itself (``dft_results`` rows of one code and
    preset, status in ``statuses``), with no correction: footing ``<dft_code>[:<preset sha>]``.
    ``phase_id`` is the ``result_id``. Raises ``ValueError`` when no row qualifies."""
    _require(results, ("result_id", "status", "final_energy_ev", "n_atoms", "formula"), "dft_results")
    code = pl.col("dft_code").fill_null("vasp") if "dft_code" in results.columns else pl.lit("vasp")
    sel = results.filter((code == dft_code) & pl.col("status").is_in(list(statuses))
                         & pl.col("final_energy_ev").is_not_null() & (pl.col("n_atoms") > 0))
    if dft_preset_sha256 is not None:
        if "dft_preset_sha256" not in results.columns:
            raise ValueError("dft_results lacks column dft_preset_sha256: cannot select the preset")
        sel = sel.filter(pl.col("dft_preset_sha256") == dft_preset_sha256)
    if sel.is_empty():
        raise ValueError(f"no {dft_code} results (preset {dft_preset_sha256}) with status in {list(statuses)} "
                         "to use as competing phases")
    rows = []
    for rid, formula, e, n in sel.select("result_id", "formula", "final_energy_ev", "n_atoms").iter_rows():
        comp = _composition(formula)
        rows.append({"phase_id": rid, "formula": comp.formula.replace(" ", ""), "reduced_formula": comp.reduced_formula,
                     "energy_per_atom_ev": e / n, "footing": _footing_of(dft_code, dft_preset_sha256),
                     "source": "dft_results"})
    return pl.DataFrame(rows, schema=COMPETING_SCHEMA)


# --------------------------------------------------------------------------- corrections
def mp2020_correction(structure: Any, energy_ev: float, *, run_type: str, hubbards: dict[str, float] | None = None,
                      potcar_symbols: Sequence[str] | None = None, entry_id: str = "") -> tuple[float, list[str]]:
    """Total MaterialsProject2020Compatibility correction (eV per cell) of a raw VASP energy, and
    the names of the adjustments. POTCARs are checked only when ``potcar_symbols`` are given
    (``"PAW_PBE Ba_sv 06Sep2000"`` titles). Raises pymatgen's ``CompatibilityError`` (a
    ``ValueError``) when the entry is not compatible (run type, U values, POTCARs)."""
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    params: dict[str, Any] = {"run_type": run_type, "hubbards": dict(hubbards or {}),
                              "is_hubbard": bool(hubbards) and any(v for v in (hubbards or {}).values())}
    if potcar_symbols:
        params["potcar_symbols"] = list(potcar_symbols)
    entry = ComputedStructureEntry(structure, energy_ev, parameters=params, entry_id=entry_id or None)
    compat = MaterialsProject2020Compatibility(check_potcar=bool(potcar_symbols))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adjustments = compat.get_adjustments(entry)
    return float(sum(a.value for a in adjustments)), [a.name for a in adjustments]


# --------------------------------------------------------------------------- verdicts
def _row_composition(row: dict[str, Any]):
    from pymatgen.core import Composition

    species = row.get("species")
    if species:
        return Composition({el: species.count(el) for el in dict.fromkeys(species)})
    formula = row.get("formula")
    return Composition(formula) if formula else None


class _Hulls:
    """PhaseDiagrams of the competing phases, one per chemical system (cached)."""

    def __init__(self, competing: pl.DataFrame) -> None:
        from pymatgen.analysis.phase_diagram import PDEntry

        self.entries = []
        for pid, formula, e in competing.select("phase_id", "formula", "energy_per_atom_ev").iter_rows():
            comp = _composition(formula)
            self.entries.append((frozenset(el.symbol for el in comp.elements),
                                 PDEntry(comp, e * comp.num_atoms, name=pid)))
        self.elemental = {next(iter(els)) for els, _ in self.entries if len(els) == 1}
        self._cache: dict[tuple[frozenset[str], str | None], Any] = {}

    def compounds(self, elements: frozenset[str]) -> int:
        return sum(1 for els, _ in self.entries if len(els) > 1 and els <= elements)

    def diagram(self, elements: frozenset[str], exclude: str | None):
        from pymatgen.analysis.phase_diagram import PhaseDiagram

        if not any(e.name == exclude for _, e in self.entries):
            exclude = None
        key = (elements, exclude)
        if key not in self._cache:
            self._cache[key] = PhaseDiagram([e for els, e in self.entries if els <= elements and e.name != exclude])
        return self._cache[key]


def _fmt_decomp(decomp: dict) -> str:
    return " + ".join(f"{amt:.3f} {e.name} ({e.composition.reduced_formula})"
                      for e, amt in sorted(decomp.items(), key=lambda kv: (-kv[1], kv[0].name)))


def hull_verdicts(
    results: pl.DataFrame,
    competing: pl.DataFrame,
    *,
    max_e_above_hull_ev_per_atom: float = DEFAULT_MAX_E_ABOVE_HULL_EV_PER_ATOM,
    min_frequency_thz: float = DEFAULT_MIN_FREQUENCY_THZ,
    require_phonons: bool = True,
    require_compounds: bool = True,
    compatibility: Literal["MP2020", "none"] = "MP2020",
    default_run_type: Literal["GGA", "GGA+U"] | None = None,
    statuses: Sequence[str] = ("ok",),
    key: str = "result_id",
) -> pl.DataFrame:
    """``results`` with :data:`VERDICT_SCHEMA` columns, one verdict per row (see the module docstring).

    ``results``: DFT result rows (the ``dft_results`` layout): ``key``, ``status``,
    ``final_energy_ev`` (eV per cell, raw), ``n_atoms``, ``species`` or ``formula``, the final
    cell (needed for MP2020: oxide type), optional ``dft_code``, ``dft_preset_sha256``,
    ``run_type`` (GGA | GGA+U; else ``default_run_type``), ``hubbards`` (JSON object),
    ``potcar_symbols``, ``energy_footing``, ``min_frequency_thz`` (null: no phonons),
    ``is_novel`` / ``known_material_id`` (from :func:`lib.novelty.match_known_phases`).
    ``competing``: :func:`mp_competing_phases` or :func:`backend_competing_phases` (one footing).
    A competing phase whose ``phase_id`` equals the row's ``key`` is left out of that row's hull.

    ``is_on_or_below_hull``: ``e_above_hull_dft_ev_per_atom <= max_e_above_hull_ev_per_atom``
    (+ :data:`HULL_TOLERANCE_EV_PER_ATOM`); ``is_dynamically_stable``: ``min_frequency_thz >
    min_frequency_thz`` (null without phonons). ``formation_energy_dft_ev_per_atom`` is relative
    to the competing phases' elemental references, on the same footing as the hull.

    Raises ``ValueError`` on missing columns, an empty or mixed-footing ``competing`` frame, or a
    duplicated ``key``. Every row is returned.
    """
    _require(results, (key, "status", "final_energy_ev", "n_atoms"), "results")
    if "species" not in results.columns and "formula" not in results.columns:
        raise ValueError("results need a species or a formula column")
    _require(competing, COMPETING_SCHEMA, "competing phases")
    if competing.is_empty():
        raise ValueError("no competing phases: cannot place any result on a hull")
    footings = sorted(set(competing["footing"].to_list()))
    if len(footings) != 1 or footings[0] is None:
        raise ValueError(f"competing phases mix energy footings {footings}: never compared together")
    ref_footing = footings[0]
    if results[key].is_duplicated().any():
        raise ValueError(f"hull_verdicts: duplicate {key} in the results")
    if compatibility not in ("MP2020", "none"):
        raise ValueError(f"compatibility must be 'MP2020' or 'none', not {compatibility!r}")
    hulls = _Hulls(competing)
    out: dict[str, list[Any]] = {c: [] for c in VERDICT_SCHEMA}
    has_cell = set(CELL_COLUMNS) <= set(results.columns)
    for row in results.iter_rows(named=True):
        v = _verdict(row, hulls, ref_footing, key=key, has_cell=has_cell, compatibility=compatibility,
                     default_run_type=default_run_type, statuses=statuses,
                     max_e_hull=max_e_above_hull_ev_per_atom, min_freq=min_frequency_thz,
                     require_phonons=require_phonons, require_compounds=require_compounds)
        for c in VERDICT_SCHEMA:
            out[c].append(v.get(c))
    base = results.drop([c for c in VERDICT_SCHEMA if c in results.columns])
    return base.with_columns(pl.Series(c, vals, dtype=VERDICT_SCHEMA[c]) for c, vals in out.items())


def _verdict(row: dict[str, Any], hulls: _Hulls, ref_footing: str, *, key: str, has_cell: bool, compatibility: str,
             default_run_type: str | None, statuses: Sequence[str], max_e_hull: float, min_freq: float,
             require_phonons: bool, require_compounds: bool) -> dict[str, Any]:
    rid = row[key]
    freq = row.get("min_frequency_thz")
    out: dict[str, Any] = {"is_novel": row.get("is_novel"),
                           "is_dynamically_stable": None if freq is None else bool(freq > min_freq)}

    def stop(verdict: str, reason: str) -> dict[str, Any]:
        return out | {"verdict": verdict, "verdict_reason": f"{key}={rid}: {reason}"}

    if row["status"] not in statuses:
        return stop("not_evaluated", f"status {row['status']!r} is not {list(statuses)}"
                    + (f" ({row['reason']})" if row.get("reason") else ""))
    energy, n = row["final_energy_ev"], row["n_atoms"]
    if energy is None or not math.isfinite(energy) or not n:
        return stop("not_evaluated", "no final energy")
    try:
        comp = _row_composition(row)
    except Exception as exc:  # noqa: BLE001 - reported on the row
        return stop("not_evaluated", f"composition does not parse: {exc}")
    if comp is None:
        return stop("not_evaluated", "no species or formula")
    # -- footing and correction
    code = row.get("dft_code") or "vasp"
    correction = 0.0
    if row.get("energy_footing"):
        footing, scheme = str(row["energy_footing"]), "none (energies given on their footing)"
    elif code == "vasp" and compatibility == "MP2020":
        run_type = row.get("run_type") or default_run_type
        if run_type is None:
            return stop("not_evaluated", "run type unknown (no run_type column/value and no default_run_type): "
                                         "cannot apply MaterialsProject2020Compatibility")
        if not has_cell or row.get("lattice_matrix") is None:
            return stop("not_evaluated", "no final cell: MaterialsProject2020Compatibility needs the structure "
                                         "(oxide / peroxide / superoxide)")
        try:
            hubbards = json.loads(row["hubbards"]) if row.get("hubbards") else None
            structure = cell_to_structure(row["lattice_matrix"], row["species"], row["frac_coords"])
            correction, _names = mp2020_correction(structure, energy, run_type=run_type, hubbards=hubbards,
                                                   potcar_symbols=row.get("potcar_symbols"), entry_id=str(rid))
        except Exception as exc:  # noqa: BLE001 - CompatibilityError and bad input, on the row
            return stop("not_evaluated", f"MaterialsProject2020Compatibility cannot be applied: "
                                         f"{type(exc).__name__}: {str(exc)[:300]}")
        footing, scheme = MP2020, "MaterialsProject2020Compatibility"
    else:
        footing, scheme = _footing_of(code, row.get("dft_preset_sha256")), "none"
    e_atom = (energy + correction) / n
    out |= {"energy_footing": footing, "compatibility": scheme, "energy_correction_ev_per_atom": correction / n,
            "corrected_energy_per_atom_ev": e_atom}
    if footing != ref_footing:
        return stop("footing_mismatch", f"result energies are on footing {footing!r}, the competing phases on "
                                        f"{ref_footing!r}: not compared")
    # -- references
    elements = frozenset(el.symbol for el in comp.elements)
    missing = sorted(elements - hulls.elemental)
    if missing:
        out["missing_references"] = missing
        return stop("missing_references", f"no elemental competing phase for {', '.join(missing)} "
                                          f"({comp.reduced_formula})")
    if require_compounds and len(elements) > 1 and hulls.compounds(elements) == 0:
        out["missing_references"] = ["compounds of " + "-".join(sorted(elements))]
        return stop("missing_references", f"the competing phases hold no compound of {'-'.join(sorted(elements))} "
                                          "or its subsystems: the hull would be the elements only")
    out["missing_references"] = []
    from pymatgen.analysis.phase_diagram import PDEntry

    pd_ = hulls.diagram(elements, exclude=str(rid))
    entry = PDEntry(comp, e_atom * comp.num_atoms, name=str(rid))
    decomp, e_hull = pd_.get_decomp_and_e_above_hull(entry, allow_negative=True)
    e_hull = float(e_hull)
    ef = float(pd_.get_form_energy_per_atom(entry))
    on_hull = e_hull <= max_e_hull + HULL_TOLERANCE_EV_PER_ATOM
    out |= {"formation_energy_dft_ev_per_atom": ef, "e_above_hull_dft_ev_per_atom": e_hull,
            "decomposition_dft": _fmt_decomp(decomp), "is_on_or_below_hull": on_hull}
    # -- the verdict: every failed criterion is stated, the first decides
    facts, verdict = [], None
    if row.get("is_novel") is False:
        verdict = "rediscovery"
        facts.append(f"matches known phase {row.get('known_material_id')}"
                     + (f" ({row['known_source']})" if row.get("known_source") else ""))
    if not on_hull:
        verdict = verdict or "above_hull"
        facts.append(f"{e_hull:.4f} eV/atom above the hull > {max_e_hull:g} (decomposes to "
                     f"{_fmt_decomp(decomp)}; formation energy {ef:.4f} eV/atom)")
    if freq is not None and freq <= min_freq:
        verdict = verdict or "unstable"
        facts.append(f"lowest phonon frequency {freq:.3f} THz <= {min_freq:g}")
    if freq is None and require_phonons:
        verdict = verdict or "no_phonons"
        facts.append("no phonon result")
    if row.get("is_novel") is None:
        verdict = verdict or "novelty_unchecked"
        facts.append("not matched against known phases")
    if verdict is None:
        return out | {"verdict": "discovery", "verdict_reason": (
            f"{key}={rid}: {e_hull:.4f} eV/atom from the hull (<= {max_e_hull:g}), formation energy {ef:.4f} "
            f"eV/atom, lowest phonon {'n/a' if freq is None else f'{freq:.3f} THz'}, novel")}
    return stop(verdict, "; ".join(facts))


def verdict_counts(verdicts: pl.DataFrame) -> dict[str, int]:
    """Rows per verdict (every verdict of :data:`VERDICTS`, zeros included), for metadata."""
    _require(verdicts, ("verdict",), "verdicts")
    counts = dict(verdicts.group_by("verdict").len().iter_rows())
    return {v: int(counts.get(v, 0)) for v in VERDICTS}
