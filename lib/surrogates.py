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
  ``FrechetCellFilter``) through the library's calculator, one structure;
- :meth:`Surrogate.relax_many` -- the same relaxation for many structures in lockstep, each
  optimiser step's energies, forces and stresses of all running structures from one batched
  forward pass (per-structure errors, the rest finish).

torch's CPU threads: :func:`set_torch_threads` (``load_surrogate(threads=...)`` or
``CGWGAN_TORCH_THREADS``); BLAS is held to one thread during relaxations (tiny matrices).

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
    preds = sur.predict(structures, batch_size=32)
    result = sur.relax(structures[0], fmax=0.05)
    results = sur.relax_many(structures, fmax=0.05, steps=300, batch_size=32)
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
    #: why this relaxation failed (:meth:`Surrogate.relax_many` reports a failure per structure
    #: instead of raising); ``structure`` is then the last structure reached and the energies NaN
    error: str | None = None
    #: compute time spent on this structure (its share of each batched forward pass plus its
    #: own optimiser work in :meth:`Surrogate.relax_many`; wall time in :meth:`Surrogate.relax`)
    seconds: float = math.nan

    @property
    def ok(self) -> bool:
        return self.error is None

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
        """torch's intra-op CPU threads in this process now (see :func:`set_torch_threads`)."""
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
        preds = self._predict_isolated([structures[i] for i in valid], batch_size=batch_size,
                                       energy_only=energy_only)
        for i, p in zip(valid, preds, strict=True):
            out[i] = p
        return [p for p in out if p is not None]

    def _predict_isolated(self, structures: Sequence[Structure], *, batch_size: int,
                          energy_only: bool) -> list[Prediction]:
        """:meth:`_predict_batch` ``batch_size`` structures at a time, without input checks.

        When a whole batch fails, its structures are retried one by one so that only the
        offending structure carries the error; a non-finite energy is an error too.
        """
        out: list[Prediction] = []
        for start in range(0, len(structures), batch_size):
            batch = list(structures[start:start + batch_size])
            try:
                preds = self._predict_batch(batch, energy_only=energy_only)
            except Exception as exc:  # noqa: BLE001 -- isolate the structure that fails
                if len(batch) == 1:
                    preds = [_failed(len(batch[0]), f"{type(exc).__name__}: {exc}",
                                     energy_only=energy_only)]
                else:
                    preds = []
                    for s in batch:
                        try:
                            preds.extend(self._predict_batch([s], energy_only=energy_only))
                        except Exception as exc1:  # noqa: BLE001
                            preds.append(_failed(len(s), f"{type(exc1).__name__}: {exc1}",
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

    def predict_energies(self, structures: Sequence[Structure], *, batch_size: int = 32) -> pl.DataFrame:
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

        One structure through the model library's own ASE calculator (the paper's way);
        :meth:`relax_many` relaxes many structures with batched forward passes.
        ``is_converged`` is ASE's verdict (max force, including the cell's generalised forces,
        below ``fmax`` eV/Å within ``steps`` steps).
        """
        import time

        from ase.optimize import BFGS, FIRE
        from pymatgen.io.ase import AseAtomsAdaptor

        t0 = time.perf_counter()
        reason = self.check_structure(structure)
        if reason is not None:
            raise StructureInputError(0, reason)
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = self.calculator()
        with _blas_one_thread():
            initial = float(atoms.get_potential_energy())
            target = _cell_filter(atoms) if relax_cell else atoms
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
            seconds=time.perf_counter() - t0,
        )

    def relax_many(
        self,
        structures: Sequence[Structure],
        *,
        fmax: float = 0.05,
        steps: int = 300,
        relax_cell: bool | Sequence[bool] = True,
        optimizer: Optimizer = "FIRE",
        batch_size: int = 32,
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

        ``relax_cell``: one flag for all, or one per structure. A structure the model cannot
        take, or one that fails mid-way (model error, non-finite energy), gets a
        :class:`RelaxResult` with ``error`` set; the others finish. Results are in input order
        and equal :meth:`relax` up to the float32 difference between batched and single-structure
        predictions (about 1e-6 eV/atom a step). ``last_relax_stats`` holds the counts of the
        last call (forward passes, structures per pass, on-demand evaluations).
        """
        import time
        from collections import deque

        from ase.optimize import BFGS, FIRE
        from pymatgen.io.ase import AseAtomsAdaptor

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if steps < 0:
            raise ValueError("steps must be >= 0")
        n = len(structures)
        cell_flags = [bool(relax_cell)] * n if isinstance(relax_cell, bool | np.bool_) else [bool(c) for c in relax_cell]
        if len(cell_flags) != n:
            raise ValueError(f"relax_cell has {len(cell_flags)} flags for {n} structures")
        opt_cls = {"FIRE": FIRE, "BFGS": BFGS}[optimizer]
        calc_cls = _stored_results_calculator()
        results: list[RelaxResult | None] = [None] * n
        queue: deque[int] = deque()
        for i, s in enumerate(structures):
            reason = self.check_structure(s)
            if reason is None:
                queue.append(i)
            else:
                results[i] = _failed_relax(s, reason, optimizer)

        surrogate = self

        class Run:
            def __init__(self, i: int) -> None:
                self.i = i
                self.atoms = AseAtomsAdaptor.get_atoms(structures[i])
                self.calc = calc_cls(surrogate)
                self.atoms.calc = self.calc
                self.target = _cell_filter(self.atoms) if cell_flags[i] else self.atoms
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
                """One pass of ``Dynamics.irun``'s loop body from the convergence check on;
                the results for the current state are stored. True when finished."""
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
                relaxed = AseAtomsAdaptor.get_structure(self.atoms)
                return type(structures[self.i])(relaxed.lattice, relaxed.species, relaxed.frac_coords)

            def result(self) -> RelaxResult:
                forces = self.target.get_forces()
                return RelaxResult(
                    structure=self.current_structure(),
                    energy_ev=float(self.atoms.get_potential_energy()),
                    is_converged=self.converged,
                    steps=int(self.opt.nsteps),
                    max_force_ev_per_a=float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0,
                    initial_energy_ev=self.initial,
                    optimizer=optimizer,
                    trajectory_energies_ev=self.energies,
                    seconds=self.seconds,
                )

            def failed(self, reason: str) -> RelaxResult:
                try:
                    current = self.current_structure()
                except Exception:  # noqa: BLE001 -- keep the input
                    current = structures[self.i]
                return replace(_failed_relax(current, f"step {self.opt.nsteps}: {reason}", optimizer),
                               steps=int(self.opt.nsteps), initial_energy_ev=self.initial,
                               trajectory_energies_ev=self.energies, seconds=self.seconds)

        stats = {"forward_passes": 0, "structure_evaluations": 0, "on_demand_evaluations": 0,
                 "max_structures_per_pass": 0, "seconds": 0.0}
        t_start = time.perf_counter()
        with _blas_one_thread():
            self._relax_lockstep(Run, queue, results, structures, optimizer, batch_size, stats)
        stats["seconds"] = time.perf_counter() - t_start
        self.last_relax_stats = stats
        return [r for r in results if r is not None]

    def _relax_lockstep(self, run_cls: Any, queue: Any, results: list[RelaxResult | None],
                        structures: Sequence[Structure], optimizer: str, batch_size: int,
                        stats: dict[str, Any]) -> None:
        """The lockstep loop of :meth:`relax_many` (fills ``results`` and ``stats``)."""
        import time

        active: list[Any] = []
        while queue or active:
            while queue and len(active) < batch_size:
                i = queue.popleft()
                try:
                    active.append(run_cls(i))
                except Exception as exc:  # noqa: BLE001 -- reported per structure
                    results[i] = _failed_relax(structures[i], f"{type(exc).__name__}: {exc}", optimizer)
            if not active:
                continue
            t0 = time.perf_counter()
            preds = self._predict_isolated([_atoms_to_structure(r.atoms) for r in active],
                                           batch_size=len(active), energy_only=False)
            share = (time.perf_counter() - t0) / len(active)
            stats["forward_passes"] += 1
            stats["structure_evaluations"] += len(active)
            stats["max_structures_per_pass"] = max(stats["max_structures_per_pass"], len(active))
            still: list[Any] = []
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


class _RelaxStepError(RuntimeError):
    """The batched forward pass failed for one structure of a :meth:`Surrogate.relax_many` step."""


def _failed_relax(structure: Any, reason: str, optimizer: str) -> RelaxResult:
    return RelaxResult(structure=structure, energy_ev=math.nan, is_converged=False, steps=0,
                       max_force_ev_per_a=math.nan, initial_energy_ev=math.nan, optimizer=optimizer,
                       error=reason)


def _atoms_to_structure(atoms: Any) -> Structure:
    """A pymatgen Structure of an ASE Atoms (Cartesian positions as they are, not wrapped)."""
    from pymatgen.core import Lattice
    from pymatgen.core import Structure as PmgStructure

    return PmgStructure(Lattice(np.array(atoms.cell.array, dtype=float)), atoms.get_chemical_symbols(),
                        atoms.get_positions(), coords_are_cartesian=True)


_STORED_RESULTS_CALCULATOR: type | None = None


def _stored_results_calculator() -> type:
    """The ASE calculator class of :meth:`Surrogate.relax_many` (built on first use: no ASE
    import when this module loads)."""
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

        def __init__(self, surrogate: Surrogate) -> None:
            super().__init__()
            self.surrogate = surrogate
            self.n_on_demand = 0

        def store(self, atoms: Any, prediction: Prediction) -> None:
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
            p = self.surrogate._predict_isolated([_atoms_to_structure(self.atoms)], batch_size=1,
                                                 energy_only=False)[0]
            if p.error is not None:
                raise _RelaxStepError(p.error)
            self.store(self.atoms, p)

    _STORED_RESULTS_CALCULATOR = StoredResultsCalculator
    return StoredResultsCalculator


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

    #: E+F+S through one backward pass without ``create_graph`` (see :meth:`_predict_batch`);
    #: ``False`` uses ``CHGNet.predict_graph``.
    single_backward: bool = True

    def _predict_batch(self, structures: list[Structure], *, energy_only: bool) -> list[Prediction]:
        """One CHGNet forward pass for ``structures``.

        ``CHGNet.predict_graph`` computes forces and stress with two ``autograd.grad`` calls
        with ``create_graph=True`` (what training needs): at inference that builds a
        double-backward graph and walks the graph twice. With :attr:`single_backward` the same
        batched graph and the same ``CHGNet._compute`` give the energy, and one
        ``autograd.grad`` without ``create_graph`` gives forces and strain derivatives together
        (1.5-2x faster on CPU; forces differ from ``predict_graph``'s by up to ~4e-5 eV/Å,
        float32 backward-kernel differences). Energies only run under ``torch.no_grad``.
        """
        import torch

        model = self.model
        model.eval()
        graphs = [model.graph_converter(s) for s in structures]
        device = next(model.parameters()).device
        graphs = [g.to(device) for g in graphs]
        if energy_only or self.single_backward:
            return self._predict_graphs(structures, graphs, energy_only=energy_only, torch=torch)
        raw = model.predict_graph(graphs, task="efs", batch_size=max(1, len(graphs)))
        if isinstance(raw, dict):
            raw = [raw]
        preds = []
        for s, r in zip(structures, raw, strict=True):
            n = len(s)
            e = float(np.asarray(r["e"]).reshape(-1)[0]) * (n if model.is_intensive else 1)
            preds.append(Prediction(
                e,
                np.asarray(r["f"], dtype=np.float64).reshape(n, 3),
                voigt_from_3x3(r["s"]) * GPA_TO_EV_PER_A3,
                n,
            ))
        return preds

    def _predict_graphs(self, structures: list[Structure], graphs: list[Any], *, energy_only: bool,
                        torch: Any) -> list[Prediction]:
        from chgnet.model.model import BatchedGraph

        model = self.model
        ctx = torch.no_grad() if energy_only else contextlib.nullcontext()
        with ctx:
            comp = 0 if model.composition_model is None else model.composition_model(graphs)
            bg = BatchedGraph.from_graphs(graphs, bond_basis_expansion=model.bond_basis_expansion,
                                          angle_basis_expansion=model.angle_basis_expansion,
                                          compute_stress=not energy_only)
            out = model._compute(bg, compute_force=False, compute_stress=False)
            n_atoms = out["atoms_per_graph"]
            e_model = out["e"]  # per atom when the model is intensive
            scale = n_atoms if model.is_intensive else torch.ones_like(n_atoms)
            energies = ((e_model + comp) * scale).detach().cpu().double().numpy().reshape(-1)
        if energy_only:
            return [Prediction(float(e), None, None, len(s))
                    for s, e in zip(structures, energies, strict=True)]
        k = len(graphs)
        grads = torch.autograd.grad((e_model * scale).sum(), [*bg.atom_positions, *bg.strains])
        volumes = bg.volumes.detach().cpu().double().numpy().reshape(-1)
        preds = []
        for j, s in enumerate(structures):
            forces = -grads[j].detach().cpu().double().numpy().reshape(len(s), 3)
            stress = grads[k + j].detach().cpu().double().numpy() / volumes[j]  # eV/Å^3
            preds.append(Prediction(float(energies[j]), forces, voigt_from_3x3(stress), len(s)))
        return preds

    def calculator(self) -> Calculator:
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):
            return CHGNetCalculator(self.model, use_device=self.device)


def _blas_one_thread() -> Any:
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


def _cell_filter_class() -> type:
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


def _cell_filter(atoms: Any) -> Any:
    """The cell filter of :meth:`Surrogate.relax` and :meth:`Surrogate.relax_many`: ASE's
    ``FrechetCellFilter`` computing the same numbers with less work (:func:`_cell_filter_class`)."""
    return _cell_filter_class()(atoms)


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


#: Environment variable: torch intra-op CPU threads for surrogates (see :func:`set_torch_threads`).
TORCH_THREADS_ENV = "CGWGAN_TORCH_THREADS"


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads; returns the number in effect.

    ``threads`` > 0 sets it; ``None`` or 0 reads ``CGWGAN_TORCH_THREADS`` and, when that is
    unset or 0 too, leaves torch's default (the number of cores) alone. The setting is
    process-wide. Use the number of cores when the process has the machine to itself; on a
    shared machine use 1 per process (with several threads each small forward pass waits for
    threads the OS has descheduled: measured here, an ASE-loop single point went from 13/s at
    1 thread to 0.5/s at 2 threads on 2 busy cores; ``OMP_WAIT_POLICY=PASSIVE`` set before
    torch is imported avoids most of that loss).
    """
    import os

    import torch

    if not threads:
        raw = os.environ.get(TORCH_THREADS_ENV, "").strip()
        try:
            threads = int(raw) if raw else 0
        except ValueError as exc:
            raise SurrogateError(f"{TORCH_THREADS_ENV}={raw!r} is not an integer") from exc
    if threads and threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())


def load_surrogate(
    name_or_folder: str,
    *,
    registry: dict[str, SurrogateSpec] | None = None,
    models_dir: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> Surrogate:
    """Load a surrogate by registry name or weights folder/file.

    ``registry``: from :func:`load_registry` (default: the built-ins with ``models_dir``).
    The weights file's sha256 must equal the registry's; an M3GNet model trained with matgl's
    DGL code gets its conventions restored (see :mod:`lib._m3gnet_legacy`). ``threads``: torch
    CPU threads for this process (:func:`set_torch_threads`; default: ``CGWGAN_TORCH_THREADS``
    if set, else torch's default).
    """
    set_torch_threads(threads)
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
