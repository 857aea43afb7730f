"""Phonon screen with phonopy finite displacements and surrogate forces.

For each structure: the cell is first symmetrised and reduced to its standard primitive cell
(spglib at ``symprec``, default 0.01 Å). Relaxed cells keep their symmetry only approximately:
of the 200 M3GNet relaxations of the 20k Ba-Ru-O run, none kept its space group at phonopy's own
1e-5 Å tolerance, 99 at 1e-3 Å and 126 at 1e-2 Å. Without the symmetrisation phonopy sees a
lower group and asks for up to 12× more displacements. The idealisation moves no atom by more
than ``symprec``, and the forces of the undisplaced supercell are subtracted (below); then a
supercell of it (``supercell`` diagonal, default 2×2×2, or the smallest diagonal whose lengths
reach ``min_length_a``), phonopy's symmetry-reduced displacements (0.01 Å), the
surrogate's forces on every displaced supercell of every structure of the frame in one batched
``predict`` call (minus the forces of the undisplaced supercell, which removes residual forces of
a not quite relaxed cell), force constants, frequencies on a Γ-centred ``mesh`` and along a band
path, the minimum frequency and its q-point (reduced coordinates of the primitive cell's reciprocal
basis). Verdict: ``is_dynamically_stable = min_frequency_thz > threshold_thz`` (−0.5 THz as in
the paper; imaginary frequencies are negative).

Band path: seekpath is not a dependency, so the path is a fixed one through the centre (Γ) and
the face and corner points of the primitive cell's reciprocal cell: Γ–X–S–Y–Γ–Z–R–Γ with
X=(½,0,0), S=(½,½,0), Y=(0,½,0), Z=(0,0,½), R=(½,½,½). For cubic and tetragonal cells these
are the standard points (S is then M); for others they are the reciprocal-cell points of the same
names, which is enough to catch instabilities the mesh misses and to draw the bands.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from lib import contracts
from lib.cells import cell_to_structure
from lib.plots import subplots
from lib.surrogate_inputs import prepared_structures

BAND_PATH: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("Γ", (0.0, 0.0, 0.0)), ("X", (0.5, 0.0, 0.0)), ("S", (0.5, 0.5, 0.0)), ("Y", (0.0, 0.5, 0.0)),
    ("Γ", (0.0, 0.0, 0.0)), ("Z", (0.0, 0.0, 0.5)), ("R", (0.5, 0.5, 0.5)), ("Γ", (0.0, 0.0, 0.0)),
)
#: Verdict threshold (THz): stable when the lowest frequency is above it (the paper's -0.5 THz;
#: imaginary frequencies are negative).
DEFAULT_THRESHOLD_THZ = -0.5
#: spglib tolerance (Å) of the symmetrisation before the displacements (None: none).
DEFAULT_PHONON_SYMPREC = 1e-2

# ----------------------------------------------------------------------------- memory
# Peak RSS of one phonon screen is set by the forward pass of one force batch (the surrogate's
# graph and autograd buffers of every displaced supercell in it), not by the structures held.
# Measured (issue 17): peak RSS of a fresh process running ``phonon_frame`` on real MP Ba-Ru-O
# cells, 2x2x2 (one 2x2x3) supercells, CPU, one torch thread; "batch atoms" = supercells in one
# forward batch x supercell atoms:
#
# ==========  ===========  ===========  ========  ===========  ===========
# surrogate   cell         supercell    batch     batch atoms  peak RSS
# ==========  ===========  ===========  ========  ===========  ===========
# M3GNet-MP   mp-547094    80 atoms     16        1,280        1.71 GB
# M3GNet-MP   mp-3597      160 atoms    9         1,440        2.15 GB
# M3GNet-MP   mp-3598      240 atoms    13        3,120        4.05 GB
# M3GNet-MP   mp-3598      240 atoms    8         1,920        2.71 GB
# M3GNet-MP   mp-3598      240 atoms    4         960          1.75 GB
# M3GNet-MP   mp-3598      240 atoms    3         720          1.60 GB (CI machine, bare process)
# M3GNet-MP   mp-554791    320 atoms    12        3,840        3.94 GB
# M3GNet-MP   mp-554791    320 atoms    6         1,920        2.36 GB
# CHGNet      mp-3598      240 atoms    13        3,120        12.02 GB
# CHGNet      mp-3598      240 atoms    8         1,920        7.68 GB
# CHGNet      mp-3598      240 atoms    2         480          2.37 GB
# ==========  ===========  ===========  ========  ===========  ===========
#
# (model loaded, before the screen: 0.55 GB M3GNet, 0.40 GB CHGNet). Linear in the batch atoms;
# least squares: 0.82 GB + 0.90 MB/atom for M3GNet (residuals up to 0.45 GB: denser cells have
# more neighbours), 0.63 GB + 3.65 MB/atom for CHGNet. The model below is an upper envelope of
# every row with about 0.1 GB to spare for M3GNet: the CI machine's 720-atom run peaked at 1.597 GB,
# 5 MB over the first envelope's 0.80 GB base (library builds and allocators differ by machine). Uncapped, a 2x2x2 supercell of an 80-atom cell (640 atoms) in batches of 16 holds
# 10,240 atoms: about 12 GB with M3GNet, 38 GB with CHGNet.

#: kind -> (GB, GB per atom in one force batch): peak RSS <= GB + per-atom x batch atoms for every
#: measurement above. Kinds not measured (e.g. the TensorFlow M3GNet in its own process) get
#: CHGNet's, the larger.
PHONON_MEMORY_MODEL_GB: dict[str, tuple[float, float]] = {"m3gnet": (0.9, 1.1e-3), "chgnet": (0.65, 3.7e-3)}
#: What a Ray actor adds to the bare process (GB): the ``phonons`` asset with M3GNet, one actor,
#: force batches of 8 x 240 atoms (mp-3597 and mp-3598 in one batch) peaked at 2.94 GB, against
#: 2.71 GB for the same 1,920 batch atoms in a bare process.
RAY_ACTOR_OVERHEAD_GB = 0.25
#: Supercells with more atoms are skipped (status "skipped", counted, with the reason): 2x2x2 of a
#: 32-atom cell. Under :data:`DEFAULT_ACTOR_MEMORY_GB` its forces go in batches of 6 supercells
#: with M3GNet (1,681 batch atoms) and of 2 with CHGNet (567).
DEFAULT_MAX_SUPERCELL_ATOMS = 256
#: Peak RSS budget (GB) of one phonon actor: force batches are sized to it
#: (:func:`max_batch_atoms`) and the number of actors to the memory available
#: (:func:`memory_aware_num_actors`).
DEFAULT_ACTOR_MEMORY_GB = 3.0


def phonon_memory_model(kind: str | None) -> tuple[float, float]:
    """(base GB, GB per batch atom) of a surrogate ``kind`` (:data:`PHONON_MEMORY_MODEL_GB`)."""
    return PHONON_MEMORY_MODEL_GB.get(kind or "", PHONON_MEMORY_MODEL_GB["chgnet"])


def max_batch_atoms(memory_gb: float, kind: str | None) -> int:
    """Atoms one force batch may hold so that a phonon screen with surrogate ``kind`` in a Ray
    actor peaks at about ``memory_gb`` (at least 1: one supercell per batch)."""
    base, per_atom = phonon_memory_model(kind)
    return max(1, int((memory_gb - base - RAY_ACTOR_OVERHEAD_GB) / per_atom))


def phonon_rss_estimate_gb(kind: str | None, batch_atoms: int, *, ray_actor: bool = True) -> float:
    """Estimated peak RSS (GB) of a phonon screen whose force batches hold ``batch_atoms`` atoms,
    in a Ray actor (or, ``ray_actor`` False, a bare process)."""
    base, per_atom = phonon_memory_model(kind)
    return base + per_atom * batch_atoms + (RAY_ACTOR_OVERHEAD_GB if ray_actor else 0.0)


def force_batch_size(batch_size: int, n_supercell_atoms: int, batch_atoms: int | None) -> int:
    """Supercells per force batch: ``batch_size``, fewer when ``batch_atoms`` would be exceeded
    (never below one)."""
    if not batch_atoms or n_supercell_atoms <= 0:
        return max(1, batch_size)
    return max(1, min(batch_size, batch_atoms // n_supercell_atoms))


def memory_aware_num_actors(num_actors: int, *, available_gb: float | None, per_actor_gb: float) -> int:
    """``num_actors``, fewer when the available memory does not hold that many actors of
    ``per_actor_gb`` each (at least one; ``available_gb`` None or ``per_actor_gb`` <= 0: unchanged)."""
    if available_gb is None or per_actor_gb <= 0:
        return max(1, num_actors)
    return max(1, min(num_actors, int(available_gb // per_actor_gb)))

#: One phonon screen: the ``phonons`` table without what the asset adds (``key`` = candidate_id).
PHONON_SCHEMA = {"key": pl.String(), **contracts.schema(
    "phonons", exclude=(*contracts.LINEAGE, "batch_id", "formula"))}


def supercell_diagonal(lattice_lengths: Sequence[float], *, supercell: Sequence[int] = (2, 2, 2),
                       min_length_a: float | None = None) -> list[int]:
    """``supercell`` or, with ``min_length_a``, the smallest multiples reaching that length."""
    if min_length_a is None:
        return [int(x) for x in supercell]
    return [max(1, int(np.ceil(min_length_a / length - 1e-9))) for length in lattice_lengths]


def symmetrized_primitive(structure, symprec: float | None):
    """(standard primitive cell idealised by spglib at ``symprec``, its space-group number);
    with ``symprec`` None the structure itself and the group phonopy's 1e-5 tolerance sees."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    if symprec is None:
        return structure, SpacegroupAnalyzer(structure, symprec=1e-5).get_space_group_number()
    sga = SpacegroupAnalyzer(structure, symprec=symprec)
    return sga.find_primitive(), sga.get_space_group_number()


def _phonopy_for(structure, diag: list[int], displacement_a: float):
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(symbols=[s.specie.symbol for s in structure], cell=structure.lattice.matrix,
                        scaled_positions=structure.frac_coords)
    ph = Phonopy(unit, supercell_matrix=np.diag(diag), primitive_matrix="P")
    ph.generate_displacements(distance=displacement_a)
    return ph


def _phonopy_cell_structure(cell) -> Any:
    """A pymatgen Structure of a ``PhonopyAtoms`` cell."""
    return cell_to_structure(cell.cell, cell.symbols, cell.scaled_positions)


def phonon_frame(
    surrogate,
    frame: pl.DataFrame,
    *,
    key: str = "candidate_id",
    supercell: Sequence[int] = (2, 2, 2),
    min_length_a: float | None = None,
    displacement_a: float = 0.01,
    mesh: Sequence[int] = (8, 8, 8),
    band_npoints: int = 31,
    threshold_thz: float = DEFAULT_THRESHOLD_THZ,
    batch_size: int = 16,
    symprec: float | None = DEFAULT_PHONON_SYMPREC,
    max_supercell_atoms: int | None = None,
    max_batch_atoms: int | None = None,
) -> pl.DataFrame:
    """Phonon screen of every row (ASU or cell form): :data:`PHONON_SCHEMA` columns.

    ``max_supercell_atoms``: a row whose supercell would have more atoms gets ``status``
    "skipped" with the sizes in ``error`` (no forces computed), not a verdict.
    ``max_batch_atoms``: force batches hold at most this many atoms (fewer than ``batch_size``
    supercells when the largest supercell of the frame needs it; at least one): the bound on
    memory (:func:`max_batch_atoms`). The forces do not depend on it."""
    from phonopy.phonon.band_structure import get_band_qpoints_and_path_connections

    keys, structures = prepared_structures(surrogate, frame, key)
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[int, Any, list[int], float, Any, int]] = []
    cells: list[Any] = []
    spans: list[tuple[int, int]] = []
    for i, (k, s) in enumerate(zip(keys, structures, strict=True)):
        empty = {c: None for c in PHONON_SCHEMA} | {"key": k, "threshold_thz": threshold_thz, "symprec": symprec}
        rows.append(empty)
        if isinstance(s, str):
            rows[i] |= {"status": "error", "error": s}
            continue
        t0 = time.perf_counter()
        try:
            prim, sg = symmetrized_primitive(s, symprec)
            diag = supercell_diagonal(prim.lattice.abc, supercell=supercell, min_length_a=min_length_a)
            n_super = len(prim) * int(np.prod(diag))
            if max_supercell_atoms and n_super > max_supercell_atoms:
                rows[i] |= {"status": "skipped", "n_atoms": len(s), "n_primitive_atoms": len(prim),
                            "phonon_spacegroup_number": sg, "supercell_matrix": diag, "n_supercell_atoms": n_super,
                            "error": f"{key}={k}: supercell of {n_super} atoms > max_supercell_atoms "
                                     f"{max_supercell_atoms}"}
                continue
            ph = _phonopy_for(prim, diag, displacement_a)
            start = len(cells)
            cells.append(_phonopy_cell_structure(ph.supercell))
            cells.extend(_phonopy_cell_structure(sc) for sc in ph.supercells_with_displacements)
            spans.append((start, len(cells)))
            jobs.append((i, ph, diag, time.perf_counter() - t0, prim, sg))
        except Exception as exc:  # noqa: BLE001 - any setup failure is reported on its row
            rows[i] |= {"status": "error", "error": f"{key}={k}: phonopy setup failed: {type(exc).__name__}: {exc}"}
    t_pred = time.perf_counter()
    largest = max((len(c) for c in cells), default=0)
    preds = surrogate.predict_safe(cells, batch_size=force_batch_size(batch_size, largest, max_batch_atoms)) \
        if cells else []
    pred_share = (time.perf_counter() - t_pred) / max(1, len(cells))
    labels = [p[0] for p in BAND_PATH]
    path = [[list(p[1]) for p in BAND_PATH]]
    for (i, ph, diag, setup_s, prim, sg), (a, b) in zip(jobs, spans, strict=True):
        k = keys[i]
        t0 = time.perf_counter()
        try:
            bad = next((p.error for p in preds[a:b] if p.error is not None), None)
            if bad is not None:
                raise RuntimeError(f"surrogate forces failed on a displaced supercell: {bad}")
            f = [np.asarray(p.forces_ev_per_a) for p in preds[a:b]]
            ph.forces = np.asarray(f[1:]) - np.asarray(f[0])[None, :, :]
            ph.produce_force_constants()
            ph.symmetrize_force_constants()
            ph.run_mesh(list(mesh), is_gamma_center=True)
            md = ph.get_mesh_dict()
            mfreq = np.asarray(md["frequencies"])
            qi, bi = np.unravel_index(np.argmin(mfreq), mfreq.shape)
            min_mesh = float(mfreq[qi, bi])
            qpoints, connections = get_band_qpoints_and_path_connections(path, npoints=band_npoints)
            ph.run_band_structure(qpoints, path_connections=connections, labels=labels)
            bd = ph.get_band_structure_dict()
            bfreq = np.concatenate(bd["frequencies"], axis=0)
            bq = np.concatenate(bd["qpoints"], axis=0)
            dist = np.concatenate(bd["distances"])
            bj = np.unravel_index(np.argmin(bfreq), bfreq.shape)
            min_band = float(bfreq[bj])
            if min_band < min_mesh:
                min_f, min_q = min_band, bq[bj[0]]
            else:
                min_f, min_q = min_mesh, np.asarray(md["qpoints"])[qi]
            seg_ends = [float(d[0]) for d in bd["distances"]] + [float(bd["distances"][-1][-1])]
            rows[i] |= {
                "n_atoms": len(structures[i]), "n_primitive_atoms": len(prim), "phonon_spacegroup_number": sg,
                "supercell_matrix": diag,
                "n_supercell_atoms": len(ph.supercell), "n_displacements": b - a - 1,
                "min_frequency_thz": min_f, "min_frequency_qpoint": [float(x) for x in min_q],
                "min_mesh_frequency_thz": min_mesh, "min_band_frequency_thz": min_band,
                "is_dynamically_stable": bool(min_f > threshold_thz),
                "band_distances": dist.astype(np.float32).tolist(),
                "band_frequencies_thz": bfreq.astype(np.float32).tolist(),
                "band_labels": labels, "band_label_distances": seg_ends,
                "phonon_seconds": setup_s + pred_share * (b - a) + time.perf_counter() - t0,
                "status": "ok", "error": None,
            }
        except Exception as exc:  # noqa: BLE001 - any phonon failure is reported on its row
            rows[i] |= {"status": "error",
                        "error": f"{key}={k}: phonon calculation failed: {type(exc).__name__}: {exc}"}
    return pl.DataFrame(rows, schema=PHONON_SCHEMA)


def band_structure_figure(row: dict[str, Any], *, title: str = ""):
    """A matplotlib figure of one ``phonons`` row's band structure (frequencies in THz)."""
    dist = np.asarray(row["band_distances"], dtype=float)
    freq = np.asarray(row["band_frequencies_thz"], dtype=float)
    fig, ax = subplots(figsize=(4.2, 3.0))
    ax.plot(dist, freq, color="tab:blue", lw=0.8)
    ax.axhline(0.0, color="k", lw=0.5)
    thr = row.get("threshold_thz")
    if thr is not None:
        ax.axhline(thr, color="tab:red", lw=0.6, ls="--")
    ticks = list(row["band_label_distances"])
    for t in ticks:
        ax.axvline(t, color="0.7", lw=0.5)
    ax.set_xticks(ticks, list(row["band_labels"]))
    ax.set_xlim(dist.min(), dist.max())
    ax.set_ylabel("frequency (THz)")
    ax.set_title(title, fontsize=8)
    return fig
