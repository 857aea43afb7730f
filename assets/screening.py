"""Surrogate screening: surrogate_models, prescreen, relaxed, references, phonons, shortlist.

Order: ``prescreen`` (static energies) and ``references`` (the system's competing phases relaxed
with the surrogate: its hull) come first; ``relaxed`` selects its K candidates by their static
energy above that hull (``lib.selection``: composition-aware, a per-composition quota optional),
relaxes them and stores each relaxed cell's formation energy and energy above the same hull;
``phonons`` screens the best N of those; ``shortlist`` ranks them, marks relaxed duplicates, the
known phase each relaxed cell matches (``lib.novelty``) and oxidation-state charge balance
(``lib.oxidation``).

Partitioned by chemical system x surrogate (store partition ``"<chemsys>|<surrogate>"``). The
compute runs in ``lib.screening`` / ``lib.phonons``; batches go to Ray actors that load the
surrogate once (``ray_runtime``: local Ray, or a cluster through ``RAY_ADDRESS``) and land in
``<home>/work/<stage>/<partition>/<batch_id>.parquet`` as they finish, so a rerun resumes.

Tables (each an asset, checked against its contract in ``lib/contracts.py``): ``surrogate_models``,
``prescreen``, ``relaxed``, ``reference_energies`` (with ``references``, the hull, one multi-asset),
``phonons``, ``shortlist``.
"""


import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
import polars as pl

from assets._checks import build_contract_checks
from assets.partitions import screening_partitions
from lib import screening as scr
from lib.cells import ASU_COLUMNS, CELL_COLUMNS, MATCHER_TOLERANCES
from lib.consensus import ConsensusRankBy
from lib.phonons import (
    DEFAULT_ACTOR_MEMORY_GB,
    DEFAULT_MAX_SUPERCELL_ATOMS,
    DEFAULT_PHONON_SYMPREC,
    DEFAULT_THRESHOLD_THZ,
    band_structure_figure,
)
from lib.plots import figure_markdown
from lib.selection import RankBy
from lib.store import partition_dirname
from orchestration.resources import CgwganHome, RayResource, SurrogateRegistryResource

GROUP = "screening"
#: ASE optimisers of the relaxations (lib.screening.relax_frame): ``lib.surrogates.relax.OPTIMIZERS``,
#: spelled out here so that loading the definitions imports no model code (a test keeps them equal).
Optimizer = Literal["FIRE", "FIRE2", "BFGS", "LBFGS"]
_DEDUP = dg.AssetDep("candidates_dedup", partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
    partition_dimension_name="chemical_system"))


# ------------------------------------------------------------------------------------ configs
class RayStageConfig(dg.Config):
    use_ray: bool = True  # False: compute in the run's own process (no actors)
    num_actors: int = 0  # 0 = one per CPU of the Ray cluster (at most one per batch)
    cpus_per_actor: float = 1.0  # torch threads per actor = max(1, int(cpus_per_actor))
    # GPU share per actor (Ray's fractional num_gpus; 0 = none). With the surrogate registry's device
    # "cuda", 0.125 puts eight actors on one GPU (measured 4.2x one process on an H200: docs/scale.md).
    gpus_per_actor: float = 0.0


class PrescreenConfig(RayStageConfig):
    batch_rows: int = 256  # candidates per resumable batch (one Ray task)
    batch_size: int = 32  # at most this many structures per forward pass
    # and at most this many atoms (0 = no atom budget); -1 = by device: 256 on CPU (+22 % over 32 structures
    # at 1 torch thread, +6 % at 2: benchmarks/results/bench_prescreen.md), none on a GPU
    batch_atoms: int = -1
    max_candidates: int = 0  # 0 = all; else a seeded random sample of N stratified by reduced formula (reduced runs)
    sample_seed: int = 0  # seed of that sample (lib.selection.stratified_sample)
    # linear scale factors of a static-energy volume scan (e.g. [0.9, 1.0, 1.1]: 4 evaluations per candidate,
    # the parabola's vertex included); the row keeps the lowest and relaxed starts from it. [] = off (one
    # evaluation at the template's volume, the paper's). benchmarks/results/rediscovery*.md
    volume_scan: list[float] = []


class RelaxConfig(RayStageConfig):
    top_k: int = 100  # best K by rank_by
    # static (pre-screen) energy above the hull of the references relaxed with the same surrogate (default),
    # static formation energy, or the raw energy per atom (the old order: mostly measures composition)
    rank_by: RankBy = "e_above_hull"
    per_composition_quota: int = 0  # > 0: at most this many candidates of one reduced formula
    # > 0: only candidates with at most this many atoms in the cell are selected (a DFT-verification budget:
    # GPAW `fast` takes minutes on <= 6 atoms, an hour on 8-12 on 2 cores; docs/dft.md); 0 = any size
    max_atoms: int = 0
    fmax: float = scr.DEFAULT_FMAX_EV_PER_A  # eV/Å (paper: 0.05)
    steps: int = scr.DEFAULT_RELAX_STEPS  # optimiser steps (paper: 300; 1,000 meets the convergence goal: docs/surrogates.md)
    relax_cell: bool = True
    optimizer: Optimizer = scr.DEFAULT_OPTIMIZER  # type: ignore[assignment]
    primitive: bool = False  # relax each candidate's primitive cell (faster; misses cell-doubling distortions)
    symprec: float = scr.DEFAULT_SYMPREC  # Å, spglib tolerance of the reported spacegroup_number_relaxed
    # keep each candidate's space group while relaxing (ASE FixSymmetry at fix_symmetry_symprec Å; the candidate is
    # exactly symmetric in its template's group). false: the batch's float32 noise decides whether and how a
    # candidate leaves its group, so its ending depends on its batch-mates (benchmarks/results/relax_batch_sensitivity.md)
    fix_symmetry: bool = scr.DEFAULT_FIX_SYMMETRY
    fix_symmetry_symprec: float = scr.DEFAULT_FIX_SYMPREC
    batch_rows: int = 16  # candidates per resumable batch (one Ray task), relaxed together
    batch_size: int = scr.DEFAULT_RELAX_BATCH_SIZE  # structures per forward pass (lockstep relaxation)


class ReferencesConfig(RayStageConfig):
    mp_csv_path: str = ""  # MP-20-layout CSV with the system's structures; "" = the mp_structures table
    max_phase_atoms: int = 0  # 0 = all; skip (and count) MP phases with more atoms per cell
    fmax: float = scr.DEFAULT_FMAX_EV_PER_A
    steps: int = scr.DEFAULT_RELAX_STEPS
    optimizer: Optimizer = scr.DEFAULT_OPTIMIZER  # type: ignore[assignment]  # as the candidates' relaxations
    fix_symmetry: bool = scr.DEFAULT_FIX_SYMMETRY  # as the candidates' relaxations: each phase keeps its space group
    fix_symmetry_symprec: float = scr.DEFAULT_FIX_SYMPREC
    batch_rows: int = 8  # phases per resumable batch, relaxed together
    batch_size: int = scr.DEFAULT_RELAX_BATCH_SIZE  # structures per forward pass (lockstep relaxation)


class PhononsConfig(RayStageConfig):
    top_n: int = 20  # best N (paper: 5,000, by formation energy)
    rank_by: Literal["e_above_hull", "formation_energy"] = "e_above_hull"  # the shortlist's order; formation_energy: the paper's
    threshold_thz: float = DEFAULT_THRESHOLD_THZ
    symprec: float = DEFAULT_PHONON_SYMPREC  # Å, symmetrisation to the primitive cell before the displacements; 0 = none
    supercell: list[int] = [2, 2, 2]
    min_length_a: float = 0.0  # > 0: smallest diagonal supercell with every length >= this
    # larger supercells are skipped (status "skipped", counted, reason in error); 0 = no cap. Uncapped, one
    # actor reached 15 GB RSS on 2x2x2 supercells of 80- and 48-atom cells (issue 17; lib/phonons.py)
    max_supercell_atoms: int = DEFAULT_MAX_SUPERCELL_ATOMS
    # GB, peak RSS budget of one actor: force batches shrink to fit it (measured per surrogate kind, lib.phonons)
    # and actors = min(configured, available memory / this); 0 = off (batch_size as set, actors by CPU only)
    actor_memory_gb: float = DEFAULT_ACTOR_MEMORY_GB
    displacement_a: float = 0.01
    mesh: list[int] = [8, 8, 8]
    band_npoints: int = 31
    batch_size: int = 16
    batch_rows: int = 2


class ShortlistConfig(dg.Config):
    n_plots: int = 3  # band-structure plots of the top entries with phonons
    duplicate_energy_window_ev: float = 0.005  # eV/atom: relaxed duplicates are looked for within this
    # known phases (lib.novelty): the MP source as stored (an MP-20-layout CSV, as ReferencesConfig.mp_csv_path;
    # "" = the mp_structures table), the references as relaxed by the surrogate, and every ingested DFT result
    mp_csv_path: str = ""
    ltol: float = MATCHER_TOLERANCES["ltol"]  # StructureMatcher tolerances (pymatgen's defaults)
    stol: float = MATCHER_TOLERANCES["stol"]
    angle_tol: float = MATCHER_TOLERANCES["angle_tol"]
    only_charge_balanced: bool = False  # True: drop rows no ICSD oxidation-state assignment balances (ranks renumbered)


# ------------------------------------------------------------------------------------ helpers
def _keys(context: dg.AssetExecutionContext) -> tuple[str, str, str]:
    dims = context.partition_key.keys_by_dimension
    chemsys, surrogate = dims["chemical_system"], dims["surrogate"]
    return chemsys, surrogate, scr.store_partition(chemsys, surrogate)


def _load_kwargs(reg: SurrogateRegistryResource) -> dict[str, Any]:
    return {"registry_path": reg.resolved_registry_path or None,
            "models_dir": reg.resolved_models_dir or None, "device": reg.device,
            "threads": reg.torch_threads or None, "worker_python": reg.resolved_m3gnet_tf_python,
            "compile_energy": reg.compile_energy}


def _local_surrogate(name: str, registry_path: str | None, models_dir: str | None, device: str,
                     threads: int | None = None, worker_python: str | None = None, compile_energy: bool = False):
    """The surrogate loaded in this process, cached by its weights' sha256 (changed weights reload)."""
    return scr.load_configured_surrogate(name, registry_path=registry_path, models_dir=models_dir, device=device,
                                         threads=threads, cache=True, worker_python=worker_python,
                                         compile_energy=compile_energy)


def _available_memory_gb(ray: Any, local: bool) -> float:
    """Memory the actors may use (GB): this machine's available memory for a local Ray, else the
    cluster's unreserved ``memory`` resource."""
    if local:
        import psutil

        return psutil.virtual_memory().available / 1e9
    return float(ray.available_resources().get("memory", 0.0)) / 1e9


def _peak_rss_gb(pids: list[int]) -> float | None:
    """Largest peak RSS (VmHWM, GB) of these local processes; None when none can be read."""
    peaks = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                peaks += [int(line.split()[1]) * 1024 / 1e9 for line in fh if line.startswith("VmHWM")]
        except OSError:
            continue
    return round(max(peaks), 3) if peaks else None


@contextmanager
def _compute(config: RayStageConfig, method: str, surrogate: str, reg: SurrogateRegistryResource,
             ray_runtime: RayResource, n_batches: int, **kwargs: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A ``compute`` for ``run_batches`` (Ray actors or in-process) and what ran it; ``kwargs`` go
    to the compute method, but for ``memory_per_actor_gb`` (GB, > 0: at most as many actors as the
    available memory holds at that size each; ``how`` then also gets the available memory, the
    actors the CPUs alone allowed and, after the body ran, the actors' largest peak RSS (local Ray))."""
    memory_per_actor_gb = float(kwargs.pop("memory_per_actor_gb", 0.0))
    lk = _load_kwargs(reg)
    if not config.use_ray or n_batches == 0:
        sur = _local_surrogate(surrogate, **lk)
        yield scr.local_compute(sur, method, **kwargs), {"backend": "local", "actors": 0}
        return
    import ray

    ray_runtime.init()
    cpus = float(ray.cluster_resources().get("CPU", 1))
    n = scr.default_num_actors(n_batches, requested=config.num_actors, cpus=cpus,
                               cpus_per_actor=config.cpus_per_actor)
    local = not ray_runtime.resolved_address
    memory: dict[str, Any] = {}
    if memory_per_actor_gb > 0:
        from lib.phonons import memory_aware_num_actors

        avail = _available_memory_gb(ray, local)
        memory = {"actors_by_cpu": n, "available_memory_gb": round(avail, 2),
                  "memory_per_actor_gb": round(memory_per_actor_gb, 2)}
        n = memory_aware_num_actors(n, available_gb=avail, per_actor_gb=memory_per_actor_gb)
    pool = scr.SurrogatePool(surrogate, num_actors=n, load_kwargs=lk, num_cpus_per_actor=config.cpus_per_actor,
                             num_gpus_per_actor=config.gpus_per_actor)
    how: dict[str, Any] = {"backend": "ray", "actors": n, **memory}
    try:
        nodes = {i["node_id"] for i in pool.info()}  # also waits until every actor has loaded the model
        how |= {"ray_nodes": len(nodes), "ray_address": ray_runtime.resolved_address or "local"}
        yield pool.compute(method, **kwargs), how
        if memory and local:
            how["actor_peak_rss_gb"] = _peak_rss_gb(pool.pids())
    finally:
        pool.shutdown()


def relax_settings(config: RelaxConfig, surrogate_sha256: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``lib.screening.relax_frame`` keyword arguments, batch-id salt) of the ``relaxed`` asset.

    The salt hashes every setting that changes a batch's rows (``fix_symmetry`` and its symprec;
    ``symprec``: the rows' ``spacegroup_number_relaxed``), not ``batch_size``, so cached batches
    of one setting are never taken for another's."""
    kw = {"fmax": config.fmax, "steps": config.steps, "relax_cell": config.relax_cell, "symprec": config.symprec,
          "batch_size": config.batch_size, "optimizer": config.optimizer, "primitive": config.primitive,
          "fix_symmetry": config.fix_symmetry, "fix_symmetry_symprec": config.fix_symmetry_symprec}
    salt = {"surrogate_sha256": surrogate_sha256, "stage": "relaxed", "code_version": scr.CODE_VERSION,
            **{k: v for k, v in kw.items() if k != "batch_size"}}
    return kw, salt


def _work_dir(home: CgwganHome, stage: str, partition: str) -> Path:
    return home.subdir("work") / stage / partition_dirname(partition)


def _progress(context: dg.AssetExecutionContext, stage: str, batches):
    """A callback that reports each finished batch in the run log (long stages show progress),
    and advances the stage's progress bar (structures; a no-op unless ``cgwgan main`` turned bars on)."""
    from orchestration.progress import new_bar

    total = batches["batch_id"].n_unique()
    sizes = dict(batches.group_by("batch_id").len().iter_rows())
    done = [0]
    t0 = time.perf_counter()
    bar = new_bar(batches.height, stage, unit="structure")  # closed when full, else when dropped

    def report(batch_id: str) -> None:
        done[0] += 1
        bar.update(sizes.get(batch_id, 0))
        if done[0] == total:
            bar.close()
        context.log.info(f"{stage}: batch {done[0]}/{total} written ({batch_id}, "
                         f"{time.perf_counter() - t0:.0f} s)")

    return report


def _surrogate_identity(surrogate: str, reg: SurrogateRegistryResource) -> tuple[str, str]:
    from lib.surrogates import load_registry

    spec = load_registry(reg.resolved_registry_path or None, models_dir=reg.resolved_models_dir or None).get(surrogate)
    if spec is None or not spec.sha256:
        sur = _local_surrogate(surrogate, **_load_kwargs(reg))
        return sur.name, sur.weights_sha256
    return spec.name, spec.sha256


def key_plots(refs: pl.DataFrame | None, rows: pl.DataFrame, elements: list[str], *, n_hull: int = 10,
              note: str = "") -> dict[str, dg.MetadataValue]:
    """The key plots of a screening result as Markdown images (the discovery report's, reused:
    ``lib.report.hull_figure`` and ``energies_figure``): ``hull_diagram``, the competing phases'
    hull (pymatgen ``PhaseDiagram``) with the first ``n_hull`` rows marked #1, #2, ...; and
    ``e_above_hull_vs_phonon_min``, energy above the hull against formation energy and against
    the lowest phonon frequency. ``rows``: ``candidate_id``, ``formula``,
    ``e_above_hull_ev_per_atom``, ``formation_energy_per_atom_ev``, ``min_frequency_thz``,
    ``is_dynamically_stable``, in rank order. ``refs``: ``reference_energies`` rows (None: no hull).
    A plot that cannot be drawn is a line saying why."""
    from lib.report import energies_figure, hull_figure

    sys_name = "-".join(sorted(elements))
    if refs is None:
        hull_md = f"(no reference_energies for {sys_name}: no hull)"
    else:
        try:
            fig = hull_figure(refs.filter(pl.col("kind") == "reference"), rows.head(n_hull), elements)
            hull_md = (figure_markdown(fig, alt=f"{sys_name} hull") if fig is not None
                       else f"(a hull diagram is drawn for binary and ternary systems, not {sys_name})")
        except (ValueError, KeyError) as exc:  # e.g. an element without a reference phase
            hull_md = f"(hull of {sys_name} not drawn: {exc})"
    energies_md = figure_markdown(energies_figure(rows, rows), alt=f"{sys_name} energy above hull vs phonon minimum")
    return {"hull_diagram": dg.MetadataValue.md(hull_md + (f"\n\n{note}" if note else "")),
            "e_above_hull_vs_phonon_min": dg.MetadataValue.md(energies_md + (f"\n\n{note}" if note else ""))}


def _surrogate_kind(surrogate: str, reg: SurrogateRegistryResource) -> str | None:
    """The registry ``kind`` of a surrogate (``m3gnet``, ``chgnet``, ...); None when not registered."""
    from lib.surrogates import load_registry

    spec = load_registry(reg.resolved_registry_path or None, models_dir=reg.resolved_models_dir or None).get(surrogate)
    return spec.kind if spec is not None else None


def _md_table(df: pl.DataFrame, n: int = 10) -> dg.MetadataValue:
    head = df.head(n)
    if head.is_empty():
        return dg.MetadataValue.md("(empty)")
    cols = head.columns
    fmt = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in head.iter_rows()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in fmt]
    return dg.MetadataValue.md("\n".join(lines))


# ------------------------------------------------------------------------------------ assets
@dg.asset(group_name=GROUP, kinds={"parquet"}, deps=["surrogate_registry"],
          description="The surrogate registry as a table: name, kind, weights location, sha256, version.")
def surrogate_models(context: dg.AssetExecutionContext, cgwgan_home: CgwganHome,
                     surrogate_registry: SurrogateRegistryResource) -> dg.MaterializeResult:
    from lib.surrogates import load_registry, registry_frame

    reg = load_registry(surrogate_registry.resolved_registry_path or None,
                        models_dir=surrogate_registry.resolved_models_dir or None)
    df = registry_frame(reg).rename({"weights": "location"})
    cgwgan_home.store.write("surrogate_models", df)
    cgwgan_home.refresh_catalog()
    available = df.filter(pl.col("location").is_not_null())["surrogate_name"].to_list()
    context.instance.add_dynamic_partitions("surrogate", available)
    return dg.MaterializeResult(metadata={"n_surrogates": df.height, "available": ", ".join(available),
                                          "registry": _md_table(df.drop("description"))})


@dg.asset(group_name=GROUP, kinds={"parquet", "ray"}, partitions_def=screening_partitions, deps=[_DEDUP],
          check_specs=[dg.AssetCheckSpec("covers_every_candidate", asset="prescreen")],
          description="Static surrogate energy of every deduplicated candidate, batched on Ray actors; resumable.")
def prescreen(context: dg.AssetExecutionContext, config: PrescreenConfig, cgwgan_home: CgwganHome,
              ray_runtime: RayResource, surrogate_registry: SurrogateRegistryResource) -> dg.MaterializeResult:
    chemsys, surrogate, part = _keys(context)
    store = cgwgan_home.store
    cands = store.read("candidates_dedup", partition=chemsys)
    n_input, n_input_formulas = cands.height, cands["reduced_formula"].n_unique()
    if config.max_candidates > 0:  # a reduced run: a representative sample, not the first N ids
        from lib.selection import stratified_sample

        cands = stratified_sample(cands, config.max_candidates, seed=config.sample_seed, by="reduced_formula")
    name, sha = _surrogate_identity(surrogate, surrogate_registry)
    try:
        scan = scr.check_volume_scan(config.volume_scan)
        batch_atoms = scr.default_batch_atoms(config.batch_atoms, device=surrogate_registry.device)
    except ValueError as exc:
        raise dg.Failure(f"prescreen {part}: {exc}") from exc
    salt: dict[str, Any] = {"surrogate_sha256": sha, "stage": "prescreen"}
    scan_kw: dict[str, Any] = {}
    if scan:  # (without a scan the batch ids stay those of earlier runs)
        salt["volume_scan"] = scan_kw["volume_scan"] = list(scan)
    batches = scr.plan_batches(cands.select("candidate_id", *ASU_COLUMNS), rows_per_batch=config.batch_rows,
                               salt=salt)
    n_batches = batches["batch_id"].n_unique()
    with _compute(config, "prescreen", surrogate, surrogate_registry, ray_runtime, n_batches,
                  batch_size=config.batch_size, batch_atoms=batch_atoms, **scan_kw) as (compute, how):
        res, stats = scr.run_batches(batches, compute, work_dir=_work_dir(cgwgan_home, "prescreen", part),
                                        on_batch_written=_progress(context, "prescreen", batches))
    if not res.height:  # no candidates: an empty table in the contract's shape, not a missing column
        res = pl.DataFrame(schema={**scr.PRESCREEN_SCHEMA, "batch_id": pl.String})
    carry = [c for c in ("formula", "reduced_formula", "spacegroup_number", "is_known_in_mp") if c in cands.columns]
    out = scr.with_lineage(res.join(cands.select("candidate_id", *carry), on="candidate_id", how="left"), cands,
                           surrogate_name=name, surrogate_sha256=sha)
    # the sample's size and seed: a re-screen (orchestration.schedules.rescreen_run_config) draws the same candidates
    store.write("prescreen", out, partition=part, metadata={
        "surrogate_sha256": sha, "max_candidates": config.max_candidates, "sample_seed": config.sample_seed,
        "volume_scan": list(scan), "n_candidates_input": n_input, "batch_size": config.batch_size,
        "batch_atoms": batch_atoms, **how})
    cgwgan_home.refresh_catalog()
    n_ok = int((out["status"] == "ok").sum())
    missing = cands.height - out.join(cands.select("candidate_id"), on="candidate_id", how="semi").height
    errors = out.filter(pl.col("status") == "error")
    return dg.MaterializeResult(
        metadata={"rows": out.height, "n_ok": n_ok, "n_error": errors.height, "batches": stats.n_batches,
                  "n_candidates_input": n_input, "n_compositions_input": n_input_formulas,
                  "n_compositions_sampled": cands["reduced_formula"].n_unique(),
                  "max_candidates": config.max_candidates, "sample_seed": config.sample_seed,
                  "batch_size": config.batch_size, "batch_atoms": batch_atoms,
                  "volume_scan": dg.MetadataValue.json(list(scan)),
                  **_volume_scale_metadata(out),
                  "batches_skipped_resumed": stats.n_skipped, "batches_run": stats.n_run,
                  "batches_retried": stats.n_retries, "seconds": round(stats.seconds, 2),
                  "structures_per_s": round(stats.n_run and out.height / max(stats.seconds, 1e-9), 2),
                  "backend": how["backend"], "actors": how["actors"], "surrogate": name,
                  "ray_address": how.get("ray_address", ""), "ray_nodes": how.get("ray_nodes", 0),
                  "surrogate_sha256": sha, "errors": _md_table(errors.select("candidate_id", "error"), 5),
                  "lowest_energy": _md_table(scr.select_top(out, 10).select(
                      "candidate_id", "formula", "energy_per_atom_ev"))},
        check_results=[
            dg.AssetCheckResult(check_name="covers_every_candidate", passed=missing == 0 and out.height == cands.height,
                                metadata={"candidates": cands.height, "rows": out.height, "missing": missing,
                                          "errors_quarantined": errors.height}),
        ])


def _volume_scale_metadata(out: pl.DataFrame) -> dict[str, Any]:
    """How far the volume scan moved the cells (all 1.0 without a scan)."""
    f = out["volume_scale"].drop_nulls() if "volume_scale" in out.columns else pl.Series([], dtype=pl.Float64)
    if not f.len():
        return {"n_volume_rescaled": 0}
    q = [round(float(x), 3) for x in np.quantile(f.to_numpy(), [0.05, 0.5, 0.95])]
    return {"n_volume_rescaled": int((f != 1.0).sum()),
            "volume_scale_p5_median_p95": dg.MetadataValue.json(q)}


def _selection_metadata(static: pl.DataFrame, top: pl.DataFrame, config: RelaxConfig) -> dict[str, Any]:
    """The selected set's composition spread and static hull distances, and how the raw
    energy-per-atom order (the pre-issue-13 selection) would have differed."""
    from lib.selection import select_for_relaxation, selection_summary

    hull = top["static_e_above_hull_ev_per_atom"].drop_nulls()
    raw = select_for_relaxation(static, config.top_k, rank_by="energy_per_atom", max_atoms=config.max_atoms or None)
    raw_hull = raw["static_e_above_hull_ev_per_atom"].drop_nulls()
    n_ok = static.filter(pl.col("static_e_above_hull_ev_per_atom").is_not_null())

    def stats(s: pl.Series) -> dict[str, float | None]:
        vals = s.cast(pl.Float64).to_list()
        if not vals:
            return {"min": None, "median": None, "max": None}
        return {"min": round(min(vals), 4), "median": round(float(np.median(vals)), 4), "max": round(max(vals), 4)}

    return {"rank_by": config.rank_by, "per_composition_quota": config.per_composition_quota,
            "max_atoms": config.max_atoms, "n_prescreened_with_hull": n_ok.height,
            "n_prescreened_compositions": int(n_ok["reduced_formula"].n_unique()) if n_ok.height else 0,
            "n_selected": top.height, "n_selected_compositions": int(top["reduced_formula"].n_unique()),
            "selected_static_e_above_hull_ev_per_atom": dg.MetadataValue.json(stats(hull)),
            "n_selected_below_0_1_ev_static": int((hull <= 0.1).sum()),
            "by_energy_per_atom_n_compositions": int(raw["reduced_formula"].n_unique()),
            "by_energy_per_atom_static_e_above_hull_ev_per_atom": dg.MetadataValue.json(stats(raw_hull)),
            "by_energy_per_atom_overlap": raw.join(top, on="candidate_id", how="semi").height,
            "selection_by_composition": _md_table(selection_summary(top), 20)}


@dg.asset(group_name=GROUP, kinds={"parquet", "ray"}, partitions_def=screening_partitions,
          deps=["prescreen", _DEDUP, scr.REFERENCES_TABLE],
          check_specs=[dg.AssetCheckSpec("convergence_rate", asset="relaxed")],
          description="Best K by static energy above the surrogate's own hull (or formation energy: rank_by; "
                      "a per-composition quota optional), relaxed (cell + positions) with the surrogate; with "
                      "each relaxed cell's formation energy and energy above that hull.")
def relaxed(context: dg.AssetExecutionContext, config: RelaxConfig, cgwgan_home: CgwganHome,
            ray_runtime: RayResource, surrogate_registry: SurrogateRegistryResource) -> dg.MaterializeResult:
    from lib.selection import select_for_relaxation, static_hull_distance

    chemsys, surrogate, part = _keys(context)
    store = cgwgan_home.store
    elements = chemsys.split("-")
    pre = store.read("prescreen", partition=part)
    refs = store.read(scr.REFERENCES_TABLE, partition=part).filter(pl.col("kind") == "reference")
    try:
        static = static_hull_distance(pre, refs, elements=elements)
        top = select_for_relaxation(static, config.top_k, rank_by=config.rank_by,
                                    per_composition_quota=config.per_composition_quota or None,
                                    max_atoms=config.max_atoms or None)
    except ValueError as exc:
        raise dg.Failure(f"relaxed {part}: cannot select candidates by stability: {exc}") from exc
    cands = store.scan("candidates_dedup", partition=chemsys).join(
        top.select("candidate_id").lazy(), on="candidate_id", how="semi").collect()
    sha = pre["surrogate_sha256"][0] if pre.height else ""
    kw, salt = relax_settings(config, sha)
    todo = cands.select("candidate_id", *ASU_COLUMNS)
    if "volume_scale" in top.columns and top.filter(pl.col("volume_scale") != 1.0).height:
        # the pre-screen's volume scan: each relaxation starts from the cell it scored (in the batch ids)
        todo = todo.join(top.select("candidate_id", "volume_scale"), on="candidate_id", how="left")
    batches = scr.plan_batches(todo, rows_per_batch=config.batch_rows, salt=salt)
    with _compute(config, "relax", surrogate, surrogate_registry, ray_runtime,
                  batches["batch_id"].n_unique(), **kw) as (compute, how):
        res, stats = scr.run_batches(batches, compute, work_dir=_work_dir(cgwgan_home, "relaxed", part),
                                        on_batch_written=_progress(context, "relaxed", batches))
    res = res.rename({"key": "candidate_id"}) if res.height else pl.DataFrame(
        schema={**scr.RELAX_SCHEMA, "batch_id": pl.String}).rename({"key": "candidate_id"})
    meta_cols = top.select("candidate_id", *[c for c in ("formula", "reduced_formula", "spacegroup_number")
                                             if c in top.columns],
                           pl.col("energy_per_atom_ev").alias("prescreen_energy_per_atom_ev"),
                           *scr.RELAXED_SELECTION_COLUMNS)
    out = res.join(meta_cols, on="candidate_id", how="left").join(
        pre.select(*scr.LINEAGE_COLUMNS), on="candidate_id", how="left")
    out = out.select(*scr.LINEAGE_COLUMNS, *[c for c in out.columns if c not in scr.LINEAGE_COLUMNS])
    out = scr.relaxed_hull_columns(out, refs, elements=elements).sort("selection_rank")
    selection = _selection_metadata(static, top, config)
    store.write("relaxed", out, partition=part, metadata={
        **kw, **how, "rank_by": config.rank_by, "per_composition_quota": config.per_composition_quota,
        "max_atoms": config.max_atoms})
    cgwgan_home.refresh_catalog()
    ok = out.filter(pl.col("status") == "ok")
    rate = float(np.mean(ok["is_converged"].to_numpy())) if ok.height else 0.0
    hull_ok = ok.filter(pl.col("e_above_hull_ev_per_atom").is_not_null())
    return dg.MaterializeResult(
        metadata={**selection,
                  "n_on_or_below_hull": int((hull_ok["e_above_hull_ev_per_atom"] <= 1e-6).sum()),
                  "n_hull_error": ok.height - hull_ok.height,
                  "lowest_e_above_hull": _md_table(hull_ok.sort("e_above_hull_ev_per_atom").select(
                      "candidate_id", "formula", "static_e_above_hull_ev_per_atom", "e_above_hull_ev_per_atom",
                      "formation_energy_per_atom_ev", "decomposition")),
                  "rows": out.height, "n_ok": ok.height, "n_converged": int(ok["is_converged"].sum() or 0),
                  "convergence_rate": round(rate, 3), "fmax_ev_per_a": config.fmax, "steps": config.steps,
                  "seconds": round(stats.seconds, 2),
                  "relaxations_per_min": round(60 * stats.n_run * config.batch_rows / max(stats.seconds, 1e-9), 2)
                  if stats.n_run else 0.0,
                  "batches_skipped_resumed": stats.n_skipped, "batches_retried": stats.n_retries,
                  "backend": how["backend"], "actors": how["actors"],
                  "lowest_energy": _md_table(ok.sort("energy_per_atom_ev").select(
                      "candidate_id", "formula", "energy_per_atom_ev", "is_converged", "n_steps",
                      "spacegroup_number", "spacegroup_number_relaxed"))},
        check_results=[
            dg.AssetCheckResult(check_name="convergence_rate", passed=bool(ok.height) and rate >= scr.MIN_CONVERGENCE_RATE,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"convergence_rate": rate, "n_ok": ok.height,
                                          "n_error": out.height - ok.height, "threshold": scr.MIN_CONVERGENCE_RATE}),
        ])


@dg.multi_asset(
    name="references", partitions_def=screening_partitions,
    specs=[dg.AssetSpec("references", group_name=GROUP, kinds={"ray"}, deps=["mp_structures"],
                        description="The convex hull of the system under the surrogate: competing phases relaxed "
                                    "with it, chemical potentials and hull phases; its rows are reference_energies. "
                                    "Computed before the candidates are selected for relaxation (by their distance "
                                    "to this hull)."),
           dg.AssetSpec(scr.REFERENCES_TABLE, group_name=GROUP, kinds={"parquet"}, deps=["mp_structures"],
                        description="Formation energy and energy above the hull of every reference phase (the table "
                                    "of `references`; `references` is a reserved word in SQL).")],
    check_specs=[dg.AssetCheckSpec("hull_is_consistent", asset="references")])
def references(context: dg.AssetExecutionContext, config: ReferencesConfig, cgwgan_home: CgwganHome,
               ray_runtime: RayResource, surrogate_registry: SurrogateRegistryResource) -> Iterator[dg.MaterializeResult]:
    chemsys, surrogate, part = _keys(context)
    store = cgwgan_home.store
    elements = chemsys.split("-")
    mp, _ = _mp_cells(store, config.mp_csv_path, elements)
    if mp is None:
        context.log.warning("no mp_structures table and no mp_csv_path: ASE reference states only")
    n_skipped = 0
    if mp is not None and config.max_phase_atoms > 0:
        keep = mp.filter(pl.col("species").list.len() <= config.max_phase_atoms)
        n_skipped, mp = mp.height - keep.height, keep
    phases = scr.reference_phases(elements, mp)
    name, sha = _surrogate_identity(surrogate, surrogate_registry)
    batches = scr.plan_batches(phases.rename({"phase_id": "candidate_id"}), rows_per_batch=config.batch_rows,
                               salt={"surrogate_sha256": sha, "stage": "references", "fmax": config.fmax,
                                     "steps": config.steps, "optimizer": config.optimizer,
                                     "fix_symmetry": config.fix_symmetry,
                                     "fix_symmetry_symprec": config.fix_symmetry_symprec,
                                     "code_version": scr.CODE_VERSION})
    with _compute(config, "relax", surrogate, surrogate_registry, ray_runtime, batches["batch_id"].n_unique(),
                  fmax=config.fmax, steps=config.steps, batch_size=config.batch_size,
                  optimizer=config.optimizer, fix_symmetry=config.fix_symmetry,
                  fix_symmetry_symprec=config.fix_symmetry_symprec) as (compute, how):
        res, stats = scr.run_batches(batches, compute, work_dir=_work_dir(cgwgan_home, "references", part),
                                        on_batch_written=_progress(context, "references", batches))
    refs = phases.select("phase_id", "formula", "source").join(
        res.rename({"key": "phase_id"}).drop("batch_id"), on="phase_id", how="left")
    no_candidates = pl.DataFrame(schema={"candidate_id": pl.String, "formula": pl.String, "energy_ev": pl.Float64,
                                         "status": pl.String})
    try:
        hull = scr.formation_and_hull(refs, no_candidates, elements=elements)
    except ValueError as exc:
        raise dg.Failure(f"references {part}: {exc} (reference errors: "
                         f"{refs.filter(pl.col('status') != 'ok')['error'].head(5).to_list()})") from exc
    out = refs.join(hull.references, on="phase_id", how="left").with_columns(
        pl.lit("reference").alias("kind"), pl.lit(None, pl.String).alias("candidate_id"),
        pl.lit(None, pl.String).alias("template_id"), pl.lit(None, pl.String).alias("checkpoint_id"),
        pl.lit(name).alias("surrogate_name"), pl.lit(sha).alias("surrogate_sha256"),
        pl.lit(scr.CODE_VERSION).alias("code_version"))
    out = out.select(*scr.LINEAGE_COLUMNS, "kind", "phase_id",
                     *[c for c in out.columns if c not in scr.LINEAGE_COLUMNS and c not in ("kind", "phase_id")])
    store.write(scr.REFERENCES_TABLE, out, partition=part,
                metadata={"chemical_potentials_ev": hull.chemical_potentials_ev, **how})
    cgwgan_home.refresh_catalog()
    refs_ok = out.filter((pl.col("kind") == "reference") & (pl.col("status") == "ok"))
    worst_ref = float(np.min(refs_ok["e_above_hull_ev_per_atom"].to_numpy())) if refs_ok.height else 0.0
    on_hull = refs_ok.filter(pl.col("e_above_hull_ev_per_atom") < 1e-6)
    yield dg.MaterializeResult(
        asset_key=scr.REFERENCES_TABLE,
        metadata={"rows": out.height, "n_reference_rows": out.height, "n_ok": refs_ok.height})
    yield dg.MaterializeResult(
        asset_key="references",
        metadata={"n_reference_phases": refs.height, "n_reference_ok": refs_ok.height,
                  "n_mp_phases_skipped_size": n_skipped,
                  "chemical_potentials_ev": dg.MetadataValue.json(hull.chemical_potentials_ev),
                  "seconds": round(stats.seconds, 2), "backend": how["backend"],
                  "hull_phases": ", ".join(sorted(on_hull["formula"].to_list())),
                  "references": _md_table(refs_ok.sort("formation_energy_per_atom_ev").select(
                      "phase_id", "formula", "source", "formation_energy_per_atom_ev", "e_above_hull_ev_per_atom",
                      "is_converged"), 30)},
        check_results=[dg.AssetCheckResult(
            check_name="hull_is_consistent",
            passed=refs_ok.height > 0 and worst_ref > -1e-6 and all(
                el in hull.chemical_potentials_ev for el in elements),
            metadata={"min_reference_e_above_hull": worst_ref, "elements_with_reference":
                      ", ".join(sorted(hull.chemical_potentials_ev)),
                      "reference_errors": refs.height - refs_ok.height})])


@dg.asset(group_name=GROUP, kinds={"parquet", "ray"}, partitions_def=screening_partitions,
          deps=["relaxed"],
          description="Phonopy finite-displacement screen (surrogate forces) of the best N by energy above the "
                      "hull, the shortlist's order (or by formation energy, the paper's: rank_by).")
def phonons(context: dg.AssetExecutionContext, config: PhononsConfig, cgwgan_home: CgwganHome,
            ray_runtime: RayResource, surrogate_registry: SurrogateRegistryResource) -> dg.MaterializeResult:
    from lib.phonons import max_batch_atoms, phonon_rss_estimate_gb

    _, surrogate, part = _keys(context)
    store = cgwgan_home.store
    relaxed_all = store.read("relaxed", partition=part)
    stab = scr.relaxed_stability(relaxed_all).filter(pl.col("status") == "ok")
    order = {"formation_energy": ["formation_energy_per_atom_ev", "candidate_id"],
             "e_above_hull": ["e_above_hull_ev_per_atom", "formation_energy_per_atom_ev", "candidate_id"]}
    best = stab.sort(order[config.rank_by]).head(config.top_n).select("candidate_id")
    rel = relaxed_all.join(best, on="candidate_id", how="semi")
    sha = rel["surrogate_sha256"][0] if rel.height else ""
    kw = {"supercell": list(config.supercell), "min_length_a": config.min_length_a or None,
          "displacement_a": config.displacement_a, "mesh": list(config.mesh), "band_npoints": config.band_npoints,
          "threshold_thz": config.threshold_thz, "batch_size": config.batch_size,
          "symprec": config.symprec or None}
    if config.max_supercell_atoms > 0:  # only when set: batch ids of uncapped runs stay as they were
        kw["max_supercell_atoms"] = config.max_supercell_atoms
    # memory: force batches sized to the actor budget of this surrogate kind, actors to the memory available
    kind = _surrogate_kind(surrogate, surrogate_registry)
    memory: dict[str, Any] = {"surrogate_kind": kind or "unknown", "actor_memory_gb": config.actor_memory_gb}
    per_actor_gb = 0.0
    if config.actor_memory_gb > 0:
        batch_atoms = max_batch_atoms(config.actor_memory_gb, kind)
        largest = config.max_supercell_atoms or batch_atoms  # uncapped: a batch fills the budget
        per_actor_gb = phonon_rss_estimate_gb(kind, min(batch_atoms, max(1, config.batch_size) * largest))
        memory |= {"max_batch_atoms": batch_atoms, "per_actor_rss_estimate_gb": round(per_actor_gb, 2)}
    salt = {"surrogate_sha256": sha, "stage": "phonons", **kw}  # the batch atoms change no result: not salted
    if config.actor_memory_gb > 0:
        kw["max_batch_atoms"] = memory["max_batch_atoms"]
    batches = scr.plan_batches(rel.select("candidate_id", *CELL_COLUMNS), rows_per_batch=config.batch_rows,
                               salt=salt)
    with _compute(config, "phonons", surrogate, surrogate_registry, ray_runtime, batches["batch_id"].n_unique(),
                  memory_per_actor_gb=per_actor_gb, **kw) as (compute, how):
        res, stats = scr.run_batches(batches, compute, work_dir=_work_dir(cgwgan_home, "phonons", part),
                                        on_batch_written=_progress(context, "phonons", batches))
    if not res.height:
        from lib.phonons import PHONON_SCHEMA

        res = pl.DataFrame(schema={**PHONON_SCHEMA, "batch_id": pl.String})
    out = res.rename({"key": "candidate_id"}).join(
        rel.select(*scr.LINEAGE_COLUMNS, "formula"), on="candidate_id", how="left")
    out = out.select(*scr.LINEAGE_COLUMNS, *[c for c in out.columns if c not in scr.LINEAGE_COLUMNS])
    store.write("phonons", out, partition=part, metadata={**{k: str(v) for k, v in kw.items()}, **how, **memory})
    cgwgan_home.refresh_catalog()
    ok = out.filter(pl.col("status") == "ok")
    skipped = out.filter(pl.col("status") == "skipped")
    if skipped.height:
        context.log.warning(f"phonons {part}: {skipped.height} of {out.height} cells skipped: supercell above "
                            f"max_supercell_atoms {config.max_supercell_atoms}")
    return dg.MaterializeResult(
        metadata={"rows": out.height, "n_ok": ok.height, "n_stable": int(ok["is_dynamically_stable"].sum() or 0),
                  "n_skipped_size": skipped.height, "max_supercell_atoms": config.max_supercell_atoms,
                  "skipped_size": _md_table(skipped.select("candidate_id", "formula", "n_supercell_atoms", "error")),
                  **memory,
                  **{k: how[k] for k in ("actors_by_cpu", "available_memory_gb", "actor_peak_rss_gb") if k in how},
                  "threshold_thz": config.threshold_thz, "rank_by": config.rank_by, "top_n": config.top_n,
                  "seconds": round(stats.seconds, 2),
                  "screens_per_hour": round(3600 * ok.height / max(stats.seconds, 1e-9), 1) if stats.n_run else 0.0,
                  "backend": how["backend"], "actors": how["actors"],
                  "results": _md_table(ok.sort("min_frequency_thz", descending=True).select(
                      "candidate_id", "formula", "min_frequency_thz", "is_dynamically_stable", "phonon_spacegroup_number",
                      "n_primitive_atoms", "n_supercell_atoms", "n_displacements"),
                      20)})


def _mp_cells(store, mp_csv_path: str, elements: list[str]) -> tuple[pl.DataFrame | None, str]:
    """The system's MP cells and where they came from: the CSV at ``mp_csv_path`` when set, else
    the ``mp_structures`` table, else none (``None``, ``"none"``)."""
    if mp_csv_path:
        return scr.mp_csv_cells(mp_csv_path, elements=elements), f"file:{mp_csv_path}"
    if store.exists("mp_structures"):
        return scr.mp_table_cells(store.read("mp_structures"), elements=elements), "table:mp_structures"
    return None, "none"


def _known_phases(context: dg.AssetExecutionContext, store, config: ShortlistConfig, elements: list[str],
                  refs: pl.DataFrame | None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every known structure of the system and its subsystems (lib.novelty.known_structures):
    the MP source as stored, the references as relaxed by the surrogate, every ingested DFT result."""
    from lib.novelty import known_structures

    mp, mp_label = _mp_cells(store, config.mp_csv_path, elements)
    if mp is None:
        context.log.warning("shortlist: no mp_structures table and no mp_csv_path: known phases are the "
                            "surrogate-relaxed references and DFT results only")
    dft = store.read("dft_results") if store.exists("dft_results") else None
    known = known_structures(mp_structures=mp, references=refs, dft_results=dft, elements=elements)
    counts = dict(sorted(known.group_by("source").len().iter_rows())) if known.height else {}
    return known, {"mp_source": mp_label, "n_known_structures": known.height,
                   "known_structures_by_source": dg.MetadataValue.json(counts)}


def _rediscovery_metadata(store, chemsys: str, config: ShortlistConfig, known: pl.DataFrame, rel: pl.DataFrame,
                          out: pl.DataFrame) -> dict[str, Any]:
    """lib.rediscovery on the system's known MP phases (the ``mp`` rows of ``known``): representable
    by the training table's largest ASU or not, matched by candidates_dedup before relaxation, and
    matched by shortlist rows after it, with their best ranks. Empty when no MP phase is known."""
    from lib.rediscovery import (
        max_training_asu_sites,
        rediscovery_markdown,
        rediscovery_summary,
        rediscovery_table,
        system_phases,
    )

    elements = chemsys.split("-")
    mp = known.filter(pl.col("source") == "mp")
    if mp.is_empty():
        return {"rediscovery": "(no known MP phases of the system: no rediscovery counts)"}
    sym = (store.read("mp_symmetry", columns=["material_id", "spacegroup_number", "n_asu_sites"])
           if not config.mp_csv_path and store.exists("mp_symmetry") else None)
    tt = store.read("training_templates", columns=["n_asu_sites"]) if store.exists("training_templates") else None
    dedup = (store.read("candidates_dedup", partition=chemsys, columns=["candidate_id", "is_known_in_mp",
                                                                       "mp_material_id"])
             if store.exists("candidates_dedup", chemsys) else None)
    max_asu = max_training_asu_sites(tt)
    table = rediscovery_table(system_phases(mp, elements=elements, symmetry=sym), elements=elements,
                              max_asu_sites=max_asu, candidates=dedup, relaxed_ids=rel["candidate_id"].to_list(),
                              shortlist=out)
    summary = rediscovery_summary(table)
    return {"rediscovery_max_asu_sites": max_asu,
            **{f"rediscovery_{k}": (dg.MetadataValue.json(v) if isinstance(v, list | dict) else v)
               for k, v in summary.items()},
            "rediscovery": dg.MetadataValue.md(
                f"Known MP phases of {chemsys} and its subsystems: {summary['n_known_phases']}; representable "
                f"(<= {max_asu} ASU sites, the training table's largest): {summary['n_representable']}; can appear "
                f"(also all of {'/'.join(sorted(elements))}, the infill's default): {summary['n_can_appear']}; among "
                f"the candidates before relaxation: {summary['n_before_relaxation']}; among the relaxed rows: "
                f"{summary['n_after_relaxation']}.\n\n" + rediscovery_markdown(table))}


@dg.asset(group_name=GROUP, kinds={"parquet", "duckdb"}, partitions_def=screening_partitions,
          deps=["relaxed", scr.REFERENCES_TABLE, "phonons"],
          check_specs=[dg.AssetCheckSpec("ranked_and_unique", asset="shortlist")],
          description="Candidates ranked by energy above hull, then formation energy, with the phonon verdict, "
                      "relaxed duplicates, the known phase each relaxed cell matches (is_novel) and "
                      "oxidation-state charge balance.")
def shortlist(context: dg.AssetExecutionContext, config: ShortlistConfig, cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    from lib.novelty import match_known_phases, novelty_metadata
    from lib.oxidation import charge_balance

    chemsys, _, part = _keys(context)
    store = cgwgan_home.store
    t0 = time.perf_counter()
    rel = store.read("relaxed", partition=part)
    refs = store.read(scr.REFERENCES_TABLE, partition=part) if store.exists(scr.REFERENCES_TABLE, part) else None
    ph = store.read("phonons", partition=part) if store.exists("phonons", part) else None
    ranked = charge_balance(scr.build_shortlist(rel, scr.relaxed_stability(rel), ph), formula_col="formula")
    n_ranked = ranked.height
    if config.only_charge_balanced:
        ranked = scr.keep_charge_balanced(ranked)
    out = scr.mark_relaxed_duplicates(ranked, rel, energy_window_ev=config.duplicate_energy_window_ev)
    known, known_meta = _known_phases(context, store, config, chemsys.split("-"), refs)
    tol: dict[str, Any] = {"ltol": config.ltol, "stol": config.stol, "angle_tol": config.angle_tol}
    cells = rel.filter(pl.col("status") == "ok").select("candidate_id", *CELL_COLUMNS)
    try:
        out = match_known_phases(out.join(cells, on="candidate_id", how="left", maintain_order="left"), known,
                                 allow_empty_known=False, **tol).drop(*CELL_COLUMNS)
    except ValueError as exc:
        raise dg.Failure(f"shortlist {part}: cannot check novelty: {exc}") from exc
    store.write("shortlist", out, partition=part, metadata={**tol, "mp_source": known_meta["mp_source"]})
    cgwgan_home.refresh_catalog()
    plots = []
    if ph is not None and ph.height:
        top_ph = out.filter(pl.col("has_phonons")).head(config.n_plots).select("rank", "candidate_id", "formula")
        rows = {r["candidate_id"]: r for r in ph.filter(pl.col("status") == "ok").iter_rows(named=True)}
        for r in top_ph.iter_rows(named=True):
            prow = rows[r["candidate_id"]]
            title = (f"#{r['rank']} {r['formula']} {r['candidate_id']}  min {prow['min_frequency_thz']:.2f} THz")
            plots.append(figure_markdown(band_structure_figure(prow, title=title), alt=r["candidate_id"]))
    novelty = novelty_metadata(out, **tol)
    redisc = _rediscovery_metadata(store, chemsys, config, known, rel, out)
    rediscovered = (out.filter(pl.col("is_novel").eq(False)).group_by("known_material_id", "known_source")
                    .agg(pl.len().alias("n_rows"), pl.col("rank").min().alias("best_rank"),
                         pl.col("unique_rank").min().alias("best_unique_rank"), pl.col("formula").first())
                    .sort("best_rank"))
    problems = scr.ranked_and_unique_problems(out)
    unique_novel = out.filter(pl.col("duplicate_of").is_null() & pl.col("is_novel").fill_null(False))
    plots_md = key_plots(refs, out.filter(pl.col("duplicate_of").is_null()), chemsys.split("-"), note=(
        f"Unique structures ranked by energy above the hull under {part.split('|', 1)[1]}; #1, #2, ... as in `top`."))
    return dg.MaterializeResult(
        metadata={"rows": out.height, "n_with_phonons": int(out["has_phonons"].sum() or 0),
                  "n_dynamically_stable": int(out["is_dynamically_stable"].fill_null(False).sum()),
                  "n_below_0_1_ev": int((out["e_above_hull_ev_per_atom"] <= 0.1).sum()),
                  "n_unique_structures": int(out["duplicate_of"].is_null().sum()),
                  "n_relaxed_duplicates": int(out["duplicate_of"].is_not_null().sum()),
                  **{k: (dg.MetadataValue.json(v) if isinstance(v, dict) else v) for k, v in novelty.items()},
                  **known_meta,
                  "n_rediscovered_phases": rediscovered.height,
                  "rediscovered_phases": _md_table(rediscovered, 30),
                  **redisc,
                  "n_charge_balanced": int(out["charge_balanced"].fill_null(False).sum()),
                  "n_rare_oxidation_state": int(out["uses_rare_oxidation_state"].fill_null(False).sum()),
                  "only_charge_balanced": config.only_charge_balanced,
                  "n_dropped_not_charge_balanced": n_ranked - out.height,
                  "seconds": round(time.perf_counter() - t0, 2),
                  "top": _md_table(out.filter(pl.col("duplicate_of").is_null()).select(
                      "rank", "unique_rank", "candidate_id", "formula", "e_above_hull_ev_per_atom",
                      "formation_energy_per_atom_ev", "min_frequency_thz", "is_dynamically_stable",
                      "known_material_id", "charge_balanced", "oxidation_states"), 15),
                  "top_novel": _md_table(unique_novel.select(
                      "rank", "candidate_id", "formula", "spacegroup_number_relaxed", "e_above_hull_ev_per_atom",
                      "is_dynamically_stable", "charge_balanced"), 15),
                  "known_phases": _md_table(out.filter(pl.col("is_novel").eq(False)).select(
                      "rank", "candidate_id", "formula", "known_material_id", "known_source",
                      "e_above_hull_ev_per_atom"), 15),
                  "band_structures": dg.MetadataValue.md("\n\n".join(plots) or "(no phonon results)"),
                  **plots_md},
        check_results=[dg.AssetCheckResult(
            check_name="ranked_and_unique", passed=not problems,
            metadata={"rows": out.height, "problems": dg.MetadataValue.md(
                "\n".join(f"- {p}" for p in problems) or "(none)")})])





# ------------------------------------------------------------------------------------ consensus
class ConsensusConfig(RayStageConfig):
    use_ray: bool = False  # the K rows are few: relax them in the run's own process by default
    top_k: int = 20  # best K unique novel shortlist rows of the primary (the partition's surrogate)
    surrogates: list[str] = []  # registry names; empty = every registered surrogate whose weights are here
    rank_by: ConsensusRankBy = "mean"  # mean e_above_hull | lcb: mean + kappa * std (one surrogate's favourite sinks)
    kappa: float = 1.0  # | primary: the primary's shortlist order
    top_n_overlap: int = 20  # metadata: how many of the primary's top N stay in the consensus top N
    fmax: float = scr.DEFAULT_FMAX_EV_PER_A
    steps: int = scr.DEFAULT_RELAX_STEPS
    optimizer: Optimizer = scr.DEFAULT_OPTIMIZER  # type: ignore[assignment]
    fix_symmetry: bool = scr.DEFAULT_FIX_SYMMETRY  # as `relaxed`: each row keeps the space group it has
    fix_symmetry_symprec: float = scr.DEFAULT_FIX_SYMPREC
    batch_rows: int = 16
    batch_size: int = scr.DEFAULT_RELAX_BATCH_SIZE


def _consensus_surrogates(config: ConsensusConfig, primary: str, reg: SurrogateRegistryResource) -> list[str]:
    from lib.surrogates import load_registry, registry_frame

    if config.surrogates:
        names = list(dict.fromkeys(config.surrogates))
    else:
        frame = registry_frame(load_registry(reg.resolved_registry_path or None,
                                             models_dir=reg.resolved_models_dir or None))
        names = frame.filter(pl.col("location").is_not_null())["surrogate_name"].to_list()
    return [primary, *[n for n in names if n != primary]]


def _evaluate_with(context: dg.AssetExecutionContext, config: ConsensusConfig, cgwgan_home: CgwganHome,
                   ray_runtime: RayResource, reg: SurrogateRegistryResource, *, name: str, chemsys: str,
                   part: str, cells: pl.DataFrame, ref_inputs: pl.DataFrame) -> tuple[pl.DataFrame, str, str]:
    """``cells`` (the primary's relaxed cells) relaxed by surrogate ``name`` and placed on its own
    hull: the system's reference phases relaxed by the same surrogate (its own ``reference_energies``
    partition when one exists with the same weights, else the primary's relaxed reference cells
    relaxed again). Returns (rows, reference origin, weights sha256)."""
    store = cgwgan_home.store
    elements = chemsys.split("-")
    _, sha = _surrogate_identity(name, reg)
    own = scr.store_partition(chemsys, name)
    kw = {"fmax": config.fmax, "steps": config.steps, "batch_size": config.batch_size, "optimizer": config.optimizer,
          "fix_symmetry": config.fix_symmetry, "fix_symmetry_symprec": config.fix_symmetry_symprec}
    salt = {"surrogate_sha256": sha, "stage": "consensus", "code_version": scr.CODE_VERSION,
            **{k: v for k, v in kw.items() if k != "batch_size"}}
    refs = store.read(scr.REFERENCES_TABLE, partition=own) if store.exists(scr.REFERENCES_TABLE, own) else None
    if refs is not None and set(refs["surrogate_sha256"].drop_nulls()) == {sha}:
        origin = f"reference_energies[{own}]"
    else:
        refs = None
        origin = "the primary's relaxed reference cells, relaxed again"
    todo = cells if refs is not None else pl.concat(
        [cells.with_columns(pl.lit(True).alias("is_cell_relaxed")),
         ref_inputs.rename({"phase_id": "candidate_id"}).select("candidate_id", *CELL_COLUMNS, "is_cell_relaxed")],
        how="vertical_relaxed")
    batches = scr.plan_batches(todo, rows_per_batch=config.batch_rows, salt=salt)
    with _compute(config, "relax", name, reg, ray_runtime, batches["batch_id"].n_unique(), **kw) as (compute, _):
        res, _stats = scr.run_batches(batches, compute, work_dir=_work_dir(cgwgan_home, "consensus", part) / name,
                                      on_batch_written=_progress(context, f"consensus {name}", batches))
    res = res.rename({"key": "candidate_id"})
    if refs is None:
        refs = ref_inputs.select("phase_id", "formula", "source").join(
            res.rename({"candidate_id": "phase_id"}), on="phase_id", how="inner")
    rows = res.join(cells.select("candidate_id"), on="candidate_id", how="semi")
    try:
        hull = scr.formation_and_hull(refs, rows, elements=elements)
    except ValueError as exc:  # name the reference phases this surrogate could not relax
        failed = refs.filter(pl.col("status") != "ok").select("phase_id", "error")
        raise ValueError(f"{exc}; reference phases {name} failed on: "
                         f"{[f'{p}: {e}' for p, e in failed.head(5).iter_rows()]}") from exc
    out = rows.select("candidate_id", "status", "error", "is_converged", "n_steps", "energy_per_atom_ev",
                      "spacegroup_number_relaxed").join(
        hull.candidates.select("candidate_id", "formation_energy_per_atom_ev", "e_above_hull_ev_per_atom",
                               pl.col("status").alias("_hs"), pl.col("error").alias("_he")),
        on="candidate_id", how="left")
    out = out.with_columns(
        pl.when(pl.col("status") == "ok").then(pl.col("_hs")).otherwise(pl.col("status")).alias("status"),
        pl.when(pl.col("status") == "ok").then(pl.col("_he")).otherwise(pl.col("error")).alias("error")).drop("_hs", "_he")
    return out, origin, sha


@dg.asset(group_name=GROUP, kinds={"parquet"}, partitions_def=screening_partitions,
          deps=["shortlist", "relaxed", scr.REFERENCES_TABLE],
          check_specs=[dg.AssetCheckSpec("every_surrogate_evaluated", asset="consensus")],
          description="The best K unique novel shortlist rows re-evaluated by every registered surrogate: each "
                      "relaxed from the primary's relaxed cell and placed on that surrogate's own hull; per-surrogate "
                      "energy above the hull, mean, spread and a lower-confidence-bound rank; rank agreement.")
def consensus(context: dg.AssetExecutionContext, config: ConsensusConfig, cgwgan_home: CgwganHome,
              ray_runtime: RayResource, surrogate_registry: SurrogateRegistryResource) -> dg.MaterializeResult:
    from lib.consensus import consensus_table, rank_agreement, reference_inputs, wide_view

    chemsys, primary, part = _keys(context)
    store = cgwgan_home.store
    t0 = time.perf_counter()
    sl = store.read("shortlist", partition=part)
    rel = store.read("relaxed", partition=part)
    pick = sl.filter(pl.col("duplicate_of").is_null() & pl.col("is_novel").fill_null(False)).sort("rank").head(
        config.top_k)
    if pick.is_empty():
        raise dg.Failure(f"consensus {part}: the shortlist has no unique novel row to re-evaluate")
    cells = rel.filter(pl.col("status") == "ok").select("candidate_id", *CELL_COLUMNS).join(
        pick.select("candidate_id"), on="candidate_id", how="semi")
    try:
        ref_inputs = reference_inputs(store.read(scr.REFERENCES_TABLE, partition=part))
    except ValueError as exc:
        raise dg.Failure(f"consensus {part}: {exc}") from exc
    names = _consensus_surrogates(config, primary, surrogate_registry)
    frames, origins, failures = [], {}, {}
    for name in names:
        if name == primary:  # the primary's own relaxation and hull, as the shortlist has them
            rows = pick.select("candidate_id", "formation_energy_per_atom_ev", "e_above_hull_ev_per_atom").join(
                rel.select("candidate_id", "status", "error", "is_converged", "n_steps", "energy_per_atom_ev",
                           "spacegroup_number_relaxed"), on="candidate_id", how="left")
            sha, origins[name] = pick["surrogate_sha256"][0], f"reference_energies[{part}]"
        else:
            try:
                rows, origins[name], sha = _evaluate_with(
                    context, config, cgwgan_home, ray_runtime, surrogate_registry, name=name, chemsys=chemsys,
                    part=part, cells=cells, ref_inputs=ref_inputs)
            except Exception as exc:  # noqa: BLE001 - a surrogate that cannot run is reported on its rows
                failures[name] = f"{type(exc).__name__}: {exc}"
                context.log.warning(f"consensus: surrogate {name} could not evaluate the rows: {failures[name]}")
                rows = pick.select("candidate_id").with_columns(
                    pl.lit("error").alias("status"), pl.lit(f"surrogate {name}: {failures[name]}").alias("error"))
                sha = None
        frames.append(rows.with_columns(pl.lit(name).alias("evaluated_surrogate"),
                                        pl.lit(sha, pl.String).alias("evaluated_surrogate_sha256")))
    long = pl.concat(frames, how="diagonal_relaxed")
    lineage = pick.select(*scr.LINEAGE_COLUMNS, "formula", "reduced_formula", pl.col("rank").alias("primary_rank"),
                          pl.col("e_above_hull_ev_per_atom").alias("primary_e_above_hull_ev_per_atom"))
    table = consensus_table(long.join(lineage, on="candidate_id", how="left"), rank_by=config.rank_by,
                            kappa=config.kappa)
    front = [*scr.LINEAGE_COLUMNS, "evaluated_surrogate", "evaluated_surrogate_sha256", "consensus_rank",
             "primary_rank", "formula", "reduced_formula"]
    table = table.select(*front, *[c for c in table.columns if c not in front])
    store.write("consensus", table, partition=part, metadata={"surrogates": names, "rank_by": config.rank_by,
                                                              "kappa": config.kappa, "references": origins})
    cgwgan_home.refresh_catalog()
    agree = rank_agreement(table, primary=primary, top_n=config.top_n_overlap)
    n_err = int((table["status"] != "ok").sum())
    return dg.MaterializeResult(
        metadata={"rows": table.height, "n_candidates": pick.height, "surrogates": ", ".join(names),
                  "rank_by": config.rank_by, "kappa": config.kappa,
                  "spearman": dg.MetadataValue.json(agree["spearman"]),
                  "mean_spearman_with_primary": agree["mean_spearman_with_primary"],
                  f"top_{config.top_n_overlap}_overlap": agree["top_n_overlap"],
                  "references_by_surrogate": dg.MetadataValue.json(origins),
                  "surrogate_failures": dg.MetadataValue.json(failures), "n_error_rows": n_err,
                  "seconds": round(time.perf_counter() - t0, 2),
                  "table": _md_table(wide_view(table, names), 30)},
        check_results=[dg.AssetCheckResult(
            check_name="every_surrogate_evaluated", passed=n_err == 0, severity=dg.AssetCheckSeverity.WARN,
            metadata={"n_error_rows": n_err, "failed_surrogates": ", ".join(sorted(failures)) or "(none)",
                      "errors": _md_table(table.filter(pl.col("status") != "ok").select(
                          "candidate_id", "evaluated_surrogate", "error"), 10)})])


contract_checks = build_contract_checks(
    ["surrogate_models", "prescreen", "relaxed", scr.REFERENCES_TABLE, "phonons", "shortlist", "consensus"])
