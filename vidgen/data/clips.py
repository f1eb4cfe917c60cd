"""Clip sampling and resizing: pure numpy + torch, no Ray, no I/O.

Shapes: T frames, H/W pixels; frames are uint8 [T, H, W, 3] in and out (never float: a float32 clip
is 4x the memory and Ray Data moves every byte of it). Resizing uses torch's uint8 kernels.

A clip is `num_frames` frames taken every `stride` source frames from `start`. Training draws
starts from a seeded generator (one per sample, epoch and rank, so runs are reproducible and epochs
differ); evaluation uses fixed, evenly spread starts so two runs see the same clips.
"""

from __future__ import annotations

import hashlib

import numpy as np


def frame_stride(source_fps: float, target_fps: float | None) -> int:
    """Source frames per clip frame: round(source / target), at least 1 (we never invent frames).

    10 Hz OPV2V to 8 fps gives 1; 30 fps to 8 gives 4 (7.5 fps effective). None keeps every frame.
    """
    if source_fps <= 0:
        raise ValueError(f"source fps must be > 0, got {source_fps}")
    if target_fps is None:
        return 1
    if target_fps <= 0:
        raise ValueError(f"target fps must be > 0, got {target_fps}")
    return max(1, round(source_fps / target_fps))


def clip_span(num_frames: int, stride: int) -> int:
    """Source frames covered by one clip, first to last inclusive."""
    return (num_frames - 1) * stride + 1


def clip_starts(
    num_available: int,
    num_frames: int,
    stride: int,
    clips_per_video: int,
    rng: np.random.Generator | None,
) -> list[int]:
    """Start frames of the clips to take from one video, sorted and distinct; [] when it is too short.

    rng None (evaluation): deterministic, evenly spread over the video, first start 0 and (for two
    or more clips) last start at the end. rng given (training): distinct random starts. Either way at
    most `clips_per_video`, fewer when the video has fewer distinct windows than that.
    """
    if num_frames < 1 or stride < 1 or clips_per_video < 1:
        raise ValueError(f"need num_frames, stride, clips_per_video >= 1, got {num_frames}, {stride}, "
                         f"{clips_per_video}")
    last = num_available - clip_span(num_frames, stride)  # the latest possible start
    if last < 0:
        return []
    k = min(clips_per_video, last + 1)
    if rng is not None:
        return sorted(int(s) for s in rng.choice(last + 1, size=k, replace=False))
    if k == 1:
        return [0]
    return sorted({i * last // (k - 1) for i in range(k)})


def cover_crop_box(
    src_h: int, src_w: int, height: int, width: int, rng: np.random.Generator | None
) -> tuple[int, int, int, int]:
    """Scale-to-cover geometry: (scaled_h, scaled_w, top, left) of a (height, width) crop.

    The source is scaled by max(height/src_h, width/src_w), so it covers the target while keeping
    its aspect ratio, then cropped at the centre (rng None) or at a random offset. Kept separate from
    the pixels so SDXL-style micro-conditioning (original size, crop top-left) can be logged.
    """
    scale = max(height / src_h, width / src_w)
    scaled_h = max(height, round(src_h * scale))
    scaled_w = max(width, round(src_w * scale))
    if rng is None:
        top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    else:
        top = int(rng.integers(0, scaled_h - height + 1))
        left = int(rng.integers(0, scaled_w - width + 1))
    return scaled_h, scaled_w, top, left


def resize_cover_crop(
    frames_thwc: np.ndarray, height: int, width: int, rng: np.random.Generator | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Aspect-preserving resize-to-cover then crop, the same box for every frame.

    uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]. The whole clip is resized in one call of
    torch's uint8 bilinear interpolation with antialiasing (torchvision's default resize; its
    vectorised uint8 kernel is 5-8x faster than PIL's per-frame resize, the largest cost of ingest
    after decoding), then cropped. No float copy of the clip is ever made. `box`: a geometry from
    `cover_crop_box` computed by the caller (who wants to record it); `rng` is then unused.
    """
    if frames_thwc.dtype != np.uint8 or frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {frames_thwc.dtype} {frames_thwc.shape}")
    t, src_h, src_w, _ = frames_thwc.shape
    scaled_h, scaled_w, top, left = box or cover_crop_box(src_h, src_w, height, width, rng)
    if (scaled_h, scaled_w) == (src_h, src_w):  # no scaling: a plain crop, exact pixels
        return np.ascontiguousarray(frames_thwc[:, top:top + height, left:left + width])
    import torch  # lazy: heavy; listing and inspection never pay for it

    # [T, H, W, 3] viewed as channels-last [T, 3, H, W]: no copy, and the layout the fast kernel wants.
    # (A read-only array, e.g. decoded straight from a buffer, is copied: torch wants writable memory.)
    clip = torch.from_numpy(np.require(frames_thwc, requirements=["C", "W"])).permute(0, 3, 1, 2)
    scaled = torch.nn.functional.interpolate(clip, size=(scaled_h, scaled_w), mode="bilinear",
                                             antialias=True, align_corners=False)
    cropped = scaled.permute(0, 2, 3, 1)[:, top:top + height, left:left + width]
    return np.ascontiguousarray(cropped.numpy())


def sample_rng(seed: int, epoch: int, rank: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, rank, key), not on which worker runs it.

    Ray Data may run a sample on any task in any order; seeding from the sample's own key (its URI)
    keeps training clips reproducible anyway. Python's hash() is salted per process, so use blake2b.
    """
    digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed % (1 << 64), epoch % (1 << 64), rank % (1 << 64), digest])
