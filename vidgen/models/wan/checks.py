"""Driver-side checks, before any Ray worker or actor starts: the Wan weights a job will load, and the clip sizes and
frame counts a training run or latent cache asks of them."""

from __future__ import annotations

from vidgen import storage
from vidgen.errors import ConfigError, ModelError
from vidgen.models import loading
from vidgen.models.wan.model import SUBFOLDERS, full_size_configs, parse_model_index, tiny_configs, variant_of
from vidgen.sizes import parse_buckets

WHAT = f"a diffusers Wan directory (with {', '.join(SUBFOLDERS)}/)"


def check_weights(m, g) -> None:
    """model.path (flavor pretrained): the parts `pretrained` loads, its model index (one transformer); the
    transformer's and VAE's configs and weight headers."""
    if m.flavor != "pretrained":
        return
    if not m.path:
        raise ModelError("model.path: required for model.flavor=pretrained (a diffusers Wan directory)")
    loading.check_subfolders(m.path, SUBFOLDERS, WHAT)
    index = storage.join(m.path, "model_index.json")
    if storage.exists(index):  # a two-expert Wan 2.2 A14B is refused here, before the actors load 14B of it
        parse_model_index(storage.read_text(index), f"model.path: {index}")
    loading.check_model_dir(storage.join(m.path, "transformer"), "model.path", ("WanTransformer3DModel",),
                            "a Wan transformer/ directory")
    loading.check_model_dir(storage.join(m.path, "vae"), "model.path", ("AutoencoderKLWan",),
                            "a Wan VAE directory (vae/)")


def pixels_per_token(m) -> int:
    """Pixels per side of one transformer token: the VAE's spatial factor x the patch size (16 for Wan 2.1 and the
    tiny flavor, 32 for Wan 2.2 TI2V-5B), from the config.json files under a local model.path, else the published
    configs its name says."""
    configs = tiny_configs() if m.flavor == "tiny" else full_size_configs(variant_of(m.path))
    if m.flavor == "pretrained":
        read, _ = loading.read_configs(m.path, ("transformer", "vae"))
        configs.update(read or {})
    patch = configs["transformer"].get("patch_size") or (1, 2, 2)
    return int(configs["vae"].get("scale_factor_spatial", 8)) * int(patch[-1])


def check_train(cfg) -> None:
    """Clips Wan can encode and patch: model.num_frames = 4k + 1 (the causal VAE), and every clip size (data.height x
    data.width, or each of data.buckets) a multiple of `pixels_per_token` (latents that tile into whole patches)."""
    f, d = cfg.model.num_frames, cfg.data
    if f % 4 != 1:
        raise ConfigError(f"model.num_frames={f}: Wan's causal VAE takes 4k + 1 frames (e.g. 5, 17, 33, 81)")
    n = pixels_per_token(cfg.model)
    why = f"this Wan takes multiples of {n} (its VAE's downsampling x the transformer's patch size)"
    for h, w in parse_buckets(d.buckets) or []:
        if h % n or w % n:
            raise ConfigError(f"data.buckets: {w}x{h} (WxH) in {d.buckets!r}: {why}")
    if not d.buckets and (d.height % n or d.width % n):
        raise ConfigError(f"data.height/width={d.height}x{d.width}: {why}")
