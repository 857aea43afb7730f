"""The quick CLI commands start without the pipeline's heavy imports (issue 17: `cgwgan sql` and
`cgwgan tables` answer in under a second), and find the home exactly as the resource does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.paths import home_path, timestamped_path
from orchestration.resources import configured_home

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("dagster", "torch", "pymatgen", "matgl", "ray", "phonopy", "ase", "matplotlib")


def _imported(*argv: str, home: Path) -> set[str]:
    env = {**os.environ, "CGWGAN_HOME": str(home)}
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestration.cli", *argv], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in res.stderr.splitlines() if "|" in ln}


@pytest.mark.parametrize("argv", [("sql", "select 1"), ("tables",), ("report", "--help"), ("--help",)])
def test_quick_commands_import_nothing_heavy(argv: tuple[str, ...], tmp_path: Path) -> None:
    mods = _imported(*argv, home=tmp_path)
    assert "orchestration" in mods and not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_main_help_still_lists_the_size_options(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "orchestration.cli", "main", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--relax" in res.stdout and "--profile" in res.stdout


def test_home_is_found_as_the_resource_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGWGAN_HOME", str(tmp_path / "h"))
    assert home_path() == configured_home() == (tmp_path / "h").resolve()
    assert home_path(str(tmp_path / "x")) == configured_home(str(tmp_path / "x"))
    monkeypatch.setenv("CGWGAN_HOME", "  ")
    assert home_path() == configured_home()
    monkeypatch.delenv("CGWGAN_HOME")
    assert home_path() == configured_home() == (REPO / ".cgwgan").resolve()


def test_timestamped_paths_started_in_one_second_do_not_collide(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``cgwgan main`` runs (or exports) started within one second get a log file each."""
    import orchestration.paths as paths

    monkeypatch.setattr(paths.time, "strftime", lambda fmt: "20261205T104126")
    first = timestamped_path(tmp_path, "main", ".log")
    assert first.name == "main-20261205T104126.log" and not first.exists()
    first.write_text("run 1")
    second = timestamped_path(tmp_path, "main", ".log")
    assert second.name == "main-20261205T104126-2.log"
    second.write_text("run 2")
    assert timestamped_path(tmp_path, "export").name == "export-20261205T104126"
    assert timestamped_path(tmp_path, "main", ".log").name == "main-20261205T104126-3.log"
