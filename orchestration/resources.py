"""Configurable resources: paths, MP source, Ray, surrogate registry.

Each field is fed by an environment variable through ``dg.EnvVar`` in ``definitions.py``; an
unset variable falls back to the documented default when the resource is *used* (run time),
never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from lib.store import TableStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO_ROOT / ".cgwgan"
SQL_DIR = REPO_ROOT / "sql"


def _env_or(value: str | None, var: str, default: str) -> str:
    """A resource field's value, else the variable (read at run time), else the default."""
    if value:
        return value
    return os.environ.get(var) or default


class CgwganHome(dg.ConfigurableResource):
    """Where Parquet tables, the DuckDB catalog, checkpoints and DFT folders live (``CGWGAN_HOME``)."""

    home: str = ""

    @property
    def path(self) -> Path:
        p = Path(_env_or(self.home, "CGWGAN_HOME", str(DEFAULT_HOME))).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def store(self) -> TableStore:
        return TableStore(self.path)

    def subdir(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def refresh_catalog(self) -> Path:
        """Rewrite ``catalog.duckdb``: a view per table plus the views in ``sql/views``."""
        return self.store.refresh_catalog(extra_sql=view_statements())


def view_statements() -> list[str]:
    """The derived views of ``sql/views/*.sql`` in file order (statements split on ';')."""
    out: list[str] = []
    for f in sorted((SQL_DIR / "views").glob("*.sql")):
        out.extend(s.strip() for s in f.read_text().split(";") if s.strip())
    return out


class MPSource(dg.ConfigurableResource):
    """Which Materials Project source feeds ``mp_structures`` (``CGWGAN_MP_SOURCE``).

    ``embedded`` (default): pymatgen's 288 AFLOW prototypes, offline. A path to a CSV/CSV.gz/
    Parquet file in the MP-20 layout, or to a folder of CIF/POSCAR files. ``mp-api``: the
    Materials Project API with ``MP_API_KEY``.
    """

    source: str = ""
    api_key: str = ""
    mp_api_chemsys: str = ""  # e.g. "Ba-Ru-O,Ba-O" to limit an API download

    @property
    def resolved_source(self) -> str:
        return _env_or(self.source, "CGWGAN_MP_SOURCE", "embedded")

    @property
    def resolved_api_key(self) -> str:
        return _env_or(self.api_key, "MP_API_KEY", "")


class RayResource(dg.ConfigurableResource):
    """Ray runtime (``RAY_ADDRESS``; empty = a local Ray started on demand)."""

    address: str = ""
    num_cpus: int = 0  # 0 = all local cores (local Ray only)
    object_store_mb: int = 512  # local Ray only; keeps several runs on a 24 GB machine

    @property
    def resolved_address(self) -> str:
        return _env_or(self.address, "RAY_ADDRESS", "")

    def init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        addr = self.resolved_address
        if addr:
            ray.init(address=addr, ignore_reinit_error=True, log_to_driver=False)
        else:
            # Ray starts workers at niceness 15; on a busy laptop they then starve.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=self.num_cpus or None, ignore_reinit_error=True,
                     object_store_memory=self.object_store_mb * 1024 * 1024,
                     include_dashboard=False, log_to_driver=False)


class SurrogateRegistryResource(dg.ConfigurableResource):
    """The surrogate registry (``CGWGAN_SURROGATES``: a JSON/YAML file; default: built-in entries).

    ``CGWGAN_M3GNET_DIR`` points at a folder holding matgl model folders
    (``M3GNet-MP-2021.2.8-PES``, ``M3GNet-MatPES-PBE-v2025.1-PES``, ...).
    """

    registry_path: str = ""
    models_dir: str = ""
    device: str = "cpu"

    @property
    def resolved_registry_path(self) -> str:
        return _env_or(self.registry_path, "CGWGAN_SURROGATES", "")

    @property
    def resolved_models_dir(self) -> str:
        return _env_or(self.models_dir, "CGWGAN_M3GNET_DIR", "")
