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
from lib.contracts import conform
from lib.dft_ingest import (
    ingest_run_folder,
    latest_results,
    load_elemental_references,
    result_id_for,
    rows_to_frame,
    scan_results_root,
)
from lib.dft_inputs import DftInputSettings, potcar_available, write_dft_inputs
from lib.dft_verdicts import dft_verdicts, parity_figure
from lib.dft_verdicts import surrogate_accuracy as accuracy_table
from lib.lineage import attach_lineage
from lib.plots import figure_markdown
from lib.verdicts import DEFAULT_MIN_FREQUENCY_THZ, verdict_counts
from orchestration.resources import CgwganHome, DftResource, RayResource

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


def _shortlists(store, chemical_systems: list[str]) -> pl.DataFrame:
    """Every shortlist partition, of the given chemical systems (all when empty); a clear failure
    when no shortlist was written yet."""
    sl = read_all(store, "shortlist", with_chemical_system=True)
    if sl is None:
        raise dg.Failure(f"no shortlist table under {store.home}: materialise the screening stages first")
    return sl.filter(pl.col("chemical_system").is_in(chemical_systems)) if chemical_systems else sl


def with_cells(store, sl: pl.DataFrame) -> pl.DataFrame:
    """Shortlist rows with each surrogate's relaxed cell (``relaxed``, status ok), else the
    candidates' ASU columns (rebuilt by ``lib.export.structures_from_frame``)."""
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
    return sl


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
    include_known_phases: bool = False  # also candidates that relaxed into a known phase (is_novel false)
    potcar_dir: str = ""  # overrides pymatgen's PMG_VASP_PSP_DIR when set


@dg.asset(group_name=GROUP, deps=["shortlist"], kinds={"parquet", "vasp"})
def dft_inputs(context: dg.AssetExecutionContext, config: DftInputsConfig,
               cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    """A VASP relaxation input set (pymatgen) and a phonopy displacement set per shortlisted
    candidate, under ``<home>/dft/inputs/<candidate_id>/``; the manifest maps folders to candidates."""
    t0 = time.perf_counter()
    store = cgwgan_home.store
    sl = _shortlists(store, config.chemical_systems)
    if not config.include_relaxed_duplicates and "duplicate_of" in sl.columns:
        sl = sl.filter(pl.col("duplicate_of").is_null())
    if not config.include_known_phases and "is_novel" in sl.columns:
        sl = sl.filter(pl.col("is_novel").fill_null(True))  # null: not matched yet, as dft_runs counts it
    if config.top_k > 0:
        rank = "unique_rank" if "unique_rank" in sl.columns and not config.include_relaxed_duplicates else "rank"
        sl = sl.filter(pl.col(rank) <= config.top_k)
    if config.only_dynamically_stable and "is_dynamically_stable" in sl.columns:
        sl = sl.filter(pl.col("is_dynamically_stable").fill_null(False))
    sl = with_cells(store, sl)
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


# --------------------------------------------------------------------------- dft_runs (GPAW, here)
class DftRunsConfig(dg.Config):
    preset: Literal["fast", "standard"] = "fast"  # lib/dft_presets/gpaw.json
    k: int = 3  # best k novel, unique shortlisted candidates per chemical system (0 = all)
    chemical_systems: list[str] = []  # empty = every system of the shortlist
    max_atoms: int = 20  # candidates with more atoms in their cell are left out (0 = no limit)
    competing_phases: bool = True  # also the MP phases (system + subsystems) of each system's DFT hull
    max_phase_atoms: int = 20  # competing phases with more atoms in the primitive cell are skipped (0 = no limit)
    max_phase_e_above_hull_ev_per_atom: float = 0.1  # compounds further from MP's hull are not needed
    phonons: bool = True  # GPAW phonons of the candidates (the preset's phonon block); never for phases
    use_ray: bool = True  # Ray tasks (ray_runtime: local, or the cluster of RAY_ADDRESS); False: one by one here
    num_cpus_per_run: int = 1  # Ray num_cpus of each run = GPAW's OpenMP/BLAS threads
    max_parallel: int = 0  # runs in flight at once (0 = as many as Ray schedules)
    timeout_s: float = 7200.0  # per stage; a stage that runs out is killed and recorded as failed


@dg.asset(group_name=GROUP, deps=["shortlist", "mp_structures"], kinds={"python", "ray"})
def dft_runs(context: dg.AssetExecutionContext, config: DftRunsConfig, cgwgan_home: CgwganHome,
             dft: DftResource, ray_runtime: RayResource) -> dg.MaterializeResult:
    """GPAW (PBE, plane waves) run folders under the DFT results root, run here as Ray tasks: the best
    k novel, unique shortlisted candidates of each system and every MP competing phase of its DFT
    hull, with the same preset. Resumable and idempotent: a finished folder is never recomputed, a
    killed one is redone; the ``dft_results`` sensor ingests the folders as it ingests VASP ones."""
    from lib import dft_gpaw as gp
    from lib.export import structures_from_frame
    from lib.ids import content_hash

    t0 = time.perf_counter()
    store = cgwgan_home.store
    sl = _shortlists(store, config.chemical_systems)
    picked, left_out = gp.select_candidates(with_cells(store, sl), k=config.k, max_atoms=config.max_atoms)
    root = dft.results_root(cgwgan_home)
    overrides = None if config.phonons else {"phonon": {"enabled": False}}
    rows: list[dict] = []
    folders: list[str] = []
    try:
        built = structures_from_frame(picked) if picked.height else None
    except ValueError as exc:  # no cell and no ASU columns at all
        raise dg.Failure(f"dft_runs: the shortlisted candidates have no structure to run: {exc}") from exc
    structures = dict(zip(built.ids, built.structures, strict=True)) if built else {}
    failures = dict(built.failures) if built else {}
    for g in picked.iter_rows(named=True):
        cid = g["candidate_id"]
        name = gp.run_folder_name("candidate", cid, config.preset)
        row = {"run_name": name, "run_dir": str(root / name), "kind": "candidate", "candidate_id": cid,
               "chemical_system": g["chemical_system"], "template_id": g.get("template_id"),
               "checkpoint_id": g.get("checkpoint_id"), "surrogates": g.get("surrogates"),
               "best_rank": g.get("best_rank"), "dft_preset": config.preset, "code_version": gp.CODE_VERSION}
        s = structures.get(cid)
        if s is None:
            rows.append({**row, "action": "skipped", "status": "skipped",
                         "reason": f"structure not rebuilt: {failures.get(cid, 'no cell')}"})
            continue
        record = {"candidate_id": cid, "template_id": g.get("template_id"), "checkpoint_id": g.get("checkpoint_id"),
                  "chemical_system": g["chemical_system"], "kind": "candidate",
                  "structure_source": f"relaxed:{g['surrogate_name']}" if g.get("lattice_matrix") else "candidate",
                  "run_id": content_hash({"candidate_id": cid, "structure": s.as_dict(), "preset": config.preset,
                                          "phonons": config.phonons}, prefix="gpaw-")}
        out = gp.write_gpaw_run(s, root / name, preset=config.preset, overrides=overrides, record=record)
        rows.append({**row, **_formula(s), "action": out["action"], "dft_preset": out["settings"]["preset_name"],
                     "dft_preset_sha256": out["settings"]["preset_sha256"],
                     "phonon_planned": bool(out["settings"].get("phonon_planned"))})
        folders.append(str(root / name))
    n_phase_skipped = 0
    if config.competing_phases and picked.height:
        if not store.exists("mp_structures"):
            raise dg.Failure("dft_runs: competing phases need the mp_structures table (materialise the mp group), "
                             "or set competing_phases=False")
        mp = store.read("mp_structures")
        systems = sorted(set(picked["chemical_system"].to_list()))
        seen: set[str] = set()
        for system in systems:
            phases, skipped = gp.select_competing_phases(
                mp, system.split("-"), max_atoms=config.max_phase_atoms,
                max_e_above_hull_ev_per_atom=config.max_phase_e_above_hull_ev_per_atom)
            for sk in skipped:
                name = gp.run_folder_name("competing_phase", sk["material_id"] or f"missing-{sk['reduced_formula']}",
                                          config.preset)
                if name in seen:
                    continue
                seen.add(name)
                n_phase_skipped += 1
                rows.append({"run_name": name, "run_dir": None, "kind": "competing_phase", "chemical_system": system,
                             "material_id": sk["material_id"], "reduced_formula": sk["reduced_formula"],
                             "dft_preset": config.preset, "action": "skipped", "status": "skipped",
                             "reason": sk["reason"], "code_version": gp.CODE_VERSION})
            for ph in phases:
                name = gp.run_folder_name("competing_phase", ph["material_id"], config.preset)
                if name in seen:
                    continue
                seen.add(name)
                s = ph["structure"]
                record = {"material_id": ph["material_id"], "kind": "competing_phase",
                          "chemical_system": s.composition.chemical_system, "hull_of": system,
                          "structure_source": "mp_structures"}
                out = gp.write_gpaw_run(s, root / name, preset=config.preset, overrides=gp.phase_overrides(s),
                                        record=record)
                rows.append({"run_name": name, "run_dir": str(root / name), "kind": "competing_phase",
                             "chemical_system": s.composition.chemical_system, "material_id": ph["material_id"],
                             **_formula(s), "action": out["action"], "dft_preset": out["settings"]["preset_name"],
                             "dft_preset_sha256": out["settings"]["preset_sha256"], "phonon_planned": False,
                             "code_version": gp.CODE_VERSION})
                folders.append(str(root / name))
    python = dft.gpaw_python or gp.DEFAULT_PYTHON
    before = {f: gp.folder_state(f) for f in folders}
    n_todo = sum(1 for s in before.values() if s not in ("ok", "failed"))
    context.log.info(f"dft_runs: {len(folders)} run folders under {root} ({n_todo} to run, "
                     f"{len(folders) - n_todo} finished already), preset {config.preset}")
    use_ray = config.use_ray and n_todo > 0
    if use_ray:
        ray_runtime.init()
    try:
        done = gp.run_gpaw_folders(
            folders, use_ray=use_ray, num_cpus=config.num_cpus_per_run, python=python, timeout_s=config.timeout_s,
            max_parallel=config.max_parallel,
            on_done=lambda r: context.log.info(f"dft_runs: {Path(r['folder']).name} -> {r['state']} "
                                               f"({r['seconds']:.0f} s) {r['error'][:200]}"))
    except gp.GpawMissingError as exc:
        raise dg.Failure(str(exc)) from exc
    by_folder = {d["folder"]: d for d in done}
    for row in rows:
        d = by_folder.get(row.get("run_dir") or "")
        if d is None:
            continue
        fields = gp.summary_fields(row["run_dir"])
        row.update(fields, state_before=d["state_before"], seconds=d["seconds"],
                   was_computed=d["state_before"] not in ("ok", "failed"),
                   redone_after_partial=d["redone_after_partial"])
        if d["error"]:
            row["reason"] = d["error"]
    frame = conform("dft_runs", pl.DataFrame(rows, infer_schema_length=None)) if rows else conform(
        "dft_runs", pl.DataFrame({"kind": [], "status": []}, schema={"kind": pl.String, "status": pl.String}))
    info = store.write("dft_runs", frame, metadata={"preset": config.preset, "results_dir": str(root)})
    cgwgan_home.refresh_catalog()
    counts = {s: int((frame["status"] == s).sum()) for s in ("ok", "failed", "partial", "pending", "skipped")}
    computed = frame.filter(pl.col("was_computed").fill_null(False))
    return dg.MaterializeResult(metadata={
        "rows": frame.height,
        "preset": config.preset,
        "results_dir": str(root),
        "n_candidates": int((frame["kind"] == "candidate").sum()),
        "n_competing_phases": int((frame["kind"] == "competing_phase").sum()),
        "n_phases_skipped": n_phase_skipped,
        "candidates_left_out": json.dumps(left_out),
        "n_computed": computed.height,
        "n_kept_finished": int(frame["status"].is_in(["ok", "failed"]).sum()) - computed.filter(
            pl.col("status").is_in(["ok", "failed"])).height,
        **{f"n_{k}": v for k, v in counts.items()},
        "backend": "ray" if use_ray else "local",
        "num_cpus_per_run": config.num_cpus_per_run,
        "seconds": round(time.perf_counter() - t0, 2),
        "gpaw_seconds_computed": round(float(computed["seconds"].fill_null(0).sum()), 1) if computed.height else 0.0,
        "table_version": info.version,
        "runs": dg.MetadataValue.md(_md_table(frame.select(
            "run_name", "kind", "reduced_formula", "n_atoms", "action", "status", "seconds", "energy_per_atom_ev",
            "reason"), max_rows=40)),
    })


def _formula(s) -> dict:
    comp = s.composition
    return {"formula": comp.formula.replace(" ", ""), "reduced_formula": comp.reduced_formula, "n_atoms": len(s)}


@dg.asset_check(asset=dft_runs, description="Every run folder dft_runs planned is finished (ok or failed), "
                "and every failed or skipped row says why.")
def dft_runs_finished(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    r = cgwgan_home.store.read("dft_runs")
    unfinished = r.filter(~pl.col("status").is_in(["ok", "failed", "skipped"]))
    unexplained = r.filter(pl.col("status").is_in(["failed", "skipped"]) & (pl.col("reason").fill_null("") == ""))
    return dg.AssetCheckResult(passed=unfinished.is_empty() and unexplained.is_empty(), metadata={
        "rows": r.height, "n_unfinished": unfinished.height, "n_unexplained": unexplained.height,
        "unfinished": ", ".join(unfinished["run_name"].to_list()[:20])})


# --------------------------------------------------------------------------- dft_results
class DftResultsConfig(dg.Config):
    results_dir: str = ""  # default: the dft resource's results_dir (CGWGAN_DFT_RESULTS), else <home>/dft/results
    run_names: list[str] = []  # empty: every ready (or refused) folder of the results root
    signatures: list[str] = []  # the sensor's folder signatures, parallel to run_names (recorded)
    settle_seconds: float = 0.0  # with empty run_names: skip folders changed more recently than this
    references_path: str = ""  # ComputedEntry dicts; default: the dft resource's elemental_refs (CGWGAN_ELEMENTAL_REFS)
    q_mesh: list[int] = [8, 8, 8]
    imaginary_tol_thz: float = 0.1


# dft_runs is a dependency for the order of dft_verify_job (GPAW folders first, then their ingest);
# the sensor materialises dft_results alone, on whatever folders VASP or GPAW finished
@dg.asset(group_name=GROUP, deps=["dft_inputs", "dft_runs"], kinds={"parquet", "vasp"})
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
    max_e_above_hull_ev_per_atom: float = 0.0  # a discovery is on (or below) the DFT hull, up to this
    min_frequency_thz: float = DEFAULT_MIN_FREQUENCY_THZ  # dynamically stable above this (imaginary < 0)
    require_phonons: bool = True  # no DFT phonons: verdict no_phonons instead of discovery
    require_compounds: bool = True  # a hull of the elements only is a missing_references verdict
    vasp_run_type: Literal["GGA", "GGA+U"] = "GGA"  # VASP rows: run type of the MP2020 correction
    references_path: str = ""  # VASP rows: MP elemental entries; default the dft resource's elemental_refs


@dg.asset(group_name=GROUP, deps=[dft_results, "mp_structures"], kinds={"parquet"})
def discoveries(context: dg.AssetExecutionContext, config: DiscoveriesConfig,
                cgwgan_home: CgwganHome, dft: DftResource) -> dg.MaterializeResult:
    """Every linked DFT result with its verdict: energy above the hull of competing phases computed
    on the same footing (a GPAW result: that backend's own runs of the system's MP phases, same
    preset; a VASP result: MP's phases, MP2020), phonons and novelty (lib.verdicts). ``discovery``
    rows pass; known phases are ``rediscovery`` rows, listed apart; missing competing phases are a
    ``missing_references`` verdict that says which. Formation energy stays a column."""
    store = cgwgan_home.store
    results = read_all(store, "dft_results")
    if results is None:
        results = rows_to_frame([])
    mp = store.read("mp_structures") if store.exists("mp_structures") else None
    ref_path = dft.references_path(config.references_path)
    refs = load_elemental_references(ref_path) if ref_path else None
    verdicts = dft_verdicts(results, mp_structures=mp, mp_references=refs,
                            max_e_above_hull_ev_per_atom=config.max_e_above_hull_ev_per_atom,
                            min_frequency_thz=config.min_frequency_thz, require_phonons=config.require_phonons,
                            require_compounds=config.require_compounds, vasp_run_type=config.vasp_run_type)
    lineage_mp = mp.select("snapshot_id", "source") if mp is not None else None
    out = attach_lineage(verdicts, candidates=read_all(store, "candidates"), templates=read_all(store, "templates"),
                         checkpoints=read_all(store, "wgan_checkpoints"), mp_structures=lineage_mp,
                         shortlist=read_all(store, "shortlist", with_chemical_system=True))
    out = conform("discoveries", out).sort(["verdict", "e_above_hull_dft_ev_per_atom", "result_id"], nulls_last=True)
    thresholds = {"max_e_above_hull_ev_per_atom": config.max_e_above_hull_ev_per_atom,
                  "min_frequency_thz": config.min_frequency_thz, "require_phonons": config.require_phonons,
                  "require_compounds": config.require_compounds}
    store.write("discoveries", out, metadata={"thresholds": thresholds})
    cgwgan_home.refresh_catalog()
    counts = verdict_counts(out) if out.height else {}
    cols = ["candidate_id", "reduced_formula", "dft_code", "e_above_hull_dft_ev_per_atom",
            "formation_energy_dft_ev_per_atom", "min_frequency_thz", "known_material_id", "verdict_reason"]
    for v, n in counts.items():
        if n:
            context.log.info(f"discoveries: {n} {v}")
    return dg.MaterializeResult(metadata={
        "rows": out.height,
        "n_results_considered": latest_results(results).height if results.height else 0,
        **{f"n_{v}": n for v, n in counts.items()},
        "thresholds": json.dumps(thresholds),
        "n_with_full_lineage": int(out["mp_source"].is_not_null().sum()),
        "discoveries": dg.MetadataValue.md(_md_table(out.filter(pl.col("verdict") == "discovery").select(
            *cols[:6], "checkpoint_id", "ranked_by_surrogates"))),
        "rediscoveries": dg.MetadataValue.md(_md_table(out.filter(pl.col("verdict") == "rediscovery").select(cols))),
        "rejected": dg.MetadataValue.md(_md_table(out.filter(
            ~pl.col("verdict").is_in(["discovery", "rediscovery"])).select("candidate_id", "verdict", "verdict_reason"),
            max_rows=40)),
        **_discovery_plots(store, out),
    })


def _discovery_plots(store, out: pl.DataFrame, *, max_systems: int = 3) -> dict[str, dg.MetadataValue]:
    """The shortlist's key plots (``assets.screening.key_plots``) for the DFT-verified candidates of
    each chemical system (at most ``max_systems``): the hull the screening ranked them on (the
    ``reference_energies`` of the first surrogate that ranked them), with the candidates coloured by
    their DFT energy above the DFT hull, and DFT energy above the hull against the DFT phonon minimum."""
    from assets.screening import key_plots

    rows = out.filter(pl.col("candidate_id").is_not_null() & pl.col("chemical_system").is_not_null()
                      & pl.col("e_above_hull_dft_ev_per_atom").is_not_null())
    if rows.is_empty():
        return {k: dg.MetadataValue.md("(no DFT-verified candidate with an energy above the hull yet)")
                for k in ("hull_diagram", "e_above_hull_vs_phonon_min")}
    hull, energies = [], []
    for cs in sorted(rows["chemical_system"].unique().to_list())[:max_systems]:
        sub = rows.filter(pl.col("chemical_system") == cs).sort("e_above_hull_dft_ev_per_atom")
        plot_rows = sub.select("candidate_id", pl.coalesce("reduced_formula", "formula").alias("formula"),
                               pl.col("e_above_hull_dft_ev_per_atom").alias("e_above_hull_ev_per_atom"),
                               pl.col("formation_energy_dft_ev_per_atom").alias("formation_energy_per_atom_ev"),
                               "min_frequency_thz", "is_dynamically_stable")
        ranked = [s for s in sub["ranked_by_surrogates"].explode().drop_nulls().unique(maintain_order=True)]
        part = next((f"{cs}|{s}" for s in ranked if store.exists("reference_energies", f"{cs}|{s}")), None)
        refs = store.read("reference_energies", partition=part) if part else None
        plots = key_plots(refs, plot_rows, cs.split("-"), note=(
            f"{cs}: {sub.height} DFT-verified candidates, DFT energies ({', '.join(sorted(set(sub['energy_footing'].drop_nulls())))}"
            f" footing); the phases on the hull are the screening's ({part.split('|', 1)[1] if part else 'none'})."))
        hull.append(str(plots["hull_diagram"].value))
        energies.append(str(plots["e_above_hull_vs_phonon_min"].value))
    return {"hull_diagram": dg.MetadataValue.md("\n\n".join(hull)),
            "e_above_hull_vs_phonon_min": dg.MetadataValue.md("\n\n".join(energies))}


@dg.asset_check(asset=discoveries, description="Every row has a verdict with its reason; every discovery is "
                "linked, on or below the DFT hull of its footing and meets the phonon threshold it was selected with.")
def discoveries_meet_thresholds(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    store = cgwgan_home.store
    d = store.read("discoveries")
    th = (store.pointer("discoveries") or {}).get("metadata", {}).get("thresholds", {})
    emax = float(th.get("max_e_above_hull_ev_per_atom", 0.0))
    fmin = float(th.get("min_frequency_thz", DEFAULT_MIN_FREQUENCY_THZ))
    found = d.filter(pl.col("verdict") == "discovery")
    bad = found.filter(pl.col("candidate_id").is_null() | pl.col("e_above_hull_dft_ev_per_atom").is_null()
                       | (pl.col("e_above_hull_dft_ev_per_atom") > emax + 1e-6)
                       | (pl.col("min_frequency_thz") <= fmin) | (pl.col("is_novel") == False))  # noqa: E712
    unexplained = d.filter(pl.col("verdict_reason").fill_null("") == "")
    return dg.AssetCheckResult(passed=bad.is_empty() and unexplained.is_empty(), metadata={
        "rows": d.height, "n_discoveries": found.height, "n_violations": bad.height,
        "n_unexplained": unexplained.height, "max_e_above_hull_ev_per_atom": emax, "min_frequency_thz": fmin})


# --------------------------------------------------------------------------- surrogate_accuracy
class SurrogateAccuracyConfig(dg.Config):
    hull_threshold_ev_per_atom: float = 0.0  # "on the hull" for the sign agreement (both energies)


@dg.asset(group_name=GROUP, deps=[discoveries, "shortlist"], kinds={"parquet"})
def surrogate_accuracy(context: dg.AssetExecutionContext, config: SurrogateAccuracyConfig,
                       cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    """For every candidate with a DFT verdict, each surrogate's energy above the hull against DFT's:
    MAE, sign agreement at the hull and Spearman rank correlation, per system and overall, with a
    parity plot."""
    store = cgwgan_home.store
    if not store.exists("discoveries"):
        raise dg.Failure("no discoveries table: materialise dft_results and discoveries first")
    sl = read_all(store, "shortlist", with_chemical_system=True)
    if sl is None:
        raise dg.Failure(f"no shortlist table under {store.home}")
    metrics, pairs = accuracy_table(store.read("discoveries"), sl,
                                    hull_threshold_ev_per_atom=config.hull_threshold_ev_per_atom)
    store.write("surrogate_accuracy", metrics, metadata={"hull_threshold_ev_per_atom": config.hull_threshold_ev_per_atom})
    cgwgan_home.refresh_catalog()
    overall = metrics.filter(pl.col("chemical_system") == "all")
    for r in overall.iter_rows(named=True):
        context.log.info(f"surrogate_accuracy: {r['surrogate_name']}: n={r['n_candidates']} MAE "
                         f"{r['mae_ev_per_atom']:.3f} eV/atom, sign agreement {r['sign_agreement']:.2f}, "
                         f"Spearman {r['spearman_rho']}")
    meta: dict = {
        "rows": metrics.height,
        "n_pairs": pairs.height,
        "hull_threshold_ev_per_atom": config.hull_threshold_ev_per_atom,
        "overall": dg.MetadataValue.md(_md_table(overall.select(
            "surrogate_name", "energy_footing", "n_candidates", "mae_ev_per_atom", "mean_error_ev_per_atom",
            "sign_agreement", "spearman_rho"))),
        "per_system": dg.MetadataValue.md(_md_table(metrics.filter(pl.col("chemical_system") != "all").select(
            "chemical_system", "surrogate_name", "n_candidates", "mae_ev_per_atom", "sign_agreement",
            "spearman_rho"))),
    }
    if pairs.height:
        meta["parity_plot"] = dg.MetadataValue.md(figure_markdown(parity_figure(pairs), alt="surrogate vs DFT"))
    return dg.MaterializeResult(metadata=meta)


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


contract_checks = build_contract_checks(["dft_inputs", "dft_runs", "dft_results", "discoveries", "surrogate_accuracy",
                                         "surrogate_churn"])
