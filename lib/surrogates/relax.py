"""The relaxation driver: ASE optimisers, the cell filter, and lockstep relaxation of many structures.

:func:`relax_one` relaxes one structure through an ASE calculator (the model library's own, the
paper's way); :func:`relax_many` relaxes many in lockstep, each optimiser step's energies,
forces and stresses of all running structures from one batched forward pass of a
:class:`BatchPredictor` (a :class:`lib.surrogates.base.Surrogate`). Both run an ASE optimiser of :data:`OPTIMIZERS`,
the cell through :func:`cell_filter` (ASE's ``FrechetCellFilter``, the same numbers for less
work), with BLAS held to one thread (tiny matrices). With ``fix_symmetry`` the structure keeps
its space group (ASE's ``FixSymmetry`` constraint at ``symprec``: forces, stress and every step
symmetrised, as MP-style workflows relax), :func:`symmetry_constraint`.

This module imports nothing from the rest of the package: the surrogate is duck-typed
(:class:`BatchPredictor`), so any model family relaxes through the same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

#: ASE optimisers a relaxation can use (``ase.optimize`` classes of these names): FIRE (the
#: default: MP-style, robust far from a minimum), FIRE2 (Guénolé et al. 2020's corrected FIRE:
#: half-step velocity mixing and an inertia correction), BFGS and LBFGS (quasi-Newton, fewer
#: steps near a minimum; no line search, so every step is one forward pass).
Optimizer = Literal["FIRE", "FIRE2", "BFGS", "LBFGS"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


@dataclass(frozen=True)
class RelaxResult:
    """Outcome of :meth:`Surrogate.relax` / :meth:`Surrogate.relax_many`."""

    structure: Structure
    energy_ev: float
    is_converged: bool
    steps: int
    max_force_ev_per_a: float
    initial_energy_ev: float
    optimizer: str
    trajectory_energies_ev: list[float] = field(default_factory=list)
    #: why this relaxation failed (:meth:`Surrogate.relax_many` reports a failure per structure
    #: instead of raising); ``structure`` is then the last structure reached and the energies NaN
    error: str | None = None
    #: compute time spent on this structure (its share of each batched forward pass plus its
    #: own optimiser work in :meth:`Surrogate.relax_many`; wall time in :meth:`Surrogate.relax`)
    seconds: float = math.nan
    #: forces (n, 3, eV/Å) and stress (6, eV/Å³, ASE Voigt and sign) of a single point at
    #: ``structure``, when the relaxation reports them (m3gnet's own loop,
    #: :meth:`lib.surrogates.m3gnet_tf_client.M3GNetTFClient.relax`); ``None`` from this
    #: module's drivers, whose results keep only ``max_force_ev_per_a``
    forces_ev_per_a: np.ndarray | None = field(default=None, compare=False, repr=False)
    stress_ev_per_a3: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def energy_per_atom_ev(self) -> float:
        return self.energy_ev / len(self.structure)


class BatchPredictor(Protocol):
    """What :func:`relax_many` needs of a surrogate."""

    def check_structure(self, structure: Structure) -> str | None: ...

    def predict_unchecked(self, structures: Sequence[Structure], *, batch_size: int,
                          energy_only: bool, batch_atoms: int = 0) -> list[Any]: ...


class _RelaxStepError(RuntimeError):
    """The batched forward pass failed for one structure of a :func:`relax_many` step."""


def failed_relax(structure: Any, reason: str, optimizer: str) -> RelaxResult:
    """A :class:`RelaxResult` for a structure that could not be relaxed (energies NaN)."""
    return RelaxResult(structure=structure, energy_ev=math.nan, is_converged=False, steps=0,
                       max_force_ev_per_a=math.nan, initial_energy_ev=math.nan, optimizer=optimizer,
                       error=reason)


def check_optimizer(optimizer: str) -> None:
    """Raise ``ValueError`` naming :data:`OPTIMIZERS` unless ``optimizer`` is one of them."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")


def _optimizer_class(optimizer: str) -> type:
    import ase.optimize

    check_optimizer(optimizer)
    return getattr(ase.optimize, optimizer)


#: Å, spglib tolerance of the ``FixSymmetry`` constraint: the symmetry a structure keeps. Generated
#: candidates are exactly symmetric in their template's space group, so a tight tolerance finds it
#: and nothing higher that a loose one would impose (ASE's own default is 0.01).
DEFAULT_FIX_SYMPREC = 1e-3


def symmetry_constraint(atoms: Any, *, symprec: float = DEFAULT_FIX_SYMPREC) -> Any:
    """ASE's ``FixSymmetry`` for ``atoms`` at ``symprec`` (Å), set on the atoms and returned.

    Its constructor first refines ``atoms`` to the exact symmetry spglib finds at ``symprec``
    (moves of at most ~``symprec``; none for an exactly symmetric candidate); from then on the
    forces, the stress and each optimiser step (positions, and the cell through the cell
    filter's ``set_cell``) are symmetrised over that space group's operations, so the relaxed
    structure keeps it. A distortion that lowers the symmetry is out of reach (the price)."""
    from ase.constraints import FixSymmetry

    if not symprec > 0:
        raise ValueError(f"symprec must be > 0 Å, got {symprec!r}")
    constraint = FixSymmetry(atoms, symprec=symprec)
    atoms.set_constraint(constraint)
    return constraint


def _max_force(forces: np.ndarray) -> float:
    return float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0


def blas_one_thread() -> Any:
    """A context limiting BLAS (OpenBLAS/MKL of numpy and scipy) to one thread.

    A relaxation's linear algebra is on 3x3 and 9x9 matrices (the cell filter's matrix
    exponentials, FIRE's vectors), where BLAS threads never help; on a busy machine they spin:
    measured here on 2 loaded cores, a 9x9 ``lu_solve`` took 5 ms with 2 OpenBLAS threads and
    0.1 ms with 1. ``threadpoolctl`` comes with scikit-learn; without it nothing is limited.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a slim install without scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


_CACHED_FRECHET_FILTER: type | None = None


def cell_filter_class() -> type:
    """``FrechetCellFilter`` with the same numbers for less work (built on first use).

    ASE's filter (3.29) is the costliest part of a relaxation step after the model: its
    optimisers ask it for forces three times a step (log, convergence check, step), each call
    evaluating ``scipy.linalg.logm`` once and ``scipy.linalg.expm_frechet`` nine times, and
    ``get_positions`` evaluates another ``logm``. The subclass

    1. keeps the forces of the current state (positions, cell, calculator results);
    2. gets the nine directional derivatives from one ``expm_frechet``: ASE sums
       ``L(A, E_mn) * G`` over the 3x3 entries for each unit direction ``E_mn``, which is entry
       ``(m, n)`` of ``L(A^T, G)`` (the Fréchet derivative of the exponential is self-adjoint up
       to the transpose of ``A``);
    3. takes ``logm`` of the deformation gradient ``F`` once per state: ``get_positions`` needs
       ``logm(n F) = log(n) I + logm(F)``.

    Positions and forces agree with ASE's to ~1e-13 (a test checks); a filter with a mask,
    hydrostatic strain or constant volume uses ASE's force code.
    """
    global _CACHED_FRECHET_FILTER
    if _CACHED_FRECHET_FILTER is not None:
        return _CACHED_FRECHET_FILTER
    from ase.filters import FrechetCellFilter
    from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

    class CachedFrechetCellFilter(FrechetCellFilter):
        _forces_key: Any = None
        _forces_value: Any = None
        _logm_key: Any = None
        _logm_value: Any = None

        def _plain(self) -> bool:
            u = self._utility
            return not (u.hydrostatic_strain or u.constant_volume or (u.mask3x3 != 1.0).any())

        def _logm_deform(self, deform: np.ndarray) -> np.ndarray:
            key = deform.tobytes()
            if key != self._logm_key:
                self._logm_value = self._utility.logm(deform)
                self._logm_key = key
            return self._logm_value

        def get_positions(self) -> np.ndarray:
            positions = self.atoms.get_positions()
            n = len(positions)
            deform = self._utility.deform_grad(self.atoms.get_cell())
            pos = np.zeros((n + 3, 3))
            pos[:n] = np.linalg.solve(deform, positions.T).T
            pos[n:] = (np.log(float(n)) * np.eye(3) + self._logm_deform(deform)) * self.exp_cell_factor
            return pos

        def get_forces(self, **kwargs: Any) -> np.ndarray:
            calc = self.atoms.calc
            key = (self.atoms.positions.tobytes(), self.atoms.cell.array.tobytes(),
                   id(calc), id(getattr(calc, "results", None)), tuple(sorted(kwargs.items())))
            if key != self._forces_key:
                if self._plain():
                    self._forces_value = self._frechet_forces(**kwargs)
                else:
                    self._forces_value = (super().get_forces(**kwargs), self.stress)
                self._forces_key = key
            forces, self.stress = self._forces_value
            return forces.copy()

        def _frechet_forces(self, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
            u = self._utility
            stress = self.atoms.get_stress(**kwargs)
            atoms_forces = self.atoms.get_forces(**kwargs)
            cell = self.atoms.get_cell()
            volume = cell.volume
            virial = -volume * (voigt_6_to_full_3x3_stress(stress) + np.diag([u.scalar_pressure] * 3))
            deform = u.deform_grad(cell)
            ucf_cell_grad = virial @ np.linalg.inv(deform.T)
            log_force = u.expm_frechet(self._logm_deform(deform).T, ucf_cell_grad, compute_expm=False)
            n = len(atoms_forces)
            forces = np.zeros((n + 3, 3))
            forces[:n] = atoms_forces @ deform
            forces[n:] = log_force / self.exp_cell_factor
            return forces, full_3x3_to_voigt_6_stress(-(virial / volume))

    _CACHED_FRECHET_FILTER = CachedFrechetCellFilter
    return CachedFrechetCellFilter


def cell_filter(atoms: Any) -> Any:
    """The cell filter of the relaxations: ASE's ``FrechetCellFilter`` computing the same
    numbers with less work (:func:`cell_filter_class`)."""
    return cell_filter_class()(atoms)


def atoms_to_structure(atoms: Any) -> Structure:
    """A pymatgen Structure of an ASE Atoms (Cartesian positions as they are, not wrapped)."""
    from pymatgen.core import Lattice
    from pymatgen.core import Structure as PmgStructure

    return PmgStructure(Lattice(np.array(atoms.cell.array, dtype=float)), atoms.get_chemical_symbols(),
                        atoms.get_positions(), coords_are_cartesian=True)


_STORED_RESULTS_CALCULATOR: type | None = None


def stored_results_calculator() -> type:
    """The ASE calculator class of :func:`relax_many` (built on first use: no ASE import when
    this module loads)."""
    global _STORED_RESULTS_CALCULATOR
    if _STORED_RESULTS_CALCULATOR is not None:
        return _STORED_RESULTS_CALCULATOR
    from ase.calculators.calculator import Calculator, all_changes

    class StoredResultsCalculator(Calculator):
        """Results computed elsewhere (a batched forward pass) for one state of the atoms.

        :meth:`store` sets them; ASE's state check then serves them for exactly that state
        (positions, cell, numbers, pbc). Any other state is computed on demand through the
        surrogate, one structure, and counted in ``n_on_demand``.
        """

        implemented_properties = ["energy", "free_energy", "forces", "stress"]  # noqa: RUF012

        def __init__(self, surrogate: BatchPredictor) -> None:
            super().__init__()
            self.surrogate = surrogate
            self.n_on_demand = 0

        def store(self, atoms: Any, prediction: Any) -> None:
            self.atoms = atoms.copy()
            self.results = {
                "energy": float(prediction.energy_ev),
                "free_energy": float(prediction.energy_ev),
                "forces": np.array(prediction.forces_ev_per_a, dtype=np.float64),
                "stress": np.array(prediction.stress_ev_per_a3, dtype=np.float64),
            }

        def calculate(self, atoms: Any = None, properties: Any = None,
                      system_changes: Any = all_changes) -> None:
            super().calculate(atoms, properties or ["energy"], system_changes)
            self.n_on_demand += 1
            p = self.surrogate.predict_unchecked([atoms_to_structure(self.atoms)], batch_size=1,
                                                 energy_only=False)[0]
            if p.error is not None:
                raise _RelaxStepError(p.error)
            self.store(self.atoms, p)

    _STORED_RESULTS_CALCULATOR = StoredResultsCalculator
    return StoredResultsCalculator


def relax_one(
    calculator: Calculator,
    structure: Structure,
    *,
    fmax: float = 0.05,
    steps: int = 300,
    relax_cell: bool = True,
    optimizer: Optimizer = "FIRE",
    fix_symmetry: bool = False,
    symprec: float = DEFAULT_FIX_SYMPREC,
) -> RelaxResult:
    """Relax one structure through an ASE calculator (positions, and the cell through
    :func:`cell_filter` when ``relax_cell``; the space group kept when ``fix_symmetry``,
    :func:`symmetry_constraint` at ``symprec`` Å). ``is_converged`` is ASE's verdict (max force,
    including the cell's generalised forces, below ``fmax`` eV/Å within ``steps`` steps);
    ``seconds`` is the wall time."""
    from pymatgen.io.ase import AseAtomsAdaptor

    t0 = time.perf_counter()
    opt_cls = _optimizer_class(optimizer)
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = calculator
    with blas_one_thread():
        if fix_symmetry:
            symmetry_constraint(atoms, symprec=symprec)
        initial = float(atoms.get_potential_energy())
        target = cell_filter(atoms) if relax_cell else atoms
        opt = opt_cls(target, logfile=None)
        energies: list[float] = []
        opt.attach(lambda: energies.append(float(atoms.get_potential_energy())))
        converged = bool(opt.run(fmax=fmax, steps=steps))
        forces = target.get_forces()
    relaxed = atoms_to_structure(atoms)  # not AseAtomsAdaptor: it warns on a FixSymmetry constraint
    final = type(structure)(relaxed.lattice, relaxed.species, relaxed.frac_coords)
    return RelaxResult(
        structure=final,
        energy_ev=float(atoms.get_potential_energy()),
        is_converged=converged,
        steps=int(opt.nsteps),
        max_force_ev_per_a=_max_force(forces),
        initial_energy_ev=initial,
        optimizer=optimizer,
        trajectory_energies_ev=energies,
        seconds=time.perf_counter() - t0,
    )


class _Run:
    """One structure's relaxation in :func:`relax_many`: its atoms, calculator and optimiser."""

    def __init__(self, i: int, structure: Structure, surrogate: BatchPredictor, *, relax_cell: bool,
                 opt_cls: type, optimizer: str, fmax: float, steps: int, fix_symmetry: bool = False,
                 symprec: float = DEFAULT_FIX_SYMPREC) -> None:
        from pymatgen.io.ase import AseAtomsAdaptor

        self.i = i
        self.input = structure
        self.optimizer = optimizer
        self.atoms = AseAtomsAdaptor.get_atoms(structure)
        if fix_symmetry:
            symmetry_constraint(self.atoms, symprec=symprec)
        self.calc = stored_results_calculator()(surrogate)
        self.atoms.calc = self.calc
        self.target = cell_filter(self.atoms) if relax_cell else self.atoms
        self.opt = opt_cls(self.target, logfile=None)
        # what Optimizer.run(fmax, steps) sets before Dynamics.irun
        self.opt.fmax = fmax
        self.opt.max_steps = self.opt.nsteps + steps
        self.energies: list[float] = []
        self.opt.attach(lambda: self.energies.append(float(self.atoms.get_potential_energy())))
        self.initial = math.nan
        self.started = False
        self.converged = False
        self.seconds = 0.0

    def advance(self) -> bool:
        """One pass of ``Dynamics.irun``'s loop body from the convergence check on; the results
        for the current state are stored. True when finished."""
        opt = self.opt
        gradient = opt.optimizable.get_gradient()
        if not self.started:
            self.started = True
            self.initial = float(self.atoms.get_potential_energy())
            if opt.nsteps == 0:
                opt.log(gradient)
                opt.call_observers()
        else:
            opt.log(gradient)
            opt.call_observers()
        self.converged = bool(opt.gradient_converged(opt.optimizable.get_gradient()))
        if self.converged or opt.nsteps >= opt.max_steps:
            return True
        opt.step()
        opt.nsteps += 1
        return False

    def current_structure(self) -> Structure:
        relaxed = atoms_to_structure(self.atoms)  # not AseAtomsAdaptor: it warns on a FixSymmetry constraint
        return type(self.input)(relaxed.lattice, relaxed.species, relaxed.frac_coords)

    def result(self) -> RelaxResult:
        forces = self.target.get_forces()
        return RelaxResult(
            structure=self.current_structure(),
            energy_ev=float(self.atoms.get_potential_energy()),
            is_converged=self.converged,
            steps=int(self.opt.nsteps),
            max_force_ev_per_a=_max_force(forces),
            initial_energy_ev=self.initial,
            optimizer=self.optimizer,
            trajectory_energies_ev=self.energies,
            seconds=self.seconds,
        )

    def failed(self, reason: str) -> RelaxResult:
        try:
            current = self.current_structure()
        except Exception:  # noqa: BLE001 -- keep the input
            current = self.input
        return replace(failed_relax(current, f"step {self.opt.nsteps}: {reason}", self.optimizer),
                       steps=int(self.opt.nsteps), initial_energy_ev=self.initial,
                       trajectory_energies_ev=self.energies, seconds=self.seconds)


def relax_many(
    surrogate: BatchPredictor,
    structures: Sequence[Structure],
    *,
    fmax: float = 0.05,
    steps: int = 300,
    relax_cell: bool | Sequence[bool] = True,
    optimizer: Optimizer = "FIRE",
    batch_size: int = 32,
    fix_symmetry: bool | Sequence[bool] = False,
    symprec: float = DEFAULT_FIX_SYMPREC,
) -> tuple[list[RelaxResult], dict[str, Any]]:
    """Relax many structures in lockstep; (results in input order, counts of the run).

    The driver of :meth:`Surrogate.relax_many` (see there): each structure gets its own ASE
    optimiser, driven step by step as ``Optimizer.irun`` does, its energies, forces and stresses
    from one ``surrogate.predict_unchecked`` pass over all running structures per step.
    ``fix_symmetry`` (one flag for all, or one per structure) keeps a structure's space group
    (:func:`symmetry_constraint` at ``symprec`` Å).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    n = len(structures)
    cell_flags = ([bool(relax_cell)] * n if isinstance(relax_cell, bool | np.bool_)
                  else [bool(c) for c in relax_cell])
    if len(cell_flags) != n:
        raise ValueError(f"relax_cell has {len(cell_flags)} flags for {n} structures")
    sym_flags = ([bool(fix_symmetry)] * n if isinstance(fix_symmetry, bool | np.bool_)
                 else [bool(f) for f in fix_symmetry])
    if len(sym_flags) != n:
        raise ValueError(f"fix_symmetry has {len(sym_flags)} flags for {n} structures")
    if any(sym_flags) and not symprec > 0:
        raise ValueError(f"symprec must be > 0 Å, got {symprec!r}")
    opt_cls = _optimizer_class(optimizer)
    results: list[RelaxResult | None] = [None] * n
    queue: deque[int] = deque()
    for i, s in enumerate(structures):
        reason = surrogate.check_structure(s)
        if reason is None:
            queue.append(i)
        else:
            results[i] = failed_relax(s, reason, optimizer)

    def start(i: int) -> _Run:
        return _Run(i, structures[i], surrogate, relax_cell=cell_flags[i], opt_cls=opt_cls,
                    optimizer=optimizer, fmax=fmax, steps=steps, fix_symmetry=sym_flags[i], symprec=symprec)

    stats: dict[str, Any] = {"forward_passes": 0, "structure_evaluations": 0, "on_demand_evaluations": 0,
                             "max_structures_per_pass": 0, "seconds": 0.0}
    t_start = time.perf_counter()
    with blas_one_thread():
        _lockstep(surrogate, start, queue, results, structures, optimizer, batch_size, stats)
    stats["seconds"] = time.perf_counter() - t_start
    return [r for r in results if r is not None], stats


def _lockstep(surrogate: BatchPredictor, start: Any, queue: deque[int], results: list[RelaxResult | None],
              structures: Sequence[Structure], optimizer: str, batch_size: int,
              stats: dict[str, Any]) -> None:
    """The lockstep loop of :func:`relax_many` (fills ``results`` and ``stats``)."""
    active: list[_Run] = []
    while queue or active:
        while queue and len(active) < batch_size:
            i = queue.popleft()
            try:
                active.append(start(i))
            except Exception as exc:  # noqa: BLE001 -- reported per structure
                results[i] = failed_relax(structures[i], f"{type(exc).__name__}: {exc}", optimizer)
        if not active:
            continue
        t0 = time.perf_counter()
        preds = surrogate.predict_unchecked([atoms_to_structure(r.atoms) for r in active],
                                            batch_size=len(active), energy_only=False)
        share = (time.perf_counter() - t0) / len(active)
        stats["forward_passes"] += 1
        stats["structure_evaluations"] += len(active)
        stats["max_structures_per_pass"] = max(stats["max_structures_per_pass"], len(active))
        still: list[_Run] = []
        for r, p in zip(active, preds, strict=True):
            r.seconds += share
            t1 = time.perf_counter()
            try:
                if p.error is not None:
                    raise _RelaxStepError(p.error)
                r.calc.store(r.atoms, p)
                finished = r.advance()
                out = r.result() if finished else None
            except _RelaxStepError as exc:
                out = r.failed(str(exc))
            except Exception as exc:  # noqa: BLE001 -- reported per structure
                out = r.failed(f"{type(exc).__name__}: {exc}")
            r.seconds += time.perf_counter() - t1
            if out is None:
                still.append(r)
            else:
                results[r.i] = replace(out, seconds=r.seconds)
                stats["on_demand_evaluations"] += r.calc.n_on_demand
        active = still
