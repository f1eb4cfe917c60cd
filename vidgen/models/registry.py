"""The model families by name: the only place in vidgen that knows which families exist.

A family is a module (usually a folder under `vidgen/models/`) whose `FAMILY` is a `vidgen.models.base.FamilySpec`.
`FAMILIES` names each one's module and recipes without importing it, so configs are checked, and jobs planned,
before any model library loads. A family of your own (a package outside vidgen) registers itself on import with
`register(...)`; `model.family_module` names that module, and every process that resolves the config (driver,
train workers, generation actors) imports it first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from vidgen.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    module: str  # imported on first use; its FAMILY is the spec
    recipes: tuple[str, ...]  # train.recipe values this family trains


FAMILIES: dict[str, Entry] = {
    "svd": Entry("vidgen.models.svd", ("svd_full", "svd_lora")),
    "hotshot": Entry("vidgen.models.hotshot", ("hotshot_temporal",)),
    "wan": Entry("vidgen.models.wan", ("wan_full", "wan_lora")),
}


def register(name: str, module: str, recipes: tuple[str, ...]) -> None:
    """Add a family (from outside vidgen: call it on import of `module`, and name `module` in model.family_module).
    Registering the same name again with the same module is a no-op; a recipe name may belong to one family."""
    old = FAMILIES.get(name)
    if old is not None and old.module != module:
        raise ConfigError(f"model family {name!r}: already registered by {old.module}, not {module}")
    taken = {r: f for f, e in FAMILIES.items() if f != name for r in e.recipes}
    clash = sorted(set(recipes) & set(taken))
    if clash:
        raise ConfigError(f"model family {name!r}: recipe {clash[0]!r} already belongs to {taken[clash[0]]!r}")
    FAMILIES[name] = Entry(module, tuple(recipes))


def load_module(module: str | None) -> None:
    """Import `model.family_module` (it registers its families); None: nothing to do."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"model.family_module={module}: cannot be imported ({e}); it must be on the Python path "
                          "of the driver and of every Ray worker") from None


def check(model_cfg, recipe: str | None = None) -> None:
    """The one validator of family and recipe names: model.family is a registered family and train.recipe (when
    given) one of its recipes. Imports no model library."""
    load_module(model_cfg.family_module)
    family = model_cfg.family
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family}: expected one of {', '.join(sorted(FAMILIES))}")
    recipes = FAMILIES[family].recipes
    if recipe is not None and recipe not in recipes:
        owner = next((f for f, e in FAMILIES.items() if recipe in e.recipes), None)
        hint = f" (train.recipe={recipe} trains model.family={owner})" if owner else ""
        raise ConfigError(f"train.recipe={recipe}: model.family={family} trains {', '.join(recipes)}{hint}")


def spec(model_cfg):
    """The FamilySpec of `model_cfg.family` (importing its module, and model.family_module first)."""
    check(model_cfg)
    module = importlib.import_module(FAMILIES[model_cfg.family].module)
    return module.FAMILY


def recipe_class(model_cfg, recipe: str) -> type:
    check(model_cfg, recipe)
    return spec(model_cfg).recipes[recipe]


def build_recipe(model_cfg, train_cfg, seed: int, build=None):
    """The config's recipe, its models built (by `build` instead of the family's builder when given)."""
    return recipe_class(model_cfg, train_cfg.recipe)(model_cfg, train_cfg, seed, build=build)
