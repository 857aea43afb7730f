"""The original TensorFlow M3GNet (pip ``m3gnet`` 0.2.4, the paper's surrogate) as a worker process.

Runs under the TensorFlow venv's python (``make tf-m3gnet``: ``.venv-m3gnet-tf/bin/python``), never
in the project's venv, and imports nothing from the project.
:mod:`lib.surrogates.m3gnet_tf_client` starts it and speaks to it; anything else may too::

    .venv-m3gnet-tf/bin/python lib/workers/m3gnet_tf_worker.py --weights <dir> [--threads N]

``<dir>`` is the model folder (``m3gnet.json``, ``m3gnet.index``, ``m3gnet.data-*``), loaded with
``m3gnet.models.M3GNet.from_dir`` (nothing is downloaded).

Protocol: JSON, one object per line. stdout carries the protocol only (anything else the libraries
print goes to stderr). After loading the model the worker writes one line::

    {"ready": true, "versions": {...}, "weights": "<dir>", "supported_elements": [...], ...}

or ``{"ready": false, "error": "..."}`` and exits with status 2. Then it answers each request line
with one response line, in order, until ``{"op": "shutdown"}`` or end of input.

A structure is ``{"lattice": 3x3 (rows = lattice vectors, Å), "species": ["Ba", ...],
"frac_coords": n x 3}``. Requests (``id`` is echoed back):

- ``{"id": 1, "op": "predict", "structures": [...], "energy_only": false, "batch_size": 32}``:
  single points, ``batch_size`` structures per forward pass. Each result: ``energy_ev`` (eV per
  cell), ``forces_ev_per_a`` (n x 3, eV/Å), ``stress_ev_per_a3`` (6, ASE Voigt order
  xx yy zz yz xz xy and ASE sign: m3gnet's GPa divided by 160.21766208, as its ASE calculator
  gives them), ``n_atoms``, ``error``. Forces and stress are ``null`` when ``energy_only``.
- ``{"id": 2, "op": "relax", "structures": [...], "fmax": 0.1, "steps": 500, "relax_cell": true,
  "optimizer": "FIRE", "stress_weight": 0.01}``: m3gnet's own relaxation, as
  ``m3gnet.models.Relaxer`` does it (an ASE calculator equal to its ``M3GNetCalculator`` with
  ``stress_weight`` times the GPa stress, ASE 3.22's ``ExpCellFilter`` when ``relax_cell``, an
  optimiser of m3gnet's ``OPTIMIZERS``), one structure at a time. The defaults are the Relaxer's,
  the paper's way; the final energies and step counts equal the Relaxer's. Each result: the final ``lattice``, ``species``,
  ``frac_coords``; ``energy_ev``, ``forces_ev_per_a``, ``stress_ev_per_a3`` at the final
  structure (as ``predict``); ``initial_energy_ev``, ``trajectory_energies_ev``, ``steps``,
  ``converged`` (ASE's verdict), ``max_force_ev_per_a`` (largest force the optimiser saw at the
  end, the cell's generalised forces included), ``seconds``, ``error``.
- ``{"id": 3, "op": "ping"}``; ``{"op": "shutdown"}``.

Response: ``{"id": ..., "ok": true, "results": [...], "seconds": ...}``, one result per input
structure in order. A structure that fails gets a result with ``error`` set (a string) and
``null`` values; the rest of the batch proceeds. A request that cannot be read at all gets
``{"id": ..., "ok": false, "error": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Any

#: 1 GPa in eV/Å³ is 1/GPA_PER_EV_PER_A3 (ase.units.GPa); m3gnet reports stress in GPa.
GPA_PER_EV_PER_A3 = 160.21766208
#: Two sites closer than this (Å, periodic) make a structure invalid input.
MIN_SITE_DISTANCE_A = 0.1
PROTOCOL_VERSION = 1


class InputError(ValueError):
    """A structure the worker cannot evaluate."""


class Worker:
    def __init__(self, weights: str, threads: int | None) -> None:
        import numpy as np
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        import ase
        import m3gnet
        import pymatgen.core
        from ase import Atoms
        from m3gnet.graph import assemble_material_graph
        from m3gnet.models import M3GNet, Potential
        from m3gnet.models._dynamics import OPTIMIZERS
        from pymatgen.core.periodic_table import Element

        self.np = np
        self.Atoms = Atoms
        self.assemble = assemble_material_graph
        self.optimizers = OPTIMIZERS
        self.model = M3GNet.from_dir(weights)
        self.potential = Potential(model=self.model)
        self._compile(tf)
        n_types = int(self.model.n_atom_types)
        self.supported = {Element.from_Z(z).symbol for z in range(1, n_types + 1)}
        self.info = {
            "ready": True,
            "protocol": PROTOCOL_VERSION,
            "weights": os.path.abspath(weights),
            "versions": {
                "m3gnet": getattr(m3gnet, "__version__", "unknown"),
                "tensorflow": tf.__version__,
                "numpy": np.__version__,
                "pymatgen": _dist_version("pymatgen", getattr(pymatgen.core, "__version__", "unknown")),
                "ase": ase.__version__,
                "python": sys.version.split()[0],
            },
            "cutoff": float(self.model.graph_converter.cutoff),
            "threebody_cutoff": float(self.model.graph_converter.threebody_cutoff),
            "supported_elements": sorted(self.supported, key=lambda s: Element(s).Z),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        }

    # the model as TensorFlow functions ----------------------------------------------------
    def _compile(self, tf) -> None:
        """Trace the model once for every graph size.

        m3gnet's own ``Potential.get_efs_tensor`` is a ``tf.function`` with relaxed shapes: it
        is traced again for the first few new shapes (one structure, then another size, then a
        batch), about 10-25 s each on a CPU. Here the same Python functions are wrapped with an
        input signature whose leading dimensions are ``None``, so one trace serves every
        structure and batch. A graph whose layout differs from the template (other fields
        ``None``, other dtypes) goes through m3gnet's own functions.
        """
        template = self._graph_list([_template_atoms(self.Atoms)])
        self._present = [i for i, x in enumerate(template) if x is not None]
        self._layout = [(None if x is None else x.dtype) for x in template]
        specs = [tf.TensorSpec([None, *template[i].shape[1:]], template[i].dtype) for i in self._present]
        cls = type(self.potential)
        efs_py = cls.get_efs_tensor.python_function
        energies_py = cls.get_energies.python_function
        potential, n_fields, present = self.potential, len(template), self._present

        def unpack(tensors):
            graph = [None] * n_fields
            for i, t in zip(present, tensors, strict=True):
                graph[i] = t
            return graph

        self._efs_fn = tf.function(lambda *t: efs_py(potential, unpack(t), True), input_signature=specs)
        self._energies_fn = tf.function(lambda *t: energies_py(potential, unpack(t)),
                                        input_signature=specs)
        self.model(template)  # build the layers eagerly (tracing with unknown sizes cannot)
        self._efs(template)  # the one trace, now rather than in the first request

    def _graph_list(self, atoms_list: list) -> list:
        graphs = [self.potential.graph_converter(a) for a in atoms_list]
        # always assembled, one structure too: the same layout for every batch size
        return self.assemble(graphs).as_tf().as_list()

    def _model_input(self, atoms_list: list) -> list:
        """The graph list of ``atoms_list`` for the model. m3gnet 0.2.4 fails on a batch with no
        three-body term at all (its spherical-harmonics layer gets empty tensors;
        materialyzeai/m3gnet#64), e.g. bcc Ba at its experimental volume (neighbours 4.35 A
        apart, beyond the 4 A three-body cutoff). The model itself handles such a structure: the
        batch's graphs are disjoint, so the trace template is appended as a carrier and its
        outputs, the last ones, are never read (Ba's energy is the same to 1e-7 eV/atom with two
        different carriers)."""
        from m3gnet.graph import Index

        graph_list = self._graph_list(atoms_list)
        triples = graph_list[Index.TRIPLE_BOND_INDICES]
        if triples is not None and int(triples.shape[0]) == 0:
            return self._graph_list([*atoms_list, _template_atoms(self.Atoms)])
        return graph_list

    def _fits(self, graph_list: list) -> bool:
        return [(None if x is None else x.dtype) for x in graph_list] == self._layout

    def _efs(self, graph_list: list):
        """energies (n, 1), forces (atoms, 3), stresses (n, 3, 3) in GPa, ASE sign."""
        if self._fits(graph_list):
            return self._efs_fn(*[graph_list[i] for i in self._present])
        return self.potential.get_efs_tensor(graph_list, include_stresses=True)

    def _energies(self, graph_list: list):
        if self._fits(graph_list):
            return self._energies_fn(*[graph_list[i] for i in self._present])
        return self.potential.get_energies(graph_list)

    # input ---------------------------------------------------------------------------------
    def atoms(self, s: object):
        """ase Atoms of one request structure (:class:`InputError` naming what is wrong)."""
        np = self.np
        if not isinstance(s, dict):
            raise InputError(f"a structure must be an object, got {type(s).__name__}")
        missing = [k for k in ("lattice", "species", "frac_coords") if k not in s]
        if missing:
            raise InputError(f"structure lacks {', '.join(missing)}")
        try:
            lattice = np.asarray(s["lattice"], dtype=np.float64)
            frac = np.asarray(s["frac_coords"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"lattice/frac_coords are not numeric arrays ({exc})") from None
        species = s["species"]
        if lattice.shape != (3, 3):
            raise InputError(f"lattice must be 3x3, got shape {lattice.shape}")
        if not isinstance(species, list) or not all(isinstance(x, str) for x in species):
            raise InputError("species must be a list of element symbols")
        if len(species) == 0:
            raise InputError("structure has no sites")
        if frac.shape != (len(species), 3):
            raise InputError(f"frac_coords must be {len(species)} x 3, got shape {frac.shape}")
        if not (np.all(np.isfinite(lattice)) and np.all(np.isfinite(frac))):
            raise InputError("non-finite lattice or coordinates")
        bad = sorted(set(species) - self.supported)
        if bad:
            raise InputError(f"element(s) {', '.join(bad)} not covered by the TensorFlow M3GNet "
                             f"(H to {max(self.supported, key=_z_of)})")
        volume = abs(float(np.linalg.det(lattice)))
        if volume < 1e-3:
            raise InputError(f"degenerate cell (volume {volume:.3g} Å^3)")
        atoms = self.Atoms(symbols=species, scaled_positions=frac, cell=lattice, pbc=True)
        if len(atoms) > 1:
            dmin = float(np.min(atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)]))
            if dmin < MIN_SITE_DISTANCE_A:
                raise InputError(f"overlapping sites ({dmin:.3g} Å apart, < {MIN_SITE_DISTANCE_A} Å)")
        return atoms

    # single points -------------------------------------------------------------------------
    def _forward(self, atoms_list: list, energy_only: bool) -> list[dict]:
        """One forward pass over ``atoms_list`` (raises when any of them fails)."""
        np = self.np
        graph_list = self._model_input(atoms_list)
        if energy_only:
            energies = self._energies(graph_list).numpy().ravel()[:len(atoms_list)]
            return [_single_point(float(e), None, None, len(a)) for e, a in zip(energies, atoms_list, strict=True)]
        e, f, s = self._efs(graph_list)
        energies = e.numpy().ravel()
        forces = f.numpy()
        stresses = s.numpy()
        out = []
        start = 0
        for i, a in enumerate(atoms_list):
            n = len(a)
            fi = np.asarray(forces[start:start + n], dtype=np.float64)
            start += n
            si = np.asarray(stresses[i], dtype=np.float64).reshape(3, 3)
            voigt = np.array([si[0, 0], si[1, 1], si[2, 2], si[1, 2], si[0, 2], si[0, 1]])
            out.append(_single_point(float(energies[i]), fi.tolist(),
                                     (voigt / GPA_PER_EV_PER_A3).tolist(), n))
        return out

    def _forward_isolating(self, atoms_list: list, energy_only: bool) -> list[dict]:
        """:meth:`_forward`; when the batch fails, each structure alone so only the bad one fails."""
        try:
            results = self._forward(atoms_list, energy_only)
        except Exception:  # find the structure that fails
            if len(atoms_list) == 1:
                raise
            results = []
            for a in atoms_list:
                try:
                    results.extend(self._forward([a], energy_only))
                except Exception as exc:  # noqa: BLE001
                    results.append(_failed(len(a), _describe(exc)))
        return [r if r["error"] is not None or math.isfinite(r["energy_ev"])
                else _failed(r["n_atoms"], "model returned a non-finite energy") for r in results]

    def predict(self, req: dict) -> list[dict]:
        structures = _structures(req)
        energy_only = bool(req.get("energy_only", False))
        batch_size = int(req.get("batch_size", 32))
        if batch_size < 1:
            raise InputError("batch_size must be >= 1")
        out: list[dict | None] = [None] * len(structures)
        valid: list[tuple[int, Any]] = []
        for i, s in enumerate(structures):
            try:
                valid.append((i, self.atoms(s)))
            except InputError as exc:
                out[i] = _failed(_n_sites(s), str(exc))
        for start in range(0, len(valid), batch_size):
            chunk = valid[start:start + batch_size]
            try:
                results = self._forward_isolating([a for _, a in chunk], energy_only)
            except Exception as exc:  # noqa: BLE001 -- a one-structure chunk that failed
                results = [_failed(len(chunk[0][1]), _describe(exc))]
            for (i, _), r in zip(chunk, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    # relaxation ----------------------------------------------------------------------------
    def calculator(self, stress_weight: float):
        """An ASE calculator as m3gnet's ``M3GNetCalculator(potential, stress_weight=...)``
        (energy eV, forces eV/Å, stress ``stress_weight`` x GPa) on the once-traced model."""
        from ase.calculators.calculator import Calculator, all_changes

        worker = self

        class _Calculator(Calculator):
            implemented_properties = ["energy", "free_energy", "forces", "stress"]  # noqa: RUF012

            def calculate(self, atoms=None, properties=None, system_changes=all_changes):
                super().calculate(atoms, properties or ["energy"], system_changes)
                e, f, s = worker._efs(worker._model_input([self.atoms]))
                energy = float(e.numpy().ravel()[0])
                forces = f.numpy()[:len(self.atoms)]  # a carrier's atoms come last
                self.results.update(energy=energy, free_energy=energy,
                                    forces=worker.np.asarray(forces, dtype=worker.np.float64),
                                    stress=s.numpy()[0] * stress_weight)

        return _Calculator()

    def relax(self, req: dict) -> list[dict]:
        import importlib

        # ase 3.22 (this worker's) has it here; typed Any for checkers that see a newer ase
        constraints: Any = importlib.import_module("ase.constraints")
        ExpCellFilter = constraints.ExpCellFilter

        structures = _structures(req)
        fmax = float(req.get("fmax", 0.1))
        steps = int(req.get("steps", 500))
        relax_cell = bool(req.get("relax_cell", True))
        optimizer = str(req.get("optimizer", "FIRE"))
        stress_weight = float(req.get("stress_weight", 0.01))
        if optimizer not in self.optimizers:
            raise InputError(f"unknown optimizer {optimizer!r} (known: {', '.join(self.optimizers)})")
        if not (fmax > 0 and steps >= 0):
            raise InputError("fmax must be > 0 and steps >= 0")
        np = self.np
        out = []
        for s in structures:
            t0 = time.perf_counter()
            try:
                atoms = self.atoms(s)
            except InputError as exc:
                out.append(_failed_relax(s, str(exc)))
                continue
            try:
                atoms.calc = self.calculator(stress_weight)
                initial = float(atoms.get_potential_energy())
                target = ExpCellFilter(atoms) if relax_cell else atoms
                opt = self.optimizers[optimizer](target, logfile=None)
                energies: list[float] = []
                opt.attach(lambda a=atoms, e=energies: e.append(float(a.get_potential_energy())))
                converged = bool(opt.run(fmax=fmax, steps=steps))
                f_opt = np.asarray(target.get_forces(), dtype=np.float64)
                max_force = float(np.sqrt((f_opt ** 2).sum(axis=1).max())) if len(f_opt) else 0.0
                final = self._forward([atoms.copy()], energy_only=False)[0]
                if not math.isfinite(final["energy_ev"]):
                    raise FloatingPointError("model returned a non-finite energy")
                res = dict(final)
                res.update(
                    lattice=np.asarray(atoms.cell[:], dtype=np.float64).tolist(),
                    species=list(atoms.get_chemical_symbols()),
                    frac_coords=np.asarray(atoms.get_scaled_positions(wrap=False)).tolist(),
                    initial_energy_ev=initial,
                    trajectory_energies_ev=energies,
                    steps=int(opt.nsteps),
                    converged=converged,
                    max_force_ev_per_a=max_force,
                    seconds=time.perf_counter() - t0,
                    error=None,
                )
                out.append(res)
            except Exception as exc:  # noqa: BLE001 -- one structure fails, the rest go on
                out.append(_failed_relax(s, _describe(exc), seconds=time.perf_counter() - t0))
        return out


# helpers ------------------------------------------------------------------------------------


def _z_of(symbol: str) -> int:
    from pymatgen.core.periodic_table import Element

    return Element(symbol).Z


def _template_atoms(atoms_cls):
    """A small rock-salt cell (bonds and three-body terms) to trace the model with."""
    a = 5.64
    frac = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0],
            [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]
    return atoms_cls(symbols=["Na"] * 4 + ["Cl"] * 4, scaled_positions=frac,
                     cell=[[a, 0, 0], [0, a, 0], [0, 0, a]], pbc=True)


def _dist_version(name: str, fallback: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return fallback


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _structures(req: dict) -> list:
    structures = req.get("structures")
    if not isinstance(structures, list):
        raise InputError("request needs 'structures', a list")
    return structures


def _n_sites(s: object) -> int:
    species = s.get("species") if isinstance(s, dict) else None
    return len(species) if isinstance(species, list) else 0


def _single_point(energy: float, forces: list | None, stress: list | None, n: int) -> dict:
    return {"energy_ev": energy, "forces_ev_per_a": forces, "stress_ev_per_a3": stress,
            "n_atoms": n, "error": None}


def _failed(n: int, reason: str) -> dict:
    return {"energy_ev": None, "forces_ev_per_a": None, "stress_ev_per_a3": None,
            "n_atoms": n, "error": reason}


def _failed_relax(s: object, reason: str, seconds: float = 0.0) -> dict:
    res = _failed(_n_sites(s), reason)
    res.update(lattice=None, species=None, frac_coords=None, initial_energy_ev=None,
               trajectory_energies_ev=[], steps=0, converged=False, max_force_ev_per_a=None,
               seconds=seconds)
    return res


def _finite_or_none(obj):
    """JSON has no NaN/Infinity: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_finite_or_none(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TensorFlow M3GNet worker (JSON lines on stdin/stdout)")
    parser.add_argument("--weights", required=True, help="model folder (m3gnet.json, m3gnet.index, ...)")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: its default)")
    args = parser.parse_args(argv)

    # stdout is the protocol channel: keep a private handle on it and send everything else
    # (TensorFlow's and the libraries' prints) to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # This process's own settings (written, never read), before TensorFlow and numpy load:
    # TensorFlow's C++ logs at warnings and up; BLAS on one thread, since the relaxations' 3x3
    # algebra (ExpCellFilter's expm/logm) is otherwise slowed by thread start-up and contention
    # (TensorFlow uses its own thread pools, set by --threads).
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

    def send(obj: dict) -> None:
        proto.write(json.dumps(_finite_or_none(obj), allow_nan=False) + "\n")
        proto.flush()

    try:
        for name in ("m3gnet.json", "m3gnet.index"):
            if not os.path.isfile(os.path.join(args.weights, name)):
                raise FileNotFoundError(f"{args.weights}: no {name} (not a TensorFlow M3GNet model folder)")
        worker = Worker(args.weights, args.threads or None)
    except Exception as exc:  # noqa: BLE001 -- report why the worker cannot start
        traceback.print_exc(file=sys.stderr)
        send({"ready": False, "error": _describe(exc)})
        return 2
    send(worker.info)

    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.perf_counter()
        rid = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise InputError("a request must be a JSON object")
            rid = req.get("id")
            op = req.get("op")
            if op == "shutdown":
                send({"id": rid, "ok": True, "results": [], "seconds": 0.0})
                return 0
            if op == "ping":
                results: list = []
            elif op == "predict":
                results = worker.predict(req)
            elif op == "relax":
                results = worker.relax(req)
            else:
                raise InputError(f"unknown op {op!r} (predict, relax, ping, shutdown)")
            send({"id": rid, "ok": True, "results": results, "seconds": time.perf_counter() - t0})
        except Exception as exc:  # noqa: BLE001 -- a bad request must not end the worker
            traceback.print_exc(file=sys.stderr)
            send({"id": rid, "ok": False, "error": _describe(exc)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
