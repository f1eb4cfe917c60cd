"""Hotshot-XL: text-to-video from SDXL plus temporal layers, trained with the DDPM objective (hotshot_temporal)."""

from vidgen.models.base import FamilySpec
from vidgen.models.hotshot.checks import check_weights
from vidgen.models.hotshot.model import from_config
from vidgen.models.hotshot.pipeline import build_pipeline, check_generate, validation_video
from vidgen.models.hotshot.plan import HotshotPlanner
from vidgen.models.hotshot.recipe import HotshotTemporalRecipe


def cache_key(cfg) -> dict:
    """Clips without a prompt are encoded with train.ddpm.default_prompt: a latent cache depends on it."""
    return {"train.ddpm.default_prompt": cfg.train.ddpm.default_prompt}


FAMILY = FamilySpec(
    name="hotshot",
    conditioning="text",
    build=from_config,
    recipes={"hotshot_temporal": HotshotTemporalRecipe},
    build_pipeline=build_pipeline,
    validation_video=validation_video,
    planner=HotshotPlanner(),
    check_generate=check_generate,
    cache_key=cache_key,
    controlnet=True,
    check_weights=check_weights,
)
