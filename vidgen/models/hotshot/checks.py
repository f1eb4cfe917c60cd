"""On the driver, before any generation actor starts: every Hotshot-XL weights path the job will load, opened and
checked (model.path's components, model.spatial_unet_base, the temporal layers of model.temporal_layers or
generate.unet, generate.lora), reading config files and weight headers only."""

from __future__ import annotations

from vidgen import storage
from vidgen.errors import ModelError
from vidgen.models import loading
from vidgen.models.hotshot.pipeline import temporal_layers
from vidgen.models.hotshot.weights import is_temporal

PARTS = ("unet", "vae", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
WHAT = f"a Hotshot-XL (or SDXL) diffusers-format directory (with {', '.join(PARTS)}/)"
UNETS = ("UNet3DConditionModel", "UNet2DConditionModel")


def check_pretrained(path: str, temporal: str | None) -> None:
    loading.check_subfolders(path, PARTS, WHAT)
    config, _ = loading.check_model_dir(storage.join(path, "unet"), "model.path", UNETS, "a Hotshot-XL or SDXL unet/")
    if config["_class_name"] == "UNet2DConditionModel" and temporal is None:
        raise ModelError(f"model.path={path}: unet/ is an SDXL (2-D) UNet; set model.temporal_layers to a Hotshot-XL "
                         "temporal-layer file (hsxl_temporal_layers.safetensors)")
    loading.check_model_dir(storage.join(path, "vae"), "model.path", ("AutoencoderKL",), "an SDXL VAE (vae/)")
    if not storage.exists(storage.join(path, "scheduler", "scheduler_config.json")):
        raise ModelError(f"model.path={path}: no scheduler/scheduler_config.json; expected {WHAT}")


def check_temporal(path: str, field: str) -> None:
    """A temporal-layer file: readable (a safetensors header, or tensors only), holding temporal layers only."""
    shapes = loading.weights_shapes(path, field)
    other = sorted(k for k in shapes if not is_temporal(k))
    if other:
        raise ModelError(f"{field}={path}: {len(other)} of {len(shapes)} tensors are not temporal layers (e.g. "
                         f"{', '.join(other[:3])}); expected Hotshot-XL's temporal layers "
                         "(hsxl_temporal_layers.safetensors, or a `vidgen train` hotshot_temporal export)")


def check_weights(m, g) -> None:
    temporal, field = temporal_layers(m, g)
    if m.flavor == "pretrained":
        if not m.path:
            raise ModelError("model.path: required for model.flavor=pretrained (a Hotshot-XL or SDXL directory)")
        check_pretrained(m.path, temporal)
    if m.spatial_unet_base:
        loading.check_model_dir(m.spatial_unet_base, "model.spatial_unet_base", ("UNet2DConditionModel",),
                                "an SDXL UNet directory")
    if temporal:
        check_temporal(temporal, field)
    if g is not None and g.lora:
        loading.weights_header(g.lora, "generate.lora")
