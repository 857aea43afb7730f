"""Machine-learned surrogate potentials (M3GNet via matgl, CHGNet): one entry point.

``load_surrogate(name_or_folder, *, registry=None, models_dir=None, device="cpu")`` returns a
:class:`Surrogate` whatever the model family. It gives, for a list of pymatgen ``Structure``:

- :meth:`Surrogate.predict` -- energy (eV per cell), forces (eV/Å) and stress (eV/Å³, ASE
  Voigt order ``xx yy zz yz xz xy`` and ASE sign), many structures per forward pass;
- :meth:`Surrogate.predict_safe` -- the same, but a structure the model cannot take (an element
  it does not cover, no sites, a degenerate cell, a failing graph) gets a :class:`Prediction`
  with ``error`` set and NaN values, and the rest of the batch proceeds;
- :meth:`Surrogate.calculator` -- the library's own ASE calculator (stress in eV/Å³);
- :meth:`Surrogate.relax` -- an ASE relaxation (FIRE or BFGS, cell through
  ``FrechetCellFilter``).

Surrogates are named in a registry (:func:`load_registry`): three built-ins
(``CHGNet-0.3.0``, whose weights ship inside the ``chgnet`` wheel and so is the offline default;
``M3GNet-MP-2021.2.8-PES`` and ``M3GNet-MatPES-PBE-v2025.1-PES``, folders under ``models_dir``)
plus any entries of an optional JSON/YAML registry file. Each entry records the sha256 of its
weights file, and :func:`surrogate_id` gives the ``sur-`` id used in table lineage.

M3GNet weights trained with matgl's DGL implementation (matgl <= 2.x, which includes both
built-in M3GNet models) run under different message-passing conventions in matgl >= 3; the
loader restores the conventions the weights were trained with on the loaded model instance
(:mod:`lib._m3gnet_legacy`), deciding by the explicit ``convention`` of the registry entry,
else the sha256 of ``state.pt`` for the known legacy files, else the version fields of
``model.json``.

Example (a notebook)::

    from lib.surrogates import load_surrogate
    sur = load_surrogate("M3GNet-MP-2021.2.8-PES", models_dir="/path/to/matgl/pretrained_models")
    preds = sur.predict(structures, batch_size=64)
    result = sur.relax(structures[0], fmax=0.05)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from lib.ids import file_sha256

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

SurrogateKind = Literal["m3gnet", "chgnet"]
Convention = Literal["dgl-legacy", "native", "auto"]
Optimizer = Literal["FIRE", "BFGS"]

#: 1 GPa in eV/Å³ (ase.units.GPa).
GPA_TO_EV_PER_A3 = 1.0 / 160.21766208

#: sha256 of ``state.pt`` of the M3GNet weights known to be trained with matgl's DGL code.
KNOWN_DGL_LEGACY_STATE_SHA256: dict[str, str] = {
    "a9aa723705bd1a242ec8749332f137811c4a94e17995a564f8f94a9aca68061b": "M3GNet-MP-2021.2.8-PES",
    "9f710eac88ec2c666c8e488883c59768cf11c116f177e9d82896ae56f3fc338d": "M3GNet-MatPES-PBE-v2025.1-PES",
}

#: sha256 of the CHGNet checkpoints that ship inside the chgnet 0.4.x wheel.
CHGNET_WHEEL_SHA256: dict[str, str] = {
    "0.3.0": "d14ab7c0f093efe64b60a7bcd540bca10e74fb7f46c86108a079af60524659d1",
    "0.2.0": "ef624f78b6db9d315b4ef256f1bb3207449924191b91720dc17d3f60c5df980e",
}

_CHGNET_WHEEL_PREFIX = "chgnet:"
#: Two sites closer than this (Å, periodic) make a structure invalid input.
MIN_SITE_DISTANCE_A = 0.1
#: CHGNet's atom embedding covers Z = 1..94.
_CHGNET_MAX_Z = 94


class SurrogateError(ValueError):
    """A surrogate cannot be resolved or loaded (bad registry entry, missing weights, sha mismatch)."""


class StructureInputError(ValueError):
    """A structure the surrogate cannot evaluate; ``index`` is its position in the input list."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"structure {index}: {reason}")
        self.index = index
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateSpec:
    """One configured surrogate.

    ``weights``: for ``m3gnet`` a matgl model folder (``model.json``, ``model.pt``,
    ``state.pt``); for ``chgnet`` a checkpoint file (``.pth.tar``) or ``chgnet:<version>`` for a
    checkpoint inside the chgnet wheel. ``None`` when the entry's folder is not configured here
    (no ``models_dir``). ``sha256``: of ``state.pt`` (M3GNet) or of the checkpoint (CHGNet).
    ``convention`` (M3GNet only): ``dgl-legacy`` for weights trained with matgl's DGL
    implementation, ``native`` for matgl >= 3 weights, ``auto`` to decide from the files.
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


def _chgnet_wheel_file(version: str) -> Path:
    import chgnet

    folder = Path(chgnet.__file__).parent / "pretrained" / version
    files = sorted(folder.glob("*.pth.tar"))
    if not files:
        raise SurrogateError(f"CHGNet {version!r}: no checkpoint in {folder}")
    return files[0]


def builtin_specs(*, models_dir: str | None = None) -> dict[str, SurrogateSpec]:
    """The three built-in surrogates; M3GNet folders are ``<models_dir>/<name>`` when given."""

    def m3gnet_folder(name: str) -> str | None:
        return str(Path(models_dir).expanduser() / name) if models_dir else None

    specs = [
        SurrogateSpec(
            name="CHGNet-0.3.0",
            kind="chgnet",
            weights=_CHGNET_WHEEL_PREFIX + "0.3.0",
            sha256=CHGNET_WHEEL_SHA256["0.3.0"],
            version="0.3.0",
            convention="native",
            description="CHGNet 0.3.0 (MPtrj), weights inside the chgnet wheel; offline default",
        ),
        SurrogateSpec(
            name="M3GNet-MP-2021.2.8-PES",
            kind="m3gnet",
            weights=m3gnet_folder("M3GNet-MP-2021.2.8-PES"),
            sha256="a9aa723705bd1a242ec8749332f137811c4a94e17995a564f8f94a9aca68061b",
            version="2021.2.8",
            convention="dgl-legacy",
            description="matgl M3GNet universal potential, MP-2021.2.8 (the paper's surrogate)",
        ),
        SurrogateSpec(
            name="M3GNet-MatPES-PBE-v2025.1-PES",
            kind="m3gnet",
            weights=m3gnet_folder("M3GNet-MatPES-PBE-v2025.1-PES"),
            sha256="9f710eac88ec2c666c8e488883c59768cf11c116f177e9d82896ae56f3fc338d",
            version="v2025.1",
            convention="dgl-legacy",
            description="matgl M3GNet trained on MatPES-PBE 2025.1",
        ),
    ]
    return {s.name: s for s in specs}


DEFAULT_SURROGATE = "CHGNet-0.3.0"


def _weights_file(kind: SurrogateKind, weights: str) -> Path:
    """The file whose sha256 identifies the weights."""
    if kind == "chgnet":
        if weights.startswith(_CHGNET_WHEEL_PREFIX):
            return _chgnet_wheel_file(weights[len(_CHGNET_WHEEL_PREFIX):])
        return Path(weights)
    return Path(weights) / "state.pt"


def _read_registry_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SurrogateError(f"{path}: not valid JSON ({exc})") from exc
    if data is None:
        return []
    if isinstance(data, dict) and "surrogates" in data:
        data = data["surrogates"]
    if isinstance(data, dict):
        entries = []
        for name, fields in data.items():
            if not isinstance(fields, dict):
                raise SurrogateError(f"{path}: entry {name!r} must be a mapping")
            entries.append({"name": name, **fields})
        return entries
    if isinstance(data, list) and all(isinstance(e, dict) for e in data):
        return data
    raise SurrogateError(
        f"{path}: expected a list of entries, a mapping name -> entry, or {{'surrogates': [...]}}"
    )


_ENTRY_FIELDS = {"name", "kind", "weights", "sha256", "version", "convention", "description"}


def load_registry(
    path: str | None = None, *, models_dir: str | None = None
) -> dict[str, SurrogateSpec]:
    """The built-in surrogates plus the entries of an optional JSON/YAML registry file.

    A file holds a list of entries (or ``{"surrogates": [...]}``, or a mapping name -> entry),
    each with ``name``, ``kind`` (``m3gnet``/``chgnet``) and optionally ``weights``,
    ``sha256``, ``version``, ``convention``, ``description``. ``weights`` may use
    ``${models_dir}``; a relative path is taken relative to the registry file's folder; an
    M3GNet entry without ``weights`` is the folder ``<models_dir>/<name>``. So a model folder
    plus a registry entry registers a new surrogate without code changes. An entry with the name
    of a built-in replaces it. A missing ``sha256`` is computed from the weights file; a given
    one is checked when the surrogate loads.
    """
    specs = builtin_specs(models_dir=models_dir)
    if not path:
        return specs
    reg_path = Path(path).expanduser()
    if not reg_path.is_file():
        raise SurrogateError(f"surrogate registry file not found: {reg_path}")
    for i, entry in enumerate(_read_registry_file(reg_path)):
        where = f"{reg_path} entry {i}"
        unknown = set(entry) - _ENTRY_FIELDS
        if unknown:
            raise SurrogateError(f"{where}: unknown fields {sorted(unknown)}")
        name = entry.get("name")
        kind = entry.get("kind")
        if not name or kind not in ("m3gnet", "chgnet"):
            raise SurrogateError(f"{where}: needs a 'name' and a 'kind' of 'm3gnet' or 'chgnet'")
        convention = entry.get("convention", "auto" if kind == "m3gnet" else "native")
        if convention not in ("dgl-legacy", "native", "auto"):
            raise SurrogateError(f"{where}: convention must be dgl-legacy, native or auto")
        weights = entry.get("weights")
        if weights is not None:
            weights = str(weights)
            if "${models_dir}" in weights:
                if not models_dir:
                    raise SurrogateError(f"{where}: uses ${{models_dir}} but no models_dir is set")
                weights = weights.replace("${models_dir}", str(models_dir))
            if not weights.startswith(_CHGNET_WHEEL_PREFIX):
                wp = Path(weights).expanduser()
                weights = str(wp if wp.is_absolute() else (reg_path.parent / wp).resolve())
        elif kind == "m3gnet" and models_dir:
            weights = str(Path(models_dir).expanduser() / name)
        sha_raw = entry.get("sha256")
        if sha_raw is not None and not (
            isinstance(sha_raw, str) and len(sha_raw) == 64
            and all(c in "0123456789abcdef" for c in sha_raw.lower())
        ):
            raise SurrogateError(f"{where}: sha256 must be 64 hex digits as a string "
                                 f"(quote it in YAML), got {sha_raw!r}")
        sha = (sha_raw or "").lower()
        if not sha and weights is not None:
            wf = _weights_file(kind, weights)
            if wf.is_file():
                sha = file_sha256(str(wf))
        specs[name] = SurrogateSpec(
            name=name,
            kind=kind,
            weights=weights,
            sha256=sha,
            version=str(entry.get("version", "")),
            convention=convention,
            description=str(entry.get("description", "")),
        )
    return specs


def registry_frame(registry: dict[str, SurrogateSpec]) -> pl.DataFrame:
    """The registry as a table: one row per surrogate (for the ``surrogate_models`` asset)."""
    rows = [
        {
            "surrogate_name": s.name,
            "surrogate_id": surrogate_id(s) if s.sha256 else None,
            "kind": s.kind,
            "weights": s.weights,
            "surrogate_sha256": s.sha256,
            "version": s.version,
            "convention": s.convention,
            "description": s.description,
        }
        for s in registry.values()
    ]
    return pl.DataFrame(rows, schema={
        "surrogate_name": pl.String, "surrogate_id": pl.String, "kind": pl.String,
        "weights": pl.String, "surrogate_sha256": pl.String, "version": pl.String,
        "convention": pl.String, "description": pl.String,
    })


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


@dataclass(frozen=True)
class RelaxResult:
    """Outcome of :meth:`Surrogate.relax`."""

    structure: Structure
    energy_ev: float
    is_converged: bool
    steps: int
    max_force_ev_per_a: float
    initial_energy_ev: float
    optimizer: str
    trajectory_energies_ev: list[float] = field(default_factory=list)

    @property
    def energy_per_atom_ev(self) -> float:
        return self.energy_ev / len(self.structure)

    @property
    def converged(self) -> bool:
        """Alias of ``is_converged``."""
        return self.is_converged


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


def _failed(n_atoms: int, reason: str, *, energy_only: bool) -> Prediction:
    nan_f = None if energy_only else np.full((n_atoms, 3), np.nan)
    nan_s = None if energy_only else np.full(6, np.nan)
    return Prediction(math.nan, nan_f, nan_s, n_atoms, error=reason)


def voigt_from_3x3(stress: np.ndarray) -> np.ndarray:
    """3x3 stress -> ASE Voigt (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(stress, dtype=np.float64).reshape(3, 3)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


# --------------------------------------------------------------------------------------------
# Surrogates
# --------------------------------------------------------------------------------------------


class Surrogate:
    """A loaded surrogate. Build it with :func:`load_surrogate`."""

    kind: SurrogateKind

    def __init__(self, spec: SurrogateSpec, *, device: str, library_version: str) -> None:
        self.spec = spec
        self.device = device
        self.library_version = library_version

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
            dmin = float(np.min(structure.distance_matrix[np.triu_indices(len(structure), 1)]))
            if dmin < MIN_SITE_DISTANCE_A:
                return f"overlapping sites ({dmin:.3g} Å apart, < {MIN_SITE_DISTANCE_A} Å)"
        return None

    # prediction -----------------------------------------------------------------------------
    def _predict_batch(self, structures: list[Structure], *, energy_only: bool) -> list[Prediction]:
        raise NotImplementedError

    def predict_safe(
        self,
        structures: Sequence[Structure],
        *,
        batch_size: int = 32,
        energy_only: bool = False,
    ) -> list[Prediction]:
        """Predictions in input order; a structure that cannot be evaluated gets ``error`` set.

        Structures are checked first (elements covered, sites, cell); valid ones go through the
        model ``batch_size`` at a time. When a whole batch fails, its structures are retried one
        by one so that only the offending structure carries the error.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out: list[Prediction | None] = [None] * len(structures)
        valid: list[int] = []
        for i, s in enumerate(structures):
            reason = self.check_structure(s)
            if reason is None:
                valid.append(i)
            else:
                out[i] = _failed(len(s) if hasattr(s, "__len__") else 0, reason,
                                 energy_only=energy_only)
        for start in range(0, len(valid), batch_size):
            idx = valid[start:start + batch_size]
            batch = [structures[i] for i in idx]
            try:
                preds = self._predict_batch(batch, energy_only=energy_only)
            except Exception as exc:  # noqa: BLE001 -- isolate the structure that fails
                if len(idx) == 1:
                    out[idx[0]] = _failed(len(batch[0]), f"{type(exc).__name__}: {exc}",
                                          energy_only=energy_only)
                    continue
                preds = []
                for s in batch:
                    try:
                        preds.extend(self._predict_batch([s], energy_only=energy_only))
                    except Exception as exc1:  # noqa: BLE001
                        preds.append(_failed(len(s), f"{type(exc1).__name__}: {exc1}",
                                             energy_only=energy_only))
            for i, p in zip(idx, preds, strict=True):
                if p.ok and not np.isfinite(p.energy_ev):
                    p = replace(p, error="model returned a non-finite energy")
                out[i] = p
        return [p for p in out if p is not None]

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

    def predict_energies(self, structures: Sequence[Structure], *, batch_size: int = 64) -> pl.DataFrame:
        """Energies only (no forces), as :func:`predictions_to_frame` columns."""
        return predictions_to_frame(
            self.predict_safe(structures, batch_size=batch_size, energy_only=True)
        )

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
    ) -> RelaxResult:
        """Relax positions (and the cell, through ``FrechetCellFilter``) with an ASE optimiser.

        ``is_converged`` is ASE's verdict (max force, including the cell's generalised forces,
        below ``fmax`` eV/Å within ``steps`` steps).
        """
        from ase.filters import FrechetCellFilter
        from ase.optimize import BFGS, FIRE
        from pymatgen.io.ase import AseAtomsAdaptor

        reason = self.check_structure(structure)
        if reason is not None:
            raise StructureInputError(0, reason)
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = self.calculator()
        initial = float(atoms.get_potential_energy())
        target = FrechetCellFilter(atoms) if relax_cell else atoms
        opt_cls = {"FIRE": FIRE, "BFGS": BFGS}[optimizer]
        opt = opt_cls(target, logfile=None)
        energies: list[float] = []
        opt.attach(lambda: energies.append(float(atoms.get_potential_energy())))
        converged = bool(opt.run(fmax=fmax, steps=steps))
        forces = target.get_forces()
        relaxed = AseAtomsAdaptor.get_structure(atoms)
        final = type(structure)(relaxed.lattice, relaxed.species, relaxed.frac_coords)
        return RelaxResult(
            structure=final,
            energy_ev=float(atoms.get_potential_energy()),
            is_converged=converged,
            steps=int(opt.nsteps),
            max_force_ev_per_a=float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0,
            initial_energy_ev=initial,
            optimizer=optimizer,
            trajectory_energies_ev=energies,
        )


class M3GNetSurrogate(Surrogate):
    """An M3GNet potential through matgl (PyTorch Geometric backend)."""

    kind: SurrogateKind = "m3gnet"

    def __init__(self, spec: SurrogateSpec, potential: Any, *, device: str,
                 library_version: str, convention_source: str) -> None:
        super().__init__(spec, device=device, library_version=library_version)
        self.potential = potential
        self.convention_source = convention_source
        model = potential.model
        self._elements = frozenset(model.element_types)
        from matgl.ext.pymatgen import Structure2Graph

        self._converter = Structure2Graph(element_types=tuple(model.element_types),
                                          cutoff=float(model.cutoff))

    @property
    def supported_elements(self) -> frozenset[str]:
        return self._elements

    def _predict_batch(self, structures: list[Structure], *, energy_only: bool) -> list[Prediction]:
        import torch
        from torch_geometric.data import Batch

        graphs, lats = [], []
        for s in structures:
            g, lat, _ = self._converter.get_graph(s)
            graphs.append(g)
            lats.append(lat.reshape(1, 3, 3))
        g = Batch.from_data_list(graphs)
        lat = torch.cat(lats, dim=0)
        n_graphs = len(structures)
        state = torch.zeros((n_graphs, 2), dtype=lat.dtype)
        pot = self.potential
        saved = (pot.calc_forces, pot.calc_stresses)
        try:
            pot.calc_forces = not energy_only
            pot.calc_stresses = not energy_only
            if energy_only:
                with torch.no_grad():
                    out = pot(g, lat, state)
            else:
                out = pot(g, lat, state)  # Potential moves g, lat and state to its device
        finally:
            pot.calc_forces, pot.calc_stresses = saved
        energies = out[0].detach().cpu().double().numpy().reshape(-1)
        preds: list[Prediction] = []
        if energy_only:
            for s, e in zip(structures, energies, strict=True):
                preds.append(Prediction(float(e), None, None, len(s)))
            return preds
        forces = out[1].detach().cpu().double().numpy()
        stresses = out[2].detach().cpu().double().numpy().reshape(n_graphs, 3, 3)
        offset = 0
        for k, s in enumerate(structures):
            n = len(s)
            preds.append(Prediction(
                float(energies[k]),
                forces[offset:offset + n].copy(),
                voigt_from_3x3(stresses[k]) * GPA_TO_EV_PER_A3,
                n,
            ))
            offset += n
        return preds

    def calculator(self) -> Calculator:
        from matgl.ext.ase import PESCalculator

        return PESCalculator(self.potential, stress_unit="eV/A3", use_voigt=True)


class CHGNetSurrogate(Surrogate):
    """CHGNet through the chgnet package."""

    kind: SurrogateKind = "chgnet"

    def __init__(self, spec: SurrogateSpec, model: Any, *, device: str, library_version: str) -> None:
        super().__init__(spec, device=device, library_version=library_version)
        self.model = model
        from pymatgen.core import Element

        self._elements = frozenset(Element.from_Z(z).symbol for z in range(1, _CHGNET_MAX_Z + 1))

    @property
    def supported_elements(self) -> frozenset[str]:
        return self._elements

    def _predict_batch(self, structures: list[Structure], *, energy_only: bool) -> list[Prediction]:
        model = self.model
        graphs = [model.graph_converter(s) for s in structures]
        task = "e" if energy_only else "efs"
        raw = model.predict_graph(graphs, task=task, batch_size=max(1, len(graphs)))
        if isinstance(raw, dict):
            raw = [raw]
        preds = []
        for s, r in zip(structures, raw, strict=True):
            n = len(s)
            e = float(np.asarray(r["e"]).reshape(-1)[0]) * (n if model.is_intensive else 1)
            if energy_only:
                preds.append(Prediction(e, None, None, n))
            else:
                preds.append(Prediction(
                    e,
                    np.asarray(r["f"], dtype=np.float64).reshape(n, 3),
                    voigt_from_3x3(r["s"]) * GPA_TO_EV_PER_A3,
                    n,
                ))
        return preds

    def calculator(self) -> Calculator:
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):
            return CHGNetCalculator(self.model, use_device=self.device)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _spec_from_folder(path: Path) -> SurrogateSpec:
    """An ad-hoc spec for a weights folder (matgl) or checkpoint file (CHGNet)."""
    if path.is_dir() and (path / "model.json").is_file():
        meta = json.loads((path / "model.json").read_text())
        model_cls = str(meta.get("kwargs", {}).get("model", {}).get("@class", ""))
        if model_cls != "M3GNet":
            raise SurrogateError(f"{path}: model.json describes {model_cls or 'an unknown model'}, "
                                 "only matgl M3GNet folders are supported")
        state = path / "state.pt"
        if not state.is_file():
            raise SurrogateError(f"{path}: no state.pt")
        return SurrogateSpec(name=path.name, kind="m3gnet", weights=str(path),
                             sha256=file_sha256(str(state)), version="", convention="auto")
    if path.is_file() and path.name.endswith((".pth.tar", ".pt", ".pth")):
        return SurrogateSpec(name=path.name.split(".")[0], kind="chgnet", weights=str(path),
                             sha256=file_sha256(str(path)), version="", convention="native")
    raise SurrogateError(f"{path}: not a matgl model folder (model.json + state.pt) "
                         "nor a CHGNet checkpoint file")


def detect_m3gnet_convention(folder: str | Path, *, sha256: str | None = None) -> tuple[str, str]:
    """(``dgl-legacy``|``native``, why) for a matgl M3GNet folder.

    Known legacy ``state.pt`` sha256 -> ``dgl-legacy``; ``model.json`` naming a DGL backend or a
    matgl version below 3 -> ``dgl-legacy``, naming matgl >= 3 or a PyG backend -> ``native``;
    otherwise ``native`` (weights written by the matgl installed here are native).
    """
    folder = Path(folder)
    sha = sha256 or file_sha256(str(folder / "state.pt"))
    if sha in KNOWN_DGL_LEGACY_STATE_SHA256:
        return "dgl-legacy", f"state.pt sha256 {sha[:12]} is a known DGL-era file"
    meta_path = folder / "model.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    md = meta.get("metadata") or {}
    fields = {k: v for d in (meta, md if isinstance(md, dict) else {}) for k, v in d.items()}
    backend = str(fields.get("backend", fields.get("graph_backend", ""))).lower()
    if backend == "dgl":
        return "dgl-legacy", "model.json names the DGL backend"
    if backend in ("pyg", "torch_geometric"):
        return "native", "model.json names the PyG backend"
    for key in ("matgl_version", "@matgl_version", "version"):
        ver = fields.get(key)
        if isinstance(ver, str) and ver[:1].isdigit():
            major = int(ver.split(".")[0])
            if major < 3:
                return "dgl-legacy", f"model.json {key}={ver} (< 3, DGL era)"
            return "native", f"model.json {key}={ver} (>= 3)"
    return "native", "no legacy marker (unknown sha256, no DGL version fields)"


def _resolve_spec(name_or_folder: str, registry: dict[str, SurrogateSpec] | None,
                  models_dir: str | None) -> SurrogateSpec:
    reg = registry if registry is not None else load_registry(None, models_dir=models_dir)
    if name_or_folder in reg:
        spec = reg[name_or_folder]
        if spec.weights is None:
            raise SurrogateError(
                f"surrogate {spec.name!r}: its weights folder is not configured; pass models_dir "
                f"(CGWGAN_M3GNET_DIR) pointing at a folder that holds {spec.name}/"
            )
        return spec
    path = Path(name_or_folder).expanduser()
    if path.exists():
        spec = _spec_from_folder(path.resolve())
        # a folder of a registered model keeps the registry's name, version and convention
        for known in reg.values():
            if known.sha256 == spec.sha256 and known.kind == spec.kind:
                return replace(known, weights=spec.weights)
        return spec
    raise SurrogateError(
        f"unknown surrogate {name_or_folder!r}: not a registry name ({', '.join(sorted(reg))}) "
        "and not an existing weights folder/file"
    )


def load_surrogate(
    name_or_folder: str,
    *,
    registry: dict[str, SurrogateSpec] | None = None,
    models_dir: str | None = None,
    device: str = "cpu",
) -> Surrogate:
    """Load a surrogate by registry name or weights folder/file.

    ``registry``: from :func:`load_registry` (default: the built-ins with ``models_dir``).
    The weights file's sha256 must equal the registry's; an M3GNet model trained with matgl's
    DGL code gets its conventions restored (see :mod:`lib._m3gnet_legacy`).
    """
    spec = _resolve_spec(name_or_folder, registry, models_dir)
    assert spec.weights is not None
    wfile = _weights_file(spec.kind, spec.weights)
    if not wfile.is_file():
        raise SurrogateError(f"surrogate {spec.name!r}: weights file not found: {wfile}")
    actual = file_sha256(str(wfile))
    if spec.sha256 and actual != spec.sha256:
        raise SurrogateError(
            f"surrogate {spec.name!r}: sha256 of {wfile} is {actual}, the registry says "
            f"{spec.sha256}; register these weights under their own name"
        )
    spec = replace(spec, sha256=actual)
    if spec.kind == "chgnet":
        return _load_chgnet(spec, wfile, device=device)
    return _load_m3gnet(spec, device=device)


def _load_chgnet(spec: SurrogateSpec, wfile: Path, *, device: str) -> CHGNetSurrogate:
    import chgnet
    from chgnet.model import CHGNet

    assert spec.weights is not None
    with contextlib.redirect_stdout(io.StringIO()):
        if spec.weights.startswith(_CHGNET_WHEEL_PREFIX):
            model = CHGNet.load(model_name=spec.weights[len(_CHGNET_WHEEL_PREFIX):],
                                use_device=device, verbose=False)
        else:
            model = CHGNet.from_file(str(wfile)).to(device)
    model.eval()
    model.graph_converter.set_isolated_atom_response("error")
    return CHGNetSurrogate(spec, model, device=device, library_version=f"chgnet {chgnet.__version__}")


def _load_m3gnet(spec: SurrogateSpec, *, device: str) -> M3GNetSurrogate:
    import matgl

    from lib import _m3gnet_legacy

    assert spec.weights is not None
    folder = Path(spec.weights)
    if spec.convention == "auto":
        convention, why = detect_m3gnet_convention(folder, sha256=spec.sha256)
    else:
        convention, why = spec.convention, "registry setting"
    potential = matgl.load_model(str(folder))
    if type(potential.model).__name__ != "M3GNet":
        raise SurrogateError(f"{folder}: holds a {type(potential.model).__name__}, not M3GNet")
    if convention == "dgl-legacy":
        _m3gnet_legacy.restore_dgl_conventions(potential.model)
    potential = potential.to(device)
    potential.eval()
    spec = replace(spec, convention=convention)  # type: ignore[arg-type]
    return M3GNetSurrogate(spec, potential, device=device,
                           library_version=f"matgl {matgl.__version__}", convention_source=why)
