"""The paper's surrogate, the original TensorFlow M3GNet, through its worker
(lib.surrogates.m3gnet_tf_client).

The reference file holds energies, forces and stresses computed by ``m3gnet`` 0.2.4 itself (its
ASE ``M3GNetCalculator``) on 12 structures. The worker runs in ``.venv-m3gnet-tf`` (``make
tf-m3gnet``, a dependency of ``make test``): outside CI a missing env skips these tests with a
message, in CI (``CI=true``) it fails them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from lib.surrogates.m3gnet_tf_client import (
    DEFAULT_VENV,
    M3GNetTFClient,
    M3GNetTFEnvError,
    M3GNetTFWeightsError,
    venv_python,
)
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
MODEL = "M3GNet-TF-MP-2021.2.8-EFS"
E_TOL_EV_PER_ATOM = 1e-4
F_TOL_EV_PER_A = 1e-3
S_TOL_EV_PER_A3 = 1e-4  # 0.016 GPa


@pytest.fixture(scope="module")
def weights_dir(shared_dir: Path) -> Path:
    d = shared_dir / "models" / MODEL
    if not (d / "m3gnet.json").is_file():
        skip_or_fail(f"TensorFlow M3GNet weights not found at {d}")
    return d


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> dict:
    path = shared_dir / "data" / "m3gnet_reference" / f"{MODEL}.tf-reference.json"
    if not path.is_file():
        skip_or_fail(f"TensorFlow M3GNet reference not found at {path}")
    data = json.loads(path.read_text())
    return {name: {**entry, "structure": Structure.from_dict(entry["structure"])}
            for name, entry in data["structures"].items()}


@pytest.fixture(scope="module")
def tf_python() -> Path:
    """The TensorFlow venv's python (``make tf-m3gnet``); skipped, or failed in CI, without it."""
    python = venv_python(REPO / DEFAULT_VENV)
    if not python.exists():
        skip_or_fail(f"TensorFlow M3GNet environment not installed ({python} missing): run `make tf-m3gnet`")
    return python


@pytest.fixture(scope="module")
def tf_client(weights_dir: Path, tf_python: Path):
    client = M3GNetTFClient(tf_python, weights_dir, threads=2, request_timeout_s=600)
    client.start()
    yield client
    client.close()


def _deviations(preds, reference: dict, names: list[str]) -> tuple[float, float, float]:
    de = df = ds = 0.0
    for name, p in zip(names, preds, strict=True):
        ref = reference[name]
        n = len(ref["structure"])
        assert p.ok, f"{name}: {p.error}"
        de = max(de, abs(p.energy_ev - ref["energy"]) / n)
        df = max(df, float(np.abs(p.forces_ev_per_a - np.asarray(ref["forces"])).max()))
        ds = max(ds, float(np.abs(p.stress_ev_per_a3 - np.asarray(ref["stress"])).max()))
    return de, df, ds


# --- errors that need no TensorFlow environment --------------------------------------------


def test_missing_environment_says_how_to_install(tmp_path: Path) -> None:
    client = M3GNetTFClient(tmp_path / "no-venv" / "bin" / "python", tmp_path)
    with pytest.raises(M3GNetTFEnvError, match=r"make tf-m3gnet"):
        client.start()
    assert not client.running


def test_missing_or_incomplete_weights_folder(tmp_path: Path) -> None:
    with pytest.raises(M3GNetTFWeightsError, match="weights folder not found"):
        M3GNetTFClient(sys.executable, tmp_path / "absent").start()
    (tmp_path / "m3gnet.json").write_text("{}")
    with pytest.raises(M3GNetTFWeightsError, match=r"missing m3gnet\.index, m3gnet\.data-00000-of-00001"):
        M3GNetTFClient(sys.executable, tmp_path).start()


def test_environment_without_tensorflow_is_reported(tmp_path: Path) -> None:
    """The worker itself, run by a python that lacks TensorFlow (the project's): it answers that
    it cannot start, and the client turns that into an install hint."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - the project's venv has no TensorFlow
        pytest.skip("this python has TensorFlow")
    for name in ("m3gnet.json", "m3gnet.index", "m3gnet.data-00000-of-00001"):
        (tmp_path / name).write_text("")
    client = M3GNetTFClient(sys.executable, tmp_path, startup_timeout_s=120)
    with pytest.raises(M3GNetTFEnvError, match=r"(?s)tensorflow.*make tf-m3gnet"):
        client.start()
    assert not client.running


# --- the worker against m3gnet's own numbers -------------------------------------------------


def test_environment_is_the_papers(tf_client: M3GNetTFClient) -> None:
    v = tf_client.versions
    assert v["m3gnet"] == "0.2.4"
    assert v["tensorflow"].startswith("2.15.")
    assert v["numpy"].startswith("1.")
    assert {"H", "O", "Ba", "Ru", "Pu"} <= tf_client.supported_elements
    assert "Am" not in tf_client.supported_elements


@pytest.mark.parametrize("batch_size", [1, 32])
def test_matches_tf_reference(tf_client: M3GNetTFClient, reference: dict, batch_size: int) -> None:
    names = list(reference)
    preds = tf_client.predict([reference[n]["structure"] for n in names], batch_size=batch_size)
    de, df, ds = _deviations(preds, reference, names)
    print(f"batch_size={batch_size}: max |dE| {de:.2e} eV/atom, |dF| {df:.2e} eV/Å, |dS| {ds:.2e} eV/Å^3")
    assert de <= E_TOL_EV_PER_ATOM
    assert df <= F_TOL_EV_PER_A
    assert ds <= S_TOL_EV_PER_A3


def test_energy_only(tf_client: M3GNetTFClient, reference: dict) -> None:
    names = list(reference)
    preds = tf_client.predict([reference[n]["structure"] for n in names], energy_only=True)
    for name, p in zip(names, preds, strict=True):
        assert p.ok and p.forces_ev_per_a is None and p.stress_ev_per_a3 is None
        n = len(reference[name]["structure"])
        assert abs(p.energy_ev - reference[name]["energy"]) / n <= E_TOL_EV_PER_ATOM, name


def test_a_bad_structure_does_not_fail_the_batch(tf_client: M3GNetTFClient, reference: dict) -> None:
    good = reference["BaRuO3_cub_a4.0"]["structure"]
    americium = Structure(Lattice.cubic(4.0), ["Am", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    overlapping = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.001, 0, 0]])
    disordered = Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "Cl"],
                           [[0, 0, 0], [0.5, 0.5, 0.5]])
    preds = tf_client.predict([good, americium, overlapping, disordered, good], batch_size=8)
    assert [p.ok for p in preds] == [True, False, False, False, True]
    assert "Am" in preds[1].error and "not covered" in preds[1].error
    assert "overlapping sites" in preds[2].error
    assert "partial occupancies" in preds[3].error
    assert math.isnan(preds[1].energy_ev) and np.isnan(preds[1].forces_ev_per_a).all()
    assert preds[1].forces_ev_per_a.shape == (2, 3)
    _, df, _ = _deviations([preds[0], preds[4]], reference, ["BaRuO3_cub_a4.0"] * 2)
    assert df <= F_TOL_EV_PER_A
    for p in (preds[0], preds[4]):
        assert abs(p.energy_ev - reference["BaRuO3_cub_a4.0"]["energy"]) / 5 <= E_TOL_EV_PER_ATOM
    assert tf_client.running


#: m3gnet 0.2.4's own ``Relaxer(potential).relax(s, fmax=0.1, steps=500)`` on these structures,
#: run here in the TensorFlow venv: final energy (eV/cell) and FIRE steps.
M3GNET_RELAXER = {"NaCl_rattled": (-27.09911, 33), "BaRuO3_rattled": (-69.20049, 78)}


def test_relax_is_m3gnets_relaxer(tf_client: M3GNetTFClient, reference: dict) -> None:
    names = list(M3GNET_RELAXER)
    bad = Structure(Lattice.cubic(4.0), ["Am", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    structures = [reference[n]["structure"] for n in names]
    results = tf_client.relax([structures[0], bad, structures[1]], fmax=0.1, steps=500)
    assert not results[1].ok and "not covered" in results[1].error
    for name, start, r in zip(names, structures, [results[0], results[2]], strict=True):
        energy, steps = M3GNET_RELAXER[name]
        n = len(start)
        assert r.ok, r.error
        assert r.is_converged and r.max_force_ev_per_a < 0.1
        assert abs(r.energy_ev - energy) / n <= E_TOL_EV_PER_ATOM, (name, r.energy_ev)
        assert abs(r.steps - steps) <= 2, (name, r.steps)
        assert r.energy_ev < r.initial_energy_ev
        assert len(r.trajectory_energies_ev) == r.steps + 1
        assert isinstance(r.structure, Structure)
        assert r.structure.composition == start.composition
        # the reported energy, forces and stress are those of the returned structure
        again = tf_client.predict([r.structure])[0]
        assert abs(again.energy_ev - r.energy_ev) / n <= 1e-5
        assert np.abs(again.forces_ev_per_a - r.forces_ev_per_a).max() <= 1e-4
        assert np.abs(again.stress_ev_per_a3 - r.stress_ev_per_a3).max() <= 1e-5


def test_worker_is_persistent_and_closes(tf_client: M3GNetTFClient) -> None:
    tf_client.start()
    pid = tf_client.pid
    tf_client.ping()
    tf_client.ping()
    assert pid is not None and tf_client.pid == pid  # one process, the model loaded once
    proc = tf_client._proc
    tf_client.close()
    assert proc is not None and proc.poll() == 0  # it exited on the shutdown request
    assert not tf_client.running and tf_client.pid is None


# --- the registered surrogate family (lib.surrogates.load_surrogate) -------------------------


def _mp_structure(shared_dir: Path, material_id: str) -> Structure:
    import polars as pl

    path = shared_dir / "data" / "mp" / "ba_ru_o" / "ba_ru_o_mp_structures.csv"
    rows = pl.read_csv(path).filter(pl.col("material_id") == material_id)
    assert rows.height == 1, f"{material_id} not in {path}"
    return Structure.from_str(rows["cif"][0], fmt="cif")


@pytest.fixture(scope="module")
def tf_surrogate(weights_dir: Path, tf_python: Path):
    from lib.surrogates import load_surrogate

    sur = load_surrogate(MODEL, models_dir=str(weights_dir.parent), worker_python=str(tf_python))
    yield sur
    sur.close()


def test_registered_as_the_papers_surrogate() -> None:
    from lib.surrogates import FAMILIES, builtin_specs
    from lib.surrogates.m3gnet_tf import M3GNET_TF_MP_2021_SHA256

    specs = builtin_specs(models_dir="/models")
    spec = specs[MODEL]
    assert "m3gnet_tf" in FAMILIES and spec.kind == "m3gnet_tf"
    assert spec.weights == f"/models/{MODEL}" and spec.sha256 == M3GNET_TF_MP_2021_SHA256
    assert "paper's surrogate" in spec.description and "0.2.4" in spec.description
    # matgl's M3GNet is a separately trained model, and says so
    assert "not the paper's surrogate" in specs["M3GNet-MP-2021.2.8-PES"].description


def test_weights_folder_resolves_to_the_registry_entry(weights_dir: Path) -> None:
    from lib.surrogates import resolve_spec
    from lib.surrogates.m3gnet_tf import M3GNET_TF_MP_2021_SHA256

    spec = resolve_spec(str(weights_dir))
    assert spec.kind == "m3gnet_tf" and spec.sha256 == M3GNET_TF_MP_2021_SHA256
    assert spec.name == MODEL and spec.surrogate_id == "sur-" + M3GNET_TF_MP_2021_SHA256[:16]


def test_load_surrogate_without_the_environment_names_make_tf_m3gnet(
        weights_dir: Path, tmp_path: Path) -> None:
    from lib.surrogates import load_surrogate

    for python in (None, str(tmp_path / "no-venv" / "bin" / "python")):
        with pytest.raises(M3GNetTFEnvError, match=r"make tf-m3gnet"):
            load_surrogate(MODEL, models_dir=str(weights_dir.parent), worker_python=python)


def test_load_surrogate_matches_tf_reference(tf_surrogate, reference: dict) -> None:
    from lib.surrogates import M3GNetTFSurrogate
    from lib.surrogates.m3gnet_tf import M3GNET_TF_MP_2021_SHA256

    assert isinstance(tf_surrogate, M3GNetTFSurrogate)
    assert tf_surrogate.weights_sha256 == M3GNET_TF_MP_2021_SHA256
    assert tf_surrogate.library_version.startswith("m3gnet 0.2.4 (tensorflow 2.15.")
    names = list(reference)
    assert len(names) == 12
    preds = tf_surrogate.predict([reference[n]["structure"] for n in names], batch_size=5)
    de, df, ds = _deviations(preds, reference, names)
    print(f"load_surrogate: max |dE| {de:.2e} eV/atom, |dF| {df:.2e} eV/Å, |dS| {ds:.2e} eV/Å^3")
    assert de <= E_TOL_EV_PER_ATOM
    assert df <= F_TOL_EV_PER_A
    assert ds <= S_TOL_EV_PER_A3
    # the ASE calculator gives the same numbers
    atoms = reference["SrTiO3_rattled"]["structure"].to_ase_atoms()
    atoms.calc = tf_surrogate.calculator()
    n = len(atoms)
    assert abs(atoms.get_potential_energy() - reference["SrTiO3_rattled"]["energy"]) / n <= E_TOL_EV_PER_ATOM
    assert np.abs(atoms.get_forces() - np.asarray(reference["SrTiO3_rattled"]["forces"])).max() <= F_TOL_EV_PER_A


def test_element_not_covered_is_a_clear_error(tf_surrogate, reference: dict) -> None:
    from lib.surrogates import StructureInputError

    americium = Structure(Lattice.cubic(4.0), ["Am", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    good = reference["BaRuO3_cub_a4.0"]["structure"]
    preds = tf_surrogate.predict_safe([good, americium], energy_only=True)
    assert preds[0].ok and not preds[1].ok
    assert "Am" in preds[1].error and "not covered by surrogate " + MODEL in preds[1].error
    with pytest.raises(StructureInputError, match=r"structure 1: element\(s\) Am not covered"):
        tf_surrogate.predict([good, americium])
    with pytest.raises(StructureInputError, match="Am not covered"):
        tf_surrogate.relax(americium)


def test_structure_without_three_body_terms(tf_surrogate, reference: dict) -> None:
    """bcc Ba at its experimental volume (a = 5.028 A: neighbours 4.35 A apart, beyond the 4 A
    three-body cutoff) alone is a batch m3gnet 0.2.4 itself cannot evaluate (m3gnet#64); the
    worker's carrier makes it evaluable, with the energy, forces and stress Ba gets in a batch
    beside a crystal that has three-body terms, and it relaxes (the elemental reference the
    formation energies of every Ba compound need)."""
    ba = Structure(Lattice.cubic(5.028), ["Ba", "Ba"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    good = reference["BaRuO3_cub_a4.0"]["structure"]
    alone = tf_surrogate.predict([ba])[0]
    beside = tf_surrogate.predict([good, ba])[1]
    assert abs(alone.energy_ev - beside.energy_ev) / 2 < 1e-6
    assert -2.0 < alone.energy_ev / 2 < -1.7  # eV/atom (MP's GGA Ba: -1.92)
    np.testing.assert_allclose(alone.forces_ev_per_a, beside.forces_ev_per_a, atol=1e-5)
    np.testing.assert_allclose(alone.stress_ev_per_a3, beside.stress_ev_per_a3, atol=1e-6)
    res = tf_surrogate.relax(ba.get_primitive_structure())
    assert res.ok and res.is_converged and res.energy_ev / len(res.structure) <= alone.energy_ev / 2 + 1e-6


def test_relax_rattled_bao_rocksalt(tf_surrogate, shared_dir: Path) -> None:
    """MP's BaO rocksalt (mp-1342), conventional cell strained 3 % and rattled: the shared
    driver (FIRE on FrechetCellFilter) through the worker's calculator, and ``relax_many``."""
    bao = _mp_structure(shared_dir, "mp-1342")
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    conv = SpacegroupAnalyzer(bao).get_conventional_standard_structure()
    assert conv.composition.reduced_formula == "BaO" and len(conv) == 8
    start = conv.copy()
    start.apply_strain(0.03)
    rng = np.random.default_rng(0)
    start = Structure(start.lattice, start.species,
                      start.cart_coords + rng.normal(0, 0.05, (len(start), 3)), coords_are_cartesian=True)
    r = tf_surrogate.relax(start, fmax=0.05, steps=300)
    assert r.ok, r.error
    assert r.is_converged and r.steps < 300
    assert r.energy_ev < r.initial_energy_ev - 0.05, (r.initial_energy_ev, r.energy_ev)
    again = tf_surrogate.predict([r.structure])[0]
    assert float(np.abs(again.forces_ev_per_a).max()) < 0.05
    [rm] = tf_surrogate.relax_many([start], fmax=0.05, steps=300)
    assert rm.ok and rm.is_converged
    assert abs(rm.energy_ev - r.energy_ev) / len(start) <= 1e-4
    print(f"BaO relax: {r.initial_energy_ev / 8:.4f} -> {r.energy_ev / 8:.4f} eV/atom in {r.steps} "
          f"steps, a = {r.structure.lattice.a:.3f} Å (MP {conv.lattice.a:.3f})")


def test_surrogate_close_stops_its_worker(weights_dir: Path, tf_python: Path) -> None:
    from lib.surrogates import load_surrogate

    with load_surrogate(MODEL, models_dir=str(weights_dir.parent), worker_python=str(tf_python)) as sur:
        proc = sur.client._proc
        assert sur.client.running and proc is not None
    assert proc.poll() == 0 and not sur.client.running


def test_resource_passes_the_tf_python(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.resources import SurrogateRegistryResource, configured

    monkeypatch.delenv("CGWGAN_M3GNET_TF_PYTHON", raising=False)
    reg = configured("surrogate_registry")
    assert isinstance(reg, SurrogateRegistryResource)
    assert reg.resolved_m3gnet_tf_python == str(venv_python(REPO / DEFAULT_VENV))
    monkeypatch.setenv("CGWGAN_M3GNET_TF_PYTHON", "/opt/tf/bin/python")
    reg = configured("surrogate_registry")
    assert isinstance(reg, SurrogateRegistryResource)
    assert reg.resolved_m3gnet_tf_python == "/opt/tf/bin/python"
