"""Materials Project structure sources behind one loader, with validation and quarantine.

``load_mp_source(source, api_key=..., chemsys=...)`` reads one of four sources:

* a file in the MP-20 layout: CSV, CSV.gz or Parquet with ``material_id``, ``cif`` and the MP
  energy columns (``formation_energy_per_atom``, ``e_above_hull``, ``band_gap``; the contract
  names ``*_ev`` are accepted too);
* a folder of CIF / POSCAR files (``*.cif``, ``*.vasp``, ``*.poscar``, ``POSCAR*``, ``CONTCAR*``;
  the material id is the file name without extension);
* ``mp-api``: the Materials Project API through ``mp-api`` (needs an API key);
* ``embedded`` (offline default): the 288 AFLOW prototypes shipped inside pymatgen, plus the
  showcase system's known phases shipped inside this package (seven Ba–Ru–O crystals written from
  their textbook structure types: :mod:`lib.known_phases`), so the demo's hull is physical.

Every source is first turned into *raw records* (one text per structure: CIF, POSCAR or a
pymatgen ``Structure`` JSON), then :func:`parse_records` (pure, row-chunked, parallel through
:mod:`lib.parallel`) parses and validates them. MP-20's CIFs (P1, written by pymatgen) are read by
:func:`fast_p1_cif`, an exact small reader (the cell CifParser gives, ~7x faster); anything it does
not fully recognise goes to pymatgen's CifParser, which also names every rejected row's reason. Bad
rows are quarantined with a reason (:data:`REJECT_REASONS`), never dropped; an unreadable source
raises :class:`MPSourceError`. Raw records may carry a per-row ``source`` column (the embedded known
phases name their origin there); other rows get the source's label.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from lib import contracts, known_phases
from lib.ids import content_hash, file_sha256
from lib.parallel import MapStats, map_row_chunks

REJECT_REASONS = (
    "malformed_cif",
    "malformed_poscar",
    "malformed_structure",
    "partial_occupancy",
    "unknown_element",
    "duplicate_material_id",
    "empty_input",
    "missing_material_id",
)

STRUCTURE_SCHEMA: dict[str, pl.DataType] = contracts.schema("mp_structures")

REJECT_SCHEMA: dict[str, pl.DataType] = contracts.schema("mp_structures_rejects")

#: Raw records: one structure text per row, before parsing.
RAW_SCHEMA: dict[str, pl.DataType] = {
    "material_id": pl.String(),
    "text": pl.String(),
    "fmt": pl.String(),  # cif | poscar | structure_json
    "source_ref": pl.String(),
    "formation_energy_per_atom_ev": pl.Float64(),
    "e_above_hull_ev_per_atom": pl.Float64(),
    "band_gap_ev": pl.Float64(),
}

_ENERGY_ALIASES = {
    "formation_energy_per_atom_ev": ("formation_energy_per_atom_ev", "formation_energy_per_atom"),
    "e_above_hull_ev_per_atom": ("e_above_hull_ev_per_atom", "e_above_hull", "energy_above_hull"),
    "band_gap_ev": ("band_gap_ev", "band_gap"),
}
_STRUCTURE_FILE = re.compile(r"(\.(cif|vasp|poscar)$)|(^(POSCAR|CONTCAR))", re.IGNORECASE)


class MPSourceError(RuntimeError):
    """A source that cannot be read at all (missing, unreadable, wrong layout, no API key)."""


@dataclass(frozen=True)
class LoadedSource:
    """Validated structures (``mp_structures``), quarantined rows (``mp_structures_rejects``)."""

    structures: pl.DataFrame
    rejects: pl.DataFrame
    snapshot_id: str
    source: str
    parse_stats: MapStats | None = field(default=None, compare=False)

    @property
    def n_input(self) -> int:
        return self.structures.height + self.rejects.height

    def rejects_by_reason(self) -> dict[str, int]:
        if self.rejects.is_empty():
            return {}
        counts = self.rejects.group_by("reason").len().sort("reason")
        return dict(zip(counts["reason"].to_list(), counts["len"].to_list(), strict=True))


# ----------------------------------------------------------------------------- raw records
def _raw_frame(rows: dict[str, list]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=RAW_SCHEMA)


def _read_table_file(path: Path) -> pl.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pl.read_parquet(path)
        if name.endswith((".csv", ".csv.gz")):
            if path.stat().st_size == 0:
                return pl.DataFrame()
            data = path.read_bytes()
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            if not data.strip():
                return pl.DataFrame()
            return pl.read_csv(io.BytesIO(data), infer_schema_length=0)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise MPSourceError(f"MP source {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    except pl.exceptions.PolarsError as exc:
        raise MPSourceError(f"MP source {path} is not a readable table: {exc}") from exc
    raise MPSourceError(f"MP source {path}: unsupported file type (use .csv, .csv.gz or .parquet)")


def raw_from_table_file(path: Path) -> pl.DataFrame:
    """Raw records of an MP-20-layout file (one per row; ``source_ref`` = ``name:row``)."""
    df = _read_table_file(path)
    if df.width == 0 or df.height == 0:
        return _raw_frame({k: [] for k in RAW_SCHEMA})
    missing = {"material_id", "cif"} - set(df.columns)
    if missing:
        raise MPSourceError(
            f"MP source {path} lacks column(s) {sorted(missing)}; it has {df.columns[:12]}")
    energy = []
    for target, aliases in _ENERGY_ALIASES.items():
        col = next((a for a in aliases if a in df.columns), None)
        expr = pl.col(col).cast(pl.Float64, strict=False) if col else pl.lit(None, pl.Float64)
        energy.append(expr.alias(target))
    return df.with_row_index("_row").select(
        pl.col("material_id").cast(pl.String).str.strip_chars(),
        pl.col("cif").cast(pl.String).alias("text"),
        pl.lit("cif").alias("fmt"),
        pl.format("{}:{}", pl.lit(path.name), pl.col("_row") + 2).alias("source_ref"),  # 1-based, header = 1
        *energy,
    ).cast(RAW_SCHEMA)  # type: ignore[arg-type]


def raw_from_folder(path: Path) -> pl.DataFrame:
    """Raw records of every CIF/POSCAR file in a folder (not recursive), sorted by name."""
    files = sorted(p for p in path.iterdir() if p.is_file() and _STRUCTURE_FILE.search(p.name))
    rows: dict[str, list] = {k: [] for k in RAW_SCHEMA}
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError as exc:
            raise MPSourceError(f"MP source file {f} cannot be read: {exc}") from exc
        is_cif = f.suffix.lower() == ".cif"
        has_ext = f.suffix.lower() in (".cif", ".vasp", ".poscar")
        rows["material_id"].append(f.name.rsplit(".", 1)[0] if has_ext else f.name)
        rows["text"].append(text)
        rows["fmt"].append("cif" if is_cif else "poscar")
        rows["source_ref"].append(f"{path.name}/{f.name}")
        for k in _ENERGY_ALIASES:
            rows[k].append(None)
    return _raw_frame(rows)


def aflow_prototypes_path() -> Path:
    """pymatgen's ``analysis/prototypes/aflow_prototypes.json.gz``, found without importing that
    package (its ``__init__`` loads the whole prototype data set, ~20 s)."""
    import importlib.util

    spec = importlib.util.find_spec("pymatgen")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "analysis" / "prototypes" / "aflow_prototypes.json.gz"
        if path.is_file():
            return path
    raise MPSourceError("embedded MP source: pymatgen's aflow_prototypes.json.gz was not found")


EMBEDDED_PROTOTYPES_LABEL = "embedded:aflow_prototypes"
#: The embedded source's label (``LoadedSource.source``); each row's ``source`` names its own part.
EMBEDDED_LABEL = "embedded:aflow_prototypes+known_phases_ba_ru_o"


def raw_from_embedded_prototypes() -> pl.DataFrame:
    """Raw records of pymatgen's 288 AFLOW prototypes (ids ``aflow:<label>``, ``:2``… on repeats)."""
    entries = json.loads(gzip.decompress(aflow_prototypes_path().read_bytes()))
    seen: dict[str, int] = {}
    rows: dict[str, list] = {k: [] for k in RAW_SCHEMA}
    for i, entry in enumerate(entries):
        label = entry["tags"]["aflow"]
        seen[label] = seen.get(label, 0) + 1
        rows["material_id"].append(f"aflow:{label}" + (f":{seen[label]}" if seen[label] > 1 else ""))
        rows["text"].append(json.dumps(entry["snl"]))
        rows["fmt"].append("structure_json")
        rows["source_ref"].append(f"aflow_prototypes.json.gz:{i}")
        for k in _ENERGY_ALIASES:
            rows[k].append(None)
    return _raw_frame(rows)


def raw_from_known_phases(path: Path = known_phases.KNOWN_PHASES_FILE) -> pl.DataFrame:
    """Raw records of the known phases shipped in the package (:mod:`lib.known_phases`), each with
    :data:`lib.known_phases.SOURCE_LABEL` as its ``source`` (no energies: none are shipped)."""
    try:
        df = known_phases.read_known_phases(path)
    except known_phases.KnownPhasesError as exc:
        raise MPSourceError(f"embedded MP source: {exc}") from exc
    return df.with_row_index("_row").select(
        pl.col("material_id"), pl.col("cif").alias("text"), pl.lit("cif").alias("fmt"),
        pl.format("{}:{}", pl.lit(path.name), pl.col("_row")).alias("source_ref"),
        *[pl.lit(None, pl.Float64).alias(dst) for dst in (
            "formation_energy_per_atom_ev", "e_above_hull_ev_per_atom", "band_gap_ev")],
        pl.lit(known_phases.SOURCE_LABEL).alias("source"),
    ).cast({**RAW_SCHEMA, "source": pl.String()})  # type: ignore[dict-item]


def raw_from_embedded() -> pl.DataFrame:
    """Raw records of the embedded source: the AFLOW prototypes, then the shipped known phases."""
    protos = raw_from_embedded_prototypes().with_columns(pl.lit(EMBEDDED_PROTOTYPES_LABEL).alias("source"))
    return pl.concat([protos, raw_from_known_phases()], how="vertical")


def raw_from_mp_api(*, api_key: str, chemsys: list[str] | None = None) -> pl.DataFrame:
    """Raw records from the Materials Project API (summary endpoint) through ``mp-api``."""
    if not api_key:
        raise MPSourceError(
            "MP source 'mp-api' needs a Materials Project API key: set MP_API_KEY (or the MPSource "
            "resource's api_key); get one at https://materialsproject.org/api")
    try:
        from mp_api.client import MPRester
    except ImportError as exc:  # pragma: no cover - mp-api is a dependency
        raise MPSourceError("MP source 'mp-api' needs the mp-api package") from exc
    fields = ["material_id", "structure", "formation_energy_per_atom", "energy_above_hull", "band_gap"]
    try:
        with MPRester(api_key, mute_progress_bars=True) as mpr:
            docs = mpr.materials.summary.search(chemsys=chemsys or None, fields=fields)
    except Exception as exc:
        raise MPSourceError(f"MP source 'mp-api' failed: {type(exc).__name__}: {exc}") from exc
    rows: dict[str, list] = {k: [] for k in RAW_SCHEMA}
    for doc in docs:
        mid = str(doc.material_id)
        rows["material_id"].append(mid)
        rows["text"].append(json.dumps(doc.structure.as_dict()) if doc.structure is not None else "")
        rows["fmt"].append("structure_json")
        rows["source_ref"].append(f"mp-api:{mid}")
        rows["formation_energy_per_atom_ev"].append(doc.formation_energy_per_atom)
        rows["e_above_hull_ev_per_atom"].append(doc.energy_above_hull)
        rows["band_gap_ev"].append(doc.band_gap)
    return _raw_frame(rows)


# ----------------------------------------------------------------------------- parsing
@lru_cache(maxsize=1)
def _known_elements() -> frozenset[str]:
    from pymatgen.core.periodic_table import Element

    return frozenset(e.symbol for e in Element)


def _parse_text(text: str, fmt: str):
    from pymatgen.core import Structure

    if fmt == "cif":
        from pymatgen.io.cif import CifParser

        parser = CifParser.from_str(text)
        return parser.parse_structures(primitive=False, check_occu=False, on_error="raise")[0]
    if fmt == "poscar":
        from pymatgen.io.vasp import Poscar

        return Poscar.from_str(text, read_velocities=False).structure
    if fmt == "structure_json":
        return Structure.from_dict(json.loads(text))
    raise ValueError(f"unknown structure format {fmt!r}")


_MALFORMED = {"cif": "malformed_cif", "poscar": "malformed_poscar", "structure_json": "malformed_structure"}


def _validate(structure) -> tuple[str, str] | None:
    """``(reason, detail)`` for a structure that may not enter the table, else None."""
    from pymatgen.core.periodic_table import Element

    known = _known_elements()
    if len(structure) == 0:
        return "empty_input", "structure has no sites"
    bad = sorted({str(sp) for site in structure for sp in site.species
                  if not isinstance(sp, Element) and getattr(sp, "symbol", str(sp)) not in known})
    if bad:
        return "unknown_element", f"species {bad} are not chemical elements"
    if not structure.is_ordered:
        partial = [i for i, site in enumerate(structure) if not site.is_ordered][:5]
        return "partial_occupancy", f"sites {partial} are partially occupied ({structure[partial[0]].species})"
    lat = structure.lattice
    if not np.isfinite(lat.matrix).all() or lat.volume <= 1e-6:
        return "malformed_structure", f"degenerate lattice (volume {lat.volume:.3g} Å^3)"
    if not np.isfinite(structure.frac_coords).all():
        return "malformed_structure", "non-finite coordinates"
    return None


# ----------------------------------------------------------------------------- fast P1 CIF reader
#: The P1 CIFs pymatgen's ``CifWriter`` writes (MP-20's layout): these keys, then a symmetry-operation
#: loop holding only ``x, y, z`` and an atom-site loop with exactly these columns.
_P1_KEYS = frozenset({
    "_symmetry_space_group_name_H-M", "_symmetry_Int_Tables_number", "_chemical_formula_structural",
    "_chemical_formula_sum", "_cell_volume", "_cell_formula_units_Z", "_cell_length_a", "_cell_length_b",
    "_cell_length_c", "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"})
_P1_CELL = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
            "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
_P1_SYMOP_LOOP = ("_symmetry_equiv_pos_site_id", "_symmetry_equiv_pos_as_xyz")
_P1_ATOM_LOOP = ("_atom_site_type_symbol", "_atom_site_label", "_atom_site_symmetry_multiplicity",
                 "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy")
_P1_KEY_VALUE = re.compile(r"(_\S+)[ \t]+(?:'([^']*)'|([^\s']+))")
_P1_IDENTITY_OP = re.compile(r"1[ \t]+'x, y, z'")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
#: CifParser's defaults (``site_tolerance``, ``frac_tolerance``, ``min_thickness``), with margins:
#: a file near any of them goes to CifParser itself.
_SITE_TOL_MARGIN = 2e-4
_MIN_THICKNESS_MARGIN = 0.02
_FRAC_TOLERANCE = 1e-4


@lru_cache(maxsize=512)
def _plain_element(symbol: str) -> bool:
    """Whether CifParser reads ``symbol`` as the element of that exact symbol (``Ga`` -> Ga)."""
    from pymatgen.core.periodic_table import Element

    return symbol in _known_elements() and symbol[:2].title() == symbol and Element(symbol).symbol == symbol


@lru_cache(maxsize=512)
def _site_order_key(symbol: str) -> int:
    """CifParser's site order: it sorts single-element sites by their ``Composition``, whose
    order (``Composition.__ge__``) puts the more electronegative element first (pymatgen's
    ``Element`` order, reversed); a stable sort keeps file order within an element."""
    from pymatgen.core.periodic_table import Element

    with warnings.catch_warnings():  # elements without an electronegativity warn (they sort last)
        warnings.simplefilter("ignore")
        ordered = sorted(Element(s) for s in _known_elements())
    return -ordered.index(Element(symbol))


def _ideal_fraction(value: float) -> float:
    """CifParser's ``_sanitize_data`` rounding of 1/3 and 2/3 (``frac_tolerance``)."""
    for ideal in (1 / 3, 2 / 3):
        if math.isclose(value / ideal, 1, abs_tol=_FRAC_TOLERANCE, rel_tol=0):
            return float(str(ideal))
    return value


def _number(text: str) -> float | None:
    return float(text) if _PLAIN_NUMBER.fullmatch(text) else None


def fast_p1_cif(text: str) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """``(lattice matrix (3, 3), species, fractional coordinates (n, 3))`` of a pymatgen-written
    P1 CIF, exactly as ``CifParser(...).parse_structures(primitive=False, check_occu=False)``
    gives them (same lattice, same site order, same 1/3 and 2/3 rounding, coordinates wrapped
    into [0, 1)), or ``None`` for anything else, for CifParser to read: another layout, symmetry
    operations other than ``x, y, z``, partial occupancy, symbols that are not plain elements,
    sites within CifParser's merge tolerance, a lattice that is degenerate or thin, comments,
    quotes or text fields where the writer puts none.
    """
    if not text.isascii() or ";" in text or '"' in text:
        return None
    values: dict[str, str] = {}
    loops: list[tuple[tuple[str, ...], list[str]]] = []
    seen_data = False
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or raw_line.startswith("#"):
            continue
        if "#" in line:
            return None
        if line.startswith("data_"):
            if seen_data or values or loops:
                return None
            seen_data = True
        elif not seen_data:
            return None
        elif line == "loop_":
            loops.append(((), []))
        elif line.startswith("_"):
            if loops and not loops[-1][1]:  # a column name of the open loop
                if len(line.split()) != 1:
                    return None
                loops[-1] = ((*loops[-1][0], line), [])
                continue
            m = _P1_KEY_VALUE.fullmatch(line)
            if m is None or m[1] not in _P1_KEYS or m[1] in values or loops:
                return None
            values[m[1]] = m[2] if m[2] is not None else m[3]
        elif loops and loops[-1][0]:
            loops[-1][1].append(line)
        else:
            return None
    if (len(loops) != 2 or loops[0][0] != _P1_SYMOP_LOOP or loops[1][0] != _P1_ATOM_LOOP
            or values.get("_symmetry_space_group_name_H-M") != "P 1"
            or values.get("_symmetry_Int_Tables_number", "1") != "1"
            or len(loops[0][1]) != 1 or not _P1_IDENTITY_OP.fullmatch(loops[0][1][0]) or not loops[1][1]):
        return None
    cell = [_number(values.get(k, "")) for k in _P1_CELL]
    params = [x for x in cell if x is not None and math.isfinite(x)]
    if len(params) != 6:
        return None
    species: list[str] = []
    coords: list[list[float]] = []
    for row in loops[1][1]:
        tokens = row.split()
        if len(tokens) != 7 or "'" in row or not _plain_element(tokens[0]) or _number(tokens[6]) != 1.0:
            return None
        xyz = [x for x in map(_number, tokens[3:6]) if x is not None and math.isfinite(x)]
        if len(xyz) != 3:
            return None
        species.append(tokens[0])
        coords.append([_ideal_fraction(x) for x in xyz])
    frac = np.array(coords, dtype=float)
    frac = frac - np.floor(frac)  # CifParser: ``i - math.floor(i)`` after the identity operation
    if len(frac) > 1:  # CifParser merges sites closer than its site_tolerance: leave those to it
        d = frac[:, None, :] - frac[None, :, :]
        close = np.all(np.abs(d - np.round(d)) < _SITE_TOL_MARGIN, axis=-1)
        np.fill_diagonal(close, False)
        if close.any():
            return None
    from pymatgen.core import Lattice

    mat = np.array(Lattice.from_parameters(*params).matrix)
    if not np.isfinite(mat).all():
        return None
    volume = abs(float(np.linalg.det(mat)))
    if volume <= 1e-5:
        return None
    u, v = mat[[1, 2, 0]], mat[[2, 0, 1]]  # b x c, c x a, a x b: volume / area = each thickness
    areas = np.sqrt(((u[:, [1, 2, 0]] * v[:, [2, 0, 1]] - u[:, [2, 0, 1]] * v[:, [1, 2, 0]]) ** 2).sum(axis=1))
    if (volume / areas).min() < _MIN_THICKNESS_MARGIN:
        return None
    order = sorted(range(len(species)), key=lambda i: _site_order_key(species[i]))
    return mat, [species[i] for i in order], frac[order]


@lru_cache(maxsize=65536)
def _formulas(counts: tuple[tuple[str, float], ...]) -> tuple[str, str]:
    """``(formula, reduced_formula)`` of element counts in site order (as ``Structure.composition``)."""
    from pymatgen.core import Composition
    from pymatgen.core.periodic_table import Element

    comp = Composition({Element(s): n for s, n in counts})
    return comp.formula, comp.reduced_formula


def parse_records(raw: pl.DataFrame, *, fast_cif: bool = True) -> pl.DataFrame:
    """Parse and validate raw records (row-wise, pure). One output row per input row.

    Output: the ``mp_structures`` fields (without ``source``/``snapshot_id``) plus
    ``source_ref``, ``reason`` and ``detail`` (null reason = valid row). With ``fast_cif`` a
    pymatgen-written P1 CIF is read by :func:`fast_p1_cif` (same cell as CifParser's, ~7x
    faster); every other text, and every row that may be rejected, goes through pymatgen.
    """
    out: dict[str, list] = {k: [] for k in (
        "material_id", "formula", "reduced_formula", "chemical_system", "elements", "nsites",
        "lattice_matrix", "species", "frac_coords", "source_ref", "reason", "detail")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mid, text, fmt, ref in zip(raw["material_id"].to_list(), raw["text"].to_list(),
                                       raw["fmt"].to_list(), raw["source_ref"].to_list(), strict=True):
            reason = detail = None
            cell = None
            if mid is None or not str(mid).strip():
                reason, detail = "missing_material_id", "row has no material_id"
            elif text is None or not text.strip():
                reason, detail = "empty_input", f"no {fmt} text for {mid}"
            else:
                cell = fast_p1_cif(text) if fast_cif and fmt == "cif" else None
                if cell is None:
                    cell, reason, detail = _parse_and_validate(text, fmt)
            out["material_id"].append(mid)
            out["source_ref"].append(ref)
            out["reason"].append(reason)
            out["detail"].append(detail)
            if reason is None:
                assert cell is not None  # reason is None only when the text parsed
                lattice, species, frac, formulas = cell if len(cell) == 4 else (*cell, None)
                if formulas is None:
                    counts: dict[str, float] = {}
                    for sp in species:
                        counts[sp] = counts.get(sp, 0.0) + 1.0
                    formulas = (*_formulas(tuple(counts.items())), sorted(counts))
                elements = list(formulas[2])
                out["formula"].append(formulas[0])
                out["reduced_formula"].append(formulas[1])
                out["chemical_system"].append("-".join(elements))
                out["elements"].append(elements)
                out["nsites"].append(len(species))
                out["lattice_matrix"].append(lattice.reshape(-1).tolist())
                out["species"].append(species)
                out["frac_coords"].append(frac.tolist())
            else:
                for k in ("formula", "reduced_formula", "chemical_system", "elements", "nsites",
                          "lattice_matrix", "species", "frac_coords"):
                    out[k].append(None)
    schema = {k: STRUCTURE_SCHEMA[k] for k in out if k in STRUCTURE_SCHEMA}
    schema.update(source_ref=pl.String(), reason=pl.String(), detail=pl.String())
    return pl.DataFrame(out, schema=schema)


def _parse_and_validate(text: str, fmt: str) -> tuple[tuple | None, str | None, str | None]:
    """pymatgen's reading of one text: ``((lattice, species, frac, (formula, reduced_formula,
    elements)), None, None)`` for a valid structure, else ``(None, reason, detail)``."""
    try:
        structure = _parse_text(text, fmt)
    except Exception as exc:  # noqa: BLE001 - any parser failure quarantines the row, named
        msg = " ".join(str(exc).split())[:300] or type(exc).__name__
        return None, _MALFORMED.get(fmt, "malformed_structure"), f"{type(exc).__name__}: {msg}"
    bad = _validate(structure)
    if bad:
        return None, *bad
    comp = structure.composition
    return ((np.asarray(structure.lattice.matrix), [site.specie.symbol for site in structure],
             np.asarray(structure.frac_coords),
             (comp.formula, comp.reduced_formula, sorted(el.symbol for el in comp.elements))), None, None)


def validate_records(raw: pl.DataFrame, *, source: str, snapshot_id: str,
                     n_chunks: int | None = None, max_parallel: int = 0, use_ray: bool = False,
                     processes: int = 0) -> LoadedSource:
    """Parse raw records (as Ray tasks with ``use_ray``, else in ``processes`` local worker
    processes when > 1), split valid rows from rejects, flag duplicates."""
    if raw.height == 0:
        rejects = pl.DataFrame({"source_ref": [source], "material_id": [None], "reason": ["empty_input"],
                                "detail": [f"source {source} holds no structures"],
                                "snapshot_id": [snapshot_id]}, schema=REJECT_SCHEMA)
        return LoadedSource(pl.DataFrame(schema=STRUCTURE_SCHEMA), rejects, snapshot_id, source)
    parsed, stats = map_row_chunks(parse_records, raw, n_chunks=n_chunks, max_parallel=max_parallel,
                                   use_ray=use_ray, processes=processes)
    row_source = (pl.col("source").cast(pl.String) if "source" in raw.columns else pl.lit(None, pl.String))
    parsed = pl.concat([parsed, raw.select(*_ENERGY_ALIASES, row_source.alias("_row_source"))],
                       how="horizontal").with_columns(
        pl.int_range(pl.len()).alias("_order"))
    # Duplicates: the first valid row of an id is kept; later rows with that id are quarantined.
    first_ok = (parsed.filter(pl.col("reason").is_null())
                .group_by("material_id").agg(pl.col("_order").min().alias("_first"),
                                            pl.col("source_ref").sort_by("_order").first().alias("_first_ref")))
    parsed = parsed.join(first_ok, on="material_id", how="left").with_columns(
        pl.when(pl.col("reason").is_null() & (pl.col("_order") != pl.col("_first")))
        .then(pl.lit("duplicate_material_id")).otherwise(pl.col("reason")).alias("reason"),
        pl.when(pl.col("reason").is_null() & (pl.col("_order") != pl.col("_first")))
        .then(pl.format("material_id {} already at {}", pl.col("material_id"), pl.col("_first_ref")))
        .otherwise(pl.col("detail")).alias("detail"),
    ).sort("_order")
    structures = (parsed.filter(pl.col("reason").is_null())
                  .with_columns(pl.coalesce("_row_source", pl.lit(source)).alias("source"),
                                pl.lit(snapshot_id).alias("snapshot_id"))
                  .select(list(STRUCTURE_SCHEMA)).cast(STRUCTURE_SCHEMA))  # type: ignore[arg-type]
    rejects = (parsed.filter(pl.col("reason").is_not_null())
               .with_columns(pl.lit(snapshot_id).alias("snapshot_id"))
               .select(list(REJECT_SCHEMA)).cast(REJECT_SCHEMA))  # type: ignore[arg-type]
    return LoadedSource(structures, rejects, snapshot_id, source, stats)


# ----------------------------------------------------------------------------- entry point
def _folder_fingerprint(path: Path) -> list[tuple[str, str]]:
    return [(p.name, file_sha256(str(p))) for p in sorted(path.iterdir())
            if p.is_file() and _STRUCTURE_FILE.search(p.name)]


def load_mp_source(
    source: str,
    *,
    api_key: str = "",
    chemsys: list[str] | None = None,
    n_chunks: int | None = None,
    max_parallel: int = 0,
    use_ray: bool = False,
) -> LoadedSource:
    """Load and validate one MP source (see the module docstring for what ``source`` may be).

    Parsing runs through :func:`lib.parallel.map_row_chunks` (Ray tasks with ``use_ray``, at
    most ``max_parallel`` at a time when > 0).
    Raises :class:`MPSourceError` naming the source when it cannot be read at all.
    """
    source = (source or "").strip()
    if not source:
        raise MPSourceError("no MP source given: use 'embedded', 'mp-api', a file or a folder")
    if source == "embedded":
        path = aflow_prototypes_path()
        raw = raw_from_embedded()  # a clear MPSourceError when a part is missing
        import pymatgen.core

        snap = content_hash({"embedded": file_sha256(str(path)),
                             "known_phases": file_sha256(str(known_phases.KNOWN_PHASES_FILE)),
                             "pymatgen": pymatgen.core.__version__}, prefix="snap-")
        return validate_records(raw, source=EMBEDDED_LABEL,
                                snapshot_id=snap, n_chunks=n_chunks, max_parallel=max_parallel, use_ray=use_ray)
    if source in ("mp-api", "mp_api", "materialsproject"):
        raw = raw_from_mp_api(api_key=api_key, chemsys=chemsys)
        import hashlib

        digest = hashlib.sha256("\n".join(sorted(raw["text"].to_list())).encode()).hexdigest()
        snap = content_hash({"mp-api": digest, "chemsys": sorted(chemsys or [])}, prefix="snap-")
        label = "mp-api" + (f":{','.join(sorted(chemsys))}" if chemsys else "")
        return validate_records(raw, source=label, snapshot_id=snap, n_chunks=n_chunks, max_parallel=max_parallel,
                                use_ray=use_ray)
    path = Path(source).expanduser()
    if not path.exists():
        raise MPSourceError(f"MP source {source!r} does not exist (and is not 'embedded' or 'mp-api')")
    if path.is_dir():
        snap = content_hash({"folder": _folder_fingerprint(path)}, prefix="snap-")
        return validate_records(raw_from_folder(path), source=f"folder:{path.name}",
                                snapshot_id=snap, n_chunks=n_chunks, max_parallel=max_parallel, use_ray=use_ray)
    try:
        sha = file_sha256(str(path))
    except OSError as exc:
        raise MPSourceError(f"MP source {path} cannot be read: {exc}") from exc
    raw = raw_from_table_file(path)
    return validate_records(raw, source=f"file:{path.name}",
                            snapshot_id=content_hash({"file": sha}, prefix="snap-"), n_chunks=n_chunks,
                            max_parallel=max_parallel, use_ray=use_ray)
