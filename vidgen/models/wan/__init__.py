"""Wan 2.x: a text-to-video DiT, and image-to-video where the checkpoint has the image branch (TI2V-5B, 2.1 I2V),
trained with flow matching (recipes wan_full, wan_lora)."""

from vidgen.models.base import FamilySpec
from vidgen.models.wan.checks import check_train, check_weights
from vidgen.models.wan.model import from_config
from vidgen.models.wan.pipeline import build_pipeline, check_generate, latent_frames, validation_video
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
    check_weights=check_weights,
    check_train=check_train,
    # the causal VAE's 4k + 1 frames: a 5-frame window (2 latent frames), 17-frame FIFO videos (5 latent frames)
    demo_overrides=("train.recipe=wan_full", "model.num_frames=5", "generate.num_frames=17"),
    latent_frames=latent_frames,
)
