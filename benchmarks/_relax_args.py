"""Command-line options the relaxation benchmarks share: which home, system and surrogate."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_candidate_source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--home`` (``CGWGAN_HOME``), ``--system``, ``--surrogate``, ``--models-dir`` (``CGWGAN_M3GNET_DIR``)."""
    p.add_argument("--home", default=os.environ.get("CGWGAN_HOME", str(ROOT / ".cgwgan")))
    p.add_argument("--system", default="Ba-O-Ru")
    p.add_argument("--surrogate", default="M3GNet-MP-2021.2.8-PES")
    p.add_argument("--models-dir", default=os.environ.get("CGWGAN_M3GNET_DIR", ""))
    return p
