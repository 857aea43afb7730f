"""lib.stoichiometry: formula counts, usable templates, feasible groups, conditioned decoding."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from lib import gan, wyckoff
from lib.encoding import EncodingSchema, decode_vectors, encode_templates, encodings_to_numpy
from lib.stoichiometry import (
    TooManyConfigurations,
    best_configuration_dp,
    condition_on_formula,
    condition_on_formula_with_stats,
    feasible_spacegroups,
    formula_counts,
    letter_configurations,
    sample_for_formula,
    site_partition,
    usable_for_formula,
)
from lib.templates import TemplateFilters, check_symmetry, decode_templates
from tests.lib.test_encoding import real_training_rows


def test_formula_counts() -> None:
    assert formula_counts("Ba2RuO4") == {"Ba": 2, "Ru": 1, "O": 4}
    assert formula_counts("Ba2Ru2O6") == {"Ba": 1, "Ru": 1, "O": 3}  # reduced
    assert formula_counts("BaRu2O6") == {"Ba": 1, "Ru": 2, "O": 6}
    assert formula_counts("O2") == {"O": 1}  # not pymatgen's special diatomic "O2"
    with pytest.raises(ValueError, match="Qq2"):
        formula_counts("Qq2")
    with pytest.raises(ValueError, match="non-integer"):
        formula_counts("Ba0.5O")
    with pytest.raises(ValueError, match="non-empty"):
        formula_counts("  ")


@pytest.fixture(scope="module")
def ba_ru_o_templates(ba_ru_o_mp: pl.DataFrame) -> pl.DataFrame:
    """The shared Ba-Ru-O MP structures as templates (real symmetry analysis, own multiplicities)."""
    from lib.symmetry import analyse_symmetry

    sym = analyse_symmetry(ba_ru_o_mp.select("material_id", "lattice_matrix", "species", "frac_coords"),
                           round_trip_method="direct")
    return sym.with_columns(ba_ru_o_mp["reduced_formula"], pl.col("material_id").alias("template_id"))


def test_real_structures_are_usable_for_their_own_formula(ba_ru_o_templates: pl.DataFrame) -> None:
    t = ba_ru_o_templates
    for formula in t["reduced_formula"].unique().to_list():
        rows = t.filter(pl.col("reduced_formula") == formula)
        assert usable_for_formula(rows, formula).all(), formula
    # K2NiF4-type Ba2RuO4 (mp-1025237): I4/mmm, Ru 2a, O 4c, Ba 4e, O 4e
    k2nif4 = t.filter(pl.col("material_id") == "mp-1025237").row(0, named=True)
    assert k2nif4["spacegroup_number"] == 139 and sorted(k2nif4["multiplicities"]) == [2, 4, 4, 4]
    part = site_partition(k2nif4["multiplicities"], [2, 1, 4])  # Ba, Ru, O
    assert part is not None
    z, assign = part
    sums = np.bincount(assign, weights=k2nif4["multiplicities"], minlength=3)
    assert z == 2 and sums.tolist() == [4.0, 2.0, 8.0]
    # rock salt BaO (mp-1342, Fm-3m 4a + 4b): BaO yes, BaRuO3 / Ba2RuO4 no
    rock = t.filter(pl.col("material_id") == "mp-1342")
    assert rock["multiplicities"].to_list() == [[4, 4]]
    assert usable_for_formula(rock, "BaO").to_list() == [True]
    assert usable_for_formula(rock, "BaRuO3").to_list() == [False]
    assert usable_for_formula(rock, "Ba2RuO4").to_list() == [False]
    # max_z: K2NiF4 Ba2RuO4 has Z = 2
    assert usable_for_formula(t.filter(pl.col("material_id") == "mp-1025237"), "Ba2RuO4", max_z=1).to_list() == [False]


def test_usable_matches_brute_force_and_names_bad_rows() -> None:
    rng = np.random.default_rng(3)
    mults = [rng.choice([1, 2, 3, 4, 6, 8, 12], size=int(rng.integers(1, 6))).tolist() for _ in range(400)]
    df = pl.DataFrame({"multiplicities": mults})
    got = usable_for_formula(df, "Ba2RuO4").to_list()

    def brute(m: list[int]) -> bool:  # every labelling of the sites with the three elements
        for lab in itertools.product(range(3), repeat=len(m)):
            s = np.bincount(lab, weights=m, minlength=3)
            if (s > 0).all() and s[0] / 2 == s[1] == s[2] / 4 and s[1] == int(s[1]):
                return True
        return False

    assert got == [brute(m) for m in mults]
    assert 0 < sum(got) < len(got)
    bad = pl.DataFrame({"template_id": ["tpl-a", "tpl-b", "tpl-c"], "multiplicities": [[4, 4], [], [2, 0]]})
    with pytest.raises(ValueError, match=r"row 1 \(tpl-b\), row 2 \(tpl-c\)"):
        usable_for_formula(bad, "BaO")
    with pytest.raises(ValueError, match="multiplicities"):
        usable_for_formula(pl.DataFrame({"x": [1]}), "BaO")


def _brute_configs(sg: int, counts: tuple[int, ...], max_sites: int, max_atoms: int, max_z: int) -> set[tuple]:
    """Canonical site assignments straight from lib.wyckoff positions, by brute force."""
    letters = wyckoff.letters(sg)
    pos = [wyckoff.position(sg, let) for let in letters]
    out = set()
    for s in range(1, max_sites + 1):
        for combo in itertools.combinations_with_replacement(range(len(letters)), s):
            if any(combo.count(i) > 1 and pos[i].dof == 0 for i in set(combo)):
                continue
            m = [pos[i].multiplicity for i in combo]
            if sum(m) > max_atoms:
                continue
            res = site_partition(m, counts, max_z=max_z)
            if res is not None:
                out.add(tuple(combo) + (-1,) * (max_sites - s))
    return out


@pytest.mark.parametrize("sg", [2, 47, 139, 194, 221, 225])
def test_letter_configurations_match_brute_force(sg: int) -> None:
    for counts in [(4, 2, 1), (3, 1, 1), (1, 1)]:
        got = {tuple(r) for r in letter_configurations(sg, counts, 4, 100, 4).tolist()}
        assert got == _brute_configs(sg, counts, 4, 100, 4), (sg, counts)
    feas = feasible_spacegroups("Ba2RuO4")
    assert 139 in feas and 1 not in feas  # P1 has one 1-fold position: at most 4 atoms with 4 sites
    assert 225 in feasible_spacegroups("BaO")


@pytest.fixture(scope="module")
def tiny_model(mp_file: Path) -> gan.WganModel:
    """A small WGAN trained briefly on real MP template rows (the shared file)."""
    torch.set_num_threads(1)
    rows = real_training_rows(mp_file)
    x = encodings_to_numpy(encode_templates(rows))
    cfg = gan.GanConfig(latent_dim=8, generator_hidden=32, critic_hidden=32, attn_tokens=4, epochs=3,
                        batch_size=16, n_critic=2)
    return gan.train_wgan(x, config=cfg, seed=0, device="cpu").model


@pytest.mark.parametrize("formula", ["Ba2RuO4", "BaRuO3"])
def test_conditioned_vectors_decode_to_usable_symmetric_templates(tiny_model: gan.WganModel, formula: str) -> None:
    m = tiny_model
    x, stats = sample_for_formula(m, 400, seed=1, formula=formula)
    assert stats.n_spacegroup_replaced == 0 and stats.n_samples == 400
    res = decode_templates(x, checkpoint_id=m.checkpoint_id, schema=m.schema)
    assert res.n_valid > 0, res.rejects
    assert res.rejects["duplicate_fixed_site"] == 0
    assert usable_for_formula(res.templates, formula).all()
    assert set(res.templates["spacegroup_number"].to_list()) <= set(feasible_spacegroups(formula).tolist())
    sym = check_symmetry(res.templates)
    assert sym["is_symmetric"].all()
    # the same vectors unconditioned: usable only by luck (and far less often)
    raw = decode_templates(gan.sample_vectors(m, 400, seed=1), checkpoint_id=m.checkpoint_id, schema=m.schema)
    assert not usable_for_formula(raw.templates, formula).all()
    # conditioning is idempotent: the written one-hots are the best feasible choice again
    assert np.array_equal(condition_on_formula(x, formula=formula, schema=m.schema), x)
    # geometry-aware: the best-scoring of the 8 best configurations that passes the filters
    xg, sg_ = sample_for_formula(m, 400, seed=1, formula=formula, filters=TemplateFilters(), max_tries=8)
    rg = decode_templates(xg, checkpoint_id=m.checkpoint_id, schema=m.schema)
    assert rg.n_valid == sum(sg_.rank_chosen) >= res.n_valid  # the pre-check agrees with the decoder
    assert sg_.rank_chosen[0] == res.n_valid  # rank 0 is the plain choice
    assert sg_.n_geometry_failed == 400 - rg.n_valid
    assert usable_for_formula(rg.templates, formula).all()
    assert check_symmetry(rg.templates)["is_symmetric"].all()


def test_choice_maximises_the_generators_scores(tiny_model: gan.WganModel) -> None:
    """Post-hoc conditioning of unconditioned vectors: the chosen group is feasible and the chosen
    sites score at least as high as every feasible canonical assignment found by brute force."""
    m = tiny_model
    s = m.schema
    x = gan.sample_vectors(m, 60, seed=5)
    out, stats = condition_on_formula_with_stats(x, formula="Ba2RuO4", schema=s,
                                                 spacegroup_prior=m.spacegroup_prior)
    assert stats.n_samples_changed > 0
    d = decode_vectors(out, schema=s)
    feas = set(feasible_spacegroups("Ba2RuO4").tolist())
    for i in range(0, 60, 6):
        sg = int(d.sg[i])
        assert sg in feas

        def score(cfg: tuple, i: int = i) -> float:
            total = 0.0
            for j, li in enumerate(cfg):
                st = s.site_slice(j).start
                if li >= 0:
                    total += float(x[i, st + 1 + li]) + (float(x[i, st]) - 0.5 if j else 0.0)
                else:
                    total += 0.5 - float(x[i, st])
            return total

        chosen = tuple(int(li) if p else -1 for li, p in zip(d.letter_index[i], d.present[i], strict=True))
        brute = _brute_configs(sg, (4, 2, 1), s.max_sites, 100, 4)
        assert chosen in brute
        assert score(chosen) >= max(score(c) for c in brute) - 1e-6
    # a formula no group can host within 4 sites and Z <= 1: a clear error
    with pytest.raises(ValueError, match="no space group can host"):
        condition_on_formula(x, formula="Ba2Ru7O18", schema=s, max_z=1)


@pytest.mark.parametrize("sg", [2, 47, 63, 139, 194, 225])
def test_dynamic_programming_matches_enumeration(sg: int) -> None:
    """The DP used for groups with too many configurations finds the same best score."""
    rng = np.random.default_rng(sg)
    for S, counts in [(4, (4, 2, 1)), (5, (3, 1, 1)), (5, (1, 1))]:
        cfg = letter_configurations(sg, counts, S, 100, 4)
        if cfg.shape[0] == 0:
            continue
        table = rng.normal(size=(40, S, 28))
        table[:, 0, -1] = -np.inf  # slot 0 is always present
        col = np.where(cfg < 0, 27, cfg)
        best = np.max(sum(table[:, j][:, col[:, j]] for j in range(S)), axis=1)
        got = best_configuration_dp(table, sg, counts, S, 100, 4)
        assert {tuple(r) for r in got.tolist()} <= {tuple(r) for r in cfg.tolist()}
        got_score = np.array([sum(table[b, j, 27 if c < 0 else c] for j, c in enumerate(r))
                              for b, r in enumerate(got.tolist())])
        np.testing.assert_allclose(got_score, best)


def test_eight_sites_use_dynamic_programming() -> None:
    """With 8 ASU sites Pmmm has too many configurations to enumerate; conditioning still gives
    usable, exactly symmetric templates (vectors: uniform in the generator's tanh range)."""
    schema = EncodingSchema(max_sites=8)
    with pytest.raises(TooManyConfigurations):
        letter_configurations(47, (4, 2, 1), 8, 100, 4)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(300, schema.dim)).astype(np.float32)
    x[:, :230] = 0.0
    x[:, 46] = 1.0  # Pmmm
    x[150:, 46] = 0.0
    x[150:, 138] = 1.0  # I4/mmm
    out, stats = condition_on_formula_with_stats(x, formula="Ba2RuO4", schema=schema)
    assert stats.n_configurations[47] == -1 and stats.n_configurations[139] > 0
    d = decode_vectors(out, schema=schema)
    assert set(d.sg.tolist()) == {47, 139}
    res = decode_templates(out, checkpoint_id="ckpt-test", schema=schema)
    assert res.n_valid > 0 and res.rejects["duplicate_fixed_site"] == 0
    assert usable_for_formula(res.templates, "Ba2RuO4", max_z=4).all()
    assert check_symmetry(res.templates)["is_symmetric"].all()
