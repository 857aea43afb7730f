"""Shared fixtures: where ../shared is, a fresh CGWGAN_HOME, the table store.

``CGWGAN_SHARED`` points at the shared data folder (the Makefile and .ci/run set it to
``../shared``). Outside CI a missing folder skips the tests that need it, with a message; in CI
(``CI=true``) it fails them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lib.store import TableStore

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("CGWGAN_SHARED") or (REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = _shared_dir()
    if not (d / "data").is_dir():
        msg = f"shared data folder not found at {d} (set CGWGAN_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def mp_file(shared_dir: Path) -> Path:
    return shared_dir / "data" / "mp" / "mp_structures.csv.gz"


@pytest.fixture(scope="session")
def ba_ru_o_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "mp" / "ba_ru_o"


@pytest.fixture(scope="session")
def m3gnet_dir(shared_dir: Path) -> Path:
    return shared_dir / "models"


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "fixtures" / "vasp_phonopy"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CGWGAN_HOME for one test."""
    h = tmp_path / "cgwgan_home"
    h.mkdir()
    monkeypatch.setenv("CGWGAN_HOME", str(h))
    return h


@pytest.fixture()
def store(home: Path) -> TableStore:
    return TableStore(home)
