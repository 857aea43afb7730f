"""End-to-end Dagster materialisation: training_templates (real MP rows) -> wgan_checkpoint -> templates.

``training_templates`` is built from a slice of the shared MP file with the mp group's own lib
functions (parse -> symmetry/ASU -> selection + encoding) and written to the store, then the
generator group is materialised through Dagster with that table as its upstream source. (The
mp group's own end-to-end test materialises the Ray-backed chain; starting Ray here as well
would double this file's time.)
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets import generator as gen_assets
from lib.gan import load_checkpoint, selection_score
from lib.templates import MIN_DENSITY_OVERLAP, TEMPLATE_COLUMNS, density_overlap, training_density
from orchestration.resources import CgwganHome

N_SLICE = 150


def _write_training_templates(mp_file: Path, store) -> pl.DataFrame:
    from lib.mp_sources import parse_records, raw_from_table_file
    from lib.symmetry import analyse_symmetry
    from lib.training import build_training_templates

    raw = raw_from_table_file(mp_file).head(N_SLICE)
    parsed = parse_records(raw).filter(pl.col("reason").is_null()).with_columns(
        pl.lit("snap-test-slice").alias("snapshot_id"))
    sym = analyse_symmetry(parsed, symprec=0.1, round_trip_method="direct")
    train, _ = build_training_templates(sym)
    store.write("training_templates", train)
    return train


def test_training_templates_to_templates(home: Path, mp_file: Path) -> None:
    store = CgwganHome(home=str(home)).store
    train = _write_training_templates(mp_file, store)
    assert train.height >= 50
    resources = {"cgwgan_home": CgwganHome(home=str(home))}
    run_config = dg.RunConfig(ops={
        "wgan_checkpoint": gen_assets.WganCheckpointConfig(epochs=40, batch_size=32, latent_dim=16,
                                                           generator_hidden=64, critic_hidden=64, seed=1),
        "templates": gen_assets.TemplatesConfig(n_samples=1500, seed=2, tsne_points=40,
                                                min_density_overlap=0.0, crystal_system="cubic"),
    })
    result = dg.materialize(
        [dg.AssetSpec("training_templates", group_name="mp"), gen_assets.wgan_checkpoint, gen_assets.templates,
         gen_assets.wgan_checkpoint_reloads, gen_assets.templates_quality, *gen_assets.contract_checks],
        resources=resources, run_config=run_config, raise_on_error=True,
    )
    assert result.success
    ckpts = store.read("wgan_checkpoints")
    assert ckpts.height == 1
    row = ckpts.row(0, named=True)
    assert row["checkpoint_id"].startswith("ckpt-")
    assert row["training_snapshot_id"] == "snap-test-slice"
    assert load_checkpoint(row["path"], device="cpu").checkpoint_id == row["checkpoint_id"]

    out = store.read("templates")
    assert tuple(out.columns) == TEMPLATE_COLUMNS
    assert out.height > 0
    assert (out["checkpoint_id"] == row["checkpoint_id"]).all()
    assert out["spacegroup_number"].is_between(195, 230).all()  # conditioned on the cubic system
    assert out["template_id"].n_unique() == out.height
    assert (out["min_distance_a"] >= 1.0).all()

    mats = result.asset_materializations_for_node("templates")
    meta = mats[-1].metadata
    assert meta["checkpoint_id"].value == row["checkpoint_id"]
    for key in ("validity", "uniqueness", "novelty", "density_overlap", "symmetry_exactness",
                "distributions", "tsne_critic_features", "rejects_by_reason"):
        assert key in meta, key
    assert meta["symmetry_exactness"].value == 1.0
    assert "training_curves" in result.asset_materializations_for_node("wgan_checkpoint")[-1].metadata

    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["wgan_checkpoint_reloads"].passed
    assert checks["wgan_checkpoints_matches_contract"].passed and checks["templates_matches_contract"].passed
    q = checks["templates_quality"]
    assert q.passed  # threshold 0 here; symmetry must still be exact
    assert q.metadata["symmetry_exactness"].value == 1.0

    con = store.connect()
    assert con.execute("SELECT count(*) FROM templates").fetchone()[0] == out.height


def test_templates_quality_gate_fails_and_blocks_the_infill(home: Path, mp_file: Path) -> None:
    """The blocking gate shown failing: a WGAN trained for 3 epochs yields templates whose number
    densities do not reach the production threshold (``MIN_DENSITY_OVERLAP``) of overlap with
    training_templates; the check fails with severity ERROR, and the infill downstream in the same
    run is skipped (the templates themselves are written: the gate judges them, it does not undo them)."""
    from assets.infill import candidates
    from assets.partitions import chemical_system_partitions

    store = CgwganHome(home=str(home)).store
    train = _write_training_templates(mp_file, store)
    run_config = dg.RunConfig(ops={
        "wgan_checkpoint": gen_assets.WganCheckpointConfig(epochs=3, batch_size=32, latent_dim=16,
                                                           generator_hidden=32, critic_hidden=32, seed=1),
        "templates": gen_assets.TemplatesConfig(n_samples=600, seed=2, tsne_points=0,
                                                min_density_overlap=MIN_DENSITY_OVERLAP),
    })
    instance = dg.DagsterInstance.ephemeral()
    assert chemical_system_partitions.name is not None
    instance.add_dynamic_partitions(chemical_system_partitions.name, ["Ba-O-Ru"])
    result = dg.materialize(
        [dg.AssetSpec("training_templates", group_name="mp"), gen_assets.wgan_checkpoint, gen_assets.templates,
         gen_assets.templates_quality, candidates],
        resources={"cgwgan_home": CgwganHome(home=str(home))}, run_config=run_config, instance=instance,
        partition_key="Ba-O-Ru", raise_on_error=False,
    )
    assert not result.success
    q = {e.check_name: e for e in result.get_asset_check_evaluations()}["templates_quality"]
    assert not q.passed and q.severity == dg.AssetCheckSeverity.ERROR
    # why it failed, from the data: the overlap the check reports is the one the tables give, and
    # it is below the threshold (the templates exist and are exactly symmetric: not those reasons)
    generation = q.metadata["generation_id"].value
    out = store.read("templates", partition=generation)
    overlap = density_overlap(out["number_density_per_a3"].to_numpy(), training_density(train))
    assert out.height == q.metadata["n_templates"].value > 0
    assert q.metadata["symmetry_exactness"].value == 1.0
    assert q.metadata["density_overlap_threshold"].value == MIN_DENSITY_OVERLAP
    assert q.metadata["density_overlap"].value == pytest.approx(overlap, abs=1e-5)
    assert overlap < MIN_DENSITY_OVERLAP
    # the gate blocked the infill: its step never started and nothing was written
    steps = {kind: {e.step_key for e in result.all_events if e.event_type_value == kind}
             for kind in ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")}
    assert steps["STEP_FAILURE"] == {"templates_templates_quality"}
    assert {"wgan_checkpoint", "templates"} <= steps["STEP_SUCCESS"]
    assert "candidates" not in steps["STEP_START"]
    assert not result.asset_materializations_for_node("candidates")
    assert not store.exists("candidates")
    print(f"templates_quality failed: density overlap {overlap:.3f} < {MIN_DENSITY_OVERLAP} "
          f"on {out.height} templates")


def test_formula_conditioned_repaired_templates(home: Path, mp_file: Path) -> None:
    """The defaults of the robust recipe (checkpoint chosen by evaluated density overlap among the
    evaluations that cover training's ASU-site counts; EMA is off for so short a run; repairs before a min-distance reject) and
    stoichiometry conditioning, through Dagster: every
    template can host BaRuO3, is exactly symmetric and keeps the 1 Å minimum distance; the
    checkpoint records its evaluation curve and the epoch it kept."""
    from lib.gan import auto_ema_decay
    from lib.stoichiometry import usable_for_formula
    from lib.templates import density_overlap_floor

    store = CgwganHome(home=str(home)).store
    train = _write_training_templates(mp_file, store)
    run_config = dg.RunConfig(ops={
        "wgan_checkpoint": gen_assets.WganCheckpointConfig(epochs=12, batch_size=32, latent_dim=16,
                                                           generator_hidden=32, critic_hidden=32, seed=1,
                                                           eval_samples=400),
        "templates": gen_assets.TemplatesConfig(n_samples=800, seed=2, tsne_points=0, min_density_overlap=0.0,
                                                target_formula="BaRuO3"),
    })
    result = dg.materialize(
        [dg.AssetSpec("training_templates", group_name="mp"), gen_assets.wgan_checkpoint, gen_assets.templates,
         gen_assets.templates_quality],
        resources={"cgwgan_home": CgwganHome(home=str(home))}, run_config=run_config, raise_on_error=True)
    ckpt_meta = result.asset_materializations_for_node("wgan_checkpoint")[-1].metadata
    model = load_checkpoint(store.read("wgan_checkpoints")["path"][0], device="cpu")
    h = model.history
    assert h["eval_epoch"] == [float(e) for e in range(1, 13)]  # auto: every max(1, 12 // 24) epochs
    assert model.config.select_by == "covered_density"
    assert model.config.ema_decay == auto_ema_decay(train.height, epochs=12, batch_size=32, n_critic=5) == 0.0
    # no average (too few generator steps), so nothing for the raw weights to compete with
    assert not model.config.select_raw_weights and ckpt_meta["selected_weights"].value == "raw"
    kept = int(ckpt_meta["selected_epoch"].value)
    score = [(1.0, d) if c else (0.0, d - t) for d, t, c in
             zip(h["eval_density_overlap"], h["eval_n_sites_tv"], h["eval_sites_covered"], strict=True)]
    assert score[kept - 1] == max(score)
    out = store.read("templates")
    assert out.height > 0
    assert usable_for_formula(out, "BaRuO3").all()
    assert (out["min_distance_a"] >= 1.0).all()
    meta = result.asset_materializations_for_node("templates")[-1].metadata
    assert meta["stoichiometry_conditioning"].value["formula"] == "BaRuO3"
    assert set(meta["repairs"].value) >= {"free_params", "rescale", "dedupe_fixed_site"}
    q = {e.check_name: e for e in result.get_asset_check_evaluations()}["templates_quality"]
    assert q.metadata["symmetry_exactness"].value == 1.0
    assert q.metadata["overlap_of_training_itself_at_this_size"].value == pytest.approx(
        density_overlap_floor(training_density(train), out.height), abs=1e-4)


def test_checkpoint_with_the_average_lets_raw_weights_compete(home: Path, mp_file: Path) -> None:
    """With the weight average on (here forced: a tiny run's auto value is 0), the default selection
    evaluates the raw weights too and keeps whichever scored best (select_raw_weights)."""
    store = CgwganHome(home=str(home)).store
    _write_training_templates(mp_file, store)
    run_config = dg.RunConfig(ops={"wgan_checkpoint": gen_assets.WganCheckpointConfig(
        epochs=4, batch_size=32, latent_dim=16, generator_hidden=32, critic_hidden=32, seed=1, eval_samples=300,
        ema_decay=0.5)})
    result = dg.materialize([dg.AssetSpec("training_templates", group_name="mp"), gen_assets.wgan_checkpoint],
                            resources={"cgwgan_home": CgwganHome(home=str(home))}, run_config=run_config)
    meta = result.asset_materializations_for_node("wgan_checkpoint")[-1].metadata
    model = load_checkpoint(store.read("wgan_checkpoints")["path"][0], device="cpu")
    assert model.config.select_raw_weights and model.config.eval_raw_weights and model.config.ema_decay == 0.5
    h = model.history
    keys = ("density_overlap", "validity", "n_sites_tv", "sites_covered")
    scores = {(w, e): selection_score(model.config.select_by, {k: h[f"eval_{k}{sfx}"][i] for k in keys})
              for w, sfx in (("ema", ""), ("raw", "_raw")) for i, e in enumerate(h["eval_epoch"])}
    kept = (meta["selected_weights"].value, float(meta["selected_epoch"].value))
    assert kept[0] in ("ema", "raw") and len(h["eval_density_overlap_raw"]) == len(h["eval_epoch"])
    assert scores[kept] == max(scores.values())  # the best of both, whichever weights scored it

