"""Hotshot-XL through the batch generation job: text prompts, the same samplers (base, FIFO), the same outputs.

Shapes: T frames, H/W pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.data.video import read_video
from vidgen.errors import ConfigError, ModelError
from vidgen.generate.job import COLUMNS, VideoGenerator, prepare_rows, run_generation

WINDOW = 4
MODEL = dict(family="hotshot", flavor="tiny", num_frames=WINDOW)
GEN = dict(sampler="fifo", num_frames=3 * WINDOW, fifo=dict(partitions=1), min_guidance_scale=2.0,
           max_guidance_scale=2.0, height=32, width=32, fps=8)


def _cfg(tmp_path, **gen):
    overrides = [f"run.workdir={tmp_path}", "model.family=hotshot", "model.flavor=tiny",
                 f"model.num_frames={WINDOW}", f"generate.prompts={tmp_path / 'prompts.txt'}",
                 "generate.prompt_format=text"]
    overrides += [f"generate.{k}={v}" for k, v in {**{k: v for k, v in GEN.items() if k != "fifo"}, **gen}.items()]
    return load_config(None, overrides + ["generate.fifo.partitions=1"])


def _generate(tmp_path, cfg, prompts: list[str]) -> dict[str, np.ndarray]:
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    rows = prepare_rows(cfg)
    gen = VideoGenerator(cfg.model.model_dump(), cfg.generate.model_dump(), str(tmp_path / "out"))
    out = gen({k: np.array([r.get(k) if r.get(k) is not None else "" for r in rows]) for k in COLUMNS})
    assert out["status"] == ["generated"] * len(rows), out["error"]
    return {r["prompt"]: read_video(p)[0] for r, p in zip(rows, out["path"], strict=True)}


def test_text_to_video_fifo_three_windows_and_prompts_matter(tmp_path):
    cfg = _cfg(tmp_path)
    videos = _generate(tmp_path, cfg, ["a red car", "a blue boat"])
    a, b = videos["a red car"], videos["a blue boat"]
    assert a.shape == (3 * WINDOW, 32, 32, 3)  # FIFO: 3x the model's window from a 4-frame model
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5  # the text conditioning reaches the UNet


def test_base_sampler_is_deterministic_per_seed(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _generate(tmp_path / "one", _cfg(tmp_path / "one", sampler="base", num_frames=WINDOW,
                                           num_inference_steps=3), ["a cat"])["a cat"]
    two = _generate(tmp_path / "two", _cfg(tmp_path / "two", sampler="base", num_frames=WINDOW,
                                           num_inference_steps=3), ["a cat"])["a cat"]
    assert one.shape == (WINDOW, 32, 32, 3)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("setting", ["generate.sampler=autoregressive", "generate.consistency.seed_frame=true"])
def test_image_conditioned_settings_are_refused_for_text_to_video(tmp_path, setting):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    cfg = load_config(None, [f"run.workdir={tmp_path}", "model.family=hotshot",
                             f"generate.prompts={tmp_path / 'prompts.txt'}", setting])
    with pytest.raises(ConfigError, match="image-conditioned"):
        prepare_rows(cfg)


@pytest.mark.ray
def test_generation_job_fans_hotshot_prompts_out_to_actors(ray_session, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red car\na blue boat\n")
    cfg = _cfg(tmp_path, num_frames=2 * WINDOW)
    results = run_generation(cfg)
    assert [r["status"] for r in results] == ["generated", "generated"]
    assert all(read_video(r["path"])[0].shape[0] == 2 * WINDOW for r in results)
    assert [r["status"] for r in run_generation(cfg)] == ["skipped", "skipped"]  # a rerun does nothing


def test_a_size_the_pretrained_weights_were_not_trained_at_is_refused_on_the_driver(tmp_path):
    """Refused before any actor loads a model; random-init flavors (tiny, full) have no trained sizes."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    base = [f"run.workdir={tmp_path}", "model.family=hotshot", f"generate.prompts={tmp_path / 'prompts.txt'}",
            "generate.prompt_format=text", "generate.height=64", "generate.width=64"]
    with pytest.raises(ConfigError, match="generate size 64x64: Hotshot-XL was trained at .*512x512"):
        prepare_rows(load_config(None, [*base, "model.flavor=pretrained", f"model.path={tmp_path}"]))
    assert len(prepare_rows(load_config(None, [*base, "model.flavor=full"]))) == 1
    with pytest.raises(ModelError, match="model.path=.*missing subfolder"):  # a trained size: on to the weights
        prepare_rows(load_config(None, [*base[:-2], "model.flavor=pretrained", f"model.path={tmp_path}",
                                        "generate.height=320", "generate.width=768"]))


@pytest.mark.ray
def test_an_actor_that_cannot_load_its_model_fails_the_job_in_its_own_line(ray_session, tmp_path):
    """A VidgenError raised in an actor's constructor reaches the caller as itself, not as Ray's ActorDiedError
    with the actor's traceback folded into its message. The folder passes the driver's checks (configs of the
    right classes, weights whose headers read), but its UNet config describes no UNet."""
    from safetensors.torch import save_file

    (tmp_path / "prompts.txt").write_text("a cat\n")
    configs = {"unet": '{"_class_name": "UNet3DConditionModel"}', "vae": '{"_class_name": "AutoencoderKL"}'}
    for part in ("unet", "vae", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        (tmp_path / "weights" / part).mkdir(parents=True)
        if part in configs:
            (tmp_path / "weights" / part / "config.json").write_text(configs[part])
            save_file({"x": torch.zeros(1)}, str(tmp_path / "weights" / part / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "weights" / "scheduler" / "scheduler_config.json").write_text("{}")
    cfg = load_config(None, [f"run.workdir={tmp_path}", "model.family=hotshot", "model.flavor=pretrained",
                             f"model.path={tmp_path / 'weights'}", f"generate.prompts={tmp_path / 'prompts.txt'}",
                             "generate.prompt_format=text", "generate.height=512", "generate.width=512",
                             "generate.actor_restarts=0"])
    with pytest.raises(ModelError) as info:
        run_generation(cfg)
    line = str(info.value)
    assert str(tmp_path / "weights") in line and "\n" not in line and "ActorDiedError" not in line
