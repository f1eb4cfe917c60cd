"""Wan family on the tiny flavor: the flow-matching objective against DiffSynth-Studio's (restated here), the
recipes, per-token timesteps, the base sampler against diffusers' WanPipeline, FIFO over latent frames.

Shapes: B batch, F pixel frames, L latent frames, C latent channels, h/w latents, N transformer tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.errors import ConfigError, ModelError
from vidgen.models import registry
from vidgen.models.wan import flow
from vidgen.models.wan import model as wm
from vidgen.models.wan.pipeline import FlowSigmas, WanDenoiser, text_to_video

WAN = ["model.family=wan", "model.flavor=tiny", "model.num_frames=5", "data.height=32", "data.width=32"]


def recipe(*overrides: str):
    cfg = load_config(None, [*WAN, *overrides])
    return registry.build_recipe(cfg.model, cfg.train, cfg.run.seed), cfg


def clips(b: int = 2, frames: int = 5, size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    return {"frames": torch.from_numpy(rng.integers(0, 256, (b, frames, size, size, 3), dtype=np.uint8)),
            "fps": torch.full((b,), 8.0), "prompt": [f"clip {i}" for i in range(b)]}


# ---------------------------------------------------------------------------------------------- objective


class DiffSynthWanTraining:
    """DiffSynth-Studio's Wan training objective, restated from its source (diffsynth/schedulers/flow_match.py:
    FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True), set_timesteps(1000, training=True); the Wan
    trainer's loss: mse(pred, noise - x0) * training_weight(timestep)), one clip at a time."""

    def __init__(self, shift: float = 5.0, steps: int = 1000):
        sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1]  # sigma_max 1, sigma_min 0, extra_one_step
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * 1000
        y = torch.exp(-2 * ((self.timesteps - steps / 2) / steps) ** 2)
        y_shifted = y - y.min()
        self.weights = y_shifted * (steps / y_shifted.sum())

    def clip_loss(self, transformer, x0_cfhw, noise_cfhw, timestep_id, embeds_sd):
        timestep = self.timesteps[timestep_id]
        sigma = self.sigmas[torch.argmin((self.timesteps - timestep).abs())]
        noisy = (1 - sigma) * x0_cfhw + sigma * noise_cfhw
        pred = transformer(noisy[None], timestep[None], embeds_sd[None], return_dict=False)[0][0]
        mse = torch.nn.functional.mse_loss(pred.float(), (noise_cfhw - x0_cfhw).float())
        return mse * self.weights[torch.argmin((self.timesteps - timestep).abs())]


def test_flow_loss_equals_diffsynth_studios_wan_objective_on_a_fixed_batch():
    r, _ = recipe("train.recipe=wan_full")
    enc = r.encode(clips())
    tr = r.unet

    def unet_fn(x, t, encoder_hidden_states):
        return tr(x, t, encoder_hidden_states, return_dict=False)[0]

    loss, extra = r.loss(enc, unet_fn, torch.Generator().manual_seed(7))

    # the same draws, in DiffSynth's order: the noise, then a timestep index per clip
    g = torch.Generator().manual_seed(7)
    x0 = enc["latents"].permute(0, 2, 1, 3, 4)  # [B, C, L, h, w]: DiffSynth's layout
    noise = torch.randn(enc["latents"].shape, generator=g).permute(0, 2, 1, 3, 4)
    ids = torch.randint(0, 1000, (2,), generator=g)
    ref = DiffSynthWanTraining()
    expected = torch.stack([ref.clip_loss(tr, x0[i], noise[i], ids[i], enc["prompt_embeds"][i]) for i in range(2)])
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-6, atol=0)
    assert extra["sigma_mean"] == pytest.approx(ref.sigmas[ids].mean().item())
    assert ref.weights.sum().item() == pytest.approx(1000, rel=1e-5)


def test_flow_options_sample_where_they_say():
    cfg = load_config(None, ["train.flow.timesteps=uniform", "train.flow.shift=1", "train.flow.weighting=none"])
    sigma, weight = flow.draw(4000, cfg.train.flow, torch.Generator().manual_seed(0))
    assert 0 <= sigma.min() and sigma.max() < 1 and sigma.mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(weight, torch.ones(4000))
    cfg = load_config(None, ["train.flow.timesteps=logit_normal", "train.flow.shift=3"])
    sigma, weight = flow.draw(4000, cfg.train.flow, torch.Generator().manual_seed(0))
    # the median of sigmoid(N(0, 1)) is 0.5, shifted by 3: 0.75
    assert sigma.median().item() == pytest.approx(0.75, abs=0.02) and (weight >= 0).all()
    sigmas, weights = flow.table(5.0)
    assert sigmas[0] == 1 and sigmas[-1] == pytest.approx(0.005 / 1.004, rel=1e-6)
    assert sigmas[weights.argmax()] == pytest.approx(0.5, abs=1e-3)  # the bell peaks at timestep 500


def test_recipes_train_what_they_say_and_refuse_bad_frame_counts():
    full, _ = recipe("train.recipe=wan_full")
    assert all(p.requires_grad for p in full.unet.parameters())
    assert not any(p.requires_grad for p in [*full.model.vae.parameters(), *full.model.text_encoder.parameters()])
    lora_r, _ = recipe("train.recipe=wan_lora", "train.lora.rank=2")
    names = [n for n, p in lora_r.unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and (".attn1." in n or ".attn2." in n) for n in names)
    assert len(lora_r.targets) == 2 * 2 * 4  # 2 blocks x (self, cross) x (q, k, v, out)
    with pytest.raises(ConfigError, match="model.num_frames=4: Wan's causal VAE takes 4k \\+ 1 frames"):
        recipe("train.recipe=wan_full", "model.num_frames=4")
    with pytest.raises(ModelError, match="/no/such/wan: no such directory.*transformer, vae, text_encoder, tokenizer/"):
        recipe("train.recipe=wan_lora", "model.flavor=pretrained", "model.path=/no/such/wan")


def test_encoding_is_deterministic_and_matches_the_clip_path():
    r, _ = recipe("train.recipe=wan_lora")
    batch = clips()
    enc = r.encode(batch)
    assert enc["latents"].shape == (2, 2, 16, 4, 4) and enc["prompt_embeds"].shape == (2, 16, 32)
    assert torch.equal(enc["latents"], r.encode(batch)["latents"])
    # "clip 0" is 6 bytes + eos: embeddings are zero past the prompt's 7 tokens (WanPipeline's layout)
    assert enc["prompt_embeds"][0, 7:].abs().sum() == 0 and enc["prompt_embeds"][0, 6].abs().sum() > 0

    def unet_fn(x, t, encoder_hidden_states):
        return r.unet(x, t, encoder_hidden_states, return_dict=False)[0]

    a = r.loss(batch, unet_fn, torch.Generator().manual_seed(1))[0]
    b = r.loss({**enc, "fps": batch["fps"]}, unet_fn, torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(a, b)


def test_lora_and_full_exports_load_back(tmp_path):
    from diffusers import WanTransformer3DModel

    from vidgen.models import lora

    r, _ = recipe("train.recipe=wan_lora", "train.lora.rank=2")
    state = {n: torch.randn_like(p) for n, p in r.unet.named_parameters() if p.requires_grad}
    r.export(state, tmp_path)
    from vidgen.models.wan.lora_formats import COMFY_WEIGHTS

    assert {p.name for p in tmp_path.iterdir()} >= {lora.PEFT_WEIGHTS, lora.DIFFUSERS_WEIGHTS, COMFY_WEIGHTS}
    fresh = wm.tiny(0).transformer
    lora.load_lora(fresh, str(tmp_path))
    got = lora.lora_state_dict(fresh)
    assert {k: v for k, v in got.items()} .keys() == r.lora_state(state).keys()
    assert all(torch.equal(got[k], v) for k, v in r.lora_state(state).items())

    full, _ = recipe("train.recipe=wan_full")
    state = {k: v + 1 for k, v in full.unet.state_dict().items()}
    full.export(state, tmp_path / "t")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "t").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------- sampling


def test_per_frame_levels_reach_the_transformer_as_per_token_timesteps():
    m = wm.tiny(0)
    den = WanDenoiser(m)
    cond = den.condition(["a"])
    x = torch.randn(1, 2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = m.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    out = den(x, torch.tensor([[3.0, 0.5]]), cond)
    hook.remove()
    s = torch.tensor([3 / 4, 0.5 / 1.5])
    assert seen[0].shape == (1, 2 * 2 * 2)  # a timestep per token: L x h/2 x w/2
    torch.testing.assert_close(seen[0][0], (1000 * s).floor().repeat_interleave(4))
    # frame by frame, the same as asking the transformer one clip-wide level at a time
    for i in range(2):
        x_t = x / (1 + torch.tensor([3.0, 0.5])[i])
        v = m.transformer(x_t.permute(0, 2, 1, 3, 4), torch.tensor([1000 * s[i]]).floor(), cond.prompt_embeds,
                          return_dict=False)[0].permute(0, 2, 1, 3, 4)
        if i == 0:
            assert not torch.allclose(out[:, 1], (x_t - s[i] * v)[:, 1], atol=1e-4)  # frames attend to each other
    uniform = den(x, torch.full((1, 2), 3.0), cond)
    x_t = x / 4
    v = m.transformer(x_t.permute(0, 2, 1, 3, 4), torch.tensor([750.0]), cond.prompt_embeds,
                      return_dict=False)[0].permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(uniform, x_t - 0.75 * v, rtol=1e-5, atol=1e-5)


def test_base_sampler_equals_diffusers_wan_pipeline():
    """WanPipeline with UniPC of order 1 and no corrector (= the flow Euler step) over the original Wan sampler's
    schedule gives the same latents as vidgen's base sampler with the Wan denoiser, guidance included."""
    from diffusers import UniPCMultistepScheduler
    from diffusers import WanPipeline as DiffusersWan

    from vidgen.diffusion.samplers import base_sample

    class WanSchedule(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    m = wm.tiny(0)
    steps = 4
    sched = WanSchedule(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=m.flow_shift,
                        solver_order=1, disable_corrector=list(range(steps)))
    pipe = DiffusersWan(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, scheduler=sched,
                        transformer=m.transformer)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 2, 16, 4, 4, generator=torch.Generator().manual_seed(3))  # [B, L, C, h, w]
    theirs = pipe("a red car", height=32, width=32, num_frames=5, num_inference_steps=steps, guidance_scale=5.0,
                  latents=noise.permute(0, 2, 1, 3, 4).clone(), max_sequence_length=m.text_length,
                  output_type="latent").frames.permute(0, 2, 1, 3, 4)
    den = WanDenoiser(m, 5.0)
    ours = base_sample(den, den.condition(["a red car"]), FlowSigmas(m.flow_shift), noise.shape, steps,
                       latents=noise)
    assert den.calls == steps
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    video = text_to_video(m, ["a red car"], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()


def test_fifo_over_latent_frames_call_count_and_levels():
    """FIFO over tiny Wan: the transformer runs as often as the algorithm says, every call gets each latent frame's
    own level as the timestep of that frame's tokens, and the diagonal passes through every level of the
    schedule."""
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import fifo_sample, sampling_sigmas

    class Recording(WanDenoiser):
        def __call__(self, x, sigma, cond):
            sigmas.append(sigma.clone())
            return super().__call__(x, sigma, cond)

    m = wm.tiny(0)
    plan, n_out, sigmas, seen = FifoPlan(2, 2, lookahead=True), 4, [], []
    den = Recording(m)
    hook = m.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[1][0].clone()))
    out = fifo_sample(den, den.condition(["a"]), FlowSigmas(m.flow_shift), (1, 2, 16, 4, 4), n_out, plan,
                      generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert out.shape == (1, n_out, 16, 4, 4) and torch.isfinite(out).all()
    assert den.calls == len(seen) == plan.steps + plan.iterations(n_out) * len(plan.windows())
    for sigma, tokens in zip(sigmas, seen, strict=True):  # [1, F] levels -> [N] timesteps, 4 tokens a frame
        s = sigma[0].double() / (1 + sigma[0].double())
        torch.testing.assert_close(tokens, (1000 * s + 1e-4).floor().float().repeat_interleave(4))
    sig = sampling_sigmas(FlowSigmas(m.flow_shift), plan.steps)[:-1].double()
    levels = sorted(set((1000 * sig / (1 + sig) + 1e-4).floor().tolist()))
    assert sorted({v for t in seen[plan.steps:] for v in t.tolist()}) == levels
    assert any(len(set(t.tolist())) > 1 for t in seen[plan.steps:])  # frames of one window at different levels


# ---------------------------------------------------------------------------------------------- registry, plan


def test_the_wan_family_provides_what_the_jobs_call():
    from vidgen.config import GenerateConfig, ModelConfig, TrainConfig
    from vidgen.models.base import Model, Pipeline, Recipe

    m = ModelConfig(family="wan", flavor="tiny", num_frames=5)
    spec = registry.spec(m)
    assert spec.name == "wan" and spec.conditioning == "text" and set(spec.recipes) == {"wan_full", "wan_lora"}
    assert isinstance(spec.build(m, seed=0), Model)
    for name in spec.recipes:
        r = registry.build_recipe(m, TrainConfig(recipe=name), seed=0)
        assert isinstance(r, Recipe) and r.trainable_parameters()
    g = GenerateConfig(height=32, width=32, num_frames=5)
    pipe = spec.build_pipeline(m, g)
    assert isinstance(pipe, Pipeline) and pipe.latent_shape(g, 5) == (1, 2, 16, 4, 4)
    with pytest.raises(ConfigError, match="generate.height/width=40x32: Wan needs multiples of 16"):
        spec.check_generate(m, GenerateConfig(height=40, width=32))
    with pytest.raises(ConfigError, match="generate.num_frames=16: Wan's causal VAE decodes 4k \\+ 1 frames"):
        spec.check_generate(m, GenerateConfig(height=32, width=32, num_frames=16, sampler="fifo"))
    spec.check_generate(m, GenerateConfig(height=32, width=32, num_frames=17, sampler="fifo"))


@pytest.mark.parametrize("path, variant, transformer", [
    (None, "Wan2.1-T2V-1.3B", 1_418_996_800),  # "1.3B"
    ("s3://models/Wan2.1-T2V-14B-Diffusers", "Wan2.1-T2V-14B", 14_288_491_584),  # "14B"
    ("/m/Wan2.2-TI2V-5B-Diffusers/", "Wan2.2-TI2V-5B", 4_999_787_712),  # "5B"
])
def test_published_sizes_on_the_meta_device(path, variant, transformer):
    """The published architectures (Wan2.1 / Wan2.2 READMEs: dim, ffn, heads, layers) counted on the meta device:
    the transformers are the 1.3B, 14B and 5B of their names; UMT5-XXL's encoder is 5.68B."""
    from vidgen.models.wan.plan import WanPlanner

    assert wm.variant_of(path) == variant
    build = WanPlanner().meta_builder(None)
    m = build("pretrained", path=path, dtype=torch.bfloat16)
    assert build.source.startswith(f"built-in {variant} configs (")  # no config.json read: none local
    count = {k: sum(p.numel() for p in v.parameters()) for k, v in WanPlanner().parts(m).items()}
    assert count["unet"] == transformer and count["text_encoder"] == 5_680_910_336
    assert count["vae"] == (704_688_668 if "2.2" in variant else 126_892_531)
    for module in (m.transformer, m.text_encoder):  # as from_pretrained(torch_dtype=bf16) loads them: bf16, but
        keep = set(module._keep_in_fp32_modules)  # diffusers' / transformers' fp32 modules (UMT5's `wo`) stay fp32
        dtypes = {n: p.dtype for n, p in module.named_parameters() if p.is_meta}
        assert len(dtypes) == len(list(module.parameters()))
        fp32 = {n for n, d in dtypes.items() if keep & set(n.split("."))}
        assert fp32 and all(d == (torch.float32 if n in fp32 else torch.bfloat16) for n, d in dtypes.items())


@pytest.mark.parametrize("sampler, frames", [("base", 5), ("fifo", 13)])
def test_the_generation_actor_makes_a_wan_video(tmp_path, sampler, frames):
    """A generation actor (in-process) with the Wan family: the base sampler over the model's window, FIFO over
    latent frames past it (13 frames: 4 latent frames from a 2-frame window), decoded to 4k + 1 pixel frames."""
    from vidgen.data.video import read_video
    from vidgen.generate.job import VideoGenerator

    cfg = load_config(None, [*WAN, "generate.height=32", "generate.width=32", f"generate.num_frames={frames}",
                             f"generate.sampler={sampler}", "generate.num_inference_steps=2",
                             "generate.fifo.partitions=1"])
    actor = VideoGenerator(cfg.model.model_dump(), cfg.generate.model_dump(), str(tmp_path))
    path = str(tmp_path / "videos" / "a.mp4")
    actor.generate({"name": "a.mp4", "seed": 0, "prompt": "a red car", "sample_prompt": "", "image": ""}, path)
    assert read_video(path)[0].shape == (frames, 32, 32, 3)
    if sampler == "fifo":  # base video (2 levels) + one window per new latent frame and level pass
        from vidgen.diffusion.fifo import FifoPlan

        plan = FifoPlan(2, 1, True)
        assert actor.denoiser.calls == plan.steps + plan.iterations(4) * len(plan.windows())


def test_pretrained_flavor_reads_a_diffusers_wan_directory(tmp_path):
    """A diffusers Wan directory written from the tiny model (a word-level tokenizer stands in for UMT5's) loads
    back with the same weights and sampling shift; a directory without its parts is refused naming them."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    m = wm.tiny(0)
    root = tmp_path / "Wan-tiny"
    m.transformer.save_pretrained(root / "transformer")
    m.vae.save_pretrained(root / "vae")
    m.text_encoder.save_pretrained(root / "text_encoder")
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "car": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 5.0}))

    for path in (str(root), f"file://{root}"):
        loaded = wm.build("pretrained", path=path)
        assert loaded.flow_shift == 5.0 and loaded.text_length == wm.TEXT_LENGTH
        assert all(torch.equal(a, b) for a, b in zip(loaded.transformer.state_dict().values(),
                                                     m.transformer.state_dict().values(), strict=True))
        emb = loaded.encode_text(["a car"])
        assert emb.shape == (1, wm.TEXT_LENGTH, 32) and emb[0, 2:].abs().sum() == 0  # "a car": 2 tokens, no eos
    from vidgen.config import load_config
    from vidgen.models.wan.checks import check_weights

    model_cfg = load_config(None, ["model.family=wan", "model.flavor=pretrained", f"model.path={root}"]).model
    check_weights(model_cfg, None)  # the driver accepts what the actors load
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelError, match="model.path=.*transformer.*WanTransformer3DModel"):
        check_weights(model_cfg, None)
    import shutil

    shutil.rmtree(root / "vae")
    with pytest.raises(ModelError, match=f"model.path={root}: missing subfolder\\(s\\) vae; expected a diffusers Wan"):
        check_weights(model_cfg, None)
    with pytest.raises(ModelError, match="missing subfolder\\(s\\) vae of a diffusers Wan directory"):
        wm.build("pretrained", path=str(root))


def test_the_demo_runs_wan_with_one_override(tmp_path):
    from vidgen.demo import demo_config

    cfg = demo_config(str(tmp_path), ["model.family=wan"])
    assert (cfg.train.recipe, cfg.model.num_frames, cfg.generate.num_frames) == ("wan_full", 5, 17)
    registry.check(cfg.model, cfg.train.recipe)
    assert demo_config(str(tmp_path), ["model.family=wan", "generate.num_frames=9"]).generate.num_frames == 9
    assert demo_config(str(tmp_path), []).train.recipe == "svd_full"  # other families: the demo as it was


def test_generation_plan_counts_fifo_over_latent_frames():
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.plan_generate import plan_generation

    cfg = load_config(None, [*WAN, "generate.num_frames=17", "generate.height=32", "generate.width=32"])
    p = plan_generation(cfg)
    plan = FifoPlan(2, cfg.generate.fifo.partitions, cfg.generate.fifo.lookahead)  # 5 frames: 2 latent frames
    assert p["evaluations"]["unet_calls"] == plan.steps + plan.iterations(5) * len(plan.windows())
    assert p["sampler"]["steps"] == plan.steps and p["shape"]["output_latent"] == [5, 16, 4, 4]
