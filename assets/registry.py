"""The surrogate registry as an observable source asset.

Its data version is a hash of the registered surrogates' weight hashes, so registering a new
surrogate (a model folder plus a registry entry) or changing a surrogate's weights changes it, and
``surrogate_registry_sensor`` (``orchestration/sensors.py``) reacts by adding the partitions and
requesting the re-screening runs. The sensor also records the observation (the same data version
and metadata, :func:`registry_observation`) on every tick that finds the version changed, so the
asset is observed without anyone clicking Observe.

Which surrogates count (:func:`registered_surrogates`): the entries of the registry file when one
is configured (``CGWGAN_SURROGATES``), otherwise the built-in ones; in both cases only those whose
weights are present here (a built-in M3GNet entry without a models folder is listed as unavailable).
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg

from lib.ids import content_hash
from lib.surrogates import SurrogateSpec, load_registry
from lib.surrogates.registry import load_registry_entries
from orchestration.resources import SurrogateRegistryResource


def registry_file_names(path: str) -> list[str]:
    """Names of the entries of a registry file (list, ``{"surrogates": [...]}`` or name -> entry)."""
    p = Path(path).expanduser()
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data: Any = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, dict) and "surrogates" in data:
        data = data["surrogates"]
    if isinstance(data, dict):
        return [str(k) for k in data]
    if isinstance(data, list):
        return [str(e["name"]) for e in data if isinstance(e, dict) and e.get("name")]
    return []


def weights_available(spec: SurrogateSpec) -> bool:
    """Whether the weights this entry names are present (CHGNet wheel weights always are)."""
    if not spec.weights or not spec.sha256:
        return False
    if spec.kind == "chgnet":
        return spec.weights.startswith("chgnet:") or Path(spec.weights).is_file()
    return (Path(spec.weights) / "state.pt").is_file()


def registered_surrogates(registry_path: str, models_dir: str) -> tuple[dict[str, SurrogateSpec], list[str]]:
    """(available registered surrogates by name, names registered but not usable here).

    With a registry file its entries are read one by one (``load_registry_entries``, weights
    verified against their sha256): a malformed entry, missing weights or a wrong hash make that
    entry unavailable, not the whole registry unreadable (as the registry sensor sees it)."""
    if registry_path:
        registry, _ = load_registry_entries(registry_path, models_dir=models_dir or None)
    else:
        registry = load_registry(None, models_dir=models_dir or None)
    names = registry_file_names(registry_path) if registry_path else list(registry)
    active = {n: registry[n] for n in names if n in registry and weights_available(registry[n])}
    missing = [n for n in names if n not in active]
    return active, missing


def registry_version(active: dict[str, SurrogateSpec]) -> str:
    """Data version of the registry: hash of the sorted (name, weights sha256) pairs."""
    return content_hash(sorted((n, s.sha256) for n, s in active.items()), length=16)


def registry_observation(surrogate_registry: SurrogateRegistryResource) -> tuple[str, dict[str, Any]]:
    """(data version, metadata) of an observation of the registry: what the ``surrogate_registry``
    asset reports when observed, and what ``surrogate_registry_sensor`` records when it changes."""
    active, missing = registered_surrogates(surrogate_registry.resolved_registry_path,
                                            surrogate_registry.resolved_models_dir)
    rows = "\n".join(f"| {n} | {s.kind} | {s.version} | {s.sha256[:16]} | {s.surrogate_id} |"
                     for n, s in sorted(active.items()))
    return registry_version(active), {
        "n_surrogates": len(active),
        "surrogates": ", ".join(sorted(active)),
        "unavailable": ", ".join(missing) or "none",
        "registry_file": surrogate_registry.resolved_registry_path or "(built-in entries)",
        "models_dir": surrogate_registry.resolved_models_dir or "(not set)",
        "registry": dg.MetadataValue.md("| name | kind | version | sha256 | id |\n|---|---|---|---|---|\n" + rows),
    }


@dg.observable_source_asset(group_name="screening", description=(
    "Registered surrogates (registry file + model folders). Data version: hash of the weights' sha256s. "
    "Observed by surrogate_registry_sensor whenever that changes (and by Observe in the UI)."))
def surrogate_registry(surrogate_registry: SurrogateRegistryResource) -> dg.ObserveResult:
    version, metadata = registry_observation(surrogate_registry)
    return dg.ObserveResult(data_version=dg.DataVersion(version), metadata=metadata)
