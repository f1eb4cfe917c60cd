"""I3D features of video clips, for FVD / KVD: preprocessing, a batch function and a Ray Data UDF.

Preprocessing follows the TF reference and cd-fvd: every frame is resized straight to R x R
(bilinear, no crop, so non-square frames are squashed) and scaled to [-1, 1]. VideoGPT / Seer
instead resize the short side and center-crop; numbers from the two policies are not comparable.

Shapes: B clips, T frames, H/W pixels, R the I3D input resolution (224 for comparable FVDs).
  frames_bthwc  [B, T, H, W, 3] uint8
  x_bctrr       [B, 3, T, R, R] float32 in [-1, 1]
  features      [B, 400] float32
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidgen.errors import DataError
from vidgen.models.i3d import build_i3d


def preprocess(frames_bthwc: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 clips [B, T, H, W, 3] -> float32 [B, 3, T, R, R] in [-1, 1]."""
    frames = torch.as_tensor(frames_bthwc)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise DataError(
            f"frames: expected uint8 clips of shape [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}"
        )
    b, t, h, w, _ = frames.shape
    x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()  # [B*T, 3, H, W]
    if (h, w) != (resolution, resolution):
        # Same call as cd-fvd / TATS (no antialiasing), so results match theirs for the same inputs.
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x / 127.5 - 1.0
    return x.reshape(b, t, 3, resolution, resolution).permute(0, 2, 1, 3, 4).contiguous()


def _clips(frames: np.ndarray | torch.Tensor | list) -> list[np.ndarray | torch.Tensor]:
    """Split a batch into groups of equal-shaped clips: one array, or one per clip when ragged."""
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
) -> np.ndarray:
    """I3D logits [B, 400] float32 of uint8 clips [B, T, H, W, 3], `batch_size` clips per forward pass.

    Clips of different shapes (a list or an object array) are run one at a time.
    """
    device = next(model.parameters()).device
    out = []
    for group in _clips(frames_bthwc):
        for start in range(0, len(group), batch_size):
            x = preprocess(group[start : start + batch_size], resolution).to(device)
            out.append(model(x).float().cpu().numpy())
    if not out:
        return np.zeros((0, getattr(model, "feature_dim", 400)), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


class I3DFeatures:
    """Ray Data `map_batches` UDF: {'frames': uint8 [B, T, H, W, 3], 'clip_id'?} -> {'features', 'clip_id'?}.

    Use with an actor pool so the model loads once per actor, e.g.
    `ds.map_batches(I3DFeatures, fn_constructor_kwargs={...}, batch_size=16, num_gpus=1,
    compute=ray.data.ActorPoolStrategy(size=k))`.
    """

    def __init__(
        self,
        flavor: str = "pretrained",
        path: str | None = None,
        resolution: int = 224,
        seed: int = 0,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.model = build_i3d(flavor, path, seed).to(device)
        self.resolution, self.batch_size = resolution, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "frames" not in batch:
            raise DataError(f"I3D features: the batch has no 'frames' column (columns: {sorted(batch)})")
        out = {"features": extract_features(self.model, batch["frames"], self.resolution, self.batch_size)}
        if "clip_id" in batch:
            out["clip_id"] = np.asarray(batch["clip_id"])
        return out
