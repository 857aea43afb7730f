"""Schedules: weekly re-screening of every (chemical system, surrogate) partition.

The job it launches, ``RESCREEN_JOB``, lives in ``orchestration/jobs.py`` with the others.
"""

from datetime import UTC, datetime

import dagster as dg
from dagster_shared.check import CheckError

from orchestration.jobs import RESCREEN_JOB


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
    except CheckError:  # a manual tick (build_schedule_context without a time) has no scheduled time
        when = datetime.now(UTC).strftime("%Y-%m-%d")
    requests = screening_run_requests(context.instance, tag=f"weekly-{when}")
    if not requests:
        return dg.SkipReason("no chemical_system × surrogate partitions yet (the registry sensor adds them)")
    return requests


SCHEDULES: list = [weekly_rescreen]
