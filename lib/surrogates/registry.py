"""Which surrogates exist: the model families, the built-in entries and an optional registry file.

:data:`FAMILIES` maps each ``kind`` to its :class:`~lib.surrogates.base.Family` (the one place a
new model family is registered). :func:`load_registry` gives the built-in surrogates
(:func:`builtin_specs`) plus the entries of an optional JSON/YAML registry file;
:func:`resolve_spec` turns a registry name or a weights folder/file into a
:class:`~lib.surrogates.base.SurrogateSpec`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from lib.ids import file_sha256
from lib.surrogates import chgnet, m3gnet, m3gnet_tf
from lib.surrogates.base import Family, SurrogateError, SurrogateSpec

#: kind -> family. A new family: its module plus one entry here. Folders/files given by path are
#: tried against the families in this order.
FAMILIES: dict[str, Family] = {
    "m3gnet": m3gnet.FAMILY,
    "chgnet": chgnet.FAMILY,
    "m3gnet_tf": m3gnet_tf.FAMILY,
}

DEFAULT_SURROGATE = "CHGNet-0.3.0"

_CONVENTIONS = ("dgl-legacy", "native", "auto")
_ENTRY_FIELDS = {"name", "kind", "weights", "sha256", "version", "convention", "description"}


def family(kind: str) -> Family:
    """The family of ``kind`` (:class:`SurrogateError` for an unknown kind)."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise SurrogateError(f"unknown surrogate kind {kind!r} (known: {', '.join(FAMILIES)})") from None


def builtin_specs(*, models_dir: str | None = None) -> dict[str, SurrogateSpec]:
    """The built-in surrogates; M3GNet folders (matgl and TensorFlow) are ``<models_dir>/<name>``
    when given."""
    legacy_sha = {name: sha for sha, name in m3gnet.KNOWN_DGL_LEGACY_STATE_SHA256.items()}

    def m3gnet_folder(name: str) -> str | None:
        return str(Path(models_dir).expanduser() / name) if models_dir else None

    specs = [
        SurrogateSpec(
            name="CHGNet-0.3.0",
            kind="chgnet",
            weights=chgnet.WHEEL_PREFIX + "0.3.0",
            sha256=chgnet.CHGNET_WHEEL_SHA256["0.3.0"],
            version="0.3.0",
            convention="native",
            description="CHGNet 0.3.0 (MPtrj), weights inside the chgnet wheel; offline default",
        ),
        SurrogateSpec(
            name="M3GNet-MP-2021.2.8-PES",
            kind="m3gnet",
            weights=m3gnet_folder("M3GNet-MP-2021.2.8-PES"),
            sha256=legacy_sha["M3GNet-MP-2021.2.8-PES"],
            version="2021.2.8",
            convention="dgl-legacy",
            description="matgl's M3GNet universal potential trained on MP-2021.2.8: a separately "
                        "trained model, not the paper's surrogate (about 0.15 eV/atom from it on "
                        "Ba-Ru-O; the paper's is M3GNet-TF-MP-2021.2.8-EFS)",
        ),
        SurrogateSpec(
            name="M3GNet-MatPES-PBE-v2025.1-PES",
            kind="m3gnet",
            weights=m3gnet_folder("M3GNet-MatPES-PBE-v2025.1-PES"),
            sha256=legacy_sha["M3GNet-MatPES-PBE-v2025.1-PES"],
            version="v2025.1",
            convention="dgl-legacy",
            description="matgl M3GNet trained on MatPES-PBE 2025.1",
        ),
        SurrogateSpec(
            name="M3GNet-TF-MP-2021.2.8-EFS",
            kind="m3gnet_tf",
            weights=m3gnet_folder("M3GNet-TF-MP-2021.2.8-EFS"),
            sha256=m3gnet_tf.M3GNET_TF_MP_2021_SHA256,
            version="2021.2.8",
            convention="native",
            description="the paper's surrogate: the original TensorFlow M3GNet (pip m3gnet 0.2.4, "
                        "MP-2021.2.8-EFS weights), run in its own venv (make tf-m3gnet)",
        ),
    ]
    return {s.name: s for s in specs}


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


def _parse_entry(entry: dict[str, Any], *, where: str, reg_path: Path, models_dir: str | None) -> SurrogateSpec:
    """One registry-file entry as a spec (:class:`SurrogateError` naming ``where`` when malformed)."""
    kinds = " or ".join(repr(k) for k in FAMILIES)
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise SurrogateError(f"{where}: unknown fields {sorted(unknown)}")
    name = entry.get("name")
    kind = entry.get("kind")
    if not name or kind not in FAMILIES:
        raise SurrogateError(f"{where}: needs a 'name' and a 'kind' of {kinds}")
    fam = FAMILIES[kind]
    convention = entry.get("convention", fam.default_convention)
    if convention not in _CONVENTIONS:
        raise SurrogateError(f"{where}: convention must be dgl-legacy, native or auto")
    weights = entry.get("weights")
    if weights is not None:
        weights = str(weights)
        if "${models_dir}" in weights:
            if not models_dir:
                raise SurrogateError(f"{where}: uses ${{models_dir}} but no models_dir is set")
            weights = weights.replace("${models_dir}", str(models_dir))
        if not (fam.packaged_prefix and weights.startswith(fam.packaged_prefix)):
            wp = Path(weights).expanduser()
            weights = str(wp if wp.is_absolute() else (reg_path.parent / wp).resolve())
    elif fam.weights_in_models_dir and models_dir:
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
        wf = fam.weights_file(weights)
        if wf.is_file():
            sha = file_sha256(str(wf))
    return SurrogateSpec(
        name=name,
        kind=kind,
        weights=weights,
        sha256=sha,
        version=str(entry.get("version", "")),
        convention=convention,
        description=str(entry.get("description", "")),
    )


def load_registry(
    path: str | None = None, *, models_dir: str | None = None
) -> dict[str, SurrogateSpec]:
    """The built-in surrogates plus the entries of an optional JSON/YAML registry file.

    A file holds a list of entries (or ``{"surrogates": [...]}``, or a mapping name -> entry),
    each with ``name``, ``kind`` (a key of :data:`FAMILIES`: ``m3gnet``/``chgnet``/``m3gnet_tf``) and
    optionally ``weights``, ``sha256``, ``version``, ``convention``, ``description``. ``weights``
    may use ``${models_dir}``; a relative path is taken relative to the registry file's folder;
    an M3GNet entry without ``weights`` is the folder ``<models_dir>/<name>``. So a model folder
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
        spec = _parse_entry(entry, where=f"{reg_path} entry {i}", reg_path=reg_path, models_dir=models_dir)
        specs[spec.name] = spec
    return specs


def verify_weights(spec: SurrogateSpec) -> str | None:
    """Why ``spec``'s weights cannot be used here, or ``None`` when they are present and their
    sha256 is the registered one (the check loading does, done up front)."""
    if not spec.weights:
        return (f"surrogate {spec.name!r}: no weights configured (an M3GNet entry without 'weights' "
                "needs models_dir, CGWGAN_M3GNET_DIR)")
    fam = family(spec.kind)
    try:
        wfile = fam.weights_file(spec.weights)
    except (SurrogateError, ImportError, OSError) as exc:
        return f"surrogate {spec.name!r}: weights {spec.weights} unavailable ({type(exc).__name__}: {exc})"
    if not wfile.is_file():
        what = "weights folder" if not Path(spec.weights).exists() else "weights file"
        missing = spec.weights if what == "weights folder" else str(wfile)
        return f"surrogate {spec.name!r}: {what} {missing} not found"
    actual = file_sha256(str(wfile))
    if spec.sha256 and actual != spec.sha256:
        return (f"surrogate {spec.name!r}: sha256 of {wfile} is {actual}, the registry says {spec.sha256}; "
                "register these weights under their own name (or fix the entry's sha256)")
    return None


def load_registry_entries(path: str, *, models_dir: str | None = None,
                          verify: bool = True) -> tuple[dict[str, SurrogateSpec], list[str]]:
    """The entries of a registry file one by one: (usable specs by name, one problem line per
    entry that is not).

    Unlike :func:`load_registry` (all or nothing), a malformed entry, and with ``verify`` an entry
    whose weights are missing or do not match its ``sha256`` (:func:`verify_weights`), is left out
    and named in the problems (``"<file> entry <i> (<name>): <reason>"``); the other entries are
    kept. Only a file that cannot be read or parsed at all raises (``OSError``,
    :class:`SurrogateError`, YAML errors). Built-in surrogates are not added; a later entry with
    the name of an earlier one replaces it.
    """
    reg_path = Path(path).expanduser()
    if not reg_path.is_file():
        raise SurrogateError(f"surrogate registry file not found: {reg_path}")
    specs: dict[str, SurrogateSpec] = {}
    problems: list[str] = []
    for i, entry in enumerate(_read_registry_file(reg_path)):
        where = f"{reg_path} entry {i}" + (f" ({entry['name']!r})" if entry.get("name") else "")
        try:
            spec = _parse_entry(entry, where=where, reg_path=reg_path, models_dir=models_dir)
        except SurrogateError as exc:
            problems.append(str(exc))
            continue
        reason = verify_weights(spec) if verify else None
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        specs[spec.name] = spec
    return specs, problems


def registry_frame(registry: dict[str, SurrogateSpec]) -> pl.DataFrame:
    """The registry as a table: one row per surrogate (for the ``surrogate_models`` asset)."""
    rows = [
        {
            "surrogate_name": s.name,
            "surrogate_id": s.surrogate_id if s.sha256 else None,
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


def spec_from_path(path: Path) -> SurrogateSpec:
    """An ad-hoc spec for a weights folder/file of any family (tried in :data:`FAMILIES` order)."""
    for fam in FAMILIES.values():
        spec = fam.spec_from_path(path)
        if spec is not None:
            return spec
    raise SurrogateError(f"{path}: not " + " nor ".join(f.path_hint for f in FAMILIES.values()))


def resolve_spec(name_or_folder: str, registry: dict[str, SurrogateSpec] | None = None,
                 models_dir: str | None = None) -> SurrogateSpec:
    """The spec of a registry name, or of a weights folder/file (a folder of a registered model
    keeps the registry's name, version and convention)."""
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
        spec = spec_from_path(path.resolve())
        for known in reg.values():
            if known.sha256 == spec.sha256 and known.kind == spec.kind:
                return replace(known, weights=spec.weights)
        return spec
    raise SurrogateError(
        f"unknown surrogate {name_or_folder!r}: not a registry name ({', '.join(sorted(reg))}) "
        "and not an existing weights folder/file"
    )
