"""The main job end to end on a tiny configuration: ``run_main`` with an explicit instance and
resources, and ``cgwgan main`` through the CLI. Real components throughout: the embedded MP
prototypes, a WGAN trained for a few epochs, CHGNet (offline) for the screening, pymatgen's VASP
input sets for the DFT hand-off."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from lib.store import TableStore
from orchestration.cli import main as cli_main
from orchestration.jobs import OFFLINE_SURROGATE, MainSettings, merge_run_config
from orchestration.main import run_main
from orchestration.resources import CgwganHome, DftResource, MPSource, RayResource, SurrogateRegistryResource

pytestmark = pytest.mark.filterwarnings("ignore")

STAGES = ["mp_job", "generator_job", "infill_job", "screening_job", "dft_handoff_job", "report_job"]
#: One output line each (a step materialising several assets says it once, by its main asset).
ASSET_STAGES = ["mp_structures", "mp_symmetry", "training_templates", "wgan_checkpoint", "templates", "candidates",
                "candidates_dedup", "prescreen", "surrogate_models", "relaxed", "references", "phonons",
                "shortlist", "dft_inputs", "xrd_patterns", "discovery_report"]
MAX_LINES = 60  # issue 17: a short readable summary
TINY = MainSettings(surrogate=OFFLINE_SURROGATE, gan_epochs=30, n_templates=150, min_density_overlap=0.0,
                    max_asu_sites=3, prescreen_limit=12, relax_top_k=2, phonon_top_n=1, use_ray=False)


#: The slow knobs of each stage turned down too (merged into the sizes' run config).
TINY_RUN_CONFIG = {
    "mp_job": {"ops": {"mp_symmetry": {"config": {"round_trip_method": "direct"}}}},
    "generator_job": {"ops": {
        "wgan_checkpoint": {"config": {"batch_size": 32, "generator_hidden": 64, "critic_hidden": 64,
                                       "n_critic": 2}},
        "templates": {"config": {"tsne_points": 0}}}},
    "screening_job": {"ops": {
        "relaxed": {"config": {"steps": 30}},
        "references": {"config": {"use_ray": False, "steps": 30}},
        "phonons": {"config": {"supercell": [1, 1, 1], "mesh": [4, 4, 4], "band_npoints": 5}},
        "shortlist": {"config": {"n_plots": 0}}}},
    "dft_handoff_job": {"ops": {"dft_inputs": {"config": {"top_k": 1}}}},
}


def _assert_tables(home: Path) -> None:
    store = TableStore(home)
    for table in ("mp_structures", "training_templates", "templates", "candidates", "candidates_dedup",
                  "prescreen", "relaxed", "phonons", "shortlist", "dft_inputs", "xrd_patterns"):
        assert store.rows(table) > 0, f"{table} is empty"
    part = f"Ba-O-Ru|{OFFLINE_SURROGATE}"
    shortlist = store.read("shortlist", partition=part)
    assert shortlist.height > 0 and set(shortlist["surrogate_name"]) == {OFFLINE_SURROGATE}
    manifest = store.read("dft_inputs").filter(pl.col("status") == "written")
    assert manifest.height >= 1
    for run_dir in manifest["run_dir"]:
        d = Path(run_dir)
        assert d.is_dir() and d.parent == home / "dft" / "inputs"
        assert all((d / f).is_file() for f in ("INCAR", "KPOINTS", "POSCAR", "phonopy/phonopy_disp.yaml"))


def _assert_quiet(lines: list[str], log_file: Path, jobs: list[str] = STAGES) -> None:
    """Fewer than MAX_LINES lines, one per asset stage, no Dagster event stream; the events are
    in the log file instead."""
    assert len(lines) < MAX_LINES, "\n".join(lines)
    assert not [ln for ln in lines if " - DEBUG - " in ln or "STEP_START" in ln], "\n".join(lines)
    stage_names = [ln.split()[0] for ln in lines if ln.startswith("  ") and " s  " in ln]
    assert sorted(stage_names) == sorted(ASSET_STAGES), "\n".join(lines)
    relaxed = next(ln for ln in lines if ln.startswith("  relaxed "))
    assert "converged" in relaxed and "relaxed 2" in relaxed
    text = log_file.read_text()
    for job in jobs:
        assert f"- {job} - " in text and "RUN_START" in text
    assert text.count("STEP_SUCCESS") >= len(ASSET_STAGES) and " - DEBUG - " in text


def _our_env() -> dict[str, str]:
    """The variables the platform reads (or once wrote): Ray and torch set their own."""
    return {k: v for k, v in os.environ.items() if k.startswith(("CGWGAN_", "DAGSTER_", "MP_API"))}


@pytest.mark.slow
def test_run_main_with_explicit_instance_and_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CGWGAN_HOME", "DAGSTER_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    resources = {"cgwgan_home": CgwganHome(home=str(home)),
                 "mp_source": MPSource(source="embedded"),
                 "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
                 "surrogate_registry": SurrogateRegistryResource(torch_threads=1), "dft": DftResource()}
    env_before = _our_env()
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        out = run_main(settings=TINY, instance=instance, resources=resources, run_config=TINY_RUN_CONFIG,
                       log=lines.append)
        runs = instance.get_runs()
        assert sorted(r.job_name for r in runs) == sorted(STAGES)
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        assert instance.get_dynamic_partitions("surrogate") == [OFFLINE_SURROGATE]
        assert instance.get_dynamic_partitions("chemical_system") == ["Ba-O-Ru"]
        mat = instance.get_latest_materialization_event(dg.AssetKey("discovery_report"))
        mat = mat.asset_materialization if mat is not None else None
    assert _our_env() == env_before  # nothing written to the environment
    assert out["home"] == str(home.resolve()) and out["surrogate"] == OFFLINE_SURROGATE
    assert list(out["timings_s"]) == [*STAGES, "total"]
    assert f"Results are in {home.resolve()}" in lines
    assert not (home / "dagster_home").exists()  # the given instance was used, no other
    assert sorted(TableStore(home).read("mp_structures")["source"].unique()) == [
        "embedded:aflow_prototypes", "embedded:known_phases_ba_ru_o (textbook structure types)"]
    _assert_tables(home)
    report = Path(out["report"])  # the discovery report of the run, with its hull plot
    assert report.parent == home.resolve() / "reports" and 'data-plot="hull"' in report.read_text()
    # materialised as the asset (report_job), so the UI's catalog shows it with its metadata
    assert mat is not None and mat.partition == "Ba-O-Ru" and Path(mat.metadata["path"].value) == report
    assert mat.metadata["surrogates"].value == OFFLINE_SURROGATE and "| relaxed | 2 |" in mat.metadata["funnel"].value
    assert f"  Report         : {report} (cgwgan report --system Ba-O-Ru)" in lines
    report_line = next(ln for ln in lines if ln.startswith("  discovery_report "))
    assert "candidates shown" in report_line and "plots" in report_line
    log_file = Path(out["log_file"])
    assert log_file.parent == home.resolve() / "logs" and lines[0].endswith(f"{log_file} (--verbose to see it here)")
    _assert_quiet(lines, log_file)
    assert out["stage_lines"] == [ln for ln in lines if ln.startswith("  ") and (" s  " in ln or "! check" in ln)]


@pytest.mark.slow
def test_main_with_dft_verifies_the_best_candidate_with_gpaw(tmp_path: Path, gpaw_version: str) -> None:
    """``--dft``: dft_verify_job after the hand-off, real GPAW (preset fast) on the best novel unique
    candidate of at most 5 atoms and the competing phases of at most 2 (Ba, Ru, O2, BaO of the
    embedded known phases); ingested in the same job, given a verdict, and one summary line each."""
    import dataclasses

    home = tmp_path / "home"
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "mp_source": MPSource(source="embedded"),
                 "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
                 "surrogate_registry": SurrogateRegistryResource(torch_threads=1), "dft": DftResource()}
    settings = dataclasses.replace(TINY, dft=True, dft_top_k=1)
    run_config = merge_run_config(TINY_RUN_CONFIG, {"dft_verify_job": {"ops": {"dft_runs": {"config": {
        "phonons": False, "max_atoms": 5, "max_phase_atoms": 2}}}}})
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        out = run_main(settings=settings, instance=instance, resources=resources, run_config=run_config,
                       log=lines.append)
        runs = {r.job_name: r.status for r in instance.get_runs()}
    assert runs == {job: dg.DagsterRunStatus.SUCCESS for job in [*STAGES, "dft_verify_job"]}
    assert list(out["timings_s"]) == [*STAGES[:-1], "dft_verify_job", STAGES[-1], "total"]  # before the report
    store = TableStore(home)
    dft_runs = store.read("dft_runs")
    cands = dft_runs.filter(pl.col("kind") == "candidate")
    assert cands.height == 1 and cands["n_atoms"][0] <= 5
    shortlist = store.read("shortlist").filter(pl.col("is_novel") & pl.col("duplicate_of").is_null()
                                               & (pl.col("n_atoms") <= 5)).sort("rank")
    assert cands["candidate_id"][0] == shortlist["candidate_id"][0]  # the best one that fits
    phases = dft_runs.filter(pl.col("kind") == "competing_phase")
    ran = phases.filter(pl.col("status") != "skipped")  # larger cells are listed as skipped, with the reason
    assert ran.height >= 3 and (ran["status"] == "ok").all(), phases.select("run_name", "status", "reason")
    assert phases.filter(pl.col("status") == "skipped")["reason"].str.contains("atoms").all()
    d = store.read("discoveries").filter(pl.col("candidate_id").is_not_null())
    assert d["candidate_id"].to_list() == cands["candidate_id"].to_list()
    verdict, reason = d["verdict"][0], d["verdict_reason"][0]
    assert verdict and reason  # phonons were off: never 'discovery'
    assert verdict != "discovery"
    assert store.exists("surrogate_accuracy")
    summary = next(i for i, ln in enumerate(lines) if ln.startswith("  DFT verdicts   : 1 candidate(s) verified"))
    assert cands["candidate_id"][0] in lines[summary + 1] and verdict in lines[summary + 1]
    stage_names = {ln.split()[0] for ln in lines if ln.startswith("  ") and " s  " in ln}
    assert {"dft_runs", "dft_results", "discoveries", "surrogate_accuracy"} <= stage_names
    assert len(lines) < MAX_LINES + 8, "\n".join(lines)


@pytest.mark.slow
def test_training_is_reused_for_the_same_rows_and_settings(tmp_path: Path) -> None:
    """The generator stage run twice on the same training table with the same settings trains
    once: the second materialisation reloads the checkpoint (its weights hash checked) and says so;
    other settings train again, and the templates follow the newest checkpoint used."""
    from orchestration.definitions import build_definitions
    from orchestration.jobs import main_run_config

    home = tmp_path / "home"
    resources = {"cgwgan_home": CgwganHome(home=str(home)), "mp_source": MPSource(source="embedded"),
                 "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
                 "surrogate_registry": SurrogateRegistryResource(torch_threads=1), "dft": DftResource()}
    defs = build_definitions(resources)
    configs = merge_run_config(main_run_config(TINY), TINY_RUN_CONFIG)
    with dg.instance_for_test() as instance:
        defs.resolve_job_def("mp_job").execute_in_process(instance=instance, run_config=configs["mp_job"])

        def generate(epochs: int) -> dict:
            cfg = merge_run_config(configs["generator_job"],
                                   {"ops": {"wgan_checkpoint": {"config": {"epochs": epochs}}}})
            res = defs.resolve_job_def("generator_job").execute_in_process(instance=instance, run_config=cfg)
            return {k: getattr(v, "value", v)
                    for k, v in res.asset_materializations_for_node("wgan_checkpoint")[0].metadata.items()}

        first, second, other, again = generate(30), generate(30), generate(20), generate(30)
    assert first["reused"] is False and second["reused"] is True and other["reused"] is False
    assert second["checkpoint_id"] == first["checkpoint_id"] and second["training_key"] == first["training_key"]
    assert other["training_key"] != first["training_key"] and other["checkpoint_id"] != first["checkpoint_id"]
    assert again["reused"] is True and again["checkpoint_id"] == first["checkpoint_id"]
    rows = TableStore(home).read("wgan_checkpoints")
    assert rows.height == 2 and rows.filter(pl.col("checkpoint_id") == first["checkpoint_id"])["reused_at"].item()
    # the templates of the last run came from the reused checkpoint, not from the newer 20-epoch one
    store = TableStore(home)
    newest = max((store.pointer("templates", p) for p in store.partitions("templates")),
                 key=lambda p: p["written_at"] + p["version"])
    assert newest["metadata"]["checkpoint_id"] == first["checkpoint_id"]


@pytest.mark.slow
def test_cgwgan_main_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``cgwgan main`` with the sizes as options and the settings from the environment, as a user
    runs it (the other stage settings at their defaults); its Dagster instance lands in
    ``<home>/dagster_home``."""
    for var in ("DAGSTER_HOME", "CGWGAN_MP_SOURCE", "CGWGAN_SURROGATES", "CGWGAN_M3GNET_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CGWGAN_TORCH_THREADS", "1")
    home = tmp_path / "cli_home"
    extra = tmp_path / "tiny.yaml"
    extra.write_text(yaml.safe_dump(TINY_RUN_CONFIG))
    rc = cli_main(["main", "--home", str(home), "--run-config", str(extra), "--surrogate", OFFLINE_SURROGATE,
                   "--gan-epochs", "30",
                   "--n-templates", "150", "--min-density-overlap", "0", "--max-asu-sites", "3",
                   "--prescreen-limit", "12", "--relax-top-k", "2", "--phonon-top-n", "1", "--no-use-ray"])
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0, out + cap.err
    assert f"Results are in {home.resolve()}" in out
    logs = sorted((home / "logs").glob("main-*.log"))
    assert len(logs) == 1 and str(logs[0]) in out.splitlines()[0]
    _assert_quiet(out.splitlines(), logs[0])
    assert " - DEBUG - " not in cap.err and "Token authentication" not in cap.err
    assert f"DAGSTER_HOME={home.resolve() / 'dagster_home'}" in out
    instance = dg.DagsterInstance.from_config(str(home / "dagster_home"))
    try:
        runs = {r.job_name: r for r in instance.get_runs()}
    finally:
        instance.dispose()
    assert sorted(runs) == sorted(STAGES)
    assert {r.status for r in runs.values()} == {dg.DagsterRunStatus.SUCCESS}
    # the options and the file, merged: neither drops the other's settings of the same op
    relaxed = runs["screening_job"].run_config["ops"]["relaxed"]["config"]
    assert relaxed == {"top_k": 2, "use_ray": False, "steps": 30}
    _assert_tables(home)


def test_merge_run_config_keeps_what_it_does_not_name() -> None:
    base = {"screening_job": {"ops": {"prescreen": {"config": {"max_candidates": 5}},
                                      "relaxed": {"config": {"top_k": 2, "steps": 100}}}}}
    extra = {"screening_job": {"ops": {"relaxed": {"config": {"steps": 30, "fmax": 0.1}}}},
             "dft_handoff_job": {"ops": {"dft_inputs": {"config": {"top_k": 1}}}}}
    assert merge_run_config(base, extra) == {
        "screening_job": {"ops": {"prescreen": {"config": {"max_candidates": 5}},
                                  "relaxed": {"config": {"top_k": 2, "steps": 30, "fmax": 0.1}}}},
        "dft_handoff_job": {"ops": {"dft_inputs": {"config": {"top_k": 1}}}}}
    assert base["screening_job"]["ops"]["relaxed"]["config"]["steps"] == 100  # base is not changed


def test_run_config_for_an_unknown_job_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="screening_jobb"):
        run_main(home=str(tmp_path / "h"), settings=TINY, run_config={"screening_jobb": {}},
                 instance=dg.DagsterInstance.ephemeral(), log=lambda _: None)
    assert not (tmp_path / "h").exists()  # refused before anything ran


def test_cgwgan_main_cli_says_which_step_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Quiet: the failed stage in one line, the events in the log file; ``--verbose``: Dagster's
    event stream on the console as well."""
    monkeypatch.setenv("CGWGAN_MP_SOURCE", str(tmp_path / "no_such_file.csv"))
    rc = cli_main(["main", "--home", str(tmp_path / "h"), "--surrogate", OFFLINE_SURROGATE])
    cap = capsys.readouterr()
    err = cap.err
    assert rc == 1
    assert "the main job failed" in err and "no_such_file.csv" in err
    failed = [ln for ln in cap.out.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and failed[0].split()[0] == "mp_structures" and "no_such_file.csv" in failed[0]
    assert "STEP_FAILURE" not in cap.out + err and len(cap.out.splitlines()) <= 3
    (log_file,) = (tmp_path / "h" / "logs").glob("main-*.log")
    assert "STEP_FAILURE" in log_file.read_text() and "RUN_START" in log_file.read_text()

    rc = cli_main(["main", "--home", str(tmp_path / "h"), "--surrogate", OFFLINE_SURROGATE, "--verbose"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "RUN_START" in cap.err and "STEP_FAILURE" in cap.err and " - DEBUG - " in cap.err
    assert len(list((tmp_path / "h" / "logs").glob("main-*.log"))) == 2  # the file too, in either mode


def test_report_stage_failure_is_said_not_raised(tmp_path: Path) -> None:
    """``report_job`` on a home without a shortlist: the run fails with the reason in its stage
    line, and the main job's summary gets no report path (``_report_path``) instead of an error."""
    from orchestration.definitions import build_definitions
    from orchestration.main import _report_path
    from orchestration.progress import main_job_logger

    home = tmp_path / "home"
    defs = build_definitions({"cgwgan_home": CgwganHome(home=str(home)), "mp_source": MPSource(source="embedded"),
                              "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
                              "surrogate_registry": SurrogateRegistryResource(torch_threads=1),
                              "dft": DftResource()})
    lines: list[str] = []
    job_log = main_job_logger(tmp_path / "main.log", emit=lines.append)
    try:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("chemical_system", ["Ba-O-Ru"])
            job = defs.resolve_job_def("report_job").with_logger_defs({"cgwgan": job_log.logger_def})
            result = job.execute_in_process(instance=instance, partition_key="Ba-O-Ru", raise_on_error=False,
                                            run_config={"loggers": {"cgwgan": {}}})
            assert not result.success and _report_path(result) is None
            assert instance.get_latest_materialization_event(dg.AssetKey("discovery_report")) is None
    finally:
        job_log.close()
    (failed,) = [ln for ln in lines if "FAILED" in ln]
    assert failed.split()[0] == "discovery_report" and "no shortlist of Ba-O-Ru" in failed
    assert not (home / "reports" / "discovery-Ba-O-Ru.html").exists()
