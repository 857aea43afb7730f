"""DFT stage: hand-off to VASP/phonopy, ingest of what comes back, discoveries, surrogate churn.

Tables (group ``dft``; column contracts are data, in the modules named):

* ``dft_inputs`` — one row per shortlisted candidate, the run folder written for it:
  :data:`lib.dft_inputs.MANIFEST_SCHEMA` (``run_id``, ``run_dir``, ``candidate_id``, lineage,
  the input set and its settings, ``has_potcar``, the phonopy supercell and displacements).
* ``dft_results`` — one row per ingested run-folder version (store partition = ``result_id``):
  :data:`lib.dft_ingest.RESULT_SCHEMA` (status ``ok|unlinked|unconverged|failed|refused`` and
  ``reason``, VASP energy and convergence, final structure, formation energy against elemental
  references with their provenance, minimum phonon frequency on a q-mesh).
* ``discoveries`` — linked results that pass DFT (:func:`lib.dft_ingest.select_discoveries`)
  with their lineage (:func:`lib.lineage.attach_lineage`).
* ``surrogate_churn`` — per chemical system and pair of surrogates: :data:`lib.churn.CHURN_SCHEMA`.
"""

from lib.churn import CHURN_SCHEMA, rank_pairs, surrogate_churn
from lib.dft_ingest import (
    RESULT_SCHEMA,
    DiscoveryThresholds,
    ElementalReferences,
    ingest_run_folder,
    ingest_run_folders,
    load_elemental_references,
    scan_results_root,
    select_discoveries,
)
from lib.dft_inputs import MANIFEST_SCHEMA, DftInputSettings, potcar_available, write_dft_inputs
from lib.lineage import LINEAGE_SCHEMA, attach_lineage

__all__ = [
    "CHURN_SCHEMA", "LINEAGE_SCHEMA", "MANIFEST_SCHEMA", "RESULT_SCHEMA", "DftInputSettings", "DiscoveryThresholds",
    "ElementalReferences", "attach_lineage", "ingest_run_folder", "ingest_run_folders", "load_elemental_references",
    "potcar_available", "rank_pairs", "scan_results_root", "select_discoveries", "surrogate_churn",
    "write_dft_inputs",
]
