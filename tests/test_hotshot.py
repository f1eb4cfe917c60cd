"""Hotshot-XL on tiny SDXL: temporal layers against an independent implementation, weight conversion, objective."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from vidgen.errors import ModelError
from vidgen.models.hotshot import model as hotshot
from vidgen.models.hotshot import weights as hw

# ---- an independent Hotshot temporal layer, written from the description (Hotshot's parameter names) ----------


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.pos_encoder = nn.Module()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim, dtype=torch.float64)
        pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.pos_encoder.register_buffer("positional_encoding", pe.float())

    def forward(self, x_bf_s_c: torch.Tensor, frames: int) -> torch.Tensor:
        bf, s, c = x_bf_s_c.shape
        x = x_bf_s_c.reshape(bf // frames, frames, s, c).transpose(1, 2).reshape(-1, frames, c)  # (b s) f c
        x = x + self.pos_encoder.positional_encoding[:, :frames]  # PE added to the normed input
        d = c // self.heads
        q, k, v = (lin(x).reshape(x.shape[0], frames, self.heads, d).transpose(1, 2)
                   for lin in (self.to_q, self.to_k, self.to_v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out = self.to_out[0]((att @ v).transpose(1, 2).reshape(x.shape[0], frames, c))
        return out.reshape(bf // frames, s, frames, c).transpose(1, 2).reshape(bf, s, c)  # back to (b f) s c


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([RefAttention(dim, heads, max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(4 * dim, dim)])
        self.ff.net[0].proj = nn.Linear(dim, 8 * dim)  # GEGLU: value and gate

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x), frames) + x
        a, gate = self.ff.net[0].proj(self.ff_norm(x)).chunk(2, dim=-1)
        return self.ff.net[2](a * nn.functional.gelu(gate)) + x


class RefTemporal(nn.Module):
    def __init__(self, c: int, heads: int = 8, max_len: int = 24):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.proj_in, self.proj_out = nn.Linear(c, c), nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList([RefBlock(c, heads, max_len)])

    def forward(self, x_bcfhw: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x_bcfhw.shape
        x = x_bcfhw.transpose(1, 2).reshape(b * f, c, h, w)
        skip = x
        x = self.norm(x).flatten(2).transpose(1, 2)  # each frame normalised alone; (b f) (h w) c
        x = self.transformer_blocks[0](self.proj_in(x), f)
        x = self.proj_out(x).transpose(1, 2).reshape(b * f, c, h, w) + skip
        return x.reshape(b, f, c, h, w).transpose(1, 2)


def hotshot_reference(unet: hotshot.HotshotUNet, seed: int = 3) -> tuple[dict, dict]:
    """Reference layers at every Hotshot placement and their state dict under Hotshot's key names."""
    torch.manual_seed(seed)
    layers, state = {}, {}
    for kind, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        for i, block in enumerate(blocks):
            for j, m in enumerate(block.motion_modules):
                ref = RefTemporal(m.in_channels)
                for p in ref.parameters():
                    nn.init.normal_(p, std=0.3)
                prefix = f"{kind}.{i}.temporal_attentions.{j}"
                layers[prefix] = ref
                state.update({f"{prefix}.{k}": v.clone() for k, v in ref.state_dict().items()})
    return layers, state


@pytest.fixture(scope="module")
def unet():
    return hotshot.tiny_unet(0)


def test_placement_follows_hotshot(unet):
    n = unet.config.layers_per_block
    layers_per_block = n if isinstance(n, int) else n[0]
    assert [len(b.motion_modules) for b in unet.down_blocks] == [layers_per_block] * len(unet.down_blocks)
    assert [len(b.motion_modules) for b in unet.up_blocks] == [layers_per_block + 1] * len(unet.up_blocks)
    assert not hasattr(unet.mid_block, "motion_modules")
    for m in unet.temporal_layers():
        assert isinstance(m, hotshot.TemporalLayer) and m.transformer_blocks[0].attn1.heads == 8
        assert m.transformer_blocks[0].pos_embed.pe.shape[1] == 24


def test_temporal_layers_equal_an_independent_implementation(unet):
    layers, state = hotshot_reference(unet)
    hw.load_temporal(unet, state)
    torch.manual_seed(0)
    for prefix, ref in layers.items():
        kind, i, _, j = prefix.split(".")
        ours = copy.deepcopy(getattr(unet, kind)[int(i)].motion_modules[int(j)]).double()
        ours.enabled = True
        ref = ref.double()  # float64 on both sides: 1e-6 then measures the maths, not float32 rounding
        b, f, c = 2, 5, ours.in_channels
        x = torch.randn(b, c, f, 3, 4, dtype=torch.float64)
        with torch.no_grad():
            want = ref(x)
            got = ours(x.transpose(1, 2).reshape(b * f, c, 3, 4), num_frames=f)
        assert (got.reshape(b, f, c, 3, 4).transpose(1, 2) - want).abs().max() < 1e-6, prefix
        pe = ours.transformer_blocks[0].pos_embed.pe
        assert torch.allclose(pe, ref.transformer_blocks[0].attention_blocks[0].pos_encoder.positional_encoding,
                              atol=1e-7)
    # diffusers' stock module pools GroupNorm statistics over frames: it is not Hotshot's layer
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    ours.__class__ = AnimateDiffTransformer3D
    try:
        with torch.no_grad():
            stock = ours(x.transpose(1, 2).reshape(b * f, c, 3, 4), num_frames=f)
        assert (stock.reshape(b, f, c, 3, 4).transpose(1, 2) - want).abs().max() > 1e-3
    finally:
        ours.__class__ = hotshot.TemporalLayer


def test_hotshot_keys_load_without_missing_or_unexpected_and_export_reproduces_them(unet, tmp_path):
    _, state = hotshot_reference(unet, seed=4)
    hw.load_temporal(unet, state)
    out = hw.temporal_state_dict(unet)
    assert set(out) == set(state) and all(torch.equal(out[k], state[k]) for k in state)
    hw.write_temporal_file(unet, tmp_path / hw.TEMPORAL_FILE)
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / hw.TEMPORAL_FILE))
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_key_mismatches_are_errors_naming_the_keys(unet):
    _, state = hotshot_reference(unet)
    key = "down_blocks.0.temporal_attentions.1.proj_in.weight"
    with pytest.raises(ModelError, match=f"missing keys {key}"):
        hw.load_temporal(unet, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ModelError, match="unexpected keys up_blocks.0.temporal_attentions.9.norm.weight"):
        hw.load_temporal(unet, {**state, "up_blocks.0.temporal_attentions.9.norm.weight": torch.ones(1)})
    pe_key = "up_blocks.1.temporal_attentions.0.transformer_blocks.0.attention_blocks.1.pos_encoder.positional_encoding"
    with pytest.raises(ModelError, match="positional tables .* differ"):
        hw.load_temporal(unet, {**state, pe_key: state[pe_key] + 1})
    with pytest.raises(ModelError, match="max_frames"):
        hw.load_temporal(unet, {**state, pe_key: state[pe_key][:, :8]})


def test_full_unet_dir_round_trip_and_spatial_swap(tmp_path):
    unet = hotshot.tiny_unet(0)
    _, state = hotshot_reference(unet, seed=5)
    hw.load_temporal(unet, state)
    hw.save_hotshot_unet_dir(unet, tmp_path / "unet")
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet3DConditionModel" and cfg["down_block_types"][0] == "DownBlock3D"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "unet" / hw.WEIGHTS_FILE))
    unet2d = hotshot.tiny_unet2d(0)
    assert set(saved) == set(unet2d.state_dict()) | set(state)  # SDXL 2-D names + Hotshot temporal names
    loaded = hotshot.load_hotshot_unet_dir(tmp_path / "unet")
    a, b = unet.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    hw.save_hotshot_unet_dir(loaded, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / hw.WEIGHTS_FILE))
    assert all(torch.equal(again[k], saved[k]) for k in saved)

    other = hotshot.tiny_unet2d(seed=7)  # any SDXL UNet as the spatial base (Hotshot's --spatial_unet_base)
    other.save_pretrained(tmp_path / "sdxl_unet")
    swapped = hotshot.load_hotshot_unet_dir(tmp_path / "unet", spatial_unet_base=tmp_path / "sdxl_unet")
    s = swapped.state_dict()
    assert all(torch.equal(s[k], v) for k, v in other.state_dict().items())
    assert all(torch.equal(s[k], a[k]) for k in a if ".motion_modules." in k)
    hw.write_temporal_file(unet, tmp_path / "t.safetensors")
    swapped2 = hotshot.load_hotshot_unet_dir(None, spatial_unet_base=tmp_path / "sdxl_unet",
                                        temporal_layers=tmp_path / "t.safetensors")
    assert all(torch.equal(swapped2.state_dict()[k], v) for k, v in s.items())
    saved.pop("conv_in.bias")
    from safetensors.torch import save_file

    save_file(saved, str(tmp_path / "unet" / hw.WEIGHTS_FILE))
    with pytest.raises(ModelError, match="missing keys conv_in.bias"):
        hotshot.load_hotshot_unet_dir(tmp_path / "unet")


def _inputs(b=2, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, f, 8, 8, generator=g), torch.tensor([10, 700])[:b], torch.randn(b, 16, 64, generator=g),
            {"text_embeds": torch.randn(b, 32, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 512})


@torch.no_grad()
def test_spatial_path_is_the_sdxl_unet_and_timesteps_can_be_per_frame():
    unet2d = hotshot.tiny_unet2d(0)
    x, t, ehs, added = _inputs()
    b, _, f = x.shape[:3]
    per_frame = {k: v.repeat_interleave(f, 0) for k, v in added.items()}
    want = unet2d(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(f), ehs.repeat_interleave(f, 0),
                  added_cond_kwargs=per_frame).sample
    for norm in ("frame", "clip"):
        u = hotshot.HotshotUNet.from_unet2d_hotshot(unet2d, spatial_norm=norm).eval()
        off = u(x, t, ehs, added_cond_kwargs=added, enable_temporal_attentions=False).sample
        err = (off.transpose(1, 2).flatten(0, 1) - want).abs().max()
        assert (err < 1e-5) == (norm == "frame"), (norm, err)  # clip norms pool frames, as Hotshot's 3-D resnets
        one = u(x[:, :, :1], t, ehs, added_cond_kwargs=added).sample  # one frame: temporal off, norms agree
        assert (one[:, :, 0] - want.unflatten(0, (b, f))[:, 0]).abs().max() < 1e-5
    on = u(x, t, ehs, added_cond_kwargs=added).sample
    stock = hotshot.UNetMotionModel.forward(u, x, t, ehs.repeat_interleave(f, 0), added_cond_kwargs=added).sample
    assert (on - stock).abs().max() < 1e-5  # our forward = diffusers' forward over the same modules
    per = u(x, t[:, None].expand(b, f), ehs, added_cond_kwargs=added).sample
    assert (per - on).abs().max() < 1e-5
    mixed = u(x, torch.tensor([[10, 10, 900], [700, 700, 700]]), ehs, added_cond_kwargs=added).sample
    assert (mixed[1] - on[1]).abs().max() < 1e-5 and (mixed[0] - on[0]).abs().max() > 1e-4


def test_clip_group_norm_is_group_norm_over_the_clip():
    gn = hotshot.ClipGroupNorm(4, 8)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    gn.num_frames = 3
    x = torch.randn(2, 8, 3, 5, 5)  # b c f h w
    want = nn.functional.group_norm(x, 4, gn.weight, gn.bias, gn.eps)
    got = gn(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (2, 3)).transpose(1, 2)
    assert (got - want).abs().max() < 1e-5


# ---- DDPM objective: hand-computed values --------------------------------------------------------------------


def test_snr_and_min_snr_weights_by_hand():
    from vidgen.diffusion.objectives import compute_snr, min_snr_weight

    snr = compute_snr(torch.tensor([0.8, 0.5, 0.2]), torch.tensor([0, 1, 2]))
    assert snr.tolist() == pytest.approx([4.0, 1.0, 0.25])
    assert min_snr_weight(snr, 1.5, "epsilon").tolist() == pytest.approx([0.375, 1.0, 1.0])  # min(snr, g) / snr
    assert min_snr_weight(snr, 1.5, "v_prediction").tolist() == pytest.approx([0.3, 0.5, 0.2])  # / (snr + 1)
    assert min_snr_weight(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert min_snr_weight(snr, None, "epsilon").tolist() == [1.0, 1.0, 1.0]


def test_forward_process_targets_and_weighted_loss_by_hand():
    from diffusers import DDPMScheduler

    from vidgen.diffusion.objectives import ddpm_noisy, ddpm_target, weighted_mse

    ac, t = torch.tensor([0.64]), torch.tensor([0])
    x0, n = torch.ones(1, 2, 1, 1, 1), torch.full((1, 2, 1, 1, 1), 2.0)
    assert ddpm_noisy(x0, n, ac, t).flatten().tolist() == pytest.approx([2.0, 2.0])  # 0.8 * 1 + 0.6 * 2
    assert ddpm_target(x0, n, ac, t, "v_prediction").flatten().tolist() == pytest.approx([1.0, 1.0])  # .8*2-.6*1
    assert torch.equal(ddpm_target(x0, n, ac, t, "epsilon"), n)
    loss = weighted_mse(torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([0.5, 1.0]))
    assert loss.item() == pytest.approx((0.5 * 1 + 1.0 * 4) / 2)
    sched = DDPMScheduler(**hotshot.SDXL_SCHEDULER)  # and the same as diffusers' scheduler
    x, noise, ts = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5), torch.tensor([3, 400, 999])
    acp = sched.alphas_cumprod
    assert torch.allclose(ddpm_noisy(x, noise, acp, ts), sched.add_noise(x, noise, ts), atol=1e-6)
    assert torch.allclose(ddpm_target(x, noise, acp, ts, "v_prediction"), sched.get_velocity(x, noise, ts), atol=1e-6)


def test_noise_offset_is_one_draw_per_video_and_channel():
    from vidgen.diffusion.objectives import offset_noise

    shape = (3, 4, 2, 5, 5)  # B F C h w
    plain = offset_noise(shape, 0.0, torch.Generator().manual_seed(1))
    with_offset = offset_noise(shape, 0.05, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randn(shape, generator=g)
    extra = torch.randn((3, 1, 2, 1, 1), generator=g)
    assert torch.allclose(with_offset - plain, (0.05 * extra).expand(shape), atol=1e-7)
    diff = (with_offset - plain).transpose(1, 2).flatten(2)  # [B, C, F*h*w]: constant within a video-channel
    assert diff.std(dim=2).max() < 1e-6 and diff[:, :, 0].abs().min() > 0


# ---- the recipe, one plain PyTorch step -------------------------------------------------------------------------


def _recipe(*overrides):
    from vidgen.config import load_config
    from vidgen.models.registry import build_recipe

    cfg = load_config(None, ["model.family=hotshot", "model.num_frames=3", "train.recipe=hotshot_temporal",
                             *overrides])
    return build_recipe(cfg.model, cfg.train, 0)


def test_a_training_step_changes_only_temporal_parameters():
    recipe = _recipe("train.ddpm.snr_gamma=5.0", "train.ddpm.noise_offset=0.05", "train.ddpm.caption_dropout=0.5")
    unet = recipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(recipe.trainable_parameters(), lr=1e-3)
    batch = {"frames": torch.randint(0, 256, (1, 3, 32, 64, 3), dtype=torch.uint8), "fps": torch.tensor([8.0]),
             "prompt": ["a car on a road"]}
    loss, _ = recipe.loss(batch, lambda *a, **k: unet(*a, return_dict=False, **k)[0], torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    temporal = {k for k in before if ".motion_modules." in k and not k.endswith(".pe")}
    assert changed == temporal
    assert all(not p.requires_grad for m in (recipe.model.vae, recipe.model.text.text_encoder) for p in m.parameters())


def test_sdxl_conditioning_order_and_caption_dropout():
    recipe = _recipe("train.ddpm.caption_dropout=1.0", "train.ddpm.prediction_type=v_prediction")
    assert recipe.model.prediction_type == "v_prediction"
    batch = {"prompt": ["a", "b"], "orig_height": torch.tensor([720, 1080]), "orig_width": torch.tensor([1280, 1920]),
             "crop_top": torch.tensor([5, 0]), "crop_left": torch.tensor([7, 0])}
    enc = dict(zip(("prompt_embeds", "pooled_embeds"), recipe.model.text.encode(["a", "b"]), strict=True))
    embeds, pooled, ids = recipe.conditioning(batch, enc, (32, 64), "cpu", torch.Generator().manual_seed(0))
    assert ids.tolist() == [[720, 1280, 5, 7, 32, 64], [1080, 1920, 0, 0, 32, 64]]  # (h, w), (top, left), (h, w)
    assert embeds.abs().max() == 0 and pooled.abs().max() == 0  # dropped captions: zero embeddings
    kept = _recipe().conditioning({"prompt": ["a", "b"]}, enc, (32, 64), "cpu", torch.Generator().manual_seed(0))
    assert kept[2].tolist() == [[32, 64, 0, 0, 32, 64]] * 2 and kept[0].abs().max() > 0
    text = recipe.model.text
    e, p = text.encode(["a car"])
    assert e.shape == (1, 16, 64) and p.shape == (1, 32)
    assert (e[..., :32] - text.text_encoder(text.tokenizer(["a car"], padding="max_length", max_length=16,
                                                            return_tensors="pt").input_ids,
                                            output_hidden_states=True).hidden_states[-2]).abs().max() == 0


# ---- generation ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return hotshot.tiny(0)


@torch.no_grad()
def test_euler_over_ddim_sigmas_is_diffusers_ddim(tiny_model):
    from diffusers import DDIMScheduler

    from vidgen.diffusion.samplers import base_sample
    from vidgen.models.hotshot.pipeline import DDIMSigmas, HotshotDenoiser

    m = tiny_model
    den = HotshotDenoiser(m, guidance_scale=3.0)
    cond = den.condition(["a red car", "a road"], 64, 64)
    shape = (2, 3, 4, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = base_sample(den, cond, DDIMSigmas(m.scheduler.config), shape, 3, latents=noise.clone())

    ddim = DDIMScheduler.from_config(m.scheduler.config)
    ddim.set_timesteps(3)
    x = noise.permute(0, 2, 1, 3, 4) * ddim.init_noise_sigma  # [B, C, F, h, w]
    zeros = torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled)
    for t in ddim.timesteps:
        added = {"text_embeds": torch.cat([zeros[1], cond.pooled]), "time_ids": torch.cat([cond.time_ids] * 2)}
        eps = m.unet(torch.cat([x, x]), t, torch.cat([zeros[0], cond.prompt_embeds]), added_cond_kwargs=added).sample
        uncond, text = eps.chunk(2)
        x = ddim.step(uncond + 3.0 * (text - uncond), t, x).prev_sample
    assert (ours - x.permute(0, 2, 1, 3, 4)).abs().max() < 1e-4


def test_text_to_video_frames_image_mode_and_sizes(tiny_model):
    from vidgen.errors import ConfigError
    from vidgen.models.hotshot.pipeline import text_to_video

    video = text_to_video(tiny_model, ["a car"], num_frames=3, height=64, width=64, num_steps=2, guidance_scale=2.0,
                          allow_any_size=True)
    assert video.shape == (1, 3, 64, 64, 3) and video.dtype == np.uint8 and video.std() > 0
    image = text_to_video(tiny_model, ["a car"], num_frames=1, height=64, width=64, num_steps=2, allow_any_size=True)
    assert image.shape == (1, 1, 64, 64, 3)
    with pytest.raises(ConfigError, match="trained at"):
        text_to_video(tiny_model, ["a car"], height=64, width=64)
    with pytest.raises(ConfigError, match="positional table holds 24"):
        text_to_video(tiny_model, ["a car"], num_frames=25, height=512, width=512)


@torch.no_grad()
def test_sdxl_lora_lands_on_the_spatial_layers(tiny_model):
    from peft import LoraConfig, get_peft_model_state_dict

    from vidgen.models.hotshot.pipeline import load_sdxl_lora

    unet2d = hotshot.tiny_unet2d(0)
    unet2d.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for n, p in unet2d.named_parameters():
        if "lora_B" in n:
            p.normal_(std=0.5)
    lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet2d).items()}
    model = hotshot.tiny(0)
    x, t, ehs, added = _inputs()
    b, _, f = x.shape[:3]
    before = model.unet(x, t, ehs, added_cond_kwargs=added, enable_temporal_attentions=False).sample
    load_sdxl_lora(model, lora)
    model.unet.spatial_norm = "frame"
    for mod in model.unet.modules():
        if isinstance(mod, hotshot.ClipGroupNorm):
            mod.__class__ = nn.GroupNorm
    after = model.unet(x, t, ehs, added_cond_kwargs=added, enable_temporal_attentions=False).sample
    want = unet2d(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(f), ehs.repeat_interleave(f, 0),
                  added_cond_kwargs={k: v.repeat_interleave(f, 0) for k, v in added.items()}).sample
    assert (after.transpose(1, 2).flatten(0, 1) - want).abs().max() < 1e-5  # = the SDXL UNet with the LoRA
    assert (after - before).abs().max() > 1e-3
    assert not any("lora" in n for n, _ in model.unet.named_parameters() if ".motion_modules." in n)


def test_controlnet_per_frame_and_control_frames(tiny_model):
    from vidgen.models.hotshot.pipeline import (
        HotshotDenoiser,
        control_frames_from,
        controlnet_from_spatial,
        text_to_video,
    )

    controlnet = controlnet_from_spatial(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained ControlNet's zero convs are not zero: make this one act
        for n, p in controlnet.named_parameters():
            if n.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(std=0.1)
    source = np.random.default_rng(0).integers(0, 256, (10, 48, 80, 3), dtype=np.uint8)
    maps = control_frames_from(source, 3, 64, 64, extractor=lambda fr: 255 - fr)
    assert maps.shape == (3, 64, 64, 3) and np.array_equal(maps[0], 255 - control_frames_from(source, 3, 64, 64)[0])
    kw = dict(num_frames=3, height=64, width=64, num_steps=2, guidance_scale=1.0, allow_any_size=True)
    plain = text_to_video(tiny_model, ["a car"], **kw)
    controlled = text_to_video(tiny_model, ["a car"], controlnet=controlnet, control_frames=maps[None], **kw)
    off = text_to_video(tiny_model, ["a car"], controlnet=controlnet, control_frames=maps[None],
                        controlnet_scale=0.0, **kw)
    assert controlled.shape == plain.shape and np.abs(controlled.astype(int) - plain).max() > 0
    assert np.abs(off.astype(int) - plain).max() <= 1
    den = HotshotDenoiser(tiny_model, controlnet=controlnet)
    cond = den.condition(["a car"], 64, 64, control_frames=maps[None])
    x = torch.randn(1, 3, 4, 8, 8)
    one = den(x, torch.full((1, 3), 2.0), cond)
    swapped = den(x, torch.full((1, 3), 2.0), cond.__class__(cond.prompt_embeds, cond.pooled, cond.time_ids,
                                                            cond.control.flip(1)))
    assert (one - swapped).abs().max() > 0  # each frame sees its own control map


@torch.no_grad()
def test_fifo_runs_on_the_hotshot_denoiser(tiny_model):
    from vidgen.diffusion.fifo import FifoPlan
    from vidgen.diffusion.samplers import fifo_sample
    from vidgen.models.hotshot.pipeline import DDIMSigmas, HotshotDenoiser

    den = HotshotDenoiser(tiny_model)
    cond = den.condition(["a car"], 64, 64)
    plan = FifoPlan(window=2, partitions=1, lookahead=False)
    out = fifo_sample(den, cond, DDIMSigmas(tiny_model.scheduler.config), (1, 2, 4, 8, 8), 5, plan,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 5, 4, 8, 8) and torch.isfinite(out).all()
