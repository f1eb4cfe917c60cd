"""`vidgen plan`'s hooks for SVD: the model on the meta device, one micro-step's encoder and UNet passes.

Shapes: B batch, F frames, C latent channels, H/W pixels, h/w latents.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vidgen.models.base import MetaGeneration
from vidgen.models.loading import configs_source
from vidgen.models.svd import model as svd
from vidgen.models.svd.pipeline import SVDDenoiser, SVDPipeline
from vidgen.models.svd.qcache import install_qcache

CLIP_EMBED = 1024  # the real CLIP image encoder's embedding width
LATENT_CHANNELS = 4
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIPImageProcessor


class SVDPlanner:
    def meta_builder(self, model_cfg):
        """A stand-in for `svd.build` that returns the model on the meta device, weights never read, in the dtype
        the real build gives it (fp32; flavor=full builds in `dtype`, the frozen base's training dtype)."""
        default_frames = model_cfg.num_frames

        def build(flavor: str, *, path: str | None = None, seed: int = 0, num_frames: int = default_frames,
                  dtype: torch.dtype = torch.float32, **_):
            if flavor == "tiny":  # tiny is small: build it for real (its scheduler needs real tensors), drop data
                model = svd.tiny(seed=seed, num_frames=num_frames)
                for m in (model.unet, model.vae, model.image_encoder):
                    m.to("meta")
                build.source = "tiny flavor"
                return model
            configs = svd.full_size_configs(num_frames)
            xt = "-XT" if num_frames == 25 else ""
            read, build.source = configs_source(flavor, path, ("unet", "vae", "image_encoder"),
                                                f"built-in SVD{xt} full-size configs")
            for part, cfg in (read or {}).items():
                configs[part] = {k: v for k, v in cfg.items() if not k.startswith("_")}
            with torch.device("meta"):
                model = svd.from_configs(configs)
            for m in (model.unet, model.vae, model.image_encoder):
                # a few parameters (AlphaBlender.mix_factor) use torch.Tensor(), which ignores the device
                m.to(device="meta", dtype=dtype if flavor == "full" else None)
            return model

        build.source = ""
        return build

    def parts(self, model) -> dict[str, torch.nn.Module]:
        return {"unet": model.unet, "vae": model.vae, "image_encoder": model.image_encoder}

    def encode(self, m, b: int, f: int, h: int, w: int) -> dict[str, torch.Tensor]:
        """The VAE over every frame, the conditioning frame's VAE mode and its CLIP image embedding (no_grad is
        the caller's)."""
        meta = torch.device("meta")
        frames = torch.empty(b * f, 3, h, w, device=meta, dtype=next(m.vae.parameters()).dtype)
        out = {"latents": m.vae.encode(frames).latent_dist.sample()}  # [B*F, C, h, w]
        out["cond"] = m.vae.encode(frames[::f]).latent_dist.mode()  # [B, C, h, w], first frames
        size = m.image_encoder.config.image_size
        pixels = torch.empty(b, 3, size, size, device=meta, dtype=next(m.image_encoder.parameters()).dtype)
        out["emb"] = m.image_encoder(pixels).image_embeds  # [B, D]
        return out

    def unet_loss(self, unet: torch.nn.Module, enc: dict[str, torch.Tensor], b: int, f: int) -> torch.Tensor:
        """Noisy latents + the conditioning latent on channels, one CLIP token, 3 time ids; an MSE of the same
        shapes as the objective's."""
        meta, dtype = torch.device("meta"), next(unet.parameters()).dtype
        latents = enc["latents"].unflatten(0, (b, f)).float()  # [B, F, C, h, w]
        sample = torch.cat([latents, enc["cond"].unsqueeze(1).expand(-1, f, -1, -1, -1)], 2).to(dtype)
        t, ids = torch.empty(b, device=meta, dtype=dtype), torch.empty(b, 3, device=meta, dtype=dtype)
        out = unet(sample, t, enc["emb"].unsqueeze(1).to(dtype), ids, return_dict=False)[0]
        return (out.float() - latents).pow(2).mean()

    def load_overhead_bytes(self, model_cfg, unet: torch.nn.Module) -> int:
        return 0  # diffusers' and transformers' from_pretrained use the mapped tensors as the parameters

    def cache_bytes_per_clip(self, f: int, h: int, w: int, clip_embed: int = CLIP_EMBED, **_) -> int:
        """Posterior mean + logvar of every frame (fp32), the CLIP embedding, the first frame (uint8), the clean
        conditioning latent."""
        lat = LATENT_CHANNELS * (h // 8) * (w // 8)
        return f * 2 * lat * 4 + clip_embed * 4 + h * w * 3 + lat * 4

    def meta_generation(self, model_cfg, g) -> MetaGeneration:
        """SVD as `pipeline.build_pipeline` makes it, on the meta device (generate.unet has the model's shapes; the
        query cache installed when generate.consistency.qcache), and its condition as the denoiser computes it:
        CLIP of the image at the encoder's size, the VAE mode of the noise-augmented first frame at the output
        size."""
        m = model_cfg
        build = self.meta_builder(m)
        model = build(m.flavor, path=m.path, num_frames=m.num_frames)
        if model.feature_extractor is None:  # a CLIPImageProcessor's mean and std are all encode_image reads
            model.feature_extractor = SimpleNamespace(image_mean=CLIP_MEAN, image_std=CLIP_STD)
        if g.consistency.qcache:
            install_qcache(model.unet, g.consistency.qcache_weight)
        denoiser = SVDDenoiser(model, g.min_guidance_scale, g.max_guidance_scale)
        image = torch.empty(1, 3, g.height, g.width, device="meta")
        return MetaGeneration(
            SVDPipeline(model, denoiser, model.scheduler),
            {"unet": model.unet, "vae": model.vae, "image_encoder": model.image_encoder},
            lambda: denoiser.condition(image, g.fps, g.motion_bucket_id, g.noise_aug_strength), build.source)
