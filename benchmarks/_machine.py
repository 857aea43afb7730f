"""How busy this machine was when a benchmark ran, in the words its result files use."""

from __future__ import annotations

#: A 1-minute load average below this counts as a quiet machine (2 cores here).
QUIET_LOAD = 1.0


def load_note(load_1min: float) -> str:
    """"quiet machine" below :data:`QUIET_LOAD`, else a warning that wall times are pessimistic."""
    if load_1min < QUIET_LOAD:
        return "quiet machine"
    return "machine shared with other jobs: wall times are pessimistic"
