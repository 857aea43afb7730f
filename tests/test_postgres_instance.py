"""The Dagster instance on PostgreSQL (``orchestration/dagster_postgres.yaml``), against Debian's
PostgreSQL server started here.

A throwaway server: ``initdb`` (``trust`` authentication) in a private temp dir and ``postgres``
listening on a free port of 127.0.0.1 and on a unix socket in that dir. PostgreSQL refuses to run
as root, so as root both run as the ``postgres`` user (``nobody`` where Debian's package has not
created it) and the dir belongs to that user. The server is stopped in the fixture's teardown by
signalling exactly the process the fixture started. Without the server binaries (``make pg-deps``)
the test is skipped, or failed in CI (``CI=true``).

The instance is the file as shipped, copied to ``$DAGSTER_HOME/dagster.yaml`` with the
``DAGSTER_PG_*`` variables pointing at the server. On it the platform's partitioned
``screening_job`` (its ``prescreen`` step) screens a tiny Ba-Ru-O partition with M3GNet from the
shared models folder; run, partition tags and materialisations are then read back with ``psql`` and
through a second instance object (its own connections).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from orchestration.resources import (
    REPO_ROOT,
    RESOURCE_TYPES,
    CgwganHome,
    RayResource,
    SurrogateRegistryResource,
)
from tests.conftest import skip_or_fail
from tests.lib.test_screening import ba_ru_o_dedup_frame

pytestmark = pytest.mark.slow

CHEMSYS = "Ba-O-Ru"
SURROGATE = "M3GNet-MP-2021.2.8-PES"
DB = "cgwgan_dagster"
PG_USER = "dagster"  # the server's superuser role (initdb -U), trust authentication


@dataclass
class PgServer:
    bin_dir: Path
    port: int
    socket_dir: Path
    log: Path

    def psql(self, sql: str, db: str = DB) -> list[list[str]]:
        """Rows of ``sql`` from psql over TCP (unaligned, tab-separated)."""
        out = subprocess.run(
            [str(self.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", db,
             "-X", "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t", "-c", sql],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
        assert out.returncode == 0, f"psql failed ({sql}): {out.stderr}"
        return [line.split("\t") for line in out.stdout.splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_bin_dir() -> Path:
    """The newest Debian PostgreSQL server's bin dir (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        skip_or_fail("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): run `make pg-deps`")
    return Path(found[-1]).parent


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user the server runs as when this test runs as root; None: this user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    skip_or_fail("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")
    raise AssertionError  # unreachable: skip_or_fail raises


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT) of the postmaster this fixture started, then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture()
def pg_server() -> Iterator[PgServer]:
    bin_dir = _server_bin_dir()
    user = _server_user()
    # /tmp, short: the unix socket's path has a length limit; pytest's tmp_path is private to root
    tmp = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    ids = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    if user is not None:
        os.chown(tmp, user.pw_uid, user.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    proc: subprocess.Popen | None = None
    try:
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(tmp / "data"), "-U", PG_USER, "-A", "trust", "-E", "UTF8",
             "--locale=C", "--no-sync"], cwd=tmp, env=env, capture_output=True, text=True, timeout=120, **ids)
        if init.returncode != 0:
            skip_or_fail(f"initdb failed (rc {init.returncode}): {init.stderr[-2000:]}")
        sock = tmp / "sock"
        sock.mkdir()
        if user is not None:
            os.chown(sock, user.pw_uid, user.pw_gid)
        port = _free_port()
        log = tmp / "server.log"
        with open(log, "w") as log_fh:
            proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(tmp / "data"), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(sock), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                cwd=tmp, env=env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True, **ids)
        ready = [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-q"]
        deadline = time.monotonic() + 60
        while subprocess.run(ready, timeout=30).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                skip_or_fail(f"PostgreSQL did not start (rc {proc.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.3)
        server = PgServer(bin_dir=bin_dir, port=port, socket_dir=sock, log=log)
        server.psql(f"CREATE DATABASE {DB}", db="postgres")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def test_partitioned_screening_job_on_a_postgres_instance(pg_server, home, store, m3gnet_dir, tmp_path,
                                                          monkeypatch):
    import torch
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    from orchestration.definitions import build_definitions

    torch.set_num_threads(1)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "orchestration" / "dagster_postgres.yaml", dagster_home / "dagster.yaml")
    for var, value in {"DAGSTER_HOME": str(dagster_home), "DAGSTER_PG_USERNAME": PG_USER,
                       "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_DB": DB,
                       "DAGSTER_PG_PORT": str(pg_server.port)}.items():
        monkeypatch.setenv(var, value)

    store.write("candidates_dedup", ba_ru_o_dedup_frame(), partition=CHEMSYS)
    resources = {key: cls() for key, cls in RESOURCE_TYPES.items()} | {
        "cgwgan_home": CgwganHome(home=str(home)), "ray_runtime": RayResource(num_cpus=1, object_store_mb=256),
        "surrogate_registry": SurrogateRegistryResource(models_dir=str(m3gnet_dir), torch_threads=1)}
    job = build_definitions(resources).resolve_job_def("screening_job")
    assert job.partitions_def is not None  # the platform's partitioned job, chemical system x surrogate
    pk = dg.MultiPartitionKey({"chemical_system": CHEMSYS, "surrogate": SURROGATE})

    inst = dg.DagsterInstance.get()  # what `dagster dev` / `cgwgan main` open: $DAGSTER_HOME/dagster.yaml
    inst2 = None
    try:
        assert isinstance(inst.run_storage, PostgresRunStorage)
        assert isinstance(inst.event_log_storage, PostgresEventLogStorage)
        assert isinstance(inst.schedule_storage, PostgresScheduleStorage)
        inst.add_dynamic_partitions("chemical_system", [CHEMSYS])
        inst.add_dynamic_partitions("surrogate", [SURROGATE])
        res = job.execute_in_process(
            instance=inst, partition_key=pk, asset_selection=[dg.AssetKey("prescreen")],
            run_config={"ops": {"prescreen": {"config": {"use_ray": False, "batch_rows": 2, "batch_size": 4}}}})
        assert res.success
        run_id = res.run_id
        # the screening itself: M3GNet's energies for the 5 candidates, the Og row an error
        pre = store.read("prescreen", partition=f"{CHEMSYS}|{SURROGATE}")
        assert pre.height == 5 and set(pre["surrogate_name"]) == {SURROGATE}
        assert pre.filter(pl.col("status") == "error")["candidate_id"].to_list() == ["cand-og-bad"]
        assert pre.filter(pl.col("status") == "ok")["energy_per_atom_ev"].is_between(-12, -3).all()

        # PostgreSQL itself (psql): the run, its partition tags, its materialisation events
        assert pg_server.psql(f"SELECT pipeline_name, status, partition FROM runs WHERE run_id = '{run_id}'") == [
            ["screening_job", "SUCCESS", str(pk)]]
        tags = dict(pg_server.psql(f"SELECT key, value FROM run_tags WHERE run_id = '{run_id}'"))
        assert tags["dagster/partition"] == str(pk) == f"{CHEMSYS}|{SURROGATE}"
        assert tags["dagster/partition/chemical_system"] == CHEMSYS
        assert tags["dagster/partition/surrogate"] == SURROGATE
        mats = pg_server.psql(f"SELECT asset_key, partition FROM event_logs WHERE run_id = '{run_id}' "
                              "AND dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert mats == [['["prescreen"]', str(pk)]]
        events = {r[0] for r in pg_server.psql(
            f"SELECT DISTINCT dagster_event_type FROM event_logs WHERE run_id = '{run_id}'")}
        # run start/success are stored under their old names (DagsterEventType.RUN_START.value)
        assert {"PIPELINE_START", "STEP_SUCCESS", "ASSET_CHECK_EVALUATION", "PIPELINE_SUCCESS"} <= events, events
        parts = pg_server.psql("SELECT partitions_def_name, partition FROM dynamic_partitions ORDER BY 1")
        assert parts == [["chemical_system", CHEMSYS], ["surrogate", SURROGATE]]

        # a second instance object from the same dagster.yaml: new connections, the same history
        inst2 = dg.DagsterInstance.from_config(str(dagster_home))
        assert inst2 is not inst and isinstance(inst2.run_storage, PostgresRunStorage)
        run = inst2.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS and run.job_name == "screening_job"
        assert run.tags["dagster/partition"] == str(pk)
        found = inst2.get_runs(filters=dg.RunsFilter(tags={"dagster/partition/surrogate": SURROGATE}))
        assert [r.run_id for r in found] == [run_id]
        assert inst2.get_materialized_partitions(dg.AssetKey("prescreen")) == {str(pk)}
        records = inst2.fetch_materializations(dg.AssetKey("prescreen"), limit=10).records
        assert [(r.run_id, r.partition_key) for r in records] == [(run_id, str(pk))]
        mat = records[0].asset_materialization
        assert mat is not None
        meta = mat.metadata
        # the event's metadata as PostgreSQL stored it
        assert (meta["n_ok"].value, meta["n_error"].value, meta["surrogate"].value, meta["batches"].value) == (
            4, 1, SURROGATE, 3)
        checks = {e.check_name: e.passed for e in res.get_asset_check_evaluations()}
        assert checks and all(checks.values()), checks
        assert set(inst2.get_dynamic_partitions("surrogate")) == {SURROGATE}
    finally:
        if inst2 is not None:
            inst2.dispose()
        inst.dispose()
