"""Schedules (weekly re-screening)."""

SCHEDULES: list = []
