"""The Wan family through the jobs the other families run: clip sizes and buckets a training run or latent cache
asks of it (refused on the driver when Wan cannot take them), validation videos during training, and FVD of
Wan-generated videos through the normal generate and eval jobs. The latent cache itself: tests/test_latents.py.

Shapes: B batch, F pixel frames, L latent frames, C latent channels, H/W pixels, h/w latents.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidgen.config import ModelConfig, load_config
from vidgen.data import bucket_batches, read_clips_local
from vidgen.data.video import read_video
from vidgen.errors import ConfigError
from vidgen.models import registry
from vidgen.models.wan import model as wm
from vidgen.models.wan.checks import pixels_per_token

WAN = ["model.family=wan", "model.flavor=tiny", "train.recipe=wan_lora", "model.num_frames=5", "data.height=32",
       "data.width=32"]


def frame_folders(root: Path, sizes: dict[str, tuple[int, int]], frames: int = 5) -> str:
    """`frames` layout: root/<name>/<n>.png of each (h, w), no prompts."""
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(frames):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            (root / name / f"{i}.png").write_bytes(buf.getvalue())
    return str(root)


def test_sizes_wan_cannot_take_are_refused_on_the_driver_in_one_line(tmp_path):
    from vidgen.train.latents import prepare_latents
    from vidgen.train.launch import check

    def refused(*overrides: str) -> str:
        cfg = load_config(None, [*WAN, f"run.workdir={tmp_path}", f"data.source={tmp_path}", *overrides])
        with pytest.raises(ConfigError) as e:
            check(cfg)  # `vidgen train`, before Ray starts
        with pytest.raises(ConfigError) as again:
            prepare_latents(cfg, use_ray=False)  # `vidgen prepare latents`, before any clip is read or encoder built
        assert str(again.value) == str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert refused("data.buckets=48x32,40x32").startswith(
        "data.buckets: 40x32 (WxH) in '48x32,40x32': this Wan takes multiples of 16")
    assert refused("data.height=40").startswith("data.height/width=40x32: this Wan takes multiples of 16")
    assert refused("model.num_frames=8").startswith("model.num_frames=8: Wan's causal VAE takes 4k + 1 frames")
    check(load_config(None, [*WAN, "data.buckets=48x32,32x48,32x32"]))  # 16-pixel multiples pass
    # pixels per transformer token: VAE 8x (Wan 2.1) or 16x (Wan 2.2) times the 2x2 patch
    assert pixels_per_token(ModelConfig(family="wan", flavor="tiny")) == 16
    assert pixels_per_token(ModelConfig(family="wan", flavor="full", path="s3://m/Wan2.1-T2V-14B-Diffusers")) == 16
    assert pixels_per_token(ModelConfig(family="wan", flavor="pretrained", path="/m/Wan2.2-TI2V-5B-Diffusers")) == 32


def test_bucketed_clips_train_wan_one_size_per_batch(tmp_path):
    """Wide and tall clips land in their buckets; each batch's latents are its bucket / 8, 4k + 1 frames make
    (F - 1) / 4 + 1 latent frames, and the flow loss is finite for each size (clips without a prompt: the empty
    one)."""
    cfg = load_config(None, [*WAN, "data.buckets=48x32,32x48"])
    registry.spec(cfg.model).check_train(cfg)
    source = frame_folders(tmp_path / "clips", {"wide": (30, 50), "tall": (50, 30)})
    rows = read_clips_local(source, "frames", num_frames=5, buckets=cfg.data.buckets, train=False)
    recipe = registry.build_recipe(cfg.model, cfg.train, cfg.run.seed)
    unet_fn = lambda *a, **k: recipe.unet(*a, return_dict=False, **k)[0]  # noqa: E731
    shapes = {}
    for batch in bucket_batches(rows, 1):
        clips = {"frames": torch.from_numpy(batch["frames"]), "prompt": batch["prompt"]}
        assert batch["prompt"] == [""]
        shapes[batch["bucket"][0]] = tuple(recipe.encode(clips)["latents"].shape)
        with torch.no_grad():
            loss, _ = recipe.loss(clips, unet_fn, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and loss > 0
    assert shapes == {"32x48": (1, 2, 16, 4, 6), "48x32": (1, 2, 16, 6, 4)}


def test_validation_videos_of_the_tiny_wan(tmp_path):
    """What the training loop writes on rank 0 (vidgen.train.validation with the family's validation_video): one
    base-sampler window per held-out prompt, at the configured frames and size."""
    from vidgen.train.validation import validation_videos

    family = registry.spec(ModelConfig(family="wan"))
    validation = {"images": ["a red car", "a blue boat"], "out_dir": str(tmp_path), "fps": 16,
                  "motion_bucket_id": 127, "num_frames": 5, "height": 32, "width": 48}
    paths = validation_videos(family, wm.tiny(0), validation, step=3, num_steps=2)
    assert paths == [str(tmp_path / "step00000003" / f"{i:02d}.mp4") for i in range(2)]
    videos = [read_video(p) for p in paths]
    assert all(v.shape == (5, 32, 48, 3) and fps == pytest.approx(16) for v, fps in videos)
    assert not np.array_equal(videos[0][0], videos[1][0])  # the prompt conditions the video


@pytest.mark.ray
def test_fvd_of_wan_generated_videos_through_the_eval_job(ray_session, tmp_path):
    """A generation actor with model.family=wan (in-process: the Ray fan-out is family-agnostic) writes 4k + 1 frame
    videos at generate.fps; `vidgen eval` cuts them into eval.num_frames clips (early and late windows) and scores
    them against real clips with the tiny I3D."""
    from vidgen.data.synth import make_moving_shapes
    from vidgen.eval.job import run_eval
    from vidgen.generate.job import VideoGenerator

    real = tmp_path / "real"
    make_moving_shapes(str(real), 3, 9, 32, 32, seed=0)
    cfg = load_config(None, [*WAN, "model.num_frames=9", "generate.sampler=base", "generate.num_frames=9",
                             "generate.height=32", "generate.width=32", "generate.fps=16",
                             "generate.num_inference_steps=2", "generate.max_guidance_scale=1.0",
                             "generate.min_guidance_scale=1.0", f"eval.cache_dir={tmp_path / 'cache'}",
                             "eval.i3d_flavor=tiny", "eval.num_frames=8", "eval.resolution=32",
                             "eval.windows=[early,late]", "eval.bootstrap=0"])
    actor = VideoGenerator(cfg.model.model_dump(), cfg.generate.model_dump(), str(tmp_path / "out"))
    fake = tmp_path / "out" / "videos"
    for i, prompt in enumerate(["a red car", "a blue boat"]):
        actor.generate({"name": f"{i}.mp4", "seed": i, "prompt": prompt, "sample_prompt": "", "image": ""},
                       str(fake / f"{i}.mp4"))
        frames, fps = read_video(str(fake / f"{i}.mp4"))
        assert frames.shape == (9, 32, 32, 3) and fps == pytest.approx(16)

    out = run_eval(cfg, str(real), str(fake), real_layout="hotshot")
    assert (out.n_real, out.n_fake) == (3, 4)  # 2 videos x 2 windows
    assert {w: v["n_fake"] for w, v in out.windows.items()} == {"early": 2, "late": 2}
    assert [v["num_frames"] for v in out.per_video] == [9, 9]
    assert np.isfinite(out.fvd) and out.fvd > 0
