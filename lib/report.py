"""A discovery report: one self-contained HTML file a scientist can hand a colleague.

:func:`write_report` reads the tables of one chemical system through the :class:`~lib.store.TableStore`
and writes one HTML file that needs no network to view: every plot is an inline PNG, every CIF an
inline download link. It shows

* the run's lineage and settings: the MP snapshot (source, rows, snapshot id), the generator
  checkpoint (epochs, training rows, training snapshot), the surrogates (name, weights sha256,
  code version), and when and how big each stage's table was written;
* the funnel: templates -> candidates -> unique -> pre-screened -> relaxed -> phonon-screened ->
  phonon-stable -> DFT-verified, with counts (a stage not materialised says so);
* the hull: the competing phases under the surrogate with the best candidates (ternary diagram,
  formation energy against composition for a binary system), drawn from pymatgen's ``PhaseDiagram``;
* energies: energy above the hull against formation energy, and against the lowest phonon frequency;
* the top distinct candidates of the shortlist: energy above the hull per surrogate, formation
  energy, decomposition, phonon verdict, novelty against the known phases, DFT verdict where a
  result exists, lineage ids, a CIF of the relaxed cell, and their phonon band structures.

No Dagster here: the CLI (``cgwgan report``) and any asset call :func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lib.plots import figure_png, subplots
from lib.store import DEFAULT_PARTITION, TableStore

#: Funnel stages, in order: (label, table the count comes from).
FUNNEL_STAGES = (
    ("templates", "templates"),
    ("candidates", "candidates"),
    ("unique candidates", "candidates_dedup"),
    ("pre-screened", "prescreen"),
    ("relaxed", "relaxed"),
    ("phonon-screened", "phonons"),
    ("phonon-stable", "phonons"),
    ("DFT-verified", "discoveries"),
)
#: Stages whose ``pointer`` (written at, rows) the lineage section lists.
STAGE_TABLES = ("mp_structures", "training_templates", "wgan_checkpoints", "templates", "candidates",
                "candidates_dedup", "prescreen", "relaxed", "reference_energies", "phonons", "shortlist",
                "dft_inputs", "discoveries")


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote."""

    path: Path
    chemical_system: str
    surrogates: list[str]
    funnel: list[dict[str, Any]]
    top: pl.DataFrame  # the top distinct candidates as shown
    plots: list[str] = field(default_factory=list)  # names of the plots embedded


def canonical_system(system: str) -> str:
    """``Ba-Ru-O`` (any order, '-' or ',') -> ``Ba-O-Ru``, the partition key of the tables
    (:func:`lib.training.normalise_chemical_system`, which rejects non-elements); two elements at least."""
    from lib.training import normalise_chemical_system

    canonical = normalise_chemical_system(system)
    if "-" not in canonical:
        raise ValueError(f"chemical system {system!r}: give at least two elements, e.g. Ba-Ru-O")
    return canonical


# ----------------------------------------------------------------------------- reading
def _read(store: TableStore, table: str, partition: str | None = None) -> pl.DataFrame | None:
    if not store.exists(table, partition):
        return None
    return store.read(table, partition)


def screening_surrogates(store: TableStore, chemical_system: str) -> list[str]:
    """Surrogates with a ``shortlist`` of the system, newest first."""
    parts = [p for p in store.partitions("shortlist") if p.startswith(f"{chemical_system}|")]
    parts.sort(key=lambda p: (store.pointer("shortlist", p) or {}).get("written_at", ""), reverse=True)
    return [p.split("|", 1)[1] for p in parts]


def _count(df: pl.DataFrame | None, expr: pl.Expr | None = None) -> int | None:
    if df is None:
        return None
    return int(df.height if expr is None else df.select(expr.sum()).item() or 0)


def funnel_counts(store: TableStore, chemical_system: str, surrogate: str | None) -> list[dict[str, Any]]:
    """One row per :data:`FUNNEL_STAGES` stage: ``stage``, ``count`` (None: not materialised), ``note``."""
    part = f"{chemical_system}|{surrogate}" if surrogate else None
    out: list[dict[str, Any]] = []

    def add(stage: str, count: int | None, note: str = "") -> None:
        out.append({"stage": stage, "count": count, "note": note if count is not None else "not materialised"})

    n_gen = len(store.partitions("templates"))
    add("templates", store.rows("templates") if n_gen else None,
        f"{n_gen} generation run(s), every chemical system" if n_gen else "")
    add("candidates", store.rows("candidates", chemical_system) if store.exists("candidates", chemical_system)
        else None, "templates filled with the system's elements")
    dedup = (store.read("candidates_dedup", chemical_system, columns=["is_known_in_mp"])
             if store.exists("candidates_dedup", chemical_system) else None)
    known = _count(dedup, pl.col("is_known_in_mp").fill_null(False))
    add("unique candidates", _count(dedup), f"{known} of them match a known MP phase" if dedup is not None else "")
    for stage, table, cond, note in (
            ("pre-screened", "prescreen", pl.col("status") == "ok", "static energy"),
            ("relaxed", "relaxed", pl.col("status") == "ok", "")):
        df = _read(store, table, part) if part else None
        extra = note
        if df is not None and table == "relaxed" and "is_converged" in df.columns:
            extra = f"{_count(df, pl.col('is_converged').fill_null(False))} converged"
        add(stage, _count(df, cond), extra)
    ph = _read(store, "phonons", part) if part else None
    add("phonon-screened", _count(ph, pl.col("status") == "ok"), "finite displacements, surrogate forces")
    add("phonon-stable", _count(ph, (pl.col("status") == "ok") & pl.col("is_dynamically_stable").fill_null(False)),
        "no imaginary mode below the threshold")
    disc = _read(store, "discoveries")
    if disc is not None and "chemical_system" in disc.columns:
        disc = disc.filter(pl.col("chemical_system") == chemical_system)
    add("DFT-verified", _count(disc, pl.col("is_discovery").fill_null(False)) if disc is not None
        and "is_discovery" in disc.columns else None,
        f"{disc.height} DFT result(s) ingested" if disc is not None else "")
    return out


def lineage_rows(store: TableStore, shortlists: dict[str, pl.DataFrame],
                 shortlist: pl.DataFrame | None) -> list[tuple[str, str]]:
    """(label, value) pairs: MP snapshot, checkpoint, surrogates (``shortlists``: surrogate -> its
    shortlist of the system, as already read; ``shortlist``: the ranking one)."""
    rows: list[tuple[str, str]] = []
    mp = _read(store, "mp_structures")
    if mp is not None:
        by_src = mp.group_by("source").len().sort("source")
        srcs = "; ".join(f"{s} ({n} rows)" for s, n in by_src.iter_rows())
        rows.append(("MP snapshot", f"{', '.join(sorted(set(mp['snapshot_id'].to_list())))}: {mp.height} "
                                    f"structures from {srcs}"))
    ck = _read(store, "wgan_checkpoints")
    used = sorted(set(shortlist["checkpoint_id"].drop_nulls().to_list())) if (
        shortlist is not None and "checkpoint_id" in shortlist.columns) else []
    if ck is not None:
        sel = ck.filter(pl.col("checkpoint_id").is_in(used)) if used else ck.tail(1)
        for r in sel.iter_rows(named=True):
            bits = [f"{k.replace('_', ' ')} {r[k]}" for k in ("epochs", "n_training_rows", "training_snapshot_id",
                                                               "seed", "created_at", "reused_at", "wall_time_s")
                    if r.get(k) is not None]
            rows.append(("generator checkpoint", f"{r['checkpoint_id']}: " + ", ".join(bits)))
    elif used:
        rows.append(("generator checkpoint", ", ".join(used)))
    for s, sl in shortlists.items():
        if sl.height and "surrogate_sha256" in sl.columns:
            r = sl.row(0, named=True)
            rows.append(("surrogate", f"{s}: weights sha256 {str(r['surrogate_sha256'])[:16]}…, "
                                      f"code {r.get('code_version', '')}"))
        else:
            rows.append(("surrogate", s))
    return rows


def stage_rows(store: TableStore, chemical_system: str, surrogate: str | None) -> list[dict[str, Any]]:
    """When and how big each stage's table (the system's partition where it has one) was written."""
    out = []
    for t in STAGE_TABLES:
        parts = store.partitions(t)
        if not parts:
            continue
        if t in ("templates", "discoveries") or parts == [DEFAULT_PARTITION]:
            mine = parts  # generation runs of every system / one unpartitioned table
        else:
            mine = [p for p in parts if p in (chemical_system, f"{chemical_system}|{surrogate}")]
        if not mine:
            continue
        ptrs = [store.pointer(t, p) or {} for p in mine]
        out.append({"table": t, "partitions": ", ".join(mine) if len(mine) <= 2 else f"{len(mine)} partitions",
                    "rows": sum(int(p.get("rows", 0)) for p in ptrs),
                    "written_at": max(str(p.get("written_at", "")) for p in ptrs)})
    return out


# ----------------------------------------------------------------------------- candidates
def _verdict(row: dict[str, Any]) -> str:
    stable, fmin = row.get("is_dynamically_stable"), row.get("min_frequency_thz")
    if stable is None:
        return "not screened"
    f = f" (min {fmin:.2f} THz)" if fmin is not None else ""
    return ("stable" if stable else "unstable") + f


def _novelty(row: dict[str, Any]) -> str:
    known, novel = row.get("known_material_id"), row.get("is_novel")
    if known:
        return f"known: {known}"
    if novel is None:
        return "not checked"
    return "novel" if novel else "known"


def top_candidates(shortlists: dict[str, pl.DataFrame], primary: str, *, n: int,
                   discoveries: pl.DataFrame | None = None) -> pl.DataFrame:
    """The best ``n`` distinct candidates of ``primary``'s shortlist (relaxed duplicates left out),
    with the energy above the hull under every surrogate (``e_above_hull[<name>]``), the phonon and
    novelty verdicts as text, and the DFT verdict where a result exists."""
    sl = shortlists[primary]
    if "duplicate_of" in sl.columns:
        sl = sl.filter(pl.col("duplicate_of").is_null())
    order = [c for c in ("unique_rank", "rank", "e_above_hull_ev_per_atom") if c in sl.columns][:1]
    top = sl.sort(order or "candidate_id").head(n)
    rows = top.to_dicts()
    for r in rows:
        r["phonon_verdict"] = _verdict(r)
        r["novelty"] = _novelty(r)
    out = pl.DataFrame(rows, infer_schema_length=None) if rows else top.with_columns(
        pl.lit(None, pl.String).alias("phonon_verdict"), pl.lit(None, pl.String).alias("novelty"))
    for name, other in shortlists.items():
        e = other.select("candidate_id", pl.col("e_above_hull_ev_per_atom").alias(f"e_above_hull[{name}]"))
        out = out.join(e.unique("candidate_id", keep="first"), on="candidate_id", how="left")
    if discoveries is not None and discoveries.height and "verdict" in discoveries.columns:
        d = (discoveries.filter(pl.col("candidate_id").is_not_null())
             .select("candidate_id", pl.col("verdict").alias("dft_verdict"))
             .unique("candidate_id", keep="last"))
        out = out.join(d, on="candidate_id", how="left")
    else:
        out = out.with_columns(pl.lit(None, pl.String).alias("dft_verdict"))
    return out


def _structure(row: dict[str, Any]):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.asarray(row["lattice_matrix"], dtype=float).reshape(3, 3)), row["species"],
                     row["frac_coords"])


def cif_texts(relaxed: pl.DataFrame | None, ids: list[str]) -> dict[str, str]:
    """CIF (pymatgen ``CifWriter``, symmetrised at 0.01 Å where it can be) of each relaxed cell."""
    if relaxed is None or not {"lattice_matrix", "species", "frac_coords"} <= set(relaxed.columns):
        return {}
    from pymatgen.io.cif import CifWriter

    out: dict[str, str] = {}
    for r in relaxed.filter(pl.col("candidate_id").is_in(ids)).iter_rows(named=True):
        if r["lattice_matrix"] is None:
            continue
        s = _structure(r)
        try:
            out[r["candidate_id"]] = str(CifWriter(s, symprec=0.01))
        except (ValueError, TypeError):  # spglib could not symmetrise: the P1 cell
            out[r["candidate_id"]] = str(CifWriter(s))
    return out


# ----------------------------------------------------------------------------- plots
def _phase_diagram(references: pl.DataFrame):
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    ok = references.filter((pl.col("status") == "ok") & pl.col("energy_ev").is_not_null())
    entries = [PDEntry(Composition(f), e, name=p) for p, f, e in ok.select("phase_id", "formula", "energy_ev").iter_rows()]
    return PhaseDiagram(entries)


def _tri(fracs: np.ndarray) -> np.ndarray:
    """Barycentric (x0, x1, x2) -> 2-D points of an equilateral triangle (x0 at the origin)."""
    return np.stack([fracs[:, 1] + 0.5 * fracs[:, 2], np.sqrt(3) / 2 * fracs[:, 2]], axis=1)


def hull_figure(references: pl.DataFrame, candidates: pl.DataFrame, elements: list[str], *, label_top: int = 10):
    """The hull of the competing phases (pymatgen ``PhaseDiagram``) with the candidates on it.

    Ternary: the Gibbs triangle (stable phases and tie lines, candidates coloured by energy above
    the hull, the first ``label_top`` marked #1, #2, ... in their order). Binary: formation energy
    against composition with the hull. ``candidates``: ``candidate_id``, ``formula``,
    ``e_above_hull_ev_per_atom``, ``formation_energy_per_atom_ev``.
    Returns None for other systems."""
    from pymatgen.core import Composition

    pd_ = _phase_diagram(references)
    els = sorted(elements)
    stable = list(pd_.stable_entries)

    def fracs(comp: Composition) -> np.ndarray:
        return np.array([comp.get_atomic_fraction(e) for e in els])

    cands = candidates.filter(pl.col("e_above_hull_ev_per_atom").is_not_null())
    ehull = cands["e_above_hull_ev_per_atom"].to_numpy()
    if len(els) == 3:
        fig, ax = subplots(figsize=(6.2, 5.4))
        corners = _tri(np.eye(3))
        ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.3", lw=1.0)
        for facet in pd_.facets:
            pts = _tri(np.array([fracs(pd_.qhull_entries[i].composition) for i in facet]))
            ax.plot(*np.vstack([pts, pts[:1]]).T, color="0.55", lw=0.7, zorder=1)
        sp = _tri(np.array([fracs(e.composition) for e in stable]))
        ax.scatter(sp[:, 0], sp[:, 1], s=42, color="k", zorder=3, label="known phases on the hull")
        for e, (x, y) in zip(stable, sp, strict=True):
            if len(e.composition.elements) > 1:  # the corners are labelled by element
                ax.annotate(e.composition.reduced_formula, (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        if cands.height:
            cp = _tri(np.array([fracs(Composition(f)) for f in cands["formula"]]))
            sc = ax.scatter(cp[:, 0], cp[:, 1], c=ehull, cmap="viridis_r", marker="*", s=90, edgecolor="k",
                            lw=0.4, zorder=4, label="candidates")
            fig.colorbar(sc, ax=ax, shrink=0.7, label="E above hull (eV/atom)")
            for i, (x, y) in enumerate(cp[:label_top], start=1):  # the rank of the report's table
                ax.annotate(f"#{i}", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8,
                            color="tab:red", weight="bold")
        for name, (x, y) in zip(els, corners, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(-12 if x < 0.5 else 6, -12 if y < 0.1 else 6),
                        fontsize=11, weight="bold")
        ax.set_aspect("equal")
        ax.axis("off")
        ax.legend(loc="upper left", fontsize=8, frameon=False, bbox_to_anchor=(0.0, 1.0))
    elif len(els) == 2:
        fig, ax = subplots(figsize=(6.2, 4.2))
        hull_pts = sorted((fracs(e.composition)[1], pd_.get_form_energy_per_atom(e)) for e in stable)
        ax.plot([p[0] for p in hull_pts], [p[1] for p in hull_pts], "k-o", ms=4, label="hull")
        if cands.height:
            xs = [fracs(Composition(f))[1] for f in cands["formula"]]
            sc = ax.scatter(xs, cands["formation_energy_per_atom_ev"].to_numpy(), c=ehull, cmap="viridis_r",
                            marker="*", s=90, edgecolor="k", lw=0.4, label="candidates")
            fig.colorbar(sc, ax=ax, label="E above hull (eV/atom)")
        ax.set_xlabel(f"x in {els[0]}(1-x){els[1]}(x)")
        ax.set_ylabel("formation energy (eV/atom)")
        ax.legend(fontsize=8)
    else:
        return None
    ax.set_title(f"{'-'.join(els)} hull under the surrogate ({len(stable)} phases on it)", fontsize=9)
    return fig


def energies_figure(stability: pl.DataFrame, shortlist: pl.DataFrame):
    """Energy above the hull against formation energy (every relaxed candidate), and against the
    lowest phonon frequency (phonon-screened ones, stable in blue)."""
    fig, (a, b) = subplots(1, 2, figsize=(9.0, 3.6))
    st = stability.filter(pl.col("e_above_hull_ev_per_atom").is_not_null())
    a.scatter(st["formation_energy_per_atom_ev"].to_numpy(), st["e_above_hull_ev_per_atom"].to_numpy(), s=14,
              color="tab:gray")
    a.axhline(0.0, color="k", lw=0.6)
    a.set_xlabel("formation energy (eV/atom)")
    a.set_ylabel("E above hull (eV/atom)")
    a.set_title(f"{st.height} relaxed candidates", fontsize=9)
    ph = shortlist.filter(pl.col("min_frequency_thz").is_not_null()) if "min_frequency_thz" in shortlist.columns \
        else shortlist.clear()
    if ph.height:
        ok = ph["is_dynamically_stable"].fill_null(False).to_numpy()
        x, y = ph["min_frequency_thz"].to_numpy(), ph["e_above_hull_ev_per_atom"].to_numpy()
        b.scatter(x[ok], y[ok], color="tab:blue", s=22, label="dynamically stable")
        b.scatter(x[~ok], y[~ok], color="tab:red", marker="x", s=22, label="imaginary modes")
        b.axvline(0.0, color="k", lw=0.6)
        b.legend(fontsize=7)
    else:
        b.text(0.5, 0.5, "no phonon screen yet", ha="center", va="center", transform=b.transAxes)
    b.set_xlabel("lowest phonon frequency (THz)")
    b.set_ylabel("E above hull (eV/atom)")
    b.set_title(f"{ph.height} phonon-screened candidates", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;font-size:.86em;margin:.5em 0}th,td{border:1px solid #ddd;
padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;
font-variant-numeric:tabular-nums}img.plot{max-width:100%;border:1px solid #eee;margin:.4em 0}.muted{color:#777}
code{font-size:.92em}.bands{display:flex;flex-wrap:wrap;gap:.6em}.bands figure{margin:0}
figcaption{font-size:.8em;color:#555}"""


def _esc(v: Any) -> str:
    if v is None:
        return '<span class="muted">—</span>'
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[str], *, raw: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{v if c in raw else _esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, name: str, alt: str) -> str:
    return (f'<img class="plot" data-plot="{html.escape(name)}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def _cif_link(cid: str, cif: str | None) -> str:
    if not cif:
        return '<span class="muted">no cell</span>'
    b64 = base64.b64encode(cif.encode()).decode()
    return (f'<a class="cif" download="{html.escape(cid)}.cif" '
            f'href="data:chemical/x-cif;base64,{b64}">{html.escape(cid)}.cif</a>')


def write_report(store: TableStore, out: Path, *, chemical_system: str, surrogate: str | None = None,
                 top_n: int = 10, n_band_plots: int = 6, settings: dict[str, Any] | None = None) -> ReportResult:
    """Write the discovery report of ``chemical_system`` to ``out`` (an ``.html`` file).

    ``surrogate``: whose shortlist ranks the candidates (default: the newest shortlist of the
    system); every other surrogate's energy above the hull is shown beside it. ``settings``:
    extra (label -> value) lines for the run-settings section (e.g. the profile). Raises
    ``ValueError`` naming what is missing when the system has no shortlist."""
    chemsys = canonical_system(chemical_system)
    surrogates = screening_surrogates(store, chemsys)
    if not surrogates:
        have = sorted({p.split("|", 1)[0] for p in store.partitions("shortlist")})
        raise ValueError(f"no shortlist of {chemsys} under {store.home} (shortlists: {', '.join(have) or 'none'}); "
                         "run the screening first (cgwgan main --system ...)")
    if surrogate and surrogate not in surrogates:
        raise ValueError(f"no shortlist of {chemsys} screened with {surrogate!r}; screened with: {', '.join(surrogates)}")
    primary = surrogate or surrogates[0]
    part = f"{chemsys}|{primary}"
    shortlists = {s: store.read("shortlist", f"{chemsys}|{s}") for s in surrogates}
    sl = shortlists[primary]
    relaxed = _read(store, "relaxed", part)
    refs = _read(store, "reference_energies", part)
    phonons = _read(store, "phonons", part)
    discoveries = _read(store, "discoveries")
    top = top_candidates(shortlists, primary, n=top_n, discoveries=discoveries)
    ids = top["candidate_id"].to_list()
    cifs = cif_texts(relaxed, ids)

    plots: list[str] = []
    sections: list[str] = []
    elements = chemsys.split("-")
    # --- hull and energies
    figs = []
    if refs is not None:
        ref_rows = refs.filter(pl.col("kind") == "reference")
        stability = refs.filter((pl.col("kind") == "candidate") & (pl.col("status") == "ok"))
        best = top.select("candidate_id", "formula", "e_above_hull_ev_per_atom", "formation_energy_per_atom_ev")
        try:
            fig = hull_figure(ref_rows, best, elements)
        except (ValueError, KeyError) as exc:  # e.g. no elemental reference: say so in the report
            fig = None
            figs.append(f'<p class="muted">hull plot not drawn: {html.escape(str(exc))}</p>')
        if fig is not None:
            figs.append(_img(figure_png(fig), "hull", f"{chemsys} convex hull with the best candidates"))
            plots.append("hull")
        on_hull = ref_rows.filter(pl.col("e_above_hull_ev_per_atom").abs() < 1e-6).sort("formula")
        from pymatgen.core import Composition

        figs.append("<p>Competing phases on the hull under " + html.escape(primary) + ": "
                    + ", ".join(f"{html.escape(Composition(f).reduced_formula)} (<code>{html.escape(p)}</code>)"
                                for f, p in on_hull.select("formula", "phase_id").iter_rows())
                    + f". {ref_rows.height} competing phases in all; candidates are marked #1, #2, ... "
                    "as in the table below.</p>")
        figs.append(_img(figure_png(energies_figure(stability, sl)), "energies",
                         "energy above the hull against formation energy and the lowest phonon frequency"))
        plots.append("energies")
    else:
        figs.append('<p class="muted">no reference_energies table: the hull has not been computed</p>')

    # --- top candidates
    tcols = ["#", "candidate", "formula", "space group", *[f"E_hull {s} (eV/atom)" for s in surrogates],
             "E_f (eV/atom)", "decomposition", "phonons", "novelty", "DFT verdict", "template_id",
             "checkpoint_id", "CIF"]
    trows = []
    for i, r in enumerate(top.iter_rows(named=True), start=1):
        trows.append({"#": r.get("unique_rank") or r.get("rank") or i, "candidate": r["candidate_id"],
                      "formula": r.get("reduced_formula") or r.get("formula"),
                      "space group": r.get("spacegroup_number_relaxed") or r.get("spacegroup_number"),
                      **{f"E_hull {s} (eV/atom)": r.get(f"e_above_hull[{s}]") for s in surrogates},
                      "E_f (eV/atom)": r.get("formation_energy_per_atom_ev"),
                      "decomposition": r.get("decomposition"), "phonons": r["phonon_verdict"],
                      "novelty": r["novelty"], "DFT verdict": r.get("dft_verdict") or "no DFT result",
                      "template_id": r.get("template_id"), "checkpoint_id": r.get("checkpoint_id"),
                      "CIF": _cif_link(r["candidate_id"], cifs.get(r["candidate_id"]))})
    bands = []
    if phonons is not None and "band_frequencies_thz" in phonons.columns:
        from lib.phonons import band_structure_figure

        ph_ok = phonons.filter((pl.col("status") == "ok") & pl.col("candidate_id").is_in(ids)
                               & pl.col("band_frequencies_thz").is_not_null())
        order = {c: i for i, c in enumerate(ids)}
        formula = dict(zip(top["candidate_id"], top["reduced_formula" if "reduced_formula" in top.columns
                                                      else "formula"], strict=True))
        for r in sorted(ph_ok.iter_rows(named=True), key=lambda r: order[r["candidate_id"]])[:n_band_plots]:
            title = f"#{order[r['candidate_id']] + 1} {formula[r['candidate_id']]} {r['candidate_id']}"
            png = figure_png(band_structure_figure(r, title=title))
            bands.append(f"<figure>{_img(png, 'bands', 'phonon bands of ' + title)}"
                         f"<figcaption>{html.escape(title)}: {html.escape(_verdict(r))}</figcaption></figure>")
            plots.append("bands")

    # --- lineage and settings
    lineage = lineage_rows(store, shortlists, sl)
    settings_rows = [("chemical system", chemsys), ("ranked by", primary), ("home", str(store.home)),
                     *[(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in (settings or {}).items()]]
    funnel = funnel_counts(store, chemsys, primary)

    gen = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    sections.append("<h2>Run settings and lineage</h2>" + _table(
        [{"item": k, "value": v} for k, v in settings_rows + lineage], ["item", "value"]))
    sections.append("<h3>Stages</h3>" + _table(stage_rows(store, chemsys, primary),
                                              ["table", "partitions", "rows", "written_at"]))
    sections.append("<h2>Funnel</h2>" + _table(funnel, ["stage", "count", "note"]))
    sections.append("<h2>Hull and energies</h2>" + "".join(figs))
    sections.append(f"<h2>Top {len(trows)} distinct candidates</h2>"
                    "<p>Ranked by energy above the hull under " + html.escape(primary)
                    + "; relaxed duplicates left out. E_hull is the surrogate's energy above the hull of the "
                    "competing phases relaxed with the same surrogate; phonon verdicts come from a "
                    "finite-displacement screen with its forces. CIF: the relaxed cell.</p>"
                    + _table(trows, tcols, raw={"CIF"}))
    if bands:
        sections.append("<h2>Phonon band structures</h2><div class=\"bands\">" + "".join(bands) + "</div>")
    sections.append('<p class="muted">Known phases: the rows of <code>mp_structures</code> (their sources '
                    "under lineage above; Materials Project data is CC BY 4.0); ids above are the platform's content-hash ids "
                    "(<code>cgwgan sql</code> finds every row by them).</p>")
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>CGWGAN discovery report: "
           f"{html.escape(chemsys)}</title><style>{_CSS}</style></head><body>"
           f"<h1>CGWGAN discovery report: {html.escape(chemsys)}</h1>"
           f"<p class=\"muted\">generated {gen} from the tables under <code>{html.escape(str(store.home))}</code>"
           "</p>" + "".join(sections) + "</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    return ReportResult(out, chemsys, surrogates, funnel, top, plots)
