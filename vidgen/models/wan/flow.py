"""Flow matching as the published Wan trainers define it: pure functions over tensors.

Shapes: B batch, L latent frames, C channels, h/w latents.

A clip's latents x0 and Gaussian noise n meet at noise level sigma in [0, 1]:

    x_t = (1 - sigma) * x0 + sigma * n        the transformer sees x_t at timestep t = 1000 * sigma
    target = n - x0                           the velocity it predicts (dx_t / dsigma)
    loss = weight(sigma) * mean((v - target)^2)

The default (`train.flow.timesteps=table`, `shift=5`, `weighting=bell`) is DiffSynth-Studio's Wan recipe
(diffsynth/schedulers/flow_match.py, FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True) with
set_timesteps(1000, training=True), and its Wan training loss): sigma is one of the 1000 entries of the table
linspace(1, 0, 1001)[:-1], shifted by s * sigma / (1 + (s - 1) * sigma), each entry equally likely; the weight of
entry t (the timestep, 1000 * sigma) is the bell exp(-2 ((t - 500) / 1000)^2), less its minimum over the table,
scaled so the table's weights sum to 1000. DiffSynth draws one level per batch of one clip; here each clip draws
its own.

Options: `timesteps=uniform` (sigma ~ U(0, 1), then shifted) and `timesteps=logit_normal` (sigma = sigmoid(N(mean,
std)), then shifted: finetrainers' flow_matching sampling, and musubi-tuner's `shift` sampling with std its
sigmoid_scale and shift its discrete_flow_shift); `weighting=none` (plain MSE: finetrainers' and musubi-tuner's
defaults).
"""

from __future__ import annotations

import torch

from vidgen.diffusion.noise import rand, randint, randn

TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's (SD3's) time shift: more of the schedule at high noise for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def table(shift: float, n: int = TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [n], weights [n]) of DiffSynth-Studio's training schedule (descending sigmas; see the module doc)."""
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, n + 1)[:-1], shift)
    t = sigmas * TRAIN_TIMESTEPS
    bell = torch.exp(-2 * ((t - n / 2) / n) ** 2)
    bell = bell - bell.min()
    return sigmas, bell * (n / bell.sum())


def draw(b: int, flow, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma [B], weight [B]) for `b` clips under `flow` (a vidgen.config.FlowConfig), on the CPU."""
    sigmas, weights = table(flow.shift)
    if flow.timesteps == "table":
        i = randint(0, len(sigmas), (b,), generator)
        sigma = sigmas[i]
    elif flow.timesteps == "uniform":
        sigma = shift_sigmas(rand((b,), generator), flow.shift)
    else:  # logit_normal
        sigma = shift_sigmas(torch.sigmoid(flow.logit_mean + flow.logit_std * randn((b,), generator)), flow.shift)
    if flow.weighting == "none":
        return sigma, torch.ones(b)
    # the bell at the table entry nearest to sigma (DiffSynth's training_weight looks it up the same way)
    return sigma, weights[(sigmas[None] - sigma[:, None]).abs().argmin(1)]


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    s = sigma_b.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """Mean over clips of weight * the clip's MSE against the velocity target, in fp32."""
    per_clip = (pred.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
    return (weight_b.to(per_clip) * per_clip).mean()
