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


def open_home_and_surrogate(args: argparse.Namespace):
    """(``TableStore`` of ``--home``, the loaded ``--surrogate``), torch held to one thread (the
    benchmarks' setting: batched lockstep on one core, like one Ray actor)."""
    os.environ.setdefault("CGWGAN_TORCH_THREADS", "1")
    from lib.store import TableStore
    from lib.surrogates import load_surrogate, set_torch_threads

    set_torch_threads(1)
    return TableStore(Path(args.home)), load_surrogate(args.surrogate, models_dir=args.models_dir or None)


def write_results(out: str | Path, res: dict, markdown: str) -> None:
    """``out``.json (``res``) and ``out``.md (``markdown``), the folder made; the Markdown printed."""
    import json

    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    base.with_suffix(".md").write_text(markdown)
    print(markdown)
