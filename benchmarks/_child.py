"""Run a benchmark part in a child process with a time limit, retried.

On a machine shared with other sessions a local Ray can be stopped from outside (``ray stop``),
which leaves a driver hanging; the benchmarks therefore time their Ray part in a child process
that prints one ``<marker> {json}`` line.
"""

from __future__ import annotations

import json
import subprocess


def run_json_child(cmd: list[str], *, marker: str = "RAYJSON ", attempts: int = 2,
                   timeout_s: float = 900.0, stderr_tail: int = 800) -> tuple[dict | None, int]:
    """(the last ``marker`` line's JSON of the first successful attempt or None, attempts made)."""
    for i in range(attempts):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"child attempt {i + 1} timed out", flush=True)
            continue
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(marker)]
        if p.returncode == 0 and lines:
            return json.loads(lines[-1][len(marker):]), i + 1
        print(f"child attempt {i + 1} failed: {p.stderr[-stderr_tail:]}", flush=True)
    return None, attempts
