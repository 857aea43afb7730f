"""DFT results -> verdicts and surrogate accuracy: the compute behind ``discoveries`` and
``surrogate_accuracy`` (``assets/dft.py``).

:func:`dft_verdicts` places every linked result of ``dft_results`` on the hull of its own energy
footing (:mod:`lib.verdicts`): a GPAW result against the GPAW runs of the system's MP phases with
the same preset, a VASP result against MP's phases (MP2020); novelty by matching the DFT cell
against MP's (:mod:`lib.novelty`). :func:`surrogate_accuracy` compares each surrogate's energy
above the hull (the shortlist's) with DFT's: MAE, sign agreement at the hull, Spearman.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from lib import contracts
from lib.dft_ingest import ElementalReferences, latest_results


# --------------------------------------------------------------------------- verdicts (discoveries)
def _verdict_frame(rows: pl.DataFrame, verdict: str, reason: str, footing: str | None) -> pl.DataFrame:
    """``rows`` with a verdict and no hull numbers (no hull could be built for them)."""
    from lib.verdicts import VERDICT_SCHEMA

    base = rows.drop([c for c in VERDICT_SCHEMA if c in rows.columns and c != "is_novel"])
    cols = []
    for c, t in VERDICT_SCHEMA.items():
        if c == "is_novel":
            continue
        val: Any = None
        if c == "verdict":
            val = verdict
        elif c == "energy_footing":
            val = footing
        cols.append(pl.lit(val, t).alias(c))
    out = base.with_columns(cols).with_columns(
        (pl.lit("result_id=") + pl.col("result_id") + pl.lit(f": {reason}")).alias("verdict_reason"))
    if "is_novel" not in out.columns:
        out = out.with_columns(pl.lit(None, pl.Boolean).alias("is_novel"))
    return out


def dft_verdicts(
    results: pl.DataFrame,
    *,
    mp_structures: pl.DataFrame | None = None,
    mp_references: ElementalReferences | None = None,
    max_e_above_hull_ev_per_atom: float = 0.0,
    min_frequency_thz: float | None = None,
    require_phonons: bool = True,
    require_compounds: bool = True,
    vasp_run_type: str = "GGA",
) -> pl.DataFrame:
    """A verdict for every linked result of ``results`` (the ``dft_results`` table; the latest
    ingest of each run folder), against the hull of its own energy footing (:mod:`lib.verdicts`):

    * a GPAW result: the competing phases are the *unlinked* GPAW results of the same preset
      (``backend_competing_phases``: the runs ``dft_runs`` made of the system's MP phases), no
      correction, no MP energy;
    * a VASP result: MP's phases (``mp_structures`` formation energies + ``mp_references``, the MP
      elemental entries) on the MP2020 footing, the correction applied to the raw energy
      (``vasp_run_type``).

    A footing without any competing phase gives ``missing_references`` rows that say so; a row that
    is not a finished result is ``not_evaluated``. Novelty: the DFT-relaxed cell against the MP
    structures of ``mp_structures`` (``lib.novelty``; null when no MP cells are given). Adds
    ``n_competing_phases`` and ``is_discovery``; keeps ``formation_energy_per_atom_ev``."""
    from lib import verdicts as vd
    from lib.novelty import known_structures, match_known_phases

    min_freq = vd.DEFAULT_MIN_FREQUENCY_THZ if min_frequency_thz is None else float(min_frequency_thz)
    latest = latest_results(results)
    linked = latest.filter(pl.col("is_linked").fill_null(False))
    if linked.is_empty():
        empty = linked.with_columns([pl.lit(None, t).alias(c) for c, t in vd.VERDICT_SCHEMA.items()])
        return empty.with_columns(pl.lit(None, pl.Int64).alias("n_competing_phases"),
                                  pl.lit(None, pl.Boolean).alias("is_discovery"),
                                  pl.lit(None, pl.String).alias("known_material_id"),
                                  pl.lit(None, pl.String).alias("known_source"))
    has_mp_cells = mp_structures is not None and {"material_id", "lattice_matrix", "species", "frac_coords"} <= set(
        mp_structures.columns)
    if has_mp_cells:
        assert mp_structures is not None
        known = known_structures(mp_structures=mp_structures.filter(pl.col("lattice_matrix").is_not_null()))
        linked = match_known_phases(linked, known, key="result_id", allow_empty_known=True)
    else:
        linked = linked.with_columns(pl.lit(None, pl.String).alias("known_material_id"),
                                     pl.lit(None, pl.String).alias("known_source"),
                                     pl.lit(None, pl.Boolean).alias("is_novel"))
    code = pl.col("dft_code").fill_null("vasp")
    linked = linked.with_columns(code.alias("_code"), pl.col("dft_preset_sha256").alias("_sha"))
    phases = latest.filter(~pl.col("is_linked").fill_null(False))
    parts = []
    for (code_v, sha), group in linked.group_by(["_code", "_sha"], maintain_order=True):
        group = group.drop("_code", "_sha")
        footing = vd._footing_of(str(code_v), sha if code_v != "vasp" else None)
        if code_v == "vasp":
            if mp_references is None or mp_structures is None or "formation_energy_per_atom_ev" not in \
                    mp_structures.columns:
                parts.append(_verdict_frame(group, "missing_references", (
                    "a VASP result is compared with MP's phases on the MP2020 footing: no MP elemental references "
                    "(dft resource elemental_refs / CGWGAN_ELEMENTAL_REFS) or no mp_structures formation energies"),
                    vd.MP2020).with_columns(pl.lit(0, pl.Int64).alias("n_competing_phases")))
                continue
            competing = vd.mp_competing_phases(mp_structures, mp_references, skip_missing_energies=True)
            out = vd.hull_verdicts(group, competing, max_e_above_hull_ev_per_atom=max_e_above_hull_ev_per_atom,
                                   min_frequency_thz=min_freq, require_phonons=require_phonons,
                                   require_compounds=require_compounds, compatibility="MP2020",
                                   default_run_type=vasp_run_type)  # type: ignore[arg-type]
        else:
            try:
                competing = vd.backend_competing_phases(phases, dft_code=str(code_v), dft_preset_sha256=sha,
                                                        statuses=("ok", "unlinked"))
            except ValueError as exc:
                parts.append(_note_unusable_phases(_verdict_frame(group, "missing_references", (
                    f"no competing phases computed with the same backend and preset ({footing}): {exc}; "
                    "materialise dft_runs (it computes the system's MP phases) and ingest them"), footing
                ).with_columns(pl.lit(0, pl.Int64).alias("n_competing_phases")), phases, str(code_v), sha))
                continue
            out = vd.hull_verdicts(group, competing, max_e_above_hull_ev_per_atom=max_e_above_hull_ev_per_atom,
                                   min_frequency_thz=min_freq, require_phonons=require_phonons,
                                   require_compounds=require_compounds, compatibility="none")
        out = out.with_columns(pl.lit(competing.height, pl.Int64).alias("n_competing_phases"))
        if code_v != "vasp":
            out = _note_unusable_phases(out, phases, str(code_v), sha)
        parts.append(out)
    out = pl.concat(parts, how="diagonal_relaxed")
    return out.with_columns((pl.col("verdict") == "discovery").alias("is_discovery"))


def _note_unusable_phases(verdicts: pl.DataFrame, phases: pl.DataFrame, code: str, sha: str | None) -> pl.DataFrame:
    """On ``missing_references`` rows, name the phase runs of the same footing that exist but
    cannot be used (unconverged relaxation, failed SCF), with their reasons."""
    if phases.is_empty() or "dft_code" not in phases.columns:
        return verdicts
    bad = phases.filter((pl.col("dft_code").fill_null("vasp") == code) & (pl.col("dft_preset_sha256") == sha)
                        & ~pl.col("status").is_in(["ok", "unlinked"]))
    if bad.is_empty():
        return verdicts
    note = "; phase runs of this footing that cannot be used: " + "; ".join(
        f"{n} ({f}, {st}: {(r or '')[:160]})" for n, f, st, r in bad.select(
            "run_name", "formula", "status", "reason").iter_rows())
    return verdicts.with_columns(pl.when(pl.col("verdict") == "missing_references")
                                 .then(pl.col("verdict_reason") + pl.lit(note))
                                 .otherwise(pl.col("verdict_reason")).alias("verdict_reason"))


# --------------------------------------------------------------------------- surrogate accuracy
def surrogate_accuracy(verdicts: pl.DataFrame, shortlist: pl.DataFrame, *,
                       hull_threshold_ev_per_atom: float = 0.0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each surrogate's energy above the hull against DFT's, over the candidates with both.

    ``verdicts``: :func:`dft_verdicts` rows (``candidate_id``, ``energy_footing``,
    ``e_above_hull_dft_ev_per_atom``); ``shortlist``: every surrogate's rows (``candidate_id``,
    ``surrogate_name``, ``surrogate_sha256``, ``e_above_hull_ev_per_atom``,
    ``chemical_system``). Returns ``(metrics, pairs)``: one metrics row per (chemical system,
    surrogate, footing) plus ``chemical_system = 'all'`` per (surrogate, footing) — MAE, mean
    error (surrogate - DFT), sign agreement at the hull (both ``<= hull_threshold`` or both
    above), Spearman rank correlation (null below 2 candidates or without spread) — and the
    pairs themselves (for the parity plot)."""
    for col in ("candidate_id", "surrogate_name", "e_above_hull_ev_per_atom"):
        if col not in shortlist.columns:
            raise ValueError(f"shortlist lacks column {col!r}")
    v = verdicts.filter(pl.col("e_above_hull_dft_ev_per_atom").is_not_null() & pl.col("candidate_id").is_not_null())
    v = v.sort("result_id").unique("candidate_id", keep="last")  # one DFT verdict per candidate
    sl = shortlist.filter(pl.col("e_above_hull_ev_per_atom").is_not_null())
    sha = pl.col("surrogate_sha256") if "surrogate_sha256" in sl.columns else pl.lit(None, pl.String)
    csys = pl.col("chemical_system") if "chemical_system" in sl.columns else pl.lit(None, pl.String)
    sl = sl.select("candidate_id", "surrogate_name", sha.alias("surrogate_sha256"),
                   csys.alias("_sl_system"), pl.col("e_above_hull_ev_per_atom").alias("surrogate_e"))
    sl = sl.unique(["candidate_id", "surrogate_name"], keep="first")
    pairs = v.select("candidate_id", "energy_footing", pl.col("chemical_system").alias("_dft_system"),
                     pl.col("e_above_hull_dft_ev_per_atom").alias("dft_e")).join(sl, on="candidate_id", how="inner")
    pairs = pairs.with_columns(pl.coalesce("_dft_system", "_sl_system").alias("chemical_system")).drop(
        "_dft_system", "_sl_system")
    thr = float(hull_threshold_ev_per_atom) + 1e-6
    rows = []
    keys = ["chemical_system", "surrogate_name", "energy_footing"]
    groups = [(k, g) for k, g in pairs.group_by(keys, maintain_order=True)]
    groups += [(("all", k[0], k[1]), g) for k, g in pairs.group_by(["surrogate_name", "energy_footing"],
                                                                   maintain_order=True)]
    for (system, sur, footing), g in groups:
        g = g.sort(["dft_e", "candidate_id"])
        s_e, d_e = g["surrogate_e"].to_numpy(), g["dft_e"].to_numpy()
        agree = int(((s_e <= thr) == (d_e <= thr)).sum())
        rho = None
        if g.height >= 2 and np.ptp(s_e) > 0 and np.ptp(d_e) > 0:
            r = g.select(pl.corr("surrogate_e", "dft_e", method="spearman")).item()
            rho = None if r is None or not math.isfinite(r) else float(r)
        rows.append({"chemical_system": system, "surrogate_name": sur,
                     "surrogate_sha256": g["surrogate_sha256"].drop_nulls().first(),
                     "energy_footing": footing, "n_candidates": g.height,
                     "mae_ev_per_atom": float(np.abs(s_e - d_e).mean()),
                     "mean_error_ev_per_atom": float((s_e - d_e).mean()),
                     "hull_threshold_ev_per_atom": float(hull_threshold_ev_per_atom),
                     "n_sign_agree": agree, "sign_agreement": agree / g.height, "spearman_rho": rho,
                     "candidate_ids": g["candidate_id"].to_list(),
                     "surrogate_e_above_hull_ev_per_atom": [float(x) for x in s_e],
                     "dft_e_above_hull_ev_per_atom": [float(x) for x in d_e]})
    schema = contracts.schema("surrogate_accuracy")
    metrics = pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)
    return metrics.sort(["chemical_system", "surrogate_name"]), pairs.sort(["surrogate_name", "candidate_id"])


def parity_figure(pairs: pl.DataFrame):
    """Surrogate vs DFT energy above the hull, one colour per surrogate, with the y = x line."""
    from lib.plots import subplots

    fig, ax = subplots(figsize=(4.5, 4.5))
    lo, hi = 0.0, 0.1
    for sur, g in pairs.group_by("surrogate_name", maintain_order=True):
        ax.scatter(g["dft_e"].to_list(), g["surrogate_e"].to_list(), label=str(sur[0]), s=24)
        lo = min(lo, float(g["dft_e"].min()), float(g["surrogate_e"].min()))  # type: ignore[arg-type]
        hi = max(hi, float(g["dft_e"].max()), float(g["surrogate_e"].max()))  # type: ignore[arg-type]
    pad = 0.05 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("DFT energy above hull (eV/atom)")
    ax.set_ylabel("surrogate energy above hull (eV/atom)")
    ax.legend(fontsize=7)
    return fig
