"""Wan generation: the per-frame denoiser over latent frames, the sampling schedule, the pipeline.

Shapes: B batch, L latent frames, C latent channels, h/w latents, H/W pixels, S text tokens, N transformer tokens
(L * h/2 * w/2).

    denoise(latents[B, L, C, h, w], sigma[B, L], cond) -> x0 estimate [B, L, C, h, w]

vidgen's samplers work in sigma space (x = x0 + sigma * n); a flow-matching model sees x_t = (1 - s) x0 + s n. The two
are the same point for s = sigma / (1 + sigma) and x_t = x / (1 + sigma), and the x0 estimate of a velocity v is
x_t - s * v. An Euler step in sigma space is then exactly the flow-matching Euler step x_t + (s' - s) v, which is
also UniPC of order 1 without corrector (diffusers' UniPCMultistepScheduler with flow sigmas, WanPipeline's). Each
latent frame's level goes to the transformer as the (integer, as Wan's sampler truncates it) timestep of each of its
tokens (a per-token timestep, [B, N]):
that is what lets FIFO hold every frame of a window at its own level.

The schedule is the original Wan sampler's (wan/utils/fm_solvers_unipc.py): s = linspace(0.999, 0, steps + 1)
without its last entry, shifted by the model's flow_shift, then 0. Classifier-free guidance: uncond + g * (text -
uncond), the unconditional branch being the empty negative prompt (WanPipeline's default).

Image-to-video on a TI2V checkpoint (`Wan.expand_timesteps`), as diffusers' WanImageToVideoPipeline with
expand_timesteps=True: the prompt row's `image` (resized to the output size) is encoded as a first frame, and the
window slot that becomes output frame 0 is that latent at timestep 0 in every call, whatever its level, so its x0
estimate is the image's latent exactly: the base sampler ends on it, and FIFO keeps it clean while it is in the
queue. A row without an image generates from text alone (TI2V-5B does both); a text-to-video checkpoint ignores the
image, as every text-conditioned family does.

On a Wan 2.1 I2V checkpoint (the image as input channels), as diffusers' WanImageToVideoPipeline: every call gets
CLIP's embedding of the image and, channel-concatenated to each latent frame, that frame's mask and latent of the
video [image, black frames...] encoded at the whole output length (FIFO: the output frame each slot becomes; slots
that never become output frames take frame 0's). Such a checkpoint needs the row's image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from vidgen import storage
from vidgen.config import GenerateConfig, ModelConfig
from vidgen.diffusion.objectives import append_dims
from vidgen.diffusion.samplers import base_sample
from vidgen.errors import ConfigError, DataError
from vidgen.models import lora
from vidgen.models.wan import flow
from vidgen.models.wan import model as wan

SIGMA_MAX = 0.999  # the original Wan sampler's first level before the shift (1 - 1/1000)


class FlowSigmas:
    """A scheduler stand-in for vidgen.diffusion.samplers: Wan's flow levels as descending sigmas s / (1 - s), + 0;
    sampling starts from pure noise (x_t = n, i.e. x = (1 + sigma_max) n)."""

    config = SimpleNamespace(timestep_spacing="linspace")

    def __init__(self, shift: float):
        self.shift = shift
        self.sigmas = None

    def flow_levels(self, num_steps: int) -> torch.Tensor:
        """s of each step, descending, [steps], float64."""
        s = torch.linspace(SIGMA_MAX, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return flow.shift_sigmas(s, self.shift)

    def set_timesteps(self, num_steps: int, device="cpu") -> None:
        s = self.flow_levels(num_steps)
        self.sigmas = torch.cat([s / (1 - s), torch.zeros(1, dtype=torch.float64)]).float()

    def initial_noise_scale(self, sigma_max: float) -> float:
        return 1.0 + sigma_max


@dataclass
class WanCondition:
    prompt_embeds: torch.Tensor  # [B, S, D]
    negative_embeds: torch.Tensor | None = None  # [B, S, D]: the unconditional branch, when guided
    image_latent: torch.Tensor | None = None  # [B, C, h, w]: TI2V's first frame, held clean as output frame 0
    frames: tuple[int, ...] | None = None  # output frame of each window position (FIFO); None: 0 .. L-1
    image_condition: torch.Tensor | None = None  # [B, L_out, 4 + C, h, w]: Wan 2.1 I2V's mask and image latents
    image_embeds: torch.Tensor | None = None  # [B, T, D]: its CLIP hidden states


class WanDenoiser:
    """x0 estimates of a Wan transformer for any per-frame sigmas (see the module doc)."""

    def __init__(self, model: wan.Wan, guidance_scale: float = 1.0):
        self.model = model
        self.guidance_scale = guidance_scale
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.transformer.parameters()).device

    @torch.no_grad()
    def condition(self, prompts: list[str], negative: str = "", image_bchw: torch.Tensor | None = None,
                  num_frames: int = 5) -> WanCondition:
        """`image_bchw` (in [-1, 1], the output size): the first frame, on an image-to-video checkpoint, of a video
        of `num_frames` pixel frames."""
        m, b = self.model, len(prompts)
        embeds = m.encode_text(prompts).to(self.device)
        neg = m.encode_text([negative] * b).to(self.device) if self.guidance_scale > 1 else None
        if m.image_channels:
            if image_bchw is None:
                raise DataError("prompt row: no image, and this Wan checkpoint is image-to-video only (Wan 2.1 I2V: "
                                "its transformer takes the image as input channels); give each row an `image`")
            x = image_bchw.to(self.device)
            channels = m.encode_condition(x, num_frames).expand(b, -1, -1, -1, -1)
            return WanCondition(embeds, neg, image_condition=channels,
                                image_embeds=m.encode_clip(x).to(self.device).expand(b, -1, -1))
        image = None
        if image_bchw is not None and m.expand_timesteps:
            image = m.encode_image(image_bchw.to(self.device)).expand(b, -1, -1, -1)
        return WanCondition(embeds, neg, image)

    @torch.no_grad()
    def __call__(self, latents_blchw: torch.Tensor, sigma_bl: torch.Tensor, cond: WanCondition) -> torch.Tensor:
        tr = self.model.transformer
        b, frames, _, h, w = latents_blchw.shape
        sigma = sigma_bl.to(latents_blchw.device, torch.float64)
        held = self.held(cond, frames, latents_blchw.device)
        if held is not None:  # the first frame: clean, at level 0
            sigma = sigma.masked_fill(held, 0.0)
        s = sigma / (1 + sigma)  # flow level of each frame
        x_t = latents_blchw / append_dims(1 + sigma, latents_blchw.ndim).float()
        if held is not None:
            x_t = torch.where(append_dims(held, x_t.ndim), cond.image_latent[:, None].to(x_t), x_t)
        _, ph, pw = tr.config.patch_size
        # integer timesteps, as Wan's UniPC (and diffusers') hands them to the model; the 1e-4 keeps a level that
        # float32 put a hair below an integer on it
        t = torch.floor(s * flow.TRAIN_TIMESTEPS + 1e-4)
        tokens = t.float().repeat_interleave(h // ph * (w // pw), dim=1)  # [B, N]
        x_in, embeds, image = x_t, cond.prompt_embeds.to(tr.dtype), None
        if cond.image_condition is not None:  # Wan 2.1 I2V: the image as input channels, and CLIP
            last = cond.image_condition.shape[1] - 1
            index = torch.tensor(list(cond.frames) if cond.frames is not None else range(frames)).clamp(0, last)
            x_in = torch.cat([x_t, cond.image_condition[:, index.to(x_t.device)].to(x_t)], dim=2)
            image = cond.image_embeds.to(tr.dtype)
        x_in = x_in.permute(0, 2, 1, 3, 4).to(tr.dtype)
        guided = self.guidance_scale > 1 and cond.negative_embeds is not None
        if guided:  # unconditional half first
            x_in, tokens = torch.cat([x_in, x_in]), torch.cat([tokens, tokens])
            embeds = torch.cat([cond.negative_embeds.to(tr.dtype), embeds])
            image = None if image is None else torch.cat([image, image])
        v = tr(x_in, tokens.to(tr.dtype), embeds, encoder_hidden_states_image=image,
               return_dict=False)[0].float().permute(0, 2, 1, 3, 4)
        self.calls += 1
        if guided:
            uncond, text = v.chunk(2)
            v = uncond + self.guidance_scale * (text - uncond)
        return x_t - append_dims(s.float(), v.ndim) * v

    @staticmethod
    def held(cond: WanCondition, frames: int, device) -> torch.Tensor | None:
        """[1, L] bool: the window positions that are output frame 0, when an image conditions it."""
        if cond.image_latent is None:
            return None
        index = torch.tensor(cond.frames if cond.frames is not None else range(frames), device=device)
        return (index == 0)[None] if bool((index == 0).any()) else None


@dataclass
class WanPipeline:
    """What a generation actor holds (`vidgen.models.base.Pipeline`): a prompt row's `sample_prompt` (else
    `prompt`), and its `image` on a TI2V checkpoint."""

    model: wan.Wan
    denoiser: WanDenoiser
    scheduler: FlowSigmas

    def condition(self, row: dict, g: GenerateConfig, image_fn, generator) -> WanCondition:
        image = image_fn(row["image"]) if row.get("image") and self.model.image_to_video else None
        return self.denoiser.condition([row.get("sample_prompt") or row["prompt"]], image_bchw=image,
                                       num_frames=g.num_frames)

    def frames(self, cond: WanCondition, indices: list[int]) -> WanCondition:
        """One text condition for every frame; the image's part by the output frame each window position becomes."""
        if cond.image_latent is None and cond.image_condition is None:
            return cond
        return replace(cond, frames=tuple(indices))

    def latent_shape(self, g: GenerateConfig, window: int) -> tuple[int, ...]:
        """`window` pixel frames (model.num_frames) as latent frames, at a size this checkpoint's tokens divide."""
        check_size(g.height, g.width, window, self.model.token_pixels)
        s = self.model.vae_scale_factor
        return (1, self.model.latent_frames(window), self.model.transformer.config.out_channels,
                g.height // s, g.width // s)


def check_size(height: int, width: int, frames: int, token: int = 16) -> None:
    """`token`, pixels per transformer token: 8 (VAE) x 2 (patch) = 16 for the 2.1 models (Wan 2.2 TI2V-5B: 32)."""
    if height % token or width % token:
        raise ConfigError(f"generate.height/width={height}x{width}: Wan needs multiples of {token}")
    if frames % 4 != 1:
        raise ConfigError(f"model.num_frames={frames}: Wan's causal VAE takes 4k + 1 frames (e.g. 5, 17, 33, 81)")


def check_generate(m: ModelConfig, g: GenerateConfig) -> None:
    """On the driver: sizes and frame counts Wan cannot make (TI2V-5B's 32-pixel tokens when model.path names it)."""
    check_size(g.height, g.width, m.num_frames, 32 if wan.variant_of(m.path) in wan.FIRST_FRAME_VARIANTS else 16)
    if g.num_frames % 4 != 1:
        raise ConfigError(f"generate.num_frames={g.num_frames}: Wan's causal VAE decodes 4k + 1 frames "
                          "(e.g. 5, 17, 33, 81)")


def latent_frames(frames: int) -> int:
    """Latent frames of `frames` pixel frames: the causal VAE keeps the first and compresses the rest 4x (Wan 2.1's
    VAE and Wan 2.2's alike)."""
    return (frames - 1) // 4 + 1


def build_pipeline(m: ModelConfig, g: GenerateConfig) -> WanPipeline:
    model = wan.build(m.flavor, path=m.path, cache_dir=m.cache_dir, attention=m.attention)
    if g.unet:  # a `vidgen train` export of wan_full: a diffusers transformer directory
        from diffusers import WanTransformer3DModel  # lazy: only for exported weights

        local = storage.cached_local_dir(g.unet, os.path.expanduser(m.cache_dir)) if "://" in g.unet else g.unet
        model.transformer = WanTransformer3DModel.from_pretrained(local).eval()
        wan.check_image_branch(model.transformer.config, f"generate.unet={g.unet}")
    if g.lora:  # a wan_lora export (PEFT layout)
        lora.load_lora(model.transformer, g.lora, g.lora_scale)
    return WanPipeline(model, WanDenoiser(model, g.max_guidance_scale), FlowSigmas(model.flow_shift))


@torch.no_grad()
def text_to_video(model: wan.Wan, prompts: list[str], num_frames: int = 5, height: int = 32, width: int = 32,
                  num_steps: int = 20, guidance_scale: float = 5.0, generator: torch.Generator | None = None,
                  latents: torch.Tensor | None = None, image: torch.Tensor | None = None) -> torch.Tensor:
    """Frames in [-1, 1], [B, F, 3, H, W], by the base sampler (`latents`: the starting noise [B, L, C, h, w];
    `image`: a first frame [1, 3, H, W] in [-1, 1], on a TI2V checkpoint)."""
    check_size(height, width, num_frames, model.token_pixels)
    denoiser = WanDenoiser(model, guidance_scale)
    cond = denoiser.condition(prompts, image_bchw=image, num_frames=num_frames)
    s = model.vae_scale_factor
    shape = (len(prompts), model.latent_frames(num_frames), model.transformer.config.out_channels, height // s,
             width // s)
    out = base_sample(denoiser, cond, FlowSigmas(model.flow_shift), shape, num_steps, generator=generator,
                      latents=latents)
    return model.decode_video(out)


def validation_video(model: wan.Wan, prompt: str, validation: dict, num_steps: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One base-sampler window of a validation prompt: frames in [-1, 1], [F, 3, H, W]."""
    return text_to_video(model, [str(prompt)], validation["num_frames"], validation["height"], validation["width"],
                         num_steps, guidance_scale=5.0, generator=generator)[0]
