"""SVD's generation pipeline: the per-frame denoiser every sampler uses, image conditioning, validation videos.

Shapes: B batch, F frames, C latent channels, h/w latent height/width.

    denoise(latents[B, F, C, h, w], sigma[B, F], cond) -> x0 estimate [B, F, C, h, w]

Per-frame sigmas are what FIFO-Diffusion needs (each queue slot sits at its own noise level). diffusers'
SVD UNet takes one timestep per video, so `unet_forward_per_frame` runs the same modules with one time
embedding per frame; with equal sigmas it is the stock forward (tests assert that numerically).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from vidgen.config import GenerateConfig, ModelConfig
from vidgen.diffusion.noise import randn
from vidgen.diffusion.objectives import append_dims, edm_scalings
from vidgen.diffusion.samplers import base_sample
from vidgen.models import lora
from vidgen.models.svd import model as svd
from vidgen.models.svd.model import SVD
from vidgen.models.svd.qcache import install_qcache


def unet_forward_per_frame(unet, sample_bfchw: torch.Tensor, timesteps_bf: torch.Tensor,
                           encoder_hidden_states: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
    """`UNetSpatioTemporalConditionModel.forward` with a timestep per frame instead of per video."""
    b, f = sample_bfchw.shape[:2]
    t_emb = unet.time_proj(timesteps_bf.reshape(b * f)).to(sample_bfchw.dtype)
    emb = unet.time_embedding(t_emb)  # [B*F, D]: one time embedding per frame
    time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape(b, -1).to(emb.dtype)
    emb = emb + unet.add_embedding(time_embeds).repeat_interleave(f, dim=0)
    ehs = encoder_hidden_states.repeat_interleave(f, dim=0)

    sample = unet.conv_in(sample_bfchw.flatten(0, 1))
    image_only_indicator = torch.zeros(b, f, dtype=sample.dtype, device=sample.device)
    res_stack = (sample,)
    for block in unet.down_blocks:
        kw = dict(encoder_hidden_states=ehs) if getattr(block, "has_cross_attention", False) else {}
        sample, res = block(hidden_states=sample, temb=emb, image_only_indicator=image_only_indicator, **kw)
        res_stack += res
    sample = unet.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs,
                            image_only_indicator=image_only_indicator)
    for i, block in enumerate(unet.up_blocks):
        res = res_stack[-len(block.resnets):]
        res_stack = res_stack[: -len(block.resnets)]
        kw = dict(encoder_hidden_states=ehs) if getattr(block, "has_cross_attention", False) else {}
        upsample_size = res_stack[-1].shape[2:] if i < len(unet.up_blocks) - 1 else None
        sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                       image_only_indicator=image_only_indicator, **kw)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    return sample.reshape(b, f, *sample.shape[1:])


@dataclass
class SVDCondition:
    """Everything an SVD denoiser call needs besides latents and sigmas (classifier-free pairs built once)."""

    image_embeds: torch.Tensor  # [B, 1, D]
    image_latent: torch.Tensor  # [B, C, h, w], unscaled VAE mode of the conditioning frame
    added_time_ids: torch.Tensor  # [B, 3]
    frames: tuple[int, ...] | None = None  # output frame of each window position (FIFO); None: 0 .. F-1


class SVDDenoiser:
    """EDM-preconditioned SVD UNet with optional classifier-free guidance ramped over the output frames.

    Output frame k gets min + (max - min) * min(k, F - 1) / (F - 1): for one window (base sampler, FIFO's base
    video, each autoregressive clip) that is the SVD pipeline's linspace(min, max, F) over window positions.
    In FIFO a window holds frames at every distance from the conditioning image, so the ramp runs over the
    output frame each slot becomes (`SVDCondition.frames`), not over its window position: the ramp says how far
    a frame is from the image that conditions it (the pipeline raises guidance with that distance), and a
    window position says nothing about it. Over positions, a frame's guidance would change at every step as
    it moves through the queue, and with lookahead the written half of every window (positions F/2 .. F-1)
    would only ever see the upper half of the ramp, so every FIFO frame, the first ones included, would get
    more guidance than the pipeline gives it. Frames beyond the window get the maximum; warm-up frames
    and context slots (negative indices) the minimum.
    """

    def __init__(self, model: SVD, min_guidance: float = 1.0, max_guidance: float = 3.0):
        self.model = model
        self.min_guidance = min_guidance
        self.max_guidance = max_guidance
        self.calls = 0  # UNet calls (each with CFG counts once; tests use it to check FIFO's cost)

    @property
    def device(self) -> torch.device:
        """Where the UNet is: samplers put their latents here."""
        return next(self.model.unet.parameters()).device

    @torch.no_grad()
    def condition(self, image_bchw: torch.Tensor, fps: int, motion_bucket_id: int, noise_aug_strength: float,
                  generator: torch.Generator | None = None) -> SVDCondition:
        """The pipeline's conditioning: CLIP of the clean image, VAE mode of the noise-augmented image.

        Everything is on the image's device; the augmentation noise is drawn on the generator's (CPU for a CPU
        generator, so a seed gives the same conditioning on every device)."""
        m = self.model
        device = image_bchw.device
        image_embeds = m.encode_image(image_bchw)
        aug = randn(image_bchw.shape, generator, device)
        image_latent = m.encode_condition_frame(image_bchw + noise_aug_strength * aug)
        b = image_bchw.shape[0]
        ids = m.added_time_ids(*(torch.full((b,), float(v), device=device)
                                 for v in (fps - 1, motion_bucket_id, noise_aug_strength)))
        return SVDCondition(image_embeds, image_latent, ids)

    @torch.no_grad()
    def recondition(self, latent_bchw: torch.Tensor, cond: SVDCondition, weight: float = 1.0) -> SVDCondition:
        """Condition on a generated frame (scaled latent [B, C, h, w]), mixed with `cond` by `weight`.

        Used by the seed-frame option and the autoregressive sampler. The decoded frame is encoded without
        noise augmentation noise (deterministic); the micro-conditioning ids stay as they were.
        """
        m = self.model
        image = m.decode_video(latent_bchw.unsqueeze(1), chunk=1)[:, 0].clamp(-1, 1)
        embeds = m.encode_image(image).to(cond.image_embeds.dtype)
        latent = m.encode_condition_frame(image).to(cond.image_latent.dtype)
        w = float(weight)
        return SVDCondition((1 - w) * cond.image_embeds + w * embeds, (1 - w) * cond.image_latent + w * latent,
                            cond.added_time_ids)

    def guidance_scales(self, frames) -> torch.Tensor:
        """[F] guidance of a window whose positions become output frames `frames` (see the class docstring)."""
        frames = list(frames)
        window = len(frames)
        k = torch.tensor(frames, dtype=torch.float32).clamp(0, window - 1)
        return self.min_guidance + (self.max_guidance - self.min_guidance) * k / max(window - 1, 1)

    @property
    def guided(self) -> bool:
        return self.max_guidance > 1.0 or self.min_guidance > 1.0

    @torch.no_grad()
    def __call__(self, latents_bfchw: torch.Tensor, sigma_bf: torch.Tensor, cond: SVDCondition) -> torch.Tensor:
        m = self.model
        b, f = latents_bfchw.shape[:2]
        sc = edm_scalings(sigma_bf)
        x_in = append_dims(sc.c_in, latents_bfchw.ndim) * latents_bfchw
        frame_latent = cond.image_latent.unsqueeze(1).expand(-1, f, -1, -1, -1)
        if self.guided:  # unconditional half: zero image embedding and zero conditioning latent
            x_in = torch.cat([x_in, x_in])
            frame_latent = torch.cat([torch.zeros_like(frame_latent), frame_latent])
            ehs = torch.cat([torch.zeros_like(cond.image_embeds), cond.image_embeds])
            ids = torch.cat([cond.added_time_ids, cond.added_time_ids])
            c_noise = torch.cat([sc.c_noise, sc.c_noise])
        else:
            ehs, ids, c_noise = cond.image_embeds, cond.added_time_ids, sc.c_noise
        unet_in = torch.cat([x_in, frame_latent], dim=2).to(m.unet.dtype)
        out = unet_forward_per_frame(m.unet, unet_in, c_noise.to(m.unet.dtype), ehs.to(m.unet.dtype), ids).float()
        self.calls += 1
        if self.guided:
            uncond, cond_out = out.chunk(2)
            scale = self.guidance_scales(range(f) if cond.frames is None else cond.frames).to(out.device)
            out = uncond + append_dims(scale, out.ndim - 1) * (cond_out - uncond)
        return append_dims(sc.c_out, out.ndim) * out + append_dims(sc.c_skip, out.ndim) * latents_bfchw


@dataclass
class SVDPipeline:
    """Image-to-video (`vidgen.models.base.Pipeline`): a prompt row's `image` is the first frame."""

    model: SVD
    denoiser: SVDDenoiser
    scheduler: object

    def condition(self, row: dict, g: GenerateConfig, image_fn, generator) -> SVDCondition:
        return self.denoiser.condition(image_fn(row["image"]), g.fps, g.motion_bucket_id, g.noise_aug_strength,
                                       generator)

    def frames(self, cond: SVDCondition, indices: list[int]) -> SVDCondition:
        return replace(cond, frames=tuple(indices))  # one image conditions every frame; the ramp reads indices

    def latent_shape(self, g: GenerateConfig, window: int) -> tuple[int, ...]:
        s = self.model.vae_scale_factor
        return (1, window, self.model.unet.config.out_channels, g.height // s, g.width // s)


def build_pipeline(m: ModelConfig, g: GenerateConfig) -> SVDPipeline:
    model = svd.build(m.flavor, path=m.path, cache_dir=m.cache_dir, num_frames=m.num_frames, unet_path=g.unet,
                      attention=m.attention)
    if g.lora:
        lora.load_lora(model.unet, g.lora, g.lora_scale)
    if g.consistency.qcache:
        install_qcache(model.unet, g.consistency.qcache_weight)
    return SVDPipeline(model, SVDDenoiser(model, g.min_guidance_scale, g.max_guidance_scale), model.scheduler)


def validation_video(model: SVD, image: np.ndarray, validation: dict, num_steps: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One base-sampler window from a held-out first frame (uint8 [H, W, 3]): frames in [-1, 1], [F, 3, H, W]."""
    denoiser = SVDDenoiser(model, 1.0, 3.0)
    device = next(model.unet.parameters()).device
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(127.5).sub(1)
    cond = denoiser.condition(img.to(device), validation["fps"], validation["motion_bucket_id"], 0.02, generator)
    h, w = img.shape[-2:]
    s = model.vae_scale_factor
    latents = base_sample(denoiser, cond, model.scheduler, (1, validation["num_frames"], 4, h // s, w // s),
                          num_steps, generator=generator)
    with torch.no_grad():
        return model.decode_video(latents, chunk=validation["num_frames"])[0]
