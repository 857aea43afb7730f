"""What every surrogate shares: its spec, its results, its errors and the :class:`Surrogate` base.

A model family (``m3gnet.py``, ``chgnet.py``, ...) subclasses :class:`Surrogate` (supported
elements, one batched forward pass, an ASE calculator) and describes itself with a
:class:`Family` (how its weights are found and loaded); ``registry.FAMILIES`` lists the
families. Input checks, batching with per-structure errors and relaxations
(:mod:`lib.surrogates.relax`) are the same for every family and live here.

This module imports no model library (torch, matgl, chgnet) and no family module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from lib.surrogates import relax as _relax
from lib.surrogates.relax import Optimizer, RelaxResult

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

__all__ = [
    "GPA_TO_EV_PER_A3", "MIN_SITE_DISTANCE_A", "Convention", "Family", "Optimizer", "Prediction",
    "RelaxResult", "StructureInputError", "Surrogate", "SurrogateError", "SurrogateKind",
    "SurrogateSpec", "failed_prediction", "predictions_to_frame", "surrogate_id", "voigt_from_3x3",
]

#: A model family's name: a key of ``lib.surrogates.registry.FAMILIES`` (``m3gnet``, ``chgnet``).
SurrogateKind = str
Convention = Literal["dgl-legacy", "native", "auto"]

#: 1 GPa in eV/Å³ (ase.units.GPa).
GPA_TO_EV_PER_A3 = 1.0 / 160.21766208
#: Two sites closer than this (Å, periodic) make a structure invalid input.
MIN_SITE_DISTANCE_A = 0.1


def batch_bounds(n_atoms: Sequence[int], *, batch_size: int, batch_atoms: int = 0) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches, in input order: at most ``batch_size`` structures
    and, when ``batch_atoms`` > 0, at most ``batch_atoms`` atoms each (a larger structure is a
    batch of its own). On CPU a batch of a fixed atom budget is faster than one of a fixed
    count: the pre-screen ran 176 / 244 structures/s with 256 atoms against 145 / 231 with 32
    structures, with 1 / 2 torch threads (M3GNet-MP, 600 Ba-Ru-O candidates,
    ``benchmarks/results/bench_prescreen.md``)."""
    bounds: list[tuple[int, int]] = []
    start, atoms = 0, 0
    for i, n in enumerate(n_atoms):
        full = i - start >= batch_size or (batch_atoms > 0 and i > start and atoms + n > batch_atoms)
        if full:
            bounds.append((start, i))
            start, atoms = i, 0
        atoms += n
    if start < len(n_atoms):
        bounds.append((start, len(n_atoms)))
    return bounds


class SurrogateError(ValueError):
    """A surrogate cannot be resolved or loaded (bad registry entry, missing weights, sha mismatch)."""


class StructureInputError(ValueError):
    """A structure the surrogate cannot evaluate; ``index`` is its position in the input list."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"structure {index}: {reason}")
        self.index = index
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateSpec:
    """One configured surrogate.

    ``weights``: where the family finds them: for ``m3gnet`` a matgl model folder
    (``model.json``, ``model.pt``, ``state.pt``); for ``chgnet`` a checkpoint file
    (``.pth.tar``) or ``chgnet:<version>`` for a checkpoint inside the chgnet wheel. ``None``
    when the entry's folder is not configured here (no ``models_dir``). ``sha256``: of the file
    that identifies the weights (:attr:`Family.weights_file`: ``state.pt`` for M3GNet, the
    checkpoint for CHGNet). ``convention`` (M3GNet only): ``dgl-legacy`` for weights trained with
    matgl's DGL implementation, ``native`` for matgl >= 3 weights, ``auto`` to decide from the
    files.
    """

    name: str
    kind: SurrogateKind
    weights: str | None
    sha256: str
    version: str
    convention: Convention = "auto"
    description: str = ""

    @property
    def surrogate_id(self) -> str:
        return surrogate_id(self)


def surrogate_id(spec: SurrogateSpec) -> str:
    """``sur-`` + the first 16 hex digits of the weights' sha256 (same weights, same id)."""
    if not spec.sha256:
        raise SurrogateError(f"surrogate {spec.name!r}: no sha256 known for its weights")
    return "sur-" + spec.sha256[:16]


@dataclass(frozen=True)
class Family:
    """A model family: what ``registry.FAMILIES`` needs to read, identify and load its weights.

    A new family is one module (a :class:`Surrogate` subclass and its ``FAMILY``) plus one entry
    in ``registry.FAMILIES``.
    """

    kind: SurrogateKind
    #: ``(spec, weights_file, device) -> Surrogate``; ``spec.sha256`` is already verified (a
    #: family that :attr:`runs_in_worker` also takes ``python=`` and ``threads=`` keywords)
    load: Callable[..., Surrogate]
    #: ``weights -> file``: the file whose sha256 identifies the weights (may import the model
    #: library for weights shipped inside its package)
    weights_file: Callable[[str], Path]
    #: ``path -> spec | None``: an ad-hoc spec for a weights folder/file of this family, ``None``
    #: when the path is not one (raise :class:`SurrogateError` when it looks like one but is bad)
    spec_from_path: Callable[[Path], SurrogateSpec | None]
    #: what such a folder/file is, for error messages ("a CHGNet checkpoint file")
    path_hint: str
    #: convention of a registry entry that gives none
    default_convention: Convention = "native"
    #: weights ``<prefix><version>`` name a checkpoint inside the family's package, not a path
    packaged_prefix: str = ""
    #: a registry entry without ``weights`` is the folder ``<models_dir>/<name>``
    weights_in_models_dir: bool = False
    #: the model runs in a worker process under another python (``load_surrogate(worker_python=)``)
    runs_in_worker: bool = False


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One structure's result. Arrays are NaN and ``error`` is set when it could not be evaluated.

    ``forces_ev_per_a`` (n, 3) and ``stress_ev_per_a3`` (6, ASE Voigt xx yy zz yz xz xy, ASE
    sign: positive = tensile) are ``None`` when only energies were asked for.
    """

    energy_ev: float
    forces_ev_per_a: np.ndarray | None
    stress_ev_per_a3: np.ndarray | None
    n_atoms: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def energy_per_atom_ev(self) -> float:
        return self.energy_ev / self.n_atoms if self.n_atoms else math.nan


def predictions_to_frame(predictions: Sequence[Prediction]) -> pl.DataFrame:
    """Columnar view of predictions: ``energy_ev``, ``energy_per_atom_ev``, ``n_atoms``,
    ``max_force_ev_per_a``, ``pressure_gpa`` (-trace/3 of stress), ``status`` (ok|error),
    ``error``; one row per prediction, in order."""
    energy = np.array([p.energy_ev for p in predictions], dtype=np.float64)
    n = np.array([p.n_atoms for p in predictions], dtype=np.int64)
    fmax = np.array(
        [
            float(np.abs(p.forces_ev_per_a).max()) if p.ok and p.forces_ev_per_a is not None
            and p.forces_ev_per_a.size else math.nan
            for p in predictions
        ],
        dtype=np.float64,
    )
    pressure = np.array(
        [
            -float(np.mean(p.stress_ev_per_a3[:3])) / GPA_TO_EV_PER_A3
            if p.stress_ev_per_a3 is not None else math.nan
            for p in predictions
        ],
        dtype=np.float64,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        epa = np.where(n > 0, energy / np.maximum(n, 1), np.nan)
    return pl.DataFrame(
        {
            "energy_ev": energy,
            "energy_per_atom_ev": epa,
            "n_atoms": n,
            "max_force_ev_per_a": fmax,
            "pressure_gpa": pressure,
            "status": ["ok" if p.ok else "error" for p in predictions],
            "error": [p.error for p in predictions],
        },
        schema={
            "energy_ev": pl.Float64, "energy_per_atom_ev": pl.Float64, "n_atoms": pl.Int64,
            "max_force_ev_per_a": pl.Float64, "pressure_gpa": pl.Float64,
            "status": pl.String, "error": pl.String,
        },
    )


def failed_prediction(n_atoms: int, reason: str, *, energy_only: bool) -> Prediction:
    """A :class:`Prediction` with ``error`` set and NaN values."""
    nan_f = None if energy_only else np.full((n_atoms, 3), np.nan)
    nan_s = None if energy_only else np.full(6, np.nan)
    return Prediction(math.nan, nan_f, nan_s, n_atoms, error=reason)


def voigt_from_3x3(stress: np.ndarray) -> np.ndarray:
    """3x3 stress -> ASE Voigt (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(stress, dtype=np.float64).reshape(3, 3)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


# --------------------------------------------------------------------------------------------
# Surrogate
# --------------------------------------------------------------------------------------------


class Surrogate:
    """A loaded surrogate. Build it with :func:`lib.surrogates.load_surrogate`.

    A family implements :attr:`supported_elements`, :meth:`_predict_batch` and
    :meth:`calculator`; the rest is shared.
    """

    kind: SurrogateKind

    def __init__(self, spec: SurrogateSpec, *, device: str, library_version: str) -> None:
        self.spec = spec
        self.device = device
        self.library_version = library_version
        #: counts of the last :meth:`relax_many` call
        self.last_relax_stats: dict[str, Any] = {}

    # identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weights_sha256(self) -> str:
        return self.spec.sha256

    @property
    def surrogate_id(self) -> str:
        return surrogate_id(self.spec)

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def convention(self) -> str:
        return self.spec.convention

    @property
    def supported_elements(self) -> frozenset[str]:
        raise NotImplementedError

    @property
    def torch_threads(self) -> int:
        """torch's intra-op CPU threads in this process now (see ``set_torch_threads``)."""
        import torch

        return int(torch.get_num_threads())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, id={self.surrogate_id!r}, "
                f"convention={self.convention!r}, device={self.device!r})")

    # input checks ---------------------------------------------------------------------------
    def check_structure(self, structure: Structure) -> str | None:
        """Why this structure cannot be evaluated, or ``None`` when it can."""
        from pymatgen.core import Structure as PmgStructure

        if not isinstance(structure, PmgStructure):
            return f"not a pymatgen Structure ({type(structure).__name__})"
        if len(structure) == 0:
            return "structure has no sites"
        if not structure.is_ordered:
            return "structure has partial occupancies"
        elements = {el.symbol for el in structure.composition.elements}
        missing = sorted(elements - set(self.supported_elements))
        if missing:
            return f"element(s) {', '.join(missing)} not covered by surrogate {self.name}"
        vol = structure.volume
        if not np.isfinite(vol) or vol < 1e-3:
            return f"degenerate cell (volume {vol:.3g} Å^3)"
        if not np.all(np.isfinite(structure.frac_coords)):
            return "non-finite coordinates"
        if len(structure) > 1:
            dm = np.array(structure.distance_matrix, dtype=float)
            np.fill_diagonal(dm, np.inf)
            dmin = float(dm.min())
            if dmin < MIN_SITE_DISTANCE_A:
                return f"overlapping sites ({dmin:.3g} Å apart, < {MIN_SITE_DISTANCE_A} Å)"
        return None

    # prediction -----------------------------------------------------------------------------
    def compile_energy_pass(self) -> bool:
        """Compile the model's energy-only forward pass (``torch.compile``) where the family
        supports it; ``True`` when it did. Forces, stresses and relaxations stay eager."""
        return False

    def _predict_batch(self, structures: list[Structure], *, energy_only: bool) -> list[Prediction]:
        """One forward pass of the model for ``structures`` (the family's part)."""
        raise NotImplementedError

    def predict_safe(
        self,
        structures: Sequence[Structure],
        *,
        batch_size: int = 32,
        energy_only: bool = False,
        batch_atoms: int = 0,
    ) -> list[Prediction]:
        """Predictions in input order; a structure that cannot be evaluated gets ``error`` set.

        Structures are checked first (elements covered, sites, cell); valid ones go through the
        model in batches of at most ``batch_size`` structures and, with ``batch_atoms`` > 0, at
        most that many atoms (:func:`batch_bounds`). When a whole batch fails, its structures are
        retried one by one so that only the offending structure carries the error.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if batch_atoms < 0:
            raise ValueError("batch_atoms must be >= 0 (0 = no atom budget)")
        out: list[Prediction | None] = [None] * len(structures)
        valid: list[int] = []
        for i, s in enumerate(structures):
            reason = self.check_structure(s)
            if reason is None:
                valid.append(i)
            else:
                out[i] = failed_prediction(len(s) if hasattr(s, "__len__") else 0, reason,
                                           energy_only=energy_only)
        preds = self.predict_unchecked([structures[i] for i in valid], batch_size=batch_size,
                                       energy_only=energy_only, batch_atoms=batch_atoms)
        for i, p in zip(valid, preds, strict=True):
            out[i] = p
        return [p for p in out if p is not None]

    def predict_unchecked(self, structures: Sequence[Structure], *, batch_size: int,
                          energy_only: bool, batch_atoms: int = 0) -> list[Prediction]:
        """:meth:`_predict_batch` over the batches of :func:`batch_bounds`, without input checks.

        When a whole batch fails, its structures are retried one by one so that only the
        offending structure carries the error; a non-finite energy is an error too.
        """
        out: list[Prediction] = []
        for start, stop in batch_bounds([len(s) for s in structures], batch_size=batch_size,
                                        batch_atoms=batch_atoms):
            batch = list(structures[start:stop])
            try:
                preds = self._predict_batch(batch, energy_only=energy_only)
            except Exception as exc:  # noqa: BLE001 -- isolate the structure that fails
                if len(batch) == 1:
                    preds = [failed_prediction(len(batch[0]), f"{type(exc).__name__}: {exc}",
                                               energy_only=energy_only)]
                else:
                    preds = []
                    for s in batch:
                        try:
                            preds.extend(self._predict_batch([s], energy_only=energy_only))
                        except Exception as exc1:  # noqa: BLE001 -- reported on its structure
                            preds.append(failed_prediction(len(s), f"{type(exc1).__name__}: {exc1}",
                                                           energy_only=energy_only))
            for p in preds:
                if p.ok and not np.isfinite(p.energy_ev):
                    p = replace(p, error="model returned a non-finite energy")
                out.append(p)
        return out

    def predict(
        self,
        structures: Sequence[Structure],
        *,
        batch_size: int = 32,
        energy_only: bool = False,
    ) -> list[Prediction]:
        """Energy (eV/cell), forces (eV/Å), stress (eV/Å³, ASE Voigt) for each structure.

        Raises :class:`StructureInputError` naming the first structure that cannot be evaluated;
        use :meth:`predict_safe` to get per-structure errors instead.
        """
        preds = self.predict_safe(structures, batch_size=batch_size, energy_only=energy_only)
        for i, p in enumerate(preds):
            if p.error is not None:
                raise StructureInputError(i, p.error)
        return preds

    # ASE ------------------------------------------------------------------------------------
    def calculator(self) -> Calculator:
        """The model library's own ASE calculator (energy eV, forces eV/Å, stress eV/Å³)."""
        raise NotImplementedError

    def relax(
        self,
        structure: Structure,
        *,
        fmax: float = 0.05,
        steps: int = 300,
        relax_cell: bool = True,
        optimizer: Optimizer = "FIRE",
        fix_symmetry: bool = False,
        symprec: float = _relax.DEFAULT_FIX_SYMPREC,
    ) -> RelaxResult:
        """Relax positions (and the cell, through ``FrechetCellFilter``) with an ASE optimiser.

        One structure through the model library's own ASE calculator (the paper's way);
        :meth:`relax_many` relaxes many structures with batched forward passes.
        ``is_converged`` is ASE's verdict (max force, including the cell's generalised forces,
        below ``fmax`` eV/Å within ``steps`` steps). ``fix_symmetry`` keeps the space group
        spglib finds at ``symprec`` Å (ASE's ``FixSymmetry``, :func:`lib.surrogates.relax.symmetry_constraint`).
        """
        t0 = time.perf_counter()
        reason = self.check_structure(structure)
        if reason is not None:
            raise StructureInputError(0, reason)
        result = _relax.relax_one(self.calculator(), structure, fmax=fmax, steps=steps,
                                  relax_cell=relax_cell, optimizer=optimizer,
                                  fix_symmetry=fix_symmetry, symprec=symprec)
        return replace(result, seconds=time.perf_counter() - t0)

    def relax_many(
        self,
        structures: Sequence[Structure],
        *,
        fmax: float = 0.05,
        steps: int = 300,
        relax_cell: bool | Sequence[bool] = True,
        optimizer: Optimizer = "FIRE",
        batch_size: int = 32,
        fix_symmetry: bool | Sequence[bool] = False,
        symprec: float = _relax.DEFAULT_FIX_SYMPREC,
    ) -> list[RelaxResult]:
        """Relax many structures in lockstep, one batched forward pass per optimiser step.

        Each structure gets its own ASE optimiser (``optimizer`` on ``FrechetCellFilter`` when
        ``relax_cell``, as :meth:`relax`), driven step by step exactly as ASE's
        ``Optimizer.irun`` does (log, observers, convergence check, ``step``); before each
        check the energies, forces and stresses of all running structures come from one
        :meth:`predict`-style forward pass and are handed to each structure's calculator. Up
        to ``batch_size`` structures run at once; a finished one (converged or out of steps)
        leaves and the next waiting structure takes its place. A state a forward pass did not
        cover (e.g. BFGS line searches, FIRE's optional downhill check) is computed on demand,
        one structure.

        ``relax_cell`` and ``fix_symmetry`` (keep the space group spglib finds at ``symprec``
        Å, ASE's ``FixSymmetry``): one flag for all, or one per structure. A structure the model cannot
        take, or one that fails mid-way (model error, non-finite energy), gets a
        :class:`RelaxResult` with ``error`` set; the others finish. Results are in input order
        and equal :meth:`relax` up to the float32 difference between batched and single-structure
        predictions (about 1e-6 eV/atom a step). ``last_relax_stats`` holds the counts of the
        last call (forward passes, structures per pass, on-demand evaluations).
        """
        results, stats = _relax.relax_many(self, structures, fmax=fmax, steps=steps,
                                           relax_cell=relax_cell, optimizer=optimizer,
                                           batch_size=batch_size, fix_symmetry=fix_symmetry,
                                           symprec=symprec)
        self.last_relax_stats = stats
        return results
