"""Noise intervals for FVD and KVD (vidgen.eval.bootstrap): deterministic per seed, calibrated against a second
independent draw of clips, narrower with more clips, and refusing bad input by its config field.

Synthetic features stand in for I3D's: 8-d Gaussians, the generated set shifted and stretched against the real
one so that both metrics are clearly above 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vidgen.errors import ConfigError, DataError
from vidgen.eval.bootstrap import interval, replicates
from vidgen.eval.fvd import fvd, kvd

D = 8


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(real [n, D], generated [n, D]) from two fixed, different distributions."""
    real = rng.standard_normal((n, D))
    gen = rng.standard_normal((n, D)) * np.linspace(0.8, 1.5, D) + np.linspace(0.0, 0.6, D)
    return real, gen


def fvd_n1(a: np.ndarray, b: np.ndarray) -> float:
    return fvd(a, b, cov_norm="n-1")


def test_deterministic_for_a_seed():
    real, gen = draw(np.random.default_rng(0), 100)
    a = interval(real, gen, fvd_n1, resamples=20, seed=7)
    assert a == interval(real, gen, fvd_n1, resamples=20, seed=7)
    assert a != interval(real, gen, fvd_n1, resamples=20, seed=8)
    lo, hi = a
    assert lo < fvd_n1(real, gen) < hi
    assert (lo + hi) / 2 == pytest.approx(fvd_n1(real, gen))  # centred on the observed value
    assert interval(real, gen, fvd_n1, 20, 7, value=5.0) == pytest.approx((5 - (hi - lo) / 2, 5 + (hi - lo) / 2))


@pytest.mark.parametrize("name, metric", [("fvd", fvd_n1), ("kvd", kvd)])
def test_interval_covers_a_second_independent_draw(name, metric):
    """The issue's calibration test: in at least 90% of 50 seeded trials, the interval from one draw of 200 + 200
    clips covers the metric on a second, independent draw of the same sizes (measured: 0.96 for both; over 1000
    trials 0.959 for FVD and 0.951 for KVD). The plain bootstrap percentile interval, which answers another
    question, covers far less often (0.74 / 0.78 here, 0.69 / 0.73 over 1000 trials): the check can fail."""
    trials, hits, naive_hits = 50, 0, 0
    for seed in range(trials):
        rng = np.random.default_rng(1000 + seed)
        real, gen = draw(rng, 200)
        reps = replicates(real, gen, metric, resamples=50, seed=seed)
        lo, hi = interval(real, gen, metric, resamples=50, seed=seed)
        again = metric(*draw(rng, 200))
        hits += lo <= again <= hi
        p_lo, p_hi = np.percentile(reps, [2.5, 97.5])
        naive_hits += p_lo <= again <= p_hi
    coverage, naive = hits / trials, naive_hits / trials
    print(f"{name}: coverage {coverage:.2f} (plain percentile bootstrap: {naive:.2f})")
    assert coverage >= 0.9
    assert naive < 0.9


def test_interval_narrows_with_more_clips():
    rng = np.random.default_rng(3)
    for metric in (fvd_n1, kvd):
        small = interval(*draw(rng, 100), metric, resamples=40, seed=0)
        large = interval(*draw(rng, 800), metric, resamples=40, seed=0)
        # the spread of these estimates falls as 1 / sqrt(N): about sqrt(8) = 2.8 times narrower
        assert (large[1] - large[0]) < (small[1] - small[0]) / 2


def test_bad_input_names_the_field():
    real, gen = draw(np.random.default_rng(0), 20)
    for bad in (1, 0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="eval.bootstrap"):
            interval(real, gen, kvd, resamples=bad, seed=0)
    with pytest.raises(ConfigError, match="level"):
        interval(real, gen, kvd, resamples=5, seed=0, level=1.0)
    with pytest.raises(DataError, match="differ in dimension"):
        interval(real, gen[:, :4], kvd, resamples=5, seed=0)
    with pytest.raises(DataError, match="generated features"):
        interval(real, gen[:1], kvd, resamples=5, seed=0)


def test_failed_metric_gives_no_interval():
    real, gen = draw(np.random.default_rng(0), 20)
    lo, hi = interval(real, gen, lambda a, b: math.nan, resamples=5, seed=0)
    assert math.isnan(lo) and math.isnan(hi)
