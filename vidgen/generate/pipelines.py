"""One generation pipeline per model family, behind the project's per-frame denoiser interface.

A pipeline is (model, denoiser, scheduler, condition): the samplers in vidgen.generate.samplers take the
denoiser and scheduler and never look at the family. SVD is image-to-video (the row's `image`); Hotshot-XL
is text-to-video (the row's `sample_prompt`) with DDIM, whose timesteps the denoiser maps from sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vidgen import storage
from vidgen.config import GenerateConfig, ModelConfig
from vidgen.errors import ConfigError

IMAGE_CONDITIONED = {"svd"}


def check_family(model: ModelConfig, g: GenerateConfig) -> None:
    """What the driver can refuse before any actor loads a model: settings that need an image-conditioned model
    for text-to-video families, and a Hotshot-XL size its pretrained weights were not trained at."""
    if model.family == "hotshot":
        from vidgen.generate.hotshot import check_trained_size

        check_trained_size(g.height, g.width, any_size=random_init(model))
    if model.family in IMAGE_CONDITIONED:
        return
    asked = [name for name, on in (("generate.sampler=autoregressive", g.sampler == "autoregressive"),
                                   ("generate.consistency.seed_frame", g.consistency.seed_frame),
                                   ("generate.consistency.qcache", g.consistency.qcache)) if on]
    if asked:
        raise ConfigError(f"{asked[0]}: needs an image-conditioned model (svd); model.family={model.family} "
                          "generates from text")


def random_init(model: ModelConfig) -> bool:
    """Random-init flavors (tiny, full) have no training sizes: any multiple of the VAE's factor generates."""
    return model.flavor != "pretrained"


@dataclass
class Pipeline:
    model: Any
    denoiser: Any
    scheduler: Any
    family: str

    def condition(self, row: dict, g: GenerateConfig, image_fn, generator):
        if self.family == "hotshot":
            return self.denoiser.condition([row["sample_prompt"] or row["prompt"]], g.height, g.width)
        return self.denoiser.condition(image_fn(row["image"]), g.fps, g.motion_bucket_id, g.noise_aug_strength,
                                       generator)

    def latent_shape(self, g: GenerateConfig, window: int) -> tuple[int, ...]:
        s = self.model.vae_scale_factor
        channels = self.model.unet.config.out_channels
        return (1, window, channels, g.height // s, g.width // s)


def build_pipeline(m: ModelConfig, g: GenerateConfig) -> Pipeline:
    if m.family == "hotshot":
        return _hotshot(m, g)
    from vidgen.generate.denoisers import SVDDenoiser
    from vidgen.models import svd

    model = svd.build(m.flavor, path=m.path, cache_dir=m.cache_dir, num_frames=m.num_frames, unet_path=g.unet,
                      attention=m.attention)
    if g.lora:
        from vidgen.models.lora import load_lora  # only when asked: another module, optional

        load_lora(model.unet, g.lora, g.lora_scale)
    if g.consistency.qcache:
        from vidgen.generate.qcache import install_qcache

        install_qcache(model.unet, g.consistency.qcache_weight)
    return Pipeline(model, SVDDenoiser(model, g.min_guidance_scale, g.max_guidance_scale), model.scheduler, "svd")


def _hotshot(m: ModelConfig, g: GenerateConfig) -> Pipeline:
    from vidgen.generate.hotshot import DDIMSigmas, HotshotDenoiser, check_size, load_sdxl_lora
    from vidgen.models import hotshot

    temporal = m.temporal_layers
    if g.unet:  # a `vidgen train` export of hotshot_temporal: its temporal-layer file
        temporal = g.unet if g.unet.endswith(".safetensors") else storage.join(g.unet,
                                                                                "hsxl_temporal_layers.safetensors")
    model = hotshot.build(m.flavor, path=m.path, cache_dir=m.cache_dir, temporal_layers=temporal,
                          spatial_unet_base=m.spatial_unet_base, max_frames=m.max_frames,
                          spatial_norm=m.spatial_norm, attention=m.attention)
    check_size(g.height, g.width, model, allow_any=random_init(m))
    if g.lora:  # an SDXL LoRA: the spatial layers keep SDXL's module names
        import safetensors.torch

        load_sdxl_lora(model, safetensors.torch.load(storage.read_bytes(g.lora)), scale=g.lora_scale)
    # Text-to-video: one guidance scale for every frame (max_guidance_scale; SVD ramps min -> max).
    return Pipeline(model, HotshotDenoiser(model, g.max_guidance_scale), DDIMSigmas(model.scheduler.config),
                    "hotshot")
