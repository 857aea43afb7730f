"""Where things are, without Dagster: the checkout's folders, the home folder, the derived views.

:mod:`orchestration.resources` re-exports these; the CLI's quick commands (``cgwgan sql``,
``cgwgan tables``, ``cgwgan report``) use them directly so that they start without importing
Dagster. ``CGWGAN_HOME`` is read here exactly as the ``cgwgan_home`` resource reads it (its
``ENV_VARS`` entry names :data:`HOME_ENV_VAR`): the variable when set and not blank, else
:data:`DEFAULT_HOME`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO_ROOT / ".cgwgan"
SQL_DIR = REPO_ROOT / "sql"
HOME_ENV_VAR = "CGWGAN_HOME"


def view_statements() -> list[str]:
    """The derived views of ``sql/views/*.sql`` in file order (statements split on ';')."""
    out: list[str] = []
    for f in sorted((SQL_DIR / "views").glob("*.sql")):
        out.extend(s.strip() for s in f.read_text().split(";") if s.strip())
    return out


def home_path(home: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """``home``, else ``CGWGAN_HOME`` from ``environ`` (default ``os.environ``), else
    :data:`DEFAULT_HOME`; resolved, not created."""
    if not home:
        env = os.environ if environ is None else environ
        value = env.get(HOME_ENV_VAR, "")
        home = value if value.strip() else ""  # a blank variable counts as unset
    if home and "://" in str(home):
        raise ValueError(f"{home}: the CLI's quick commands (cgwgan sql, tables, export, report) read a local "
                         "home; for an object-store home query it through TableStore.connect()")
    return Path(home or DEFAULT_HOME).expanduser().resolve()


def timestamped_path(folder: Path, prefix: str, suffix: str = "") -> Path:
    """``<folder>/<prefix>-<YYYYmmddTHHMMSS><suffix>``, or with ``-2``, ``-3``, ... before the
    suffix when that name is taken: two runs started in the same second (a retry, a script) get
    a file each instead of sharing one. Not created."""
    stem = f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}"
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path
