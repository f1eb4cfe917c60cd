"""Recipe `hotshot_temporal`: train Hotshot-XL's temporal layers on a frozen SDXL with the DDPM objective.

Shapes: B batch, F frames, C latent channels, H/W pixels, h/w latents, S text tokens.

What fine_tune.py does, minus its bugs (training.md 2.3): uniform integer timesteps, epsilon or v target from the
scheduler config (or train.ddpm.prediction_type), offset noise per video and channel, min-SNR weighting with a float
gamma, caption dropout (zero text embeddings, what the sampler's unconditional branch uses), and SDXL
micro-conditioning in (h, w) / (top, left) order, the same order the sampler uses.

A batch is {frames uint8 [B, F, H, W, 3], fps [B]} plus, when the dataset carries them, `prompt` (strings),
`orig_height`/`orig_width` (the clip's size before resize/crop) and `crop_top`/`crop_left`; missing ones default to
train.ddpm.default_prompt, the target size and (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vidgen.config import ModelConfig, TrainConfig
from vidgen.diffusion.noise import randint
from vidgen.diffusion.objectives import (
    caption_keep_mask,
    compute_snr,
    ddpm_noisy,
    ddpm_target,
    min_snr_weight,
    offset_noise,
    weighted_mse,
)
from vidgen.errors import ConfigError, ModelError
from vidgen.models.hotshot import model as hotshot
from vidgen.models.hotshot.sdxl import add_time_ids
from vidgen.models.hotshot.weights import TEMPORAL_FILE, load_temporal, save_hotshot_unet_dir, write_temporal_file


def build_model(model_cfg: ModelConfig, seed: int, prediction_type: str | None = None,
                precision: str = "fp32", build=None) -> hotshot.Hotshot:
    """flavor=full builds its random weights in the training precision (bf16: no fp32 copy first). `build`: a
    stand-in for `hotshot.build` (vidgen plan's meta-device builder)."""
    m = model_cfg
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return (build or hotshot.build)(m.flavor, path=m.path, cache_dir=m.cache_dir, seed=seed,
                                    temporal_layers=m.temporal_layers, spatial_unet_base=m.spatial_unet_base,
                                    max_frames=m.max_frames, spatial_norm=m.spatial_norm,
                                    prediction_type=prediction_type, attention=m.attention, dtype=dtype)


@dataclass
class HotshotTemporalRecipe:
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    seed: int = 0
    build: object = None  # a stand-in for hotshot.build (vidgen plan's meta-device builder)

    OPTIONAL_COLUMNS = ("prompt", "orig_height", "orig_width", "crop_top", "crop_left")
    TRAIN_SECTIONS = ("ddpm",)
    EXPORT_NAME = "unet"
    checkpoint_trainable_only = True  # checkpoints hold the temporal layers; the frozen SDXL is rebuilt on resume

    def __post_init__(self):
        d = self.train_cfg.ddpm
        self.model = build_model(self.model_cfg, self.seed,
                                 None if d.prediction_type == "scheduler" else d.prediction_type,
                                 self.train_cfg.precision, self.build)
        frames, limit = self.model_cfg.num_frames, self.model.unet.config.motion_max_seq_length
        if frames > limit:
            raise ConfigError(f"model.num_frames={frames}: the temporal positional table holds {limit} frames; "
                              f"use at most {limit} (or model.max_frames for fresh temporal layers)")
        self.model.vae.requires_grad_(False)
        self.model.text.text_encoder.requires_grad_(False)
        self.model.text.text_encoder_2.requires_grad_(False)
        unet = self.model.unet
        unet.requires_grad_(False)
        for p in unet.temporal_parameters():  # Hotshot trains the temporal layers only
            p.requires_grad_(True)
        ac = self.model.scheduler.alphas_cumprod
        self.alphas_cumprod = ac.float()
        unet.train()

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def to(self, device: torch.device) -> HotshotTemporalRecipe:
        self.model.vae.to(device)
        self.model.text.to(device)
        return self

    def deepspeed_overrides(self) -> dict:
        return {}

    def encoders(self) -> list[torch.nn.Module]:
        return [self.model.vae, self.model.text.text_encoder, self.model.text.text_encoder_2]

    # What the frozen encoders make of a clip, deterministic: `vidgen prepare latents` caches it.
    ENCODED = ("latent_params", "prompt_embeds", "pooled_embeds")

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """{latent_params fp32 [B, F, 2C, h, w] (VAE posterior), prompt_embeds [B, S, D] and pooled_embeds [B, P]
        (the two SDXL text encoders; prompts missing from the batch are train.ddpm.default_prompt)}."""
        m = self.model
        device = next(m.vae.parameters()).device
        frames = batch["frames"].to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # [B, F, 3, H, W]
        b = frames.shape[0]
        prompts = batch.get("prompt")
        prompts = [str(p) for p in prompts] if prompts is not None else [self.train_cfg.ddpm.default_prompt] * b
        embeds, pooled = m.text.encode(prompts)
        return {"latent_params": m.video_posterior(frames), "prompt_embeds": embeds.float(),
                "pooled_embeds": pooled.float()}

    def conditioning(self, batch: dict, enc: dict, hw: tuple[int, int], device, generator):
        """(prompt_embeds [B, S, D], pooled [B, P], time_ids [B, 6]) with caption dropout applied."""
        d = self.train_cfg.ddpm
        embeds, pooled = enc["prompt_embeds"].to(device), enc["pooled_embeds"].to(device)
        b = embeds.shape[0]
        keep = caption_keep_mask(b, d.caption_dropout, generator).to(device)
        embeds, pooled = embeds * keep.view(b, 1, 1), pooled * keep.view(b, 1)

        def pair(a: str, c: str, default: tuple[int, int]) -> torch.Tensor:
            if a in batch and c in batch:
                return torch.stack([torch.as_tensor(batch[a]), torch.as_tensor(batch[c])], 1).float().to(device)
            return torch.tensor([default] * b, dtype=torch.float32, device=device)

        ids = add_time_ids(pair("orig_height", "orig_width", hw), pair("crop_top", "crop_left", (0, 0)),
                           torch.tensor([hw] * b, dtype=torch.float32, device=device))
        return embeds, pooled, ids

    def loss(self, batch: dict, unet_fn, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """DDPM loss for a batch of clips (see the module docstring) or of their cached encodings (ENCODED)."""
        d, m = self.train_cfg.ddpm, self.model
        device = next(m.vae.parameters()).device
        enc = batch if "latent_params" in batch else self.encode(batch)
        latents = m.sample_latents(enc["latent_params"].to(device), generator)  # [B, F, C, h, w]
        b, _, _, h, w = latents.shape
        hw = (h * m.vae_scale_factor, w * m.vae_scale_factor)  # pixels
        embeds, pooled, ids = self.conditioning(batch, enc, hw, device, generator)
        t = randint(0, len(self.alphas_cumprod), (b,), generator, device)  # uniform
        noise = offset_noise(tuple(latents.shape), d.noise_offset, generator).to(device)
        noisy = ddpm_noisy(latents, noise, self.alphas_cumprod, t)
        target = ddpm_target(latents, noise, self.alphas_cumprod, t, m.prediction_type)
        dtype = next(self.unet.parameters()).dtype
        pred = unet_fn(noisy.permute(0, 2, 1, 3, 4).to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                       added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)})
        snr = compute_snr(self.alphas_cumprod, t)
        weight = min_snr_weight(snr, d.snr_gamma, m.prediction_type)
        loss = weighted_mse(pred.permute(0, 2, 1, 3, 4), target, weight)
        return loss, {"timestep_mean": t.float().mean().item()}

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """A full Hotshot-XL `unet/` directory (Hotshot names) plus `hsxl_temporal_layers.safetensors` beside it."""
        own = self.unet.state_dict()
        temporal = {k: v for k, v in state_dict.items() if ".motion_modules." in k}
        missing = sorted(k for k in own if ".motion_modules." in k and k not in temporal and not k.endswith(".pe"))
        unexpected = sorted(k for k in state_dict if k not in own)
        if missing or unexpected:
            raise ModelError(f"exported state dict does not fit the Hotshot UNet: missing={missing[:5]} "
                             f"unexpected={unexpected[:5]}")
        self.unet.load_state_dict(temporal, strict=False)  # the spatial layers are frozen: the base model's
        save_hotshot_unet_dir(self.unet, out_dir)
        write_temporal_file(self.unet, Path(out_dir) / TEMPORAL_FILE)

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        self.export(state_dict, out_dir)  # no adapters: the export is already the whole UNet


def load_exported_temporal(model: hotshot.Hotshot, export_dir: str | Path) -> None:
    """Load the temporal layers `export` wrote into another model (any SDXL spatial base)."""
    load_temporal(model.unet, load_file(str(Path(export_dir) / TEMPORAL_FILE)), str(export_dir))
