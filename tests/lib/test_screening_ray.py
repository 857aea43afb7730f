"""Pre-screen on real Ray actors: a worker killed mid-run loses nothing and duplicates nothing."""

from __future__ import annotations

import os
import signal

import polars as pl
import pytest

from lib import screening as scr
from lib.cells import ASU_COLUMNS
from tests.lib.test_screening import SURROGATE, ba_ru_o_candidates

pytestmark = pytest.mark.ray


@pytest.fixture()
def local_ray(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_killed_worker_batch_is_retried_without_loss_or_duplicates(local_ray, tmp_path):
    df = ba_ru_o_candidates()
    plan = scr.plan_batches(df.select("candidate_id", *ASU_COLUMNS), rows_per_batch=1,
                            salt={"surrogate_sha256": "test", "stage": "prescreen"})
    pool = scr.SurrogatePool(SURROGATE, num_actors=2, num_cpus_per_actor=1, max_restarts=2)
    try:
        pids_before = pool.pids()  # both actors have loaded the model
        killed: list[int] = []

        def kill_a_busy_worker(batch_id: str) -> None:
            if killed:
                return
            busy = pool.busy_actors()
            assert busy, "no batch in flight to interrupt"
            pid = pids_before[busy[0]]
            os.kill(pid, signal.SIGKILL)  # a real crash of the worker process, mid-batch
            killed.append(pid)

        res, stats = scr.run_batches(plan, pool.compute("prescreen", batch_size=4), work_dir=tmp_path,
                                     on_batch_written=kill_a_busy_worker)
        assert killed and stats.n_retries >= 1
        pids_after = pool.pids()
        assert killed[0] not in pids_after  # the killed actor was restarted in a new process
    finally:
        pool.shutdown()
    files = sorted(tmp_path.glob("bat-*.parquet"))
    assert len(files) == plan["batch_id"].n_unique() == stats.n_run == 5
    on_disk = pl.concat([pl.read_parquet(f) for f in files])
    assert on_disk.height == df.height and on_disk["candidate_id"].n_unique() == df.height
    assert sorted(res["candidate_id"]) == sorted(df["candidate_id"])
    assert res.filter(pl.col("status") == "ok").height == 4  # the Og row is a quarantined error
    # a rerun finds every batch done and recomputes nothing
    res2, stats2 = scr.run_batches(plan, lambda items: iter(()) if not list(items) else None, work_dir=tmp_path)
    assert (stats2.n_skipped, stats2.n_run) == (5, 0)
    assert res2.sort("candidate_id").equals(res.sort("candidate_id"))
