"""Deduplicate candidates within a chemical system and flag those already known in the Materials Project.

Three stages, each cheap enough for millions of rows:

1. **Exact duplicates by fingerprint** (``lib.infill`` structure fingerprint: isometry- and
   scale-invariant). One ``group_by``; the smallest ``candidate_id`` of a group represents it.
2. **StructureMatcher inside buckets that could match.** A bucket holds representatives with the
   same reduced formula, space group, number of atoms and *prototype label* (the multiset of
   ``element:Wyckoff letter``, minimised over the letter permutations of the space group's
   Euclidean normalizer, so origin choices land in one bucket). Only buckets of two or more are
   matched, greedily (each structure against the representatives found so far); pairs whose
   volume-normalised lattice lengths differ by more than the matcher's ``ltol`` (+ a margin) or
   whose angles differ by more than ``angle_tol`` (+ a margin) are not compared (a necessary
   condition for the conventional cells of the same space-group setting, counted as skipped).
3. **Against MP**: representatives whose reduced formula appears among the system's MP
   structures, and whose primitive cell could hold as many atoms as the MP structure's (the
   conventional atom count over the centring multiplicity is a multiple of the MP primitive
   count), are matched with StructureMatcher; a match sets ``is_known_in_mp`` and keeps the
   ``mp_material_id`` (the first matching id in id order). Nothing is deleted.

Buckets are matched through :func:`lib.parallel.map_row_chunks` (Ray tasks when Ray is up,
else in-process). Every compared pair is counted.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from lib import wyckoff
from lib.infill import LATTICE_COLUMNS, _fold, _groups, _letter_indices, normalizer_ops
from lib.parallel import map_row_chunks

#: StructureMatcher settings against MP: pymatgen's defaults (what the paper used).
MP_MATCHER_DEFAULTS = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0, "primitive_cell": True, "scale": True}
#: Within the system: near-identical duplicates only. pymatgen's loose defaults would compare
#: (and fold) about 30% of the bucketed candidates of random templates; these keep the number
#: of compared pairs near 1.5% of the bucket members (measured on pyxtal-sampled Ba-Ru-O).
MATCHER_DEFAULTS = {"ltol": 0.05, "stol": 0.05, "angle_tol": 1.0, "primitive_cell": True, "scale": True}
DISTANCE_WINDOW = 0.05

DEDUP_EXTRA_SCHEMA: dict[str, pl.DataType] = {
    "n_folded": pl.Int64,
    "is_known_in_mp": pl.Boolean,
    "mp_material_id": pl.String,
}

_NARROW = ("candidate_id", "fingerprint", "reduced_formula", "spacegroup_number", "n_atoms",
           "asu_letters", "asu_species", *LATTICE_COLUMNS)
_STRUCT = ("candidate_id", "spacegroup_number", "asu_letters", "asu_species", "asu_frac_coords",
           *LATTICE_COLUMNS)


@dataclass
class DedupResult:
    """Per unique candidate: ``candidate_id``, ``n_folded``, ``is_known_in_mp``, ``mp_material_id``;
    per folded candidate: ``folded`` (``candidate_id``, ``representative_id``, ``reason``)."""

    unique: pl.DataFrame
    folded: pl.DataFrame
    n_input: int = 0
    n_folded_fingerprint: int = 0
    n_folded_matcher: int = 0
    n_buckets: int = 0
    n_bucket_members: int = 0
    largest_bucket: int = 0
    n_pairs_compared: int = 0
    n_pairs_screened_out: int = 0
    n_mp_references: int = 0
    n_mp_candidates: int = 0
    n_mp_pairs_compared: int = 0
    n_mp_matches: int = 0
    mp_matches_by_material: dict[str, int] = field(default_factory=dict)
    seconds_fingerprint: float = 0.0
    seconds_matcher: float = 0.0
    seconds_mp: float = 0.0
    backend: str = "local"
    workers: int = 1

    @property
    def n_unique(self) -> int:
        return self.unique.height

    def counts(self) -> dict[str, int | float | str]:
        return {
            "n_input": self.n_input,
            "n_unique": self.n_unique,
            "n_folded_fingerprint": self.n_folded_fingerprint,
            "n_folded_matcher": self.n_folded_matcher,
            "n_buckets": self.n_buckets,
            "n_bucket_members": self.n_bucket_members,
            "largest_bucket": self.largest_bucket,
            "n_pairs_compared": self.n_pairs_compared,
            "n_pairs_screened_out": self.n_pairs_screened_out,
            "n_mp_references": self.n_mp_references,
            "n_mp_candidates": self.n_mp_candidates,
            "n_mp_pairs_compared": self.n_mp_pairs_compared,
            "n_mp_matches": self.n_mp_matches,
            "seconds_fingerprint": round(self.seconds_fingerprint, 3),
            "seconds_matcher": round(self.seconds_matcher, 3),
            "seconds_mp": round(self.seconds_mp, 3),
            "backend": self.backend,
            "workers": self.workers,
        }


def _matcher(settings: dict):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**settings)


def centring_multiplicity(sg: np.ndarray) -> np.ndarray:
    """Lattice points per conventional cell (P 1, A/B/C/I 2, R in hexagonal axes 3, F 4)."""
    out = np.ones(sg.shape, dtype=np.int64)
    for s in np.unique(sg):
        symbol = wyckoff._group(int(s)).symbol
        out[sg == s] = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "R": 3, "F": 4}.get(symbol[0], 1)
    return out


# ----------------------------------------------------------------------------- prototype labels
def prototype_labels(df: pl.DataFrame) -> np.ndarray:
    """uint64 label per row: the multiset of (atomic number, Wyckoff letter) minimised over the
    letter permutations of the space group's Euclidean normalizer (origin choices fold together)."""
    from pymatgen.core import Element

    n = df["asu_letters"].list.len().to_numpy().astype(np.int64)
    if df.height == 0:
        return np.zeros(0, dtype=np.uint64)
    nmax = int(n.max())
    owner = np.repeat(np.arange(df.height), n)
    pos = np.arange(owner.size) - np.concatenate([[0], np.cumsum(n)])[owner]
    sg_row = df["spacegroup_number"].to_numpy().astype(np.int64)
    lidx = _letter_indices(sg_row[owner], df["asu_letters"].explode().to_numpy().astype(str))
    sp = df["asu_species"].explode()
    symbols = sp.unique().to_list()
    zmap = pl.DataFrame({"s": symbols, "z": [Element(s).Z for s in symbols]})
    z = pl.DataFrame({"s": sp}).join(zmap, on="s", how="left", maintain_order="left")["z"].to_numpy().astype(np.int64)
    L = np.full((df.height, nmax), -1, dtype=np.int64)
    Z = np.zeros((df.height, nmax), dtype=np.int64)
    L[owner, pos] = lidx
    Z[owner, pos] = z
    pad = np.uint64(np.iinfo(np.uint64).max)
    best = np.full(df.height, pad, dtype=np.uint64)
    for (s,), rows in _groups(sg_row):
        perms = [np.arange(len(wyckoff.letters(s)))] + [op.letter_perm for op in normalizer_ops(s)]
        seen = set()
        for perm in perms:
            key = perm.tobytes()
            if key in seen:
                continue
            seen.add(key)
            lr = L[rows]
            ml = np.where(lr >= 0, perm[np.clip(lr, 0, None)], 0)
            code = np.where(lr >= 0, (Z[rows] * 64 + ml).astype(np.uint64), pad)
            code.sort(axis=1)
            best[rows] = np.minimum(best[rows], _fold(code, axis=1, seed=11))
    return best


# ----------------------------------------------------------------------------- matching work units
def _structures(df: pl.DataFrame) -> list:
    """Rebuilt structures, reduced once (primitive cell, then Niggli) so that every later
    ``StructureMatcher.fit(..., skip_structure_reduction=True)`` skips that work."""
    from lib.infill import candidate_structures

    return [_reduce(s) for s in candidate_structures(df)]


def _reduce(s):
    return s.get_primitive_structure().get_reduced_structure()


def match_descriptors(df: pl.DataFrame, *, settings: dict, distance_window: float) -> np.ndarray:
    """Pre-screen descriptor per row, scaled so that rows which could match lie within 1 (L-inf).

    ``[log(a/V^(1/3)), log(b/..), log(c/..)] / log(1 + ltol)``, angles / ``angle_tol`` and, per
    pair of element types, the sorted shortest orbit-orbit distances over (V/N)^(1/3) /
    ``distance_window``. Rows of one bucket share their multiset of (element, letter), so the
    entries line up; sorting is 1-Lipschitz in L-inf, so a site correspondence within the
    window survives it.
    """
    from pymatgen.core import Element

    from lib.infill import _explode_sites, site_distance_matrix

    lat = df.select(LATTICE_COLUMNS).to_numpy().astype(float)
    vol = wyckoff.cell_volume(*lat.T)
    s = np.cbrt(vol)
    lengths = np.log(lat[:, :3] / s[:, None]) / np.log1p(settings.get("ltol", 0.2))
    angles = lat[:, 3:] / settings.get("angle_tol", 5.0)
    sites = _explode_sites(df)
    D = site_distance_matrix(sites)
    scale = np.cbrt(vol / df["n_atoms"].to_numpy())
    symbols = df["asu_species"].explode()
    zmap = {sym: Element(sym).Z for sym in symbols.unique().to_list()}
    Z = sites.padded(np.array([zmap[x] for x in symbols.to_list()], dtype=np.int64), 0)
    iu = np.triu_indices(D.shape[1])
    dist = np.nan_to_num(D[:, iu[0], iu[1]] / scale[:, None], nan=0.0).clip(0.0, 99.0)
    zi, zj = Z[:, iu[0]], Z[:, iu[1]]
    key = np.minimum(zi, zj) * 200 + np.maximum(zi, zj)
    combined = np.sort(key * 100.0 + dist, axis=1)
    tri = (combined - np.floor(combined / 100.0) * 100.0) / distance_window
    keys = np.floor(combined / 100.0)  # identical within a bucket; kept so that mismatches cannot pair
    return np.concatenate([lengths, angles, tri, keys * 1e6], axis=1)


def _find(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def match_buckets(buckets: pl.DataFrame, *, settings: dict) -> pl.DataFrame:
    """StructureMatcher inside each bucket (one row per bucket with list columns ``rows``).

    Only pairs whose descriptors (``desc``) lie within 1 in L-inf are compared (scipy cKDTree);
    matched pairs are merged with union-find (a pair already joined is not compared again).
    Returns one row per folded member: ``candidate_id``, ``representative_id`` (smallest id of
    its cluster), plus ``pairs_compared``/``pairs_screened`` totals on a summary row with null ids.
    """
    from scipy.spatial import cKDTree

    sm = _matcher(settings)
    out_id, out_rep = [], []
    compared = screened = 0
    members = (buckets.select("bucket", pl.col("rows")).explode("rows").unnest("rows")
               .sort(["bucket", "candidate_id"]))
    b = members["bucket"].to_numpy()
    cuts = np.concatenate([[0], np.flatnonzero(b[1:] != b[:-1]) + 1, [b.size]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            part = members.slice(lo, hi - lo)
            desc = np.array(part["desc"].to_list(), dtype=float)
            pairs = sorted(cKDTree(desc).query_pairs(r=1.0 + 1e-9, p=np.inf))
            n = part.height
            screened += n * (n - 1) // 2 - len(pairs)
            if not pairs:
                continue
            need = sorted({i for p in pairs for i in p})
            structs = dict(zip(need, _structures(part[need]), strict=True))
            parent = list(range(n))

            for i, j in pairs:
                ri, rj = _find(parent, i), _find(parent, j)
                if ri == rj:
                    continue
                if len(structs[i]) != len(structs[j]):  # different primitive cells never fit
                    screened += 1
                    continue
                compared += 1
                if sm.fit(structs[i], structs[j], skip_structure_reduction=True):
                    parent[max(ri, rj)] = min(ri, rj)
            ids = part["candidate_id"].to_list()
            for i in range(n):
                r = _find(parent, i)
                if r != i:
                    out_id.append(ids[i])
                    out_rep.append(ids[r])
    out = pl.DataFrame({"candidate_id": out_id, "representative_id": out_rep},
                       schema={"candidate_id": pl.String, "representative_id": pl.String})
    summary = pl.DataFrame({"candidate_id": [None], "representative_id": [None]},
                           schema={"candidate_id": pl.String, "representative_id": pl.String})
    return pl.concat([out, summary]).with_columns(
        pl.when(pl.col("candidate_id").is_null()).then(pl.lit(compared)).otherwise(0).cast(pl.Int64).alias("pairs_compared"),
        pl.when(pl.col("candidate_id").is_null()).then(pl.lit(screened)).otherwise(0).cast(pl.Int64).alias("pairs_screened"),
    )


def match_mp(cands: pl.DataFrame, *, references: list[tuple[str, str, int, dict]], settings: dict) -> pl.DataFrame:
    """Match candidate rows against MP reference structures (``(material_id, reduced_formula,
    n_primitive, structure_dict)``). Returns ``candidate_id``, ``mp_material_id`` (null = no match),
    ``pairs_compared``."""
    from pymatgen.core import Structure

    sm = _matcher(settings)
    refs = [(mid, rf, npr, _reduce(Structure.from_dict(d))) for mid, rf, npr, d in references]
    structs = _structures(cands)
    per_prim = (cands["n_atoms"] // pl.Series(centring_multiplicity(cands["spacegroup_number"].to_numpy()))).to_list()
    out_mid, out_cmp = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s, rf, npc in zip(structs, cands["reduced_formula"].to_list(), per_prim, strict=True):
            hit, cmp = None, 0
            for mid, rrf, npr, ref in refs:
                if rrf != rf or npc % npr or len(s) != len(ref):
                    continue
                cmp += 1
                if sm.fit(ref, s, skip_structure_reduction=True):
                    hit = mid
                    break
            out_mid.append(hit)
            out_cmp.append(cmp)
    return pl.DataFrame({"candidate_id": cands["candidate_id"], "mp_material_id": out_mid,
                         "pairs_compared": out_cmp},
                        schema={"candidate_id": pl.String, "mp_material_id": pl.String, "pairs_compared": pl.Int64})


# ----------------------------------------------------------------------------- MP references
def mp_references(mp_structures: pl.DataFrame, *, elements: list[str]) -> list[tuple[str, str, int, dict]]:
    """MP structures (``mp_structures`` contract) inside the chemical system, as matcher references:
    ``(material_id, reduced_formula, n_primitive_atoms, structure dict)`` sorted by material_id."""
    from pymatgen.core import Lattice, Structure

    need = ("material_id", "reduced_formula", "lattice_matrix", "species", "frac_coords")
    missing = [c for c in need if c not in mp_structures.columns]
    if missing:
        raise ValueError(f"MP structures lack column(s) {missing} (mp_structures contract)")
    allowed = set(elements)
    rows = mp_structures.select(need).sort("material_id")
    out = []
    for mid, rf, lat, species, frac in rows.iter_rows():
        if not set(species) <= allowed:
            continue
        s = Structure(Lattice(np.asarray(lat, dtype=float).reshape(3, 3)), species, frac)
        out.append((mid, rf, len(s.get_primitive_structure()), s.as_dict()))
    return out


# ----------------------------------------------------------------------------- entry point
def dedup_candidates(
    candidates: pl.DataFrame | pl.LazyFrame,
    *,
    mp_structures: pl.DataFrame | None = None,
    elements: list[str] | None = None,
    matcher: dict | None = None,
    mp_matcher: dict | None = None,
    distance_window: float = DISTANCE_WINDOW,
    n_chunks: int | None = None,
) -> DedupResult:
    """Dedup decisions for the candidates of one chemical system (see the module docstring).

    ``candidates``: the ``candidates`` table (a LazyFrame over its shards is fine: only the narrow
    columns are collected, structure columns only for rows that are matched). ``mp_structures``:
    the ``mp_structures`` contract (any rows; those outside ``elements`` are ignored).
    """
    settings = {**MATCHER_DEFAULTS, **(matcher or {})}
    mp_settings = {**MP_MATCHER_DEFAULTS, **(mp_matcher or {})}
    lf = candidates.lazy() if isinstance(candidates, pl.DataFrame) else candidates
    t0 = time.perf_counter()
    narrow = lf.select(_NARROW).collect()
    res = DedupResult(unique=pl.DataFrame(), folded=pl.DataFrame(), n_input=narrow.height)
    if narrow["fingerprint"].null_count():
        raise ValueError(f"{narrow['fingerprint'].null_count()} candidates have no fingerprint")
    if narrow["candidate_id"].is_duplicated().any():
        raise ValueError("candidate_id is not unique in the candidates given to dedup")

    # 1. exact duplicates by fingerprint
    narrow = narrow.with_columns(pl.col("candidate_id").min().over("fingerprint").alias("_rep"))
    fp_folded = narrow.filter(pl.col("candidate_id") != pl.col("_rep")).select(
        "candidate_id", pl.col("_rep").alias("representative_id"), pl.lit("fingerprint").alias("reason"))
    reps = narrow.filter(pl.col("candidate_id") == pl.col("_rep")).drop("_rep")
    res.n_folded_fingerprint = fp_folded.height
    res.seconds_fingerprint = time.perf_counter() - t0

    # 2. StructureMatcher inside buckets
    t1 = time.perf_counter()
    reps = reps.with_columns(pl.Series("_label", prototype_labels(reps)))
    bucket_key = ["reduced_formula", "spacegroup_number", "n_atoms", "_label"]
    reps = reps.with_columns(pl.len().over(bucket_key).alias("_bsize"))
    multi = reps.filter(pl.col("_bsize") > 1)
    res.n_bucket_members = multi.height
    sm_folded = pl.DataFrame(schema={"candidate_id": pl.String, "representative_id": pl.String, "reason": pl.String})
    if multi.height:
        multi = multi.with_columns(pl.struct(bucket_key).rank("dense").alias("bucket"))
        res.n_buckets = int(multi["bucket"].n_unique())
        res.largest_bucket = int(multi["_bsize"].max())
        ids = multi["candidate_id"]
        full = lf.select(*_STRUCT, "n_atoms").filter(pl.col("candidate_id").is_in(ids.implode())).collect()
        full = full.join(multi.select("candidate_id", "bucket"), on="candidate_id")
        full = full.with_columns(pl.Series("desc", match_descriptors(full, settings=settings,
                                                                     distance_window=distance_window)))
        buckets = full.group_by("bucket").agg(pl.struct(pl.all().exclude("bucket")).alias("rows"),
                                              pl.len().alias("_n")).sort("_n", descending=True).drop("_n")
        matched, stats = map_row_chunks(match_buckets, buckets, n_chunks=n_chunks, settings=settings)
        res.backend, res.workers = stats.backend, stats.workers
        res.n_pairs_compared = int(matched["pairs_compared"].sum())
        res.n_pairs_screened_out = int(matched["pairs_screened"].sum())
        sm_folded = matched.filter(pl.col("candidate_id").is_not_null()).select(
            "candidate_id", "representative_id", pl.lit("structure_matcher").alias("reason"))
    res.n_folded_matcher = sm_folded.height
    res.seconds_matcher = time.perf_counter() - t1

    folded = pl.concat([fp_folded, sm_folded])
    # a fingerprint duplicate of a candidate folded by the matcher counts for the matcher's representative
    folded = folded.join(sm_folded.select("candidate_id", pl.col("representative_id").alias("_up")),
                         left_on="representative_id", right_on="candidate_id", how="left").with_columns(
        pl.coalesce("_up", "representative_id").alias("representative_id")).drop("_up")
    unique = reps.join(folded.select("candidate_id"), on="candidate_id", how="anti")
    n_folded = folded.group_by("representative_id").agg(pl.len().cast(pl.Int64).alias("n_folded"))
    unique = unique.join(n_folded, left_on="candidate_id", right_on="representative_id", how="left").with_columns(
        pl.col("n_folded").fill_null(0))

    # 3. against MP
    t2 = time.perf_counter()
    mp_hits = pl.DataFrame(schema={"candidate_id": pl.String, "mp_material_id": pl.String})
    if mp_structures is not None and mp_structures.height:
        refs = mp_references(mp_structures, elements=elements or sorted(
            {e for f in unique["reduced_formula"].unique().to_list() for e in _formula_elements(f)}))
        res.n_mp_references = len(refs)
        prim = {}
        for _mid, rf, npr, _d in refs:
            prim.setdefault(rf, set()).add(npr)
        if refs:
            per_prim = unique["n_atoms"].to_numpy() // centring_multiplicity(unique["spacegroup_number"].to_numpy())
            ok = np.array([rf in prim and any(p % q == 0 for q in prim[rf])
                           for rf, p in zip(unique["reduced_formula"].to_list(), per_prim.tolist(), strict=True)],
                          dtype=bool)
            cand_ids = unique.filter(pl.Series(ok))["candidate_id"]
            res.n_mp_candidates = cand_ids.len()
            if cand_ids.len():
                cols = (*_STRUCT, "reduced_formula", "n_atoms")
                rows = lf.select(cols).filter(pl.col("candidate_id").is_in(cand_ids.implode())).collect()
                matched, _ = map_row_chunks(match_mp, rows, n_chunks=n_chunks, references=refs,
                                            settings=mp_settings)
                res.n_mp_pairs_compared = int(matched["pairs_compared"].sum())
                mp_hits = matched.filter(pl.col("mp_material_id").is_not_null()).select("candidate_id", "mp_material_id")
    res.n_mp_matches = mp_hits.height
    res.mp_matches_by_material = dict(mp_hits.group_by("mp_material_id").len().iter_rows())
    res.seconds_mp = time.perf_counter() - t2
    unique = unique.join(mp_hits, on="candidate_id", how="left").with_columns(
        pl.col("mp_material_id").is_not_null().alias("is_known_in_mp"))
    res.unique = unique.select("candidate_id", "n_folded", "is_known_in_mp", "mp_material_id")
    res.folded = folded
    return res


def _formula_elements(formula: str) -> list[str]:
    import re

    return re.findall(r"[A-Z][a-z]?", formula)


def apply_dedup(candidates: pl.DataFrame, unique: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``candidates`` that survive dedup, with ``n_folded``, ``is_known_in_mp``, ``mp_material_id``."""
    return candidates.join(unique, on="candidate_id", how="inner", maintain_order="left").cast(DEDUP_EXTRA_SCHEMA)  # type: ignore[arg-type]
