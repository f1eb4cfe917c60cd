"""FVD / KVD numbers against closed forms and independent implementations; I3D preprocessing and features."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vidgen.errors import DataError
from vidgen.eval import FeatureStats, feature_stats, frechet_distance, fvd, fvd_from_stats, kvd
from vidgen.eval.features import ClipFeatures, extract_features, preprocess, window_starts
from vidgen.models.i3d import build_i3d


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return rng.normal(size=(n, d)) @ (np.eye(d) + mix) + shift


def _spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_by_eigh(mu1, s1, mu2, s2) -> float:
    """Independent formula: tr sqrt(S1^1/2 S2 S1^1/2) from symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """sqrtm of 400 x 400 matrices: 0.3 s on one BLAS thread, 6 s on two on a shared 2-core box."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(1):
        yield


# ---- Frechet distance ----


def test_identical_sets_give_zero():
    x = _gaussian(400, 16, seed=0)
    _mu, sigma = feature_stats(x)
    assert abs(fvd(x, x)) < 1e-8 * np.trace(sigma)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-6)
    # 1-d special case: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_general_covariances_match_eigendecomposition_and_are_symmetric():
    d = 20
    mu1, mu2 = np.zeros(d), np.linspace(-1, 1, d)
    s1, s2 = _spd(d, seed=2), _spd(d, seed=3)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_by_eigh(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)

    real, gen = _gaussian(300, 10, seed=4), _gaussian(200, 10, seed=5, shift=0.3)
    assert fvd(real, gen) == pytest.approx(fvd(gen, real), rel=1e-9)
    assert fvd(real, gen) == pytest.approx(_fd_by_eigh(*feature_stats(real), *feature_stats(gen)), rel=1e-6)


def test_biased_and_unbiased_covariance_differ_by_n_minus_1_over_n():
    n, d = 24, 6
    real, gen = _gaussian(n, d, seed=6), _gaussian(n, d, seed=7, shift=0.5)
    mu_u, sigma_u = feature_stats(real, unbiased=True)
    mu_b, sigma_b = feature_stats(real, unbiased=False)
    np.testing.assert_array_equal(mu_u, mu_b)
    np.testing.assert_allclose(sigma_u, np.cov(real, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(sigma_b, sigma_u * (n - 1) / n, rtol=1e-12)
    # The trace term is homogeneous of degree 1 in the covariances, so with equal set sizes only
    # it shrinks by (n - 1) / n; the mean term stays.
    mean_term = float(np.sum((real.mean(0) - gen.mean(0)) ** 2))
    unbiased, biased = fvd(real, gen), fvd(real, gen, unbiased=False)
    assert biased < unbiased
    assert biased - mean_term == pytest.approx((unbiased - mean_term) * (n - 1) / n, rel=1e-6)


def test_few_clips_warn_and_stay_finite(caplog):
    real, gen = _gaussian(12, 32, seed=8), _gaussian(12, 32, seed=9)
    with caplog.at_level(logging.WARNING, logger="vidgen.eval.fvd"):
        value = fvd(real, gen)
    assert "rank-deficient" in caplog.text
    assert np.isfinite(value) and isinstance(value, float)
    assert value == pytest.approx(_fd_by_eigh(*feature_stats(real), *feature_stats(gen)), rel=1e-4)


def test_singular_covariances_fall_back_to_eps_offset():
    d = 5
    s = np.zeros((d, d))
    s[0, 0] = 1.0  # rank 1: the product is singular
    value = frechet_distance(np.zeros(d), s, np.ones(d), s)
    assert value == pytest.approx(d, abs=1e-4)  # mean term d, trace term 0


def test_mismatched_dims_and_bad_inputs_are_refused():
    with pytest.raises(DataError, match="dimension.*16 vs 8"):
        fvd(_gaussian(50, 16, 0), _gaussian(50, 8, 1))
    with pytest.raises(DataError, match="dimension"):
        kvd(_gaussian(50, 16, 0), _gaussian(50, 8, 1))
    with pytest.raises(DataError, match=r"shape \[N, D\]"):
        fvd(np.zeros(10), np.zeros(10))
    with pytest.raises(DataError, match="at least 2 clips"):
        fvd(np.zeros((1, 4)), np.zeros((5, 4)))
    bad = _gaussian(10, 4, 0)
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        fvd(bad, _gaussian(10, 4, 1))


# ---- KVD ----


def _kvd_loops(x, y, degree=3, gamma=None, coef0=1.0) -> float:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def k(a, b):
        return (gamma * float(np.dot(a, b)) + coef0) ** degree

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kvd_equals_brute_force_double_loop():
    x, y = _gaussian(7, 4, seed=10), _gaussian(5, 4, seed=11, shift=0.7)
    assert kvd(x, y) == pytest.approx(_kvd_loops(x, y), rel=1e-10)
    assert kvd(x, y, degree=2, gamma=0.5, coef0=0.0) == pytest.approx(
        _kvd_loops(x, y, degree=2, gamma=0.5, coef0=0.0), rel=1e-10
    )
    assert kvd(x, y, gamma=1 / 4) == kvd(x, y)  # gamma defaults to 1 / D


def test_kvd_unbiased_for_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(12)
    same = np.array([kvd(rng.normal(size=(40, 8)), rng.normal(size=(40, 8))) for _ in range(30)])
    shifted = np.array([kvd(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.5) for _ in range(30)])
    stderr = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 3 * stderr  # zero in expectation (single values can be negative)
    assert (same < 0).any()
    assert shifted.mean() > 10 * same.std() and (shifted > 0).all()


def test_kvd_is_stable_in_float64_for_logit_sized_features():
    rng = np.random.default_rng(13)
    x = (rng.normal(size=(64, 400)) * 5 + 20).astype(np.float32)  # large-magnitude 400-d logits
    value = kvd(x, x.copy())
    # Identical sets: only the excluded diagonal separates the terms, so cancellation is at its worst.
    x64 = x.astype(np.float64)
    k = (x64 @ x64.T / 400 + 1) ** 3
    m = len(x64)
    exact = 2 * (k.sum() - np.trace(k)) / (m * (m - 1)) - 2 * k.mean()
    assert value == pytest.approx(exact, rel=1e-9)


# ---- preprocessing and features ----


def test_preprocess_shape_range_and_scaling():
    rng = np.random.default_rng(14)
    frames = rng.integers(0, 256, size=(2, 5, 20, 30, 3), dtype=np.uint8)
    frames[0, 0] = 0
    frames[1, 0] = 255
    x = preprocess(frames, 16)
    assert x.shape == (2, 3, 5, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[0, :, 0] == -1) and torch.all(x[1, :, 0] == 1)
    # Already at the resolution: exact x / 127.5 - 1 with channels moved in front of time.
    same = preprocess(frames[:, :, :16, :16], 16)
    expected = torch.from_numpy(frames[:, :, :16, :16]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    torch.testing.assert_close(same, expected)
    torch.testing.assert_close(preprocess(torch.from_numpy(frames), 16), x)  # tensors accepted too


def test_preprocess_squashes_non_square_frames_instead_of_cropping():
    frames = np.zeros((1, 2, 32, 64, 3), np.uint8)
    frames[..., :8, :] = 255  # a bright stripe on the left eighth: a center crop would cut it off
    frames[..., :, 0] = 255  # red channel also bright everywhere
    x = preprocess(frames, 32)
    assert torch.all(x[:, 1:, :, :, :4] == 1)  # left 8/64 of the width -> left 4/32 columns
    assert torch.all(x[:, 1:, :, :, 4:] == -1)
    assert torch.all(x[:, 0] == 1)  # the red channel, full frame
    # The stripe spans every row: the vertical axis was resized, not cropped either.
    assert torch.equal(x[:, 1:, :, 0, :], x[:, 1:, :, -1, :])


def test_preprocess_refuses_wrong_input():
    with pytest.raises(DataError, match=r"frames: expected uint8 .*\[B, T, H, W, 3\]"):
        preprocess(np.zeros((2, 4, 8, 8, 3), np.float32), 16)
    with pytest.raises(DataError, match="frames"):
        preprocess(np.zeros((4, 8, 8, 3), np.uint8), 16)


def test_extract_features_batches_and_ragged_clips():
    model = build_i3d("tiny", seed=0)
    rng = np.random.default_rng(15)
    frames = rng.integers(0, 256, size=(5, 9, 40, 48, 3), dtype=np.uint8)
    whole = extract_features(model, frames, resolution=32, batch_size=5)
    split = extract_features(model, frames, resolution=32, batch_size=2)
    assert whole.shape == (5, 400) and whole.dtype == np.float32
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
    ragged = np.empty(2, dtype=object)  # what Ray Data hands over for variable-shaped clips
    ragged[0], ragged[1] = frames[0], frames[1, :, :32]
    out = extract_features(model, ragged, resolution=32)
    np.testing.assert_allclose(out[0], whole[0], rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 400)


def test_i3d_features_udf_passes_clip_ids():
    udf = ClipFeatures(flavor="tiny", resolution=32, seed=0)
    frames = np.random.default_rng(16).integers(0, 256, size=(3, 9, 32, 32, 3), dtype=np.uint8)
    out = udf({"frames": frames, "clip_id": np.array(["a", "b", "c"]), "prompt": np.array(["x"] * 3)})
    assert set(out) == {"features", "clip_id", "shape"}  # never the frames or unrequested columns
    assert list(out["shape"]) == ["9x32x32"] * 3
    assert out["features"].shape == (3, 400) and out["features"].dtype == np.float32
    assert list(out["clip_id"]) == ["a", "b", "c"]
    np.testing.assert_allclose(out["features"], extract_features(build_i3d("tiny"), frames, 32), rtol=1e-5)
    with pytest.raises(DataError, match="no 'frames' column.*clip_id"):
        udf({"clip_id": np.array(["a"])})


@pytest.mark.ray
def test_i3d_features_in_ray_data_actor_pool(ray_session):
    ray = ray_session
    frames = np.random.default_rng(17).integers(0, 256, size=(4, 9, 32, 32, 3), dtype=np.uint8)
    ds = ray.data.from_items([{"clip_id": f"c{i}", "frames": frames[i]} for i in range(4)])
    out = ds.map_batches(
        ClipFeatures,
        fn_constructor_kwargs={"flavor": "tiny", "resolution": 32, "seed": 0},
        batch_size=2,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    ).take_all()
    got = {row["clip_id"]: row["features"] for row in out}
    expected = extract_features(build_i3d("tiny", seed=0), frames, 32)
    assert sorted(got) == ["c0", "c1", "c2", "c3"]
    for i in range(4):
        np.testing.assert_allclose(got[f"c{i}"], expected[i], rtol=1e-4, atol=1e-5)


# ---- acceptance: independent float64 computations, order, streaming, N vs N-1 ----


def _logit_like(n: int, seed: int, shift: float = 0.0, d: int = 400) -> np.ndarray:
    """d-dim features with uneven scales and correlations, like I3D logits (d = 400)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / (d**0.5) + np.diag(rng.uniform(0.5, 3.0, d))
    return (rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 2 + shift).astype(np.float32)


def test_fvd_and_kvd_equal_an_independent_scipy_numpy_computation():
    import scipy.linalg

    real, gen = _logit_like(600, seed=20), _logit_like(450, seed=21, shift=0.2)
    r64, g64 = real.astype(np.float64), gen.astype(np.float64)
    # Frechet distance written the other way round: tr sqrt(S1^1/2 S2 S1^1/2), np.cov for the covariances.
    s1, s2 = np.cov(r64, rowvar=False), np.cov(g64, rowvar=False)
    root1 = np.real(scipy.linalg.sqrtm(s1))
    inner = np.real(scipy.linalg.sqrtm(root1 @ s2 @ root1))
    expected = np.sum((r64.mean(0) - g64.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(inner)
    assert fvd(real, gen) == pytest.approx(expected, rel=1e-6)
    assert fvd(real, gen, cov_norm="n-1") == fvd(real, gen)
    # KVD as Seer computes it: sklearn's polynomial_kernel defaults (gamma 1/d, coef0 1, degree 3),
    # the diagonals left out of the within-set sums.
    kxx, kyy, kxy = ((a @ b.T / 400 + 1) ** 3 for a, b in ((r64, r64), (g64, g64), (r64, g64)))
    m, n = len(r64), len(g64)
    expected_kvd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                    - 2 * kxy.mean())
    assert kvd(real, gen) == pytest.approx(expected_kvd, rel=1e-6)
    # identical sets
    assert abs(fvd(real, real.copy())) < 1e-6 * np.trace(s1)


def test_order_of_videos_does_not_matter():
    real, gen = _logit_like(120, seed=22, d=48), _logit_like(90, seed=23, shift=0.5, d=48)
    rng = np.random.default_rng(24)
    pr, pg = real[rng.permutation(len(real))], gen[rng.permutation(len(gen))]
    assert fvd(pr, pg) == pytest.approx(fvd(real, gen), rel=1e-9)
    assert kvd(pr, pg) == pytest.approx(kvd(real, gen), rel=1e-9)
    assert fvd_from_stats(FeatureStats.of(pr), FeatureStats.of(pg)) == pytest.approx(fvd(real, gen), rel=1e-9)


def test_streaming_statistics_equal_one_shot():
    x = _logit_like(301, seed=25, d=64) + 50  # a large mean next to the spread: raw sums of squares would cancel
    mu, sigma = feature_stats(x)
    stream = FeatureStats(64)
    for part in np.array_split(x, [1, 2, 40, 41, 200]):  # batch sizes 1, 1, 38, 1, 159, 101
        stream.update(part)
    assert stream.n == 301
    np.testing.assert_allclose(stream.mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stream.cov(), sigma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stream.cov(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)
    # Two accumulators merged (two actors, two shards) equal one pass too.
    merged = FeatureStats.of(x[:100]).merge(FeatureStats.of(x[100:]))
    np.testing.assert_allclose(merged.cov(), sigma, rtol=1e-9, atol=1e-9)
    # ... and survive the cache's array round trip exactly.
    back = FeatureStats.from_arrays(stream.to_arrays())
    assert back.n == stream.n and np.array_equal(back.m2, stream.m2)
    gen = _logit_like(150, seed=26, shift=0.3, d=64)
    assert fvd_from_stats(stream, FeatureStats.of(gen)) == pytest.approx(fvd(x, gen), rel=1e-9)


def test_cov_norm_n_and_n_minus_1():
    x = _logit_like(50, seed=27, d=32)
    s = FeatureStats.of(x)
    np.testing.assert_allclose(s.cov("n"), s.cov("n-1") * 49 / 50, rtol=1e-12)
    np.testing.assert_allclose(s.cov("n"), np.cov(x.astype(np.float64), rowvar=False, bias=True), rtol=1e-9,
                               atol=1e-9)
    gen = _logit_like(50, seed=28, shift=1.0, d=32)
    assert fvd(x, gen, cov_norm="n") == pytest.approx(fvd(x, gen, unbiased=False), rel=1e-12)
    assert fvd_from_stats(s, FeatureStats.of(gen), "n") == pytest.approx(fvd(x, gen, cov_norm="n"), rel=1e-9)
    assert fvd(x, gen, cov_norm="n") < fvd(x, gen, cov_norm="n-1")
    with pytest.raises(DataError, match="eval.cov_norm"):
        s.cov("N")  # type: ignore[arg-type]


# ---- preprocessing policies ----


def test_center_crop_resizes_the_short_side_then_crops_the_centre():
    rng = np.random.default_rng(29)
    wide = rng.integers(0, 256, size=(1, 3, 30, 47, 3), dtype=np.uint8)  # H < W, odd sizes
    x = preprocess(wide, 16, "center_crop")
    assert x.shape == (1, 3, 3, 16, 16)
    # Independent: short side 30 -> 16, long side ceil(47 * 16 / 30) = 26, centre columns 5..20.
    frames = torch.from_numpy(wide[0]).permute(0, 3, 1, 2).float()
    scaled = torch.nn.functional.interpolate(frames, size=(16, 26), mode="bilinear", align_corners=False)
    expected = (scaled[:, :, :, 5:21] / 127.5 - 1).permute(1, 0, 2, 3)[None]
    torch.testing.assert_close(x, expected)
    tall = np.ascontiguousarray(wide.transpose(0, 1, 3, 2, 4))  # H > W: rows are cropped instead
    y = preprocess(tall, 16, "center_crop")
    scaled_t = torch.nn.functional.interpolate(frames.transpose(2, 3), size=(26, 16), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(y, (scaled_t[:, :, 5:21] / 127.5 - 1).permute(1, 0, 2, 3)[None])


def test_squash_and_center_crop_differ_on_non_square_input_only():
    frames = np.zeros((1, 2, 32, 64, 3), np.uint8)
    frames[..., :8, :] = 255  # a bright stripe on the left eighth
    squash, crop = preprocess(frames, 32, "squash"), preprocess(frames, 32, "center_crop")
    assert torch.all(squash[:, :, :, :, :4] == 1)  # squash keeps the stripe (squeezed to 4 columns)
    assert torch.all(crop == -1)  # the centre crop (columns 16..47 of 64) never sees it
    square = np.random.default_rng(30).integers(0, 256, size=(2, 3, 40, 40, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess(square, 32, "squash"), preprocess(square, 32, "center_crop"))
    with pytest.raises(DataError, match="eval.preprocess"):
        preprocess(square, 32, "pad")  # type: ignore[arg-type]


def test_features_follow_the_preprocessing_mode_on_non_square_clips():
    model = build_i3d("tiny", seed=0)
    frames = np.random.default_rng(31).integers(0, 256, size=(2, 8, 24, 40, 3), dtype=np.uint8)
    squash = extract_features(model, frames, 32, mode="squash")
    crop = extract_features(model, frames, 32, mode="center_crop")
    assert squash.shape == crop.shape == (2, 400)
    assert not np.allclose(squash, crop)
    udf = ClipFeatures(flavor="tiny", resolution=32, seed=0, preprocess="center_crop", passthrough=("video",))
    out = udf({"frames": frames, "clip_id": np.array(["a", "b"]), "video": np.array(["v1", "v2"])})
    np.testing.assert_allclose(out["features"], crop, rtol=1e-5, atol=1e-5)
    assert list(out["video"]) == ["v1", "v2"] and list(out["shape"]) == ["8x24x40"] * 2


def test_ragged_clips_of_different_lengths_match_one_by_one():
    model = build_i3d("tiny", seed=0)
    rng = np.random.default_rng(32)
    clips = [rng.integers(0, 256, size=shape, dtype=np.uint8)
             for shape in [(8, 24, 40, 3), (9, 32, 32, 3), (8, 40, 24, 3), (9, 16, 48, 3)]]
    ragged = np.empty(len(clips), dtype=object)
    for i, c in enumerate(clips):
        ragged[i] = c
    out = extract_features(model, ragged, 32, batch_size=2)
    for i, c in enumerate(clips):
        np.testing.assert_allclose(out[i], extract_features(model, c[None], 32)[0], rtol=1e-5, atol=1e-5)


# ---- windows of long videos ----


def test_windows_early_middle_late():
    assert window_starts(40, 16, 1, ("early", "middle", "late")) == {0: ["early"], 12: ["middle"], 24: ["late"]}
    assert window_starts(40, 16, 1, ("late",)) == {24: ["late"]}
    assert window_starts(40, 16, 2, ("early", "late")) == {0: ["early"], 9: ["late"]}  # span 31 at stride 2
    # A video exactly one clip long: the windows share the one clip; one frame more: late moves by one.
    assert window_starts(16, 16, 1, ("early", "middle", "late")) == {0: ["early", "middle", "late"]}
    assert window_starts(17, 16, 1, ("early", "middle", "late")) == {0: ["early", "middle"], 1: ["late"]}
    assert window_starts(15, 16, 1, ("early",)) == {}
