"""Wan's training recipes (wan_full, wan_lora): text-to-video with the flow-matching objective of `flow`, and
image-to-video on a TI2V checkpoint (`Wan.expand_timesteps`).

Shapes: B batch, F pixel frames, L latent frames, C latent channels, H/W pixels, h/w latents, S text tokens.

A batch is {frames uint8 [B, F, H, W, 3], fps [B]} plus `prompt` (strings) when the dataset has them, or its cached
encodings {latents [B, L, C, h, w], prompt_embeds [B, S, D]}; clips without a prompt train on the empty prompt.

TI2V conditions each clip on its own first frame, as DiffSynth-Studio trains Wan2.2-TI2V-5B (its `input_image` is
the clip's frame 0; diffsynth/diffusion/loss.py FlowMatchSFTLoss): the noisy latents' frame 0 is the first frame's
latent (latent frame 0 of the clip: the causal VAE encodes frame 0 alone), that frame's tokens get timestep 0, and
the loss covers the other latent frames only. The cache is the same: frame 0 comes from the cached latents.

Wan 2.1 I2V (the image as input channels) conditions each clip on its first frame as DiffSynth-Studio trains
Wan2.1-I2V-14B: the mask and the latents of [first frame, black frames...] concatenated to every noisy latent frame
(`Wan.encode_condition`), CLIP's hidden states of the frame through the image embedder, the loss over every latent
frame. Those are two more encoded columns (image_condition, image_embeds), cached with the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vidgen.config import ModelConfig, TrainConfig
from vidgen.diffusion.noise import randn
from vidgen.errors import ConfigError, ModelError
from vidgen.models import lora
from vidgen.models.base import zero3_units
from vidgen.models.wan import flow
from vidgen.models.wan import model as wan
from vidgen.models.wan.lora_formats import write_wan_lora_dir


def build_wan(m: ModelConfig, seed: int, dtype: torch.dtype = torch.float32, build=None) -> wan.Wan:
    """`build`: a stand-in for `wan.build` (vidgen plan's meta-device builder)."""
    return (build or wan.build)(m.flavor, path=m.path, cache_dir=m.cache_dir, seed=seed, attention=m.attention,
                                dtype=dtype)


ZERO3_UNITS = ("WanTransformerBlock",)  # what ZeRO-3 gathers whole (`zero3_units`)


@dataclass
class WanFullRecipe:
    """Fine-tuning of the Wan transformer (all of it, or the parameters train.trainable_patterns names) on a frozen
    VAE and text encoder."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    seed: int = 0
    build: object = None  # a stand-in for wan.build (vidgen plan's meta-device builder)

    ENCODED = ("latents", "prompt_embeds")
    OPTIONAL_COLUMNS = ("prompt",)
    TRAIN_SECTIONS = ("flow",)
    EXPORT_NAME = "transformer"
    checkpoint_trainable_only = False

    def __post_init__(self):
        self._build_frozen(torch.float32)
        t = self.train_cfg
        if t.trainable == "temporal":
            raise ConfigError("train.trainable=temporal: Wan's transformer attends over space and time at once; "
                              "use all or patterns")
        for name, p in self.unet.named_parameters():
            p.requires_grad_(t.trainable == "all" or any(pat in name for pat in t.trainable_patterns))
        if not any(p.requires_grad for p in self.unet.parameters()):
            raise ConfigError(f"train.trainable_patterns={t.trainable_patterns}: no transformer parameter name "
                              "contains any of them")
        self.unet.train()

    def _build_frozen(self, dtype: torch.dtype) -> None:
        f = self.model_cfg.num_frames
        if f % 4 != 1:
            raise ConfigError(f"model.num_frames={f}: Wan's causal VAE takes 4k + 1 frames (e.g. 5, 17, 33, 81)")
        self.model = build_wan(self.model_cfg, self.seed, dtype, self.build)
        for m in self.model.frozen():
            m.requires_grad_(False)
        if self.model.image_channels:
            self.ENCODED = (*type(self).ENCODED, "image_condition", "image_embeds")
            if self.train_cfg.validation_every:
                raise ConfigError("train.validation_every: Wan 2.1 I2V makes videos from an image only, and the Wan "
                                  "family's validation videos come from prompts; set train.validation_every=0")

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def to(self, device: torch.device) -> WanFullRecipe:
        for m in self.model.frozen():
            m.to(device)
        return self

    def deepspeed_overrides(self) -> dict:
        return zero3_units(self.unet, ZERO3_UNITS)

    def encoders(self) -> list[torch.nn.Module]:
        return self.model.frozen()

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """{latents fp32 [B, L, C, h, w] (normalised posterior means), prompt_embeds fp32 [B, S, D]}: deterministic,
        what `vidgen prepare latents` caches."""
        m = self.model
        device = next(m.vae.parameters()).device
        frames = batch["frames"].to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # [B, F, 3, H, W]
        prompts = batch.get("prompt")
        prompts = [str(p) for p in prompts] if prompts is not None else [""] * frames.shape[0]
        out = {"latents": m.encode_video(frames), "prompt_embeds": m.encode_text(prompts)}
        if m.image_channels:  # Wan 2.1 I2V: the clip's first frame as its image
            out["image_condition"] = m.encode_condition(frames[:, 0], frames.shape[1])
            out["image_embeds"] = m.encode_clip(frames[:, 0]).to(device)
        return out

    def loss(self, batch: dict, unet_fn, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The flow-matching loss of `vidgen.models.wan.flow` (train.flow) for clips or their cached encodings."""
        device = next(self.model.vae.parameters()).device
        enc = batch if "latents" in batch else self.encode(batch)
        x0 = enc["latents"].to(device).float()  # [B, L, C, h, w]
        embeds = enc["prompt_embeds"].to(device)
        noise = randn(x0.shape, generator, device)  # noise, then the level: DiffSynth-Studio's order
        sigma, weight = flow.draw(x0.shape[0], self.train_cfg.flow, generator)
        x_t = flow.noisy(x0, noise, sigma.to(device))
        dtype = next(self.unet.parameters()).dtype
        timestep = (sigma * flow.TRAIN_TIMESTEPS).to(device)
        first = 1 if self.model.expand_timesteps else 0  # TI2V: latent frame 0 is the clean first frame
        if first:
            x_t[:, 0] = x0[:, 0]
            timestep = self.token_timesteps(timestep, x0.shape)
        extra = {}
        if self.model.image_channels:  # Wan 2.1 I2V: the image as input channels and CLIP
            x_t = torch.cat([x_t, enc["image_condition"].to(device).float()], dim=2)
            extra["encoder_hidden_states_image"] = enc["image_embeds"].to(device, dtype)
        pred = unet_fn(x_t.permute(0, 2, 1, 3, 4).to(dtype), timestep.to(dtype), encoder_hidden_states=embeds.to(dtype),
                       **extra)
        loss = flow.loss(pred.permute(0, 2, 1, 3, 4)[:, first:], x0[:, first:], noise[:, first:], weight.to(device))
        return loss, {"sigma_mean": sigma.mean().item()}

    def token_timesteps(self, timestep_b: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[B, N]: each clip's timestep on the tokens of latent frames 1.., 0 on frame 0's."""
        b, frames, _, h, w = shape
        _, ph, pw = self.unet.config.patch_size
        per_frame = timestep_b[:, None].repeat(1, frames)
        per_frame[:, 0] = 0
        return per_frame.repeat_interleave(h // ph * (w // pw), dim=1)

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """The trained transformer as a diffusers directory (`WanTransformer3DModel.from_pretrained`)."""
        missing, unexpected = self.unet.load_state_dict(state_dict, strict=False)
        if unexpected or (missing and self.train_cfg.trainable == "all"):
            raise ModelError(f"exported state dict does not fit the Wan transformer: missing={missing[:5]} "
                             f"unexpected={unexpected[:5]}")
        self.unet.save_pretrained(str(out_dir), safe_serialization=True)

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        self.export(state_dict, out_dir)  # the whole transformer trains: nothing to merge


@dataclass
class WanLoraRecipe(WanFullRecipe):
    """PEFT LoRA (train.lora; by default on every attention projection, to_q/to_k/to_v/to_out.0 of the self- and
    cross-attention) on a frozen Wan transformer, with the same objective. Adapters train in fp32; with
    train.precision=bf16 the frozen base is bf16 (loaded so, or cast on the GPU) and DeepSpeed runs in fp32 mode."""

    TRAIN_SECTIONS = ("flow", "lora")
    EXPORT_NAME = "lora"
    checkpoint_trainable_only = True  # the frozen base is rebuilt from the model config on resume

    def __post_init__(self):
        bf16 = self.train_cfg.precision == "bf16" and self.model_cfg.flavor != "tiny"
        self._build_frozen(torch.bfloat16 if bf16 else torch.float32)
        self.targets = lora.inject_lora(self.unet, self.train_cfg.lora)  # freezes everything else
        self.unet.train()

    def to(self, device: torch.device) -> WanLoraRecipe:
        super().to(device)
        if device.type == "cuda" and self.train_cfg.precision == "bf16":
            for p in self.unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        return self

    def deepspeed_overrides(self) -> dict:
        return {"bf16": {"enabled": False}}  # the base cast above; DeepSpeed's bf16 would cast the adapters too

    def lora_state(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter tensors of a (consolidated) checkpoint, keyed `<module>.lora_A.weight`."""
        state = {k.replace(f".{lora.ADAPTER}.", "."): v.float() for k, v in state_dict.items() if ".lora_" in k}
        expected = {k.replace(f".{lora.ADAPTER}.", ".") for k, _ in self.unet.named_parameters() if ".lora_" in k}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ModelError(f"checkpoint LoRA tensors do not fit train.lora: missing={missing[:3]} "
                             f"unexpected={extra[:3]}")
        return state

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """The adapters in the PEFT, diffusers (`WanPipeline.load_lora_weights`) and ComfyUI layouts
        (`vidgen.models.wan.lora_formats`); `vidgen.models.lora.load_lora` reads the directory back."""
        cfg = lora.config_from_targets(self.train_cfg.lora, self.targets)
        write_wan_lora_dir(self.lora_state(state_dict), cfg, str(out_dir))

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """The base transformer with the adapters merged in, as a diffusers directory (fp32: a bf16 base would round
        the small update away in the merge)."""
        lora.set_peft_state(self.unet.float(), self.lora_state(state_dict))
        lora.merge_lora(self.unet).save_pretrained(str(out_dir), safe_serialization=True)
