"""Samplers over the per-frame denoiser interface: `base` (one window), `fifo` and `autoregressive` (any length).

Shapes: B batch, F frames, C latent channels, h/w latent size.

Devices: every sampler returns latents on the denoiser's device (its `device` attribute; the CPU for plain
functions without one). Noise comes from `vidgen.diffusion.noise`, drawn where the generator lives (seeded CPU
generators: the same video on every GPU type) and then moved there.

Both use the model's own scheduler only for its sigma table (EDM, Karras spacing for SVD) and take plain
Euler steps x <- x + (x - x0) / sigma * (sigma_next - sigma): the step diffusers' EulerDiscreteScheduler
takes with its default (churn-free) settings, so `base` reproduces the SVD pipeline's latents.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from vidgen.diffusion.fifo import FifoPlan, fifo_iterate, init_queue
from vidgen.diffusion.noise import randn

log = logging.getLogger(__name__)


def denoiser_device(denoise: Callable) -> torch.device:
    """Where `denoise` computes: its `device` attribute (the vidgen denoisers have one), else the CPU."""
    return torch.device(getattr(denoise, "device", None) or "cpu")


def sampling_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    """Descending sigmas of length num_steps + 1 ending in 0, from a copy of `scheduler`."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps, device="cpu")
    return sched.sigmas.float()


def initial_noise_scale(scheduler, sigma_max: float) -> float:
    """diffusers' `init_noise_sigma`: sigma_max, or sqrt(sigma_max^2 + 1) for leading/linspace-less spacing; a
    scheduler with its own `initial_noise_scale` (flow matching's pure noise: 1 + sigma_max) says it itself."""
    if hasattr(scheduler, "initial_noise_scale"):
        return scheduler.initial_noise_scale(sigma_max)
    if getattr(scheduler.config, "timestep_spacing", "linspace") in ("linspace", "trailing"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


def euler_sample(denoise: Callable, cond: object, latents: torch.Tensor, sigmas: torch.Tensor,
                 progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Plain Euler over `sigmas` (descending, last 0) with one sigma for every frame."""
    b, f = latents.shape[:2]
    x = latents
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, torch.full((b, f), s, device=x.device), cond)
        x = x + (x - x0) / s * (s_next - s)
        if progress:
            progress()
    return x


def base_sample(denoise, cond, scheduler, shape_bfchw: tuple[int, ...], num_steps: int,
                generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                progress=None) -> torch.Tensor:
    """One window of F frames: what the SVD pipeline does, in latent space; on the denoiser's device."""
    sigmas = sampling_sigmas(scheduler, num_steps)
    device = denoiser_device(denoise)
    latents = randn(shape_bfchw, generator, device) if latents is None else latents.to(device)
    latents = latents * initial_noise_scale(scheduler, sigmas[0].item())
    return euler_sample(denoise, cond, latents, sigmas, progress)


def fifo_sample(denoise, cond, scheduler, shape_bfchw: tuple[int, ...], num_frames: int, plan: FifoPlan,
                generator: torch.Generator | None = None, progress=None, base: torch.Tensor | None = None,
                uniform: bool = False, reseed=None, window_cond=None) -> torch.Tensor:
    """`num_frames` latent frames [B, N, C, h, w] by diagonal denoising over a window of F frames.

    The base video uses the same nf-step sigma table as the queue, as the original does. Pass `base`
    (e.g. from a cache) to skip sampling it; `generator` then only draws the queue noise.
    `uniform` and `reseed` are the FIFO+ options, `window_cond` per-frame conditions (see `vidgen.diffusion.fifo`);
    with `window_cond` the base video is conditioned on output frames 0 .. F-1, whose places it takes in the queue.
    """
    sigmas = sampling_sigmas(scheduler, plan.steps)  # descending, nf + 1
    if base is None:
        base_cond = cond if window_cond is None else window_cond(cond, list(range(plan.window)))
        base = base_sample(denoise, base_cond, scheduler, shape_bfchw, plan.steps, generator=generator)
    base = base.to(denoiser_device(denoise))
    levels = sigmas.flip(0)  # ascending: L[0] = 0 ... L[nf] = sigma_max
    queue = init_queue(base, levels, plan, generator=generator, uniform=uniform)
    frames = []
    for head in fifo_iterate(denoise, cond, queue, levels, plan, num_frames, generator=generator, reseed=reseed,
                             window_cond=window_cond):
        frames.append(head)
        if progress:
            progress()
    return torch.stack(frames, dim=1)


def autoregressive_sample(denoise, cond, scheduler, shape_bfchw: tuple[int, ...], num_frames: int, num_steps: int,
                          recondition: Callable[[torch.Tensor, object], object], overlap: int = 0,
                          generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """Clip after clip of F frames, each conditioned on `recondition(last frame so far, cond)`.

    The first `overlap` frames of a new clip cover the same time as the last `overlap` frames so far and
    are blended with them, the new clip's weight rising linearly (k / (overlap + 1)); the rest is appended,
    so each clip after the first adds F - overlap frames. Returns [B, N, C, h, w].
    (SVD reproduces its conditioning image as frame 0, so overlap >= 1 avoids a repeated frame.)
    """
    f = shape_bfchw[1]
    if not 0 <= overlap < f:
        raise ValueError(f"autoregressive overlap={overlap}: expected 0 <= overlap < window={f}")
    video = base_sample(denoise, cond, scheduler, shape_bfchw, num_steps, generator=generator, progress=progress)
    while video.shape[1] < num_frames:
        cond = recondition(video[:, -1], cond)
        clip = base_sample(denoise, cond, scheduler, shape_bfchw, num_steps, generator=generator, progress=progress)
        if overlap:
            w = torch.arange(1, overlap + 1, dtype=clip.dtype, device=clip.device).view(1, -1, 1, 1, 1) / (overlap + 1)
            blended = (1 - w) * video[:, -overlap:] + w * clip[:, :overlap]
            video = torch.cat([video[:, :-overlap], blended, clip[:, overlap:]], dim=1)
        else:
            video = torch.cat([video, clip], dim=1)
    return video[:, :num_frames]


def autoregressive_clips(window: int, num_frames: int, overlap: int) -> int:
    """Clips `autoregressive_sample` runs for `num_frames` frames."""
    return 1 + max(0, -(-(num_frames - window) // (window - overlap)))
