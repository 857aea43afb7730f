"""Jobs: the main end-to-end job and per-stage jobs."""

JOBS: list = []
