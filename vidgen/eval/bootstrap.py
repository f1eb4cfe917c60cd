"""Noise intervals for a two-set metric (FVD, KVD) by resampling the clips' features (pure numpy).

    lo, hi = interval(real_feats, gen_feats, fvd, resamples=50, seed=0)

The features are computed once; each resample draws N_r real rows and N_g generated rows with replacement and
recomputes the metric on them. What the interval means: where the metric, computed on a *fresh, independent*
draw of N_r real and N_g generated clips from the same two distributions (same model, same protocol, other
seeds), would fall with probability about `level`. That is the question a nightly comparison asks ("is tonight
different from last night beyond what another draw would give?"), and it is not what a plain bootstrap
percentile interval answers:

- A percentile interval estimates the spread of one estimate around its expectation. The difference between
  two independent estimates has twice that variance, so the half-width here is z * sqrt(2) * sd, with sd the
  standard deviation of the bootstrap replicates and z the normal quantile of (1 + level) / 2.
- Resampling with replacement repeats rows, which shrinks the covariances and inflates FVD (KVD's within-set
  sums pick up k(x, x) terms): the replicates' mean sits above the observed value. Only their spread is used;
  the interval is centred on the observed value, which a fresh draw of the same sizes estimates with the
  same small-sample bias.

So the interval is a prediction interval for a repeat measurement, not a confidence interval for the metric's
population value. It assumes the replicates are roughly normal (checked for FVD and KVD on Gaussian features
in tests/test_bootstrap.py, where it covers a second draw's value in about `level` of the trials). It is not
clipped at 0: it describes where an estimate falls, and KVD's estimate can be negative.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np

from vidgen.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Metric = Callable[[np.ndarray, np.ndarray], float]


def _rows(features: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DataError(f"{name}: expected features of shape [N, D] with N >= 2 to resample, got shape {x.shape}")
    return x


def replicates(real: np.ndarray, gen: np.ndarray, metric: Metric, resamples: int, seed: int) -> np.ndarray:
    """The metric on `resamples` resampled pairs of sets [resamples]: each draws len(real) real rows and len(gen)
    generated rows with replacement (one numpy Generator seeded by `seed`, so the same inputs give the same
    replicates)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 2:
        raise ConfigError(f"eval.bootstrap: expected an integer number of resamples >= 2 (a spread needs two "
                          f"values), got {resamples!r}")
    real, gen = _rows(real, "real features"), _rows(gen, "generated features")
    if real.shape[1] != gen.shape[1]:
        raise DataError(f"bootstrap: the two feature sets differ in dimension ({real.shape[1]} vs "
                        f"{gen.shape[1]}); both must come from the same feature network")
    rng = np.random.default_rng(seed)
    out = np.empty(int(resamples), np.float64)
    for i in range(len(out)):
        r = rng.integers(0, len(real), len(real))
        g = rng.integers(0, len(gen), len(gen))
        out[i] = metric(real[r], gen[g])
    return out


def interval(real: np.ndarray, gen: np.ndarray, metric: Metric, resamples: int, seed: int,
             level: float = 0.95, value: float | None = None) -> tuple[float, float]:
    """(lo, hi): where `metric` on a fresh independent draw of the same set sizes falls with probability ~`level`.

    real [N_r, D] and gen [N_g, D] are the features the metric was computed on; `value` is that metric on the
    full sets when the caller has it already (else it is computed here). The interval is value +- z * sqrt(2)
    * sd(replicates); see the module docstring for why. (NaN, NaN) when the value or too many replicates are
    not finite (a metric that failed on the full sets has no noise band to speak of).
    """
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise ConfigError(f"bootstrap level: expected a probability strictly between 0 and 1, got {level!r}")
    reps = replicates(real, gen, metric, resamples, seed)
    centre = float(metric(real, gen)) if value is None else float(value)
    finite = reps[np.isfinite(reps)]
    if not math.isfinite(centre) or len(finite) < max(2, len(reps) // 2):
        log.warning("bootstrap: %d of %d replicates finite, value %s: no interval", len(finite), len(reps), centre)
        return math.nan, math.nan
    half = NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(2) * float(np.std(finite, ddof=1))
    return centre - half, centre + half
