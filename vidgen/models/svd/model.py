"""Stable Video Diffusion: the components, a `tiny` flavor and a `pretrained` flavor.

Shapes: B batch, F frames, C channels, H/W pixels or latents.

`tiny` builds every component from an explicit small config with random weights (seeded, ~1 s on CPU):
diffusers' own SVD test UNet, a 4-block temporal-decoder VAE (8x downsampling, like the real one, which
keeps latents small and steps fast) and a CLIP vision tower whose projection width equals the UNet's
cross-attention width. `pretrained` loads a diffusers-format SVD directory (e.g. a local copy of
stable-video-diffusion-img2vid-xt) from a path or fsspec URI. Weights are never downloaded from a hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vidgen.errors import ModelError, brief
from vidgen.models import attention, loading
from vidgen.models.attention import check_backend
from vidgen.models.loading import missing_weights
from vidgen.models.vae import LatentVideoModel

log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")


@dataclass
class SVD(LatentVideoModel):
    """The five parts of an SVD pipeline, plus the helpers that training and sampling share."""

    unet: torch.nn.Module  # UNetSpatioTemporalConditionModel
    vae: torch.nn.Module  # AutoencoderKLTemporalDecoder
    image_encoder: torch.nn.Module  # CLIPVisionModelWithProjection
    feature_extractor: object  # CLIPImageProcessor (mean/std only)
    scheduler: object  # EulerDiscreteScheduler (sigma schedule only)

    def set_attention(self, backend: str) -> SVD:
        attention.apply(backend, [self.unet, self.vae], [self.image_encoder])
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SVD:
        for m in (self.unet, self.vae, self.image_encoder):
            m.to(device=device, dtype=dtype)
        return self

    # -- conditioning -------------------------------------------------------------------------

    def encode_image(self, image_bchw: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding [B, 1, D] of images in [-1, 1], at the encoder's own input size.

        The pipeline resizes PIL input to 224 with antialiasing, then normalises; the size must be the
        encoder's `image_size` (224 for the real model), never a hard-coded 224 (training.md 4.5).
        """
        size = self.image_encoder.config.image_size
        x = _resize_antialiased(image_bchw.float(), size)
        x = (x + 1.0) / 2.0
        mean = torch.tensor(self.feature_extractor.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.feature_extractor.image_std, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(next(self.image_encoder.parameters()).dtype)
        return self.image_encoder(x).image_embeds.unsqueeze(1)

    def encode_condition_frame(self, image_bchw: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latent (the distribution's mode) of the conditioning frame, as the pipeline does."""
        return self.vae.encode(image_bchw.to(self.vae.dtype)).latent_dist.mode()

    def decode_video(self, latents_bfchw: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Frames in [-1, 1], [B, F, 3, H, W], decoded `chunk` frames at a time by the temporal decoder."""
        b, f = latents_bfchw.shape[:2]
        z = latents_bfchw.flatten(0, 1) / self.scaling_factor
        out = []
        for i in range(0, z.shape[0], chunk):
            part = z[i : i + chunk]
            out.append(self.vae.decode(part.to(self.vae.dtype), num_frames=part.shape[0]).sample)
        return torch.cat(out).unflatten(0, (b, f)).float()

    def added_time_ids(self, fps_id: torch.Tensor, motion_bucket_id: torch.Tensor,
                       noise_aug: torch.Tensor) -> torch.Tensor:
        """[B, 3] micro-conditioning. `fps_id` is fps - 1: SVD was trained on fps - 1 (the pipeline's note)."""
        ids = torch.stack([fps_id.float(), motion_bucket_id.float(), noise_aug.float()], dim=1)
        return ids.to(self.unet.dtype)


def _resize_antialiased(x_bchw: torch.Tensor, size: int) -> torch.Tensor:
    """The SVD pipeline's CLIP resize (Gaussian blur + bicubic), so embeddings match it exactly."""
    if x_bchw.shape[-2:] == (size, size):
        return x_bchw
    try:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (  # lazy: heavy
            _resize_with_antialiasing,
        )
    except ImportError:  # pragma: no cover - older/newer diffusers without the helper
        return F.interpolate(x_bchw, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return _resize_with_antialiasing(x_bchw, (size, size))


# ---------------------------------------------------------------------------------------------
# tiny flavor


@dataclass(frozen=True)
class TinySVDConfig:
    """Sizes of the tiny flavor. UNet: diffusers' SVD test config; VAE: 4 blocks for 8x downsampling."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 2
    cross_attention_dim: int = 32
    attention_heads: int = 8
    addition_time_embed_dim: int = 32
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    clip_image_size: int = 32
    clip_patch_size: int = 4


def tiny(seed: int = 0, num_frames: int = 8, cfg: TinySVDConfig = TinySVDConfig()) -> SVD:
    from diffusers import (  # lazy: heavy (diffusers, transformers)
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPImageProcessor = _clip_processor_class()
    n = len(cfg.unet_channels)
    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) + ("DownBlockSpatioTemporal",) * (n - 1),
        up_block_types=("UpBlockSpatioTemporal",) * (n - 1) + ("CrossAttnUpBlockSpatioTemporal",),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        num_attention_heads=cfg.attention_heads,
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=3 * cfg.addition_time_embed_dim,
        num_frames=num_frames,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=cfg.clip_hidden,
            projection_dim=cfg.cross_attention_dim,  # must equal the UNet's cross-attention width
            num_hidden_layers=cfg.clip_layers,
            num_attention_heads=cfg.clip_heads,
            image_size=cfg.clip_image_size,
            intermediate_size=37,
            patch_size=cfg.clip_patch_size,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=cfg.clip_image_size, size=cfg.clip_image_size)
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    model = SVD(unet, vae, image_encoder, feature_extractor, scheduler)
    for m in (unet, vae, image_encoder):
        m.eval()
    return model


def _clip_processor_class():
    # transformers 5 split the processor into torchvision and PIL backends; only mean/std are used here.
    try:
        from transformers import CLIPImageProcessorPil as cls  # lazy: heavy (transformers); transformers 5
    except ImportError:
        from transformers import CLIPImageProcessor as cls  # lazy: heavy (transformers); transformers 4
    return cls


# The scheduler config SVD ships with (EDM sigmas, v-prediction, Karras spacing).
SVD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)


# ---------------------------------------------------------------------------------------------
# pretrained flavor


def _missing_weights(path: str, why: str) -> ModelError:
    return missing_weights(path, why, "diffusers-format SVD", SUBFOLDERS)


def resolve_model_dir(path: str, cache_dir: str) -> Path:
    return loading.resolve_model_dir(path, cache_dir, "diffusers-format SVD", SUBFOLDERS)


def pretrained(path: str, cache_dir: str = "~/.cache/vidgen/models", unet_path: str | None = None) -> SVD:
    from diffusers import (  # lazy: heavy (diffusers, transformers)
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionModelWithProjection

    CLIPImageProcessor = _clip_processor_class()
    root = resolve_model_dir(path, cache_dir)
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise _missing_weights(path, f"missing subfolder(s) {', '.join(missing)}")
    kw = dict(local_files_only=True)
    try:
        unet = (
            load_unet(unet_path, cache_dir)
            if unet_path
            else UNetSpatioTemporalConditionModel.from_pretrained(root, subfolder="unet", **kw)
        )
        vae = AutoencoderKLTemporalDecoder.from_pretrained(root, subfolder="vae", **kw)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(root, subfolder="image_encoder", **kw)
        feature_extractor = CLIPImageProcessor.from_pretrained(root, subfolder="feature_extractor", **kw)
        scheduler = EulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **kw)
    except ModelError:
        raise
    except Exception as e:  # OSError, ValueError, safetensors' own errors, shapes that do not fit, ...
        raise _missing_weights(path, f"cannot load it ({brief(e)})") from None
    for m in (unet, vae, image_encoder):
        m.eval()
    return SVD(unet, vae, image_encoder, feature_extractor, scheduler)


def load_unet(path: str, cache_dir: str = "~/.cache/vidgen/models") -> torch.nn.Module:
    """A UNet directory written by `vidgen train` (diffusers `save_pretrained` format)."""
    from diffusers import UNetSpatioTemporalConditionModel  # lazy: heavy (diffusers)

    root = resolve_model_dir(path, cache_dir)
    if not (root / "config.json").is_file():
        raise ModelError(f"{path}: not a UNet directory (expected config.json and weights from `vidgen train`)")
    try:
        return UNetSpatioTemporalConditionModel.from_pretrained(root, local_files_only=True).eval()
    except Exception as e:  # unreadable config.json, truncated or foreign weights, shapes that do not fit
        raise ModelError(f"{path}: cannot load the UNet directory ({brief(e)})") from None


def build(flavor: str, *, path: str | None = None, cache_dir: str = "~/.cache/vidgen/models",
          seed: int = 0, num_frames: int = 8, unet_path: str | None = None, attention: str = "sdpa",
          dtype: torch.dtype = torch.float32) -> SVD:
    """The entry point configs use: `model.flavor`, `model.path`, `model.cache_dir`, `model.attention`.
    `dtype`: what flavor=full builds its weights in (the recipe's frozen-base dtype)."""
    check_backend(attention)  # before loading gigabytes of weights
    if flavor == "tiny":
        model = tiny(seed=seed, num_frames=num_frames)
        if unet_path:
            model.unet = load_unet(unet_path, cache_dir)
    elif flavor == "pretrained":
        if not path:
            raise ModelError("model.path: required for model.flavor=pretrained (a diffusers SVD directory)")
        model = pretrained(path, cache_dir, unet_path=unet_path)
    elif flavor == "full":
        model = full(seed=seed, num_frames=num_frames, dtype=dtype)
        if unet_path:
            model.unet = load_unet(unet_path, cache_dir).to(dtype)
    else:
        raise ModelError(f"model.flavor={flavor}: expected one of tiny, full, pretrained")
    return model.set_attention(attention)


# ---------------------------------------------------------------------------------------------
# full-size configs (no weights): what `vidgen plan` builds on the meta device when model.path has none


def full_size_configs(num_frames: int = 25) -> dict[str, dict]:
    """The configs of stabilityai/stable-video-diffusion-img2vid (num_frames=14) and -img2vid-xt (25).

    UNet: diffusers' `UNetSpatioTemporalConditionModel` defaults, which are SVD's (training.md 4.1), ~1.52B
    parameters. VAE: the SD 4-block KL encoder with SVD's temporal decoder, ~98M. Image encoder: OpenCLIP
    ViT-H/14 vision tower with a 1024-wide projection, ~632M. The two releases differ only in num_frames.
    """
    return {
        "unet": dict(
            sample_size=96, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
            block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
            transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=num_frames,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768,
            scaling_factor=0.18215, force_upcast=True,
        ),
        "image_encoder": dict(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
            patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
        ),
    }


def full(seed: int = 0, num_frames: int = 25, dtype: torch.dtype = torch.float32) -> SVD:
    """SVD-XT's architecture at full size (`full_size_configs`), random init: what benchmarks and the GPU check
    train where no weights are given. Each part is built directly in `dtype` (a 1.5B-parameter UNet is never
    held twice) and seeded on its own: torch.manual_seed(seed) then the UNet's `from_config` reproduces the
    UNet without vidgen (seed + 1: the VAE, seed + 2: the image encoder)."""
    from diffusers import EulerDiscreteScheduler  # lazy: heavy (diffusers)

    configs = full_size_configs(num_frames)
    parts = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for i, name in enumerate(("unet", "vae", "image_encoder")):
            torch.manual_seed(seed + i)
            parts[name] = getattr(from_configs({k: configs[k] for k in configs if k == name}, only=name), name)
    finally:
        torch.set_default_dtype(previous)
    size = configs["image_encoder"]["image_size"]
    model = SVD(parts["unet"], parts["vae"], parts["image_encoder"],
                _clip_processor_class()(crop_size=size, size=size), EulerDiscreteScheduler(**SVD_SCHEDULER))
    for m in (model.unet, model.vae, model.image_encoder):
        m.eval()
    return model


def from_configs(configs: dict[str, dict], only: str | None = None) -> SVD:
    """UNet, VAE and image encoder built from config dicts (e.g. `full_size_configs()` or the config.json files
    of a diffusers directory), randomly initialised on the current default device; no scheduler or feature
    extractor. Build under `torch.device("meta")` to get shapes without memory."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel  # lazy: heavy
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    want = (lambda name: only in (None, name))  # noqa: E731
    unet = UNetSpatioTemporalConditionModel.from_config(configs["unet"]) if want("unet") else None
    vae = AutoencoderKLTemporalDecoder.from_config(configs["vae"]) if want("vae") else None
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"])) \
        if want("image_encoder") else None
    return SVD(unet, vae, image_encoder, feature_extractor=None, scheduler=None)


def from_config(m, seed: int = 0, dtype: torch.dtype = torch.float32) -> SVD:
    """The model a `model.*` config section describes (vidgen.config.ModelConfig)."""
    return build(m.flavor, path=m.path, cache_dir=m.cache_dir, seed=seed, num_frames=m.num_frames,
                 attention=m.attention, dtype=dtype)
