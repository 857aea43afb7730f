"""The one Definitions object of the platform (``workspace.yaml`` points here)."""

import dagster as dg

from assets import stage_modules
from orchestration import jobs, schedules, sensors
from orchestration.resources import CgwganHome, MPSource, RayResource, SurrogateRegistryResource

_modules = stage_modules()

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=jobs.JOBS,
    schedules=schedules.SCHEDULES,
    sensors=sensors.SENSORS,
    resources={
        "cgwgan_home": CgwganHome(),
        "mp_source": MPSource(),
        "ray_runtime": RayResource(),
        "surrogate_registry": SurrogateRegistryResource(),
    },
)
