"""The structures of a frame, ready for a surrogate: rebuilt and checked against its elements.

Shared by :mod:`lib.screening` (pre-screen, relaxation) and :mod:`lib.phonons`, so that neither
imports the other for it. A row that cannot be used becomes a ``str`` error naming the row and
the reason; the other rows proceed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

from lib.cells import frame_structures


def check_elements(structures: list[Any], keys: Sequence[str], supported: Iterable[str] | None,
                   surrogate_name: str, *, key: str = "candidate_id") -> list[Any]:
    """Replace structures with elements the surrogate does not cover by an error string."""
    if supported is None:
        return structures
    allowed = set(supported)
    out = []
    for k, s in zip(keys, structures, strict=True):
        if isinstance(s, str):
            out.append(s)
            continue
        bad = sorted({sp.symbol for sp in s.composition.elements} - allowed)
        out.append(f"{key}={k}: element(s) {', '.join(bad)} not covered by surrogate {surrogate_name}"
                   if bad else s)
    return out


def prepared_structures(surrogate: Any, frame: pl.DataFrame, key: str) -> tuple[list[str], list[Any]]:
    """``(keys, structures)`` of ``frame`` (cell or ASU form, :func:`lib.cells.frame_structures`)
    for ``surrogate`` (``.name``, optional ``.supported_elements``): a structure, or an error
    string for a row that cannot be rebuilt or holds an element the surrogate does not cover."""
    keys = frame[key].cast(pl.String).to_list()
    structures = frame_structures(frame, key=key)
    return keys, check_elements(structures, keys, getattr(surrogate, "supported_elements", None),
                                surrogate.name, key=key)
