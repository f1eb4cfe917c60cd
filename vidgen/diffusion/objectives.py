"""Training objectives as pure functions over tensors.

Shapes: B batch, F frames, C latent channels, h/w latent height/width.

SVD is trained in the EDM formulation (Karras et al. 2022) with v-prediction, as SVD Xtend does:
    sigma ~ LogNormal(p_mean, p_std)               noisy = x0 + sigma * n
    c_in = 1 / sqrt(sigma^2 + 1)                    c_noise = 0.25 * ln(sigma)   (the UNet's "timestep")
    c_skip = 1 / (sigma^2 + 1)                      c_out = -sigma / sqrt(sigma^2 + 1)
    denoised = c_out * unet(c_in * noisy, c_noise) + c_skip * noisy
    loss = mean_b( mean_{f,c,h,w}( lambda(sigma) * (denoised - x0)^2 ) ),  lambda = (sigma^2 + 1) / sigma^2
These are exactly what diffusers' EulerDiscreteScheduler (v_prediction, continuous timesteps) inverts at
sampling time, so a model trained here samples with the stock scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidgen.diffusion.noise import rand, randn


def rand_log_normal(shape: tuple[int, ...], loc: float, scale: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """exp(loc + scale * N(0, 1)): k-diffusion's log-normal sigma sampler. Every draw in this module is made on
    the generator's device and then moved to `device` (vidgen.diffusion.noise)."""
    return (randn(shape, generator, device) * scale + loc).exp()


@dataclass
class EDMScalings:
    c_in: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_noise: torch.Tensor
    weight: torch.Tensor


def edm_scalings(sigma: torch.Tensor) -> EDMScalings:
    """Preconditioning for sigma_data = 1 and v-prediction; `sigma` of any shape."""
    s2 = sigma**2
    return EDMScalings(
        c_in=(s2 + 1).rsqrt(),
        c_skip=1 / (s2 + 1),
        c_out=-sigma * (s2 + 1).rsqrt(),
        c_noise=0.25 * sigma.log(),
        weight=(s2 + 1) / s2,
    )


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def edm_denoised(model_output: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 estimate from the UNet's v-prediction; sigma [B] or [B, F] broadcast over the rest."""
    sc = edm_scalings(append_dims(sigma, noisy.ndim))
    return sc.c_out * model_output + sc.c_skip * noisy


def edm_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """lambda-weighted MSE: per-sample mean over non-batch dims, then the batch mean."""
    weight = append_dims(edm_scalings(sigma_b).weight, x0.ndim)
    per_sample = (weight * (denoised.float() - x0.float()) ** 2).flatten(1).mean(1)
    return per_sample.mean()


def conditioning_dropout_masks(batch: int, p: float, generator: torch.Generator | None = None,
                               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """InstructPix2Pix-style masks (1 keep, 0 drop) for the image embedding and the conditioning latent.

    One uniform draw r per sample: r < 2p drops the embedding, p <= r < 3p drops the latent, so each is
    dropped 20% of the time at p = 0.1 and both together 10% (SVD Xtend's scheme, made per-sample).
    """
    r = rand((batch,), generator, device)
    keep_embedding = (r >= 2 * p).float()
    keep_latent = ((r < p) | (r >= 3 * p)).float()
    return keep_embedding, keep_latent


# ---------------------------------------------------------------------------------------------
# DDPM (Hotshot-XL / SDXL): discrete timesteps t in [0, T), alphas_cumprod a_t from the scheduler config.
#     noisy = sqrt(a_t) x0 + sqrt(1 - a_t) n         eps target: n     v target: sqrt(a_t) n - sqrt(1 - a_t) x0
#     snr_t = a_t / (1 - a_t)                         min-SNR weight (Hang et al. 2023): min(snr, gamma) / snr for
#                                                     eps, min(snr, gamma) / (snr + 1) for v (diffusers' scripts)


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at integer `timesteps` (any shape)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps.long()].double()
    return (a / (1 - a)).float()


def offset_noise(shape_bfchw: tuple[int, ...], offset: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, 1) noise plus `offset` * one N(0, 1) draw per video and channel (shared by frames and pixels),
    as Hotshot's `randn(B, C, 1, 1, 1)` in its (B, C, F, H, W) layout; zero offset draws nothing extra."""
    noise = randn(shape_bfchw, generator, device)
    if offset:
        b, _, c = shape_bfchw[:3]
        noise = noise + offset * randn((b, 1, c, 1, 1), generator, device)
    return noise


def ddpm_noisy(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
               timesteps_b: torch.Tensor) -> torch.Tensor:
    """The forward process at per-sample timesteps [B] (DDPMScheduler.add_noise, any x0 rank)."""
    a = append_dims(alphas_cumprod.to(x0.device)[timesteps_b.long()].to(x0.dtype), x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddpm_target(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps_b: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """What the UNet regresses: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = append_dims(alphas_cumprod.to(x0.device)[timesteps_b.long()].to(x0.dtype), x0.ndim)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type={prediction_type!r}: expected epsilon or v_prediction")


def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weight; `gamma` None gives 1 (plain MSE). gamma is any float (Hotshot fixed it at 1.0)."""
    if gamma is None:
        return torch.ones_like(snr)
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """mean_b(weight_b * mean_{rest}((pred - target)^2)): per-sample MSE, weighted, batch mean."""
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return (weight_b.to(per_sample.device) * per_sample).mean()


def caption_keep_mask(batch: int, p: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """1 keeps a sample's caption, 0 drops it (zero text embeddings: SDXL's unconditional input); P(drop) = p."""
    return (rand((batch,), generator, device) >= p).float()
