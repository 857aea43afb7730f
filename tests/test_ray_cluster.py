"""The pre-screen asset, unchanged, on a two-node Ray cluster started on this machine, with the
table store on an S3 server the test starts (``moto`` in server mode, as tests/lib/test_store_s3.py):
the input partition is read from and the result written to ``s3://``, so no worker needs the
driver's disk (the actors get rows and return energies; only the driver's resumable batch files
stay in its local folder, ``local_dir``).

A head (``ray start --head --num-cpus 1``) and a second node (``ray start --address ...
--num-cpus 1``) are started with ``--block`` in their own process groups and a private temp dir;
``RAY_ADDRESS`` points the platform's ``RayResource`` at the head. Two actors of one CPU each can
only be placed one per node. The cluster is torn down in ``finally`` by signalling exactly the
processes this test started (``ray stop --force`` would also stop other Ray sessions on a shared
machine).

The driver side runs in a fresh pytest process (``CGWGAN_RAY_CLUSTER_CHILD=1``), as a Dagster run
process would. In a process that has already started and stopped a local Ray (the other Ray
tests), joining the cluster fails: the actors are "cancelled before they started". Cause, narrowed
down with a 40-line script: a local ``ray.init()`` without ``RAY_AUTH_MODE`` switches the process
to token authentication (it sets ``RAY_AUTH_MODE=token`` in ``os.environ`` and refreshes Ray's
cached config); setting the variable back and re-initialising ``ray._raylet.Config`` does not
undo it, and the cluster here runs with authentication disabled. A fresh process started with
``RAY_AUTH_MODE=disabled`` (not the parent's "token" it would otherwise inherit) joins it fine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets.screening import prescreen
from lib.store import S3Options, TableStore
from orchestration.resources import CgwganHome, RayResource, SurrogateRegistryResource
from tests.lib.test_screening import SURROGATE, ba_ru_o_dedup_frame
from tests.lib.test_store_s3 import _objects

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head did not open port {port} in {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process group (it stops its own raylet/GCS), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this group only
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


CHILD_ENV = "CGWGAN_RAY_CLUSTER_CHILD"


def test_prescreen_runs_on_a_two_node_cluster(home, s3, bucket, monkeypatch):
    if os.environ.get(CHILD_ENV) != "1":
        # the driver in a fresh process (see the module docstring)
        # RAY_AUTH_MODE: a local ray.init() in this process may have set it to "token" here
        env = {**os.environ, CHILD_ENV: "1", "RAY_AUTH_MODE": "disabled"}
        node = f"{Path(__file__).resolve()}::test_prescreen_runs_on_a_two_node_cluster"
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                             env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
        assert "1 passed" in res.stdout, res.stdout[-3000:]
        return
    _run_on_a_two_node_cluster(home, s3, bucket, monkeypatch)


def _run_on_a_two_node_cluster(home, s3: S3Options, bucket: str, monkeypatch):
    import ray

    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # one auth mode for the cluster and this driver (the test's cluster listens on 127.0.0.1 only)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0",
                                                                         "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1", "--object-store-memory", str(150 * 1024**2), "--block",
              "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--temp-dir", str(tmp), "--include-dashboard", "false",
             *common], env=env, start_new_session=True, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT))
        _wait_port(port, 120)
        address = f"127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [RAY, "start", "--address", address, *common], env=env, start_new_session=True,
            stdout=open(tmp / "node2.log", "w"), stderr=subprocess.STDOUT))
        monkeypatch.setenv("RAY_ADDRESS", address)
        RayResource(address=address).init()
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, (tmp / "node2.log").read_text()[-2000:]
            time.sleep(1)
        assert ray.cluster_resources().get("CPU") == 2

        url = f"s3://{bucket}/campaign"
        store = TableStore(url, s3=s3)
        store.write("candidates_dedup", ba_ru_o_dedup_frame(), partition="Ba-O-Ru")
        cgwgan_home = CgwganHome(home=url, s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                                 s3_secret_key=s3.secret_key, s3_region=s3.region, local_dir=str(home))
        inst = dg.DagsterInstance.ephemeral()
        inst.add_dynamic_partitions("chemical_system", ["Ba-O-Ru"])
        inst.add_dynamic_partitions("surrogate", [SURROGATE])
        res = dg.materialize(
            [prescreen], instance=inst,
            partition_key=dg.MultiPartitionKey({"chemical_system": "Ba-O-Ru", "surrogate": SURROGATE}),
            resources={"cgwgan_home": cgwgan_home, "ray_runtime": RayResource(address=address),
                       "surrogate_registry": SurrogateRegistryResource()},
            run_config={"ops": {"prescreen": {"config": {"num_actors": 2, "batch_rows": 2, "batch_size": 4}}}})
        assert res.success
        meta = res.asset_materializations_for_node("prescreen")[0].metadata
        assert meta["backend"].value == "ray" and meta["ray_address"].value == address
        assert meta["actors"].value == 2 and meta["ray_nodes"].value == 2  # one actor on each node
        out = store.read("prescreen", partition=f"Ba-O-Ru|{SURROGATE}")
        assert out.height == 5 and out["candidate_id"].n_unique() == 5
        assert out.filter(pl.col("status") == "ok").height == 4
        # the table is on S3 (pointer + a version's Parquet), nothing of it under the local folder
        objects = _objects(store, "tables/prescreen")
        assert any(o.endswith(".parquet") for o in objects), objects
        assert not list(Path(home).rglob("*.parquet")) or all(
            "work" in p.parts for p in Path(home).rglob("*.parquet"))  # only the driver's batch files
    finally:
        ray.shutdown()
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
