"""Schedules: weekly re-screening of every (chemical system, surrogate) partition.

The job it launches, ``RESCREEN_JOB``, lives in ``orchestration/jobs.py`` with the others.
:func:`rescreen_run_config` gives a re-screening run the sizes the chemical system was first
screened with (read back from its stored screening partitions), or a named profile's when it has
none; phonon supercells are capped at :data:`DEFAULT_MAX_SUPERCELL_ATOMS` unless the first
screening set a cap. The registry sensor uses it for every re-screening run it requests.
"""

from datetime import UTC, datetime
from typing import Any

import dagster as dg
from dagster_shared.check import CheckError

from lib.phonons import DEFAULT_MAX_SUPERCELL_ATOMS
from orchestration.jobs import RESCREEN_JOB, MainSettings, main_run_config
from orchestration.profiles import DEFAULT_PROFILE, profile_settings
from orchestration.resources import CgwganHome

#: Phonon supercells with more atoms are skipped (status "skipped", counted) in a re-screen unless
#: the system's first screening recorded its own cap: the phonons stage's default
#: (``lib.phonons.DEFAULT_MAX_SUPERCELL_ATOMS``, 2x2x2 of a 32-atom cell). Uncapped, one actor
#: reached about 15 GB RSS on 2x2x2 supercells of 80- and 48-atom cells (issue 17).


def _first_screening(store: Any, chemical_system: str, exclude_surrogate: str | None) -> str | None:
    """The earliest-written relaxed partition ``<system>|<surrogate>`` of the system, if any."""
    parts = []
    for part in store.partitions("relaxed"):
        cs, _, sur = part.partition("|")
        if cs != chemical_system or sur == exclude_surrogate or not store.exists("prescreen", part):
            continue
        ptr = store.pointer("relaxed", part) or {}
        parts.append((str(ptr.get("written_at", ptr.get("version", ""))), part))
    return min(parts)[1] if parts else None


def rescreen_run_config(store: Any, chemical_system: str, *, exclude_surrogate: str | None = None,
                        profile: str = DEFAULT_PROFILE) -> tuple[dict[str, Any], str]:
    """(run config of ``RESCREEN_JOB`` for one system, where its sizes came from).

    From the system's first screening (its earliest relaxed partition of another surrogate): the
    pre-screen sample size (recorded with its prescreen; for a partition written before that was
    recorded, its prescreen rows when fewer than the system's ``candidates_dedup``, else all) and
    the sample's seed (recorded with it; 0, the stage default, when not), so the re-screen draws
    the same candidates from the same ``candidates_dedup``; the relaxed
    count, selection order and quota, and the phonon count and supercell settings, read from the
    stored tables and their write metadata. Without one: the ``profile``'s sizes
    (:mod:`orchestration.profiles`). Either way phonons get :data:`DEFAULT_MAX_SUPERCELL_ATOMS`
    unless a cap was recorded.
    """
    part = _first_screening(store, chemical_system, exclude_surrogate)
    if part is None:
        settings = MainSettings(**profile_settings(profile))
        config = main_run_config(settings)["screening_job"]
        config["ops"]["phonons"]["config"]["max_supercell_atoms"] = DEFAULT_MAX_SUPERCELL_ATOMS
        return config, f"profile {profile!r}"
    pre_md = (store.pointer("prescreen", part) or {}).get("metadata", {})
    if pre_md.get("max_candidates") is not None:
        max_candidates = int(pre_md["max_candidates"])
    else:  # written before the sample size was recorded: its size
        n_pre = store.read("prescreen", partition=part).height
        n_cands = store.read("candidates_dedup", partition=chemical_system).height
        max_candidates = n_pre if n_pre < n_cands else 0
    prescreen_cfg: dict[str, Any] = {"max_candidates": max_candidates, "sample_seed": int(pre_md.get("sample_seed", 0))}
    if pre_md.get("volume_scan"):  # the same volume scan (recorded with the prescreen), so the energies compare
        prescreen_cfg["volume_scan"] = [float(f) for f in pre_md["volume_scan"]]
    relaxed_md = (store.pointer("relaxed", part) or {}).get("metadata", {})
    relaxed_cfg: dict[str, Any] = {"top_k": store.read("relaxed", partition=part).height}
    for key in ("rank_by", "per_composition_quota"):
        if key in relaxed_md:
            relaxed_cfg[key] = relaxed_md[key]
    phonons_cfg: dict[str, Any] = {"top_n": 0, "max_supercell_atoms": DEFAULT_MAX_SUPERCELL_ATOMS}
    if store.exists("phonons", part):
        phonons_cfg["top_n"] = store.read("phonons", partition=part).height
        md = (store.pointer("phonons", part) or {}).get("metadata", {})
        if md.get("max_supercell_atoms") not in (None, "None"):
            phonons_cfg["max_supercell_atoms"] = int(md["max_supercell_atoms"])
        if md.get("supercell"):
            phonons_cfg["supercell"] = [int(x) for x in str(md["supercell"]).strip("[]").split(",")]
        if md.get("min_length_a") not in (None, "None"):
            phonons_cfg["min_length_a"] = float(md["min_length_a"])
    config = {"ops": {
        "prescreen": {"config": prescreen_cfg},
        "relaxed": {"config": relaxed_cfg},
        "phonons": {"config": phonons_cfg},
    }}
    return config, f"first screening {part}"


def screening_run_requests(instance: dg.DagsterInstance, *, tag: str, store: Any = None,
                           profile: str = DEFAULT_PROFILE) -> list[dg.RunRequest]:
    """One re-screening run per (chemical system, surrogate) partition known to the instance; with
    a ``store``, each with the sizes its system was first screened with (:func:`rescreen_run_config`)."""
    systems = sorted(instance.get_dynamic_partitions("chemical_system"))
    surrogates = sorted(instance.get_dynamic_partitions("surrogate"))
    sizes = {cs: rescreen_run_config(store, cs, profile=profile) if store is not None else ({}, "stage defaults")
             for cs in systems} if surrogates else {}
    return [
        dg.RunRequest(
            run_key=f"{tag}:{cs}|{sur}",
            partition_key=dg.MultiPartitionKey({"chemical_system": cs, "surrogate": sur}),
            run_config=sizes[cs][0],
            tags={"cgwgan/trigger": tag, "cgwgan/sizes_from": sizes[cs][1]},
        )
        for cs in systems
        for sur in surrogates
    ]


@dg.schedule(
    name="weekly_rescreen",
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    job=RESCREEN_JOB,
    description="Every Monday 03:00 UTC: re-screen every (chemical system, surrogate) partition.",
)
def weekly_rescreen(context: dg.ScheduleEvaluationContext, cgwgan_home: CgwganHome):
    try:
        when = context.scheduled_execution_time.strftime("%Y-%m-%d")
    except CheckError:  # a manual tick (build_schedule_context without a time) has no scheduled time
        when = datetime.now(UTC).strftime("%Y-%m-%d")
    requests = screening_run_requests(context.instance, tag=f"weekly-{when}", store=cgwgan_home.store)
    if not requests:
        return dg.SkipReason("no chemical_system × surrogate partitions yet (the registry sensor adds them)")
    return requests


SCHEDULES: list = [weekly_rescreen]
