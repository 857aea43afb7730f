"""CHGNet through the chgnet package.

Weights: a checkpoint file (``.pth.tar``), or ``chgnet:<version>`` for a checkpoint that ships
inside the chgnet wheel (so ``CHGNet-0.3.0`` works offline); the checkpoint's sha256
identifies them.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lib.ids import file_sha256
from lib.surrogates.base import (
    GPA_TO_EV_PER_A3,
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

#: sha256 of the CHGNet checkpoints that ship inside the chgnet 0.4.x wheel.
CHGNET_WHEEL_SHA256: dict[str, str] = {
    "0.3.0": "d14ab7c0f093efe64b60a7bcd540bca10e74fb7f46c86108a079af60524659d1",
    "0.2.0": "ef624f78b6db9d315b4ef256f1bb3207449924191b91720dc17d3f60c5df980e",
}
#: weights ``chgnet:<version>``: the checkpoint inside the chgnet wheel
WHEEL_PREFIX = "chgnet:"
#: CHGNet's atom embedding covers Z = 1..94.
_CHGNET_MAX_Z = 94


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
        # from_graphs always sets a Tensor; chgnet's hint also allows a sequence of them
        volumes = bg.volumes.detach().cpu().double().numpy().reshape(-1)  # type: ignore[union-attr]
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


def wheel_file(version: str) -> Path:
    """The checkpoint of CHGNet ``version`` inside the installed chgnet wheel."""
    import chgnet

    folder = Path(chgnet.__file__).parent / "pretrained" / version
    files = sorted(folder.glob("*.pth.tar"))
    if not files:
        raise SurrogateError(f"CHGNet {version!r}: no checkpoint in {folder}")
    return files[0]


def weights_file(weights: str) -> Path:
    """The checkpoint file (inside the wheel for ``chgnet:<version>``)."""
    if weights.startswith(WHEEL_PREFIX):
        return wheel_file(weights[len(WHEEL_PREFIX):])
    return Path(weights)


def spec_from_path(path: Path) -> SurrogateSpec | None:
    """An ad-hoc spec for a CHGNet checkpoint file; ``None`` when ``path`` is none."""
    if not (path.is_file() and path.name.endswith((".pth.tar", ".pt", ".pth"))):
        return None
    return SurrogateSpec(name=path.name.split(".")[0], kind="chgnet", weights=str(path),
                         sha256=file_sha256(str(path)), version="", convention="native")


def load(spec: SurrogateSpec, wfile: Path, device: str) -> CHGNetSurrogate:
    """Load the CHGNet checkpoint of ``spec`` (from the wheel for ``chgnet:<version>``)."""
    import chgnet
    from chgnet.model import CHGNet

    assert spec.weights is not None
    with contextlib.redirect_stdout(io.StringIO()):
        if spec.weights.startswith(WHEEL_PREFIX):
            model = CHGNet.load(model_name=spec.weights[len(WHEEL_PREFIX):],
                                use_device=device, verbose=False)
        else:
            model = CHGNet.from_file(str(wfile)).to(device)
    model.eval()
    model.graph_converter.set_isolated_atom_response("error")
    return CHGNetSurrogate(spec, model, device=device, library_version=f"chgnet {chgnet.__version__}")


FAMILY = Family(
    kind="chgnet",
    load=load,
    weights_file=weights_file,
    spec_from_path=spec_from_path,
    path_hint="a CHGNet checkpoint file",
    default_convention="native",
    packaged_prefix=WHEEL_PREFIX,
)
