"""SVD's training recipes (svd_full, svd_lora): what trains and how a batch becomes an EDM loss.

Shapes: B batch, F frames, C channels, H/W pixels, h/w latents.

A recipe builds its models, names the trainable parameters, turns a batch into a loss through a given
UNet callable (the DeepSpeed engine, so ZeRO sees every forward), and exports trained weights
(`vidgen.models.base.Recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vidgen.config import ModelConfig, TrainConfig
from vidgen.diffusion.noise import randn
from vidgen.diffusion.objectives import (
    conditioning_dropout_masks,
    edm_denoised,
    edm_loss,
    edm_scalings,
    rand_log_normal,
)
from vidgen.errors import ConfigError
from vidgen.models import lora
from vidgen.models.base import zero3_units
from vidgen.models.svd import model as svd


def build_svd(m: ModelConfig, seed: int, precision: str = "fp32", build=None) -> svd.SVD:
    """flavor=full builds its random weights in the precision the frozen base trains in (bf16 with
    train.precision=bf16): no fp32 copy first. `build`: a stand-in for `svd.build` (vidgen plan's meta builder)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return (build or svd.build)(m.flavor, path=m.path, cache_dir=m.cache_dir, seed=seed, num_frames=m.num_frames,
                                attention=m.attention, dtype=dtype)


ZERO3_UNITS = ("SpatioTemporalResBlock", "TransformerSpatioTemporalModel")  # what ZeRO-3 gathers whole (`zero3_units`)


@dataclass
class SVDFullRecipe:
    """Full (or temporal-only) fine-tuning of the SVD UNet with SVD Xtend's EDM objective, minus its bugs:
    per-sample conditioning noise in `added_time_ids`, fps from the data (sent as fps - 1, as the pipeline
    samples), the conditioning frame's VAE mode, and gradient clipping that actually happens (DeepSpeed).
    """

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    seed: int = 0
    build: object = None  # a stand-in for svd.build (vidgen plan's meta-device builder)

    OPTIONAL_COLUMNS = ()
    TRAIN_SECTIONS = ("edm",)
    EXPORT_NAME = "unet"
    checkpoint_trainable_only = False

    def __post_init__(self):
        self._build_frozen_encoders()
        unet = self.model.unet
        t = self.train_cfg
        patterns = {"all": None, "temporal": ["temporal_transformer_block"],  # SVD Xtend's choice
                    "patterns": t.trainable_patterns}[t.trainable]
        for name, p in unet.named_parameters():
            p.requires_grad_(patterns is None or any(pat in name for pat in patterns))
        if not any(p.requires_grad for p in unet.parameters()):
            raise ConfigError(f"train.trainable_patterns={t.trainable_patterns}: no UNet parameter name "
                              "contains any of them")
        unet.train()

    def _build_frozen_encoders(self) -> None:
        """The SVD model, its VAE and CLIP image encoder frozen (both recipes train only the UNet's parameters)."""
        self.model = build_svd(self.model_cfg, self.seed, self.train_cfg.precision, self.build)
        self.model.vae.requires_grad_(False)
        self.model.image_encoder.requires_grad_(False)

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def to(self, device: torch.device) -> SVDFullRecipe:
        self.model.vae.to(device)
        self.model.image_encoder.to(device)
        return self

    def deepspeed_overrides(self) -> dict:
        return zero3_units(self.unet, ZERO3_UNITS)

    def encoders(self) -> list[torch.nn.Module]:
        return [self.model.vae, self.model.image_encoder]

    # What the frozen encoders make of a clip, deterministic: `vidgen prepare latents` caches it.
    ENCODED = ("latent_params", "image_embeds", "first_frame", "cond_latent")

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """{latent_params fp32 [B, F, 2C, h, w] (VAE posterior), image_embeds [B, 1, D] (CLIP, clean first frame),
        first_frame uint8 [B, H, W, 3], cond_latent [B, C, h, w] (VAE mode of the clean first frame)}."""
        m = self.model
        device = next(m.vae.parameters()).device
        frames = batch["frames"].to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # [B, F, 3, H, W]
        first = frames[:, 0]
        return {"latent_params": m.video_posterior(frames), "image_embeds": m.encode_image(first).float(),
                "first_frame": batch["frames"][:, 0], "cond_latent": m.encode_condition_frame(first).float()}

    def loss(self, batch: dict, unet_fn, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """EDM loss for a batch of clips {frames uint8 [B, F, H, W, 3], fps [B]} or of their cached encodings
        {ENCODED..., fps [B]}; both give the same loss for the same clips and generator."""
        c = self.train_cfg.edm
        m = self.model
        device = next(m.vae.parameters()).device
        enc = batch if "latent_params" in batch else self.encode(batch)
        b = enc["latent_params"].shape[0]
        with torch.no_grad():
            latents = m.sample_latents(enc["latent_params"].to(device), generator)  # [B, F, C, h, w], scaled
            first = enc["first_frame"].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W]
            cond_sigma = rand_log_normal((b,), c.cond_aug_mean, c.cond_aug_std, generator).to(device)
            noisy_first = first + cond_sigma.view(b, 1, 1, 1) * randn(first.shape, generator, device)
            # SVD Xtend's augmentation is in pixel space, so this one frame is encoded here, cache or not
            cond_latent = m.encode_condition_frame(noisy_first)  # [B, C, h, w], unscaled
            image_embeds = enc["image_embeds"].to(device)  # [B, 1, D], from the clean frame as at sampling
        keep_emb, keep_lat = conditioning_dropout_masks(b, c.conditioning_dropout, generator, device)
        image_embeds = image_embeds * keep_emb.view(b, 1, 1)
        cond_latent = cond_latent * keep_lat.view(b, 1, 1, 1)

        sigma = rand_log_normal((b,), c.p_mean, c.p_std, generator).to(device)
        noise = randn(latents.shape, generator, device)
        noisy = latents + sigma.view(b, 1, 1, 1, 1) * noise
        sc = edm_scalings(sigma)
        f = latents.shape[1]
        unet_in = torch.cat([sc.c_in.view(b, 1, 1, 1, 1) * noisy,
                             cond_latent.unsqueeze(1).expand(-1, f, -1, -1, -1)], dim=2)
        fps = batch["fps"].to(device).float().round().clamp(min=1)
        motion = batch.get("motion_bucket_id")  # per-clip metadata wins over the config
        motion = motion.to(device).float() if motion is not None else torch.full((b,), float(c.motion_bucket_id))
        ids = m.added_time_ids(fps - 1, motion.to(device), cond_sigma)
        dtype = next(self.unet.parameters()).dtype
        out = unet_fn(unet_in.to(dtype), sc.c_noise.to(dtype), image_embeds.to(dtype), ids.to(dtype))
        denoised = edm_denoised(out.float(), noisy, sigma)
        loss = edm_loss(denoised, latents, sigma)
        return loss, {"sigma_mean": sigma.mean().item()}

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """Write the trained UNet as a diffusers directory (`UNetSpatioTemporalConditionModel.from_pretrained`)."""
        missing, unexpected = self.unet.load_state_dict(state_dict, strict=False)
        if unexpected or (missing and self.train_cfg.trainable == "all"):
            raise RuntimeError(f"exported state dict does not fit the UNet: missing={missing[:5]} "
                               f"unexpected={unexpected[:5]}")
        self.unet.save_pretrained(str(out_dir), safe_serialization=True)

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        self.export(state_dict, out_dir)  # the whole UNet trains: there is nothing to merge


@dataclass
class SVDLoraRecipe(SVDFullRecipe):
    """LoRA (train.lora) on a frozen SVD UNet with the same EDM objective as `SVDFullRecipe`.

    Precision: the adapters stay fp32 and are the only tensors in the optimizer and the checkpoints. With
    train.precision=bf16 on GPU the frozen base is cast to bf16 here and DeepSpeed runs in fp32 mode (PEFT
    runs the adapter branch in its own fp32 dtype); on CPU the base stays fp32. fp16 is left to DeepSpeed's
    fp16 mode for its loss scaling: it casts the whole UNet, keeping fp32 master copies of the adapters.
    """

    TRAIN_SECTIONS = ("edm", "lora")
    EXPORT_NAME = "lora"
    # The loop saves/loads only trainable tensors: the frozen base is rebuilt from the model config.
    checkpoint_trainable_only = True

    def __post_init__(self):
        self._build_frozen_encoders()
        self.targets = lora.inject_lora(self.model.unet, self.train_cfg.lora)  # freezes everything else
        self.base_dtype = next(p.dtype for p in self.model.unet.parameters() if not p.requires_grad)
        self.model.unet.train()

    def to(self, device: torch.device) -> SVDLoraRecipe:
        super().to(device)
        if device.type == "cuda" and self.train_cfg.precision == "bf16":
            self.base_dtype = torch.bfloat16
            for p in self.unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        return self

    def deepspeed_overrides(self) -> dict:
        """bf16 is done by the base cast above; DeepSpeed's bf16 mode would cast the adapters too."""
        return {"bf16": {"enabled": False}}

    def lora_state(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter tensors of a (consolidated) checkpoint, keyed `<module>.lora_A.weight`."""
        adapter = lora.ADAPTER
        state = {k.replace(f".{adapter}.", "."): v.float() for k, v in state_dict.items() if ".lora_" in k}
        expected = {k.replace(f".{adapter}.", ".") for k, _ in self.unet.named_parameters() if ".lora_" in k}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RuntimeError(f"checkpoint LoRA tensors do not fit train.lora: missing={missing[:3]} "
                               f"unexpected={extra[:3]}")
        return state

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """Write the adapters (PEFT and diffusers layouts, see `vidgen.models.lora`) to `out_dir`."""
        cfg = lora.config_from_targets(self.train_cfg.lora, self.targets)
        lora.write_lora_dir(self.lora_state(state_dict), cfg, str(out_dir))

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """Write the base UNet with the adapters merged in, as a diffusers UNet directory."""
        state = {k: v.to(torch.float32) for k, v in self.lora_state(state_dict).items()}
        # In fp32: a base built or trained in bf16 would round the small LoRA update away in the merge.
        lora.set_peft_state(self.unet.float(), state)
        lora.merge_lora(self.unet).save_pretrained(str(out_dir), safe_serialization=True)

