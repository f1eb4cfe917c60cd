"""Random draws and tensors on the wrong device, caught on a CPU-only machine.

On a GPU, `torch.randn(..., generator=<CPU generator>, device="cuda")` raises, and so does every op that mixes a
CPU tensor (other than a 0-dim one) with CUDA tensors; on the CPU neither can show. These tests put the models and
inputs on the `meta` device (torch runs whole diffusers models there, shapes only) under `CudaLikeDevices`, a torch
function mode that makes meta behave as CUDA would: a draw from a generator of another device type raises, and so
does any op whose tensors sit on two devices (meta checks some ops itself, but not matmul, conv, embedding,
searchsorted, index_select or in-place adds). Then every sampler, both denoisers and validation sampling must run
and hand back meta tensors.

Shapes: B batch, F frames, C latent channels, h/w latents, H/W pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

META = torch.device("meta")
T = torch.Tensor

# draws whose target device is the `device` argument (torch's default device when not given)
FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm}
# draws whose target device is the first tensor argument's
OF_INPUT = {torch.randn_like, torch.rand_like, torch.randint_like, torch.normal, torch.bernoulli, torch.multinomial,
            torch.poisson, T.normal_, T.uniform_, T.bernoulli_, T.bernoulli, T.random_, T.exponential_,
            T.log_normal_, T.cauchy_, T.geometric_, T.multinomial}
# moves, copies and indexing: CUDA accepts tensors of another device here
CROSS_DEVICE_OK = {T.to, T.copy_, T.cpu, T.cuda, T.type, T.type_as, T.__getitem__, T.__setitem__, T.index_put_,
                   T.index_put, torch.index_put, torch.as_tensor, torch.tensor}


class CudaLikeDevices(TorchFunctionMode):
    """Raise where CUDA would: a generator drawing for another device type, or an op mixing devices."""

    def __init__(self):
        super().__init__()
        self.draws = 0  # random draws seen (tests check they saw some)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in FACTORIES or func in OF_INPUT:
            self.draws += 1
            gen = kwargs.get("generator")
            if func in FACTORIES:
                target = torch.device(kwargs.get("device") or torch.get_default_device())
            else:
                target = torch.device(kwargs.get("device") or tensors[0].device)
            if gen is not None and gen.device.type != target.type:
                raise RuntimeError(f"{_name(func)}: Expected a '{target.type}' device type for generator but found "
                                   f"'{gen.device.type}'")
        elif func not in CROSS_DEVICE_OK:
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"{_name(func)}: Expected all tensors to be on the same device, but found at "
                                   f"least two devices, {', '.join(sorted(map(str, devices)))}!")
        return func(*args, **kwargs)


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # CPU, as generation and validation use


def _on_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


# ---------------------------------------------------------------------------------------------- the mode itself


def test_the_mode_raises_where_cuda_would():
    m = torch.zeros(2, 3, device=META)
    with CudaLikeDevices():
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.randn(2, 3, generator=_gen(), device=META)
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.rand_like(m, generator=_gen())
        with pytest.raises(RuntimeError, match="same device"):
            torch.nn.functional.linear(m, torch.zeros(4, 3))  # meta alone lets this one through
        with pytest.raises(RuntimeError, match="same device"):
            torch.searchsorted(torch.arange(5.0), m.flatten())
        with pytest.raises(RuntimeError, match="same device"):
            m.clone().add_(torch.ones(2, 3))
        # what CUDA accepts: CPU draws moved over, 0-dim CPU tensors, CPU indices, copies into device tensors
        assert _on_meta(torch.randn(2, 3, generator=_gen()).to(META) * torch.tensor(2.0))
        assert _on_meta(m[:, torch.tensor([0, 2])])
        m[:, :1] = torch.ones(2, 1)
    # and meta itself already refuses the elementwise ops and cat with a non-scalar CPU tensor
    for op in (lambda: m * torch.ones(2, 3), lambda: torch.cat([m, torch.ones(2, 3)]),
               lambda: m * torch.arange(3)):
        with pytest.raises(RuntimeError, match="device"):
            op()


def test_noise_draws_on_the_generator_device_and_keeps_cpu_numbers():
    from vidgen.diffusion import noise

    with CudaLikeDevices():
        x = noise.randn((2, 3), _gen(5), META)
        assert _on_meta(x) and x.dtype == torch.float32
        assert _on_meta(noise.randn((2, 3), None, META, torch.float16))
        assert _on_meta(noise.rand((4,), _gen(), META)) and _on_meta(noise.randint(0, 7, (4,), _gen(), META))
        assert torch.equal(noise.randn((2, 3), _gen(5)), torch.randn(2, 3, generator=_gen(5)))  # bit-identical
        assert torch.equal(noise.rand((4,), _gen(5), "cpu"), torch.rand(4, generator=_gen(5)))
        assert torch.equal(noise.randint(0, 9, (4,), _gen(5)), torch.randint(0, 9, (4,), generator=_gen(5)))
        assert noise.randn((3,), _gen(5), dtype=torch.float64).dtype == torch.float64


# ---------------------------------------------------------------------------------------------- SVD


@pytest.fixture(scope="module")
def svd_meta():
    from vidgen.models.svd import model as svd

    return svd.tiny(num_frames=4).to(META)


def _svd_cond(den, generator: torch.Generator | None = None):
    """Conditioning on meta; sampler tests pass no generator, so a failure there is the sampler's own."""
    image = torch.zeros(1, 3, 64, 64, device=META)
    return den.condition(image, 7, 127, 0.02, generator)


@torch.no_grad()
def test_svd_denoiser_condition_and_call_stay_on_the_model_device(svd_meta):
    from vidgen.models.svd.pipeline import SVDDenoiser

    den = SVDDenoiser(svd_meta, 1.0, 3.0)  # guided: the linspace ramp too
    with CudaLikeDevices() as mode:
        cond = _svd_cond(den, _gen(1))
        assert all(_on_meta(t) for t in (cond.image_embeds, cond.image_latent, cond.added_time_ids))
        x = torch.zeros(1, 4, 4, 8, 8, device=META)
        out = den(x, torch.full((1, 4), 2.0, device=META), cond)
    assert _on_meta(out) and out.shape == x.shape and mode.draws >= 1


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["base", "fifo", "autoregressive"])
def test_svd_samplers_return_latents_on_the_model_device(svd_meta, sampler):
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import autoregressive_sample, base_sample, fifo_sample
    from vidgen.models.svd.pipeline import SVDDenoiser

    den = SVDDenoiser(svd_meta, 1.0, 3.0)
    sched, shape = svd_meta.scheduler, (1, 4, 4, 8, 8)
    with CudaLikeDevices():
        cond = _svd_cond(den)
        if sampler == "base":
            out = base_sample(den, cond, sched, shape, 2, generator=_gen())
            assert out.shape == shape
        elif sampler == "fifo":  # the queue's initial and tail noise, with seed-frame reconditioning
            out = fifo_sample(den, cond, sched, shape, 5, FifoPlan(4, 1), _gen(), uniform=True,
                              reseed=lambda head, c: den.recondition(head, c, 0.5))
            assert out.shape == (1, 5, 4, 8, 8)
        else:  # the overlap blend weights meet the latents
            out = autoregressive_sample(den, cond, sched, shape, 6, 2, den.recondition, overlap=2, generator=_gen())
            assert out.shape == (1, 6, 4, 8, 8)
    assert _on_meta(out)


@torch.no_grad()
def test_fifo_accepts_a_base_video_from_another_device(svd_meta):
    """A cached base video (read onto the CPU) still gives a queue on the denoiser's device."""
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import fifo_sample
    from vidgen.models.svd.pipeline import SVDDenoiser

    den = SVDDenoiser(svd_meta, 1.0, 1.0)
    with CudaLikeDevices():
        cond = _svd_cond(den)
        out = fifo_sample(den, cond, svd_meta.scheduler, (1, 4, 4, 8, 8), 4, FifoPlan(4, 1, lookahead=False),
                          _gen(), base=torch.zeros(1, 4, 4, 8, 8))
    assert _on_meta(out) and out.shape == (1, 4, 4, 8, 8)


# ---------------------------------------------------------------------------------------------- Hotshot


@pytest.fixture(scope="module")
def hotshot_meta():
    from vidgen.models.hotshot import model as hotshot
    from vidgen.models.hotshot.pipeline import controlnet_from_spatial

    model = hotshot.tiny(0)
    controlnet = controlnet_from_spatial(model)
    return model.to(META), controlnet.to(META)


@torch.no_grad()
def test_hotshot_denoiser_with_control_frames_stays_on_the_model_device(hotshot_meta):
    from vidgen.models.hotshot.pipeline import HotshotDenoiser

    model, controlnet = hotshot_meta
    den = HotshotDenoiser(model, guidance_scale=2.0, controlnet=controlnet)
    control = np.zeros((1, 2, 64, 64, 3), dtype=np.uint8)  # uint8 [B, F, H, W, 3], as read from files
    with CudaLikeDevices():
        cond = den.condition(["a car"], 64, 64, control_frames=control)
        assert all(_on_meta(t) for t in (cond.prompt_embeds, cond.pooled, cond.time_ids, cond.control))
        x = torch.zeros(1, 2, 4, 8, 8, device=META)
        out = den(x, torch.tensor([[2.0, 5.0]], device=META), cond)  # a sigma per frame, as FIFO gives
    assert _on_meta(out) and out.shape == x.shape


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["base", "fifo"])
def test_hotshot_samplers_return_latents_on_the_model_device(hotshot_meta, sampler):
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import base_sample, fifo_sample
    from vidgen.models.hotshot.pipeline import DDIMSigmas, HotshotDenoiser

    model, _ = hotshot_meta
    den = HotshotDenoiser(model, guidance_scale=1.0)
    sched, shape = DDIMSigmas(model.scheduler.config), (1, 2, 4, 8, 8)
    with CudaLikeDevices():
        cond = den.condition(["a car"], 64, 64)
        if sampler == "base":
            out = base_sample(den, cond, sched, shape, 2, generator=_gen())
        else:
            out = fifo_sample(den, cond, sched, shape, 3, FifoPlan(2, 1, lookahead=False), _gen())
    assert _on_meta(out) and out.shape[:2] == (1, 2 if sampler == "base" else 3)


# ---------------------------------------------------------------------------------------------- validation


def _decode_checker(model, seen: list):
    """decode_video stand-in: records that latents arrived on the model's device, returns CPU frames."""
    def decode(latents, chunk=8):
        seen.append(latents.device)
        b, f, _, h, w = latents.shape
        s = model.vae_scale_factor
        return torch.zeros(b, f, 3, h * s, w * s)
    return decode


@pytest.mark.parametrize("family", ["svd", "hotshot"])
def test_validation_videos_sample_on_the_model_device(family, svd_meta, hotshot_meta, tmp_path, monkeypatch):
    from vidgen.config import ModelConfig
    from vidgen.models import registry
    from vidgen.train.validation import validation_videos

    model = svd_meta if family == "svd" else hotshot_meta[0]
    seen: list[torch.device] = []
    monkeypatch.setattr(model, "decode_video", _decode_checker(model, seen), raising=False)
    images = [np.zeros((64, 64, 3), np.uint8)] if family == "svd" else ["a car"]
    validation = dict(images=images, out_dir=str(tmp_path), fps=8, motion_bucket_id=127, num_frames=4 if
                      family == "svd" else 2, height=64, width=64)
    with CudaLikeDevices():
        paths = validation_videos(registry.spec(ModelConfig(family=family)), model, validation, step=3, num_steps=2)
    assert len(paths) == 1 and seen == [META]


# ---------------------------------------------------------------------------------------------- training draws


def test_training_draws_land_on_the_requested_device():
    from vidgen.diffusion.objectives import caption_keep_mask, conditioning_dropout_masks, offset_noise, rand_log_normal
    from vidgen.models.vae import LatentVideoModel

    class Latent(LatentVideoModel):
        vae = type("V", (), {"config": type("C", (), {"scaling_factor": 0.18215})})()

    with CudaLikeDevices() as mode:
        outs = [rand_log_normal((2,), 0.0, 1.0, _gen(), META), *conditioning_dropout_masks(2, 0.1, _gen(), META),
                offset_noise((1, 2, 4, 2, 2), 0.1, _gen(), META), caption_keep_mask(2, 0.1, _gen(), META),
                Latent().sample_latents(torch.zeros(1, 2, 8, 2, 2, device=META), _gen())]
    assert all(_on_meta(t) for t in outs) and mode.draws >= 6
