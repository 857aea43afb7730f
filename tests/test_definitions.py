"""The Definitions load, every job resolves, and each stage's assets are where the docs say."""

from __future__ import annotations

import dagster as dg

from orchestration.definitions import defs

EXPECTED_GROUPS = {
    "mp": {"mp_structures", "mp_symmetry", "training_templates"},
    "generator": {"wgan_checkpoint", "templates"},
    "infill": {"candidates", "candidates_dedup"},
    "screening": {"surrogate_models", "prescreen", "relaxed", "references", "phonons", "shortlist"},
    "dft": {"dft_inputs", "dft_results", "discoveries", "surrogate_churn"},
    "reports": {"xrd_patterns"},
}


def _asset_groups() -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        groups.setdefault(node.group_name, set()).add(key.to_user_string())
    return groups


def test_definitions_validate() -> None:
    dg.Definitions.validate_loadable(defs)


def test_every_job_resolves() -> None:
    names = [job.name for job in defs.resolve_all_job_defs()]
    for name in ("mp_job", "generator_job", "infill_job", "screening_job", "dft_handoff_job"):
        assert name in names
        assert defs.resolve_job_def(name) is not None


def test_stage_groups_hold_the_issue_assets() -> None:
    groups = _asset_groups()
    for group, assets in EXPECTED_GROUPS.items():
        missing = assets - groups.get(group, set())
        assert not missing, f"group {group!r} lacks {sorted(missing)}"


def test_lib_imports_no_dagster() -> None:
    import ast
    from pathlib import Path

    lib = Path(__file__).resolve().parents[1] / "lib"
    offenders = []
    for f in lib.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in {"dagster", "orchestration", "assets"} for n in names):
                offenders.append(f.name)
    assert not offenders, f"lib modules import Dagster/orchestration: {offenders}"
