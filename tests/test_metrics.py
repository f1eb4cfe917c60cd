"""Model-free per-video metrics: VBench temporal flickering and normal-flow motion magnitude."""

from __future__ import annotations

import numpy as np
import pytest

from vidgen.errors import DataError
from vidgen.eval.metrics import aggregate, motion_magnitude, temporal_flickering, video_metrics


def _grating(speed: float, frames: int = 6, height: int = 40, width: int = 64, period: float = 16.0) -> np.ndarray:
    """A vertical sine grating translating right by `speed` pixels per frame (uint8 [T, H, W, 3])."""
    x = np.arange(width)
    rows = [127.5 + 100 * np.sin(2 * np.pi * (x - speed * t) / period) for t in range(frames)]
    clip = np.stack([np.broadcast_to(r[None, :, None], (height, width, 3)) for r in rows])
    return np.round(clip).astype(np.uint8)


def test_flickering_equals_vbench_formula_on_random_frames():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(7, 12, 20, 3), dtype=np.uint8)
    # VBench: mean over pairs of np.mean(cv2.absdiff(float32 f_i, float32 f_i+1)), score (255 - mae) / 255.
    pairs = [np.mean(np.abs(video[i].astype(np.int64) - video[i + 1].astype(np.int64))) for i in range(6)]
    mae, score = temporal_flickering(video)
    assert mae == pytest.approx(np.mean(pairs), rel=1e-12)
    assert score == pytest.approx((255 - np.mean(pairs)) / 255, rel=1e-12)


def test_flickering_extremes_and_alternation():
    still = np.full((5, 8, 8, 3), 90, np.uint8)
    assert temporal_flickering(still) == (0.0, 1.0)
    strobe = np.zeros((4, 8, 8, 3), np.uint8)
    strobe[1::2] = 255  # black / white every frame: the worst flicker possible
    assert temporal_flickering(strobe) == (255.0, 0.0)
    half = strobe.copy()
    half[:, :, 4:] = 0  # only half of each frame strobes
    assert temporal_flickering(half) == (127.5, pytest.approx(0.5))


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.0])
def test_motion_magnitude_recovers_subpixel_translation_speed(speed):
    # Within 5% for displacements up to a pixel per frame (the linearisation's regime).
    assert motion_magnitude(_grating(speed)) == pytest.approx(speed, rel=0.05)


def test_motion_magnitude_is_zero_when_still_and_grows_with_speed():
    assert motion_magnitude(_grating(0.0)) == 0.0
    assert motion_magnitude(np.full((3, 8, 8, 3), 10, np.uint8)) == 0.0  # no texture: nothing to measure
    speeds = [motion_magnitude(_grating(s)) for s in (0.25, 0.5, 1.0, 2.0)]
    assert speeds == sorted(speeds) and speeds[-1] > 1.5
    # Flicker counts motion too (VBench filters static videos first), which is why both are reported.
    assert temporal_flickering(_grating(1.0))[0] > temporal_flickering(_grating(0.25))[0] > 0


def test_video_metrics_and_aggregate():
    videos = [_grating(0.5), _grating(1.0), np.full((3, 8, 8, 3), 5, np.uint8)]
    rows = [video_metrics(v) for v in videos]
    assert set(rows[0]) == {"temporal_flickering_mae", "temporal_flickering_score", "motion_magnitude"}
    agg = aggregate(rows)
    scores = [r["temporal_flickering_score"] for r in rows]
    assert agg["temporal_flickering_score_mean"] == pytest.approx(np.mean(scores))
    assert agg["motion_magnitude_median"] == pytest.approx(rows[0]["motion_magnitude"])
    assert aggregate([]) == {}


def test_bad_input_is_refused_naming_the_video():
    with pytest.raises(DataError, match="clip.mp4: needs at least 2 frames"):
        temporal_flickering(np.zeros((1, 4, 4, 3), np.uint8), name="clip.mp4")
    with pytest.raises(DataError, match=r"expected uint8 frames \[T, H, W, 3\]"):
        motion_magnitude(np.zeros((3, 4, 4, 3), np.float32))
