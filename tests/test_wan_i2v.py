"""Wan image-to-video, tiny, in diffusers' two designs: TI2V (Wan 2.2 TI2V-5B) and the image as input channels
with CLIP (Wan 2.1 I2V). For each, training on the clip's first frame against DiffSynth-Studio's loss (restated
here) and base sampling against diffusers' WanImageToVideoPipeline; for TI2V also FIFO holding output frame 0 clean
and the generation actor reading a row's image; the checkpoint layouts that are refused.

Shapes: B batch, F pixel frames, L latent frames, C latent channels, h/w latents, N transformer tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.errors import ModelError
from vidgen.models import registry
from vidgen.models.wan import model as wm
from vidgen.models.wan.pipeline import FlowSigmas, WanDenoiser

TI2V, I2V = "Wan2.2-TI2V-5B", "Wan2.1-I2V-14B"
WAN = ["model.family=wan", "model.flavor=tiny", f"model.path={TI2V}", "model.num_frames=5", "data.height=64",
       "data.width=64"]


def tiny() -> wm.Wan:
    return wm.tiny(0, variant=TI2V)


def clips(b: int = 2, frames: int = 5, size: int = 64) -> dict:
    rng = np.random.default_rng(0)
    return {"frames": torch.from_numpy(rng.integers(0, 256, (b, frames, size, size, 3), dtype=np.uint8)),
            "fps": torch.full((b,), 8.0), "prompt": [f"clip {i}" for i in range(b)]}


def image(size: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)


def diffsynth_table() -> tuple[torch.Tensor, torch.Tensor]:
    """DiffSynth-Studio's training levels and weights (FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True),
    set_timesteps(1000, training=True)), as tests/test_wan.py restates them."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = 5 * sigmas / (1 + 4 * sigmas)
    bell = torch.exp(-2 * ((sigmas * 1000 - 500) / 1000) ** 2)
    return sigmas, (bell - bell.min()) * (1000 / (bell - bell.min()).sum())


def test_ti2v_is_what_the_checkpoint_says():
    m = tiny()
    assert m.expand_timesteps and m.token_pixels == 32 and m.transformer.config.in_channels == 48
    assert not wm.tiny(0).expand_timesteps and wm.tiny(0).token_pixels == 16


def test_ti2v_loss_equals_diffsynth_studios_on_the_clips_first_frame():
    """DiffSynth-Studio's FlowMatchSFTLoss for TI2V (input_image = the clip's frame 0): the noisy latents' frame 0
    replaced by the image's VAE latent, timestep 0 on that frame's tokens, the loss over frames 1.. only."""
    cfg = load_config(None, [*WAN, "train.recipe=wan_full"])
    r = registry.build_recipe(cfg.model, cfg.train, cfg.run.seed)
    batch = clips()
    enc = r.encode(batch)
    tr, m = r.unet, r.model
    first = batch["frames"][:, 0].permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, H, W]
    # the image's own latent is the clip's latent frame 0 (the causal VAE encodes frame 0 alone)
    torch.testing.assert_close(m.encode_image(first), enc["latents"][:, 0], rtol=0, atol=0)

    loss, _ = r.loss(enc, lambda x, t, encoder_hidden_states: tr(x, t, encoder_hidden_states, return_dict=False)[0],
                     torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    x0 = enc["latents"].permute(0, 2, 1, 3, 4)  # [B, C, L, h, w]: DiffSynth's layout
    noise = torch.randn(x0.permute(0, 2, 1, 3, 4).shape, generator=g).permute(0, 2, 1, 3, 4)
    ids = torch.randint(0, 1000, (2,), generator=g)
    sigmas, weights = diffsynth_table()
    mean = torch.tensor(m.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(m.vae.config.latents_std).view(1, -1, 1, 1, 1)
    expected = []
    for i in range(2):
        z = (m.vae.encode(first[i:i + 1, :, None]).latent_dist.mean - mean) / std  # [1, C, 1, h, w]
        latents = (1 - sigmas[ids[i]]) * x0[i:i + 1] + sigmas[ids[i]] * noise[i:i + 1]
        latents[:, :, 0:1] = z
        per_frame = x0.shape[3] * x0.shape[4] // 4
        later = torch.ones(x0.shape[2] - 1, per_frame) * sigmas[ids[i]] * 1000
        timestep = torch.cat([torch.zeros(1, per_frame), later])
        pred = tr(latents, timestep.flatten()[None], enc["prompt_embeds"][i:i + 1], return_dict=False)[0]
        target = noise[i:i + 1] - x0[i:i + 1]
        mse = torch.nn.functional.mse_loss(pred[:, :, 1:].float(), target[:, :, 1:].float())
        expected.append(mse * weights[ids[i]])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-6, atol=0)


def test_ti2v_base_sampler_equals_diffusers_image_to_video_pipeline():
    """WanImageToVideoPipeline(expand_timesteps=True), no CLIP, UniPC of order 1 without corrector over the original
    Wan schedule: the same latents as vidgen's base sampler conditioned on the same image, guidance included; latent
    frame 0 is the image's latent."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from PIL import Image

    from vidgen.diffusion.samplers import base_sample

    class WanSchedule(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    m, steps = tiny(), 3
    sched = WanSchedule(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=m.flow_shift,
                        solver_order=1, disable_corrector=list(range(steps)))
    pipe = WanImageToVideoPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, scheduler=sched,
                                   transformer=m.transformer, image_encoder=None, image_processor=None,
                                   expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 2, 48, 4, 4, generator=torch.Generator().manual_seed(3))  # [B, L, C, h, w]
    img = image()
    # the prompts as embeddings (WanPipeline's layout, tests/test_wan.py): this pipeline's own prompt cleaning needs
    # ftfy, which vidgen does not install
    embeds = {"prompt_embeds": m.encode_text(["a red car"]), "negative_prompt_embeds": m.encode_text([""])}
    theirs = pipe(Image.fromarray(img), **embeds, height=64, width=64, num_frames=5, num_inference_steps=steps,
                  guidance_scale=5.0, latents=noise.permute(0, 2, 1, 3, 4).clone(),
                  max_sequence_length=m.text_length, output_type="latent").frames.permute(0, 2, 1, 3, 4)
    den = WanDenoiser(m, 5.0)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    cond = den.condition(["a red car"], image_bchw=x)
    ours = base_sample(den, cond, FlowSigmas(m.flow_shift), noise.shape, steps, latents=noise)
    assert den.calls == steps
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[:, 0], m.encode_image(x), rtol=0, atol=1e-6)
    text_only = base_sample(den, den.condition(["a red car"]), FlowSigmas(m.flow_shift), noise.shape, steps,
                            latents=noise)
    assert not torch.allclose(text_only[:, 1], ours[:, 1], atol=1e-3)  # the image conditions the later frames


def test_fifo_holds_the_first_frame_clean_while_it_is_in_the_queue():
    """FIFO over tiny TI2V: the call count is the algorithm's; in every call whose window holds output frame 0,
    that frame's tokens get timestep 0 and its input is the image's latent; later frames keep their own levels."""
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import fifo_sample
    from vidgen.models.wan.pipeline import WanPipeline

    m = tiny()
    den = WanDenoiser(m)
    pipe = WanPipeline(m, den, FlowSigmas(m.flow_shift))
    x = torch.from_numpy(image()).permute(2, 0, 1)[None].float() / 127.5 - 1
    cond = den.condition(["a"], image_bchw=x)
    windows, seen = [], []
    frames = pipe.frames

    def window_cond(c, indices):
        windows.append(list(indices))
        return frames(c, indices)

    hook = m.transformer.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1].clone())))
    plan, n_out = FifoPlan(2, 2, lookahead=True), 4
    out = fifo_sample(den, cond, FlowSigmas(m.flow_shift), (1, 2, 48, 4, 4), n_out, plan,
                      generator=torch.Generator().manual_seed(0), window_cond=window_cond)
    hook.remove()
    assert den.calls == len(seen) == plan.steps + plan.iterations(n_out) * len(plan.windows())
    assert len(windows) == len(seen) - plan.steps + 1  # the base video's calls share one window_cond
    base = [list(range(plan.window))] * plan.steps
    held_calls = 0
    for indices, (x_in, t) in zip(base + windows[1:], seen, strict=True):
        t = t[0].view(len(indices), -1)  # [L, tokens per frame]
        for j, k in enumerate(indices):
            if k == 0:
                held_calls += 1
                assert (t[j] == 0).all()
                torch.testing.assert_close(x_in[0, :, j], cond.image_latent[0], rtol=0, atol=0)
            elif k > 0:
                assert (t[j] > 0).all()
    assert held_calls > plan.steps  # the base video's calls and the queue's while frame 0 is in it
    torch.testing.assert_close(out[:, 0], cond.image_latent, rtol=0, atol=1e-6)


def test_the_generation_actor_conditions_on_the_rows_image(tmp_path):
    """A row's image conditions a TI2V checkpoint's video (the same field SVD reads); a row without one generates
    from text; a text-to-video checkpoint ignores it."""
    from PIL import Image

    from vidgen.generate.job import VideoGenerator
    from vidgen.models.wan.pipeline import check_generate

    path = tmp_path / "first.png"
    Image.fromarray(image()).save(path)
    cfg = load_config(None, [*WAN, "generate.height=64", "generate.width=64", "generate.num_frames=5",
                             "generate.num_inference_steps=2"])
    actor = VideoGenerator(cfg.model.model_dump(), cfg.generate.model_dump(), str(tmp_path))
    row = {"name": "a.mp4", "seed": 0, "prompt": "a red car", "sample_prompt": "", "image": str(path)}
    cond = actor.pipe.condition(row, actor.gen, actor._image, None)
    x = torch.from_numpy(image()).permute(2, 0, 1)[None].float() / 127.5 - 1
    torch.testing.assert_close(cond.image_latent, actor.model.encode_image(x), rtol=0, atol=1e-6)
    assert actor.pipe.condition({**row, "image": ""}, actor.gen, actor._image, None).image_latent is None
    actor.generate(row, str(tmp_path / "a.mp4"))
    from vidgen.data.video import read_video

    assert read_video(str(tmp_path / "a.mp4"))[0].shape == (5, 64, 64, 3)
    from vidgen.errors import ConfigError

    g = load_config(None, [*WAN, "generate.height=48", "generate.width=64"]).generate
    with pytest.raises(ConfigError, match="generate.height/width=48x64: Wan needs multiples of 32"):
        check_generate(cfg.model, g)
    with pytest.raises(ConfigError, match="generate.height/width=48x64: Wan needs multiples of 32"):
        actor.pipe.latent_shape(g, 5)  # what the actor says when model.path's name does not say TI2V
    t2v = registry.spec(cfg.model).build_pipeline(load_config(None, ["model.family=wan"]).model, cfg.generate)
    assert t2v.condition(row, actor.gen, actor._image, None).image_latent is None


def test_pretrained_ti2v_reads_model_index_and_image_channel_checkpoints_are_refused(tmp_path):
    """model_index.json's expand_timesteps makes a directory TI2V; a transformer taking the image as extra input
    channels (Wan 2.1 I2V: 36 in, 16 out, a CLIP image_dim) is refused naming its config."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    m = tiny()
    root = tmp_path / "Wan2.2-TI2V-5B-Diffusers"
    for name in ("transformer", "vae", "text_encoder"):
        getattr(m, name).save_pretrained(root / name)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    assert not wm.build("pretrained", path=str(root)).expand_timesteps  # no model index: the flag's default
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    assert wm.build("pretrained", path=str(root)).expand_timesteps
    (root / "model_index.json").write_text(json.dumps({"expand_timesteps": "yes"}))
    with pytest.raises(ModelError, match="model_index.json: expand_timesteps='yes', expected true or false"):
        wm.build("pretrained", path=str(root))
    from vidgen.config import load_config
    from vidgen.models.wan.checks import check_weights

    # Wan2.2-T2V-A14B-Diffusers' index: a second expert for the low-noise steps, which vidgen does not run
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": 0.875, "expand_timesteps": False,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    two_experts = "model_index.json: a two-expert Wan 2.2 A14B pipeline \\(transformer_2=\\['diffusers', "
    with pytest.raises(ModelError, match=two_experts):
        wm.build("pretrained", path=str(root))
    model_cfg = load_config(None, ["model.family=wan", "model.flavor=pretrained", f"model.path={root}"]).model
    with pytest.raises(ModelError, match="model.path: .*" + two_experts):
        check_weights(model_cfg, None)  # on the driver, before any actor loads it
    (root / "model_index.json").write_text(json.dumps({"boundary_ratio": None, "transformer_2": [None, None]}))
    check_weights(model_cfg, None)  # TI2V-5B's index spells the absent expert this way
    (root / "model_index.json").unlink()

    config = json.loads((root / "transformer" / "config.json").read_text())
    config.update(in_channels=36, out_channels=16, image_dim=None)  # Wan 2.2 I2V-A14B's layout
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="transformer/config.json: in_channels=36, out_channels=16, image_dim=None; "
                                         "vidgen runs Wan text-to-video and TI2V"):
        wm.build("pretrained", path=str(root))
    config.update(in_channels=36, out_channels=16, image_dim=4)  # Wan 2.1 I2V's, without its CLIP folders
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="missing subfolder\\(s\\) image_encoder, image_processor of a diffusers "
                                         "Wan I2V directory \\(its transformer has image_dim=4\\)"):
        wm.build("pretrained", path=str(root))



# ---------------------------------------------------------------------------------------------- Wan 2.1 I2V


def test_i2v_loss_equals_diffsynth_studios_with_the_image_as_input_channels():
    """DiffSynth-Studio's Wan2.1-I2V-14B training (input_image = the clip's frame 0): y = [mask, VAE latents of
    (image, black frames...)] concatenated to the noisy latents, CLIP's penultimate states through the image
    embedder, the loss over every latent frame; the encodings are cached as two more columns."""
    cfg = load_config(None, ["model.family=wan", "model.flavor=tiny", f"model.path={I2V}", "model.num_frames=5",
                             "data.height=32", "data.width=32", "train.recipe=wan_lora", "train.lora.rank=2"])
    r = registry.build_recipe(cfg.model, cfg.train, cfg.run.seed)
    assert r.ENCODED == ("latents", "prompt_embeds", "image_condition", "image_embeds")
    assert r.model.image_encoder in r.encoders()
    batch = clips(size=32)
    enc = r.encode(batch)
    assert set(enc) == set(r.ENCODED) and enc["image_condition"].shape == (2, 2, 20, 4, 4)
    tr, m = r.unet, r.model
    loss, _ = r.loss(enc, lambda x, t, **kw: tr(x, t, **kw, return_dict=False)[0], torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    x0 = enc["latents"].permute(0, 2, 1, 3, 4)  # [B, C, L, h, w]
    noise = torch.randn(x0.permute(0, 2, 1, 3, 4).shape, generator=g).permute(0, 2, 1, 3, 4)
    ids = torch.randint(0, 1000, (2,), generator=g)
    sigmas, weights = diffsynth_table()
    mean = torch.tensor(m.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(m.vae.config.latents_std).view(1, -1, 1, 1, 1)
    expected = []
    for i in range(2):
        first = batch["frames"][i, 0].permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W]
        video = torch.cat([first[:, None], torch.zeros(3, 4, 32, 32)], dim=1)[None]  # [1, 3, F, H, W]
        y = (m.vae.encode(video).latent_dist.mean - mean) / std
        msk = torch.zeros(1, 4, 2, 4, 4)
        msk[:, :, 0] = 1
        pixels = m.image_processor(images=[batch["frames"][i, 0].numpy()], return_tensors="pt").pixel_values
        clip = m.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        noisy = (1 - sigmas[ids[i]]) * x0[i:i + 1] + sigmas[ids[i]] * noise[i:i + 1]
        pred = tr(torch.cat([noisy, msk, y], dim=1), sigmas[ids[i]][None] * 1000, enc["prompt_embeds"][i:i + 1],
                  encoder_hidden_states_image=clip, return_dict=False)[0]
        mse = torch.nn.functional.mse_loss(pred.float(), (noise[i:i + 1] - x0[i:i + 1]).float())
        expected.append(mse * weights[ids[i]])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=0)


def test_i2v_base_sampler_equals_diffusers_image_to_video_pipeline():
    """WanImageToVideoPipeline (CLIP, the image as input channels) with first-order UniPC over the original Wan
    schedule: the same latents as vidgen's base sampler on the same image, guidance included; a row without an
    image is refused."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from PIL import Image

    from vidgen.diffusion.samplers import base_sample
    from vidgen.errors import DataError

    class WanSchedule(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    m, steps = wm.tiny(0, variant=I2V), 3
    assert m.image_channels and not m.expand_timesteps and m.image_encoder is not None
    sched = WanSchedule(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=m.flow_shift,
                        solver_order=1, disable_corrector=list(range(steps)))
    pipe = WanImageToVideoPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, scheduler=sched,
                                   transformer=m.transformer, image_encoder=m.image_encoder,
                                   image_processor=m.image_processor)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 2, 16, 4, 4, generator=torch.Generator().manual_seed(3))  # [B, L, C, h, w]
    img = image(32)
    embeds = {"prompt_embeds": m.encode_text(["a red car"]), "negative_prompt_embeds": m.encode_text([""])}
    theirs = pipe(Image.fromarray(img), **embeds, height=32, width=32, num_frames=5, num_inference_steps=steps,
                  guidance_scale=5.0, latents=noise.permute(0, 2, 1, 3, 4).clone(),
                  max_sequence_length=m.text_length, output_type="latent").frames.permute(0, 2, 1, 3, 4)
    den = WanDenoiser(m, 5.0)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = base_sample(den, den.condition(["a red car"], image_bchw=x, num_frames=5), FlowSigmas(m.flow_shift),
                       noise.shape, steps, latents=noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="prompt row: no image, and this Wan checkpoint is image-to-video only"):
        den.condition(["a red car"])


def test_i2v_fifo_gives_each_slot_the_channels_of_the_frame_it_becomes():
    """FIFO over tiny Wan 2.1 I2V (a 9-frame video: 3 latent frames, encoded whole): each call's image channels are
    those of the output frame each window slot becomes (warm-up and context slots: frame 0's)."""
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import fifo_sample
    from vidgen.models.wan.pipeline import WanPipeline

    m = wm.tiny(0, variant=I2V)
    den = WanDenoiser(m)
    pipe = WanPipeline(m, den, FlowSigmas(m.flow_shift))
    x = torch.from_numpy(image(32)).permute(2, 0, 1)[None].float() / 127.5 - 1
    cond = den.condition(["a"], image_bchw=x, num_frames=9)
    assert cond.image_condition.shape == (1, 3, 20, 4, 4)
    windows, seen = [], []

    def window_cond(c, indices):
        windows.append(list(indices))
        return pipe.frames(c, indices)

    hook = m.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    plan = FifoPlan(2, 1, lookahead=True)
    fifo_sample(den, cond, FlowSigmas(m.flow_shift), (1, 2, 16, 4, 4), 3, plan,
                generator=torch.Generator().manual_seed(0), window_cond=window_cond)
    hook.remove()
    assert len(seen) == plan.steps + plan.iterations(3) * len(plan.windows())
    for indices, x_in in zip([list(range(plan.window))] * plan.steps + windows[1:], seen, strict=True):
        for j, k in enumerate(indices):
            torch.testing.assert_close(x_in[0, 16:, j], cond.image_condition[0, max(0, min(k, 2))], rtol=0, atol=0)
    assert {k for w in windows for k in w} >= {-1, 0, 1, 2}
