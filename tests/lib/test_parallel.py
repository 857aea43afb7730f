"""``use_ray`` is the caller's decision: an initialised Ray runtime is used only when asked for
(the bug: ``CandidatesDedupConfig.use_ray=False`` was ignored inside ``cgwgan main``, where the MP
stage had already started Ray)."""

from __future__ import annotations

import polars as pl
import pytest

from lib.dedup import dedup_candidates
from lib.parallel import map_row_chunks, ray_is_running
from tests.lib.test_dedup import z_family  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.ray
def test_use_ray_false_stays_local_while_ray_is_up(z_family: pl.DataFrame) -> None:  # noqa: F811
    import ray

    started = not ray_is_running()
    if started:
        ray.init(num_cpus=1, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        off = dedup_candidates(z_family, workers=1, use_ray=False)
        on = dedup_candidates(z_family, workers=1, use_ray=True)
        _, stats = map_row_chunks(pl.DataFrame.with_row_index, z_family.select("candidate_id"), use_ray=False,
                                  n_chunks=3)
    finally:
        if started:
            ray.shutdown()
    assert ray_is_running() is not started
    assert off.backend == "local" and stats.backend == "local" and stats.n_chunks == 3
    assert on.backend == "ray"
    assert on.n_folded_matcher == off.n_folded_matcher > 0
    assert on.unique.equals(off.unique) and on.folded.equals(off.folded)


def test_use_ray_without_ray_is_an_error(z_family: pl.DataFrame) -> None:  # noqa: F811
    if ray_is_running():
        pytest.skip("a Ray runtime of another test is up in this process")
    with pytest.raises(RuntimeError, match="use_ray=True but Ray is not initialised"):
        dedup_candidates(z_family, workers=1, use_ray=True)
