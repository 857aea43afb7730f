"""The Definitions load, every job resolves to the assets it names, each stage's assets are where
the docs say, and settings come from the environment in one place only."""

from __future__ import annotations

import ast
from pathlib import Path

import dagster as dg
import pytest

from orchestration.definitions import defs
from orchestration.resources import ENV_VARS, MPSource, configured, resources_from_env

REPO = Path(__file__).resolve().parents[1]

EXPECTED_GROUPS = {
    "mp": {"mp_structures", "mp_symmetry", "training_templates"},
    "generator": {"wgan_checkpoint", "templates"},
    "infill": {"candidates", "candidates_dedup"},
    "screening": {"surrogate_models", "prescreen", "relaxed", "references", "phonons", "shortlist", "consensus"},
    "dft": {"dft_inputs", "dft_runs", "dft_results", "discoveries", "surrogate_accuracy", "surrogate_churn"},
    "reports": {"xrd_patterns", "discovery_report"},
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


EXPECTED_JOBS = {
    "mp_job": {"mp_structures", "mp_structures_rejects", "mp_symmetry", "training_templates"},
    "generator_job": {"wgan_checkpoint", "templates"},
    "infill_job": {"candidates", "candidates_template_rejects", "candidates_dedup"},
    "screening_job": {"surrogate_models", "prescreen", "relaxed", "references", "reference_energies", "phonons",
                      "shortlist"},
    "dft_handoff_job": {"dft_inputs", "xrd_patterns", "xrd_similarity"},
    "report_job": {"discovery_report"},
    "rescreen_surrogate": {"prescreen", "relaxed", "references", "reference_energies", "phonons", "shortlist"},
    "surrogate_churn_job": {"surrogate_churn"},
    "dft_ingest": {"dft_results", "discoveries"},
    "dft_verify_job": {"dft_runs", "dft_results", "discoveries", "surrogate_accuracy"},
}


def test_every_job_resolves_to_its_assets() -> None:
    jobs = {job.name: job for job in defs.resolve_all_job_defs() if job.name != "__ASSET_JOB"}
    assert set(jobs) == set(EXPECTED_JOBS)
    for name, want in EXPECTED_JOBS.items():
        got = {k.to_user_string() for k in jobs[name].asset_layer.executable_asset_keys}
        assert got == want, name
    with pytest.raises(dg.DagsterInvariantViolationError):
        defs.resolve_job_def("no_such_job")


def test_resources_use_env_vars_only_for_the_variables_that_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for fields in ENV_VARS.values():
        for var in fields.values():
            monkeypatch.delenv(var, raising=False)
    assert resources_from_env()["mp_source"] == MPSource()  # nothing set: every default, no EnvVar
    assert configured("cgwgan_home").root == REPO / ".cgwgan"
    monkeypatch.setenv("MP_API_KEY", "s3cret-api-key")
    monkeypatch.setenv("CGWGAN_TORCH_THREADS", "3")
    monkeypatch.setenv("CGWGAN_DFT_RESULTS", "/data/dft")
    res = resources_from_env()
    # the secret stays an EnvVar (the launchpad shows its name); its value appears only at run time
    assert isinstance(res["mp_source"].api_key, dg.EnvVar) and "s3cret" not in repr(res["mp_source"])
    assert configured("mp_source").api_key == "s3cret-api-key"
    assert configured("surrogate_registry").torch_threads == 3
    assert configured("surrogate_registry").compile_energy is False
    monkeypatch.setenv("CGWGAN_TORCH_COMPILE", "energy")
    assert configured("surrogate_registry").compile_energy is True
    monkeypatch.setenv("CGWGAN_TORCH_COMPILE", "yes")
    with pytest.raises(ValueError, match="CGWGAN_TORCH_COMPILE"):
        configured("surrogate_registry").compile_energy  # noqa: B018 -- the property validates
    assert configured("dft").results_dir == "/data/dft"
    assert resources_from_env({"MP_API_KEY": "", "CGWGAN_HOME": "  "})["mp_source"].api_key == ""


def _env_reads(tree: ast.AST) -> list[int]:
    """Lines reading a variable: ``os.getenv(...)``, ``os.environ.get(...)``, ``os.environ[...]``."""
    def is_environ(n: ast.AST) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "environ"

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr == "getenv" or (node.func.attr == "get" and is_environ(node.func.value))):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and is_environ(node.value) and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
    return lines


def test_environment_is_read_in_orchestration_resources_only() -> None:
    offenders = []
    for pkg in ("lib", "assets", "orchestration"):
        for f in sorted((REPO / pkg).rglob("*.py")):
            if f == REPO / "orchestration" / "resources.py":
                continue
            offenders += [f"{f.relative_to(REPO)}:{n}" for n in _env_reads(ast.parse(f.read_text()))]
    assert not offenders, f"environment read outside orchestration/resources.py: {offenders}"
    assert _env_reads(ast.parse((REPO / "orchestration" / "resources.py").read_text()))  # the test sees reads


def test_stage_groups_hold_the_issue_assets() -> None:
    groups = _asset_groups()
    for group, assets in EXPECTED_GROUPS.items():
        missing = assets - groups.get(group, set())
        assert not missing, f"group {group!r} lacks {sorted(missing)}"


def test_lib_imports_no_dagster() -> None:
    lib = REPO / "lib"
    offenders = []
    for f in lib.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in {"dagster", "orchestration", "assets"} for n in names):
                offenders.append(str(f.relative_to(lib)))
    assert not offenders, f"lib modules import Dagster/orchestration: {offenders}"
