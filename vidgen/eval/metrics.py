"""Model-free per-video metrics (pure numpy): temporal flickering and motion magnitude.

Shapes: T frames, H/W pixels. Every function takes one video as uint8 frames [T, H, W, 3] (T >= 2).

Temporal flickering follows VBench (`vbench/temporal_flickering.py`, commit 45e79ec):
  mae   = mean over consecutive pairs (t, t+1) of mean over pixels and channels of |f_t+1 - f_t|
          (uint8 values, so 0..255);
  score = (255 - mae) / 255, in [0, 1], higher = steadier.
VBench averages the per-video scores over the set. It applies the metric to videos it has first
filtered to be near-static (its `static_filter.py`), so there the whole difference is flicker; on
moving content the same number also counts motion, which is why it is reported beside a motion
magnitude here. VBench decodes with OpenCV (BGR); channel order does not change a mean over channels.

Motion magnitude is the mean normal-flow speed in pixels per frame: with luma Y in [0, 1]
(BT.601 weights), the temporal difference It = Y_t+1 - Y_t and the spatial gradient grad Y of the
pair's average (central differences), brightness constancy gives the flow component along the
gradient, |It| / |grad Y|. It is averaged over the pixels whose gradient magnitude is at least
`min_gradient` (flat regions carry no motion information), over every consecutive pair. It is exact
for a pattern translating by less than about one pixel per frame perpendicular to its edges,
underestimates larger displacements (the linearisation saturates), is 0 for a static video, and is
in pixels at the video's own resolution (compare videos of one size).
"""

from __future__ import annotations

import numpy as np

from vidgen.errors import DataError

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as in OpenCV's RGB->gray


def _check(frames_thwc: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(frames_thwc)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise DataError(f"{name}: expected uint8 frames [T, H, W, 3], got {x.dtype} {x.shape}")
    if x.shape[0] < 2:
        raise DataError(f"{name}: needs at least 2 frames, got {x.shape[0]}")
    return x


def temporal_flickering(frames_thwc: np.ndarray, name: str = "video") -> tuple[float, float]:
    """(mae, score): VBench's per-video flicker MAE in 0..255 and its score (255 - mae) / 255."""
    x = _check(frames_thwc, name)
    # One pair at a time in float32 (what cv2.absdiff gets in VBench): no [T, H, W, 3] float copy.
    per_pair = [float(np.abs(x[t + 1].astype(np.float32) - x[t].astype(np.float32)).mean(dtype=np.float64))
                for t in range(len(x) - 1)]
    mae = float(np.mean(per_pair))
    return mae, (255.0 - mae) / 255.0


def motion_magnitude(frames_thwc: np.ndarray, min_gradient: float = 0.02, name: str = "video") -> float:
    """Mean normal-flow speed in pixels per frame (see the module docstring); 0 when nothing is textured."""
    x = _check(frames_thwc, name)
    total, count = 0.0, 0
    prev = x[0].astype(np.float64) @ LUMA / 255.0
    for t in range(1, len(x)):
        cur = x[t].astype(np.float64) @ LUMA / 255.0
        mid = 0.5 * (prev + cur)
        gy, gx = np.gradient(mid)  # central differences inside, one-sided at the border
        grad = np.hypot(gx, gy)
        mask = grad >= min_gradient
        total += float((np.abs(cur - prev)[mask] / grad[mask]).sum())
        count += int(mask.sum())
        prev = cur
    return total / count if count else 0.0


def video_metrics(frames_thwc: np.ndarray, name: str = "video") -> dict[str, float]:
    """All per-video metrics of one video: the keys `aggregate` summarises."""
    mae, score = temporal_flickering(frames_thwc, name)
    return {"temporal_flickering_mae": mae, "temporal_flickering_score": score,
            "motion_magnitude": motion_magnitude(frames_thwc, name=name)}


def aggregate(per_video: list[dict[str, float]]) -> dict[str, float]:
    """Mean (as VBench reports a dimension) and median of each metric over videos; {} for none."""
    if not per_video:
        return {}
    out: dict[str, float] = {}
    for key in ("temporal_flickering_mae", "temporal_flickering_score", "motion_magnitude"):
        values = np.array([float(v[key]) for v in per_video], dtype=np.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_median"] = float(np.median(values))
    return out
