"""Features of video clips for FVD / KVD (I3D logits or VideoMAE-v2 embeddings): clip reading, preprocessing, a
batch function, a Ray Data UDF.

Clips are read at their native size (no data.height/width resize): the only resize is the I3D
preprocessing below, so the policies mean what the references mean by them (vidgen.eval.protocols).
  squash       every frame resized straight to R x R by torch's bilinear (align_corners=False, no antialias),
               no crop (cd-fvd, TATS); non-square frames are squashed.
  squash_tf    the same squash by TF1's legacy `resize_bilinear` (no half-pixel centres: source pixel
               i * in/out), as Google's FVD resizes; equal to `squash` only for frames already R x R.
  center_crop  the shorter side resized to R (the longer to ceil(side * R / short)), then the
               centre R x R cropped (VideoGPT, Seer, JunyaoHu).
  detector     no preprocessing here: a TorchScript I3D (StyleGAN-V's) gets uint8 [B, 3, T, H, W] and
               rescales and resizes inside.
All but `detector` then scale to [-1, 1] (x / 127.5 - 1) for I3D, or to [0, 1] (x / 255, no mean/std
normalisation) for VideoMAE-v2, as cd-fvd feeds it. Numbers from different policies are not comparable.

Shapes: B clips, T frames, H/W pixels, R the I3D input resolution (224 for comparable FVDs).
  frames_bthwc  [B, T, H, W, 3] uint8
  x_bctrr       [B, 3, T, R, R] float32 in [-1, 1] (I3D) or [0, 1] (VideoMAE-v2)
  features      [B, D] float32 (D = 400 I3D logits, 1408 VideoMAE-v2 ViT-g)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidgen import storage
from vidgen.data.clips import clip_starts, frame_stride
from vidgen.data.decode import decode_image
from vidgen.data.listing import Sample
from vidgen.data.video import read_video
from vidgen.data.worker import BadSample, ClipSpec
from vidgen.devices import compute_device
from vidgen.errors import DataError
from vidgen.eval.metrics import video_metrics
from vidgen.models.i3d import TorchScriptI3D, build_i3d
from vidgen.models.videomae import build_videomae

Preprocess = Literal["squash", "squash_tf", "center_crop", "detector"]
WINDOWS = ("early", "middle", "late")


def _resize_bthwc(frames: torch.Tensor, size: tuple[int, int], tf_legacy: bool = False) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float32 [B*T, 3, h, w] in 0..255, bilinear without antialiasing."""
    b, t, h, w, _ = frames.shape
    x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    if (h, w) != size:
        # Same call as cd-fvd / TATS / VideoGPT (no antialiasing), so results match theirs for the same inputs.
        x = tf_legacy_bilinear(x, size) if tf_legacy else F.interpolate(x, size=size, mode="bilinear",
                                                                         align_corners=False)
    return x


def _legacy_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1's legacy scaler for one axis: source position i * (in / out) in float32, its floor, the next pixel
    (clamped to the edge) and the fraction between them."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = torch.arange(n_out, dtype=torch.float32) * scale
    lo = src.floor()
    hi = torch.minimum(src.ceil(), torch.tensor(float(n_in - 1)))
    return lo.long().to(device), hi.long().to(device), (src - lo).to(device)


def tf_legacy_bilinear(x_nchw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` (half_pixel_centers=False), in float32: rows, then
    columns interpolated as TF's kernel does (top = tl + (tr - tl) * dx; out = top + (bottom - top) * dy)."""
    n, c, h, w = x_nchw.shape
    y0, y1, dy = _legacy_taps(h, size[0], x_nchw.device)
    x0, x1, dx = _legacy_taps(w, size[1], x_nchw.device)
    top, bottom = x_nchw[:, :, y0], x_nchw[:, :, y1]  # [N, C, h', W]
    dx = dx.view(1, 1, 1, -1)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


def preprocess(frames_bthwc: np.ndarray | torch.Tensor, resolution: int, mode: Preprocess = "squash",
               unit: bool = False) -> torch.Tensor:
    """uint8 clips [B, T, H, W, 3] -> float32 [B, 3, T, R, R] in [-1, 1], or in [0, 1] when `unit` (see the module
    docstring); mode `detector`: uint8 [B, 3, T, H, W] as they are."""
    frames = torch.as_tensor(frames_bthwc)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise DataError(
            f"frames: expected uint8 clips of shape [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}"
        )
    b, t, h, w, _ = frames.shape
    r = resolution
    if mode == "detector":
        return frames.permute(0, 4, 1, 2, 3).contiguous()
    if mode in ("squash", "squash_tf"):
        x = _resize_bthwc(frames, (r, r), tf_legacy=mode == "squash_tf")
    elif mode == "center_crop":
        scale = r / min(h, w)
        size = (r, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), r)
        x = _resize_bthwc(frames, size)
        top, left = (size[0] - r) // 2, (size[1] - r) // 2
        x = x[:, :, top:top + r, left:left + r]
    else:
        raise DataError(f"eval.preprocess: expected squash, squash_tf, center_crop or detector, got {mode!r}")
    x = x / 255.0 if unit else x / 127.5 - 1.0
    return x.reshape(b, t, 3, r, r).permute(0, 2, 1, 3, 4).contiguous()


def _clips(frames: np.ndarray | torch.Tensor | list) -> list[np.ndarray | torch.Tensor]:
    """One array per clip when the batch is ragged (a list or an object array), else the batch itself."""
    if isinstance(frames, np.ndarray) and frames.dtype == object:
        frames = list(frames)  # Ray Data hands variable-shaped tensor columns over as object arrays
    if isinstance(frames, list):
        return [np.asarray(clip)[None] for clip in frames]
    return [frames]


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    frames_bthwc: np.ndarray | torch.Tensor | list,
    resolution: int = 224,
    batch_size: int = 16,
    mode: Preprocess = "squash",
    unit: bool = False,
) -> np.ndarray:
    """Features [B, D] float32 of uint8 clips [B, T, H, W, 3] (I3D logits; VideoMAE-v2 embeddings with `unit`, its
    [0, 1] input range), `batch_size` clips per forward pass.

    Ragged batches (a list or an object array of clips of different sizes) are preprocessed clip by
    clip to [3, T, R, R] and then batched by frame count, so sizes never force batch-size-1 passes.
    """
    device = next(model.parameters()).device

    def on_device(x) -> torch.Tensor:  # uint8 crosses to the GPU (4x less than float); resizing runs there
        return torch.as_tensor(x).to(device, non_blocking=True)

    groups = _clips(frames_bthwc)
    if len(groups) == 1:
        batch = groups[0]
        out = [model(preprocess(on_device(batch[s:s + batch_size]), resolution, mode, unit)).float().cpu()
               for s in range(0, len(batch), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, getattr(model, "feature_dim", 400)), np.float32)
    xs = [preprocess(on_device(clip), resolution, mode, unit)[0] for clip in groups]
    result: list[torch.Tensor | None] = [None] * len(xs)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        by_len.setdefault(x.shape[1], []).append(i)
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            logits = model(torch.stack([xs[i] for i in part])).float().cpu()
            for i, row in zip(part, logits):
                result[i] = row
    return torch.stack(result).numpy()  # type: ignore[arg-type]


class ClipFeatures:
    """Ray Data `map_batches` UDF: {'frames': uint8 [B, T, H, W, 3], 'clip_id'?, ...} -> feature rows of `network`
    (i3d: 400-d logits; videomae: VideoMAE-v2's embeddings, `videomae_flavor` / `videomae_path`).

    Returns {'features' [B, D] float32, 'shape' ("TxHxW" of each input clip), 'clip_id'?} plus the
    `passthrough` columns unchanged (never the frames). Use with an actor pool so the model loads
    once per actor: `ds.map_batches(ClipFeatures, fn_constructor_kwargs={..., "gpus_reserved": 1}, batch_size=16,
    num_gpus=1, compute=ray.data.ActorPoolStrategy(size=k))`. device None: CUDA when `gpus_reserved` (the actor's
    num_gpus) > 0, else the CPU even where CUDA is visible (vidgen.devices.compute_device).
    """

    def __init__(
        self,
        flavor: str = "pretrained",
        path: str | None = None,
        resolution: int = 224,
        seed: int = 0,
        device: str | None = None,
        gpus_reserved: float = 0.0,
        batch_size: int = 16,
        preprocess: Preprocess = "squash",
        bn_eps: float | None = None,
        passthrough: tuple[str, ...] = (),
        i3d_format: str = "state_dict",
        network: Literal["i3d", "videomae"] = "i3d",
        videomae_flavor: str = "tiny",
        videomae_path: str | None = None,
    ) -> None:
        device = device or compute_device(gpus_reserved, "eval.use_gpu")
        if network == "videomae":
            net: nn.Module = build_videomae(videomae_flavor, videomae_path, seed)  # type: ignore[arg-type]
        elif i3d_format == "torchscript":
            net = TorchScriptI3D(path)
        else:
            net = build_i3d(flavor, path, seed, bn_eps=bn_eps)
        self.model = net.to(device)
        self.resolution, self.batch_size, self.mode = resolution, batch_size, preprocess
        self.unit = network == "videomae"
        self.passthrough = tuple(passthrough)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "frames" not in batch:
            raise DataError(f"clip features: the batch has no 'frames' column (columns: {sorted(batch)})")
        frames = batch["frames"]
        out = {"features": extract_features(self.model, frames, self.resolution, self.batch_size, self.mode,
                                            self.unit),
               "shape": np.array(["x".join(map(str, np.shape(c)[:3])) for c in _rows(frames)])}
        for key in ("clip_id", *self.passthrough):
            if key in batch:
                out[key] = np.asarray(batch[key])
        return out


def _rows(frames) -> list:
    return list(frames) if isinstance(frames, list | np.ndarray | torch.Tensor) else [frames]


# ---- clip reading for evaluation (runs in Ray Data tasks or in-process) -----------------------------


@dataclasses.dataclass(frozen=True)
class NativeSpec(ClipSpec):
    """A ClipSpec that keeps every clip at its source size (no resize, no crop): I3D preprocessing
    is the only resize in evaluation."""

    def target(self, src_h: int, src_w: int) -> tuple[int, int]:
        return src_h, src_w


def native_spec(num_frames: int, fps: float | None, source_fps: float, clips_per_video: int,
                seed: int) -> NativeSpec:
    return NativeSpec(num_frames=num_frames, height=0, width=0, fps=fps, source_fps=source_fps, train=False,
                      seed=seed, epoch=0, clips_per_video=clips_per_video, default_prompt="-")


def window_starts(num_available: int, num_frames: int, stride: int, windows: tuple[str, ...]) -> dict[int, list[str]]:
    """{start frame: [window names]} for the requested windows of one video; {} when it is too short.

    early starts at frame 0, late ends at the last frame, middle starts halfway between them
    (`clip_starts`' evenly spread starts for 3 clips). Windows that land on the same start (a video
    only a little longer than a clip) share one clip.
    """
    k = 3 if "middle" in windows else 2 if "late" in windows else 1
    starts = clip_starts(num_available, num_frames, stride, k, None)
    if not starts:
        return {}
    at = {"early": starts[0], "late": starts[-1], "middle": starts[1] if len(starts) == 3 else starts[0]}
    out: dict[int, list[str]] = {}
    for name in windows:
        out.setdefault(at[name], []).append(name)
    return out


def read_all_frames(sample: Sample) -> tuple[np.ndarray, float | None]:
    """Every frame of a sample, uint8 [T, H, W, 3], and its fps (None for frame folders that do not say)."""
    if sample.frame_uris is not None:
        frames = [decode_image(storage.read_bytes(u), u) for u in sample.frame_uris]
        if len({f.shape for f in frames}) > 1:
            raise BadSample("mixed frame sizes", f"{sample.uri}: frames of different sizes")
        fps = sample.meta.get("fps")
        return np.stack(frames), (float(fps) if fps else None)
    source: str | bytes = storage.read_bytes(sample.uri) if storage.is_remote(sample.uri) else sample.uri
    return read_video(source)


def generated_rows(item: dict, windows: tuple[str, ...], num_frames: int, fps: float | None, source_fps: float,
                   report_dir: str, token: str) -> list[dict]:
    """One generated video -> a row per distinct window clip, each with the video's model-free metrics.

    The whole video is decoded once: the metrics need every frame, the windows are cut from it.
    A video that cannot make a clip yields no rows and leaves a skip record (the format
    `vidgen.data.pipeline.ClipStream.report` reads).
    """
    sample = Sample(**json.loads(item["sample"]))
    try:
        try:
            frames, src_fps = read_all_frames(sample)
        except DataError as e:
            raise BadSample("unreadable video", str(e)) from e
        stride = frame_stride(src_fps or source_fps, fps)
        starts = window_starts(len(frames), num_frames, stride, windows)
        if not starts:
            raise BadSample("too few frames", f"{sample.uri}: {len(frames)} frames, a clip needs "
                            f"{(num_frames - 1) * stride + 1} (eval.num_frames={num_frames}, stride={stride})")
        metrics = video_metrics(frames, sample.uri)
        return [{"frames": np.ascontiguousarray(frames[s:s + (num_frames - 1) * stride + 1:stride]),
                 "clip_id": f"{sample.uri}#{s}", "video": sample.uri, "windows": ",".join(names),
                 "num_video_frames": len(frames), **metrics}
                for s, names in sorted(starts.items())]
    except BadSample as e:
        reason, detail = e.reason, e.detail
    except Exception as e:  # a bug or an unforeseen input: skipped and reported, never fatal to the job
        reason, detail = f"unexpected {type(e).__name__}", f"{sample.uri}: {e}"[:500]
    record = {"uri": sample.uri, "reason": reason, "detail": detail, "token": token}
    name = hashlib.blake2b(sample.uri.encode("utf-8"), digest_size=10).hexdigest() + ".json"
    storage.write_json(storage.join(report_dir, name), record)
    return []
