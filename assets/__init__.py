"""Thin Dagster assets, one module per stage. Each asset is a few lines around a ``lib`` call.

| module               | group        | assets                                              |
|----------------------|--------------|-----------------------------------------------------|
| ``assets.mp``        | mp           | mp_structures, mp_symmetry, training_templates      |
| ``assets.generator`` | generator    | wgan_checkpoint, templates                          |
| ``assets.infill``    | infill       | candidates, candidates_dedup                        |
| ``assets.screening`` | screening    | surrogate_models, prescreen, references, relaxed, phonons, shortlist, consensus |
| ``assets.dft``       | dft          | dft_inputs, dft_runs, dft_results, discoveries, surrogate_accuracy, surrogate_churn |
| ``assets.reports``   | reports      | xrd_patterns, discovery_report                      |
"""

import importlib
import pkgutil
from types import ModuleType

_NOT_STAGES = {"partitions", "common"}


def stage_modules() -> list[ModuleType]:
    """Every stage module of this package (new stages are picked up without editing a list)."""
    return [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if m.name not in _NOT_STAGES and not m.name.startswith("_")
    ]
