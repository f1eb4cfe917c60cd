"""eval.protocol presets: each equals an independent restatement of the published implementation it names, on the
same random-init weights and clips (preprocessing, BatchNorm epsilon, statistics), to 1e-5 relative.

The restatements below are written from the references' descriptions (vidgen.eval.protocols cites file and line),
not from vidgen's code: TF1's legacy bilinear per output pixel, VideoGPT's shorter-side resize and crop, TF-GAN's
and VideoGPT's SVD roots, StyleGAN-V's and cd-fvd's N-divided covariance with scipy's sqrtm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from vidgen.config import EvalConfig, load_config
from vidgen.eval import protocols
from vidgen.eval.features import extract_features, tf_legacy_bilinear
from vidgen.eval.fvd import kvd, protocol_fvd
from vidgen.models.i3d import build_i3d

R = 32  # I3D input size for the tiny model (the presets leave eval.resolution to the user; 224 in practice)


def clips(seed: int, n: int, shape=(8, 20, 28)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, *shape[1:], 3))
    drift = rng.integers(-20, 21, (n, shape[0], 1, 1, 3)).cumsum(1)  # some motion, so frames differ
    return np.clip(base + drift, 0, 255).astype(np.uint8)


# ---- restatements --------------------------------------------------------------------------------------


def tf_resize_reference(img_hwc: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), one output pixel at a time."""
    in_h, in_w = img_hwc.shape[:2]
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    out = np.zeros((out_h, out_w, img_hwc.shape[2]), np.float32)
    for y in range(out_h):
        src_y = np.float32(y) * sy
        y0, y1 = int(math.floor(src_y)), min(int(math.ceil(src_y)), in_h - 1)
        fy = np.float32(src_y - np.float32(y0))
        for x in range(out_w):
            src_x = np.float32(x) * sx
            x0, x1 = int(math.floor(src_x)), min(int(math.ceil(src_x)), in_w - 1)
            fx = np.float32(src_x - np.float32(x0))
            p = img_hwc.astype(np.float32)
            top = p[y0, x0] + (p[y0, x1] - p[y0, x0]) * fx
            bottom = p[y1, x0] + (p[y1, x1] - p[y1, x0]) * fx
            out[y, x] = top + (bottom - top) * fy
    return out


def preprocess_reference(videos: np.ndarray, preset: str) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 -> [B, 3, T, R, R] as the preset's reference prepares its input."""
    b, t, h, w, _ = videos.shape
    if preset == "tf":  # resize on 0..255 first, then 2x/255 - 1
        frames = np.stack([tf_resize_reference(f, R, R) for f in videos.reshape(b * t, h, w, 3)])
        x = torch.from_numpy(2 * frames / 255 - 1).reshape(b, t, R, R, 3).permute(0, 4, 1, 2, 3)
    elif preset == "videogpt":  # /255, shorter side to R (ceil), bilinear, centre crop, -0.5, x2
        x = torch.from_numpy(videos).float().permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w) / 255.0
        scale = R / min(h, w)
        size = (R, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), R)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        top, left = (x.shape[2] - R) // 2, (x.shape[3] - R) // 2
        x = (x[:, :, top:top + R, left:left + R] - 0.5) * 2
        x = x.reshape(b, t, 3, R, R).permute(0, 2, 1, 3, 4)
    else:  # cd-fvd's preprocess_i3d: float 0..255, bilinear squash, then 2x/255 - 1
        x = torch.from_numpy(videos).float().permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w)
        x = F.interpolate(x, size=(R, R), mode="bilinear", align_corners=False) * 2 / 255 - 1
        x = x.reshape(b, t, 3, R, R).permute(0, 2, 1, 3, 4)
    return x.float().contiguous()


def svd_root(m):
    """TF-GAN's symmetric root, for numpy or torch matrices: singular values under 1e-10 kept as they are."""
    lib = torch if isinstance(m, torch.Tensor) else np
    u, s, vh = (torch.linalg.svd(m) if lib is torch else np.linalg.svd(m))
    return u @ lib.diag(lib.where(s < 1e-10, s, lib.sqrt(s))) @ vh


def fvd_reference(real: np.ndarray, fake: np.ndarray, preset: str) -> float:
    if preset == "tf":  # TF-GAN: float64, N - 1, tr(sqrt(A S2 A)), A = sqrt(S1)
        r, f = real.astype(np.float64), fake.astype(np.float64)
        s1, s2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
        a = svd_root(s1)
        return float(((r.mean(0) - f.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(svd_root(a @ s2 @ a)))
    if preset == "videogpt":  # torch float32 throughout
        def cov(x):
            x = x - x.mean(0, keepdim=True)
            return x.T @ x / (x.shape[0] - 1)
        r, f = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
        s1, s2 = cov(r), cov(f)
        a = svd_root(s1)
        root_trace = torch.trace(svd_root(a @ s2 @ a))
        return float(((r.mean(0) - f.mean(0)) ** 2).sum() + torch.trace(s1 + s2) - 2 * root_trace)
    # StyleGAN-V's FeatureStats (cd-fvd): float64 raw sums, covariance / N; sqrtm of the product; real part
    def mean_cov(x):
        x = x.astype(np.float64)
        mu = x.sum(0) / len(x)
        return mu, x.T @ x / len(x) - np.outer(mu, mu)
    (m1, s1), (m2, s2) = mean_cov(fake), mean_cov(real)
    root, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(np.real(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)))


# ---- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src, out", [((7, 11), (5, 13)), ((20, 28), (32, 32)), ((64, 48), (17, 17))])
def test_tf_legacy_bilinear_equals_tfs_per_pixel_rule(src, out):
    img = np.random.default_rng(0).integers(0, 256, (*src, 3)).astype(np.uint8)
    ours = tf_legacy_bilinear(torch.from_numpy(img).permute(2, 0, 1)[None].float(), out)[0].permute(1, 2, 0)
    np.testing.assert_allclose(ours.numpy(), tf_resize_reference(img, *out), rtol=0, atol=1e-4)
    torch_resize = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), out, mode="bilinear",
                                 align_corners=False)[0].permute(1, 2, 0)
    assert np.abs(torch_resize.numpy() - tf_resize_reference(img, *out)).mean() > 1  # a different resize


@pytest.mark.parametrize("preset", ["tf", "videogpt", "cd-fvd"])
def test_a_preset_equals_its_reference_on_the_same_weights_and_clips(preset):
    proto = protocols.resolve(EvalConfig(protocol=preset))
    eps = {"tf": 1e-3, "videogpt": 1e-5, "cd-fvd": 1e-5}[preset]  # Sonnet's BatchNorm; the PyTorch port's
    assert proto.i3d_bn_eps == eps
    real, fake = clips(1, 24), 255 - clips(2, 20, (8, 28, 20)) // 3  # two clearly different sets
    ours_model = build_i3d("tiny", seed=3, bn_eps=proto.i3d_bn_eps)
    ours = [extract_features(ours_model, v, R, 8, proto.preprocess) for v in (real, fake)]
    ref_model = build_i3d("tiny", seed=3, bn_eps=eps)
    with torch.inference_mode():
        ref = [ref_model(preprocess_reference(v, preset)).numpy() for v in (real, fake)]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # the same features, up to float rounding
    value = protocol_fvd(*ours, cov_norm=proto.cov_norm, matrix_sqrt=proto.matrix_sqrt,
                         precision=proto.stats_precision)
    assert value > 0 and math.isclose(value, fvd_reference(*ours, preset), rel_tol=1e-5)  # the statistics, exactly
    # End to end. VideoGPT's float32 statistics of 24 clips in 400 dimensions (a rank-deficient covariance) move
    # by about 1e-3 of the FVD's scale for features that differ in the 7th digit; so would VideoGPT's own.
    tol = 1e-3 if proto.stats_precision == "float32" else 1e-5
    assert math.isclose(value, fvd_reference(*ref, preset), rel_tol=tol)


def test_the_presets_differ_from_each_other_on_the_same_clips():
    real, fake = clips(1, 24), clips(2, 20, (8, 28, 20))
    values = {}
    for preset in ("tf", "videogpt", "cd-fvd"):
        p = protocols.resolve(EvalConfig(protocol=preset))
        model = build_i3d("tiny", seed=3, bn_eps=p.i3d_bn_eps)
        feats = [extract_features(model, v, R, 8, p.preprocess) for v in (real, fake)]
        values[preset] = protocol_fvd(*feats, cov_norm=p.cov_norm, matrix_sqrt=p.matrix_sqrt,
                                      precision=p.stats_precision)
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_explicit_fields_override_a_preset_and_rename_it():
    cfg = load_config(None, ["eval.protocol=cd-fvd", "eval.cov_norm=n-1"])
    proto = protocols.resolve(cfg.eval)
    assert (proto.preprocess, proto.i3d_bn_eps, proto.cov_norm) == ("squash", 1e-5, "n-1")
    assert proto.name == "cd-fvd+cov_norm=n-1"  # no result passes for the preset's own
    params = proto.to_params()
    assert params["fvd.protocol"] == "cd-fvd+cov_norm=n-1" and params["fvd.matrix_sqrt"] == "scipy"
    assert protocols.resolve(load_config(None, ["eval.protocol=tf", "eval.cov_norm=n-1"]).eval).name == "tf"
    unset = protocols.resolve(load_config(None, []).eval)
    assert (unset.name, unset.preprocess, unset.cov_norm, unset.i3d_bn_eps) == ("vidgen", "squash", "n-1", 1e-3)


def test_stylegan_v_calls_its_torchscript_detector_as_stylegan_v_does(tmp_path):
    """The detector gets uint8 [B, 3, T, H, W] with rescale and resize on; the statistics are StyleGAN-V's."""
    from vidgen.eval.features import ClipFeatures

    class Detector(torch.nn.Module):  # a stand-in for i3d_torchscript.pt with its calling convention
        def __init__(self):
            super().__init__()
            self.i3d = torch.jit.trace(build_i3d("tiny", seed=5), torch.zeros(1, 3, 8, 32, 32))

        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            v = x.float()
            if rescale:
                v = v / 255 * 2 - 1
            if resize:
                b, c, t, h, w = v.shape
                v = F.interpolate(v.transpose(1, 2).reshape(b * t, c, h, w), size=(32, 32), mode="bilinear",
                                  align_corners=False).reshape(b, t, c, 32, 32).transpose(1, 2)
            return self.i3d(v) if return_features else self.i3d(v).softmax(-1)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(Detector()).save(str(path))
    proto = protocols.resolve(EvalConfig(protocol="stylegan-v"))
    udf = ClipFeatures(path=str(path), resolution=R, batch_size=8, preprocess=proto.preprocess,
                      i3d_format=proto.i3d_format)
    real, fake = clips(1, 24), clips(2, 20)
    ours = [udf({"frames": v})["features"] for v in (real, fake)]
    det = torch.jit.load(str(path))
    with torch.inference_mode():
        ref = [det(torch.from_numpy(v).permute(0, 4, 1, 2, 3), rescale=True, resize=True,
                   return_features=True).numpy() for v in (real, fake)]
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    value = protocol_fvd(*ours, cov_norm=proto.cov_norm, matrix_sqrt=proto.matrix_sqrt)
    expected = fvd_reference(*ref, "stylegan-v")
    assert abs(value - expected) <= 1e-5 * abs(expected)


def test_intervals_need_as_many_clips_as_feature_dimensions():
    from functools import partial

    from vidgen.eval.job import intervals

    rng = np.random.default_rng(0)
    fvd_of = partial(protocol_fvd, cov_norm="n-1")
    real, gen = rng.normal(size=(60, 8)), rng.normal(0.5, 1, (50, 8))
    value, k = fvd_of(real, gen), kvd(real, gen)
    lo, hi, klo, khi = intervals(real, gen, fvd_of, 20, 0, value, k)
    assert lo < fvd_of(rng.normal(size=(60, 8)), rng.normal(0.5, 1, (50, 8))) < hi and klo < k < khi
    assert (lo + hi) / 2 == pytest.approx(value)  # centred on the value computed once, on the whole sets
    assert all(math.isnan(v) for v in intervals(real, gen[:7], fvd_of, 20, 0, value, k))
    assert all(math.isnan(v) for v in intervals(real, gen, fvd_of, 0, 0, value, k))
