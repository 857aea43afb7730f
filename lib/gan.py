"""Wyckoff WGAN-GP (paper "Materials and Methods", Figure 2), conditional on the space group.

Vectors follow ``lib.encoding`` (space-group one-hot | 4 x [presence, letter one-hot, x y z] |
lattice). Architecture:

* **Generator** (Figure 2A): input ``z ⊕ c`` where ``z ~ N(0, I)`` (``latent_dim``) and ``c``
  is the condition: the space-group one-hot (230) ⊕ the crystal-system one-hot (7). N = 3 fully
  connected layers with ReLU, then a fully connected output layer with tanh that produces the
  non-space-group part of the vector. The generated vector is ``onehot(sg) ⊕ G(z, c)``.
* **Critic** (Figure 2B): three fully connected layers with LeakyReLU, feeding two sub-critics:
  (1) self-attention whose query, key and value are built by three 1-D convolutions (kernel 1)
  over the hidden vector viewed as ``attn_tokens`` tokens of ``hidden/attn_tokens`` channels,
  with a learned residual gate (SAGAN style); (2) a residual block (two linear layers with a
  skip connection). Their outputs are concatenated (the critic's *latent features*, used for
  the t-SNE) and merged by a linear layer into the score.

**Conditioning, and why it is exact.** The space group of a generated vector is the one-hot
the generator was given, not something it has to learn to output. Unconditional sampling draws
``sg`` from the training marginal (``spacegroup_prior``, the counts of each group in the
training table, stored in the checkpoint), so the space-group distribution is the training
one by construction; conditional sampling draws ``sg`` from that prior restricted to the
requested groups (uniformly over them when none was seen in training). Decoding
(``lib.templates``) additionally restricts the space-group argmax to the requested set, so a
template of another group cannot come out.

Loss (eq. 6) with the gradient penalty of Gulrajani et al.: critic minimises
``D(fake) - D(real) + λ (‖∇D(x̂)‖ - 1)²``; generator minimises ``-D(fake)``.

Checkpoints (like matgl): ``<root>/<checkpoint_id>/`` with ``model.json`` (class, version,
init args, encoding schema, training snapshot id, seed, hyperparameters, space-group prior),
``state.pt`` (generator and critic state dicts) and ``encoding.json``; ``checkpoint_id`` is
``ckpt-`` + a hash of the weights' bytes and the config. ``load_checkpoint(path)`` restores it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lib import wyckoff
from lib.encoding import DEFAULT_SCHEMA, N_SPACEGROUPS, EncodingSchema, spacegroup_onehot
from lib.ids import content_hash

MODEL_VERSION = "wgan-gp-wyckoff-1"
N_SYSTEMS = len(wyckoff.CRYSTAL_SYSTEMS)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GanConfig:
    """Hyperparameters. Defaults: about 12 s an epoch on ~20k rows on one free CPU core, so the 80
    default epochs take about 16 minutes."""

    latent_dim: int = 64
    generator_hidden: int = 256
    generator_layers: int = 3  # N = 3 in the paper
    critic_hidden: int = 256
    attn_tokens: int = 16
    leaky_slope: float = 0.2
    conditioning: Literal["spacegroup"] = "spacegroup"
    epochs: int = 120
    batch_size: int = 128
    n_critic: int = 5
    gp_lambda: float = 10.0
    lr_generator: float = 5e-4
    lr_critic: float = 5e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)
    # Robustness options (benchmarks/bench_generator.py measures each; the architecture is unchanged):
    #: exponential moving average of the generator's weights, updated after every generator step
    #: (0 = off); the checkpoint's generator is the average.
    ema_decay: float = 0.0
    #: every ``eval_every`` epochs (0 = never) sample ``eval_samples`` templates with a fixed seed,
    #: decode them and record the number-density overlap with the training rows and the validity
    #: (history ``eval_*``); needs ``reference_density`` in :func:`train_wgan`.
    eval_every: int = 0
    eval_samples: int = 10_000
    #: "last": the weights after the last epoch; "density_overlap": the evaluated weights with the
    #: highest density overlap; "quality": the highest density overlap minus the total variation of
    #: the ASU-site counts against training (so weights whose densities fit but whose templates
    #: lost sites are not kept); "covered_density": the highest density overlap among the
    #: evaluations whose templates cover the training's ASU-site counts (:func:`covers_site_counts`),
    #: "quality" when none does. All but "last" need ``eval_every``.
    select_by: Literal["last", "density_overlap", "quality", "covered_density"] = "last"
    #: with EMA: evaluate the raw (not averaged) weights too (history ``eval_*_raw``), the plain
    #: recipe's trajectory on the same run; doubles the evaluation cost.
    eval_raw_weights: bool = False
    #: with ``eval_raw_weights``: the raw weights of every evaluation compete in the selection too,
    #: so a checkpoint keeps whichever of the average and the raw weights scored best (history
    #: ``selected_weights``). On a CPU run whose average plateaued below the raw weights' late
    #: evaluations (benchmarks/results/bench_generator_*_cpu.md) it is the raw weights' turn.
    select_raw_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The hyperparameters as JSON; robustness options at their defaults are left out, so the
        checkpoint ids (which hash this) of models trained before the options existed still hold."""
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        for k, default in _OPTIONAL_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GanConfig:
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {', '.join(map(repr, SELECT_BY))}, got {self.select_by!r}")
        if self.select_by != "last" and self.eval_every <= 0:
            raise ValueError(f"select_by={self.select_by!r} needs eval_every > 0")
        if self.select_raw_weights and not (self.eval_raw_weights and self.ema_decay > 0 and self.select_by != "last"):
            raise ValueError("select_raw_weights needs ema_decay > 0, eval_raw_weights and a select_by other than 'last'")


#: The ways :func:`train_wgan` chooses the weights a checkpoint keeps (``GanConfig.select_by``).
SELECT_BY = ("last", "density_overlap", "quality", "covered_density")
#: A site count with at least this share of the training rows is "covered" when the evaluated
#: templates hold at least :data:`SITE_COVERAGE_RATIO` of that share.
SITE_COVERAGE_MIN_SHARE = 0.02
SITE_COVERAGE_RATIO = 0.25


def covers_site_counts(generated: np.ndarray, reference: np.ndarray, *, min_share: float = SITE_COVERAGE_MIN_SHARE,
                       ratio: float = SITE_COVERAGE_RATIO) -> bool:
    """Whether the ASU-site counts of ``generated`` templates cover those of the ``reference``
    (training) rows: every count that holds at least ``min_share`` of the reference holds at least
    ``ratio`` times its reference share among the generated ones. A generator that lost, say, its
    3-site templates cannot fill a ternary formula into any template; density overlap alone does
    not see that."""
    generated, reference = np.asarray(generated), np.asarray(reference)
    if reference.size == 0:
        return True
    if generated.size == 0:
        return False
    counts, n_ref = np.unique(reference, return_counts=True)
    for k, c in zip(counts, n_ref, strict=True):
        share = c / reference.size
        if share >= min_share and np.count_nonzero(generated == k) / generated.size < ratio * share:
            return False
    return True


#: What each evaluation records (history ``eval_<key>``, and ``eval_<key>_raw`` for the raw weights).
_EVAL_KEYS = ("density_overlap", "validity", "n_sites_tv", "sites_covered")


def selection_score(select_by: str, q: dict[str, float]) -> tuple[float, float]:
    """Sort key of one evaluation ``q`` under ``select_by`` (higher is better): for
    "covered_density", covered evaluations by density overlap first, then the rest by quality."""
    quality = q["density_overlap"] - q["n_sites_tv"]
    if select_by == "quality":
        return (0.0, quality)
    if select_by == "covered_density":
        return (1.0, q["density_overlap"]) if q.get("sites_covered", 0.0) else (0.0, quality)
    return (0.0, q["density_overlap"])


#: GanConfig fields added after checkpoints existed, with the values that reproduce the old training.
_OPTIONAL_DEFAULTS: dict[str, Any] = {"ema_decay": 0.0, "eval_every": 0, "eval_samples": 10_000, "select_by": "last",
                                      "eval_raw_weights": False, "select_raw_weights": False}


# ------------------------------------------------------------------------------- modules
def condition_vectors(sg: np.ndarray) -> np.ndarray:
    """(n, 237) float32: space-group one-hot ⊕ crystal-system one-hot."""
    sg = np.asarray(sg, dtype=np.int64)
    bounds = np.array([hi for _, _, hi in wyckoff.CRYSTAL_SYSTEMS])
    system = np.searchsorted(bounds, sg)  # 0..6
    cs = np.zeros((len(sg), N_SYSTEMS), dtype=np.float32)
    cs[np.arange(len(sg)), system] = 1.0
    return np.concatenate([spacegroup_onehot(sg), cs], axis=1)


class Generator(nn.Module):
    """z ⊕ condition -> N x (Linear + ReLU) -> Linear + tanh (the non-space-group part)."""

    def __init__(self, *, latent_dim: int, cond_dim: int, out_dim: int, hidden: int, layers: int = 3):
        super().__init__()
        dims = [latent_dim + cond_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.out = nn.Sequential(nn.Linear(hidden, out_dim), nn.Tanh())

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([z, cond], dim=1)))


class ConvSelfAttention(nn.Module):
    """Self-attention over tokens; query/key/value from three 1-D convolutions (kernel 1)."""

    def __init__(self, channels: int):
        super().__init__()
        qk = max(1, channels // 2)
        self.query = nn.Conv1d(channels, qk, kernel_size=1)
        self.key = nn.Conv1d(channels, qk, kernel_size=1)
        self.value = nn.Conv1d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.scale = 1.0 / math.sqrt(qk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, L)
        q, k, v = self.query(x), self.key(x), self.value(x)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # (B, L, L)
        out = torch.bmm(v, attn.transpose(1, 2))  # (B, C, L)
        return x + self.gamma * out


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, slope: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.fc2(self.act(self.fc1(x))))


class Critic(nn.Module):
    """3 x (Linear + LeakyReLU) -> [conv self-attention | residual block] -> Linear -> score."""

    def __init__(self, *, in_dim: int, hidden: int, attn_tokens: int = 16, slope: float = 0.2):
        super().__init__()
        if hidden % attn_tokens:
            raise ValueError(f"critic_hidden {hidden} must be divisible by attn_tokens {attn_tokens}")
        self.tokens = attn_tokens
        self.channels = hidden // attn_tokens
        self.trunk = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.LeakyReLU(slope),
            nn.Linear(hidden, hidden), nn.LeakyReLU(slope),
            nn.Linear(hidden, hidden), nn.LeakyReLU(slope),
        )
        self.attention = ConvSelfAttention(self.channels)
        self.residual = ResidualBlock(hidden, slope)
        self.merge = nn.Linear(2 * hidden, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Latent features (B, 2*hidden): the two sub-critics' outputs, concatenated."""
        h = self.trunk(x)
        a = self.attention(h.view(-1, self.channels, self.tokens)).reshape(h.shape[0], -1)
        r = self.residual(h)
        return torch.cat([a, r], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.features(x)).squeeze(1)


# ------------------------------------------------------------------------------- model
def init_args(config: GanConfig, schema: EncodingSchema) -> dict[str, Any]:
    """Constructor arguments of the generator and critic for a config and schema."""
    return {
        "generator": {"latent_dim": config.latent_dim, "cond_dim": N_SPACEGROUPS + N_SYSTEMS,
                      "out_dim": schema.dim - schema.n_spacegroups,
                      "hidden": config.generator_hidden, "layers": config.generator_layers},
        "critic": {"in_dim": schema.dim, "hidden": config.critic_hidden,
                   "attn_tokens": config.attn_tokens, "slope": config.leaky_slope},
    }


@dataclass
class WganModel:
    """A generator + critic with everything needed to sample, decode and reproduce them."""

    generator: Generator
    critic: Critic
    config: GanConfig
    schema: EncodingSchema
    spacegroup_prior: np.ndarray  # (230,) training counts
    seed: int
    training_snapshot_id: str = ""
    history: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_id: str = ""
    device: str = "cpu"
    parent_checkpoint_id: str = ""  # set when training continued from another checkpoint

    @property
    def cond_dim(self) -> int:
        return N_SPACEGROUPS + N_SYSTEMS

    def init_args(self) -> dict[str, Any]:
        return init_args(self.config, self.schema)

    def model_json(self) -> dict[str, Any]:
        return {
            "class": "lib.gan.WganModel",
            "version": MODEL_VERSION,
            "init_args": self.init_args(),
            "hyperparameters": self.config.to_dict(),
            "encoding_schema": self.schema.to_dict(),
            "encoding_version": self.schema.version,
            "training_snapshot_id": self.training_snapshot_id,
            "seed": self.seed,
            **({"parent_checkpoint_id": self.parent_checkpoint_id} if self.parent_checkpoint_id else {}),
            "spacegroup_prior": [int(v) for v in self.spacegroup_prior],
            "extra": self.extra,
        }

    def compute_checkpoint_id(self) -> str:
        h = hashlib.sha256()
        for prefix, module in (("g.", self.generator), ("c.", self.critic)):
            for k, v in sorted(module.state_dict().items()):
                h.update((prefix + k).encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        cfg = {k: v for k, v in self.model_json().items() if k != "extra"}
        return content_hash({"weights_sha256": h.hexdigest(), "config": cfg}, prefix="ckpt-")


def build_model(
    *, config: GanConfig, schema: EncodingSchema = DEFAULT_SCHEMA, spacegroup_prior: np.ndarray,
    seed: int, device: str = "cpu", training_snapshot_id: str = "",
) -> WganModel:
    """A freshly initialised model; weights depend only on ``seed``."""
    torch.manual_seed(seed)
    args = init_args(config, schema)
    gen = Generator(**args["generator"]).to(device)
    crit = Critic(**args["critic"]).to(device)
    return WganModel(gen, crit, config, schema, np.asarray(spacegroup_prior, dtype=np.int64), seed,
                     training_snapshot_id, device=device)


# ------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingResult:
    model: WganModel
    history: dict[str, list[float]]  # per epoch: critic_loss, generator_loss, gradient_penalty, wasserstein
    wall_time_s: float
    device: str
    #: the generator's own weights after the last epoch (what the plain recipe keeps), before EMA
    #: or selection replaced them in ``model``
    last_raw_state: dict[str, torch.Tensor] | None = None


def _gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor,
                      gen: torch.Generator) -> torch.Tensor:
    alpha = torch.rand(real.shape[0], 1, generator=gen, device=real.device)
    mix = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score = critic(mix)
    (grad,) = torch.autograd.grad(score.sum(), mix, create_graph=True)
    return ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


def train_wgan(
    x: np.ndarray,
    *,
    config: GanConfig = GanConfig(),
    schema: EncodingSchema = DEFAULT_SCHEMA,
    seed: int = 0,
    device: str | None = None,
    training_snapshot_id: str = "",
    log_every: int = 0,
    log: Any = None,
    cpu_threads: int | None = 1,
    init_from: WganModel | None = None,
    reference_density: np.ndarray | None = None,
) -> TrainingResult:
    """Train a WGAN-GP on encoded templates ``x`` (n, dim). Seeded; data order from the seed.

    Returns the model and per-epoch curves (critic loss, generator loss, gradient penalty,
    Wasserstein estimate E[D(real)] - E[D(fake)]).

    ``cpu_threads``: torch intra-op threads while training on CPU (restored afterwards). The
    networks are small, so one thread is about as fast as two and ten times cheaper in CPU
    time on a busy machine (no OpenMP spin-waiting); None keeps torch's setting.
    ``init_from``: continue from a model's weights (same config and schema; fresh optimisers);
    its checkpoint id is recorded as ``parent_checkpoint_id``.
    ``reference_density``: number densities of the training templates (atoms/Å^3,
    ``lib.templates.training_density``), needed when ``config.eval_every`` > 0.
    """
    if config.eval_every > 0 and reference_density is None:
        raise ValueError("config.eval_every > 0 needs reference_density (the training rows' number densities)")
    previous_threads = torch.get_num_threads()
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        return _train(x, config=config, schema=schema, seed=seed, device=device,
                      training_snapshot_id=training_snapshot_id, log_every=log_every, log=log,
                      init_from=init_from, reference_density=reference_density)
    finally:
        torch.set_num_threads(previous_threads)


def _train(x: np.ndarray, *, config: GanConfig, schema: EncodingSchema, seed: int, device: str | None,
           training_snapshot_id: str, log_every: int, log: Any,
           init_from: WganModel | None = None, reference_density: np.ndarray | None = None) -> TrainingResult:
    device = device or default_device()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != schema.dim or x.shape[0] < 2:
        raise ValueError(f"training vectors must be (n >= 2, {schema.dim}), got {x.shape}")
    n_sg = schema.n_spacegroups
    sg = np.argmax(x[:, :n_sg], axis=1) + 1
    prior = np.bincount(sg, minlength=N_SPACEGROUPS + 1)[1:]
    model = build_model(config=config, schema=schema, spacegroup_prior=prior, seed=seed, device=device,
                        training_snapshot_id=training_snapshot_id)
    gen_net, crit = model.generator, model.critic
    if init_from is not None:
        if init_args(init_from.config, init_from.schema) != init_args(config, schema):
            raise ValueError("init_from has a different architecture or encoding schema")
        gen_net.load_state_dict(init_from.generator.state_dict())
        crit.load_state_dict(init_from.critic.state_dict())
        model.parent_checkpoint_id = init_from.checkpoint_id or init_from.compute_checkpoint_id()
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=config.lr_generator, betas=config.adam_betas)
    opt_c = torch.optim.Adam(crit.parameters(), lr=config.lr_critic, betas=config.adam_betas)
    rng = torch.Generator(device="cpu").manual_seed(seed)
    dev_rng = torch.Generator(device=device).manual_seed(seed + 1)
    real_all = torch.from_numpy(x).to(device)
    cond_all = torch.from_numpy(condition_vectors(sg)).to(device)
    n = x.shape[0]
    bs = min(config.batch_size, n)
    history: dict[str, list[float]] = {k: [] for k in
                                       ("critic_loss", "generator_loss", "gradient_penalty", "wasserstein")}
    ema = _Ema(gen_net, config.ema_decay) if config.ema_decay > 0 else None
    evals: dict[str, list[float]] = {"eval_epoch": [], **{f"eval_{k}": [] for k in _EVAL_KEYS}}
    reference_sites = _present_sites(x, schema)
    eval_raw = ema is not None and config.eval_raw_weights
    if eval_raw:  # the raw (not averaged) weights too: the trajectory of the plain training
        evals.update({f"eval_{k}_raw": [] for k in _EVAL_KEYS})
    best: tuple[tuple[float, float], int, dict[str, torch.Tensor], str] | None = None
    t0 = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        perm = torch.randperm(n, generator=rng).to(device)
        # summed on the device and read once an epoch (a float() per step would wait for the GPU)
        sums: dict[str, Any] = {k: torch.zeros((), device=device) for k in history}
        counts = {"c": 0, "g": 0}
        for start in range(0, n - bs + 1, bs):
            idx = perm[start:start + bs]
            real = real_all[idx]
            cond = cond_all[idx]
            z = torch.randn(bs, config.latent_dim, generator=dev_rng, device=device)
            with torch.no_grad():
                fake = torch.cat([cond[:, :n_sg], gen_net(z, cond)], dim=1)
            d_real = crit(real).mean()
            d_fake = crit(fake).mean()
            gp = _gradient_penalty(crit, real, fake, dev_rng)
            loss_c = d_fake - d_real + config.gp_lambda * gp
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            opt_c.step()
            sums["critic_loss"] += loss_c.detach()
            sums["gradient_penalty"] += gp.detach()
            sums["wasserstein"] += (d_real - d_fake).detach()
            counts["c"] += 1
            step += 1
            if step % config.n_critic == 0:
                z = torch.randn(bs, config.latent_dim, generator=dev_rng, device=device)
                fake = torch.cat([cond[:, :n_sg], gen_net(z, cond)], dim=1)
                loss_g = -crit(fake).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                if ema is not None:
                    ema.update(gen_net)
                sums["generator_loss"] += loss_g.detach()
                counts["g"] += 1
        for k in history:
            c = counts["g"] if k == "generator_loss" else counts["c"]
            history[k].append(float(sums[k]) / max(c, 1))
        evaluated = ""
        if config.eval_every > 0 and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            weights = ema.state() if ema is not None else _state_copy(gen_net)
            q = _evaluate(model, weights, reference_density, reference_sites, n=config.eval_samples,
                          seed=seed + 1_000_003)
            evals["eval_epoch"].append(epoch + 1)
            for k in _EVAL_KEYS:
                evals[f"eval_{k}"].append(q[k])
            evaluated = (f" overlap={q['density_overlap']:.3f} validity={q['validity']:.3f} "
                         f"sites_tv={q['n_sites_tv']:.3f}")
            if eval_raw:
                raw = _evaluate(model, _state_copy(gen_net), reference_density, reference_sites,
                                n=config.eval_samples, seed=seed + 1_000_003)
                for k in _EVAL_KEYS:
                    evals[f"eval_{k}_raw"].append(raw[k])
                evaluated += f" (raw weights {raw['density_overlap']:.3f})"
            score = selection_score(config.select_by, q)
            if best is None or score > best[0]:
                best = (score, epoch + 1, weights, "ema" if ema is not None else "raw")
            if eval_raw and config.select_raw_weights:
                raw_score = selection_score(config.select_by, raw)
                if raw_score > best[0]:
                    best = (raw_score, epoch + 1, _state_copy(gen_net), "raw")
        if log is not None and log_every and (epoch + 1) % log_every == 0:
            log(f"epoch {epoch + 1}/{config.epochs}: W={history['wasserstein'][-1]:.4f} "
                f"gp={history['gradient_penalty'][-1]:.4f} t={time.perf_counter() - t0:.0f}s{evaluated}")
    last_raw = _state_copy(gen_net)
    selected_epoch = config.epochs
    selected_weights = "ema" if ema is not None else "raw"
    if config.select_by != "last" and best is not None:
        gen_net.load_state_dict(best[2])
        selected_epoch, selected_weights = best[1], best[3]
    elif ema is not None:
        gen_net.load_state_dict(ema.state())
    wall = time.perf_counter() - t0
    if config.eval_every > 0:
        history.update({k: [float(v) for v in vals] for k, vals in evals.items()})
    model.history = history
    model.extra = {"wall_time_s": round(wall, 3), "device": device, "n_train": n, "epochs_run": config.epochs,
                   "selected_epoch": selected_epoch, "selected_weights": selected_weights}
    model.checkpoint_id = model.compute_checkpoint_id()
    return TrainingResult(model=model, history=history, wall_time_s=wall, device=device, last_raw_state=last_raw)


#: Fewer generator steps than this and :func:`auto_ema_decay` turns the average off.
MIN_EMA_STEPS = 1000


def auto_ema_decay(n_rows: int, *, epochs: int, batch_size: int, n_critic: int, horizon: float = 0.075) -> float:
    """An EMA decay whose horizon 1/(1 - decay) is ``horizon`` of the run's generator steps:
    0.995 for the 14,113-row MP table at the paper's 120 epochs, batch 128, 5 critic steps (2,640
    generator steps). Runs of fewer than ``MIN_EMA_STEPS`` generator steps get 0 (no average):
    their weights still move fast, and an average of them is not a generator that was ever
    trained (30 epochs on 214 demo rows, ~100 steps: the averaged weights produced no 3-site
    template, the raw ones 31 % against 36 % in training)."""
    bs = min(batch_size, n_rows)
    steps = epochs * ((n_rows - bs) // bs + 1) // max(n_critic, 1)
    if steps < MIN_EMA_STEPS:
        return 0.0
    return round(1.0 - 1.0 / (horizon * steps), 6)


class _Ema:
    """Exponential moving average of a module's parameters (buffers copied as they are)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [p.detach().clone() for p in module.parameters()]
        self.names = [k for k, _ in module.named_parameters()]
        self.module = module

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        torch._foreach_lerp_(self.params, [p.detach() for p in module.parameters()], 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        state = _state_copy(self.module)
        state.update({k: v.clone() for k, v in zip(self.names, self.params, strict=True)})
        return state


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _present_sites(x: np.ndarray, schema: EncodingSchema) -> np.ndarray:
    """ASU sites per encoded vector (presence > 0)."""
    starts = [schema.site_slice(j).start for j in range(schema.max_sites)]
    return (np.asarray(x)[:, starts] > 0).sum(axis=1)


def _evaluate(model: WganModel, weights: dict[str, torch.Tensor], reference_density: np.ndarray | None,
              reference_sites: np.ndarray | None = None, *, n: int, seed: int) -> dict[str, float]:
    """Density overlap, validity, ASU-site-count total variation and site-count coverage
    (:func:`covers_site_counts`, 1.0 / 0.0) of ``n`` templates sampled with
    generator ``weights`` (the live generator's weights are restored afterwards)."""
    from lib.templates import decode_templates, density_overlap, total_variation

    gen = model.generator
    live = _state_copy(gen)
    gen.load_state_dict(weights)
    try:
        x = sample_vectors(model, n, seed=seed)
    finally:
        gen.load_state_dict(live)
        gen.train()
    res = decode_templates(x, checkpoint_id="eval", schema=model.schema)
    dens = res.templates["number_density_per_a3"].to_numpy()
    overlap = density_overlap(dens, reference_density) if len(dens) and reference_density is not None else 0.0
    sites = res.templates["wyckoff_letters"].list.len().to_numpy()
    sites_tv = total_variation(sites, reference_sites) if len(sites) and reference_sites is not None else 1.0
    covered = covers_site_counts(sites, reference_sites) if reference_sites is not None else bool(len(sites))
    return {"density_overlap": float(overlap), "validity": float(res.validity), "n_sites_tv": float(sites_tv),
            "sites_covered": float(covered)}


# ------------------------------------------------------------------------------- sampling
def condition_spacegroups(
    *, space_groups: Any | None = None, crystal_system: str | None = None
) -> np.ndarray | None:
    """The allowed space groups of a request (None = all). ``crystal_system`` and
    ``space_groups`` intersect when both are given."""
    allowed: set[int] | None = None
    if space_groups is not None:
        allowed = {int(s) for s in space_groups}
        bad = sorted(s for s in allowed if not 1 <= s <= N_SPACEGROUPS)
        if bad or not allowed:
            raise ValueError(f"space groups must be a non-empty subset of 1..230, got {sorted(allowed)}")
    if crystal_system:
        sys_groups = set(wyckoff.space_groups_of(crystal_system))
        allowed = sys_groups if allowed is None else allowed & sys_groups
        if not allowed:
            raise ValueError(f"no requested space group belongs to the {crystal_system} system")
    return None if allowed is None else np.array(sorted(allowed), dtype=np.int64)


def sample_spacegroups(model: WganModel, n: int, *, seed: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Space groups for ``n`` samples: the training prior, restricted to ``allowed`` if given."""
    p = model.spacegroup_prior.astype(np.float64).copy()
    if allowed is not None:
        mask = np.zeros(N_SPACEGROUPS, dtype=bool)
        mask[np.asarray(allowed) - 1] = True
        p[~mask] = 0.0
        if p.sum() == 0:  # none of the requested groups was seen in training: uniform over them
            p[mask] = 1.0
    if p.sum() == 0:
        raise ValueError("model has an empty space-group prior")
    rng = np.random.default_rng(seed)
    return rng.choice(N_SPACEGROUPS, size=n, p=p / p.sum()) + 1


@torch.no_grad()
def sample_vectors(
    model: WganModel,
    n: int,
    *,
    seed: int,
    space_groups: Any | None = None,
    crystal_system: str | None = None,
    batch_size: int = 16384,
) -> np.ndarray:
    """``n`` generated vectors (n, dim) float32. Seeded; conditioning as in the module docstring."""
    allowed = condition_spacegroups(space_groups=space_groups, crystal_system=crystal_system)
    sg = sample_spacegroups(model, n, seed=seed, allowed=allowed)
    cond = condition_vectors(sg)
    gen = model.generator.eval()
    dev = next(gen.parameters()).device
    rng = torch.Generator(device="cpu").manual_seed(seed)
    out = np.empty((n, model.schema.dim), dtype=np.float32)
    n_sg = model.schema.n_spacegroups
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        z = torch.randn(e - s, model.config.latent_dim, generator=rng).to(dev)
        c = torch.from_numpy(cond[s:e]).to(dev)
        out[s:e, :n_sg] = cond[s:e, :n_sg]
        out[s:e, n_sg:] = gen(z, c).cpu().numpy()
    return out


@torch.no_grad()
def critic_features(model: WganModel, x: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
    """The critic's latent features (n, 2*critic_hidden) of vectors ``x`` (for t-SNE)."""
    crit = model.critic.eval()
    dev = next(crit.parameters()).device
    outs = []
    for s in range(0, len(x), batch_size):
        outs.append(crit.features(torch.from_numpy(np.asarray(x[s:s + batch_size], np.float32)).to(dev)).cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 2 * model.config.critic_hidden), np.float32)


# ------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: WganModel, root: str | Path) -> Path:
    """Write ``<root>/<checkpoint_id>/{model.json,state.pt,encoding.json}``; returns the folder.

    The folder is written under a temporary name and renamed, so a crash leaves no half
    checkpoint; an existing folder of the same id (same weights and config) is kept.
    """
    ckpt_id = model.checkpoint_id or model.compute_checkpoint_id()
    model.checkpoint_id = ckpt_id
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / ckpt_id
    if (final / "model.json").exists():
        return final
    tmp = root / f".{ckpt_id}.tmp-{time.time_ns()}"
    tmp.mkdir()
    meta = model.model_json()
    meta["checkpoint_id"] = ckpt_id
    meta["history"] = model.history
    (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    model.schema.save(tmp / "encoding.json")
    torch.save({"generator": {k: v.cpu() for k, v in model.generator.state_dict().items()},
                "critic": {k: v.cpu() for k, v in model.critic.state_dict().items()}}, tmp / "state.pt")
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "model.json").exists():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, device: str | None = None) -> WganModel:
    """Restore a model from a checkpoint folder; verifies its content hash."""
    p = Path(path)
    mj = p / "model.json"
    if not mj.exists():
        raise FileNotFoundError(f"{p} is not a WGAN checkpoint folder (no model.json)")
    meta = json.loads(mj.read_text())
    if meta.get("class") != "lib.gan.WganModel":
        raise ValueError(f"{mj}: class {meta.get('class')!r} is not lib.gan.WganModel")
    device = device or default_device()
    config = GanConfig.from_dict(meta["hyperparameters"])
    schema = EncodingSchema.from_dict(meta["encoding_schema"])
    model = build_model(config=config, schema=schema, spacegroup_prior=np.array(meta["spacegroup_prior"]),
                        seed=int(meta["seed"]), device=device,
                        training_snapshot_id=meta.get("training_snapshot_id", ""))
    state = torch.load(p / "state.pt", map_location=device, weights_only=True)
    model.generator.load_state_dict(state["generator"])
    model.critic.load_state_dict(state["critic"])
    model.history = meta.get("history", {})
    model.extra = meta.get("extra", {})
    model.parent_checkpoint_id = meta.get("parent_checkpoint_id", "")
    model.checkpoint_id = model.compute_checkpoint_id()
    if meta.get("checkpoint_id") and meta["checkpoint_id"] != model.checkpoint_id:
        raise ValueError(f"{p}: weights hash to {model.checkpoint_id}, model.json says {meta['checkpoint_id']}")
    return model
