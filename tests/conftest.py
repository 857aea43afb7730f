"""Shared fixtures: where ../shared is, a fresh CGWGAN_HOME, the table store.

``CGWGAN_SHARED`` points at the shared data folder (the Makefile and .ci/run set it to
``../shared``). Outside CI a missing folder skips the tests that need it, with a message; in CI
(``CI=true``) it fails them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from lib.store import S3Options, TableStore

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("CGWGAN_SHARED") or (REPO.parent / "shared")).resolve()


def skip_or_fail(msg: str) -> None:
    """Skip a test whose input or tool is missing here; in CI (``CI=true``) fail it instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = _shared_dir()
    if not (d / "data").is_dir():
        skip_or_fail(f"shared data folder not found at {d} (set CGWGAN_SHARED)")
    return d


@pytest.fixture(scope="session")
def gpaw_version() -> str:
    """GPAW's version under Debian's python (``make dft-deps``); skipped, or failed in CI, without it."""
    from lib.dft_gpaw import DEFAULT_PYTHON, GpawMissingError, check_gpaw

    try:
        return check_gpaw(DEFAULT_PYTHON)
    except GpawMissingError as exc:
        skip_or_fail(str(exc))
        raise


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


@pytest.fixture(scope="session")
def ba_ru_o_mp(ba_ru_o_dir: Path) -> pl.DataFrame:
    """The 23 real Ba-Ru-O MP structures (shared CSV) in the ``mp_structures`` cell layout, with
    MP's formation energy and energy above the hull."""
    from pymatgen.core import Structure

    raw = pl.read_csv(ba_ru_o_dir / "ba_ru_o_mp_structures.csv")
    structs = [Structure.from_str(c, fmt="cif") for c in raw["cif"]]
    return pl.DataFrame({
        "material_id": raw["material_id"],
        "formula": [s.composition.formula.replace(" ", "") for s in structs],
        "reduced_formula": [s.composition.reduced_formula for s in structs],
        "chemical_system": [s.composition.chemical_system for s in structs],
        "nsites": [len(s) for s in structs],
        "lattice_matrix": [s.lattice.matrix.ravel().tolist() for s in structs],
        "species": [[site.specie.symbol for site in s] for s in structs],
        "frac_coords": [s.frac_coords.tolist() for s in structs],
        "formation_energy_per_atom_ev": raw["formation_energy_per_atom"],
        "e_above_hull_ev_per_atom": raw["e_above_hull"],
    })


# --------------------------------------------------------------------------- S3 (moto server)
# A local S3-compatible server per test module (tests/lib/test_store_s3.py, tests/test_ray_cluster.py).
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # pragma: no cover - moto[server] is in the dev extra
        skip_or_fail("moto[server] is not installed (pip install -e '.[dev]')")
        raise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3(s3_endpoint: str) -> S3Options:
    return S3Options(endpoint=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1")


@pytest.fixture()
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket per test."""
    import pyarrow.fs as pafs

    name = f"cgwgan-{uuid.uuid4().hex[:12]}"
    host = s3_endpoint.removeprefix("http://")
    pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", endpoint_override=host,
                      scheme="http", allow_bucket_creation=True).create_dir(name)
    return name
