"""The paper's surrogate: the original TensorFlow M3GNet (pip ``m3gnet`` 0.2.4), in its own venv.

``m3gnet`` needs TensorFlow 2.15, numpy 1.x and an older pymatgen, so it cannot share the
project's environment: it runs in a worker process under the python of ``.venv-m3gnet-tf``
(``make tf-m3gnet``), started once per surrogate and spoken to by
:class:`lib.surrogates.m3gnet_tf_client.M3GNetTFClient`. Batched single points go through the worker's
``predict``; relaxations use the shared driver (:mod:`lib.surrogates.relax`) with
:meth:`M3GNetTFSurrogate.calculator`, a small ASE calculator that asks the worker, so ``relax``
and ``relax_many`` work as for every family. m3gnet's own ``Relaxer`` loop is
:meth:`M3GNetTFSurrogate.relax_m3gnet`.

Weights: a TensorFlow M3GNet model folder (``m3gnet.json``, ``m3gnet.index``,
``m3gnet.data-00000-of-00001``); the sha256 of ``m3gnet.data-00000-of-00001`` identifies them.
The worker's python is an argument (``load_surrogate(worker_python=...)``); this module reads
no environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lib.ids import file_sha256
from lib.surrogates.base import (
    Family,
    Prediction,
    Surrogate,
    SurrogateKind,
    SurrogateSpec,
)
from lib.surrogates.m3gnet_tf_client import (
    WEIGHTS_FILE,
    M3GNetTFClient,
    M3GNetTFEnvError,
    check_weights_dir,
)
from lib.surrogates.relax import RelaxResult, stored_results_calculator

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

#: sha256 of ``m3gnet.data-00000-of-00001`` of the paper's MP-2021.2.8-EFS weights.
M3GNET_TF_MP_2021_SHA256 = "3d6d4bd777eb7af8efe7ccae0804ffbc58cdb9aac946db08b01e7e5f41eb70eb"
_INSTALL_HINT = ("pass the python of the TensorFlow venv (load_surrogate(worker_python=...), "
                 "CGWGAN_M3GNET_TF_PYTHON); run `make tf-m3gnet` to build .venv-m3gnet-tf")


class M3GNetTFSurrogate(Surrogate):
    """The TensorFlow M3GNet through one long-lived worker process (:attr:`client`).

    The worker starts when the surrogate loads and stops on :meth:`close` (also a context
    manager; a surrogate that is garbage-collected kills its worker).
    """

    kind: SurrogateKind = "m3gnet_tf"

    def __init__(self, spec: SurrogateSpec, client: M3GNetTFClient, *, device: str) -> None:
        client.start()
        versions = client.versions
        super().__init__(spec, device=device,
                         library_version=f"m3gnet {versions.get('m3gnet', '?')} "
                                         f"(tensorflow {versions.get('tensorflow', '?')})")
        self.client = client
        self._elements = client.supported_elements

    @property
    def supported_elements(self) -> frozenset[str]:
        return self._elements

    @property
    def worker_python(self) -> Path:
        return self.client.python

    def close(self) -> None:
        """Stop the worker (a later prediction starts it again)."""
        self.client.close()

    def __enter__(self) -> M3GNetTFSurrogate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _predict_batch(self, structures: list[Structure], *, energy_only: bool) -> list[Prediction]:
        """One worker request; the worker runs the structures as one forward pass."""
        return self.client.predict(structures, batch_size=max(1, len(structures)), energy_only=energy_only)

    def calculator(self) -> Calculator:
        """An ASE calculator whose energy, forces and stress (eV/Å³) come from the worker: the
        relaxation driver's calculator, computing each new state on demand, one structure."""
        return stored_results_calculator()(self)

    def relax_m3gnet(self, structures: Sequence[Structure], *, fmax: float = 0.1, steps: int = 500,
                     relax_cell: bool = True, optimizer: str = "FIRE") -> list[RelaxResult]:
        """m3gnet's own ``Relaxer`` loop in the worker (its ``ExpCellFilter``, stress weight
        0.01: the paper's relaxation), one structure at a time; per-structure errors; each
        result carries the forces and stress at its final structure."""
        return self.client.relax(structures, fmax=fmax, steps=steps, relax_cell=relax_cell,
                                 optimizer=optimizer)


def weights_file(weights: str) -> Path:
    """``m3gnet.data-00000-of-00001`` of the model folder (or the file itself)."""
    path = Path(weights)
    return path if path.name == WEIGHTS_FILE else path / WEIGHTS_FILE


def spec_from_path(path: Path) -> SurrogateSpec | None:
    """An ad-hoc spec for a TensorFlow M3GNet folder; ``None`` when ``path`` is none."""
    folder = path.parent if path.is_file() and path.name == WEIGHTS_FILE else path
    if not (folder.is_dir() and (folder / "m3gnet.json").is_file()):
        return None
    check_weights_dir(folder)  # M3GNetTFWeightsError (a SurrogateError) naming what is missing
    return SurrogateSpec(name=folder.name, kind="m3gnet_tf", weights=str(folder),
                         sha256=file_sha256(str(folder / WEIGHTS_FILE)), version="",
                         convention="native")


def load(spec: SurrogateSpec, wfile: Path, device: str, *,
         python: str | Path | None = None, threads: int | None = None) -> M3GNetTFSurrogate:
    """Start the worker under ``python`` (the TensorFlow venv's) with the folder of ``wfile``.

    :class:`~lib.surrogates.m3gnet_tf_client.M3GNetTFEnvError` (naming ``make tf-m3gnet``) when no python
    is given, it does not exist or cannot run m3gnet. The worker runs TensorFlow on the CPU
    unless its environment has a GPU build; ``device`` is recorded.
    """
    if python is None or not str(python):
        raise M3GNetTFEnvError(f"surrogate {spec.name!r} runs in its own TensorFlow environment "
                               f"and no python was given for it: {_INSTALL_HINT}")
    client = M3GNetTFClient(python, wfile.parent, threads=threads or None)
    return M3GNetTFSurrogate(spec, client, device=device)


FAMILY = Family(
    kind="m3gnet_tf",
    load=load,
    weights_file=weights_file,
    spec_from_path=spec_from_path,
    path_hint="a TensorFlow M3GNet folder (m3gnet.json + m3gnet.index + m3gnet.data-*)",
    default_convention="native",
    weights_in_models_dir=True,
    runs_in_worker=True,
)
