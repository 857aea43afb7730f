"""``run_main``: the end-to-end main job (``cgwgan main``).

Stages have different partitions (the MP and generator groups are unpartitioned, infill is per
chemical system, screening per chemical system x surrogate), and a Dagster run holds one
partition set, so the main job is a sequence of stage runs on one Dagster instance: each shows
in the UI's run list with its logs and metadata. The last stage, ``report_job``, materialises the
``discovery_report`` asset of the system, so the report is in the UI's asset catalog with its path,
funnel and plots as metadata. The instance and the resources are passed to each run explicitly;
nothing is written to the environment.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from assets.partitions import chemical_system_partitions, surrogate_partitions

with warnings.catch_warnings():
    # Dagster's notice that the assets use beta APIs (observable source asset, partition mapping),
    # said once per import; the APIs are used on purpose.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    from orchestration.definitions import build_definitions
from orchestration.jobs import MainSettings, default_surrogate, main_run_config, merge_run_config
from orchestration.paths import timestamped_path
from orchestration.progress import enable_bars, main_job_logger, terminal_stream
from orchestration.resources import (
    DEFAULT_HOME,
    CgwganHome,
    SurrogateRegistryResource,
    dagster_home,
    resources_from_env,
)


def run_main(*, home: str | None = None, settings: MainSettings | None = None,
             instance: dg.DagsterInstance | None = None,
             resources: dict[str, dg.ConfigurableResource] | None = None,
             run_config: dict[str, dict[str, Any]] | None = None, log=print, verbose: bool = False,
             progress: bool | None = None) -> dict[str, Any]:
    """Run the whole pipeline end to end, stage by stage, and say where the results are.

    ``resources``: default :func:`~orchestration.resources.resources_from_env`; ``home`` replaces
    their ``cgwgan_home``. ``instance``: default the Dagster instance in ``DAGSTER_HOME``, else in
    ``<home>/dagster_home``. ``run_config``: more run config per stage job (``{job name: run
    config}``), merged at every depth into :func:`main_run_config` of ``settings``.

    Output: ``log`` gets one line per stage run and one per finished asset step (wall time and key
    numbers, see :mod:`orchestration.progress`); Dagster's whole event log goes to
    ``<home>/logs/main-<time>.log`` (its path is said first). ``verbose``: Dagster's console
    stream too, and no bars. ``progress``: progress bars on stderr (default: when stderr is a
    terminal and not ``verbose``).
    """
    s = settings or MainSettings()
    configs = main_run_config(s)
    unknown = sorted(set(run_config or {}) - set(configs))
    if unknown:
        raise ValueError(f"run config for unknown job(s) {unknown}; the main job runs {list(configs)}")
    res = dict(resources or resources_from_env())
    if home:
        res["cgwgan_home"] = CgwganHome(home=str(Path(home).expanduser().resolve()))
    home_res = res["cgwgan_home"].process_config_and_initialize()
    assert isinstance(home_res, CgwganHome)
    home_path = home_res.path
    registry = res["surrogate_registry"].process_config_and_initialize()
    assert isinstance(registry, SurrogateRegistryResource)
    surrogate = s.surrogate or default_surrogate(registry.models_dir)
    # the report ranks by this run's shortlist; the caller's run config still has the last word
    configs = merge_run_config(
        merge_run_config(configs, {"report_job": {"ops": {"discovery_report": {"config": {"surrogate": surrogate}}}}}),
        run_config or {})
    instance_dir = None
    if instance is None:
        instance_dir = dagster_home(home_path)
        instance_dir.mkdir(parents=True, exist_ok=True)
        instance = dg.DagsterInstance.from_config(str(instance_dir))

    for partitions, key in ((chemical_system_partitions, s.chemical_system), (surrogate_partitions, surrogate)):
        assert partitions.name is not None  # both are named in orchestration.partitions
        instance.add_dynamic_partitions(partitions.name, [key])
    screening_key = dg.MultiPartitionKey({"chemical_system": s.chemical_system, "surrogate": surrogate})

    defs = build_definitions(res)
    steps = [
        ("mp_job", None),
        ("generator_job", None),
        ("infill_job", s.chemical_system),
        ("screening_job", screening_key),
        ("dft_handoff_job", None),
        *([("dft_verify_job", None)] if s.dft else []),
        ("report_job", s.chemical_system),
    ]
    timings: dict[str, float] = {}
    report: Path | None = None
    t_all = time.perf_counter()
    log_file = timestamped_path(home_path / "logs", "main", ".log")
    job_log = main_job_logger(log_file, emit=log)
    loggers = {"cgwgan": job_log.logger_def}
    if verbose:
        loggers["console"] = dg.colored_console_logger
    log(f"[cgwgan] Dagster event log: {log_file}" + ("" if verbose else " (--verbose to see it here)"))
    bar_stream = terminal_stream(verbose) if progress in (None, True) else None
    enable_bars(bar_stream)
    try:
        for job_name, partition_key in steps:
            log(f"[cgwgan] {job_name}" + (f" [{partition_key}]" if partition_key else ""))
            t0 = time.perf_counter()
            job = defs.resolve_job_def(job_name).with_logger_defs(loggers)
            # loggers named in the run config replace Dagster's default console logger
            job_config = {**configs.get(job_name, {}), "loggers": {
                name: {"config": {"log_level": "DEBUG"}} if name == "console" else {} for name in loggers}}
            # a failed report is said (its stage line names the reason), not raised: the tables are written
            result = job.execute_in_process(
                instance=instance, partition_key=partition_key, run_config=job_config,
                raise_on_error=job_name != "report_job",
            )
            timings[job_name] = round(time.perf_counter() - t0, 1)
            if job_name == "report_job":
                report = _report_path(result)
            if result.success:
                log(f"[cgwgan] {job_name} done in {timings[job_name]} s (run {result.run_id[:8]})")
            else:
                log(f"[cgwgan] {job_name} FAILED after {timings[job_name]} s (run {result.run_id[:8]}): "
                    f"no discovery report; the events are in {log_file}")
    finally:
        enable_bars(None)
        if bar_stream is not None:
            bar_stream.close()
        job_log.close()
        if instance_dir is not None:  # the instance this call opened
            instance.dispose()
    timings["total"] = round(time.perf_counter() - t_all, 1)

    log("")
    log(f"Results are in {home_path}")
    if report:
        log(f"  Report         : {report} (cgwgan report --system {s.chemical_system})")
    log(f"  Parquet tables : {home_path / 'tables'}")
    log(f"  DuckDB catalog : {home_path / 'catalog.duckdb'}")
    log(f"  DFT inputs     : {home_path / 'dft' / 'inputs'}")
    dft_lines = _dft_summary(home_res, s.chemical_system) if "dft_verify_job" in timings else []
    for line in dft_lines:
        log(line)
    if instance_dir is not None:
        log(f"  Dagster runs   : DAGSTER_HOME={instance_dir} dagster dev -w workspace.yaml")
    log("Three SQL queries to try:")
    for q in EXAMPLE_QUERIES:
        log(f'  cgwgan sql "{q}"')
    if home_path == DEFAULT_HOME:
        log("(CGWGAN_HOME is the git-ignored .cgwgan/ folder of the checkout)")
    log(f"Dagster event log: {log_file}")
    return {"home": str(home_path), "surrogate": surrogate, "timings_s": timings, "log_file": str(log_file),
            "stage_lines": list(job_log.stages.lines), "report": str(report) if report else None}


def _dft_summary(home: CgwganHome, chemical_system: str) -> list[str]:
    """What the ``--dft`` verification kept: one line per verified candidate of the system, with its
    DFT energy above the GPAW hull of the same preset and its verdict (``discoveries``)."""
    import polars as pl

    store = home.store
    if not store.exists("discoveries"):
        return ["  DFT verdicts   : none (discoveries was not written)"]
    d = store.read("discoveries").filter((pl.col("chemical_system") == chemical_system)
                                         & pl.col("candidate_id").is_not_null())
    kept = d.filter(pl.col("verdict") == "discovery")
    lines = [f"  DFT verdicts   : {d.height} candidate(s) verified with GPAW, {kept.height} kept as discoveries "
             f"(cgwgan sql \"SELECT * FROM discoveries\")"]
    for r in d.sort("e_above_hull_dft_ev_per_atom", nulls_last=True).iter_rows(named=True):
        e = r.get("e_above_hull_dft_ev_per_atom")
        lines.append(f"    {r['formula']:<12} {r['candidate_id']}  E_hull(DFT) "
                     f"{'n/a' if e is None else f'{e:+.3f}'} eV/atom  {r['verdict']}: {r['verdict_reason']}")
    return lines


def _report_path(result: dg.ExecuteInProcessResult) -> Path | None:
    """The HTML file of the ``discovery_report`` materialisation of ``report_job``'s run, if any."""
    if not result.success:
        return None
    mats = result.asset_materializations_for_node("discovery_report")
    path = mats[0].metadata.get("path") if mats else None
    return Path(str(path.value)) if path is not None else None


EXAMPLE_QUERIES = (
    "SELECT unique_rank, formula, spacegroup_number_relaxed, e_above_hull_ev_per_atom, "
    "formation_energy_per_atom_ev, is_dynamically_stable FROM shortlist WHERE duplicate_of IS NULL AND is_novel "
    "ORDER BY rank LIMIT 10",
    "SELECT reduced_formula, count(*) AS n FROM candidates GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "SELECT spacegroup_number, count(*) AS n FROM templates GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
)
