"""Frechet Video Distance and Kernel Video Distance over feature vectors (pure numpy / scipy).

Features are I3D's 400-d pre-softmax logits, one row per clip (see `vidgen.eval.features`).

FVD = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)), the Frechet distance between two
Gaussians fitted to the feature sets. KVD = unbiased MMD^2 with the polynomial kernel
k(x, y) = (gamma <x, y> + coef0)^degree, as in Seer / TATS `polynomial_mmd`.

Shapes: N clips, D feature dim. features [N, D], mu [D], sigma [D, D].
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import scipy.linalg

from vidgen.errors import DataError

log = logging.getLogger(__name__)


def _as_features(features: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"{name}: expected features of shape [N, D], got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise DataError(f"{name}: need at least {min_rows} clips to estimate statistics, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DataError(f"{name}: features contain NaN or inf ({int((~np.isfinite(x)).sum())} values)")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise DataError(
            f"{what}: the two feature sets differ in dimension ({a.shape[-1]} vs {b.shape[-1]}); "
            "both must come from the same feature network"
        )


CovNorm = Literal["n-1", "n"]
MatrixSqrt = Literal["scipy", "svd"]


def _divisor(n: int, cov_norm: CovNorm) -> int:
    if cov_norm not in ("n-1", "n"):
        raise DataError(f"eval.cov_norm: expected 'n-1' or 'n', got {cov_norm!r}")
    return n - 1 if cov_norm == "n-1" else n


class FeatureStats:
    """Running mean and covariance of feature rows, fed batch by batch, in float64.

    Keeps n, the mean and M2 = sum (x - mean)(x - mean)^T, merged per batch with Chan et al.'s
    pairwise update (the same numbers as one pass over all rows, up to rounding, without the
    cancellation of a raw sum of squares when the mean is large next to the spread, as logits are).
    `cov('n-1')` divides M2 by N - 1 (TF-GAN, VideoGPT), `cov('n')` by N (StyleGAN-V, cd-fvd).
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def update(self, features: np.ndarray) -> FeatureStats:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"FeatureStats.update: expected features [N, {self.dim}], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError(f"features contain NaN or inf ({int((~np.isfinite(x)).sum())} values)")
        if len(x):
            batch_mean = x.mean(axis=0)
            centered = x - batch_mean
            self._merge(len(x), batch_mean, centered.T @ centered)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise DataError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
        if other.n:
            self._merge(other.n, other.mean, other.m2)
        return self

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def cov(self, cov_norm: CovNorm = "n-1") -> np.ndarray:
        if self.n < 2:
            raise DataError(f"need at least 2 clips to estimate a covariance, got {self.n}")
        return self.m2 / _divisor(self.n, cov_norm)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.array(self.n), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_arrays(cls, arrays) -> FeatureStats:
        stats = cls(int(np.asarray(arrays["mean"]).shape[0]))
        stats.n, stats.mean, stats.m2 = int(arrays["n"]), np.asarray(arrays["mean"], np.float64), \
            np.asarray(arrays["m2"], np.float64)
        return stats

    @classmethod
    def of(cls, features: np.ndarray, name: str = "features") -> FeatureStats:
        x = _as_features(features, name)
        return cls(x.shape[1]).update(x)


def warn_if_few(n: int, d: int, name: str) -> str | None:
    """The rank-deficiency warning (logged and returned) when a set has fewer clips than feature dims."""
    if n >= d:
        return None
    text = (f"{name}: {n} clips for {d}-d features: the covariance is rank-deficient, so the FVD is biased "
            "upward (the standard protocol uses 2048 clips per set)")
    log.warning(text)
    return text


def feature_stats(
    features: np.ndarray, unbiased: bool = True, name: str = "features", cov_norm: CovNorm | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D], in float64.

    cov_norm 'n-1' (or unbiased=True) divides by N - 1 (TF-GAN's `frechet_classifier_distance`,
    VideoGPT, TATS, Seer); 'n' (unbiased=False) divides by N (StyleGAN-V's
    `FeatureStats.get_mean_cov`, also used by cd-fvd). The two give FVDs about 2.6% apart at N = 24
    and 0.05% apart at N = 2048. cov_norm, when given, wins over unbiased.
    """
    stats = FeatureStats.of(features, name)
    warn_if_few(stats.n, stats.dim, name)
    return stats.mean, stats.cov(cov_norm or ("n-1" if unbiased else "n"))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
    matrix_sqrt: MatrixSqrt = "scipy",
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    The trace of (sigma1 sigma2)^(1/2) comes from `scipy.linalg.sqrtm`, as in StyleGAN-V and
    pytorch-fid. Two standard fixes for estimated covariances:
    - if the product is singular enough that sqrtm returns non-finite values, `eps` is added to
      both diagonals and the root recomputed (with a warning);
    - rounding gives the root small imaginary parts; only the real part is kept (`np.real`),
      with a warning when the imaginary part is not negligible.
    The result is not clipped at 0: identical sets give a value within rounding of 0.
    matrix_sqrt="svd": the trace of the root by TF-GAN's `trace_sqrt_product` instead (`trace_sqrt_product`).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    _same_dim(mu1, mu2, "frechet_distance")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise DataError(f"frechet_distance: {name} has shape {s.shape}, expected ({d}, {d}) to match mu")

    diff = mu1 - mu2
    if matrix_sqrt == "svd":
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: sigma1 @ sigma2 is singular; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.trace(covmean.real))):
            log.warning(
                "frechet_distance: matrix square root has imaginary part %.3g; keeping the real part", imag
            )
        covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def symmetric_sqrt(m: np.ndarray) -> np.ndarray:
    """TF-GAN's `_symmetric_matrix_square_root`: u diag(s') v^T of the SVD, s' = sqrt(s), singular values under
    1e-10 kept as they are (not zeroed)."""
    u, s, vh = np.linalg.svd(m)
    return (u * np.where(s < 1e-10, s, np.sqrt(s))) @ vh


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) as TF-GAN computes it: A = sqrt(sigma1), tr(sqrt(A sigma2 A))."""
    a = symmetric_sqrt(sigma1)
    return float(np.trace(symmetric_sqrt(a @ sigma2 @ a)))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns on every singular product, which is the normal case with fewer clips than feature
    # dims (already warned about in feature_stats); its root is still accurate there, so log quietly.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    for w in caught:
        log.debug("scipy.linalg.sqrtm: %s", w.message)
    return root


def fvd(real_feats: np.ndarray, gen_feats: np.ndarray, unbiased: bool = True,
        cov_norm: CovNorm | None = None) -> float:
    """FVD between two feature sets [N_real, D] and [N_gen, D] (set sizes may differ)."""
    real = _as_features(real_feats, "real features")
    gen = _as_features(gen_feats, "generated features")
    _same_dim(real, gen, "fvd")
    return frechet_distance(*feature_stats(real, unbiased, "real features", cov_norm),
                            *feature_stats(gen, unbiased, "generated features", cov_norm))


def fvd_from_stats(real: FeatureStats, gen: FeatureStats, cov_norm: CovNorm = "n-1") -> float:
    """FVD between two accumulated statistics (see FeatureStats)."""
    if real.dim != gen.dim:
        raise DataError(f"fvd: the two feature sets differ in dimension ({real.dim} vs {gen.dim}); "
                        "both must come from the same feature network")
    return frechet_distance(real.mean, real.cov(cov_norm), gen.mean, gen.cov(cov_norm))


def fvd_float32(real_feats: np.ndarray, gen_feats: np.ndarray, cov_norm: CovNorm = "n-1") -> float:
    """FVD with statistics in torch float32 as VideoGPT computes them (`videogpt/fvd/fvd.py`: mean, centred
    x^T x / divisor, SVD `trace_sqrt_product`), for its protocol's numbers to the last digits float32 keeps."""
    import torch  # lazy: this module is numpy; torch only for VideoGPT's float32 statistics

    def stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        mu = t.mean(0)
        xc = t - mu
        return mu, xc.T @ xc / _divisor(len(t), cov_norm)

    def sym_sqrt(m: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(m)
        return (u * torch.where(s < 1e-10, s, s.sqrt())) @ vh

    real = _as_features(real_feats, "real features")
    gen = _as_features(gen_feats, "generated features")
    _same_dim(real, gen, "fvd")
    (mu1, s1), (mu2, s2) = stats(real_feats), stats(gen_feats)
    a = sym_sqrt(s1)
    root_trace = torch.trace(sym_sqrt(a @ s2 @ a))
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * root_trace)


def protocol_fvd(real_feats: np.ndarray, gen_feats: np.ndarray, cov_norm: CovNorm = "n-1",
                 matrix_sqrt: MatrixSqrt = "scipy", precision: str = "float64") -> float:
    """FVD of two feature sets under a protocol's statistics (vidgen.eval.protocols): covariance divisor, matrix
    root and precision."""
    if precision == "float32":
        if matrix_sqrt != "svd":
            raise DataError("eval.stats_precision=float32: computed as VideoGPT does, with eval.matrix_sqrt=svd")
        return fvd_float32(real_feats, gen_feats, cov_norm)
    real = FeatureStats.of(real_feats, "real features")
    gen = FeatureStats.of(gen_feats, "generated features")
    if real.dim != gen.dim:
        raise DataError(f"fvd: the two feature sets differ in dimension ({real.dim} vs {gen.dim}); "
                        "both must come from the same feature network")
    return frechet_distance(real.mean, real.cov(cov_norm), gen.mean, gen.cov(cov_norm), matrix_sqrt=matrix_sqrt)


def polynomial_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (a @ b.T) + coef0) ** degree


def kvd(
    feats_a: np.ndarray, feats_b: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> float:
    """Unbiased MMD^2 between feature sets [m, D] and [n, D] with a polynomial kernel.

    gamma defaults to 1 / D (sklearn's `polynomial_kernel` default, which Seer uses). The
    within-set sums leave out the diagonal k(x_i, x_i), which makes the estimate unbiased: its
    expectation is 0 when both sets come from one distribution, so single values can be negative.
    Computed in float64.
    """
    a = _as_features(feats_a, "features a")
    b = _as_features(feats_b, "features b")
    _same_dim(a, b, "kvd")
    m, n = a.shape[0], b.shape[0]
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    k_aa = polynomial_kernel(a, a, degree, gamma, coef0)
    k_bb = polynomial_kernel(b, b, degree, gamma, coef0)
    k_ab = polynomial_kernel(a, b, degree, gamma, coef0)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())
