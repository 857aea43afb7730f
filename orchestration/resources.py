"""Configurable resources: paths, MP source, Ray, surrogate registry, DFT; and the one place that
reads the platform's environment variables.

Resources never read the environment themselves: a field holds its value, or "" / 0 for the
documented default. :func:`resources_from_env` builds the resources of ``Definitions``: a field
whose variable (:data:`ENV_VARS`) is set is fed by ``dg.EnvVar`` (resolved when a run starts,
shown in the launchpad by name only, so ``MP_API_KEY`` is never displayed); a field whose variable
is unset keeps its default. Why not ``dg.EnvVar`` for every field: Dagster fails a run whose
``EnvVar`` names an unset variable, and every variable here is optional.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from lib.store import S3Options, TableStore, is_object_store_url
from orchestration.paths import DEFAULT_HOME, HOME_ENV_VAR, REPO_ROOT, SQL_DIR, view_statements

__all__ = ["DEFAULT_HOME", "REPO_ROOT", "SQL_DIR", "view_statements"]  # re-exported from orchestration.paths


class CgwganHome(dg.ConfigurableResource):
    """Where Parquet tables, the DuckDB catalog, checkpoints and DFT folders live (``CGWGAN_HOME``;
    "" = ``.cgwgan`` in the checkout).

    ``home`` may be an object store, ``s3://bucket/prefix``: the tables then live there (reached
    with ``s3_endpoint``/``s3_access_key``/``s3_secret_key``/``s3_region``: ``CGWGAN_S3_ENDPOINT``,
    ``CGWGAN_S3_ACCESS_KEY_ID``, ``CGWGAN_S3_SECRET_ACCESS_KEY`` (a secret), ``CGWGAN_S3_REGION``;
    empty keys = the AWS SDK's own credential chain), and what needs a local disk (checkpoints,
    work and DFT folders, reports) lives under ``local_dir`` (``CGWGAN_LOCAL_DIR``; "" = ``.cgwgan``
    in the checkout). There is no ``catalog.duckdb`` on S3: :meth:`refresh_catalog` skips it and SQL
    goes through ``store.connect()``.
    """

    home: str = ""
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = ""
    local_dir: str = ""

    @property
    def is_object_store(self) -> bool:
        return is_object_store_url(self.home)

    @property
    def root(self) -> Path:
        """The home folder (not created); for an ``s3://`` home, the local folder (``local_dir``)."""
        if self.is_object_store:
            return Path(self.local_dir or DEFAULT_HOME).expanduser().resolve()
        return Path(self.home or DEFAULT_HOME).expanduser().resolve()

    @property
    def path(self) -> Path:
        p = self.root
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def store(self) -> TableStore:
        if self.is_object_store:
            return TableStore(self.home.strip(), s3=S3Options(
                endpoint=self.s3_endpoint, access_key=self.s3_access_key, secret_key=self.s3_secret_key,
                region=self.s3_region))
        return TableStore(self.path)

    def subdir(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def refresh_catalog(self) -> Path | None:
        """Rewrite ``catalog.duckdb``: a view per table plus the views in ``sql/views``. None for an
        ``s3://`` home, which has no catalog file (``store.connect(extra_sql=view_statements())``)."""
        if self.is_object_store:
            return None
        return self.store.refresh_catalog(extra_sql=view_statements())


class MPSource(dg.ConfigurableResource):
    """Which Materials Project source feeds ``mp_structures`` (``CGWGAN_MP_SOURCE``).

    ``embedded`` (default): pymatgen's 288 AFLOW prototypes plus the seven Ba–Ru–O known phases
    shipped in the package, written from their textbook structure types (:mod:`lib.known_phases`), offline. A path to a CSV/CSV.gz/
    Parquet file in the MP-20 layout, or to a folder of CIF/POSCAR files. ``mp-api``: the
    Materials Project API with ``api_key`` (``MP_API_KEY``, a secret: fed by ``dg.EnvVar`` only).
    """

    source: str = ""
    api_key: str = ""
    mp_api_chemsys: str = ""  # e.g. "Ba-Ru-O,Ba-O" to limit an API download

    @property
    def resolved_source(self) -> str:
        return self.source or "embedded"

    @property
    def resolved_api_key(self) -> str:
        return self.api_key


class RayResource(dg.ConfigurableResource):
    """Ray runtime (``RAY_ADDRESS``; empty = a local Ray started on demand)."""

    address: str = ""
    num_cpus: int = 0  # 0 = all local cores (local Ray only)
    object_store_mb: int = 512  # local Ray only; keeps several runs on a 24 GB machine
    worker_niceness: int = 0  # local Ray only; Ray's own default (15) starves workers on a busy laptop
    # Local Ray only (``RAY_AUTH_MODE``): "token" (Ray's default since 2.59, chosen explicitly here,
    # so Ray does not warn at every start that it turned token authentication on) or "disabled".
    auth_mode: str = "token"

    @property
    def resolved_address(self) -> str:
        return self.address

    def init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        else:
            import logging

            # Ray reads the mode from the environment only (it refuses it in _system_config) and caches
            # its config at import, so the cache is refreshed as Ray itself does when it turns token
            # auth on by default (ray._private.authentication.authentication_token_setup); chosen
            # explicitly, the mode comes without Ray's warning.
            os.environ["RAY_AUTH_MODE"] = self.auth_mode or "token"
            from ray._raylet import Config  # type: ignore[attr-defined]  # Cython module

            Config.initialize("")
            ray.init(num_cpus=self.num_cpus or None, ignore_reinit_error=True,
                     object_store_memory=self.object_store_mb * 1024 * 1024,
                     include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     _system_config={"worker_niceness": self.worker_niceness})


#: Values of ``SurrogateRegistryResource.torch_compile``.
TORCH_COMPILE_MODES = ("off", "energy")


class SurrogateRegistryResource(dg.ConfigurableResource):
    """The surrogate registry (``CGWGAN_SURROGATES``: a JSON/YAML file; default: built-in entries).

    ``models_dir`` (``CGWGAN_M3GNET_DIR``) points at a folder holding matgl model folders
    (``M3GNet-MP-2021.2.8-PES``, ``M3GNet-MatPES-PBE-v2025.1-PES``, ...). ``torch_threads``
    (``CGWGAN_TORCH_THREADS``): torch intra-op CPU threads of a process that loads a surrogate;
    0 = torch's default in-process, one per actor CPU on Ray. ``m3gnet_tf_python``
    (``CGWGAN_M3GNET_TF_PYTHON``): the python of the TensorFlow venv the paper's M3GNet
    (``M3GNet-TF-MP-2021.2.8-EFS``) runs under; "" = ``<repo>/.venv-m3gnet-tf/bin/python``
    (``make tf-m3gnet``). ``torch_compile`` (``CGWGAN_TORCH_COMPILE``): ``off`` (default) or
    ``energy``: ``torch.compile`` the energy-only pass of the matgl models (the pre-screen: 1.21x
    as fast on CPU after ~36 s of compiling per process; ``benchmarks/results/bench_prescreen.md``).
    """

    registry_path: str = ""
    models_dir: str = ""
    device: str = "cpu"
    torch_threads: int = 0
    m3gnet_tf_python: str = ""
    torch_compile: str = "off"  # "off" | "energy" (a str: Dagster's EnvVar cannot feed a Literal)

    @property
    def compile_energy(self) -> bool:
        """Whether ``torch_compile`` asks for the compiled energy pass; a clear error for other values."""
        mode = self.torch_compile.strip().lower()
        if mode not in TORCH_COMPILE_MODES:
            raise ValueError(f"CGWGAN_TORCH_COMPILE / torch_compile must be one of {', '.join(TORCH_COMPILE_MODES)}, "
                             f"got {self.torch_compile!r}")
        return mode == "energy"

    @property
    def resolved_m3gnet_tf_python(self) -> str:
        return self.m3gnet_tf_python or str(REPO_ROOT / ".venv-m3gnet-tf" / "bin" / "python")

    @property
    def resolved_registry_path(self) -> str:
        return self.registry_path

    @property
    def resolved_models_dir(self) -> str:
        return self.models_dir


class DftResource(dg.ConfigurableResource):
    """DFT hand-back settings: the results folder the sensor watches (``CGWGAN_DFT_RESULTS``;
    "" = ``<home>/dft/results``) and the elemental references for formation energies
    (``CGWGAN_ELEMENTAL_REFS``: pymatgen ``ComputedEntry`` dicts; "" = none, formation energies
    stay null)."""

    results_dir: str = ""
    elemental_refs: str = ""
    gpaw_python: str = ""  # CGWGAN_GPAW_PYTHON: the Python that imports GPAW ("" = Debian's /usr/bin/python3)

    def results_root(self, cgwgan_home: CgwganHome, override: str = "") -> Path:
        """The DFT results folder (created): ``override``, else ``results_dir``, else ``<home>/dft/results``."""
        chosen = override or self.results_dir
        if chosen:
            p = Path(chosen).expanduser().resolve()
            p.mkdir(parents=True, exist_ok=True)
            return p
        return cgwgan_home.subdir("dft/results").resolve()

    def references_path(self, override: str = "") -> str:
        """Elemental references file: ``override``, else ``elemental_refs`` ("" = none)."""
        return override or self.elemental_refs


# ----------------------------------------------------------------------------- environment
#: Every environment variable of the platform: resource key -> {field: variable}.
ENV_VARS: dict[str, dict[str, str]] = {
    "cgwgan_home": {"home": HOME_ENV_VAR, "s3_endpoint": "CGWGAN_S3_ENDPOINT",
                    "s3_access_key": "CGWGAN_S3_ACCESS_KEY_ID", "s3_secret_key": "CGWGAN_S3_SECRET_ACCESS_KEY",
                    "s3_region": "CGWGAN_S3_REGION", "local_dir": "CGWGAN_LOCAL_DIR"},
    "mp_source": {"source": "CGWGAN_MP_SOURCE", "api_key": "MP_API_KEY"},
    "ray_runtime": {"address": "RAY_ADDRESS", "auth_mode": "RAY_AUTH_MODE"},
    "surrogate_registry": {"registry_path": "CGWGAN_SURROGATES", "models_dir": "CGWGAN_M3GNET_DIR",
                           "torch_threads": "CGWGAN_TORCH_THREADS",
                           "m3gnet_tf_python": "CGWGAN_M3GNET_TF_PYTHON", "torch_compile": "CGWGAN_TORCH_COMPILE"},
    "dft": {"results_dir": "CGWGAN_DFT_RESULTS", "elemental_refs": "CGWGAN_ELEMENTAL_REFS",
            "gpaw_python": "CGWGAN_GPAW_PYTHON"},
}
RESOURCE_TYPES: dict[str, type[dg.ConfigurableResource]] = {
    "cgwgan_home": CgwganHome,
    "mp_source": MPSource,
    "ray_runtime": RayResource,
    "surrogate_registry": SurrogateRegistryResource,
    "dft": DftResource,
}
_INT_FIELDS = {("surrogate_registry", "torch_threads")}


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The platform's resources: each field whose variable is set (non-empty) in ``environ``
    (default ``os.environ``) is fed by ``dg.EnvVar``; the others keep their defaults."""
    env = os.environ if environ is None else environ
    out: dict[str, dg.ConfigurableResource] = {}
    for key, cls in RESOURCE_TYPES.items():
        fields: dict[str, object] = {}
        for field, var in ENV_VARS.get(key, {}).items():
            if env.get(var, "").strip():
                fields[field] = dg.EnvVar.int(var) if (key, field) in _INT_FIELDS else dg.EnvVar(var)
        out[key] = cls(**fields)
    return out


def configured(key: str) -> dg.ConfigurableResource:
    """Resource ``key`` of :func:`resources_from_env` with its ``EnvVar`` fields resolved, for code
    that runs outside a Dagster run (the CLI, :func:`orchestration.main.run_main`)."""
    return resources_from_env()[key].process_config_and_initialize()


def configured_home(home: str | None = None) -> Path:
    """``home``, else the configured ``CGWGAN_HOME`` (else ``.cgwgan`` in the checkout); not created."""
    if home:
        return Path(home).expanduser().resolve()
    res = configured("cgwgan_home")
    assert isinstance(res, CgwganHome)
    return res.root


def dagster_home(home: Path) -> Path:
    """The Dagster instance folder of the main job: ``DAGSTER_HOME`` when set, else ``<home>/dagster_home``."""
    return Path(os.environ.get("DAGSTER_HOME") or home / "dagster_home").expanduser().resolve()
