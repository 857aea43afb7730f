"""Size profiles of ``cgwgan main`` (``--profile``): data, one entry per profile, naming the
:class:`orchestration.jobs.MainSettings` fields it sets. The individual size options of
``cgwgan main`` override a profile's value.

The costs in :data:`PROFILE_COSTS` are estimates from measured rates, not guesses; the sources:

* ``benchmarks/results/bench_mp.md``: the whole ``mp`` group on the full MP CSV (27,248 rows),
  1,524 s on 2 cores at load 14.5; the computation alone (parse + ``mp_symmetry``, 2 processes)
  49.5 s on 2 quiet cores (``bench_mp_quiet.md``).
* training: the WGAN at the asset's default size (batch 128, hidden 256, 5 critic steps) on
  14,111 rows, measured at :data:`TRAINING_S_PER_EPOCH_14K` s per epoch (below).
* ``benchmarks/results/bench_templates.md``: 2,441 valid templates per second.
* ``benchmarks/results/bench_infill.md`` / ``bench_dedup.md``: 120,000 templates -> 1,348,713
  candidates (11.2 per template) in 7 s; their dedup 155 s on 2 quiet cores (1,722 s at load 6),
  1,025,037 unique (76 %).
* ``benchmarks/results/bench_surrogates.md`` (2 CPU cores) and ``bench_surrogates_gpu.md``
  (H200): M3GNet batched energies 50.0 / 1,451 structures/s, ``relax_many`` 27.0 / 546
  relaxations/min, phonon screens 119 / 10,956 per hour; CHGNet (CPU) 20.7 structures/s,
  22.2 relaxations/min, 36 phonon screens per hour.
"""

from __future__ import annotations

from typing import Any

DEFAULT_PROFILE = "demo"

#: Measured: seconds per epoch of the default WGAN on 14,111 training rows (MP's training-table size
#: in bench_mp.md), one torch thread, 2 CPU cores, load 0.7 (3 epochs: 11.2 s).
TRAINING_S_PER_EPOCH_14K = 3.7

#: ``profile -> {MainSettings field: value}``; a field not named keeps MainSettings' default.
PROFILES: dict[str, dict[str, Any]] = {
    # The embedded prototypes, a few minutes on a laptop (MainSettings' own defaults).
    "demo": {},
    # MP data, full training, tens of thousands of candidates (5,000 templates -> ~56,000
    # candidates, ~43,000 unique), all of them pre-screened with a volume scan (a known phase
    # generated at the wrong volume is otherwise never relaxed: benchmarks/results/rediscovery*.md).
    "standard": {"gan_epochs": 500, "n_templates": 5000, "min_density_overlap": 0.93, "max_asu_sites": 4,
                 "prescreen_limit": 0, "volume_scan": "0.9,1.0,1.1", "relax_top_k": 500, "phonon_top_n": 20},
    # The paper's Ba-Ru-O campaign: 120,000 templates of at most four Wyckoff sites, every
    # candidate pre-screened, the best 5,000 relaxed and phonon-screened.
    "paper": {"gan_epochs": 500, "n_templates": 120_000, "min_density_overlap": 0.93, "max_asu_sites": 4,
              "prescreen_limit": 0, "relax_top_k": 5000, "phonon_top_n": 5000},
}

#: What a profile costs, from the measured rates above (one line each, for --help and the README).
PROFILE_COSTS: dict[str, str] = {
    "demo": "embedded prototypes + known phases; 3 min 17 s on 2 quiet cores (set-up not counted)",
    "standard": "MP data (CGWGAN_MP_SOURCE); on 2 CPU cores about 2.2 h with M3GNet, projected from "
                "measured stage rates (MP group 25 min, training 31 min, dedup 1 min, pre-screen of "
                "~43,000 unique candidates 14 min, ~45 min with the volume scan's 4 evaluations each "
                "(--volume-scan '' turns it off), 500 relaxations 19 min, 20 phonon screens 10 min), "
                "about 3.5 h with CHGNet",
    "paper": "MP data; 120,000 templates -> ~1.8 M candidates, all pre-screened, 5,000 relaxations and "
             "phonon screens (benchmarks/results/campaign.md): on a 2-core laptop about 22 h (phonon "
             "screens 19 h of it; rates of a 10 % run here); on one H200 machine about 2 h (pre-screen "
             "28 min with one actor, 7 min with eight sharing the GPU via gpus_per_actor, relaxations "
             "36 min, phonons 63 min); on 8 such nodes about 25 min",
}


def profile_settings(profile: str) -> dict[str, Any]:
    """The MainSettings fields of ``profile``; a clear error for an unknown name."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return dict(PROFILES[profile])
