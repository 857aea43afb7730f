"""The one Definitions object of the platform (``workspace.yaml`` points here).

Its resources come from :func:`orchestration.resources.resources_from_env`: fields fed by
``dg.EnvVar`` for the variables that are set, defaults for the others.
"""

import dagster as dg

from assets import stage_modules
from orchestration import jobs, schedules, sensors
from orchestration.resources import resources_from_env


def build_definitions(resources: dict[str, dg.ConfigurableResource]) -> dg.Definitions:
    """The platform's assets, checks, jobs, schedules and sensors with these resources."""
    modules = stage_modules()
    return dg.Definitions(
        assets=dg.load_assets_from_modules(modules),
        asset_checks=dg.load_asset_checks_from_modules(modules),
        jobs=jobs.JOBS,
        schedules=schedules.SCHEDULES,
        sensors=sensors.SENSORS,
        resources=resources,
    )


defs = build_definitions(resources_from_env())
