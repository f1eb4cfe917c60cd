"""Validation videos during training: one base-sampler window per held-out input.

Runs on rank 0 inside the training loop with the weights being trained; the driver logs the files. What a
held-out input is (a first frame for image-to-video families, a prompt for text-to-video ones) and how its window
is sampled is the family's (`FamilySpec.validation_video`); this module writes the videos.
"""

from __future__ import annotations

import torch

from vidgen import storage
from vidgen.data.video import write_video


def validation_videos(family, model, validation: dict, step: int, num_steps: int) -> list[str]:
    """`validation`: {images: [uint8 H,W,3] or prompts [str] (the family's held-out inputs), out_dir, fps,
    motion_bucket_id, num_frames, height, width}. Returns mp4 URIs, one per input."""
    paths = []
    for i, item in enumerate(validation["images"]):
        gen = torch.Generator().manual_seed(i)  # same noise at every step: videos comparable over training
        frames = family.validation_video(model, item, validation, num_steps, gen)  # [F, 3, H, W] in [-1, 1]
        video = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        path = storage.join(validation["out_dir"], f"step{step:08d}", f"{i:02d}.mp4")
        write_video(path, video, fps=validation["fps"])
        paths.append(path)
    return paths
