"""The generation job's view of a model family: its pipeline behind the per-frame denoiser interface.

A pipeline is (model, denoiser, scheduler, condition): the samplers in vidgen.diffusion.samplers take the
denoiser and scheduler and never look at the family. Image-conditioned families (SVD) read a row's `image`;
text-conditioned ones (Hotshot-XL) its prompt.
"""

from __future__ import annotations

from vidgen.config import GenerateConfig, ModelConfig
from vidgen.errors import ConfigError
from vidgen.models import registry
from vidgen.models.base import Pipeline


def image_conditioned(model: ModelConfig) -> bool:
    return registry.spec(model).conditioning == "image"


def check_family(model: ModelConfig, g: GenerateConfig) -> None:
    """What the driver can refuse before any actor loads a model: the family's own refusals (e.g. a size its
    pretrained weights were not trained at), weights that will not load, and settings that need an
    image-conditioned model."""
    family = registry.spec(model)
    if g.controlnet and not family.controlnet:
        raise ConfigError(f"generate.controlnet: model.family={model.family} takes no ControlNet (Hotshot-XL does)")
    family.check_generate(model, g)
    family.check_weights(model, g)
    if family.conditioning == "image":
        return
    asked = [name for name, on in (("generate.sampler=autoregressive", g.sampler == "autoregressive"),
                                   ("generate.consistency.seed_frame", g.consistency.seed_frame),
                                   ("generate.consistency.qcache", g.consistency.qcache)) if on]
    if asked:
        raise ConfigError(f"{asked[0]}: needs an image-conditioned model; model.family={model.family} generates "
                          "from text")


def latent_frames(model: ModelConfig, frames: int) -> int:
    """The latent frames `frames` pixel frames are to the family's samplers (the FIFO window and length)."""
    return registry.spec(model).latent_frames(frames)


def build_pipeline(m: ModelConfig, g: GenerateConfig) -> Pipeline:
    return registry.spec(m).build_pipeline(m, g)
