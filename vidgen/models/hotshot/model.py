"""Hotshot-XL: a frozen SDXL 2-D UNet with temporal layers, built on diffusers' UNetMotionModel.

Shapes: B batch, F frames, C channels, H/W latent height/width, S text tokens.

Hotshot-XL puts one temporal transformer after every resnet (+ spatial attention) of the down and up blocks, none in
the mid block: GroupNorm -> proj_in -> [LayerNorm -> +sinusoidal PE -> self-attention over frames (8 heads)] x 2 ->
LayerNorm -> GEGLU feed-forward -> proj_out, every stage residual. diffusers' `AnimateDiffTransformer3D` is the same
module except that its GroupNorm pools statistics over all frames of a clip, where Hotshot normalises each frame on
its own (training.md 2.4): `TemporalLayer` overrides exactly that. Hotshot's spatial `ResnetBlock3D` norms (and the
output norm) work on 5-D tensors, so their statistics span the clip's frames; `spatial_norm="clip"` (the default)
reproduces that with `ClipGroupNorm`, `"frame"` gives diffusers' per-frame 2-D behaviour. With one frame both agree.

`HotshotUNet.forward` takes a timestep per video [B] or per frame [B, F] (the denoiser interface) and text
conditioning per video [B, S, D]. Weight conversion to and from Hotshot's own key names is in `weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNetMotionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from vidgen.errors import ModelError, brief
from vidgen.models import attention
from vidgen.models.attention import check_backend
from vidgen.models.hotshot import sdxl
from vidgen.models.hotshot import weights as hw
from vidgen.models.loading import resolve_model_dir
from vidgen.models.vae import LatentVideoModel

HOTSHOT_HEADS = 8
HOTSHOT_MAX_FRAMES = 24  # the positional-encoding table of the published weights


class TemporalLayer(AnimateDiffTransformer3D):
    """AnimateDiffTransformer3D with Hotshot's per-frame GroupNorm; `enabled=False` makes it the identity."""

    enabled: bool = True

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None, timestep=None, class_labels=None,
                num_frames: int = 1, cross_attention_kwargs=None) -> torch.Tensor:
        if not self.enabled:
            return hidden_states
        bf, c, h, w = hidden_states.shape
        b, f = bf // num_frames, num_frames
        x = self.norm(hidden_states)  # (B*F, C, H, W): statistics of each frame alone
        x = x.reshape(b, f, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, f, c)  # a sequence per pixel
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states=None, cross_attention_kwargs=cross_attention_kwargs)
        x = self.proj_out(x)
        x = x.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + hidden_states


class FramePositions(SinusoidalPositionalEmbedding):
    """The temporal positional table, added in the dtype of the frames it is added to. DeepSpeed's bf16/fp16 modes
    cast parameters, not buffers: with the fp32 table, diffusers' own add turns 16-bit frames into fp32 ones that
    the 16-bit attention projections then refuse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class ClipGroupNorm(torch.nn.GroupNorm):
    """GroupNorm on (B*F, C, H, W) whose statistics span the F frames of each clip, as GroupNorm on Hotshot's
    (B, C, F, H, W) tensors does. Same parameters as nn.GroupNorm, so state dicts are unchanged."""

    num_frames: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.num_frames
        if f <= 1:
            return super().forward(x)
        bf, c, h, w = x.shape
        y = x.reshape(bf // f, f, c, h, w).transpose(1, 2)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.transpose(1, 2).reshape(bf, c, h, w)


class HotshotUNet(UNetMotionModel):
    """UNetMotionModel with Hotshot's temporal layers; build it with `from_unet2d_hotshot` or `from_config_2d`."""

    spatial_norm: str = "clip"

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config_2d(cls, config_2d: dict, max_frames: int = HOTSHOT_MAX_FRAMES, heads: int = HOTSHOT_HEADS,
                       spatial_norm: str = "clip") -> HotshotUNet:
        """Random temporal layers (and spatial layers) for an SDXL-style UNet2DConditionModel config."""
        c = dict(config_2d)
        c["down_block_types"] = [("CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion")
                                 for t in c["down_block_types"]]
        c["up_block_types"] = [("CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion")
                               for t in c["up_block_types"]]
        if not c.get("num_attention_heads"):  # diffusers' historical naming: SDXL configs say attention_head_dim
            c["num_attention_heads"] = c.get("attention_head_dim")
        c.update(motion_num_attention_heads=heads, motion_max_seq_length=max_frames, use_motion_mid_block=False,
                 temporal_transformer_layers_per_block=1)
        expected, optional = cls._get_signature_keys(cls)
        model = cls.from_config({k: v for k, v in c.items() if k in expected or k in optional})
        model.config_2d = {k: v for k, v in dict(config_2d).items() if not k.startswith("_")}
        model._hotshotify(spatial_norm)
        return model

    @classmethod
    def from_unet2d_hotshot(cls, unet2d: UNet2DConditionModel, max_frames: int = HOTSHOT_MAX_FRAMES,
                            heads: int = HOTSHOT_HEADS, spatial_norm: str = "clip") -> HotshotUNet:
        """Every weight of `unet2d` (all of them, unlike `UNetMotionModel.from_unet2d`, which skips the SDXL
        `add_embedding`) plus freshly initialised temporal layers."""
        model = cls.from_config_2d(dict(unet2d.config), max_frames, heads, spatial_norm)
        hw.load_spatial(model, unet2d.state_dict(), "the SDXL UNet")
        return model.to(unet2d.dtype)

    def _hotshotify(self, spatial_norm: str) -> None:
        if spatial_norm not in ("clip", "frame"):
            raise ValueError(f"spatial_norm={spatial_norm!r}: expected clip or frame")
        self.spatial_norm = spatial_norm
        for m in self.temporal_layers():
            m.__class__ = TemporalLayer  # adds behaviour only: no new state
            for block in m.transformer_blocks:
                if isinstance(block.pos_embed, SinusoidalPositionalEmbedding):
                    block.pos_embed.__class__ = FramePositions
        if spatial_norm == "clip":
            for name, m in self.named_modules():
                if isinstance(m, torch.nn.GroupNorm) and _is_resnet_or_out_norm(name):
                    m.__class__ = ClipGroupNorm

    # -- parts --------------------------------------------------------------------------------

    def temporal_layers(self) -> list[AnimateDiffTransformer3D]:
        return [m for blocks in (self.down_blocks, self.up_blocks) for b in blocks for m in b.motion_modules]

    def temporal_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.temporal_layers() for p in m.parameters()]

    def _set_frames(self, num_frames: int, temporal: bool) -> None:
        for m in self.temporal_layers():
            m.enabled = temporal
        for m in self.modules():
            if isinstance(m, ClipGroupNorm):
                m.num_frames = num_frames

    # -- forward ------------------------------------------------------------------------------

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, enable_temporal_attentions: bool | None = None,
                cross_attention_kwargs: dict | None = None, return_dict: bool = True, **unused):
        """sample [B, C, F, H, W]; timestep scalar, [B] or [B, F]; encoder_hidden_states [B, S, D] (or [B*F, S, D]);
        added_cond_kwargs {text_embeds [B, P], time_ids [B, 6]}. Temporal layers run when F > 1 unless told."""
        b, _, f = sample.shape[:3]
        temporal = f > 1 if enable_temporal_attentions is None else enable_temporal_attentions
        self._set_frames(f, temporal)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1, 1).expand(b, f) if t.ndim <= 1 else t  # [B, F]
        emb = self.time_embedding(self.time_proj(t.reshape(-1)).to(self.dtype))  # [B*F, D]: a time per frame
        if self.config.addition_embed_type == "text_time":
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            add = self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
            emb = emb + add.repeat_interleave(f, dim=0)
        ehs = encoder_hidden_states
        if ehs.shape[0] == b and f > 1:
            ehs = ehs.repeat_interleave(f, dim=0)

        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, *sample.shape[1:2], *sample.shape[3:])
        x = self.conv_in(x.contiguous())  # channels-last input: see Hotshot.encode_video
        kw = dict(encoder_hidden_states=ehs, cross_attention_kwargs=cross_attention_kwargs)
        res = (x,)
        for block in self.down_blocks:
            extra = kw if getattr(block, "has_cross_attention", False) else {}
            x, r = block(hidden_states=x, temb=emb, num_frames=f, **extra)
            res += r
        if down_block_additional_residuals is not None:
            res = tuple(a + d for a, d in zip(res, down_block_additional_residuals, strict=True))
        x = self.mid_block(x, emb, **kw)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for i, block in enumerate(self.up_blocks):
            skips, res = res[-len(block.resnets):], res[: -len(block.resnets)]
            size = res[-1].shape[2:] if i < len(self.up_blocks) - 1 else None
            extra = kw if getattr(block, "has_cross_attention", False) else {}
            x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=skips, upsample_size=size, num_frames=f,
                      **extra)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        out = x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        return (out,) if not return_dict else _Output(out)


@dataclass
class _Output:
    sample: torch.Tensor


def _is_resnet_or_out_norm(name: str) -> bool:
    return name == "conv_norm_out" or (".resnets." in name and name.rsplit(".", 1)[-1] in ("norm1", "norm2"))


# ---------------------------------------------------------------------------------------------
# tiny flavor (diffusers' AnimateDiff-SDXL test UNet, training.md 4.6, with GroupNorm(32) as Hotshot needs)


@dataclass(frozen=True)
class TinyUNetConfig:
    # Two of the test config's three levels keep CPU steps fast; channels stay multiples of 32 because
    # Hotshot's temporal GroupNorm has 32 groups.
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] = (2, 4)
    transformer_layers_per_block: tuple[int, ...] = (1, 2)
    addition_time_embed_dim: int = 8
    text_width: int = 64  # the two tiny text encoders' hidden widths, concatenated
    pooled_width: int = 32


def tiny_unet2d(seed: int = 0, cfg: TinyUNetConfig = TinyUNetConfig()) -> UNet2DConditionModel:
    n = len(cfg.channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block, sample_size=32,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=cfg.attention_head_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + cfg.pooled_width,
        cross_attention_dim=cfg.text_width, norm_num_groups=32,
    ).eval()


def tiny_unet(seed: int = 0, cfg: TinyUNetConfig = TinyUNetConfig(), max_frames: int = HOTSHOT_MAX_FRAMES,
              spatial_norm: str = "clip") -> HotshotUNet:
    unet2d = tiny_unet2d(seed, cfg)
    torch.manual_seed(seed + 1)
    return HotshotUNet.from_unet2d_hotshot(unet2d, max_frames=max_frames, spatial_norm=spatial_norm).eval()


# ---------------------------------------------------------------------------------------------
# the whole model: UNet + VAE + SDXL text encoders + DDPM scheduler config


@dataclass
class Hotshot(LatentVideoModel):
    unet: HotshotUNet
    vae: torch.nn.Module  # AutoencoderKL
    text: object  # vidgen.models.hotshot.sdxl.SDXLText
    scheduler: object  # DDPMScheduler (training); samplers derive DDIM from its config

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def set_attention(self, backend: str) -> Hotshot:
        attention.apply(backend, [self.unet, self.vae], [self.text.text_encoder, self.text.text_encoder_2])
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Hotshot:
        for m in (self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        self.text.to(device, dtype)
        return self

    @torch.no_grad()
    def decode_video(self, latents_bfchw: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Frames in [-1, 1], [B, F, 3, H, W], decoded `chunk` frames at a time."""
        b, f = latents_bfchw.shape[:2]
        z = latents_bfchw.flatten(0, 1) / self.scaling_factor
        out = [self.vae.decode(z[i:i + chunk].to(self.vae.dtype)).sample for i in range(0, z.shape[0], chunk)]
        return torch.cat(out).unflatten(0, (b, f)).float()


SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False)


def tiny(seed: int = 0, max_frames: int = HOTSHOT_MAX_FRAMES, spatial_norm: str = "clip",
         prediction_type: str = "epsilon") -> Hotshot:
    unet = tiny_unet(seed, max_frames=max_frames, spatial_norm=spatial_norm)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                        latent_channels=4, sample_size=64, scaling_factor=0.13025).eval()
    scheduler = DDPMScheduler(**{**SDXL_SCHEDULER, "prediction_type": prediction_type})
    return Hotshot(unet, vae, sdxl.tiny_text(seed), scheduler)


def load_hotshot_unet_dir(path: str | Path, spatial_unet_base: str | Path | None = None,
                          temporal_layers: str | Path | None = None, max_frames: int | None = None,
                          spatial_norm: str = "clip"):
    """A HotshotUNet from a Hotshot `unet/` directory, or from any SDXL UNet directory (`spatial_unet_base`, a
    diffusers UNet2DConditionModel dir) plus the temporal layers of `path` or of a `temporal_layers` file."""
    root = Path(path) if path else None
    state: dict[str, torch.Tensor] = {}
    if root is not None:
        if not (root / "config.json").is_file():
            raise ModelError(f"{root}: not a Hotshot-XL unet directory (expected config.json and {hw.WEIGHTS_FILE})")
        cfg_2d = hw.config_2d_from_hotshot(hw.read_config(root / "config.json"), str(root / "config.json"))
        weights = root / hw.WEIGHTS_FILE
        state = hw.read_tensors(weights if weights.is_file() else root / "diffusion_pytorch_model.bin")
    spatial_what = str(root)
    if spatial_unet_base is not None:  # Hotshot's --spatial_unet_base: only the temporal keys of `path` are kept
        base = Path(spatial_unet_base)
        if not (base / "config.json").is_file():
            raise ModelError(f"{base}: not a diffusers UNet directory (expected config.json)")
        cfg_2d = {k: v for k, v in hw.read_config(base / "config.json").items() if not k.startswith("_")}
        bw = base / hw.WEIGHTS_FILE
        state = {**hw.read_tensors(bw if bw.is_file() else base / "diffusion_pytorch_model.bin"),
                 **{k: v for k, v in state.items() if hw.is_temporal(k)}}
        spatial_what = str(base)
    if root is None and spatial_unet_base is None:
        raise ModelError("a Hotshot UNet needs a unet directory or a spatial_unet_base")
    if temporal_layers is not None:
        state = {k: v for k, v in state.items() if not hw.is_temporal(k)}
        state.update(hw.read_tensors(Path(temporal_layers)))
    pe = next((v for k, v in state.items() if k.endswith("pos_encoder.positional_encoding")), None)
    frames = max_frames or (pe.shape[1] if pe is not None else HOTSHOT_MAX_FRAMES)
    unet = HotshotUNet.from_config_2d(cfg_2d, max_frames=frames, spatial_norm=spatial_norm)
    unet.config_2d = cfg_2d
    hw.load_spatial(unet, state, spatial_what)
    if any(hw.is_temporal(k) for k in state):
        hw.load_temporal(unet, state, str(temporal_layers or root))
    return unet.eval()


def pretrained(path: str, cache_dir: str = "~/.cache/vidgen/models", temporal_layers: str | None = None,
               spatial_unet_base: str | None = None, max_frames: int | None = None,
               spatial_norm: str = "clip") -> Hotshot:
    """A local Hotshot-XL (or SDXL + `temporal_layers`) directory: unet/, vae/, scheduler/, tokenizer(_2)/,
    text_encoder(_2)/. `spatial_unet_base` swaps in another SDXL UNet, keeping the temporal layers."""
    root = resolve_model_dir(path, cache_dir, "Hotshot-XL (or SDXL) diffusers-format",
                             ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2"))
    missing = [s for s in ("unet", "vae", "scheduler") if not (root / s).is_dir()]
    if missing:
        raise ModelError(f"{path}: missing subfolder(s) {', '.join(missing)} of a Hotshot-XL/SDXL directory")
    unet_dir = root / "unet"
    is_hotshot = b"UNet3D" in (unet_dir / "config.json").read_bytes() if (unet_dir / "config.json").is_file() else False
    if not is_hotshot and temporal_layers is None:
        raise ModelError(f"{unet_dir}: an SDXL (2-D) UNet; set model.temporal_layers to a {TEMPORAL_NAME} file")
    unet = load_hotshot_unet_dir(unet_dir if is_hotshot else None,
                                 spatial_unet_base=spatial_unet_base or (None if is_hotshot else unet_dir),
                                 temporal_layers=temporal_layers, max_frames=max_frames, spatial_norm=spatial_norm)
    try:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True).eval()
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    except Exception as e:  # unreadable configs, truncated or foreign weights
        raise ModelError(f"{path}: cannot load vae/scheduler ({brief(e)})") from None
    return Hotshot(unet, vae, sdxl.pretrained_text(root), scheduler)


TEMPORAL_NAME = "hsxl_temporal_layers.safetensors"


# ---------------------------------------------------------------------------------------------
# full-size configs (no weights): what `vidgen plan` builds on the meta device when model.path has none


def full_size_configs() -> dict[str, dict]:
    """The configs of stabilityai/stable-diffusion-xl-base-1.0 (Hotshot-XL's spatial base, frozen in training).

    unet: its `unet/config.json` (a UNet2DConditionModel, 2,567,463,684 parameters); `from_configs` adds the
    temporal layers vidgen builds (`HotshotUNet.from_config_2d`: one 8-head temporal transformer per down/up resnet,
    none in the mid block; Hotshot's `hsxl_temporal_layers.safetensors` holds them). vae: its `vae/` AutoencoderKL
    (83,653,863, force_upcast, scaling 0.13025). text_encoder(_2): `vidgen.models.hotshot.sdxl.full_size_text_configs`.
    """
    return {
        "unet": dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled text
            norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025,
            force_upcast=True,
        ),
        **sdxl.full_size_text_configs(),
    }


def from_configs(configs: dict[str, dict], max_frames: int = HOTSHOT_MAX_FRAMES, spatial_norm: str = "clip",
                 prediction_type: str = "epsilon", seed: int | None = None) -> Hotshot:
    """A Hotshot from config dicts (`full_size_configs()`, or config.json files of a local directory: a Hotshot
    UNet3D or SDXL 2-D `unet`), randomly initialised on the current default device and dtype: build under
    `torch.device("meta")` to get shapes without memory. With `seed`, each part is seeded on its own (seed: the
    UNet, + 1: the VAE, + 2: the text encoders). The scheduler is SDXL's DDPM config, always in fp32."""
    def seeded(i: int) -> None:
        if seed is not None:
            torch.manual_seed(seed + i)

    unet_cfg = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    if any(t.endswith("3D") for t in unet_cfg["down_block_types"]):  # Hotshot's own UNet3DConditionModel config
        unet_cfg = hw.config_2d_from_hotshot(unet_cfg, "unet config")
    seeded(0)
    unet = HotshotUNet.from_config_2d(unet_cfg, max_frames=max_frames, spatial_norm=spatial_norm).eval()
    seeded(1)
    vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")}).eval()
    seeded(2)
    text = sdxl.text_from_configs(configs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the noise schedule's betas and alphas_cumprod
    try:
        scheduler = DDPMScheduler(**{**SDXL_SCHEDULER, "prediction_type": prediction_type})
    finally:
        torch.set_default_dtype(previous)
    return Hotshot(unet, vae, text, scheduler)


def full(seed: int = 0, max_frames: int = HOTSHOT_MAX_FRAMES, spatial_norm: str = "clip",
         prediction_type: str = "epsilon", dtype: torch.dtype = torch.float32) -> Hotshot:
    """Hotshot-XL's architecture at full size (`full_size_configs`: SDXL base 1.0 + the temporal layers), random
    init, every part built directly in `dtype` (a 2.8B-parameter UNet is never held in fp32 first when the frozen
    base trains in bf16) and seeded on its own (see `from_configs`). The tokenizers are the offline byte-level ones."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return from_configs(full_size_configs(), max_frames, spatial_norm, prediction_type, seed=seed)
    finally:
        torch.set_default_dtype(previous)


def build(flavor: str, *, path: str | None = None, cache_dir: str = "~/.cache/vidgen/models", seed: int = 0,
          temporal_layers: str | None = None, spatial_unet_base: str | None = None, max_frames: int | None = None,
          spatial_norm: str = "clip", prediction_type: str | None = None, attention: str = "sdpa",
          dtype: torch.dtype = torch.float32) -> Hotshot:
    """The entry point configs use (model.family=hotshot). `dtype`: what flavor=full builds its weights in (the
    recipe's frozen-base dtype)."""

    check_backend(attention)  # before loading gigabytes of weights
    if flavor == "tiny":
        model = tiny(seed, max_frames or HOTSHOT_MAX_FRAMES, spatial_norm, prediction_type or "epsilon")
        if temporal_layers:
            hw.read_temporal_file(model.unet, temporal_layers)
    elif flavor == "full":
        model = full(seed, max_frames or HOTSHOT_MAX_FRAMES, spatial_norm, prediction_type or "epsilon", dtype)
        if temporal_layers:
            hw.read_temporal_file(model.unet, temporal_layers)
    elif flavor == "pretrained":
        if not path:
            raise ModelError("model.path: required for model.flavor=pretrained (a Hotshot-XL or SDXL directory)")
        model = pretrained(path, cache_dir, temporal_layers, spatial_unet_base, max_frames, spatial_norm)
        if prediction_type:
            model.scheduler = model.scheduler.__class__.from_config(model.scheduler.config,
                                                                    prediction_type=prediction_type)
    else:
        raise ModelError(f"model.flavor={flavor}: expected one of tiny, full, pretrained")
    return model.set_attention(attention)


def from_config(m, seed: int = 0, dtype: torch.dtype = torch.float32) -> Hotshot:
    """The model a `model.*` config section describes (vidgen.config.ModelConfig)."""
    return build(m.flavor, path=m.path, cache_dir=m.cache_dir, seed=seed, temporal_layers=m.temporal_layers,
                 spatial_unet_base=m.spatial_unet_base, max_frames=m.max_frames, spatial_norm=m.spatial_norm,
                 attention=m.attention, dtype=dtype)
