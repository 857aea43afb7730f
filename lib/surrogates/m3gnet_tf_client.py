"""Client for the paper's surrogate, the original TensorFlow M3GNet, run in its own environment.

The transport of the ``m3gnet_tf`` family (:mod:`lib.surrogates.m3gnet_tf`): it lives in the
package because it returns the package's own result types (:class:`~lib.surrogates.base.Prediction`,
:class:`~lib.surrogates.relax.RelaxResult`), and imports only ``base`` and ``relax``.

The ``m3gnet`` package (0.2.4) needs TensorFlow 2.15, numpy 1.x and an older pymatgen, which cannot
share the project's venv. ``make tf-m3gnet`` builds ``.venv-m3gnet-tf/``; the worker
``lib/workers/m3gnet_tf_worker.py`` runs under that venv's python with the model loaded once and
answers JSON-line requests on stdin/stdout (its docstring is the protocol). This module starts it,
sends batches of pymatgen structures and returns the package's results::

    from lib.surrogates.m3gnet_tf_client import M3GNetTFClient, venv_python

    with M3GNetTFClient(venv_python(".venv-m3gnet-tf"), "/path/to/M3GNet-TF-MP-2021.2.8-EFS") as tf:
        preds = tf.predict(structures, batch_size=32)        # list[Prediction]
        relaxed = tf.relax(structures, fmax=0.1, steps=500)  # list[RelaxResult]

Units: energy eV per cell, forces eV/Å, stress eV/Å³ in ASE Voigt order (xx yy zz yz xz xy) and
ASE sign (m3gnet's GPa times :data:`~lib.surrogates.base.GPA_TO_EV_PER_A3`), as every family's
:class:`~lib.surrogates.base.Prediction`. A structure that fails carries ``error`` and NaN values
(:func:`~lib.surrogates.base.failed_prediction`, :func:`~lib.surrogates.relax.failed_relax`); the
rest of the batch proceeds.

Errors: :class:`M3GNetTFEnvError` when the environment is missing or broken (run
``make tf-m3gnet``), :class:`M3GNetTFWeightsError` when the weights folder is missing or
incomplete (also a :class:`~lib.surrogates.base.SurrogateError`), :class:`M3GNetTFWorkerError`
when the worker dies or breaks the protocol (with the tail of its log). This module reads no
environment variables: the python and the weights folder are arguments.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from lib.surrogates.base import Prediction, SurrogateError, failed_prediction
from lib.surrogates.relax import RelaxResult, failed_relax

__all__ = [
    "DEFAULT_VENV",
    "WEIGHTS_FILE",
    "WORKER_SCRIPT",
    "M3GNetTFClient",
    "M3GNetTFEnvError",
    "M3GNetTFError",
    "M3GNetTFWeightsError",
    "M3GNetTFWorkerError",
    "check_weights_dir",
    "venv_python",
]

#: The venv ``make tf-m3gnet`` builds, relative to the repository root.
DEFAULT_VENV = ".venv-m3gnet-tf"
#: The worker script (runs under the TensorFlow venv's python).
WORKER_SCRIPT = Path(__file__).resolve().parents[1] / "workers" / "m3gnet_tf_worker.py"
#: The file of a TensorFlow M3GNet model folder whose sha256 identifies the weights.
WEIGHTS_FILE = "m3gnet.data-00000-of-00001"
#: Files a model folder must hold for ``M3GNet.from_dir``.
REQUIRED_WEIGHT_FILES = ("m3gnet.json", "m3gnet.index", WEIGHTS_FILE)
_INSTALL_HINT = "run `make tf-m3gnet` to build it"


class M3GNetTFError(RuntimeError):
    """Base of this module's errors."""


class M3GNetTFEnvError(M3GNetTFError):
    """The TensorFlow M3GNet environment is missing or cannot import its packages."""


class M3GNetTFWeightsError(M3GNetTFError, SurrogateError):
    """The weights folder is missing or is not a TensorFlow M3GNet model folder."""


class M3GNetTFWorkerError(M3GNetTFError):
    """The worker died, timed out or answered outside the protocol."""


def venv_python(venv_dir: str | os.PathLike[str]) -> Path:
    """The python of a venv folder (``<venv>/bin/python``)."""
    return Path(venv_dir) / "bin" / "python"


def check_weights_dir(weights_dir: str | os.PathLike[str]) -> Path:
    """``weights_dir`` as a Path when it holds a TensorFlow M3GNet model, else
    :class:`M3GNetTFWeightsError` naming what is missing."""
    path = Path(weights_dir).expanduser()
    if not path.is_dir():
        raise M3GNetTFWeightsError(
            f"TensorFlow M3GNet weights folder not found: {path} (expected the MP-2021.2.8-EFS "
            f"folder with {', '.join(REQUIRED_WEIGHT_FILES)})"
        )
    missing = [name for name in REQUIRED_WEIGHT_FILES if not (path / name).is_file()]
    if missing:
        raise M3GNetTFWeightsError(
            f"{path}: not a TensorFlow M3GNet model folder, missing {', '.join(missing)}"
        )
    return path


def _structure_payload(structure: Any) -> dict[str, Any]:
    """lattice, species, frac_coords of an ordered pymatgen Structure (ValueError otherwise)."""
    try:
        if not structure.is_ordered:
            raise ValueError("structure has partial occupancies")
        lattice = np.asarray(structure.lattice.matrix, dtype=np.float64)
        species = [site.specie.symbol for site in structure]
        frac = np.asarray(structure.frac_coords, dtype=np.float64).reshape(len(species), 3)
    except AttributeError as exc:
        raise ValueError(f"not a pymatgen Structure ({type(structure).__name__}: {exc})") from None
    return {"lattice": lattice.tolist(), "species": species, "frac_coords": frac.tolist()}


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _array(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    if x is None:
        return np.full(shape, np.nan)
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != shape:
        raise M3GNetTFWorkerError(f"worker returned an array of shape {arr.shape}, expected {shape}")
    return arr


def _kill(proc: subprocess.Popen, log: IO[bytes] | None) -> None:
    """Finalizer: end the worker (it is ours) and close its log."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    if log is not None:
        log.close()


class M3GNetTFClient:
    """A persistent TensorFlow M3GNet worker process (started on first use; a context manager).

    ``python``: the TensorFlow venv's python (:func:`venv_python` of ``.venv-m3gnet-tf``).
    ``weights_dir``: the model folder (``m3gnet.json``, ``m3gnet.index``, ``m3gnet.data-*``).
    ``threads``: TensorFlow's intra-op threads in the worker (``None``: TensorFlow's default).
    ``startup_timeout_s``: for importing TensorFlow and loading the model; ``request_timeout_s``:
    for one request (``None``: no limit). ``log_path``: the worker's stderr (default: a temporary
    file, deleted on :meth:`close`); its tail goes into :class:`M3GNetTFWorkerError` messages.
    """

    def __init__(
        self,
        python: str | os.PathLike[str],
        weights_dir: str | os.PathLike[str],
        *,
        threads: int | None = None,
        startup_timeout_s: float = 300.0,
        request_timeout_s: float | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.python = Path(python)
        self.weights_dir = Path(weights_dir).expanduser()
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        #: the worker's ready message (versions, supported_elements, cutoffs) once started
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._buf = b""
        self._next_id = 0
        self._finalizer: weakref.finalize | None = None

    # lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> M3GNetTFClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs (requests start it again after :meth:`close`)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> M3GNetTFClient:
        """Start the worker and wait until the model is loaded (no-op when running)."""
        if self.running:
            return self
        self.close()
        if not self.python.exists():
            raise M3GNetTFEnvError(
                f"TensorFlow M3GNet environment not found: {self.python} does not exist; "
                f"{_INSTALL_HINT} (it needs TensorFlow 2.15, numpy<2, m3gnet 0.2.4 in their own venv)"
            )
        if not WORKER_SCRIPT.is_file():
            raise M3GNetTFEnvError(f"worker script missing: {WORKER_SCRIPT}")
        weights = check_weights_dir(self.weights_dir)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w+b")  # closed in close()
        else:
            self._log = tempfile.TemporaryFile(prefix="m3gnet-tf-worker-", suffix=".log")
        cmd = [str(self.python), "-I", str(WORKER_SCRIPT), "--weights", str(weights)]
        if self.threads:
            cmd += ["--threads", str(int(self.threads))]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._log, close_fds=True)
        except OSError as exc:
            self._log.close()
            self._log = None
            raise M3GNetTFEnvError(f"cannot run {self.python}: {exc}; {_INSTALL_HINT}") from exc
        self._buf = b""
        self._finalizer = weakref.finalize(self, _kill, self._proc, self._log)
        try:
            ready = self._read_message(self.startup_timeout_s, what="the model to load")
        except M3GNetTFWorkerError as exc:
            self.close()
            raise M3GNetTFEnvError(f"the TensorFlow M3GNet worker did not start: {exc}; "
                                   f"{_INSTALL_HINT}") from exc
        if not ready.get("ready"):
            tail = self._log_tail()
            self.close()
            err = ready.get("error", "unknown error")
            if "FileNotFoundError" in err or "weights" in err.lower():
                raise M3GNetTFWeightsError(f"the TensorFlow M3GNet worker cannot load {weights}: {err}")
            raise M3GNetTFEnvError(f"the TensorFlow M3GNet worker failed to start: {err}; "
                                   f"{_INSTALL_HINT}\n{tail}")
        self.info = ready
        return self

    def close(self, timeout_s: float = 20.0) -> None:
        """Ask the worker to stop, kill it if it does not, and close its log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "shutdown"}\n')
                proc.stdin.flush()
                proc.stdin.close()
                proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # what the worker knows ------------------------------------------------------------------
    @property
    def supported_elements(self) -> frozenset[str]:
        """Element symbols the model covers (starts the worker)."""
        self.start()
        return frozenset(self.info["supported_elements"])

    @property
    def versions(self) -> dict[str, str]:
        """Package versions in the worker's environment (starts the worker)."""
        self.start()
        return dict(self.info["versions"])

    # requests -------------------------------------------------------------------------------
    def predict(
        self,
        structures: Sequence[Any],
        *,
        batch_size: int = 32,
        energy_only: bool = False,
    ) -> list[Prediction]:
        """Single points of pymatgen ``structures``, ``batch_size`` per forward pass, in order."""
        payloads, local_errors = self._payloads(structures)
        sent = [i for i, p in enumerate(payloads) if p is not None]
        results = self._request({"op": "predict", "structures": [payloads[i] for i in sent],
                                 "energy_only": bool(energy_only), "batch_size": int(batch_size)},
                                expect=len(sent)) if sent else []
        out: list[Prediction | None] = [None] * len(structures)
        for i, err in local_errors.items():
            out[i] = failed_prediction(_safe_len(structures[i]), err, energy_only=energy_only)
        for i, r in zip(sent, results, strict=True):
            n = int(r.get("n_atoms", _safe_len(structures[i])))
            if r.get("error") is not None:
                out[i] = failed_prediction(n, str(r["error"]), energy_only=energy_only)
                continue
            out[i] = Prediction(
                energy_ev=_float(r["energy_ev"]),
                forces_ev_per_a=None if energy_only else _array(r["forces_ev_per_a"], (n, 3)),
                stress_ev_per_a3=None if energy_only else _array(r["stress_ev_per_a3"], (6,)),
                n_atoms=n,
            )
        return [p for p in out if p is not None]

    def relax(
        self,
        structures: Sequence[Any],
        *,
        fmax: float = 0.1,
        steps: int = 500,
        relax_cell: bool = True,
        optimizer: str = "FIRE",
        stress_weight: float = 0.01,
    ) -> list[RelaxResult]:
        """Relax pymatgen ``structures`` with m3gnet's own loop, one at a time in the worker.

        The defaults are ``m3gnet.models.Relaxer``'s (the paper's): FIRE, ``fmax`` 0.1 eV/Å,
        500 steps, the cell through ASE 3.22's ``ExpCellFilter``, and the stress handed to the
        filter as ``stress_weight`` times m3gnet's GPa stress (0.01 GPa^-1 is 1.6 times the
        stress in eV/Å³; pass :data:`~lib.surrogates.base.GPA_TO_EV_PER_A3` for the physical weight).
        ``forces_ev_per_a`` and ``stress_ev_per_a3`` of each result are a single point at its
        final structure.
        """
        payloads, local_errors = self._payloads(structures)
        sent = [i for i, p in enumerate(payloads) if p is not None]
        results = self._request({"op": "relax", "structures": [payloads[i] for i in sent],
                                 "fmax": float(fmax), "steps": int(steps), "relax_cell": bool(relax_cell),
                                 "optimizer": str(optimizer), "stress_weight": float(stress_weight)},
                                expect=len(sent)) if sent else []
        out: list[RelaxResult | None] = [None] * len(structures)
        for i, err in local_errors.items():
            out[i] = failed_relax(structures[i], err, optimizer)
        for i, r in zip(sent, results, strict=True):
            if r.get("error") is not None:
                out[i] = replace(failed_relax(structures[i], str(r["error"]), optimizer),
                                 seconds=_float(r.get("seconds")))
                continue
            final = _structure_like(structures[i], r["lattice"], r["species"], r["frac_coords"])
            n = len(r["species"])
            out[i] = RelaxResult(
                structure=final,
                energy_ev=_float(r["energy_ev"]),
                is_converged=bool(r["converged"]),
                steps=int(r["steps"]),
                max_force_ev_per_a=_float(r["max_force_ev_per_a"]),
                initial_energy_ev=_float(r["initial_energy_ev"]),
                optimizer=optimizer,
                trajectory_energies_ev=[_float(e) for e in r.get("trajectory_energies_ev") or []],
                seconds=_float(r.get("seconds")),
                forces_ev_per_a=_array(r["forces_ev_per_a"], (n, 3)),
                stress_ev_per_a3=_array(r["stress_ev_per_a3"], (6,)),
            )
        return [r for r in out if r is not None]

    def ping(self) -> float:
        """Round-trip seconds of an empty request (starts the worker)."""
        t0 = time.perf_counter()
        self._request({"op": "ping"}, expect=0)
        return time.perf_counter() - t0

    # internals ------------------------------------------------------------------------------
    @staticmethod
    def _payloads(structures: Sequence[Any]) -> tuple[list[dict | None], dict[int, str]]:
        payloads: list[dict | None] = []
        errors: dict[int, str] = {}
        for i, s in enumerate(structures):
            try:
                payloads.append(_structure_payload(s))
            except ValueError as exc:
                payloads.append(None)
                errors[i] = str(exc)
        return payloads, errors

    def _request(self, payload: dict[str, Any], *, expect: int) -> list[dict[str, Any]]:
        self.start()
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        rid = self._next_id
        line = json.dumps({"id": rid, **payload}, allow_nan=False).encode() + b"\n"
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            tail = self._log_tail()
            self.close()
            raise M3GNetTFWorkerError(f"the TensorFlow M3GNet worker is gone ({exc})\n{tail}") from exc
        resp = self._read_message(self.request_timeout_s, what=f"the answer to request {rid}")
        if resp.get("id") != rid:
            self.close()
            raise M3GNetTFWorkerError(f"worker answered request {resp.get('id')!r}, expected {rid}")
        if not resp.get("ok"):
            raise M3GNetTFWorkerError(f"the worker rejected the request: {resp.get('error')}")
        results = resp.get("results")
        if not isinstance(results, list) or len(results) != expect:
            self.close()
            raise M3GNetTFWorkerError(
                f"worker returned {len(results) if isinstance(results, list) else results!r} "
                f"results, expected {expect}")
        return results

    def _read_message(self, timeout_s: float | None, *, what: str) -> dict[str, Any]:
        """The next protocol line from the worker, as a dict."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                tail = self._log_tail()
                self.close(timeout_s=2.0)
                raise M3GNetTFWorkerError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = self._proc.wait(timeout=10)
                tail = self._log_tail()
                self.close()
                raise M3GNetTFWorkerError(
                    f"the TensorFlow M3GNet worker exited (status {code}) while waiting for {what}\n{tail}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as exc:
            self.close()
            raise M3GNetTFWorkerError(f"worker wrote a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            self.close()
            raise M3GNetTFWorkerError(f"worker wrote {type(msg).__name__}, expected an object")
        return msg

    def _log_tail(self, n_chars: int = 3000) -> str:
        if self._log is None or self._log.closed:
            return ""
        try:
            self._log.flush()
            size = self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, size - n_chars))
            text = self._log.read().decode("utf-8", "replace")
            self._log.seek(0, os.SEEK_END)
        except OSError:
            return ""
        return "worker log (tail):\n" + text if text.strip() else ""


def _safe_len(structure: Any) -> int:
    try:
        return len(structure)
    except TypeError:
        return 0


def _structure_like(template: Any, lattice: Any, species: list[str], frac_coords: Any) -> Any:
    """A structure of ``template``'s type (a pymatgen Structure) from the worker's arrays."""
    return type(template)(np.asarray(lattice, dtype=np.float64), species,
                          np.asarray(frac_coords, dtype=np.float64))
