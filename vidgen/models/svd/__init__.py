"""Stable Video Diffusion: image-to-video, trained with the EDM objective (recipes svd_full, svd_lora)."""

from vidgen.models.base import FamilySpec
from vidgen.models.svd.checks import check_weights
from vidgen.models.svd.model import from_config
from vidgen.models.svd.pipeline import build_pipeline, validation_video
from vidgen.models.svd.plan import SVDPlanner
from vidgen.models.svd.recipes import SVDFullRecipe, SVDLoraRecipe

FAMILY = FamilySpec(
    name="svd",
    conditioning="image",
    build=from_config,
    recipes={"svd_full": SVDFullRecipe, "svd_lora": SVDLoraRecipe},
    build_pipeline=build_pipeline,
    validation_video=validation_video,
    planner=SVDPlanner(),
    check_weights=check_weights,
)
