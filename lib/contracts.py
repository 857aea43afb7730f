"""Table contracts: one per table the platform writes, in one place, as data.

A :class:`Contract` says what a table means (one line), its columns (polars dtype, unit,
one-line description, whether nulls are allowed), its primary key (unique and non-null within a
store partition), its partition key (what one store partition holds) and whether columns beyond
the contract may appear. Everything else is generated from here:

* the store's write-time validation (:meth:`lib.store.TableStore.write` calls
  :meth:`Contract.validator`), so a frame that breaks its contract is refused before it is
  committed, with an error naming the table, the column and the reason;
* the ``<table>_matches_contract`` asset checks (``assets/_checks.py``);
* the table section of ``docs/architecture.md`` (``python -m lib.contracts --update-docs``;
  ``tests/test_contracts.py`` fails when the doc is out of date);
* the ``*_SCHEMA`` constants of the ``lib`` modules (``contracts.schema("phonons")``).

Conventions (the naming grammar of docs/architecture.md): columns are ``lower_snake_case`` with the
unit in the name; lists are Arrow list columns; "ASU" columns are parallel lists, one entry per
ASU site. This module imports only polars, so every ``lib`` module may import it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

__all__ = [
    "CONTRACTS", "Column", "Contract", "ContractViolation", "Violation", "conform", "contract_for", "empty",
    "get", "render_markdown", "schema",
]

# --------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Column:
    """One column of a contract."""

    name: str
    dtype: pl.DataType
    unit: str | None = None
    description: str = ""
    nullable: bool = True

    def like(self, *, description: str | None = None, unit: str | None = None,
             nullable: bool | None = None) -> Column:
        """The same column with a table-specific description / unit / nullability."""
        return Column(self.name, self.dtype, self.unit if unit is None else unit,
                      self.description if description is None else description,
                      self.nullable if nullable is None else nullable)


@dataclass(frozen=True)
class Violation:
    """One way a frame or a stored table breaks its contract."""

    table: str
    column: str | None
    reason: str
    partition: str | None = None

    def __str__(self) -> str:
        where = f"table {self.table!r}" + (f" partition {self.partition!r}" if self.partition else "")
        return f"{where}: " + (f"column {self.column!r}: " if self.column else "") + self.reason


class ContractViolation(ValueError):
    """A frame that does not match its table's contract (raised before anything is committed)."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        first = self.violations[0]
        self.table, self.column, self.reason = first.table, first.column, first.reason
        more = "".join(f"\n  - {v}" for v in self.violations[1:10])
        if len(self.violations) > 10:
            more += f"\n  - ... {len(self.violations) - 10} more"
        super().__init__(f"contract violated: {first}{more}")


@dataclass(frozen=True)
class Contract:
    """What one table holds (see the module docstring)."""

    table: str
    group: str  # the asset group of the asset that writes it
    meaning: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    partition_key: str | None = None  # what one store partition is; None = unpartitioned ("all")
    extra_columns_allowed: bool = False
    extra_columns_note: str = ""  # which extra columns, and why they are allowed
    asset: str = ""  # key of the asset that writes it; "" = the table name

    def __post_init__(self) -> None:
        if not self.asset:
            object.__setattr__(self, "asset", self.table)
        names = [c.name for c in self.columns]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"contract {self.table!r}: columns listed twice: {dup}")
        missing = [k for k in self.primary_key if k not in names]
        if missing:
            raise ValueError(f"contract {self.table!r}: key columns {missing} are not columns")
        if self.extra_columns_allowed and not self.extra_columns_note:
            raise ValueError(f"contract {self.table!r}: say which extra columns are allowed, and why")
        # key columns are never null
        object.__setattr__(self, "columns", tuple(
            c.like(nullable=False) if c.name in self.primary_key else c for c in self.columns))

    # ------------------------------------------------------------------------------ accessors
    @property
    def schema(self) -> dict[str, pl.DataType]:
        return {c.name: c.dtype for c in self.columns}

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def non_null_columns(self) -> list[str]:
        return [c.name for c in self.columns if not c.nullable]

    def empty(self) -> pl.DataFrame:
        """A frame with no rows and exactly the contract's columns."""
        return pl.DataFrame(schema=self.schema)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.table!r} has no column {name!r} in its contract")

    # ---------------------------------------------------------------------------- validation
    def schema_violations(self, actual: Mapping[str, pl.DataType], *,
                          partition: str | None = None) -> list[Violation]:
        """Missing columns, wrong dtypes and (unless allowed) extra columns."""
        out = []
        for c in self.columns:
            if c.name not in actual:
                out.append(Violation(self.table, c.name, f"missing (contract: {_dtype_str(c.dtype)})", partition))
            elif actual[c.name] != c.dtype:
                out.append(Violation(self.table, c.name, f"dtype {_dtype_str(actual[c.name])}, contract says "
                                     f"{_dtype_str(c.dtype)}", partition))
        if not self.extra_columns_allowed:
            known = set(self.column_names)
            out.extend(Violation(self.table, n, "not in the contract (extra columns are not allowed)", partition)
                       for n in actual if n not in known)
        return out

    def null_violations(self, frame: pl.DataFrame, *, partition: str | None = None) -> list[Violation]:
        """Nulls in key or other non-null columns (columns absent from ``frame`` are skipped)."""
        cols = [c for c in self.non_null_columns if c in frame.columns]
        if not cols or frame.height == 0:
            return []
        counts = frame.select(pl.col(cols).null_count()).row(0, named=True)
        return [Violation(self.table, c, f"{n} null value(s); the contract allows none"
                          + (" (primary key)" if c in self.primary_key else ""), partition)
                for c, n in counts.items() if n]

    def key_violations(self, keys: pl.DataFrame, *, partition: str | None = None) -> list[Violation]:
        """Duplicated primary keys in ``keys`` (a frame holding at least the key columns)."""
        if not self.primary_key or keys.height == 0 or any(k not in keys.columns for k in self.primary_key):
            return []
        k = keys.select(self.primary_key)
        extra = k.height - k.unique().height
        if not extra:
            return []
        example = k.filter(k.is_duplicated()).head(3).rows()
        return [Violation(self.table, ", ".join(self.primary_key),
                          f"primary key duplicated: {extra} extra row(s), e.g. {example}", partition)]

    def violations(self, frame: pl.DataFrame, *, partition: str | None = None) -> list[Violation]:
        """Every violation of ``frame`` (one store partition's rows)."""
        return [*self.schema_violations(frame.schema, partition=partition),
                *self.null_violations(frame, partition=partition),
                *self.key_violations(frame, partition=partition)]

    def validate(self, frame: pl.DataFrame, *, partition: str | None = None) -> None:
        """Raise :class:`ContractViolation` when ``frame`` breaks the contract."""
        found = self.violations(frame, partition=partition)
        if found:
            raise ContractViolation(found)

    def validator(self, partition: str | None = None) -> StreamValidator:
        """Validation of a frame that arrives in chunks (keys are checked across chunks)."""
        return StreamValidator(self, partition)


@dataclass
class StreamValidator:
    """Checks each chunk's schema and nulls as it comes, and the keys over all chunks at the end."""

    contract: Contract
    partition: str | None = None
    _keys: list[pl.DataFrame] = field(default_factory=list)

    def check(self, chunk: pl.DataFrame) -> None:
        c = self.contract
        found = [*c.schema_violations(chunk.schema, partition=self.partition),
                 *c.null_violations(chunk, partition=self.partition)]
        if found:
            raise ContractViolation(found)
        if c.primary_key and chunk.height:
            self._keys.append(chunk.select(c.primary_key))

    def finish(self) -> None:
        if not self._keys:
            return
        keys = pl.concat(self._keys)
        self._keys = []
        found = self.contract.key_violations(keys, partition=self.partition)
        if found:
            raise ContractViolation(found)


def _dtype_str(dtype: pl.DataType) -> str:
    return str(dtype).replace("String", "str").replace("Float64", "f64").replace("Float32", "f32") \
        .replace("Int64", "i64").replace("Int32", "i32").replace("Boolean", "bool")


# ------------------------------------------------------------------------------ shared columns
_S, _I64, _F64, _F32, _B = pl.String(), pl.Int64(), pl.Float64(), pl.Float32(), pl.Boolean()
_LS, _LI, _LF = pl.List(pl.String()), pl.List(pl.Int64()), pl.List(pl.Float64())
_LLF = pl.List(pl.List(pl.Float64()))

#: Columns that mean the same in every table that has them (a table may refine the description).
_SHARED: dict[str, Column] = {c.name: c for c in (
    Column("material_id", _S, None, "Materials Project id (or the source's own id)"),
    Column("formula", _S, None, "formula of the cell, e.g. Ba2Ru2O6"),
    Column("reduced_formula", _S, None, "reduced formula, e.g. BaRuO3"),
    Column("chemical_system", _S, None, "elements sorted and joined by '-', e.g. Ba-O-Ru"),
    Column("snapshot_id", _S, None, "snap-<hash>: the MP source snapshot the row comes from"),
    Column("source", _S, None, "where the row comes from, e.g. file:mp_structures.csv.gz"),
    Column("spacegroup_number", _I64, None, "international space-group number (1-230)"),
    Column("crystal_system", _S, None, "triclinic, monoclinic, ..., cubic"),
    Column("a_a", _F64, "Å", "lattice length a"),
    Column("b_a", _F64, "Å", "lattice length b"),
    Column("c_a", _F64, "Å", "lattice length c"),
    Column("alpha_deg", _F64, "deg", "lattice angle alpha"),
    Column("beta_deg", _F64, "deg", "lattice angle beta"),
    Column("gamma_deg", _F64, "deg", "lattice angle gamma"),
    Column("volume_a3", _F64, "Å³", "cell volume"),
    Column("n_atoms", _I64, None, "atoms in the cell"),
    Column("lattice_matrix", _LF, "Å", "cell vectors, 9 floats, row vectors"),
    Column("species", _LS, None, "element of each site"),
    Column("frac_coords", _LLF, None, "fractional coordinates of each site"),
    Column("wyckoff_letters", _LS, None, "Wyckoff letter of each ASU site"),
    Column("multiplicities", _LI, None, "multiplicity of each ASU site's Wyckoff position"),
    Column("asu_frac_coords", _LLF, None, "representative fractional coordinates of each ASU site's orbit"),
    Column("wyckoff_sequence", _S, None, "space group and letters, e.g. '221 a b c'"),
    Column("candidate_id", _S, None, "cand-<hash>: the candidate (template x element assignment)"),
    Column("template_id", _S, None, "tpl-<hash>: the generated template"),
    Column("checkpoint_id", _S, None, "ckpt-<hash>: the generator checkpoint"),
    Column("surrogate_name", _S, None, "registry name of the surrogate, e.g. CHGNet-0.3.0"),
    Column("surrogate_sha256", _S, None, "sha256 of the surrogate's weights"),
    Column("code_version", _S, None, "version of the code that computed the row (part of every batch id)"),
    Column("batch_id", _S, None, "the resumable batch that computed the row"),
    Column("status", _S, None, "ok | error", nullable=False),
    Column("error", _S, None, "why the row failed (null when ok)"),
    Column("energy_ev", _F64, "eV", "surrogate energy of the cell"),
    Column("energy_per_atom_ev", _F64, "eV/atom", "surrogate energy per atom"),
    Column("formation_energy_per_atom_ev", _F64, "eV/atom", "formation energy"),
    Column("e_above_hull_ev_per_atom", _F64, "eV/atom", "energy above the convex hull"),
    Column("min_frequency_thz", _F64, "THz", "lowest phonon frequency (imaginary modes are negative)"),
    Column("is_dynamically_stable", _B, None, "surrogate phonon verdict: min_frequency_thz > threshold_thz"),
    Column("n_supercell_atoms", _I64, None, "atoms in the phonon supercell"),
    Column("n_displacements", _I64, None, "phonopy finite displacements"),
    Column("supercell_matrix", _LI, None, "phonon supercell matrix (diagonal, or 9 ints row-major)"),
    Column("files", _LS, None, "files of the run folder"),
    Column("asu_letters", _LS, None, "Wyckoff letter of each ASU site"),
    Column("asu_species", _LS, None, "element of each ASU site"),
    Column("fingerprint", _S, None, "hash of the sorted site descriptors: exact duplicates share it",
           nullable=False),
    Column("reason", _S, None, "why the row was rejected", nullable=False),
    Column("detail", _S, None, "the rejected value or the error message"),
    Column("encoding_version", _S, None, "version of the GAN's template encoding"),
    Column("surrogate_a", _S, None, "first surrogate of the pair (registry name)"),
    Column("surrogate_b", _S, None, "second surrogate of the pair (registry name)"),
    Column("pattern_id", _S, None, "<source table>:<row id> of the crystal the pattern belongs to"),
)}


def _cols(*items: str | Column) -> tuple[Column, ...]:
    """Columns by shared name or given in place (a ``Column`` overrides the shared one)."""
    out = []
    for it in items:
        if isinstance(it, Column):
            out.append(it)
        elif it in _SHARED:
            out.append(_SHARED[it])
        else:
            raise KeyError(f"column {it!r} is not a shared column: give it as Column(...)")
    return tuple(out)


_LATTICE = ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg")
_CELL = ("lattice_matrix", "species", "frac_coords")
#: The lineage columns every screening row starts with.
LINEAGE = ("candidate_id", "template_id", "checkpoint_id", "surrogate_name", "surrogate_sha256", "code_version")

#: Columns of a candidate (``candidates``; also the first columns of ``candidates_dedup``).
_CANDIDATE = _cols(
    "candidate_id", "template_id", "checkpoint_id", "chemical_system", "formula", "reduced_formula",
    _SHARED["n_atoms"].like(description="atoms in the conventional cell"), "spacegroup_number",
    Column("wyckoff_species_sequence", _S, None, "element and Wyckoff position of each ASU site, e.g. 'Ba:1a Ru:1b O:3c'"),
    *_LATTICE, "volume_a3",
    Column("volume_mode", _S, None, "template (the template's cell) | rescaled (volume scaled to the elements)"),
    "asu_species", "asu_letters", "asu_frac_coords", "fingerprint",
)

#: Output of one surrogate relaxation (``relaxed`` and the reference phases of ``reference_energies``).
_RELAX = _cols(
    _SHARED["n_atoms"].like(description="atoms in the relaxed cell"),
    Column("is_converged", _B, None, "the optimiser reached fmax within its steps"),
    Column("n_steps", _I64, None, "optimiser steps taken"),
    "energy_ev", "energy_per_atom_ev",
    _SHARED["lattice_matrix"].like(description="relaxed cell vectors, 9 floats, row vectors"),
    _SHARED["species"], _SHARED["frac_coords"].like(description="relaxed fractional coordinates of each site"),
    *_LATTICE, "volume_a3",
    Column("spacegroup_number_relaxed", _I64, None, "space group of the relaxed cell (spglib)"),
    Column("relax_seconds", _F64, "s", "wall time of the relaxation"),
)

#: Output of one phonon screen (``lib.phonons``), after the lineage columns.
_PHONON = _cols(
    _SHARED["n_atoms"].like(description="atoms in the relaxed cell"),
    Column("n_primitive_atoms", _I64, None, "atoms in the symmetrised primitive cell"),
    Column("phonon_spacegroup_number", _I64, None, "space group of the symmetrised primitive cell"),
    Column("symprec", _F64, "Å", "symmetrisation tolerance (null: none)"),
    "supercell_matrix", "n_supercell_atoms", "n_displacements", "min_frequency_thz",
    Column("min_frequency_qpoint", _LF, None, "q-point of the lowest frequency (reduced coordinates)"),
    Column("min_mesh_frequency_thz", _F64, "THz", "lowest frequency on the Γ-centred mesh"),
    Column("min_band_frequency_thz", _F64, "THz", "lowest frequency along the band path"),
    "is_dynamically_stable",
    Column("threshold_thz", _F64, "THz", "stability threshold (paper: -0.5)"),
    Column("band_distances", pl.List(pl.Float32()), "1/Å", "distance along the band path of each point"),
    Column("band_frequencies_thz", pl.List(pl.List(pl.Float32())), "THz", "frequencies of each band-path point"),
    Column("band_labels", _LS, None, "labels of the band path's special points"),
    Column("band_label_distances", _LF, "1/Å", "distance along the band path of each label"),
    Column("phonon_seconds", _F64, "s", "wall time of the screen"),
    _SHARED["status"].like(description="ok | error | skipped (supercell above max_supercell_atoms)"),
    "error",
)

#: Columns of ``dft_results`` (one row per ingested run-folder version).
_DFT_RESULT = _cols(
    Column("result_id", _S, None, "dftres-<hash of the folder name and its files>"),
    Column("run_name", _S, None, "folder name under the results root"),
    Column("run_path", _S, None, "absolute path of the folder at ingest time"),
    Column("content_sha256", _S, None, "sha256 of the folder's files"),
    _SHARED["status"].like(description="ok | unlinked | unconverged | failed | refused"),
    Column("reason", _S, None, "why the row is not ok ('' when ok)"),
    Column("is_linked", _B, None, "cgwgan_run.json names a candidate"),
    "candidate_id", "template_id", "checkpoint_id", "chemical_system",
    Column("input_run_id", _S, None, "dft_inputs.run_id of the hand-off"),
    Column("shortlist_surrogates", _LS, None, "surrogates that shortlisted the candidate (hand-off record)"),
    "formula", "reduced_formula", "n_atoms",
    Column("dft_code", _S, None, "code that made the energies: vasp | gpaw"),
    Column("dft_preset", _S, None, "GPAW preset name, or the VASP input set of the hand-off"),
    Column("dft_preset_sha256", _S, None, "sha256 of the GPAW preset's settings (null for VASP)"),
    Column("has_vasprun", _B, None, "vasprun.xml was found and read"),
    Column("final_energy_ev", _F64, "eV", "VASP final energy of the cell, sigma -> 0 (Vasprun.final_energy)"),
    _SHARED["energy_per_atom_ev"].like(description="VASP final energy per atom"),
    Column("is_converged_electronic", _B, None, "VASP electronic convergence"),
    Column("is_converged_ionic", _B, None, "VASP ionic convergence"),
    Column("n_ionic_steps", _I64, None, "ionic steps of the VASP run"),
    Column("incar_ibrion", _I64, None, "INCAR IBRION"),
    Column("incar_nsw", _I64, None, "INCAR NSW"),
    Column("incar_encut_ev", _F64, "eV", "INCAR ENCUT"),
    _SHARED["volume_a3"].like(description="volume of the final cell"),
    _SHARED["lattice_matrix"].like(description="final cell vectors, 9 floats, row vectors"),
    _SHARED["species"], _SHARED["frac_coords"].like(description="final fractional coordinates of each site"),
    Column("outcar_energy_ev", _F64, "eV", "OUTCAR energy(sigma->0) of the last step"),
    Column("elapsed_time_s", _F64, "s", "VASP elapsed time"),
    _SHARED["formation_energy_per_atom_ev"].like(description="DFT formation energy, (E - sum n_i E_i) / N"),
    Column("reference_source", _S, None, "elemental reference file"),
    Column("reference_sha256", _S, None, "sha256 of the elemental reference file"),
    Column("reference_entry_ids", _LS, None, "entry ids of the elemental references used"),
    Column("phonon_source", _S, None,
           "force_sets | displacement_vaspruns | phonopy_params | force_constants | dfpt_vasprun"),
    Column("q_mesh", _LI, None, "phonon q-point mesh"),
    _SHARED["min_frequency_thz"].like(description="lowest DFT phonon frequency on the mesh"),
    Column("max_frequency_thz", _F64, "THz", "highest DFT phonon frequency on the mesh"),
    Column("n_imaginary_modes", _I64, None, "modes on the mesh below -imaginary_tol_thz"),
    Column("imaginary_tol_thz", _F64, "THz", "tolerance of the imaginary-mode count"),
    Column("is_phonon_stable", _B, None, "no imaginary mode (null: no phonon data)"),
    Column("has_nac", _B, None, "non-analytical correction applied (BORN file)"),
    "files",
    Column("ingested_at", _S, None, "UTC time of the ingest (ISO 8601)"),
    "code_version",
)

#: Columns ``lib.verdicts.hull_verdicts`` / ``lib.novelty.match_known_phases`` add to a discovery row.
_VERDICT = _cols(
    Column("energy_footing", _S, None, "energy footing of the hull: MP2020, or <dft_code>:<preset sha256>"),
    Column("compatibility", _S, None, "correction applied to the raw energy (MaterialsProject2020Compatibility | none)"),
    Column("energy_correction_ev_per_atom", _F64, "eV/atom", "that correction"),
    Column("corrected_energy_per_atom_ev", _F64, "eV/atom", "energy per atom on the footing"),
    Column("formation_energy_dft_ev_per_atom", _F64, "eV/atom", "formation energy against the hull's elements"),
    Column("e_above_hull_dft_ev_per_atom", _F64, "eV/atom", "energy above the DFT hull of the competing phases"),
    Column("decomposition_dft", _S, None, "hull phases it decomposes into (fraction, phase id, formula)"),
    Column("missing_references", _LS, None, "competing phases that are missing (elements / compounds)"),
    Column("n_competing_phases", _I64, None, "competing phases of the footing available to the hull"),
    Column("is_on_or_below_hull", _B, None, "e_above_hull_dft_ev_per_atom <= the threshold"),
    _SHARED["is_dynamically_stable"].like(description="DFT phonon verdict: min_frequency_thz > the threshold"),
    Column("known_material_id", _S, None, "known structure the DFT-relaxed cell matches (null: none)"),
    Column("known_source", _S, None, "where that known structure comes from (mp, dft_results)"),
    Column("is_novel", _B, None, "no known structure matches (null: not compared)"),
    Column("verdict", _S, None, "discovery | rediscovery | above_hull | unstable | no_phonons | novelty_unchecked | "
           "missing_references | footing_mismatch | not_evaluated"),
    Column("verdict_reason", _S, None, "every failed criterion with its numbers"),
    Column("is_discovery", _B, None, "verdict == 'discovery'"),
)

#: Columns of ``dft_runs`` (one row per GPAW run folder planned).
_DFT_RUN = _cols(
    Column("run_name", _S, None, "folder name under the results root: gpaw-<preset>-[phase-]<id>"),
    Column("run_dir", _S, None, "absolute path of the folder"),
    Column("kind", _S, None, "candidate | competing_phase", nullable=False),
    _SHARED["chemical_system"].like(description="the system whose verification needs the run"),
    _SHARED["candidate_id"].like(description="the candidate (null for a competing phase)"),
    _SHARED["material_id"].like(description="the MP structure of a competing phase (null for a candidate)"),
    "template_id", "checkpoint_id",
    Column("surrogates", _LS, None, "surrogates that shortlisted the candidate"),
    Column("best_rank", _I64, None, "the candidate's best (unique) rank among them"),
    "formula", "reduced_formula", "n_atoms",
    Column("dft_preset", _S, None, "GPAW preset name"),
    Column("dft_preset_sha256", _S, None, "sha256 of the preset's settings"),
    Column("phonon_planned", _B, None, "the run computes GPAW phonons after the relaxation"),
    Column("action", _S, None, "written | kept (same inputs, results kept) | replaced | skipped"),
    Column("state_before", _S, None, "folder state before this materialisation"),
    _SHARED["status"].like(description="pending | running | partial | ok | failed | skipped (after the run)"),
    Column("was_computed", _B, None, "GPAW ran for it in this materialisation"),
    Column("redone_after_partial", _B, None, "a killed or partial run was cleaned and redone"),
    Column("seconds", _F64, "s", "wall time spent on the folder in this materialisation"),
    Column("gpaw_wall_time_s", _F64, "s", "GPAW's own wall time of the relax + static stage"),
    Column("final_energy_ev", _F64, "eV", "GPAW energy of the relaxed cell (sigma -> 0)"),
    _SHARED["energy_per_atom_ev"].like(description="GPAW energy per atom of the relaxed cell"),
    Column("reason", _S, None, "why skipped or failed ('' otherwise)"),
    "code_version",
)

#: Columns of ``surrogate_accuracy``.
_SURROGATE_ACCURACY = _cols(
    _SHARED["chemical_system"].like(description="the system, or 'all'"),
    "surrogate_name", "surrogate_sha256",
    Column("energy_footing", _S, None, "footing of the DFT hull (e.g. gpaw:<preset sha256>)"),
    Column("n_candidates", _I64, None, "candidates with both a DFT and a surrogate energy above the hull"),
    Column("mae_ev_per_atom", _F64, "eV/atom", "mean |surrogate - DFT| energy above the hull"),
    Column("mean_error_ev_per_atom", _F64, "eV/atom", "mean (surrogate - DFT) energy above the hull"),
    Column("hull_threshold_ev_per_atom", _F64, "eV/atom", "on the hull: energy above it <= this"),
    Column("n_sign_agree", _I64, None, "candidates both put on the same side of the hull"),
    Column("sign_agreement", _F64, None, "n_sign_agree / n_candidates"),
    Column("spearman_rho", _F64, None, "Spearman rank correlation (null: fewer than 2 candidates or no spread)"),
    Column("candidate_ids", _LS, None, "the candidates, by DFT energy above the hull"),
    Column("surrogate_e_above_hull_ev_per_atom", _LF, "eV/atom", "their surrogate energies above the hull"),
    Column("dft_e_above_hull_ev_per_atom", _LF, "eV/atom", "their DFT energies above the hull"),
)

#: Columns ``lib.lineage.attach_lineage`` adds to a discovery.
_LINEAGE_DETAIL = _cols(
    Column("candidate_formula", _S, None, "formula of the candidate"),
    Column("candidate_spacegroup_number", _I64, None, "space group of the candidate"),
    Column("wyckoff_species_sequence", _S, None, "element and Wyckoff position of each ASU site of the candidate"),
    Column("template_spacegroup_number", _I64, None, "space group of the template"),
    Column("template_wyckoff_sequence", _S, None, "Wyckoff sequence of the template"),
    Column("checkpoint_path", _S, None, "folder of the generator checkpoint"),
    Column("checkpoint_created_at", _S, None, "when the checkpoint was trained (UTC, ISO 8601)"),
    Column("training_snapshot_id", _S, None, "MP snapshot the generator was trained on"),
    Column("mp_source", _S, None, "MP source of that snapshot"),
    Column("mp_n_structures", _I64, None, "structures in that snapshot"),
    Column("ranked_by_surrogates", _LS, None, "surrogates that shortlisted the candidate"),
    Column("ranked_by_surrogate_sha256s", _LS, None, "their weights' sha256s"),
    Column("surrogate_ranks", _LI, None, "the candidate's rank in each of their shortlists"),
    Column("surrogate_e_above_hull_ev_per_atom", _LF, "eV/atom", "energy above the hull under each surrogate"),
)

_SCREENING = "chemical_system|surrogate"

# ----------------------------------------------------------------------------------- contracts
_ALL: tuple[Contract, ...] = (
    # ------------------------------------------------------------------------------- group mp
    Contract(
        "mp_structures", "mp", "Validated Materials Project structures of one source snapshot.",
        _cols("material_id", "formula", "reduced_formula", "chemical_system",
              Column("elements", _LS, None, "elements of the structure, sorted"),
              Column("nsites", _I64, None, "sites in the cell"), *_CELL,
              _SHARED["formation_energy_per_atom_ev"].like(description="MP formation energy"),
              _SHARED["e_above_hull_ev_per_atom"].like(description="MP energy above the hull"),
              Column("band_gap_ev", _F64, "eV", "MP band gap"), "source", "snapshot_id"),
        primary_key=("material_id",)),
    Contract(
        "mp_structures_rejects", "mp", "Input rows of the MP source that were not loaded, with the reason.",
        _cols(Column("source_ref", _S, None, "file:row (or folder/file, mp-api:id) of the input row"),
              "material_id",
              _SHARED["reason"].like(description="malformed_cif | malformed_structure | partial_occupancy | "
                                     "unknown_element | duplicate_material_id | empty_input | missing_material_id"),
              "detail", "snapshot_id"),
        primary_key=("source_ref",)),
    Contract(
        "mp_symmetry", "mp", "Space group, conventional cell and Wyckoff ASU of every MP structure, with a "
        "round-trip check.",
        _cols("material_id", "spacegroup_number", "crystal_system",
              Column("symprec", _F64, "Å", "spglib tolerance of the analysis"), *_LATTICE,
              _SHARED["n_atoms"].like(description="atoms in the conventional cell"),
              Column("n_asu_sites", _I64, None, "sites of the asymmetric unit"),
              "wyckoff_letters", "multiplicities",
              Column("asu_elements", _LS, None, "element of each ASU site"), "asu_frac_coords", "wyckoff_sequence",
              Column("is_round_trip_ok", _B, None, "the ASU expands back to the structure (null: not checked)"),
              Column("round_trip_error", _S, None, "why the round trip failed"), "snapshot_id"),
        primary_key=("material_id",)),
    Contract(
        "training_templates", "mp", "The GAN's training table: MP templates with 1-4 ASU sites above P1, encoded.",
        _cols("material_id", "spacegroup_number", "crystal_system", *_LATTICE,
              _SHARED["n_atoms"].like(description="atoms in the conventional cell"),
              Column("n_asu_sites", _I64, None, "sites of the asymmetric unit"), "wyckoff_letters", "multiplicities",
              Column("asu_elements", _LS, None, "element of each ASU site"), "asu_frac_coords", "wyckoff_sequence",
              "chemical_system", "snapshot_id",
              Column("encoding", pl.List(pl.Float32()), None, "the template as the GAN's vector, values in [-1, 1]"),
              "encoding_version"),
        primary_key=("material_id",)),
    # ------------------------------------------------------------------------ group generator
    Contract(
        "wgan_checkpoints", "generator", "One row per trained Wyckoff WGAN-GP checkpoint.",
        _cols("checkpoint_id", Column("path", _S, None, "checkpoint folder (model.json, state.pt, encoding.json)"),
              "encoding_version",
              Column("training_snapshot_id", _S, None, "MP snapshot(s) of the training rows"),
              Column("seed", _I64, None, "training seed"), Column("epochs", _I64, None, "training epochs"),
              Column("n_training_rows", _I64, None, "training rows used"),
              Column("device", _S, None, "cpu | cuda"),
              Column("wall_time_s", _F64, "s", "training wall time"),
              Column("parent_checkpoint_id", _S, None, "checkpoint training resumed from (null: from scratch)"),
              Column("created_at", _S, None, "UTC time of the checkpoint (ISO 8601)"),
              Column("hyperparameters", _S, None, "GanConfig as JSON"),
              Column("training_key", _S, None, "content hash of the training rows and settings: a "
                     "materialisation with the same key reuses this checkpoint instead of training"),
              Column("reused_at", _S, None, "UTC time the checkpoint was last reused (null: never); "
                     "the newest of created_at / reused_at picks the templates' checkpoint")),
        primary_key=("checkpoint_id",), asset="wgan_checkpoint",
        extra_columns_allowed=True,
        extra_columns_note="rows accumulate across runs, so columns of checkpoints written by older "
                           "versions of the asset are kept"),
    Contract(
        "templates", "generator", "Crystal templates sampled from the WGAN, symmetric by construction, filtered "
        "and deduplicated.",
        _cols("template_id", "checkpoint_id", "spacegroup_number", "crystal_system",
              Column("n_sites", _I64, None, "ASU sites"), "wyckoff_letters", "multiplicities", "asu_frac_coords",
              *_LATTICE, "volume_a3",
              _SHARED["n_atoms"].like(description="atoms in the conventional cell"),
              Column("number_density_per_a3", _F64, "1/Å³", "atoms per volume"),
              Column("min_distance_a", _F64, "Å", "shortest interatomic distance"), "wyckoff_sequence"),
        primary_key=("template_id",), partition_key="generation_id"),
    # --------------------------------------------------------------------------- group infill
    Contract(
        "candidates", "infill", "Templates filled with the elements of a chemical system: one row per distinct "
        "assignment (rebuild with lib.wyckoff.asu_to_structure).",
        _CANDIDATE, primary_key=("candidate_id",), partition_key="chemical_system"),
    Contract(
        "candidates_template_rejects", "infill", "Templates the infill of a chemical system could not use, "
        "with the reason.",
        _cols("template_id", "reason", "detail"),
        primary_key=("template_id",), partition_key="chemical_system"),
    Contract(
        "candidates_dedup", "infill", "One row per unique candidate (fingerprint, then StructureMatcher), with "
        "the candidates it folds and the MP material it matches.",
        (*_CANDIDATE, *_cols(
            Column("n_folded", _I64, None, "candidates folded into this one (exact and matcher duplicates)"),
            Column("is_known_in_mp", _B, None, "matches a structure of mp_structures (or the MP reference file)"),
            Column("mp_material_id", _S, None, "the MP material it matches (null: none)"))),
        primary_key=("candidate_id",), partition_key="chemical_system"),
    # ------------------------------------------------------------------------ group screening
    Contract(
        "surrogate_models", "screening", "The surrogate registry as a table: one row per registered surrogate.",
        _cols("surrogate_name", Column("surrogate_id", _S, None, "sur-<hash of the weights> (null: no weights)"),
              Column("kind", _S, None, "model family: m3gnet | chgnet | ..."),
              Column("location", _S, None, "weights folder or file (null: not available here)"),
              "surrogate_sha256", Column("version", _S, None, "model version"),
              Column("convention", _S, None, "message-passing convention the weights need"),
              Column("description", _S, None, "what the surrogate is")),
        primary_key=("surrogate_name",)),
    Contract(
        "prescreen", "screening", "Static surrogate energy of every deduplicated candidate.",
        _cols(*LINEAGE, "n_atoms", "energy_ev", "energy_per_atom_ev",
              Column("volume_scale", _F64, None, "linear factor the cell was scaled by (isotropically) for its "
                     "static energy: the volume scan's lowest (1.0: no scan; null: error); the relaxation "
                     "starts from that cell"),
              "status", "error", "batch_id",
              "formula", "reduced_formula", "spacegroup_number",
              Column("is_known_in_mp", _B, None, "the candidate matches an MP structure")),
        primary_key=("candidate_id",), partition_key=_SCREENING),
    Contract(
        "relaxed", "screening", "The best K candidates by static energy above the surrogate's own hull (or "
        "formation energy: rank_by), relaxed (cell and positions) with the surrogate, with the relaxed cell's "
        "formation energy and energy above that hull.",
        _cols(*LINEAGE, *_RELAX, "status", "error", "batch_id", "formula", "reduced_formula",
              _SHARED["spacegroup_number"].like(description="space group of the candidate before relaxation"),
              Column("prescreen_energy_per_atom_ev", _F64, "eV/atom", "pre-screen (unrelaxed) energy per atom"),
              Column("static_formation_energy_per_atom_ev", _F64, "eV/atom",
                     "formation energy of the pre-screen (unrelaxed) energy"),
              Column("static_e_above_hull_ev_per_atom", _F64, "eV/atom",
                     "pre-screen (unrelaxed) energy above the hull of the references relaxed with the surrogate"),
              Column("selection_rank", _I64, None, "1..K: the candidate's place in the selection for relaxation"),
              _SHARED["formation_energy_per_atom_ev"].like(description="formation energy of the relaxed cell "
                                                           "(null: relaxation or hull failed)"),
              _SHARED["e_above_hull_ev_per_atom"].like(description="relaxed energy above the hull of the references "
                                                       "relaxed with the same surrogate (null: failed)"),
              Column("decomposition", _S, None, "hull phases the relaxed candidate decomposes into")),
        primary_key=("candidate_id",), partition_key=_SCREENING),
    Contract(
        "reference_energies", "screening", "Competing phases relaxed with the surrogate and the hull: formation "
        "energy and energy above the hull of every reference phase (computed before the candidates are "
        "selected for relaxation; the candidates' own hull values are columns of relaxed).",
        _cols(*[_SHARED[c].like(description=_SHARED[c].description + " (null: a reference phase)")
                if c in ("candidate_id", "template_id", "checkpoint_id") else c for c in LINEAGE],
              Column("kind", _S, None, "reference (every row)"),
              Column("phase_id", _S, None, "the reference phase (MP id or ASE state)"),
              "formula", _SHARED["source"].like(description="the phase's MP source (e.g. file:mp_structures.csv.gz) "
                                                "or ase.data.reference_states"),
              *_RELAX, _SHARED["status"].like(nullable=True), "error", "formation_energy_per_atom_ev",
              "e_above_hull_ev_per_atom",
              Column("is_elemental", _B, None, "a one-element reference phase")),
        primary_key=("kind", "phase_id"), partition_key=_SCREENING),
    Contract(
        "phonons", "screening", "Phonopy finite-displacement screen (surrogate forces) of the best N candidates.",
        (*_cols(*LINEAGE), *_PHONON, *_cols("batch_id", "formula")),
        primary_key=("candidate_id",), partition_key=_SCREENING),
    Contract(
        "shortlist", "screening", "Relaxed candidates ranked by energy above the hull, then formation energy, "
        "with the phonon verdict, the known phase each relaxed cell matches (is_novel) and its oxidation-state "
        "charge balance; relaxed duplicates and known phases marked, never dropped.",
        _cols(Column("rank", _I64, None, "1, 2, ... in order of e_above_hull, formation energy, candidate_id"),
              *LINEAGE, "formula", "reduced_formula", "n_atoms",
              _SHARED["spacegroup_number"].like(description="space group of the candidate before relaxation"),
              Column("spacegroup_number_relaxed", _I64, None, "space group of the relaxed cell"),
              "energy_per_atom_ev", "formation_energy_per_atom_ev", "e_above_hull_ev_per_atom",
              Column("decomposition", _S, None, "hull phases the candidate decomposes into"),
              Column("is_converged", _B, None, "the relaxation converged"),
              _SHARED["min_frequency_thz"].like(description="lowest surrogate phonon frequency (null: not screened)"),
              _SHARED["is_dynamically_stable"].like(description="surrogate phonon verdict (null: not screened)"),
              *_LATTICE, "volume_a3",
              Column("has_phonons", _B, None, "the candidate has a phonon verdict"),
              Column("duplicate_of", _S, None, "better-ranked candidate it relaxed into (null: unique)"),
              Column("unique_rank", _I64, None, "rank among the unique rows (null on duplicates)"),
              Column("known_material_id", _S, None, "the known phase the relaxed cell matches (StructureMatcher; "
                     "null: none)"),
              Column("known_source", _S, None, "where that known phase comes from: mp (as stored) | references "
                     "(as relaxed by the surrogate) | dft_results"),
              Column("is_novel", _B, None, "no known phase matches the relaxed cell (null: not compared)"),
              Column("charge_balanced", _B, None, "some assignment of ICSD-observed oxidation states is neutral"),
              Column("oxidation_states", _S, None, "most probable oxidation-state guess, e.g. 'Ba:+2,Ru:+4,O:-2' "
                     "(null: none balances)"),
              Column("oxidation_state_basis", _S, None, "icsd | all: the list of states the guess comes from"),
              Column("uses_rare_oxidation_state", _B, None, "the guess uses a state outside the ICSD-observed ones"),
              Column("rare_oxidation_states", _S, None, "those elements and states, e.g. 'Ru:+8' (null: none)"),
              Column("max_oxidation_state", _F64, None, "highest oxidation state in the guess")),
        primary_key=("candidate_id",), partition_key=_SCREENING),
    Contract(
        "consensus", "screening", "The best K unique novel shortlist rows of one surrogate (the primary: the "
        "partition's) re-evaluated by every registered surrogate: one row per candidate and evaluated surrogate, "
        "relaxed from the primary's relaxed cell and placed on that surrogate's own hull (references relaxed by "
        "the same surrogate), with the per-candidate mean, spread and lower-confidence-bound of the energy above "
        "the hull.",
        _cols(*[_SHARED[c].like(description=_SHARED[c].description + " (the primary)")
                if c in ("surrogate_name", "surrogate_sha256") else c for c in LINEAGE],
              Column("evaluated_surrogate", _S, None, "registry name of the surrogate that evaluated the row"),
              Column("evaluated_surrogate_sha256", _S, None, "sha256 of its weights (null: it could not be loaded)"),
              Column("consensus_rank", _I64, None, "1, 2, ... by rank_by (mean, lcb or the primary's order)"),
              Column("primary_rank", _I64, None, "the candidate's rank in the primary's shortlist"),
              "formula", "reduced_formula",
              Column("formation_energy_per_atom_ev", _F64, "eV/atom", "formation energy under the evaluated "
                     "surrogate"),
              Column("e_above_hull_ev_per_atom", _F64, "eV/atom", "energy above the evaluated surrogate's own hull"),
              _SHARED["status"].like(description="ok | error (the surrogate could not load, cover or relax the row)"),
              "error",
              Column("is_converged", _B, None, "the evaluated surrogate's relaxation converged"),
              Column("n_steps", _I64, None, "optimiser steps taken"),
              _SHARED["energy_per_atom_ev"].like(description="the evaluated surrogate's relaxed energy per atom"),
              Column("spacegroup_number_relaxed", _I64, None, "space group of the cell the evaluated surrogate relaxed"),
              Column("primary_e_above_hull_ev_per_atom", _F64, "eV/atom", "the primary's energy above its hull"),
              Column("n_surrogates_ok", _I64, None, "surrogates that evaluated the candidate"),
              Column("e_above_hull_mean_ev_per_atom", _F64, "eV/atom", "mean over those surrogates"),
              Column("e_above_hull_spread_ev_per_atom", _F64, "eV/atom", "max - min over those surrogates"),
              Column("e_above_hull_std_ev_per_atom", _F64, "eV/atom", "standard deviation over those surrogates"),
              Column("e_above_hull_lcb_ev_per_atom", _F64, "eV/atom",
                     "mean + kappa * std: the lower confidence bound of the stability (-e_above_hull)")),
        primary_key=("candidate_id", "evaluated_surrogate"), partition_key=_SCREENING),
    # ------------------------------------------------------------------------------- group dft
    Contract(
        "dft_inputs", "dft", "Manifest of the VASP + phonopy run folders handed off: one row per shortlisted "
        "candidate.",
        _cols(Column("run_id", _S, None, "dft-<hash of candidate, structure, settings>"),
              Column("run_name", _S, None, "folder name (the candidate id)"),
              Column("run_dir", _S, None, "absolute path of the folder"),
              _SHARED["status"].like(description="written | failed"),
              Column("reason", _S, None, "why failed, or a note on POTCARs"),
              "candidate_id", "template_id", "checkpoint_id", "chemical_system", "formula", "reduced_formula",
              "n_atoms",
              Column("structure_source", _S, None, "relaxed:<surrogate> (its relaxed cell) or candidate (ASU rebuild)"),
              _SHARED["surrogate_name"].like(description="best-ranked surrogate of the candidate"),
              "surrogate_sha256", Column("rank", _I64, None, "rank under that surrogate"),
              Column("surrogates", _LS, None, "every surrogate that shortlisted the candidate"),
              Column("surrogate_sha256s", _LS, None, "their weights' sha256s"),
              Column("ranks", _LI, None, "the candidate's rank under each"),
              Column("input_set", _S, None, "pymatgen input set, e.g. MPRelaxSet"),
              Column("settings_json", _S, None, "input settings as JSON"),
              Column("has_potcar", _B, None, "POTCAR written (else POTCAR.spec)"),
              Column("potcar_symbols", _LS, None, "POTCAR symbols"),
              Column("potcar_functional", _S, None, "POTCAR functional"),
              _SHARED["supercell_matrix"].like(description="phonopy supercell matrix, 9 ints, row-major"),
              "n_supercell_atoms", "n_displacements",
              Column("displacement_a", _F64, "Å", "phonopy displacement distance"), "files", "code_version"),
        primary_key=("run_id",)),
    Contract(
        "dft_results", "dft", "Finished VASP/phonopy run folders, each ingested once.",
        _DFT_RESULT, primary_key=("result_id",), partition_key="result_id"),
    Contract(
        "discoveries", "dft", "Every linked DFT result (latest ingest of each run folder) with its verdict: energy "
        "above the hull of competing phases on the same footing (a GPAW run: the same backend and preset), "
        "phonons, novelty (lib.verdicts); verdict 'discovery' rows are the discoveries, 'rediscovery' rows known "
        "phases, the others say why not. Lineage to template, checkpoint, MP snapshot and surrogate ranks.",
        (*[c for c in _DFT_RESULT if c.name not in (*_CELL, "files")], *_VERDICT, *_LINEAGE_DETAIL),
        primary_key=("result_id",)),
    Contract(
        "dft_runs", "dft", "GPAW run folders dft_runs planned and ran: the best k novel, unique shortlisted "
        "candidates of each system and every competing phase of their DFT hull (same preset); one row per folder.",
        _DFT_RUN, primary_key=("run_name",)),
    Contract(
        "surrogate_accuracy", "dft", "Per chemical system (and 'all') and surrogate: the surrogate's energy above "
        "the hull against DFT's, over the candidates with a DFT verdict: MAE, sign agreement at the hull, "
        "Spearman rank correlation.",
        _SURROGATE_ACCURACY, primary_key=("chemical_system", "surrogate_name", "energy_footing")),
    Contract(
        "surrogate_churn", "dft", "Per chemical system and pair of surrogates: rank correlation, top-k overlap "
        "and phonon-verdict flips of their shortlists, over the unique structures both ranked.",
        _cols("chemical_system", "surrogate_a", "surrogate_b",
              Column("surrogate_sha256_a", _S, None, "weights sha256 of surrogate_a"),
              Column("surrogate_sha256_b", _S, None, "weights sha256 of surrogate_b"),
              Column("n_ranked_a", _I64, None, "unique candidates surrogate_a ranked (duplicate_of null)"),
              Column("n_ranked_b", _I64, None, "unique candidates surrogate_b ranked (duplicate_of null)"),
              Column("n_duplicates_a", _I64, None, "surrogate_a's shortlist rows dropped as relaxed duplicates"),
              Column("n_duplicates_b", _I64, None, "surrogate_b's shortlist rows dropped as relaxed duplicates"),
              Column("n_common", _I64, None, "unique candidates ranked by both: the set compared"),
              Column("spearman_rho", _F64, None, "Spearman rank correlation over the common candidates (null: < 2)"),
              Column("top_k", _I64, None, "k of the overlap"),
              Column("top_k_overlap", _I64, None, "|top-k(a) ∩ top-k(b)|, each top-k taken among the common candidates"),
              Column("top_k_overlap_fraction", _F64, None, "overlap / min(k, n_common)"),
              Column("n_verdict_compared", _I64, None, "common candidates with a phonon verdict from both"),
              Column("n_verdict_flipped", _I64, None, "of those, candidates whose verdict differs"),
              Column("flipped_candidate_ids", _LS, None, "the flipped candidates"),
              Column("candidate_ids", _LS, None, "side by side: candidates ranked by either, by rank_a"),
              Column("ranks_a", _LI, None, "their ranks under surrogate_a"),
              Column("ranks_b", _LI, None, "their ranks under surrogate_b")),
        primary_key=("chemical_system", "surrogate_a", "surrogate_b")),
    # --------------------------------------------------------------------------- group reports
    Contract(
        "xrd_patterns", "reports", "Simulated powder XRD of shortlisted and discovered crystals: one row per peak.",
        _cols("pattern_id", Column("source_table", _S, None, "table the crystal was read from"),
              _SHARED["candidate_id"].like(description="the candidate (null for rows without one)"),
              _SHARED["material_id"].like(description="the MP material (null for rows without one)"),
              "surrogate_name", "reduced_formula", "formula", "spacegroup_number",
              Column("spacegroup_number_relaxed", _I64, None, "space group of the relaxed cell"),
              Column("n_sites", _I64, None, "sites of the cell the pattern was computed from"),
              Column("two_theta_deg", _F64, "deg", "peak position 2θ"),
              Column("intensity", _F64, None, "peak intensity, the strongest peak of each pattern = 100"),
              Column("d_spacing_a", _F64, "Å", "interplanar spacing"),
              Column("hkl", _S, None, "Miller-index families of the peak, '; '-separated"),
              Column("multiplicity", _I64, None, "summed multiplicity of the families"),
              Column("wavelength_a", _F64, "Å", "X-ray wavelength")),
        primary_key=("pattern_id", "hkl")),
    Contract(
        "xrd_similarity", "reports", "Pairwise cosine similarity of the broadened XRD patterns (tells "
        "near-identical polymorphs apart); most similar first.",
        _cols(Column("pattern_id_a", _S, None, "first pattern (<source table>:<row id>)"),
              Column("pattern_id_b", _S, None, "second pattern (<source table>:<row id>)"),
              Column("cosine_similarity", _F64, None, "cosine similarity of the Gaussian-broadened patterns")),
        primary_key=("pattern_id_a", "pattern_id_b")),
)

#: Every contract by table name, in pipeline order.
CONTRACTS: dict[str, Contract] = {c.table: c for c in _ALL}
GROUPS: tuple[str, ...] = ("mp", "generator", "infill", "screening", "dft", "reports")


# ------------------------------------------------------------------------------------- helpers
def contract_for(table: str) -> Contract | None:
    """The contract of ``table``, or None when the table has none (e.g. a scratch table)."""
    return CONTRACTS.get(table)


def get(table: str) -> Contract:
    """The contract of ``table``; a clear error when there is none."""
    try:
        return CONTRACTS[table]
    except KeyError:
        raise KeyError(f"no contract for table {table!r}; tables with one: {sorted(CONTRACTS)}") from None


def schema(table: str, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict[str, pl.DataType]:
    """Column -> dtype of ``table``'s contract, in contract order (``only`` keeps the order of ``only``)."""
    full = get(table).schema
    if only is not None:
        names = list(only)
        missing = [n for n in names if n not in full]
        if missing:
            raise KeyError(f"table {table!r} has no columns {missing} in its contract")
        return {n: full[n] for n in names}
    drop = set(exclude)
    return {n: t for n, t in full.items() if n not in drop}


def empty(table: str) -> pl.DataFrame:
    """A frame with no rows and exactly the contract's columns."""
    return get(table).empty()


def conform(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` in the contract's shape: contract columns in order, cast to their dtypes, absent
    ones as nulls (extra columns are kept only where the contract allows them). Key and other
    non-null columns must be present: they cannot be made up."""
    c = get(table)
    absent = [n for n in c.non_null_columns if n not in frame.columns]
    if absent:
        raise ContractViolation([Violation(table, n, "missing, and the contract allows no nulls") for n in absent])
    cols = [pl.col(col.name).cast(col.dtype) if col.name in frame.columns else pl.lit(None, col.dtype).alias(col.name)
            for col in c.columns]
    extra = [n for n in frame.columns if n not in c.schema] if c.extra_columns_allowed else []
    return frame.select(*cols, *extra)


# ------------------------------------------------------------------------------------ markdown
BEGIN_MARKER = "<!-- BEGIN GENERATED TABLE CONTRACTS: python -m lib.contracts --update-docs (do not edit) -->"
END_MARKER = "<!-- END GENERATED TABLE CONTRACTS -->"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(contracts: Mapping[str, Contract] | None = None) -> str:
    """The contracts as Markdown: per group, per table its meaning, keys and a column table."""
    contracts = CONTRACTS if contracts is None else contracts
    lines = ["Generated from `lib/contracts.py`. The key is unique and non-null within a store partition; "
             "`TableStore.write` refuses a frame that breaks its contract, and every table has an asset "
             "check `<table>_matches_contract`. Lists are Arrow list columns; \"ASU\" columns are parallel "
             "lists, one entry per ASU site.", ""]
    groups = [g for g in GROUPS if any(c.group == g for c in contracts.values())]
    groups += sorted({c.group for c in contracts.values()} - set(groups))
    for g in groups:
        lines += [f"### group `{g}`", ""]
        for c in (c for c in contracts.values() if c.group == g):
            key = ", ".join(f"`{k}`" for k in c.primary_key) or "none"
            part = f"`{c.partition_key}`" if c.partition_key else "none (`all`)"
            asset = f" Asset: `{c.asset}`." if c.asset != c.table else ""
            lines += [f"#### `{c.table}`", "", c.meaning, "",
                      f"Key: {key}. Partition: {part}.{asset} Extra columns: "
                      + (f"allowed ({c.extra_columns_note})." if c.extra_columns_allowed else "not allowed."), "",
                      "| column | type | unit | not null | description |", "|---|---|---|---|---|"]
            lines += [f"| `{col.name}` | {_dtype_str(col.dtype)} | {col.unit or ''} | "
                      f"{'' if col.nullable else 'yes'} | {_md_cell(col.description)} |" for col in c.columns]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"markers not found: add the lines\n{BEGIN_MARKER}\n{END_MARKER}")
    return text[: start + len(BEGIN_MARKER)] + "\n\n" + block + "\n" + text[end:]


def generated_block(text: str) -> str:
    """The part of ``text`` between the markers (what :func:`replace_block` wrote)."""
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError("markers not found")
    return text[start + len(BEGIN_MARKER): end].strip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.contracts", description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the contracts as Markdown")
    p.add_argument("--update-docs", nargs="?", const="docs/architecture.md", metavar="PATH",
                   help="rewrite the generated section of PATH (default docs/architecture.md)")
    p.add_argument("--check-docs", nargs="?", const="docs/architecture.md", metavar="PATH",
                   help="exit 1 when the generated section of PATH is out of date")
    args = p.parse_args(argv)
    block = render_markdown()
    if args.update_docs:
        path = Path(args.update_docs)
        path.write_text(replace_block(path.read_text(), block))
        print(f"updated {path}")
    if args.check_docs:
        if generated_block(Path(args.check_docs).read_text()) != block:
            print(f"{args.check_docs} is out of date: run python -m lib.contracts --update-docs", file=sys.stderr)
            return 1
    if args.markdown or not (args.update_docs or args.check_docs):
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
