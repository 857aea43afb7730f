"""Fixed-length vector encoding of crystal templates for the Wyckoff WGAN (paper eq. 2-5).

A template is a space group, up to ``max_sites`` asymmetric-unit (ASU) sites, each a Wyckoff
letter with a representative point, and six lattice parameters. Atoms are masked (eq. 5):
the vector carries no species. Layout (``EncodingSchema.layout()`` gives the slices)::

    [ space group one-hot (230) |
      site 0: presence (1), letter one-hot (27), x y z (3) | ... | site max_sites-1 |
      lattice (6): ln(V/N), ln(b/a), ln(c/a) (scaled), alpha beta gamma (scaled) ]

Every entry lies in [-1, 1] so that the generator's tanh output layer can produce it:

* one-hots and presence flags are 0 / 1 (a present site has presence 1);
* fractional coordinates x in [0, 1) are mapped to ``2 x - 1``; an absent site's coordinates
  and letter one-hot are all 0;
* a letter is the *index* of the Wyckoff letter within its group's alphabetical letters
  (``lib.wyckoff.letters``: index 0 is the most special position 'a'), over 27 slots (Pmmm has
  the most positions, 27);
* the lattice (``lattice_encoding = "vpa_ratios"``, version ``wyckoff-asu-v2``) is the volume per
  atom ``V/N`` (N = the sum of the sites' Wyckoff multiplicities, i.e. the atoms of the
  conventional cell), scaled as ``(ln(V/N) - centre) / halfwidth`` over a window of
  6..72 Å^3/atom, and the axis ratios ``ln(b/a)``, ``ln(c/a)`` divided by ``ln(max_axis_ratio)``
  (15), all clipped to [-1, 1]; angles as ``(deg - 90) / 90`` (so 0°..180° -> -1..1). Decoding
  applies the crystal system's constraints to ratios and angles first and then scales the cell to
  ``V = (V/N) * N`` for the decoded sites, so a template's atomic number density is exactly
  ``1 / (V/N)`` of the generator's output: the generator learns the density as one value instead
  of having to tie three lengths to the multiplicities of its letters. The v1 layout
  (``lattice_encoding = "ln_abc"``: ln a, ln b, ln c over 1.5..60 Å) is still decoded for old
  checkpoints.

Sites are stored in a canonical order: by letter index, then by x, y, z of the representative
(a template's site order carries no meaning, so sorting removes a permutation symmetry the GAN
would otherwise have to learn). ``decode_vectors`` returns sites in vector order.

The schema (sizes, scalings) is saved as JSON beside every checkpoint; ``ENCODING_VERSION``
changes whenever the layout or scaling defaults change.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lib import wyckoff
from lib.wyckoff import LATTICE_COLUMNS

ENCODING_VERSION = "wyckoff-asu-v2"
#: Versions whose lattice block is ``ln a, ln b, ln c`` (``lattice_encoding = "ln_abc"``).
LEGACY_LN_ABC_VERSIONS = ("wyckoff-asu-v1",)

N_SPACEGROUPS = 230

#: Columns ``encode_templates`` reads.
REQUIRED_COLUMNS = (
    "spacegroup_number",
    "wyckoff_letters",
    "asu_frac_coords",
    "a_a",
    "b_a",
    "c_a",
    "alpha_deg",
    "beta_deg",
    "gamma_deg",
)



@dataclass(frozen=True)
class EncodingSchema:
    """Sizes and scalings of the template vector. JSON round-trips with ``to_json``/``from_json``."""

    version: str = ENCODING_VERSION
    max_sites: int = 4
    n_spacegroups: int = N_SPACEGROUPS
    n_letters: int = wyckoff.MAX_WYCKOFF_LETTERS
    min_length_a: float = 1.5
    max_length_a: float = 60.0
    site_order: str = "letter_index,x,y,z"
    extra: dict[str, Any] = field(default_factory=dict)
    lattice_encoding: str = "vpa_ratios"  # or "ln_abc" (v1)
    min_volume_per_atom_a3: float = 6.0
    max_volume_per_atom_a3: float = 72.0
    max_axis_ratio: float = 15.0

    def __post_init__(self) -> None:
        if self.lattice_encoding not in ("vpa_ratios", "ln_abc"):
            raise ValueError(f"unknown lattice_encoding {self.lattice_encoding!r}")

    # ----------------------------------------------------------------- derived sizes
    @property
    def site_width(self) -> int:
        return 1 + self.n_letters + 3

    @property
    def sites_offset(self) -> int:
        return self.n_spacegroups

    @property
    def lattice_offset(self) -> int:
        return self.n_spacegroups + self.max_sites * self.site_width

    @property
    def dim(self) -> int:
        return self.lattice_offset + 6

    @property
    def ln_length_center(self) -> float:
        return 0.5 * (math.log(self.min_length_a) + math.log(self.max_length_a))

    @property
    def ln_length_halfwidth(self) -> float:
        return 0.5 * (math.log(self.max_length_a) - math.log(self.min_length_a))

    @property
    def ln_vpa_center(self) -> float:
        return 0.5 * (math.log(self.min_volume_per_atom_a3) + math.log(self.max_volume_per_atom_a3))

    @property
    def ln_vpa_halfwidth(self) -> float:
        return 0.5 * (math.log(self.max_volume_per_atom_a3) - math.log(self.min_volume_per_atom_a3))

    @property
    def ln_ratio_halfwidth(self) -> float:
        return math.log(self.max_axis_ratio)

    def site_slice(self, j: int) -> slice:
        start = self.sites_offset + j * self.site_width
        return slice(start, start + self.site_width)

    def layout(self) -> dict[str, list[int]]:
        """Name -> [start, stop) of every block of the vector."""
        out: dict[str, list[int]] = {"spacegroup_onehot": [0, self.n_spacegroups]}
        for j in range(self.max_sites):
            s = self.site_slice(j).start
            out[f"site{j}_presence"] = [s, s + 1]
            out[f"site{j}_letter_onehot"] = [s + 1, s + 1 + self.n_letters]
            out[f"site{j}_xyz"] = [s + 1 + self.n_letters, s + self.site_width]
        name = "lattice_ln_abc" if self.lattice_encoding == "ln_abc" else "lattice_ln_vpa_ba_ca"
        out[name] = [self.lattice_offset, self.lattice_offset + 3]
        out["lattice_angles"] = [self.lattice_offset + 3, self.lattice_offset + 6]
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dim"] = self.dim
        d["layout"] = self.layout()
        d["scaling"] = {
            "onehot_and_presence": "0/1",
            "frac_coords": "2*x - 1, x in [0, 1)",
            **({"lengths": "clip((ln L - ln_length_center) / ln_length_halfwidth, -1, 1)",
                "ln_length_center": self.ln_length_center,
                "ln_length_halfwidth": self.ln_length_halfwidth}
               if self.lattice_encoding == "ln_abc" else
               {"volume_per_atom": "clip((ln(V/N) - ln_vpa_center) / ln_vpa_halfwidth, -1, 1), "
                                   "N = sum of the sites' multiplicities",
                "ln_vpa_center": self.ln_vpa_center,
                "ln_vpa_halfwidth": self.ln_vpa_halfwidth,
                "axis_ratios": "clip(ln(b/a) / ln(max_axis_ratio), -1, 1), same for c/a"}),
            "angles": "(deg - 90) / 90",
            "letter_index": "position in lib.wyckoff.letters(sg) (alphabetical, 'a' first)",
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json())
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncodingSchema:
        keys = {"version", "max_sites", "n_spacegroups", "n_letters", "min_length_a", "max_length_a",
                "site_order", "extra", "lattice_encoding", "min_volume_per_atom_a3",
                "max_volume_per_atom_a3", "max_axis_ratio"}
        kw = {k: v for k, v in d.items() if k in keys}
        if "lattice_encoding" not in kw and kw.get("version") in LEGACY_LN_ABC_VERSIONS:
            kw["lattice_encoding"] = "ln_abc"
        schema = cls(**kw)
        if "dim" in d and int(d["dim"]) != schema.dim:
            raise ValueError(f"encoding schema dim {d['dim']} disagrees with its sizes ({schema.dim})")
        return schema

    @classmethod
    def from_json(cls, text: str) -> EncodingSchema:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> EncodingSchema:
        return cls.from_json(Path(path).read_text())


DEFAULT_SCHEMA = EncodingSchema()


def schema_for_dim(dim: int) -> EncodingSchema:
    """The default schema whose vectors have length ``dim`` (its ``max_sites`` follows from it);
    how a ``training_templates`` table built with ``max_asu_sites`` != 4 is read back."""
    width, fixed = DEFAULT_SCHEMA.site_width, DEFAULT_SCHEMA.n_spacegroups + 6
    sites, rest = divmod(dim - fixed, width)
    if rest or sites < 1:
        raise ValueError(f"no encoding schema has vectors of length {dim} "
                         f"({fixed} + k x {width} for k >= 1 sites)")
    return EncodingSchema(max_sites=sites)


# --------------------------------------------------------------------------- lookups
@lru_cache(maxsize=1)
def letter_counts() -> np.ndarray:
    """(231,) number of Wyckoff positions of each space group (index 0 unused)."""
    out = np.zeros(N_SPACEGROUPS + 1, dtype=np.int64)
    for sg in range(1, N_SPACEGROUPS + 1):
        out[sg] = len(wyckoff.letters(sg))
    return out


@lru_cache(maxsize=1)
def multiplicity_table() -> np.ndarray:
    """(231, MAX_WYCKOFF_LETTERS) multiplicity of each group's letter index (0 where none)."""
    out = np.zeros((N_SPACEGROUPS + 1, wyckoff.MAX_WYCKOFF_LETTERS), dtype=np.int64)
    for sg in range(1, N_SPACEGROUPS + 1):
        mult = {wp.letter: int(wp.multiplicity) for wp in wyckoff.group(sg).Wyckoff_positions}
        for i, letter in enumerate(wyckoff.letters(sg)):
            out[sg, i] = mult[letter]
    return out


def atoms_per_cell(sg: np.ndarray, letter_index: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(n,) atoms of the conventional cell: the sum of the present sites' multiplicities."""
    m = multiplicity_table()[np.asarray(sg, dtype=np.int64)[:, None], np.asarray(letter_index, dtype=np.int64)]
    return np.where(np.asarray(present, dtype=bool), m, 0).sum(axis=1)


def _letter_lookup(sgs: np.ndarray) -> pl.DataFrame:
    """(spacegroup_number, letter, letter_index) for the given groups."""
    rows_sg, rows_letter, rows_idx = [], [], []
    for sg in np.unique(sgs).tolist():
        for i, letter in enumerate(wyckoff.letters(int(sg))):
            rows_sg.append(int(sg))
            rows_letter.append(letter)
            rows_idx.append(i)
    return pl.DataFrame(
        {"spacegroup_number": rows_sg, "letter": rows_letter, "letter_index": rows_idx},
        schema={"spacegroup_number": pl.Int64, "letter": pl.String, "letter_index": pl.Int64},
    )


def _row_labels(df: pl.DataFrame, rows: np.ndarray, *, limit: int = 5) -> str:
    rows = np.asarray(rows)[:limit]
    if "material_id" in df.columns:
        ids = df["material_id"].gather(rows.tolist()).to_list()
        return ", ".join(f"row {r} ({m})" for r, m in zip(rows.tolist(), ids, strict=True))
    return ", ".join(f"row {r}" for r in rows.tolist())


# --------------------------------------------------------------------------- encode
def encode_arrays(
    sg: np.ndarray,
    letter_index: np.ndarray,
    present: np.ndarray,
    xyz: np.ndarray,
    lattice: np.ndarray,
    *,
    schema: EncodingSchema = DEFAULT_SCHEMA,
) -> np.ndarray:
    """Vectors (n, dim) float32 from arrays: sg (n,), letter_index (n, S), present (n, S) bool,
    xyz (n, S, 3) in [0, 1), lattice (n, 6) as a, b, c (Å), alpha, beta, gamma (deg).

    Sites are put in canonical order (letter index, x, y, z) here.
    """
    n = len(sg)
    S = schema.max_sites
    sg = np.asarray(sg, dtype=np.int64)
    letter_index = np.asarray(letter_index, dtype=np.int64)
    present = np.asarray(present, dtype=bool)
    xyz = np.mod(np.asarray(xyz, dtype=np.float64), 1.0)
    if letter_index.shape != (n, S) or present.shape != (n, S) or xyz.shape != (n, S, 3):
        raise ValueError(f"site arrays must be (n, {S}) / (n, {S}, 3); got {letter_index.shape}, "
                         f"{present.shape}, {xyz.shape}")
    # canonical order: absent sites last, then letter index, x, y, z
    big = np.where(present, letter_index, 10_000)
    order = np.lexsort((np.round(xyz[..., 2], 6), np.round(xyz[..., 1], 6),
                        np.round(xyz[..., 0], 6), big), axis=-1)
    letter_index = np.take_along_axis(letter_index, order, axis=1)
    present = np.take_along_axis(present, order, axis=1)
    xyz = np.take_along_axis(xyz, order[..., None], axis=1)

    out = np.zeros((n, schema.dim), dtype=np.float32)
    rows = np.arange(n)
    out[rows, sg - 1] = 1.0
    for j in range(S):
        s = schema.site_slice(j).start
        p = present[:, j]
        out[p, s] = 1.0
        out[rows[p], s + 1 + letter_index[p, j]] = 1.0
        c0 = s + 1 + schema.n_letters
        out[:, c0:c0 + 3] = np.where(p[:, None], 2.0 * xyz[:, j] - 1.0, 0.0)
    lat = np.asarray(lattice, dtype=np.float64)
    lo = schema.lattice_offset
    with np.errstate(divide="ignore", invalid="ignore"):
        if schema.lattice_encoding == "ln_abc":
            ln = (np.log(lat[:, :3]) - schema.ln_length_center) / schema.ln_length_halfwidth
        else:
            n_atoms = atoms_per_cell(sg, letter_index, present)
            vpa = wyckoff.cell_volume(*(lat[:, i] for i in range(6))) / n_atoms
            ln = np.column_stack([
                (np.log(vpa) - schema.ln_vpa_center) / schema.ln_vpa_halfwidth,
                np.log(lat[:, 1] / lat[:, 0]) / schema.ln_ratio_halfwidth,
                np.log(lat[:, 2] / lat[:, 0]) / schema.ln_ratio_halfwidth,
            ])
    out[:, lo:lo + 3] = np.clip(ln, -1.0, 1.0)
    out[:, lo + 3:lo + 6] = np.clip((lat[:, 3:6] - 90.0) / 90.0, -1.0, 1.0)
    return out


def template_arrays(
    df: pl.DataFrame, *, schema: EncodingSchema = DEFAULT_SCHEMA
) -> dict[str, np.ndarray]:
    """Padded arrays (sg, letter_index, present, xyz, lattice) of a template frame, columnar.

    Raises ``ValueError`` naming the rows that have a missing column, too many sites, a letter
    their group does not have, or coordinates that are not triples.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"template frame lacks columns {missing}; needs {list(REQUIRED_COLUMNS)}")
    n = df.height
    S = schema.max_sites
    sg = df["spacegroup_number"].cast(pl.Int64).to_numpy()
    bad = np.flatnonzero((sg < 1) | (sg > N_SPACEGROUPS))
    if bad.size:
        raise ValueError(f"space group outside 1..230 at {_row_labels(df, bad)}")
    n_sites = df["wyckoff_letters"].list.len().fill_null(0).to_numpy().astype(np.int64)
    n_coords = df["asu_frac_coords"].list.len().fill_null(0).to_numpy().astype(np.int64)
    bad = np.flatnonzero((n_sites < 1) | (n_sites > S) | (n_sites != n_coords))
    if bad.size:
        raise ValueError(
            f"{bad.size} template rows have 0 or more than {S} ASU sites, or letters and coordinates "
            f"of different lengths: {_row_labels(df, bad)}"
        )
    site_row = np.repeat(np.arange(n), n_sites)
    site_pos = np.arange(site_row.size) - np.repeat(np.cumsum(n_sites) - n_sites, n_sites)
    sites = pl.DataFrame(
        {
            "spacegroup_number": np.repeat(sg, n_sites),
            "letter": df["wyckoff_letters"].explode().cast(pl.String),
        }
    ).with_row_index("_i")
    joined = sites.join(_letter_lookup(sg), on=["spacegroup_number", "letter"], how="left").sort("_i")
    li = joined["letter_index"].to_numpy()
    if joined["letter_index"].null_count():
        bad_sites = np.flatnonzero(joined["letter_index"].is_null().to_numpy())
        raise ValueError(
            "Wyckoff letters that their space group does not have at "
            f"{_row_labels(df, np.unique(site_row[bad_sites]))}"
        )
    coords = df["asu_frac_coords"].explode()
    clen = coords.list.len().to_numpy()
    if (clen != 3).any():
        bad_sites = np.flatnonzero(clen != 3)
        raise ValueError(f"ASU coordinates that are not (x, y, z) at {_row_labels(df, np.unique(site_row[bad_sites]))}")
    xyz_flat = coords.list.to_array(3).to_numpy().astype(np.float64)
    letter_index = np.zeros((n, S), dtype=np.int64)
    present = np.zeros((n, S), dtype=bool)
    xyz = np.zeros((n, S, 3), dtype=np.float64)
    letter_index[site_row, site_pos] = li
    present[site_row, site_pos] = True
    xyz[site_row, site_pos] = xyz_flat
    lattice = np.column_stack([df[c].cast(pl.Float64).to_numpy() for c in LATTICE_COLUMNS])
    bad = np.flatnonzero(~np.isfinite(lattice).all(axis=1) | (lattice[:, :3] <= 0).any(axis=1))
    if bad.size:
        raise ValueError(f"lattice parameters missing or non-positive at {_row_labels(df, bad)}")
    return {"sg": sg, "letter_index": letter_index, "present": present, "xyz": xyz, "lattice": lattice}


def encode_templates(df: pl.DataFrame, *, schema: EncodingSchema = DEFAULT_SCHEMA) -> pl.DataFrame:
    """``df`` plus ``encoding`` (list[f32], ``schema.dim`` long) and ``encoding_version``.

    Reads spacegroup_number, wyckoff_letters (list[str]), asu_frac_coords (list[list[f64]]),
    a_a, b_a, c_a, alpha_deg, beta_deg, gamma_deg. Vectorised over the whole frame.
    """
    arrs = template_arrays(df, schema=schema)
    vec = encode_arrays(arrs["sg"], arrs["letter_index"], arrs["present"], arrs["xyz"], arrs["lattice"],
                        schema=schema)
    enc = pl.Series("encoding", vec).cast(pl.List(pl.Float32))
    return df.with_columns(enc, pl.lit(schema.version, dtype=pl.String).alias("encoding_version"))


def encodings_to_numpy(df: pl.DataFrame, *, schema: EncodingSchema = DEFAULT_SCHEMA) -> np.ndarray:
    """The ``encoding`` column as an (n, dim) float32 array, checking version and length."""
    if "encoding" not in df.columns:
        raise ValueError("frame has no 'encoding' column; call encode_templates first")
    if "encoding_version" in df.columns:
        versions = set(df["encoding_version"].unique().to_list())
        if versions - {schema.version}:
            raise ValueError(f"encoding_version {sorted(map(str, versions))} != schema {schema.version!r}")
    lens = df["encoding"].list.len().unique().to_list()
    if lens != [schema.dim] and df.height:
        raise ValueError(f"encoding lengths {lens} != schema dim {schema.dim}")
    if df.height == 0:
        return np.zeros((0, schema.dim), dtype=np.float32)
    return df["encoding"].list.to_array(schema.dim).to_numpy().astype(np.float32)


# --------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class DecodedArrays:
    """Raw decoding of vectors (n rows), before projection, lattice constraints and filters.

    ``sg`` (n,) space group numbers; ``present`` (n, S) bool; ``letter_index`` (n, S) index into
    ``lib.wyckoff.letters(sg)`` (always < that group's letter count); ``xyz`` (n, S, 3) in [0, 1);
    ``lattice`` (n, 6) a, b, c in Å and alpha, beta, gamma in degrees (unconstrained).
    """

    sg: np.ndarray
    present: np.ndarray
    letter_index: np.ndarray
    xyz: np.ndarray
    lattice: np.ndarray

    def __len__(self) -> int:
        return len(self.sg)


def allowed_mask(allowed_spacegroups: Any | None) -> np.ndarray | None:
    """(230,) bool mask of allowed groups, or None for all."""
    if allowed_spacegroups is None:
        return None
    sgs = np.unique(np.asarray(list(allowed_spacegroups), dtype=np.int64))
    if sgs.size == 0 or sgs.min() < 1 or sgs.max() > N_SPACEGROUPS:
        raise ValueError(f"allowed space groups must be a non-empty subset of 1..230, got {sgs.tolist()}")
    m = np.zeros(N_SPACEGROUPS, dtype=bool)
    m[sgs - 1] = True
    return m


def decode_vectors(
    x: np.ndarray,
    *,
    schema: EncodingSchema = DEFAULT_SCHEMA,
    allowed_spacegroups: Any | None = None,
    presence_threshold: float = 0.5,
) -> DecodedArrays:
    """Raw decoding of generator outputs (n, dim).

    * space group: argmax of the one-hot block restricted to ``allowed_spacegroups`` (others are
      masked to -inf before the argmax, so only allowed groups can come out);
    * site 0 is always present (present sites come first in the canonical order, so every
      training vector has it); site j > 0 is present when its presence entry >
      ``presence_threshold``;
    * letter: argmax over the letter slots that exist in the decoded group (slots >= the
      group's letter count are masked before the argmax);
    * x, y, z: ``(v + 1) / 2`` wrapped into [0, 1);
    * lattice: inverse of the scalings in the module docstring; for ``vpa_ratios`` the crystal
      system's constraints are applied to the ratios and angles, then the cell is scaled to
      ``(V/N) * N`` with N the decoded sites' multiplicities (NaN lengths where the angles form
      no cell).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != schema.dim:
        raise ValueError(f"vectors must be (n, {schema.dim}), got {x.shape}")
    n = x.shape[0]
    S = schema.max_sites
    sg_logits = x[:, : schema.n_spacegroups].copy()
    mask = allowed_mask(allowed_spacegroups)
    if mask is not None:
        sg_logits[:, ~mask] = -np.inf
    sg = np.argmax(sg_logits, axis=1).astype(np.int64) + 1
    n_letters = letter_counts()[sg]  # (n,)
    slot = np.arange(schema.n_letters)
    valid_slot = slot[None, :] < n_letters[:, None]  # (n, L)
    present = np.zeros((n, S), dtype=bool)
    letter_index = np.zeros((n, S), dtype=np.int64)
    xyz = np.zeros((n, S, 3), dtype=np.float64)
    for j in range(S):
        s = schema.site_slice(j).start
        # present sites come first in the canonical order, so site 0 is present in every
        # training vector: it is always decoded as present
        present[:, j] = True if j == 0 else x[:, s] > presence_threshold
        logits = np.where(valid_slot, x[:, s + 1: s + 1 + schema.n_letters], -np.inf)
        letter_index[:, j] = np.argmax(logits, axis=1)
        c0 = s + 1 + schema.n_letters
        xyz[:, j] = np.mod((x[:, c0:c0 + 3].astype(np.float64) + 1.0) / 2.0, 1.0)
    lo = schema.lattice_offset
    lat = x[:, lo:lo + 6].astype(np.float64)
    angles = np.clip(lat[:, 3:6], -1, 1) * 90.0 + 90.0
    if schema.lattice_encoding == "ln_abc":
        lengths = np.exp(np.clip(lat[:, :3], -1, 1) * schema.ln_length_halfwidth + schema.ln_length_center)
        lattice = np.column_stack([lengths, angles])
    else:
        vpa = np.exp(np.clip(lat[:, 0], -1, 1) * schema.ln_vpa_halfwidth + schema.ln_vpa_center)
        ratios = np.exp(np.clip(lat[:, 1:3], -1, 1) * schema.ln_ratio_halfwidth)
        shape = wyckoff.constrain_lattices(sg, np.column_stack([np.ones(n), ratios, angles]))
        shape = shape / np.column_stack([shape[:, :1]] * 3 + [np.ones((n, 3))])  # a = 1
        unit_volume = wyckoff.cell_volume(*(shape[:, i] for i in range(6)))
        volume = vpa * atoms_per_cell(sg, letter_index, present)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.cbrt(volume / unit_volume)
        lattice = np.column_stack([shape[:, :3] * scale[:, None], shape[:, 3:]])
    return DecodedArrays(sg=sg, present=present, letter_index=letter_index, xyz=xyz, lattice=lattice)


def spacegroup_onehot(sg: np.ndarray, *, n_spacegroups: int = N_SPACEGROUPS) -> np.ndarray:
    """(n, 230) float32 one-hot of space group numbers (the generator's condition input)."""
    sg = np.asarray(sg, dtype=np.int64)
    out = np.zeros((len(sg), n_spacegroups), dtype=np.float32)
    out[np.arange(len(sg)), sg - 1] = 1.0
    return out
