"""Loading a surrogate: resolve the spec, check the weights' sha256, hand over to the family.

:func:`load_surrogate` with ``cache=True`` keeps the loaded models of this process, keyed by the
weights' sha256 (with name, kind, convention and device): a registry name whose weights file
changed loads again instead of serving the old model.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from lib.ids import file_sha256
from lib.surrogates.base import Surrogate, SurrogateError, SurrogateSpec
from lib.surrogates.registry import family, resolve_spec

#: Loaded surrogates kept by :func:`load_surrogate` (``cache=True``), at most this many.
CACHE_SIZE = 4
_CACHE: dict[tuple[str, str, str, str, str, str, bool], Surrogate] = {}


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads; returns the number in effect.

    ``threads`` > 0 sets it; ``None`` or 0 leaves torch's setting (by default the number of
    cores) alone. The setting is process-wide. Use the number of cores when the process has the
    machine to itself; on a shared machine use 1 per process (with several threads each small
    forward pass waits for threads the OS has descheduled: measured here, an ASE-loop single
    point went from 13/s at 1 thread to 0.5/s at 2 threads on 2 busy cores;
    ``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported avoids most of that loss).
    """
    import torch

    if threads is not None and threads < 0:
        raise SurrogateError(f"torch threads must be >= 0 (0 = leave torch's setting), got {threads}")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())


def clear_surrogate_cache() -> None:
    """Forget the surrogates kept by :func:`load_surrogate` (``cache=True``)."""
    _CACHE.clear()


def load_surrogate(
    name_or_folder: str,
    *,
    registry: dict[str, SurrogateSpec] | None = None,
    models_dir: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    cache: bool = False,
    worker_python: str | None = None,
    compile_energy: bool = False,
) -> Surrogate:
    """Load a surrogate by registry name or weights folder/file.

    ``registry``: from :func:`~lib.surrogates.registry.load_registry` (default: the built-ins
    with ``models_dir``). The weights file's sha256 must equal the registry's; an M3GNet model
    trained with matgl's DGL code gets its conventions restored (see
    :mod:`lib.surrogates._m3gnet_legacy`). ``threads``: torch CPU threads for this process
    (:func:`set_torch_threads`; ``None``: torch's setting stays). ``cache``: reuse a surrogate
    this process already loaded with the same weights (sha256), name, convention and device.
    ``worker_python``: the python of a family that runs in its own environment in a worker
    process (``m3gnet_tf``: ``.venv-m3gnet-tf/bin/python``, built by ``make tf-m3gnet``); the
    worker gets ``threads`` as its CPU threads. Other families ignore it. ``compile_energy``:
    :meth:`~lib.surrogates.base.Surrogate.compile_energy_pass` (families without it run eager).
    """
    set_torch_threads(threads)
    spec = resolve_spec(name_or_folder, registry, models_dir)
    assert spec.weights is not None
    fam = family(spec.kind)
    wfile = fam.weights_file(spec.weights)
    if not wfile.is_file():
        raise SurrogateError(f"surrogate {spec.name!r}: weights file not found: {wfile}")
    actual = file_sha256(str(wfile))
    if spec.sha256 and actual != spec.sha256:
        raise SurrogateError(
            f"surrogate {spec.name!r}: sha256 of {wfile} is {actual}, the registry says "
            f"{spec.sha256}; register these weights under their own name"
        )
    spec = replace(spec, sha256=actual)
    key = (actual, spec.kind, spec.name, spec.convention, device,
           str(worker_python or "") if fam.runs_in_worker else "", bool(compile_energy))
    if cache and key in _CACHE:
        return _CACHE[key]
    if fam.runs_in_worker:
        surrogate = fam.load(spec, wfile, device, python=worker_python, threads=threads)
    else:
        surrogate = fam.load(spec, wfile, device)
    if compile_energy and not surrogate.compile_energy_pass():
        warnings.warn(f"surrogate {spec.name!r} ({spec.kind}) has no compiled energy pass; it runs eager",
                      stacklevel=2)
    if cache:
        while len(_CACHE) >= CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = surrogate
    return surrogate
