"""The Wyckoff GAN's training table: selected ``mp_symmetry`` rows, encoded by ``lib.encoding``.

Selection (each step counted, so nothing disappears silently): round trip passed, space group
above P1 (``min_spacegroup``), ``min_asu_sites``..``max_asu_sites`` ASU sites, and not held out
(``exclude_chemical_systems``, ``exclude_material_ids``). A held-out chemical system is given
in any element order (``Ba-Ru-O`` == ``Ba-O-Ru``); with ``exclude_subsystems=True`` every
structure whose elements are a subset of it (BaO, RuO2, O2, ...) is held out as well.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from lib import contracts

#: Columns of ``mp_symmetry`` that a training template carries (plus ``chemical_system``).
TEMPLATE_COLUMNS = tuple(contracts.schema("training_templates", exclude=("encoding", "encoding_version")))


def normalise_chemical_system(system: str) -> str:
    """Elements sorted and joined by '-' (``"Ru-Ba-O"`` -> ``"Ba-O-Ru"``); raises on junk."""
    from pymatgen.core.periodic_table import Element

    parts = [p.strip() for p in system.replace(",", "-").split("-") if p.strip()]
    if not parts:
        raise ValueError(f"empty chemical system {system!r}")
    for p in parts:
        if not Element.is_valid_symbol(p):
            raise ValueError(f"chemical system {system!r}: {p!r} is not an element")
    return "-".join(sorted(set(parts)))


def chemical_system_expr(elements: pl.Expr) -> pl.Expr:
    """Chemical system of a list[str] column of element symbols (columnar)."""
    return elements.list.unique().list.sort().list.join("-")


@dataclass(frozen=True)
class SelectionReport:
    """How many rows each selection step removed, in order."""

    n_input: int
    removed: dict[str, int]
    n_selected: int


def select_training_rows(
    symmetry: pl.DataFrame,
    *,
    min_asu_sites: int = 1,
    max_asu_sites: int = 4,
    min_spacegroup: int = 2,
    require_round_trip: bool = True,
    exclude_chemical_systems: Iterable[str] = (),
    exclude_material_ids: Iterable[str] = (),
    exclude_subsystems: bool = False,
) -> tuple[pl.DataFrame, SelectionReport]:
    """The ``mp_symmetry`` rows that go into training, with ``chemical_system``, and a report."""
    if min_asu_sites < 1 or max_asu_sites < min_asu_sites:
        raise ValueError(f"bad ASU site range {min_asu_sites}..{max_asu_sites}")
    held_systems = sorted({normalise_chemical_system(s) for s in exclude_chemical_systems})
    held_ids = sorted(set(exclude_material_ids))
    df = symmetry.with_columns(chemical_system_expr(pl.col("asu_elements")).alias("chemical_system"))
    steps: list[tuple[str, pl.Expr]] = []
    if require_round_trip:
        steps.append(("round_trip_failed", pl.col("is_round_trip_ok").fill_null(False)))
    steps.append((f"spacegroup_below_{min_spacegroup}", pl.col("spacegroup_number").fill_null(0) >= min_spacegroup))
    steps.append((f"asu_sites_outside_{min_asu_sites}_{max_asu_sites}",
                  pl.col("n_asu_sites").fill_null(0).is_between(min_asu_sites, max_asu_sites)))
    if held_systems:
        if exclude_subsystems:
            held_sets = [s.split("-") for s in held_systems]
            inside_any = pl.any_horizontal(
                [pl.col("asu_elements").list.set_difference(pl.lit(h, dtype=pl.List(pl.String)))
                 .list.len() == 0 for h in held_sets])
            steps.append(("held_out_chemical_system", ~inside_any))
        else:
            steps.append(("held_out_chemical_system", ~pl.col("chemical_system").is_in(held_systems)))
    if held_ids:
        steps.append(("held_out_material_id", ~pl.col("material_id").is_in(held_ids)))
    removed: dict[str, int] = {}
    n_input = df.height
    for name, keep in steps:
        before = df.height
        df = df.filter(keep)
        removed[name] = before - df.height
    cols = [c for c in TEMPLATE_COLUMNS if c in df.columns]
    return df.select(cols), SelectionReport(n_input, removed, df.height)


def build_training_templates(
    symmetry: pl.DataFrame,
    *,
    min_asu_sites: int = 1,
    max_asu_sites: int = 4,
    min_spacegroup: int = 2,
    exclude_chemical_systems: Iterable[str] = (),
    exclude_material_ids: Iterable[str] = (),
    exclude_subsystems: bool = False,
) -> tuple[pl.DataFrame, SelectionReport]:
    """``training_templates``: selected template rows + ``encoding`` (list[f32]) + ``encoding_version``.

    The encoding is ``lib.encoding.encode_templates`` with a schema of ``max_asu_sites`` sites.
    """
    from lib.encoding import EncodingSchema, encode_templates

    selected, report = select_training_rows(
        symmetry, min_asu_sites=min_asu_sites, max_asu_sites=max_asu_sites,
        min_spacegroup=min_spacegroup, exclude_chemical_systems=exclude_chemical_systems,
        exclude_material_ids=exclude_material_ids, exclude_subsystems=exclude_subsystems)
    schema = EncodingSchema(max_sites=max_asu_sites)
    return encode_templates(selected, schema=schema), report
