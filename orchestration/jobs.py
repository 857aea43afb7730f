"""Every job of the platform: one per stage (as the UI shows them), and the jobs the schedule
and sensors launch (``RESCREEN_JOB``, ``CHURN_JOB``, ``DFT_INGEST_JOB``).

The end-to-end main job, a sequence of the stage jobs, is :func:`orchestration.main.run_main`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg

from assets.partitions import DEFAULT_CHEMICAL_SYSTEM, chemical_system_partitions, screening_partitions

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
    # consensus (every registered surrogate re-evaluates the shortlist's best rows) is materialised on its own
    "screening_job", selection=dg.AssetSelection.groups("screening") - dg.AssetSelection.assets("consensus"),
    partitions_def=screening_partitions,
    description="Surrogate pre-screen, hull, relaxation, phonons and shortlist for one system x surrogate.",
)
dft_handoff_job = dg.define_asset_job(
    "dft_handoff_job", selection=dg.AssetSelection.assets("dft_inputs", "xrd_patterns", "xrd_similarity"),
    description="VASP + phonopy input folders for the shortlists, and their simulated XRD patterns.",
)
report_job = dg.define_asset_job(
    "report_job", selection=dg.AssetSelection.assets("discovery_report"),
    partitions_def=chemical_system_partitions,
    description="The discovery report of one chemical system: one self-contained HTML file (lib.report).",
)

#: The screening stages, in order (asset keys of ``assets/screening.py``).
SCREENING_STAGES: tuple[str, ...] = ("prescreen", "references", "reference_energies", "relaxed", "phonons", "shortlist")

# The jobs of the schedule and the sensors.
RESCREEN_JOB = dg.define_asset_job(
    "rescreen_surrogate",
    selection=dg.AssetSelection.assets(*SCREENING_STAGES).required_multi_asset_neighbors(),
    partitions_def=screening_partitions,
    description="Screen one chemical system with one surrogate: prescreen + hull → relax → phonons → shortlist.",
)
CHURN_JOB = dg.define_asset_job(
    "surrogate_churn_job", selection=dg.AssetSelection.assets("surrogate_churn"),
    description="Compare the surrogates' shortlists (rank correlation, top-k overlap, phonon verdict flips).",
)
DFT_INGEST_JOB = dg.define_asset_job(
    "dft_ingest", selection=dg.AssetSelection.assets("dft_results", "discoveries"),
    description="Ingest finished DFT run folders, then refresh the discoveries.",
)
DFT_VERIFY_JOB = dg.define_asset_job(
    "dft_verify_job",
    selection=dg.AssetSelection.assets("dft_runs", "dft_results", "discoveries", "surrogate_accuracy"),
    description="GPAW here: run the best shortlisted candidates and their competing phases (Ray), ingest every "
                "finished folder, verdicts on the same backend's hull, each surrogate's accuracy against DFT.",
)

#: The stage jobs of the main job, in order.
STAGE_JOBS = [mp_job, generator_job, infill_job, screening_job, dft_handoff_job, report_job]
JOBS = [*STAGE_JOBS, RESCREEN_JOB, CHURN_JOB, DFT_INGEST_JOB, DFT_VERIFY_JOB]

# ----------------------------------------------------------------------------- the main job's sizes
OFFLINE_SURROGATE = "CHGNet-0.3.0"
M3GNET_SURROGATE = "M3GNet-MP-2021.2.8-PES"


@dataclass
class MainSettings:
    """Sizes of the main job. The defaults finish in about ten minutes on a 2-core laptop."""

    chemical_system: str = DEFAULT_CHEMICAL_SYSTEM
    surrogate: str = ""  # "" = M3GNet when a models folder (CGWGAN_M3GNET_DIR) is set, else CHGNet (offline)
    gan_epochs: int = 500
    n_templates: int = 3000
    # The embedded default trains on ~150 prototypes, so the demo's templates cannot match the
    # training density distribution as a model trained on MP does (the asset's default gate is
    # 0.93); the demo reports the overlap and gates at this lower value.
    min_density_overlap: float = 0.3
    max_asu_sites: int = 4
    prescreen_limit: int = 400
    # linear scale factors of the pre-screen's volume scan, comma-separated ("0.9,1.0,1.1": each
    # candidate's static energy at the best of those volumes: 4 evaluations per candidate, not 1); "" = off
    volume_scan: str = ""
    relax_top_k: int = 8
    phonon_top_n: int = 3
    use_ray: bool = True  # screening stages on Ray actors; False: in each run's own process
    # a GPAW `fast` verification (dft_verify_job: dft_runs -> dft_results -> discoveries ->
    # surrogate_accuracy) of the best dft_top_k novel, unique shortlist rows with their competing phases
    dft: bool = False
    dft_top_k: int = 2



def default_surrogate(models_dir: str) -> str:
    """M3GNet when the surrogate registry has a models folder, else CHGNet (offline)."""
    return M3GNET_SURROGATE if models_dir else OFFLINE_SURROGATE


def volume_scan_factors(text: str) -> list[float]:
    """``"0.9,1.0,1.1"`` -> ``[0.9, 1.0, 1.1]`` (``""`` -> ``[]``, off); ValueError naming the text."""
    try:
        return [float(f) for f in text.replace(" ", ",").split(",") if f]
    except ValueError:
        raise ValueError(f"volume scan {text!r}: give linear scale factors separated by commas, "
                         f"e.g. 0.9,1.0,1.1") from None


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
                "prescreen": {"config": {"max_candidates": s.prescreen_limit, "use_ray": s.use_ray,
                                         "volume_scan": volume_scan_factors(s.volume_scan)}},
                "relaxed": {"config": {"top_k": s.relax_top_k, "use_ray": s.use_ray}},
                "references": {"config": {"use_ray": s.use_ray}},
                "phonons": {"config": {"top_n": s.phonon_top_n, "use_ray": s.use_ray}},
            }
        },
        "dft_handoff_job": {},
        "dft_verify_job": {"ops": {"dft_runs": {"config": {
            "preset": "fast", "k": s.dft_top_k, "chemical_systems": [s.chemical_system], "use_ray": s.use_ray}}}},
        "report_job": {"ops": {"discovery_report": {"config": {"surrogate": s.surrogate}}}},
    }


def merge_run_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base`` mapping by mapping, at every depth: a value that is
    not a mapping replaces the one in ``base``; everything ``extra`` does not name is kept."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_run_config(out[key], value)
        else:
            out[key] = value
    return out
