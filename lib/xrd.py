"""Simulated powder X-ray diffraction: patterns, pattern similarity, stacked plots.

Patterns come from pymatgen's ``XRDCalculator`` (kinematic, atomic scattering factors, Lorentz-
polarisation factor; Cu Kα by default) and are stored tidy, one row per peak. To tell near-identical
polymorphs apart (the CGWGAN paper's Fig. 5H), each pattern is broadened with a Gaussian of fixed
FWHM on a common 2θ grid and patterns are compared by cosine similarity: 1 for the same powder
pattern, lower the more peaks move or change intensity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from lib import contracts
from lib.plots import subplots

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from pymatgen.core import Structure

#: Schema of a pattern table (one row per peak).
PATTERN_SCHEMA: dict[str, pl.DataType] = {"candidate_id": pl.String(), **contracts.schema(
    "xrd_patterns", only=("two_theta_deg", "intensity", "d_spacing_a", "hkl", "multiplicity", "wavelength_a"))}
SIMILARITY_SCHEMA: dict[str, pl.DataType] = {
    "candidate_id_a": pl.String(), "candidate_id_b": pl.String(),
    **contracts.schema("xrd_similarity", only=("cosine_similarity",))}


def xrd_patterns(
    ids: Sequence[str],
    structures: Sequence[Structure],
    *,
    wavelength: str | float = "CuKa",
    two_theta_range: tuple[float, float] = (10.0, 90.0),
    min_intensity: float = 0.0,
    symprec: float = 0.0,
) -> pl.DataFrame:
    """Powder patterns of ``structures`` as a tidy frame (columns: ``PATTERN_SCHEMA``).

    ``intensity`` is scaled so that each pattern's strongest peak is 100. ``hkl`` lists the
    Miller indices of the families merged into the peak (``"2 0 0"``, ``"1 1 1; 1 1 -1"``; four
    indices for hexagonal cells). Peaks weaker than ``min_intensity`` are left out.
    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    if len(ids) != len(structures):
        raise ValueError(f"{len(ids)} ids for {len(structures)} structures")
    lo, hi = two_theta_range
    if not 0 <= lo < hi <= 180:
        raise ValueError(f"two_theta_range must satisfy 0 <= min < max <= 180, got {two_theta_range}")
    calc = XRDCalculator(wavelength=wavelength, symprec=symprec)
    frames = []
    for cid, s in zip(ids, structures, strict=True):
        p = calc.get_pattern(s, scaled=True, two_theta_range=(lo, hi))
        x = np.asarray(p.x, dtype=float)
        y = np.asarray(p.y, dtype=float)
        keep = y >= min_intensity
        hkls = [h for h, k in zip(p.hkls, keep, strict=True) if k]
        frames.append(pl.DataFrame({
            "candidate_id": [cid] * int(keep.sum()),
            "two_theta_deg": x[keep],
            "intensity": y[keep],
            "d_spacing_a": np.asarray(p.d_hkls, dtype=float)[keep],
            "hkl": ["; ".join(" ".join(str(i) for i in fam["hkl"]) for fam in h) for h in hkls],
            "multiplicity": [int(sum(fam["multiplicity"] for fam in h)) for h in hkls],
            "wavelength_a": [float(calc.wavelength)] * int(keep.sum()),
        }, schema=PATTERN_SCHEMA))
    if not frames:
        return pl.DataFrame(schema=PATTERN_SCHEMA)
    return pl.concat(frames)


def two_theta_grid(
    two_theta_range: tuple[float, float] = (10.0, 90.0), *, step_deg: float = 0.02
) -> np.ndarray:
    lo, hi = two_theta_range
    return np.arange(lo, hi + step_deg / 2, step_deg)


def broadened_profiles(
    patterns: pl.DataFrame,
    *,
    grid: np.ndarray,
    fwhm_deg: float = 0.2,
) -> tuple[list[str], np.ndarray]:
    """Gaussian-broadened profiles of every pattern on ``grid``: ``(ids, array (n, len(grid)))``.

    Ids keep their order of first appearance in ``patterns``.
    """
    if fwhm_deg <= 0:
        raise ValueError(f"fwhm_deg must be positive, got {fwhm_deg}")
    sigma = fwhm_deg / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    ids = patterns["candidate_id"].unique(maintain_order=True).to_list()
    index = {cid: i for i, cid in enumerate(ids)}
    out = np.zeros((len(ids), grid.size))
    if not ids:  # nothing to broaden (an empty mapping would also give an object-typed index array)
        return ids, out
    rows = patterns["candidate_id"].replace_strict(index, return_dtype=pl.Int64).to_numpy()
    x = patterns["two_theta_deg"].to_numpy()
    y = patterns["intensity"].to_numpy()
    # Only grid points within 5 sigma of a peak matter: add each peak's window (vectorised per peak
    # count, not per grid point).
    half = math.ceil(5 * sigma / (grid[1] - grid[0])) if grid.size > 1 else 0
    centre = np.searchsorted(grid, x)
    offsets = np.arange(-half, half + 1)
    cols = centre[:, None] + offsets[None, :]
    valid = (cols >= 0) & (cols < grid.size)
    cols_c = np.clip(cols, 0, grid.size - 1)
    w = y[:, None] * np.exp(-0.5 * ((grid[cols_c] - x[:, None]) / sigma) ** 2) * valid
    np.add.at(out, (np.broadcast_to(rows[:, None], cols.shape), cols_c), w)
    return ids, out


def similarity_matrix(
    patterns: pl.DataFrame,
    *,
    two_theta_range: tuple[float, float] = (10.0, 90.0),
    fwhm_deg: float = 0.2,
    step_deg: float = 0.02,
) -> tuple[list[str], np.ndarray]:
    """Cosine similarity (n, n) of the broadened patterns of ``patterns`` (ids in first-seen order)."""
    grid = two_theta_grid(two_theta_range, step_deg=step_deg)
    ids, prof = broadened_profiles(patterns, grid=grid, fwhm_deg=fwhm_deg)
    norm = np.linalg.norm(prof, axis=1, keepdims=True)
    unit = np.divide(prof, norm, out=np.zeros_like(prof), where=norm > 0)
    return ids, np.clip(unit @ unit.T, 0.0, 1.0)


def pattern_similarity(
    patterns: pl.DataFrame,
    *,
    two_theta_range: tuple[float, float] = (10.0, 90.0),
    fwhm_deg: float = 0.2,
    step_deg: float = 0.02,
) -> pl.DataFrame:
    """Pairwise cosine similarity of distinct patterns, one row per unordered pair, most similar first."""
    ids, sim = similarity_matrix(patterns, two_theta_range=two_theta_range, fwhm_deg=fwhm_deg,
                                 step_deg=step_deg)
    i, j = np.triu_indices(len(ids), k=1)
    arr = np.asarray(ids, dtype=object)
    return pl.DataFrame(
        {"candidate_id_a": arr[i].tolist(), "candidate_id_b": arr[j].tolist(),
         "cosine_similarity": sim[i, j]},
        schema=SIMILARITY_SCHEMA,
    ).sort("cosine_similarity", descending=True)


def structure_similarity(
    a: Structure,
    b: Structure,
    *,
    wavelength: str | float = "CuKa",
    two_theta_range: tuple[float, float] = (10.0, 90.0),
    fwhm_deg: float = 0.2,
) -> float:
    """Cosine similarity of the broadened powder patterns of two structures."""
    pats = xrd_patterns(["a", "b"], [a, b], wavelength=wavelength, two_theta_range=two_theta_range)
    _, sim = similarity_matrix(pats, two_theta_range=two_theta_range, fwhm_deg=fwhm_deg)
    return float(sim[0, 1])


def plot_patterns(
    patterns: pl.DataFrame,
    *,
    labels: Mapping[str, str] | None = None,
    max_patterns: int = 12,
    two_theta_range: tuple[float, float] = (10.0, 90.0),
    fwhm_deg: float = 0.2,
    title: str = "Simulated powder XRD (Cu Kα)",
) -> Figure:
    """Stacked broadened patterns with peak sticks, one trace per id (the first ``max_patterns``)."""
    ids_all = patterns["candidate_id"].unique(maintain_order=True).to_list()
    ids = ids_all[:max_patterns]
    sub = patterns.filter(pl.col("candidate_id").is_in(ids))
    grid = two_theta_grid(two_theta_range, step_deg=0.02)
    pids, prof = (broadened_profiles(sub, grid=grid, fwhm_deg=fwhm_deg) if sub.height
                  else ([], np.zeros((0, grid.size))))
    fig, ax = subplots(figsize=(8, 1.2 + 1.0 * max(len(ids), 1)))
    offset = 1.15
    for k, cid in enumerate(pids):
        y = prof[k] / prof[k].max() if prof[k].max() > 0 else prof[k]
        base = (len(pids) - 1 - k) * offset
        ax.plot(grid, base + y, lw=0.9, color=f"C{k % 10}")
        peaks = sub.filter(pl.col("candidate_id") == cid)
        ax.vlines(peaks["two_theta_deg"].to_numpy(), base, base + peaks["intensity"].to_numpy() / 100.0,
                  lw=0.5, color=f"C{k % 10}", alpha=0.5)
        label = (labels or {}).get(cid, cid)
        ax.text(grid[0] + 0.01 * (grid[-1] - grid[0]), base + 0.6, label, ha="left", va="bottom", fontsize=8)
    if not pids:
        ax.text(0.5, 0.5, "no patterns", transform=ax.transAxes, ha="center")
    ax.set_xlim(*two_theta_range)
    ax.set_yticks([])
    ax.set_xlabel("2θ (degrees)")
    ax.set_ylabel("intensity (normalised, stacked)")
    more = f" — first {len(ids)} of {len(ids_all)}" if len(ids_all) > len(ids) else ""
    ax.set_title(title + more, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- tables of crystals
#: Identity columns copied from the source rows into a report (null where a source lacks one),
#: so the schema does not depend on which tables were selected.
REPORT_ID_COLUMNS: dict[str, pl.DataType] = contracts.schema("xrd_patterns", only=(
    "candidate_id", "material_id", "surrogate_name", "reduced_formula", "formula", "spacegroup_number",
    "spacegroup_number_relaxed"))


@dataclass(frozen=True)
class XrdReport:
    """Patterns of the crystals of several tables.

    ``peaks``: one row per peak: ``pattern_id`` (``"<table>:<row id>"``), ``source_table``, the
    :data:`REPORT_ID_COLUMNS`, ``n_sites``, then the :data:`PATTERN_SCHEMA` peak columns.
    ``similarity``: ``pattern_id_a``, ``pattern_id_b``, ``cosine_similarity``, most similar first.
    ``failures``: ``(table, row id, reason)`` of rows that could not be rebuilt.
    """

    peaks: pl.DataFrame
    similarity: pl.DataFrame
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    per_table: dict[str, dict[str, int]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def n_patterns(self) -> int:
        return self.peaks["pattern_id"].n_unique() if self.peaks.height else 0


def xrd_report(
    selections: Mapping[str, pl.DataFrame],
    *,
    wavelength: str | float = "CuKa",
    two_theta_range: tuple[float, float] = (10.0, 90.0),
    fwhm_deg: float = 0.2,
) -> XrdReport:
    """Patterns and pairwise similarity of the crystals of several tables (name -> rows).

    Each frame needs structure columns (cell or ASU, see :mod:`lib.export`); rows that cannot be
    rebuilt are returned in ``failures``.
    """
    from lib.export import structures_from_frame, unique_names

    peaks_parts, metas, failures, per_table = [], [], [], {}
    for table, sel in selections.items():
        built = structures_from_frame(sel)
        keys = unique_names([f"{table}:{rid}" for rid in built.ids], file_safe=False)
        peaks_parts.append(xrd_patterns(keys, built.structures, wavelength=wavelength,
                                        two_theta_range=two_theta_range))
        rows = pl.DataFrame(built.rows) if built.rows else pl.DataFrame()
        metas.append(rows.select([c for c in REPORT_ID_COLUMNS if c in rows.columns]).with_columns(
            pattern_id=pl.Series(keys, dtype=pl.String), source_table=pl.lit(table, pl.String),
            n_sites=pl.Series([len(s) for s in built.structures], dtype=pl.Int64)))
        failures += [(table, rid, reason) for rid, reason in built.failures]
        per_table[table] = {"rows": sel.height, "patterns": len(keys), "failed": len(built.failures)}
    peaks = (pl.concat(peaks_parts) if peaks_parts else pl.DataFrame(schema=PATTERN_SCHEMA)).rename(
        {"candidate_id": "pattern_id"})
    meta = pl.concat(metas, how="diagonal_relaxed") if metas else pl.DataFrame(
        schema={"pattern_id": pl.String, "source_table": pl.String, "n_sites": pl.Int64})
    meta = meta.with_columns([pl.col(c).cast(t) if c in meta.columns else pl.lit(None, t).alias(c)
                              for c, t in REPORT_ID_COLUMNS.items()])
    sim = pattern_similarity(peaks.rename({"pattern_id": "candidate_id"}), two_theta_range=two_theta_range,
                             fwhm_deg=fwhm_deg).rename(
        {"candidate_id_a": "pattern_id_a", "candidate_id_b": "pattern_id_b"})
    joined = meta.join(peaks, on="pattern_id", how="inner")
    front = ["pattern_id", "source_table", *REPORT_ID_COLUMNS, "n_sites"]
    joined = joined.select(*front, *[c for c in joined.columns if c not in front])
    labels = {}
    for r in meta.iter_rows(named=True):
        sg = f"SG {r['spacegroup_number']}" if r.get("spacegroup_number") is not None else ""
        parts = (r.get("reduced_formula") or r.get("formula") or "", sg, f"[{r['source_table']}]",
                 r.get("candidate_id") or r.get("material_id") or "")
        labels[r["pattern_id"]] = " ".join(x for x in parts if x)
    return XrdReport(joined, sim, failures, per_table, labels)
