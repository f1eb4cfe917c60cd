"""`vidgen plan`'s hooks for Hotshot-XL: the model on the meta device, one micro-step's encoder and UNet passes.

Shapes: B batch, F frames, C latent channels, H/W pixels, h/w latents, S text tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vidgen.diffusion.samplers import sampling_sigmas
from vidgen.errors import ConfigError
from vidgen.models.base import MetaGeneration
from vidgen.models.hotshot import model as hotshot
from vidgen.models.hotshot.pipeline import DDIMSigmas, HotshotDenoiser, HotshotPipeline
from vidgen.models.hotshot.weights import WEIGHTS_FILE
from vidgen.models.loading import configs_source, read_configs

PLAN_PROMPT = "a prompt"  # any: the text encoders pad every prompt to the tokenizer length

SDXL_TOKENS, SDXL_WIDTH, SDXL_POOLED = 77, 2048, 1280  # the real SDXL text encoders' sizes
LATENT_CHANNELS = 4


class HotshotPlanner:
    def meta_builder(self, model_cfg):
        """A stand-in for `hotshot.build` on the meta device: config.json files under a local model.path (a
        Hotshot-XL or SDXL directory; model.spatial_unet_base's for the UNet), else `hotshot.full_size_configs()`;
        in the dtype the real build gives it (fp32; flavor=full builds in `dtype`)."""

        def build(flavor: str, *, path: str | None = None, seed: int = 0, max_frames: int | None = None,
                  spatial_norm: str = "clip", prediction_type: str | None = None,
                  spatial_unet_base: str | None = None, dtype: torch.dtype = torch.float32, **_):
            frames, prediction = max_frames or hotshot.HOTSHOT_MAX_FRAMES, prediction_type or "epsilon"
            if flavor == "tiny":
                model, build.source = hotshot.tiny(seed, frames, spatial_norm, prediction), "tiny flavor"
            else:
                configs = hotshot.full_size_configs()
                read, build.source = configs_source(flavor, path, ("unet", "vae", "text_encoder", "text_encoder_2"),
                                                    "built-in SDXL base 1.0 + Hotshot-XL temporal layers configs")
                base, _ = read_configs(spatial_unet_base, ("",)) if flavor == "pretrained" else (None, "")
                configs.update(read or {}, **({"unet": base[""]} if base else {}))
                with torch.device("meta"):
                    model = hotshot.from_configs(configs, frames, spatial_norm, prediction)
            for m in (model.unet, model.vae, model.text.text_encoder, model.text.text_encoder_2):
                m.to(device="meta", dtype=dtype if flavor == "full" else None)
            return model

        build.source = ""
        return build

    def parts(self, model) -> dict[str, torch.nn.Module]:
        return {"unet": model.unet, "vae": model.vae, "text_encoder": model.text.text_encoder,
                "text_encoder_2": model.text.text_encoder_2}

    def encode(self, m, b: int, f: int, h: int, w: int) -> dict[str, torch.Tensor]:
        """The VAE over every frame and the two SDXL text encoders at the tokenizer length (no_grad is the
        caller's)."""
        meta = torch.device("meta")
        frames = torch.empty(b * f, 3, h, w, device=meta, dtype=next(m.vae.parameters()).dtype)
        out = {"latents": m.vae.encode(frames).latent_dist.sample()}  # [B*F, C, h, w]
        ids = torch.zeros(b, m.text.tokenizer.model_max_length, dtype=torch.long, device=meta)  # [B, S]
        one, two = (enc(ids, output_hidden_states=True) for enc in (m.text.text_encoder, m.text.text_encoder_2))
        out["embeds"] = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], -1)  # [B, S, D1 + D2]
        out["pooled"] = two.text_embeds  # [B, P]
        return out

    def unet_loss(self, unet: torch.nn.Module, enc: dict[str, torch.Tensor], b: int, f: int) -> torch.Tensor:
        """[B, C, F, h, w] latents, integer timesteps, SDXL text and micro-conditioning; an MSE of the same shapes
        as the objective's."""
        meta, dtype = torch.device("meta"), next(unet.parameters()).dtype
        latents = enc["latents"].unflatten(0, (b, f)).float().transpose(1, 2)
        cond = {"text_embeds": enc["pooled"].to(dtype), "time_ids": torch.empty(b, 6, device=meta, dtype=dtype)}
        out = unet(latents.to(dtype), torch.zeros(b, dtype=torch.long, device=meta),
                   encoder_hidden_states=enc["embeds"].to(dtype), added_cond_kwargs=cond, return_dict=False)[0]
        return (out.float() - latents).pow(2).mean()

    def load_overhead_bytes(self, model_cfg, unet: torch.nn.Module) -> int:
        """What loading a pretrained Hotshot UNet holds besides the model: `load_hotshot_unet_dir` builds the UNet
        (random init, fp32), then copies its weight file in, whose pages are resident while safetensors maps it.
        The local file's size (a stat, nothing read), else the UNet at fp32; 0 for random init."""
        m = model_cfg
        if m.flavor != "pretrained":
            return 0
        root = m.spatial_unet_base or (m.path and f"{m.path}/unet")
        if root and ("://" not in root or root.startswith("file://")):
            f = Path(root.removeprefix("file://")).expanduser() / WEIGHTS_FILE
            if f.is_file():
                return f.stat().st_size
        return 4 * sum(p.numel() for p in unet.parameters())

    def cache_bytes_per_clip(self, f: int, h: int, w: int,
                             text: tuple[int, int, int] = (SDXL_TOKENS, SDXL_WIDTH, SDXL_POOLED), **_) -> int:
        """Posterior mean + logvar of every frame (fp32) and the two text encoders' embeddings."""
        tokens, width, pooled = text
        return f * 2 * LATENT_CHANNELS * (h // 8) * (w // 8) * 4 + (tokens * width + pooled) * 4

    def meta_generation(self, model_cfg, g) -> MetaGeneration:
        """Hotshot-XL as `pipeline.build_pipeline` makes it, on the meta device, with the SDXL ControlNet of
        generate.controlnet (its local config.json, else the shapes of one made from the UNet's spatial layers, as
        an SDXL ControlNet is), and its condition as the denoiser computes it: both text encoders, and the control
        maps of every output frame."""
        from diffusers import ControlNetModel, UNet2DConditionModel  # lazy: heavy (diffusers)

        m = model_cfg
        build = self.meta_builder(m)
        model = build(m.flavor, path=m.path, max_frames=m.max_frames, spatial_norm=m.spatial_norm,
                      spatial_unet_base=m.spatial_unet_base)
        limit = model.unet.config.motion_max_seq_length
        if m.num_frames > limit:
            raise ConfigError(f"model.num_frames={m.num_frames}: the temporal positional table holds {limit} frames; "
                              f"use at most {limit} (or model.max_frames for fresh temporal layers)")
        modules = self.parts(model)
        controlnet, source = None, build.source
        if g.controlnet:
            read, _ = read_configs(None if g.controlnet == "tiny" else g.controlnet, ("",))
            with torch.device("meta"):
                controlnet = (ControlNetModel.from_config(read[""]) if read else
                              ControlNetModel.from_unet(UNet2DConditionModel.from_config(model.unet.config_2d)))
            modules["controlnet"] = controlnet.eval()
            source += ", ControlNet " + ("from its config.json" if read else "shaped by the UNet's spatial layers")
        schedule = DDIMSigmas(model.scheduler.config)
        steps = g.num_inference_steps if g.sampler == "base" else m.num_frames * g.fifo.partitions
        c = g.control
        denoiser = HotshotDenoiser(model, g.max_guidance_scale, controlnet, c.scale, (c.guidance_start, c.guidance_end),
                                   sampling_sigmas(schedule, steps))
        maps = np.zeros((1, g.num_frames, g.height, g.width, 3), np.uint8) if controlnet is not None else None
        return MetaGeneration(HotshotPipeline(model, denoiser, schedule), modules,
                              lambda: denoiser.condition([PLAN_PROMPT], g.height, g.width, control_frames=maps), source)
