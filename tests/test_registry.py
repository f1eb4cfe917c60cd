"""Every family the registry names provides what the jobs call: a conformance check of each spec against
vidgen.models.base's Protocols, on the tiny flavor (the toy family of tests/toy_family.py included)."""

from __future__ import annotations

import pytest

from vidgen.config import GenerateConfig, ModelConfig, TrainConfig
from vidgen.errors import ConfigError
from vidgen.models import registry
from vidgen.models.base import Model, Pipeline, Recipe

FAMILIES = [("svd", None), ("hotshot", None), ("toy", "tests.toy_family")]


def model_config(family: str, module: str | None) -> ModelConfig:
    return ModelConfig(family=family, family_module=module, flavor="tiny", num_frames=2)


@pytest.mark.parametrize("family, module", FAMILIES)
def test_a_family_provides_what_the_jobs_call(family, module):
    m = model_config(family, module)
    spec = registry.spec(m)
    assert spec.name == family and spec.conditioning in ("image", "text")
    assert set(spec.recipes) == set(registry.FAMILIES[family].recipes)  # the registry line says what the spec has
    assert isinstance(spec.build(m, seed=0), Model)
    for name in spec.recipes:
        recipe = registry.build_recipe(m, TrainConfig(recipe=name), seed=0)
        assert isinstance(recipe, Recipe), f"recipe {name} lacks a member of vidgen.models.base.Recipe"
        assert recipe.trainable_parameters() and set(recipe.OPTIONAL_COLUMNS).isdisjoint(recipe.ENCODED)
    pipe = spec.build_pipeline(m, GenerateConfig(height=32, width=32))
    assert isinstance(pipe, Pipeline) and pipe.latent_shape(GenerateConfig(height=32, width=32), 2)[1] == 2


def test_a_recipe_of_another_family_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"train.recipe=svd_lora: model.family=hotshot trains hotshot_temporal "
                                          r"\(train.recipe=svd_lora trains model.family=svd\)"):
        registry.check(model_config("hotshot", None), "svd_lora")
