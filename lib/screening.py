"""Surrogate screening: pre-screen, relax, references + hull, shortlist; batched and spread on Ray.

The stages take and give polars frames. Structures travel in one of two compact forms:

* ASU form (``candidates`` / ``candidates_dedup``): ``spacegroup_number``, ``asu_letters``,
  ``asu_species``, ``asu_frac_coords``, ``a_a … gamma_deg`` (rebuilt by
  :func:`lib.cells.asu_to_structure`);
* cell form (``relaxed``, ``references``): ``lattice_matrix`` list[f64] (9, row vectors, Å),
  ``species`` list[str], ``frac_coords`` list[list[f64]].

Every function that computes takes a surrogate object (``lib.surrogates.Surrogate``:
``.predict``, ``.relax``, ``.name``, ``.weights_sha256``, ``.supported_elements``). A row that
cannot be computed (rebuild failure, an element the surrogate does not cover, a model error)
gets ``status = "error"`` and an ``error`` naming the row and the reason; the other rows proceed.

Tables (partition ``"<chemsys>|<surrogate>"``), each row with the lineage columns
:data:`LINEAGE_COLUMNS`:

* ``prescreen``: ``n_atoms``, ``energy_ev``, ``energy_per_atom_ev``, ``status``, ``error``,
  ``batch_id``.
* ``relaxed``: ``prescreen_energy_per_atom_ev``, the selection's ``static_*`` hull distance and
  ``selection_rank``, ``is_converged``, ``n_steps``, ``energy_ev``,
  ``energy_per_atom_ev``, ``lattice_matrix``, ``species``, ``frac_coords``, ``a_a … gamma_deg``,
  ``volume_a3``, ``spacegroup_number`` (input), ``spacegroup_number_relaxed`` (spglib,
  ``symprec`` 0.1), ``relax_seconds``, ``status``, ``error``, ``batch_id``.
  Defaults: ``fmax`` 0.05 eV/Å, 300 steps (FIRE, cell and positions) as in the paper.
* ``reference_energies`` (asset ``references``; ``references`` is reserved in SQL): one row per
  competing phase (``kind = "reference"``: ``phase_id`` such as ``mp-3597`` or ``ase-Ru``, its
  relaxed energy, ``formation_energy_per_atom_ev`` and ``e_above_hull_ev_per_atom``,
  ``is_elemental``). It is computed *before* the relaxations: ``relaxed`` selects its candidates
  by their static energy above this hull (``lib.selection``) and stores each relaxed cell's
  formation energy, energy above the hull and ``decomposition`` (:func:`relaxed_hull_columns`).
* ``phonons``: see :mod:`lib.phonons`.
* ``shortlist``: candidates ranked by ``e_above_hull_ev_per_atom`` then
  ``formation_energy_per_atom_ev``, with the phonon verdict (:func:`build_shortlist`), relaxed
  duplicates (:func:`mark_relaxed_duplicates`), known phases (``lib.novelty``) and charge balance
  (``lib.oxidation``); :func:`check_ranked_and_unique` states its order.

Resumability (:func:`run_batches`): work is cut into batches whose id is a content hash of the
candidate ids, the surrogate's weights hash, the stage settings and :data:`CODE_VERSION`. Each
finished batch is written at once to ``<work_dir>/<batch_id>.parquet`` (temp file +
``os.replace``), so a rerun skips finished batches; a batch whose Ray actor dies is re-submitted
(the actor restarts, ``max_restarts``) up to ``max_attempts`` times. Consolidation reads exactly
the planned batch files, so nothing is lost or counted twice.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from lib import contracts
from lib.cells import CELL_COLUMNS, MATCHER_TOLERANCES, frame_structures, structure_to_cell
from lib.ids import content_hash
from lib.surrogate_inputs import prepared_structures
from lib.wyckoff import LATTICE_COLUMNS

#: Bump when a change alters screening results (it is part of every batch id and every row).
CODE_VERSION = "screening-4"  # 2: batched lockstep relaxations (relax_many); 3: phonons on the symmetrised primitive
# cell; 4: relaxations keep the template's symmetry by default, at most 1,000 steps
LINEAGE_COLUMNS: tuple[str, ...] = (
    "candidate_id", "template_id", "checkpoint_id", "surrogate_name", "surrogate_sha256", "code_version",
)

#: Table written by the ``references`` asset. Not ``references``: that is a reserved word in
#: DuckDB's SQL, and the catalog's views are created with unquoted names.
REFERENCES_TABLE = "reference_energies"

DEFAULT_FMAX_EV_PER_A = 0.05
#: Step limit of a relaxation. 1,000, not the paper's 300: with the default symmetry-kept FIRE, 87 of
#: 88 real Ba-Ru-O candidates of 2-32 atoms converged within 1,000 steps (every size bin >= 95.8 %),
#: 83 within 300 (17-32 atoms: 87.0 %); the limit costs only the relaxations that need it (mean 100
#: steps) (benchmarks/results/relax_optimizers_by_size.md, docs/surrogates.md).
DEFAULT_RELAX_STEPS = 1000
DEFAULT_SYMPREC = 0.1
#: ASE optimiser of the relaxations. FIRE: with the symmetry kept it converged 87 of 88 real Ba-Ru-O
#: candidates within 1,000 steps (every size bin >= 95.8 %) and no ending moved with the batch; BFGS
#: under the same constraint converged 85 of 88 (17-32 atoms: 91.3 %) and 3 endings moved by more
#: than 0.01 eV/atom (benchmarks/results/relax_symmetric_optimizers.md). FIRE2 and LBFGS converge
#: less (benchmarks/results/relax_optimizers_by_size.md).
DEFAULT_OPTIMIZER = "FIRE"
#: Å, spglib tolerance of the symmetry a ``fix_symmetry`` relaxation keeps (ASE ``FixSymmetry``):
#: candidates are exactly symmetric in their template's space group by construction.
DEFAULT_FIX_SYMPREC = 1e-3  # = lib.surrogates.relax.DEFAULT_FIX_SYMPREC (not imported: no model import here)
#: Whether a relaxation keeps each structure's space group (``relax_frame(fix_symmetry=...)``, ASE
#: ``FixSymmetry``; the default of the ``relaxed``, ``references`` and ``consensus`` stages). On: a
#: template is exactly symmetric, so are its forces and stress, and every optimiser step keeps it in
#: its group; an unconstrained relaxation leaves the group only through the float32 noise of the
#: batched forces, which depends on the other structures of the batch. Run again with other
#: batch-mates, the unconstrained endings of 88 real Ba-Ru-O candidates moved by more than
#: 0.01 eV/atom in 9 (FIRE; BFGS 14; up to 0.63 eV/atom), the symmetry-kept ones in none
#: (benchmarks/results/relax_batch_sensitivity.md): an ending must be a property of its candidate.
#: Kept symmetry ends higher where the group's minimum is a saddle of the full energy surface; the
#: phonon screen names those (imaginary modes). ``fix_symmetry: false`` lets the noise break it.
DEFAULT_FIX_SYMMETRY = True
#: Smallest share of converged relaxations (of the rows that ran) the ``relaxed`` asset's
#: ``convergence_rate`` check accepts (a warning below it).
MIN_CONVERGENCE_RATE = 0.5


def store_partition(chemical_system: str, surrogate: str) -> str:
    """Store partition key of a screening table: ``"<chemsys>|<surrogate>"``."""
    return f"{chemical_system}|{surrogate}"


# --------------------------------------------------------------------------- prescreen
#: One pre-screen result (the first ``prescreen`` columns the compute gives).
PRESCREEN_SCHEMA = contracts.schema(
    "prescreen", only=("candidate_id", "n_atoms", "energy_ev", "energy_per_atom_ev", "volume_scale", "status", "error"))


def predict_energies(surrogate, structures: list[Any], *, batch_size: int = 32,
                     batch_atoms: int = 0) -> list[float | str]:
    """Energy (eV/cell) of each structure, batched (``Surrogate.predict_safe``, energies only:
    at most ``batch_size`` structures and, when > 0, ``batch_atoms`` atoms per forward pass).

    Entries that are error strings on input stay as they are; a structure the model fails on
    gets an error string, the others their energies.
    """
    idx = [i for i, s in enumerate(structures) if not isinstance(s, str)]
    out: list[float | str] = list(structures)
    if not idx:
        return out
    preds = surrogate.predict_safe([structures[i] for i in idx], batch_size=batch_size, energy_only=True,
                                   batch_atoms=batch_atoms)
    for i, p in zip(idx, preds, strict=True):
        if p.error is not None:
            out[i] = f"model error: {p.error}"
        elif not np.isfinite(p.energy_ev):
            out[i] = "model error: non-finite energy"
        else:
            out[i] = float(p.energy_ev)
    return out


#: The pre-screen's atom budget per forward pass on CPU (``batch_atoms``; measured best of 128 / 256 /
#: 512 atoms and 4-32 structures: benchmarks/results/bench_prescreen.md).
CPU_BATCH_ATOMS = 256


def default_batch_atoms(batch_atoms: int, *, device: str) -> int:
    """``batch_atoms`` as configured; -1 (by device) is :data:`CPU_BATCH_ATOMS` on CPU and 0 (no
    atom budget: ``batch_size`` alone) on an accelerator, where larger batches pay."""
    if batch_atoms >= 0:
        return batch_atoms
    if batch_atoms != -1:
        raise ValueError(f"batch_atoms must be -1 (by device), 0 (no budget) or a number of atoms, got {batch_atoms}")
    return CPU_BATCH_ATOMS if str(device).lower().startswith("cpu") else 0


def load_configured_surrogate(name: str, *, registry_path: str | None = None, models_dir: str | None = None,
                              device: str = "cpu", threads: int | None = None, cache: bool = False,
                              worker_python: str | None = None, compile_energy: bool = False):
    """``lib.surrogates.load_surrogate`` with the registry read from ``registry_path`` (the
    default loader of :class:`SurrogatePool`; its arguments are plain strings, so they travel to
    Ray actors). ``threads``: torch CPU threads (``None``: torch's setting stays); ``cache``: reuse
    a surrogate this process loaded from the same weights (sha256); ``worker_python``: the python
    of a surrogate that runs in its own environment (the TensorFlow M3GNet's venv);
    ``compile_energy``: ``torch.compile`` the energy-only pass (``Surrogate.compile_energy_pass``)."""
    from lib.surrogates import load_registry, load_surrogate

    registry = load_registry(registry_path or None, models_dir=models_dir or None)
    return load_surrogate(name, registry=registry, models_dir=models_dir or None, device=device,
                          threads=threads, cache=cache, worker_python=worker_python or None,
                          compile_energy=compile_energy)


def scaled_structure(structure: Any, scale: float | None) -> Any:
    """``structure`` with its cell scaled isotropically by the linear factor ``scale``
    (fractional coordinates kept; the structure itself for 1.0 or None)."""
    if scale is None or scale == 1.0:
        return structure
    out = structure.copy()
    out.scale_lattice(structure.volume * float(scale) ** 3)
    return out


#: The pre-screen's volume scan (``volume_scan``) evaluates the vertex of the parabola through the
#: scanned energies when it lies within the scanned range widened by this factor either side.
VOLUME_SCAN_REACH = 1.1


def check_volume_scan(volume_scan: Sequence[float]) -> tuple[float, ...]:
    """The sorted linear scale factors of a volume scan; () = off. ValueError for fewer than three
    distinct factors or a factor outside (0.5, 2)."""
    scan = tuple(sorted({float(f) for f in volume_scan}))
    if not scan:
        return ()
    if len(scan) < 3 or not all(0.5 < f < 2.0 for f in scan):
        raise ValueError(f"volume_scan needs at least 3 distinct linear scale factors in (0.5, 2), got "
                         f"{list(volume_scan)}")
    return scan


def _volume_scan_energies(surrogate, structures: list[Any], scan: tuple[float, ...], *,
                          batch_size: int, batch_atoms: int = 0) -> tuple[list[float | str], list[float | None]]:
    """(lowest energy, its scale) of every structure over the scan's scales plus the vertex of the
    parabola E(scale) through them (when convex and within :data:`VOLUME_SCAN_REACH` of the scan):
    ``len(scan) + 1`` batched static evaluations per structure. The parabolas of all rows come
    from one least-squares solve (rows with a failed scale are fitted on the scales that worked,
    when three or more did). An error string when every scale fails."""
    todo = [i for i, st in enumerate(structures) if not isinstance(st, str)]
    k = len(scan)
    flat = predict_energies(surrogate, [scaled_structure(structures[i], f) for i in todo for f in scan],
                            batch_size=batch_size, batch_atoms=batch_atoms)
    e = np.array([np.nan if isinstance(v, str) else v for v in flat], dtype=float).reshape(len(todo), k)
    f = np.broadcast_to(np.asarray(scan, dtype=float), e.shape)
    coef = np.full((len(todo), 3), np.nan)
    whole = np.isfinite(e).all(axis=1)
    if whole.any():  # every row with all scales evaluated: one solve
        coef[whole] = np.linalg.lstsq(np.vander(np.asarray(scan), 3), e[whole].T, rcond=None)[0].T
    for row in np.flatnonzero(~whole & (np.isfinite(e).sum(axis=1) >= 3)):  # rare: a scale failed
        ok = np.isfinite(e[row])
        coef[row] = np.polyfit(f[row][ok], e[row][ok], 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = -coef[:, 1] / (2 * coef[:, 0])
    fit = (coef[:, 0] > 0) & (vertex >= scan[0] / VOLUME_SCAN_REACH) & (vertex <= scan[-1] * VOLUME_SCAN_REACH)
    rows = np.flatnonzero(fit)
    refined = predict_energies(surrogate, [scaled_structure(structures[todo[j]], float(vertex[j])) for j in rows],
                               batch_size=batch_size, batch_atoms=batch_atoms)
    e = np.column_stack([e, np.full(len(todo), np.nan)])
    f = np.column_stack([f, np.where(fit, vertex, np.nan)])
    e[rows, k] = [np.nan if isinstance(v, str) else v for v in refined]
    has = np.isfinite(e).any(axis=1)
    best = np.argmin(np.where(np.isfinite(e), e, np.inf), axis=1)
    energies: list[float | str] = list(structures)
    scales: list[float | None] = [None] * len(structures)
    for r, i in enumerate(todo):
        if has[r]:
            energies[i], scales[i] = float(e[r, best[r]]), float(f[r, best[r]])
        else:
            energies[i] = str(flat[r * k])  # every scale failed: the first one's error
    return energies, scales


def prescreen_frame(surrogate, candidates: pl.DataFrame, *, batch_size: int = 32, batch_atoms: int = 0,
                    volume_scan: Sequence[float] = ()) -> pl.DataFrame:
    """Static energy of every candidate (ASU or cell form): :data:`PRESCREEN_SCHEMA` columns.

    With ``volume_scan`` (linear scale factors, e.g. 0.9, 1.0, 1.1; :func:`check_volume_scan`)
    each cell is evaluated at every factor, isotropically scaled, and at the vertex of the parabola
    through those energies; the row keeps the lowest energy and its factor (``volume_scale``), which
    the relaxation then starts from. A generated cell's volume is the template's, not the
    elements': a known phase 15 % too small in its lattice reads ~2 eV/atom above the hull and is
    never selected (benchmarks/results/rediscovery.md). Off: one evaluation, ``volume_scale`` 1.0.
    Forward passes take at most ``batch_size`` structures and, when ``batch_atoms`` > 0, at most
    that many atoms (``lib.surrogates.base.batch_bounds``)."""
    scan = check_volume_scan(volume_scan)
    keys, structures = prepared_structures(surrogate, candidates, "candidate_id")
    if scan:
        energies, scales = _volume_scan_energies(surrogate, structures, scan, batch_size=batch_size,
                                                 batch_atoms=batch_atoms)
    else:
        energies = predict_energies(surrogate, structures, batch_size=batch_size, batch_atoms=batch_atoms)
        scales = [None if isinstance(s, str) else 1.0 for s in structures]
    n_atoms = [None if isinstance(s, str) else len(s) for s in structures]
    rows: list[tuple[str, int | None, float | None, float | None, float | None, str, str | None]] = []
    for k, n, e, f in zip(keys, n_atoms, energies, scales, strict=True):
        if isinstance(e, str):
            err = e if e.startswith("candidate_id=") else f"candidate_id={k}: {e}"
            rows.append((k, n, None, None, None, "error", err))
        else:
            assert n is not None, "a structure that cannot be built has an error string, not an energy"
            rows.append((k, n, e, e / n, f, "ok", None))
    return pl.DataFrame(rows, schema=PRESCREEN_SCHEMA, orient="row")


# --------------------------------------------------------------------------- relax
#: One relaxation: the ``relaxed`` table without what the asset adds (``key`` = candidate_id).
#: Columns of ``relaxed`` the asset adds after the relaxation: the selection (static hull
#: distance, ``lib.selection``) and the relaxed cell's hull values (:func:`relaxed_hull_columns`).
RELAXED_SELECTION_COLUMNS: tuple[str, ...] = (
    "static_formation_energy_per_atom_ev", "static_e_above_hull_ev_per_atom", "selection_rank")
RELAXED_HULL_COLUMNS: tuple[str, ...] = ("formation_energy_per_atom_ev", "e_above_hull_ev_per_atom", "decomposition")
RELAX_SCHEMA = {"key": pl.String(), **contracts.schema("relaxed", exclude=(
    *contracts.LINEAGE, "batch_id", "formula", "reduced_formula", "spacegroup_number",
    "prescreen_energy_per_atom_ev", *RELAXED_SELECTION_COLUMNS, *RELAXED_HULL_COLUMNS))}


def spacegroup_number(structure, *, symprec: float = DEFAULT_SYMPREC) -> int | None:
    """Space group number by spglib (through pymatgen), or None when spglib finds none."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    from spglib import SpglibError

    try:
        return int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())
    except (SpglibError, ValueError):  # spglib gives up on some distorted cells (SymmetryUndeterminedError)
        return None


def primitive_cell(structure, *, symprec: float = 1e-3):
    """The primitive cell of ``structure`` (spglib's, same lattice orientation convention as
    pymatgen's ``SpacegroupAnalyzer.find_primitive``); the structure itself when it already is
    primitive or spglib finds none."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    from spglib import SpglibError

    try:
        prim = SpacegroupAnalyzer(structure, symprec=symprec).find_primitive()
    except (SpglibError, ValueError):  # spglib finds no primitive cell: keep the cell as it is
        return structure
    if prim is None or len(prim) >= len(structure):
        return structure
    return type(structure)(prim.lattice, prim.species, prim.frac_coords)


def _relax_result_fields(res) -> tuple[Any, float, bool, int]:
    """(structure, energy eV, converged, steps) of a ``lib.surrogates.RelaxResult``."""
    return res.structure, float(res.energy_ev), bool(res.is_converged), int(res.steps)


#: Structures relaxed in lockstep per forward pass by :func:`relax_frame` (``Surrogate.relax_many``).
DEFAULT_RELAX_BATCH_SIZE = 32


def relax_frame(
    surrogate,
    frame: pl.DataFrame,
    *,
    key: str = "candidate_id",
    fmax: float = DEFAULT_FMAX_EV_PER_A,
    steps: int = DEFAULT_RELAX_STEPS,
    relax_cell: bool = True,
    symprec: float = DEFAULT_SYMPREC,
    batch_size: int = DEFAULT_RELAX_BATCH_SIZE,
    optimizer: str = DEFAULT_OPTIMIZER,
    primitive: bool = False,
    fix_symmetry: bool = DEFAULT_FIX_SYMMETRY,
    fix_symmetry_symprec: float = DEFAULT_FIX_SYMPREC,
) -> pl.DataFrame:
    """Relax every row's structure; :data:`RELAX_SCHEMA` columns (``key`` renamed to ``key``).

    With ``primitive`` each structure is first reduced to its primitive cell (spglib, 1e-3 Å;
    candidates are exactly symmetric, so nothing moves): a centred template's conventional cell
    has 2 to 4 times the atoms, so this is ~2.4× faster, but it is a different search: on the
    same 48 candidates it ended more than 0.01 eV/atom higher in 5 (a distortion that needs the
    conventional cell is out of reach) and lower in 5 (benchmarks/results/relax_optimizer.md).
    Off by default. ``n_atoms`` and the stored cell are the relaxed cell's.

    With ``fix_symmetry`` (the default, :data:`DEFAULT_FIX_SYMMETRY`) each structure keeps the space group spglib finds at
    ``fix_symmetry_symprec`` Å (ASE's ``FixSymmetry``: forces, stress and steps symmetrised;
    :func:`lib.surrogates.relax.symmetry_constraint`), a candidate its template's. ``symprec``
    is only the tolerance of the reported ``spacegroup_number_relaxed``.

    The rows are relaxed together by ``surrogate.relax_many`` (one ASE FIRE optimiser on a
    cell filter per row, stepped in lockstep, ``batch_size`` structures per batched forward
    pass); a row whose relaxation fails gets its error, the others finish. A boolean column
    ``is_cell_relaxed`` in ``frame``, when present, overrides ``relax_cell`` per row
    (molecules in a box relax positions only); a float column ``volume_scale`` (the pre-screen's
    volume scan, :func:`prescreen_frame`) scales each cell isotropically before it relaxes.
    ``relax_seconds`` is the row's share of the compute time.
    """
    from lib.surrogates.relax import check_optimizer

    check_optimizer(optimizer)  # before any structure is prepared
    keys, structures = prepared_structures(surrogate, frame, key)
    if "volume_scale" in frame.columns:  # the pre-screen's volume scan: start from the cell it scored
        structures = [s if isinstance(s, str) else scaled_structure(s, f)
                      for s, f in zip(structures, frame["volume_scale"].to_list(), strict=True)]
    if primitive:
        structures = [s if isinstance(s, str) else primitive_cell(s) for s in structures]
    per_row_cell = frame["is_cell_relaxed"].to_list() if "is_cell_relaxed" in frame.columns else None
    cells = [relax_cell if per_row_cell is None or per_row_cell[i] is None else bool(per_row_cell[i])
             for i in range(len(keys))]
    todo = [i for i, s in enumerate(structures) if not isinstance(s, str)]
    results = surrogate.relax_many([structures[i] for i in todo], fmax=fmax, steps=steps,
                                   relax_cell=[cells[i] for i in todo], batch_size=batch_size,
                                   optimizer=optimizer, fix_symmetry=fix_symmetry,
                                   symprec=fix_symmetry_symprec)
    outcomes: dict[int, Any] = dict(zip(todo, results, strict=True))
    rows: list[dict[str, Any]] = []
    for i, (k, s) in enumerate(zip(keys, structures, strict=True)):
        empty = {c: None for c in RELAX_SCHEMA}
        if isinstance(s, str):
            rows.append(empty | {"key": k, "status": "error", "error": s})
            continue
        res = outcomes[i]
        t0 = time.perf_counter()
        try:
            if res.error is not None:
                raise RuntimeError(res.error)
            final, energy, converged, n_steps = _relax_result_fields(res)
            if not np.isfinite(energy):
                raise FloatingPointError("non-finite energy after relaxation")
        except Exception as exc:  # noqa: BLE001 - reported per row
            rows.append(empty | {"key": k, "n_atoms": len(s), "relax_seconds": _seconds(res),
                                 "status": "error",
                                 "error": f"{key}={k}: relaxation failed: {type(exc).__name__}: {exc}"})
            continue
        lat = final.lattice
        row = {
            "key": k, "n_atoms": len(final), "is_converged": converged, "n_steps": n_steps,
            "energy_ev": energy, "energy_per_atom_ev": energy / len(final), **structure_to_cell(final),
            "a_a": lat.a, "b_a": lat.b, "c_a": lat.c, "alpha_deg": lat.alpha, "beta_deg": lat.beta,
            "gamma_deg": lat.gamma, "volume_a3": lat.volume,
            "spacegroup_number_relaxed": spacegroup_number(final, symprec=symprec),
            "status": "ok", "error": None,
            "relax_seconds": (_seconds(res) or 0.0) + time.perf_counter() - t0,  # after the space group
        }
        rows.append(row)
    return pl.DataFrame(rows, schema=RELAX_SCHEMA)


def _seconds(res: Any) -> float | None:
    sec = getattr(res, "seconds", None)
    return float(sec) if sec is not None and np.isfinite(sec) else None


def select_top(prescreen: pl.DataFrame, k: int, *, by: str = "energy_per_atom_ev") -> pl.DataFrame:
    """The ``k`` ok rows with the lowest ``by`` (ties broken by candidate_id, so reproducible)."""
    ok = prescreen.filter((pl.col("status") == "ok") & pl.col(by).is_not_null() & pl.col(by).is_finite())
    return ok.sort([by, "candidate_id"]).head(k)


# --------------------------------------------------------------------------- references and hull
def mp_csv_cells(path: str | Path, *, elements: Iterable[str]) -> pl.DataFrame:
    """MP structures of a CSV in the MP-20 layout (``material_id``, ``cif``), restricted to phases
    whose elements are a subset of ``elements``; cell form with ``phase_id``, ``formula``, ``source``.

    A CIF that does not parse raises with the file and row.
    """
    from pymatgen.core import Structure

    allowed = set(elements)
    df = pl.read_csv(path, infer_schema_length=0)
    rows = []
    for i, row in enumerate(df.select("material_id", "cif").iter_rows(named=True)):
        try:
            s = Structure.from_str(row["cif"], fmt="cif")
        except Exception as exc:
            raise ValueError(f"{path} row {i + 2} ({row['material_id']}): CIF does not parse: {exc}") from exc
        if {e.symbol for e in s.composition.elements} <= allowed:
            rows.append({"phase_id": row["material_id"], "formula": s.composition.formula.replace(" ", ""),
                         "source": f"file:{Path(path).name}", **structure_to_cell(s)})
    return _cells_frame(rows)


def mp_table_cells(mp_structures: pl.DataFrame, *, elements: Iterable[str]) -> pl.DataFrame:
    """Rows of the ``mp_structures`` table whose elements are a subset of ``elements``, cell form."""
    allowed = sorted(set(elements))
    sub = mp_structures.filter(pl.col("elements").list.eval(pl.element().is_in(allowed)).list.all())
    return sub.select(
        pl.col("material_id").alias("phase_id"), pl.col("formula").str.replace_all(" ", ""),
        pl.col("source").cast(pl.String), "lattice_matrix", "species", "frac_coords",
    )


def _cells_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={
        "phase_id": pl.String, "formula": pl.String, "source": pl.String,
        "lattice_matrix": pl.List(pl.Float64), "species": pl.List(pl.String),
        "frac_coords": pl.List(pl.List(pl.Float64)),
    })


def ase_reference_structure(element: str, *, box_a: float = 12.0):
    """ASE's reference state of ``element``: ``ase.build.bulk`` for crystals; for diatomic
    elements, and crystals ASE cannot build without a basis (e.g. Cl, Br, I), a dimer in a box
    (bond length from ``reference_states``, else ASE's G2 molecule, else twice the covalent radius).

    Returns ``(Structure, is_molecule)``.
    """
    from ase import Atoms
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii, reference_states
    from pymatgen.io.ase import AseAtomsAdaptor

    z = atomic_numbers[element]
    state: dict[str, Any] = reference_states[z] or {}
    if state.get("symmetry") not in ("diatom", "atom"):
        try:
            return AseAtomsAdaptor.get_structure(bulk(element)), False
        except (ValueError, KeyError, RuntimeError):
            pass  # no crystal ASE can build: use the molecule
    if state.get("symmetry") == "atom":
        atoms = Atoms(element, positions=[[box_a / 2] * 3], cell=[box_a] * 3, pbc=True)
        return AseAtomsAdaptor.get_structure(atoms), True
    d = state.get("d")
    if d is None:
        try:
            from ase.build import molecule

            m = molecule(f"{element}2")
            d = float(m.get_distance(0, 1))
        except (KeyError, ValueError):
            d = 2.0 * float(covalent_radii[z])
    atoms = Atoms(f"{element}2", positions=[[0, 0, 0], [0, 0, float(d)]],
                  cell=[box_a, box_a * 1.05, box_a * 1.1], pbc=True)
    atoms.translate([box_a / 2, box_a / 2, box_a / 2])
    return AseAtomsAdaptor.get_structure(atoms), True


def reference_phases(elements: Iterable[str], mp_cells: pl.DataFrame | None = None) -> pl.DataFrame:
    """Competing phases of a chemical system: the MP cells given, plus ASE's reference state of
    each element that has no elemental MP phase. Cell form + ``phase_id``, ``formula``, ``source``,
    ``is_cell_relaxed`` (False for molecules in a box)."""
    from pymatgen.core import Composition

    elements = sorted(set(elements))
    frames = []
    have: set[str] = set()
    if mp_cells is not None and mp_cells.height:
        frames.append(mp_cells.with_columns(pl.lit(True).alias("is_cell_relaxed")))
        for f in mp_cells["formula"].to_list():
            els = {e.symbol for e in Composition(f).elements}
            if len(els) == 1:
                have |= els
    rows = []
    for el in elements:
        if el in have:
            continue
        s, is_molecule = ase_reference_structure(el)
        rows.append({"phase_id": f"ase-{el}", "formula": s.composition.formula.replace(" ", ""),
                     "source": "ase.data.reference_states", **structure_to_cell(s)})
        rows[-1]["is_cell_relaxed"] = not is_molecule
    if rows:
        extra = _cells_frame([{k: v for k, v in r.items() if k != "is_cell_relaxed"} for r in rows])
        frames.append(extra.with_columns(pl.Series("is_cell_relaxed", [r["is_cell_relaxed"] for r in rows])))
    return pl.concat(frames, how="vertical_relaxed") if frames else _cells_frame([]).with_columns(
        pl.lit(None, pl.Boolean).alias("is_cell_relaxed"))


@dataclass(frozen=True)
class HullResult:
    references: pl.DataFrame  # phase_id, formula, formation_energy_per_atom_ev, e_above_hull_ev_per_atom, is_elemental
    candidates: pl.DataFrame  # candidate_id, formation_energy_per_atom_ev, e_above_hull_ev_per_atom, decomposition, status, error
    chemical_potentials_ev: dict[str, float]


def formation_and_hull(
    references: pl.DataFrame, candidates: pl.DataFrame, *, elements: Iterable[str]
) -> HullResult:
    """Formation energy per atom (E − Σ nᵢ μᵢ, μᵢ the lowest elemental energy per atom among the
    references) and energy above the pymatgen ``PhaseDiagram`` of the references.

    ``references``: ``phase_id``, ``formula``, ``energy_ev``, ``status`` (rows not ``ok`` are left
    out of the hull). ``candidates``: ``candidate_id``, ``species`` (list) or ``formula``,
    ``energy_ev``, ``status``. A candidate with an element outside ``elements`` gets an error row.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    elements = sorted(set(elements))
    ok_refs = references.filter((pl.col("status") == "ok") & pl.col("energy_ev").is_not_null())
    entries: list[PDEntry] = []
    mu: dict[str, float] = {}
    for row in ok_refs.select("phase_id", "formula", "energy_ev").iter_rows(named=True):
        comp = Composition(row["formula"])
        e = PDEntry(comp, row["energy_ev"], name=row["phase_id"])
        entries.append(e)
        if len(comp.elements) == 1:
            el = comp.elements[0].symbol
            mu[el] = min(mu.get(el, np.inf), row["energy_ev"] / comp.num_atoms)
    missing = [el for el in elements if el not in mu]
    if missing:
        raise ValueError(f"no relaxed elemental reference for {missing}: cannot compute formation energies")
    pd_ = PhaseDiagram(entries)

    def ef(comp: Composition, energy: float) -> float:
        return (energy - sum(comp[el] * mu[el.symbol] for el in comp.elements)) / comp.num_atoms

    ref_rows = []
    for e in entries:
        ref_hull = pd_.get_e_above_hull(e)
        if ref_hull is None:  # pymatgen returns None only with on_error="ignore"; the default raises
            raise RuntimeError(f"phase_id={e.name}: no energy above the hull")
        ref_rows.append({"phase_id": e.name, "formation_energy_per_atom_ev": ef(e.composition, e.energy),
                         "e_above_hull_ev_per_atom": float(ref_hull),
                         "is_elemental": len(e.composition.elements) == 1})
    ref_out = pl.DataFrame(ref_rows, schema={"phase_id": pl.String, "formation_energy_per_atom_ev": pl.Float64,
                                             "e_above_hull_ev_per_atom": pl.Float64, "is_elemental": pl.Boolean})
    cand_rows = []
    comp_col = "species" if "species" in candidates.columns else "formula"
    for row in candidates.select("candidate_id", comp_col, "energy_ev", "status").iter_rows(named=True):
        base = {"candidate_id": row["candidate_id"], "formation_energy_per_atom_ev": None,
                "e_above_hull_ev_per_atom": None, "decomposition": None}
        if row["status"] != "ok" or row["energy_ev"] is None:
            cand_rows.append(base | {"status": "error", "error": f"candidate_id={row['candidate_id']}: not relaxed"})
            continue
        comp = (Composition(dict(zip(*np.unique(row[comp_col], return_counts=True), strict=True)))
                if comp_col == "species" else Composition(row[comp_col]))
        extra = sorted({el.symbol for el in comp.elements} - set(elements))
        if extra:
            cand_rows.append(base | {"status": "error", "error": f"candidate_id={row['candidate_id']}: "
                                     f"element(s) {extra} outside the chemical system {'-'.join(elements)}"})
            continue
        entry = PDEntry(comp, row["energy_ev"], name=row["candidate_id"])
        decomp, e_hull = pd_.get_decomp_and_e_above_hull(entry, allow_negative=True)
        if decomp is None or e_hull is None:  # pymatgen returns None only with on_error="ignore"
            raise RuntimeError(f"candidate_id={row['candidate_id']}: no decomposition on the hull")
        cand_rows.append(base | {
            "formation_energy_per_atom_ev": ef(comp, row["energy_ev"]),
            "e_above_hull_ev_per_atom": float(e_hull),
            # the decomposition's entries are the PDEntry objects built above
            "decomposition": " + ".join(f"{amt:.3f} {cast(PDEntry, d).name}" for d, amt in
                                        sorted(decomp.items(), key=lambda kv: -kv[1])),
            "status": "ok", "error": None})
    cand_out = pl.DataFrame(cand_rows, schema={
        "candidate_id": pl.String, "formation_energy_per_atom_ev": pl.Float64,
        "e_above_hull_ev_per_atom": pl.Float64, "decomposition": pl.String, "status": pl.String,
        "error": pl.String})
    return HullResult(ref_out, cand_out, mu)


# --------------------------------------------------------------------------- shortlist
def build_shortlist(relaxed: pl.DataFrame, stability: pl.DataFrame, phonons: pl.DataFrame | None) -> pl.DataFrame:
    """Relaxed candidates ranked by energy above hull, then formation energy, with the phonon verdict.

    ``relaxed``: the ``relaxed`` table; ``stability``: the candidate rows of ``references``;
    ``phonons``: the ``phonons`` table (``candidate_id``, ``min_frequency_thz``,
    ``is_dynamically_stable``, ``status``) or None. Unscreened candidates get a null verdict.
    """
    base = relaxed.filter(pl.col("status") == "ok").join(
        stability.filter(pl.col("status") == "ok").select(
            "candidate_id", "formation_energy_per_atom_ev", "e_above_hull_ev_per_atom", "decomposition"),
        on="candidate_id", how="inner")
    if phonons is not None and phonons.height:
        ph = phonons.filter(pl.col("status") == "ok").select(
            "candidate_id", "min_frequency_thz", "is_dynamically_stable")
        base = base.join(ph, on="candidate_id", how="left")
    else:
        base = base.with_columns(pl.lit(None, pl.Float64).alias("min_frequency_thz"),
                                 pl.lit(None, pl.Boolean).alias("is_dynamically_stable"))
    keep = [c for c in (*LINEAGE_COLUMNS, "formula", "reduced_formula", "n_atoms", "spacegroup_number",
                        "spacegroup_number_relaxed", "energy_per_atom_ev", "formation_energy_per_atom_ev",
                        "e_above_hull_ev_per_atom", "decomposition", "is_converged", "min_frequency_thz",
                        "is_dynamically_stable", *LATTICE_COLUMNS, "volume_a3") if c in base.columns]
    out = base.select(keep).sort(["e_above_hull_ev_per_atom", "formation_energy_per_atom_ev", "candidate_id"])
    return out.with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"),
        pl.col("is_dynamically_stable").is_not_null().alias("has_phonons"),
    ).select("rank", *keep, "has_phonons")


def mark_relaxed_duplicates(shortlist: pl.DataFrame, relaxed: pl.DataFrame, *,
                            energy_window_ev: float = 0.005, ltol: float = MATCHER_TOLERANCES["ltol"],
                            stol: float = MATCHER_TOLERANCES["stol"],
                            angle_tol: float = MATCHER_TOLERANCES["angle_tol"]) -> pl.DataFrame:
    """``shortlist`` with ``duplicate_of`` and ``unique_rank``: candidates that relaxed into the same
    structure.

    ``candidates_dedup`` folds candidates that are the same *before* relaxation; different
    templates often relax into one structure (e.g. five Ba2RuO4 entries within 0.4 meV/atom). In
    rank order, a row is compared with the kept rows of the same reduced formula whose energy per
    atom is within ``energy_window_ev`` (StructureMatcher's test on the relaxed cells, pymatgen's
    default tolerances, through ``lib.dedup``: each cell reduced once, ``fit_reduced``); on a
    match ``duplicate_of`` names the kept (better ranked) candidate. ``unique_rank`` numbers the
    kept rows 1, 2, ... (null on duplicates). Rows are never dropped.
    """
    from lib.dedup import fit_reduced, reduce_structure

    cells = relaxed.filter(pl.col("status") == "ok").select("candidate_id", *CELL_COLUMNS)
    frame = shortlist.select("candidate_id").join(cells, on="candidate_id", how="left")
    structures = dict(zip(frame["candidate_id"].to_list(), frame_structures(frame), strict=True))
    kept: dict[str, list[tuple[float, str, Any]]] = {}  # reduced formula -> (energy, id, reduced cell)
    dup_of: list[str | None] = []
    for cid, e in zip(shortlist["candidate_id"].to_list(), shortlist["energy_per_atom_ev"].to_list(), strict=True):
        s = structures.get(cid)
        if isinstance(s, str) or s is None or e is None:
            dup_of.append(None)
            continue
        group = kept.setdefault(s.composition.reduced_formula, [])
        near = [(cid_k, r_k) for e_k, cid_k, r_k in group if abs(e - e_k) <= energy_window_ev]
        r = reduce_structure(s) if near else None
        match = None if r is None else next(
            (cid_k for cid_k, r_k in near if fit_reduced(r, r_k, ltol=ltol, stol=stol, angle_tol=angle_tol)), None)
        dup_of.append(match)
        if match is None:
            group.append((e, cid, r if r is not None else reduce_structure(s)))
    out = shortlist.with_columns(pl.Series("duplicate_of", dup_of, dtype=pl.String))
    unique = out["duplicate_of"].is_null()
    return out.with_columns(pl.when(unique).then(unique.cast(pl.Int64).cum_sum()).otherwise(None)
                            .cast(pl.Int64).alias("unique_rank"))


def relaxed_hull_columns(relaxed: pl.DataFrame, references: pl.DataFrame, *,
                         elements: Iterable[str]) -> pl.DataFrame:
    """``relaxed`` with :data:`RELAXED_HULL_COLUMNS`: each relaxed cell's formation energy and
    energy above the hull of ``references`` (the ``reference_energies`` rows of the **same
    surrogate**), by :func:`formation_and_hull`. Rows that are not ``ok`` (or whose elements lie
    outside ``elements``) get nulls; nothing is dropped.

    Raises ``ValueError`` when the two frames name different surrogates (``surrogate_sha256``)
    or an element has no relaxed elemental reference.
    """
    refs = references.filter(pl.col("kind") == "reference") if "kind" in references.columns else references
    if "surrogate_sha256" in relaxed.columns and "surrogate_sha256" in refs.columns:
        a = set(relaxed["surrogate_sha256"].drop_nulls().unique().to_list())
        b = set(refs["surrogate_sha256"].drop_nulls().unique().to_list())
        if a and b and a != b:
            raise ValueError(f"relaxed_hull_columns: relaxed surrogate(s) {sorted(a)} and reference surrogate(s) "
                             f"{sorted(b)} differ: the hull must be built with the candidates' own surrogate")
    base = relaxed.drop([c for c in RELAXED_HULL_COLUMNS if c in relaxed.columns])
    if base.is_empty():
        return base.with_columns(pl.lit(None, pl.Float64).alias("formation_energy_per_atom_ev"),
                                 pl.lit(None, pl.Float64).alias("e_above_hull_ev_per_atom"),
                                 pl.lit(None, pl.String).alias("decomposition"))
    hull = formation_and_hull(refs, base, elements=elements)
    return base.join(hull.candidates.select("candidate_id", *RELAXED_HULL_COLUMNS), on="candidate_id", how="left",
                     maintain_order="left")


def relaxed_stability(relaxed: pl.DataFrame) -> pl.DataFrame:
    """The stability frame :func:`build_shortlist` takes, from a ``relaxed`` table that carries
    :data:`RELAXED_HULL_COLUMNS` (``status`` ok where the relaxation and the hull both worked)."""
    missing = [c for c in ("candidate_id", "status", *RELAXED_HULL_COLUMNS) if c not in relaxed.columns]
    if missing:
        raise ValueError(f"relaxed_stability: the relaxed table lacks {missing} (rematerialise relaxed)")
    ok = (pl.col("status") == "ok") & pl.col("e_above_hull_ev_per_atom").is_not_null()
    return relaxed.select("candidate_id", *RELAXED_HULL_COLUMNS,
                          pl.when(ok).then(pl.lit("ok")).otherwise(pl.lit("error")).alias("status"))


def keep_charge_balanced(shortlist: pl.DataFrame) -> pl.DataFrame:
    """The rows of a ranked shortlist whose formula some ICSD oxidation-state assignment balances
    (``charge_balanced``, from ``lib.oxidation.charge_balance``), ``rank`` renumbered 1..n in the
    same order. The ``shortlist`` asset's ``only_charge_balanced`` option (off by default: the
    flag is a column, not a silent filter). Raises ``ValueError`` when the column is missing."""
    if "charge_balanced" not in shortlist.columns:
        raise ValueError("keep_charge_balanced: no charge_balanced column (run lib.oxidation.charge_balance first)")
    return shortlist.filter(pl.col("charge_balanced").fill_null(False)).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"))


def ranked_and_unique_problems(shortlist: pl.DataFrame) -> list[str]:
    """What breaks the shortlist's order (empty when nothing does): ``rank`` is 1..n in row
    order, ``candidate_id`` is unique and not null, ``e_above_hull_ev_per_atom`` has no null and
    never decreases, and (when present) ``unique_rank`` is 1..m on the rows without
    ``duplicate_of`` and null on the others. Each problem names the first offending row."""
    missing = [c for c in ("rank", "candidate_id", "e_above_hull_ev_per_atom") if c not in shortlist.columns]
    if missing:
        return [f"missing column(s) {missing}"]
    problems: list[str] = []
    ids = shortlist["candidate_id"]
    ranks = shortlist["rank"].to_list()
    bad = next((i for i, r in enumerate(ranks) if r != i + 1), None)
    if bad is not None:
        problems.append(f"rank is not 1..{shortlist.height} in row order: row {bad} "
                        f"(candidate_id={ids[bad]}) has rank {ranks[bad]}, expected {bad + 1}")
    if ids.null_count():
        problems.append(f"{ids.null_count()} row(s) without candidate_id")
    if ids.drop_nulls().is_duplicated().any():
        dups = shortlist.filter(pl.col("candidate_id").is_duplicated())["candidate_id"].unique().sort()
        problems.append(f"candidate_id not unique: {dups.len()} duplicated, e.g. {dups.head(3).to_list()}")
    e = shortlist["e_above_hull_ev_per_atom"]
    if e.null_count():
        i = int(e.is_null().arg_true()[0])
        problems.append(f"row {i} (candidate_id={ids[i]}) has no e_above_hull_ev_per_atom")
    else:
        vals = e.to_list()
        down = next((i for i in range(1, len(vals)) if vals[i] < vals[i - 1]), None)
        if down is not None:
            problems.append(f"not sorted by e_above_hull_ev_per_atom: row {down} (candidate_id={ids[down]}, "
                            f"{vals[down]:.6g} eV/atom) comes after {vals[down - 1]:.6g} eV/atom")
    if "unique_rank" in shortlist.columns and "duplicate_of" in shortlist.columns:
        uniq = shortlist.with_row_index("_row").filter(pl.col("duplicate_of").is_null())
        ur = uniq["unique_rank"].to_list()
        bad = next((j for j, r in enumerate(ur) if r != j + 1), None)
        if bad is not None:
            row = uniq.row(bad, named=True)
            problems.append(f"unique_rank is not 1..{uniq.height} on the unique rows: row {row['_row']} "
                            f"(candidate_id={row['candidate_id']}) has unique_rank {ur[bad]}, expected {bad + 1}")
        n_dup_ranked = shortlist.filter(pl.col("duplicate_of").is_not_null() & pl.col("unique_rank").is_not_null()).height
        if n_dup_ranked:
            problems.append(f"{n_dup_ranked} duplicate row(s) carry a unique_rank")
    return problems


def check_ranked_and_unique(shortlist: pl.DataFrame) -> None:
    """Raise ``ValueError`` listing :func:`ranked_and_unique_problems` when there are any."""
    problems = ranked_and_unique_problems(shortlist)
    if problems:
        raise ValueError("shortlist is not ranked and unique: " + "; ".join(problems))


# --------------------------------------------------------------------------- batches and Ray
def plan_batches(frame: pl.DataFrame, *, rows_per_batch: int, salt: dict[str, Any], key: str = "candidate_id") -> pl.DataFrame:
    """Cut ``frame`` into batches of ``rows_per_batch`` rows (sorted by ``key``) and add ``batch_id``:
    ``bat-`` + a hash of the batch's keys and ``salt`` (surrogate hash, settings, code version)."""
    if rows_per_batch < 1:
        raise ValueError("rows_per_batch must be >= 1")
    if frame[key].is_duplicated().any():
        dups = frame.filter(pl.col(key).is_duplicated())[key].unique().head(5).to_list()
        raise ValueError(f"duplicate {key} in the input (e.g. {dups}); deduplicate first")
    df = frame.sort(key).with_columns((pl.int_range(0, pl.len()) // rows_per_batch).alias("_batch"))
    ids = (df.group_by("_batch", maintain_order=True).agg(pl.col(key))
           .with_columns(pl.col(key).map_elements(
               lambda ks: content_hash({"keys": ks.to_list(), "salt": salt, "code": CODE_VERSION}, prefix="bat-"),
               return_dtype=pl.String).alias("batch_id")).select("_batch", "batch_id"))
    return df.join(ids, on="_batch", how="left").drop("_batch")


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


@dataclass
class BatchRunStats:
    n_batches: int = 0
    n_skipped: int = 0
    n_run: int = 0
    n_retries: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def run_batches(
    batches: pl.DataFrame,
    compute: Callable[[Iterable[tuple[str, pl.DataFrame]]], Iterator[tuple[str, pl.DataFrame]]],
    *,
    work_dir: Path | None,
    on_batch_written: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, BatchRunStats]:
    """Run ``compute`` on every batch of ``batches`` (a frame with ``batch_id``) not yet in
    ``work_dir``, write each result there as it arrives, and return all planned batches' results.

    ``compute`` maps ``(batch_id, frame)`` pairs to ``(batch_id, result)`` pairs in any order
    (:meth:`SurrogatePool.map` or :func:`local_compute`).
    """
    t0 = time.perf_counter()
    stats = BatchRunStats()
    groups = {bid: g for (bid,), g in batches.group_by("batch_id", maintain_order=True)}
    stats.n_batches = len(groups)
    results: dict[str, pl.DataFrame] = {}
    todo = []
    for bid, g in groups.items():
        path = work_dir / f"{bid}.parquet" if work_dir is not None else None
        if path is not None and path.exists():
            try:
                results[bid] = pl.read_parquet(path)
                stats.n_skipped += 1
                continue
            except (OSError, pl.exceptions.PolarsError):  # a torn file: recompute it
                path.unlink(missing_ok=True)
        todo.append((bid, g.drop("batch_id")))
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    for bid, res in compute(todo):
        res = res.with_columns(pl.lit(bid).alias("batch_id"))
        if work_dir is not None:
            _write_atomic(res, work_dir / f"{bid}.parquet")
        results[bid] = res
        stats.n_run += 1
        if on_batch_written is not None:
            on_batch_written(bid)
    missing = [b for b in groups if b not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} batch(es) produced no result: {missing[:5]}")
    retries = getattr(compute, "n_retries", None)
    stats.n_retries = int(retries() if callable(retries) else 0)
    stats.seconds = time.perf_counter() - t0
    frames = [results[b] for b in groups]
    return (pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()), stats


def local_compute(surrogate, method: str, **kwargs) -> Callable[[Iterable[tuple[str, pl.DataFrame]]], Iterator[tuple[str, pl.DataFrame]]]:
    """In-process ``compute`` for :func:`run_batches` (no Ray): ``method`` of :class:`SurrogateWorker`."""
    def compute(items):
        for bid, frame in items:
            yield bid, _dispatch(surrogate, method, frame, kwargs)
    return compute


def _dispatch(surrogate, method: str, frame: pl.DataFrame, kwargs: dict[str, Any]) -> pl.DataFrame:
    if method == "prescreen":
        return prescreen_frame(surrogate, frame, **kwargs)
    if method == "relax":
        return relax_frame(surrogate, frame, **kwargs)
    if method == "phonons":
        from lib.phonons import phonon_frame

        return phonon_frame(surrogate, frame, **kwargs)
    raise ValueError(f"unknown method {method!r}: one of prescreen, relax, phonons")


def _import(path: str) -> Callable[..., Any]:
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


class SurrogateWorker:
    """A Ray actor body: loads the surrogate once, then computes batches."""

    def __init__(self, surrogate: str, load_kwargs: dict[str, Any], loader: str, torch_threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        self.surrogate = _import(loader)(surrogate, **load_kwargs)

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, str]:
        import ray

        return {"name": self.surrogate.name, "weights_sha256": self.surrogate.weights_sha256,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": str(os.getpid())}

    def run(self, method: str, frame: pl.DataFrame, kwargs: dict[str, Any]) -> pl.DataFrame:
        return _dispatch(self.surrogate, method, frame, kwargs)


class SurrogatePool:
    """Ray actors that each hold one loaded surrogate; :meth:`map` spreads batches over them.

    ``ray`` must already be initialised (``RayResource.init()`` locally or with ``RAY_ADDRESS``).
    Actors import ``lib.screening``: Ray puts the driver's working directory on the workers' path,
    which covers a local Ray and nodes with this checkout at the same path; other clusters need the
    code shipped at job level (``ray.init(runtime_env={"py_modules": [...]})``).
    """

    def __init__(
        self,
        surrogate: str,
        *,
        num_actors: int,
        load_kwargs: dict[str, Any] | None = None,
        loader: str = "lib.screening:load_configured_surrogate",
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        max_restarts: int = 3,
    ) -> None:
        import ray

        if num_actors < 1:
            raise ValueError("num_actors must be >= 1")
        if num_gpus_per_actor < 0:
            raise ValueError("num_gpus_per_actor must be >= 0")
        opts: dict[str, Any] = {"num_cpus": num_cpus_per_actor, "max_restarts": max_restarts,
                                "max_task_retries": 0}
        if num_gpus_per_actor:
            # a GPU share (e.g. 0.125: eight actors on one GPU): the pre-screen on a GPU is bound by
            # its CPU side, so several actors per GPU are faster (benchmarks/results/campaign.md:
            # 8 processes on one H200, 4,455 structures/s against 1,064 for one)
            opts["num_gpus"] = num_gpus_per_actor
        cls = ray.remote(SurrogateWorker).options(**opts)
        threads = max(1, int(num_cpus_per_actor))
        self._ray = ray
        # Ray actor handles (Any: ray's hints give their methods without ``.remote``)
        self.actors: list[Any] = [cls.remote(surrogate, load_kwargs or {}, loader, threads)
                                  for _ in range(num_actors)]
        self._retries = 0
        self._busy: dict[Any, int] = {}

    def pids(self, *, timeout_s: float = 300.0) -> list[int]:
        """Process ids of the actors (waits for restarting ones, up to ``timeout_s``)."""
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._ray.get([a.pid.remote() for a in self.actors])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def info(self) -> list[dict[str, str]]:
        return self._ray.get([a.info.remote() for a in self.actors])

    def n_retries(self) -> int:
        return self._retries

    def busy_actors(self) -> list[int]:
        """Indices of the actors that have a batch in flight now."""
        return sorted(set(self._busy.values()))

    def compute(self, method: str, *, max_attempts: int = 3, in_flight_per_actor: int = 2, **kwargs):
        """A ``compute`` callable for :func:`run_batches` running ``method`` on the actors."""
        def compute(items):
            yield from self.map(method, items, max_attempts=max_attempts,
                                in_flight_per_actor=in_flight_per_actor, **kwargs)
        compute.n_retries = self.n_retries  # type: ignore[attr-defined]  # mypy does not type function attributes
        return compute

    def map(self, method: str, items: Iterable[tuple[str, pl.DataFrame]], *, max_attempts: int = 3,
            in_flight_per_actor: int = 2, **kwargs) -> Iterator[tuple[str, pl.DataFrame]]:
        """Yield ``(batch_id, result)`` as batches finish.

        A batch whose actor died is re-submitted, up to ``max_attempts`` times in all; an actor
        that failed gets no new batch until a probe shows it is back (Ray restarts it,
        ``max_restarts``), so the retry goes to a healthy actor when there is one.
        """
        ray = self._ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

        dead_errors = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
        queue = list(items)
        queue.reverse()
        frames = {bid: f for bid, f in queue}
        attempts: dict[str, int] = {}
        pending: dict[Any, str] = {}
        probes: dict[Any, int] = {}
        healthy = set(range(len(self.actors)))
        load = dict.fromkeys(range(len(self.actors)), 0)
        while queue or pending:
            while queue and healthy:
                which = min(healthy, key=lambda i: (load[i], i))
                if load[which] >= in_flight_per_actor:
                    break
                bid, frame = queue.pop()
                attempts[bid] = attempts.get(bid, 0) + 1
                ref = self.actors[which].run.remote(method, frame, kwargs)
                pending[ref] = bid
                self._busy[ref] = which
                load[which] += 1
            if not pending and not probes:
                raise RuntimeError("no Ray actor is alive to run the remaining batches")
            done, _ = ray.wait([*pending, *probes], num_returns=1)
            for ref in done:
                if ref in probes:
                    which = probes.pop(ref)
                    try:
                        ray.get(ref)
                        healthy.add(which)
                    except dead_errors:
                        time.sleep(0.5)  # still restarting: probe again
                        probes[self.actors[which].pid.remote()] = which
                    continue
                bid = pending.pop(ref)
                which = self._busy.pop(ref)
                load[which] -= 1
                try:
                    result = ray.get(ref)
                except dead_errors as exc:
                    if attempts[bid] >= max_attempts:
                        raise RuntimeError(f"batch {bid} failed {attempts[bid]} times: {exc}") from exc
                    self._retries += 1
                    queue.append((bid, frames[bid]))
                    if which in healthy:
                        healthy.discard(which)
                        probes[self.actors[which].pid.remote()] = which
                    continue
                yield bid, result

    def shutdown(self) -> None:
        for a in self.actors:
            self._ray.kill(a, no_restart=True)
        self.actors = []


def default_num_actors(n_batches: int, *, requested: int = 0, cpus: float | None = None,
                       cpus_per_actor: float = 1.0) -> int:
    """``requested`` if set, else as many actors as the cluster's CPUs hold, at most one per batch."""
    if requested > 0:
        return max(1, min(requested, max(1, n_batches)))
    cap = int((cpus or 1) // cpus_per_actor) or 1
    return max(1, min(cap, n_batches))


def with_lineage(frame: pl.DataFrame, lineage: pl.DataFrame, *, surrogate_name: str, surrogate_sha256: str,
                 code_version: str = CODE_VERSION) -> pl.DataFrame:
    """Prefix the lineage columns (``candidate_id``, ``template_id``, ``checkpoint_id`` from
    ``lineage``; surrogate name and hash, code version) to ``frame``."""
    lin_cols = [c for c in ("candidate_id", "template_id", "checkpoint_id") if c in lineage.columns]
    lin = lineage.select(lin_cols).unique("candidate_id", keep="first")
    for c in ("template_id", "checkpoint_id"):
        if c not in lin.columns:
            lin = lin.with_columns(pl.lit(None, pl.String).alias(c))
    out = frame.join(lin, on="candidate_id", how="left").with_columns(
        pl.lit(surrogate_name).alias("surrogate_name"), pl.lit(surrogate_sha256).alias("surrogate_sha256"),
        pl.lit(code_version).alias("code_version"))
    rest = [c for c in out.columns if c not in LINEAGE_COLUMNS]
    return out.select(*LINEAGE_COLUMNS, *rest)
