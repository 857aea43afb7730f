"""Group ``dft``: hand-off to VASP/phonopy, ingest of results, discoveries, surrogate churn.

Thin wrappers around :mod:`lib.dft_inputs`, :mod:`lib.dft_ingest`, :mod:`lib.lineage` and
:mod:`lib.churn`. ``dft_results`` is normally launched by ``dft_results_sensor``
(``orchestration/sensors.py``) with the run folders to ingest in its run config.
"""

import json
import time
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl

from assets._checks import build_contract_checks
from lib.churn import churn_figure, rank_pairs
from lib.churn import surrogate_churn as churn_table
from lib.dft_ingest import (
    DiscoveryThresholds,
    ingest_run_folder,
    latest_results,
    load_elemental_references,
    result_id_for,
    rows_to_frame,
    scan_results_root,
    select_discoveries,
)
from lib.dft_inputs import DftInputSettings, potcar_available, write_dft_inputs
from lib.lineage import attach_lineage
from lib.plots import figure_markdown
from orchestration.resources import CgwganHome, DftResource

GROUP = "dft"


# --------------------------------------------------------------------------- helpers
def read_all(store, table: str, *, with_chemical_system: bool = False) -> pl.DataFrame | None:
    """Every partition of ``table`` (``None`` when it was never written); screening partitions
    ``"<chemsys>|<surrogate>"`` give a ``chemical_system`` column when asked."""
    parts = store.partitions(table)
    if not parts:
        return None
    frames = []
    for p in parts:
        f = store.read(table, p)
        if with_chemical_system:
            f = f.with_columns(pl.lit(p.split("|")[0]).alias("chemical_system"))
        frames.append(f)
    return pl.concat(frames, how="diagonal_relaxed")


def _md_table(df: pl.DataFrame, max_rows: int = 20) -> str:
    if df.is_empty():
        return "(no rows)"
    head = df.head(max_rows)
    cols = head.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        cells = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "/")[:80] for c in cells) + " |")
    if df.height > max_rows:
        lines.append(f"\n… {df.height - max_rows} more rows")
    return "\n".join(lines)


# --------------------------------------------------------------------------- dft_inputs
class DftInputsConfig(dg.Config):
    # pymatgen input set of the relaxation (pymatgen.io.vasp.sets)
    input_set: Literal["MPRelaxSet", "MPScanRelaxSet", "MPMetalRelaxSet", "MPHSERelaxSet", "MP24RelaxSet",
                       "MITRelaxSet", "MVLRelax52Set", "MVLScanRelaxSet", "MatPESRelaxSet", "MPStaticSet",
                       "MPScanStaticSet", "MP24StaticSet", "MatPESStaticSet"] = "MPRelaxSet"
    user_incar_settings_json: str = "{}"
    user_kpoints_settings_json: str = "{}"
    # "" = the input set's own (pymatgen PotcarSingle.functional_dir)
    user_potcar_functional: Literal["", "PBE", "PBE_52", "PBE_54", "PBE_64", "LDA", "LDA_52", "LDA_54", "LDA_64",
                                    "PW91", "LDA_US", "PW91_US", "Perdew_Zunger81"] = ""
    supercell_min_length_a: float = 10.0
    max_supercell_atoms: int = 400
    displacement_a: float = 0.01
    top_k: int = 0  # per (system, surrogate) shortlist; 0 = all rows
    chemical_systems: list[str] = []  # empty = all
    only_dynamically_stable: bool = False  # hand off only candidates the surrogate found phonon-stable
    include_relaxed_duplicates: bool = False  # also candidates that relaxed into a better-ranked structure
    potcar_dir: str = ""  # overrides pymatgen's PMG_VASP_PSP_DIR when set


@dg.asset(group_name=GROUP, deps=["shortlist"], kinds={"parquet", "vasp"})
def dft_inputs(context: dg.AssetExecutionContext, config: DftInputsConfig,
               cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    """A VASP relaxation input set (pymatgen) and a phonopy displacement set per shortlisted
    candidate, under ``<home>/dft/inputs/<candidate_id>/``; the manifest maps folders to candidates."""
    t0 = time.perf_counter()
    store = cgwgan_home.store
    sl = read_all(store, "shortlist", with_chemical_system=True)
    if sl is None:
        raise dg.Failure(f"no shortlist table under {store.home}: materialise the screening stages first")
    if config.chemical_systems:
        sl = sl.filter(pl.col("chemical_system").is_in(config.chemical_systems))
    if not config.include_relaxed_duplicates and "duplicate_of" in sl.columns:
        sl = sl.filter(pl.col("duplicate_of").is_null())
    if config.top_k > 0:
        rank = "unique_rank" if "unique_rank" in sl.columns and not config.include_relaxed_duplicates else "rank"
        sl = sl.filter(pl.col(rank) <= config.top_k)
    if config.only_dynamically_stable and "is_dynamically_stable" in sl.columns:
        sl = sl.filter(pl.col("is_dynamically_stable").fill_null(False))
    relaxed = read_all(store, "relaxed")
    if relaxed is not None and {"lattice_matrix", "species", "frac_coords"} <= set(relaxed.columns):
        cells = relaxed.filter(pl.col("status") == "ok").select(
            "candidate_id", "surrogate_name", "lattice_matrix", "species", "frac_coords"
        ).unique(["candidate_id", "surrogate_name"], keep="last")
        sl = sl.drop([c for c in ("lattice_matrix", "species", "frac_coords") if c in sl.columns]).join(
            cells, on=["candidate_id", "surrogate_name"], how="left")
    if "lattice_matrix" not in sl.columns or sl["lattice_matrix"].null_count() == sl.height:
        cands = read_all(store, "candidates")
        if cands is not None:
            asu = [c for c in ("spacegroup_number", "asu_letters", "asu_species", "asu_frac_coords",
                               "a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg") if c in cands.columns]
            sl = sl.drop([c for c in [*asu, "lattice_matrix", "species", "frac_coords"] if c in sl.columns]).join(
                cands.select("candidate_id", *asu).unique("candidate_id"), on="candidate_id", how="left")
    ok, potcar_note = potcar_available(config.potcar_dir or None)
    settings = DftInputSettings(
        input_set=config.input_set, user_incar_settings=json.loads(config.user_incar_settings_json),
        user_kpoints_settings=json.loads(config.user_kpoints_settings_json),
        user_potcar_functional=config.user_potcar_functional or None,
        supercell_min_length_a=config.supercell_min_length_a, max_supercell_atoms=config.max_supercell_atoms,
        displacement_a=config.displacement_a)
    root = cgwgan_home.subdir("dft/inputs")
    manifest = write_dft_inputs(sl, root, settings=settings, write_potcar=ok)
    info = store.write("dft_inputs", manifest, metadata={"settings": settings.as_json(), "has_potcar": ok})
    cgwgan_home.refresh_catalog()
    n_written = int((manifest["status"] == "written").sum())
    context.log.info(f"dft_inputs: {n_written}/{manifest.height} run folders under {root}; POTCAR: {potcar_note}")
    return dg.MaterializeResult(metadata={
        "rows": manifest.height,
        "n_written": n_written,
        "n_failed": manifest.height - n_written,
        "inputs_dir": str(root),
        "input_set": config.input_set,
        "settings": settings.as_json(),
        "has_potcar": ok,
        "potcar": ("POTCARs written from " + potcar_note) if ok else
                  f"POTCARs NOT written (licensed): {potcar_note}; each folder has POTCAR.spec instead",
        "n_displacements_total": int(manifest["n_displacements"].fill_null(0).sum()),
        "seconds": round(time.perf_counter() - t0, 2),
        "table_version": info.version,
        "preview": dg.MetadataValue.md(_md_table(manifest.select(
            "run_name", "status", "formula", "surrogate_name", "rank", "n_atoms", "n_supercell_atoms",
            "n_displacements", "reason"))),
    })


_REQUIRED_INPUTS = ("INCAR", "KPOINTS", "POSCAR", "cgwgan_run.json", "phonopy/phonopy_disp.yaml", "phonopy/SPOSCAR")


@dg.asset_check(asset=dft_inputs, description="Every written run folder holds the VASP inputs, a POTCAR or "
                "POTCAR.spec, cgwgan_run.json and one POSCAR-NNN per phonopy displacement.")
def dft_inputs_folders_complete(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    m = cgwgan_home.store.read("dft_inputs").filter(pl.col("status") == "written")
    incomplete = []
    for row in m.iter_rows(named=True):
        d = Path(row["run_dir"])
        missing = [f for f in _REQUIRED_INPUTS if not (d / f).is_file()]
        if not ((d / "POTCAR").is_file() or (d / "POTCAR.spec").is_file()):
            missing.append("POTCAR|POTCAR.spec")
        n_poscars = len(list((d / "phonopy").glob("POSCAR-[0-9]*")))
        if n_poscars != row["n_displacements"]:
            missing.append(f"{row['n_displacements']} POSCAR-NNN (found {n_poscars})")
        if missing:
            incomplete.append(f"{row['run_name']}: {', '.join(missing)}")
    return dg.AssetCheckResult(passed=not incomplete, metadata={
        "n_folders": m.height, "n_incomplete": len(incomplete), "incomplete": "; ".join(incomplete[:20])})


# --------------------------------------------------------------------------- dft_results
class DftResultsConfig(dg.Config):
    results_dir: str = ""  # default: the dft resource's results_dir (CGWGAN_DFT_RESULTS), else <home>/dft/results
    run_names: list[str] = []  # empty: every ready (or refused) folder of the results root
    signatures: list[str] = []  # the sensor's folder signatures, parallel to run_names (recorded)
    settle_seconds: float = 0.0  # with empty run_names: skip folders changed more recently than this
    references_path: str = ""  # ComputedEntry dicts; default: the dft resource's elemental_refs (CGWGAN_ELEMENTAL_REFS)
    q_mesh: list[int] = [8, 8, 8]
    imaginary_tol_thz: float = 0.1


@dg.asset(group_name=GROUP, deps=["dft_inputs"], kinds={"parquet", "vasp"})
def dft_results(context: dg.AssetExecutionContext, config: DftResultsConfig,
                cgwgan_home: CgwganHome, dft: DftResource) -> dg.MaterializeResult:
    """Finished VASP/phonopy run folders, each ingested once (one store partition per content hash)."""
    t0 = time.perf_counter()
    store = cgwgan_home.store
    root = dft.results_root(cgwgan_home, config.results_dir)
    scanned = scan_results_root(root, settle_seconds=config.settle_seconds)
    names = list(config.run_names) or [f.name for f in scanned if f.is_ready or f.refused_reason]
    signatures = {f.name: f.signature for f in scanned}
    signatures.update(zip(config.run_names, config.signatures, strict=False))
    ref_path = dft.references_path(config.references_path)
    refs = load_elemental_references(ref_path) if ref_path else None
    new_rows, skipped = [], []
    for name in names:
        rid, _digest, _refusal = result_id_for(root, name)
        if store.exists("dft_results", rid):
            skipped.append(name)
            continue
        row = ingest_run_folder(root, name, references=refs, q_mesh=config.q_mesh,
                                imaginary_tol_thz=config.imaginary_tol_thz)
        store.write("dft_results", rows_to_frame([row]), partition=row["result_id"],
                    metadata={"run_name": name, "status": row["status"], "content_sha256": row["content_sha256"],
                              "signature": signatures.get(name, "")})
        new_rows.append(row)
        context.log.info(f"dft_results: {name} -> {row['status']} {row['reason'][:200]}")
    if new_rows:
        cgwgan_home.refresh_catalog()
    new = rows_to_frame(new_rows)
    counts = {s: int((new["status"] == s).sum()) for s in ("ok", "unlinked", "unconverged", "failed", "refused")}
    return dg.MaterializeResult(metadata={
        "results_dir": str(root),
        "n_requested": len(names),
        "n_new": len(new_rows),
        "n_already_ingested": len(skipped),
        **{f"n_{k}": v for k, v in counts.items()},
        "references": f"{refs.source} (sha256 {refs.sha256[:12]}…)" if refs else "none: formation energies null",
        "total_rows": store.rows("dft_results"),
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_per_new_run": round((time.perf_counter() - t0) / len(new_rows), 2) if new_rows else 0.0,
        "new_results": dg.MetadataValue.md(_md_table(new.select(
            "run_name", "status", "formula", "final_energy_ev", "formation_energy_per_atom_ev",
            "min_frequency_thz", "phonon_source", "reason"))),
    })


@dg.asset_check(asset=dft_results, description="Every row that is not 'ok' says why, and VASP energies agree "
                "between vasprun.xml and OUTCAR (|ΔE| < 1 meV/cell) where both were read.")
def dft_results_consistent(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    if not store.exists("dft_results"):
        return dg.AssetCheckResult(passed=True, metadata={"rows": 0, "note": "nothing ingested yet"})
    r = store.read("dft_results")
    unexplained = r.filter((pl.col("status") != "ok") & (pl.col("reason").fill_null("") == ""))
    both = r.filter(pl.col("final_energy_ev").is_not_null() & pl.col("outcar_energy_ev").is_not_null())
    bad_e = both.filter((pl.col("final_energy_ev") - pl.col("outcar_energy_ev")).abs() > 1e-3)
    return dg.AssetCheckResult(passed=unexplained.is_empty() and bad_e.is_empty(), metadata={
        "rows": r.height, "n_unexplained": unexplained.height, "n_energy_compared": both.height,
        "n_energy_mismatch": bad_e.height,
        "mismatched_runs": ", ".join(bad_e["run_name"].to_list()[:20]),
        "status_counts": json.dumps(dict(r.group_by("status").len().iter_rows())),
    })


# --------------------------------------------------------------------------- discoveries
class DiscoveriesConfig(dg.Config):
    max_formation_energy_ev_per_atom: float = 0.0
    imaginary_tol_thz: float = 0.1
    require_phonons: bool = True


@dg.asset(group_name=GROUP, deps=[dft_results], kinds={"parquet"})
def discoveries(context: dg.AssetExecutionContext, config: DiscoveriesConfig,
                cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    """Candidates that pass DFT (formation energy below the threshold, no imaginary phonon mode),
    with their lineage: template, generator checkpoint, training snapshot, MP source, surrogate ranks."""
    store = cgwgan_home.store
    results = read_all(store, "dft_results")
    if results is None:
        results = rows_to_frame([])
    th = DiscoveryThresholds(max_formation_energy_ev_per_atom=config.max_formation_energy_ev_per_atom,
                             imaginary_tol_thz=config.imaginary_tol_thz, require_phonons=config.require_phonons)
    found = select_discoveries(results, thresholds=th)
    mp = None
    if store.exists("mp_structures"):
        mp = store.scan("mp_structures").select("snapshot_id", "source").collect()
    out = attach_lineage(found, candidates=read_all(store, "candidates"), templates=read_all(store, "templates"),
                         checkpoints=read_all(store, "wgan_checkpoints"), mp_structures=mp,
                         shortlist=read_all(store, "shortlist", with_chemical_system=True))
    out = out.drop([c for c in ("lattice_matrix", "species", "frac_coords", "files") if c in out.columns])
    store.write("discoveries", out, metadata={"thresholds": vars(th)})
    cgwgan_home.refresh_catalog()
    n_latest = latest_results(results).height
    return dg.MaterializeResult(metadata={
        "rows": out.height,
        "n_results_considered": n_latest,
        "n_linked_ok": int(latest_results(results).filter(pl.col("is_linked") & (pl.col("status") == "ok")).height)
        if n_latest else 0,
        "thresholds": json.dumps(vars(th), default=str),
        "n_with_full_lineage": int(out["mp_source"].is_not_null().sum()),
        "preview": dg.MetadataValue.md(_md_table(out.select(
            "candidate_id", "reduced_formula", "formation_energy_per_atom_ev", "min_frequency_thz",
            "checkpoint_id", "training_snapshot_id", "ranked_by_surrogates"))),
    })


@dg.asset_check(asset=discoveries, description="Every discovery is linked to a candidate and meets the "
                "thresholds it was selected with.")
def discoveries_meet_thresholds(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    d = store.read("discoveries")
    th = (store.pointer("discoveries") or {}).get("metadata", {}).get("thresholds", {})
    emax = float(th.get("max_formation_energy_ev_per_atom", 0.0))
    tol = float(th.get("imaginary_tol_thz", 0.1))
    bad = d.filter(pl.col("candidate_id").is_null() | (pl.col("formation_energy_per_atom_ev") >= emax)
                   | (pl.col("min_frequency_thz") < -tol))
    return dg.AssetCheckResult(passed=bad.is_empty(), metadata={
        "rows": d.height, "n_violations": bad.height, "max_formation_energy_ev_per_atom": emax,
        "imaginary_tol_thz": tol})


# --------------------------------------------------------------------------- surrogate_churn
class ChurnConfig(dg.Config):
    top_k: int = 10


@dg.asset(group_name=GROUP, deps=["shortlist"], kinds={"parquet"})
def surrogate_churn(context: dg.AssetExecutionContext, config: ChurnConfig,
                    cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    """Per chemical system and pair of surrogates: Spearman rank correlation, top-k overlap and the
    candidates whose phonon verdict flipped; both rankings side by side."""
    store = cgwgan_home.store
    sl = read_all(store, "shortlist", with_chemical_system=True)
    if sl is None:
        raise dg.Failure(f"no shortlist table under {store.home}")
    churn = churn_table(sl, top_k=config.top_k)
    pairs = rank_pairs(sl, top_k=config.top_k)
    store.write("surrogate_churn", churn, metadata={"top_k": config.top_k})
    cgwgan_home.refresh_catalog()
    meta: dict = {
        "rows": churn.height,
        "top_k": config.top_k,
        "surrogates": ", ".join(sorted(sl["surrogate_name"].unique().to_list())),
        "pairs": dg.MetadataValue.md(_md_table(churn.select(
            "chemical_system", "surrogate_a", "surrogate_b", "n_common", "spearman_rho", "top_k_overlap",
            "top_k_overlap_fraction", "n_verdict_flipped"))),
        "rankings_side_by_side": dg.MetadataValue.md(_md_table(pairs.select(
            "chemical_system", "surrogate_a", "surrogate_b", "candidate_id", "rank_a", "rank_b",
            "is_stable_a", "is_stable_b", "is_verdict_flipped"), max_rows=40)),
    }
    if pairs.height:
        meta["plot"] = dg.MetadataValue.md(figure_markdown(churn_figure(pairs), alt="rank vs rank"))
    return dg.MaterializeResult(metadata=meta)


@dg.asset_check(asset=surrogate_churn, description="Rank correlations lie in [-1, 1] and top-k overlaps never "
                "exceed k or the candidates either surrogate ranked.")
def surrogate_churn_bounds(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    c = cgwgan_home.store.read("surrogate_churn")
    bad = c.filter((pl.col("spearman_rho").abs() > 1 + 1e-9)
                   | (pl.col("top_k_overlap") > pl.min_horizontal("top_k", "n_ranked_a", "n_ranked_b"))
                   | (pl.col("n_common") > pl.min_horizontal("n_ranked_a", "n_ranked_b")))
    return dg.AssetCheckResult(passed=bad.is_empty(), metadata={"rows": c.height, "n_violations": bad.height})


contract_checks = build_contract_checks(["dft_inputs", "dft_results", "discoveries", "surrogate_churn"])
