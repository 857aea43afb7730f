"""Pure helpers of benchmarks/bench_fig4a.py (Wilson interval, infill by multiplicity, summary)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fig4a.py"
_spec = importlib.util.spec_from_file_location("bench_fig4a", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_size_bin_edges():
    assert [bench.size_bin(n) for n in (1, 2, 4, 5, 8, 9, 16, 17, 32, 33)] == [
        None, "2-4", "2-4", "5-8", "5-8", "9-16", "9-16", "17-32", "17-32", None]


def test_wilson_interval_known_values():
    # 8/10 at 95 %: the textbook Wilson interval (0.490, 0.943)
    lo, hi = bench.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = bench.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-3)
    lo, hi = bench.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(0.2775, abs=1e-3)
    assert all(math.isnan(x) for x in bench.wilson_interval(0, 0))


def test_infill_species_matches_multiplicities():
    # template sites (mult 4, 2, 4) get a material's elements on (2, 4, 4) sites of equal multiplicity
    species = bench.infill_species([4, 2, 4], [2, 4, 4], ["Ba", "O", "Ru"])
    assert species == ["O", "Ba", "Ru"]
    assert bench.composition_counts(species, [4, 2, 4]) == {"Ba": 2, "O": 4, "Ru": 4}
    with pytest.raises(ValueError):
        bench.infill_species([4, 2], [2, 2], ["A", "B"])


def test_composition_counts_merges_repeated_elements():
    assert bench.composition_counts(["O", "Si", "O"], [4, 2, 4]) == {"O": 8, "Si": 2}


def test_summarize_counts_failures_as_not_converged():
    rows = [
        {"bin": "2-4", "kind": "template", "is_converged": True, "n_steps": 10, "status": "ok"},
        {"bin": "2-4", "kind": "template", "is_converged": False, "n_steps": 300, "status": "ok"},
        {"bin": "2-4", "kind": "random", "is_converged": False, "n_steps": 5, "status": "error"},
        {"bin": "17-32", "kind": "random", "is_converged": True, "n_steps": 40, "status": "ok"},
    ]
    per_bin, overall = bench.summarize(rows)
    t = next(r for r in per_bin if r["bin"] == "2-4" and r["kind"] == "template")
    assert (t["n"], t["n_converged"], t["share_converged"], t["mean_steps"]) == (2, 1, 0.5, 155.0)
    r = next(r for r in per_bin if r["bin"] == "2-4" and r["kind"] == "random")
    assert (r["n"], r["n_converged"], r["n_failed"]) == (1, 0, 1)
    assert [r["bin"] for r in per_bin] == ["2-4", "2-4", "17-32"]
    o = {r["kind"]: r for r in overall}
    assert (o["template"]["n"], o["random"]["n"], o["random"]["n_converged"]) == (2, 2, 1)


def test_paired_discordance_counts_and_exact_p():
    rows = []
    for i, (t, r) in enumerate([(True, False)] * 5 + [(False, True)] + [(True, True)] * 4):
        rows += [{"bin": "5-8", "template": f"t{i}", "composition_of": "m", "kind": "template", "is_converged": t},
                 {"bin": "5-8", "template": f"t{i}", "composition_of": "m", "kind": "random", "is_converged": r}]
    out = {r["bin"]: r for r in bench.paired_discordance(rows)}
    assert set(out) == {"5-8", "2-32"}
    r = out["5-8"]
    assert (r["pairs"], r["template_only"], r["random_only"]) == (10, 5, 1)
    # exact two-sided binomial test of 1 vs 5 discordant pairs: 2 * (1 + 6) / 64
    assert r["mcnemar_p"] == pytest.approx(14 / 64)
