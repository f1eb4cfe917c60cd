"""SVD model: tiny flavor, per-frame-timestep UNet forward, parity with diffusers' pipeline, loading weights.

Shapes: B batch, F frames, C channels, H/W pixels, h/w latents.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen import storage
from vidgen.diffusion.samplers import base_sample
from vidgen.errors import ModelError
from vidgen.models.svd import model as svd
from vidgen.models.svd.pipeline import SVDCondition, SVDDenoiser, unet_forward_per_frame

F = 4  # frame window of the tiny models here


@pytest.fixture(scope="module")
def tiny() -> svd.SVD:
    return svd.tiny(seed=0, num_frames=F)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    """The tiny model written as a diffusers-format SVD directory."""
    root = tmp_path_factory.mktemp("svd-tiny")
    for name in svd.SUBFOLDERS:
        getattr(tiny, name).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def reference_output(tiny) -> torch.Tensor:
    """The tiny UNet's output on fixed inputs, to compare loaded copies against."""
    return _stock(tiny.unet, *_reference_inputs())


def _reference_inputs():
    sample, ehs, ids = _unet_inputs(b=1)
    return sample, torch.tensor([0.3]), ehs, ids


def _unet_inputs(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(b, F, 8, 8, 8, generator=g)
    ehs = torch.randn(b, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [4.0, 30.0, 0.1]])[:b]
    return sample, ehs, ids


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _same_output(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Outputs of two UNets holding bit-identical weights (the tests check the weights with `_same_weights`).

    Not bitwise: diffusers/safetensors may load every tensor as a view into one buffer, and CPU kernels pick
    their vector paths by pointer alignment, which moves float32 sums by ~1e-6. A wrong weight moves them by
    ~1e-1.
    """
    return a.shape == b.shape and (a - b).abs().max().item() < 1e-5


def _stock(unet, sample, t_b, ehs, ids) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, t_b, encoder_hidden_states=ehs, added_time_ids=ids).sample


# ------------------------------------------------------------------------------------------- tiny


def test_tiny_builds_fast_and_is_deterministic_per_seed(tiny):
    t0 = time.perf_counter()
    again = svd.tiny(seed=0, num_frames=F)
    assert time.perf_counter() - t0 < 2.0
    other = svd.tiny(seed=1, num_frames=F)
    for part in ("unet", "vae", "image_encoder"):
        a, b, c = (getattr(m, part).state_dict() for m in (tiny, again, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert tiny.vae_scale_factor == 8
    assert tiny.image_encoder.config.projection_dim == tiny.unet.config.cross_attention_dim
    assert not tiny.unet.training and not tiny.vae.training


def test_video_round_trip_shapes(tiny):
    frames = torch.rand(1, F, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = tiny.encode_video(frames, generator=torch.Generator().manual_seed(0))
        assert latents.shape == (1, F, 4, 8, 8)
        video = tiny.decode_video(latents, chunk=3)  # uneven chunks: 3 + 1 frames
        assert video.shape == (1, F, 3, 64, 64) and video.dtype == torch.float32
        emb = tiny.encode_image(frames[:, 0])
        assert emb.shape == (1, 1, 32)
    ids = tiny.added_time_ids(torch.tensor([6]), torch.tensor([127]), torch.tensor([0.02]))
    torch.testing.assert_close(ids, torch.tensor([[6.0, 127.0, 0.02]]))


# -------------------------------------------------------------------------------- per-frame forward


def test_per_frame_forward_equals_stock_forward_with_shared_timesteps(tiny):
    sample, ehs, ids = _unet_inputs()
    t_b = torch.tensor([0.9, -1.3])  # c_noise values: one per video
    stock = _stock(tiny.unet, sample, t_b, ehs, ids)
    with torch.no_grad():
        ours = unet_forward_per_frame(tiny.unet, sample, t_b[:, None].expand(2, F), ehs, ids)
    assert ours.shape == stock.shape == (2, F, 4, 8, 8)
    assert (ours - stock).abs().max().item() < 1e-5


def test_per_frame_forward_differs_when_timesteps_differ(tiny):
    sample, ehs, ids = _unet_inputs(b=1)
    shared = torch.full((1, F), 0.5)
    mixed = shared.clone()
    mixed[0, -1] = -1.0
    with torch.no_grad():
        a = unet_forward_per_frame(tiny.unet, sample, shared, ehs, ids)
        b = unet_forward_per_frame(tiny.unet, sample, mixed, ehs, ids)
    assert (a[0, -1] - b[0, -1]).abs().max().item() > 1e-3  # the frame whose timestep changed


def test_guidance_ramps_linearly_over_window_positions(tiny):
    """Guided x0 = uncond + linspace(min, max, F)[i] * (cond - uncond) at frame i (x0 is affine in the
    UNet output), with a zero embedding and zero latent as the unconditional input, as the pipeline."""
    g = torch.Generator().manual_seed(3)
    cond = SVDCondition(torch.randn(1, 1, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g),
                        torch.tensor([[6.0, 127.0, 0.02]]))
    uncond = SVDCondition(torch.zeros(1, 1, 32), torch.zeros(1, 4, 8, 8), cond.added_time_ids)
    x = 5 * torch.randn(1, F, 4, 8, 8, generator=g)
    sigma = torch.tensor([[5.0, 3.0, 2.0, 1.0]])  # per frame, as FIFO calls it
    plain = SVDDenoiser(tiny, 1.0, 1.0)
    x0_c, x0_u = plain(x, sigma, cond), plain(x, sigma, uncond)
    guided = SVDDenoiser(tiny, 1.0, 2.5)
    x0_g = guided(x, sigma, cond)
    scale = torch.linspace(1.0, 2.5, F).view(1, F, 1, 1, 1)
    torch.testing.assert_close(x0_g, x0_u + scale * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    assert guided.calls == 1 and plain.calls == 2 and guided.guided and not plain.guided


# ---------------------------------------------------------------------------- parity with diffusers


def test_base_sample_reproduces_the_diffusers_pipeline():
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    # The pipeline resizes PIL input to 224 for CLIP: the encoder must take 224 to compare embeddings.
    model = svd.tiny(seed=0, num_frames=F, cfg=svd.TinySVDConfig(clip_image_size=224, clip_patch_size=32))
    pipe = StableVideoDiffusionPipeline(vae=model.vae, image_encoder=model.image_encoder, unet=model.unet,
                                        scheduler=model.scheduler, feature_extractor=model.feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    start = torch.randn(1, F, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(fps=7, motion_bucket_id=127, noise_aug_strength=0.02)
    with torch.no_grad():
        ref = pipe(Image.fromarray(pixels), height=64, width=64, num_frames=F, num_inference_steps=3,
                   min_guidance_scale=1.0, max_guidance_scale=2.5, generator=torch.Generator().manual_seed(3),
                   latents=start.clone(), output_type="latent", **kw).frames

    den = SVDDenoiser(model, 1.0, 2.5)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    cond = den.condition(image, generator=torch.Generator().manual_seed(3), **kw)
    ours = base_sample(den, cond, model.scheduler, (1, F, 4, 8, 8), 3, latents=start.clone())
    assert ours.shape == ref.shape == (1, F, 4, 8, 8)
    assert (ours - ref).abs().max().item() < 1e-4  # measured 5.7e-6
    assert den.calls == 3
    # the scheduler the model carries was not advanced by our sampler (it works on a copy)
    assert model.scheduler.config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------ pretrained


def test_pretrained_round_trip(tiny, saved, reference_output):
    loaded = svd.build("pretrained", path=str(saved))
    assert _same_weights(loaded.unet, tiny.unet)
    assert _same_output(_stock(loaded.unet, *_reference_inputs()), reference_output)
    assert _same_weights(loaded.vae, tiny.vae) and _same_weights(loaded.image_encoder, tiny.image_encoder)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.use_karras_sigmas
    assert list(loaded.feature_extractor.image_mean) == list(tiny.feature_extractor.image_mean)
    assert not loaded.unet.training
    also = svd.build("pretrained", path=f"file://{saved}")
    assert _same_weights(also.unet, tiny.unet)


def test_unet_path_replaces_the_unet(tiny, saved):
    other = svd.tiny(seed=7, num_frames=F)
    unet_dir = saved.parent / "trained-unet"
    other.unet.save_pretrained(unet_dir)
    want = _stock(other.unet, *_reference_inputs())
    from_tiny = svd.build("tiny", num_frames=F, unet_path=str(unet_dir))
    assert _same_weights(from_tiny.unet, other.unet)
    assert _same_output(_stock(from_tiny.unet, *_reference_inputs()), want)
    from_dir = svd.build("pretrained", path=str(saved), unet_path=str(unet_dir))
    assert _same_weights(from_dir.unet, other.unet)
    assert _same_weights(from_dir.vae, tiny.vae)


def _assert_no_download_error(exc: pytest.ExceptionInfo, path: str) -> None:
    msg = str(exc.value)
    assert path in msg
    assert "never downloads" in msg


def test_missing_directory_is_a_model_error(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(ModelError) as e:
        svd.build("pretrained", path=path)
    _assert_no_download_error(e, path)
    assert "no such directory" in str(e.value)


def test_hub_id_is_never_fetched():
    hub_id = "stabilityai/stable-video-diffusion-img2vid"
    with pytest.raises(ModelError) as e:
        svd.build("pretrained", path=hub_id)
    _assert_no_download_error(e, hub_id)
    assert "hub ids are not fetched" in str(e.value)


def test_missing_subfolder_is_named(saved, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("unet", "vae", "image_encoder", "scheduler"):  # no feature_extractor/
        os.symlink(saved / name, partial / name)
    with pytest.raises(ModelError) as e:
        svd.build("pretrained", path=str(partial))
    _assert_no_download_error(e, str(partial))
    assert "feature_extractor" in str(e.value)


def test_empty_subfolder_is_a_model_error(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in svd.SUBFOLDERS:
        if name == "vae":
            (broken / name).mkdir()
        else:
            os.symlink(saved / name, broken / name)
    with pytest.raises(ModelError) as e:
        svd.build("pretrained", path=str(broken))
    _assert_no_download_error(e, str(broken))


def test_load_unet_needs_config_json(tmp_path):
    (tmp_path / "not-a-unet").mkdir()
    with pytest.raises(ModelError, match="not-a-unet: not a UNet directory"):
        svd.load_unet(str(tmp_path / "not-a-unet"))
    with pytest.raises(ModelError, match="no such directory"):
        svd.load_unet(str(tmp_path / "missing"))


def test_build_rejects_bad_flavor_and_missing_path():
    with pytest.raises(ModelError, match="model.path"):
        svd.build("pretrained")
    with pytest.raises(ModelError, match="model.flavor=huge"):
        svd.build("huge")


# --------------------------------------------------------------------------------- remote weights


def test_pretrained_from_s3_is_copied_once(tiny, saved, reference_output, s3_server, tmp_path):
    uri = s3_server.bucket() + "/models/svd-tiny"
    storage.upload_dir(str(saved), uri)
    cache = tmp_path / "cache"

    loaded = svd.build("pretrained", path=uri, cache_dir=str(cache))
    assert _same_weights(loaded.unet, tiny.unet)
    assert _same_output(_stock(loaded.unet, *_reference_inputs()), reference_output)
    entries = [e for e in os.listdir(cache) if not e.endswith(".lock")]  # the lock of the one copy per node
    assert len(entries) == 1
    copy = cache / entries[0]
    assert (copy / storage.COMPLETE_MARKER).is_file() and (copy / "unet" / "config.json").is_file()
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copy.rglob("*") if p.is_file()}

    again = svd.build("pretrained", path=uri + "/", cache_dir=str(cache))  # trailing slash: same cache key
    assert [e for e in os.listdir(cache) if not e.endswith(".lock")] == entries
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copy.rglob("*") if p.is_file()} == stamps
    assert _same_weights(again.unet, tiny.unet)

    missing = s3_server.bucket() + "/nothing-here"
    with pytest.raises(ModelError) as e:
        svd.build("pretrained", path=missing, cache_dir=str(cache))
    _assert_no_download_error(e, missing)
