"""Hotshot-XL text-to-video: the per-frame denoiser, DDIM, the pipeline, SDXL LoRAs and a per-frame SDXL ControlNet.

Shapes: B batch, F frames, C latent channels, h/w latents, H/W pixels, S text tokens.

    denoise(latents[B, F, C, h, w], sigma[B, F], cond) -> x0 estimate [B, F, C, h, w]

The project's samplers work in sigma space (x = x0 + sigma * n). A DDPM model sees x_vp = x / sqrt(1 + sigma^2) at
the timestep whose sigma = sqrt((1 - a_t) / a_t) is `sigma`; the x0 estimate is x - sigma * eps (epsilon models) or
x_vp / sqrt(1 + sigma^2) - sigma * v / sqrt(1 + sigma^2) (v models). An Euler step over the sigmas of DDIM's timesteps
is then exactly DDIM with eta = 0 (the tests compare with diffusers' DDIMScheduler), and the same denoiser serves the
FIFO sampler, where every frame has its own sigma and hence its own timestep.

Classifier-free guidance uses zero text embeddings as the unconditional input (SDXL's force_zeros_for_empty_prompt,
and what caption dropout trains). video_length 1 runs the spatial layers only, as Hotshot's pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import safetensors.torch
import torch
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel

from vidgen import storage
from vidgen.config import GenerateConfig, ModelConfig
from vidgen.data.clips import resize_cover_crop
from vidgen.diffusion.objectives import append_dims
from vidgen.diffusion.samplers import base_sample, sampling_sigmas
from vidgen.errors import ConfigError
from vidgen.models.hotshot import model as hotshot
from vidgen.models.hotshot.control import (
    check_controlnet_dir,
    check_depth_model_dir,
    control_clip,
    load_controlnet,
    load_depth_estimator,
    step_keep,
)
from vidgen.models.hotshot.model import Hotshot
from vidgen.models.hotshot.sdxl import time_ids_for
from vidgen.models.hotshot.weights import TEMPORAL_FILE, spatial_state_dict

# Hotshot-XL's training sizes at 512 (README "Supported Aspect Ratios"), as (height, width)
ASPECTS_512 = ((768, 320), (672, 384), (608, 416), (512, 512), (416, 608), (384, 672), (320, 768))


def check_trained_size(height: int, width: int, any_size: bool = False) -> None:
    """Hotshot-XL's pretrained weights make video only at the sizes they were trained at (no model needed: the
    generation driver refuses another size before an actor loads one)."""
    if not any_size and (height, width) not in ASPECTS_512:
        sizes = ", ".join(f"{w}x{h}" for h, w in ASPECTS_512)
        raise ConfigError(f"generate size {width}x{height}: Hotshot-XL was trained at {sizes} (WxH)")


def check_size(height: int, width: int, model: Hotshot, allow_any: bool = False) -> None:
    f = model.vae_scale_factor
    if height % f or width % f:
        raise ConfigError(f"generate.height/width={height}x{width}: expected multiples of {f}")
    check_trained_size(height, width, allow_any)


class DDIMSigmas:
    """A scheduler stand-in for vidgen.diffusion.samplers: DDIM's timesteps as a descending sigma table + 0."""

    def __init__(self, config):
        self.ddim = DDIMScheduler.from_config(config)
        self.config = self.ddim.config  # timestep_spacing "leading": init noise scale sqrt(sigma_max^2 + 1)
        self.sigmas = None

    def set_timesteps(self, num_steps: int, device="cpu") -> None:
        self.ddim.set_timesteps(num_steps, device="cpu")
        ac = self.ddim.alphas_cumprod.double()
        a = ac[self.ddim.timesteps.long()]
        final = float(self.ddim.final_alpha_cumprod)
        tail = torch.tensor([((1 - final) / final) ** 0.5], dtype=torch.float64)
        self.sigmas = torch.cat([((1 - a) / a).sqrt(), tail]).float()


def sigma_to_t(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of each sigma: interpolation in log-sigma over the training table (k-diffusion's rule);
    a table sigma gives its own integer timestep. On sigma's device."""
    ac = alphas_cumprod.to(device=sigma.device, dtype=torch.float64)
    log_table = ((1 - ac) / ac).sqrt().log()  # ascending in t
    s = sigma.double().clamp(min=log_table.exp()[0]).log().flatten()
    hi = torch.searchsorted(log_table, s).clamp(1, len(log_table) - 1)
    lo = hi - 1
    w = ((s - log_table[lo]) / (log_table[hi] - log_table[lo])).clamp(0, 1)
    return (lo + w).reshape(sigma.shape).float()


@dataclass
class HotshotCondition:
    prompt_embeds: torch.Tensor  # [B, S, D]
    pooled: torch.Tensor  # [B, P]
    time_ids: torch.Tensor  # [B, 6]
    control: torch.Tensor | None = None  # [B, F, 3, H, W] in [0, 1], one control image per frame

    def frames(self, indices: list[int]) -> HotshotCondition:
        """The condition of a window of output frames (their control images; indices clamped to the clip): FIFO's
        control frames travel through the queue with their latents."""
        if self.control is None:
            return self
        n = self.control.shape[1]
        idx = torch.tensor([min(max(i, 0), n - 1) for i in indices], device=self.control.device)
        return replace(self, control=self.control[:, idx])


class HotshotDenoiser:
    """x0 estimates of Hotshot-XL for any per-frame sigmas (see the module doc).

    With a ControlNet, each frame's residuals are scaled by `controlnet_scale` inside the guidance window
    (`control_window`, fractions of the steps, Hotshot's control_guidance_start/end) and by 0 outside it. The step a
    frame is at is its sigma's place in `control_sigmas`, the sampler's descending table of steps + 1 sigmas (the
    base sampler's steps, or FIFO's levels, where every frame of a window is at its own step)."""

    def __init__(self, model: Hotshot, guidance_scale: float = 1.0, controlnet=None,
                 controlnet_scale: float = 1.0, control_window: tuple[float, float] = (0.0, 1.0),
                 control_sigmas: torch.Tensor | None = None):
        self.model = model
        self.guidance_scale = guidance_scale
        self.controlnet = controlnet
        self.controlnet_scale = controlnet_scale
        self.control_window = control_window
        self.control_sigmas = control_sigmas
        self.alphas_cumprod = model.scheduler.alphas_cumprod.float()
        self.calls = 0
        self.control_calls = 0

    @property
    def device(self) -> torch.device:
        """Where the UNet is: samplers put their latents here, `condition` its tensors."""
        return next(self.model.unet.parameters()).device

    @torch.no_grad()
    def condition(self, prompts: list[str], height: int, width: int, original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0),
                  control_frames: np.ndarray | None = None) -> HotshotCondition:
        """Text embeddings and (h, w)-ordered micro-conditioning; control frames uint8 [B, F, H, W, 3]."""
        embeds, pooled = self.model.text.encode(prompts)
        embeds, pooled = embeds.to(self.device), pooled.to(self.device)
        ids = time_ids_for(len(prompts), (height, width), original_size, crop_top_left).to(self.device)
        control = None
        if control_frames is not None:
            if self.controlnet is None:
                raise ConfigError("control frames given but no ControlNet loaded")
            control = torch.as_tensor(np.asarray(control_frames)).to(self.device).permute(0, 1, 4, 2, 3).float() / 255.0
        return HotshotCondition(embeds, pooled, ids, control)

    @torch.no_grad()
    def __call__(self, latents_bfchw: torch.Tensor, sigma_bf: torch.Tensor, cond: HotshotCondition) -> torch.Tensor:
        unet = self.model.unet
        b, f = latents_bfchw.shape[:2]
        c_in = append_dims((sigma_bf**2 + 1).rsqrt(), latents_bfchw.ndim)
        x_vp = (c_in * latents_bfchw).to(unet.dtype)
        t = sigma_to_t(sigma_bf, self.alphas_cumprod).to(latents_bfchw.device)
        embeds, pooled, ids, control = cond.prompt_embeds, cond.pooled, cond.time_ids, cond.control
        scales = self.control_scales(sigma_bf) if control is not None else None
        guided = self.guidance_scale != 1.0
        if guided:  # unconditional half first: zero text embeddings
            x_vp, t = torch.cat([x_vp, x_vp]), torch.cat([t, t])
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
            ids = torch.cat([ids, ids])
            if control is not None:  # the same control images for both halves (Hotshot's prepare_images)
                control, scales = torch.cat([control, control]), torch.cat([scales, scales])
        added = {"text_embeds": pooled.to(unet.dtype), "time_ids": ids.to(unet.dtype)}
        extra = {}
        # No ControlNet pass where it would add nothing: scale 0, or (on the CPU, where reading the scales costs no
        # device sync) every frame outside the guidance window. On a GPU it runs with zero scales, as Hotshot does.
        idle = self.controlnet_scale == 0 or (scales is not None and scales.device.type == "cpu"
                                              and not bool((scales != 0).any()))
        if control is not None and not idle:
            extra = self._control(x_vp, t, embeds, added, control, scales)
        out = unet(x_vp.permute(0, 2, 1, 3, 4), t, embeds.to(unet.dtype), added_cond_kwargs=added,
                   return_dict=False, **extra)[0].permute(0, 2, 1, 3, 4).float()
        self.calls += 1
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        sigma = append_dims(sigma_bf, out.ndim)
        if self.model.prediction_type == "v_prediction":
            return c_in**2 * latents_bfchw - sigma * c_in * out
        return latents_bfchw - sigma * out

    def control_scales(self, sigma_bf: torch.Tensor) -> torch.Tensor:
        """[B, F] ControlNet scale of each frame at its sigma: controlnet_scale inside the guidance window, else 0."""
        start, end = self.control_window
        table = self.control_sigmas
        if (start, end) == (0.0, 1.0):
            return torch.full_like(sigma_bf, self.controlnet_scale, dtype=torch.float32)
        if table is None:
            raise ConfigError("generate.control.guidance_start/end: the denoiser was given no step table")
        steps = table[:-1].to(sigma_bf.device, torch.float32)  # the last entry is where sampling ends
        step = (sigma_bf.float()[..., None] - steps).abs().argmin(-1)
        return self.controlnet_scale * step_keep(step, len(steps), start, end)

    def _control(self, x_vp, t, embeds, added, control, scales) -> dict:
        """ControlNet residuals, frame by frame (an SDXL ControlNet is a 2-D model), each frame's scaled by its own
        factor (diffusers scales every residual by conditioning_scale alike), added to the UNet's skips."""
        n, f = x_vp.shape[:2]
        first = next(self.controlnet.parameters())
        if (first.device, first.dtype) != (x_vp.device, x_vp.dtype):  # follows the UNet to its device and dtype
            self.controlnet.to(x_vp.device, x_vp.dtype)
        per_frame = {k: v.repeat_interleave(f, 0) for k, v in added.items()}
        down, mid = self.controlnet(x_vp.flatten(0, 1), t.flatten(), embeds.repeat_interleave(f, 0),
                                    controlnet_cond=control.flatten(0, 1).to(x_vp.dtype),
                                    conditioning_scale=1.0, added_cond_kwargs=per_frame, return_dict=False)
        self.control_calls += 1
        k = scales.flatten().to(x_vp.dtype).view(-1, 1, 1, 1)
        return {"down_block_additional_residuals": tuple(r * k for r in down), "mid_block_additional_residual": mid * k}


@torch.no_grad()
def text_to_video(model: Hotshot, prompts: list[str], num_frames: int = 8, height: int = 512, width: int = 512,
                  num_steps: int = 30, guidance_scale: float = 7.5, seed: int = 0, controlnet=None,
                  control_frames: np.ndarray | None = None, controlnet_scale: float = 1.0,
                  original_size: tuple[int, int] | None = None, allow_any_size: bool = False) -> np.ndarray:
    """Frames uint8 [B, F, H, W, 3] by DDIM; num_frames=1 gives an image with the temporal layers off."""
    check_size(height, width, model, allow_any_size)
    limit = model.unet.config.motion_max_seq_length
    if num_frames > limit:
        raise ConfigError(f"num_frames={num_frames}: the temporal positional table holds {limit}; use the fifo "
                          "sampler for longer videos")
    denoiser = HotshotDenoiser(model, guidance_scale, controlnet, controlnet_scale)
    cond = denoiser.condition(prompts, height, width, original_size, control_frames=control_frames)
    f = model.vae_scale_factor
    shape = (len(prompts), num_frames, model.unet.config.in_channels, height // f, width // f)
    latents = base_sample(denoiser, cond, DDIMSigmas(model.scheduler.config), shape, num_steps,
                          generator=torch.Generator().manual_seed(seed))
    frames = model.decode_video(latents)
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# personalisation and control


def load_sdxl_lora(model: Hotshot, state: dict[str, torch.Tensor], adapter_name: str = "default",
                   scale: float = 1.0) -> None:
    """An SDXL UNet LoRA (PEFT/diffusers keys, optionally prefixed `unet.`) on the Hotshot UNet: the spatial layers
    keep the SDXL UNet's module names, so the LoRA lands where it was trained."""
    model.unet.load_lora_adapter(state, prefix="unet" if any(k.startswith("unet.") for k in state) else None,
                                 adapter_name=adapter_name)
    model.unet.set_adapters([adapter_name], weights=[scale])


def controlnet_from_spatial(model: Hotshot, conditioning_channels: int = 3):
    """A fresh SDXL ControlNet initialised from the Hotshot UNet's spatial layers (diffusers' from_unet)."""
    unet2d = UNet2DConditionModel.from_config(model.unet.config_2d)
    unet2d.load_state_dict(spatial_state_dict(model.unet))
    return ControlNetModel.from_unet(unet2d, conditioning_channels=conditioning_channels).eval()


def control_frames_from(frames_thwc: np.ndarray, num_frames: int, height: int, width: int,
                        extractor=None) -> np.ndarray:
    """Control maps [F, H, W, 3] uint8: `num_frames` equally spaced frames (Hotshot's keyframes) of a decoded
    video or frame folder, cover-resized and centre-cropped, passed through `extractor` (a frame -> map callable,
    e.g. a depth or edge model); no extractor means the frames already are control maps."""
    idx = np.linspace(0, len(frames_thwc) - 1, num_frames).round().astype(int)
    picked = resize_cover_crop(np.asarray(frames_thwc)[idx], height, width)
    return np.stack([extractor(fr) if extractor else fr for fr in picked]).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the generation job's pipeline


@dataclass
class HotshotPipeline:
    """Text-to-video (`vidgen.models.base.Pipeline`): a prompt row's `sample_prompt` (else `prompt`)."""

    model: Hotshot
    denoiser: HotshotDenoiser
    scheduler: DDIMSigmas
    depth: object | None = None  # the DepthEstimator of generate.control.type=depth

    def condition(self, row: dict, g: GenerateConfig, image_fn, generator) -> HotshotCondition:
        maps = None
        if g.controlnet:  # the row's control clip -> one control map per output frame
            c = g.control
            uri = row.get("frames") if c.source == "clip" else row.get("control")
            if not uri:
                raise ConfigError(f"prompt {row.get('id')!r}: no control clip (generate.control.source={c.source} "
                                  f"reads the row's {'clip' if c.source == 'clip' else 'control'} field)")
            depth = self.depth.to(self.denoiser.device) if self.depth else None
            maps = control_clip(uri, g.num_frames, g.height, g.width, g.fps, c.type, c.source_fps, c.canny_low,
                                c.canny_high, depth)[None]
        return self.denoiser.condition([row["sample_prompt"] or row["prompt"]], g.height, g.width,
                                       control_frames=maps)

    def frames(self, cond: HotshotCondition, indices: list[int]) -> HotshotCondition:
        return cond.frames(indices)

    def latent_shape(self, g: GenerateConfig, window: int) -> tuple[int, ...]:
        s = self.model.vae_scale_factor
        return (1, window, self.model.unet.config.out_channels, g.height // s, g.width // s)


def check_generate(m: ModelConfig, g: GenerateConfig) -> None:
    """On the driver, before any actor loads a model: a size the pretrained weights were not trained at, and a
    ControlNet that is not there or cannot run with the sampler."""
    check_trained_size(g.height, g.width, any_size=m.flavor != "pretrained")
    if g.controlnet:
        if g.sampler == "autoregressive":
            raise ConfigError("generate.controlnet: works with generate.sampler=base or fifo, not autoregressive")
        check_controlnet_dir(g.controlnet)
        if g.control.type == "depth":
            check_depth_model_dir(g.control.depth_model)


def temporal_layers(m: ModelConfig, g: GenerateConfig | None) -> tuple[str | None, str]:
    """(the temporal-layer file generation loads, the config field naming it)."""
    if g is not None and g.unet:  # a `vidgen train` export of hotshot_temporal: its temporal-layer file
        return (g.unet if g.unet.endswith(".safetensors") else storage.join(g.unet, TEMPORAL_FILE)), "generate.unet"
    return m.temporal_layers, "model.temporal_layers"


def build_pipeline(m: ModelConfig, g: GenerateConfig) -> HotshotPipeline:
    temporal = temporal_layers(m, g)[0]
    model = hotshot.build(m.flavor, path=m.path, cache_dir=m.cache_dir, temporal_layers=temporal,
                          spatial_unet_base=m.spatial_unet_base, max_frames=m.max_frames,
                          spatial_norm=m.spatial_norm, attention=m.attention)
    check_size(g.height, g.width, model, allow_any=m.flavor != "pretrained")  # random init: any size
    if g.lora:  # an SDXL LoRA: the spatial layers keep SDXL's module names
        load_sdxl_lora(model, safetensors.torch.load(storage.read_bytes(g.lora)), scale=g.lora_scale)
    schedule = DDIMSigmas(model.scheduler.config)
    controlnet = load_controlnet(g.controlnet, model, m.cache_dir) if g.controlnet else None
    c = g.control
    # the steps the sampler runs: its own for base, the nf levels of the queue (and its base video) for FIFO
    steps = g.num_inference_steps if g.sampler == "base" else m.num_frames * g.fifo.partitions
    # Text-to-video: one guidance scale for every frame (max_guidance_scale; SVD ramps min -> max).
    denoiser = HotshotDenoiser(model, g.max_guidance_scale, controlnet, c.scale, (c.guidance_start, c.guidance_end),
                               sampling_sigmas(schedule, steps))
    depth = load_depth_estimator(c.depth_model, m.cache_dir) if g.controlnet and c.type == "depth" else None
    return HotshotPipeline(model, denoiser, schedule, depth)


def validation_video(model: Hotshot, prompt: str, validation: dict, num_steps: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One base-sampler window of a validation prompt: frames in [-1, 1], [F, 3, H, W]."""
    denoiser = HotshotDenoiser(model, guidance_scale=7.5)
    h, w, s = validation["height"], validation["width"], model.vae_scale_factor
    cond = denoiser.condition([str(prompt)], h, w)
    shape = (1, validation["num_frames"], model.unet.config.out_channels, h // s, w // s)
    latents = base_sample(denoiser, cond, DDIMSigmas(model.scheduler.config), shape, num_steps, generator=generator)
    with torch.no_grad():
        return model.decode_video(latents)[0]
