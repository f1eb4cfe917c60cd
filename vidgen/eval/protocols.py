"""FVD protocols: each published FVD implementation as one named preset of every field its number depends on.

FVD values from different tools disagree mostly through protocol, not model. A preset (`eval.protocol`) sets all
the switches at once so that vidgen's number equals the named tool's on the same weights and clips; a field set
explicitly in the config (`eval.preprocess`, `eval.cov_norm`, `eval.i3d_bn_eps`, `eval.matrix_sqrt`,
`eval.stats_precision`) still wins over its preset. The resolved fields are logged with every result.

The presets, and where each setting comes from (repository, file, lines at the commits read):

tf          Google's original FVD (google-research `frechet_video_distance/frechet_video_distance.py`, copied as
            universome/fvd-comparison@33a5552 `their_fvd.py`): `preprocess` L32-49 resizes with TF1
            `resize_bilinear` (align_corners=False, half_pixel_centers=False: the legacy scaler of tensorflow
            `core/util/image_resizer_state.h`) to 224x224 on 0..255, then 2x/255 - 1; I3D from tf.hub
            (Sonnet BatchNorm, eps 1e-3); statistics by TF-GAN@bc369b7 `classifier_metrics.py`
            `frechet_classifier_distance_from_activations` L698-743: float64, covariance / (N - 1), the trace of the
            root by `trace_sqrt_product` L433-438 over SVD roots (`_symmetric_matrix_square_root` L161-184).
videogpt    wilson1yan/VideoGPT@733d2b1 `videogpt/data.py::preprocess` L78-106 (shorter side to 224 rounded up,
            bilinear, centre crop, /255 - 0.5, x2), `videogpt/fvd/pytorch_i3d.py` L69 (BatchNorm eps 1e-5),
            `videogpt/fvd/fvd.py` L18-74 (torch float32, covariance / (N - 1), SVD `trace_sqrt_product`).
cd-fvd      songweige/content-debiased-fvd@a1e037a, I3D features: `cdfvd/third_party/i3d/utils.py::preprocess_i3d`
            L13-25 (bilinear squash to 224 on 0..255, 2x/255 - 1), `third_party/i3d/pytorch_i3d.py` L76 (eps 1e-5),
            `cdfvd/utils/metric_utils.py` L63-84, L125-136 (float64 accumulation, covariance / N) and
            `cdfvd/fvd.py` L94-98 (`scipy.linalg.sqrtm` of the covariance product, real part). TATS
            (songweige/TATS@03bbce1 `tats/fvd/fvd.py` L17-27) preprocesses the same way but divides by N - 1.
stylegan-v  universome/stylegan-v@3fecd69 `src/metrics/frechet_video_distance.py` L22-57 and `metric_utils.py`
            L86-127: its TorchScript I3D (`i3d_torchscript.pt`, given as eval.i3d_path) called on uint8
            [B, 3, T, H, W] with rescale=True, resize=True (the resize is inside the TorchScript), 400-d
            features; float64 accumulation, covariance / N, `scipy.linalg.sqrtm`, real part.
vidgen      the defaults of earlier vidgen releases: cd-fvd's preprocessing with TF's BatchNorm epsilon (1e-3) and
            TF-GAN's covariance divisor (N - 1), scipy's root; equal to no published tool, kept so earlier numbers
            stay comparable. Use a named preset to compare with published numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Preprocess = Literal["squash", "squash_tf", "center_crop", "detector"]


@dataclass(frozen=True)
class Protocol:
    name: str
    preprocess: Preprocess  # squash (torch bilinear), squash_tf (TF1 legacy bilinear), center_crop, detector
    i3d_bn_eps: float
    cov_norm: Literal["n-1", "n"]
    matrix_sqrt: Literal["scipy", "svd"]  # sqrtm of the covariance product, or TF-GAN's trace_sqrt_product
    stats_precision: Literal["float64", "float32"]  # float32: torch float32 statistics, as VideoGPT computes them
    i3d_format: Literal["state_dict", "torchscript"] = "state_dict"

    def to_params(self) -> dict[str, object]:
        """The resolved protocol as MLflow params (fvd.protocol, fvd.preprocess, ...)."""
        return {("fvd.protocol" if k == "name" else f"fvd.{k}"): v for k, v in asdict(self).items()}


PRESETS: dict[str, Protocol] = {
    "vidgen": Protocol("vidgen", "squash", 1e-3, "n-1", "scipy", "float64"),
    "tf": Protocol("tf", "squash_tf", 1e-3, "n-1", "svd", "float64"),
    "videogpt": Protocol("videogpt", "center_crop", 1e-5, "n-1", "svd", "float32"),
    "cd-fvd": Protocol("cd-fvd", "squash", 1e-5, "n", "scipy", "float64"),
    "stylegan-v": Protocol("stylegan-v", "detector", 1e-3, "n", "scipy", "float64", "torchscript"),
}
FIELDS = ("preprocess", "i3d_bn_eps", "cov_norm", "matrix_sqrt", "stats_precision")


def resolve(eval_cfg) -> Protocol:
    """eval.protocol's preset (vidgen's own when unset) with the fields the config sets explicitly on top; a
    changed preset is named `<preset>+<field>=<value>...` so that no result passes for the preset's."""
    base = PRESETS[eval_cfg.protocol or "vidgen"]
    changed = {f: getattr(eval_cfg, f) for f in FIELDS
               if getattr(eval_cfg, f) is not None and getattr(eval_cfg, f) != getattr(base, f)}
    if not changed:
        return base
    name = base.name + "".join(f"+{f}={v}" for f, v in changed.items())
    return Protocol(**{**asdict(base), **changed, "name": name})
