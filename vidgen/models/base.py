"""What a model family provides, as Protocols: the jobs call these methods and nothing else of a family.

Shapes: B batch, F frames, C latent channels, h/w latents, H/W pixels.

A family is a folder under `vidgen/models/` whose `__init__.py` defines `FAMILY`, a `FamilySpec`; the registry
(`vidgen.models.registry`) maps its name to that module. The training loop, the generation actors, the latent
cache and `vidgen plan` reach the family only through the spec: its recipes (training), its pipeline
(generation), its validation videos, its checks and its planner hooks.

The families are independent of each other; what several share (LoRA, attention backends, the video VAE's
decoding, weight-directory loading) lives beside them in `vidgen/models/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch


@runtime_checkable
class Model(Protocol):
    """A family's model as the jobs use it: moved to a device, switched to an attention backend, decoding latents.
    Flavors (model.flavor): tiny (random init from a small config: tests, the demo), full (the published
    architecture, random init), pretrained (weights from model.path)."""

    vae_scale_factor: int  # pixels per latent

    def to(self, device, dtype: torch.dtype | None = None) -> Model: ...

    def set_attention(self, backend: str) -> Model: ...  # model.attention: sdpa, xformers, eager

    def decode_video(self, latents_bfchw: torch.Tensor, chunk: int | None = None) -> torch.Tensor: ...  # [B,F,3,H,W]


@runtime_checkable
class Recipe(Protocol):
    """What trains and how a batch becomes a loss. Built as `cls(model_cfg, train_cfg, seed, build=None)`:
    `build`, when given, replaces the family's model builder (`vidgen plan` passes one that builds on the meta
    device)."""

    ENCODED: ClassVar[tuple[str, ...]]  # what `encode` returns: the latent cache's tensor columns, the video latents
    # (h, w last: a cached clip's bucket) first
    OPTIONAL_COLUMNS: ClassVar[tuple[str, ...]]  # row columns `loss` reads when the dataset has them
    TRAIN_SECTIONS: ClassVar[tuple[str, ...]]  # train.* sub-sections the recipe reads (checkpoint compatibility)
    EXPORT_NAME: ClassVar[str]  # <storage_path>/<run.name>/export/<EXPORT_NAME>: what `export` writes
    checkpoint_trainable_only: ClassVar[bool]  # True: checkpoints hold the trainable tensors, the rest is rebuilt
    model: Any

    @property
    def unet(self) -> torch.nn.Module: ...  # what DeepSpeed wraps and the optimizer steps

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def to(self, device: torch.device) -> Recipe: ...  # frozen parts; DeepSpeed moves the UNet

    def deepspeed_overrides(self) -> dict: ...  # merged under the user's, over the generated DeepSpeed config

    def encoders(self) -> list[torch.nn.Module]: ...  # frozen encoders `encode` runs (cache key: their hash)

    def encode(self, batch: dict) -> dict[str, torch.Tensor]: ...  # deterministic: what the latent cache holds

    # `unet_fn(*args, **kwargs)` is the DeepSpeed engine's `unet(*args, return_dict=False, **kwargs)[0]` (diffusers'
    # calling convention): (loss, extra metrics)
    def loss(self, batch: dict, unet_fn: Callable, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None: ...

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None: ...


def zero3_units(unet: torch.nn.Module, classes: tuple[str, ...]) -> dict:
    """The `zero_optimization.leaf_module` a recipe gives DeepSpeed when every parameter of the UNet trains: its
    blocks (the outermost modules of `classes`), by name, which ZeRO-3 then gathers and releases as one unit each.
    DeepSpeed hooks such a block once instead of every submodule in it, and those per-submodule hooks are most of
    ZeRO-3's fixed cost per step. Stages 0-2 ignore it.

    Only when the whole UNet trains: DeepSpeed reduces a leaf's gradients in the leaf's full backward hook, and
    PyTorch runs that hook as soon as the block's output gradient exists when none of the block's positional
    inputs requires grad (a block fed by frozen layers only, as in LoRA or temporal-layer training): before the
    block's parameter gradients are computed, which would lose them. When every parameter trains, each block's
    input comes from trained layers. Frozen blocks could be leaves safely, but are not: see docs/scale.md."""
    if not all(p.requires_grad for p in unet.parameters()):
        return {}
    names: list[str] = []
    for name, m in unet.named_modules():  # parents before children
        if type(m).__name__ in classes and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return {"zero_optimization": {"leaf_module": {"names": names}}}


@runtime_checkable
class Pipeline(Protocol):
    """One model ready to generate: `denoiser(latents[B, F, C, h, w], sigma[B, F], cond) -> x0 estimate` over the
    `scheduler`'s sigma table, whichever sampler runs it."""

    model: Any  # has decode_video(latents, chunk=...) and vae_scale_factor
    denoiser: Callable
    scheduler: Any

    def condition(self, row: dict, g: Any, image_fn: Callable, generator: torch.Generator) -> Any: ...

    def latent_shape(self, g: Any, window: int) -> tuple[int, ...]: ...

    def frames(self, cond: Any, indices: list[int]) -> Any: ...  # the condition of a window of output frames


@dataclass
class MetaGeneration:
    """A family's generation pipeline with every module on the meta device (`Planner.meta_generation`), for
    `vidgen plan --job generate`: no weight read, no memory."""

    pipeline: Pipeline  # as the actors build it: its denoiser is what the samplers call
    modules: dict[str, torch.nn.Module]  # everything an actor holds on its device, by name
    condition: Callable[[], Any]  # one video's condition from meta inputs (the encoders' pass a video starts with)
    source: str  # where the shapes came from


class Planner(Protocol):
    """`vidgen plan`'s view of a family: the model on the meta device and one micro-step's encoder and UNet
    passes at full size (training), or its generation pipeline (`meta_generation`)."""

    def meta_builder(self, model_cfg: Any) -> Callable: ...  # a `build` whose `.source` says where shapes came from

    def parts(self, model: Any) -> dict[str, torch.nn.Module]: ...  # {"unet": ..., encoders by name}

    def encode(self, model: Any, b: int, f: int, h: int, w: int) -> dict[str, torch.Tensor]: ...

    def unet_loss(self, unet: torch.nn.Module, enc: dict[str, torch.Tensor], b: int, f: int) -> torch.Tensor: ...

    def cache_bytes_per_clip(self, f: int, h: int, w: int) -> int: ...  # a latent-cache row's tensor bytes

    def meta_generation(self, model_cfg: Any, g: Any) -> MetaGeneration: ...  # (model config, generate config)


@dataclass(frozen=True)
class FamilySpec:
    """Everything vidgen knows of a family. `conditioning`: what a prompt row must carry (image: the row's
    `image`; text: its prompt)."""

    name: str
    conditioning: Literal["image", "text"]
    build: Callable[..., Model]  # (model config, seed=0, dtype=torch.float32): the flavor model.flavor names
    recipes: Mapping[str, type]
    build_pipeline: Callable[[Any, Any], Pipeline]  # (model config, generate config)
    # (model, held-out input: a first frame uint8 [H, W, 3] or a prompt, validation settings, sampler steps,
    # generator) -> frames in [-1, 1], [F, 3, H, W]: one base-sampler window during training
    validation_video: Callable[[Any, Any, dict, int, torch.Generator], torch.Tensor]
    planner: Planner | None = None
    check_generate: Callable[[Any, Any], None] = field(default=lambda model_cfg, g: None)  # driver-side refusals
    # (model config, generate config): every weights path a generation job will load, opened and checked on the
    # driver before any actor starts (configs and weight headers; vidgen.models.loading)
    check_weights: Callable[[Any, Any], None] = field(default=lambda model_cfg, g: None)
    # (the whole config): driver-side refusals of a training run or latent cache (clip sizes, frame counts) before
    # any worker, actor or encoder starts
    check_train: Callable[[Any], None] = field(default=lambda cfg: None)
    cache_key: Callable[[Any], dict] = field(default=lambda cfg: {})  # extra config fields a latent cache depends on
    controlnet: bool = False  # its pipeline takes generate.controlnet / generate.control
    demo_overrides: tuple[str, ...] = ()  # what `vidgen demo model.family=<name>` changes in the demo's settings
    # pixel frames -> the latent frames the samplers work on (a VAE that compresses time, as Wan's, makes fewer)
    latent_frames: Callable[[int], int] = field(default=lambda frames: frames)
