"""EDM objective (training.md 1.4): closed forms, the loss by hand, and agreement with diffusers' sampler.

Shapes: B batch, F frames, C latent channels, h/w latent size.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from vidgen.diffusion.objectives import (
    conditioning_dropout_masks,
    edm_denoised,
    edm_loss,
    edm_scalings,
    rand_log_normal,
)
from vidgen.diffusion.samplers import initial_noise_scale, sampling_sigmas
from vidgen.models.svd.model import SVD_SCHEDULER

SIGMAS = [0.002, 0.05, 0.5, 1.0, 2.0, 14.6, 80.0, 700.0]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _v_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model output that makes `edm_denoised` exactly x0, derived by hand from training.md 1.4:

    c_out * v + c_skip * (x0 + s n) = x0
    =>  v = (x0 - c_skip (x0 + s n)) / c_out = (n - s x0) / sqrt(s^2 + 1),
    i.e. diffusers' v = alpha_t * eps - sigma_t * x0 with alpha_t = 1 / sqrt(s^2 + 1), sigma_t = s alpha_t.
    """
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (noise - s * x0) / (s**2 + 1).sqrt()


@pytest.mark.parametrize("s", SIGMAS)
def test_edm_scalings_match_closed_forms(s):
    sc = edm_scalings(torch.tensor([s], dtype=torch.float64))
    assert sc.c_in.item() == pytest.approx(1 / math.sqrt(s * s + 1), rel=1e-12)
    assert sc.c_skip.item() == pytest.approx(1 / (s * s + 1), rel=1e-12)
    assert sc.c_out.item() == pytest.approx(-s / math.sqrt(s * s + 1), rel=1e-12)
    assert sc.c_noise.item() == pytest.approx(0.25 * math.log(s), rel=1e-12, abs=1e-15)
    assert sc.weight.item() == pytest.approx((s * s + 1) / (s * s), rel=1e-12)
    # sigma_data = 1 preconditioning identities: c_skip + c_out^2 = 1 and lambda * c_out^2 = 1
    assert (sc.c_skip + sc.c_out**2).item() == pytest.approx(1.0, rel=1e-12)
    assert (sc.weight * sc.c_out**2).item() == pytest.approx(1.0, rel=1e-12)


def test_edm_scalings_keep_shape():
    sigma = torch.rand(3, 5, dtype=torch.float64) + 0.1
    sc = edm_scalings(sigma)
    for t in (sc.c_in, sc.c_skip, sc.c_out, sc.c_noise, sc.weight):
        assert t.shape == (3, 5)


def test_denoised_and_loss_equal_a_hand_computation():
    b, f, c, h, w = 3, 2, 2, 2, 3
    x0, noise, out = (_randn(b, f, c, h, w, seed=k) for k in range(3))
    sigmas = [0.3, 1.7, 25.0]
    noisy = x0 + torch.tensor(sigmas, dtype=torch.float64).view(b, 1, 1, 1, 1) * noise

    denoised = edm_denoised(out, noisy, torch.tensor(sigmas, dtype=torch.float64))
    per_sample = []
    for i, s in enumerate(sigmas):
        c_skip, c_out, lam = 1 / (s * s + 1), -s / math.sqrt(s * s + 1), (s * s + 1) / (s * s)
        total, count = 0.0, 0
        for idx in itertools.product(range(f), range(c), range(h), range(w)):
            d = c_out * out[(i, *idx)].item() + c_skip * noisy[(i, *idx)].item()
            assert denoised[(i, *idx)].item() == pytest.approx(d, rel=1e-12, abs=1e-12)
            total += lam * (d - x0[(i, *idx)].item()) ** 2
            count += 1
        per_sample.append(total / count)
    expected = sum(per_sample) / b  # per-sample mean, then the batch mean
    loss = edm_loss(denoised, x0, torch.tensor(sigmas, dtype=torch.float64))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # edm_loss computes in float32


def test_loss_is_per_sample_mean_then_batch_mean():
    """Unequal per-sample weights: the batch mean of per-sample means, not one flat weighted mean."""
    x0 = torch.zeros(2, 1, 1, 1, 4)
    denoised = torch.ones(2, 1, 1, 1, 4)
    denoised[1] *= 2.0
    sigma = torch.tensor([1.0, 2.0])  # lambda = 2 and 1.25
    assert edm_loss(denoised, x0, sigma).item() == pytest.approx((2.0 * 1 + 1.25 * 4) / 2, rel=1e-6)


def test_per_frame_sigma_broadcasts_in_denoised():
    b, f = 2, 3
    x, out = _randn(b, f, 2, 2, 2, seed=3), _randn(b, f, 2, 2, 2, seed=4)
    sigma = torch.tensor([[0.1, 1.0, 10.0], [3.0, 0.5, 70.0]], dtype=torch.float64)
    got = edm_denoised(out, x, sigma)
    for i in range(b):
        for j in range(f):
            one = edm_denoised(out[i : i + 1, j : j + 1], x[i : i + 1, j : j + 1], sigma[i : i + 1, j])
            torch.testing.assert_close(got[i, j], one[0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("sigma_values", [[0.002, 0.7, 5.0], [1.0, 80.0, 700.0]])
def test_exact_v_target_gives_zero_loss_and_loss_is_v_mse(sigma_values):
    x0, noise = _randn(3, 4, 4, 8, 8, seed=5), _randn(3, 4, 4, 8, 8, seed=6)
    sigma = torch.tensor(sigma_values, dtype=torch.float64)
    noisy = x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    v = _v_target(x0, noise, sigma)

    torch.testing.assert_close(edm_denoised(v, noisy, sigma), x0, rtol=0, atol=1e-9)
    assert edm_loss(edm_denoised(v, noisy, sigma), x0, sigma).item() < 1e-10
    # lambda * c_out^2 = 1, so the weighted x0 loss is exactly the plain MSE in v-space
    delta = 0.1 * _randn(3, 4, 4, 8, 8, seed=7)
    loss = edm_loss(edm_denoised(v + delta, noisy, sigma), x0, sigma)
    assert loss.item() == pytest.approx((delta**2).mean().item(), rel=1e-5)


def _svd_scheduler(num_steps: int) -> EulerDiscreteScheduler:
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("num_steps", [3, 8, 25])
def test_diffusers_euler_scheduler_inverts_our_preconditioning(num_steps):
    """For v_prediction the stock scheduler's x0, input scaling and timesteps are ours: models trained here
    sample with the unmodified SVD pipeline."""
    sched = _svd_scheduler(num_steps)
    sigmas = sched.sigmas[:-1]
    assert sched.sigmas[-1].item() == 0.0
    assert sigmas[0].item() == pytest.approx(700.0, rel=1e-5)
    assert sigmas[-1].item() == pytest.approx(0.002, rel=1e-4)
    torch.testing.assert_close(sched.timesteps, edm_scalings(sigmas).c_noise, rtol=1e-6, atol=1e-6)

    x = 3.0 * torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        sc = edm_scalings(sigma)
        torch.testing.assert_close(sched.scale_model_input(x, t), sc.c_in * x, rtol=1e-6, atol=1e-7)
        out = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        step = sched.step(out, t, x)
        ours = edm_denoised(out, x, sigma.expand(2))
        torch.testing.assert_close(step.pred_original_sample, ours, rtol=1e-5, atol=1e-5)
        # the stock step is the plain Euler step our samplers take
        euler = x + (x - ours) / sigma * (sched.sigmas[i + 1] - sigma)
        torch.testing.assert_close(step.prev_sample, euler, rtol=1e-5, atol=1e-4)
        x = step.prev_sample


def test_sampler_sigma_table_and_initial_scale_match_the_scheduler():
    sched = _svd_scheduler(6)
    sigmas = sampling_sigmas(EulerDiscreteScheduler(**SVD_SCHEDULER), 6)
    torch.testing.assert_close(sigmas, sched.sigmas.float())
    init = initial_noise_scale(sched, sigmas[0].item())
    assert init == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


def test_rand_log_normal_moments_and_determinism():
    n, loc, scale = 200_000, 0.7, 1.6  # SVD Xtend's P_mean, P_std
    draws = rand_log_normal((n,), loc, scale, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n,) and (draws > 0).all()
    logs = draws.double().log()
    # standard errors: 1.6 / sqrt(2e5) = 0.0036 for the mean, ~0.0025 for the std
    assert logs.mean().item() == pytest.approx(loc, abs=0.02)
    assert logs.std().item() == pytest.approx(scale, abs=0.02)
    again = rand_log_normal((n,), loc, scale, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    cond = rand_log_normal((n,), -3.0, 0.5, generator=torch.Generator().manual_seed(1))  # conditioning aug
    assert cond.log().mean().item() == pytest.approx(-3.0, abs=0.01)
    assert cond.log().std().item() == pytest.approx(0.5, abs=0.01)


def test_conditioning_dropout_rates():
    n, p = 100_000, 0.1
    keep_emb, keep_lat = conditioning_dropout_masks(n, p, generator=torch.Generator().manual_seed(0))
    assert keep_emb.shape == keep_lat.shape == (n,)
    assert keep_emb.dtype == keep_lat.dtype == torch.float32
    assert set(keep_emb.unique().tolist()) <= {0.0, 1.0} and set(keep_lat.unique().tolist()) <= {0.0, 1.0}
    drop_emb, drop_lat = keep_emb == 0, keep_lat == 0
    # standard error at 100k draws: sqrt(0.2 * 0.8 / 1e5) = 0.0013; tolerance ~4.5 of them
    assert drop_emb.float().mean().item() == pytest.approx(2 * p, abs=0.006)
    assert drop_lat.float().mean().item() == pytest.approx(2 * p, abs=0.006)
    assert (drop_emb & drop_lat).float().mean().item() == pytest.approx(p, abs=0.005)
    assert (~drop_emb & ~drop_lat).float().mean().item() == pytest.approx(1 - 3 * p, abs=0.006)
    again = conditioning_dropout_masks(n, p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], keep_emb) and torch.equal(again[1], keep_lat)


def test_conditioning_dropout_zero_probability_keeps_everything():
    keep_emb, keep_lat = conditioning_dropout_masks(1000, 0.0, generator=torch.Generator().manual_seed(0))
    assert keep_emb.sum().item() == 1000 and keep_lat.sum().item() == 1000
