"""Machine-learned surrogate potentials (M3GNet via matgl, CHGNet): one entry point.

``load_surrogate(name_or_folder, *, registry=None, models_dir=None, device="cpu")`` returns a
:class:`Surrogate` whatever the model family. It gives, for a list of pymatgen ``Structure``:

- :meth:`Surrogate.predict` -- energy (eV per cell), forces (eV/Å) and stress (eV/Å³, ASE
  Voigt order ``xx yy zz yz xz xy`` and ASE sign), many structures per forward pass;
- :meth:`Surrogate.predict_safe` -- the same, but a structure the model cannot take (an element
  it does not cover, no sites, a degenerate cell, a failing graph) gets a :class:`Prediction`
  with ``error`` set and NaN values, and the rest of the batch proceeds;
- :meth:`Surrogate.calculator` -- the library's own ASE calculator (stress in eV/Å³);
- :meth:`Surrogate.relax` -- an ASE relaxation (FIRE, FIRE2, BFGS or LBFGS, cell through
  ``FrechetCellFilter``) through the library's calculator, one structure;
- :meth:`Surrogate.relax_many` -- the same relaxation for many structures in lockstep, each
  optimiser step's energies, forces and stresses of all running structures from one batched
  forward pass (per-structure errors, the rest finish).

torch's CPU threads: :func:`set_torch_threads` (``load_surrogate(threads=...)``; the caller
decides, this library reads no environment); BLAS is held to one thread during relaxations.

Surrogates are named in a registry (:func:`load_registry`): four built-ins
(``CHGNet-0.3.0``, whose weights ship inside the ``chgnet`` wheel and so is the offline default;
``M3GNet-MP-2021.2.8-PES`` and ``M3GNet-MatPES-PBE-v2025.1-PES``, matgl folders under
``models_dir``; ``M3GNet-TF-MP-2021.2.8-EFS``, the paper's TensorFlow M3GNet, a folder under
``models_dir`` run in a worker under ``worker_python``, see :mod:`lib.surrogates.m3gnet_tf`)
plus any entries of an optional JSON/YAML registry file. Each entry records the sha256 of its
weights file, and :func:`surrogate_id` gives the ``sur-`` id used in table lineage.

The package:

- ``base``: :class:`SurrogateSpec`, :class:`Prediction`, errors, the :class:`Surrogate` base
  (input checks, batching) and the :class:`Family` contract of a model family;
- ``relax``: the relaxation driver (optimisers, cell filter, lockstep ``relax_many``);
- ``m3gnet`` (+ ``_m3gnet_legacy``, the DGL-era conventions), ``chgnet`` and ``m3gnet_tf``
  (+ ``m3gnet_tf_client``, the transport to its TensorFlow worker): one module per model family;
- ``registry``: :data:`FAMILIES` (kind -> family: a new family is its module plus one entry
  there), built-in specs, registry files;
- ``loading``: :func:`load_surrogate` (sha256 check, the in-process cache) and
  :func:`set_torch_threads`.

Example (a notebook)::

    from lib.surrogates import load_surrogate
    sur = load_surrogate("M3GNet-MP-2021.2.8-PES", models_dir="/path/to/matgl/pretrained_models")
    preds = sur.predict(structures, batch_size=32)
    result = sur.relax(structures[0], fmax=0.05)
    results = sur.relax_many(structures, fmax=0.05, steps=300, batch_size=32)
"""

from lib.surrogates.base import (
    GPA_TO_EV_PER_A3,
    MIN_SITE_DISTANCE_A,
    Convention,
    Family,
    Prediction,
    StructureInputError,
    Surrogate,
    SurrogateError,
    SurrogateKind,
    SurrogateSpec,
    predictions_to_frame,
    surrogate_id,
    voigt_from_3x3,
)
from lib.surrogates.chgnet import CHGNET_WHEEL_SHA256, CHGNetSurrogate
from lib.surrogates.loading import clear_surrogate_cache, load_surrogate, set_torch_threads
from lib.surrogates.m3gnet import KNOWN_DGL_LEGACY_STATE_SHA256, M3GNetSurrogate, detect_m3gnet_convention
from lib.surrogates.m3gnet_tf import M3GNetTFSurrogate
from lib.surrogates.registry import (
    DEFAULT_SURROGATE,
    FAMILIES,
    builtin_specs,
    load_registry,
    registry_frame,
    resolve_spec,
)
from lib.surrogates.relax import Optimizer, RelaxResult

__all__ = [
    "CHGNET_WHEEL_SHA256",
    "DEFAULT_SURROGATE",
    "FAMILIES",
    "GPA_TO_EV_PER_A3",
    "KNOWN_DGL_LEGACY_STATE_SHA256",
    "MIN_SITE_DISTANCE_A",
    "CHGNetSurrogate",
    "Convention",
    "Family",
    "M3GNetSurrogate",
    "M3GNetTFSurrogate",
    "Optimizer",
    "Prediction",
    "RelaxResult",
    "StructureInputError",
    "Surrogate",
    "SurrogateError",
    "SurrogateKind",
    "SurrogateSpec",
    "builtin_specs",
    "clear_surrogate_cache",
    "detect_m3gnet_convention",
    "load_registry",
    "load_surrogate",
    "predictions_to_frame",
    "registry_frame",
    "resolve_spec",
    "set_torch_threads",
    "surrogate_id",
    "voigt_from_3x3",
]
