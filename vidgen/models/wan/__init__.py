"""Wan 2.x: text-to-video DiT, trained with flow matching (recipes wan_full, wan_lora)."""

from vidgen.models.base import FamilySpec
from vidgen.models.wan.model import from_config
from vidgen.models.wan.pipeline import build_pipeline, check_generate, validation_video
from vidgen.models.wan.plan import WanPlanner
from vidgen.models.wan.recipes import WanFullRecipe, WanLoraRecipe

FAMILY = FamilySpec(
    name="wan",
    conditioning="text",
    build=from_config,
    recipes={"wan_full": WanFullRecipe, "wan_lora": WanLoraRecipe},
    build_pipeline=build_pipeline,
    validation_video=validation_video,
    planner=WanPlanner(),
    check_generate=check_generate,
)
