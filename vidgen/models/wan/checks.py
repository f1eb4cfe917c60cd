"""Driver-side checks of the Wan weights a job will load, before any Ray worker or actor starts."""

from __future__ import annotations

from vidgen import storage
from vidgen.errors import ModelError
from vidgen.models import loading
from vidgen.models.wan.model import SUBFOLDERS

WHAT = f"a diffusers Wan directory (with {', '.join(SUBFOLDERS)}/)"


def check_weights(m, g) -> None:
    """model.path (flavor pretrained): the parts `pretrained` loads; the transformer's and VAE's configs and weight
    headers."""
    if m.flavor != "pretrained":
        return
    if not m.path:
        raise ModelError("model.path: required for model.flavor=pretrained (a diffusers Wan directory)")
    loading.check_subfolders(m.path, SUBFOLDERS, WHAT)
    loading.check_model_dir(storage.join(m.path, "transformer"), "model.path", ("WanTransformer3DModel",),
                            "a Wan transformer/ directory")
    loading.check_model_dir(storage.join(m.path, "vae"), "model.path", ("AutoencoderKLWan",),
                            "a Wan VAE directory (vae/)")
