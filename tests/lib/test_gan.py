"""lib.gan: architecture, gradient penalty, seeded training, checkpoints, conditioning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import gan
from lib.encoding import DEFAULT_SCHEMA
from lib.templates import TemplateFilters, check_symmetry, decode_templates

TINY = gan.GanConfig(latent_dim=8, generator_hidden=32, critic_hidden=32, attn_tokens=4, epochs=2, batch_size=32,
                     n_critic=2)


def _toy_vectors(n: int = 96, seed: int = 0) -> np.ndarray:
    """Encoded-looking vectors: one space group one-hot, one present site, scaled lattice."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, DEFAULT_SCHEMA.dim), np.float32)
    sg = rng.choice([191, 221, 225], size=n)
    x[np.arange(n), sg - 1] = 1.0
    s0 = DEFAULT_SCHEMA.site_slice(0).start
    x[:, s0] = 1.0
    x[:, s0 + 1] = 1.0  # letter 'a'
    lo = DEFAULT_SCHEMA.lattice_offset
    x[:, lo:lo + 3] = rng.uniform(-0.6, -0.2, size=(n, 3))
    return x


def test_shapes_and_ranges() -> None:
    m = gan.build_model(config=TINY, spacegroup_prior=np.ones(230), seed=0)
    z = torch.randn(5, TINY.latent_dim)
    c = torch.from_numpy(gan.condition_vectors(np.array([1, 2, 75, 143, 168, 195, 230])[:5]))
    out = m.generator(z, c)
    assert out.shape == (5, DEFAULT_SCHEMA.dim - 230)
    assert float(out.detach().abs().max()) < 1.0
    x = torch.from_numpy(_toy_vectors(7))
    assert m.critic(x).shape == (7,)
    assert m.critic.features(x).shape == (7, 2 * TINY.critic_hidden)
    cv = gan.condition_vectors(np.array([1, 3, 16, 75, 143, 168, 195]))
    assert cv.shape == (7, 237)
    np.testing.assert_array_equal(np.argmax(cv[:, 230:], axis=1), np.arange(7))  # crystal systems


def test_gradient_penalty_known_value() -> None:
    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0]]))  # |w| = 5 -> gp = (5 - 1)^2 = 16

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x).squeeze(1)

    gp = gan._gradient_penalty(Wrap(), torch.randn(8, 4), torch.randn(8, 4), torch.Generator().manual_seed(0))
    assert float(gp.detach()) == pytest.approx(16.0, rel=1e-6)


def test_training_is_seeded_and_checkpoints_round_trip(tmp_path: Path) -> None:
    x = _toy_vectors()
    r1 = gan.train_wgan(x, config=TINY, seed=7, device="cpu", training_snapshot_id="snap-test")
    r2 = gan.train_wgan(x, config=TINY, seed=7, device="cpu", training_snapshot_id="snap-test")
    r3 = gan.train_wgan(x, config=TINY, seed=8, device="cpu", training_snapshot_id="snap-test")
    assert r1.model.checkpoint_id.startswith("ckpt-")
    assert r1.model.checkpoint_id == r2.model.checkpoint_id != r3.model.checkpoint_id
    assert set(r1.history) == {"critic_loss", "generator_loss", "gradient_penalty", "wasserstein"}
    assert all(len(v) == TINY.epochs and np.isfinite(v).all() for v in r1.history.values())
    path = gan.save_checkpoint(r1.model, tmp_path)
    assert path.name == r1.model.checkpoint_id
    assert {p.name for p in path.iterdir()} == {"model.json", "state.pt", "encoding.json"}
    meta = json.loads((path / "model.json").read_text())
    assert meta["training_snapshot_id"] == "snap-test" and meta["seed"] == 7
    assert meta["encoding_version"] == DEFAULT_SCHEMA.version
    loaded = gan.load_checkpoint(path, device="cpu")
    assert loaded.checkpoint_id == r1.model.checkpoint_id
    np.testing.assert_array_equal(gan.sample_vectors(loaded, 50, seed=3), gan.sample_vectors(r1.model, 50, seed=3))
    # tampered weights no longer match the id in model.json
    state = torch.load(path / "state.pt", weights_only=True)
    next(iter(state["generator"].values())).add_(1.0)
    torch.save(state, path / "state.pt")
    with pytest.raises(ValueError, match="hash"):
        gan.load_checkpoint(path, device="cpu")
    with pytest.raises(FileNotFoundError):
        gan.load_checkpoint(tmp_path / "nope")


def test_conditioning_yields_only_requested_groups() -> None:
    prior = np.zeros(230, dtype=np.int64)
    prior[[190, 220, 224]] = [10, 20, 30]  # groups 191, 221, 225 seen in training
    m = gan.build_model(config=TINY, spacegroup_prior=prior, seed=0)
    x = gan.sample_vectors(m, 400, seed=1)
    assert set(np.argmax(x[:, :230], axis=1) + 1) <= {191, 221, 225}
    for request, expected in (({"space_groups": [221]}, {221}),
                              ({"space_groups": [12, 14]}, {12, 14}),  # unseen in training: uniform
                              ({"crystal_system": "hexagonal"}, {191}),
                              ({"crystal_system": "cubic", "space_groups": [221, 2]}, {221})):
        allowed = gan.condition_spacegroups(**request)
        x = gan.sample_vectors(m, 300, seed=2, space_groups=allowed)
        rng = np.random.default_rng(0)
        x[:, 230:] = rng.uniform(-1, 1, size=(300, x.shape[1] - 230))  # any site/lattice output
        res = decode_templates(x, checkpoint_id=m.compute_checkpoint_id(), allowed_spacegroups=allowed,
                               filters=TemplateFilters(min_distance_a=0.0, min_density_per_a3=0,
                                                       max_density_per_a3=1e9, max_atoms=10_000))
        got = set(res.templates["spacegroup_number"].unique().to_list())
        assert got and got <= expected, (request, got)
        assert check_symmetry(res.templates)["is_symmetric"].all()
    with pytest.raises(ValueError):
        gan.condition_spacegroups(crystal_system="cubic", space_groups=[2])
    with pytest.raises(ValueError):
        gan.condition_spacegroups(space_groups=[231])


def test_ema_is_the_exponential_average_of_the_weights() -> None:
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
    ema = gan._Ema(lin, 0.9)
    for value in ([[3.0, 0.0]], [[0.0, 4.0]]):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(value))
        ema.update(lin)
    # 0.9^2 w0 + 0.9 * 0.1 w1 + 0.1 w2
    expected = 0.81 * np.array([1.0, -2.0]) + 0.09 * np.array([3.0, 0.0]) + 0.1 * np.array([0.0, 4.0])
    np.testing.assert_allclose(ema.state()["weight"].numpy()[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(lin.weight.detach().numpy()[0], [0.0, 4.0])  # the live weights are untouched


def test_selection_keeps_the_evaluated_weights_with_the_best_density_overlap() -> None:
    x = _toy_vectors(256)
    ref = decode_templates(x, checkpoint_id="toy").templates["number_density_per_a3"].to_numpy()
    assert ref.size > 100
    for select_by in ("density_overlap", "quality", "covered_density"):
        cfg = gan.GanConfig(**{**TINY.to_dict(), "adam_betas": TINY.adam_betas, "epochs": 4, "eval_every": 1,
                               "eval_samples": 400, "select_by": select_by, "ema_decay": 0.5})
        res = gan.train_wgan(x, config=cfg, seed=3, device="cpu", reference_density=ref)
        h = res.history
        assert h["eval_epoch"] == [1.0, 2.0, 3.0, 4.0]
        assert len(h["eval_density_overlap"]) == len(h["eval_validity"]) == len(h["eval_n_sites_tv"]) == 4
        assert set(h["eval_sites_covered"]) <= {0.0, 1.0}
        overlap, quality = np.array(h["eval_density_overlap"]), np.array(h["eval_density_overlap"]) - np.array(
            h["eval_n_sites_tv"])
        if select_by == "density_overlap":
            best = int(np.argmax(overlap))  # first maximum
        elif select_by == "quality":
            best = int(np.argmax(quality))
        else:
            covered = np.array(h["eval_sites_covered"]) == 1.0
            best = int(np.argmax(np.where(covered, overlap, -np.inf))) if covered.any() else int(np.argmax(quality))
        assert res.model.extra["selected_epoch"] == best + 1
        # the kept weights reproduce the recorded evaluation exactly (same samples, same decoding)
        again = gan._evaluate(res.model, gan._state_copy(res.model.generator), ref, gan._present_sites(x, DEFAULT_SCHEMA),
                              n=400, seed=3 + 1_000_003)
        assert again["density_overlap"] == h["eval_density_overlap"][best]
        assert again["validity"] == h["eval_validity"][best]
        assert again["n_sites_tv"] == h["eval_n_sites_tv"][best]
        assert again["sites_covered"] == h["eval_sites_covered"][best]


def test_raw_weights_compete_in_the_selection_when_asked() -> None:
    """select_raw_weights: the kept weights are the best of every evaluation's average and raw
    weights, and they reproduce the evaluation that chose them."""
    x = _toy_vectors(256)
    ref = decode_templates(x, checkpoint_id="toy").templates["number_density_per_a3"].to_numpy()
    cfg = gan.GanConfig(**{**TINY.to_dict(), "adam_betas": TINY.adam_betas, "epochs": 4, "eval_every": 1,
                           "eval_samples": 400, "select_by": "density_overlap", "ema_decay": 0.9,
                           "eval_raw_weights": True, "select_raw_weights": True})
    res = gan.train_wgan(x, config=cfg, seed=5, device="cpu", reference_density=ref)
    h = res.history
    ema, raw = np.array(h["eval_density_overlap"]), np.array(h["eval_density_overlap_raw"])
    best_raw, best_ema = int(np.argmax(raw)), int(np.argmax(ema))
    weights = "raw" if raw[best_raw] > ema[best_ema] else "ema"
    best = best_raw if weights == "raw" else best_ema
    assert res.model.extra["selected_weights"] == weights
    assert res.model.extra["selected_epoch"] == best + 1
    again = gan._evaluate(res.model, gan._state_copy(res.model.generator), ref, gan._present_sites(x, DEFAULT_SCHEMA),
                          n=400, seed=5 + 1_000_003)
    assert again["density_overlap"] == max(raw[best_raw], ema[best_ema])
    with pytest.raises(ValueError, match="select_raw_weights needs"):
        gan.GanConfig(eval_every=1, select_by="density_overlap", ema_decay=0.9, select_raw_weights=True)


def test_site_count_coverage() -> None:
    ref = np.array([1] * 30 + [2] * 40 + [3] * 29 + [4] * 1)  # 4 sites: 1 % of training, below min_share
    assert gan.covers_site_counts(np.array([1] * 30 + [2] * 40 + [3] * 30), ref)
    assert gan.covers_site_counts(np.array([1] * 40 + [2] * 52 + [3] * 8), ref)  # 8 % >= 0.25 x 29 %
    assert not gan.covers_site_counts(np.array([1] * 40 + [2] * 54 + [3] * 6), ref)  # 6 % < 7.25 %
    assert not gan.covers_site_counts(np.array([1] * 50 + [2] * 50), ref)  # lost every 3-site template
    assert not gan.covers_site_counts(np.array([], dtype=int), ref)
    assert gan.covers_site_counts(np.array([2]), np.array([], dtype=int))
    key = gan.selection_score
    covered = {"density_overlap": 0.80, "n_sites_tv": 0.05, "sites_covered": 1.0}
    lost = {"density_overlap": 0.95, "n_sites_tv": 0.30, "sites_covered": 0.0}
    assert key("covered_density", covered) > key("covered_density", lost)
    assert key("density_overlap", lost) > key("density_overlap", covered)
    assert key("quality", covered) > key("quality", lost)  # 0.75 > 0.65


def test_robustness_options_are_validated() -> None:
    with pytest.raises(ValueError, match="eval_every"):
        gan.GanConfig(select_by="density_overlap")
    with pytest.raises(ValueError, match="ema_decay"):
        gan.GanConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="reference_density"):
        gan.train_wgan(_toy_vectors(), config=gan.GanConfig(**{**TINY.to_dict(), "adam_betas": TINY.adam_betas,
                                                              "eval_every": 1}), device="cpu")


def test_auto_ema_decay_spans_a_fixed_share_of_the_generator_steps() -> None:
    # the MP table at the paper's settings: 120 epochs x 110 critic steps / 5 = 2,640 generator steps
    assert gan.auto_ema_decay(14_113, epochs=120, batch_size=128, n_critic=5) == round(1 - 1 / (0.075 * 2640), 6)
    assert gan.auto_ema_decay(60, epochs=12, batch_size=32, n_critic=5) == 0.0  # 2 steps: nothing to average
    assert gan.auto_ema_decay(14_113, epochs=40, batch_size=128, n_critic=5) == 0.0  # 880 < MIN_EMA_STEPS
