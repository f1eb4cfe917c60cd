"""What every model family with a diffusers image autoencoder (`vae`) shares.

Shapes: B batch, F frames, C latent channels, H/W pixels, h/w latents.
"""

from __future__ import annotations

import torch

from vidgen.diffusion.noise import randn


class LatentVideoModel:
    """Mixin for the model dataclasses (SVD, Hotshot): VAE geometry and per-frame video encoding."""

    vae: torch.nn.Module

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def video_posterior(self, frames_bfchw: torch.Tensor) -> torch.Tensor:
        """fp32 parameters [B, F, 2C, h, w] (mean, then logvar) of the VAE posterior of frames in [-1, 1].

        Deterministic: this is what the latent cache stores; `sample_latents` draws from it."""
        b, f = frames_bfchw.shape[:2]
        dist = self.vae.encode(frames_bfchw.flatten(0, 1).to(self.vae.dtype)).latent_dist
        return dist.parameters.float().unflatten(0, (b, f))

    def sample_latents(self, posterior_bfchw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents [B, F, C, h, w]: one draw of the posterior (as training uses), from `generator`, drawn on
        the generator's device and moved to the posterior's (what diffusers' `sample` does, in fp32)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # lazy: heavy (diffusers)

        b, f = posterior_bfchw.shape[:2]
        dist = DiagonalGaussianDistribution(posterior_bfchw.flatten(0, 1))
        z = dist.mean + dist.std * randn(dist.mean.shape, generator, dist.mean.device, dist.mean.dtype)
        # contiguous: the VAE can hand back channels-last latents, whose conv backward crashes torch 2.13 on CPU
        return (z * self.scaling_factor).unflatten(0, (b, f)).contiguous()

    def encode_video(self, frames_bfchw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents [B, F, C, h, w] of frames in [-1, 1]: a sample of the posterior."""
        return self.sample_latents(self.video_posterior(frames_bfchw), generator)
