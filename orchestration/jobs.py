"""Jobs: one per stage (as the UI shows them) and ``run_main``, the end-to-end main job.

Stages have different partitions (the MP and generator groups are unpartitioned, infill is per
chemical system, screening per chemical system x surrogate), and a Dagster run holds one
partition set, so the main job is a sequence of stage runs on one Dagster instance: each shows
in the UI's run list with its logs and metadata.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from assets.partitions import (
    DEFAULT_CHEMICAL_SYSTEM,
    chemical_system_partitions,
    screening_partitions,
    surrogate_partitions,
)

mp_job = dg.define_asset_job(
    "mp_job", selection=dg.AssetSelection.groups("mp"),
    description="MP structures -> symmetry/ASU -> GAN training table.",
)
generator_job = dg.define_asset_job(
    "generator_job", selection=dg.AssetSelection.groups("generator"),
    description="Train the Wyckoff WGAN-GP and sample crystal templates.",
)
infill_job = dg.define_asset_job(
    "infill_job", selection=dg.AssetSelection.groups("infill"),
    partitions_def=chemical_system_partitions,
    description="Fill templates with a chemical system's elements; dedup within and against MP.",
)
screening_job = dg.define_asset_job(
    "screening_job", selection=dg.AssetSelection.groups("screening"),
    partitions_def=screening_partitions,
    description="Surrogate pre-screen, relaxation, hull, phonons and shortlist for one system x surrogate.",
)
dft_handoff_job = dg.define_asset_job(
    "dft_handoff_job", selection=dg.AssetSelection.assets("dft_inputs", "xrd_patterns"),
    description="VASP + phonopy input folders for the shortlists, and their simulated XRD patterns.",
)

JOBS = [mp_job, generator_job, infill_job, screening_job, dft_handoff_job]

OFFLINE_SURROGATE = "CHGNet-0.3.0"
M3GNET_SURROGATE = "M3GNet-MP-2021.2.8-PES"


@dataclass
class MainSettings:
    """Sizes of the main job. The defaults finish in about ten minutes on a 2-core laptop."""

    chemical_system: str = DEFAULT_CHEMICAL_SYSTEM
    surrogate: str = ""  # "" = M3GNet when CGWGAN_M3GNET_DIR is set, else CHGNet (offline)
    gan_epochs: int = 500
    n_templates: int = 3000
    # The embedded default trains on ~150 prototypes, so the demo's templates cannot match the
    # training density distribution as a model trained on MP does (the asset's default gate is
    # 0.93); the demo reports the overlap and gates at this lower value.
    min_density_overlap: float = 0.3
    max_asu_sites: int = 4
    prescreen_limit: int = 400
    relax_top_k: int = 8
    phonon_top_n: int = 3
    extra_run_config: dict[str, Any] = field(default_factory=dict)


def _default_surrogate() -> str:
    return M3GNET_SURROGATE if os.environ.get("CGWGAN_M3GNET_DIR") else OFFLINE_SURROGATE


def main_run_config(s: MainSettings) -> dict[str, dict[str, Any]]:
    """Run config of each stage job for the main job's sizes."""
    return {
        "mp_job": {"ops": {"training_templates": {"config": {"max_asu_sites": s.max_asu_sites}}}},
        "generator_job": {
            "ops": {
                "wgan_checkpoint": {"config": {"epochs": s.gan_epochs}},
                "templates": {"config": {"n_samples": s.n_templates,
                                         "min_density_overlap": s.min_density_overlap}},
            }
        },
        "infill_job": {},
        "screening_job": {
            "ops": {
                "prescreen": {"config": {"max_candidates": s.prescreen_limit}},
                "relaxed": {"config": {"top_k": s.relax_top_k}},
                "phonons": {"config": {"top_n": s.phonon_top_n}},
            }
        },
        "dft_handoff_job": {},
    }


def run_main(*, home: str | None = None, settings: MainSettings | None = None,
             instance: dg.DagsterInstance | None = None, log=print) -> dict[str, Any]:
    """Run the whole pipeline end to end, stage by stage, and say where the results are."""
    from orchestration.definitions import defs
    from orchestration.resources import DEFAULT_HOME, CgwganHome

    s = settings or MainSettings()
    if home:
        os.environ["CGWGAN_HOME"] = str(Path(home).resolve())
    home_path = CgwganHome().path
    surrogate = s.surrogate or _default_surrogate()
    if instance is None:
        if not os.environ.get("DAGSTER_HOME"):
            dagster_home = home_path / "dagster_home"
            dagster_home.mkdir(parents=True, exist_ok=True)
            os.environ["DAGSTER_HOME"] = str(dagster_home)
        instance = dg.DagsterInstance.get()

    instance.add_dynamic_partitions(chemical_system_partitions.name, [s.chemical_system])
    instance.add_dynamic_partitions(surrogate_partitions.name, [surrogate])
    screening_key = dg.MultiPartitionKey({"chemical_system": s.chemical_system, "surrogate": surrogate})

    configs = main_run_config(s)
    for job_name, cfg in s.extra_run_config.items():
        configs.setdefault(job_name, {}).update(cfg)
    steps = [
        ("mp_job", None),
        ("generator_job", None),
        ("infill_job", s.chemical_system),
        ("screening_job", screening_key),
        ("dft_handoff_job", None),
    ]
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for job_name, partition_key in steps:
        log(f"[cgwgan] {job_name}" + (f" [{partition_key}]" if partition_key else "") + " ...")
        t0 = time.perf_counter()
        job = defs.get_job_def(job_name)
        result = job.execute_in_process(
            instance=instance, partition_key=partition_key, run_config=configs.get(job_name, {}),
            raise_on_error=True,
        )
        timings[job_name] = round(time.perf_counter() - t0, 1)
        log(f"[cgwgan] {job_name} finished in {timings[job_name]} s (run {result.run_id[:8]})")
    timings["total"] = round(time.perf_counter() - t_all, 1)

    log("")
    log(f"Results are in {home_path}")
    log(f"  Parquet tables : {home_path / 'tables'}")
    log(f"  DuckDB catalog : {home_path / 'catalog.duckdb'}")
    log(f"  DFT inputs     : {home_path / 'dft' / 'inputs'}")
    log(f"  Dagster runs   : DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev -w workspace.yaml")
    log("Three SQL queries to try:")
    for q in EXAMPLE_QUERIES:
        log(f'  cgwgan sql "{q}"')
    if home_path == DEFAULT_HOME:
        log("(CGWGAN_HOME is the git-ignored .cgwgan/ folder of the checkout)")
    return {"home": str(home_path), "surrogate": surrogate, "timings_s": timings}


EXAMPLE_QUERIES = (
    "SELECT unique_rank, formula, spacegroup_number_relaxed, e_above_hull_ev_per_atom, "
    "formation_energy_per_atom_ev, is_dynamically_stable FROM shortlist WHERE duplicate_of IS NULL "
    "ORDER BY rank LIMIT 10",
    "SELECT reduced_formula, count(*) AS n FROM candidates GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "SELECT spacegroup_number, count(*) AS n FROM templates GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
)
