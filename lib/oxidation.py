"""Chemical sanity: oxidation-state charge balance of each row's formula (pymatgen's guesses).

:func:`charge_balance` adds, per row:

* ``charge_balanced`` (bool): some assignment of **ICSD-observed** oxidation states (pymatgen's
  ``Element.icsd_oxidation_states``; an element with none falls back to its full list, as
  ``Composition.oxi_state_guesses()`` does by default) makes the formula neutral. This is the
  conventional screen: BaRuO3 (Ru+4) and Ba2RuO4 (Ru+4) pass; Ba2RuO6 (needs Ru+8) and Ru-rich
  suboxides such as BaRu2O (Ru 0) do not. Known limit: a peroxide such as BaO2 needs O(-1),
  which the ICSD list of O lacks, so it is not balanced here (and is flagged below as rare).
* ``oxidation_states`` (str): the most probable guess, as ``"Ba:+2,Ru:+8,O:-2"`` (elements in
  the formula's order; a mixed-valence average with two decimals, e.g. ``"Fe:+2.67"``). The
  ICSD-observed states are tried first; when they balance nothing, pymatgen's full list of
  known states (``Element.oxidation_states``, ``all_oxi_states=True``) is tried, so an exotic
  assignment is still *shown*. Null when no assignment balances at all.
* ``oxidation_state_basis`` (str): ``"icsd"`` or ``"all"`` (which list gave the guess), null
  when none.
* ``uses_rare_oxidation_state`` (bool): the guess gives some element a state outside its
  ICSD-observed ones (for a mixed-valence average: outside their range). Ba2RuO6 -> True.
* ``rare_oxidation_states`` (str): those elements and states, e.g. ``"Ru:+8"`` (null when none).
* ``max_oxidation_state`` (f64): the highest state in the guess (+8 for Ba2RuO6).

It is a set of columns and a shortlist option, never a silent filter. Guesses are computed once
per reduced formula (``oxi_state_guesses`` takes up to seconds for large formulas).
"""

from __future__ import annotations

from functools import lru_cache

import polars as pl

#: Columns :func:`charge_balance` adds.
CHARGE_BALANCE_SCHEMA: dict[str, pl.DataType] = {
    "charge_balanced": pl.Boolean(),
    "oxidation_states": pl.String(),
    "oxidation_state_basis": pl.String(),
    "uses_rare_oxidation_state": pl.Boolean(),
    "rare_oxidation_states": pl.String(),
    "max_oxidation_state": pl.Float64(),
}


def _fmt(state: float) -> str:
    r = round(state)
    return f"{r:+d}" if abs(state - r) < 1e-6 else f"{state:+.2f}"


@lru_cache(maxsize=65536)
def oxidation_guess(reduced_formula: str) -> tuple[bool, str | None, str | None, bool | None, str | None,
                                                  float | None]:
    """The :data:`CHARGE_BALANCE_SCHEMA` values of one formula (cached).

    Raises ``ValueError`` when ``reduced_formula`` is not a formula pymatgen can parse.
    """
    from pymatgen.core import Composition, Element

    try:
        comp = Composition(reduced_formula)
    except Exception as exc:
        raise ValueError(f"formula {reduced_formula!r} does not parse: {exc}") from exc
    if comp.num_atoms == 0:
        raise ValueError(f"formula {reduced_formula!r} has no atoms")
    icsd = comp.oxi_state_guesses(all_oxi_states=False)
    basis = "icsd" if icsd else None
    guesses = icsd or comp.oxi_state_guesses(all_oxi_states=True)
    if not guesses:
        return False, None, None, None, None, None
    if basis is None:
        basis = "all"
    best = guesses[0]
    order = [el.symbol for el in comp.elements]
    text = ",".join(f"{el}:{_fmt(best[el])}" for el in order)
    rare = []
    for el in order:
        state = float(best[el])
        if len(comp.elements) == 1 and abs(state) < 1e-9:
            continue  # an element in its elemental state
        allowed = Element(el).icsd_oxidation_states or Element(el).oxidation_states
        is_int = abs(state - round(state)) < 1e-6
        ok = (round(state) in allowed) if is_int else (min(allowed) <= state <= max(allowed))
        if not ok:
            rare.append(f"{el}:{_fmt(state)}")
    return (basis == "icsd", text, basis, bool(rare), ",".join(rare) or None,
            float(max(best[el] for el in order)))


def charge_balance(frame: pl.DataFrame, *, formula_col: str = "formula") -> pl.DataFrame:
    """``frame`` with the :data:`CHARGE_BALANCE_SCHEMA` columns (see the module docstring).

    ``formula_col``: any formula pymatgen parses (``BaRuO3``, ``Ba4Ru4O12``, ``Ba(RuO)2``); rows
    with a null formula get null columns. Raises ``ValueError`` naming the column when it is
    missing and the row when a formula does not parse. Existing columns of the same names are
    replaced.
    """
    from pymatgen.core import Composition

    if formula_col not in frame.columns:
        raise ValueError(f"charge_balance: no column {formula_col!r} (columns: {frame.columns[:20]})")
    formulas = frame[formula_col].cast(pl.String)
    values: dict[str, tuple] = {}
    for i, f in enumerate(formulas.to_list()):
        if f is None or f in values:
            continue
        try:
            reduced = Composition(f).reduced_formula
        except Exception as exc:
            raise ValueError(f"charge_balance: row {i} ({formula_col}={f!r}): formula does not parse: {exc}") from exc
        try:
            values[f] = oxidation_guess(reduced)
        except ValueError as exc:
            raise ValueError(f"charge_balance: row {i} ({formula_col}={f!r}): {exc}") from exc
    keys = list(values)
    table = pl.DataFrame(
        {"_f": keys, **{name: [values[k][j] for k in keys] for j, name in enumerate(CHARGE_BALANCE_SCHEMA)}},
        schema={"_f": pl.String, **CHARGE_BALANCE_SCHEMA})
    base = frame.drop([c for c in CHARGE_BALANCE_SCHEMA if c in frame.columns])
    return base.with_columns(formulas.alias("_f")).join(table, on="_f", how="left", maintain_order="left").drop("_f")
