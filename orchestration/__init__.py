"""Dagster wiring: Definitions, resources, jobs, schedules and sensors."""
