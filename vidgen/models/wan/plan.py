"""`vidgen plan`'s hooks for Wan: the model on the meta device, one micro-step's encoder and transformer passes.

Shapes: B batch, F pixel frames, L latent frames, C latent channels, H/W pixels, h/w latents, S text tokens.
"""

from __future__ import annotations

import torch

from vidgen.models.base import MetaGeneration
from vidgen.models.loading import configs_source
from vidgen.models.wan import model as wan
from vidgen.models.wan.pipeline import FlowSigmas, WanCondition, WanDenoiser, WanPipeline

TEXT_WIDTH = 4096  # UMT5-XXL's


class WanPlanner:
    def meta_builder(self, model_cfg):
        """A stand-in for `wan.build` on the meta device: config.json files under a local model.path, else the
        built-in configs of the published model model.path's name says (`wan.variant_of`); in the dtypes the real
        build gives them."""

        def build(flavor: str, *, path: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, **_):
            if flavor == "tiny":
                model, build.source = wan.tiny(seed, variant=wan.variant_of(path)), "tiny flavor"
            else:
                variant = wan.variant_of(path)
                configs = wan.full_size_configs(variant)
                read, build.source = configs_source(flavor, path, ("transformer", "vae", "text_encoder"),
                                                    f"built-in {variant} configs")
                configs.update(read or {})
                with torch.device("meta"):
                    model = wan.from_configs(configs, wan.ByteTokenizer(wan.TEXT_LENGTH), wan.TEXT_LENGTH)
            for m in (model.transformer, *model.frozen()):  # as from_pretrained(torch_dtype=dtype) casts them
                torch.nn.Module.to(m, device="meta", dtype=dtype if flavor != "tiny" else None)
                # diffusers' and transformers' modules that from_pretrained keeps in fp32 (UMT5's `wo`)
                keep = set(getattr(m, "_keep_in_fp32_modules", None) or ()) if flavor != "tiny" else set()
                for name, p in m.named_parameters():
                    if keep & set(name.split(".")):
                        p.data = p.data.float()
            if flavor == "pretrained":
                # `wan.pretrained` loads the VAE in fp32 whatever the training dtype
                torch.nn.Module.to(model.vae, torch.float32)
            return model

        build.source = ""
        return build

    def parts(self, model) -> dict[str, torch.nn.Module]:
        parts = {"unet": model.transformer, "vae": model.vae, "text_encoder": model.text_encoder}
        return parts | ({"image_encoder": model.image_encoder} if model.image_encoder is not None else {})

    def encode(self, m, b: int, f: int, h: int, w: int) -> dict[str, torch.Tensor]:
        """The causal VAE over the clip and UMT5 at the padded prompt length (no_grad is the caller's)."""
        meta = torch.device("meta")
        frames = torch.empty(b, 3, f, h, w,
                             device=meta, dtype=next(m.vae.parameters()).dtype)
        latents = m.vae.encode(frames).latent_dist.mode()  # [B, C, L, h, w]
        ids = torch.zeros(b, m.text_length, dtype=torch.long, device=meta)
        out = {"latents": latents, "embeds": m.text_encoder(ids).last_hidden_state}
        if m.image_channels:  # Wan 2.1 I2V: [image, black frames...] through the VAE again, and CLIP
            out["image_condition"] = torch.cat([latents[:, :4], m.vae.encode(frames).latent_dist.mode()], dim=1)
            size = m.image_encoder.config.image_size
            pixels = torch.empty(b, 3, size, size, device=meta, dtype=m.image_encoder.dtype)
            out["image_embeds"] = m.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return out

    def unet_loss(self, unet: torch.nn.Module, enc: dict[str, torch.Tensor], b: int, f: int) -> torch.Tensor:
        """Noisy latents at one timestep per clip and the text embeddings; an MSE of the objective's shapes."""
        dtype = next(unet.parameters()).dtype
        latents = enc["latents"].float()
        t = torch.empty(b, device=latents.device, dtype=dtype)
        x, image = latents, enc.get("image_embeds")
        if "image_condition" in enc:
            x = torch.cat([latents, enc["image_condition"].float()], dim=1)
        out = unet(x.to(dtype), t, enc["embeds"].to(dtype), encoder_hidden_states_image=None if image is None else
                   image.to(dtype), return_dict=False)[0]
        return (out.float() - latents).pow(2).mean()

    def meta_generation(self, model_cfg, g) -> MetaGeneration:
        """Wan as `pipeline.build_pipeline` makes it, on the meta device, and its condition as the denoiser
        computes it (UMT5 over the prompt, and the empty negative prompt when guided)."""
        build = self.meta_builder(model_cfg)
        model = build(model_cfg.flavor, path=model_cfg.path)
        denoiser = WanDenoiser(model, g.max_guidance_scale)

        def condition() -> WanCondition:  # UMT5 at the padded length (no mask: reading one needs its values)
            ids = torch.zeros(1, model.text_length, dtype=torch.long, device=torch.device("meta"))
            embeds = [model.text_encoder(ids).last_hidden_state.float() for _ in range(1 + (g.max_guidance_scale > 1))]
            return WanCondition(embeds[0], embeds[1] if len(embeds) > 1 else None)

        return MetaGeneration(WanPipeline(model, denoiser, FlowSigmas(model.flow_shift)), self.parts(model),
                              condition, build.source)

    def load_overhead_bytes(self, model_cfg, unet: torch.nn.Module) -> int:
        return 0  # diffusers' and transformers' from_pretrained use the mapped tensors as the parameters

    def cache_bytes_per_clip(self, f: int, h: int, w: int, channels: int = 16, scale: int = 8,
                             text: tuple[int, int] = (wan.TEXT_LENGTH, TEXT_WIDTH), **_) -> int:
        """Normalised latents of the clip's (f - 1) / 4 + 1 latent frames and the prompt's UMT5 embeddings, fp32
        (Wan 2.1's VAE by default: 16 channels, 8x; Wan 2.2's: channels=48, scale=16)."""
        return ((f - 1) // 4 + 1) * channels * (h // scale) * (w // scale) * 4 + text[0] * text[1] * 4
