"""Schedules: weekly re-screening of every (chemical system, surrogate) partition.

The jobs the schedules and sensors target are defined here (``RESCREEN_JOB``, ``CHURN_JOB``,
``DFT_INGEST_JOB``); ``Definitions`` picks them up through the schedules and sensors.
"""

from datetime import UTC, datetime

import dagster as dg

from assets.partitions import screening_partitions

#: The screening stages, in order (asset keys of ``assets/screening.py``).
SCREENING_STAGES: tuple[str, ...] = ("prescreen", "relaxed", "references", "phonons", "shortlist")

RESCREEN_JOB = dg.define_asset_job(
    "rescreen_surrogate",
    selection=dg.AssetSelection.assets(*SCREENING_STAGES),
    partitions_def=screening_partitions,
    description="Screen one chemical system with one surrogate: prescreen → relax → hull → phonons → shortlist.",
)
CHURN_JOB = dg.define_asset_job(
    "surrogate_churn_job", selection=dg.AssetSelection.assets("surrogate_churn"),
    description="Compare the surrogates' shortlists (rank correlation, top-k overlap, phonon verdict flips).",
)
DFT_INGEST_JOB = dg.define_asset_job(
    "dft_ingest", selection=dg.AssetSelection.assets("dft_results", "discoveries"),
    description="Ingest finished DFT run folders, then refresh the discoveries.",
)


def screening_run_requests(instance: dg.DagsterInstance, *, tag: str) -> list[dg.RunRequest]:
    """One re-screening run per (chemical system, surrogate) partition known to the instance."""
    systems = sorted(instance.get_dynamic_partitions("chemical_system"))
    surrogates = sorted(instance.get_dynamic_partitions("surrogate"))
    return [
        dg.RunRequest(
            run_key=f"{tag}:{cs}|{sur}",
            partition_key=dg.MultiPartitionKey({"chemical_system": cs, "surrogate": sur}),
            tags={"cgwgan/trigger": tag},
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
def weekly_rescreen(context: dg.ScheduleEvaluationContext):
    try:
        when = context.scheduled_execution_time.strftime("%Y-%m-%d")
    except Exception:  # noqa: BLE001 - a manual tick has no scheduled time
        when = datetime.now(UTC).strftime("%Y-%m-%d")
    requests = screening_run_requests(context.instance, tag=f"weekly-{when}")
    if not requests:
        return dg.SkipReason("no chemical_system × surrogate partitions yet (the registry sensor adds them)")
    return requests


SCHEDULES: list = [weekly_rescreen]
