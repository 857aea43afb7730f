"""M3GNet through matgl (PyTorch Geometric backend), with the DGL-era conventions restored.

M3GNet weights trained with matgl's DGL implementation (matgl <= 2.x, which includes both
built-in M3GNet models) run under different message-passing conventions in matgl >= 3; the
loader restores the conventions the weights were trained with on the loaded model instance
(:mod:`lib.surrogates._m3gnet_legacy`), deciding by the explicit ``convention`` of the registry
entry, else the sha256 of ``state.pt`` for the known legacy files, else the version fields of
``model.json`` (:func:`detect_m3gnet_convention`).

Weights: a matgl model folder (``model.json``, ``model.pt``, ``state.pt``); ``state.pt``'s
sha256 identifies them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib.ids import file_sha256
from lib.surrogates.base import (
    GPA_TO_EV_PER_A3,
    Convention,
    Family,
    Prediction,
    Surrogate,
    SurrogateError,
    SurrogateKind,
    SurrogateSpec,
    voigt_from_3x3,
)

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

#: sha256 of ``state.pt`` of the M3GNet weights known to be trained with matgl's DGL code.
KNOWN_DGL_LEGACY_STATE_SHA256: dict[str, str] = {
    "a9aa723705bd1a242ec8749332f137811c4a94e17995a564f8f94a9aca68061b": "M3GNet-MP-2021.2.8-PES",
    "9f710eac88ec2c666c8e488883c59768cf11c116f177e9d82896ae56f3fc338d": "M3GNet-MatPES-PBE-v2025.1-PES",
}


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
        self._energy_model: Any = None  # compile_energy_pass: the compiled model of energy-only passes

    def compile_energy_pass(self) -> bool:
        """``torch.compile(model, dynamic=True)`` for energy-only passes (the pre-screen): on CPU
        the pre-screen ran 1.21x as fast after a one-off compile of ~36 s per process (cached on
        disk by torch after that), energies equal to the eager model's within 3.3e-5 eV/atom
        (600 Ba-Ru-O candidates, benchmarks/results/bench_prescreen.md). Forces and relaxations
        keep the eager model."""
        import torch

        if self._energy_model is None:
            self._energy_model = torch.compile(self.potential.model, dynamic=True)
        return True

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
        saved = (pot.calc_forces, pot.calc_stresses, pot.model)
        try:
            pot.calc_forces = not energy_only
            pot.calc_stresses = not energy_only
            if energy_only:
                if self._energy_model is not None:
                    pot.model = self._energy_model
                with torch.no_grad():
                    out = pot(g, lat, state)
            else:
                out = pot(g, lat, state)  # Potential moves g, lat and state to its device
        finally:
            pot.calc_forces, pot.calc_stresses, pot.model = saved
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


def detect_m3gnet_convention(folder: str | Path, *, sha256: str | None = None) -> tuple[Convention, str]:
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


def weights_file(weights: str) -> Path:
    """``state.pt`` of the model folder: its sha256 identifies the weights."""
    return Path(weights) / "state.pt"


def spec_from_path(path: Path) -> SurrogateSpec | None:
    """An ad-hoc spec for a matgl M3GNet folder; ``None`` when ``path`` is no matgl folder."""
    if not (path.is_dir() and (path / "model.json").is_file()):
        return None
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


def load(spec: SurrogateSpec, wfile: Path, device: str) -> M3GNetSurrogate:
    """Load the matgl potential of ``spec`` and restore the DGL conventions when its weights need them."""
    import matgl

    from lib.surrogates import _m3gnet_legacy

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
    spec = replace(spec, convention=convention)
    return M3GNetSurrogate(spec, potential, device=device,
                           library_version=f"matgl {matgl.__version__}", convention_source=why)


FAMILY = Family(
    kind="m3gnet",
    load=load,
    weights_file=weights_file,
    spec_from_path=spec_from_path,
    path_hint="a matgl model folder (model.json + state.pt)",
    default_convention="auto",
    weights_in_models_dir=True,
)
