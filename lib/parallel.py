"""Map a pure DataFrame -> DataFrame function over row chunks: Ray tasks (``use_ray=True``), else
local worker processes (``processes > 1``), else in-process. The caller decides: an initialised
Ray runtime is used only when asked for.

The function must be importable (module level), take a ``pl.DataFrame`` as its first argument and
keyword settings after it, and return a ``pl.DataFrame`` whose rows belong to that chunk. Results
come back in chunk order, so ``map_row_chunks(f, df, use_ray=False)`` equals ``f(df)`` for
row-wise functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import polars as pl


@dataclass(frozen=True)
class MapStats:
    """How a ``map_row_chunks`` call ran."""

    backend: str  # "ray", "processes" or "local"
    n_chunks: int
    n_rows: int
    workers: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.n_rows / self.seconds if self.seconds > 0 else float("nan")


def ray_is_running() -> bool:
    """Whether a Ray runtime is initialised in this process (False when Ray is not installed)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return bool(ray.is_initialized())


def ray_cpus() -> int:
    """CPUs of the connected Ray cluster (1 when Ray is not running)."""
    if not ray_is_running():
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def row_chunks(df: pl.DataFrame, n_chunks: int) -> list[pl.DataFrame]:
    """``df`` split into at most ``n_chunks`` contiguous, near-equal slices (none empty)."""
    n = df.height
    n_chunks = max(1, min(n_chunks, n)) if n else 1
    bounds = [round(i * n / n_chunks) for i in range(n_chunks + 1)]
    return [df.slice(lo, hi - lo) for lo, hi in pairwise(bounds)]


def _call(fn: Callable[..., pl.DataFrame], chunk: pl.DataFrame, kwargs: dict[str, Any]) -> pl.DataFrame:
    return fn(chunk, **kwargs)


def map_row_chunks(
    fn: Callable[..., pl.DataFrame],
    df: pl.DataFrame,
    *,
    use_ray: bool,
    n_chunks: int | None = None,
    chunks_per_cpu: int = 4,
    max_parallel: int = 0,
    processes: int = 0,
    **kwargs: Any,
) -> tuple[pl.DataFrame, MapStats]:
    """Apply ``fn(chunk, **kwargs)`` to row chunks of ``df`` and concatenate the results in order.

    ``use_ray=True`` runs the chunks as Ray tasks (``ray.init`` is the caller's business; an
    error when Ray is not initialised); ``False`` never touches Ray, initialised or not.
    ``n_chunks=None`` gives ``chunks_per_cpu`` chunks per Ray CPU or worker process (load
    balance) or one chunk in-process. ``max_parallel > 0`` keeps at most that many Ray tasks in
    flight (a worker limit below the cluster's CPUs). Without Ray, ``processes > 1`` runs the
    chunks in that many local worker processes (spawned, so ``fn`` and its arguments must
    pickle; chunks are handed out as workers free up). Returns the result and a :class:`MapStats`.
    """
    ray_on = bool(use_ray)
    if ray_on and not ray_is_running():
        raise RuntimeError("use_ray=True but Ray is not initialised: call ray.init() first")
    pool = 0 if ray_on or processes <= 1 else int(processes)
    workers = ray_cpus() if ray_on else max(1, pool)
    if ray_on and max_parallel > 0:
        workers = min(workers, max_parallel)
    if n_chunks is None:
        n_chunks = workers * chunks_per_cpu if ray_on or pool else 1
    chunks = row_chunks(df, n_chunks)
    if pool:
        pool = min(pool, len(chunks))
    t0 = time.perf_counter()
    if ray_on:
        import ray

        remote = ray.remote(_call)
        fn_ref = ray.put(fn)
        kw_ref = ray.put(kwargs)
        refs: list = []
        for c in chunks:
            if len(refs) - len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) >= workers:
                ray.wait(refs, num_returns=len(refs) - workers + 1)
            refs.append(remote.remote(fn_ref, c, kw_ref))
        parts = ray.get(refs)
    elif pool > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=pool, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [ex.submit(_call, fn, c, kwargs) for c in chunks]
            parts = [f.result() for f in futures]
    else:
        parts = [fn(c, **kwargs) for c in chunks]
    out = pl.concat(parts, how="vertical_relaxed") if len(parts) > 1 else parts[0]
    backend = "ray" if ray_on else ("processes" if pool > 1 else "local")
    stats = MapStats(backend, len(chunks), df.height, workers if ray_on else max(1, pool),
                     time.perf_counter() - t0)
    return out, stats
