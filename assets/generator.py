"""Group ``generator``: train the Wyckoff WGAN-GP and sample symmetric crystal templates.

Thin wrappers around :mod:`lib.gan` (model, training, checkpoints) and :mod:`lib.templates`
(decoding, filters, quality). Tables: ``wgan_checkpoints`` (one row per checkpoint) and
``templates`` (store partition = generation run ``gen-...``).
"""


import dataclasses
import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import polars as pl

from assets._checks import build_contract_checks
from lib import gan, stoichiometry
from lib import templates as tpl
from lib.encoding import DEFAULT_SCHEMA, EncodingSchema, encode_templates, encodings_to_numpy, schema_for_dim
from lib.ids import content_hash
from lib.plots import figure_markdown, subplots
from orchestration.progress import new_bar
from orchestration.resources import CgwganHome

GROUP = "generator"


class WganCheckpointConfig(dg.Config):
    seed: int = 0
    epochs: int = 120
    batch_size: int = 128
    latent_dim: int = 64
    generator_hidden: int = 256
    critic_hidden: int = 256
    n_critic: int = 5
    gp_lambda: float = 10.0
    learning_rate: float = 5e-4
    cpu_threads: int = 1  # torch threads on CPU (1 is fastest on a busy 2-core machine)
    device: str = ""  # "" = cuda when available, else cpu
    max_training_rows: int = 0  # 0 = all rows of training_templates
    resume_checkpoint_id: str = ""  # continue training from this row of wgan_checkpoints
    # Robustness of the paper's recipe (lib.gan.GanConfig; benchmarks/results/bench_generator.md:
    # over 4 seeds the density overlap's spread fell from 0.014 to 0.004 sd). 0 / "last" = the paper.
    ema_decay: float = -1.0  # generator weight average; -1 = auto (gan.auto_ema_decay: off below 1,000 steps)
    eval_every: int = -1  # epochs between density-overlap evaluations; -1 = auto (about 24 of them)
    eval_samples: int = 5_000  # templates sampled per evaluation
    # which weights the checkpoint keeps (lib.gan.GanConfig.select_by): "covered_density" = best
    # density overlap among evaluations whose templates cover training's ASU-site counts ("quality",
    # overlap minus site-count TV, when none does)
    select_by: Literal["last", "density_overlap", "quality", "covered_density"] = "covered_density"
    # with the average on: the raw weights of every evaluation compete in the selection too (each
    # evaluation samples both). On the MP table, two CPU seeds: 0.947 / 0.927 with repairs against
    # 0.922 / 0.928 keeping the best average (docs/generator.md, benchmarks/results/bench_generator_*_cpu.md)
    select_raw_weights: bool = True


class TemplatesConfig(dg.Config):
    n_samples: int = 5000
    seed: int = 0
    space_groups: list[int] = []  # conditioning; empty = every group
    # conditioning ("" = any); intersected with space_groups when both are given
    crystal_system: Literal["", "triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal",
                            "cubic"] = ""
    checkpoint_id: str = ""  # "" = the newest row of wgan_checkpoints
    min_distance_a: float = 1.0
    # repairs before a min-distance reject (lib.templates.TemplateFilters; "none" = the paper):
    # on 100,000 samples of 4 seeds validity 0.737 -> 0.997, density overlap 0.917 -> 0.939
    repair: Literal["none", "rescale", "free_params", "free_params+rescale"] = "free_params+rescale"
    max_rescale: float = 1.25
    dedupe_fixed_sites: bool = True
    # stoichiometry conditioning (lib.stoichiometry): every template can host this formula
    # (e.g. "Ba2RuO4"); "" = none. Not combined with space_groups / crystal_system.
    target_formula: str = ""
    min_density_per_a3: float = 0.005
    max_density_per_a3: float = 0.25
    max_atoms: int = 100
    min_density_overlap: float = tpl.MIN_DENSITY_OVERLAP  # threshold of the quality check
    tsne_points: int = 600  # per side (training, generated); 0 = no t-SNE
    device: str = ""


def _training_frame(cgwgan_home: CgwganHome, schema: EncodingSchema) -> tuple[pl.DataFrame, np.ndarray]:
    df = cgwgan_home.store.read("training_templates")
    ok = (df.height and "encoding" in df.columns and "encoding_version" in df.columns
          and set(df["encoding_version"].unique().to_list()) == {schema.version}
          and df["encoding"].list.len().unique().to_list() == [schema.dim])
    if not ok:
        df = encode_templates(df, schema=schema)
    return df, encodings_to_numpy(df, schema=schema)


def _training_schema(cgwgan_home: CgwganHome) -> EncodingSchema:
    """The encoding schema the WGAN trains with: the paper's 4 ASU sites, or more when
    ``training_templates`` was built with a larger ``max_asu_sites`` (its vectors' length tells).
    A table of fewer sites keeps the 4-site schema, so its checkpoints stay those of the default."""
    store = cgwgan_home.store
    dims = (store.read("training_templates", columns=["encoding"])["encoding"].list.len().unique().to_list()
            if store.exists("training_templates") else [])
    dims = [d for d in dims if d]
    schema = schema_for_dim(int(dims[0])) if len(dims) == 1 else DEFAULT_SCHEMA
    return schema if schema.max_sites > DEFAULT_SCHEMA.max_sites else DEFAULT_SCHEMA


def _snapshot_id(df: pl.DataFrame) -> str:
    if "snapshot_id" not in df.columns or df.height == 0:
        return ""
    return ",".join(sorted(str(s) for s in df["snapshot_id"].unique().to_list() if s))


def _curves_figure(history: dict[str, list[float]]):
    evals = bool(history.get("eval_epoch"))
    fig, axes = subplots(1, 4 if evals else 3, figsize=(17 if evals else 13, 3.6))
    ep = np.arange(1, len(history["critic_loss"]) + 1)
    axes[0].plot(ep, history["critic_loss"], label="critic loss")
    axes[0].plot(ep, history["generator_loss"], label="generator loss")
    axes[0].legend()
    axes[1].plot(ep, history["wasserstein"], color="C2")
    axes[1].set_title("Wasserstein estimate E[D(real)] - E[D(fake)]")
    axes[2].plot(ep, history["gradient_penalty"], color="C3")
    axes[2].set_title("gradient penalty")
    if evals:
        axes[3].plot(history["eval_epoch"], history["eval_density_overlap"], "o-", label="density overlap")
        axes[3].plot(history["eval_epoch"], history["eval_validity"], "s-", label="validity")
        axes[3].axhline(tpl.MIN_DENSITY_OVERLAP, color="grey", ls="--", lw=1)
        axes[3].set_title("evaluation samples")
        axes[3].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return fig


@dg.asset(group_name=GROUP, kinds={"pytorch", "parquet"}, deps=["training_templates"],
          description="Wyckoff WGAN-GP trained on training_templates; a content-hashed checkpoint folder.")
def wgan_checkpoint(context: dg.AssetExecutionContext, config: WganCheckpointConfig,
                    cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    schema = _training_schema(cgwgan_home)
    df, x = _training_frame(cgwgan_home, schema)
    if config.max_training_rows and x.shape[0] > config.max_training_rows:
        x = x[: config.max_training_rows]
    snapshot = _snapshot_id(df)
    eval_every = config.eval_every if config.eval_every >= 0 else max(1, config.epochs // 24)
    ema_decay = (config.ema_decay if config.ema_decay >= 0 else
                 gan.auto_ema_decay(x.shape[0], epochs=config.epochs, batch_size=config.batch_size,
                                    n_critic=config.n_critic))
    select_by = config.select_by if eval_every else "last"
    raw_too = bool(config.select_raw_weights and ema_decay > 0 and select_by != "last")
    hp = gan.GanConfig(latent_dim=config.latent_dim, generator_hidden=config.generator_hidden,
                       critic_hidden=config.critic_hidden, epochs=config.epochs, batch_size=config.batch_size,
                       n_critic=config.n_critic, gp_lambda=config.gp_lambda,
                       lr_generator=config.learning_rate, lr_critic=config.learning_rate,
                       ema_decay=ema_decay, eval_every=eval_every, eval_samples=config.eval_samples,
                       select_by=select_by, eval_raw_weights=raw_too, select_raw_weights=raw_too)
    device = config.device or gan.default_device()
    training_key = content_hash({
        "rows_sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(), "shape": list(x.shape),
        "training_snapshot_id": snapshot, "encoding_version": schema.version, "hyperparameters": hp.to_dict(),
        "seed": config.seed, "device": device, "resume_checkpoint_id": config.resume_checkpoint_id,
    }, prefix="train-")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    model, previous = _reusable_checkpoint(cgwgan_home, training_key, device)
    if model is not None and previous is not None:  # same rows and settings: no training
        context.log.info(f"reusing {model.checkpoint_id} (training key {training_key})")
        path, wall, history = Path(previous["path"]), float(previous["wall_time_s"]), model.history
        created_at, reused_at = previous["created_at"], now
    else:
        parent = None
        if config.resume_checkpoint_id:
            parent = gan.load_checkpoint(_latest_checkpoint(cgwgan_home, config.resume_checkpoint_id)["path"],
                                         device=config.device or None)
        every = max(1, config.epochs // 10)
        bar = new_bar(config.epochs, "training", unit="epoch")
        epochs_done = [0]

        def on_epoch(message: str) -> None:  # every epoch: the bar; every tenth of them: the run log
            epochs_done[0] += 1
            bar.update(1)
            if epochs_done[0] % every == 0:
                context.log.info(message)

        try:
            result = gan.train_wgan(x, config=hp, schema=schema, seed=config.seed, device=device,
                                    training_snapshot_id=snapshot, log_every=1, log=on_epoch,
                                    cpu_threads=config.cpu_threads or None, init_from=parent,
                                    reference_density=tpl.training_density(df) if hp.eval_every else None)
        finally:
            bar.close()
        model, wall, history = result.model, result.wall_time_s, result.history
        path = gan.save_checkpoint(model, cgwgan_home.subdir("checkpoints"))
        created_at, reused_at = now, None
    row = pl.DataFrame({
        "checkpoint_id": [model.checkpoint_id], "path": [str(path)], "encoding_version": [schema.version],
        "training_snapshot_id": [snapshot], "seed": [config.seed], "epochs": [config.epochs],
        "n_training_rows": [int(x.shape[0])], "device": [device],
        "wall_time_s": [round(wall, 2)],
        "parent_checkpoint_id": [model.parent_checkpoint_id],
        "created_at": [created_at],
        "hyperparameters": [json.dumps(hp.to_dict(), sort_keys=True)],
        "training_key": [training_key], "reused_at": [reused_at],
    }, schema_overrides={"reused_at": pl.String})
    store = cgwgan_home.store
    if store.exists("wgan_checkpoints"):
        old = store.read("wgan_checkpoints").filter(pl.col("checkpoint_id") != model.checkpoint_id)
        row = pl.concat([old, row], how="diagonal_relaxed")
    store.write("wgan_checkpoints", _newest_last(row))
    cgwgan_home.refresh_catalog()
    h = history
    return dg.MaterializeResult(metadata={
        "checkpoint_id": model.checkpoint_id,
        "reused": reused_at is not None,
        "training_key": training_key,
        "path": dg.MetadataValue.path(str(path)),
        "training_snapshot_id": snapshot,
        "parent_checkpoint_id": model.parent_checkpoint_id,
        "encoding_version": schema.version,
        "seed": config.seed,
        "epochs": config.epochs,
        "n_training_rows": int(x.shape[0]),
        "device": device,
        "wall_time_s": round(wall, 1),
        "final_wasserstein": round(h["wasserstein"][-1], 5),
        "selected_epoch": int(model.extra.get("selected_epoch", config.epochs)),
        "selected_weights": str(model.extra.get("selected_weights", "")),  # "ema" (the average) or "raw"
        **({"eval_density_overlap_best": round(max(h["eval_density_overlap"]), 4),
            "eval_density_overlap_last": round(h["eval_density_overlap"][-1], 4),
            "eval_samples": config.eval_samples} if h.get("eval_density_overlap") else {}),
        "final_gradient_penalty": round(h["gradient_penalty"][-1], 5),
        "hyperparameters": dg.MetadataValue.json(hp.to_dict()),
        "training_curves": dg.MetadataValue.md(figure_markdown(_curves_figure(h), alt="training curves")),
    })


@dg.asset_check(asset=wgan_checkpoint, description="The newest checkpoint reloads with the same content hash, "
                "its curves are finite, and its generator's outputs lie in [-1, 1].")
def wgan_checkpoint_reloads(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    rows = _newest_last(cgwgan_home.store.read("wgan_checkpoints"))
    last = rows.row(-1, named=True)
    try:
        model = gan.load_checkpoint(last["path"], device="cpu")
    except (OSError, ValueError) as e:
        return dg.AssetCheckResult(passed=False, metadata={"checkpoint_id": last["checkpoint_id"], "error": str(e)})
    finite = all(np.isfinite(v).all() for v in model.history.values())
    x = gan.sample_vectors(model, 256, seed=0)
    in_range = bool(np.abs(x).max() <= 1.0)
    same = model.checkpoint_id == last["checkpoint_id"]
    return dg.AssetCheckResult(passed=bool(finite and in_range and same), metadata={
        "checkpoint_id": last["checkpoint_id"], "reloaded_id": model.checkpoint_id,
        "curves_finite": bool(finite), "outputs_in_range": in_range})


def _newest_last(rows: pl.DataFrame) -> pl.DataFrame:
    """Checkpoint rows ordered by when they were last trained or reused (the newest last)."""
    if "reused_at" not in rows.columns:
        return rows.sort("created_at")
    return rows.sort(pl.coalesce("reused_at", "created_at"))


def _reusable_checkpoint(cgwgan_home: CgwganHome, training_key: str,
                         device: str) -> tuple[gan.WganModel | None, dict | None]:
    """The checkpoint trained on the same rows with the same settings (``training_key``), reloaded
    (its weights hash checked), with its row; (None, None) when there is none or it does not load."""
    store = cgwgan_home.store
    if not store.exists("wgan_checkpoints"):
        return None, None
    rows = store.read("wgan_checkpoints")
    if "training_key" not in rows.columns:
        return None, None
    rows = _newest_last(rows.filter(pl.col("training_key") == training_key))
    for previous in reversed(rows.to_dicts()):
        if not Path(previous["path"]).is_dir():
            continue
        try:
            return gan.load_checkpoint(previous["path"], device=device), previous
        except (OSError, ValueError, RuntimeError):  # damaged or edited files: train again
            continue
    return None, None


def _latest_checkpoint(cgwgan_home: CgwganHome, checkpoint_id: str) -> dict:
    rows = _newest_last(cgwgan_home.store.read("wgan_checkpoints"))
    if checkpoint_id:
        rows = rows.filter(pl.col("checkpoint_id") == checkpoint_id)
        if rows.height == 0:
            raise ValueError(f"checkpoint {checkpoint_id!r} is not in wgan_checkpoints")
    return rows.row(-1, named=True)


@dg.asset(group_name=GROUP, kinds={"parquet"}, deps=[wgan_checkpoint, "training_templates"],
          description="Crystal templates sampled from the WGAN, symmetric by construction, filtered and "
                      "deduplicated; store partition = generation run.")
def templates(context: dg.AssetExecutionContext, config: TemplatesConfig,
              cgwgan_home: CgwganHome) -> dg.MaterializeResult:
    ckpt = _latest_checkpoint(cgwgan_home, config.checkpoint_id)
    model = gan.load_checkpoint(ckpt["path"], device=config.device or None)
    filters = tpl.TemplateFilters(min_distance_a=config.min_distance_a,
                                  min_density_per_a3=config.min_density_per_a3,
                                  max_density_per_a3=config.max_density_per_a3, max_atoms=config.max_atoms,
                                  repair=config.repair, max_rescale=config.max_rescale,
                                  dedupe_fixed_sites=config.dedupe_fixed_sites)
    if config.target_formula and (config.space_groups or config.crystal_system):
        raise ValueError("templates: target_formula picks its own space groups (those that can host the formula); "
                         "leave space_groups and crystal_system empty")
    allowed = gan.condition_spacegroups(space_groups=config.space_groups or None,
                                        crystal_system=config.crystal_system or None)
    run = {"checkpoint_id": model.checkpoint_id, "n_samples": config.n_samples, "seed": config.seed,
           "space_groups": None if allowed is None else allowed.tolist(), "filters": filters.to_dict(),
           **({"target_formula": config.target_formula} if config.target_formula else {})}
    generation_id = content_hash(run, prefix="gen-")
    t0 = time.perf_counter()
    conditioning: dict = {}
    if config.target_formula:
        x, stats = stoichiometry.sample_for_formula(model, config.n_samples, seed=config.seed,
                                                    formula=config.target_formula, max_atoms=config.max_atoms,
                                                    filters=filters)
        conditioning = {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, (int, float, str))}
    else:
        x = gan.sample_vectors(model, config.n_samples, seed=config.seed, space_groups=allowed)
    t_sample = time.perf_counter() - t0
    result = tpl.decode_templates(x, checkpoint_id=model.checkpoint_id, schema=model.schema,
                                        allowed_spacegroups=allowed, filters=filters)
    t_decode = time.perf_counter() - t0 - t_sample
    out = result.templates
    t1 = time.perf_counter()
    sym = tpl.check_symmetry(out)
    t_sym = time.perf_counter() - t1
    training, x_train = _training_frame(cgwgan_home, model.schema)
    quality = tpl.quality_report(result, training, symmetry=sym)
    store = cgwgan_home.store
    store.write("templates", out, partition=generation_id, metadata={
        **run, "generation_id": generation_id, "min_density_overlap": config.min_density_overlap,
        "quality": {k: v for k, v in quality.items() if k != "rejects"}, "rejects": result.rejects})
    cgwgan_home.refresh_catalog()
    meta: dict = {
        "generation_id": generation_id,
        "checkpoint_id": model.checkpoint_id,
        "dagster/row_count": out.height,
        "n_samples": config.n_samples,
        "conditioning_space_groups": "all" if allowed is None else str(allowed.tolist()),
        "rejects_by_reason": dg.MetadataValue.json(result.rejects),
        "repairs": dg.MetadataValue.json(result.repairs),
        **({"stoichiometry_conditioning": dg.MetadataValue.json(conditioning)} if conditioning else {}),
        "n_duplicates_folded": result.n_duplicates,
        "sample_s": round(t_sample, 2),
        "decode_filter_s": round(t_decode, 2),
        "symmetry_check_s": round(t_sym, 2),
        "templates_per_s": round(config.n_samples / max(t_sample + t_decode, 1e-9), 1),
        "decode_timings_s": dg.MetadataValue.json({k: round(v, 3) for k, v in result.timings_s.items()}),
    }
    for k, v in quality.items():
        if isinstance(v, float):
            meta[k] = round(v, 5)
    if out.height:
        meta["distributions"] = dg.MetadataValue.md(figure_markdown(
            tpl.distributions_figure(out, training), alt="generated vs training"))
    if config.tsne_points and out.height >= 10:
        rng = np.random.default_rng(config.seed)
        n = min(config.tsne_points, out.height, x_train.shape[0])
        real = x_train[rng.choice(x_train.shape[0], n, replace=False)]
        fake = x[rng.choice(x.shape[0], n, replace=False)]
        feats_r, feats_f = gan.critic_features(model, real), gan.critic_features(model, fake)
        meta["tsne_critic_features"] = dg.MetadataValue.md(figure_markdown(
            tpl.tsne_figure(feats_r, feats_f, seed=config.seed), alt="t-SNE"))
    context.log.info(f"{generation_id}: {out.height} templates from {config.n_samples} samples; "
                     f"validity {quality['validity']:.3f}")
    return dg.MaterializeResult(metadata=meta)


def _latest_generation(cgwgan_home: CgwganHome) -> tuple[str, dict]:
    store = cgwgan_home.store
    ptrs = [store.pointer("templates", p) for p in store.partitions("templates")]
    ptrs = [p for p in ptrs if p]
    if not ptrs:
        raise FileNotFoundError("templates has no generation run")
    last = max(ptrs, key=lambda p: p["written_at"] + p["version"])
    return last["partition"], last.get("metadata", {})


@dg.asset_check(asset=templates, blocking=True,
                description="Newest generation run: every template is symmetric under all of its space "
                "group's operations (spglib database, independent of the decoder) and the number-density "
                f"overlap with training_templates reaches the configured threshold (default {tpl.MIN_DENSITY_OVERLAP}, "
                f"calibrated on {tpl.GATE_CALIBRATION_SAMPLES:,} samples per run; the metadata gives the overlap that "
                "training rows themselves reach at this run's size).")
def templates_quality(cgwgan_home: CgwganHome) -> dg.AssetCheckResult:
    generation_id, meta = _latest_generation(cgwgan_home)
    out = cgwgan_home.store.read("templates", partition=generation_id)
    threshold = float(meta.get("min_density_overlap", tpl.MIN_DENSITY_OVERLAP))
    sym = tpl.check_symmetry(out)
    exact = float(sym["is_symmetric"].mean()) if sym.height else 0.0
    training = cgwgan_home.store.read("training_templates")
    ref = tpl.training_density(training)
    overlap = tpl.density_overlap(out["number_density_per_a3"].to_numpy(), ref) if out.height else 0.0
    floor = tpl.density_overlap_floor(ref, out.height) if out.height else 0.0
    q = meta.get("quality", {})
    return dg.AssetCheckResult(
        passed=bool(out.height > 0 and exact == 1.0 and overlap >= threshold),
        metadata={"generation_id": generation_id, "n_templates": out.height, "symmetry_exactness": exact,
                  "n_not_symmetric": int((~sym["is_symmetric"]).sum()) if sym.height else 0,
                  "max_deviation_a": float(sym["max_deviation_a"].max() or 0.0) if sym.height else 0.0,
                  "density_overlap": round(overlap, 5), "density_overlap_threshold": threshold,
                  "gate_calibrated_for_samples": tpl.GATE_CALIBRATION_SAMPLES,
                  "n_samples": int(meta.get("n_samples", 0)),
                  "overlap_of_training_itself_at_this_size": round(floor, 4),
                  "validity": q.get("validity", float("nan")), "uniqueness": q.get("uniqueness", float("nan")),
                  "novelty": q.get("novelty", float("nan"))})


contract_checks = build_contract_checks(["wgan_checkpoints", "templates"])
