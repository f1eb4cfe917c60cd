"""Validation videos during training: one base-sampler window per held-out first frame.

Runs on rank 0 inside the training loop with the weights being trained; the driver logs the files.
"""

from __future__ import annotations

import numpy as np
import torch

from vidgen import storage


def validation_videos(model, validation: dict, step: int, num_steps: int) -> list[str]:
    """`validation`: {images: [uint8 H,W,3] (SVD) or prompts [str] (Hotshot), out_dir, fps, motion_bucket_id,
    num_frames, height, width}. Returns mp4 URIs."""
    from vidgen.data.video import write_video

    if hasattr(model, "text"):  # a text-to-video model (Hotshot-XL)
        return _text_videos(model, validation, step, num_steps)
    from vidgen.generate.denoisers import SVDDenoiser
    from vidgen.generate.samplers import base_sample

    denoiser = SVDDenoiser(model, 1.0, 3.0)
    device = next(model.unet.parameters()).device
    paths = []
    for i, image in enumerate(validation["images"]):
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(127.5).sub(1)
        gen = torch.Generator().manual_seed(i)  # same noise at every step: videos comparable over training
        cond = denoiser.condition(img.to(device), validation["fps"], validation["motion_bucket_id"], 0.02, gen)
        h, w = img.shape[-2:]
        s = model.vae_scale_factor
        latents = base_sample(denoiser, cond, model.scheduler, (1, validation["num_frames"], 4, h // s, w // s),
                              num_steps, generator=gen)
        with torch.no_grad():
            frames = model.decode_video(latents, chunk=validation["num_frames"])[0]
        video = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        path = storage.join(validation["out_dir"], f"step{step:08d}", f"{i:02d}.mp4")
        write_video(path, video, fps=validation["fps"])
        paths.append(path)
    return paths


def _text_videos(model, validation: dict, step: int, num_steps: int) -> list[str]:
    from vidgen.data.video import write_video
    from vidgen.generate.hotshot import DDIMSigmas, HotshotDenoiser
    from vidgen.generate.samplers import base_sample

    denoiser = HotshotDenoiser(model, guidance_scale=7.5)
    h, w, s = validation["height"], validation["width"], model.vae_scale_factor
    paths = []
    for i, prompt in enumerate(validation["images"]):
        gen = torch.Generator().manual_seed(i)  # same noise at every step: videos comparable over training
        cond = denoiser.condition([str(prompt)], h, w)
        shape = (1, validation["num_frames"], model.unet.config.out_channels, h // s, w // s)
        latents = base_sample(denoiser, cond, DDIMSigmas(model.scheduler.config), shape, num_steps, generator=gen)
        with torch.no_grad():
            frames = model.decode_video(latents)[0]
        video = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        path = storage.join(validation["out_dir"], f"step{step:08d}", f"{i:02d}.mp4")
        write_video(path, video, fps=validation["fps"])
        paths.append(path)
    return paths
