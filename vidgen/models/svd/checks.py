"""On the driver, before any generation actor starts: every SVD weights path the job will load, opened and checked
(model.path's components, generate.unet, generate.lora), reading config files and weight headers only."""

from __future__ import annotations

import torch

from vidgen import storage
from vidgen.errors import ModelError, brief
from vidgen.models import loading
from vidgen.models.lora import read_adapter
from vidgen.models.svd.model import SUBFOLDERS

UNET_CLASSES = ("UNetSpatioTemporalConditionModel",)
WHAT = f"a diffusers-format SVD directory (with {', '.join(SUBFOLDERS)}/)"


def check_unet(path: str, field: str) -> None:
    """A UNet directory (a `vidgen train` export, or an SVD model's unet/) whose weights fit its config.json key
    for key: the UNet is built from the config on the meta device (no memory), the file's shapes come from its
    header."""
    config, shapes = loading.check_model_dir(path, field, UNET_CLASSES, "an SVD UNet directory (config.json and "
                                             "diffusion_pytorch_model.safetensors, e.g. <run>/export/unet)")
    from diffusers import UNetSpatioTemporalConditionModel  # lazy: heavy (diffusers); after the cheap checks

    try:
        with torch.device("meta"):
            unet = UNetSpatioTemporalConditionModel.from_config(config)
    except Exception as e:
        raise ModelError(f"{field}={path}: config.json does not describe an SVD UNet ({brief(e)})") from None
    problems = loading.key_report({k: tuple(v.shape) for k, v in unet.state_dict().items()}, shapes)
    if problems:
        raise ModelError(f"{field}={path}: the weights do not fit its config.json: {problems}")


def check_pretrained(path: str, own_unet: bool) -> None:
    """model.path: the components `pretrained` loads (the UNet unless generate.unet replaces it)."""
    loading.check_subfolders(path, SUBFOLDERS, WHAT)
    if own_unet:
        check_unet(storage.join(path, "unet"), "model.path")
    loading.check_model_dir(storage.join(path, "vae"), "model.path", ("AutoencoderKLTemporalDecoder",),
                            "an SVD VAE directory (vae/)")
    loading.check_model_dir(storage.join(path, "image_encoder"), "model.path", (),
                            "a CLIP vision encoder directory (image_encoder/)")
    for sub, name in (("scheduler", "scheduler_config.json"), ("feature_extractor", "preprocessor_config.json")):
        if not storage.exists(storage.join(path, sub, name)):
            raise ModelError(f"model.path={path}: no {sub}/{name}; expected {WHAT}")


def check_weights(m, g) -> None:
    """model.path (flavor pretrained), generate.unet and generate.lora, as the actors would load them."""
    if m.flavor == "pretrained":
        if not m.path:
            raise ModelError("model.path: required for model.flavor=pretrained (a diffusers SVD directory)")
        check_pretrained(m.path, own_unet=not (g is not None and g.unet))
    if g is not None and g.unet:
        check_unet(g.unet, "generate.unet")
    if g is not None and g.lora:
        with loading.naming("generate.lora"):
            read_adapter(g.lora)
